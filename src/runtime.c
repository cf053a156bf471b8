/*
 * runtime.c - task slots, the ready ring and tasks; the reactor registry
 * and the tick are in tick.c.
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

void pl_runtime_wake_by(pl_runtime_t *rt, double at)
{
    rt->wake_by_ns = at > 0 ? (int64_t)(at * 1e9) : 0;
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

int pl_ready_drain(pl_runtime_t *rt, uint32_t *out, int max)
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
    struct pl_task *t = pl_task_get(rt, slot);

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
    struct pl_task *t = pl_task_get(rt, slot);

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
    struct pl_task *t = pl_task_get(rt, slot);

    if (!t)
        return -ESRCH;
    t->wait = PL_WAIT_NONE;
    task_leave(rt, t);
    return pl_ready_push(rt, slot);
}

int pl_task_exit(pl_runtime_t *rt, uint32_t slot, int outcome)
{
    struct pl_task *t = pl_task_get(rt, slot);

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
    struct pl_task *t = pl_task_get(rt, slot);

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
