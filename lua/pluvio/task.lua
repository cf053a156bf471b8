-- pluvio.task: the executor's side of tasks, for the runtime (runtime.lua)
-- and the modules built on it.  The public API is pluvio's (init.lua).
--
-- C (libpluvio) owns the task slots, the ready ring, timers and the idle
-- wait; Lua owns only the coroutines and the values they produce.  A
-- blocking call has one shape: record what the task waits on in C, yield,
-- and be resumed by the loop once something woke the slot.  Every wait is a
-- loop on its condition, so a spurious wake-up is harmless.
local core = require "pluvio.core"
local check = require "pluvio.check"

local ffi, C = core.ffi, core.C
local co_create, co_yield = coroutine.create, coroutine.yield
local co_running = coroutine.running
local select, type, tostring, setmetatable = select, type, tostring, setmetatable
local unpack, traceback, format = unpack, debug.traceback, string.format
local getmetatable, newproxy, pcall, rawget = getmetatable, newproxy, pcall, rawget
-- Tables are walked with `for k, v in walk, t`, never with pairs() or a
-- variable named next: LuaJIT specializes a loop written so (ITERN), and
-- Debian's LuaJIT (the 2022-03-20 snapshot) can end such a loop early once
-- it gives up compiling it (LuaJIT#827): rt:tasks() raised on a missing
-- task about 3 times in 500 seeds of spec/channel_model_spec.lua.  A loop
-- through another name steps with next() itself and is not specialized.
local walk = next

local M = {}

local MAX_CAPACITY = 16777216     -- PL_MAX_TASKS
local ENOMEM = 12
M.MAX_CAPACITY = MAX_CAPACITY

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
    [C.PL_WAIT_ACCEPT] = "accept",
}
local STATE_NAMES = {
    [C.PL_TASK_READY] = "ready", [C.PL_TASK_RUNNING] = "running",
    [C.PL_TASK_WAITING] = "waiting",
}
M.WAIT_KIND = {     -- the park kinds (PL_WAIT_*), for the modules that park tasks
    SLEEP = C.PL_WAIT_SLEEP, JOIN = C.PL_WAIT_JOIN, SELECT = C.PL_WAIT_SELECT,
    CHANNEL_SEND = C.PL_WAIT_CHANNEL_SEND, CHANNEL_RECV = C.PL_WAIT_CHANNEL_RECV,
    IO = C.PL_WAIT_IO, BUFFER = C.PL_WAIT_BUFFER, REACTOR = C.PL_WAIT_REACTOR,
    OTHER = C.PL_WAIT_OTHER, STREAM = C.PL_WAIT_STREAM, ACCEPT = C.PL_WAIT_ACCEPT,
}

M.WAIT_NAMES, M.STATE_NAMES = WAIT_NAMES, STATE_NAMES
M.WAIT, M.PARK, M.SLEEP, M.YIELD, M.KILLED = WAIT, PARK, SLEEP, YIELD, KILLED

local Task = {}
Task.__index = Task
M.Task = Task

-- The runtime whose loop runs now (innermost, for nested runtimes); set by
-- the runtime's drive.
local current_rt = nil

function M.current_rt()
    return current_rt
end

function M.set_current_rt(rt)
    current_rt = rt
end

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
local own_source = (debug.getinfo(1, "S").source:match("^(@.*pluvio/)task%.lua$"))

-- The stack level, seen from the caller of this function, of the first
-- frame outside pluvio's modules: where the user called the function that
-- got there, however many of ours (a wait's park, a channel's recv) lie
-- between; fallback when pluvio's own files cannot be told apart, 0 (no
-- position) when no such frame is left (the user's call was a tail call:
-- `return ch:recv()`), rather than a line of ours.  Error paths only: it
-- walks the stack.
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
    return 0
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
local function running_task(fname, depth)
    local rt = current_rt
    local t = rt and rt.current
    if not t then
        not_in_task(fname, 4 + (depth or 0))
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
        not_the_task(fname, outside_level(4) - 4)     -- (0 - 4: error level 0)
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
    e = tostring(e)
    local tb = traceback(co, e)
    local cut = tb:find("\n[^\n]*pluvio/task%.lua:%d+: in function <[^\n]*pluvio/task%.lua:%d+>%s*$")
    tb = cut and tb:sub(1, cut - 1) or tb
    -- LuaJIT gives a dead coroutine's top frame no line.  That frame is a
    -- Lua function only when the VM raised there (attempt to index nil...),
    -- and the VM put the frame's position in front of the message: use it.
    local src, line = e:match("^([^\n]-):(%d+): ")
    if src then
        local at = "\nstack traceback:\n\t" .. src
        local s = #e + #at
        if tb:sub(#e + 1, s) == at and tb:sub(s + 1, s + 5) == ": in " then
            tb = tb:sub(1, s) .. ":" .. line .. tb:sub(s + 1)
        end
    end
    return tb
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
    local first = rt.first_unjoined == nil
    rt.first_unjoined = rt.first_unjoined or what
    if first and rt.raises_unjoined then   -- pluvio.wrap raises the first, or writes it if it raises another error
        rt.unjoined_unsaid = true
    else
        io.stderr:write("pluvio: " .. what .. "\n")
    end
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

-- For each of a task's results r whose metatable has hook (a function
-- of the modules whose objects hold something outside Lua: a UCX
-- message), hook(result, arg).
local function result_hooks(r, hook, arg)
    for i = 2, r.n do
        local v = r[i]
        local mt = getmetatable(v)
        local fn = type(mt) == "table" and rawget(mt, hook)
        if fn then
            fn(v, arg)
        end
    end
end

-- Results nobody will ever take (those of fn in a pluvio.timeout whose
-- task was killed before it took them): what among them holds something
-- outside Lua lets go of it (a UCX message: its data, and its rendezvous
-- sender, else held until the worker closed), as it would have had fn
-- been killed instead.
local function drop_results(r)
    result_hooks(r, "_result_dropped")
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
        if child.final == "done" then   -- fn returned, t was killed before it took the results
            drop_results(child.results)
        end
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

-- Results given to the task me that takes them (a join, a select, a
-- pluvio.timeout): what among them belonged to the task that returned it
-- is me's from now on, released if me is killed or fails as if me had
-- taken it (a UCX message fn took: else its end, "done", released nothing
-- and the message stayed held, its rendezvous sender waiting, until the
-- worker closed).
local function hand_results(r, me)
    result_hooks(r, "_result_taken", me)
end

local function results_of(t, me)
    t.joined = true
    local r = t.results
    if r[1] then
        hand_results(r, me)
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
    return results_of(self, me)
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


M.pack, M.orphan = pack, orphan
M.task_of, M.current_task, M.io_task, M.running_task = task_of, current_task, io_task, running_task
M.yielded, M.may_linger, M.linger, M.park, M.wake = yielded, may_linger, linger, park, wake
M.task_error, M.error_text, M.DONE, M.POOL_MAX = task_error, error_text, DONE, POOL_MAX
M.spawn, M.task_name, M.report_failure, M.WEAK_KEYS = spawn, task_name, report_failure, WEAK_KEYS
M.finish, M.settle, M.results_of, M.hand_results = finish, settle, results_of, hand_results
M.add_joiner, M.remove_joiner, M.claim_refused, M.unclaim = add_joiner, remove_joiner, claim_refused, unclaim
M.in_plain_coroutine = in_plain_coroutine

return M
