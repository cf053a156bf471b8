/*
 * uring.c - the io_uring reactor: ring set-up, op slots, the reactor's
 * calls from the tick (poll, flush, sleep), taking results and statistics.
 * Submission is in uring_submit.c, completion (with short-I/O
 * continuation) in uring_complete.c, cancels and the shutdown in
 * uring_cancel.c, rests waiting for an SQE in uring_rest.c; files,
 * buffers, sockets and I/O queues in uring_file.c, uring_buf.c,
 * uring_net.c and uring_queue.c.
 *
 * Lifetime: a pl_uring_t owns its ring, its op slots, its buffer memory and
 * their registration; pl_uring_free releases them once the kernel has
 * finished every op (pl_uring_shutdown cancels them and waits, bounded: an
 * op that outlives the wait keeps its memory, leaked).  An op slot is owned
 * by the task that started it until it takes the result; if the task dies
 * first the op is "abandoned": cancelled in the kernel and reclaimed by its
 * completion, so memory the kernel may still write to is never handed out
 * again early.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "uring_internal.h"

/* An op slot per op in flight, in chunks: its size is the reactor's memory
 * per op, and what a new field costs (the rest of a short transfer that
 * waits for an SQE links through next_free, unused then, for that reason). */
_Static_assert(sizeof(void *) != 8 || sizeof(struct uring_op) <= 400,
               "struct uring_op grew past 400 bytes on a 64-bit build");

/* ---- set-up -------------------------------------------------------------- */

static int uring_poll(pl_reactor_t *self, pl_runtime_t *rt, int budget);
static int uring_status(pl_reactor_t *self);
static int uring_wait_fd(pl_reactor_t *self);
static int uring_block(pl_reactor_t *self, int64_t timeout_ns);
static int uring_stats(pl_reactor_t *self, pl_stat_t *out, int max);
static int uring_flush(pl_reactor_t *self);

/* Op slots come in chunks that never move: the kernel may write into a
 * slot (a recvmsg's source address) while more slots are being added. */
int uring_ops_grow(pl_uring_t *u)
{
    uint32_t c = u->nops / URING_OPS_PER_CHUNK;
    struct uring_op *chunk;

    if (c == URING_MAX_OP_CHUNKS)
        return -PL_EOPSFULL;
    chunk = calloc(URING_OPS_PER_CHUNK, sizeof(*chunk));
    if (!chunk)
        return -ENOMEM;
    u->op_chunks[c] = chunk;
    for (uint32_t k = URING_OPS_PER_CHUNK; k-- > 0;) {
        chunk[k] = (struct uring_op){ .index = u->nops + k, .state = OP_FREE, .buf_index = NO_BUF };
        chunk[k].next_free = u->free_op;
        u->free_op = u->nops + k;
    }
    u->nops += URING_OPS_PER_CHUNK;
    return 0;
}

pl_uring_t *pl_uring_new(const pl_uring_options_t *opts, int *err)
{
    struct io_uring_params p = { 0 };
    pl_uring_t *u = calloc(1, sizeof(*u));
    int rc;

    if (!u) {
        *err = -ENOMEM;
        return NULL;
    }
    u->opts = *opts;
    u->reactor = (pl_reactor_t){
        .kind = "io_uring", .poll = uring_poll, .status = uring_status,
        .wait_fd = uring_wait_fd, .block = uring_block, .flush = uring_flush,
        .stats = uring_stats,
    };
    pl_cycles_init();
    u->wait_submit_cyc = pl_ns_to_cycles((int64_t)(opts->wait_submit_timeout * 1e9));
    u->wait_complete_ns = (int64_t)(opts->wait_complete_timeout * 1e9);
    u->free_op = NONE;
    u->inline_op = NONE;
    u->free_buf = NONE;
    u->free_queue = NONE;
    u->rests_head = u->rests_tail = NONE;
    /* room for completions of ops resubmitted or finished while the SQ
     * refills, within the kernel's limit of 65536 CQEs */
    p.flags = IORING_SETUP_CQSIZE;
    p.cq_entries = opts->queue_size <= 16384 ? opts->queue_size * 4 : 65536;
    if (opts->sqpoll) {
        p.flags |= IORING_SETUP_SQPOLL;
        p.sq_thread_idle = opts->sqpoll_idle_ms;
    }
    rc = io_uring_queue_init_params(opts->queue_size, &u->ring, &p);
    if (rc < 0)
        goto fail;
    u->ring_ready = true;
    rc = uring_ops_grow(u);
    if (rc < 0)
        goto fail;
    return u;
fail:
    *err = rc;
    pl_uring_free(u);
    return NULL;
}

void pl_uring_free(pl_uring_t *u)
{
    bool kernel_done;

    if (!u)
        return;
    kernel_done = pl_uring_shutdown(u, URING_SHUTDOWN_WAIT) == 0;
    if (!kernel_done)
        fprintf(stderr, "pluvio: an io_uring reactor was freed while the kernel still had %u "
                "operations %g s after cancelling them: their memory (op slots%s) is leaked, "
                "not freed under the kernel\n", u->in_flight, URING_SHUTDOWN_WAIT,
                u->buf_mem ? ", registered buffers" : "");
    /* unregistered now, the pool's pages stop counting against the
     * locked-memory limit at once: the ring's own teardown, which would
     * unregister them too, runs later in a kernel worker, and a reactor
     * made right after this one could not register its pool meanwhile */
    if (u->ring_ready && u->bufs && kernel_done)
        io_uring_unregister_buffers(&u->ring);
    if (u->ring_ready)
        io_uring_queue_exit(&u->ring);
    if (u->buf_mem && kernel_done)
        munmap(u->buf_mem, u->buf_map_len);
    free(u->bufs);
    for (uint32_t c = 0; kernel_done && c < u->nops / URING_OPS_PER_CHUNK; c++)
        free(u->op_chunks[c]);
    uring_queues_free(u);
    free(u->waiters);
    free(u->handoff);
    free(u->handoff_gen);
    free(u);
}

pl_reactor_t *pl_uring_reactor(pl_uring_t *u)
{
    return &u->reactor;
}

void pl_uring_attach(pl_uring_t *u, pl_runtime_t *rt)
{
    u->rt = rt;
}

/* (A scan: asked when a runtime would take the reactor, not per op.) */
int pl_uring_ops_pending(pl_uring_t *u, const pl_runtime_t *rt, uint32_t *first)
{
    int n = 0;

    for (uint32_t i = uring_op_scan(u, 0); i < u->nops; i = uring_op_scan(u, i + 1)) {
        const struct uring_op *op = uring_op(u, i);
        if (op->state == OP_IN_FLIGHT && pl_task_is_live(rt, op->task_slot, op->task_gen) && n++ == 0)
            *first = op->task_slot;
    }
    return n;
}

/* ---- the reactor's calls and results ------------------------------------- */

/* Only reap: what tasks queued goes out with the tick's flush or sleep,
 * so each tick costs one io_uring_enter. */
static int uring_poll(pl_reactor_t *self, pl_runtime_t *rt, int budget)
{
    pl_uring_t *u = (pl_uring_t *)self;

    u->rt = rt;
    u->inline_streak = 0;
    /* Completions past a full CQ wait in the kernel's overflow list until
     * an io_uring_enter asks for completions; this reactor's own sleep
     * does, but a runtime with another reactor pending watches the ring's
     * fd instead, which the overflow keeps readable: the tick spun, and
     * those completions waited for the next submit. */
    if (io_uring_cq_ready(&u->ring) == 0 && io_uring_cq_has_overflow(&u->ring))
        (void)io_uring_get_events(&u->ring);
    return uring_reap(u, budget);
}

/* The tick's flush.  When an early submit in the last batch completed
 * other tasks' ops inline, those tasks run in the next batch and queue
 * their next ops: the few SQEs queued after that submit wait for them, so
 * that the batch goes out in one io_uring_enter instead of two (at 32 tasks
 * reading from the page cache, 16 ops per enter became 32).  They wait one
 * batch at most: the next flush submits, and so does a sleep, or a flush
 * with no task ready to run (nobody would add to them). */
static int uring_flush(pl_reactor_t *self)
{
    pl_uring_t *u = (pl_uring_t *)self;
    bool hold = u->hold_flush && u->rt && !pl_ready_empty(u->rt);

    u->hold_flush = false;
    return hold ? 0 : pl_uring_flush(u);
}

static int uring_status(pl_reactor_t *self)
{
    pl_uring_t *u = (pl_uring_t *)self;

    if (io_uring_cq_ready(&u->ring) > 0 || io_uring_cq_has_overflow(&u->ring))
        return PL_REACTOR_READY;        /* (overflow: uring_poll fetches it) */
    return u->in_flight > 0 ? PL_REACTOR_PENDING : PL_REACTOR_IDLE;
}

static int uring_wait_fd(pl_reactor_t *self)
{
    pl_uring_t *u = (pl_uring_t *)self;

    pl_uring_flush(u);      /* what the fd signals must have been submitted */
    return u->ring.ring_fd;
}

static int uring_block(pl_reactor_t *self, int64_t timeout_ns)
{
    pl_uring_t *u = (pl_uring_t *)self;
    struct __kernel_timespec ts;
    struct io_uring_cqe *cqe;
    unsigned ready;
    int rc;

    if (u->wait_complete_ns > 0 && (timeout_ns < 0 || timeout_ns > u->wait_complete_ns))
        timeout_ns = u->wait_complete_ns;
    if (u->cancels_due > 0)
        uring_cancels_retry(u);
    if (u->rests_due > 0)
        uring_rests_retry(u);
    u->first_unsubmitted_cyc = 0;
    ready = io_uring_sq_ready(&u->ring);
    if (timeout_ns < 0) {
        rc = io_uring_submit_and_wait(&u->ring, 1);
    } else {
        ts.tv_sec = timeout_ns / 1000000000;
        ts.tv_nsec = timeout_ns % 1000000000;
        rc = io_uring_submit_and_wait_timeout(&u->ring, &cqe, 1, &ts, NULL);
    }
    /* submitted with the wait: what the kernel took (none when it refused
     * the submit: counted each time, a run of refused sleeps counted them
     * dozens of times); with SQPOLL, what went to its thread */
    u->stats.sqes += u->opts.sqpoll ? ready : ready - io_uring_sq_ready(&u->ring);
    u->stats.enters++;
    return rc < 0 ? rc : 0;
}

int pl_uring_op_take(pl_uring_t *u, int i, pl_uring_result_t *out)
{
    struct uring_op *op;

    if (i < 0 || (uint32_t)i >= u->nops || uring_op(u, i)->state == OP_FREE)
        return -ESRCH;
    op = uring_op(u, i);
    if (op->state != OP_DONE)
        return 0;
    uring_op_take_done(u, (uint32_t)i, out);
    return 1;
}

uint32_t pl_uring_op_gen(pl_uring_t *u, int i)
{
    if (i < 0 || (uint32_t)i >= u->nops)
        return 0;
    return uring_op(u, i)->gen;
}

int pl_uring_op_settled(pl_uring_t *u, int i, uint32_t gen)
{
    const struct uring_op *op;

    if (i < 0 || (uint32_t)i >= u->nops)
        return 1;
    op = uring_op(u, i);
    return op->gen != gen || op->state == OP_FREE || op->state == OP_DONE;
}

uint32_t pl_uring_abandoned_settled(const pl_uring_t *u)
{
    return u->abandoned_settled;
}

/* ---- statistics and helpers ---------------------------------------------- */

void pl_uring_get_stats(pl_uring_t *u, pl_uring_stats_t *out)
{
    *out = u->stats;
    out->in_flight = u->in_flight;
    /* the pool is mapped at the first acquire: until then all of it is
     * free, unless registering it failed (then none is) */
    out->buffers_free = u->bufs ? u->nfree_bufs : u->pool_refused ? 0 : u->opts.buffer_count;
}

static int uring_stats(pl_reactor_t *self, pl_stat_t *out, int max)
{
    static const char *const names[] = {
        "sqes", "enters", "completions", "in_flight", "in_flight_max",
        "buffer_waits", "buffers_free", "resubmits", "cancels",
    };
    pl_uring_stats_t s;
    double values[9];
    int n;

    pl_uring_get_stats((pl_uring_t *)self, &s);
    values[0] = s.sqes;
    values[1] = s.enters;
    values[2] = s.completions;
    values[3] = s.in_flight;
    values[4] = s.in_flight_max;
    values[5] = s.buffer_waits;
    values[6] = s.buffers_free;
    values[7] = s.resubmits;
    values[8] = s.cancels;
    for (n = 0; n < 9 && n < max; n++) {
        out[n].name = names[n];
        out[n].value = values[n];
    }
    return n;
}
