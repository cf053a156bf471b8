-- Sockets over io_uring (pluvio.uring_net): fixed bugs, one spec each.
-- (The first socket specs live in uring_socket_spec.lua.)
local pluvio = require "pluvio"
local uring = require "pluvio.uring"
local helper = require "helper"
local async = helper.async

-- A listener on loopback and a connected pair: the client's end, the server's.
local function pair()
    local l = assert(uring.tcp_listen("127.0.0.1", 0))
    local srv = pluvio.spawn(function() return assert(l:accept()) end)
    local c = assert(uring.tcp_connect("127.0.0.1", l:port()))
    return l, c, srv:join()
end

describe("sockets and runtimes", function()
    it("refuse to bind a host that stands for the wildcard address without naming it", async(function()
        -- (getaddrinfo takes "0" as 0.0.0.0: a port in the host's place listened on every interface)
        for _, host in ipairs({ "0", "00", "0x0", "0.0" }) do
            for _, call in ipairs({ { uring.tcp_listen, "listen on " }, { uring.udp_bind, "bind " } }) do
                local sock, err, code = call[1](host, 0)
                assert.is_nil(sock)
                assert.equal(call[2] .. host .. ':0: host "' .. host .. '" stands for the wildcard address ' ..
                             '(every interface) without naming it; write "0.0.0.0" or "::" to mean every ' ..
                             'interface', err)
                assert.equal("EINVAL", code)
            end
        end
        local l = assert(uring.tcp_listen("127.0.0.1", 0))     -- a named address binds as before
        l:close()
    end))

    it("refuse a send from a plain coroutine that would wait for a killed send's end", async(function()
        local l, c, s = pair()
        local sender = pluvio.spawn(function() return c:send(("b"):rep(32 * 1048576)) end)
        pluvio.sleep(0.02)              -- it parks: the peer does not read
        local refused = pluvio.channel(1)
        local t = pluvio.spawn(function()
            sender:kill()               -- its send is kept on the socket until the kernel says how much went
            local co = coroutine.create(function() return c:send("x") end)
            refused:send({ coroutine.resume(co) })
            pluvio.sleep(8)             -- lives on: the refused send took the turn and kept it
        end)
        local got = refused:recv()
        assert.is_false(got[1])
        assert.matches("TcpSocket:send: called from a coroutine that is not a pluvio task", got[2], 1, true)
        -- the next send is not held up: it learns at once that the stream is cut
        local none, err, code, sent = pluvio.timeout(5, function() return c:send("y") end)
        assert.is_nil(none)
        assert.matches("^send .*: an earlier send was killed after %d+ of its 33554432 bytes", err)
        assert.same({ "ECANCELED", 0 }, { code, sent })     -- (no count: nil)
        t:kill()
        c:close(); s:close(); l:close()
    end))

    -- A task a starts op in a plain coroutine, which yields out, and lives
    -- on; once op went out, another resumes that coroutine, which raises
    -- (fname's refusal) and so gives op up.  Returns a.
    local function given_up_in_coroutine(op, fname)
        local co
        local a = pluvio.spawn(function()
            co = coroutine.create(op)
            assert(coroutine.resume(co))    -- op starts as a's, and the coroutine yields out
            pluvio.sleep(8)                 -- a lives on
        end)
        pluvio.sleep(0.05)                  -- op went out (resumed before that, it would be cancelled)
        local ok, err = coroutine.resume(co)
        assert.is_false(ok)
        assert.matches(fname .. ": called from a coroutine that is not a pluvio task", err, 1, true)
        return a
    end

    it("pass a send's turn on when the plain coroutine that sent is resumed by another and raises", async(function()
        local l, c, s = pair()
        local a = given_up_in_coroutine(function() return c:send("from coroutine") end, "TcpSocket:send")
        -- (the turn stayed a's until a ended: this send waited 8 s)
        assert.equal(6, pluvio.timeout(5, function() return c:send("from b") end))
        local got = ""
        while #got < 20 do got = got .. assert(pluvio.timeout(5, function() return s:recv(100) end)) end
        assert.equal("from coroutinefrom b", got)
        a:kill()
        c:close(); s:close(); l:close()
    end))

    it("pass the turn on when a plain coroutine's shutdown is given up", async(function()
        local l, c, s = pair()
        local a = given_up_in_coroutine(function() return c:shutdown("w") end, "TcpSocket:shutdown")
        -- (the turn stayed a's until a ended: this send waited 8 s)
        local none, serr, code, sent = pluvio.timeout(5, function() return c:send("late") end)
        assert.is_nil(none)
        assert.matches("EPIPE", serr)
        assert.same({ "EPIPE", 0 }, { code, sent })
        assert.same({ nil, "closed", "EOF" }, { pluvio.timeout(5, function() return s:recv(100) end) })
        a:kill()
        c:close(); s:close(); l:close()
    end))

    -- (with more than 64 operations in flight in the ring, a close cancels
    -- each of its socket's by itself: Linux's one cancel by fd walks every
    -- receive of the ring for each it cancels, which made closing 8,000
    -- connections with a parked recv each take 1.4 s in the kernel)
    it("close one socket of many with receives in flight, cancelling its own and no other's", async(function()
        local socks, waiting = {}, {}
        for i = 1, 30 do
            socks[i] = assert(uring.udp_bind("127.0.0.1", 0))
            waiting[i] = {}
            for k = 1, 3 do
                waiting[i][k] = pluvio.spawn(function() return socks[i]:recv_from(100) end)
            end
        end
        pluvio.sleep(0.001)
        pluvio.yield()
        assert.is_true(uring.current():stats().in_flight > 64)
        assert.is_true(socks[1]:close())
        for k = 1, 3 do
            assert.same({ nil, "recv_from " .. socks[1].name .. ": the socket was closed", "ECANCELED" },
                        { pluvio.timeout(5, waiting[1][k].join, waiting[1][k]) })
        end
        for i = 2, 30 do
            for k = 1, 3 do assert.equal("waiting", waiting[i][k]:status()) end
        end
        assert.equal(5, socks[1 + 1]:send_to("hello", "127.0.0.1", socks[30]:port()))
        local got = { pluvio.select(waiting[30][1], waiting[30][2], waiting[30][3]) }
        assert.equal("hello", got[2])
        for i = 2, 30 do assert.is_true(socks[i]:close()) end
        for i = 2, 30 do
            for k = 1, 3 do
                local t = waiting[i][k]
                if t:status() ~= "done" then
                    assert.equal("ECANCELED", select(3, pluvio.timeout(5, t.join, t)))
                end
            end
        end
        assert.equal(0, uring.current():stats().in_flight)
    end))

    -- (a close finds its socket's ops by a scan that skips the chunks of op
    -- slots with none in use: after a burst, the few in use are still found)
    it("close a socket after a burst of operations came and went, cancelling its receive", async(function()
        local u = assert(uring.udp_bind("127.0.0.1", 0))
        local burst = {}
        for i = 1, 700 do burst[i] = pluvio.spawn(function() return u:recv_from(10) end) end
        pluvio.sleep(0.001)
        assert.is_true(u:close())       -- 700 slots: three chunks of 256
        for i = 1, 700 do assert.equal("ECANCELED", select(3, pluvio.timeout(5, burst[i].join, burst[i]))) end
        for round = 1, 3 do
            local v = assert(uring.udp_bind("127.0.0.1", 0))
            local waiter = pluvio.spawn(function() return v:recv_from(10) end)
            pluvio.sleep(0.001)
            assert.is_true(v:close())
            assert.same({ nil, "recv_from " .. v.name .. ": the socket was closed", "ECANCELED" },
                        { pluvio.timeout(5, waiter.join, waiter) }, "round " .. round)
        end
        assert.equal(0, uring.current():stats().in_flight)
    end))

    -- A runtime of its own, and a connected pair made in it (c the client's end).
    local function runtime_pair()
        local rt = pluvio.Runtime.new()
        rt:register_reactor("io_uring", uring.reactor { buffer_count = 0 })
        local c, s = rt:block_on(function()
            local l, client, server = pair()
            l:close()
            return client, server
        end)
        return rt, c, s
    end

    it("keep what a killed receive got when a close after their run is refused", function()
        -- (the refused close dropped it: the socket stayed open, and its
        -- next recv skipped those bytes)
        local rt, c, s = runtime_pair()
        local sender
        rt:block_on(function()
            sender = pluvio.spawn(function() return s:send(("B"):rep(32 * 1048576)) end)   -- c reads nothing
            local receiver = pluvio.spawn(function() return s:recv(10) end)
            pluvio.sleep(0.001)
            receiver:kill()                 -- its recv is stopped; the cancel goes out next tick...
            helper.libc.write(c.fd, "AAAA", 4)  -- ...after these bytes, which the stopped recv takes
            pluvio.sleep(0.01)
            assert.equal("waiting", sender:status())
        end)
        local ok, err = pcall(s.close, s)   -- the sender still has its op on s
        assert.is_false(ok)
        assert.matches("still has an operation on it", err, 1, true)
        rt:run(function()
            local drain = pluvio.spawn(function() return #c:recv_exact(32 * 1048576) end)
            assert.equal(32 * 1048576, sender:join())
            assert.equal(32 * 1048576, drain:join())
            assert.equal("AAAA", pluvio.timeout(5, s.recv, s, 10))
            c:close()
            s:close()
        end)
    end)

    it("close after their run a socket whose only operation left is a killed receive's", function()
        local rt, c, s = runtime_pair()
        local receiver
        rt:block_on(function()
            receiver = pluvio.spawn(function() return s:recv(10) end)
            pluvio.yield()
        end)
        receiver:kill()                     -- its recv is stopped: the cancel waits for the next run
        assert.is_true(s:close())           -- (nobody waits on it: the close goes ahead)
        rt:run(function()
            assert.same({ nil, "closed", "EOF" }, { pluvio.timeout(5, c.recv, c, 10) })
            c:close()
        end)
    end)

    it("stay open after their run when a task that run left parked still receives on them", function()
        -- (the receive holds the socket's number, not the socket: closed at
        -- once, the number went to the next socket made, and the receive,
        -- submitted when the runtime ran again, read that socket's bytes)
        local rt = pluvio.Runtime.new()
        rt:register_reactor("io_uring", uring.reactor { buffer_count = 0 })
        local l, c, s, u, parked
        rt:block_on(function()
            l = assert(uring.tcp_listen("127.0.0.1", 0))
            local srv = pluvio.spawn(function() return assert(l:accept()) end)
            c = assert(uring.tcp_connect("127.0.0.1", l:port()))
            s = srv:join()
            u = assert(uring.udp_bind("127.0.0.1", 0))
            parked = {
                pluvio.spawn(function() return s:recv(100) end),
                pluvio.spawn(function() return u:recv_from(100) end),
                pluvio.spawn(function() return l:accept() end),
            }
            pluvio.yield()
        end)
        for i, sock in ipairs({ s, u, l }) do
            assert.equal("waiting", parked[i]:status())
            local fname = ({ "TcpSocket:close", "UdpSocket:close", "TcpListener:close" })[i]
            assert.has_error(function() sock:close() end, fname .. ": a task of the runtime " .. sock.name ..
                " was opened in still has an operation on it (that task was left parked when the runtime " ..
                "stopped running): close it in that runtime, or kill that task first")
        end
        rt:run(function()           -- at home: the parked tasks' ops are cancelled, the sockets closed
            assert.is_true(s:close() and u:close() and l:close() and c:close())
            for i = 1, 3 do
                assert.is_nil(parked[i]:join())
            end
        end)
    end)

    it("refuse to be used from another runtime than their own, whose ring has their ops", function()
        local rt = pluvio.Runtime.new()
        rt:register_reactor("io_uring", uring.reactor())
        local l, c, s, u
        rt:run(function()
            l = assert(uring.tcp_listen("127.0.0.1", 0))
            local srv = pluvio.spawn(function() return assert(l:accept()) end)
            c = assert(uring.tcp_connect("127.0.0.1", l:port()))
            s = srv:join()
            u = assert(uring.udp_bind("127.0.0.1", 0))
        end)
        local other = pluvio.Runtime.new()
        other:register_reactor("io_uring", uring.reactor())
        other:run(function()
            for _, call in ipairs({
                { "TcpListener:accept", l, function() return l:accept() end },
                { "TcpSocket:send", c, function() return c:send("x") end },
                { "TcpSocket:recv", c, function() return c:recv(1) end },
                { "TcpSocket:recv_exact", c, function() return c:recv_exact(1) end },
                { "UdpSocket:send_to", u, function() return u:send_to("x", "127.0.0.1", u:port()) end },
                { "UdpSocket:recv_from", u, function() return u:recv_from(1) end },
            }) do
                local ok, err = pluvio.timeout(10, pcall, call[3])   -- (else: parked on this ring for good)
                assert.is_false(ok)
                assert.matches(call[1] .. ": " .. call[2].name .. " was made in another runtime (its io_uring " ..
                               "reactor is that runtime's): use it there", err, 1, true)
            end
        end)
        rt:run(function()                   -- still fine at home, and closed there
            assert.equal(2, s:send("ok"))
            assert.equal("ok", c:recv_exact(2))
            assert.is_true(c:close() and s:close())
        end)
        -- once their run ended, nothing reaps that ring: closed at once, from anywhere
        other:run(function() assert.is_true(l:close()) end)
        assert.is_true(u:close())
        assert.is_false(l:close() or u:close())
    end)
end)

describe("a socket left to the garbage collector", function()
    -- Memory the kernel may still fill for the stopped receives of sockets nobody holds.
    local function pinned(r)
        local n = 0
        for _, keep in pairs(r.pins) do
            if keep then n = n + 1 end
        end
        return n
    end

    it("gives back the receives its killed tasks left, as close would", async(function()
        local r = uring.current()
        local l = assert(uring.tcp_listen("127.0.0.1", 0))
        local before = pinned(r)
        for i = 1, 300 do
            local sock, peer
            if i % 2 == 0 then
                sock = assert(uring.udp_bind("127.0.0.1", 0))
            else
                sock = assert(uring.tcp_connect("127.0.0.1", l:port()))
                peer = assert(l:accept())
            end
            local t = pluvio.spawn(function()
                if i % 2 == 0 then return sock:recv_from(10) end
                return sock:recv(10)
            end)
            pluvio.sleep(0.001)         -- its receive is in the kernel
            t:kill()                    -- stopped: the socket keeps the receive for its next one
            if peer then peer:close() end
            collectgarbage()
        end
        l:close()
        assert.is_true(pinned(r) - before <= 64, (pinned(r) - before) .. " of 300 receives are still held")
    end))
end)

describe("a TCP listener", function()
    local ffi = require "ffi"
    local bit = require "bit"
    ffi.cdef [[
    int socket(int domain, int type, int protocol);
    int connect(int fd, const void *addr, unsigned len);
    long send(int fd, const void *buf, size_t n, int flags);
    long recv(int fd, void *buf, size_t n, int flags);
    int close(int fd);
    ]]
    local MSG_DONTWAIT = 0x40

    -- A client of l by connect(2): its fd.
    local function raw_client(l)
        local fd = ffi.C.socket(2, 1, 0)
        local to = ffi.new("uint8_t[16]", 2, 0, bit.rshift(l:port(), 8), bit.band(l:port(), 255), 127, 0, 0, 1)
        assert.equal(0, ffi.C.connect(fd, to, 16))
        return fd
    end

    it("keeps the connection of an accept the kernel finished after the tick reaped, its task killed",
       pluvio.wrap(function()
        local l = assert(uring.tcp_listen("127.0.0.1", 0))
        local acceptor = pluvio.spawn(function() return l:accept() end)
        pluvio.sleep(0.001)                 -- it parks in accept...
        pluvio.yield()                      -- ...which a tick's flush gave the kernel
        -- by connect(2) in this batch: the accept finishes, nobody reaps it yet
        local client = raw_client(l)
        assert.equal(7, tonumber(ffi.C.send(client, "request", 7, 0)))
        assert.equal("waiting", acceptor:status())
        acceptor:kill()
        local conn = assert(pluvio.timeout(10, l.accept, l))     -- the next accept has it
        assert.equal("request", conn:recv_exact(7))
        assert.equal(5, conn:send("reply"))
        local buf = ffi.new("char[8]")
        assert.equal(5, tonumber(ffi.C.recv(client, buf, 8, 0)))
        assert.equal("reply", ffi.string(buf, 5))
        conn:close()
        l:close()
        ffi.C.close(client)
    end))

    it("closes the connections its killed accepts took when it is closed", pluvio.wrap(function()
        local l = assert(uring.tcp_listen("127.0.0.1", 0))
        local acceptor = pluvio.spawn(function() return l:accept() end)
        pluvio.sleep(0.001)
        pluvio.yield()
        local client = raw_client(l)
        acceptor:kill()
        pluvio.sleep(0.01)                  -- the kill's cancel comes back: the connection is the listener's
        assert.is_true(l:close())
        local buf = ffi.new("char[8]")
        local n
        for _ = 1, 100 do                   -- the client sees its end (EOF), not a connection left open
            n = tonumber(ffi.C.recv(client, buf, 8, MSG_DONTWAIT))
            if n >= 0 or ffi.errno() ~= 11 then break end
            pluvio.sleep(0.01)
        end
        assert.is_true(n == 0 or (n == -1 and ffi.errno() == 104))
        ffi.C.close(client)
    end))

    it("keeps the connection a killed accept took when its close after the run is refused", function()
        -- (the refused close closed it: its client was reset, and the next
        -- accept waited for another connection)
        local rt = pluvio.Runtime.new()
        rt:register_reactor("io_uring", uring.reactor { buffer_count = 0 })
        local l, fd, accepts
        rt:block_on(function()
            l = assert(uring.tcp_listen("127.0.0.1", 0))
            accepts = { pluvio.spawn(function() return l:accept() end) }
            pluvio.yield()
            accepts[2] = pluvio.spawn(function() return l:accept() end)
            pluvio.yield()                  -- both accepts are in the ring
            fd = raw_client(l)              -- connected by the kernel at once
            pluvio.yield()                  -- one accept took it and is woken, behind this task
            local took = accepts[1]:status() == "waiting" and 2 or 1
            assert.equal("ready", accepts[took]:status())       -- its accept is done, its task not run yet
            assert.equal("waiting", accepts[3 - took]:status())
            accepts[took]:kill()            -- its accept is done: its connection is held for the next one
            accepts.left = accepts[3 - took]
        end)
        local ok, err = pcall(l.close, l)   -- the other accept, left parked, still has its op on l
        assert.is_false(ok)
        assert.matches("still has an operation on it", err, 1, true)
        assert.equal(4, tonumber(ffi.C.send(fd, "ping", 4, 0)))
        rt:run(function()
            local s = assert(pluvio.timeout(5, l.accept, l))   -- the held connection, not reset
            assert.equal("ping", pluvio.timeout(5, s.recv, s, 10))
            s:close()
            l:close()
            assert.is_nil(accepts.left:join())
        end)
        ffi.C.close(fd)
    end)

    pcall(ffi.cdef, "int fcntl(int fd, int cmd, ...);")
    local F_GETFD = 1
    local function is_open(fd) return ffi.C.fcntl(fd, F_GETFD) >= 0 end

    it("nobody closed is closed with its unaccepted connections when collected, as are sockets and files from File.open",
       pluvio.wrap(function()
        local fds = {}
        do
            local l = assert(uring.tcp_listen("127.0.0.1", 0))
            local srv = pluvio.spawn(function() return assert(l:accept()) end)
            local c = assert(uring.tcp_connect("127.0.0.1", l:port()))
            local s = srv:join()
            local u = assert(uring.udp_bind("127.0.0.1", 0))
            -- an accept killed after the kernel took a connection: held by the listener
            local acceptor = pluvio.spawn(function() return l:accept() end)
            pluvio.sleep(0.001)
            pluvio.yield()
            local c2 = raw_client(l)
            assert.equal(1, tonumber(ffi.C.send(c2, "x", 1, 0)))
            pluvio.yield()                  -- the tick reaps the accept; this task runs before its own
            acceptor:kill()
            assert.equal(1, #l.held)
            fds = { l.fd, c.fd, s.fd, u.fd, l.held[1] }
            ffi.C.close(c2)
            for i = 1, #fds do assert.is_true(is_open(fds[i]), "fd " .. i) end
        end
        -- (a trace may hold the acceptor's function, and so l, as a constant:
        -- what was run once before, for instance an earlier spec, decides)
        jit.flush()
        collectgarbage()
        collectgarbage()
        for i = 1, #fds do assert.is_false(is_open(fds[i]), "fd " .. i) end
        -- closed by the caller, then collected: the collector leaves the number's next owner alone
        local u = assert(uring.udp_bind("127.0.0.1", 0))
        local fd = u.fd
        assert.is_true(u:close())
        local v = assert(uring.udp_bind("127.0.0.1", 0))
        assert.equal(fd, v.fd)
        u = nil     -- luacheck: ignore
        collectgarbage()
        collectgarbage()
        assert.is_true(is_open(fd))
        v:close()
    end))

    it("given to a task that was killed or failed is collected while the task is held", pluvio.wrap(function()
        -- such a task kept its arguments and what it waited on (the runtime
        -- lists an unjoined failed one for its report): the sockets of a
        -- server's failed handlers stayed open as long as the runtime
        local l = assert(uring.tcp_listen("127.0.0.1", 0))
        local fds = {}
        local function pair()
            local srv = pluvio.spawn(function() return assert(l:accept()) end)
            local c = assert(uring.tcp_connect("127.0.0.1", l:port()))
            local s = srv:join()
            fds[#fds + 1], fds[#fds + 2] = c.fd, s.fd
            return c, s
        end
        local killed = pluvio.spawn(function(c, s) return c:recv(1), s end, pair())
        local failed = pluvio.spawn(function(c, s) pluvio.sleep(0.001) error("handler failed", 0) end, pair())
        pluvio.yield()
        assert.is_true(killed:kill())
        local ok, err = failed:join()
        assert.is_nil(ok)
        assert.matches("^handler failed", err)
        for i = 1, #fds do assert.is_true(is_open(fds[i]), "fd " .. i) end
        collectgarbage()
        collectgarbage()
        for i = 1, #fds do assert.is_false(is_open(fds[i]), "fd " .. i) end
        assert.equal("cancelled", killed.final)     -- (held until here)
        l:close()
    end))
end)

describe("a TCP socket's send", function()
    it("says the stream was cut when a send killed part way left it mid-message", pluvio.wrap(function()
        local l = assert(uring.tcp_listen("127.0.0.1", 0))
        local srv = pluvio.spawn(function() return assert(l:accept()) end)
        local c = assert(uring.tcp_connect("127.0.0.1", l:port()))
        local s = srv:join()
        -- the peer reads nothing: 64 MiB cannot all go out, part of it does
        local big = ("0123456789abcdef"):rep(4 * 1048576)
        assert.same({ nil, "timeout" }, { pluvio.timeout(0.2, c.send, c, big) })
        local sent, err, code = c:send("next message")
        assert.is_nil(sent)
        assert.matches("^send " .. c.name:gsub("%p", "%%%0") .. ": an earlier send was killed after %d+ of its " ..
                       #big .. " bytes: the stream is cut mid%-message %(close the connection%)$", err)
        assert.equal("ECANCELED", code)
        local went = tonumber(err:match("after (%d+) of"))
        assert.is_true(went > 0 and went < #big)
        -- and that is what the peer gets, then the end when it is closed
        local got = 0
        c:close()
        while true do
            local piece = s:recv(1048576)
            if not piece then break end
            got = got + #piece
        end
        assert.equal(went, got)
        s:close()
        l:close()
    end))

    it("fails with ECANCELED and the bytes sent when another task's close cut it short", pluvio.wrap(function()
        -- The close came in the same tick: the send's first part went out,
        -- the rest was not sent, and send returned that count as if it were
        -- all of the data.
        local l = assert(uring.tcp_listen("127.0.0.1", 0))
        local srv = pluvio.spawn(function() return assert(l:accept()) end)
        local c = assert(uring.tcp_connect("127.0.0.1", l:port()))
        local s = srv:join()
        local big = ("x"):rep(16 * 1048576)   -- the peer reads nothing: only part of it goes out
        local sender = pluvio.spawn(function() return c:send(big) end)
        pluvio.spawn(function() assert.is_true(c:close()) end):join()
        local none, err, code, sent = sender:join()
        assert.is_nil(none)
        assert.equal("ECANCELED", code)
        assert.is_true(sent > 0 and sent < #big, tostring(sent))
        assert.equal(string.format("send %s: the socket was closed (%d bytes done before the error)", c.name,
                                   sent), err)
        local got = 0
        while true do                       -- and that is what the peer gets
            local piece = s:recv(1048576)
            if not piece then break end
            got = got + #piece
        end
        assert.equal(sent, got)
        s:close()
        l:close()
    end))

    it("goes on as usual after a killed send that sent nothing or all", pluvio.wrap(function()
        local l = assert(uring.tcp_listen("127.0.0.1", 0))
        local srv = pluvio.spawn(function() return assert(l:accept()) end)
        local c = assert(uring.tcp_connect("127.0.0.1", l:port()))
        local s = srv:join()
        local sender = pluvio.spawn(function() return c:send("never") end)
        sender:kill()                       -- before it ran: nothing sent
        local sender2 = pluvio.spawn(function() return c:send("whole") end)
        pluvio.yield()                      -- its send is queued
        sender2:kill()                      -- (dropped before the kernel took it, or done whole)
        assert.equal(4, c:send("tail"))
        local got = s:recv_exact(4)
        if got ~= "tail" then               -- the kernel had taken the second one whole
            assert.equal("whol", got)
            assert.equal("etail", s:recv_exact(5))
        end
        c:close()
        s:close()
        l:close()
    end))
end)

-- A listener, a client socket and the server's end of its connection.
describe("TCP sends from several tasks", function()
    -- The stream's bytes as runs of one letter: "A2097152 B2097152 ...".
    local function runs(got)
        local seq, p = {}, 1
        while p <= #got do
            local q = p
            while q <= #got and got:byte(q) == got:byte(p) do q = q + 1 end
            seq[#seq + 1] = got:sub(p, p) .. (q - p)
            p = q
        end
        return table.concat(seq, " ")
    end

    local function read_all(s, n)
        local parts, have = {}, 0
        while have < n do
            pluvio.sleep(0.0002)            -- a slow reader: the sends come back short
            local x = assert(s:recv(30000))
            parts[#parts + 1] = x
            have = have + #x
        end
        return table.concat(parts)
    end

    it("go out one after the other, whole, in the order they were called", async(function()
        local l, c, s = pair()
        local letters, size, senders = "ABCDEFGH", 1048576, {}
        for i = 1, #letters do
            local d = letters:sub(i, i):rep(size)
            senders[i] = pluvio.spawn(function() return c:send(d) end)
        end
        local got = read_all(s, #letters * size)
        for i = 1, #senders do assert.equal(size, senders[i]:join()) end
        assert.equal("A1048576 B1048576 C1048576 D1048576 E1048576 F1048576 G1048576 H1048576", runs(got))
        c:close(); s:close(); l:close()
    end))

    it("hand the turn on when the sending task or a waiting one is killed", async(function()
        local l, c, s = pair()
        local size = 64 * 1048576           -- (more than the socket buffers hold: it cannot finish)
        local first = pluvio.spawn(function() return c:send(("A"):rep(size)) end)
        local skipped = pluvio.spawn(function() return c:send(("B"):rep(10)) end)
        local last = pluvio.spawn(function() return c:send("C") end)
        assert.equal("A", s:recv(1))        -- the first send is under way
        assert.is_true(skipped:kill())      -- waiting its turn: never sends
        assert.is_true(first:kill())        -- part way: the stream is cut, and the next send says so
        local ok, err, code = last:join()
        assert.is_nil(ok)
        assert.equal("ECANCELED", code)
        assert.matches("an earlier send was killed after %d+ of its 67108864 bytes", err)
        c:close(); s:close(); l:close()
    end))

    it("hand the turn on when a task is killed after it was handed the turn, before it ran", async(function()
        -- (found by a randomized stress: the turn stayed with the dead task,
        -- and the sends queued behind it waited for good)
        local l, c, s = pair()
        local size = 8 * 1048576            -- (more than the socket buffers hold: it waits for the reader)
        local next_one, last
        local first = pluvio.spawn(function()
            local n = c:send(("A"):rep(size))
            next_one:kill()                 -- handed the turn as this send ended, not run yet
            return n
        end)
        pluvio.yield()                      -- the first send has the turn
        next_one = pluvio.spawn(function() return c:send("B") end)
        last = pluvio.spawn(function() return c:send("C") end)
        pluvio.yield()                      -- both wait for it
        local got = pluvio.timeout(5, read_all, s, size + 1)
        assert.equal(size + 1, got and #got, "the last send never came")
        assert.equal(size, first:join())
        assert.equal(1, pluvio.timeout(5, function() return last:join() end))
        c:close(); s:close(); l:close()
    end))

    it("refuse a plain coroutine's wait for the turn at once, so that no turn waits for it", async(function()
        local l, c, s = pair()
        local size = 8 * 1048576            -- (more than the socket buffers hold: it waits for the reader)
        local first = pluvio.spawn(function() return c:send(("A"):rep(size)) end)
        pluvio.yield()                      -- the first send has the turn
        local co = coroutine.create(function() return c:send("B") end)
        local ok, err = coroutine.resume(co)    -- (and never resumed again)
        assert.is_false(ok)
        assert.matches("TcpSocket:send: called from a coroutine that is not a pluvio task", err)
        local last = pluvio.spawn(function() return c:send("C") end)
        assert.equal(size + 1, #read_all(s, size + 1))
        assert.equal(size, first:join())
        assert.equal(1, pluvio.timeout(5, function() return last:join() end))
        c:close(); s:close(); l:close()
    end))
end)

describe("TcpSocket:shutdown", function()
    local function read_to_end(s)
        local parts = {}
        while true do
            local x, err = s:recv(65536)
            if not x then
                assert.equal("closed", err)
                return table.concat(parts)
            end
            parts[#parts + 1] = x
        end
    end

    it("shuts down its own socket when another task closes it in the same tick", async(function()
        -- (the kernel looks a shutdown's fd up in a worker thread, after the
        -- close: it failed with EBADF, or shut down whatever socket got the number)
        for _ = 1, 20 do
            local l, c, s = pair()
            local shut = pluvio.spawn(function() return c:shutdown() end)
            pluvio.spawn(function() assert(c:close()) end)
            local ok, err = shut:join()
            assert.is_true(ok, err)
            s:close(); l:close()
        end
    end))

    it("ends the sending side after the sends under way, and the reply still comes back", async(function()
        local l, c, s = pair()
        local big = ("x"):rep(8 * 1048576)     -- (more than the socket buffers hold: still going out)
        local sender = pluvio.spawn(function() return c:send(big) end)
        pluvio.yield()
        local closer = pluvio.spawn(function() return c:shutdown() end)  -- ("w"): waits its turn
        local got = read_to_end(s)            -- the server sees all of it, then "closed"
        assert.is_true(closer:join())
        assert.equal(#big, sender:join())
        assert.equal(#big, #got)
        assert.equal(6, s:send("thanks"))     -- the other direction is still open
        assert.equal("thanks", c:recv_exact(6))
        local ok, err, code = c:send("late")
        assert.is_nil(ok)
        assert.equal("EPIPE", code, err)
        c:close(); s:close(); l:close()
    end))

    it("ends the receiving side with \"r\", and both with \"rw\"", async(function()
        local l, c, s = pair()
        assert.is_true(c:shutdown("r"))
        local x, err = c:recv(10)
        assert.is_nil(x)
        assert.equal("closed", err)
        assert.is_true(s:shutdown("rw"))
        assert.equal("", read_to_end(c))
        c:close(); s:close(); l:close()
    end))

    it("with \"r\" still gives what the peer sends afterwards (Linux keeps taking it)", async(function()
        local l, c, s = pair()
        assert.is_true(c:shutdown("r"))
        assert.same({ nil, "closed", "EOF" }, { c:recv(10) })
        assert.equal(5, s:send("hello"))
        pluvio.sleep(0.01)
        assert.equal("hello", c:recv(10))
        c:close(); s:close(); l:close()
    end))

    it("names itself, not send, when its turn's wait is in a coroutine that is not a task", async(function()
        local l, c, s = pair()
        local sender = pluvio.spawn(function() return c:send(("x"):rep(8 * 1048576)) end)
        pluvio.yield()                          -- the send is under way: the shutdown waits its turn
        local co = coroutine.create(function() return c:shutdown() end)
        local ok, err = coroutine.resume(co)    -- refused before it waits
        assert.is_false(ok)
        assert.matches("TcpSocket:shutdown: called from a coroutine that is not a pluvio task", err, 1, true)
        sender:kill()
        c:close(); s:close(); l:close()
    end))

    it("names a bad how, and says so when the socket is closed", async(function()
        local l, c, s = pair()
        assert.has_error(function() c:shutdown("write") end,
                         'TcpSocket:shutdown: how must be "w", "r" or "rw" (got "write")')
        c:close()
        local ok, err = pcall(c.shutdown, c)
        assert.is_false(ok)
        assert.matches("TcpSocket:shutdown: .*closed", err)
        s:close(); l:close()
    end))

    it("takes only nil as the default how, not a NULL pointer, which compares equal to nil", async(function()
        local l, c, s = pair()
        assert.has_error(function() c:shutdown(require("ffi").cast("void *", 0)) end,
                         'TcpSocket:shutdown: how must be "w", "r" or "rw" (got cdata<void *>: NULL)')
        c:close(); s:close(); l:close()
    end))
end)

describe("socket errors", function()
    -- The peer's end with a reset (SO_LINGER 0): its close sends RST, not FIN.
    local function reset(sock)
        local ffi = require "ffi"
        pcall(ffi.cdef, "int setsockopt(int fd, int level, int name, const void *val, unsigned len);")
        local linger = ffi.new("int[2]", 1, 0)     -- struct linger: on, 0 s
        assert.equal(0, ffi.C.setsockopt(sock.fd, 1, 13, linger, 8))   -- SOL_SOCKET, SO_LINGER
        assert.is_true(sock:close())
    end

    it("say nothing of a datagram sent to a port nobody listens on, and pass on one of 0 bytes", async(function()
        local a, b = assert(uring.udp_bind("127.0.0.1", 0)), assert(uring.udp_bind("127.0.0.1", 0))
        local gone = assert(uring.udp_bind("127.0.0.1", 0))
        local port = gone:port()
        gone:close()
        assert.equal(1, a:send_to("x", "127.0.0.1", port))     -- lost: UDP has no connection to refuse
        assert.same({ nil, "timeout" }, { pluvio.timeout(0.05, function() return a:recv_from(10) end) })
        assert.equal(0, b:send_to("", "127.0.0.1", a:port()))
        assert.same({ "", "127.0.0.1", b:port() }, { a:recv_from(10) })
        a:close(); b:close()
    end))

    it("say how many bytes a recv_exact got before the peer's reset, and keep them for the next recv",
       async(function()
        local l = assert(uring.tcp_listen("127.0.0.1", 0))
        local srv = pluvio.spawn(function() return assert(l:accept()) end)
        local c = assert(uring.tcp_connect("127.0.0.1", l:port()))
        local s = srv:join()
        assert.equal(4, s:send("part"))
        reset(s)            -- the kernel gives what came before the reset first, then ECONNRESET
        assert.same({ nil, "recv " .. c.name .. ": ECONNRESET: Connection reset by peer (after 4 of 100 bytes, " ..
                      "kept for the next recv)", "ECONNRESET", 4 }, { c:recv_exact(100) })
        assert.equal("part", c:recv(100))
        c:close()
        -- at the peer's close (FIN) too the count comes as a fourth value
        srv = pluvio.spawn(function() return assert(l:accept()) end)
        c = assert(uring.tcp_connect("127.0.0.1", l:port()))
        s = srv:join()
        assert.equal(3, s:send("abc"))
        s:close()
        assert.same({ nil, "recv " .. c.name .. ": connection closed after 3 of 10 bytes", "EOF", 3 },
                    { c:recv_exact(10) })
        assert.equal("abc", c:recv(100))
        c:close()
        l:close()
    end))

    it("say why a listener's or UDP socket's port and address cannot be read, instead of a negative port",
       async(function()
        -- getsockname fails (ENOTSOCK) once a file takes the socket's fd number
        local ffi = require "ffi"
        pcall(ffi.cdef, "int dup2(int oldfd, int newfd);")
        local path = os.tmpname()
        local f = assert(io.open(path, "w"))
        local l = assert(uring.tcp_listen("127.0.0.1", 0))
        local u = assert(uring.udp_bind("127.0.0.1", 0))
        local file = assert(uring.File.open(path, "r"))
        assert.equal(l.fd, ffi.C.dup2(file:fileno(), l.fd))
        assert.equal(u.fd, ffi.C.dup2(file:fileno(), u.fd))
        assert.same({ nil, "TcpListener:port: cannot read the address of " .. l.name ..
                      ": ENOTSOCK: Socket operation on non-socket", "ENOTSOCK" }, { l:port() })
        assert.same({ nil, "TcpListener:address: cannot read the address of " .. l.name ..
                      ": ENOTSOCK: Socket operation on non-socket", "ENOTSOCK" }, { l:address() })
        assert.same({ nil, "UdpSocket:port: cannot read the address of " .. u.name ..
                      ": ENOTSOCK: Socket operation on non-socket", "ENOTSOCK" }, { u:port() })
        assert.same({ nil, "UdpSocket:address: cannot read the address of " .. u.name ..
                      ": ENOTSOCK: Socket operation on non-socket", "ENOTSOCK" }, { u:address() })
        assert.is_true(l:close() and u:close() and file:close())    -- (the copies of the file)
        f:close()
        os.remove(path)
    end))

    it("say the process ran out of file descriptors when the resolver did, not that the host is unknown",
       function()
        -- glibc's files backend cannot open /etc/hosts: getaddrinfo says
        -- EAI_NONAME ("no such name"), with errno EMFILE
        local status, out, err = helper.run_script(helper.HOLD_FDS .. [[
            local uring = require "pluvio.uring"
            local l = assert(uring.tcp_listen("127.0.0.1", 0))
            local held = hold_fds()
            print(select(2, uring.tcp_connect("localhost", 4242)))
            print(select(2, uring.udp_bind("localhost", 0)))
            for _, h in ipairs(held) do h:close() end
            l:close()
        ]], nil, "ulimit -n 64;")
        assert.equal(0, status, err)
        assert.equal("connect to localhost:4242: EMFILE: Too many open files\tEMFILE\n" ..
                     "bind localhost:0: EMFILE: Too many open files\tEMFILE\n", out)
    end)

    it("write an IPv6 host in brackets where they name host:port", async(function()
        if not helper.ipv6_loopback() then pending(helper.NO_IPV6) end
        local l = assert(uring.tcp_listen("::1", 0))
        local port = l:port()
        l:close()
        assert.same({ nil, "connect to [::1]:" .. port .. ": ECONNREFUSED: Connection refused", "ECONNREFUSED" },
                    { uring.tcp_connect("::1", port) })
        assert.same({ nil, "listen on [::2]:0: EADDRNOTAVAIL: Cannot assign requested address", "EADDRNOTAVAIL" },
                    { uring.tcp_listen("::2", 0) })
        local u4 = assert(uring.udp_bind("127.0.0.1", 0))
        assert.same({ nil, "send_to [::1]:5: host \"::1\" has no IPv4 address (the socket is IPv4: " .. u4:address() ..
                      ")", "EAFNOSUPPORT" }, { u4:send_to("x", "::1", 5) })
        u4:close()
    end))

    it("take an IPv6 host in the brackets their host:port strings write it in", async(function()
        if not helper.ipv6_loopback() then pending(helper.NO_IPV6) end
        local l = assert(uring.tcp_listen("[::1]", 0))
        local host = l:address():match("^(.*):%d+$")        -- "[::1]", as a user splits it
        assert.equal("[::1]", host)
        local srv = pluvio.spawn(function() return assert(l:accept()) end)
        local c = assert(uring.tcp_connect(host, l:port()))
        local s = srv:join()
        assert.equal(2, c:send("hi"))
        assert.equal("hi", s:recv_exact(2))
        local u, v = assert(uring.udp_bind("[::1]", 0)), assert(uring.udp_bind("::1", 0))
        assert.equal(2, v:send_to("yo", "[::1]", u:port()))
        assert.equal("yo", (u:recv_from(10)))
        -- (brackets around no IPv6 address are the name's own: not taken off)
        assert.equal("ENXIO", select(3, uring.tcp_connect("[localhost]", 1)))
        c:close(); s:close(); l:close(); u:close(); v:close()
    end))

    it("say an IPv6 socket bound to an IPv6 address cannot send to an IPv4 host, and one bound to :: can", async(function()
        if not helper.ipv6_loopback() then pending(helper.NO_IPV6) end
        local u6 = assert(uring.udp_bind("::1", 0))
        assert.same({ nil, "send_to 127.0.0.1:5: host \"127.0.0.1\" has no IPv6 address (the socket is IPv6: " ..
                      u6:address() .. "; only one bound to \"::\" reaches IPv4 addresses)", "EAFNOSUPPORT" },
                    { u6:send_to("x", "127.0.0.1", 5) })
        u6:close()
        local any, r4 = assert(uring.udp_bind("::", 0)), assert(uring.udp_bind("127.0.0.1", 0))
        assert.equal(5, any:send_to("hello", "127.0.0.1", r4:port()))
        assert.same({ "hello", "127.0.0.1", any:port() }, { r4:recv_from(16) })
        any:close()
        r4:close()
    end))

    it("write every digit of a large integer they were given", async(function()
        assert.has_error(function() uring.tcp_listen("127.0.0.1", 2 ^ 53) end,
                         "uring.tcp_listen: port must be an integer from 0 to 65535 (got 9007199254740992)")
    end))

    it("refuse port 0 as a peer's port, naming the argument", async(function()
        local u = assert(uring.udp_bind("127.0.0.1", 0))
        assert.has_error(function() u:send_to("x", "127.0.0.1", 0) end,
                         "UdpSocket:send_to: port must be the peer's port, an integer from 1 to 65535 (got 0)")
        assert.has_error(function() uring.tcp_connect("127.0.0.1", 0) end,
                         "uring.tcp_connect: port must be the peer's port, an integer from 1 to 65535 (got 0)")
        u:close()
    end))

    it("say what value a send was given that is not a string", async(function()
        local u = assert(uring.udp_bind("127.0.0.1", 0))
        assert.has_error(function() u:send_to(123, "127.0.0.1", u:port()) end,
                         "UdpSocket:send_to: data must be a string (got number 123)")
        local l = assert(uring.tcp_listen("127.0.0.1", 0))
        local c = assert(uring.tcp_connect("127.0.0.1", l:port()))
        assert.has_error(function() c:send(true) end, "TcpSocket:send: data must be a string (got boolean true)")
        assert.has_error(function() c:send({}) end, "TcpSocket:send: data must be a string (got table)")
        c:close(); l:close(); u:close()
    end))
end)
