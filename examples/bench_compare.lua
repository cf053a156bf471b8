-- bench_compare.lua: what `make bench` runs.  Pluvio's benchmark scripts
-- side by side with the tools people trust, on the same parameters,
-- interleaved over several rounds: uring_bench.lua against fio
-- (--ioengine=io_uring) and a plain C liburing loop, ucx_bench.lua against
-- ucx_perftest.  Prints medians with min-max and the ratios, and writes
-- them to docs/PERFORMANCE.md with the machine and the exact commands.
local bench = require "pluvio.bench"

local spec = {
    name = "bench_compare",
    usage = "usage: pluvio examples/bench_compare.lua [--quick] [options]\n" ..
            "Pluvio vs fio, a C liburing loop and ucx_perftest; writes docs/PERFORMANCE.md.",
    options = {
        { "quick", "flag", false, "1 round, short runs, small file (under a minute)" },
        { "rounds", "integer", 5, "rounds (each runs every tool once, interleaved)", min = 1, max = 1000 },
        { "seconds", "number", 1.5, "seconds per file run", min = 0.1, max = 3600 },
        { "file", "string", "/tmp/pluvio-bench.dat", "the file for the file tests" },
        { "size", "size", 1073741824, "its size", min = 1048576 },
        { "output", "string", "docs/PERFORMANCE.md", "where the report goes ('-' for none)" },
        { "only", "string", nil, "uring or ucx: run one half", choices = { "uring", "ucx" } },
        { "match", "string", nil, "run only the tests whose name contains this text (e.g. 'seq read')" },
        { "cpu", "integer", nil, "pin the file tests to this CPU (-1: no pinning; default: the last CPU)" },
    },
}
local o = bench.parse_args(spec, arg)
if o.quick then
    o.rounds, o.seconds, o.size = 1, 0.5, 128 * 1048576
end

local root = (debug.getinfo(1, "S").source:match("^@(.*)/examples/") or ".")
local host = arg[-1] and arg[-1]:match("pluvio$") and arg[-1] or (root .. "/build/pluvio")
local c_loop = (host:match("^(.*)/[^/]*$") or (root .. "/build")) .. "/uring_c_bench"   -- (beside the host)

-- The report's path (relative ones from the checkout's root), checked now:
-- found unwritable after a 9-minute run, the run was lost.
local output = o.output ~= "-" and (o.output:sub(1, 1) == "/" and o.output or (root .. "/" .. o.output)) or nil
if output then
    local err = bench.writable(output)
    if err then
        io.stderr:write(("bench_compare: --output: cannot write %s (%s)\n"):format(output, err))
        os.exit(2)
    end
end

local function sh_out(cmd)
    local p = io.popen(cmd .. " 2>&1")
    local out = p:read("*a")
    local ok, how, code = p:close()
    local status = type(ok) == "number" and ok or (ok and 0 or (code or 1))
    return out, status
end

local function have(tool)
    local _, st = sh_out("command -v " .. tool .. " >/dev/null")
    return st == 0
end

local function note(fmt, ...)
    io.stderr:write(fmt:format(...), "\n")
end

-- The file tests run single-threaded tools; each is pinned to the same CPU,
-- because the CPUs of a VM differ (here one ran every tool 30 % slower than
-- the other), and a ratio of runs on different CPUs measures the CPUs.
local pin = ""
do
    local ncpu = tonumber((sh_out("nproc"))) or 1
    if o.cpu and (o.cpu < -1 or o.cpu >= ncpu) then
        io.stderr:write(("bench_compare: --cpu must be -1 (no pinning) or a CPU from 0 to %d (got %d)\n")
            :format(ncpu - 1, o.cpu))
        os.exit(2)
    end
    if o.cpu ~= -1 and have("taskset") then
        pin = ("taskset -c %d "):format(o.cpu or ncpu - 1)
    end
end

---------------------------------------------------------------------------
-- Running each tool once, returning one figure
---------------------------------------------------------------------------

local function json_of(text)
    local start = text:find("{", 1, true)
    if not start then return nil end
    return bench.json_decode(text:sub(start))
end

-- Writes go to their own file: an O_DIRECT write would drop the read
-- file from the page cache and spoil the next round's page-cache figures.
local function file_for(t)
    return t.rw:match("write") and (o.file .. ".w") or o.file
end

local function run_pluvio_uring(t)
    local cmd = (pin .. "%s %s/examples/uring_bench.lua --file %s --size %d --rw %s --bs %d --iodepth %d --runtime %g --quiet --json -%s%s%s")
        :format(host, root, file_for(t), o.size, t.rw, t.bs, t.qd, o.seconds, t.direct and " --direct" or "", " --fixed",
                t.queue and " --queue" or "")
    local out, st = sh_out(cmd)
    local j = st == 0 and json_of(out:match("\n(%{.*)$") or out)
    return j and (t.metric == "mib_s" and j.mib_s or j.iops), cmd, out
end

local function run_c_loop(t)
    local cmd = (pin .. "%s %s --rw %s --bs %d --size %d --iodepth %d --runtime %g%s"):format(c_loop, file_for(t),
        t.rw, t.bs, o.size, t.qd, o.seconds, t.direct and " --direct" or "")
    local out, st = sh_out(cmd)
    local j = st == 0 and json_of(out)
    return j and (t.metric == "mib_s" and j.mib_s or j.iops), cmd, out
end

-- The floor of a task per read (examples/uring_floor.lua): the C loop's
-- calls driven from LuaJIT, a coroutine resumed per read, nothing else.
local function run_floor(t)
    local cmd = (pin .. "%s %s/examples/uring_floor.lua --file %s --size %d --bs %d --iodepth %d --runtime %g")
        :format(host, root, file_for(t), o.size, t.bs, t.qd, o.seconds)
    local out, st = sh_out(cmd)
    local j = st == 0 and json_of(out)
    return j and j.iops, cmd, out
end

-- fio's --runtime counts whole seconds unless given a unit: --runtime=1.5
-- ran 1 s, and --quick's 0.5 ran no time limit at all (one pass of the
-- file, 0.1 s).  In milliseconds it runs as long as the others.
-- fio does by default other work than the C loop and Pluvio: one
-- io_uring_enter per I/O (--iodepth_batch_submit=1; strace: 16384 enters
-- for 16384 reads at QD 32, where the C loop makes one per 32), and random
-- offsets without repeats through a map it keeps (Pluvio and the C loop
-- draw with repeats).  Submitting what is queued at once, taking up to
-- --iodepth completions per call and --norandommap make it do the same
-- work (QD 128 O_DIRECT: still >= 64 in flight 100% of the time).
-- Pluvio's registered pool and the C loop map buffers of 512 KiB and more
-- as 2 MiB transparent huge pages (a 1 MiB O_DIRECT op is one segment, not
-- 256: the C loop ran 1 MiB reads 3x faster so).  fio's huge pages
-- (--iomem=shmhuge) come from the pages reserved in
-- /proc/sys/vm/nr_hugepages: as root the run reserves what fio needs for
-- those jobs and gives them back at the end (huge.pages: how many it
-- added; 0 where it may not, and fio's buffers stay 4 KiB pages).
local HUGE_FROM = 524288
local NR_HUGEPAGES = "/proc/sys/vm/nr_hugepages"
local huge = { pages = 0, old = nil, fallbacks = 0 }

local function read_number(path)
    local f = io.open(path)
    local v = f and tonumber(f:read("*l"))
    if f then f:close() end
    return v
end

local function write_number(path, v)
    local f = io.open(path, "w")
    if not f then return false end
    local ok = f:write(tostring(v))
    return f:close() and ok ~= nil
end

local function reserve_huge(pages)
    local old = read_number(NR_HUGEPAGES)
    if not old or not write_number(NR_HUGEPAGES, old + pages) then return end
    if (read_number(NR_HUGEPAGES) or 0) >= old + pages then
        huge.pages, huge.old = pages, old
    else                -- (the kernel found fewer free: as it was)
        write_number(NR_HUGEPAGES, old)
    end
end

local function release_huge()
    if huge.pages > 0 then
        write_number(NR_HUGEPAGES, huge.old)
        huge.pages = 0
    end
end

local function run_fio(t, no_huge)
    local iomem = t.bs >= HUGE_FROM and huge.pages > 0 and not no_huge and " --iomem=shmhuge" or ""
    local cmd = (pin .. "fio --name=bench --filename=%s --ioengine=io_uring --rw=%s --bs=%d --iodepth=%d --size=%d " ..
                 "--runtime=%dms --time_based --invalidate=0 --fixedbufs=1 --direct=%d --norandommap " ..
                 "--iodepth_batch_submit=%d --iodepth_batch_complete_max=%d%s --output-format=json")
        :format(file_for(t), t.rw, t.bs, t.qd, o.size, math.floor(o.seconds * 1000 + 0.5), t.direct and 1 or 0,
                t.qd, t.qd, iomem)
    local out, st = sh_out(cmd)
    local j = st == 0 and json_of(out)
    local job = j and j.jobs and j.jobs[1]
    if job and job.error ~= 0 and iomem ~= "" then
        -- (another process took the reserved pages: UCX takes huge pages
        -- for its shared memory where there are any)
        note("bench_compare: fio found no huge pages: this run with 4 KiB pages")
        huge.fallbacks = huge.fallbacks + 1
        return run_fio(t, true)
    end
    if not job or job.error ~= 0 then return nil, cmd, out end
    local side = (t.rw:match("write") and job.write) or job.read
    return t.metric == "mib_s" and side.bw / 1024 or side.iops, cmd, out
end

local UCX_TRANSPORTS = {
    shm = "sysv,posix,cma,self,tcp",     -- tcp for the connection manager
    tcp = "tcp",
}

local port_seq = 24000 + math.random(0, 5000)
local function next_port()
    port_seq = port_seq + 1
    return port_seq
end

-- Iterations of a UCX test, and as many warm-up iterations first on both
-- sides: the JIT compiles Pluvio's paths during the first few thousand
-- messages, and ucx_perftest warms up too (10 000 by default).
local function ucx_iters(t)
    if t.kind == "lat" then
        return o.quick and 2000 or 10000
    end
    -- 1 MiB: 2000 messages, half a second or more (500 took 0.1 s, and
    -- ratios moved by 30 % from round to round); smaller ones 20 000: at
    -- 5000 the 64 KiB tcp run timed 0.15 s, and its spread swamped a 5 %
    -- difference that 30 000-message runs showed
    return t.size >= 1048576 and (o.quick and 500 or 2000) or (o.quick and 5000 or 20000)
end

local function run_perftest(t)
    local port = next_port()
    local env = ("env UCX_TLS=%s UCX_NET_DEVICES=lo"):format(UCX_TRANSPORTS[t.tl])
    local test = t.kind == "lat" and "ucp_am_lat" or "ucp_am_bw"
    local iters = ucx_iters(t)
    os.execute(("timeout 30 %s ucx_perftest -p %d >/dev/null 2>&1 &"):format(env, port))
    os.execute("sleep 0.3")
    local cmd = ("%s ucx_perftest 127.0.0.1 -p %d -t %s -s %d -n %d -w %d"):format(env, port, test, t.size, iters, iters)
    local out = sh_out("timeout 30 " .. cmd)
    local f = { out:match("Final:%s+(%S+)%s+(%S+)%s+(%S+)%s+(%S+)%s+(%S+)%s+(%S+)") }
    if #f < 6 then return nil, cmd, out end
    -- Final: iterations, p50 latency (of the last 2048 iterations), latency
    -- since the last report, overall, MB/s since the last report, MB/s
    -- overall (MiB/s: ucx_perftest divides by 1024^2).  The "average"
    -- columns cover only the time since the last progress line (one a
    -- second); ucx_bench's figure is over the whole run, as "overall" is.
    if t.kind == "lat" then return tonumber(f[2]), cmd, out end
    return tonumber(f[6]), cmd, out
end

local function run_ucx_bench(t)
    local port = next_port()
    local env = ("env UCX_TLS=%s UCX_NET_DEVICES=lo"):format(UCX_TRANSPORTS[t.tl])
    local iters = ucx_iters(t)
    -- --no-wakeup: ucx_perftest's context has no UCP_FEATURE_WAKEUP either;
    -- with it, each event of a worker's interfaces also passes UCX's epoll
    -- set of the worker (64 KiB tcp bandwidth: 1-3 % of the sender's CPU)
    local common = ("--test %s --sizes %d --iters %d --warmup %d --spin 1 --no-wakeup --quiet")
        :format(t.kind, t.size, iters, iters)
    os.execute(("timeout 60 %s %s %s/examples/ucx_bench.lua --server --port %d %s >/dev/null 2>&1 &")
        :format(env, host, root, port, common))
    os.execute("sleep 0.3")
    local cmd = ("%s %s %s/examples/ucx_bench.lua --connect 127.0.0.1:%d %s --json -"):format(env, host, root, port, common)
    local out = sh_out("timeout 60 " .. cmd)
    local j = json_of(out:match("\n(%{.*)$") or "")
    if not j then return nil, cmd, out end
    local r = j.results[1]
    if t.kind == "lat" then return r.lat_us.p50, cmd, out end
    return r.bw.mib_s, cmd, out
end

---------------------------------------------------------------------------
-- The tests
---------------------------------------------------------------------------

local tests = {}
local function add(t) tests[#tests + 1] = t end

if o.only ~= "ucx" then
    for _, qd in ipairs({ 1, 32, 128 }) do
        add { group = "uring", name = ("4 KiB randread, page cache, QD %d"):format(qd), rw = "randread", bs = 4096,
              qd = qd, metric = "iops", unit = "IOPS", higher = true,
              goal = qd == 1 and 0.9 or 0.95, ref = "C loop",
              runs = { pluvio = run_pluvio_uring, ["C loop"] = run_c_loop, fio = run_fio, floor = run_floor } }
    end
    for _, qd in ipairs({ 32, 128 }) do
        add { group = "uring", name = ("4 KiB randread, page cache, QD %d, one task with an I/O queue"):format(qd),
              rw = "randread", bs = 4096, qd = qd, queue = true, metric = "iops", unit = "IOPS", higher = true,
              goal = 0.95, ref = "C loop", runs = { pluvio = run_pluvio_uring, ["C loop"] = run_c_loop } }
    end
    add { group = "uring", name = "4 KiB randread, O_DIRECT, QD 128", rw = "randread", bs = 4096, qd = 128,
          direct = true, metric = "iops", unit = "IOPS", higher = true, goal = 0.9, ref = "fio",
          runs = { pluvio = run_pluvio_uring, ["C loop"] = run_c_loop, fio = run_fio } }
    add { group = "uring", name = "1 MiB seq write, O_DIRECT, QD 16", rw = "write", bs = 1048576, qd = 16,
          direct = true, metric = "mib_s", unit = "MiB/s", higher = true, goal = 0.9, ref = "fio",
          runs = { pluvio = run_pluvio_uring, ["C loop"] = run_c_loop, fio = run_fio } }
    add { group = "uring", name = "1 MiB seq read, O_DIRECT, QD 16", rw = "read", bs = 1048576, qd = 16,
          direct = true, metric = "mib_s", unit = "MiB/s", higher = true, goal = 0.9, ref = "fio",
          runs = { pluvio = run_pluvio_uring, ["C loop"] = run_c_loop, fio = run_fio } }
end
if o.only ~= "uring" and have("ucx_perftest") then
    for _, tl in ipairs({ "shm", "tcp" }) do
        for _, size in ipairs(o.quick and { 8, 65536 } or { 8, 4096, 65536, 1048576 }) do
            add { group = "ucx", name = ("AM latency %s, %s"):format(bench.bytes(size), tl), kind = "lat", tl = tl,
                  size = size, unit = "us p50", higher = false, goal = 1.25, ref = "ucx_perftest",
                  runs = { pluvio = run_ucx_bench, ucx_perftest = run_perftest } }
            add { group = "ucx", name = ("AM bandwidth %s, %s"):format(bench.bytes(size), tl), kind = "bw", tl = tl,
                  size = size, unit = "MiB/s", higher = true, goal = size >= 65536 and 0.9 or nil,
                  ref = "ucx_perftest", runs = { pluvio = run_ucx_bench, ucx_perftest = run_perftest } }
        end
    end
end
if o.match then
    local kept = {}
    for _, t in ipairs(tests) do
        if t.name:find(o.match, 1, true) then kept[#kept + 1] = t end
    end
    if #kept == 0 then
        io.stderr:write(("bench_compare: --match: no test name contains %q\n"):format(o.match))
        os.exit(2)
    end
    tests = kept
end

---------------------------------------------------------------------------

local any_file_test = false
for _, t in ipairs(tests) do any_file_test = any_file_test or t.group == "uring" end
if any_file_test then
    local f = io.open(o.file)
    local size = f and f:seek("end") or 0
    if f then f:close() end
    if size < o.size then
        note("bench_compare: writing %s (%s)", o.file, bench.bytes(o.size))
        os.execute(("dd if=/dev/urandom of=%s bs=1M count=%d status=none"):format(o.file, math.ceil(o.size / 1048576)))
    end
    os.execute(("cat %s >/dev/null"):format(o.file))      -- into the page cache
    -- the write tests' own file, written with O_DIRECT and synced: cp left
    -- 1 GiB of dirty page cache, which the first O_DIRECT writer (the C
    -- loop, first in round 1) had to write back and invalidate
    os.execute(("dd if=%s of=%s.w bs=1M oflag=direct conv=fsync status=none"):format(o.file, o.file))
    -- fio's huge pages: its largest job's buffers (2 MiB pages), and as many
    -- again for its alignment
    local need = 0
    for _, t in ipairs(tests) do
        if t.runs.fio and t.bs >= HUGE_FROM then
            need = math.max(need, 2 * math.ceil(t.qd * t.bs / 2097152))
        end
    end
    if need > 0 then
        reserve_huge(need)
        if huge.pages == 0 then
            note("bench_compare: could not reserve %d huge pages in %s: fio's 1 MiB buffers are 4 KiB pages",
                 need, NR_HUGEPAGES)
        end
    end
end

-- The executor's own figures first (no reference tool), before any UCX
-- server that busy-polls has run: runtime_bench.lua with LuaJIT's default
-- GC pause and with a larger one.
local runtime_lines = {}
if o.only ~= "uring" and o.only ~= "ucx" and not o.match then
    runtime_lines[1] = "| figure | default GC (pause 200) | GC pause 1000 | goal |"
    runtime_lines[2] = "| --- | --- | --- | --- |"
    local runs = {}
    for _, pause in ipairs({ 0, 1000 }) do
        local cmd = ("%s %s/examples/runtime_bench.lua%s%s --json -"):format(host, root,
            o.quick and " --quick" or "", pause > 0 and (" --gc-pause " .. pause) or "")
        local out = sh_out(cmd)
        runs[#runs + 1] = json_of(out:match("\n(%{.*)$") or "") or {}
    end
    local function cell(r, f)
        local ok, v = pcall(f, r)
        return ok and v or "-"
    end
    local rows = {
        { "spawn+join", function(r) return bench.human(r.spawn.tasks_per_s) .. " tasks/s" end, ">= 1M tasks/s" },
        { "channel ping-pong", function(r) return bench.human(r.pingpong.messages_per_s) .. " messages/s" end, ">= 3M messages/s" },
        { "sleepers: RSS", function(r) return ("%.0f MiB (%s tasks)"):format(r.sleepers.rss_mib, bench.human(r.sleepers.tasks)) end, "<= 150 MiB" },
        { "sleepers: wake lateness p50 / p99 / max", function(r)
            return ("%.3f / %.2f / %.1f ms"):format(r.sleepers.late_ms.p50, r.sleepers.late_ms.p99, r.sleepers.late_ms.max) end,
          "max < 50 ms" },
        { "idle: CPU while one task sleeps", function(r) return ("%.3f%%"):format(r.idle.cpu_percent) end, "< 2%" },
    }
    for _, row in ipairs(rows) do
        runtime_lines[#runtime_lines + 1] = ("| %s | %s | %s | %s |"):format(row[1], cell(runs[1], row[2]),
            cell(runs[2], row[2]), row[3])
    end
end

local samples, commands = {}, {}
local by_round = {}     -- test -> round -> tool -> figure (for the paired ratios)
local t_start = os.time()
-- (the huge pages go back also when a run raises an error)
local ran, run_err = pcall(function()
    for round = 1, o.rounds do
        for _, t in ipairs(tests) do
            local tools = {}
            for tool in pairs(t.runs) do tools[#tools + 1] = tool end
            table.sort(tools)
            if round % 2 == 0 then          -- alternate the order: no tool always goes first
                table.sort(tools, function(a, b) return a > b end)
            end
            for _, tool in ipairs(tools) do
                local v, cmd, out = t.runs[tool](t)
                samples[t] = samples[t] or {}
                samples[t][tool] = samples[t][tool] or {}
                if v then
                    table.insert(samples[t][tool], v)
                    by_round[t] = by_round[t] or {}
                    by_round[t][round] = by_round[t][round] or {}
                    by_round[t][round][tool] = v
                else
                    note("bench_compare: %s / %s failed: %s\n%s", t.name, tool, cmd, out:sub(1, 400))
                end
                commands[t] = commands[t] or {}
                commands[t][tool] = cmd
            end
            note("bench_compare: round %d/%d: %s", round, o.rounds, t.name)
        end
    end
end)
local fio_huge = huge.pages > 0
release_huge()
if not ran then error(run_err, 0) end

local function stats(list)
    if not list or #list == 0 then return nil end
    table.sort(list)
    local n = #list
    local median = n % 2 == 1 and list[(n + 1) / 2] or (list[n / 2] + list[n / 2 + 1]) / 2
    return { median = median, min = list[1], max = list[n], n = n }
end

local function fmt(s)
    if not s then return "failed" end
    local function f(v) return v >= 1000 and bench.human(v) or ("%.3g"):format(v) end
    if s.n == 1 then return f(s.median) end
    return ("%s (%s-%s)"):format(f(s.median), f(s.min), f(s.max))
end

local lines = {}
local function out(l) lines[#lines + 1] = l end
out("| test | unit | Pluvio | reference | ratio | goal | other |")
out("| --- | --- | --- | --- | --- | --- | --- |")
for _, t in ipairs(tests) do
    local p = stats(samples[t].pluvio)
    local r = stats(samples[t][t.ref])
    -- Pluvio / reference for both kinds, so that the ratio reads as the
    -- goal does ("latency <= 1.25x": Pluvio's at most 1.25 times the
    -- reference's).  (Reference / Pluvio for latency printed 0.80x beside
    -- "latency <= 1.25x" for a run 1.25 times slower, and 1.58x for one
    -- faster.)
    -- The median of the rounds' own ratios: the tools of a round ran one
    -- after the other, so a VM that changed speed between rounds (runs of
    -- both tools at 170 us, then both at 600) does not set one tool's
    -- median from its fast rounds beside the other's from its slow ones.
    local ratios = {}
    for _, figures in pairs(by_round[t] or {}) do
        local pv, rv = figures.pluvio, figures[t.ref]
        if pv and rv and rv > 0 then ratios[#ratios + 1] = pv / rv end
    end
    local ratio = p and r and (stats(ratios) or {}).median
    local others = {}
    for tool, list in pairs(samples[t]) do
        if tool ~= "pluvio" and tool ~= t.ref then others[#others + 1] = tool .. " " .. fmt(stats(list)) end
    end
    table.sort(others)
    out(("| %s | %s | %s | %s: %s | %s | %s | %s |"):format(t.name, t.unit, fmt(p), t.ref, fmt(r),
        ratio and ("%.2fx"):format(ratio) or "-",
        t.goal and (t.higher and (">= %.2fx"):format(t.goal) or ("latency <= %.2fx"):format(t.goal)) or "-",
        table.concat(others, "; ")))
end
local table_text = table.concat(lines, "\n")
print(table_text)
if #runtime_lines > 0 then
    print(table.concat(runtime_lines, "\n"))
end

if output then
    local function first_line(cmd) local s = sh_out(cmd); return (s:gsub("\n.*", "")) end
    local doc = {
        "# Performance",
        "",
        "Generated by `make bench` (examples/bench_compare.lua" .. (o.quick and ", --quick" or "") .. ") on " ..
            os.date("!%Y-%m-%d %H:%M UTC") .. ".",
        ("Each figure is the median of %d round%s (min-max in brackets); the tools ran interleaved, " ..
         "alternating their order, on the same file and parameters%s."):format(o.rounds, o.rounds == 1 and "" or "s",
         pin ~= "" and (" (the file tests pinned to one CPU: `" .. pin:gsub(" $", "") .. "`)") or ""),
        "Ratio: Pluvio / reference, for throughput (higher is better for Pluvio) and for latency (lower is " ..
        "better), the median of the rounds' own ratios (each round ran both tools one after the other); " ..
        "the goal column reads the same way.",
        "On a small shared VM single runs vary by up to 2x (the ranges show it); compare medians, and rerun " ..
        "`make bench` on your own machine before drawing conclusions.",
        "",
        "## Machine",
        "",
        "- CPU: " .. first_line("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'") ..
            ", " .. first_line("nproc") .. " cores",
        "- Memory: " .. first_line("free -g | awk '/Mem:/{print $2 \" GiB\"}'"),
        "- Kernel: " .. first_line("uname -r"),
        "- File system of " .. o.file .. ": " .. first_line("df -T " .. o.file .. " | awk 'NR==2{print $2}'"),
        "- liburing " .. first_line("dpkg-query -W -f='${Version}' liburing2") .. ", UCX " ..
            first_line("dpkg-query -W -f='${Version}' libucx0") .. ", LuaJIT " ..
            first_line("luajit -v | cut -d' ' -f2") .. ", " .. first_line("fio --version"),
        "",
        "## Results",
        "",
        table_text,
        "",
        "## The runtime itself",
        "",
        "examples/runtime_bench.lua, once with LuaJIT's default GC pause and once with `--gc-pause 1000`: with " ..
        "100 000 live tasks the collector's largest steps (the atomic pass over every coroutine stack, whole " ..
        "tables) take tens of milliseconds, and the tasks due meanwhile wake that late; a larger pause runs " ..
        "fewer cycles.",
        "",
        table.concat(runtime_lines, "\n"),
        "",
        "Latency: every tool records each operation's latency (the C loop in libpluvio's histogram, one " ..
        "clock stamp per completion, as uring_bench.lua does).",
        "",
        "Buffers: Pluvio's registered pool and the C loop's buffers, from 512 KiB on, are 2 MiB aligned " ..
        "transparent huge pages (a 1 MiB O_DIRECT operation is then one segment); " ..
        (fio_huge and "fio's are huge pages too (--iomem=shmhuge, from pages the run reserved in " ..
            NR_HUGEPAGES .. " and gave back)" .. (huge.fallbacks > 0 and
            (", except in %d runs that found none free (taken by another process) and used 4 KiB pages.")
                :format(huge.fallbacks) or ".") or
         "fio's are malloc'd 4 KiB pages (its huge pages need pages reserved in " .. NR_HUGEPAGES ..
            ", which this run could not do: run it as root). Against fio, the 1 MiB rows favour Pluvio " ..
            "(the C loop ran 1 MiB reads 3x faster with huge pages than without): compare them with the " ..
            "C loop's figure too."),
        "",
        "UCX: Pluvio and ucx_perftest both run as a server and a client process on loopback; both busy-poll " ..
        "(ucx_bench --spin 1) and create their UCX context without the wakeup feature (ucx_bench --no-wakeup). `shm` allows shared memory (UCX_TLS=" .. UCX_TRANSPORTS.shm .. "), `tcp` only tcp; " ..
        "ucx_bench --transport address exchanges worker addresses as ucx_perftest does. Latency is one way " ..
        "(half the round trip), p50 for Pluvio, ucx_perftest's p50 column for the reference.",
        "",
        "## Commands",
        "",
    }
    local root_prefix = (root .. "/"):gsub("%p", "%%%0")    -- root, literally
    for _, t in ipairs(tests) do
        doc[#doc + 1] = "- " .. t.name .. ":"
        local by_tool = commands[t] or {}
        local tools = {}
        for tool in pairs(by_tool) do tools[#tools + 1] = tool end
        table.sort(tools)
        for _, tool in ipairs(tools) do
            doc[#doc + 1] = "  - " .. tool .. ": `" .. by_tool[tool]:gsub(root_prefix, "") .. "`"
        end
    end
    doc[#doc + 1] = ""
    doc[#doc + 1] = ("Total time: %d s."):format(os.time() - t_start)
    local f, err = io.open(output, "w")
    if not f then       -- (writable at the start: removed or made read-only since)
        io.stderr:write(("bench_compare: cannot write %s (%s)\n"):format(output, tostring(err)))
        os.exit(1)
    end
    f:write(table.concat(doc, "\n"), "\n")
    f:close()
    note("bench_compare: wrote %s", output)
end
