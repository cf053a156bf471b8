/*
 * ucx.c - the UCX reactor: context, workers, endpoints, listeners, op slots
 * and the wake-up protocol.
 *
 * Lifetime: a context owns nothing but the ucp context and outlives its
 * workers (closing it with live workers fails).  A worker owns its
 * endpoints, listeners, streams, held messages and op slots; closing it
 * closes endpoints, then listeners, then destroys the ucp worker.  The
 * reactor owns only its epoll fd and borrows workers.
 *
 * Waking: the runtime asks the reactor to arm() before it sleeps; each
 * worker is armed with ucp_worker_arm (BUSY means "progress again first"),
 * and the workers' event fds are gathered in one epoll fd, the reactor's
 * wait fd, that the runtime watches from its io_uring.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <unistd.h>

#include "ucx_internal.h"

#define UCX_MAX_WORKERS 32
#define UCX_SAFETY_WAIT_NS 1000000000LL  /* wake at least once a second */

static void reactor_remove_worker(struct pl_ucx_reactor *r, pl_ucx_worker_t *w);

struct pl_ucx_reactor {
    pl_reactor_t reactor;   /* first: the vtable the runtime polls */
    int epfd;
    pl_runtime_t *rt;
    pl_ucx_worker_t *workers[UCX_MAX_WORKERS];
    int nworkers;
};

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
        return -ENOMEM;
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

    if (w->free_op == UCX_NONE && ops_grow(w) < 0)
        return -ENOMEM;
    op = op_at(w, w->free_op);
    w->free_op = op->next_free;
    op->state = UOP_IN_FLIGHT;
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
    op->state = UOP_FREE;
    op->gen++;
    op->next_free = w->free_op;
    w->free_op = op->index;
}

void ucx_wake(pl_ucx_worker_t *w, uint32_t slot, uint32_t gen)
{
    if (w->rt)
        pl_task_wake(w->rt, slot, gen);
}

/* Called from UCX callbacks: record, wake, nothing else. */
void ucx_op_finish(struct ucx_op *op, ucs_status_t status)
{
    pl_ucx_worker_t *w = op->w;

    w->in_flight--;
    if (op->state == UOP_ABANDONED) {
        ucx_op_free(w, op);
        return;
    }
    op->status = pl_ucx_errno(status);
    op->state = UOP_DONE;
    ucx_wake(w, op->task_slot, op->task_gen);
}

static void send_done(void *request, ucs_status_t status, void *user_data)
{
    (void)request;
    ucx_op_finish(user_data, status);
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

/* What a UCX call returned: done at once (0), in flight (op id + 1), or an
 * error; the op slot is freed unless in flight. */
int ucx_op_result(pl_ucx_worker_t *w, struct ucx_op *op, ucs_status_ptr_t sp)
{
    if (UCS_PTR_IS_PTR(sp)) {
        w->in_flight++;
        return (int)op->index + 1;
    }
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

/* The task gave up (killed): cancel; the slot is freed by the callback. */
int pl_ucx_op_abandon(pl_ucx_worker_t *w, int id)
{
    struct ucx_op *op = id > 0 ? ucx_op_get(w, (uint32_t)id - 1) : NULL;

    if (!op || op->state == UOP_FREE || op->state == UOP_ABANDONED)
        return -ESRCH;
    if (op->state == UOP_DONE) {
        ucx_op_free(w, op);
        return 0;
    }
    op->state = UOP_ABANDONED;
    ucp_request_cancel(w->ucp, op);
    return 0;
}

/* ---- worker -------------------------------------------------------------- */

pl_ucx_worker_t *pl_ucx_worker_new(pl_ucx_context_t *c, int *err)
{
    ucp_worker_params_t params = {
        .field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE,
        .thread_mode = UCS_THREAD_MODE_SINGLE,
    };
    ucp_worker_attr_t attr = { .field_mask = UCP_WORKER_ATTR_FIELD_MAX_AM_HEADER };
    pl_ucx_worker_t *w = calloc(1, sizeof(*w));
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
    st = ucp_worker_create(c->ucp, &params, &w->ucp);
    if (st == UCS_OK && c->wakeup)
        st = ucp_worker_get_efd(w->ucp, &w->efd);
    if (st == UCS_OK)
        st = ucp_worker_query(w->ucp, &attr);
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

int pl_ucx_worker_address(pl_ucx_worker_t *w, void *buf, int cap)
{
    ucp_address_t *addr;
    size_t len;
    ucs_status_t st = ucp_worker_get_address(w->ucp, &addr, &len);

    if (st != UCS_OK)
        return pl_ucx_errno(st);
    w->address_shared = true;
    if ((size_t)cap >= len)
        memcpy(buf, addr, len);
    ucp_worker_release_address(w->ucp, addr);
    return (int)len;
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
    out->endpoints = live;
    out->failed_endpoints = failed;
}

/* ---- endpoints ----------------------------------------------------------- */

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

int ucx_ep_add(pl_ucx_worker_t *w, ucp_ep_h ep, bool owned, const char *peer)
{
    int i = ep_find(w, ep);

    if (i >= 0)
        return ep_handle(w, i);
    for (i = 0; i < UCX_MAX_ENDPOINTS; i++)
        if (w->eps[i].state == EP_FREE)
            break;
    if (i == UCX_MAX_ENDPOINTS)
        return -EMFILE;
    if (i >= w->neps)
        w->neps = i + 1;
    w->eps[i].ep = ep;
    w->eps[i].gen++;
    w->eps[i].state = EP_OPEN;
    w->eps[i].owned = owned;
    w->eps[i].error = 0;
    snprintf(w->eps[i].peer, UCX_PEER_LEN, "%s", peer);
    return ep_handle(w, i);
}

/* The peer failed (UCP_ERR_HANDLING_MODE_PEER): UCX fails the endpoint's
 * requests itself; we mark it and let waiting readers re-check. */
static void ep_error(void *arg, ucp_ep_h ep, ucs_status_t status)
{
    pl_ucx_worker_t *w = arg;
    int i = ep_find(w, ep);

    if (i >= 0 && w->eps[i].state == EP_OPEN) {
        w->eps[i].state = EP_FAILED;
        w->eps[i].error = pl_ucx_errno(status);
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
    return e->state == EP_OPEN ? 0 : -ENOTCONN;
}

const char *pl_ucx_ep_peer(pl_ucx_worker_t *w, int ep)
{
    struct ucx_ep *e = ucx_ep_get(w, ep);

    return e ? e->peer : "";
}

bool ucx_worker_has_peers(pl_ucx_worker_t *w)
{
    if (w->address_shared)
        return true;
    for (int i = 0; i < w->neps; i++)
        if (w->eps[i].state == EP_OPEN)
            return true;
    for (int i = 0; i < UCX_MAX_LISTENERS; i++)
        if (w->listeners[i].open)
            return true;
    return false;
}

int pl_ucx_connect_addr(pl_ucx_worker_t *w, const void *addr, int len, int peer_errors)
{
    ucp_ep_params_t p = {
        .field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLER |
                      UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE,
        .address = addr,
        .err_mode = peer_errors ? UCP_ERR_HANDLING_MODE_PEER : UCP_ERR_HANDLING_MODE_NONE,
        .err_handler = { .cb = ep_error, .arg = w },
    };
    ucp_ep_h ep;
    ucs_status_t st;
    int h;

    if (len <= 0)
        return -EINVAL;
    st = ucp_ep_create(w->ucp, &p, &ep);
    if (st != UCS_OK)
        return pl_ucx_errno(st);
    h = ucx_ep_add(w, ep, true, "worker address");
    if (h < 0)
        ucp_ep_destroy(ep);
    return h;
}

/* Resolve host:port (numeric or a name) into a socket address. */
static int resolve(const char *host, int port, struct sockaddr_storage *ss, socklen_t *len)
{
    struct addrinfo hints = { .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
                              .ai_flags = AI_NUMERICSERV };
    struct addrinfo *res;
    char service[16];
    int rc;

    snprintf(service, sizeof(service), "%d", port);
    rc = getaddrinfo(host, service, &hints, &res);
    if (rc != 0)
        return -EADDRNOTAVAIL;
    memcpy(ss, res->ai_addr, res->ai_addrlen);
    *len = res->ai_addrlen;
    freeaddrinfo(res);
    return 0;
}

static void sockaddr_text(const struct sockaddr_storage *ss, char *out, size_t cap)
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
        .err_handler = { .cb = ep_error, .arg = w },
    };
    ucp_ep_h ep;
    ucs_status_t st;
    int rc = resolve(host, port, &ss, &len);

    if (rc < 0)
        return rc;
    p.sockaddr.addr = (struct sockaddr *)&ss;
    p.sockaddr.addrlen = len;
    st = ucp_ep_create(w->ucp, &p, &ep);
    if (st != UCS_OK)
        return pl_ucx_errno(st);
    sockaddr_text(&ss, peer, sizeof(peer));
    *ep_out = ucx_ep_add(w, ep, true, peer);
    if (*ep_out < 0) {
        ucp_ep_destroy(ep);
        return *ep_out;
    }
    return pl_ucx_ep_flush(w, *ep_out, slot, gen);
}

/* The start of every operation on an endpoint: it must be open; then an
 * op slot and its request parameters. */
int ucx_ep_op_new(pl_ucx_worker_t *w, int ep, uint32_t slot, uint32_t gen, struct ucx_ep **e,
                  struct ucx_op **op, ucp_request_param_t *p)
{
    int rc;

    *e = ucx_ep_get(w, ep);
    if (!*e)
        return -EBADF;
    if ((*e)->state != EP_OPEN)
        return pl_ucx_ep_status(w, ep);
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

/* Close gracefully (flush) a healthy endpoint, forcefully a failed one. */
int pl_ucx_ep_close(pl_ucx_worker_t *w, int ep, uint32_t slot, uint32_t gen)
{
    struct ucx_ep *e = ucx_ep_get(w, ep);
    ucp_request_param_t p;
    struct ucx_op *op;
    int rc;

    if (!e)
        return -EBADF;
    if (e->state == EP_CLOSED)
        return -EALREADY;
    if (!e->owned) {            /* a reply endpoint: UCX closes it */
        e->state = EP_FREE;
        return 0;
    }
    rc = ucx_op_new(w, slot, gen, -1, &op);
    if (rc < 0)
        return rc;
    ucx_op_param(&p, op);
    p.op_attr_mask |= UCP_OP_ATTR_FIELD_FLAGS;
    p.flags = e->state == EP_FAILED ? UCP_EP_CLOSE_FLAG_FORCE : 0;
    e->state = EP_FREE;
    return ucx_op_result(w, op, ucp_ep_close_nbx(e->ep, &p));
}

/* ---- listeners ----------------------------------------------------------- */

static void conn_request(ucp_conn_request_h req, void *arg)
{
    struct ucx_listener *l = arg;
    ucp_conn_request_attr_t attr = { .field_mask = UCP_CONN_REQUEST_ATTR_FIELD_CLIENT_ADDR };
    struct ucx_conn *c;

    if (!l->open || (l->len == l->cap && l->cap == 1024)) {
        ucp_listener_reject(l->l, req);
        return;
    }
    if (l->len == l->cap) {
        uint32_t cap = l->cap ? l->cap * 2 : 8;
        struct ucx_conn *p = malloc(sizeof(*p) * cap);
        if (!p) {
            ucp_listener_reject(l->l, req);
            return;
        }
        for (uint32_t k = 0; k < l->len; k++)
            p[k] = l->pending[(l->head + k) % l->cap];
        free(l->pending);
        l->pending = p;
        l->cap = cap;
        l->head = 0;
    }
    c = &l->pending[(l->head + l->len++) % l->cap];
    c->req = req;
    if (ucp_conn_request_query(req, &attr) == UCS_OK)
        sockaddr_text(&attr.client_address, c->peer, sizeof(c->peer));
    else
        snprintf(c->peer, sizeof(c->peer), "?");
    if (l->has_waiter) {
        l->has_waiter = false;
        ucx_wake(l->w, l->waiter_slot, l->waiter_gen);
    }
}

int pl_ucx_listen(pl_ucx_worker_t *w, const char *host, int port)
{
    struct sockaddr_storage ss;
    socklen_t len;
    ucp_listener_attr_t attr = { .field_mask = UCP_LISTENER_ATTR_FIELD_SOCKADDR };
    ucp_listener_params_t p = {
        .field_mask = UCP_LISTENER_PARAM_FIELD_SOCK_ADDR | UCP_LISTENER_PARAM_FIELD_CONN_HANDLER,
    };
    struct ucx_listener *l = NULL;
    ucs_status_t st;
    int i, rc = resolve(host, port, &ss, &len);

    if (rc < 0)
        return rc;
    for (i = 0; i < UCX_MAX_LISTENERS; i++)
        if (!w->listeners[i].open && !w->listeners[i].l)
            break;
    if (i == UCX_MAX_LISTENERS)
        return -EMFILE;
    l = &w->listeners[i];
    *l = (struct ucx_listener){ .w = w, .index = i };
    p.sockaddr.addr = (struct sockaddr *)&ss;
    p.sockaddr.addrlen = len;
    p.conn_handler.cb = conn_request;
    p.conn_handler.arg = l;
    st = ucp_listener_create(w->ucp, &p, &l->l);
    if (st != UCS_OK) {
        l->l = NULL;
        return st == UCS_ERR_BUSY ? -EADDRINUSE : pl_ucx_errno(st);
    }
    l->open = true;
    l->port = port;
    if (ucp_listener_query(l->l, &attr) == UCS_OK) {
        if (attr.sockaddr.ss_family == AF_INET)
            l->port = ntohs(((struct sockaddr_in *)&attr.sockaddr)->sin_port);
        else if (attr.sockaddr.ss_family == AF_INET6)
            l->port = ntohs(((struct sockaddr_in6 *)&attr.sockaddr)->sin6_port);
    }
    return i;
}

static struct ucx_listener *listener_get(pl_ucx_worker_t *w, int i)
{
    if (i < 0 || i >= UCX_MAX_LISTENERS || !w->listeners[i].open)
        return NULL;
    return &w->listeners[i];
}

int pl_ucx_listener_port(pl_ucx_worker_t *w, int i)
{
    struct ucx_listener *l = listener_get(w, i);

    return l ? l->port : -EBADF;
}

/* An endpoint for the oldest connection request, or -EAGAIN after making
 * the task the listener's waiter. */
int pl_ucx_accept(pl_ucx_worker_t *w, int i, uint32_t slot, uint32_t gen)
{
    struct ucx_listener *l = listener_get(w, i);
    ucp_ep_params_t p = {
        .field_mask = UCP_EP_PARAM_FIELD_CONN_REQUEST | UCP_EP_PARAM_FIELD_ERR_HANDLER |
                      UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE,
        .err_mode = UCP_ERR_HANDLING_MODE_PEER,
        .err_handler = { .cb = ep_error, .arg = w },
    };
    struct ucx_conn c;
    ucp_ep_h ep;
    ucs_status_t st;
    int h;

    if (!l)
        return -EBADF;
    if (l->len == 0) {
        if (l->has_waiter && (l->waiter_slot != slot || l->waiter_gen != gen) &&
            w->rt && pl_task_wake(w->rt, l->waiter_slot, l->waiter_gen) >= 0)
            return -EBUSY;      /* another live task is accepting */
        l->has_waiter = true;
        l->waiter_slot = slot;
        l->waiter_gen = gen;
        return -EAGAIN;
    }
    c = l->pending[l->head];
    l->head = (l->head + 1) % l->cap;
    l->len--;
    p.conn_request = c.req;
    st = ucp_ep_create(w->ucp, &p, &ep);
    if (st != UCS_OK)
        return pl_ucx_errno(st);
    h = ucx_ep_add(w, ep, true, c.peer);
    if (h < 0)
        ucp_ep_destroy(ep);
    return h;
}

int pl_ucx_listener_close(pl_ucx_worker_t *w, int i)
{
    struct ucx_listener *l = listener_get(w, i);

    if (!l)
        return -EBADF;
    while (l->len > 0) {        /* nobody will accept these now */
        ucp_listener_reject(l->l, l->pending[l->head].req);
        l->head = (l->head + 1) % l->cap;
        l->len--;
    }
    ucp_listener_destroy(l->l);
    l->l = NULL;
    l->open = false;
    free(l->pending);
    l->pending = NULL;
    if (l->has_waiter) {
        l->has_waiter = false;
        ucx_wake(w, l->waiter_slot, l->waiter_gen);
    }
    ucx_streams_wake_all(w);
    return 0;
}

/* Close everything the worker owns, in order: endpoints (forced: a worker
 * being closed will not progress a graceful flush), listeners, streams,
 * then the ucp worker. */
int pl_ucx_worker_close(pl_ucx_worker_t *w)
{
    pl_ucx_context_t *ctx = w->ctx;

    w->rt = NULL;       /* its runtime may be gone: wake nobody from now on */
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
        e->state = EP_FREE;
    }
    for (int i = 0; i < UCX_MAX_LISTENERS; i++)
        if (w->listeners[i].open)
            pl_ucx_listener_close(w, i);
    ucx_streams_free(w);
    while (w->in_flight > 0 && ucp_worker_progress(w->ucp) > 0)
        ;
    if (w->reactor)
        reactor_remove_worker(w->reactor, w);
    ucp_worker_destroy(w->ucp);
    for (int k = 0; k < w->nchunks; k++)
        free(w->op_chunks[k]);
    free(w->msgs);
    free(w);
    if (--ctx->workers == 0 && ctx->released)
        pl_ucx_context_close(ctx);
    return 0;
}

/* ---- the reactor --------------------------------------------------------- */

static bool worker_busy(pl_ucx_worker_t *w)
{
    return w->in_flight > 0 || ucx_worker_has_peers(w);
}

static int ucx_poll(pl_reactor_t *self, pl_runtime_t *rt, int budget)
{
    pl_ucx_reactor_t *r = (pl_ucx_reactor_t *)self;
    int n = 0;

    r->rt = rt;
    for (int i = 0; i < r->nworkers; i++) {
        pl_ucx_worker_t *w = r->workers[i];
        w->rt = rt;
        for (int k = 0; k < budget; k++) {
            unsigned got;
            /* flow control: a stream over its window stops progress (the
             * sender is slowed), unless our own ops need progress */
            if (w->in_flight == 0 && ucx_worker_over_window(w))
                break;
            got = ucp_worker_progress(w->ucp);
            w->stats.progress_calls++;
            if (got == 0)
                break;
            n += (int)got;
        }
    }
    return n;
}

static int ucx_status(pl_reactor_t *self)
{
    pl_ucx_reactor_t *r = (pl_ucx_reactor_t *)self;

    for (int i = 0; i < r->nworkers; i++)
        if (worker_busy(r->workers[i]))
            return PL_REACTOR_PENDING;
    return PL_REACTOR_IDLE;
}

/* A busy worker without an event fd (no wakeup) means: busy-poll. */
static int ucx_wait_fd(pl_reactor_t *self)
{
    pl_ucx_reactor_t *r = (pl_ucx_reactor_t *)self;

    for (int i = 0; i < r->nworkers; i++)
        if (r->workers[i]->efd < 0 && worker_busy(r->workers[i]))
            return -1;
    return r->epfd;
}

/* Arm every worker; BUSY means events are pending: progress first. */
static int ucx_arm(pl_reactor_t *self)
{
    pl_ucx_reactor_t *r = (pl_ucx_reactor_t *)self;

    for (int i = 0; i < r->nworkers; i++) {
        pl_ucx_worker_t *w = r->workers[i];
        ucs_status_t st;
        if (w->efd < 0 || (w->in_flight == 0 && ucx_worker_over_window(w)))
            continue;           /* polled, or paused: its events wait for the reader */
        st = ucp_worker_arm(w->ucp);
        if (st == UCS_ERR_BUSY)
            return -EAGAIN;
        w->stats.wakeups++;
    }
    return 0;
}

static int ucx_stats(pl_reactor_t *self, pl_stat_t *out, int max)
{
    pl_ucx_reactor_t *r = (pl_ucx_reactor_t *)self;

    if (max < 1)
        return 0;
    out[0].name = "workers";
    out[0].value = r->nworkers;
    return 1;
}

pl_ucx_reactor_t *pl_ucx_reactor_new(int *err)
{
    pl_ucx_reactor_t *r = calloc(1, sizeof(*r));

    if (!r) {
        *err = -ENOMEM;
        return NULL;
    }
    r->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (r->epfd < 0) {
        *err = -errno;
        free(r);
        return NULL;
    }
    r->reactor = (pl_reactor_t){
        .kind = "ucx", .poll = ucx_poll, .status = ucx_status, .wait_fd = ucx_wait_fd,
        .arm = ucx_arm, .stats = ucx_stats, .max_wait_ns = UCX_SAFETY_WAIT_NS,
    };
    return r;
}

void pl_ucx_reactor_free(pl_ucx_reactor_t *r)
{
    if (!r)
        return;
    for (int i = 0; i < r->nworkers; i++)
        r->workers[i]->reactor = NULL;
    close(r->epfd);
    free(r);
}

pl_reactor_t *pl_ucx_reactor_vtable(pl_ucx_reactor_t *r)
{
    return &r->reactor;
}

/* Also used by workers progressed by a reactor that is being freed. */
void pl_ucx_reactor_attach(pl_ucx_reactor_t *r, pl_runtime_t *rt)
{
    r->rt = rt;
    for (int i = 0; i < r->nworkers; i++)
        r->workers[i]->rt = rt;
}

/* Progress the worker from now on; registering twice is harmless. */
int pl_ucx_reactor_add_worker(pl_ucx_reactor_t *r, pl_ucx_worker_t *w)
{
    struct epoll_event ev = { .events = EPOLLIN, .data.ptr = w };

    for (int i = 0; i < r->nworkers; i++)
        if (r->workers[i] == w)
            return 0;
    if (r->nworkers == UCX_MAX_WORKERS)
        return -EMFILE;
    if (w->efd >= 0 && epoll_ctl(r->epfd, EPOLL_CTL_ADD, w->efd, &ev) < 0)
        return -errno;
    r->workers[r->nworkers++] = w;
    w->rt = r->rt;
    w->reactor = r;
    return 0;
}

static void reactor_remove_worker(pl_ucx_reactor_t *r, pl_ucx_worker_t *w)
{
    for (int i = 0; i < r->nworkers; i++) {
        if (r->workers[i] == w) {
            if (w->efd >= 0)
                epoll_ctl(r->epfd, EPOLL_CTL_DEL, w->efd, NULL);
            r->workers[i] = r->workers[--r->nworkers];
            return;
        }
    }
}
