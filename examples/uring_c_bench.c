/*
 * uring_c_bench.c - the yardstick for uring_bench.lua: a plain C liburing
 * loop doing the same random reads (or sequential reads/writes) at the same
 * queue depth, with registered buffers, and nothing else but what
 * uring_bench.lua does for each operation too: it records the operation's
 * latency in the same histogram (libpluvio's pl_hist_*, one clock stamp
 * per completion).  Without it the yardstick skipped a cost that every
 * Pluvio figure beside it paid (and fio pays: it reports latencies).
 *
 *   uring_c_bench FILE [--bs N] [--size N] [--iodepth N] [--ops N | --runtime S]
 *                      [--rw randread|read|write] [--direct]
 *
 * Prints one line of JSON: {"ops":..,"seconds":..,"iops":..,"mib_s":..,
 * "enters":..,"lat_p50_us":..,"lat_p99_us":..}.  Operations cover the
 * first --size bytes of the file (all of it by default), as
 * uring_bench.lua's and fio's --size do.  Random
 * offsets are whole blocks drawn uniformly from that range by xorshift64;
 * uring_bench.lua draws them from the same range and distribution with
 * LuaJIT's math.random, so the two read different blocks in a different
 * order (and fio a third).
 *
 * Built with -DURING_FLOOR as build/uring_floor.so, the same loop is cut in
 * two calls, uring_floor_queue(i) and uring_floor_wait(slots), for
 * examples/uring_floor.lua to drive from LuaJIT: with a coroutine resumed
 * per read and nothing else, it is the floor of a task-per-read runtime.
 */
#include <errno.h>
#include <fcntl.h>
#include <liburing.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "pluvio.h"

static double now(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static uint64_t rng = 88172645463325252ULL;

static uint64_t next_rand(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

/* The buffers as Pluvio's registered pool maps them (src/uring_buf.c): from
 * 512 KiB on, in whole 2 MiB units on a 2 MiB boundary with transparent
 * huge pages asked for.  Plain 4 KiB pages give an O_DIRECT 1 MiB
 * operation 256 segments instead of one, which made this loop, the
 * yardstick, do a different and slower I/O than the Pluvio run it is set
 * beside. */
static char *map_buffers(size_t len)
{
    const size_t huge_page = (size_t)2 << 20;
    int huge = len >= ((size_t)512 << 10) && sysconf(_SC_PAGESIZE) == 4096;
    size_t slack = huge ? huge_page : 0;
    char *p, *start;

    if (huge)
        len = (len + huge_page - 1) & ~(huge_page - 1);
    p = mmap(NULL, len + slack, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED || !huge)
        return p == MAP_FAILED ? NULL : p;
    start = (char *)(((uintptr_t)p + huge_page - 1) & ~(uintptr_t)(huge_page - 1));
    (void)madvise(start, len, MADV_HUGEPAGE);   /* a hint, as in the pool */
    return start;
}

#ifdef URING_FLOOR
#define NAME "uring_floor"
#else
#define NAME "uring_c_bench"
#endif

/* The loop's state: one run per process. */
static struct io_uring ring;
static int fd = -1, writing, randomly;
static long bs;
static uint64_t blocks, seq, submitted;
static struct iovec *iov;
static double *stamp;       /* when buffer i's op started */
static pl_hist_t *hist;

/* Open path and set up a ring of depth ops on registered buffers of bs
 * bytes over the first size bytes (0: all of it); 0, or 1 after saying why
 * on stderr. */
static int setup(const char *path, const char *rw, long bsize, long depth, long size, int direct)
{
    if (bsize <= 0 || depth <= 0) {     /* (a block count divides by it) */
        fprintf(stderr, NAME ": the block size and the queue depth must be at least 1\n");
        return 1;
    }
    bs = bsize;
    writing = !strcmp(rw, "write");
    randomly = !strcmp(rw, "randread");     /* (not a strcmp per op in the yardstick) */
    fd = open(path, (writing ? O_RDWR | O_CREAT : O_RDONLY) | (direct ? O_DIRECT : 0), 0644);
    if (fd < 0) {
        fprintf(stderr, NAME ": open %s: %s\n", path, strerror(errno));
        return 1;
    }
    struct stat st;
    fstat(fd, &st);
    blocks = (uint64_t)st.st_size / (uint64_t)bs;
    if (size > 0) {
        /* the range the others use: a larger file's tail is not read (with
         * the whole file, --quick's 128 MiB runs read 1 GiB here) */
        if (!writing && size > st.st_size) {
            fprintf(stderr, NAME ": %s is shorter than --size %ld\n", path, size);
            return 1;
        }
        blocks = (uint64_t)size / (uint64_t)bs;
    }
    if (!writing && blocks == 0) {
        if (size > 0)
            fprintf(stderr, NAME ": --size %ld is smaller than one block (%ld bytes)\n", size, bsize);
        else
            fprintf(stderr, NAME ": %s is smaller than one block\n", path);
        return 1;
    }
    if (writing && blocks == 0)
        blocks = 1024;

    int rc = io_uring_queue_init((unsigned)depth, &ring, 0);
    if (rc < 0) {
        fprintf(stderr, NAME ": io_uring_queue_init: %s\n", strerror(-rc));
        return 1;
    }
    char *mem = map_buffers((size_t)(bs * depth));
    iov = calloc((size_t)depth, sizeof(*iov));
    stamp = calloc((size_t)depth, sizeof(*stamp));
    hist = pl_hist_new();
    if (!mem || !iov || !stamp || !hist) {
        fprintf(stderr, NAME ": out of memory\n");
        return 1;
    }
    for (long i = 0; i < depth; i++) {
        iov[i].iov_base = mem + i * bs;
        iov[i].iov_len = (size_t)bs;
        memset(iov[i].iov_base, 0x5a, (size_t)bs);
    }
    rc = io_uring_register_buffers(&ring, iov, (unsigned)depth);
    if (rc < 0) {
        fprintf(stderr, NAME ": register buffers: %s\n", strerror(-rc));
        return 1;
    }
    return 0;
}

/* Queue one op in buffer i. */
static inline void queue_op(long i)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(&ring);
    uint64_t blk = randomly ? next_rand() % blocks : seq++ % blocks;

    if (writing)
        io_uring_prep_write_fixed(sqe, fd, iov[i].iov_base, (unsigned)bs, blk * (uint64_t)bs, (int)i);
    else
        io_uring_prep_read_fixed(sqe, fd, iov[i].iov_base, (unsigned)bs, blk * (uint64_t)bs, (int)i);
    io_uring_sqe_set_data64(sqe, (uint64_t)i);
    submitted++;
}

#ifdef URING_FLOOR

/* The floor library's calls (examples/uring_floor.lua): set up; queue a
 * read in buffer i; submit and wait for one completion at least, record
 * each one's latency, put their buffer numbers in slots and return how
 * many (-1 for an op that did not move bs bytes). */
int uring_floor_open(const char *path, long bsize, long depth, long size)
{
    if (setup(path, "randread", bsize, depth, size, 0))
        return -1;
    for (long i = 0; i < depth; i++)
        stamp[i] = pl_hist_stamp();
    return 0;
}

void uring_floor_queue(int i)
{
    queue_op(i);
}

double uring_floor_now(void)
{
    return now();
}

/* What uring_floor_open made, given back (the buffers' mapping goes with
 * the process). */
void uring_floor_close(void)
{
    if (ring.ring_fd > 0)
        io_uring_queue_exit(&ring);
    if (fd >= 0)
        close(fd);
    pl_hist_free(hist);
    free(stamp);
    free(iov);
}

int uring_floor_wait(int *slots)
{
    struct io_uring_cqe *cqe;
    unsigned head, n = 0;

    io_uring_submit_and_wait(&ring, 1);
    io_uring_for_each_cqe(&ring, head, cqe) {
        uint64_t i = io_uring_cqe_get_data64(cqe);
        if (cqe->res != bs)
            return -1;
        stamp[i] = pl_hist_record_stamp(hist, stamp[i]);   /* (the next op starts now) */
        slots[n++] = (int)i;
    }
    io_uring_cq_advance(&ring, n);
    return (int)n;
}

#else

static void usage(void)
{
    fprintf(stderr, "usage: uring_c_bench FILE [--bs N] [--size N] [--iodepth N] [--ops N | --runtime S] "
                    "[--rw randread|read|write] [--direct]\n");
    exit(2);
}

int main(int argc, char **argv)
{
    const char *path = NULL, *rw = "randread";
    long bsize = 4096, depth = 1, max_ops = 0, size = 0;
    double runtime = 2.0;
    int direct = 0;

    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--bs") && i + 1 < argc)
            bsize = atol(argv[++i]);
        else if (!strcmp(argv[i], "--size") && i + 1 < argc)
            size = atol(argv[++i]);
        else if (!strcmp(argv[i], "--iodepth") && i + 1 < argc)
            depth = atol(argv[++i]);
        else if (!strcmp(argv[i], "--ops") && i + 1 < argc)
            max_ops = atol(argv[++i]);
        else if (!strcmp(argv[i], "--runtime") && i + 1 < argc)
            runtime = atof(argv[++i]);
        else if (!strcmp(argv[i], "--rw") && i + 1 < argc)
            rw = argv[++i];
        else if (!strcmp(argv[i], "--direct"))
            direct = 1;
        else if (argv[i][0] != '-' && !path)
            path = argv[i];
        else
            usage();
    }
    if (!path || bsize <= 0 || size < 0 || depth <= 0 || depth > 4096)
        usage();
    if (setup(path, rw, bsize, depth, size, direct))
        return 1;

    uint64_t ops = 0, enters = 0, next_check = 64;
    double t0 = now(), deadline = t0 + runtime;
    int stop = 0;

    for (long i = 0; i < depth; i++) {
        stamp[i] = pl_hist_stamp();
        queue_op(i);
    }
    uint64_t in_flight = (uint64_t)depth;
    while (in_flight > 0) {
        struct io_uring_cqe *cqe;
        unsigned head, n = 0;

        io_uring_submit_and_wait(&ring, 1);
        enters++;
        io_uring_for_each_cqe(&ring, head, cqe) {
            uint64_t i = io_uring_cqe_get_data64(cqe);
            if (cqe->res != bs) {
                fprintf(stderr, "uring_c_bench: I/O returned %d\n", cqe->res);
                return 1;
            }
            n++;
            ops++;
            in_flight--;
            stamp[i] = pl_hist_record_stamp(hist, stamp[i]);   /* (the next op starts now) */
            if (!stop && (max_ops ? submitted < (uint64_t)max_ops : 1)) {
                queue_op((long)i);
                in_flight++;
            }
        }
        io_uring_cq_advance(&ring, n);
        /* the clock every 64 ops, not every 64 enters: at 1 MiB an enter
         * can take a few ms, and the run overshot --runtime by half */
        if (!max_ops && ops >= next_check) {
            next_check = ops + 64;
            if (now() >= deadline)
                stop = 1;
        }
    }
    double secs = now() - t0;
    printf("{\"ops\":%llu,\"seconds\":%.6f,\"iops\":%.1f,\"mib_s\":%.2f,\"enters\":%llu,"
           "\"lat_p50_us\":%.2f,\"lat_p99_us\":%.2f}\n",
           (unsigned long long)ops, secs, ops / secs, ops * (double)bs / secs / 1048576.0,
           (unsigned long long)enters, pl_hist_percentile(hist, 50) * 1e6,
           pl_hist_percentile(hist, 99) * 1e6);
    pl_hist_free(hist);
    free(stamp);
    free(iov);
    io_uring_queue_exit(&ring);
    close(fd);
    return 0;
}

#endif
