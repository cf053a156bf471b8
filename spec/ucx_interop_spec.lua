-- Interoperability: Pluvio's messages are plain UCX Active Messages.  UCX's
-- own example ucp_client_server.c (installed by libucx-dev) is compiled
-- here at test time and exchanges AM-mode messages with Pluvio, with
-- Pluvio as its server and as its client.  Its protocol: AM id 0, no
-- header, -s bytes of 'A'..'Z' repeated with a NUL last, -i iterations.
local pluvio = require "pluvio"
local ucx = require "pluvio.ucx"
local helper = require "helper"

local sh, q = helper.sh, helper.quote
local EXAMPLES = "/usr/share/doc/libucx-dev/examples"

local binary                    -- compiled once per run; false: not possible here
local function example()
    if binary ~= nil then
        return binary
    end
    binary = false
    if sh("test -f " .. EXAMPLES .. "/ucp_client_server.c") ~= 0 then
        return false, "UCX's example is not installed (" .. EXAMPLES .. ")"
    end
    local status, dir = sh("mktemp -d")
    dir = dir:gsub("%s+$", "")
    local out = dir .. "/ucp_client_server"
    local st, o1, e1 = sh(("cc -O1 -o %s %s/ucp_client_server.c -I%s -lucp -lucs"):format(q(out), EXAMPLES, EXAMPLES))
    if status ~= 0 or st ~= 0 then
        return false, "cannot compile UCX's example: " .. o1 .. e1
    end
    binary = out
    return binary
end

-- What the example sends and expects: generate_test_string in
-- hello_world_util.h.
local function test_string(size)
    local t = {}
    for i = 0, size - 2 do
        t[#t + 1] = string.char(65 + i % 26)
    end
    return table.concat(t) .. "\0"
end

local function slurp(path)
    local f = io.open(path)
    if not f then return "" end
    local s = f:read("*a")
    f:close()
    return s
end

-- Start the example in the background; returns its output file and the
-- file its exit status goes to.
local function start(args)
    local out, status = os.tmpname(), os.tmpname()
    os.remove(status)
    -- line-buffered: its progress lines must reach the file as they happen
    helper.exec(("(timeout 30 stdbuf -oL %s %s > %s 2>&1; echo $? > %s) &"):format(q(binary), args, q(out), q(status)))
    return out, status
end

-- Stop the example server on port ("[u]cp..." keeps pkill from matching
-- the shell that runs it).
local function stop_server(port)
    sh("pkill -f " .. q("[u]cp_client_server -c am -l 127.0.0.1 -p " .. port .. "( |$)"))
end

local function wait_file(path, pattern, seconds)
    local deadline = pluvio.now() + seconds
    repeat
        local s = slurp(path)
        if (pattern and s:find(pattern, 1, true)) or (not pattern and s ~= "") then
            return s
        end
        pluvio.sleep(0.02)
    until pluvio.now() > deadline
    return nil
end

describe("UCX interoperability with ucp_client_server.c", function()
    for _, size in ipairs({ 16, 262144 }) do
        local proto = size > 8192 and "rendezvous" or "eager"

        it(("receives the example client's AM-mode messages (%d bytes, %s), Pluvio as the server"):format(size, proto),
            helper.async(function()
                local ok, why = example()
                if not ok then
                    pending(why)
                    return
                end
                local ctx = assert(ucx.Context.new())
                local w = assert(ctx:create_worker())
                local stream = w:am_stream(0)
                local l = assert(w:create_listener("127.0.0.1", 0))
                local out, status = start(("-c am -a 127.0.0.1 -p %d -i 3 -s %d"):format(l:port(), size))
                local ep = pluvio.timeout(20, function() return l:accept() end)
                assert(ep, "the example client did not connect:\n" .. slurp(out))
                local want = test_string(size)
                for i = 1, 3 do
                    local m = pluvio.timeout(20, function() return stream:wait_msg() end)
                    assert(m, "message " .. i .. " did not arrive:\n" .. slurp(out))
                    assert.equal("", m.header)
                    assert.equal(size, m:data_len())
                    assert.is_true(m:data() == want, "message " .. i .. " differs from the example's string")
                end
                assert.equal("0\n", wait_file(status, nil, 20), slurp(out))
                assert.matches("Client: iteration #3", slurp(out))
                ep:close()
                l:close()
                w:close()
                ctx:close()
            end))

        it(("sends AM-mode messages the example server receives (%d bytes, %s), Pluvio as the client"):format(size, proto),
            helper.async(function()
                local ok, why = example()
                if not ok then
                    pending(why)
                    return
                end
                local port, out, status
                for _ = 1, 5 do                 -- pick a free port
                    port = math.random(20000, 45000)
                    out, status = start(("-c am -l 127.0.0.1 -p %d -i 3 -s %d"):format(port, size))
                    if wait_file(out, "Waiting for connection", 10) then break end
                    stop_server(port)
                    out = nil
                end
                assert(out, "the example server did not start")
                local ctx = assert(ucx.Context.new())
                local w = assert(ctx:create_worker())
                local ep = assert(w:connect_socket("127.0.0.1", port))
                local payload = test_string(size)
                -- the example server takes one message per iteration (its
                -- one receive descriptor would be overwritten by a burst) and
                -- prints only the first and the last iteration: give it time
                -- to take each message before the next
                for i = 1, 3 do
                    assert(ep:am_send(0, nil, payload))
                    if i == 1 then
                        assert(wait_file(out, "Server: iteration #1", 20), slurp(out))
                    end
                    pluvio.sleep(0.3)
                end
                local text = wait_file(out, "Server: iteration #3", 20)
                stop_server(port)
                assert(text, "the example server did not receive 3 messages:\n" .. slurp(out))
                assert.matches("UCX data message was received", text)
                assert.is_nil(text:find("received wrong data length", 1, true))
                assert.is_nil(text:find("unexpected header", 1, true))
                ep:close()
                w:close()
                ctx:close()
            end))
    end
end)
