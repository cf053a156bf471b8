/*
 * ucx_conn.c - connections of a UCX worker: endpoints (by worker address
 * or by socket address, with peer error handling), their flush and close.
 * Listeners are in ucx_listener.c.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "ucx_internal.h"

/* ---- endpoints ----------------------------------------------------------- */

/* A handle is the entry's index in the low 16 bits and its generation
 * above, 15 bits of it: a handle is a non-negative int (negative ones are
 * errors), so the generation wraps at EP_GEN_MASK. */
#define EP_GEN_MASK 0x7fff

struct ucx_ep *ucx_ep_get(pl_ucx_worker_t *w, int ep)
{
    int i = ep & 0xffff;

    if (ep < 0 || i >= w->neps || w->eps[i].state == EP_FREE ||
        w->eps[i].gen != (uint16_t)(ep >> 16))
        return NULL;
    return &w->eps[i];
}

static int ep_handle(pl_ucx_worker_t *w, int i)
{
    return ((int)w->eps[i].gen << 16) | i;
}

/* The entry of an endpoint UCX knows, or -1. */
static int ep_find(pl_ucx_worker_t *w, ucp_ep_h ep)
{
    for (int i = 0; i < w->neps; i++)
        if (w->eps[i].state != EP_FREE && w->eps[i].ep == ep)
            return i;
    return -1;
}

/* The handle of an endpoint's entry, or -1 when it has none. */
int ucx_ep_lookup(pl_ucx_worker_t *w, ucp_ep_h ep)
{
    int i = ep_find(w, ep);

    return i >= 0 ? ep_handle(w, i) : -1;
}

/* Whether the table has a free entry.  Checked before ucp_ep_create: an
 * endpoint made and then destroyed for want of an entry is no way out, as
 * ucp_ep_destroy of one still wiring up (accept, connect_socket) blocks
 * progressing the worker until the peer answers, for good when the peer
 * is a worker of this thread. */
static int ep_first_free(const pl_ucx_worker_t *w)
{
    for (int i = 0; i < w->max_eps; i++)
        if (w->eps[i].state == EP_FREE)
            return i;
    return -1;
}

static int ep_free_entry(pl_ucx_worker_t *w)
{
    int i = ep_first_free(w);

    /* dropped endpoints that failed in a progress call other than the
     * reactor's poll (a pull's, a close's) are not freed yet */
    if (i < 0 && w->reap > 0) {
        ucx_eps_reap(w);
        i = ep_first_free(w);
    }
    return i;
}

bool ucx_ep_room(pl_ucx_worker_t *w)
{
    return ep_free_entry(w) >= 0;
}

int pl_ucx_worker_ep_room(pl_ucx_worker_t *w)
{
    return ucx_ep_room(w);
}

/* The entry of ep, made if it has none.  An endpoint we just created has
 * none: an entry with its address is a reply endpoint's that UCX freed
 * since (the memory was reused), and is dropped rather than handed out. */
int ucx_ep_add(pl_ucx_worker_t *w, ucp_ep_h ep, bool owned, const char *peer)
{
    int i = ep_find(w, ep);

    if (i >= 0 && !owned)
        return ep_handle(w, i);
    if (i >= 0) {
        w->eps[i].state = EP_FREE;
        ucx_msgs_forget_ep(w, ep, -ENOTCONN);   /* their sender is gone too */
    }
    i = ep_free_entry(w);
    if (i < 0)
        return -EMFILE;
    if (i >= w->neps)
        w->neps = i + 1;
    w->eps[i].ep = ep;
    w->eps[i].gen = (uint16_t)((w->eps[i].gen + 1) & EP_GEN_MASK);
    w->eps[i].state = EP_OPEN;
    w->eps[i].owned = owned;
    w->eps[i].holds = 0;
    w->eps[i].error = 0;
    w->eps[i].dropped = false;
    w->eps[i].p2p_peer = false;
    w->eps[i].peer_closed = false;
    w->eps[i].local_peer = 0;
    w->eps[i].connecting = false;
    snprintf(w->eps[i].peer, UCX_PEER_LEN, "%s", peer);
    return ep_handle(w, i);
}

static void ep_collect(pl_ucx_worker_t *w, int ep);

/* Nothing more can go over it: it failed, or it leads to a worker of this
 * reactor that was closed since (peer_closed).  Once its object is
 * collected too, it is freed. */
static bool ep_dead(const struct ucx_ep *e)
{
    return e->state == EP_FAILED || (e->state == EP_OPEN && e->peer_closed);
}

/* A holder of a reply endpoint's entry lets go: the last one frees it.
 * An owned entry (a message came on an endpoint we accepted or connected)
 * stays; but once its own object was collected too (dropped) and it
 * failed, nothing refers to it any more: it is freed now (not in a UCX
 * callback: this is a finalizer's).  Entries closed or reused meanwhile
 * are left alone. */
void pl_ucx_ep_unhold(pl_ucx_worker_t *w, int ep)
{
    struct ucx_ep *e = ucx_ep_get(w, ep);

    if (!e || e->holds == 0 || --e->holds > 0)
        return;
    if (!e->owned)
        e->state = EP_FREE;
    else if (e->dropped && ep_dead(e))
        ep_collect(w, ep);
}

/* The peer failed (UCP_ERR_HANDLING_MODE_PEER): UCX fails the endpoint's
 * requests itself; we mark it and let waiting readers re-check. */
void ucx_ep_error(void *arg, ucp_ep_h ep, ucs_status_t status)
{
    pl_ucx_worker_t *w = arg;
    int i = ep_find(w, ep);

    if (i >= 0 && w->eps[i].state == EP_ABORTING) {
        w->eps[i].connecting = false;   /* its wire-up failed: close it now */
        w->reap++;
    } else if (i >= 0 && (w->eps[i].state == EP_OPEN || w->eps[i].state == EP_CLOSING)) {
        w->eps[i].state = EP_FAILED;
        w->eps[i].error = pl_ucx_errno(status);
        ucx_msgs_forget_ep(w, ep, w->eps[i].error);
        if (w->eps[i].closer_waits)     /* its close goes on: forcefully now */
            ucx_wake(w, w->eps[i].closer_slot, w->eps[i].closer_gen);
        if (w->eps[i].dropped)          /* nobody can close it: ucx_poll will */
            w->reap++;
        /* the tag receives it may leave without a peer: not from inside
         * this UCX callback, by the next ucx_poll (cancels complete them) */
        if (w->passive_in_flight > 0)
            w->tags_recheck = true;
    }
    ucx_streams_wake_all(w);
}

int pl_ucx_ep_status(pl_ucx_worker_t *w, int ep)
{
    struct ucx_ep *e = ucx_ep_get(w, ep);

    if (!e)
        return -EBADF;
    if (e->state == EP_FAILED)
        return e->error ? e->error : -ECONNRESET;
    if (e->state == EP_OPEN && e->peer_closed)
        return -ECONNRESET;
    return e->state == EP_OPEN ? 0 : -ENOTCONN;
}

int pl_ucx_ep_peer_closed(pl_ucx_worker_t *w, int ep)
{
    const struct ucx_ep *e = ucx_ep_get(w, ep);

    return e && e->state == EP_OPEN && e->peer_closed;
}

const char *pl_ucx_ep_peer(pl_ucx_worker_t *w, int ep)
{
    struct ucx_ep *e = ucx_ep_get(w, ep);

    return e ? e->peer : "";
}

/* Whether the peer of an entry may still send to the worker: an endpoint
 * of ours that is open, or closing (its flush under way: it is still open
 * in UCX, and answers to what was sent on it may still come).  Not a
 * reply endpoint: its peer is counted already (its own endpoint to us). */
static bool ep_is_peer(const struct ucx_ep *e)
{
    return e->owned && !e->peer_closed && (e->state == EP_OPEN || e->state == EP_CLOSING);
}

bool ucx_worker_has_peers(pl_ucx_worker_t *w)
{
    if (w->address_shared)
        return true;
    for (int i = 0; i < w->neps; i++)
        if (ep_is_peer(&w->eps[i]))
            return true;
    for (int i = 0; i < UCX_MAX_LISTENERS; i++)
        if (w->listeners[i].open)
            return true;
    return false;
}

/* An entry stopped being a peer by a local close or abort: once no peer
 * is left, the streams' readers parked meanwhile are woken to hear it
 * (-ENOTCONN from pl_ucx_stream_next), else they waited for good, and so
 * are the tag receives nothing matched (ucx_tags_orphan).  (A peer's
 * failure and a listener's close wake them themselves.) */
static void ep_peer_gone(pl_ucx_worker_t *w)
{
    if (!ucx_worker_has_peers(w)) {
        ucx_streams_wake_all(w);
        ucx_tags_orphan(w);
    }
}

/* Descriptors a connect must have room for (its lanes' sockets, the shared
 * memory it attaches; a listener's in this process). */
#define UCX_CONNECT_FDS 8

int pl_ucx_connect_addr(pl_ucx_worker_t *w, const void *addr, int len, int peer_errors)
{
    ucp_ep_params_t p = {
        .field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLER |
                      UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE,
        .address = addr,
        .err_mode = peer_errors ? UCP_ERR_HANDLING_MODE_PEER : UCP_ERR_HANDLING_MODE_NONE,
        .err_handler = { .cb = ucx_ep_error, .arg = w },
    };
    struct ucx_log_hold held;
    ucp_ep_h ep;
    ucs_status_t st;
    int h;

    int rc = len > 0 ? ucx_address_check(w, addr, (size_t)len) : -EINVAL;

    if (rc < 0)
        return rc;
    if (!ucx_ep_room(w))
        return -EMFILE;
    /* UCX 1.13 out of descriptors in the middle of ucp_ep_create ends the
     * process ("failed to set active message handler"), or with none at
     * all fails it as EIO or ETIMEDOUT: refused first, as EMFILE */
    rc = ucx_fd_headroom(UCX_CONNECT_FDS);
    if (rc < 0)
        return rc;
    /* UCX makes the endpoints two workers open to each other by address
     * one connection; one whose peer_errors differs from the peer's is
     * refused (EOPNOTSUPP, said by the Lua side), with an ERROR line UCX
     * would print besides */
    ucx_log_hold(&held, NULL);
    st = ucp_ep_create(w->ucp, &p, &ep);
    ucx_log_release(&held, st != UCS_OK);
    if (st != UCS_OK)
        return pl_ucx_errno(st);
    h = ucx_ep_add(w, ep, true, "worker address");
    if (h < 0) {
        ucp_ep_destroy(ep);
    } else {
        struct ucx_ep *e = ucx_ep_get(w, h);
        e->p2p_peer = peer_errors != 0;
        e->local_peer = peer_errors ? 0 : ucx_reactor_local_worker(w, addr, (size_t)len);
        w->addr_connected = true;
    }
    return h;
}

/* Resolve host:port (numeric or a name) into its first IPv4 address;
 * -EAFNOSUPPORT when it has IPv6 ones only.  UCX 1.13's tcp connection
 * manager overruns a heap buffer on an IPv6 connection (ucs_sockaddr_str
 * reads 16 bytes past a 160-byte block as the server accepts: an
 * AddressSanitizer report, and glibc's malloc aborting the process in a
 * plain build), so IPv6 is refused here rather than left to it. */
int ucx_resolve(const char *host, int port, struct sockaddr_storage *ss, socklen_t *len)
{
    struct addrinfo hints = { .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
                              .ai_flags = AI_NUMERICSERV };
    struct addrinfo *res, *ai;
    char service[16];
    int rc;

    snprintf(service, sizeof(service), "%d", port);
    errno = 0;
    rc = getaddrinfo(host, service, &hints, &res);
    if (rc != 0)            /* as pl_net_resolve: the Lua side says "cannot resolve host" for -ENXIO */
        return pl_net_gai_errno(rc, errno);
    for (ai = res; ai && ai->ai_family != AF_INET; ai = ai->ai_next)
        ;
    if (ai) {
        memcpy(ss, ai->ai_addr, ai->ai_addrlen);
        *len = ai->ai_addrlen;
    }
    freeaddrinfo(res);
    return ai ? 0 : -EAFNOSUPPORT;
}

void ucx_sockaddr_text(const struct sockaddr_storage *ss, char *out, size_t cap)
{
    char ip[INET6_ADDRSTRLEN] = "?";

    if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *a = (const struct sockaddr_in *)ss;
        inet_ntop(AF_INET, &a->sin_addr, ip, sizeof(ip));
        snprintf(out, cap, "%s:%d", ip, ntohs(a->sin_port));
    } else if (ss->ss_family == AF_INET6) {
        const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)ss;
        inet_ntop(AF_INET6, &a->sin6_addr, ip, sizeof(ip));
        snprintf(out, cap, "[%s]:%d", ip, ntohs(a->sin6_port));
    } else {
        snprintf(out, cap, "?");
    }
}

/* Create the endpoint, then flush it so the caller waits for wire-up: the
 * first large message then goes rendezvous, as it should. */
int pl_ucx_connect_socket(pl_ucx_worker_t *w, const char *host, int port, int *ep_out,
                          uint32_t slot, uint32_t gen)
{
    struct sockaddr_storage ss;
    socklen_t len;
    char peer[UCX_PEER_LEN];
    ucp_ep_params_t p = {
        .field_mask = UCP_EP_PARAM_FIELD_FLAGS | UCP_EP_PARAM_FIELD_SOCK_ADDR |
                      UCP_EP_PARAM_FIELD_ERR_HANDLER | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE,
        .flags = UCP_EP_PARAMS_FLAGS_CLIENT_SERVER,
        .err_mode = UCP_ERR_HANDLING_MODE_PEER,
        .err_handler = { .cb = ucx_ep_error, .arg = w },
    };
    ucp_ep_h ep;
    ucs_status_t st;
    int rc = ucx_resolve(host, port, &ss, &len);

    if (rc < 0)
        return rc;
    if (!ucx_ep_room(w))
        return -EMFILE;
    /* UCX 1.13 short of descriptors for the connection's sockets (its
     * own, and a listener's in this process) left the connect waiting for
     * good, or logged its accept's failure in a loop: refused first */
    rc = ucx_fd_headroom(UCX_CONNECT_FDS);
    if (rc < 0)
        return rc;
    p.sockaddr.addr = (struct sockaddr *)&ss;
    p.sockaddr.addrlen = len;
    st = ucp_ep_create(w->ucp, &p, &ep);
    if (st != UCS_OK)
        return pl_ucx_errno(st);
    ucx_sockaddr_text(&ss, peer, sizeof(peer));
    *ep_out = ucx_ep_add(w, ep, true, peer);
    if (*ep_out < 0) {
        ucp_ep_destroy(ep);
        return *ep_out;
    }
    ucx_ep_get(w, *ep_out)->connecting = true;
    return pl_ucx_ep_flush(w, *ep_out, slot, gen);
}

/* The start of every operation on an endpoint: it must be open; then an
 * op slot and its request parameters. */
/* Endpoint ep, if it is open for new operations; else why not. */
int ucx_ep_open(pl_ucx_worker_t *w, int ep, struct ucx_ep **e)
{
    *e = ucx_ep_get(w, ep);
    if (!*e)
        return -EBADF;
    if ((*e)->state != EP_OPEN || (*e)->peer_closed)
        return pl_ucx_ep_status(w, ep);
    return 0;
}

/* The worker with this serial (of w's reactor) is closing: w's connect_addr
 * endpoints without peer_errors to it refuse new operations from now on
 * (-ECONNRESET), as a failed endpoint does; UCX would take them and, over
 * shared memory, never end a rendezvous one.  ep:close() stays graceful. */
void ucx_eps_local_peer_closed(pl_ucx_worker_t *w, uint64_t serial)
{
    bool any = false;

    for (int i = 0; i < w->neps; i++) {
        struct ucx_ep *e = &w->eps[i];
        if (e->state != EP_FREE && e->local_peer == serial) {
            e->local_peer = 0;
            e->peer_closed = true;
            any = true;
            if (e->dropped && e->owned && e->holds == 0)
                ep_collect(w, ep_handle(w, i));     /* its object is gone: freed now */
        }
    }
    if (any)
        ep_peer_gone(w);
}

int ucx_ep_op_new(pl_ucx_worker_t *w, int ep, uint32_t slot, uint32_t gen, struct ucx_ep **e,
                  struct ucx_op **op, ucp_request_param_t *p)
{
    int rc = ucx_ep_open(w, ep, e);

    if (rc < 0)
        return rc;
    rc = ucx_op_new(w, slot, gen, ep, op);
    if (rc < 0)
        return rc;
    ucx_op_param(p, *op);
    return 0;
}

int pl_ucx_ep_flush(pl_ucx_worker_t *w, int ep, uint32_t slot, uint32_t gen)
{
    ucp_request_param_t p;
    struct ucx_ep *e;
    struct ucx_op *op;
    int rc = ucx_ep_op_new(w, ep, slot, gen, &e, &op, &p);

    if (rc < 0)
        return rc;
    return ucx_op_result(w, op, ucp_ep_flush_nbx(e->ep, &p));
}

/* A close waiting for e's ops waits no more (the entry is freed). */
static void ep_drop_closer(pl_ucx_worker_t *w, struct ucx_ep *e)
{
    if (e->closer_waits) {
        e->closer_waits = false;
        w->closers--;
    }
}

/* ucp_ep_close_nbx with p's flags; a forced close that UCX refuses (an
 * endpoint without peer error handling: connect_addr's default, EINVAL
 * before it starts) is made graceful. */
static ucs_status_ptr_t ep_close_nbx(ucp_ep_h ep, ucp_request_param_t *p)
{
    ucs_status_ptr_t sp = ucp_ep_close_nbx(ep, p);

    if ((p->flags & UCP_EP_CLOSE_FLAG_FORCE) && UCS_PTR_IS_ERR(sp) &&
        UCS_PTR_STATUS(sp) == UCS_ERR_INVALID_PARAM) {
        p->flags &= ~(uint32_t)UCP_EP_CLOSE_FLAG_FORCE;
        sp = ucp_ep_close_nbx(ep, p);
    }
    return sp;
}

/* Start closing an endpoint we own; the entry is free from now on (not if
 * there is no op slot for it: -ENOMEM or -PL_EOPSFULL, the entry unchanged). */
static int ep_close(pl_ucx_worker_t *w, struct ucx_ep *e, bool force, uint32_t slot, uint32_t gen)
{
    ucp_request_param_t p;
    struct ucx_op *op;
    bool was_peer = ep_is_peer(e);
    int rc = ucx_op_new(w, slot, gen, UCX_OP_EP_CLOSE, &op);

    if (rc < 0)
        return rc;
    ucx_op_param(&p, op);
    p.op_attr_mask |= UCP_OP_ATTR_FIELD_FLAGS;
    p.flags = force ? UCP_EP_CLOSE_FLAG_FORCE : 0;
    ep_drop_closer(w, e);
    e->state = EP_FREE;
    ucx_msgs_forget_ep(w, e->ep, -ENOTCONN);
    if (was_peer)
        ep_peer_gone(w);
    return ucx_op_result(w, op, ep_close_nbx(e->ep, &p));
}

/* Whether an operation of ours is still in UCX's hands on the endpoint
 * (or, ep UCX_OP_PULL, an AM pull of the worker): one a task (or a send
 * handle) waits for, or also one whose task gave up (abandoned).  Not a
 * hot path: endpoints close rarely. */
static bool ep_busy(pl_ucx_worker_t *w, int ep, bool abandoned_too)
{
    for (uint32_t i = 0; i < w->nops; i++) {
        const struct ucx_op *op = ucx_op_get(w, i);
        if (op->ep == ep && (op->state == UOP_IN_FLIGHT || (abandoned_too && op->state == UOP_ABANDONED)))
            return true;
    }
    return false;
}

/* The first step of a graceful close with operations in flight: flush,
 * the endpoint still open in UCX, and refuse new operations. */
static int ep_drain(pl_ucx_worker_t *w, struct ucx_ep *e, int ep, uint32_t slot, uint32_t gen)
{
    ucp_request_param_t p;
    struct ucx_op *op;
    int rc = ucx_op_new(w, slot, gen, ep, &op);

    if (rc < 0)
        return rc;              /* the endpoint stays as it was */
    e->state = EP_CLOSING;
    ucx_op_param(&p, op);
    return ucx_op_result(w, op, ucp_ep_flush_nbx(e->ep, &p));
}

/* Whether a graceful close may go on: none of the endpoint's ops that a
 * task still waits for is in UCX's hands any more (a rendezvous send waits
 * for its receiver to pull the data, which the flush does not wait for),
 * nor an AM pull of the worker that a task waits for, or it is not
 * closing any more (failed).  Not for an op whose task gave up: its
 * receiver may never pull it, and a pull may never end (a connect_addr
 * peer forced closed: docs/UCX.md).  UCX 1.13 asserted (ucp_ep.c:437,
 * proto_reqs not empty) when a graceful close destroyed an endpoint that
 * a pull of a message it brought was still reading from, and UCX does not
 * say which endpoint that is (the sender's, known only with need_reply):
 * a close with pulls still in flight after this is forced instead
 * (pl_ucx_ep_close), its own ops flushed by then. */
static bool ep_drained(pl_ucx_worker_t *w, const struct ucx_ep *e, int ep)
{
    return e->state != EP_CLOSING ||
           (!ep_busy(w, ep, false) && (w->pulls == 0 || !ep_busy(w, UCX_OP_PULL, false)));
}

/* 1, or 0 with task (slot, gen) recorded: the end of the last op
 * ep_drained waits for, or the endpoint's failure, wakes it. */
int pl_ucx_ep_drained(pl_ucx_worker_t *w, int ep, uint32_t slot, uint32_t gen)
{
    struct ucx_ep *e = ucx_ep_get(w, ep);

    if (!e || ep_drained(w, e, ep)) {
        if (e)
            ep_drop_closer(w, e);
        return 1;
    }
    if (!e->closer_waits) {
        e->closer_waits = true;
        w->closers++;
    }
    e->closer_slot = slot;
    e->closer_gen = gen;
    return 0;
}

static void ep_closer_check(pl_ucx_worker_t *w, const struct ucx_ep *e, int ep)
{
    if (e && e->closer_waits && ep_drained(w, e, ep))
        ucx_wake(w, e->closer_slot, e->closer_gen);
}

/* An op on endpoint ep ended, or was given up, while some close waits; a
 * pull's (UCX_OP_PULL) may let any close go on (closes are few). */
void ucx_ep_op_ended(pl_ucx_worker_t *w, int ep)
{
    if (ep != UCX_OP_PULL) {
        ep_closer_check(w, ucx_ep_get(w, ep), ep);
        return;
    }
    for (int i = 0; i < w->neps; i++)
        ep_closer_check(w, &w->eps[i], ep_handle(w, i));
}

/* Close gracefully a healthy endpoint, forcefully a failed one.  With
 * operations in flight a graceful close takes two calls: this one flushes
 * (EP_CLOSING), the next closes.  UCX 1.13 asserts when a worker is
 * destroyed under an endpoint whose close is still flushing a send, while
 * one that is only flushing is force-closed by pl_ucx_worker_close.  The
 * entry is freed as the close proper starts; an error before that (no op
 * slot: -ENOMEM or -PL_EOPSFULL) leaves it in place. */
int pl_ucx_ep_close(pl_ucx_worker_t *w, int ep, uint32_t slot, uint32_t gen)
{
    struct ucx_ep *e = ucx_ep_get(w, ep);
    bool busy;

    if (!e)
        return -EBADF;
    if (!e->owned) {            /* a reply endpoint: UCX closes it */
        e->state = EP_FREE;
        return 0;
    }
    busy = ep_busy(w, ep, true);
    if (e->state == EP_OPEN && (busy || w->pulls > 0))     /* (pulls: see pl_ucx_ep_drained) */
        return ep_drain(w, e, ep, slot, gen);
    /* An operation a killed task left in UCX's hands (a rendezvous send
     * whose receiver never pulls) is dropped by a forced close: UCX 1.13
     * aborted the process in a graceful one (ucp_ep.c:437, the endpoint's
     * proto_reqs not empty at its local disconnect; a killed tag_send's
     * endpoint closed after its peer's close, 2 runs in 8).  So is a pull
     * still in flight, its task gone (see pl_ucx_ep_drained). */
    return ep_close(w, e, e->state == EP_FAILED || busy || w->pulls > 0, slot, gen);
}

/* Close forcefully with nobody waiting: a connection that never came up,
 * or whose task gave up.  UCX's own request does it (freed as it
 * completes), not an op slot: with every slot in use the abort failed and
 * the entry stayed, its endpoint open in UCX and nobody left to close it.
 * An endpoint without peer error handling (connect_addr) cannot be forced
 * (UCX says EINVAL before it starts): it is closed gracefully instead. */
#define UCX_ABORT_WAIT_NS 1000000000LL

static void ep_abort_now(pl_ucx_worker_t *w, struct ucx_ep *e);

int pl_ucx_ep_abort(pl_ucx_worker_t *w, int ep)
{
    struct ucx_ep *e = ucx_ep_get(w, ep);

    if (!e)
        return -EBADF;
    if (e->connecting && e->state == EP_OPEN && e->owned) {
        /* A client endpoint forced closed in its wire-up had UCX 1.13's
         * async thread, still at work on its connection, assert
         * (tcp_sockcm_ep.c:416; 5 runs in 7 of 40 connect_socket calls
         * killed a few ticks in).  It is closed once the wire-up is over
         * (its flush ends, or it fails: ucx_eps_reap), or after
         * UCX_ABORT_WAIT_NS when it goes nowhere (a server that never
         * answers), its async work long done.  Meanwhile the entry
         * counts as nothing and takes no operation. */
        ep_drop_closer(w, e);
        e->state = EP_ABORTING;
        e->abort_at = pl_clock_ns() + UCX_ABORT_WAIT_NS;
        ucx_msgs_forget_ep(w, e->ep, -ENOTCONN);
        w->aborting++;
        ep_peer_gone(w);
        return 0;
    }
    ep_abort_now(w, e);
    return 0;
}

static void ep_abort_now(pl_ucx_worker_t *w, struct ucx_ep *e)
{
    ucp_request_param_t p = { .op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS,
                              .flags = UCP_EP_CLOSE_FLAG_FORCE };
    bool was_peer = ep_is_peer(e);
    ucs_status_ptr_t sp;

    if (e->state == EP_ABORTING)
        w->aborting--;
    ep_drop_closer(w, e);
    e->state = EP_FREE;
    if (!e->owned)
        return;
    ucx_msgs_forget_ep(w, e->ep, -ENOTCONN);
    if (was_peer)       /* (a failed one, as those the collection frees, was no peer) */
        ep_peer_gone(w);
    sp = ep_close_nbx(e->ep, &p);
    if (UCS_PTR_IS_PTR(sp))
        ucp_request_free(sp);
    /* UCX lets go of the connection (its socket) in the worker's next
     * progress, or its close.  Not progressed here: right after the forced
     * close of an endpoint still connecting, a progress made UCX 1.13's
     * async thread assert (tcp_sockcm_ep.c:416, a client endpoint sending
     * without its private data packed) in 9 of 30 runs of a spec. */
}

/* A failed owned endpoint nothing refers to any more is freed. */
static void ep_collect(pl_ucx_worker_t *w, int ep)
{
    pl_ucx_ep_abort(w, ep);
    w->stats.endpoints_collected++;
}

/* Its object was collected.  A message's reply endpoint (holds) may still
 * refer to the entry: then its last holder frees it (pl_ucx_ep_unhold),
 * and until then the reply says why it fails (the peer's failure), not
 * that the endpoint was closed. */
int pl_ucx_ep_drop(pl_ucx_worker_t *w, int ep)
{
    struct ucx_ep *e = ucx_ep_get(w, ep);

    if (!e || !e->owned)
        return 0;
    e->dropped = true;
    if (ep_dead(e) && e->holds == 0) {
        ep_collect(w, ep);
        return 1;
    }
    return 0;
}

/* Not in ucx_ep_error itself: UCX is inside the worker's progress there. */
void ucx_eps_reap(pl_ucx_worker_t *w)
{
    int64_t now = w->aborting ? pl_clock_ns() : 0;

    w->reap = 0;
    for (int i = 0; i < w->neps; i++) {
        struct ucx_ep *e = &w->eps[i];
        if (ep_dead(e) && e->dropped && e->owned && e->holds == 0)
            ep_collect(w, ep_handle(w, i));
        else if (e->state == EP_ABORTING && (!e->connecting || now >= e->abort_at))
            ep_abort_now(w, e);
    }
}
