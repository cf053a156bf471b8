-- pluvio.uring_file: files over the io_uring reactor, part of pluvio.uring:
-- DmaFile (O_DIRECT, alignment checked before submission) and File
-- (buffered) with the same methods, and the path operations (uring.statx,
-- unlink, rmdir, rename, mkdir).  Installed into pluvio.uring, whose
-- reactor runs the operations.
local core = require "pluvio.core"
local check = require "pluvio.check"

local ffi, C = core.ffi, core.C
local errstr = core.errstr
local ffi_string, ffi_copy, ffi_cast = ffi.string, ffi.copy, ffi.cast
local type, format, setmetatable, getmetatable = type, string.format, setmetatable, getmetatable
local tonumber = tonumber
local bit = require "bit"

local M = {}

local ECANCELED = -125
local AT_FDCWD, AT_EMPTY_PATH, AT_REMOVEDIR = -100, 0x1000, 0x200
local MAX_IO = 0x7ffff000          -- Linux caps one read/write at this many bytes

-- A path for the kernel: a string without NUL bytes (the kernel would stop
-- at the first one and act on another file: "x\0.bak" would unlink "x").
local function check_path(fname, argname, path, level)
    level = level or 3
    check.string(fname, argname, path, level + 1)
    check.no_nul(fname, argname, path, level + 1)
    return path
end

function M.install(U)
    local I = U._internal
    local context, current_task, io_task, run_op = I.context, I.current_task, I.io_task, I.run_op
    local op_context = I.op_context
    local bounce_get, bounce_put, acquire = I.bounce_get, I.bounce_put, I.acquire
    local run_ended, close_idle, close_guard, forget_fd = I.run_ended, I.close_idle, I.close_guard, I.forget_fd
    local left_busy, live_buffer, Buffer = I.left_busy, I.live_buffer, U.Buffer
    local settle = require("pluvio.uring_buffer").settle
    local BUF_CANCELLED = -C.PL_EBUFCANCELLED

    ---------------------------------------------------------------------------
    -- Files
    ---------------------------------------------------------------------------

    local File = {}
    File.__index = File
    U.File = File

    local DmaFile = setmetatable({}, { __index = File })
    DmaFile.__index = DmaFile
    U.DmaFile = DmaFile

    local function is_file(f)
        local mt = getmetatable(f)
        return mt == File or mt == DmaFile
    end

    -- The name a File method goes by in errors: DmaFile's share File's code.
    local function file_fname(fname, f)
        if f and f.direct then
            return (fname:gsub("^File", "DmaFile"))
        end
        return fname
    end

    local function self_file(fname, f)
        if not is_file(f) then
            error(format("%s: call it as a method on a file (f:%s(...)); got %s as self",
                         fname, fname:match("[:.](.*)$"), type(f)), 3)
        end
        if f.fd < 0 then
            error(file_fname(fname, f) .. ": the file is closed (" .. f.path .. ")", 3)
        end
        return f
    end

    function File:describe()
        if not is_file(self) then
            error(format("File:describe: call it as a method on a file (f:describe(...)); got %s as self", type(self)), 2)
        end
        return "io on " .. self.path
    end

    function File:__tostring()
        return format("%s %s (fd %d%s)", self.direct and "DmaFile" or "File", self.path, self.fd,
                      self.fd < 0 and ", closed" or "")
    end

    -- The operations that move data, whose EINVAL on an O_DIRECT file is
    -- most likely its alignment rules (a truncate's or fallocate's is not).
    local MOVES_DATA = { read = true, write = true, readv = true, writev = true }

    -- The message of a failed operation: what, on which file, errno and a hint.
    local function fail(f, what, rc, detail, bytes)
        local hint = ""
        if f.direct and rc == -22 and MOVES_DATA[what] then
            hint = format(" (O_DIRECT needs offset and length multiples of %d and memory aligned to %d on this file)",
                          f.offset_align, f.mem_align)
            if f.append and what:find("^write") then    -- (the offset checked was not the one used)
                hint = format(" (opened to append: a write goes to the end of the file whatever its offset, " ..
                              "and with O_DIRECT that end must be a multiple of %d)", f.offset_align)
            end
        elseif rc == ECANCELED and f.fd and f.fd < 0 then
            hint = " (the file was closed)"
        end
        local msg = format("%s %s%s: %s%s", what, f.path, detail or "", errstr(rc), hint)
        if bytes and bytes > 0 then
            msg = msg .. format(" (%d bytes done before the error)", bytes)
        end
        return nil, msg, ffi_string(C.pl_errname(rc)), bytes or 0
    end

    -- O_DIRECT alignment rules, checked before anything is submitted.
    local function check_direct(fname, f, offset, len, addr)
        if not f.direct then
            return
        end
        local a = f.offset_align
        if offset % a ~= 0 then
            error(format("%s: O_DIRECT offset %d is not a multiple of %d (the file's O_DIRECT alignment) on %s",
                         file_fname(fname, f), offset, a, f.path), 3)
        end
        if len % a ~= 0 then
            error(format("%s: O_DIRECT length %d is not a multiple of %d (the file's O_DIRECT alignment) on %s",
                         file_fname(fname, f), len, a, f.path), 3)
        end
        local at = addr and tonumber(ffi_cast("uintptr_t", addr))
        if at and at % f.mem_align ~= 0 then
            error(format("%s: O_DIRECT buffer address 0x%x is not aligned to %d bytes on %s",
                         file_fname(fname, f), at, f.mem_align, f.path), 3)
        end
    end

    local function check_offset(fname, offset, f)
        if type(offset) ~= "number" or offset ~= offset or offset % 1 ~= 0 or offset < 0 or offset > 2 ^ 62 then
            error(format("%s: offset must be an integer from 0 to 2^62 (got %s)", file_fname(fname, f), check.show(offset)), 3)
        end
    end

    local function check_len(fname, len, max, f, min)
        min = min or 0
        if type(len) ~= "number" or len ~= len or len % 1 ~= 0 or len < min or len > max then
            error(format("%s: len must be an integer from %d to %d (got %s)", file_fname(fname, f), min, max,
                         check.show(len)), 3)
        end
    end

    -- A file belongs to the runtime it was opened in: its ops go to that
    -- runtime's ring, which another runtime's loop never reaps (the task would
    -- wait for good).
    local function foreign_file(fname, f, level)
        error(format("%s: %s was opened in another runtime (its io_uring reactor is that runtime's): " ..
                     "use it there, or open it again in this one", file_fname(fname, f), f.path), level + 1)
    end

    -- The running task for an operation on file f, and f's reactor (called by
    -- the method itself, or by a helper it tail-calls: errors name the user).
    local function file_task(fname, f)
        local t, rt = io_task(fname, 1)
        local r = f.reactor
        if r.rt ~= rt then
            foreign_file(fname, f, 3)
        end
        return t, r
    end

    local statx_buf_size = C.pl_uring_statx_size()

    -- statx's type field, by the S_IFMT bits of the mode (no symbolic link:
    -- uring.statx follows them, f:statx holds the file).
    local FILE_TYPES = {
        [0x8000] = "file", [0x4000] = "directory", [0x6000] = "block device",
        [0x2000] = "char device", [0x1000] = "fifo", [0xC000] = "socket",
    }

    local function stat_table(raw)
        local s = ffi.new("pl_file_stat_t")
        C.pl_uring_statx_decode(raw, s)
        return {
            size = s.size, blocks = s.blocks, blksize = s.blksize, mode = s.mode,
            uid = s.uid, gid = s.gid, nlink = s.nlink, ino = s.ino,
            atime = s.atime, mtime = s.mtime, ctime = s.ctime, btime = s.btime,
            dio_mem_align = s.dio_mem_align, dio_offset_align = s.dio_offset_align,
            dev_major = s.dev_major, dev_minor = s.dev_minor,
            rdev_major = s.rdev_major, rdev_minor = s.rdev_minor,
            type = FILE_TYPES[bit.band(s.mode, 0xF000)] or "other",
        }
    end

    local function statx_op(r, t, dirfd, path, flags, what)
        local raw = ffi.new("uint8_t[?]", statx_buf_size)
        local rc = run_op(r, t, C.pl_uring_statx(r.u, t.slot, t.gen, dirfd, path, flags, raw), what,
                          { path, raw })
        if rc < 0 then
            return nil, rc
        end
        return stat_table(raw)
    end

    local function wrap_fd(cls, r, fd, path, direct)
        return setmetatable({
            reactor = r, fd = fd, path = path, direct = direct,
            offset_align = 1, mem_align = 1,
        }, cls)
    end

    -- Learn the O_DIRECT rules of an open file (STATX_DIOALIGN where the kernel
    -- reports it, else the file system's block size).
    local function learn_alignment(f, t)
        if not f.direct then
            return
        end
        local st = statx_op(f.reactor, t, f.fd, "", AT_EMPTY_PATH, f)
        if st and st.dio_offset_align > 0 then
            f.offset_align, f.mem_align = st.dio_offset_align, st.dio_mem_align
        else
            f.offset_align = 512
            f.mem_align = 512
        end
    end

    -- perms: an integer mode.  Lua has no octal literals: 644 is decimal
    -- 644, mode 01204 (sticky, and no read for the owner), which open and
    -- mkdir took as given.  A three-digit number from 512 to 777 written
    -- with octal digits only is that mistake, never a mode anybody means.
    local function check_perms(fname, perms, level)
        check.integer(fname, "perms", perms, 0, 4095, level + 1)
        local digits = format("%d", perms)
        if perms >= 512 and perms <= 777 and not digits:find("[89]") then
            error(format('%s: perms %s is decimal here (octal %o, with the sticky bit): Lua has no octal ' ..
                         'literals; write tonumber("%s", 8), which is %d', fname, digits, perms, digits,
                         tonumber(digits, 8)), level)
        end
    end

    local function open_file(cls, fname, direct, path, mode, perms)
        check_path(fname, "path", path, 4)         -- (4: the user called File.open, which called us)
        if type(mode) == "nil" then     -- (not == nil: a NULL pointer equals nil)
            mode = "r"
        end
        check.string(fname, "mode", mode, 4)
        local flags = C.pl_file_flags(mode, direct and 1 or 0)
        if flags < 0 or mode:find("\0", 1, true) then     -- (C reads "r\0x" as "r")
            error(format('%s: mode must be one of "r", "w", "a", "r+", "w+", "a+", each also with a "b" (got %s)',
                         fname, check.show(mode)), 3)
        end
        if type(perms) == "nil" then
            perms = 420     -- 0644
        end
        check_perms(fname, perms, 4)
        local t, r, code = op_context(fname, 1)
        if not t then
            return nil, r, code
        end
        local fd = run_op(r, t, C.pl_uring_openat(r.u, t.slot, t.gen, path, flags, perms), path, path)
        if fd < 0 then
            local hint = ""
            if direct and fd == -22 then    -- (a kill here leaves nothing open)
                local st = statx_op(r, t, AT_FDCWD, path, 0, path)
                local kind = st and st.type ~= "file" and st.type ~= "block device" and st.type
                hint = kind and format(" (O_DIRECT needs a regular file or a block device, and this is a %s)", kind)
                    or " (this file system may not support O_DIRECT: use uring.File)"
            end
            -- (not the file: its O_DIRECT rules, which fail would cite, are not known yet)
            local _, msg, code = fail({ path = path }, "open", fd, format(" (mode %q)", mode))
            return nil, msg .. hint, code
        end
        local f = wrap_fd(cls, r, fd, path, direct)
        f.append = mode:find("a", 1, true) ~= nil or nil
        f.guard = close_guard(fd)
        t:_own(f)               -- a kill at the statx below closes the fd
        learn_alignment(f, t)
        t:_disown(f)
        return f
    end

    -- DmaFile.open(path[, mode[, perms]]): open with O_DIRECT through io_uring.
    function DmaFile.open(path, mode, perms)
        local f, err, code = open_file(DmaFile, "DmaFile.open", true, path, mode, perms)
        return f, err, code
    end

    -- File.open(path[, mode[, perms]]): open buffered through io_uring.
    function File.open(path, mode, perms)
        local f, err, code = open_file(File, "File.open", false, path, mode, perms)
        return f, err, code
    end

    local function new_from_fd(cls, fname, direct, fd, path)
        check.integer(fname, "fd", fd, 0, 2 ^ 31 - 1, 4)
        if type(path) ~= "nil" then     -- (every error about the file names it: File:read's concatenates it)
            check.string(fname, "name", path, 4)
        end
        local has = C.pl_file_fd_direct(fd)
        if has < 0 then
            error(format("%s: fd %d is not open (%s)", fname, fd, errstr(has)), 3)
        elseif direct and has == 0 then
            error(format("%s: fd %d was not opened with O_DIRECT (wrap it with File.new, or open it " ..
                         "with O_DIRECT)", fname, fd), 3)
        elseif not direct and has == 1 then
            error(format("%s: fd %d was opened with O_DIRECT (wrap it with DmaFile.new, which checks " ..
                         "the O_DIRECT rules)", fname, fd), 3)
        end
        local t, r = context(fname, 1)
        local f = wrap_fd(cls, r, fd, path or ("fd " .. fd), direct)    -- (no guard: the fd came from the caller)
        learn_alignment(f, t)
        return f
    end

    -- DmaFile.new(fd[, name]): wrap an fd opened with O_DIRECT; close() closes it.
    function DmaFile.new(fd, name)
        local f = new_from_fd(DmaFile, "DmaFile.new", true, fd, name)
        return f
    end

    function File.new(fd, name)
        local f = new_from_fd(File, "File.new", false, fd, name)
        return f
    end

    -- What read_fixed / write_fixed return for an op's result: the bytes, or
    -- nil, err, ... (a write the device stopped taking without an error is
    -- ENOSPC).  Shared with the I/O queue's wait.
    local function fixed_result(f, write, offset, len, res, bytes)
        if res < 0 then
            return fail(f, write and "write" or "read", res, format(" (offset %d, %d bytes)", offset, len), bytes)
        end
        if write and res < len then
            return fail(f, "write", -28, format(" (offset %d, %d bytes)", offset, len), res)
        end
        return res
    end

    -- read_fixed / write_fixed: the checks and the op, one body for both (and
    -- for an I/O queue's, which starts the op on queue with tag instead).
    local function fixed_io(self, fname, write, buf, offset, len, queue, tag)
        self_file(fname, self)
        if getmetatable(buf) ~= Buffer or not buf.base then
            live_buffer(file_fname(fname, self), buf, "buf")
        end
        check_offset(fname, offset, self)
        if type(len) == "nil" then      -- (not == nil: a NULL pointer equals nil)
            len = buf.len
        else
            check_len(fname, len, buf.len, self)
        end
        local r = self.reactor
        if buf.reactor ~= r then
            error(fname .. ": the buffer belongs to another io_uring reactor", 2)  -- (tail-called)
        end
        check_direct(fname, self, offset, len, buf.base)
        if queue then
            return queue:_start(self, write, buf, offset, len, tag)
        end
        local t = file_task(fname, self)    -- (tail-called)
        local start = write and C.pl_uring_write or C.pl_uring_read
        local op = start(r.u, t.slot, t.gen, self.fd, buf.base, len, offset, buf.index)
        if op == BUF_CANCELLED then         -- a killed task's op still has the buffer
            settle(buf, fname)
            op = start(r.u, t.slot, t.gen, self.fd, buf.base, len, offset, buf.index)
        end
        local res, bytes = run_op(r, t, op, self)
        return fixed_result(self, write, offset, len, res, bytes)
    end

    -- f:read_fixed(buf, offset[, len]): read into a registered buffer; returns
    -- the bytes read (fewer only at end of file) or nil, err.
    function File:read_fixed(buf, offset, len)
        return fixed_io(self, "File:read_fixed", false, buf, offset, len)  -- a tail call: errors point at our caller
    end

    -- f:write_fixed(buf, offset[, len]): write from a registered buffer; returns
    -- the bytes written (all of them; a short write is continued) or nil, err.
    function File:write_fixed(buf, offset, len)
        return fixed_io(self, "File:write_fixed", true, buf, offset, len)
    end

    -- f:read(offset, len): the bytes as a string (shorter only at end of file).
    function File:read(offset, len)
        self_file("File:read", self)
        check_offset("File:read", offset, self)
        check_len("File:read", len, MAX_IO, self)
        check_direct("File:read", self, offset, len)
        local t, r = file_task("File:read", self)
        local scratch, err = bounce_get(r, len)
        if not scratch then
            return core.noted(core.no_scratch(len), fail(self, "read", err, format(" (offset %d, %d bytes)", offset, len)))
        end
        local res, bytes = run_op(r, t, C.pl_uring_read(r.u, t.slot, t.gen, self.fd, scratch.ptr, len, offset, -1),
                                  self, scratch)
        if res < 0 then
            -- the bytes read before the error, as a 5th value: from a pipe or
            -- a socket wrapped with File.new they cannot be read again
            local got = bytes and bytes > 0 and ffi_string(scratch.ptr, bytes) or nil
            bounce_put(r, scratch)
            local _, msg, code, n = fail(self, "read", res, format(" (offset %d, %d bytes)", offset, len), bytes)
            if got then
                return nil, msg, code, n, got
            end
            return nil, msg, code, n
        end
        local s = ffi_string(scratch.ptr, res)
        bounce_put(r, scratch)
        return s
    end

    -- f:write(offset, data): write a string; returns #data or nil, err.
    function File:write(offset, data)
        self_file("File:write", self)
        check_offset("File:write", offset, self)
        if type(data) ~= "string" then
            check.string(file_fname("File:write", self), "data", data)
        end
        local len = #data
        if len > MAX_IO then
            error(format("%s: data must be at most %d bytes, Linux's most for one transfer (got %d)",
                         file_fname("File:write", self), MAX_IO, len), 2)
        end
        check_direct("File:write", self, offset, len)
        local t, r = file_task("File:write", self)
        local scratch, err = bounce_get(r, len)
        if not scratch then
            return core.noted(core.no_scratch(len), fail(self, "write", err, format(" (offset %d, %d bytes)", offset, len)))
        end
        ffi_copy(scratch.ptr, data, len)
        local res, bytes = run_op(r, t, C.pl_uring_write(r.u, t.slot, t.gen, self.fd, scratch.ptr, len, offset, -1),
                                  self, scratch)
        bounce_put(r, scratch)
        if res < 0 then
            return fail(self, "write", res, format(" (offset %d, %d bytes)", offset, len), bytes)
        end
        if res < len then
            return fail(self, "write", -28, format(" (offset %d, %d bytes)", offset, len), res)
        end
        return res
    end

    -- The parts of a readv / writev as iovecs (in the reactor's array, which C
    -- copies); returns their count, total bytes and what the op must keep.
    local function vector(fname, f, r, offset, parts, lens, strings_ok)
        local kinds = strings_ok and "registered buffers or strings" or "registered buffers"
        local pname = strings_ok and "parts" or "bufs"      -- (as the docs name readv's and writev's)
        if type(parts) ~= "table" or getmetatable(parts) == Buffer then
            local got = type(parts) == "table" and "a single buffer: write {buf}" or check.show(parts)
            error(format("%s: %s must be a list of %s (got %s)", file_fname(fname, f), pname, kinds, got), 3)
        end
        local n, max = #parts, C.PL_URING_IOV_MAX
        if n < 1 or n > max then
            error(format("%s: %s must hold 1 to %d entries (got %d)", file_fname(fname, f), pname, max, n), 3)
        end
        local last = table.maxn(parts)  -- (# may stop at a hole: the parts after it were dropped)
        if last ~= n then
            error(format("%s: parts has a hole: entry %d is nil, entry %d is not", file_fname(fname, f), n + 1, last), 3)
        end
        if type(lens) ~= "nil" and type(lens) ~= "table" then
            error(format("%s: lens must be nil or a list of byte counts (got %s)", file_fname(fname, f), check.show(lens)), 3)
        end
        if lens and table.maxn(lens) > n then  -- (a count for a part left out of the list)
            error(format("%s: lens has %d entries for %d part%s (one byte count per part)", file_fname(fname, f),
                         table.maxn(lens), n, n == 1 and "" or "s"), 3)
        end
        local iov, total = r.iov, 0
        local keep              -- the strings among the parts (they must outlive a killed op;
                                -- a registered buffer's memory is C's, counted in use by C)
        for i = 1, n do
            local p = parts[i]
            local ptr, size
            if getmetatable(p) == Buffer then
                if not p.base then
                    error(format("%s: part %d, %s, was released", file_fname(fname, f), i, tostring(p)), 3)
                end
                if p.reactor ~= r then
                    error(format("%s: part %d belongs to another io_uring reactor", file_fname(fname, f), i), 3)
                end
                ptr, size = p.base, p.len
            elseif strings_ok and type(p) == "string" then
                ptr, size = p, #p
            else
                error(format("%s: part %d must be a registered buffer%s (got %s)", file_fname(fname, f), i,
                             strings_ok and " or a string" or "", check.show(p)), 3)
            end
            local len = size
            if lens then
                len = lens[i]
                if type(len) ~= "number" or len % 1 ~= 0 or len < 0 or len > size then
                    error(format("%s: lens[%d] must be an integer from 0 to %d, the size of part %d (got %s)",
                                 file_fname(fname, f), i, size, i, check.show(len)), 3)
                end
            end
            if f.direct then
                local a = f.offset_align
                if len % a ~= 0 then
                    error(format("%s: O_DIRECT length %d of part %d is not a multiple of %d (the file's O_DIRECT " ..
                                 "alignment) on %s", file_fname(fname, f), len, i, a, f.path), 3)
                end
                local at = tonumber(ffi_cast("uintptr_t", ptr))
                if at % f.mem_align ~= 0 then
                    error(format("%s: O_DIRECT address 0x%x of part %d is not aligned to %d bytes on %s " ..
                                 "(a string is aligned only by chance: use registered buffers)", file_fname(fname, f), at, i, f.mem_align, f.path), 3)
                end
            end
            iov[i - 1].base = ffi_cast("void *", ptr)
            iov[i - 1].len = len
            total = total + len
            if type(p) == "string" then
                keep = keep or {}
                keep[#keep + 1] = p
            end
        end
        if total > MAX_IO then
            error(format("%s: the parts hold %d bytes; one operation moves at most %d", file_fname(fname, f), total, MAX_IO), 3)
        end
        if f.direct and offset % f.offset_align ~= 0 then
            error(format("%s: O_DIRECT offset %d is not a multiple of %d (the file's O_DIRECT alignment) on %s",
                         file_fname(fname, f), offset, f.offset_align, f.path), 3)
        end
        return n, total, keep   -- C counts registered parts in use, as for read_fixed
    end

    -- readv / writev: the checks and the op, one body for both.
    local function vectored_io(self, fname, write, offset, parts, lens)
        self_file(fname, self)
        check_offset(fname, offset, self)
        local t, r = file_task(fname, self)     -- (tail-called)
        local n, total, keep = vector(fname, self, r, offset, parts, lens, write)
        local start = write and C.pl_uring_writev or C.pl_uring_readv
        local op = start(r.u, t.slot, t.gen, self.fd, r.iov, n, offset)
        while op == BUF_CANCELLED do        -- a killed task's op still has one of the buffers
            for i = 1, n do
                if getmetatable(parts[i]) == Buffer then
                    settle(parts[i], fname)
                end
            end
            n, total, keep = vector(fname, self, r, offset, parts, lens, write)  -- (r.iov may be another's now)
            op = start(r.u, t.slot, t.gen, self.fd, r.iov, n, offset)
        end
        local res, bytes = run_op(r, t, op, self, keep)
        local what = write and "writev" or "readv"
        if res < 0 then
            return fail(self, what, res, format(" (offset %d, %d bytes in %d parts)", offset, total, n), bytes)
        end
        if write and res < total then   -- the device stopped taking data without an error
            return fail(self, what, -28, format(" (offset %d, %d bytes in %d parts)", offset, total, n), res)
        end
        return res
    end

    -- f:readv(offset, bufs[, lens]): read into registered buffers in order (lens[i]
    -- bytes into bufs[i], default all of it); returns the bytes read (fewer only
    -- at end of file) or nil, err.
    function File:readv(offset, bufs, lens)
        return vectored_io(self, "File:readv", false, offset, bufs, lens)  -- a tail call, as above
    end

    -- f:writev(offset, parts[, lens]): write registered buffers and strings in
    -- order, as one operation; returns the bytes written (all of them) or nil, err.
    function File:writev(offset, parts, lens)
        return vectored_io(self, "File:writev", true, offset, parts, lens)
    end

    -- An op on the file's fd with no data: start(u, slot, gen, fd, ...).
    local function simple_op(f, fname, what, start, ...)
        self_file(fname, f)
        local t, r = file_task(fname, f)     -- (tail-called)
        local res = run_op(r, t, start(r.u, t.slot, t.gen, f.fd, ...), f)
        if res < 0 then
            return fail(f, what, res)
        end
        return true
    end

    -- (Tail calls here and below: an error then points at our caller's line.)
    function File:fsync()
        return simple_op(self, "File:fsync", "fsync", C.pl_uring_fsync, 0)
    end

    function File:fdatasync()
        return simple_op(self, "File:fdatasync", "fdatasync", C.pl_uring_fsync, 1)
    end

    -- f:fallocate(offset, len[, mode]): reserve space (mode as fallocate(2)).
    -- (len 0 is the kernel's EINVAL, which would name no argument: on a DmaFile
    -- the O_DIRECT hint would even blame the alignment)
    function File:fallocate(offset, len, mode)
        self_file("File:fallocate", self)
        check_offset("File:fallocate", offset, self)
        check_len("File:fallocate", len, 2 ^ 62, self, 1)
        if type(mode) == "nil" then     -- (not mode or 0: false is no mode; nor == nil: NULL equals nil)
            mode = 0
        end
        check.integer(file_fname("File:fallocate", self), "mode", mode, 0, 255)
        return simple_op(self, "File:fallocate", "fallocate", C.pl_uring_fallocate, mode, offset, len)
    end

    -- f:statx(): size, blocks, mode, times, dio alignment... as a table.
    function File:statx()
        self_file("File:statx", self)
        local t, r = file_task("File:statx", self)
        local st, rc = statx_op(r, t, self.fd, "", AT_EMPTY_PATH, self)
        if not st then
            return fail(self, "statx", rc)
        end
        return st
    end

    -- f:truncate(len): set the size (synchronous: no io_uring op before Linux 6.9).
    function File:truncate(len)
        self_file("File:truncate", self)
        check_len("File:truncate", len, 2 ^ 62, self)
        local rc = C.pl_file_truncate(self.fd, len)
        if rc < 0 then
            return fail(self, "truncate", rc)
        end
        return true
    end

    -- f:close(): cancel what other tasks wait for on the file, then close it
    -- through io_uring.  Closing twice returns false.
    function File:close()
        if not is_file(self) then
            error("File:close: call it as a method on a file (f:close())", 2)
        end
        if self.fd < 0 then
            return false        -- closed already: as a socket's, an endpoint's, a channel's close
        end
        local ended = run_ended(self.reactor)
        local rc = ended and close_idle(self.reactor, self.fd)
        if rc then
            forget_fd(self)
            if rc < 0 then
                return fail(self, "close", rc)
            end
            return true
        end
        if ended then
            error(left_busy("File:close", self.path), 2)
        end
        local t, r = file_task("File:close", self)  -- (first: raising must leave the file open)
        local fd = self.fd
        -- Other tasks' ops on the fd are cancelled first, as a socket's: a read
        -- of a pipe or FIFO would otherwise wait for good, holding the file.
        local op = C.pl_uring_close_file(r.u, t.slot, t.gen, fd)
        if op < 0 then          -- not started (no SQE, no op slot): still open, to close again
            return fail(self, "close", op)
        end
        forget_fd(self)
        local res = run_op(r, t, op, self)
        if res < 0 then
            return fail(self, "close", res)
        end
        return true
    end

    DmaFile.__tostring = File.__tostring

    -- Its opening task was killed before open returned it: nobody else has the fd.
    function File:_task_exit()
        if self.fd >= 0 then
            C.pl_file_close_sync(self.fd)
            forget_fd(self)
        end
    end

    function File:fileno()
        self_file("File:fileno", self)
        return self.fd
    end

    -- The seed's spelling: file:acquire_buffer() takes from the file's reactor.
    function File:acquire_buffer()
        self_file("File:acquire_buffer", self)
        local fname = self.direct and "DmaFile:acquire_buffer" or "File:acquire_buffer"
        local t, rt = current_task(fname)
        if self.reactor.rt ~= rt then
            foreign_file("File:acquire_buffer", self, 2)     -- (names the file's kind itself)
        end
        local b = acquire(self.reactor, t, rt, fname)
        return b
    end

    ---------------------------------------------------------------------------
    -- Path operations
    ---------------------------------------------------------------------------

    local function path_fail(what, path, rc)
        return nil, format("%s %s: %s", what, path, errstr(rc)), ffi_string(C.pl_errname(rc))
    end

    function U.statx(path)
        check_path("uring.statx", "path", path)
        local t, r, code = op_context("uring.statx")
        if not t then
            return nil, r, code
        end
        local st, rc = statx_op(r, t, AT_FDCWD, path, 0, path)
        if not st then
            return path_fail("statx", path, rc)
        end
        return st
    end

    function U.unlink(path)
        check_path("uring.unlink", "path", path)
        local t, r, code = op_context("uring.unlink")
        if not t then
            return nil, r, code
        end
        local rc = run_op(r, t, C.pl_uring_unlinkat(r.u, t.slot, t.gen, path, 0), path, path)
        if rc < 0 then
            return path_fail("unlink", path, rc)
        end
        return true
    end

    function U.rmdir(path)
        check_path("uring.rmdir", "path", path)
        local t, r, code = op_context("uring.rmdir")
        if not t then
            return nil, r, code
        end
        local rc = run_op(r, t, C.pl_uring_unlinkat(r.u, t.slot, t.gen, path, AT_REMOVEDIR), path, path)
        if rc < 0 then
            return path_fail("rmdir", path, rc)
        end
        return true
    end

    function U.rename(from, to)
        check_path("uring.rename", "from", from)
        check_path("uring.rename", "to", to)
        local t, r, code = op_context("uring.rename")
        if not t then
            return nil, r, code
        end
        local rc = run_op(r, t, C.pl_uring_renameat(r.u, t.slot, t.gen, from, to), from, { from, to })
        if rc < 0 then
            return path_fail("rename", from .. " -> " .. to, rc)
        end
        return true
    end

    function U.mkdir(path, perms)
        check_path("uring.mkdir", "path", path)
        if type(perms) == "nil" then    -- (not perms or 0755: false is no mode; nor == nil: NULL equals nil)
            perms = 493     -- 0755
        end
        check_perms("uring.mkdir", perms, 3)
        local t, r, code = op_context("uring.mkdir")
        if not t then
            return nil, r, code
        end
        local rc = run_op(r, t, C.pl_uring_mkdirat(r.u, t.slot, t.gen, path, perms), path, path)
        if rc < 0 then
            return path_fail("mkdir", path, rc)
        end
        return true
    end

    I.fixed_io, I.fixed_result = fixed_io, fixed_result
end

return M
