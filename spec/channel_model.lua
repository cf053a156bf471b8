-- A randomized model-based check of pluvio channels (used by
-- channel_model_spec.lua; run(seed) checks one scenario).
--
-- A seed gives a scenario: a few channels (capacity 1 to 3), and tasks
-- spawned over time that each run a random program of send, recv, "select"
-- (child tasks on several channels, pluvio.select, losers killed or left),
-- pluvio.recv_any on two or three channels (also inside pluvio.timeout),
-- pluvio.timeout around a send or recv, a plain coroutine that starts a wait
-- and is abandoned (or resumed, which raises), close, kill and Task:wake of
-- another task, on_exit clean-ups that send or close, and runtimes nested
-- in a task (run, or block_on, which leaves tasks parked on the channels).
-- The main task drives: it yields, sends and receives without parking,
-- kills, wakes, closes, has a reactor written in Lua send and receive from
-- the loop, and in some scenarios parks on a channel itself (a deadlock may
-- follow).  At the end it closes every channel, lets every task finish and
-- drains them.  Swarm testing: each scenario leaves some operations out.
--
-- The model is one FIFO per channel, updated when a send or recv returns
-- (nothing runs between a channel's change and the return), so each recv
-- must return exactly the model's oldest value: no value is lost,
-- duplicated or reordered.  Checked besides:
-- - close: a send on a closed channel raises, a parked one raises when the
--   channel closes, recv says "closed" only when closed and drained, close
--   returns true once;
-- - the wait queues: every entry a live task marked as queued there
--   (t.parked_on), at most one entry per task over all channels (one per
--   channel of its set, in receiver lines, for a recv_any's mark), no key
--   outside head..tail (no growth); a turn (rt.turns) held only in the
--   runtime that runs; at the end every queue empty;
-- - after every step: a receiver waits only while each value has a ready
--   task woken to take it, a sender while each free place has one;
-- - whenever every other task waits: a task parked in recv (send) finds
--   its channel empty (full) and open, is in its queue, holds no turn;
-- - a deadlock report: each task it names as parked on a channel could
--   not go on by the model.
-- The program depends on the seed alone; the interleaving on the runtime's
-- scheduling (deterministic, except in "timed" scenarios whose timeouts
-- really fire).  M.trace = true prints each event as it happens (a failure
-- shows the last 80).
local pluvio = require "pluvio"
local jit = require "jit"

-- The checks themselves run interpreted: compiling their many short paths
-- cost more (mprotect of the machine code) than the scenarios.  The
-- runtime and the channels are compiled as usual.
jit.off(true, true)

local M = {}

local util = require "model_util"
local new_rng, pick_weighted, swarm = util.new_rng, util.pick_weighted, util.swarm

local format, concat = string.format, table.concat
local unpack = unpack or table.unpack

---------------------------------------------------------------------------
-- Scenario state, failures, the event log
---------------------------------------------------------------------------

local function note(S, fmt, ...)
    local n = S.nevents + 1
    S.nevents = n
    S.events[(n - 1) % 80 + 1] = format("%5d ", n) .. format(fmt, ...)
    if M.trace then io.stderr:write(S.events[(n - 1) % 80 + 1], "\n") end
end

-- Record the first failure; the main task raises it at its next check.
-- (Raising in a worker would only end that worker.)
local function fail(S, fmt, ...)
    local msg = format(fmt, ...)
    note(S, "FAIL %s", msg)
    if not S.failure then
        S.failure = msg .. "\n" .. debug.traceback("", 2)
    end
end

local function expect(S, cond, fmt, ...)
    if not cond then fail(S, fmt, ...) end
    return cond
end

local function last_events(S)
    local out = {}
    local first = math.max(1, S.nevents - 79)
    for n = first, S.nevents do
        out[#out + 1] = S.events[(n - 1) % 80 + 1]
    end
    return concat(out, "\n")
end

local labels = setmetatable({}, { __mode = "k" })    -- a nested runtime -> "@r1"

-- The running task's name, with its runtime's for a nested one ("n3@r1").
local function me_name()
    return pluvio.current():name() .. (labels[pluvio.runtime()] or "")
end

-- "name#id" -> the channel op that task is in, per runtime (a deadlock
-- report names tasks so; each run of a nested runtime has a "main").
local function cur_names(S, rt)
    local names = S.cur_name[rt]
    if not names then
        names = {}
        S.cur_name[rt] = names
    end
    return names
end

---------------------------------------------------------------------------
-- The model and the operations, each checked against it as it returns
---------------------------------------------------------------------------

local function model_len(m)
    return m.tail - m.head + 1
end

local function after_recv(S, m, v, err, where)
    if v ~= nil then
        local want = m.q[m.head]
        if expect(S, want ~= nil and v == want, "%s: recv on c%d returned %s, the model's oldest is %s",
                  where, m.id, tostring(v), tostring(want)) then
            m.q[m.head] = nil
            m.head = m.head + 1
            S.stats.received = S.stats.received + 1
        end
    else
        expect(S, err == "closed" and m.closed and model_len(m) == 0,
               "%s: recv on c%d returned nil, %s (model: %d queued, closed %s)",
               where, m.id, tostring(err), model_len(m), tostring(m.closed))
    end
    note(S, "%s recv c%d -> %s %s", where, m.id, tostring(v), err and tostring(err) or "")
end

-- send's pcall result: ok, err; was_closed: the model before the call.
local function after_send(S, m, v, ok, err, was_closed, where)
    if ok then
        if expect(S, not m.closed and err == true, "%s: send of %d on c%d returned %s (model closed %s)",
                  where, v, m.id, tostring(err), tostring(m.closed)) then
            m.tail = m.tail + 1
            m.q[m.tail] = v
            S.stats.sent = S.stats.sent + 1
            expect(S, model_len(m) <= m.cap, "%s: send on c%d returned with %d queued, capacity %d",
                   where, m.id, model_len(m), m.cap)
        end
    elseif was_closed then
        expect(S, type(err) == "string" and err:find("Channel:send: the channel is closed", 1, true),
               "%s: send on closed c%d raised %s", where, m.id, tostring(err))
    else
        expect(S, m.closed and type(err) == "string"
                  and err:find("Channel:send: the channel was closed while this send waited", 1, true),
               "%s: send on c%d raised %s (model closed %s)", where, m.id, tostring(err), tostring(m.closed))
    end
    note(S, "%s send %d c%d -> %s", where, v, m.id, ok and "ok" or tostring(err):sub(1, 60))
end

-- A send or recv of the running task (cur: it is parked in it, when it
-- waits); returns what recv returned.
local function chan_op(S, kind, m)
    local t = pluvio.current()
    local name, where = t:name() .. "#" .. t.id, me_name()
    local names = cur_names(S, pluvio.runtime())
    local op = { kind = kind, m = m }
    if kind == "recv" then
        S.cur[t], names[name] = op, op
        local v, err = m.ch:recv()
        S.cur[t], names[name] = nil, nil
        after_recv(S, m, v, err, where)
        return v
    end
    S.value = S.value + 1
    local v = S.value
    local was_closed = m.closed
    S.cur[t], names[name] = op, op
    local ok, err = pcall(m.ch.send, m.ch, v)
    S.cur[t], names[name] = nil, nil
    after_send(S, m, v, ok, err, was_closed, where)
end

-- pluvio.recv_any on ms (models of distinct channels): checked as it
-- returns, as a recv on the channel it took from, and every channel before
-- that one in ms must have been empty (nothing runs between the take and
-- the return).
local function any_op(S, ms)
    local t = pluvio.current()
    local name, where = t:name() .. "#" .. t.id, me_name()
    local names = cur_names(S, pluvio.runtime())
    local op = { kind = "any", ms = ms }
    local chans = {}
    for k = 1, #ms do
        chans[k] = ms[k].ch
    end
    S.cur[t], names[name] = op, op
    local i, v, err = pluvio.recv_any(unpack(chans))
    S.cur[t], names[name] = nil, nil
    S.stats.anys = S.stats.anys + 1
    if i == nil then
        for k = 1, #ms do
            expect(S, v == "closed" and ms[k].closed and model_len(ms[k]) == 0,
                   "%s: recv_any returned nil, %s with c%d holding %d (closed %s)", where, tostring(v),
                   ms[k].id, model_len(ms[k]), tostring(ms[k].closed))
        end
        note(S, "%s recv_any -> closed", where)
        return
    end
    for k = 1, i - 1 do
        expect(S, model_len(ms[k]) == 0, "%s: recv_any took from its channel %d, c%d, while c%d (channel %d) " ..
               "held %d", where, i, ms[i].id, ms[k].id, k, model_len(ms[k]))
    end
    expect(S, err == nil, "%s: recv_any gave a value and %s", where, tostring(err))
    after_recv(S, ms[i], v, nil, where .. " recv_any")
end

-- The distinct channels an "any" op names (2 or 3 of them).
local function any_chans(S, op)
    local ms, seen = {}, {}
    for _, k in ipairs({ op[2], op[3], op[5] % #S.chans + 1 }) do
        local m = S.chans[k]
        if not seen[m] and #ms < 2 + op[6] % 2 then
            seen[m] = true
            ms[#ms + 1] = m
        end
    end
    if #ms == 1 then
        ms[2] = S.chans[op[2] % #S.chans + 1]
    end
    return ms
end

-- A try_send or try_recv, which never parks: checked against the model as
-- it returns (full, empty, closed).
local function try_op(S, kind, m, where)
    if kind == "recv" then
        local v, err = m.ch:try_recv()
        if model_len(m) > 0 then
            after_recv(S, m, v, err, where .. " try")
        else
            local want = m.closed and "closed" or "empty"
            expect(S, v == nil and err == want, "%s: try_recv on c%d returned %s, %s (model: empty, closed %s)",
                   where, m.id, tostring(v), tostring(err), tostring(m.closed))
            note(S, "%s try_recv c%d -> %s", where, m.id, tostring(err))
        end
        return
    end
    S.value = S.value + 1
    local v = S.value
    local ok, r, err = pcall(m.ch.try_send, m.ch, v)
    if m.closed then
        expect(S, not ok and type(r) == "string" and r:find("Channel:try_send: the channel is closed", 1, true),
               "%s: try_send on closed c%d gave %s, %s", where, m.id, tostring(ok), tostring(r))
    elseif model_len(m) >= m.cap then
        expect(S, ok and r == false and err == "full", "%s: try_send on full c%d gave %s, %s, %s",
               where, m.id, tostring(ok), tostring(r), tostring(err))
    else
        after_send(S, m, v, ok, r, false, where .. " try")
        return
    end
    note(S, "%s try_send %d c%d -> %s", where, v, m.id, tostring(ok and err or r):sub(1, 40))
end

local function close_op(S, m, where)
    local r = m.ch:close()
    expect(S, r == not m.closed, "%s: close of c%d returned %s (model closed %s)",
           where, m.id, tostring(r), tostring(m.closed))
    m.closed = true
    note(S, "%s close c%d -> %s", where, m.id, tostring(r))
end

-- A plain coroutine of the running task does a send or recv: if it parks,
-- the wait yields back here and is abandoned, or resumed once (it raises).
local NOT_TASK = "called from a coroutine that is not a pluvio task (only pluvio tasks may block)"

local function coro_op(S, kind, m, resume_again)
    local where = me_name() .. "/co"
    local co = coroutine.create(function()
        if kind == "recv" then
            local v, err = m.ch:recv()
            after_recv(S, m, v, err, where)
        else
            S.value = S.value + 1
            local v, was_closed = S.value, m.closed
            local ok, err = pcall(m.ch.send, m.ch, v)
            if not (not ok and type(err) == "string" and err:find(NOT_TASK, 1, true)) then
                after_send(S, m, v, ok, err, was_closed, where)
            end
        end
    end)
    local ok, err = coroutine.resume(co)
    expect(S, ok, "%s: the plain coroutine raised %s", where, tostring(err))
    if coroutine.status(co) == "suspended" then
        S.stats.abandoned = S.stats.abandoned + 1
        note(S, "%s %s c%d parked: %s", where, kind, m.id, resume_again and "resumed" or "abandoned")
        if resume_again then
            ok, err = coroutine.resume(co)
            if kind == "recv" then  -- (a send's pcall caught it)
                expect(S, not ok and type(err) == "string" and err:find("Channel:recv: " .. NOT_TASK, 1, true),
                       "%s: resuming the parked recv gave %s, %s", where, tostring(ok), tostring(err))
            end
        end
    end
end

---------------------------------------------------------------------------
-- Programs
---------------------------------------------------------------------------

local WORKER_OPS = {
    "send", 30, "recv", 30, "try", 10, "yield", 8, "select", 6, "timeout", 6, "coro", 8, "any", 10,
    "close", 1, "kill", 2, "wake", 4, "kill_self", 1, "exit_hook", 2, "nested", 2,
}

-- The scenario's own list of its tasks, not rt:tasks(): the checks ask
-- after every step, and Debian 12's LuaJIT (2.1.0~beta3+git20220320)
-- has LuaJIT/LuaJIT#827: a `for ... in pairs` loop that the JIT gives up
-- on while it runs goes on wrong (rt:tasks() gave a nil or a number as a
-- task now and then, never with -joff).  For the same reason the checks
-- walk tables with next.
local function register(S, t)
    S.reg[#S.reg + 1] = t
end

-- The live tasks ({ task, state }), of runtime rt or of all.  (A child of
-- pluvio.timeout is in S.reg once it runs; before, through its parent.)
local function all_tasks(S, rt)
    local list, live, seen = {}, {}, {}
    for _, t in ipairs(S.reg) do
        local child = t.live and t.timeout_child
        for _, u in ipairs({ t, child or nil }) do
            if u.live and not seen[u] then
                seen[u] = true
                live[#live + 1] = u
                if rt == nil or u.rt == rt then
                    list[#list + 1] = { task = u, state = u:status() }
                end
            end
        end
    end
    if #S.reg > 2 * #live + 64 then
        S.reg = live
    end
    return list
end

-- Any task but the main one and exclude (one of a nested runtime too, and
-- the task running a nested runtime: a kill from in there stops it).
local function random_task(S, exclude)
    local list = {}
    for _, e in ipairs(all_tasks(S)) do
        if e.task ~= S.main and e.task ~= exclude then
            list[#list + 1] = e.task
        end
    end
    if #list > 0 then
        return list[S.rng(#list)]
    end
end

-- nested: for a task of a nested runtime (no runtime nested in that).
local function new_program(S, nested)
    local rng, prog = S.rng, {}
    for i = 1, 1 + rng(nested and 4 or 14) do   -- (short in there: block_on returns soon)
        local name = pick_weighted(rng, S.worker_ops)
        if name == "exit_hook" and not S.hooks or name == "nested" and nested then
            name = "yield"
        end
        local op = { name, rng(#S.chans), rng(#S.chans), rng(2) == 1 and "recv" or "send", rng(4), rng(1000) }
        prog[i] = op
    end
    return prog
end

local run_program

-- Run the program; an error of the harness's own is a failure.  (A kill's
-- cancellation, not a string, goes on up.)
local function guarded(S, prog)
    local ok, err = xpcall(run_program, function(e)
        if type(e) == "string" then
            fail(S, "%s raised: %s", me_name(), debug.traceback(e, 2))
        end
        return e
    end, S, prog)
    if not ok then
        error(err, 0)
    end
end

-- A task for the program (of the main runtime: tracked for the final join).
local function spawn_worker(S, prog)
    S.nworkers = S.nworkers + 1
    local nested = pluvio.runtime() ~= S.rt
    local t = pluvio.spawn_named((nested and "n" or "w") .. S.nworkers, guarded, S, prog)
    register(S, t)
    if not nested then
        S.workers[#S.workers + 1] = t
    end
    return t
end

local function child_body(S, kind, m)
    return function()
        chan_op(S, kind, m)
        return kind
    end
end

-- "select": child tasks on several channels, then the first to finish.
local function select_op(S, op)
    local rng = S.rng
    local n = 2 + (op[5] % 2)
    local kids = {}
    for i = 1, n do
        local m = S.chans[(op[2] + i - 2) % #S.chans + 1]
        S.nkids = S.nkids + 1
        kids[i] = pluvio.spawn_named(format("%s.k%d", pluvio.current():name(), S.nkids),
                                     child_body(S, rng(2) == 1 and "recv" or "send", m))
        register(S, kids[i])
    end
    local i = pluvio.select(unpack(kids))
    note(S, "%s select -> %d", me_name(), i)
    if op[6] % 3 ~= 0 then          -- (else the losers go on alone)
        for k = 1, n do
            if k ~= i then
                kids[k]:kill()
                S.cur[kids[k]] = nil
            end
        end
    end
end

local function timeout_op(S, op)
    local m = S.chans[op[2]]
    -- (a long deadline, armed while the main task parks for good or in a
    -- nested runtime whose tasks wait on the outer's, would keep the
    -- runtime from reporting the deadlock until it passes)
    local long = (S.main_blocks or pluvio.runtime() ~= S.rt) and 5e-4 or 1e6
    local secs = ({ 0, long, S.timed and 2e-4 or long, S.timed and 1e-3 or 0 })[op[5]]
    local child
    local r, err = pluvio.timeout(secs, function()
        child = pluvio.current()
        register(S, child)
        if op[4] == "recv" and op[6] % 3 == 0 then
            any_op(S, any_chans(S, op))
        else
            chan_op(S, op[4], m)
        end
        return "done"
    end)
    -- (cancelled: another task killed the child)
    expect(S, r == "done" or (r == nil and (err == "timeout" or err == "cancelled")), "%s: timeout gave %s, %s",
           me_name(), tostring(r), tostring(err))
    if r == nil and err == "timeout" then
        S.stats.timeouts = S.stats.timeouts + 1
        if child then
            S.cur[child] = nil
        end
    end
    note(S, "%s timeout(%g) -> %s", me_name(), secs, tostring(r or err))
end

local function exit_hook_op(S, op)
    local m = S.chans[op[2]]
    local close = op[5] == 1
    pluvio.current():on_exit(function(t)
        local where = t:name() .. "/on_exit"
        -- cancelled, and marked joined, while no task runs, not by itself:
        -- the runtime cancels what a deadlock left, after its report
        -- (check_deadlock takes this back out; a nested run starts anew)
        local after_report = t.final == "cancelled" and t.joined and t.rt.current == nil
            and not t.kill_requested
        if after_report then
            S.stats.hooks_after_report = S.stats.hooks_after_report + 1
        end
        if close then
            m.closed_after_report = m.closed_after_report or after_report and not m.closed
            close_op(S, m, where)
        elseif not m.closed and model_len(m) < m.cap then
            S.value = S.value + 1
            local v = S.value
            local ok, err = pcall(m.ch.send, m.ch, v)
            after_send(S, m, v, ok, err, false, where)
            if ok and after_report then
                m.sent_after_report = m.sent_after_report + 1
            end
        end
    end)
end

local function kill_op(S, victim, where)
    local live = victim.live
    if S.cur[victim] then
        S.stats.kills_parked = S.stats.kills_parked + 1
    end
    local r = victim:kill()
    expect(S, r == live, "%s: kill of %s returned %s", where, tostring(victim), tostring(r))
    S.cur[victim] = nil
    S.stats.kills = S.stats.kills + 1
    note(S, "%s kill %s", where, victim:name())
end

local check_deadlock, check_turns

-- A runtime nested in this task (one of two, kept: block_on leaves tasks
-- there, parked on the channels, which a later run there goes on with):
-- its main task spawns a few tasks, then runs a program of its own.
local function nested_op(S, op)
    if pluvio.runtime() ~= S.rt then
        return              -- (one level)
    end
    local i = op[5] % 2 + 1
    local rt = S.nested[i]
    if not rt then
        rt = pluvio.Runtime.new()
        labels[rt] = "@r" .. i
        S.nested[i] = rt
        S.runtimes[#S.runtimes + 1] = rt
    end
    local progs = {}
    for k = 1, op[6] % 3 + 1 do
        progs[k] = new_program(S, true)
    end
    local block_on = op[3] % 2 == 0
    local main_prog = progs[1]
    if block_on and op[6] % 4 < 2 then  -- the others park first: block_on leaves them parked
        table.insert(main_prog, 1, { "yield", op[2], op[3], "send", op[5], op[6] })
    end
    if block_on and op[6] % 2 == 0 then  -- a send last: its wake may find the runtime stopped
        main_prog[#main_prog + 1] = { "send", op[2], op[3], "send", op[5], op[6] }
    end
    note(S, "%s %s in r%d", me_name(), block_on and "block_on" or "run", i)
    for _, m in ipairs(S.chans) do
        m.sent_after_report, m.closed_after_report = 0, false
    end
    S.stats.nested = S.stats.nested + 1
    local ok, err = pcall(block_on and rt.block_on or rt.run, rt, function()
        register(S, pluvio.current())
        for k = 2, #progs do
            spawn_worker(S, progs[k])
        end
        guarded(S, progs[1])
    end)
    if ok then
        return
    elseif type(err) ~= "string" then
        error(err, 0)       -- a kill from in there: this task is cancelled
    elseif err:find("^deadlock: ") then
        check_deadlock(S, err, rt)
    else
        expect(S, err == "the main task was cancelled", "%s: the nested run raised %s", me_name(), err)
    end
    note(S, "%s nested r%d -> %s", me_name(), i, err:sub(1, 40))
end

function run_program(S, prog)
    local me = pluvio.current()
    for i = 1, #prog do
        local op = prog[i]
        local name, m = op[1], S.chans[op[2]]
        if name == "send" or name == "recv" then
            chan_op(S, name, m)
        elseif name == "try" then
            try_op(S, op[4], m, me:name())
        elseif name == "yield" then
            pluvio.yield()
        elseif name == "select" then
            select_op(S, op)
        elseif name == "any" then
            any_op(S, any_chans(S, op))
        elseif name == "timeout" then
            timeout_op(S, op)
        elseif name == "coro" then
            coro_op(S, op[4], m, op[5] == 1)
        elseif name == "close" then       -- (late: an early close leaves little to do)
            if S.step > S.steps * 0.6 then
                close_op(S, m, me:name())
            end
        elseif name == "kill" then
            local victim = random_task(S, me)
            if victim then kill_op(S, victim, me:name()) end
        elseif name == "wake" then
            local victim = random_task(S, me)
            if victim then victim:wake() end
        elseif name == "kill_self" then
            note(S, "%s kills itself", me:name())
            me:kill()
            fail(S, "%s: kill of itself returned", me:name())
        elseif name == "exit_hook" then
            exit_hook_op(S, op)
        elseif name == "nested" then
            nested_op(S, op)
        end
        check_turns(S)
    end
end

---------------------------------------------------------------------------
-- Checks
---------------------------------------------------------------------------

-- The queues of every channel, and the model's count and state; returns
-- task -> { m, side } for the queued tasks.
local function check_queues(S)
    local queued = {}
    for _, m in ipairs(S.chans) do
        local ch = m.ch
        expect(S, ch:len() == model_len(m), "c%d holds %d values, the model %d", m.id, ch:len(), model_len(m))
        expect(S, ch:is_closed() == m.closed, "c%d closed %s, the model %s",
               m.id, tostring(ch:is_closed()), tostring(m.closed))
        for _, side in ipairs({ "recv", "send" }) do
            local q, head, tail = ch[side .. "q"], ch[side .. "_head"], ch[side .. "_tail"]
            local k = next(q)
            while k ~= nil do
                expect(S, type(k) == "number" and k >= head and k <= tail,
                       "c%d's %s queue has key %s outside %d..%d", m.id, side, tostring(k), head, tail)
                k = next(q, k)
            end
            for i = head, tail do
                local t = q[i]
                if expect(S, t ~= nil, "c%d's %s queue has a hole at %d (%d..%d)", m.id, side, i, head, tail) then
                    expect(S, t.live, "c%d's %s queue holds %s, ended", m.id, side, tostring(t))
                    local mark = t.parked_on
                    -- (a recv_any's mark: the set of its channels, each a key)
                    local any = mark ~= nil and mark ~= ch and getmetatable(mark) ~= getmetatable(ch)
                    expect(S, mark == ch or any and side == "recv" and rawget(mark, ch),
                           "c%d's %s queue holds %s, marked on %s", m.id, side, tostring(t),
                           tostring(mark and mark:describe()))
                    local list = queued[t] or {}
                    queued[t] = list
                    for _, e in ipairs(list) do
                        expect(S, any and e.m ~= m, "%s is queued twice (c%d %s, and c%d %s)", tostring(t),
                               m.id, side, e.m.id, e.side)
                    end
                    list[#list + 1] = { m = m, side = side }
                end
            end
        end
    end
    for _, rt in ipairs(S.runtimes) do  -- a turn is held only in the runtime that runs
        local turns = rt.turns
        local t = next(turns)
        while t ~= nil do
            expect(S, t.live and t.baton and rt == pluvio.runtime(), "%s holds a turn (live %s, baton %s) " ..
                   "in %s runtime", tostring(t), tostring(t.live), tostring(t.baton and t.baton:describe()),
                   rt == pluvio.runtime() and "the running" or "a stopped")
            t = next(turns, t)
        end
    end
    for _, e in ipairs(all_tasks(S)) do
        local t = e.task
        local mark, list = t.parked_on, queued[t]
        if mark and mark.cap then       -- (a channel: a recv_any's may have left some of its lines)
            expect(S, list and #list == 1 and list[1].m.ch == mark, "%s is marked on a channel, not queued there",
                   tostring(t))
        end
    end
    return queued
end

-- Whether queued (check_queues) has t in m's line of side.
local function in_line(queued, t, m, side)
    for _, e in ipairs(queued[t] or {}) do
        if e.m == m and e.side == side then
            return true
        end
    end
    return false
end

-- At any time, in the running runtime: while a receiver waits on a
-- channel, every value there has a ready task woken to take it (with the
-- turn: t.baton), and while a sender waits, every free place has one.
-- (Each send wakes the next receiver in line, each recv the next sender; a
-- woken task that finds its value taken waits again.)
function check_turns(S)
    local waiting, turns = {}, {}
    for _, e in ipairs(all_tasks(S, pluvio.runtime())) do
        local t = e.task
        local op = S.cur[t]
        if op then      -- (a recv_any waits as a receiver on each of its channels)
            local kind = op.kind == "any" and "recv" or op.kind
            for _, m in ipairs(op.ms or { op.m }) do
                local key = kind .. m.id
                if e.state == "waiting" then
                    waiting[key] = true
                elseif e.state == "ready" and t.baton == m.ch then
                    turns[key] = (turns[key] or 0) + 1
                end
            end
        end
    end
    for _, m in ipairs(S.chans) do
        local r, sd = "recv" .. m.id, "send" .. m.id
        expect(S, not waiting[r] or model_len(m) <= (turns[r] or 0),
               "%s: a receiver waits on c%d, which holds %d values, with %d woken to take them",
               me_name(), m.id, model_len(m), turns[r] or 0)
        expect(S, not waiting[sd] or m.cap - model_len(m) <= (turns[sd] or 0),
               "%s: a sender waits on c%d, which has %d free places, with %d woken to fill them",
               me_name(), m.id, m.cap - model_len(m), turns[sd] or 0)
    end
end

-- Every other task waits: none parked on a channel could go on.
local function check_quiet(S)
    local queued = check_queues(S)
    for _, e in ipairs(all_tasks(S, S.rt)) do
        local t = e.task
        local op = S.cur[t]
        if t ~= S.main and op and op.kind == "any" then
            S.stats.parked_seen = S.stats.parked_seen + 1
            expect(S, e.state == "waiting" and t.waiting_for ~= nil and t.waiting_for == t.parked_on,
                   "%s in recv_any is %s on %s", tostring(t), e.state, tostring(t.waiting_for))
            local open = false
            for _, m in ipairs(op.ms) do
                expect(S, model_len(m) == 0, "%s stays parked in recv_any, c%d holding %d values", tostring(t),
                       m.id, model_len(m))
                if not m.closed then
                    open = true
                    expect(S, in_line(queued, t, m, "recv"), "%s parked in recv_any is not in c%d's line",
                           tostring(t), m.id)
                end
            end
            expect(S, open, "%s stays parked in recv_any on closed channels", tostring(t))
        elseif t ~= S.main and op then
            local m = op.m
            S.stats.parked_seen = S.stats.parked_seen + 1
            expect(S, e.state == "waiting" and t.waiting_for == m.ch, "%s in %s on c%d is %s on %s",
                   tostring(t), op.kind, m.id, e.state, tostring(t.waiting_for))
            expect(S, not m.closed, "%s stays parked in %s on c%d, closed", tostring(t), op.kind, m.id)
            if op.kind == "recv" then
                expect(S, model_len(m) == 0, "%s stays parked in recv on c%d, which holds %d values",
                       tostring(t), m.id, model_len(m))
            else
                expect(S, model_len(m) == m.cap, "%s stays parked in send on c%d, which holds %d of %d",
                       tostring(t), m.id, model_len(m), m.cap)
            end
            local list = queued[t]
            expect(S, list and #list == 1 and list[1].m == m and list[1].side == op.kind,
                   "%s parked in %s on c%d is not queued there", tostring(t), op.kind, m.id)
        end
        expect(S, t == S.main or t.baton == nil, "%s waits holding a turn of %s", tostring(t),
               tostring(t.baton and t.baton:describe()))
    end
end

-- Yield until every other task waits (or none is left).
local function settle(S)
    for _ = 1, 5000 do
        local busy = false
        for _, e in ipairs(all_tasks(S, S.rt)) do
            if e.task ~= S.main and e.state ~= "waiting" then
                busy = true
                break
            end
        end
        if not busy then
            return
        end
        pluvio.yield()
    end
    fail(S, "the tasks never all waited in 5000 yields")
end

-- A deadlock report: each task it names as waiting in a channel op of
-- ours could not go on.
function check_deadlock(S, err, rt)
    local n = 0
    for name, id in err:gmatch('\n  task "([^"]+)" %(#(%d+), waiting%) waits on ') do
        n = n + 1
        local op = cur_names(S, rt)[name .. "#" .. id]
        if op and op.kind == "any" then
            local empty, open = true, false
            for _, m in ipairs(op.ms) do
                empty = empty and model_len(m) - m.sent_after_report == 0
                open = open or not (m.closed and not m.closed_after_report)
            end
            expect(S, empty and open, "false deadlock: %s in recv_any could go on", name)
        elseif op then
            local m = op.m
            local len, closed = model_len(m) - m.sent_after_report, m.closed and not m.closed_after_report
            local stuck = not closed and (op.kind == "recv" and len == 0 or op.kind == "send" and len == m.cap)
            expect(S, stuck, "false deadlock: %s in %s on c%d (%d/%d, closed %s) could go on",
                   name, op.kind, m.id, len, m.cap, tostring(closed))
        end
    end
    expect(S, n > 0, "a deadlock report names no task: %s", err)
    S.stats.deadlocks = S.stats.deadlocks + 1
    for _, m in ipairs(S.chans) do
        m.sent_after_report, m.closed_after_report = 0, false
    end
end

---------------------------------------------------------------------------
-- The main task
---------------------------------------------------------------------------

local MAIN_OPS = {
    "spawn", 12, "settle", 10, "yield", 14, "send", 10, "recv", 10, "try", 4, "kill", 4, "wake", 4,
    "coro", 4, "close", 1, "block", 3, "sleep", 1, "inject", 4,
}

-- A reactor written in Lua that sends and receives outside any task, from
-- the loop (when the model says it will not park), as the main task asks;
-- with it the runtime never lingers.
local Injector = {}
Injector.__index = Injector

function Injector:status()
    return self.queue[1] and "ready" or "idle"
end

function Injector:poll()
    local S, n = self.S, #self.queue
    for i = 1, n do
        local m = self.queue[i]
        self.queue[i] = nil
        if model_len(m) > 0 and (m.closed or i % 2 == 0) then
            local v, err = m.ch:recv()
            after_recv(S, m, v, err, "reactor")
        elseif not m.closed and model_len(m) < m.cap then
            S.value = S.value + 1
            local v = S.value
            local ok, err = pcall(m.ch.send, m.ch, v)
            after_send(S, m, v, ok, err, false, "reactor")
        end
    end
    return n
end

local function main_step(S, step)
    local rng = S.rng
    local name = pick_weighted(rng, S.main_ops)
    local m = S.chans[rng(#S.chans)]
    if name == "spawn" then
        if S.rt:stats().tasks_live < S.max_tasks then
            spawn_worker(S, new_program(S))
        end
    elseif name == "settle" then
        settle(S)
        check_quiet(S)
    elseif name == "yield" then
        for _ = 1, rng(3) do pluvio.yield() end
        check_queues(S)
    elseif name == "send" then          -- only with room: the main task does not park here
        if not m.closed and model_len(m) < m.cap then
            chan_op(S, "send", m)
        end
    elseif name == "recv" then
        if model_len(m) > 0 then
            chan_op(S, "recv", m)
        end
    elseif name == "try" then
        try_op(S, rng(2) == 1 and "recv" or "send", m, "main")
    elseif name == "kill" or name == "wake" then
        local victim = random_task(S, nil)
        if victim and name == "kill" then
            kill_op(S, victim, "main")
        elseif victim then
            victim:wake()
        end
    elseif name == "coro" then
        coro_op(S, rng(2) == 1 and "recv" or "send", m, rng(3) == 1)
    elseif name == "close" then
        if step > S.steps / 2 then
            close_op(S, m, "main")
        end
    elseif name == "block" then         -- may park for good: a deadlock
        if S.main_blocks then
            chan_op(S, rng(2) == 1 and "recv" or "send", m)
        end
    elseif name == "sleep" then
        if S.timed then
            pluvio.sleep(1e-3)
        end
    elseif name == "inject" then
        if S.injector then
            S.injector.queue[#S.injector.queue + 1] = m
        end
    end
end

local function finish_scenario(S)
    for _, m in ipairs(S.chans) do
        if not m.closed then close_op(S, m, "main") end
    end
    settle(S)
    check_quiet(S)
    local left = all_tasks(S, S.rt)
    expect(S, S.rt:stats().tasks_live == 1 and #left == 1, "%d tasks are left after every channel closed: %s",
           S.rt:stats().tasks_live - 1, tostring(left[2] and left[2].task))
    for i = 2, #S.runtimes do        -- the tasks a block_on left go on, and end
        local rt = S.runtimes[i]
        if rt:stats().tasks_live > 0 then   -- (a task left there may kill its main)
            local ok, err = pcall(rt.run, rt, function() end)
            expect(S, ok or err == "the main task was cancelled", "the last run of nested %s raised %s",
                   labels[rt], tostring(err))
        end
    end
    for _, t in ipairs(S.workers) do
        if t.live then
            break           -- (reported above)
        end
        local r, err = t:join()
        expect(S, r ~= nil or err == "cancelled" or err == nil, "%s failed: %s", tostring(t), tostring(err))
    end
    for _, m in ipairs(S.chans) do
        while true do
            local v = chan_op(S, "recv", m)
            if v == nil or S.failure then break end
        end
    end
end

local function main(S)
    S.main = pluvio.current()
    register(S, S.main)
    for step = 1, S.steps do
        S.step = step
        main_step(S, step)
        check_turns(S)
        if S.failure then       -- (a task left would keep the run going: a deadline of 1e6 s)
            for _, e in ipairs(all_tasks(S, S.rt)) do
                if e.task ~= S.main then e.task:kill() end
            end
            return
        end
    end
    finish_scenario(S)
end

-- Runs the scenario of seed; returns nil, or a description of what failed
-- (with the last events), and the scenario's counters.
function M.run(seed)
    local rng = new_rng(seed)
    local S = {
        rng = rng, seed = seed, chans = {}, workers = {}, cur = setmetatable({}, { __mode = "k" }),
        cur_name = {}, reg = {}, value = 0, step = 0, nworkers = 0, nkids = 0, events = {}, nevents = 0,
        steps = 20 + rng(120), max_tasks = 3 + rng(8),
        timed = rng(5) == 1, hooks = rng(3) == 1,
        stats = { sent = 0, received = 0, abandoned = 0, kills = 0, timeouts = 0, deadlocks = 0,
                  parked_seen = 0, kills_parked = 0, nested = 0, hooks_after_report = 0, anys = 0 },
    }
    S.worker_ops = swarm(rng, WORKER_OPS, { send = true, recv = true })
    S.main_ops = swarm(rng, MAIN_OPS, { spawn = true, settle = true })
    if S.hooks then
        S.main_blocks = rng(6) == 1
    else
        S.main_blocks = rng(3) == 1
    end
    for i = 1, 1 + rng(3) do
        local cap = ({ 1, 1, 2, 3 })[rng(4)]
        S.chans[i] = { id = i, cap = cap, ch = pluvio.channel(cap), q = {}, head = 1, tail = 0, closed = false,
                       sent_after_report = 0, closed_after_report = false }
    end
    S.rt = pluvio.Runtime.new()
    S.runtimes, S.nested = { S.rt }, {}     -- (nested: by number; runtimes: the scenario's, in order)
    if rng(4) == 1 then
        S.injector = setmetatable({ S = S, queue = {} }, Injector)
        S.rt:register_reactor("injector", S.injector)
    end
    if rng(6) == 1 then
        S.rt:set_spin(2e-5)
    end
    local ok, err = pcall(S.rt.run, S.rt, main, S)
    if not ok then
        if type(err) == "string" and err:find("^deadlock: ") and S.main_blocks then
            check_deadlock(S, err, S.rt)
            check_queues(S)
            for _, m in ipairs(S.chans) do   -- what is left comes out, in order, without a task
                for _ = 1, model_len(m) do
                    after_recv(S, m, m.ch:recv(), nil, "after")
                end
            end
        else
            fail(S, "the run raised: %s", tostring(err))
        end
    end
    for i = 2, #S.runtimes do        -- (after a deadlock, or a failure)
        for _, e in ipairs(all_tasks(S, S.runtimes[i])) do
            e.task:kill()
        end
        expect(S, S.runtimes[i]:stats().tasks_live == 0, "nested %s keeps %d tasks", labels[S.runtimes[i]],
               S.runtimes[i]:stats().tasks_live)
    end
    if not S.failure then
        local queued = check_queues(S)
        if next(queued) then
            fail(S, "%s is still queued at the end", tostring(next(queued)))
        end
    end
    if S.failure then
        return format("seed %d: %s\nlast events:\n%s", seed, S.failure, last_events(S)), S.stats
    end
    return nil, S.stats
end

return M
