-- The public API, name by name, for docs_spec: names() lists it;
-- install(path), run in a documentation example before its code, wraps
-- each public function so that its first call appends its name to path.
-- "Every public function has an example that runs" is then checked by
-- calls, not by a word that any method of the same name would match.
local M = {}

M.MODULES = { "pluvio", "pluvio.uring", "pluvio.ucx", "pluvio.bench", "pluvio.channel" }

-- The classes whose objects only a function gives (no module field holds
-- the class): their methods are walked through an object's metatable.
M.OBJECTS = {
    { "pluvio.uring.IoUringReactor.builder()", function() return require("pluvio.uring").IoUringReactor.builder() end },
    { "pluvio.bench.progress()", function() return require("pluvio.bench").progress("api_trace", true) end },
}

-- Everything reachable from the modules without a leading underscore, as
-- { qualified name, key, table, value } (a class's methods through its
-- metatable's __index too; each table once).  A table that holds
-- functions is a class: its methods are listed, and its name if a module
-- holds it (docs_spec wants that named in an example).
function M.walk()
    local entries, seen = {}, {}
    local function walk(prefix, t, depth)
        if seen[t] then return end
        seen[t] = true
        local keys = {}
        for k in pairs(t) do
            if type(k) == "string" and k:sub(1, 1) ~= "_" then keys[#keys + 1] = k end
        end
        table.sort(keys)
        for _, k in ipairs(keys) do
            local v = rawget(t, k)
            if v == nil then v = t[k] end
            if type(v) == "table" then
                local class = false
                for _, f in pairs(v) do class = class or type(f) == "function" end
                if depth == 0 then entries[#entries + 1] = { prefix .. "." .. k, k, t, v } end
                if depth < 2 then walk(prefix .. "." .. k, v, depth + 1) end
            elseif type(v) == "function" or type(v) == "cdata" or depth == 0 then
                entries[#entries + 1] = { prefix .. "." .. k, k, t, v }
            end
        end
        local mt = getmetatable(t)
        if type(mt) == "table" and type(mt.__index) == "table" then walk(prefix, mt.__index, depth) end
    end
    for _, m in ipairs(M.MODULES) do
        walk(m, require(m), 0)
    end
    for _, o in ipairs(M.OBJECTS) do
        walk(o[1], getmetatable(o[2]()).__index, 1)
    end
    return entries
end

-- Wrap the public functions: a tail call, so that the positions of errors
-- and the frames the runtime counts are those of the caller's call.  One
-- wrapper per function, which records every name it has, and which also
-- replaces it where a global holds it (the host's require is
-- pluvio.require): what was the same function stays the same.
function M.install(path)
    local used, names, wrappers = {}, {}, {}
    local function record(name)
        if not used[name] then
            used[name] = true
            local out = io.open(path, "a")
            if out then
                out:write(name, "\n")
                out:close()
            end
        end
    end
    for _, e in ipairs(M.walk()) do
        local name, key, t, f = e[1], e[2], e[3], e[4]
        if type(f) == "function" and rawget(t, key) == f then
            local list = names[f]
            if not list then
                list = {}
                names[f] = list
                local seen = false
                wrappers[f] = function(...)
                    -- a call from the example's code, not one another public
                    -- function makes for it (uring.acquire_buffer calls the
                    -- reactor's, register_reactor calls attach): those do
                    -- not show the function in use.  (By the calling
                    -- function, not its file: an example's closure that
                    -- tail-calls leaves Pluvio's task start as the caller.)
                    local caller = debug.getinfo(2, "f")
                    if not seen and not (caller and names[caller.func]) then
                        seen = true
                        for i = 1, #list do record(list[i]) end
                    end
                    return f(...)
                end
            end
            list[#list + 1] = name
            rawset(t, key, wrappers[f])
        end
    end
    for k, v in pairs(_G) do
        if wrappers[v] then rawset(_G, k, wrappers[v]) end
    end
end

return M
