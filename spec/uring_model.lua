-- A randomized model-based check of pluvio.uring's files (used by
-- uring_model_spec.lua; run(seed) checks one scenario).
--
-- A seed gives a scenario: a runtime with an io_uring reactor of its own
-- (a small pool of 1 to 4 registered buffers, queue_size and submit_depth
-- from tiny to the defaults), a few files in a temporary directory, each
-- used through one kind of file (uring.File or uring.DmaFile, never both:
-- mixing O_DIRECT and buffered writes of the same pages is the kernel's
-- EIO, docs/URING.md) and one or two handles to it (files opened on the
-- path), and worker tasks spawned over time that each run a random
-- program of read and write with strings, read_fixed and write_fixed with
-- pool buffers (acquired, parking while the pool is empty; released,
-- detached to a mailbox and taken, given to another task), readv and
-- writev, truncate, fallocate, fsync, fdatasync, statx, close (then a use
-- of the closed file, which raises, and a reopen), operations on an I/O
-- queue, pluvio.timeout around an operation or an acquire, sleeps and
-- yields.  The main task spawns, kills workers (in an operation, parked in
-- acquire_buffer, anywhere), empties the mailbox and now and then stops
-- every worker at a barrier: with nothing in flight it compares each file,
-- read with plain io.open, with the model.
--
-- The model is each file's bytes and size as of the operations that
-- returned.  Operations in flight at the same time on a file may land in
-- either order, so a read checks only bytes no write in flight alongside
-- it touched, a size lies between bounds (the smallest the file could be,
-- the largest), and bytes two overlapping writes in flight together wrote
-- are "unknown" until a later write covers them.  A killed write (a kill,
-- a timeout, a close that cut it short) may or may not land, and until
-- nothing is in flight (reactor in_flight 0) it may still land later: its
-- bytes are unknown, the size may include it.  Unknown bytes and sizes are
-- resolved at a barrier, from the file.  Checked besides: a read's count
-- (short only at end of file), a write's count, the errors (only
-- ECANCELED of a close of the file by another task, only "the file is
-- closed" for a use of a closed file), buffers back in the pool at the end
-- (buffers_free = buffer_count), in_flight 0, buffer_waits at least the
-- acquires that found the pool empty, and that the run ends (each wait of
-- the main task is bounded).  M.trace = true prints each event; a failure
-- shows the last 80.
local pluvio = require "pluvio"
local uring = require "pluvio.uring"
local jit = require "jit"

-- The checks run interpreted (as channel_model.lua's); the runtime and
-- pluvio.uring are compiled as usual.
jit.off(true, true)

local M = {}

local util = require "model_util"
local new_rng, pick_weighted, swarm = util.new_rng, util.pick_weighted, util.swarm

local format, concat, rep, sub, byte = string.format, table.concat, string.rep, string.sub, string.byte
local max, min = math.max, math.min
local unpack = unpack or table.unpack

---------------------------------------------------------------------------
-- Events and failures
---------------------------------------------------------------------------

local function note(S, fmt, ...)
    local n = S.nevents + 1
    S.nevents = n
    S.events[(n - 1) % 80 + 1] = format("%5d ", n) .. format(fmt, ...)
    if M.trace then io.stderr:write(S.events[(n - 1) % 80 + 1], "\n") end
end

local function fail(S, fmt, ...)
    local msg = format(fmt, ...)
    note(S, "FAIL %s", msg)
    if not S.failure then
        S.failure = msg .. "\n" .. debug.traceback("", 2)
    end
end

local function expect(S, cond, fmt, ...)
    if not cond then fail(S, fmt, ...) end
    return cond
end

local function last_events(S)
    local out = {}
    for n = max(1, S.nevents - 79), S.nevents do
        out[#out + 1] = S.events[(n - 1) % 80 + 1]
    end
    return concat(out, "\n")
end

local function me()
    local t = pluvio.current()
    return t:name()
end

---------------------------------------------------------------------------
-- Byte ranges: sorted disjoint {a, b} (a <= x < b)
---------------------------------------------------------------------------

local function ranges_add(list, a, b)
    if a >= b then return list end
    local out, placed = {}, false
    for _, r in ipairs(list) do
        if r[2] < a then
            out[#out + 1] = r
        elseif r[1] > b then
            if not placed then out[#out + 1] = { a, b }; placed = true end
            out[#out + 1] = r
        else
            a, b = min(a, r[1]), max(b, r[2])
        end
    end
    if not placed then out[#out + 1] = { a, b } end
    return out
end

local function ranges_sub(list, a, b)
    local out = {}
    for _, r in ipairs(list) do
        if r[2] <= a or r[1] >= b then
            out[#out + 1] = r
        else
            if r[1] < a then out[#out + 1] = { r[1], a } end
            if r[2] > b then out[#out + 1] = { b, r[2] } end
        end
    end
    return out
end

---------------------------------------------------------------------------
-- The model of a file
---------------------------------------------------------------------------

-- F.data: the bytes up to F.smax (zeros in holes); F.smin..F.smax: the
-- sizes the file may have; F.fuzzy: ranges of unknown bytes; F.active: the
-- operations in flight; F.pending: killed writes the kernel may still do.

local function model_bytes(F, a, b)     -- the model's bytes a..b-1 (zeros past data)
    local d = F.data
    if b <= #d then return sub(d, a + 1, b) end
    if a >= #d then return rep("\0", b - a) end
    return sub(d, a + 1) .. rep("\0", b - #d)
end

local function set_len(F, n)
    local d = F.data
    if n < #d then
        F.data = sub(d, 1, n)
    elseif n > #d then
        F.data = d .. rep("\0", n - #d)
    end
end

local function splice(F, off, s)
    local e = off + #s
    if e > #F.data then set_len(F, e) end
    local d = F.data
    F.data = sub(d, 1, off) .. s .. sub(d, e + 1)
end

local function start_op(S, W, F, op)
    op.F, op.conc, op.W = F, {}, W
    op.smin0 = F.smin
    for a in next, F.active do
        a.conc[op] = true
        op.conc[a] = true
    end
    F.active[op] = true
    if W then W.active[op] = true end
    S.nops = S.nops + 1
    op.id = S.nops
    return op
end

local function end_op(op)
    op.F.active[op] = nil
    if op.W then op.W.active[op] = nil end
end

-- A write that may have landed, all or part of it, now or later (pending).
local function write_unknown(S, op, pending, why)
    local F = op.F
    local e = op.off + op.len
    F.fuzzy = ranges_add(F.fuzzy, op.off, e)
    if op.kind == "w" and op.len > 0 or op.kind == "falloc" and op.mode == 0 then
        if e > F.smax then
            set_len(F, e)
            F.smax = e
        end
    end
    if pending then
        F.pending[#F.pending + 1] = op
    end
    note(S, "  op%d %s f%d [%d,%d) unknown (%s)", op.id, op.kind, F.id, op.off, e, why)
end

-- The kernel wrote op's bytes (and the model takes them).
local function write_done(S, op)
    local F = op.F
    local off, e = op.off, op.off + op.len
    end_op(op)
    if op.len == 0 then return end
    splice(F, off, op.data)
    F.smin, F.smax = max(F.smin, e), max(F.smax, e)
    F.fuzzy = ranges_sub(F.fuzzy, off, e)
    for c in next, op.conc do
        if c.kind == "w" then
            F.fuzzy = ranges_add(F.fuzzy, max(off, c.off), min(e, c.off + c.len))
        end
    end
    for _, p in ipairs(F.pending) do
        F.fuzzy = ranges_add(F.fuzzy, max(off, p.off), min(e, p.off + p.len))
    end
end

local function falloc_done(op)
    local F = op.F
    end_op(op)
    if op.mode == 0 then
        local e = op.off + op.len
        if e > F.smax then set_len(F, e) end
        F.smin, F.smax = max(F.smin, e), max(F.smax, e)
    end
end

-- The ranges a read of op must not check: unknown bytes, and what writes
-- in flight alongside it (or killed, pending) wrote.
local function skip_ranges(op)
    local F = op.F
    local skip = {}
    for _, r in ipairs(F.fuzzy) do skip = ranges_add(skip, r[1], r[2]) end
    for c in next, op.conc do
        if c.kind == "w" then skip = ranges_add(skip, c.off, c.off + c.len) end
    end
    for _, p in ipairs(F.pending) do skip = ranges_add(skip, p.off, p.off + p.len) end
    return skip
end

-- The largest size the file may have had while op was in flight: writes in
-- flight alongside it may have landed.
local function size_hi(op)
    local hi = op.F.smax
    for c in next, op.conc do
        if c.kind == "w" and c.len > 0 or c.kind == "falloc" and c.mode == 0 then
            hi = max(hi, c.off + c.len)
        end
    end
    return hi
end

-- Check what a read of [op.off, op.off + op.len) returned (got: a string).
local function read_done(S, op, got, where)
    local F = op.F
    end_op(op)
    local off, len, n = op.off, op.len, #got
    local lo = min(len, max(0, op.smin0 - off))
    local hi = min(len, max(0, size_hi(op) - off))
    if not expect(S, n >= lo and n <= hi, "%s: %s of f%d at %d, %d bytes returned %d (the model: %d to %d; sizes %d-%d)",
                  where, op.name, F.id, off, len, n, lo, hi, F.smin, F.smax) then
        return
    end
    local pos = off
    local function cmp(a, b)        -- [a, b) in file offsets
        if a >= b then return true end
        local want = model_bytes(F, a, b)
        local have = sub(got, a - off + 1, b - off)
        if want ~= have then
            local i = 1
            while byte(want, i) == byte(have, i) do i = i + 1 end
            fail(S, "%s: %s of f%d at %d (%d bytes, got %d): byte %d is %d, the model says %d (%q, model %q)",
                 where, op.name, F.id, off, len, n, a + i - 1, byte(have, i) or -1, byte(want, i) or -1,
                 sub(have, i, i + 15), sub(want, i, i + 15))
            return false
        end
        return true
    end
    for _, r in ipairs(skip_ranges(op)) do
        if r[1] >= off + n then break end
        if r[2] > pos then
            if not cmp(pos, min(r[1], off + n)) then return end
            pos = max(pos, r[2])
        end
    end
    cmp(pos, off + n)
end

---------------------------------------------------------------------------
-- Workers
---------------------------------------------------------------------------

local WORKER_OPS = {
    "write", 14, "read", 14, "write_fixed", 10, "read_fixed", 10, "writev", 5, "readv", 5,
    "truncate", 3, "fallocate", 3, "fsync", 2, "fdatasync", 2, "statx", 4, "close", 2, "queue", 4,
    "timeout", 6, "sleep", 3, "yield", 4, "release", 4, "give", 3, "misuse", 1,
}

local MAIN_OPS = {
    "spawn", 10, "yield", 10, "sleep", 4, "kill", 5, "barrier", 2, "mailbox", 3, "close", 1,
}

-- A string of len bytes no other write of the run has (non-zero).
local function pattern(S, len)
    S.nwrites = S.nwrites + 1
    local tag = format("<%x:", S.nwrites)
    local s = rep(tag, math.ceil(len / #tag))
    return sub(s, 1, len)
end

-- Offset and length for an op on F (O_DIRECT: block multiples).
local function span(S, F, maxlen)
    local rng = S.rng
    if F.direct then
        local blocks = max(1, math.floor(maxlen / 4096))
        local off = (rng(S.fileblocks) - 1) * 4096
        return off, 4096 * rng(blocks)
    end
    local off = rng(4) == 1 and (rng(S.fileblocks) - 1) * 4096 or rng(S.fileblocks * 4096) - 1
    local len = ({ rng(16), rng(4096), rng(maxlen), 4096 })[rng(4)]
    return off, min(len, maxlen)
end

local function pause_point(S, W)
    if S.pause then
        W.state = "barrier"
        while S.pause do S.gate:recv() end      -- (closed when the barrier ends)
        W.state = "run"
    end
end

-- A buffer the worker holds (its own, given to it, from the mailbox), or a
-- new one: acquire parks while the pool is empty.
local function held_buffer(S, W)
    for i = #W.held, 1, -1 do
        local b = W.held[i]
        if b.base and b:owner() == pluvio.current() then return b end
        table.remove(W.held, i)
    end
    local b = table.remove(S.mailbox)
    if b then
        b:take()
        W.held[#W.held + 1] = b
        note(S, "%s takes a buffer from the mailbox", me())
        return b
    end
    local st = S.r:stats()
    if st.buffers_free == 0 and S.registered then     -- (the pool is registered by the first acquire)
        S.empty_acquires = S.empty_acquires + 1
    end
    W.state = "acquire"
    note(S, "%s acquires (%d free)", me(), st.buffers_free)
    b = S.r:acquire_buffer()
    W.state = "run"
    S.registered = true
    W.held[#W.held + 1] = b
    note(S, "%s acquired buffer %d", me(), b.index)
    pause_point(S, W)
    return b
end

-- A second buffer, only when one is free (acquire does not park): holding
-- one while parked for another could deadlock the workers.
local function extra_buffer(S, W, have)
    for _, b in ipairs(W.held) do
        if b ~= have and b.base and b:owner() == pluvio.current() then return b end
    end
    if S.r:stats().buffers_free > 0 then
        local b = S.r:acquire_buffer()
        W.held[#W.held + 1] = b
        return b
    end
end

local function pick_handle(S)
    local h = S.handles[S.rng(#S.handles)]
    return h, h.f, h.F
end

-- Run fn(...) as the worker's operation on file f: a raise is expected only
-- when f was closed before the call ("the file is closed").
local function guarded_op(S, f, fname, fn, ...)
    local was_closed = S.closed[f]
    local r = { pcall(fn, ...) }
    if not r[1] then
        local err = tostring(r[2])
        expect(S, was_closed and err:find("the file is closed", 1, true),
               "%s: %s raised %s (file closed before: %s)", me(), fname, err, tostring(was_closed))
        note(S, "%s %s on a closed file raised", me(), fname)
        S.stats.closed_raised = S.stats.closed_raised + 1
        return "raised"
    end
    return true, unpack(r, 2, table.maxn(r))
end

-- A failed op's error is fine only when another task closed the file meanwhile.
local function failed_ok(S, f, code, where, what, err)
    return expect(S, code == "ECANCELED" and S.closed[f],
                  "%s: %s failed: %s (%s; file closed %s)", where, what, tostring(err), tostring(code),
                  tostring(S.closed[f]))
end

local function do_write(S, W, kind)
    local buf = kind == "write_fixed" and held_buffer(S, W)    -- (first: it may park)
    local _, f, F = pick_handle(S)
    local off, len = span(S, F, kind == "write" and 3 * 4096 or S.bufsize)
    local op = { kind = "w", name = kind, off = off, len = len }
    local data = pattern(S, len)
    if buf then buf:write(data) end
    if S.closed[f] then
        return guarded_op(S, f, kind, kind == "write" and f.write or f.write_fixed, f,
                          kind == "write" and off or buf, kind == "write" and data or off, len)
    end
    op.data = data
    start_op(S, W, F, op)
    note(S, "%s op%d %s f%d [%d,%d)", me(), op.id, kind, F.id, off, off + len)
    local ok, n, err, code, bytes
    if kind == "write" then
        ok, n, err, code, bytes = guarded_op(S, f, kind, f.write, f, off, data)
    else
        ok, n, err, code, bytes = guarded_op(S, f, kind, f.write_fixed, f, buf, off, len)
    end
    if ok ~= true then end_op(op); return end
    if n == nil then
        end_op(op)
        failed_ok(S, f, code, me(), format("op%d %s f%d [%d,%d)", op.id, kind, F.id, off, off + len), err)
        write_unknown(S, op, false, "cut by a close")
        S.stats.cut_by_close = S.stats.cut_by_close + 1
        return
    end
    expect(S, n == len, "%s: op%d %s of %d bytes returned %s", me(), op.id, kind, len, tostring(n))
    write_done(S, op)
    note(S, "%s op%d done", me(), op.id)
end

local function do_read(S, W, kind)
    local buf = kind == "read_fixed" and held_buffer(S, W)
    local _, f, F = pick_handle(S)
    local off, len = span(S, F, kind == "read" and 3 * 4096 or S.bufsize)
    if buf then buf:fill(0xee, len) end
    if S.closed[f] then
        return guarded_op(S, f, kind, kind == "read" and f.read or f.read_fixed, f,
                          kind == "read" and off or buf, kind == "read" and len or off, len)
    end
    local op = start_op(S, W, F, { kind = "r", name = kind, off = off, len = len })
    note(S, "%s op%d %s f%d [%d,%d)", me(), op.id, kind, F.id, off, off + len)
    local ok, got, err, code
    if kind == "read" then
        ok, got, err, code = guarded_op(S, f, kind, f.read, f, off, len)
    else
        ok, got, err, code = guarded_op(S, f, kind, f.read_fixed, f, buf, off, len)
        if ok == true and got then got = buf:tostring(got) end
    end
    if ok ~= true then end_op(op); return end
    if got == nil then
        end_op(op)
        failed_ok(S, f, code, me(), format("op%d %s f%d", op.id, kind, F.id), err)
        S.stats.cut_by_close = S.stats.cut_by_close + 1
        return
    end
    read_done(S, op, got, me())
    note(S, "%s op%d -> %d bytes", me(), op.id, #got)
end

local function do_vector(S, W, kind)
    local b1 = held_buffer(S, W)
    local _, f, F = pick_handle(S)
    local b2 = S.rng(2) == 1 and extra_buffer(S, W, b1)
    local parts, lens, datas, total = {}, {}, {}, 0
    local off = select(1, span(S, F, 4096))
    local function add(p, len)
        parts[#parts + 1], lens[#lens + 1] = p, len
        total = total + len
    end
    local function part_len()
        if F.direct then return 4096 * S.rng(S.bufsize / 4096) end
        return ({ 0, S.rng(100), S.rng(S.bufsize) })[S.rng(3)]
    end
    add(b1, part_len())
    if kind == "writev" and not F.direct and S.rng(2) == 1 then
        local s = pattern(S, S.rng(300))
        add(s, #s)
    end
    if b2 then add(b2, part_len()) end
    if kind == "writev" then
        for i, p in ipairs(parts) do
            if type(p) == "string" then
                datas[i] = p
            else
                datas[i] = pattern(S, lens[i])
                p:write(datas[i])
            end
        end
    else
        for _, p in ipairs(parts) do p:fill(0xee) end
    end
    if S.closed[f] then
        return guarded_op(S, f, kind, f[kind], f, off, parts, lens)
    end
    local op = start_op(S, W, F, { kind = kind == "writev" and "w" or "r", name = kind, off = off, len = total,
                                   data = kind == "writev" and concat(datas) or nil })
    note(S, "%s op%d %s f%d [%d,%d) %d parts", me(), op.id, kind, F.id, off, off + total, #parts)
    local ok, n, err, code = guarded_op(S, f, kind, f[kind], f, off, parts, lens)
    if ok ~= true then end_op(op); return end
    if n == nil then
        end_op(op)
        failed_ok(S, f, code, me(), format("op%d %s", op.id, kind), err)
        if kind == "writev" then write_unknown(S, op, false, "cut by a close") end
        return
    end
    if kind == "writev" then
        expect(S, n == total, "%s: op%d writev of %d bytes returned %s", me(), op.id, total, tostring(n))
        write_done(S, op)
    else
        local got = {}
        for i, p in ipairs(parts) do
            local take = min(lens[i], n - #concat(got))
            got[#got + 1] = take > 0 and p:tostring(take) or ""
        end
        read_done(S, op, concat(got), me())
    end
end

local function do_queue(S, W)
    local b1 = held_buffer(S, W)
    local bufs = { b1, extra_buffer(S, W, b1) }
    local q = uring.io_queue()
    local ops = {}
    for _, b in ipairs(bufs) do
        local h, f, F = pick_handle(S)
        if not S.closed[f] then
            local write = S.rng(2) == 1
            local off, len = span(S, F, S.bufsize)
            local op = { kind = write and "w" or "r", name = write and "q:write_fixed" or "q:read_fixed",
                         off = off, len = len, f = f, buf = b }
            if write then
                op.data = pattern(S, len)
                b:write(op.data)
            else
                b:fill(0xee, len)
            end
            start_op(S, W, F, op)
            local ok, err = q[write and "write_fixed" or "read_fixed"](q, f, b, off, len, op)
            note(S, "%s op%d %s f%d [%d,%d) %s", me(), op.id, op.name, F.id, off, off + len, tostring(ok))
            if not expect(S, ok, "%s: %s did not start: %s", me(), op.name, tostring(err)) then
                end_op(op)
            else
                ops[#ops + 1] = op
            end
        end
    end
    for _ = 1, #ops do
        local op, n, err, code = q:wait()
        if n == nil then
            end_op(op)
            failed_ok(S, op.f, code, me(), format("op%d %s", op.id, op.name), err)
            if op.kind == "w" then write_unknown(S, op, false, "cut by a close") end
        elseif op.kind == "w" then
            expect(S, n == op.len, "%s: op%d %s of %d returned %d", me(), op.id, op.name, op.len, n)
            write_done(S, op)
        else
            read_done(S, op, op.buf:tostring(n), me())
        end
    end
    if S.rng(2) == 1 then q:close() end
end

local function do_truncate(S, W)
    local _, f, F = pick_handle(S)
    if next(F.active) or #F.pending > 0 or S.closed[f] then return end
    local len = ({ S.rng(S.fileblocks * 4096), 4096 * S.rng(S.fileblocks), 0 })[S.rng(3)]
    local ok = f:truncate(len)
    expect(S, ok == true, "%s: truncate f%d to %d returned %s", me(), F.id, len, tostring(ok))
    set_len(F, len)
    F.smin, F.smax = len, len
    F.fuzzy = ranges_sub(F.fuzzy, len, math.huge)
    note(S, "%s truncate f%d %d", me(), F.id, len)
    local _ = W
end

local function do_simple(S, W, kind)
    local _, f, F = pick_handle(S)
    if S.closed[f] then
        return guarded_op(S, f, kind, f[kind], f, 0, 1)
    end
    local op = { kind = kind == "fallocate" and "falloc" or "x", name = kind, off = 0, len = 0 }
    local args = {}
    if kind == "fallocate" then
        op.off, op.len = span(S, F, 3 * 4096)
        op.mode = S.rng(2) - 1
        args = { op.off, op.len, op.mode }
    end
    start_op(S, W, F, op)
    note(S, "%s op%d %s f%d", me(), op.id, kind, F.id)
    local ok, r, err, code = guarded_op(S, f, kind, f[kind], f, unpack(args))
    if ok ~= true then end_op(op); return end
    if r == nil then
        end_op(op)
        -- (a close does not cancel these: they run on a duplicate of the fd)
        fail(S, "%s: op%d %s of f%d failed: %s (%s)", me(), op.id, kind, F.id, tostring(err), tostring(code))
        return
    end
    if kind == "statx" then
        end_op(op)
        expect(S, r.size >= op.smin0 and r.size <= size_hi(op), "%s: op%d statx of f%d: size %d, the model %d to %d",
               me(), op.id, F.id, r.size, op.smin0, size_hi(op))
    elseif kind == "fallocate" then
        expect(S, r == true, "%s: fallocate returned %s", me(), tostring(r))
        falloc_done(op)
    else
        end_op(op)
        expect(S, r == true, "%s: %s returned %s", me(), kind, tostring(r))
    end
end

-- The handle gets a file again: of its own path, or of another (so that a
-- file opened now takes the number of an fd just closed: an op meant for
-- the closed one would land in it, and its model would see).
local function reopen(S, h)
    local F = S.rng(2) == 1 and S.files[S.rng(#S.files)] or h.F
    local cls = F.direct and uring.DmaFile or uring.File
    h.reopening = pluvio.current()
    local f, err = cls.open(F.path, "r+")
    h.reopening = nil
    if expect(S, f, "%s: reopen of f%d: %s", me(), F.id, tostring(err)) then
        h.f, h.F = f, F
        note(S, "%s reopened f%d (fd %d)", me(), F.id, f:fileno())
    end
end

local function do_close(S, W)
    local h, f, F = pick_handle(S)
    if S.closed[f] then
        local r = f:close()
        expect(S, r == false, "%s: a second close of f%d returned %s", me(), F.id, tostring(r))
        return
    end
    S.closed[f] = true
    note(S, "%s closes f%d", me(), F.id)
    local r, err = f:close()
    expect(S, r == true, "%s: close of f%d returned %s, %s", me(), F.id, tostring(r), tostring(err))
    local ok, msg = pcall(f.read, f, 0, 1)
    expect(S, not ok and tostring(msg):find("the file is closed", 1, true),
           "%s: a read of closed f%d gave %s, %s", me(), F.id, tostring(ok), tostring(msg))
    if S.rng(3) > 1 then pluvio.yield() end
    if h.f == f then reopen(S, h) end
    local _ = W
end

local run_step

local function do_timeout(S, W, op)
    local inner = ({ "write", "read", "read_fixed", "write_fixed", "acquire", "fsync", "queue" })[S.rng(7)]
    local secs = ({ 0, 1e-5, 1e-4, 1e-3, 1e6 })[S.rng(5)]
    local worker = pluvio.current()
    note(S, "%s timeout %g around %s", me(), secs, inner)
    local r, err = pluvio.timeout(secs, function()
        W.child = pluvio.current()
        local held = W.held
        -- the child's buffers are its own: it takes the worker's, and gives them back
        W.held = {}
        for _, b in ipairs(held) do
            if b.base and b:owner() == worker then
                b:take()
                W.held[#W.held + 1] = b
            end
        end
        run_step(S, W, { inner })
        for _, b in ipairs(W.held) do
            if b.base and b:owner() == W.child then b:give(worker) end
        end
        return "done"
    end)
    W.child = nil
    W.state = "run"     -- (a child killed in acquire_buffer left it "acquire")
    expect(S, r == "done" or r == nil and err == "timeout", "%s: timeout gave %s, %s", me(), tostring(r),
           tostring(err))
    if r == nil then
        S.stats.timeouts = S.stats.timeouts + 1
        W.kill_ops(S, W, "timeout")
    end
    local _ = op
end

function run_step(S, W, op)
    local name = op[1]
    if name == "write" or name == "write_fixed" then
        do_write(S, W, name)
    elseif name == "read" or name == "read_fixed" then
        do_read(S, W, name)
    elseif name == "writev" or name == "readv" then
        do_vector(S, W, name)
    elseif name == "queue" then
        do_queue(S, W)
    elseif name == "truncate" then
        do_truncate(S, W)
    elseif name == "fallocate" or name == "fsync" or name == "statx" then
        do_simple(S, W, name)
    elseif name == "fdatasync" then
        do_simple(S, W, "fdatasync")
    elseif name == "close" then
        do_close(S, W)
    elseif name == "timeout" then
        do_timeout(S, W, op)
    elseif name == "acquire" then
        held_buffer(S, W)
    elseif name == "sleep" then
        pluvio.sleep(S.rng(3) == 1 and 0 or S.rng(500) * 1e-6)
    elseif name == "yield" then
        pluvio.yield()
    elseif name == "release" then
        local b = table.remove(W.held)
        if b and b.base and b:owner() == pluvio.current() then b:release() end
    elseif name == "give" then
        local b = table.remove(W.held)
        if b and b.base and b:owner() == pluvio.current() then
            local to = S.workers[S.rng(#S.workers)]
            if S.rng(2) == 1 or not to.task.live or to.task == pluvio.current() or to.child
               or to.state == "acquire" then      -- (it would hold one while it waits for another)
                S.mailbox[#S.mailbox + 1] = b:detach()
                note(S, "%s detaches buffer %d to the mailbox", me(), b.index)
            else
                b:give(to.task)
                to.held[#to.held + 1] = b
                note(S, "%s gives buffer %d to %s", me(), b.index, to.task:name())
            end
        end
    elseif name == "misuse" then
        local _, f, F = pick_handle(S)
        if F.direct and not S.closed[f] then
            local ok, err = pcall(f.read, f, 1, 4096)
            expect(S, not ok and tostring(err):find("O_DIRECT offset 1 is not a multiple of", 1, true),
                   "%s: an unaligned O_DIRECT read gave %s", me(), tostring(err))
        end
    end
end

-- The ops of W in flight are abandoned (its task, or its timeout's child,
-- was killed): writes may still land.
local function kill_ops(S, W, why)
    for op in next, W.active do
        end_op(op)
        if op.kind == "w" or op.kind == "falloc" and op.mode == 0 then
            write_unknown(S, op, true, why)
        end
    end
end

local function worker_body(S, W)
    local ok, err = xpcall(function()
        for _, op in ipairs(W.prog) do
            pause_point(S, W)
            if S.stop or S.failure then break end
            run_step(S, W, op)
        end
    end, function(e)
        if type(e) == "string" then
            fail(S, "%s raised: %s", me(), debug.traceback(e, 2))
        end
        return e
    end)
    W.state = "done"
    if not ok then error(err, 0) end
end

local function spawn_worker(S)
    local rng = S.rng
    local prog = {}
    for i = 1, 2 + rng(30) do
        prog[i] = { pick_weighted(rng, S.worker_ops) }
    end
    local W = { prog = prog, held = {}, active = {}, state = "run", kill_ops = kill_ops }
    S.nworkers = S.nworkers + 1
    W.task = pluvio.spawn_named("w" .. S.nworkers, worker_body, S, W)
    S.workers[#S.workers + 1] = W
    return W
end

---------------------------------------------------------------------------
-- The main task
---------------------------------------------------------------------------

local function live_workers(S)
    local list = {}
    for _, W in ipairs(S.workers) do
        if W.task.live then list[#list + 1] = W end
    end
    return list
end

local function drain_mailbox(S)
    while S.mailbox[1] do
        local b = table.remove(S.mailbox)
        b:take()
        b:release()
    end
end

local function read_whole(path)
    local fh = assert(io.open(path, "rb"))
    local s = fh:read("*a")
    fh:close()
    return s
end

-- With nothing in flight: each file against the model; then the model
-- takes the file's unknown bytes and size.
local function check_files(S, where)
    for _, F in ipairs(S.files) do
        F.pending = {}
        local s = read_whole(F.path)
        if expect(S, #s >= F.smin and #s <= F.smax, "%s: f%d has %d bytes, the model %d to %d",
                  where, F.id, #s, F.smin, F.smax) then
            local op = { F = F, conc = {}, name = "file", off = 0, len = #s, smin0 = F.smin }
            F.active[op] = true
            read_done(S, op, s, where)
        end
        F.data, F.smin, F.smax, F.fuzzy = s, #s, #s, {}
    end
end

-- Wait a little: a few yields first, then short sleeps (i: the count so far).
local function nap(i)
    if i < 100 then pluvio.yield() else pluvio.sleep(1e-4) end
end

local function barrier(S)
    S.pause = true
    S.gate = pluvio.channel(1)
    local ok = false
    for i = 1, 20000 do
        local busy = false
        for _, W in ipairs(live_workers(S)) do
            if W.state ~= "barrier" and W.state ~= "acquire" then busy = true; break end
        end
        if not busy and S.r:stats().in_flight == 0 then ok = true; break end
        nap(i)
    end
    if expect(S, ok, "main: the workers never all stopped at the barrier (in_flight %d)", S.r:stats().in_flight) then
        note(S, "main: barrier")
        check_files(S, "barrier")
        S.stats.barriers = S.stats.barriers + 1
    end
    S.pause = false
    S.gate:close()
end

local function kill_worker(S)
    local list = live_workers(S)
    if #list == 0 then return end
    -- rather one in an operation, or parked in acquire
    local W = list[S.rng(#list)]
    for _, V in ipairs(list) do
        if next(V.active) or V.state == "acquire" then
            if S.rng(2) == 1 then W = V; break end
        end
    end
    note(S, "main kills %s (%s, %s)", W.task:name(), W.state, next(W.active) and "in an op" or "no op")
    if W.state == "acquire" then S.stats.kills_parked = S.stats.kills_parked + 1 end
    if next(W.active) then S.stats.kills_in_op = S.stats.kills_in_op + 1 end
    W.task:kill()
    kill_ops(S, W, "kill")
    W.state = "done"
end

local function main_step(S)
    local name = pick_weighted(S.rng, S.main_ops)
    if name == "spawn" then
        if #live_workers(S) < S.max_workers then spawn_worker(S) end
    elseif name == "yield" then
        for _ = 1, S.rng(4) do pluvio.yield() end
    elseif name == "sleep" then
        pluvio.sleep(S.rng(300) * 1e-6)
    elseif name == "kill" then
        kill_worker(S)
    elseif name == "barrier" then
        barrier(S)
    elseif name == "mailbox" then
        drain_mailbox(S)
    elseif name == "close" then
        for _, h in ipairs(S.handles) do     -- reopen what a killed worker left closed
            if S.closed[h.f] and not (h.reopening and h.reopening.live) then reopen(S, h) end
        end
    end
end

local function finish(S)
    S.stop = true
    local ok = false
    for i = 1, 50000 do
        drain_mailbox(S)
        if #live_workers(S) == 0 then ok = true; break end
        nap(i)
    end
    local desc = {}
    for _, W in ipairs(live_workers(S)) do
        local own = 0
        for b in next, W.task.resources or {} do
            if getmetatable(b) == uring.Buffer then own = own + 1 end
        end
        desc[#desc + 1] = format("%s %s (%s) owns %d, child %s", W.task:name(), W.state,
                                 tostring(W.task.waiting_for), own, tostring(W.child))
    end
    if not expect(S, ok, "main: %d workers never ended: %s; %d buffers free", #live_workers(S),
                  concat(desc, "; "), S.r:stats().buffers_free) then
        for _, W in ipairs(live_workers(S)) do W.task:kill() end
    end
    for i = 1, 20000 do
        if S.r:stats().in_flight == 0 then break end
        nap(i)
    end
    local st = S.r:stats()
    expect(S, st.in_flight == 0, "in_flight is %d at the end", st.in_flight)
    check_files(S, "end")
    for _, h in ipairs(S.handles) do
        local r = h.f:close()
        expect(S, r == (not S.closed[h.f]), "the last close of f%d returned %s", h.F.id, tostring(r))
    end
    st = S.r:stats()
    expect(S, st.completions <= st.sqes and st.in_flight_max <= st.sqes and st.enters <= st.sqes + 64 * 1000,
           "reactor stats: %d SQEs, %d completions, in_flight_max %d, %d enters", st.sqes, st.completions,
           st.in_flight_max, st.enters)
    expect(S, st.buffers_free == S.nbufs or not S.registered, "%d of %d buffers are back in the pool at the end",
           st.buffers_free, S.nbufs)
    expect(S, st.buffer_waits >= S.empty_acquires, "buffer_waits %d, but %d acquires found the pool empty",
           st.buffer_waits, S.empty_acquires)
    expect(S, st.in_flight == 0, "in_flight is %d after the closes", st.in_flight)
    S.stats.buffer_waits = st.buffer_waits
    for _, W in ipairs(S.workers) do
        local r, err = W.task:join()
        expect(S, r ~= nil or err == nil or err == "cancelled", "%s failed: %s", W.task:name(), tostring(err))
    end
end

local function main(S)
    for step = 1, S.steps do
        S.step = step
        main_step(S)
        if S.failure then break end
    end
    if S.failure then
        S.stop = true
        for _, W in ipairs(live_workers(S)) do W.task:kill() end
        return
    end
    finish(S)
end

local tmp_n = 0

-- Runs the scenario of seed; returns nil, or what failed (with the last
-- events), and the scenario's counters.
function M.run(seed)
    local rng = new_rng(seed)
    tmp_n = tmp_n + 1
    local dir = format("%s.uring_model.%d.%d", os.tmpname(), seed, tmp_n)
    os.remove(dir:match("^(.-)%.uring_model"))
    assert(os.execute("mkdir -p '" .. dir .. "'"))
    local S = {
        rng = rng, seed = seed, events = {}, nevents = 0, files = {}, handles = {}, workers = {},
        mailbox = {}, closed = setmetatable({}, { __mode = "k" }), nops = 0, nwrites = 0, nworkers = 0,
        empty_acquires = 0, steps = 20 + rng(100), max_workers = rng(4) == 1 and 8 + rng(10) or 2 + rng(5),
        fileblocks = ({ 2, 4, 12 })[rng(3)],
        stats = { timeouts = 0, kills_parked = 0, kills_in_op = 0, barriers = 0, buffer_waits = 0,
                  cut_by_close = 0, closed_raised = 0, sqpoll = 0 },
    }
    S.worker_ops = swarm(rng, WORKER_OPS, { write = true, read = true })
    S.main_ops = swarm(rng, MAIN_OPS, { spawn = true, yield = true })
    S.nbufs = rng(4)
    S.bufsize = ({ 4096, 8192 })[rng(2)]
    local opts = {
        buffer_count = S.nbufs, buffer_size = S.bufsize,
        queue_size = ({ 4, 8, 32, 256 })[rng(4)], submit_depth = ({ 1, 2, 8, 64 })[rng(4)],
    }
    if rng(10) == 1 then
        opts.sqpoll, opts.sqpoll_idle_ms = true, 10
    end
    S.rt = pluvio.Runtime.new()
    local made, r = pcall(uring.reactor, opts)
    if not made then                -- (the kernel refused SQPOLL)
        opts.sqpoll = nil
        r = uring.reactor(opts)
    elseif opts.sqpoll then
        S.stats.sqpoll = 1
    end
    S.r = r
    S.rt:register_reactor("io_uring", S.r)
    note(S, "seed %d: %d bufs of %d, queue_size %d, submit_depth %d", seed, opts.buffer_count, opts.buffer_size,
         opts.queue_size, opts.submit_depth)
    local ok, err = pcall(S.rt.run, S.rt, function()
        for i = 1, 1 + rng(3) do
            local direct = rng(2) == 1
            local F = { id = i, path = format("%s/f%d", dir, i), direct = direct, data = "", smin = 0, smax = 0,
                        fuzzy = {}, active = {}, pending = {} }
            S.files[i] = F
            local cls = direct and uring.DmaFile or uring.File
            for _ = 1, rng(2) do
                local f = assert(cls.open(F.path, "w+"))
                S.handles[#S.handles + 1] = { F = F, f = f }
            end
        end
        main(S)
    end)
    if not ok then
        fail(S, "the run raised: %s", tostring(err))
    end
    for _, F in ipairs(S.files) do os.remove(F.path) end
    os.remove(dir)
    if S.failure then
        return format("seed %d: %s\nlast events:\n%s", seed, S.failure, last_events(S)), S.stats
    end
    return nil, S.stats
end

return M
