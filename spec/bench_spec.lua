-- What the benchmark scripts report and how: pluvio.bench's formatting,
-- and short runs of the benchmarks that check what they counted.
local bench = require "pluvio.bench"

describe("bench.human", function()
    it("prints figures from 1000 to 9999 without an exponent", function()
        assert.equal("6620", bench.human(6620.4))
        assert.equal("1000", bench.human(999.96))
        assert.equal("-6620", bench.human(-6620.4))
        assert.equal("999", bench.human(999.4))
        assert.equal("12.3", bench.human(12.345))
    end)

    it("takes the larger unit when a figure would round up to 1000 of the smaller", function()
        assert.equal("10.0k", bench.human(9999.9))
        assert.equal("1.00M", bench.human(999950))
        assert.equal("1.00G", bench.human(999999999))
        assert.equal("938.7k", bench.human(938700))
        assert.equal("1.00 us", bench.human(0.9996e-6, "s"))
        assert.equal("1.00 ms", bench.human(0.9999999e-3, "s"))
        assert.equal("12.30 us", bench.human(12.3e-6, "s"))
        assert.equal("250 ns", bench.human(250e-9, "s"))
    end)
end)
