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
    PL_WAIT_OTHER = 10,
    PL_WAIT_STREAM = 11,    /* an AM stream's reader; the arg is the stream's serial */
    PL_WAIT_ACCEPT = 12     /* a UCX listener's acceptor; the arg is the listener's serial */
};

/* How a task ended, for pl_task_exit; add PL_TASK_WAS_RUNNING when it
 * ended while it ran (not killed by another task) to account its run time. */
enum pl_task_outcome {
    PL_TASK_DONE = 0,
    PL_TASK_FAILED = 1,
    PL_TASK_CANCELLED = 2,
    PL_TASK_WAS_RUNNING = 8
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
 *   flush     optional: submit work batched during the tick; called when
 *             the tick returns ready tasks instead of sleeping (sleeping
 *             submits too), so a tick costs one system call for both.
 *             Returns how many operations it submitted (> 0: the runtime
 *             polls again, for those the kernel finished in the call).
 *   stats     optional: fills up to max figures, returns how many.
 *   woken     optional: the runtime's watch on wait_fd fired (it turned
 *             readable); called once per firing, before the next poll.
 *   max_wait_ns  when > 0 and the reactor is pending, the runtime never
 *             sleeps longer than this (a safety net against lost wake-ups).
 */
struct pl_reactor {
    const char *kind;       /* what it is ("io_uring", "ucx"); registration names it */
    int64_t max_wait_ns;
    int (*poll)(pl_reactor_t *self, pl_runtime_t *rt, int budget);
    int (*status)(pl_reactor_t *self);
    int (*wait_fd)(pl_reactor_t *self);
    int (*arm)(pl_reactor_t *self);
    int (*block)(pl_reactor_t *self, int64_t timeout_ns);
    int (*flush)(pl_reactor_t *self);
    int (*stats)(pl_reactor_t *self, pl_stat_t *out, int max);
    void (*woken)(pl_reactor_t *self);
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
    double lingers;         /* parks that went on in place (pl_task_linger) */
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

/* Runtime (runtime.c; its reactors and the tick: tick.c).  capacity is the
 * initial task-table size; it grows. */
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
/* Sleep no later than at (pl_now's clock; 0: no bound), for a run with a
 * time limit.  Unlike a timer, it does not keep tasks from a deadlock
 * report. */
void pl_runtime_wake_by(pl_runtime_t *rt, double at);

/* One turn of the loop: poll reactors, fire timers, block when nothing is
 * ready (if allowed), then move up to max ready slots into out.  Returns the
 * number of slots, 0 when no task is live, -EDEADLK when tasks wait but
 * nothing can wake them, or another -errno. */
int pl_tick(pl_runtime_t *rt, uint32_t *out, int max, int flags);

/* Tasks (runtime.c).  spawn returns the slot (queued ready) and its gen.
 * The running task stops running at exactly one of: pl_task_wait (it
 * parks), pl_task_sleep (it parks until a deadline), pl_task_yield (it goes
 * to the back of the ready ring), an I/O op start (which parks it), or
 * pl_task_exit with PL_TASK_WAS_RUNNING; that is where its run time and
 * resume count are accounted, so resuming a task costs no call into C.  The
 * Lua loop makes the wait, sleep and yield calls for the task once it has
 * yielded (a call into C deep in a coroutine grows its stack for good). */
int pl_task_spawn(pl_runtime_t *rt, uint32_t *gen);
int pl_task_wake(pl_runtime_t *rt, uint32_t slot, uint32_t gen);
int pl_task_wait(pl_runtime_t *rt, uint32_t slot, int kind, double arg);
/* Wake task (slot, gen) only if it is parked on exactly this wait (kind,
 * arg): 1 if woken, else 0. */
int pl_task_wake_waiting(pl_runtime_t *rt, uint32_t slot, uint32_t gen, int kind, double arg);
int pl_task_yield(pl_runtime_t *rt, uint32_t slot);
int pl_task_exit(pl_runtime_t *rt, uint32_t slot, int outcome);
/* The running task, parked a moment ago (pl_task_wait or an op start), is
 * the last of the loop's batch: rather than yield to a loop with nothing
 * else to run, poll the reactors in its place (flush, one poll, then busy-
 * poll up to the spin time).  Returns 1 when its own wake came while no
 * other task was ready: it is off the ready ring and goes on without
 * yielding.  Returns 0 when it must yield (time up, or another task is
 * ready; its own wake, if it came, stays queued).  With go = 0 it only
 * says whether lingering may help (nothing but the task itself is ready). */
int pl_task_linger(pl_runtime_t *rt, uint32_t slot, int go);
/* The ready ring's head and tail counters ([0] and [1]; equal when no task
 * is ready), for Lua to read without a call. */
const uint32_t *pl_runtime_ready_marks(const pl_runtime_t *rt);
int pl_task_info(pl_runtime_t *rt, uint32_t slot, pl_task_info_t *out);

/* Timers (timer.c): one per task; firing wakes the task.  pl_task_sleep
 * parks the task (PL_WAIT_SLEEP) until seconds from now: only its timer
 * (or pl_task_exit) ends the sleep, pl_task_wake leaves it asleep. */
int pl_task_sleep(pl_runtime_t *rt, uint32_t slot, double seconds);
int pl_task_set_timer(pl_runtime_t *rt, uint32_t slot, double deadline);
int pl_task_clear_timer(pl_runtime_t *rt, uint32_t slot);
double pl_now(void);

/*
 * io_uring reactor (uring.c).  One ring, a pool of op slots, and a pool of
 * registered ("fixed") buffers.  Starting an operation returns an op id (or
 * -errno); the op's completion wakes the task (slot, gen), which then takes
 * the result with pl_uring_op_take.  Short reads and writes are resubmitted
 * in C until done, end of file, or an error.
 */
typedef struct pl_uring pl_uring_t;

typedef struct pl_uring_options {
    uint32_t queue_size;            /* SQ entries */
    uint32_t buffer_size;           /* bytes per registered buffer (page multiple) */
    uint32_t buffer_count;          /* registered buffers (0: none); registered on first use */
    uint32_t submit_depth;          /* submit as soon as this many SQEs wait */
    double wait_submit_timeout;     /* seconds an SQE may wait for a submit */
    double wait_complete_timeout;   /* longest single sleep for completions */
    int sqpoll;                     /* 1: kernel SQ polling thread */
    uint32_t sqpoll_idle_ms;
} pl_uring_options_t;

/* The result of a finished op: res is bytes (or the op's value, e.g. an fd)
 * or -errno; bytes counts what was transferred before an error.  A read or
 * write also gives back what it was asked (len bytes at offset; write: 1
 * for a write), so that an I/O queue need not keep it per op. */
typedef struct pl_uring_result {
    int32_t res;
    uint32_t bytes;
    uint32_t len;
    int32_t write;
    double offset;
} pl_uring_result_t;

/* What pl_uring_statx_decode makes of a struct statx. */
typedef struct pl_file_stat {
    double size, blocks, blksize, mode, uid, gid, nlink, ino;
    double atime, mtime, ctime, btime;
    double dio_mem_align, dio_offset_align;   /* 0 when not reported */
    double dev_major, dev_minor;              /* the file system's device */
    double rdev_major, rdev_minor;            /* a device file's own device (else 0) */
} pl_file_stat_t;

typedef struct pl_uring_stats {
    double sqes;            /* SQEs submitted */
    double enters;          /* io_uring_enter calls (submit and/or wait) */
    double completions;
    double in_flight;
    double in_flight_max;
    double buffer_waits;    /* acquires that had to park */
    double buffers_free;
    double resubmits;       /* short reads/writes continued */
    double cancels;
} pl_uring_stats_t;

pl_uring_t *pl_uring_new(const pl_uring_options_t *opts, int *err);
/* Freeing cancels what is in flight and waits for the kernel (at most a
 * few seconds; past that the memory the ops use is leaked, and stderr says
 * so).  pl_uring_shutdown does that part alone, waiting at most timeout s,
 * and returns the ops the kernel still has: memory they use (strings,
 * scratch) must outlive the reactor when that is not 0. */
int pl_uring_shutdown(pl_uring_t *u, double timeout);
void pl_uring_free(pl_uring_t *u);
pl_reactor_t *pl_uring_reactor(pl_uring_t *u);
/* The runtime whose tasks start ops (they are parked on I/O in C). */
void pl_uring_attach(pl_uring_t *u, pl_runtime_t *rt);
/* Ops in flight for live tasks of rt (a queue's for its owner): their
 * completions wake rt's tasks only while rt is attached.  Ops of ended
 * tasks wake nobody and are not counted.  *first: the task slot of one. */
int pl_uring_ops_pending(pl_uring_t *u, const pl_runtime_t *rt, uint32_t *first);
void pl_uring_get_stats(pl_uring_t *u, pl_uring_stats_t *out);
int pl_uring_flush(pl_uring_t *u);

/* Operations: each returns an op id >= 0 or -errno.  buf_index >= 0 makes
 * read/write use the registered buffer (addr must lie inside it).  An op
 * the kernel finished inside its own submission, when no other task was
 * ready to run, comes back as id + PL_URING_OP_INLINE: its task was not
 * parked and takes the result at once. */
enum { PL_URING_OP_INLINE = 0x40000000 };
int pl_uring_read(pl_uring_t *u, uint32_t slot, uint32_t gen, int fd, void *addr,
                  uint32_t len, uint64_t offset, int buf_index);
int pl_uring_write(pl_uring_t *u, uint32_t slot, uint32_t gen, int fd, const void *addr,
                   uint32_t len, uint64_t offset, int buf_index);
/* Vectored read and write: up to PL_URING_IOV_MAX parts, copied (the
 * array may be reused at once); short transfers are continued like the
 * plain ones.  The memory itself must stay valid until the op is done. */
enum { PL_URING_IOV_MAX = 16 };
typedef struct pl_iovec {
    void *base;
    size_t len;
} pl_iovec_t;
int pl_uring_readv(pl_uring_t *u, uint32_t slot, uint32_t gen, int fd, const pl_iovec_t *parts,
                   int nparts, uint64_t offset);
int pl_uring_writev(pl_uring_t *u, uint32_t slot, uint32_t gen, int fd, const pl_iovec_t *parts,
                    int nparts, uint64_t offset);
int pl_uring_fsync(pl_uring_t *u, uint32_t slot, uint32_t gen, int fd, int datasync);
int pl_uring_fallocate(pl_uring_t *u, uint32_t slot, uint32_t gen, int fd, int mode,
                       uint64_t offset, uint64_t len);
int pl_uring_openat(pl_uring_t *u, uint32_t slot, uint32_t gen, const char *path,
                    int flags, int mode);
int pl_uring_close(pl_uring_t *u, uint32_t slot, uint32_t gen, int fd);
/* A file's close: ops still in flight on fd are cancelled first (their
 * tasks get -ECANCELED), as a socket's close does.  As for every close, a
 * negative return means it did not start: fd is still open, the caller's. */
int pl_uring_close_file(pl_uring_t *u, uint32_t slot, uint32_t gen, int fd);
/* The close of a file whose runtime is not running: synchronous; -EBUSY
 * while a task parked there has an op on fd. */
int pl_uring_close_idle(pl_uring_t *u, int fd);
int pl_uring_statx(pl_uring_t *u, uint32_t slot, uint32_t gen, int dirfd, const char *path,
                   int flags, void *statx_buf);
int pl_uring_unlinkat(pl_uring_t *u, uint32_t slot, uint32_t gen, const char *path, int flags);
int pl_uring_renameat(pl_uring_t *u, uint32_t slot, uint32_t gen, const char *from,
                      const char *to);
int pl_uring_mkdirat(pl_uring_t *u, uint32_t slot, uint32_t gen, const char *path, int mode);

/* 1 and the result when the op finished (the op id is then free), 0 while
 * it is in flight, -ESRCH for an unknown id. */
int pl_uring_op_take(pl_uring_t *u, int op, pl_uring_result_t *out);
/* The task gave up on the op (killed): cancel it in the kernel; its slot
 * and buffer are reclaimed when the kernel is done with them. */
int pl_uring_op_abandon(pl_uring_t *u, int op);
/* Memory an abandoned op reads or writes (a string, scratch space) must
 * outlive it: note pl_uring_op_gen before abandoning, then keep the memory
 * until pl_uring_op_settled(op, gen) is 1 (the kernel is done with it). */
uint32_t pl_uring_op_gen(pl_uring_t *u, int op);
int pl_uring_op_settled(pl_uring_t *u, int op, uint32_t gen);
/* How many abandoned ops have settled so far (a counter that wraps): the
 * keeper of their memory looks for settled ones only when it moved, not
 * on every abandon (which made killing n waiting tasks O(n^2)). */
uint32_t pl_uring_abandoned_settled(const pl_uring_t *u);
/* Stop an op its killed task gave up on, whose result must not be lost
 * (a socket receive's bytes), without waiting: an op the kernel has not
 * taken is dropped, else it is cancelled.  1 when it is done (take it:
 * data or -ECANCELED), 0 while the cancel is on its way (the op wakes
 * nobody: the next task that needs its result adopts it), -ESRCH for an
 * unknown id.  pl_uring_op_adopt: 1 when done (take it), else 0 with task
 * (slot, gen) parked on the op as if it had started it, or -ESRCH. */
int pl_uring_op_cancel(pl_uring_t *u, int op);
int pl_uring_op_adopt(pl_uring_t *u, int op, uint32_t slot, uint32_t gen);

/* I/O queues: a task (slot, gen) keeps many reads and writes in flight and
 * takes their completions in the order they finish, without parking on
 * each.  new returns a queue id or -errno; read and write start an op on
 * it (op id or -errno; never parked, never PL_URING_OP_INLINE); take gives
 * the oldest finished op's id and result, or -EAGAIN when none has finished
 * (park the task with PL_WAIT_IO and arg -1 - q: the next completion wakes
 * it), or -ENOENT when the queue has nothing in flight; pending counts ops started and not taken;
 * free cancels the ops in flight (returns how many) and frees the queue. */
int pl_uring_queue_new(pl_uring_t *u, uint32_t slot, uint32_t gen);
int pl_uring_queue_read(pl_uring_t *u, int q, int fd, void *addr, uint32_t len,
                        uint64_t offset, int buf_index);
int pl_uring_queue_write(pl_uring_t *u, int q, int fd, const void *addr, uint32_t len,
                         uint64_t offset, int buf_index);
int pl_uring_queue_take(pl_uring_t *u, int q, pl_uring_result_t *out);
int pl_uring_queue_pending(pl_uring_t *u, int q);
int pl_uring_queue_free(pl_uring_t *u, int q);

/* Registered buffers: mapped and registered on first use (or by this call). */
int pl_uring_buffers_register(pl_uring_t *u);
/* How many registered buffers of buffer_size bytes (a pool as
 * pl_uring_buffers_register maps it) the locked-memory limit
 * (RLIMIT_MEMLOCK) holds beside a ring of queue_size entries and a few
 * small rings of other reactors (the kernel counts rings against the limit
 * too), or -1 when no limit applies (unlimited, or the process has
 * CAP_IPC_LOCK).  The limit is the user's: with share > 1, in a 1/share
 * part of it (one of share processes of the user, each with its rings). */
int pl_uring_memlock_buffers(uint32_t buffer_size, uint32_t queue_size, uint32_t share);
/* The locked-memory limit (RLIMIT_MEMLOCK, soft) in KiB, or -1 when unlimited. */
double pl_memlock_limit_kib(void);
int pl_uring_buffer_count(pl_uring_t *u);
uint32_t pl_uring_buffer_size(pl_uring_t *u);
void *pl_uring_buffer_ptr(pl_uring_t *u, int index);
/* A free buffer's index, or -EAGAIN after queueing (slot, gen) as a waiter
 * (FIFO): call again once woken.  A released buffer goes straight to the
 * first waiter. */
int pl_uring_buffer_acquire(pl_uring_t *u, pl_runtime_t *rt, uint32_t slot, uint32_t gen);
/* A waiter stops waiting (killed); a buffer already handed to it is passed on. */
void pl_uring_buffer_abandon(pl_uring_t *u, pl_runtime_t *rt, uint32_t slot, uint32_t gen);
/* Live tasks of rt waiting for a buffer, or handed one not taken yet (a
 * release wakes them in the runtime attached then).  *first: one's slot. */
int pl_uring_buffer_waiters(pl_uring_t *u, const pl_runtime_t *rt, uint32_t *first);
int pl_uring_buffer_release(pl_uring_t *u, pl_runtime_t *rt, int index);
/* Another engine (UCX) may still read or fill a held buffer after its task
 * died: hold keeps it out of the pool, unhold lets a pending release finish. */
int pl_uring_buffer_hold(pl_uring_t *u, int index);
int pl_uring_buffer_unhold(pl_uring_t *u, int index);
/* How many abandoned ops (their task was killed) still use held buffer
 * index: until none, the kernel may still write into it or read it, and
 * ops started on it fail with -PL_EBUFCANCELLED. */
int pl_uring_buffer_cancelled(pl_uring_t *u, int index);
/* A hold (above) whose op nobody waits for any more counts as such a use
 * (delta 1) until it is let go of (delta -1, which unholds it too). */
int pl_uring_buffer_hold_cancelled(pl_uring_t *u, int index, int delta);

/* Scratch memory for string I/O (reads into it, the string is copied out):
 * page-aligned, not zero-filled, reserved without committing memory, so
 * only the pages an operation writes become resident.  NULL (errno set)
 * when it cannot be mapped; free with the same len. */
void *pl_scratch_alloc(size_t len);
void pl_scratch_free(void *p, size_t len);

/* Sockets over io_uring (uring_net.c).  Set-up is synchronous; the ops
 * behave like the file ops above (connect also returns the socket in
 * *fd_out, which the caller closes if the op fails). */

/* A resolved socket address: a sockaddr_in or sockaddr_in6 and its length. */
typedef struct pl_net_addr {
    uint64_t storage[16];       /* room for a struct sockaddr_storage */
    uint32_t len;
} pl_net_addr_t;

/* The addresses of host:port, in getaddrinfo's order, into out[0..cap):
 * returns how many there are (which may be more than cap), -ENXIO if the
 * name cannot be resolved, -EMFILE, -ENFILE or -ENOMEM if the process
 * could not look it up, or -EAFNOSUPPORT if it has no address of family
 * (4 or 6; 0 takes both, 6 takes IPv4-mapped ones when there is no IPv6
 * address).  udp 0 for stream sockets, 1 for datagram sockets. */
int pl_net_resolve(const char *host, int port, int udp, int family, pl_net_addr_t *out, int cap);
/* 1 if addr, resolved from host, is the wildcard address but host is not a
 * numeric address ("0", "0x0", a name): binding refuses it. */
int pl_net_unasked_wildcard(const char *host, const pl_net_addr_t *addr);
/* An address as "host:port" or "[v6]:port". */
void pl_net_addr_text(const pl_net_addr_t *addr, char *out, int cap);
int pl_net_tcp_listen(const pl_net_addr_t *addr, int backlog);
int pl_net_udp_bind(const pl_net_addr_t *addr);
int pl_net_name(int fd, int which, char *out, int cap);
int pl_net_local_port(int fd);
/* The socket's address family: 4 (IPv4) or 6 (IPv6), or -errno. */
int pl_net_family(int fd);
int pl_net_nodelay(int fd);
/* TCP keepalive on fd, in seconds; idle 0: off.  0 or -errno. */
int pl_net_keepalive(int fd, int idle, int interval, int count);
int pl_uring_accept(pl_uring_t *u, uint32_t slot, uint32_t gen, int fd);
int pl_uring_connect(pl_uring_t *u, uint32_t slot, uint32_t gen, const pl_net_addr_t *addr,
                     int *fd_out);
int pl_uring_send(pl_uring_t *u, uint32_t slot, uint32_t gen, int fd, const void *data, uint32_t len);
int pl_uring_recv(pl_uring_t *u, uint32_t slot, uint32_t gen, int fd, void *buf, uint32_t len);
int pl_uring_sendto(pl_uring_t *u, uint32_t slot, uint32_t gen, int fd, const void *data,
                    uint32_t len, const pl_net_addr_t *to);
int pl_uring_recvfrom(pl_uring_t *u, uint32_t slot, uint32_t gen, int fd, void *buf, uint32_t len);
int pl_uring_op_peer(pl_uring_t *u, int op, char *out, int cap);
int pl_uring_close_socket(pl_uring_t *u, uint32_t slot, uint32_t gen, int fd);
/* shutdown(2) through the ring; how: 0 SHUT_RD, 1 SHUT_WR, 2 SHUT_RDWR. */
int pl_uring_sock_shutdown(pl_uring_t *u, uint32_t slot, uint32_t gen, int fd, int how);

int pl_uring_statx_size(void);
void pl_uring_statx_decode(const void *statx_buf, pl_file_stat_t *out);
int pl_file_truncate(int fd, uint64_t len);
int pl_file_flags(const char *mode, int direct);
/* Whether an open fd has O_DIRECT: 1 or 0, or -errno (-EBADF: not open). */
int pl_file_fd_direct(int fd);
int pl_file_open_sync(const char *path, int flags, int mode);
int pl_file_close_sync(int fd);
/* Input from fds that are not files (a terminal, a pipe): wait in the ring
 * until fd is readable (the op's result: the poll(2) events), then read
 * once what is there without blocking (bytes, 0 at the end of input,
 * -EAGAIN when another reader took it first: poll again, or -errno). */
int pl_uring_poll_in(pl_uring_t *u, uint32_t slot, uint32_t gen, int fd);
int pl_fd_read(int fd, void *buf, uint32_t len);

/* Checksums for verification (checksum.c): 64-bit, order-sensitive. */
uint64_t pl_checksum64(const void *data, size_t len, uint64_t seed);
void pl_fill_pattern(void *data, size_t len, uint64_t seed, uint64_t offset);

/*
 * UCX reactor (ucx_context.c, ucx_worker.c, ucx_am.c and the other
 * ucx_*.c).  A context owns workers; a worker owns its endpoints,
 * listeners, Active Message streams and op slots (UCX requests allocated
 * by us, never per message).  Endpoints, listeners and messages
 * are small integer handles within their worker.  UCX callbacks only record
 * what happened and wake tasks; tasks are resumed by the executor.
 * Operations return 0 when they completed at once, an op id > 0 while in
 * flight (take its result after the task is woken), or -errno.
 */
typedef struct pl_ucx_context pl_ucx_context_t;
typedef struct pl_ucx_worker pl_ucx_worker_t;
typedef struct pl_ucx_reactor pl_ucx_reactor_t;

typedef struct pl_ucx_result {
    int32_t status;         /* 0 or -errno */
    uint32_t pad;
    double length;          /* bytes received (receives) */
    uint64_t sender_tag;    /* tag receives */
} pl_ucx_result_t;

typedef struct pl_ucx_msg_info {
    const void *header;
    double header_length;
    double data_length;
    int rndv;               /* 1: data still with the sender (rendezvous) */
    int can_reply;
    int ep;                 /* endpoint handle to reply on if it has an entry
                             * (else -1: see pl_ucx_msg_reply_ep), or -errno:
                             * why it cannot be answered any more */
    double taken;           /* messages of the worker taken by tasks and neither
                             * received nor released yet (this one included) */
} pl_ucx_msg_info_t;

typedef struct pl_ucx_stats {
    double am_sent, am_bytes_sent, am_received, am_bytes_received;
    double eager_received, rndv_received, tag_sent, tag_received;
    double progress_calls, wakeups, ops_in_flight, msgs_held, endpoints, failed_endpoints;
    double header_blocks;   /* blocks allocated for headers over 128 B (reused) */
    double am_unclaimed;    /* held now for AM ids with no open stream */
    double am_dropped;      /* for such ids past UCX_UNCLAIMED_HOLD, arriving as the worker closed,
                             * or with no memory to hold them */
    double watch_drops;     /* times its event fd left the reactor's epoll set, the worker busy */
    double endpoints_collected;     /* failed endpoints freed, their Lua object collected */
} pl_ucx_stats_t;

/* wakeup 1: workers can sleep in the kernel (transports with events: tcp);
 * 0: busy-polled workers, but shared-memory transports become usable. */
pl_ucx_context_t *pl_ucx_context_new(int wakeup, int *err);
int pl_ucx_context_close(pl_ucx_context_t *c);
/* For finalizers: close now, or as soon as the last worker is closed. */
void pl_ucx_context_release(pl_ucx_context_t *c);
const char *pl_ucx_status_string(int err);

pl_ucx_reactor_t *pl_ucx_reactor_new(int *err);
void pl_ucx_reactor_free(pl_ucx_reactor_t *r);
pl_reactor_t *pl_ucx_reactor_vtable(pl_ucx_reactor_t *r);
void pl_ucx_reactor_attach(pl_ucx_reactor_t *r, pl_runtime_t *rt);
int pl_ucx_reactor_add_worker(pl_ucx_reactor_t *r, pl_ucx_worker_t *w);

pl_ucx_worker_t *pl_ucx_worker_new(pl_ucx_context_t *c, int *err);
/* Closes what the worker owns and wakes, in rt, every task waiting on it
 * (NULL from a finalizer: its runtime may be gone).  0, or -EBUSY when UCX
 * kept operations it could not finish in time (their memory stays theirs). */
int pl_ucx_worker_close(pl_ucx_worker_t *w, pl_runtime_t *rt);
/* For a worker whose close said -EBUSY: progress it, and destroy it once UCX
 * let go of those ops (0: w is gone), else -EBUSY. */
int pl_ucx_worker_reap(pl_ucx_worker_t *w);
int pl_ucx_worker_address(pl_ucx_worker_t *w, void *buf, int cap);
double pl_ucx_worker_max_am_header(pl_ucx_worker_t *w);
void pl_ucx_worker_stats(pl_ucx_worker_t *w, pl_ucx_stats_t *out);

/* peer_errors 1: UCP_ERR_HANDLING_MODE_PEER (failures reported, but UCX
 * 1.13 then uses no shared-memory transport); 0: none (fastest lanes).
 * -EINVAL when addr is not a whole worker address, -EBADMSG when a sealed
 * one (pl_ucx_worker_address) was changed since (UCX 1.13 would read past
 * it, abort or crash). */
int pl_ucx_connect_addr(pl_ucx_worker_t *w, const void *addr, int len, int peer_errors);
int pl_ucx_connect_socket(pl_ucx_worker_t *w, const char *host, int port, int *ep_out,
                          uint32_t slot, uint32_t gen);
int pl_ucx_listen(pl_ucx_worker_t *w, const char *host, int port);
const char *pl_ucx_listen_why(pl_ucx_worker_t *w);     /* after -ENODEV: why, in words */
int pl_ucx_listener_port(pl_ucx_worker_t *w, int listener);
/* The address bound, "ip:port" or "[v6]:port" ("" for a closed listener). */
const char *pl_ucx_listener_address(pl_ucx_worker_t *w, int listener);
/* An endpoint for the next connection, or -EAGAIN with the task queued
 * (FIFO) among the listener's acceptors, which park with PL_WAIT_ACCEPT and
 * the listener's serial; abandon: a queued acceptor was killed. */
int pl_ucx_accept(pl_ucx_worker_t *w, int listener, uint32_t slot, uint32_t gen);
double pl_ucx_listener_serial(pl_ucx_worker_t *w, int listener);
void pl_ucx_listener_abandon(pl_ucx_worker_t *w, int listener, uint32_t slot, uint32_t gen);
int pl_ucx_listener_close(pl_ucx_worker_t *w, int listener);
/* The listener's Lua object was collected: close it, waking nobody now. */
int pl_ucx_listener_drop(pl_ucx_worker_t *w, int listener);
int pl_ucx_ep_status(pl_ucx_worker_t *w, int ep);
/* 1 when ep, a connect_addr endpoint without peer_errors, leads to a
 * worker of this process's reactor that was closed since (its status is
 * then -ECONNRESET), else 0. */
int pl_ucx_ep_peer_closed(pl_ucx_worker_t *w, int ep);
const char *pl_ucx_ep_peer(pl_ucx_worker_t *w, int ep);
int pl_ucx_ep_flush(pl_ucx_worker_t *w, int ep, uint32_t slot, uint32_t gen);
int pl_ucx_ep_close(pl_ucx_worker_t *w, int ep, uint32_t slot, uint32_t gen);
/* Between the two steps of a graceful close: 1 when none of the endpoint's
 * ops is in UCX's hands any more (or it failed), else 0 and the end of its
 * last op (or its failure) wakes task (slot, gen). */
int pl_ucx_ep_drained(pl_ucx_worker_t *w, int ep, uint32_t slot, uint32_t gen);
/* Force-close with no task waiting (a connect that failed or was given up);
 * it needs no op slot, so it fails only for a stale handle (-EBADF). */
int pl_ucx_ep_abort(pl_ucx_worker_t *w, int ep);
/* At most n endpoints open at once, 1 to 4096 (the default); for a new
 * worker, before its first endpoint.  Returns the number set: n, or fewer
 * when UCX_ASYNC_MAX_EVENTS holds fewer connections; -EINVAL out of range. */
int pl_ucx_worker_max_endpoints(pl_ucx_worker_t *w, int n);
/* 1 when the worker's endpoint table has a free entry (after freeing the
 * dropped failed ones), else 0: tells its EMFILE from the process's. */
int pl_ucx_worker_ep_room(pl_ucx_worker_t *w);
/* The Lua object of an endpoint we own was collected: a failed one is
 * freed now, an open one once it fails (its peer may still send to the
 * worker's streams meanwhile); not while a message's reply endpoint holds
 * it (pl_ucx_msg_reply_ep): then its last pl_ucx_ep_unhold frees it.  1 if
 * it was freed now. */
int pl_ucx_ep_drop(pl_ucx_worker_t *w, int ep);

int pl_ucx_op_take(pl_ucx_worker_t *w, int op, pl_ucx_result_t *out);
/* The op's task gave up: cancel it.  keep: a tag receive's result (a
 * message it matched) waits, DONE, for pl_ucx_op_take instead of being
 * dropped with the slot. */
int pl_ucx_op_abandon(pl_ucx_worker_t *w, int op, int keep);
/* As for io_uring: memory an abandoned op uses is kept until it settles. */
uint32_t pl_ucx_op_gen(pl_ucx_worker_t *w, int op);
int pl_ucx_op_settled(pl_ucx_worker_t *w, int op, uint32_t gen);
uint32_t pl_ucx_abandoned_settled(const pl_ucx_worker_t *w);

/* flags: 1 reply wanted, 2 force eager, 4 force rendezvous */
int pl_ucx_am_send(pl_ucx_worker_t *w, int ep, unsigned id, const void *header, size_t header_len,
                   const void *data, size_t data_len, int flags, uint32_t slot, uint32_t gen);
/* Returns the stream's serial (> 0, unique in the process: what its readers
 * park on) or -errno. */
int pl_ucx_stream_open(pl_ucx_worker_t *w, unsigned id, uint32_t window);
int pl_ucx_stream_close(pl_ucx_worker_t *w, unsigned id);
/* A held message's handle (its description in *info unless info is NULL),
 * -EAGAIN after queueing the task as a waiter, or -ENOTCONN when nothing
 * can feed the stream any more (no endpoint open or closing, no listener,
 * address never handed out).  Waiters are woken when that becomes so. */
int pl_ucx_stream_next(pl_ucx_worker_t *w, unsigned id, uint32_t slot, uint32_t gen,
                       pl_ucx_msg_info_t *info);
void pl_ucx_stream_abandon(pl_ucx_worker_t *w, unsigned id, uint32_t slot, uint32_t gen);
int pl_ucx_msg_info(pl_ucx_worker_t *w, int msg, pl_ucx_msg_info_t *out);
/* The endpoint to answer a taken message on (an entry made for it if it has
 * none), held until pl_ucx_ep_unhold: a reply endpoint UCX made for a
 * connect_addr peer leaves the table with its last holder.  -errno: why it
 * cannot be answered. */
int pl_ucx_msg_reply_ep(pl_ucx_worker_t *w, int msg);
/* (It frees too an owned entry whose object was collected and that failed:
 * see pl_ucx_ep_drop.) */
void pl_ucx_ep_unhold(pl_ucx_worker_t *w, int ep);
int pl_ucx_msg_recv(pl_ucx_worker_t *w, int msg, void *buf, size_t len, uint32_t slot, uint32_t gen);
int pl_ucx_msg_release(pl_ucx_worker_t *w, int msg);
/* An eager message's data, where UCX holds it (valid until the message is
 * released), or NULL for a rendezvous message or a bad handle. */
const void *pl_ucx_msg_eager_data(pl_ucx_worker_t *w, int msg);
/* Release msg if the task (slot, gen) took it and it is still held (its
 * Lua object was collected); returns 1 if released, else 0. */
int pl_ucx_msg_drop(pl_ucx_worker_t *w, int msg, uint32_t slot, uint32_t gen);
/* Release the messages the task (slot, gen) took and neither received nor
 * released: it ended.  Returns how many. */
int pl_ucx_msgs_release_task(pl_ucx_worker_t *w, uint32_t slot, uint32_t gen);
/* msg, taken and still held, belongs to the task (slot, gen) from now on
 * (the task it was taken by handed it over as a result); 0, or -EBADF. */
int pl_ucx_msg_adopt(pl_ucx_worker_t *w, int msg, uint32_t slot, uint32_t gen);

int pl_ucx_tag_send(pl_ucx_worker_t *w, int ep, uint64_t tag, const void *data, size_t len,
                    uint32_t slot, uint32_t gen);
int pl_ucx_tag_recv(pl_ucx_worker_t *w, uint64_t tag, uint64_t mask, void *buf, size_t len,
                    uint32_t slot, uint32_t gen);

/* Latency histogram (histogram.c): log-linear buckets, <= 0.4% error,
 * constant memory, mergeable.  Values are seconds. */
typedef struct pl_hist pl_hist_t;

pl_hist_t *pl_hist_new(void);
void pl_hist_free(pl_hist_t *h);
void pl_hist_reset(pl_hist_t *h);
void pl_hist_record(pl_hist_t *h, double seconds);
double pl_hist_record_since(pl_hist_t *h, double start);
/* Stamps: a cheaper clock for timing operations back to back (the CPU's
 * invariant TSC where the runtime found one, else the monotonic clock), in
 * units only pl_hist_record_stamp understands.  It records now - stamp and
 * returns now as a stamp. */
double pl_hist_stamp(void);
double pl_hist_stamp_after(double seconds);
double pl_hist_record_stamp(pl_hist_t *h, double stamp);
void pl_hist_merge(pl_hist_t *into, const pl_hist_t *from);
double pl_hist_count(const pl_hist_t *h);
double pl_hist_min(const pl_hist_t *h);
double pl_hist_max(const pl_hist_t *h);
double pl_hist_mean(const pl_hist_t *h);
double pl_hist_percentile(const pl_hist_t *h, double p);
int pl_hist_buckets(const pl_hist_t *h, double *lower, double *counts, int max);

/* -PL_ESQFULL: an io_uring operation found no free submission-queue entry
 * and the kernel refused the early submit that would have freed some
 * (io_uring_submit said EBUSY or EAGAIN).  Not an errno: pl_errname names it
 * EBUSY, pl_strerror says what happened and that queue_size raises the
 * queue's size. */
enum { PL_ESQFULL = 4096 };
/* -PL_EOPSFULL: an io_uring reactor or a UCX worker has as many operations
 * in flight as its op table holds (PL_URING_MAX_OPS, PL_UCX_MAX_OPS).  Not
 * an errno: pl_errname names it ENOMEM, pl_strerror gives the limits. */
enum { PL_EOPSFULL = 4097, PL_URING_MAX_OPS = 262144, PL_UCX_MAX_OPS = 65536 };
/* -PL_EBUFCANCELLED: an io_uring operation was asked to use a registered
 * buffer that an operation of a killed task still uses (its cancel has not
 * landed).  Not an errno: pl_errname names it EBUSY. */
enum { PL_EBUFCANCELLED = 4098 };
/* -PL_EWILDCARD: a UCX listener's host resolved to the wildcard address
 * (0.0.0.0 or ::) but spelled it only by a short form ("0", "0x0", "0.0"):
 * refused, as pl_net_unasked_wildcard refuses it for io_uring sockets.  Not
 * an errno: pl_errname names it EINVAL. */
enum { PL_EWILDCARD = 4099 };
const char *pl_strerror(int err);
const char *pl_errname(int err);
const char *pl_version(void);
/* The stamp of this interface (a checksum of the header's FFI region, made
 * by the Makefile): the Lua modules refuse a library of another. */
const char *pl_abi(void);
/* Ctrl-C for the host's prompt (interrupt.c): pl_interrupt_watch makes
 * SIGINT write a byte to a pipe instead of ending the process, and returns
 * the pipe's read end for a task to read (one byte per interrupt), or
 * -errno; again, the same fd.  pl_interrupt_taken says the byte was read
 * and handled: a second SIGINT before that (nobody could read the pipe: a
 * statement that never yields) puts the earlier action back and raises it
 * (unless SIGINT was ignored before: then it stays ignored).
 * pl_interrupt_unwatch puts the earlier action back and closes the pipe. */
int pl_interrupt_watch(void);
void pl_interrupt_taken(void);
void pl_interrupt_unwatch(void);
/* SIGINT and SIGTERM for the host's script (interrupt.c):
 * pl_signals_catch makes the first one set a flag that stops every
 * runtime's loop (pl_signal_caught returns its number, else 0; the loop
 * cancels its tasks); a second one ends the process at once.  Signals that
 * were ignored stay so.  0 or -errno.  pl_signals_release gives sig its
 * earlier action back (the prompt takes SIGINT over).  pl_signals_end
 * flushes stdio and ends the process by the caught signal, with its
 * earlier action; returns when none was caught. */
int pl_signals_catch(void);
void pl_signals_release(int sig);
int pl_signal_caught(void);
void pl_signals_end(void);

/* PL_CDEF_END */

#ifdef __cplusplus
}
#endif

#endif /* PLUVIO_H */
