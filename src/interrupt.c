/*
 * interrupt.c - signals for the host.
 *
 * SIGINT and SIGTERM while a script runs (pl_signals_catch): the first one
 * only sets a flag, which every runtime's loop reads once per tick; the
 * loop then stops and cancels its tasks, so that their on_exit clean-ups
 * run, and the host ends by that same signal (pl_signals_end) once stdio
 * is flushed.  A second one before that (a script that computes without
 * ever waiting lets no loop read the flag) ends the process at once, with
 * the action it had before.  A signal that was ignored stays ignored.
 *
 * Ctrl-C for the host's prompt: SIGINT becomes a byte on a
 * pipe, which a task reads through the ring like any input, so that the
 * prompt can stop the statement that runs instead of the process ending.
 *
 * Lifetime: pl_interrupt_watch installs the handler and makes the pipe
 * once; pl_interrupt_unwatch puts the earlier action back and closes both
 * ends.  The handler only writes to the pipe (async-signal-safe), or, for
 * a second SIGINT that nobody took (a statement that never yields lets no
 * task read the pipe), puts the earlier action back and raises it again
 * (unless SIGINT was ignored before: then the handler stays).
 */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "internal.h"

/* The signals a script's run stops for, and what each did before. */
static const int caught_signals[] = { SIGINT, SIGTERM };
#define NCAUGHT (sizeof caught_signals / sizeof caught_signals[0])
static struct sigaction before[NCAUGHT];
static bool catching[NCAUGHT];
static pid_t main_tid;
volatile sig_atomic_t pl_signal_flag;

static int caught_index(int sig)
{
    for (unsigned i = 0; i < NCAUGHT; i++)
        if (caught_signals[i] == sig)
            return (int)i;
    return -1;
}

static void on_stop_signal(int sig)
{
    int saved = errno, i = caught_index(sig);

    if (syscall(SYS_gettid) != main_tid) {
        /* a thread of UCX's took it: the runtime's thread must, to leave
         * its sleep in io_uring_enter (EINTR) */
        (void)syscall(SYS_tgkill, getpid(), main_tid, sig);
    } else if (pl_signal_flag == 0) {
        pl_signal_flag = sig;
    } else if (i >= 0) {
        /* the second: nothing read the first (or the clean-ups take too
         * long); end as the signal ends a process that does not catch it */
        sigaction(sig, &before[i], NULL);
        raise(sig);
    }
    errno = saved;
}

int pl_signals_catch(void)
{
    main_tid = (pid_t)syscall(SYS_gettid);
    for (unsigned i = 0; i < NCAUGHT; i++) {
        struct sigaction sa = { 0 }, old;

        if (catching[i])
            continue;
        if (sigaction(caught_signals[i], NULL, &old) < 0)
            return -errno;
        if (old.sa_handler == SIG_IGN)      /* (nohup, a shell's background job) */
            continue;
        /* no SA_RESTART: a wait in io_uring_enter must end with EINTR
         * rather than restart (a kernel may answer ERESTARTSYS) */
        sa.sa_handler = on_stop_signal;
        sigemptyset(&sa.sa_mask);
        if (sigaction(caught_signals[i], &sa, &before[i]) < 0)
            return -errno;
        catching[i] = true;
    }
    return 0;
}

void pl_signals_release(int sig)
{
    int i = caught_index(sig);

    if (i >= 0 && catching[i]) {
        sigaction(sig, &before[i], NULL);
        catching[i] = false;
    }
}

int pl_signal_caught(void)
{
    return pl_signal_flag;
}

void pl_signals_end(void)
{
    int sig = pl_signal_flag, i = caught_index(sig);
    sigset_t set;

    if (i < 0)
        return;
    fflush(NULL);       /* what stdio holds for files and pipes */
    sigaction(sig, &before[i], NULL);
    catching[i] = false;
    sigemptyset(&set);
    sigaddset(&set, sig);
    pthread_sigmask(SIG_UNBLOCK, &set, NULL);
    raise(sig);
}

static int pipe_fds[2] = { -1, -1 };
static struct sigaction earlier;
static volatile sig_atomic_t untaken;

static void on_sigint(int sig)
{
    int saved = errno;

    if (untaken) {
        if (earlier.sa_handler != SIG_IGN) {    /* (ignored before: stay, rather than go deaf) */
            sigaction(SIGINT, &earlier, NULL);
            raise(sig);
        }
    } else {
        untaken = 1;
        if (write(pipe_fds[1], "\x03", 1) < 0) {
            /* a full pipe already says it */
        }
    }
    errno = saved;
}

int pl_interrupt_watch(void)
{
    struct sigaction sa = { 0 };

    if (pipe_fds[0] >= 0)
        return pipe_fds[0];
    /* the write end does not block the handler; the read end blocks, as
     * the ring's reads of a pipe expect (O_NONBLOCK would make them fail
     * with EAGAIN instead of waiting) */
    if (pipe2(pipe_fds, O_CLOEXEC) < 0 || fcntl(pipe_fds[1], F_SETFL, O_NONBLOCK) < 0) {
        int err = -errno;
        if (pipe_fds[0] >= 0) {
            close(pipe_fds[0]);
            close(pipe_fds[1]);
        }
        pipe_fds[0] = pipe_fds[1] = -1;
        return err;
    }
    untaken = 0;
    sa.sa_handler = on_sigint;
    sa.sa_flags = SA_RESTART;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGINT, &sa, &earlier) < 0) {
        int err = -errno;
        close(pipe_fds[0]);
        close(pipe_fds[1]);
        pipe_fds[0] = pipe_fds[1] = -1;
        return err;
    }
    return pipe_fds[0];
}

void pl_interrupt_taken(void)
{
    untaken = 0;    /* (the handler writes one byte per interrupt not yet taken: none to drain) */
}

void pl_interrupt_unwatch(void)
{
    if (pipe_fds[0] < 0)
        return;
    sigaction(SIGINT, &earlier, NULL);
    close(pipe_fds[0]);
    close(pipe_fds[1]);
    pipe_fds[0] = pipe_fds[1] = -1;
    untaken = 0;
}
