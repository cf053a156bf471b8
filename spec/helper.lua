-- Shared by the specs (busted loads it first; specs require "helper").
-- spec/run exports PLUVIO_LIB and PLUVIO_HOST for the build tree under test.
local M = {}

M.root = (debug.getinfo(1, "S").source:match("^@(.*)/spec/helper%.lua$")) or "."
M.host = os.getenv("PLUVIO_HOST") or (M.root .. "/build/pluvio")

local function shell_quote(s)
    return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end
M.quote = shell_quote

-- Run a shell command; returns exit status, stdout, stderr.  LD_PRELOAD
-- (set by the sanitizer run for luajit alone) is not passed on: the ASan
-- host links its runtime itself, and other tools would report their leaks.
function M.sh(cmd)
    local out, err = os.tmpname(), os.tmpname()
    -- (exec: the shell's own words go to err too, "Hangup" for a command
    -- a signal ended, which otherwise landed among busted's output)
    local ok, how, code = os.execute("unset LD_PRELOAD; exec >" .. out .. " 2>" .. err .. "; (" .. cmd .. ")")
    local function slurp(p)
        local f = io.open(p, "rb")
        local s = f and f:read("*a") or ""
        if f then f:close() end
        os.remove(p)
        return s
    end
    local status = type(ok) == "number" and math.floor(ok / 256) or (how == "exit" and code or 128 + (code or 0))
    return status, slurp(out), slurp(err)
end

-- os.execute without the sanitizer preload (for commands whose output is
-- not wanted, background starts included); returns the exit status.
function M.exec(cmd)
    local ok, how, code = os.execute("unset LD_PRELOAD; " .. cmd)
    if type(ok) == "number" then
        return math.floor(ok / 256)
    end
    return how == "exit" and code or 128 + (code or 0)
end

-- Write code to a temporary script and run it with the pluvio host.
-- A runtime with an explicit io_uring reactor (as the seed writes it);
-- runs fn(reactor, runtime) as its main task and returns its results.
function M.with_reactor(opts, fn)
    local pluvio, uring = require "pluvio", require "pluvio.uring"
    local rt = pluvio.Runtime.new()
    local r = uring.reactor(opts)
    rt:register_reactor("io_uring_reactor", r)
    return rt:run(fn, r, rt)
end

-- libc calls the specs make around the runtime (pipes, raw writes).
local ffi = require "ffi"
ffi.cdef [[
int pipe(int fds[2]);
int close(int fd);
long write(int fd, const void *buf, size_t n);
]]
M.libc = ffi.C

-- A UCX server worker with a listener on loopback and a connected client
-- (opts: id of the server's stream, default 1; window).
function M.ucx_pair(opts)
    local pluvio, ucx = require "pluvio", require "pluvio.ucx"
    local ctx = assert(ucx.Context.new())
    local sw = assert(ctx:create_worker())
    local cw = assert(ctx:create_worker())
    local stream = sw:am_stream(opts and opts.id or 1, opts and opts.window and { window = opts.window } or nil)
    local l = assert(sw:create_listener("127.0.0.1", 0))
    local accepted = pluvio.spawn(function() return assert(l:accept()) end)
    local ep = assert(cw:connect_socket("127.0.0.1", l:port()))
    local sep = accepted:join()
    return { ctx = ctx, sw = sw, cw = cw, stream = stream, listener = l, ep = ep, sep = sep }
end

function M.ucx_close_pair(p)
    p.ep:close()
    p.listener:close()
    p.cw:close()
    p.sw:close()
    p.ctx:close()
end

-- A temporary path ending in suffix (os.tmpname makes a file of its own
-- name: it goes, only the name is used).
function M.tmp_path(suffix)
    local base = os.tmpname()
    os.remove(base)
    return base .. (suffix or "")
end

-- A scratch directory on a file system whose page-cache reads io_uring
-- finishes inside the submit (ext4, xfs, btrfs...), for specs whose subject
-- is such a read: tmpfs (/tmp on Debian 13, Fedora, Arch) and ramfs have no
-- nowait read path, so io_uring hands their buffered reads to its worker
-- threads and they finish after the submit, at a time of the scheduler's
-- choosing.  /tmp (os.tmpname's) if it is not one of those, else /var/tmp,
-- else the build tree; nil and M.NO_DISK_DIR when none is (checked once).
local MEMORY_FS = { tmpfs = true, ramfs = true }
local disk_dir
function M.disk_dir()
    if disk_dir == nil then
        disk_dir = false
        local tmp = os.tmpname()
        os.remove(tmp)
        local build = os.getenv("PLUVIO_LIB") and os.getenv("PLUVIO_LIB"):match("^(.*)/[^/]*$")
        for _, dir in ipairs({ tmp:match("^(.*)/[^/]*$"), "/var/tmp", build or (M.root .. "/build") }) do
            -- (LuaJIT's popen close gives no exit status: the shell says it)
            local p = io.popen("unset LD_PRELOAD; test -w " .. shell_quote(dir) ..
                               " && stat -f -c %T " .. shell_quote(dir) .. " 2>/dev/null")
            local fs = p:read("*l")
            p:close()
            if fs and not MEMORY_FS[fs] then
                disk_dir = dir
                break
            end
        end
    end
    return disk_dir or nil
end
M.NO_DISK_DIR = "/tmp, /var/tmp and the build tree are all on tmpfs or ramfs, whose buffered reads " ..
                "io_uring finishes in its worker threads, not inside the submit: not checked"

-- A new file holding content in M.disk_dir(); returns its path, or nil
-- when there is no such directory (the spec then says pending(M.NO_DISK_DIR)).
function M.disk_file_with(content)
    local dir = M.disk_dir()
    if not dir then
        return nil
    end
    local p = io.popen("unset LD_PRELOAD; mktemp " .. shell_quote(dir .. "/pluvio-spec.XXXXXX"))
    local path = p:read("*l")
    p:close()
    local f = assert(io.open(assert(path, "mktemp failed in " .. dir), "wb"))
    f:write(content)
    f:close()
    return path
end

-- Run code as a script under the pluvio host, with args after it and env
-- ("NAME=value ...") set for it; returns status, stdout, stderr, path.
-- Killed after SCRIPT_LIMIT seconds.
M.SCRIPT_LIMIT = 180
function M.run_script(code, args, env)
    local path = M.tmp_path(".lua")
    local f = assert(io.open(path, "w"))
    f:write(code)
    f:close()
    -- (bounded: a script that hangs fails its spec, status 124, instead
    -- of holding up the whole suite)
    local status, out, err = M.sh((env and env .. " " or "") .. "timeout -k 5 " .. M.SCRIPT_LIMIT .. " " ..
                                  shell_quote(M.host) .. " " .. shell_quote(path) .. " " .. (args or ""))
    os.remove(path)
    if status == 124 then
        err = err .. ("\n(the script did not finish within %d s: killed)"):format(M.SCRIPT_LIMIT)
    end
    return status, out, err, path
end

-- A new temporary file holding code (ext: its name's end, ".lua" by
-- default); returns its path (remove it when done).
function M.write_tmp(code, ext)
    local path = M.tmp_path(ext or ".lua")
    local f = assert(io.open(path, "w"))
    f:write(code)
    f:close()
    return path
end

-- Lua source to put before a script for M.run_script: hold_fds() opens
-- /dev/null until the process has no file descriptor left, and returns
-- the files (close some to have as many free again).
M.HOLD_FDS = [[
local function hold_fds()
    local held = {}
    while true do
        local h = io.open("/dev/null")
        if not h then return held end
        held[#held + 1] = h
    end
end
]]

-- Compile a stand-in for library functions (C source) to a shared object
-- preloaded into a script run by M.run_script, to make them fail on cue.
-- Returns the env for run_script and a function that removes the object.
-- (libpluvio and its liburing are loaded by the FFI, out of RTLD_NEXT's
-- reach: a stand-in finds liburing's real functions with
-- dlopen("liburing.so.2", RTLD_LAZY | RTLD_NOLOAD) and dlsym.)
function M.preload_shim(source)
    local dir = M.tmp_path(".d")
    assert(M.exec("mkdir -p " .. shell_quote(dir)) == 0, "mkdir " .. dir)
    local src = assert(io.open(dir .. "/shim.c", "w"))
    src:write(source)
    src:close()
    local shim = dir .. "/shim.so"
    local cc, _, cc_err = M.sh("cc -shared -fPIC -o " .. shell_quote(shim) .. " " ..
                               shell_quote(dir .. "/shim.c") .. " -ldl")
    assert(cc == 0, cc_err)
    return "LD_PRELOAD=" .. shell_quote(shim) .. " ASAN_OPTIONS=${ASAN_OPTIONS:+$ASAN_OPTIONS:}verify_asan_link_order=0",
           function() M.exec("rm -rf " .. shell_quote(dir)) end
end

-- Whether the loopback has ::1: a kernel booted with ipv6.disable=1, or a
-- container with IPv6 turned off, has not (/proc/net/if_inet6 lists it).
-- Specs then check IPv4 alone and say so with pending(M.NO_IPV6).
function M.ipv6_loopback()
    local f = io.open("/proc/net/if_inet6")
    local list = f and f:read("*a") or ""
    if f then f:close() end
    return ("\n" .. list):find("\n0+1 [^\n]* lo\n") ~= nil
end
M.NO_IPV6 = "the loopback has no IPv6 address (::1): IPv6 not checked"

-- Run fn as the main task of a fresh runtime (for specs of async code).
function M.async(fn)
    return function()
        return require("pluvio").run(fn)
    end
end

return M
