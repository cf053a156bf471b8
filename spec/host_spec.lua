-- The pluvio host binary: options, arg, exit status, error reports.
local helper = require "helper"

local host, sh, q = helper.host, helper.sh, helper.quote

-- The host on a terminal of its own: script(1) runs "$SHELL -c cmd", so
-- SHELL is set for it (where the specs run it may be unset, or name a
-- shell that is not installed, or nologin); `exec` makes the host the
-- terminal's process itself (a shell that waited for it would die of the
-- Ctrl-C that the host handles, and script report 130).
local ON_TERMINAL = "env SHELL=/bin/sh script -qec " .. q("exec " .. q(host)) .. " /dev/null"

-- What the interactive prompt printed for lines typed on a terminal
-- (script(1)), carriage returns removed, after checking it exited 0; nil,
-- with the spec marked pending, when script(1) is not installed.
local function at_prompt(lines)
    if sh("command -v script >/dev/null") ~= 0 then
        pending("script(1) is not installed: no terminal to test the prompt with")
        return nil
    end
    local input = os.tmpname()
    local f = io.open(input, "w")
    f:write(lines)
    f:close()
    -- (without the terminal's echo of the lines: script(1) writes them all
    -- to the terminal at once, and the echo came before the banner or, when
    -- the host started first (seen under load), between a prompt and its
    -- output; script(1) of util-linux before 2.35 has no --echo: echoed)
    local echo = sh("script --help 2>/dev/null | grep -q -- --echo") == 0 and "--echo never " or ""
    local status, out = sh(ON_TERMINAL:gsub("^(env SHELL=/bin/sh script )", "%1" .. echo) .. " < " .. q(input))
    os.remove(input)
    assert.equal(0, status, out)
    return (out:gsub("\r", ""))
end

describe("pluvio (the host)", function()
    it("runs a script as the main task with arg set as luajit does", function()
        local status, out, err, path = helper.run_script([[
            local pluvio = require "pluvio"
            local t = pluvio.spawn(function(a, b) pluvio.sleep(0.01); return a + b end, 1, 2)
            print(t:join())
            print(arg[0] ~= nil, arg[1], arg[2], #arg, ...)
        ]], "x y")
        assert.equal(0, status, err)
        assert.equal("3\ntrue\tx\ty\t2\tx\ty\n", out)
        assert.equal("", err)
        assert.is_string(path)
    end)

    it("reports an uncaught error as 'pluvio: file:line: message' with a traceback and exits 1", function()
        local status, out, err = helper.run_script("local x = 1\nerror('bad thing')\n")
        assert.equal(1, status)
        assert.equal("", out)
        assert.matches("^pluvio: [^\n]+%.lua:2: bad thing\nstack traceback:", err)
    end)

    it("shows an -e chunk's or an -l module's error without the host's own frames", function()
        local status, out, err = sh(q(host) .. [[ -e 'error("e-chunk")']])
        assert.equal(1, status)
        assert.equal("", out)
        assert.equal("pluvio: (command line):1: e-chunk\nstack traceback:\n\t[C]: in function 'error'\n" ..
                     "\t(command line):1: in function 'f'\n", err)          -- (and host.lua:N: in function 'fn')
        status, out, err = sh(q(host) .. " -l no_such_module_here")
        assert.equal(1, status)
        assert.matches("^pluvio: module 'no_such_module_here' not found:", err)
        assert.is_nil(err:find("stack traceback", 1, true))
    end)

    it("says so when the script's error object cannot be printed, rather than blame the script's line", function()
        local status, out, err = sh(q(host) .. [[ -e 'error(setmetatable({}, {__tostring = function() error("no words", 0) end}))']])
        assert.equal(1, status)
        assert.equal("", out)
        assert.equal("pluvio: (cannot print a table: its __tostring raised no words)\n", err)
    end)

    it("names an error object without __tostring as lua.c does, not by its address", function()
        local status, out, err = sh(q(host) .. [[ -e 'error({ code = 5 })']])
        assert.equal(1, status)
        assert.equal("", out)
        assert.equal("pluvio: (error object is a table value)\n", err)
        status, out, err = sh(q(host) .. [[ -e 'pluvio.spawn_named("t", error, { code = 5 })']])
        assert.equal(1, status)
        assert.equal("", out)
        assert.equal('pluvio: task "t" (#2, failed) failed and was never joined: (error object is a table value)\n', err)
    end)

    it("reports the failed tasks nobody joined before os.exit, which keeps its status", function()
        -- (os.exit(ok and 0 or 1) at a script's end hid a worker's error)
        local status, out, err = sh(q(host) .. [[ -e 'pluvio.spawn_named("worker", function() error("lost") end)
            pluvio.yield()
            pluvio.run(function()
                pluvio.spawn_named("inner", function() error("also lost") end)
                pluvio.yield()
                os.exit(3)
            end)']])
        assert.equal(3, status)
        assert.equal("", out)
        assert.matches('^pluvio: task "inner" %(#2, failed%) failed and was never joined: %(command line%):4: also lost\n' ..
                       '.*\npluvio: task "worker" %(#2, failed%) failed and was never joined: %(command line%):1: lost\n', err)
    end)

    it("reports a syntax error and exits 1", function()
        local status, _, err = helper.run_script("local x = = 2\n")
        assert.equal(1, status)
        assert.matches("^pluvio: [^\n]+%.lua:1: unexpected symbol near '='", err)
    end)

    it("reports a missing script and exits 1", function()
        local status, _, err = sh(q(host) .. " /nonexistent/missing.lua")
        assert.equal(1, status)
        assert.equal("pluvio: cannot open /nonexistent/missing.lua\n", err:gsub(": No such file or directory", ""))
    end)

    it("runs -e code and -l modules inside the main task, in order", function()
        local status, out, err = sh(q(host) .. [[ -l string -e 'pluvio.sleep(0.001) print(type(string), pluvio.current():name())' -e 'print(2)']])
        assert.equal(0, status, err)
        assert.equal("table\tmain\n2\n", out)
    end)

    it("takes the value of -e and -l attached to the option, as luajit does", function()
        local status, out, err = sh(q(host) .. [[ -lpluvio.uring -e'print(type(_G["pluvio.uring"]))' '-eprint(2)']])
        assert.equal(0, status, err)
        assert.equal("table\n2\n", out)
        status, _, err = sh(q(host) .. " -l")
        assert.equal(1, status)
        assert.matches("^pluvio: unknown option or missing value: '%-l'", err)
    end)

    it("controls LuaJIT with -j and -O as luajit does, before any -e code", function()
        local log = os.tmpname()
        -- (level 1 turns the loop optimization off; v's log goes to the file)
        local status, out, err = sh(q(host) .. " -e 'print((jit.status()))' -jv=" .. q(log) ..
            " -O1 -e 'local s = 0 for i = 1, 1e5 do s = s + i end" ..
            " print(s, table.concat({ select(2, jit.status()) }, \" \"):find(\"loop\") ~= nil)'")
        assert.equal(0, status, err)
        assert.equal("true\n5000050000\tfalse\n", out)
        local f = io.open(log)
        local text = f:read("*a")
        f:close()
        os.remove(log)
        assert.matches("%[TRACE +1 %(command line%):1 loop%]", text)
        status, out, err = sh(q(host) .. " -j off -e 'print((jit.status()))' -Ohotloop=5")
        assert.equal(0, status, err)
        assert.equal("false\n", out)
    end)

    it("stops before running anything on a -j or -O that LuaJIT does not know", function()
        local status, out, err = sh(q(host) .. " -e 'print(1)' -jnosuch")
        assert.equal(1, status)
        assert.equal("", out)
        assert.equal('pluvio: -jnosuch: "nosuch" is neither a LuaJIT command (on, off, flush) nor a module ' ..
                     "jit.nosuch with a start function (v, dump, p, ...)\n", err)
        status, out, err = sh(q(host) .. " -e 'print(1)' -Obogus")
        assert.equal(1, status)
        assert.equal("", out)
        assert.equal("pluvio: -Obogus: unknown or malformed optimization flag 'bogus'\n", err)
        status, _, err = sh(q(host) .. " -j")
        assert.equal(1, status)
        assert.matches("^pluvio: unknown option or missing value: '%-j'", err)
        -- a -j or -O alone runs no code: no script is still an error (a prompt on a terminal)
        status, out, err = sh(q(host) .. " -O1 </dev/null")
        assert.equal(1, status)
        assert.equal("", out)
        assert.matches("^pluvio: no script to run", err)
    end)

    it("says which -l module is missing as luajit does, without the host's own line", function()
        local status, out, err = sh(q(host) .. " -l no_such_module -e 'print(1)'")
        assert.equal(1, status)
        assert.equal("", out)
        assert.matches("^pluvio: module 'no_such_module' not found:\n", err)
        assert.is_nil(err:match("^[^\n]*host%.lua"))
    end)

    it("reads the script from standard input with -", function()
        local status, out = sh("echo 'print(pluvio.now() > 0)' | " .. q(host) .. " - a")
        assert.equal(0, status)
        assert.equal("true\n", out)
    end)

    it("says why standard input cannot be read with -, as luajit does", function()
        local status, out, err = sh(q(host) .. " - < /")
        assert.equal(1, status)
        assert.equal("", out)
        assert.equal("pluvio: cannot read stdin: Is a directory\n", err)
        status, _, err = sh(q(host) .. " - <&-")
        assert.equal(1, status)
        assert.equal("pluvio: cannot read stdin: Bad file descriptor\n", err)
    end)

    it("prints the version with -v and help with -h", function()
        local status, out = sh(q(host) .. " -v")
        assert.equal(0, status)
        assert.matches("^pluvio %d+%.%d+%.%d+ %(LuaJIT", out)
        status, out = sh(q(host) .. " -h")
        assert.equal(0, status)
        assert.matches("^usage: pluvio %[options%]", out)
    end)

    it("prints usage and exits 1 without a script, and rejects unknown options", function()
        local status, out, err = sh(q(host) .. " </dev/null")
        assert.equal(1, status)
        assert.equal("", out)
        assert.matches("^pluvio: no script to run, and standard input is not a terminal " ..
            "%(to run a script from it: pluvio %- < script%.lua%)\nusage: pluvio", err)
        status, _, err = sh(q(host) .. " --bogus x.lua")
        assert.equal(1, status)
        assert.matches("^pluvio: unknown option or missing value: '%-%-bogus'", err)
        status, _, err = sh(q(host) .. " -e")
        assert.equal(1, status)
        assert.matches("^pluvio: unknown option or missing value: '%-e'", err)
    end)

    it("prints statistics and live tasks at exit with --stats", function()
        local status, _, err = helper.run_script("pluvio.sleep(0.001)", "")
        assert.equal(0, status)
        local path = helper.tmp_path(".lua")
        local f = io.open(path, "w")
        f:write("pluvio.spawn_named('sleepy', function() pluvio.sleep(0.01) end)\npluvio.sleep(0.001)\n")
        f:close()
        status, _, err = sh(q(host) .. " --stats " .. q(path))
        os.remove(path)
        assert.equal(0, status, err)
        assert.matches("pluvio: tasks: 2 spawned, 2 finished %(0 failed, 0 cancelled%), 0 live", err)
        assert.matches("pluvio: loop: %d+ ticks, %d+ resumes, %d+ lingers, %d+ wakes, %d+ timers fired, %d+ idle waits", err)
        assert.matches("pluvio: 0 live tasks", err)
    end)

    it("reports a deadlock with the waiting tasks and exits 1", function()
        local status, _, err = helper.run_script([[
            local ch = pluvio.channel(1)
            pluvio.spawn_named("stuck", function() ch:recv() end)
            ch:recv()
        ]])
        assert.equal(1, status)
        assert.matches("^pluvio: deadlock: 2 tasks wait and nothing can wake them", err)
        assert.matches('task "stuck" %(#%d+, waiting%) waits on channel', err)
    end)

    it("gives an interactive prompt on a terminal whose lines run as tasks", function()
        local out = at_prompt('x = 40\n=x + 2\npluvio.sleep(0.01) print("slept")\nerror("oops")\n' ..
                              'local t = pluvio.spawn(function() return 7 end) print(t:join())\n')
        if not out then return end
        assert.matches("Pluvio %d+%.%d+%.%d+ %(LuaJIT", out)
        assert.matches("> 42", out)
        assert.matches("> slept", out)
        assert.matches("> [^\n]*oops", out)
        assert.matches("> 7", out)
    end)

    it("prints every value of an expression at the prompt, nils included, as luajit does", function()
        local out = at_prompt('=nil\n=1, nil\n=nil, 2\nprint("end")\n')
        if not out then return end
        assert.matches("\n> nil\n> 1\tnil\n> nil\t2\n> end\n", out)
    end)

    it("continues a statement its line leaves unfinished at a >> prompt, as luajit does", function()
        local out = at_prompt('function sq(x)\n  return x * x\nend\n=sq(7)\n' ..
                              'for i = 1, 2 do\nprint("i" .. i)\nend\n=sq(\n3)\nx = = 1\nlocal t = {\n')
        if not out then return end
        assert.matches("\n> >> >> > 49\n", out)
        assert.matches("\n> >> >> i1\ni2\n", out)
        assert.matches("\n> >> 9\n", out)
        assert.matches("\n> stdin:1: unexpected symbol near '='\n", out)   -- an error, not more input
        -- Ctrl-D inside a statement: its error, and the prompt ends
        assert.matches("\n> >> stdin:1: unexpected symbol near '<eof>'\n$", out)
    end)

    it("runs the tasks started at the prompt while it waits for the next line", function()
        if sh("command -v script >/dev/null") ~= 0 then
            pending("script(1) is not installed: no terminal to test the prompt with")
            return
        end
        -- The second line comes 1 s after the first; the ticker needs about
        -- 0.06 s.  A prompt that blocks the runtime in its read lets the
        -- ticker run only after the last line.
        local feed = "(printf '%s\\n' " .. q('pluvio.spawn(function() for i = 1, 3 do pluvio.sleep(0.02) print("tick " .. i) end end)') ..
                     "; sleep 1; printf '%s\\n' " .. q('print("two" .. "!")') .. ")"
        local status, out = sh(feed .. " | " .. ON_TERMINAL)
        assert.equal(0, status, out)
        out = out:gsub("\r", "")
        local tick, two = out:find("\ntick 3\n"), out:find("\ntwo!\n")
        assert.is_number(tick, out)
        assert.is_number(two, out)
        assert.is_true(tick < two, out)
    end)

    it("stops the line that runs on Ctrl-C, or drops the statement typed so far, and goes on", function()
        if sh("command -v script >/dev/null") ~= 0 then
            pending("script(1) is not installed: no terminal to test the prompt with")
            return
        end
        -- Ctrl-C (\003 typed on the terminal) at 1 s: the line parked in a
        -- sleep is killed, the task it started goes on; then one in the
        -- middle of a loop typed over several lines
        local function line(code) return "printf '%s\\n' " .. q(code) end
        local feed = "(" .. table.concat({
            line('pluvio.spawn(function() pluvio.sleep(1.5) print("started task done") end) ' ..
                 'pluvio.sleep(1e6) print("not here")'),
            "sleep 1", "printf '\\003'", "sleep 1",
            line("for i = 1, 2 do"), "sleep 0.5", "printf '\\003'", "sleep 0.5",
            line('print("after")') }, "; ") .. ")"
        local status, out = sh(feed .. " | timeout 60 " .. ON_TERMINAL)
        assert.equal(0, status, out)
        out = out:gsub("\r", "")
        -- (the terminal echoes a line typed ahead before the banner, else after the prompt)
        local stopped, started = out:find("^Cinterrupted\n", 1, true), out:find("started task done\n", 1, true)
        assert.is_number(stopped, out)
        assert.is_true(started and started > stopped, out)     -- (after the kill of the line)
        assert.is_number(out:find("\n>> ^C\n> ", 1, true), out)     -- the loop dropped: a new statement
        assert.is_number(out:find("\nafter\n", 1, true), out)
        assert.is_nil(out:find("\nnot here", 1, true), out)   -- (the echo of the line has it, not after a newline)
    end)

    it("keeps luajit's stdin:1: position in the errors of prompt lines", function()
        local out = at_prompt('error("oops")\n=error("eq")\nx = = 1\n=nil + 1\n=1, 2;\n=3 -- a comment\n' ..
                              '=nosuch.x\nnosuch.y = 1\n')
        if not out then return end
        -- (an index in an expression said stdin:2: its ")" came after a newline)
        assert.matches("\n> stdin:1: attempt to index global 'nosuch' %(a nil value%)\n> stdin:1: attempt to " ..
                       "index global 'nosuch' %(a nil value%)\n", out)
        assert.matches("\n> stdin:1: oops\n", out)
        assert.matches("\n> stdin:1: eq\n", out)
        assert.matches("\n> stdin:1: unexpected symbol near '='\n", out)
        assert.matches("\n> stdin:1: attempt to perform arithmetic on a nil value\n", out)
        assert.matches("\n> 1\t2\n> 3\n", out)
    end)

    it("goes on after a value or an error whose __tostring fails at the prompt", function()
        local out = at_prompt('mt = {__tostring = function() error("no words", 0) end}\n' ..
                              '=setmetatable({}, mt)\n' ..
                              '=1, setmetatable({}, {__tostring = function() return {} end})\n' ..
                              'error(setmetatable({}, mt))\n' ..
                              'print("still here")\n')
        if not out then return end
        assert.matches("\n> %(cannot print a table: its __tostring raised no words%)\n", out)
        assert.matches("\n> 1\t%(cannot print a table: its __tostring returned a table%)\n", out)
        assert.matches("\n> %(cannot print a table: its __tostring raised no words%)\n> still here\n", out)
    end)

    it("keeps print() out of the script's files when started with stdin and stdout closed", function()
        -- (the runtime's ring took fd 0, and the file the script opened fd 1)
        local path = helper.tmp_path(".txt")
        finally(function() os.remove(path) end)
        local status, _, err = sh(q(host) .. " -e " .. q(("local f = assert(io.open(%q, 'w')); print('stray'); " ..
                                                          "io.stdout:flush(); f:write('data'); f:close()"):format(path)) ..
                                  " <&- >&-")
        assert.equal(0, status, err)
        local f = assert(io.open(path))
        assert.equal("data", f:read("*a"))
        f:close()
    end)

    it("ends on SIGHUP, as luajit does, rather than turn on UCX's trace log", function()
        local f = assert(io.open("/proc/self/status"))
        local ignored = tonumber(f:read("*a"):match("SigIgn:%s*(%x+)"), 16)
        f:close()
        if ignored % 2 == 1 then    -- (nohup: the host inherits that, rightly)
            pending("SIGHUP is ignored where the specs run")
            return
        end
        -- libucs takes SIGHUP as its "debug signal" when it loads; the
        -- script then survived its own hang-up, and printed "survived"
        local raise = [[local ffi = require "ffi"; ffi.cdef "int raise(int sig);"; ffi.C.raise(1); print("survived")]]
        local status, out = sh(q(host) .. " -e " .. q(raise))
        assert.equal(128 + 1, status, out)
        assert.equal("", out)
        -- (luajit with the module: libpluvio.so gives it back as it loads)
        -- (the sanitizer run's library needs its runtimes preloaded, as spec/run does)
        local preload = os.getenv("LD_PRELOAD")
        local lua_path = helper.root .. "/lua/?.lua;" .. helper.root .. "/lua/?/init.lua;;"
        status, out = sh((preload and "LD_PRELOAD=" .. q(preload) .. " " or "") .. "LUA_PATH=" .. q(lua_path) ..
                         " luajit -e " .. q('require "pluvio"; ' .. raise))
        assert.equal(128 + 1, status, out)
        -- and who asks for UCX's debug signal keeps it
        status, out = sh("UCX_DEBUG_SIGNO=SIGHUP " .. q(host) .. " -e " .. q(raise))
        assert.equal(0, status, out)
        assert.equal("survived\n", out)
    end)

    -- (UCX's ERROR lines, a dropped link's, landed in a script's output on
    -- stdout: in the middle of the JSON that ucx_bench --json - writes)
    it("has UCX log to stderr unless UCX_LOG_FILE says otherwise, in the host and under luajit", function()
        local code = [[local ucx = require "pluvio.ucx"; ucx.Context.new():close(); print("done")]]
        local status, out, err = sh("UCX_LOG_LEVEL=info " .. q(host) .. " -e " .. q(code))
        assert.equal(0, status, err)
        assert.equal("done\n", out)
        assert.matches("UCX  INFO  Version", err, 1, true)
        local preload = os.getenv("LD_PRELOAD")
        local lua_path = helper.root .. "/lua/?.lua;" .. helper.root .. "/lua/?/init.lua;;"
        status, out, err = sh((preload and "LD_PRELOAD=" .. q(preload) .. " " or "") .. "LUA_PATH=" .. q(lua_path) ..
                              " UCX_LOG_LEVEL=info luajit -e " .. q(code))
        assert.equal(0, status, err)
        assert.equal("done\n", out)
        assert.matches("UCX  INFO  Version", err, 1, true)
        status, out, err = sh("UCX_LOG_FILE=stdout UCX_LOG_LEVEL=info " .. q(host) .. " -e " .. q(code))
        assert.equal(0, status, err)
        assert.matches("UCX  INFO  Version", out, 1, true)
        assert.not_matches("UCX", err, 1, true)
    end)

    it("idles in the kernel: a 0.3 s sleep costs almost no CPU", function()
        local status, out, err = helper.run_script([[
            local c0 = os.clock()
            pluvio.sleep(0.3)
            print(os.clock() - c0)
        ]])
        assert.equal(0, status, err)
        assert.is_true(tonumber(out) < 0.03, "cpu seconds " .. out)
    end)

    describe("require", function()
        -- A directory of modules for one spec, removed after it: files is
        -- { name = code }; returns its path and the package.path entry.
        local function module_dir(files)
            local dir = helper.tmp_path(".d")
            assert.equal(0, helper.exec("mkdir " .. q(dir)))
            finally(function() helper.exec("rm -rf " .. q(dir)) end)
            for name, code in pairs(files) do
                local f = assert(io.open(dir .. "/" .. name, "w"))
                f:write(code)
                f:close()
            end
            return dir, dir .. "/?.lua"
        end

        -- A module whose top level waits: it sleeps, then reads a file.
        local SLOW = [[
            local uring = require "pluvio.uring"
            pluvio.sleep(0.001)
            local f = assert(uring.File.open(]] .. ("%q"):format(helper.root .. "/spec/host_spec.lua") .. [[))
            local head = assert(f:read(0, 12))
            f:close()
            return { head = head, name = ... }
        ]]

        it("lets a script require a module whose top level sleeps and reads a file", function()
            local _, path = module_dir({ ["slow.lua"] = SLOW })
            local status, out, err = helper.run_script(
                "package.path = " .. ("%q"):format(path) .. " .. ';' .. package.path\n" ..
                "local m = require 'slow'\n" ..
                "print(m.head, m.name, require('slow') == m, package.loaded.slow == m)\n")
            assert.equal(0, status, err)
            assert.equal("-- The pluvi\tslow\ttrue\ttrue\n", out)
        end)

        -- (LuaJIT's dofile ran the chunk from C: "attempt to yield across
        -- C-call boundary" at its first wait)
        it("lets a script dofile a file whose top level sleeps and reads a file", function()
            local dir = module_dir({ ["slow.lua"] = SLOW })
            local status, out, err = helper.run_script(
                "local m = dofile(" .. ("%q"):format(dir .. "/slow.lua") .. ")\n" ..
                "print(m.head, m.name, dofile == pluvio.dofile)\n" ..
                "print(pcall(dofile, " .. ("%q"):format(dir .. "/none.lua") .. "))\n" ..
                "print(pcall(dofile, " .. ("%q"):format(dir .. "/slow.lua\0.bak") .. "))\n")
            assert.equal(0, status, err)
            -- (a NUL byte: LuaJIT's loadfile ran slow.lua)
            assert.equal("-- The pluvi\tnil\ttrue\nfalse\tcannot open " .. dir .. "/none.lua: No such file or directory\n" ..
                         "false\tpluvio.dofile: path must not contain a NUL byte (got \"" .. dir .. "/slow.lua\\0.bak\")\n",
                         out)
        end)

        it("loads a -l module whose top level waits, found through LUA_PATH, before the -e code", function()
            local _, path = module_dir({ ["slow.lua"] = SLOW })
            local status, out, err = sh("LUA_PATH=" .. q(path .. ";;") .. " " .. q(host) ..
                                        " -l slow -e 'print(slow.head, slow.name)'")
            assert.equal(0, status, err)
            assert.equal("-- The pluvi\tslow\n", out)
        end)

        it("requires a module whose top level waits at the interactive prompt", function()
            local _, path = module_dir({ ["slow.lua"] = SLOW })
            local out = at_prompt("package.path = " .. ("%q"):format(path) .. "\n=require('slow').head\n")
            if not out then return end
            assert.matches("> %-%- The pluvi\n", out)
        end)

        it("says a module is not found, or cannot be loaded, in luajit's words", function()
            local dir, path = module_dir({ ["bad.lua"] = "local x = 1\nlocal y = = 2\n",
                                           ["badso.so"] = "not a shared object\n" })
            local paths = ("package.path = %q; package.cpath = %q; "):format(path, dir .. "/?.so")
            for _, name in ipairs({ "nosuchmod", "bad", "badso", "no.such.sub" }) do
                -- uncaught: the same report, but for the interpreter's name
                local code = paths .. ("require %q"):format(name)
                local _, _, expected = sh("luajit -e " .. q(code))
                local status, _, err = sh(q(host) .. " -e " .. q(code))
                assert.equal(1, status)
                expected = expected:match("^luajit: (.-\n)stack traceback:")
                assert.is_string(expected)
                assert.equal("pluvio: " .. expected, err:match("^(.-\n)stack traceback:"))
                -- the same message in a module whose top level waited
                _, _, expected = sh("luajit -e " .. q(paths .. ("io.stderr:write((select(2, pcall(require, %q))))"):format(name)))
                status, _, err = sh(q(host) .. " -e " .. q(paths .. "package.preload.w = function() pluvio.sleep(0.001) " ..
                                                           ("return (select(2, pcall(require, %q))) end "):format(name) ..
                                                           "io.stderr:write(require 'w')"))
                assert.equal(0, status, err)
                assert.is_number(expected:find("module '" .. name .. "'", 1, true), expected)
                assert.equal(expected, err)
            end
        end)

        it("reports an error a module raises after waiting at the module's file:line, with a traceback", function()
            local dir, path = module_dir({ ["broken.lua"] = "pluvio.sleep(0.001)\nlocal x = 1\nerror('no config here')\n" })
            local status, out, err, script = helper.run_script(
                "package.path = " .. ("%q"):format(path) .. "\n" ..
                "print(select(2, pcall(require, 'broken')))\n" ..
                "package.loaded.broken = nil\n" ..
                "require 'broken'\n")
            assert.equal(1, status)
            assert.equal(dir .. "/broken.lua:3: no config here\n", out)
            assert.equal("pluvio: " .. dir .. "/broken.lua:3: no config here\nstack traceback:\n", err:match("^.-\n.-\n"))
            assert.is_number(err:find("in function 'require'", 1, true), err)
            assert.is_number(err:find(script .. ":4: in ", 1, true), err)
        end)

        it("raises luajit's loop error for a module that requires itself, and for a second require after a failed load", function()
            local dir, path = module_dir({ ["loopy.lua"] = "pluvio.sleep(0.001)\nlocal again = require 'loopy'\nreturn again\n",
                                           ["fails.lua"] = "pluvio.sleep(0.001)\nerror('first load fails')\n" })
            local status, out, err = helper.run_script(
                "package.path = " .. ("%q"):format(path) .. "\n" ..
                "print(select(2, pcall(require, 'loopy')))\n" ..
                "print(select(2, pcall(require, 'fails')))\n" ..
                "print(select(2, pcall(require, 'fails')))\n" ..
                "package.loaded.fails = nil   -- (as in luajit: what lets it load again)\n" ..
                "print(select(2, pcall(require, 'fails')))\n")
            assert.equal(0, status, err)
            assert.equal(dir .. "/loopy.lua:2: loop or previous error loading module 'loopy'\n" ..
                         dir .. "/fails.lua:2: first load fails\n" ..
                         "loop or previous error loading module 'fails'\n" ..
                         dir .. "/fails.lua:2: first load fails\n", out)
        end)

        it("takes bad arguments as luajit does: numbers as names, anything else an error", function()
            local code = "package.preload['1'] = function(...) return 'one:' .. ... end " ..
                         "print(require(1)) print(pcall(require)) print(pcall(require, {})) require(nil)"
            local _, lout, lerr = sh("luajit -e " .. q(code))
            local status, out, err = sh(q(host) .. " -e " .. q(code))
            assert.equal(1, status)
            assert.equal("one:1\nfalse\tbad argument #1 to '?' (string expected, got no value)\n" ..
                         "false\tbad argument #1 to '?' (string expected, got table)\n", lout)
            assert.equal(lout, out)
            assert.equal("pluvio: (command line):1: bad argument #1 to 'require' (string expected, got nil)\n",
                         err:match("^[^\n]*\n"))
            assert.equal(lerr:match("^luajit: ([^\n]*\n)"), err:match("^pluvio: ([^\n]*\n)"))
        end)

        it("still loads C modules, ffi, jit and pluvio from a module that waits", function()
            local _, path = module_dir({ ["uses.lua"] = "pluvio.sleep(0.001)\n" ..
                "return { lfs = require 'lfs', ffi = require 'ffi', jit = require 'jit', pluvio = require 'pluvio' }\n" })
            local status, out, err = helper.run_script(
                "package.path = " .. ("%q"):format(path) .. " .. ';' .. package.path\n" ..
                "local m = require 'uses'\n" ..
                "print(type(m.lfs.attributes), m.lfs == package.loaded.lfs, m.ffi == package.loaded.ffi,\n" ..
                "      m.ffi.sizeof('int32_t'), m.jit == jit, m.pluvio == pluvio)\n")
            assert.equal(0, status, err)
            assert.equal("function\ttrue\ttrue\t4\ttrue\ttrue\n", out)
        end)

        it("keeps package.loaded, package.preload and package.path working", function()
            local _, path = module_dir({ ["counted.lua"] = "pluvio.sleep(0.001)\nLOADS = (LOADS or 0) + 1\n" })
            local status, out, err = helper.run_script([[
                package.preload.pre = function(name, extra) pluvio.sleep(0.001) return { name = name, extra = extra } end
                local pre = require "pre"
                print(pre.name, pre.extra, require "pre" == pre)
                package.loaded.given = "given"
                print(require "given")
                package.path = ]] .. ("%q"):format(path) .. [[
                print(require "counted", package.loaded.counted, LOADS)    -- (nothing returned: true)
                package.loaded.counted = nil
                print(require "counted", LOADS)
                package.preload.sets = function(name) package.loaded[name] = "set by itself" end
                print(require "sets")
            ]])
            assert.equal(0, status, err)
            assert.equal("pre\tnil\ttrue\ngiven\ntrue\ttrue\t1\ntrue\t2\nset by itself\n", out)
        end)

        it("makes a task that requires a module another task is loading wait for it, not see it half-loaded", function()
            local _, path = module_dir({
                ["shared.lua"] = "LOADS = (LOADS or 0) + 1\npluvio.sleep(0.01)\nreturn { loads = LOADS }\n",
                ["failing.lua"] = "pluvio.sleep(0.01)\nerror('cannot load')\n",
                ["endless.lua"] = "pluvio.sleep(1e6)\n" })
            -- Tasks run in spawn order: the first starts the load and
            -- sleeps in it before the second asks for the module.
            local status, out, err = helper.run_script("package.path = " .. ("%q"):format(path) .. "\n" .. [[
                local function two(name, before_second)
                    local first = pluvio.spawn_named("first", function() return pcall(require, name) end)
                    local second = pluvio.spawn_named("second", function()
                        if before_second then before_second(first) end
                        local loading = package.loaded[name]
                        return loading ~= nil and type(loading) ~= "table", pcall(require, name)
                    end)
                    return first, second
                end
                local a, b = two("shared")
                local _, ma = a:join()
                local in_progress, ok, mb = b:join()
                print(in_progress, ok, ma == mb, ma.loads, LOADS)
                a, b = two("failing")
                print(a:join())
                print(b:join())
                -- a load killed in the middle: the waiter is told, and sees the wait
                a, b = two("endless")
                local seen
                local watcher = pluvio.spawn(function()
                    for _, t in ipairs(pluvio.runtime():tasks()) do
                        if t.task == b then seen = t.waits_on end
                    end
                    a:kill()
                end)
                watcher:join()
                print(b:join())
                print(seen)
            ]])
            assert.equal(0, status, err)
            assert.equal("true\ttrue\ttrue\t1\t1\n" ..
                         "false\t" .. path:sub(1, -6) .. "failing.lua:2: cannot load\n" ..
                         "true\tfalse\tloop or previous error loading module 'failing'\n" ..
                         "true\tfalse\tloop or previous error loading module 'endless'\n" ..
                         "require 'endless' (task \"first\" loads it)\n", out)
        end)

        it("gives pluvio.require to code that uses pluvio as a module, and leaves its require alone", function()
            local _, path = module_dir({ ["slow.lua"] = SLOW, ["slow2.lua"] = SLOW })
            -- (the sanitizer run's library needs its runtimes preloaded into luajit)
            local preload = os.getenv("LD_PRELOAD")
            local env = (preload and "LD_PRELOAD=" .. q(preload) .. " " or "") ..
                        "LUA_PATH=" .. q(path .. ";" .. helper.root .. "/lua/?.lua;" .. helper.root .. "/lua/?/init.lua;;") ..
                        " PLUVIO_LIB=" .. q(os.getenv("PLUVIO_LIB") or helper.root .. "/build/libpluvio.so")
            local status, out, err = sh(env .. " luajit -e " .. q([[
                local luajit_require = require
                local pluvio = require "pluvio"
                _G.pluvio = pluvio
                print(require == luajit_require, debug.getinfo(require, "S").what)
                print(pluvio.run(function() return pluvio.require("slow").head end))
                print(pcall(pluvio.run, function() return require("slow2").head end))
            ]]))
            assert.equal(0, status, err)
            assert.matches("^true\tC\n%-%- The pluvi\nfalse\t[^\n]*attempt to yield across C%-call boundary", out)
        end)
    end)
end)

-- The host in the background on a script, with SIGINT at its default
-- action (a shell's `&` ignores it in the job unless told otherwise:
-- default_int = false keeps that); returns the process's files.  The
-- script gets the path of a file to make once it wants its signal.
local function start_host(code, default_int, env)
    local p = { script = helper.tmp_path(".lua"), ready = helper.tmp_path(".ready"), out = os.tmpname(),
                err = os.tmpname(), rc = os.tmpname(), pid = os.tmpname() }
    local f = assert(io.open(p.script, "w"))
    f:write(code)
    f:close()
    os.remove(p.rc)
    helper.exec(("(%s %s %s %s %s >%s 2>%s & echo $! >%s; wait $!; echo $? >%s) </dev/null >/dev/null 2>&1 &"):format(
        default_int == false and "env" or "env --default-signal=INT", env or "", q(host), q(p.script), q(p.ready),
        q(p.out), q(p.err), q(p.pid), q(p.rc)))
    return p
end

local function slurp(path)
    local f = io.open(path, "rb")
    local s = f and f:read("*a")
    if f then f:close() end
    return s
end

-- Wait up to limit seconds for check() to return a value; returns it.
local function poll(limit, check)
    for _ = 1, limit * 50 do
        local v = check()
        if v then return v end
        helper.exec("sleep 0.02")
    end
end

local function signal(p, name)
    local pid = assert(poll(30, function() return tonumber(slurp(p.pid)) end), "the host never started")
    assert(poll(30, function() return slurp(p.ready) end), "the script never got ready: " .. (slurp(p.err) or ""))
    assert.equal(0, helper.exec(("kill -%s %d"):format(name, pid)))
    return pid
end

-- The host's exit status (as its shell saw it: 128 + the signal's number
-- when one ended it), stdout and stderr; the files removed.
local function ended(p, pid)
    local rc = poll(60, function() return tonumber(slurp(p.rc)) end)
    if not rc then helper.exec("kill -KILL " .. pid) end
    local out, err = slurp(p.out), slurp(p.err)
    for _, k in ipairs { "script", "ready", "out", "err", "rc", "pid" } do os.remove(p[k]) end
    return rc, out, err
end

describe("pluvio (the host) on SIGINT and SIGTERM", function()
    it("cancels the tasks, runs their on_exit clean-ups, writes out stdio and dies of SIGINT", function()
        local p = start_host([[
            local ready = ...
            io.stdout:setvbuf("full")   -- (a file: stdio holds what print writes)
            print("before")
            pluvio.spawn(function()
                pluvio.current():on_exit(function() io.stdout:write("worker cleaned\n") end)
                pluvio.sleep(100)
            end)
            pluvio.current():on_exit(function(t) io.stdout:write("main ", t:status(), "\n") end)
            io.open(ready, "w"):close()
            pluvio.sleep(100)
            print("not reached")
        ]])
        local rc, out, err = ended(p, signal(p, "INT"))
        assert.equal(130, rc, err)
        assert.equal("before\nmain cancelled\nworker cleaned\n", out)
        assert.matches('^pluvio: interrupted by SIGINT; its tasks then:\n' ..      -- (what seemed to hang, and where)
                       '  task "main" %(#1, waiting%) waits on sleep at [^\n]*%.lua:10\n' ..
                       '  task "task%-2" %(#2, waiting%) waits on sleep at [^\n]*%.lua:6\n$', err)
    end)

    it("stops a task that lingers and a runtime nested in a task, and dies of SIGTERM", function()
        local p = start_host([[
            local uring = require "pluvio.uring"
            local ready = ...
            pluvio.current():on_exit(function() io.stdout:write("outer main cleaned\n") end)
            pluvio.run(function()
                pluvio.current():on_exit(function() io.stdout:write("inner main cleaned\n") end)
                local f = assert(uring.File.open("/dev/zero"))
                local buf = uring.current():acquire_buffer()
                io.open(ready, "w"):close()
                while true do assert(f:read_fixed(buf, 0, 512)) end   -- (each read lingers)
            end)
            print("not reached")
        ]])
        local rc, out, err = ended(p, signal(p, "TERM"))
        assert.equal(143, rc, err)
        assert.equal("inner main cleaned\nouter main cleaned\n", out)
        assert.equal("", err)           -- (Ctrl-C lists the tasks; SIGTERM stops services)
    end)

    it("lists the tasks on SIGTERM too when PLUVIO_SIGTERM_REPORT=1 (a batch job's time limit)", function()
        local p = start_host([[
            local ready = ...
            io.open(ready, "w"):close()
            pluvio.sleep(100)
        ]], nil, "PLUVIO_SIGTERM_REPORT=1")
        local rc, _, err = ended(p, signal(p, "TERM"))
        assert.equal(143, rc, err)
        assert.matches('^pluvio: interrupted by SIGTERM; its tasks then:\n' ..
                       '  task "main" %(#1, waiting%) waits on sleep at [^\n]*%.lua:3\n$', err)
    end)

    it("lists what the tasks waited on also when the run Ctrl-C stopped was wrapped", function()
        -- (pluvio.wrap puts the position of its function in front: the listing was left out)
        local p = start_host([[
            local ready = ...
            pluvio.wrap(function()
                io.open(ready, "w"):close()
                pluvio.sleep(100)
            end)()
        ]])
        local rc, _, err = ended(p, signal(p, "INT"))
        assert.equal(130, rc, err)
        assert.matches('^pluvio: [^\n]*%.lua:%d+: interrupted by SIGINT; its tasks then:\n' ..
                       '  task "main" %(#1, waiting%) waits on sleep at [^\n]*%.lua:4\n$', err)
    end)

    it("ends a script that never waits on the second SIGINT, at once", function()
        local p = start_host([[
            local ready = ...
            pluvio.current():on_exit(function() io.stdout:write("cleaned\n") end)
            io.open(ready, "w"):close()
            local n = 0
            while true do n = n + 1 end
        ]])
        local pid = signal(p, "INT")
        helper.exec("sleep 0.3")
        assert.equal(0, helper.exec("kill -0 " .. pid), "the first SIGINT ended a script that never waits")
        assert.equal(0, helper.exec("kill -INT " .. pid))
        local rc, out, err = ended(p, pid)
        assert.equal(130, rc, err)
        assert.equal("", out)
    end)

    it("leaves an ignored SIGINT ignored (a shell's background job, nohup)", function()
        local p = start_host([[
            local ready = ...
            io.open(ready, "w"):close()
            pluvio.sleep(0.5)
            print("done")
        ]], false)
        local rc, out, err = ended(p, signal(p, "INT"))
        assert.equal(0, rc, err)
        assert.equal("done\n", out)
    end)
end)
