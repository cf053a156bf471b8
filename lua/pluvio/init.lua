-- pluvio: the runtime, tasks and time.
--
-- The module users require: the default runtime, pluvio.run and wrap, and
-- the direct-style functions tasks call (spawn, yield, sleep, select,
-- timeout, channels).  The executor lives in task.lua (tasks: park, wake,
-- spawn, end, join, kill) and runtime.lua (the loop, reactors, run and
-- block_on); C (libpluvio) owns the task slots, the ready ring, timers,
-- reactors and the idle wait.
local core = require "pluvio.core"
local check = require "pluvio.check"
local task = require "pluvio.task"
local runtime = require "pluvio.runtime"

local ffi, C = core.ffi, core.C
local co_yield, co_running = coroutine.yield, coroutine.running
local select, type, tostring, setmetatable = select, type, tostring, setmetatable
local unpack, format, getmetatable, pcall = unpack, string.format, getmetatable, pcall
local walk = next          -- walk tables with `for k, v in walk, t`, not pairs(): see task.lua

local M = {}

local DEFAULT_CAPACITY, MAX_CAPACITY = runtime.DEFAULT_CAPACITY, task.MAX_CAPACITY
local Task, Runtime = task.Task, runtime.Runtime
M.Task, M.Runtime = Task, Runtime
M._WAIT_KIND = task.WAIT_KIND
M._report_running_unjoined = runtime.report_running_unjoined

local current_rt = task.current_rt
local new_runtime, CANCEL_ROUNDS = runtime.new_runtime, runtime.CANCEL_ROUNDS
local KILLED, YIELD, SLEEP = task.KILLED, task.YIELD, task.SLEEP
local spawn, task_name, results_of, hand_results = task.spawn, task.task_name, task.results_of, task.hand_results
local park, yielded, running_task, current_task = task.park, task.yielded, task.running_task, task.current_task
local add_joiner, remove_joiner = task.add_joiner, task.remove_joiner
local claim_refused, unclaim, in_plain_coroutine = task.claim_refused, task.unclaim, task.in_plain_coroutine

-- The default runtime and the direct-style functions
---------------------------------------------------------------------------

-- What a reactor module does to each new default runtime (pluvio.ucx:
-- register the Lua state's UCX reactor when it has workers, made in an
-- earlier runtime, that this one must progress).
local default_runtime_hooks = {}

function M._on_default_runtime(fn)
    default_runtime_hooks[#default_runtime_hooks + 1] = fn
end

-- A runtime with the default reactors, as the host and pluvio.run use.
function M.default_runtime(capacity)
    if type(capacity) == "nil" then     -- (not == nil: a NULL pointer equals nil)
        capacity = DEFAULT_CAPACITY
    end
    check.integer("pluvio.default_runtime", "capacity", capacity, 1, MAX_CAPACITY)
    local rt = new_runtime(capacity)
    rt.auto_reactors = true     -- io_uring / UCX reactors are made on first use
    for i = 1, #default_runtime_hooks do
        default_runtime_hooks[i](rt)
    end
    return rt
end

-- pluvio.run(fn, ...): run fn as the main task of a new default runtime;
-- returns fn's results.
function M.run(fn, ...)
    check.func("pluvio.run", "fn", fn)
    return M.default_runtime():run(fn, ...)
end

-- A string error without a position (a deadlock, error(msg, 0)) gets the
-- position of the wrapped fn: busted would put the position it was raised
-- at in front of it, which is pluvio's own re-raise, not the test's line.
-- (busted's own test for a position.)
local function positioned(fn, e)
    if type(e) ~= "string" or e:match("^[^\n]-:%d+: ") then
        return e
    end
    local info = debug.getinfo(fn, "S")
    if info.what == "C" then
        return e
    end
    return format("%s:%d: %s", info.short_src, info.linedefined, e)
end

-- fn's results, unless fn raised or a task failed and nobody joined it: a
-- test passes only if nothing failed unseen.
local function wrapped_results(rt, fn, ok, ...)
    rt.raises_unjoined = nil
    if rt.unjoined_unsaid then  -- (report_failure left the first to the error below)
        rt.unjoined_unsaid = nil
        if not ok then          -- another error is raised: that failure is written, as outside wrap
            io.stderr:write("pluvio: " .. rt.first_unjoined .. "\n")
        end
    end
    if not ok then
        error(positioned(fn, (...)), 0)
    end
    if rt.n_unjoined > 0 then
        error(positioned(fn, format("pluvio.wrap: %d task(s) failed and nobody joined them; the first: %s",
                                    rt.n_unjoined, rt.first_unjoined)), 0)
    end
    return ...
end

-- A full collection, for what only finalizers give back (rings, UCX
-- endpoints and listeners nobody refers to).  collectgarbage() would also
-- restart a collector the user had stopped ("stop", as a benchmark does to
-- see its garbage): that stays as the user left it.
local function full_collect()
    local running = collectgarbage("isrunning")
    collectgarbage()
    if not running then
        collectgarbage("stop")
    end
end

-- The runtimes of earlier wrapped calls the collector has not freed yet.
-- Each holds fds and memory LuaJIT's collector does not count (its ring;
-- once it did I/O, its io_uring reactor's ring and buffer pool), so a
-- suite with a large heap ran out of fds after about a thousand tests, or
-- pinned 16 MiB per test that acquired a buffer.  A full collection once a
-- few of them are unreachable bounds that; runtimes a test kept reachable
-- raise the bound instead of making each call collect.
local wrapped_runtimes = setmetatable({}, { __mode = "k" })
local WRAPPED_UNCOLLECTED = 4
local wrapped_collect_at = WRAPPED_UNCOLLECTED

local function collect_wrapped_runtimes()
    local n = 0
    for _ in walk, wrapped_runtimes do n = n + 1 end
    if n < wrapped_collect_at then
        return
    end
    full_collect()          -- (runs the finalizers that close the rings)
    n = 0
    for _ in walk, wrapped_runtimes do n = n + 1 end
    wrapped_collect_at = n + WRAPPED_UNCOLLECTED
end

-- pluvio.wrap(fn[, {timeout = s}]): a plain function that runs fn in a new
-- runtime, for busted's it() and other synchronous callers; with a
-- timeout, a run still going after s seconds (a task left waiting on I/O
-- that never comes) is stopped, its tasks cancelled, and the call raises.
function M.wrap(fn, opts)
    check.func("pluvio.wrap", "fn", fn)
    local limit
    if type(opts) ~= "nil" then
        if type(opts) ~= "table" then
            check.fail("pluvio.wrap", "opts must be a table ({timeout = seconds})", opts)
        end
        for k in walk, opts do
            if k ~= "timeout" then
                check.fail("pluvio.wrap", "opts has one field, timeout; unknown", k)
            end
        end
        limit = opts.timeout
        if type(limit) ~= "nil" and (type(limit) ~= "number" or not (limit > 0 and limit <= 1e9)) then
            check.fail("pluvio.wrap", "opts.timeout must be a number of seconds, more than 0 and at most 1e9", limit)
        end
    end
    return function(...)
        collect_wrapped_runtimes()
        local rt = M.default_runtime()
        wrapped_runtimes[rt] = true
        rt.time_limit = limit
        rt.raises_unjoined = true
        return wrapped_results(rt, fn, pcall(rt.run, rt, fn, ...))
    end
end

-- The runtime running the current task, or nil.
function M.runtime()
    return current_rt()
end

-- The running task, or nil outside tasks.
function M.current()
    local rt = current_rt()
    local t = rt and rt.current
    if t and co_running() == t.co then
        return t
    end
    return nil
end

local function spawn_checked(fname, name, fn, ...)
    local rt = current_rt()
    if not rt or not rt.running or rt.stopping then
        if rt and rt.stopping then
            error(format("%s: the runtime is stopping (the clean-ups of cancelled tasks spawned " ..
                         "tasks %d rounds deep; the last round refuses new tasks)",
                         fname, CANCEL_ROUNDS), 3)
        end
        error(fname .. ": no runtime is running (call it inside pluvio.run(fn), rt:run(fn), " ..
              "or a script run by the pluvio host)", 3)
    end
    return spawn(rt, fname, name, fn, ...)
end

-- (Not tail calls: the error level of spawn_checked must reach the caller.)
function M.spawn(fn, ...)
    check.func("pluvio.spawn", "fn", fn)
    local t = spawn_checked("pluvio.spawn", nil, fn, ...)
    return t
end

function M.spawn_named(name, fn, ...)
    check.string("pluvio.spawn_named", "name", name)
    check.func("pluvio.spawn_named", "fn", fn)
    local t = spawn_checked("pluvio.spawn_named", name, fn, ...)
    return t
end

-- Let every other ready task run once, then continue.
function M.yield()
    local t = running_task("pluvio.yield")
    yielded(t, co_yield(YIELD), "pluvio.yield")  -- the loop puts it at the back of the ring
end

-- Monotonic seconds (CLOCK_MONOTONIC, sub-microsecond resolution).
-- (a Lua function, not the FFI one: that raised "wrong number of arguments"
-- at an argument; the JIT compiles the call to the same code)
local pl_now = C.pl_now
function M.now()
    return pl_now()
end

-- pluvio.sleep(seconds): seconds is a finite number >= 0; 0 yields once.
function M.sleep(seconds)
    if type(seconds) ~= "number" or seconds ~= seconds or seconds < 0 or seconds > 1e9 then
        check.fail("pluvio.sleep", "seconds must be a finite number from 0 to 1e9", seconds)
    end
    local t = running_task("pluvio.sleep")
    if seconds == 0 then
        yielded(t, co_yield(YIELD), "pluvio.sleep")
    else                            -- only the timer (or a kill) ends it
        yielded(t, co_yield(SLEEP, seconds), "pluvio.sleep")
    end
end

-- Low level: park the running task until task:wake() is called on it (or a
-- spurious wake-up: callers loop on their condition).  what is shown in
-- rt:tasks() and deadlock reports.
-- What a task suspends for, in words (a __tostring that raises would
-- replace the wait with its error).
local function show_wait(what)
    if type(what) == "string" then
        return what
    end
    local ok, s = pcall(tostring, what)
    return ok and type(s) == "string" and s or format("a %s whose __tostring failed", type(what))
end

function M.suspend(what)
    local t = running_task("pluvio.suspend")
    park(t, C.PL_WAIT_OTHER, 0, type(what) ~= "nil" and show_wait(what) or "suspend", "pluvio.suspend")
end

local function task_arg(fname, i, v)
    if getmetatable(v) ~= Task then
        error(format("%s: argument %d must be a task (got %s)", fname, i, type(v)), 3)
    end
end

-- pluvio.select(t1, t2, ...): wait for the first task to finish; returns its
-- index and its results (or index, nil, err).
function M.select(...)
    local n = select("#", ...)
    if n == 0 then
        error("pluvio.select: give at least one task", 2)
    end
    local tasks = { ... }
    for i = 1, n do
        task_arg("pluvio.select", i, tasks[i])
    end
    local me = running_task("pluvio.select")
    for i = 1, n do
        if tasks[i] == me then      -- (it would wait for its own end, forever)
            error(format("pluvio.select: argument %d is the calling task (%s); a task cannot " ..
                         "wait for itself", i, tostring(me)), 2)
        end
        local refused = claim_refused(tasks[i], me)
        if refused then
            error(format("pluvio.select: argument %d, %s, %s", i, tostring(tasks[i]), refused), 2)
        end
    end
    local claimed           -- (nil until it first waits: then whether it claims)
    while true do
        for i = 1, n do
            if not tasks[i].live then
                for k = 1, n do
                    remove_joiner(tasks[k], me)
                    unclaim(tasks[k], me)
                end
                return i, results_of(tasks[i], me)
            end
        end
        if claimed == nil then
            claimed = not in_plain_coroutine(me)
            for i = 1, claimed and n or 0 do
                tasks[i].joiner = me
            end
        end
        for i = 1, claimed and n or 0 do
            add_joiner(tasks[i], me)
        end
        park(me, C.PL_WAIT_SELECT, n, format("select of %d task%s", n, n == 1 and "" or "s"), "pluvio.select")
    end
end

-- pluvio.timeout(seconds, fn, ...): fn's results, or nil, "timeout" when it
-- takes longer (fn then is cancelled).  fn runs as a child task; its error
-- is raised here.
function M.timeout(seconds, fn, ...)
    if type(seconds) ~= "number" or seconds ~= seconds or seconds < 0 or seconds > 1e9 then
        check.fail("pluvio.timeout", "seconds must be a finite number from 0 to 1e9", seconds)
    end
    check.func("pluvio.timeout", "fn", fn)
    local me, rt = current_task("pluvio.timeout")
    local child = spawn(rt, "pluvio.timeout", task_name(me) .. "/timeout", fn, ...)
    child.joiner = me       -- its results are ours (see claim_refused)
    local deadline = C.pl_now() + seconds
    me.timeout_child = child
    while child.live and C.pl_now() < deadline do
        add_joiner(child, me)
        C.pl_task_set_timer(rt.crt, me.slot, deadline)
        park(me, C.PL_WAIT_JOIN, child.id, child, "pluvio.timeout")
    end
    C.pl_task_clear_timer(rt.crt, me.slot)
    me.timeout_child = nil
    if child.live then
        remove_joiner(child, me)    -- (the kill would wake me, running: a stale wake-up)
        child:kill()
        child.joined = true
        return nil, "timeout"
    end
    local r = child.results
    child.joined = true
    if r[1] then
        hand_results(r, me)
        return unpack(r, 2, r.n)
    end
    if r[2] == KILLED then
        return nil, "cancelled"
    end
    error(r[2], 0)
end

-- Channels live in their own module; exposed here for convenience.
function M.channel(capacity)
    local ch = require("pluvio.channel")._new(capacity, 3)
    return ch
end

-- pluvio.recv_any(ch1, ch2, ...): a value from whichever channel has one
-- first (pluvio/channel.lua).
function M.recv_any(...)
    local i, v = require("pluvio.channel")._recv_any(3, ...)   -- (not a tail call: errors name our caller)
    return i, v
end

-- pluvio.require(name): require, for a module whose top level waits (the
-- host's global require; see pluvio/loader.lua).
M.require = require("pluvio.loader").new(M)

-- pluvio.dofile([path]): dofile, for a file whose top level waits: the
-- chunk is called from Lua (LuaJIT's dofile calls it from C, where a wait
-- raises "attempt to yield across C-call boundary").  The host's global
-- dofile.  Errors as dofile's: the load's message as it is, the chunk's
-- own as the chunk raised them.
function M.dofile(path)
    if type(path) ~= "nil" and type(path) ~= "string" then
        error("bad argument #1 to 'dofile' (string expected, got " .. type(path) .. ")", 2)
    end
    if type(path) == "string" and path:find("\0", 1, true) then   -- (loadfile would load the part before it)
        error("pluvio.dofile: path must not contain a NUL byte (got " .. check.show(path) .. ")", 2)
    end
    local chunk, err = loadfile(path)
    if not chunk then
        error(err, 0)
    end
    return chunk()
end

-- For modules built on the runtime (channels, reactors): park and wake.
M._park = park
M._linger = task.linger
M._WAIT = task.WAIT
M._wake = task.wake
M._current_task = current_task
M._io_task = task.io_task
M._yielded = yielded
M._running_task = running_task
M._full_collect = full_collect

M.version = ffi.string(C.pl_version())

return M
