-- ucx_bench.lua: Active Message latency (ping-pong) and windowed bandwidth
-- over UCX, reported like ucx_perftest.  Runs as a server and a client
-- process (--server / --connect host:port) or both in one process
-- (--loopback, the default).
--
-- It counts what it measures: after each bandwidth run the receiver reports
-- how many messages and bytes it got, and the run fails if that differs
-- from what the sender sent.
--
--   pluvio examples/ucx_bench.lua --loopback --sizes 8,4k,64k,1m
--   pluvio examples/ucx_bench.lua --server --port 13337 &
--   pluvio examples/ucx_bench.lua --connect 127.0.0.1:13337
local pluvio = require "pluvio"
local ucx = require "pluvio.ucx"
local uring = require "pluvio.uring"
local bench = require "pluvio.bench"

local spec = {
    name = "ucx_bench",
    usage = "usage: pluvio examples/ucx_bench.lua [--loopback | --server | --connect HOST:PORT] [options]\n" ..
            "Active Message ping-pong latency and windowed bandwidth over UCX.",
    options = {
        { "loopback", "flag", false, "server and client in this process (default when neither --server nor --connect)" },
        { "server", "flag", false, "serve clients until one says goodbye" },
        { "connect", "string", nil, "HOST:PORT of a --server" },
        { "host", "string", "127.0.0.1", "address the server listens on", nonempty = true },
        { "port", "integer", 0, "port the server listens on (0: any; printed)", min = 0, max = 65535 },
        { "test", "string", "both", "lat, bw or both", choices = { "lat", "bw", "both" } },
        { "transport", "string", "address", "address: exchange worker addresses over the socket and use\n" ..
          "                           the fastest lanes (shared memory), as ucx_perftest does;\n" ..
          "                           socket: use the listener's connection (tcp, peer failures detected)" },
        { "sizes", "list", { 8, 4096, 65536, 1048576 }, "message sizes" },
        { "iters", "integer", 2000, "messages per size (bandwidth) and round trips (latency)", min = 1 },
        { "warmup", "integer", 1000, "untimed round trips / messages first (the JIT compiles meanwhile)", min = 0 },
        { "window", "integer", 32, "sends in flight (bandwidth)", min = 1, max = 4096 },
        { "proto", "string", nil, "eager or rndv (default: UCX chooses)", choices = { "eager", "rndv" } },
        { "spin", "number", 0, "busy-poll this many seconds before sleeping (latency; like ucx_perftest)",
          min = 0, max = 60 },
        { "no-wakeup", "flag", false, "busy-polled workers: shared-memory transports usable (as ucx_perftest)" },
        { "recv-copy", "flag", false, "copy eager data into a buffer too (ucx_perftest leaves it unread)" },
        { "json", "string", nil, "write the figures as JSON to this file ('-' for stdout)", out = true },
        { "quiet", "flag", false, "no progress line" },
    },
}

local o = bench.parse_args(spec, arg)

local function fail(msg)
    io.stderr:write("ucx_bench: ", msg, "\n")
    os.exit(2)
end
-- An operation's result, or the end of the run with its error on one line
-- (a peer that went away, say), from any task.
local function must(v, err)
    if not v then fail(tostring(err)) end
    return v
end

if o.test ~= "lat" and o.test ~= "bw" and o.test ~= "both" then fail("--test must be lat, bw or both (got " .. o.test .. ")") end
if o.proto and o.proto ~= "eager" and o.proto ~= "rndv" then fail("--proto must be eager or rndv (got " .. o.proto .. ")") end
if o.iters < 1 then fail("--iters must be >= 1") end
if o.window < 1 or o.window > 4096 then fail("--window must be from 1 to 4096") end
if o.warmup < 0 then fail("--warmup must be >= 0") end
for _, s in ipairs(o.sizes) do
    if s < 0 or s > 1073741824 then fail("--sizes must each be from 0 to 1g (got " .. s .. ")") end
end
local roles = (o.server and 1 or 0) + (o.connect and 1 or 0) + (o.loopback and 1 or 0)
if roles > 1 then fail("choose one of --loopback, --server and --connect") end
local connect_host, connect_port
if o.connect then
    connect_host, connect_port = bench.host_port(o.connect)
    if not connect_host then fail("--connect must be HOST:PORT, the port from 1 to 65535 (got " .. o.connect .. ")") end
end

if o.transport ~= "address" and o.transport ~= "socket" then
    fail("--transport must be address or socket (got " .. o.transport .. ")")
end

-- Payloads live in registered buffers on both ends, as an application would
-- keep them (and as ucx_perftest does): no Lua string per message.
local max_size = 4096
for _, s in ipairs(o.sizes) do max_size = math.max(max_size, s) end
-- The server takes data with several tasks, so that pulling one rendezvous
-- message overlaps with the next (as UCX's callbacks do for ucx_perftest).
-- (Fewer under a locked-memory limit, a user's ulimit -l of 8 MiB: the
-- pool is 4 + SINKS buffers of the largest size.)
local buffer_size = math.ceil(max_size / 4096) * 4096
local SINKS, lockable = bench.fit_pool(buffer_size, function(n) return 4 + n end, 8)
if not SINKS then
    fail(("the largest --sizes takes %s: lower it, or raise the limit"):format(lockable))
end
local buffers = uring.reactor { buffer_size = buffer_size, buffer_count = 4 + SINKS }
pluvio.runtime():register_reactor("ucx_bench buffers", buffers)

-- Messages taken and sent so far: a watchdog ends a run that stops moving
-- for 10 s.  (Over --transport address a peer that died is not detected:
-- its endpoints have no peer error handling, and the waits went on for
-- good.)
local moved = 0
local function watchdog(who)
    return pluvio.spawn_named("watchdog", function()
        local seen, still = -1, 0
        while true do
            pluvio.sleep(1)
            if moved ~= seen then
                seen, still = moved, 0
            else
                still = still + 1
            end
            if still >= 10 then
                fail(("nothing came from or went to the %s for 10 s: it stopped, or the connection broke%s")
                    :format(who, o.transport == "address" and " (--transport socket detects a peer's failure " ..
                                                              "at once)" or ""))
            end
        end
    end)
end

-- Take a message as ucx_perftest's AM handler does: rendezvous data is
-- pulled into buf, eager data is dropped unread where UCX put it (with
-- --recv-copy it is copied into buf too).
local function take(m, buf)
    moved = moved + 1
    if m:data_len() > buf:size() then   -- (recv_data would raise in a task nobody joins: a hang)
        fail(("a message of %d bytes is larger than this end's largest --sizes (%d bytes): give both ends " ..
              "the same --sizes"):format(m:data_len(), buf:size()))
    end
    if m:data_len() > 0 and (o.recv_copy or m:is_rndv()) then
        must(m:recv_data(buf))
    else
        m:release()
    end
end

-- AM ids of the protocol.
local PING, PONG, DATA, DONE, COUNT, ADDR, ADDR_REPLY = 10, 11, 12, 13, 14, 16, 17

---------------------------------------------------------------------------
-- Server: answers pings, counts data, reports counts, stops on BYE.
---------------------------------------------------------------------------

local function serve_connection(w, ep, streams)
    local counts = {}            -- size -> { msgs, bytes }
    -- data comes into one buffer and the answer goes from another (as with
    -- ucx_perftest): an echo from the buffer just written would time the
    -- peer's pull of freshly dirtied cache lines from this core
    local ping_task = pluvio.spawn_named("pong", function()
        local inbuf, outbuf = buffers:acquire_buffer(), buffers:acquire_buffer()
        while true do
            local m = streams.ping:wait_msg()
            if not m then return end
            local n = m:data_len()
            take(m, inbuf)
            must(ep:am_send(PONG, "", outbuf, false, o.proto, n))
        end
    end)
    local function sink()
        local buf = buffers:acquire_buffer()
        while true do
            local m = streams.data:wait_msg()
            if not m then return end
            local size = m:data_len()
            local c = counts[size] or { 0, 0 }
            counts[size] = c
            take(m, buf)         -- rendezvous data is pulled into buf
            c[1] = c[1] + 1
            c[2] = c[2] + size
        end
    end
    local sinks = {}
    for i = 1, SINKS do sinks[i] = pluvio.spawn_named("sink " .. i, sink) end
    local dog = watchdog("client")
    local gone                  -- why the client stopped before its "bye", if it did
    while true do
        local m, err = streams.done:wait_msg()
        if not m then gone = err; break end
        local size, want = m.header:match("^(%d+) (%d+)$")
        m:release()
        if m.header == "bye" then break end
        if not size then gone = "it sent " .. ("%q"):format(m.header) .. ", not a count request"; break end
        size, want = tonumber(size), tonumber(want)
        -- DONE says how many were sent; the sink may still be taking them
        -- (pulling rendezvous data): wait, bounded, then report what it got
        local deadline = pluvio.now() + 10
        while (counts[size] or { 0 })[1] < want and pluvio.now() < deadline do pluvio.sleep(0.0005) end
        local c = counts[size] or { 0, 0 }
        must(ep:am_send(COUNT, ("%d %d %d"):format(size, c[1], c[2]), ""))
        counts[size] = nil
    end
    dog:kill()
    ping_task:kill()
    for i = 1, SINKS do sinks[i]:kill() end
    if gone then
        fail("the client stopped before it was done: " .. tostring(gone))
    end
end

local function open_streams(w)
    return {
        ping = w:am_stream(PING, { window = 256 }), data = w:am_stream(DATA, { window = 1024 }),
        done = w:am_stream(DONE), pong = w:am_stream(PONG, { window = 256 }),
        count = w:am_stream(COUNT), addr = w:am_stream(ADDR), addr_reply = w:am_stream(ADDR_REPLY),
    }
end

-- With --transport address the peers swap worker addresses over the socket
-- connection and talk over address endpoints (shared memory when both are
-- on one machine).  Returns the endpoint to use for the benchmark.  The
-- socket connection is closed then: while a worker has a tcp endpoint, each
-- progress call polls the tcp interface (an epoll_wait system call), which
-- would more than double small-message latency.  Both ends say which
-- transport they use first (the ADDR and ADDR_REPLY headers): ends given
-- different ones stop with nil, err instead of waiting on each other.
local function mismatch(theirs)
    return nil, ("the %s uses --transport %s, this end --transport %s: give both ends the same")
        :format(o.server and "client" or "server", theirs, o.transport)
end

local function client_data_ep(w, streams, ctrl)
    must(ctrl:am_send(ADDR, o.transport, o.transport == "address" and must(w:address()) or ""))
    local m = must(streams.addr_reply:wait_msg())
    if m.header ~= o.transport then
        m:release()
        return mismatch(m.header)
    end
    if o.transport == "socket" then
        m:release()
        return ctrl
    end
    local ep = must(w:connect_addr(m:data()))
    ctrl:close()
    return ep
end

local function server_data_ep(w, streams, ctrl)
    local m = must(streams.addr:wait_msg())
    if m.header ~= o.transport or o.transport == "socket" then
        local theirs = m.header
        m:release()
        must(ctrl:am_send(ADDR_REPLY, o.transport, ""))
        if theirs ~= o.transport then
            return mismatch(theirs)
        end
        return ctrl
    end
    local back = must(w:connect_addr(m:data()))
    must(ctrl:am_send(ADDR_REPLY, o.transport, must(w:address())))
    -- the client closes first, so that TCP's TIME_WAIT stays on its side
    -- and a new server can listen on this port at once
    local deadline = pluvio.now() + 5
    while ctrl:status() and pluvio.now() < deadline do pluvio.sleep(0.001) end
    ctrl:close()
    return back
end

---------------------------------------------------------------------------
-- Client
---------------------------------------------------------------------------

local function measure_latency(ep, streams, size, progress, buf, inbuf)
    local hist = bench.Histogram.new()
    -- One clock read (the TSC, as ucx_perftest's) per round trip: its end
    -- starts the next.  The warm-up's round trips are recorded too, then
    -- forgotten, and the progress line is due when a stamp passes a
    -- deadline: LuaJIT compiles a branch the way it went while the loop was
    -- recorded, so one that goes one way for a while and then the other
    -- (i > warmup), or one way every N round trips (i % 256 == 0), can make
    -- every round trip leave the compiled loop.
    local t = bench.stamp()
    local next_update = bench.stamp_after(0.25)
    for i = 1, o.warmup + o.iters do
        must(ep:am_send(PING, "", buf, false, o.proto, size))
        local m = must(streams.pong:wait_msg())
        take(m, inbuf)
        t = hist:record_stamp(t)
        if i == o.warmup then
            hist:reset()
        end
        if t >= next_update then
            progress:update(("latency %s: %d/%d"):format(bench.human(size), math.max(0, i - o.warmup), o.iters))
            next_update = bench.stamp_after(0.25)
        end
    end
    local s = hist:summary()
    for k, v in pairs(s) do         -- one way, as ucx_perftest reports it
        if k ~= "count" then s[k] = v / 2 end
    end
    return s
end

local function measure_bandwidth(ep, streams, size, progress, buf)
    local handles = {}
    local sent = 0
    local function send_n(n)
        for _ = 1, n do
            local slot = sent % o.window + 1
            if handles[slot] then must(handles[slot]:wait()) end
            handles[slot] = ep:am_send_nb(DATA, "", buf, false, o.proto, size)
            sent = sent + 1
            moved = moved + 1
        end
    end
    -- warm-up messages are counted by the receiver too
    send_n(o.warmup)
    local t0 = pluvio.now()
    local chunk = 256
    local left = o.iters
    while left > 0 do
        local n = math.min(chunk, left)
        send_n(n)
        left = left - n
        progress:update(("bandwidth %s: %d/%d"):format(bench.human(size), o.iters - left, o.iters))
    end
    for i = 1, o.window do
        if handles[i] then must(handles[i]:wait()); handles[i] = nil end
    end
    -- the receiver's count, checked against ours
    must(ep:am_send(DONE, ("%d %d"):format(size, sent), ""))
    local m = must(streams.count:wait_msg())
    local elapsed = pluvio.now() - t0
    local rsize, rmsgs, rbytes = m.header:match("^(%d+) (%d+) (%d+)$")
    m:release()
    rmsgs, rbytes = tonumber(rmsgs), tonumber(rbytes)
    if tonumber(rsize) ~= size or rmsgs ~= sent or rbytes ~= sent * size then
        error(("ucx_bench: count mismatch at size %d: sent %d messages (%d bytes), the receiver got %s (%s bytes)")
              :format(size, sent, sent * size, tostring(rmsgs), tostring(rbytes)), 0)
    end
    return { messages = o.iters, seconds = elapsed, mib_s = o.iters * size / elapsed / 1048576,
             msgs_s = o.iters / elapsed, receiver_messages = rmsgs }
end

local function run_client(w, ep, streams)
    local progress = bench.progress("ucx_bench", o.quiet)
    local results = {}
    local buf, inbuf = buffers:acquire_buffer(), buffers:acquire_buffer()
    buf:fill(0x62)
    local dog = watchdog("server")
    for _, size in ipairs(o.sizes) do
        local r = { size = size }
        if o.test ~= "bw" then
            r.lat = measure_latency(ep, streams, size, progress, buf, inbuf)
        end
        if o.test ~= "lat" then
            r.bw = measure_bandwidth(ep, streams, size, progress, buf)
        end
        results[#results + 1] = r
    end
    dog:kill()
    buf:release()
    inbuf:release()
    progress:done()
    must(ep:am_send(DONE, "bye", ""))
    return results
end

local function report(results, mode)
    local out = o.json == "-" and io.stderr or io.stdout     -- stdout holds only the JSON then
    out:write(("ucx_bench: %s, %d iterations, window %d%s\n"):format(mode, o.iters, o.window,
        o.proto and (", proto " .. o.proto) or ""))
    out:write(("%10s  %12s  %12s  %12s  %12s  %12s\n"):format("size", "lat p50", "lat p99", "lat mean", "MiB/s", "msgs/s"))
    local json = { mode = mode, iters = o.iters, window = o.window, proto = o.proto, results = {} }
    for _, r in ipairs(results) do
        out:write(("%10s  %12s  %12s  %12s  %12s  %12s\n"):format(bench.bytes(r.size),
            r.lat and bench.human(r.lat.p50, "s") or "-", r.lat and bench.human(r.lat.p99, "s") or "-",
            r.lat and bench.human(r.lat.mean, "s") or "-", r.bw and ("%.1f"):format(r.bw.mib_s) or "-",
            r.bw and bench.human(r.bw.msgs_s) or "-"))
        json.results[#json.results + 1] = {
            size = r.size,
            lat_us = r.lat and { p50 = r.lat.p50 * 1e6, p99 = r.lat.p99 * 1e6, mean = r.lat.mean * 1e6,
                                 min = r.lat.min * 1e6, max = r.lat.max * 1e6, count = r.lat.count } or nil,
            bw = r.bw,
        }
    end
    if o.json then
        bench.write_json(o.json, json)
    end
end

---------------------------------------------------------------------------

if o.spin < 0 or o.spin > 10 then fail("--spin must be from 0 to 10 seconds") end
if o.spin > 0 then pluvio.runtime():set_spin(o.spin) end

local ctx = must(ucx.Context.new { wakeup = not o.no_wakeup })

if o.server then
    local w = must(ctx:create_worker())
    local streams = open_streams(w)
    local l, err = w:create_listener(o.host, o.port)
    if not l then fail(err) end
    io.write(("ucx_bench: listening on %s:%d\n"):format(o.host, l:port()))
    io.stdout:flush()
    local ctrl = must(l:accept())
    l:close()
    local ep, why = server_data_ep(w, streams, ctrl)
    if not ep then
        pluvio.sleep(0.05)      -- (the client reads the reply before the close)
        ctrl:close(); w:close(); ctx:close()
        fail(why)
    end
    serve_connection(w, ep, streams)
    pluvio.sleep(0.05)
    ep:close()
    w:close()
elseif o.connect then
    local w = must(ctx:create_worker())
    local streams = open_streams(w)
    local ctrl, err = bench.connect_socket(w, connect_host, connect_port)
    if not ctrl then fail(err) end
    local ep, why = client_data_ep(w, streams, ctrl)
    if not ep then
        ctrl:close(); w:close(); ctx:close()
        fail(why)
    end
    local results = run_client(w, ep, streams)
    report(results, "client of " .. o.connect .. " (" .. o.transport .. ")")
    ep:close()
    w:close()
else
    local sw, cw = must(ctx:create_worker()), must(ctx:create_worker())
    local sstreams, cstreams = open_streams(sw), open_streams(cw)
    local l = must(sw:create_listener("127.0.0.1", 0))
    local server = pluvio.spawn_named("server", function()
        local ctrl = must(l:accept())
        l:close()
        local ep = server_data_ep(sw, sstreams, ctrl)
        serve_connection(sw, ep, sstreams)
        return ep
    end)
    local ctrl = must(cw:connect_socket("127.0.0.1", l:port()))
    local ep = client_data_ep(cw, cstreams, ctrl)
    local results = run_client(cw, ep, cstreams)
    local sep = server:join()
    report(results, "loopback (" .. o.transport .. ")")
    ep:close()
    if sep then sep:close() end
    cw:close()
    sw:close()
end
ctx:close()
