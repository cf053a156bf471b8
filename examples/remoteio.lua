-- remoteio.lua: remote I/O over UCX Active Messages, as the Rust
-- original's remote I/O example.
--
--   write: the client streams a local file to the server in rendezvous AMs
--          (header: "W offset length"); the server pulls each payload
--          straight into a registered buffer, writes it with write_fixed
--          and replies "offset".
--   read:  the client asks for a range (header: "R offset length", need a
--          reply); the server reads it with read_fixed and replies with
--          the data (rendezvous) from the registered buffer; the client
--          pulls it into a registered buffer and writes it locally.
--
-- `window` requests are in flight.  Both ends checksum their file at the
-- end; the client compares.  One process (--loopback, the default) or two
-- (--server / --connect HOST:PORT).
local pluvio = require "pluvio"
local uring = require "pluvio.uring"
local ucx = require "pluvio.ucx"
local bench = require "pluvio.bench"

local spec = {
    name = "remoteio",
    usage = "usage: pluvio examples/remoteio.lua [--mode write|read] [--loopback | --server | --connect HOST:PORT]\n" ..
            "Remote file I/O over UCX Active Messages with registered buffers on both ends.",
    options = {
        { "mode", "string", "write", "write (client -> server file) or read (server file -> client)",
          choices = { "write", "read" } },
        { "size", "size", 32 * 1048576, "bytes to move", min = 1 },
        { "chunk", "size", nil, "bytes per request (default 1m; less when the locked-memory limit, " ..
          "ulimit -l, holds fewer registered buffers)", max = 1073741824 },
        { "window", "integer", nil, "requests in flight (default 8; fewer when the locked-memory limit " ..
          "holds fewer registered buffers)", min = 1, max = 256 },
        { "loopback", "flag", false, "both ends in this process (the default)" },
        { "server", "flag", false, "serve requests on --port until the client says goodbye" },
        { "host", "string", "127.0.0.1", "address --server listens on (0.0.0.0: all of them)", nonempty = true },
        { "port", "integer", 0, "port for --server (0: any, printed)", min = 0, max = 65535 },
        { "connect", "string", nil, "HOST:PORT of a --server" },
        { "keep", "flag", false, "keep the files" },
        { "direct", "flag", false, "O_DIRECT files" },
        { "dir", "string", nil, "directory for the files (default: a temporary one)" },
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
local ERROR = 33      -- AM id of the reason an end stops, for the other
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
    io.stderr:write("remoteio: ", msg, "\n")
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
    local r = { t:join() }
    if t:status() ~= "done" then fail(tostring(r[2])) end
    return unpack(r)
end
if o.mode ~= "write" and o.mode ~= "read" then fail("--mode must be write or read (got " .. o.mode .. ")") end
-- The pool is 3 * window + 4 buffers of a chunk.  Under a locked-memory
-- limit (a user's ulimit -l: 8 MiB) the defaults are lowered to what it
-- holds: the window first, then the chunk, down to 64 KiB.
local fit_note = ""
local chunk_given = o.chunk ~= nil
do
    local chunk, window = o.chunk or 1048576, o.window or 8
    while true do
        local n, lockable = bench.fit_pool(chunk, function(w) return 3 * w + 4 end, window, o.window, 256,
                                           (o.server or o.connect) and 2 or 1)   -- (see pipeline.lua)
        if n then
            if n < window or chunk < (o.chunk or 1048576) then
                fit_note = (" (the locked-memory limit holds %d buffers of %s)"):format(lockable, bench.bytes(chunk))
            end
            o.chunk, o.window = chunk, n
            break
        end
        if o.chunk or chunk <= 65536 then
            fail(("--window %d takes %s: lower --window or --chunk, or raise the limit"):format(o.window or 1, lockable))
        end
        chunk = chunk / 2
    end
end
if o.chunk < 4096 or o.chunk % 4096 ~= 0 then fail("--chunk must be a multiple of 4096") end
if o.size < o.chunk then fail(("--size must be at least --chunk %d (got %d)"):format(o.chunk, o.size)) end
if o.size % 4096 ~= 0 then fail(("--size must be a multiple of 4096 (got %d)"):format(o.size)) end
if (o.server and o.connect) or (o.loopback and (o.server or o.connect)) then
    fail("choose one of --loopback, --server and --connect")
end

local REQ, REPLY, META = 30, 31, 32
local SEED = 77

local reactor = uring.reactor { buffer_size = o.chunk, buffer_count = 3 * o.window + 4, queue_size = 256 }
pluvio.runtime():register_reactor("remoteio", reactor)
local open = o.direct and uring.DmaFile.open or uring.File.open

local connect_host, connect_port
if o.connect then       -- checked before anything is made
    connect_host, connect_port = bench.host_port(o.connect)
    if not connect_host then fail("--connect must be HOST:PORT, the port from 1 to 65535 (got " .. o.connect .. ")") end
end

local dir = o.dir
if not dir then
    dir = os.tmpname()
    os.remove(dir)
    must(uring.mkdir(dir))
else
    local st = uring.statx(dir)
    if not st then fail("--dir " .. dir .. " does not exist") end
    if st.type ~= "directory" then fail("--dir " .. dir .. " is not a directory") end
end
if not o.keep then      -- the files (in a --dir too: they stayed, a failed run's partial ones as well)
    cleanup = function()
        os.remove(dir .. "/client.bin")
        os.remove(dir .. "/server.bin")
        if not o.dir then os.remove(dir) end
    end
end

-- The checksums of the file's 4 KiB blocks, folded: the same on both ends
-- whatever --chunk each was given.
local VERIFY_BLOCK = 4096
-- Read n bytes at off into buf: all of them (a file shorter than it should
-- be ends the run: the missing bytes would go out as whatever buf held).
local function read_chunk(f, path, buf, off, n)
    local got = must(f:read_fixed(buf, off, n))
    if got < n then
        fail(("read %s: %d of %d bytes at offset %d: the file is shorter than expected"):format(path, got, n, off))
    end
end

local function checksum(path, size)
    local f = must(open(path, "r"))
    local buf = reactor:acquire_buffer()
    local sums = {}
    for off = 0, size - 1, o.chunk do
        local n = math.min(o.chunk, size - off)
        read_chunk(f, path, buf, off, n)
        for b = 0, n - 1, VERIFY_BLOCK do
            sums[#sums + 1] = buf:checksum(math.min(VERIFY_BLOCK, n - b), b)
        end
    end
    buf:release()
    f:close()
    return bench.checksum(table.concat(sums))
end

local function fill(path, size)
    local f = must(open(path, "w+"))
    local buf = reactor:acquire_buffer()
    for off = 0, size - 1, o.chunk do
        local n = math.min(o.chunk, size - off)
        buf:fill_pattern(SEED, off, n)
        must(f:write_fixed(buf, off, n))
    end
    buf:release()
    must(f:fsync())
    f:close()
end

---------------------------------------------------------------------------
-- Server: one task per request in flight.
---------------------------------------------------------------------------

local function serve(ep, requests, path)
    must(ep:am_send(META, "chunk " .. o.chunk, nil))       -- the largest request it takes
    local f = must(open(path, "w+"))
    local served = 0
    local handlers = {}
    local inbox = pluvio.channel(o.window)
    for i = 1, o.window do
        handlers[i] = pluvio.spawn_named("handler-" .. i, function()
            local buf = reactor:acquire_buffer()
            while true do
                local msg = inbox:recv()
                if not msg then break end
                local op, off, n = msg.header:match("^(%u) (%d+) (%d+)$")
                off, n = tonumber(off), tonumber(n)
                if op == "W" then
                    must(msg:recv_data(buf))                  -- straight into buf
                    must(f:write_fixed(buf, off, n))
                    must(ep:am_send(REPLY, tostring(off), nil))
                else
                    msg:release()
                    read_chunk(f, path, buf, off, n)
                    must(ep:am_send(REPLY, tostring(off), buf, false, "rndv", n))
                end
                served = served + 1
            end
            buf:release()
        end)
    end
    while true do
        local msg, err = requests:wait_msg()
        if not msg then fail("the client went away before it said goodbye: " .. tostring(err)) end
        local op = msg.header:sub(1, 1)
        if op == "Q" then                       -- the client is done: checksum and goodbye
            local size = tonumber(msg.header:match("^Q (%d+)$"))
            msg:release()
            inbox:close()
            for i = 1, o.window do joined(handlers[i]) end
            must(f:fsync())
            f:close()
            must(ep:am_send(META, checksum(path, size), nil))
            return served
        elseif op == "P" then                   -- remote read: prepare the server's file
            local size = tonumber(msg.header:match("^P (%d+)$"))
            msg:release()
            f:close()
            fill(path, size)
            f = must(open(path, "r+"))
            must(ep:am_send(META, "ready", nil))
        else
            inbox:send(msg)
        end
    end
end

---------------------------------------------------------------------------
-- Client
---------------------------------------------------------------------------

local function run_client(ep, replies, meta, path)
    local hello = pluvio.timeout(10, meta.wait_msg, meta)
    if not hello then fail("the server did not say hello within 10 s") end
    local server_chunk = tonumber(hello.header:match("^chunk (%d+)$"))
    hello:release()
    if o.chunk > server_chunk and chunk_given then
        fail(("--chunk %s is larger than the server's --chunk %s (the size of its buffers)")
            :format(bench.bytes(o.chunk), bench.bytes(server_chunk)))
    elseif o.chunk > server_chunk then     -- (its limit lowered its default: so does this end)
        o.chunk = server_chunk
    end
    local progress = bench.progress("remoteio " .. o.mode, o.quiet)
    local t0, moved = pluvio.now(), 0
    if o.mode == "write" then
        fill(path, o.size)
    else
        must(ep:am_send(REQ, ("P %d"):format(o.size), nil))
        local m, err = meta:wait_msg()
        if not m then fail("the server went away before its file was ready: " .. tostring(err)) end
        m:release()
    end
    local f = must(open(path, o.mode == "write" and "r" or "w+"))
    local start = pluvio.now()
    local next_off = 0
    local movers = {}
    -- Replies may come back in any order: match them to their request.
    local waiting = {}
    local dispatcher = pluvio.spawn_named("replies", function()
        while true do
            local m, err = replies:wait_msg()
            if not m then fail("the server went away before it answered every request: " .. tostring(err)) end
            local w = waiting[tonumber(m.header)]
            waiting[tonumber(m.header)] = nil
            w.msg = m
            w.task:wake()
        end
    end)
    for i = 1, o.window do
        movers[i] = pluvio.spawn_named("mover-" .. i, function()
            local buf = reactor:acquire_buffer()
            while next_off < o.size do
                local off = next_off
                next_off = next_off + o.chunk
                local n = math.min(o.chunk, o.size - off)
                local w = { task = pluvio.current() }
                waiting[off] = w
                if o.mode == "write" then
                    read_chunk(f, path, buf, off, n)
                    must(ep:am_send(REQ, ("W %d %d"):format(off, n), buf, false, "rndv", n))
                else
                    must(ep:am_send(REQ, ("R %d %d"):format(off, n), nil, true))
                end
                while not w.msg do pluvio.suspend("reply for offset " .. off) end
                if o.mode == "read" then
                    if must(w.msg:recv_data(buf)) ~= n then
                        fail(("the server answered the read of %d bytes at offset %d with %d"):format(n, off, w.msg:data_len()))
                    end
                    must(f:write_fixed(buf, off, n))
                else
                    w.msg:release()
                end
                moved = moved + n
                progress:update(("%d of %d MiB"):format(math.floor(moved / 1048576), math.floor(o.size / 1048576)))
            end
            buf:release()
        end)
    end
    for i = 1, o.window do joined(movers[i]) end
    local elapsed = pluvio.now() - start
    dispatcher:kill()
    progress:done()
    if o.mode == "read" then must(f:fsync()) end
    f:close()
    must(ep:am_send(REQ, ("Q %d"):format(o.size), nil))
    local m, err = meta:wait_msg()
    if not m then fail("the server went away before it sent its checksum: " .. tostring(err)) end
    local remote_sum = m.header
    m:release()
    peer = nil
    local local_sum = checksum(path, o.size)
    return {
        mode = o.mode, size = o.size, chunk = o.chunk, window = o.window, seconds = elapsed,
        mib_s = moved / elapsed / 1048576, total_seconds = pluvio.now() - t0,
        local_checksum = local_sum, remote_checksum = remote_sum, ok = local_sum == remote_sum,
    }
end

---------------------------------------------------------------------------

local ctx = must(ucx.Context.new())
ucx_ctx = ctx
local result

if o.server then
    -- its file can be made: known before a client sends (a read-only --dir
    -- failed only once the client had made its data)
    local why = bench.writable(dir .. "/server.bin")
    if why then fail("cannot write " .. why) end
    local w = must(ctx:create_worker())
    local requests = w:am_stream(REQ, { window = 4 * o.window })
    local errors = w:am_stream(ERROR)
    local l, err = w:create_listener(o.host, o.port)
    if not l then fail(err) end
    io.write(("remoteio: serving on %s, file %s/server.bin%s\n"):format(l:address(), dir, fit_note))
    io.stdout:flush()
    local ep = must(l:accept())
    l:close()
    peer = { ep = ep, errors = errors, name = "client" }
    local served = serve(ep, requests, dir .. "/server.bin")
    peer = nil
    io.write(("remoteio: served %d requests\n"):format(served))
    pluvio.sleep(0.1)
    ep:close()
    w:close()
else
    local cw = must(ctx:create_worker())
    local replies, meta, errors = cw:am_stream(REPLY, { window = 4 * o.window }), cw:am_stream(META), cw:am_stream(ERROR)
    local ep, server_task
    if o.connect then
        local err
        ep, err = bench.connect_socket(cw, connect_host, connect_port)
        if not ep then fail(err) end
        peer = { ep = ep, errors = errors, name = "server" }
    else
        local sw = must(ctx:create_worker())
        local requests = sw:am_stream(REQ, { window = 4 * o.window })
        local l = must(sw:create_listener("127.0.0.1", 0))
        server_task = pluvio.spawn_named("server", function()
            local sep = must(l:accept())
            l:close()
            serve(sep, requests, dir .. "/server.bin")
            return sep, sw
        end)
        ep = must(cw:connect_socket("127.0.0.1", l:port()))
    end
    result = run_client(ep, replies, meta, dir .. "/client.bin")
    if server_task then
        local sep, sw = joined(server_task)
        sep:close()
        sw:close()
    end
    ep:close()
    cw:close()
    if o.json ~= "-" then
        io.write(("remoteio: %s %s in %s chunks, %d in flight%s: %.2f s, %.0f MiB/s\n"):format(o.mode,
            bench.bytes(o.size), bench.bytes(o.chunk), o.window, fit_note, result.seconds, result.mib_s))
        io.write(("  checksums: client %s, server %s: %s\n"):format(result.local_checksum, result.remote_checksum,
            result.ok and "match" or "DIFFER"))
    end
end
ctx:close()
if cleanup then
    cleanup()
end
if result and o.json then
    bench.write_json(o.json, result)
end
if result and not result.ok then
    io.stderr:write("remoteio: the files differ\n")
    os.exit(1)
end
