/*
 * uring_internal.h - state shared by the io_uring reactor's files: uring.c
 * (ring, op slots, submission, completion), uring_rest.c (rests of short
 * transfers waiting for an SQE), uring_cancel.c (cancels,
 * abandoned ops, shutdown), uring_file.c (file and path operations),
 * uring_buf.c (registered buffers), uring_net.c (sockets), uring_queue.c
 * (I/O queues).
 */
#ifndef PL_URING_INTERNAL_H
#define PL_URING_INTERNAL_H

#include <sys/socket.h>
#include <sys/uio.h>

#include "internal.h"

#define URING_OPS_PER_CHUNK 256
#define URING_MAX_OP_CHUNKS (PL_URING_MAX_OPS / URING_OPS_PER_CHUNK)
#define NONE UINT32_MAX
#define URING_INLINE_MAX 16     /* ops finished inline in a row before the task parks */
#define URING_SHUTDOWN_WAIT 5.0 /* s pl_uring_free waits for the kernel to finish cancelled ops */
/* ns a sleep lasts at most while a cancel or the rest of a short transfer
 * waits for an SQE (the kernel refused a submit): no completion may come to
 * end the sleep, and the refusal may pass without one (EAGAIN) */
#define URING_DUE_WAIT_NS 1000000

enum op_state { OP_FREE, OP_IN_FLIGHT, OP_DONE, OP_ABANDONED };
enum op_kind { OP_READ, OP_WRITE, OP_OTHER, OP_SEND, OP_READV, OP_WRITEV };
/* An fd an op holds for its task: an open's or accept's result, or the
 * socket a connect runs on.  If the task dies first, or the reactor is
 * freed before the task took the result, the op closes it.  FD_CLOSE: the
 * fd a close op is to close, closed at once if its SQE is dropped before
 * the kernel took it (the task asked for the close; nobody else will).
 * FD_DUP: the op's own duplicate of a file's or socket's fd, closed when
 * the op completes (see uring_start_on_fd). */
enum op_fd_owner { FD_NONE, FD_RESULT, FD_OP, FD_CLOSE, FD_DUP };

#define NO_BUF (-1)
#define CANCEL_TAG UINT64_MAX   /* user_data of cancel requests: ignored */

/* One operation.  Reads and writes remember where they are so that a short
 * transfer is continued here, not in Lua. */
struct uring_op {
    uint32_t index;
    uint32_t gen;
    uint8_t state;
    uint8_t kind;
    bool no_continue;       /* its fd was closed (the number may name another file), or it was
                             * stopped (a cancel that came too late must not see it go on) */
    uint8_t fd_owner;       /* which fd is the op's own until its task takes it (enum) */
    bool cancel_due;        /* its cancel found no free SQE: uring_cancels_retry sends it */
    bool fd_closed;         /* its fd was closed while it was in flight (see uring_op_complete) */
    bool rest_due;          /* the rest of its short transfer found no SQE: it waits in the
                             * reactor's FIFO of due rests (see uring_rest.c) */
    bool stream;            /* its fd is a socket (a File.new of one): its rest goes at the
                             * same offset, 0, as a socket refuses any other (ESPIPE) */
    uint32_t task_slot, task_gen;
    int fd;
    int buf_index;          /* registered buffer used, or NO_BUF */
    char *addr;
    uint32_t len;           /* bytes asked */
    uint32_t done;          /* bytes transferred so far */
    uint64_t offset;
    int32_t res;
    uint32_t next_free;     /* free: the free list's link; rest_due: the FIFO's (unused else) */
    uint32_t queue;         /* the I/O queue it reports to, or NONE (its task waits on it) */
    union {
        /* sockets: the kernel reads (and for recvmsg writes) these after
         * the SQE is queued, which is why op slots never move */
        struct {
            struct msghdr msg;
            struct iovec iov;
            struct sockaddr_storage peer;
        };
        /* readv / writev: the parts not yet done (a short transfer moves
         * iov_first and trims the part it stopped in), and the registered
         * buffer each part lies in (NO_BUF: other memory), counted in use
         * like a fixed op's buffer */
        struct {
            struct iovec iovs[PL_URING_IOV_MAX];
            int32_t iov_buf[PL_URING_IOV_MAX];
            uint32_t iov_first, iov_count;
        };
    };
};

/* An I/O queue: one task's ops in flight at once, without parking on each.
 * Completions go to its FIFO of done op ids, sized at each start so that a
 * completion always has room; one wakes the task only while it waits on
 * the queue (PL_WAIT_IO with URING_QUEUE_WAIT_ARG).  Owned by the task
 * that made it (through its Lua object); pl_uring_queue_free abandons what
 * is in flight. */
struct uring_queue {
    bool live;
    uint32_t slot, gen;     /* the owning task */
    uint32_t in_flight;
    uint32_t *done;         /* FIFO ring of finished op ids */
    uint32_t done_cap, done_head, done_len;
    uint32_t next_free;
};

/* The wait argument of a task parked on queue q (op ids are >= 0). */
#define URING_QUEUE_WAIT_ARG(q) (-1.0 - (double)(q))

enum buf_state { BUF_FREE, BUF_HELD };

struct uring_buf {
    uint8_t state;
    bool release_pending;   /* released while an abandoned op still uses it */
    uint32_t users;         /* in-flight ops using it */
    uint32_t cancelled;     /* of those, ops nobody waits for (abandoned): the kernel may
                             * still write into the buffer or read it, behind its holder's back */
    uint32_t next_free;
};

/* A task waiting for a buffer; handed is set when a buffer was passed to it. */
struct buf_waiter {
    uint32_t slot, gen;
};

struct pl_uring {
    pl_reactor_t reactor;   /* first: the vtable the runtime polls */
    pl_runtime_t *rt;       /* last runtime that polled us (for wakes) */
    struct io_uring ring;
    bool ring_ready;
    pl_uring_options_t opts;
    int64_t wait_submit_cyc, wait_complete_ns;     /* (pl_cycles, ns) */
    int64_t first_unsubmitted_cyc;
    uint32_t inline_op;         /* the op being finished inline (no wake), or NONE */
    uint32_t inline_streak;     /* ops finished inline since the last tick */
    bool hold_flush;            /* the tick's flush may wait one batch (see uring_flush) */
    bool shut_down;             /* pl_uring_shutdown waited once: do not wait again */

    struct uring_op *op_chunks[URING_MAX_OP_CHUNKS];   /* slots never move */
    uint16_t chunk_used[URING_MAX_OP_CHUNKS];   /* slots of each chunk not free (uring_op_scan) */
    uint32_t nops, free_op;
    uint32_t in_flight;     /* ops the kernel has (including abandoned), and rests due */
    uint32_t abandoned_settled;     /* abandoned ops freed so far (wraps) */
    uint32_t cancels_due;   /* ops marked cancel_due (at most: some may have ended since) */
    uint32_t rests_head, rests_tail, rests_due;    /* FIFO of ops marked rest_due, linked
                                                    * through next_free; NONE: empty */

    char *buf_mem;
    size_t buf_mem_len;        /* the buffers */
    size_t buf_map_len;        /* the mapping (rounded up to huge pages) */
    struct uring_buf *bufs;
    uint32_t free_buf, nfree_bufs;
    bool pool_refused;      /* the last try to register the pool failed */

    struct buf_waiter *waiters;     /* FIFO ring */
    uint32_t waiters_cap, waiters_head, waiters_len;
    /* handoff[slot]: buffer passed to the waiting task in that slot */
    int32_t *handoff;
    uint32_t *handoff_gen;
    uint32_t handoff_cap;

    struct uring_queue *queues;     /* I/O queues by id (the array may move) */
    uint32_t nqueues, free_queue;

    pl_uring_stats_t stats;
};

static inline struct uring_op *uring_op(pl_uring_t *u, uint32_t i)
{
    return &u->op_chunks[i / URING_OPS_PER_CHUNK][i % URING_OPS_PER_CHUNK];
}

/* Registered buffer index if a task holds it, else NULL (no pool yet, out
 * of range, or in the pool). */
static inline struct uring_buf *uring_held_buf(pl_uring_t *u, int index)
{
    if (!u->bufs || index < 0 || (uint32_t)index >= u->opts.buffer_count ||
        u->bufs[index].state != BUF_HELD)
        return NULL;
    return &u->bufs[index];
}

/* uring.c, uring_submit.c, uring_complete.c */
int uring_ops_grow(pl_uring_t *u);
struct io_uring_sqe *uring_sqe_full(pl_uring_t *u);
int uring_submit(pl_uring_t *u);
void uring_prep_rw(pl_uring_t *u, uint32_t i, struct io_uring_sqe *sqe);
void uring_op_finish(pl_uring_t *u, uint32_t i, int32_t res);
int uring_op_queue(pl_uring_t *u, uint32_t i, struct io_uring_sqe *sqe);
void uring_sqe_void(struct io_uring_sqe *sqe);
int uring_op_begin(pl_uring_t *u, uint32_t slot, uint32_t gen, uint8_t kind, int fd,
                   uint32_t len, uint64_t offset, struct io_uring_sqe **sqe_out);
int uring_start_other(pl_uring_t *u, uint32_t slot, uint32_t gen, struct io_uring_sqe **sqe_out);
int uring_start_on_fd(pl_uring_t *u, uint32_t slot, uint32_t gen, int fd, struct io_uring_sqe **sqe_out);
int uring_reap(pl_uring_t *u, int budget);
void uring_op_complete(pl_uring_t *u, uint32_t i, int32_t res);
void uring_op_drop_fd(struct uring_op *op, int32_t res);
void uring_fd_closing(pl_uring_t *u, int fd);
bool uring_fd_busy(pl_uring_t *u, int fd, const pl_runtime_t *live_in);
int uring_start_rw(pl_uring_t *u, uint32_t slot, uint32_t gen, uint8_t kind, int fd,
                   void *addr, uint32_t len, uint64_t offset, int buf_index, uint32_t queue);

/* uring_rest.c */
void uring_rest_queue(pl_uring_t *u, uint32_t i, struct io_uring_sqe *sqe);
void uring_rest_defer(pl_uring_t *u, uint32_t i);
void uring_rests_send(pl_uring_t *u);
void uring_rests_retry(pl_uring_t *u);
void uring_rest_end(pl_uring_t *u, uint32_t i, int32_t res);
void uring_due_wait(pl_uring_t *u);

/* uring_cancel.c */
void uring_cancels_retry(pl_uring_t *u);
uint32_t uring_cancel_each_on_fd(pl_uring_t *u, int fd);

/* uring_queue.c */
void uring_queues_free(pl_uring_t *u);

/* uring_buf.c */
void uring_buffer_put(pl_uring_t *u, pl_runtime_t *rt, int index);
void uring_op_buffers_cancelled(pl_uring_t *u, const struct uring_op *op, int delta);
int uring_buffer_index_of(const pl_uring_t *u, const void *addr, size_t len);

/*
 * The per-operation steps below are inline: each runs once or twice per
 * read or write, and as calls between the reactor's files (a shared
 * library's functions are not inlined across them) they cost more than
 * their bodies.
 */

/* An SQE, submitting early when the submission queue is full.  While
 * rests of short transfers wait for one, they get the free SQEs first
 * (uring_sqe_full): they were asked for before. */
static inline struct io_uring_sqe *uring_get_sqe(pl_uring_t *u)
{
    struct io_uring_sqe *sqe = u->rests_due == 0 ? io_uring_get_sqe(&u->ring) : NULL;

    return sqe ? sqe : uring_sqe_full(u);
}

/* Op slot i back to the free list; its gen changes, so that a stale
 * completion or id no longer matches it. */
static inline void uring_op_free(pl_uring_t *u, uint32_t i)
{
    struct uring_op *op = uring_op(u, i);

    if (op->state == OP_ABANDONED)
        u->abandoned_settled++;
    op->state = OP_FREE;
    op->gen++;
    op->next_free = u->free_op;
    u->free_op = i;
    u->chunk_used[i / URING_OPS_PER_CHUNK]--;
}

/* The first op slot from i on in a chunk that has a slot in use: scans of
 * every op (a close's, for its fd's ops) skip the chunks all free.  Slots
 * are never given back, so after a burst of 50,000 ops every connection's
 * close walked all of them: 84 us a connect, accept and two closes became
 * 383 us, for good.  Freed slots are reused last in, first out, so the few
 * a steady load has in use sit in a few chunks. */
static inline uint32_t uring_op_scan(const pl_uring_t *u, uint32_t i)
{
    while (i < u->nops && u->chunk_used[i / URING_OPS_PER_CHUNK] == 0)
        i = (i / URING_OPS_PER_CHUNK + 1) * URING_OPS_PER_CHUNK;
    return i;
}

/* The user_data of op i's SQEs: its generation and index, so that a
 * completion of a slot since reused is recognised. */
static inline uint64_t uring_op_user_data(pl_uring_t *u, uint32_t i)
{
    return ((uint64_t)uring_op(u, i)->gen << 32) | i;
}

/* A finished op's result to out, and its slot freed. */
static inline void uring_op_take_done(pl_uring_t *u, uint32_t i, pl_uring_result_t *out)
{
    const struct uring_op *op = uring_op(u, i);

    out->res = op->res;
    out->bytes = op->done;
    out->len = op->len;
    out->write = op->kind == OP_WRITE;
    out->offset = (double)op->offset;
    uring_op_free(u, i);
}

/* An op using registered buffer index let go of it: a release that waited
 * for the op now happens. */
static inline void uring_buffer_unuse(pl_uring_t *u, int index)
{
    struct uring_buf *b = &u->bufs[index];

    if (--b->users == 0 && b->release_pending) {
        b->release_pending = false;
        uring_buffer_put(u, u->rt, index);
    }
}

/* Op `op` of queue qi finished (from its completion): into the queue's FIFO
 * of done ops, which has room (see queue_reserve); its task is woken only
 * while it is parked on this queue, not while it runs (it takes the op on
 * its own), nor while it waits for something else. */
static inline void uring_queue_done(pl_uring_t *u, uint32_t qi, uint32_t op)
{
    struct uring_queue *q = &u->queues[qi];
    uint32_t at = q->done_head + q->done_len;

    q->done[at >= q->done_cap ? at - q->done_cap : at] = op;
    q->done_len++;
    q->in_flight--;
    if (u->rt && pl_task_is_waiting(u->rt, q->slot, q->gen, PL_WAIT_IO, URING_QUEUE_WAIT_ARG(qi)))
        pl_task_wake(u->rt, q->slot, q->gen);
}

/* Start an op whose SQE `prep` fills in (uses u, slot, gen, sqe). */
#define START_OTHER(prep)                                   \
    do {                                                    \
        struct io_uring_sqe *sqe;                           \
        int i = uring_start_other(u, slot, gen, &sqe);      \
        if (i < 0)                                          \
            return i;                                       \
        prep;                                               \
        return uring_op_queue(u, (uint32_t)i, sqe);         \
    } while (0)

/* Start an op on at_fd whose SQE `prep` fills in, naming the fd as `fd_of_op`
 * (the op's own duplicate: see uring_start_on_fd). */
#define START_ON_FD(at_fd, prep)                                     \
    do {                                                            \
        struct io_uring_sqe *sqe;                                   \
        int i = uring_start_on_fd(u, slot, gen, (at_fd), &sqe);     \
        int fd_of_op;                                               \
        if (i < 0)                                                  \
            return i;                                               \
        fd_of_op = uring_op(u, (uint32_t)i)->fd;                    \
        prep;                                                       \
        return uring_op_queue(u, (uint32_t)i, sqe);                 \
    } while (0)

#endif /* PL_URING_INTERNAL_H */
