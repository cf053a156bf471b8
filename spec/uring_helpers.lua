-- Shared by the io_uring specs (uring_*_spec.lua): files to read, made
-- behind pluvio's back.
local helper = require "helper"
local ffi = require "ffi"

local M = {}

ffi.cdef [[
int open(const char *path, int flags, ...);
]]

-- open(2) path with flags (mode 0644 where it creates); returns the fd.
function M.libc_open(path, flags)
    local fd = ffi.C.open(path, flags, ffi.cast("int", 420))   -- 0644 (a vararg: passed as an int)
    assert(fd >= 0, "open " .. path .. " failed: errno " .. ffi.errno())
    return fd
end

-- A new temporary file holding content; returns its path.
function M.file_with(content)
    local path = helper.tmp_path()
    local fh = io.open(path, "wb")
    fh:write(content)
    fh:close()
    return path
end

-- The same on a file system whose page-cache reads the kernel finishes
-- inside the submit (helper.disk_dir: not tmpfs, where /tmp often is), for
-- specs whose subject is such a read; nil, the spec marked pending, where
-- there is none.  (busted's pending is in the spec's environment, not in
-- this module's _G: it is found through the caller's.)
function M.disk_file_with(content)
    local path = helper.disk_file_with(content)
    if not path then
        getfenv(2).pending(helper.NO_DISK_DIR)
    end
    return path
end

return M
