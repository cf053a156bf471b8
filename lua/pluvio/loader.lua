-- pluvio.loader: LuaJIT's require written in Lua, so that a module's top
-- level may wait (pluvio.sleep, a file read, a connect).  LuaJIT's require
-- is a C function that runs the module's chunk through lua_call: a yield
-- there raises "attempt to yield across C-call boundary".  This one calls
-- the chunk from Lua.  pluvio.require is it; the host makes it the global
-- require of the scripts it runs (never the module: plain luajit and busted
-- keep LuaJIT's).
--
-- It follows lib_package.c's require step by step: the registry's _LOADED
-- (package.loaded) first; then each function of package.loaders, called
-- with the name, whose string results make the "module 'x' not found:"
-- message; LuaJIT's own sentinel in package.loaded while the chunk runs,
-- so a loop, and a second require after a failed load, raise "loop or
-- previous error loading module 'x'" (from LuaJIT's require too); the
-- chunk called with the name, its non-nil result stored, else true.
--
-- Beyond LuaJIT: a task that requires a module another task of the same
-- runtime is loading waits until that load ends, then takes its module or
-- the loop-or-previous-error; it never sees a half-loaded one.
local M = {}

local type, tostring, pcall, rawget, error, select = type, tostring, pcall, rawget, error, select
local format = string.format
local walk = next          -- walk tables with `for k, v in walk, t`, not pairs(): see task.lua

-- The tables LuaJIT's require reads: _LOADED from the registry (which
-- package.loaded is, unless a script replaces the field) and loaders from
-- the package table it was made with.
local loaded = debug.getregistry()._LOADED or package.loaded
local pkg = package

-- Pluvio's own modules, as debug.getinfo names their source ("@.../pluvio/").
local own_source = (debug.getinfo(1, "S").source:match("^(@.*pluvio/)loader%.lua$"))

-- The value LuaJIT's require keeps in package.loaded[name] while it runs
-- name's chunk (a light userdata; this LuaJIT's type() calls it a number),
-- taken from a load it makes of a preloaded probe.  Sharing it, LuaJIT's
-- require and this one see each other's loads in progress and failed.
-- Where that cannot be had (require is not LuaJIT's C function), a value
-- of our own.
local function luajit_sentinel()
    local c_require = require
    if type(c_require) ~= "function" or debug.getinfo(c_require, "S").what ~= "C"
        or type(pkg.preload) ~= "table" then
        return nil
    end
    local probe, seen = "pluvio.loader: sentinel probe", nil
    pkg.preload[probe] = function() seen = loaded[probe] end
    local ok = pcall(c_require, probe)
    pkg.preload[probe] = nil
    loaded[probe] = nil
    if ok and seen and seen ~= true and seen == seen then
        return seen
    end
    return nil
end
local SENTINEL = luajit_sentinel() or newproxy()

-- The level require raises its own errors at (error(msg, level) in
-- require): its caller's position in front of the message, as luaL_error
-- puts it; none where LuaJIT's caller would be C, not Lua: under a chunk
-- that tail-calls require lies this module (which runs the chunk) or the
-- host.
local function caller_level()
    local info = debug.getinfo(3, "S")  -- (caller_level, require, require's caller)
    if info and own_source and info.source:sub(1, #own_source) == own_source then
        return 0
    end
    return 2
end

-- The loader of name from the first of package.loaders that finds it; or
-- nil, require's error and the level to raise it at.  Each is called as
-- LuaJIT calls it, with the name and one result kept, through pcall: an
-- error it raises (a syntax error in the file) then has no position of
-- this module's, as it has none of LuaJIT's C require.
local function find_loader(name)
    local loaders = pkg.loaders
    if type(loaders) ~= "table" then
        return nil, "'package.loaders' must be a table"
    end
    local tried = ""
    for i = 1, math.huge do
        local searcher = rawget(loaders, i)
        if searcher == nil then
            return nil, format("module '%s' not found:%s", name, tried)
        end
        local ok, found = pcall(searcher, name)
        if not ok then
            return nil, found, 0
        end
        if type(found) == "function" then
            return found
        elseif type(found) == "string" or type(found) == "number" then
            tried = tried .. found
        end
    end
end

-- Loads in progress in tasks: name -> { task, rt, waiters }.  A record
-- goes when its load ends, however it ends; its waiters are woken then.
local loading = {}
local watched = setmetatable({}, { __mode = "k" })  -- tasks whose end ends their loads

local function end_load(name, rec)
    if loading[name] == rec then
        loading[name] = nil
    end
    for i = 1, #rec.waiters do
        rec.waiters[i]:wake()
    end
end

-- A task killed in the middle of a load never returns to end it.
local function ended(task)
    for name, rec in walk, loading do
        if rec.task == task then
            end_load(name, rec)
        end
    end
end

-- require(name) for the pluvio module p (p.current, p.runtime, p.suspend).
function M.new(p)
    local current, runtime, suspend = p.current, p.runtime, p.suspend

    -- Wait for the load another task of this runtime makes of name; false
    -- when there is none to wait for (a loop, a failed load, outside tasks).
    local function waited(name)
        local rec = loading[name]
        local me = rec and current()
        if not me or rec.task == me or rec.rt ~= runtime() then
            return false
        end
        rec.waiters[#rec.waiters + 1] = me
        local what = format("require '%s' (task %q loads it)", name, rec.task:name())
        repeat
            suspend(what)
        until loading[name] ~= rec
        return true
    end

    -- The load of name by the running task, if any, which other tasks can
    -- wait for.
    local function start_load(name)
        local me = current()
        if not me then
            return nil
        end
        local rec = { task = me, rt = runtime(), waiters = {} }
        loading[name] = rec
        if not watched[me] then
            watched[me] = true
            me:on_exit(ended)
        end
        return rec
    end

    -- (Errors are raised here, not in helpers: a traceback then shows the
    -- caller, require, and the error.)
    return function(...)
        local name = ...
        if type(name) == "number" then
            name = tostring(name)
        elseif type(name) ~= "string" then
            error(format("bad argument #1 to '%s' (string expected, got %s)",
                         debug.getinfo(1, "n").name or "?",
                         select("#", ...) == 0 and "no value" or type(name)), caller_level())
        end
        local v = loaded[name]
        while v and v == SENTINEL do
            if not waited(name) then
                error(format("loop or previous error loading module '%s'", name), caller_level())
            end
            v = loaded[name]
        end
        if v then
            return v
        end
        local loader, err, level = find_loader(name)
        if not loader then
            error(err, level or caller_level())
        end
        loaded[name] = SENTINEL
        local rec = start_load(name)
        -- Caught to end the load (and wake its waiters) whatever happens,
        -- also when the caller catches the error and goes on; raised again
        -- as it came, with the module's position.
        local ok, result = pcall(loader, name)
        if rec then
            end_load(name, rec)
        end
        if not ok then
            error(result, 0)
        end
        if result ~= nil then
            loaded[name] = result
        end
        v = loaded[name]
        if v == SENTINEL then
            v = true
            loaded[name] = v
        end
        return v
    end
end

return M
