-- pluvio.ucx: the UCX reactor: contexts, workers and the operations on
-- them.  Connections (endpoints, listeners, sends: ucx_endpoint.lua) and
-- what a worker receives (AM streams, messages, tag receives:
-- ucx_stream.lua) are installed into this module: require "pluvio.ucx"
-- gives them all.
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
local park, WAIT = pluvio._park, pluvio._WAIT
local yielded, linger = pluvio._yielded, pluvio._linger
local WAIT_IO = pluvio._WAIT_KIND.IO
local co_yield = coroutine.yield
local errstr = core.errstr
local ffi_string = ffi.string
local walk = next          -- walk tables with `for k, v in walk, t`, not pairs(): see task.lua
local type, format, setmetatable, getmetatable, tostring = type, string.format, setmetatable, getmetatable, tostring

local M = {}

local EMFILE, ECANCELED = -24, -125
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
    check.self("UCXReactor:c_reactor", self, UCXReactor, "the UCX reactor")
    return C.pl_ucx_reactor_vtable(self.r)
end

function UCXReactor:attach(rt)
    check.self("UCXReactor:attach", self, UCXReactor, "the UCX reactor")
    if getmetatable(rt) ~= pluvio.Runtime then    -- (a table without crt detached the reactor)
        error(format("UCXReactor:attach: rt must be a runtime (got %s)", type(rt)), 2)
    end
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
        local hint = err[0] == EMFILE and " (a context takes a few file descriptors: close files, " ..
                     "or raise the limit, ulimit -n)" or ""
        return nil, "Context.new: cannot initialise UCX: " .. errstr(err[0]) .. hint, errname(err[0])
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
        C.pl_uring_buffer_hold_cancelled(rec.u, rec.index, -1)
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
    limbo.op_keep, limbo.op_keep2 = {}, {}      -- (the worker's ops are gone)
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
    max_eps = C.pl_ucx_worker_max_endpoints(w, max_eps)    -- (fewer under a low UCX_ASYNC_MAX_EVENTS)
    -- limbo.op_keep, op_keep2: what each op in flight reads or fills (see run_op)
    local life, limbo = { open = true }, { op_keep = {}, op_keep2 = {} }
    local worker = setmetatable({
        w = ffi.gc(w, worker_finalizer(life, limbo)), life = life, context = self,
        result = ffi.new("pl_ucx_result_t"), info = ffi.new("pl_ucx_msg_info_t"),
        eps = setmetatable({}, weak_keys), listeners = setmetatable({}, weak_keys), streams = {}, limbo = limbo,
        limbo_seen = 0,         -- pl_ucx_abandoned_settled at the limbo's last sweep
        tag_rescued = {},       -- tagged messages killed tag receives had matched (take_rescued)
        tag_posted = 0,         -- tag receives posted: each one's seq
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
-- finalizer refers to the limbo: it would never be collected).  The op is
-- nobody's any more: until UCX is done with it, the buffer's holder is kept
-- from its memory, as from an io_uring op of a killed task (uring_buffer.lua:
-- usable).
local function hold_record(b)
    if not b then
        return false
    end
    C.pl_uring_buffer_hold_cancelled(b.reactor.u, b.index, 1)
    return { u = b.reactor.u, index = b.index, life = b.reactor.life }
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

-- A tag receive whose task was killed, once UCX is done with it (its op
-- DONE: pl_ucx_op_abandon): a message it had matched (UCX cancels a receive
-- only while it matched none) is kept, from the memory at ptr it was
-- received into, for the next tag_recv (Worker:tag_recv: take_tag_rescued),
-- rather than lost with its sender told it was received.
-- rescue: { ptr, seq, tag, mask } of the receive (seq: the order it was
-- posted in, which is the order UCX matched messages to receives); the
-- list stays in that order, whichever fetch ended first.
local function take_rescued(w, op, rescue)
    local result = w.result
    if C.pl_ucx_op_take(w.w, op, result) == 1 and result.status == 0 then
        local rescued = w.tag_rescued
        local i = #rescued
        while i > 0 and rescued[i].seq > rescue.seq do
            i = i - 1
        end
        table.insert(rescued, i + 1, { tag = result.sender_tag + 0ULL, seq = rescue.seq,
                                       data = ffi.string(rescue.ptr, result.length) })
    end
end

-- Let go of what settled abandoned ops kept (all of it once the worker is
-- closed: its ops are gone).  Only when an abandoned op has settled since
-- the last sweep, as for io_uring (uring.lua's limbo_sweep).
local function limbo_sweep(w)
    local limbo = w.limbo
    local kept = 0
    if not w.w and w.stuck then
        return              -- (reap_stuck lets go of it)
    end
    local all = not w.w
    if not all then
        local settled = C.pl_ucx_abandoned_settled(w.w)
        if settled == w.limbo_seen then
            return
        end
        w.limbo_seen = settled
    end
    for i = 1, #limbo do
        local e = limbo[i]
        limbo[i] = nil
        if not all and C.pl_ucx_op_settled(w.w, e.op, e.gen) == 0 then
            kept = kept + 1
            limbo[kept] = e
        else
            if e.rescue and not all and C.pl_ucx_op_gen(w.w, e.op) == e.gen then   -- (its slot, not reused)
                take_rescued(w, e.op, e.rescue)
            end
            release_hold(e.held1)
            release_hold(e.held2)
        end
    end
end

-- A task waiting in buf:settle() for UCX to be done with a buffer: only a
-- sweep lets go of a settled op's hold, and the worker may have nothing
-- else to do that would sweep.
table.insert(require("pluvio.uring_buffer").sweepers, function()
    for w in walk, live_workers do
        if w.w and w.limbo[1] then
            limbo_sweep(w)
        end
    end
end)

-- Cancel op (UCX may still finish a send: it reads the data until then);
-- k1, k2 stay referenced, and registered buffers among them out of the
-- pool (held now, or already: h1, h2), until UCX completes it.
-- rescue: a tag receive's memory and match (see take_rescued).
local function abandon_op(w, op, k1, k2, h1, h2, rescue)
    if not w.w then         -- closed: its ops are gone (unless UCX kept them: Worker:close)
        keep_or_unhold(w, h1, h2)
        if w.stuck then keep_stuck(w, k1, k2) end
        return
    end
    local gen = C.pl_ucx_op_gen(w.w, op)
    C.pl_ucx_op_abandon(w.w, op, rescue and 1 or 0)
    if rescue and C.pl_ucx_op_settled(w.w, op, gen) == 1 then
        take_rescued(w, op, rescue)     -- done before its task could take it, or by the cancel
        unhold(h1)
        unhold(h2)
    elseif (k1 ~= nil or k2 ~= nil) and C.pl_ucx_op_settled(w.w, op, gen) == 1 then
        unhold(h1)                  -- done already, freed by the abandon
        unhold(h2)
    elseif k1 ~= nil or k2 ~= nil then
        limbo_sweep(w)
        w.limbo[#w.limbo + 1] = { op = op, gen = gen, kept(k1), kept(k2), rescue = rescue,
                                  held1 = hold_record(h1 or hold(k1)), held2 = hold_record(h2 or hold(k2)) }
    end
end

-- A killed task's op is cancelled; the slot is freed when UCX completes it.
function Worker:_abandon(t)
    local op, k1, k2, h1, h2 = t.io_op, t.io_keep, t.io_keep2, t.io_held1, t.io_held2
    t.io_op, t.io_keep, t.io_keep2, t.io_held1, t.io_held2 = nil, nil, nil, nil, nil
    local rescue = t.io_tag_ptr and { ptr = t.io_tag_ptr, seq = t.io_tag_seq, tag = t.io_tag, mask = t.io_tag_mask }
    t.io_tag_ptr = nil
    local handle = t.io_handle
    if handle then          -- a send handle being waited for: it owns nothing now
        t.io_handle = nil
        handle.op = ECANCELED
        handle.header, handle.data, handle.held1, handle.held2 = nil, nil, nil, nil
    end
    abandon_op(self, op, k1, k2, h1, h2, rescue)
    local ep = t.io_abort_ep
    if ep then              -- a connect or close given up: its endpoint would stay half open
        t.io_abort_ep = nil
        if self.w then C.pl_ucx_ep_abort(self.w, ep) end
    end
end

-- Wait for op rc (or take its immediate result).  Registered buffers among
-- keep, keep2 stay out of the pool while UCX has them, even if another
-- task releases them meanwhile (a kill hands the holds to the limbo).
--
-- The worker refers to keep and keep2 (strings, scratch memory; not
-- registered buffers, whose owner task leads back to the worker) while the
-- op is in flight, by op id: a runtime dropped with the task parked here
-- takes the task, and its references, with it, while UCX may still read a
-- send's string, or write a message into a tag receive's scratch memory,
-- until C has cancelled the op (ucx_reactors_forget).  Such an op's entry
-- goes when its slot is used again, or with the worker.
local function run_op(w, t, rc, what, keep, keep2)
    if rc <= 0 then
        return rc, 0
    end
    local limbo = w.limbo
    local op_keep, op_keep2 = limbo.op_keep, limbo.op_keep2
    op_keep[rc], op_keep2[rc] = kept(keep), kept(keep2)
    local h1, h2 = hold(keep), hold(keep2)
    t.io_held1, t.io_held2 = h1, h2
    local status, len, tag = await(w, t, rc, what, keep, keep2)
    op_keep[rc], op_keep2[rc] = nil, nil
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

-- A tag (tag_send, tag_recv): an integer or a uint64_t.
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
    -- they wait in the runtime progressing it (else in the running one)
    local rt = self.reactor and self.reactor.attached[1] or pluvio.runtime()
    local settle_sends_of = M._internal.settle_sends_of
    if settle_sends_of then
        local now = pluvio.runtime()
        local rts = { rt }      -- (rt may be nil: { nil } is empty)
        if now and now ~= rt then
            rts[#rts + 1] = now
        end
        settle_sends_of(self, rts)
    end
    for ep in walk, self.eps do ep.h, ep.closed_with_worker = nil, true end
    for l in walk, self.listeners do l.i = nil end
    for _, s in walk, self.streams do s.open = false end
    local w = self.w
    ffi.gc(w, nil)
    self.w = nil            -- first: the tasks it wakes must find it closed
    self.life.open = false
    if C.pl_ucx_worker_close(w, rt and rt.crt or nil) == 0 then
        release_limbo(self.limbo)   -- its ops are gone with it
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

-- What the installed parts (connections: ucx_endpoint.lua; streams,
-- messages and tag receives: ucx_stream.lua) build on; ucx_endpoint.lua
-- adds collect_dropped, no_ep_room and start_send for the streams.
M._internal = {
    errname = errname, CLOSED = CLOSED, why = why, fail = fail, OTHER_PEER_ERRORS = OTHER_PEER_ERRORS,
    keep_stuck = keep_stuck, hold = hold, unhold = unhold, kept = kept, keep_or_unhold = keep_or_unhold,
    abandon_op = abandon_op, run_op = run_op, live_worker = live_worker, live_workers = live_workers,
    tag_value = tag_value, progress_note = progress_note, limbo_sweep = limbo_sweep,
}

require("pluvio.ucx_endpoint").install(M)
require("pluvio.ucx_stream").install(M)

return M
