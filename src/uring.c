/*
 * uring.c - the io_uring reactor: ring set-up, op slots, batched submission,
 * completion (with short-I/O continuation) and statistics.  Cancels and
 * the shutdown are in uring_cancel.c, rests waiting for an SQE in
 * uring_rest.c; files, buffers, sockets and I/O
 * queues in uring_file.c, uring_buf.c, uring_net.c and uring_queue.c.
 *
 * Lifetime: a pl_uring_t owns its ring, its op slots, its buffer memory and
 * their registration; pl_uring_free releases them once the kernel has
 * finished every op (pl_uring_shutdown cancels them and waits, bounded: an
 * op that outlives the wait keeps its memory, leaked).  An op slot is owned
 * by the task that started it until it takes the result; if the task dies
 * first the op is "abandoned": cancelled in the kernel and reclaimed by its
 * completion, so memory the kernel may still write to is never handed out
 * again early.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "uring_internal.h"

/* An op slot per op in flight, in chunks: its size is the reactor's memory
 * per op, and what a new field costs (the rest of a short transfer that
 * waits for an SQE links through next_free, unused then, for that reason). */
_Static_assert(sizeof(void *) != 8 || sizeof(struct uring_op) <= 400,
               "struct uring_op grew past 400 bytes on a 64-bit build");

/* ---- set-up -------------------------------------------------------------- */

static int uring_poll(pl_reactor_t *self, pl_runtime_t *rt, int budget);
static int uring_status(pl_reactor_t *self);
static int uring_wait_fd(pl_reactor_t *self);
static int uring_block(pl_reactor_t *self, int64_t timeout_ns);
static int uring_stats(pl_reactor_t *self, pl_stat_t *out, int max);
static int uring_flush(pl_reactor_t *self);

/* Op slots come in chunks that never move: the kernel may write into a
 * slot (a recvmsg's source address) while more slots are being added. */
static int ops_grow(pl_uring_t *u)
{
    uint32_t c = u->nops / URING_OPS_PER_CHUNK;
    struct uring_op *chunk;

    if (c == URING_MAX_OP_CHUNKS)
        return -PL_EOPSFULL;
    chunk = calloc(URING_OPS_PER_CHUNK, sizeof(*chunk));
    if (!chunk)
        return -ENOMEM;
    u->op_chunks[c] = chunk;
    for (uint32_t k = URING_OPS_PER_CHUNK; k-- > 0;) {
        chunk[k] = (struct uring_op){ .index = u->nops + k, .state = OP_FREE, .buf_index = NO_BUF };
        chunk[k].next_free = u->free_op;
        u->free_op = u->nops + k;
    }
    u->nops += URING_OPS_PER_CHUNK;
    return 0;
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
    pl_cycles_init();
    u->wait_submit_cyc = pl_ns_to_cycles((int64_t)(opts->wait_submit_timeout * 1e9));
    u->wait_complete_ns = (int64_t)(opts->wait_complete_timeout * 1e9);
    u->free_op = NONE;
    u->inline_op = NONE;
    u->free_buf = NONE;
    u->free_queue = NONE;
    u->rests_head = u->rests_tail = NONE;
    /* room for completions of ops resubmitted or finished while the SQ
     * refills, within the kernel's limit of 65536 CQEs */
    p.flags = IORING_SETUP_CQSIZE;
    p.cq_entries = opts->queue_size <= 16384 ? opts->queue_size * 4 : 65536;
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
    bool kernel_done;

    if (!u)
        return;
    kernel_done = pl_uring_shutdown(u, URING_SHUTDOWN_WAIT) == 0;
    if (!kernel_done)
        fprintf(stderr, "pluvio: an io_uring reactor was freed while the kernel still had %u "
                "operations %g s after cancelling them: their memory (op slots%s) is leaked, "
                "not freed under the kernel\n", u->in_flight, URING_SHUTDOWN_WAIT,
                u->buf_mem ? ", registered buffers" : "");
    if (u->ring_ready)
        io_uring_queue_exit(&u->ring);
    if (u->buf_mem && kernel_done)
        munmap(u->buf_mem, u->buf_map_len);
    free(u->bufs);
    for (uint32_t c = 0; kernel_done && c < u->nops / URING_OPS_PER_CHUNK; c++)
        free(u->op_chunks[c]);
    uring_queues_free(u);
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

/* (A scan: asked when a runtime would take the reactor, not per op.) */
int pl_uring_ops_pending(pl_uring_t *u, const pl_runtime_t *rt, uint32_t *first)
{
    int n = 0;

    for (uint32_t i = 0; i < u->nops; i++) {
        const struct uring_op *op = uring_op(u, i);
        if (op->state == OP_IN_FLIGHT && pl_task_is_live(rt, op->task_slot, op->task_gen) && n++ == 0)
            *first = op->task_slot;
    }
    return n;
}

/* ---- submission ---------------------------------------------------------- */

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
        int rc = ops_grow(u);

        if (rc < 0)
            return rc;
    }
    i = u->free_op;
    op = uring_op(u, i);
    u->free_op = op->next_free;
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

static int reap(pl_uring_t *u, int budget);

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
    reap(u, INT32_MAX);
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

/* ---- completion ---------------------------------------------------------- */

void uring_buffer_put(pl_uring_t *u, pl_runtime_t *rt, int index);

/* Skip the first n bytes of a vectored op's remaining parts. */
static void iov_advance(struct uring_op *op, uint32_t n)
{
    while (n > 0 && op->iov_first < op->iov_count) {
        struct iovec *v = &op->iovs[op->iov_first];
        if (n < v->iov_len) {
            v->iov_base = (char *)v->iov_base + n;
            v->iov_len -= n;
            return;
        }
        n -= (uint32_t)v->iov_len;
        op->iov_first++;
    }
}

/* The file's O_DIRECT offset alignment: what STATX_DIOALIGN reports, else
 * (a kernel before 6.1) the file system's block size, as DmaFile's checks
 * take it, else 512. */
static uint32_t direct_offset_align(int fd)
{
    struct statx st;

    if (statx(fd, "", AT_EMPTY_PATH, STATX_DIOALIGN | STATX_BASIC_STATS, &st) != 0)
        return 512;
    if ((st.stx_mask & STATX_DIOALIGN) && st.stx_dio_offset_align > 0)
        return st.stx_dio_offset_align;
    return st.stx_blksize > 0 ? st.stx_blksize : 512;
}

/* Whether a short read ended at the end of an O_DIRECT file: only there
 * does such a read stop at a count that is no multiple of the file's block
 * (512 bytes, or 4096 on many disks).  Its rest would start at an unaligned
 * offset and address, which the kernel refuses (EINVAL) once the file has
 * grown meanwhile: the read would fail after reading all there was.  (An
 * fcntl, and for an O_DIRECT file a statx, on a short read only: at the end
 * of a file, or on a pipe.) */
static bool direct_read_ended(const struct uring_op *op)
{
    uint64_t at = op->offset + op->done;
    int fl;

    if (op->kind != OP_READ && op->kind != OP_READV)
        return false;
    fl = fcntl(op->fd, F_GETFL);
    return fl >= 0 && (fl & O_DIRECT) && at % direct_offset_align(op->fd) != 0;
}

/* Whether fd is a socket (an fstat, on a short transfer's first rest only:
 * a pipe's or a file's rest is no common case either). */
static bool is_socket(int fd)
{
    struct stat st;

    return fstat(fd, &st) == 0 && S_ISSOCK(st.st_mode);
}

/* A read or write came back short: continue it.  Returns true when the op
 * stays in flight: its rest resubmitted, or waiting for an SQE. */
static bool continue_short(pl_uring_t *u, uint32_t i, int32_t res)
{
    struct uring_op *op = uring_op(u, i);
    struct io_uring_sqe *sqe;

    if (op->kind == OP_OTHER || res <= 0)
        return false;
    op->done += (uint32_t)res;
    if (op->done >= op->len || op->state == OP_ABANDONED || op->no_continue)
        return false;   /* (a closed fd's number may name another file by now) */
    if (direct_read_ended(op))
        return false;
    if (op->done == (uint32_t)res && op->kind != OP_SEND)    /* its first rest */
        op->stream = is_socket(op->fd);
    if (op->kind == OP_READV || op->kind == OP_WRITEV)
        iov_advance(op, (uint32_t)res);
    sqe = uring_get_sqe(u);
    if (sqe)
        uring_rest_queue(u, i, sqe);
    else
        uring_rest_defer(u, i);
    return true;
}

/* Count op's registered buffers as used by an op nobody waits for
 * (delta 1, when it is abandoned) or no longer (-1, when it ends). */
void uring_op_buffers_cancelled(pl_uring_t *u, const struct uring_op *op, int delta)
{
    if (op->kind == OP_READV || op->kind == OP_WRITEV) {
        for (uint32_t p = 0; p < op->iov_count; p++)
            if (op->iov_buf[p] != NO_BUF)
                u->bufs[op->iov_buf[p]].cancelled += (uint32_t)delta;
    } else if (op->buf_index >= 0) {
        u->bufs[op->buf_index].cancelled += (uint32_t)delta;
    }
}

/* The op's buffers are no longer in the kernel's hands. */
static void op_drop_buffer(pl_uring_t *u, struct uring_op *op)
{
    if (op->state == OP_ABANDONED)
        uring_op_buffers_cancelled(u, op, -1);
    if (op->kind == OP_READV || op->kind == OP_WRITEV) {
        for (uint32_t p = 0; p < op->iov_count; p++)
            if (op->iov_buf[p] != NO_BUF)
                uring_buffer_unuse(u, op->iov_buf[p]);
    } else if (op->buf_index >= 0) {
        uring_buffer_unuse(u, op->buf_index);
    }
}

/* Nobody will take the op's result: close the fd it holds for its task
 * (a close op's fd went with the close: FD_CLOSE needs nothing here). */
void uring_op_drop_fd(struct uring_op *op, int32_t res)
{
    if (op->fd_owner == FD_RESULT && res >= 0)
        close(res);
    else if (op->fd_owner == FD_OP && op->fd >= 0)
        close(op->fd);
    op->fd_owner = FD_NONE;
}

void uring_op_complete(pl_uring_t *u, uint32_t i, int32_t res)
{
    if (!continue_short(u, i, res))
        uring_op_finish(u, i, res);
}

/* Op i is done with the kernel; res: its last result. */
void uring_op_finish(pl_uring_t *u, uint32_t i, int32_t res)
{
    struct uring_op *op = uring_op(u, i);

    u->in_flight--;
    op_drop_buffer(u, op);
    if (op->fd_owner == FD_DUP) {   /* the kernel is done with the op's own fd */
        close(op->fd);
        op->fd = -1;
        op->fd_owner = FD_NONE;
    }
    if (op->state == OP_ABANDONED) {
        uring_op_drop_fd(op, res);
        uring_op_free(u, i);
        return;
    }
    /* reads and writes report bytes; an error after progress keeps the
     * count.  So does a transfer cut short because its fd was closed: a
     * count alone would read as the end of the file, or for a write as a
     * full disk (ENOSPC), and for a send as all of it sent. */
    if (op->kind == OP_OTHER || res < 0)
        op->res = res;
    else if (res > 0 && op->fd_closed && op->done < op->len)
        op->res = -ECANCELED;
    else
        op->res = (int32_t)op->done;
    op->state = OP_DONE;
    if (op->queue != NONE)
        uring_queue_done(u, op->queue, i);
    else if (u->rt && i != u->inline_op)
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
        if (ud != CANCEL_TAG && i < u->nops && uring_op(u, i)->gen == (uint32_t)(ud >> 32) &&
            uring_op(u, i)->state != OP_FREE)
            uring_op_complete(u, i, cqe->res);
        if (n >= budget)
            break;
    }
    io_uring_cq_advance(&u->ring, (unsigned)n);
    u->stats.completions += n;
    return n;
}

/* fd is being closed: ops in flight on it are not continued after a short
 * transfer (the rest would go to whatever file or socket the number is
 * given to next); they fail with ECANCELED after the bytes they did.  One
 * whose rest still waits for an SQE ends so now.  (A close that got its
 * SQE finds none waiting: due rests get SQEs first.) */
void uring_fd_closing(pl_uring_t *u, int fd)
{
    for (uint32_t i = 0; i < u->nops; i++) {
        struct uring_op *op = uring_op(u, i);
        if (op->fd == fd && (op->state == OP_IN_FLIGHT || op->state == OP_ABANDONED)) {
            op->no_continue = true;
            op->fd_closed = true;
            if (op->rest_due)
                uring_rest_end(u, i, -ECANCELED);
        }
    }
}

/* Whether an op in flight for a task works on fd. */
bool uring_fd_busy(pl_uring_t *u, int fd)
{
    for (uint32_t i = 0; i < u->nops; i++) {
        const struct uring_op *op = uring_op(u, i);
        if (op->fd == fd && op->state == OP_IN_FLIGHT)
            return true;
    }
    return false;
}

int uring_reap(pl_uring_t *u)
{
    return reap(u, INT32_MAX);
}

/* Only reap: what tasks queued goes out with the tick's flush or sleep,
 * so each tick costs one io_uring_enter. */
static int uring_poll(pl_reactor_t *self, pl_runtime_t *rt, int budget)
{
    pl_uring_t *u = (pl_uring_t *)self;

    u->rt = rt;
    u->inline_streak = 0;
    /* Completions past a full CQ wait in the kernel's overflow list until
     * an io_uring_enter asks for completions; this reactor's own sleep
     * does, but a runtime with another reactor pending watches the ring's
     * fd instead, which the overflow keeps readable: the tick spun, and
     * those completions waited for the next submit. */
    if (io_uring_cq_ready(&u->ring) == 0 && io_uring_cq_has_overflow(&u->ring))
        (void)io_uring_get_events(&u->ring);
    return reap(u, budget);
}

/* The tick's flush.  When an early submit in the last batch completed
 * other tasks' ops inline, those tasks run in the next batch and queue
 * their next ops: the few SQEs queued after that submit wait for them, so
 * that the batch goes out in one io_uring_enter instead of two (at 32 tasks
 * reading from the page cache, 16 ops per enter became 32).  They wait one
 * batch at most: the next flush submits, and so does a sleep, or a flush
 * with no task ready to run (nobody would add to them). */
static int uring_flush(pl_reactor_t *self)
{
    pl_uring_t *u = (pl_uring_t *)self;
    bool hold = u->hold_flush && u->rt && !pl_ready_empty(u->rt);

    u->hold_flush = false;
    return hold ? 0 : pl_uring_flush(u);
}

static int uring_status(pl_reactor_t *self)
{
    pl_uring_t *u = (pl_uring_t *)self;

    if (io_uring_cq_ready(&u->ring) > 0 || io_uring_cq_has_overflow(&u->ring))
        return PL_REACTOR_READY;        /* (overflow: uring_poll fetches it) */
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
    unsigned ready;
    int rc;

    if (u->wait_complete_ns > 0 && (timeout_ns < 0 || timeout_ns > u->wait_complete_ns))
        timeout_ns = u->wait_complete_ns;
    if (u->cancels_due > 0)
        uring_cancels_retry(u);
    if (u->rests_due > 0)
        uring_rests_retry(u);
    u->first_unsubmitted_cyc = 0;
    ready = io_uring_sq_ready(&u->ring);
    if (timeout_ns < 0) {
        rc = io_uring_submit_and_wait(&u->ring, 1);
    } else {
        ts.tv_sec = timeout_ns / 1000000000;
        ts.tv_nsec = timeout_ns % 1000000000;
        rc = io_uring_submit_and_wait_timeout(&u->ring, &cqe, 1, &ts, NULL);
    }
    /* submitted with the wait: what the kernel took (none when it refused
     * the submit: counted each time, a run of refused sleeps counted them
     * dozens of times); with SQPOLL, what went to its thread */
    u->stats.sqes += u->opts.sqpoll ? ready : ready - io_uring_sq_ready(&u->ring);
    u->stats.enters++;
    return rc < 0 ? rc : 0;
}

int pl_uring_op_take(pl_uring_t *u, int i, pl_uring_result_t *out)
{
    struct uring_op *op;

    if (i < 0 || (uint32_t)i >= u->nops || uring_op(u, i)->state == OP_FREE)
        return -ESRCH;
    op = uring_op(u, i);
    if (op->state != OP_DONE)
        return 0;
    uring_op_take_done(u, (uint32_t)i, out);
    return 1;
}

uint32_t pl_uring_op_gen(pl_uring_t *u, int i)
{
    if (i < 0 || (uint32_t)i >= u->nops)
        return 0;
    return uring_op(u, i)->gen;
}

int pl_uring_op_settled(pl_uring_t *u, int i, uint32_t gen)
{
    const struct uring_op *op;

    if (i < 0 || (uint32_t)i >= u->nops)
        return 1;
    op = uring_op(u, i);
    return op->gen != gen || op->state == OP_FREE || op->state == OP_DONE;
}

uint32_t pl_uring_abandoned_settled(const pl_uring_t *u)
{
    return u->abandoned_settled;
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

