/*
 * checksum.c - a fast 64-bit checksum and a reproducible data pattern, for
 * verifying what went through a pipeline (not for security).
 *
 * The checksum mixes 8-byte words in four independent lanes so the CPU can
 * overlap the multiplies; it is order-sensitive and sees every byte.
 */
#include <string.h>

#include "pluvio.h"

#define K1 0x9e3779b97f4a7c15ULL
#define K2 0xc2b2ae3d27d4eb4fULL

static uint64_t rotl(uint64_t x, int r)
{
    return (x << r) | (x >> (64 - r));
}

static uint64_t lane(uint64_t acc, uint64_t w)
{
    return rotl(acc + w * K2, 31) * K1;
}

static uint64_t mix(uint64_t h)
{
    h ^= h >> 33;
    h *= K2;
    h ^= h >> 29;
    h *= K1;
    h ^= h >> 32;
    return h;
}

uint64_t pl_checksum64(const void *data, size_t len, uint64_t seed)
{
    const unsigned char *p = data;
    uint64_t a = seed + K1, b = seed ^ K2, c = seed - K1, d = ~seed;
    uint64_t w[4], h;
    size_t i = 0;

    for (; i + 32 <= len; i += 32) {
        memcpy(w, p + i, 32);
        a = lane(a, w[0]);
        b = lane(b, w[1]);
        c = lane(c, w[2]);
        d = lane(d, w[3]);
    }
    h = rotl(a, 1) + rotl(b, 7) + rotl(c, 12) + rotl(d, 18) + (uint64_t)len;
    for (; i + 8 <= len; i += 8) {
        memcpy(w, p + i, 8);
        h = lane(h, w[0]);
    }
    for (; i < len; i++)
        h = lane(h, p[i]);
    return mix(h);
}

/* Bytes that depend only on (seed, absolute offset): any block of a file
 * written with this pattern can be checked on its own. */
void pl_fill_pattern(void *data, size_t len, uint64_t seed, uint64_t offset)
{
    unsigned char *p = data;
    size_t i = 0;

    while (i < len) {
        uint64_t pos = offset + i, word = mix((pos >> 3) ^ seed);
        size_t skip = pos & 7, n = 8 - skip;
        if (n > len - i)
            n = len - i;
        memcpy(p + i, (unsigned char *)&word + skip, n);
        i += n;
    }
}
