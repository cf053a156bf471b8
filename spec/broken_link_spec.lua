-- Connections over a link that breaks (UCX's, and TCP sockets over
-- io_uring): two pluvio processes in network namespaces of their own,
-- joined by a veth pair whose one end is then set down, so that nothing
-- answers any more (no reset, as from a killed peer).
local helper = require "helper"

local format = string.format
local q = helper.quote

-- The server takes a client, closes its listener, takes a small message,
-- then a rendezvous one whose data it never pulls (its sender waits for
-- the receiver), then waits for a third message that cannot come.
local UCX_SERVER = [[
local ucx = require "pluvio.ucx"
local ctx = assert(ucx.Context.new())
local w = assert(ctx:create_worker())
local stream = w:am_stream(1)
local l = assert(w:create_listener("10.77.0.1", 13370))
print("listening"); io.stdout:flush()
local ep = assert(l:accept())
l:close()
assert(assert(stream:wait_msg()):data() == "12345678")
local held = assert(stream:wait_msg())
print("ready " .. held:data_len()); io.stdout:flush()
print("server", stream:wait_msg())
]]

local UCX_CLIENT = [[
local ucx = require "pluvio.ucx"
local ctx = assert(ucx.Context.new())
local w = assert(ctx:create_worker())
local ep = assert(w:connect_socket("10.77.0.1", 13370))
assert(ep:am_send(1, "small", "12345678"))
print("client", ep:am_send(1, "big", string.rep("x", 1048576), false, "rndv"))
]]

-- A TCP server that turns keepalive on for the connection it accepts and
-- then reads; its client does the same and sends until its send fails.
local TCP_SERVER = [[
local uring = require "pluvio.uring"
local l = assert(uring.tcp_listen("10.77.0.1", 13371))
print("listening"); io.stdout:flush()
local c = assert(l:accept())
if arg[1] ~= "off" then assert(c:keepalive(1, 1, 2) == true) end
assert(c:recv_exact(65536))
print("ready"); io.stdout:flush()
while true do
    local s, err, code = c:recv(65536)
    if not s then print("server", s, err, code) break end
end
]]

local TCP_CLIENT = [[
local uring = require "pluvio.uring"
local c = assert(uring.tcp_connect("10.77.0.1", 13371))
if arg[1] ~= "off" then assert(c:keepalive(1, 1, 2) == true) end
local chunk = string.rep("x", 65536)
while true do
    local n, err, code = c:send(chunk)
    if not n then print("client", n, err, code) break end
end
]]

-- Namespaces an earlier run left (killed, its shell's trap never ran):
-- those whose process, the number at the end of the name, is gone.
local STALE = [[
for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep '^pluvio_link_'); do
    kill -0 "${ns##*_}" 2>/dev/null || ip netns del "$ns" 2>/dev/null
done]]

-- The whole scenario as one shell script: the server (10.77.0.1) prints
-- "listening", then the client (10.77.0.2) starts; once the server prints
-- "ready" the link goes down.  Exits 200 when the namespaces cannot be
-- made.  retries: TCP's retransmission limit there (tcp_retries2); arg:
-- both scripts' argument.
local SCENARIO = [[
%s
A=pluvio_link_a_$$ B=pluvio_link_b_$$ D=%s HOST=%s RETRIES=%d ARG=%s
trap 'ip netns del $A 2>/dev/null; ip netns del $B 2>/dev/null' EXIT
ip netns add $A && ip netns add $B &&
ip link add va netns $A type veth peer name vb netns $B &&
ip -n $A addr add 10.77.0.1/24 dev va && ip -n $B addr add 10.77.0.2/24 dev vb &&
ip -n $A link set va up && ip -n $B link set vb up &&
ip -n $A link set lo up && ip -n $B link set lo up &&
ip netns exec $A sysctl -q -w net.ipv4.tcp_retries2=$RETRIES &&
ip netns exec $B sysctl -q -w net.ipv4.tcp_retries2=$RETRIES || exit 200
for i in $(seq 100); do    # (UCX leaves out an interface not up yet)
    ip -n $A link show va | grep -q "state UP" && ip -n $B link show vb | grep -q "state UP" && break
    sleep 0.05
done
export UCX_NET_DEVICES=all    # (spec/run's lo: the namespaces have lo and the veth only)
ip netns exec $A timeout -k 5 60 "$HOST" $D/server.lua $ARG >$D/server.out 2>$D/server.err &
SERVER=$!
for i in $(seq 100); do grep -q listening $D/server.out && break; sleep 0.1; done
ip netns exec $B timeout -k 5 60 "$HOST" $D/client.lua $ARG >$D/client.out 2>$D/client.err &
CLIENT=$!
for i in $(seq 100); do grep -q ready $D/server.out && break; sleep 0.1; done
ip -n $A link set va down
start=$(date +%%s)
wait $CLIENT; echo "client exit $?"
wait $SERVER; echo "server exit $?"
echo "seconds $(( $(date +%%s) - start ))"
]]

-- Runs server and client (code) over the link; returns the scenario's
-- output and a report of everything (for a failed assertion), or nil
-- when no namespace can be made (the spec is then pending).
local function over_broken_link(server, client, retries, arg)
    local dir = helper.tmp_path(".link")
    assert(os.execute("mkdir " .. q(dir)) == 0)
    for name, code in pairs({ ["server.lua"] = server, ["client.lua"] = client }) do
        local f = assert(io.open(dir .. "/" .. name, "w"))
        f:write(code)
        f:close()
    end
    local status, out, err = helper.sh(format(SCENARIO, STALE, q(dir), q(helper.host), retries, q(arg or "")))
    local function slurp(name)
        local f = io.open(dir .. "/" .. name)
        local s = f and f:read("*a") or ""
        if f then f:close() end
        return s
    end
    local report = format("scenario: %s%s\nclient: %s%s\nserver: %s%s", out, err,
                          slurp("client.out"), slurp("client.err"),
                          slurp("server.out"), slurp("server.err"))
    os.execute("rm -rf " .. q(dir))
    if status == 200 then
        pending("cannot make network namespaces and a veth pair (needs root and ip): " .. err)
        return nil
    end
    assert(status == 0, report)
    assert(out:match("client exit 0\n") and out:match("server exit 0\n"), report)
    -- (no timing claim: under a minute tells "ended by a keepalive" from
    -- "ended by the 60 s timeout")
    assert(tonumber(out:match("seconds (%d+)")) < 50, report)
    return out, report
end

describe("a UCX listener on an address of an interface UCX_NET_DEVICES leaves out", function()
    -- (UCX took the connection there and dropped it, with an ERROR line on
    -- the listener's side only: the client waited for good)
    it("is refused with ENODEV, naming the interface and the setting", function()
        local dir = helper.tmp_path(".dev")
        assert(os.execute("mkdir " .. q(dir)) == 0)
        local f = assert(io.open(dir .. "/listen.lua", "w"))
        f:write([[
local ucx = require "pluvio.ucx"
local ctx = assert(ucx.Context.new())
local w = assert(ctx:create_worker())
for _, host in ipairs({ "10.78.0.1", "127.0.0.1" }) do
    local l, err, code = w:create_listener(host, 0)
    print(host, l and "listening" or err, code)
    if l then l:close() end
end
w:close(); ctx:close()
]])
        f:close()
        local status, out, err = helper.sh(format([[
%s
N=pluvio_link_d_$$
trap 'ip netns del $N 2>/dev/null' EXIT
ip netns add $N && ip -n $N link set lo up &&
ip -n $N link add v0 type veth peer name v1 && ip -n $N addr add 10.78.0.1/24 dev v0 &&
ip -n $N link set v0 up && ip -n $N link set v1 up || exit 200
for devs in lo v0 lo,v0 lo,mlx5_0:1; do
    echo "== $devs"
    UCX_NET_DEVICES=$devs ip netns exec $N timeout -k 5 60 %s %s/listen.lua
done]], STALE, q(helper.host), q(dir)))
        os.execute("rm -rf " .. q(dir))
        if status == 200 then
            pending("cannot make a network namespace and a veth pair (needs root and ip): " .. err)
            return
        end
        assert.equal(0, status, err)
        local refused = "%s\tlisten on %s:0: the address is on interface %s, which UCX_NET_DEVICES=%s leaves out: UCX " ..
                        "would take a client's connection there and drop it, the client failing or waiting for good " ..
                        "(add %s to UCX_NET_DEVICES, or listen on an address of one of its interfaces)\tENODEV\n"
        assert.equal("== lo\n" .. format(refused, "10.78.0.1", "10.78.0.1", "v0", "lo", "v0") .. "127.0.0.1\tlistening\tnil\n" ..
                     "== v0\n10.78.0.1\tlistening\tnil\n" .. format(refused, "127.0.0.1", "127.0.0.1", "lo", "v0", "lo") ..
                     "== lo,v0\n10.78.0.1\tlistening\tnil\n127.0.0.1\tlistening\tnil\n" ..
                     -- (an entry that is no interface here, an RDMA device's: UCX takes a listener's
                     -- connections on it under that name, so nothing is refused; UCX warns of it)
                     "== lo,mlx5_0:1\n10.78.0.1\tlistening\tnil\n127.0.0.1\tlistening\tnil\n", out)
    end)
end)

describe("UCX over a link that breaks (no peer answers any more)", function()
    it("fails a rendezvous send waiting for its receiver, and the receiver's wait, " ..
       "with ETIMEDOUT (or ECONNRESET) and ENOTCONN instead of waiting for good", function()
        -- (UCX 1.13's TCP keepalive was only on the sockets it connected:
        -- the client, whose socket was accepted, waited for good)
        local _, report = over_broken_link(UCX_SERVER, UCX_CLIENT, 3)
        if not report then return end
        -- (ETIMEDOUT from UCX's keepalive, or ECONNRESET when TCP's
        -- retransmissions, 3 here, give up first: a loaded machine, one CI run)
        assert(report:match("client\tnil\tam_send to 10%.77%.0%.1:13370: ETIMEDOUT: [^\n]*\tETIMEDOUT\n") or
               report:match("client\tnil\tam_send to 10%.77%.0%.1:13370: ECONNRESET: [^\n]*\tECONNRESET\n"),
               report)
        assert(report:match("server\tnil\twait_msg: no peer can send to AM stream 1 any more [^\n]*\tENOTCONN\n"),
               report)
    end)

    it("has UCX say nothing about that keepalive setting on a worker without tcp", function()
        -- (UCX warns "invalid configuration: KEEPIDLE=inf" where no tcp
        -- transport took the setting: shared memory only, say)
        for _, tls in ipairs({ "posix,self", "shm", "^tcp" }) do
            local status, out, err = helper.run_script([[
local ucx = require "pluvio.ucx"
local ctx = assert(ucx.Context.new())
local a, b = assert(ctx:create_worker()), assert(ctx:create_worker())
print(a:stats().am_sent)
a:close(); b:close(); ctx:close()
]], nil, "UCX_TLS=" .. q(tls))
            assert.equal("", err, tls)
            assert.equal("0\n", out, tls)
            assert.equal(0, status, tls)
        end
    end)
end)

describe("TCP sockets over a link that breaks", function()
    it("end with ETIMEDOUT: the idle reader by keepalive's probes, the sender by TCP's retransmission limit",
       function()
        -- (tcp_retries2 of 3 there: some 3 s; Linux's default, 15, is some
        -- 15 minutes, and keepalive sends no probe while data waits)
        local _, report = over_broken_link(TCP_SERVER, TCP_CLIENT, 3)
        if not report then return end
        assert(report:match("server\tnil\trecv 10%.77%.0%.2:%d+: ETIMEDOUT: [^\n]*\tETIMEDOUT\n"), report)
        assert(report:match("client\tnil\tsend 10%.77%.0%.1:13371: ETIMEDOUT: [^\n]*\tETIMEDOUT\n"), report)
    end)
end)
