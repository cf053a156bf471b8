-- pluvio.ucx_endpoint: connections of the UCX reactor, part of pluvio.ucx:
-- endpoints (worker:connect_addr, connect_socket), listeners
-- (worker:create_listener, accept) and what goes out on an endpoint:
-- am_send, am_send_nb and its handles, tag_send, flush, close.  Installed
-- into pluvio.ucx, whose workers and operations it builds on.
local pluvio = require "pluvio"
local core = require "pluvio.core"
local check = require "pluvio.check"

local ffi, C = core.ffi, core.C
local park, current_task, io_task = pluvio._park, pluvio._current_task, pluvio._io_task
local WAIT_IO, WAIT_OTHER, WAIT_ACCEPT = pluvio._WAIT_KIND.IO, pluvio._WAIT_KIND.OTHER, pluvio._WAIT_KIND.ACCEPT
local errstr = core.errstr
local host_port = check.host_port
local ffi_string = ffi.string
local walk = next          -- walk tables with `for k, v in walk, t`, not pairs(): see task.lua
local type, format, setmetatable, getmetatable = type, string.format, setmetatable, getmetatable

local M = {}

local ENXIO, EBADF, EAGAIN, ENOMEM, ENODEV, EINVAL, EMFILE = -6, -9, -11, -12, -19, -22, -24
local EBADMSG, EOPNOTSUPP, EAFNOSUPPORT, EADDRINUSE, ECONNRESET, ENOTCONN = -74, -95, -97, -98, -104, -107
local ECONNREFUSED, ECANCELED = -111, -125
local MAX_AM_ID = 255
local EOPSFULL = -C.PL_EOPSFULL     -- the worker's op table is full (as ENOMEM: no op slot)
local Buffer = require("pluvio.uring").Buffer

function M.install(U)
    local I = U._internal
    local errname, CLOSED, why, fail = I.errname, I.CLOSED, I.why, I.fail
    local OTHER_PEER_ERRORS, keep_stuck, hold, unhold = I.OTHER_PEER_ERRORS, I.keep_stuck, I.hold, I.unhold
    local kept, keep_or_unhold, abandon_op, run_op = I.kept, I.keep_or_unhold, I.abandon_op, I.run_op
    local live_worker, tag_value, progress_note = I.live_worker, I.tag_value, I.progress_note
    local Worker, Endpoint, Listener = U.Worker, U.Endpoint, U.Listener

    -- A table is full (endpoints, listeners) or a port taken: failed
    -- endpoints and listeners nothing refers to any more are freed by their
    -- collection (drop_guard), so connects, accept and listen try once more
    -- after a full collection.
    local collect_dropped = pluvio._full_collect

    local function no_ep_room(w, what)
        return nil, format("%s: this worker has at most %d endpoints open, reply endpoints included (close one first)",
                           what, w.max_endpoints), "EMFILE"
    end

    -- A connect's EMFILE: the worker's endpoints are all taken, or the
    -- process's file descriptors (C checks there is room for a few).
    local function connect_emfile(w, what)
        if not w.w or C.pl_ucx_worker_ep_room(w.w) == 0 then
            return no_ep_room(w, what)
        end
        local _, msg, name = fail(what, EMFILE)
        return nil, msg .. " (a connection takes a few file descriptors: close files, " ..
                    "or raise the limit, ulimit -n)", name
    end

    -- What C is told when an endpoint's or a listener's object is collected
    -- (drop: pl_ucx_ep_drop or pl_ucx_listener_drop, with its handle).  The
    -- guard holds the handle, -1 once the object was closed (so that a late
    -- finalizer cannot drop an entry reused since); it refers to neither the
    -- object nor w, nor w's C worker (by its address only): a finalizer
    -- keeps what it refers to alive for one more collection, so a dropped
    -- worker with such a guard on it was freed a collection late, and a
    -- create_worker that found the reactor's 32 slots full still found them
    -- full after its collection.  life.open says the address is still the
    -- worker's (its finalizer clears it before the worker is freed).
    local worker_ptr = ffi.typeof("pl_ucx_worker_t *")
    local function drop_guard(w, drop, h)
        local addr, life = ffi.cast("uintptr_t", w.w), w.life
        return ffi.gc(ffi.new("int[1]", h), function(g)
            if life.open and g[0] >= 0 then drop(ffi.cast(worker_ptr, addr), g[0]) end
        end)
    end

    -- An endpoint nothing refers to any more stays open (its peer may still
    -- send to the worker's streams: a server that only receives keeps no
    -- reference to the endpoints it accepted), but once it fails its entry is
    -- freed (C: pl_ucx_ep_drop), so that peers that come and go do not fill
    -- the worker's table.
    local function new_endpoint(w, h, peer)
        local ep = setmetatable({ worker = w, h = h, peer = peer }, Endpoint)
        ep.guard = drop_guard(w, C.pl_ucx_ep_drop, h)
        w.eps[ep] = true
        return ep
    end

    -- connect_addr(addr[, {peer_errors = false}]): an endpoint to the worker
    -- whose address() is addr.  peer_errors = true reports a failed peer
    -- (UCP_ERR_HANDLING_MODE_PEER), but UCX 1.13 then uses no shared-memory
    -- transport; by default the fastest transports are used and a peer's
    -- failure is not detected (use connect_socket for that).
    function Worker:connect_addr(addr, opts)
        live_worker("Worker:connect_addr", self)
        check.string("Worker:connect_addr", "addr", addr)
        if #addr == 0 then
            error("Worker:connect_addr: addr must be a worker address from Worker:address() (got \"\")", 2)
        end
        local peer_errors = false
        if type(opts) ~= "nil" then     -- (not ~= nil: a NULL pointer equals nil)
            if type(opts) ~= "table" then
                error("Worker:connect_addr: options must be a table (got " .. type(opts) .. ")", 2)
            end
            for k, v in walk, opts do
                if k ~= "peer_errors" then
                    error("Worker:connect_addr: unknown option " .. check.show(k) .. " (known: peer_errors)", 2)
                end
                if type(v) ~= "boolean" then
                    error("Worker:connect_addr: peer_errors must be a boolean (got " .. check.show(v) .. ")", 2)
                end
                peer_errors = v
            end
        end
        local h = C.pl_ucx_connect_addr(self.w, addr, #addr, peer_errors and 1 or 0)
        if h == EMFILE then
            collect_dropped()
            h = C.pl_ucx_connect_addr(self.w, addr, #addr, peer_errors and 1 or 0)
        end
        if h == EINVAL then
            return nil, "connect_addr: addr is not a UCX worker address (from Worker:address())", "EINVAL"
        elseif h == EBADMSG then
            return nil, "connect_addr: addr is damaged: its bytes are not those Worker:address() returned " ..
                        "(its checksum does not match)", "EBADMSG"
        elseif h == EMFILE then
            return connect_emfile(self, "connect_addr")
        elseif h == EOPNOTSUPP then
            return nil, "connect_addr: EOPNOTSUPP: the peer's endpoint to this worker " .. OTHER_PEER_ERRORS, "EOPNOTSUPP"
        elseif h < 0 then
            return fail("connect_addr", h)
        end
        local ep = new_endpoint(self, h, "worker address")
        if peer_errors then
            -- UCX 1.13 frees the receiver's side of such a connection without
            -- telling anyone when this process fails: a reply endpoint it
            -- handed out would then point at freed memory or another peer
            ep.no_reply = true
        end
        return ep
    end

    -- A host the resolver does not know: said as the io_uring sockets say it.
    local function unresolved(what, host, port)
        return nil, format("%s %s: cannot resolve host %s (names are looked up with getaddrinfo: " ..
                           "a numeric address or one from /etc/hosts)", what, host_port(host, port), check.show(host)),
               "ENXIO"
    end

    -- A host with IPv6 addresses only (see resolve in src/ucx_conn.c).
    local function ipv6_refused(what, host, port)
        return nil, format("%s %s: UCX 1.13 is not given IPv6 addresses (its tcp connection manager overruns a " ..
                           "buffer with them): name an IPv4 address", what, host_port(host, port)), "EAFNOSUPPORT"
    end

    -- min: 0 for a listener (any free port), 1 for connect_socket's peer
    local function check_port(fname, port, min)
        if type(port) ~= "number" or port % 1 ~= 0 or port < min or port > 65535 then
            error(format("%s: port must be %san integer from %d to 65535 (got %s)", fname,
                         min == 1 and "the peer's port, " or "", min, check.show(port)), 3)
        end
    end

    -- connect_socket(host, port): an endpoint to a listener; returns once the
    -- connection is wired up (or nil, err).
    function Worker:connect_socket(host, port)
        live_worker("Worker:connect_socket", self)
        host = check.host("Worker:connect_socket", host)
        check_port("Worker:connect_socket", port, 1)
        local t = current_task("Worker:connect_socket")
        local hout = ffi.new("int[1]", -1)
        local what = "connect to " .. host_port(host, port)
        local rc = C.pl_ucx_connect_socket(self.w, host, port, hout, t.slot, t.gen)
        if rc == EMFILE and hout[0] < 0 then
            collect_dropped()
            rc = C.pl_ucx_connect_socket(self.w, host, port, hout, t.slot, t.gen)
        end
        local h = hout[0]
        t.io_abort_ep = h >= 0 and h or nil    -- a kill meanwhile aborts it (Worker:_abandon)
        rc = run_op(self, t, rc, what)
        t.io_abort_ep = nil
        if rc < 0 then
            if h >= 0 and self.w then   -- the endpoint exists but never came up: drop it
                local st = C.pl_ucx_ep_status(self.w, h)
                if st < 0 and rc ~= CLOSED then
                    rc = st             -- what the endpoint's error handler recorded, not the flush's
                end
                C.pl_ucx_ep_abort(self.w, h)
            end
            if rc == ENXIO then
                return unresolved("connect to", host, port)
            elseif rc == EAFNOSUPPORT then
                return ipv6_refused("connect to", host, port)
            end
            local fname = what
            if rc == EMFILE then
                return connect_emfile(self, fname)
            end
            if rc == ENOTCONN or rc == ECONNREFUSED then    -- UCX 1.13 says ENOTCONN for a refusal
                local _, msg, name = fail(fname, rc)
                return nil, msg .. " (refused: is a listener open there?)", name
            end
            return fail(fname, rc)
        end
        return new_endpoint(self, h, ffi_string(C.pl_ucx_ep_peer(self.w, h)))
    end

    -- A worker's table of listeners has room for this many (UCX_MAX_LISTENERS).
    local MAX_LISTENERS = 64

    local function count(t)
        local n = 0
        for _ in walk, t do n = n + 1 end
        return n
    end

    -- create_listener(host, port): accept connections on host:port (port 0:
    -- any free port, see listener:port()).  Binds only where told.
    function Worker:create_listener(host, port)
        live_worker("Worker:create_listener", self)
        host = check.host("Worker:create_listener", host)
        check_port("Worker:create_listener", port, 0)
        local i = C.pl_ucx_listen(self.w, host, port)
        if i == EMFILE or i == EADDRINUSE then
            collect_dropped()
            i = C.pl_ucx_listen(self.w, host, port)
        end
        if i == ENXIO then
            return unresolved("listen on", host, port)
        elseif i == -C.PL_EWILDCARD then
            return check.wildcard_refused("listen on", host, port)
        elseif i == EAFNOSUPPORT then
            return ipv6_refused("listen on", host, port)
        elseif i == ENODEV then     -- (an interface UCX does not use: pl_ucx_listen)
            return nil, format("listen on %s: %s", host_port(host, port), ffi_string(C.pl_ucx_listen_why(self.w))),
                   "ENODEV"
        elseif i == EMFILE and count(self.listeners) >= MAX_LISTENERS then    -- (not the process's fds)
            return nil, format("listen on %s: a worker has at most %d listeners open (close one first)",
                               host_port(host, port), MAX_LISTENERS), "EMFILE"
        elseif i < 0 then
            return nil, format("listen on %s: %s", host_port(host, port), errstr(i)), errname(i)
        end
        -- a listener nothing refers to is closed when collected: no task can
        -- accept on it any more (a task in accept refers to it)
        local guard = drop_guard(self, C.pl_ucx_listener_drop, i)
        local l = setmetatable({ worker = self, i = i, host = host, guard = guard,
                                 bound_port = C.pl_ucx_listener_port(self.w, i) }, Listener)  -- (describe, once closed)
        self.listeners[l] = true
        return l
    end
    ---------------------------------------------------------------------------
    -- Listener
    ---------------------------------------------------------------------------

    local function live_listener(fname, l)
        check.self(fname, l, Listener, "a listener", 4)
        if not l.i or not l.worker.w then
            error(fname .. ": the listener is closed", 3)
        end
        return l
    end

    function Listener:port()
        live_listener("Listener:port", self)
        return C.pl_ucx_listener_port(self.worker.w, self.i)
    end

    -- address(): the address the listener bound, "127.0.0.1:4242" or
    -- "[::1]:4242" (a host name may resolve to several addresses: only the
    -- first is bound), with the port chosen for port 0.
    function Listener:address()
        live_listener("Listener:address", self)
        return ffi_string(C.pl_ucx_listener_address(self.worker.w, self.i))
    end

    -- accept(): the next connection as an endpoint; parks until a client
    -- connects.  Returns nil, err once the listener is closed.  Several
    -- tasks may accept at once: connections go to them in the order they
    -- came to wait (C queues them, each parked with the listener's serial).
    function Listener:accept()
        live_listener("Listener:accept", self)
        local t = current_task("Listener:accept")
        local w = self.worker
        local collected = false
        while true do
            if not w.w then
                return nil, "accept: the worker is closed", "ECANCELED"
            elseif not self.i then
                return nil, "accept: the listener was closed", "EBADF"
            end
            local h = C.pl_ucx_accept(w.w, self.i, t.slot, t.gen)
            if h >= 0 then
                return new_endpoint(w, h, ffi_string(C.pl_ucx_ep_peer(w.w, h)))
            elseif h == EMFILE then     -- (the connection waits for the next accept)
                if collected then
                    return no_ep_room(w, "accept")
                end
                collect_dropped()
                collected = true
            elseif h ~= EAGAIN then
                return nil, "accept: " .. errstr(h), errname(h)
            else
                t.wait_obj = self   -- a kill here passes the turn on (_abandon_wait)
                park(t, WAIT_ACCEPT, C.pl_ucx_listener_serial(w.w, self.i), self, "Listener:accept")
                t.wait_obj = nil
                collected = false   -- (a new connection: a new chance)
            end
        end
    end

    function Listener:_abandon_wait(t)
        if self.i and self.worker.w then
            C.pl_ucx_listener_abandon(self.worker.w, self.i, t.slot, t.gen)
        end
    end

    function Listener:describe()
        check.self("Listener:describe", self, Listener, "a listener")
        return format("accept on %s%s", host_port(self.host, self.bound_port), progress_note(self.worker))
    end

    function Listener:close()
        check.self("Listener:close", self, Listener, "a listener")
        if not self.i or not self.worker.w then
            return false
        end
        C.pl_ucx_listener_close(self.worker.w, self.i)
        self.i = nil
        self.guard[0] = -1
        self.worker.listeners[self] = nil
        return true
    end

    ---------------------------------------------------------------------------
    -- Endpoint
    ---------------------------------------------------------------------------

    local function live_ep(fname, ep)
        check.self(fname, ep, Endpoint, "an endpoint", 4)
        if not ep.h or not ep.worker.w then
            -- say which one the user closed: the endpoint, or its worker with it
            -- (a reply endpoint keeps its handle)
            if ep.h or ep.closed_with_worker then
                error(fname .. ": the worker is closed (and its endpoints with it)", 3)
            end
            error(fname .. ": the endpoint is closed", 3)
        end
        return ep
    end

    local PROTO_FLAGS = { eager = 2, rndv = 4 }

    -- A string, nil (empty) or a registered buffer: pointer and length (len:
    -- bytes of a buffer, all by default).  Errors name the user's line.
    local function payload(fname, name, v, len)
        if type(v) == "nil" or type(v) == "string" then     -- (not == nil: a NULL pointer equals nil)
            if type(len) ~= "nil" then
                error(format("%s: len applies to a registered buffer only (%s is %s)", fname, name,
                             v == nil and "nil" or "a string"), 3)
            end
            return v, v and #v or 0
        elseif getmetatable(v) == Buffer then
            if not v.base then
                error(format("%s: %s is a registered buffer that was released", fname, name), 3)
            end
            local size = v.len
            if type(len) == "nil" then
                len = size
            elseif type(len) ~= "number" or len % 1 ~= 0 or len < 0 or len > size then
                error(format("%s: len must be an integer from 0 to %d (got %s)", fname, size, check.show(len)), 3)
            end
            return v.base, len
        end
        error(format("%s: %s must be a string, nil or a registered buffer (got %s)", fname, name, type(v)), 3)
    end

    -- UCX 1.13 reports a peer whose process died as an endpoint timeout
    -- (ETIMEDOUT) or a reset, whatever the time it took: say what happened.
    local PEER_FAILED = " (the peer failed or the connection to it broke)"

    local function peer_failed(ep)
        local w = ep.worker.w
        return ep.h ~= nil and w ~= nil and C.pl_ucx_ep_status(w, ep.h) < 0
    end

    -- Why the endpoint failed, after its errno text.
    local function failed_note(ep)
        local w, h = ep.worker.w, ep.h
        if C.pl_ucx_ep_status(w, h) == EOPNOTSUPP then
            return " (the peer's endpoint to this worker " .. OTHER_PEER_ERRORS .. ")"
        elseif C.pl_ucx_ep_peer_closed(w, h) == 1 then
            return " (the worker it connects to, in this process, was closed)"
        end
        return PEER_FAILED
    end

    -- started: the send had started (else it failed before UCX took it).
    local function send_failed(ep, what, rc, started)
        local msg, name = why(rc)
        if rc ~= CLOSED and peer_failed(ep) then
            msg = msg .. failed_note(ep)
        elseif rc == ENOMEM and started then    -- the receiver's answer to a rendezvous send
            msg = msg .. " (the receiver could not hold the message: no stream is open for its AM id " ..
                "and 64 messages are held for it already, or it had no memory for it)"
        end
        return nil, format("%s to %s: %s", what, ep.peer, msg), name
    end

    -- am_send and am_send_nb: the checks and the start, in one function that
    -- both tail-call (so that an argument error names the caller's line).
    local Handle = {}
    Handle.__index = Handle
    U.SendHandle = Handle

    -- A send handle's op ended with rc (0 or -errno; CLOSED: the worker was
    -- closed): it lets go of what it kept for UCX.
    local function settle_handle(h, w, rc)
        h.op = rc
        if rc == CLOSED then
            keep_or_unhold(w, h.held1, h.held2)     -- (stuck: UCX kept the op, see Worker:close)
            if w.stuck then keep_stuck(w, h.header, h.data) end
        else
            unhold(h.held1)
            unhold(h.held2)
        end
        h.header, h.data, h.held1, h.held2 = nil, nil, nil, nil
    end

    -- Sends from am_send_nb that nobody waits for: a task keeps the handles of
    -- its sends in flight (t.nb_sends) and, once the list has doubled since the
    -- last look, takes the results of those that completed into their handles
    -- (wait() returns them) and lets go of them.  Else each stayed the task's
    -- until it ended, with its strings, its registered buffers held out of the
    -- pool and its op slot: a long-lived task that did not wait for its sends
    -- ran the pool dry, and after 65,536 every op of the worker failed (ENOMEM).
    local NB_SWEEP_MIN = 8

    local function sweep_sends(t)
        local list, kept = t.nb_sends, 0
        for i = 1, #list do
            local h = list[i]
            list[i] = nil
            if h.op > 0 then    -- not waited for yet
                local w = h.ep.worker
                local ww = w.w
                if not ww then
                    t:_disown(h)
                    settle_handle(h, w, CLOSED)
                elseif C.pl_ucx_op_take(ww, h.op, w.result) ~= 0 then
                    t:_disown(h)
                    settle_handle(h, w, w.result.status)
                else
                    kept = kept + 1
                    list[kept] = h
                end
            end
        end
        t.nb_sweep_at = math.max(NB_SWEEP_MIN, 2 * kept)
    end

    -- The worker w is closing: the sends from am_send_nb nobody has waited
    -- for yet that completed take their results now (wait() returns them),
    -- as a sweep would have; the closed worker's ops go with it, and wait()
    -- said a send the peer had received failed (ECANCELED), a caller that
    -- sent it again sending it twice.  The tasks of the runtimes that may
    -- hold such handles are looked through (once, at the close).
    local function settle_sends_of(w, rts)
        local ww, result = w.w, w.result
        for _, rt in ipairs(rts) do
            for _, t in walk, rt.slots do
                local list = t.nb_sends
                for i = 1, list and #list or 0 do
                    local h = list[i]
                    if h.op > 0 and h.ep.worker == w and C.pl_ucx_op_take(ww, h.op, result) ~= 0 then
                        t:_disown(h)
                        settle_handle(h, w, result.status)
                    end
                end
            end
        end
    end

    local function start_send(fname, nb, ep, id, header, data, need_reply, proto, len)
        live_ep(fname, ep)
        check.integer(fname, "id", id, 0, MAX_AM_ID)
        local hptr, hlen = payload(fname, "header", header)
        local dptr, dlen = payload(fname, "data", data, len)
        if hlen > ep.worker.max_header then
            error(format("%s: header is %d bytes, more than this worker's limit of %d (Worker:max_am_header())",
                         fname, hlen, ep.worker.max_header), 2)
        end
        if type(need_reply) ~= "nil" and type(need_reply) ~= "boolean" then
            error(format("%s: need_reply must be a boolean or nil (got %s)", fname, type(need_reply)), 2)
        end
        if need_reply and ep.no_reply then
            error(format("%s: need_reply is not allowed on an endpoint from connect_addr with peer_errors = true " ..
                         "(UCX 1.13 frees the receiver's reply endpoint without notice if this process fails, " ..
                         "and a reply could reach another process): use connect_socket for replies with peer " ..
                         "failure detection, or connect_addr without peer_errors", fname), 2)
        end
        local flags = need_reply and 1 or 0
        if type(proto) ~= "nil" then
            local f = PROTO_FLAGS[proto]
            if not f then
                error(format('%s: proto must be nil, "eager" or "rndv" (got %s)', fname, check.show(proto)), 2)
            end
            flags = flags + f
        end
        local t = io_task(fname)
        local w = ep.worker
        local rc = C.pl_ucx_am_send(w.w, ep.h, id, hptr, hlen, dptr, dlen, flags, t.slot, t.gen)
        if nb then
            local handle = setmetatable({ ep = ep, op = rc, header = header, data = data, owner = t,
                                          started = rc > 0 }, Handle)
            if rc > 0 then      -- in flight: the task's until it is waited for (or swept)
                handle.held1, handle.held2 = hold(header), hold(data)
                t:_own(handle)
                local list = t.nb_sends
                if not list then
                    list = {}
                    t.nb_sends, t.nb_sweep_at = list, NB_SWEEP_MIN
                end
                list[#list + 1] = handle
                if #list >= t.nb_sweep_at then
                    sweep_sends(t)
                end
            end
            return handle
        end
        local started = rc > 0
        rc = run_op(w, t, rc, ep, header, data)
        if rc < 0 then
            return send_failed(ep, "am_send", rc, started)
        end
        return true
    end

    -- am_send(id, header, data, need_reply, proto[, len]): send an Active
    -- Message and wait until it is sent.  header and data are strings, nil or
    -- registered buffers (sent without a copy; len bytes of a buffer, default
    -- all).  proto: nil (UCX chooses), "eager" or "rndv".  Returns true or nil, err.
    function Endpoint:am_send(id, header, data, need_reply, proto, len)
        return start_send("Endpoint:am_send", false, self, id, header, data, need_reply, proto, len)
    end

    function Endpoint:describe()
        check.self("Endpoint:describe", self, Endpoint, "an endpoint")
        return "ucx op to " .. self.peer .. progress_note(self.worker)
    end

    -- am_send_nb(...): start the send and return a handle at once (for windowed
    -- pipelines); handle:wait() returns true or nil, err.  header and data are
    -- kept alive by the handle until it completes (registered buffers stay out
    -- of the pool even if released); if the task ends first, the send is
    -- cancelled and they are kept until UCX lets go.
    function Endpoint:am_send_nb(id, header, data, need_reply, proto, len)
        return start_send("Endpoint:am_send_nb", true, self, id, header, data, need_reply, proto, len)
    end

    -- The owner ended with the send in flight.
    function Handle:_task_exit()
        abandon_op(self.ep.worker, self.op, self.header, self.data, self.held1, self.held2)
        self.op = ECANCELED
        self.header, self.data, self.held1, self.held2 = nil, nil, nil, nil
    end

    function Handle:wait()
        check.self("SendHandle:wait", self, Handle, "a send handle")
        local rc = self.op
        local t = io_task("SendHandle:wait")
        if t ~= self.owner then     -- (also once the send is over: the rule does not depend on timing)
            error("SendHandle:wait: only the task that started the send can wait for it", 2)
        end
        if rc > 0 then
            local w = self.ep.worker
            t:_disown(self)     -- from here a kill abandons the op through t.io_op
            t.io_reactor = w
            t.io_op = rc
            t.io_keep, t.io_keep2 = self.header, self.data
            t.io_held1, t.io_held2 = self.held1, self.held2     -- held already
            t.io_handle = self
            t.waiting_for = self.ep
            local result, seq = w.result, t.io_seq
            local op, ww = rc, w.w      -- ww nil: the worker was closed, the op with it
            if ww and C.pl_ucx_op_take(ww, op, result) == 0 then
                -- not a plain loop: one entered on every call becomes a root
                -- trace of its own and breaks the caller's
                park(t, WAIT_IO, op, self.ep, "SendHandle:wait", seq)
                ww = w.w
                if ww and C.pl_ucx_op_take(ww, op, result) == 0 then
                    repeat
                        park(t, WAIT_IO, op, self.ep, "SendHandle:wait", seq)
                        ww = w.w
                    until not ww or C.pl_ucx_op_take(ww, op, result) ~= 0
                end
            end
            rc = ww and result.status or CLOSED
            t.waiting_for = nil
            t.io_reactor, t.io_handle = nil, nil
            t.io_keep, t.io_keep2, t.io_held1, t.io_held2 = nil, nil, nil, nil
            settle_handle(self, w, rc)
        end
        self.header, self.data, self.held1, self.held2 = nil, nil, nil, nil
        if rc < 0 then
            return send_failed(self.ep, "am_send", rc, self.started)
        end
        return true
    end

    -- tag_send(tag, data): send data (string or registered buffer) with a tag.
    function Endpoint:tag_send(tag, data, len)
        live_ep("Endpoint:tag_send", self)
        tag = tag_value("Endpoint:tag_send", "tag", tag)
        local dptr, dlen = payload("Endpoint:tag_send", "data", data, len)
        local t = io_task("Endpoint:tag_send")
        local w = self.worker
        local rc = run_op(w, t, C.pl_ucx_tag_send(w.w, self.h, tag, dptr, dlen, t.slot, t.gen), self, data)
        if rc < 0 then
            return send_failed(self, "tag_send", rc)
        end
        return true
    end

    -- flush(): wait until everything sent on the endpoint has completed.
    function Endpoint:flush()
        live_ep("Endpoint:flush", self)
        local t = current_task("Endpoint:flush")
        local w = self.worker
        local rc = run_op(w, t, C.pl_ucx_ep_flush(w.w, self.h, t.slot, t.gen), self)
        if rc < 0 then
            return send_failed(self, "flush", rc)
        end
        return true
    end

    -- status(): true, or nil and why the endpoint is unusable (peer failed).
    function Endpoint:status()
        live_ep("Endpoint:status", self)
        local rc = C.pl_ucx_ep_status(self.worker.w, self.h)
        if rc < 0 then
            return nil, format("endpoint to %s: %s%s", self.peer, errstr(rc), failed_note(self)), errname(rc)
        end
        return true
    end

    -- Whether the endpoint's table entry is gone (closed, or its worker).
    local function ep_gone(w, h)
        local ww = w.w
        return not ww or C.pl_ucx_ep_status(ww, h) == EBADF
    end

    -- close(): flush and close (forced if the peer failed).  true once the
    -- endpoint is closed (a worker closed meanwhile closes it too); nil, err
    -- with the endpoint left open when the close could not start (no op slot).
    function Endpoint:close()
        check.self("Endpoint:close", self, Endpoint, "an endpoint")
        if not self.h or not self.worker.w then
            return false
        end
        if not pluvio.runtime() then
            -- no runtime runs (a script's top level, busted's finally): the
            -- close, which waits for the endpoint's flush, runs as the task
            -- of a runtime of its own, as every other close works there too
            return pluvio.run(Endpoint.close, self)
        end
        local t = current_task("Endpoint:close")
        local w = self.worker
        local h = self.h
        self.h = nil            -- a second close meanwhile returns false
        -- and a later finalizer drops nothing: a kill during the close frees
        -- the entry (Worker:_abandon), and its slot's endpoint 32768 reuses on
        -- would have the same handle
        local guard = self.guard
        if guard then guard[0] = -1 end
        -- with operations in flight C flushes first, then closes on the next
        -- call; a kill during the flush closes it forcefully (the entry would
        -- stay, the endpoint open in UCX, and close() say false)
        t.io_abort_ep = h
        local rc = run_op(w, t, C.pl_ucx_ep_close(w.w, h, t.slot, t.gen), self)
        t.io_abort_ep = nil
        local started = rc ~= ENOMEM and rc ~= EOPSFULL    -- (else no op slot: the endpoint is as it was)
        if started and w.w and C.pl_ucx_ep_drained(w.w, h, t.slot, t.gen) == 0 then
            -- the flush is done, but a rendezvous send still waits for its
            -- receiver to pull the data: wait for the endpoint's last op too
            -- (a kill meanwhile closes it forcefully: _task_exit)
            self.closing = { t = t, h = h }
            t:_own(self)
            repeat
                park(t, WAIT_OTHER, 0, self, "Endpoint:close")
            until not w.w or C.pl_ucx_ep_drained(w.w, h, t.slot, t.gen) ~= 0
            t:_disown(self)
            self.closing = nil
        end
        if started and w.w and not ep_gone(w, h) then
            rc = run_op(w, t, C.pl_ucx_ep_close(w.w, h, t.slot, t.gen), self)
        end
        if not w.w then         -- the worker was closed meanwhile, the endpoint with it
            return true
        end
        if not ep_gone(w, h) then   -- it did not start: still there, to close again
            self.h = h
            if guard then guard[0] = h end
            return send_failed(self, "close", rc)
        end
        w.eps[self] = nil
        if rc < 0 and rc ~= CLOSED and rc ~= ECANCELED and rc ~= ECONNRESET then  -- (closed anyway)
            -- a flush fails only when the connection broke; the entry that
            -- send_failed would ask is gone now, so the note is added here
            local msg, name = why(rc)
            return nil, format("close to %s: %s%s", self.peer, msg, PEER_FAILED), name
        end
        return true
    end

    -- Its task was cancelled while its close waited for the endpoint's last
    -- op: the endpoint is closed forcefully (it would stay half closed).
    function Endpoint:_task_exit()
        local c, w = self.closing, self.worker
        self.closing = nil
        if c and w.w then
            C.pl_ucx_ep_abort(w.w, c.h)
            w.eps[self] = nil
        end
    end

    function Endpoint:__tostring()
        return format("UCX endpoint to %s%s", self.peer, self.h and "" or " (closed)")
    end

    I.collect_dropped, I.no_ep_room, I.start_send = collect_dropped, no_ep_room, start_send
    I.settle_sends_of = settle_sends_of
end

return M
