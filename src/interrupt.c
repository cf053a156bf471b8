/*
 * interrupt.c - Ctrl-C for the host's prompt: SIGINT becomes a byte on a
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
#include <unistd.h>

#include "pluvio.h"

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
