/*
 * ucx_internal.h - state shared by ucx.c (context, worker, op slots),
 * ucx_reactor.c (the reactor), ucx_conn.c (endpoints), ucx_listener.c
 * (listeners), ucx_addr.c (addresses), ucx_log.c (UCX's log) and ucx_am.c
 * (Active Messages, tags, streams).
 */
#ifndef PL_UCX_INTERNAL_H
#define PL_UCX_INTERNAL_H

#include <stdbool.h>
#include <sys/socket.h>
#include <ucp/api/ucp.h>
#include <ucs/debug/log_def.h>

#include "internal.h"

#define UCX_MAX_ENDPOINTS 4096
#define UCX_MAX_LISTENERS 64
#define UCX_MAX_STREAMS 256
#define UCX_OPS_PER_CHUNK 256
#define UCX_MAX_OP_CHUNKS (PL_UCX_MAX_OPS / UCX_OPS_PER_CHUNK)
#define UCX_PEER_LEN 64
#define UCX_LOG_HELD 4

/* Where in UCX's source a log line comes from, and its level. */
struct ucx_log_place {
    const char *file, *function;
    unsigned line;
    ucs_log_level_t level;
    const ucs_log_component_config_t *comp;
};

/* UCX log lines held during a call whose failure we return (ucx.c). */
struct ucx_log_line {
    struct ucx_log_place at;
    char text[256];
};

struct ucx_log_hold {
    int n;
    const char *drop;       /* a line to drop, not hold (NULL: none) */
    struct ucx_log_line lines[UCX_LOG_HELD];
};

void ucx_log_hold(struct ucx_log_hold *h, const char *drop);
void ucx_log_release(struct ucx_log_hold *h, bool failed);

struct pl_ucx_context {
    ucp_context_h ucp;
    size_t request_size;    /* bytes UCX keeps in front of each request */
    int workers;            /* live workers: the context outlives them */
    bool released;          /* its owner let go: free with the last worker */
    bool wakeup;            /* workers have event fds (UCP_FEATURE_WAKEUP) */
    bool unified;           /* UCX_UNIFIED_MODE: addresses only UCX can read (worker_address_valid) */
    bool keepalive;         /* Pluvio turned TCP's keepalive off for UCX's own (keepalive_both_ways) */
    char net_devices[256];  /* UCX_NET_DEVICES as UCX read it ("all", "lo,eth0"); "" if set empty,
                             * too long or not read back (no listener check: every_device) */
};

enum ucx_op_state { UOP_FREE, UOP_IN_FLIGHT, UOP_DONE, UOP_ABANDONED };

/* An operation slot.  UCX's own request bytes sit just in front of it
 * (user-allocated requests), so a slot never moves: slots live in chunks. */
struct ucx_op {
    uint32_t index;
    uint32_t gen;
    uint8_t state;
    bool passive;           /* waits for a peer (tag receive): needs no progress of ours */
    bool orphaned;          /* a tag receive cancelled as no peer was left: ENOTCONN */
    uint8_t handover;       /* a tag receive: UCX_HANDOVER_CANCEL, _REFUSED or 0
                             * (ucx_am.c's tag_hand_over) */
    bool held;              /* a rescue op, DONE with a message, that waits for the
                             * poll's ucx_tags_hand_over (and, there, for receives
                             * killed before it): not settled till then */
    bool rescue;            /* an abandoned tag receive: it ends DONE, not freed, for
                             * pl_ucx_op_take (a message it matched is not lost) */
    uint8_t sends;          /* a send the stats count once it succeeds: UCX_SENDS_AM, _TAG or 0;
                             * its bytes wait in length */
    uint32_t task_slot, task_gen;
    int32_t status;
    size_t length;
    uint64_t sender_tag;
    /* a tag receive's: what it matches, its memory, and the order UCX
     * matches receives in */
    uint64_t want_tag, want_mask;
    void *buf;
    size_t cap;
    uint64_t posted;
    int ep;                 /* endpoint it runs on, -1, UCX_OP_EP_CLOSE or UCX_OP_PULL */
    struct pl_ucx_worker *w;
    uint32_t next_free;
};

enum { UCX_SENDS_AM = 1, UCX_SENDS_TAG = 2 };

/* A tag receive being cancelled to be handed a message a killed one had
 * matched; or one found to have matched a message of its own already (it
 * ends as usual, and is not asked again). */
enum { UCX_HANDOVER_CANCEL = 1, UCX_HANDOVER_REFUSED = 2 };

/* The ep of an op that closes an endpoint (its entry is gone by then). */
#define UCX_OP_EP_CLOSE (-2)
/* The ep of an AM rendezvous pull (pl_ucx_msg_recv): it runs on the
 * endpoint the message came on, which is not known (see w->pulls). */
#define UCX_OP_PULL (-3)

/* EP_CLOSING: a graceful close waits for the endpoint's operations (a
 * flush) before it closes it in UCX; new operations are refused.
 * EP_ABORTING: a connect_socket given up in its wire-up, closed once that
 * is over (pl_ucx_ep_abort); nothing refers to it any more. */
enum ucx_ep_state { EP_FREE, EP_OPEN, EP_FAILED, EP_CLOSING, EP_ABORTING };

/* An endpoint table entry.  An owned entry lives until its endpoint is
 * closed.  A reply endpoint's (not owned: UCX made the ucp endpoint for a
 * connect_addr peer and frees it) lives while holders refer to it: the
 * Lua objects that answer on it (pl_ucx_msg_reply_ep, pl_ucx_ep_unhold).
 * Held messages keep the ucp endpoint itself and make an entry again
 * when taken, so an entry never outlives every message that gave it. */
struct ucx_ep {
    ucp_ep_h ep;
    uint16_t gen;
    uint8_t state;
    bool owned;             /* false: a reply endpoint UCX handed us */
    uint32_t holds;         /* reply endpoint objects on it; a reply endpoint's entry is freed at 0 */
    int32_t error;          /* -errno once failed */
    bool closer_waits;      /* a graceful close waits for its ops to end */
    bool dropped;           /* its Lua object was collected (pl_ucx_ep_drop) */
    bool p2p_peer;          /* connect_addr with peer_errors: its wire-up is let finish at close */
    bool connecting;        /* connect_socket's wire-up: no op on it has ended yet */
    bool peer_closed;       /* connect_addr to a worker of this reactor that was closed since */
    uint64_t local_peer;    /* connect_addr without peer_errors: that worker's serial, else 0 */
    int64_t abort_at;       /* EP_ABORTING: closed by then at the latest (pl_clock_ns) */
    uint32_t closer_slot, closer_gen;
    char peer[UCX_PEER_LEN];
};

struct ucx_conn {           /* a connection request waiting for accept() */
    ucp_conn_request_h req;
    char peer[UCX_PEER_LEN];
};

struct ucx_waiter {
    uint32_t slot, gen;
};

/* Tasks parked on one thing, first come first served: a stream's readers
 * (PL_WAIT_STREAM), a listener's acceptors (PL_WAIT_ACCEPT); each parks
 * with (kind, arg), arg the thing's serial (ucx_serial), which the queue
 * checks before it wakes one.  A FIFO ring. */
struct ucx_waitq {
    struct ucx_waiter *ring;
    uint32_t cap, head, len;
    int kind;
    uint32_t serial;
};
uint32_t ucx_serial(void);
void ucx_waitq_init(struct ucx_waitq *q, int kind);
int ucx_waitq_push(struct ucx_waitq *q, uint32_t slot, uint32_t gen);
void ucx_waitq_wake_one(pl_ucx_worker_t *w, struct ucx_waitq *q);
void ucx_waitq_wake_all(pl_ucx_worker_t *w, struct ucx_waitq *q);
void ucx_waitq_leave(pl_ucx_worker_t *w, struct ucx_waitq *q, uint32_t slot, uint32_t gen, bool more);
void ucx_waitq_free(struct ucx_waitq *q);

struct ucx_listener {
    ucp_listener_h l;
    struct pl_ucx_worker *w;
    int index;
    int port;
    char address[UCX_PEER_LEN];     /* as bound: "ip:port" or "[v6]:port" */
    struct sockaddr_storage bound;  /* the same, for ucx_listeners_settle */
    bool open;
    /* closed, its UCX listener kept until no connection it took can still
     * call it (ucx_listeners_settle) */
    bool closing;
    int64_t retry_at, retry_ns;
    struct ucx_conn *pending;   /* FIFO ring */
    uint32_t cap, head, len;
    struct ucx_waitq acceptors;
};

/* A received message: held by its stream, then taken (handed to Lua by
 * pl_ucx_stream_next) until its data is received or it is released. */
#define UCX_HDR_CLASSES 7       /* header blocks of 256 B to 16 KiB; larger ones are malloc'd */

struct ucx_hdr_block {          /* a freed header block, linked through its first bytes */
    struct ucx_hdr_block *next;
};

struct ucx_msg {
    uint32_t gen;
    bool used;
    bool taken;             /* handed to the task owner_slot, owner_gen */
    bool rndv;
    bool data_held;         /* eager data kept by UCX (UCS_INPROGRESS) */
    void *data;             /* eager data or rendezvous descriptor */
    size_t length;
    ucp_ep_h reply_ep;      /* the sender's, NULL once closed or failed (reply_err says so) */
    int32_t reply_err;      /* 0, or -errno: the reply endpoint is gone */
    size_t header_len;
    char *header_heap;      /* when larger than the inline room, else NULL; */
    int8_t header_class;    /* header_heap's size class, or -1: malloc'd to size */
    char header_inline[128];    /* never point at this: the array moves */
    uint32_t owner_slot, owner_gen;
    uint32_t next;          /* next message of the stream, or free list */
};


/* Messages for an AM id with no open stream are held, up to this many,
 * for the stream opened next for that id; later ones are dropped (and
 * counted).  They do not pause the worker as an open stream's window does:
 * a peer sending to an id nobody reads must not stall every other one. */
#define UCX_UNCLAIMED_HOLD 64

/* The argument of the AM handler of one id (registered for every id when
 * the worker is made: UCX 1.13 crashes on an id with no handler below the
 * highest one registered). */
struct ucx_amid {
    struct pl_ucx_worker *w;
    unsigned id;
};

struct ucx_stream {
    bool open;                  /* false: holds messages nobody opened a stream for */
    unsigned id;
    uint32_t window;
    uint32_t head, tail, len;   /* message handles, linked through next */
    struct ucx_waitq readers;   /* its serial: unique in the process, set when opened */
    struct pl_ucx_worker *w;
};

struct pl_ucx_worker {
    pl_ucx_context_t *ctx;
    char listen_why[768];   /* why pl_ucx_listen said ENODEV */
    ucp_worker_h ucp;
    int efd;
    pl_runtime_t *rt;       /* runtime of the reactor progressing it */
    struct pl_ucx_reactor *reactor;     /* progressing it, or NULL */
    bool address_shared;    /* anyone holding address() may send to it */
    bool addr_connected;    /* it made an endpoint by connect_addr (worker_quiesce) */
    uint64_t serial;        /* unique in the process (ucx_ep's local_peer) */
    void *addr;             /* UCX's part of address(), once handed out (connect_addr's lookup) */
    size_t addr_len;
    int8_t addr_layout;     /* address_extent reads this UCX's addresses: 1, not: -1, not known yet: 0 */
    bool watched;           /* its event fd is in the reactor's epoll set */
    uint32_t polls_awake;   /* reactor polls since it was last armed (ucx_poll) */
    int streams_full;       /* streams holding their window: progress pauses */
    size_t max_am_header;

    struct ucx_ep eps[UCX_MAX_ENDPOINTS];
    int neps;               /* high-water mark of used endpoint slots */
    int max_eps;            /* entries it may use (max_endpoints), at most UCX_MAX_ENDPOINTS */
    struct ucx_listener listeners[UCX_MAX_LISTENERS];

    char *op_chunks[UCX_MAX_OP_CHUNKS];
    int nchunks;
    size_t op_stride;
    uint32_t free_op, nops, in_flight;
    uint32_t abandoned_settled;     /* abandoned ops freed so far (wraps) */
    uint32_t passive_in_flight;     /* of in_flight: tag receives */
    uint32_t pulls;         /* of in_flight: AM rendezvous pulls, abandoned ones too */
    uint32_t closers;       /* endpoints whose close waits for their ops */
    uint32_t reap;          /* dropped endpoints that failed since, or aborts due (ucx_eps_reap) */
    uint32_t aborting;      /* entries in EP_ABORTING */
    bool listener_dropped;  /* a listener was closed by its collection: wake the readers */
    bool tags_recheck;      /* a peer failed (in a UCX callback): ucx_tags_orphan due */
    bool tags_rescued;      /* a tag receive was killed, or a killed one ended (in a
                             * UCX callback): ucx_tags_hand_over due */
    uint64_t tags_posted;   /* tag receives posted so far (struct ucx_op's posted) */
    uint32_t listeners_closing;     /* of listeners: closing (ucx_listeners_settle) */

    struct ucx_msg *msgs;
    uint32_t nmsgs, free_msg, held;
    uint32_t taken;         /* of those held: taken by tasks (handed to Lua) */
    /* freed blocks for headers larger than a message's inline room, by size
     * class (256 B << class), each linked through its first bytes: a header
     * costs no malloc once the worker has held that many */
    struct ucx_hdr_block *hdr_free[UCX_HDR_CLASSES];
    uint32_t header_blocks;         /* allocated, pooled or not */

    struct ucx_stream *streams[UCX_MAX_STREAMS];
    struct ucx_amid amids[UCX_MAX_STREAMS];
    bool closing;           /* pl_ucx_worker_close: arrivals are dropped */

    struct ucx_op *inline_op;   /* finished by its starting call: no wake (pl_ucx_msg_recv) */
    pl_ucx_stats_t stats;
};

#define UCX_NONE UINT32_MAX

int pl_ucx_errno(ucs_status_t status);
/* Slot index of w, which must exist (index < w->nops); ucx_op_get
 * checks.  The ucp request's private part comes first (request_size). */
static inline struct ucx_op *ucx_op_at(pl_ucx_worker_t *w, uint32_t index)
{
    char *chunk = w->op_chunks[index / UCX_OPS_PER_CHUNK];

    return (struct ucx_op *)(chunk + (index % UCX_OPS_PER_CHUNK) * w->op_stride +
                             w->ctx->request_size);
}

struct ucx_op *ucx_op_get(pl_ucx_worker_t *w, uint32_t index);
int ucx_op_new(pl_ucx_worker_t *w, uint32_t slot, uint32_t gen, int ep, struct ucx_op **out);
void ucx_op_free(pl_ucx_worker_t *w, struct ucx_op *op);
void ucx_op_finish(struct ucx_op *op, ucs_status_t status);
int ucx_fd_headroom(int n);
/* n, or fewer when UCX's limit of async handlers per worker holds fewer
 * connections (UCX_ASYNC_MAX_EVENTS). */
int ucx_max_endpoints(int n);
int ucx_op_result(pl_ucx_worker_t *w, struct ucx_op *op, ucs_status_ptr_t sp);
void ucx_op_param(ucp_request_param_t *p, struct ucx_op *op);
void ucx_op_param_recv(ucp_request_param_t *p, struct ucx_op *op);
struct ucx_ep *ucx_ep_get(pl_ucx_worker_t *w, int ep);
/* An op on endpoint ep ended while some close waits (w->closers > 0). */
void ucx_ep_op_ended(pl_ucx_worker_t *w, int ep);
int ucx_ep_add(pl_ucx_worker_t *w, ucp_ep_h ep, bool owned, const char *peer);
/* Destroy the UCX listeners of closed ones that no connection can call
 * any more (ucx_listener.c): those whose retry time came (DUE), all (NOW), or
 * all of them whatever may call them (FORCE: the worker goes). */
enum ucx_settle { UCX_SETTLE_DUE, UCX_SETTLE_NOW, UCX_SETTLE_FORCE };
void ucx_listeners_settle(pl_ucx_worker_t *w, enum ucx_settle how);
/* Free the dropped endpoints that failed (w->reap > 0), outside UCX's
 * callbacks. */
void ucx_eps_reap(pl_ucx_worker_t *w);
int ucx_ep_lookup(pl_ucx_worker_t *w, ucp_ep_h ep);
bool ucx_ep_room(pl_ucx_worker_t *w);
void ucx_ep_error(void *arg, ucp_ep_h ep, ucs_status_t status);
int ucx_resolve(const char *host, int port, struct sockaddr_storage *ss, socklen_t *len);
void ucx_sockaddr_text(const struct sockaddr_storage *ss, char *out, size_t cap);
/* Whether addr may go to ucp_ep_create (ucx_addr.c): 0, -EINVAL (not a
 * whole worker address) or -EBADMSG (a sealed one changed since). */
int ucx_address_check(pl_ucx_worker_t *w, const uint8_t *a, size_t len);
int ucx_ep_open(pl_ucx_worker_t *w, int ep, struct ucx_ep **e);
int ucx_ep_op_new(pl_ucx_worker_t *w, int ep, uint32_t slot, uint32_t gen, struct ucx_ep **e,
                  struct ucx_op **op, ucp_request_param_t *p);
int ucx_wake(pl_ucx_worker_t *w, uint32_t slot, uint32_t gen);
void ucx_streams_wake_all(pl_ucx_worker_t *w);
bool ucx_worker_has_peers(pl_ucx_worker_t *w);
bool ucx_worker_over_window(const pl_ucx_worker_t *w);
unsigned ucx_reactor_progress_peers(pl_ucx_worker_t *w, const pl_runtime_t *rt, bool paused_too);
/* Whether an endpoint of a worker of w's reactor is still connecting
 * (connect_socket) to l's address. */
bool ucx_reactor_connecting_to(const pl_ucx_worker_t *w, const struct ucx_listener *l);
void ucx_reactor_remove_worker(pl_ucx_worker_t *w);
uint64_t ucx_reactor_local_worker(const pl_ucx_worker_t *w, const void *addr, size_t len);
void ucx_reactor_worker_closing(const pl_ucx_worker_t *w);
void ucx_eps_local_peer_closed(pl_ucx_worker_t *w, uint64_t serial);
void ucx_streams_free(pl_ucx_worker_t *w);
ucs_status_t ucx_am_handlers_init(pl_ucx_worker_t *w);
void ucx_msgs_forget_ep(pl_ucx_worker_t *w, ucp_ep_h ep, int err);
void ucx_msgs_free(pl_ucx_worker_t *w);
void ucx_header_blocks_free(pl_ucx_worker_t *w);
void ucx_tags_discard(pl_ucx_worker_t *w);
/* A peer went: if none is left, end the tag receives nothing matched yet
 * with -ENOTCONN (no message can come for them any more). */
void ucx_tags_orphan(pl_ucx_worker_t *w);
void ucx_tags_hand_over(pl_ucx_worker_t *w);

#endif /* PL_UCX_INTERNAL_H */
