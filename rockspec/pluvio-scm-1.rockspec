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
    build_target = "rock",
    -- where luarocks found liburing and UCX (an HPC site's /opt/ucx, say):
    -- headers, libraries, and the run path to them; afresh, in a build
    -- directory of its own ("rock"), so that a `make` build of the checkout,
    -- or one with other flags, is not taken as it is
    -- (PL_WERROR empty: a compiler newer than the project's may warn of more,
    -- which must not fail an install)
    build_variables = {
        BUILD = "build-rock",
        PL_WERROR = "",
        CFLAGS = "$(CFLAGS) -I$(UCX_INCDIR) -I$(URING_INCDIR)",
        LDFLAGS = "-L$(UCX_LIBDIR) -L$(URING_LIBDIR) -Wl,-rpath,$(UCX_LIBDIR) -Wl,-rpath,$(URING_LIBDIR)",
    },
    install_target = "install",
    install_variables = {
        BUILD = "build-rock",
        PREFIX = "$(PREFIX)",
        BINDIR = "$(BINDIR)",
        LIBDIR = "$(LIBDIR)",
        LUADIR = "$(LUADIR)",
    },
}
