-- pluvio.uring_tcp: TCP over the io_uring reactor, part of pluvio.uring:
-- uring.tcp_listen (TcpListener: accept, port, address, close) and
-- uring.tcp_connect (TcpSocket: send, recv, recv_exact, shutdown,
-- keepalive, peer, close).  Installed into pluvio.uring after
-- uring_net.lua, whose socket machinery (addresses, failures, stopped
-- receives, close) it builds on.
local pluvio = require "pluvio"
local core = require "pluvio.core"
local check = require "pluvio.check"

local ffi, C = core.ffi, core.C
local format, type, setmetatable, getmetatable = string.format, type, setmetatable, getmetatable
local ffi_string = ffi.string
local errstr = core.errstr
local host_port = check.host_port
local wake, park = pluvio._wake, pluvio._park
local WAIT_OTHER = pluvio._WAIT_KIND.OTHER

local M = {}

local MAX_IO = 0x7ffff000
-- The most one receive takes from the kernel at a time: recv(max) returns
-- as soon as some bytes arrive, so scratch memory of max bytes (up to 2 GiB,
-- zeroed) would mostly go unused; recv_exact gathers chunks of this size.
local RECV_CHUNK = 1048576
local ECANCELED = -125
local MAX_ADDRS = 16        -- the most of a name's addresses tcp_connect tries
local MAX_KEEPIDLE, MAX_KEEPCNT = 32767, 127    -- Linux's most for TCP_KEEPIDLE/KEEPINTVL, TCP_KEEPCNT

function M.install(U)
    local I = U._internal
    local context, run_op, bounce_get, bounce_put = I.context, I.run_op, I.bounce_get, I.bounce_put
    local op_context = I.op_context
    local receive_context, current_task, close_guard = I.receive_context, I.current_task, I.close_guard
    local errname, addr_text, sock_name = I.errname, I.addr_text, I.sock_name
    local bound_port, bound_address, check_port, check_data = I.bound_port, I.bound_address, I.check_port, I.check_data
    local host_failed, bind_addr, bind_note, failed = I.host_failed, I.bind_addr, I.bind_note, I.failed
    local live, home, take_rescues, has_rescues, close_socket = I.live, I.home, I.take_rescues, I.has_rescues,
        I.close_socket
    local TcpListener, TcpSocket = U.TcpListener, U.TcpSocket

    -- tcp_listen(host, port[, backlog]): a listening socket on host:port
    -- (port 0: any free port, see :port(); a name with several addresses:
    -- the first).
    function U.tcp_listen(host, port, backlog)
        host = check.host("uring.tcp_listen", host)
        check_port("uring.tcp_listen", port)
        if type(backlog) == "nil" then  -- (not backlog or 128: false is no backlog; nor == nil: NULL equals nil)
            backlog = 128
        end
        check.integer("uring.tcp_listen", "backlog", backlog, 1, 65535)
        local t, r, code = op_context("uring.tcp_listen")
        if not t then
            return nil, r, code
        end
        local addr, n = bind_addr(host, port, 0)
        if not addr then
            return host_failed("listen on", host, port, n)
        end
        local fd = C.pl_net_tcp_listen(addr, backlog)
        if fd < 0 then
            return host_failed("listen on", host, port, fd, bind_note(addr, n))
        end
        local held = {}     -- see _keep
        return setmetatable({ reactor = r, fd = fd, name = sock_name(fd, 0), held = held,
                              guard = close_guard(fd, held) }, TcpListener)
    end

    function TcpListener:port()
        live("TcpListener:port", self, TcpListener, "a listener")
        return bound_port("TcpListener:port", self)
    end

    -- address(): the address the listener is bound to, as "ip:port" or
    -- "[v6]:port", with the port port 0 got.  Asked of the socket, not
    -- taken from the name given: a name with several addresses binds only
    -- the first, and this says which.
    function TcpListener:address()
        live("TcpListener:address", self, TcpListener, "a listener")
        return bound_address("TcpListener:address", self)
    end

    -- A connected TCP socket on fd (a socket nobody closes is closed by the
    -- garbage collector: see close_guard).
    local function connected(r, fd)
        C.pl_net_nodelay(fd)
        return setmetatable({ reactor = r, fd = fd, name = sock_name(fd, 1), pending = "", pending_at = 1,
                              reader = false, writer = false, guard = close_guard(fd) }, TcpSocket)
    end

    -- A stopped accept ended (see stop_receive): the connection it took is
    -- held for the next accept, as a client whose connect succeeded must not
    -- be reset because the task that waited for it was killed (a
    -- pluvio.timeout around accept).  A closed listener closes it.
    function TcpListener:_keep(r, op)
        if C.pl_uring_op_take(r.u, op, r.result) == 1 and r.result.res >= 0 then
            local fd = r.result.res
            if self.fd < 0 then
                C.pl_file_close_sync(fd)
            else
                self.held[#self.held + 1] = fd
            end
        end
    end

    -- accept(): the next connection; parks until a client connects.
    function TcpListener:accept()
        live("TcpListener:accept", self, TcpListener, "a listener")
        local t, r = receive_context("TcpListener:accept")
        home("TcpListener:accept", self, r)
        local held = self.held
        if not held[1] and has_rescues(self) then   -- an accept killed before this one
            take_rescues(self, t, r, "TcpListener:accept")
            if self.fd < 0 then     -- another task closed it meanwhile
                return failed("accept", self, ECANCELED)
            end
        end
        if held[1] then
            return connected(r, table.remove(held, 1))
        end
        t.io_rescue = self          -- (see await)
        local fd = run_op(r, t, C.pl_uring_accept(r.u, t.slot, t.gen, self.fd), self)
        t.io_rescue = nil
        if fd < 0 then
            return failed("accept", self, fd)
        end
        return connected(r, fd)
    end

    -- Connections no accept took (killed accepts had): their clients see
    -- the end.  Once the close goes ahead: a refused one leaves them.
    local function close_held(self)
        local held = self.held
        for i = #held, 1, -1 do
            C.pl_file_close_sync(held[i])
            held[i] = nil           -- (in place: the guard has the list)
        end
    end

    function TcpListener:close()
        if getmetatable(self) ~= TcpListener then
            error("TcpListener:close: call it as a method on a listener", 2)
        end
        if self.fd < 0 then return false end
        return close_socket(self, "TcpListener:close", close_held)
    end

    -- Why no address of a name took the connection: the last error, and
    -- the addresses tried when there were several.
    local function connect_failed(host, port, rc, list, n)
        local note
        if n > 1 then
            local tried = {}
            for i = 0, n - 1 do
                tried[i + 1] = addr_text(list[i])
            end
            note = format(" (the last of %d addresses tried: %s)", n, table.concat(tried, ", "))
        end
        return host_failed("connect to", host, port, rc, note)
    end

    -- tcp_connect(host, port): a connected socket, or nil, err.  Each of
    -- the name's addresses (up to MAX_ADDRS) is tried in getaddrinfo's
    -- order until one connects.
    function U.tcp_connect(host, port)
        host = check.host("uring.tcp_connect", host)
        check_port("uring.tcp_connect", port, 1)
        local t, r, code = op_context("uring.tcp_connect")
        if not t then
            return nil, r, code
        end
        local list = ffi.new("pl_net_addr_t[?]", MAX_ADDRS)     -- its own: connecting yields
        local n = C.pl_net_resolve(host, port, 0, 0, list, MAX_ADDRS)
        if n < 0 then
            return host_failed("connect to", host, port, n)
        end
        n = math.min(n, MAX_ADDRS)
        local fdout = ffi.new("int[1]", -1)
        local what = "connect to " .. host_port(host, port)
        local rc
        for i = 0, n - 1 do
            rc = run_op(r, t, C.pl_uring_connect(r.u, t.slot, t.gen, list[i], fdout), what)
            local fd = fdout[0]
            if rc >= 0 then
                return connected(r, fd)
            end
            if fd >= 0 then C.pl_file_close_sync(fd) end
            fdout[0] = -1
        end
        return connect_failed(host, port, rc, list, n)
    end

    -- A stream has one writer at a time; other senders wait their turn, in
    -- the order they came: two sends in flight at once could interleave
    -- their bytes (one that comes back short is continued after the
    -- other).  The writer's task owns the socket while it sends, so that
    -- its end, killed or not, hands the turn on (_task_exit).
    local function next_writer(self)
        local q = self.send_queue
        while q and q[1] do
            local t = table.remove(q, 1)
            if t.live then  -- (a waiter killed in its turn's wait is skipped)
                self.writer = t
                wake(t)
                return
            end
        end
        self.writer = false
    end

    -- A plain coroutine inside the task may not wait for the turn (it
    -- raises at once, as receives do): left unresumed, it would leave the
    -- task in the queue, and the turn, once handed to it, with nobody.
    -- A waiter owns the socket from its place in the queue on: killed after
    -- next_writer handed it the turn but before it ran, its end passes the
    -- turn on (_task_exit), else the sends queued behind it waited for good.
    local function claim_writer(self, t, fname)
        local w = self.writer
        if w and w ~= t and w.live then
            current_task(fname, 1)
            local q = self.send_queue
            if not q then
                q = {}
                self.send_queue = q
            end
            q[#q + 1] = t
            t:_own(self)
            repeat
                park(t, WAIT_OTHER, 0, self, fname)
            until self.writer == t
        end
        self.writer = t
        t:_own(self)
    end

    local function release_writer(self, t, ...)
        t:_disown(self)
        next_writer(self)
        return ...
    end

    function TcpSocket:_task_exit(t)
        if self.writer == t then
            next_writer(self)
        end
    end

    -- A send its task will not take the end of (the task was killed, or the
    -- plain coroutine that started it was resumed by another and raised,
    -- or the task started its next operation) is stopped as receives are,
    -- and the turn goes on at once: else the sends behind it waited until
    -- that task's end (for good, from a task that lives on).
    -- A shutdown given up (keep nil) is not stopped: it has nothing to
    -- keep, and the ring's abandon cancels it; only its turn goes on.
    local stop = TcpSocket._rescue
    function TcpSocket:_rescue(r, op, keep, t)
        if keep == nil then
            if self.writer == t then
                next_writer(self)
            end
            return false
        end
        local taken = stop(self, r, op, keep)
        if type(keep) == "string" and self.writer == t then      -- (a send's keep is its data)
            next_writer(self)
        end
        return taken
    end

    -- send(data): send all of data (a short send is continued); returns
    -- #data or nil, err.  Sends from several tasks go out one after the
    -- other, whole, in the order they were called.
    local function send(self, t, r, data)
        if has_rescues(self) then   -- a killed send among them: how much went out?
            take_rescues(self, t, r, "TcpSocket:send")      -- (TcpSocket:send checked the coroutine)
        end
        if self.fd < 0 then         -- another task closed it meanwhile (4th: none of it went)
            return failed("send", self, ECANCELED, 0)
        end
        if self.cut then
            return nil, format("send %s: %s", self.name, self.cut), "ECANCELED", 0
        end
        t.io_rescue = self          -- (see await)
        local rc, bytes = run_op(r, t, C.pl_uring_send(r.u, t.slot, t.gen, self.fd, data, #data), self, data)
        t.io_rescue = nil
        if rc < 0 then
            return failed("send", self, rc, bytes)
        end
        return rc
    end

    function TcpSocket:send(data)
        live("TcpSocket:send", self, TcpSocket, "a socket")
        check_data("TcpSocket:send", data)
        if #data > MAX_IO then
            error(format("TcpSocket:send: data must be at most %d bytes (got %d)", MAX_IO, #data), 2)
        end
        local t, r = context("TcpSocket:send")
        home("TcpSocket:send", self, r)
        if has_rescues(self) then   -- (send waits for them: a plain coroutine raises before it takes the turn)
            current_task("TcpSocket:send")
        end
        claim_writer(self, t, "TcpSocket:send")
        return release_writer(self, t, send(self, t, r, data))
    end

    local function recv_raw(self, t, r, max)
        local scratch, err = bounce_get(r, max)
        if not scratch then
            return nil, err, core.no_scratch(max)
        end
        t.io_rescue = self          -- (see await)
        local rc = run_op(r, t, C.pl_uring_recv(r.u, t.slot, t.gen, self.fd, scratch.ptr, max), self, scratch)
        t.io_rescue = nil
        local s = rc > 0 and ffi_string(scratch.ptr, rc) or nil
        bounce_put(r, scratch)
        return s, rc
    end

    -- What a recv_exact that did not finish (its task was killed, or a
    -- timeout cancelled it) had received: it stays for the next recv.
    local function gather(self)
        local parts = self.parts
        if parts then
            self.parts = nil
            self.pending, self.pending_at = table.concat(parts), 1
        end
    end

    -- The bytes pending, as one string; none pending after.  (recv hands
    -- them out from pending_at on: a cut copying the rest each time made a
    -- loop of small recvs over a large remainder quadratic.)
    local function take_all_pending(self)
        local p, at = self.pending, self.pending_at
        self.pending, self.pending_at = "", 1
        return at == 1 and p or p:sub(at)
    end

    -- A stopped recv ended (see stop_receive): its bytes, if any, are the
    -- stream's next ones, kept for the next recv as gather keeps a
    -- recv_exact's.
    -- A stopped send ended: when it went out in part, the stream is cut.
    function TcpSocket:_keep(r, op, scratch)
        if type(scratch) == "string" then
            local sent = C.pl_uring_op_take(r.u, op, r.result) == 1 and r.result.bytes or 0
            if sent > 0 and sent < #scratch then
                self.cut = format("an earlier send was killed after %d of its %d bytes: the stream is cut " ..
                                  "mid-message (close the connection)", sent, #scratch)
            end
            return
        end
        if C.pl_uring_op_take(r.u, op, r.result) == 1 and r.result.res > 0 then
            local s = ffi_string(scratch.ptr, r.result.res)
            local parts = self.parts
            if parts then
                parts[#parts + 1] = s
            else
                self.pending = take_all_pending(self) .. s
            end
        end
        bounce_put(r, scratch)
    end

    -- Up to max bytes of what is pending, or nil.
    local function take_pending(self, max)
        gather(self)
        local p, at = self.pending, self.pending_at
        if at <= #p then
            local s = p:sub(at, at + max - 1)
            at = at + #s
            if at > #p then
                self.pending, self.pending_at = "", 1
            else
                self.pending_at = at
            end
            return s
        end
        return nil
    end

    -- A stream has one reader at a time: a recv next to a recv_exact
    -- would hand out the bytes the recv_exact had gathered, which it then
    -- returned too.  (reader: the task in a receive; waiting_for covers one
    -- that left it by raising.)
    local function claim_reader(self, t, fname)
        local rd = self.reader
        if rd and rd ~= t and rd.live and rd.waiting_for == self then
            error(format("%s: %s is receiving on this socket already (%s): a stream has one reader at a time",
                         fname, tostring(rd), self.name), 3)
        end
        self.reader = t
    end

    local function release_reader(self, ...)
        self.reader = false
        return ...
    end

    -- recv and recv_exact: the checks, the one reader, then body.  (Tail
    -- called: the errors name the user's line.)
    local function receive(self, fname, argname, n, min, body)
        live(fname, self, TcpSocket, "a socket")
        check.integer(fname, argname, n, min, MAX_IO)
        local t, r = receive_context(fname)
        home(fname, self, r)
        claim_reader(self, t, fname)
        return release_reader(self, body(self, t, r, n))
    end

    -- recv(max): up to max bytes as soon as some arrive (at most
    -- RECV_CHUNK from the kernel at a time); nil, "closed" when the peer
    -- closed the connection.
    local function recv(self, t, r, max)
        local s = take_pending(self, max)
        if s then
            return s
        end
        if has_rescues(self) then   -- (their bytes come after those pending)
            take_rescues(self, t, r, "TcpSocket:recv")
            if self.fd < 0 then     -- another task closed it meanwhile
                return failed("recv", self, ECANCELED)
            end
            s = take_pending(self, max)
            if s then
                return s
            end
        end
        local rc, note
        s, rc, note = recv_raw(self, t, r, math.min(max, RECV_CHUNK))
        if note then            -- no scratch memory
            local _, msg, code = failed("recv", self, rc)
            return nil, msg .. note, code
        elseif rc < 0 then
            return failed("recv", self, rc)
        elseif rc == 0 then
            return nil, "closed", "EOF"
        end
        return s
    end

    function TcpSocket:recv(max)
        return receive(self, "TcpSocket:recv", "max", max, 1, recv)
    end

    -- recv_exact(n): exactly n bytes, or nil, err, code, bytes_received
    -- (the bytes that did arrive before the peer closed or reset the
    -- connection are kept for the next recv).
    local function recv_exact(self, t, r, n)
        gather(self)
        -- the parts live on the socket while they come in: a task killed
        -- here leaves them for the next recv instead of losing them
        local first = take_all_pending(self)
        local parts, have = { first }, #first
        self.parts = parts
        while have < n do
            if has_rescues(self) then   -- a receive killed before this one (or meanwhile)
                take_rescues(self, t, r, "TcpSocket:recv_exact")
                have = #table.concat(parts)
            elseif self.fd < 0 then     -- another task closed it while this one took a piece
                gather(self)
                return failed("recv", self, ECANCELED, have)
            else
                local s, rc, note = recv_raw(self, t, r, math.min(n - have, RECV_CHUNK))
                if rc <= 0 then
                    gather(self)
                    if rc == 0 then
                        return nil, format("recv %s: connection closed after %d of %d bytes", self.name, have, n),
                               "EOF", have
                    end
                    if rc == ECANCELED then     -- closed under it: its bytes went with it
                        return failed("recv", self, rc, have)
                    elseif have == 0 then
                        return core.noted(note or "", failed("recv", self, rc, 0))
                    end
                    -- a reset, a time-out, no scratch memory (note): the bytes
                    -- that came before it are kept, as at the peer's close,
                    -- and the error says so
                    return nil, format("recv %s: %s%s (after %d of %d bytes, kept for the next recv)", self.name,
                                       errstr(rc), note or "", have, n), errname(rc), have
                end
                parts[#parts + 1] = s
                have = have + rc
            end
        end
        self.parts = nil
        local all = table.concat(parts)
        self.pending, self.pending_at = all:sub(n + 1), 1
        return all:sub(1, n)
    end

    function TcpSocket:recv_exact(n)
        return receive(self, "TcpSocket:recv_exact", "n", n, 0, recv_exact)
    end

    -- shutdown([how]): end the sending side ("w", the default), the
    -- receiving side ("r") or both ("rw"); the socket stays open until
    -- close().  "w" and "rw" wait their turn behind the sends under way,
    -- so that what was sent goes out before the peer's recv says "closed".
    local SHUT = { r = 0, w = 1, rw = 2 }   -- SHUT_RD, SHUT_WR, SHUT_RDWR

    local function shutdown(self, t, r, how)
        if self.fd < 0 then         -- another task closed it meanwhile
            return failed("shutdown", self, ECANCELED)
        end
        t.io_rescue = self          -- (given up, it passes the turn on: _rescue)
        local rc = run_op(r, t, C.pl_uring_sock_shutdown(r.u, t.slot, t.gen, self.fd, how), self)
        t.io_rescue = nil
        if rc < 0 then
            return failed("shutdown", self, rc)
        end
        return true
    end

    function TcpSocket:shutdown(how)
        live("TcpSocket:shutdown", self, TcpSocket, "a socket")
        if type(how) == "nil" then      -- (not == nil: a NULL pointer equals nil)
            how = "w"
        end
        local shut = SHUT[how]
        if not shut then
            error(format("TcpSocket:shutdown: how must be \"w\", \"r\" or \"rw\" (got %s)", check.show(how)), 2)
        end
        local t, r = context("TcpSocket:shutdown")
        home("TcpSocket:shutdown", self, r)
        if shut == SHUT.r then
            return shutdown(self, t, r, shut)
        end
        claim_writer(self, t, "TcpSocket:shutdown")
        return release_writer(self, t, shutdown(self, t, r, shut))
    end

    -- keepalive(idle[, interval[, count]]) or keepalive(false): see
    -- pl_net_keepalive.  A dead peer or link ends an idle connection within
    -- idle + interval * count seconds (ETIMEDOUT).
    function TcpSocket:keepalive(idle, interval, count)
        live("TcpSocket:keepalive", self, TcpSocket, "a socket")
        if idle == false then
            if type(interval) ~= "nil" or type(count) ~= "nil" then  -- (taken for a setting, and dropped)
                error("TcpSocket:keepalive: keepalive(false) turns keepalive off and takes no interval or count", 2)
            end
            idle, interval, count = 0, 0, 0
        else
            check.integer("TcpSocket:keepalive", "idle", idle, 1, MAX_KEEPIDLE)
            if type(interval) == "nil" then     -- (not == nil: a NULL pointer equals nil)
                interval = idle
            end
            check.integer("TcpSocket:keepalive", "interval", interval, 1, MAX_KEEPIDLE)
            if type(count) == "nil" then
                count = 3
            end
            check.integer("TcpSocket:keepalive", "count", count, 1, MAX_KEEPCNT)
        end
        local rc = C.pl_net_keepalive(self.fd, idle, interval, count)
        if rc < 0 then
            return failed("keepalive on", self, rc)
        end
        return true
    end

    function TcpSocket:peer()
        if getmetatable(self) ~= TcpSocket then
            error("TcpSocket:peer: call it as a method on a socket", 2)
        end
        return self.name
    end

    function TcpSocket:close()
        if getmetatable(self) ~= TcpSocket then
            error("TcpSocket:close: call it as a method on a socket", 2)
        end
        if self.fd < 0 then return false end
        return close_socket(self, "TcpSocket:close")
    end
end

return M
