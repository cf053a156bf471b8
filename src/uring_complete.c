/*
 * uring_complete.c - how io_uring operations end: the completion queue
 * reaped, short transfers continued from where they stopped (or ended at
 * end of file), buffers and descriptors let go, and the task woken.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "uring_internal.h"

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

int uring_reap(pl_uring_t *u, int budget)
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
    for (uint32_t i = uring_op_scan(u, 0); i < u->nops; i = uring_op_scan(u, i + 1)) {
        struct uring_op *op = uring_op(u, i);
        if (op->fd == fd && (op->state == OP_IN_FLIGHT || op->state == OP_ABANDONED)) {
            op->no_continue = true;
            op->fd_closed = true;
            if (op->rest_due)
                uring_rest_end(u, i, -ECANCELED);
        }
    }
}

/* Whether an op in flight works on fd; with live_in, only one whose task
 * is live there (not a socket's stopped receive or send, whose task was
 * killed: the socket keeps it, and drops it when its close goes ahead). */
bool uring_fd_busy(pl_uring_t *u, int fd, const pl_runtime_t *live_in)
{
    for (uint32_t i = uring_op_scan(u, 0); i < u->nops; i = uring_op_scan(u, i + 1)) {
        const struct uring_op *op = uring_op(u, i);
        if (op->fd == fd && op->state == OP_IN_FLIGHT &&
            (!live_in || pl_task_is_live(live_in, op->task_slot, op->task_gen)))
            return true;
    }
    return false;
}
