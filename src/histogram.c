/*
 * histogram.c - latency histogram with log-linear buckets.
 *
 * Values are recorded as integer nanoseconds.  Below 256 ns every value has
 * its own bucket; above, each power of two is split into 128 buckets, so a
 * bucket is at most 1/128 of its lower bound wide and a percentile reported
 * at the bucket's midpoint is within 0.4% of the true value.  Memory is
 * constant (5376 counters, up to ~2^48 ns = 3.2 days) and two histograms
 * merge by adding counters.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#define SUB_BITS 7
#define SUB (1u << SUB_BITS)            /* buckets per power of two */
#define MAX_SHIFT 40
#define NBUCKETS (SUB * (MAX_SHIFT + 2))

struct pl_hist {
    uint64_t counts[NBUCKETS];
    uint64_t total;
    uint64_t min, max;
    double sum;
};

static unsigned bucket_of(uint64_t v)
{
    unsigned msb, shift;

    if (v < 2 * SUB)
        return (unsigned)v;
    msb = 63u - (unsigned)__builtin_clzll(v);
    shift = msb - SUB_BITS;
    if (shift > MAX_SHIFT)
        return NBUCKETS - 1;
    return SUB * shift + (unsigned)(v >> shift);
}

/* Lowest value of bucket b, and its width. */
static void bucket_range(unsigned b, uint64_t *low, uint64_t *width)
{
    unsigned shift;

    if (b < 2 * SUB) {
        *low = b;
        *width = 1;
        return;
    }
    shift = b / SUB - 1;
    *low = (uint64_t)(b - SUB * shift) << shift;
    *width = (uint64_t)1 << shift;
}

pl_hist_t *pl_hist_new(void)
{
    pl_hist_t *h = calloc(1, sizeof(*h));

    pl_cycles_init();    /* for stamps */
    if (h)
        h->min = UINT64_MAX;
    return h;
}

void pl_hist_free(pl_hist_t *h)
{
    free(h);
}

void pl_hist_reset(pl_hist_t *h)
{
    memset(h, 0, sizeof(*h));
    h->min = UINT64_MAX;
}

static void record_ns(pl_hist_t *h, uint64_t v)
{
    h->counts[bucket_of(v)]++;
    h->total++;
    h->sum += (double)v;
    if (v < h->min)
        h->min = v;
    if (v > h->max)
        h->max = v;
}

/* seconds >= 0; negative and NaN values count as 0, and values past what
 * the counts hold (2^64 ns, infinity) as the largest: converting those to
 * uint64_t is undefined (it gave 0 on x86, a huge latency recorded as none). */
static uint64_t ns_value(double ns)
{
    return !(ns > 0) ? 0 : ns >= 0x1p64 ? UINT64_MAX : (uint64_t)(ns + 0.5);
}

void pl_hist_record(pl_hist_t *h, double seconds)
{
    record_ns(h, ns_value(seconds * 1e9));
}

/* Record now - start (monotonic seconds) and return now: one call per
 * operation when timing back-to-back operations. */
double pl_hist_record_since(pl_hist_t *h, double start)
{
    int64_t now = pl_clock_ns();

    /* in doubles: start may be NaN or infinite (as for record) */
    record_ns(h, ns_value((double)now - start * 1e9));
    return (double)now / 1e9;
}

double pl_hist_stamp(void)
{
    pl_cycles_init();
    return (double)pl_cycles();
}

/* A stamp `seconds` from now: a deadline to compare stamps with. */
double pl_hist_stamp_after(double seconds)
{
    pl_cycles_init();
    return (double)pl_cycles() + seconds * 1e9 / pl_ns_per_cycle;   /* (a double: no overflow for large seconds) */
}

/* The TSC costs a third of a clock_gettime under kvm-clock, which shows at
 * a million operations a second; stamps from one process on one machine
 * are comparable, and the rate error (< 0.1%) is below the buckets'. */
double pl_hist_record_stamp(pl_hist_t *h, double stamp)
{
    int64_t now = pl_cycles();
    double ns = ((double)now - stamp) * pl_ns_per_cycle;

    record_ns(h, ns_value(ns));
    return (double)now;
}

void pl_hist_merge(pl_hist_t *into, const pl_hist_t *from)
{
    for (unsigned b = 0; b < NBUCKETS; b++)
        into->counts[b] += from->counts[b];
    into->total += from->total;
    into->sum += from->sum;
    if (from->min < into->min)
        into->min = from->min;
    if (from->max > into->max)
        into->max = from->max;
}

double pl_hist_count(const pl_hist_t *h)
{
    return (double)h->total;
}

double pl_hist_min(const pl_hist_t *h)
{
    return h->total ? (double)h->min / 1e9 : 0;
}

double pl_hist_max(const pl_hist_t *h)
{
    return (double)h->max / 1e9;
}

double pl_hist_mean(const pl_hist_t *h)
{
    return h->total ? h->sum / (double)h->total / 1e9 : 0;
}

/* The value below which p percent of the recorded values fall (nearest
 * rank), in seconds; the bucket midpoint, clamped to [min, max]. */
double pl_hist_percentile(const pl_hist_t *h, double p)
{
    uint64_t rank, seen = 0, low, width;
    double x, mid;

    if (h->total == 0)
        return 0;
    if (!(p > 0))
        return (double)h->min / 1e9;
    if (p >= 100)
        return (double)h->max / 1e9;
    /* p / 100 * total can come out a hair above a whole rank (99.9 / 100
     * * 1000 is 999.0000000000001), and its ceiling is then a rank too far:
     * the largest value instead of the 999th.  The rounding error is a few
     * ulps; taking off 1e-12 of x removes it and no real fraction of a rank. */
    x = p / 100.0 * (double)h->total;
    rank = (uint64_t)ceil(x - x * 1e-12);
    if (rank < 1)
        rank = 1;
    for (unsigned b = 0; b < NBUCKETS; b++) {
        seen += h->counts[b];
        if (seen >= rank) {
            bucket_range(b, &low, &width);
            mid = (double)low + (double)(width - 1) / 2.0;
            if (mid < (double)h->min)
                mid = (double)h->min;
            if (mid > (double)h->max)
                mid = (double)h->max;
            return mid / 1e9;
        }
    }
    return (double)h->max / 1e9;
}

/* Non-empty buckets, for plots: lower bounds (seconds) and counts. */
int pl_hist_buckets(const pl_hist_t *h, double *lower, double *counts, int max)
{
    int n = 0;

    for (unsigned b = 0; b < NBUCKETS && n < max; b++) {
        if (h->counts[b]) {
            uint64_t low, width;
            bucket_range(b, &low, &width);
            lower[n] = (double)low / 1e9;
            counts[n] = (double)h->counts[b];
            n++;
        }
    }
    return n;
}
