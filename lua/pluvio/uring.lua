-- pluvio.uring: the io_uring reactor: its options, operations and the
-- registered-buffer pool.  Files (uring_file.lua), sockets (uring_net.lua)
-- and I/O queues (uring_queue.lua) are installed into this module, and
-- buffers are uring_buffer.lua's: require "pluvio.uring" gives them all.
--
-- Every operation has the shape of DESIGN.md section 2: C starts it and
-- returns an op id, the task parks, the completion wakes it, and it takes
-- the result from C.  The read_fixed / write_fixed path makes no Lua
-- garbage: the result struct is reused and the wait description is the file.
local pluvio = require "pluvio"
local core = require "pluvio.core"
local check = require "pluvio.check"

local ffi, C = core.ffi, core.C
local park, current_task, WAIT = pluvio._park, pluvio._current_task, pluvio._WAIT
local io_task, yielded, linger = pluvio._io_task, pluvio._yielded, pluvio._linger
local co_yield = coroutine.yield
local WAIT_IO, WAIT_BUFFER = pluvio._WAIT_KIND.IO, pluvio._WAIT_KIND.BUFFER
local full_collect = pluvio._full_collect
local errstr = core.errstr
local ffi_string, ffi_cast = ffi.string, ffi.cast
local type, format, setmetatable, getmetatable = type, string.format, setmetatable, getmetatable
local walk = next          -- walk tables with `for k, v in walk, t`, not pairs(): see task.lua

local M = {}

local EAGAIN, ENOBUFS, ENOMEM, EPERM, EBUSY, EBADF = -11, -105, -12, -1, -16, -9
local EMFILE, ENFILE = -24, -23
local MAX_IO = 0x7ffff000          -- Linux caps one read/write at this many bytes
local OP_INLINE = C.PL_URING_OP_INLINE
-- Scratch memory for read()/write() of strings (core.scratch_pool: page
-- aligned, as O_DIRECT wants), reused per size class, so steady state
-- allocates nothing but the string.  A reactor keeps at most this many
-- bytes of it: else one 256 MiB read held 256 MiB for the reactor's life.
local BOUNCE_KEEP = 64 * 1048576

M.DEFAULTS = {
    queue_size = 256,              -- SQ entries
    buffer_size = 1048576,         -- bytes per registered buffer
    buffer_count = 16,             -- registered buffers (mapped on first acquire)
    submit_depth = 64,             -- submit at once when this many SQEs wait
    wait_submit_timeout = 0.1,     -- s an SQE may wait before a forced submit
    wait_complete_timeout = 0.15,  -- s the reactor sleeps at most per wait
    sqpoll = false,                -- kernel submission thread
    sqpoll_idle_ms = 1000,
}

local OPTION_RULES = {
    queue_size = { "integer", 1, 32768 },
    buffer_size = { "integer", 4096, 1073741824, "a multiple of 4096" },
    buffer_count = { "integer", 0, 16384 },     -- (the kernel registers at most 16384: IORING_MAX_REG_BUFFERS)
    submit_depth = { "integer", 1, 32768 },
    wait_submit_timeout = { "number", 0, 60 },
    wait_complete_timeout = { "number", 0, 60 },
    sqpoll = { "boolean" },
    sqpoll_idle_ms = { "integer", 0, 3600000 },
}

local function check_option(fname, name, v, level)
    level = level or 4
    local rule = OPTION_RULES[name]
    if not rule then
        local known = {}
        for k in walk, OPTION_RULES do known[#known + 1] = k end
        table.sort(known)
        error(format("%s: unknown option %s (known: %s)", fname, check.show(name),
                     table.concat(known, ", ")), level)
    end
    local kind, min, max = rule[1], rule[2], rule[3]
    if kind == "boolean" then
        if type(v) ~= "boolean" then
            error(format("%s: %s must be a boolean (got %s)", fname, name, check.show(v)), level)
        end
        return v
    end
    if type(v) ~= "number" or v ~= v or v < min or v > max or (kind == "integer" and v % 1 ~= 0) then
        error(format("%s: %s must be %s from %s to %s (got %s)", fname, name,
                     kind == "integer" and "an integer" or "a number", min, max, check.show(v)), level)
    end
    if name == "buffer_size" and v % 4096 ~= 0 then
        error(format("%s: buffer_size must be a multiple of 4096 (got %s)", fname, check.show(v)), level)
    end
    return v
end


---------------------------------------------------------------------------
-- The reactor
---------------------------------------------------------------------------

local IoUringReactor = {}
IoUringReactor.__index = IoUringReactor
M.IoUringReactor = IoUringReactor

local Buffer = require("pluvio.uring_buffer").Buffer
M.Buffer = Buffer

-- Memory of ops the kernel would not give back when their reactor was
-- freed: never let go (pl_uring_free says so on stderr).
local leaked = {}
local SHUTDOWN_WAIT = 5     -- s, as pl_uring_free waits

-- The reactor's finalizer.  A reactor is often collected in the same cycle
-- as its runtime, its tasks and the strings and scratch memory their ops
-- use: pins and limbo, referenced from here (and so by the finalizer, not
-- the reactor), keep those alive until the kernel has finished the ops.
local function free_reactor(p, pins, limbo, life)
    life.open = false
    if C.pl_uring_shutdown(p, SHUTDOWN_WAIT) > 0 then
        leaked[#leaked + 1] = { pins, limbo }
    end
    C.pl_uring_free(p)
end

-- A reactor from opts (the rest from M.DEFAULTS).  One the kernel refuses
-- raises, or with soft (made on first use by an operation that returns
-- nil, err, code) gives nil, err, code.
local function new_reactor(fname, opts, soft)
    local o = {}
    local defaults = M.DEFAULTS         -- public: a script may have changed them
    for k, v in walk, defaults do
        o[k] = check_option(fname .. ": uring.DEFAULTS", k, v)
    end
    for k in walk, OPTION_RULES do      -- (one set to nil is not walked above)
        if o[k] == nil then
            check_option(fname .. ": uring.DEFAULTS", k, defaults[k])
        end
    end
    local count_given = false
    if type(opts) ~= "nil" then     -- (not ~= nil: a NULL pointer equals nil)
        if type(opts) ~= "table" then
            error(format("%s: options must be a table (got %s)", fname, type(opts)), 3)
        end
        for k, v in walk, opts do
            o[k] = check_option(fname, k, v)
        end
        count_given = opts.buffer_count ~= nil
    end
    if not count_given then     -- a default pool fits the locked-memory limit (8 MiB for a user)
        local room = C.pl_uring_memlock_buffers(o.buffer_size, o.queue_size, 1)
        if room >= 0 and room < o.buffer_count then
            o.buffer_count = math.max(room, 1)  -- (none fits: the first acquire says so)
        end
    end
    local copts = ffi.new("pl_uring_options_t", {
        queue_size = o.queue_size, buffer_size = o.buffer_size, buffer_count = o.buffer_count,
        submit_depth = o.submit_depth, wait_submit_timeout = o.wait_submit_timeout,
        wait_complete_timeout = o.wait_complete_timeout, sqpoll = o.sqpoll and 1 or 0,
        sqpoll_idle_ms = o.sqpoll_idle_ms,
    })
    local err = ffi.new("int[1]")
    local u = C.pl_uring_new(copts, err)
    local pins, limbo, life = {}, {}, { open = true }
    if u == nil then
        local hint = ""
        if o.sqpoll and err[0] == EPERM then
            hint = " (the kernel refused SQPOLL: it needs CAP_SYS_NICE or a newer kernel; drop sqpoll)"
        elseif err[0] == ENOMEM then
            hint = " (lower queue_size, or raise the locked-memory limit: ulimit -l)"
        elseif err[0] == EMFILE or err[0] == ENFILE then
            hint = " (a ring takes a file descriptor: close files, or raise the limit, ulimit -n)"
        end
        local msg = format("%s: cannot set up io_uring with queue_size %d: %s%s",
                           fname, o.queue_size, errstr(err[0]), hint)
        if soft then
            return nil, msg, ffi_string(C.pl_errname(err[0]))
        end
        error(msg, 3)
    end
    return setmetatable({
        u = ffi.gc(u, function(p) free_reactor(p, pins, limbo, life) end),
        life = life,            -- what other finalizers see of it: open = false once u is freed
        opts = o,
        result = ffi.new("pl_uring_result_t"),
        iov = ffi.new("pl_iovec_t[?]", C.PL_URING_IOV_MAX),   -- readv / writev parts, copied by C
        buffers_reclaimed = 0,
        lent_to = false,        -- registered on no runtime: the runtime its buffers went to last
        bounce = core.scratch_pool(BOUNCE_KEEP),   -- scratch memory for strings
        limbo = limbo,          -- strings and scratch of abandoned ops the kernel may still use
        limbo_seen = 0,         -- pl_uring_abandoned_settled at the limbo's last sweep
        pins = pins,            -- op id -> strings and scratch its parked task's op uses, or false
    }, IoUringReactor)
end

-- uring.reactor{opts}: a reactor from an options table (the rest from M.DEFAULTS).
-- (not tail calls: the errors of new_reactor name our caller's line)
function M.reactor(opts)
    local r = new_reactor("uring.reactor", opts)
    return r
end

function IoUringReactor.new(opts)
    local r = new_reactor("IoUringReactor.new", opts)
    return r
end

-- The seed's builder: IoUringReactor.builder():queue_size(2048):...:build()
local Builder = {}
Builder.__index = Builder

local function self_builder(method, b)
    if getmetatable(b) ~= Builder then
        error(format("IoUringReactor.builder():%s: call it as a method on a builder (b:%s(...)); got %s as self",
                     method, method, type(b)), 3)
    end
end

for name in walk, OPTION_RULES do
    Builder[name] = function(self, v)
        self_builder(name, self)
        self.opts[name] = check_option("IoUringReactor.builder():" .. name, name, v, 3)
        return self
    end
end
-- :sqpoll(idle_ms) turns SQPOLL on with that idle time; :sqpoll() and
-- :sqpoll(true) with the idle time set so far.  :sqpoll(false) turns it off.
function Builder:sqpoll(idle_ms)
    self_builder("sqpoll", self)
    if idle_ms == false then
        self.opts.sqpoll = false
        return self
    end
    if type(idle_ms) ~= "nil" and idle_ms ~= true and type(idle_ms) ~= "number" then
        error(format("IoUringReactor.builder():sqpoll: idle_ms must be an integer from 0 to %d, or true or false (got %s)",
                     OPTION_RULES.sqpoll_idle_ms[3], check.show(idle_ms)), 2)
    end
    self.opts.sqpoll = true
    if type(idle_ms) == "number" then
        self.opts.sqpoll_idle_ms = check_option("IoUringReactor.builder():sqpoll", "sqpoll_idle_ms", idle_ms, 3)
    end
    return self
end

function Builder:build()
    self_builder("build", self)
    local r = new_reactor("IoUringReactor.builder():build", self.opts)
    return r
end

function IoUringReactor.builder()
    return setmetatable({ opts = {} }, Builder)
end

-- self, an io_uring reactor that uring.reactor made (check.made).
local function reactor_self(fname, self)
    check.made(fname, self, IoUringReactor, "an io_uring reactor", "u", "reactors with uring.reactor or the builder", 4)
end

function IoUringReactor:c_reactor()
    reactor_self("IoUringReactor:c_reactor", self)
    return C.pl_uring_reactor(self.u)
end

-- Why rt:register_reactor may not attach it to rt, or nil.  A reactor
-- serves one running runtime: its ops park that runtime's tasks and its
-- polls wake them there, so a second runtime (a nested one) would take the
-- wake-ups of the first's.  Once that run has ended, the next runtime may
-- have it, with the files it opened; not while tasks the run left parked
-- still wait on its ops or buffers: their wakes would go to the new one,
-- and they would wait for good (a later run of theirs: a false deadlock).
local first_slots = ffi.new("uint32_t[2]")     -- (of a task waiting on an op, on a buffer)

function IoUringReactor:_attach_refused(rt)
    local home = self.rt
    if not home or home == rt then
        return nil
    end
    if home.running then
        return "this io_uring reactor is registered on another runtime, which is running (a reactor " ..
               "serves one runtime at a time: make one for each, uring.reactor{...})"
    end
    local ops = C.pl_uring_ops_pending(self.u, home.crt, first_slots)
    local bufs = C.pl_uring_buffer_waiters(self.u, home.crt, first_slots + 1)
    if ops + bufs == 0 then
        return nil
    end
    local what = ops > 0 and format("%d of its operations", ops) or ""
    if bufs > 0 then
        what = what .. (ops > 0 and " and " or "") .. format("%d of its registered buffers", bufs)
    end
    local first = home.slots[first_slots[ops > 0 and 0 or 1]]
    return format("this io_uring reactor is registered on another runtime, whose tasks still wait on %s, " ..
                  "%s first (they were left parked when its run ended, and only it can wake them): run " ..
                  "that runtime until they are done, or kill those tasks first", what, tostring(first))
end

-- Called by rt:register_reactor: ops park their task in C from now on.
function IoUringReactor:attach(rt)
    reactor_self("IoUringReactor:attach", self)
    if getmetatable(rt) ~= pluvio.Runtime then    -- (a table without crt detached the reactor)
        error(format("IoUringReactor:attach: rt must be a runtime (got %s)", type(rt)), 2)
    end
    local refused = self:_attach_refused(rt)    -- (register_reactor and run ask first)
    if refused then
        error("IoUringReactor:attach: " .. refused, 2)
    end
    C.pl_uring_attach(self.u, rt.crt)
    self.rt = rt
end

function IoUringReactor:options()
    reactor_self("IoUringReactor:options", self)
    local o = {}
    for k, v in walk, self.opts do o[k] = v end
    return o
end

-- Figures: sqes, enters, completions, in_flight, in_flight_max,
-- buffer_waits, buffers_free, resubmits, cancels, buffers_reclaimed.
function IoUringReactor:stats()
    reactor_self("IoUringReactor:stats", self)
    local s = ffi.new("pl_uring_stats_t")
    C.pl_uring_get_stats(self.u, s)
    return {
        sqes = s.sqes, enters = s.enters, completions = s.completions,
        in_flight = s.in_flight, in_flight_max = s.in_flight_max,
        buffer_waits = s.buffer_waits, buffers_free = s.buffers_free,
        resubmits = s.resubmits, cancels = s.cancels,
        buffers_reclaimed = self.buffers_reclaimed,
    }
end

-- The io_uring reactor of the running runtime: the first registered one,
-- or (on default runtimes: pluvio.run, the host) one made on first use
-- (with soft, one the kernel refuses gives nil, err, code: new_reactor).
local function reactor_of(rt, fname, depth, soft)
    local r = rt._uring
    if r then
        return r
    end
    local order = rt.reactor_order
    for i = 1, #order do
        if getmetatable(order[i]) == IoUringReactor then
            rt._uring = order[i]
            return order[i]
        end
    end
    if rt.auto_reactors then
        local msg, code
        r, msg, code = new_reactor(fname, nil, soft)
        if not r then
            return nil, msg, code
        end
        rt:register_reactor("io_uring", r)
        rt._uring = r
        return r
    end
    error(fname .. ": no io_uring reactor is registered on this runtime " ..
          "(rt:register_reactor(\"io_uring\", uring.reactor{...}))", 3 + (depth or 0))
end

-- The running task and its runtime's reactor (depth: frames between the
-- user's call and our caller, for the position of errors).
local function context(fname, depth)
    depth = 1 + (depth or 0)
    local t, rt = io_task(fname, depth)
    return t, reactor_of(rt, fname, depth), rt
end

-- The same for an operation that returns nil, err, code when it fails
-- (an open, a connect): a reactor made for it on first use that the
-- kernel refuses (no file descriptor, no locked memory left) is such a
-- failure, and gives nil, err, code here.
local function op_context(fname, depth)
    depth = 1 + (depth or 0)
    local t, rt = io_task(fname, depth)
    local r, msg, code = reactor_of(rt, fname, depth, true)
    if not r then
        return nil, msg, code
    end
    return t, r, rt
end

-- The same for operations that take input (a socket's bytes, a
-- connection): they check first that they run in the task's own coroutine,
-- since an operation a plain coroutine leaves behind may take input that
-- nobody then gets.  soft: as op_context.
local function receive_context(fname, soft)
    local t, rt = current_task(fname, 1)
    local r, msg, code = reactor_of(rt, fname, 1, soft)
    if not r then
        return nil, msg, code
    end
    return t, r, rt
end

-- uring.current(): the io_uring reactor of the running runtime.
function M.current()
    local rt = pluvio.runtime()
    if not rt then
        error("uring.current: no runtime is running", 2)
    end
    local r = reactor_of(rt, "uring.current")
    return r
end

-- Park until op completes; returns res, bytes.  If the task is killed
-- meanwhile, finish() calls _abandon and the kernel op is cancelled; keep
-- (the string or scratch space the kernel reads or fills) then stays
-- referenced until the kernel is done with it.  t.io_rescue (a socket,
-- set by the receive around its run_op) takes over the op instead, whose
-- result its task will now never take (rescue:_rescue(r, op, keep, t) ->
-- true if it took it over): bytes a recv took from a stream, a datagram,
-- must not be lost.  Not set here: a store of
-- nil to a key the task never had, on every file read, made the JIT's
-- traces around the wait 20% slower (4 KiB page-cache reads at QD 32).
local function await(r, t, op, what, keep)
    t.io_reactor = r
    t.io_op = op
    t.io_keep = keep
    if keep ~= nil then         -- (read_fixed has none: nothing stored)
        r.pins[op] = keep
    end
    t.waiting_for = what
    local fname, seq = t.io_fname, t.io_seq
    -- starting the op parked the task in C already
    if not linger(t.rt, t) then
        yielded(t, co_yield(WAIT), fname, seq)
    end
    local u, result = r.u, r.result
    while C.pl_uring_op_take(u, op, result) == 0 do
        park(t, WAIT_IO, op, what)      -- a spurious wake-up: park again
    end
    t.waiting_for = nil
    t.io_reactor = nil
    t.io_keep = nil
    if keep ~= nil then
        r.pins[op] = false
    end
    return result.res, result.bytes
end

local function bounce_put(r, e)
    r.bounce:put(e)
end

-- Scratch space back to its pool, or a string let go, once the kernel is
-- done with the abandoned op that used it.  Only when an abandoned op has
-- settled since the last sweep: a sweep on every abandon made killing n
-- tasks parked on a pipe O(n^2) (20,000: 2.8 s), and one on every bounce
-- a cost per read while an op the kernel keeps (a pipe's) sits there.
local function limbo_sweep(r)
    local limbo, u = r.limbo, r.u
    local settled = C.pl_uring_abandoned_settled(u)
    if settled == r.limbo_seen then
        return
    end
    r.limbo_seen = settled
    local kept = 0
    for i = 1, #limbo do
        local e = limbo[i]
        limbo[i] = nil
        if C.pl_uring_op_settled(u, e.op, e.gen) == 0 then
            kept = kept + 1
            limbo[kept] = e
        elseif type(e.keep) == "table" and e.keep.class then   -- scratch space
            bounce_put(r, e.keep)
        end
    end
end

-- Scratch space of at least len bytes, or nil, -errno (Scratch:get).
local function bounce_get(r, len)
    if r.limbo[1] then
        limbo_sweep(r)
    end
    return r.bounce:get(len)
end

function IoUringReactor:_abandon(t)
    local u, op, keep, rescue = self.u, t.io_op, t.io_keep, t.io_rescue
    t.io_op, t.io_keep, t.io_rescue = nil, nil, nil
    if keep ~= nil then
        self.pins[op] = false   -- to the limbo below, or taken by the rescue
    end
    if rescue and rescue:_rescue(self, op, keep, t) then  -- the socket's now (uring_net.lua)
        return
    end
    local gen = C.pl_uring_op_gen(u, op)
    C.pl_uring_op_abandon(u, op)
    if keep ~= nil then
        if C.pl_uring_op_settled(u, op, gen) == 1 then     -- done already, freed by the abandon
            if type(keep) == "table" and keep.class then
                bounce_put(self, keep)
            end
            return
        end
        local limbo = self.limbo
        if limbo[1] then
            limbo_sweep(self)
        end
        limbo[#limbo + 1] = { op = op, gen = gen, keep = keep }
    end
end

-- Start an op (a C call that returned op id or -errno) and wait for it
-- (keep as for await).
local function run_op(r, t, op, what, keep)
    if op < 0 then
        return op, 0
    end
    local res, bytes
    if op >= OP_INLINE then     -- done inside its submission: the task was not parked
        local result = r.result
        C.pl_uring_op_take(r.u, op - OP_INLINE, result)
        res, bytes = result.res, result.bytes
    else
        res, bytes = await(r, t, op, what, keep)
    end
    if r.limbo[1] then
        limbo_sweep(r)
    end
    return res, bytes
end

---------------------------------------------------------------------------
-- Registered buffers
---------------------------------------------------------------------------

local function acquire(r, t, rt, fname)
    local u, crt = r.u, rt.crt
    local idx = C.pl_uring_buffer_acquire(u, crt, t.slot, t.gen)
    if idx == ENOMEM and C.pl_uring_buffer_ptr(u, 0) == nil then
        -- the pool could not be registered: under a locked-memory limit,
        -- perhaps because the pools of earlier runtimes nobody refers to
        -- still hold it (a finalizer frees them: each run of pluvio.run, or
        -- of a busted suite's pluvio.wrap, makes its own reactor)
        full_collect()
        idx = C.pl_uring_buffer_acquire(u, crt, t.slot, t.gen)
    end
    if idx == EAGAIN then
        t.wait_obj = r
        repeat
            park(t, WAIT_BUFFER, 0, "a registered buffer")
            idx = C.pl_uring_buffer_acquire(u, crt, t.slot, t.gen)
        until idx ~= EAGAIN
        t.wait_obj = nil
    end
    if idx < 0 then
        local o = r.opts
        if idx == ENOBUFS then
            error(fname .. ": this reactor has no registered buffers (buffer_count = 0)", 3)
        end
        if C.pl_uring_buffer_ptr(u, 0) ~= nil then      -- registered: the wait found no memory
            error(format("%s: cannot wait for a registered buffer: %s", fname, errstr(idx)), 3)
        end
        local room = C.pl_uring_memlock_buffers(o.buffer_size, o.queue_size, 1)
        local advice = "lower buffer_count or buffer_size"     -- (no limit applies: the memory itself)
        if room >= 0 then
            advice = format("%s, or raise the locked-memory limit: ulimit -l; the limit, %d KiB, holds about " ..
                            "%d of these beside the rings", advice, C.pl_memlock_limit_kib(), room)
        end
        error(format("%s: cannot register %d buffers of %d bytes: %s (%s)",
                     fname, o.buffer_count, o.buffer_size, errstr(idx), advice), 3)
    end
    local b = setmetatable({
        reactor = r, index = idx, task = t, rt = rt,     -- task: its owner, or false
        base = ffi_cast("uint8_t *", C.pl_uring_buffer_ptr(u, idx)),
        len = r.opts.buffer_size,
    }, Buffer)
    t:_own(b)
    return b
end

-- reactor:acquire_buffer(): a registered buffer; parks (FIFO) while the
-- pool is empty.  The buffer belongs to the calling task: it is released
-- when the task ends if not before.
function IoUringReactor:acquire_buffer()
    reactor_self("IoUringReactor:acquire_buffer", self)
    local t, rt = current_task("IoUringReactor:acquire_buffer")
    if self.rt and self.rt ~= rt then   -- its releases would wake tasks of that runtime only
        error("IoUringReactor:acquire_buffer: the reactor is registered on another runtime", 2)
    end
    if not self.rt then                 -- so would a release by a task of another runtime
        local lent = self.lent_to
        if lent and lent ~= rt and self:stats().buffers_free < self.opts.buffer_count then
            error("IoUringReactor:acquire_buffer: the reactor's buffers are out to tasks of another " ..
                  "runtime (a reactor registered on no runtime lends them to one at a time)", 2)
        end
        self.lent_to = rt
    end
    local b = acquire(self, t, rt, "IoUringReactor:acquire_buffer")
    return b
end

-- A killed task that waited for a buffer stops waiting (a buffer already
-- handed to it goes to the next waiter).
function IoUringReactor:_abandon_wait(t)
    C.pl_uring_buffer_abandon(self.u, t.rt.crt, t.slot, t.gen)
end

---------------------------------------------------------------------------
-- File descriptors: what files (uring_file.lua) and sockets (uring_net.lua) share
---------------------------------------------------------------------------

-- The close of a file or socket whose run ended while a task of that run,
-- left parked, still has an op on it: only that runtime can finish it.
local function left_busy(fname, name)
    return format("%s: a task of the runtime %s was opened in still has an operation on it (that task " ..
                  "was left parked when the runtime stopped running): close it in that runtime, or kill " ..
                  "that task first", fname, name)
end

-- A file that open made, or a socket, that nobody closed is closed when
-- the garbage collector frees it, as io.open's are: its guard holds the
-- fd, -1 once the file closed it (forget_fd).  Only the fd: the ring may
-- be gone, and an op in flight on the file would have kept it alive (a
-- killed task's abandoned op holds the file itself, in the kernel, and
-- never continues).  held: a list of more fds it closes then (a
-- listener's connections no accept took; the owner empties it in place).
local function close_guard(fd, held)
    return ffi.gc(ffi.new("int[1]", fd), function(cell)
        if cell[0] >= 0 then
            C.pl_file_close_sync(cell[0])
            for i = 1, held and #held or 0 do
                C.pl_file_close_sync(held[i])
            end
        end
    end)
end

-- Whether the run of reactor r's runtime ended (or never began): nothing
-- reaps its ring any more.
local function run_ended(r)
    local home = r.rt
    return home ~= pluvio.runtime() and not (home and home.running)
end

-- The close of an fd (a file's, a socket's) of a reactor whose run ended:
-- at once, unless a task that run left parked still has an op on it.
-- Returns the close's result, or nil when it must wait for that run.
local function close_idle(r, fd)
    local rc = C.pl_uring_close_idle(r.u, fd)
    if rc ~= EBUSY then
        return rc
    end
end

local function forget_fd(f)
    f.fd = -1
    local guard = f.guard
    if guard then
        guard[0] = -1
    end
end


-- uring.read_some(fd, len): input from an fd that is not a file (a
-- terminal, a pipe): park until it is readable (a poll in the ring, so the
-- other tasks run meanwhile), then read once what is there, up to len bytes.
-- The read never blocks: when another reader took the input between the
-- poll and the read, the task parks on a new poll.
-- A string, "" at the end of input, or nil, err, code.
function M.read_some(fd, len)
    check.integer("uring.read_some", "fd", fd, 0, 2 ^ 31 - 1)
    check.integer("uring.read_some", "len", len, 1, MAX_IO)
    local t, r, code = receive_context("uring.read_some", true)
    if not t then
        return nil, r, code
    end
    local what = "input on fd " .. fd
    local rc
    repeat
        rc = run_op(r, t, C.pl_uring_poll_in(r.u, t.slot, t.gen, fd), what)
        if rc >= 0 then
            local scratch, err = bounce_get(r, len)
            if not scratch then
                return nil, format("read fd %d: %s%s", fd, errstr(err), core.no_scratch(len)),
                       ffi_string(C.pl_errname(err))
            end
            rc = C.pl_fd_read(fd, scratch.ptr, len)
            if rc >= 0 then
                local s = ffi_string(scratch.ptr, rc)
                bounce_put(r, scratch)
                return s
            end
            bounce_put(r, scratch)
        end
    until rc ~= EAGAIN
    local note = rc == EBADF and " (not open, or open only for writing)" or ""
    return nil, format("read fd %d: %s%s", fd, errstr(rc), note), ffi_string(C.pl_errname(rc))
end

-- What the installed parts (files, sockets, I/O queues) build on; uring_file.lua adds
-- fixed_io and fixed_result for the queues.
M._internal = {
    context = context, op_context = op_context, receive_context = receive_context, current_task = current_task, run_op = run_op,
    bounce_get = bounce_get, bounce_put = bounce_put,
    run_ended = run_ended, close_idle = close_idle, close_guard = close_guard, forget_fd = forget_fd,
    left_busy = left_busy,
    WAIT = WAIT, park = park, WAIT_IO = WAIT_IO, yielded = yielded, OP_INLINE = OP_INLINE,
    io_task = io_task, acquire = acquire, reactor_self = reactor_self,
    live_buffer = require("pluvio.uring_buffer").live_buffer,
}

-- uring.lockable_buffers(buffer_size[, queue_size[, share]]): how many
-- registered buffers of that size the locked-memory limit holds beside a
-- ring of queue_size entries (default uring.DEFAULTS.queue_size), or nil
-- when no limit applies (root, CAP_IPC_LOCK, ulimit -l unlimited); in a
-- 1/share part of it (default 1: all), for one of share processes of the
-- user (the limit is the user's).
-- (fname: the public function the user called, which called this one:
-- bench.fit_pool's errors name it.)
local function lockable_buffers(fname, buffer_size, queue_size, share)
    check_option(fname, "buffer_size", buffer_size, 4)
    if type(queue_size) == "nil" then
        queue_size = M.DEFAULTS.queue_size
        check_option(fname .. ": uring.DEFAULTS", "queue_size", queue_size, 4)
    else
        check_option(fname, "queue_size", queue_size, 4)
    end
    if type(share) == "nil" then
        share = 1
    end
    check.integer(fname, "share", share, 1, 1024, 4)
    local n = C.pl_uring_memlock_buffers(buffer_size, queue_size, share)
    if n < 0 then
        return nil
    end
    return n
end
M._lockable_buffers = lockable_buffers

function M.lockable_buffers(buffer_size, queue_size, share)
    local n = lockable_buffers("uring.lockable_buffers", buffer_size, queue_size, share)
    return n
end

-- The reactor's acquire, reachable from the module for convenience.
function M.acquire_buffer()
    -- (checked as a receive is: a buffer handed in C to a wait that a plain
    -- coroutine left behind would be out of the pool until the task ends)
    local t, r, rt = receive_context("uring.acquire_buffer")
    local b = acquire(r, t, rt, "uring.acquire_buffer")
    return b
end

require("pluvio.uring_file").install(M)
require("pluvio.uring_net").install(M)
require("pluvio.uring_tcp").install(M)
require("pluvio.uring_queue").install(M)

return M
