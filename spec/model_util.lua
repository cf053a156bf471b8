-- What the randomized model tests (channel_model.lua, uring_model.lua,
-- ucx_model.lua) share: the seeded generator, weighted picks, swarm
-- weights, and the seed range their specs read from the environment.
local jit = require "jit"

-- Interpreted, as the models' own checks (see channel_model.lua).
jit.off(true, true)

local M = {}

-- Park-Miller: exact in doubles, the same sequence on every platform.
-- Returns rng(n) -> 1..n.
function M.new_rng(seed)
    local s = seed % 2147483646 + 1
    return function(n)
        s = s * 16807 % 2147483647
        return s % n + 1
    end
end

-- One of weights' names ({ name1, weight1, name2, weight2, ... }), at
-- random by weight.
function M.pick_weighted(rng, weights)
    local total = 0
    for i = 1, #weights, 2 do total = total + weights[i + 1] end
    local x = rng(total)
    for i = 1, #weights, 2 do
        x = x - weights[i + 1]
        if x <= 0 then return weights[i] end
    end
end

-- Swarm testing: weights with each one left out (0), kept or tripled at
-- random; the names in keep are never left out.
function M.swarm(rng, weights, keep)
    local w = {}
    for i = 1, #weights, 2 do
        local f = ({ 0, 1, 3 })[rng(3)]
        if keep[weights[i]] and f == 0 then f = 1 end
        w[i], w[i + 1] = weights[i], weights[i + 1] * f
    end
    return w
end

-- The seeds a model spec runs: first, last from the environment variable
-- var ("FIRST-LAST" or one seed), else the default range.
function M.seeds(var, first, last)
    local env = os.getenv(var)
    if not env then
        return first, last
    end
    local a, b = env:match("^(%d+)%-(%d+)$")
    a = a or env:match("^(%d+)$")
    assert(a, var .. " must be a seed or FIRST-LAST (got " .. env .. ")")
    return tonumber(a), tonumber(b or a)
end

return M
