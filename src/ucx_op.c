/*
 * ucx_op.c - a worker's op slots: the UCX requests of its operations
 * (user-allocated, from chunks that never move), how they end (inside UCX
 * callbacks: record and wake, nothing else) and how their tasks take or
 * abandon them.
 *
 * Lifetime: a slot is the worker's; an op holds it from ucx_op_new until
 * its task takes the result (pl_ucx_op_take) or, abandoned, until UCX
 * completes it (a tag receive's, with a message it matched, until the
 * sweep takes that).
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "ucx_internal.h"

/* ---- op slots ------------------------------------------------------------ */

struct ucx_op *ucx_op_get(pl_ucx_worker_t *w, uint32_t index)
{
    if (index >= w->nops)
        return NULL;
    return ucx_op_at(w, index);
}

static int ops_grow(pl_ucx_worker_t *w)
{
    char *chunk;

    if (w->nchunks == UCX_MAX_OP_CHUNKS)
        return -PL_EOPSFULL;
    chunk = calloc(UCX_OPS_PER_CHUNK, w->op_stride);
    if (!chunk)
        return -ENOMEM;
    w->op_chunks[w->nchunks++] = chunk;
    for (uint32_t k = UCX_OPS_PER_CHUNK; k-- > 0;) {
        uint32_t index = w->nops + k;
        struct ucx_op *op = (struct ucx_op *)(chunk + k * w->op_stride + w->ctx->request_size);
        op->index = index;
        op->w = w;
        op->state = UOP_FREE;
        op->next_free = w->free_op;
        w->free_op = index;
    }
    w->nops += UCX_OPS_PER_CHUNK;
    return 0;
}

int ucx_op_new(pl_ucx_worker_t *w, uint32_t slot, uint32_t gen, int ep, struct ucx_op **out)
{
    struct ucx_op *op;

    if (w->free_op == UCX_NONE) {
        int rc = ops_grow(w);

        if (rc < 0)
            return rc;
    }
    op = ucx_op_at(w, w->free_op);
    w->free_op = op->next_free;
    op->state = UOP_IN_FLIGHT;
    op->passive = false;
    op->orphaned = false;
    op->handover = 0;
    op->held = false;
    op->rescue = false;
    op->sends = 0;
    op->task_slot = slot;
    op->task_gen = gen;
    op->status = 0;
    op->length = 0;
    op->sender_tag = 0;
    op->ep = ep;
    *out = op;
    return 0;
}

void ucx_op_free(pl_ucx_worker_t *w, struct ucx_op *op)
{
    if (op->state == UOP_ABANDONED)
        w->abandoned_settled++;
    op->state = UOP_FREE;
    op->gen++;
    op->next_free = w->free_op;
    w->free_op = op->index;
}

/* Wake task (slot, gen): of the runtime that polled the worker last, or,
 * when that one has no such task, of the runtime it nests in or that nests
 * in it (pl_task_home).  Returns pl_task_wake's result, -ESRCH for none. */
int ucx_wake(pl_ucx_worker_t *w, uint32_t slot, uint32_t gen)
{
    pl_runtime_t *rt;
    int rc = w->rt ? pl_task_wake(w->rt, slot, gen) : -ESRCH;

    if (rc == -ESRCH && (rt = pl_task_home(w->rt, slot, gen)) != NULL)
        rc = pl_task_wake(rt, slot, gen);
    return rc;
}

/* ---- completion and results ---------------------------------------------- */

/* Called from UCX callbacks: record, wake, nothing else. */
void ucx_op_finish(struct ucx_op *op, ucs_status_t status)
{
    pl_ucx_worker_t *w = op->w;
    int ep = op->ep;
    struct ucx_ep *e = ep >= 0 ? ucx_ep_get(w, ep) : NULL;

    if (e && e->connecting) {   /* its wire-up is over, one way or another */
        e->connecting = false;
        if (e->state == EP_ABORTING)
            w->reap++;          /* given up meanwhile: closed by ucx_eps_reap */
    }

    w->in_flight--;
    if (op->passive)
        w->passive_in_flight--;
    if (ep == UCX_OP_PULL)
        w->pulls--;
    if (op->state == UOP_ABANDONED && op->rescue) {
        op->status = pl_ucx_errno(status);      /* for the sweep's pl_ucx_op_take */
        op->state = UOP_DONE;
        op->held = status == UCS_OK;    /* its message goes at the next poll */
        w->abandoned_settled++;
        /* a receive waiting in UCX may take it, and those held behind it
         * may go now, failed or not (ucx_tags_hand_over: not from here) */
        w->tags_rescued = true;
    } else if (op->state == UOP_ABANDONED) {
        ucx_op_free(w, op);
    } else {
        op->status = pl_ucx_errno(status);
        op->state = UOP_DONE;
        if (op != w->inline_op)
            ucx_wake(w, op->task_slot, op->task_gen);
    }
    if (w->closers > 0)     /* (an endpoint's close waits for its last op) */
        ucx_ep_op_ended(w, ep);
}

/* A send op went out: counted in the stats (a failed one is not). */
static void count_sent(pl_ucx_worker_t *w, const struct ucx_op *op)
{
    if (op->sends == UCX_SENDS_AM) {
        w->stats.am_sent++;
        w->stats.am_bytes_sent += (double)op->length;
    } else if (op->sends == UCX_SENDS_TAG) {
        w->stats.tag_sent++;
    }
}

static void send_done(void *request, ucs_status_t status, void *user_data)
{
    struct ucx_op *op = user_data;

    (void)request;
    if (status == UCS_OK)
        count_sent(op->w, op);
    ucx_op_finish(op, status);
}

/* Request parameters that make UCX use the op's memory and report to it. */
void ucx_op_param(ucp_request_param_t *p, struct ucx_op *op)
{
    memset(p, 0, sizeof(*p));
    p->op_attr_mask = UCP_OP_ATTR_FIELD_REQUEST | UCP_OP_ATTR_FIELD_CALLBACK |
                      UCP_OP_ATTR_FIELD_USER_DATA;
    p->request = op;
    p->user_data = op;
    p->cb.send = send_done;
}

/* The same for a receive (an AM pull, a tag_recv), on a slot whose UCX
 * request is cleared first.  UCX 1.13 fills only the receive part of a
 * request it is given, and when an endpoint fails or is forced closed
 * during a rendezvous pull (RTR sent, over tcp) it purges the pull's
 * request and asserts on the request's send part that it is not a RNDV
 * GET/PUT zcopy (ucp_ep.c:3318, in ucp_ep_req_purge).  A slot whose last op
 * was a rendezvous send still held ucp_rndv_progress_rma_put_zcopy there,
 * and UCX aborted the process.  Cleared, the request is as a new slot's
 * (calloc) was.  A tag_recv never reached it with 1.13's layout (its tag
 * fields overlay that pointer) but is cleared as well: that is a layout's
 * accident, not a promise.  Sends, flushes and closes need no clearing:
 * UCX sets the flags and every send field they read, as it must for the
 * requests of its own pool, which a release build reuses uncleared. */
void ucx_op_param_recv(ucp_request_param_t *p, struct ucx_op *op)
{
    size_t n = op->w->ctx->request_size;

    memset((char *)op - n, 0, n);
    ucx_op_param(p, op);
}

/* What a UCX call returned: done at once (0), in flight (op id + 1), or an
 * error; the op slot is freed unless in flight. */
int ucx_op_result(pl_ucx_worker_t *w, struct ucx_op *op, ucs_status_ptr_t sp)
{
    if (UCS_PTR_IS_PTR(sp)) {
        w->in_flight++;
        return (int)op->index + 1;
    }
    if (UCS_PTR_STATUS(sp) == UCS_OK)
        count_sent(w, op);
    ucx_op_free(w, op);
    return pl_ucx_errno(UCS_PTR_STATUS(sp));
}

int pl_ucx_op_take(pl_ucx_worker_t *w, int id, pl_ucx_result_t *out)
{
    struct ucx_op *op = id > 0 ? ucx_op_get(w, (uint32_t)id - 1) : NULL;

    if (!op || op->state == UOP_FREE || op->state == UOP_ABANDONED)
        return -ESRCH;
    if (op->state != UOP_DONE || op->held)
        return 0;
    out->status = op->status;
    out->length = (double)op->length;
    out->sender_tag = op->sender_tag;
    ucx_op_free(w, op);
    return 1;
}

uint32_t pl_ucx_op_gen(pl_ucx_worker_t *w, int id)
{
    const struct ucx_op *op = id > 0 ? ucx_op_get(w, (uint32_t)id - 1) : NULL;

    return op ? op->gen : 0;
}

/* A killed tag receive's message is held until a poll hands it over or
 * finds nobody waiting for it (ucx_tags_hand_over): not settled till then,
 * so the Lua side's sweep keeps its memory. */
int pl_ucx_op_settled(pl_ucx_worker_t *w, int id, uint32_t gen)
{
    const struct ucx_op *op = id > 0 ? ucx_op_get(w, (uint32_t)id - 1) : NULL;

    return !op || op->gen != gen || op->state == UOP_FREE || (op->state == UOP_DONE && !op->held);
}

uint32_t pl_ucx_abandoned_settled(const pl_ucx_worker_t *w)
{
    return w->abandoned_settled;
}

/* The task gave up (killed): cancel; the slot is freed by the callback.
 * A tag receive's is not when its caller keeps it: UCX cancels one only
 * while it matched nothing, and a message it did match (done already, or
 * a rendezvous one being fetched) is for the next tag_recv, so its result
 * waits, DONE, for pl_ucx_op_take (the Lua side's take_rescued). */
int pl_ucx_op_abandon(pl_ucx_worker_t *w, int id, int keep)
{
    struct ucx_op *op = id > 0 ? ucx_op_get(w, (uint32_t)id - 1) : NULL;
    int ep;

    if (!op || op->state == UOP_FREE || op->state == UOP_ABANDONED)
        return -ESRCH;
    if (op->state == UOP_DONE) {
        /* its message, if any, goes at the next poll, in the order the
         * receives were posted (ucx_tags_hand_over: several may be killed
         * together, in any order); held till then */
        if (keep && op->passive) {
            op->rescue = true;
            op->held = op->status == 0;
            w->tags_rescued = true;
        }
        if (!(keep && op->passive))
            ucx_op_free(w, op);
        return 0;
    }
    ep = op->ep;            /* (the cancel may finish the op, and free its slot) */
    op->state = UOP_ABANDONED;
    op->rescue = keep && op->passive;
    ucp_request_cancel(w->ucp, op);
    if (w->closers > 0)     /* a close waiting for it waits no more: see pl_ucx_ep_drained */
        ucx_ep_op_ended(w, ep);
    return 0;
}
