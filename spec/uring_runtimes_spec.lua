-- One io_uring reactor registered on several runtimes, run one after the
-- other: it serves the runtime that runs, but is not taken from tasks a
-- run left parked on its operations or buffers (their completions would
-- wake them in the wrong runtime: a false deadlock when theirs ran again).
local pluvio = require "pluvio"
local uring = require "pluvio.uring"
local helper = require "helper"
local ffi = require "ffi"

local libc = helper.libc
local format = string.format

local function pipe()
    local fds = ffi.new("int[2]")
    assert(libc.pipe(fds) == 0)
    return fds[0], fds[1]
end

-- A block_on of rt that returns with a task named "reader" parked on a
-- 4-byte read of a pipe: that task, the pipe's file and its write end.
local function left_reader(rt)
    local rfd, wfd = pipe()
    local f
    local reader = rt:block_on(function()
        f = uring.File.new(rfd, "pipe")
        local t = pluvio.spawn_named("reader", function() return f:read(0, 4) end)
        pluvio.yield()
        return t
    end)
    return reader, f, wfd
end

-- The refusal's text after "<fname>: ...: ", for waits on what (task: the
-- first waiting task, as tostring shows it).
local function busy(what, task)
    return format("this io_uring reactor is registered on another runtime, whose tasks still wait on %s, " ..
                  "%s first (they were left parked when its run ended, and only it can wake them): run " ..
                  "that runtime until they are done, or kill those tasks first", what, task)
end

local function register_refusal(name, what, task)
    return format("Runtime:register_reactor: cannot register %q: %s", name, busy(what, task))
end

-- pcall(fn, ...) must fail with exactly msg.
local function fails_with(msg, fn, ...)
    local ok, err = pcall(fn, ...)
    assert.is_false(ok)
    assert.equal(msg, err)
end

describe("an io_uring reactor registered on two runtimes", function()
    it("is not taken by the second while a task the first left parked waits on its read", function()
        -- the second runtime's loop reaped the read and woke a task slot
        -- of its own: the reader was never woken, and the first runtime's
        -- next run reported a deadlock
        local r = uring.reactor { buffer_count = 0 }
        local a, b = pluvio.Runtime.new(), pluvio.Runtime.new()
        a:register_reactor("io_uring", r)
        local reader, f, wfd = left_reader(a)
        fails_with(register_refusal("io_uring", "1 of its operations", tostring(reader)),
                   b.register_reactor, b, "io_uring", r)
        assert.is_nil(b:reactor("io_uring"))
        assert.equal(4, libc.write(wfd, "data", 4))
        assert.equal("data", a:block_on(function() return reader:join() end))
        -- done: the second may have it now, with the pipe
        b:register_reactor("io_uring", r)
        assert.equal(4, libc.write(wfd, "more", 4))
        assert.equal("more", b:run(function() return f:read(0, 4) end))
        assert.is_true(b:run(function() return f:close() end))
        libc.close(wfd)
    end)

    it("is not taken back by the first while a task the second left parked waits on its read", function()
        local r = uring.reactor { buffer_count = 0 }
        local a, b = pluvio.Runtime.new(), pluvio.Runtime.new()
        a:register_reactor("io_uring", r)
        assert.is_true(a:run(function() return true end))
        b:register_reactor("io_uring", r)        -- nothing waits in a: it moves
        local reader, f, wfd = left_reader(b)
        local msg = 'Runtime:block_on: cannot run: its reactor "io_uring": ' .. busy("1 of its operations",
                                                                                     tostring(reader))
        fails_with(msg, a.block_on, a, function() return "ran" end)
        fails_with(msg:gsub("^Runtime:block_on", "Runtime:run"), a.run, a, function() return "ran" end)
        assert.equal(4, libc.write(wfd, "data", 4))
        assert.equal("data", b:block_on(function() return reader:join() end))
        assert.equal("ran", a:block_on(function() return "ran" end))
        assert.is_true(a:run(function() return f:close() end))
        libc.close(wfd)
    end)

    it("is taken once the parked task is killed: its cancelled read wakes nobody", function()
        local r = uring.reactor { buffer_count = 0 }
        local a, b = pluvio.Runtime.new(), pluvio.Runtime.new()
        a:register_reactor("io_uring", r)
        local reader, f, wfd = left_reader(a)
        assert.is_true(reader:kill())
        b:register_reactor("io_uring", r)
        local left = b:run(function()
            -- the read's cancel goes out with this run's first flush, and
            -- its completion, reaped here, frees the op
            for _ = 1, 1000 do
                if r:stats().in_flight == 0 then break end
                pluvio.sleep(0.001)
            end
            return r:stats().in_flight
        end)
        assert.equal(0, left)
        assert.equal(4, libc.write(wfd, "data", 4))
        assert.equal("data", b:run(function() return f:read(0, 4) end))
        assert.is_true(b:run(function() return f:close() end))
        libc.close(wfd)
    end)

    it("is not taken while a task the first left parked waits for one of its registered buffers", function()
        local r = uring.reactor { buffer_count = 1, buffer_size = 4096 }
        local a, b = pluvio.Runtime.new(), pluvio.Runtime.new()
        a:register_reactor("io_uring", r)
        local holder, waiter = a:block_on(function()
            local h = pluvio.spawn(function()
                local buf = r:acquire_buffer()
                pluvio.suspend()
                buf:release()
            end)
            pluvio.yield()                      -- h holds the only buffer
            local w = pluvio.spawn_named("waiter", function()
                local buf = r:acquire_buffer()
                buf:release()
                return "got it"
            end)
            pluvio.yield()
            return h, w
        end)
        fails_with(register_refusal("io_uring", "1 of its registered buffers", tostring(waiter)),
                   b.register_reactor, b, "io_uring", r)
        assert.equal("got it", a:block_on(function()
            holder:wake()
            return waiter:join()
        end))
        -- a buffer handed to a waiter that has not run since: also its
        waiter = a:block_on(function()
            local buf = r:acquire_buffer()
            local w = pluvio.spawn_named("waiter", function()
                local got = r:acquire_buffer()
                got:release()
                return "got it"
            end)
            pluvio.yield()                      -- w waits for the buffer
            buf:release()                       -- handed to w, which runs after this run's end
            return w
        end)
        assert.are_not.equal("done", waiter:status())
        fails_with(register_refusal("io_uring", "1 of its registered buffers", tostring(waiter)),
                   b.register_reactor, b, "io_uring", r)
        assert.equal("got it", a:block_on(function() return waiter:join() end))
        assert.is_true(b:register_reactor("io_uring", r))
    end)

    it("hands a buffer acquired in the first, released in the second, to the second's waiter", function()
        -- (the release woke the waiter in the first runtime, which failed:
        -- the waiter waited for good, a deadlock)
        local r = uring.reactor { buffer_count = 1, buffer_size = 4096 }
        local a, b = pluvio.Runtime.new(), pluvio.Runtime.new()
        a:register_reactor("io_uring", r)
        local kept = a:run(function()
            local buf = r:acquire_buffer()
            buf:detach()                            -- outlives the run
            return buf
        end)
        assert.is_true(b:register_reactor("io_uring", r))
        assert.equal("got it", b:run(function()
            local waiter = pluvio.spawn(function()
                local got = r:acquire_buffer()
                got:release()
                return "got it"
            end)
            pluvio.yield()                          -- waiter waits: the pool is empty
            assert.is_true(kept:release())
            return pluvio.timeout(5, function() return waiter:join() end)
        end))
        assert.equal(1, r:stats().buffers_free)
    end)

    it("is not taken while an I/O queue's task the first left parked waits on the queue's reads", function()
        local r = uring.reactor { buffer_count = 2, buffer_size = 4096 }
        local a, b = pluvio.Runtime.new(), pluvio.Runtime.new()
        a:register_reactor("io_uring", r)
        local rfd, wfd = pipe()
        local f
        local owner = a:block_on(function()
            f = uring.File.new(rfd, "pipe")
            local t = pluvio.spawn_named("queue owner", function()
                local q = r:io_queue()
                local bufs = { r:acquire_buffer(), r:acquire_buffer() }
                assert(q:read_fixed(f, bufs[1], 0, 4, 1))
                assert(q:read_fixed(f, bufs[2], 0, 4, 2))
                local got = {}
                for i = 1, 2 do
                    local tag, n = q:wait()
                    got[i] = tag .. ":" .. bufs[tag]:tostring(n)
                end
                table.sort(got)
                return table.concat(got, " ")
            end)
            pluvio.yield()
            return t
        end)
        fails_with(register_refusal("io_uring", "2 of its operations", tostring(owner)),
                   b.register_reactor, b, "io_uring", r)
        assert.equal(4, libc.write(wfd, "abcd", 4))
        assert.equal(4, libc.write(wfd, "efgh", 4))
        local got = a:block_on(function() return owner:join() end)
        assert.is_true(got == "1:abcd 2:efgh" or got == "1:efgh 2:abcd", got)
        assert.is_true(b:register_reactor("io_uring", r))
        assert.is_true(b:run(function() return f:close() end))
        libc.close(wfd)
    end)
end)
