-- Tagged messages over UCX: tag_send and tag_recv.
local pluvio = require "pluvio"
local helper = require "helper"
local uh = require "ucx_helpers"

local async = helper.async
local pair, close_pair = helper.ucx_pair, helper.ucx_close_pair

-- Yield until none of the tasks is parked any more (its receive matched a
-- message; it has not run since).
local function until_woken(...)
    for i = 1, select("#", ...) do
        local t = select(i, ...)
        while t:status() == "waiting" do pluvio.yield() end
    end
end

describe("UCX", function()
    it("sends and receives tagged messages", async(function()
        local p = pair()
        local r = pluvio.spawn(function() return { p.sw:tag_recv(42, 2 ^ 53, 100) } end)
        assert.is_true(p.ep:tag_send(42, "tagged data"))
        local got = r:join()
        assert.equal("tagged data", got[1])
        assert.equal(42, tonumber(got[2]))
        close_pair(p)
    end))

    it("receives a tagged message with the largest length, reusing its scratch memory", async(function()
        local p = pair()
        for i = 1, 3 do
            local r = pluvio.spawn(function() return { p.sw:tag_recv(7, 2 ^ 53, 2 ^ 31) } end)
            assert.is_true(p.ep:tag_send(7, "small " .. i))
            assert.equal("small " .. i, r:join()[1])
            assert.equal(0, p.sw.scratch.kept)          -- 2 GiB is not kept...
        end
        local r = pluvio.spawn(function() return { p.sw:tag_recv(7, 2 ^ 53, 100) } end)
        assert.is_true(p.ep:tag_send(7, "kept"))
        assert.equal("kept", r:join()[1])
        assert.equal(4096, p.sw.scratch.kept)           -- ...a small piece is, for the next one
        close_pair(p)
    end))

    it("says how long a tagged message that does not fit was, and what it had room for", async(function()
        local uring = require "pluvio.uring"
        local p = pair()
        -- posted first (UCX matches it as the message comes), and after the
        -- message came (it waits unexpected); eager and rendezvous sizes
        for _, size in ipairs({ 100, 1048576 }) do
            local r = pluvio.spawn(function() return { p.sw:tag_recv(0x4217, 0xffff, 10) } end)
            pluvio.yield()
            assert.is_true(p.ep:tag_send(0x4217, ("z"):rep(size)))
            assert.same({ nil, ("tag_recv: the message with tag 0x4217 has %d bytes, more than the 10 " ..
                                "len_or_buf has room for (it is dropped): EMSGSIZE: Message too long"):format(size),
                          "EMSGSIZE" }, r:join())
        end
        local buf = uring.acquire_buffer()
        local sender = pluvio.spawn(function() return p.ep:tag_send(5, ("y"):rep(buf.len + 1)) end)
        while p.cw:stats().ops_in_flight == 0 do pluvio.sleep(0.001) end     -- (the rendezvous send waits)
        local n, err, name = p.sw:tag_recv(5, 0xff, buf)
        assert.is_nil(n)
        assert.equal(("tag_recv: the message with tag 0x5 has %d bytes, more than the %d len_or_buf has room " ..
                      "for (it is dropped): EMSGSIZE: Message too long"):format(buf.len + 1, buf.len), err)
        assert.equal("EMSGSIZE", name)
        assert.is_true(sender:join())
        buf:release()
        close_pair(p)
    end))

    it("counts in stats the tagged messages that went and came, not the receives and sends that failed",
       async(function()
        local ucx = require "pluvio.ucx"
        local ctx = assert(ucx.Context.new())
        local server, client = assert(ctx:create_worker()), assert(ctx:create_worker())
        assert.equal("ENOTCONN", select(3, server:tag_recv(5, 0xff, 16)))     -- no peer yet
        local ep = assert(client:connect_addr(server:address()))
        local killed = pluvio.spawn(function() return server:tag_recv(6, 0xff, 16) end)
        pluvio.yield()
        killed:kill()
        assert.is_true(ep:tag_send(7, ("x"):rep(100)))
        assert.equal("EMSGSIZE", select(3, server:tag_recv(7, 0xff, 10)))      -- too long: dropped
        assert.equal(0, server:stats().tag_received)
        local big = pluvio.spawn(function() return ep:tag_send(8, ("y"):rep(1048576)) end)   -- rendezvous
        while client:stats().ops_in_flight == 0 do pluvio.sleep(0.001) end
        assert.equal(1, client:stats().tag_sent)        -- not yet: the receiver has not pulled it
        assert.equal(1048576, #server:tag_recv(8, 0xff, 1048576))
        assert.is_true(big:join())
        assert.equal(2, client:stats().tag_sent)
        assert.equal(1, server:stats().tag_received)
        ep:close(); client:close(); server:close(); ctx:close()
    end))

    it("takes 64-bit integer cdata tags and refuses other cdata, naming the argument", async(function()
        local ffi = require "ffi"
        local p = pair()
        local r = pluvio.spawn(function() return { p.sw:tag_recv(0x4217ULL, ffi.new("int64_t", -1), 16) } end)
        pluvio.yield()
        assert.is_true(p.ep:tag_send(ffi.new("uint64_t", 0x4217), "cdata tags"))
        local got = r:join()
        assert.equal("cdata tags", got[1])
        assert.is_true(got[2] == 0x4217ULL)
        assert.has_error(function() p.sw:tag_recv(ffi.new("int[1]"), 0, 16) end,
            "Worker:tag_recv: tag must be an integer or a uint64_t (got cdata<int [1]>)")
        assert.has_error(function() p.sw:tag_recv(1, ffi.new("double", 1), 16) end,
            "Worker:tag_recv: mask must be an integer or a uint64_t (got cdata<double>)")
        assert.has_error(function() p.ep:tag_send(ffi.new("char *"), "x") end,
            "Endpoint:tag_send: tag must be an integer or a uint64_t (got cdata<char *>)")
        close_pair(p)
    end))

    it("refuses a tag receive from a plain coroutine inside a task before it starts", async(function()
        local p = pair()
        -- a receive takes a message: it checks first, so none is lost
        local co = coroutine.create(function() return p.sw:tag_recv(7, 2 ^ 53, 100) end)
        local ok, err = coroutine.resume(co)
        assert.is_false(ok)
        assert.matches("Worker:tag_recv: called from a coroutine that is not a pluvio task", err)
        -- the task's own receive gets the message
        local r = pluvio.spawn(function() return p.sw:tag_recv(7, 2 ^ 53, 100) end)
        pluvio.yield()
        assert.is_true(p.ep:tag_send(7, "for the task"))
        assert.equal("for the task", r:join())
        close_pair(p)
    end))

    -- (each was lost, its sender told it went: UCX cancels a receive only
    -- while it matched nothing)
    it("keeps a message a killed tag receive had matched for the next receive, eager and rendezvous",
       async(function()
        local p = pair()
        -- matched and done, its task killed before it ran again
        local r = pluvio.spawn(function() return p.sw:tag_recv(5, 0xff, 100) end)
        pluvio.yield()
        assert.is_true(p.ep:tag_send(5, "precious"))
        until_woken(r)
        r:kill()
        assert.same({ "precious", true }, { pluvio.timeout(5, function()
            local data, tag = p.sw:tag_recv(5, 0xff, 100)
            return data, tag == 5
        end) })
        -- matched while its rendezvous data was on its way
        local size = 4 * 1048576
        local big = uh.payload(size, 3)
        local sender = pluvio.spawn(function() return p.ep:tag_send(6, big) end)
        r = pluvio.spawn(function() return p.sw:tag_recv(6, 0xff, size) end)
        while p.sw:stats().ops_in_flight == 0 or r:status() ~= "waiting" do pluvio.yield() end
        pluvio.yield()
        r:kill()
        local got = pluvio.timeout(5, function() return p.sw:tag_recv(6, 0xff, size) end)
        assert.is_true(sender:join())
        assert.equal(size, #got)
        assert.is_true(got == big)
        -- kept in order, by tag and mask; into a registered buffer too; one
        -- too long for the next receive is dropped, saying so
        local killed = {}
        for k = 1, 3 do
            killed[k] = pluvio.spawn(function() return p.sw:tag_recv(0x70, 0xf0, 100) end)
        end
        pluvio.yield()
        for k = 1, 3 do
            assert.is_true(p.ep:tag_send(0x70 + k, ("m%d"):format(k):rep(k * 10)))
        end
        while killed[3]:status() == "waiting" do pluvio.yield() end
        for k = 1, 3 do killed[k]:kill() end
        local data, tag = p.sw:tag_recv(0x72, 0xff, 100)    -- the second, by its tag
        assert.equal(("m2"):rep(20), data)
        assert.is_true(tag == 0x72)
        local none, err, code = p.sw:tag_recv(0x70, 0xf0, 5)  -- the first: 20 bytes
        assert.is_nil(none)
        assert.equal("EMSGSIZE", code)
        assert.matches("tag 0x71 has 20 bytes, more than the 5 len_or_buf has room for %(it is dropped%)", err)
        local pool = require("pluvio.uring").reactor { buffer_size = 4096, buffer_count = 1 }
        pluvio.runtime():register_reactor("tag buffers", pool)
        local buf = pool:acquire_buffer()
        local n
        n, tag = p.sw:tag_recv(0x70, 0xf0, buf)
        assert.equal(60, n)
        assert.equal(("m3"):rep(30), buf:tostring(n))
        assert.is_true(tag == 0x73)
        buf:release()
        assert.equal(0, p.sw:stats().ops_in_flight)
        close_pair(p)
    end))

    it("hands kept messages out in the order the killed receives matched them, and lets a receive of " ..
       "another tag past a fetch still under way", async(function()
        local p = pair()
        local size = 64 * 1048576
        local big = uh.payload(size, 5)
        local first = pluvio.spawn(function() return p.sw:tag_recv(5, 0xff, size) end)
        local second = pluvio.spawn(function() return p.sw:tag_recv(5, 0xff, size) end)
        pluvio.yield()
        local s1 = pluvio.spawn(function() return p.ep:tag_send(5, big) end)         -- rendezvous
        local s2 = pluvio.spawn(function() return p.ep:tag_send(5, "second") end)    -- eager
        assert.is_true(p.ep:tag_send(7, "other"))
        until_woken(second)
        first:kill(); second:kill()                 -- the first still fetches its message, or did
        assert.equal("other", p.sw:tag_recv(7, 0xff, 100))  -- not held up by tag 5's fetch
        local got = p.sw:tag_recv(5, 0xff, size)
        assert.equal(size, #got)
        assert.is_true(got == big)
        assert.equal("second", p.sw:tag_recv(5, 0xff, size))
        assert.is_true(s1:join())
        assert.is_true(s2:join())
        close_pair(p)
    end))
    it("hands a message a killed tag receive had matched to the receive already waiting that UCX would " ..
       "have given it",
       async(function()
        local p = pair()
        local function recv(len) return pluvio.spawn(function() return p.sw:tag_recv(5, 0xff, len) end) end
        local function result(task)
            return assert(pluvio.timeout(5, function() return { task:join() } end))
        end
        -- done before the kill: the first of two receives waiting in UCX takes it
        local killed = recv(100)
        pluvio.yield()
        local first, second = recv(100), recv(100)
        pluvio.yield()
        assert.is_true(p.ep:tag_send(5, "precious"))
        until_woken(killed)
        killed:kill()
        assert.same({ "precious", 5ULL }, result(first))
        assert.is_true(p.ep:tag_send(5, "next"))
        assert.same({ "next", 5ULL }, result(second))
        -- still fetching (rendezvous) at the kill: the waiting receive gets it once it is in
        local size = 4 * 1048576
        local big = uh.payload(size, 7)
        killed = recv(size)
        pluvio.yield()
        local waiting = recv(size)
        local sender = pluvio.spawn(function() return p.ep:tag_send(5, big) end)
        while sender:status() ~= "waiting" do pluvio.yield() end
        pluvio.yield()
        killed:kill()
        assert.is_not_nil(p.sw.limbo[1], "the killed receive's fetch had ended: the spec missed its case")
        local got = result(waiting)
        assert.is_true(sender:join())
        assert.equal(size, #got[1])
        assert.is_true(got[1] == big)
        -- the receive it went to killed too before it ran: the next one waiting takes it
        killed = recv(100)
        pluvio.yield()
        first, second = recv(100), recv(100)
        pluvio.yield()
        assert.is_true(p.ep:tag_send(5, "handed on"))
        until_woken(killed)
        killed:kill()
        first:kill()
        assert.same({ "handed on", 5ULL }, result(second))
        -- each kept message to the receive UCX would have given it, whatever
        -- order the kills came in
        local function recv_tag(t, m) return pluvio.spawn(function() return p.sw:tag_recv(t, m, 100) end) end
        local kb, ka = recv_tag(2, 0xff), recv_tag(1, 0xff)
        pluvio.yield()
        local only2, any = recv_tag(2, 0xff), recv_tag(0, 0)
        pluvio.yield()
        assert.is_true(p.ep:tag_send(2, "b"))
        assert.is_true(p.ep:tag_send(1, "a"))
        until_woken(kb, ka)
        ka:kill()
        kb:kill()
        assert.same({ "b", 2ULL }, result(only2))
        assert.same({ "a", 1ULL }, result(any))
        -- killed together in any order, same tag: in the order they were posted
        local m1, m2 = recv(100), recv(100)
        pluvio.yield()
        first, second = recv(100), recv(100)
        pluvio.yield()
        assert.is_true(p.ep:tag_send(5, "X1"))
        assert.is_true(p.ep:tag_send(5, "X2"))
        until_woken(m1, m2)
        m2:kill()
        m1:kill()
        assert.same({ "X1", 5ULL }, result(first))
        assert.same({ "X2", 5ULL }, result(second))
        -- one killed receive still fetching holds back the one posted after it
        size = 64 * 1048576
        big = uh.payload(size, 9)
        m1, m2 = recv(size), recv(size)
        pluvio.yield()
        first, second = recv(size), recv(size)
        pluvio.yield()
        local s1 = pluvio.spawn(function() return p.ep:tag_send(5, big) end)      -- rendezvous
        local s2 = pluvio.spawn(function() return p.ep:tag_send(5, "small") end)  -- eager
        until_woken(m2)
        assert.equal("waiting", m1:status(), "the first fetch had ended: the spec missed its case")
        m1:kill()
        m2:kill()
        got = result(first)
        assert.is_true(got[1] == big)
        assert.same({ "small", 5ULL }, result(second))
        assert.is_true(s1:join())
        assert.is_true(s2:join())
        -- handed to a receive with no room: EMSGSIZE, and not counted as received
        local counted = p.sw:stats().tag_received
        killed = recv(100)
        pluvio.yield()
        local small = recv(4)
        pluvio.yield()
        assert.is_true(p.ep:tag_send(5, "too long"))
        until_woken(killed)
        killed:kill()
        got = result(small)
        assert.equal("EMSGSIZE", got[3])
        assert.matches("tag 0x5 has 8 bytes, more than the 4 len_or_buf has room for", got[2])
        assert.equal(counted, p.sw:stats().tag_received)
        -- fetches that end outside a poll (another worker's close progresses
        -- this one), and a tag_recv's sweep before the poll: still in order
        size = 8 * 1048576
        local big_a, big_b = uh.payload(size, 1), uh.payload(size, 2)
        local a = recv(size)
        pluvio.yield()
        local b = recv(size)
        pluvio.yield()
        waiting = recv(size)
        pluvio.yield()
        local other = assert(p.ctx:create_worker())
        assert(other:address())
        s1 = pluvio.spawn(function() return p.ep:tag_send(5, big_a) end)
        s2 = pluvio.spawn(function() return p.ep:tag_send(5, big_b) end)
        while s1:status() ~= "waiting" or s2:status() ~= "waiting" do pluvio.yield() end
        pluvio.yield()
        pluvio.yield()
        b:kill()
        a:kill()
        assert.equal(2, #p.sw.limbo, "a fetch had ended before its kill: the spec missed its case")
        other:close()
        assert.is_true(p.sw:tag_recv(5, 0xff, size) == big_b)
        got = result(waiting)
        assert.is_true(got[1] == big_a)
        assert.is_true(s1:join())
        assert.is_true(s2:join())
        -- an empty message handed over counts as received
        counted = p.sw:stats().tag_received
        killed = recv(100)
        pluvio.yield()
        waiting = recv(100)
        pluvio.yield()
        assert.is_true(p.ep:tag_send(5, ""))
        until_woken(killed)
        killed:kill()
        assert.same({ "", 5ULL }, result(waiting))
        assert.equal(counted + 1, p.sw:stats().tag_received)
        -- a receive posted after the kill waits for the next message
        killed = recv(100)
        pluvio.yield()
        first = recv(100)
        pluvio.yield()
        assert.is_true(p.ep:tag_send(5, "m"))
        until_woken(killed)
        killed:kill()
        local sender = pluvio.spawn(function()
            pluvio.sleep(0.01)
            return p.ep:tag_send(5, "n")
        end)
        assert.same({ "n", 5ULL }, { p.sw:tag_recv(5, 0xff, 100) })    -- before first ran again
        assert.is_true(sender:join())
        assert.same({ "m", 5ULL }, result(first))
        assert.same({}, p.sw.tag_rescued)
        assert.equal(0, p.sw:stats().ops_in_flight)
        close_pair(p)
    end))
    it("hands a killed receive's message to the receive waiting, not ENOTCONN, when the last peer goes " ..
       "right after the kill or while it is held, and ENOTCONN when it cannot", async(function()
        local p = pair()
        local function recv() return pluvio.spawn(function() return p.sw:tag_recv(5, 0xff, 100) end) end
        local killed = recv()
        pluvio.yield()
        local waiting = recv()
        pluvio.yield()
        assert.is_true(p.ep:tag_send(5, "last"))
        until_woken(killed)
        killed:kill()
        p.listener:close()
        p.sep:close()               -- the last peer: no poll since the kill
        assert.same({ "last", 5ULL }, { waiting:join() })
        p.ep:close()
        p.cw:close()
        p.sw:close()
        p.ctx:close()
        -- its message held behind a killed receive still fetching (polled since)
        p = pair()
        local size = 64 * 1048576
        local big = uh.payload(size, 11)
        local function recv_big() return pluvio.spawn(function() return p.sw:tag_recv(5, 0xff, size) end) end
        local fetching, done = recv_big(), recv_big()
        pluvio.yield()
        waiting = recv_big()
        pluvio.yield()
        local s1 = pluvio.spawn(function() return p.ep:tag_send(5, big) end)      -- rendezvous
        local s2 = pluvio.spawn(function() return p.ep:tag_send(5, "small") end)  -- eager
        until_woken(done)
        assert.equal("waiting", fetching:status(), "the fetch had ended: the spec missed its case")
        fetching:kill()
        done:kill()
        pluvio.yield()
        p.listener:close()
        p.sep:close()
        local got = assert(pluvio.timeout(5, function() return { waiting:join() } end))
        assert.is_true(got[1] == big)
        assert.same({ "small", 5ULL }, { p.sw:tag_recv(5, 0xff, size) })
        assert.is_true(s1:join())
        assert.is_true(s2:join())
        p.ep:close()
        p.cw:close()
        p.sw:close()
        p.ctx:close()
        -- a killed receive whose message nobody waited for does not hold up
        -- the ENOTCONN of a receive its message could not go to
        p = pair()
        waiting = pluvio.spawn(function() return p.sw:tag_recv(7, 0xff, 100) end)
        pluvio.yield()
        killed = pluvio.spawn(function() return p.sw:tag_recv(9, 0, 100) end)   -- any tag
        pluvio.yield()
        assert.is_true(p.ep:tag_send(9, "for the killed one"))
        until_woken(killed)
        killed:kill()
        pluvio.yield()
        p.listener:close()
        p.sep:close()
        got = assert(pluvio.timeout(5, function() return { waiting:join() } end))
        assert.equal("ENOTCONN", got[3])
        assert.same({ "for the killed one", 9ULL }, { p.sw:tag_recv(9, 0xff, 100) })
        p.ep:close()
        p.cw:close()
        p.sw:close()
        p.ctx:close()
    end))
end)
