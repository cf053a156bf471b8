-- uring.read_some: reading whatever a pipe or other fd has, parked
-- until it has something.
local pluvio = require "pluvio"
local uring = require "pluvio.uring"
local helper = require "helper"
local ffi = require "ffi"

local async = helper.async
local tmpfile = helper.tmp_path

describe("uring.read_some", function()
    it("parks until a pipe has input, letting other tasks run, and gives what is there", async(function()
        local fds = ffi.new("int[2]")
        assert.equal(0, helper.libc.pipe(fds))
        local order = {}
        local writer = pluvio.spawn(function()
            pluvio.sleep(0.01)
            order[#order + 1] = "write"
            helper.libc.write(fds[1], "ab\ncd", 5)
        end)
        local data = uring.read_some(fds[0], 100)
        order[#order + 1] = "read"
        assert.equal("ab\ncd", data)
        assert.same({ "write", "read" }, order)
        writer:join()
        helper.libc.close(fds[0])
        helper.libc.close(fds[1])
    end))

    it("gives '' at the end of input and nil, err for an fd that is not open", async(function()
        local fds = ffi.new("int[2]")
        assert.equal(0, helper.libc.pipe(fds))
        helper.libc.write(fds[1], "xyz", 3)
        helper.libc.close(fds[1])
        assert.equal("xy", uring.read_some(fds[0], 2))
        assert.equal("z", uring.read_some(fds[0], 2))
        assert.equal("", uring.read_some(fds[0], 2))
        helper.libc.close(fds[0])
        local none, err, code = uring.read_some(fds[0], 2)
        assert.is_nil(none)
        assert.equal("EBADF", code)
        assert.matches("^read fd %d+: EBADF", err)
    end))

    it("gives EBADF at once for a pipe's write end, which would never be readable", async(function()
        -- (it polled for input there for good)
        local fds = ffi.new("int[2]")
        assert.equal(0, helper.libc.pipe(fds))
        local none, err, code = uring.read_some(fds[1], 10)
        assert.is_nil(none)
        assert.equal("EBADF", code)
        assert.equal("read fd " .. fds[1] .. ": EBADF: Bad file descriptor (not open, or open only for writing)", err)
        helper.libc.write(fds[1], "ok", 2)              -- the pipe itself is as it was
        assert.equal("ok", uring.read_some(fds[0], 10))
        helper.libc.close(fds[0]); helper.libc.close(fds[1])
    end))

    it("parks a second reader of the same pipe again when the first took the input", function()
        -- in a process of its own: a read that blocks stops the whole runtime
        local script = tmpfile(".lua")
        local f = assert(io.open(script, "w"))
        f:write([[
local pluvio = require "pluvio"
local uring = require "pluvio.uring"
local ffi = require "ffi"
ffi.cdef [[ int pipe(int fds[2]); long write(int fd, const void *buf, size_t n); ]] .. "]]" .. [[
local fds = ffi.new("int[2]")
assert(ffi.C.pipe(fds) == 0)
local got = {}
local function reader()
    return pluvio.spawn(function()
        local s = assert(uring.read_some(fds[0], 100))
        got[#got + 1] = s
    end)
end
local a, b = reader(), reader()
pluvio.yield()                              -- both park on their polls
ffi.C.write(fds[1], "one", 3)               -- both polls fire; one reader takes it all
while #got < 1 do pluvio.sleep(0.001) end
local other = a:status() == "done" and b or a
io.write(other:status(), " ")               -- parked again, not blocked in read(2)
ffi.C.write(fds[1], "two", 3)
a:join()
b:join()
print(table.concat(got, " "))
]])
        f:close()
        local status, out, err = helper.sh("timeout -s KILL 30 " .. helper.quote(helper.host) .. " " ..
                                           helper.quote(script))
        os.remove(script)
        assert.equal(0, status, "the runtime stood still (status " .. status .. "): " .. err)
        assert.equal("waiting one two\n", out)
    end)

    it("is cancelled with its task and checks its arguments", async(function()
        local fds = ffi.new("int[2]")
        assert.equal(0, helper.libc.pipe(fds))
        local t = pluvio.spawn(function() return uring.read_some(fds[0], 10) end)
        pluvio.yield()
        assert.equal("waiting", t:status())
        t:kill()
        helper.libc.write(fds[1], "later", 5)
        assert.equal("later", uring.read_some(fds[0], 10))    -- the killed read took nothing
        helper.libc.close(fds[0])
        helper.libc.close(fds[1])
        assert.has_error(function() uring.read_some(-1, 1) end,
            "uring.read_some: fd must be an integer from 0 to 2147483647 (got -1)")
        assert.has_error(function() uring.read_some(0, 0) end,
            "uring.read_some: len must be an integer from 1 to 2147479552 (got 0)")
    end))
end)
