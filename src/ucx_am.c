/*
 * ucx_am.c - Active Messages and tags: sends, receive streams and the
 * messages they hold.
 *
 * Receiving is pull-style.  The AM callback (inside ucp_worker_progress)
 * only records the message: eager data is kept by UCX without a copy
 * (UCS_INPROGRESS with UCP_AM_FLAG_PERSISTENT_DATA) and rendezvous data
 * stays with the sender as a descriptor until the reader pulls it into a
 * buffer of its choice (ucp_am_recv_data_nbx).  Nothing is dropped: a
 * stream holds what its reader has not taken, and once it holds its window
 * the reactor stops progressing the worker, which slows the sender.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "ucx_internal.h"

/* ---- sends --------------------------------------------------------------- */

/* Sends of at most this many bytes (header and data) first try to complete
 * at once, without an op slot: UCX tries its short protocol first anyway,
 * and one that fits needs no request.  Half the instructions of
 * libpluvio's part of an 8-byte send (callgrind).  Larger ones would only
 * pay the failed try: UCX's short limits are a few KiB at most. */
#define UCX_AM_IMM_MAX 1024

int pl_ucx_am_send(pl_ucx_worker_t *w, int ep, unsigned id, const void *header, size_t header_len,
                   const void *data, size_t data_len, int flags, uint32_t slot, uint32_t gen)
{
    ucp_request_param_t p;
    struct ucx_ep *e;
    struct ucx_op *op;
    uint32_t am_flags = ((flags & 1) ? UCP_AM_SEND_FLAG_REPLY : 0) |
                        ((flags & 2) ? UCP_AM_SEND_FLAG_EAGER : 0) |
                        ((flags & 4) ? UCP_AM_SEND_FLAG_RNDV : 0);
    int rc;

    if (header_len > w->max_am_header)
        return -EMSGSIZE;   /* UCX 1.13 would abort the process */
    if (header_len + data_len <= UCX_AM_IMM_MAX && !(flags & 4)) {
        /* (made once: zeroing a parameter block per send costs more than the rest) */
#define IMM(f) { .op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS | UCP_OP_ATTR_FLAG_FORCE_IMM_CMPL, .flags = (f) }
        static const ucp_request_param_t imm[4] = {
            IMM(0), IMM(UCP_AM_SEND_FLAG_REPLY), IMM(UCP_AM_SEND_FLAG_EAGER),
            IMM(UCP_AM_SEND_FLAG_REPLY | UCP_AM_SEND_FLAG_EAGER),
        };
#undef IMM
        ucs_status_ptr_t sp;

        rc = ucx_ep_open(w, ep, &e);
        if (rc < 0)
            return rc;
        sp = ucp_am_send_nbx(e->ep, id, header, header_len, data, data_len, &imm[flags & 3]);
        if (UCS_PTR_STATUS(sp) != UCS_ERR_NO_RESOURCE) {    /* (never a request) */
            if (sp == UCS_OK) {
                w->stats.am_sent++;
                w->stats.am_bytes_sent += (double)data_len;
            }
            return pl_ucx_errno(UCS_PTR_STATUS(sp));
        }
    }
    rc = ucx_ep_op_new(w, ep, slot, gen, &e, &op, &p);
    if (rc < 0)
        return rc;
    p.op_attr_mask |= UCP_OP_ATTR_FIELD_FLAGS;
    p.flags = am_flags;
    op->sends = UCX_SENDS_AM;
    op->length = data_len;
    return ucx_op_result(w, op, ucp_am_send_nbx(e->ep, id, header, header_len, data, data_len, &p));
}

/* ---- held messages ------------------------------------------------------- */

/* A worker holds at most 2^24 messages (each stream's window is at most
 * 2^20); a handle keeps 7 bits of its slot's generation. */
#define MSG_INDEX_BITS 24
#define MSG_INDEX_MASK ((1u << MSG_INDEX_BITS) - 1)
#define MSG_GEN_MASK 0x7fu

static int msg_alloc(pl_ucx_worker_t *w)
{
    uint32_t i;

    if (w->free_msg == UCX_NONE) {
        uint32_t n = w->nmsgs ? w->nmsgs * 2 : 64;
        struct ucx_msg *m;

        if (n > MSG_INDEX_MASK + 1)
            return -ENOMEM;     /* a handle has room for no more */
        m = realloc(w->msgs, sizeof(*m) * n);
        if (!m)
            return -ENOMEM;
        w->msgs = m;
        for (uint32_t k = n; k-- > w->nmsgs;) {
            m[k] = (struct ucx_msg){ .next = w->free_msg };
            w->free_msg = k;
        }
        w->nmsgs = n;
    }
    i = w->free_msg;
    w->free_msg = w->msgs[i].next;
    w->msgs[i].used = true;
    w->msgs[i].next = UCX_NONE;
    w->held++;
    return (int)i;
}

/* Message handles carry a generation so a stale handle is refused: the
 * slot's index in the low MSG_INDEX_BITS, the low bits of its generation
 * above (a handle is a non-negative int). */
static int msg_handle(pl_ucx_worker_t *w, uint32_t i)
{
    return (int)((w->msgs[i].gen & MSG_GEN_MASK) << MSG_INDEX_BITS | i);
}

static struct ucx_msg *msg_get(pl_ucx_worker_t *w, int h)
{
    uint32_t i = (uint32_t)h & MSG_INDEX_MASK;

    if (h < 0 || i >= w->nmsgs || !w->msgs[i].used ||
        (w->msgs[i].gen & MSG_GEN_MASK) != ((uint32_t)h >> MSG_INDEX_BITS))
        return NULL;
    return &w->msgs[i];
}

static const char *msg_header(const struct ucx_msg *m)
{
    return m->header_heap ? m->header_heap : m->header_inline;
}

/* A new block of size bytes, counted once it exists. */
static char *header_block_new(pl_ucx_worker_t *w, size_t size)
{
    char *b = malloc(size);

    if (b)
        w->header_blocks++;
    return b;
}

/* A block for a header of len bytes (more than the inline room), or NULL. */
static char *header_block(pl_ucx_worker_t *w, struct ucx_msg *m, size_t len)
{
    int c = 0;
    struct ucx_hdr_block *b;

    while (c < UCX_HDR_CLASSES && ((size_t)256 << c) < len)
        c++;
    if (c == UCX_HDR_CLASSES) {
        m->header_class = -1;
        return header_block_new(w, len);
    }
    m->header_class = (int8_t)c;
    b = w->hdr_free[c];
    if (!b)
        return header_block_new(w, (size_t)256 << c);
    w->hdr_free[c] = b->next;
    return (char *)b;
}

static void header_block_free(pl_ucx_worker_t *w, struct ucx_msg *m)
{
    if (!m->header_heap)
        return;
    if (m->header_class < 0) {
        free(m->header_heap);
        w->header_blocks--;
    } else {
        struct ucx_hdr_block *b = (struct ucx_hdr_block *)(void *)m->header_heap;
        b->next = w->hdr_free[m->header_class];
        w->hdr_free[m->header_class] = b;
    }
    m->header_heap = NULL;
}

/* The worker closes: the freed header blocks go back to the heap. */
void ucx_header_blocks_free(pl_ucx_worker_t *w)
{
    for (int c = 0; c < UCX_HDR_CLASSES; c++) {
        while (w->hdr_free[c]) {
            struct ucx_hdr_block *b = w->hdr_free[c];
            w->hdr_free[c] = b->next;
            free(b);
            w->header_blocks--;
        }
    }
}

/* Give UCX back what it kept for the message, and the slot to the pool. */
static void msg_free(pl_ucx_worker_t *w, struct ucx_msg *m)
{
    if (m->data_held || m->rndv)
        ucp_am_data_release(w->ucp, m->data);
    header_block_free(w, m);
    m->data_held = false;
    m->rndv = false;
    m->used = false;
    if (m->taken)
        w->taken--;
    m->taken = false;
    m->gen++;
    m->next = w->free_msg;
    w->free_msg = (uint32_t)(m - w->msgs);
    w->held--;
}

int pl_ucx_msg_info(pl_ucx_worker_t *w, int h, pl_ucx_msg_info_t *out)
{
    struct ucx_msg *m = msg_get(w, h);

    if (!m)
        return -EBADF;
    out->header = msg_header(m);
    out->header_length = (double)m->header_len;
    out->data_length = (double)m->length;
    out->rndv = m->rndv;
    out->can_reply = m->reply_ep != NULL || m->reply_err < 0;
    if (m->reply_ep)
        out->ep = ucx_ep_lookup(w, m->reply_ep);    /* -1: no entry (yet) */
    else
        out->ep = out->can_reply ? m->reply_err : -1;   /* why it cannot be answered */
    out->taken = (double)w->taken;
    return 0;
}

/* The endpoint to answer message h on, held for the caller (a reply
 * endpoint's entry goes with its last holder: pl_ucx_ep_unhold), or why it
 * cannot be answered.  Once per entry, not per message: a message whose
 * entry exists finds it in pl_ucx_msg_info. */
int pl_ucx_msg_reply_ep(pl_ucx_worker_t *w, int h)
{
    struct ucx_msg *m = msg_get(w, h);
    int ep;

    if (!m || (!m->reply_ep && m->reply_err == 0))
        return -EBADF;
    if (!m->reply_ep)
        return m->reply_err;
    ep = ucx_ep_add(w, m->reply_ep, false, "reply");
    if (ep >= 0)
        ucx_ep_get(w, ep)->holds++;     /* (an owned entry's keeps it from pl_ucx_ep_drop) */
    return ep;
}

/* The worker closes: messages taken and never received or released give
 * UCX back what it holds for them (its pools warn of each one missing). */
void ucx_msgs_free(pl_ucx_worker_t *w)
{
    for (uint32_t i = 0; i < w->nmsgs; i++)
        if (w->msgs[i].used)
            msg_free(w, &w->msgs[i]);
}

/* The endpoint ep is closed or failed: held messages that came on it must
 * not hand it out for a reply (UCX frees it once closed).  Not a hot path:
 * endpoints close rarely. */
void ucx_msgs_forget_ep(pl_ucx_worker_t *w, ucp_ep_h ep, int err)
{
    for (uint32_t i = 0; i < w->nmsgs; i++) {
        struct ucx_msg *m = &w->msgs[i];
        if (m->used && m->reply_ep == ep) {
            m->reply_ep = NULL;
            m->reply_err = err;
        }
    }
}

int pl_ucx_msg_drop(pl_ucx_worker_t *w, int h, uint32_t slot, uint32_t gen)
{
    struct ucx_msg *m = msg_get(w, h);

    if (!m || !m->taken || m->owner_slot != slot || m->owner_gen != gen)
        return 0;
    msg_free(w, m);
    return 1;
}

/* Only a taken message (a task's): one still in its stream is the
 * stream's to hand out. */
int pl_ucx_msg_release(pl_ucx_worker_t *w, int h)
{
    struct ucx_msg *m = msg_get(w, h);

    if (!m || !m->taken)
        return -EBADF;
    msg_free(w, m);
    return 0;
}

/* A message belongs to the task that took it: one it dropped would hold
 * its eager data, or its rendezvous sender, for ever.  Not per message: a
 * task that took messages calls this once, as it ends. */
int pl_ucx_msgs_release_task(pl_ucx_worker_t *w, uint32_t slot, uint32_t gen)
{
    int released = 0;

    for (uint32_t i = 0; i < w->nmsgs; i++) {
        struct ucx_msg *m = &w->msgs[i];
        if (m->used && m->taken && m->owner_slot == slot && m->owner_gen == gen) {
            msg_free(w, m);
            released++;
        }
    }
    return released;
}

int pl_ucx_msg_adopt(pl_ucx_worker_t *w, int h, uint32_t slot, uint32_t gen)
{
    struct ucx_msg *m = msg_get(w, h);

    if (!m || !m->taken)
        return -EBADF;
    m->owner_slot = slot;
    m->owner_gen = gen;
    return 0;
}

static void recv_done(void *request, ucs_status_t status, size_t length, void *user_data)
{
    struct ucx_op *op = user_data;

    (void)request;
    op->length = length;
    ucx_op_finish(op, status);
}

/* Where UCX holds message h's eager data (NULL: rendezvous, or no such
 * message), for data() to copy straight from. */
const void *pl_ucx_msg_eager_data(pl_ucx_worker_t *w, int h)
{
    const struct ucx_msg *m = msg_get(w, h);

    return m && !m->rndv ? m->data : NULL;
}

/* Take the message's data into buf: a copy for eager data (done at once),
 * a rendezvous pull for the rest (in flight, or done when the progress
 * below finished it).  The message is consumed. */
int pl_ucx_msg_recv(pl_ucx_worker_t *w, int h, void *buf, size_t len, uint32_t slot, uint32_t gen)
{
    struct ucx_msg *m = msg_get(w, h);
    ucp_request_param_t p;
    struct ucx_op *op;
    ucs_status_ptr_t sp;
    int rc;

    if (!m || !m->taken)        /* (as pl_ucx_msg_release) */
        return -EBADF;
    if (len < m->length)
        return -ENOBUFS;
    /* An empty rendezvous message is released, as data() does: UCX 1.13's
     * ucp_am_recv_data_nbx sends the sender its ATS for it but keeps the
     * descriptor for good (out of its callback), and warned at the
     * worker's close (mpool.c:53, "was not returned to mpool ucp_am_bufs").
     * ucp_am_data_release sends the same ATS and frees it. */
    if (!m->rndv || m->length == 0) {
        if (m->length)
            memcpy(buf, m->data, m->length);
        msg_free(w, m);
        return 0;
    }
    rc = ucx_op_new(w, slot, gen, UCX_OP_PULL, &op);
    if (rc < 0)
        return rc;
    ucx_op_param_recv(&p, op);
    p.cb.recv_am = recv_done;
    op->length = m->length;
    sp = ucp_am_recv_data_nbx(w->ucp, m->data, buf, m->length, &p);
    m->rndv = false;            /* the descriptor now belongs to the receive */
    msg_free(w, m);
    if (!UCS_PTR_IS_PTR(sp) && UCS_PTR_STATUS(sp) == UCS_OK) {
        ucx_op_free(w, op);
        return 0;
    }
    rc = ucx_op_result(w, op, sp);
    if (rc > 0)
        w->pulls++;             /* (before the progress below, which may end it) */
    if (rc > 0 && w->rt) {
        /* UCX queues the pull for the next progress.  Over shared memory
         * that progress does the whole copy (process_vm_readv) and sends
         * the ATS: doing it now spares the task a park and the peer a tick
         * (64 KiB AMs: 0.2 us less one-way).  Callbacks only record, as in
         * the reactor's poll, and progress with an op in flight is what
         * the poll would do too (flow control lets it through).  The
         * op's own completion wakes nobody: its task is running.  Not
         * without a runtime (w->rt), which wakes for messages arriving. */
        w->inline_op = op;
        ucp_worker_progress(w->ucp);
        w->inline_op = NULL;
        w->stats.progress_calls++;
    }
    return rc;
}

/* ---- streams ------------------------------------------------------------- */

static struct ucx_stream *stream_get(pl_ucx_worker_t *w, unsigned id)
{
    struct ucx_stream *s = id < UCX_MAX_STREAMS ? w->streams[id] : NULL;

    return s && s->open ? s : NULL;
}

void ucx_streams_wake_all(pl_ucx_worker_t *w)
{
    for (unsigned id = 0; id < UCX_MAX_STREAMS; id++)
        if (stream_get(w, id))
            ucx_waitq_wake_all(w, &w->streams[id]->readers);
}

bool ucx_worker_over_window(const pl_ucx_worker_t *w)
{
    return w->streams_full > 0;
}

/* Keep streams_full in step with an open stream's length crossing its
 * window (messages held for an id nobody opened never pause the worker). */
static void stream_len_changed(struct ucx_stream *s, uint32_t before)
{
    bool was = before >= s->window, is = s->len >= s->window;

    if (was != is && s->open)
        s->w->streams_full += is ? 1 : -1;
}

/* The stream that holds messages for an id nobody opened a stream for. */
static struct ucx_stream *stream_unclaimed(pl_ucx_worker_t *w, unsigned id)
{
    struct ucx_stream *s = calloc(1, sizeof(*s));

    if (!s)
        return NULL;
    s->id = id;
    s->window = UCX_UNCLAIMED_HOLD;
    s->w = w;
    w->streams[id] = s;
    return s;
}

/* A message that cannot be held (no memory for it): dropped and counted.
 * Only a rendezvous sender can be told: UCX sends it the error status
 * with its acknowledgement.  An eager message's callback must say UCS_OK
 * (UCX 1.13 asserts on an error there: ucp_am.c, the process aborts). */
static ucs_status_t am_unheld(pl_ucx_worker_t *w, const ucp_am_recv_param_t *param)
{
    w->stats.am_dropped++;
    return (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) ? UCS_ERR_NO_MEMORY : UCS_OK;
}

/* The AM callback: hold the message, wake one reader.  Eager data comes
 * back to UCX at once (UCS_OK).  A message dropped while the worker closes
 * tells its rendezvous sender it is done; one past the hold for an id with
 * no open stream fails it (am_unheld). */
static ucs_status_t am_arrived(void *arg, const void *header, size_t header_len, void *data,
                               size_t length, const ucp_am_recv_param_t *param)
{
    const struct ucx_amid *a = arg;
    pl_ucx_worker_t *w = a->w;
    struct ucx_stream *s = w->streams[a->id];
    struct ucx_msg *m;
    int i;

    if (!s && !w->closing) {
        s = stream_unclaimed(w, a->id);     /* (once per id, not per message) */
        if (!s)
            return am_unheld(w, param);
    }
    if (!s || w->closing) {
        w->stats.am_dropped++;
        return UCS_OK;
    }
    if (!s->open && s->len >= s->window)   /* past the hold: a rendezvous sender is told */
        return am_unheld(w, param);
    i = msg_alloc(w);
    if (i < 0)
        return am_unheld(w, param);
    m = &w->msgs[i];
    m->header_len = header_len;
    if (header_len > sizeof(m->header_inline)) {
        m->header_heap = header_block(w, m, header_len);
        if (!m->header_heap) {
            msg_free(w, m);
            return am_unheld(w, param);
        }
    }
    if (header_len)
        memcpy((char *)msg_header(m), header, header_len);
    m->length = length;
    m->data = data;
    m->rndv = (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) != 0;
    m->data_held = !m->rndv && (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_DATA) && length > 0;
    m->reply_ep = (param->recv_attr & UCP_AM_RECV_ATTR_FIELD_REPLY_EP) ? param->reply_ep : NULL;
    m->reply_err = 0;
    if (s->len == 0)
        s->head = (uint32_t)i;
    else
        w->msgs[s->tail].next = (uint32_t)i;
    s->tail = (uint32_t)i;
    s->len++;
    stream_len_changed(s, s->len - 1);
    w->stats.am_received++;
    w->stats.am_bytes_received += (double)length;
    if (m->rndv)
        w->stats.rndv_received++;
    else
        w->stats.eager_received++;
    ucx_waitq_wake_one(s->w, &s->readers);
    return (m->rndv || m->data_held) ? UCS_INPROGRESS : UCS_OK;
}

/* Every id gets the handler when the worker is made: a message for an id
 * nobody opened a stream for is held for the stream opened next (UCX would
 * drop it with a warning, and UCX 1.13 calls a garbage pointer for an id
 * with no handler below the highest id that has one). */
ucs_status_t ucx_am_handlers_init(pl_ucx_worker_t *w)
{
    for (unsigned id = 0; id < UCX_MAX_STREAMS; id++) {
        ucp_am_handler_param_t p = {
            .field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_CB |
                          UCP_AM_HANDLER_PARAM_FIELD_ARG | UCP_AM_HANDLER_PARAM_FIELD_FLAGS,
            .id = id,
            .cb = am_arrived,
            .arg = &w->amids[id],
            .flags = UCP_AM_FLAG_WHOLE_MSG | UCP_AM_FLAG_PERSISTENT_DATA,
        };
        ucs_status_t st;

        w->amids[id] = (struct ucx_amid){ w, id };
        st = ucp_worker_set_am_recv_handler(w->ucp, &p);
        if (st != UCS_OK)
            return st;
    }
    return UCS_OK;
}

int pl_ucx_stream_open(pl_ucx_worker_t *w, unsigned id, uint32_t window)
{
    struct ucx_stream *s;

    if (id >= UCX_MAX_STREAMS || window == 0)
        return -EINVAL;
    if (stream_get(w, id))
        return -EEXIST;
    s = w->streams[id];         /* messages that came before it are its first */
    if (!s) {
        s = stream_unclaimed(w, id);
        if (!s)
            return -ENOMEM;
    }
    s->open = true;
    s->window = window;
    stream_len_changed(s, 0);
    ucx_waitq_init(&s->readers, PL_WAIT_STREAM);
    return (int)s->readers.serial;
}

static void stream_free(pl_ucx_worker_t *w, struct ucx_stream *s)
{
    while (s->len > 0) {
        uint32_t i = s->head;
        s->head = w->msgs[i].next;
        s->len--;
        stream_len_changed(s, s->len + 1);
        msg_free(w, &w->msgs[i]);
    }
    ucx_waitq_wake_all(w, &s->readers);
    ucx_waitq_free(&s->readers);
    w->streams[s->id] = NULL;
    free(s);
}

/* Close a stream: its readers are woken (they find it closed), and what
 * it still holds stays held for the next stream opened for the id, as the
 * messages for an id nobody reads are: released here, their rendezvous
 * senders were told their sends were done, and the data went nowhere. */
int pl_ucx_stream_close(pl_ucx_worker_t *w, unsigned id)
{
    struct ucx_stream *s = stream_get(w, id);

    if (!s)
        return -EBADF;
    if (s->len >= s->window)    /* (an unopened id's messages do not pause the worker) */
        w->streams_full--;
    s->open = false;
    s->window = UCX_UNCLAIMED_HOLD;
    ucx_waitq_wake_all(w, &s->readers);
    ucx_waitq_free(&s->readers);
    if (s->len == 0) {          /* nothing held: as if it had never been opened */
        w->streams[id] = NULL;
        free(s);
    }
    return 0;
}

void ucx_streams_free(pl_ucx_worker_t *w)
{
    for (unsigned id = 0; id < UCX_MAX_STREAMS; id++)
        if (w->streams[id])
            stream_free(w, w->streams[id]);
}

int pl_ucx_stream_next(pl_ucx_worker_t *w, unsigned id, uint32_t slot, uint32_t gen,
                       pl_ucx_msg_info_t *info)
{
    struct ucx_stream *s = stream_get(w, id);
    uint32_t i;
    int h;

    if (!s)
        return -EBADF;
    if (s->len == 0) {
        int rc;
        if (!ucx_worker_has_peers(w))
            return -ENOTCONN;
        rc = ucx_waitq_push(&s->readers, slot, gen);
        return rc < 0 ? rc : -EAGAIN;
    }
    i = s->head;
    s->head = w->msgs[i].next;
    s->len--;
    stream_len_changed(s, s->len + 1);
    if (s->len > 0)
        ucx_waitq_wake_one(s->w, &s->readers);     /* more held: the next reader may go on */
    w->msgs[i].taken = true;
    w->taken++;
    w->msgs[i].owner_slot = slot;
    w->msgs[i].owner_gen = gen;
    h = msg_handle(w, i);
    if (info)
        pl_ucx_msg_info(w, h, info);
    return h;
}

void pl_ucx_stream_abandon(pl_ucx_worker_t *w, unsigned id, uint32_t slot, uint32_t gen)
{
    struct ucx_stream *s = stream_get(w, id);

    if (s)
        ucx_waitq_leave(w, &s->readers, slot, gen, s->len > 0);
}

/* ---- tags ---------------------------------------------------------------- */

int pl_ucx_tag_send(pl_ucx_worker_t *w, int ep, uint64_t tag, const void *data, size_t len,
                    uint32_t slot, uint32_t gen)
{
    ucp_request_param_t p;
    struct ucx_ep *e;
    struct ucx_op *op;
    int rc = ucx_ep_op_new(w, ep, slot, gen, &e, &op, &p);

    if (rc < 0)
        return rc;
    op->sends = UCX_SENDS_TAG;
    return ucx_op_result(w, op, ucp_tag_send_nbx(e->ep, data, len, tag, &p));
}

static void tag_recv_done(void *request, ucs_status_t status, const ucp_tag_recv_info_t *info,
                          void *user_data)
{
    struct ucx_op *op = user_data;

    (void)request;
    /* (UCX's info is stale after our cancels) */
    if (info && !(status == UCS_ERR_CANCELED && (op->orphaned || op->handover == UCX_HANDOVER_CANCEL))) {
        op->length = info->length;
        op->sender_tag = info->sender_tag;
    }
    /* A cancel a task can see says that no peer can feed the receive:
     * ours (tag_recv_orphan: it matched nothing, length 0), or UCX's, of a
     * rendezvous message it matched whose endpoint was closed since (its
     * length and tag: the data is out of reach).  A kill's or a worker's
     * close's cancel reaches nobody, and a hand-over's result is written
     * over (tag_hand_over). */
    if (status == UCS_ERR_CANCELED)
        status = UCS_ERR_NOT_CONNECTED;
    if (status == UCS_OK)   /* (not a receive that failed: no message, or one too long) */
        op->w->stats.tag_received++;
    ucx_op_finish(op, status);
}

/* No peer is left to send what op waits for: cancel it, which UCX does
 * only while nothing matched it (a message it matched, a rendezvous one
 * being pulled, still ends on its own). */
static void tag_recv_orphan(pl_ucx_worker_t *w, struct ucx_op *op)
{
    op->orphaned = true;
    ucp_request_cancel(w->ucp, op);
}

/* The tag receive posted first (UCX gives a message to the first) still
 * waiting in UCX for a message with sender_tag, and not known to have
 * matched one of its own; NULL if none.  (A scan of the ops, but only
 * when a killed receive had matched a message: rare.) */
static struct ucx_op *tag_recv_first(pl_ucx_worker_t *w, uint64_t sender_tag)
{
    struct ucx_op *first = NULL;

    for (uint32_t i = 0; i < w->nops && w->passive_in_flight > 0; i++) {
        struct ucx_op *op = ucx_op_get(w, i);

        if (op->passive && op->state == UOP_IN_FLIGHT && !op->orphaned && op->handover == 0 &&
            (sender_tag & op->want_mask) == (op->want_tag & op->want_mask) &&
            (!first || op->posted < first->posted))
            first = op;
    }
    return first;
}

/* Whether tag receives a and b match some tag in common. */
static bool wants_overlap(const struct ucx_op *a, const struct ucx_op *b)
{
    uint64_t both = a->want_mask & b->want_mask;

    return (a->want_tag & both) == (b->want_tag & both);
}

/* Whether a killed receive posted before the posted-th may still hand r
 * a message: one still fetching what it matched, or whose message is held
 * for a poll (one no longer held had its poll).  UCX matched messages to
 * receives in the order they were posted. */
static bool killed_may_hand(pl_ucx_worker_t *w, uint64_t posted, const struct ucx_op *r)
{
    for (uint32_t i = 0; i < w->nops; i++) {
        const struct ucx_op *k = ucx_op_get(w, i);

        if (k->rescue && k->posted < posted && wants_overlap(k, r) &&
            (k->state == UOP_ABANDONED || (k->state == UOP_DONE && k->held)))
            return true;
    }
    return false;
}

/* m, a tag receive whose task was killed, ended with a message, which is
 * kept for the next tag_recv (ucx.lua's take_rescued).  But a receive
 * already waiting in UCX would have been given it, had m not been there:
 * it is, here.  The first posted that matches is cancelled, which UCX
 * does at once unless it matched a message of its own meanwhile (then the
 * next is tried), and it ends as if UCX had received m into it: the data,
 * or EMSGSIZE with m's length when it has no room (the message dropped,
 * as UCX drops it, and not counted as received).  m is then spent
 * (ECANCELED): the Lua side keeps nothing.  While a receive killed before
 * m was posted may still give that receive its message, m is held (not
 * settled: its memory stays kept) and tried again when that one ends
 * (ucx_tags_hand_over).  Whether it was handed over.  (m's memory is its
 * killed task's, kept until the Lua side takes m's result.) */
static bool tag_hand_over(pl_ucx_worker_t *w, struct ucx_op *m)
{
    struct ucx_op *r;

    while ((r = tag_recv_first(w, m->sender_tag))) {
        if (killed_may_hand(w, m->posted, r)) {     /* that one goes first */
            m->held = true;
            return false;
        }
        r->handover = UCX_HANDOVER_CANCEL;
        ucp_request_cancel(w->ucp, r);
        if (r->state == UOP_IN_FLIGHT) {
            r->handover = UCX_HANDOVER_REFUSED;     /* being fetched: it ends on its own */
            continue;
        }
        /* ended by the cancel (its task woken), not taken yet */
        r->length = m->length;
        r->sender_tag = m->sender_tag;
        r->status = m->length <= r->cap ? 0 : -EMSGSIZE;
        if (r->status == 0 && m->length > 0)
            memcpy(r->buf, m->buf, m->length);
        else if (r->status != 0 && w->stats.tag_received > 0)
            w->stats.tag_received--;        /* (counted when m's receive ended) */
        m->status = -ECANCELED;
        m->held = false;
        return true;
    }
    m->held = false;
    return false;
}

/* Killed tag receives ended (in UCX callbacks, where no other request may
 * be cancelled): each message to a receive waiting, as above, in the order
 * the killed receives were posted, which is the order UCX matched them.
 * One held that goes now is settled for the Lua side's sweep. */
void ucx_tags_hand_over(pl_ucx_worker_t *w)
{
    uint64_t after = 0;

    w->tags_rescued = false;
    for (;;) {
        struct ucx_op *next = NULL;
        bool was_held;

        for (uint32_t i = 0; i < w->nops; i++) {
            struct ucx_op *op = ucx_op_get(w, i);

            if (op->rescue && op->state == UOP_DONE && op->status == 0 && op->posted > after &&
                (!next || op->posted < next->posted))
                next = op;
        }
        if (!next)
            break;
        after = next->posted;
        was_held = next->held;
        tag_hand_over(w, next);
        if (was_held && !next->held)
            w->abandoned_settled++;
    }
    if (!ucx_worker_has_peers(w))   /* receives left for these may have none now */
        w->tags_recheck = true;
}

/* A scan of the ops, but only as the last peer goes (rare), and only
 * with a tag receive in flight.  A receive a killed one may still hand a
 * message is left for that (killed_may_hand; ucx_tags_hand_over looks
 * again after). */
void ucx_tags_orphan(pl_ucx_worker_t *w)
{
    w->tags_recheck = false;
    if (w->passive_in_flight == 0 || ucx_worker_has_peers(w))
        return;
    if (w->tags_rescued)    /* (a receive handed a message takes it, not ENOTCONN) */
        ucx_tags_hand_over(w);
    for (uint32_t i = 0; i < w->nops; i++) {
        struct ucx_op *op = ucx_op_get(w, i);
        if (op->passive && op->state == UOP_IN_FLIGHT && !op->orphaned &&
            !killed_may_hand(w, op->posted, op))   /* (only one posted before it could) */
            tag_recv_orphan(w, op);
    }
}

/* Always completes through the op (UCP_OP_ATTR_FLAG_NO_IMM_CMPL), so the
 * received length and tag are in one place.  Posting it matches what came
 * already (UCX's unexpected queue); one still unmatched on a worker no peer
 * can send to any more ends at once with -ENOTCONN, as it would wait for
 * good (and keep the worker busy: no deadlock report either). */
int pl_ucx_tag_recv(pl_ucx_worker_t *w, uint64_t tag, uint64_t mask, void *buf, size_t len,
                    uint32_t slot, uint32_t gen)
{
    ucp_request_param_t p;
    struct ucx_op *op;
    int rc = ucx_op_new(w, slot, gen, -1, &op);

    if (rc < 0)
        return rc;
    ucx_op_param_recv(&p, op);
    p.op_attr_mask |= UCP_OP_ATTR_FLAG_NO_IMM_CMPL;
    p.cb.recv = tag_recv_done;
    /* it waits for a peer: flow control may pause it.  Counted before the
     * call, whose callback may run inside it (a message already there). */
    op->passive = true;
    op->want_tag = tag;
    op->want_mask = mask;
    op->buf = buf;
    op->cap = len;
    op->posted = ++w->tags_posted;
    w->passive_in_flight++;
    rc = ucx_op_result(w, op, ucp_tag_recv_nbx(w->ucp, buf, len, tag, mask, &p));
    if (rc <= 0)                /* refused: no callback will come */
        w->passive_in_flight--;
    else if (op->state == UOP_IN_FLIGHT && !ucx_worker_has_peers(w))
        tag_recv_orphan(w, op);
    return rc;
}

/* Tagged messages that came and were never received: UCX warns about each
 * ("unexpected tag-receive descriptor ... was not matched") when the worker
 * is destroyed, on a normal exit too.  At close each is received into
 * nothing (truncated) and so dropped, as UCX would drop it.  A rendezvous
 * one whose endpoint is closed by then (the worker closed its own) is
 * cancelled by UCX at once, its sender failing as before; one from a
 * connect_addr peer is acknowledged.  A receive still going after
 * UCX_DISCARD_WAIT_NS is left to UCX with the worker. */
#define UCX_DISCARD_WAIT_NS 100000000LL

void ucx_tags_discard(pl_ucx_worker_t *w)
{
    ucp_request_param_t p = { .op_attr_mask = 0 };
    int64_t deadline = pl_clock_ns() + UCX_DISCARD_WAIT_NS;
    ucp_tag_recv_info_t info;
    ucp_tag_message_h m;

    while ((m = ucp_tag_probe_nb(w->ucp, 0, 0, 1, &info)) != NULL) {
        ucs_status_ptr_t sp = ucp_tag_msg_recv_nbx(w->ucp, NULL, 0, m, &p);
        if (!UCS_PTR_IS_PTR(sp))
            continue;           /* done at once (truncated), or failed: dropped */
        while (ucp_request_check_status(sp) == UCS_INPROGRESS && pl_clock_ns() < deadline)
            ucp_worker_progress(w->ucp);
        ucp_request_free(sp);
    }
}
