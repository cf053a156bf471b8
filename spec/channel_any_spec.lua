-- pluvio.recv_any: a value from whichever of several channels has one.
local pluvio = require "pluvio"
local helper = require "helper"

local async = helper.async

-- How many entries a channel's receiver queue holds (its live range).
local function receivers(ch)
    return ch.recv_tail - ch.recv_head + 1
end

describe("pluvio.recv_any", function()
    it("takes from the first channel in argument order that holds a value, without parking", function()
        local a, b = pluvio.channel(2), pluvio.channel(2)
        b:send("b1"); a:send("a1")
        assert.same({ 1, "a1" }, { pluvio.recv_any(a, b) })
        assert.same({ 2, "b1" }, { pluvio.recv_any(a, b) })
        assert.equal(0, a:len() + b:len())
    end)

    it("parks until any of its channels gets a value, and wakes for the later one", async(function()
        local a, b, c = pluvio.channel(), pluvio.channel(), pluvio.channel()
        local r = pluvio.spawn(function() return pluvio.recv_any(a, b, c) end)
        pluvio.yield()
        assert.equal("waiting", r:status())
        assert.equal("recv_any of channel (0/1), channel (0/1), channel (0/1)", pluvio.runtime():tasks()[2].waits_on)
        assert.same({ 1, 1, 1 }, { receivers(a), receivers(b), receivers(c) })
        c:send(false)                   -- (false is a value)
        assert.same({ 3, false }, { r:join() })
        assert.same({ 0, 0, 0 }, { receivers(a), receivers(b), receivers(c) })
    end))

    it("passes over closed and drained channels and says closed once all are", async(function()
        local a, b = pluvio.channel(2), pluvio.channel(2)
        a:send(1); a:close()
        assert.same({ 1, 1 }, { pluvio.recv_any(a, b) })
        local r = pluvio.spawn(function() return pluvio.recv_any(a, b) end)
        pluvio.yield()
        assert.equal("waiting", r:status())     -- a is over, b empty and open: wait
        b:send("last"); b:close()
        assert.same({ 2, "last" }, { r:join() })
        assert.same({ nil, "closed" }, { pluvio.recv_any(a, b) })
        local waiter = pluvio.spawn(function() return pluvio.recv_any(pluvio.channel(), b) end)
        pluvio.yield()
        assert.equal("waiting", waiter:status())
        waiter:kill()
    end))

    it("wakes a receiver of that channel when the task woken by it takes another's value", async(function()
        local a, b = pluvio.channel(), pluvio.channel()
        local any = pluvio.spawn(function() return pluvio.recv_any(a, b) end)
        pluvio.yield()
        local plain = pluvio.spawn(function() return b:recv() end)
        pluvio.yield()
        b:send("for b")         -- wakes any, first in b's line
        a:send("for a")         -- before any runs: it will prefer a
        assert.same({ 1, "for a" }, { any:join() })
        assert.equal("for b", plain:join())     -- the turn on b went on to plain
    end))

    it("leaves every queue when its task is killed, and the values go to the others", async(function()
        local a, b = pluvio.channel(), pluvio.channel()
        local any = pluvio.spawn(function() return pluvio.recv_any(a, b) end)
        pluvio.yield()
        local ra = pluvio.spawn(function() return a:recv() end)
        local rb = pluvio.spawn(function() return b:recv() end)
        pluvio.yield()
        any:kill()
        assert.same({ 1, 1 }, { receivers(a), receivers(b) })
        a:send("x"); b:send("y")
        assert.equal("x", ra:join())
        assert.equal("y", rb:join())
    end))

    it("hands its turn on when killed after a channel woke it", async(function()
        local a = pluvio.channel()
        local any = pluvio.spawn(function() return pluvio.recv_any(pluvio.channel(), a) end)
        pluvio.yield()
        local other = pluvio.spawn(function() return a:recv() end)
        pluvio.yield()
        a:send("v")             -- wakes any, which is killed before it runs
        any:kill()
        assert.equal("v", other:join())
    end))

    it("keeps one entry per channel over many waits woken by one channel", async(function()
        local a, b = pluvio.channel(), pluvio.channel()
        local got = 0
        local r = pluvio.spawn(function()
            for _ = 1, 100 do
                local i = pluvio.recv_any(a, b)
                got = got + i
            end
        end)
        for i = 1, 100 do
            pluvio.yield()
            assert.is_true(receivers(b) <= 1, "b's queue grew to " .. receivers(b) .. " at " .. i)
            a:send(i)
        end
        r:join()
        assert.equal(100, got)
        assert.same({ 0, 0 }, { receivers(a), receivers(b) })
    end))

    it("is woken by close and waits on while another channel is open", async(function()
        local a, b = pluvio.channel(), pluvio.channel()
        local r = pluvio.spawn(function() return pluvio.recv_any(a, b) end)
        pluvio.yield()
        a:close()
        pluvio.yield()
        assert.equal("waiting", r:status())
        assert.same({ 0, 1 }, { receivers(a), receivers(b) })
        b:close()
        assert.same({ nil, "closed" }, { r:join() })
    end))

    it("is named in a deadlock report", function()
        local ok, err = pcall(pluvio.run, function()
            pluvio.recv_any(pluvio.channel(), pluvio.channel(3))
        end)
        assert.is_false(ok)
        assert.truthy(err:find("waits on recv_any of channel (0/1), channel (0/3)", 1, true), err)
    end)

    it("refuses bad arguments, naming them", function()
        local a = pluvio.channel()
        for _, case in ipairs({
            { 0, {}, "pluvio.recv_any: give at least one channel" },
            { 2, { a, 5 }, "pluvio.recv_any: argument 2 must be a channel (got 5)" },
            { 2, { a, nil }, "pluvio.recv_any: argument 2 must be a channel (got nil)" },
            { 1, { {} }, "pluvio.recv_any: argument 1 must be a channel (got table" },
            { 3, { a, pluvio.channel(), a }, "pluvio.recv_any: argument 3 is the same channel as argument 1" },
        }) do
            local ok, err = pcall(pluvio.recv_any, unpack(case[2], 1, case[1]))
            assert.is_false(ok)
            assert.truthy(err:find(case[3], 1, true), err)
        end
    end)

    it("refuses to park outside a task, naming the caller's line, and takes a waiting value without one",
       function()
        local a = pluvio.channel()
        local ok, err = pcall(function() local i = pluvio.recv_any(a); return i end)
        assert.is_false(ok)
        assert.matches("channel_any_spec%.lua:%d+: pluvio%.recv_any: not inside a pluvio task", err)
        a:send(7)
        assert.equal(2, select("#", pluvio.recv_any(a)))   -- i, value: no third
        a:send(8)
        assert.same({ 1, 8 }, { pluvio.recv_any(a) })
        a:close()
        assert.equal(2, select("#", pluvio.recv_any(a)))   -- nil, "closed"
    end)

    it("names no line of pluvio's when a plain coroutine's call of it was a tail call", async(function()
        local a = pluvio.channel()
        for _, f in ipairs({
            function() return pluvio.recv_any(a) end,
            function() return a:recv() end,
            function() return pluvio.sleep(0.001) end,
        }) do
            local co = coroutine.create(f)
            assert.is_true(coroutine.resume(co))          -- its wait yields to us
            local ok, err = coroutine.resume(co)          -- and raises when resumed
            assert.is_false(ok)
            assert.matches("^[%w.:_]+: called from a coroutine that is not a pluvio task", err)
        end
    end))
end)
