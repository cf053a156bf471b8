/*
 * timer.c - the deadline heap.
 *
 * Each task owns at most one timer (a sleep, or the deadline of a timeout it
 * waits on), so the heap stores task slots and the deadline lives in the task
 * slot: arming, re-arming and cancelling never allocate.
 */
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <time.h>
#if defined(__x86_64__)
#include <cpuid.h>
#endif

#include "internal.h"

int64_t pl_clock_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* ---- cycles: the clock of task switches ------------------------------------
 *
 * Every task switch notes the time, to charge the task its run time and to
 * time io_uring batching.  On a VM clock_gettime costs 25-30 ns (kvm-clock),
 * two of them a third of a small message's overhead; the CPU's invariant
 * time stamp counter costs a third of that.  Its rate is measured once per
 * process against CLOCK_MONOTONIC (200 us); without an invariant TSC a
 * cycle is a nanosecond of CLOCK_MONOTONIC. */
bool pl_tsc;
double pl_ns_per_cycle = 1.0;
static pthread_once_t cycles_once = PTHREAD_ONCE_INIT;

#if defined(__x86_64__)
/* A (CLOCK_MONOTONIC, TSC) pair read at one moment: the narrowest of a few
 * TSC brackets around a clock read, so that a preemption inside one is not
 * taken for time. */
static void clock_pair(int64_t *ns, uint64_t *cyc)
{
    uint64_t best = UINT64_MAX;

    for (int i = 0; i < 8; i++) {
        uint64_t a = __rdtsc();
        int64_t n = pl_clock_ns();
        uint64_t b = __rdtsc();

        if (b > a && b - a < best) {
            best = b - a;
            *ns = n;
            *cyc = a + (b - a) / 2;
        }
    }
}
#endif

static void cycles_calibrate(void)
{
#if defined(__x86_64__)
    unsigned a, b, c, d;
    int64_t n0 = 0, n1 = 0;
    uint64_t c0 = 0, c1 = 0;
    double ratio;

    if (!__get_cpuid(0x80000007, &a, &b, &c, &d) || !(d & (1u << 8)))
        return;             /* no invariant TSC */
    clock_pair(&n0, &c0);
    do {
        clock_pair(&n1, &c1);
    } while (n1 - n0 < 200000);
    if (c1 <= c0)
        return;
    ratio = (double)(n1 - n0) / (double)(c1 - c0);
    if (ratio < 0.05 || ratio > 10)
        return;             /* not a TSC of 100 MHz to 20 GHz: keep the clock */
    pl_ns_per_cycle = ratio;
    pl_tsc = true;
#endif
}

void pl_cycles_init(void)
{
    pthread_once(&cycles_once, cycles_calibrate);
}

int64_t pl_ns_to_cycles(int64_t ns)
{
    return (int64_t)((double)ns / pl_ns_per_cycle);
}

double pl_now(void)
{
    return (double)pl_clock_ns() / 1e9;
}

static int64_t deadline_of(const pl_runtime_t *rt, uint32_t heap_index)
{
    return rt->tasks[rt->heap[heap_index]].deadline_ns;
}

static void heap_put(pl_runtime_t *rt, uint32_t heap_index, uint32_t slot)
{
    rt->heap[heap_index] = slot;
    rt->tasks[slot].heap_pos = (int32_t)heap_index;
}

static void sift_up(pl_runtime_t *rt, uint32_t i)
{
    uint32_t slot = rt->heap[i];
    int64_t d = rt->tasks[slot].deadline_ns;

    while (i > 0) {
        uint32_t parent = (i - 1) / 2;
        if (deadline_of(rt, parent) <= d)
            break;
        heap_put(rt, i, rt->heap[parent]);
        i = parent;
    }
    heap_put(rt, i, slot);
}

static void sift_down(pl_runtime_t *rt, uint32_t i)
{
    uint32_t slot = rt->heap[i];
    int64_t d = rt->tasks[slot].deadline_ns;

    for (;;) {
        uint32_t child = 2 * i + 1;
        if (child >= rt->heap_len)
            break;
        if (child + 1 < rt->heap_len &&
            deadline_of(rt, child + 1) < deadline_of(rt, child))
            child++;
        if (d <= deadline_of(rt, child))
            break;
        heap_put(rt, i, rt->heap[child]);
        i = child;
    }
    heap_put(rt, i, slot);
}

void pl_timer_remove(pl_runtime_t *rt, uint32_t slot)
{
    struct pl_task *t = &rt->tasks[slot];
    uint32_t i, last;

    if (t->heap_pos == PL_NO_TIMER)
        return;
    i = (uint32_t)t->heap_pos;
    t->heap_pos = PL_NO_TIMER;
    t->deadline_ns = -1;
    last = rt->heap[--rt->heap_len];
    if (i == rt->heap_len)
        return;
    heap_put(rt, i, last);
    sift_up(rt, i);
    sift_down(rt, (uint32_t)rt->tasks[last].heap_pos);
}

static void timer_arm(pl_runtime_t *rt, uint32_t slot, int64_t deadline_ns)
{
    struct pl_task *t = &rt->tasks[slot];

    t->deadline_ns = deadline_ns;
    if (t->heap_pos == PL_NO_TIMER) {
        rt->heap_len++;
        heap_put(rt, rt->heap_len - 1, slot);
        sift_up(rt, rt->heap_len - 1);
    } else {
        sift_up(rt, (uint32_t)t->heap_pos);
        sift_down(rt, (uint32_t)t->heap_pos);
    }
}

/* deadline is monotonic seconds (pl_now's clock). */
int pl_task_set_timer(pl_runtime_t *rt, uint32_t slot, double deadline)
{
    if (slot >= rt->capacity || rt->tasks[slot].state == PL_TASK_FREE)
        return -ESRCH;
    if (!isfinite(deadline) || deadline < 0 || deadline > 9.2e9)
        return -EINVAL;
    timer_arm(rt, slot, (int64_t)(deadline * 1e9));
    return 0;
}

int pl_task_sleep(pl_runtime_t *rt, uint32_t slot, double seconds)
{
    int64_t deadline_ns;

    if (slot >= rt->capacity || rt->tasks[slot].state == PL_TASK_FREE)
        return -ESRCH;
    if (!isfinite(seconds) || seconds < 0 || seconds > 1e9)
        return -EINVAL;
    deadline_ns = pl_clock_ns() + (int64_t)(seconds * 1e9);
    timer_arm(rt, slot, deadline_ns);
    pl_task_wait(rt, slot, PL_WAIT_SLEEP, (double)deadline_ns / 1e9);
    /* Even if it was woken while it ran (and so is queued), a sleeper
     * waits: the drain passes it over and only the timer makes it ready. */
    rt->tasks[slot].state = PL_TASK_WAITING;
    return 0;
}

int pl_task_clear_timer(pl_runtime_t *rt, uint32_t slot)
{
    if (slot >= rt->capacity || rt->tasks[slot].state == PL_TASK_FREE)
        return -ESRCH;
    pl_timer_remove(rt, slot);
    return 0;
}

/* Wake every task whose deadline has passed; returns how many. */
int pl_timer_fire(pl_runtime_t *rt, int64_t now)
{
    int fired = 0;

    while (rt->heap_len > 0 && deadline_of(rt, 0) <= now) {
        uint32_t slot = rt->heap[0];
        pl_timer_remove(rt, slot);
        pl_ready_push(rt, slot);
        fired++;
    }
    rt->stats.timers_fired += fired;
    return fired;
}

/* The nearest deadline in ns, or -1 when no timer is armed. */
int64_t pl_timer_next(const pl_runtime_t *rt)
{
    return rt->heap_len > 0 ? deadline_of(rt, 0) : -1;
}
