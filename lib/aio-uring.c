/* lib/aio-uring.c: the io_uring backend (liburing).
 *
 * This file owns the ring, the eventfd registered with it, the count of ops
 * the kernel holds, and the overflow list of ops that found no room in the
 * ring yet.  Everything here runs on the owner's (loop) thread; the kernel
 * signals the eventfd whenever it posts a completion, which is what makes
 * aio_fd() readable.
 *
 * The kernel may return short transfers and -EAGAIN; aio_done_fn promises
 * full transfers, so reap resubmits the remainder (from a trimmed copy of the
 * iovec in op->priv_iov) until the op is complete, fails, or a read hits end
 * of file.
 */
#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <liburing.h>

#include "aio.h"

#define URING_DEFAULT_DEPTH 256

struct uring {
  struct aio base;              /* first: a struct aio * is a struct uring * */
  struct io_uring ring;
  unsigned inflight;            /* ops owning an SQE or an unreaped CQE */
  unsigned limit;               /* CQ size; inflight never exceeds it */
  /* Ops waiting for an SQE or for room under limit.  Kept in submission
   * order, and new ops queue behind it, so that a burst larger than the ring
   * does not let later ops overtake earlier ones.
   */
  struct aio_op *overflow_head;
  struct aio_op **overflow_tail;
};

static uint64_t
iov_total (const struct aio_op *op)
{
  uint64_t total = 0;
  for (int i = 0; i < op->iovcnt; i++)
    total += op->iov[i].iov_len;
  return total;
}

/* Point op->priv_iov at the part of op->iov not transferred yet.  The copy
 * is sized for the whole array once, so later short transfers reuse it.
 * Returns 0 or -ENOMEM.
 */
static int
uring_trim (struct aio_op *op)
{
  size_t skip = op->transferred;
  int i = 0;

  while (i < op->iovcnt && skip >= op->iov[i].iov_len) {
    skip -= op->iov[i].iov_len;
    i++;
  }
  if (!op->priv_iov) {
    op->priv_iov = malloc (sizeof *op->priv_iov * (size_t) op->iovcnt);
    if (!op->priv_iov)
      return -ENOMEM;
  }
  op->priv_iovcnt = op->iovcnt - i;
  memcpy (op->priv_iov, op->iov + i,
          sizeof *op->priv_iov * (size_t) op->priv_iovcnt);
  op->priv_iov[0].iov_base = (char *) op->priv_iov[0].iov_base + skip;
  op->priv_iov[0].iov_len -= skip;
  return 0;
}

/* Put op (or its remainder) in the ring.  Returns false when there is no
 * room; the caller then keeps it on the overflow list.
 */
static bool
uring_push (struct uring *u, struct aio_op *op)
{
  struct io_uring_sqe *sqe;
  const struct iovec *iov = op->priv_iov ? op->priv_iov : op->iov;
  int iovcnt = op->priv_iov ? op->priv_iovcnt : op->iovcnt;
  uint64_t off = op->offset + op->transferred;

  /* More ops in the kernel than CQ slots would let completions overflow
   * the CQ, which older kernels drop and newer ones make us pay for.
   */
  if (u->inflight >= u->limit)
    return false;
  sqe = io_uring_get_sqe (&u->ring);
  if (!sqe) {
    /* The SQ is full of prepared entries: hand them over (this does not
     * wait for them) and try once more.
     */
    io_uring_submit (&u->ring);
    sqe = io_uring_get_sqe (&u->ring);
    if (!sqe)
      return false;
  }

  switch (op->type) {
  case AIO_READ:
    io_uring_prep_readv (sqe, op->fd, iov, (unsigned) iovcnt, off);
    break;
  case AIO_WRITE:
    io_uring_prep_writev (sqe, op->fd, iov, (unsigned) iovcnt, off);
    break;
  case AIO_FSYNC:
    io_uring_prep_fsync (sqe, op->fd, IORING_FSYNC_DATASYNC);
    break;
  case AIO_PUNCH:
    io_uring_prep_fallocate (sqe, op->fd,
                             FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                             op->offset, op->length);
    break;
  case AIO_CALL:
    abort ();                   /* uring_submit gave it to aio-calls.c */
  }
  io_uring_sqe_set_data (sqe, op);
  u->inflight++;
  return true;
}

static void
uring_enqueue (struct uring *u, struct aio_op *op)
{
  if (u->overflow_head || !uring_push (u, op)) {
    op->next = NULL;
    *u->overflow_tail = op;
    u->overflow_tail = &op->next;
  }
}

/* Move what fits from the overflow list into the ring, then submit. */
static void
uring_flush (struct uring *u)
{
  while (u->overflow_head && uring_push (u, u->overflow_head)) {
    u->overflow_head = u->overflow_head->next;
    if (!u->overflow_head)
      u->overflow_tail = &u->overflow_head;
  }
  if (io_uring_sq_ready (&u->ring) > 0)
    io_uring_submit (&u->ring);
}

static void
uring_complete (struct uring *u, struct aio_op *op, int64_t ret)
{
  free (op->priv_iov);
  op->priv_iov = NULL;
  op->priv_iovcnt = 0;
  op->result = ret;
  u->base.pending--;
  /* Last touch of op: done may free it or submit it again. */
  op->done (op, ret);
}

/* Account for one CQE of op.  Returns true if op is now complete. */
static bool
uring_handle (struct uring *u, struct aio_op *op, int res)
{
  uint64_t total;
  int r;

  if (res == -EAGAIN || res == -EINTR) {
    uring_enqueue (u, op);
    return false;
  }
  if (res < 0 || op->type == AIO_FSYNC || op->type == AIO_PUNCH) {
    uring_complete (u, op, res < 0 ? res : 0);
    return true;
  }

  total = iov_total (op);
  op->transferred += (size_t) res;
  if (op->transferred >= total) {
    uring_complete (u, op, (int64_t) op->transferred);
    return true;
  }
  if (res == 0) {
    /* End of file for a read; a write that makes no progress would be
     * resubmitted for ever.
     */
    uring_complete (u, op,
                    op->type == AIO_READ ? (int64_t) op->transferred : -EIO);
    return true;
  }
  r = uring_trim (op);
  if (r < 0) {
    uring_complete (u, op, r);
    return true;
  }
  uring_enqueue (u, op);
  return false;
}

static int
uring_submit (struct aio *a, struct aio_op *op)
{
  struct uring *u = (struct uring *) a;

  if (op->type == AIO_CALL)
    return aio_calls_submit (a, op);
  op->next = NULL;
  op->result = 0;
  op->transferred = 0;
  op->priv_iov = NULL;
  op->priv_iovcnt = 0;
  uring_enqueue (u, op);
  return 0;
}

static void
uring_commit (struct aio *a)
{
  uring_flush ((struct uring *) a);
}

static int
uring_reap (struct aio *a)
{
  struct uring *u = (struct uring *) a;
  struct io_uring_cqe *cqe;
  int count = 0;

  /* aio_reap cleared the eventfd first: a CQE posted after that signals
   * it again, so the loop cannot miss it even if the drain below stops
   * just before.
   */
  count += aio_calls_reap (a);
  while (io_uring_peek_cqe (&u->ring, &cqe) == 0 && cqe) {
    struct aio_op *op = io_uring_cqe_get_data (cqe);
    int res = cqe->res;

    /* Release the CQE before done runs, since done may submit. */
    io_uring_cqe_seen (&u->ring, cqe);
    u->inflight--;
    if (uring_handle (u, op, res))
      count++;
  }
  /* Remainders and retries queued above must not wait for a commit. */
  uring_flush (u);
  return count;
}

static void
uring_wait (struct aio *a)
{
  struct uring *u = (struct uring *) a;
  struct io_uring_cqe *cqe;

  if (a->pending == 0)
    return;
  uring_flush (u);
  /* Nothing in the kernel: only calls can complete, if any is running. */
  if (u->inflight == 0) {
    aio_calls_wait (a);
    return;
  }
  while (io_uring_wait_cqe (&u->ring, &cqe) == -EINTR)
    ;
}

/* The owner drains (pending == 0) before destroy.  If it did not, the ops
 * still in the kernel are waited for here, so that no buffer is touched after
 * destroy returns, but their done callbacks are never called.
 */
static void
uring_destroy (struct aio *a)
{
  struct uring *u = (struct uring *) a;
  struct io_uring_cqe *cqe;

  uring_flush (u);
  while (u->inflight > 0) {
    int r = io_uring_wait_cqe (&u->ring, &cqe);
    if (r == -EINTR)
      continue;
    if (r < 0)
      break;
    struct aio_op *op = io_uring_cqe_get_data (cqe);
    io_uring_cqe_seen (&u->ring, cqe);
    u->inflight--;
    free (op->priv_iov);
    op->priv_iov = NULL;
  }
  for (struct aio_op *op = u->overflow_head; op; op = op->next) {
    free (op->priv_iov);
    op->priv_iov = NULL;
  }
  aio_calls_destroy (a);
  io_uring_unregister_eventfd (&u->ring);
  io_uring_queue_exit (&u->ring);
  close (a->event_fd);
  free (u);
}

static const struct aio_ops uring_ops = {
  .name = "io_uring",
  .submit = uring_submit,
  .commit = uring_commit,
  .reap = uring_reap,
  .wait = uring_wait,
  .destroy = uring_destroy,
};

int
aio_uring_create (unsigned depth, struct aio **out)
{
  struct uring *u;
  int r;

  *out = NULL;
  u = calloc (1, sizeof *u);
  if (!u)
    return -ENOMEM;
  u->base.ops = &uring_ops;
  u->overflow_tail = &u->overflow_head;

  r = io_uring_queue_init (depth ? depth : URING_DEFAULT_DEPTH, &u->ring, 0);
  if (r < 0)
    goto err_free;
  u->limit = u->ring.cq.ring_entries;

  u->base.inline_ok = true;
  u->base.event_fd = eventfd (0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (u->base.event_fd == -1) {
    r = -errno;
    goto err_ring;
  }
  r = io_uring_register_eventfd (&u->ring, u->base.event_fd);
  if (r < 0)
    goto err_efd;

  *out = &u->base;
  return 0;

 err_efd:
  close (u->base.event_fd);
 err_ring:
  io_uring_queue_exit (&u->ring);
 err_free:
  free (u);
  return r;
}
