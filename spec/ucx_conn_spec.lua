-- UCX connections: listeners, accept and a worker's limits on both,
-- connect_socket, refused and abandoned connections, closing an endpoint.
local pluvio = require "pluvio"
local ucx = require "pluvio.ucx"
local helper = require "helper"
local uh = require "ucx_helpers"

local async = helper.async
local pair, close_pair = helper.ucx_pair, helper.ucx_close_pair
local payload = uh.payload

describe("UCX", function()
    it("hands connections to the tasks accepting on a listener in the order they began to wait",
       async(function()
        -- (a second accepting task raised 'another task is already accepting')
        local ctx = assert(ucx.Context.new())
        local sw, cw = assert(ctx:create_worker()), assert(ctx:create_worker())
        local l = assert(sw:create_listener("127.0.0.1", 0))
        local order = {}
        local acceptors = {}
        for k = 1, 4 do
            acceptors[k] = pluvio.spawn(function()
                local ep = assert(l:accept())
                order[#order + 1] = k
                return ep
            end)
            pluvio.yield()
        end
        acceptors[2]:kill()             -- its turn passes on
        assert.equal("accept on 127.0.0.1:" .. l:port(), pluvio.runtime():tasks()[2].waits_on)
        local eps = {}
        for k = 1, 3 do eps[k] = assert(cw:connect_socket("127.0.0.1", l:port())) end
        for _, k in ipairs({ 1, 3, 4 }) do acceptors[k]:join():close() end
        assert.same({ 1, 3, 4 }, order)
        for k = 1, 3 do eps[k]:close() end
        cw:close(); sw:close(); ctx:close()
    end))

    it("says a worker's 64 listeners are all in use rather than that files ran out", async(function()
        local ctx = assert(ucx.Context.new())
        local w = assert(ctx:create_worker())
        local ls = {}
        for i = 1, 64 do ls[i] = assert(w:create_listener("127.0.0.1", 0)) end
        assert.same({ nil, "listen on 127.0.0.1:0: a worker has at most 64 listeners open (close one first)",
                      "EMFILE" }, { w:create_listener("127.0.0.1", 0) })
        ls[64]:close()
        ls[64] = assert(w:create_listener("127.0.0.1", 0))
        w:close()
        ctx:close()
    end))

    it("keeps a connection for the next accept when the worker's 4096 endpoints are in use, without hanging", async(function()
        local ctx = assert(ucx.Context.new())
        local server, client, peer = assert(ctx:create_worker()), assert(ctx:create_worker()), assert(ctx:create_worker())
        local l = assert(server:create_listener("127.0.0.1", 0))
        local addr = peer:address()
        local eps = {}
        for i = 1, 4096 do eps[i] = assert(server:connect_addr(addr)) end
        local connect = pluvio.spawn(function() return client:connect_socket("127.0.0.1", l:port()) end)
        local none, _, name = l:accept()       -- it hung in ucp_ep_destroy of the connection it dropped
        assert.same({ nil, "EMFILE" }, { none, name })
        assert.is_true(eps[4096]:close())
        local sep = assert(l:accept())
        local cep = assert(connect:join())
        assert.is_true(cep:close() and sep:close())
        for i = 1, 4095 do eps[i]:close() end
        ctx:close()
    end))

    it("skips a connection whose client gave up before accept took it, and goes on accepting", async(function()
        -- accept returned nil, "accept: ECONNRESET: ..." for a client
        -- killed while it connected (3 or 4 ticks in, now and then) and gone
        -- before the accept: a server's accept loop (while l:accept() do
        -- end) ended on it
        local ctx = assert(ucx.Context.new())
        local server, client = assert(ctx:create_worker()), assert(ctx:create_worker())
        local l = assert(server:create_listener("127.0.0.1", 0))
        local accepted = {}
        for try = 0, 39 do
            local ticks = 2 + try % 4
            local gave_up = pluvio.spawn(function() return client:connect_socket("127.0.0.1", l:port()) end)
            for _ = 1, ticks do pluvio.yield() end
            gave_up:kill()
            pluvio.sleep(0.05)          -- its connection request waits for the accept
            local acceptor = pluvio.spawn(function()
                while true do
                    local sep, err, name = l:accept()
                    if not sep then return err, name end
                    accepted[#accepted + 1] = sep
                end
            end)
            local cep, err = pluvio.timeout(5, function() return client:connect_socket("127.0.0.1", l:port()) end)
            if acceptor:status() ~= "waiting" then
                error(ticks .. " ticks: accept returned " .. tostring((acceptor:join())))
            end
            assert(cep, err)
            acceptor:kill()
            assert.is_true(cep:close())
        end
        for _, sep in ipairs(accepted) do sep:close() end
        l:close(); ctx:close()
    end))

    it("says a worker's 4096 endpoints are all in use rather than that files ran out", async(function()
        local ctx = assert(ucx.Context.new())
        local server, client, peer = assert(ctx:create_worker()), assert(ctx:create_worker()), assert(ctx:create_worker())
        local inbox = server:am_stream(1)
        local l = assert(server:create_listener("127.0.0.1", 0))
        local cep = assert(client:connect_addr(server:address()))
        local addr = peer:address()
        local eps = {}
        for i = 1, 4096 do eps[i] = assert(server:connect_addr(addr)) end
        local full = "this worker has at most 4096 endpoints open, reply endpoints included (close one first)"
        assert.same({ nil, "connect_addr: " .. full, "EMFILE" }, { server:connect_addr(addr) })
        assert.is_true(cep:am_send(1, "q", "?", true))
        local m = assert(inbox:wait_msg())
        assert.same({ nil, "am_send to the sender: " .. full, "EMFILE" }, { m:reply(2, "a", "!") })
        local connect = pluvio.spawn(function() return client:connect_socket("127.0.0.1", l:port()) end)
        assert.same({ nil, "accept: " .. full, "EMFILE" }, { l:accept() })
        eps[4096]:close()
        local sep = assert(l:accept())
        assert(connect:join()):close()
        sep:close()
        local port = l:port()
        for i = 1, 4095 do client:connect_addr(addr) end
        assert.same({ nil, "connect to 127.0.0.1:" .. port .. ": " .. full, "EMFILE" },
                    { client:connect_socket("127.0.0.1", port) })
        ctx:close()
    end))

    it("tells the address a listener bound, as ip:port or [v6]:port, with the port chosen for port 0", async(function()
        local ctx = assert(ucx.Context.new())
        local w = assert(ctx:create_worker())
        local l4 = assert(w:create_listener("127.0.0.1", 0))
        assert.equal("127.0.0.1:" .. l4:port(), l4:address())
        -- a name that resolves to several addresses binds one: that one
        local ln = assert(w:create_listener("localhost", 0))
        local a = ln:address()
        assert.equal("127.0.0.1:" .. ln:port(), a)      -- (its IPv4 address: UCX is given no IPv6)
        local accepted = pluvio.spawn(function() return assert(ln:accept()) end)
        local ep = assert(w:connect_socket(a:match("^(.-):%d+$"), ln:port()))
        assert.is_true(ep:close())
        accepted:join():close()
        l4:close(); ln:close()
        assert.has_error(function() l4:address() end, "Listener:address: the listener is closed")
        w:close()
        ctx:close()
    end))

    it("closes the connection of a connect_socket given up on a server that never speaks UCX", async(function()
        local uring = require "pluvio.uring"
        local tcp = assert(uring.tcp_listen("127.0.0.1", 0))
        local server = pluvio.spawn(function()     -- accepts, reads, never answers
            local s = assert(tcp:accept())
            local got = 0
            while true do
                local d = s:recv(65536)
                if not d then break end
                got = got + #d
            end
            s:close()
            return got
        end)
        local ctx = assert(ucx.Context.new())
        local w = assert(ctx:create_worker())
        -- UCX's wire-up has no timeout of its own: bound it
        assert.same({ nil, "timeout" },
                    { pluvio.timeout(0.2, function() return w:connect_socket("127.0.0.1", tcp:port()) end) })
        assert.equal(0, w:stats().endpoints)
        -- the endpoint is closed once its wire-up is over, or a second after
        -- the kill when it goes nowhere, as here (a forced close in the
        -- wire-up made UCX 1.13's async thread assert), its flush with it
        local deadline = pluvio.now() + 3
        while w:stats().ops_in_flight > 0 and pluvio.now() < deadline do pluvio.sleep(0.01) end
        assert.equal(0, w:stats().ops_in_flight)
        -- and the connection with the worker's close at the latest
        w:close()
        local got = assert(pluvio.timeout(10, function() return server:join() end))
        assert.is_true(got > 0)
        tcp:close()
        ctx:close()
    end))

    it("writes an IPv6 host in brackets where an error names host:port", async(function()
        if not helper.ipv6_loopback() then pending(helper.NO_IPV6) end
        local ctx = assert(ucx.Context.new())
        local w = assert(ctx:create_worker())
        local tcp = assert(require("pluvio.uring").tcp_listen("::1", 0))     -- a port nobody listens on
        local port = tcp:port()
        tcp:close()
        local ep, err = w:connect_socket("::1", port)
        assert.is_nil(ep)
        assert.equal("connect to [::1]:" .. port .. ": ", err:sub(1, #("connect to [::1]:" .. port .. ": ")))
        local _, lerr = w:create_listener("::2", 0)
        assert.equal("listen on [::2]:0: ", lerr:sub(1, #"listen on [::2]:0: "))
        w:close()
        ctx:close()
    end))

    it("reports a connection to a closed port with the endpoint's error and a hint, leaving nothing behind", async(function()
        local ctx = assert(ucx.Context.new())
        local w = assert(ctx:create_worker())
        local l = assert(w:create_listener("127.0.0.1", 0))
        local port = l:port()
        l:close()
        local ep, err, code = w:connect_socket("127.0.0.1", port)
        assert.is_nil(ep)
        -- UCX 1.13 records a refusal as "not connected" (tcp_sockcm)
        assert.equal(("connect to 127.0.0.1:%d: ENOTCONN: Transport endpoint is not connected " ..
                      "(refused: is a listener open there?)"):format(port), err)
        assert.equal("ENOTCONN", code)
        local s = w:stats()
        assert.equal(0, s.endpoints + s.failed_endpoints + s.ops_in_flight)
        w:close()
        ctx:close()
    end))

    it("closes an endpoint gracefully only once its receiver pulled a rendezvous send", async(function()
        local p = pair()
        local big = payload(4000000, 16)
        local sender = pluvio.spawn(function() return p.ep:am_send(1, "rndv", big, false, "rndv") end)
        local m = assert(p.stream:wait_msg())       -- held, not pulled yet: the data is still the sender's
        local closer = pluvio.spawn(function() return p.ep:close() end)
        pluvio.sleep(0.05)
        assert.equal("waiting", closer:status())    -- (the flush alone was done at once, the data lost)
        assert.equal("waiting", sender:status())
        assert.equal(big, m:data())
        assert.is_true(closer:join())
        assert.is_true(sender:join())
        p.ep = p.sep                                -- (close_pair's to close)
        close_pair(p)
    end))

    it("goes on with a graceful close once the task of the rendezvous send it waits for is killed", async(function()
        -- a send whose task gave up is not waited for (its receiver may
        -- never pull), but nothing woke a close already waiting for it
        local p = pair()
        local sender = pluvio.spawn(function() return p.ep:am_send(1, "rndv", payload(4000000, 18), false, "rndv") end)
        local m = assert(p.stream:wait_msg())       -- held, never pulled
        local closer = pluvio.spawn(function() return p.ep:close() end)
        pluvio.sleep(0.05)
        assert.equal("waiting", closer:status())
        sender:kill()
        assert.same({ true }, { pluvio.timeout(5, function() return closer:join() end) })
        m:release()
        p.ep = p.sep                                -- (close_pair's to close)
        close_pair(p)
    end))

    it("closes an endpoint forcefully when its graceful close is cancelled, failing the send", async(function()
        local p = pair()
        local sender = pluvio.spawn(function() return p.ep:am_send(1, "rndv", payload(4000000, 17), false, "rndv") end)
        local m = assert(p.stream:wait_msg())
        assert.same({ nil, "timeout" }, { pluvio.timeout(0.05, function() return p.ep:close() end) })
        assert.is_false(p.ep:close())               -- closed: forcefully
        local ok, err, code = sender:join()
        assert.is_nil(ok)
        assert.equal("ECANCELED", code, err)
        assert.is_nil(m:data())                     -- its sender is gone
        p.ep = p.sep
        close_pair(p)
    end))
end)
