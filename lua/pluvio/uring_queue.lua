-- pluvio.uring_queue: I/O queues, installed into pluvio.uring.
--
-- One task keeps many reads and writes in flight on a queue and takes
-- their completions in the order they finish, instead of one task per
-- operation.  At high queue depths on the page cache a task switch per
-- read costs more than the read: a queue pays one switch per batch.
--
--   local q = uring.io_queue()
--   q:read_fixed(f, buf, offset, len, tag)    -- starts, does not wait
--   local tag, n, err = q:wait()              -- the next completion
--
-- C keeps the finished op ids in a FIFO per queue (uring_queue.c); this
-- side keeps what each op needs for its result, in arrays indexed by op id
-- (no garbage per operation).
local pluvio = require "pluvio"
local core = require "pluvio.core"
local check = require "pluvio.check"

local ffi, C = core.ffi, core.C
local format, type, setmetatable, getmetatable = string.format, type, setmetatable, getmetatable
local running_task, current_task = pluvio._running_task, pluvio._current_task
local walk = next          -- walk tables with `for k, v in walk, t`, not pairs(): see task.lua

local M = {}

local EAGAIN, ENOENT = -11, -2
local BUF_CANCELLED = -C.PL_EBUFCANCELLED
local settle = require("pluvio.uring_buffer").settle
local weak_keys = { __mode = "k" }

function M.install(U)
    local I = U._internal
    local context, fixed_io, fixed_result = I.context, I.fixed_io, I.fixed_result
    local park, WAIT_IO = I.park, I.WAIT_IO
    local File, DmaFile, IoUringReactor = U.File, U.DmaFile, U.IoUringReactor

    local IoQueue = {}
    IoQueue.__index = IoQueue
    U.IoQueue = IoQueue

    -- A queue is closed when its task ends.  The task holds it only while
    -- some op started on it is not taken yet (q.started, counted here: no
    -- call into C per op), in its resources; an idle one it holds weakly,
    -- in t.io_queues (QueueOwner, in its resources once, closes those at
    -- its end), so that a long-lived task that makes queues and drops them
    -- does not keep each (its Lua objects and a C slot) until it ends: the
    -- guard of a collected one frees its slot.  Never one with an op the
    -- kernel may still have: its file, collected with it, would close an
    -- fd that a queued SQE then reads or writes under its next owner.
    local QueueOwner = {}

    local function free(q)
        local n = C.pl_uring_queue_free(q.u, q.id)
        q.id = -1
        q.guard[0] = -1
        q.tags, q.files = {}, {}
        return n
    end

    function QueueOwner._task_exit(_, t)
        local queues = t.io_queues
        t.io_queues = nil
        for q in walk, queues do
            if q.id >= 0 then
                free(q)
            end
        end
    end

    -- Frees the slot of a queue nobody refers to (so none of its ops is
    -- pending); the reactor may be freed already at exit (life says so).
    local function queue_guard(u, life, id)
        return ffi.gc(ffi.new("int[1]", id), function(cell)
            if cell[0] >= 0 and life.open then
                C.pl_uring_queue_free(u, cell[0])
            end
        end)
    end

    local function new_queue(fname, r, t)
        local id = C.pl_uring_queue_new(r.u, t.slot, t.gen)
        if id < 0 then
            error(fname .. ": cannot make an I/O queue: " .. core.errstr(id), 3)
        end
        local q = setmetatable({
            reactor = r, u = r.u, id = id, owner = t,
            -- per op id + 1: the tag and file it reports with (its offset
            -- and length come back with its result, from C)
            tags = {}, files = {},
            result = ffi.new("pl_uring_result_t"),
            started = 0,        -- ops started and not taken by wait
            guard = queue_guard(r.u, r.life, id),
        }, IoQueue)
        local queues = t.io_queues
        if not queues then
            queues = setmetatable({}, weak_keys)
            t.io_queues = queues
            t:_own(QueueOwner)
        end
        queues[q] = true
        return q
    end

    -- reactor:io_queue(): an I/O queue on this reactor for the running task.
    function IoUringReactor:io_queue()
        I.reactor_self("IoUringReactor:io_queue", self)
        local t, rt = running_task("IoUringReactor:io_queue")
        if self.rt ~= rt then       -- its completions would reach that runtime only, or none
            error("IoUringReactor:io_queue: the reactor is " ..
                  (self.rt and "registered on another runtime" or "registered on no runtime") ..
                  " (a queue's operations complete in the runtime the reactor is registered on: use " ..
                  "uring.io_queue() for this one's)", 2)
        end
        local q = new_queue("IoUringReactor:io_queue", self, t)
        return q        -- (not a tail call: new_queue's error names our caller's line)
    end

    -- uring.io_queue(): the same on the running runtime's reactor.
    function U.io_queue()
        local t, r = context("uring.io_queue")
        local q = new_queue("uring.io_queue", r, t)
        return q
    end

    -- The queue, open, used by the task that made it (only its owner takes
    -- completions: another task's wait would leave the owner's unseen).
    local function own_queue(fname, q)
        if getmetatable(q) ~= IoQueue then
            error(format("%s: call it as a method on an I/O queue (q:%s(...)); got %s as self",
                         fname, fname:match(":(.*)$"), type(q)), 3)
        end
        if q.id < 0 then
            error(fname .. ": the I/O queue is closed", 3)
        end
        local t = running_task(fname)
        if t ~= q.owner then
            error(format("%s: the I/O queue belongs to %s, not to %s", fname,
                         tostring(q.owner), tostring(t)), 3)
        end
        return t
    end

    local function queue_file(fname, q, f)
        local mt = getmetatable(f)
        if mt ~= File and mt ~= DmaFile then
            error(format("%s: file must be a File or DmaFile (got %s)", fname, check.show(f)), 3)
        end
        if f.reactor ~= q.reactor then
            error(fname .. ": the file belongs to another io_uring reactor than the queue", 3)
        end
    end

    -- q:read_fixed(file, buf, offset[, len[, tag]]): start a read into a
    -- registered buffer; returns true (or nil, err when it cannot start).
    -- q:wait() gives tag back with the result; tag defaults to buf.
    function IoQueue:read_fixed(f, buf, offset, len, tag)
        own_queue("IoQueue:read_fixed", self)
        queue_file("IoQueue:read_fixed", self, f)
        return fixed_io(f, "IoQueue:read_fixed", false, buf, offset, len, self, tag)
    end

    -- q:write_fixed(file, buf, offset[, len[, tag]]): the same for a write.
    function IoQueue:write_fixed(f, buf, offset, len, tag)
        own_queue("IoQueue:write_fixed", self)
        queue_file("IoQueue:write_fixed", self, f)
        return fixed_io(f, "IoQueue:write_fixed", true, buf, offset, len, self, tag)
    end

    -- Called by fixed_io once the arguments are checked.
    function IoQueue:_start(f, write, buf, offset, len, tag)
        local start = write and C.pl_uring_queue_write or C.pl_uring_queue_read
        local op = start(self.u, self.id, f.fd, buf.base, len, offset, buf.index)
        if op == BUF_CANCELLED then         -- a killed task's op still has the buffer
            settle(buf, write and "IoQueue:write_fixed" or "IoQueue:read_fixed")
            op = start(self.u, self.id, f.fd, buf.base, len, offset, buf.index)
        end
        if op < 0 then
            return fixed_result(f, write, offset, len, op)
        end
        local k = op + 1
        if type(tag) == "nil" then      -- (not == nil: a NULL pointer tag is a tag)
            tag = buf
        end
        self.tags[k], self.files[k] = tag, f
        local n = self.started
        if n == 0 then
            self.owner:_own(self)      -- held while an op is pending (see QueueOwner)
        end
        self.started = n + 1
        return true
    end

    -- Park until an op of q finishes or the deadline (pl_now) passes;
    -- returns the op id, or nil at the deadline.
    local function park_for(t, q, fname, deadline)
        current_task(fname, 1)      -- not from a plain coroutine: its yield would go elsewhere
        local crt = t.rt.crt
        if deadline then
            C.pl_task_set_timer(crt, t.slot, deadline)
        end
        local u, id, result, op = q.u, q.id, q.result, EAGAIN
        repeat
            park(t, WAIT_IO, -1 - id, q, fname)     -- (the wait argument C wakes)
            op = C.pl_uring_queue_take(u, id, result)
        until op ~= EAGAIN or (deadline and C.pl_now() >= deadline)
        if deadline then
            C.pl_task_clear_timer(crt, t.slot)
        end
        if op == EAGAIN then
            return nil
        end
        return op
    end

    -- q:wait([seconds]): park until one of the queue's ops finishes;
    -- returns its tag and what read_fixed / write_fixed would have
    -- returned: the bytes, or nil, err, errno name, bytes done.
    -- Completions come in the order the kernel finishes them.  With
    -- seconds: nil, "timeout" when none finished by then.  Raises when
    -- nothing is in flight.
    function IoQueue:wait(seconds)
        local t = own_queue("IoQueue:wait", self)
        if type(seconds) ~= "nil" and (type(seconds) ~= "number" or seconds ~= seconds or seconds < 0 or seconds > 1e9) then
            check.fail("IoQueue:wait", "seconds must be a finite number from 0 to 1e9", seconds)
        end
        local result = self.result
        local op = C.pl_uring_queue_take(self.u, self.id, result)
        if op == EAGAIN then
            op = park_for(t, self, "IoQueue:wait", seconds and C.pl_now() + seconds)
            if not op then
                return nil, "timeout"
            end
        end
        if op == ENOENT then
            error("IoQueue:wait: nothing is in flight on this queue (start a read or write first)", 2)
        elseif op < 0 then
            error("IoQueue:wait: " .. core.errstr(op), 2)
        end
        local k = op + 1
        local tags, files = self.tags, self.files
        local tag, f = tags[k], files[k]
        tags[k], files[k] = nil, nil    -- hold no reference past the op
        local n = self.started - 1
        self.started = n
        if n == 0 then
            self.owner:_disown(self)   -- idle: the task holds it weakly
        end
        return tag, fixed_result(f, result.write ~= 0, result.offset, result.len, result.res, result.bytes)
    end

    -- q:pending(): ops started and not yet taken by wait.
    function IoQueue:pending()
        if getmetatable(self) ~= IoQueue then
            error("IoQueue:pending: call it as a method on an I/O queue (q:pending())", 2)
        end
        if self.id < 0 then
            return 0
        end
        return C.pl_uring_queue_pending(self.u, self.id)
    end

    -- q:close(): cancel the ops still in flight (their buffers stay in use
    -- until the kernel lets go) and drop finished ones not taken; returns
    -- how many were cancelled, or false when it was closed already (as every
    -- close).  The queue closes by itself when its task ends.
    function IoQueue:close()
        if getmetatable(self) == IoQueue and self.id < 0 then
            return false
        end
        own_queue("IoQueue:close", self)
        self.owner:_disown(self)
        self.owner.io_queues[self] = nil
        return free(self)
    end

    -- Its task ended with the queue open.
    function IoQueue:_task_exit()
        if self.id >= 0 then
            free(self)
        end
    end

    function IoQueue:describe()
        if getmetatable(self) ~= IoQueue then     -- (a closed one too: as own_queue words it)
            error(format("IoQueue:describe: call it as a method on an I/O queue (q:describe(...)); got %s as self",
                         type(self)), 2)
        end
        if self.id < 0 then
            return "a closed I/O queue"
        end
        return format("an I/O queue (%d pending)", C.pl_uring_queue_pending(self.u, self.id))
    end

    function IoQueue:__tostring()
        return "IoQueue(" .. (self.id < 0 and "closed" or self:describe():match("%((.*)%)")) .. ")"
    end

end

return M
