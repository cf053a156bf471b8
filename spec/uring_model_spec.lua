-- pluvio.uring's files against a model, over random scenarios
-- (spec/uring_model.lua says what they do and what is checked).  A fixed
-- set of seeds here; PLUVIO_URING_SEEDS=FIRST-LAST (or one seed) runs
-- others:
--   PLUVIO_URING_SEEDS=1-2000 spec/run spec/uring_model_spec.lua
local model = require "uring_model"

local function seeds()
    return require("model_util").seeds("PLUVIO_URING_SEEDS", 1, 100)
end

local function run_seeds(first, last)
    local failures, n = {}, 0
    for seed = first, last do
        local err = model.run(seed)
        if err then
            n = n + 1
            if n <= 3 then
                failures[n] = err
            end
        end
    end
    return failures, n
end

describe("pluvio.uring files against a model", function()
    it("read back what was written, keep the pool whole and end, in random scenarios", function()
        local first, last = seeds()
        local failures, n = run_seeds(first, last)
        assert(n == 0, string.format("%d of seeds %d..%d failed:\n%s", n, first, last,
                                     table.concat(failures, "\n\n")))
    end)
end)
