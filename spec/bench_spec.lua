-- What the benchmark scripts report and how: pluvio.bench's formatting,
-- and short runs of the benchmarks that check what they counted.
local bench = require "pluvio.bench"
local pluvio = require "pluvio"
local helper = require "helper"

-- The error f(...) raises, without its position.
local function err_of(f, ...)
    local ok, err = pcall(f, ...)
    assert.is_false(ok)
    return (err:gsub("^[^:]*:%d+: ", ""))
end

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

    -- (each raised a Lua error from inside bench.lua, or, for an unknown
    -- kind, was taken and its values passed through unchecked)
    it("raise for an option entry without a name or with an unknown kind, and for an argument not a string", function()
        for _, f in ipairs({ "parse_args", "help" }) do
            assert.equal("bench." .. f .. ": spec.options[1] must be a table {name, kind, default, help} (got 5)",
                         err_of(bench[f], { options = { 5 } }, {}))
            assert.equal("bench." .. f .. ": spec.options[1][1], its name, must be a string of letters, digits and " ..
                         "'-' (got nil)", err_of(bench[f], { options = { {} } }, {}))
            assert.equal("bench." .. f .. ': spec.options[2][2], the kind of --x, must be "string", "integer", ' ..
                         '"number", "size", "flag" or "list" (got "bogus")',
                         err_of(bench[f], { options = { { "bs", "size", "4k" }, { "x", "bogus", 1 } } }, {}))
        end
        assert.equal("bench.parse_args: argv[2] must be a string, as arg's are (got 5)",
                     err_of(bench.parse_args, { options = { { "n", "integer", 1 } } }, { "--n", 5 }))
    end)
end)

describe("bench.json, bench.json_decode, bench.table, bench.writable and the histogram's clocks", function()
    it("raise for what JSON cannot hold and give nil, err for text nested too deep", function()
        local cycle = {}
        cycle.a = { b = cycle }
        assert.has_error(function() bench.json(cycle) end,
                         "bench.json: cannot encode a table that holds itself (a cycle) at .a.b")
        local ok, err = pcall(bench.json, { x = { 1, print } })
        assert.is_false(ok)
        assert.matches("bench.json: cannot encode a function (function: ", err, 1, true)
        assert.matches("), which JSON cannot hold, at .x[2]", err, 1, true)
        local shared = { 1 }
        assert.equal('{"a":[1],"b":[1]}', bench.json({ a = shared, b = shared }))   -- shared, not a cycle
        assert.equal("[null,null,3]", bench.json({ 0 / 0, 1 / 0, 3 }))
        assert.same({ nil, "nested deeper than 200 levels at byte 201" }, { bench.json_decode(("["):rep(100000)) })
        local v = bench.json_decode(("["):rep(150) .. "1" .. ("]"):rep(150))    -- deep enough for any report
        for _ = 1, 150 do v = v[1] end
        assert.equal(1, v)
    end)

    it("raise for rows, columns, svg series and paths of the wrong kind, and for a start that is not finite", function()
        assert.has_error(function() bench.table({ 5 }) end, "bench.table: rows[1] must be a table (got 5)")
        assert.has_error(function() bench.table({ { a = 1 } }, { 5 }) end,
                         "bench.table: cols[1] must be a column name (a string) (got 5)")
        local svg = os.tmpname()
        assert.has_error(function() bench.svg(svg, { histogram = 5 }) end,
                         "bench.svg: spec.histogram must be a bench.Histogram (got 5)")
        assert.has_error(function() bench.svg(svg, { series = 5 }) end,
                         "bench.svg: spec.series must be a list of {t, value} pairs (got 5)")
        local ok, err = pcall(bench.svg, svg, { series = { { 1, "x" }, { 2, "y" } } })
        assert.is_false(ok)
        assert.matches("bench.svg: spec.series[1] must be a pair of finite numbers {t, value} (got table", err, 1, true)
        os.remove(svg)
        assert.has_error(function() bench.writable(nil) end, "bench.writable: path must be a string (got nil)")
        assert.has_error(function() bench.writable("/tmp/x\0y") end,
                         'bench.writable: path must not contain a NUL byte (got "/tmp/x\\0y")')
        local h = bench.Histogram.new()
        assert.has_error(function() h:record_since(0 / 0) end,
                         "Histogram:record_since: start must be a finite number (a pluvio.now()) (got nan)")
        assert.has_error(function() h:record_stamp(1 / 0) end,
                         "Histogram:record_stamp: stamp must be a finite number (a bench.stamp()) (got inf)")
        assert.has_error(function() bench.stamp_after("x") end, 'bench.stamp_after: seconds must be a number (got "x")')
        assert.equal(0, h:count())
    end)
end)

describe("pluvio.bench's checks", function()
    local ffi = require "ffi"
    local NULL = ffi.cast("void *", 0)

    -- (each wrote a broken file or a wrong figure, or raised from inside
    -- bench.lua, or under another function's name: a fuzz of the API)
    it("refuse what is not finite where a figure or a file would be wrong", function()
        local svg = os.tmpname()
        for _, series in ipairs({ { { 0, 1 }, { 1, 0 / 0 } }, { { 0, 1 }, { 1 / 0, 2 } } }) do
            local ok, err = pcall(bench.svg, svg, { series = series })     -- ("nan" coordinates)
            assert.is_false(ok)
            assert.matches("bench.svg: spec.series[2] must be a pair of finite numbers {t, value} (got table", err,
                           1, true)
        end
        os.remove(svg)
        assert.is_nil(bench.parse_size(("9"):rep(400) .. "t"))     -- (inf)
        assert.has_error(function() bench.bytes(1 / 0) end, "bench.bytes: n must be a finite number (got inf)")
        assert.has_error(function() bench.bytes(0 / 0) end, "bench.bytes: n must be a finite number (got nan)")
        assert.has_error(function() bench.human(0.5, "ms") end, 'bench.human: unit must be nil or "s" (seconds) (got "ms")')
        assert.same({ "inf", "-inf", "nan" }, { bench.human(1 / 0), bench.human(-1 / 0, "s"), bench.human(0 / 0) })
    end)

    it("name the argument, not a line of bench.lua or another function", function()
        local svg = os.tmpname()
        assert.equal("bench.svg: spec.histogram must be a bench.Histogram (got cdata<void *>: NULL)",
                     err_of(bench.svg, svg, { histogram = NULL }))
        assert.equal("bench.svg: spec.series must be a list of {t, value} pairs (got cdata<void *>: NULL)",
                     err_of(bench.svg, svg, { series = NULL }))
        assert.equal("bench.svg: spec.series_label must be nil or a string (got 5)",
                     err_of(bench.svg, svg, { series_label = 5 }))
        assert.equal("bench.svg: spec.title must be nil or a string (got true)", err_of(bench.svg, svg, { title = true }))
        os.remove(svg)
        assert.equal("bench.table: cols must be nil or a list of column names (got cdata<void *>: NULL)",
                     err_of(bench.table, { { a = 1 } }, NULL))
        assert.equal("bench.table: rows[1].__units must be nil or a table of units by column (got 5)",
                     err_of(bench.table, { { a = 1, __units = 5 } }, { "a" }))
        assert.equal('bench.table: rows[1].__units["a"] must be "s" (seconds) (got "ms")',
                     err_of(bench.table, { { a = 1, __units = { a = "ms" } } }, { "a" }))
        assert.equal("bench.table: rows[2].__order must be nil or a list of column names (got 5)",
                     err_of(bench.table, { { a = 1 }, { a = 1, __order = 5 } }))
        assert.equal("bench.table: rows[1].__order[2] must be a column name (a string) (got 3)",
                     err_of(bench.table, { { a = 1, __order = { "a", 3 } } }))
        assert.equal("bench.fit_pool: buffer_size must be an integer from 4096 to 1073741824 (got 0)",
                     err_of(bench.fit_pool, 0, function() return 1 end, 4))
        assert.equal("bench.fit_pool: queue_size must be an integer from 1 to 32768 (got 0)",
                     err_of(bench.fit_pool, 4096, function() return 1 end, 4, 1, 0))
        for _, w in ipairs({ 5, {}, "w" }) do
            assert.matches("^bench.connect_socket: worker must be a UCX worker %(ctx:create_worker%(%)%) %(got ",
                           err_of(bench.connect_socket, w, "127.0.0.1", 1))
        end
        assert.equal("bench.parse_args: spec.options[1].min of --sizes: only integer, number and size options " ..
                     "take a bound (this one is list)",
                     err_of(bench.parse_args, { options = { { "sizes", "list", "4k", "h", min = 1 } } }, {}))
        assert.equal('bench.help: spec.options[1].max of --n must be a number (got "9")',
                     err_of(bench.help, { options = { { "n", "integer", 1, "h", max = "9" } } }))
        local p = bench.progress("x", true)
        assert.equal("Progress:update: call it as a method on a progress line (obj:update(...)); got nil as self",
                     err_of(p.update, nil, "t"))
        assert.equal("Progress:done: call it as a method on a progress line (obj:done(...)); got string as self",
                     err_of(p.done, "x"))
        assert.equal("Histogram:merge: h must be a bench.Histogram (got nil)",
                     err_of(bench.Histogram.new().merge, bench.Histogram.new(), nil))
        local raising = setmetatable({}, { __tostring = function() error("no words") end })
        assert.is_nil(bench.parse_size(raising))                   -- (its error, not nil)
        assert.is_nil(bench.host_port(raising))
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

describe("bench.connect_socket", function()
    -- (a port where something accepts but never speaks UCX held the
    -- examples' clients in the wire-up for good)
    it("gives up a connect that gets no UCX answer, in one line", helper.async(function()
        local ucx, uring = require "pluvio.ucx", require "pluvio.uring"
        local silent = assert(uring.tcp_listen("127.0.0.1", 0))    -- the kernel accepts; nobody answers
        local ctx = assert(ucx.Context.new())
        local w = assert(ctx:create_worker())
        local t0 = pluvio.now()
        local ep, err, code = bench.connect_socket(w, "127.0.0.1", silent:port(), 0.3)
        assert.is_nil(ep)
        assert.equal(("connect to 127.0.0.1:%d: no UCX connection within 0.3 s (is a UCX listener there?)")
                     :format(silent:port()), err)
        assert.equal("ETIMEDOUT", code)
        assert.is_true(pluvio.now() - t0 < 2)
        local l = assert(w:create_listener("127.0.0.1", 0))             -- a real one: connected
        local acc = pluvio.spawn(function() return l:accept() end)
        local e = assert(bench.connect_socket(w, "127.0.0.1", l:port()))
        assert(acc:join()):close()
        e:close(); l:close(); silent:close(); ctx:close()
        assert.has_error(function() bench.connect_socket(w, "127.0.0.1", 1, 0) end,
                         "bench.connect_socket: seconds must be a number from 0 to 1e9 (not 0) (got 0)")
    end))
end)

