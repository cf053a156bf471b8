-- pluvio.uring_buffer: registered buffers of the io_uring reactor, as Lua
-- sees them (uring.Buffer): memory to fill, copy and check, and ownership
-- by a task (release, give, take, detach).  The pool itself is C's
-- (uring_buf.c); reactor:acquire_buffer (uring.lua) hands them out.
local pluvio = require "pluvio"
local core = require "pluvio.core"
local check = require "pluvio.check"

local ffi, C = core.ffi, core.C
local current_task = pluvio._current_task
local ffi_string, ffi_copy, ffi_fill = ffi.string, ffi.copy, ffi.fill
local type, format, getmetatable = type, string.format, getmetatable
local bit = require "bit"

local M = {}

local Buffer = {}
Buffer.__index = Buffer
M.Buffer = Buffer

local function live_buffer(fname, b, argname, level)
    level = level or 3
    if getmetatable(b) ~= Buffer then
        if argname then
            error(format("%s: %s must be a registered buffer (got %s)", fname, argname, type(b)), level)
        end
        error(format("%s: call it as a method on a registered buffer (buf:%s(...)); got %s as self", fname,
                     fname:match(":(.*)$"), type(b)), level)
    end
    if not b.base then
        error(fname .. ": the buffer was released" .. (b.gone or ""), level)
    end
    return b
end

-- A killed task's read_fixed or write_fixed on a buffer another task holds
-- (a pluvio.timeout around it, say) is cancelled, but the kernel may still
-- write into the buffer, or read it, until the cancel lands: the holder's
-- new bytes would be overwritten, or sent half-made.  Until then the
-- buffer's memory is refused (below) and an operation started on it waits
-- (settle).
local function usable(fname, b)
    live_buffer(fname, b, nil, 4)       -- (at our caller's caller: the user's line)
    if C.pl_uring_buffer_cancelled(b.reactor.u, b.index) > 0 then
        error(fname .. ": an operation of a killed task still uses the buffer (the kernel may still " ..
              "write into it or read it); buf:settle() waits until it has let go", 3)
    end
    return b
end

-- Functions that let go of what settled ops of other engines kept (UCX's
-- holds, let go of in Lua: ucx.lua adds its own when loaded).
local sweepers = {}
M.sweepers = sweepers

-- Wait in the running task until no operation of a killed task uses b:
-- a yield first (the loop submits the cancel and reaps its end), then
-- sleeps of growing length (a read the kernel could not stop ends when the
-- device is done with it).
local function settle(b, fname)
    local u, i, pause = b.reactor.u, b.index, 0
    while C.pl_uring_buffer_cancelled(u, i) > 0 do
        if pause == 0 then
            current_task(fname, 2)      -- (its wait would go to a plain coroutine's resumer)
        end
        pluvio.sleep(pause)
        for k = 1, #sweepers do
            sweepers[k]()
        end
        pause = pause == 0 and 1e-4 or math.min(2 * pause, 0.01)
    end
end
M.settle = settle

-- Validate [off, off + len) against the buffer; defaults: off 0, len rest.
local function span(fname, b, len, off)
    if type(off) == "nil" then      -- (not off or 0: false is no offset; nor == nil: NULL equals nil)
        off = 0
    end
    if type(off) ~= "number" or off % 1 ~= 0 or off < 0 or off > b.len then
        error(format("%s: offset must be an integer from 0 to %d (got %s)", fname, b.len, check.show(off)), 3)
    end
    if type(len) == "nil" then
        len = b.len - off
    elseif type(len) ~= "number" or len % 1 ~= 0 or len < 0 or off + len > b.len then
        error(format("%s: len must be an integer from 0 to %d (got %s)", fname, b.len - off,
                     check.show(len)), 3)
    end
    return len, off
end

function Buffer:ptr()
    usable("Buffer:ptr", self)
    return self.base
end

function Buffer:size()
    live_buffer("Buffer:size", self)
    return self.len
end

-- fill(byte[, len[, off]]): set bytes to byte (0-255).
function Buffer:fill(byte, len, off)
    usable("Buffer:fill", self)
    if type(byte) ~= "number" or byte % 1 ~= 0 or byte < 0 or byte > 255 then
        error("Buffer:fill: byte must be an integer from 0 to 255 (got " .. check.show(byte) .. ")", 2)
    end
    len, off = span("Buffer:fill", self, len, off)
    ffi_fill(self.base + off, len, byte)
    return self
end

-- write(str[, off]): copy a string into the buffer at off (default 0).
function Buffer:write(str, off)
    usable("Buffer:write", self)
    check.string("Buffer:write", "str", str)
    local _, o = span("Buffer:write", self, 0, off)
    if #str > self.len - o then     -- (span would name a length the caller never gave)
        error(format("Buffer:write: str of %d bytes does not fit at offset %d (the buffer holds %d bytes)",
                     #str, o, self.len), 2)
    end
    ffi_copy(self.base + o, str, #str)
    return #str
end

-- tostring([len[, off]]): the bytes as a Lua string.
function Buffer:tostring(len, off)
    usable("Buffer:tostring", self)
    len, off = span("Buffer:tostring", self, len, off)
    return ffi_string(self.base + off, len)
end

-- checksum([len[, off]]): 64-bit checksum of the bytes, as 16 hex digits.
function Buffer:checksum(len, off)
    usable("Buffer:checksum", self)
    len, off = span("Buffer:checksum", self, len, off)
    return bit.tohex(C.pl_checksum64(self.base + off, len, 0), 16)
end

-- fill_pattern(seed, file_offset[, len[, off]]): bytes that depend only on
-- seed and the file offset they will be written at (for verification).
function Buffer:fill_pattern(seed, file_offset, len, off)
    usable("Buffer:fill_pattern", self)
    check.integer("Buffer:fill_pattern", "seed", seed, 0, 2 ^ 53)
    check.integer("Buffer:fill_pattern", "file_offset", file_offset, 0, 2 ^ 53)
    len, off = span("Buffer:fill_pattern", self, len, off)
    C.pl_fill_pattern(self.base + off, len, seed, file_offset)
    return self
end

-- settle(): wait until no operation of a killed task uses the buffer (at
-- once when none does); returns the buffer.
function Buffer:settle()
    live_buffer("Buffer:settle", self)
    settle(self, "Buffer:settle")
    return self
end

-- The buffer back to its pool, or to the first task waiting for one: a
-- task of the runtime the reactor serves now, which need not be the one
-- the buffer was acquired in (a detached buffer outlives its run, and the
-- reactor may serve another runtime since: waking that one's waiter in the
-- old runtime failed, and the waiter waited for good).  A reactor
-- registered on none lends its buffers to one runtime: the buffer's.
local function give_back(b)
    local r = b.reactor
    C.pl_uring_buffer_release(r.u, (r.rt or b.rt).crt, b.index)
end

-- release(): give the buffer back to the pool (to the first waiter, if any).
function Buffer:release()
    if getmetatable(self) ~= Buffer then
        error("Buffer:release: call it as a method on a buffer (buf:release())", 2)
    end
    if not self.base then
        error("Buffer:release: the buffer was already released", 2)
    end
    self.base = nil
    if self.task then
        self.task:_disown(self)
    end
    give_back(self)
    return true
end

-- The buffer's owner becomes t (a task, or false: none).
local function set_owner(b, t)
    if b.task then
        b.task:_disown(b)
    end
    b.task = t
    if t then
        t:_own(b)
    end
    return b
end

-- give(task): the buffer belongs to task from now on (a live task of its
-- runtime), and is released when that task ends, not when its giver does:
-- for handing a filled buffer to the task that writes it out.
function Buffer:give(task)
    live_buffer("Buffer:give", self)
    if getmetatable(task) ~= pluvio.Task then
        error(format("Buffer:give: task must be a task (got %s)", check.show(task)), 2)
    end
    if task.rt ~= self.rt then
        error("Buffer:give: the task belongs to another runtime than the buffer", 2)
    end
    if not task.live then
        error(format("Buffer:give: %s has ended: it could never release the buffer", tostring(task)), 2)
    end
    return set_owner(self, task)
end

-- take(): the buffer belongs to the running task from now on.
function Buffer:take()
    live_buffer("Buffer:take", self)
    local t, rt = current_task("Buffer:take")
    if rt ~= self.rt then
        error("Buffer:take: the buffer belongs to another runtime than the running task", 2)
    end
    return set_owner(self, t)
end

-- detach(): the buffer belongs to no task: only release() gives it back
-- (for a buffer in a channel whose reader is not known yet; the reader
-- takes it).
function Buffer:detach()
    live_buffer("Buffer:detach", self)
    return set_owner(self, false)
end

-- owner(): the task the buffer belongs to, or nil when detached.
function Buffer:owner()
    live_buffer("Buffer:owner", self)
    return self.task or nil
end

-- Its owner ended without releasing it.
function Buffer:_task_exit(t)
    if self.base then
        self.base = nil
        self.gone = format(" when its task %q ended (give it to another task, or detach it, to keep it)",
                           t and t:name() or "?")
        self.reactor.buffers_reclaimed = self.reactor.buffers_reclaimed + 1
        give_back(self)
    end
end

function Buffer:__tostring()
    return format("registered buffer #%d (%d bytes%s)", self.index, self.len,
                  self.base and "" or ", released")
end

M.live_buffer = live_buffer

return M
