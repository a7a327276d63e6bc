/* lib/aio-sync.c: run one op to the end on the calling thread (the
 * thread pool's workers, AIO_CALL workers and the test fake all do).
 */
#include <config.h>

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <sys/uio.h>
#include <unistd.h>

#include "aio.h"

int64_t
aio_run_sync (const struct aio_op *op)
{
  const bool is_read = op->type == AIO_READ;
  int64_t done = 0;
  int i = 0;                    /* first element not finished */
  size_t skip = 0;              /* bytes of op->iov[i] already done */

  if (op->type == AIO_CALL)
    return op->call ((struct aio_op *) op);
  if (op->type == AIO_FSYNC) {
    while (fdatasync (op->fd) == -1)
      if (errno != EINTR)
        return -errno;
    return 0;
  }
  if (op->type == AIO_PUNCH) {
    while (fallocate (op->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                      (off_t) op->offset, (off_t) op->length) == -1)
      if (errno != EINTR)
        return -errno;
    return 0;
  }

  for (;;) {
    ssize_t r;
    size_t n;
    off_t off = (off_t) (op->offset + (uint64_t) done);

    while (i < op->iovcnt && skip == op->iov[i].iov_len) {
      i++;
      skip = 0;
    }
    if (i == op->iovcnt)
      return done;

    if (skip > 0) {
      /* A short transfer stopped inside this element.  Finish its tail on
       * its own rather than copy the caller's const array to trim it; the
       * next round is vectored again.
       */
      char *base = (char *) op->iov[i].iov_base + skip;
      size_t len = op->iov[i].iov_len - skip;
      r = is_read ? pread (op->fd, base, len, off)
        : pwrite (op->fd, base, len, off);
    }
    else
      r = is_read ? preadv (op->fd, op->iov + i, op->iovcnt - i, off)
        : pwritev (op->fd, op->iov + i, op->iovcnt - i, off);

    if (r == -1) {
      if (errno == EINTR)
        continue;
      return -errno;
    }
    if (r == 0)
      /* End of file for a read.  A write that makes no progress would spin
       * for ever; the kernel only does it for zero-length requests, which
       * the skip loop above never issues.
       */
      return is_read ? done : -EIO;

    done += r;
    for (n = (size_t) r; n > 0;) {
      size_t left = op->iov[i].iov_len - skip;
      if (n < left) {
        skip += n;
        n = 0;
      }
      else {
        n -= left;
        i++;
        skip = 0;
      }
    }
  }
}
