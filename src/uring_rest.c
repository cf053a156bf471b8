/*
 * uring_rest.c - the rests of short transfers that wait for an SQE: when a
 * read or write came back short and the kernel refused the early submit
 * that would free an SQE for its rest, the op stays in flight in a FIFO on
 * the reactor (linked through next_free, unused while the op is live),
 * whose rests go out first at the next flush or sleep, or end without the
 * kernel (kill, close, shutdown: uring_rest_end).
 */
#include "uring_internal.h"

/* The rest of op i's transfer into sqe. */
void uring_rest_queue(pl_uring_t *u, uint32_t i, struct io_uring_sqe *sqe)
{
    uring_prep_rw(u, i, sqe);
    io_uring_sqe_set_data64(sqe, uring_op_user_data(u, i));
    u->stats.resubmits++;
}

/* The sleep's bound while something waits for an SQE (see
 * URING_DUE_WAIT_NS): the runtime applies max_wait_ns while we are pending. */
void uring_due_wait(pl_uring_t *u)
{
    u->reactor.max_wait_ns = u->rests_due > 0 || u->cancels_due > 0 ? URING_DUE_WAIT_NS : 0;
}

/* The rest of op i's short transfer found no SQE: the kernel refused the
 * early submit (EBUSY, EAGAIN: its completion queue overflowing, or short
 * of memory), a passing state.  It waits for one at the end of the FIFO of
 * due rests, which the next flush or sleep sends, and which any SQE freed
 * meanwhile goes to first (uring_sqe_full).  The op stays in flight: its
 * task waits on it as on the kernel, and its kill, its fd's close or the
 * shutdown ends it (uring_rest_end). */
void uring_rest_defer(pl_uring_t *u, uint32_t i)
{
    struct uring_op *op = uring_op(u, i);

    op->rest_due = true;
    op->next_free = NONE;
    if (u->rests_tail == NONE)
        u->rests_head = i;
    else
        uring_op(u, u->rests_tail)->next_free = i;
    u->rests_tail = i;
    u->rests_due++;
    uring_due_wait(u);
}

/* Op i (due) out of the FIFO of due rests. */
static void rest_unlink(pl_uring_t *u, uint32_t i)
{
    struct uring_op *op = uring_op(u, i);
    uint32_t prev = NONE;

    for (uint32_t k = u->rests_head; k != i; k = uring_op(u, k)->next_free)
        prev = k;
    if (prev == NONE)
        u->rests_head = op->next_free;
    else
        uring_op(u, prev)->next_free = op->next_free;
    if (u->rests_tail == i)
        u->rests_tail = prev;
    op->rest_due = false;
    u->rests_due--;
    uring_due_wait(u);
}

/* Due rests into the free SQEs, oldest first (no submit). */
void uring_rests_send(pl_uring_t *u)
{
    struct io_uring_sqe *sqe;

    while (u->rests_head != NONE && (sqe = io_uring_get_sqe(&u->ring))) {
        uint32_t i = u->rests_head;
        rest_unlink(u, i);
        uring_rest_queue(u, i, sqe);
    }
}

/* The flush's or the sleep's turn for the due rests: into the free SQEs,
 * and when those are too few, into those an early submit frees.  What the
 * kernel still refuses waits for the next turn. */
void uring_rests_retry(pl_uring_t *u)
{
    uring_rests_send(u);
    if (u->rests_due > 0 && uring_submit(u) > 0)
        uring_rests_send(u);
}

/* Op i, whose rest waits for an SQE (the kernel has nothing of it), ends
 * here with res (-ECANCELED: killed, stopped, its fd closed, the reactor
 * shut down) and the bytes it did: as the completion of a stopped op
 * would, and it releases its buffers now. */
void uring_rest_end(pl_uring_t *u, uint32_t i, int32_t res)
{
    rest_unlink(u, i);
    uring_op_finish(u, i, res);
}
