-- Active Messages over UCX: am_send and am_send_nb of strings and
-- registered buffers, eager and rendezvous, headers, replies, a stream's
-- window (flow control), messages for ids with no stream.
local pluvio = require "pluvio"
local ucx = require "pluvio.ucx"
local helper = require "helper"
local uh = require "ucx_helpers"

local async = helper.async
local pair, close_pair = helper.ucx_pair, helper.ucx_close_pair
local payload = uh.payload

describe("UCX", function()
    it("runs the seed's example as written (connect_addr, am_send)", function()
        local rt = pluvio.Runtime.new(1024)
        local ucx_reactor = ucx.UCXReactor.current()
        rt:register_reactor("ucx_reactor", ucx_reactor)
        local got = rt:run(function()
            local context = ucx.Context.new()
            local receiver = context:create_worker()
            ucx_reactor:register_worker(receiver)
            local stream = receiver:am_stream(3)
            local worker_addr = receiver:address()
            local worker = context:create_worker()
            ucx_reactor:register_worker(worker)
            ucx_reactor:register_worker(worker)     -- twice: progressed once
            local endpoint = worker:connect_addr(worker_addr)
            local id, header, data = 3, "hdr", "payload"
            assert(endpoint:am_send(id, header, data, true, nil))
            local msg = assert(stream:wait_msg())
            local r = { msg.header, msg:data(), msg:data_len() }
            endpoint:close()
            worker:close()
            receiver:close()
            context:close()
            return r
        end)
        assert.same({ "hdr", "payload", 7 }, got)
    end)

    it("delivers every size class intact, eager and rendezvous", async(function()
        local p = pair()
        for i, size in ipairs({ 8, 4096, 65536, 1048576, 16777216 }) do
            local data = payload(size, i)
            local sender = pluvio.spawn(function() return assert(p.ep:am_send(1, "size" .. size, data)) end)
            local m = assert(p.stream:wait_msg())
            assert.equal("size" .. size, m.header)
            assert.equal(size, m:data_len())
            local got = m:data()
            assert.is_true(got == data, "payload of " .. size .. " bytes differs")
            assert.is_true(sender:join())
        end
        local s = p.sw:stats()
        assert.equal(5, s.am_received)
        assert.is_true(s.rndv_received >= 1, "no rendezvous message")
        assert.is_true(s.eager_received >= 1, "no eager message")
        close_pair(p)
    end))

    it("receives rendezvous data straight into a registered buffer", async(function()
        local uring = require "pluvio.uring"
        local p = pair()
        local data = payload(1048576, 9)
        local sender = pluvio.spawn(function() return p.ep:am_send(1, "", data, false, "rndv") end)
        local m = assert(p.stream:wait_msg())
        assert.is_true(m:is_rndv())
        local buf = uring.acquire_buffer()
        assert.equal(1048576, m:recv_data(buf))
        assert.is_true(buf:tostring(1048576) == data)
        buf:release()
        assert.is_true(sender:join())
        close_pair(p)
    end))

    it("takes an empty rendezvous message into a buffer without UCX keeping its descriptor", function()
        -- UCX 1.13's ucp_am_recv_data_nbx of a 0-byte rendezvous message
        -- answered the sender but never freed the descriptor: the worker's
        -- close warned "was not returned to mpool ucp_am_bufs"
        local status, out, err = helper.run_script([[
            local pluvio, ucx = require "pluvio", require "pluvio.ucx"
            local ctx = assert(ucx.Context.new())
            local sw, cw = assert(ctx:create_worker()), assert(ctx:create_worker())
            local stream = sw:am_stream(1)
            local ep = assert(cw:connect_addr(sw:address()))
            local sender = pluvio.spawn(function() return ep:am_send(1, "h", "", false, "rndv") end)
            local m = assert(stream:wait_msg())
            local buf = require("pluvio.uring").acquire_buffer()
            print(m:is_rndv(), m:recv_data(buf), sender:join())
            buf:release()
            ep:close(); cw:close(); sw:close(); ctx:close()
        ]])
        assert.equal(0, status, err)
        assert.equal("true\t0\ttrue\n", out)
        assert.equal("", err)
    end)

    it("sends registered buffers without a copy", async(function()
        local uring = require "pluvio.uring"
        local p = pair()
        local buf = uring.acquire_buffer()
        buf:fill_pattern(5, 0)
        local sum = buf:checksum(65536)
        local sender = pluvio.spawn(function() return p.ep:am_send(1, "buf", buf, false, nil, 65536) end)
        local m = assert(p.stream:wait_msg())
        local out = uring.acquire_buffer()
        assert.equal(65536, m:recv_data(out))
        assert.equal(sum, out:checksum(65536))
        assert.is_true(sender:join())
        buf:release()
        out:release()
        close_pair(p)
    end))

    -- A task sends a 64 KiB registered buffer with rendezvous (send(ep, buf)
    -- starts it) and is killed before the receiver pulls the data: the
    -- buffer must stay out of the pool, and its bytes intact, until UCX is
    -- done; then it goes back.
    local function killed_sender_keeps_buffer(send)
        local uring = require "pluvio.uring"
        local r = uring.current()
        local p = pair()
        local ref = uring.acquire_buffer()
        ref:fill_pattern(7, 0)
        local sum = ref:checksum(65536)
        ref:release()
        local free = r:stats().buffers_free
        local sender = pluvio.spawn(function()
            local b = uring.acquire_buffer()
            b:fill_pattern(7, 0)
            return send(p.ep, b)
        end)
        local m = assert(p.stream:wait_msg())   -- the data waits for us to pull it
        assert.equal(free - 1, r:stats().buffers_free)
        sender:kill()                           -- its buffer is released...
        assert.equal(free - 1, r:stats().buffers_free)  -- ...but UCX still reads it
        local grabbed = {}
        for i = 1, free - 1 do grabbed[i] = uring.acquire_buffer(); grabbed[i]:fill(0xee) end
        local out = grabbed[#grabbed]
        assert.equal(65536, m:recv_data(out))
        assert.equal(sum, out:checksum(65536))
        for i = 1, #grabbed do grabbed[i]:release() end
        local deadline = pluvio.now() + 10      -- the send settles: the buffer goes back
        repeat assert.is_true(p.ep:flush()) until r:stats().buffers_free == free or pluvio.now() > deadline
        assert.equal(free, r:stats().buffers_free)
        close_pair(p)
    end

    it("keeps a sending buffer out of the pool while UCX reads it, though another task releases it", async(function()
        local uring = require "pluvio.uring"
        local r = uring.current()
        local p = pair()
        local b = uring.acquire_buffer()
        b:fill_pattern(5, 0)
        local sum = b:checksum(65536)
        local free = r:stats().buffers_free
        local sender = pluvio.spawn(function() return p.ep:am_send(1, "buf", b, false, "rndv", 65536) end)
        local m = assert(p.stream:wait_msg())
        b:release()                             -- the sender is still in am_send
        assert.equal(free, r:stats().buffers_free)
        local out = uring.acquire_buffer()
        assert.equal(65536, m:recv_data(out))
        assert.equal(sum, out:checksum(65536))
        out:release()
        assert.is_true(sender:join())
        assert.equal(free + 1, r:stats().buffers_free)
        close_pair(p)
    end))

    it("keeps a killed sender's registered buffer out of the pool until UCX is done with it", async(function()
        killed_sender_keeps_buffer(function(ep, b) return ep:am_send(1, "buf", b, false, "rndv", 65536) end)
    end))

    it("keeps an unwaited am_send_nb's buffer until UCX is done, though released and its task killed", async(function()
        killed_sender_keeps_buffer(function(ep, b)
            local h = ep:am_send_nb(1, "nb", b, false, "rndv", 65536)
            b:release()                         -- UCX still reads it
            pluvio.suspend("never waits for " .. tostring(h))
        end)
    end))

    it("takes headers up to the worker's limit and refuses one byte more before calling UCX", async(function()
        local p = pair()
        local max = p.cw:max_am_header()
        assert.is_true(max >= 64)
        for _, n in ipairs({ 0, 1, 128, max }) do
            local h = ("h"):rep(n)
            local sender = pluvio.spawn(function() return p.ep:am_send(1, h, "d") end)
            local m = assert(p.stream:wait_msg())
            assert.equal(n, #m.header)
            assert.is_true(m.header == h)
            m:release()
            assert.is_true(sender:join())
        end
        local ok, err = pcall(p.ep.am_send, p.ep, 1, ("h"):rep(max + 1), "d")
        assert.is_false(ok)
        assert.matches(("Endpoint:am_send: header is %d bytes, more than this worker's limit of %d"):format(max + 1, max), err)
        close_pair(p)
    end))

    it("keeps headers over 128 bytes in reused blocks: held ones intact, no block per message", async(function()
        local p = pair { window = 64 }
        local max = p.sw:max_am_header()
        local sizes = { 129, 256, 257, 1000, 4096, max }
        -- held at once: each its own block, each header intact
        for i, n in ipairs(sizes) do assert(p.ep:am_send(1, ("%x"):format(i):rep(n):sub(1, n), "d")) end
        local held = {}
        for i = 1, #sizes do held[i] = assert(p.stream:wait_msg()) end
        for i, n in ipairs(sizes) do
            assert.is_true(held[i].header == ("%x"):format(i):rep(n):sub(1, n), "header " .. i)
            held[i]:release()
        end
        local blocks = p.sw:stats().header_blocks
        assert.is_true(blocks >= 5 and blocks <= #sizes, "blocks " .. blocks)
        -- one at a time, 500 more: the freed blocks serve them all
        for i = 1, 500 do
            local n = sizes[i % #sizes + 1]
            assert(p.ep:am_send(1, ("z"):rep(n), "d"))
            local m = assert(p.stream:wait_msg())
            assert.equal(n, #m.header)
            m:release()
        end
        assert.equal(blocks, p.sw:stats().header_blocks)
        close_pair(p)
    end))

    it("holds messages for a slow reader up to the window, slows the sender, loses nothing and keeps order", async(function()
        -- 16 MB of eager messages: more than the transport can buffer
        -- (about 4.6 MB on loopback here), so the sender must be slowed
        local p = pair { window = 4 }
        local n = 2000
        local sent = 0
        local sender = pluvio.spawn(function()
            for i = 1, n do
                assert(p.ep:am_send(1, tostring(i), payload(8000, i)))
                sent = i
            end
        end)
        local max_held, max_lead = 0, 0
        for i = 1, n do
            if i % 50 == 0 then pluvio.sleep(0.002) end     -- a slow reader
            local m = assert(p.stream:wait_msg())
            assert.equal(tostring(i), m.header)
            assert.equal(payload(8000, i), m:data())
            max_held = math.max(max_held, p.sw:stats().msgs_held)
            max_lead = math.max(max_lead, sent - i)
        end
        sender:join()
        -- held: the window plus at most one progress burst (the transport's FIFO)
        assert.is_true(max_held <= 4 + 80, "held " .. max_held .. " messages")
        -- the sender was held back: it never ran far ahead of the reader
        assert.is_true(max_lead < n / 2, "the sender ran " .. max_lead .. " messages ahead")
        close_pair(p)
    end))

    it("keeps every message and per-task order with many concurrent senders on one endpoint", async(function()
        local p = pair()
        local senders = {}
        for k = 1, 8 do
            senders[k] = pluvio.spawn(function()
                for i = 1, 50 do assert(p.ep:am_send(1, k .. ":" .. i, payload(100 * k, i))) end
            end)
        end
        local last = {}
        for _ = 1, 400 do
            local m = assert(p.stream:wait_msg())
            local k, i = m.header:match("^(%d+):(%d+)$")
            k, i = tonumber(k), tonumber(i)
            assert.equal((last[k] or 0) + 1, i)
            last[k] = i
            assert.equal(payload(100 * k, i), m:data())
        end
        for k = 1, 8 do senders[k]:join(); assert.equal(50, last[k]) end
        close_pair(p)
    end))

    it("gives a send handle's result after its worker closed, when the send had completed", async(function()
        -- (it said the send failed, ECANCELED, when no sweep had taken the
        -- result before the close: a caller would send it again)
        local ctx = assert(ucx.Context.new())
        local sw, cw = assert(ctx:create_worker()), assert(ctx:create_worker())
        local s = sw:am_stream(1)
        local ep = assert(cw:connect_addr(sw:address()))
        local h = ep:am_send_nb(1, "hdr", ("p"):rep(100000), false, "eager")
        assert.equal(100000, #assert(s:wait_msg()):data())
        while cw:stats().ops_in_flight > 0 do pluvio.sleep(0.001) end
        ep:close()
        cw:close()
        assert.is_true(h:wait())
        sw:close(); ctx:close()
    end))

    it("lets only the task that started a send wait for it, also once it is over", async(function()
        local p = pair()
        for _, data in ipairs({ "small", ("x"):rep(1048576) }) do     -- (done at once, and in flight)
            local h = p.ep:am_send_nb(1, "", data)
            local other = pluvio.spawn(function() return pcall(h.wait, h) end)
            local ok, err = other:join()
            assert.is_false(ok)
            assert.matches("SendHandle:wait: only the task that started the send can wait for it", err, 1, true)
            assert(p.stream:wait_msg()):release()
            assert.is_true(h:wait())
        end
        close_pair(p)
    end))

    it("cancels a send handle's wait left in a plain coroutine, and the handle then says so", async(function()
        local p = pair()
        -- rendezvous data stays with the sender until the receiver pulls it
        local h = p.ep:am_send_nb(1, "", ("x"):rep(1048576), false, "rndv")
        local co = coroutine.create(function() return h:wait() end)
        assert.is_true((coroutine.resume(co)))
        local ok, err = pcall(p.ep.am_send, p.ep, 1, "", "next")
        assert.is_false(ok)
        assert.matches("SendHandle:wait: called from a coroutine that is not a pluvio task %(only " ..
                       "pluvio tasks may block%); its operation was cancelled when the task called " ..
                       "Endpoint:am_send", err)
        local sent, why = h:wait()
        assert.is_nil(sent)
        assert.matches("am_send", why)
        assert.is_true(p.ep:am_send(1, "", "next"))
        close_pair(p)
    end))

    it("does not let a plain coroutine's wait_msg take a waiting reader's turn", async(function()
        local p = pair()
        local co = coroutine.create(function() return p.stream:wait_msg() end)
        assert.is_true((coroutine.resume(co)))      -- first in the stream's line, then left
        local reader = pluvio.spawn(function() return assert(p.stream:wait_msg()):data() end)
        pluvio.yield()
        pluvio.spawn(function() assert(p.ep:am_send(1, "", "to the reader")) end)
        local deadline = pluvio.now() + 10
        while reader:status() ~= "done" and pluvio.now() < deadline do pluvio.sleep(0.002) end
        assert.equal("done", reader:status())
        assert.equal("to the reader", reader:join())
        local ok, err = coroutine.resume(co)
        assert.is_false(ok)
        assert.matches("Stream:wait_msg: called from a coroutine that is not a pluvio task", err)
        close_pair(p)
    end))

    it("starts sends without waiting and waits for them later", async(function()
        local p = pair()
        local handles = {}
        for i = 1, 16 do handles[i] = p.ep:am_send_nb(1, tostring(i), payload(65536, i)) end
        for i = 1, 16 do
            local m = assert(p.stream:wait_msg())
            assert.equal(tostring(i), m.header)
            assert.equal(payload(65536, i), m:data())
        end
        for i = 1, 16 do assert.is_true(handles[i]:wait()) end
        -- registered buffers: out of the pool while in flight, back after wait
        local uring = require "pluvio.uring"
        local r = uring.current()
        local b = uring.acquire_buffer()
        local free = r:stats().buffers_free + 1
        b:fill(7)
        local h = p.ep:am_send_nb(1, "buf", b, false, "rndv", 4096)
        b:release()
        assert.equal(free - 1, r:stats().buffers_free)
        local out = uring.acquire_buffer()
        assert.equal(4096, assert(p.stream:wait_msg()):recv_data(out))
        out:release()
        assert.is_true(h:wait())
        assert.equal(free, r:stats().buffers_free)
        close_pair(p)
    end))

    it("lets go of completed sends nobody waits for: a long task does not keep one per send", async(function()
        -- each unwaited handle stayed its task's until the task ended, with
        -- its strings, its registered buffers out of the pool and its op
        -- slot: after 65,536 of them every op of the worker failed
        local uring = require "pluvio.uring"
        local p = pair()
        local r = uring.current()
        local free = r:stats().buffers_free
        local left = setmetatable({}, { __mode = "k" })
        local first
        local out = uring.acquire_buffer()
        for i = 1, 200 do
            -- (bounded: without a buffer back the pool runs dry, and the wait is for good)
            local b = assert(pluvio.timeout(5, function() return uring.acquire_buffer():detach() end)):take()
            b:fill(i % 256)
            local h = p.ep:am_send_nb(1, tostring(i), b, false, "rndv", 4096)
            b:release()                     -- out of the pool until UCX is done with it
            first = first or h
            left[h] = i
            assert.equal(4096, assert(p.stream:wait_msg()):recv_data(out))
        end
        out:release()
        assert.is_true(p.ep:flush())
        jit.flush()                         -- (a trace may hold the last handles)
        collectgarbage(); collectgarbage()
        local kept = 0
        for _ in pairs(left) do kept = kept + 1 end
        assert.is_true(kept <= 16, kept .. " handles of 200 kept")
        assert.is_true(first:wait())        -- a result taken early is kept for wait()
        assert.is_true(r:stats().buffers_free >= free - 16, "buffers free " .. r:stats().buffers_free)
        close_pair(p)
    end))

    it("rejects bad arguments with clear errors", async(function()
        local p = pair()
        local ep = p.ep
        assert.has_error(function() ep:am_send(256, "", "") end,
            "Endpoint:am_send: id must be an integer from 0 to 255 (got 256)")
        assert.has_error(function() ep:am_send(-1, "", "") end,
            "Endpoint:am_send: id must be an integer from 0 to 255 (got -1)")
        assert.has_error(function() ep:am_send(1, "", 42) end,
            "Endpoint:am_send: data must be a string, nil or a registered buffer (got number)")
        assert.has_error(function() ep:am_send(1, {}, "") end,
            "Endpoint:am_send: header must be a string, nil or a registered buffer (got table)")
        assert.has_error(function() ep:am_send(1, "", "", "yes") end,
            "Endpoint:am_send: need_reply must be a boolean or nil (got string)")
        assert.has_error(function() ep:am_send(1, "", "", false, "fast") end,
            'Endpoint:am_send: proto must be nil, "eager" or "rndv" (got "fast")')
        for _, call in ipairs({         -- errors name the caller's line
            function() local r = ep:am_send(-1, "", ""); return r end,
            function() local r = ep:am_send_nb(1, "", "", false, "fast"); return r end,
        }) do
            local _, err = pcall(call)
            assert.matches("ucx_am_spec%.lua:%d+: Endpoint:am_send", err)
        end
        assert.has_error(function() p.sw:create_listener("127.0.0.1", 70000) end,
            "Worker:create_listener: port must be an integer from 0 to 65535 (got 70000)")
        assert.has_error(function() p.sw:create_listener("127.0.0.1", 2 ^ 53) end,
            "Worker:create_listener: port must be an integer from 0 to 65535 (got 9007199254740992)")
        assert.has_error(function() p.cw:connect_socket("127.0.0.1", 0) end,
            "Worker:connect_socket: port must be the peer's port, an integer from 1 to 65535 (got 0)")
        assert.has_error(function() p.sw:am_stream(1) end,
            "Worker:am_stream: a stream for AM id 1 is already open on this worker")
        assert.has_error(function() p.sw:am_stream(2, { windw = 3 }) end,
            'Worker:am_stream: unknown option "windw" (known: window)')
        assert.has_error(function() ucx.Context.new({ tls = "tcp" }) end,
            'Context.new: unknown option "tls" (known: wakeup; choose transports with the UCX_TLS environment variable)')
        close_pair(p)
        assert.has_error(function() ep:am_send(1, "", "") end, "Endpoint:am_send: the endpoint is closed")
        assert.has_error(function() p.sw:address() end, "Worker:address: the worker is closed")
    end))

    -- (UCX.md: let a rendezvous message go before closing the connect_addr
    -- endpoint it came over; closed first, the reply waited for good)
    it("ends a rendezvous reply to a connect_addr client that takes or releases it before its close",
       async(function()
        local ctx = assert(ucx.Context.new())
        local server, client = assert(ctx:create_worker()), assert(ctx:create_worker())
        local inbox, replies = server:am_stream(1), client:am_stream(2)
        local ep = assert(client:connect_addr(server:address()))
        for _, how in ipairs({ "take", "release" }) do
            assert(ep:am_send(1, "question", "?", true))
            local q = assert(inbox:wait_msg())
            local replier = pluvio.spawn(function()
                return q:reply(2, "answer", ("y"):rep(1048576), false, "rndv")
            end)
            local r = assert(replies:wait_msg())
            assert.is_true(r:is_rndv())
            if how == "take" then
                assert.equal(1048576, #assert(r:data()))
            else
                r:release()
            end
            assert.is_true(pluvio.timeout(5, replier.join, replier), how)
        end
        assert.is_true(ep:close())
        assert.equal(0, server:stats().ops_in_flight)
        assert.is_true(server:close() and client:close())
        ctx:close()
    end))

    it("refuses need_reply on a connect_addr endpoint with peer_errors, which UCX cannot answer safely", async(function()
        local p = pair()
        local ep = assert(p.cw:connect_addr(p.sw:address(), { peer_errors = true }))
        local want = "Endpoint:am_send: need_reply is not allowed on an endpoint from connect_addr with " ..
                     "peer_errors = true (UCX 1.13 frees the receiver's reply endpoint without notice if " ..
                     "this process fails, and a reply could reach another process): use connect_socket for " ..
                     "replies with peer failure detection, or connect_addr without peer_errors"
        assert.has_error(function() ep:am_send(1, "", "x", true) end, want)
        assert.has_error(function() ep:am_send_nb(1, "", "x", true) end,
                         (want:gsub("^Endpoint:am_send:", "Endpoint:am_send_nb:")))
        -- without a reply it sends; without peer_errors replies work
        assert.is_true(ep:am_send(1, "", "plain", false))
        local m = assert(p.stream:wait_msg())
        assert.equal("plain", m:data())
        local ep2 = assert(p.cw:connect_addr(p.sw:address()))
        local answers = p.cw:am_stream(2)
        assert.is_true(ep2:am_send(1, "", "ask", true))
        m = assert(p.stream:wait_msg())
        assert.equal("ask", m:data())
        assert.is_true(m:reply(2, "answer", ""))
        local a = assert(answers:wait_msg())
        assert.equal("answer", a.header)
        a:release()
        ep:close()
        ep2:close()
        close_pair(p)
    end))

    it("replies with len bytes of a registered buffer, as am_send sends them, and names Message:reply in errors",
       async(function()
        local uring = require "pluvio.uring"
        local p = pair()
        local answers = p.cw:am_stream(2)
        assert.is_true(p.ep:am_send(1, "", "ask", true))
        local m = assert(p.stream:wait_msg())
        local buf = uring.acquire_buffer()
        buf:fill_pattern(3, 0)
        assert.has_error(function() m:reply(2, "", "text", nil, nil, 2) end,
                         "Message:reply: len applies to a registered buffer only (data is a string)")
        assert.has_error(function() m:reply(2, "", buf, nil, "fast") end,
                         'Message:reply: proto must be nil, "eager" or "rndv" (got "fast")')
        assert.is_true(m:reply(2, "part", buf, nil, nil, 4096))
        local a = assert(answers:wait_msg())
        assert.equal(4096, a:data_len())
        assert.equal(buf:checksum(4096), (require "pluvio.bench").checksum(a:data()))
        buf:release()
        close_pair(p)
    end))

    -- the number held for an id with no open stream (UCX_UNCLAIMED_HOLD)
    local HOLD = 64

    local function until_stat(w, key, n)
        while w:stats()[key] < n do pluvio.sleep(0.001) end
    end

    it("holds messages for an AM id with no stream (id 0 below an open one too) for the stream opened next", async(function()
        local p = pair()            -- a stream for id 1 is open: UCX 1.13 called a garbage handler for id 0
        assert(p.ep:am_send(0, "zero", "a"))
        -- (a rendezvous send completes once the stream's reader pulls it)
        local big = p.ep:am_send_nb(0, "zero", ("r"):rep(200000), false, "rndv")
        assert(p.ep:am_send(9, "nine", "b"))
        until_stat(p.sw, "am_unclaimed", 3)
        local zero = p.sw:am_stream(0)
        local m = assert(zero:wait_msg())
        assert.same({ "zero", "a" }, { m.header, m:data() })
        m = assert(zero:wait_msg())
        local data = m:data()
        assert.same({ "zero", 200000, true }, { m.header, #data, data == ("r"):rep(200000) })
        assert.is_true(big:wait())
        assert.equal(1, p.sw:stats().am_unclaimed)
        -- after a close, messages for the id are held again for the next stream
        assert.is_true(zero:close())
        assert(p.ep:am_send(0, "after close", ""))
        until_stat(p.sw, "am_unclaimed", 2)
        zero = p.sw:am_stream(0, { window = 2 })
        m = assert(zero:wait_msg())
        assert.equal("after close", m.header)
        m:release()
        assert.same({ 1, 0 }, { p.sw:stats().am_unclaimed, p.sw:stats().am_dropped })
        close_pair(p)
    end))

    it("drops and counts messages for an id with no stream past the hold, without pausing the worker", async(function()
        local p = pair()
        for i = 1, HOLD + 5 do
            assert(p.ep:am_send(200, tostring(i), "x"))
        end
        -- a rendezvous sender past the hold is told its message was not held
        -- (it was told its send completed, and the data went nowhere)
        local ok, err, name = p.ep:am_send(200, "big", ("y"):rep(300000), false, "rndv")
        assert.is_nil(ok)
        assert.equal("ENOMEM", name)
        assert.matches("the receiver could not hold the message: no stream is open for its AM id", err, 1, true)
        until_stat(p.sw, "am_dropped", 6)
        -- the worker still takes messages for open streams
        assert(p.ep:am_send(1, "open", "z"))
        local m = assert(p.stream:wait_msg())
        assert.equal("open", m.header)
        m:release()
        assert.same({ HOLD, 6 }, { p.sw:stats().am_unclaimed, p.sw:stats().am_dropped })
        -- the held ones are the first HOLD, in order
        local s = p.sw:am_stream(200)
        for i = 1, HOLD do
            m = assert(s:wait_msg())
            assert.equal(tostring(i), m.header)
            m:release()
        end
        assert.equal(0, p.sw:stats().am_unclaimed)
        close_pair(p)
    end))

    it("keeps what a closed stream held for the stream opened next for its id, its rendezvous senders waiting",
       async(function()
        -- (close released them: their rendezvous senders were told their
        -- sends were done, and the data went nowhere)
        local p = pair()
        local s = p.sw:am_stream(201, { window = 4 })
        for i = 1, 3 do assert(p.ep:am_send(201, "k" .. i, "x")) end
        local big = p.ep:am_send_nb(201, "r", ("z"):rep(300000), false, "rndv")
        local reader = pluvio.spawn(function()
            pluvio.sleep(0.01)
            return { s:wait_msg() }
        end)
        while p.sw:stats().msgs_held < 4 do pluvio.sleep(0.001) end
        assert.is_true(s:close())
        assert.same({ nil, "wait_msg: the stream is closed", "EBADF" }, reader:join())
        assert.equal(4, p.sw:stats().am_unclaimed)
        pluvio.sleep(0.02)
        assert.equal(1, p.cw:stats().ops_in_flight)     -- the rendezvous sender waits for a reader
        s = p.sw:am_stream(201)
        for _, want in ipairs({ { "k1", 1 }, { "k2", 1 }, { "k3", 1 }, { "r", 300000 } }) do
            local m = assert(s:wait_msg())
            assert.same(want, { m.header, #m:data() })
        end
        assert.is_true(big:wait())
        assert.equal(0, p.sw:stats().am_unclaimed)
        close_pair(p)
    end))

    it("fails wait_msg instead of hanging when no peer can feed the stream", async(function()
        local p = pair()
        p.listener:close()
        local reader = pluvio.spawn(function() return { p.stream:wait_msg() } end)
        pluvio.sleep(0.01)
        p.ep:close()        -- the only peer goes away
        local r = pluvio.timeout(5, function() return reader:join() end)
        assert.is_table(r)
        assert.is_nil(r[1])
        assert.matches("no peer can send to AM stream 1", r[2])
        p.cw:close(); p.sw:close(); p.ctx:close()
    end))
end)

describe("UCX flow control", function()
    -- A sender that keeps a window-4 stream full: n messages of 1000 bytes.
    local function flood(p, n)
        return pluvio.spawn(function()
            for i = 1, n do assert(p.ep:am_send(1, tostring(i), ("x"):rep(1000))) end
        end)
    end

    -- The reader takes all n, in order.
    local function drain(p, n)
        for i = 1, n do
            local m = assert(p.stream:wait_msg())
            assert.equal(tostring(i), m.header)
            m:release()
        end
    end

    it("lets a receiver paused by a full stream sleep, and wakes it when the reader takes a message", async(function()
        local p = pair { window = 4 }
        local n = 20000                 -- 20 MB: more than the transport holds
        local sender = flood(p, n)
        local deadline = pluvio.now() + 10
        while p.sw:stats().msgs_held < 4 and pluvio.now() < deadline do pluvio.sleep(0.001) end
        pluvio.sleep(0.2)               -- the stream is full, the worker paused: the transport fills
        local c0 = os.clock()
        pluvio.sleep(0.5)
        local cpu = os.clock() - c0
        assert.is_true(cpu < 0.05, "a paused receiver used " .. cpu .. " s of CPU in 0.5 s")
        drain(p, n)                     -- nothing lost while it slept
        sender:join()
        close_pair(p)
    end))

    it("keeps a stream within its window while a tag receive waits on the same worker", async(function()
        local p = pair { window = 4 }
        local tagged = pluvio.spawn(function() return p.sw:tag_recv(99, 2 ^ 53, 10) end)
        local n = 2000
        local sender = flood(p, n)
        pluvio.sleep(0.3)
        local held = p.sw:stats().msgs_held
        assert.is_true(held <= 4 + 80, "a window-4 stream held " .. held .. " messages")
        drain(p, n)
        sender:join()
        assert.is_true(p.ep:tag_send(99, "late"))
        assert.equal("late", tagged:join())
        close_pair(p)
    end))
end)
