-- readv and writev of File and DmaFile: gathering and scattering
-- strings and registered buffers, O_DIRECT, short transfers, killed tasks.
local pluvio = require "pluvio"
local uring = require "pluvio.uring"
local helper = require "helper"
local ffi = require "ffi"

local async = helper.async
local tmpfile = helper.tmp_path

describe("readv and writev", function()
    local function pipe()
        local fds = ffi.new("int[2]")
        assert(helper.libc.pipe(fds) == 0)
        return uring.File.new(fds[0]), uring.File.new(fds[1])
    end

    it("gathers strings and buffers into one write and scatters a read", async(function()
        local path = tmpfile()
        local f = assert(uring.File.open(path, "w+"))
        local a, b = uring.acquire_buffer(), uring.acquire_buffer()
        a:fill(0x41)
        b:fill(0x42)
        assert.equal(23, f:writev(0, { "head:", a, b, ":tail" }, { 5, 10, 3, 5 }))
        assert.equal("head:AAAAAAAAAABBB:tail", f:read(0, 100))
        local x, y = uring.acquire_buffer(), uring.acquire_buffer()
        assert.equal(23, f:readv(0, { x, y }, { 4, 100 }))       -- short only at end of file
        assert.equal("head", x:tostring(4))
        assert.equal(":AAAAAAAAAABBB:tail", y:tostring(19))
        assert.equal(2 * a:size(), f:writev(100, { a, b }))     -- whole buffers by default
        assert.equal(2 * a:size(), f:readv(100, { x, y }))
        assert.equal(a:checksum(), x:checksum())
        assert.equal(b:checksum(), y:checksum())
        f:close()
        os.remove(path)
    end))

    it("goes through O_DIRECT with aligned registered buffers", async(function()
        local path = tmpfile()
        local d = assert(uring.DmaFile.open(path, "w+"))
        local a, b = d:acquire_buffer(), d:acquire_buffer()
        a:fill_pattern(3, 0)
        b:fill_pattern(4, 0)
        local sa, sb = a:checksum(8192), b:checksum(4096)
        assert.equal(12288, d:writev(8192, { a, b }, { 8192, 4096 }))
        a:fill(0)
        b:fill(0)
        assert.equal(12288, d:readv(8192, { a, b }, { 8192, 4096 }))
        assert.equal(sa, a:checksum(8192))
        assert.equal(sb, b:checksum(4096))
        assert.has_error(function() d:writev(0, { a }, { 100 }) end,
            "DmaFile:writev: O_DIRECT length 100 of part 1 is not a multiple of " .. d.offset_align ..
            " (the file's O_DIRECT alignment) on " .. path)
        assert.has_error(function() d:readv(1, { a }) end,
            "DmaFile:readv: O_DIRECT offset 1 is not a multiple of " .. d.offset_align ..
            " (the file's O_DIRECT alignment) on " .. path)
        d:close()
        os.remove(path)
    end))

    it("continues a short transfer into the parts not yet filled", async(function()
        local rd, wr = pipe()
        local a, b = uring.acquire_buffer(), uring.acquire_buffer()
        local reader = pluvio.spawn(function() return rd:readv(0, { a, b }, { 2, 5 }) end)
        pluvio.yield()
        local before = uring.current():stats().resubmits
        assert.equal(3, wr:write(0, "abc"))     -- a pipe gives what it has: 3 of 7
        pluvio.sleep(0.01)
        assert.equal("waiting", reader:status())
        assert.equal(before + 1, uring.current():stats().resubmits)
        assert.equal(4, wr:writev(0, { "de", "fg" }))
        assert.equal(7, reader:join())
        assert.equal("ab", a:tostring(2))
        assert.equal("cdefg", b:tostring(5))
        rd:close()
        wr:close()
    end))

    it("keeps readv's buffers out of the pool while the kernel has them, even if released", async(function()
        local r = uring.current()
        local rd, wr = pipe()
        local a = uring.acquire_buffer()
        local free = r:stats().buffers_free
        local reader = pluvio.spawn(function() return rd:readv(0, { a }, { 3 }) end)
        pluvio.yield()
        a:release()                             -- while the read is in flight
        assert.equal(free, r:stats().buffers_free)
        assert.equal(3, wr:write(0, "abc"))
        assert.equal(3, reader:join())
        assert.equal(free + 1, r:stats().buffers_free)
        rd:close()
        wr:close()
    end))

    it("keeps a killed readv's buffers out of the pool until the kernel lets go", async(function()
        local r = uring.current()
        local rd, wr = pipe()
        local reader = pluvio.spawn(function()
            local a, b = uring.acquire_buffer(), uring.acquire_buffer()
            return rd:readv(0, { a, b })
        end)
        pluvio.sleep(0.01)      -- submitted: the kernel has it (one it had not taken would be dropped at once)
        local free = r:stats().buffers_free
        reader:kill()
        assert.equal(free, r:stats().buffers_free)
        pluvio.sleep(0.01)                      -- the cancel completes
        local f = assert(uring.File.open(tmpfile(), "w+"))
        local deadline = pluvio.now() + 10       -- the next op lets go of them
        repeat assert.equal(1, f:write(0, "x")) until r:stats().buffers_free == free + 2 or pluvio.now() > deadline
        assert.equal(free + 2, r:stats().buffers_free)
        f:close()
        os.remove(f.path)
        rd:close()
        wr:close()
    end))

    it("rejects bad parts with clear errors", async(function()
        local path = tmpfile()
        local f = assert(uring.File.open(path, "w+"))
        local a = uring.acquire_buffer()
        assert.has_error(function() f:readv(0, "x") end,
            'File:readv: bufs must be a list of registered buffers (got "x")')
        assert.has_error(function() f:writev(0, {}) end, "File:writev: parts must hold 1 to 16 entries (got 0)")
        local many = {}
        for i = 1, 17 do many[i] = "x" end
        assert.has_error(function() f:writev(0, many) end, "File:writev: parts must hold 1 to 16 entries (got 17)")
        local holed = { "a" }
        holed[3] = "b"                      -- (# says 1: "b" would be dropped)
        assert.has_error(function() f:writev(0, holed) end, "File:writev: parts has a hole: entry 2 is nil, entry 3 is not")
        assert.has_error(function() f:readv(0, holed) end, "File:readv: parts has a hole: entry 2 is nil, entry 3 is not")
        assert.has_error(function() f:readv(0, { "x" }) end,
            'File:readv: part 1 must be a registered buffer (got "x")')
        assert.has_error(function() f:writev(0, { "x", 5 }) end,
            "File:writev: part 2 must be a registered buffer or a string (got 5)")
        assert.has_error(function() f:writev(0, { "abc" }, { 4 }) end,
            "File:writev: lens[1] must be an integer from 0 to 3, the size of part 1 (got 4)")
        assert.has_error(function() f:writev(0, { "abc" }, 3) end,
            "File:writev: lens must be nil or a list of byte counts (got 3)")
        -- (a count beyond the parts was ignored: a part left out of the list went unnoticed)
        assert.has_error(function() f:writev(0, { "abc", "def" }, { 3, 3, 5 }) end,
            "File:writev: lens has 3 entries for 2 parts (one byte count per part)")
        assert.has_error(function() f:readv(0, { a }, { 2, 4096 }) end,
            "File:readv: lens has 2 entries for 1 part (one byte count per part)")
        assert.has_error(function() f:writev(-1, { "abc" }) end,
            "File:writev: offset must be an integer from 0 to 2^62 (got -1)")
        -- errors name the caller's line, not the library's
        for _, call in ipairs({
            function() local n = f:readv(0, "x"); return n end,
            function() local n = f:read_fixed(a, -1); return n end,
            function() local n = f:fallocate(-1, 1); return n end,
        }) do
            local _, err = pcall(call)
            assert.matches("uring_readv_spec%.lua:%d+: File:", err)
        end
        a:release()
        assert.has_error(function() f:readv(0, { a }) end,
            "File:readv: part 1, " .. tostring(a) .. ", was released")
        f:close()
        assert.has_error(function() f:writev(0, { "abc" }) end)
        os.remove(path)
    end))
end)
