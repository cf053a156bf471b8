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
local build_dir                 -- where, removed when the specs end
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
    build_dir = status == 0 and dir ~= "" and dir or nil
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

-- Start the example in the background: { out = its output file, status =
-- the file its exit status goes to, pid = its process id }.  The shell
-- that writes the pid execs stdbuf, which execs the example: one process.
local function start(args)
    local p = { out = os.tmpname(), status = helper.tmp_path(), pidfile = os.tmpname() }
    -- line-buffered: its progress lines must reach the file as they happen
    helper.exec(("(timeout 30 sh -c \"echo \\$\\$ > %s; exec stdbuf -oL %s %s\" > %s 2>&1; echo $? > %s) &")
                :format(q(p.pidfile), q(binary), args, q(p.out), q(p.status)))
    p.pid = tonumber(wait_file(p.pidfile, "\n", 10))
    assert(p.pid, "the example did not start")
    return p
end

-- Stop the example (the server runs until killed) by its own pid, and
-- wait until it is gone; remove its files.
local function stop(p)
    if not slurp(p.status):find("\n") then
        helper.exec("kill " .. p.pid)
        assert(wait_file(p.status, "\n", 10), "the example did not stop")
    end
    os.remove(p.out)
    os.remove(p.status)
    os.remove(p.pidfile)
end

-- A message of size bytes for the example server, different in each
-- iteration i: letters after "#i ", and the NUL the example expects last
-- (it prints the message as a C string).
local function message(size, i)
    local t = { "#" .. i .. " " }
    for k = #t[1], size - 2 do
        t[#t + 1] = string.char(97 + (k + 7 * i) % 26)
    end
    return table.concat(t):sub(1, size - 1) .. "\0"
end

-- What the example server prints for an iteration it reports (the first
-- and the last): print_result and print_iov in ucp_client_server.c.
local function server_report(i, msg)
    return ("Server: iteration #%d\nUCX data message was received\n\n\n----- UCP TEST SUCCESS -------\n\n"):format(i)
        .. msg:sub(1, -2) .. ".\n\n\n------------------------------\n\n"
end

describe("UCX interoperability with ucp_client_server.c", function()
    teardown(function()
        if build_dir then sh("rm -rf " .. q(build_dir)) end
    end)

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
                local client = start(("-c am -a 127.0.0.1 -p %d -i 3 -s %d"):format(l:port(), size))
                local out, status = client.out, client.status
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
                stop(client)
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
                -- port 0: the example picks a free port and says which
                local server = start(("-c am -l 127.0.0.1 -p 0 -i 3 -s %d"):format(size))
                local out = server.out
                local listening = wait_file(out, "Waiting for connection", 10)
                local port = tonumber(listening and listening:match("server is listening on IP 127%.0%.0%.1 port (%d+)"))
                if not port then stop(server) end
                assert(port, "the example server did not start:\n" .. slurp(out))
                local ctx = assert(ucx.Context.new())
                local w = assert(ctx:create_worker())
                local ep = assert(w:connect_socket("127.0.0.1", port))
                -- the example server takes one message per iteration (its
                -- one receive descriptor would be overwritten by a burst) and
                -- prints only the first and the last iteration: give it time
                -- to take each message before the next
                local sent = {}
                for i = 1, 3 do
                    sent[i] = message(size, i)
                    assert(ep:am_send(0, nil, sent[i]))
                    if i == 1 then
                        assert(wait_file(out, "Server: iteration #1", 20), slurp(out))
                    end
                    pluvio.sleep(0.3)
                end
                local text = wait_file(out, server_report(3, sent[3]), 20)
                local all = slurp(out)
                stop(server)
                assert(text, "the example server did not print the third message:\n" .. all:sub(1, 2000))
                -- it printed what we sent in the first and the last iteration
                assert.is_truthy(text:find(server_report(1, sent[1]), 1, true),
                                 "the example server printed another first message")
                assert.is_nil(text:find(sent[2]:sub(1, -2) .. ".\n", 1, true))  -- not printed, not mixed up
                assert.is_nil(text:find("received wrong data length", 1, true))
                assert.is_nil(text:find("unexpected header", 1, true))
                ep:close()
                w:close()
                ctx:close()
            end))
    end
end)
