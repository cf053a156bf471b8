/*
 * ucx_reactor.c - the UCX reactor: progresses its workers, gathers their
 * event fds in one epoll fd, and the wake-up protocol.
 *
 * The reactor owns only its epoll fd and borrows workers.  Waking: the
 * runtime asks the reactor to arm() before it sleeps; each worker is armed
 * with ucp_worker_arm (BUSY means "progress again first"), and the
 * workers' event fds are gathered in the reactor's epoll fd, its wait fd,
 * that the runtime watches from its io_uring.  When that watch fires, the
 * workers whose event fds fired count a wake-up (an arm is not one: most
 * sleeps end on a timer or another reactor's completion).
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <unistd.h>

#include "ucx_internal.h"

#define UCX_MAX_WORKERS 32
#define UCX_SAFETY_WAIT_NS 1000000000LL  /* wake at least once a second */

struct pl_ucx_reactor {
    pl_reactor_t reactor;   /* first: the vtable the runtime polls */
    int epfd;
    pl_runtime_t *rt;
    pl_ucx_worker_t *workers[UCX_MAX_WORKERS];
    int nworkers;
    struct pl_ucx_reactor *next_live;   /* on live_reactors */
};

/* The reactors of this thread, for ucx_reactors_forget. */
static _Thread_local pl_ucx_reactor_t *live_reactors;

static int reactor_watch(pl_ucx_reactor_t *r, pl_ucx_worker_t *w, bool watch);

/* Flow control: a stream holding its window pauses the whole worker (UCX
 * cannot hold back one AM id), so the peers' messages wait in the
 * transport.  Our own operations still get progress, except receives
 * waiting for a peer: those would let every message in, unbounded. */
static bool worker_paused(const pl_ucx_worker_t *w)
{
    return ucx_worker_over_window(w) && w->in_flight == w->passive_in_flight;
}

/* A paused worker is not busy: only a task taking a message resumes it,
 * and then it is polled again (an idle paused receiver sleeps). */
static bool worker_busy(pl_ucx_worker_t *w)
{
    return w->listener_dropped || w->tags_recheck || w->tags_rescued ||
           (!worker_paused(w) && (w->in_flight > 0 || ucx_worker_has_peers(w)));
}

/* The other workers progressed in rt: a peer in this thread waits for our
 * progress as we wait for its (a pull needs its sender), and nobody else
 * progresses it while the close blocks.  Paused ones stay paused.  So are
 * those whose runtime was freed (ucx_reactors_forget): until a run polls
 * them again they have none, and nobody else progresses them either. */
unsigned ucx_reactor_progress_peers(pl_ucx_worker_t *w, const pl_runtime_t *rt, bool paused_too)
{
    pl_ucx_reactor_t *r = w->reactor;
    unsigned got = 0;

    for (int i = 0; r && i < r->nworkers; i++) {
        pl_ucx_worker_t *peer = r->workers[i];
        if (peer != w && (peer->rt == rt || !peer->rt) && (paused_too || !worker_paused(peer)))
            got += ucp_worker_progress(peer->ucp);
    }
    return got;
}

/* The serial of the worker of w's reactor (not w) whose address addr (len
 * bytes, UCX's part) is, or 0.  A connect_addr endpoint without
 * peer_errors to it is told when it closes (ucx_reactor_worker_closing):
 * UCX reports nothing then, and over shared memory a rendezvous send
 * started on it later waited for good (its RTS written into the closed
 * worker's FIFO), holding its worker in limbo at close. */
uint64_t ucx_reactor_local_worker(const pl_ucx_worker_t *w, const void *addr, size_t len)
{
    const pl_ucx_reactor_t *r = w->reactor;

    for (int i = 0; r && i < r->nworkers; i++) {
        const pl_ucx_worker_t *peer = r->workers[i];
        if (peer != w && peer->addr && peer->addr_len <= len && memcmp(peer->addr, addr, peer->addr_len) == 0)
            return peer->serial;
    }
    return 0;
}

void ucx_reactor_worker_closing(const pl_ucx_worker_t *w)
{
    const pl_ucx_reactor_t *r = w->reactor;

    for (int i = 0; r && i < r->nworkers; i++)
        if (r->workers[i] != w)
            ucx_eps_local_peer_closed(r->workers[i], w->serial);
}

/* Whether peer (an endpoint's, "ip:port") is l's address: the same, or
 * the same port when l bound the wildcard address. */
static bool peer_is(const char *peer, const struct ucx_listener *l)
{
    const char *port = strrchr(l->address, ':');
    size_t n = strlen(peer), k = port ? strlen(port) : 0;

    if (strcmp(peer, l->address) == 0)
        return true;
    return port && (strncmp(l->address, "0.0.0.0:", 8) == 0 || strncmp(l->address, "[::]:", 5) == 0) &&
           n > k && strcmp(peer + n - k, port) == 0;
}

bool ucx_reactor_connecting_to(const pl_ucx_worker_t *w, const struct ucx_listener *l)
{
    const pl_ucx_reactor_t *r = w->reactor;

    for (int i = 0; r && i < r->nworkers; i++) {
        const pl_ucx_worker_t *c = r->workers[i];
        for (int k = 0; k < c->neps; k++) {
            const struct ucx_ep *e = &c->eps[k];
            if (e->connecting && (e->state == EP_OPEN || e->state == EP_ABORTING) && peer_is(e->peer, l))
                return true;
        }
    }
    return false;
}

/* A worker polled this many times since it was last armed is busy: its
 * event fd leaves the reactor's epoll set until the next sleep (ucx_arm
 * puts it back).  While it is in the set, every event of every UCX
 * interface passes through it (socket, interface's epoll set, worker's,
 * ours: a lock and an interrupt save and restore each, in the softirq of
 * the peer that sends on loopback).  64 KiB tcp AM bandwidth: about 2 %
 * of the sender's CPU, 2-3 % more messages a second.  A worker that sleeps
 * between messages never gets here; a busy one pays two epoll_ctl calls
 * per sleep at most. */
#define UCX_UNWATCH_POLLS 64

static int ucx_poll(pl_reactor_t *self, pl_runtime_t *rt, int budget)
{
    pl_ucx_reactor_t *r = (pl_ucx_reactor_t *)self;
    int n = 0;

    r->rt = rt;
    for (int i = 0; i < r->nworkers; i++) {
        pl_ucx_worker_t *w = r->workers[i];
        uint32_t pushed = pl_ready_pushed(rt);

        w->rt = rt;
        if (w->watched && ++w->polls_awake > UCX_UNWATCH_POLLS && reactor_watch(r, w, false) == 0)
            w->stats.watch_drops++;
        for (int k = 0; k < budget; k++) {
            unsigned got;
            if (worker_paused(w))
                break;
            got = ucp_worker_progress(w->ucp);
            w->stats.progress_calls++;
            n += (int)got;
            /* Stop once a task can run: one more progress call finds
             * nothing most of the time and costs a system call on tcp
             * (epoll_wait) before the woken task may answer.  Also with
             * our own operations in flight: a windowed tcp sender that
             * polled on took each RTR with an epoll_wait and a recv of its
             * own (1.4 and 0.9 per message, ucx_perftest 0.15 and 0.11),
             * and 64 KiB bandwidth gained 5-9 % from stopping.  (Pulls
             * start in their own call, see pl_ucx_msg_recv.) */
            if (got == 0 || pl_ready_pushed(rt) != pushed)
                break;
        }
        if (w->reap || w->aborting)
            ucx_eps_reap(w);
        if (w->listeners_closing)
            ucx_listeners_settle(w, UCX_SETTLE_DUE);
        if (w->tags_rescued)    /* (first: a receive handed a message takes it, not ENOTCONN) */
            ucx_tags_hand_over(w);
        if (w->listener_dropped) {
            w->listener_dropped = false;
            ucx_streams_wake_all(w);
            ucx_tags_orphan(w);
        }
        if (w->tags_recheck)
            ucx_tags_orphan(w);
    }
    return n;
}

static int ucx_status(pl_reactor_t *self)
{
    pl_ucx_reactor_t *r = (pl_ucx_reactor_t *)self;

    for (int i = 0; i < r->nworkers; i++)
        if (worker_busy(r->workers[i]))
            return PL_REACTOR_PENDING;
    return PL_REACTOR_IDLE;
}

/* A busy worker without an event fd (no wakeup) means: busy-poll. */
static int ucx_wait_fd(pl_reactor_t *self)
{
    pl_ucx_reactor_t *r = (pl_ucx_reactor_t *)self;

    for (int i = 0; i < r->nworkers; i++)
        if (r->workers[i]->efd < 0 && worker_busy(r->workers[i]))
            return -1;
    return r->epfd;
}

/* Watch a worker's event fd, or stop while it is paused: a paused worker
 * is not progressed, so its fd stays readable and would wake the runtime
 * at once, again and again.  Events that come meanwhile are not lost:
 * ucp_worker_arm says BUSY once it is watched again. */
static int reactor_watch(pl_ucx_reactor_t *r, pl_ucx_worker_t *w, bool watch)
{
    struct epoll_event ev = { .events = EPOLLIN, .data.ptr = w };

    if (w->efd < 0 || w->watched == watch)
        return 0;
    if (epoll_ctl(r->epfd, watch ? EPOLL_CTL_ADD : EPOLL_CTL_DEL, w->efd, &ev) < 0)
        return -errno;
    w->watched = watch;
    return 0;
}

/* Arm every worker; BUSY means events are pending: progress first. */
static int ucx_arm(pl_reactor_t *self)
{
    pl_ucx_reactor_t *r = (pl_ucx_reactor_t *)self;

    for (int i = 0; i < r->nworkers; i++) {
        pl_ucx_worker_t *w = r->workers[i];
        bool paused = worker_paused(w);
        ucs_status_t st;
        if (w->listener_dropped || w->tags_recheck)
            return -EAGAIN;     /* its streams' readers, tag receives are to be woken first */
        if (reactor_watch(r, w, !paused) < 0)
            return -EAGAIN;     /* cannot sleep on it: poll again */
        w->polls_awake = 0;
        if (w->efd < 0 || paused)
            continue;           /* polled, or paused: its events wait for the reader */
        st = ucp_worker_arm(w->ucp);
        if (st == UCS_ERR_BUSY)
            return -EAGAIN;
    }
    return 0;
}

/* The runtime's watch on our epoll fd fired: a wake-up for each worker
 * whose event fd fired.  With one worker watched that is the one, without
 * a system call (this runs on every wake of a sleeping runtime); with more,
 * the epoll fd says which (still level-readable: nothing progressed yet). */
static void ucx_woken(pl_reactor_t *self)
{
    pl_ucx_reactor_t *r = (pl_ucx_reactor_t *)self;
    struct epoll_event ev[UCX_MAX_WORKERS];
    pl_ucx_worker_t *only = NULL;
    int watched = 0, n;

    for (int i = 0; i < r->nworkers; i++)
        if (r->workers[i]->watched && watched++ == 0)
            only = r->workers[i];
    if (watched == 1) {
        only->stats.wakeups++;
        return;
    }
    n = epoll_wait(r->epfd, ev, UCX_MAX_WORKERS, 0);
    for (int i = 0; i < n; i++)
        ((pl_ucx_worker_t *)ev[i].data.ptr)->stats.wakeups++;
}

static int ucx_stats(pl_reactor_t *self, pl_stat_t *out, int max)
{
    pl_ucx_reactor_t *r = (pl_ucx_reactor_t *)self;

    if (max < 1)
        return 0;
    out[0].name = "workers";
    out[0].value = r->nworkers;
    return 1;
}

pl_ucx_reactor_t *pl_ucx_reactor_new(int *err)
{
    pl_ucx_reactor_t *r = calloc(1, sizeof(*r));

    if (!r) {
        *err = -ENOMEM;
        return NULL;
    }
    r->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (r->epfd < 0) {
        *err = -errno;
        free(r);
        return NULL;
    }
    r->reactor = (pl_reactor_t){
        .kind = "ucx", .poll = ucx_poll, .status = ucx_status, .wait_fd = ucx_wait_fd,
        .arm = ucx_arm, .stats = ucx_stats, .woken = ucx_woken, .max_wait_ns = UCX_SAFETY_WAIT_NS,
    };
    r->next_live = live_reactors;
    live_reactors = r;
    return r;
}

/* Runtime rt is being freed: no reactor or worker may wake tasks in it
 * any more (a wake with no runtime finds the task's home, if it has one,
 * through pl_task_home).  The reactor lives on, often for the whole
 * process, while the runtimes that polled it come and go: the Lua side
 * refers to the last one weakly, so that a dropped runtime is collected. */
/* The ops of rt's tasks, as rt is freed: nobody will take them, and the
 * Lua side dropped what a task kept for them.  Abandoned, as a killed
 * task's are (UCX cancels what it can; the slot is freed once UCX is done):
 * a tag receive left posted took a later message, written into scratch
 * memory that had been unmapped (the worker keeps that memory referenced
 * until the op's slot is reused: ucx.lua's run_op). */
static void forget_ops(pl_ucx_worker_t *w, const pl_runtime_t *rt)
{
    for (uint32_t i = 0; i < w->nops; i++) {
        const struct ucx_op *op = ucx_op_get(w, i);

        if ((op->state == UOP_IN_FLIGHT || op->state == UOP_DONE) &&
            pl_task_is_live(rt, op->task_slot, op->task_gen))
            pl_ucx_op_abandon(w, (int)i + 1, 0);    /* (nobody to take a tag receive's message) */
    }
}

void ucx_reactors_forget(const pl_runtime_t *rt)
{
    for (pl_ucx_reactor_t *r = live_reactors; r; r = r->next_live) {
        if (r->rt == rt)
            r->rt = NULL;
        for (int i = 0; i < r->nworkers; i++) {
            forget_ops(r->workers[i], rt);
            if (r->workers[i]->rt == rt)
                r->workers[i]->rt = NULL;
        }
    }
}

void pl_ucx_reactor_free(pl_ucx_reactor_t *r)
{
    if (!r)
        return;
    for (pl_ucx_reactor_t **p = &live_reactors; *p; p = &(*p)->next_live) {
        if (*p == r) {
            *p = r->next_live;
            break;
        }
    }
    for (int i = 0; i < r->nworkers; i++) {   /* (a runtime freed later cannot reach them) */
        r->workers[i]->reactor = NULL;
        r->workers[i]->rt = NULL;
    }
    close(r->epfd);
    free(r);
}

pl_reactor_t *pl_ucx_reactor_vtable(pl_ucx_reactor_t *r)
{
    return &r->reactor;
}

/* Also used by workers progressed by a reactor that is being freed. */
void pl_ucx_reactor_attach(pl_ucx_reactor_t *r, pl_runtime_t *rt)
{
    r->rt = rt;
    for (int i = 0; i < r->nworkers; i++)
        r->workers[i]->rt = rt;
}

/* Progress the worker from now on; registering twice is harmless. */
int pl_ucx_reactor_add_worker(pl_ucx_reactor_t *r, pl_ucx_worker_t *w)
{
    struct epoll_event ev = { .events = EPOLLIN, .data.ptr = w };

    for (int i = 0; i < r->nworkers; i++)
        if (r->workers[i] == w)
            return 0;
    if (r->nworkers == UCX_MAX_WORKERS)
        return -EMFILE;
    if (w->efd >= 0 && epoll_ctl(r->epfd, EPOLL_CTL_ADD, w->efd, &ev) < 0)
        return -errno;
    w->watched = w->efd >= 0;
    r->workers[r->nworkers++] = w;
    w->rt = r->rt;
    w->reactor = r;
    return 0;
}

/* The worker leaves its reactor (a close). */
void ucx_reactor_remove_worker(pl_ucx_worker_t *w)
{
    pl_ucx_reactor_t *r = w->reactor;

    for (int i = 0; i < r->nworkers; i++) {
        if (r->workers[i] == w) {
            reactor_watch(r, w, false);
            r->workers[i] = r->workers[--r->nworkers];
            return;
        }
    }
}
