-- I/O queues: one task with many reads and writes in flight, completions
-- taken as they finish.
local pluvio = require "pluvio"
local uring = require "pluvio.uring"
local helper = require "helper"
local ffi = require "ffi"

local async = helper.async
local tmpfile, with_reactor = helper.tmp_path, helper.with_reactor

-- Random distinct block numbers 0..n-1.
local function shuffled(n, seed)
    local order = {}
    for i = 1, n do order[i] = i - 1 end
    math.randomseed(seed)
    for i = n, 2, -1 do
        local j = math.random(i)
        order[i], order[j] = order[j], order[i]
    end
    return order
end

-- Keep up to depth ops in flight on q, one per buffer: start(buf, i) starts
-- the i-th (1..n); done(tag, n, err) sees each completion.
local function pump(q, bufs, n, start, done)
    local started = 0
    for _, buf in ipairs(bufs) do
        if started == n then break end
        started = started + 1
        assert.is_true(start(buf, started))
    end
    while q:pending() > 0 do
        local buf, res, err = q:wait()
        done(buf, res, err)
        if started < n then
            started = started + 1
            assert.is_true(start(buf, started))
        end
    end
end

describe("IoQueue", function()
    for _, kind in ipairs({ "File", "DmaFile" }) do
        local cls = uring[kind]
        it(kind .. ": 128 patterned writes and reads in flight at random offsets keep data intact", function()
            with_reactor({ buffer_count = 130, buffer_size = 4096, queue_size = 64, submit_depth = 16 }, function(r)
                local path = tmpfile()
                local f = assert(cls.open(path, "w+"))
                local bs, nblocks, bufs = 4096, 1024, {}
                for i = 1, 128 do bufs[i] = r:acquire_buffer() end
                local q = r:io_queue()
                local order = shuffled(nblocks, 7)
                local at = {}   -- buffer -> block it carries
                pump(q, bufs, nblocks, function(buf, i)
                    local b = order[i]
                    at[buf] = b
                    buf:fill_pattern(5, b * bs, bs)
                    return q:write_fixed(f, buf, b * bs, bs)
                end, function(_, n, err)
                    assert.equal(bs, n, err)
                end)
                assert.is_true(r:stats().in_flight_max >= 128)
                -- read back in another order, each buffer checked on arrival
                local expect = r:acquire_buffer()
                local bad, seen = 0, 0
                order = shuffled(nblocks, 8)
                pump(q, bufs, nblocks, function(buf, i)
                    at[buf] = order[i]
                    buf:fill(0)
                    return q:read_fixed(f, buf, order[i] * bs, bs)
                end, function(buf, n, err)
                    assert.equal(bs, n, err)
                    expect:fill_pattern(5, at[buf] * bs, bs)
                    if buf:checksum(bs) ~= expect:checksum(bs) then bad = bad + 1 end
                    seen = seen + 1
                end)
                assert.equal(0, bad)
                assert.equal(nblocks, seen)
                q:close()
                f:close()
                uring.unlink(path)
            end)
        end)
    end

    it("gives each op's tag back (by default its buffer) with the bytes, and counts pending ops", async(function()
        local path = tmpfile()
        local fh = io.open(path, "wb")
        fh:write(("a"):rep(4096) .. ("b"):rep(4096) .. ("c"):rep(100))
        fh:close()
        local f = assert(uring.File.open(path, "r"))
        local q = uring.io_queue()
        local b1, b2, b3 = uring.acquire_buffer(), uring.acquire_buffer(), uring.acquire_buffer()
        assert.equal(0, q:pending())
        assert.is_true(q:read_fixed(f, b1, 0, 4096, "first"))
        assert.is_true(q:read_fixed(f, b2, 4096, 4096))
        assert.is_true(q:read_fixed(f, b3, 8192, 4096, { id = 3 }))
        assert.equal(3, q:pending())
        local got = {}
        for _ = 1, 3 do
            local tag, n = q:wait()
            got[tag == b2 and "b2" or type(tag) == "table" and tag.id or tag] = n
        end
        -- the last block is short: its count, not an error
        assert.same({ first = 4096, b2 = 4096, [3] = 100 }, got)
        assert.equal(0, q:pending())
        assert.equal(("a"):rep(4096), b1:tostring(4096))
        assert.equal(("b"):rep(4096), b2:tostring(4096))
        assert.equal(("c"):rep(100), b3:tostring(100))
        -- at end of file a read gives 0
        assert.is_true(q:read_fixed(f, b1, 8192 + 100, 4096))
        assert.same({ b1, 0 }, { q:wait() })
        -- a NULL pointer is a tag of its own (it compares equal to nil, which stands for the buffer)
        local null = ffi.cast("void *", 0)
        assert.is_true(q:read_fixed(f, b1, 0, 16, null))
        local tag, n = q:wait()
        assert.equal(16, n)
        assert.equal("cdata", type(tag))
        q:close()
        f:close()
        uring.unlink(path)
    end))

    it("hands completions over in the order they finish, not the order they started", function()
        with_reactor(nil, function(r)
            local fds = ffi.new("int[2]")
            assert.equal(0, helper.libc.pipe(fds))
            local pipe = uring.File.new(fds[0], "pipe")
            local path = tmpfile()
            local f = assert(uring.File.open(path, "w+"))
            local q = r:io_queue()
            local pb, fb = r:acquire_buffer(), r:acquire_buffer()
            assert.is_true(q:read_fixed(pipe, pb, 0, 5, "pipe"))    -- waits for the writer
            fb:fill(7)
            assert.is_true(q:write_fixed(f, fb, 0, 4096, "file"))
            assert.same({ "file", 4096 }, { q:wait() })
            local writer = pluvio.spawn(function()
                pluvio.sleep(0.01)
                helper.libc.write(fds[1], "hello", 5)
            end)
            assert.same({ "pipe", 5 }, { q:wait() })    -- parked until the write
            assert.equal("hello", pb:tostring(5))
            writer:join()
            helper.libc.close(fds[1])
            pipe:close()
            f:close()
            uring.unlink(path)
        end)
    end)

    it("reports a failed op with its tag and the operation, path and errno", async(function()
        local path = tmpfile()
        local fh = io.open(path, "wb")
        fh:write(("x"):rep(8192))
        fh:close()
        local f = assert(uring.File.open(path, "r"))       -- read-only: writes fail
        local q = uring.io_queue()
        local b1, b2 = uring.acquire_buffer(), uring.acquire_buffer()
        assert.is_true(q:write_fixed(f, b1, 0, 4096, "w"))
        assert.is_true(q:read_fixed(f, b2, 4096, 4096, "r"))
        local results = {}
        for _ = 1, 2 do
            local tag, n, err, errname = q:wait()
            results[tag] = { n, err, errname }
        end
        assert.equal(4096, results.r[1])
        assert.is_nil(results.w[1])
        assert.equal("write " .. path .. " (offset 0, 4096 bytes): EBADF: Bad file descriptor", results.w[2])
        assert.equal("EBADF", results.w[3])
        q:close()
        f:close()
        uring.unlink(path)
    end))

    it("batches: 128 reads started on a queue cost a handful of io_uring_enter calls", function()
        with_reactor({ buffer_count = 128, buffer_size = 4096, queue_size = 256, submit_depth = 128 }, function(r)
            local path = tmpfile()
            local fh = io.open(path, "wb")
            fh:write(("z"):rep(128 * 4096))
            fh:close()
            local f = assert(uring.File.open(path, "r"))
            local q = r:io_queue()
            local bufs = {}
            for i = 1, 128 do bufs[i] = r:acquire_buffer() end
            pluvio.yield()
            local before = r:stats()
            for i = 1, 128 do assert.is_true(q:read_fixed(f, bufs[i], (i - 1) * 4096, 4096)) end
            for _ = 1, 128 do
                local _, n = q:wait()
                assert.equal(4096, n)
            end
            local after = r:stats()
            assert.equal(128, after.sqes - before.sqes)
            assert.is_true(after.enters - before.enters <= 4,
                           ("%d io_uring_enter calls"):format(after.enters - before.enters))
            q:close()
            f:close()
            uring.unlink(path)
        end)
    end)

    it("cancels what is in flight on close, and keeps the buffers out of the pool until the kernel lets go", function()
        with_reactor({ buffer_count = 2, buffer_size = 4096 }, function(r)
            local fds = ffi.new("int[2]")
            assert.equal(0, helper.libc.pipe(fds))
            local pipe = uring.File.new(fds[0], "pipe")
            local q = r:io_queue()
            local b1, b2 = r:acquire_buffer(), r:acquire_buffer()
            assert.is_true(q:read_fixed(pipe, b1, 0, 10))
            assert.is_true(q:read_fixed(pipe, b2, 0, 10))
            pluvio.sleep(0.005)
            assert.equal(2, r:stats().in_flight)
            b1:release()                        -- the kernel still has it
            assert.equal(2, q:close())          -- two cancelled
            assert.equal(0, q:pending())
            local again = r:acquire_buffer()    -- parks until a cancel completes
            assert.equal(0, r:stats().in_flight)
            assert.is_true(r:stats().cancels >= 2)
            again:release()
            b2:release()
            helper.libc.close(fds[1])
            pipe:close()
        end)
    end)

    it("closes with its task: a killed task's reads are cancelled in the kernel", function()
        with_reactor(nil, function(r)
            local fds = ffi.new("int[2]")
            assert.equal(0, helper.libc.pipe(fds))
            local pipe = uring.File.new(fds[0], "pipe")
            local reader = pluvio.spawn(function()
                local q = r:io_queue()
                for _ = 1, 3 do q:read_fixed(pipe, r:acquire_buffer(), 0, 10) end
                return q:wait()
            end)
            pluvio.sleep(0.01)
            assert.equal("waiting", reader:status())
            assert.equal(3, r:stats().in_flight)
            reader:kill()
            pluvio.sleep(0.01)
            local s = r:stats()
            assert.equal(0, s.in_flight)
            assert.equal(3, s.cancels)
            assert.equal(r:options().buffer_count, s.buffers_free)
            -- a task that returns with reads in flight has them cancelled too
            local quitter = pluvio.spawn(function()
                local q = r:io_queue()
                q:read_fixed(pipe, r:acquire_buffer(), 0, 10)
                return q:pending()
            end)
            assert.equal(1, quitter:join())
            pluvio.sleep(0.01)
            assert.equal(0, r:stats().in_flight)
            helper.libc.close(fds[1])
            pipe:close()
        end)
    end)

    it("is freed by the collector once its long-lived task drops it idle, never with an op pending", function()
        -- the task held every queue it made until it ended: a server task
        -- making a queue per request kept each (Lua objects, a C slot)
        with_reactor(nil, function(r)
            local fds = ffi.new("int[2]")
            assert.equal(0, helper.libc.pipe(fds))
            local pipe = uring.File.new(fds[0], "pipe")
            local path = tmpfile()
            local f = assert(uring.File.open(path, "w+"))
            local buf = r:acquire_buffer()
            local seen = setmetatable({}, { __mode = "k" })
            local most = -1
            for _ = 1, 100 do
                local q = r:io_queue()
                assert.is_true(q:write_fixed(f, buf, 0, 4096))
                assert.equal(buf, (q:wait()))
                seen[q], most = "idle", math.max(most, q.id)
            end
            local busy = r:io_queue()
            assert.is_true(busy:read_fixed(pipe, r:acquire_buffer(), 0, 5, "pending"))
            seen[busy] = "busy"
            busy = nil                  -- only its task refers to it now
            jit.flush()                 -- (a trace may hold the last queue)
            collectgarbage(); collectgarbage()
            local left = {}
            for q, what in pairs(seen) do left[what] = q end
            assert.is_nil(left.idle)    -- collected
            busy = assert(left.busy)    -- kept by its task: its read goes on
            helper.libc.write(fds[1], "hello", 5)
            assert.same({ "pending", 5 }, { busy:wait(5) })
            assert.is_true(r:io_queue().id < most)     -- (internal) a freed slot, not a new one
            busy:close(); f:close(); pipe:close()
            helper.libc.close(fds[1])
            os.remove(path)
        end)
    end)

    it("continues a short read until the length asked, and waits with a timeout", function()
        with_reactor(nil, function(r)
            local fds = ffi.new("int[2]")
            assert.equal(0, helper.libc.pipe(fds))
            local pipe = uring.File.new(fds[0], "pipe")
            local q = r:io_queue()
            local buf = r:acquire_buffer()
            assert.is_true(q:read_fixed(pipe, buf, 0, 10, "ten"))
            local t0 = pluvio.now()
            assert.same({ nil, "timeout" }, { q:wait(0.02) })
            assert.is_true(pluvio.now() - t0 >= 0.02)
            helper.libc.write(fds[1], "hello", 5)
            assert.same({ nil, "timeout" }, { q:wait(0.01) })     -- 5 of 10: still in flight
            helper.libc.write(fds[1], "world", 5)
            assert.same({ "ten", 10 }, { q:wait(1) })
            assert.equal("helloworld", buf:tostring(10))
            assert.is_true(r:stats().resubmits >= 1)
            assert.error_matches(function() q:wait(-1) end,
                "IoQueue:wait: seconds must be a finite number from 0 to 1e9 %(got %-1%)")
            assert.has_error(function() q:wait(ffi.cast("void *", 0)) end,   -- (it compares equal to nil)
                "IoQueue:wait: seconds must be a finite number from 0 to 1e9 (got cdata<void *>: NULL)")
            q:close()
            helper.libc.close(fds[1])
            pipe:close()
        end)
    end)

    it("wakes its task only while it waits on the queue, not out of another wait", function()
        with_reactor(nil, function(r)
            local fds = ffi.new("int[2]")
            assert.equal(0, helper.libc.pipe(fds))
            local pipe = uring.File.new(fds[0], "pipe")
            local q = r:io_queue()
            assert.is_true(q:read_fixed(pipe, r:acquire_buffer(), 0, 5, "p"))
            assert.same({ nil, "timeout" }, { q:wait(0.001) })     -- it waited on the queue before
            local me, woken_by_helper = pluvio.current(), false
            pluvio.spawn(function()
                pluvio.sleep(0.01)
                helper.libc.write(fds[1], "hello", 5)     -- the queue's read completes
                pluvio.sleep(0.03)
                woken_by_helper = true
                me:wake()
            end)
            pluvio.suspend("the helper")
            assert.is_true(woken_by_helper)
            assert.same({ "p", 5 }, { q:wait() })
            q:close()
            helper.libc.close(fds[1])
            pipe:close()
        end)
    end)

    it("refuses to wait from a plain coroutine inside its task, and keeps working", function()
        with_reactor(nil, function(r)
            local fds = ffi.new("int[2]")
            assert.equal(0, helper.libc.pipe(fds))
            local pipe = uring.File.new(fds[0], "pipe")
            local q = r:io_queue()
            assert.is_true(q:read_fixed(pipe, r:acquire_buffer(), 0, 3, "p"))
            local co = coroutine.create(function() return q:wait() end)
            local ok, err = coroutine.resume(co)
            assert.is_false(ok)
            assert.matches("IoQueue:wait: called from a coroutine that is not a pluvio task", err)
            helper.libc.write(fds[1], "abc", 3)
            assert.same({ "p", 3 }, { q:wait() })
            -- starting an operation there is fine: it does not wait
            local buf = r:acquire_buffer()
            co = coroutine.create(function() return q:read_fixed(pipe, buf, 0, 2, "c") end)
            assert.same({ true, true }, { coroutine.resume(co) })
            assert.equal(1, q:pending())
            helper.libc.write(fds[1], "de", 2)
            assert.same({ "c", 2 }, { q:wait() })
            q:close()
            helper.libc.close(fds[1])
            pipe:close()
        end)
    end)

    it("drops finished ops nobody took on close, and many queues live side by side", function()
        with_reactor({ buffer_count = 4, buffer_size = 4096 }, function(r)
            local path = tmpfile()
            local f = assert(uring.File.open(path, "w+"))
            local buf = r:acquire_buffer()
            buf:fill(1)
            assert(f:write_fixed(buf, 0, 4096))
            local queues = {}
            for i = 1, 20 do                -- more than the first allocation of queue slots
                queues[i] = r:io_queue()
                assert.is_true(queues[i]:read_fixed(f, buf, 0, 4096, i))
            end
            for i = 20, 1, -1 do
                assert.same({ i, 4096 }, { queues[i]:wait() })
            end
            for i = 1, 20 do
                assert.is_true(queues[i]:read_fixed(f, buf, 0, 4096, i))
            end
            -- the reads are done, nobody takes them (a time would not do: on
            -- tmpfs io_uring's worker threads do them, when they get a CPU)
            local deadline = pluvio.now() + 10
            while r:stats().in_flight > 0 and pluvio.now() < deadline do pluvio.sleep(0.001) end
            for i = 1, 20, 2 do
                assert.equal(0, queues[i]:close())      -- nothing was in flight any more
            end
            local again = r:io_queue()      -- reuses a closed slot
            assert.is_true(again:read_fixed(f, buf, 0, 4096, "again"))
            assert.same({ "again", 4096 }, { again:wait() })
            for i = 2, 20, 2 do
                assert.same({ i, 4096 }, { queues[i]:wait() })
                queues[i]:close()
            end
            again:close()
            assert.equal(0, r:stats().in_flight)
            f:close()
            uring.unlink(path)
        end)
    end)

    it("describes what its task waits on", function()
        with_reactor(nil, function(r, rt)
            local fds = ffi.new("int[2]")
            assert.equal(0, helper.libc.pipe(fds))
            local pipe = uring.File.new(fds[0], "pipe")
            local reader = pluvio.spawn_named("queue-reader", function()
                local q = r:io_queue()
                q:read_fixed(pipe, r:acquire_buffer(), 0, 10)
                q:read_fixed(pipe, r:acquire_buffer(), 0, 10)
                return q:wait()
            end)
            pluvio.sleep(0.01)
            local waits
            for _, e in ipairs(rt:tasks()) do
                if e.name == "queue-reader" then waits = e.waits_on end
            end
            assert.equal("an I/O queue (2 pending)", waits)
            reader:kill()
            helper.libc.close(fds[1])
            pipe:close()
        end)
    end)

    it("rejects bad arguments and misuse with clear errors", function()
        with_reactor(nil, function(r)
            local path = tmpfile()
            local f = assert(uring.File.open(path, "w+"))
            local d = assert(uring.DmaFile.open(path .. ".d", "w+"))
            local q = r:io_queue()
            local buf = r:acquire_buffer()
            assert.error_matches(function() q:wait() end,
                "IoQueue:wait: nothing is in flight on this queue %(start a read or write first%)")
            assert.error_matches(function() q:read_fixed("f", buf, 0) end,
                "IoQueue:read_fixed: file must be a File or DmaFile %(got \"f\"%)")
            assert.error_matches(function() q:write_fixed(f, "buf", 0) end,
                "IoQueue:write_fixed: buf must be a registered buffer %(got string%)")
            assert.error_matches(function() q:read_fixed(f, buf, -1) end,
                "IoQueue:read_fixed: offset must be an integer from 0 to 2%^62 %(got %-1%)")
            assert.error_matches(function() q:read_fixed(f, buf, 0, buf:size() + 1) end,
                "IoQueue:read_fixed: len must be an integer from 0 to")
            assert.error_matches(function() q:read_fixed(d, buf, 100, 4096) end,
                "IoQueue:read_fixed: O_DIRECT offset 100 is not a multiple of")
            assert.error_matches(function() q.read_fixed(nil, f, buf, 0) end,
                "IoQueue:read_fixed: call it as a method on an I/O queue %(q:read_fixed%(...%)%); got nil as self")
            assert.has_error(function() q.describe() end,
                "IoQueue:describe: call it as a method on an I/O queue (q:describe(...)); got nil as self")
            -- another reactor's file or buffer
            local other = uring.reactor { buffer_count = 1, buffer_size = 4096 }
            f.reactor = other
            assert.error_matches(function() q:read_fixed(f, buf, 0) end,
                "IoQueue:read_fixed: the file belongs to another io_uring reactor than the queue")
            f.reactor, buf.reactor = r, other
            assert.error_matches(function() q:read_fixed(f, buf, 0) end,
                "IoQueue:read_fixed: the buffer belongs to another io_uring reactor")
            buf.reactor = r
            -- only the task that made the queue uses it
            local ok, err = pluvio.spawn(function() return q:read_fixed(f, buf, 0) end):join()
            assert.is_nil(ok)
            assert.matches("IoQueue:read_fixed: the I/O queue belongs to .*, not to ", tostring(err))
            local released = r:acquire_buffer()
            released:release()
            assert.error_matches(function() q:read_fixed(f, released, 0) end,
                "IoQueue:read_fixed: the buffer was released")
            assert.equal(0, q:close())
            assert.error_matches(function() q:read_fixed(f, buf, 0) end,
                "IoQueue:read_fixed: the I/O queue is closed")
            assert.error_matches(function() q:wait() end, "IoQueue:wait: the I/O queue is closed")
            assert.is_false(q:close())          -- closing twice: false, as every close
            assert.equal(0, q:pending())
            f:close()
            assert.error_matches(function() r:io_queue():read_fixed(f, buf, 0) end,
                "IoQueue:read_fixed: the file is closed")
            d:close()
            uring.unlink(path)
            uring.unlink(path .. ".d")
        end)
        assert.error_matches(function() uring.io_queue() end, "uring.io_queue: not inside a pluvio task")
    end)

    it("makes no Lua garbage per read and completion", async(function()
        -- on a file system whose page-cache reads finish inside the submit:
        -- on tmpfs io_uring's worker threads finish them when they get a
        -- CPU, each run takes other paths through the loop, and the traces
        -- the JIT compiles for those (on the Lua heap) varied from 5 to 31
        -- KiB a run under load
        local path = helper.disk_file_with("")
        if not path then
            pending(helper.NO_DISK_DIR)
            return
        end
        local f = assert(uring.File.open(path, "w+"))
        local q = uring.io_queue()
        local bufs = {}
        for i = 1, 8 do
            bufs[i] = uring.acquire_buffer()
            bufs[i]:fill(i)
            assert(f:write_fixed(bufs[i], (i - 1) * 4096, 4096))
        end
        local function run(n)
            for i = 1, 8 do q:read_fixed(f, bufs[i], (i - 1) * 4096, 4096, i) end
            for _ = 1, n do
                local i = q:wait()
                q:read_fixed(f, bufs[i], (i - 1) * 4096, 4096, i)
            end
            for _ = 1, 8 do q:wait() end
        end
        run(2000)       -- warm up: JIT traces, the queue's arrays
        local least = math.huge
        for _ = 1, 5 do
            collectgarbage()
            collectgarbage()
            collectgarbage("stop")
            local before = collectgarbage("count")
            run(20000)
            least = math.min(least, collectgarbage("count") - before)
            collectgarbage("restart")
        end
        assert.is_true(least < 8, ("the Lua heap grew %.1f KiB"):format(least))
        q:close()
        f:close()
        uring.unlink(path)
    end))
end)
