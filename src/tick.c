/*
 * tick.c - the reactor registry and the tick: poll the reactors, fire
 * timers, and sleep in one place when nothing is ready (the runtime's own
 * io_uring, watching the other reactors' fds); a task's linger in place.
 *
 * Lifetime: reactors are borrowed (their Lua wrappers own them); what the
 * runtime owns is in runtime.c.
 */

#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#define REACTOR_POLL_BUDGET 256

/* ---- reactors ------------------------------------------------------------ */

static int reactor_find(pl_runtime_t *rt, const char *name)
{
    for (int i = 0; i < rt->nreactors; i++)
        if (strcmp(rt->reactors[i].name, name) == 0)
            return i;
    return -1;
}

int pl_runtime_register_reactor(pl_runtime_t *rt, const char *name, pl_reactor_t *reactor)
{
    struct pl_reactor_slot *s;

    if (!name || !*name || strlen(name) >= PL_REACTOR_NAME_MAX)
        return -ENAMETOOLONG;
    if (!reactor || !reactor->poll || !reactor->status)
        return -EINVAL;
    if (reactor_find(rt, name) >= 0)
        return -EEXIST;
    if (rt->nreactors == PL_MAX_REACTORS)
        return -ENOSPC;
    s = &rt->reactors[rt->nreactors++];
    *s = (struct pl_reactor_slot){ .reactor = reactor, .token = s->token + 1 };
    memcpy(s->name, name, strlen(name) + 1);
    rt->stats.reactors = rt->nreactors;
    return 0;
}

/* user_data of a wait-fd poll: reactor index in the low 16 bits, token above. */
static uint64_t poll_user_data(int index, uint32_t token)
{
    return ((uint64_t)token << 16) | (uint64_t)(index + 1);
}

int pl_runtime_unregister_reactor(pl_runtime_t *rt, const char *name)
{
    int i = reactor_find(rt, name);

    if (i < 0)
        return -ENOENT;
    /* Its watch goes, and so do those of the reactors after it, whose
     * index changes: left in the kernel, an old watch held its reactor's
     * ring file (a freed reactor's pinned buffers with it) until the fd
     * fired.  They are armed again at the next block. */
    bool removed = false;
    for (int j = i; j < rt->nreactors; j++) {
        struct io_uring_sqe *sqe;

        if (!rt->reactors[j].armed || !(sqe = io_uring_get_sqe(&rt->ring)))
            continue;
        io_uring_prep_poll_remove(sqe, poll_user_data(j, rt->reactors[j].token));
        io_uring_sqe_set_data64(sqe, 0);
        removed = true;
    }
    if (removed)
        io_uring_submit(&rt->ring);
    /* Keep the order of the others; tokens tell stale completions apart. */
    for (int j = i; j + 1 < rt->nreactors; j++) {
        rt->reactors[j] = rt->reactors[j + 1];
        rt->reactors[j].armed = false;
        rt->reactors[j].token++;
    }
    rt->nreactors--;
    rt->reactors[rt->nreactors].token++;
    rt->stats.reactors = rt->nreactors;
    return 0;
}

int pl_runtime_reactor_info(pl_runtime_t *rt, int index, pl_reactor_info_t *out)
{
    struct pl_reactor_slot *s;

    if (index < 0 || index >= rt->nreactors)
        return -ENOENT;
    s = &rt->reactors[index];
    out->name = s->name;
    out->kind = s->reactor->kind ? s->reactor->kind : "";
    out->status = s->reactor->status(s->reactor);
    out->polls = s->polls;
    out->completions = s->completions;
    return 0;
}

int pl_runtime_reactor_stats(pl_runtime_t *rt, int index, pl_stat_t *out, int max)
{
    pl_reactor_t *r;

    if (index < 0 || index >= rt->nreactors)
        return -ENOENT;
    r = rt->reactors[index].reactor;
    return r->stats ? r->stats(r, out, max) : 0;
}

/* The reactors that are not idle, into act; returns how many. */
static int active_reactors(pl_runtime_t *rt, struct pl_reactor_slot **act)
{
    int na = 0;

    for (int i = 0; i < rt->nreactors; i++) {
        struct pl_reactor_slot *s = &rt->reactors[i];
        if (s->reactor->status(s->reactor) != PL_REACTOR_IDLE)
            act[na++] = s;
    }
    return na;
}

/* One round of polls of the reactors in act.  Returns the completions. */
static int poll_active(pl_runtime_t *rt, struct pl_reactor_slot **act, int na)
{
    int total = 0;

    for (int j = 0; j < na; j++) {
        struct pl_reactor_slot *s = act[j];
        int n = s->reactor->poll(s->reactor, rt, REACTOR_POLL_BUDGET);
        s->polls++;
        if (n > 0) {
            s->completions += n;
            total += n;
        }
    }
    return total;
}

static int reactors_poll(pl_runtime_t *rt)
{
    struct pl_reactor_slot *act[PL_MAX_REACTORS];
    int na = active_reactors(rt, act);

    return poll_active(rt, act, na);
}

/* ---- the tick ------------------------------------------------------------ */

static void collect(pl_runtime_t *rt)
{
    reactors_poll(rt);
    if (rt->heap_len > 0)
        pl_timer_fire(rt, pl_clock_ns());
}

/* Watch a pending reactor's wait fd from the home ring.  Returns false
 * when it has no fd (the caller must busy-poll it) or the ring is full. */
static bool watch_wait_fd(pl_runtime_t *rt, int i)
{
    struct pl_reactor_slot *s = &rt->reactors[i];
    struct io_uring_sqe *sqe;
    int fd = s->reactor->wait_fd ? s->reactor->wait_fd(s->reactor) : -1;

    if (fd < 0)
        return false;
    if (s->armed)
        return true;
    sqe = io_uring_get_sqe(&rt->ring);
    if (!sqe)
        return false;
    io_uring_prep_poll_add(sqe, fd, POLLIN);
    io_uring_sqe_set_data64(sqe, poll_user_data(i, s->token));
    s->armed = true;
    return true;
}

/*
 * Before blocking, every reactor must agree: one with completions waiting, or
 * one whose arm() says "poll me again", means we must not sleep.  When one
 * pending reactor alone can wake a task and it can block, *only is set and
 * the runtime sleeps in it; otherwise each pending reactor's wait fd gets a
 * poll request in the home ring.  Returns 1 when it is safe to block, 0 when
 * the caller should poll again, -EDEADLK when nothing could ever wake a task.
 */
static int prepare_block(pl_runtime_t *rt, pl_reactor_t **only)
{
    int pending = 0, first = -1;

    *only = NULL;
    for (int i = 0; i < rt->nreactors; i++) {
        pl_reactor_t *r = rt->reactors[i].reactor;
        int st = r->status(r);

        if (st == PL_REACTOR_READY)
            return 0;
        if (st == PL_REACTOR_IDLE)
            continue;
        if (r->arm && r->arm(r) == -EAGAIN)
            return 0;
        if (pending++ == 0)
            first = i;
    }
    if (pending == 0)
        return rt->heap_len > 0 ? 1 : -EDEADLK;
    if (pending == 1 && rt->reactors[first].reactor->block) {
        *only = rt->reactors[first].reactor;
        return 1;
    }
    for (int i = 0; i < rt->nreactors; i++) {
        pl_reactor_t *r = rt->reactors[i].reactor;
        if (r->status(r) == PL_REACTOR_PENDING && !watch_wait_fd(rt, i))
            return 0;           /* pending without a wait fd: busy-poll it */
    }
    return 1;
}

static void reap_home_ring(pl_runtime_t *rt)
{
    struct io_uring_cqe *cqe;
    unsigned head, n = 0;

    io_uring_for_each_cqe(&rt->ring, head, cqe) {
        uint64_t ud = io_uring_cqe_get_data64(cqe);
        int i = (int)(ud & 0xffff) - 1;

        if (i >= 0 && i < rt->nreactors && rt->reactors[i].token == (uint32_t)(ud >> 16)) {
            pl_reactor_t *r = rt->reactors[i].reactor;
            rt->reactors[i].armed = false;
            if (r->woken && cqe->res > 0)   /* fired, not cancelled or failed */
                r->woken(r);
        }
        n++;
    }
    io_uring_cq_advance(&rt->ring, n);
}

/* Work tasks queued goes out now, in one call per reactor (a sleep
 * submits it too).  Returns true when something was submitted. */
static bool reactors_flush(pl_runtime_t *rt)
{
    bool submitted = false;

    for (int i = 0; i < rt->nreactors; i++) {
        pl_reactor_t *r = rt->reactors[i].reactor;
        if (r->flush && r->flush(r) > 0)
            submitted = true;
    }
    return submitted;
}

/* Busy-poll the reactors for up to spin_ns.  The clock is read (and timers
 * fired) once per SPIN_POLLS rounds: a clock read costs about as much as a
 * round of polls, and would otherwise slow the reaction to a completion. */
#define SPIN_POLLS 32

static void spin(pl_runtime_t *rt)
{
    /* from when the last task stopped: a clock read less per sleep */
    int64_t until = rt->switch_cyc + pl_ns_to_cycles(rt->spin_ns);
    struct pl_reactor_slot *act[PL_MAX_REACTORS];

    reactors_flush(rt);     /* what we spin for must have been submitted */
    for (;;) {
        /* the reactors busy as the rounds begin: a status call per reactor
         * and round would slow each round, and the reaction to a
         * completion with it (polling one that went idle costs nothing) */
        int na = active_reactors(rt, act);

        /* and what a completion queued (the rest of a short read) */
        for (int i = 0; i < SPIN_POLLS && pl_ready_empty(rt); i++)
            if (poll_active(rt, act, na) > 0)
                reactors_flush(rt);
        if (!pl_ready_empty(rt))
            return;
        if (rt->heap_len > 0)
            pl_timer_fire(rt, pl_clock_ns());
        if (!pl_ready_empty(rt) || pl_cycles() >= until || pl_signal_flag)
            return;
    }
}

/* Whether the ready ring holds slot and nothing else. */
static bool ready_only(const pl_runtime_t *rt, uint32_t slot)
{
    return rt->ready.tail - rt->ready.head == 1 &&
           rt->ready.slots[rt->ready.head & rt->ready.mask] == slot;
}

const uint32_t *pl_runtime_ready_marks(const pl_runtime_t *rt)
{
    return &rt->ready.head;
}

int pl_task_linger(pl_runtime_t *rt, uint32_t slot, int go)
{
    struct pl_task *t = pl_task_get(rt, slot);
    bool spun = false;

    if (!t || (!pl_ready_empty(rt) && !ready_only(rt, slot)) || pl_signal_flag)
        return 0;       /* (a caught signal: the loop must see it) */
    if (!go)
        return 1;
    /* also when its wake came already: a task that wakes itself and parks,
     * again and again, must not keep the reactors and timers from a poll */
    reactors_flush(rt);
    collect(rt);
    if (pl_ready_empty(rt) && rt->spin_ns > 0) {
        spin(rt);
        spun = true;
    }
    /* A failed linger leaves switch_cyc alone: the tick's spin then ends
     * where this one's budget did, instead of spinning a second budget. */
    if (!ready_only(rt, slot))
        return 0;
    if (spun)
        rt->switch_cyc = pl_cycles();   /* the spin is not the task's run time */
    rt->ready.head++;
    t->queued = false;
    rt->stats.lingers++;
    return 1;
}

/* What a sleep's io_uring_enter said: 0 to go on (the tick polls again),
 * or the error that ends the run.  ETIME and EINTR end a sleep normally.
 * EAGAIN (the kernel is short of memory for requests) and EBUSY (older
 * kernels: completions overflowed) are the kernel's "reap some completions
 * and try again": the next tick reaps first, so a few in a row are passed
 * over; only a run of them that reaping does not clear fails the run. */
#define WAIT_RETRIES_MAX 64

static int wait_result(pl_runtime_t *rt, int rc)
{
    if (rc >= 0 || rc == -ETIME || rc == -EINTR) {
        rt->wait_retries = 0;
        return 0;
    }
    if ((rc == -EAGAIN || rc == -EBUSY) && rt->wait_retries++ < WAIT_RETRIES_MAX)
        return 0;
    rt->wait_retries = 0;
    return rc;
}

static int block(pl_runtime_t *rt)
{
    struct __kernel_timespec ts, *tsp = NULL;
    struct io_uring_cqe *cqe;
    pl_reactor_t *only;
    int64_t next = pl_timer_next(rt), t0 = pl_clock_ns(), d = -1;
    int rc = prepare_block(rt, &only);

    if (rc <= 0)
        return rc;
    if (next >= 0)
        d = next > t0 ? next - t0 : 0;
    if (rt->wake_by_ns > 0) {
        int64_t left = rt->wake_by_ns > t0 ? rt->wake_by_ns - t0 : 0;
        if (d < 0 || d > left)
            d = left;
    }
    for (int i = 0; i < rt->nreactors; i++) {
        pl_reactor_t *r = rt->reactors[i].reactor;
        if (r->max_wait_ns > 0 && (d < 0 || d > r->max_wait_ns) &&
            r->status(r) == PL_REACTOR_PENDING)
            d = r->max_wait_ns;
    }
    if (only) {     /* one reactor can wake us: sleep in its ring */
        rc = only->block(only, d);
        rt->stats.idle_waits++;
        rt->stats.blocked_s += (double)(pl_clock_ns() - t0) / 1e9;
        return wait_result(rt, rc);
    }
    if (d >= 0) {
        ts.tv_sec = d / 1000000000;
        ts.tv_nsec = d % 1000000000;
        tsp = &ts;
    }
    rc = io_uring_submit_and_wait_timeout(&rt->ring, &cqe, 1, tsp, NULL);
    rt->stats.idle_waits++;
    rt->stats.blocked_s += (double)(pl_clock_ns() - t0) / 1e9;
    reap_home_ring(rt);
    return wait_result(rt, rc);
}

int pl_tick(pl_runtime_t *rt, uint32_t *out, int max, int flags)
{
    rt->stats.ticks++;
    collect(rt);
    if (pl_ready_empty(rt) && rt->live > 0 && !(flags & PL_TICK_EXTERNAL_BUSY) &&
        (flags & PL_TICK_MAY_BLOCK) && !pl_signal_flag) {
        if (rt->spin_ns > 0)
            spin(rt);
        if (pl_ready_empty(rt)) {
            int rc = block(rt);
            if (rc < 0)
                return rc;
            collect(rt);
        }
    }
    /* Submit what tasks queued, also when nothing is ready and we did not
     * sleep (a tick that may not block, a reactor to busy-poll): else it
     * would wait for some later sleep.  What the kernel finished inside
     * the flush (page-cache reads) runs in this batch, not the next:
     * otherwise tasks whose ops are flushed and tasks whose ops were
     * reaped settle into two groups that take turns, each tick submitting
     * half of them. */
    if (reactors_flush(rt))
        reactors_poll(rt);
    return pl_ready_drain(rt, out, max);
}

/* The ring's entries the next drain hands out: not those of tasks that
 * ended while queued (zombies, kept until that drain), nor of a sleep
 * begun after its wake (as ready_drain skips them). */
static uint32_t ready_count(const pl_runtime_t *rt)
{
    const struct pl_ready_ring *r = &rt->ready;
    uint32_t n = 0;

    for (uint32_t k = r->head; k != r->tail; k++) {
        const struct pl_task *t = &rt->tasks[r->slots[k & r->mask]];
        if (!t->zombie && t->state != PL_TASK_WAITING)
            n++;
    }
    return n;
}

void pl_runtime_stats(pl_runtime_t *rt, pl_runtime_stats_t *out)
{
    *out = rt->stats;
    out->live = rt->live;
    out->ready = ready_count(rt);
    out->timers = rt->heap_len;
}
