/*
 * uring.c - the io_uring reactor: ring set-up, batched submission, op slots,
 * short-I/O continuation and the registered-buffer pool.
 *
 * Lifetime: a pl_uring_t owns its ring, its op slots, its buffer memory and
 * their registration; pl_uring_free releases them (after the ring is gone,
 * so the kernel holds no buffer).  An op slot is owned by the task that
 * started it until it takes the result; if the task dies first the op is
 * "abandoned": cancelled in the kernel and reclaimed by its completion, so
 * memory the kernel may still write to is never handed out again early.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/stat.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <unistd.h>

#include "internal.h"

enum op_state { OP_FREE, OP_IN_FLIGHT, OP_DONE, OP_ABANDONED };
enum op_kind { OP_READ, OP_WRITE, OP_OTHER };

#define NO_BUF (-1)
#define CANCEL_TAG UINT64_MAX   /* user_data of cancel requests: ignored */

/* One operation.  Reads and writes remember where they are so that a short
 * transfer is continued here, not in Lua. */
struct uring_op {
    uint32_t gen;
    uint8_t state;
    uint8_t kind;
    uint32_t task_slot, task_gen;
    int fd;
    int buf_index;          /* registered buffer used, or NO_BUF */
    char *addr;
    uint32_t len;           /* bytes asked */
    uint32_t done;          /* bytes transferred so far */
    uint64_t offset;
    int32_t res;
    uint32_t next_free;
};

enum buf_state { BUF_FREE, BUF_HELD };

struct uring_buf {
    uint8_t state;
    bool release_pending;   /* released while an abandoned op still uses it */
    uint32_t users;         /* in-flight ops using it */
    uint32_t next_free;
};

/* A task waiting for a buffer; handed is set when a buffer was passed to it. */
struct buf_waiter {
    uint32_t slot, gen;
};

struct pl_uring {
    pl_reactor_t reactor;   /* first: the vtable the runtime polls */
    pl_runtime_t *rt;       /* last runtime that polled us (for wakes) */
    struct io_uring ring;
    bool ring_ready;
    pl_uring_options_t opts;
    int64_t wait_submit_ns, wait_complete_ns;
    int64_t first_unsubmitted_ns;

    struct uring_op *ops;
    uint32_t nops, free_op;
    uint32_t in_flight;     /* ops the kernel has (including abandoned) */

    char *buf_mem;
    size_t buf_mem_len;
    struct uring_buf *bufs;
    uint32_t free_buf, nfree_bufs;

    struct buf_waiter *waiters;     /* FIFO ring */
    uint32_t waiters_cap, waiters_head, waiters_len;
    /* handoff[slot]: buffer passed to the waiting task in that slot */
    int32_t *handoff;
    uint32_t *handoff_gen;
    uint32_t handoff_cap;

    pl_uring_stats_t stats;
};

#define NONE UINT32_MAX

/* ---- set-up -------------------------------------------------------------- */

static int uring_poll(pl_reactor_t *self, pl_runtime_t *rt, int budget);
static int uring_status(pl_reactor_t *self);
static int uring_wait_fd(pl_reactor_t *self);
static int uring_block(pl_reactor_t *self, int64_t timeout_ns);
static int uring_stats(pl_reactor_t *self, pl_stat_t *out, int max);
static int uring_flush(pl_reactor_t *self);

static int ops_grow(pl_uring_t *u)
{
    uint32_t n = u->nops ? u->nops * 2 : 64;
    struct uring_op *ops = realloc(u->ops, sizeof(*ops) * n);

    if (!ops)
        return -ENOMEM;
    u->ops = ops;
    for (uint32_t i = n; i-- > u->nops;) {
        ops[i] = (struct uring_op){ .state = OP_FREE, .buf_index = NO_BUF };
        ops[i].next_free = u->free_op;
        u->free_op = i;
    }
    u->nops = n;
    return 0;
}

/* The pool is mapped and registered on first use, so a reactor nobody asks
 * for buffers never pins memory (and never hits RLIMIT_MEMLOCK). */
int pl_uring_buffers_register(pl_uring_t *u)
{
    uint32_t n = u->opts.buffer_count;
    size_t size = u->opts.buffer_size;
    struct iovec *iov;
    int rc = -ENOMEM;

    if (n == 0)
        return -ENOBUFS;
    if (u->bufs)
        return 0;
    u->buf_mem_len = size * n;
    u->buf_mem = mmap(NULL, u->buf_mem_len, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (u->buf_mem == MAP_FAILED) {
        u->buf_mem = NULL;
        return -ENOMEM;
    }
    u->bufs = calloc(n, sizeof(*u->bufs));
    iov = calloc(n, sizeof(*iov));
    if (!u->bufs || !iov) {
        free(iov);
        goto fail;
    }
    u->free_buf = NONE;
    for (uint32_t i = n; i-- > 0;) {
        iov[i].iov_base = u->buf_mem + (size_t)i * size;
        iov[i].iov_len = size;
        u->bufs[i].next_free = u->free_buf;
        u->free_buf = i;
    }
    u->nfree_bufs = n;
    rc = io_uring_register_buffers(&u->ring, iov, n);
    free(iov);
    if (rc == 0)
        return 0;
fail:
    munmap(u->buf_mem, u->buf_mem_len);
    u->buf_mem = NULL;
    free(u->bufs);
    u->bufs = NULL;
    u->free_buf = NONE;
    u->nfree_bufs = 0;
    return rc < 0 ? rc : -ENOMEM;
}

pl_uring_t *pl_uring_new(const pl_uring_options_t *opts, int *err)
{
    struct io_uring_params p = { 0 };
    pl_uring_t *u = calloc(1, sizeof(*u));
    int rc;

    if (!u) {
        *err = -ENOMEM;
        return NULL;
    }
    u->opts = *opts;
    u->reactor = (pl_reactor_t){
        .kind = "io_uring", .poll = uring_poll, .status = uring_status,
        .wait_fd = uring_wait_fd, .block = uring_block, .flush = uring_flush,
        .stats = uring_stats,
    };
    u->wait_submit_ns = (int64_t)(opts->wait_submit_timeout * 1e9);
    u->wait_complete_ns = (int64_t)(opts->wait_complete_timeout * 1e9);
    u->free_op = NONE;
    u->free_buf = NONE;
    p.flags = IORING_SETUP_CQSIZE;
    p.cq_entries = opts->queue_size * 4;
    if (opts->sqpoll) {
        p.flags |= IORING_SETUP_SQPOLL;
        p.sq_thread_idle = opts->sqpoll_idle_ms;
    }
    rc = io_uring_queue_init_params(opts->queue_size, &u->ring, &p);
    if (rc < 0)
        goto fail;
    u->ring_ready = true;
    rc = ops_grow(u);
    if (rc < 0)
        goto fail;
    return u;
fail:
    *err = rc;
    pl_uring_free(u);
    return NULL;
}

void pl_uring_free(pl_uring_t *u)
{
    if (!u)
        return;
    if (u->ring_ready)
        io_uring_queue_exit(&u->ring);  /* waits for the kernel to let go */
    if (u->buf_mem)
        munmap(u->buf_mem, u->buf_mem_len);
    free(u->bufs);
    free(u->ops);
    free(u->waiters);
    free(u->handoff);
    free(u->handoff_gen);
    free(u);
}

pl_reactor_t *pl_uring_reactor(pl_uring_t *u)
{
    return &u->reactor;
}

void pl_uring_attach(pl_uring_t *u, pl_runtime_t *rt)
{
    u->rt = rt;
}

/* ---- submission ---------------------------------------------------------- */

static int submit(pl_uring_t *u)
{
    int rc = io_uring_submit(&u->ring);

    if (rc > 0)
        u->stats.sqes += rc;
    if (!u->opts.sqpoll || rc > 0)
        u->stats.enters++;
    u->first_unsubmitted_ns = 0;
    return rc;
}

int pl_uring_flush(pl_uring_t *u)
{
    return io_uring_sq_ready(&u->ring) > 0 ? submit(u) : 0;
}

/* An SQE, submitting early when the queue is full. */
static struct io_uring_sqe *get_sqe(pl_uring_t *u)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(&u->ring);

    if (!sqe) {
        submit(u);
        sqe = io_uring_get_sqe(&u->ring);
    }
    return sqe;
}

/* Batching: an SQE waits for the next tick, unless submit_depth SQEs wait
 * or the oldest has waited wait_submit_timeout. */
static void maybe_submit(pl_uring_t *u)
{
    unsigned ready = io_uring_sq_ready(&u->ring);

    if (ready >= u->opts.submit_depth) {
        submit(u);
    } else if (ready == 1 || u->first_unsubmitted_ns == 0) {
        u->first_unsubmitted_ns = pl_clock_ns();
    } else if (pl_clock_ns() - u->first_unsubmitted_ns >= u->wait_submit_ns) {
        submit(u);
    }
}

static int op_new(pl_uring_t *u, uint32_t slot, uint32_t gen, uint8_t kind)
{
    uint32_t i;
    struct uring_op *op;

    if (u->free_op == NONE && ops_grow(u) < 0)
        return -ENOMEM;
    i = u->free_op;
    op = &u->ops[i];
    u->free_op = op->next_free;
    op->state = OP_IN_FLIGHT;
    op->kind = kind;
    op->task_slot = slot;
    op->task_gen = gen;
    op->buf_index = NO_BUF;
    op->done = 0;
    op->res = 0;
    return (int)i;
}

static void op_free(pl_uring_t *u, uint32_t i)
{
    struct uring_op *op = &u->ops[i];

    op->state = OP_FREE;
    op->gen++;
    op->next_free = u->free_op;
    u->free_op = i;
}

static uint64_t op_user_data(const pl_uring_t *u, uint32_t i)
{
    return ((uint64_t)u->ops[i].gen << 32) | i;
}

/* Hand the SQE to the ring, account the op as in flight and park its task
 * on it (saving the task a second call into C before it yields). */
static int op_queue(pl_uring_t *u, uint32_t i, struct io_uring_sqe *sqe)
{
    struct uring_op *op = &u->ops[i];

    io_uring_sqe_set_data64(sqe, op_user_data(u, i));
    u->in_flight++;
    if (u->in_flight > u->stats.in_flight_max)
        u->stats.in_flight_max = u->in_flight;
    maybe_submit(u);
    if (u->rt)
        pl_task_wait(u->rt, op->task_slot, PL_WAIT_IO, (double)i);
    return (int)i;
}

/* Prepare the (rest of a) read or write of op i. */
static void prep_rw(pl_uring_t *u, uint32_t i, struct io_uring_sqe *sqe)
{
    struct uring_op *op = &u->ops[i];
    char *addr = op->addr + op->done;
    uint32_t len = op->len - op->done;
    uint64_t off = op->offset + op->done;

    if (op->kind == OP_READ) {
        if (op->buf_index >= 0)
            io_uring_prep_read_fixed(sqe, op->fd, addr, len, off, op->buf_index);
        else
            io_uring_prep_read(sqe, op->fd, addr, len, off);
    } else {
        if (op->buf_index >= 0)
            io_uring_prep_write_fixed(sqe, op->fd, addr, len, off, op->buf_index);
        else
            io_uring_prep_write(sqe, op->fd, addr, len, off);
    }
}

static int buffer_check(pl_uring_t *u, int index, const void *addr, uint32_t len)
{
    const char *base;

    if (index < 0)
        return 0;
    if (!u->bufs || (uint32_t)index >= u->opts.buffer_count || u->bufs[index].state != BUF_HELD)
        return -EINVAL;
    base = u->buf_mem + (size_t)index * u->opts.buffer_size;
    if ((const char *)addr < base || (const char *)addr + len > base + u->opts.buffer_size)
        return -EFAULT;
    return 0;
}

/* An SQE was taken but no op can use it: make it a harmless no-op. */
static void sqe_void(struct io_uring_sqe *sqe)
{
    io_uring_prep_nop(sqe);
    io_uring_sqe_set_data64(sqe, CANCEL_TAG);
}

static int start_rw(pl_uring_t *u, uint32_t slot, uint32_t gen, uint8_t kind, int fd,
                    void *addr, uint32_t len, uint64_t offset, int buf_index)
{
    struct io_uring_sqe *sqe;
    struct uring_op *op;
    int i, rc = buffer_check(u, buf_index, addr, len);

    if (rc < 0)
        return rc;
    sqe = get_sqe(u);
    if (!sqe)
        return -EBUSY;
    i = op_new(u, slot, gen, kind);
    if (i < 0) {
        sqe_void(sqe);
        return i;
    }
    op = &u->ops[i];
    op->fd = fd;
    op->addr = addr;
    op->len = len;
    op->offset = offset;
    op->buf_index = buf_index;
    if (buf_index >= 0)
        u->bufs[buf_index].users++;
    prep_rw(u, (uint32_t)i, sqe);
    return op_queue(u, (uint32_t)i, sqe);
}

int pl_uring_read(pl_uring_t *u, uint32_t slot, uint32_t gen, int fd, void *addr,
                  uint32_t len, uint64_t offset, int buf_index)
{
    return start_rw(u, slot, gen, OP_READ, fd, addr, len, offset, buf_index);
}

int pl_uring_write(pl_uring_t *u, uint32_t slot, uint32_t gen, int fd, const void *addr,
                   uint32_t len, uint64_t offset, int buf_index)
{
    return start_rw(u, slot, gen, OP_WRITE, fd, (void *)addr, len, offset, buf_index);
}

/* Start an op whose SQE the caller prepares: returns the SQE via *sqe_out. */
static int start_other(pl_uring_t *u, uint32_t slot, uint32_t gen,
                       struct io_uring_sqe **sqe_out)
{
    struct io_uring_sqe *sqe = get_sqe(u);
    int i;

    if (!sqe)
        return -EBUSY;
    i = op_new(u, slot, gen, OP_OTHER);
    if (i < 0) {
        sqe_void(sqe);
        return i;
    }
    *sqe_out = sqe;
    return i;
}

#define START_OTHER(prep)                                   \
    do {                                                    \
        struct io_uring_sqe *sqe;                           \
        int i = start_other(u, slot, gen, &sqe);            \
        if (i < 0)                                          \
            return i;                                       \
        prep;                                               \
        return op_queue(u, (uint32_t)i, sqe);               \
    } while (0)

int pl_uring_fsync(pl_uring_t *u, uint32_t slot, uint32_t gen, int fd, int datasync)
{
    START_OTHER(io_uring_prep_fsync(sqe, fd, datasync ? IORING_FSYNC_DATASYNC : 0));
}

int pl_uring_fallocate(pl_uring_t *u, uint32_t slot, uint32_t gen, int fd, int mode,
                       uint64_t offset, uint64_t len)
{
    START_OTHER(io_uring_prep_fallocate(sqe, fd, mode, (off_t)offset, (off_t)len));
}

int pl_uring_openat(pl_uring_t *u, uint32_t slot, uint32_t gen, const char *path,
                    int flags, int mode)
{
    START_OTHER(io_uring_prep_openat(sqe, AT_FDCWD, path, flags | O_CLOEXEC, (mode_t)mode));
}

int pl_uring_close(pl_uring_t *u, uint32_t slot, uint32_t gen, int fd)
{
    START_OTHER(io_uring_prep_close(sqe, fd));
}

int pl_uring_statx(pl_uring_t *u, uint32_t slot, uint32_t gen, int dirfd, const char *path,
                   int flags, void *statx_buf)
{
    START_OTHER(io_uring_prep_statx(sqe, dirfd, path, flags,
                                    STATX_BASIC_STATS | STATX_BTIME | STATX_DIOALIGN,
                                    (struct statx *)statx_buf));
}

int pl_uring_unlinkat(pl_uring_t *u, uint32_t slot, uint32_t gen, const char *path, int flags)
{
    START_OTHER(io_uring_prep_unlinkat(sqe, AT_FDCWD, path, flags));
}

int pl_uring_renameat(pl_uring_t *u, uint32_t slot, uint32_t gen, const char *from,
                      const char *to)
{
    START_OTHER(io_uring_prep_renameat(sqe, AT_FDCWD, from, AT_FDCWD, to, 0));
}

int pl_uring_mkdirat(pl_uring_t *u, uint32_t slot, uint32_t gen, const char *path, int mode)
{
    START_OTHER(io_uring_prep_mkdirat(sqe, AT_FDCWD, path, (mode_t)mode));
}

/* ---- completion ---------------------------------------------------------- */

static void buffer_put(pl_uring_t *u, pl_runtime_t *rt, int index);

/* A read or write came back short: continue it.  Returns true when it was
 * resubmitted (the op stays in flight). */
static bool continue_short(pl_uring_t *u, uint32_t i, int32_t res)
{
    struct uring_op *op = &u->ops[i];
    struct io_uring_sqe *sqe;

    if (op->kind == OP_OTHER || res <= 0)
        return false;
    op->done += (uint32_t)res;
    if (op->done >= op->len || op->state == OP_ABANDONED)
        return false;
    sqe = get_sqe(u);
    if (!sqe)
        return false;   /* report the partial count rather than lose it */
    prep_rw(u, i, sqe);
    io_uring_sqe_set_data64(sqe, op_user_data(u, i));
    u->stats.resubmits++;
    return true;
}

/* The op's buffer is no longer in the kernel's hands. */
static void op_drop_buffer(pl_uring_t *u, struct uring_op *op)
{
    struct uring_buf *b;

    if (op->buf_index < 0)
        return;
    b = &u->bufs[op->buf_index];
    b->users--;
    if (b->users == 0 && b->release_pending) {
        b->release_pending = false;
        buffer_put(u, u->rt, op->buf_index);
    }
}

static void op_complete(pl_uring_t *u, uint32_t i, int32_t res)
{
    struct uring_op *op = &u->ops[i];

    if (continue_short(u, i, res))
        return;
    u->in_flight--;
    op_drop_buffer(u, op);
    if (op->state == OP_ABANDONED) {
        op_free(u, i);
        return;
    }
    /* reads and writes report bytes; an error after progress keeps the count */
    if (op->kind != OP_OTHER && res >= 0)
        op->res = (int32_t)op->done;
    else
        op->res = res;
    op->state = OP_DONE;
    if (u->rt)
        pl_task_wake(u->rt, op->task_slot, op->task_gen);
}

static int reap(pl_uring_t *u, int budget)
{
    struct io_uring_cqe *cqe;
    unsigned head;
    int n = 0;

    io_uring_for_each_cqe(&u->ring, head, cqe) {
        uint64_t ud = io_uring_cqe_get_data64(cqe);
        uint32_t i = (uint32_t)ud;

        n++;
        if (ud != CANCEL_TAG && i < u->nops && u->ops[i].gen == (uint32_t)(ud >> 32) &&
            u->ops[i].state != OP_FREE)
            op_complete(u, i, cqe->res);
        if (n >= budget)
            break;
    }
    io_uring_cq_advance(&u->ring, (unsigned)n);
    u->stats.completions += n;
    return n;
}

/* Only reap: what tasks queued goes out with the tick's flush or sleep,
 * so each tick costs one io_uring_enter. */
static int uring_poll(pl_reactor_t *self, pl_runtime_t *rt, int budget)
{
    pl_uring_t *u = (pl_uring_t *)self;

    u->rt = rt;
    return reap(u, budget);
}

static int uring_flush(pl_reactor_t *self)
{
    return pl_uring_flush((pl_uring_t *)self);
}

static int uring_status(pl_reactor_t *self)
{
    pl_uring_t *u = (pl_uring_t *)self;

    if (io_uring_cq_ready(&u->ring) > 0)
        return PL_REACTOR_READY;
    return u->in_flight > 0 ? PL_REACTOR_PENDING : PL_REACTOR_IDLE;
}

static int uring_wait_fd(pl_reactor_t *self)
{
    pl_uring_t *u = (pl_uring_t *)self;

    pl_uring_flush(u);      /* what the fd signals must have been submitted */
    return u->ring.ring_fd;
}

static int uring_block(pl_reactor_t *self, int64_t timeout_ns)
{
    pl_uring_t *u = (pl_uring_t *)self;
    struct __kernel_timespec ts;
    struct io_uring_cqe *cqe;
    int rc;

    if (u->wait_complete_ns > 0 && (timeout_ns < 0 || timeout_ns > u->wait_complete_ns))
        timeout_ns = u->wait_complete_ns;
    u->first_unsubmitted_ns = 0;
    u->stats.sqes += io_uring_sq_ready(&u->ring);     /* submitted with the wait */
    if (timeout_ns < 0) {
        rc = io_uring_submit_and_wait(&u->ring, 1);
    } else {
        ts.tv_sec = timeout_ns / 1000000000;
        ts.tv_nsec = timeout_ns % 1000000000;
        rc = io_uring_submit_and_wait_timeout(&u->ring, &cqe, 1, &ts, NULL);
    }
    u->stats.enters++;
    return rc < 0 ? rc : 0;
}

int pl_uring_op_take(pl_uring_t *u, int i, pl_uring_result_t *out)
{
    struct uring_op *op;

    if (i < 0 || (uint32_t)i >= u->nops || u->ops[i].state == OP_FREE)
        return -ESRCH;
    op = &u->ops[i];
    if (op->state != OP_DONE)
        return 0;
    out->res = op->res;
    out->bytes = op->done;
    op_free(u, (uint32_t)i);
    return 1;
}

int pl_uring_op_abandon(pl_uring_t *u, int i)
{
    struct uring_op *op;
    struct io_uring_sqe *sqe;

    if (i < 0 || (uint32_t)i >= u->nops || u->ops[i].state == OP_FREE)
        return -ESRCH;
    op = &u->ops[i];
    if (op->state == OP_DONE) {
        op_free(u, (uint32_t)i);
        return 0;
    }
    op->state = OP_ABANDONED;
    u->stats.cancels++;
    sqe = get_sqe(u);
    if (sqe) {
        io_uring_prep_cancel64(sqe, op_user_data(u, (uint32_t)i), 0);
        io_uring_sqe_set_data64(sqe, CANCEL_TAG);
    }
    return 0;
}

/* ---- registered buffers -------------------------------------------------- */

int pl_uring_buffer_count(pl_uring_t *u)
{
    return (int)u->opts.buffer_count;
}

uint32_t pl_uring_buffer_size(pl_uring_t *u)
{
    return u->opts.buffer_size;
}

void *pl_uring_buffer_ptr(pl_uring_t *u, int index)
{
    if (!u->buf_mem || index < 0 || (uint32_t)index >= u->opts.buffer_count)
        return NULL;
    return u->buf_mem + (size_t)index * u->opts.buffer_size;
}

/* handoff[] is indexed by task slot; it grows with the largest slot seen. */
static int handoff_reserve(pl_uring_t *u, uint32_t slot)
{
    uint32_t cap = u->handoff_cap ? u->handoff_cap : 64;
    int32_t *h;
    uint32_t *g;

    if (slot < u->handoff_cap)
        return 0;
    while (cap <= slot)
        cap *= 2;
    h = realloc(u->handoff, sizeof(*h) * cap);
    if (!h)
        return -ENOMEM;
    u->handoff = h;
    g = realloc(u->handoff_gen, sizeof(*g) * cap);
    if (!g)
        return -ENOMEM;
    u->handoff_gen = g;
    for (uint32_t i = u->handoff_cap; i < cap; i++) {
        h[i] = NO_BUF;
        g[i] = 0;
    }
    u->handoff_cap = cap;
    return 0;
}

static int waiters_push(pl_uring_t *u, uint32_t slot, uint32_t gen)
{
    if (u->waiters_len == u->waiters_cap) {
        uint32_t cap = u->waiters_cap ? u->waiters_cap * 2 : 64;
        struct buf_waiter *w = malloc(sizeof(*w) * cap);
        if (!w)
            return -ENOMEM;
        for (uint32_t k = 0; k < u->waiters_len; k++)
            w[k] = u->waiters[(u->waiters_head + k) % u->waiters_cap];
        free(u->waiters);
        u->waiters = w;
        u->waiters_cap = cap;
        u->waiters_head = 0;
    }
    u->waiters[(u->waiters_head + u->waiters_len++) % u->waiters_cap] =
        (struct buf_waiter){ slot, gen };
    return 0;
}

static struct buf_waiter *find_waiter(pl_uring_t *u, uint32_t slot, uint32_t gen)
{
    for (uint32_t k = 0; k < u->waiters_len; k++) {
        struct buf_waiter *w = &u->waiters[(u->waiters_head + k) % u->waiters_cap];
        if (w->slot == slot && w->gen == gen)
            return w;
    }
    return NULL;
}

/* Give buffer index to the first waiter still waiting (FIFO), or free it. */
static void buffer_put(pl_uring_t *u, pl_runtime_t *rt, int index)
{
    while (u->waiters_len > 0) {
        struct buf_waiter w = u->waiters[u->waiters_head];
        u->waiters_head = (u->waiters_head + 1) % u->waiters_cap;
        u->waiters_len--;
        if (w.slot < u->handoff_cap && rt && pl_task_wake(rt, w.slot, w.gen) >= 0) {
            u->handoff[w.slot] = index;
            u->handoff_gen[w.slot] = w.gen;
            return;             /* stays held, now by the waiter */
        }
    }
    u->bufs[index].state = BUF_FREE;
    u->bufs[index].next_free = u->free_buf;
    u->free_buf = (uint32_t)index;
    u->nfree_bufs++;
}

int pl_uring_buffer_acquire(pl_uring_t *u, pl_runtime_t *rt, uint32_t slot, uint32_t gen)
{
    int rc = pl_uring_buffers_register(u);

    if (rc < 0)
        return rc;
    if (slot < u->handoff_cap && u->handoff[slot] != NO_BUF) {
        int index = u->handoff[slot];
        u->handoff[slot] = NO_BUF;
        if (u->handoff_gen[slot] == gen)
            return index;
        buffer_put(u, rt, index);   /* a dead task's: pass it on */
    }
    if (u->free_buf != NONE && u->waiters_len == 0) {
        uint32_t i = u->free_buf;
        u->free_buf = u->bufs[i].next_free;
        u->nfree_bufs--;
        u->bufs[i].state = BUF_HELD;
        return (int)i;
    }
    if (find_waiter(u, slot, gen))
        return -EAGAIN;
    rc = handoff_reserve(u, slot);
    if (rc == 0)
        rc = waiters_push(u, slot, gen);
    if (rc < 0)
        return rc;
    u->stats.buffer_waits++;
    return -EAGAIN;
}

void pl_uring_buffer_abandon(pl_uring_t *u, pl_runtime_t *rt, uint32_t slot, uint32_t gen)
{
    struct buf_waiter *w = find_waiter(u, slot, gen);

    if (w)
        w->slot = NONE;         /* skipped when its turn comes */
    if (slot < u->handoff_cap && u->handoff[slot] != NO_BUF && u->handoff_gen[slot] == gen) {
        int index = u->handoff[slot];
        u->handoff[slot] = NO_BUF;
        buffer_put(u, rt, index);
    }
}

int pl_uring_buffer_release(pl_uring_t *u, pl_runtime_t *rt, int index)
{
    struct uring_buf *b;

    if (!u->bufs || index < 0 || (uint32_t)index >= u->opts.buffer_count)
        return -EINVAL;
    b = &u->bufs[index];
    if (b->state != BUF_HELD || b->release_pending)
        return -EALREADY;
    u->rt = rt;
    if (b->users > 0) {         /* an abandoned op may still write into it */
        b->release_pending = true;
        return 0;
    }
    buffer_put(u, rt, index);
    return 0;
}

/* ---- statistics and helpers ---------------------------------------------- */

void pl_uring_get_stats(pl_uring_t *u, pl_uring_stats_t *out)
{
    *out = u->stats;
    out->in_flight = u->in_flight;
    out->buffers_free = u->nfree_bufs;
}

static int uring_stats(pl_reactor_t *self, pl_stat_t *out, int max)
{
    static const char *const names[] = {
        "sqes", "enters", "completions", "in_flight", "in_flight_max",
        "buffer_waits", "buffers_free", "resubmits", "cancels",
    };
    pl_uring_stats_t s;
    double values[9];
    int n;

    pl_uring_get_stats((pl_uring_t *)self, &s);
    values[0] = s.sqes;
    values[1] = s.enters;
    values[2] = s.completions;
    values[3] = s.in_flight;
    values[4] = s.in_flight_max;
    values[5] = s.buffer_waits;
    values[6] = s.buffers_free;
    values[7] = s.resubmits;
    values[8] = s.cancels;
    for (n = 0; n < 9 && n < max; n++) {
        out[n].name = names[n];
        out[n].value = values[n];
    }
    return n;
}

int pl_uring_statx_size(void)
{
    return (int)sizeof(struct statx);
}

static double ts_of(const struct statx_timestamp *t)
{
    return (double)t->tv_sec + (double)t->tv_nsec / 1e9;
}

void pl_uring_statx_decode(const void *statx_buf, pl_file_stat_t *out)
{
    const struct statx *st = statx_buf;

    out->size = (double)st->stx_size;
    out->blocks = (double)st->stx_blocks;
    out->blksize = st->stx_blksize;
    out->mode = st->stx_mode;
    out->uid = st->stx_uid;
    out->gid = st->stx_gid;
    out->nlink = st->stx_nlink;
    out->ino = (double)st->stx_ino;
    out->atime = ts_of(&st->stx_atime);
    out->mtime = ts_of(&st->stx_mtime);
    out->ctime = ts_of(&st->stx_ctime);
    out->btime = (st->stx_mask & STATX_BTIME) ? ts_of(&st->stx_btime) : 0;
    if (st->stx_mask & STATX_DIOALIGN) {
        out->dio_mem_align = st->stx_dio_mem_align;
        out->dio_offset_align = st->stx_dio_offset_align;
    } else {
        out->dio_mem_align = 0;
        out->dio_offset_align = 0;
    }
    out->dev_major = st->stx_dev_major;
    out->dev_minor = st->stx_dev_minor;
}

/* No IORING_OP_FTRUNCATE before Linux 6.9: truncate is a quick metadata
 * call, done synchronously. */
int pl_file_truncate(int fd, uint64_t len)
{
    return ftruncate(fd, (off_t)len) < 0 ? -errno : 0;
}

/* open(2) flags for an io.open-style mode ("r", "w", "a", "r+", "w+", "a+"),
 * plus O_DIRECT when direct; -EINVAL for any other mode. */
int pl_file_flags(const char *mode, int direct)
{
    static const struct { const char *mode; int flags; } modes[] = {
        { "r", O_RDONLY }, { "w", O_WRONLY | O_CREAT | O_TRUNC },
        { "a", O_WRONLY | O_CREAT | O_APPEND }, { "r+", O_RDWR },
        { "w+", O_RDWR | O_CREAT | O_TRUNC }, { "a+", O_RDWR | O_CREAT | O_APPEND },
    };

    for (size_t i = 0; i < sizeof(modes) / sizeof(modes[0]); i++)
        if (strcmp(mode, modes[i].mode) == 0)
            return modes[i].flags | (direct ? O_DIRECT : 0);
    return -EINVAL;
}

int pl_file_open_sync(const char *path, int flags, int mode)
{
    int fd = open(path, flags | O_CLOEXEC, (mode_t)mode);

    return fd < 0 ? -errno : fd;
}

int pl_file_close_sync(int fd)
{
    return close(fd) < 0 ? -errno : 0;
}
