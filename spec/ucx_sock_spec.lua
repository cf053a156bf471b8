-- libpluvio.so's stand-ins for libucs's non-blocking socket sends
-- (src/ucx_sock.c), called here directly on socket pairs: they answer as
-- libucs's own do, except that a send to a peer that closed is "try
-- again" (UCS_ERR_NO_PROGRESS) a bounded number of times per socket.
local ffi = require "ffi"
local helper = require "helper"
local C = require("pluvio.core").C

pcall(ffi.cdef, [[
int ucs_socket_send_nb(int fd, const void *data, size_t *length_p);
int ucs_socket_sendv_nb(int fd, struct iovec *iov, size_t iov_cnt, size_t *length_p);
]])
pcall(ffi.cdef, "struct iovec { void *iov_base; size_t iov_len; };")
pcall(ffi.cdef, "int socketpair(int domain, int type, int protocol, int sv[2]);")
pcall(ffi.cdef, "int setsockopt(int fd, int level, int name, const void *val, unsigned len);")

local libc = ffi.C
local ucs = ffi.load("libucs.so.0")     -- (its own functions: dlsym on its handle)

local AF_UNIX, SOCK_STREAM, SOCK_NONBLOCK = 1, 1, 2048
local SOL_SOCKET, SO_SNDBUF = 1, 7
local UCS_OK, UCS_ERR_NO_PROGRESS, UCS_ERR_CONNECTION_RESET = 0, -10, -25
local DEFER_MAX = 1024

-- A connected non-blocking pair, its send buffer small; returns both fds.
local function pair()
    local sv = ffi.new("int[2]")
    assert(libc.socketpair(AF_UNIX, SOCK_STREAM + SOCK_NONBLOCK, 0, sv) == 0, "socketpair")
    local size = ffi.new("int[1]", 4096)
    libc.setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, size, 4)
    return sv[0], sv[1]
end

-- A socket whose peer closed (its sends fail with EPIPE).
local function broken()
    local fd, peer = pair()
    libc.close(peer)
    return fd
end

local data = ffi.new("char[?]", 1048576)

local length = ffi.new("size_t[1]")
local iov = ffi.new("struct iovec[2]")

-- One send of len bytes (as two iovecs when vec); returns status, length.
local function send(lib, vec, fd, len)
    local st
    length[0] = len
    if vec then
        iov[0].iov_base, iov[0].iov_len = data, math.floor(len / 2)
        iov[1].iov_base, iov[1].iov_len = data + math.floor(len / 2), len - math.floor(len / 2)
        st = lib.ucs_socket_sendv_nb(fd, iov, 2, length)
    else
        st = lib.ucs_socket_send_nb(fd, data, length)
    end
    return st, tonumber(length[0])
end

-- How many sends to fd are "try again" before one is not (at most limit).
local function deferrals(fd, limit)
    for n = 0, limit - 1 do
        if send(C, false, fd, 1) ~= UCS_ERR_NO_PROGRESS then
            return n
        end
    end
    return limit
end

-- Two sockets whose peers closed, on descriptor numbers distance apart
-- (opened until two are: the kernel gives the lowest free numbers; the
-- rest closed again).
local function broken_apart(distance)
    local open, found = {}, nil
    for _ = 1, distance + 64 do
        local fd = broken()
        open[fd] = true
        if open[fd - distance] then
            found = fd
            break
        end
    end
    assert(found, "no two sockets " .. distance .. " apart")
    for fd in pairs(open) do
        if fd ~= found and fd ~= found - distance then libc.close(fd) end
    end
    return found - distance, found
end

describe("ucs_socket_send_nb and ucs_socket_sendv_nb (libpluvio's)", function()
    for _, vec in ipairs({ false, true }) do
        local name = vec and "sendv" or "send"

        it("answer a " .. name .. " as libucs's do: sent, partly sent, nothing sent, and errors other than a closed peer",
           function()
            -- each on a pair of its own, in the same state
            local function both(prepare, len)
                local results = {}
                for i, lib in ipairs({ ucs, C }) do
                    local fd, peer = pair()
                    prepare(fd)
                    local st, n = send(lib, vec, fd, len)
                    results[i] = st .. " " .. n
                    libc.close(fd)
                    libc.close(peer)
                end
                assert.equal(results[1], results[2])
                return results[1]
            end
            local function fill(fd) while send(ucs, false, fd, 65536) == UCS_OK do end end
            assert.equal(UCS_OK .. " 100", both(function() end, 100))
            assert.equal(UCS_OK .. " 0", both(function() end, 0))
            local partial = both(function() end, 1048576)
            local st, n = partial:match("^(%-?%d+) (%d+)$")
            assert.equal(UCS_OK, tonumber(st))
            assert.is_true(tonumber(n) > 0 and tonumber(n) < 1048576, partial)
            assert.equal(UCS_ERR_NO_PROGRESS .. " 0", both(fill, 100))
            -- a descriptor that is not a socket, and no descriptor
            local pipe = ffi.new("int[2]")
            assert(helper.libc.pipe(pipe) == 0, "pipe")
            local real = { send(ucs, vec, pipe[1], 10) }
            assert.same(real, { send(C, vec, pipe[1], 10) })
            libc.close(pipe[0])
            libc.close(pipe[1])
            assert.same({ send(ucs, vec, -1, 10) }, { send(C, vec, -1, 10) })
            assert.is_true(real[1] < 0 and real[1] ~= UCS_ERR_CONNECTION_RESET and real[1] ~= UCS_ERR_NO_PROGRESS)
            assert.equal(0, real[2])
        end)

        it("report a " .. name .. " to a peer that closed as 'try again', nothing sent, where libucs's fails", function()
            local fd = broken()
            assert.same({ UCS_ERR_CONNECTION_RESET, 0 }, { send(ucs, vec, fd, 100) })
            assert.same({ UCS_ERR_NO_PROGRESS, 0 }, { send(C, vec, fd, 100) })
            libc.close(fd)
        end)
    end

    it("say 'try again' at most 1024 times per socket, then the failure, and only the failure from then on", function()
        local fd = broken()
        assert.equal(DEFER_MAX, deferrals(fd, DEFER_MAX + 10))
        for _ = 1, 3 do
            assert.equal(UCS_ERR_CONNECTION_RESET, (send(C, false, fd, 1)))
            assert.equal(UCS_ERR_CONNECTION_RESET, (send(C, true, fd, 2)))
        end
        libc.close(fd)
    end)

    it("keep that bound for two sockets failing in turn, whatever their descriptor numbers", function()
        -- (sockets once shared a counter when their numbers were 64 apart,
        -- each resetting the other's: never the failure)
        for _, distance in ipairs({ 64, 1, 128 }) do
            local a, b = broken_apart(distance)
            local counts = { [a] = 0, [b] = 0 }
            for _ = 1, DEFER_MAX + 10 do
                for _, fd in ipairs({ a, b }) do
                    if send(C, false, fd, 1) == UCS_ERR_NO_PROGRESS then
                        counts[fd] = counts[fd] + 1
                    end
                end
            end
            assert.same({ [a] = DEFER_MAX, [b] = DEFER_MAX }, counts)
            libc.close(a)
            libc.close(b)
        end
    end)

    it("keep the bound for many sockets failing in turn: each fails within 1025 sends", function()
        local fds = {}
        for i = 1, 100 do fds[i] = broken() end
        local failed = {}
        for _ = 1, DEFER_MAX + 1 do
            for _, fd in ipairs(fds) do
                local st = send(C, false, fd, 1)
                if failed[fd] then
                    assert.equal(UCS_ERR_CONNECTION_RESET, st)
                elseif st == UCS_ERR_CONNECTION_RESET then
                    failed[fd] = true
                else
                    assert.equal(UCS_ERR_NO_PROGRESS, st)
                end
            end
        end
        for _, fd in ipairs(fds) do
            assert.is_true(failed[fd], "fd " .. fd .. " still said 'try again'")
            libc.close(fd)
        end
    end)

    it("count afresh for a new socket on the descriptor number of a closed one", function()
        local fd = broken()
        assert.equal(DEFER_MAX, deferrals(fd, DEFER_MAX + 10))
        libc.close(fd)
        -- (the kernel gives the lowest free number: fd, or one below it
        -- that another thread freed meanwhile)
        local again, others = broken(), {}
        while again ~= fd and #others < 64 do
            others[#others + 1] = again
            again = broken()
        end
        for _, other in ipairs(others) do libc.close(other) end
        assert.equal(fd, again)
        assert.equal(DEFER_MAX, deferrals(again, DEFER_MAX + 10))
        libc.close(again)
    end)
end)
