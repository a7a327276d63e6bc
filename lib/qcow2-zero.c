/* lib/qcow2-zero.c: write-zeroes, discard and block status.
 *
 * These change or read only L2 entries, one L2 table (segment) at a time,
 * inside the request state machine of qcow2-request.c: the table is pinned
 * and overlapping allocations have been waited for before a segment gets
 * here.  Entries change only while no flush is writing metadata, and the
 * clusters they stop referencing lose their refcount only after the change
 * is durable (the flusher's deferred decrements).
 *
 * Partial clusters of a write-zeroes that do not already read as zeros are
 * written with zeros by child write requests, which take the ordinary
 * write path (in place, or copy-on-write for shared/compressed clusters).
 */
#include <config.h>

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <syslog.h>

#include "qcow2-internal.h"

static void
child_done (void *opaque, int ret)
{
  struct qcow2_req *parent = opaque;
  if (ret < 0 && !parent->err)
    parent->err = ret;
  parent->children--;
  if (parent->children == 0 && !parent->queued)
    req_wake (parent);
}

/* Write zeros over [pos, pos+len) with an ordinary write. */
static int
spawn_zero_write (struct qcow2_req *req, uint64_t pos, uint64_t len)
{
  struct qcow2 *q = req->q;
  int err;
  struct qcow2_req *child = req_new (q, REQ_WRITE, pos, len, q->zero_cluster,
                                     0, child_done, req, &err);
  if (!child)
    return err;
  child->parent = req;
  req->children++;
  q->in_flight++;
  req_wake (child);
  return 0;
}

bool
zero_segment (struct qcow2_req *req)
{
  struct qcow2 *q = req->q;
  struct cache_entry *e = req->l2;
  bool discard = req->type == REQ_DISCARD;
  bool no_hole = req->flags & QCOW2_ZERO_NO_HOLE;
  bool fast = req->flags & QCOW2_ZERO_FAST;
  uint64_t cs = q->cluster_size;
  uint64_t pos = req->seg_off, end = req->seg_off + req->seg_len;
  bool changed = false;

  if (!e)
    return true;                /* no table: nothing allocated here */
  if (flush_active (q)) {
    flush_barrier_wait (q, req);
    return false;
  }

  while (pos < end && !req->err) {
    uint32_t idx = (uint32_t) (pos >> q->cluster_bits) & (q->l2_entries - 1);
    uint64_t ent = l2_get (e, idx);
    uint64_t cstart = pos & ~(cs - 1);
    uint64_t cend = cstart + cs < end ? cstart + cs : end;
    bool full = pos == cstart && cend == cstart + cs;
    bool zero = entry_reads_zero (q, ent);
    uint64_t nent = ent;
    bool release = false;
    int r;

    if (!full || (!discard && q->version < 3 && no_hole && !zero)) {
      /* Partial cluster (or v2 keeping the allocation): zeros as data. */
      if (!discard && !zero) {
        r = fast ? -ENOTSUP : spawn_zero_write (req, pos, cend - pos);
        if (r < 0)
          req->err = r;
      }
      pos = cend;
      continue;
    }

    if (discard) {
      nent = 0;
      release = true;
    }
    else if (q->version >= 3) {
      if (no_hole && entry_is_inplace (q, ent))
        nent = ent | L2E_ZERO;  /* stays allocated, reads as zeros */
      else if (no_hole && entry_is_zero (q, ent))
        nent = ent;
      else {
        nent = L2E_ZERO;
        release = true;
      }
    }
    else {
      /* v2 has no zero flag; unallocated clusters read as zeros. */
      nent = 0;
      release = true;
    }

    if (nent != ent) {
      if (release && release_entry (q, ent) < 0)
        qlog (q, LOG_WARNING, "out of memory: a released cluster will leak");
      l2_set (e, idx, nent);
      changed = true;
    }
    pos = cend;
  }
  if (changed)
    cache_mark_dirty (e);
  return true;
}

static void
add_extent (struct qcow2_req *req, uint64_t len, uint32_t flags,
            uint32_t depth)
{
  unsigned n = *req->ext_n;
  if (n > 0 && req->ext[n - 1].flags == flags
      && req->ext[n - 1].depth == depth) {
    req->ext[n - 1].length += len;
    return;
  }
  if (n == req->ext_max) {
    /* Full: the answer covers a prefix; stop the request here. */
    req->len = req->seg_off - req->offset;
    return;
  }
  req->ext[n].length = len;
  req->ext[n].flags = flags;
  req->ext[n].depth = depth;
  *req->ext_n = n + 1;
}

void
status_segment (struct qcow2_req *req)
{
  struct qcow2 *q = req->q;
  struct cache_entry *e = req->l2;
  uint64_t cs = q->cluster_size;
  uint64_t pos = req->seg_off, end = req->seg_off + req->seg_len;
  uint64_t start_len = req->len;

  if (!e) {
    add_extent (req, req->seg_len, QCOW2_EXTENT_HOLE | QCOW2_EXTENT_ZERO, 0);
    return;
  }
  while (pos < end && req->len == start_len) {
    uint32_t idx = (uint32_t) (pos >> q->cluster_bits) & (q->l2_entries - 1);
    uint64_t ent = l2_get (e, idx);
    uint64_t cend = (pos & ~(cs - 1)) + cs;
    uint32_t flags = 0, depth = 1;

    if (cend > end)
      cend = end;
    if (entry_is_zero (q, ent))
      flags = QCOW2_EXTENT_HOLE | QCOW2_EXTENT_ZERO;
    else if (!(ent & L2E_COMPRESSED) && !(ent & L2E_OFFSET_MASK)) {
      flags = QCOW2_EXTENT_HOLE | QCOW2_EXTENT_ZERO;
      depth = 0;
    }
    /* add_extent shortens req->len when the array is full. */
    req->seg_off = pos;
    add_extent (req, cend - pos, flags, depth);
    pos = cend;
  }
  /* Keep the segment bookkeeping whole for st_segment. */
  req->seg_off = end - req->seg_len;
  if (req->len != start_len)
    req->seg_len = 0, req->seg_off = req->offset + req->len;
}

int
qcow2_write_zeroes (struct qcow2 *q, uint64_t offset, uint64_t len,
                    unsigned flags, qcow2_done_fn *done, void *opaque)
{
  int err;
  struct qcow2_req *req = req_new (q, REQ_ZERO, offset, len, NULL, flags,
                                   done, opaque, &err);
  if (!req)
    return err;
  req_start (req);
  return 0;
}

int
qcow2_discard (struct qcow2 *q, uint64_t offset, uint64_t len,
               qcow2_done_fn *done, void *opaque)
{
  int err;
  struct qcow2_req *req = req_new (q, REQ_DISCARD, offset, len, NULL, 0,
                                   done, opaque, &err);
  if (!req)
    return err;
  req_start (req);
  return 0;
}

int
qcow2_block_status (struct qcow2 *q, uint64_t offset, uint64_t len,
                    struct qcow2_extent *ext, unsigned max, unsigned *n,
                    qcow2_done_fn *done, void *opaque)
{
  int err;
  struct qcow2_req *req;

  if (max == 0 || len == 0)
    return -EINVAL;
  req = req_new (q, REQ_STATUS, offset, len, NULL, 0, done, opaque, &err);
  if (!req)
    return err;
  *n = 0;
  req->ext = ext;
  req->ext_max = max;
  req->ext_n = n;
  req_start (req);
  return 0;
}
