/* lib/aio.c: the choice of backend (aio_create) and the thin wrappers over
 * its ops table, with the pending count and ops done inline.  The backends
 * live in aio-uring.c, aio-threads.c (and the tests' aio-fake.c); the
 * eventfd they kick is aio-kick.c, the blocking executor aio-sync.c.
 */
#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/magic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/statfs.h>
#include <sys/uio.h>
#include <unistd.h>

#include "aio.h"
#include "qcow2-testing.h"

/* Test hook (qcow2-testing.h): AIO_KIND_AUTO behaves as if io_uring were
 * refused, so that the fallback runs on a machine where io_uring works.
 */
static bool refuse_uring;

void
qcow2_testing_refuse_uring (bool refuse)
{
  refuse_uring = refuse;
}

int
aio_create (enum aio_kind kind, unsigned depth, struct aio **out)
{
  int r;

  *out = NULL;
  switch (kind) {
  case AIO_KIND_URING:
    return aio_uring_create (depth, out);
  case AIO_KIND_THREADS:
    /* depth is a queue depth, not a thread count: keep the default pool. */
    return aio_threads_create (0, out);
  case AIO_KIND_AUTO:
    if (!refuse_uring) {
      /* Any refusal falls back, not just ENOSYS/EPERM/EACCES: seccomp
       * profiles, io_uring_disabled, a low RLIMIT_MEMLOCK on older kernels
       * (ENOMEM) and kernels without a needed opcode (EINVAL) all mean the
       * same thing to us, and the thread pool always works.
       */
      r = aio_uring_create (depth, out);
      if (r == 0)
        return 0;
    }
    return aio_threads_create (0, out);
  }
  return -EINVAL;
}

/* Reject what no backend could do, so that each of them may assume a sane
 * op and so that a bad op fails at submit rather than in a callback.
 */
static int
validate_op (const struct aio_op *op)
{
  if (!op || !op->done)
    return -EINVAL;
  switch (op->type) {
  case AIO_READ:
  case AIO_WRITE:
    if (op->iovcnt < 0 || (op->iovcnt > 0 && !op->iov))
      return -EINVAL;
    return 0;
  case AIO_FSYNC:
  case AIO_PUNCH:
    return 0;
  case AIO_CALL:
    return op->call ? 0 : -EINVAL;
  }
  return -EINVAL;
}

enum aio_inline
aio_inline_mode (int fd, bool direct)
{
  struct statfs sf;

  if (fstatfs (fd, &sf) == 0 && sf.f_type == TMPFS_MAGIC)
    return AIO_INLINE_ALL;
  if (direct)
    return AIO_INLINE_NONE;
  {
    /* A file system without RWF_NOWAIT would fail every try: ask once. */
    char b;
    struct iovec v = { .iov_base = &b, .iov_len = 1 };
    if (preadv2 (fd, &v, 1, 0, RWF_NOWAIT) < 0 && errno == EOPNOTSUPP)
      return AIO_INLINE_NONE;
  }
  return AIO_INLINE_NOWAIT;
}

/* The largest read or write done inline. */
#ifndef AIO_INLINE_MAX
#define AIO_INLINE_MAX (128u << 10)
#endif

static size_t
iov_bytes (const struct iovec *iov, int n)
{
  size_t len = 0;
  for (int i = 0; i < n; i++)
    len += iov[i].iov_len;
  return len;
}

/* Do op now if its file allows; then it completes at the next reap like
 * any other.  Returns false when the backend must do it.
 */
static bool
try_inline (struct aio *a, struct aio_op *op)
{
  int64_t r;
  size_t len = op->type == AIO_READ || op->type == AIO_WRITE
    ? iov_bytes (op->iov, op->iovcnt) : 0;

  /* A large copy on this thread would hold up the loop; in a worker it
   * overlaps with the sending of other replies.
   */
  if (len > AIO_INLINE_MAX)
    return false;
  if (op->inline_mode == AIO_INLINE_ALL)
    r = aio_run_sync (op);
  else if (op->inline_mode == AIO_INLINE_NOWAIT && op->type == AIO_READ
           && op->iovcnt > 0 && op->iovcnt <= IOV_MAX) {
    /* Anything but all of it (not cached, end of file, no RWF_NOWAIT
     * here) goes to the backend, which also knows end of file.
     */
    ssize_t n = preadv2 (op->fd, op->iov, op->iovcnt, (off_t) op->offset,
                         RWF_NOWAIT);
    if (n < 0 || (size_t) n != len)
      return false;
    r = n;
  }
  else
    return false;
  op->result = r;
  op->next = NULL;
  if (a->inline_tail)
    a->inline_tail->next = op;
  else
    a->inline_head = op;
  a->inline_tail = op;
  a->inline_count++;
  if (a->inline_ready)
    a->inline_ready (a->inline_ready_arg);
  else
    aio_kick_once (a);
  return true;
}

void
aio_set_inline_ready (struct aio *a, void (*fn) (void *arg), void *arg)
{
  a->inline_ready = fn;
  a->inline_ready_arg = arg;
  /* Ops done inline before now were announced by nobody. */
  if (!fn && a->inline_head)
    aio_kick_once (a);
}

/* Call done for the ops done inline, including any their callbacks
 * submit.
 */
static int
reap_inline (struct aio *a)
{
  int count = 0;
  struct aio_op *op;

  while ((op = a->inline_head)) {
    a->inline_head = op->next;
    if (!a->inline_head)
      a->inline_tail = NULL;
    assert (a->inline_count > 0);
    a->inline_count--;
    a->pending--;
    count++;
    op->done (op, op->result);
  }
  return count;
}

int
aio_submit (struct aio *a, struct aio_op *op)
{
  int r = validate_op (op);
  if (r < 0)
    return r;
  if (op->inline_mode && a->inline_ok && op->type != AIO_CALL
      && try_inline (a, op)) {
    a->pending++;
    return 0;
  }
  r = a->ops->submit (a, op);
  /* Counted only once queued: done is never called for a refused op, and
   * no backend calls done from inside submit, so counting after is safe.
   */
  if (r == 0) {
    a->pending++;
    a->backend_since_clear = true;
  }
  return r;
}

void
aio_commit (struct aio *a)
{
  a->ops->commit (a);
}

int
aio_reap (struct aio *a)
{
  int n;

  /* Clear before reaping, so that a completion posted meanwhile leaves
   * the descriptor readable.  When no op went to the backend and nobody
   * kicked since the last clear, it cannot be readable: skip the read (a
   * loop serving reads from memory makes no syscall here).
   */
  if (__atomic_exchange_n (&a->raw_kicked, false, __ATOMIC_ACQUIRE)
      || a->backend_since_clear)
    aio_clear_kick (a);
  n = a->ops->reap (a);
  /* The inline ops last: one a backend callback submits joins them, and
   * the kick it made stays for the next reap.
   */
  return n + reap_inline (a);
}

void
aio_wait (struct aio *a)
{
  if (a->inline_head)
    return;                     /* something is finished already */
  a->ops->wait (a);
}

void
aio_destroy (struct aio *a)
{
  if (a)
    a->ops->destroy (a);
}

const char *
aio_name (const struct aio *a)
{
  return a->ops->name;
}

int
aio_fd (const struct aio *a)
{
  return a->event_fd;
}
