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

static void usage(void)
{
    fprintf(stderr, "usage: uring_c_bench FILE [--bs N] [--size N] [--iodepth N] [--ops N | --runtime S] "
                    "[--rw randread|read|write] [--direct]\n");
    exit(2);
}

int main(int argc, char **argv)
{
    const char *path = NULL, *rw = "randread";
    long bs = 4096, depth = 1, max_ops = 0, size = 0;
    double runtime = 2.0;
    int direct = 0;

    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--bs") && i + 1 < argc)
            bs = atol(argv[++i]);
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
    if (!path || bs <= 0 || size < 0 || depth <= 0 || depth > 4096)
        usage();

    int writing = !strcmp(rw, "write");
    int fd = open(path, (writing ? O_RDWR | O_CREAT : O_RDONLY) | (direct ? O_DIRECT : 0), 0644);
    if (fd < 0) {
        fprintf(stderr, "uring_c_bench: open %s: %s\n", path, strerror(errno));
        return 1;
    }
    struct stat st;
    fstat(fd, &st);
    uint64_t blocks = (uint64_t)st.st_size / (uint64_t)bs;
    if (size > 0) {
        /* the range the others use: a larger file's tail is not read (with
         * the whole file, --quick's 128 MiB runs read 1 GiB here) */
        if (!writing && size > st.st_size) {
            fprintf(stderr, "uring_c_bench: %s is shorter than --size %ld\n", path, size);
            return 1;
        }
        blocks = (uint64_t)size / (uint64_t)bs;
    }
    if (!writing && blocks == 0) {
        fprintf(stderr, "uring_c_bench: %s is smaller than one block\n", path);
        return 1;
    }
    if (writing && blocks == 0)
        blocks = 1024;

    struct io_uring ring;
    int rc = io_uring_queue_init((unsigned)depth, &ring, 0);
    if (rc < 0) {
        fprintf(stderr, "uring_c_bench: io_uring_queue_init: %s\n", strerror(-rc));
        return 1;
    }
    char *mem = map_buffers((size_t)(bs * depth));
    struct iovec *iov = calloc((size_t)depth, sizeof(*iov));
    double *stamp = calloc((size_t)depth, sizeof(*stamp));    /* when buffer i's op started */
    pl_hist_t *hist = pl_hist_new();
    if (!mem || !iov || !stamp || !hist) {
        fprintf(stderr, "uring_c_bench: out of memory\n");
        return 1;
    }
    for (long i = 0; i < depth; i++) {
        iov[i].iov_base = mem + i * bs;
        iov[i].iov_len = (size_t)bs;
        memset(iov[i].iov_base, 0x5a, (size_t)bs);
    }
    rc = io_uring_register_buffers(&ring, iov, (unsigned)depth);
    if (rc < 0) {
        fprintf(stderr, "uring_c_bench: register buffers: %s\n", strerror(-rc));
        return 1;
    }

    uint64_t seq = 0, ops = 0, submitted = 0, enters = 0, next_check = 64;
    double t0 = now(), deadline = t0 + runtime;
    int stop = 0;
    const int randomly = !strcmp(rw, "randread");   /* (not a strcmp per op in the yardstick) */

    /* Queue one op in buffer i. */
#define QUEUE(i)                                                                   \
    do {                                                                           \
        struct io_uring_sqe *sqe = io_uring_get_sqe(&ring);                        \
        uint64_t blk = randomly ? next_rand() % blocks : seq++ % blocks;          \
        if (writing)                                                               \
            io_uring_prep_write_fixed(sqe, fd, iov[i].iov_base, (unsigned)bs,      \
                                      blk * (uint64_t)bs, (int)(i));               \
        else                                                                       \
            io_uring_prep_read_fixed(sqe, fd, iov[i].iov_base, (unsigned)bs,       \
                                     blk * (uint64_t)bs, (int)(i));                \
        io_uring_sqe_set_data64(sqe, (uint64_t)(i));                               \
        submitted++;                                                               \
    } while (0)

    for (long i = 0; i < depth; i++) {
        stamp[i] = pl_hist_stamp();
        QUEUE(i);
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
                QUEUE(i);
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
