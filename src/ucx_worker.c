/*
 * ucx_worker.c - UCX workers (the reactor that progresses them is in
 * ucx_reactor.c).
 *
 * Lifetime: a worker owns its endpoints, listeners, streams, held
 * messages and op slots; closing it closes endpoints, listeners, streams
 * and messages, cancels its ops, wakes whoever waits on any of them, then
 * destroys the ucp worker.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <ucs/config/global_opts.h>

#include "ucx_internal.h"

#define UCX_CLOSE_WAIT_NS 2000000000LL   /* longest a worker's close waits for UCX */

/* File descriptors a worker must have room for.  A worker takes about 10
 * (its transports' sockets, shared memory, event fds), and UCX 1.13 runs
 * out of them inside ucp_worker_create now and then in a place where it
 * ends the process (ucs_fatal: "failed to set active message handler"):
 * so a worker is made only with room to spare, else EMFILE. */
#define UCX_WORKER_FDS 32

static uint64_t worker_serials;     /* the last worker's serial (ucx_ep's local_peer) */

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
    w->max_eps = ucx_max_endpoints(UCX_MAX_ENDPOINTS);
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
    w->serial = ++worker_serials;
    c->workers++;
    return w;
}

/* UCX 1.13 gives one worker's async context at most UCX_ASYNC_MAX_EVENTS
 * handlers (1024 by default; Pluvio asks for 16384: ucx_log.c).  A
 * connection by socket address takes one on each side, a listener one,
 * the transports a few.  Past the limit UCX fails the connection, and on
 * the accepting side leaves a freed endpoint on its listener's list: the
 * worker's destroy then crashed.  So a worker's endpoints stay within
 * what the limit holds beside its 64 listeners and its transports' own. */
#define UCX_ASYNC_RESERVE 96

int ucx_max_endpoints(int n)
{
    long room = (long)ucs_global_opts.async_max_events - UCX_ASYNC_RESERVE;

    if (room < 1)
        room = 1;
    return n < room ? n : (int)room;
}

int pl_ucx_worker_max_endpoints(pl_ucx_worker_t *w, int n)
{
    if (n < 1 || n > UCX_MAX_ENDPOINTS)
        return -EINVAL;
    w->max_eps = ucx_max_endpoints(n);
    return w->max_eps;
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
        struct ucx_op *op = ucx_op_at(w, i);
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
        const struct ucx_op *op = ucx_op_at(w, i);
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
        const struct ucx_op *op = ucx_op_at(w, i);
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
        struct ucx_op *op = ucx_op_at(w, i);
        if (op->state == UOP_IN_FLIGHT)
            ucx_wake(w, op->task_slot, op->task_gen);
    }
}

/* Its tasks were told the worker is closed: an op UCX ends later (in
 * pl_ucx_worker_reap's progress) wakes nobody and frees its slot. */
static void worker_abandon_ops(pl_ucx_worker_t *w)
{
    for (uint32_t i = 0; i < w->nops; i++) {
        struct ucx_op *op = ucx_op_at(w, i);
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
    free(w->addr);
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
    ucx_reactor_worker_closing(w);      /* (before the quiesce: its peers' new sends fail) */
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
