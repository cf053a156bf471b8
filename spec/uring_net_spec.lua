-- Sockets over io_uring (pluvio.uring_net): fixed bugs, one spec each.
-- (The first socket specs live in uring_spec.lua, "sockets over io_uring".)
local pluvio = require "pluvio"
local uring = require "pluvio.uring"

describe("sockets and runtimes", function()
    it("refuse to be used from another runtime than their own, whose ring has their ops", function()
        local rt = pluvio.Runtime.new()
        rt:register_reactor("io_uring", uring.reactor())
        local l, c, s, u
        rt:run(function()
            l = assert(uring.tcp_listen("127.0.0.1", 0))
            local srv = pluvio.spawn(function() return assert(l:accept()) end)
            c = assert(uring.tcp_connect("127.0.0.1", l:port()))
            s = srv:join()
            u = assert(uring.udp_bind("127.0.0.1", 0))
        end)
        local other = pluvio.Runtime.new()
        other:register_reactor("io_uring", uring.reactor())
        other:run(function()
            for _, call in ipairs({
                { "TcpListener:accept", l, function() return l:accept() end },
                { "TcpListener:close", l, function() return l:close() end },
                { "TcpSocket:send", c, function() return c:send("x") end },
                { "TcpSocket:recv", c, function() return c:recv(1) end },
                { "TcpSocket:recv_exact", c, function() return c:recv_exact(1) end },
                { "TcpSocket:close", c, function() return c:close() end },
                { "UdpSocket:send_to", u, function() return u:send_to("x", "127.0.0.1", u:port()) end },
                { "UdpSocket:recv_from", u, function() return u:recv_from(1) end },
                { "UdpSocket:close", u, function() return u:close() end },
            }) do
                local ok, err = pluvio.timeout(1, pcall, call[3])   -- (else: parked on this ring for good)
                assert.is_false(ok)
                assert.matches(call[1] .. ": " .. call[2].name .. " was made in another runtime (its io_uring " ..
                               "reactor is that runtime's): use it there", err, 1, true)
            end
        end)
        rt:run(function()                   -- still fine at home, and closed there
            assert.equal(2, s:send("ok"))
            assert.equal("ok", c:recv_exact(2))
            assert.is_true(c:close() and s:close() and l:close() and u:close())
        end)
    end)
end)
