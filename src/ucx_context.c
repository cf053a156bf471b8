/*
 * ucx_context.c - UCX contexts (one ucp context each, with the
 * configuration Pluvio reads for it) and UCX status codes as errno values.
 *
 * Lifetime: a context owns nothing but the ucp context and outlives its
 * workers (closing it with live workers fails).
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ucx_internal.h"

#define PL_UCX_KEEPALIVE_INTERVAL "5s"    /* UCX's own keepalive, when Pluvio turns it on */
#define UCX_CONTEXT_FDS 16      /* descriptors ucp_init must have room for (it takes about 5) */

int pl_ucx_errno(ucs_status_t status)
{
    switch (status) {
    case UCS_OK: return 0;
    case UCS_ERR_NO_MEMORY: return -ENOMEM;
    case UCS_ERR_INVALID_PARAM: return -EINVAL;
    case UCS_ERR_UNREACHABLE: return -EHOSTUNREACH;
    case UCS_ERR_INVALID_ADDR: return -EADDRNOTAVAIL;
    case UCS_ERR_NOT_IMPLEMENTED: return -ENOSYS;
    case UCS_ERR_MESSAGE_TRUNCATED: return -EMSGSIZE;
    case UCS_ERR_NO_PROGRESS: return -EAGAIN;
    case UCS_ERR_BUFFER_TOO_SMALL: return -ENOBUFS;
    case UCS_ERR_NO_ELEM: return -ENOENT;
    case UCS_ERR_BUSY: return -EBUSY;
    case UCS_ERR_CANCELED: return -ECANCELED;
    case UCS_ERR_TIMED_OUT: return -ETIMEDOUT;
    case UCS_ERR_CONNECTION_RESET: return -ECONNRESET;
    case UCS_ERR_REJECTED: return -ECONNREFUSED;
    case UCS_ERR_NOT_CONNECTED: return -ENOTCONN;
    case UCS_ERR_ALREADY_EXISTS: return -EEXIST;
    case UCS_ERR_OUT_OF_RANGE: return -ERANGE;
    case UCS_ERR_EXCEEDS_LIMIT: return -E2BIG;
    case UCS_ERR_UNSUPPORTED: return -EOPNOTSUPP;
    case UCS_ERR_ENDPOINT_TIMEOUT: return -ETIMEDOUT;
    case UCS_ERR_IO_ERROR: return -EIO;
    default: return -EIO;
    }
}

const char *pl_ucx_status_string(int err)
{
    return pl_strerror(err);
}

/* ---- context ------------------------------------------------------------- */

/* What UCX has no getter for, from its printed configuration (the
 * environment and the configuration files alike): whether it asks for
 * unified mode, whose worker addresses leave out lengths the peer takes
 * from its own transports, and the network devices it may use (a listener
 * on an interface outside them takes connections UCX then drops). */
static void config_read_back(const ucp_config_t *config, pl_ucx_context_t *c)
{
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);

    if (!f)
        return;
    ucp_config_print(config, f, NULL, UCS_CONFIG_PRINT_CONFIG);
    if (fclose(f) == 0 && text) {
        const char *dev = strstr(text, "\nUCX_NET_DEVICES=");  /* (a line's start: not UCX_IB_NET_DEVICES) */
        size_t n;

        c->unified = strstr(text, "UNIFIED_MODE=y") != NULL;
        if (strncmp(text, "UCX_NET_DEVICES=", 16) == 0)
            dev = text + 16;    /* (the first line, as UCX 1.13 prints it) */
        else if (dev)
            dev += 17;
        n = dev ? strcspn(dev, "\n") : sizeof(c->net_devices);
        if (n < sizeof(c->net_devices)) {
            memcpy(c->net_devices, dev, n);
            c->net_devices[n] = '\0';
        }
    }
    free(text);
}

/* UCX's tcp transport keeps a connection alive with TCP's own keepalive,
 * but sets it only on the sockets it connects itself: the side that
 * accepted a connection (a client of a listener, in UCX 1.13) never
 * notices a link that breaks while it waits for its peer (a rendezvous
 * send waiting for the receiver to pull), and waits for good.  With TCP's
 * keepalive off, UCX sends its own keepalive on every connection, both
 * ways, so a broken link ends in ETIMEDOUT on both sides (once TCP gives
 * up retransmitting it).  Left as UCX has it when the environment tunes
 * either keepalive.  (A worker with no tcp transport has UCX warn of an
 * "invalid configuration": pl_ucx_worker_new drops that line.) */
static bool keepalive_both_ways(ucp_config_t *config)
{
    static const char *const knobs[] = {
        "UCX_TCP_KEEPIDLE", "UCX_TCP_KEEPINTVL", "UCX_TCP_KEEPCNT", "UCX_KEEPALIVE_INTERVAL",
    };

    for (size_t i = 0; i < sizeof(knobs) / sizeof(knobs[0]); i++)
        if (getenv(knobs[i]))
            return false;
    if (ucp_config_modify(config, "KEEPIDLE", "inf") != UCS_OK)
        return false;
    (void)ucp_config_modify(config, "KEEPALIVE_INTERVAL", PL_UCX_KEEPALIVE_INTERVAL);  /* else UCX's 20 s */
    return true;
}

pl_ucx_context_t *pl_ucx_context_new(int wakeup, int *err)
{
    ucp_params_t params = {
        .field_mask = UCP_PARAM_FIELD_FEATURES,
        .features = UCP_FEATURE_AM | UCP_FEATURE_TAG | (wakeup ? UCP_FEATURE_WAKEUP : 0),
    };
    ucp_context_attr_t attr = { .field_mask = UCP_ATTR_FIELD_REQUEST_SIZE };
    pl_ucx_context_t *c = calloc(1, sizeof(*c));
    ucp_config_t *config;
    ucs_status_t st;

    if (!c) {
        *err = -ENOMEM;
        return NULL;
    }
    /* UCX 1.13 short of descriptors in ucp_init ends the process (its
     * async thread's epoll or pipe: an assertion), or with none at all
     * leaves tcp out of the context for good (EHOSTUNREACH on every
     * connect): refused first, as EMFILE */
    *err = ucx_fd_headroom(UCX_CONTEXT_FDS);
    if (*err < 0) {
        free(c);
        return NULL;
    }
    st = ucp_config_read(NULL, NULL, &config);
    if (st == UCS_OK) {
        config_read_back(config, c);
        c->keepalive = keepalive_both_ways(config);
        st = ucp_init(&params, config, &c->ucp);
        ucp_config_release(config);
    }
    if (st == UCS_OK)
        st = ucp_context_query(c->ucp, &attr);
    if (st != UCS_OK) {
        *err = pl_ucx_errno(st);
        if (c->ucp)
            ucp_cleanup(c->ucp);
        free(c);
        return NULL;
    }
    c->request_size = attr.request_size;
    c->wakeup = wakeup != 0;
    return c;
}

int pl_ucx_context_close(pl_ucx_context_t *c)
{
    if (c->workers > 0)
        return -EBUSY;
    ucp_cleanup(c->ucp);
    free(c);
    return 0;
}

void pl_ucx_context_release(pl_ucx_context_t *c)
{
    if (c->workers > 0)
        c->released = true;
    else
        pl_ucx_context_close(c);
}
