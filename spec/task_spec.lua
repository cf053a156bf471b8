-- Tasks and time: spawn, join, kill, select, timeout, sleep, yield, now.
local pluvio = require "pluvio"
local helper = require "helper"

local async = helper.async

describe("pluvio.spawn", function()
    it("runs the function with its arguments and join returns its results", async(function()
        local t = pluvio.spawn(function(a, b) pluvio.sleep(0.001); return a + b, "x" end, 1, 2)
        local sum, x = t:join()
        assert.equal(3, sum)
        assert.equal("x", x)
    end))

    it("keeps nil results and trailing nils", async(function()
        local t = pluvio.spawn(function() return nil, 2, nil end)
        assert.same({ n = 3, nil, 2, nil }, table.pack and table.pack(t:join()) or { n = select("#", t:join()), t:join() })
    end))

    it("gives default names and spawn_named names", async(function()
        local a = pluvio.spawn(function() end)
        local b = pluvio.spawn_named("worker", function() end)
        assert.matches("^task%-%d+$", a:name())
        assert.equal("worker", b:name())
        a:join(); b:join()
    end))

    it("rejects a non-function", async(function()
        assert.has_error(function() pluvio.spawn(42) end,
            "pluvio.spawn: fn must be a function (got number)")
        assert.has_error(function() pluvio.spawn_named("x", "nope") end,
            "pluvio.spawn_named: fn must be a function (got string)")
        assert.has_error(function() pluvio.spawn_named(nil, function() end) end,
            "pluvio.spawn_named: name must be a string (got nil)")
    end))

    it("refuses to spawn when no runtime is running", function()
        assert.has_error(function() pluvio.spawn(function() end) end,
            "pluvio.spawn: no runtime is running (call it inside pluvio.run(fn), rt:run(fn), or a script run by the pluvio host)")
    end)

    it("runs many tasks concurrently and the table grows past its initial capacity", function()
        local rt = pluvio.Runtime.new(4)
        local total = rt:run(function()
            local tasks = {}
            for i = 1, 100 do
                tasks[i] = pluvio.spawn(function() pluvio.sleep(0.001); return i end)
            end
            local sum = 0
            for i = 1, 100 do sum = sum + tasks[i]:join() end
            return sum
        end)
        assert.equal(5050, total)
        assert.is_true(rt:stats().task_capacity >= 101)
    end)

    it("names the spawning function and the task table's size when the table cannot grow", function()
        -- the task table's growth made to fail by a preloaded realloc (a
        -- runtime of one slot, taken by the main task): it said "spawn:
        -- cannot create a task: ENOMEM", whoever spawned
        local env, remove_shim = helper.preload_shim([[
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stddef.h>
int pl_test_fail_reallocs;
void *realloc(void *p, size_t n)
{
    static void *(*real)(void *, size_t);

    if (pl_test_fail_reallocs)
        return NULL;
    if (!real)
        real = (void *(*)(void *, size_t))dlsym(RTLD_NEXT, "realloc");
    return real(p, n);
}
]])
        local status, out, err = helper.run_script([[
            local pluvio = require "pluvio"
            local ffi = require "ffi"
            ffi.cdef[[int pl_test_fail_reallocs;]] .. "]]" .. [[
            local function refused(fn)
                ffi.C.pl_test_fail_reallocs = 1
                local ok, e = pcall(fn)
                ffi.C.pl_test_fail_reallocs = 0
                print(ok, e)
            end
            local rt = pluvio.Runtime.new(1)
            rt:block_on(function()
                refused(function() pluvio.spawn(function() end) end)
                refused(function() pluvio.spawn_named("w", function() end) end)
                refused(function() pluvio.timeout(1, function() end) end)
            end)
        ]], nil, env)
        remove_shim()
        assert.equal(0, status, err)
        local lines = {}
        for line in out:gmatch("[^\n]+") do lines[#lines + 1] = line end
        assert.equal(3, #lines, out)
        local what = ": cannot create a task: no memory to grow the runtime's task table past its %s, " ..
                     "all taken by live tasks (ENOMEM: Cannot allocate memory; it doubles when full, up to 16777216)"
        for i, fname in ipairs({ "pluvio.spawn", "pluvio.spawn_named", "pluvio.timeout" }) do
            assert.matches("false\t[^\t]*:%d+: " .. fname:gsub("%p", "%%%0") .. ":", lines[i])
            assert.matches(fname .. what:format("1 slot"), lines[i], 1, true)
        end
    end)
end)

-- wait(t) in a plain coroutine of the running task: its yield comes
-- back here, and a resume raises; meanwhile and after, another task
-- joins t, which a claim left by the plain coroutine would refuse.
local function plain_wait_claims_nothing(fname, wait)
    for _, resume_again in ipairs({ false, true }) do
        local t = pluvio.spawn(function() pluvio.sleep(0.01); return "r" end)
        local co = coroutine.create(function() return wait(t) end)
        local ok, marker = coroutine.resume(co)
        assert.is_true(ok)
        assert.is_not_nil(marker)
        if resume_again then
            local ok2, err = coroutine.resume(co)
            assert.is_false(ok2)
            assert.matches(fname:gsub("%p", "%%%0") .. ": called from a coroutine that is not a pluvio task",
                           err)
        end
        local j = pluvio.spawn(function() return pcall(t.join, t) end)
        assert.same({ true, "r" }, { j:join() })
    end
end

describe("Task:join", function()
    it("returns nil and the error with a traceback when the task failed", async(function()
        local t = pluvio.spawn(function() error("boom") end)
        local r, err = t:join()
        assert.is_nil(r)
        assert.matches("task_spec.lua:%d+: boom", err)
        assert.matches("stack traceback:", err)
    end))

    it("refuses to join the task itself", async(function()
        local me = pluvio.current()
        assert.has_error(function() me:join() end)
        local ok, err = pcall(me.join, me)
        assert.is_false(ok)
        assert.matches("Task:join: a task cannot join itself", err)
    end))

    it("refuses a second join", async(function()
        local t = pluvio.spawn(function() return 1 end)
        assert.equal(1, t:join())
        local ok, err = pcall(t.join, t)
        assert.is_false(ok)
        assert.matches('Task:join: task "task%-%d+" %(#%d+, done%) was already joined', err)
    end))

    it("refuses the main task of a run, saying that the run returns its results", async(function()
        local main = pluvio.current()
        local t = pluvio.spawn(function() return pcall(main.join, main) end)
        local ok, err = t:join()
        assert.is_false(ok)
        assert.matches('^Task:join: task "main" %(#1, waiting%) is the main task of its runtime, ' ..
                       'whose results Runtime:run returns %(or raises%); no task can join it$', err)
        -- pluvio.timeout runs fn as a child task: the join there raises the same
        local tok, terr = pcall(pluvio.timeout, 1, function() return main:join() end)
        assert.is_false(tok)
        assert.matches('Task:join: task "main" %(#1, waiting%) is the main task of its runtime', terr)
    end))

    it("refuses the main task of a block_on, even after block_on returned", function()
        local rt = pluvio.Runtime.new()
        local main = rt:block_on(function() return pluvio.current() end)
        local ok, err = rt:block_on(function()
            return pcall(main.join, main)
        end)
        assert.is_false(ok)
        assert.matches('Task:join: task "main" %(#1, done%) is the main task of its runtime, ' ..
                       'whose results Runtime:block_on returns %(or raises%); no task can join it', err)
    end)

    it("refuses a task whose pluvio.timeout waits on it", async(function()
        local child
        local ok, err
        local r = pluvio.timeout(1, function()
            child = pluvio.current()
            local j = pluvio.spawn(function() return pcall(child.join, child) end)
            ok, err = j:join()
            return "mine"
        end)
        assert.equal("mine", r)
        assert.is_false(ok)
        assert.matches("Task:join: task .*/timeout.* is already waited for by task \"main\"", err)
    end))

    it("claims nothing when called from a plain coroutine inside a task: others may join the task",
       async(function()
        plain_wait_claims_nothing("Task:join", function(t) return t:join() end)
    end))

    it("refuses to join outside a task", function()
        local t
        pluvio.Runtime.new():block_on(function() t = pluvio.spawn(function() end) end)
        local ok, err = pcall(t.join, t)
        assert.is_false(ok)
        assert.matches("Task:join: not inside a pluvio task", err)
    end)

    it("refuses a non-task self", async(function()
        local t = pluvio.spawn(function() end)
        local ok, err = pcall(t.join, {})
        assert.is_false(ok)
        assert.matches("Task:join: call it as a method on a task", err)
        t:join()
    end))
end)

describe("Task:kill", function()
    it("stops a sleeping task at its wait point and join reports it cancelled", async(function()
        local reached = false
        local t = pluvio.spawn(function() pluvio.sleep(10); reached = true end)
        pluvio.sleep(0.001)
        assert.equal("waiting", t:status())
        assert.is_true(t:kill())
        assert.equal("cancelled", t:status())
        local r, err = t:join()
        assert.is_nil(r)
        assert.equal("cancelled", err)
        pluvio.sleep(0.002)
        assert.is_false(reached)
        -- the killed task's timer was cancelled: nothing keeps the runtime busy
        assert.equal(0, pluvio.runtime():stats().timers_armed)
    end))

    it("kills a task that never ran", async(function()
        local ran = false
        local t = pluvio.spawn(function() ran = true end)
        t:kill()
        pluvio.yield()
        assert.is_false(ran)
        assert.equal("cancelled", t:status())
    end))

    it("does nothing to a finished task and returns false", async(function()
        local t = pluvio.spawn(function() return 1 end)
        assert.equal(1, t:join())
        assert.is_false(t:kill())
        assert.equal("done", t:status())
    end))

    it("runs on_exit clean-ups of a killed task", async(function()
        local cleaned = 0
        local t = pluvio.spawn(function()
            pluvio.current():on_exit(function() cleaned = cleaned + 1 end)
            pluvio.sleep(10)
        end)
        pluvio.yield()
        t:kill()
        assert.equal(1, cleaned)
    end))

    it("lets a task kill itself", async(function()
        local after = false
        local t = pluvio.spawn(function() pluvio.current():kill(); after = true end)
        local r, err = t:join()
        assert.is_nil(r)
        assert.equal("cancelled", err)
        assert.is_false(after)
    end))

    it("wakes the joiner of a killed task", async(function()
        local victim = pluvio.spawn(function() pluvio.sleep(10) end)
        local joiner = pluvio.spawn(function() return victim:join() end)
        pluvio.sleep(0.001)
        victim:kill()
        local r, err = joiner:join()
        assert.is_nil(r)
        assert.equal("cancelled", err)
    end))

    it("passes a channel wake-up on when the woken receiver is killed before it runs", async(function()
        local ch = pluvio.channel(1)
        local a = pluvio.spawn(function() return ch:recv() end)
        local b = pluvio.spawn(function() return ch:recv() end)
        pluvio.yield()          -- both wait on the empty channel, a first
        ch:send("v")            -- wakes a
        a:kill()                -- a dies before it takes the value
        assert.equal("v", b:join())
    end))
end)

describe("Task:status", function()
    it("follows a task through ready, running, waiting and done", async(function()
        local seen
        local go = pluvio.channel(1)
        local t = pluvio.spawn(function() seen = pluvio.current():status(); go:recv() end)
        assert.equal("ready", t:status())
        pluvio.yield()                  -- t runs, then waits for go (no timer to race with)
        assert.equal("running", seen)
        assert.equal("waiting", t:status())
        go:send(true)
        t:join()
        assert.equal("done", t:status())
        local f = pluvio.spawn(function() error("x") end)
        f:join()
        assert.equal("failed", f:status())
    end))
end)

describe("pluvio.yield", function()
    it("lets the other ready tasks run before continuing", async(function()
        local order = {}
        local t = pluvio.spawn(function() order[#order + 1] = "other" end)
        order[#order + 1] = "before"
        pluvio.yield()
        order[#order + 1] = "after"
        t:join()
        assert.same({ "before", "other", "after" }, order)
    end))

    it("treats a bare coroutine.yield inside a task as pluvio.yield", async(function()
        local t = pluvio.spawn(function() coroutine.yield(); return "resumed" end)
        assert.equal("resumed", t:join())
    end))

    it("refuses to block outside a task", function()
        assert.has_error(function() pluvio.yield() end,
            "pluvio.yield: not inside a pluvio task (call it from a function run by pluvio.run / rt:run, or from a script run by the pluvio host)")
        assert.has_error(function() pluvio.sleep(0.1) end,
            "pluvio.sleep: not inside a pluvio task (call it from a function run by pluvio.run / rt:run, or from a script run by the pluvio host)")
    end)

    it("refuses to block from a plain coroutine inside a task", async(function()
        -- The plain coroutine's yield goes to whoever resumed it, with nothing
        -- started; resumed again, it raises.  The task itself is unharmed.
        for _, block in ipairs({
            { "pluvio.sleep", function() pluvio.sleep(0.001) end },
            { "pluvio.yield", function() pluvio.yield() end },
            { "pluvio.suspend", function() pluvio.suspend() end },
            { "Channel:recv", function() pluvio.channel(1):recv() end },
        }) do
            local co = coroutine.create(block[2])
            local ok, marker = coroutine.resume(co)
            assert.is_true(ok)
            assert.is_not_nil(marker)
            local ok2, err = coroutine.resume(co)
            assert.is_false(ok2)
            assert.matches(block[1]:gsub("%p", "%%%0") ..
                           ": called from a coroutine that is not a pluvio task", err)
        end
        local t0 = pluvio.now()
        pluvio.sleep(0.01)
        assert.is_true(pluvio.now() - t0 >= 0.01)
        assert.equal(0, #pluvio.runtime():tasks() - 1)
    end))
end)

describe("a plain coroutine's wait", function()
    it("raises at the line that called the blocking function, not inside pluvio", async(function()
        local t = pluvio.spawn(function() pluvio.sleep(0.001) end)
        local ch = pluvio.channel(1)
        for _, block in ipairs({
            { "pluvio.suspend", function() pluvio.suspend(); return 0 end },
            { "Task:join", function() t:join(); return 0 end },
            { "pluvio.select", function() pluvio.select(t); return 0 end },
            { "Channel:recv", function() ch:recv(); return 0 end },
        }) do
            local co = coroutine.create(block[2])
            assert.is_true((coroutine.resume(co)))
            local ok, err = coroutine.resume(co)
            assert.is_false(ok)
            assert.matches("^[^\n]*task_spec%.lua:%d+: " .. block[1]:gsub("%p", "%%%0") ..
                           ": called from a coroutine that is not a pluvio task", err)
        end
        t:join()
    end))
end)

describe("pluvio.sleep", function()
    it("sleeps its full time even when woken, before or during the sleep", async(function()
        local t = pluvio.spawn(function()
            pluvio.current():wake()         -- queued while it runs
            local t0 = pluvio.now()
            pluvio.sleep(0.02)
            return pluvio.now() - t0
        end)
        pluvio.yield()
        t:wake()
        assert.equal("waiting", t:status())
        assert.is_true(t:join() >= 0.02)
    end))

    it("keeps a parked task small: no call into C deep in its frames", function()
        -- A call into C (coroutine.running, an FFI call the JIT left to the
        -- interpreter) made deep in a task doubles its coroutine's stack for
        -- good: 1370 bytes per parked task where 930 are enough.  Measured
        -- in a fresh host: in the specs' own process, what earlier specs
        -- left to the JIT (traces flushed, functions blacklisted) decides
        -- what runs interpreted, and one ASan run of 20 measured 1378.
        local status, out, err = helper.run_script([[
            local n = 2000
            local box = pluvio.channel(1)
            local waits = {
                function() pluvio.sleep(30) end,
                function() pluvio.suspend("parked") end,
                function() box:recv() end,
            }
            for _, wait in ipairs(waits) do
                collectgarbage()
                collectgarbage()
                local before = collectgarbage("count")
                local tasks = {}
                for i = 1, n do tasks[i] = pluvio.spawn(wait) end
                pluvio.yield()
                collectgarbage()
                collectgarbage()
                print(("%.0f"):format((collectgarbage("count") - before) * 1024 / n))
                for i = 1, n do tasks[i]:kill() end
            end
        ]])
        assert.equal(0, status, err)
        local sizes = {}
        for size in out:gmatch("%d+") do sizes[#sizes + 1] = tonumber(size) end
        assert.equal(3, #sizes, out)
        for i, size in ipairs(sizes) do
            assert.is_true(size < 1100, ("wait %d: %d bytes per parked task"):format(i, size))
        end
    end)

    it("sleeps at least the time asked and wakes promptly", async(function()
        local t0 = pluvio.now()
        pluvio.sleep(0.02)
        local dt = pluvio.now() - t0
        assert.is_true(dt >= 0.02, "slept " .. dt)
        assert.is_true(dt < 0.5, "slept " .. dt)
    end))

    it("wakes sleepers in deadline order", async(function()
        local order = {}
        local tasks = {}
        for _, d in ipairs({ 0.03, 0.01, 0.02 }) do
            tasks[#tasks + 1] = pluvio.spawn(function() pluvio.sleep(d); order[#order + 1] = d end)
        end
        for _, t in ipairs(tasks) do t:join() end
        assert.same({ 0.01, 0.02, 0.03 }, order)
    end))

    it("sleep(0) yields once", async(function()
        local ran = false
        pluvio.spawn(function() ran = true end)
        pluvio.sleep(0)
        assert.is_true(ran)
    end))

    it("rejects negative, NaN, infinite and non-number durations", async(function()
        local msg = "pluvio.sleep: seconds must be a finite number from 0 to 1e9 (got %s)"
        assert.has_error(function() pluvio.sleep(-1) end, msg:format("-1"))
        assert.has_error(function() pluvio.sleep(0 / 0) end, msg:format(tostring(0 / 0)))
        assert.has_error(function() pluvio.sleep(math.huge) end, msg:format("inf"))
        assert.has_error(function() pluvio.sleep("1") end, msg:format('"1"'))
        assert.has_error(function() pluvio.sleep() end, msg:format("nil"))
    end))
end)

describe("pluvio.now", function()
    it("is monotonic with sub-microsecond resolution", function()
        local a = pluvio.now()
        local b = pluvio.now()
        assert.is_true(b >= a)
        assert.is_true(a > 0)
        local min = math.huge
        for _ = 1, 100 do
            local x, y = pluvio.now(), pluvio.now()
            if y > x and y - x < min then min = y - x end
        end
        assert.is_true(min < 1e-6, "smallest step " .. min)
    end)
end)

describe("pluvio.timeout", function()
    it("cancels a child that never ran when the deadline passed before the caller ran again", async(function()
        local hog = pluvio.spawn(function()
            pluvio.yield()                  -- then runs after main in main's next batch
            local t0 = pluvio.now()
            while pluvio.now() - t0 < 0.003 do end
        end)
        pluvio.yield()
        pluvio.current():wake()             -- main is queued ahead of the child
        local ran = false
        local r, err = pluvio.timeout(0.001, function() ran = true end)
        assert.same({ nil, "timeout", false }, { r, err, ran })
        hog:join()
    end))

    it("returns the function's results when it finishes in time", async(function()
        local a, b = pluvio.timeout(1, function(x) pluvio.sleep(0.001); return x, "y" end, "x")
        assert.equal("x", a)
        assert.equal("y", b)
    end))

    it("returns nil, 'timeout' and cancels the function when it takes too long", async(function()
        local finished = false
        local t0 = pluvio.now()
        local r, err = pluvio.timeout(0.01, function() pluvio.sleep(5); finished = true end)
        assert.is_nil(r)
        assert.equal("timeout", err)
        assert.is_true(pluvio.now() - t0 < 1)
        pluvio.sleep(0.01)
        assert.is_false(finished)
        assert.equal(0, pluvio.runtime():stats().timers_armed)
    end))

    it("leaves its caller unwoken after a timeout: the next yield lets the other tasks run",
       async(function()
        assert.equal("timeout", select(2, pluvio.timeout(0.001, pluvio.sleep, 1)))
        local ran = false
        pluvio.spawn(function() ran = true end)
        pluvio.yield()
        assert.is_true(ran)
        local t = pluvio.spawn(pluvio.suspend, "a wake-up")
        pluvio.yield()
        assert.equal("waiting", t:status())
        t:kill()
    end))

    it("raises the function's error", async(function()
        local ok, err = pcall(pluvio.timeout, 1, function() error("inner") end)
        assert.is_false(ok)
        assert.matches("inner", err)
    end))

    it("nests", async(function()
        local r, err = pluvio.timeout(1, function()
            return pluvio.timeout(0.005, function() pluvio.sleep(1) end)
        end)
        assert.is_nil(r)
        assert.equal("timeout", err)
    end))

    it("rejects bad arguments", async(function()
        assert.has_error(function() pluvio.timeout(-1, function() end) end,
            "pluvio.timeout: seconds must be a finite number from 0 to 1e9 (got -1)")
        assert.has_error(function() pluvio.timeout(1, nil) end,
            "pluvio.timeout: fn must be a function (got nil)")
    end))

    it("reports fn's error when the caller is killed after fn failed but before it took the error", function()
        local status, out, err = helper.run_script([[
            local t = pluvio.spawn_named("T", function()
                return pluvio.timeout(1, function() error("child fails") end)
            end)
            pluvio.yield()      -- T runs and spawns its child
            pluvio.spawn(function() t:kill() end)   -- runs after the child failed, before T
            print(t:join())
        ]])
        assert.equal(1, status)
        assert.equal("nil\tcancelled\n", out)
        assert.matches('pluvio: task "T/timeout" %(#%d+, failed%) failed and was never joined: [^\n]*child fails', err)
    end)
end)

describe("pluvio.select", function()
    it("leaves no trace on a long-lived task it selects on again and again", async(function()
        local stop = pluvio.spawn(function() pluvio.sleep(10) end)
        for _ = 1, 1000 do
            local quick = pluvio.spawn(function() end)
            assert.equal(2, pluvio.select(stop, quick))
        end
        assert.is_true(stop.joiners == nil or #stop.joiners == 0)
        stop:kill()
    end))

    it("returns the index and results of the first task to finish", async(function()
        local slow = pluvio.spawn(function() pluvio.sleep(0.05); return "slow" end)
        local fast = pluvio.spawn(function() pluvio.sleep(0.001); return "fast", 2 end)
        local i, a, b = pluvio.select(slow, fast)
        assert.equal(2, i)
        assert.equal("fast", a)
        assert.equal(2, b)
        assert.equal("slow", slow:join())
    end))

    it("returns index, nil, err for a failed task", async(function()
        local bad = pluvio.spawn(function() error("bad") end)
        local i, r, err = pluvio.select(bad)
        assert.equal(1, i)
        assert.is_nil(r)
        assert.matches("bad", err)
    end))

    it("refuses a task a join waits on: the results go to the join only", async(function()
        local t = pluvio.spawn(function() pluvio.sleep(0.005); return "r" end)
        local j = pluvio.spawn(function() return t:join() end)
        pluvio.yield()                      -- j parks in join
        local ok, err = pcall(pluvio.select, t)
        assert.is_false(ok)
        assert.matches('pluvio.select: argument 1, task "task%-%d+" %(#%d+, waiting%), is already ' ..
                       'waited for by task "task%-%d+" %(#%d+, waiting%); a task\'s results are given once', err)
        assert.equal("r", j:join())
    end))

    it("refuses a task whose joiner was woken but has not run yet", async(function()
        local t = pluvio.spawn(function() pluvio.suspend("go"); return "r" end)
        local j = pluvio.spawn(function() return t:join() end)
        pluvio.yield()                      -- j parks in join
        t:wake()
        pluvio.yield()                      -- t ends in this batch; j is woken, not yet resumed
        assert.equal("done", t:status())
        assert.equal("ready", j:status())
        local ok, err = pcall(pluvio.select, t)
        assert.is_false(ok)
        assert.matches("is already waited for by", err)
        assert.equal("r", j:join())
    end))

    it("makes a join of a task a select waits on raise, and a second select too", async(function()
        local t = pluvio.spawn(function() pluvio.sleep(0.005); return "r" end)
        local s = pluvio.spawn(function() return pluvio.select(t) end)
        pluvio.yield()                      -- s parks in select
        local ok, err = pcall(t.join, t)
        assert.is_false(ok)
        assert.matches('Task:join: task "task%-%d+" %(#%d+, waiting%) is already waited for by ' ..
                       'task "task%-%d+"', err)
        ok, err = pcall(pluvio.select, t)
        assert.is_false(ok)
        assert.matches("pluvio.select: argument 1, .* is already waited for by", err)
        local i, r = s:join()
        assert.equal(1, i)
        assert.equal("r", r)
    end))

    it("lets the tasks a select did not take be joined after it returns or is killed", async(function()
        local slow = pluvio.spawn(function() pluvio.sleep(0.02); return "slow" end)
        local fast = pluvio.spawn(function() return "fast" end)
        assert.equal(2, pluvio.select(slow, fast))
        local s = pluvio.spawn(function() return pluvio.select(slow) end)
        pluvio.yield()
        s:kill()
        assert.equal("slow", slow:join())
    end))

    it("claims nothing when called from a plain coroutine inside a task: others may join the tasks",
       async(function()
        plain_wait_claims_nothing("pluvio.select", function(t) return pluvio.select(t) end)
    end))

    it("rejects non-tasks and an empty call", async(function()
        assert.has_error(function() pluvio.select() end, "pluvio.select: give at least one task")
        assert.has_error(function() pluvio.select(pluvio.spawn(function() end), 5) end,
            "pluvio.select: argument 2 must be a task (got number)")
    end))

    it("refuses the calling task, as join does, instead of waiting on itself", async(function()
        local ok, err
        local t = pluvio.spawn_named("self-selector", function()
            local other = pluvio.spawn(function() end)
            ok, err = pcall(pluvio.select, other, pluvio.current())
        end)
        while t:status() ~= "done" do pluvio.yield() end
        assert.is_false(ok)
        assert.matches('pluvio.select: argument 2 is the calling task %(task "self%-selector" %(#%d+, running%)%); ' ..
                       'a task cannot wait for itself', err)
    end))
end)

describe("pluvio.suspend and Task:wake", function()
    it("parks a task until another wakes it", async(function()
        local flag = false
        local t = pluvio.spawn(function()
            while not flag do pluvio.suspend("flag") end
            return "woken"
        end)
        pluvio.yield()
        local listed = pluvio.runtime():tasks()
        local entry
        for _, e in ipairs(listed) do if e.task == t then entry = e end end
        assert.equal("flag", entry.waits_on)
        flag = true
        t:wake()
        assert.equal("woken", t:join())
    end))

    it("lists where in the user's code each task waits, and in a deadlock's report", function()
        local rt = pluvio.Runtime.new()
        local ch = pluvio.channel()
        local lines = {}
        local function take() local v = ch:recv(); return v end     -- (not a tail call: its line shows)
        lines.take = debug.getinfo(take, "S").linedefined
        local ok, err = pcall(rt.run, rt, function()
            local reader = pluvio.spawn_named("reader", function() return take() end)
            pluvio.spawn_named("own", pluvio.suspend, "its own function")  -- (no line of the spec's)
            pluvio.yield()
            local list = pluvio.runtime():tasks()
            assert.same({ nil, "spec/task_spec.lua:" .. lines.take, nil },
                        { list[1].where, list[2].where and list[2].where:match("spec/task_spec%.lua:%d+$"),
                          list[3].where })
            lines.main = debug.getinfo(1, "l").currentline + 1
            reader:join()
        end)
        assert.is_false(ok)
        assert.matches('task "main" (#1, waiting) waits on join of task "reader" (#2, waiting) at ' ..
                       "spec/task_spec.lua:" .. lines.main .. "\n", err, 1, true)
        assert.matches('task "reader" (#2, waiting) waits on channel (0/1) at spec/task_spec.lua:' .. lines.take ..
                       "\n", err, 1, true)
        assert.matches('task "own" %(#3, waiting%) waits on its own function$', err)
    end)

    -- (a frame was taken for Pluvio's own by its path: any file in a
    -- directory named pluvio)
    it("takes a script in a directory named pluvio for the user's code", function()
        local dir = helper.tmp_path(".d")
        assert(os.execute("mkdir -p " .. dir .. "/pluvio") == 0)
        local f = assert(io.open(dir .. "/pluvio/job.lua", "w"))
        f:write("local ch = pluvio.channel(1)\nlocal v = ch:recv()\nreturn v\n")
        f:close()
        local status, _, err = helper.sh(helper.quote(helper.host) .. " " .. helper.quote(dir .. "/pluvio/job.lua"))
        os.execute("rm -rf " .. dir)
        assert.equal(1, status, err)
        assert.matches('task "main" (#1, waiting) waits on channel (0/1) at ' .. dir .. "/pluvio/job.lua:2\n", err,
                       1, true)
    end)

    -- (its error replaced the wait: suspend raised it)
    it("shows a what whose __tostring raises in the words for it", async(function()
        local what = setmetatable({}, { __tostring = function() error("no words") end })
        local t = pluvio.spawn(function() pluvio.suspend(what); return "woken" end)
        pluvio.yield()
        local entry
        for _, e in ipairs(pluvio.runtime():tasks()) do if e.task == t then entry = e end end
        assert.equal("a table whose __tostring failed", entry.waits_on)
        t:wake()
        assert.equal("woken", t:join())
    end))
end)

describe("failed tasks", function()
    it("reports a failed task nobody joined on stderr and counts it", function()
        local status, _, err = helper.run_script([[
            pluvio.spawn_named("doomed", function() error("never joined") end)
            pluvio.sleep(0.001)
        ]])
        assert.equal(1, status)
        assert.matches('pluvio: task "doomed" %(#%d+, failed%) failed and was never joined: .*never joined', err)
        assert.matches("stack traceback", err)
    end)

    it("reports every failed task nobody joined, even one whose error object cannot be printed", function()
        local status, _, err = helper.run_script([[
            pluvio.spawn_named("mute", function()
                error(setmetatable({}, { __tostring = function() error("no words", 0) end }))
            end)
            pluvio.spawn_named("second", function() error("also lost") end)
            pluvio.sleep(0.001)
        ]])
        assert.equal(1, status)
        assert.matches('pluvio: task "mute" %(#%d+, failed%) failed and was never joined: ' ..
                       '%(an error object whose __tostring raised: no words%)\n', err)
        assert.matches('pluvio: task "second" %(#%d+, failed%) failed and was never joined: .*also lost', err)
    end)

    it("does not report a failed task that was joined", function()
        local status, out, err = helper.run_script([[
            local t = pluvio.spawn(function() error("joined") end)
            print(select(2, t:join()) ~= nil)
        ]])
        assert.equal(0, status, err)
        assert.equal("true\n", out)
        assert.equal("", err)
    end)

    it("lets failed tasks that were joined be collected while the run goes on", async(function()
        local probe = setmetatable({}, { __mode = "k" })
        local lost = pluvio.spawn(function() error("joined at the end") end)
        for _ = 1, 1000 do
            local t = pluvio.spawn(function() error("handled") end)
            probe[t] = true
            assert.is_nil(t:join())
        end
        collectgarbage()
        collectgarbage()
        local kept = 0
        for _ in pairs(probe) do kept = kept + 1 end
        assert.is_true(kept <= 64, kept .. " of 1000 joined failed tasks are still held")
        assert.is_nil(lost:join())      -- (an unjoined one stays for the report)
    end))
end)

-- How many times stderr reports a failure nobody joined, and of how many
-- tasks (told apart by name and number).
local function unjoined_reports(err)
    local n, ids, distinct = 0, {}, 0
    for id in err:gmatch('(task "[^"]*" %(#%d+), failed%) failed and was never joined') do
        n = n + 1
        if not ids[id] then
            ids[id], distinct = true, distinct + 1
        end
    end
    return n, distinct
end

describe("failed tasks nobody can join", function()
    it("are reported when collected and not kept: 10,000 failures keep the heap bounded", function()
        local status, out, err = helper.run_script([[
            local function heap()
                collectgarbage(); collectgarbage(); collectgarbage()
                return collectgarbage("count")
            end
            local at = {}
            for i = 1, 10000 do
                pluvio.spawn_named("handler", function() error("handler failed") end)
                pluvio.yield()
                if i == 1000 or i == 10000 then
                    at[i] = heap()
                end
            end
            print(string.format("%d %d", (at[10000] - at[1000]) * 1024, pluvio.runtime():unjoined_failures()))
        ]])
        assert.equal(1, status)
        local growth, counted = out:match("^(%-?%d+) (%d+)\n$")
        assert.equal("10000", counted, out)
        -- kept for the run's end, each cost about 600 B: 5 MiB more at 10,000
        assert.is_true(tonumber(growth) < 9000 * 50, "the heap grew by " .. growth .. " B over 9000 failures")
        local n, distinct = unjoined_reports(err)
        assert.equal(10000, n)
        assert.equal(10000, distinct)
        assert.matches('pluvio: task "handler" %(#%d+, failed%) failed and was never joined: [^\n]*handler failed\n' ..
                       'stack traceback:', err)
    end)

    it("is reported by the collector and not again at the end of the run", function()
        local status, out, err = helper.run_script([[
            local probe = setmetatable({}, { __mode = "k" })
            probe[pluvio.spawn_named("dropped", function() error("lost early") end)] = true
            pluvio.yield()
            collectgarbage(); collectgarbage(); collectgarbage()
            print(next(probe) == nil, pluvio.runtime():unjoined_failures())
        ]])
        assert.equal(1, status)
        assert.equal("true\t1\n", out)     -- collected, and reported before the run's end
        assert.equal(1, (unjoined_reports(err)))
        assert.matches('pluvio: task "dropped" %(#2, failed%) failed and was never joined: [^\n]*lost early', err)
    end)

    it("is reported at the end of the run when its handle is kept, once across runs", function()
        local status, out, err = helper.run_script([[
            local rt = pluvio.Runtime.new()
            local kept
            rt:block_on(function()
                kept = pluvio.spawn_named("kept", function() error("kept's failure") end)
                pluvio.yield()
                collectgarbage(); collectgarbage()
                print(rt:unjoined_failures())   -- held: not reported yet
            end)
            print(rt:unjoined_failures())       -- reported at the end of block_on
            kept = nil
            collectgarbage(); collectgarbage(); collectgarbage()
            rt:block_on(function() end)
            print(rt:unjoined_failures())       -- the collector does not report it again
            rt = nil
            collectgarbage(); collectgarbage(); collectgarbage()   -- nor once the runtime is freed
            local other = pluvio.Runtime.new()  -- a task collected with its runtime
            other:block_on(function()
                pluvio.spawn_named("with its runtime", function() error("gone together") end)
                pluvio.yield()
            end)
            print(other:unjoined_failures())
            other = nil
            collectgarbage(); collectgarbage(); collectgarbage()
        ]])
        assert.equal(0, status, err)            -- (the host's own runtime had no failures)
        assert.equal("0\n1\n1\n1\n", out)
        local n, distinct = unjoined_reports(err)
        assert.equal(2, n)
        assert.equal(2, distinct)
        assert.matches('pluvio: task "with its runtime" %(#2, failed%) failed and was never joined: ' ..
                       '[^\n]*gone together', err)
        assert.matches('pluvio: task "kept" %(#2, failed%) failed and was never joined: [^\n]*kept\'s failure', err)
    end)

    it("is reported at the host's exit when the collector has not found it, and the host exits 1", function()
        local status, _, err = helper.run_script([[
            collectgarbage("stop")
            pluvio.spawn_named("late", function() error("found at the end") end)
            pluvio.yield()
        ]])
        assert.equal(1, status)
        assert.equal(1, (unjoined_reports(err)))
        assert.matches('pluvio: task "late" %(#2, failed%) failed and was never joined: [^\n]*found at the end', err)
    end)

    it("is not reported when joined after it failed", function()
        local status, out, err = helper.run_script([[
            local t = pluvio.spawn(function() error("seen late") end)
            pluvio.yield()
            collectgarbage(); collectgarbage()
            print(t:status(), (select(2, t:join()):match("seen late")))
            t = nil
            collectgarbage(); collectgarbage(); collectgarbage()
            print(pluvio.runtime():unjoined_failures())
        ]])
        assert.equal(0, status, err)
        assert.equal("failed\tseen late\n0\n", out)
        assert.equal("", err)
    end)
end)

describe("deadlock", function()
    it("stops with an error naming every waiting task and what it waits on", function()
        local rt = pluvio.Runtime.new()
        local ok, err = pcall(rt.run, rt, function()
            local ch = pluvio.channel(1)
            local a = pluvio.spawn_named("reader", function() ch:recv() end)
            pluvio.spawn_named("joiner", function() a:join() end)
            pluvio.suspend("nothing")
        end)
        assert.is_false(ok)
        assert.matches("^deadlock: 3 tasks wait and nothing can wake them", err)
        assert.matches('task "main" %(#1, waiting%) waits on nothing', err)
        assert.matches('task "reader" %(#%d, waiting%) waits on channel %(0/1%)', err)
        assert.matches('task "joiner" %(#%d, waiting%) waits on join of task "reader"', err)
        assert.equal(0, rt:stats().tasks_live)
    end)

    it("says when the joined task belongs to another runtime", function()
        local rt2 = pluvio.Runtime.new()
        local left
        rt2:block_on(function()     -- block_on leaves the other tasks parked
            left = pluvio.spawn_named("left", function() pluvio.sleep(60) end)
        end)
        local rt = pluvio.Runtime.new()
        local ok, err = pcall(rt.run, rt, function() left:join() end)
        assert.is_false(ok)
        assert.matches('waits on join of task "left" %(#%d, %a+%), a task of another runtime', err)
        left:kill()
    end)
end)

-- One spec per fixed bug (found by the docs review).
describe("regressions", function()
    it("points misuse errors of pluvio.channel, spawn and default_runtime at the caller's line", async(function()
        local function line_of(f)
            local ok, err = pcall(f)
            assert.is_false(ok)
            return tonumber(err:match("task_spec%.lua:(%d+):"))
        end
        local l = debug.getinfo(1, "l").currentline
        assert.equal(l + 1, line_of(function() local c = pluvio.channel(0); return c end))
        assert.equal(l + 2, line_of(function() local t = pluvio.spawn(1); return t end))
        assert.equal(l + 3, line_of(function() local r = pluvio.default_runtime(0); return r end))
    end))

    it("cancels a task that caught its own kill with pcall", async(function()
        local t = pluvio.spawn(function()
            pcall(function() pluvio.current():kill() end)
            return "continued"
        end)
        local r, err = t:join()
        assert.is_nil(r)
        assert.equal("cancelled", err)
        assert.equal("cancelled", t:status())
    end))

    it("lets another task join a target whose first joiner was killed", async(function()
        local target = pluvio.spawn(function() pluvio.sleep(0.01); return 1 end)
        local j = pluvio.spawn(function() return target:join() end)
        pluvio.yield()
        j:kill()
        assert.equal(1, target:join())
    end))

    it("cancels the function of a pluvio.timeout whose task is killed", async(function()
        local ran_on = false
        local w = pluvio.spawn(function()
            return pluvio.timeout(5, function() pluvio.sleep(0.02); ran_on = true end)
        end)
        pluvio.sleep(0.005)
        w:kill()
        pluvio.sleep(0.03)
        assert.is_false(ran_on)
        assert.equal(0, pluvio.runtime():stats().tasks_live - 1)
    end))

    it("finishes a task that its own pluvio.timeout function kills: joiners woken, clean-ups run", async(function()
        local cleaned, after_kill = false, false
        local w
        w = pluvio.spawn(function()
            return pluvio.timeout(5, function()
                w:kill()            -- takes this function with it: it never returns
                after_kill = true
            end)
        end)
        w:on_exit(function() cleaned = true end)
        local r, err = w:join()     -- was never woken: a deadlock report
        assert.is_nil(r)
        assert.equal("cancelled", err)
        assert.is_true(cleaned)
        assert.is_false(after_kill)
        assert.equal("cancelled", w:status())
        assert.equal(1, pluvio.runtime():stats().tasks_live)
    end))

    it("runs on_exit at once on a finished task, checks its arguments and reports failing clean-ups", function()
        local status, out, err = helper.run_script([[
            local t = pluvio.spawn(function() end)
            t:join()
            local ran = false
            t:on_exit(function() ran = true end)
            print(ran)
            print(select(2, pcall(t.on_exit, t, 42)))
            local u = pluvio.spawn(function() pluvio.sleep(1) end)
            u:on_exit(function() error("cleanup broke") end)
            pluvio.yield()
            u:kill()
        ]])
        assert.equal(0, status, err)
        assert.equal("true\nTask:on_exit: fn must be a function (got number)\n", out)
        assert.matches("pluvio: an on_exit clean%-up of task .* failed: .*cleanup broke", err)
    end)

    it("does not report as failed a clean-up that killed the task that ran it, which still ends cancelled", function()
        local status, out, err = helper.run_script([[
            local victim = pluvio.spawn(pluvio.sleep, 10)
            local killer
            killer = pluvio.spawn(function()
                pluvio.yield()
                victim:kill()           -- runs victim's clean-up, which kills killer
                pluvio.yield()
                return "went on"
            end)
            victim:on_exit(function() killer:kill() end)
            print(select(2, killer:join()), killer:status())
        ]])
        assert.equal(0, status, err)
        assert.equal("cancelled\tcancelled\n", out)
        assert.equal("", err)
    end)

    it("raises, from on_exit, the error of a clean-up run at once on a finished task", async(function()
        local t = pluvio.spawn(function() end)
        t:join()
        assert.has_error(function() t:on_exit(function() error("late clean-up broke", 0) end) end,
            "late clean-up broke")
    end))

    it("finishes a task whose failing clean-up raised an error object that cannot be printed", function()
        local status, out, err = helper.run_script([[
            local bad = setmetatable({}, { __tostring = function() error("no words", 0) end })
            local t = pluvio.spawn(function()
                pluvio.current():on_exit(function() error(bad) end)
                pluvio.sleep(0.001)
                return "r"
            end)
            print(t:join())
        ]])
        assert.equal(0, status, err)
        assert.equal("r\n", out)
        assert.matches("pluvio: an on_exit clean%-up of task .* failed: " ..
                       "%(an error object whose __tostring raised: no words%)\n", err)
    end)

    it("checks self on every method", function()
        local ch = pluvio.channel(1)
        for _, case in ipairs({
            { pluvio.Runtime.reactor, "Runtime:reactor" },
            { pluvio.Runtime.unjoined_failures, "Runtime:unjoined_failures" },
            { pluvio.Task.wake, "Task:wake" },
            { ch.len, "Channel:len" }, { ch.capacity, "Channel:capacity" },
            { ch.is_closed, "Channel:is_closed" },
        }) do
            local ok, err = pcall(case[1], nil)
            assert.is_false(ok)
            assert.matches(case[2]:gsub("%p", "%%%0") .. ": call it as a method", err)
        end
    end)

    it("refuses to select the main task, saying that the run returns its results", async(function()
        local main = pluvio.current()
        local other = pluvio.spawn(function() pluvio.sleep(0.001) end)
        local t = pluvio.spawn(function() return pcall(pluvio.select, other, main) end)
        local ok, err = t:join()
        assert.is_false(ok)
        assert.matches('pluvio.select: argument 2, task "main" %(#1, waiting%), is the main task of ' ..
                       'its runtime, whose results Runtime:run returns %(or raises%); no task can join it', err)
        other:join()
    end))

    it("refuses to select a task whose results were already taken", async(function()
        local s = pluvio.spawn(function() return 1 end)
        s:join()
        local ok, err = pcall(pluvio.select, s)
        assert.is_false(ok)
        assert.matches("pluvio.select: argument 1, task .* was already joined", err)
    end))

    it("keeps error objects that are not strings as they are", async(function()
        local obj = { code = 7 }
        local t = pluvio.spawn(function() error(obj) end)
        local r, err = t:join()
        assert.is_nil(r)
        assert.equal(obj, err)
    end))

    it("gives a task that raised nil an error that says so: join never returns nil, nil for a failure",
       async(function()
        local t = pluvio.spawn(function() error() end)
        local r, err = t:join()
        assert.is_nil(r)
        assert.equal("failed", t:status())
        assert.matches("^%(error object is a nil value%)\nstack traceback:", err)
        local ok, terr = pcall(pluvio.timeout, 1, function() error(nil) end)
        assert.is_false(ok)
        assert.matches("^%(error object is a nil value%)", terr)
    end))
end)
