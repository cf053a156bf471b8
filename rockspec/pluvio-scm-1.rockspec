-- Build and install from a checkout:
--   luarocks --lua-version=5.1 make rockspec/pluvio-scm-1.rockspec
-- (add --tree=DIR for a private tree).  Builds libpluvio.so, the Lua modules
-- and the pluvio host with the project's Makefile.
rockspec_format = "3.0"
package = "pluvio"
version = "scm-1"
source = {
    url = "git+file://.",
}
description = {
    summary = "Single-threaded async runtime: io_uring files, UCX networking, Lua coroutine tasks",
    detailed = [[
Pluvio is a single-threaded asynchronous runtime whose C core runs an
executor and two reactors (io_uring for files, UCX for networking) and exposes
tasks as Lua coroutines through LuaJIT's FFI.  I/O pipelines and benchmark
scenarios are short Lua scripts run with the `pluvio` host or from luajit.
]],
    license = "TBD",
    labels = { "async", "io_uring", "ucx", "luajit", "hpc" },
}
supported_platforms = { "linux" }
dependencies = {
    "lua == 5.1",
}
external_dependencies = {
    URING = { header = "liburing.h", library = "uring" },
    UCX = { header = "ucp/api/ucp.h", library = "ucp" },
}
build = {
    type = "make",
    build_target = "all",
    build_variables = {
        CFLAGS = "$(CFLAGS)",
    },
    install_target = "install",
    install_variables = {
        PREFIX = "$(PREFIX)",
        BINDIR = "$(BINDIR)",
        LIBDIR = "$(LIBDIR)",
        LUADIR = "$(LUADIR)",
    },
}
