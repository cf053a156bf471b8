-- File and DmaFile over io_uring: open and new, the O_DIRECT rules,
-- short reads and writes, errors, closing (by close, a killed task, the
-- collector) and use across runtimes.  readv/writev: uring_readv_spec.lua.
local pluvio = require "pluvio"
local uring = require "pluvio.uring"
local helper = require "helper"
local uh = require "uring_helpers"
local ffi = require "ffi"
local bit = require "bit"

local async = helper.async
local format = string.format
local tmpfile, with_reactor = helper.tmp_path, helper.with_reactor
local file_with, disk_file_with, libc_open = uh.file_with, uh.disk_file_with, uh.libc_open

-- Files opened by libc, behind pluvio's back, for File.new / DmaFile.new.
ffi.cdef [[
int fcntl(int fd, int cmd, ...);
int getpid(void);
]]
local O_RDWR, O_CREAT = 2, 64
local O_DIRECT = ({ arm = 0x10000, arm64 = 0x10000, ppc = 0x20000 })[ffi.arch] or 0x4000
local F_GETFD, F_GETFL = 1, 3
local FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 1, 2

local function fd_flags(fd)
    return ffi.C.fcntl(fd, F_GETFL)
end


-- write_fixed a buffer patterned for (seed, off) at off, read it back into
-- the zeroed buffer, and compare checksums.
local function fixed_round_trip(f, seed, off, len)
    local buf = f:acquire_buffer()
    buf:fill_pattern(seed, off, len)
    local sum = buf:checksum(len)
    assert.equal(len, f:write_fixed(buf, off, len))
    buf:fill(0)
    assert.equal(len, f:read_fixed(buf, off, len))
    assert.equal(sum, buf:checksum(len))
    buf:release()
end

describe("File and DmaFile", function()
    it("raise argument errors of open and new at the caller's line", function()
        local here = "uring_file_spec%.lua:%d+: "
        local function raised(fn)
            local ok, err = pcall(fn)
            assert.is_false(ok)
            return err
        end
        pluvio.run(function()
            assert.matches(here .. "File%.open: path must be a string %(got nil%)", raised(function() uring.File.open(nil) end))
            assert.matches(here .. "DmaFile%.open: mode must be a string", raised(function() uring.DmaFile.open("x", 1) end))
            assert.matches(here .. "File%.open: perms must be an integer from 0 to 4095 %(got \"a\"%)",
                           raised(function() uring.File.open("x", "r", "a") end))
            assert.matches(here .. "File%.new: fd must be an integer", raised(function() uring.File.new(-1) end))
            assert.matches(here .. "DmaFile%.new: fd must be an integer", raised(function() uring.DmaFile.new("x") end))
            assert.matches(here .. "File%.new: fd 1000 is not open", raised(function() uring.File.new(1000) end))
        end)
        assert.matches(here .. "File%.open: not inside a pluvio task", raised(function() uring.File.open("x") end))
        assert.matches(here .. "File%.new: not inside a pluvio task", raised(function() uring.File.new(0) end))
    end)

    -- An optional argument defaults only when it is nil: false, and a NULL
    -- pointer (which compares equal to nil), are bad values of their own.
    -- (Lua has no octal literals: 644 made a file of mode 01204, sticky and
    -- unreadable to its owner, and mkdir(d, 755) a directory of 01363)
    it("refuse perms written as octal digits in a decimal number, and take the number they stand for", async(function()
        local path = tmpfile("perms")
        assert.has_error(function() uring.File.open(path, "w", 644) end,
            'File.open: perms 644 is decimal here (octal 1204, with the sticky bit): Lua has no octal literals; ' ..
            'write tonumber("644", 8), which is 420')
        assert.has_error(function() uring.mkdir(path .. ".d", 755) end,
            'uring.mkdir: perms 755 is decimal here (octal 1363, with the sticky bit): Lua has no octal literals; ' ..
            'write tonumber("755", 8), which is 493')
        assert.is_nil(uring.statx(path))                   -- nothing made
        local f = assert(uring.File.open(path, "w", tonumber("640", 8)))
        f:close()
        assert.equal(tonumber("640", 8), require("bit").band(uring.statx(path).mode, 4095))
        assert(uring.mkdir(path .. ".d", tonumber("1777", 8)))       -- a real sticky mode, 1023: taken
        assert.equal(tonumber("1000", 8), require("bit").band(uring.statx(path .. ".d").mode, tonumber("1000", 8)))
        assert(uring.rmdir(path .. ".d"))
        uring.unlink(path)
    end))

    it("reject false and NULL pointers for optional arguments, which default only when nil", async(function()
        local null = ffi.cast("void *", 0)
        local path = tmpfile("optional")
        assert.has_error(function() uring.File.open(path, null) end, "File.open: mode must be a string (got cdata)")
        assert.has_error(function() uring.File.open(path, "w", null) end,
            "File.open: perms must be an integer from 0 to 4095 (got cdata<void *>: NULL)")
        assert.has_error(function() uring.File.open(path, "w", false) end,
            "File.open: perms must be an integer from 0 to 4095 (got false)")
        assert.has_error(function() uring.mkdir(path .. ".d", false) end,
            "uring.mkdir: perms must be an integer from 0 to 4095 (got false)")
        local f = assert(uring.File.open(path, "w+"))
        local b = uring.acquire_buffer()
        assert.has_error(function() f:read_fixed(b, 0, null) end,
            "File:read_fixed: len must be an integer from 0 to 1048576 (got cdata<void *>: NULL)")
        assert.has_error(function() f:readv(0, { b }, null) end,
            "File:readv: lens must be nil or a list of byte counts (got cdata<void *>: NULL)")
        assert.has_error(function() f:fallocate(0, 4096, false) end,
            "File:fallocate: mode must be an integer from 0 to 255 (got false)")
        assert.has_error(function() b:fill(65, 4, false) end,
            "Buffer:fill: offset must be an integer from 0 to 1048576 (got false)")
        assert.has_error(function() b:tostring(null) end,
            "Buffer:tostring: len must be an integer from 0 to 1048576 (got cdata<void *>: NULL)")
        assert.is_nil(uring.statx(path .. ".d"))      -- nothing was made
        b:release()
        f:close()
        os.remove(path)
    end))

    for _, kind in ipairs({ "File", "DmaFile" }) do
        local cls = uring[kind]

        it(kind .. " writes and reads back strings and registered buffers", async(function()
            local path = tmpfile()
            local f = assert(cls.open(path, "w+"))
            local block = ("0123456789abcdef"):rep(256)  -- 4096 bytes
            assert.equal(4096, f:write(0, block))
            assert.equal(block, f:read(0, 4096))
            fixed_round_trip(f, 7, 8192, 8192)
            assert.equal(16384, f:statx().size)
            assert.is_true(f:fsync())
            assert.is_true(f:fdatasync())
            assert.is_true(f:close())
            assert.is_true(uring.unlink(path))
        end))

        it(kind .. " keeps data intact with 128 patterned writes in flight at random offsets", async(function()
            local path = tmpfile()
            local f = assert(cls.open(path, "w+"))
            local bs, nblocks = 4096, 512
            local order = {}
            for i = 1, nblocks do order[i] = i - 1 end
            math.randomseed(42)
            for i = nblocks, 2, -1 do
                local j = math.random(i)
                order[i], order[j] = order[j], order[i]
            end
            local work = pluvio.channel(nblocks)
            for _, b in ipairs(order) do work:send(b) end
            work:close()
            local function writer()
                local buf = f:acquire_buffer()
                while true do
                    local b = work:recv()
                    if not b then break end
                    buf:fill_pattern(99, b * bs, bs)
                    assert.equal(bs, f:write_fixed(buf, b * bs, bs))
                end
                buf:release()
            end
            local tasks = {}
            for i = 1, 16 do tasks[i] = pluvio.spawn(writer) end
            for i = 1, 16 do tasks[i]:join() end
            -- read back with 128 tasks in flight, each checking its block
            local bad = 0
            local readers = {}
            local next_block = 0
            for i = 1, 128 do
                readers[i] = pluvio.spawn(function()
                    while next_block < nblocks do
                        local b = next_block
                        next_block = next_block + 1
                        local s = f:read(b * bs, bs)
                        local buf = f:acquire_buffer()
                        buf:fill_pattern(99, b * bs, bs)
                        if s ~= buf:tostring(bs) then bad = bad + 1 end
                        buf:release()
                    end
                end)
            end
            for i = 1, 128 do readers[i]:join() end
            assert.equal(0, bad)
            assert.is_true(uring.current():stats().in_flight_max >= 16)
            f:close()
            uring.unlink(path)
        end))
    end

    it("returns the count of a short read at end of file (File)", async(function()
        local path = tmpfile()
        local f = assert(uring.File.open(path, "w+"))
        assert.equal(5000, f:write(0, ("z"):rep(5000)))
        assert.equal(5000 - 4096, #f:read(4096, 4096))
        assert.equal("", f:read(8192, 4096))
        local buf = f:acquire_buffer()
        assert.equal(904, f:read_fixed(buf, 4096, 4096))
        buf:release()
        f:close()
        uring.unlink(path)
    end))

    it("reads a small file whole with the largest length, without that much memory", async(function()
        local function rss()
            local f = assert(io.open("/proc/self/statm"))
            local pages = tonumber(f:read("*a"):match("^%d+ (%d+)"))
            f:close()
            return pages * 4096
        end
        local path = tmpfile()
        local f = assert(uring.File.open(path, "w+"))
        assert.equal(5, f:write(0, "hello"))
        local before = rss()
        assert.equal("hello", f:read(0, 0x7ffff000))   -- Linux's largest; 2 GiB of scratch asked
        assert.equal("llo", f:read(2, 1073741824))
        assert.is_true(rss() - before < 16 * 1048576)  -- (a zero-filled 1 GiB was resident before)
        f:close()
        uring.unlink(path)
    end))

    it("returns the count of a short read at end of file (DmaFile, size not a block multiple)", async(function()
        local path = tmpfile()
        local w = assert(uring.File.open(path, "w"))
        w:write(0, ("q"):rep(5000))
        w:close()
        local f = assert(uring.DmaFile.open(path, "r"))
        local s = f:read(4096, 4096)
        assert.equal(5000 - 4096, #s)
        assert.equal(("q"):rep(904), s)
        f:close()
        uring.unlink(path)
    end))

    it("gives the O_DIRECT hint with EINVAL only for operations that move data", async(function()
        local path = file_with(("q"):rep(8192))
        local f = assert(uring.DmaFile.open(path, "r"))
        local ok, err, code = f:truncate(0)         -- a read-only file: EINVAL, nothing to do with alignment
        assert.is_nil(ok)
        assert.equal("EINVAL", code)
        assert.equal("truncate " .. path .. ": EINVAL: Invalid argument", err)
        f:close()
        -- opened to append, the write goes to the end of the file (100 bytes), not to offset 0
        local w = assert(uring.File.open(path, "w"))
        w:write(0, ("x"):rep(100))
        w:close()
        local a = assert(uring.DmaFile.open(path, "a"))
        ok, err = a:write(0, ("y"):rep(512))
        assert.is_nil(ok)
        assert.equal("write " .. path .. " (offset 0, 512 bytes): EINVAL: Invalid argument (opened to append: " ..
                     "a write goes to the end of the file whatever its offset, and with O_DIRECT that end " ..
                     "must be a multiple of " .. a.offset_align .. ")", err)
        a:close()
        uring.unlink(path)
    end))

    it("does not continue a short O_DIRECT read at an unaligned offset, which is end of file", async(function()
        -- the rest would start at offset 5000 into buf + 5000: the kernel
        -- refuses that (EINVAL) once the file has grown meanwhile, and the
        -- read failed after reading all there was
        local path = file_with(("q"):rep(5000))
        local f = assert(uring.DmaFile.open(path, "r"))
        local buf = f:acquire_buffer()
        local before = uring.current():stats().resubmits
        assert.equal(5000, f:read_fixed(buf, 0, 8192))
        assert.equal(5000, #f:read(0, 8192))
        local q = uring.io_queue()
        assert.is_true(q:read_fixed(f, buf, 4096, 8192))
        assert.same({ buf, 904 }, { q:wait() })
        assert.equal(before, uring.current():stats().resubmits)
        assert.equal(("q"):rep(904), buf:tostring(904))
        q:close()
        buf:release()
        f:close()
        uring.unlink(path)
    end))

    it("does not continue a short O_DIRECT read at end of file on a 4096-byte-block device", function()
        -- 4608 bytes: the short read ends 512-aligned, but not aligned to the
        -- device's 4096 bytes, so it is the end of the file all the same
        -- (continued, the rest starts where the kernel refuses it once the
        -- file has grown)
        local dir, img = os.tmpname(), os.tmpname()
        os.remove(dir)
        helper.exec("mkdir -p " .. dir .. " && truncate -s 32M " .. img)
        local dev = io.popen("losetup -f --show --sector-size 4096 " .. img .. " 2>/dev/null"):read("*l")
        local ok = dev and helper.exec("mkfs.ext4 -q " .. dev .. " >/dev/null 2>&1 && mount " .. dev .. " " .. dir .. " 2>/dev/null")
        if ok ~= 0 and ok ~= true then
            if dev then helper.exec("losetup -d " .. dev) end
            helper.exec("rmdir " .. dir .. "; rm -f " .. img)
            pending("a loop device with 4096-byte sectors is not permitted here; not checked")
            return
        end
        local got = { pluvio.run(function()
            local path = dir .. "/f"
            local f = assert(uring.DmaFile.open(path, "w+"))
            local buf = f:acquire_buffer()
            buf:fill(0x71)
            assert(f:write_fixed(buf, 0, 8192))
            assert(f:truncate(4608))
            local before = uring.current():stats().resubmits
            local n = f:read_fixed(buf, 0, 8192)
            local resubmits = uring.current():stats().resubmits - before
            buf:release()
            f:close()
            return f.offset_align, n, resubmits
        end) }
        helper.exec("umount " .. dir .. "; losetup -d " .. dev .. "; rmdir " .. dir .. "; rm -f " .. img)
        assert.same({ 4096, 4608, 0 }, got)
    end)

    it("does not continue a short read on a closed file's number once another file has it", async(function()
        -- (on disk: A's read must finish inside the submit that carries B's
        -- close; on tmpfs it is still in a worker thread then, and the
        -- close cancels it, as documented)
        local small, other = disk_file_with(("a"):rep(5000)), file_with(("B"):rep(8192))
        if not small then return end
        local f = assert(uring.File.open(small, "r"))
        -- A's read comes back short (end of file); before its rest starts,
        -- B closes the file and C's open may be given the same fd number
        local a = pluvio.spawn(function() return f:read(0, 8192) end)
        local b = pluvio.spawn(function() return f:close() end)
        local c = pluvio.spawn(function() return assert(uring.File.open(other, "r")) end)
        local data, err, code, done = a:join()
        assert.is_true(b:join())
        local g = c:join()
        -- its own 5000 bytes only, never C's; and as the close cut it short
        -- (a short count cannot tell the end of the file from a cut), it
        -- fails with them as the bytes done, not as all there was
        assert.is_nil(data)
        assert.equal("ECANCELED", code)
        assert.equal(5000, done)
        assert.matches("%(the file was closed%) %(5000 bytes done before the error%)$", err)
        g:close()
        uring.unlink(small)
        uring.unlink(other)
    end))

    it("keeps a close whose task was killed behind the reads queued before it, never on the file that gets the number", function()
        -- (submit_depth 64: the read and the close wait in the SQ for the tick)
        with_reactor({ submit_depth = 64 }, function()
            local mine, other = file_with(("a"):rep(100)), file_with(("b"):rep(100))
            local f = assert(uring.File.open(mine, "r"))
            local reader = pluvio.spawn(function() return f:read(0, 100) end)
            local closer = pluvio.spawn(function() return f:close() end)
            pluvio.yield()                      -- both queued, neither submitted
            assert.equal("waiting", closer:status())
            closer:kill()
            local fd = libc_open(other, 0)      -- the lowest free number: the file's, if it was closed
            local data, err, code = reader:join()
            ffi.C.close(fd)
            assert.equal(("a"):rep(100), data, tostring(err) .. " " .. tostring(code))
            uring.unlink(mine)
            uring.unlink(other)
        end)
    end)

    it("closes the fd of a close whose task was killed even when the run ends with the kill", function()
        -- (submit_depth 64: the close waits in the SQ for a tick that never comes)
        local path = file_with("x")
        local rt = pluvio.Runtime.new()
        rt:register_reactor("io_uring_reactor", uring.reactor({ submit_depth = 64 }))
        local fd
        rt:run(function()
            local f = assert(uring.File.open(path, "r"))
            fd = f:fileno()
            local closer = pluvio.spawn(function() return f:close() end)
            pluvio.yield()                      -- the close is queued, not submitted
            assert.equal("waiting", closer:status())
            closer:kill()                       -- and the run ends
        end)
        assert.equal(-1, ffi.C.fcntl(fd, F_GETFD), "the file's fd is still open after the run")
        os.remove(path)
    end)

    it("checks every O_DIRECT alignment rule before submitting", async(function()
        local path = tmpfile()
        local f = assert(uring.DmaFile.open(path, "w+"))
        local a = f.offset_align
        assert.is_true(a >= 512)
        assert.has_error(function() f:read(1, a) end,
            ("DmaFile:read: O_DIRECT offset 1 is not a multiple of %d (the file's O_DIRECT alignment) on %s"):format(a, path))
        assert.has_error(function() f:write(0, "abc") end,
            ("DmaFile:write: O_DIRECT length 3 is not a multiple of %d (the file's O_DIRECT alignment) on %s"):format(a, path))
        local buf = f:acquire_buffer()
        assert.has_error(function() f:write_fixed(buf, a + 1, a) end,
            ("DmaFile:write_fixed: O_DIRECT offset %d is not a multiple of %d (the file's O_DIRECT alignment) on %s"):format(a + 1, a, path))
        assert.has_error(function() f:read_fixed(buf, 0, a - 1) end,
            ("DmaFile:read_fixed: O_DIRECT length %d is not a multiple of %d (the file's O_DIRECT alignment) on %s"):format(a - 1, a, path))
        buf:release()
        assert.equal(0, uring.current():stats().in_flight)
        f:close()
        uring.unlink(path)
    end))

    it("checks the O_DIRECT buffer address rule and names the address and the alignment", async(function()
        local path = tmpfile()
        local d = assert(uring.DmaFile.open(path, "w+"))
        local a, m = d.offset_align, d.mem_align
        assert.is_true(m > 1)
        local function addr(p) return tonumber(ffi.cast("uintptr_t", p)) end
        local r = uring.current()
        local sqes = r:stats().sqes
        -- Registered buffers are page-aligned and no method makes a view
        -- into one, so the rule is reached here by moving a buffer's base
        -- by hand: read_fixed, write_fixed, readv and an I/O queue check it.
        local buf = d:acquire_buffer()
        local base = buf.base
        buf.base = base + 1
        local odd = addr(buf.base)
        assert.has_error(function() d:read_fixed(buf, 0, a) end,
            ("DmaFile:read_fixed: O_DIRECT buffer address 0x%x is not aligned to %d bytes on %s"):format(odd, m, path))
        assert.has_error(function() d:write_fixed(buf, a, a) end,
            ("DmaFile:write_fixed: O_DIRECT buffer address 0x%x is not aligned to %d bytes on %s"):format(odd, m, path))
        assert.has_error(function() d:readv(0, { buf }, { a }) end,
            ("DmaFile:readv: O_DIRECT address 0x%x of part 1 is not aligned to %d bytes on %s " ..
             "(a string is aligned only by chance: use registered buffers)"):format(odd, m, path))
        local q = uring.io_queue()
        assert.has_error(function() q:write_fixed(d, buf, 0, a) end,
            ("IoQueue:write_fixed: O_DIRECT buffer address 0x%x is not aligned to %d bytes on %s"):format(odd, m, path))
        q:close()
        buf.base = base
        buf:release()
        assert.equal(sqes, r:stats().sqes)          -- nothing went to the kernel
        -- A string's own bytes: writev hands them to the kernel as they are
        -- (read and write copy through aligned scratch memory instead).
        local s
        for k = 1, 64 do
            local c = ("s"):rep(a - 1) .. string.char(k)
            if addr(ffi.cast("const char *", c)) % m ~= 0 then
                s = c
                break
            end
        end
        if not s then
            d:close()
            uring.unlink(path)
            pending(("the strings made here were all aligned to %d bytes: writev's check of a string not seen"):format(m))
            return
        end
        assert.has_error(function() d:writev(0, { s }) end,
            ("DmaFile:writev: O_DIRECT address 0x%x of part 1 is not aligned to %d bytes on %s " ..
             "(a string is aligned only by chance: use registered buffers)"):format(addr(ffi.cast("const char *", s)), m, path))
        assert.equal(sqes, r:stats().sqes)
        assert.equal(a, d:write(0, s))
        assert.equal(s, d:read(0, a))
        d:close()
        uring.unlink(path)
    end))

    it("DmaFile.new wraps an fd opened with O_DIRECT, learns its rules and closes the fd", async(function()
        local path = tmpfile()
        local fd = libc_open(path, O_RDWR + O_CREAT + O_DIRECT)
        local d = uring.DmaFile.new(fd, "direct fd")
        assert.equal("DmaFile direct fd (fd " .. fd .. ")", tostring(d))
        assert.equal(fd, d:fileno())
        local st = assert(d:statx())
        local a = st.dio_offset_align > 0 and st.dio_offset_align or 512
        assert.equal(a, d.offset_align)
        assert.has_error(function() d:read(1, a) end,
            ("DmaFile:read: O_DIRECT offset 1 is not a multiple of %d (the file's O_DIRECT alignment) on direct fd"):format(a))
        assert.has_error(function() d:write(0, "abc") end,
            ("DmaFile:write: O_DIRECT length 3 is not a multiple of %d (the file's O_DIRECT alignment) on direct fd"):format(a))
        fixed_round_trip(d, 5, 0, 8192)
        assert.equal(8192, d:statx().size)
        assert.is_true(bit.band(fd_flags(fd), O_DIRECT) ~= 0)      -- still O_DIRECT
        assert.is_true(d:close())
        assert.equal(-1, ffi.C.fcntl(fd, F_GETFD))                 -- closed by close()
        assert.has_error(function() uring.DmaFile.new(-1) end,
            "DmaFile.new: fd must be an integer from 0 to 2147483647 (got -1)")
        uring.unlink(path)
    end))

    it("DmaFile.open closes the file when its task is killed while it learns the O_DIRECT rules", async(function()
        local path = file_with("")
        local function open_here()     -- fds of this process open on path
            local n = 0
            local ls = io.popen("ls -l /proc/" .. ffi.C.getpid() .. "/fd")
            for line in ls:lines() do
                if line:sub(-#path - 4) == " -> " .. path then n = n + 1 end
            end
            ls:close()
            return n
        end
        local opener = pluvio.spawn(function() return uring.DmaFile.open(path, "r") end)
        for _ = 1, 100 do               -- until it has the fd and waits for its statx
            pluvio.yield()
            if type(opener.waiting_for) == "table" then break end
        end
        assert.equal(uring.DmaFile, getmetatable(opener.waiting_for))
        -- the file's fd, and the statx's own duplicate of it (gone already
        -- when the statx finished and was reaped before this task ran)
        local n = open_here()
        assert.is_true(n == 2 or n == 1, tostring(n))
        opener:kill()
        for _ = 1, 1000 do              -- (the abandoned statx lets go of its duplicate as it completes)
            if uring.current():stats().in_flight == 0 then break end
            pluvio.sleep(0.001)
        end
        assert.equal(0, open_here())
        os.remove(path)
    end))

    it("File.new and DmaFile.new refuse an fd that is not open, or whose O_DIRECT flag does not match", async(function()
        local path = tmpfile()
        local plain = libc_open(path, O_RDWR + O_CREAT)
        local direct = libc_open(path, O_RDWR + O_DIRECT)
        assert.has_error(function() uring.DmaFile.new(plain) end,
            ("DmaFile.new: fd %d was not opened with O_DIRECT (wrap it with File.new, or open it with O_DIRECT)")
            :format(plain))
        assert.has_error(function() uring.File.new(direct) end,
            ("File.new: fd %d was opened with O_DIRECT (wrap it with DmaFile.new, which checks the O_DIRECT rules)")
            :format(direct))
        assert.equal(0, bit.band(fd_flags(plain), O_DIRECT))        -- flags left alone
        ffi.C.close(plain)
        assert.has_error(function() uring.File.new(plain) end,
            ("File.new: fd %d is not open (EBADF: Bad file descriptor)"):format(plain))
        assert.is_true(uring.DmaFile.new(direct):close())
        uring.unlink(path)
    end))

    it("File.new and DmaFile.new take a name that is a string, and leave the fd alone when it is not", async(function()
        local path = tmpfile()
        local plain = libc_open(path, O_RDWR + O_CREAT)
        assert.has_error(function() uring.File.new(plain, {}) end, "File.new: name must be a string (got table)")
        assert.has_error(function() uring.DmaFile.new(plain, 7) end, "DmaFile.new: name must be a string (got number)")
        -- (a NULL pointer equals nil: it was taken as the name, and describe() raised)
        assert.has_error(function() uring.File.new(plain, require("ffi").cast("void *", 0)) end,
                         "File.new: name must be a string (got cdata)")
        local f = uring.File.new(plain, "mine")                  -- still open, still ours to wrap
        assert.is_true(f:close())
        assert.has_error(function() f:read(0, 1) end, "File:read: the file is closed (mine)")
        uring.unlink(path)
    end))

    it("fallocates and truncates", async(function()
        local path = tmpfile()
        local f = assert(uring.File.open(path, "w+"))
        assert.is_true(f:fallocate(0, 65536))
        assert.equal(65536, f:statx().size)
        assert.is_true(f:truncate(100))
        assert.equal(100, f:statx().size)
        f:close()
        uring.unlink(path)
    end))

    it("reports failures as nil, message with operation, path and errno", async(function()
        local f, err, code = uring.File.open("/nonexistent/dir/x", "r")
        assert.is_nil(f)
        assert.equal('open /nonexistent/dir/x (mode "r"): ENOENT: No such file or directory', err)
        assert.equal("ENOENT", code)
        local ro = assert(uring.File.open("/etc/hostname", "r"))
        local n, err3 = ro:write(0, "x")
        assert.is_nil(n)
        assert.matches("^write /etc/hostname %(offset 0, 1 bytes%): EBADF", err3)
        ro:close()
    end))

    for _, kind in ipairs({ "File", "DmaFile" }) do
        local cls = uring[kind]

        it(kind .. " fallocate with FALLOC_FL_KEEP_SIZE reserves blocks and keeps the size", async(function()
            local path = tmpfile()
            local f = assert(cls.open(path, "w+"))
            assert.is_true(f:fallocate(0, 65536, FALLOC_FL_KEEP_SIZE))
            local st = f:statx()
            assert.equal(0, st.size)
            assert.is_true(st.blocks >= 65536 / 512, "blocks " .. st.blocks)
            local block = ("k"):rep(4096)
            assert.equal(4096, f:write(0, block))
            assert.is_true(f:fallocate(4096, 1048576, FALLOC_FL_KEEP_SIZE))   -- past the end
            st = f:statx()
            assert.equal(4096, st.size)
            assert.is_true(st.blocks >= (4096 + 1048576) / 512, "blocks " .. st.blocks)
            assert.is_true(f:fallocate(0, 8192))                              -- mode 0 grows it
            assert.equal(8192, f:statx().size)
            assert.equal(block, f:read(0, 4096))
            -- the kernel's refusal comes back as nil, err, code: a hole must keep the size
            assert.same({ nil, "fallocate " .. path .. ": EOPNOTSUPP: Operation not supported", "EOPNOTSUPP", 0 },
                        { f:fallocate(0, 4096, FALLOC_FL_PUNCH_HOLE) })
            assert.has_error(function() f:fallocate(0, 4096, 256) end,
                kind .. ":fallocate: mode must be an integer from 0 to 255 (got 256)")
            f:close()
            uring.unlink(path)
        end))

        it(kind .. " fallocate refuses a length of 0 and a call without self, naming them", async(function()
            local path = tmpfile()
            local f = assert(cls.open(path, "w+"))
            -- the kernel's EINVAL named no argument (on a DmaFile it blamed the O_DIRECT alignment)
            assert.has_error(function() f:fallocate(0, 0) end,
                kind .. ":fallocate: len must be an integer from 1 to 4611686018427387904 (got 0)")
            assert.has_error(function() f.fallocate(0, 4096) end,
                "File:fallocate: call it as a method on a file (f:fallocate(...)); got number as self")
            assert.equal(0, f:statx().size)
            f:close()
            uring.unlink(path)
        end))

        it(kind .. " punches a hole with FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE", async(function()
            local path = tmpfile()
            local f = assert(cls.open(path, "w+"))
            local blocks = {}
            for i = 1, 16 do blocks[i] = string.char(64 + i):rep(4096) end
            assert.equal(65536, f:write(0, table.concat(blocks)))
            assert.is_true(f:fsync())
            local before = f:statx()
            local ok, err, code = f:fallocate(4096, 8192, FALLOC_FL_PUNCH_HOLE + FALLOC_FL_KEEP_SIZE)
            if not ok and code == "EOPNOTSUPP" then
                f:close()
                uring.unlink(path)
                pending("this file system cannot punch holes (" .. err .. "); not checked")
                return
            end
            assert.is_true(ok, err)
            local after = f:statx()
            assert.equal(65536, after.size)
            assert.is_true(after.blocks <= before.blocks - 8192 / 512,
                           ("blocks %d before, %d after"):format(before.blocks, after.blocks))
            assert.equal(blocks[1] .. ("\0"):rep(8192) .. blocks[4], f:read(0, 16384))
            f:close()
            uring.unlink(path)
        end))
    end

    for _, kind in ipairs({ "File", "DmaFile" }) do
        it(kind .. ".new of an fd closed behind pluvio's back: every operation fails with EBADF", async(function()
            local path = tmpfile()
            local fd = libc_open(path, O_RDWR + O_CREAT + (kind == "DmaFile" and O_DIRECT or 0))
            local f = uring[kind].new(fd, "behind")
            local block = ("b"):rep(4096)
            assert.equal(4096, f:write(0, block))
            local buf = f:acquire_buffer()              -- (the pool is set up before the close)
            assert.equal(0, helper.libc.close(fd))
            local function ebadf(what) return what .. ": EBADF: Bad file descriptor" end
            assert.same({ nil, ebadf("read behind (offset 0, 4096 bytes)"), "EBADF", 0 }, { f:read(0, 4096) })
            assert.same({ nil, ebadf("write behind (offset 0, 4096 bytes)"), "EBADF", 0 }, { f:write(0, block) })
            assert.same({ nil, ebadf("read behind (offset 0, 4096 bytes)"), "EBADF", 0 },
                        { f:read_fixed(buf, 0, 4096) })
            assert.same({ nil, ebadf("write behind (offset 4096, 4096 bytes)"), "EBADF", 0 },
                        { f:write_fixed(buf, 4096, 4096) })
            assert.same({ nil, ebadf("readv behind (offset 0, 4096 bytes in 1 parts)"), "EBADF", 0 },
                        { f:readv(0, { buf }, { 4096 }) })
            assert.same({ nil, ebadf("writev behind (offset 0, 4096 bytes in 1 parts)"), "EBADF", 0 },
                        { f:writev(0, { buf }, { 4096 }) })
            for _, op in ipairs({ "fsync", "fdatasync", "statx" }) do
                local ok, err, code = f[op](f)
                assert.is_nil(ok)
                assert.equal(ebadf(op .. " behind"), err)
                assert.equal("EBADF", code)
            end
            for op, call in pairs({ fallocate = function() return f:fallocate(0, 4096) end,
                                    truncate = function() return f:truncate(0) end }) do
                local ok, err, code = call()
                assert.is_nil(ok)
                assert.equal(ebadf(op .. " behind"), err)
                assert.equal("EBADF", code)
            end
            buf:release()
            local ok, err, code = f:close()             -- the kernel's close fails too; the file is closed
            assert.is_nil(ok)
            assert.equal(ebadf("close behind"), err)
            assert.equal("EBADF", code)
            assert.has_error(function() f:read(0, 1) end, kind .. ":read: the file is closed (behind)")
            assert.equal(0, uring.current():stats().in_flight)
            local rest = io.open(path, "rb")            -- what was written before the close is there
            assert.equal(block, rest:read("*a"))
            rest:close()
            uring.unlink(path)
        end))
    end

    it("refuses to use a closed file", async(function()
        local path = tmpfile()
        local f = assert(uring.File.open(path, "w+"))
        f:close()
        assert.has_error(function() f:read(0, 1) end, "File:read: the file is closed (" .. path .. ")")
        assert.is_false(f:close())      -- closing twice: false, as for sockets and endpoints
        uring.unlink(path)
    end))

    it("close at once from outside a task once their run ended, unless a task left there still reads them", function()
        local f, fd
        local rt = pluvio.Runtime.new()
        rt:register_reactor("io_uring", uring.reactor { buffer_count = 0 })
        rt:run(function()
            f = assert(uring.File.open("/etc/hostname"))
            fd = f:fileno()
        end)
        assert.is_true(f:close())       -- nothing reaps that ring any more: a close would wait for good
        assert.equal(-1, ffi.C.fcntl(fd, F_GETFD))
        assert.is_false(f:close())
        -- a task left parked by block_on still reads the pipe: the file stays open, for that runtime
        local fds = ffi.new("int[2]")
        assert.equal(0, helper.libc.pipe(fds))
        local p
        rt:block_on(function()
            p = uring.File.new(fds[0], "pipe")
            pluvio.spawn(function() return p:read(0, 16) end)
            pluvio.yield()
        end)
        local busy = "File:close: a task of the runtime pipe was opened in still has an operation on it (that " ..
            "task was left parked when the runtime stopped running): close it in that runtime, or kill that task first"
        assert.has_error(function() p:close() end, busy)   -- (it said: not inside a pluvio task)
        pluvio.run(function()                               -- (it said: opened in another runtime)
            assert.has_error(function() p:close() end, busy)
        end)
        assert.equal(0, ffi.C.fcntl(fds[0], F_GETFD) < 0 and 1 or 0)
        rt:run(function() assert.is_true(p:close()) end)    -- at home: the reader is cancelled, the fd closed
        assert.equal(-1, ffi.C.fcntl(fds[0], F_GETFD))
        helper.libc.close(fds[1])
    end)

    it("close an opened file nobody closed when it is collected, as io.open's, and nothing else", async(function()
        local fd
        do
            local f = assert(uring.File.open("/etc/hostname"))
            fd = f:fileno()
        end
        collectgarbage()
        collectgarbage()
        assert.equal(-1, ffi.C.fcntl(fd, F_GETFD))      -- closed by the collector
        -- closed by the caller, then collected: the collector does not close the fd's next owner
        local f = assert(uring.File.open("/etc/hostname"))
        fd = f:fileno()
        assert.is_true(f:close())
        local g = assert(uring.File.open("/etc/hostname"))
        assert.equal(fd, g:fileno())                    -- (the lowest free number: f's)
        f = nil     -- luacheck: ignore
        collectgarbage()
        collectgarbage()
        assert.is_string(g:read(0, 1))
        -- a file from new(fd) wraps the caller's fd: not closed by the collector
        local fds = ffi.new("int[2]")
        assert.equal(0, helper.libc.pipe(fds))
        do
            local p = uring.File.new(fds[0], "pipe")
            assert.equal(fds[0], p:fileno())
        end
        collectgarbage()
        collectgarbage()
        assert.equal(0, ffi.C.fcntl(fds[0], F_GETFD) < 0 and 1 or 0)
        helper.libc.close(fds[0])
        helper.libc.close(fds[1])
        g:close()
    end))

    it("refuse to be used from another runtime than their own, which would never reap their ops", function()
        local f, buf
        local rt = pluvio.Runtime.new()
        local r = uring.reactor { buffer_count = 1, buffer_size = 4096 }
        rt:register_reactor("io_uring", r)
        rt:run(function() f = assert(uring.File.open("/etc/hostname")) end)
        local other = pluvio.Runtime.new()
        other:register_reactor("io_uring", uring.reactor { buffer_count = 1, buffer_size = 4096 })
        local foreign = "File:%s: /etc/hostname was opened in another runtime (its io_uring reactor is that " ..
                        "runtime's): use it there, or open it again in this one"
        other:run(function()
            buf = uring.acquire_buffer()
            for _, call in ipairs({
                { "read", function() return f:read(0, 4) end },
                { "write", function() return f:write(0, "x") end },
                { "fsync", function() return f:fsync() end },
                { "statx", function() return f:statx() end },
                { "readv", function() return f:readv(0, { 4 }) end },
                { "acquire_buffer", function() return f:acquire_buffer() end },
            }) do
                local ok, err = pcall(call[2])
                assert.is_false(ok)
                assert.matches(foreign:format(call[1]), err, 1, true)
            end
            local ok, err = pcall(function() return r:acquire_buffer() end)
            assert.is_false(ok)
            assert.matches("IoUringReactor:acquire_buffer: the reactor is registered on another runtime", err, 1, true)
            buf:release()
        end)
        rt:run(function() assert.is_string(f:read(0, 4)) end)   -- still fine at home
        other:run(function() assert.is_true(f:close()) end)     -- its run ended: closed at once
        assert.is_false(f:close())
    end)

    it("lend the pool of a reactor registered on no runtime to one runtime at a time", function()
        -- a release wakes the waiters of its own runtime only: a waiter of
        -- another one would wait for good, and a task of the releasing
        -- runtime with the same slot would be woken in its place
        local r = uring.reactor { buffer_count = 1, buffer_size = 4096 }
        local a, b = pluvio.Runtime.new(), pluvio.Runtime.new()
        local held = a:run(function() return r:acquire_buffer():detach() end)
        local ok, err = pcall(b.run, b, function() return r:acquire_buffer() end)
        assert.is_false(ok)
        assert.matches("IoUringReactor:acquire_buffer: the reactor's buffers are out to tasks of another " ..
                       "runtime (a reactor registered on no runtime lends them to one at a time)", err, 1, true)
        held:release()
        local got = b:run(function()        -- the pool is whole again: b may have it
            local buf = r:acquire_buffer()
            buf:write("b's")
            return buf:tostring(3)
        end)
        assert.equal("b's", got)
    end)

    it("name DmaFile in the errors of a DmaFile", async(function()
        local path = tmpfile()
        local f = assert(uring.DmaFile.open(path, "w+"))
        local buf = f:acquire_buffer()
        local bs = f.offset_align          -- (the block size the file learned at open)
        assert.has_error(function() f:read_fixed(buf, 1) end, format("DmaFile:read_fixed: O_DIRECT offset 1 is not " ..
            "a multiple of %d (the file's O_DIRECT alignment) on %s", bs, path))
        assert.has_error(function() f:read(-1, 4096) end, "DmaFile:read: offset must be an integer from 0 to 2^62 (got -1)")
        assert.has_error(function() f:write(0, "x") end, format("DmaFile:write: O_DIRECT length 1 is not a " ..
            "multiple of %d (the file's O_DIRECT alignment) on %s", bs, path))
        buf:release()
        f:close()
        assert.has_error(function() f:read(0, 4096) end, "DmaFile:read: the file is closed (" .. path .. ")")
        uring.unlink(path)
    end))

    it("rejects bad arguments with the argument and the rule", async(function()
        local path = tmpfile()
        local f = assert(uring.File.open(path, "w+"))
        assert.has_error(function() f:read(-1, 1) end, "File:read: offset must be an integer from 0 to 2^62 (got -1)")
        assert.has_error(function() f:read(2 ^ 62 + 2048, 1) end,     -- (it said ">= 0" of that one)
                         "File:read: offset must be an integer from 0 to 2^62 (got 4611686018427389952)")
        assert.has_error(function() f:read(0, 1.5) end, "File:read: len must be an integer from 0 to 2147479552 (got 1.5)")
        assert.has_error(function() f:write(0, 42) end, "File:write: data must be a string (got number)")
        assert.has_error(function() f:read_fixed("buf", 0) end, "File:read_fixed: buf must be a registered buffer (got string)")
        assert.has_error(function() uring.File.open(path, "rw") end,
            'File.open: mode must be one of "r", "w", "a", "r+", "w+", "a+", each also with a "b" (got "rw")')
        assert.has_error(function() uring.File.open(path, "br") end,
            'File.open: mode must be one of "r", "w", "a", "r+", "w+", "a+", each also with a "b" (got "br")')
        assert.has_error(function() uring.File.open(path, "r+bx") end,
            'File.open: mode must be one of "r", "w", "a", "r+", "w+", "a+", each also with a "b" (got "r+bx")')
        assert.has_error(function() uring.File.open(path, "r\0+") end,    -- C read it as "r"
            'File.open: mode must be one of "r", "w", "a", "r+", "w+", "a+", each also with a "b" (got "r\\0+")')
        for _, mode in ipairs({ "rb", "r+b", "rb+", "wb", "ab+" }) do      -- as io.open's
            assert(uring.File.open(path, mode)):close()
        end
        for _, mode in ipairs({ "rbb", "rb+b" }) do                        -- (any number of them went)
            assert.has_error(function() uring.File.open(path, mode) end,
                'File.open: mode must be one of "r", "w", "a", "r+", "w+", "a+", each also with a "b" (got "' ..
                mode .. '")')
        end
        assert.has_error(function() uring.File.open(path, ("r"):rep(1e6)) end,   -- (a 1 MB message)
            'File.open: mode must be one of "r", "w", "a", "r+", "w+", "a+", each also with a "b" (got "' ..
            ("r"):rep(60) .. '"... (1000000 bytes))')
        assert.has_error(function() uring.File.open(42) end, "File.open: path must be a string (got number)")
        assert.has_error(function() f.read({}, 0, 1) end,
            "File:read: call it as a method on a file (f:read(...)); got table as self")
        assert.has_error(function() f.describe() end,
            "File:describe: call it as a method on a file (f:describe(...)); got nil as self")
        f:close()
        uring.unlink(path)
    end))

    it("refuses to start I/O outside a task", function()
        assert.has_error(function() uring.File.open("/etc/hostname") end,
            "File.open: not inside a pluvio task (call it from a function run by pluvio.run / rt:run, or from a script run by the pluvio host)")
    end)

    it("reports ENOSPC with the bytes written on a full file system", function()
        local dir = os.tmpname()
        os.remove(dir)
        helper.exec("mkdir -p " .. dir)
        local ok = helper.exec("mount -t tmpfs -o size=1m pluvio-spec " .. dir .. " 2>/dev/null")
        if ok ~= 0 and ok ~= true then
            pending("mounting a small tmpfs is not permitted here; ENOSPC not checked")
            helper.exec("rmdir " .. dir)
            return
        end
        local n, err, code, done = pluvio.run(function()
            local f = assert(uring.File.open(dir .. "/big", "w"))
            local r1, r2, r3, r4 = f:write(0, ("x"):rep(2 * 1048576))
            f:close()
            return r1, r2, r3, r4
        end)
        helper.exec("umount " .. dir .. "; rmdir " .. dir)
        assert.is_nil(n)
        assert.equal("ENOSPC", code)
        assert.is_true(done > 0 and done <= 1048576, "bytes done " .. tostring(done))
        assert.matches("write " .. dir .. "/big %(offset 0, 2097152 bytes%): ENOSPC: No space left on device %(" ..
                       done .. " bytes done before the error%)", err)
    end)

    it("keeps scratch memory of string reads and writes for reuse, but not a huge one for good", function()
        with_reactor(nil, function(r)
            local path = tmpfile()
            local f = assert(uring.File.open(path, "w+"))
            local big = 64 * 1048576 + 1                -- a 128 MiB size class
            assert.is_true(f:truncate(big))
            assert.equal(big, #f:read(0, big))
            assert.equal(4, f:write(0, "tiny"))
            assert.equal("tiny", f:read(0, 4))
            local kept = 0
            for class, list in pairs(r.bounce.lists) do
                kept = kept + class * #list
            end
            assert.equal(4096, kept)                    -- the small class only
            assert.equal(0, #r.bounce.lists[128 * 1048576])     -- the huge piece was unmapped
            assert.equal(kept, r.bounce.kept)
            f:close()
            uring.unlink(path)
        end)
    end)

    it("wakes what other tasks wait for on a file it closes (a pipe's reads), with ECANCELED", async(function()
        local fds = ffi.new("int[2]")
        assert.equal(0, helper.libc.pipe(fds))
        local f = uring.File.new(fds[0], "pipe")
        local reader = pluvio.spawn(function() return f:read(0, 16) end)
        local fixed = pluvio.spawn(function()
            local b = uring.acquire_buffer()
            return f:read_fixed(b, 0, 16)
        end)
        local queued = pluvio.spawn(function()
            local q = uring.io_queue()
            assert(q:read_fixed(f, uring.acquire_buffer(), 0, 16, "q"))
            return q:wait()
        end)
        pluvio.sleep(0.01)
        assert.equal("waiting", reader:status())
        assert.is_true(f:close())
        local woke = pluvio.timeout(10, function()     -- (a guard: before, they waited for good)
            for _, t in ipairs({ reader, fixed, queued }) do
                while t:status() == "waiting" do pluvio.sleep(0.001) end
            end
            return true
        end)
        assert.is_true(woke, "the close left a task parked on the pipe")
        local none, err, code = reader:join()
        assert.is_nil(none)
        assert.equal("ECANCELED", code)
        assert.equal("read pipe (offset 0, 16 bytes): ECANCELED: Operation canceled (the file was closed)", err)
        none, err, code = fixed:join()
        assert.is_nil(none)
        assert.equal("ECANCELED", code)
        assert.matches("^read pipe .*%(the file was closed%)$", err)
        local tag, n, qerr = queued:join()
        assert.equal("q", tag)
        assert.is_nil(n)
        assert.matches("ECANCELED.*%(the file was closed%)$", qerr)
        assert.equal(0, uring.current():stats().in_flight)
        helper.libc.close(fds[1])
    end))

    it("fails a read or write that another task's close cut short with ECANCELED and the bytes done", async(function()
        -- The close came in the same tick: the first, short part of each
        -- came back with the fd closed, and the rest was not done.  That
        -- count was returned as if it were all: a read looked like the end
        -- of the file, and a write said ENOSPC (no space left on device).
        local fds = ffi.new("int[2]")
        assert.equal(0, helper.libc.pipe(fds))
        local f = uring.File.new(fds[0], "pipe")
        local reader = pluvio.spawn(function() return f:read(0, 100) end)
        pluvio.spawn(function()
            helper.libc.write(fds[1], "0123456789", 10)   -- there at the submit: 10 of the 100
            assert.is_true(f:close())
        end):join()
        assert.same({ nil, "read pipe (offset 0, 100 bytes): ECANCELED: Operation canceled (the file was " ..
                           "closed) (10 bytes done before the error)", "ECANCELED", 10, "0123456789" },
                    { reader:join() })
        helper.libc.close(fds[1])

        assert.equal(0, helper.libc.pipe(fds))
        local w = uring.File.new(fds[1], "pipe-w")
        local writer = pluvio.spawn(function() return w:write(0, ("x"):rep(200000)) end)
        pluvio.spawn(function() assert.is_true(w:close()) end):join()
        local none, err, code, done = writer:join()
        assert.is_nil(none)
        assert.equal("ECANCELED", code)
        assert.is_true(done > 0 and done < 200000, tostring(done))    -- what the pipe took
        assert.equal(format("write pipe-w (offset 0, 200000 bytes): ECANCELED: Operation canceled (the " ..
                            "file was closed) (%d bytes done before the error)", done), err)
        helper.libc.close(fds[0])
        assert.equal(0, uring.current():stats().in_flight)
    end))

    it("runs an fsync, fallocate or statx queued before another task's close on its own file", async(function()
        -- The kernel looks these up in a worker thread, after the close ran in
        -- the same submit: they failed with EBADF, and a fallocate grew the
        -- file an open in that submit got the number of.
        local path, other = tmpfile(), tmpfile()
        assert(io.open(other, "w")):close()
        for _ = 1, 3 do
            local f = assert(uring.File.open(path, "w+"))
            local g
            local ops = {
                pluvio.spawn(function() return f:fsync() end),
                pluvio.spawn(function() return f:fdatasync() end),
                pluvio.spawn(function() return f:fallocate(0, 1048576) end),
                pluvio.spawn(function() return f:statx() end),
            }
            pluvio.spawn(function() assert(f:close()) end)
            pluvio.spawn(function() g = assert(uring.File.open(other, "r+")) end):join()
            for i, t in ipairs(ops) do
                local r, err = t:join()
                assert.is_truthy(r, format("op %d: %s", i, tostring(err)))
            end
            assert.equal(0, g:statx().size)       -- the fallocate went to its own file
            assert.equal(1048576, uring.statx(path).size)
            assert.is_true(g:close())
        end
        assert.equal(0, uring.current():stats().in_flight)
        assert(uring.unlink(path)); assert(uring.unlink(other))
    end))

    it("says on a refused O_DIRECT open only what it knows, not alignment rules it has not learnt", async(function()
        local dir = tmpfile()
        assert.is_true(uring.mkdir(dir))
        local d, err, code = uring.DmaFile.open(dir, "r")     -- ext4 refuses O_DIRECT on a directory
        if d then
            d:close()
        else
            assert.equal("EINVAL", code)        -- (it blamed the file system)
            assert.equal(format('open %s (mode "r"): EINVAL: Invalid argument ' ..
                                "(O_DIRECT needs a regular file or a block device, and this is a directory)",
                                dir), err)
        end
        assert.is_true(uring.rmdir(dir))
        d, err = uring.DmaFile.open("/dev/null", "r")
        if d then
            d:close()
        else
            assert.equal('open /dev/null (mode "r"): EINVAL: Invalid argument ' ..
                         "(O_DIRECT needs a regular file or a block device, and this is a char device)", err)
        end
    end))

    -- (a scratch piece that could not be mapped raised, and ended the task,
    -- where every other I/O failure is nil, err, code)
    it("returns nil, err, ENOMEM when a read's or write's scratch memory cannot be mapped, and goes on", function()
        local env, remove_shim = helper.preload_shim([[
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stddef.h>
#include <sys/mman.h>
int pl_test_fail_mmaps;
void *mmap(void *a, size_t n, int prot, int flags, int fd, off_t off)
{
    static void *(*real)(void *, size_t, int, int, int, off_t);

    if (pl_test_fail_mmaps && n >= 1048576) {
        errno = ENOMEM;
        return MAP_FAILED;
    }
    if (!real)
        real = (void *(*)(void *, size_t, int, int, int, off_t))dlsym(RTLD_NEXT, "mmap");
    return real(a, n, prot, flags, fd, off);
}
]])
        local status, out, err = helper.run_script([[
            local uring = require "pluvio.uring"
            local ucx = require "pluvio.ucx"
            local ffi = require "ffi"
            ffi.cdef "int pl_test_fail_mmaps;"
            local zero = assert(uring.File.open("/dev/zero"))
            local path = os.tmpname()
            local out = assert(uring.File.open(path, "w+"))
            local ctx = assert(ucx.Context.new())
            local w = assert(ctx:create_worker())
            local data = ("x"):rep(2097152)
            local l = assert(uring.tcp_listen("127.0.0.1", 0))
            local c = assert(uring.tcp_connect("127.0.0.1", l:port()))
            local s = assert(l:accept())
            assert(c:send("abc"))
            ffi.C.pl_test_fail_mmaps = 1
            print(s:recv(1048576))
            print(s:recv_exact(1048576))
            print(zero:read(0, 2097152))
            local none, e, code, n = out:write(0, data)
            print(none, (e:gsub(path:gsub("%p", "%%%0"), "PATH")), code, n)
            print(uring.read_some(zero:fileno(), 2097152))
            print(w:tag_recv(1, 0, 2097152))
            ffi.C.pl_test_fail_mmaps = 0
            print(#zero:read(0, 2097152), out:write(0, data), #uring.read_some(zero:fileno(), 2097152))
            print(s:recv(1048576))
            out:close(); os.remove(path); ctx:close()
        ]], nil, "UCX_MEM_EVENTS=no " .. env)     -- (else UCX's own mmap hook goes round the shim)
        remove_shim()
        assert.equal(0, status, err)
        local note = " (no memory for 2097152 bytes of scratch space to hold the data)"
        local recv = "recv 127.0.0.1:PORT: ENOMEM: Cannot allocate memory (no memory for 1048576 bytes of scratch " ..
                     "space to hold the data)"
        out = out:gsub("127%.0%.0%.1:%d+", "127.0.0.1:PORT")
        assert.equal(table.concat({
            "nil\t" .. recv .. "\tENOMEM",
            "nil\t" .. recv .. "\tENOMEM\t0",
            "nil\tread /dev/zero (offset 0, 2097152 bytes): ENOMEM: Cannot allocate memory" .. note .. "\tENOMEM\t0",
            "nil\twrite PATH (offset 0, 2097152 bytes): ENOMEM: Cannot allocate memory" .. note .. "\tENOMEM\t0",
            "nil\tread fd 5: ENOMEM: Cannot allocate memory" .. note .. "\tENOMEM",
            "nil\ttag_recv: ENOMEM: Cannot allocate memory" .. note .. "\tENOMEM",
            "2097152\t2097152\t2097152",
            "abc",
        }, "\n") .. "\n", out)
    end)
end)
