/*
 * uring_file.c - file and path operations of the io_uring reactor, and the
 * small synchronous helpers around them (statx decoding, open flags).
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/stat.h>
#include <poll.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#include "uring_internal.h"

int pl_uring_fsync(pl_uring_t *u, uint32_t slot, uint32_t gen, int fd, int datasync)
{
    START_ON_FD(fd, io_uring_prep_fsync(sqe, fd_of_op, datasync ? IORING_FSYNC_DATASYNC : 0));
}

int pl_uring_fallocate(pl_uring_t *u, uint32_t slot, uint32_t gen, int fd, int mode,
                       uint64_t offset, uint64_t len)
{
    START_ON_FD(fd, io_uring_prep_fallocate(sqe, fd_of_op, mode, (off_t)offset, (off_t)len));
}

/* Wait until fd is readable: a poll request in the ring (no worker thread,
 * cancelled at once), whose result is the poll(2) events that fired.  An fd
 * open only for writing (a pipe's write end) never is: -EBADF, as read(2)
 * says, instead of a wait for good. */
int pl_uring_poll_in(pl_uring_t *u, uint32_t slot, uint32_t gen, int fd)
{
    int fl = fcntl(fd, F_GETFL);

    if (fl < 0)
        return -errno;
    if ((fl & O_ACCMODE) == O_WRONLY)
        return -EBADF;
    START_OTHER(io_uring_prep_poll_add(sqe, fd, POLLIN));
}

/* One read of what an fd has, after pl_uring_poll_in said it has some: a
 * terminal gives a line, a pipe what was written.  Bytes, 0 at the end of
 * input, -EAGAIN when there is nothing after all (another reader took it:
 * the caller polls again), or -errno.  It never blocks, which would stop
 * the whole runtime: RWF_NOWAIT where the fd supports it (pipes, sockets),
 * else (a terminal) a poll(2) that does not wait, then read(2) only if the
 * fd is readable; nothing else in this thread reads between the two. */
int pl_fd_read(int fd, void *buf, uint32_t len)
{
    struct iovec iov = { .iov_base = buf, .iov_len = len };
    struct pollfd p = { .fd = fd, .events = POLLIN };
    ssize_t n = preadv2(fd, &iov, 1, -1, RWF_NOWAIT);

    if (n >= 0)
        return (int)n;
    /* EAGAIN on a regular file: its data is not cached (poll says readable) */
    if (errno != EAGAIN && errno != EOPNOTSUPP)
        return -errno;
    n = poll(&p, 1, 0);
    if (n < 0)
        return -errno;
    if (n == 0)
        return -EAGAIN;
    n = read(fd, buf, len);
    return n < 0 ? -errno : (int)n;
}

int pl_uring_openat(pl_uring_t *u, uint32_t slot, uint32_t gen, const char *path,
                    int flags, int mode)
{
    START_OTHER({
        io_uring_prep_openat(sqe, AT_FDCWD, path, flags | O_CLOEXEC, (mode_t)mode);
        uring_op(u, (uint32_t)i)->fd_owner = FD_RESULT;
    });
}

/* (Ops on fd learn of the close once it is queued: one that cannot start
 * leaves the fd open, and them going on.) */
int pl_uring_close(pl_uring_t *u, uint32_t slot, uint32_t gen, int fd)
{
    START_OTHER({
        uring_fd_closing(u, fd);
        io_uring_prep_close(sqe, fd);
        uring_op(u, (uint32_t)i)->fd = fd;
        uring_op(u, (uint32_t)i)->fd_owner = FD_CLOSE;
    });
}

/* Another task's read of a pipe or FIFO would wait for good on a closed
 * file (the op holds its own reference to it): such ops are cancelled
 * before the close, as a socket's are.  With none, a plain close: one SQE
 * and one completion. */
int pl_uring_close_file(pl_uring_t *u, uint32_t slot, uint32_t gen, int fd)
{
    if (uring_fd_busy(u, fd, NULL))
        return pl_uring_close_socket(u, slot, gen, fd);
    return pl_uring_close(u, slot, gen, fd);
}

/* A file whose runtime is not running (its run ended): closed at once,
 * unless a task parked there still has an op on it.  Abandoned ops learn
 * that their fd number is no longer theirs, as for the ring's close. */
int pl_uring_close_idle(pl_uring_t *u, int fd)
{
    if (uring_fd_busy(u, fd, u->rt))     /* (u->rt NULL: any op) */
        return -EBUSY;
    uring_fd_closing(u, fd);
    return close(fd) < 0 ? -errno : 0;
}

int pl_uring_statx(pl_uring_t *u, uint32_t slot, uint32_t gen, int dirfd, const char *path,
                   int flags, void *statx_buf)
{
    if (dirfd < 0)          /* AT_FDCWD: a path */
        START_OTHER(io_uring_prep_statx(sqe, dirfd, path, flags,
                                        STATX_BASIC_STATS | STATX_BTIME | STATX_DIOALIGN,
                                        (struct statx *)statx_buf));
    START_ON_FD(dirfd, io_uring_prep_statx(sqe, fd_of_op, path, flags,
                                           STATX_BASIC_STATS | STATX_BTIME | STATX_DIOALIGN,
                                           (struct statx *)statx_buf));
}

int pl_uring_unlinkat(pl_uring_t *u, uint32_t slot, uint32_t gen, const char *path, int flags)
{
    START_OTHER(io_uring_prep_unlinkat(sqe, AT_FDCWD, path, flags));
}

int pl_uring_renameat(pl_uring_t *u, uint32_t slot, uint32_t gen, const char *from,
                      const char *to)
{
    START_OTHER(io_uring_prep_renameat(sqe, AT_FDCWD, from, AT_FDCWD, to, 0));
}

int pl_uring_mkdirat(pl_uring_t *u, uint32_t slot, uint32_t gen, const char *path, int mode)
{
    START_OTHER(io_uring_prep_mkdirat(sqe, AT_FDCWD, path, (mode_t)mode));
}

int pl_uring_statx_size(void)
{
    return (int)sizeof(struct statx);
}

static double ts_of(const struct statx_timestamp *t)
{
    return (double)t->tv_sec + (double)t->tv_nsec / 1e9;
}

void pl_uring_statx_decode(const void *statx_buf, pl_file_stat_t *out)
{
    const struct statx *st = statx_buf;

    out->size = (double)st->stx_size;
    out->blocks = (double)st->stx_blocks;
    out->blksize = st->stx_blksize;
    out->mode = st->stx_mode;
    out->uid = st->stx_uid;
    out->gid = st->stx_gid;
    out->nlink = st->stx_nlink;
    out->ino = (double)st->stx_ino;
    out->atime = ts_of(&st->stx_atime);
    out->mtime = ts_of(&st->stx_mtime);
    out->ctime = ts_of(&st->stx_ctime);
    out->btime = (st->stx_mask & STATX_BTIME) ? ts_of(&st->stx_btime) : 0;
    if (st->stx_mask & STATX_DIOALIGN) {
        out->dio_mem_align = st->stx_dio_mem_align;
        out->dio_offset_align = st->stx_dio_offset_align;
    } else {
        out->dio_mem_align = 0;
        out->dio_offset_align = 0;
    }
    out->dev_major = st->stx_dev_major;
    out->dev_minor = st->stx_dev_minor;
    out->rdev_major = st->stx_rdev_major;
    out->rdev_minor = st->stx_rdev_minor;
}

/* No IORING_OP_FTRUNCATE before Linux 6.9: truncate is a quick metadata
 * call, done synchronously. */
int pl_file_truncate(int fd, uint64_t len)
{
    return ftruncate(fd, (off_t)len) < 0 ? -errno : 0;
}

/* open(2) flags for an io.open-style mode ("r", "w", "a", "r+", "w+", "a+"),
 * plus O_DIRECT when direct; -EINVAL for any other mode. */
int pl_file_flags(const char *mode, int direct)
{
    static const struct { const char *mode; int flags; } modes[] = {
        { "r", O_RDONLY }, { "w", O_WRONLY | O_CREAT | O_TRUNC },
        { "a", O_WRONLY | O_CREAT | O_APPEND }, { "r+", O_RDWR },
        { "w+", O_RDWR | O_CREAT | O_TRUNC }, { "a+", O_RDWR | O_CREAT | O_APPEND },
    };

    char m[3];
    size_t n = 0;
    bool binary = false;

    /* one "b" after the first letter, as fopen takes it ("rb", "r+b",
     * "wb+"): Linux has no text mode, so it changes nothing */
    for (const char *p = mode; *p; p++) {
        if (*p == 'b' && p != mode && !binary) {
            binary = true;
            continue;
        }
        if (n == sizeof(m) - 1)
            return -EINVAL;
        m[n++] = *p;
    }
    m[n] = '\0';
    for (size_t i = 0; i < sizeof(modes) / sizeof(modes[0]); i++)
        if (strcmp(m, modes[i].mode) == 0)
            return modes[i].flags | (direct ? O_DIRECT : 0);
    return -EINVAL;
}

int pl_file_fd_direct(int fd)
{
    int fl = fcntl(fd, F_GETFL);

    if (fl < 0)
        return -errno;
    return (fl & O_DIRECT) != 0;
}

int pl_file_open_sync(const char *path, int flags, int mode)
{
    int fd = open(path, flags | O_CLOEXEC, (mode_t)mode);

    return fd < 0 ? -errno : fd;
}

int pl_file_close_sync(int fd)
{
    return close(fd) < 0 ? -errno : 0;
}
