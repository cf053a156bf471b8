-- pluvio.json: JSON for reports (tables, arrays, strings, numbers,
-- booleans), without a dependency.  pluvio.bench hands it out as
-- bench.json, bench.json_decode and bench.write_json; its messages name
-- those.
local check = require "pluvio.check"

local format, type, tostring, pairs, ipairs = string.format, type, tostring, pairs, ipairs
local floor = math.floor
local jit = require "jit"

local M = {}


-- The length of v as a JSON array: its keys are the integers 1..n, with
-- holes (null) in at most half of them; nil for an object.  (# and ipairs
-- would drop the other keys, and what follows a hole.)
local function array_length(v)
    local n, count = 0, 0
    for k in pairs(v) do
        if type(k) ~= "number" or k < 1 or k % 1 ~= 0 then
            return nil
        end
        n = k > n and k or n
        count = count + 1
    end
    return n <= 2 * count and n or nil
end

local encode

-- A value JSON cannot hold (a function, a cycle): raise, naming where it is.
local function unencodable(path, what)
    error({ json_error = format("%s at %s", what, path == "" and "the top" or path) })
end

local function encode_table(v, out, seen, path)
    if seen[v] then
        unencodable(path, "a table that holds itself (a cycle)")
    end
    seen[v] = true
    local n = array_length(v)
    if n then
        out[#out + 1] = "["
        for i = 1, n do
            if i > 1 then out[#out + 1] = "," end
            encode(v[i], out, seen, path .. "[" .. i .. "]")
        end
        out[#out + 1] = "]"
    else
        local keys, by_name = {}, {}
        for k in pairs(v) do
            local name = tostring(k)
            keys[#keys + 1] = name
            by_name[name] = k
        end
        table.sort(keys)
        out[#out + 1] = "{"
        for i, name in ipairs(keys) do
            if i > 1 then out[#out + 1] = "," end
            encode(name, out, seen, path)
            out[#out + 1] = ":"
            encode(v[by_name[name]], out, seen, path .. "." .. name)
        end
        out[#out + 1] = "}"
    end
    seen[v] = nil
end

function encode(v, out, seen, path)
    local t = type(v)
    if t == "table" then
        encode_table(v, out, seen, path)
    elseif t == "string" then
        out[#out + 1] = '"' .. v:gsub('[%c"\\]', function(c)
            return ({ ['"'] = '\\"', ["\\"] = "\\\\", ["\n"] = "\\n", ["\t"] = "\\t" })[c]
                or format("\\u%04x", c:byte())
        end) .. '"'
    elseif t == "number" then
        if v ~= v or v == math.huge or v == -math.huge then
            out[#out + 1] = "null"
        elseif v == floor(v) and math.abs(v) < 2 ^ 53 then
            out[#out + 1] = format("%d", v)
        else    -- the fewest digits that read back as v (%.9g lost a clock's microseconds)
            local text
            for digits = 15, 17 do
                text = format("%." .. digits .. "g", v)
                if tonumber(text) == v then break end
            end
            out[#out + 1] = text
        end
    elseif t == "boolean" then
        out[#out + 1] = tostring(v)
    elseif t == "cdata" and tonumber(v) then     -- (a 64-bit integer)
        encode(tonumber(v), out, seen, path)
    elseif t == "nil" then
        out[#out + 1] = "null"
    else    -- (a function, a pointer: null would hide the mistake)
        unencodable(path, "a " .. t .. " (" .. tostring(v) .. "), which JSON cannot hold,")
    end
end

-- The encoder runs in the interpreter: Debian's LuaJIT (2.1.0-beta3, a
-- 2022 snapshot) can compile a walk of a small table, by pairs() or by
-- next(), into code that reads a key after the next step overwrote it:
-- { 1, 2 } then came out as {"1":1,"2":2}, or as [1], in about 1 of 100
-- runs of examples_spec (seen in the trace: two calls of lj_vm_next, the
-- first key compared after the second).  Reports are not hot paths.
jit.off(array_length)
jit.off(encode_table)
jit.off(encode)

-- json(v): v as JSON text.  NaN and infinities become null (JSON has no
-- word for them); a function, a pointer or a cycle raises.
function M.encode(v)
    local out = {}
    local ok, err = pcall(encode, v, out, {}, "")
    if not ok then
        if type(err) == "table" and err.json_error then
            error("bench.json: cannot encode " .. err.json_error, 2)
        end
        error(err, 0)
    end
    return table.concat(out)
end

-- A code point as UTF-8 (a lone surrogate as the three bytes it would take).
local function utf8(c)
    local char = string.char
    if c < 0x80 then
        return char(c)
    elseif c < 0x800 then
        return char(0xc0 + floor(c / 0x40), 0x80 + c % 0x40)
    elseif c < 0x10000 then
        return char(0xe0 + floor(c / 0x1000), 0x80 + floor(c / 0x40) % 0x40, 0x80 + c % 0x40)
    end
    return char(0xf0 + floor(c / 0x40000), 0x80 + floor(c / 0x1000) % 0x40,
                0x80 + floor(c / 0x40) % 0x40, 0x80 + c % 0x40)
end

-- json_decode(text): the first value in text (what follows it is ignored:
-- tools print lines after their report), or nil and where it went wrong
-- (enough for reading fio's and our own reports).
local MAX_DEPTH = 200     -- (reports nest a few levels; a deep enough text overflowed the Lua stack)

function M.decode(text)
    check.string("bench.json_decode", "text", text)
    local pos = 1
    local function ws() pos = text:find("[^ \t\r\n]", pos) or #text + 1 end
    local value
    local function err(what) error({ json_error = ("%s at byte %d"):format(what, pos) }) end
    local function hex4(at)
        local digits = text:sub(at, at + 3)
        return digits:match("^%x%x%x%x$") and tonumber(digits, 16) or err("bad \\u escape")
    end
    local function str()
        local out, i = {}, pos + 1
        while true do
            local c = text:sub(i, i)
            if c == "" then err("unterminated string") end
            if c == '"' then pos = i + 1; return table.concat(out) end
            if c == "\\" then
                local e = text:sub(i + 1, i + 1)
                local map = { n = "\n", t = "\t", r = "\r", b = "\b", f = "\f", ["/"] = "/", ["\\"] = "\\", ['"'] = '"' }
                if e == "u" then
                    local code = hex4(i + 2)
                    i = i + 6
                    if code >= 0xd800 and code < 0xdc00 and text:sub(i, i + 1) == "\\u" then
                        local low = hex4(i + 2)  -- a surrogate pair: one code point
                        if low >= 0xdc00 and low < 0xe000 then
                            code = 0x10000 + (code - 0xd800) * 0x400 + (low - 0xdc00)
                            i = i + 6
                        end
                    end
                    out[#out + 1] = utf8(code)
                else
                    out[#out + 1] = map[e] or err("bad escape")
                    i = i + 2
                end
            else
                out[#out + 1] = c
                i = i + 1
            end
        end
    end
    local depth = 0
    function value()
        ws()
        local c = text:sub(pos, pos)
        if c == "{" or c == "[" then
            depth = depth + 1
            if depth > MAX_DEPTH then err(format("nested deeper than %d levels", MAX_DEPTH)) end
        end
        if c == "{" then
            local t = {}
            pos = pos + 1; ws()
            if text:sub(pos, pos) == "}" then pos = pos + 1; depth = depth - 1; return t end
            while true do
                ws()
                if text:sub(pos, pos) ~= '"' then err("expected a key") end
                local k = str(); ws()
                if text:sub(pos, pos) ~= ":" then err("expected ':'") end
                pos = pos + 1
                t[k] = value(); ws()
                local d = text:sub(pos, pos); pos = pos + 1
                if d == "}" then depth = depth - 1; return t end
                if d ~= "," then err("expected ',' or '}'") end
            end
        elseif c == "[" then
            local t = {}
            pos = pos + 1; ws()
            if text:sub(pos, pos) == "]" then pos = pos + 1; depth = depth - 1; return t end
            local n = 0     -- (not #t: a null leaves a hole, and the values after it keep their place)
            while true do
                n = n + 1
                t[n] = value(); ws()
                local d = text:sub(pos, pos); pos = pos + 1
                if d == "]" then depth = depth - 1; return t end
                if d ~= "," then err("expected ',' or ']'") end
            end
        elseif c == '"' then
            return str()
        elseif text:sub(pos, pos + 3) == "true" then pos = pos + 4; return true
        elseif text:sub(pos, pos + 4) == "false" then pos = pos + 5; return false
        elseif text:sub(pos, pos + 3) == "null" then pos = pos + 4; return nil
        end
        local num = text:match("^-?%d+%.?%d*[eE]?[-+]?%d*", pos)
        if not num or num == "" then err("unexpected character") end
        pos = pos + #num
        return tonumber(num)
    end
    local ok, v = pcall(value)
    if not ok then
        if type(v) == "table" and v.json_error then return nil, v.json_error end
        error(v, 0)
    end
    return v
end

return M
