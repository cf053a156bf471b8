-- Submission and completion on the io_uring reactor: batching per
-- io_uring_enter, reads the kernel finishes inside the submit, a full
-- submission queue (and the rests of short transfers that wait for room),
-- cancellation of killed tasks' operations, plain coroutines inside tasks.
local pluvio = require "pluvio"
local uring = require "pluvio.uring"
local helper = require "helper"
local uh = require "uring_helpers"
local ffi = require "ffi"

local tmpfile, with_reactor = helper.tmp_path, helper.with_reactor
local file_with, disk_file_with = uh.file_with, uh.disk_file_with

-- The C source of a stand-in for liburing's io_uring_submit (for
-- helper.preload_shim): it fails with rc, a C expression ("-EAGAIN",
-- "-EBUSY"), as the kernel does, while the script's
-- ffi.C.pl_test_fail_submits is not 0, and submits otherwise; so does
-- the wait of an SQPOLL ring's submitter for room (io_uring_sqring_wait).
-- While that is 2, so does the sleep's io_uring_submit_and_wait_timeout.
local function failing_submit(rc)
    return [[
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
struct io_uring;
struct io_uring_cqe;
struct __kernel_timespec;
int pl_test_fail_submits;
static void *real_fn(const char *name)
{
    void *lib = dlopen("liburing.so.2", RTLD_LAZY | RTLD_NOLOAD);

    return lib ? dlsym(lib, name) : 0;
}
int io_uring_submit(struct io_uring *ring)
{
    int (*real)(struct io_uring *) = (int (*)(struct io_uring *))real_fn("io_uring_submit");

    if (!real)
        return -ENOSYS;
    return pl_test_fail_submits ? ]] .. rc .. [[ : real(ring);
}
typedef int wait_fn(struct io_uring *, struct io_uring_cqe **, unsigned, struct __kernel_timespec *, void *);
int io_uring_submit_and_wait_timeout(struct io_uring *ring, struct io_uring_cqe **cqe, unsigned n,
                                     struct __kernel_timespec *ts, void *sig)
{
    wait_fn *real = (wait_fn *)real_fn("io_uring_submit_and_wait_timeout");

    if (!real)
        return -ENOSYS;
    return pl_test_fail_submits > 1 ? ]] .. rc .. [[ : real(ring, cqe, n, ts, sig);
}
int __io_uring_sqring_wait(struct io_uring *ring)
{
    int (*real)(struct io_uring *) = (int (*)(struct io_uring *))real_fn("__io_uring_sqring_wait");

    if (!real)
        return -ENOSYS;
    return pl_test_fail_submits ? ]] .. rc .. [[ : real(ring);
}
]]
end

-- Run body (Lua source of a function's body) as the main task of a
-- runtime rt whose io_uring reactor r has a queue of two, in a subprocess
-- where io_uring_submit fails with rc while ffi.C.pl_test_fail_submits is
-- set; it has pipe, read, write and alarm declared, and a table `shared`
-- for body and after.  extra (optional): reactor, the reactor's options
-- (Lua source of a table); call, how the body's function is run (Lua
-- source up to the function: "rt:run(" by default); after, Lua source run
-- once that returned.  Returns what the run's results (and
-- after) printed.
local function run_with_failing_submits(rc, body, extra)
    extra = extra or {}
    local env, remove_shim = helper.preload_shim(failing_submit(rc))
    local status, out, err = helper.run_script([[
        local pluvio = require "pluvio"
        local uring = require "pluvio.uring"
        local ffi = require "ffi"
        ffi.cdef[[int pipe(int fds[2]); long write(int fd, const void *buf, size_t n);
                  long read(int fd, void *buf, size_t n); unsigned alarm(unsigned s);
                  int pl_test_fail_submits;]] .. "]]" .. [[
        local rt = pluvio.Runtime.new()
        local r = uring.reactor ]] .. (extra.reactor or "{ queue_size = 2, submit_depth = 64 }") .. [[
        local shared = {}
        rt:register_reactor("io_uring_reactor", r)
        print(]] .. (extra.call or "rt:run(") .. [[function()
]] .. body .. [[
        end))
]] .. (extra.after or "") .. [[
    ]], nil, env)
    remove_shim()
    assert.equal(0, status, err)
    return out
end

describe("submission and completion", function()
    it("batches: 128 tasks each issuing one read cost a handful of io_uring_enter calls", function()
        local path = file_with(("b"):rep(128 * 4096))
        with_reactor({ queue_size = 256, submit_depth = 256 }, function(r)
            local f = assert(uring.File.open(path, "r"))
            local before = r:stats()
            local tasks = {}
            for i = 1, 128 do
                tasks[i] = pluvio.spawn(function() return #f:read((i - 1) * 4096, 4096) end)
            end
            for i = 1, 128 do assert.equal(4096, tasks[i]:join()) end
            local after = r:stats()
            assert.equal(128, after.sqes - before.sqes)
            assert.is_true(after.enters - before.enters <= 4, "enters " .. (after.enters - before.enters))
            f:close()
        end)
        os.remove(path)
    end)

    it("keeps whole batches per io_uring_enter when the kernel finishes reads inside the submit", function()
        local path = disk_file_with(("c"):rep(64 * 4096))
        if not path then return end
        local tasks_n, reads = 32, 60
        with_reactor({ submit_depth = tasks_n, buffer_count = tasks_n, buffer_size = 4096 }, function(r)
            local f = assert(uring.File.open(path, "r"))
            assert.equal(4096, #f:read(0, 4096))
            local before = r:stats()
            local tasks = {}
            for i = 1, tasks_n do
                tasks[i] = pluvio.spawn(function()
                    local buf = f:acquire_buffer()
                    for k = 1, reads do
                        assert.equal(4096, f:read_fixed(buf, ((i + k) % 64) * 4096))
                    end
                    buf:release()
                end)
            end
            for i = 1, tasks_n do tasks[i]:join() end
            local after = r:stats()
            local sqes, enters = after.sqes - before.sqes, after.enters - before.enters
            assert.equal(tasks_n * reads, sqes)
            -- page-cache reads complete inside the submit: the tasks they
            -- wake must not split into two groups that submit by turns
            assert.is_true(sqes / enters >= tasks_n * 0.8,
                           ("%d SQEs in %d enters (%.1f per enter)"):format(sqes, enters, sqes / enters))
            f:close()
        end)
        os.remove(path)
    end)

    it("submits while the runtime cannot sleep (a Lua reactor to busy-poll) and nothing is ready", function()
        local rt = pluvio.Runtime.new()
        local r = uring.reactor()
        rt:register_reactor("io_uring_reactor", r)
        local gate = { polls = 0 }
        function gate.status() return gate.waiter and "pending" or "idle" end
        function gate.poll()
            gate.polls = gate.polls + 1
            if gate.open and gate.waiter then
                local w = gate.waiter
                gate.waiter = nil
                w:wake()
                return 1
            end
            if gate.polls > 200000 then error("the read was never submitted: sqes " .. r:stats().sqes, 0) end
            return 0
        end
        rt:register_reactor("gate", gate)
        rt:run(function()
            local reader = pluvio.spawn(function()
                local f = assert(uring.File.open("/etc/hostname", "r"))
                local s = assert(f:read(0, 16))
                f:close()
                gate.open = true
                return s
            end)
            gate.waiter = pluvio.current()
            while not gate.open do pluvio.suspend("gate") end
            assert.is_true(#reader:join() > 0)
        end)
    end)

    it("submits what a poll queued (the rest of a short read) while the runtime busy-polls", function()
        local path = file_with("short")
        local rt = pluvio.Runtime.new()
        rt:register_reactor("io_uring_reactor", uring.reactor())
        rt:set_spin(2)
        rt:run(function()
            local f = assert(uring.File.open(path, "r"))
            local t0 = pluvio.now()
            for _ = 1, 3 do assert.equal("short", f:read(0, 4096)) end   -- each resubmits the rest
            -- unsubmitted, each read waited for the 2 s spin to end
            assert.is_true(pluvio.now() - t0 < 1, ("3 reads took %.3f s"):format(pluvio.now() - t0))
            f:close()
        end)
        os.remove(path)
    end)

    it("takes a read the kernel finished inside its submit without parking, but lets timers run", function()
        local blocks = {}
        for i = 0, 15 do blocks[#blocks + 1] = string.char(65 + i):rep(4096) end
        local path = disk_file_with(table.concat(blocks))
        if not path then return end
        with_reactor({ submit_depth = 1, buffer_count = 1, buffer_size = 4096 }, function(r, rt)
            local f = assert(uring.File.open(path, "r"))
            local buf = f:acquire_buffer()
            assert.equal(4096, f:read_fixed(buf, 0))     -- the file is in the page cache now
            local woke, finished
            local sleeper = pluvio.spawn(function()
                pluvio.sleep(0.001)
                woke = pluvio.now()
            end)
            local resumes = rt:stats().resumes
            local n = 5000
            for i = 1, n do
                local block = i % 16
                assert.equal(4096, f:read_fixed(buf, block * 4096))
                assert.equal(string.char(65 + block):rep(64), buf:tostring(64))
            end
            finished = pluvio.now()
            local parked = rt:stats().resumes - resumes
            sleeper:join()
            -- most reads skipped the park; 1 in 17 parks so the sleeper is not starved
            assert.is_true(parked < n / 4, ("%d of %d reads parked"):format(parked, n))
            assert.is_true(parked >= n / 20, ("only %d of %d reads parked"):format(parked, n))
            assert.is_true(woke < finished, "the sleeper woke only after the reads")
            buf:release()
            f:close()
        end)
        os.remove(path)
    end)

    it("counts one completion per operation in stats, batched or finished inside the submit", function()
        local path = file_with(("p"):rep(16 * 4096))
        for _, depth in ipairs({ 64, 1 }) do
            with_reactor({ submit_depth = depth, buffer_count = 1, buffer_size = 4096 }, function(r)
                local f = assert(uring.File.open(path, "r+"))
                local buf = f:acquire_buffer()
                local before = r:stats()
                for i = 0, 9 do assert.equal(4096, f:write_fixed(buf, i * 4096)) end
                for i = 0, 9 do assert.equal(4096, f:read_fixed(buf, i * 4096)) end
                for i = 0, 4 do assert.equal(100, #f:read(i * 4096, 100)) end
                assert.is_true(f:fsync())
                assert.is_table(f:statx())
                local tasks = {}                -- and 16 at once
                for i = 1, 16 do tasks[i] = pluvio.spawn(function() return #f:read((i - 1) * 4096, 10) end) end
                for i = 1, 16 do assert.equal(10, tasks[i]:join()) end
                local after = r:stats()
                assert.equal(10 + 10 + 5 + 1 + 1 + 16, after.completions - before.completions)
                assert.equal(after.sqes - before.sqes, after.completions - before.completions)
                assert.equal(0, after.in_flight)
                buf:release()
                assert.is_true(f:close())
                assert.equal(44, r:stats().completions - before.completions)
            end)
        end
        os.remove(path)
    end)

    -- (completions past a full CQ wait in the kernel's overflow list until
    -- an io_uring_enter asks for them: with another reactor pending, the
    -- runtime watched the ring's fd, which the overflow kept readable, and
    -- spun without fetching them)
    it("fetches completions that overflowed the CQ while another reactor is pending", function()
        -- (in a script of its own: the reads of a regression never end, and
        -- the script's watchdog exits)
        local status, out, err = helper.run_script([[
            local uring, ucx = require "pluvio.uring", require "pluvio.ucx"
            local rt = pluvio.Runtime.new()
            local r = uring.reactor { queue_size = 1, submit_depth = 32768, wait_submit_timeout = 60 }
            rt:register_reactor("io_uring", r)
            rt:run(function()
                local ctx = assert(ucx.Context.new())
                local w = assert(ctx:create_worker())
                local ur = ucx.UCXReactor.current()
                rt:register_reactor("ucx", ur)
                ur:register_worker(w)
                local l = assert(w:create_listener("127.0.0.1", 0))    -- a connection: the worker is pending
                local a = pluvio.spawn(function() return l:accept() end)
                local ep = assert(w:connect_socket("127.0.0.1", l:port()))
                local sep = assert(a:join())
                local f = assert(uring.File.open("/dev/zero", "r"))
                local tasks, n = {}, 0
                for i = 1, 12 do         -- 12 completions for a CQ of 4 entries
                    tasks[i] = pluvio.spawn(function() return #assert(f:read(0, 1)) end)
                end
                local ticks0 = rt:stats().ticks
                local watchdog = pluvio.spawn(function()
                    pluvio.sleep(3)
                    print(("stuck: %d of 12 reads done, %d ticks"):format(n, rt:stats().ticks - ticks0))
                    os.exit(1)
                end)
                for i = 1, 12 do tasks[i]:join(); n = n + 1 end
                watchdog:kill()
                print(n, rt:stats().ticks - ticks0 < 1000)     -- (it spun: millions of ticks)
                f:close(); ep:close(); sep:close(); l:close(); w:close(); ctx:close()
            end)
        ]])
        assert.equal(0, status, out .. err)
        assert.equal("12\ttrue\n", out)
    end)

    -- (the C API took up to 4 GiB; an op's result is an int32, and a 3 GiB
    -- write, continued past the kernel's 2 GiB cap, came back negative, as
    -- an error.  Lua's calls stop at 2 GiB - 4 KiB before C sees them.)
    it("refuses, in C, a transfer longer than its int32 result can report", function()
        with_reactor({ buffer_count = 0 }, function(r)
            local C = require("pluvio.core").C
            local t = pluvio.current()
            local mem = ffi.new("char[1]")
            assert.equal(-22, C.pl_uring_write(r.u, t.slot, t.gen, 1, mem, 3 * 2 ^ 30, 0, -1))
            assert.equal(-22, C.pl_uring_read(r.u, t.slot, t.gen, 0, mem, 2 ^ 31, 0, -1))
            assert.equal(0, r:stats().in_flight)
        end)
    end)

    it("completes a lone read without paying wait_complete_timeout", function()
        with_reactor({ wait_complete_timeout = 5, wait_submit_timeout = 5 }, function()
            local f = assert(uring.File.open("/etc/hostname"))
            local t0 = pluvio.now()
            for _ = 1, 20 do f:read(0, 16) end
            assert.is_true(pluvio.now() - t0 < 1)
            f:close()
        end)
    end)

    it("cancels a read in the kernel when its task is killed", function()
        with_reactor(nil, function(r)
            local fds = ffi.new("int[2]")
            assert.equal(0, helper.libc.pipe(fds))
            local f = uring.File.new(fds[0], "pipe")
            local reader = pluvio.spawn(function() return f:read(0, 10) end)
            pluvio.sleep(0.01)
            assert.equal("waiting", reader:status())
            assert.equal(1, r:stats().in_flight)
            reader:kill()
            pluvio.sleep(0.01)
            local s = r:stats()
            assert.equal(1, s.cancels)
            assert.equal(0, s.in_flight)
            -- the pipe still works for the next reader
            local again = pluvio.spawn(function() return f:read(0, 5) end)
            pluvio.yield()
            helper.libc.write(fds[1], "hello", 5)
            assert.equal("hello", again:join())
            helper.libc.close(fds[1])
            f:close()
        end)
    end)

    it("says the submission queue was full and names queue_size when the kernel refuses the early submit",
       function()
        -- a third read finds the queue of two full; the early submit that
        -- would free its entries fails with EBUSY (a preloaded stand-in, as
        -- the kernel does): the read failed with a bare "EBUSY: Device or
        -- resource busy", which named neither the queue nor the option
        local out = run_with_failing_submits("-EBUSY", [[
                local fds = ffi.new("int[2]")
                assert(ffi.C.pipe(fds) == 0)
                local p = uring.File.new(fds[0], "pipe a")
                ffi.C.pl_test_fail_submits = 1
                local readers = {}
                for i = 1, 3 do readers[i] = pluvio.spawn(function() return p:read(0, 1) end) end
                pluvio.yield()                      -- they run: two SQEs, then none
                ffi.C.pl_test_fail_submits = 0
                ffi.C.write(fds[1], "xy", 2)
                assert(readers[1]:join() and readers[2]:join())
                return readers[3]:join()
        ]])
        assert.equal("nil\tread pipe a (offset 0, 1 bytes): EBUSY: the io_uring submission queue was full and the kernel refused " ..
                     "to take more entries for now (a bigger queue_size of the reactor makes room)\tEBUSY\t0\n", out)
    end)

    -- The start of a body for run_with_failing_submits: `reader` (start:
    -- Lua source that makes it; by default a task) reads 10 bytes of pipe a
    -- (pa; a[1] its write end), which gives 3 ("abc"); the rest finds the
    -- queue of two full with the reads of pipe b by `others` and the early
    -- submit refused (a preloaded stand-in, as the kernel does with EBUSY).
    -- Submits still fail; finish_others() ends those reads.
    local function rest_refused(start)
        return [[
                local a, b = ffi.new("int[2]"), ffi.new("int[2]")
                assert(ffi.C.pipe(a) == 0 and ffi.C.pipe(b) == 0)
                local pa, pb = uring.File.new(a[0], "pipe a"), uring.File.new(b[0], "pipe b")
                ]] .. (start or "local reader = pluvio.spawn(function() return pa:read(0, 10) end)") .. [[

                pluvio.sleep(0.01)                  -- its read is in the kernel
                ffi.C.pl_test_fail_submits = 1
                local others = { pluvio.spawn(function() return pb:read(0, 1) end),
                                 pluvio.spawn(function() return pb:read(0, 1) end) }
                pluvio.yield()                      -- their SQEs fill the queue; the flush fails
                ffi.C.write(a[1], "abc", 3)         -- the read ends short
                pluvio.yield()                      -- reaped: no SQE for the rest
                pluvio.yield()                      -- (nor at the next flush)
                local function finish_others()
                    ffi.C.pl_test_fail_submits = 0
                    ffi.C.write(b[1], "xy", 2)
                    for _, t in ipairs(others) do assert(t:join()) end
                end
]]
    end

    it("completes a short read whose rest found the submission queue full once the kernel takes entries again",
       function()
        -- the read of 10 bytes got 3; its continuation found no SQE and the
        -- early submit refused: the read failed with EBUSY and the 3 bytes,
        -- for a refusal that passes
        local out = run_with_failing_submits("-EBUSY", rest_refused() .. [[
                local waiting = reader:status()
                ffi.C.write(a[1], "defghij", 7)
                ffi.C.pl_test_fail_submits = 0     -- the next flush sends the rest
                local got = { reader:join() }
                finish_others()
                return waiting, #got, got[1], r:stats().in_flight, r:stats().resubmits
        ]])
        assert.equal("waiting\t1\tabcdefghij\t0\t1\n", out)
    end)

    it("completes a short write whose rest found the submission queue full once the kernel takes entries again",
       function()
        -- a pipe takes 65536 bytes at a time: the write of 200000 came back
        -- short, and its rest, short again, found no SQE for what was left
        local out = run_with_failing_submits("-EAGAIN", [[
                local a, b = ffi.new("int[2]"), ffi.new("int[2]")
                assert(ffi.C.pipe(a) == 0 and ffi.C.pipe(b) == 0)
                local w, pb = uring.File.new(a[1], "pipe a"), uring.File.new(b[0], "pipe b")
                local data = ("0123456789abcdef"):rep(12500)
                local writer = pluvio.spawn(function() return w:write(0, data) end)
                pluvio.sleep(0.01)                  -- 65536 went; the rest waits in the kernel
                ffi.C.pl_test_fail_submits = 1
                local others = { pluvio.spawn(function() return pb:read(0, 1) end),
                                 pluvio.spawn(function() return pb:read(0, 1) end) }
                pluvio.yield()                      -- their SQEs fill the queue; the flush fails
                local buf = ffi.new("char[65536]")
                local got = { ffi.string(buf, ffi.C.read(a[0], buf, 65536)) }   -- room for 65536 more
                pluvio.yield()                      -- reaped: no SQE for the rest
                pluvio.yield()                      -- (nor at the next flush)
                local waiting = writer:status()
                ffi.C.pl_test_fail_submits = 0
                local drain = pluvio.spawn(function()
                    local pr, n = uring.File.new(a[0], "pipe a's reading end"), #got[1]
                    while n < #data do
                        got[#got + 1] = assert(pr:read(0, math.min(65536, #data - n)))
                        n = n + #got[#got]
                    end
                end)
                local res = { writer:join() }
                drain:join()
                ffi.C.write(b[1], "xy", 2)
                for _, t in ipairs(others) do t:join() end
                return waiting, res[1], res[2], table.concat(got) == data, r:stats().in_flight
        ]])
        assert.equal("waiting\t200000\tnil\ttrue\t0\n", out)
    end)

    -- A body for run_with_failing_submits: the reads of three pipes end
    -- short ("abc" of 10 bytes) while the queue of two is full with the
    -- reads by `others` and the kernel refuses submits, so that their rests
    -- wait for SQEs; then it takes entries again, and before any tick's
    -- flush the main task writes a byte to a fourth pipe.  Returns the
    -- reads reaped short, the three reads' results and the write's.
    local rests_before_a_write = [[
                local fds, readers = {}, {}
                for k = 1, 3 do
                    local p = ffi.new("int[2]")
                    assert(ffi.C.pipe(p) == 0)
                    local f = uring.File.new(p[0], "pipe " .. k)
                    fds[k], readers[k] = p, pluvio.spawn(function() return f:read(0, 10) end)
                end
                local b, w = ffi.new("int[2]"), ffi.new("int[2]")
                assert(ffi.C.pipe(b) == 0 and ffi.C.pipe(w) == 0)
                local pb, pw = uring.File.new(b[0], "pipe b"), uring.File.new(w[1], "pipe w")
                pluvio.sleep(0.05)                  -- their reads are in the kernel
                ffi.C.pl_test_fail_submits = 1
                local others = { pluvio.spawn(function() return pb:read(0, 1) end),
                                 pluvio.spawn(function() return pb:read(0, 1) end) }
                pluvio.yield()                      -- their SQEs fill the queue; the flush fails
                local done = r:stats().completions
                for k = 1, 3 do ffi.C.write(fds[k][1], "abc", 3) end    -- the reads end short
                local deadline = pluvio.now() + 5   -- (SQPOLL: its thread completes them)
                while r:stats().completions < done + 3 and pluvio.now() < deadline do
                    pluvio.yield()                  -- reaped: no SQE for the rests
                end
                local short = r:stats().completions - done
                for k = 1, 3 do ffi.C.write(fds[k][1], "defghij", 7) end
                ffi.C.pl_test_fail_submits = 0
                ffi.C.alarm(20)                     -- (a hang fails here, not at the script limit)
                local wrote = { n = 3, pw:write(0, "z") }
                local got = {}
                for k = 1, 3 do got[k] = readers[k]:join() end
                ffi.C.alarm(0)
                ffi.C.write(b[1], "xy", 2)
                for _, t in ipairs(others) do assert(t:join()) end
                return short, table.concat(got, " "), unpack(wrote, 1, wrote.n)
]]

    it("starts an operation once the kernel takes entries again, after the rests that waited for an SQE",
       function()
        -- the write's early submit, taken, freed two SQEs, which two of
        -- the rests took: it failed with EBUSY ("the kernel refused") with
        -- the third rest still waiting, rather than submit again
        local out = run_with_failing_submits("-EBUSY", rests_before_a_write)
        assert.equal("3\tabcdefghij abcdefghij abcdefghij\t1\tnil\tnil\n", out)
    end)

    it("with SQPOLL, hands the kernel thread the rests put in the SQEs it freed before waiting for more room",
       function()
        -- (its wait for room failed while the rests were deferred): those
        -- put in the two SQEs the thread freed were never handed to it, so
        -- that its wait for room returned at once, again and again
        local out = run_with_failing_submits("-EBUSY", rests_before_a_write,
                                             { reactor = "{ queue_size = 2, submit_depth = 64, sqpoll = true }" })
        assert.equal("3\tabcdefghij abcdefghij abcdefghij\t1\tnil\tnil\n", out)
    end)

    it("sends a rest that waits for an SQE once the queue has room, though no completion comes to end the sleep",
       function()
        -- wait_complete_timeout 0: the sleep, whose submit made room (it is
        -- not refused in this stand-in), waited for a completion that never
        -- came, with the rest still waiting for its turn (alarm: a hang
        -- fails here, not at the script limit)
        local out = run_with_failing_submits("-EAGAIN", rest_refused() .. [[
                ffi.C.write(a[1], "defghij", 7)
                ffi.C.alarm(20)
                local got = reader:join()
                ffi.C.alarm(0)
                finish_others()
                return got, r:stats().in_flight
        ]], { reactor = "{ queue_size = 2, submit_depth = 64, wait_complete_timeout = 0 }" })
        assert.equal("abcdefghij\t0\n", out)
    end)

    it("fails the run rather than hang when the kernel refuses for good while a rest waits for an SQE", function()
        -- (the sleeps refused too: wait_complete_timeout bounds each, so
        -- they go through io_uring_submit_and_wait_timeout)
        local out = run_with_failing_submits("-EBUSY", rest_refused() .. [[
                ffi.C.pl_test_fail_submits = 2
                ffi.C.write(a[1], "defghij", 7)
                shared.reader = reader
                return reader:join()
        ]], { call = "pcall(rt.run, rt, ", after = "print(shared.reader:status(), r:stats().in_flight, r:stats().sqes)" })
        -- (the reader waited to the end: it did not fail on its own; the
        -- kernel took one SQE, the read's, though each refused sleep
        -- counted the others' two as submitted)
        assert.equal("false\tthe runtime cannot wait: EBUSY: Device or resource busy\ncancelled\t0\t1\n", out)
    end)

    it("ends a killed task's transfer whose rest waits for an SQE at once, with its buffer, and never sends the rest",
       function()
        local out = run_with_failing_submits("-EBUSY", rest_refused([[
                local reader = pluvio.spawn(function() return pa:read_fixed(uring.acquire_buffer(), 0, 10) end)]]) .. [[
                local waiting, free = reader:status(), r:stats().buffers_free
                reader:kill()
                local s = r:stats()                 -- (the queue is still refused)
                ffi.C.write(a[1], "defghij", 7)
                ffi.C.pl_test_fail_submits = 0
                local nxt = pluvio.timeout(5, function() return pa:read(0, 7) end)
                finish_others()
                return waiting, free, s.in_flight, s.buffers_free, nxt, r:stats().in_flight
        ]])
        assert.equal("waiting\t15\t2\t16\tdefghij\t0\n", out)
    end)

    it("ends the read of a plain coroutine inside a task whose rest waits for an SQE when it is resumed", function()
        local out = run_with_failing_submits("-EBUSY", rest_refused([[
                local co = coroutine.create(function() return pa:read(0, 10) end)
                assert(coroutine.resume(co))        -- its read, the main task's now]]) .. [[
                local before = r:stats().in_flight
                local ok, err = coroutine.resume(co)
                local after = r:stats().in_flight   -- (the queue is still refused)
                ffi.C.write(a[1], "defghij", 7)
                ffi.C.pl_test_fail_submits = 0
                local nxt = pluvio.timeout(5, function() return pa:read(0, 7) end)
                finish_others()
                return before, ok, err:match("File:read: called from a coroutine that is not a pluvio task") ~= nil,
                       after, nxt, r:stats().in_flight
        ]])
        assert.equal("3\tfalse\ttrue\t2\tdefghij\t0\n", out)
    end)

    it("fails a read whose rest waits for an SQE with ECANCELED and the bytes done when another task closes its file",
       function()
        local out = run_with_failing_submits("-EBUSY", rest_refused() .. [[
                local waiting = reader:status()
                local refused = { pa:close() }      -- a new op: refused with the queue
                ffi.C.pl_test_fail_submits = 0
                local closed = pa:close()
                local res = { n = 5, reader:join() }
                finish_others()
                return waiting, refused[1], refused[3], closed, unpack(res, 1, res.n)
        ]])
        assert.equal("waiting\tnil\tEBUSY\ttrue\tnil\tread pipe a (offset 0, 10 bytes): ECANCELED: Operation " ..
                     "canceled (the file was closed) (3 bytes done before the error)\tECANCELED\t3\tabc\n", out)
    end)

    it("ends a read whose rest waits for an SQE when its reactor shuts down, and never sends the rest", function()
        -- block_on leaves the reader waiting; the reactor's shutdown then
        -- has nothing of its in the kernel to wait for
        local out = run_with_failing_submits("-EBUSY", rest_refused() .. [[
                shared.a = a
                return reader:status(), r:stats().in_flight
        ]], { call = "rt:block_on(", after = [[
        ffi.cdef("int fcntl(int fd, int cmd, ...);")
        local left = require("pluvio.core").C.pl_uring_shutdown(r.u, 5)
        rt, r = nil, nil                            -- luacheck: ignore
        collectgarbage()
        collectgarbage()
        ffi.C.pl_test_fail_submits = 0
        ffi.C.write(shared.a[1], "next", 4)
        ffi.C.fcntl(shared.a[0], 4, ffi.cast("int", 2048))     -- F_SETFL, O_NONBLOCK
        local buf = ffi.new("char[8]")
        local n = ffi.C.read(shared.a[0], buf, 8)
        print(left, n > 0 and ffi.string(buf, n) or n)
        ]] })
        assert.equal("waiting\t3\n0\tnext\n", out)
    end)

    it("leaves another task's read of a file running when the close that would cancel it is refused", function()
        -- a queue of four, three entries waiting: the close's cancel of
        -- the reader's read took the last, and the close itself found none
        -- (the kernel refused the submits).  The close failed with EBUSY,
        -- the file open, but its cancel went out later: the read ended
        -- with ECANCELED, on a file nobody closed
        local out = run_with_failing_submits("-EBUSY", [[
                local a, b = ffi.new("int[2]"), ffi.new("int[2]")
                assert(ffi.C.pipe(a) == 0 and ffi.C.pipe(b) == 0)
                local pa, pb = uring.File.new(a[0], "pipe a"), uring.File.new(b[0], "pipe b")
                local reader = pluvio.spawn(function() return pa:read(0, 4) end)
                pluvio.sleep(0.01)                  -- its read is in the kernel
                ffi.C.pl_test_fail_submits = 1
                local others = {}
                for k = 1, 3 do others[k] = pluvio.spawn(function() return pb:read(0, 1) end) end
                pluvio.yield()                      -- their SQEs wait; the flush fails
                local refused = { pa:close() }
                ffi.C.pl_test_fail_submits = 0
                pluvio.sleep(0.01)                  -- what waited goes out
                ffi.C.write(a[1], "next", 4)
                local got = { n = 3, reader:join() }
                ffi.C.write(b[1], "xyz", 3)
                for _, t in ipairs(others) do assert(t:join()) end
                return refused[1], refused[3], pa:close(), unpack(got, 1, got.n)
        ]], { reactor = "{ queue_size = 4, submit_depth = 64 }" })
        assert.equal("nil\tEBUSY\ttrue\tnext\tnil\tnil\n", out)
    end)

    it("sends a killed task's cancel later when the submission queue is full and the kernel refuses a submit",
       function()
        -- io_uring_submit made to fail (as the kernel does with EBUSY or
        -- EAGAIN) by a preloaded stand-in while two reads fill a queue of
        -- two: the cancel of the killed reader found no SQE.  It was given
        -- up, and the abandoned read ate the next bytes of the pipe.
        local out = run_with_failing_submits("-EAGAIN", [[
                local a, b = ffi.new("int[2]"), ffi.new("int[2]")
                assert(ffi.C.pipe(a) == 0 and ffi.C.pipe(b) == 0)
                local pa, pb = uring.File.new(a[0], "pipe a"), uring.File.new(b[0], "pipe b")
                local victim = pluvio.spawn(function() return pa:read(0, 10) end)
                pluvio.sleep(0.01)                  -- its read is in the kernel
                ffi.C.pl_test_fail_submits = 1
                local others = { pluvio.spawn(function() return pb:read(0, 1) end),
                                 pluvio.spawn(function() return pb:read(0, 1) end) }
                pluvio.yield()                      -- their SQEs fill the queue; the flush fails
                victim:kill()                       -- no SQE for the cancel
                ffi.C.pl_test_fail_submits = 0
                pluvio.sleep(0.01)                  -- the reads go out, and the cancel
                ffi.C.write(b[1], "xy", 2)
                for _, t in ipairs(others) do t:join() end
                ffi.C.write(a[1], "next", 4)
                local got = pluvio.timeout(2, function() return pa:read(0, 4) end)
                return got, r:stats().in_flight
        ]])
        assert.equal("next\t0\n", out)
    end)

    it("never submits the write of a task killed before the kernel took it, whose fd went to a socket", function()
        -- the writer's SQE waits for the tick's submit; killed, its File
        -- collected (closing the fd) and the number taken by a socket
        -- before that submit, the write went to the socket
        local status, out, err = helper.run_script([[
            local uring = require "pluvio.uring"
            local ffi = require "ffi"
            ffi.cdef[[int socketpair(int, int, int, int *); long recv(int, void *, size_t, int);]] .. "]]" .. [[
            local path = os.tmpname()
            local writer, fdno
            do
                local f = assert(uring.File.open(path, "w"))
                fdno = f.fd
                writer = pluvio.spawn(function() f:write(0, ("w"):rep(4096)) end)
            end
            pluvio.yield()
            writer:kill()
            collectgarbage(); collectgarbage()
            local sv = ffi.new("int[2]")
            assert(ffi.C.socketpair(1, 1, 0, sv) == 0)      -- AF_UNIX, SOCK_STREAM
            pluvio.sleep(0.01)
            local other = sv[0] == fdno and sv[1] or sv[0]
            print(sv[0] == fdno or sv[1] == fdno, ffi.C.recv(other, ffi.new("char[8192]"), 8192, 0x40) > 0)
            print(uring.statx(path).size)
            os.remove(path)
        ]])
        assert.equal(0, status, err)
        assert.equal("true\tfalse\n0\n", out)
    end)

    it("raises for I/O from a plain coroutine inside a task and cancels what it started", function()
        with_reactor(nil, function(r)
            local fds = ffi.new("int[2]")
            assert.equal(0, helper.libc.pipe(fds))
            local p = uring.File.new(fds[0], "pipe")
            local function settled()
                local deadline = pluvio.now() + 10
                while r:stats().in_flight > 0 and pluvio.now() < deadline do pluvio.sleep(0.001) end
                return r:stats().in_flight
            end
            -- resumed by the task's code, not the loop: the read is cancelled
            -- and the coroutine raises
            local co = coroutine.create(function() return p:read(0, 10) end)
            local ok, marker = coroutine.resume(co)
            assert.is_true(ok)
            assert.is_not_nil(marker)
            assert.equal(1, r:stats().in_flight)
            local ok2, err = coroutine.resume(co)
            assert.is_false(ok2)
            assert.matches("File:read: called from a coroutine that is not a pluvio task", err)
            assert.equal(0, settled())
            assert.equal(1, r:stats().cancels)
            -- never resumed: the task's next operation cancels it and says so
            local co2 = coroutine.create(function() return p:read(0, 10) end)
            assert.is_true((coroutine.resume(co2)))
            local path = tmpfile()
            local ok_open, err_open = pcall(uring.File.open, path, "w+")
            assert.is_false(ok_open)
            assert.matches("File:read: called from a coroutine that is not a pluvio task %(only pluvio " ..
                           "tasks may block%); its operation was cancelled when the task called File.open",
                           err_open)
            assert.equal(2, r:stats().cancels)
            local f = assert(uring.File.open(path, "w+"))
            assert.equal(4, f:write(0, "kept"))
            assert.equal("kept", f:read(0, 16))
            assert.equal(0, settled())
            local ok3, err3 = coroutine.resume(co2)
            assert.is_false(ok3)
            assert.matches("File:read: called from a coroutine that is not a pluvio task", err3)
            -- the task's own reads of the pipe still work
            local again = pluvio.spawn(function() return p:read(0, 5) end)
            pluvio.yield()
            helper.libc.write(fds[1], "hello", 5)
            assert.equal("hello", again:join())
            helper.libc.close(fds[1])
            p:close()
            f:close()
            os.remove(path)
        end)
    end)

    it("cancels only the plain coroutine's operation, though the task's next one has its op id", function()
        with_reactor(nil, function(r)
            local pf, qf = ffi.new("int[2]"), ffi.new("int[2]")
            assert.equal(0, helper.libc.pipe(pf))
            assert.equal(0, helper.libc.pipe(qf))
            local p = uring.File.new(pf[0], "p")
            local q = uring.File.new(qf[0], "q")
            local co
            local a = pluvio.spawn(function()
                co = coroutine.create(function() return p:read(0, 10) end)
                assert(coroutine.resume(co))        -- op X, left behind
                helper.libc.write(pf[1], "xxxxxxxxxx", 10)
                pluvio.sleep(0.02)                  -- X completes
                local ok = pcall(q.read, q, 0, 5)   -- cancels X and says so
                assert(not ok)
                return q:read(0, 5)                 -- op Y: X's slot again
            end)
            pluvio.sleep(0.05)
            assert.equal("waiting", a:status())
            local ok, err = coroutine.resume(co)    -- another task resumes X's coroutine
            assert.is_false(ok)
            assert.matches("File:read: called from a coroutine that is not a pluvio task", err)
            helper.libc.write(qf[1], "hello", 5)
            local deadline = pluvio.now() + 10
            while a:status() ~= "done" and pluvio.now() < deadline do pluvio.sleep(0.002) end
            assert.equal("done", a:status())        -- Y was not cancelled
            assert.equal("hello", a:join())
            for _, fd in ipairs({ pf[1], qf[1] }) do helper.libc.close(fd) end
            p:close()
            q:close()
        end)
    end)

    it("returns a cancelled read's buffer to the pool only after the kernel is done", function()
        with_reactor({ buffer_count = 1, buffer_size = 4096 }, function(r)
            local fds = ffi.new("int[2]")
            assert.equal(0, helper.libc.pipe(fds))
            local f = uring.File.new(fds[0], "pipe")
            local reader = pluvio.spawn(function()
                local b = r:acquire_buffer()
                return f:read_fixed(b, 0, 10)
            end)
            pluvio.sleep(0.005)
            reader:kill()
            local b = r:acquire_buffer()     -- parks until the cancel completes
            assert.equal(0, r:stats().in_flight)
            b:release()
            helper.libc.close(fds[1])
            f:close()
        end)
    end)
end)
