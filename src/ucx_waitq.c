/*
 * ucx_waitq.c - queues of tasks waiting on a stream (its readers) or a
 * listener (its acceptors), woken in order.
 *
 * Lifetime: a queue's ring is its owner's (the stream or listener) and
 * goes with it (ucx_waitq_free).
 */
#include <errno.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "ucx_internal.h"

/* A number unique in the process (runtimes may run in several threads),
 * never 0: the wait argument of one stream's readers or one listener's
 * acceptors. */
uint32_t ucx_serial(void)
{
    static _Atomic uint32_t serials;

    return (atomic_fetch_add(&serials, 1) % 0x7ffffffe) + 1;
}

void ucx_waitq_init(struct ucx_waitq *q, int kind)
{
    *q = (struct ucx_waitq){ .kind = kind, .serial = ucx_serial() };
}

/* Queue (slot, gen), once. */
int ucx_waitq_push(struct ucx_waitq *q, uint32_t slot, uint32_t gen)
{
    uint32_t at;

    for (uint32_t k = 0; k < q->len; k++) {
        const struct ucx_waiter *wt = &q->ring[(q->head + k) % q->cap];
        if (wt->slot == slot && wt->gen == gen)
            return 0;
    }
    if (q->len == q->cap &&
        pl_fifo_grow((void **)&q->ring, &q->cap, &q->head, q->len, sizeof(*q->ring), 8) < 0)
        return -ENOMEM;
    at = q->head + q->len++;
    q->ring[at >= q->cap ? at - q->cap : at] = (struct ucx_waiter){ slot, gen };   /* (no division) */
    return 0;
}

/* Wake the first task still parked on this queue's thing.  An entry whose
 * task is not (any more) parked here is dropped: a task woken otherwise,
 * or a plain coroutine's wait that yielded to its resumer instead of the
 * loop must not take the turn of one that is waiting.  A task of another
 * runtime than the one progressing the worker (an outer one, paused while
 * a nested one runs; one a block_on left, which may never run again) is
 * woken but takes no turn: the next one is woken too, else a message (a
 * connection) stayed held while a task that could run waited for it (for
 * good under a dropped runtime, with a rendezvous sender waiting behind
 * it).  A task woken for what was taken meanwhile parks again. */
void ucx_waitq_wake_one(pl_ucx_worker_t *w, struct ucx_waitq *q)
{
    pl_runtime_t *now = w->rt;
    double arg = (double)q->serial;

    while (q->len > 0) {
        struct ucx_waiter wt = q->ring[q->head];
        pl_runtime_t *rt = now;

        q->head = q->head + 1 == q->cap ? 0 : q->head + 1;
        q->len--;
        if (!(rt && pl_task_is_waiting(rt, wt.slot, wt.gen, q->kind, arg)))
            rt = pl_task_home(rt, wt.slot, wt.gen);     /* another runtime's task (see ucx_wake) */
        if (rt && pl_task_is_waiting(rt, wt.slot, wt.gen, q->kind, arg) &&
            pl_task_wake(rt, wt.slot, wt.gen) >= 0 && rt == now)
            return;
    }
}

void ucx_waitq_wake_all(pl_ucx_worker_t *w, struct ucx_waitq *q)
{
    while (q->len > 0) {
        struct ucx_waiter wt = q->ring[q->head];
        q->head = q->head + 1 == q->cap ? 0 : q->head + 1;
        q->len--;
        ucx_wake(w, wt.slot, wt.gen);
    }
}

/* (slot, gen) stops waiting (killed): its entries wake nobody, and when
 * there is something to take (more) its turn passes on. */
void ucx_waitq_leave(pl_ucx_worker_t *w, struct ucx_waitq *q, uint32_t slot, uint32_t gen, bool more)
{
    for (uint32_t k = 0; k < q->len; k++) {
        struct ucx_waiter *wt = &q->ring[(q->head + k) % q->cap];
        if (wt->slot == slot && wt->gen == gen)
            wt->slot = UCX_NONE;
    }
    if (more)
        ucx_waitq_wake_one(w, q);
}

void ucx_waitq_free(struct ucx_waitq *q)
{
    free(q->ring);
    q->ring = NULL;
    q->cap = q->head = q->len = 0;
}
