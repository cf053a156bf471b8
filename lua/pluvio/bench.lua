-- pluvio.bench: what benchmark scenarios need: a latency histogram (in C:
-- log-linear buckets, <= 0.4% error, constant memory, mergeable),
-- command-line options with --help, a report printed as a table and as
-- JSON with the same fields, a progress line, and an SVG plot.
local core = require "pluvio.core"
local check = require "pluvio.check"

local ffi, C = core.ffi, core.C
local format, type, tostring, ipairs = string.format, type, tostring, ipairs
local floor, HUGE = math.floor, math.huge
local json = require "pluvio.json"

local M = {}

ffi.cdef [[ int isatty(int fd); ]]

---------------------------------------------------------------------------
-- Histogram
---------------------------------------------------------------------------

local Histogram = {}
Histogram.__index = Histogram
M.Histogram = Histogram

function Histogram.new()
    local h = C.pl_hist_new()
    if h == nil then
        error("Histogram.new: out of memory", 2)
    end
    return setmetatable({ h = ffi.gc(h, C.pl_hist_free) }, Histogram)
end

-- record(seconds): one value (negative and NaN count as 0, infinity as the
-- largest value).
function Histogram:record(seconds)
    check.self("Histogram:record", self, Histogram, "a histogram")
    if type(seconds) ~= "number" then
        check.fail("Histogram:record", "seconds must be a number", seconds)
    end
    C.pl_hist_record(self.h, seconds)
end

-- record_since(start): record now - start and return now (one call per
-- operation when timing back-to-back operations).
function Histogram:record_since(start)
    check.self("Histogram:record_since", self, Histogram, "a histogram")
    if type(start) ~= "number" or start ~= start or start == HUGE or start == -HUGE then
        check.fail("Histogram:record_since", "start must be a finite number (a pluvio.now())", start)
    end
    return C.pl_hist_record_since(self.h, start)
end

-- record_stamp(stamp): the same with stamps from bench.stamp(), a cheaper
-- clock (the CPU's TSC where the runtime found one); returns now as a stamp.
function Histogram:record_stamp(stamp)
    check.self("Histogram:record_stamp", self, Histogram, "a histogram")
    if type(stamp) ~= "number" or stamp ~= stamp or stamp == HUGE or stamp == -HUGE then
        check.fail("Histogram:record_stamp", "stamp must be a finite number (a bench.stamp())", stamp)
    end
    return C.pl_hist_record_stamp(self.h, stamp)
end

-- bench.stamp(): now, as a stamp for Histogram:record_stamp (only
-- differences of stamps mean something, and only to record_stamp).
local pl_hist_stamp = C.pl_hist_stamp
function M.stamp()      -- (not the FFI function itself, which refuses an extra argument)
    return pl_hist_stamp()
end

-- bench.stamp_after(seconds): a stamp that many seconds from now, to
-- compare stamps with (a deadline that costs no clock read to check).
local pl_hist_stamp_after = C.pl_hist_stamp_after
function M.stamp_after(seconds)
    if type(seconds) ~= "number" or seconds ~= seconds then
        check.fail("bench.stamp_after", "seconds must be a number", seconds)
    end
    return pl_hist_stamp_after(seconds)
end

-- C takes self.h as it is: a table of another kind has none, and C would
-- follow a NULL pointer (a crash, not an error).  So every method checks self.
local function hist(fname, h)
    check.self(fname, h, Histogram, "a histogram", 4)
    return h.h
end

function Histogram:count() return C.pl_hist_count(hist("Histogram:count", self)) end
function Histogram:min() return C.pl_hist_min(hist("Histogram:min", self)) end
function Histogram:max() return C.pl_hist_max(hist("Histogram:max", self)) end
function Histogram:mean() return C.pl_hist_mean(hist("Histogram:mean", self)) end
function Histogram:reset() C.pl_hist_reset(hist("Histogram:reset", self)) end

-- percentile(p): p from 0 to 100.
function Histogram:percentile(p)
    check.self("Histogram:percentile", self, Histogram, "a histogram")
    check.number("Histogram:percentile", "p", p, 0, 100)
    return C.pl_hist_percentile(self.h, p)
end

function Histogram:merge(other)
    check.self("Histogram:merge", self, Histogram, "a histogram")
    if getmetatable(other) ~= Histogram then
        check.fail("Histogram:merge", "h must be a bench.Histogram", other)
    end
    C.pl_hist_merge(self.h, other.h)
    return self
end

-- summary(): count, min, mean, p50, p90, p99, p99_9, max (seconds).
function Histogram:summary()
    check.self("Histogram:summary", self, Histogram, "a histogram")
    return {
        count = self:count(), min = self:min(), mean = self:mean(),
        p50 = self:percentile(50), p90 = self:percentile(90), p99 = self:percentile(99),
        p99_9 = self:percentile(99.9), max = self:max(),
    }
end

-- buckets(): non-empty buckets as { {lower_seconds, count}, ... }.
function Histogram:buckets()
    check.self("Histogram:buckets", self, Histogram, "a histogram")
    local n = 6000
    local lower, counts = ffi.new("double[?]", n), ffi.new("double[?]", n)
    local got = C.pl_hist_buckets(self.h, lower, counts, n)
    local out = {}
    for i = 0, got - 1 do
        out[#out + 1] = { lower[i], counts[i] }
    end
    return out
end

---------------------------------------------------------------------------
-- Options
---------------------------------------------------------------------------

-- Byte counts: "4k", "1m", "1g", "4096", "4KiB".
function M.parse_size(s)
    if type(s) == "number" then
        return s
    elseif type(s) ~= "string" then
        return nil
    end
    local num, unit = s:lower():match("^(%d+%.?%d*)%s*([kmgt]?)i?b?$")
    if not num then
        return nil
    end
    local mult = ({ [""] = 1, k = 1024, m = 1024 ^ 2, g = 1024 ^ 3, t = 1024 ^ 4 })[unit]
    local n = floor(tonumber(num) * mult)
    if n == HUGE then       -- (400 digits: no size, not infinity)
        return nil
    end
    return n
end

-- A value of an option of kind integer, number, size or list, from the
-- text given for it; or nil and what is wrong.
local function convert(o, name, v)
    if o[2] == "integer" or o[2] == "number" then
        -- decimal only: tonumber alone takes 0x10, inf and nan
        local n = v:match("^%s*[+-]?%d*%.?%d+[eE]?[+-]?%d*%s*$") and tonumber(v)
        if not n or n ~= n or n == math.huge or n == -math.huge or
                (o[2] == "integer" and n % 1 ~= 0) then
            return nil, format("--%s must be %s (got %s)", name, o[2] == "integer" and "an integer" or "a number", v)
        end
        v = n
    elseif o[2] == "size" then
        local n = M.parse_size(v)
        if not n then
            return nil, format("--%s must be a size like 4096, 4k, 1m or 1g (got %s)", name, v)
        end
        v = n
    elseif o[2] == "list" then
        local list = {}
        for item in v:gmatch("[^,]+") do
            local n = M.parse_size(item)
            if not n then
                return nil, format("--%s must be a comma-separated list of sizes (got %s)", name, v)
            end
            list[#list + 1] = n
        end
        if #list == 0 then
            return nil, format("--%s needs at least one size", name)
        end
        v = list
    end
    return v
end

-- fit_pool(buffer_size, count_of, want[, min[, queue_size[, share]]]): the
-- largest n from min (default 1) to want whose pool of count_of(n)
-- registered buffers of buffer_size bytes the locked-memory limit holds
-- (uring.lockable_buffers), and that limit's count (nil: no limit, n is
-- want); or nil and why not, for a one-line error: a script's window or
-- number of tasks, lowered to what a user's ulimit -l (8 MiB) holds.  The
-- limit is the user's, not the process's: share processes of one user
-- (default 1) get an equal part of it each (each with its own rings), and
-- the count is that part's.
function M.fit_pool(buffer_size, count_of, want, min, queue_size, share)
    check.integer("bench.fit_pool", "want", want, 1, 2 ^ 31)
    if type(share) == "nil" then
        share = 1
    end
    check.integer("bench.fit_pool", "share", share, 1, 1024)
    if type(count_of) ~= "function" then
        check.fail("bench.fit_pool", "count_of must be a function (n -> buffers)", count_of)
    end
    if type(min) == "nil" then
        min = 1
    end
    check.integer("bench.fit_pool", "min", min, 1, want)
    local lockable = require("pluvio.uring")._lockable_buffers("bench.fit_pool", buffer_size, queue_size, share)
    if not lockable then
        return want, nil
    end
    for n = want, min, -1 do
        if count_of(n) <= lockable then
            return n, lockable
        end
    end
    return nil, format("%d registered buffers of %s, and the locked-memory limit (ulimit -l) holds %d%s",
                       count_of(min), M.bytes(buffer_size), lockable,
                       share > 1 and format(" (its part for 1 of %d processes)", share) or "")
end

-- connect_socket(worker, host, port[, seconds]): worker:connect_socket,
-- given up after seconds (10): a port where something accepts but never
-- speaks UCX left the wire-up, and the script, waiting for good.  The
-- endpoint, or nil and a one-line error.
function M.connect_socket(worker, host, port, seconds)
    if type(seconds) == "nil" then
        seconds = 10
    end
    if type(seconds) ~= "number" or seconds ~= seconds or seconds <= 0 or seconds > 1e9 then
        check.fail("bench.connect_socket", "seconds must be a number from 0 to 1e9 (not 0)", seconds)
    end
    local ucx = require "pluvio.ucx"
    if getmetatable(worker) ~= ucx.Worker then
        check.fail("bench.connect_socket", "worker must be a UCX worker (ctx:create_worker())", worker)
    end
    local pluvio = require "pluvio"
    if not pluvio.runtime() then       -- (else pluvio.timeout's words, naming it)
        error("bench.connect_socket: not inside a pluvio task (call it from a function run by " ..
              "pluvio.run / rt:run, or from a script run by the pluvio host)", 2)
    end
    local ep, err, code = pluvio.timeout(seconds, worker.connect_socket, worker, host, port)
    if ep == nil and err == "timeout" and code == nil then
        return nil, format("connect to %s: no UCX connection within %g s (is a UCX listener there?)",
                           check.host_port(host, port), seconds), "ETIMEDOUT"
    end
    return ep, err, code
end

-- nil if path can be written (a report's: known before a run, not after
-- it), else why not.  A file it had to make for the check is removed
-- again: a run refused for another option leaves nothing behind.
function M.writable(path)
    check.string("bench.writable", "path", path)
    check.no_nul("bench.writable", "path", path)    -- (io.open would check the part before it)
    local existed = io.open(path, "r")
    if existed then
        existed:close()
    end
    local f, err = io.open(path, "a")
    if not f then
        return tostring(err)
    end
    f:close()
    if not existed then
        os.remove(path)
    end
    return nil
end

-- parse_args(spec, argv): spec = { usage = "...", options = { {name, kind,
-- default, help[, min = n][, max = n][, choices = {...}][, out = true][, nonempty = true]},
-- ... } } with kind "string", "integer", "number" (decimal, finite),
-- "size", "flag" or "list" (comma-separated sizes).  min / max bound a
-- value, choices lists the allowed ones, out marks a path the script will
-- write (checked before the run).  Returns the options table, or prints
-- the help and exits 0 (--help), or prints a one-line error and exits 2.
-- A spec as parse_args and help take it: a table with an options list.
local KINDS = { string = true, integer = true, number = true, size = true, flag = true, list = true }
local BOUNDED = { integer = true, number = true, size = true }     -- (min and max)

local function check_spec(fname, spec)
    if type(spec) ~= "table" or type(spec.options) ~= "table" then
        error(format("%s: spec must be a table with an options list, { options = { {name, kind, default, help}, " ..
                     "... } } (got %s)", fname, type(spec) == "table" and "options = " .. check.show(spec.options)
                     or check.show(spec)), 3)
    end
    for i, o in ipairs(spec.options) do
        local what
        if type(o) ~= "table" then
            what = format(" must be a table {name, kind, default, help} (got %s)", check.show(o))
        elseif type(o[1]) ~= "string" or not o[1]:match("^[%w][%w%-]*$") then
            what = format("[1], its name, must be a string of letters, digits and '-' (got %s)", check.show(o[1]))
        elseif not KINDS[o[2]] then
            what = format("[2], the kind of --%s, must be \"string\", \"integer\", \"number\", \"size\", " ..
                          "\"flag\" or \"list\" (got %s)", o[1], check.show(o[2]))
        elseif o[4] ~= nil and type(o[4]) ~= "string" then
            what = format("[4], the help of --%s, must be a string (got %s)", o[1], check.show(o[4]))
        elseif o.choices ~= nil and type(o.choices) ~= "table" then
            what = format(".choices of --%s must be a list (got %s)", o[1], check.show(o.choices))
        else
            for _, b in ipairs({ "min", "max" }) do
                if type(o[b]) ~= "nil" and not (BOUNDED[o[2]] and type(o[b]) == "number") then
                    what = BOUNDED[o[2]] and format(".%s of --%s must be a number (got %s)", b, o[1], check.show(o[b]))
                        or format(".%s of --%s: only integer, number and size options take a bound (this one is %s)",
                                  b, o[1], o[2])
                    break
                end
            end
        end
        if what then
            error(format("%s: spec.options[%d]%s", fname, i, what), 3)
        end
    end
end

function M.parse_args(spec, argv)
    check_spec("bench.parse_args", spec)
    if type(argv) ~= "table" then
        check.fail("bench.parse_args", "argv must be a list of strings, as arg is", argv)
    end
    for i = 1, #argv do
        if type(argv[i]) ~= "string" then
            check.fail("bench.parse_args", format("argv[%d] must be a string, as arg's are", i), argv[i])
        end
    end
    local opts, by_name = {}, {}
    for _, o in ipairs(spec.options) do
        by_name[o[1]] = o
        local default = o[3]
        if type(default) == "string" and o[2] ~= "string" then  -- "4k" as on the command line
            local err
            default, err = convert(o, o[1], default)
            if default == nil then
                error("bench.parse_args: the default of " .. err, 2)
            end
        end
        opts[o[1]:gsub("-", "_")] = default
    end
    local function fail(msg)
        io.stderr:write((spec.name or "bench"), ": ", msg, " (see --help)\n")
        os.exit(2)
    end
    local i = 1
    while argv[i] do
        local a = argv[i]
        if a == "--help" or a == "-h" then
            io.stdout:write(M.help(spec))
            os.exit(0)
        end
        local name, inline = a:match("^%-%-([%w%-]+)=(.*)$")
        name = name or a:match("^%-%-([%w%-]+)$")
        local o = name and by_name[name]
        if not o then
            fail("unknown option " .. a)
        end
        local key = name:gsub("-", "_")
        if o[2] == "flag" then
            if inline ~= nil then
                fail(format("--%s takes no value (got --%s)", name, a:sub(3)))
            end
            opts[key] = true
        else
            local v = inline
            if v == nil then
                i = i + 1
                v = argv[i]
            end
            if v == nil then
                fail("--" .. name .. " needs a value")
            end
            local err
            v, err = convert(o, name, v)
            if v == nil then
                fail(err)
            end
            if o.choices then
                local ok = false
                for _, c in ipairs(o.choices) do
                    if v == c then ok = true end
                end
                if not ok then
                    local c = o.choices
                    local words = #c > 1 and table.concat(c, ", ", 1, #c - 1) .. " or " .. c[#c] or c[1]
                    fail(format("--%s must be %s (got %s)", name, words, tostring(v)))
                end
            end
            if (o.min and v < o.min) or (o.max and v > o.max) then
                local bound = not o.max and format("at least %s", tostring(o.min))
                    or not o.min and format("at most %s", tostring(o.max))
                    or format("from %s to %s", tostring(o.min), tostring(o.max))
                fail(format("--%s must be %s (got %s)", name, bound, tostring(v)))
            end
            if o.nonempty and v == "" then
                fail(format("--%s must not be empty", name))
            end
            if o.out and v ~= "-" then       -- a report path: find out now, not after the run
                local err = M.writable(v)
                if err then
                    fail(format("--%s: cannot write %s (%s)", name, v, err))
                end
            end
            opts[key] = v
        end
        i = i + 1
    end
    return opts
end

-- host_port("HOST:PORT" or "[v6]:PORT"): host and port, or nil when the
-- text is not that (a port to connect to: 1 to 65535).
function M.host_port(s)
    if type(s) ~= "string" then
        return nil
    end
    local host, port = s:match("^%[?([^%]]+)%]?:(%d+)$")
    port = tonumber(port)
    if not host or not port or port < 1 or port > 65535 then
        return nil
    end
    return host, port
end

function M.help(spec)
    check_spec("bench.help", spec)
    local lines = { spec.usage or "", "", "options:" }
    for _, o in ipairs(spec.options) do
        local arg = o[2] == "flag" and "" or (" " .. o[2]:upper())
        local default = o[3] ~= nil and o[3] ~= false and format(" (default %s)",
            type(o[3]) == "table" and table.concat(o[3], ",") or tostring(o[3])) or ""
        lines[#lines + 1] = format("  --%-22s %s%s", o[1] .. arg, o[4] or "", default)
    end
    lines[#lines + 1] = format("  --%-22s %s", "help", "print this help")
    return table.concat(lines, "\n") .. "\n"
end

---------------------------------------------------------------------------
-- JSON (pluvio.json)
---------------------------------------------------------------------------

-- json(v): v as JSON text.  NaN and infinities become null (JSON has no
-- word for them); a function, a pointer or a cycle raises.
M.json = json.encode

-- json_decode(text): the first value in text, or nil and where it went
-- wrong.
M.json_decode = json.decode

-- write_json(dest, value): the value as one line of JSON to a file, or to
-- stdout when dest is "-".
-- A whole file, or nil and "path: why": a write that fails (a full disk)
-- shows only when the buffered text is written out, at close.
local function write_file(path, text)
    local f, err = io.open(path, "w")
    if not f then
        return nil, err
    end
    local written, werr = f:write(text)
    local closed, cerr = f:close()
    if not written or not closed then
        return nil, path .. ": " .. tostring(werr or cerr)
    end
    return true
end

function M.write_json(dest, value)
    check.string("bench.write_json", "dest", dest)
    check.no_nul("bench.write_json", "dest", dest)  -- (io.open would write the file named by its first part)
    local text = M.json(value) .. "\n"
    if dest == "-" then
        io.stdout:write(text)
        return true
    end
    local ok, err = write_file(dest, text)
    if not ok then
        error("bench.write_json: cannot write " .. err, 2)
    end
    return true
end


---------------------------------------------------------------------------
-- Reports
---------------------------------------------------------------------------

-- Format a figure for people: 1234567 -> "1.23M", 6620.4 -> "6620",
-- seconds -> "12.3 us".  Each unit is chosen by the value as it will be
-- printed (999950 is "1.00M", not "1000.0k"), and no figure is printed
-- with an exponent (%.3g gave "6.62e+03" for a bandwidth of 6620 MiB/s).
function M.human(v, unit)
    if type(v) ~= "number" then
        check.fail("bench.human", "v must be a number", v)
    end
    if type(unit) ~= "nil" and unit ~= "s" then
        check.fail("bench.human", 'unit must be nil or "s" (seconds)', unit)
    end
    if v ~= v or v == HUGE or v == -HUGE then    -- (not "infG", "nan ns")
        return v ~= v and "nan" or v > 0 and "inf" or "-inf"
    end
    local a = math.abs(v)
    if unit == "s" then
        if a < 999.5e-9 then return format("%.0f ns", v * 1e9) end
        if a < 999.995e-6 then return format("%.2f us", v * 1e6) end
        if a < 0.999995 then return format("%.2f ms", v * 1e3) end
        return format("%.2f s", v)
    end
    if a >= 999.995e6 then return format("%.2fG", v / 1e9) end
    if a >= 999.95e3 then return format("%.2fM", v / 1e6) end
    if a >= 9999.5 then return format("%.1fk", v / 1e3) end
    if a >= 999.5 then return format("%.0f", v) end
    if a == floor(a) then return format("%d", v) end
    return format("%.3g", v)
end

-- Byte counts for people: 65536 -> "64 KiB".
function M.bytes(n)
    if type(n) ~= "number" or n ~= n or n == HUGE or n == -HUGE then    -- ("inf KiB", "nan B")
        check.fail("bench.bytes", "n must be a finite number", n)
    end
    local units = { "B", "KiB", "MiB", "GiB", "TiB" }
    local i = 1
    while n >= 1024 and i < #units and n % 1024 == 0 do
        n = n / 1024
        i = i + 1
    end
    if n >= 1024 and i < #units then
        return format("%.1f %s", n / 1024, units[i + 1])
    end
    return format(n % 1 == 0 and "%d %s" or "%g %s", n, units[i])
end

-- A table of rows: columns are the union of the rows' keys in order of
-- first appearance (or cols).
function M.table(rows, cols)
    if type(rows) ~= "table" then
        check.fail("bench.table", "rows must be a list of tables", rows)
    end
    if type(cols) ~= "nil" and type(cols) ~= "table" then   -- (not ~= nil: a NULL pointer equals nil)
        check.fail("bench.table", "cols must be nil or a list of column names", cols)
    end
    for i, r in ipairs(rows) do
        if type(r) ~= "table" then
            check.fail("bench.table", format("rows[%d] must be a table", i), r)
        end
        local units, order = rawget(r, "__units"), rawget(r, "__order")
        if type(units) ~= "nil" and type(units) ~= "table" then
            check.fail("bench.table", format("rows[%d].__units must be nil or a table of units by column", i), units)
        end
        for col, unit in pairs(units or {}) do      -- (human's units: checked here, at the caller's line)
            if unit ~= "s" then
                check.fail("bench.table", format('rows[%d].__units[%s] must be "s" (seconds)', i, check.show(col)),
                           unit)
            end
        end
        if type(order) ~= "nil" then
            if type(order) ~= "table" then
                check.fail("bench.table", format("rows[%d].__order must be nil or a list of column names", i), order)
            end
            for j, name in ipairs(order) do
                if type(name) ~= "string" then
                    check.fail("bench.table", format("rows[%d].__order[%d] must be a column name (a string)", i, j),
                               name)
                end
            end
        end
    end
    for i, name in ipairs(cols or {}) do
        if type(name) ~= "string" then
            check.fail("bench.table", format("cols[%d] must be a column name (a string)", i), name)
        end
    end
    if not cols then
        cols = {}
        local seen = {}
        for _, r in ipairs(rows) do
            for _, k in ipairs(r.__order or {}) do
                if not seen[k] then seen[k] = true; cols[#cols + 1] = k end
            end
        end
    end
    local widths, cells = {}, {}
    for c, name in ipairs(cols) do widths[c] = #name end
    for r, row in ipairs(rows) do
        cells[r] = {}
        for c, name in ipairs(cols) do
            local v = row[name]
            local s = v == nil and "-" or type(v) == "number" and M.human(v, row.__units and row.__units[name]) or tostring(v)
            cells[r][c] = s
            if #s > widths[c] then widths[c] = #s end
        end
    end
    local out = {}
    local line = {}
    for c, name in ipairs(cols) do line[c] = format("%-" .. widths[c] .. "s", name) end
    out[1] = table.concat(line, "  ")
    for r = 1, #rows do
        for c = 1, #cols do line[c] = format("%" .. widths[c] .. "s", cells[r][c]) end
        out[#out + 1] = table.concat(line, "  ")
    end
    return table.concat(out, "\n") .. "\n"
end

---------------------------------------------------------------------------
-- Progress on a terminal
---------------------------------------------------------------------------

local Progress = {}
Progress.__index = Progress

-- progress(label[, quiet]): a progress line on stderr, shown only on a
-- terminal, after the first second, at most 4 times a second.
function M.progress(label, quiet)
    check.string("bench.progress", "label", label)
    return setmetatable({ label = label, t0 = C.pl_now(), last = 0,
                          on = not quiet and ffi.C.isatty(2) == 1, shown = false }, Progress)
end

function Progress:update(text)
    check.self("Progress:update", self, Progress, "a progress line")
    if not self.on then return end
    local now = C.pl_now()
    if now - self.t0 < 1 or now - self.last < 0.25 then return end
    self.last = now
    self.shown = true
    io.stderr:write(format("\r%s: %s  [%.0f s]\27[K", self.label, text, now - self.t0))
end

function Progress:done()
    check.self("Progress:done", self, Progress, "a progress line")
    if self.shown then io.stderr:write("\r\27[K") end
end

---------------------------------------------------------------------------
-- SVG: latency distribution and throughput over time, no dependency
---------------------------------------------------------------------------

local function svg_escape(s)
    return (tostring(s):gsub("[<>&]", { ["<"] = "&lt;", [">"] = "&gt;", ["&"] = "&amp;" }))
end

-- svg(path, { title = ..., histogram = h, series = { {t, value}, ... },
-- series_label = "MiB/s" }): two panels side by side.
function M.svg(path, spec)
    check.string("bench.svg", "path", path)
    check.no_nul("bench.svg", "path", path)
    if type(spec) ~= "table" then
        check.fail("bench.svg", "spec must be a table", spec)
    end
    -- (type() ~= "nil", not ~= nil: a NULL pointer equals nil)
    if type(spec.histogram) ~= "nil" and getmetatable(spec.histogram) ~= Histogram then
        check.fail("bench.svg", "spec.histogram must be a bench.Histogram", spec.histogram)
    end
    if type(spec.series) ~= "nil" then
        if type(spec.series) ~= "table" then
            check.fail("bench.svg", "spec.series must be a list of {t, value} pairs", spec.series)
        end
        for i, e in ipairs(spec.series) do
            local t, v = type(e) == "table" and e[1], type(e) == "table" and e[2]
            if type(t) ~= "number" or type(v) ~= "number" or t ~= t or v ~= v or
                    t == HUGE or t == -HUGE or v == HUGE or v == -HUGE then     -- (NaN wrote "nan" coordinates)
                check.fail("bench.svg", format("spec.series[%d] must be a pair of finite numbers {t, value}", i), e)
            end
        end
    end
    for _, k in ipairs({ "title", "series_label" }) do
        if type(spec[k]) ~= "nil" and type(spec[k]) ~= "string" then
            check.fail("bench.svg", format("spec.%s must be nil or a string", k), spec[k])
        end
    end
    local W, H, pad = 960, 360, 50
    local pw = (W - 3 * pad) / 2
    local out = { format('<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" font-family="sans-serif" font-size="12">', W, H),
                  format('<rect width="%d" height="%d" fill="white"/>', W, H),
                  format('<text x="%d" y="20" font-size="15">%s</text>', pad, svg_escape(spec.title or "pluvio benchmark")) }
    local function axes(x0, title)
        out[#out + 1] = format('<rect x="%g" y="%d" width="%g" height="%d" fill="none" stroke="#888"/>', x0, pad, pw, H - 2 * pad)
        out[#out + 1] = format('<text x="%g" y="%d">%s</text>', x0, pad - 8, svg_escape(title))
    end
    -- latency: log-x CDF from the histogram buckets
    axes(pad, "latency CDF (log time)")
    local b = spec.histogram and spec.histogram:buckets() or {}
    if #b > 0 then
        local total = 0
        for _, e in ipairs(b) do total = total + e[2] end
        local lmin, lmax = math.log10(math.max(b[1][1], 1e-9)), math.log10(math.max(b[#b][1], 1e-9) * 1.01)
        if lmax <= lmin then lmax = lmin + 1 end
        local pts, acc = {}, 0
        for _, e in ipairs(b) do
            acc = acc + e[2]
            local x = pad + (math.log10(math.max(e[1], 1e-9)) - lmin) / (lmax - lmin) * pw
            local y = H - pad - acc / total * (H - 2 * pad)
            pts[#pts + 1] = format("%.1f,%.1f", x, y)
        end
        out[#out + 1] = format('<polyline fill="none" stroke="#1f77b4" stroke-width="2" points="%s"/>', table.concat(pts, " "))
        out[#out + 1] = format('<text x="%d" y="%d">%s</text>', pad, H - pad + 16, M.human(10 ^ lmin, "s"))
        out[#out + 1] = format('<text x="%g" y="%d" text-anchor="end">%s</text>', pad + pw, H - pad + 16, M.human(10 ^ lmax, "s"))
    end
    -- throughput over time
    local x1 = 2 * pad + pw
    axes(x1, "throughput over time" .. (spec.series_label and (" (" .. spec.series_label .. ")") or ""))
    local s = spec.series or {}
    if #s > 1 then
        local tmax, vmax = s[#s][1], 0
        for _, e in ipairs(s) do if e[2] > vmax then vmax = e[2] end end
        if vmax <= 0 then vmax = 1 end
        if tmax <= 0 then tmax = 1 end
        local pts = {}
        for _, e in ipairs(s) do
            pts[#pts + 1] = format("%.1f,%.1f", x1 + e[1] / tmax * pw, H - pad - e[2] / vmax * (H - 2 * pad))
        end
        out[#out + 1] = format('<polyline fill="none" stroke="#d62728" stroke-width="2" points="%s"/>', table.concat(pts, " "))
        out[#out + 1] = format('<text x="%g" y="%d">%s</text>', x1 - 4, pad + 4, M.human(vmax))
        out[#out + 1] = format('<text x="%g" y="%d" text-anchor="end">%.1f s</text>', x1 + pw, H - pad + 16, tmax)
    end
    out[#out + 1] = "</svg>"
    local ok, err = write_file(path, table.concat(out, "\n") .. "\n")
    if not ok then
        return nil, "svg: cannot write " .. err
    end
    return true
end

-- checksum(data): 64-bit checksum of a string, as 16 hex digits.
function M.checksum(data)
    check.string("bench.checksum", "data", data)
    return require("bit").tohex(C.pl_checksum64(data, #data, 0), 16)
end

-- CPU seconds used by this process (user + system).
function M.cpu_time()
    return os.clock()
end

return M
