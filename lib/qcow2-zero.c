/* lib/qcow2-zero.c: write-zeroes, discard and block status.
 *
 * These change or read only L2 entries, one L2 table (segment) at a time,
 * inside the request state machine of qcow2-segment.c: the table is pinned
 * and overlapping allocations have been waited for before a segment gets
 * here.  Entries change only while no flush is writing metadata, and the
 * clusters they stop referencing lose their refcount only after the change
 * is durable (the flusher's deferred decrements).
 *
 * Partial clusters of a write-zeroes that do not already read as zeros are
 * written with zeros by child write requests, which take the ordinary
 * write path (in place, or copy-on-write for shared/compressed clusters).
 *
 * With a raw external data file (data_file_raw) the data file must read as
 * the disk, so each segment's range is also punched out of it.
 */
#include <config.h>

#include <assert.h>
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
    waitq_wake (parent);
}

/* Write zeros over [pos, pos+len) with an ordinary write. */
static int
spawn_zero_write (struct qcow2_req *req, uint64_t pos, uint64_t len)
{
  struct qcow2 *q = req->q;
  int err;
  struct qcow2_req *child = req_spawn (q, REQ_WRITE, pos, len,
                                       q->zero_cluster, child_done, req, &err);
  if (!child)
    return err;
  child->parent = req;
  req->children++;
  return 0;
}

/* Whether guest bytes [pos, end) of one cluster already read as zeros. */
static bool
reads_zero_sc (const struct qcow2 *q, uint64_t ent, uint64_t bmp,
               uint64_t cstart, uint64_t pos, uint64_t end)
{
  uint64_t bsize = q->backing ? q->backing_size_bytes : 0;
  for (uint64_t run_end; pos < end; pos = cstart + run_end) {
    enum sc_kind kind = entry_status (q, ent, bmp, pos - cstart, &run_end);
    if (kind != SC_ZERO && !(kind == SC_HOLE && pos >= bsize))
      return false;
  }
  return true;
}

/* Write-zeroes or discard of guest bytes [pos, end) of one cluster of an
 * image with extended L2: whole subclusters change in the bitmap only,
 * partial ones are written with zeros (write-zeroes) or left (discard).  A
 * cluster left with no data subcluster gives its host cluster back unless
 * NO_HOLE asks to keep it.  Returns whether the table changed.
 */
static bool
zero_cluster_sc (struct qcow2_req *req, uint64_t pos, uint64_t end)
{
  struct qcow2 *q = req->q;
  struct cache_entry *e = req->l2;
  bool discard = req->type == REQ_DISCARD;
  bool no_hole = req->flags & QCOW2_ZERO_NO_HOLE;
  uint64_t cs = q->cluster_size, scs = q->sc_size;
  uint64_t cstart = pos & ~(cs - 1);
  uint32_t idx = l2_index (q, cstart);
  uint64_t ent = l2_get (e, idx), bmp = l2_get_bitmap (e, idx);
  uint64_t nent = ent, nbmp = bmp;
  /* Whole subclusters; the disk's end closes the last one. */
  uint64_t lo = round_up (pos, scs);
  uint64_t hi = end == q->size ? round_up (end, scs) : end & ~(scs - 1);
  bool spawned = false;

  if (lo > end)
    lo = end;
  if (hi < lo)
    hi = lo;
  if (ent & L2E_COMPRESSED) {
    /* No subclusters: all or nothing. */
    if (pos == cstart && hi - cstart >= cs) {
      lo = cstart;
      hi = cstart + cs;
    }
    else
      lo = hi = pos;
  }
  /* The edges (everything, for part of a compressed cluster). */
  if (!discard) {
    uint64_t ranges[2][2] = { { pos, lo }, { hi > pos ? hi : pos, end } };
    if (lo == hi) {
      ranges[0][1] = end;
      ranges[1][0] = ranges[1][1] = end;
    }
    for (int k = 0; k < 2 && !req->err; k++) {
      uint64_t a = ranges[k][0], b = ranges[k][1];
      if (a >= b || reads_zero_sc (q, ent, bmp, cstart, a, b))
        continue;
      int r = (req->flags & QCOW2_ZERO_FAST) ? -ENOTSUP
        : spawn_zero_write (req, a, b - a);
      if (r < 0)
        req->err = r;
      spawned = true;
    }
  }
  if (lo >= hi || req->err)
    return false;

  uint64_t m = entry_sc_mask (q, lo - cstart, hi - cstart);
  if (ent & L2E_COMPRESSED) {
    nent = 0;
    nbmp = 0;
  }
  nbmp &= ~m;
  /* Discard lets the backing file show only where nothing said zeros;
   * with a backing file, zeros it must keep reading.
   */
  if (!discard || q->backing)
    nbmp |= m << 32;
  if (!(nbmp & SC_ALLOC_ALL) && !spawned && !(no_hole && !discard)
      && !entry_is_hole (q, nent))
    nent = 0;                   /* no data left: free the host cluster */
  if (nent == ent && nbmp == bmp)
    return false;
  assert (!flush_active (q));
  if (nent != ent && entry_release (q, ent) < 0)
    qlog (q, LOG_WARNING, "out of memory: a released cluster will leak");
  l2_set (e, idx, nent);
  l2_set_bitmap (e, idx, nbmp);
  return true;
}

/* A segment with no L2 table.  Only v2 write-zeroes over a backing file
 * has work there (v3 gets a table for its zero flags): the backing data
 * must be hidden by writing zeros.
 */
static void
zero_without_table (struct qcow2_req *req)
{
  struct qcow2 *q = req->q;
  uint64_t cs = q->cluster_size;
  uint64_t pos = req->seg_off, end = req->seg_off + req->seg_len;

  if (req->type == REQ_DISCARD || !q->backing)
    return;
  assert (q->version < 3);
  if (req->flags & QCOW2_ZERO_FAST) {
    req->err = -ENOTSUP;
    return;
  }
  while (pos < end && !req->err) {
    uint64_t cend = (pos & ~(cs - 1)) + cs < end
      ? (pos & ~(cs - 1)) + cs : end;
    int r = spawn_zero_write (req, pos, cend - pos);
    if (r < 0)
      req->err = r;
    pos = cend;
  }
}

/* What a write-zeroes or discard of a whole cluster leaves in place of
 * its L2 entry ent, and in *release whether ent's clusters are given back.
 */
static uint64_t
zeroed_entry (const struct qcow2_req *req, uint64_t ent, bool *release)
{
  const struct qcow2 *q = req->q;
  bool no_hole = req->flags & QCOW2_ZERO_NO_HOLE;

  *release = true;
  if (req->type == REQ_DISCARD)
    /* With a backing file, v3 keeps the discarded range reading zeros;
     * v2 cannot say so and lets the backing data show through.
     */
    return q->backing && q->version >= 3 ? L2E_ZERO : 0;
  if (q->version < 3)
    /* v2 has no zero flag; unallocated clusters read as zeros. */
    return 0;
  if (no_hole && entry_is_inplace (q, ent)) {
    *release = false;
    return ent | L2E_ZERO;      /* stays allocated, reads as zeros */
  }
  if (no_hole && entry_is_zero (q, ent)) {
    *release = false;
    return ent;
  }
  return L2E_ZERO;
}

/* Write-zeroes or discard of guest bytes [pos, cend) of one cluster of an
 * image without extended L2: a whole cluster changes its entry, a partial
 * one (or a v2 one that stays allocated) is written with zeros
 * (write-zeroes) or left (discard).  Returns whether the table changed.
 */
static bool
zero_cluster (struct qcow2_req *req, uint64_t pos, uint64_t cend)
{
  struct qcow2 *q = req->q;
  struct cache_entry *e = req->l2;
  bool discard = req->type == REQ_DISCARD;
  bool no_hole = req->flags & QCOW2_ZERO_NO_HOLE;
  uint64_t cs = q->cluster_size;
  uint32_t idx = l2_index (q, pos);
  uint64_t ent = l2_get (e, idx);
  uint64_t cstart = pos & ~(cs - 1);
  /* The last cluster of a disk whose size is not a multiple of the
   * cluster size is whole when the range reaches the end of the disk.
   */
  bool full = pos == cstart && (cend == cstart + cs || cend == q->size);
  bool zero = entry_reads_zero (q, ent);
  uint64_t nent;
  bool release;

  if (!full || (!discard && q->version < 3 && (no_hole || q->backing)
                && !zero)) {
    /* Partial cluster (or v2 keeping the allocation): zeros as data. */
    if (!discard && !zero) {
      int r = (req->flags & QCOW2_ZERO_FAST) ? -ENOTSUP
        : spawn_zero_write (req, pos, cend - pos);
      if (r < 0)
        req->err = r;
    }
    return false;
  }
  nent = zeroed_entry (req, ent, &release);
  if (nent == ent)
    return false;
  assert (!flush_active (q));
  if (release && entry_release (q, ent) < 0)
    qlog (q, LOG_WARNING, "out of memory: a released cluster will leak");
  l2_set (e, idx, nent);
  return true;
}

/* Change the segment's L2 entries.  Returns false when blocked. */
static bool
zero_entries (struct qcow2_req *req)
{
  struct qcow2 *q = req->q;
  struct cache_entry *e = req->l2;
  uint64_t cs = q->cluster_size;
  uint64_t pos = req->seg_off, end = req->seg_off + req->seg_len;
  bool changed = false;

  if (!e) {
    zero_without_table (req);
    return true;
  }
  assert (e->ref > 0);          /* the segment pins its table */
  if (!req->zres_on) {
    uint32_t first = l2_index (q, pos);
    claim_add (e, &req->zres, first, l2_index (q, end - 1) - first + 1);
    req->zres_on = true;
  }
  if (flush_active (q)) {
    flush_barrier_wait (q, req);
    return false;
  }

  while (pos < end && !req->err) {
    uint64_t cstart = pos & ~(cs - 1);
    uint64_t cend = cstart + cs < end ? cstart + cs : end;
    changed |= q->extl2 ? zero_cluster_sc (req, pos, cend)
      : zero_cluster (req, pos, cend);
    pos = cend;
  }
  if (changed)
    cache_mark_dirty (e);
  return true;
}

static void
punch_done (struct aio_op *op, int64_t ret)
{
  struct qcow2_req *req = op->opaque;

  if (ret < 0) {
    qlog (req->q, LOG_ERR, "%s: zeroing the raw data file at 0x%llx: %s",
          req->q->path, (unsigned long long) op->offset,
          strerror ((int) -ret));
    if (!req->err)
      req->err = (int) ret;
  }
  req->outstanding--;
  waitq_wake (req);
}

/* A raw data file must read as the disk does: the range zeroed or
 * discarded in L2 is punched out of it too (guest offset = file offset).
 * The segment keeps its clusters held until the punch is done, so a write
 * into them cannot land before it.
 */
static void
punch_data_file (struct qcow2_req *req)
{
  struct qcow2 *q = req->q;
  int r;

  assert (q->data_file_raw && req->outstanding == 0);
  assert (req->zres_on || !req->l2);
  memset (&req->op, 0, sizeof req->op);
  req->op.type = AIO_PUNCH;
  req->op.fd = q->dfd;
  req->op.inline_mode = q->dfd_inline;
  req->op.offset = req->seg_off;
  req->op.length = req->seg_len;
  req->op.done = punch_done;
  req->op.opaque = req;
  r = aio_submit (q->aio, &req->op);
  if (r < 0) {
    req->err = r;
    return;
  }
  req->outstanding++;
  req->state = RS_IO;
}

static bool
zero_segment (struct qcow2_req *req)
{
  if (!zero_entries (req))
    return false;
  if (!req->q->data_file_raw || req->err || req->seg_len == 0)
    return true;
  punch_data_file (req);
  return req->err != 0;
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
  waitq_wake (req);
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
  child = req_spawn (b, REQ_STATUS, pos, end - pos, NULL,
                     backing_status_done, req, &err);
  if (!child) {
    free (req->child_ext);
    req->child_ext = NULL;
    return err;
  }
  /* It runs from the chain loop, after this: its output can be set now. */
  child->ext = req->child_ext;
  child->ext_max = room;
  child->ext_n = &req->child_n;
  req->outstanding++;
  return 0;
}

/* The kind of guest byte pos (in e's table, or NULL: no table) and in
 * *run_end where the run of that kind ends, at most at end.  Data and
 * compressed data count as one kind.
 */
static enum sc_kind
run_at (const struct qcow2 *q, const struct cache_entry *e, uint64_t pos,
        uint64_t end, uint64_t *run_end)
{
  uint64_t cs = q->cluster_size;
  enum sc_kind first = SC_HOLE;

  for (bool start = true; pos < end; start = false) {
    uint32_t idx = l2_index (q, pos);
    uint64_t ent = e ? l2_get (e, idx) : 0;
    uint64_t bmp = e ? l2_get_bitmap (e, idx) : 0;
    uint64_t cstart = pos & ~(cs - 1), rend;
    enum sc_kind kind = entry_status (q, ent, bmp, pos - cstart, &rend);
    if (kind == SC_COMPRESSED || kind == SC_BAD)
      kind = SC_DATA;
    if (start)
      first = kind;
    else if (kind != first)
      break;
    pos = cstart + rend;
  }
  *run_end = pos < end ? pos : end;
  return first;
}

static bool
status_segment (struct qcow2_req *req)
{
  struct qcow2 *q = req->q;
  struct cache_entry *e = req->l2;
  uint64_t end = req->seg_off + req->seg_len;
  uint64_t bsize = q->backing ? q->backing_size_bytes : 0;
  uint64_t pos = req->status_pos;

  if (req->outstanding)
    return false;
  while (pos < end && !req->status_full && !req->err) {
    uint64_t cend;
    uint32_t flags = 0, depth = 1;
    enum sc_kind kind;

    if (!e && pos >= bsize) {
      /* No table and nothing below: one hole to the segment's end. */
      add_extent (req, pos, end - pos, QCOW2_EXTENT_HOLE | QCOW2_EXTENT_ZERO,
                  0);
      pos = end;
      break;
    }
    kind = run_at (q, e, pos, end, &cend);
    if (kind == SC_HOLE && pos < bsize) {
      /* A hole over the backing file: the run of holes is its business. */
      int r;
      if (cend > bsize)
        cend = bsize;
      req->status_pos = pos;
      r = ask_backing (req, pos, cend);
      if (r < 0) {
        req->err = r;
        break;
      }
      return false;
    }
    if (kind == SC_ZERO)
      flags = QCOW2_EXTENT_HOLE | QCOW2_EXTENT_ZERO;
    else if (kind == SC_HOLE) {
      flags = QCOW2_EXTENT_HOLE | QCOW2_EXTENT_ZERO;
      depth = 0;
    }
    add_extent (req, pos, cend - pos, flags, depth);
    pos = cend;
  }
  req->status_pos = pos;
  if (req->status_full) {
    /* Cut short: the segment walk (qcow2-segment.c) must see the new end. */
    req->seg_off = req->offset + req->len;
    req->seg_len = 0;
  }
  return true;
}

/* A write-zeroes or discard segment, or a block status segment, is done
 * when its plan is: it changes or reads only metadata.
 */
static bool
zero_plan (struct qcow2_req *req)
{
  bool go = zero_segment (req);
  if (go) {
    seg_release (req);
    req->state = RS_SEGMENT;
  }
  return go;
}

static bool
status_plan (struct qcow2_req *req)
{
  bool go = status_segment (req);
  if (go) {
    seg_release (req);
    req->state = RS_SEGMENT;
  }
  return go;
}

const struct seg_ops zero_ops = { .plan = zero_plan };
const struct seg_ops zero_status_ops = { .plan = status_plan };
