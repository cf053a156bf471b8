-- runtime_bench.lua: the executor's own costs, with no I/O.
--
--   spawn     spawn + join of N trivial tasks             (goal >= 1M tasks/s)
--   pingpong  two tasks bouncing a value over two channels (goal >= 3M messages/s)
--   sleepers  N tasks sleeping 0.2-1.0 s at once: peak RSS and how late each
--             wakes after its deadline                    (goal <= 150 MiB, all < 50 ms)
--   idle      one task sleeping: CPU used while idle       (goal < 2% of a core)
local pluvio = require "pluvio"
local bench = require "pluvio.bench"

local spec = {
    name = "runtime_bench",
    usage = "usage: pluvio examples/runtime_bench.lua [--scenario NAME] [options]\n" ..
            "Costs of the executor itself: spawning, switching, sleeping, idling.",
    options = {
        { "scenario", "string", "all", "spawn, pingpong, sleepers, idle or all",
          choices = { "spawn", "pingpong", "sleepers", "idle", "all" } },
        { "n", "integer", 0, "size of each scenario (0: each its own, 1M tasks, 1M messages, 100k sleepers)", min = 0 },
        { "idle-seconds", "number", nil, "how long the idle scenario sleeps (default 2, 0.5 with --quick)",
          min = 0.01, max = 3600 },
        { "quick", "flag", false, "small sizes (about a second in all)" },
        { "gc-pause", "integer", 0, "LuaJIT's collectgarbage('setpause') (0: leave the default, 200); with\n" ..
          "                           100k live tasks the collector's largest steps take tens of ms\n" ..
          "                           (tasks due meanwhile wake that late): a larger pause runs fewer cycles",
          min = 0, max = 1000000 },
        { "json", "string", nil, "write the figures as JSON to this file ('-' for stdout)", out = true },
    },
}
local o = bench.parse_args(spec, arg)
local scenarios = { spawn = true, pingpong = true, sleepers = true, idle = true, all = true }
if not scenarios[o.scenario] then
    io.stderr:write("runtime_bench: --scenario must be spawn, pingpong, sleepers, idle or all (got ",
                    o.scenario, ")\n")
    os.exit(2)
end
if o.n < 0 then
    io.stderr:write("runtime_bench: --n must be >= 0\n")
    os.exit(2)
end
local function size(default, quick)
    if o.n > 0 then return o.n end
    return o.quick and quick or default
end

local function rss_mib(field)
    local f = io.open("/proc/self/status")
    local text = f:read("*a")
    f:close()
    return tonumber(text:match(field .. ":%s*(%d+)")) / 1024
end

if o.gc_pause > 0 then
    collectgarbage("setpause", o.gc_pause)
end

local results = { gc_pause = o.gc_pause > 0 and o.gc_pause or 200 }
local rows = {}
local function row(name, value, unit, goal, met)
    rows[#rows + 1] = { name, value, unit, goal, met }
end

-- spawn + join, in batches so the task table stays small
if o.scenario == "all" or o.scenario == "spawn" then
    local n = size(1000000, 100000)
    local batch = 1000
    local function trivial(x) return x end
    local tasks = {}
    collectgarbage()
    local c0, t0 = os.clock(), pluvio.now()
    local done = 0
    while done < n do
        local k = math.min(batch, n - done)
        for i = 1, k do tasks[i] = pluvio.spawn(trivial, i) end
        for i = 1, k do tasks[i]:join() end
        done = done + k
    end
    local dt = pluvio.now() - t0
    results.spawn = { tasks = n, seconds = dt, tasks_per_s = n / dt, cpu_s = os.clock() - c0 }
    row("spawn+join", n / dt, "tasks/s", ">= 1M/s", n / dt >= 1e6)
end

-- ping-pong over two capacity-1 channels
if o.scenario == "all" or o.scenario == "pingpong" then
    local n = size(1000000, 100000)
    local ping, pong = pluvio.channel(1), pluvio.channel(1)
    local peer = pluvio.spawn_named("pong", function()
        for _ = 1, n do pong:send(ping:recv()) end
    end)
    local t0 = pluvio.now()
    for i = 1, n do
        ping:send(i)
        pong:recv()
    end
    peer:join()
    local dt = pluvio.now() - t0
    local msgs = 2 * n          -- each round trip is two messages
    results.pingpong = { round_trips = n, messages = msgs, seconds = dt, messages_per_s = msgs / dt }
    row("channel ping-pong", msgs / dt, "messages/s", ">= 3M/s", msgs / dt >= 3e6)
end

-- many concurrent sleepers: memory and wake-up lateness
if o.scenario == "all" or o.scenario == "sleepers" then
    local n = size(100000, 10000)
    local hist = bench.Histogram.new()
    local rss0 = rss_mib("VmRSS")
    local tasks = {}
    local function sleeper(d)
        local deadline = pluvio.now() + d
        pluvio.sleep(d)
        hist:record(pluvio.now() - deadline)
    end
    math.randomseed(1)
    local t0 = pluvio.now()
    for i = 1, n do
        tasks[i] = pluvio.spawn(sleeper, 0.2 + 0.8 * math.random())
    end
    pluvio.sleep(0.1)
    local rss_peak = rss_mib("VmRSS")
    for i = 1, n do tasks[i]:join() end
    local s = hist:summary()
    results.sleepers = { tasks = n, rss_mib = rss_peak, rss_before_mib = rss0, hwm_mib = rss_mib("VmHWM"),
                         late_ms = { p50 = s.p50 * 1e3, p99 = s.p99 * 1e3, max = s.max * 1e3 },
                         seconds = pluvio.now() - t0 }
    row(("%d sleepers: RSS"):format(n), rss_peak, "MiB", "<= 150 MiB", rss_peak <= 150)
    row("  wake lateness p50", s.p50 * 1e3, "ms", "", nil)
    row("  wake lateness p99", s.p99 * 1e3, "ms", "", nil)
    row("  wake lateness max", s.max * 1e3, "ms", "< 50 ms", s.max < 0.05)
end

-- an idle runtime: one sleeping task
if o.scenario == "all" or o.scenario == "idle" then
    local secs = o.idle_seconds or (o.quick and 0.5 or 2)
    local c0, t0 = os.clock(), pluvio.now()
    pluvio.sleep(secs)
    local cpu, dt = os.clock() - c0, pluvio.now() - t0
    results.idle = { seconds = dt, cpu_s = cpu, cpu_percent = cpu / dt * 100 }
    row(("idle %.1f s"):format(secs), cpu / dt * 100, "% CPU", "< 2%", cpu / dt * 100 < 2)
end

local report = o.json == "-" and io.stderr or io.stdout    -- stdout holds only the JSON then
report:write(("%-24s %14s  %-10s  %-10s  %s\n"):format("runtime_bench", "figure", "unit", "goal", ""))
for _, r in ipairs(rows) do
    local v = r[2] >= 1e4 and bench.human(r[2]) or ("%.3f"):format(r[2])
    report:write(("%-24s %14s  %-10s  %-10s  %s\n"):format(r[1], v, r[3], r[4],
        r[5] == nil and "" or (r[5] and "met" or "NOT MET")))
end
report:write(("CPU time %.2f s\n"):format(os.clock()))
if o.json then
    bench.write_json(o.json, results)
end
