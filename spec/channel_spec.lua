-- Channels: bounded FIFO between tasks.
local pluvio = require "pluvio"
local helper = require "helper"

local async = helper.async

describe("pluvio.channel", function()
    it("delivers every value in order through a small buffer", async(function()
        local ch = pluvio.channel(2)
        local producer = pluvio.spawn(function()
            for i = 1, 100 do ch:send(i) end
            ch:close()
        end)
        local got = {}
        while true do
            local v, err = ch:recv()
            if v == nil then
                assert.equal("closed", err)
                break
            end
            got[#got + 1] = v
        end
        producer:join()
        assert.equal(100, #got)
        for i = 1, 100 do assert.equal(i, got[i]) end
    end))

    it("parks the sender while full and the receiver while empty", async(function()
        local ch = pluvio.channel(1)
        ch:send("a")
        local sent_second = false
        local sender = pluvio.spawn(function() ch:send("b"); sent_second = true end)
        pluvio.yield()
        assert.is_false(sent_second)
        assert.equal("waiting", sender:status())
        assert.equal("a", ch:recv())
        sender:join()
        assert.is_true(sent_second)
        assert.equal("b", ch:recv())
        local receiver = pluvio.spawn(function() return ch:recv() end)
        pluvio.yield()
        assert.equal("waiting", receiver:status())
        ch:send("c")
        assert.equal("c", receiver:join())
    end))

    it("serves waiting receivers in FIFO order", async(function()
        local ch = pluvio.channel(1)
        local order = {}
        local tasks = {}
        for i = 1, 3 do
            tasks[i] = pluvio.spawn(function() local v = ch:recv(); order[#order + 1] = i .. ":" .. v end)
        end
        pluvio.yield()
        for _, v in ipairs({ "x", "y", "z" }) do ch:send(v) end
        for i = 1, 3 do tasks[i]:join() end
        assert.same({ "1:x", "2:y", "3:z" }, order)
    end))

    it("lets receivers drain buffered values after close, then says closed", async(function()
        local ch = pluvio.channel(4)
        ch:send(1); ch:send(2)
        assert.is_true(ch:close())
        assert.is_false(ch:close())
        assert.is_true(ch:is_closed())
        assert.equal(1, ch:recv())
        assert.equal(2, ch:recv())
        local v, err = ch:recv()
        assert.is_nil(v)
        assert.equal("closed", err)
    end))

    it("wakes parked receivers with nil, 'closed' when closed", async(function()
        local ch = pluvio.channel(1)
        local t = pluvio.spawn(function() return ch:recv() end)
        pluvio.yield()
        ch:close()
        local r = { t:join() }
        assert.same({ nil, "closed" }, r)
    end))

    it("raises in a sender parked when the channel closes (the value is not lost silently)", async(function()
        local ch = pluvio.channel(1)
        ch:send(1)
        local t = pluvio.spawn(function() ch:send(2) end)
        pluvio.yield()
        ch:close()
        local r, err = t:join()
        assert.is_nil(r)
        assert.matches("Channel:send: the channel was closed while this send waited", err)
    end))

    it("lets go of waiters that were killed or timed out while parked (no growth while idle)",
       async(function()
        local idle, full = pluvio.channel(1), pluvio.channel(1)
        full:send("queued")
        local gone = setmetatable({}, { __mode = "k" })
        for _ = 1, 50 do
            local r, why = pluvio.timeout(0.0001, function() return idle:recv() end)
            assert.is_nil(r)
            assert.equal("timeout", why)
            local sender = pluvio.spawn(function() return full:send("late") end)
            local receiver = pluvio.spawn(function() return idle:recv() end)
            gone[sender], gone[receiver] = true, true
            pluvio.yield()
            sender:kill(); receiver:kill()
        end
        collectgarbage(); collectgarbage()
        assert.is_nil(next(gone))
        -- and the queues still work
        local r = pluvio.spawn(function() return idle:recv() end)
        pluvio.yield()
        idle:send("v")
        assert.equal("v", r:join())
        assert.equal("queued", full:recv())
        assert.is_true(full:send("next"))
    end))

    it("reports its length and capacity", async(function()
        local ch = pluvio.channel(3)
        assert.equal(3, ch:capacity())
        assert.equal(0, ch:len())
        ch:send(true)
        assert.equal(1, ch:len())
    end))

    it("rejects capacity 0, negative, fractional and non-numbers", function()
        local msg = "pluvio.channel: capacity must be an integer from 1 to 2147483648 (got %s)"
        assert.has_error(function() pluvio.channel(0) end, msg:format("0"))
        assert.has_error(function() pluvio.channel(-2) end, msg:format("-2"))
        assert.has_error(function() pluvio.channel(1.5) end, msg:format("1.5"))
        assert.has_error(function() pluvio.channel("x") end, msg:format('"x"'))
        -- the module's own constructor says its own name (it said "pluvio.channel")
        assert.has_error(function() require("pluvio.channel").new(0) end,
            "channel.new: capacity must be an integer from 1 to 2147483648 (got 0)")
    end)

    it("rejects a NULL pointer as capacity, though it compares equal to nil, the default", function()
        assert.has_error(function() pluvio.channel(require("ffi").cast("void *", 0)) end,
            "pluvio.channel: capacity must be an integer from 1 to 2147483648 (got cdata<void *>: NULL)")
    end)

    it("says describe() is a method when it is called without self", function()
        local ch = pluvio.channel(2)
        assert.equal("channel (0/2)", ch:describe())
        assert.has_error(function() ch.describe() end,
            "Channel:describe: call it as a method on a channel (obj:describe(...)); got nil as self")
        assert.has_error(function() ch.describe({}) end,
            "Channel:describe: call it as a method on a channel (obj:describe(...)); got table as self")
    end)

    it("rejects send on a closed channel and sending nil", async(function()
        local ch = pluvio.channel(1)
        assert.has_error(function() ch:send(nil) end,
            "Channel:send: value must not be nil (recv returns nil only when closed)")
        -- (a NULL pointer, which equals nil, was refused in the words for nil)
        local NULL = require("ffi").cast("void *", 0)
        for _, f in ipairs({ "send", "try_send" }) do
            assert.has_error(function() ch[f](ch, NULL) end, "Channel:" .. f .. ": value must not be a NULL " ..
                "pointer, which equals nil (recv returns nil only when closed): send a sentinel of your own instead")
        end
        ch:close()
        assert.has_error(function() ch:send(1) end, "Channel:send: the channel is closed")
    end))

    describe("try_send and try_recv", function()
        it("take and give at once, and say full, empty or closed instead of parking", function()
            local ch = pluvio.channel(2)        -- (no task: they never park)
            assert.same({ nil, "empty" }, { ch:try_recv() })
            assert.is_true(ch:try_send("a"))
            assert.is_true(ch:try_send(false))
            assert.same({ false, "full" }, { ch:try_send("c") })
            assert.equal(2, ch:len())           -- the refused value was not queued
            assert.equal("a", ch:try_recv())
            assert.is_false(ch:try_recv())
            assert.same({ nil, "empty" }, { ch:try_recv() })
            assert.is_true(ch:try_send("d"))
            ch:close()
            assert.equal("d", ch:try_recv())    -- drained after close
            assert.same({ nil, "closed" }, { ch:try_recv() })
        end)

        it("wake the parked sender or receiver as send and recv do", async(function()
            local ch = pluvio.channel(1)
            local receiver = pluvio.spawn(function() return ch:recv() end)
            pluvio.yield()
            assert.equal("waiting", receiver:status())
            assert.is_true(ch:try_send("to the receiver"))
            assert.equal("to the receiver", receiver:join())
            ch:send(1)
            local sender = pluvio.spawn(function() return ch:send(2) end)
            pluvio.yield()
            assert.equal("waiting", sender:status())
            assert.equal(1, ch:try_recv())
            assert.is_true(sender:join())
            assert.equal(2, ch:try_recv())
        end))

        it("reject nil, a closed channel for try_send, and a call without self", function()
            local ch = pluvio.channel(1)
            assert.has_error(function() ch:try_send(nil) end,
                "Channel:try_send: value must not be nil (recv returns nil only when closed)")
            assert.has_error(function() ch.try_recv() end,
                "Channel:try_recv: call it as a method on a channel (obj:try_recv(...)); got nil as self")
            assert.has_error(function() ch.try_send({}, 1) end,
                "Channel:try_send: call it as a method on a channel (obj:try_send(...)); got table as self")
            ch:close()
            assert.has_error(function() ch:try_send(1) end, "Channel:try_send: the channel is closed")
        end)
    end)

    it("refuses to park outside a task", function()
        local ch = pluvio.channel(1)
        assert.has_error(function() ch:recv() end,
            "Channel:recv: not inside a pluvio task (call it from a function run by pluvio.run / rt:run, or from a script run by the pluvio host)")
        ch:send(1)   -- does not need to park
        assert.has_error(function() ch:send(2) end,
            "Channel:send: not inside a pluvio task (call it from a function run by pluvio.run / rt:run, or from a script run by the pluvio host)")
        assert.equal(1, ch:recv())
    end)

    it("keeps every value with many producers and consumers", async(function()
        local ch = pluvio.channel(3)
        local producers, consumers = {}, {}
        for p = 1, 5 do
            producers[p] = pluvio.spawn(function()
                for i = 1, 200 do ch:send(p * 1000 + i) end
            end)
        end
        local seen, count = {}, 0
        for c = 1, 4 do
            consumers[c] = pluvio.spawn(function()
                while true do
                    local v = ch:recv()
                    if not v then return end
                    assert.is_nil(seen[v])
                    seen[v] = true
                    count = count + 1
                    if count % 7 == 0 then pluvio.yield() end
                end
            end)
        end
        for p = 1, 5 do producers[p]:join() end
        ch:close()
        for c = 1, 4 do consumers[c]:join() end
        assert.equal(1000, count)
    end))

    it("wakes a parked receiver, not a task whose plain coroutine left a recv", async(function()
        local ch = pluvio.channel(1)
        local left = pluvio.spawn(function()
            local co = coroutine.create(function() return ch:recv() end)
            assert.is_true((coroutine.resume(co)))     -- its wait yields to us: it is left there
            pluvio.sleep(60)                            -- and we wait on something else
        end)
        pluvio.yield()
        local reader = pluvio.spawn(function() return ch:recv() end)
        pluvio.yield()
        ch:send("for the reader")
        assert.equal("for the reader", pluvio.timeout(5, function() return reader:join() end))
        left:kill()
    end))

    it("wakes a sender whose plain coroutine had left a recv on the same channel", async(function()
        -- the left recv kept the task marked as queued on the channel, so
        -- its own send there was never queued: the receiver that made room
        -- woke nobody (a false deadlock report without the timeout)
        local ch = pluvio.channel(1)
        local first = pluvio.spawn(function() return ch:recv() end)
        pluvio.yield()                              -- parks first
        local co = coroutine.wrap(function() return ch:recv() end)
        co()                                        -- queued behind first, left there
        assert.has_error(co, "Channel:recv: called from a coroutine that is not a pluvio task (only pluvio tasks may block)")
        ch:send(1)                                  -- wakes first
        assert.is_true(ch:send(2))                  -- full: parks until first takes 1
        assert.equal(1, first:join())
        assert.equal(2, ch:recv())
    end))

    it("wakes a sender whose plain coroutine had left a recv before the task waited on another channel",
       async(function()
        -- the left recv stayed queued, unmarked once the task's own wait on
        -- other ended; a wake walking past it took the mark of the task's
        -- later send there, which was then never woken (a false deadlock)
        local ch, other = pluvio.channel(1), pluvio.channel(1)
        local r1 = pluvio.spawn(function() return ch:recv() end)
        pluvio.yield()                              -- r1 parks in ch's recv
        local t = pluvio.spawn(function()
            local co = coroutine.wrap(function() return ch:recv() end)
            co()                                    -- queued behind r1, left there
            other:recv()
            ch:send("t")
            return "t sent"
        end)
        pluvio.yield()                              -- t parks in other's recv
        local s0 = pluvio.spawn(function() ch:send("s0"); return "s0 sent" end)
        other:send("go")                            -- t ready
        ch:send("a")                                -- wakes r1
        pluvio.yield()                              -- s0 then t park in send; r1 takes "a", wakes s0
        ch:send("c")                                -- before s0 runs: the recv wake walks t's left entry
        local got = {}
        for i = 1, 3 do got[i] = ch:recv() end
        table.sort(got)
        assert.same({ "c", "s0", "t" }, got)
        assert.equal("a", r1:join())
        assert.equal("s0 sent", s0:join())
        assert.equal("t sent", t:join())
    end))

    it("keeps one queue entry per task however many plain coroutines left waits on two channels",
       async(function()
        local a, b = pluvio.channel(1), pluvio.channel(1)
        for _ = 1, 100 do
            coroutine.wrap(function() return a:recv() end)()
            coroutine.wrap(function() return b:recv() end)()
        end
        -- (the queues' extent: 100 entries each before, for one task)
        assert.is_true(a.recv_tail - a.recv_head + 1 <= 1)
        assert.is_true(b.recv_tail - b.recv_head + 1 <= 1)
        local r = pluvio.spawn(function() return a:recv() end)
        pluvio.yield()
        a:send("v")
        assert.equal("v", r:join())
        b:send("w")
        assert.equal("w", b:recv())
    end))

    it("leaves the queue when a wake from elsewhere ends a recv while it is still queued", async(function()
        local ch = pluvio.channel(1)
        local r0 = pluvio.spawn(function() return ch:recv() end)
        local t = pluvio.spawn(function() return ch:recv() end)
        pluvio.yield()                              -- both park: r0 first
        t:wake()                                    -- t is woken, still queued
        ch:send("a")                                -- wakes r0; t runs first and takes "a"
        assert.equal("a", t:join())
        -- (t's entry left with it: r0, parked again, is the only one)
        assert.equal(1, ch.recv_tail - ch.recv_head + 1)
        ch:send("b")
        assert.equal("b", r0:join())
    end))

    it("wakes the nested runtime's receiver while a receiver of the outer one waits too", async(function()
        -- the turn went to the outer receiver, first in line but paused
        -- until the nested runtime ends: the nested one's receiver waited
        -- with a value in the channel (a false deadlock report without the timeout)
        local ch = pluvio.channel(4)
        local outer = pluvio.spawn(function() return ch:recv() end)
        pluvio.yield()                              -- parks first
        local inner = pluvio.run(function()
            local reader = pluvio.spawn(function() return ch:recv() end)
            pluvio.yield()
            ch:send("first")
            local v, err = pluvio.timeout(5, reader.join, reader)
            if v == nil then reader:kill() end
            return v or err
        end)
        ch:send("second")
        assert.same({ "first", "second" }, { inner, pluvio.timeout(5, outer.join, outer) })
    end))

    it("hands the turn on when block_on returns before the task woken for it runs", async(function()
        -- the left receiver took the turn while its runtime ran, and that
        -- runtime stopped: this one's receiver waited with the value in the
        -- channel (a false deadlock)
        local ch = pluvio.channel(1)
        local inner = pluvio.Runtime.new()
        local left
        inner:block_on(function()
            left = pluvio.spawn(function() return ch:recv() end)
            pluvio.yield()                          -- parks first, left there
        end)
        local r = pluvio.spawn(function() return ch:recv() end)
        pluvio.yield()                              -- parks second
        inner:block_on(function() ch:send("v") end) -- left's turn; inner stops before it runs
        assert.equal("v", r:join())
        assert.is_true(left:kill())
    end))

    it("hands the turn on when a nested runtime starts before the task woken for it runs", async(function()
        -- the outer receiver took the turn and its runtime paused: the
        -- nested one's receiver waited with the value in the channel (a
        -- false deadlock of the nested run)
        local ch = pluvio.channel(1)
        local outer = pluvio.spawn(function() return ch:recv() end)
        pluvio.yield()                              -- parks first
        local inner = pluvio.Runtime.new()
        local left
        inner:block_on(function()
            left = pluvio.spawn(function() return ch:recv() end)
            pluvio.yield()                          -- parks second, left there
        end)
        ch:send("v")                                -- outer's turn; inner runs before it does
        assert.equal("v", inner:run(function() return left:join() end))
        ch:send("w")                                -- (outer waited again, at the end of the line)
        assert.equal("w", outer:join())
    end))

    it("wakes the next runtime's receiver, not one a block_on left parked", function()
        local ch = pluvio.channel(4)
        pluvio.default_runtime():block_on(function()
            pluvio.spawn(function() return ch:recv() end)
            pluvio.yield()                          -- parked when block_on returns
        end)
        local got = pluvio.run(function()
            local reader = pluvio.spawn(function() return ch:recv() end)
            pluvio.yield()
            ch:send("for the reader that runs")
            local v, err = pluvio.timeout(5, reader.join, reader)
            if v == nil then reader:kill() end
            return v or err
        end)
        assert.equal("for the reader that runs", got)
    end)
end)
