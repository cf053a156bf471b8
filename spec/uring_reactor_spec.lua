-- The io_uring reactor (pluvio.uring's IoUringReactor): its builder and
-- options, SQPOLL, registration on runtimes, and freeing it with what it
-- still has in flight.  Submission and completion: uring_submit_spec.lua.
local pluvio = require "pluvio"
local uring = require "pluvio.uring"
local helper = require "helper"
local uh = require "uring_helpers"
local ffi = require "ffi"
local bit = require "bit"

local tmpfile, with_reactor = helper.tmp_path, helper.with_reactor
local file_with, disk_file_with, libc_open = uh.file_with, uh.disk_file_with, uh.libc_open

-- libc calls around the reactor's back: its ring's fd, a raw client.
ffi.cdef [[
int fcntl(int fd, int cmd, ...);
int dup(int fd);
long read(int fd, void *buf, size_t n);
int connect(int fd, const void *addr, unsigned len);
int poll(void *fds, unsigned long n, int timeout);
]]
describe("IoUringReactor", function()
    it("builds from the seed's builder and from an options table", function()
        local r = uring.IoUringReactor.builder()
            :queue_size(2048):buffer_size(1048576):buffer_count(8):submit_depth(64)
            :wait_submit_timeout(0.1):wait_complete_timeout(0.15):build()
        local o = r:options()
        assert.equal(2048, o.queue_size)
        assert.equal(8, o.buffer_count)
        assert.equal(0.15, o.wait_complete_timeout)
        local r2 = uring.reactor { queue_size = 64, buffer_count = 2 }
        assert.equal(64, r2:options().queue_size)
        assert.equal(uring.DEFAULTS.buffer_size, r2:options().buffer_size)
    end)

    -- attach(other) while the reactor's runtime ran took the reactor from
    -- under it: its next file operation said "opened in another runtime";
    -- an I/O queue on a reactor of another runtime took ops whose
    -- completions that runtime reaped (a deadlock report).
    it("refuses attach(rt) and io_queue() while the reactor serves another runtime", function()
        local r = uring.reactor { buffer_count = 1, buffer_size = 4096 }
        local rt, other = pluvio.Runtime.new(), pluvio.Runtime.new()
        rt:register_reactor("io_uring", r)
        local unregistered = uring.reactor { buffer_count = 1, buffer_size = 4096 }
        assert.equal("ok", rt:run(function()
            local ok, err = pcall(r.attach, r, other)
            assert.is_false(ok)
            assert.matches("IoUringReactor:attach: this io_uring reactor is registered on another runtime, " ..
                           "which is running", err, 1, true)
            local f = assert(uring.File.open("/etc/hostname"))     -- still this runtime's
            assert.is_string(f:read(0, 1))
            f:close()
            local q = r:io_queue()          -- its own reactor: fine
            q:close()
            return "ok"
        end))
        other:register_reactor("io_uring", uring.reactor { buffer_count = 1, buffer_size = 4096 })
        assert.equal("ok", other:run(function()
            for _, which in ipairs({ { r, "another runtime" }, { unregistered, "no runtime" } }) do
                local ok, err = pcall(which[1].io_queue, which[1])
                assert.is_false(ok)
                assert.matches("IoUringReactor:io_queue: the reactor is registered on " .. which[2] ..
                               " (a queue's operations complete in the runtime the reactor is registered on: " ..
                               "use uring.io_queue() for this one's)", err, 1, true)
            end
            return "ok"
        end))
    end)

    -- attach(rt) with a table that was no runtime handed C a NULL runtime:
    -- the reactor was silently detached from its own, and the next file
    -- operation said the file "was opened in another runtime"; c_reactor
    -- with a wrong self gave a NULL vtable.
    it("raises at attach(rt) without a runtime, and at c_reactor() and attach without a reactor as self", function()
        local r = uring.reactor { buffer_count = 1, buffer_size = 4096 }
        for _, bad in ipairs({ {}, 5 }) do
            assert.has_error(function() r:attach(bad) end,
                             ("IoUringReactor:attach: rt must be a runtime (got %s)"):format(type(bad)))
            assert.has_error(function() r.attach(bad, pluvio.Runtime.new()) end,
                ("IoUringReactor:attach: call it as a method on an io_uring reactor (obj:attach(...)); got %s as self")
                    :format(type(bad)))
            assert.has_error(function() r.c_reactor(bad) end,
                ("IoUringReactor:c_reactor: call it as a method on an io_uring reactor (obj:c_reactor(...)); got %s as self")
                    :format(type(bad)))
        end
        local rt = pluvio.Runtime.new()
        rt:register_reactor("io_uring", r)
        assert.equal("ok", rt:run(function()
            local f = assert(uring.File.open("/etc/hostname"))
            assert.is_string(f:read(0, 1))
            f:close()
            return "ok"
        end))
    end)

    it("takes changed uring.DEFAULTS for later reactors, checked as options are", function()
        local saved = uring.DEFAULTS.queue_size
        finally(function() uring.DEFAULTS.queue_size = saved end)
        uring.DEFAULTS.queue_size = 32
        assert.equal(32, uring.reactor():options().queue_size)
        for _, bad in ipairs({ 0, "x" }) do
            uring.DEFAULTS.queue_size = bad
            local ok, err = pcall(uring.reactor)
            assert.is_false(ok)
            assert.matches("uring.reactor: uring.DEFAULTS: queue_size must be an integer from 1 to 32768", err, 1, true)
        end
        -- (one set to nil was not checked: C took 0 buffers, or a format raised)
        uring.DEFAULTS.queue_size = nil
        local ok, err = pcall(uring.reactor)
        assert.is_false(ok)
        assert.matches("uring.reactor: uring.DEFAULTS: queue_size must be an integer from 1 to 32768 (got nil)",
                       err, 1, true)
        uring.DEFAULTS.queue_size = saved
        local sqpoll = uring.DEFAULTS.sqpoll
        uring.DEFAULTS.sqpoll = nil
        ok, err = pcall(uring.reactor)
        uring.DEFAULTS.sqpoll = sqpoll
        assert.is_false(ok)
        assert.matches("uring.reactor: uring.DEFAULTS: sqpoll must be a boolean (got nil)", err, 1, true)
    end)

    it("runs the seed's example as written", function()
        local path = tmpfile()
        local rt = pluvio.Runtime.new(1024)
        local reactor = uring.IoUringReactor.builder()
            :queue_size(2048):buffer_size(1048576):buffer_count(64):submit_depth(64)
            :wait_submit_timeout(0.1):wait_complete_timeout(0.15):build()
        rt:register_reactor("io_uring_reactor", reactor)
        rt:run(function()
            local file = uring.DmaFile.open(path, "w+")
            local buf = file:acquire_buffer()
            buf:fill(0x5a)
            assert(file:write_fixed(buf, 0))
            buf:release()
            file:close()
        end)
        local f = io.open(path, "rb")
        local data = f:read("*a")
        f:close()
        os.remove(path)
        assert.equal(1048576, #data)
        assert.equal(("\x5a"):rep(16), data:sub(1, 16))
    end)

    it("sets up rings at the largest queue_size it accepts", function()
        local rt = pluvio.Runtime.new()
        local r = uring.reactor { queue_size = 32768, buffer_count = 0 }
        rt:register_reactor("big", r)
        assert.equal(32768, r:options().queue_size)
        rt:run(function()
            local path = file_with("abc")
            local f = assert(uring.File.open(path, "r"))
            assert.equal("abc", f:read(0, 10))
            f:close()
            uring.unlink(path)
        end)
    end)

    it("names the caller's line in option errors, from the table form and the builder alike", function()
        local line = debug.getinfo(1, "l").currentline
        local ok1, e1 = pcall(function() local r = uring.reactor { queue_size = 0 } return r end)
        local ok2, e2 = pcall(function() local r = uring.IoUringReactor.new { bogus = 1 } return r end)
        local ok3, e3 = pcall(function() local b = uring.IoUringReactor.builder():sqpoll(-1) return b end)
        local ok4, e4 = pcall(function() local b = uring.IoUringReactor.builder():queue_size(0) return b end)
        for i, e in ipairs({ e1, e2, e3, e4 }) do
            assert.is_false(({ ok1, ok2, ok3, ok4 })[i])
            assert.matches("uring_reactor_spec%.lua:" .. (line + i) .. ": ", e)
        end
        -- :sqpoll(false) turns SQPOLL off again
        assert.is_false(uring.IoUringReactor.builder():sqpoll(10):sqpoll(false).opts.sqpoll)
    end)

    it("says a builder's methods are methods when they are called without self", function()
        local b = uring.IoUringReactor.builder()
        assert.has_error(function() b.queue_size(64) end,
            "IoUringReactor.builder():queue_size: call it as a method on a builder (b:queue_size(...)); got number as self")
        assert.has_error(function() b.sqpoll(10) end,
            "IoUringReactor.builder():sqpoll: call it as a method on a builder (b:sqpoll(...)); got number as self")
        assert.has_error(function() b.build() end,
            "IoUringReactor.builder():build: call it as a method on a builder (b:build(...)); got nil as self")
        assert.same({}, b.opts)
    end)

    it("takes :sqpoll(true) on the builder as the options table's sqpoll = true", function()
        local b = uring.IoUringReactor.builder():sqpoll(true)
        assert.is_true(b.opts.sqpoll)
        assert.is_nil(b.opts.sqpoll_idle_ms)                     -- the default idle time stays
        b = uring.IoUringReactor.builder():sqpoll(25):sqpoll(true)
        assert.same({ sqpoll = true, sqpoll_idle_ms = 25 }, b.opts)
        assert.has_error(function() uring.IoUringReactor.builder():sqpoll("on") end,
            'IoUringReactor.builder():sqpoll: idle_ms must be an integer from 0 to 3600000, or true or false (got "on")')
    end)

    it("rejects unknown options and out-of-range values", function()
        assert.has_error(function() uring.reactor { queue_sise = 1 } end,
            'uring.reactor: unknown option "queue_sise" (known: buffer_count, buffer_size, queue_size, sqpoll, sqpoll_idle_ms, submit_depth, wait_complete_timeout, wait_submit_timeout)')
        assert.has_error(function() uring.reactor { queue_size = 0 } end,
            "uring.reactor: queue_size must be an integer from 1 to 32768 (got 0)")
        assert.has_error(function() uring.reactor { buffer_size = 5000 } end,
            "uring.reactor: buffer_size must be a multiple of 4096 (got 5000)")
        assert.has_error(function() uring.reactor { wait_submit_timeout = -1 } end,
            "uring.reactor: wait_submit_timeout must be a number from 0 to 60 (got -1)")
        assert.has_error(function() uring.reactor { sqpoll = 1 } end,
            "uring.reactor: sqpoll must be a boolean (got 1)")
        assert.has_error(function() uring.reactor(5) end, "uring.reactor: options must be a table (got number)")
        assert.has_error(function() uring.IoUringReactor.builder():submit_depth(1.5) end,
            "IoUringReactor.builder():submit_depth: submit_depth must be an integer from 1 to 32768 (got 1.5)")
    end)

    it("rejects a NULL pointer as options or as sqpoll's idle time, though it compares equal to nil", function()
        local null = ffi.cast("void *", 0)
        assert.has_error(function() uring.reactor(null) end, "uring.reactor: options must be a table (got cdata)")
        assert.has_error(function() uring.IoUringReactor.builder():sqpoll(null) end,
            "IoUringReactor.builder():sqpoll: idle_ms must be an integer from 0 to 3600000, or true or false " ..
            "(got cdata<void *>: NULL)")
    end)

    it("says which option to lower when the buffer pool cannot be registered", function()
        with_reactor({ buffer_size = 1073741824, buffer_count = 16384 }, function(r)
            local ok, err = pcall(r.acquire_buffer, r)
            assert.is_false(ok)
            assert.matches("cannot register 16384 buffers of 1073741824 bytes: ENOMEM", err)
            assert.matches("lower buffer_count or buffer_size", err)
        end)
    end)

    it("refuses more buffers than io_uring registers (16384) when it is made, not at the first acquire", function()
        assert.has_error(function() uring.reactor { buffer_count = 16385 } end,
            "uring.reactor: buffer_count must be an integer from 0 to 16384 (got 16385)")
        with_reactor({ buffer_size = 4096, buffer_count = 16384 }, function(r)
            r:acquire_buffer():release()
        end)
    end)

    -- A runtime with an SQPOLL reactor of these options, or nil when the
    -- kernel refuses SQPOLL (with the error it must give then).
    local function sqpoll_runtime(opts)
        opts.sqpoll, opts.sqpoll_idle_ms = true, 10
        local ok, r = pcall(uring.reactor, opts)
        if not ok then
            assert.matches("the kernel refused SQPOLL", r)
            return nil
        end
        local rt = pluvio.Runtime.new()
        rt:register_reactor("io_uring", r)
        return rt
    end

    it("runs with SQPOLL when the kernel allows it", function()
        local rt = sqpoll_runtime({})
        if not rt then return end
        local path = tmpfile()
        local got = rt:run(function()
            local f = assert(uring.File.open(path, "w+"))
            assert.equal(5, f:write(0, "hello"))
            local s = f:read(0, 5)
            f:close()
            return s
        end)
        os.remove(path)
        assert.equal("hello", got)
    end)

    it("with SQPOLL, starts more operations in one tick than the SQ ring holds", function()
        local rt = sqpoll_runtime({ queue_size = 2 })
        if not rt then return end
        local path = file_with(("x"):rep(64))
        local got = rt:run(function()
            local f = assert(uring.File.open(path, "r"))
            local readers, got = {}, {}
            for i = 1, 64 do    -- each queues an SQE in the same tick
                readers[i] = pluvio.spawn(function() return { f:read(i - 1, 1) } end)
            end
            for i = 1, 64 do
                local res = readers[i]:join()
                got[#got + 1] = res[1] or res[2]
            end
            f:close()
            return table.concat(got, ", ")
        end)
        os.remove(path)
        assert.equal(("x"):rep(64, ", "), got)
    end)

    it("is made on first use by default runtimes, and required on plain ones", function()
        assert.is_true(pluvio.run(function()
            return uring.current() ~= nil and pluvio.runtime():reactor("io_uring") ~= nil
        end))
        local rt = pluvio.Runtime.new()
        local ok, err = pcall(rt.run, rt, function() return uring.File.open("/etc/hostname") end)
        assert.is_false(ok)
        assert.matches('File.open: no io_uring reactor is registered on this runtime', err)
    end)

    it("is the first one registered when a runtime has several, whatever their names", function()
        -- (the lookup walked the name -> reactor table: the order of its keys)
        for _, names in ipairs({ { "a", "b" }, { "b", "a" }, { "zz", "io_uring" }, { "io_uring", "zz" } }) do
            local rt = pluvio.Runtime.new()
            local first, second = uring.reactor {}, uring.reactor {}
            rt:register_reactor(names[1], first)
            rt:register_reactor(names[2], second)
            rt:run(function()
                assert.equal(first, uring.current())
                local buf = uring.acquire_buffer()
                local f = assert(uring.File.open("/dev/null", "r"))
                assert.equal(0, f:read_fixed(buf, 0))       -- (a buffer of second's raised here)
                f:close()
                buf:release()
            end)
        end
    end)

    it("is registered on one runtime only, which keeps its files and its waiting tasks", function()
        -- a second registration (a nested runtime, say) used to move the
        -- reactor: its polls woke the tasks parked in the first runtime's
        -- reads in the wrong runtime, and the first runtime's own files
        -- were then "opened in another runtime"
        local path = file_with("abcd")
        local function read_there(off)     -- a task's read of 2 bytes at off, in a file of its own
            local g = assert(uring.File.open(path, "r"))
            local s = g:read(off, 2)
            g:close()
            return s
        end
        local r = uring.reactor { buffer_count = 0 }
        local rt = pluvio.Runtime.new()
        rt:register_reactor("io_uring", r)
        local got = rt:run(function()
            local f = assert(uring.File.open(path, "r"))
            local reader = pluvio.spawn(function() return f:read(0, 2) end)
            local inner = pluvio.Runtime.new()
            local ok, err = pcall(inner.register_reactor, inner, "io_uring", r)
            assert.is_false(ok)
            assert.equal('Runtime:register_reactor: cannot register "io_uring": this io_uring reactor is ' ..
                         'registered on another runtime, which is running (a reactor serves one runtime at a ' ..
                         'time: make one for each, uring.reactor{...})', err)
            assert.is_nil(inner:reactor("io_uring"))
            inner:register_reactor("io_uring", uring.reactor { buffer_count = 0 })
            assert.equal("cd", inner:run(read_there, 2))
            local s = f:read(1, 2) .. reader:join()
            f:close()
            return s
        end)
        assert.equal("bcab", got)
        -- once that run has ended, the next runtime may have it
        local after = pluvio.Runtime.new()
        after:register_reactor("io_uring", r)
        assert.equal("ab", after:run(read_there, 0))
        os.remove(path)
    end)

    it("serves its first runtime again when that runs after another registered it", function()
        -- the later registration left the first runtime's reactor attached
        -- to the other one: a file opened in the first was "opened in
        -- another runtime" there, and its reads parked its tasks elsewhere
        local path = file_with("abcd")
        local r = uring.reactor { buffer_count = 0 }
        local first, second = pluvio.Runtime.new(), pluvio.Runtime.new()
        first:register_reactor("io_uring", r)
        local function read_there(off)
            local g = assert(uring.File.open(path, "r"))
            local s = g:read(off, 2)
            g:close()
            return s
        end
        assert.equal("ab", first:run(read_there, 0))
        second:register_reactor("io_uring", r)
        assert.equal("bc", second:run(read_there, 1))
        assert.equal("cd", first:run(read_there, 2))
        -- and not while the other one runs (first nested in a task of second)
        local ok, err = second:run(function() return pcall(first.run, first, read_there, 0) end)
        assert.is_false(ok)
        assert.equal('Runtime:run: cannot run: its reactor "io_uring": this io_uring reactor is registered ' ..
                     'on another runtime, which is running (a reactor serves one runtime at a time: make ' ..
                     'one for each, uring.reactor{...})', err)
        os.remove(path)
    end)
end)

describe("a reactor the kernel refuses", function()
    -- (the first operation that made the default reactor raised where the
    -- same EMFILE from its own open was nil, err, code)
    it("makes the operation that needed it on first use return nil, err, code, and works once it can", function()
        local status, out, err = helper.run_script(helper.HOLD_FDS .. [[
            local uring = require "pluvio.uring"
            local held = hold_fds()
            for _, call in ipairs({ function() return uring.File.open("/dev/null") end,
                                    function() return uring.statx("/") end,
                                    function() return uring.tcp_listen("127.0.0.1", 0) end,
                                    function() return uring.udp_bind("127.0.0.1", 0) end,
                                    function() return uring.read_some(0, 1) end }) do
                print(call())
            end
            local ok, e = pcall(uring.acquire_buffer)
            print(ok, (e:gsub("^[^:]*:%d+: ", "")))
            for _, h in ipairs(held) do h:close() end
            local file = assert(uring.File.open("/dev/null"))
            print(file:read(0, 1) == "", uring.current():options().queue_size)
        ]], nil, "ulimit -n 32;")
        assert.equal(0, status, err)
        local why = ": cannot set up io_uring with queue_size 256: EMFILE: Too many open files (a ring takes " ..
                    "a file descriptor: close files, or raise the limit, ulimit -n)"
        assert.equal(table.concat({
            "nil\tFile.open" .. why .. "\tEMFILE",
            "nil\turing.statx" .. why .. "\tEMFILE",
            "nil\turing.tcp_listen" .. why .. "\tEMFILE",
            "nil\turing.udp_bind" .. why .. "\tEMFILE",
            "nil\turing.read_some" .. why .. "\tEMFILE",
            "false\turing.acquire_buffer" .. why,
            "true\t256",
        }, "\n") .. "\n", out)
    end)

    it("says the memory, not the locked-memory limit, refused a pool when no limit applies", function()
        if uring.lockable_buffers(4096) ~= nil then
            pending("a locked-memory limit applies to this process (not root)")
            return
        end
        local rt = pluvio.Runtime.new()
        rt:register_reactor("io", uring.reactor { buffer_size = 1073741824, buffer_count = 16384 })
        local ok, e = pcall(rt.run, rt, function() return uring.acquire_buffer() end)
        assert.is_false(ok)
        assert.matches("uring.acquire_buffer: cannot register 16384 buffers of 1073741824 bytes: ENOMEM: " ..
                       "Cannot allocate memory (lower buffer_count or buffer_size)\n", e, 1, true)
    end)
end)

describe("freeing a reactor", function()
    local O_NONBLOCK, F_SETFL = 2048, 4

    -- What a pipe holds now, without waiting.
    local function pipe_holds(fd)
        ffi.C.fcntl(fd, F_SETFL, ffi.cast("int", O_NONBLOCK))
        local buf = ffi.new("char[64]")
        local n = ffi.C.read(fd, buf, 64)
        return n > 0 and ffi.string(buf, n) or ""
    end

    -- Reads of a pipe in flight into scratch memory and a registered
    -- buffer when the runtime ends (end(rt, start) runs start as its
    -- main task and leaves them there), then the runtime and the reactor
    -- are collected.  The spec holds a copy of the ring's fd, as the
    -- kernel's asynchronous teardown of a closed ring would for a while:
    -- a read the kernel still had would then take what the pipe gets
    -- next, into memory that is freed.
    local function reads_left_in_flight(finish)
        local core = require "pluvio.core"
        local fds = ffi.new("int[2]")
        assert.equal(0, helper.libc.pipe(fds))
        local rt = pluvio.Runtime.new()
        local r = uring.reactor { buffer_count = 1, buffer_size = 4096 }
        rt:register_reactor("io", r)
        local cr = core.C.pl_uring_reactor(r.u)
        local ring = ffi.C.dup(cr.wait_fd(cr))
        assert.is_true(ring >= 0)
        finish(rt, function()
            local f = uring.File.new(fds[0], "pipe")
            pluvio.spawn(function() return f:read(0, 16) end)
            pluvio.spawn(function()
                local b = r:acquire_buffer()
                return f:read_fixed(b, 0, 16)
            end)
            pluvio.sleep(0.01)
            assert.equal(2, r:stats().in_flight)
        end)
        rt, r, cr = nil, nil, nil   -- luacheck: ignore
        jit.flush()                 -- (a trace may hold the reactor as a constant)
        collectgarbage()
        collectgarbage()
        helper.libc.write(fds[1], "after", 5)
        local held = pipe_holds(fds[0])
        helper.libc.close(ring)
        helper.libc.close(fds[0])
        helper.libc.close(fds[1])
        return held
    end

    it("is freed with its runtime within a few collections of their drop, also once the JIT compiled the loop",
       function()
        -- (a fresh process: the JIT specializes on the first closures of
        -- a function only) Each run's loop, compiled, kept the run's own
        -- closure as a constant of its trace, and with it the main task,
        -- the runtime and the reactor: the first runs' rings and buffers
        -- stayed until the trace was flushed (50 collections did not free
        -- them).  Counted: collections until the rings are closed.
        local status, out, err = helper.run_script([[
            local uring = require "pluvio.uring"
            local ffi = require "ffi"
            ffi.cdef[[long readlink(const char *path, char *buf, size_t n);]] .. "]]" .. [[
            local function rings()
                local n, buf = 0, ffi.new("char[64]")
                for fd = 0, 1023 do
                    local k = ffi.C.readlink("/proc/self/fd/" .. fd, buf, 64)
                    if k > 0 and ffi.string(buf, k) == "anon_inode:[io_uring]" then n = n + 1 end
                end
                return n
            end
            local before = rings()
            local counts = {}
            for i = 1, 6 do
                do
                    local rt = pluvio.Runtime.new()
                    local r = uring.reactor { queue_size = 8, buffer_count = 2 }
                    rt:register_reactor("io_uring_reactor", r)
                    local drive = i % 2 == 0 and rt.block_on or rt.run
                    drive(rt, function()
                        local path = os.tmpname()
                        local f = assert(uring.File.open(path, "w"))
                        for _ = 1, 300 do         -- (the loop gets hot)
                            assert(f:write(0, "x"))
                            pluvio.yield()
                        end
                        f:close()
                        os.remove(path)
                    end)
                end
                local n = 0
                repeat
                    collectgarbage()
                    n = n + 1
                until rings() == before or n == 50
                counts[i] = n
            end
            print(table.concat(counts, " "))
        ]])
        assert.equal(0, status, err)
        for n in out:gmatch("%d+") do
            assert.is_true(tonumber(n) <= 3, "collections until the rings were closed: " .. out)
        end
    end)

    it("cancels the reads its tasks left parked and waits for the kernel before freeing their memory",
       function()
        assert.equal("after", reads_left_in_flight(function(rt, start) rt:block_on(start) end))
    end)

    it("keeps the scratch memory of a read in flight until the kernel has let go of it", function()
        local fds = ffi.new("int[2]")
        assert.equal(0, helper.libc.pipe(fds))
        local rt = pluvio.Runtime.new()
        rt:register_reactor("io", uring.reactor { buffer_count = 0 })
        local collected = false
        rt:block_on(function()
            local f = uring.File.new(fds[0], "pipe")
            local reader = pluvio.spawn(function() return f:read(0, 16) end)
            pluvio.sleep(0.01)
            assert.equal("waiting", reader:status())
            reader.io_keep.sentinel = ffi.gc(ffi.new("char[1]"), function() collected = true end)
        end)
        rt = nil                    -- luacheck: ignore
        -- the runtime, its task, the reactor and the scratch are garbage
        -- together; the scratch outlives the reactor's teardown...
        jit.flush()                 -- (a trace may hold the reactor as a constant)
        collectgarbage()
        assert.is_false(collected)
        collectgarbage()            -- ...and goes with the next collection
        assert.is_true(collected)
        helper.libc.close(fds[0])
        helper.libc.close(fds[1])
    end)

    -- The fds this process has open, counted once the collector has run
    -- (objects of earlier specs close theirs when finalized).
    -- (read in this process: a child listing our fds, as io.popen's ls did,
    -- could run before popen had closed the pipe's other end in the parent,
    -- and count it: one fd too many, under load)
    local function nfds()
        collectgarbage()
        collectgarbage()
        local n = 0
        for _ in require("lfs").dir("/proc/self/fd") do n = n + 1 end
        return n
    end

    -- A runtime made by make_reactor(), run by block_on(fn), then dropped.
    local function block_on_and_drop(opts, fn)
        local rt = pluvio.Runtime.new()
        rt:register_reactor("io", uring.reactor(opts))
        rt:block_on(fn)
        rt = nil                    -- luacheck: ignore
        jit.flush()                 -- (a trace may hold the reactor as a constant)
    end

    it("closes the fd of an accept whose task was woken but never ran again", function()
        ffi.cdef [[ int socket(int domain, int type, int protocol); ]]
        local path = disk_file_with("cached")   -- (a read of tmpfs would park, letting the acceptor run)
        if not path then return end
        local fd = libc_open(path, 0)
        local before = nfds()
        local client, lfd
        -- submit_depth 1: every op goes out as it starts, and one the kernel
        -- finished inside its submit is taken at once, reaping the others
        block_on_and_drop({ submit_depth = 1 }, function()
            local l = assert(uring.tcp_listen("127.0.0.1", 0))  -- (a socket is its runtime's)
            lfd = l.fd
            local f = uring.File.new(fd)    -- (its close would let the acceptor run)
            local acceptor = pluvio.spawn(function() return l:accept() end)
            pluvio.yield()                  -- it parks in accept
            client = ffi.C.socket(2, 1, 0)  -- a client, by connect(2): the accept finishes
            local to = ffi.new("uint8_t[16]", 2, 0, bit.rshift(l:port(), 8), bit.band(l:port(), 255), 127, 0, 0, 1)
            assert.equal(0, ffi.C.connect(client, to, 16))
            assert.equal("cached", f:read(0, 6))    -- finished in its submit, which woke the acceptor
            assert.equal("ready", acceptor:status())
        end)                                -- block_on is done: the acceptor never runs
        helper.libc.close(client)
        helper.libc.close(lfd)
        assert.equal(before, nfds())
        helper.libc.close(fd)
        os.remove(path)
    end)

    it("does the close of a file whose close never went out to the kernel", function()
        local path = file_with("x")
        local before = nfds()
        block_on_and_drop(nil, function()
            local f = assert(uring.File.open(path))
            local closer = pluvio.spawn(function() return f:close() end)
            pluvio.yield()                  -- the closer queues its close, to go out with the next tick
            assert.equal("waiting", closer:status())
        end)                                -- but block_on is done first
        assert.equal(before, nfds())
        os.remove(path)
    end)

    it("closes the fds of opens and connects that finished, nobody having taken them", function()
        local C = require("pluvio.core").C
        local path = file_with("x")
        local home = pluvio.Runtime.new()   -- the listener's (a socket is its runtime's)
        home:register_reactor("io_uring", uring.reactor())
        local l = home:run(function() return assert(uring.tcp_listen("127.0.0.1", 0)) end)
        local before = nfds()
        local r = uring.reactor()           -- on no runtime: its ops park nobody
        local fd = ffi.new("int[1]")
        local addr = ffi.new("pl_net_addr_t[1]")
        assert.equal(1, C.pl_net_resolve("127.0.0.1", l:port(), 0, 4, addr, 1))
        for _ = 1, 3 do
            assert.is_true(C.pl_uring_openat(r.u, 0, 0, path, 0, 0) >= 0)
            assert.is_true(C.pl_uring_connect(r.u, 0, 0, addr, fd) >= 0)
        end
        local cr = C.pl_uring_reactor(r.u)
        local done = 0
        for _ = 1, 100 do
            C.pl_uring_flush(r.u)
            done = done + cr.poll(cr, nil, 64)
            if done == 6 then break end
            ffi.C.poll(nil, 0, 10)
        end
        assert.equal(6, done)
        assert.equal(0, r:stats().in_flight)
        r, cr = nil, nil                    -- luacheck: ignore
        jit.flush()
        local after = nfds()
        home:run(function() l:close() end)  -- (with the connections it did not accept)
        assert.equal(before, after)
        os.remove(path)
    end)

    it("waits for the reads a run's end cancelled before freeing their memory", function()
        assert.equal("after", reads_left_in_flight(function(rt, start)
            local ok, err = pcall(rt.run, rt, function()
                start()
                error("the end")
            end)
            assert.is_false(ok)
            assert.matches("the end", err)
        end))
    end)
end)

-- A user's locked-memory limit is 8 MiB (Debian's default), which the
-- default pool of 16 buffers of 1 MiB overran: README's examples, the
-- host's uring.acquire_buffer() and `make demo` all failed for non-root
-- users.  These run a script as such a user would (root without
-- CAP_IPC_LOCK, whose registrations the limit then bounds too).
describe("registered buffers under a user's locked-memory limit (8 MiB)", function()
    -- Run the host with args as a user would be (root drops CAP_IPC_LOCK).
    local function as_user(args)
        local _, uid = helper.sh("id -u")
        local drop = uid:match("^0\n") and "setpriv --bounding-set=-ipc_lock -- " or ""
        return helper.sh("ulimit -l 8192; " .. drop .. "timeout -k 5 120 " .. helper.quote(helper.host) .. " " .. args)
    end

    it("fit the default pool to the limit, and say what the limit holds when a given count overruns it", function()
        local path = helper.write_tmp([[
            local uring = require "pluvio.uring"
            local n = assert(uring.lockable_buffers(1048576))
            assert(n >= 1 and n < 8, n)
            local r = uring.reactor()                       -- the defaults: 16 x 1 MiB asked
            assert(r:options().buffer_count == n, r:options().buffer_count)
            local held = {}
            for i = 1, n do held[i] = uring.acquire_buffer() end  -- the host's reactor: registered
            for i = 1, n do held[i]:release() end
            local big = uring.reactor { buffer_count = 16 }     -- given: taken as is
            assert(big:options().buffer_count == 16)
            local rt = pluvio.Runtime.new()
            rt:register_reactor("io", big)
            local ok, e = pcall(rt.run, rt, function() local b = big:acquire_buffer(); return b end)
            assert(not ok)
            print(e:match("^[^\n]*"))
            print(n, uring.lockable_buffers(4096, 1), big:stats().buffers_free)
        ]])
        local status, out, err = as_user(helper.quote(path))
        os.remove(path)
        assert.equal(0, status, err)
        local line, n, small, free = out:match("^(.-)\n(%d+)\t(%d+)\t(%d+)\n$")
        assert.equal("0", free)             -- (a pool that could not be registered: none free, not 16)
        assert.is_string(line, out)
        assert.matches("cannot register 16 buffers of 1048576 bytes: ENOMEM: Cannot allocate memory (lower " ..
                       "buffer_count or buffer_size, or raise the locked-memory limit: ulimit -l; the limit, 8192 " ..
                       "KiB, holds about " .. n .. " of these beside the rings)", line, 1, true)
        assert.is_true(tonumber(small) > 1000)      -- 4 KiB buffers: about 7 MiB of them
    end)

    -- (a default pool of which not one buffer fit kept the default 16)
    it("give a default pool at least 1 buffer when none fits", function()
        local path = helper.write_tmp([[
            local uring = require "pluvio.uring"
            assert(uring.lockable_buffers(64 * 1048576) == 0)
            print(uring.reactor({ buffer_size = 64 * 1048576 }):options().buffer_count)
        ]])
        local status, out, err = as_user(helper.quote(path))
        os.remove(path)
        assert.equal(0, status, err)
        assert.equal("1\n", out)
    end)

    it("give runs one after the other the default pool each, collecting the pools of runs nobody refers to", function()
        -- (the second run's acquire raised ENOMEM: the first's pool, pinned
        -- until a collection ran its finalizer, held the whole limit; each
        -- test of a busted suite, through pluvio.wrap, is such a run)
        local path = helper.write_tmp([[
            local pluvio = require "pluvio"
            local uring = require "pluvio.uring"
            for i = 1, 4 do
                local rt = pluvio.Runtime.new()
                rt:register_reactor("io", uring.reactor())      -- the default pool: what the limit holds
                rt:run(function()
                    local bufs = {}
                    for k = 1, uring.current():options().buffer_count do bufs[k] = uring.acquire_buffer() end
                    for k = 1, #bufs do bufs[k]:release() end
                end)
                print("run " .. i)
            end
        ]])
        local status, out, err = as_user(helper.quote(path))
        os.remove(path)
        assert.equal(0, status, err)
        assert.equal("run 1\nrun 2\nrun 3\nrun 4\n", out)
    end)

    it("run the demo with a window that fits, and refuse a given one that does not in one line", function()
        local pipeline = helper.quote(helper.root .. "/examples/pipeline.lua")
        local status, out, err = as_user(pipeline .. " --size 8m --quiet")
        assert.equal(0, status, err)
        assert.matches("in flight (the locked-memory limit holds ", out, 1, true)
        assert.matches("verified (checksums match)", out, 1, true)
        status, out, err = as_user(pipeline .. " --size 8m --quiet --window 8")
        assert.equal(2, status, err)
        assert.matches("^pipeline: %-%-window 8 takes 20 registered buffers of 1 MiB, and the locked%-memory " ..
                       "limit %(ulimit %-l%) holds %d+: lower %-%-window or %-%-chunk, or raise the limit\n$", err)
    end)

    -- pipeline.lua --server under the limit and a --connect client as a
    -- user too, or (unlimited) as root: the client's output, the server's.
    local function pipeline_ends(client_limited)
        local _, uid = helper.sh("id -u")
        local drop = uid:match("^0\n") and "setpriv --bounding-set=-ipc_lock -- " or ""
        local host = "timeout -k 5 60 " .. helper.quote(helper.host) .. " " ..
                     helper.quote(helper.root .. "/examples/pipeline.lua")
        local out = os.tmpname()
        local status, client, err = helper.sh("(ulimit -l 8192; " .. drop .. host .. " --server --port 0 --size 8m >" ..
            helper.quote(out) .. " 2>&1) & for i in $(seq 200); do grep -q 'receiving on' " .. helper.quote(out) ..
            " && break; sleep 0.05; done; port=$(sed -n 's/.*receiving on 127.0.0.1:\\([0-9]*\\).*/\\1/p' " ..
            helper.quote(out) .. "); " .. (client_limited and "ulimit -l 8192; " .. drop or "") .. host ..
            " --connect 127.0.0.1:$port --size 8m --quiet; rc=$?; wait; exit $rc")
        local f = assert(io.open(out))
        local server = f:read("*a")
        f:close()
        os.remove(out)
        assert.equal(0, status, client .. err .. server)
        assert.matches("verified (checksums match)", client, 1, true)
        assert.matches("pipeline: received 8 MiB in", server, 1, true)
        return client, server
    end

    it("run the demo's two ends on one machine, each in its half of the user's limit", function()
        -- (each end took the whole limit: the second one's pool could not
        -- be registered, and both ends failed)
        local client = pipeline_ends(true)
        assert.matches("512 KiB chunks, 2 in flight (the locked-memory limit holds 4 buffers of 512 KiB for this end)",
                       client, 1, true)
    end)

    it("run the demo's client, unlimited, with the smaller chunks of a server under the limit", function()
        -- (a client's default chunk larger than the server's failed the run: "--chunk 1 MiB is larger
        -- than the server's --chunk 512 KiB", though nobody gave --chunk)
        local client = pipeline_ends(false)
        assert.matches("1 MiB chunks, 8 in flight\n  (the server takes chunks of up to 512 KiB: this run's are " ..
                       "that size)", client, 1, true)
    end)

    -- (remoteio and ucx_bench failed with tracebacks from every task)
    it("run remoteio and ucx_bench with smaller defaults that fit, and refuse sizes that cannot in one line", function()
        local ex = helper.root .. "/examples/"
        local status, out, err = as_user(helper.quote(ex .. "remoteio.lua") .. " --size 8m")
        assert.equal(0, status, err)
        assert.matches("in flight (the locked-memory limit holds ", out, 1, true)
        assert.matches("checksums: client (%x+), server %1: match", out)
        status, out, err = as_user(helper.quote(ex .. "ucx_bench.lua") .. " --iters 200 --warmup 10 --sizes 8,1m")
        assert.equal(0, status, err)
        status, out, err = as_user(helper.quote(ex .. "ucx_bench.lua") .. " --sizes 64m")
        assert.equal(2, status, err)
        assert.matches("^ucx_bench: the largest %-%-sizes takes 5 registered buffers of 64 MiB, and the " ..
                       "locked%-memory limit %(ulimit %-l%) holds 0: lower it, or raise the limit\n$", err)
    end)
end)
