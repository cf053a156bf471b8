/*
 * error.c - names and messages for the negative errno values the ABI returns.
 */
#include <errno.h>
#include <string.h>

#include "pluvio.h"

#ifndef PL_VERSION
#define PL_VERSION "0.0.0"
#endif

/* pl_strerror's words for -PL_EOPSFULL give the limits as text. */
_Static_assert(PL_URING_MAX_OPS == 262144 && PL_UCX_MAX_OPS == 65536,
               "update the numbers in pl_strerror's PL_EOPSFULL message");

const char *pl_strerror(int err)
{
    if (err == -PL_ESQFULL || err == PL_ESQFULL)
        return "the io_uring submission queue was full and the kernel refused to take more entries "
               "for now (a bigger queue_size of the reactor makes room)";
    if (err == -PL_EOPSFULL || err == PL_EOPSFULL)
        return "too many operations in flight: an io_uring reactor holds 262144 at once, a UCX "
               "worker 65536 (let some finish first, or spread them over reactors or workers)";
    if (err == -PL_EBUFCANCELLED || err == PL_EBUFCANCELLED)
        return "the registered buffer is still used by an operation of a killed task, which the "
               "kernel has not ended yet";
    if (err == -PL_EWILDCARD || err == PL_EWILDCARD)
        return "the host stands for the wildcard address (every interface) without naming it";
    return strerror(err < 0 ? -err : err);
}

const char *pl_errname(int err)
{
    switch (err < 0 ? -err : err) {
    case PL_ESQFULL:
        return "EBUSY";
    case PL_EOPSFULL:
        return "ENOMEM";
    case PL_EBUFCANCELLED:
        return "EBUSY";
    case PL_EWILDCARD:
        return "EINVAL";
#define NAME(e) case e: return #e;
    NAME(EPERM) NAME(ENOENT) NAME(ESRCH) NAME(EINTR) NAME(EIO) NAME(ENXIO)
    NAME(E2BIG) NAME(EBADF) NAME(EAGAIN) NAME(ENOMEM) NAME(EACCES)
    NAME(EFAULT) NAME(EBUSY) NAME(EEXIST) NAME(EXDEV) NAME(ENODEV)
    NAME(ENOTDIR) NAME(EISDIR) NAME(EINVAL) NAME(ENFILE) NAME(EMFILE)
    NAME(ENOTTY) NAME(EFBIG) NAME(ENOSPC) NAME(ESPIPE) NAME(EROFS)
    NAME(EMLINK) NAME(EPIPE) NAME(ERANGE) NAME(EDEADLK) NAME(ENAMETOOLONG)
    NAME(ENOSYS) NAME(ENOTEMPTY) NAME(ELOOP) NAME(ENODATA) NAME(ETIME)
    NAME(EOVERFLOW) NAME(EBADMSG) NAME(ENOTSOCK) NAME(EMSGSIZE) NAME(EPROTONOSUPPORT) NAME(EAFNOSUPPORT)
    NAME(EOPNOTSUPP) NAME(EADDRINUSE) NAME(EADDRNOTAVAIL) NAME(ENETDOWN)
    NAME(ENETUNREACH) NAME(ECONNABORTED) NAME(ECONNRESET) NAME(ENOBUFS)
    NAME(EISCONN) NAME(ENOTCONN) NAME(ETIMEDOUT) NAME(ECONNREFUSED)
    NAME(EHOSTUNREACH) NAME(EALREADY) NAME(EINPROGRESS) NAME(ECANCELED)
#undef NAME
    default:
        return "E?";
    }
}

const char *pl_version(void)
{
    return PL_VERSION;
}

#ifndef PL_ABI
#define PL_ABI "unstamped"
#endif

const char *pl_abi(void)
{
    return PL_ABI;
}
