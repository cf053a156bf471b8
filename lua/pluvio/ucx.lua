-- pluvio.ucx: the UCX reactor: contexts, workers, listeners, endpoints,
-- Active Message streams and tags.
--
-- Same shape as every blocking call (DESIGN.md section 2): C starts the
-- operation and says "done" (0), "in flight" (op id) or -errno; the task
-- parks; the UCX callback, run inside ucp_worker_progress by the reactor,
-- records the result and wakes the task; the task takes the result.
local pluvio = require "pluvio"
local core = require "pluvio.core"
local check = require "pluvio.check"
local uring = require "pluvio.uring"

local ffi, C = core.ffi, core.C
local park, current_task, WAIT = pluvio._park, pluvio._current_task, pluvio._WAIT
local io_task, yielded, linger = pluvio._io_task, pluvio._yielded, pluvio._linger
local WAIT_IO, WAIT_OTHER, WAIT_STREAM = pluvio._WAIT_KIND.IO, pluvio._WAIT_KIND.OTHER, pluvio._WAIT_KIND.STREAM
local co_yield = coroutine.yield
local errstr = core.errstr
local host_port = check.host_port
local ffi_string = ffi.string
local walk = next          -- walk tables with `for k, v in walk, t`, not pairs(): see init.lua
local type, format, setmetatable, getmetatable, tostring = type, string.format, setmetatable, getmetatable, tostring
local max = math.max

local M = {}

local ENXIO, EBADF, EAGAIN, ENOMEM, EINVAL, EMFILE, EMSGSIZE = -6, -9, -11, -12, -22, -24, -90
local EBADMSG, EOPNOTSUPP, EAFNOSUPPORT, EADDRINUSE = -74, -95, -97, -98
local ECONNRESET, ENOTCONN, ECONNREFUSED, ECANCELED = -104, -107, -111, -125
local MAX_AM_ID = 255
local SCRATCH_KEEP = 64 * 1048576  -- scratch memory a worker keeps for tag_recv and data()
local Buffer = uring.Buffer

local function errname(rc)
    return ffi_string(C.pl_errname(rc))
end

-- What await reports when the worker was closed while the task waited: no
-- errno (the op is gone with the worker), said as such in every message.
local CLOSED = -0x10000

-- An op's failure: its message and errno name.
local function why(rc)
    if rc == CLOSED then
        return "the worker is closed", "ECANCELED"
    end
    return errstr(rc), errname(rc)
end

local function fail(what, rc)
    local msg, name = why(rc)
    return nil, what .. ": " .. msg, name
end

---------------------------------------------------------------------------
-- The reactor
---------------------------------------------------------------------------

local UCXReactor = {}
UCXReactor.__index = UCXReactor
M.UCXReactor = UCXReactor

local singleton = nil
local weak_keys = { __mode = "k" }

local function new_reactor()
    local err = ffi.new("int[1]")
    local r = C.pl_ucx_reactor_new(err)
    if r == nil then
        error("UCXReactor: cannot create the reactor: " .. errstr(err[0]), 3)
    end
    -- workers: weak, as a context's (Context.new)
    -- attached: the runtime that registered it last, weakly: the reactor
    -- lives as long as the Lua state, and a runtime dropped after its run
    -- must be collected (C forgets it then, ucx_reactors_forget)
    return setmetatable({ r = ffi.gc(r, C.pl_ucx_reactor_free), workers = setmetatable({}, weak_keys),
                          attached = setmetatable({}, { __mode = "v" }) },
                        UCXReactor)
end

-- UCXReactor.current(): this Lua state's UCX reactor (made on first call).
function UCXReactor.current()
    if not singleton then
        singleton = new_reactor()
    end
    return singleton
end

function UCXReactor:c_reactor()
    return C.pl_ucx_reactor_vtable(self.r)
end

function UCXReactor:attach(rt)
    self.attached[1] = rt
    C.pl_ucx_reactor_attach(self.r, rt.crt)
end

-- The reactor's table of workers has room for this many (UCX_MAX_WORKERS).
local MAX_WORKERS = 32

-- Add worker w to reactor r: 0, or -errno and a message that says why.
local function add_worker(r, w)
    local rc = C.pl_ucx_reactor_add_worker(r.r, w.w)
    if rc == EMFILE then
        return rc, format("the UCX reactor progresses at most %d workers at once (close one first)", MAX_WORKERS)
    elseif rc < 0 then
        return rc, errstr(rc)
    end
    r.workers[w] = true
    w.reactor = r
    return 0
end

-- register_worker(worker): progress the worker from now on (once, however
-- often it is registered).
function UCXReactor:register_worker(w)
    check.self("UCXReactor:register_worker", self, UCXReactor, "the UCX reactor")
    if getmetatable(w) ~= M.Worker then
        error("UCXReactor:register_worker: w must be a worker from Context:create_worker() (got " .. type(w) .. ")", 2)
    end
    if not w.w then
        error("UCXReactor:register_worker: the worker is closed", 2)
    end
    local rc, why = add_worker(self, w)
    if rc < 0 then
        error("UCXReactor:register_worker: " .. why, 2)
    end
    return true
end

-- Whether reactor r is registered on rt (under any name).
local function registered_on(rt, r)
    for _, obj in walk, rt.reactors do
        if obj == r then
            return true
        end
    end
    return false
end

-- On default runtimes (pluvio.run, the host) the reactor is registered and
-- workers are progressed without boilerplate: 0, or -errno and why not.
-- A worker made while no runtime runs (at the top level of a luajit
-- script, in a busted setup) joins the Lua state's reactor too, which the
-- next default runtime registers (see below): else it was progressed by
-- nobody, and its first wait ended in the deadlock report.
local function auto_register(w)
    local rt = pluvio.runtime()
    if not rt then
        return add_worker(UCXReactor.current(), w)
    end
    if not rt.auto_reactors then
        return 0
    end
    local r = UCXReactor.current()
    if not registered_on(rt, r) then
        rt:register_reactor("ucx", r)
    end
    return add_worker(r, w)
end

-- Workers belong to the Lua state, as its UCX reactor does: a default
-- runtime made after some were created progresses them too (a worker made
-- in one pluvio.run and used in the next was progressed by nobody, and its
-- wait_msg ended in the deadlock report).
pluvio._on_default_runtime(function(rt)
    for w in walk, singleton and singleton.workers or {} do
        if w.w then         -- an open one (closed ones wait for the collector)
            rt:register_reactor("ucx", singleton)
            return
        end
    end
end)

---------------------------------------------------------------------------
-- Context
---------------------------------------------------------------------------

local Context = {}
Context.__index = Context
M.Context = Context

local Worker = {}
Worker.__index = Worker
M.Worker = Worker

local Endpoint = {}
Endpoint.__index = Endpoint
M.Endpoint = Endpoint

local Listener = {}
Listener.__index = Listener
M.Listener = Listener

local Stream = {}
Stream.__index = Stream
M.Stream = Stream

local Message = {}
Message.__index = Message
M.Message = Message

-- Context.new([opts]): a UCX context (AM, tags).  opts.wakeup (default
-- true): workers sleep in the kernel when idle, which in UCX 1.13 limits
-- them to transports with events (tcp); false: workers are busy-polled
-- while they have peers, and shared memory becomes usable (lowest
-- latency, one core).  Transports and devices otherwise come from UCX's
-- environment (UCX_TLS, UCX_NET_DEVICES).
function Context.new(opts)
    if type(opts) ~= "nil" and type(opts) ~= "table" then
        error("Context.new: options must be a table (got " .. type(opts) .. ")", 2)
    end
    local wakeup = true
    for k, v in walk, opts or {} do
        if k == "wakeup" then
            if type(v) ~= "boolean" then
                error("Context.new: wakeup must be a boolean (got " .. check.show(v) .. ")", 2)
            end
            wakeup = v
        else
            error("Context.new: unknown option " .. check.show(k) ..
                  " (known: wakeup; choose transports with the UCX_TLS environment variable)", 2)
        end
    end
    local err = ffi.new("int[1]")
    local c = C.pl_ucx_context_new(wakeup and 1 or 0, err)
    if c == nil then
        return nil, "Context.new: cannot initialise UCX: " .. errstr(err[0]), errname(err[0])
    end
    -- Finalizers may run in any order at exit: C frees a released context
    -- with its last worker, so neither order trips a UCX assertion.  Its
    -- workers are weak: one the user dropped is collected, and closed by
    -- its finalizer, while the context lives (a worker refers to it).
    return setmetatable({ c = ffi.gc(c, C.pl_ucx_context_release), workers = setmetatable({}, weak_keys) },
                        Context)
end

-- The live_* helpers check self for the method that called them: their
-- errors name the user's line, one frame further out than a method's own
-- checks (check.self at level 4: check.self, the helper, the method, the
-- user; a method that tail-calls into a helper, start_send, is replaced
-- by it and keeps the same count).
local function live_context(fname, c)
    check.self(fname, c, Context, "a context", 4)
    if not c.c then
        error(fname .. ": the context is closed", 3)
    end
    return c
end

-- Open workers: where a task that ends may have taken messages.
local live_workers = setmetatable({}, { __mode = "k" })

-- Let go of a registered buffer's hold kept in a limbo entry (hold_record).
local function release_hold(rec)
    if rec and rec.life.open then   -- (at exit its ring may be freed already)
        C.pl_uring_buffer_unhold(rec.u, rec.index)
    end
end

-- UCX makes the connect_addr endpoints of two workers to each other one
-- connection, which refuses two peer_errors settings: said for a
-- connect_addr refused so, and for an endpoint failed so.
local OTHER_PEER_ERRORS = "was made with the other peer_errors setting: UCX makes the endpoints two workers " ..
                          "open to each other by address one connection, and both need the same peer_errors"

-- A worker's table of endpoints has room for this many (UCX_MAX_ENDPOINTS),
-- or its max_endpoints, reply endpoints included; C says EMFILE only when
-- it is full (UCX's own failures never map to it).
local MAX_ENDPOINTS = 4096

-- A worker left to the garbage collector: its runtime may be gone, so it
-- wakes nobody (no task can wait on it: they would reference it).  life is
-- what other finalizers (reply endpoints') see of it: at exit finalizers
-- run in any order, and the worker may be gone before them.  Its limbo's
-- registered buffers go back to their pools once UCX is done with them, as
-- Worker:close does (else they were out of the pool for good); referenced
-- from here, their reactors outlive this finalizer, except at exit, when
-- one may be freed already (its life says so) and nothing needs them.
local function release_limbo(limbo)
    for i = 1, #limbo do
        release_hold(limbo[i].held1)
        release_hold(limbo[i].held2)
        limbo[i] = nil
    end
end

-- Workers whose close left ops UCX still held (pl_ucx_worker_close said
-- EBUSY: a rendezvous send whose receiver holds the message, say), with
-- their limbo: the registered buffers those ops use.  Nothing progresses
-- them; reap_stuck (at the next create_worker or close) does, and destroys
-- each once UCX has let go (the receiver took or released the message, or
-- its worker was closed), its buffers back to the pool.  Else each kept its
-- ucp worker (sockets, memory) and those buffers for the process's life.
local stuck_workers = {}

local function reap_stuck()
    local kept = 0
    for i = 1, #stuck_workers do
        local e = stuck_workers[i]
        stuck_workers[i] = nil
        if C.pl_ucx_worker_reap(e.w) == 0 then
            if e.worker then e.worker.stuck = nil end
            release_limbo(e.limbo)
        else
            kept = kept + 1
            stuck_workers[kept] = e
        end
    end
end

local function worker_finalizer(life, limbo)
    return function(w)
        life.open = false
        if C.pl_ucx_worker_close(w, nil) ~= 0 then   -- UCX kept ops: their buffers stay theirs
            stuck_workers[#stuck_workers + 1] = { w = w, limbo = limbo }
            return
        end
        release_limbo(limbo)
    end
end

function Context:create_worker(opts)
    live_context("Context:create_worker", self)
    if type(opts) ~= "nil" and type(opts) ~= "table" then
        error("Context:create_worker: options must be a table (got " .. type(opts) .. ")", 2)
    end
    local max_eps = MAX_ENDPOINTS
    for k, v in walk, opts or {} do
        if k == "max_endpoints" then
            max_eps = check.integer("Context:create_worker", "max_endpoints", v, 1, MAX_ENDPOINTS)
        else
            error("Context:create_worker: unknown option " .. check.show(k) .. " (known: max_endpoints)", 2)
        end
    end
    if stuck_workers[1] then
        reap_stuck()
    end
    local err = ffi.new("int[1]")
    local w = C.pl_ucx_worker_new(self.c, err)
    if w == nil then
        return nil, "Context:create_worker: cannot create a UCX worker: " .. errstr(err[0]), errname(err[0])
    end
    C.pl_ucx_worker_max_endpoints(w, max_eps)
    local life, limbo = { open = true }, {}
    local worker = setmetatable({
        w = ffi.gc(w, worker_finalizer(life, limbo)), life = life, context = self,
        result = ffi.new("pl_ucx_result_t"), info = ffi.new("pl_ucx_msg_info_t"),
        eps = setmetatable({}, weak_keys), listeners = setmetatable({}, weak_keys), streams = {}, limbo = limbo,
        max_header = C.pl_ucx_worker_max_am_header(w), max_endpoints = max_eps,
        replies = setmetatable({}, { __mode = "v" }),   -- reply endpoints by handle
        scratch = core.scratch_pool(SCRATCH_KEEP),     -- for tag_recv and data()
    }, Worker)
    self.workers[worker] = true
    live_workers[worker] = true
    local rc, why = auto_register(worker)
    if rc == EMFILE then    -- full: of workers nobody closed, perhaps, which a collection frees
        pluvio._full_collect()
        rc, why = auto_register(worker)
    end
    if rc < 0 then          -- nothing would progress it: not a worker to hand out
        worker:close()
        return nil, "Context:create_worker: " .. why, errname(rc)
    end
    return worker
end

-- close(): close the workers still open, then the context; true, or
-- false when it was closed already (as every other UCX object's close).
-- A worker already collected but not yet finalized is closed by its
-- finalizer: the context goes with it (released), not before.
function Context:close()
    check.self("Context:close", self, Context, "a context")
    if not self.c then
        return false
    end
    for w in walk, self.workers do
        if w.w then w:close() end
    end
    local c = self.c
    self.c = nil
    ffi.gc(c, nil)
    C.pl_ucx_context_release(c)
    return true
end

---------------------------------------------------------------------------
-- Operations: start, park, take
---------------------------------------------------------------------------

-- What the ops of a worker UCX kept at its close (Worker:close: stuck)
-- read or fill: strings, scratch memory.  UCX may still use them (a peer
-- pulling a send's data reads the string where it is), so the worker's
-- limbo keeps them until reap_stuck destroys the UCX worker: never freed
-- while a peer may read them, or UCX write into them.
local function keep_stuck(w, k1, k2)
    if k1 ~= nil or k2 ~= nil then
        w.limbo[#w.limbo + 1] = { k1, k2 }
    end
end

-- Park until op completes; returns status (0 or -errno), length, tag.
-- keep, keep2: what UCX reads or fills (strings, scratch, registered
-- buffers), kept from reuse past a kill until UCX is done with it.
local function await(w, t, op, what, keep, keep2)
    local result = w.result
    if C.pl_ucx_op_take(w.w, op, result) ~= 0 then     -- done in the starting call
        return result.status, result.length, result.sender_tag
    end
    t.io_reactor = w
    t.io_op = op
    t.io_keep, t.io_keep2 = keep, keep2
    t.waiting_for = what
    C.pl_task_wait(t.rt.crt, t.slot, WAIT_IO, op)
    local fname, seq = t.io_fname, t.io_seq
    if not linger(t.rt, t) then
        yielded(t, co_yield(WAIT), fname, seq)
    end
    local ww = w.w          -- nil: the worker was closed meanwhile, the op with it
    if ww and C.pl_ucx_op_take(ww, op, result) == 0 then
        repeat              -- (entered only when woken early: see Stream:wait_msg)
            park(t, WAIT_IO, op, what)
            ww = w.w
        until not ww or C.pl_ucx_op_take(ww, op, result) ~= 0
    end
    t.waiting_for = nil
    t.io_reactor = nil
    t.io_keep, t.io_keep2 = nil, nil
    if not ww then
        if w.stuck then keep_stuck(w, keep, keep2) end
        return CLOSED, 0, 0
    end
    return result.status, result.length, result.sender_tag
end

-- A registered buffer a dead task's op still uses stays out of the pool:
-- returns the buffer if it was held, for unhold.
local function hold(v)
    if getmetatable(v) == Buffer and v.base and C.pl_uring_buffer_hold(v.reactor.u, v.index) == 0 then
        return v
    end
    return nil
end

local function unhold(b)
    if b then
        C.pl_uring_buffer_unhold(b.reactor.u, b.index)
    end
end

-- What a limbo entry keeps of a registered buffer: its hold, not the buffer
-- object, whose owner task may lead back to the worker (the worker's
-- finalizer refers to the limbo: it would never be collected).
local function hold_record(b)
    return b and { u = b.reactor.u, index = b.index, life = b.reactor.life } or false
end

local function kept(k)
    return getmetatable(k) ~= Buffer and k
end

-- The holds of an op its closed worker ended: let go of, unless UCX kept
-- the op (the worker is stuck): then its worker's limbo keeps them until
-- reap_stuck destroys it.
local function keep_or_unhold(w, h1, h2)
    if w.stuck then
        if h1 or h2 then
            w.limbo[#w.limbo + 1] = { held1 = hold_record(h1), held2 = hold_record(h2) }
        end
    else
        unhold(h1)
        unhold(h2)
    end
end

-- Let go of what settled abandoned ops kept (all of it once the worker is
-- closed: its ops are gone).
local function limbo_sweep(w, all)
    local limbo = w.limbo
    local kept = 0
    if not w.w and w.stuck then
        return              -- (reap_stuck lets go of it)
    end
    all = all or not w.w
    for i = 1, #limbo do
        local e = limbo[i]
        limbo[i] = nil
        if not all and C.pl_ucx_op_settled(w.w, e.op, e.gen) == 0 then
            kept = kept + 1
            limbo[kept] = e
        else
            release_hold(e.held1)
            release_hold(e.held2)
        end
    end
end

-- Cancel op (UCX may still finish a send: it reads the data until then);
-- k1, k2 stay referenced, and registered buffers among them out of the
-- pool (held now, or already: h1, h2), until UCX completes it.
local function abandon_op(w, op, k1, k2, h1, h2)
    if not w.w then         -- closed: its ops are gone (unless UCX kept them: Worker:close)
        keep_or_unhold(w, h1, h2)
        if w.stuck then keep_stuck(w, k1, k2) end
        return
    end
    local gen = C.pl_ucx_op_gen(w.w, op)
    C.pl_ucx_op_abandon(w.w, op)
    if k1 ~= nil or k2 ~= nil then
        limbo_sweep(w)
        w.limbo[#w.limbo + 1] = { op = op, gen = gen, kept(k1), kept(k2),
                                  held1 = hold_record(h1 or hold(k1)), held2 = hold_record(h2 or hold(k2)) }
    end
end

-- A killed task's op is cancelled; the slot is freed when UCX completes it.
function Worker:_abandon(t)
    local op, k1, k2, h1, h2 = t.io_op, t.io_keep, t.io_keep2, t.io_held1, t.io_held2
    t.io_op, t.io_keep, t.io_keep2, t.io_held1, t.io_held2 = nil, nil, nil, nil, nil
    local handle = t.io_handle
    if handle then          -- a send handle being waited for: it owns nothing now
        t.io_handle = nil
        handle.op = ECANCELED
        handle.header, handle.data, handle.held1, handle.held2 = nil, nil, nil, nil
    end
    abandon_op(self, op, k1, k2, h1, h2)
    local ep = t.io_abort_ep
    if ep then              -- a connect or close given up: its endpoint would stay half open
        t.io_abort_ep = nil
        if self.w then C.pl_ucx_ep_abort(self.w, ep) end
    end
end

-- Wait for op rc (or take its immediate result).  Registered buffers among
-- keep, keep2 stay out of the pool while UCX has them, even if another
-- task releases them meanwhile (a kill hands the holds to the limbo).
local function run_op(w, t, rc, what, keep, keep2)
    if rc <= 0 then
        return rc, 0
    end
    local h1, h2 = hold(keep), hold(keep2)
    t.io_held1, t.io_held2 = h1, h2
    local status, len, tag = await(w, t, rc, what, keep, keep2)
    t.io_held1, t.io_held2 = nil, nil
    if status == CLOSED then
        keep_or_unhold(w, h1, h2)   -- (stuck: UCX kept the op, its buffers stay out of the pool)
        return status, len, tag
    end
    unhold(h1)
    unhold(h2)
    if w.limbo[1] then
        limbo_sweep(w)
    end
    return status, len, tag
end

local function live_worker(fname, w)
    check.self(fname, w, Worker, "a worker", 4)
    if not w.w then
        error(fname .. ": the worker is closed", 3)
    end
    return w
end

---------------------------------------------------------------------------
-- Worker
---------------------------------------------------------------------------

-- address(): this worker's UCX address, for connect_addr on a peer.
function Worker:address()
    live_worker("Worker:address", self)
    local n = C.pl_ucx_worker_address(self.w, nil, 0)
    if n < 0 then
        return nil, "Worker:address: " .. errstr(n), errname(n)
    end
    local buf = ffi.new("uint8_t[?]", n)
    C.pl_ucx_worker_address(self.w, buf, n)
    return ffi_string(buf, n)
end

-- max_am_header(): the largest AM header this worker can send.
function Worker:max_am_header()
    live_worker("Worker:max_am_header", self)
    return self.max_header
end


-- A table is full (endpoints, listeners) or a port taken: failed
-- endpoints and listeners nothing refers to any more are freed by their
-- collection (drop_guard), so connects, accept and listen try once more
-- after a full collection.
local collect_dropped = pluvio._full_collect

local function no_ep_room(w, what)
    return nil, format("%s: this worker has at most %d endpoints open, reply endpoints included (close one first)",
                       what, w.max_endpoints), "EMFILE"
end

-- What C is told when an endpoint's or a listener's object is collected
-- (drop: pl_ucx_ep_drop or pl_ucx_listener_drop, with its handle).  The
-- guard holds the handle, -1 once the object was closed (so that a late
-- finalizer cannot drop an entry reused since); it refers to neither the
-- object nor w.
local function drop_guard(w, drop, h)
    local ww, life = w.w, w.life
    return ffi.gc(ffi.new("int[1]", h), function(g)
        if life.open and g[0] >= 0 then drop(ww, g[0]) end
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
        return no_ep_room(self, "connect_addr")
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
        if rc == EMFILE and (not self.w or C.pl_ucx_worker_ep_room(self.w) == 0) then
            return no_ep_room(self, fname)      -- (else the process's: the resolver's files)
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
    elseif i == EAFNOSUPPORT then
        return ipv6_refused("listen on", host, port)
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

-- am_stream(id[, {window = n}]): the stream of messages with AM id.  The
-- window (default 64) is how many unread messages it holds before the
-- sender is slowed.  Messages for the id that came before the stream was
-- opened (held by the worker, up to 64) are its first.
function Worker:am_stream(id, opts)
    live_worker("Worker:am_stream", self)
    check.integer("Worker:am_stream", "id", id, 0, MAX_AM_ID)
    local window = 64
    if type(opts) ~= "nil" then     -- (not ~= nil: a NULL pointer equals nil)
        if type(opts) ~= "table" then
            error("Worker:am_stream: options must be a table (got " .. type(opts) .. ")", 2)
        end
        for k, v in walk, opts do
            if k == "window" then
                window = check.integer("Worker:am_stream", "window", v, 1, 1048576)
            else
                error("Worker:am_stream: unknown option " .. check.show(k) .. " (known: window)", 2)
            end
        end
    end
    local rc = C.pl_ucx_stream_open(self.w, id, window)
    if rc < 0 then
        if rc == -17 then
            error(format("Worker:am_stream: a stream for AM id %d is already open on this worker", id), 2)
        end
        error("Worker:am_stream: " .. errstr(rc), 2)
    end
    local s = setmetatable({ worker = self, id = id, serial = rc, window = window, open = true }, Stream)
    self.streams[id] = s
    return s
end

local function tag_value(fname, name, v)
    if type(v) == "number" then
        if v ~= v or v < 0 or v % 1 ~= 0 or v > 2 ^ 53 then
            error(format("%s: %s must be an integer from 0 to 2^53 or a uint64_t (got %s)", fname, name,
                         check.show(v)), 3)
        end
        return v
    elseif ffi.istype("uint64_t", v) or ffi.istype("int64_t", v) then
        return v
    end
    -- other cdata would reach the FFI call, whose error names neither the
    -- method nor the argument
    local got = type(v) == "cdata" and tostring(ffi.typeof(v)):gsub("^ctype", "cdata") or type(v)
    error(format("%s: %s must be an integer or a uint64_t (got %s)", fname, name, got), 3)
end

-- tag_recv(tag, mask, len_or_buf): receive a tagged message: with a length,
-- returns the data as a string and the sender's tag; with a registered
-- buffer, the byte count and the sender's tag.
function Worker:tag_recv(tag, mask, len_or_buf)
    live_worker("Worker:tag_recv", self)
    tag = tag_value("Worker:tag_recv", "tag", tag)
    mask = tag_value("Worker:tag_recv", "mask", mask)
    local ptr, cap, scratch
    if getmetatable(len_or_buf) == Buffer then
        if not len_or_buf.base then
            error("Worker:tag_recv: len_or_buf is a registered buffer that was released", 2)
        end
        ptr, cap = len_or_buf.base, len_or_buf.len
    else
        check.integer("Worker:tag_recv", "len_or_buf", len_or_buf, 0, 2 ^ 31)
        cap = len_or_buf
    end
    local t = current_task("Worker:tag_recv")    -- it takes a message: check first
    if not ptr then
        scratch = self.scratch:get(cap, "Worker:tag_recv")
        ptr = scratch.ptr
    end
    local rc, len, stag = run_op(self, t, C.pl_ucx_tag_recv(self.w, tag, mask, ptr, cap, t.slot, t.gen),
                                 "tag receive", scratch or len_or_buf)
    if rc < 0 then             -- (scratch, if any, is left to the collector, as UCX may hold it)
        if rc == EMSGSIZE then  -- UCX reports the whole message's length and tag, and drops it
            return fail(format("tag_recv: the message with tag 0x%x has %d bytes, more than the %d " ..
                               "len_or_buf has room for (it is dropped)", stag, len, cap), rc)
        end
        return fail("tag_recv", rc)
    end
    if scratch then
        local str = ffi_string(ptr, len)
        self.scratch:put(scratch)
        return str, stag
    end
    return len, stag
end

-- stats(): AMs and bytes sent/received, eager/rndv counts, tags, progress
-- calls, wake-ups, ops in flight, held messages, endpoints, messages held
-- or dropped for AM ids with no open stream, times the event fd was
-- unwatched (the worker busy).
function Worker:stats()
    live_worker("Worker:stats", self)
    local s = ffi.new("pl_ucx_stats_t")
    C.pl_ucx_worker_stats(self.w, s)
    return {
        am_sent = s.am_sent, am_bytes_sent = s.am_bytes_sent, am_received = s.am_received,
        am_bytes_received = s.am_bytes_received, eager_received = s.eager_received,
        rndv_received = s.rndv_received, tag_sent = s.tag_sent, tag_received = s.tag_received,
        progress_calls = s.progress_calls, wakeups = s.wakeups, ops_in_flight = s.ops_in_flight,
        msgs_held = s.msgs_held, endpoints = s.endpoints, failed_endpoints = s.failed_endpoints,
        msgs_collected = self.tracked and self.tracked.collected or 0, header_blocks = s.header_blocks,
        am_unclaimed = s.am_unclaimed, am_dropped = s.am_dropped, watch_drops = s.watch_drops,
        endpoints_collected = s.endpoints_collected,
    }
end

-- close(): endpoints, listeners, streams, then the worker itself (waiting, at
-- most 2 s, for pulls and sends UCX can neither force nor cancel: C).
function Worker:close()
    check.self("Worker:close", self, Worker, "a worker")
    if not self.w then
        return false
    end
    for ep in walk, self.eps do ep.h, ep.closed_with_worker = nil, true end
    for l in walk, self.listeners do l.i = nil end
    for _, s in walk, self.streams do s.open = false end
    local w = self.w
    ffi.gc(w, nil)
    self.w = nil            -- first: the tasks it wakes must find it closed
    self.life.open = false
    -- they wait in the runtime progressing it (else in the running one)
    local rt = self.reactor and self.reactor.attached[1] or pluvio.runtime()
    if C.pl_ucx_worker_close(w, rt and rt.crt or nil) == 0 then
        limbo_sweep(self, true)     -- its ops are gone with it
    else
        -- UCX still had ops it could neither finish nor cancel in time,
        -- and keeps them: the registered buffers they use stay out of the
        -- pool (in the limbo) until reap_stuck destroys the worker
        self.stuck = true
        stuck_workers[#stuck_workers + 1] = { w = w, limbo = self.limbo, worker = self }
    end
    if stuck_workers[1] then
        reap_stuck()
    end
    if self.reactor then self.reactor.workers[self] = nil end
    self.context.workers[self] = nil
    live_workers[self] = nil
    return true
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
-- connects.  Returns nil, err once the listener is closed.
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
        elseif h == -16 then
            error("Listener:accept: another task is already accepting on this listener", 2)
        elseif h == EMFILE then     -- (the connection waits for the next accept)
            if collected then
                return no_ep_room(w, "accept")
            end
            collect_dropped()
            collected = true
        elseif h ~= EAGAIN then
            return nil, "accept: " .. errstr(h), errname(h)
        else
            park(t, WAIT_OTHER, 0, self)
            collected = false   -- (a new connection: a new chance)
        end
    end
end

-- For describe(), which names what a task waits on (rt:tasks(), the
-- deadlock report): say so when the worker is progressed by no reactor of
-- the running runtime, as then nothing it waits for can come.
local function progress_note(w)
    local rt = pluvio.runtime()
    if not rt or not w.w or registered_on(rt, w.reactor) then
        return ""
    end
    return " (its worker is not progressed by this runtime: register the UCX reactor on it, " ..
           "rt:register_reactor(\"ucx\", ucx.UCXReactor.current()), and the worker, reactor:register_worker(w))"
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
    if C.pl_ucx_ep_status(ep.worker.w, ep.h) == EOPNOTSUPP then
        return " (the peer's endpoint to this worker " .. OTHER_PEER_ERRORS .. ")"
    end
    return PEER_FAILED
end

local function send_failed(ep, what, rc)
    local msg, name = why(rc)
    if rc ~= CLOSED and peer_failed(ep) then
        msg = msg .. failed_note(ep)
    end
    return nil, format("%s to %s: %s", what, ep.peer, msg), name
end

-- am_send and am_send_nb: the checks and the start, in one function that
-- both tail-call (so that an argument error names the caller's line).
local Handle = {}
Handle.__index = Handle
M.SendHandle = Handle

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
        local handle = setmetatable({ ep = ep, op = rc, header = header, data = data, owner = t }, Handle)
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
    rc = run_op(w, t, rc, ep, header, data)
    if rc < 0 then
        return send_failed(ep, "am_send", rc)
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
    if rc > 0 then
        local t = io_task("SendHandle:wait")
        local w = self.ep.worker
        if t ~= self.owner then
            error("SendHandle:wait: only the task that started the send can wait for it", 2)
        end
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
        return send_failed(self.ep, "am_send", rc)
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
    if rc ~= ENOMEM and w.w and C.pl_ucx_ep_drained(w.w, h, t.slot, t.gen) == 0 then
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
    if rc ~= ENOMEM and w.w and not ep_gone(w, h) then
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

---------------------------------------------------------------------------
-- Streams and messages
---------------------------------------------------------------------------

function Stream:describe()
    check.self("Stream:describe", self, Stream, "a stream")
    return format("AM stream %d%s", self.id, progress_note(self.worker))
end

function Stream:_abandon_wait(t)
    if self.open and self.worker.w then
        C.pl_ucx_stream_abandon(self.worker.w, self.id, t.slot, t.gen)
    end
end

-- A message belongs to the task that took it (wait_msg).  When that task
-- is cancelled or fails, what it has neither received nor released is
-- released (C knows each message's task): its rendezvous sender waits
-- until then.  A task that returns may have handed its messages on (as
-- results, through channels): they stay, and whoever has them receives
-- or releases them.  Nothing is done per message but one field: a message
-- consumed where it was taken never reaches the heap (the JIT sinks it),
-- and tracking each one (a table entry, a finalizer) would cost that.
local MsgOwner = {}     -- in the resources of each task that took messages

function MsgOwner._task_exit(_, t)
    if t.final == "done" then
        return
    end
    for w in walk, live_workers do
        if w.w then
            C.pl_ucx_msgs_release_task(w.w, t.slot, t.gen)
        end
    end
end

-- Messages dropped without data/recv_data/release would stay held (UCX
-- keeps their data, a rendezvous sender waits) until their task fails or
-- the worker closes.  Once a worker's tasks hold more than TRACK_FROM taken
-- messages, each new one is tracked: a weak table sees it collected, and a
-- sweep releases what was collected, each time as many messages were
-- tracked as the sweep before left (at least TRACK_FROM): its cost spreads
-- over those.  A program that consumes its messages never gets there and
-- pays nothing (its messages stay sunk by the JIT); one that drops them
-- keeps at most TRACK_FROM untracked ones held.
local TRACK_FROM = 256
local weak_values = { __mode = "v" }

local function sweep(w, tr)
    local objs, owners, n = tr.objs, tr.owners, 0
    for h, t in walk, owners do
        if objs[h] == nil then          -- collected while still held
            owners[h] = nil
            if w.w and C.pl_ucx_msg_drop(w.w, h, t.slot, t.gen) == 1 then
                tr.collected = tr.collected + 1
            end
        else
            n = n + 1
        end
    end
    tr.n = n
    tr.added = 0
    tr.sweep_at = max(TRACK_FROM, n)
end

local function track(w, h, m, t)
    local tr = w.tracked
    if not tr then
        tr = { objs = setmetatable({}, weak_values), owners = {}, n = 0, added = 0,
               sweep_at = TRACK_FROM, collected = 0 }
        w.tracked = tr
    end
    tr.objs[h] = m
    tr.owners[h] = t
    tr.n = tr.n + 1
    tr.added = tr.added + 1
    if tr.added > tr.sweep_at then
        sweep(w, tr)
    end
end

-- The message's data was taken or it was released: no longer tracked.
local function untrack(w, h)
    local tr = w.tracked
    if tr and tr.owners[h] then
        tr.owners[h], tr.objs[h] = nil, nil
        tr.n = tr.n - 1
    end
end

-- The endpoint to answer message h on: one object per table entry, shared
-- by the messages that came on it, held in C until the object is
-- collected, so that the entry of a reply endpoint UCX made for a
-- connect_addr peer goes once nothing refers to it.  Or -errno: why the
-- message cannot be answered.  Once per entry, not per message.
local function reply_endpoint(w, h)
    local ww, life = w.w, w.life
    local rh = C.pl_ucx_msg_reply_ep(ww, h)
    if rh == EMFILE then    -- (else it stays so: the message may be released before its reply)
        collect_dropped()
        rh = C.pl_ucx_msg_reply_ep(ww, h)
    end
    if rh < 0 then
        return rh
    end
    local ep = setmetatable({ worker = w, h = rh, peer = "the sender",
        hold = ffi.gc(ffi.new("char[1]"), function()    -- (refers to neither ep nor w)
            if life.open then C.pl_ucx_ep_unhold(ww, rh) end
        end) }, Endpoint)
    w.replies[rh] = ep
    return ep
end

-- The stream's next message, false when the task must wait (it was queued
-- as a reader in C), or nil, err, code.
local function next_msg(self, w, t)
    if not w.w then
        return nil, "wait_msg: the worker is closed", "ECANCELED"
    elseif not self.open then
        return nil, "wait_msg: the stream is closed", "EBADF"
    end
    local info = w.info
    local h = C.pl_ucx_stream_next(w.w, self.id, t.slot, t.gen, info)
    if h >= 0 then
        local hlen = info.header_length
        local reply = false     -- (false, not nil: see Message)
        if info.can_reply ~= 0 then
            local rh = info.ep
            reply = rh >= 0 and w.replies[rh] or reply_endpoint(w, h)
        end
        -- not "return setmetatable(...)": a tail call to a built-in with
        -- side effects makes the JIT give up on the return to the caller,
        -- and everything after a message arrives would run in the
        -- interpreter
        local m = setmetatable({
            worker = w, h = h,
            header = hlen > 0 and ffi_string(info.header, hlen) or "",
            len = info.data_length, rndv = info.rndv ~= 0,
            reply_ep = reply, owner = t,
        }, Message)
        if not t.takes_msgs then
            t.takes_msgs = true
            t:_own(MsgOwner)
        end
        if info.taken > TRACK_FROM then
            track(w, h, m, t)
        end
        return m
    elseif h == EAGAIN then
        return false
    elseif h == ENOTCONN then
        return nil, format("wait_msg: no peer can send to AM stream %d any more " ..
                           "(every endpoint failed or closed, no listener open)", self.id), "ENOTCONN"
    end
    return nil, "wait_msg: " .. errstr(h), errname(h)
end

local function park_reader(self, t, seq)
    t.wait_obj = self
    park(t, WAIT_STREAM, self.serial, self, "Stream:wait_msg", seq)
    t.wait_obj = nil
end

-- wait_msg(): the next message; parks until one arrives.  nil, err when
-- the stream is closed or nothing can feed it any more (every endpoint
-- failed or closed, and no listener open).  The usual paths (a message
-- waiting, or one park) go through no loop: a loop entered on every call
-- becomes a root trace of its own and breaks the caller's.
function Stream:wait_msg()
    check.self("Stream:wait_msg", self, Stream, "a stream")
    local t = io_task("Stream:wait_msg")
    local w = self.worker
    local seq = t.io_seq
    local m, err, code = next_msg(self, w, t)
    if m ~= false then
        return m, err, code
    end
    park_reader(self, t, seq)
    m, err, code = next_msg(self, w, t)
    if m == false then      -- woken without a message for it (another reader took it)
        repeat
            park_reader(self, t, seq)
            m, err, code = next_msg(self, w, t)
        until m ~= false
    end
    return m, err, code
end

-- close(): stop receiving this id; held messages are released.
function Stream:close()
    check.self("Stream:close", self, Stream, "a stream")
    if not self.open then
        return false
    end
    self.open = false
    if self.worker.w then
        C.pl_ucx_stream_close(self.worker.w, self.id)
    end
    self.worker.streams[self.id] = nil
    return true
end

local function live_msg(fname, m)
    check.self(fname, m, Message, "a message", 4)
    if not m.h then
        error(fname .. ": the message's data was already taken or released", 3)
    end
    if not m.worker.w then
        error(fname .. ": the worker is closed", 3)
    end
    local owner = m.owner
    if not owner.live and owner.final ~= "done" then
        m.h = nil
        error(format("%s: the message was released when %s, which took it, ended", fname,
                     tostring(owner)), 3)
    end
    return m
end

function Message:data_len()
    check.self("Message:data_len", self, Message, "a message")
    return self.len
end

function Message:is_rndv()
    check.self("Message:is_rndv", self, Message, "a message")
    return self.rndv
end

local function take(m, fname, ptr, cap, keep)
    local t = io_task(fname, 1)     -- (1: its errors name the caller of our caller)
    local w = m.worker
    local h = m.h
    local owner = w.tracked and w.tracked.owners[h]
    m.h = nil
    untrack(w, h)
    local rc = run_op(w, t, C.pl_ucx_msg_recv(w.w, h, ptr, cap, t.slot, t.gen), "AM data", keep)
    if rc < 0 then
        if w.w and C.pl_ucx_msg_info(w.w, h, w.info) == 0 then
            -- the pull could not start (no op slot: ENOMEM): the message
            -- is as it was, to take again or release, not held in C for
            -- good with its rendezvous sender waiting
            m.h = h
            if owner then
                track(w, h, m, owner)
            end
        end
        return fail("receive AM data", rc)
    end
    return m.len
end

-- Give the message back to C (and UCX what it holds for it), unless its
-- worker or the task that took it ended (that released it), and stop
-- tracking it.
local function let_go(m)
    local h, w, owner = m.h, m.worker, m.owner
    if h then
        if w.w and (owner.live or owner.final == "done") then
            C.pl_ucx_msg_release(w.w, h)
        end
        untrack(w, h)
    end
    m.h = nil
end

-- data(): the message's data as a string (pulls rendezvous data first).
function Message:data()
    live_msg("Message:data", self)
    local w, h, len = self.worker, self.h, self.len
    local eager = len > 0 and not self.rndv and C.pl_ucx_msg_eager_data(w.w, h)
    if eager == nil then        -- (a NULL pointer: not held any more)
        eager = false
    end
    if len == 0 or eager then   -- straight from where UCX holds it
        local s = eager and ffi_string(eager, len) or ""
        let_go(self)
        return s
    end
    -- rendezvous: pulled into the worker's scratch memory (a task killed
    -- during a pull leaves its piece to UCX)
    local scratch = w.scratch:get(len, "Message:data")
    local n, err, code = take(self, "Message:data", scratch.ptr, len, scratch)
    if not n then
        return nil, err, code
    end
    local s = ffi_string(scratch.ptr, len)
    w.scratch:put(scratch)
    return s
end

-- recv_data(buf): the data straight into a registered buffer (rendezvous
-- data goes there with no intermediate copy); returns the byte count.
function Message:recv_data(buf)
    live_msg("Message:recv_data", self)
    if getmetatable(buf) ~= Buffer then
        error("Message:recv_data: buf must be a registered buffer (got " .. type(buf) .. ")", 2)
    end
    if not buf.base then
        error("Message:recv_data: buf is a registered buffer that was released", 2)
    end
    if buf.len < self.len then
        error(format("Message:recv_data: the buffer holds %d bytes, the message has %d", buf.len, self.len), 2)
    end
    local n, err, code = take(self, "Message:recv_data", buf.base, buf.len, buf)
    return n, err, code
end

-- release(): drop the message without reading its data.
function Message:release()
    check.self("Message:release", self, Message, "a message")
    let_go(self)
    return true
end

-- reply(id, header, data[, need_reply, proto[, len]]): answer the sender (it must
-- have sent with need_reply).
function Message:reply(id, header, data, need_reply, proto, len)
    check.self("Message:reply", self, Message, "a message")
    local ep = self.reply_ep    -- an endpoint, -errno (gone before the message was taken) or false
    if not ep then
        error("Message:reply: the sender did not ask for a reply (need_reply was false)", 2)
    end
    local w = self.worker
    if not w.w then
        error("Message:reply: the worker is closed", 2)
    end
    local h = ep
    if type(ep) == "table" then
        h = ep.h
        local st = h and C.pl_ucx_ep_status(w.w, h)
        if not h or st == EBADF or st == ENOTCONN then
            -- the endpoint was closed after the message was taken (its entry
            -- is gone), or its close waits for operations in flight
            h = ENOTCONN
        end
    end
    if h < 0 then           -- the endpoint it came on was closed or failed since
        local msg, name = why(h)
        if h == ENOTCONN then
            msg = "the endpoint the message came on was closed"
        elseif h == EMFILE then     -- when the message was taken
            return no_ep_room(w, "am_send to the sender")
        end
        return nil, "am_send to the sender: " .. msg, name
    end
    -- (a tail call: errors name our caller's line, and Message:reply, not the
    -- Endpoint:am_send the user never called)
    return start_send("Message:reply", false, ep, id, header, data, need_reply, proto, len)
end

return M
