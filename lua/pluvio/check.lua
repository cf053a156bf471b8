-- pluvio.check: argument checks shared by the modules.  Each raises at the
-- caller's caller (the user's line) with the function, the argument and the
-- rule it broke.
local M = {}

local type, floor, tostring, format, pcall = type, math.floor, tostring, string.format, pcall

-- A value as an error message shows it: a long string by its start and
-- its length (a 1 MB mode string made a 1 MB message).
local SHOW_MAX = 200

local function show(v)
    if type(v) == "string" then
        if #v > SHOW_MAX then
            return format("%q... (%d bytes)", v:sub(1, 60), #v)
        end
        return format("%q", v)
    elseif type(v) == "number" and v % 1 == 0 and v > -2 ^ 64 and v < 2 ^ 64 then
        return format("%.0f", v)    -- every digit: tostring writes 2^53 as 9.007199254741e+15
    end
    -- A __tostring that raises (or returns no string) would replace the
    -- message about the argument with its own error.
    local ok, s = pcall(tostring, v)
    if not ok then
        return format("a %s whose __tostring failed", type(v))
    end
    return s
end
M.show = show

-- "host:port", or "[host]:port" for an IPv6 address, as listeners' and
-- sockets' address() write it: "::1:42201" reads as an address of its own.
function M.host_port(host, port)
    if host:find(":", 1, true) then
        return format("[%s]:%d", host, port)
    end
    return format("%s:%d", host, port)
end

-- nil, message, "EINVAL" for a listener or socket whose host stands for the
-- wildcard address without naming it (pl_net_unasked_wildcard).
function M.wildcard_refused(what, host, port)
    return nil, format("%s %s: host %s stands for the wildcard address (every interface) without " ..
                       "naming it; write \"0.0.0.0\" or \"::\" to mean every interface", what,
                       M.host_port(host, port), show(host)), "EINVAL"
end

-- Raise "fname: what (got v)" at the user's level (level 3: the user called
-- fname, fname called the check).
function M.fail(fname, what, v, level)
    error(format("%s: %s (got %s)", fname, what, show(v)), level or 3)
end

function M.integer(fname, argname, v, min, max, level)
    if type(v) ~= "number" or v ~= v or floor(v) ~= v or v < min or v > max then
        error(format("%s: %s must be an integer from %d to %d (got %s)",
                     fname, argname, min, max, show(v)), level or 3)
    end
    return v
end

function M.number(fname, argname, v, min, max)
    if type(v) ~= "number" or v ~= v or v < min or v > max then
        local range = max == math.huge and format(">= %g", min) or format("from %g to %g", min, max)
        error(format("%s: %s must be a finite number %s (got %s)", fname, argname, range, show(v)), 3)
    end
    return v
end

function M.func(fname, argname, v)
    if type(v) ~= "function" then
        error(format("%s: %s must be a function (got %s)", fname, argname, type(v)), 3)
    end
    return v
end

function M.string(fname, argname, v, level)
    if type(v) ~= "string" then
        error(format("%s: %s must be a string (got %s)", fname, argname, type(v)), level or 3)
    end
    return v
end

-- A string C reads up to its first NUL (a path, a host): "x\0.bak" would act
-- on x, "127.0.0.1\0junk" would bind or connect to 127.0.0.1.
function M.no_nul(fname, argname, s, level)
    if s:find("\0", 1, true) then
        error(format("%s: %s must not contain a NUL byte (got %s)", fname, argname, show(s)), level or 3)
    end
    return s
end

-- A host to bind or connect to: an address or a name, never "" (which
-- resolves to a wildcard or nothing, depending on the call).  Returns it,
-- without the brackets of an IPv6 address written as host:port strings
-- write it ("[::1]", from "[::1]:42201"), which the resolver does not take.
function M.host(fname, host, level)
    level = level or 3
    if type(host) ~= "string" or host == "" then
        error(format("%s: host must be an address or a name, e.g. \"127.0.0.1\" or \"::1\" (got %s)",
                     fname, show(host)), level)
    end
    M.no_nul(fname, "host", host, level + 1)  -- (not a tail call: the level counts this frame)
    return host:match("^%[([^%]]*:[^%]]*)%]$") or host
end

function M.self(fname, v, mt, what, level)
    if getmetatable(v) ~= mt then
        error(format("%s: call it as a method on %s (obj:%s(...)); got %s as self",
                     fname, what, fname:match("[:.](.*)$") or fname, type(v)), level or 3)
    end
    return v
end

-- self as check.self takes it, and made by pluvio: its C handle (field
-- key) is there.  A table given the metatable by hand has none, and C
-- would follow a NULL pointer.  maker: how such objects are made.
function M.made(fname, v, mt, what, key, maker, level)
    level = level or 3
    M.self(fname, v, mt, what, level + 1)
    if type(rawget(v, key)) ~= "cdata" then
        error(format("%s: self has the metatable of %s but is none (make %s)", fname, what, maker), level)
    end
    return v
end

return M
