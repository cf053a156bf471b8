/*
 * uring_cancel.c - stopping io_uring ops: cancels in the kernel, SQEs
 * dropped before the kernel took them, ops a killed task gives up
 * (abandoned: reclaimed by their completion) or hands to the next task of
 * its socket (adopted), and the reactor's shutdown, which cancels every
 * op and waits for the kernel to be done with them.
 */
#include <errno.h>
#include <unistd.h>

#include "uring_internal.h"

/* Ask the kernel to cancel op i (its completion, -ECANCELED or the result
 * it had reached, reclaims it).  With no free SQE even after an early
 * submit (the kernel refused it), the cancel is due: the next flush or
 * sleep sends it.  Given up, the op would run on until its fd had data (a
 * killed task's read of a pipe or socket then ate the next bytes, which no
 * later reader got) or closed. */
static void op_cancel(pl_uring_t *u, uint32_t i)
{
    struct uring_op *op = uring_op(u, i);
    struct io_uring_sqe *sqe = uring_get_sqe(u);

    if (!sqe) {
        if (!op->cancel_due)
            u->cancels_due++;
        op->cancel_due = true;
        uring_due_wait(u);
        return;
    }
    io_uring_prep_cancel64(sqe, uring_op_user_data(u, i), 0);
    io_uring_sqe_set_data64(sqe, CANCEL_TAG);
    op->cancel_due = false;
}

/* Cancel each op in the kernel on fd by its own user_data, but for the
 * close of fd itself (a close's, when the ring holds many ops: see
 * pl_uring_close_socket); returns how many it cancelled. */
uint32_t uring_cancel_each_on_fd(pl_uring_t *u, int fd)
{
    uint32_t n = 0;

    for (uint32_t i = uring_op_scan(u, 0); i < u->nops; i = uring_op_scan(u, i + 1)) {
        const struct uring_op *op = uring_op(u, i);
        if (op->fd == fd && op->state == OP_IN_FLIGHT && op->fd_owner != FD_CLOSE && !op->rest_due &&
            !op->cancel_due) {
            op_cancel(u, i);
            n++;
        }
    }
    return n;
}

/* Send the cancels that found no free SQE (op_cancel), for the ops still
 * in the kernel; called before SQEs go out.  A rare path: the scan of
 * every slot costs nothing while no cancel is due. */
void uring_cancels_retry(pl_uring_t *u)
{
    uint32_t due = 0;

    for (uint32_t i = uring_op_scan(u, 0); i < u->nops; i = uring_op_scan(u, i + 1)) {
        struct uring_op *op = uring_op(u, i);

        if (!op->cancel_due)
            continue;
        if (op->state != OP_IN_FLIGHT && op->state != OP_ABANDONED) {
            op->cancel_due = false;     /* ended meanwhile */
            continue;
        }
        if (due == 0)           /* (after one found no SQE, the rest wait too) */
            op_cancel(u, i);
        due += op->cancel_due;
    }
    u->cancels_due = due;
    uring_due_wait(u);
}

/* SQEs the kernel has not taken yet become no-ops, and their ops finish as
 * cancelled: a teardown comes whenever the garbage collector says, and an
 * fd number they name (a read's) may belong to another file by then.  Not
 * a close's: nothing but the close frees that number, so it is closed
 * (close_dropped), not left open for good.  (Without SQPOLL the kernel
 * takes SQEs only inside our io_uring_enter, so all from khead on are
 * untaken; with it, only those not yet flushed to the kernel's thread.) */
static unsigned untaken_from(pl_uring_t *u)
{
    return u->opts.sqpoll ? u->ring.sq.sqe_head : *u->ring.sq.khead;
}

/* A close whose SQE is dropped is done here instead: its task asked for
 * it and let go of the fd, so nothing else will ever close it.  Returns
 * the close's result. */
static int32_t close_dropped(struct uring_op *op)
{
    op->fd_owner = FD_NONE;
    return close(op->fd) < 0 ? -errno : 0;
}

/* The untaken SQEs of op `only` (of every op: NONE) become no-ops, and
 * their ops finish as cancelled (a close: as done, see close_dropped). */
static void drop_untaken(pl_uring_t *u, uint32_t only)
{
    struct io_uring_sq *sq = &u->ring.sq;

    for (unsigned k = untaken_from(u); k != sq->sqe_tail; k++) {
        struct io_uring_sqe *sqe = &sq->sqes[k & sq->ring_mask];
        uint64_t ud = sqe->user_data;
        uint32_t i = (uint32_t)ud;
        bool live = ud != CANCEL_TAG && i < u->nops && uring_op(u, i)->gen == (uint32_t)(ud >> 32) &&
                    uring_op(u, i)->state != OP_FREE;

        if (only != NONE && (!live || i != only))
            continue;
        uring_sqe_void(sqe);
        if (live) {
            struct uring_op *op = uring_op(u, i);
            uring_op_complete(u, i, op->fd_owner == FD_CLOSE ? close_dropped(op) : -ECANCELED);
        }
    }
}

/* Op i's state, read anew at each call: drop_untaken changes it under
 * pl_uring_op_cancel (a plain read there looks constant to cppcheck). */
static uint8_t op_state(pl_uring_t *u, uint32_t i)
{
    return uring_op(u, i)->state;
}

static void op_abandon(pl_uring_t *u, uint32_t i, bool scan);

/* Cancel every op the kernel has and wait for their completions, at most
 * timeout seconds: closing the ring alone would not do, as the kernel
 * tears a ring down asynchronously and could still write into buffers,
 * scratch memory or op slots after they were freed.  Nobody is woken: the
 * runtime may be gone already (a reactor and its runtime are often
 * collected together).  Returns the ops the kernel still has (0: none). */
int pl_uring_shutdown(pl_uring_t *u, double timeout)
{
    int64_t deadline = pl_clock_ns() + (int64_t)(timeout * 1e9);

    if (!u->ring_ready)
        return 0;
    u->rt = NULL;
    drop_untaken(u, NONE);  /* (the cancels of abandoned ops among them) */
    while (u->rests_head != NONE)   /* (first: a cancel's SQE would go to them) */
        uring_rest_end(u, u->rests_head, -ECANCELED);
    for (uint32_t i = uring_op_scan(u, 0); i < u->nops; i = uring_op_scan(u, i + 1)) {
        uint8_t state = uring_op(u, i)->state;
        if (state == OP_IN_FLIGHT || state == OP_DONE)  /* (done: its task never took it) */
            op_abandon(u, i, false);    /* (nothing untaken is left: no scan per op) */
        else if (state == OP_ABANDONED)
            op_cancel(u, i);
    }
    if (u->shut_down)       /* waited once already: pl_uring_free after a failed shutdown */
        deadline = 0;
    u->shut_down = true;
    for (;;) {
        struct __kernel_timespec ts;
        struct io_uring_cqe *cqe;
        int64_t left;

        uring_reap(u, INT32_MAX);
        left = deadline - pl_clock_ns();
        if (u->in_flight == 0 || left <= 0)
            break;
        if (u->cancels_due > 0)
            uring_cancels_retry(u);
        ts.tv_sec = left / 1000000000;
        ts.tv_nsec = left % 1000000000;
        /* (submits the cancels) */
        io_uring_submit_and_wait_timeout(&u->ring, &cqe, 1, &ts, NULL);
    }
    return (int)u->in_flight;
}

/* A socket receive whose task was killed gives the socket what it took, so
 * it is stopped, not given up: an op whose SQE the kernel has not taken
 * yet (batched for the next tick) is dropped and never runs; else it is
 * cancelled, and its completion (data or -ECANCELED) waits for a task of
 * the socket's to take it (pl_uring_op_adopt).  Nobody waits here: the
 * cancel goes out with the next flush, and the loop goes on meanwhile.
 * Until then the op wakes nobody (its task is gone, and a stale task id
 * wakes no other). */
int pl_uring_op_cancel(pl_uring_t *u, int i)
{
    if (i < 0 || (uint32_t)i >= u->nops || uring_op(u, i)->state == OP_FREE)
        return -ESRCH;
    if (uring_op(u, (uint32_t)i)->rest_due)     /* nothing in the kernel: stopped here */
        uring_rest_end(u, (uint32_t)i, -ECANCELED);
    if (op_state(u, (uint32_t)i) == OP_IN_FLIGHT)
        drop_untaken(u, (uint32_t)i);
    if (op_state(u, (uint32_t)i) != OP_IN_FLIGHT)
        return op_state(u, (uint32_t)i) == OP_DONE;
    /* a short result reaped before the cancel lands ends the op there:
     * resubmitted, the rest would go on after the cancel found nothing */
    uring_op(u, (uint32_t)i)->no_continue = true;
    op_cancel(u, (uint32_t)i);
    u->stats.cancels++;
    return 0;
}

/* Task (slot, gen) waits for the cancelled op: parked on it, which its
 * completion wakes. */
int pl_uring_op_adopt(pl_uring_t *u, int i, uint32_t slot, uint32_t gen)
{
    struct uring_op *op;

    if (i < 0 || (uint32_t)i >= u->nops)
        return -ESRCH;
    op = uring_op(u, i);
    if (op->state == OP_DONE)
        return 1;
    if (op->state != OP_IN_FLIGHT || op->queue != NONE)
        return -ESRCH;
    op->task_slot = slot;
    op->task_gen = gen;
    if (u->rt)
        pl_task_wait(u->rt, slot, PL_WAIT_IO, (double)i);
    return 0;
}

/* Nobody will take op i: a done one is freed; one in flight is marked
 * abandoned and cancelled, and its completion reclaims it.  scan: first
 * drop its SQE if the kernel has not taken it (then it is reclaimed here),
 * for by the next submit its fd number may be another file's (the op's
 * File collected meanwhile); the cancel queued behind it would come too
 * late for an op that completes inside the submit.  A close is neither
 * dropped nor cancelled: its fd number is its own until it runs, and done
 * at once here it would run ahead of other tasks' ops queued on the fd
 * before it, which would then act on whatever file the number is given to
 * next.  It is submitted at once instead, with what is queued before it:
 * left for the next tick, a run that ends with the kill would leave the fd
 * open until the runtime runs again or is collected. */
static void op_abandon(pl_uring_t *u, uint32_t i, bool scan)
{
    struct uring_op *op = uring_op(u, i);

    if (op->state == OP_DONE) {
        uring_op_drop_fd(op, op->res);
        uring_op_free(u, i);
        return;
    }
    op->state = OP_ABANDONED;
    uring_op_buffers_cancelled(u, op, 1);
    if (op->fd_owner == FD_CLOSE) {
        if (scan)           /* out now, behind those ops: no tick may follow (a run's end) */
            pl_uring_flush(u);
        return;
    }
    u->stats.cancels++;
    if (op->rest_due) {     /* nothing in the kernel: reclaimed now */
        uring_rest_end(u, i, -ECANCELED);
        return;
    }
    if (scan)
        drop_untaken(u, i);
    if (op_state(u, i) == OP_ABANDONED)
        op_cancel(u, i);
}

int pl_uring_op_abandon(pl_uring_t *u, int i)
{
    if (i < 0 || (uint32_t)i >= u->nops || uring_op(u, i)->state == OP_FREE)
        return -ESRCH;
    op_abandon(u, (uint32_t)i, true);
    return 0;
}
