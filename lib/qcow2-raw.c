/* lib/qcow2-raw.c: raw images, served directly or as the bottom of a
 * backing chain.
 *
 * Guest offsets are file offsets.  Each request issues one I/O op at a time
 * from its own struct (req->op): the data transfer, then an fdatasync for
 * FUA; write-zeroes and discard punch holes; write-zeroes that must keep
 * the space allocated writes zeros a cluster-sized buffer at a time; block
 * status asks the file system for data and holes (SEEK_DATA/SEEK_HOLE).
 */
#include <config.h>

#include <assert.h>
#include <errno.h>
#include <string.h>
#include <syslog.h>
#include <unistd.h>

#include "qcow2-internal.h"

/* A raw request's states (req->state), its own machine: no segments.
 *
 *   state        does                                     resumed by
 *   RAW_START    submit the request's one op (a flush:    -
 *                fdatasync), or begin writing zeros
 *   RAW_ZEROS    write-zeroes that keeps its space, or    I/O completion
 *                where holes cannot be punched: zeros,
 *                a cluster-sized buffer at a time
 *   RAW_FUA      written: fdatasync when FUA was asked    I/O completion
 *   RAW_DONE     queue the completion callback            I/O completion
 */
enum raw_state {
  RAW_START,                    /* 0: where req_new starts every request */
  RAW_ZEROS,
  RAW_FUA,
  RAW_DONE,
};

static void
op_done (struct aio_op *op, int64_t ret)
{
  struct qcow2_req *req = op->opaque;

  if (ret < 0) {
    bool no_punch = ret == -EOPNOTSUPP || ret == -ENOTSUP;
    if (op->type != AIO_PUNCH || (req->type == REQ_ZERO && !no_punch))
      qlog (req->q, LOG_ERR, "%s on raw image at 0x%llx: %s",
            op->type == AIO_READ ? "read" : op->type == AIO_FSYNC
            ? "fdatasync" : op->type == AIO_PUNCH ? "punch hole" : "write",
            (unsigned long long) op->offset, strerror ((int) -ret));
    /* Discard is advisory: a file system that cannot punch keeps data. */
    if (!(op->type == AIO_PUNCH && req->type == REQ_DISCARD) && !req->err)
      req->err = (int) ret;
    if (op->type == AIO_PUNCH && req->type == REQ_ZERO && no_punch) {
      /* No hole punching here: write the zeros instead. */
      req->err = 0;
      req->raw_pos = req->offset;
      req->state = RAW_ZEROS;
    }
  }
  else if (op->type == AIO_READ && (uint64_t) ret < req->iov.iov_len)
    memset ((char *) req->iov.iov_base + ret, 0, req->iov.iov_len - ret);
  req->outstanding--;
  waitq_wake (req);
}

static void
submit (struct qcow2_req *req, enum aio_op_type type, void *buf,
        uint64_t len, uint64_t off)
{
  struct qcow2 *q = req->q;
  int r;

  req->iov.iov_base = buf;
  req->iov.iov_len = len;
  memset (&req->op, 0, sizeof req->op);
  req->op.type = type;
  req->op.fd = q->fd;
  req->op.inline_mode = q->fd_inline;
  req->op.iov = &req->iov;
  req->op.iovcnt = type == AIO_READ || type == AIO_WRITE ? 1 : 0;
  req->op.offset = off;
  req->op.length = len;
  req->op.done = op_done;
  req->op.opaque = req;
  r = aio_submit (q->aio, &req->op);
  if (r < 0) {
    if (!req->err)
      req->err = r;
    waitq_wake (req);
    return;
  }
  req->outstanding++;
}

/* Block status from the file system's idea of data and holes. */
static void
raw_status (struct qcow2_req *req)
{
  struct qcow2 *q = req->q;
  uint64_t pos = req->offset, end = req->offset + req->len;

  while (pos < end && *req->ext_n < req->ext_max) {
    off_t data = lseek (q->fd, (off_t) pos, SEEK_DATA);
    uint64_t next;
    uint32_t flags;

    if (data < 0 && errno == ENXIO)
      data = (off_t) end;       /* only a hole up to the end */
    if (data < 0) {
      /* No SEEK_DATA here: call everything data. */
      req->ext[(*req->ext_n)++] = (struct qcow2_extent) {
        end - pos, 0, 1 };
      return;
    }
    if ((uint64_t) data > pos) {
      next = (uint64_t) data < end ? (uint64_t) data : end;
      flags = QCOW2_EXTENT_HOLE | QCOW2_EXTENT_ZERO;
    }
    else {
      off_t hole = lseek (q->fd, (off_t) pos, SEEK_HOLE);
      next = hole < 0 || (uint64_t) hole > end ? end : (uint64_t) hole;
      flags = 0;
    }
    /* A raw file has no layers below it: everything is "allocated" here. */
    req->ext[(*req->ext_n)++] = (struct qcow2_extent) { next - pos, flags, 1 };
    pos = next;
  }
}

void
raw_run (struct qcow2_req *req)
{
  struct qcow2 *q = req->q;

  if (req->outstanding)
    return;
  if (req->err)
    req->state = RAW_DONE;

  switch ((enum raw_state) req->state) {
  case RAW_START:
    switch (req->type) {
    case REQ_READ:
      if (req->ext) {
        *req->ext_n = 1;
        req->ext[0] = (struct qcow2_extent) { req->len, 0, 0 };
      }
      req->state = RAW_DONE;
      submit (req, AIO_READ, req->buf, req->len, req->offset);
      return;
    case REQ_WRITE:
      req->state = RAW_FUA;
      submit (req, AIO_WRITE, req->buf, req->len, req->offset);
      return;
    case REQ_FLUSH:
      req->state = RAW_DONE;
      submit (req, AIO_FSYNC, NULL, 0, 0);
      return;
    case REQ_DISCARD:
      req->state = RAW_DONE;
      if (req->len)
        submit (req, AIO_PUNCH, NULL, req->len, req->offset);
      else
        waitq_wake (req);
      return;
    case REQ_ZERO:
      if (req->len && !(req->flags & QCOW2_ZERO_NO_HOLE)) {
        req->state = RAW_FUA;
        submit (req, AIO_PUNCH, NULL, req->len, req->offset);
        return;
      }
      if (req->flags & QCOW2_ZERO_FAST) {
        req->err = -ENOTSUP;
        req->state = RAW_DONE;
        waitq_wake (req);
        return;
      }
      req->raw_pos = req->offset;
      req->state = RAW_ZEROS;     /* writing zeros, a buffer at a time */
      waitq_wake (req);
      return;
    case REQ_STATUS:
      raw_status (req);
      req->state = RAW_DONE;
      waitq_wake (req);
      return;
    default:
      req->state = RAW_DONE;
      waitq_wake (req);
      return;
    }

  case RAW_ZEROS:
    if (req->raw_pos < req->offset + req->len) {
      uint64_t n = req->offset + req->len - req->raw_pos;
      if (n > q->cluster_size)
        n = q->cluster_size;
      submit (req, AIO_WRITE, q->zero_cluster, n, req->raw_pos);
      req->raw_pos += n;
      return;
    }
    req->state = RAW_FUA;
    waitq_wake (req);
    return;

  case RAW_FUA:
    req->state = RAW_DONE;
    if (req->flags & QCOW2_WRITE_FUA) {
      submit (req, AIO_FSYNC, NULL, 0, 0);
      return;
    }
    waitq_wake (req);
    return;

  case RAW_DONE:
    waitq_push (&q->completed, req);
    return;

  }
  assert (!"a raw request in a state of another machine");
}
