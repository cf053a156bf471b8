/*
 * main.c - the pluvio host: embeds LuaJIT and runs a script as the main task
 * of a ready runtime.
 *
 * This is the only file that uses the Lua C API, and it only embeds the
 * interpreter: it finds Pluvio's Lua modules and library next to the
 * executable (the build tree or an installed PREFIX), builds `arg` the way
 * luajit does, and hands the parsed command line to pluvio.host.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <lauxlib.h>
#include <lua.h>
#include <luajit.h>
#include <lualib.h>

#ifndef PL_VERSION
#define PL_VERSION "0.0.0"
#endif

static const char usage[] =
    "usage: pluvio [options] [script.lua [args...]]\n"
    "Runs a Lua script as the main task of a Pluvio runtime (io_uring, UCX, timers).\n"
    "\n"
    "options:\n"
    "  -e code      run code (inside the main task, before the script)\n"
    "  -l module    require module (inside the main task, before the script)\n"
    "  -j cmd       control LuaJIT as luajit -j does: -jv[=file], -jdump[=opts[,file]],\n"
    "               -jp[=opts[,file]], -joff, -jflush (before any -e, -l or script)\n"
    "  -O[opt]      LuaJIT optimizations as luajit -O: -O1, -O-loop, -Ohotloop=10\n"
    "  --stats      print runtime statistics and live tasks at exit (stderr)\n"
    "  -v, --version  print the version\n"
    "  -h, --help   print this help\n"
    "  --           stop handling options\n"
    "  -            read the script from standard input\n"
    "With no script and a terminal on stdin: an interactive prompt; each\n"
    "line runs in a task of its own, which Ctrl-C stops.\n"
    "\n"
    "Exit status: 0, or 1 on an uncaught error or a failed task nobody joined.\n";

/* Standard input, output and error that the parent closed are opened on
 * /dev/null.  Else the next fds made take their numbers (the runtime's
 * ring, a file the script opens, a UCX socket), and print() or an error
 * report wrote into them: a file got the script's output.  Returns
 * whether standard input was closed (`-` still says so, as luajit does). */
static int open_std_fds(void)
{
    int stdin_closed = fcntl(0, F_GETFD) < 0 && errno == EBADF;

    /* (open takes the lowest free number: fd, the lower ones being open) */
    for (int fd = 0; fd <= 2; fd++)
        if (fcntl(fd, F_GETFD) < 0 && errno == EBADF && open("/dev/null", O_RDWR) < 0)
            break;      /* no /dev/null (a bare chroot): as before */
    return stdin_closed;
}

/* Does dir/rel exist? */
static int exists(const char *dir, const char *rel)
{
    char path[PATH_MAX];

    if (snprintf(path, sizeof(path), "%s/%s", dir, rel) >= (int)sizeof(path))
        return 0;
    return access(path, F_OK) == 0;
}

/* Prepend Pluvio's own module and library directories to package.path and
 * package.cpath: the build tree (bin next to libpluvio.so, lua/ one level
 * up) or LuaRocks' layout under PREFIX (bin, share/lua/5.1, lib/lua/5.1). */
static void set_paths(lua_State *L)
{
    char exe[PATH_MAX], buf[4 * PATH_MAX];
    const char *lua_dir, *lib_dir;
    ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
    char *slash;

    if (n <= 0)
        return;
    exe[n] = '\0';
    slash = strrchr(exe, '/');
    if (!slash)
        return;
    *slash = '\0';
    if (exists(exe, "libpluvio.so") && exists(exe, "../lua/pluvio/init.lua")) {
        lua_dir = "../lua";
        lib_dir = ".";
    } else {
        lua_dir = "../share/lua/5.1";
        lib_dir = "../lib/lua/5.1";
    }
    lua_getglobal(L, "package");
    lua_getfield(L, -1, "path");
    snprintf(buf, sizeof(buf), "%s/%s/?.lua;%s/%s/?/init.lua;%s", exe, lua_dir, exe, lua_dir,
             lua_tostring(L, -1));
    lua_pop(L, 1);
    lua_pushstring(L, buf);
    lua_setfield(L, -2, "path");
    lua_getfield(L, -1, "cpath");
    snprintf(buf, sizeof(buf), "%s/%s/?.so;%s", exe, lib_dir, lua_tostring(L, -1));
    lua_pop(L, 1);
    lua_pushstring(L, buf);
    lua_setfield(L, -2, "cpath");
    lua_pop(L, 1);
}

/* arg as luajit builds it: arg[0] the script, arg[1..] its arguments,
 * negative indices the interpreter and its options. */
static void set_arg(lua_State *L, int argc, char **argv, int script)
{
    int base = script < argc ? script : argc;

    lua_createtable(L, argc - base, base + 1);
    for (int i = 0; i < argc; i++) {
        lua_pushstring(L, argv[i]);
        lua_rawseti(L, -2, i - base);
    }
    lua_setglobal(L, "arg");
}

struct options {
    int script;         /* index of the script in argv, argc when none */
    int stats;
    int version;
    int help;
    int interactive;    /* no script, stdin a terminal: read-eval-print */
    int runs_code;      /* an -e or -l (a -j or -O alone still gives the prompt) */
    int stdin_closed;   /* by the parent (now /dev/null: open_std_fds) */
    const char *bad;    /* an option we do not know, or one missing its value */
};

/* Parse options; -e, -l, -j and -O are pushed, in order, into the table
 * on top, as { letter, value }. */
static struct options parse(lua_State *L, int argc, char **argv)
{
    struct options o = { .script = argc };
    int n = 0;

    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--") == 0) {
            o.script = i + 1 < argc ? i + 1 : argc;
            return o;
        }
        if (a[0] != '-' || strcmp(a, "-") == 0) {
            o.script = i;
            return o;
        }
        if (a[1] == 'e' || a[1] == 'l' || a[1] == 'j' || a[1] == 'O') {
            /* -e code, -ecode: as luajit takes them; -O only attached
             * (-O alone: the default level) */
            const char *value = a[2] || a[1] == 'O' ? a + 2 : i + 1 < argc ? argv[++i] : NULL;
            if (!value) {
                o.bad = a;
                return o;
            }
            if (a[1] == 'e' || a[1] == 'l')
                o.runs_code = 1;
            lua_createtable(L, 2, 0);
            lua_pushlstring(L, a + 1, 1);
            lua_rawseti(L, -2, 1);
            lua_pushstring(L, value);
            lua_rawseti(L, -2, 2);
            lua_rawseti(L, -2, ++n);
        } else if (strcmp(a, "--stats") == 0) {
            o.stats = 1;
        } else if (strcmp(a, "-v") == 0 || strcmp(a, "--version") == 0) {
            o.version = 1;
        } else if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
            o.help = 1;
        } else {
            o.bad = a;
            return o;
        }
    }
    return o;
}

static int traceback(lua_State *L)
{
    luaL_traceback(L, L, lua_tostring(L, 1), 1);
    return 1;
}

/* An error message without the "pluvio: " the modules' own start with
 * (the host puts its own in front). */
static const char *unprefixed(const char *msg)
{
    if (!msg)
        return "(error object is not a string)";
    return strncmp(msg, "pluvio: ", 8) == 0 ? msg + 8 : msg;
}

/* Call require("pluvio.host").main(opts) with the actions table at stack
 * index 1; returns the exit status. */
static int run_host(lua_State *L, const struct options *o, int argc, char **argv)
{
    lua_pushcfunction(L, traceback);        /* 2: message handler */
    lua_getglobal(L, "require");
    lua_pushstring(L, "pluvio.host");
    if (lua_pcall(L, 1, 1, 2) != 0) {
        fprintf(stderr, "pluvio: cannot load the Pluvio modules: %s\n", unprefixed(lua_tostring(L, -1)));
        return 1;
    }
    lua_getfield(L, -1, "main");
    lua_createtable(L, 0, 5);
    lua_pushvalue(L, 1);
    lua_setfield(L, -2, "actions");
    if (o->script < argc)
        lua_pushstring(L, argv[o->script]);
    else
        lua_pushnil(L);
    lua_setfield(L, -2, "script");
    lua_pushboolean(L, o->stats);
    lua_setfield(L, -2, "stats");
    lua_pushboolean(L, o->interactive);
    lua_setfield(L, -2, "interactive");
    lua_pushboolean(L, o->stdin_closed);
    lua_setfield(L, -2, "stdin_closed");
    if (lua_pcall(L, 1, 1, 2) != 0) {
        fprintf(stderr, "pluvio: %s\n", unprefixed(lua_tostring(L, -1)));
        return 1;
    }
    return (int)lua_tointeger(L, -1);
}

int main(int argc, char **argv)
{
    lua_State *L;
    struct options o;
    int status, stdin_closed = open_std_fds();

    L = luaL_newstate();
    if (!L) {
        fprintf(stderr, "pluvio: cannot create the Lua state (out of memory)\n");
        return 1;
    }
    luaL_openlibs(L);
    set_paths(L);
    lua_newtable(L);                        /* stack 1: the -e / -l actions */
    o = parse(L, argc, argv);
    o.stdin_closed = stdin_closed;
    if (o.bad) {
        fprintf(stderr, "pluvio: unknown option or missing value: '%s'\n%s", o.bad, usage);
        lua_close(L);
        return 1;
    }
    if (o.help || o.version) {
        if (o.help)
            fputs(usage, stdout);
        else
            printf("pluvio %s (%s)\n", PL_VERSION, LUAJIT_VERSION);
        lua_close(L);
        return 0;
    }
    if (o.script == argc && !o.runs_code) {
        if (!isatty(STDIN_FILENO)) {
            /* luajit would run stdin here; say why we do not, and what does */
            fputs("pluvio: no script to run, and standard input is not a terminal "
                  "(to run a script from it: pluvio - < script.lua)\n", stderr);
            fputs(usage, stderr);
            lua_close(L);
            return 1;
        }
        o.interactive = 1;      /* a terminal: the prompt */
    }
    set_arg(L, argc, argv, o.script);
    status = run_host(L, &o, argc, argv);
    lua_close(L);
    return status;
}
