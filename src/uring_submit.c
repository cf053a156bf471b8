/*
 * uring_submit.c - starting io_uring operations: an op slot and an SQE
 * each, batched into one io_uring_enter per tick (or earlier: submit_depth,
 * wait_submit_timeout), and an op the kernel finished inside the submit
 * taken at once (finish_inline).
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "uring_internal.h"

int uring_submit(pl_uring_t *u)
{
    int rc = io_uring_submit(&u->ring);

    if (rc > 0)
        u->stats.sqes += rc;
    if (!u->opts.sqpoll || rc > 0)
        u->stats.enters++;
    u->first_unsubmitted_cyc = 0;
    return rc;
}

int pl_uring_flush(pl_uring_t *u)
{
    if (u->cancels_due > 0)
        uring_cancels_retry(u);
    if (u->rests_due > 0)
        uring_rests_retry(u);
    return io_uring_sq_ready(&u->ring) > 0 ? uring_submit(u) : 0;
}

/* A free SQE once the due rests, which come first, have theirs; NULL when
 * they took them all or none is free. */
static struct io_uring_sqe *sqe_after_rests(pl_uring_t *u)
{
    if (u->rests_due > 0)
        uring_rests_send(u);
    return u->rests_due == 0 ? io_uring_get_sqe(&u->ring) : NULL;
}

/* uring_get_sqe's way when the submission queue is full, or when rests of
 * short transfers wait for SQEs (they go first): submit early, and again
 * while the kernel takes entries and the rests take all it frees (one
 * submit frees queue_size entries, fewer than the rests may need: the op
 * then failed as refused, though the kernel refused nothing).  With SQPOLL
 * the submit only hands the SQEs to the kernel thread, which takes them in
 * its own time: wait until it has taken one rather than fail the
 * operation (each round submits first the rests put in what it freed: the
 * thread, which has not seen them, would not make the wait block).  NULL
 * when the kernel refused the submit (EBUSY, EAGAIN): a new operation then
 * fails with -PL_ESQFULL, a rest waits (uring_rest.c). */
struct io_uring_sqe *uring_sqe_full(pl_uring_t *u)
{
    struct io_uring_sqe *sqe;

    while (!(sqe = sqe_after_rests(u))) {
        int taken = uring_submit(u);

        if (u->opts.sqpoll ? io_uring_sqring_wait(&u->ring) < 0 : taken <= 0)
            break;
    }
    return sqe;
}

/* Batching: an SQE waits for the next tick, unless submit_depth SQEs wait
 * or the oldest has waited wait_submit_timeout.  now (pl_cycles) is the
 * time the starting task stopped running (its park just read the clock): a
 * second clock read per operation would cost more than the check itself. */
static void maybe_submit(pl_uring_t *u, int64_t now)
{
    unsigned ready = io_uring_sq_ready(&u->ring);

    if (ready >= u->opts.submit_depth) {
        uring_submit(u);
    } else if (ready == 1 || u->first_unsubmitted_cyc == 0) {
        u->first_unsubmitted_cyc = now;
    } else if (now - u->first_unsubmitted_cyc >= u->wait_submit_cyc) {
        uring_submit(u);
    }
}

static inline int op_new(pl_uring_t *u, uint32_t slot, uint32_t gen, uint8_t kind)
{
    uint32_t i;
    struct uring_op *op;

    if (u->free_op == NONE) {
        int rc = uring_ops_grow(u);

        if (rc < 0)
            return rc;
    }
    i = u->free_op;
    op = uring_op(u, i);
    u->free_op = op->next_free;
    u->chunk_used[i / URING_OPS_PER_CHUNK]++;
    op->state = OP_IN_FLIGHT;
    op->kind = kind;
    op->task_slot = slot;
    op->task_gen = gen;
    op->buf_index = NO_BUF;
    op->done = 0;
    op->res = 0;
    op->queue = NONE;
    op->fd = -1;
    op->no_continue = false;
    op->fd_owner = FD_NONE;
    op->cancel_due = false;
    op->fd_closed = false;
    op->rest_due = false;
    op->stream = false;
    return (int)i;
}

/* The op was just submitted: when the kernel finished it inside the submit
 * (a page-cache read, a socket with data waiting) and the ready ring is
 * empty, its task takes the result at once instead of parking and being
 * resumed by the next tick.  (Tasks of the current batch, already drained
 * from the ring, wait meanwhile.)  At most URING_INLINE_MAX in a row per
 * tick, so that they, timers and other reactors are not kept waiting long. */
static bool finish_inline(pl_uring_t *u, uint32_t i)
{
    pl_runtime_t *rt = u->rt;

    if (u->inline_streak >= URING_INLINE_MAX || !pl_ready_empty(rt) ||
        io_uring_cq_ready(&u->ring) == 0)
        return false;
    u->inline_op = i;           /* its completion wakes nobody: the task runs */
    uring_reap(u, INT32_MAX);
    u->inline_op = NONE;
    u->hold_flush = !u->opts.sqpoll && !pl_ready_empty(rt);   /* (sqpoll: nothing to save) */
    if (uring_op(u, i)->state != OP_DONE)
        return false;
    u->inline_streak++;
    return true;
}

/* Hand the SQE to the ring, account the op as in flight and park its task
 * on it (saving the task a second call into C before it yields).  Returns
 * the op id, with PL_URING_OP_INLINE added when the op is already done and
 * the task was not parked. */
int uring_op_queue(pl_uring_t *u, uint32_t i, struct io_uring_sqe *sqe)
{
    struct uring_op *op = uring_op(u, i);
    bool at_once;

    io_uring_sqe_set_data64(sqe, uring_op_user_data(u, i));
    u->in_flight++;
    if (u->in_flight > u->stats.in_flight_max)
        u->stats.in_flight_max = u->in_flight;
    if (!u->rt) {
        maybe_submit(u, pl_cycles());
        return (int)i;
    }
    if (op->queue != NONE) {
        /* nobody parks on it; the time the task began running stands in
         * for now, as the clock read would cost more than the check (a
         * task that computes long between starts delays its own SQEs to
         * its next wait, as it delays every other task) */
        maybe_submit(u, u->rt->switch_cyc);
        return (int)i;
    }
    at_once = io_uring_sq_ready(&u->ring) >= u->opts.submit_depth;
    if (at_once) {
        uring_submit(u);
        if (finish_inline(u, i))
            return (int)i + PL_URING_OP_INLINE;
    }
    pl_task_wait(u->rt, op->task_slot, PL_WAIT_IO, (double)i);
    if (!at_once)
        maybe_submit(u, u->rt->switch_cyc);
    return (int)i;
}

/* Prepare the (rest of a) read, write or send of op i. */
void uring_prep_rw(pl_uring_t *u, uint32_t i, struct io_uring_sqe *sqe)
{
    struct uring_op *op = uring_op(u, i);
    uint64_t off = op->stream ? op->offset : op->offset + op->done;
    char *addr;
    uint32_t len;

    if (op->kind == OP_READV || op->kind == OP_WRITEV) {
        const struct iovec *v = &op->iovs[op->iov_first];
        unsigned n = op->iov_count - op->iov_first;
        if (op->kind == OP_READV)
            io_uring_prep_readv(sqe, op->fd, v, n, off);
        else
            io_uring_prep_writev(sqe, op->fd, v, n, off);
        return;
    }
    addr = op->addr + op->done;
    len = op->len - op->done;
    if (op->kind == OP_SEND)
        io_uring_prep_send(sqe, op->fd, addr, len, MSG_NOSIGNAL);
    else if (op->kind == OP_READ && op->buf_index >= 0)
        io_uring_prep_read_fixed(sqe, op->fd, addr, len, off, op->buf_index);
    else if (op->kind == OP_READ)
        io_uring_prep_read(sqe, op->fd, addr, len, off);
    else if (op->buf_index >= 0)
        io_uring_prep_write_fixed(sqe, op->fd, addr, len, off, op->buf_index);
    else
        io_uring_prep_write(sqe, op->fd, addr, len, off);
}

static inline int buffer_check(pl_uring_t *u, int index, const void *addr, uint32_t len)
{
    const char *base;

    if (index < 0)
        return 0;
    if (!uring_held_buf(u, index))
        return -EINVAL;
    if (u->bufs[index].cancelled > 0)      /* a killed task's op still has it */
        return -PL_EBUFCANCELLED;
    base = u->buf_mem + (size_t)index * u->opts.buffer_size;
    if ((const char *)addr < base || (const char *)addr + len > base + u->opts.buffer_size)
        return -EFAULT;
    return 0;
}

/* An SQE was taken but no op can use it: make it a harmless no-op. */
void uring_sqe_void(struct io_uring_sqe *sqe)
{
    io_uring_prep_nop(sqe);
    io_uring_sqe_set_data64(sqe, CANCEL_TAG);
}

/* An SQE and an op of the given kind for fd (len bytes at offset), or
 * -errno with nothing taken.  len is at most INT32_MAX: an op's result is
 * an int32 (a 3 GiB write, continued past the kernel's 2 GiB cap, came
 * back as a negative "error"). */
static inline int op_begin(pl_uring_t *u, uint32_t slot, uint32_t gen, uint8_t kind, int fd,
                           uint32_t len, uint64_t offset, struct io_uring_sqe **sqe_out)
{
    struct io_uring_sqe *sqe;
    struct uring_op *op;
    int i;

    if (len > INT32_MAX)
        return -EINVAL;
    sqe = uring_get_sqe(u);
    if (!sqe)
        return -PL_ESQFULL;
    i = op_new(u, slot, gen, kind);
    if (i < 0) {
        uring_sqe_void(sqe);
        return i;
    }
    op = uring_op(u, i);
    op->fd = fd;
    op->len = len;
    op->offset = offset;
    *sqe_out = sqe;
    return i;
}

int uring_op_begin(pl_uring_t *u, uint32_t slot, uint32_t gen, uint8_t kind, int fd,
                   uint32_t len, uint64_t offset, struct io_uring_sqe **sqe_out)
{
    return op_begin(u, slot, gen, kind, fd, len, offset, sqe_out);
}

/* A read, write or send; queue: the I/O queue it reports to, or NONE. */
int uring_start_rw(pl_uring_t *u, uint32_t slot, uint32_t gen, uint8_t kind, int fd,
                   void *addr, uint32_t len, uint64_t offset, int buf_index, uint32_t queue)
{
    struct io_uring_sqe *sqe;
    struct uring_op *op;
    int i, rc = buffer_check(u, buf_index, addr, len);

    if (rc < 0)
        return rc;
    i = op_begin(u, slot, gen, kind, fd, len, offset, &sqe);
    if (i < 0)
        return i;
    op = uring_op(u, i);
    op->addr = addr;
    op->buf_index = buf_index;
    op->queue = queue;
    if (buf_index >= 0)
        u->bufs[buf_index].users++;
    uring_prep_rw(u, (uint32_t)i, sqe);
    return uring_op_queue(u, (uint32_t)i, sqe);
}

int pl_uring_read(pl_uring_t *u, uint32_t slot, uint32_t gen, int fd, void *addr,
                  uint32_t len, uint64_t offset, int buf_index)
{
    return uring_start_rw(u, slot, gen, OP_READ, fd, addr, len, offset, buf_index, NONE);
}

int pl_uring_write(pl_uring_t *u, uint32_t slot, uint32_t gen, int fd, const void *addr,
                   uint32_t len, uint64_t offset, int buf_index)
{
    return uring_start_rw(u, slot, gen, OP_WRITE, fd, (void *)addr, len, offset, buf_index, NONE);
}

static int start_rwv(pl_uring_t *u, uint32_t slot, uint32_t gen, uint8_t kind, int fd,
                     const pl_iovec_t *parts, int nparts, uint64_t offset)
{
    struct io_uring_sqe *sqe;
    struct uring_op *op;
    uint64_t total = 0;
    int i;

    if (nparts < 1 || nparts > PL_URING_IOV_MAX)
        return -EINVAL;
    for (int p = 0; p < nparts; p++) {
        int b = uring_buffer_index_of(u, parts[p].base, parts[p].len);
        if (b != NO_BUF && u->bufs[b].cancelled > 0)   /* a killed task's op still has it */
            return -PL_EBUFCANCELLED;
        total += parts[p].len;
    }
    if (total > INT32_MAX)       /* (op_begin's limit) */
        return -EINVAL;
    i = uring_op_begin(u, slot, gen, kind, fd, (uint32_t)total, offset, &sqe);
    if (i < 0)
        return i;
    op = uring_op(u, i);
    for (int p = 0; p < nparts; p++) {
        int b = uring_buffer_index_of(u, parts[p].base, parts[p].len);
        op->iovs[p] = (struct iovec){ .iov_base = parts[p].base, .iov_len = parts[p].len };
        op->iov_buf[p] = b;
        if (b != NO_BUF)    /* out of the pool while the kernel has it */
            u->bufs[b].users++;
    }
    op->iov_first = 0;
    op->iov_count = (uint32_t)nparts;
    uring_prep_rw(u, (uint32_t)i, sqe);
    return uring_op_queue(u, (uint32_t)i, sqe);
}

int pl_uring_readv(pl_uring_t *u, uint32_t slot, uint32_t gen, int fd, const pl_iovec_t *parts,
                   int nparts, uint64_t offset)
{
    return start_rwv(u, slot, gen, OP_READV, fd, parts, nparts, offset);
}

int pl_uring_writev(pl_uring_t *u, uint32_t slot, uint32_t gen, int fd, const pl_iovec_t *parts,
                    int nparts, uint64_t offset)
{
    return start_rwv(u, slot, gen, OP_WRITEV, fd, parts, nparts, offset);
}

/* Start an op whose SQE the caller prepares: returns the SQE via *sqe_out. */
int uring_start_other(pl_uring_t *u, uint32_t slot, uint32_t gen,
                       struct io_uring_sqe **sqe_out)
{
    return uring_op_begin(u, slot, gen, OP_OTHER, -1, 0, 0, sqe_out);
}

/* Start an op on fd that the kernel may look up only when it runs: fsync,
 * fallocate, statx of an fd and shutdown go to a worker thread before the
 * kernel takes the file, so until then they name it by its number.  A close
 * of the file by another task in the same submit (its cancel cannot find
 * them: it matches the file, which they do not hold yet) would leave them a
 * closed number, EBADF, or one an open made meanwhile reused: a fallocate
 * then grew another file.  So the op runs on a duplicate of fd, its own
 * until it completes (FD_DUP), which no close of the file can take away. */
int uring_start_on_fd(pl_uring_t *u, uint32_t slot, uint32_t gen, int fd,
                      struct io_uring_sqe **sqe_out)
{
    int dup = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    int i;

    if (dup < 0)
        return -errno;
    i = uring_start_other(u, slot, gen, sqe_out);
    if (i < 0) {
        close(dup);
        return i;
    }
    uring_op(u, (uint32_t)i)->fd = dup;
    uring_op(u, (uint32_t)i)->fd_owner = FD_DUP;
    return i;
}
