-- UCX and the runtime: nested runtimes, idling in the kernel, closing
-- workers and collecting what is left.
local pluvio = require "pluvio"
local ucx = require "pluvio.ucx"
local helper = require "helper"

describe("UCX and the runtime", function()
    it("wakes a task of the outer runtime for a message that arrives while a nested runtime runs", function()
        -- the nested runtime polls the same UCX reactor: its wakes went to
        -- the task in the same slot of the nested runtime, and the outer
        -- receivers waited for good (a deadlock report)
        local got = { pluvio.run(function()
            local ctx = assert(ucx.Context.new())
            local server, client = ctx:create_worker(), ctx:create_worker()
            local inbox = server:am_stream(1)
            local listener = assert(server:create_listener("127.0.0.1", 0))
            local acc = pluvio.spawn(function() return listener:accept() end)
            local ep = assert(client:connect_socket("127.0.0.1", listener:port()))
            local sep = assert(acc:join())
            local reader = pluvio.spawn(function() return inbox:wait_msg().header end)
            local tagged = pluvio.spawn(function() return (server:tag_recv(5, 0, 100)) end)
            pluvio.yield()                      -- both park
            local inner = pluvio.run(function()
                assert(ep:am_send(1, "to the outer reader", "x", false))
                assert(ep:tag_send(5, "tagged"))
                -- both arrive meanwhile (counted as they come, not when the
                -- outer tasks take them; a fixed sleep could end first under load)
                local deadline = pluvio.now() + 5
                repeat
                    pluvio.sleep(0.005)
                    local s = server:stats()
                until (s.am_received >= 1 and s.tag_received >= 1) or pluvio.now() > deadline
                return "inner done"
            end)
            local r = { inner, pluvio.timeout(5, reader.join, reader), pluvio.timeout(5, tagged.join, tagged) }
            ep:close(); sep:close(); listener:close(); server:close(); client:close(); ctx:close()
            return unpack(r)
        end) }
        assert.same({ "inner done", "to the outer reader", "tagged" }, got)
    end)

    it("hands a message to the nested runtime's reader while a reader of the outer one waits on the stream too", function()
        -- the turn went to the outer reader, first in line but paused until
        -- the nested runtime ends: the nested reader waited for a message
        -- held on its stream (for good, without the timeout)
        local got = { pluvio.run(function()
            local ctx = assert(ucx.Context.new())
            local server, client = ctx:create_worker(), ctx:create_worker()
            local inbox = server:am_stream(1)
            local ep = assert(client:connect_addr(server:address()))
            local outer = pluvio.spawn(function() return inbox:wait_msg().header end)
            pluvio.yield()                      -- parks first
            local inner = pluvio.run(function()
                local reader = pluvio.spawn(function() return inbox:wait_msg() end)
                pluvio.yield()
                assert(ep:am_send(1, "first", "x"))
                local m, err = pluvio.timeout(5, reader.join, reader)
                if not m then reader:kill() return err end
                m:release()
                return m.header
            end)
            assert(ep:am_send(1, "second", "x"))
            local r = { inner, pluvio.timeout(5, outer.join, outer) }
            ep:close(); server:close(); client:close(); ctx:close()
            return unpack(r)
        end) }
        assert.same({ "first", "second" }, got)
    end)

    it("gives a message to the next runtime's reader, not to one a block_on left parked", function()
        -- the reader block_on left behind (its runtime never runs again) was
        -- woken for the message and never took it: held for good, and the
        -- new reader waited; a rendezvous sender waited for good too
        local ctx, server, client, inbox, ep
        pluvio.run(function()
            ctx = assert(ucx.Context.new())
            server, client = ctx:create_worker(), ctx:create_worker()
            inbox = server:am_stream(1)
            ep = assert(client:connect_addr(server:address()))
        end)
        pluvio.default_runtime():block_on(function()
            pluvio.spawn(function() return inbox:wait_msg() end)
            pluvio.yield()                      -- parked when block_on returns
        end)
        local header, data, held, sent = pluvio.run(function()
            local sender = pluvio.spawn(function()
                return ep:am_send_nb(1, "rndv", ("r"):rep(100000), false, "rndv"):wait()
            end)
            local m = assert(pluvio.timeout(5, function() return inbox:wait_msg() end))
            local d = m:data()
            return m.header, #d, server:stats().msgs_held, pluvio.timeout(5, sender.join, sender)
        end)
        assert.same({ "rndv", 100000, 0, true }, { header, data, held, sent })
        pluvio.run(function() ep:close(); server:close(); client:close(); ctx:close() end)
    end)

    it("idles in the kernel with an open listener, under 2% CPU over a second", function()
        -- os.clock is the CPU time of the whole process, UCX's threads too
        local status, out, err = helper.run_script([[
            local ucx = require "pluvio.ucx"
            local ctx = assert(ucx.Context.new())
            local w = assert(ctx:create_worker())
            local l = assert(w:create_listener("127.0.0.1", 0))
            pluvio.sleep(0.1)                   -- set-up done
            local rt = pluvio.runtime()
            local s0, c0, t0 = rt:stats(), os.clock(), pluvio.now()
            pluvio.sleep(1)
            local s1, c1, t1 = rt:stats(), os.clock(), pluvio.now()
            print(c1 - c0, t1 - t0, s1.ticks - s0.ticks, s1.idle_waits - s0.idle_waits, w:stats().wakeups)
            l:close(); w:close(); ctx:close()
        ]])
        assert.equal(0, status, err)
        local cpu, wall, ticks, waits, wakeups = out:match("^(%S+)\t(%S+)\t(%S+)\t(%S+)\t(%S+)\n$")
        cpu, wall = tonumber(cpu), tonumber(wall)
        assert.is_number(cpu, out)
        assert.is_true(wall >= 1)
        assert.is_true(cpu / wall < 0.02, ("%.2f%% CPU (%.4f s in %.3f s)"):format(100 * cpu / wall, cpu, wall))
        -- it slept: one wait (two with the one-second safety timeout), not a poll loop
        assert.is_true(tonumber(ticks) <= 3 and tonumber(waits) >= 1, "ticks " .. ticks .. ", waits " .. waits)
        assert.equal("0", wakeups)              -- nothing came to wake the worker
    end)

    it("gives UCX back a message taken and never received when the worker is closed (no pool warnings)", function()
        local status, out, err = helper.run_script([[
            local ucx = require "pluvio.ucx"
            local ctx = assert(ucx.Context.new())
            local sw, cw = assert(ctx:create_worker()), assert(ctx:create_worker())
            local stream = sw:am_stream(1)
            local ep = assert(cw:connect_addr(sw:address()))
            assert(ep:am_send(1, "h", "eager data UCX holds"))
            local m = assert(stream:wait_msg())     -- never received nor released
            ep:close(); cw:close(); sw:close(); ctx:close()
            print("ok")
        ]])
        assert.equal(0, status, err)
        assert.equal("ok\n", out)
        assert.equal("", err)
    end)

    it("shuts down without UCX warnings when objects are left to the garbage collector", function()
        local status, out, err = helper.run_script([[
            local ucx = require "pluvio.ucx"
            local ctx = assert(ucx.Context.new())
            local sw = assert(ctx:create_worker())
            local cw = assert(ctx:create_worker())
            local st = sw:am_stream(1)
            local l = assert(sw:create_listener("127.0.0.1", 0))
            pluvio.spawn(function() l:accept() end)
            local ep = assert(cw:connect_socket("127.0.0.1", l:port()))
            assert(ep:am_send(1, "h", "d"))
            print("ok")
        ]])
        assert.equal(0, status, err)
        assert.equal("ok\n", out)
        assert.equal("", err)
    end)
end)
