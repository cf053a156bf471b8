/*
 * uring_net.c - TCP and UDP sockets over the io_uring reactor.
 *
 * Setting a socket up (socket, bind, listen) is a few quick system calls,
 * done synchronously; everything that can wait (accept, connect, send,
 * recv, sendmsg, recvmsg) goes through the ring like file I/O.  Sends use
 * MSG_NOSIGNAL: a peer that went away gives EPIPE to the caller instead of
 * killing the process.  A short TCP send is continued in C (OP_SEND).
 */
#include <arpa/inet.h>
#include <net/if.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "uring_internal.h"

_Static_assert(sizeof(((pl_net_addr_t *)0)->storage) >= sizeof(struct sockaddr_storage),
               "pl_net_addr_t holds any socket address");

/* A failed getaddrinfo as -errno: the lookup's own failures (an unknown
 * name, no address of the family) as -ENXIO, which the callers report as
 * "cannot resolve host"; the process's (no memory, no file descriptor) as
 * theirs.  err is errno after the call, cleared before it: glibc's files
 * backend, unable to open /etc/hosts, says EAI_NONAME and leaves EMFILE in
 * errno, and "no such host" would send the reader after the wrong cause. */
int pl_net_gai_errno(int rc, int err)
{
    if (rc == EAI_MEMORY)
        return -ENOMEM;
    if (rc == EAI_SYSTEM)
        return err > 0 ? -err : -EIO;
    if (err == EMFILE || err == ENFILE || err == ENOMEM)
        return -err;
    return -ENXIO;
}

static int resolve_family(int family)
{
    return family == 4 ? AF_INET : family == 6 ? AF_INET6 : AF_UNSPEC;
}

/* The addresses of host:port (see pluvio.h).  The host must be an address
 * or a name the resolver knows: we never pick a wildcard for the caller.
 * Every address is returned, not just the first, so that a connect can try
 * the next when one fails (a name with an IPv6 and an IPv4 address, only
 * one of which the peer listens on). */
int pl_net_resolve(const char *host, int port, int udp, int family, pl_net_addr_t *out, int cap)
{
    struct addrinfo hints = { .ai_family = resolve_family(family),
                              .ai_socktype = udp ? SOCK_DGRAM : SOCK_STREAM,
                              .ai_flags = AI_NUMERICSERV | (family == 6 ? AI_V4MAPPED : 0) };
    struct addrinfo *res, *ai;
    char service[16];
    int n = 0, rc;

    if (!host || !*host || port < 0 || port > 65535)
        return -EINVAL;
    snprintf(service, sizeof(service), "%d", port);
    errno = 0;
    rc = getaddrinfo(host, service, &hints, &res);
    if (rc != 0) {
        rc = pl_net_gai_errno(rc, errno);
        /* a name with addresses of the other family only: say so */
        if (rc == -ENXIO && family && pl_net_resolve(host, port, udp, 0, NULL, 0) > 0)
            return -EAFNOSUPPORT;
        return rc;          /* the callers say "cannot resolve" for -ENXIO */
    }
    for (ai = res; ai; ai = ai->ai_next) {
        if (n < cap) {
            memcpy(out[n].storage, ai->ai_addr, ai->ai_addrlen);
            out[n].len = ai->ai_addrlen;
        }
        n++;
    }
    freeaddrinfo(res);
    return n;
}

static const struct sockaddr *net_sockaddr(const pl_net_addr_t *addr)
{
    return (const struct sockaddr *)addr->storage;
}

/* Is sa, which host resolved to, the wildcard address without host
 * spelling one out?  getaddrinfo takes inet_aton's short forms, so "0",
 * "0x0" and "0.0" are 0.0.0.0: a port or a count in the wrong place would
 * listen on every interface.  Only a full numeric address (inet_pton's) is
 * taken as asking for the wildcard.  (A UCX listener asks it too.) */
bool pl_net_sockaddr_unasked_wildcard(const char *host, const struct sockaddr *sa)
{
    unsigned char bin[sizeof(struct in6_addr)];
    bool any;

    if (sa->sa_family == AF_INET)
        any = ((const struct sockaddr_in *)(const void *)sa)->sin_addr.s_addr == htonl(INADDR_ANY);
    else if (sa->sa_family == AF_INET6)
        any = IN6_IS_ADDR_UNSPECIFIED(&((const struct sockaddr_in6 *)(const void *)sa)->sin6_addr);
    else
        any = false;
    if (!any)
        return false;
    return inet_pton(AF_INET, host, bin) != 1 && inet_pton(AF_INET6, host, bin) != 1;
}

int pl_net_unasked_wildcard(const char *host, const pl_net_addr_t *addr)
{
    return pl_net_sockaddr_unasked_wildcard(host, net_sockaddr(addr)) ? 1 : 0;
}

static int bound_socket(const pl_net_addr_t *addr, int socktype)
{
    int one = 1, fd = socket(net_sockaddr(addr)->sa_family, socktype | SOCK_CLOEXEC, 0);

    if (fd < 0)
        return -errno;
    if (socktype == SOCK_STREAM)
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (bind(fd, net_sockaddr(addr), addr->len) < 0) {
        int rc = -errno;
        close(fd);
        return rc;
    }
    return fd;
}

int pl_net_tcp_listen(const pl_net_addr_t *addr, int backlog)
{
    int fd = bound_socket(addr, SOCK_STREAM);

    if (fd < 0)
        return fd;
    if (listen(fd, backlog) < 0) {
        int rc = -errno;
        close(fd);
        return rc;
    }
    return fd;
}

int pl_net_udp_bind(const pl_net_addr_t *addr)
{
    return bound_socket(addr, SOCK_DGRAM);
}

/* "host:port" or "[v6]:port" of an address. */
static void addr_text(const struct sockaddr_storage *ss, char *out, int cap)
{
    char ip[INET6_ADDRSTRLEN] = "?";

    if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *a = (const struct sockaddr_in *)ss;
        inet_ntop(AF_INET, &a->sin_addr, ip, sizeof(ip));
        snprintf(out, (size_t)cap, "%s:%d", ip, ntohs(a->sin_port));
    } else if (ss->ss_family == AF_INET6) {
        const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)ss;
        char zone[IF_NAMESIZE + 1] = "";

        inet_ntop(AF_INET6, &a->sin6_addr, ip, sizeof(ip));
        /* a link-local address means nothing without its interface: a
         * reply to "fe80::1" alone has no way out */
        if (a->sin6_scope_id != 0 && if_indextoname(a->sin6_scope_id, zone + 1))
            zone[0] = '%';
        snprintf(out, (size_t)cap, "[%s%s]:%d", ip, zone, ntohs(a->sin6_port));
    } else {
        snprintf(out, (size_t)cap, "?");
    }
}

void pl_net_addr_text(const pl_net_addr_t *addr, char *out, int cap)
{
    struct sockaddr_storage ss;

    memcpy(&ss, addr->storage, sizeof(ss));
    addr_text(&ss, out, cap);
}

/* The local (which 0) or peer (which 1) address of a socket as text. */
int pl_net_name(int fd, int which, char *out, int cap)
{
    struct sockaddr_storage ss;
    socklen_t len = sizeof(ss);
    int rc = which ? getpeername(fd, (struct sockaddr *)&ss, &len)
                   : getsockname(fd, (struct sockaddr *)&ss, &len);

    if (rc < 0)
        return -errno;
    addr_text(&ss, out, cap);
    return 0;
}

int pl_net_local_port(int fd)
{
    struct sockaddr_storage ss;
    socklen_t len = sizeof(ss);

    if (getsockname(fd, (struct sockaddr *)&ss, &len) < 0)
        return -errno;
    if (ss.ss_family == AF_INET)
        return ntohs(((struct sockaddr_in *)&ss)->sin_port);
    return ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
}

int pl_net_family(int fd)
{
    struct sockaddr_storage ss;
    socklen_t len = sizeof(ss);

    if (getsockname(fd, (struct sockaddr *)&ss, &len) < 0)
        return -errno;
    return ss.ss_family == AF_INET6 ? 6 : 4;
}

int pl_net_nodelay(int fd)
{
    int one = 1;

    return setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) < 0 ? -errno : 0;
}

/* TCP keepalive on fd: probes after idle seconds without traffic, every
 * interval seconds, count of them unanswered end the connection
 * (ETIMEDOUT); idle 0 turns it off.  (No TCP_USER_TIMEOUT to bound sent
 * data waiting for its acknowledgement as well: it also ends a connection
 * whose live peer does not read for that long, a zero window.) */
int pl_net_keepalive(int fd, int idle, int interval, int count)
{
    int on = idle > 0;

    if (on && (setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof(idle)) < 0 ||
               setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &interval, sizeof(interval)) < 0 ||
               setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &count, sizeof(count)) < 0))
        return -errno;
    if (setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &on, sizeof(on)) < 0)
        return -errno;
    return 0;
}

/* An op on socket fd, which the op records (not the op's to close): a
 * close of the socket while the op is still the kernel's, or still waits
 * for its submit, then sees it (uring_fd_busy, uring_fd_closing).  Without
 * it a close after the run ended closed the number at once, and the parked
 * recv, submitted when the runtime ran again, read whatever socket had
 * been given that number meanwhile. */
static int start_on_socket(pl_uring_t *u, uint32_t slot, uint32_t gen, int fd,
                           struct io_uring_sqe **sqe_out)
{
    return uring_op_begin(u, slot, gen, OP_OTHER, fd, 0, 0, sqe_out);
}

int pl_uring_accept(pl_uring_t *u, uint32_t slot, uint32_t gen, int fd)
{
    struct io_uring_sqe *sqe;
    int i = start_on_socket(u, slot, gen, fd, &sqe);

    if (i < 0)
        return i;
    io_uring_prep_accept(sqe, fd, NULL, NULL, SOCK_CLOEXEC);
    uring_op(u, (uint32_t)i)->fd_owner = FD_RESULT;
    return uring_op_queue(u, (uint32_t)i, sqe);
}

/* A socket for addr in *fd_out (the caller closes it on failure) and the
 * connect op; the kernel copies the address when it takes the SQE, but the
 * op slot holds it anyway.  One address per op: the caller tries the next
 * of a name's addresses when this one fails. */
int pl_uring_connect(pl_uring_t *u, uint32_t slot, uint32_t gen, const pl_net_addr_t *addr,
                     int *fd_out)
{
    struct io_uring_sqe *sqe;
    struct uring_op *op;
    int i;

    *fd_out = socket(net_sockaddr(addr)->sa_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (*fd_out < 0)
        return -errno;
    i = uring_start_other(u, slot, gen, &sqe);
    if (i < 0)
        return i;
    op = uring_op(u, (uint32_t)i);
    memcpy(&op->peer, addr->storage, sizeof(op->peer));
    op->fd = *fd_out;       /* the task's once it takes the result, else the op closes it */
    op->fd_owner = FD_OP;
    io_uring_prep_connect(sqe, *fd_out, (struct sockaddr *)&op->peer, addr->len);
    return uring_op_queue(u, (uint32_t)i, sqe);
}

int pl_uring_send(pl_uring_t *u, uint32_t slot, uint32_t gen, int fd, const void *data, uint32_t len)
{
    struct io_uring_sqe *sqe;
    int i = uring_op_begin(u, slot, gen, OP_SEND, fd, len, 0, &sqe);

    if (i < 0)
        return i;
    uring_op(u, (uint32_t)i)->addr = (char *)data;
    io_uring_prep_send(sqe, fd, data, len, MSG_NOSIGNAL);
    return uring_op_queue(u, (uint32_t)i, sqe);
}

int pl_uring_recv(pl_uring_t *u, uint32_t slot, uint32_t gen, int fd, void *buf, uint32_t len)
{
    struct io_uring_sqe *sqe;
    int i = start_on_socket(u, slot, gen, fd, &sqe);

    if (i < 0)
        return i;
    io_uring_prep_recv(sqe, fd, buf, len, 0);
    return uring_op_queue(u, (uint32_t)i, sqe);
}

int pl_uring_sock_shutdown(pl_uring_t *u, uint32_t slot, uint32_t gen, int fd, int how)
{
    if (how != SHUT_RD && how != SHUT_WR && how != SHUT_RDWR)
        return -EINVAL;
    START_ON_FD(fd, io_uring_prep_shutdown(sqe, fd_of_op, how));
}

/* A datagram to an address; the message header lives in the op slot. */
int pl_uring_sendto(pl_uring_t *u, uint32_t slot, uint32_t gen, int fd, const void *data,
                    uint32_t len, const pl_net_addr_t *to)
{
    struct io_uring_sqe *sqe;
    struct uring_op *op;
    int i = start_on_socket(u, slot, gen, fd, &sqe);

    if (i < 0)
        return i;
    op = uring_op(u, (uint32_t)i);
    memcpy(&op->peer, to->storage, sizeof(op->peer));
    op->iov = (struct iovec){ .iov_base = (void *)data, .iov_len = len };
    op->msg = (struct msghdr){ .msg_name = &op->peer, .msg_namelen = to->len,
                               .msg_iov = &op->iov, .msg_iovlen = 1 };
    io_uring_prep_sendmsg(sqe, fd, &op->msg, MSG_NOSIGNAL);
    return uring_op_queue(u, (uint32_t)i, sqe);
}

/* A datagram and, once complete, its sender (pl_uring_op_peer).  The result
 * is the datagram's length, which is more than len when it did not fit. */
int pl_uring_recvfrom(pl_uring_t *u, uint32_t slot, uint32_t gen, int fd, void *buf, uint32_t len)
{
    struct io_uring_sqe *sqe;
    struct uring_op *op;
    int i = start_on_socket(u, slot, gen, fd, &sqe);

    if (i < 0)
        return i;
    op = uring_op(u, (uint32_t)i);
    memset(&op->peer, 0, sizeof(op->peer));
    op->iov = (struct iovec){ .iov_base = buf, .iov_len = len };
    op->msg = (struct msghdr){ .msg_name = &op->peer, .msg_namelen = sizeof(op->peer),
                               .msg_iov = &op->iov, .msg_iovlen = 1 };
    /* MSG_TRUNC: the result is the datagram's whole length, so that a
     * datagram longer than the buffer is reported, not cut silently */
    io_uring_prep_recvmsg(sqe, fd, &op->msg, MSG_TRUNC);
    return uring_op_queue(u, (uint32_t)i, sqe);
}

/* The sender of a finished recvfrom, before its result is taken. */
int pl_uring_op_peer(pl_uring_t *u, int i, char *out, int cap)
{
    if (i < 0 || (uint32_t)i >= u->nops || uring_op(u, (uint32_t)i)->state != OP_DONE)
        return -ESRCH;
    addr_text(&uring_op(u, (uint32_t)i)->peer, out, cap);
    return 0;
}

/* Cancel every operation in flight on fd, then close it (an op holds its
 * own reference to the file, so close alone would not end a pending accept
 * or recv; their tasks get -ECANCELED).  One op to wait for, the close:
 * the cancel goes ahead of it, hard-linked so that the close follows
 * whatever the cancel found, and a task killed while it waits cannot leave
 * the socket open (the close runs at its issue; cancelling it is too late).
 *
 * With many ops in flight in the ring, each op on fd is cancelled by its
 * own user_data instead, right behind the close (the same submit, in order):
 * Linux's cancel by fd (IORING_ASYNC_CANCEL_FD) walks every poll request
 * of the ring, again for each one it cancels, in one io_uring_enter with
 * no preemption point.  Closing 8,000 sockets that each had a task parked
 * in recv took 1.4 s in the kernel (172 us a close), one socket with
 * 16,000 parked receivers 2.4 s, and more tripped the soft-lockup
 * watchdog; a cancel by user_data is a hash lookup. */
#define CANCEL_BY_FD_MAX 64

int pl_uring_close_socket(pl_uring_t *u, uint32_t slot, uint32_t gen, int fd)
{
    struct io_uring_sqe *cancel;
    bool pair;
    int rc;

    if (u->in_flight > CANCEL_BY_FD_MAX) {
        /* the close first: one that cannot start (no op slot, no SQE)
         * leaves the socket open, and its ops must go on; once it is
         * queued, the cancels follow it (the ops hold their own reference
         * to the file, and ops on a closing fd are not continued) */
        rc = pl_uring_close(u, slot, gen, fd);
        if (rc >= 0)
            uring_cancel_each_on_fd(u, fd);
        return rc;
    }
    /* (rests of short transfers due would take the free SQEs first: sent
     * with the flush, or, refused, they leave none for the pair) */
    if (io_uring_sq_space_left(&u->ring) < 2 || u->rests_due > 0)
        pl_uring_flush(u);
    pair = u->rests_due == 0 && io_uring_sq_space_left(&u->ring) >= 2;   /* in one submit */
    cancel = uring_get_sqe(u);
    if (!cancel)
        return -PL_ESQFULL;
    io_uring_prep_cancel_fd(cancel, fd, IORING_ASYNC_CANCEL_ALL);
    io_uring_sqe_set_data64(cancel, CANCEL_TAG);
    if (pair) {
        cancel->flags |= IOSQE_IO_HARDLINK;
    } else {
        /* a ring of one entry: the cancel goes first, alone (a link may not
         * span two submits).  Refused, it is taken back: after a close that
         * then finds no SQE (-PL_ESQFULL: the file stays open, to close
         * again) it would still go out, and end other tasks' ops on a file
         * nobody closed.  (With SQPOLL the submit hands it over.) */
        pl_uring_flush(u);
        if (!u->opts.sqpoll && io_uring_sq_ready(&u->ring) > 0) {
            uring_sqe_void(cancel);
            return -PL_ESQFULL;
        }
    }
    rc = pl_uring_close(u, slot, gen, fd);
    if (rc < 0 && pair)     /* no close (no op slot): no cancel either, the socket stays as it was */
        uring_sqe_void(cancel);
    return rc;
}
