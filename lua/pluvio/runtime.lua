-- pluvio.runtime: the runtime: its loop (tick, resume, repeat), reactors,
-- statistics, deadlock reports, and run/block_on.  Tasks are task.lua's;
-- the public API is pluvio's (init.lua), which gives Runtime.
local core = require "pluvio.core"
local check = require "pluvio.check"
local task = require "pluvio.task"

local ffi, C = core.ffi, core.C
local co_resume = coroutine.resume
local type, tostring, setmetatable = type, tostring, setmetatable
local unpack, format, getmetatable, pcall = unpack, string.format, getmetatable, pcall
local walk = next          -- walk tables with `for k, v in walk, t`, not pairs(): see task.lua

local M = {}

local BATCH = 256                 -- slots taken from the ready ring per tick
local DEFAULT_CAPACITY = 1024
local MAX_CAPACITY = task.MAX_CAPACITY
local EDEADLK = core.errno.EDEADLK
local EPERM, EACCES, ENOSYS = 1, 13, 38     -- how the kernel refuses io_uring
local ENOMEM = 12                           -- and its rings' memory, for a user without CAP_IPC_LOCK
M.DEFAULT_CAPACITY = DEFAULT_CAPACITY

local Task, KILLED, DONE, POOL_MAX = task.Task, task.KILLED, task.DONE, task.POOL_MAX
local WAIT, PARK, SLEEP = task.WAIT, task.PARK, task.SLEEP
local WAIT_NAMES, STATE_NAMES, WEAK_KEYS = task.WAIT_NAMES, task.STATE_NAMES, task.WEAK_KEYS
local spawn, finish, settle, task_error = task.spawn, task.finish, task.settle, task.task_error
local task_name, report_failure = task.task_name, task.report_failure

local Runtime = {}
Runtime.__index = Runtime
M.Runtime = Runtime

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
        reactor_order = {},       -- the objects in the order they were registered
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

-- self, a runtime that Runtime.new made (check.made).
local function runtime_self(fname, self)
    check.made(fname, self, Runtime, "a runtime", "crt", "runtimes with pluvio.Runtime.new", 4)
end

function Runtime:set_affinity(cpu)
    runtime_self("Runtime:set_affinity", self)
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
    runtime_self("Runtime:set_spin", self)
    check.number("Runtime:set_spin", "seconds", seconds, 0, 10)
    C.pl_runtime_set_spin(self.crt, seconds)
end

local function c_reactor_of(r, fname)
    if type(r) == "cdata" and ffi.istype("pl_reactor_t *", r) then
        return r
    end
    if type(r) == "table" and type(r.c_reactor) == "function" then
        local ok, cr = pcall(r.c_reactor, r)
        if not ok then      -- (a table made by hand with a reactor's methods): in our words, at the caller
            error(format("%s: reactor is not usable: %s", fname,
                         tostring(cr):gsub("^[^\n]-:%d+: ", "")), 3)
        end
        if not (type(cr) == "cdata" and ffi.istype("pl_reactor_t *", cr)) then
            error(format("%s: reactor:c_reactor() must return a pl_reactor_t * (got %s)", fname,
                         check.show(cr)), 3)
        end
        return cr
    end
    return nil
end

-- The name reactor (or its C vtable) is registered under on rt, or nil.
local function registered_as(rt, reactor, cr)
    for name, r in walk, rt.reactors do
        if r == reactor or (cr ~= nil and c_reactor_of(r, "Runtime:register_reactor") == cr) then
            return name
        end
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
    runtime_self(fname, self)
    check.string(fname, "name", name)
    if name == "" or #name >= 64 then
        check.fail(fname, "name must be 1 to 63 characters", name)
    end
    check.no_nul(fname, "name", name)       -- (C would register "ab" for "ab\0c")
    if self.reactors[name] then
        error(fname .. ": a reactor named " .. check.show(name) .. " is already registered", 2)
    end
    local cr = c_reactor_of(reactor, fname)
    local as = registered_as(self, reactor, cr)
    if as then      -- (it would be polled once per name, its figures counted as often)
        error(fname .. ": cannot register " .. check.show(name) .. ": the reactor is registered on " ..
              "this runtime already, as " .. check.show(as), 2)
    end
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
    self.reactor_order[#self.reactor_order + 1] = reactor
    return true
end

function Runtime:reactor(name)
    runtime_self("Runtime:reactor", self)
    check.string("Runtime:reactor", "name", name)
    return self.reactors[name]
end

local LUA_STATUS = { idle = 0, pending = 1, ready = 2 }
local C_STATUS = { [0] = "idle", "pending", "ready" }

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
            if type(n) == "number" and n >= 0 and n < math.huge then
                e.completions = e.completions + n
            elseif n ~= nil then    -- (nil: a poll that says nothing completed nothing)
                error(format('reactor "%s": poll() returned %s; it must return how many operations it ' ..
                             'completed (a finite number >= 0)', e.name, check.show(n)), 0)
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

-- Where a parked task waits in the user's code: "file:line" of the
-- innermost frame of its coroutine that is not Pluvio's own (nor C), or
-- nil (a task not started yet, or one whose function is Pluvio's).  Asked
-- only when read: nothing is recorded per wait.  Pluvio's own frames are
-- those of this module's directory (a user's pluvio/job.lua is not one).
local getinfo = debug.getinfo
local OWN_DIR = getinfo(1, "S").source:match("^(@.*/)[^/]+$")

local function wait_site(co)
    for level = 0, 200 do
        local info = getinfo(co, level, "Sl")
        if not info then
            return nil
        end
        local src = info.source
        if info.currentline > 0 and not (OWN_DIR and src:sub(1, #OWN_DIR) == OWN_DIR or
                                         not OWN_DIR and src:find("pluvio/[%w_]+%.lua$")) then
            return info.short_src .. ":" .. info.currentline
        end
    end
end

-- A waiting task's entry finds its where when first read: walking 100,000
-- parked stacks made rt:tasks() five times slower, and the reports print
-- at most some of them.
local WAITING_ENTRY = {
    __index = function(e, k)
        if k == "where" then
            local co = e.task.co
            local w = co and e.task:status() == "waiting" and wait_site(co) or nil
            rawset(e, "where", w)
            return w
        end
    end,
}

-- One entry per live task: name, state, what it waits on, resumes, run time.
function Runtime:tasks()
    runtime_self("Runtime:tasks", self)
    local list, info = {}, self.info_out
    for slot, t in walk, self.slots do
        if C.pl_task_info(self.crt, slot, info) == 0 then
            local waiting = t ~= self.current and info.state == C.PL_TASK_WAITING
            local e = {
                id = t.id, name = task_name(t),
                state = t == self.current and "running" or STATE_NAMES[info.state] or "waiting",
                waits_on = waiting and describe_wait(t, info.wait) or nil,
                resumes = info.resumes, run_time = info.run_s,
                deadline = info.deadline >= 0 and info.deadline or nil,
                task = t,
            }
            list[#list + 1] = waiting and setmetatable(e, WAITING_ENTRY) or e
        end
    end
    table.sort(list, function(a, b) return a.id < b.id end)
    return list
end

function Runtime:stats()
    runtime_self("Runtime:stats", self)
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
            local name = ffi.string(info.name)
            local r = { kind = ffi.string(info.kind), status = C_STATUS[info.status] or "bad status " .. info.status,
                        polls = info.polls, completions = info.completions }
            local n = C.pl_runtime_reactor_stats(self.crt, i, figures, 32)
            if n > 32 then      -- (a C reactor's hook that broke its contract: not a read past the array)
                error(format('Runtime:stats: reactor "%s": its stats hook returned %d figures, more than the 32 ' ..
                             'it was given', name, n), 2)
            end
            for k = 0, n - 1 do
                local f = figures[k]
                if f.name == nil then
                    error(format('Runtime:stats: reactor "%s": its stats hook gave figure %d no name', name, k), 2)
                end
                local key = ffi.string(f.name)
                if r[key] == nil then       -- (the runtime's own figures stay)
                    r[key] = f.value
                end
            end
            out.reactors[name] = r
        end
    end
    for _, e in ipairs(self.lua_reactors) do
        local r = { kind = "lua", status = tostring(e.reactor:status()),
                    polls = e.polls, completions = e.completions }
        if type(e.reactor.stats) == "function" then
            local figures = e.reactor:stats()
            if type(figures) ~= "table" then
                error(format('Runtime:stats: reactor "%s": stats() returned %s; it must return a table of figures',
                             e.name, check.show(figures)), 2)
            end
            for k, v in walk, figures do
                if r[k] == nil then         -- (the runtime's own figures stay)
                    r[k] = v
                end
            end
        end
        out.reactors[e.name] = r
    end
    return out
end

-- (where: for the first WHERE_SHOWN tasks of a deadlock, whose report
-- lists every task: 100,000 stacks walked took a second and 170 MB)
local WHERE_SHOWN = 1000

local function deadlock_message(rt)
    local lines = {}
    for i, e in ipairs(rt:tasks()) do
        local where = i <= WHERE_SHOWN and e.where
        lines[#lines + 1] = format("  %s waits on %s%s", tostring(e.task), e.waits_on or e.state,
                                   where and " at " .. where or "")
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

-- What stops a loop when the host caught SIGINT or SIGTERM (the loop's
-- error; drive cancels the tasks, and the host ends by that signal).
local SIGNAL_NAMES = { [2] = "SIGINT", [15] = "SIGTERM" }

-- What the tasks of a run that seemed to hang were waiting on (the first
-- STOPPED_SHOWN of them), for the error that stops it.
local STOPPED_SHOWN = 10

local function stopped_tasks(rt)
    local lines, list = {}, rt:tasks()
    for i = 1, math.min(#list, STOPPED_SHOWN) do
        local e = list[i]
        lines[i] = format("  %s %s%s", tostring(e.task), e.waits_on and "waits on " .. e.waits_on or "was " .. e.state,
                          e.where and " at " .. e.where or "")
    end
    if #list > STOPPED_SHOWN then
        lines[#lines + 1] = format("  ... and %d more", #list - STOPPED_SHOWN)
    end
    return table.concat(lines, "\n")
end

local function interrupted(sig, rt)
    return format("interrupted by %s; its tasks then:\n%s", SIGNAL_NAMES[sig] or ("signal " .. sig),
                  stopped_tasks(rt))
end

-- The loop: tick, resume, repeat, until done() says so or no task is live
-- (or the host caught a signal: pl_signals_catch).
local function loop(rt, done)
    local crt, ready, deadline = rt.crt, rt.ready, rt.deadline
    while rt.nlive > 0 and not done(rt) do
        local sig = C.pl_signal_caught()
        if sig ~= 0 then
            return nil, interrupted(sig, rt)
        end
        if deadline and C.pl_now() >= deadline then     -- (pluvio.wrap's timeout)
            return nil, format("timeout: the run did not end within %g s; its tasks then:\n%s", rt.deadline_limit,
                               stopped_tasks(rt))
        end
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
    runtime_self(fname, rt)
    check.func(fname, "fn", fn)
    if rt.running then
        error(fname .. ": this runtime is already running (a task cannot run its own runtime)", 2)   -- (drive is tail-called: 2 is the user)
    end
    reclaim_reactors(rt, fname)
    local outer_rt = task.current_rt()
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
    -- A time limit (pluvio.wrap's): the loop stops the run at its deadline,
    -- and a run nested in a task of a limited one stops at that one's.
    local deadline, limit = nil, nil
    if rt.time_limit then
        deadline, limit = C.pl_now() + rt.time_limit, rt.time_limit
    end
    if outer_rt and outer_rt.deadline and (not deadline or outer_rt.deadline < deadline) then
        deadline, limit = outer_rt.deadline, outer_rt.deadline_limit
    end
    if deadline then
        rt.deadline, rt.deadline_limit = deadline, limit
        C.pl_runtime_wake_by(rt.crt, deadline)
    end
    task.set_current_rt(rt)
    if outer_rt then
        pass_turns(outer_rt)
    end
    local ok, lok, lerr = pcall(loop, rt, rt.done)
    if rt.deadline then
        rt.deadline, rt.deadline_limit = nil, nil
        C.pl_runtime_wake_by(rt.crt, 0)
    end
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
    task.set_current_rt(outer_rt)
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
function M.report_running_unjoined()
    local rt = task.current_rt()
    while rt do
        report_unjoined(rt)
        rt = rt.outer
    end
end

-- How many failed tasks were never joined (the host exits 1 when > 0).
function Runtime:unjoined_failures()
    runtime_self("Runtime:unjoined_failures", self)
    return self.n_unjoined
end


M.new_runtime, M.CANCEL_ROUNDS = new_runtime, CANCEL_ROUNDS

return M
