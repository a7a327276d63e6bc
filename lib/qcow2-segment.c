/* lib/qcow2-segment.c: the states every guest request's segments share.
 *
 * A request is cut into segments, one per L2 slice it touches, run one
 * after another by the engine (qcow2-engine.c).  Each state does one step
 * and either goes on at once or blocks (parked on a list, or waiting for
 * its I/O).  This file does the shared states; RS_PLAN, RS_COW_READ and
 * RS_LINK are the request type's handler (struct seg_ops: qcow2-rw.c for
 * reads and writes, qcow2-zero.c for write-zeroes, discard and block
 * status).  Raw images have a machine of their own (qcow2-raw.c).
 *
 *   state          does                                   resumed by
 *   RS_SEGMENT     pick the next segment, or finish       -
 *   RS_GET_L2      pin the segment's L2 slice; a write    slice loaded; slot
 *                  creates the table when missing and     free; flush ended
 *                  copies it when shared with a snapshot
 *   RS_WAIT_DEPS   write: wait while a claim covers one   that claim dropped
 *                  of our clusters (qcow2-claim.c)        (linked or failed)
 *   RS_PLAN        handler: map clusters to host          -
 *                  offsets, claim new clusters, start
 *                  COW reads or the data I/O
 *   RS_COW_READ    wait for the old data a partial        I/O completion
 *                  allocation must keep, then (handler)
 *                  start the merged head+data+tail writes
 *   RS_IO          wait for the segment's data I/O        I/O completion
 *   RS_LINK        handler (writes): point L2 entries at  flush ended (L2 is
 *                  the new clusters, drop the claims      frozen during one)
 *   RS_CHILDREN    wait for child requests (a v2          the last child
 *                  write-zeroes' plain writes), also      ending
 *                  before ending a failed request
 *   RS_FUA         write with FUA, or a client flush:     -
 *                  ask the flusher for a flush
 *   RS_FUA_DONE    that flush ended                       flusher done
 *   RS_DONE        queue the completion callback          -
 *
 * A request that fails ends once none of its I/O is in flight and none of
 * its children is running.
 */
#include <config.h>

#include <assert.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <syslog.h>

#include "qcow2-internal.h"



/* ---- wait lists ---- */

/* ---- helpers ---- */

static uint64_t
l2_coverage (const struct qcow2 *q)
{
  return (uint64_t) 1 << (q->cluster_bits + q->l2_bits);
}

/* The end of the run of guest bytes from pos (before end) whose L1
 * entries name no L2 table; pos itself when its entry names one.
 */
static uint64_t
unallocated_run_end (const struct qcow2 *q, uint64_t pos, uint64_t end)
{
  uint64_t l1cov = (uint64_t) 1 << q->l1_shift;

  while (pos < end && (pos >> q->l1_shift) < q->l1_size
         && (be64toh (q->l1[pos >> q->l1_shift]) & L1E_OFFSET_MASK) == 0)
    pos = (pos | (l1cov - 1)) + 1;
  return pos < end ? pos : end;
}

/* ---- states ---- */

/* Returns true to go on with the next state, false when blocked. */
bool
seg_next (struct qcow2_req *req)
{
  struct qcow2 *q = req->q;
  uint64_t end = req->offset + req->len;
  uint64_t pos = req->seg_off + req->seg_len;
  uint64_t cov = l2_coverage (q);

  if (pos >= end) {
    if (req->children) {
      req->state = RS_CHILDREN;
      return false;             /* the last child wakes us */
    }
    if (req->type == REQ_FLUSH
        || ((req->type == REQ_WRITE || req->type == REQ_ZERO)
            && (req->flags & QCOW2_WRITE_FUA))) {
      req->state = RS_FUA;
      return true;
    }
    req->state = RS_DONE;
    return true;
  }
  if (req->type == REQ_STATUS && *req->ext_n > 0
      && (req->status_full || req->segments >= 64)) {
    /* Answer for a prefix: enough work for one request. */
    req->state = RS_DONE;
    return true;
  }
  req->seg_off = pos;
  req->status_pos = pos;
  req->seg_len = end - pos;
  if (req->seg_len > cov - (pos & (cov - 1)))
    req->seg_len = cov - (pos & (cov - 1));
  if (req->type == REQ_STATUS || (req->type == REQ_READ && !q->backing)) {
    /* A run of L1 entries without a table is one segment (no slice to
     * look at, and one extent), however many slices it spans.
     */
    uint64_t p = unallocated_run_end (q, pos, end);
    if (p - pos > req->seg_len)
      req->seg_len = p - pos;
  }
  req->state = RS_GET_L2;
  return true;
}

/* Allocate a fresh L2 table, optionally a copy of old, and hook it into L1.
 * Returns CACHE_READY with req->l2 (its slice number slice) pinned,
 * CACHE_WAIT when parked, or -errno.  The other slices of a new table are
 * not cached: the cluster comes from past everything the file ever held,
 * so they read as zeros.
 * A copy (old) is only made of whole tables: images that may need one are
 * never sliced (qcow2-open.c).
 */
static int
new_l2_table (struct qcow2_req *req, uint64_t l1i, uint64_t slice,
              struct cache_entry *old)
{
  struct qcow2 *q = req->q;
  struct cache_entry *e;
  uint64_t off;
  int r;

  if (flush_active (q)) {
    flush_barrier_wait (q, req);
    return CACHE_WAIT;
  }
  r = overlap_l2_reserve (q);
  if (r < 0)
    return r;
  /* The second entry this request pins when old is one. */
  assert (q->l2c.min >= (old ? 2u : 1u) && CACHE_MAX_PINS_L2 >= 2);
  r = cache_get_empty (&q->l2c, req, &e);
  if (r != CACHE_READY)
    return r;
  r = alloc_fresh_clusters (q, 1, &off);
  if (r < 0) {
    cache_set_offset (e, 0);
    cache_put (e);
    return r;
  }
  cache_set_offset (e, off + slice * q->l2_slice_bytes);
  if (old) {
    memcpy (e->buf, old->buf, q->l2_slice_bytes);
    if (extent_add (&q->decs, be64toh (q->l1[l1i]) & L1E_OFFSET_MASK, 1) < 0)
      qlog (q, LOG_WARNING, "out of memory: an old L2 table will leak");
  }
  overlap_l2_replace (q, be64toh (q->l1[l1i]) & L1E_OFFSET_MASK, off);
  q->l1[l1i] = htobe64 (off | L1E_COPIED);
  if (q->l1_dirty_lo < 0 || (int64_t) l1i < q->l1_dirty_lo)
    q->l1_dirty_lo = (int64_t) l1i;
  if ((int64_t) l1i > q->l1_dirty_hi)
    q->l1_dirty_hi = (int64_t) l1i;
  req->l2 = e;
  return CACHE_READY;
}

bool
seg_get_l2 (struct qcow2_req *req)
{
  struct qcow2 *q = req->q;
  uint64_t l1i = req->seg_off >> q->l1_shift;
  uint64_t l1e = be64toh (q->l1[l1i]);
  uint64_t off = l1e & L1E_OFFSET_MASK;
  /* The slice of the table that maps this segment. */
  uint64_t slice = (req->seg_off & (((uint64_t) 1 << q->l1_shift) - 1))
    >> (q->cluster_bits + q->l2_bits);
  bool write = req->type == REQ_WRITE || req->type == REQ_ZERO
    || req->type == REQ_DISCARD;
  struct cache_entry *e;
  int r;

  if (off == 0) {
    if (req->type == REQ_READ && !q->backing) {
      memset (req->buf + (req->seg_off - req->offset), 0, req->seg_len);
      req_map_add (req, req->seg_len, true);
      req->state = RS_SEGMENT;
      return true;
    }
    if (req->type == REQ_READ) {
      req->l2 = NULL;           /* all holes: plan_read reads the backing */
      req->state = RS_PLAN;
      return true;
    }
    /* Nothing allocated here.  Without a backing file that reads as
     * zeros; with one, zeroes and discards on v3 need a table for the
     * zero flags (v2 write-zeroes writes zeros, in child requests).
     */
    if (req->type != REQ_WRITE
        && !(q->backing && q->version >= 3 && req->type != REQ_STATUS)) {
      req->l2 = NULL;
      req->state = RS_PLAN;
      return true;
    }
    r = new_l2_table (req, l1i, slice, NULL);
    if (r != CACHE_READY)
      goto out;
    req->state = RS_WAIT_DEPS;
    return true;
  }

  r = corrupt_check_cluster (q, off, "L2 table");
  if (r < 0)
    goto out;
  r = cache_get (&q->l2c, off + slice * q->l2_slice_bytes, req, &e);
  if (r != CACHE_READY)
    goto out;

  if (write && !(l1e & L1E_COPIED)) {
    /* The table is shared with a snapshot: never modify it in place. */
    r = new_l2_table (req, l1i, slice, e);
    cache_put (e);
    if (r != CACHE_READY)
      goto out;
    req->state = RS_WAIT_DEPS;
    return true;
  }
  req->l2 = e;
  req->state = write ? RS_WAIT_DEPS : RS_PLAN;
  req->segments++;
  return true;

 out:
  if (r < 0 && !req->err)
    req->err = r;
  return r < 0;
}

bool
seg_wait_claims (struct qcow2_req *req)
{
  struct qcow2 *q = req->q;
  uint32_t first = l2_index (q, req->seg_off);
  uint32_t last = l2_index (q, req->seg_off + req->seg_len - 1);
  struct claim *a = claim_find (req->l2, first, last);

  if (a) {
    waitq_push (&a->waiters, req);
    return false;
  }
  req->state = RS_PLAN;
  return true;
}

/* Free everything the current segment holds.  No I/O may be in flight. */
void
seg_release (struct qcow2_req *req)
{
  struct qcow2 *q = req->q;
  /* Buffers below may still be the target of an op otherwise. */
  assert (req->outstanding == 0);
  for (unsigned i = 0; i < req->nios; i++) {
    struct req_io *io = &req->ios[i];
    if (io->alloc && req->l2)
      claim_drop (q, req->l2, &io->a);
    free (io->cow_buf[0]);
    free (io->cow_buf[1]);
    free (io->cbuf);
    free (io->zbuf);
    assert (q->top->mem_held >= io->cbuf_len);
    q->top->mem_held -= io->cbuf_len;
  }
  free (req->ios);
  req->ios = NULL;
  req->nios = 0;
  if (req->zres_on && req->l2)
    claim_drop (q, req->l2, &req->zres);
  req->zres_on = false;
  if (req->l2) {
    cache_put (req->l2);
    req->l2 = NULL;
  }
}
