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

  if (!e) {
    /* No table.  Only v2 write-zeroes over a backing file has work: the
     * backing data must be hidden by writing zeros.
     */
    if (discard || !q->backing)
      return true;
    if (fast) {
      req->err = -ENOTSUP;
      return true;
    }
    while (pos < end && !req->err) {
      uint64_t cend = (pos & ~(cs - 1)) + cs < end
        ? (pos & ~(cs - 1)) + cs : end;
      int r = spawn_zero_write (req, pos, cend - pos);
      if (r < 0)
        req->err = r;
      pos = cend;
    }
    return true;
  }
  if (!req->zres_on) {
    uint32_t mask = q->l2_entries - 1;
    req->zres.first = (uint32_t) (pos >> q->cluster_bits) & mask;
    req->zres.count = (uint32_t) (((end - 1) >> q->cluster_bits) & mask)
      - req->zres.first + 1;
    req->zres.waiters.head = req->zres.waiters.tail = NULL;
    req->zres.next = e->allocs;
    e->allocs = &req->zres;
    req->zres_on = true;
  }
  if (flush_active (q)) {
    flush_barrier_wait (q, req);
    return false;
  }

  while (pos < end && !req->err) {
    uint32_t idx = (uint32_t) (pos >> q->cluster_bits) & (q->l2_entries - 1);
    uint64_t ent = l2_get (e, idx);
    uint64_t cstart = pos & ~(cs - 1);
    uint64_t cend = cstart + cs < end ? cstart + cs : end;
    /* The last cluster of a disk whose size is not a multiple of the
     * cluster size is whole when the range reaches the end of the disk.
     */
    bool full = pos == cstart && (cend == cstart + cs || cend == q->size);
    bool zero = entry_reads_zero (q, ent);
    uint64_t nent = ent;
    bool release = false;
    int r;

    if (!full || (!discard && q->version < 3 && (no_hole || q->backing)
                  && !zero)) {
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
      /* With a backing file, v3 keeps the discarded range reading zeros;
       * v2 cannot say so and lets the backing data show through.
       */
      nent = q->backing && q->version >= 3 ? L2E_ZERO : 0;
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

/* Append an extent starting at guest offset pos, merging with the last
 * one.  When ext[] is full the request is cut short at pos.
 */
static void
add_extent (struct qcow2_req *req, uint64_t pos, uint64_t len,
            uint32_t flags, uint32_t depth)
{
  unsigned n = *req->ext_n;
  if (req->status_full || len == 0)
    return;
  if (n > 0 && req->ext[n - 1].flags == flags
      && req->ext[n - 1].depth == depth) {
    req->ext[n - 1].length += len;
    return;
  }
  if (n == req->ext_max) {
    req->status_full = true;
    req->len = pos - req->offset;
    return;
  }
  req->ext[n].length = len;
  req->ext[n].flags = flags;
  req->ext[n].depth = depth;
  *req->ext_n = n + 1;
}

static void
backing_status_done (void *opaque, int ret)
{
  struct qcow2_req *req = opaque;
  uint64_t pos = req->status_pos;

  if (ret < 0 && !req->err)
    req->err = ret;
  for (unsigned i = 0; ret == 0 && i < req->child_n; i++) {
    struct qcow2_extent *x = &req->child_ext[i];
    add_extent (req, pos, x->length, x->flags, x->depth ? x->depth + 1 : 0);
    pos += x->length;
  }
  req->status_pos = pos;
  free (req->child_ext);
  req->child_ext = NULL;
  req->outstanding--;
  req_wake (req);
}

/* Ask the backing image about [pos, end).  Returns 0 or -errno. */
static int
ask_backing (struct qcow2_req *req, uint64_t pos, uint64_t end)
{
  struct qcow2 *b = req->q->backing;
  unsigned room = req->ext_max - *req->ext_n + 1;
  struct qcow2_req *child;
  int err;

  req->child_ext = calloc (room, sizeof *req->child_ext);
  if (!req->child_ext)
    return -ENOMEM;
  req->child_n = 0;
  child = req_new (b, REQ_STATUS, pos, end - pos, NULL, 0,
                   backing_status_done, req, &err);
  if (!child) {
    free (req->child_ext);
    req->child_ext = NULL;
    return err;
  }
  child->ext = req->child_ext;
  child->ext_max = room;
  child->ext_n = &req->child_n;
  b->in_flight++;
  req->outstanding++;
  req_wake (child);
  return 0;
}

bool
status_segment (struct qcow2_req *req)
{
  struct qcow2 *q = req->q;
  struct cache_entry *e = req->l2;
  uint64_t cs = q->cluster_size;
  uint64_t end = req->seg_off + req->seg_len;
  uint64_t bsize = q->backing ? q->backing_size_bytes : 0;
  uint64_t pos = req->status_pos;

  if (req->outstanding)
    return false;
  while (pos < end && !req->status_full && !req->err) {
    uint32_t idx = (uint32_t) (pos >> q->cluster_bits) & (q->l2_entries - 1);
    uint64_t ent = e ? l2_get (e, idx) : 0;
    uint64_t cend = (pos & ~(cs - 1)) + cs;
    uint32_t flags = 0, depth = 1;

    if (!e && pos >= bsize) {
      /* No table and nothing below: one hole to the segment's end. */
      add_extent (req, pos, end - pos, QCOW2_EXTENT_HOLE | QCOW2_EXTENT_ZERO,
                  0);
      pos = end;
      break;
    }
    if (cend > end)
      cend = end;
    if (entry_is_hole (q, ent) && !entry_is_zero (q, ent) && pos < bsize) {
      /* A hole over the backing file: the run of holes is its business. */
      uint64_t run_end = cend;
      int r;
      while (run_end < end && run_end < bsize) {
        uint64_t next = e ? l2_get (e, (uint32_t) (run_end >> q->cluster_bits)
                                    & (q->l2_entries - 1)) : 0;
        if (!entry_is_hole (q, next) || entry_is_zero (q, next))
          break;
        run_end += cs;
      }
      if (run_end > end)
        run_end = end;
      if (run_end > bsize)
        run_end = bsize;
      req->status_pos = pos;
      r = ask_backing (req, pos, run_end);
      if (r < 0) {
        req->err = r;
        break;
      }
      return false;
    }
    if (entry_is_zero (q, ent))
      flags = QCOW2_EXTENT_HOLE | QCOW2_EXTENT_ZERO;
    else if (entry_is_hole (q, ent)) {
      flags = QCOW2_EXTENT_HOLE | QCOW2_EXTENT_ZERO;
      depth = 0;
    }
    add_extent (req, pos, cend - pos, flags, depth);
    pos = cend;
  }
  req->status_pos = pos;
  if (req->status_full) {
    /* Cut short: make st_segment see the (new) end. */
    req->seg_off = req->offset + req->len;
    req->seg_len = 0;
  }
  return true;
}

/* Whether a fast write-zeroes could need to write data: then it must fail
 * before changing anything (NBD: contents unchanged on ENOTSUP).  Decided
 * from the request alone, so sometimes more cautious than needed.
 */
static bool
fast_zero_may_write (const struct qcow2 *q, uint64_t offset, uint64_t len,
                     unsigned flags)
{
  uint64_t cs = q->cluster_size;
  uint64_t end = offset + len;
  if (q->raw)
    return flags & QCOW2_ZERO_NO_HOLE;
  if ((offset & (cs - 1)) || ((end & (cs - 1)) && end != q->size))
    return true;                /* partial clusters are written as data */
  return q->version < 3 && (q->backing || (flags & QCOW2_ZERO_NO_HOLE));
}

int
qcow2_write_zeroes (struct qcow2 *q, uint64_t offset, uint64_t len,
                    unsigned flags, qcow2_done_fn *done, void *opaque)
{
  int err;
  struct qcow2_req *req;

  if ((flags & QCOW2_ZERO_FAST) && offset <= q->size
      && len <= q->size - offset && len
      && fast_zero_may_write (q, offset, len, flags))
    return -ENOTSUP;
  req = req_new (q, REQ_ZERO, offset, len, NULL, flags, done, opaque, &err);
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
