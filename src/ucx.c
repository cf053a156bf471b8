/*
 * ucx.c - UCX contexts, workers and op slots (the reactor that progresses
 * the workers is in ucx_reactor.c).
 *
 * Lifetime: a context owns nothing but the ucp context and outlives its
 * workers (closing it with live workers fails).  A worker owns its
 * endpoints, listeners, streams, held messages and op slots; closing it
 * closes endpoints, listeners, streams and messages, cancels its ops,
 * wakes whoever waits on any of them, then destroys the ucp worker.
 */
#include <errno.h>
#include <stdatomic.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "ucx_internal.h"

#define UCX_CLOSE_WAIT_NS 2000000000LL   /* longest a worker's close waits for UCX */
#define PL_UCX_KEEPALIVE_INTERVAL "5s"    /* UCX's own keepalive, when Pluvio turns it on */


int pl_ucx_errno(ucs_status_t status)
{
    switch (status) {
    case UCS_OK: return 0;
    case UCS_ERR_NO_MEMORY: return -ENOMEM;
    case UCS_ERR_INVALID_PARAM: return -EINVAL;
    case UCS_ERR_UNREACHABLE: return -EHOSTUNREACH;
    case UCS_ERR_INVALID_ADDR: return -EADDRNOTAVAIL;
    case UCS_ERR_NOT_IMPLEMENTED: return -ENOSYS;
    case UCS_ERR_MESSAGE_TRUNCATED: return -EMSGSIZE;
    case UCS_ERR_NO_PROGRESS: return -EAGAIN;
    case UCS_ERR_BUFFER_TOO_SMALL: return -ENOBUFS;
    case UCS_ERR_NO_ELEM: return -ENOENT;
    case UCS_ERR_BUSY: return -EBUSY;
    case UCS_ERR_CANCELED: return -ECANCELED;
    case UCS_ERR_TIMED_OUT: return -ETIMEDOUT;
    case UCS_ERR_CONNECTION_RESET: return -ECONNRESET;
    case UCS_ERR_REJECTED: return -ECONNREFUSED;
    case UCS_ERR_NOT_CONNECTED: return -ENOTCONN;
    case UCS_ERR_ALREADY_EXISTS: return -EEXIST;
    case UCS_ERR_OUT_OF_RANGE: return -ERANGE;
    case UCS_ERR_EXCEEDS_LIMIT: return -E2BIG;
    case UCS_ERR_UNSUPPORTED: return -EOPNOTSUPP;
    case UCS_ERR_ENDPOINT_TIMEOUT: return -ETIMEDOUT;
    case UCS_ERR_IO_ERROR: return -EIO;
    default: return -EIO;
    }
}

const char *pl_ucx_status_string(int err)
{
    return pl_strerror(err);
}

/* ---- context ------------------------------------------------------------- */

/* Whether the configuration asks for UCX's unified mode, whose worker
 * addresses leave out lengths the peer takes from its own transports (UCX
 * has no getter: its printed configuration says it, from the environment
 * and the configuration files alike). */
static bool config_unified(const ucp_config_t *config)
{
    char *text = NULL;
    size_t len = 0;
    bool unified = false;
    FILE *f = open_memstream(&text, &len);

    if (!f)
        return false;
    ucp_config_print(config, f, NULL, UCS_CONFIG_PRINT_CONFIG);
    if (fclose(f) == 0 && text)
        unified = strstr(text, "UNIFIED_MODE=y") != NULL;
    free(text);
    return unified;
}

/* UCX's tcp transport keeps a connection alive with TCP's own keepalive,
 * but sets it only on the sockets it connects itself: the side that
 * accepted a connection (a client of a listener, in UCX 1.13) never
 * notices a link that breaks while it waits for its peer (a rendezvous
 * send waiting for the receiver to pull), and waits for good.  With TCP's
 * keepalive off, UCX sends its own keepalive on every connection, both
 * ways, so a broken link ends in ETIMEDOUT on both sides (once TCP gives
 * up retransmitting it).  Left as UCX has it when the environment tunes
 * either keepalive.  (A worker with no tcp transport has UCX warn of an
 * "invalid configuration": pl_ucx_worker_new drops that line.) */
static bool keepalive_both_ways(ucp_config_t *config)
{
    static const char *const knobs[] = {
        "UCX_TCP_KEEPIDLE", "UCX_TCP_KEEPINTVL", "UCX_TCP_KEEPCNT", "UCX_KEEPALIVE_INTERVAL",
    };

    for (size_t i = 0; i < sizeof(knobs) / sizeof(knobs[0]); i++)
        if (getenv(knobs[i]))
            return false;
    if (ucp_config_modify(config, "KEEPIDLE", "inf") != UCS_OK)
        return false;
    (void)ucp_config_modify(config, "KEEPALIVE_INTERVAL", PL_UCX_KEEPALIVE_INTERVAL);  /* else UCX's 20 s */
    return true;
}

pl_ucx_context_t *pl_ucx_context_new(int wakeup, int *err)
{
    ucp_params_t params = {
        .field_mask = UCP_PARAM_FIELD_FEATURES,
        .features = UCP_FEATURE_AM | UCP_FEATURE_TAG | (wakeup ? UCP_FEATURE_WAKEUP : 0),
    };
    ucp_context_attr_t attr = { .field_mask = UCP_ATTR_FIELD_REQUEST_SIZE };
    pl_ucx_context_t *c = calloc(1, sizeof(*c));
    ucp_config_t *config;
    ucs_status_t st;

    if (!c) {
        *err = -ENOMEM;
        return NULL;
    }
    st = ucp_config_read(NULL, NULL, &config);
    if (st == UCS_OK) {
        c->unified = config_unified(config);
        c->keepalive = keepalive_both_ways(config);
        st = ucp_init(&params, config, &c->ucp);
        ucp_config_release(config);
    }
    if (st == UCS_OK)
        st = ucp_context_query(c->ucp, &attr);
    if (st != UCS_OK) {
        *err = pl_ucx_errno(st);
        if (c->ucp)
            ucp_cleanup(c->ucp);
        free(c);
        return NULL;
    }
    c->request_size = attr.request_size;
    c->wakeup = wakeup != 0;
    return c;
}

int pl_ucx_context_close(pl_ucx_context_t *c)
{
    if (c->workers > 0)
        return -EBUSY;
    ucp_cleanup(c->ucp);
    free(c);
    return 0;
}

void pl_ucx_context_release(pl_ucx_context_t *c)
{
    if (c->workers > 0)
        c->released = true;
    else
        pl_ucx_context_close(c);
}

/* ---- op slots ------------------------------------------------------------ */

static struct ucx_op *op_at(pl_ucx_worker_t *w, uint32_t index)
{
    char *chunk = w->op_chunks[index / UCX_OPS_PER_CHUNK];

    return (struct ucx_op *)(chunk + (index % UCX_OPS_PER_CHUNK) * w->op_stride +
                             w->ctx->request_size);
}

struct ucx_op *ucx_op_get(pl_ucx_worker_t *w, uint32_t index)
{
    if (index >= w->nops)
        return NULL;
    return op_at(w, index);
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
    op = op_at(w, w->free_op);
    w->free_op = op->next_free;
    op->state = UOP_IN_FLIGHT;
    op->passive = false;
    op->orphaned = false;
    op->nudge = 0;
    op->claimed = false;
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

/* ---- wait queues (ucx_waitq) --------------------------------------------- */

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
        w->abandoned_settled++;
        if (status == UCS_OK)   /* a receive waiting in UCX may take it (not from here) */
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
    if (op->state != UOP_DONE)
        return 0;
    out->status = op->status;
    out->length = (double)op->length;
    out->sender_tag = op->sender_tag;
    if (op->rescue && op->status == 0 && !op->claimed)  /* (taken before a poll nudged) */
        ucx_tag_nudge_for(w, op->sender_tag);
    ucx_op_free(w, op);
    return 1;
}

uint32_t pl_ucx_op_gen(pl_ucx_worker_t *w, int id)
{
    const struct ucx_op *op = id > 0 ? ucx_op_get(w, (uint32_t)id - 1) : NULL;

    return op ? op->gen : 0;
}

int pl_ucx_op_settled(pl_ucx_worker_t *w, int id, uint32_t gen)
{
    const struct ucx_op *op = id > 0 ? ucx_op_get(w, (uint32_t)id - 1) : NULL;

    return !op || op->gen != gen || op->state == UOP_FREE || op->state == UOP_DONE;
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
        /* a message it matched goes to a receive waiting in UCX, if any,
         * and so does one it was nudged to take (ucx_tags_nudge) */
        if (keep && op->passive && op->status == 0 && !op->claimed)
            op->claimed = ucx_tag_nudge_for(w, op->sender_tag);
        else if (op->passive && op->nudge == UCX_NUDGED && op->status == -ECANCELED)
            ucx_tag_nudge_for(w, op->sender_tag);
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

/* ---- worker -------------------------------------------------------------- */

/* File descriptors a worker must have room for.  A worker takes about 10
 * (its transports' sockets, shared memory, event fds), and UCX 1.13 runs
 * out of them inside ucp_worker_create now and then in a place where it
 * ends the process (ucs_fatal: "failed to set active message handler"):
 * so a worker is made only with room to spare, else EMFILE. */
#define UCX_WORKER_FDS 32

/* 0 when n (at most UCX_WORKER_FDS) more can be had, else why not
 * (-EMFILE).  The first is an eventfd, not an open of a path: a sandbox
 * may close /dev/null to us, and its EACCES was taken for EMFILE. */
int ucx_fd_headroom(int n)
{
    int fds[UCX_WORKER_FDS], k = 0, rc = 0;

    if (n > UCX_WORKER_FDS)
        n = UCX_WORKER_FDS;
    fds[0] = eventfd(0, EFD_CLOEXEC);
    if (fds[0] < 0)
        rc = -errno;
    else
        for (k = 1; k < n; k++)
            if ((fds[k] = fcntl(fds[0], F_DUPFD_CLOEXEC, 0)) < 0) {
                rc = -errno;
                break;
            }
    while (k-- > 0)
        close(fds[k]);
    return rc;
}

pl_ucx_worker_t *pl_ucx_worker_new(pl_ucx_context_t *c, int *err)
{
    ucp_worker_params_t params = {
        .field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE,
        .thread_mode = UCS_THREAD_MODE_SINGLE,
    };
    ucp_worker_attr_t attr = { .field_mask = UCP_WORKER_ATTR_FIELD_MAX_AM_HEADER };
    pl_ucx_worker_t *w = calloc(1, sizeof(*w));
    struct ucx_log_hold held;
    ucs_status_t st;

    if (!w) {
        *err = -ENOMEM;
        return NULL;
    }
    w->ctx = c;
    w->free_op = UCX_NONE;
    w->free_msg = UCX_NONE;
    w->op_stride = (c->request_size + sizeof(struct ucx_op) + 15) & ~(size_t)15;
    w->efd = -1;
    w->max_eps = UCX_MAX_ENDPOINTS;
    *err = ucx_fd_headroom(UCX_WORKER_FDS);
    if (*err < 0) {
        free(w);
        return NULL;
    }
    /* (what else UCX says is printed, also when the create fails: the
     * errno we return tells less) */
    ucx_log_hold(&held, c->keepalive ? "invalid configuration: KEEPIDLE=inf" : NULL);
    st = ucp_worker_create(c->ucp, &params, &w->ucp);
    ucx_log_release(&held, false);
    if (st == UCS_OK && c->wakeup)
        st = ucp_worker_get_efd(w->ucp, &w->efd);
    if (st == UCS_OK)
        st = ucp_worker_query(w->ucp, &attr);
    if (st == UCS_OK)
        st = ucx_am_handlers_init(w);
    if (st != UCS_OK) {
        *err = pl_ucx_errno(st);
        if (w->ucp)
            ucp_worker_destroy(w->ucp);
        free(w);
        return NULL;
    }
    w->max_am_header = attr.max_am_header;
    c->workers++;
    return w;
}

int pl_ucx_worker_max_endpoints(pl_ucx_worker_t *w, int n)
{
    if (n < 1 || n > UCX_MAX_ENDPOINTS)
        return -EINVAL;
    w->max_eps = n;
    return 0;
}

double pl_ucx_worker_max_am_header(pl_ucx_worker_t *w)
{
    return (double)w->max_am_header;
}

void pl_ucx_worker_stats(pl_ucx_worker_t *w, pl_ucx_stats_t *out)
{
    int live = 0, failed = 0;

    for (int i = 0; i < w->neps; i++) {
        live += w->eps[i].state == EP_OPEN;
        failed += w->eps[i].state == EP_FAILED;
    }
    *out = w->stats;
    out->ops_in_flight = w->in_flight;
    out->msgs_held = w->held;
    out->header_blocks = w->header_blocks;
    out->am_unclaimed = 0;
    for (unsigned id = 0; id < UCX_MAX_STREAMS; id++)
        if (w->streams[id] && !w->streams[id]->open)
            out->am_unclaimed += w->streams[id]->len;
    out->endpoints = live;
    out->failed_endpoints = failed;
}

/* Cancel what can be cancelled: tag receives, which wait for a peer that
 * may never send (UCX 1.13 cancels nothing else), and let UCX report it. */
static void worker_cancel_ops(pl_ucx_worker_t *w)
{
    for (uint32_t i = 0; i < w->nops; i++) {
        struct ucx_op *op = op_at(w, i);
        if (op->state == UOP_IN_FLIGHT)
            ucp_request_cancel(w->ucp, op);
    }
    while (w->in_flight > 0 && ucp_worker_progress(w->ucp) > 0)
        ;
}

/* Whether UCX still holds a request of ours that ucp_worker_destroy would
 * trip on: UCX 1.13 asserts when it destroys an endpoint with a rendezvous
 * pull or send outstanding.  Those on endpoints we could force-close are
 * done by now; what is left runs on an endpoint whose graceful close is in
 * flight (its entry is gone, and UCX refuses to close it twice) or on a
 * reply endpoint (UCX's).  A close in flight is not one: worker_settle_closes
 * gives it a moment of its own. */
static bool worker_holds_requests(pl_ucx_worker_t *w)
{
    for (uint32_t i = 0; i < w->nops; i++) {
        const struct ucx_op *op = op_at(w, i);
        if ((op->state == UOP_IN_FLIGHT || op->state == UOP_ABANDONED) && op->ep != UCX_OP_EP_CLOSE)
            return true;
    }
    return false;
}

/* One progress of the worker and of the others of rt (a peer in this
 * thread may be one; paused_too: also those paused by a full window). */
static unsigned worker_progress_all(pl_ucx_worker_t *w, pl_runtime_t *rt, bool paused_too)
{
    unsigned got = ucp_worker_progress(w->ucp);

    if (rt)                     /* (from a finalizer other workers' runtime may be gone) */
        got += ucx_reactor_progress_peers(w, rt, paused_too);
    return got;
}

/* Progress until UCX holds no such request (none can be cancelled: they
 * finish), at most UCX_CLOSE_WAIT_NS; false if some still are. */
static bool worker_settle(pl_ucx_worker_t *w, pl_runtime_t *rt)
{
    int64_t deadline = pl_clock_ns() + UCX_CLOSE_WAIT_NS;

    while (worker_holds_requests(w)) {
        if (pl_clock_ns() > deadline)
            return false;
        if (worker_progress_all(w, rt, false) == 0)
            usleep(50);         /* a remote peer's turn: do not spin the core */
    }
    return true;
}

/* Graceful endpoint closes still in flight are let finish, progressing this
 * worker and the others of rt (the peer may be one), for at most
 * UCX_CLOSE_SETTLE_NS.  ucp_worker_destroy fast-forwards a close whose
 * flush is still queued on a lane (a close right after the wire-up, a
 * sender's tcp buffer full) and queues its end (ucp_ep_close_flushed_callback),
 * then destroys the endpoint and asserts that the request there was
 * released by its owner (ucp_ep.c:382): one in an op's memory never is, and
 * UCX 1.13 aborted the process.  One its peer does not answer in time
 * keeps the ucp worker from destruction as an op UCX holds does (-EBUSY,
 * pl_ucx_worker_reap): a chaos run still hit the assertion, 1 run in 250,
 * when such closes were left to the destroy. */
#define UCX_CLOSE_SETTLE_NS 100000000LL

static bool worker_closes_in_flight(pl_ucx_worker_t *w)
{
    for (uint32_t i = 0; i < w->nops; i++) {
        const struct ucx_op *op = op_at(w, i);
        if ((op->state == UOP_IN_FLIGHT || op->state == UOP_ABANDONED) && op->ep == UCX_OP_EP_CLOSE)
            return true;
    }
    return false;
}

static void worker_settle_closes(pl_ucx_worker_t *w, pl_runtime_t *rt)
{
    int64_t deadline = pl_clock_ns() + UCX_CLOSE_SETTLE_NS;

    while (worker_closes_in_flight(w) && pl_clock_ns() < deadline)
        if (worker_progress_all(w, rt, true) == 0)
            usleep(50);
}

/* Let wire-ups under way finish before the worker goes.  UCX 1.13 aborts
 * the peer of a worker destroyed while a wire-up message to it was still
 * queued on the peer's side ("Assertion ... got REP message" in
 * ucp_request_send_state_ff, as the peer's tcp connection to it fails):
 * two workers connected by connect_addr with peer_errors and closed right
 * away did.  An endpoint of ours that connect_addr made with peer_errors
 * is flushed first (its flush ends once its wire-up has: the peer's REP
 * came), then, if a peer may have started one towards us (our address
 * was handed out, or we connected by address, even if that endpoint was
 * closed since: closed by force, it leaves the peer's answer on its way),
 * this worker and the others of rt are progressed until
 * UCX_QUIESCE_ROUNDS rounds in a row find nothing, all within
 * UCX_QUIESCE_NS.  (The UCX model's seed 59 with killed senders still
 * ends so now and then: spec/ucx_model.lua.) */
#define UCX_QUIESCE_ROUNDS 4
#define UCX_QUIESCE_NS 100000000LL

/* Endpoints of connect_socket in their wire-up (given up or not) are let
 * go on with it first, for at most UCX_CONNECT_WAIT_NS: forced closed in
 * the middle, UCX 1.13's async thread asserted (tcp_sockcm_ep.c:416, as
 * in pl_ucx_ep_abort) in 2 runs of 6 of 40 workers closed a few ticks
 * into a connect.  The async thread's part (the tcp connection made, the
 * client's data sent) takes well under that; what is left waits for the
 * server, which may be a worker of this thread whose accept cannot run
 * while the close blocks, and is forced. */
#define UCX_CONNECT_WAIT_NS 20000000LL

static bool worker_connecting(const pl_ucx_worker_t *w)
{
    for (int i = 0; i < w->neps; i++)
        if (w->eps[i].connecting && (w->eps[i].state == EP_OPEN || w->eps[i].state == EP_ABORTING))
            return true;
    return false;
}

static void worker_quiesce(pl_ucx_worker_t *w, pl_runtime_t *rt)
{
    int64_t deadline = pl_clock_ns() + UCX_CONNECT_WAIT_NS;
    ucp_request_param_t p = { .op_attr_mask = 0 };
    bool p2p = w->address_shared || w->addr_connected;     /* (else no wire-up can come from a peer) */
    int quiet = 0;

    while (worker_connecting(w) && pl_clock_ns() < deadline)
        if (worker_progress_all(w, rt, false) == 0)
            usleep(50);         /* (the server's turn, perhaps in another process) */
    deadline = pl_clock_ns() + UCX_QUIESCE_NS;

    for (int i = 0; i < w->neps; i++) {
        struct ucx_ep *e = &w->eps[i];
        ucs_status_ptr_t sp;
        if (e->state != EP_OPEN || !e->p2p_peer)
            continue;
        p2p = true;
        sp = ucp_ep_flush_nbx(e->ep, &p);
        if (!UCS_PTR_IS_PTR(sp))
            continue;
        while (ucp_request_check_status(sp) == UCS_INPROGRESS && pl_clock_ns() < deadline)
            worker_progress_all(w, rt, false);
        ucp_request_free(sp);   /* (UCX frees one still going as it ends) */
    }
    while (p2p && quiet < UCX_QUIESCE_ROUNDS && pl_clock_ns() < deadline)
        quiet = worker_progress_all(w, rt, false) ? 0 : quiet + 1;
}

/* A listener closed while a client's connection was on its way is kept
 * until the connection was answered (ucx_listeners_settle): the worker and
 * the others of rt (the client may be one) are progressed for that, at
 * most UCX_LISTENER_WAIT_NS.  One still kept then goes with the worker,
 * right before the ucp worker, whose destruction closes such connections
 * (tcp_sockcm.c:233) before anything of this thread can send on them. */
#define UCX_LISTENER_WAIT_NS 100000000LL

static void worker_settle_listeners(pl_ucx_worker_t *w, pl_runtime_t *rt)
{
    int64_t deadline = pl_clock_ns() + UCX_LISTENER_WAIT_NS;

    while (w->listeners_closing > 0 && pl_clock_ns() < deadline) {
        if (worker_progress_all(w, rt, false) == 0)
            usleep(50);
        ucx_listeners_settle(w, UCX_SETTLE_DUE);
    }
}

/* Wake the tasks of ops UCX still holds: they find the worker closed. */
static void worker_wake_ops(pl_ucx_worker_t *w)
{
    for (uint32_t i = 0; i < w->nops && w->in_flight > 0; i++) {
        struct ucx_op *op = op_at(w, i);
        if (op->state == UOP_IN_FLIGHT)
            ucx_wake(w, op->task_slot, op->task_gen);
    }
}

/* Its tasks were told the worker is closed: an op UCX ends later (in
 * pl_ucx_worker_reap's progress) wakes nobody and frees its slot. */
static void worker_abandon_ops(pl_ucx_worker_t *w)
{
    for (uint32_t i = 0; i < w->nops; i++) {
        struct ucx_op *op = op_at(w, i);
        if (op->state == UOP_IN_FLIGHT)
            op->state = UOP_ABANDONED;
        else if (op->state == UOP_DONE)
            ucx_op_free(w, op);
    }
}

static void worker_destroy(pl_ucx_worker_t *w)
{
    pl_ucx_context_t *ctx = w->ctx;

    ucx_tags_discard(w);        /* (UCX would warn about each) */
    ucx_listeners_settle(w, UCX_SETTLE_FORCE);
    ucp_worker_destroy(w->ucp);
    for (int k = 0; k < w->nchunks; k++)
        free(w->op_chunks[k]);
    free(w->msgs);
    free(w);
    if (--ctx->workers == 0 && ctx->released)
        pl_ucx_context_close(ctx);
}

/* Close everything the worker owns, in order: endpoints (forced: a worker
 * being closed will not progress a graceful flush), listeners, streams,
 * messages, ops still in flight, tagged messages never received, then the
 * ucp worker.  Every task waiting on it is woken in rt (the runtime
 * progressing it); rt is NULL from a finalizer, whose runtime may be gone,
 * and then nobody is woken.
 *
 * An op that can be neither forced nor cancelled (worker_holds_requests)
 * is waited for, progressing, for at most UCX_CLOSE_WAIT_NS: destroying
 * the worker under it would abort the process.  If it is still there then,
 * the ucp worker, its op memory (UCX's requests) and so its context are
 * kept, progressed only by pl_ucx_worker_reap, and -EBUSY says so: the
 * memory those ops use must stay out of reuse until that destroys it. */
int pl_ucx_worker_close(pl_ucx_worker_t *w, pl_runtime_t *rt)
{
    bool settled;

    w->rt = rt;
    worker_quiesce(w, rt);
    for (int i = 0; i < w->neps; i++) {
        struct ucx_ep *e = &w->eps[i];
        if (e->state != EP_FREE && e->owned) {
            ucp_request_param_t p = { .op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS,
                                      .flags = UCP_EP_CLOSE_FLAG_FORCE };
            ucs_status_ptr_t sp = ucp_ep_close_nbx(e->ep, &p);
            while (UCS_PTR_IS_PTR(sp) && ucp_request_check_status(sp) == UCS_INPROGRESS)
                ucp_worker_progress(w->ucp);
            if (UCS_PTR_IS_PTR(sp))
                ucp_request_free(sp);
        }
        if (e->closer_waits)    /* its close is over: the endpoint goes with the worker */
            ucx_wake(w, e->closer_slot, e->closer_gen);
        e->closer_waits = false;
        e->state = EP_FREE;
    }
    w->closers = 0;
    for (int i = 0; i < UCX_MAX_LISTENERS; i++)
        if (w->listeners[i].open)
            pl_ucx_listener_close(w, i);
    worker_settle_listeners(w, rt);
    w->closing = true;
    ucx_streams_free(w);
    ucx_msgs_free(w);           /* those taken and never received */
    ucx_header_blocks_free(w);
    worker_cancel_ops(w);
    settled = worker_settle(w, rt);
    if (settled) {
        worker_settle_closes(w, rt);
        settled = !worker_closes_in_flight(w);
    }
    worker_wake_ops(w);
    if (w->reactor)
        ucx_reactor_remove_worker(w);
    w->rt = NULL;
    if (!settled) {             /* kept, not progressed by the reactor: see above */
        worker_abandon_ops(w);
        return -EBUSY;
    }
    worker_destroy(w);
    return 0;
}

/* A worker whose close said -EBUSY: progress it (nobody else does) and, once
 * UCX holds none of its requests any more (the peer pulled or dropped the
 * data: it received the message, or its worker was closed), destroy it as
 * the close would have.  Else the ucp worker, its sockets, memory and the
 * registered buffers its ops use were kept for good.  0 when it is gone,
 * -EBUSY while UCX still holds some. */
int pl_ucx_worker_reap(pl_ucx_worker_t *w)
{
    while (ucp_worker_progress(w->ucp) > 0)
        ;
    if (worker_holds_requests(w) || worker_closes_in_flight(w))
        return -EBUSY;
    worker_destroy(w);
    return 0;
}
