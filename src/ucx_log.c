/*
 * ucx_log.c - what the core does about UCX's process-wide side effects:
 * its log lines around calls whose failures the caller gets anyway (held,
 * then dropped or printed), a line it logs in a loop (at most a few a
 * second), the debug signal libucs takes as it loads, and
 * the stream its log goes to (stderr, not stdout).
 */
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <ucs/config/global_opts.h>
#include <ucs/debug/debug.h>
#include <ucs/debug/log_def.h>

#include "ucx_internal.h"

/* ---- holding UCX's log ---------------------------------------------------- */

/* UCX logs some failures on stderr that it also returns to us (a
 * listener's bind).  Around such a call this thread's UCX errors and
 * warnings are held instead of printed (up to UCX_LOG_HELD of them, later
 * ones go through): dropped when the call failed, since the caller gets
 * that failure, printed after all when it succeeded, so that nothing the
 * caller does not otherwise get is hidden.  A hold may also name one
 * line to drop outright, one UCX prints about a setting of ours (not
 * the user's).  The handler is pushed once
 * and never popped: UCX's handler list has no lock, and its async thread
 * may log meanwhile; for other threads, and outside a hold, it passes. */
static _Thread_local struct ucx_log_hold *log_hold;
static pthread_once_t log_handler_once = PTHREAD_ONCE_INIT;

/* ---- a line logged in a loop ----------------------------------------------- */

/* UCX 1.13 logs some failures in a loop: its thread's accept() short of
 * file descriptors printed 300,000 lines a second (221 MB of stderr in
 * 3 s, a batch job's disk filling).  An error or warning from one place
 * in UCX's source is printed at most LOG_BURST times a second; the rest
 * are counted.  A count is printed, where UCX prints (UCX_LOG_FILE), as a
 * line of that place's: with the place's first line of a later second,
 * with any later line once its second is over (a flood that stopped), when
 * the place is replaced in the table, and at exit.  (Any thread: UCX's own
 * logs too; the least recently used place is the one replaced.) */
#define LOG_BURST 10
#define LOG_SITES 32

struct log_site {
    struct ucx_log_place at;
    int64_t second;
    uint64_t used;          /* log_uses when last logged (least recently used: replaced) */
    unsigned shown, dropped;
};

static struct log_site log_sites[LOG_SITES];
static uint64_t log_uses;
static pthread_mutex_t log_sites_lock = PTHREAD_MUTEX_INITIALIZER;

/* A line as UCX prints one of at's, where it prints (varargs only to hand
 * UCX's handler the va_list it takes). */
static void log_say(const struct ucx_log_place *at, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    ucs_log_default_handler(at->file, at->line, at->function, at->level, at->comp, fmt, ap);
    va_end(ap);
}

static void log_site_report(const struct log_site *s)
{
    log_say(&s->at, "pluvio: %u more lines from here not shown (at most %d a second)", s->dropped, LOG_BURST);
}

/* The counts of the places whose second is over, taken out of the table
 * into out (at most LOG_SITES), for printing once the lock is let go. */
static int log_sites_due(int64_t now, struct log_site *out)
{
    int n = 0;

    for (int i = 0; i < LOG_SITES; i++)
        if (log_sites[i].dropped > 0 && log_sites[i].second != now) {
            out[n++] = log_sites[i];
            log_sites[i].dropped = 0;
        }
    return n;
}

static bool log_flooded(const char *file, unsigned line, const char *function, ucs_log_level_t level,
                        const ucs_log_component_config_t *comp)
{
    int64_t now = pl_clock_ns() / 1000000000;
    struct log_site due[LOG_SITES + 1], *s = NULL;
    int n, i;
    bool drop;

    pthread_mutex_lock(&log_sites_lock);
    n = log_sites_due(now, due);
    for (i = 0; i < LOG_SITES && !s; i++)
        if (log_sites[i].at.file == file && log_sites[i].at.line == line)
            s = &log_sites[i];
    if (!s) {
        s = &log_sites[0];
        for (i = 1; i < LOG_SITES; i++)
            if (log_sites[i].used < s->used)
                s = &log_sites[i];
        if (s->dropped > 0)         /* (of this second: replaced before it was over) */
            due[n++] = *s;
        *s = (struct log_site){ .at = { .file = file, .line = line }, .second = now };
    }
    if (s->second != now) {
        s->second = now;
        s->shown = 0;
    }
    s->at = (struct ucx_log_place){ .file = file, .function = function, .line = line, .level = level,
                                    .comp = comp };     /* (for the count's line) */
    s->used = ++log_uses;
    drop = s->shown >= LOG_BURST;
    if (drop)
        s->dropped++;
    else
        s->shown++;
    pthread_mutex_unlock(&log_sites_lock);
    for (i = 0; i < n; i++)
        log_site_report(&due[i]);
    return drop;
}

/* At exit: the counts not printed yet.  (trylock: a child forked while
 * another thread held the lock would otherwise hang in exit.) */
__attribute__((destructor)) static void log_sites_flush(void)
{
    struct log_site due[LOG_SITES];
    int n;

    if (pthread_mutex_trylock(&log_sites_lock) != 0)
        return;
    n = log_sites_due(INT64_MIN, due);
    pthread_mutex_unlock(&log_sites_lock);
    for (int i = 0; i < n; i++)
        log_site_report(&due[i]);
}

static ucs_log_func_rc_t log_hold_handler(const char *file, unsigned line, const char *function,
                                          ucs_log_level_t level, const ucs_log_component_config_t *comp,
                                          const char *fmt, va_list ap)
{
    struct ucx_log_hold *h = log_hold;
    struct ucx_log_line *l;

    if (level > UCS_LOG_LEVEL_WARN)
        return UCS_LOG_FUNC_RC_CONTINUE;
    if (!h)
        return log_flooded(file, line, function, level, comp) ? UCS_LOG_FUNC_RC_STOP : UCS_LOG_FUNC_RC_CONTINUE;
    if (h->drop) {
        char text[sizeof(h->lines[0].text)];
        va_list copy;

        va_copy(copy, ap);
        vsnprintf(text, sizeof(text), fmt, copy);
        va_end(copy);
        if (strcmp(text, h->drop) == 0)
            return UCS_LOG_FUNC_RC_STOP;
    }
    if (h->n == UCX_LOG_HELD)       /* (full: printed now, as any line outside a hold) */
        return log_flooded(file, line, function, level, comp) ? UCS_LOG_FUNC_RC_STOP : UCS_LOG_FUNC_RC_CONTINUE;
    l = &h->lines[h->n++];
    *l = (struct ucx_log_line){ .at = { .file = file, .line = line, .function = function,
                                        .level = level, .comp = comp } };
    vsnprintf(l->text, sizeof(l->text), fmt, ap);
    return UCS_LOG_FUNC_RC_STOP;
}

static void log_handler_push(void)
{
    ucs_log_push_handler(log_hold_handler);
}

void ucx_log_hold(struct ucx_log_hold *h, const char *drop)
{
    pthread_once(&log_handler_once, log_handler_push);
    h->n = 0;
    h->drop = drop;
    log_hold = h;
}

void ucx_log_release(struct ucx_log_hold *h, bool failed)
{
    int i;

    log_hold = NULL;
    for (i = 0; !failed && i < h->n; i++)
        log_say(&h->lines[i].at, "%s", h->lines[i].text);
}

/* ---- SIGHUP --------------------------------------------------------------- */

/* libucs, as it loads (with libpluvio, before any of our code runs),
 * takes its "debug signal", SIGHUP unless UCX_DEBUG_SIGNO names another:
 * on it, UCX logs everything from then on, to stdout by default.  A
 * process that loaded Pluvio then outlived the hang-up of its terminal,
 * `kill -HUP` and the like, and filled its output with UCX's trace.
 * Unless the user asked for that signal, it gets back the action it had
 * before libucs took it (the default: the process ends), and debug_signo
 * records that UCX no longer has it (a second copy of the library loaded
 * leaves it alone). */
static void ucx_give_back_debug_signal(void)
{
    const char *asked = getenv("UCX_DEBUG_SIGNO");

    if (ucs_global_opts.debug_signo > 0 && (!asked || !*asked)) {
        ucs_debug_disable_signal((int)ucs_global_opts.debug_signo);
        ucs_global_opts.debug_signo = 0;
    }
}

/* ---- the log's stream ------------------------------------------------------ */

/* UCX writes its log to stdout unless UCX_LOG_FILE names another place:
 * its ERROR lines (a link that dropped, a peer that went away) landed in
 * the middle of a script's output, a JSON document on stdout say.  Unless
 * the user chose, they go to stderr, with the host's and Lua's own errors.
 * The stream is opened once, as libucs loads: it is reopened here, before
 * any of UCX's threads can log. */
static void ucx_log_to_stderr(void)
{
    const char *asked = getenv("UCX_LOG_FILE");

    if ((!asked || !*asked) && ucs_global_opts_set_value("LOG_FILE", "stderr") == UCS_OK) {
        ucs_log_cleanup();
        ucs_log_init();
    }
}

/* ---- async handlers ---------------------------------------------------------- */

/* UCX 1.13 gives one worker at most UCX_ASYNC_MAX_EVENTS async handlers,
 * 1024 by default, and a connection by socket address takes one: the
 * 1,020th connection of a worker failed, and its destroy then crashed
 * (ucx_max_endpoints).  Unless the user chose, 16384, for a worker's 4096
 * endpoints with room to spare (it costs 128 KiB per worker). */
static void ucx_async_room(void)
{
    const char *asked = getenv("UCX_ASYNC_MAX_EVENTS");

    if (!asked || !*asked)
        (void)ucs_global_opts_set_value("ASYNC_MAX_EVENTS", "16384");
}

__attribute__((constructor)) static void ucx_side_effects(void)
{
    ucx_give_back_debug_signal();
    ucx_log_to_stderr();
    ucx_async_room();
    pthread_once(&log_handler_once, log_handler_push);  /* (the flood limit: from the start) */
}
