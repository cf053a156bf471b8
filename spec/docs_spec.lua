-- The documentation's examples: every ```lua block of README.md and
-- docs/*.md runs as a script under the pluvio host and must exit 0 (the
-- examples assert their own results).  A block whose preceding line is
-- `<!-- norun -->` is not run by the host (for snippets that need a peer);
-- one that is a busted spec file ("-- spec/x_spec.lua") runs under busted,
-- and a "-- server.lua" block with the "-- client.lua" block after it run
-- as two processes against each other.
local helper = require "helper"

local root = helper.root

local function read(path)
    local f = io.open(path, "rb")
    if not f then
        return nil
    end
    local s = f:read("*a")
    f:close()
    return s
end

-- The markdown files to check, as paths relative to the repository root.
local function doc_files()
    local files = {}
    if read(root .. "/README.md") then
        files[#files + 1] = "README.md"
    end
    local p = io.popen("unset LD_PRELOAD; ls " .. helper.quote(root .. "/docs") .. " 2>/dev/null")
    local names = {}
    for name in p:lines() do
        if name:match("%.md$") then
            names[#names + 1] = name
        end
    end
    p:close()
    table.sort(names)
    for _, name in ipairs(names) do
        files[#files + 1] = "docs/" .. name
    end
    return files
end

-- The ```lua blocks of one markdown text: { heading, line, code, norun }.
-- Fences may be indented (inside a list); the indent is removed.
local function lua_blocks(text)
    local blocks, heading, prev = {}, "(top)", ""
    local block, indent
    local n = 0
    for line in (text .. (text:sub(-1) == "\n" and "" or "\n")):gmatch("([^\n]*)\n") do
        n = n + 1
        if block then
            if line:match("^%s*```%s*$") then
                block.code = table.concat(block.lines, "\n") .. "\n"
                block.lines = nil
                blocks[#blocks + 1] = block
                block = nil
            else
                local cut = line:sub(1, #indent) == indent and #indent or #line:match("^%s*")
                block.lines[#block.lines + 1] = line:sub(cut + 1)
            end
        else
            local fence_indent, lang = line:match("^(%s*)```%s*(%S*)")
            if fence_indent then
                if lang == "lua" then
                    indent = fence_indent
                    block = { heading = heading, line = n, lines = {},
                              norun = prev:match("^%s*<!%-%-%s*norun%s*%-%->%s*$") ~= nil }
                else
                    -- another language: skip to its closing fence
                    block = { skip = true, lines = {}, heading = heading, line = n }
                    indent = fence_indent
                end
            elseif line:match("^#+%s") then
                heading = line:gsub("^#+%s*", ""):gsub("%s*#*%s*$", "")
            end
            if line:match("%S") then
                prev = line
            end
        end
    end
    assert(not block, "unclosed ``` fence opened at line " .. (block and block.line or 0))
    local out = {}
    for _, b in ipairs(blocks) do
        if not b.skip then
            out[#out + 1] = b
        end
    end
    return out
end

-- The examples run with the public functions wrapped (spec/api_trace.lua):
-- each one's first call in an example is written to this file, which "the
-- public API" below reads.  (Prefixed on the example's first line: the
-- lines of its errors stay the same.)
local trace_path = helper.tmp_path(".api")
os.remove(trace_path)
local TRACE = ("dofile(%q).install(%q); "):format(root .. "/spec/api_trace.lua", trace_path)

describe("documentation examples", function()
    local files = doc_files()

    it("include docs/API.md", function()
        local text = read(root .. "/docs/API.md")
        assert.is_string(text, "docs/API.md is missing")
        assert.is_true(#lua_blocks(text) > 0, "docs/API.md has no ```lua examples")
    end)

    for _, file in ipairs(files) do
        local seen = {}
        for _, b in ipairs(lua_blocks(read(root .. "/" .. file))) do
            local name = file .. ": " .. b.heading
            seen[name] = (seen[name] or 0) + 1
            if seen[name] > 1 then
                name = name .. " (" .. seen[name] .. ")"
            end
            if b.norun then
                pending(name .. " (norun)")
            else
                it(name, function()
                    if b.code:find("::1", 1, true) and not helper.ipv6_loopback() then
                        pending(name .. " uses ::1, and the loopback has no IPv6 address: not run")
                    end
                    local status, out, err = helper.run_script(TRACE .. b.code)
                    assert.are.equal(0, status, string.format(
                        "%s line %d: the example exited %d\n--- stderr:\n%s\n--- stdout:\n%s",
                        file, b.line, status, err, out))
                end)
            end
        end
    end
end)

describe("documentation spec files", function()
    -- The norun blocks that are whole busted spec files ("-- spec/x_spec.lua"
    -- on their first line) need busted's describe and it: each runs under
    -- busted as a user would run it, with Pluvio on the paths, and must pass.
    for _, file in ipairs(doc_files()) do
        for _, b in ipairs(lua_blocks(read(root .. "/" .. file))) do
            local name = b.norun and b.code:match("^%-%- (spec/[%w_]+_spec%.lua)")
            if name then
                it(file .. ": " .. name .. " passes under busted", function()
                    local path = helper.tmp_path("_spec.lua")
                    local f = assert(io.open(path, "w"))
                    f:write(b.code)
                    f:close()
                    -- (the sanitizer run's library needs its runtimes preloaded, as spec/run does)
                    local preload = os.getenv("LD_PRELOAD")
                    local paths = (preload and "LD_PRELOAD=" .. helper.quote(preload) .. " " or "") ..
                                  ("LUA_PATH=%s "):format(helper.quote(root .. "/lua/?.lua;" .. root .. "/lua/?/init.lua;;"))
                    local status, out, err = helper.sh(paths .. "busted --lua=luajit -o plainTerminal " .. helper.quote(path))
                    os.remove(path)
                    assert.are.equal(0, status, string.format("%s line %d:\n%s%s", file, b.line, out, err))
                    assert.matches(" 0 failures / 0 errors", out)
                end)
            end
        end
    end
end)

describe("documentation two-process examples", function()
    -- A norun block "-- server.lua: pluvio server.lua HOST PORT" and the
    -- "-- client.lua: ..." block after it are one example: the server runs
    -- on an ephemeral port (it prints "listening on port N"), the client
    -- against it must exit 0, and the server must stop on Ctrl-C (SIGINT).
    for _, file in ipairs(doc_files()) do
        local server
        for _, b in ipairs(lua_blocks(read(root .. "/" .. file))) do
            if b.norun and b.code:match("^%-%- server%.lua: pluvio server%.lua HOST PORT") then
                server = b
            elseif server and b.norun and b.code:match("^%-%- client%.lua: pluvio client%.lua HOST PORT") then
                local srv = server
                server = nil
                it(file .. " line " .. srv.line .. ": server.lua and client.lua run against each other", function()
                    local function put(code)
                        local path = helper.tmp_path(".lua")
                        local f = assert(io.open(path, "w"))
                        f:write(code)
                        f:close()
                        return path
                    end
                    local spath, cpath = put(srv.code), put(b.code)
                    local out, err, pidf = helper.tmp_path(".out"), helper.tmp_path(".err"), helper.tmp_path(".pid")
                    helper.exec(("UCX_NET_DEVICES=lo timeout -k 5 120 %s %s 127.0.0.1 0 >%s 2>%s & echo $! >%s")
                                :format(helper.quote(helper.host), helper.quote(spath), out, err, pidf))
                    local port
                    for _ = 1, 300 do
                        local f = io.open(out)
                        port = f and f:read("*a"):match("listening on port (%d+)")
                        if f then f:close() end
                        if port then break end
                        helper.exec("sleep 0.1")
                    end
                    local f = assert(io.open(pidf))
                    local pid = assert(tonumber(f:read("*a")))
                    f:close()
                    local cstatus, cout, cerr = 1, "", "(not run: the server printed no port)"
                    if port then
                        cstatus, cout, cerr = helper.sh(("UCX_NET_DEVICES=lo timeout -k 5 60 %s %s 127.0.0.1 %s")
                                                        :format(helper.quote(helper.host), helper.quote(cpath), port))
                    end
                    -- Ctrl-C: the timeout above is the server's parent, so signal the host itself
                    helper.exec(("pkill -INT -P %d; kill -INT %d 2>/dev/null"):format(pid, pid))
                    local gone = false
                    for _ = 1, 100 do
                        if helper.exec(("kill -0 %d 2>/dev/null"):format(pid)) ~= 0 then gone = true; break end
                        helper.exec("sleep 0.1")
                    end
                    if not gone then helper.exec(("pkill -KILL -P %d; kill -KILL %d"):format(pid, pid)) end
                    local sf = io.open(err)
                    local serr = sf and sf:read("*a") or ""
                    if sf then sf:close() end
                    for _, p in ipairs({ spath, cpath, out, err, pidf }) do os.remove(p) end
                    assert.is_truthy(port, file .. ": server.lua printed no port; its stderr:\n" .. serr)
                    assert.are.equal(0, cstatus, ("%s line %d: client.lua exited %d\n%s%s")
                                                  :format(file, b.line, cstatus, cout, cerr))
                    assert.matches("the server holds the same 1 MiB: ", cout)
                    assert.is_true(gone, "server.lua did not stop on SIGINT")
                    assert.is_nil(serr:find("UCX  ERROR", 1, true), serr)
                end)
            end
        end
    end
end)

describe("the public API", function()
    -- Each public function is called by an example that runs (the calls the
    -- examples above made); a value that is not a function (a constant, a
    -- module's table, a class such as uring.IoQueue) is named in one.
    it("is used, name by name, in an example the docs spec runs", function()
        local f = io.open(trace_path)
        if not f then
            pending("the documentation examples did not run in this busted run: no calls to check")
            return
        end
        local called = {}
        for name in f:lines() do called[name] = true end
        f:close()
        local code = {}
        for _, file in ipairs(doc_files()) do
            for _, b in ipairs(lua_blocks(read(root .. "/" .. file))) do
                if not b.norun then code[#code + 1] = b.code end
            end
        end
        code = table.concat(code, "\n")
        local missing = {}
        for _, e in ipairs(require("api_trace").walk()) do
            local name, key, value = e[1], e[2], e[4]
            local word = key:gsub("%p", "%%%0")
            if type(value) == "function" then
                if not called[name] then missing[#missing + 1] = name .. " (never called)" end
            elseif not (code:find("[%.:]" .. word .. "%f[^%w_]") or code:find("%[\"" .. word .. "\"%]")) then
                missing[#missing + 1] = name
            end
        end
        assert.same({}, missing)
    end)
end)

describe("README's Layout", function()
    -- The files of the C core and the Lua modules are named there, so that
    -- a reader finds a concept by its file: a file added (or split off)
    -- must be named, and a name must be a file.
    it("names every file of src/ and lua/pluvio/, and only files that exist", function()
        local section = read(root .. "/README.md"):match("\n## Layout\n.-```\n(.-)```")
        assert.is_string(section, "README.md has no Layout block")
        local missing, stale = {}, {}
        for _, dir in ipairs({ "src", "lua/pluvio" }) do
            local p = io.popen("unset LD_PRELOAD; ls " .. helper.quote(root .. "/" .. dir))
            for name in p:lines() do
                if name:match("%.[ch]$") or name:match("%.lua$") or name:match("%.map$") then
                    if not section:find("%f[%w_]" .. name:gsub("%p", "%%%0") .. "%f[^%w_.]") then
                        missing[#missing + 1] = dir .. "/" .. name
                    end
                end
            end
            p:close()
        end
        local line_dir
        for line in section:gmatch("[^\n]+") do
            line_dir = line:match("^(%S+/)%s") or line_dir
            local dir = line_dir == "src/" and "src/" or line_dir == "lua/pluvio/" and "lua/pluvio/"
            for name in line:gmatch("([%w_]+%.[chlmaup]+)%f[^%w_.]") do
                if dir and (name:match("%.[ch]$") or name:match("%.lua$") or name:match("%.map$"))
                        and not read(root .. "/" .. dir .. name) then
                    stale[#stale + 1] = dir .. name
                end
            end
        end
        assert.same({}, missing)
        assert.same({}, stale)
    end)
end)

describe("docs/PATTERNS.md: Measuring your own loop", function()
    -- Under load (the specs share the CPUs with builds) the runtime can be
    -- off the CPU for longer than the example's 0.2 s: its loops must still
    -- measure something, and its checks must not be about how long it took.
    it("holds when the process stalls right after the deadline is set", function()
        local code
        for _, b in ipairs(lua_blocks(read(root .. "/docs/PATTERNS.md"))) do
            if b.heading == "Measuring your own loop" and not b.norun then code = b.code end
        end
        assert.is_string(code, "no runnable example under Measuring your own loop")
        local stalled, n = code:gsub("(local deadline = bench%.stamp_after%(SECONDS%)[^\n]*\n)",
            "%1do local s = pluvio.now(); repeat until pluvio.now() - s > SECONDS + 0.05 end\n")
        assert.equal(1, n)
        local status, out, err = helper.run_script(stalled)
        assert.are.equal(0, status, err .. out)
    end)
end)

describe("make help and README's Make targets", function()
    local function targets_of_makefile()
        local text = read(root .. "/Makefile")
        local phony = {}
        for list in text:gmatch("\n%.PHONY:([^\n]*)") do
            for name in list:gmatch("%S+") do
                if name ~= "check-deps" then    -- internal: demo and bench call it
                    phony[#phony + 1] = name
                end
            end
        end
        table.sort(phony)
        return phony
    end

    it("list every target of the Makefile, and only those", function()
        local targets = targets_of_makefile()
        assert.is_true(#targets >= 10)
        local status, out = helper.sh("make -s -C " .. helper.quote(root) .. " help")
        assert.equal(0, status)
        assert.is_nil(out:find("$(", 1, true), "make help shows a Makefile variable unexpanded:\n" .. out)
        local listed = {}
        for name in out:gmatch("\n  ([%w-]+)  ") do listed[#listed + 1] = name end
        table.sort(listed)
        assert.same(targets, listed)

        local section = read(root .. "/README.md"):match("\n## Make targets\n(.-)\n## ")
        assert.is_string(section, "README.md has no Make targets section")
        local in_readme = {}
        for cell in section:gmatch("\n| ([^|]-) |") do
            for name in cell:gmatch("`([^`]+)`") do
                name = name:gsub("^make ?", "")
                in_readme[#in_readme + 1] = name == "" and "all" or name
            end
        end
        table.sort(in_readme)
        assert.same(targets, in_readme)
    end)

    it("make lint names the package to install when cppcheck is missing (make deps does not install it)", function()
        local status, out, err = helper.sh("make -s -C " .. helper.quote(root) .. " lint CPPCHECK=/nonexistent/cppcheck")
        assert.equal(2, status, out .. err)
        assert.equal("", out)
        assert.matches("make lint: /nonexistent/cppcheck not found (apt-get install -y cppcheck: make deps leaves it out)\n",
            err, 1, true)
    end)
end)
