-- pluvio.core: the FFI boundary.  Declares the C ABI (from src/pluvio.h,
-- through the generated pluvio.cdef) and loads libpluvio.so.  Every other
-- module reaches C through this one.
local ffi = require "ffi"

local M = {}

ffi.cdef(require "pluvio.cdef")

-- The library sits where package.cpath finds C modules (LuaRocks' layout),
-- or where PLUVIO_LIB points; returns its path and where that came from.
local function find_library()
    local path = os.getenv("PLUVIO_LIB")
    if path and path ~= "" then
        return path, "PLUVIO_LIB"
    end
    path = package.searchpath("libpluvio", package.cpath)
    if not path then
        error("pluvio: cannot find libpluvio.so in package.cpath (" .. package.cpath ..
              "); install Pluvio (make install or luarocks make) or set PLUVIO_LIB", 0)
    end
    return path, "package.cpath"
end

-- (ffi.load's own message names neither the variable nor the search: a
-- stale PLUVIO_LIB, or a libucp.so the loader cannot find, says which.)
local function load_library()
    local path, from = find_library()
    local ok, lib = pcall(ffi.load, path)
    if not ok then
        error(("pluvio: cannot load libpluvio.so from %s (%s): %s"):format(from, path, tostring(lib)), 0)
    end
    return lib
end

M.C = load_library()
M.ffi = ffi

local C = M.C

-- "ENOENT: No such file or directory" for a negative errno.
function M.errstr(rc)
    return ffi.string(C.pl_errname(rc)) .. ": " .. ffi.string(C.pl_strerror(rc))
end

M.errno = {
    ENOENT = 2, ESRCH = 3, EINTR = 4, EIO = 5, EBADF = 9, EAGAIN = 11, ENOMEM = 12,
    EBUSY = 16, EEXIST = 17, EINVAL = 22, ENOSPC = 28, EDEADLK = 35,
    ENAMETOOLONG = 36, ECANCELED = 125, ETIME = 62,
}

return M
