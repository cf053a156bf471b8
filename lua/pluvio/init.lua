-- pluvio: the runtime, tasks and time.
--
-- C (libpluvio) owns the task slots, the ready ring, timers, reactors and the
-- idle wait; this module owns only the coroutines and the Lua values they
-- produce.  A blocking call has one shape: record what the task waits on in
-- C, yield, and be resumed by the loop once something woke the slot.  Every
-- wait is a loop on its condition, so a spurious wake-up is harmless.
local core = require "pluvio.core"
local check = require "pluvio.check"

local ffi, C = core.ffi, core.C
local co_create, co_resume, co_yield = coroutine.create, coroutine.resume, coroutine.yield
local co_running, co_status = coroutine.running, coroutine.status
local select, type, tostring, setmetatable = select, type, tostring, setmetatable
local unpack, traceback, format = unpack, debug.traceback, string.format
local getmetatable, newproxy, pcall = getmetatable, newproxy, pcall
-- Tables are walked with `for k, v in walk, t`, never with pairs() or a
-- variable named next: LuaJIT specializes a loop written so (ITERN), and
-- Debian's LuaJIT (the 2022-03-20 snapshot) can end such a loop early once
-- it gives up compiling it (LuaJIT#827): rt:tasks() raised on a missing
-- task about 3 times in 500 seeds of spec/channel_model_spec.lua.  A loop
-- through another name steps with next() itself and is not specialized.
local walk = next

local M = {}

local BATCH = 256                 -- slots taken from the ready ring per tick
local DEFAULT_CAPACITY = 1024
local MAX_CAPACITY = 16777216     -- PL_MAX_TASKS
local EDEADLK = core.errno.EDEADLK
local EPERM, EACCES, ENOSYS = 1, 13, 38     -- how the kernel refuses io_uring
local ENOMEM = 12                           -- and its rings' memory, for a user without CAP_IPC_LOCK

-- What a task yields to the loop.  WAIT: it parked itself in C already
-- (an I/O start); PARK, kind, arg: park it; SLEEP, seconds: put it to
-- sleep; YIELD (or any other value): pluvio.yield().  The loop makes the
-- calls into C for PARK and SLEEP: an FFI call the JIT did not compile,
-- made deep in a task's frames, grows the coroutine's stack to more than
-- twice its first size, which stays (measured: +440 bytes per parked task).
local function marker(name)
    local text = "pluvio " .. name .. " (a blocking call's yield: only pluvio tasks may block)"
    return setmetatable({}, { __tostring = function() return text end })
end
local WAIT, PARK, SLEEP, YIELD = marker("wait"), marker("park"), marker("sleep"), marker("yield")
-- The error a task raises when it kills itself.
local KILLED = setmetatable({}, { __tostring = function() return "cancelled" end })

local WAIT_NAMES = {
    [C.PL_WAIT_NONE] = "nothing", [C.PL_WAIT_SLEEP] = "sleep", [C.PL_WAIT_JOIN] = "join",
    [C.PL_WAIT_SELECT] = "select", [C.PL_WAIT_CHANNEL_SEND] = "channel send",
    [C.PL_WAIT_CHANNEL_RECV] = "channel recv", [C.PL_WAIT_IO] = "io",
    [C.PL_WAIT_BUFFER] = "buffer", [C.PL_WAIT_RUNTIME] = "nested runtime",
    [C.PL_WAIT_REACTOR] = "reactor", [C.PL_WAIT_OTHER] = "other", [C.PL_WAIT_STREAM] = "stream",
}
local STATE_NAMES = {
    [C.PL_TASK_READY] = "ready", [C.PL_TASK_RUNNING] = "running",
    [C.PL_TASK_WAITING] = "waiting",
}
M._WAIT_KIND = {    -- the park kinds (PL_WAIT_*), for the modules that park tasks
    SLEEP = C.PL_WAIT_SLEEP, JOIN = C.PL_WAIT_JOIN, SELECT = C.PL_WAIT_SELECT,
    CHANNEL_SEND = C.PL_WAIT_CHANNEL_SEND, CHANNEL_RECV = C.PL_WAIT_CHANNEL_RECV,
    IO = C.PL_WAIT_IO, BUFFER = C.PL_WAIT_BUFFER, REACTOR = C.PL_WAIT_REACTOR,
    OTHER = C.PL_WAIT_OTHER, STREAM = C.PL_WAIT_STREAM,
}

local Runtime = {}
Runtime.__index = Runtime
M.Runtime = Runtime

local Task = {}
Task.__index = Task
M.Task = Task

-- The runtime whose loop runs now (innermost, for nested runtimes).
local current_rt = nil

local function pack(...)
    return { n = select("#", ...), ... }
end

local function not_in_task(fname, level)
    error(fname .. ": not inside a pluvio task (call it from a function run by " ..
          "pluvio.run / rt:run, or from a script run by the pluvio host)", level or 4)
end

local function not_the_task(fname, depth)
    error(fname .. ": called from a coroutine that is not a pluvio task " ..
          "(only pluvio tasks may block)", 4 + (depth or 0))
end

-- Pluvio's own modules, as debug.getinfo names their source ("@.../pluvio/").
local own_source = (debug.getinfo(1, "S").source:match("^(@.*pluvio/)init%.lua$"))

-- The stack level, seen from the caller of this function, of the first
-- frame outside pluvio's modules: where the user called the function that
-- got there, however many of ours (a wait's park, a channel's recv) lie
-- between; fallback when that cannot be told.  Error paths only: it walks
-- the stack.
local function outside_level(fallback)
    if not own_source then
        return fallback
    end
    for level = 3, 64 do
        local info = debug.getinfo(level, "S")
        if not info then
            break
        end
        if info.source:sub(1, #own_source) ~= own_source then
            return level
        end
    end
    return fallback
end

-- An operation a plain coroutine of the task started and left behind (it
-- yielded to whoever resumed it, not to the loop): cancel it, keeping what
-- it uses until the reactor lets go.
local function orphan(t)
    local reactor = t.io_reactor
    if reactor then
        t.io_reactor = nil
        reactor:_abandon(t)
    end
    local queue = t.wait_obj    -- a queue it joined in C (a stream's readers)
    if queue then
        t.wait_obj = nil
        queue:_abandon_wait(t)
    end
    t.waiting_for = nil
end

-- The running task (a clear error naming fname outside tasks), with what a
-- plain coroutine of it left behind cancelled, noted as starting fname
-- (io_seq counts the starts: see yielded).  For current_task and io_task:
-- the error names their caller's caller, or depth frames further out (for
-- a helper between them and the public function).
local function task_of(fname, depth)
    local rt = current_rt
    local t = rt and rt.current
    if not t then
        not_in_task(fname, 5 + (depth or 0))
    end
    if t.io_reactor or t.wait_obj then
        -- what it started may have taken input (a pipe's bytes, a tag
        -- message): say so rather than let that go unnoticed
        local left = t.io_fname or "an I/O operation"
        orphan(t)
        error(format("%s: called from a coroutine that is not a pluvio task (only pluvio tasks " ..
                     "may block); its operation was cancelled when the task called %s",
                     left, fname), 4 + (depth or 0))
    end
    t.io_fname = fname
    t.io_seq = (t.io_seq or 0) + 1
    return t, rt
end

-- The task calling a blocking function that queues it in C before it
-- yields and is not on a per-operation path (acquire_buffer, accept, ...),
-- or a clear error naming fname, also from a plain coroutine in a task.
local function current_task(fname, depth)
    local t, rt = task_of(fname, depth)
    if co_running() ~= t.co then
        not_the_task(fname, depth)
    end
    return t, rt
end

-- The task starting an I/O operation, for the hot paths (file reads and
-- writes, sockets, AM sends and receives).  No coroutine.running() here: a
-- call into C the JIT cannot compile, it ends the trace at every operation
-- and cost 40% of a small message's round trip.  Called from a plain
-- coroutine inside a task, the operation starts as the task's and the plain
-- coroutine yields to whoever resumed it; yielded raises when that
-- coroutine is resumed again, and the operation is cancelled then, or when
-- the task starts its next one or ends, whichever comes first.
local function io_task(fname, depth)
    local t, rt = task_of(fname, depth)
    return t, rt
end

-- The same for the executor's own waits (park, sleep, yield), which leave
-- every call into C to the loop: no coroutine.running() here, a C function
-- that, called deep in a task, grows its stack and breaks the JIT's traces.
-- A plain coroutine inside a task that calls one yields the wait to whoever
-- resumed it, with nothing started; yielded() raises when it is resumed.
local function running_task(fname)
    local rt = current_rt
    local t = rt and rt.current
    if not t then
        not_in_task(fname)
    end
    return t, rt
end

-- After a wait's yield: only the task's own loop resumes it with the task
-- (resumed_with).  Otherwise a plain coroutine made the wait: raise, and
-- for an I/O wait (seq: t.io_seq when it started) cancel its operation,
-- unless the task has started another since (an op id alone may have been
-- reused).
local function yielded(t, resumed_with, fname, seq)
    if resumed_with ~= t then
        if seq and (t.io_reactor or t.wait_obj) and t.io_seq == seq then
            orphan(t)
        end
        t.waiting_for = nil
        not_the_task(fname, outside_level(4) - 4)
    end
end

-- The running task, parked in C a moment ago, is the last of its batch:
-- when nothing else is ready, the reactors are polled in its place and a
-- wake of its own lets it go on without the switch through the loop
-- (pl_task_linger; with set_spin it busy-polls there).  Only in the task's
-- own coroutine (a plain coroutine's wait must yield, see yielded), and
-- not with reactors written in Lua, which only the loop polls.  Returns
-- true when the task goes on.
local function may_linger(rt, t)
    if rt.last_slot ~= t.slot or rt.lua_reactors[1] ~= nil or t.kill_requested then
        return false        -- (a task that caught its own kill stops at its next wait)
    end
    local done = rt.done
    if done and done(rt) then
        return false        -- the loop stops at the batch's end (block_on's main task is done)
    end
    local marks = rt.ready_marks    -- another task ready: no (read without a call)
    if marks[0] ~= marks[1] and C.pl_task_linger(rt.crt, t.slot, 0) ~= 1 then
        return false
    end
    return co_running() == t.co
end

-- For a task parked in C already (an operation's start parked it).
local function linger(rt, t)
    return may_linger(rt, t) and C.pl_task_linger(rt.crt, t.slot, 1) == 1
end

-- Park the running task until something wakes its slot.  what describes the
-- wait for rt:tasks() and deadlock reports; fname names the caller in errors;
-- seq as for yielded.
local function park(t, kind, arg, what, fname, seq)
    t.waiting_for = what
    local rt = t.rt
    if may_linger(rt, t) then
        C.pl_task_wait(rt.crt, t.slot, kind, arg or 0)
        if C.pl_task_linger(rt.crt, t.slot, 1) ~= 1 then
            yielded(t, co_yield(WAIT), fname or "pluvio wait", seq)
        end
    else
        yielded(t, co_yield(PARK, kind, arg or 0), fname or "pluvio wait", seq)
    end
    t.waiting_for = nil
end

local function wake(t)
    if t.live then
        C.pl_task_wake(t.rt.crt, t.slot, t.gen)
    end
end

---------------------------------------------------------------------------
-- Tasks
---------------------------------------------------------------------------

-- A failed task's error: strings get the traceback of the task's
-- coroutine (a coroutine that raised keeps its stack), cut where the
-- runtime's own frame begins; error objects (tables, KILLED) stay as they are.
-- error() or error(nil) gets lua.c's words: join's nil, nil would read as
-- a task that returned nil.
local function task_error(co, e)
    if e == nil then
        e = "(error object is a nil value)"
    elseif type(e) ~= "string" and type(e) ~= "number" then
        return e
    end
    local tb = traceback(co, tostring(e))
    local cut = tb:find("\n[^\n]*pluvio/init%.lua:%d+: in function <[^\n]*pluvio/init%.lua:%d+>%s*$")
    return cut and tb:sub(1, cut - 1) or tb
end

-- An error as a report on stderr shows it: an error object whose
-- __tostring raises must not stop the report, nor what comes after it (the
-- reports of other tasks, the rest of a task's end).  One without
-- __tostring (error({code = 5})) is named in lua.c's words, not by an
-- address ("table: 0x...") that reads like the message.
local function error_text(e)
    local t, mt = type(e), debug.getmetatable(e)
    if t ~= "string" and t ~= "number" and not (mt and mt.__tostring) then
        return "(error object is a " .. t .. " value)"
    end
    local ok, s = pcall(tostring, e)
    if not ok then
        return "(an error object whose __tostring raised: " .. (type(s) == "string" and s or type(s)) .. ")"
    end
    return s
end

-- Coroutines are reused: after its task a coroutine yields DONE and is
-- resumed with the next task, which saves coroutine.create, a fresh stack
-- and garbage per task.  There is no xpcall: a task that raises ends its
-- coroutine, and resume hands the error to run_batch with the coroutine's
-- stack still there for the traceback (only failing tasks lose reuse).
local DONE = setmetatable({}, { __tostring = function() return "pluvio task done" end })
local POOL_MAX = 1024

local function task_body(t)
    while true do
        local fn, n = t.fn, t.nargs
        t.fn = nil
        if n == 0 then
            t.results = pack(true, fn())
        elseif n == 1 then
            t.results = pack(true, fn(t.a1))
        elseif n == 2 then
            t.results = pack(true, fn(t.a1, t.a2))
        elseif n == 3 then
            t.results = pack(true, fn(t.a1, t.a2, t.a3))
        else
            local args = t.args
            t.args = nil
            t.results = pack(true, fn(unpack(args, 1, args.n)))
        end
        t.a1, t.a2, t.a3 = nil, nil, nil
        -- a pooled coroutine waits for its next task holding nothing of
        -- this one: not its function (its upvalues: a listener, a file, a
        -- socket, closed when collected), nor the task (its results)
        fn, t = nil, nil
        t = co_yield(DONE)
    end
end

-- Why pl_task_spawn refused (rc) a task of rt, for fname's error: the task
-- table is full and cannot grow, at its most slots or for want of memory.
local function spawn_refusal(rt, fname, rc)
    local s = ffi.new("pl_runtime_stats_t")
    C.pl_runtime_stats(rt.crt, s)
    local cap = tonumber(s.capacity)
    if rc == -ENOMEM and cap >= MAX_CAPACITY then
        return format("%s: cannot create a task: the runtime has %d live tasks, the most it can hold " ..
                      "(its task table does not grow past %d slots, whatever Runtime.new's capacity: " ..
                      "let tasks end first, or spread them over runtimes)", fname, rt.nlive, MAX_CAPACITY)
    elseif rc == -ENOMEM then
        return format("%s: cannot create a task: no memory to grow the runtime's task table past its %d " ..
                      "slot%s, all taken by live tasks (%s; it doubles when full, up to %d)",
                      fname, cap, cap == 1 and "" or "s", core.errstr(rc), MAX_CAPACITY)
    end
    return format("%s: cannot create a task: %s", fname, core.errstr(rc))
end

-- fname: the public function spawning (for its errors)
local function spawn(rt, fname, name, fn, ...)
    local gen = rt.gen_out
    local slot = C.pl_task_spawn(rt.crt, gen)
    if slot < 0 then
        error(spawn_refusal(rt, fname, slot), 3)
    end
    local seq = rt.seq + 1
    rt.seq = seq
    local pool = rt.co_pool
    local np = #pool
    local co
    if np > 0 then
        co = pool[np]
        pool[np] = nil
    else
        co = co_create(task_body)
    end
    -- One constructor with room to spare: a task gains keys later (results,
    -- final, joiners), and a hash part that is already full would be
    -- rehashed for each of them (measured: 2.4x slower spawns).
    local n = select("#", ...)
    local t = setmetatable({
        rt = rt, slot = slot, gen = gen[0], co = co, fn = fn, nargs = n, _name = name, id = seq,
        live = true,
    }, Task)
    if n > 0 then
        if n <= 3 then
            t.a1, t.a2, t.a3 = ...
        else
            t.args = pack(...)
        end
    end
    rt.slots[slot] = t
    rt.nlive = rt.nlive + 1
    return t
end

local function task_name(t)
    return t._name or ("task-" .. t.id)
end

-- Failed tasks nobody joined are reported once each, on stderr, counted
-- in rt.n_unjoined: when the collector frees the task (nobody can join it
-- any more), or at the end of the run for one still reachable then (a
-- handle kept but never joined).  The runtime lists failed tasks weakly
-- (rt.failed, task -> order of failure): held until the run's end, a
-- server whose handlers fail unjoined kept each one, with its error and
-- traceback, for as long as it ran.  A task has no __gc in Lua 5.1, so a
-- failed task holds a guard, a userdata whose finalizer reports it; the
-- guard's metatable refers to the task, so a task being finalized stays
-- alive (and listed) until its report is made, whichever path makes it
-- first.  The report touches only Lua values, never the runtime's C side.
local function report_failure(rt, t)
    t.reported = true
    rt.n_unjoined = rt.n_unjoined + 1
    local what = format("%s failed and was never joined: %s", tostring(t), error_text(t.results[2]))
    rt.first_unjoined = rt.first_unjoined or what
    io.stderr:write("pluvio: " .. what .. "\n")
end

-- The guard's finalizer.  It may run anywhere (inside a task, at exit):
-- a report that raises must not go further.
local function report_collected(guard)
    local t = getmetatable(guard).task
    if not t.joined and not t.reported then
        pcall(report_failure, t.rt, t)
    end
end

local WEAK_KEYS = { __mode = "k" }

local function note_failed(rt, t)
    local guard = newproxy(true)
    local mt = getmetatable(guard)
    mt.__gc, mt.task = report_collected, t
    t.unjoined_guard = guard
    local order = rt.n_failed + 1
    rt.n_failed = order
    rt.failed[t] = order
end

-- A task ended (returned, raised, or was killed): free its slot, run its
-- clean-ups (release buffers, cancel I/O), wake whoever joins it.
local function finish(rt, t, final, was_running)
    t.live = false
    t.final = final
    if final ~= "done" then
        -- a killed or failed task kept its arguments (task_body lets them go
        -- when fn returns) and what it waited on: a socket given to a failed
        -- handler, which a kept handle holds, was never collected
        t.a1, t.a2, t.a3, t.args, t.fn, t.waiting_for = nil, nil, nil, nil, nil, nil
    end
    rt.slots[t.slot] = nil
    rt.nlive = rt.nlive - 1
    local outcome = final == "done" and C.PL_TASK_DONE
        or final == "failed" and C.PL_TASK_FAILED or C.PL_TASK_CANCELLED
    if was_running then
        outcome = outcome + C.PL_TASK_WAS_RUNNING
    end
    C.pl_task_exit(rt.crt, t.slot, outcome)
    local baton = t.baton
    if baton then           -- it was woken to take a turn it will never take
        t.baton = nil
        rt.turns[t] = nil
        baton:_pass_baton()
    end
    local parked_on = t.parked_on
    if parked_on then       -- still queued on a channel: leave its queue
        t.parked_on = nil
        parked_on:_leave(t)
    end
    local reactor = t.io_reactor
    if reactor then         -- an operation in flight: cancel it in the kernel
        if final ~= "cancelled" then    -- not parked on it: a plain coroutine left it
            io.stderr:write(format("pluvio: %s ended with an operation a plain coroutine started " ..
                                   "(%s); it was cancelled\n", tostring(t), t.io_fname or "?"))
        end
        t.io_reactor = nil
        reactor:_abandon(t)
    end
    local queue = t.wait_obj
    if queue then           -- it queued in C (a buffer pool, a stream): leave the queue
        t.wait_obj = nil
        queue:_abandon_wait(t)
    end
    local held = t.resources
    if held then            -- buffers and the like go back to their pools
        t.resources = nil
        for obj in walk, held do
            obj:_task_exit(t)
        end
    end
    local cleanups = t.cleanups
    if cleanups then
        t.cleanups = nil
        for i = #cleanups, 1, -1 do
            local ok, err = pcall(cleanups[i], t)
            -- (a clean-up that killed the task running it, the killer: no
            -- failure of the clean-up; that task stops at its next wait)
            if not ok and err ~= KILLED then
                io.stderr:write(format("pluvio: an on_exit clean-up of %s failed: %s\n",
                                       tostring(t), error_text(err)))
            end
        end
    end
    if final == "failed" then
        note_failed(rt, t)
    end
    local joiners = t.joiners
    if joiners then
        t.joiners = nil
        for i = 1, #joiners do
            wake(joiners[i])
        end
    end
    -- Last: when fn itself killed t, this kill raises in fn (a task's kill
    -- of itself), and t must be finished by then.
    local child = t.timeout_child
    if child then           -- a task that dies inside pluvio.timeout takes fn with it
        t.timeout_child = nil
        -- (fn may have failed already, t killed before it took the error:
        -- nobody will see it but the report of failed tasks nobody joined)
        child.joined = child.final ~= "failed"
        child:kill()
    end
end

-- The task's coroutine returned (it was running until now).
local function settle(rt, t)
    local r = t.results
    if t.kill_requested then    -- it killed itself, even if a pcall caught that
        t.results = { n = 2, false, KILLED }
        finish(rt, t, "cancelled", true)
    elseif r[1] then
        finish(rt, t, "done", true)
    elseif r[2] == KILLED then
        t.results = { n = 2, false, KILLED }
        finish(rt, t, "cancelled", true)
    else
        finish(rt, t, "failed", true)
    end
end

function Task:name()
    check.self("Task:name", self, Task, "a task")
    return task_name(self)
end

-- "ready", "running", "waiting", "done", "failed" or "cancelled".
function Task:status()
    check.self("Task:status", self, Task, "a task")
    if not self.live then
        return self.final
    end
    if self.rt.current == self then
        return "running"
    end
    local info = self.rt.info_out
    if C.pl_task_info(self.rt.crt, self.slot, info) < 0 then
        return "done"
    end
    return STATE_NAMES[info.state] or "waiting"
end

function Task:__tostring()
    return format("task %q (#%d, %s)", task_name(self), self.id, self:status())
end

local function results_of(t)
    t.joined = true
    local r = t.results
    if r[1] then
        return unpack(r, 2, r.n)
    end
    return nil, r[2] == KILLED and "cancelled" or r[2]
end

-- The task's results, or nil and the error (with its traceback).
-- Joiners: tasks woken when a task ends.  A waiter is listed once however
-- often it wakes and parks again, and leaves the lists of the tasks it
-- stopped waiting for (a long-lived task selected on again and again
-- would otherwise collect every waiter that ever was).
local function add_joiner(task, me)
    local j = task.joiners
    if not j then
        j = {}
        task.joiners = j
    end
    for i = 1, #j do
        if j[i] == me then
            return
        end
    end
    j[#j + 1] = me
end

local function remove_joiner(task, me)
    local j = task.joiners
    if j then
        for i = #j, 1, -1 do
            if j[i] == me then
                table.remove(j, i)
            end
        end
    end
end

-- A task's results are given once: to the one waiter (a join, a select or
-- a pluvio.timeout) that claimed them.  The claim (t.joiner) lasts while
-- that waiter lives and waits: a select gives it back for the tasks it did
-- not take, and a killed waiter's claim lapses.  Another waiter meanwhile,
-- even one that comes after the task ended but before the claimant ran
-- again, gets an error (nil if t may be claimed by me; else the reason).
-- A run's main task is claimed by its run (main_of: "Runtime:run" or
-- "Runtime:block_on"), which returns its results: said as such, since "was
-- already joined" read as a bug to whoever never joined it.
local function claim_refused(t, me)
    local run = t.main_of
    if run then
        return format("is the main task of its runtime, whose results %s returns (or raises); " ..
                      "no task can join it", run)
    end
    if t.joined then
        return "was already joined; a task's results are given once"
    end
    local other = t.joiner
    if other and other ~= me and other.live then
        return "is already waited for by " .. tostring(other) .. "; a task's results are given once"
    end
    return nil
end

local function unclaim(t, me)
    if t.joiner == me then
        t.joiner = nil
    end
end

-- Whether a join or select of me runs in a plain coroutine inside me, not
-- in me's own: its wait then yields to whoever resumed that coroutine and
-- raises when resumed again (see yielded), so it must claim nothing.  A
-- claim it took would outlive it, held by a task that lives on: every
-- other waiter of those tasks was refused, even after the raise, or for
-- good when nobody resumed the coroutine again.  (Asked only before a
-- wait, which leaves the trace anyway.)
local function in_plain_coroutine(me)
    return co_running() ~= me.co
end

function Task:join()
    check.self("Task:join", self, Task, "a task")
    local me = running_task("Task:join")
    if me == self then
        error("Task:join: a task cannot join itself (" .. tostring(self) .. ")", 2)
    end
    local refused = claim_refused(self, me)
    if refused then
        error("Task:join: " .. tostring(self) .. " " .. refused, 2)
    end
    local claim = self.live and not in_plain_coroutine(me)    -- (a plain coroutine's raises when resumed)
    if claim then
        self.joiner = me
    end
    while self.live do
        if claim then
            add_joiner(self, me)
        end
        park(me, C.PL_WAIT_JOIN, self.id, self, "Task:join")
    end
    return results_of(self)
end

-- Cancel a task: it stops at its current wait point, what it waits on is
-- cancelled and its clean-ups run.  Killing a finished task does nothing and
-- returns false.  A task killing itself raises and never returns.
function Task:kill()
    check.self("Task:kill", self, Task, "a task")
    if not self.live then
        return false
    end
    local rt = self.rt
    if rt.current == self then
        self.kill_requested = true
        if current_rt == rt then
            error(KILLED, 0)
        end
        return true     -- a task of a runtime nested in self: that stops (see drive)
    end
    self.results = { n = 2, false, KILLED }
    self.co = nil
    finish(rt, self, "cancelled")
    return true
end

-- Run fn(t) when the task ends, however it ends (for resource owners).
function Task:on_exit(fn)
    check.self("Task:on_exit", self, Task, "a task")
    check.func("Task:on_exit", "fn", fn)
    if not self.live then   -- already ended: clean up now
        fn(self)
        return fn
    end
    local c = self.cleanups
    if not c then
        c = {}
        self.cleanups = c
    end
    c[#c + 1] = fn
    return fn
end

-- For resource owners (registered buffers): obj:_task_exit(task) runs when
-- the task ends unless disowned first.  One table per owning task, no
-- closure per resource.
function Task:_own(obj)
    local held = self.resources
    if not held then
        held = {}
        self.resources = held
    end
    held[obj] = true
end

function Task:_disown(obj)
    local held = self.resources
    if held then
        held[obj] = nil
    end
end

-- Low level: wake a task parked with pluvio.suspend().
function Task:wake()
    check.self("Task:wake", self, Task, "a task")
    wake(self)
end

---------------------------------------------------------------------------
-- Runtime
---------------------------------------------------------------------------

local function new_runtime(capacity)
    local err = ffi.new("int[1]")
    local crt = C.pl_runtime_new(capacity, err)
    if crt == nil then
        local refused = err[0] == -EPERM or err[0] == -EACCES or err[0] == -ENOSYS
        local hint = refused and " (the runtime blocks in io_uring: is io_uring allowed here?)" or
                     err[0] == -ENOMEM and " (io_uring's rings count against the locked-memory limit: " ..
                                           "raise it, ulimit -l)" or ""
        error("Runtime.new: cannot create the runtime: " .. core.errstr(err[0]) .. hint, 3)
    end
    local rt = setmetatable({
        crt = ffi.gc(crt, C.pl_runtime_free),
        slots = {}, nlive = 0, seq = 0,
        ready = ffi.new("uint32_t[?]", BATCH),
        gen_out = ffi.new("uint32_t[1]"),
        info_out = ffi.new("pl_task_info_t"),
        reactors = {},            -- name -> object (keeps C reactors alive)
        lua_reactors = {},        -- array of { name, reactor }
        failed = setmetatable({}, WEAK_KEYS),     -- failed tasks, weakly (note_failed)
        n_failed = 0,
        co_pool = {},
        n_unjoined = 0,
        running = false,
        stopping = false,         -- cancel_all's last round: spawn raises
        current = nil,
        last_slot = -1,           -- the last task of the loop's batch (see linger)
        turns = {},               -- task -> true: woken to take a channel's turn, not yet run
    }, Runtime)
    rt.ready_marks = C.pl_runtime_ready_marks(crt)     -- (crt keeps it alive)
    return rt
end

-- Runtime.new([capacity]): capacity is the initial task-table size (it grows
-- when needed), an integer from 1 to 16777216; default 1024.
function Runtime.new(capacity)
    if type(capacity) == "nil" then     -- (not == nil: a NULL pointer equals nil)
        capacity = DEFAULT_CAPACITY
    end
    check.integer("Runtime.new", "capacity", capacity, 1, MAX_CAPACITY)
    return new_runtime(capacity)
end

function Runtime:set_affinity(cpu)
    check.self("Runtime:set_affinity", self, Runtime, "a runtime")
    local n = C.pl_runtime_cpu_count()
    if type(cpu) ~= "number" or cpu ~= cpu or cpu % 1 ~= 0 or cpu < 0 or cpu >= n then
        error(format("Runtime:set_affinity: cpu %s does not exist (this machine has %d CPU%s: 0-%d)",
                     check.show(cpu), n, n == 1 and "" or "s", n - 1), 2)
    end
    local rc = C.pl_runtime_set_affinity(self.crt, cpu)
    if rc < 0 then
        error(format("Runtime:set_affinity: cannot pin to cpu %d: %s", cpu, core.errstr(rc)), 2)
    end
    return true
end

-- Busy-poll for up to seconds before blocking when idle (trades CPU for
-- wake-up latency).  0 turns it off.
function Runtime:set_spin(seconds)
    check.self("Runtime:set_spin", self, Runtime, "a runtime")
    check.number("Runtime:set_spin", "seconds", seconds, 0, 10)
    C.pl_runtime_set_spin(self.crt, seconds)
end

local function c_reactor_of(r)
    if type(r) == "cdata" and ffi.istype("pl_reactor_t *", r) then
        return r
    end
    if type(r) == "table" and type(r.c_reactor) == "function" then
        return r:c_reactor()
    end
    return nil
end

-- A reactor that serves one runtime at a time (an io_uring one) says why
-- it may not serve rt now (_attach_refused), or nil.
local function serves_one(reactor)
    return type(reactor) == "table" and type(reactor._attach_refused) == "function"
end

local function attach_refusal(reactor, rt)
    return serves_one(reactor) and reactor:_attach_refused(rt) or nil
end

-- register_reactor(name, reactor): a C reactor (cdata pl_reactor_t*, or an
-- object with a :c_reactor() method) or a Lua reactor: a table with
-- r:poll(budget) -> completions and r:status() -> "idle"|"pending"|"ready".
function Runtime:register_reactor(name, reactor)
    local fname = "Runtime:register_reactor"
    check.self(fname, self, Runtime, "a runtime")
    check.string(fname, "name", name)
    if name == "" or #name >= 64 then
        check.fail(fname, "name must be 1 to 63 characters", name)
    end
    check.no_nul(fname, "name", name)       -- (C would register "ab" for "ab\0c")
    if self.reactors[name] then
        error(fname .. ": a reactor named " .. check.show(name) .. " is already registered", 2)
    end
    local cr = c_reactor_of(reactor)
    if cr then
        local refused = attach_refusal(reactor, self)
        if refused then
            error(fname .. ": cannot register " .. check.show(name) .. ": " .. refused, 2)
        end
        local rc = C.pl_runtime_register_reactor(self.crt, name, cr)
        if rc < 0 then
            error(fname .. ": cannot register " .. check.show(name) .. ": " .. core.errstr(rc), 2)
        end
        if type(reactor) == "table" and type(reactor.attach) == "function" then
            reactor:attach(self)
        end
    elseif type(reactor) == "table" then
        if type(reactor.poll) ~= "function" then
            error(fname .. ": reactor must be a C reactor or a table with a poll function " ..
                  "(reactor:poll(budget) -> completions)", 2)
        end
        if type(reactor.status) ~= "function" then
            error(fname .. ": reactor must have a status function " ..
                  "(reactor:status() -> \"idle\", \"pending\" or \"ready\")", 2)
        end
        self.lua_reactors[#self.lua_reactors + 1] = { name = name, reactor = reactor, polls = 0, completions = 0 }
    else
        error(fname .. ": reactor must be a C reactor or a table with poll and status " ..
              "functions (got " .. type(reactor) .. ")", 2)
    end
    self.reactors[name] = reactor
    return true
end

function Runtime:reactor(name)
    check.self("Runtime:reactor", self, Runtime, "a runtime")
    return self.reactors[name]
end

local LUA_STATUS = { idle = 0, pending = 1, ready = 2 }

-- Poll the Lua reactors; returns the pl_tick flags they call for.
local function poll_lua_reactors(rt)
    local busy = false
    local list = rt.lua_reactors
    for i = 1, #list do
        local e = list[i]
        local st = e.reactor:status()
        local code = LUA_STATUS[st]
        if not code then    -- (a typo would poll it, busy, for good)
            error(format('reactor "%s": status() returned %s; it must return "idle", "pending" or "ready"',
                         e.name, check.show(st)), 0)
        end
        if code ~= 0 then
            local n = e.reactor:poll(BATCH)
            e.polls = e.polls + 1
            if type(n) == "number" and n > 0 then
                e.completions = e.completions + n
            end
            busy = true
        end
    end
    return busy and (C.PL_TICK_MAY_BLOCK + C.PL_TICK_EXTERNAL_BUSY) or C.PL_TICK_MAY_BLOCK
end

-- What a waiting task waits on, in words.
local function describe_wait(t, kind)
    local w = t.waiting_for
    if getmetatable(w) == Task then
        if w.rt ~= t.rt and w.live then
            return "join of " .. tostring(w) .. ", a task of another runtime (only its loop can end it)"
        end
        return "join of " .. tostring(w)
    elseif type(w) == "string" then
        return w
    elseif w ~= nil and type(w) == "table" and w.describe then
        return w:describe()
    end
    return WAIT_NAMES[kind] or "something"
end

-- One entry per live task: name, state, what it waits on, resumes, run time.
function Runtime:tasks()
    check.self("Runtime:tasks", self, Runtime, "a runtime")
    local list, info = {}, self.info_out
    for slot, t in walk, self.slots do
        if C.pl_task_info(self.crt, slot, info) == 0 then
            list[#list + 1] = {
                id = t.id, name = task_name(t),
                state = t == self.current and "running" or STATE_NAMES[info.state] or "waiting",
                waits_on = t ~= self.current and info.state == C.PL_TASK_WAITING
                    and describe_wait(t, info.wait) or nil,
                resumes = info.resumes, run_time = info.run_s,
                deadline = info.deadline >= 0 and info.deadline or nil,
                task = t,
            }
        end
    end
    table.sort(list, function(a, b) return a.id < b.id end)
    return list
end

function Runtime:stats()
    check.self("Runtime:stats", self, Runtime, "a runtime")
    local s = ffi.new("pl_runtime_stats_t")
    C.pl_runtime_stats(self.crt, s)
    local out = {
        tasks_spawned = s.spawned, tasks_finished = s.finished, tasks_failed = s.failed,
        tasks_cancelled = s.cancelled, tasks_live = s.live, tasks_ready = s.ready,
        timers_armed = s.timers, ticks = s.ticks, resumes = s.resumes, wakes = s.wakes,
        timers_fired = s.timers_fired, idle_waits = s.idle_waits, time_blocked = s.blocked_s,
        lingers = s.lingers,
        task_capacity = s.capacity, unjoined_failures = self.n_unjoined,
        reactors = {},
    }
    local info = ffi.new("pl_reactor_info_t")
    local figures = ffi.new("pl_stat_t[32]")
    for i = 0, s.reactors - 1 do
        if C.pl_runtime_reactor_info(self.crt, i, info) == 0 then
            local r = { kind = ffi.string(info.kind), status = ({ "idle", "pending", "ready" })[info.status + 1],
                        polls = info.polls, completions = info.completions }
            local n = C.pl_runtime_reactor_stats(self.crt, i, figures, 32)
            for k = 0, n - 1 do
                r[ffi.string(figures[k].name)] = figures[k].value
            end
            out.reactors[ffi.string(info.name)] = r
        end
    end
    for _, e in ipairs(self.lua_reactors) do
        local r = { kind = "lua", status = tostring(e.reactor:status()),
                    polls = e.polls, completions = e.completions }
        if type(e.reactor.stats) == "function" then
            for k, v in walk, e.reactor:stats() do
                r[k] = v
            end
        end
        out.reactors[e.name] = r
    end
    return out
end

local function deadlock_message(rt)
    local lines = {}
    for _, e in ipairs(rt:tasks()) do
        lines[#lines + 1] = format("  %s waits on %s", tostring(e.task), e.waits_on or e.state)
    end
    return format("deadlock: %d task%s wait%s and nothing can wake %s " ..
                  "(no task ready, no I/O in flight, no timer armed):\n%s",
                  #lines, #lines == 1 and "" or "s", #lines == 1 and "s" or "",
                  #lines == 1 and "it" or "them", table.concat(lines, "\n"))
end

-- Cancel every live task (after a deadlock, a failed main task, or a kill
-- of the task running the runtime).  Called while rt is still the current,
-- running runtime, so a clean-up that spawns puts its task here; the tasks
-- clean-ups spawn are cancelled in the next round, in spawn order.  In the
-- last round spawn raises: clean-ups that spawn again and again cannot keep
-- the runtime alive.
local CANCEL_ROUNDS = 8

local function cancel_all(rt)
    for round = 1, CANCEL_ROUNDS do
        if rt.nlive == 0 then
            break
        end
        rt.stopping = round == CANCEL_ROUNDS
        local list = {}     -- (spawns during the traversal would break pairs)
        for _, t in walk, rt.slots do
            list[#list + 1] = t
        end
        table.sort(list, function(a, b) return a.id < b.id end)
        for _, t in ipairs(list) do
            if t.live then
                t.results = { n = 2, false, KILLED }
                t.co = nil
                t.joined = true
                finish(rt, t, "cancelled")
            end
        end
    end
    rt.stopping = false
end

-- Resume each ready task once; returns when the batch is done.  No call
-- into C per resume: the task's own last call before it stopped (park,
-- yield, I/O start, exit) did the accounting.  An entry whose task another
-- task ended meanwhile finds no task: C keeps such a slot from spawns until
-- the next drain (pl_task_exit), so no check of generations is needed here.
local function run_batch(rt, n)
    local crt, ready, slots = rt.crt, rt.ready, rt.slots
    if n > 0 then
        rt.last_slot = ready[n - 1]     -- (a slot is in a batch once)
    end
    for i = 0, n - 1 do
        local t = slots[ready[i]]
        if t and t.co then
            rt.current = t
            local co = t.co
            local ok, y, a, b = co_resume(co, t)
            rt.current = nil
            if y == PARK and not t.kill_requested then
                C.pl_task_wait(crt, t.slot, a, b)
            elseif y == SLEEP and not t.kill_requested then
                C.pl_task_sleep(crt, t.slot, a)
            elseif y == DONE then   -- the task returned; its coroutine waits for the next
                t.co = nil
                if t.live then
                    settle(rt, t)
                end
                local pool = rt.co_pool
                if #pool < POOL_MAX then
                    pool[#pool + 1] = co
                end
            elseif not ok then  -- the task raised: its coroutine is over
                t.co = nil
                if t.live then
                    t.results = { n = 2, false, task_error(co, y) }
                    settle(rt, t)
                end
            elseif t.kill_requested and t.live then   -- caught its own kill: stop it here
                t.co = nil
                t.results = { n = 2, false, KILLED }
                finish(rt, t, "cancelled", true)
            elseif y ~= WAIT then -- a bare coroutine.yield(): yield the CPU
                C.pl_task_yield(crt, t.slot)
            end
        end
    end
end

-- At the end of a run: report the failed tasks nobody joined that the
-- collector has not reported (yet), in the order they failed.
local function report_unjoined(rt)
    local failed = rt.failed
    rt.failed = setmetatable({}, WEAK_KEYS)
    local list = {}
    for t in walk, failed do
        if not t.joined and not t.reported then
            list[#list + 1] = t
        end
    end
    table.sort(list, function(a, b) return failed[a] < failed[b] end)
    for i = 1, #list do
        report_failure(rt, list[i])
    end
end

-- The loop: tick, resume, repeat, until done() says so or no task is live.
local function loop(rt, done)
    local crt, ready = rt.crt, rt.ready
    while rt.nlive > 0 and not done(rt) do
        local flags = C.PL_TICK_MAY_BLOCK
        if rt.lua_reactors[1] then
            flags = poll_lua_reactors(rt)
        end
        local n = C.pl_tick(crt, ready, BATCH, flags)
        if n < 0 then       -- (drive cancels the tasks)
            if n == -EDEADLK then
                return nil, deadlock_message(rt)
            end
            return nil, "the runtime cannot wait: " .. core.errstr(n)
        end
        run_batch(rt, n)
    end
    return true
end

-- A reactor that serves one runtime at a time (an io_uring one) and that
-- another runtime registered since rt's last run serves rt again: else its
-- ops would park rt's tasks in the other runtime, and rt's own files would
-- be "opened in another runtime".  Refused while that other one runs.
local function reclaim_reactors(rt, fname)
    for name, reactor in walk, rt.reactors do
        if serves_one(reactor) then
            local refused = reactor:_attach_refused(rt)
            if refused then
                error(fname .. ": cannot run: its reactor " .. check.show(name) .. ": " .. refused, 3)
            end
            reactor:attach(rt)
        end
    end
end

-- When a run stops (rt.done(rt)): a kill of the task running this runtime
-- (from in here, or caught by it before) stops the loop, the runtime being
-- that task's wait point; run stops when its main task failed or was
-- cancelled (else when no task is left), block_on when it ended.  Module
-- functions, not closures made by each run: the JIT compiles the loop's
-- call of done to a check of that very function, kept in the trace as a
-- constant, and a closure of the run (its main task, so its runtime and
-- reactors: an io_uring ring, registered buffers) stayed alive as long as
-- the trace did, long after the runtime was dropped.
local function outer_killed(rt)
    local outer_task = rt.outer_task
    return outer_task ~= nil and outer_task.kill_requested == true
end

local function run_done(rt)
    local main = rt.main_task
    return main.final == "failed" or main.final == "cancelled" or outer_killed(rt)
end

local function block_on_done(rt)
    return not rt.main_task.live or outer_killed(rt)
end

-- rt stops running (a block_on returned with tasks left, a runtime nested
-- in a task of rt starts): a task woken to take a channel's turn while rt
-- ran cannot take it until rt runs again, so the turn goes on to the next
-- in line (with one of the running runtime first).  Left with it, a task
-- parked in the runtime that runs waited with a value in the channel: a
-- false deadlock.  The task still runs later and finds the channel as it
-- is then.  (By id: the same order on every run.)
local function pass_turns(rt)
    local turns = rt.turns
    if next(turns) == nil then
        return
    end
    local list = {}
    for t in walk, turns do
        list[#list + 1] = t
    end
    table.sort(list, function(a, b) return a.id < b.id end)
    for _, holder in ipairs(list) do
        local baton = holder.baton
        turns[holder], holder.baton = nil, nil
        if baton then
            baton:_pass_baton()
        end
    end
end

-- Run fn(...) as the main task; until_all: wait for every task (run) or
-- only the main one (block_on).  Returns the main task's results; raises its
-- error (and then cancels the tasks left).
local function drive(rt, fname, until_all, fn, ...)
    check.self(fname, rt, Runtime, "a runtime")
    check.func(fname, "fn", fn)
    if rt.running then
        error(fname .. ": this runtime is already running (a task cannot run its own runtime)", 3)
    end
    reclaim_reactors(rt, fname)
    local outer_rt = current_rt
    local outer_task = outer_rt and outer_rt.current
    if outer_task then
        C.pl_task_wait(outer_rt.crt, outer_task.slot, C.PL_WAIT_RUNTIME, 0)
    end
    local main = spawn(rt, fname, "main", fn, ...)
    main.joined = true
    main.main_of = fname    -- (see claim_refused)
    rt.running = true
    rt.main_task, rt.outer_task = main, outer_task
    rt.done = until_all and run_done or block_on_done
    rt.outer = outer_rt     -- (the runs under way: see report_running_unjoined)
    current_rt = rt
    if outer_rt then
        pass_turns(outer_rt)
    end
    local ok, lok, lerr = pcall(loop, rt, rt.done)
    local was_killed = ok and lok and outer_killed(rt)
    -- Cancel what is left while rt is still the current runtime: clean-ups
    -- that spawn put their tasks here, and those are cancelled too.
    if not ok or not lok then   -- a bug in the loop, a deadlock, a failed wait
        cancel_all(rt)
    elseif was_killed then      -- unwind the killed task (block_on keeps the others)
        if until_all then
            cancel_all(rt)
        else
            main:kill()
        end
    elseif until_all and main.results and not main.results[1] then
        cancel_all(rt)
    end
    current_rt = outer_rt
    pass_turns(rt)          -- (tasks block_on left)
    rt.outer = nil
    rt.done, rt.main_task, rt.outer_task = nil, nil, nil
    rt.running = false
    if not ok then          -- never leave tasks half-run
        report_unjoined(rt) -- (nor a failure unreported: the collector may never come)
        error(lok, 0)
    end
    if was_killed then
        -- A main task that failed before the kill (one of its clean-ups
        -- killed the task running it, say): the kill replaces its error,
        -- which nobody else will see, so report it as never joined.
        if main.final == "failed" then
            main.joined = false
        end
        report_unjoined(rt)
        error(KILLED, 0)
    end
    local r = main.results
    report_unjoined(rt)
    if not lok then         -- deadlock or a failed wait; every task was cancelled
        error(lerr, 0)
    end
    if not r[1] then
        error(r[2] == KILLED and "the main task was cancelled" or r[2], 0)
    end
    return unpack(r, 2, r.n)
end

-- rt:run(fn, ...): run fn as the main task and every task it spawns until
-- all have finished; returns fn's results, raises fn's error.
function Runtime:run(fn, ...)
    return drive(self, "Runtime:run", true, fn, ...)
end

-- rt:block_on(fn, ...): run until fn's task finishes and return its results;
-- other tasks stay in the runtime for the next run/block_on.
function Runtime:block_on(fn, ...)
    return drive(self, "Runtime:block_on", false, fn, ...)
end

-- For the host's os.exit, which leaves before any run ends: report now
-- what the ends of the runs under way would (failed tasks nobody joined),
-- innermost first.
function M._report_running_unjoined()
    local rt = current_rt
    while rt do
        report_unjoined(rt)
        rt = rt.outer
    end
end

-- How many failed tasks were never joined (the host exits 1 when > 0).
function Runtime:unjoined_failures()
    check.self("Runtime:unjoined_failures", self, Runtime, "a runtime")
    return self.n_unjoined
end

---------------------------------------------------------------------------
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

-- pluvio.wrap(fn): a plain function that runs fn in a new runtime, for
-- busted's it() and other synchronous callers.
function M.wrap(fn)
    check.func("pluvio.wrap", "fn", fn)
    return function(...)
        collect_wrapped_runtimes()
        local rt = M.default_runtime()
        wrapped_runtimes[rt] = true
        return wrapped_results(rt, fn, pcall(rt.run, rt, fn, ...))
    end
end

-- The runtime running the current task, or nil.
function M.runtime()
    return current_rt
end

-- The running task, or nil outside tasks.
function M.current()
    local rt = current_rt
    local t = rt and rt.current
    if t and co_running() == t.co then
        return t
    end
    return nil
end

local function spawn_checked(fname, name, fn, ...)
    local rt = current_rt
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
M.now = C.pl_now

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
function M.suspend(what)
    local t = running_task("pluvio.suspend")
    park(t, C.PL_WAIT_OTHER, 0, what ~= nil and tostring(what) or "suspend", "pluvio.suspend")
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
                return i, results_of(tasks[i])
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

-- pluvio.require(name): require, for a module whose top level waits (the
-- host's global require; see pluvio/loader.lua).
M.require = require("pluvio.loader").new(M)

-- For modules built on the runtime (channels, reactors): park and wake.
M._park = park
M._linger = linger
M._WAIT = WAIT
M._wake = wake
M._current_task = current_task
M._io_task = io_task
M._yielded = yielded
M._running_task = running_task
M._full_collect = full_collect

M.version = ffi.string(C.pl_version())

return M
