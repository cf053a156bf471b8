-- pluvio.uring: the io_uring reactor, files (DmaFile with O_DIRECT, File
-- buffered) and registered buffers.
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
local errstr = core.errstr
local ffi_string, ffi_copy, ffi_fill, ffi_cast = ffi.string, ffi.copy, ffi.fill, ffi.cast
local type, format, setmetatable, getmetatable = type, string.format, setmetatable, getmetatable
local tonumber, floor = tonumber, math.floor
local walk = next          -- walk tables with `for k, v in walk, t`, not pairs(): see init.lua
local bit = require "bit"

local M = {}

local EAGAIN, ENOBUFS, ENOMEM, EPERM, ECANCELED, EBUSY = -11, -105, -12, -1, -125, -16
local AT_FDCWD, AT_EMPTY_PATH, AT_REMOVEDIR = -100, 0x1000, 0x200
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
    buffer_count = { "integer", 0, 65536 },
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

-- A path for the kernel: a string without NUL bytes (the kernel would stop
-- at the first one and act on another file: "x\0.bak" would unlink "x").
local function check_path(fname, argname, path, level)
    level = level or 3
    check.string(fname, argname, path, level + 1)
    check.no_nul(fname, argname, path, level + 1)
    return path
end

---------------------------------------------------------------------------
-- The reactor
---------------------------------------------------------------------------

local IoUringReactor = {}
IoUringReactor.__index = IoUringReactor
M.IoUringReactor = IoUringReactor

local Buffer = {}
Buffer.__index = Buffer
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

local function new_reactor(fname, opts)
    local o = {}
    for k, v in walk, M.DEFAULTS do     -- public: a script may have changed them
        o[k] = check_option(fname .. ": uring.DEFAULTS", k, v)
    end
    if type(opts) ~= "nil" then     -- (not ~= nil: a NULL pointer equals nil)
        if type(opts) ~= "table" then
            error(format("%s: options must be a table (got %s)", fname, type(opts)), 3)
        end
        for k, v in walk, opts do
            o[k] = check_option(fname, k, v)
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
        end
        error(format("%s: cannot set up io_uring with queue_size %d: %s%s",
                     fname, o.queue_size, errstr(err[0]), hint), 3)
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

function IoUringReactor:c_reactor()
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
    C.pl_uring_attach(self.u, rt.crt)
    self.rt = rt
end

function IoUringReactor:options()
    check.self("IoUringReactor:options", self, IoUringReactor, "an io_uring reactor")
    local o = {}
    for k, v in walk, self.opts do o[k] = v end
    return o
end

-- Figures: sqes, enters, completions, in_flight, in_flight_max,
-- buffer_waits, buffers_free, resubmits, cancels, buffers_reclaimed.
function IoUringReactor:stats()
    check.self("IoUringReactor:stats", self, IoUringReactor, "an io_uring reactor")
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
-- or (on default runtimes: pluvio.run, the host) one made on first use.
local function reactor_of(rt, fname, depth)
    local r = rt._uring
    if r then
        return r
    end
    for _, obj in walk, rt.reactors do
        if getmetatable(obj) == IoUringReactor then
            rt._uring = obj
            return obj
        end
    end
    if rt.auto_reactors then
        r = new_reactor(fname, nil)
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

-- The same for operations that take input (a socket's bytes, a
-- connection): they check first that they run in the task's own coroutine,
-- since an operation a plain coroutine leaves behind may take input that
-- nobody then gets.
local function receive_context(fname)
    local t, rt = current_task(fname, 1)
    return t, reactor_of(rt, fname, 1), rt
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
-- result its task will now never take (rescue:_rescue(r, op, keep) ->
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
-- done with the abandoned op that used it.
local function limbo_sweep(r)
    local limbo, u = r.limbo, r.u
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

local function bounce_get(r, len, fname)
    if r.limbo[1] then
        limbo_sweep(r)
    end
    return r.bounce:get(len, fname)
end

function IoUringReactor:_abandon(t)
    local u, op, keep, rescue = self.u, t.io_op, t.io_keep, t.io_rescue
    t.io_op, t.io_keep, t.io_rescue = nil, nil, nil
    if keep ~= nil then
        self.pins[op] = false   -- to the limbo below, or taken by the rescue
    end
    if rescue and rescue:_rescue(self, op, keep) then  -- the socket's now (uring_net.lua)
        return
    end
    local gen = C.pl_uring_op_gen(u, op)
    C.pl_uring_op_abandon(u, op)
    if keep ~= nil then
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
        error(format("%s: cannot register %d buffers of %d bytes: %s " ..
                     "(lower buffer_count or buffer_size, or raise the locked-memory limit: ulimit -l)",
                     fname, o.buffer_count, o.buffer_size, errstr(idx)), 3)
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
    check.self("IoUringReactor:acquire_buffer", self, IoUringReactor, "an io_uring reactor")
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

local function live_buffer(fname, b)
    if getmetatable(b) ~= Buffer then
        error(format("%s: expected a registered buffer (got %s)", fname, type(b)), 3)
    end
    if not b.base then
        error(fname .. ": the buffer was released" .. (b.gone or ""), 3)
    end
    return b
end

-- Validate [off, off + len) against the buffer; defaults: off 0, len rest.
local function span(fname, b, len, off)
    if type(off) == "nil" then      -- (not off or 0: false is no offset; nor == nil: NULL equals nil)
        off = 0
    end
    if type(off) ~= "number" or off % 1 ~= 0 or off < 0 or off > b.len then
        error(format("%s: offset must be an integer from 0 to %d (got %s)", fname, b.len, check.show(off)), 3)
    end
    if type(len) == "nil" then
        len = b.len - off
    elseif type(len) ~= "number" or len % 1 ~= 0 or len < 0 or off + len > b.len then
        error(format("%s: length must be an integer from 0 to %d (got %s)", fname, b.len - off,
                     check.show(len)), 3)
    end
    return len, off
end

function Buffer:ptr()
    live_buffer("Buffer:ptr", self)
    return self.base
end

function Buffer:size()
    live_buffer("Buffer:size", self)
    return self.len
end

-- fill(byte[, len[, off]]): set bytes to byte (0-255).
function Buffer:fill(byte, len, off)
    live_buffer("Buffer:fill", self)
    if type(byte) ~= "number" or byte % 1 ~= 0 or byte < 0 or byte > 255 then
        error("Buffer:fill: byte must be an integer from 0 to 255 (got " .. check.show(byte) .. ")", 2)
    end
    len, off = span("Buffer:fill", self, len, off)
    ffi_fill(self.base + off, len, byte)
    return self
end

-- write(str[, off]): copy a string into the buffer at off (default 0).
function Buffer:write(str, off)
    live_buffer("Buffer:write", self)
    check.string("Buffer:write", "data", str)
    local _, o = span("Buffer:write", self, 0, off)
    if #str > self.len - o then     -- (span would name a length the caller never gave)
        error(format("Buffer:write: data of %d bytes does not fit at offset %d (the buffer holds %d bytes)",
                     #str, o, self.len), 2)
    end
    ffi_copy(self.base + o, str, #str)
    return #str
end

-- tostring([len[, off]]): the bytes as a Lua string.
function Buffer:tostring(len, off)
    live_buffer("Buffer:tostring", self)
    len, off = span("Buffer:tostring", self, len, off)
    return ffi_string(self.base + off, len)
end

-- checksum([len[, off]]): 64-bit checksum of the bytes, as 16 hex digits.
function Buffer:checksum(len, off)
    live_buffer("Buffer:checksum", self)
    len, off = span("Buffer:checksum", self, len, off)
    return bit.tohex(C.pl_checksum64(self.base + off, len, 0), 16)
end

-- fill_pattern(seed, file_offset[, len[, off]]): bytes that depend only on
-- seed and the file offset they will be written at (for verification).
function Buffer:fill_pattern(seed, file_offset, len, off)
    live_buffer("Buffer:fill_pattern", self)
    check.integer("Buffer:fill_pattern", "seed", seed, 0, 2 ^ 53)
    check.integer("Buffer:fill_pattern", "file_offset", file_offset, 0, 2 ^ 53)
    len, off = span("Buffer:fill_pattern", self, len, off)
    C.pl_fill_pattern(self.base + off, len, seed, file_offset)
    return self
end

-- release(): give the buffer back to the pool (to the first waiter, if any).
function Buffer:release()
    if getmetatable(self) ~= Buffer then
        error("Buffer:release: call it as a method on a buffer (buf:release())", 2)
    end
    if not self.base then
        error("Buffer:release: the buffer was already released", 2)
    end
    self.base = nil
    if self.task then
        self.task:_disown(self)
    end
    C.pl_uring_buffer_release(self.reactor.u, self.rt.crt, self.index)
    return true
end

-- The buffer's owner becomes t (a task, or false: none).
local function set_owner(b, t)
    if b.task then
        b.task:_disown(b)
    end
    b.task = t
    if t then
        t:_own(b)
    end
    return b
end

-- give(task): the buffer belongs to task from now on (a live task of its
-- runtime), and is released when that task ends, not when its giver does:
-- for handing a filled buffer to the task that writes it out.
function Buffer:give(task)
    live_buffer("Buffer:give", self)
    if getmetatable(task) ~= pluvio.Task then
        error(format("Buffer:give: task must be a task (got %s)", check.show(task)), 2)
    end
    if task.rt ~= self.rt then
        error("Buffer:give: the task belongs to another runtime than the buffer", 2)
    end
    if not task.live then
        error(format("Buffer:give: %s has ended: it could never release the buffer", tostring(task)), 2)
    end
    return set_owner(self, task)
end

-- take(): the buffer belongs to the running task from now on.
function Buffer:take()
    live_buffer("Buffer:take", self)
    local t, rt = current_task("Buffer:take")
    if rt ~= self.rt then
        error("Buffer:take: the buffer belongs to another runtime than the running task", 2)
    end
    return set_owner(self, t)
end

-- detach(): the buffer belongs to no task: only release() gives it back
-- (for a buffer in a channel whose reader is not known yet; the reader
-- takes it).
function Buffer:detach()
    live_buffer("Buffer:detach", self)
    return set_owner(self, false)
end

-- owner(): the task the buffer belongs to, or nil when detached.
function Buffer:owner()
    live_buffer("Buffer:owner", self)
    return self.task or nil
end

-- Its owner ended without releasing it.
function Buffer:_task_exit(t)
    if self.base then
        self.base = nil
        self.gone = format(" when its task %q ended (give it to another task, or detach it, to keep it)",
                           t and t:name() or "?")
        self.reactor.buffers_reclaimed = self.reactor.buffers_reclaimed + 1
        C.pl_uring_buffer_release(self.reactor.u, self.rt.crt, self.index)
    end
end

function Buffer:__tostring()
    return format("registered buffer #%d (%d bytes%s)", self.index, self.len,
                  self.base and "" or ", released")
end

---------------------------------------------------------------------------
-- Files
---------------------------------------------------------------------------

local File = {}
File.__index = File
M.File = File

local DmaFile = setmetatable({}, { __index = File })
DmaFile.__index = DmaFile
M.DmaFile = DmaFile

local function is_file(f)
    local mt = getmetatable(f)
    return mt == File or mt == DmaFile
end

-- The name a File method goes by in errors: DmaFile's share File's code.
local function file_fname(fname, f)
    if f and f.direct then
        return (fname:gsub("^File", "DmaFile"))
    end
    return fname
end

local function self_file(fname, f)
    if not is_file(f) then
        error(format("%s: call it as a method on a file (f:%s(...)); got %s as self",
                     fname, fname:match("[:.](.*)$"), type(f)), 3)
    end
    if f.fd < 0 then
        error(file_fname(fname, f) .. ": the file is closed (" .. f.path .. ")", 3)
    end
    return f
end

function File:describe()
    if not is_file(self) then
        error(format("File:describe: call it as a method on a file (f:describe(...)); got %s as self", type(self)), 2)
    end
    return "io on " .. self.path
end

function File:__tostring()
    return format("%s %s (fd %d%s)", self.direct and "DmaFile" or "File", self.path, self.fd,
                  self.fd < 0 and ", closed" or "")
end

-- The message of a failed operation: what, on which file, errno and a hint.
local function fail(f, what, rc, detail, bytes)
    local hint = ""
    if f.direct and rc == -22 then
        hint = format(" (O_DIRECT needs offset and length multiples of %d and memory aligned to %d on this file)",
                      f.offset_align, f.mem_align)
    elseif rc == ECANCELED and f.fd and f.fd < 0 then
        hint = " (the file was closed)"
    end
    local msg = format("%s %s%s: %s%s", what, f.path, detail or "", errstr(rc), hint)
    if bytes and bytes > 0 then
        msg = msg .. format(" (%d bytes done before the error)", bytes)
    end
    return nil, msg, ffi_string(C.pl_errname(rc)), bytes or 0
end

-- O_DIRECT alignment rules, checked before anything is submitted.
local function check_direct(fname, f, offset, len, addr)
    if not f.direct then
        return
    end
    local a = f.offset_align
    if offset % a ~= 0 then
        error(format("%s: O_DIRECT offset %d is not a multiple of %d (the file's block size) on %s",
                     file_fname(fname, f), offset, a, f.path), 3)
    end
    if len % a ~= 0 then
        error(format("%s: O_DIRECT length %d is not a multiple of %d (the file's block size) on %s",
                     file_fname(fname, f), len, a, f.path), 3)
    end
    local at = addr and tonumber(ffi_cast("uintptr_t", addr))
    if at and at % f.mem_align ~= 0 then
        error(format("%s: O_DIRECT buffer address 0x%x is not aligned to %d bytes on %s",
                     file_fname(fname, f), at, f.mem_align, f.path), 3)
    end
end

local function check_offset(fname, offset, f)
    if type(offset) ~= "number" or offset ~= offset or offset % 1 ~= 0 or offset < 0 or offset > 2 ^ 62 then
        error(format("%s: offset must be an integer >= 0 (got %s)", file_fname(fname, f), check.show(offset)), 3)
    end
end

local function check_len(fname, len, max, f, min)
    min = min or 0
    if type(len) ~= "number" or len ~= len or len % 1 ~= 0 or len < min or len > max then
        error(format("%s: length must be an integer from %d to %d (got %s)", file_fname(fname, f), min, max,
                     check.show(len)), 3)
    end
end

-- The close of a file or socket whose run ended while a task of that run,
-- left parked, still has an op on it: only that runtime can finish it.
local function left_busy(fname, name)
    return format("%s: a task of the runtime %s was opened in still has an operation on it (that task " ..
                  "was left parked when the runtime stopped running): close it in that runtime, or kill " ..
                  "that task first", fname, name)
end

-- A file belongs to the runtime it was opened in: its ops go to that
-- runtime's ring, which another runtime's loop never reaps (the task would
-- wait for good).
local function foreign_file(fname, f, level)
    error(format("%s: %s was opened in another runtime (its io_uring reactor is that runtime's): " ..
                 "use it there, or open it again in this one", file_fname(fname, f), f.path), level + 1)
end

-- The running task for an operation on file f, and f's reactor (called by
-- the method itself, or by a helper it tail-calls: errors name the user).
local function file_task(fname, f)
    local t, rt = io_task(fname, 1)
    local r = f.reactor
    if r.rt ~= rt then
        foreign_file(fname, f, 3)
    end
    return t, r
end

local statx_buf_size = C.pl_uring_statx_size()

local function stat_table(raw)
    local s = ffi.new("pl_file_stat_t")
    C.pl_uring_statx_decode(raw, s)
    return {
        size = s.size, blocks = s.blocks, blksize = s.blksize, mode = s.mode,
        uid = s.uid, gid = s.gid, nlink = s.nlink, ino = s.ino,
        atime = s.atime, mtime = s.mtime, ctime = s.ctime, btime = s.btime,
        dio_mem_align = s.dio_mem_align, dio_offset_align = s.dio_offset_align,
        dev_major = s.dev_major, dev_minor = s.dev_minor,
        type = bit.band(s.mode, 0xF000) == 0x8000 and "file"
            or bit.band(s.mode, 0xF000) == 0x4000 and "directory"
            or bit.band(s.mode, 0xF000) == 0xA000 and "link"
            or bit.band(s.mode, 0xF000) == 0x6000 and "block device" or "other",
    }
end

local function statx_op(r, t, dirfd, path, flags, what)
    local raw = ffi.new("uint8_t[?]", statx_buf_size)
    local rc = run_op(r, t, C.pl_uring_statx(r.u, t.slot, t.gen, dirfd, path, flags, raw), what,
                      { path, raw })
    if rc < 0 then
        return nil, rc
    end
    return stat_table(raw)
end

local function wrap_fd(cls, r, fd, path, direct)
    return setmetatable({
        reactor = r, fd = fd, path = path, direct = direct,
        offset_align = 1, mem_align = 1,
    }, cls)
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

-- Learn the O_DIRECT rules of an open file (STATX_DIOALIGN where the kernel
-- reports it, else the file system's block size).
local function learn_alignment(f, t)
    if not f.direct then
        return
    end
    local st = statx_op(f.reactor, t, f.fd, "", AT_EMPTY_PATH, f)
    if st and st.dio_offset_align > 0 then
        f.offset_align, f.mem_align = st.dio_offset_align, st.dio_mem_align
    else
        f.offset_align = 512
        f.mem_align = 512
    end
end

local function open_file(cls, fname, direct, path, mode, perms)
    check_path(fname, "path", path, 4)         -- (4: the user called File.open, which called us)
    if type(mode) == "nil" then     -- (not == nil: a NULL pointer equals nil)
        mode = "r"
    end
    check.string(fname, "mode", mode, 4)
    local flags = C.pl_file_flags(mode, direct and 1 or 0)
    if flags < 0 or mode:find("\0", 1, true) then     -- (C reads "r\0x" as "r")
        error(format('%s: mode must be one of "r", "w", "a", "r+", "w+", "a+", each also with a "b" (got %s)',
                     fname, check.show(mode)), 3)
    end
    if type(perms) == "nil" then
        perms = 420     -- 0644
    end
    check.integer(fname, "perms", perms, 0, 4095, 4)
    local t, r = context(fname, 1)
    local fd = run_op(r, t, C.pl_uring_openat(r.u, t.slot, t.gen, path, flags, perms), path, path)
    if fd < 0 then
        local hint = ""
        if direct and fd == -22 then
            hint = " (this file system may not support O_DIRECT: use uring.File)"
        end
        -- (not the file: its O_DIRECT rules, which fail would cite, are not known yet)
        local _, msg, code = fail({ path = path }, "open", fd, format(" (mode %q)", mode))
        return nil, msg .. hint, code
    end
    local f = wrap_fd(cls, r, fd, path, direct)
    f.guard = close_guard(fd)
    t:_own(f)               -- a kill at the statx below closes the fd
    learn_alignment(f, t)
    t:_disown(f)
    return f
end

-- DmaFile.open(path[, mode[, perms]]): open with O_DIRECT through io_uring.
function DmaFile.open(path, mode, perms)
    local f, err, code = open_file(DmaFile, "DmaFile.open", true, path, mode, perms)
    return f, err, code
end

-- File.open(path[, mode[, perms]]): open buffered through io_uring.
function File.open(path, mode, perms)
    local f, err, code = open_file(File, "File.open", false, path, mode, perms)
    return f, err, code
end

local function new_from_fd(cls, fname, direct, fd, path)
    check.integer(fname, "fd", fd, 0, 2 ^ 31 - 1, 4)
    if path ~= nil then     -- (every error about the file names it: File:read's concatenates it)
        check.string(fname, "name", path, 4)
    end
    local has = C.pl_file_fd_direct(fd)
    if has < 0 then
        error(format("%s: fd %d is not open (%s)", fname, fd, errstr(has)), 3)
    elseif direct and has == 0 then
        error(format("%s: fd %d was not opened with O_DIRECT (wrap it with File.new, or open it " ..
                     "with O_DIRECT)", fname, fd), 3)
    elseif not direct and has == 1 then
        error(format("%s: fd %d was opened with O_DIRECT (wrap it with DmaFile.new, which checks " ..
                     "the O_DIRECT rules)", fname, fd), 3)
    end
    local t, r = context(fname, 1)
    local f = wrap_fd(cls, r, fd, path or ("fd " .. fd), direct)    -- (no guard: the fd came from the caller)
    learn_alignment(f, t)
    return f
end

-- DmaFile.new(fd[, name]): wrap an fd opened with O_DIRECT; close() closes it.
function DmaFile.new(fd, name)
    local f = new_from_fd(DmaFile, "DmaFile.new", true, fd, name)
    return f
end

function File.new(fd, name)
    local f = new_from_fd(File, "File.new", false, fd, name)
    return f
end

-- What read_fixed / write_fixed return for an op's result: the bytes, or
-- nil, err, ... (a write the device stopped taking without an error is
-- ENOSPC).  Shared with the I/O queue's wait.
local function fixed_result(f, write, offset, len, res, bytes)
    if res < 0 then
        return fail(f, write and "write" or "read", res, format(" (offset %d, %d bytes)", offset, len), bytes)
    end
    if write and res < len then
        return fail(f, "write", -28, format(" (offset %d, %d bytes)", offset, len), res)
    end
    return res
end

-- read_fixed / write_fixed: the checks and the op, one body for both (and
-- for an I/O queue's, which starts the op on queue with tag instead).
local function fixed_io(self, fname, write, buf, offset, len, queue, tag)
    self_file(fname, self)
    live_buffer(fname, buf)
    check_offset(fname, offset, self)
    if type(len) == "nil" then      -- (not == nil: a NULL pointer equals nil)
        len = buf.len
    else
        check_len(fname, len, buf.len, self)
    end
    local r = self.reactor
    if buf.reactor ~= r then
        error(fname .. ": the buffer belongs to another io_uring reactor", 2)  -- (tail-called)
    end
    check_direct(fname, self, offset, len, buf.base)
    if queue then
        return queue:_start(self, write, buf, offset, len, tag)
    end
    local t = file_task(fname, self)    -- (tail-called)
    local start = write and C.pl_uring_write or C.pl_uring_read
    local res, bytes = run_op(r, t, start(r.u, t.slot, t.gen, self.fd, buf.base, len, offset, buf.index), self)
    return fixed_result(self, write, offset, len, res, bytes)
end

-- f:read_fixed(buf, offset[, len]): read into a registered buffer; returns
-- the bytes read (fewer only at end of file) or nil, err.
function File:read_fixed(buf, offset, len)
    return fixed_io(self, "File:read_fixed", false, buf, offset, len)  -- a tail call: errors point at our caller
end

-- f:write_fixed(buf, offset[, len]): write from a registered buffer; returns
-- the bytes written (all of them; a short write is continued) or nil, err.
function File:write_fixed(buf, offset, len)
    return fixed_io(self, "File:write_fixed", true, buf, offset, len)
end

-- f:read(offset, len): the bytes as a string (shorter only at end of file).
function File:read(offset, len)
    self_file("File:read", self)
    check_offset("File:read", offset, self)
    check_len("File:read", len, MAX_IO, self)
    check_direct("File:read", self, offset, len)
    local t, r = file_task("File:read", self)
    local scratch = bounce_get(r, len, "File:read")
    local res, bytes = run_op(r, t, C.pl_uring_read(r.u, t.slot, t.gen, self.fd, scratch.ptr, len, offset, -1),
                              self, scratch)
    if res < 0 then
        -- the bytes read before the error, as a 5th value: from a pipe or
        -- a socket wrapped with File.new they cannot be read again
        local got = bytes and bytes > 0 and ffi_string(scratch.ptr, bytes) or nil
        bounce_put(r, scratch)
        local _, msg, code, n = fail(self, "read", res, format(" (offset %d, %d bytes)", offset, len), bytes)
        if got then
            return nil, msg, code, n, got
        end
        return nil, msg, code, n
    end
    local s = ffi_string(scratch.ptr, res)
    bounce_put(r, scratch)
    return s
end

-- f:write(offset, data): write a string; returns #data or nil, err.
function File:write(offset, data)
    self_file("File:write", self)
    check_offset("File:write", offset, self)
    check.string("File:write", "data", data)
    local len = #data
    check_len("File:write", len, MAX_IO, self)
    check_direct("File:write", self, offset, len)
    local t, r = file_task("File:write", self)
    local scratch = bounce_get(r, len, "File:write")
    ffi_copy(scratch.ptr, data, len)
    local res, bytes = run_op(r, t, C.pl_uring_write(r.u, t.slot, t.gen, self.fd, scratch.ptr, len, offset, -1),
                              self, scratch)
    bounce_put(r, scratch)
    if res < 0 then
        return fail(self, "write", res, format(" (offset %d, %d bytes)", offset, len), bytes)
    end
    if res < len then
        return fail(self, "write", -28, format(" (offset %d, %d bytes)", offset, len), res)
    end
    return res
end

-- The parts of a readv / writev as iovecs (in the reactor's array, which C
-- copies); returns their count, total bytes and what the op must keep.
local function vector(fname, f, r, offset, parts, lens, strings_ok)
    local kinds = strings_ok and "registered buffers or strings" or "registered buffers"
    if type(parts) ~= "table" then
        error(format("%s: parts must be a list of %s (got %s)", fname, kinds, check.show(parts)), 3)
    end
    local n, max = #parts, C.PL_URING_IOV_MAX
    if n < 1 or n > max then
        error(format("%s: parts must hold 1 to %d entries (got %d)", fname, max, n), 3)
    end
    local last = table.maxn(parts)  -- (# may stop at a hole: the parts after it were dropped)
    if last ~= n then
        error(format("%s: parts has a hole: entry %d is nil, entry %d is not", fname, n + 1, last), 3)
    end
    if type(lens) ~= "nil" and type(lens) ~= "table" then
        error(format("%s: lens must be nil or a list of byte counts (got %s)", fname, check.show(lens)), 3)
    end
    local iov, total = r.iov, 0
    local keep              -- the strings among the parts (they must outlive a killed op;
                            -- a registered buffer's memory is C's, counted in use by C)
    for i = 1, n do
        local p = parts[i]
        local ptr, size
        if getmetatable(p) == Buffer then
            if not p.base then
                error(format("%s: part %d, %s, was released", fname, i, tostring(p)), 3)
            end
            if p.reactor ~= r then
                error(format("%s: part %d belongs to another io_uring reactor", fname, i), 3)
            end
            ptr, size = p.base, p.len
        elseif strings_ok and type(p) == "string" then
            ptr, size = p, #p
        else
            error(format("%s: part %d must be a registered buffer%s (got %s)", fname, i,
                         strings_ok and " or a string" or "", check.show(p)), 3)
        end
        local len = size
        if lens then
            len = lens[i]
            if type(len) ~= "number" or len % 1 ~= 0 or len < 0 or len > size then
                error(format("%s: lens[%d] must be an integer from 0 to %d, the size of part %d (got %s)",
                             fname, i, size, i, check.show(len)), 3)
            end
        end
        if f.direct then
            local a = f.offset_align
            if len % a ~= 0 then
                error(format("%s: O_DIRECT length %d of part %d is not a multiple of %d (the file's " ..
                             "block size) on %s", file_fname(fname, f), len, i, a, f.path), 3)
            end
            local at = tonumber(ffi_cast("uintptr_t", ptr))
            if at % f.mem_align ~= 0 then
                error(format("%s: O_DIRECT address 0x%x of part %d is not aligned to %d bytes on %s " ..
                             "(a string is aligned only by chance: use registered buffers)", file_fname(fname, f), at, i, f.mem_align, f.path), 3)
            end
        end
        iov[i - 1].base = ffi_cast("void *", ptr)
        iov[i - 1].len = len
        total = total + len
        if type(p) == "string" then
            keep = keep or {}
            keep[#keep + 1] = p
        end
    end
    if total > MAX_IO then
        error(format("%s: the parts hold %d bytes; one operation moves at most %d", fname, total, MAX_IO), 3)
    end
    if f.direct and offset % f.offset_align ~= 0 then
        error(format("%s: O_DIRECT offset %d is not a multiple of %d (the file's block size) on %s",
                     file_fname(fname, f), offset, f.offset_align, f.path), 3)
    end
    return n, total, keep   -- C counts registered parts in use, as for read_fixed
end

-- readv / writev: the checks and the op, one body for both.
local function vectored_io(self, fname, write, offset, parts, lens)
    self_file(fname, self)
    check_offset(fname, offset, self)
    local t, r = file_task(fname, self)     -- (tail-called)
    local n, total, keep = vector(fname, self, r, offset, parts, lens, write)
    local start = write and C.pl_uring_writev or C.pl_uring_readv
    local res, bytes = run_op(r, t, start(r.u, t.slot, t.gen, self.fd, r.iov, n, offset), self, keep)
    local what = write and "writev" or "readv"
    if res < 0 then
        return fail(self, what, res, format(" (offset %d, %d bytes in %d parts)", offset, total, n), bytes)
    end
    if write and res < total then   -- the device stopped taking data without an error
        return fail(self, what, -28, format(" (offset %d, %d bytes in %d parts)", offset, total, n), res)
    end
    return res
end

-- f:readv(offset, bufs[, lens]): read into registered buffers in order (lens[i]
-- bytes into bufs[i], default all of it); returns the bytes read (fewer only
-- at end of file) or nil, err.
function File:readv(offset, bufs, lens)
    return vectored_io(self, "File:readv", false, offset, bufs, lens)  -- a tail call, as above
end

-- f:writev(offset, parts[, lens]): write registered buffers and strings in
-- order, as one operation; returns the bytes written (all of them) or nil, err.
function File:writev(offset, parts, lens)
    return vectored_io(self, "File:writev", true, offset, parts, lens)
end

-- An op on the file's fd with no data: start(u, slot, gen, fd, ...).
local function simple_op(f, fname, what, start, ...)
    self_file(fname, f)
    local t, r = file_task(fname, f)     -- (tail-called)
    local res = run_op(r, t, start(r.u, t.slot, t.gen, f.fd, ...), f)
    if res < 0 then
        return fail(f, what, res)
    end
    return true
end

-- (Tail calls here and below: an error then points at our caller's line.)
function File:fsync()
    return simple_op(self, "File:fsync", "fsync", C.pl_uring_fsync, 0)
end

function File:fdatasync()
    return simple_op(self, "File:fdatasync", "fdatasync", C.pl_uring_fsync, 1)
end

-- f:fallocate(offset, len[, mode]): reserve space (mode as fallocate(2)).
-- (len 0 is the kernel's EINVAL, which would name no argument: on a DmaFile
-- the O_DIRECT hint would even blame the alignment)
function File:fallocate(offset, len, mode)
    self_file("File:fallocate", self)
    check_offset("File:fallocate", offset, self)
    check_len("File:fallocate", len, 2 ^ 62, self, 1)
    if type(mode) == "nil" then     -- (not mode or 0: false is no mode; nor == nil: NULL equals nil)
        mode = 0
    end
    check.integer(file_fname("File:fallocate", self), "mode", mode, 0, 255)
    return simple_op(self, "File:fallocate", "fallocate", C.pl_uring_fallocate, mode, offset, len)
end

-- f:statx(): size, blocks, mode, times, dio alignment... as a table.
function File:statx()
    self_file("File:statx", self)
    local t, r = file_task("File:statx", self)
    local st, rc = statx_op(r, t, self.fd, "", AT_EMPTY_PATH, self)
    if not st then
        return fail(self, "statx", rc)
    end
    return st
end

-- f:truncate(len): set the size (synchronous: no io_uring op before Linux 6.9).
function File:truncate(len)
    self_file("File:truncate", self)
    check_len("File:truncate", len, 2 ^ 62, self)
    local rc = C.pl_file_truncate(self.fd, len)
    if rc < 0 then
        return fail(self, "truncate", rc)
    end
    return true
end

-- f:close(): cancel what other tasks wait for on the file, then close it
-- through io_uring.  Closing twice returns false.
function File:close()
    if not is_file(self) then
        error("File:close: call it as a method on a file (f:close())", 2)
    end
    if self.fd < 0 then
        return false        -- closed already: as a socket's, an endpoint's, a channel's close
    end
    local ended = run_ended(self.reactor)
    local rc = ended and close_idle(self.reactor, self.fd)
    if rc then
        forget_fd(self)
        if rc < 0 then
            return fail(self, "close", rc)
        end
        return true
    end
    if ended then
        error(left_busy("File:close", self.path), 2)
    end
    local t, r = file_task("File:close", self)  -- (first: raising must leave the file open)
    local fd = self.fd
    -- Other tasks' ops on the fd are cancelled first, as a socket's: a read
    -- of a pipe or FIFO would otherwise wait for good, holding the file.
    local op = C.pl_uring_close_file(r.u, t.slot, t.gen, fd)
    if op < 0 then          -- not started (no SQE, no op slot): still open, to close again
        return fail(self, "close", op)
    end
    forget_fd(self)
    local res = run_op(r, t, op, self)
    if res < 0 then
        return fail(self, "close", res)
    end
    return true
end

DmaFile.__tostring = File.__tostring

-- Its opening task was killed before open returned it: nobody else has the fd.
function File:_task_exit()
    if self.fd >= 0 then
        C.pl_file_close_sync(self.fd)
        forget_fd(self)
    end
end

function File:fileno()
    self_file("File:fileno", self)
    return self.fd
end

-- The seed's spelling: file:acquire_buffer() takes from the file's reactor.
function File:acquire_buffer()
    self_file("File:acquire_buffer", self)
    local t, rt = current_task("File:acquire_buffer")
    if self.reactor.rt ~= rt then
        foreign_file("File:acquire_buffer", self, 2)
    end
    local b = acquire(self.reactor, t, rt, "File:acquire_buffer")
    return b
end

---------------------------------------------------------------------------
-- Path operations
---------------------------------------------------------------------------

local function path_fail(what, path, rc)
    return nil, format("%s %s: %s", what, path, errstr(rc)), ffi_string(C.pl_errname(rc))
end

function M.statx(path)
    check_path("uring.statx", "path", path)
    local t, r = context("uring.statx")
    local st, rc = statx_op(r, t, AT_FDCWD, path, 0, path)
    if not st then
        return path_fail("statx", path, rc)
    end
    return st
end

function M.unlink(path)
    check_path("uring.unlink", "path", path)
    local t, r = context("uring.unlink")
    local rc = run_op(r, t, C.pl_uring_unlinkat(r.u, t.slot, t.gen, path, 0), path, path)
    if rc < 0 then
        return path_fail("unlink", path, rc)
    end
    return true
end

function M.rmdir(path)
    check_path("uring.rmdir", "path", path)
    local t, r = context("uring.rmdir")
    local rc = run_op(r, t, C.pl_uring_unlinkat(r.u, t.slot, t.gen, path, AT_REMOVEDIR), path, path)
    if rc < 0 then
        return path_fail("rmdir", path, rc)
    end
    return true
end

function M.rename(from, to)
    check_path("uring.rename", "from", from)
    check_path("uring.rename", "to", to)
    local t, r = context("uring.rename")
    local rc = run_op(r, t, C.pl_uring_renameat(r.u, t.slot, t.gen, from, to), from, { from, to })
    if rc < 0 then
        return path_fail("rename", from .. " -> " .. to, rc)
    end
    return true
end

function M.mkdir(path, perms)
    check_path("uring.mkdir", "path", path)
    if type(perms) == "nil" then    -- (not perms or 0755: false is no mode; nor == nil: NULL equals nil)
        perms = 493     -- 0755
    end
    check.integer("uring.mkdir", "perms", perms, 0, 4095)
    local t, r = context("uring.mkdir")
    local rc = run_op(r, t, C.pl_uring_mkdirat(r.u, t.slot, t.gen, path, perms), path, path)
    if rc < 0 then
        return path_fail("mkdir", path, rc)
    end
    return true
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
    local t, r = receive_context("uring.read_some")
    local what = "input on fd " .. fd
    local rc
    repeat
        rc = run_op(r, t, C.pl_uring_poll_in(r.u, t.slot, t.gen, fd), what)
        if rc >= 0 then
            local scratch = bounce_get(r, len, "uring.read_some")
            rc = C.pl_fd_read(fd, scratch.ptr, len)
            if rc >= 0 then
                local s = ffi_string(scratch.ptr, rc)
                bounce_put(r, scratch)
                return s
            end
            bounce_put(r, scratch)
        end
    until rc ~= EAGAIN
    return nil, format("read fd %d: %s", fd, errstr(rc)), ffi_string(C.pl_errname(rc))
end

-- What uring_net.lua (sockets) builds on.
M._internal = {
    context = context, receive_context = receive_context, current_task = current_task, run_op = run_op,
    bounce_get = bounce_get, bounce_put = bounce_put,
    run_ended = run_ended, close_idle = close_idle, close_guard = close_guard, forget_fd = forget_fd,
    left_busy = left_busy,
    WAIT = WAIT, park = park, WAIT_IO = WAIT_IO, yielded = yielded, OP_INLINE = OP_INLINE,
    fixed_io = fixed_io, fixed_result = fixed_result,
}

-- The reactor's acquire, reachable from the module for convenience.
function M.acquire_buffer()
    -- (checked as a receive is: a buffer handed in C to a wait that a plain
    -- coroutine left behind would be out of the pool until the task ends)
    local t, r, rt = receive_context("uring.acquire_buffer")
    local b = acquire(r, t, rt, "uring.acquire_buffer")
    return b
end

require("pluvio.uring_net").install(M)
require("pluvio.uring_queue").install(M)

return M
