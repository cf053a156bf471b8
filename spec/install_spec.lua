-- Packaging: make install (PREFIX, DESTDIR) and the rockspec, each into a
-- temporary tree, then the installed host and module run from there with no
-- LUA_PATH, LUA_CPATH, LD_LIBRARY_PATH or PLUVIO_LIB help.
local helper = require "helper"

local sh, q, root = helper.sh, helper.quote, helper.root

local CLEAN_ENV = "env -u PLUVIO_LIB -u PLUVIO_HOST -u LUA_PATH -u LUA_CPATH -u LD_LIBRARY_PATH -u LD_PRELOAD "
-- The Makefile takes DESTDIR and the install directories from the
-- environment (?=): unset, so that the files go where the spec says.
local INSTALL_ENV = "env -u DESTDIR -u BINDIR -u LIBDIR -u LUADIR "

local function tmpdir()
    local status, out = sh("mktemp -d")
    assert.equal(0, status)
    return (out:gsub("%s+$", ""))
end

local SCRIPT = [[
local pluvio = require "pluvio"
local t = pluvio.spawn(function(a, b) pluvio.sleep(0.001); return a + b end, 1, 2)
print(t:join(), package.searchpath("libpluvio", package.cpath))
]]

local function check_tree(tree)
    local script = tree .. "/check.lua"
    local f = assert(io.open(script, "w"))
    f:write(SCRIPT)
    f:close()
    local status, out, err = sh(CLEAN_ENV .. q(tree .. "/bin/pluvio") .. " " .. q(script))
    assert.equal(0, status, err)
    assert.equal("3\t" .. tree .. "/bin/../lib/lua/5.1/libpluvio.so\n", out)
    -- plain luajit finds the module and library through package.path / cpath
    local paths = ("LUA_PATH=%s LUA_CPATH=%s "):format(
        q(tree .. "/share/lua/5.1/?.lua;" .. tree .. "/share/lua/5.1/?/init.lua;;"),
        q(tree .. "/lib/lua/5.1/?.so;;"))
    status, out, err = sh(CLEAN_ENV .. paths .. "luajit -e " ..
        q('local p = require "pluvio"; print(p.run(function() p.sleep(0.001); return "ok" end))'))
    assert.equal(0, status, err)
    assert.equal("ok\n", out)
    -- and so does a user's busted spec of async code, with the same paths
    -- (README.md: "Three ways to use it")
    local spec = tree .. "/async_spec.lua"
    f = assert(io.open(spec, "w"))
    f:write([[
local pluvio = require "pluvio"
describe("an async function", function()
    it("sleeps in its own runtime", pluvio.wrap(function()
        local t0 = pluvio.now()
        pluvio.sleep(0.01)
        assert.is_true(pluvio.now() - t0 >= 0.01)
    end))
    it("times out", pluvio.wrap(function()
        assert.same({ nil, "timeout" }, { pluvio.timeout(0.01, pluvio.sleep, 5) })
    end))
end)
]])
    f:close()
    status, out, err = sh("cd " .. q(tree) .. " && " .. CLEAN_ENV .. paths ..    -- (away from our .busted)
                          "busted --lua=luajit -o plainTerminal async_spec.lua")
    assert.equal(0, status, out .. err)
    assert.matches("2 successes / 0 failures / 0 errors", out)
end

describe("make install", function()
    it("installs host, library and modules in LuaRocks' layout under PREFIX", function()
        local tree = tmpdir()
        local status, _, err = sh(INSTALL_ENV .. "make -s -C " .. q(root) .. " install PREFIX=" .. q(tree))
        assert.equal(0, status, err)
        check_tree(tree)
        status, _, err = sh(INSTALL_ENV .. "make -s -C " .. q(root) .. " uninstall PREFIX=" .. q(tree))
        assert.equal(0, status, err)
        status = sh("test -e " .. q(tree .. "/bin/pluvio") .. " || test -e " .. q(tree .. "/lib/lua/5.1/libpluvio.so"))
        assert.are_not.equal(0, status)
        sh("rm -rf " .. q(tree))
    end)

    it("stages into DESTDIR", function()
        local stage = tmpdir()
        local status, _, err = sh(INSTALL_ENV .. "make -s -C " .. q(root) .. " install DESTDIR=" .. q(stage) ..
                                  " PREFIX=/opt/pluvio")
        assert.equal(0, status, err)
        for _, f in ipairs({ "bin/pluvio", "lib/lua/5.1/libpluvio.so", "share/lua/5.1/pluvio/init.lua",
                             "share/lua/5.1/pluvio/cdef.lua" }) do
            assert.equal(0, (sh("test -f " .. q(stage .. "/opt/pluvio/" .. f))), f)
        end
        sh("rm -rf " .. q(stage))
    end)
end)

describe("rockspec/pluvio-scm-1.rockspec", function()
    it("builds and installs with luarocks make into a tree that works", function()
        local tree = tmpdir()
        -- UCX where luarocks is told (UCX_DIR: an HPC site's /opt/ucx, say;
        -- here links to the system's): the build uses it, and the library
        -- finds libucp there at run time
        local ucx = tmpdir()
        local libucp = io.popen("ldconfig -p | awk '/libucp.so / {print $NF; exit}'"):read("*l")
        assert.is_string(libucp)
        assert.equal(0, (sh("mkdir -p " .. q(ucx .. "/include") .. " " .. q(ucx .. "/lib") ..
                            " && ln -s /usr/include/ucp " .. q(ucx .. "/include/ucp") ..
                            " && ln -s " .. q(libucp) .. " " .. q(ucx .. "/lib/libucp.so"))))
        local status, out, err = sh("cd " .. q(root) .. " && " .. INSTALL_ENV .. "luarocks --lua-version=5.1 --tree=" ..
                                    q(tree) .. " make rockspec/pluvio-scm-1.rockspec UCX_DIR=" .. q(ucx))
        assert.equal(0, status, out .. err)
        assert.matches("-I" .. ucx .. "/include", out, 1, true)
        assert.matches("-L" .. ucx .. "/lib", out, 1, true)
        assert.matches(" -Wextra ", out, 1, true)      -- the rock's compile lines: warnings on...
        assert.is_nil(out:find("-Werror", 1, true))     -- ...but a newer compiler's do not stop the install
        local _, dyn = sh("readelf -d " .. q(tree .. "/lib/lua/5.1/libpluvio.so"))
        assert.matches(ucx .. "/lib", dyn, 1, true)     -- (RUNPATH)
        check_tree(tree)
        sh("rm -rf " .. q(tree) .. " " .. q(ucx))
    end)
end)

describe("libpluvio.so", function()
    it("says where it was looked for when it cannot be loaded", function()
        local paths = ("LUA_PATH=%s "):format(q(root .. "/lua/?.lua;" .. root .. "/lua/?/init.lua;;"))
        local status, _, err = sh(CLEAN_ENV .. paths .. "PLUVIO_LIB=/nonexistent/libpluvio.so luajit -e " ..
                                  q('require "pluvio"'))
        assert.are_not.equal(0, status)
        assert.matches("pluvio: cannot load libpluvio.so from PLUVIO_LIB (/nonexistent/libpluvio.so): " ..
                       "/nonexistent/libpluvio.so: cannot open shared object file", err, 1, true)
        -- found through package.cpath, but not a library
        local dir = tmpdir()
        assert.equal(0, (sh("echo junk > " .. q(dir .. "/libpluvio.so"))))
        status, _, err = sh(CLEAN_ENV .. paths .. "LUA_CPATH=" .. q(dir .. "/?.so") .. " luajit -e " ..
                            q('require "pluvio"'))
        assert.are_not.equal(0, status)
        assert.matches("pluvio: cannot load libpluvio.so from package.cpath (" .. dir .. "/libpluvio.so): ",
                       err, 1, true)
        sh("rm -rf " .. q(dir))
    end)

    it("is refused when it was built for another version of Pluvio than the Lua modules", function()
        -- (the modules drove whatever libpluvio.so came first on package.cpath:
        -- an older make install's, whose functions took other arguments)
        local paths = ("LUA_PATH=%s "):format(q(root .. "/lua/?.lua;" .. root .. "/lua/?/init.lua;;"))
        local dir = tmpdir()
        for _, case in ipairs({
            { 'const char *pl_abi(void) { return "12345"; }', "(its interface 12345, theirs %d+)" },
            { "int pl_something_old;", "(it has no interface stamp, theirs %d+)" },
        }) do
            local src = dir .. "/old.c"
            local f = assert(io.open(src, "w"))
            f:write(case[1], "\n")
            f:close()
            assert.equal(0, (sh("cc -shared -fPIC -o " .. q(dir .. "/libpluvio.so") .. " " .. q(src))))
            local status, _, err = sh(CLEAN_ENV .. paths .. "PLUVIO_LIB=" .. q(dir .. "/libpluvio.so") ..
                                      " luajit -e " .. q('require "pluvio"'))
            assert.are_not.equal(0, status)
            assert.matches("pluvio: the libpluvio.so at " .. dir:gsub("%p", "%%%0") .. "/libpluvio.so was built for " ..
                           "another version of Pluvio than these Lua modules " .. case[2]:gsub("[()]", "%%%0") ..
                           ": install both from one build", err)
        end
        sh("rm -rf " .. q(dir))
    end)

    it("says it needs LuaJIT when another Lua loads it (busted without --lua=luajit)", function()
        if sh("command -v lua >/dev/null && ! lua -v 2>&1 | grep -q LuaJIT") ~= 0 then
            pending("no Lua but LuaJIT installed as lua")
            return
        end
        local paths = ("LUA_PATH=%s "):format(q(root .. "/lua/?.lua;" .. root .. "/lua/?/init.lua;;"))
        local status, _, err = sh(CLEAN_ENV .. paths .. "lua -e " .. q('require "pluvio"'))
        assert.are_not.equal(0, status)
        assert.matches("^lua: pluvio: needs LuaJIT, whose FFI it is built on; this is Lua 5%.%d " ..
                       "%(run scripts with luajit or the pluvio host, and busted with %-%-lua=luajit%)\n", err)
    end)

    it("exports exactly the functions src/pluvio.h declares, and ucx_sock.c's stand-ins for libucs's sends", function()
        local lib = os.getenv("PLUVIO_LIB") or (root .. "/build/libpluvio.so")
        local status, out = sh("nm -D --defined-only " .. q(lib))
        assert.equal(0, status)
        local exported = {}
        for kind, name in out:gmatch("%x+ (%a) ([%w_]+)") do
            if kind == "T" or kind == "D" or kind == "B" then exported[name] = true end
        end
        local header = assert(io.open(root .. "/src/pluvio.h")):read("*a")
        header = header:gsub("/%*.-%*/", "")
        local declared = { ucs_socket_send_nb = true, ucs_socket_sendv_nb = true }
        for name in header:gmatch("[%w_%*]%s+%**(pl_[%w_]+)%s*%(") do declared[name] = true end
        local extra, missing = {}, {}
        for name in pairs(exported) do
            if not declared[name] then extra[#extra + 1] = name end
        end
        for name in pairs(declared) do
            if not exported[name] then missing[#missing + 1] = name end
        end
        table.sort(extra)
        table.sort(missing)
        assert.same({}, extra)      -- internal helpers stay inside (src/pluvio.map)
        assert.same({}, missing)
        assert.is_true(declared.pl_tick and declared.pl_uring_queue_take and true)
    end)
end)
