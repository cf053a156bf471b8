-- pipeline.lua: the Pluvio demo.  A file goes disk -> io_uring -> UCX ->
-- io_uring -> disk, and both ends prove they hold the same bytes.
--
--   1. generate   write a file of patterned data
--   2. read       `window` mover tasks read 1 MiB chunks into registered buffers
--   3. send       each chunk is one rendezvous Active Message (header: offset)
--   4. receive    the receiver pulls the payload straight into a registered
--                 buffer (no intermediate copy), writes it with write_fixed
--                 and acknowledges
--   5. verify     both files are read back and checksummed
--
-- Runs in one process (loopback, the default) or as two: --server and
-- --connect HOST:PORT.
local pluvio = require "pluvio"
local uring = require "pluvio.uring"
local ucx = require "pluvio.ucx"
local bench = require "pluvio.bench"

local spec = {
    name = "pipeline",
    usage = "usage: pluvio examples/pipeline.lua [options]\n" ..
            "Stream a file through io_uring and UCX and verify it on both ends.",
    options = {
        { "size", "size", 64 * 1048576, "bytes to generate and move", min = 1 },
        { "chunk", "size", nil, "bytes per Active Message (default 1m; less for --server and --connect " ..
          "when the locked-memory limit, ulimit -l, holds too few)", max = 1073741824 },
        { "window", "integer", nil, "chunks in flight (default 8, fewer when the locked-memory limit, " ..
          "ulimit -l, holds fewer registered buffers)", min = 1, max = 256 },
        { "dir", "string", nil, "where the files go (default: a temporary directory)" },
        { "direct", "flag", false, "O_DIRECT on both files" },
        { "server", "flag", false, "be the receiving end (prints its port)" },
        { "host", "string", "127.0.0.1", "address --server listens on (0.0.0.0: all of them)", nonempty = true },
        { "port", "integer", 0, "port for --server (0: any)", min = 0, max = 65535 },
        { "connect", "string", nil, "send to a --server at HOST:PORT" },
        { "keep", "flag", false, "keep the files" },
        { "json", "string", nil, "write the figures as JSON to this file ('-' for stdout)", out = true },
        { "quiet", "flag", false, "no progress line" },
    },
}

local o = bench.parse_args(spec, arg)
local cleanup         -- removes the temporary files, once there are some
-- (at the end, and when Ctrl-C or SIGTERM stops the run: the host then
-- cancels the tasks, and this task's on_exit clean-ups run)
pluvio.current():on_exit(function() if cleanup then pcall(cleanup) end end)
local ucx_ctx         -- closed before exiting (UCX's threads must not outlive it)
local ERROR = 25      -- AM id of the reason an end stops, for the other
local peer            -- with another process: { ep =, errors = its ERROR stream, name = "server" or "client" }
local failing
local function fail(msg)
    if failing then     -- another task is ending the run: its error is the one to tell
        while true do pluvio.suspend("the run to end") end
    end
    failing = true
    local p = peer
    if p then
        -- the peer's own reason first: our failure may only be its going away
        local m = pluvio.timeout(0.5, p.errors.wait_msg, p.errors)
        local why = m and m:data()
        if why then
            msg = ("the %s stopped: %s"):format(p.name, why)
        else            -- tell it why we stop, before the connection goes
            pluvio.timeout(1, function() p.ep:am_send(ERROR, nil, msg); p.ep:close() end)
        end
    end
    io.stderr:write("pipeline: ", msg, "\n")
    if ucx_ctx and ucx_ctx.c then pcall(ucx_ctx.close, ucx_ctx) end
    if cleanup then pcall(cleanup) end
    os.exit(2)
end
-- An operation's result, or the end of the run with its error on one
-- line: from any task (the others would wait for what it never does).
local function must(v, err)
    if not v then fail(tostring(err)) end
    return v
end
-- A task's result; one that failed ends the run with its error.
local function joined(t)
    local r, err = t:join()
    if t:status() ~= "done" then fail(tostring(err)) end
    return r
end
local function join_all(tasks)
    for i = 1, #tasks do joined(tasks[i]) end
end
if o.chunk and (o.chunk < 4096 or o.chunk % 4096 ~= 0) then
    fail("--chunk must be a multiple of 4096 (got " .. o.chunk .. ")")
end
if o.size < (o.chunk or 4096) then fail(("--size must be at least --chunk %d (got %d)"):format(o.chunk or 4096, o.size)) end
if o.size % 4096 ~= 0 then fail("--size must be a multiple of 4096 (got " .. o.size .. ")") end
if o.server and o.connect then fail("choose --server or --connect, not both") end
local connect_host, connect_port
if o.connect then       -- checked before anything is generated
    connect_host, connect_port = bench.host_port(o.connect)
    if not connect_host then fail("--connect must be HOST:PORT, the port from 1 to 65535 (got " .. o.connect .. ")") end
end

-- The pool is 2 * window + 4 buffers of a chunk with both ends here, and
-- window + 2 for one end: the default window is lowered to what the
-- locked-memory limit holds (a user's is 8 MiB: 6 buffers of 1 MiB beside
-- the rings; root has none).  The limit is the user's: one end of two
-- takes half of it, since the other may run on this machine too, and the
-- default chunk is then lowered too (both ends lower it alike: a server
-- takes chunks up to its own).
local two_ends = o.server or o.connect
local chunk_given = o.chunk ~= nil
local function pool_of(w) return two_ends and w + 2 or 2 * w + 4 end
local window_note = ""
do
    local want, chunk = o.window or 8, o.chunk or 1048576
    while true do
        local n, lockable = bench.fit_pool(chunk, pool_of, want, o.window, 256, two_ends and 2 or 1)
        if n then
            if n < want or chunk < (o.chunk or 1048576) then
                window_note = (" (the locked-memory limit holds %d buffers of %s%s)"):format(lockable,
                    bench.bytes(chunk), two_ends and " for this end" or "")
            end
            o.window, o.chunk = n, chunk
            break
        end
        if o.chunk or o.window or chunk <= 65536 then      -- (a --window given is not fitted)
            fail(("--window %d takes %s: lower --window or --chunk, or raise the limit"):format(o.window or 1,
                 lockable))
        end
        chunk = chunk / 2
    end
end
if o.size < o.chunk then fail(("--size must be at least --chunk %d (got %d)"):format(o.chunk, o.size)) end

local DATA, ACK, DONE, RESULT, HELLO = 20, 21, 22, 23, 24
local SEED = 2026

local rt = pluvio.runtime()
local reactor = uring.reactor { buffer_size = o.chunk, buffer_count = pool_of(o.window), queue_size = 256 }
rt:register_reactor("pipeline", reactor)
local open = o.direct and uring.DmaFile.open or uring.File.open

local dir = o.dir
if not dir then
    dir = os.tmpname()
    os.remove(dir)
    must(uring.mkdir(dir))
    if not o.keep then
        cleanup = function()
            os.remove(dir .. "/source.bin")
            os.remove(dir .. "/received.bin")
            os.remove(dir)
        end
    end
else
    local st = uring.statx(dir)
    if not st then fail("--dir " .. dir .. " does not exist") end
    if st.type ~= "directory" then fail("--dir " .. dir .. " is not a directory") end
    if not o.keep then          -- a failed run's files go too (a full disk stayed full): not the directory
        cleanup = function()
            os.remove(dir .. "/source.bin")
            os.remove(dir .. "/received.bin")
        end
    end
end

local function say(fmt, ...)
    if o.json ~= "-" then io.write(fmt:format(...)) end
end

-- Read a whole file with `window` tasks; returns its checksum: the
-- checksums of its 4 KiB blocks folded in offset order, so it depends
-- neither on scheduling nor on --chunk (a server and a client with
-- different --chunk agree).
local VERIFY_BLOCK = 4096
-- Read n bytes at off into buf: all of them (a file shorter than it should
-- be ends the run: the missing bytes would go out as whatever buf held).
local function read_chunk(f, path, buf, off, n)
    local got = must(f:read_fixed(buf, off, n))
    if got < n then
        fail(("read %s: %d of %d bytes at offset %d: the file is shorter than expected"):format(path, got, n, off))
    end
end

local function checksum_file(path, size)
    local f = must(open(path, "r"))
    local sums = {}
    local next_off = 0
    local tasks = {}
    for i = 1, o.window do
        tasks[i] = pluvio.spawn(function()
            local buf = reactor:acquire_buffer()
            while next_off < size do
                local off = next_off
                next_off = next_off + o.chunk
                local n = math.min(o.chunk, size - off)
                read_chunk(f, path, buf, off, n)
                for b = 0, n - 1, VERIFY_BLOCK do
                    sums[(off + b) / VERIFY_BLOCK + 1] = buf:checksum(math.min(VERIFY_BLOCK, n - b), b)
                end
            end
            buf:release()
        end)
    end
    join_all(tasks)
    f:close()
    return bench.checksum(table.concat(sums))
end

---------------------------------------------------------------------------
-- The receiving end: pull each chunk into a buffer, write it, acknowledge.
---------------------------------------------------------------------------

local function receive(w, ep_for_acks, data_stream, done_stream, dst_path)
    local dst = must(open(dst_path, "w+"))
    local written, chunks, expected = 0, 0, nil
    local finished = pluvio.channel(1)
    local inbox = pluvio.channel(o.window)
    local function check_finished()
        if expected and written >= expected and not finished:is_closed() then
            finished:close()
        end
    end
    local writers = {}
    for i = 1, o.window do
        writers[i] = pluvio.spawn_named("writer-" .. i, function()
            local buf = reactor:acquire_buffer()
            while true do
                local msg = inbox:recv()
                if not msg then break end
                local off = tonumber(msg.header)
                local n = msg:data_len()
                must(msg:recv_data(buf))                -- rendezvous: straight into buf
                must(dst:write_fixed(buf, off, n))
                written = written + n
                chunks = chunks + 1
                must(ep_for_acks():am_send(ACK, msg.header, nil))
                check_finished()
            end
            buf:release()
        end)
    end
    local dispatcher = pluvio.spawn_named("dispatcher", function()
        while true do
            local msg = data_stream:wait_msg()
            if not msg then return end
            inbox:send(msg)
        end
    end)
    -- DONE comes after every chunk was sent, so after every chunk was pulled
    local m, err = done_stream:wait_msg()
    if not m then fail("the sender went away before it was done: " .. tostring(err)) end
    expected = tonumber(m.header)
    m:release()
    check_finished()
    finished:recv()                 -- returns when closed: all written
    dispatcher:kill()
    inbox:close()
    join_all(writers)
    must(dst:fsync())
    dst:close()
    return written, chunks
end

---------------------------------------------------------------------------
-- The sending end: generate, read, send (windowed), collect acks.
---------------------------------------------------------------------------

local function generate(path)
    local f = must(open(path, "w+"))
    local off = 0
    local tasks = {}
    for i = 1, o.window do
        tasks[i] = pluvio.spawn(function()
            local buf = reactor:acquire_buffer()
            while off < o.size do
                local my = off
                off = off + o.chunk
                local n = math.min(o.chunk, o.size - my)
                buf:fill_pattern(SEED, my, n)
                must(f:write_fixed(buf, my, n))
            end
            buf:release()
        end)
    end
    join_all(tasks)
    must(f:fsync())
    f:close()
end

local function send(ep, ack_stream, src_path, progress)
    local src = must(open(src_path, "r"))
    local next_off, acked, sent = 0, 0, 0
    local acks = pluvio.spawn_named("acks", function()
        local want = math.ceil(o.size / o.chunk)
        for _ = 1, want do
            local m, err = ack_stream:wait_msg()
            if not m then fail("the receiver went away before it acknowledged every chunk: " .. tostring(err)) end
            m:release()
            acked = acked + 1
        end
    end)
    local movers = {}
    for i = 1, o.window do
        movers[i] = pluvio.spawn_named("mover-" .. i, function()
            local buf = reactor:acquire_buffer()
            while next_off < o.size do
                local off = next_off
                next_off = next_off + o.chunk
                local n = math.min(o.chunk, o.size - off)
                read_chunk(src, src_path, buf, off, n)
                must(ep:am_send(DATA, tostring(off), buf, false, "rndv", n))
                sent = sent + n
                progress:update(("%d of %d MiB sent"):format(math.floor(sent / 1048576), math.floor(o.size / 1048576)))
            end
            buf:release()
        end)
    end
    join_all(movers)
    must(ep:am_send(DONE, tostring(o.size), nil))
    joined(acks)
    src:close()
    return sent, acked
end

---------------------------------------------------------------------------

local ctx = must(ucx.Context.new())
ucx_ctx = ctx
local src_path, dst_path = dir .. "/source.bin", dir .. "/received.bin"
local result = { size = o.size, chunk = o.chunk, window = o.window, direct = o.direct }

if o.server then
    -- the file it receives into can be made: known before a client sends
    -- (a read-only --dir failed only once the client had made its data)
    local why = bench.writable(dst_path)
    if why then fail("cannot write " .. why) end
    local w = must(ctx:create_worker())
    local data_stream = w:am_stream(DATA, { window = 2 * o.window })
    local done_stream = w:am_stream(DONE)
    local errors = w:am_stream(ERROR)
    local l = must(w:create_listener(o.host, o.port))
    io.write(("pipeline: receiving on %s into %s\n"):format(l:address(), dst_path))
    io.stdout:flush()
    local ep = must(l:accept())
    l:close()
    peer = { ep = ep, errors = errors, name = "client" }
    must(ep:am_send(HELLO, tostring(o.chunk), nil))     -- the largest chunk it takes
    local t0 = pluvio.now()
    local written = receive(w, function() return ep end, data_stream, done_stream, dst_path)
    local sum = checksum_file(dst_path, written)
    must(ep:am_send(RESULT, ("%d %s"):format(written, sum), nil))
    say("pipeline: received %s in %.2f s, checksum %s\n", bench.bytes(written), pluvio.now() - t0, sum)
    peer = nil
    pluvio.sleep(0.1)
    ep:close()
    w:close()
else
    local progress = bench.progress("pipeline", o.quiet)
    say("pipeline: %s of data, %s chunks, %d in flight%s%s\n", bench.bytes(o.size), bench.bytes(o.chunk),
        o.window, window_note, o.direct and ", O_DIRECT" or "")

    -- the other end first: a wrong --connect fails before the file is written
    local w = must(ctx:create_worker())
    local ack_stream = w:am_stream(ACK, { window = 4 * o.window })
    local receiver, remote_sum
    local ep
    if o.connect then
        local hello, errors = w:am_stream(HELLO), w:am_stream(ERROR)
        local err
        ep, err = bench.connect_socket(w, connect_host, connect_port)
        if not ep then fail(err) end
        peer = { ep = ep, errors = errors, name = "server" }
        local m = pluvio.timeout(10, hello.wait_msg, hello)
        if not m then fail("the server at " .. o.connect .. " did not say hello within 10 s") end
        local server_chunk = tonumber(m.header)
        m:release()
        if o.chunk > server_chunk and chunk_given then
            fail(("--chunk %s is larger than the server's --chunk %s (the size of its buffers)")
                :format(bench.bytes(o.chunk), bench.bytes(server_chunk)))
        elseif o.chunk > server_chunk then     -- (its limit lowered its default: so does this end)
            say("  (the server takes chunks of up to %s: this run's are that size)\n", bench.bytes(server_chunk))
            o.chunk = server_chunk
        end
    else
        -- loopback: the receiving end is a second worker in this process
        local rw = must(ctx:create_worker())
        local data_stream = rw:am_stream(DATA, { window = 2 * o.window })
        local done_stream = rw:am_stream(DONE)
        local back
        receiver = pluvio.spawn_named("receiver", function()
            local written = receive(rw, function()
                back = back or must(rw:connect_addr(w:address()))
                return back
            end, data_stream, done_stream, dst_path)
            return written
        end)
        ep = must(w:connect_addr(rw:address()))
    end
    local result_stream = w:am_stream(RESULT)

    -- the steps' lines, their times in one column
    local labels = { "1. generated " .. src_path, "2-4. read, sent, received, written " .. bench.bytes(o.size),
                     "5. verified (checksums match)" }
    local width = math.max(#labels[1], #labels[2], #labels[3])
    local function step(label, seconds, rest)
        say("  %-" .. width .. "s %6.2f s%s\n", label, seconds, rest or "")
    end

    local t = pluvio.now()
    generate(src_path)
    result.generate_s = pluvio.now() - t
    step(labels[1], result.generate_s)

    t = pluvio.now()
    local sent, acked = send(ep, ack_stream, src_path, progress)
    result.transfer_s = pluvio.now() - t
    progress:done()
    result.mib_s = sent / result.transfer_s / 1048576
    step("2-4. read, sent, received, written " .. bench.bytes(sent), result.transfer_s,
         ("  (%.0f MiB/s, %d chunks acknowledged)"):format(result.mib_s, acked))

    t = pluvio.now()
    local local_sum = checksum_file(src_path, o.size)
    if receiver then
        local written = joined(receiver)
        remote_sum = checksum_file(dst_path, written)
    else
        local m, err = result_stream:wait_msg()
        if not m then fail("the server went away before it sent its checksum: " .. tostring(err)) end
        local _, s = m.header:match("^(%d+) (.*)$")
        remote_sum = s
        m:release()
    end
    result.verify_s = pluvio.now() - t
    result.source_checksum, result.received_checksum = local_sum, remote_sum
    result.ok = local_sum == remote_sum
    step(result.ok and labels[3] or "5. verified (CHECKSUMS DIFFER)", result.verify_s)
    say("     source   %s\n     received %s\n", local_sum, remote_sum)
    local st = rt:stats()
    say("  runtime: %d tasks, %d ticks, %.2f s blocked in the kernel\n", st.tasks_spawned, st.ticks, st.time_blocked)
    peer = nil
    ep:close()
    w:close()
end
ctx:close()

if not o.keep then              -- in a --dir too: its files, not the directory
    uring.unlink(src_path)
    uring.unlink(dst_path)
    if not o.dir then uring.rmdir(dir) end
end
if o.json then
    bench.write_json(o.json, result)
end
if result.ok == false then
    io.stderr:write("pipeline: the received file differs from the source\n")
    os.exit(1)
end
