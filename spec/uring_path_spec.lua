-- Path operations over io_uring: mkdir, statx, rename, unlink.
local uring = require "pluvio.uring"
local helper = require "helper"
local uh = require "uring_helpers"

local async = helper.async
local tmpfile = helper.tmp_path
local file_with = uh.file_with

describe("path operations", function()
    it("make, stat, rename and remove files and directories", async(function()
        local dir = tmpfile()
        assert.is_true(uring.mkdir(dir))
        local st = assert(uring.statx(dir))
        assert.equal("directory", st.type)
        local null = assert(uring.statx("/dev/null"))          -- (devices and fifos were "other")
        assert.same({ "char device", 1, 3 }, { null.type, null.rdev_major, null.rdev_minor })
        assert.equal(0, os.execute("mkfifo " .. dir .. "/fifo"))
        assert.equal("fifo", uring.statx(dir .. "/fifo").type)
        assert.is_true(uring.unlink(dir .. "/fifo"))
        local f = assert(uring.File.open(dir .. "/a", "w"))
        f:write(0, "12345")
        f:close()
        assert.equal(5, uring.statx(dir .. "/a").size)
        assert.is_true(uring.rename(dir .. "/a", dir .. "/b"))
        local none, err, code = uring.statx(dir .. "/a")
        assert.is_nil(none)
        assert.equal("ENOENT", code)
        assert.matches("^statx .*/a: ENOENT", err)
        assert.is_true(uring.unlink(dir .. "/b"))
        assert.is_true(uring.rmdir(dir))
        local ok, err2 = uring.mkdir("/proc/forbidden/x")
        assert.is_nil(ok)
        assert.matches("^mkdir /proc/forbidden/x: ENOENT", err2)
    end))

    it("refuse a path with a NUL byte instead of acting on the part before it", async(function()
        local victim = file_with("keep me")
        local cut = victim .. "\0.bak"
        local calls = {
            { "uring.unlink", "path", function() local r = uring.unlink(cut); return r end },
            { "uring.rmdir", "path", function() local r = uring.rmdir(cut); return r end },
            { "uring.statx", "path", function() local r = uring.statx(cut); return r end },
            { "uring.mkdir", "path", function() local r = uring.mkdir(cut); return r end },
            { "uring.rename", "from", function() local r = uring.rename(cut, victim .. ".moved"); return r end },
            { "uring.rename", "to", function() local r = uring.rename(victim, cut); return r end },
            { "File.open", "path", function() local r = uring.File.open(cut, "w"); return r end },
            { "DmaFile.open", "path", function() local r = uring.DmaFile.open(cut, "w"); return r end },
        }
        for _, c in ipairs(calls) do
            local ok, err = pcall(c[3])
            assert.is_false(ok, c[1])
            assert.matches(c[1]:gsub("%.", "%%.") .. ": " .. c[2] .. " must not contain a NUL byte", err)
            assert.matches("uring_path_spec.lua:%d+:", err)     -- at the caller's line
        end
        local fh = assert(io.open(victim, "rb"))
        assert.equal("keep me", fh:read("*a"))          -- neither unlinked nor truncated
        fh:close()
        assert.is_true(uring.unlink(victim))
    end))
end)
