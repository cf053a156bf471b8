/*
 * internal.h - state shared by the C core's files; nothing here is public.
 */
#ifndef PL_INTERNAL_H
#define PL_INTERNAL_H

#include <liburing.h>
#include <signal.h>
#include <stdbool.h>
#if defined(__x86_64__)
#include <x86intrin.h>
#endif

#include "pluvio.h"

#define PL_MAX_REACTORS 16
#define PL_REACTOR_NAME_MAX 64
#define PL_MAX_TASKS (1u << 24)
#define PL_NO_TIMER (-1)

/* The signal the host caught (interrupt.c), or 0: the loops stop for it,
 * so a task lingers and a spin busy-polls no longer once it is set. */
extern volatile sig_atomic_t pl_signal_flag;

/*
 * One task slot.  Owned by the runtime's task table; a slot is either on the
 * free list (state FREE) or belongs to one live task.  A released slot that
 * is still on the ready ring is a zombie: the drain gives it back, so the
 * ring never holds a slot twice.  So is the slot of a task another task
 * ended during the batch it was handed out in: the Lua loop may still
 * come to its entry, and a task spawned into the slot meanwhile would be
 * resumed from it (and again from the ring).
 */
struct pl_task {
    uint32_t gen;
    uint32_t next_free;
    uint8_t state;          /* enum pl_task_state */
    uint8_t wait;           /* enum pl_wait_kind */
    bool queued;
    bool zombie;
    uint32_t batch;         /* the drain that last handed it out */
    int32_t heap_pos;       /* index in the timer heap, or PL_NO_TIMER */
    int64_t deadline_ns;
    double wait_arg;
    uint64_t resumes;
    int64_t run_cyc;        /* run time, in pl_cycles */
};

/* Bounded ring of ready slots; capacity is a power of two >= task slots. */
struct pl_ready_ring {
    uint32_t *slots;
    uint32_t mask;
    uint32_t head;          /* head and tail stay in this order, side by side: */
    uint32_t tail;          /* pl_runtime_ready_marks hands them to Lua */
};

/* A registered reactor: borrowed pointer plus the runtime's book-keeping. */
struct pl_reactor_slot {
    pl_reactor_t *reactor;
    char name[PL_REACTOR_NAME_MAX];
    bool armed;             /* a poll request on its wait fd is in the ring */
    uint32_t token;         /* tells a stale poll completion from a live one */
    double polls;
    double completions;
};

struct pl_runtime {
    struct pl_task *tasks;
    uint32_t capacity;
    uint32_t free_head;     /* UINT32_MAX when empty */
    uint32_t live;

    struct pl_ready_ring ready;
    uint32_t batch;         /* drains so far: the batch being run */

    uint32_t *heap;         /* slots ordered by deadline_ns (binary heap) */
    uint32_t heap_len;

    struct pl_reactor_slot reactors[PL_MAX_REACTORS];
    int nreactors;

    struct io_uring ring;   /* the one place the runtime blocks */
    int64_t switch_cyc;     /* when (pl_cycles) the last task stopped running (or the batch began) */
    int64_t spin_ns;
    int64_t wake_by_ns;     /* a sleep ends by then (pl_clock_ns), 0: no bound */
    uint32_t wait_retries;  /* sleeps in a row that the kernel refused for now (EAGAIN, EBUSY) */

    pl_runtime_stats_t stats;
    pl_runtime_t *next_live;    /* this thread's live runtimes (see pl_task_wake_any) */
};

int64_t pl_clock_ns(void);

/* timer.c: the switch clock (see there); pl_cycles_init before use */
extern bool pl_tsc;
extern double pl_ns_per_cycle;
void pl_cycles_init(void);
int64_t pl_ns_to_cycles(int64_t ns);

static inline int64_t pl_cycles(void)
{
#if defined(__x86_64__)
    if (pl_tsc)
        return (int64_t)__rdtsc();
#endif
    return pl_clock_ns();
}

/* timer.c */
void pl_timer_remove(pl_runtime_t *rt, uint32_t slot);
int pl_timer_fire(pl_runtime_t *rt, int64_t now);
int64_t pl_timer_next(const pl_runtime_t *rt);

/* uring_net.c: a failed getaddrinfo's rc (and errno after it) as -errno */
int pl_net_gai_errno(int rc, int err);
/* uring_net.c: does host name the wildcard address sa only by a short form
 * ("0", "0x0", "0.0": inet_aton's), not by a full numeric address? */
struct sockaddr;
bool pl_net_sockaddr_unasked_wildcard(const char *host, const struct sockaddr *sa);

/* ucx_reactor.c: runtime rt is being freed; the UCX reactors and their
 * workers forget it (they outlive the runtimes that poll them) */
void ucx_reactors_forget(const pl_runtime_t *rt);

/* runtime.c */
int pl_ready_push(pl_runtime_t *rt, uint32_t slot);
/* Take up to max tasks to run off the ready ring into out (a zombie's slot
 * is freed, a task that parked again after its wake is left); the count. */
int pl_ready_drain(pl_runtime_t *rt, uint32_t *out, int max);
/* The runtime of this thread's whose task (slot, gen) is live, hint first,
 * or NULL.  Generations are unique in the process, so one has it at most. */
pl_runtime_t *pl_task_home(pl_runtime_t *hint, uint32_t slot, uint32_t gen);
/* Double a FIFO ring of elem-byte items (first_cap when empty), unrolled
 * so that its head is at index 0.  Returns 0 or -ENOMEM (ring unchanged). */
int pl_fifo_grow(void **items, uint32_t *cap, uint32_t *head, uint32_t len, size_t elem,
                 uint32_t first_cap);
/* Is task (slot, gen) parked on exactly this wait (kind, arg)?  (Inline: a
 * queue's completion asks it once per operation.) */
static inline bool pl_task_is_waiting(const pl_runtime_t *rt, uint32_t slot, uint32_t gen,
                                      int kind, double arg)
{
    const struct pl_task *t;

    if (slot >= rt->capacity)
        return false;
    t = &rt->tasks[slot];
    return t->state == PL_TASK_WAITING && t->gen == gen && t->wait == kind && t->wait_arg == arg;
}

/* Task slot of rt, NULL when free or out of range. */
static inline struct pl_task *pl_task_get(pl_runtime_t *rt, uint32_t slot)
{
    if (slot >= rt->capacity || rt->tasks[slot].state == PL_TASK_FREE)
        return NULL;
    return &rt->tasks[slot];
}

/* Is (slot, gen) a live task of rt? */
static inline bool pl_task_is_live(const pl_runtime_t *rt, uint32_t slot, uint32_t gen)
{
    return slot < rt->capacity && rt->tasks[slot].state != PL_TASK_FREE && rt->tasks[slot].gen == gen;
}

static inline bool pl_ready_empty(const pl_runtime_t *rt)
{
    return rt->ready.head == rt->ready.tail;
}

/* Tasks pushed onto the ready ring so far (wraps; compare for change). */
static inline uint32_t pl_ready_pushed(const pl_runtime_t *rt)
{
    return rt->ready.tail;
}

#endif /* PL_INTERNAL_H */
