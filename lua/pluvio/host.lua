-- pluvio.host: the Lua half of the `pluvio` binary (src/main.c parses the
-- command line and calls main).  Runs -l / -e actions and the script inside
-- the main task of a default runtime and turns the outcome into an exit
-- status.
local M = {}

local format = string.format
local walk = next          -- walk tables with `for k, v in walk, t`, not pairs(): see task.lua

local function pack(...)
    return { n = select("#", ...), ... }
end

-- loadfile() reads standard input as luajit's `-` does: a read failure is
-- its error ("cannot read stdin: Is a directory"), not a nil given to load.
-- A standard input the parent closed (the host put /dev/null there) gives
-- luajit's error too, not an empty script.
local function load_script(script, stdin_closed)
    if script == "-" then
        if stdin_closed then
            return nil, "cannot read stdin: Bad file descriptor"
        end
        return loadfile()
    end
    return loadfile(script)
end

-- Statistics and live tasks, as `pluvio --stats` prints them at exit.
function M.format_stats(rt)
    local s = rt:stats()
    local lines = {
        format("pluvio: tasks: %d spawned, %d finished (%d failed, %d cancelled), %d live",
               s.tasks_spawned, s.tasks_finished, s.tasks_failed, s.tasks_cancelled, s.tasks_live),
        format("pluvio: loop: %d ticks, %d resumes, %d lingers, %d wakes, %d timers fired, %d idle waits, " ..
               "%.6f s blocked", s.ticks, s.resumes, s.lingers, s.wakes, s.timers_fired, s.idle_waits,
               s.time_blocked),
    }
    local names = {}
    for name in walk, s.reactors do
        names[#names + 1] = name
    end
    table.sort(names)
    for _, name in ipairs(names) do
        local r = s.reactors[name]
        local extra = {}
        for k, v in walk, r do
            if k ~= "kind" and k ~= "status" and k ~= "polls" and k ~= "completions" then
                extra[#extra + 1] = format("%s=%s", k, tostring(v))
            end
        end
        table.sort(extra)
        lines[#lines + 1] = format("pluvio: reactor %s (%s): %s, %d polls, %d completions%s",
                                   name, r.kind, r.status, r.polls, r.completions,
                                   #extra > 0 and ", " .. table.concat(extra, ", ") or "")
    end
    local tasks = rt:tasks()
    lines[#lines + 1] = format("pluvio: %d live task%s", #tasks, #tasks == 1 and "" or "s")
    for _, t in ipairs(tasks) do
        lines[#lines + 1] = format("pluvio:   %s #%d %s%s, %d resumes, %.6f s running",
                                   t.name, t.id, t.state, t.waits_on and (" on " .. t.waits_on) or "",
                                   t.resumes, t.run_time)
    end
    return table.concat(lines, "\n") .. "\n"
end

-- A function that returns the next line of standard input, or nil at its
-- end.  It reads through the runtime (uring.read_some): the prompt waits
-- like any task, so the tasks started at the prompt run while the user
-- types.  A line ended by Ctrl-D rather than a newline waits for the rest.
local function stdin_lines()
    local uring = require "pluvio.uring"
    local pending = ""
    return function()
        while true do
            local nl = pending:find("\n", 1, true)
            if nl then
                local line = pending:sub(1, nl - 1)
                pending = pending:sub(nl + 1)
                return line
            end
            local data = uring.read_some(0, 4096)
            if not data or data == "" then  -- the end of input (a read error ends it too)
                local last = pending ~= "" and pending or nil
                pending = ""
                return last
            end
            pending = pending .. data
        end
    end
end

-- A line as an expression whose values are printed, or nil.  Its values are
-- the arguments of a call, not a return list: `return f()` would be a tail
-- call, and an error raised in f would lose luajit's stdin:1: position.  (The
-- newline ends a trailing comment; a trailing ';' is allowed as after return.)
local function load_expression(code)
    code = code:gsub(";%s*$", "")
    -- (the ")" on the line itself: after a newline, LuaJIT gave the
    -- expression's errors the next line, stdin:2; the newline is only for
    -- a line that ends in a comment)
    local f, err = load("return (function(...) return ... end)(" .. code .. ")", "=stdin")
    if not f then
        f, err = load("return (function(...) return ... end)(" .. code .. "\n)", "=stdin")
    end
    return f, err
end

-- The prompt's input as a function: an expression whose values are
-- printed, else a statement (`=expr` is `return expr`); or nil and the
-- statement's syntax error.
local function load_input(input)
    local code = input:gsub("^=", "")
    local f, err = load_expression(code)
    if not f then
        f, err = load(input:match("^=") and "return " .. code or code, "=stdin")
    end
    return f, err
end

-- A value or an error as the prompt and the host's report print it.  A
-- __tostring that raises or returns no string is reported in its place: it
-- must not end the prompt (and with it the tasks started there), nor pass
-- off its own error as the script's.
local function shown(v)
    local ok, s = pcall(tostring, v)
    if not ok then
        return "(cannot print a " .. type(v) .. ": its __tostring raised " ..
               (type(s) == "string" and s or type(s)) .. ")"
    elseif type(s) ~= "string" and type(s) ~= "number" then
        return "(cannot print a " .. type(v) .. ": its __tostring returned a " .. type(s) .. ")"
    end
    return s
end

-- An uncaught error as the host reports it: a string, a number or an
-- object with __tostring as shown() prints it; any other object in lua.c's
-- words, not an address ("table: 0x...") that reads like the message.
local function error_shown(e)
    local t = type(e)
    local mt = debug.getmetatable(e)
    if t ~= "string" and t ~= "number" and not (mt and mt.__tostring) then
        return "(error object is a " .. t .. " value)"
    end
    local s = shown(e)
    while true do       -- the host's own frames under an -e chunk or -l module: not the user's
        local cut = s:match("^(.*)\n\t[^\n]*pluvio/host%.lua:%d+: in [^\n]*$")
        if not cut then     -- (an -l module's error: the host's error() was all of its traceback)
            return s:match("^(.*)\nstack traceback:\n\t%[C%]: in function 'error'$") or s
        end
        s = cut
    end
end

-- Ctrl-C at the prompt (pl_interrupt_watch): a task reads the interrupts;
-- one kills the statement that runs, or, while the prompt waits for a line,
-- drops the statement typed so far and prompts afresh.  A second Ctrl-C
-- before that task could run (a statement that never yields) ends the
-- host, as Ctrl-C did before.  nil when SIGINT cannot be watched.
local function watch_interrupts(pluvio)
    local C = require("pluvio.core").C
    local uring = require "pluvio.uring"
    C.pl_signals_release(2)     -- SIGINT is the prompt's from here on
    local fd = C.pl_interrupt_watch()
    if fd < 0 then
        return nil
    end
    local w = { statement = false, dropped = false }
    w.task = pluvio.spawn_named("ctrl-c", function()
        while true do
            local data = uring.read_some(fd, 64)
            if not data or data == "" then
                return
            end
            C.pl_interrupt_taken()
            local t = w.statement
            if t then
                w.statement = false
                t:kill()
            else
                w.dropped = true
                io.stdout:write("\n> ")
                io.stdout:flush()
            end
        end
    end)
    return w
end

local function unwatch_interrupts(w)
    if w then
        w.task:kill()
        require("pluvio.core").C.pl_interrupt_unwatch()
    end
end

-- A statement of the prompt, in a task of its own that Ctrl-C kills (w:
-- see watch_interrupts); its pcall's results, packed.
local function run_statement(pluvio, w, f)
    if not w then
        return pack(pcall(f))
    end
    local t = pluvio.spawn_named("prompt", function() return pack(pcall(f)) end)
    w.statement = t
    local r = t:join()
    w.statement = false
    return r or { n = 2, false, "interrupted" }
end

-- The interactive prompt: each statement runs in a task of its own, which
-- the prompt waits for, so blocking calls (pluvio.sleep, file and network
-- operations) work and Ctrl-C stops it; `=expr` or an expression prints
-- its values.  A statement that the end of its line leaves unfinished (a
-- syntax error at '<eof>', as luajit decides) goes on at a ">> " prompt, so
-- a function or a loop can be typed over several lines.
local function repl(pluvio, w)
    io.stdout:write(("Pluvio %s (%s): Ctrl-C stops a statement, Ctrl-D ends.\n")
                    :format(pluvio.version, jit and jit.version or _VERSION))
    local next_line = stdin_lines()
    while true do
        io.stdout:write("> ")
        io.stdout:flush()
        local input = next_line()
        if not input then
            io.stdout:write("\n")
            return
        end
        local f, err = load_input(input)
        while not f and err:sub(-7) == "'<eof>'" do
            io.stdout:write(">> ")
            if w then
                w.dropped = false
            end
            io.stdout:flush()
            local more = next_line()
            if not more then    -- Ctrl-D in the middle: say why, and end
                io.stdout:write(err, "\n")
                return
            end
            if w and w.dropped then     -- Ctrl-C meanwhile: a new statement
                input = more
            else
                input = input .. "\n" .. more
            end
            f, err = load_input(input)
        end
        if not f then
            io.stdout:write(err, "\n")
        else
            -- (counted with select: # and maxn miss nils, a trailing one or all)
            local r = run_statement(pluvio, w, f)
            if not r[1] then
                io.stdout:write(shown(r[2]), "\n")
            elseif r.n > 1 then
                local out = {}
                for i = 2, r.n do out[#out + 1] = shown(r[i]) end
                io.stdout:write(table.concat(out, "\t"), "\n")
            end
        end
    end
end

-- -j cmd[=arg[,arg...]], as luajit takes it: a function of the jit
-- table (on, off, flush) called with the args, else the module jit.cmd
-- (v, dump, p, bc, ...) started with them; an empty arg is nil.  true,
-- or nil and why.
local function jit_command(spec)
    local cmd, rest = spec:match("^([^=]*)=?(.*)$")
    local args, n = {}, 0
    if rest ~= "" then
        for a in (rest .. ","):gmatch("([^,]*),") do
            n = n + 1
            args[n] = a ~= "" and a or nil
        end
    end
    local fn = jit[cmd]
    if type(fn) ~= "function" then
        local ok, mod = pcall(require, "jit." .. cmd)
        if not ok or type(mod) ~= "table" or type(mod.start) ~= "function" then
            local why = ok and "" or tostring(mod):match("^module '[^']*' not found") and "" or
                        ": " .. tostring(mod)   -- (a module that failed to load says why)
            return nil, format("-j%s: %q is neither a LuaJIT command (on, off, flush) nor a module jit.%s " ..
                               "with a start function (v, dump, p, ...)%s", spec, cmd, cmd, why)
        end
        fn = mod.start
    end
    local ok, err = pcall(fn, unpack(args, 1, n))
    if not ok then
        return nil, format("-j%s: %s", spec, tostring(err))
    end
    return true
end

-- -O[opt]: jit.opt.start(opt); -O alone sets the default level, 3.  As
-- jit_command.
local function jit_optimize(opt)
    local ok, err = pcall(require("jit.opt").start, opt == "" and 3 or opt)
    if not ok then
        return nil, format("-O%s: %s", opt, tostring(err))
    end
    return true
end

-- opts: { script = path or "-" or nil, actions = { {"e", code} | {"l", module} | {"j", cmd} | {"O", opt} },
--         stats = bool, interactive = bool, stdin_closed = bool }
function M.main(opts)
    local pluvio = require "pluvio"
    -- -j and -O first, outside the run: they set the JIT for the whole
    -- process, and a mistyped one stops the host before anything runs
    for _, a in ipairs(opts.actions) do
        if a[1] == "j" or a[1] == "O" then
            local ok, err = (a[1] == "j" and jit_command or jit_optimize)(a[2])
            if not ok then
                io.stderr:write("pluvio: ", err, "\n")
                return 1
            end
        end
    end
    local chunk
    if opts.script then
        local err
        chunk, err = load_script(opts.script, opts.stdin_closed)
        if not chunk then
            io.stderr:write("pluvio: ", tostring(err), "\n")
            return 1
        end
    end
    local actions = {}
    for _, a in ipairs(opts.actions) do
        if a[1] == "e" then
            local f, err = load(a[2], "=(command line)")
            if not f then
                io.stderr:write("pluvio: ", err, "\n")
                return 1
            end
            actions[#actions + 1] = f
        elseif a[1] == "l" then
            local name = a[2]
            actions[#actions + 1] = function()
                -- (through pcall: require's error would begin with this line of the host)
                local ok, mod = pcall(require, name)
                if not ok then
                    error(mod, 0)
                end
                rawset(_G, name, mod)
            end
        end
    end
    -- Scripts and -e code may use `pluvio` without requiring it, and
    -- require modules (and dofile files) whose top level waits (LuaJIT's
    -- C require and dofile cannot run a chunk that yields).
    rawset(_G, "pluvio", pluvio)
    rawset(_G, "require", pluvio.require)
    rawset(_G, "dofile", pluvio.dofile)
    -- os.exit leaves before the run ends, and with it went the reports of
    -- failed tasks nobody joined: os.exit(ok and 0 or 1) at a script's end
    -- hid a worker's error.  (The status stays the one asked for.)
    local exit = os.exit
    os.exit = function(...)
        pcall(pluvio._report_running_unjoined)
        return exit(...)
    end
    local rt = pluvio.default_runtime()
    local args = arg or {}
    -- SIGINT and SIGTERM stop the run instead of the process: its tasks
    -- are cancelled (their on_exit clean-ups run), and then the host ends
    -- by that signal, stdio flushed (pl_signals_end below)
    local C = require("pluvio.core").C
    C.pl_signals_catch()    -- (failing, it leaves the signals as they were)
    local ok, err = pcall(rt.run, rt, function(...)
        for _, f in ipairs(actions) do
            f()
        end
        if chunk then
            return chunk(...)
        end
        if opts.interactive then
            local w = watch_interrupts(pluvio)
            local ok, err = pcall(repl, pluvio, w)
            unwatch_interrupts(w)
            if not ok then
                error(err, 0)
            end
        end
    end, unpack(args, 1, #args))
    if opts.stats then
        io.stderr:write(M.format_stats(rt))
    end
    local sig = C.pl_signal_caught()
    if sig ~= 0 then    -- after Ctrl-C, the run's error says what its tasks were waiting on
        -- (SIGTERM is how services are stopped: not a question of what hung;
        -- but a batch job's time limit is one, when its user asks)
        local report = sig == 2 or (sig == 15 and os.getenv("PLUVIO_SIGTERM_REPORT") == "1")
        if report and not ok and type(err) == "string" and err:find("interrupted by SIG", 1, true) then
            -- (a nested run's, raised through the task running it, has a traceback)
            io.stderr:write("pluvio: ", (err:gsub("\nstack traceback:.*$", "")), "\n")
        end
        C.pl_signals_end()
        return 128 + sig
    end
    if not ok then
        io.stderr:write("pluvio: ", error_shown(err), "\n")
        return 1
    end
    if rt:unjoined_failures() > 0 then
        return 1
    end
    return 0
end

return M
