-- The example scripts and pluvio.bench: tiny runs, help, JSON, bad
-- arguments, the histogram's error bound, verification.
local helper = require "helper"
local json = require "dkjson"

local sh, q = helper.sh, helper.quote

local function run(script, args)
    return sh(q(helper.host) .. " " .. q(helper.root .. "/examples/" .. script) .. " " .. (args or ""))
end

local function run_json(script, args)
    local path = os.tmpname()
    local status, out, err = run(script, (args or "") .. " --quiet --json " .. q(path))
    local f = io.open(path)
    local text = f and f:read("*a") or ""
    if f then f:close() end
    os.remove(path)
    return status, json.decode(text), out, err
end

describe("examples/uring_bench.lua", function()
    it("runs a tiny random read and reports well-formed figures", function()
        local status, r, _, err = run_json("uring_bench.lua", "--rw randread --bs 4k --size 1m --bytes 256k --iodepth 4 --fixed")
        assert.equal(0, status, err)
        assert.equal(64, r.ops)
        assert.equal(262144, r.bytes)
        assert.equal("randread", r.rw)
        assert.is_true(r.iops > 0 and r.mib_s > 0 and r.seconds > 0)
        local l = r.lat_us
        assert.is_true(l.min <= l.p50 and l.p50 <= l.p90 and l.p90 <= l.p99 and l.p99 <= l.p99_9 and l.p99_9 <= l.max)
        assert.is_true(r.ops_per_enter >= 1)
        assert.is_number(r.cpu_seconds)
    end)

    it("writes, reads back and verifies every block, with and without O_DIRECT and registered buffers", function()
        for _, flags in ipairs({ "", "--direct", "--fixed", "--direct --fixed" }) do
            local status, r, _, err = run_json("uring_bench.lua", "--rw randwrite --bs 4k --size 512k --iodepth 8 --verify " .. flags)
            assert.equal(0, status, err)
            assert.equal(0, r.verify.bad)
            assert.equal(128, r.verify.checked)
        end
    end)

    it("makes no Lua garbage per read_fixed or write_fixed, by a task each or on an I/O queue (--gc-check)", function()
        -- the heap grows by the run's fixed part (tasks, compiled traces:
        -- 50-350 KiB, varying with what the JIT records) in a short and a
        -- long run alike; what the longer one adds is the garbage of its
        -- 200k more operations.  The smallest Lua object is 16 bytes or
        -- more: garbage on every operation, or every fourth, shows as
        -- more than 4 bytes per operation.  The fixed part may differ
        -- between the two runs (on a loaded machine the JIT recorded 850
        -- KiB more in one long run): a pair that shows more is measured
        -- again, up to three times; garbage per operation shows in every
        -- pair.
        for _, mode in ipairs({ "--rw randread", "--rw randwrite", "--rw randread --queue", "--rw randwrite --queue" }) do
            local seen = {}
            for _ = 1, 3 do
                local grown = {}
                for i, ops in ipairs({ 20000, 220000 }) do
                    local status, r, _, err = run_json("uring_bench.lua", mode .. " --bs 4k --size 4m --iodepth 32 " ..
                                                       "--fixed --gc-check --bytes " .. ops * 4096)
                    assert.equal(0, status, err)
                    assert.equal(ops, r.ops)
                    grown[i] = r.lua_heap.grown_kib * 1024
                end
                seen[#seen + 1] = (grown[2] - grown[1]) / 200000
                if seen[#seen] < 4 then break end
            end
            assert.is_true(seen[#seen] < 4, mode .. ": bytes of Lua heap per operation: " .. table.concat(seen, ", "))
        end
    end)

    it("makes the --file of a write test that is not there yet", function()
        local path = os.tmpname()
        os.remove(path)
        local status, _, err = run("uring_bench.lua", "--rw randwrite --bs 4k --size 64k --quiet --file " .. q(path))
        local f = io.open(path, "rb")
        local size = f and f:seek("end")
        if f then f:close() end
        os.remove(path)
        assert.equal(0, status, err)
        assert.is_true(size > 0 and size <= 65536, tostring(size))
    end)

    it("detects a corrupted block with --verify", function()
        local path = os.tmpname()
        -- written with --verify: every block carries the pattern of its offset
        local status, _, err = run("uring_bench.lua", "--rw write --verify --bs 4k --size 256k --file " .. q(path) .. " --quiet")
        assert.equal(0, status, err)
        local f = io.open(path, "r+b")
        f:seek("set", 8192 + 100)
        f:write("CORRUPT")
        f:close()
        status, _, err = run("uring_bench.lua", "--rw read --bs 4k --size 256k --verify --file " .. q(path) .. " --quiet")
        os.remove(path)
        assert.equal(1, status)
        assert.matches("verify failed: 1 of 64 blocks differ", err)
    end)

    it("prints help and rejects bad arguments with one line and a non-zero exit", function()
        local status, out = run("uring_bench.lua", "--help")
        assert.equal(0, status)
        assert.matches("^usage: pluvio examples/uring_bench.lua", out)
        for args, msg in pairs({
            ["--bogus 1"] = "uring_bench: unknown option %-%-bogus %(see %-%-help%)",
            ["--bs 0"] = "uring_bench: %-%-bs must be > 0",
            ["--bs 3000 --direct"] = "uring_bench: %-%-bs 3000 with %-%-direct",
            ["--size 10000 --bs 4096"] = "uring_bench: %-%-size 10000 is not a multiple of %-%-bs 4096",
            ["--rw sideways"] = "uring_bench: %-%-rw must be read, write, randread, randwrite or rw",
            ["--iodepth x"] = "uring_bench: %-%-iodepth must be an integer %(got x%)",
        }) do
            local st, _, err = run("uring_bench.lua", args)
            assert.are_not.equal(0, st, args)
            assert.matches("^" .. msg, err)
            assert.equal(1, select(2, err:gsub("\n", "")), "one line for " .. args)
        end
    end)
end)

describe("the scripts' --help", function()
    it("lines up every option's text, continuation lines included", function()
        for _, script in ipairs({ "pipeline.lua", "uring_bench.lua", "remoteio.lua", "ucx_bench.lua",
                                  "runtime_bench.lua", "bench_compare.lua", "uring_floor.lua" }) do
            local status, out = run(script, "--help")
            assert.equal(0, status, script)
            local options = out:match("\noptions:\n(.*)$")
            assert.is_string(options, script)
            for line in options:gmatch("[^\n]+") do
                assert.is_truthy(line:match("^  %-%-%S") or line:match("^" .. (" "):rep(27) .. "%S"),
                    script .. ": " .. line)
            end
        end
    end)

    it("states each option's default once, as the script applies it", function()
        for _, script in ipairs({ "pipeline.lua", "uring_bench.lua", "remoteio.lua", "ucx_bench.lua",
                                  "runtime_bench.lua", "bench_compare.lua", "uring_floor.lua" }) do
            local status, out = run(script, "--help")
            assert.equal(0, status, script)
            for line in out:gmatch("[^\n]+") do
                assert.is_true(select(2, line:gsub("%(default", "")) <= 1, script .. ": " .. line)
            end
        end
        local st, _, err = run("bench_compare.lua", "--cpu -2 --output -")
        assert.equal(2, st)
        assert.matches("^bench_compare: %-%-cpu must be %-1 %(no pinning%) or a CPU from 0 to %d+ %(got %-2%)\n$", err)
    end)
end)

local function slurp(path)
    local f = io.open(path)
    local s = f and f:read("*a") or ""
    if f then f:close() end
    return s
end

-- A script in the background; returns a handle on its stdout and the
-- process: { errfile =, rcfile =, pidfile = }.
local function background(script, args)
    local p = { errfile = os.tmpname(), rcfile = os.tmpname(), pidfile = os.tmpname() }
    local out = io.popen(("(%s %s %s 2>%s & echo $! >%s; wait $!; echo $? >%s) 2>/dev/null &"):format(q(helper.host),
        q(helper.root .. "/examples/" .. script), args, q(p.errfile), q(p.pidfile), q(p.rcfile)), "r")
    return out, p
end

-- Its exit status and stderr, once it ended; a hang fails the spec
-- (after 60 s, the process killed) rather than stopping it.
local function finished(p)
    local rc
    for _ = 1, 600 do
        rc = tonumber(slurp(p.rcfile))
        if rc then break end
        helper.exec("sleep 0.1")
    end
    if not rc then helper.exec("kill -KILL " .. slurp(p.pidfile)) end
    local err = slurp(p.errfile)
    os.remove(p.errfile)
    os.remove(p.rcfile)
    os.remove(p.pidfile)
    return rc, err
end

describe("examples/ucx_bench.lua", function()
    it("measures latency and bandwidth in one process and counts what it sent", function()
        local status, r, _, err = run_json("ucx_bench.lua", "--loopback --sizes 8,64k --iters 50 --warmup 5")
        assert.equal(0, status, err)
        assert.equal(2, #r.results)
        for _, e in ipairs(r.results) do
            assert.is_true(e.lat_us.p50 > 0 and e.lat_us.p50 <= e.lat_us.p99 and e.lat_us.count == 50)
            assert.equal(50, e.bw.messages)
            assert.equal(55, e.bw.receiver_messages)      -- warm-up included, as sent
            assert.is_true(e.bw.mib_s > 0)
        end
    end)

    it("copies eager data into a buffer too with --recv-copy", function()
        local status, r, _, err = run_json("ucx_bench.lua", "--loopback --sizes 4k --iters 20 --warmup 2 --recv-copy")
        assert.equal(0, status, err)
        assert.equal(20, r.results[1].lat_us.count)
        assert.equal(22, r.results[1].bw.receiver_messages)
    end)

    -- A ucx_bench server in the background on a port of its own choosing
    -- (a fixed or random one may be held by another run or service), and
    -- client(port) run once it listens; returns the server's exit status
    -- and stderr, then the client's results.
    local function server_and_client(server_args, client)
        local srv, proc = background("ucx_bench.lua", "--server --port 0 " .. server_args)
        local line = srv:read("*l")
        local port = line and tonumber(line:match("^ucx_bench: listening on 127%.0%.0%.1:(%d+)$"))
        if not port then
            srv:close()
            error("the server did not start: " .. tostring(line) .. "\n" .. select(2, finished(proc)))
        end
        local function pack(...) return { n = select("#", ...), ... } end
        local r = pack(client(port))
        local server_status, server_err = finished(proc)
        srv:close()
        return server_status, server_err, unpack(r, 1, r.n)
    end

    it("runs as a server and a client process", function()
        local server_status, server_err, status, r, _, err = server_and_client("", function(port)
            return run_json("ucx_bench.lua", ("--connect 127.0.0.1:%d --sizes 4k --iters 20 --warmup 2"):format(port))
        end)
        assert.equal(0, status, err .. "\nserver: " .. server_err)
        assert.equal(20, r.results[1].bw.messages)
        assert.equal(0, server_status, server_err)
    end)

    it("stops both ends with a one-line error when their --transport differs", function()
        local server_status, server_err, status, _, err = server_and_client("--transport address", function(port)
            return run("ucx_bench.lua", ("--connect 127.0.0.1:%d --transport socket --iters 5"):format(port))
        end)
        assert.equal(2, status)
        assert.matches("ucx_bench: the server uses %-%-transport address, this end %-%-transport socket: " ..
                       "give both ends the same\n$", err)
        assert.equal(2, server_status)      -- the server stops too
        assert.equal("ucx_bench: the client uses --transport socket, this end --transport address: " ..
                     "give both ends the same\n", server_err)
    end)

    -- (the server's receiving task raised, nobody joined it, and both ends
    -- waited for good; a peer that went away gave tracebacks, or exit 0)
    it("stops both ends in one line each when their --sizes differ, over either transport", function()
        for _, transport in ipairs({ "socket", "address" }) do
            local server_status, server_err, status, _, err = server_and_client(
                "--sizes 8 --transport " .. transport, function(port)
                    return run("ucx_bench.lua", ("--connect 127.0.0.1:%d --sizes 8,1m --iters 20 --warmup 2 " ..
                                                 "--transport %s"):format(port, transport))
                end)
            assert.equal(2, server_status, server_err)
            assert.equal("ucx_bench: a message of 1048576 bytes is larger than this end's largest --sizes " ..
                         "(4096 bytes): give both ends the same --sizes\n", server_err)
            assert.equal(2, status, err)
            assert.matches("^ucx_bench: [^\n]+\n$", err)        -- one line, no traceback
            if transport == "address" then      -- (no peer errors there: the watchdog)
                assert.matches("nothing came from or went to the server for 10 s", err, 1, true)
            end
        end
    end)

    it("gives a one-line error for an unreachable peer and bad arguments", function()
        local status, _, err = run("ucx_bench.lua", "--connect 127.0.0.1:1 --iters 1")
        assert.are_not.equal(0, status)
        assert.matches("^ucx_bench: connect to 127%.0%.0%.1:1: ", err)
        status, _, err = run("ucx_bench.lua", "--test sideways")
        assert.equal(2, status)
        assert.matches("^ucx_bench: %-%-test must be lat, bw or both", err)
        status, _, err = run("ucx_bench.lua", "--connect nowhere")
        assert.equal(2, status)
        assert.matches("^ucx_bench: %-%-connect must be HOST:PORT", err)
    end)
end)

describe("examples/bench_compare.lua", function()
    it("refuses a CPU this machine does not have, in one line", function()
        local status, _, err = run("bench_compare.lua", "--cpu 4096 --output -")
        assert.equal(2, status)
        assert.matches("^bench_compare: %-%-cpu must be %-1 %(no pinning%) or a CPU from 0 to %d+ %(got 4096%)\n$", err)
    end)

    it("refuses a --match that no test name contains, before running anything", function()
        local status, out, err = run("bench_compare.lua", "--match 'no such test' --output -")
        assert.equal(2, status)
        assert.equal("", out)
        assert.equal('bench_compare: --match: no test name contains "no such test"\n', err)
    end)
end)

describe("examples/pipeline.lua", function()
    it("moves a file through io_uring and UCX and verifies it", function()
        local status, r, _, err = run_json("pipeline.lua", "--size 4m --chunk 256k --window 4")
        assert.equal(0, status, err)
        assert.is_true(r.ok)
        assert.equal(r.source_checksum, r.received_checksum)
        assert.equal(4194304, r.size)
        assert.is_true(r.mib_s > 0)
    end)

    it("prints help and rejects bad arguments", function()
        local status, out = run("pipeline.lua", "--help")
        assert.equal(0, status)
        assert.matches("^usage: pluvio examples/pipeline.lua", out)
        local st, _, err = run("pipeline.lua", "--chunk 1000")
        assert.equal(2, st)
        assert.matches("^pipeline: %-%-chunk must be a multiple of 4096", err)
        st, _, err = run("pipeline.lua", "--size 8k")
        assert.equal(2, st)
        assert.equal("pipeline: --size must be at least --chunk 1048576 (got 8192)\n", err)
    end)

    it("reports a transfer of less than a MiB in KiB, not as 0 MiB", function()
        local status, out, err = run("pipeline.lua", "--size 64k --chunk 16k --quiet")
        assert.equal(0, status, err)
        assert.matches("pipeline: 64 KiB of data, 16 KiB chunks", out, 1, true)
        assert.matches("2-4. read, sent, received, written 64 KiB ", out, 1, true)
    end)

    it("removes the files it wrote into --dir, unless --keep", function()
        local dir = helper.tmp_path()
        assert(helper.exec("mkdir " .. q(dir)) == 0)
        local status, _, err = run("pipeline.lua", "--size 64k --chunk 16k --quiet --dir " .. q(dir))
        assert.equal(0, status, err)
        assert.equal("", select(2, sh("ls -A " .. q(dir))))
        status, _, err = run("pipeline.lua", "--size 64k --chunk 16k --quiet --keep --dir " .. q(dir))
        assert.equal(0, status, err)
        assert.equal("received.bin\nsource.bin\n", select(2, sh("ls -A " .. q(dir))))
        helper.exec("rm -r " .. q(dir))
    end)

    it("fails on a --connect nobody answers before it writes its file", function()
        local dir = helper.tmp_path()
        assert(helper.exec("mkdir " .. q(dir)) == 0)
        local status, out, err = run("pipeline.lua", "--connect 127.0.0.1:1 --keep --dir " .. q(dir))
        assert.equal(2, status, out .. err)
        assert.matches("^pipeline: connect to 127.0.0.1:1: ", err)
        assert.equal("", select(2, sh("ls -A " .. q(dir))))     -- (64 MiB were written first)
        helper.exec("rm -r " .. q(dir))
    end)
end)

-- A --dir whose `name` is /dev/full: every write to that file fails with
-- ENOSPC, as on a full disk (no mount needed).
local function full_dir(name)
    local dir = helper.tmp_path()
    assert(helper.exec("mkdir " .. q(dir) .. " && ln -s /dev/full " .. q(dir .. "/" .. name)) == 0)
    return dir
end

describe("examples/pipeline.lua stopped by SIGTERM", function()
    -- (the host cancels the run's tasks and the script's on_exit clean-up
    -- removes the files: a stopped demo left up to gigabytes behind)
    it("removes its files from the --dir and dies of the signal", function()
        local dir = helper.tmp_path(".d")
        assert.equal(0, helper.exec("mkdir " .. q(dir)))
        finally(function() helper.exec("rm -rf " .. q(dir)) end)
        local out, proc = background("pipeline.lua", "--size 8g --quiet --dir " .. q(dir))
        local made
        for _ = 1, 1500 do
            made = io.open(dir .. "/source.bin")
            if made or slurp(proc.rcfile) ~= "" then break end
            helper.exec("sleep 0.02")
        end
        assert(made, "pipeline never made its source file")
        made:close()
        assert.equal(0, helper.exec("kill -TERM " .. slurp(proc.pidfile)))
        local status, err = finished(proc)
        out:close()
        assert.equal(143, status, err)
        assert.equal("", err)
        local left = io.popen("ls -A " .. q(dir)):read("*a")
        assert.equal("", left)
    end)
end)

describe("examples/pipeline.lua and remoteio.lua as two processes", function()
    it("listen on the address --host names, so that another machine can connect", function()
        for script, word in pairs({ ["pipeline.lua"] = "receiving on", ["remoteio.lua"] = "serving on" }) do
            local srv, proc = background(script, "--server --quiet --host 0.0.0.0")
            local line = srv:read("*l")
            local port = line and line:match(word .. " 0%.0%.0%.0:(%d+)")
            if not port then
                srv:close()
                error(script .. ": the server did not start: " .. tostring(line) .. "\n" .. select(2, finished(proc)))
            end
            local status, _, err = sh("timeout 60 " .. q(helper.host) .. " " .. q(helper.root .. "/examples/" .. script) ..
                                      " --connect 127.0.0.1:" .. port .. " --size 1m --quiet")
            local server_status, server_err = finished(proc)
            srv:close()
            assert.equal(0, status, script .. ": " .. err)
            assert.equal(0, server_status, script .. ": " .. server_err)
        end
    end)
end)

describe("examples/pipeline.lua on a full disk", function()
    it("stops with the write's error, one line and exit 2, when either file cannot be written", function()
        for _, name in ipairs({ "source.bin", "received.bin" }) do
            local dir = full_dir(name)
            local status, _, err = sh("timeout 60 " .. q(helper.host) .. " " .. q(helper.root .. "/examples/pipeline.lua") ..
                                      " --size 1m --chunk 256k --quiet --dir " .. q(dir))
            helper.exec("rm -rf " .. q(dir))
            assert.equal(2, status, name .. ": " .. err)
            assert.matches("^pipeline: write [^\n]*/" .. name:gsub("%.", "%%.") ..
                           " %(offset %d+, %d+ bytes%): ENOSPC: No space left on device\n$", err)
        end
    end)

    it("tells the client why when the server's disk is full, and both ends exit 2", function()
        local dir = full_dir("received.bin")
        local srv, proc = background("pipeline.lua", "--server --quiet --dir " .. q(dir))
        local line = srv:read("*l")
        local port = line and line:match("receiving on 127%.0%.0%.1:(%d+)")
        if not port then
            srv:close()
            error("the server did not start: " .. tostring(line) .. "\n" .. select(2, finished(proc)))
        end
        local status, _, err = sh("timeout 60 " .. q(helper.host) .. " " .. q(helper.root .. "/examples/pipeline.lua") ..
                                  " --connect 127.0.0.1:" .. port .. " --size 8m --quiet")
        local server_status, server_err = finished(proc)
        srv:close()
        helper.exec("rm -rf " .. q(dir))
        assert.equal(2, status, err)
        assert.matches("^pipeline: the server stopped: write [^\n]*/received%.bin %(offset %d+, %d+ bytes%): ENOSPC", err)
        assert.equal(1, select(2, err:gsub("\n", "")))
        assert.equal(2, server_status, server_err)
        assert.matches("^pipeline: write [^\n]*/received%.bin %(offset %d+, %d+ bytes%): ENOSPC[^\n]*\n$", server_err)
    end)
end)

describe("examples/remoteio.lua", function()
    -- (a server said it was receiving into a read-only --dir, and failed
    -- only once a client had made and started sending its data)
    it("refuses, as pipeline does, to serve into a --dir it cannot write, before it listens", function()
        local dir = helper.tmp_path(".d")
        assert.equal(0, helper.exec("mkdir " .. q(dir)))
        finally(function() helper.exec("umount " .. q(dir) .. " 2>/dev/null; rm -rf " .. q(dir)) end)
        if helper.exec("mount --bind " .. q(dir) .. " " .. q(dir) .. " 2>/dev/null && mount -o remount,bind,ro " ..
                       q(dir) .. " 2>/dev/null") ~= 0 then
            pending("mount is not permitted here: no read-only directory to serve into")
            return
        end
        for _, case in ipairs({ { "pipeline.lua", "received.bin" }, { "remoteio.lua", "server.bin" } }) do
            local status, out, err = sh("timeout 20 " .. q(helper.host) .. " " .. q(helper.root .. "/examples/" ..
                                        case[1]) .. " --server --port 0 --dir " .. q(dir))  -- (a regression waits for a client)
            assert.equal(2, status, err)
            assert.equal("", out)               -- (no "receiving on ..." first)
            assert.equal(("%s: cannot write %s/%s: Read-only file system\n"):format(case[1]:match("^(%w+)"), dir,
                                                                                  case[2]), err)
        end
    end)

    -- (its files stayed in a --dir, a failed run's partial ones too, and
    -- it had no --keep)
    it("removes its files from a --dir unless --keep, and so does pipeline after a failure", function()
        local dir = helper.tmp_path(".d")
        assert.equal(0, helper.exec("mkdir " .. q(dir)))
        finally(function() helper.exec("umount " .. q(dir) .. " 2>/dev/null; rm -rf " .. q(dir)) end)
        local function files()
            local _, out = sh("ls " .. q(dir))
            return out
        end
        local status, _, err = run("remoteio.lua", "--size 1m --chunk 256k --dir " .. q(dir))
        assert.equal(0, status, err)
        assert.equal("", files())
        status, _, err = run("remoteio.lua", "--size 1m --chunk 256k --keep --dir " .. q(dir))
        assert.equal(0, status, err)
        assert.equal("client.bin\nserver.bin\n", files())
        helper.exec("rm -f " .. q(dir) .. "/*")
        if helper.exec("mount -t tmpfs -o size=2m tmpfs " .. q(dir) .. " 2>/dev/null") ~= 0 then
            pending("mount is not permitted here: pipeline's clean-up after ENOSPC is not tested")
            return
        end
        status, _, err = run("pipeline.lua", "--size 4m --chunk 256k --quiet --dir " .. q(dir))
        assert.equal(2, status, err)
        assert.matches("ENOSPC", err, 1, true)
        assert.equal("", files())                        -- the partial source.bin went too
    end)

    it("writes a file to the server and reads one back, verified by checksum on both ends", function()
        for _, mode in ipairs({ "write", "read" }) do
            local status, r, _, err = run_json("remoteio.lua", "--mode " .. mode .. " --size 2m --chunk 256k --window 4")
            assert.equal(0, status, err)
            assert.is_true(r.ok)
            assert.equal(r.local_checksum, r.remote_checksum)
            assert.equal(mode, r.mode)
            assert.is_true(r.mib_s > 0)
        end
    end)

    it("rejects bad arguments", function()
        local status, _, err = run("remoteio.lua", "--mode sideways")
        assert.equal(2, status)
        assert.matches("^remoteio: %-%-mode must be write or read", err)
        status, _, err = run("remoteio.lua", "--size 8k")
        assert.equal(2, status)
        assert.equal("remoteio: --size must be at least --chunk 1048576 (got 8192)\n", err)
        status, _, err = run("remoteio.lua", "--size 1048577")
        assert.equal(2, status)
        assert.equal("remoteio: --size must be a multiple of 4096 (got 1048577)\n", err)
    end)

    it("agrees with a server that has another --chunk, and refuses one larger than the server's", function()
        local function server(port)
            return io.popen(q(helper.host) .. " " .. q(helper.root .. "/examples/remoteio.lua") ..
                            " --server --quiet --port " .. port .. " 2>&1", "r")
        end
        -- (port 0, a free port: the line says which; any other may be held)
        local srv = server(0)
        local port = tonumber(srv:read("*l"):match("serving on [%d.]+:(%d+)"))
        assert.is_number(port)
        local status, out, err = run("remoteio.lua", "--connect 127.0.0.1:" .. port .. " --size 1m --chunk 64k --quiet")
        srv:close()
        assert.equal(0, status, err)
        assert.matches("checksums: client (%x+), server %1: match", out)
        srv = server(0)
        port = tonumber(srv:read("*l"):match("serving on [%d.]+:(%d+)"))
        assert.is_number(port)
        status, _, err = run("remoteio.lua", "--connect 127.0.0.1:" .. port .. " --size 4m --chunk 2m --quiet")
        srv:close()
        assert.equal(2, status)
        assert.equal("remoteio: --chunk 2 MiB is larger than the server's --chunk 1 MiB (the size of its buffers)\n", err)
    end)
end)

describe("examples/remoteio.lua when something fails", function()
    local function remoteio(args)
        return sh("timeout 60 " .. q(helper.host) .. " " .. q(helper.root .. "/examples/remoteio.lua") .. " " .. args)
    end

    -- A --server in the background with args; returns its port and what
    -- finished() needs.
    local function server(args)
        local srv, proc = background("remoteio.lua", "--server --quiet " .. args)
        local line = srv:read("*l")
        local port = line and line:match("serving on 127%.0%.0%.1:(%d+)")
        if not port then
            srv:close()
            error("the server did not start: " .. tostring(line) .. "\n" .. select(2, finished(proc)))
        end
        return port, srv, proc
    end

    it("stops with the write's error, one line and exit 2, when either end's file cannot be written", function()
        for _, name in ipairs({ "server.bin", "client.bin" }) do
            for _, mode in ipairs({ "write", "read" }) do
                local dir = full_dir(name)
                local status, _, err = remoteio("--mode " .. mode .. " --size 1m --chunk 256k --quiet --dir " .. q(dir))
                helper.exec("rm -rf " .. q(dir))
                assert.equal(2, status, name .. " " .. mode .. ": " .. err)
                assert.matches("^remoteio: write [^\n]*/" .. name:gsub("%.", "%%.") ..
                               " %(offset %d+, %d+ bytes%): ENOSPC: No space left on device\n$", err)
            end
        end
    end)

    it("tells the client why when the server's disk is full", function()
        local dir = full_dir("server.bin")
        local port, srv, proc = server("--dir " .. q(dir))
        local status, _, err = remoteio("--connect 127.0.0.1:" .. port .. " --size 4m --quiet")
        local server_status, server_err = finished(proc)
        srv:close()
        helper.exec("rm -rf " .. q(dir))
        assert.equal(2, status, err)
        assert.matches("^remoteio: the server stopped: write [^\n]*/server%.bin %(offset %d+, %d+ bytes%): ENOSPC[^\n]*\n$", err)
        assert.equal(2, server_status, server_err)
        assert.matches("^remoteio: write [^\n]*/server%.bin %(offset %d+, %d+ bytes%): ENOSPC[^\n]*\n$", server_err)
    end)

    it("ends the client with one line and exit 2, not a deadlock, when the server is killed mid-transfer", function()
        local dir = helper.tmp_path()
        assert(helper.exec("mkdir " .. q(dir)) == 0)
        local port, srv, proc = server("--dir " .. q(dir))
        local cli, client = background("remoteio.lua", "--connect 127.0.0.1:" .. port .. " --size 512m --quiet")
        -- the server's file grows: the transfer is under way
        assert.equal(0, helper.exec("for i in $(seq 3000); do [ -s " .. q(dir .. "/server.bin") ..
                                    " ] && break; sleep 0.01; done; kill -KILL " .. slurp(proc.pidfile)))
        local status, err = finished(client)
        cli:close()
        finished(proc)
        srv:close()
        helper.exec("rm -rf " .. q(dir))
        assert.equal(2, status, err)
        assert.matches("^remoteio: [^\n]+\n$", err)
        assert.not_matches("deadlock", err)
    end)
end)

describe("the scripts' option parser", function()
    it("rejects what is not a plain decimal number, a value given to a flag, out-of-range values and unwritable reports", function()
        local cases = {
            { "uring_bench.lua", "--runtime 0x10", "^uring_bench: %-%-runtime must be a number %(got 0x10%)" },
            { "uring_bench.lua", "--runtime inf", "^uring_bench: %-%-runtime must be a number %(got inf%)" },
            { "uring_bench.lua", "--runtime nan", "^uring_bench: %-%-runtime must be a number %(got nan%)" },
            { "uring_bench.lua", "--fixed=no", "^uring_bench: %-%-fixed takes no value %(got %-%-fixed=no%)" },
            { "uring_bench.lua", "--seed -5", "^uring_bench: %-%-seed must be from 0 to" },
            { "ucx_bench.lua", "--port 70000", "^ucx_bench: %-%-port must be from 0 to 65535 %(got 70000%)" },
            { "ucx_bench.lua", "--sizes ,", "^ucx_bench: %-%-sizes needs at least one size" },
            { "pipeline.lua", "--port -1", "^pipeline: %-%-port must be from 0 to 65535 %(got %-1%)" },
            { "runtime_bench.lua", "--idle-seconds -1", "^runtime_bench: %-%-idle%-seconds must be from 0.01 to 3600" },
            { "bench_compare.lua", "--rounds 0", "^bench_compare: %-%-rounds must be from 1 to 1000 %(got 0%)" },
            { "bench_compare.lua", "--only foo", "^bench_compare: %-%-only must be uring or ucx %(got foo%)" },
            { "uring_bench.lua", "--json /nonexistent/x.json", "^uring_bench: %-%-json: cannot write /nonexistent/x.json" },
            { "pipeline.lua", "--dir /nonexistent", "^pipeline: %-%-dir /nonexistent does not exist" },
            { "pipeline.lua", "--dir /etc/passwd", "^pipeline: %-%-dir /etc/passwd is not a directory" },
            { "remoteio.lua", "--dir /etc/passwd", "^remoteio: %-%-dir /etc/passwd is not a directory" },
        }
        for _, c in ipairs(cases) do
            local status, _, err = run(c[1], c[2])
            assert.equal(2, status, c[1] .. " " .. c[2] .. ": " .. err)
            assert.matches(c[3], err)
            assert.equal(1, select(2, err:gsub("\n", "")))     -- one line
        end
    end)

    it("takes a default written as on the command line (\"4k\") as the value it stands for", function()
        local bench = require "pluvio.bench"
        local spec = { options = {
            { "bs", "size", "4k", "block size" },
            { "sizes", "list", "8,64k", "message sizes" },
            { "iodepth", "integer", "32", "reads in flight" },
            { "name", "string", "run", "a label" },
        } }
        local o = bench.parse_args(spec, {})
        assert.same({ bs = 4096, sizes = { 8, 65536 }, iodepth = 32, name = "run" }, o)
        assert.equal(8192, bench.parse_args(spec, { "--bs", "8k" }).bs)
        assert.matches("(default 4k)", bench.help(spec), 1, true)
        spec.options[1][3] = "lots"
        assert.has_error(function() bench.parse_args(spec, {}) end,
                         "bench.parse_args: the default of --bs must be a size like 4096, 4k, 1m or 1g (got lots)")
    end)

    it("names the bound an option broke when it has only a max, or only a min", function()
        local code = [[
            local bench = require "pluvio.bench"
            bench.parse_args({ name = "mine", options = {
                { "n", "integer", 1, "n", max = 4 }, { "m", "integer", 1, "m", min = 1 } } }, arg)
        ]]
        local status, _, err = sh("printf %s " .. q(code) .. " | " .. q(helper.host) .. " - --n 9")
        assert.equal(2, status)
        assert.equal("mine: --n must be at most 4 (got 9) (see --help)\n", err)
        status, _, err = sh("printf %s " .. q(code) .. " | " .. q(helper.host) .. " - --m 0")
        assert.equal(2, status)
        assert.equal("mine: --m must be at least 1 (got 0) (see --help)\n", err)
    end)

    it("keeps stdout for the JSON alone with --json -", function()
        local status, out, err = run("uring_bench.lua", "--size 256k --bytes 64k --iodepth 2 --quiet --json -")
        assert.equal(0, status, err)
        assert.is_table(json.decode(out))
        assert.matches("IOPS", err)
    end)
end)

describe("examples/runtime_bench.lua", function()
    it("measures spawning, ping-pong, sleepers and idling at tiny sizes", function()
        local path = os.tmpname()
        local status, _, err = run("runtime_bench.lua", "--quick --n 2000 --json " .. q(path))
        local f = io.open(path)
        local r = json.decode(f:read("*a"))
        f:close()
        os.remove(path)
        assert.equal(0, status, err)
        assert.equal(2000, r.spawn.tasks)
        assert.is_true(r.spawn.tasks_per_s > 0)
        assert.equal(4000, r.pingpong.messages)
        assert.equal(2000, r.sleepers.tasks)
        assert.is_true(r.sleepers.late_ms.p50 >= 0 and r.sleepers.late_ms.p50 <= r.sleepers.late_ms.max)
        assert.is_true(r.idle.cpu_percent >= 0)
        local st, _, e2 = run("runtime_bench.lua", "--scenario nope")
        assert.equal(2, st)
        assert.matches("^runtime_bench: %-%-scenario must be", e2)
    end)
end)

describe("pluvio.bench", function()
    local bench = require "pluvio.bench"

    it("gives percentiles within 0.4% of a sorted-array computation", function()
        local h = bench.Histogram.new()
        local values = {}
        math.randomseed(7)
        for i = 1, 50000 do
            local v = math.exp(math.random() * 12) * 1e-6       -- 1 us .. 160 ms
            values[i] = v
            h:record(v)
        end
        table.sort(values)
        for _, p in ipairs({ 1, 10, 50, 90, 99, 99.9 }) do
            local exact = values[math.ceil(p / 100 * #values)]
            local got = h:percentile(p)
            assert.is_true(math.abs(got - exact) / exact <= 0.004, ("p%g: %g vs %g"):format(p, got, exact))
        end
        assert.equal(50000, h:count())
        assert.near(values[#values], h:max(), 1e-9)
    end)

    it("says so when a report cannot be written in full (a full disk)", function()
        local ok, err = pcall(bench.write_json, "/dev/full", { iops = 1 })
        assert.is_false(ok)
        assert.matches("bench.write_json: cannot write /dev/full: .*No space left on device", err)
        local none, why = bench.svg("/dev/full", { title = "t" })
        assert.is_nil(none)
        assert.matches("svg: cannot write /dev/full: .*No space left on device", why)
    end)

    it("merges histograms and summarises them", function()
        local a, b = bench.Histogram.new(), bench.Histogram.new()
        for i = 1, 100 do a:record(i * 1e-6) end
        for i = 101, 200 do b:record(i * 1e-6) end
        a:merge(b)
        local s = a:summary()
        assert.equal(200, s.count)
        assert.near(100.5e-6, s.mean, 1e-9)
        assert.near(100e-6, s.p50, 1e-6)
        assert.has_error(function() a:percentile(101) end, "Histogram:percentile: p must be a finite number from 0 to 100 (got 101)")
    end)

    it("encodes JSON and parses sizes", function()
        assert.equal('{"a":[1,2.5,"x"],"b":true}', bench.json({ a = { 1, 2.5, "x" }, b = true }))
        assert.equal(4096, bench.parse_size("4k"))
        assert.equal(1048576, bench.parse_size("1MiB"))
        assert.is_nil(bench.parse_size("lots"))
        assert.equal("64 KiB", bench.bytes(65536))
    end)

    it("encodes every key and value of a table: mixed, sparse and non-string keys included", function()
        assert.equal('{"1":1,"2":2,"name":"x"}', bench.json({ 1, 2, name = "x" }))
        assert.equal('[1,null,3]', bench.json({ 1, nil, 3 }))
        assert.equal('[null,"x"]', bench.json({ [2] = "x" }))
        assert.equal('{"1.5":"half","true":1}', bench.json({ [true] = 1, [1.5] = "half" }))
        assert.equal('{"1":"a","1000":"b"}', bench.json({ "a", [1000] = "b" }))   -- too sparse for an array
        assert.same({ a = { 1, 2 }, b = { c = "d" } },
                    bench.json_decode(bench.json({ a = { 1, 2 }, b = { c = "d" } })))
    end)

    it("decodes \\u escapes beyond ASCII to UTF-8, surrogate pairs included", function()
        assert.equal("A\195\169\226\130\172\240\159\152\128",
                     bench.json_decode('"\\u0041\\u00e9\\u20ac\\ud83d\\ude00"'))
        assert.equal("caf\195\169", bench.json_decode(bench.json("caf\195\169")))
        assert.same({ nil, "bad \\u escape at byte 1" }, { bench.json_decode('"\\u12"') })
    end)

    it("takes the nearest rank of p99.9 of 1000 values as the 999th, not the largest", function()
        local h = bench.Histogram.new()
        for _ = 1, 999 do h:record(0.001) end
        h:record(1)
        assert.near(0.001, h:percentile(99.9), 0.001 * 0.004)
        local k = bench.Histogram.new()
        for _ = 1, 9990 do k:record(0.002) end
        for _ = 1, 10 do k:record(3) end
        assert.near(0.002, k:percentile(99.9), 0.002 * 0.004)
    end)

    it("records values too large for its nanosecond counts as the largest, not as 0", function()
        local h = bench.Histogram.new()
        h:record(0.001)
        h:record(math.huge)
        h:record(1e30)
        assert.equal(3, h:count())
        assert.is_true(h:max() > 1e10)
        assert.is_true(h:percentile(90) > 1e5)             -- the last bucket (2^48 ns and up)
        assert.near(0.001, h:min(), 1e-9)
    end)

    -- (a start of NaN or infinity recorded 0, one of minus infinity the
    -- largest value: a timing bug, never a duration)
    it("refuses a start or stamp that is not a finite number", function()
        local h = bench.Histogram.new()
        for _, bad in ipairs({ -math.huge, math.huge, 0 / 0 }) do
            assert.has_error(function() h:record_since(bad) end,
                ("Histogram:record_since: start must be a finite number (a pluvio.now()) (got %s)"):format(tostring(bad)))
            assert.has_error(function() h:record_stamp(bad) end,
                ("Histogram:record_stamp: stamp must be a finite number (a bench.stamp()) (got %s)"):format(tostring(bad)))
        end
        assert.equal(0, h:count())
    end)

    it("writes numbers that read back the same, 64-bit integers as numbers, and byte counts as given", function()
        local ffi = require "ffi"
        local t = 1234567.123456789
        assert.equal(t, bench.json_decode(bench.json(t)))
        assert.equal("0.1", bench.json(0.1))
        assert.equal("[42,null]", bench.json({ 42ULL, 0 / 0 }))
        assert.has_error(function() bench.json({ ffi.new("int[1]") }) end)    -- a pointer: no number to write
        assert.equal("1.5 B", bench.bytes(1.5))
        assert.equal("1 KiB", bench.bytes(1024))
    end)

    it("names the argument a helper was given wrong", function()
        local h = bench.Histogram.new()
        assert.has_error(function() h:record("x") end, 'Histogram:record: seconds must be a number (got "x")')
        assert.has_error(function() h:record_since(nil) end,
            "Histogram:record_since: start must be a finite number (a pluvio.now()) (got nil)")
        assert.has_error(function() h:record_stamp(true) end,
            "Histogram:record_stamp: stamp must be a finite number (a bench.stamp()) (got true)")
        assert.has_error(function() bench.human("x") end, 'bench.human: v must be a number (got "x")')
        assert.has_error(function() bench.bytes(nil) end, "bench.bytes: n must be a finite number (got nil)")
        assert.has_error(function() bench.svg(nil, {}) end, "bench.svg: path must be a string (got nil)")
        assert.has_error(function() bench.svg("/tmp/x.svg") end, "bench.svg: spec must be a table (got nil)")
        assert.has_error(function() bench.progress(42) end, "bench.progress: label must be a string (got number)")
        assert.has_error(function() bench.table("rows") end,
            'bench.table: rows must be a list of tables (got "rows")')
        assert.equal(0, h:count())
    end)

    it("keeps the positions of an array's values after a null", function()
        local v = bench.json_decode('[1,null,3,null]')
        assert.equal(1, v[1])
        assert.is_nil(v[2])
        assert.equal(3, v[3])
        assert.equal(4, bench.json_decode('{"n":[null,null,null,4]}').n[4])
    end)

    it("decodes JSON, and says which argument is wrong when it is not text", function()
        local v = bench.json_decode('{"a": [1, -2.5e3, "x"], "b": true, "c": {}}')
        assert.same({ a = { 1, -2500, "x" }, b = true, c = {} }, v)
        assert.same({ nil, "expected ',' or '}' at byte 8" }, { bench.json_decode('{"a":1') })
        assert.has_error(function() bench.json_decode(nil) end,
                         "bench.json_decode: text must be a string (got nil)")
    end)
end)

describe("the examples' options", function()
    -- Each bad option: one line naming it and exit 2, before anything runs
    -- (a traceback, a signal, or a report path found unwritable after the run before).
    it("are checked before anything runs, with one line and exit 2", function()
        local dat = os.tmpname()
        for _, case in ipairs({
            { "uring_floor.lua --file " .. q(dat) .. " --bs 0", "^uring_floor: %-%-bs must be from 512 to" },
            { "bench_compare.lua --quick --only ucx --output /nonexistent/x.md",
              "^bench_compare: %-%-output: cannot write /nonexistent/x%.md" },
            { "ucx_bench.lua --server --host ''", "^ucx_bench: %-%-host must not be empty" },
            { "pipeline.lua --connect 127.0.0.1:0", "^pipeline: %-%-connect must be HOST:PORT, the port from 1" },
            { "remoteio.lua --server --host ''", "^remoteio: %-%-host must not be empty" },
            { "runtime_bench.lua --gc-pause -5", "^runtime_bench: %-%-gc%-pause must be from 0 to" },
            { "uring_bench.lua --size 2g --bs 1g --bytes 1g --quiet --file " .. q(dat),
              "^uring_bench: IoUringReactor:acquire_buffer: cannot register 34 buffers of 1073741824 bytes" },
        }) do
            local status, _, err = sh(q(helper.host) .. " " .. q(helper.root .. "/examples/") .. case[1])
            assert.equal(2, status, case[1] .. ": " .. err)
            assert.matches(case[2], err)
            assert.equal(1, select(2, err:gsub("\n", "")), case[1] .. ": " .. err)      -- one line
        end
        os.remove(dat)
    end)
end)
