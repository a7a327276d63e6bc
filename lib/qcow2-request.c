/* lib/qcow2-request.c: a request's lifetime: creation with its argument
 * checks, child requests (on a backing image, or the plain writes a v2
 * write-zeroes becomes), and the map of a read.
 */
#include <config.h>

#include <errno.h>
#include <stdlib.h>

#include "qcow2-internal.h"

struct qcow2_req *
req_new (struct qcow2 *q, enum req_type type, uint64_t offset, uint64_t len,
         void *buf, unsigned flags, qcow2_done_fn *done, void *opaque,
         int *err)
{
  struct qcow2_req *req;
  bool writes = type != REQ_READ && type != REQ_STATUS;

  *err = 0;
  if (type != REQ_FLUSH) {
    if (offset > q->size || len > q->size - offset)
      *err = -EINVAL;
    else if ((offset | len) & (image_min_align (q) - 1))
      *err = -EINVAL;
  }
  if (!*err && writes && q->read_only)
    *err = -EROFS;
  if (!*err && writes && q->broken)
    *err = -EIO;
  if (*err)
    return NULL;

  req = calloc (1, sizeof *req);
  if (!req) {
    *err = -ENOMEM;
    return NULL;
  }
  req->q = q;
  req->type = type;
  req->offset = offset;
  req->len = len;
  req->buf = buf;
  req->flags = flags;
  req->done = done;
  req->opaque = opaque;
  req->seg_off = offset;
  /* 0 is the first state of either machine: RS_SEGMENT (a flush goes on
   * to RS_FUA from there), RAW_START on a raw image.
   */
  req->state = 0;
  return req;
}

void
req_map_add (struct qcow2_req *req, uint64_t len, bool zero)
{
  uint32_t flags = zero ? QCOW2_EXTENT_HOLE | QCOW2_EXTENT_ZERO : 0;
  unsigned n;

  if (!req->ext || len == 0)
    return;
  n = *req->ext_n;
  if (n > 0 && (req->ext[n - 1].flags == flags || n == req->ext_max)) {
    /* Merge; when the map is full, calling zeros data is still true. */
    if (req->ext[n - 1].flags != flags)
      req->ext[n - 1].flags = 0;
    req->ext[n - 1].length += len;
    return;
  }
  req->ext[n].length = len;
  req->ext[n].flags = flags;
  req->ext[n].depth = 0;
  *req->ext_n = n + 1;
}

struct qcow2_req *
req_spawn (struct qcow2 *target, enum req_type type, uint64_t offset,
           uint64_t len, void *buf, qcow2_done_fn *done, void *opaque,
           int *err)
{
  struct qcow2_req *child = req_new (target, type, offset, len, buf, 0, done,
                                     opaque, err);
  if (!child)
    return NULL;
  target->in_flight++;
  waitq_wake (child);
  return child;
}
