-- The hot paths stay compiled: LuaJIT gives up on a trace for some code
-- shapes (a tail call to a built-in with side effects, then a return to the
-- caller: "NYI: return to lower frame"), and everything after the point
-- runs in the interpreter, several times slower.  Each loop below runs in a
-- fresh pluvio host with every trace abort recorded; an abort inside
-- Pluvio's own modules on these paths is a regression.
local helper = require "helper"

-- Runs body (a chunk that defines run()) under an abort recorder; the
-- script prints "ran N" and one line per abort in lua/pluvio.
local function aborts_in(body)
    local code = [[
local vmdef = require "jit.vmdef"
local funcinfo = require("jit.util").funcinfo
local aborts, started, inner_seen = {}, {}, {}
local function where(func, pc)
    local info = funcinfo(func, pc)
    return (info.source or "?"):match("[^/]*/?[^/]*$") .. ":" .. tostring(info.currentline)
end
jit.attach(function(what, tr, func, pc, otr, oex)
    if what == "start" then
        started[tr] = where(func, pc)
    elseif what == "abort" then
        local from, at = started[tr] or "?", where(func, pc)
        local msg = vmdef.traceerr[otr] or tostring(otr)
        if oex ~= nil and msg:find("%%d", 1, true) then msg = msg:format(oex) end
        -- what the JIT cannot compile (NYI) or gives up on for good, and
        -- a loop inside pluvio that keeps the caller's loop (a trace that
        -- started outside pluvio) from having a root trace: one entered on
        -- every call aborts each recording of the caller's loop, again and
        -- again; a loop run only now and then (sweep_sends, every few
        -- sends) may abort the one recording that passes it while it is
        -- still cold, and is compiled by the next time, so a third abort at
        -- the same place counts.  Not "leaving loop in root trace", after
        -- which it records elsewhere, nor a trace that started in pluvio's
        -- own cold code (Worker:close)
        local lasting = msg:find("^NYI") or msg:find("blacklist")
        local inner = false
        if msg:find("inner loop in root trace", 1, true) and at:find("pluvio/", 1, true)
           and not from:find("pluvio/", 1, true) then
            local key = from .. " " .. at
            inner_seen[key] = (inner_seen[key] or 0) + 1
            inner = inner_seen[key] == 3
        end
        if inner or (lasting and (from:find("pluvio/", 1, true) or at:find("pluvio/", 1, true))) then
            aborts[#aborts + 1] = ("trace from %s aborted at %s: %s"):format(from, at, msg)
        end
    end
end, "trace")
]] .. body .. [[
local n = run()
jit.attach(function() end)
print("ran " .. n)
for _, a in ipairs(aborts) do print(a) end
]]
    local status, out, err = helper.run_script(code)
    assert(status == 0, "the script failed: " .. err .. out)
    local ran = tonumber(out:match("ran (%d+)"))
    local list = {}
    for line in out:gmatch("[^\n]+") do
        if not line:match("^ran ") then list[#list + 1] = line end
    end
    return ran, list
end

describe("JIT-compiled hot paths", function()
    it("AM ping-pong and windowed sends (am_send, wait_msg, recv_data, am_send_nb) have no trace aborts in pluvio", function()
        local ran, aborts = aborts_in([[
local pluvio = require "pluvio"
local ucx = require "pluvio.ucx"
local uring = require "pluvio.uring"
local function run()
    local ctx = assert(ucx.Context.new())
    local a, b = assert(ctx:create_worker()), assert(ctx:create_worker())
    local sa, sb = a:am_stream(1), b:am_stream(2)
    local ab = assert(a:connect_addr(assert(b:address())))
    local ba = assert(b:connect_addr(assert(a:address())))
    local N = 3000
    local pong = pluvio.spawn(function()
        local buf = uring.current():acquire_buffer()
        for _ = 1, N do
            local m = assert(sb:wait_msg())
            local n = m:data_len()
            assert(m:recv_data(buf))
            assert(ba:am_send(1, "", buf, false, nil, n))
        end
        buf:release()
    end)
    local buf = uring.current():acquire_buffer()
    local done = 0
    for _ = 1, N do
        assert(ab:am_send(2, "", "12345678"))
        local m = assert(sa:wait_msg())
        assert(m:recv_data(buf))
        done = done + 1
    end
    pong:join()
    -- windowed sends: am_send_nb, then wait for the oldest
    local sink = pluvio.spawn(function()
        for _ = 1, N do assert(sb:wait_msg()):release() end
    end)
    local handles = {}
    for i = 1, N do
        local k = i % 8 + 1
        if handles[k] then assert(handles[k]:wait()) end
        handles[k] = ab:am_send_nb(2, "", buf, false, nil, 4096)
    end
    for k = 1, 8 do if handles[k] then assert(handles[k]:wait()) end end
    sink:join()
    buf:release()
    ab:close(); ba:close(); a:close(); b:close(); ctx:close()
    return done
end
]])
        assert.equal(3000, ran)
        assert.same({}, aborts)
    end)

    it("read_fixed from many tasks has no trace aborts in pluvio", function()
        local ran, aborts = aborts_in([[
local pluvio = require "pluvio"
local uring = require "pluvio.uring"
local function run()
    local path = os.tmpname()
    local f = assert(uring.File.open(path, "w+"))
    local buf = f:acquire_buffer()
    buf:fill(7)
    assert(f:write_fixed(buf, 0, 65536))
    buf:release()
    local done = 0
    local tasks = {}
    for i = 1, 8 do
        tasks[i] = pluvio.spawn(function()
            local b = f:acquire_buffer()
            for k = 1, 2000 do
                assert(f:read_fixed(b, (k % 16) * 4096, 4096) == 4096)
                done = done + 1
            end
            b:release()
        end)
    end
    for i = 1, 8 do tasks[i]:join() end
    f:close()
    os.remove(path)
    return done
end
]])
        assert.equal(16000, ran)
        assert.same({}, aborts)
    end)
end)
