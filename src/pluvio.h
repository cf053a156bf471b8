/*
 * pluvio.h - the whole public C ABI of Pluvio.
 *
 * The region between PL_CDEF_BEGIN and PL_CDEF_END is also the LuaJIT FFI
 * cdef: the build extracts it into lua/pluvio/cdef.lua, so it must stay plain
 * declarations (no macros, no inline functions, no includes).
 *
 * Conventions (see STYLE.md): functions are pl_<object>_<verb>; failures are
 * negative errno values; C never calls into Lua.  A task is named by its slot
 * index plus a generation count, so a stale (slot, gen) pair can never wake a
 * task that reuses the slot.
 */
#ifndef PLUVIO_H
#define PLUVIO_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* PL_CDEF_BEGIN */
typedef struct pl_runtime pl_runtime_t;
typedef struct pl_reactor pl_reactor_t;

/* Where a task is in its life, as C sees it.  Done, failed and cancelled
 * tasks have given their slot back; the Lua task object keeps that state. */
enum pl_task_state {
    PL_TASK_FREE = 0,
    PL_TASK_READY = 1,
    PL_TASK_RUNNING = 2,
    PL_TASK_WAITING = 3
};

/* What a waiting task waits on (for rt:tasks() and deadlock reports). */
enum pl_wait_kind {
    PL_WAIT_NONE = 0,
    PL_WAIT_SLEEP = 1,
    PL_WAIT_JOIN = 2,
    PL_WAIT_SELECT = 3,
    PL_WAIT_CHANNEL_SEND = 4,
    PL_WAIT_CHANNEL_RECV = 5,
    PL_WAIT_IO = 6,
    PL_WAIT_BUFFER = 7,
    PL_WAIT_RUNTIME = 8,
    PL_WAIT_REACTOR = 9,
    PL_WAIT_OTHER = 10
};

/* How a task ended, for pl_task_exit. */
enum pl_task_outcome {
    PL_TASK_DONE = 0,
    PL_TASK_FAILED = 1,
    PL_TASK_CANCELLED = 2
};

/* Flags for pl_tick. */
enum pl_tick_flags {
    PL_TICK_MAY_BLOCK = 1,      /* nothing ready: block until a wake-up */
    PL_TICK_EXTERNAL_BUSY = 2   /* a Lua reactor has work: never deadlock, never block */
};

enum pl_reactor_status {
    PL_REACTOR_IDLE = 0,        /* nothing in flight */
    PL_REACTOR_PENDING = 1,     /* operations in flight; will complete later */
    PL_REACTOR_READY = 2        /* completions waiting to be polled */
};

/* One named figure of a reactor's statistics. */
typedef struct pl_stat {
    const char *name;
    double value;
} pl_stat_t;

/*
 * A reactor: a C vtable the runtime polls once per tick.  The reactor object
 * is owned by whoever created it (its Lua wrapper); the runtime only borrows
 * it while registered.
 *   poll      complete up to budget operations, waking their tasks with
 *             pl_task_wake; returns how many completed or -errno.
 *   status    one of enum pl_reactor_status.
 *   wait_fd   optional: an fd that turns readable when poll has work; the
 *             runtime watches it while it blocks.  -1 when there is none now.
 *   arm       optional: called just before the runtime blocks; returns 0
 *             when it is safe to sleep or -EAGAIN when poll must run again
 *             first (the ucp_worker_arm protocol).
 *   block     optional: when this reactor is the only thing that can wake
 *             a task, the runtime sleeps here instead of in its own ring:
 *             wait up to timeout_ns (-1: no limit) for a completion.
 *             Saves a poll request and a second io_uring_enter per sleep.
 *   stats     optional: fills up to max figures, returns how many.
 */
struct pl_reactor {
    const char *kind;       /* what it is ("io_uring", "ucx"); registration names it */
    int (*poll)(pl_reactor_t *self, pl_runtime_t *rt, int budget);
    int (*status)(pl_reactor_t *self);
    int (*wait_fd)(pl_reactor_t *self);
    int (*arm)(pl_reactor_t *self);
    int (*block)(pl_reactor_t *self, int64_t timeout_ns);
    int (*stats)(pl_reactor_t *self, pl_stat_t *out, int max);
};

typedef struct pl_runtime_stats {
    double spawned;
    double finished;        /* every exit: done + failed + cancelled */
    double failed;
    double cancelled;
    double live;
    double ready;           /* tasks on the ready ring now */
    double timers;          /* armed timers now */
    double ticks;
    double resumes;
    double wakes;
    double timers_fired;
    double idle_waits;      /* times the runtime blocked in the kernel */
    double blocked_s;       /* seconds spent blocked */
    double capacity;        /* task slots allocated */
    double reactors;
} pl_runtime_stats_t;

typedef struct pl_task_info {
    int state;              /* enum pl_task_state */
    int wait;               /* enum pl_wait_kind */
    uint32_t gen;
    double wait_arg;        /* kind-specific: joined slot, fd, ... */
    double deadline;        /* monotonic seconds of its timer, or -1 */
    double resumes;
    double run_s;           /* seconds spent running */
} pl_task_info_t;

typedef struct pl_reactor_info {
    const char *name;
    const char *kind;
    int status;
    double polls;
    double completions;
} pl_reactor_info_t;

/* Runtime (runtime.c).  capacity is the initial task-table size; it grows. */
pl_runtime_t *pl_runtime_new(uint32_t capacity, int *err);
void pl_runtime_free(pl_runtime_t *rt);
int pl_runtime_set_affinity(pl_runtime_t *rt, int cpu);
int pl_runtime_cpu_count(void);
int pl_runtime_register_reactor(pl_runtime_t *rt, const char *name, pl_reactor_t *reactor);
int pl_runtime_unregister_reactor(pl_runtime_t *rt, const char *name);
int pl_runtime_reactor_info(pl_runtime_t *rt, int index, pl_reactor_info_t *out);
int pl_runtime_reactor_stats(pl_runtime_t *rt, int index, pl_stat_t *out, int max);
void pl_runtime_stats(pl_runtime_t *rt, pl_runtime_stats_t *out);
void pl_runtime_set_spin(pl_runtime_t *rt, double seconds);

/* One turn of the loop: poll reactors, fire timers, block when nothing is
 * ready (if allowed), then move up to max ready slots into out.  Returns the
 * number of slots, 0 when no task is live, -EDEADLK when tasks wait but
 * nothing can wake them, or another -errno. */
int pl_tick(pl_runtime_t *rt, uint32_t *out, int max, int flags);

/* Tasks (runtime.c).  spawn returns the slot (queued ready) and its gen. */
int pl_task_spawn(pl_runtime_t *rt, uint32_t *gen);
int pl_task_wake(pl_runtime_t *rt, uint32_t slot, uint32_t gen);
int pl_task_wait(pl_runtime_t *rt, uint32_t slot, int kind, double arg);
void pl_task_switch(pl_runtime_t *rt, int leave_slot, int enter_slot);
int pl_task_exit(pl_runtime_t *rt, uint32_t slot, int outcome);
int pl_task_info(pl_runtime_t *rt, uint32_t slot, pl_task_info_t *out);

/* Timers (timer.c): one per task; firing wakes the task. */
int pl_task_set_timer(pl_runtime_t *rt, uint32_t slot, double deadline);
int pl_task_clear_timer(pl_runtime_t *rt, uint32_t slot);
double pl_now(void);

const char *pl_strerror(int err);
const char *pl_errname(int err);
const char *pl_version(void);
/* PL_CDEF_END */

#ifdef __cplusplus
}
#endif

#endif /* PLUVIO_H */
