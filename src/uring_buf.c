/*
 * uring_buf.c - the registered ("fixed") buffer pool of the io_uring
 * reactor: mapped and registered on first use, handed out in FIFO order to
 * parked tasks, and reclaimed only when the kernel is done with a buffer.
 */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <linux/capability.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "uring_internal.h"

#define HUGE_PAGE ((size_t)2 << 20)
#define HUGE_MIN ((size_t)512 << 10)
#define MAX_BUFFERS 16384       /* the kernel's IORING_MAX_REG_BUFFERS (and buffer_count's max) */

/* Whether a pool of len bytes is mapped in 2 MiB units: only where pages
 * are 4 KiB (map_pool's trims need len to be a multiple of the page size,
 * and elsewhere THP is not 2 MiB). */
static bool pool_huge(size_t len)
{
    return len >= HUGE_MIN && sysconf(_SC_PAGESIZE) == 4096;
}

/* The bytes map_pool maps for a pool of len bytes: what the kernel pins
 * and counts against the locked-memory limit when it registers them. */
static size_t pool_mapped(size_t len)
{
    return pool_huge(len) ? (len + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1) : len;
}

/* The pool's memory: a pool of 512 KiB or more is mapped in whole 2 MiB
 * units (rounded up: at most 4 times a small pool's size), on a 2 MiB
 * boundary, and asks for transparent huge pages.  The kernel then pins and
 * maps it (for io_uring's registration, for UCX's process_vm_readv on a
 * peer's buffer) in 2 MiB steps instead of 4 KiB ones: 64 KiB AM
 * bandwidth over shared memory went from 7.7 to 10.3 GB/s with the pool of
 * 12 x 64 KiB in one huge page.  Without THP it is plain memory.  *map_len
 * is the length to unmap. */
static char *map_pool(size_t len, size_t *map_len)
{
    bool huge = pool_huge(len);
    size_t slack = huge ? HUGE_PAGE : 0;
    char *p;
    uintptr_t start, end;

    len = pool_mapped(len);
    *map_len = len;
    p = mmap(NULL, len + slack, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        return NULL;
    if (!huge)
        return p;
    start = ((uintptr_t)p + HUGE_PAGE - 1) & ~(uintptr_t)(HUGE_PAGE - 1);
    end = start + len;
    if (start > (uintptr_t)p)
        munmap(p, start - (uintptr_t)p);
    if ((uintptr_t)p + len + slack > end)
        munmap((char *)end, (uintptr_t)p + len + slack - end);
    (void)madvise((char *)start, len, MADV_HUGEPAGE);   /* a hint: no THP is fine */
    return (char *)start;
}

static bool may_lock_unlimited(void)
{
    struct __user_cap_header_struct hdr = { .version = _LINUX_CAPABILITY_VERSION_3, .pid = 0 };
    struct __user_cap_data_struct data[_LINUX_CAPABILITY_U32S_3];

    if (syscall(SYS_capget, &hdr, data) != 0)
        return false;
    return (data[CAP_TO_INDEX(CAP_IPC_LOCK)].effective & CAP_TO_MASK(CAP_IPC_LOCK)) != 0;
}

/* What the rings take of the limit: this reactor's (an SQE of 64 bytes and
 * two CQEs of 16 per entry, rounded up) and 1 MiB for the other reactors'
 * of this user (a default ring takes about 24 KiB). */
#define RING_BYTES_PER_ENTRY 96
#define OTHER_RINGS ((size_t)1 << 20)

int pl_uring_memlock_buffers(uint32_t buffer_size, uint32_t queue_size, uint32_t share)
{
    struct rlimit rl;
    size_t n = 0, reserve = OTHER_RINGS + (size_t)queue_size * RING_BYTES_PER_ENTRY, budget, part;

    if (buffer_size == 0 || may_lock_unlimited() || getrlimit(RLIMIT_MEMLOCK, &rl) != 0 ||
        rl.rlim_cur == RLIM_INFINITY)
        return -1;
    part = rl.rlim_cur / (share > 0 ? share : 1);
    budget = part > reserve ? part - reserve : 0;
    while (n < MAX_BUFFERS && pool_mapped((n + 1) * (size_t)buffer_size) <= budget)
        n++;
    return (int)n;
}

double pl_memlock_limit_kib(void)
{
    struct rlimit rl;

    if (getrlimit(RLIMIT_MEMLOCK, &rl) != 0 || rl.rlim_cur == RLIM_INFINITY)
        return -1;
    return (double)(rl.rlim_cur / 1024);
}

/* The pool is mapped and registered on first use, so a reactor nobody asks
 * for buffers never pins memory (and never hits RLIMIT_MEMLOCK). */
int pl_uring_buffers_register(pl_uring_t *u)
{
    uint32_t n = u->opts.buffer_count;
    size_t size = u->opts.buffer_size;
    struct iovec *iov;
    int rc = -ENOMEM;

    if (n == 0)
        return -ENOBUFS;
    if (u->bufs)
        return 0;
    u->pool_refused = true;     /* until the registration below succeeds */
    u->buf_mem_len = size * n;
    u->buf_mem = map_pool(u->buf_mem_len, &u->buf_map_len);
    if (!u->buf_mem)
        return -ENOMEM;
    u->bufs = calloc(n, sizeof(*u->bufs));
    iov = calloc(n, sizeof(*iov));
    if (!u->bufs || !iov) {
        free(iov);
        goto fail;
    }
    u->free_buf = NONE;
    for (uint32_t i = n; i-- > 0;) {
        iov[i].iov_base = u->buf_mem + (size_t)i * size;
        iov[i].iov_len = size;
        u->bufs[i].next_free = u->free_buf;
        u->free_buf = i;
    }
    u->nfree_bufs = n;
    rc = io_uring_register_buffers(&u->ring, iov, n);
    free(iov);
    if (rc == 0) {
        u->pool_refused = false;
        return 0;
    }
fail:
    munmap(u->buf_mem, u->buf_map_len);
    u->buf_mem = NULL;
    free(u->bufs);
    u->bufs = NULL;
    u->free_buf = NONE;
    u->nfree_bufs = 0;
    return rc < 0 ? rc : -ENOMEM;
}

/* ---- registered buffers -------------------------------------------------- */

int pl_uring_buffer_count(pl_uring_t *u)
{
    return (int)u->opts.buffer_count;
}

uint32_t pl_uring_buffer_size(pl_uring_t *u)
{
    return u->opts.buffer_size;
}

void *pl_uring_buffer_ptr(pl_uring_t *u, int index)
{
    if (!u->buf_mem || index < 0 || (uint32_t)index >= u->opts.buffer_count)
        return NULL;
    return u->buf_mem + (size_t)index * u->opts.buffer_size;
}

/* handoff[] is indexed by task slot; it grows with the largest slot seen. */
static int handoff_reserve(pl_uring_t *u, uint32_t slot)
{
    uint32_t cap = u->handoff_cap ? u->handoff_cap : 64;
    int32_t *h;
    uint32_t *g;

    if (slot < u->handoff_cap)
        return 0;
    while (cap <= slot)
        cap *= 2;
    h = realloc(u->handoff, sizeof(*h) * cap);
    if (!h)
        return -ENOMEM;
    u->handoff = h;
    g = realloc(u->handoff_gen, sizeof(*g) * cap);
    if (!g)
        return -ENOMEM;
    u->handoff_gen = g;
    for (uint32_t i = u->handoff_cap; i < cap; i++) {
        h[i] = NO_BUF;
        g[i] = 0;
    }
    u->handoff_cap = cap;
    return 0;
}

static int waiters_push(pl_uring_t *u, uint32_t slot, uint32_t gen)
{
    if (u->waiters_len == u->waiters_cap &&
        pl_fifo_grow((void **)&u->waiters, &u->waiters_cap, &u->waiters_head, u->waiters_len,
                     sizeof(*u->waiters), 64) < 0)
        return -ENOMEM;
    u->waiters[(u->waiters_head + u->waiters_len++) % u->waiters_cap] =
        (struct buf_waiter){ slot, gen };
    return 0;
}

static struct buf_waiter *find_waiter(pl_uring_t *u, uint32_t slot, uint32_t gen)
{
    for (uint32_t k = 0; k < u->waiters_len; k++) {
        struct buf_waiter *w = &u->waiters[(u->waiters_head + k) % u->waiters_cap];
        if (w->slot == slot && w->gen == gen)
            return w;
    }
    return NULL;
}

/* Give buffer index to the first waiter still waiting (FIFO), or free it. */
void uring_buffer_put(pl_uring_t *u, pl_runtime_t *rt, int index)
{
    while (u->waiters_len > 0) {
        struct buf_waiter w = u->waiters[u->waiters_head];
        u->waiters_head = (u->waiters_head + 1) % u->waiters_cap;
        u->waiters_len--;
        if (w.slot < u->handoff_cap && rt && pl_task_wake(rt, w.slot, w.gen) >= 0) {
            u->handoff[w.slot] = index;
            u->handoff_gen[w.slot] = w.gen;
            return;             /* stays held, now by the waiter */
        }
    }
    u->bufs[index].state = BUF_FREE;
    u->bufs[index].next_free = u->free_buf;
    u->free_buf = (uint32_t)index;
    u->nfree_bufs++;
}

int pl_uring_buffer_acquire(pl_uring_t *u, pl_runtime_t *rt, uint32_t slot, uint32_t gen)
{
    int rc = pl_uring_buffers_register(u);

    if (rc < 0)
        return rc;
    if (slot < u->handoff_cap && u->handoff[slot] != NO_BUF) {
        int index = u->handoff[slot];
        u->handoff[slot] = NO_BUF;
        if (u->handoff_gen[slot] == gen)
            return index;
        uring_buffer_put(u, rt, index);   /* a dead task's: pass it on */
    }
    if (u->free_buf != NONE && u->waiters_len == 0) {
        uint32_t i = u->free_buf;
        u->free_buf = u->bufs[i].next_free;
        u->nfree_bufs--;
        u->bufs[i].state = BUF_HELD;
        return (int)i;
    }
    if (find_waiter(u, slot, gen))
        return -EAGAIN;
    rc = handoff_reserve(u, slot);
    if (rc == 0)
        rc = waiters_push(u, slot, gen);
    if (rc < 0)
        return rc;
    u->stats.buffer_waits++;
    return -EAGAIN;
}

void pl_uring_buffer_abandon(pl_uring_t *u, pl_runtime_t *rt, uint32_t slot, uint32_t gen)
{
    struct buf_waiter *w = find_waiter(u, slot, gen);

    if (w)
        w->slot = NONE;         /* skipped when its turn comes */
    if (slot < u->handoff_cap && u->handoff[slot] != NO_BUF && u->handoff_gen[slot] == gen) {
        int index = u->handoff[slot];
        u->handoff[slot] = NO_BUF;
        uring_buffer_put(u, rt, index);
    }
}

int pl_uring_buffer_waiters(pl_uring_t *u, const pl_runtime_t *rt, uint32_t *first)
{
    int n = 0;

    for (uint32_t k = 0; k < u->waiters_len; k++) {
        const struct buf_waiter *w = &u->waiters[(u->waiters_head + k) % u->waiters_cap];
        if (pl_task_is_live(rt, w->slot, w->gen) && n++ == 0)
            *first = w->slot;
    }
    for (uint32_t slot = 0; slot < u->handoff_cap; slot++)
        if (u->handoff[slot] != NO_BUF && pl_task_is_live(rt, slot, u->handoff_gen[slot]) && n++ == 0)
            *first = slot;
    return n;
}

int pl_uring_buffer_release(pl_uring_t *u, pl_runtime_t *rt, int index)
{
    struct uring_buf *b;

    if (!u->bufs || index < 0 || (uint32_t)index >= u->opts.buffer_count)
        return -EINVAL;
    b = &u->bufs[index];
    if (b->state != BUF_HELD || b->release_pending)
        return -EALREADY;
    u->rt = rt;
    if (b->users > 0) {         /* an abandoned op may still write into it */
        b->release_pending = true;
        return 0;
    }
    uring_buffer_put(u, rt, index);
    return 0;
}

/* The registered buffer holding [addr, addr + len), or NO_BUF. */
int uring_buffer_index_of(const pl_uring_t *u, const void *addr, size_t len)
{
    const char *p = addr;
    size_t size = u->opts.buffer_size, off;

    if (!u->buf_mem || p < u->buf_mem || p >= u->buf_mem + u->buf_mem_len)
        return NO_BUF;
    off = (size_t)(p - u->buf_mem);
    if (off % size + len > size)
        return NO_BUF;
    return (int)(off / size);
}

/* A hold of an op nobody waits for any more (its task was killed, its
 * worker closed while UCX kept it) counts as a cancelled use (delta 1),
 * until UCX is done with it and it is let go of (delta -1: unhold too). */
int pl_uring_buffer_hold_cancelled(pl_uring_t *u, int index, int delta)
{
    struct uring_buf *b = uring_held_buf(u, index);

    if (!b || b->users == 0 || (delta < 0 && b->cancelled == 0))
        return -EINVAL;
    b->cancelled += (uint32_t)delta;
    if (delta < 0)
        uring_buffer_unuse(u, index);
    return 0;
}

/* How many ops whose task let go of them (killed) still use buffer index. */
int pl_uring_buffer_cancelled(pl_uring_t *u, int index)
{
    const struct uring_buf *b = uring_held_buf(u, index);

    return b ? (int)b->cancelled : 0;
}

/* An op (or a hold) stops using buffer index; a release that waited for
 * the last user completes now. */
int pl_uring_buffer_hold(pl_uring_t *u, int index)
{
    struct uring_buf *b = uring_held_buf(u, index);

    if (!b)
        return -EINVAL;
    b->users++;
    return 0;
}

int pl_uring_buffer_unhold(pl_uring_t *u, int index)
{
    const struct uring_buf *b = uring_held_buf(u, index);

    if (!b || b->users == 0)
        return -EINVAL;
    uring_buffer_unuse(u, index);
    return 0;
}

/* MAP_NORESERVE: a read(offset, 1 GiB) of a 5-byte file asks for 1 GiB and
 * uses one page of it; it must not be refused by overcommit accounting nor
 * cost the zero fill of the whole length (4 s and 1 GiB resident with
 * LuaJIT's ffi.new). */
void *pl_scratch_alloc(size_t len)
{
    void *p;

    if (len == 0) {
        errno = EINVAL;
        return NULL;
    }
    p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    return p == MAP_FAILED ? NULL : p;
}

void pl_scratch_free(void *p, size_t len)
{
    if (p)
        munmap(p, len);
}
