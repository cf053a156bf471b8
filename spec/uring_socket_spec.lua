-- Sockets over io_uring (pluvio.uring_net): TCP and UDP, IPv4 and IPv6,
-- killed receives, closes, name resolution.  Fixed bugs, one spec each:
-- uring_net_spec.lua.
local pluvio = require "pluvio"
local uring = require "pluvio.uring"
local helper = require "helper"
local ffi = require "ffi"
local bit = require "bit"

local async = helper.async
local format = string.format
local tmpfile, with_reactor = helper.tmp_path, helper.with_reactor

-- A peer by libc, behind pluvio's back.
ffi.cdef [[
int getpid(void);
long send(int fd, const void *buf, size_t n, int flags);
int connect(int fd, const void *addr, unsigned len);
int socket(int domain, int type, int protocol);
long recv(int fd, void *buf, size_t n, int flags);
int getsockopt(int fd, int level, int name, void *val, unsigned *len);
int dup(int fd);
]]

describe("sockets over io_uring", function()
    it("echoes over TCP, large messages included, IPv4 and IPv6", async(function()
        for _, host in ipairs({ "127.0.0.1", helper.ipv6_loopback() and "::1" or nil }) do
            local l = assert(uring.tcp_listen(host, 0))
            local port = l:port()
            assert.is_true(port > 0)
            local server = pluvio.spawn(function()
                local c = assert(l:accept())
                local total = 0
                while true do
                    local s = c:recv(65536)
                    if not s then break end
                    total = total + #s
                    assert(c:send(s))
                end
                c:close()
                return total
            end)
            local c = assert(uring.tcp_connect(host, port))
            assert.matches(port .. "$", c:peer())
            local big = ("0123456789abcdef"):rep(200000)   -- 3.2 MB: short sends happen
            local sender = pluvio.spawn(function() return c:send(big) end)
            local got = assert(c:recv_exact(#big))
            assert.is_true(got == big)
            assert.equal(#big, sender:join())
            assert(c:send("tail"))
            assert.equal("ta", c:recv_exact(2))
            assert.equal("il", c:recv_exact(2))
            c:close()
            assert.equal(#big + 4, server:join())
            l:close()
        end
        if not helper.ipv6_loopback() then pending(helper.NO_IPV6) end
    end))

    it("receives into scratch memory of at most 1 MiB however much recv asks for, losing nothing", async(function()
        local r = uring.current()
        local l = assert(uring.tcp_listen("127.0.0.1", 0))
        local srv = pluvio.spawn(function() return assert(l:accept()) end)
        local c = assert(uring.tcp_connect("127.0.0.1", l:port()))
        local s = srv:join()
        local function scratch_classes()
            local big = {}
            for class in pairs(r.bounce.lists) do
                if class > 1048576 then big[#big + 1] = class end
            end
            return big
        end
        assert.equal(3, s:send("abc"))
        assert.equal("abc", c:recv(256 * 1048576))     -- 256 MiB asked, 3 bytes came
        assert.same({}, scratch_classes())
        -- 5 MiB in one send: recv(huge) takes up to 1 MiB at a time, and
        -- recv_exact the rest, in order
        local data = ("0123456789abcdefghijklmnopqrstu\n"):rep(5 * 32768)
        local sender = pluvio.spawn(function() return s:send(data) end)
        local parts, have = {}, 0
        for _ = 1, 3 do
            local got = assert(c:recv(64 * 1048576))
            assert.is_true(#got <= 1048576)
            parts[#parts + 1] = got
            have = have + #got
        end
        parts[#parts + 1] = assert(c:recv_exact(#data - have))
        assert.equal(#data, sender:join())
        assert.is_true(table.concat(parts) == data)
        assert.same({}, scratch_classes())
        s:close()
        c:close()
        l:close()
    end))

    it("refuses a socket receive from a plain coroutine inside a task before it takes any byte", async(function()
        local l = assert(uring.tcp_listen("127.0.0.1", 0))
        local server = pluvio.spawn(function()
            local c = assert(l:accept())
            c:send("kept")
            return c
        end)
        local c = assert(uring.tcp_connect("127.0.0.1", l:port()))
        local sc = server:join()
        for _, fn in ipairs({ "recv", "recv_exact" }) do
            local co = coroutine.create(function() return c[fn](c, 4) end)
            local ok, err = coroutine.resume(co)
            assert.is_false(ok)
            assert.matches("TcpSocket:" .. fn .. ": called from a coroutine that is not a pluvio task", err)
        end
        assert.equal("kept", c:recv_exact(4))
        sc:close()
        c:close()
        l:close()
    end))

    it("reports the peer's close: recv gives nil, 'closed' and recv_exact keeps what came", async(function()
        local l = assert(uring.tcp_listen("127.0.0.1", 0))
        local server = pluvio.spawn(function()
            local c = assert(l:accept())
            c:send("abc")
            c:close()
        end)
        local c = assert(uring.tcp_connect("127.0.0.1", l:port()))
        server:join()
        local s, err = c:recv_exact(10)
        assert.is_nil(s)
        assert.matches("connection closed after 3 of 10 bytes", err)
        assert.equal("abc", c:recv(100))
        local none, why = c:recv(100)
        assert.is_nil(none)
        assert.equal("closed", why)
        c:close()
        l:close()
    end))

    it("sends and receives UDP datagrams with the sender's address", async(function()
        for _, host in ipairs({ "127.0.0.1", helper.ipv6_loopback() and "::1" or nil }) do
            local a = assert(uring.udp_bind(host, 0))
            local b = assert(uring.udp_bind(host, 0))
            local receiver = pluvio.spawn(function() return { a:recv_from(1000) } end)
            pluvio.yield()
            assert.equal(5, b:send_to("hello", host, a:port()))
            local r = receiver:join()
            assert.equal("hello", r[1])
            assert.equal(host, r[2])
            assert.equal(b:port(), r[3])
            a:close()
            b:close()
        end
        if not helper.ipv6_loopback() then
            pending(helper.NO_IPV6)
            return
        end
        -- an IPv6 socket bound to "::" sends to IPv4 addresses too, whose limit is IPv4's
        -- (such a datagram came back as EMSGSIZE)
        local wide, v4 = assert(uring.udp_bind("::", 0)), assert(uring.udp_bind("127.0.0.1", 0))
        assert.has_error(function() wide:send_to(("m"):rep(65508), "127.0.0.1", v4:port()) end,
            "UdpSocket:send_to: a datagram to an IPv4 address holds at most 65507 bytes (got 65508, to 127.0.0.1:" ..
            v4:port() .. ")")
        assert.equal(65507, wide:send_to(("m"):rep(65507), "127.0.0.1", v4:port()))
        assert.equal(65507, #v4:recv_from(65536))
        wide:close()
        v4:close()
    end))

    it("tells the address a listener or UDP socket is bound to, with the port port 0 got", async(function()
        for _, host in ipairs({ "127.0.0.1", helper.ipv6_loopback() and "::1" or nil }) do
            local text = host:find(":") and "[" .. host .. "]" or host
            local l = assert(uring.tcp_listen(host, 0))
            local u = assert(uring.udp_bind(host, 0))
            assert.equal(text .. ":" .. l:port(), l:address())
            assert.equal(text .. ":" .. u:port(), u:address())
            assert.is_true(l:port() > 0 and u:port() > 0)
            l:close()
            u:close()
            assert.has_error(function() l:address() end, "TcpListener:address: the socket is closed (" .. l.name .. ")")
            assert.has_error(function() u:address() end, "UdpSocket:address: the socket is closed (" .. u.name .. ")")
        end
        assert.has_error(function() uring.TcpListener.address({}) end,
                         "TcpListener:address: call it as a method on a listener; got table as self")
        assert.has_error(function() uring.UdpSocket.address(nil) end,
                         "UdpSocket:address: call it as a method on a UDP socket; got nil as self")
        for _, c in ipairs({ { "TcpListener", "a listener" }, { "TcpSocket", "a socket" },
                             { "UdpSocket", "a UDP socket" } }) do
            assert.has_error(function() uring[c[1]].describe() end,
                             c[1] .. ":describe: call it as a method on " .. c[2] .. "; got nil as self")
        end
        if not helper.ipv6_loopback() then pending(helper.NO_IPV6) end
    end))

    it("takes a datagram that was already waiting, received inside its submit", function()
        with_reactor({ submit_depth = 1 }, function()
            local a = assert(uring.udp_bind("127.0.0.1", 0))
            local b = assert(uring.udp_bind("127.0.0.1", 0))
            assert.equal(5, b:send_to("early", "127.0.0.1", a:port()))
            pluvio.sleep(0.01)
            local receiver = pluvio.spawn(function() return { a:recv_from(100) } end)
            local deadline = pluvio.now() + 10
            while receiver:status() ~= "done" and pluvio.now() < deadline do pluvio.sleep(0.002) end
            assert.equal("done", receiver:status())
            local r = receiver:join()
            assert.equal("early", r[1])
            assert.equal(b:port(), r[3])
            a:close()
            b:close()
        end)
    end)

    it("closes the socket of a connect whose task was killed (no fd leaks)", async(function()
        local function nfds()
            -- earlier specs' objects left to the collector (workers,
            -- reactors) close their fds when finalized: not in between
            collectgarbage("collect")
            collectgarbage("collect")
            local n = 0     -- (in this process: see the other nfds)
            for _ in require("lfs").dir("/proc/self/fd") do n = n + 1 end
            return n
        end
        -- a listener that never accepts, its queue full: further connects hang
        local l = assert(uring.tcp_listen("127.0.0.1", 0, 1))
        local held = {}
        for _ = 1, 3 do
            local c = pluvio.timeout(0.2, uring.tcp_connect, "127.0.0.1", l:port())
            if c then held[#held + 1] = c end
        end
        -- (until the kernel gave back every op: the cancels of the connects
        -- that timed out have completed and their sockets are closed)
        local function settle()
            local deadline = pluvio.now() + 10
            while uring.current():stats().in_flight > 0 and pluvio.now() < deadline do pluvio.sleep(0.001) end
            assert.equal(0, uring.current():stats().in_flight)
        end
        settle()                -- a connect that timed out above is cancelled
        local before = nfds()
        for _ = 1, 5 do
            assert.same({ nil, "timeout" }, { pluvio.timeout(0.05, uring.tcp_connect, "127.0.0.1", l:port()) })
        end
        settle()                -- the cancels complete
        assert.equal(before, nfds())
        for _, c in ipairs(held) do c:close() end
        l:close()
    end))

    it("keeps what recv_exact received when its task is killed, for the next recv", async(function()
        local l = assert(uring.tcp_listen("127.0.0.1", 0))
        local first_half, second_half = pluvio.channel(1), pluvio.channel(1)
        local srv = pluvio.spawn(function()
            local c = assert(l:accept())
            c:send("AAAAA")             -- first half of a 10-byte record
            first_half:send(true)
            second_half:recv()          -- (after the timeout: a sleep here raced it under load)
            c:send("BBBBB")
            c:send("CCCCCCCCCC")
            pluvio.sleep(0.05)
            c:close()
        end)
        local c = assert(uring.tcp_connect("127.0.0.1", l:port()))
        first_half:recv()               -- in our socket: recv_exact takes it at once
        assert.same({ nil, "timeout" }, { pluvio.timeout(0.05, c.recv_exact, c, 10) })
        second_half:send(true)
        assert.equal("AAAAABBBBB", c:recv_exact(10))
        assert.equal("CCCCCCCCCC", c:recv_exact(10))
        srv:join()
        c:close()
        l:close()
    end))

    -- A reader parks in recv_exact, then recv; deliver(s, "hello") sends it
    -- its first bytes, after which the reader has status; it is killed, and
    -- the next recv_exact must still get them, ahead of what follows.
    local function killed_reader_keeps_bytes(deliver, status)
        local l = assert(uring.tcp_listen("127.0.0.1", 0))
        local srv = pluvio.spawn(function() return assert(l:accept()) end)
        local c = assert(uring.tcp_connect("127.0.0.1", l:port()))
        local s = srv:join()
        for _, how in ipairs({ "recv_exact", "recv" }) do
            local reader = pluvio.spawn(function()
                return how == "recv" and c:recv(100) or c:recv_exact(10)
            end)
            pluvio.yield()                      -- it parks in its recv
            deliver(s, "hello")
            assert.equal(status, reader:status())
            reader:kill()
            assert.equal(5, s:send("world"))
            assert.same({ "helloworld" }, { pluvio.timeout(10, c.recv_exact, c, 10) })
        end
        s:close()
        c:close()
        l:close()
    end

    it("keeps the bytes of a recv that finished in the tick its task was killed", async(function()
        -- its recv finishes with ours: woken, not yet run
        killed_reader_keeps_bytes(function(s, data) assert.equal(5, s:send(data)) end, "ready")
    end))

    it("keeps the bytes of a recv the kernel finished after the tick reaped, its task killed", async(function()
        -- a plain send(2) in this batch: the recv finishes in the kernel as
        -- the call returns, after the tick took in the completions
        killed_reader_keeps_bytes(function(s, data)
            assert.equal(5, tonumber(ffi.C.send(s.fd, data, 5, 0)))
        end, "waiting")
    end))

    it("keeps the datagram of a recv_from the kernel finished after the tick reaped, its task killed",
       async(function()
        local a, b = assert(uring.udp_bind("127.0.0.1", 0)), assert(uring.udp_bind("127.0.0.1", 0))
        local plain = assert(uring.udp_bind("127.0.0.1", 0))
        local reader = pluvio.spawn(function() return a:recv_from(100) end)
        pluvio.yield()                          -- it parks in its recv_from
        -- a datagram by sendto(2) through a connected socket, in this batch
        local to = ffi.new("uint8_t[16]", 2, 0, bit.rshift(a:port(), 8), bit.band(a:port(), 255), 127, 0, 0, 1)
        assert.equal(0, ffi.C.connect(plain.fd, to, 16))
        assert.equal(5, tonumber(ffi.C.send(plain.fd, "first", 5, 0)))
        assert.equal("waiting", reader:status())
        reader:kill()
        assert.equal(6, b:send_to("second", "127.0.0.1", a:port()))
        assert.same({ "first", "127.0.0.1", plain:port() }, { pluvio.timeout(10, a.recv_from, a, 100) })
        assert.same({ "second", "127.0.0.1", b:port() }, { pluvio.timeout(10, a.recv_from, a, 100) })
        a:close()
        b:close()
        plain:close()
    end))

    it("kills a task in a socket receive without waiting for the kernel, the next receive taking its bytes",
       async(function()
        local r = uring.current()
        local l = assert(uring.tcp_listen("127.0.0.1", 0))
        local srv = pluvio.spawn(function() return assert(l:accept()) end)
        local c = assert(uring.tcp_connect("127.0.0.1", l:port()))
        local s = srv:join()
        local a, b = assert(uring.udp_bind("127.0.0.1", 0)), assert(uring.udp_bind("127.0.0.1", 0))
        local to = ffi.new("uint8_t[16]", 2, 0, bit.rshift(a:port(), 8), bit.band(a:port(), 255), 127, 0, 0, 1)
        assert.equal(0, ffi.C.connect(b.fd, to, 16))
        for _, case in ipairs({
            { function() return c:recv(100) end, s.fd, function() return c:recv_exact(10) end, "helloworld" },
            { function() return a:recv_from(100) end, b.fd, function() return (a:recv_from(100)) end, "hello" },
        }) do
            local receive, peer, next_receive, want = case[1], case[2], case[3], case[4]
            local reader = pluvio.spawn(receive)
            pluvio.sleep(0.001)                 -- it parks in its receive...
            pluvio.yield()                      -- ...which a tick's flush gave the kernel
            -- by send(2) in this batch: the receive finishes, nobody reaps it yet
            assert.equal(5, tonumber(ffi.C.send(peer, "hello", 5, 0)))
            local enters = r:stats().enters
            reader:kill()
            -- the kill made no system call and left the receive to the kernel
            assert.equal(enters, r:stats().enters)
            assert.equal(1, r:stats().in_flight)
            assert.equal(5, tonumber(ffi.C.send(peer, "world", 5, 0)))
            assert.equal(want, pluvio.timeout(10, next_receive))
        end
        assert.equal(0, r:stats().in_flight)
        s:close()
        c:close()
        l:close()
        a:close()
        b:close()
    end))

    it("refuses a second reader on a TCP socket, which would get bytes a recv_exact had gathered", async(function()
        local l = assert(uring.tcp_listen("127.0.0.1", 0))
        local srv = pluvio.spawn(function() return assert(l:accept()) end)
        local c = assert(uring.tcp_connect("127.0.0.1", l:port()))
        local s = srv:join()
        local exact = pluvio.spawn(function() return s:recv_exact(10) end)
        pluvio.yield()
        assert.equal(5, c:send("AAAAA"))
        pluvio.sleep(0.01)                      -- exact has gathered the 5 bytes
        local other = pluvio.spawn(function() return s:recv(100) end)
        local ok, err = other:join()
        assert.is_nil(ok)
        assert.matches("a stream has one reader at a time", err, 1, true)
        assert.equal(5, c:send("BBBBB"))
        assert.equal("AAAAABBBBB", exact:join())
        assert.equal(2, c:send("CC"))           -- one at a time is fine, from any task
        assert.equal("CC", pluvio.spawn(function() return s:recv(100) end):join())
        c:close(); s:close(); l:close()
    end))

    it("passes the wait for a killed receive's bytes on when the task waiting for them is killed too",
       async(function()
        local l = assert(uring.tcp_listen("127.0.0.1", 0))
        local srv = pluvio.spawn(function() return assert(l:accept()) end)
        local c = assert(uring.tcp_connect("127.0.0.1", l:port()))
        local s = srv:join()
        local first = pluvio.spawn(function() return c:recv(100) end)
        pluvio.sleep(0.001)                     -- it parks in its recv...
        pluvio.yield()                          -- ...which a tick's flush gave the kernel
        -- in one batch: first is killed, its recv's end is the socket's to
        -- take; second waits for it (a third reader meanwhile is refused:
        -- a stream has one reader at a time)
        pluvio.spawn(function() first:kill() end)
        local second = pluvio.spawn(function() return c:recv_exact(10) end)
        local early = pluvio.spawn(function() return c:recv(100) end)
        pluvio.yield()
        assert.equal(1, #c.rescues)
        assert.equal(second, c.rescues[1].adopter)
        local ok, err = early:join()
        assert.is_nil(ok)
        assert.matches("TcpSocket:recv: " .. tostring(second):gsub("%p", "%%%0") .. " is receiving on this socket " ..
                       "already %(127%.0%.0%.1:%d+%): a stream has one reader at a time", err)
        second:kill()                           -- third takes over the wait, then receives
        local third = pluvio.spawn(function() return c:recv(100) end)
        assert.equal(5, s:send("hello"))
        assert.equal("hello", pluvio.timeout(10, third.join, third))
        s:close()
        c:close()
        l:close()
    end))

    it("says the socket was closed to a task waiting for a killed receive's end when the socket is closed",
       async(function()
        local r = uring.current()
        local a = assert(uring.udp_bind("127.0.0.1", 0))
        local first = pluvio.spawn(function() return a:recv_from(100) end)
        pluvio.sleep(0.001)                     -- it parks in its recv_from...
        pluvio.yield()                          -- ...which a tick's flush gave the kernel
        -- in one batch: first is killed, second waits for its recv_from's
        -- end, third for second
        pluvio.spawn(function() first:kill() end)
        local second = pluvio.spawn(function() return { a:recv_from(100) } end)
        local third = pluvio.spawn(function() return { a:recv_from(100) } end)
        pluvio.yield()
        assert.equal(second, a.rescues[1].adopter)
        assert.is_true(a:close())
        local why = "recv_from " .. a.name .. ": the socket was closed"
        assert.same({ nil, why, "ECANCELED" }, pluvio.timeout(10, second.join, second))
        assert.same({ nil, why, "ECANCELED" }, pluvio.timeout(10, third.join, third))
        pluvio.sleep(0.001)
        assert.equal(0, r:stats().in_flight)
        -- a killed receive nobody waits for when its socket closes: dropped with it
        local b = assert(uring.udp_bind("127.0.0.1", 0))
        first = pluvio.spawn(function() return b:recv_from(100) end)
        pluvio.sleep(0.001)
        pluvio.yield()
        first:kill()
        assert.is_true(b:close())
        assert.same({}, b.rescues)
        pluvio.sleep(0.001)
        assert.equal(0, r:stats().in_flight)
    end))

    it("keeps the datagram of a recv_from that finished in the tick its task was killed", async(function()
        local a, b = assert(uring.udp_bind("127.0.0.1", 0)), assert(uring.udp_bind("127.0.0.1", 0))
        for _, max in ipairs({ 100, 3 }) do
            local reader = pluvio.spawn(function() return a:recv_from(max) end)
            pluvio.yield()                      -- it parks in its recv_from
            assert.equal(5, b:send_to("first", "127.0.0.1", a:port()))   -- its recv_from finishes with ours
            assert.equal("ready", reader:status())  -- woken, not yet run
            reader:kill()
            assert.equal(6, b:send_to("second", "127.0.0.1", a:port()))
            if max == 100 then
                assert.same({ "first", "127.0.0.1", b:port() }, { pluvio.timeout(10, a.recv_from, a, 100) })
            else    -- the killed recv_from kept only its 3 bytes, and says how long it was
                assert.same({ "fi", "127.0.0.1", b:port(), 5 }, { pluvio.timeout(10, a.recv_from, a, 2) })
            end
            assert.same({ "second", "127.0.0.1", b:port() }, { pluvio.timeout(10, a.recv_from, a, 100) })
        end
        a:close()
        b:close()
    end))

    it("says how long a datagram was that did not fit", async(function()
        local a, b = assert(uring.udp_bind("127.0.0.1", 0)), assert(uring.udp_bind("127.0.0.1", 0))
        assert(b:send_to(("x"):rep(100), "127.0.0.1", a:port()))
        assert.same({ ("x"):rep(10), "127.0.0.1", b:port(), 100 }, { a:recv_from(10) })
        assert(b:send_to("fits", "127.0.0.1", a:port()))
        assert.same({ "fits", "127.0.0.1", b:port() }, { a:recv_from(10) })
        a:close()
        b:close()
    end))

    it("takes datagrams up to the size limit of the socket's family: 65507 bytes on IPv4, 65527 on IPv6",
       async(function()
        for _, case in ipairs({ { "127.0.0.1", 65507 }, helper.ipv6_loopback() and { "::1", 65527 } or nil }) do
            local host, limit = case[1], case[2]
            local a, b = assert(uring.udp_bind(host, 0)), assert(uring.udp_bind(host, 0))
            local big = ("0123456789abcdef"):rep(4096):sub(1, limit)
            assert.equal(limit, b:send_to(big, host, a:port()))
            local got, from, port, whole = a:recv_from(65536)
            assert.is_true(got == big)
            assert.same({ host, b:port() }, { from, port })
            assert.is_nil(whole)
            assert.has_error(function() b:send_to(big .. "x", host, a:port()) end,
                format("UdpSocket:send_to: a datagram holds at most %d bytes on an %s socket (got %d)",
                       limit, host == "::1" and "IPv6" or "IPv4", limit + 1))
            a:close()
            b:close()
        end
        if not helper.ipv6_loopback() then pending(helper.NO_IPV6) end
    end))

    it("says that a link-local IPv6 address needs its interface when the kernel refuses one without", async(function()
        if not helper.ipv6_loopback() then
            pending(helper.NO_IPV6)
            return
        end
        local none, err, code = uring.udp_bind("fe80::1", 0)             -- (a bare EINVAL said nothing of why)
        assert.is_nil(none)
        assert.equal("bind [fe80::1]:0: EINVAL: Invalid argument (a link-local IPv6 address needs its " ..
                     "interface: fe80::1%eth0, say)", err)
        assert.equal("EINVAL", code)
        none, err = uring.tcp_listen("FE80::1", 0)
        assert.matches("(a link-local IPv6 address needs its interface: FE80::1%eth0, say)", err, 1, true)
    end))

    it("says when a host name cannot be resolved", async(function()
        local ok, err, code = uring.tcp_connect("no-such-host.invalid", 80)
        assert.is_nil(ok)
        assert.equal('connect to no-such-host.invalid:80: cannot resolve host "no-such-host.invalid" ' ..
                     "(names are looked up with getaddrinfo: a numeric address or one from /etc/hosts)", err)
        assert.equal("ENXIO", code)
    end))

    it("hands out bytes a killed recv_exact kept in order, in small recvs and a recv_exact across them",
       async(function()
        local l = assert(uring.tcp_listen("127.0.0.1", 0))
        local accepting = pluvio.spawn(function() return assert(l:accept()) end)
        local c = assert(uring.tcp_connect("127.0.0.1", l:port()))
        local s = accepting:join()
        local data = {}
        for i = 1, 2000 do data[i] = ("%05d"):format(i) end
        data = table.concat(data)                   -- 10,000 bytes
        assert(c:send(data))
        assert.same({ nil, "timeout" }, { pluvio.timeout(0.05, s.recv_exact, s, #data + 1) })
        local got = { s:recv(3), s:recv(4) }        -- from the kept bytes, 3 then 4
        got[3] = s:recv_exact(10)                   -- across what recv left of them
        while #table.concat(got) < #data do got[#got + 1] = s:recv(997) end
        assert.equal(3, #got[1])
        assert.equal(4, #got[2])
        assert.is_true(table.concat(got) == data)
        assert(c:send("next"))                      -- and then the stream goes on
        assert.equal("next", s:recv_exact(4))
        c:close(); s:close(); l:close()
    end))

    it("continues a short read or write of File.new on a socket at offset 0, which is all a socket takes",
       async(function()
        -- (the rest went at offset + done: ESPIPE after the first part)
        local l = assert(uring.tcp_listen("127.0.0.1", 0))
        local accepting = pluvio.spawn(function() return assert(l:accept()) end)
        local c = assert(uring.tcp_connect("127.0.0.1", l:port()))
        local s = accepting:join()
        local f = uring.File.new(ffi.C.dup(s.fd), "socket as a file")
        local reading = pluvio.spawn(function() return f:read(0, 10) end)
        assert(c:send("abc"))
        pluvio.sleep(0.02)
        assert(c:send("defghij"))
        assert.equal("abcdefghij", reading:join())
        local g = uring.File.new(ffi.C.dup(c.fd), "the other end as a file")
        local big = ("w"):rep(4 * 1048576)      -- more than the socket buffers take at once
        local receiving = pluvio.spawn(function() return s:recv_exact(#big) end)
        assert.equal(#big, g:write(0, big))
        assert.is_true(receiving:join() == big)
        reading = pluvio.spawn(function() return f:read(0, 10) end)
        assert(c:send("xyz"))
        pluvio.sleep(0.02)
        c:close(); g:close()                    -- the end: a short read returns what came
        assert.equal("xyz", reading:join())
        f:close(); s:close(); l:close()
    end))

    it("turns TCP keepalive on and off, leaving unacknowledged data unbounded (a slow reader is no dead one)",
       async(function()
        local SOL_SOCKET, SO_KEEPALIVE, IPPROTO_TCP = 1, 9, 6
        local TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT, TCP_USER_TIMEOUT = 4, 5, 6, 18
        local function opt(sock, level, name)
            local v, len = ffi.new("int[1]"), ffi.new("unsigned[1]", 4)
            assert(ffi.C.getsockopt(sock.fd, level, name, v, len) == 0)
            return v[0]
        end
        local function settings(sock)
            return { opt(sock, SOL_SOCKET, SO_KEEPALIVE), opt(sock, IPPROTO_TCP, TCP_KEEPIDLE),
                     opt(sock, IPPROTO_TCP, TCP_KEEPINTVL), opt(sock, IPPROTO_TCP, TCP_KEEPCNT),
                     opt(sock, IPPROTO_TCP, TCP_USER_TIMEOUT) }
        end
        local l = assert(uring.tcp_listen("127.0.0.1", 0))
        local accepting = pluvio.spawn(function() return assert(l:accept()) end)
        local c = assert(uring.tcp_connect("127.0.0.1", l:port()))
        local a = accepting:join()
        assert.same({ 0, 0 }, { settings(c)[1], settings(c)[5] })   -- off to begin with
        assert.is_true(c:keepalive(5, 2, 4))
        assert.same({ 1, 5, 2, 4, 0 }, settings(c))
        assert.is_true(a:keepalive(10))                     -- interval: idle; count: 3
        assert.same({ 1, 10, 10, 3, 0 }, settings(a))
        assert.is_true(c:keepalive(false))
        assert.same({ 0, 0 }, { settings(c)[1], settings(c)[5] })
        assert.has_error(function() a:keepalive(false, 5, 3) end,   -- (ignored: keepalive went off)
            "TcpSocket:keepalive: keepalive(false) turns keepalive off and takes no interval or count")
        assert.same({ 1, 10, 10, 3, 0 }, settings(a))
        assert.is_true(c:keepalive(32767, 32767, 127))      -- Linux's most
        assert.same({ 1, 32767, 32767, 127, 0 }, settings(c))
        for _, case in ipairs({
            { { 0 }, "idle must be an integer from 1 to 32767 (got 0)" },
            { { 1.5 }, "idle must be an integer from 1 to 32767 (got 1.5)" },
            { { true }, "idle must be an integer from 1 to 32767 (got true)" },
            { { }, "idle must be an integer from 1 to 32767 (got nil)" },
            { { 32768 }, "idle must be an integer from 1 to 32767 (got 32768)" },
            { { 1, 0 }, "interval must be an integer from 1 to 32767 (got 0)" },
            { { 1, "2" }, "interval must be an integer from 1 to 32767 (got \"2\")" },
            { { 1, 1, 0 }, "count must be an integer from 1 to 127 (got 0)" },
            { { 1, 1, 128 }, "count must be an integer from 1 to 127 (got 128)" },
        }) do
            local ok, err = pcall(c.keepalive, c, unpack(case[1], 1, 3))
            assert.is_false(ok)
            assert.equal("TcpSocket:keepalive: " .. case[2], err:match("TcpSocket:keepalive: .*$"))
        end
        local ok, err = pcall(c.keepalive, l, 1)
        assert(not ok and err:find("TcpSocket:keepalive: call it as a method on a socket", 1, true), err)
        c:close(); a:close(); l:close()
        ok, err = pcall(c.keepalive, c, 1)
        assert(not ok and err:find("TcpSocket:keepalive: the socket is closed", 1, true), err)
    end))

    it("reports a refused connection and refuses wildcard defaults", async(function()
        local c, err, code = uring.tcp_connect("127.0.0.1", 1)
        assert.is_nil(c)
        assert.equal("connect to 127.0.0.1:1: ECONNREFUSED: Connection refused", err)
        assert.equal("ECONNREFUSED", code)
        assert.has_error(function() uring.tcp_listen(nil, 0) end,
            'uring.tcp_listen: host must be an address or a name, e.g. "127.0.0.1" or "::1" (got nil)')
        assert.has_error(function() uring.udp_bind("127.0.0.1", 70000) end,
            "uring.udp_bind: port must be an integer from 0 to 65535 (got 70000)")
        local l = assert(uring.tcp_listen("127.0.0.1", 0))
        local busy, err2 = uring.tcp_listen("127.0.0.1", l:port())
        assert.is_nil(busy)
        assert.matches("EADDRINUSE", err2)
        l:close()
    end))

    it("takes only nil as the default backlog, not false", async(function()
        assert.has_error(function() uring.tcp_listen("127.0.0.1", 0, false) end,
            "uring.tcp_listen: backlog must be an integer from 1 to 65535 (got false)")
    end))

    it("refuses a host with a NUL byte instead of binding or connecting to the part before it", async(function()
        local l = assert(uring.tcp_listen("127.0.0.1", 0))
        local u = assert(uring.udp_bind("127.0.0.1", 0))
        local cut = "127.0.0.1\0.example.org"
        local calls = {
            { "uring.tcp_listen", function() local r = uring.tcp_listen(cut, 0); return r end },
            { "uring.tcp_connect", function() local r = uring.tcp_connect(cut, l:port()); return r end },
            { "uring.udp_bind", function() local r = uring.udp_bind(cut, 0); return r end },
            { "UdpSocket:send_to", function() local r = u:send_to("x", cut, u:port()); return r end },
        }
        for _, c in ipairs(calls) do
            local ok, err = pcall(c[2])
            assert.is_false(ok, c[1])
            assert.matches(c[1]:gsub("%.", "%%.") .. ': host must not contain a NUL byte %(got "127%.0%.0%.1\\0%.example%.org"%)',
                           err)
            assert.matches("uring_socket_spec.lua:%d+:", err)     -- at the caller's line
        end
        assert.equal(0, uring.current():stats().in_flight)
        l:close()
        u:close()
    end))

    it("wakes a task waiting in accept when the listener is closed", async(function()
        local l = assert(uring.tcp_listen("127.0.0.1", 0))
        local acc = pluvio.spawn(function() return { l:accept() } end)
        pluvio.yield()
        assert.is_true(l:close())
        local r = acc:join()
        assert.is_nil(r[1])
        assert.matches("accept .*: the socket was closed", r[2])
        assert.has_error(function() l:accept() end, "TcpListener:accept: the socket is closed (" .. l.name .. ")")
        assert.equal(0, uring.current():stats().in_flight)
    end))

    it("says the socket was closed when another task closes it between two pieces of a recv_exact",
       async(function()
        local l = assert(uring.tcp_listen("127.0.0.1", 0))
        local srv = pluvio.spawn(function() return assert(l:accept()) end)
        local c = assert(uring.tcp_connect("127.0.0.1", l:port()))
        local s = srv:join()
        local reader = pluvio.spawn(function() return { c:recv_exact(10) } end)
        pluvio.yield()                  -- it parks in its first recv
        local closer = pluvio.spawn(function()
            assert.equal(5, s:send("12345"))    -- its first piece: the reader is woken...
            return c:close()                    -- ...and runs after the close
        end)
        assert.is_true(closer:join())
        local r = reader:join()
        assert.is_nil(r[1])
        assert.equal("recv " .. c.name .. ": the socket was closed (5 bytes done before the error)", r[2])
        assert.equal("ECANCELED", r[3])
        assert.equal(5, r[4])           -- (nil on this path, a count on the others)
        s:close()
        l:close()
    end))

    it("closes a socket whose closing task is killed while it waits", async(function()
        local l = assert(uring.tcp_listen("127.0.0.1", 0))
        local srv = pluvio.spawn(function() return assert(l:accept()) end)
        local c = assert(uring.tcp_connect("127.0.0.1", l:port()))
        local s = srv:join()
        local closer = pluvio.spawn(function() return c:close() end)
        pluvio.yield()                  -- it parks in close
        assert.equal("waiting", closer:status())
        closer:kill()
        assert.same({ nil, "closed", "EOF" }, { pluvio.timeout(10, s.recv, s, 10) })
        s:close()
        l:close()
    end))

    it("closes the connection a killed accept took when the task closing the listener is killed too",
       async(function()
        local l = assert(uring.tcp_listen("127.0.0.1", 0))
        local acceptor = pluvio.spawn(function() return l:accept() end)
        pluvio.sleep(0.001)             -- it parks in accept, submitted
        local client = ffi.C.socket(2, 1, 0)     -- a client by connect(2): the accept ends, nobody reaps it
        local to = ffi.new("uint8_t[16]", 2, 0, bit.rshift(l:port(), 8), bit.band(l:port(), 255), 127, 0, 0, 1)
        assert.equal(0, ffi.C.connect(client, to, 16))
        acceptor:kill()                 -- its accept is kept on the listener, for the next accept
        assert.equal(1, l.rescues and #l.rescues)
        local closer = pluvio.spawn(function() return l:close() end)
        pluvio.yield()                  -- it parks in close
        closer:kill()
        pluvio.sleep(0.05)
        local buf = ffi.new("char[8]")
        assert.equal(0, tonumber(ffi.C.recv(client, buf, 8, 0x40)))    -- EOF: the connection was closed
        helper.libc.close(client)
    end))

    it("wakes a task waiting in accept when the listener is closed, also on a ring of one entry", function()
        with_reactor({ queue_size = 1 }, function(r)
            for _ = 1, 2 do
                local l = assert(uring.tcp_listen("127.0.0.1", 0))
                local acc = pluvio.spawn(function() return { l:accept() } end)
                pluvio.yield()
                assert.is_true(l:close())
                assert.matches("accept .*: the socket was closed", acc:join()[2])
            end
            assert.equal(0, r:stats().in_flight)
        end)
    end)

    it("cancels a pending recv when its task is killed", async(function()
        local a = assert(uring.udp_bind("127.0.0.1", 0))
        local t = pluvio.spawn(function() return a:recv_from(100) end)
        pluvio.yield()
        t:kill()
        pluvio.sleep(0.005)
        assert.equal(0, uring.current():stats().in_flight)
        local b = assert(uring.udp_bind("127.0.0.1", 0))
        local again = pluvio.spawn(function() return a:recv_from(100) end)
        pluvio.yield()
        b:send_to("after", "127.0.0.1", a:port())
        assert.equal("after", again:join())
        a:close()
        b:close()
    end))

    it("keeps a killed read's memory until the kernel has let go of it", async(function()
        -- (a socket receive is settled at its kill instead: see _rescue)
        local r = uring.current()
        local fds = ffi.new("int[2]")
        assert.equal(0, ffi.C.pipe(fds))
        local f = uring.File.new(fds[0], "pipe")
        -- killed before its tick's submit: the kernel never saw it, its
        -- scratch space is free at once
        local t = pluvio.spawn(function() return f:read(0, 100) end)
        pluvio.yield()
        t:kill()
        assert.equal(0, #r.limbo)
        t = pluvio.spawn(function() return f:read(0, 100) end)
        pluvio.sleep(0.001)         -- submitted: the kernel has it
        assert.equal(1, r:stats().in_flight)
        t:kill()                    -- the cancel is queued, not yet done
        assert.equal(1, #r.limbo)
        local kept = r.limbo[1].keep
        collectgarbage()
        assert.equal(kept, r.limbo[1].keep)
        pluvio.sleep(0.005)         -- the kernel completes the cancelled op
        assert.equal(0, r:stats().in_flight)
        local again = pluvio.spawn(function() return f:read(0, 6) end)
        pluvio.yield()              -- its scratch space: the one given back
        assert.equal(0, #r.limbo)
        ffi.C.write(fds[1], "reused", 6)
        assert.equal("reused", again:join())
        f:close()
        ffi.C.close(fds[1])
    end))
end)

-- A pluvio script run in a network namespace of its own, whose /etc/hosts
-- is `hosts` (bind-mounted in a mount namespace of its own: the machine's
-- file is not touched), so that a name can have the addresses a spec
-- needs; the namespace has only its loopback, which also carries the
-- private address fd00:706c::1 (a name with an IPv6 address only: glibc
-- gives ::1 in a hosts file as 127.0.0.1 too).  Returns the script's
-- status, output and errors, or nil and why no namespace could be made.
local function in_netns(hosts, code)
    local ns = format("pluvio_spec_%d_%d", ffi.C.getpid(), math.random(1e9))
    local hosts_path, script = tmpfile(".hosts"), tmpfile(".lua")
    local f = assert(io.open(hosts_path, "w"))
    f:write(hosts)
    f:close()
    f = assert(io.open(script, "w"))
    f:write(code)
    f:close()
    local q = helper.quote
    local function inside(cmd)
        return format("ip netns exec %s unshare -m sh -c %s", ns,
                      q(format("mount --bind %s /etc/hosts && %s", q(hosts_path), cmd)))
    end
    local status, out, err
    status, _, err = helper.sh("ip netns add " .. ns)
    if status == 0 then
        status, out, err = helper.sh(inside("ip link set lo up && ip addr add fd00:706c::1/128 dev lo && " ..
                                           "ip addr add fe80::1/64 dev lo nodad"))
        if status == 0 then
            status, out, err = helper.sh(inside(q(helper.host) .. " " .. q(script)))
        else
            status, out = nil, "cannot set up the namespace's hosts file and loopback: " .. err
        end
        helper.sh("ip netns del " .. ns)
    else
        status, out = nil, "cannot create a network namespace (ip netns add: " .. err:gsub("%s+$", "") .. ")"
    end
    os.remove(hosts_path)
    os.remove(script)
    return status, out, err
end

-- What code printed in the namespace, once it exited 0 with nothing on
-- stderr; nil, with the spec marked pending, where no namespace can be made.
local function netns_output(hosts, code)
    local status, out, err = in_netns(hosts, code)
    if not status then
        pending(out)
        return nil
    end
    assert.equal("", err)
    assert.equal(0, status)
    return out
end

describe("link-local IPv6 addresses", function()
    it("keep their interface in the addresses sockets give, so that a reply finds its way", function()
        local out = netns_output("", [[
local uring = require "pluvio.uring"
local a = assert(uring.udp_bind("fe80::1%lo", 0))
local b = assert(uring.udp_bind("fe80::1%lo", 0))
print((a:address():gsub(":%d+$", "")))
assert(b:send_to("hi", "fe80::1%lo", a:port()))
local data, host, port = a:recv_from(10)
print(data, host, port == b:port())
assert(a:send_to("back", host, port))       -- (without its zone the reply had no interface to go out on)
print((b:recv_from(10)))
a:close(); b:close()
]])
        if not out then return end
        assert.equal("[fe80::1%lo]\nhi\tfe80::1%lo\ttrue\nback\n", out)
    end)
end)

describe("names with several addresses", function()
    -- plmulti has three addresses, of both families; pl6only one IPv6
    local hosts = "::1 plmulti\n127.0.0.1 plmulti\n127.0.0.2 plmulti\nfd00:706c::1 pl6only\n"

    it("connects to whichever of a name's addresses listens, trying each in turn, and binds the first",
       function()
        local out = netns_output(hosts, [[
local pluvio = require "pluvio"
local uring = require "pluvio.uring"
-- a listener on one of plmulti's addresses at a time: connect finds it
for _, at in ipairs({ "::1", "127.0.0.1", "127.0.0.2" }) do
    local l = assert(uring.tcp_listen(at, 0))
    local srv = pluvio.spawn(function()
        local s = assert(l:accept())
        assert(s:send(at))
        s:close()
    end)
    local c, why = uring.tcp_connect("plmulti", l:port())
    if c then
        print("listening on " .. at .. ": connected to " .. c:peer():gsub(":%d+$", "") .. ", which says " ..
              c:recv_exact(#at))
        c:close()
        srv:join()
    else
        print("listening on " .. at .. ": " .. why)
    end
    l:close()
end
-- none listens: the last error, and every address tried
local l = assert(uring.tcp_listen("127.0.0.1", 0))
local port = l:port()
l:close()
print("port " .. port)
print((select(2, uring.tcp_connect("plmulti", port))))
-- listeners and UDP sockets bind the first
local tl, u = assert(uring.tcp_listen("plmulti", 0)), assert(uring.udp_bind("plmulti", 0))
print("listener " .. tl:address():gsub(":%d+$", ""))
print("udp " .. u:address():gsub(":%d+$", ""))
print((select(2, uring.tcp_listen("plmulti", tl:port())):gsub(tl:port(), "P")))
]])
        if not out then return end
        -- the addresses tried, in getaddrinfo's order: each of plmulti's once
        local port = out:match("port (%d+)\n")
        local list = out:match("%(the last of 3 addresses tried: ([^)]*)%)") or ""
        local tried = {}
        for a in list:gmatch("([^,]+):" .. port) do tried[#tried + 1] = a:gsub("^%s+", "") end
        local sorted = { unpack(tried) }
        table.sort(sorted)
        assert.same({ "127.0.0.1", "127.0.0.2", "[::1]" }, sorted)
        assert.equal(table.concat({
            "listening on ::1: connected to [::1], which says ::1",
            "listening on 127.0.0.1: connected to 127.0.0.1, which says 127.0.0.1",
            "listening on 127.0.0.2: connected to 127.0.0.2, which says 127.0.0.2",
            "port " .. port,
            format("connect to plmulti:%s: ECONNREFUSED: Connection refused (the last of 3 addresses tried: %s)",
                   port, list),
            "listener " .. tried[1],
            "udp " .. tried[1],
            format("listen on plmulti:P: EADDRINUSE: Address already in use (at %s:P, the first of its 3 addresses)",
                   tried[1]),
        }, "\n") .. "\n", out)
    end)

    it("sends a datagram to a name's first address of the socket's own family", function()
        local out = netns_output(hosts, [[
local pluvio = require "pluvio"
local uring = require "pluvio.uring"
for _, at in ipairs({ "127.0.0.1", "::1" }) do
    local a, b = assert(uring.udp_bind(at, 0)), assert(uring.udp_bind(at, 0))
    local sent, why = b:send_to("to plmulti from " .. at, "plmulti", a:port())
    if sent then
        local data, host = pluvio.timeout(10, a.recv_from, a, 100)
        print(at .. ": " .. tostring(data) .. " at " .. tostring(host))
    else
        print(at .. ": " .. why)
    end
    if at == "127.0.0.1" then
        print((select(2, b:send_to("x", "pl6only", a:port())):gsub(":%d+%)$", ")")))
    end
    a:close()
    b:close()
end
]])
        if not out then return end
        assert.equal(table.concat({
            "127.0.0.1: to plmulti from 127.0.0.1 at 127.0.0.1",
            'send_to pl6only:' .. out:match("pl6only:(%d+)") ..
            ': host "pl6only" has no IPv4 address (the socket is IPv4: 127.0.0.1)',
            "::1: to plmulti from ::1 at ::1",
        }, "\n") .. "\n", out)
    end)
end)
