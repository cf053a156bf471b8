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

describe("examples/uring_bench.lua's counts", function()
    local helper = require "helper"
    local q = helper.quote

    local function run(args)
        return helper.sh(q(helper.host) .. " " .. q(helper.root .. "/examples/uring_bench.lua") .. " " .. args)
    end

    it("fills a file shorter than --size before --rw rw reads from it, so that every read gets a whole block", function()
        local path = os.tmpname()
        local f = io.open(path, "wb")
        f:write(string.rep("x", 16384))
        f:close()
        for _, flags in ipairs({ "", "--fixed", "--fixed --queue" }) do
            local status, out, err = run("--rw rw --bs 4k --size 256k --iodepth 4 --quiet --json - --file " .. q(path) .. " " .. flags)
            assert.equal(0, status, err)
            local r = bench.json_decode(out)
            assert.equal(64, r.ops)
            assert.equal(64 * 4096, r.bytes)
            local g = io.open(path, "rb")
            assert.equal(262144, g:seek("end"))
            g:close()
        end
        os.remove(path)
    end)
end)

describe("examples/uring_c_bench.c", function()
    local helper = require "helper"
    local q = helper.quote
    local c_loop = helper.host:match("^(.*)/[^/]*$") .. "/uring_c_bench"  -- (of the build tree under test)

    it("reads within --size, as uring_bench and fio do, and refuses a --size the file does not have", function()
        local path = os.tmpname()
        local f = io.open(path, "wb")
        f:write(string.rep("y", 65536))
        f:close()
        local status, out, err = helper.sh(q(c_loop) .. " " .. q(path) .. " --size 16384 --ops 100 --iodepth 4")
        assert.equal(0, status, err)
        local r = bench.json_decode(out)
        assert.equal(100, r.ops)
        -- each read's latency, recorded as uring_bench.lua records it
        assert.is_true(r.lat_p50_us > 0 and r.lat_p50_us <= r.lat_p99_us, out)
        status, _, err = helper.sh(q(c_loop) .. " " .. q(path) .. " --size 131072 --ops 10")
        assert.equal(1, status)
        assert.matches("is shorter than %-%-size 131072", err)
        os.remove(path)
    end)
end)

describe("examples/uring_floor.lua", function()
    local helper = require "helper"
    local q = helper.quote

    it("reads the file with a coroutine per read, or none, within --size", function()
        local path = os.tmpname()
        local f = io.open(path, "wb")
        f:write(string.rep("z", 65536))
        f:close()
        local floor = q(helper.host) .. " " .. q(helper.root .. "/examples/uring_floor.lua") .. " --file " .. q(path)
        for _, mode in ipairs({ "", " --no-coroutines" }) do
            local status, out, err = helper.sh(floor .. " --iodepth 4 --runtime 0.05" .. mode)
            assert.equal(0, status, err)
            local r = bench.json_decode(out)
            assert.is_true(r.ops > 0 and r.iops > 0, out)
        end
        -- a --size past the end, a block larger than the file
        local status, _, err = helper.sh(floor .. " --size 131072 --runtime 0.05")
        assert.equal(1, status)
        assert.matches("^uring_floor: .* is shorter than %-%-size 131072", err)
        status, _, err = helper.sh(floor .. " --bs 131072 --runtime 0.05")
        assert.equal(1, status)
        assert.matches("^uring_floor: .* is smaller than one block", err)
        status, _, err = helper.sh(q(helper.host) .. " " .. q(helper.root .. "/examples/uring_floor.lua"))
        assert.equal(2, status)
        assert.matches("^uring_floor: %-%-file is required", err)
        os.remove(path)
    end)
end)

describe("bench.Histogram", function()
    -- C takes the histogram as it is: a table of another kind handed it a
    -- NULL pointer, and the process died (SIGSEGV) instead of raising.
    it("raises, naming the method, when self is not a histogram", function()
        local h = bench.Histogram.new()
        local calls = {
            record = { 1e-6 }, record_since = { 0 }, record_stamp = { 0 }, percentile = { 50 },
            merge = { h }, count = {}, min = {}, max = {}, mean = {}, reset = {}, summary = {}, buckets = {},
        }
        for name, args in pairs(calls) do
            for _, self in ipairs({ {}, "x", 5 }) do
                assert.has_error(function() h[name](self, unpack(args)) end,
                    ("Histogram:%s: call it as a method on a histogram (obj:%s(...)); got %s as self")
                        :format(name, name, type(self)))
            end
        end
        assert.has_error(function() h.record(1e-6) end,
            "Histogram:record: call it as a method on a histogram (obj:record(...)); got number as self")
        h:record(1e-6)
        assert.equal(1, h:count())
    end)
end)

describe("bench.parse_args and bench.help", function()
    -- A spec without its options list (the list passed as the spec, or the
    -- arguments swapped) raised "attempt to index local 'spec'" or ipairs'
    -- "table expected, got nil" from inside bench.lua, not at the caller.
    it("raise at the caller's line, naming the spec, when it is not a table with an options list", function()
        local options = { { "bs", "size", "4k", "block size" } }
        for _, f in ipairs({ "parse_args", "help" }) do
            local msg = "bench." .. f .. ": spec must be a table with an options list, { options = { {name, kind, " ..
                        "default, help}, ... } } (got %s)"
            for _, case in ipairs({ { options, "options = nil" }, { 5, "5" }, { { options = "x" }, 'options = "x"' } }) do
                local ok, err = pcall(function() local r = bench[f](case[1], {}); return r end)
                assert.is_false(ok)
                assert.equal(("%s:%d: "):format(debug.getinfo(1, "S").short_src, debug.getinfo(1, "l").currentline - 2)
                             .. msg:format(case[2]), err)
            end
        end
        assert.has_error(function() bench.parse_args({ options = options }, "--bs") end,
            'bench.parse_args: argv must be a list of strings, as arg is (got "--bs")')
        assert.equal(4096, bench.parse_args({ options = options }, {}).bs)
    end)
end)

describe("bench.write_json and bench.svg", function()
    -- io.open stops at a NUL byte: "out.json\0.bak" wrote out.json, as the
    -- kernel calls of pluvio.uring would without their check.
    it("raise for a path with a NUL byte instead of writing the file its first part names", function()
        local dir = os.tmpname()
        os.remove(dir)
        assert(os.execute("mkdir " .. dir) == 0)
        assert.has_error(function() bench.write_json(dir .. "/a\0.bak", { 1 }) end,
                         ('bench.write_json: dest must not contain a NUL byte (got "%s/a\\0.bak")'):format(dir))
        assert.has_error(function() bench.svg(dir .. "/b\0.bak", { title = "t" }) end,
                         ('bench.svg: path must not contain a NUL byte (got "%s/b\\0.bak")'):format(dir))
        local a, b = io.open(dir .. "/a"), io.open(dir .. "/b")
        if a then a:close() end
        if b then b:close() end
        os.remove(dir .. "/a"); os.remove(dir .. "/b"); os.remove(dir)
        assert.is_nil(a)
        assert.is_nil(b)
    end)
end)
