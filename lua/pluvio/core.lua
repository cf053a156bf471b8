-- pluvio.core: the FFI boundary.  Declares the C ABI (from src/pluvio.h,
-- through the generated pluvio.cdef) and loads libpluvio.so.  Every other
-- module reaches C through this one.
-- (without LuaJIT, "module 'ffi' not found" and a list of paths did not
-- say what was wrong: busted, say, started without --lua=luajit)
local has_ffi, ffi = pcall(require, "ffi")
if not has_ffi then
    error("pluvio: needs LuaJIT, whose FFI it is built on; this is " .. _VERSION ..
          " (run scripts with luajit or the pluvio host, and busted with --lua=luajit)", 0)
end

local M = {}

local CDEF = require "pluvio.cdef"
ffi.cdef(CDEF)

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
              "); install Pluvio (make install or luarocks make) and set LUA_CPATH to where it went, " ..
              "or set PLUVIO_LIB to the library", 0)
    end
    return path, "package.cpath"
end

-- The library must be built from the header these modules' cdef came
-- from: one of another version (an older make install found first on
-- package.cpath, say) would take calls it does not know as it reads them,
-- and corrupt memory rather than fail.
local function check_interface(lib, path)
    local want = CDEF:match("^/%* abi (%w+) %*/")
    local ok, have = pcall(function() return ffi.string(lib.pl_abi()) end)
    if not ok or have ~= want then
        error(("pluvio: the libpluvio.so at %s was built for another version of Pluvio than " ..
               "these Lua modules (%s, %s): install both from one build (make install, or " ..
               "luarocks make), or point PLUVIO_LIB at the library built with them"):format(path,
               ok and "its interface " .. have or "it has no interface stamp", "theirs " .. tostring(want)), 0)
    end
end

-- (ffi.load's own message names neither the variable nor the search: a
-- stale PLUVIO_LIB, or a libucp.so the loader cannot find, says which.)
local function load_library()
    local path, from = find_library()
    local ok, lib = pcall(ffi.load, path)
    if not ok then
        error(("pluvio: cannot load libpluvio.so from %s (%s): %s"):format(from, path, tostring(lib)), 0)
    end
    check_interface(lib, path)
    return lib
end

M.C = load_library()
M.ffi = ffi

local C = M.C

-- "ENOENT: No such file or directory" for a negative errno.
function M.errstr(rc)
    return ffi.string(C.pl_errname(rc)) .. ": " .. ffi.string(C.pl_strerror(rc))
end

-- Scratch memory for string I/O, kept for reuse per power-of-two size
-- class up to budget bytes (more would hold one large read's memory for the
-- owner's whole life).  C maps it (pl_scratch_alloc): page-aligned, not
-- zero-filled, and only the pages an operation writes become resident.
-- An entry is { ptr = uint8_t *, class = bytes }; one dropped instead of put
-- back is unmapped by the collector.
local Scratch = {}
Scratch.__index = Scratch

function M.scratch_pool(budget)
    return setmetatable({ budget = budget, kept = 0, lists = {} }, Scratch)
end

local PAGE = 4096

-- At least len bytes, or nil, -errno when they cannot be mapped (the
-- address space or vm.max_map_count exhausted): the operation that needed
-- them fails with it (M.NO_SCRATCH says why), as any other I/O failure.
function Scratch:get(len)
    local class = PAGE
    while class < len do class = class * 2 end
    local list = self.lists[class]
    local n = list and #list or 0
    if n > 0 then
        local e = list[n]
        list[n] = nil
        self.kept = self.kept - class
        return e
    end
    if not list then
        self.lists[class] = {}
    end
    local p = C.pl_scratch_alloc(class)
    if p == nil then
        return nil, -ffi.errno()
    end
    p = ffi.gc(ffi.cast("uint8_t *", p), function(q) C.pl_scratch_free(q, class) end)
    return { ptr = p, class = class }
end

-- What an operation whose scratch memory (of len bytes) could not be
-- mapped adds to its errno text.
function M.no_scratch(len)
    return (" (no memory for %d bytes of scratch space to hold the data)"):format(len)
end

-- A failure (nil, msg, ...) with note added to its message.
function M.noted(note, none, msg, ...)
    return none, msg .. note, ...
end

-- An entry the kernel or UCX is done with: kept, or unmapped now.
function Scratch:put(e)
    local kept = self.kept + e.class
    if kept <= self.budget then
        local list = self.lists[e.class]
        list[#list + 1] = e
        self.kept = kept
    else
        local p = e.ptr
        e.ptr = nil
        ffi.gc(p, nil)
        C.pl_scratch_free(p, e.class)
    end
end

M.errno = {
    ENOENT = 2, ESRCH = 3, EINTR = 4, EIO = 5, EBADF = 9, EAGAIN = 11, ENOMEM = 12,
    EBUSY = 16, EEXIST = 17, EINVAL = 22, ENOSPC = 28, EDEADLK = 35,
    ENAMETOOLONG = 36, ECANCELED = 125, ETIME = 62,
}

return M
