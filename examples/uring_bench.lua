-- uring_bench.lua: file I/O benchmark on Pluvio's io_uring reactor, a small
-- fio.  iodepth tasks each keep one operation in flight (or, with --queue,
-- one task keeps iodepth in flight on an I/O queue); latencies go into
-- one histogram; the report gives IOPS, MiB/s, latency percentiles, ops per
-- io_uring_enter and CPU time, as a table and (--json) as JSON.
--
--   pluvio examples/uring_bench.lua --rw randread --bs 4k --iodepth 32 --runtime 5
local pluvio = require "pluvio"
local uring = require "pluvio.uring"
local bench = require "pluvio.bench"

local spec = {
    name = "uring_bench",
    usage = "usage: pluvio examples/uring_bench.lua [options]\n" ..
            "File I/O through Pluvio's io_uring reactor, reported like fio.",
    options = {
        { "rw", "string", "randread", "read, write, randread, randwrite or rw (random 50/50)",
          choices = { "read", "write", "randread", "randwrite", "rw" } },
        { "bs", "size", 4096, "block size (4096, 4k, 1m)" },
        { "size", "size", 64 * 1048576, "file size; the file is created (patterned) if shorter" },
        { "iodepth", "integer", 32, "concurrent tasks, one operation in flight each" },
        { "direct", "flag", false, "O_DIRECT (DmaFile)" },
        { "fixed", "flag", false, "registered buffers (read_fixed / write_fixed)" },
        { "queue", "flag", false, "one task keeps --iodepth operations in flight on an I/O queue (with --fixed)" },
        { "runtime", "number", 0, "seconds to run (0: transfer --bytes)", min = 0, max = 1e6 },
        { "bytes", "size", nil, "bytes to transfer (default: --size)" },
        { "file", "string", nil, "file to use (default: a temporary file, removed after)" },
        { "verify", "flag", false, "write a pattern, read it back and check every block" },
        { "fsync-every", "integer", 0, "fsync after this many writes (0: never)", min = 0 },
        { "json", "string", nil, "write the figures as JSON to this file ('-' for stdout)", out = true },
        { "plot", "string", nil, "write latency and throughput plots to this SVG file", out = true },
        { "quiet", "flag", false, "no progress line" },
        { "seed", "integer", 42, "seed of the offsets and the data pattern", min = 0, max = 2 ^ 53 },
        { "gc-check", "flag", false, "stop Lua's collector during the run and report how much the Lua\n" ..
          "                           heap grew, per operation (garbage the I/O path makes)" },
    },
}

local o = bench.parse_args(spec, arg)

local cleanup         -- removes the temporary file, once there is one
-- (at the end, and when Ctrl-C or SIGTERM stops the run: the host then
-- cancels the tasks, and this task's on_exit clean-ups run)
pluvio.current():on_exit(function() if cleanup then pcall(cleanup) end end)
local function fail(msg, status)
    io.stderr:write("uring_bench: ", msg, "\n")
    if cleanup then pcall(cleanup) end
    os.exit(status or 2)
end

local modes = { read = true, write = true, randread = true, randwrite = true, rw = true }
if not modes[o.rw] then fail("--rw must be read, write, randread, randwrite or rw (got " .. o.rw .. ")") end
if o.bs <= 0 then fail("--bs must be > 0 (got " .. o.bs .. ")") end
if o.bs > 1073741824 then fail("--bs must be at most 1g") end
if o.iodepth < 1 or o.iodepth > 4096 then fail("--iodepth must be from 1 to 4096 (got " .. o.iodepth .. ")") end
if o.direct and o.bs % 512 ~= 0 then
    fail(("--bs %d with --direct: O_DIRECT needs a multiple of the device block size (512 or 4096)"):format(o.bs))
end
if o.size < o.bs then fail("--size must be at least --bs") end
if o.size % o.bs ~= 0 then fail(("--size %d is not a multiple of --bs %d"):format(o.size, o.bs)) end
if o.runtime < 0 then fail("--runtime must be >= 0") end
if o.queue and not o.fixed then fail("--queue needs --fixed (an I/O queue takes registered buffers)") end
if o.fsync_every < 0 then fail("--fsync-every must be >= 0") end

local writes = o.rw == "write" or o.rw == "randwrite" or o.rw == "rw"
local random = o.rw:match("^rand") ~= nil or o.rw == "rw"
local nblocks = math.floor(o.size / o.bs)
local total_bytes = o.bytes and o.bytes > 0 and o.bytes or o.size
local total_ops = math.max(1, math.floor(total_bytes / o.bs))
local temp = o.file == nil
local path = o.file
if temp then
    path = os.tmpname()         -- (it makes the file: only its name is used)
    os.remove(path)
    path = path .. ".uring_bench"
    cleanup = function() os.remove(path) end
end

-- One reactor sized for the run: a registered buffer per task.
local rt = pluvio.runtime()
local reactor = uring.reactor {
    queue_size = math.max(64, math.min(4096, o.iodepth * 2)),
    buffer_size = math.ceil(o.bs / 4096) * 4096,
    buffer_count = o.iodepth + 2,
    submit_depth = math.max(1, o.iodepth),
}
rt:register_reactor("uring_bench", reactor)

-- Make sure the file holds --size bytes of the pattern (for reads and verify).
local function prepare()
    local st = uring.statx(path)
    if st and st.size >= o.size and not (o.verify and writes == false and temp) then
        return false
    end
    local f, err = uring.File.open(path, st and "r+" or "w+")
    if not f then fail(err) end
    local buf = f:acquire_buffer()
    local chunk = buf:size() - buf:size() % o.bs
    local off = 0
    while off < o.size do
        local n = math.min(chunk, o.size - off)
        buf:fill_pattern(o.seed, off, n)
        assert(f:write_fixed(buf, off, n))
        off = off + n
    end
    buf:release()
    assert(f:fsync())
    f:close()
    return true
end

-- The buffer pool (--iodepth + 2 buffers of --bs) is registered at the
-- first acquire: when the kernel refuses it, say so here, in one line.
do
    local ok, err = pcall(function() reactor:acquire_buffer():release() end)
    if not ok then
        fail(tostring(err):gsub("^[^:]*:%d+: ", "", 1) .. " (with --bs " .. o.bs .. " and --iodepth " ..
             o.iodepth .. ")")
    end
end

-- (--rw rw reads as well: its reads need the data there, or they would
-- read nothing past the end of a shorter file)
if not writes or o.rw == "rw" or o.verify or temp then
    prepare()
end

local open = o.direct and uring.DmaFile.open or uring.File.open
-- (a write test makes a --file that is not there yet, as the C loop does)
local f, err = open(path, not writes and "r" or uring.statx(path) and "r+" or "w+")
if not f then fail(err) end

local hist = bench.Histogram.new()
local progress = bench.progress("uring_bench " .. o.rw, o.quiet)
local started, done_ops, done_bytes, writes_since_sync = pluvio.now(), 0, 0, 0
local deadline = o.runtime > 0 and started + o.runtime or math.huge
local bad_blocks, checked_blocks = 0, 0
local series, last_t, last_bytes = {}, started, 0

local claimed = 0      -- operations handed out so far (all tasks)
local over = false     -- --runtime has passed

-- Latencies are timed with stamps (bench.stamp: the TSC where the runtime
-- found one), which cost a third of a clock read.  The clock itself is
-- read every few milliseconds, when an operation's stamp passes
-- next_tick, for the deadline and the throughput samples.  (A check "every
-- N operations" or "when the clock is due" would be a branch taken now and
-- then: should LuaJIT record the loop on such an iteration, every other
-- iteration leaves the compiled loop there.  A stamp past a deadline is
-- false on every operation until the end.)
local TICK = 0.005
local next_tick = bench.stamp_after(TICK)

local first_error     -- the first worker's failure: the others stop at their next claim

-- The next operation's block, or nil when the run is over.
local function claim()
    if first_error then
        return nil
    elseif o.runtime > 0 then
        if over then return nil end
    elseif claimed >= total_ops then
        return nil
    end
    claimed = claimed + 1
    if random then
        return math.random(0, nblocks - 1)
    end
    return (claimed - 1) % nblocks
end

-- A finished operation: count it, check a read with --verify, fsync every
-- --fsync-every writes.
local function finished(is_write, off, buf, expect, data)
    done_ops = done_ops + 1
    done_bytes = done_bytes + o.bs
    if o.verify and not is_write then
        expect:fill_pattern(o.seed, off, o.bs)
        local good
        if buf then
            good = buf:checksum(o.bs) == expect:checksum(o.bs)
        else
            good = data == expect:tostring(o.bs)
        end
        checked_blocks = checked_blocks + 1
        if not good then bad_blocks = bad_blocks + 1 end
    end
    if is_write and o.fsync_every > 0 then
        writes_since_sync = writes_since_sync + 1
        if writes_since_sync >= o.fsync_every then
            writes_since_sync = 0
            assert(f:fsync())
        end
    end
end

-- An operation's stamp passed next_tick: check the deadline, sample the
-- throughput.
local function tick()
    local t = pluvio.now()
    over = t >= deadline
    next_tick = bench.stamp_after(TICK)
    if t - last_t >= 0.1 then
        series[#series + 1] = { t - started, (done_bytes - last_bytes) / (t - last_t) / 1048576 }
        last_t, last_bytes = t, done_bytes
        progress:update(("%s ops, %.0f MiB/s"):format(bench.human(done_ops),
                                                      done_bytes / (t - started) / 1048576))
    end
end

-- An operation that moved fewer bytes than --bs (a read at or past the end
-- of the file gives 0, which is true in Lua) is an error, as in the C loop:
-- counted as a whole block it would report I/O that never happened.
local function check_count(is_write, off, n)
    if n ~= o.bs then
        return ("%s at offset %d moved %d bytes, not %d (is the file shorter than --size?)")
               :format(is_write and "write" or "read", off, n, o.bs)
    end
end

-- A worker that fails records why and returns, and the others stop at
-- their next claim: one error line, not one (and a traceback) per worker
-- that then meets the same error.  (Not a pcall around the workers: their
-- loops ran 20 % slower inside one.)
local function failed(e)
    first_error = first_error or e
end

local function next_is_write()
    return writes and (o.rw ~= "rw" or math.random() < 0.5)
end

-- Each worker task keeps one operation in flight.
local function worker(id)
    math.randomseed(o.seed * 1000 + id)
    local buf = o.fixed and reactor:acquire_buffer() or nil
    local expect = (o.verify or (writes and not o.fixed)) and reactor:acquire_buffer() or nil
    -- With --verify every write writes the pattern of its offset; without,
    -- the worker writes one patterned block as it is, as fio and the C loop
    -- do (making 1 MiB of pattern per write cost more than the write)
    local block_data
    if writes and not o.verify then
        if buf then
            buf:fill_pattern(o.seed, 0, o.bs)
        else
            block_data = expect:fill_pattern(o.seed, 0, o.bs):tostring(o.bs)
        end
    end
    local t = bench.stamp()
    while true do
        local block = claim()
        if not block then break end
        local off = block * o.bs
        local is_write = next_is_write()
        local ok, e
        if is_write then
            if buf then
                if o.verify then buf:fill_pattern(o.seed, off, o.bs) end
                ok, e = f:write_fixed(buf, off, o.bs)
            else
                ok, e = f:write(off, block_data or expect:fill_pattern(o.seed, off, o.bs):tostring(o.bs))
            end
        elseif buf then
            ok, e = f:read_fixed(buf, off, o.bs)
        else
            ok, e = f:read(off, o.bs)
        end
        if not ok then failed(e) break end
        local bad = check_count(is_write, off, type(ok) == "string" and #ok or ok)
        if bad then failed(bad) break end
        t = hist:record_stamp(t)
        finished(is_write, off, buf, expect, ok)
        if t >= next_tick then tick() end
    end
    if buf then buf:release() end
    if expect then expect:release() end
end

-- --queue: one task keeps iodepth operations in flight on an I/O queue, a
-- registered buffer each; the tag of an operation is its buffer's number.
local function queue_worker()
    math.randomseed(o.seed * 1000 + 1)
    local q = reactor:io_queue()
    local expect = o.verify and reactor:acquire_buffer() or nil
    local bufs, starts, offs, is_writes = {}, {}, {}, {}
    local function start(i, now)
        local block = claim()
        if not block then return end
        local off, is_write, buf = block * o.bs, next_is_write(), bufs[i]
        local ok, e
        if is_write then
            if o.verify then buf:fill_pattern(o.seed, off, o.bs) end
            ok, e = q:write_fixed(f, buf, off, o.bs, i)
        else
            ok, e = q:read_fixed(f, buf, off, o.bs, i)
        end
        if not ok then error(e, 0) end
        starts[i], offs[i], is_writes[i] = now, off, is_write
    end
    local t = bench.stamp()
    for i = 1, o.iodepth do
        bufs[i] = reactor:acquire_buffer()
        if writes and not o.verify then bufs[i]:fill_pattern(o.seed, 0, o.bs) end
        start(i, t)
    end
    while q:pending() > 0 do
        local i, n, e = q:wait()
        if not n then error(e, 0) end
        local bad = check_count(is_writes[i], offs[i], n)
        if bad then error(bad, 0) end
        t = hist:record_stamp(starts[i])
        finished(is_writes[i], offs[i], bufs[i], expect, nil)
        if t >= next_tick then tick() end
        start(i, t)
    end
    q:close()
    for i = 1, o.iodepth do bufs[i]:release() end
    if expect then expect:release() end
end

-- --gc-check: with the collector stopped, the Lua heap grows by all the
-- garbage the run makes; the tasks' setup is a fixed part of that, so
-- two runs of different lengths tell the part per operation.
local heap0
if o.gc_check then
    collectgarbage()
    collectgarbage("stop")
    heap0 = collectgarbage("count")
end
local s0 = reactor:stats()
local cpu0 = bench.cpu_time()
local tasks = {}
if o.queue then
    tasks[1] = pluvio.spawn_named("io-queue", queue_worker)
else
    for i = 1, o.iodepth do
        tasks[i] = pluvio.spawn_named("io-" .. i, worker, i)
    end
end
for i = 1, #tasks do
    local ok, e = tasks[i]:join()
    if ok == nil and e then fail(tostring(e), 1) end
end
if first_error then
    fail(tostring(first_error), 1)
end
local elapsed = pluvio.now() - started
local cpu = bench.cpu_time() - cpu0
local s1 = reactor:stats()
local heap1 = heap0 and collectgarbage("count")
if heap0 then
    collectgarbage("restart")
end
progress:done()

-- --verify after writing: read every block back and check it.
if o.verify and writes then
    local verifier = pluvio.spawn(function()
        local buf, expect = reactor:acquire_buffer(), reactor:acquire_buffer()
        -- only blocks written in this run carry the pattern for sure
        for b = 0, nblocks - 1 do
            local off = b * o.bs
            assert(f:read_fixed(buf, off, o.bs))
            expect:fill_pattern(o.seed, off, o.bs)
            checked_blocks = checked_blocks + 1
            if buf:checksum(o.bs) ~= expect:checksum(o.bs) then bad_blocks = bad_blocks + 1 end
        end
        buf:release(); expect:release()
    end)
    verifier:join()
end
f:close()
if temp then uring.unlink(path) end

local enters = s1.enters - s0.enters
local lat = hist:summary()
local result = {
    rw = o.rw, bs = o.bs, iodepth = o.iodepth, direct = o.direct, fixed = o.fixed, queue = o.queue,
    ops = done_ops, bytes = done_bytes, seconds = elapsed,
    iops = done_ops / elapsed, mib_s = done_bytes / elapsed / 1048576,
    lat_us = { min = lat.min * 1e6, mean = lat.mean * 1e6, p50 = lat.p50 * 1e6, p90 = lat.p90 * 1e6,
               p99 = lat.p99 * 1e6, p99_9 = lat.p99_9 * 1e6, max = lat.max * 1e6 },
    io_uring_enters = enters, ops_per_enter = enters > 0 and done_ops / enters or done_ops,
    cpu_seconds = cpu, cpu_percent = cpu / elapsed * 100,
    verify = o.verify and { checked = checked_blocks, bad = bad_blocks } or nil,
    lua_heap = heap0 and { grown_kib = heap1 - heap0, bytes_per_op = (heap1 - heap0) * 1024 / done_ops } or nil,
}

local report = o.json == "-" and io.stderr or io.stdout    -- stdout holds only the JSON then
report:write(("uring_bench: %s bs=%s iodepth=%d%s%s%s, %s ops in %.2f s\n"):format(o.rw, bench.bytes(o.bs),
    o.iodepth, o.direct and " direct" or "", o.fixed and " fixed" or "", o.queue and " queue" or "",
    bench.human(done_ops), elapsed))
report:write(("  %-14s %12s\n"):format("IOPS", bench.human(result.iops)))
report:write(("  %-14s %12.1f\n"):format("MiB/s", result.mib_s))
for _, k in ipairs({ "min", "p50", "p90", "p99", "p99_9", "max" }) do
    report:write(("  %-14s %12s\n"):format("lat " .. k:gsub("_", "."), bench.human(result.lat_us[k] / 1e6, "s")))
end
report:write(("  %-14s %12.1f\n"):format("ops/enter", result.ops_per_enter))
report:write(("  %-14s %12s  (%.0f%% of one core)\n"):format("CPU", bench.human(cpu, "s"), result.cpu_percent))
if result.lua_heap then
    report:write(("  %-14s %10.2f B  (the heap grew %.1f KiB, collector stopped)\n"):format("Lua heap/op",
        result.lua_heap.bytes_per_op, result.lua_heap.grown_kib))
end
if result.verify then
    report:write(("  %-14s %12s\n"):format("verify", ("%d blocks, %d bad"):format(checked_blocks, bad_blocks)))
end
if o.json then
    bench.write_json(o.json, result)
end
if o.plot then
    assert(bench.svg(o.plot, { title = "uring_bench " .. o.rw, histogram = hist, series = series,
                               series_label = "MiB/s" }))
end
if bad_blocks > 0 then
    io.stderr:write(("uring_bench: verify failed: %d of %d blocks differ\n"):format(bad_blocks, checked_blocks))
    os.exit(1)
end
