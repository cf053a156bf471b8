/*
 * uring_queue.c - I/O queues: one task keeps many reads and writes in
 * flight and takes their completions as they come, instead of parking on
 * each (a coroutine switch per operation costs more than the page-cache
 * read itself at high queue depths).
 *
 * Lifetime: a queue slot belongs to the task that made it, through its Lua
 * object; pl_uring_queue_free (called by close or when the task ends)
 * abandons the ops still in flight, which are then cancelled and reclaimed
 * by their completions like any abandoned op, and frees the finished ones
 * nobody took.  The done ring always has room for every op started on the
 * queue: it grows when an op starts, never when one completes, so that a
 * completion cannot be lost to a failed allocation.
 */
#include <errno.h>
#include <stdlib.h>

#include "uring_internal.h"

#define QUEUE_FIRST_CAP 64

static struct uring_queue *queue_get(pl_uring_t *u, int q)
{
    if (q < 0 || (uint32_t)q >= u->nqueues || !u->queues[q].live)
        return NULL;
    return &u->queues[q];
}

int pl_uring_queue_new(pl_uring_t *u, uint32_t slot, uint32_t gen)
{
    struct uring_queue *q;
    uint32_t i;

    if (u->free_queue == NONE) {
        uint32_t n = u->nqueues ? u->nqueues * 2 : 8;
        struct uring_queue *grown = realloc(u->queues, n * sizeof(*grown));
        if (!grown)
            return -ENOMEM;
        u->queues = grown;
        for (uint32_t k = n; k-- > u->nqueues;) {
            grown[k] = (struct uring_queue){ .next_free = u->free_queue };
            u->free_queue = k;
        }
        u->nqueues = n;
    }
    i = u->free_queue;
    q = &u->queues[i];
    u->free_queue = q->next_free;
    *q = (struct uring_queue){ .live = true, .slot = slot, .gen = gen, .next_free = NONE };
    return (int)i;
}

/* Room in the done ring for one more op than the queue has started. */
static int queue_reserve(struct uring_queue *q)
{
    if (q->in_flight + q->done_len < q->done_cap)
        return 0;
    return pl_fifo_grow((void **)&q->done, &q->done_cap, &q->done_head, q->done_len,
                        sizeof(*q->done), QUEUE_FIRST_CAP);
}

static int queue_start(pl_uring_t *u, int qi, uint8_t kind, int fd, void *addr,
                       uint32_t len, uint64_t offset, int buf_index)
{
    struct uring_queue *q = queue_get(u, qi);
    int rc;

    if (!q)
        return -EBADF;
    rc = queue_reserve(q);
    if (rc < 0)
        return rc;
    rc = uring_start_rw(u, q->slot, q->gen, kind, fd, addr, len, offset, buf_index,
                        (uint32_t)qi);
    if (rc >= 0)
        q->in_flight++;
    return rc;
}

int pl_uring_queue_read(pl_uring_t *u, int q, int fd, void *addr, uint32_t len,
                        uint64_t offset, int buf_index)
{
    return queue_start(u, q, OP_READ, fd, addr, len, offset, buf_index);
}

int pl_uring_queue_write(pl_uring_t *u, int q, int fd, const void *addr, uint32_t len,
                         uint64_t offset, int buf_index)
{
    return queue_start(u, q, OP_WRITE, fd, (void *)addr, len, offset, buf_index);
}

/* The oldest finished op: reap the ring first when none is known yet (the
 * kernel may have finished ops inside the last submit).  -EAGAIN: none has
 * finished; the task parks with URING_QUEUE_WAIT_ARG to be woken by one. */
int pl_uring_queue_take(pl_uring_t *u, int qi, pl_uring_result_t *out)
{
    struct uring_queue *q = queue_get(u, qi);
    uint32_t op;

    if (!q)
        return -EBADF;
    if (q->done_len == 0 && q->in_flight > 0 && io_uring_cq_ready(&u->ring) > 0)
        uring_reap(u, INT32_MAX);
    if (q->done_len == 0)
        return q->in_flight == 0 ? -ENOENT : -EAGAIN;
    op = q->done[q->done_head];
    q->done_head = q->done_head + 1 == q->done_cap ? 0 : q->done_head + 1;
    q->done_len--;
    if (uring_op(u, op)->state != OP_DONE)
        return -EIO;                    /* (only done ops enter the FIFO) */
    uring_op_take_done(u, op, out);
    return (int)op;
}

int pl_uring_queue_pending(pl_uring_t *u, int qi)
{
    const struct uring_queue *q = queue_get(u, qi);

    return q ? (int)(q->in_flight + q->done_len) : -EBADF;
}

/* Close the queue: ops in flight are cancelled (their buffers stay in use
 * until the kernel lets go), finished ones are dropped.  Returns how many
 * were in flight. */
int pl_uring_queue_free(pl_uring_t *u, int qi)
{
    struct uring_queue *q = queue_get(u, qi);
    int cancelled = 0;

    if (!q)
        return -EBADF;
    for (uint32_t k = 0; k < q->done_len; k++)
        pl_uring_op_abandon(u, (int)q->done[(q->done_head + k) % q->done_cap]);
    for (uint32_t i = 0; i < u->nops && q->in_flight > 0; i++) {
        struct uring_op *op = uring_op(u, i);
        if (op->queue == (uint32_t)qi && op->state == OP_IN_FLIGHT) {
            pl_uring_op_abandon(u, (int)i);
            q->in_flight--;
            cancelled++;
        }
    }
    free(q->done);
    *q = (struct uring_queue){ .next_free = u->free_queue };
    u->free_queue = (uint32_t)qi;
    return cancelled;
}

void uring_queues_free(pl_uring_t *u)
{
    for (uint32_t i = 0; i < u->nqueues; i++)
        free(u->queues[i].done);
    free(u->queues);
}
