/*
 * ucx_sock.c - a stand-in for libucs's two non-blocking socket sends,
 * which libuct's tcp transport calls, to keep UCX 1.13 from aborting the
 * process when a peer goes away.
 *
 * The abort (tcp_ep.c:939, `ep->flags & UCT_TCP_EP_FLAG_PUT_TX_WAITING_ACK`):
 * a tcp endpoint of ours waits for the acknowledgement of a PUT (the empty
 * one a flush sends after any send, or a graceful close's flush), and one
 * recv() brings, from a peer that then closed its socket (its worker
 * closed, or it was killed), a message whose handling sends back at once
 * (the peer's own flush PUT, which UCX acknowledges on the spot; the last
 * fragment of a rendezvous, answered by UCX's ATS) and, after it, the
 * acknowledgement we wait for.  The send back fails (EPIPE, ECONNRESET):
 * uct_tcp_ep_handle_disconnected clears the flag (tcp_ep.c:979-984) while
 * uct_tcp_ep_progress_am_rx goes on parsing the same buffer (its loop,
 * tcp_ep.c:1391; the peer's PUT acknowledged at tcp_ep.c:1300) and meets
 * the acknowledgement (tcp_ep.c:1434): the assertion.
 * Upstream still has it (2026); nothing in UCX's configuration avoids it.
 *
 * Such a failure is reported as "try again" instead (nothing sent, as when
 * the socket buffer is full): the parse goes on with the endpoint intact,
 * the acknowledgement completes the flush (rightly: the peer received all
 * that preceded it), the unsent bytes stay in UCX's buffer, and UCX finds
 * the failure as it reads on: the recv of the socket's end of file or
 * reset fails the endpoint as a send would have.  (That way also avoids
 * UCX's other abort there, uct_iface.h:884 `comp->count > 0`: a failed
 * zero-copy send's completion invoked twice, by the purge of
 * uct_tcp_ep_handle_send_err and again by uct_tcp_ep_sendv, tcp_ep.c:1062-1063.)
 * The retried send fails again while the recv has the peer's last data
 * to read first: a socket is deferred at most SOCK_DEFER_MAX times, then
 * its errors go through (never a loop, however many sockets fail at once:
 * each has a count of its own).  A socket is told from a later one with
 * the same descriptor number by its inode.  Only the error path takes the
 * lock and the fstat; a send that works costs a branch.
 *
 * libuct calls these through its PLT, and libpluvio.so (loaded before
 * libucs, which it depends on) comes first in its lookup scope: the
 * stand-ins are found before libucs's, which they call (found with
 * dlsym on libucs itself: loaded by the FFI, libpluvio is out of
 * RTLD_NEXT's reach).  A process that had libuct loaded before Pluvio
 * (whatever the scope: libuct's was set then, without libpluvio), or
 * libucs in the global scope, which is searched first, keeps libucs's:
 * there UCX 1.13 can still abort.
 */
#include <dlfcn.h>
#include <pthread.h>
#include <sys/stat.h>
#include <sys/uio.h>

#include <ucs/sys/sock.h>
#include <ucs/type/status.h>

#include "ucx_internal.h"

typedef ucs_status_t (*send_nb_fn)(int fd, const void *data, size_t *length_p);
typedef ucs_status_t (*sendv_nb_fn)(int fd, struct iovec *iov, size_t iov_cnt, size_t *length_p);

/* How many failures of the socket on each descriptor number were
 * deferred, and that socket's inode (a later socket on the number has
 * another: sockets all live on sockfs, whose inode numbers are never 0,
 * the zero-filled entry's).  Indexed by the number itself, so that no two
 * sockets share a count (sharing, they reset each other's: no bound); in
 * bss, only the pages of numbers whose sends failed are ever touched.  A
 * socket numbered SOCK_FDS or above fails as libucs says. */
#define SOCK_FDS 65536
#define SOCK_DEFER_MAX 1024

static struct {
    ino_t ino;
    unsigned times;
} sock_deferred[SOCK_FDS];
static pthread_mutex_t sock_deferred_lock = PTHREAD_MUTEX_INITIALIZER;

static send_nb_fn real_send_nb;
static sendv_nb_fn real_sendv_nb;
static pthread_once_t sock_real_once = PTHREAD_ONCE_INIT;

/* libucs is the library ucs_status_string, which we call, comes from. */
static void sock_find_real(void)
{
    Dl_info info;
    void *ucs;

    if (!dladdr((void *)ucs_status_string, &info) || !info.dli_fname)
        return;
    ucs = dlopen(info.dli_fname, RTLD_LAZY | RTLD_NOLOAD);
    if (!ucs)
        return;
    /* (POSIX's way from a data pointer to a function pointer) */
    *(void **)&real_send_nb = dlsym(ucs, "ucs_socket_send_nb");
    *(void **)&real_sendv_nb = dlsym(ucs, "ucs_socket_sendv_nb");
    dlclose(ucs);               /* (NOLOAD: only drops the count it took) */
}

/* Whether a failed send on fd is to be reported as "try again": its
 * connection was closed by the peer (EPIPE, ECONNRESET: libucs says
 * UCS_ERR_CONNECTION_RESET for both), and this socket has not had
 * SOCK_DEFER_MAX such failures deferred yet (once it has, its count stays:
 * every later failure goes through too). */
static bool sock_defer(int fd, ucs_status_t st)
{
    struct stat sb;
    bool defer = true;

    if (st != UCS_ERR_CONNECTION_RESET || fd < 0 || fd >= SOCK_FDS || fstat(fd, &sb) != 0)
        return false;
    pthread_mutex_lock(&sock_deferred_lock);
    if (sock_deferred[fd].ino != sb.st_ino) {
        sock_deferred[fd].ino = sb.st_ino;
        sock_deferred[fd].times = 1;
    } else if (sock_deferred[fd].times < SOCK_DEFER_MAX) {
        sock_deferred[fd].times++;
    } else {
        defer = false;
    }
    pthread_mutex_unlock(&sock_deferred_lock);
    return defer;
}

static ucs_status_t sock_sent(int fd, ucs_status_t st, size_t *length_p)
{
    if (st == UCS_OK || !sock_defer(fd, st))
        return st;
    *length_p = 0;
    return UCS_ERR_NO_PROGRESS;
}

ucs_status_t ucs_socket_send_nb(int fd, const void *data, size_t *length_p)
{
    pthread_once(&sock_real_once, sock_find_real);
    if (!real_send_nb)
        return UCS_ERR_UNSUPPORTED;
    return sock_sent(fd, real_send_nb(fd, data, length_p), length_p);
}

ucs_status_t ucs_socket_sendv_nb(int fd, struct iovec *iov, size_t iov_cnt, size_t *length_p)
{
    pthread_once(&sock_real_once, sock_find_real);
    if (!real_sendv_nb)
        return UCS_ERR_UNSUPPORTED;
    return sock_sent(fd, real_sendv_nb(fd, iov, iov_cnt, length_p), length_p);
}
