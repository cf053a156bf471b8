-- pluvio.ucx against a model, over random scenarios (spec/ucx_model.lua
-- says what they do and what is checked).  The scenarios run in a pluvio
-- subprocess: UCX state (workers UCX kept, the reactor's registrations)
-- would otherwise carry over into the other specs, and a UCX abort or a
-- hang names its seed instead of ending busted.  A fixed set of seeds
-- here (1-100); PLUVIO_UCX_SEEDS=FIRST-LAST (or one seed) runs others:
--   PLUVIO_UCX_SEEDS=1-2000 spec/run spec/ucx_model_spec.lua
local helper = require "helper"

local function seeds()
    return require("model_util").seeds("PLUVIO_UCX_SEEDS", 1, 100)
end

-- Runs seeds first..last, one after another, printing "seed N" before
-- each and what failed; "done" at the end.
local DRIVER = [[
package.path = arg[1] .. "/spec/?.lua;" .. package.path
local model = require "ucx_model"
for seed = tonumber(arg[2]), tonumber(arg[3]) do
    io.stdout:write("seed ", seed, "\n")
    io.stdout:flush()
    local err = model.run(seed)
    if err then
        io.stdout:write("FAILED ", err, "\nEND\n")
    end
end
io.stdout:write("done\n")
]]

-- The failures of seeds first..last (at most 3 described), and how many
-- failed.  A subprocess that dies (a UCX abort) or hangs fails its seed;
-- the next subprocess goes on after it.
local function run_seeds(first, last)
    local failures, n = {}, 0
    local function add(what)
        n = n + 1
        if n <= 3 then failures[n] = what end
    end
    local from = first
    while from <= last do
        local status, out, err = helper.run_script(DRIVER, helper.quote(helper.root) .. " " .. from .. " " .. last)
        for failure in out:gmatch("FAILED (.-)\nEND\n") do
            add(failure)
        end
        if status == 0 and out:find("\ndone\n$") then
            break
        end
        local seed = tonumber(out:match("seed (%d+)\n[^\n]*$") or out:match(".*seed (%d+)\n")) or from
        add(string.format("seed %d: the subprocess ended with status %d:\n%s", seed, status,
                          err:sub(-2000)))
        from = seed + 1
    end
    return failures, n
end

describe("pluvio.ucx against a model", function()
    it("delivers every message once, intact and in order, fails as documented and leaks nothing, " ..
       "in random scenarios", function()
        local first, last = seeds()
        local failures, n = run_seeds(first, last)
        assert(n == 0, string.format("%d of seeds %d..%d failed:\n%s", n, first, last,
                                     table.concat(failures, "\n\n")))
    end)
end)
