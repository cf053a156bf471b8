/*
 * runtime.c - task slots, the ready ring, the reactor registry and the tick.
 *
 * Lifetime: a pl_runtime_t owns its task table, ready ring, timer heap and
 * the io_uring it blocks in; pl_runtime_free releases all of them.  Reactors
 * are borrowed (their Lua wrappers own them).
 */

#include <errno.h>
#include <poll.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"

#define HOME_RING_ENTRIES 64
#define REACTOR_POLL_BUDGET 256
#define NO_SLOT UINT32_MAX

static uint32_t pow2_at_least(uint32_t n)
{
    uint32_t p = 1;

    while (p < n)
        p <<= 1;
    return p;
}

/* Slots [from, to) join the free list in index order. */
static void free_list_add_range(pl_runtime_t *rt, uint32_t from, uint32_t to)
{
    for (uint32_t i = to; i-- > from;) {
        rt->tasks[i] = (struct pl_task){ .heap_pos = PL_NO_TIMER, .deadline_ns = -1 };
        rt->tasks[i].next_free = rt->free_head;
        rt->free_head = i;
    }
}

/* Move the ring's entries to a larger array, oldest first. */
static int ready_ring_grow(struct pl_ready_ring *r, uint32_t cap)
{
    uint32_t *slots = malloc(sizeof(*slots) * cap);
    uint32_t n = 0;

    if (!slots)
        return -ENOMEM;
    for (uint32_t i = r->head; i != r->tail; i++)
        slots[n++] = r->slots[i & r->mask];
    free(r->slots);
    r->slots = slots;
    r->mask = cap - 1;
    r->head = 0;
    r->tail = n;
    return 0;
}

/* Double the task table (and the ring and heap sized after it). */
static int task_table_grow(pl_runtime_t *rt)
{
    uint32_t old = rt->capacity, cap = old * 2;
    struct pl_task *tasks;
    uint32_t *heap;

    if (old >= PL_MAX_TASKS)
        return -ENOMEM;
    if (cap > PL_MAX_TASKS)
        cap = PL_MAX_TASKS;
    tasks = realloc(rt->tasks, sizeof(*tasks) * cap);
    if (!tasks)
        return -ENOMEM;
    rt->tasks = tasks;
    heap = realloc(rt->heap, sizeof(*heap) * cap);
    if (!heap)
        return -ENOMEM;
    rt->heap = heap;
    if (pow2_at_least(cap) > rt->ready.mask + 1 &&
        ready_ring_grow(&rt->ready, pow2_at_least(cap)) < 0)
        return -ENOMEM;
    rt->capacity = cap;
    free_list_add_range(rt, old, cap);
    rt->stats.capacity = cap;
    return 0;
}

/* This thread's live runtimes: a runtime nested in a task of another (and
 * the one it nests in) shares the UCX reactor with it, whose wakes then go
 * to the runtime that polled it last; pl_task_home finds the right one. */
static _Thread_local pl_runtime_t *live_runtimes;

/* Task generations come from one counter for the process, so that a task
 * id (slot, gen) names one task of one runtime: a wake sent to another
 * runtime finds no task there instead of a stranger in the same slot. */
static _Atomic uint32_t last_gen;

static uint32_t new_gen(void)
{
    uint32_t gen = atomic_fetch_add_explicit(&last_gen, 2, memory_order_relaxed) + 2;

    return gen;     /* even: an ended task's gen + 1 is odd, so no new task has it */
}

pl_runtime_t *pl_runtime_new(uint32_t capacity, int *err)
{
    pl_runtime_t *rt;
    int rc = -EINVAL;

    if (capacity == 0 || capacity > PL_MAX_TASKS)
        goto fail;
    pl_cycles_init();
    rc = -ENOMEM;
    rt = calloc(1, sizeof(*rt));
    if (!rt)
        goto fail;
    rt->capacity = capacity;
    rt->free_head = NO_SLOT;
    rt->tasks = malloc(sizeof(*rt->tasks) * capacity);
    rt->heap = malloc(sizeof(*rt->heap) * capacity);
    rt->ready.mask = pow2_at_least(capacity) - 1;
    rt->ready.slots = malloc(sizeof(uint32_t) * (rt->ready.mask + 1));
    if (!rt->tasks || !rt->heap || !rt->ready.slots)
        goto fail_free;
    rc = io_uring_queue_init(HOME_RING_ENTRIES, &rt->ring, 0);
    if (rc < 0)
        goto fail_free;
    free_list_add_range(rt, 0, capacity);
    rt->stats.capacity = capacity;
    rt->next_live = live_runtimes;
    live_runtimes = rt;
    return rt;

fail_free:
    free(rt->tasks);
    free(rt->heap);
    free(rt->ready.slots);
    free(rt);
fail:
    if (err)
        *err = rc;
    return NULL;
}

void pl_runtime_free(pl_runtime_t *rt)
{
    if (!rt)
        return;
    for (pl_runtime_t **p = &live_runtimes; *p; p = &(*p)->next_live) {
        if (*p == rt) {
            *p = rt->next_live;
            break;
        }
    }
    ucx_reactors_forget(rt);
    io_uring_queue_exit(&rt->ring);
    free(rt->tasks);
    free(rt->heap);
    free(rt->ready.slots);
    free(rt);
}

int pl_runtime_cpu_count(void)
{
    long n = sysconf(_SC_NPROCESSORS_CONF);

    return n > 0 ? (int)n : 1;
}

int pl_runtime_set_affinity(pl_runtime_t *rt, int cpu)
{
    cpu_set_t set;

    (void)rt;
    if (cpu < 0 || cpu >= pl_runtime_cpu_count() || cpu >= CPU_SETSIZE)
        return -EINVAL;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    if (sched_setaffinity(0, sizeof(set), &set) < 0)
        return -errno;
    return 0;
}

void pl_runtime_set_spin(pl_runtime_t *rt, double seconds)
{
    rt->spin_ns = seconds > 0 ? (int64_t)(seconds * 1e9) : 0;
}

/* ---- the ready ring ------------------------------------------------------ */

/* Queue a live slot unless it is queued already; returns 1 if queued now. */
int pl_ready_push(pl_runtime_t *rt, uint32_t slot)
{
    struct pl_task *t = &rt->tasks[slot];

    if (t->state == PL_TASK_WAITING)
        t->state = PL_TASK_READY;
    if (t->queued)
        return 0;
    t->queued = true;
    rt->ready.slots[rt->ready.tail++ & rt->ready.mask] = slot;
    rt->stats.wakes++;
    return 1;
}

static void slot_release(pl_runtime_t *rt, uint32_t slot)
{
    struct pl_task *t = &rt->tasks[slot];

    t->zombie = false;
    t->next_free = rt->free_head;
    rt->free_head = slot;
}

int pl_fifo_grow(void **items, uint32_t *cap, uint32_t *head, uint32_t len, size_t elem,
                 uint32_t first_cap)
{
    uint32_t n = *cap ? *cap * 2 : first_cap;
    char *p = malloc(elem * n);
    uint32_t first = len < *cap - *head ? len : *cap - *head;   /* head..end of the old array */

    if (!p)
        return -ENOMEM;
    if (len > 0) {
        memcpy(p, (char *)*items + (size_t)*head * elem, (size_t)first * elem);
        memcpy(p + (size_t)first * elem, *items, (size_t)(len - first) * elem);
    }
    free(*items);
    *items = p;
    *cap = n;
    *head = 0;
    return 0;
}

static int ready_drain(pl_runtime_t *rt, uint32_t *out, int max)
{
    struct pl_ready_ring *r = &rt->ready;
    uint32_t batch = ++rt->batch;
    int n = 0;

    while (n < max && r->head != r->tail) {
        uint32_t slot = r->slots[r->head++ & r->mask];
        struct pl_task *t = &rt->tasks[slot];

        t->queued = false;
        if (t->zombie) {
            slot_release(rt, slot);
        } else if (t->state != PL_TASK_WAITING) {   /* not a sleep begun after its wake */
            t->batch = batch;
            out[n++] = slot;
        }
    }
    rt->switch_cyc = pl_cycles();       /* the batch begins */
    return n;
}

/* ---- tasks --------------------------------------------------------------- */

int pl_task_spawn(pl_runtime_t *rt, uint32_t *gen)
{
    uint32_t slot;
    struct pl_task *t;

    if (rt->free_head == NO_SLOT) {
        int rc = task_table_grow(rt);
        if (rc < 0)
            return rc;
    }
    slot = rt->free_head;
    t = &rt->tasks[slot];
    rt->free_head = t->next_free;
    t->gen = new_gen();
    t->state = PL_TASK_READY;
    t->wait = PL_WAIT_NONE;
    t->wait_arg = 0;
    t->resumes = 0;
    t->run_cyc = 0;
    rt->live++;
    rt->stats.spawned++;
    pl_ready_push(rt, slot);
    *gen = t->gen;
    return (int)slot;
}

static struct pl_task *task_get(pl_runtime_t *rt, uint32_t slot)
{
    if (slot >= rt->capacity || rt->tasks[slot].state == PL_TASK_FREE)
        return NULL;
    return &rt->tasks[slot];
}

pl_runtime_t *pl_task_home(pl_runtime_t *hint, uint32_t slot, uint32_t gen)
{
    if (hint && pl_task_is_live(hint, slot, gen))
        return hint;
    for (pl_runtime_t *rt = live_runtimes; rt; rt = rt->next_live)
        if (rt != hint && pl_task_is_live(rt, slot, gen))
            return rt;
    return NULL;
}

int pl_task_wake(pl_runtime_t *rt, uint32_t slot, uint32_t gen)
{
    struct pl_task *t = task_get(rt, slot);

    if (!t || t->gen != gen)
        return -ESRCH;
    if (t->state == PL_TASK_WAITING && t->wait == PL_WAIT_SLEEP &&
        t->heap_pos != PL_NO_TIMER)
        return 0;           /* a sleep ends at its deadline, not before */
    return pl_ready_push(rt, slot);
}

int pl_task_wake_waiting(pl_runtime_t *rt, uint32_t slot, uint32_t gen, int kind, double arg)
{
    if (!pl_task_is_waiting(rt, slot, gen, kind, arg))
        return 0;
    pl_ready_push(rt, slot);
    return 1;
}

/* The running task stops running: charge it the time since the last task
 * stopped (or the batch began). */
static void task_leave(pl_runtime_t *rt, struct pl_task *t)
{
    int64_t now = pl_cycles();

    if (now > rt->switch_cyc)       /* (a TSC read on another CPU may lag) */
        t->run_cyc += now - rt->switch_cyc;
    t->resumes++;
    rt->stats.resumes++;
    rt->switch_cyc = now;
}

int pl_task_wait(pl_runtime_t *rt, uint32_t slot, int kind, double arg)
{
    struct pl_task *t = task_get(rt, slot);

    if (!t)
        return -ESRCH;
    t->wait = (uint8_t)kind;
    t->wait_arg = arg;
    if (!t->queued)
        t->state = PL_TASK_WAITING;
    task_leave(rt, t);
    return 0;
}

int pl_task_yield(pl_runtime_t *rt, uint32_t slot)
{
    struct pl_task *t = task_get(rt, slot);

    if (!t)
        return -ESRCH;
    t->wait = PL_WAIT_NONE;
    task_leave(rt, t);
    return pl_ready_push(rt, slot);
}

int pl_task_exit(pl_runtime_t *rt, uint32_t slot, int outcome)
{
    struct pl_task *t = task_get(rt, slot);

    bool was_running = (outcome & PL_TASK_WAS_RUNNING) != 0;

    if (!t)
        return -ESRCH;
    if (was_running) {
        task_leave(rt, t);
        outcome &= ~PL_TASK_WAS_RUNNING;
    }
    pl_timer_remove(rt, slot);
    t->state = PL_TASK_FREE;
    t->gen++;
    rt->live--;
    rt->stats.finished++;
    if (outcome == PL_TASK_FAILED)
        rt->stats.failed++;
    else if (outcome == PL_TASK_CANCELLED)
        rt->stats.cancelled++;
    if (t->queued) {
        t->zombie = true;   /* the drain gives the slot back */
    } else if (!was_running && t->batch == rt->batch) {
        /* ended by another task in the batch that handed it out: its entry
         * may come later in the batch, so keep the slot from a spawn until
         * the next drain gives it back (a task ending itself is past its
         * entry, and a slot is in a batch once) */
        t->zombie = true;
        t->queued = true;
        rt->ready.slots[rt->ready.tail++ & rt->ready.mask] = slot;
    } else {
        slot_release(rt, slot);
    }
    return 0;
}

int pl_task_info(pl_runtime_t *rt, uint32_t slot, pl_task_info_t *out)
{
    struct pl_task *t = task_get(rt, slot);

    if (!t)
        return -ESRCH;
    out->state = t->state;
    out->wait = t->wait;
    out->gen = t->gen;
    out->wait_arg = t->wait_arg;
    out->deadline = t->heap_pos == PL_NO_TIMER ? -1 : (double)t->deadline_ns / 1e9;
    out->resumes = (double)t->resumes;
    out->run_s = (double)t->run_cyc * pl_ns_per_cycle / 1e9;
    return 0;
}

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
    struct pl_task *t = task_get(rt, slot);
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
    return ready_drain(rt, out, max);
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
