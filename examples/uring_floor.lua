-- uring_floor.lua: the floor of a task-per-read runtime.  The C loop of
-- uring_c_bench (the same io_uring calls, buffers and latency histogram),
-- driven from LuaJIT through two FFI calls, with a coroutine per
-- operation resumed for each completion and yielding after it queued its
-- next read: a coroutine switch per read and nothing else a runtime does
-- (no argument checks, no task bookkeeping, no ready queue).  With
-- --no-coroutines the loop queues the next read itself: the cost of the
-- FFI calls alone.  Prints one line of JSON as uring_c_bench does.
--
--   pluvio examples/uring_floor.lua --file /tmp/pluvio-bench.dat --iodepth 32 --runtime 2
local ffi = require "ffi"
local bench = require "pluvio.bench"

local o = bench.parse_args({
    name = "uring_floor",
    usage = "usage: pluvio examples/uring_floor.lua --file FILE [options]\n" ..
            "Page-cache random reads from LuaJIT on uring_c_bench's loop: a coroutine per read, nothing else.",
    options = {
        { "file", "string", nil, "the file to read (made beforehand, e.g. by uring_bench.lua)" },
        { "bs", "size", 4096, "block size", min = 512, max = 1073741824 },
        { "size", "size", 0, "read the first SIZE bytes (0: the whole file)" },
        { "iodepth", "integer", 32, "reads in flight, a coroutine each", min = 1, max = 4096 },
        { "runtime", "number", 2, "seconds to run", min = 0.01, max = 1e6 },
        { "no-coroutines", "flag", false, "queue each next read from the loop itself" },
    },
}, arg)
if not o.file then
    io.stderr:write("uring_floor: --file is required\n")
    os.exit(2)
end

ffi.cdef [[
int uring_floor_open(const char *path, long bs, long depth, long size);
void uring_floor_queue(int i);
int uring_floor_wait(int *slots);
double uring_floor_now(void);
void uring_floor_close(void);
]]
-- uring_floor.so is built beside the host running us (build/, or
-- build-asan/ for the sanitizer run), wherever we are started from.
local host_dir = arg and arg[-1] and arg[-1]:match("^(.*)/pluvio$")
local lib_dir = os.getenv("PLUVIO_LIB") and os.getenv("PLUVIO_LIB"):match("^(.*)/[^/]*$")
local here = (arg and arg[0] or ""):match("^(.*)/examples/[^/]*$") or "."
local F = ffi.load((host_dir or lib_dir or here .. "/build") .. "/uring_floor.so")
if F.uring_floor_open(o.file, o.bs, o.iodepth, o.size) ~= 0 then
    F.uring_floor_close()
    os.exit(1)      -- (it said why)
end

local slots = ffi.new("int[?]", o.iodepth)
local queue, wait, now = F.uring_floor_queue, F.uring_floor_wait, F.uring_floor_now
local resume, yield = coroutine.resume, coroutine.yield
local cos = {}
for i = 0, o.iodepth - 1 do
    if o.no_coroutines then
        queue(i)
    else
        cos[i] = coroutine.create(function(slot)
            while true do
                queue(slot)
                yield()
            end
        end)
        resume(cos[i], i)
    end
end

-- (--runtime passes while reads are in flight; they are not waited for)
local ops, t0 = 0, now()
local deadline = t0 + o.runtime
repeat
    local n = wait(slots)
    if n < 0 then
        io.stderr:write("uring_floor: a read moved fewer bytes than --bs (is the file shorter than --size?)\n")
        F.uring_floor_close()
        os.exit(1)
    end
    ops = ops + n
    if o.no_coroutines then
        for k = 0, n - 1 do queue(slots[k]) end
    else
        for k = 0, n - 1 do resume(cos[slots[k]]) end
    end
until now() >= deadline
local secs = now() - t0
F.uring_floor_close()
print(('{"ops":%d,"seconds":%.6f,"iops":%.1f,"mib_s":%.2f}'):format(ops, secs, ops / secs,
      ops * o.bs / secs / 1048576))
