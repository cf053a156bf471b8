/*
 * ucx_addr.c - worker addresses: the one a worker hands out, sealed with a
 * checksum, and the checks an address passes before ucp_ep_create, which
 * takes it without a length.
 */
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ucx_internal.h"

/* The seal after the address: a magic, UCX's length, a checksum. */
#define ADDR_SEAL_MAGIC "PLv1"
#define ADDR_SEAL_LEN 16
#define ADDR_SEAL_SEED 0x706c7576696f6164ULL

/* A worker address as UCX 1.13 packs it (ucp_address_pack in
 * src/ucp/wireup/address.c).  ucp_ep_create takes no length: it reads as
 * far as the address says, past the end of a truncated one, and acts on
 * what it finds there (a transport's device address taken as NULL
 * crashed it in cma's reachability check); an unknown version aborts the
 * process.  So the address is read here first, within its length.
 *
 * The header: the low 4 bits of the first byte are the version; v1 keeps
 * its flags in the high 4 bits, v2 in a second byte.  Then the worker's
 * uuid (always there in v1), a client id and the worker name (a length
 * byte first) when flagged.  Then the devices, each: an md index byte
 * (0x80: no transports; v2 extends an all-ones index into a second byte),
 * a device address length byte with flags (0x80 last device, 0x40 a
 * number of paths follows, 0x20 a system device follows; v2 extends 0x1f
 * into a second byte), those bytes, the device address.  Then, unless
 * empty, its transports, each: a 2-byte name checksum, the packed
 * attributes (v1 16 bytes, v2 8), an address length byte (0x80 last
 * transport, 0x40 endpoint addresses follow; v2 extends 0x3f), the
 * address, then each endpoint address: a length byte, the address, a lane
 * byte (0x80: the last).  A single 0xff instead of the devices: none. */
enum {
    ADDR_V1 = 0, ADDR_V2 = 1,
    ADDR_FLAG_DEBUG_INFO = 1, ADDR_FLAG_WORKER_UUID = 2, ADDR_FLAG_CLIENT_ID = 4,
    ADDR_FLAGS = 0x0f,
    ADDR_LAST = 0x80, ADDR_NO_DEVICES = 0xff,
    ADDR_MD_EMPTY = 0x80, ADDR_MD_MASK_V1 = 0x1f, ADDR_MD_MASK_V2 = 0x7f,
    ADDR_DEV_PATHS = 0x40, ADDR_DEV_SYSDEV = 0x20, ADDR_DEV_LEN_MASK = 0x1f,
    ADDR_TL_HAS_EP = 0x40, ADDR_TL_LEN_MASK = 0x3f,
    ADDR_TL_ATTR_V1 = 16, ADDR_TL_ATTR_V2 = 8,
};

/* A v1 transport's packed attributes start with three floats: overhead,
 * bandwidth (negative from UCX <= 1.11 peers) and latency.  UCX scores
 * lanes with them and asserts that no score is negative: a NaN, an
 * infinity or a negative time aborted the process. */
static bool tl_attr_v1_valid(const uint8_t *attr)
{
    float f[3];

    memcpy(f, attr, sizeof(f));
    return isfinite(f[0]) && f[0] >= 0 && isfinite(f[1]) && f[1] != 0 &&
           isfinite(f[2]) && f[2] >= 0;
}

/* A byte at *p (masked), or the next byte when v2 extends it; -1 past end. */
static int addr_byte(const uint8_t *a, size_t len, size_t *p, unsigned mask, bool v2)
{
    unsigned v;

    if (*p >= len)
        return -1;
    v = a[(*p)++] & mask;
    if (v2 && v == mask) {
        if (*p >= len)
            return -1;
        v = a[(*p)++];
    }
    return (int)v;
}

/* How many bytes the header takes (0: not a header this UCX packs). */
static size_t address_header(const uint8_t *a, size_t len, unsigned *version)
{
    unsigned flags;
    size_t p;

    *version = a[0] & 0x0f;
    if (*version == ADDR_V1) {
        flags = a[0] >> 4;
        p = 1 + 8;
    } else if (*version == ADDR_V2 && len >= 2 && !(a[1] & ~ADDR_FLAGS)) {
        flags = a[1];
        p = 2 + ((flags & ADDR_FLAG_WORKER_UUID) ? 8 : 0);
    } else {
        return 0;
    }
    if (flags & ADDR_FLAG_CLIENT_ID)
        p += 8;
    if (flags & ADDR_FLAG_DEBUG_INFO)
        p = p < len ? p + 1 + a[p] : len + 1;
    return p < len ? p : 0;     /* (at least one byte of devices) */
}

/* The length of the address at a as this layout reads it, or -1 when it
 * does not end within len bytes.  Every loop reads at least one byte. */
static long address_extent(const uint8_t *a, size_t len)
{
    unsigned version;
    size_t p = address_header(a, len, &version);
    bool v2 = version == ADDR_V2, last_dev = false;

    if (p == 0)
        return -1;
    if (a[p] == ADDR_NO_DEVICES)
        return (long)p + 1;
    while (!last_dev) {
        bool last_tl = p < len && (a[p] & ADDR_MD_EMPTY);
        unsigned dev_flags;
        int n;

        if (addr_byte(a, len, &p, v2 ? ADDR_MD_MASK_V2 : ADDR_MD_MASK_V1, v2) < 0 || p >= len)
            return -1;
        dev_flags = a[p];
        last_dev = dev_flags & ADDR_LAST;
        n = addr_byte(a, len, &p, ADDR_DEV_LEN_MASK, v2);
        if (n < 0)
            return -1;
        p += (size_t)n + !!(dev_flags & ADDR_DEV_PATHS) + !!(dev_flags & ADDR_DEV_SYSDEV);
        while (!last_tl) {
            bool last_ep;

            p += 2 + (v2 ? ADDR_TL_ATTR_V2 : ADDR_TL_ATTR_V1);
            if (p >= len || (!v2 && !tl_attr_v1_valid(a + p - ADDR_TL_ATTR_V1)))
                return -1;
            last_tl = a[p] & ADDR_LAST;
            last_ep = !(a[p] & ADDR_TL_HAS_EP);
            n = addr_byte(a, len, &p, ADDR_TL_LEN_MASK, v2);
            if (n < 0)
                return -1;
            p += (size_t)n;
            while (!last_ep) {
                if (p >= len)
                    return -1;
                p += 1 + a[p];
                if (p >= len)
                    return -1;
                last_ep = a[p++] & ADDR_LAST;
            }
        }
    }
    return p <= len ? (long)p : -1;
}

/* Whether addr can go to ucp_ep_create.  UCX packs addresses differently
 * in its unified mode (UCX_UNIFIED_MODE=y), where lengths come from the
 * local transports: there only the header is checked.  Otherwise the
 * whole layout is read, once this worker's own address reads as it
 * should (a layout this code does not know refuses nothing). */
static bool worker_address_valid(pl_ucx_worker_t *w, const uint8_t *a, size_t len)
{
    unsigned version;

    if (address_header(a, len, &version) == 0)
        return false;
    if (w->ctx->unified)
        return true;
    if (w->addr_layout == 0) {
        ucp_address_t *own;
        size_t own_len;

        if (ucp_worker_get_address(w->ucp, &own, &own_len) != UCS_OK)
            return true;        /* (not known: the header passed) */
        w->addr_layout = address_extent((const uint8_t *)own, own_len) == (long)own_len ? 1 : -1;
        ucp_worker_release_address(w->ucp, own);
    }
    return w->addr_layout < 0 || address_extent(a, len) > 0;
}

/* A sealed address whose seal holds: its UCX length in *len; one whose
 * seal does not: -EBADMSG; no seal (a UCX program's address, or the start
 * of a sealed one): 0, *len as it was.  The seal is where its own length
 * field puts it, looked for from the end down, so that bytes added after a
 * sealed address (a newline, a padded buffer) do not skip the check. */
static int address_unseal(const uint8_t *a, size_t *len)
{
    uint32_t n;
    uint64_t sum;

    for (size_t q = *len > ADDR_SEAL_LEN ? *len - ADDR_SEAL_LEN : 0; q > 0; q--) {
        memcpy(&n, a + q + 4, sizeof(n));
        if (n != q || memcmp(a + q, ADDR_SEAL_MAGIC, 4) != 0)
            continue;
        memcpy(&sum, a + q + 8, sizeof(sum));
        if (pl_checksum64(a, n, ADDR_SEAL_SEED) != sum)
            return -EBADMSG;
        *len = n;
        return 0;
    }
    return 0;
}

int ucx_address_check(pl_ucx_worker_t *w, const uint8_t *a, size_t len)
{
    if (address_unseal(a, &len) < 0)
        return -EBADMSG;
    return worker_address_valid(w, a, len) ? 0 : -EINVAL;
}

/* The address handed out is UCX's followed by a seal: a magic, UCX's
 * length and a checksum of it (UCX reads an address as far as it says,
 * so programs of its own ignore the seal).  connect_addr checks a sealed
 * address whole: a damaged one crashed UCX in many ways (a transport's
 * device address or attributes taken from garbage). */
int pl_ucx_worker_address(pl_ucx_worker_t *w, void *buf, int cap)
{
    ucp_address_t *addr;
    size_t len;
    ucs_status_t st = ucp_worker_get_address(w->ucp, &addr, &len);

    if (st != UCS_OK)
        return pl_ucx_errno(st);
    w->address_shared = true;
    if (!w->addr && (w->addr = malloc(len)) != NULL) {     /* (for ucx_reactor_local_worker) */
        memcpy(w->addr, addr, len);
        w->addr_len = len;
    }
    if ((size_t)cap >= len + ADDR_SEAL_LEN) {
        uint32_t n = (uint32_t)len;
        uint64_t sum = pl_checksum64(addr, len, ADDR_SEAL_SEED);
        uint8_t *seal = (uint8_t *)buf + len;

        memcpy(buf, addr, len);
        memcpy(seal, ADDR_SEAL_MAGIC, 4);
        memcpy(seal + 4, &n, sizeof(n));
        memcpy(seal + 8, &sum, sizeof(sum));
    }
    ucp_worker_release_address(w->ucp, addr);
    return (int)(len + ADDR_SEAL_LEN);
}
