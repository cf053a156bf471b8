/*
 * ucx_listener.c - listeners of a UCX worker: the connection requests they
 * queue for accept(), and their close, which keeps UCX's listener until no
 * connection it accepted can call it any more (see "closing a listener").
 */
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <ifaddrs.h>
#include <net/if.h>
#include <linux/tcp.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

#include "ucx_internal.h"

/* Whether UCX binds a listener with SO_REUSEADDR: UCX_TCP_CM_REUSEADDR
 * (UCX 1.13's name; "n" by default), a yes as UCX reads one. */
static bool ucx_reuseaddr(void)
{
    const char *v = getenv("UCX_TCP_CM_REUSEADDR");

    return v && (strcasecmp(v, "y") == 0 || strcasecmp(v, "yes") == 0 || strcasecmp(v, "on") == 0 ||
                 strcmp(v, "1") == 0);
}

/* Whether the address can be bound as UCX binds a listener's (with
 * SO_REUSEADDR only when UCX_TCP_CM_REUSEADDR says so: else a port whose
 * last connection is in TIME_WAIT was refused here though UCX would take
 * it).  A listen bound to fail then gets the kernel's errno (EADDRINUSE,
 * EADDRNOTAVAIL, EACCES), where UCX would say EIO for all but the first. */
static int bind_probe(const struct sockaddr_storage *ss, socklen_t len)
{
    int rc = 0, one = 1, fd = socket(ss->ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);

    if (fd < 0)
        return -errno;
    if (ucx_reuseaddr())
        (void)setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (bind(fd, (const struct sockaddr *)ss, len) < 0)
        rc = -errno;
    close(fd);
    return rc;
}

static void conn_request(ucp_conn_request_h req, void *arg)
{
    struct ucx_listener *l = arg;
    ucp_conn_request_attr_t attr = { .field_mask = UCP_CONN_REQUEST_ATTR_FIELD_CLIENT_ADDR };
    struct ucx_conn *c;

    if (!l->open || (l->len == l->cap && l->cap == 1024)) {
        ucp_listener_reject(l->l, req);
        return;
    }
    if (l->len == l->cap &&
        pl_fifo_grow((void **)&l->pending, &l->cap, &l->head, l->len, sizeof(*l->pending), 8) < 0) {
        ucp_listener_reject(l->l, req);
        return;
    }
    c = &l->pending[(l->head + l->len++) % l->cap];
    c->req = req;
    if (ucp_conn_request_query(req, &attr) == UCS_OK)
        ucx_sockaddr_text(&attr.client_address, c->peer, sizeof(c->peer));
    else
        snprintf(c->peer, sizeof(c->peer), "?");
    ucx_waitq_wake_one(l->w, &l->acceptors);
}

/* Whether UCX's device list ("all", or names: "lo,eth0", "mlx5_0:1,ib0")
 * leaves no network interface out that this check can judge: "all", ""
 * (not read back, or set empty), or an entry that is no interface of this
 * machine, such as an RDMA device and port ("mlx5_0:1"): rdmacm takes a
 * listener's connections on the RDMA device that carries the address
 * (ib0's), under that device's name, which getifaddrs does not give. */
static bool every_device(const char *list)
{
    char name[IF_NAMESIZE];

    if (strcmp(list, "all") == 0 || list[0] == '\0')
        return true;
    while (*list) {
        size_t len = strcspn(list, ",");
        if (len == 0 || len >= sizeof(name))
            return true;
        memcpy(name, list, len);
        name[len] = '\0';
        if (if_nametoindex(name) == 0)
            return true;
        list += len;
        if (*list == ',')
            list++;
    }
    return false;
}

/* Whether name is in that list: an entry or its part before a ':' names
 * it, or it names the entry's (an alias "eth0:1"), so that only a plain
 * miss refuses. */
static bool device_listed(const char *list, const char *name)
{
    size_t nlen = strcspn(name, ":");

    while (*list) {
        size_t len = strcspn(list, ","), base = strcspn(list, ":");
        if (base > len)
            base = len;
        if ((len == strlen(name) && strncmp(list, name, len) == 0) ||
            (base == strlen(name) && strncmp(list, name, base) == 0) ||
            (len == nlen && strncmp(list, name, len) == 0))
            return true;
        list += len;
        if (*list == ',')
            list++;
    }
    return false;
}

/* UCX takes a connection on a listener's address and then drops it when
 * the address's interface is not among its devices (UCX_NET_DEVICES): it
 * logs an ERROR in the listening process, and the client fails or (across
 * a veth) waits for good.
 * So such a listener is refused (-ENODEV, the reason in w->listen_why).
 * A wildcard address, whose connections come in on any interface, is
 * left alone. */
static int device_check(pl_ucx_worker_t *w, const struct sockaddr_storage *ss)
{
    struct ifaddrs *all, *a;
    const char *found = NULL;
    int rc = 0;

    if (every_device(w->ctx->net_devices) || getifaddrs(&all) < 0)
        return 0;   /* (every device: nothing to check; or no list of interfaces) */
    for (a = all; a && !found; a = a->ifa_next) {
        if (!a->ifa_addr || a->ifa_addr->sa_family != ss->ss_family)
            continue;
        if (ss->ss_family == AF_INET &&
            ((const struct sockaddr_in *)a->ifa_addr)->sin_addr.s_addr ==
            ((const struct sockaddr_in *)ss)->sin_addr.s_addr)
            found = a->ifa_name;
        else if (ss->ss_family == AF_INET6 &&
                 memcmp(&((const struct sockaddr_in6 *)a->ifa_addr)->sin6_addr,
                        &((const struct sockaddr_in6 *)ss)->sin6_addr, sizeof(struct in6_addr)) == 0)
            found = a->ifa_name;
    }
    if (found && !device_listed(w->ctx->net_devices, found)) {
        snprintf(w->listen_why, sizeof(w->listen_why),
                 "the address is on interface %s, which UCX_NET_DEVICES=%s leaves out: UCX would take a "
                 "client's connection there and drop it, the client failing or waiting for good (add %s to "
                 "UCX_NET_DEVICES, or listen on an address of one of its interfaces)",
                 found, w->ctx->net_devices, found);
        rc = -ENODEV;
    }
    freeifaddrs(all);
    return rc;
}

const char *pl_ucx_listen_why(pl_ucx_worker_t *w)
{
    return w->listen_why;
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
    struct ucx_log_hold held;
    ucs_status_t st;
    int i, rc = ucx_resolve(host, port, &ss, &len);

    if (rc == 0 && pl_net_sockaddr_unasked_wildcard(host, (const struct sockaddr *)&ss))
        rc = -PL_EWILDCARD;     /* (as an io_uring listener: uring_net.c) */
    if (rc == 0)
        rc = device_check(w, &ss);
    if (rc == 0)
        rc = bind_probe(&ss, len);
    if (rc < 0)
        return rc;
    if (w->listeners_closing)   /* (one may still hold the port, or a slot) */
        ucx_listeners_settle(w, UCX_SETTLE_NOW);
    for (i = 0; i < UCX_MAX_LISTENERS; i++)
        if (!w->listeners[i].open && !w->listeners[i].l)
            break;
    if (i == UCX_MAX_LISTENERS)
        return -EMFILE;
    l = &w->listeners[i];
    *l = (struct ucx_listener){ .w = w, .index = i };
    ucx_waitq_init(&l->acceptors, PL_WAIT_ACCEPT);
    p.sockaddr.addr = (struct sockaddr *)&ss;
    p.sockaddr.addrlen = len;
    p.conn_handler.cb = conn_request;
    p.conn_handler.arg = l;
    /* the port may be taken between the probe and UCX's bind: UCX would
     * log what we return */
    ucx_log_hold(&held, NULL);
    st = ucp_listener_create(w->ucp, &p, &l->l);
    ucx_log_release(&held, st != UCS_OK);
    if (st != UCS_OK) {
        l->l = NULL;
        return st == UCS_ERR_BUSY ? -EADDRINUSE : pl_ucx_errno(st);
    }
    l->port = port;
    st = ucp_listener_query(l->l, &attr);
    if (st == UCS_OK) {
        if (attr.sockaddr.ss_family == AF_INET)
            l->port = ntohs(((struct sockaddr_in *)&attr.sockaddr)->sin_port);
        else if (attr.sockaddr.ss_family == AF_INET6)
            l->port = ntohs(((struct sockaddr_in6 *)&attr.sockaddr)->sin6_port);
        memcpy(&ss, &attr.sockaddr, sizeof(ss));
    } else if (port == 0) {     /* bound to a port nobody could be told */
        ucp_listener_destroy(l->l);
        l->l = NULL;
        return pl_ucx_errno(st);
    }
    l->open = true;
    /* what was bound (the host may name several addresses: the first one
     * is), with the port chosen for port 0 */
    if (ss.ss_family == AF_INET)
        ((struct sockaddr_in *)&ss)->sin_port = htons((uint16_t)l->port);
    else if (ss.ss_family == AF_INET6)
        ((struct sockaddr_in6 *)&ss)->sin6_port = htons((uint16_t)l->port);
    ucx_sockaddr_text(&ss, l->address, sizeof(l->address));
    l->bound = ss;
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

const char *pl_ucx_listener_address(pl_ucx_worker_t *w, int i)
{
    struct ucx_listener *l = listener_get(w, i);

    return l ? l->address : "";
}

/* Whether ucp_ep_create failed on a connection request because its client
 * is gone (reset, refused, timed out): not the listener's failure. */
static bool peer_gone(ucs_status_t st)
{
    return st == UCS_ERR_CONNECTION_RESET || st == UCS_ERR_NOT_CONNECTED || st == UCS_ERR_REJECTED ||
           st == UCS_ERR_ENDPOINT_TIMEOUT || st == UCS_ERR_TIMED_OUT || st == UCS_ERR_UNREACHABLE ||
           st == UCS_ERR_CANCELED;
}

/* The wait argument of the listener's acceptors (PL_WAIT_ACCEPT). */
double pl_ucx_listener_serial(pl_ucx_worker_t *w, int i)
{
    const struct ucx_listener *l = listener_get(w, i);

    return l ? (double)l->acceptors.serial : -1;
}

/* A task waiting in accept was killed: its turn passes on. */
void pl_ucx_listener_abandon(pl_ucx_worker_t *w, int i, uint32_t slot, uint32_t gen)
{
    struct ucx_listener *l = listener_get(w, i);

    if (l)
        ucx_waitq_leave(w, &l->acceptors, slot, gen, l->len > 0);
}

/* An endpoint for the oldest connection request whose client is still
 * there, or -EAGAIN after queueing the task among the listener's
 * acceptors (first come, first served). */
int pl_ucx_accept(pl_ucx_worker_t *w, int i, uint32_t slot, uint32_t gen)
{
    struct ucx_listener *l = listener_get(w, i);
    ucp_ep_params_t p = {
        .field_mask = UCP_EP_PARAM_FIELD_CONN_REQUEST | UCP_EP_PARAM_FIELD_ERR_HANDLER |
                      UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE,
        .err_mode = UCP_ERR_HANDLING_MODE_PEER,
        .err_handler = { .cb = ucx_ep_error, .arg = w },
    };
    ucp_ep_h ep;
    ucs_status_t st;
    int h;

    if (!l)
        return -EBADF;
    while (l->len > 0 && ucx_ep_room(w)) {
        struct ucx_conn c = l->pending[l->head];
        l->head = (l->head + 1) % l->cap;
        l->len--;
        p.conn_request = c.req;
        st = ucp_ep_create(w->ucp, &p, &ep);
        if (st == UCS_OK) {
            h = ucx_ep_add(w, ep, true, c.peer);
            if (h < 0)
                ucp_ep_destroy(ep);
            else if (l->len > 0)    /* more waiting: the next acceptor goes on */
                ucx_waitq_wake_one(w, &l->acceptors);
            return h;
        }
        /* A client that gave up or died before its request was taken
         * (UCX says the connection was reset) is not the listener's
         * failure: its request is dropped and the next one taken, or
         * waited for.  Else accept loops (while l:accept() do end) ended
         * on the first client that went away early. */
        if (!peer_gone(st))
            return pl_ucx_errno(st);
    }
    if (l->len == 0) {
        int rc = ucx_waitq_push(&l->acceptors, slot, gen);
        return rc < 0 ? rc : -EAGAIN;
    }
    return -EMFILE;             /* no room: the request stays for the next accept */
}

/* ---- closing a listener ---------------------------------------------------
 *
 * UCX 1.13 (and later ones) crash when a listener is destroyed while a
 * client's connection is between its TCP accept and its first message (the
 * client's private data).  The listener's socket handler accepts it on
 * UCX's async thread and makes a server cep (tcp_listener.c:44-88) that
 * keeps a plain pointer to the listener, ep->listener; the cep is listed
 * only on the connection manager, for its cleanup with the worker.
 * ucp_listener_destroy (ucp_listener.c:360) rejects the requests already
 * queued for the worker's progress, then frees the UCT listener
 * (tcp_listener.c:146, closing the listening socket) and the UCP one; the
 * cep is left alone.  When its client's data comes, the async thread calls
 * cep->listener->conn_request_cb(..., cep->listener->user_data, ...)
 * (tcp_sockcm_ep.c:660): a freed listener's callback, with the freed UCP
 * listener as its argument (ucp_cm_server_conn_request_cb reads its
 * worker: wireup_cm.c:1101).  A client of this thread sends its data in
 * its worker's progress, so a listener closed a tick after a
 * connect_socket to it crashed the process every time.  A cep whose
 * client goes away before sending is closed without touching the listener
 * (tcp_sockcm_ep.c:310-313), and no UCX call tells whether such ceps are
 * left.
 *
 * So a closed listener keeps its UCX listener (closing) while a connection
 * it accepted can still call it: one of its sockets (local address the
 * listener's) on which the server has sent nothing yet (tcpi_bytes_sent:
 * every request UCX gave to us or rejected was answered on it), or a
 * connection queued on the listening socket (tcpi_unacked: its backlog),
 * or an endpoint of this reactor still connecting to it (its handshake,
 * which the kernel may finish after connect() returned, may not have
 * reached the backlog yet: 1 run in 100 of 30 closes crashed without).
 * What comes meanwhile is rejected (conn_request: not open), so its
 * client's connect fails as refused.  ucx_listeners_settle destroys it
 * once none is left: at once in the usual case, else in the reactor's
 * polls (after the worker's progress handed us the requests to reject),
 * with a growing interval, or with the worker.  The sockets are only
 * looked at (/proc/self/fd, getsockname, TCP_INFO), never touched.  Left:
 * a connection from elsewhere whose handshake ends between the look and
 * the listening socket's close (microseconds), or whose request comes
 * between a closing worker's forced destruction of its listener and that
 * of the worker (worker_destroy). */

#define UCX_LISTENER_RETRY_NS 1000000LL           /* 1 ms, doubled up to: */
#define UCX_LISTENER_RETRY_MAX_NS 1000000000LL     /* 1 s */

/* Whether a is the listener's local address: same port, same address
 * unless it bound the wildcard. */
static bool listener_local(const struct ucx_listener *l, const struct sockaddr_storage *a)
{
    const struct sockaddr_storage *b = &l->bound;

    if (a->ss_family != b->ss_family)
        return false;
    if (a->ss_family == AF_INET) {
        const struct sockaddr_in *x = (const void *)a, *y = (const void *)b;
        return x->sin_port == y->sin_port &&
               (y->sin_addr.s_addr == htonl(INADDR_ANY) || x->sin_addr.s_addr == y->sin_addr.s_addr);
    }
    if (a->ss_family == AF_INET6) {
        const struct sockaddr_in6 *x = (const void *)a, *y = (const void *)b;
        return x->sin6_port == y->sin6_port &&
               (IN6_IS_ADDR_UNSPECIFIED(&y->sin6_addr) ||
                memcmp(&x->sin6_addr, &y->sin6_addr, sizeof(x->sin6_addr)) == 0);
    }
    return false;
}

/* Whether fd is a socket of the listener through which a client may still
 * call it (see above): the listening socket (listening) with connections
 * queued, or one it accepted (!listening) on which the server sent
 * nothing yet.  A kernel without tcpi_bytes_sent (before 4.19) cannot
 * tell: no. */
static bool listener_socket_live(const struct ucx_listener *l, int fd, bool listening)
{
    struct sockaddr_storage a;
    socklen_t alen = sizeof(a), ilen = sizeof(struct tcp_info), vlen = sizeof(int);
    struct tcp_info ti;
    int acceptconn = 0;

    if (getsockname(fd, (struct sockaddr *)&a, &alen) < 0 || !listener_local(l, &a))
        return false;
    memset(&ti, 0, sizeof(ti));
    if (getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &acceptconn, &vlen) < 0 || (acceptconn != 0) != listening ||
        getsockopt(fd, IPPROTO_TCP, TCP_INFO, &ti, &ilen) < 0)
        return false;
    if (listening)
        return ti.tcpi_unacked > 0;
    return ilen >= offsetof(struct tcp_info, tcpi_bytes_sent) + sizeof(ti.tcpi_bytes_sent) &&
           ti.tcpi_bytes_sent == 0;
}

/* Whether one of the process's sockets is such a one.  No /proc: cannot
 * tell, no (as before this was known). */
static bool listener_sockets_live(const struct ucx_listener *l, bool listening)
{
    DIR *d = opendir("/proc/self/fd");
    struct dirent *de;
    bool live = false;

    if (!d)
        return false;
    while (!live && (de = readdir(d)) != NULL) {
        char *end;
        long fd = strtol(de->d_name, &end, 10);
        if (end != de->d_name && *end == '\0' && fd != dirfd(d))
            live = listener_socket_live(l, (int)fd, listening);
    }
    closedir(d);
    return live;
}

/* Whether a connection may still call the listener.  The listening socket
 * first, then the accepted ones in a list of fds read after: UCX's thread
 * may accept meanwhile, and a connection is then seen in the backlog or
 * as an accepted socket (in the other order, in neither). */
static bool listener_live(const pl_ucx_worker_t *w, const struct ucx_listener *l)
{
    return ucx_reactor_connecting_to(w, l) || listener_sockets_live(l, true) ||
           listener_sockets_live(l, false);
}

static void listener_destroy(pl_ucx_worker_t *w, struct ucx_listener *l)
{
    ucp_listener_destroy(l->l);
    l->l = NULL;
    l->closing = false;
    w->listeners_closing--;
}

void ucx_listeners_settle(pl_ucx_worker_t *w, enum ucx_settle how)
{
    int64_t now = pl_clock_ns();

    for (int i = 0; i < UCX_MAX_LISTENERS && w->listeners_closing > 0; i++) {
        struct ucx_listener *l = &w->listeners[i];
        if (!l->closing || (how == UCX_SETTLE_DUE && now < l->retry_at))
            continue;
        if (how == UCX_SETTLE_FORCE || !listener_live(w, l)) {
            listener_destroy(w, l);
            continue;
        }
        l->retry_at = now + l->retry_ns;
        if (l->retry_ns < UCX_LISTENER_RETRY_MAX_NS)
            l->retry_ns *= 2;
    }
}

/* Close a listener; readers of the streams are woken (wake) so that they
 * re-check whether any peer can still send to them.  Its UCX listener
 * goes now or once no connection can call it any more (see above). */
static int listener_close(pl_ucx_worker_t *w, int i, bool wake)
{
    struct ucx_listener *l = listener_get(w, i);

    if (!l)
        return -EBADF;
    while (l->len > 0) {        /* nobody will accept these now */
        ucp_listener_reject(l->l, l->pending[l->head].req);
        l->head = (l->head + 1) % l->cap;
        l->len--;
    }
    l->open = false;
    l->closing = true;
    l->retry_at = 0;
    l->retry_ns = UCX_LISTENER_RETRY_NS;
    w->listeners_closing++;
    ucx_listeners_settle(w, UCX_SETTLE_DUE);
    free(l->pending);
    l->pending = NULL;
    l->cap = l->head = 0;
    if (wake)                   /* (dropped: no task can be waiting there) */
        ucx_waitq_wake_all(w, &l->acceptors);
    ucx_waitq_free(&l->acceptors);
    if (wake) {
        ucx_streams_wake_all(w);
        ucx_tags_orphan(w);
    } else {
        w->listener_dropped = true;
    }
    return 0;
}

int pl_ucx_listener_close(pl_ucx_worker_t *w, int i)
{
    return listener_close(w, i, true);
}

/* From a finalizer, whose runtime may be gone: no task can wait in its
 * accept (it would refer to it), and the streams' readers are woken by the
 * reactor's next poll (listener_dropped). */
int pl_ucx_listener_drop(pl_ucx_worker_t *w, int i)
{
    return listener_close(w, i, false);
}
