-- pluvio.uring_net: sockets over the io_uring reactor, part of pluvio.uring:
-- what TCP (uring_tcp.lua) and UDP share (addresses, failures, receives
-- stopped by a kill, close), and UDP (uring.udp_bind).
-- Binding needs an address: nothing listens on a wildcard unless asked.
-- A name may have several addresses: tcp_connect tries each in turn, a
-- listener or UDP socket binds the first, send_to sends to the first of
-- the socket's own family.
local pluvio = require "pluvio"
local core = require "pluvio.core"
local check = require "pluvio.check"

local ffi, C = core.ffi, core.C
local format, type, setmetatable, getmetatable = string.format, type, setmetatable, getmetatable
local ffi_string = ffi.string
local errstr = core.errstr
local host_port = check.host_port
local co_yield = coroutine.yield
local wake, park, yielded, WAIT = pluvio._wake, pluvio._park, pluvio._yielded, pluvio._WAIT
local WAIT_OTHER = pluvio._WAIT_KIND.OTHER
local walk = next          -- walk tables with `for k, v in walk, t`, not pairs(): see task.lua

local M = {}

local ENXIO, EAFNOSUPPORT, ECANCELED, ENETUNREACH, EINVAL = -6, -97, -125, -101, -22
local MAX_ADDRS = 16        -- the most of a name's addresses tcp_connect tries

local function errname(rc)
    return ffi_string(C.pl_errname(rc))
end

local namebuf = ffi.new("char[80]")
-- Resolved addresses for the calls that use them before they yield (bind,
-- listen, send_to: the op copies its address); tcp_connect has its own.
local addrs = ffi.new("pl_net_addr_t[?]", MAX_ADDRS)

local function addr_text(a)
    C.pl_net_addr_text(a, namebuf, 80)
    return ffi_string(namebuf)
end

local function sock_name(fd, which)
    if C.pl_net_name(fd, which, namebuf, 80) < 0 then
        return "?"
    end
    return ffi_string(namebuf)
end

-- A bound socket's port or address as port() and address() give them, or
-- nil, err, code when the kernel cannot say (getsockname failed).
local function unreadable(fname, obj, rc)
    return nil, format("%s: cannot read the address of %s: %s", fname, obj.name, errstr(rc)), errname(rc)
end

local function bound_port(fname, obj)
    local port = C.pl_net_local_port(obj.fd)
    if port < 0 then
        return unreadable(fname, obj, port)
    end
    return port
end

local function bound_address(fname, obj)
    local rc = C.pl_net_name(obj.fd, 0, namebuf, 80)
    if rc < 0 then
        return unreadable(fname, obj, rc)
    end
    return ffi_string(namebuf)
end

-- min: 0 where the port is bound (0: any free one), 1 where it is a
-- destination (the kernel says ECONNREFUSED or EINVAL for port 0)
local function check_port(fname, port, min)
    min = min or 0
    if type(port) ~= "number" or port ~= port or port % 1 ~= 0 or port < min or port > 65535 then
        error(format("%s: port must be %san integer from %d to 65535 (got %s)", fname,
                     min == 1 and "the peer's port, " or "", min, check.show(port)), 3)
    end
end

-- What a send takes: a string, said with the value a number or boolean
-- had (send(123) sends nothing, not "123": convert it with tostring).
local function check_data(fname, data)
    if type(data) ~= "string" then
        local v = type(data)
        if v == "number" or v == "boolean" then
            v = v .. " " .. check.show(data)
        end
        error(format("%s: data must be a string (got %s)", fname, v), 3)
    end
end

function M.install(U)
    local I = U._internal
    local context, run_op, bounce_get, bounce_put = I.context, I.run_op, I.bounce_get, I.bounce_put
    local op_context = I.op_context
    local receive_context = I.receive_context
    local run_ended, close_idle, close_guard, forget_fd = I.run_ended, I.close_idle, I.close_guard, I.forget_fd
    local left_busy = I.left_busy

    local TcpListener = {}
    TcpListener.__index = TcpListener
    U.TcpListener = TcpListener

    local TcpSocket = {}
    TcpSocket.__index = TcpSocket
    U.TcpSocket = TcpSocket

    local UdpSocket = {}
    UdpSocket.__index = UdpSocket
    U.UdpSocket = UdpSocket

    local WILDCARD = "wildcard"     -- (bind_addr's refusal of a short form of 0.0.0.0)

    -- nil, message, errno name[, bytes done before the error]
    -- A failure naming host:port (note: which of its addresses, when it has
    -- several); ENXIO is the lookup's own (uring_net.c).
    -- A link-local IPv6 address (fe80::/10) names no interface by itself:
    -- the kernel refuses it without one (EINVAL), which says nothing of why.
    local function zone_note(host, rc)
        if rc == EINVAL and host:lower():find("^fe[89ab]%x:") and not host:find("%", 1, true) then
            return " (a link-local IPv6 address needs its interface: " .. host .. "%eth0, say)"
        end
        return ""
    end

    local function host_failed(what, host, port, rc, note)
        note = (note or "") .. zone_note(host, rc)
        if rc == WILDCARD then
            return check.wildcard_refused(what, host, port)
        end
        if rc == ENXIO then
            return nil, format("%s %s: cannot resolve host %s (names are looked up with " ..
                               "getaddrinfo: a numeric address or one from /etc/hosts)", what,
                               host_port(host, port), check.show(host)), "ENXIO"
        end
        return nil, format("%s %s: %s%s", what, host_port(host, port), errstr(rc), note), errname(rc)
    end

    -- The address of host:port a listener or UDP socket binds: the first
    -- getaddrinfo gives, so that the socket is on one address the caller
    -- named; also how many the name has (for an error's note), or nil, rc.
    local function bind_addr(host, port, udp)
        local n = C.pl_net_resolve(host, port, udp, 0, addrs, 1)
        if n < 0 then
            return nil, n
        end
        if C.pl_net_unasked_wildcard(host, addrs[0]) == 1 then
            return nil, WILDCARD
        end
        return addrs[0], n
    end

    local function bind_note(addr, n)
        return n > 1 and format(" (at %s, the first of its %d addresses)", addr_text(addr), n) or ""
    end

    local function failed(what, obj, rc, bytes)
        local done = bytes and bytes > 0 and format(" (%d bytes done before the error)", bytes) or ""
        if rc == ECANCELED then     -- closed under it
            return nil, format("%s %s: the socket was closed%s", what, obj.name, done), "ECANCELED", bytes
        end
        return nil, format("%s %s: %s%s", what, obj.name, errstr(rc), done), errname(rc), bytes
    end

    local function method_of(fname, obj, mt, what, level)
        if getmetatable(obj) ~= mt then
            error(format("%s: call it as a method on %s; got %s as self", fname, what, type(obj)), level)
        end
    end

    local function live(fname, obj, mt, what)
        method_of(fname, obj, mt, what, 4)
        if obj.fd < 0 then
            error(fname .. ": the socket is closed (" .. obj.name .. ")", 3)
        end
        return obj
    end

    -- A socket belongs to the runtime it was made in: its ops go to that
    -- runtime's ring, whose cancels (a close's) and stopped receives another
    -- ring knows nothing of (a close from there would leave a task of its
    -- own runtime parked in a recv on the socket for good).
    local function home(fname, obj, r)
        if r ~= obj.reactor then
            error(format("%s: %s was made in another runtime (its io_uring reactor is that runtime's): " ..
                         "use it there", fname, obj.name), 3)
        end
    end

    -- Receives whose task was killed before they finished are stopped,
    -- not given up (see _rescue): what they got is the stream's next bytes
    -- (or the next datagram, or an accept's connection).  The kill does not
    -- wait for the kernel: the socket keeps them, in kill order, in self.rescues ({ op, scratch,
    -- adopter }), and its next receive waits for them to end and takes what
    -- they got before it receives anything new.  One task at a time waits
    -- on such an op (the adopter: its completion wakes that task); other
    -- receivers wait in self.rescue_waiters until it is done or killed.
    local track_rescues     -- (below)
    local function stop_receive(self, r, op, scratch)
        local rc = C.pl_uring_op_cancel(r.u, op)
        if rc == 1 then                 -- done already: its result now
            self:_keep(r, op, scratch)
            return true
        elseif rc < 0 then
            return false
        end
        local list = self.rescues
        if not list then
            list = {}
            self.rescues = list
            track_rescues(self, r, list)
        end
        list[#list + 1] = { op = op, scratch = scratch }
        r.pins[op] = scratch            -- the kernel may fill it until the cancel lands
        return true
    end
    TcpListener._rescue = stop_receive
    -- A TCP send whose task was killed is stopped the same way, so that the
    -- socket learns how much of it went out (TcpSocket:_keep): part of a
    -- message cuts the stream, which later sends then say.
    TcpSocket._rescue = stop_receive
    UdpSocket._rescue = stop_receive

    local function wake_rescue_waiters(self)
        local w = self.rescue_waiters
        if w and w[1] then
            self.rescue_waiters = {}
            for i = 1, #w do
                wake(w[i])
            end
        end
    end

    -- Wait for the stopped receives of the socket, oldest first, and keep
    -- what they got (_keep); the caller then checks that the socket is
    -- still open.
    local function take_rescues(self, t, r, fname)
        local list, u = self.rescues, r.u
        while list[1] do
            local e = list[1]
            local other = e.adopter
            if other and other ~= t and other.live then     -- wait for that task
                local w = self.rescue_waiters or {}
                self.rescue_waiters = w
                w[#w + 1] = t
                t.wait_obj = self
                park(t, WAIT_OTHER, 0, self, fname)
                t.wait_obj = nil
            else
                local seq = t.io_seq
                local rc = C.pl_uring_op_adopt(u, e.op, t.slot, t.gen)
                if rc == 0 then
                    e.adopter = t
                    t.wait_obj = self   -- a kill here passes the wait on (_abandon_wait)
                    t.waiting_for = self
                    repeat              -- (adopt parked the task in C)
                        yielded(t, co_yield(WAIT), fname, seq)
                        rc = C.pl_uring_op_adopt(u, e.op, t.slot, t.gen)
                    until rc ~= 0
                    t.wait_obj, t.waiting_for = nil, nil
                    e.adopter = nil
                end
                table.remove(list, 1)
                if rc == 1 then
                    r.pins[e.op] = false
                    self:_keep(r, e.op, e.scratch)
                end
                wake_rescue_waiters(self)
            end
        end
    end

    -- A closed socket's stopped receives (the close cancelled them): their
    -- results go nowhere.  One a task waits on is left to that task, which
    -- then finds the socket closed.
    local function drop_rescues(self, r)
        local list = self.rescues
        if not (list and list[1]) then
            return
        end
        local u, kept = r.u, 0
        for i = 1, #list do             -- (in place: track_rescues holds the list)
            local e = list[i]
            list[i] = nil
            local other = e.adopter
            if other and other.live then
                kept = kept + 1
                list[kept] = e
            else
                r.pins[e.op] = false
                local gen = C.pl_uring_op_gen(u, e.op)
                local done = C.pl_uring_op_settled(u, e.op, gen) == 1
                C.pl_uring_op_abandon(u, e.op)  -- (done: freed now, an accept's connection closed)
                if done then
                    if type(e.scratch) == "table" then bounce_put(r, e.scratch) end   -- (a send's: its string)
                else                    -- the kernel has it yet: the scratch waits in the limbo
                    r.limbo[#r.limbo + 1] = { op = e.op, gen = gen, keep = e.scratch }
                end
            end
        end
        wake_rescue_waiters(self)
    end

    -- A socket left to the garbage collector with stopped receives never
    -- took or dropped them: each kept its op slot, its pin and scratch
    -- memory (an accept's connection too) for the reactor's life.  The
    -- reactor keeps every socket's list, and drops those of collected
    -- sockets as close would have, whenever the lists have doubled since
    -- the last look.
    track_rescues = function(self, r, list)
        local owners, lists = r.rescue_owners, r.rescue_lists
        if not owners then
            owners, lists = setmetatable({}, { __mode = "k" }), {}
            r.rescue_owners, r.rescue_lists, r.rescue_lists_n, r.rescue_sweep_at = owners, lists, 0, 64
        end
        if r.rescue_lists_n >= r.rescue_sweep_at then
            local live, n = {}, 0
            for _, l in walk, owners do
                live[l] = true
            end
            for l in walk, lists do
                if live[l] then
                    n = n + 1
                else
                    lists[l] = nil
                    drop_rescues({ rescues = l }, r)
                end
            end
            r.rescue_lists_n, r.rescue_sweep_at = n, n < 32 and 64 or 2 * n
        end
        owners[self] = list
        lists[list] = true
        r.rescue_lists_n = r.rescue_lists_n + 1
    end

    -- A task waiting in take_rescues was killed: if it waited on the op,
    -- another waiter takes over (or, on a closed socket, nobody).
    local function abandon_rescue_wait(self, t)
        local w = self.rescue_waiters
        for i = w and #w or 0, 1, -1 do
            if w[i] == t then
                table.remove(w, i)
            end
        end
        for _, e in ipairs(self.rescues) do
            if e.adopter == t then
                e.adopter = nil
            end
        end
        if self.fd < 0 then         -- closed: nobody will take what it waited for
            drop_rescues(self, self.reactor)
        end
        wake_rescue_waiters(self)
    end
    TcpListener._abandon_wait = abandon_rescue_wait
    TcpSocket._abandon_wait = abandon_rescue_wait
    UdpSocket._abandon_wait = abandon_rescue_wait

    -- Whether the socket has stopped receives to take first.
    local function has_rescues(self)
        local list = self.rescues
        return list ~= nil and list[1] ~= nil
    end

    -- Close: cancel what other tasks wait for on the fd, then close it (one
    -- op, so that a kill while it waits cannot leave the socket open).
    -- also(obj), if given, once the close goes ahead (a refused one leaves
    -- the socket as it was).
    local function close_socket(obj, fname, also)
        local home_r, rc = obj.reactor, nil
        local ended = run_ended(home_r)
        if ended then                   -- at once, as a file's close
            rc = close_idle(home_r, obj.fd)
            if rc then                  -- (refused, the socket stays as it was: its next
                drop_rescues(obj, home_r)   -- receive takes what they got; closed, nobody will)
            end
        end
        if rc and also then
            also(obj)
        end
        if rc then
            forget_fd(obj)
            if rc < 0 then
                return failed("close", obj, rc)
            end
            return true
        end
        if ended then
            error(left_busy(fname, obj.name), 2)   -- (our callers tail-call us)
        end
        local t, r = context(fname)
        home(fname, obj, r)
        local fd = obj.fd
        local op = C.pl_uring_close_socket(r.u, t.slot, t.gen, fd)
        if op < 0 then      -- not started (no SQE, no op slot): still open, to close again
            return failed("close", obj, op)
        end
        forget_fd(obj)
        if also then
            also(obj)
        end
        -- before the wait: a closer killed there never came back to drop
        -- them, and a listener's connection an accept had taken stayed open
        -- (the close's cancel ends the ops; dropped, they close what they get)
        drop_rescues(obj, r)
        local rc = run_op(r, t, op, obj)
        if rc < 0 then
            return failed("close", obj, rc)
        end
        return true
    end

    -- (a closed one too: rt:tasks() may show a task still parked on it)
    function TcpListener:describe()
        method_of("TcpListener:describe", self, TcpListener, "a listener", 3)
        return "accept on " .. self.name
    end
    function TcpSocket:describe()
        method_of("TcpSocket:describe", self, TcpSocket, "a socket", 3)
        return "tcp " .. self.name
    end
    function UdpSocket:describe()
        method_of("UdpSocket:describe", self, UdpSocket, "a UDP socket", 3)
        return "udp " .. self.name
    end

    -- udp_bind(host, port): a datagram socket bound to host:port (a name
    -- with several addresses: the first).
    function U.udp_bind(host, port)
        host = check.host("uring.udp_bind", host)
        check_port("uring.udp_bind", port)
        local t, r, code = op_context("uring.udp_bind")
        if not t then
            return nil, r, code
        end
        local addr, n = bind_addr(host, port, 1)
        if not addr then
            return host_failed("bind", host, port, n)
        end
        local fd = C.pl_net_udp_bind(addr)
        if fd < 0 then
            return host_failed("bind", host, port, fd, bind_note(addr, n))
        end
        -- the largest datagram is its family's: 65535 less the UDP header, and
        -- on IPv4 the IP header too (IPv6 counts its own outside the length)
        local family = C.pl_net_family(fd)
        return setmetatable({ reactor = r, fd = fd, name = sock_name(fd, 0), family = family,
                              max_datagram = family == 6 and 65527 or 65507,
                              held = {}, guard = close_guard(fd) }, UdpSocket)   -- held: see _keep
    end

    function UdpSocket:port()
        live("UdpSocket:port", self, UdpSocket, "a UDP socket")
        return bound_port("UdpSocket:port", self)
    end

    -- address(): the address the socket is bound to (as TcpListener:address).
    function UdpSocket:address()
        live("UdpSocket:address", self, UdpSocket, "a UDP socket")
        return bound_address("UdpSocket:address", self)
    end

    -- Whether send_to on an IPv6 socket sent to host's IPv4 address, as
    -- IPv4-mapped: the kernel says ENETUNREACH for it from a socket bound
    -- to an IPv6 address (IPv6 only), not to "::".  Resolved again: the
    -- send yielded, and addrs is shared.
    local function v4_mapped(s, host, port)
        return s.family == 6 and C.pl_net_resolve(host, port, 1, 6, addrs, 1) > 0 and
               addr_text(addrs[0]):find("^%[::ffff:%d") ~= nil
    end

    -- send_to(data, host, port): one datagram, to the first address of host
    -- of the socket's own family; returns #data or nil, err.
    function UdpSocket:send_to(data, host, port)
        live("UdpSocket:send_to", self, UdpSocket, "a UDP socket")
        check_data("UdpSocket:send_to", data)
        host = check.host("UdpSocket:send_to", host)
        check_port("UdpSocket:send_to", port, 1)
        if #data > self.max_datagram then
            error(format("UdpSocket:send_to: a datagram holds at most %d bytes on an IPv%d socket (got %d)",
                         self.max_datagram, self.family, #data), 2)
        end
        local t, r = context("UdpSocket:send_to")
        home("UdpSocket:send_to", self, r)
        local n = C.pl_net_resolve(host, port, 1, self.family, addrs, 1)
        if n == EAFNOSUPPORT then
            return nil, format("send_to %s: host %s has no IPv%d address (the socket is IPv%d: %s)",
                               host_port(host, port), check.show(host), self.family, self.family, self.name),
                   "EAFNOSUPPORT"
        elseif n < 0 then
            return host_failed("send_to", host, port, n)
        end
        if #data > 65507 and self.family == 6 and addr_text(addrs[0]):find("^%[::ffff:%d") then
            error(format("UdpSocket:send_to: a datagram to an IPv4 address holds at most 65507 bytes " ..
                         "(got %d, to %s)", #data, host_port(host, port)), 2)
        end
        local rc = run_op(r, t, C.pl_uring_sendto(r.u, t.slot, t.gen, self.fd, data, #data, addrs[0]), self,
                          data)
        if rc < 0 then
            if rc == ENETUNREACH and v4_mapped(self, host, port) then
                return nil, format("send_to %s: host %s has no IPv6 address (the socket is IPv6: %s; " ..
                                   "only one bound to \"::\" reaches IPv4 addresses)",
                                   host_port(host, port), check.show(host), self.name), "EAFNOSUPPORT"
            end
            local none, err, code, bytes = failed("send_to " .. host_port(host, port) .. " from", self, rc)
            return none, err .. zone_note(host, rc), code, bytes
        end
        return rc
    end

    -- A datagram as recv_from returns it: data (at most max bytes of it),
    -- the sender's host and port, and its whole length if data is shorter.
    local function datagram(s, from, len, max)
        if #s > max then
            s = s:sub(1, max)
        end
        local host, port = from:match("^%[?(.-)%]?:(%d+)$")
        if len > #s then            -- it did not fit: say so, and how long it was
            return s, host, tonumber(port), len
        end
        return s, host, tonumber(port)
    end

    -- A stopped recv_from ended (see stop_receive): its datagram is held
    -- for the next recv_from, as what the peer sent is never dropped unseen.
    function UdpSocket:_keep(r, op, scratch)
        if C.pl_uring_op_peer(r.u, op, namebuf, 80) == 0 then
            local from = ffi_string(namebuf)
            C.pl_uring_op_take(r.u, op, r.result)
            local len = r.result.res        -- the datagram's whole length (MSG_TRUNC)
            if len >= 0 then
                local held = self.held
                held[#held + 1] = { ffi_string(scratch.ptr, math.min(len, scratch.len)), from, len }
            end
        end
        bounce_put(r, scratch)
    end

    -- recv_from(max): the next datagram and the sender's host and port; a
    -- datagram longer than max comes as its first max bytes, host, port and
    -- its whole length (the rest is gone: UDP keeps no remainder).
    function UdpSocket:recv_from(max)
        live("UdpSocket:recv_from", self, UdpSocket, "a UDP socket")
        check.integer("UdpSocket:recv_from", "max", max, 1, 65536)
        local t, r = receive_context("UdpSocket:recv_from")
        home("UdpSocket:recv_from", self, r)
        local held = self.held
        if not held[1] and has_rescues(self) then   -- (their datagrams come after those held)
            take_rescues(self, t, r, "UdpSocket:recv_from")
            if self.fd < 0 then     -- another task closed it meanwhile
                return failed("recv_from", self, ECANCELED)
            end
        end
        if held[1] then
            local d = table.remove(held, 1)
            return datagram(d[1], d[2], d[3], max)
        end
        local scratch, err = bounce_get(r, max)
        if not scratch then
            return core.noted(core.no_scratch(max), failed("recv_from", self, err))
        end
        scratch.len = max                   -- what the kernel may fill, for _keep
        local op = C.pl_uring_recvfrom(r.u, t.slot, t.gen, self.fd, scratch.ptr, max)
        if op < 0 then
            bounce_put(r, scratch)
            return failed("recv_from", self, op)
        end
        -- the sender's address is read from the op before its result is taken
        if op >= I.OP_INLINE then   -- done inside its submission: the task was not parked
            op = op - I.OP_INLINE
            C.pl_uring_op_peer(r.u, op, namebuf, 80)
        else
            t.io_reactor, t.io_op, t.io_keep, t.io_rescue, t.waiting_for = r, op, scratch, self, self
            r.pins[op] = scratch
            local seq = t.io_seq
            I.yielded(t, coroutine.yield(I.WAIT), "UdpSocket:recv_from", seq)  -- the op start parked the task
            while C.pl_uring_op_peer(r.u, op, namebuf, 80) ~= 0 do
                I.park(t, I.WAIT_IO, op, self)     -- a spurious wake-up
            end
            t.io_reactor, t.io_keep, t.io_rescue, t.waiting_for = nil, nil, nil, nil
            r.pins[op] = false
        end
        local from = ffi_string(namebuf)
        local result = r.result
        C.pl_uring_op_take(r.u, op, result)
        local rc = result.res       -- the datagram's whole length (MSG_TRUNC)
        local s = rc >= 0 and ffi_string(scratch.ptr, math.min(rc, max)) or nil
        bounce_put(r, scratch)
        if rc < 0 then
            return failed("recv_from", self, rc)
        end
        return datagram(s, from, rc, max)
    end

    function UdpSocket:close()
        if getmetatable(self) ~= UdpSocket then
            error("UdpSocket:close: call it as a method on a UDP socket", 2)
        end
        if self.fd < 0 then return false end
        return close_socket(self, "UdpSocket:close")
    end

    -- What TCP (uring_tcp.lua) builds on.
    I.errname, I.addr_text, I.sock_name = errname, addr_text, sock_name
    I.bound_port, I.bound_address, I.check_port, I.check_data = bound_port, bound_address, check_port, check_data
    I.host_failed, I.bind_addr, I.bind_note, I.failed = host_failed, bind_addr, bind_note, failed
    I.live, I.home, I.take_rescues, I.has_rescues, I.close_socket = live, home, take_rescues, has_rescues, close_socket
end

return M
