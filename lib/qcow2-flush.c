/* lib/qcow2-flush.c: ordered metadata write-back (the flusher).
 *
 * This file is the one place that knows the order that keeps an image
 * consistent after a crash (DESIGN.md, "Ordering").  A flush run goes
 * through these states, one step function each, which flush_step
 * dispatches.  A state that started writes or syncs is followed by the next
 * only once all of them completed (flush_note_io and punch_done wake the
 * run); what else resumes a state is in [brackets].
 *
 *   FL_IDLE          no run  [flush_wait starts one]
 *   FL_START         take the refcount increments owed by allocations made
 *                    before the run (not while lazy) and retire the packing
 *                    buffers; with no metadata to write, on to FL_SYNC
 *                    [flush_wait, or a run ending with flushes queued]
 *   FL_CW            write the cluster of packed compressed data
 *   FL_CW_WAIT       wait for full ones still being written
 *                    [their completion, through q->cw_waiters]
 *   FL_INCS          apply the increments (creating refcount blocks and
 *                    growing the refcount table in memory as needed)
 *                    [a refcount block loaded into the cache]
 *   FL_RB            write dirty refcount blocks
 *   FL_SYNC_RB       fdatasync: data and refcounts durable before anything
 *                    points at them
 *   FL_REFTABLE      write a new or changed refcount table (else on to FL_L2)
 *   FL_REFTABLE_SYNC fdatasync; on to FL_L2 unless the table moved
 *   FL_HEADER        write the header fields that point at the moved table
 *   FL_HEADER_SYNC   fdatasync; then the old table is owed its decrements
 *   FL_L2            write dirty L2 tables
 *   FL_SYNC_L2       fdatasync (if L1 changed): L2 tables durable before L1
 *                    points at them
 *   FL_L1            write the dirty part of L1
 *   FL_SYNC          fdatasync: the point every waiting flush is satisfied
 *   FL_DECS          only now take the decrements owed for clusters that
 *                    L2/L1 no longer reference (not while lazy)
 *   FL_DECS_APPLY    apply them, noting the clusters that reach zero
 *                    [a refcount block loaded into the cache]
 *   FL_DECS_RB       write those refcount blocks
 *   FL_DECS_SYNC     fdatasync
 *   FL_PUNCH         punch the clusters whose refcount reached zero out of
 *                    the file (their space goes back to the file system)
 *   FL_DONE          hand those clusters to the allocator, wake everyone;
 *                    start the next run if flushes queued up
 *
 * An error in any state ends the run at FL_DONE, which fails the flushes
 * it was to satisfy; what the run took but did not write is kept for the
 * next one.
 *
 * While a run is active, L1 and L2 entries must not change (requests wait
 * on the barrier list to link), so what is written is exactly what the
 * refcounts written before it cover.  Data writes keep running meanwhile.
 * The flusher runs as a pseudo-request on the image's runnable list.
 */
#include <config.h>

#include <assert.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <syslog.h>

#include "qcow2-internal.h"

enum fl_state {
  FL_IDLE,
  FL_START,
  FL_CW,
  FL_CW_WAIT,
  FL_INCS,
  FL_RB,
  FL_SYNC_RB,
  FL_REFTABLE,
  FL_REFTABLE_SYNC,
  FL_HEADER,
  FL_HEADER_SYNC,
  FL_L2,
  FL_SYNC_L2,
  FL_L1,
  FL_SYNC,
  FL_DECS,
  FL_DECS_APPLY,
  FL_DECS_RB,
  FL_DECS_SYNC,
  FL_PUNCH,
  FL_DONE,
};

struct flusher {
  struct qcow2_req req;         /* lets the flusher wait like a request */
  enum fl_state state;
  bool active;                  /* L1/L2 frozen */
  bool waiting_io;              /* blocked on outstanding I/O */
  unsigned outstanding;         /* metadata writes and syncs in flight */
  int err;                      /* first error of this run */
  bool meta;                    /* this run writes metadata */
  bool full;                    /* apply refcounts even in lazy mode */
  struct waitq cur;             /* satisfied by the run in progress */
  struct waitq next;            /* arrived during a run: need another */
  struct waitq barrier;         /* wait for the run to end */
  struct extent_list work;      /* refcount changes being applied */
  size_t work_i;                /* extent in progress */
  uint64_t work_done;           /* clusters of it already applied */
  bool decrement;               /* work holds decrements */
  struct aio_op op;
  struct aio_op data_sync;      /* fdatasync of an external data file */
  struct iovec iov;
  struct extent_list freed;     /* clusters whose refcount reached zero */
  int64_t l1_lo, l1_hi;         /* L1 range being written, -1 if none */
  bool reftable_pending;        /* the refcount table is being written */
  struct aio_op *punch;         /* one hole punch per freed extent */
  size_t npunch;
  struct extent_list reusable;  /* freed by this run, durably: reused once
                                   the run (and its punches) ends well */
  /* Refcount changes a failed run took but did not apply.  Kept here,
   * not appended to q->incs/q->decs (which can fail for memory, and an
   * increment lost is corruption): the next run takes them first.
   */
  struct extent_list carry_incs, carry_decs;
};

static void flush_note_io (struct qcow2 *q, int64_t ret);
static void flush_step (struct qcow2 *q);

/* The flusher runs on the request loop as a request of its own. */
static void
flusher_run (struct qcow2_req *req)
{
  flush_step (req->q);
}

int
flush_init (struct qcow2 *q)
{
  struct flusher *fl = calloc (1, sizeof *fl);
  if (!fl)
    return -ENOMEM;
  fl->req.q = q;
  fl->req.type = REQ_FLUSHER;
  fl->req.run = flusher_run;
  fl->l1_lo = fl->l1_hi = -1;
  q->flusher = fl;
  /* The cache and the compressed-write cache sit below the flusher: they
   * reach it through these.
   */
  q->flush_io_done = flush_note_io;
  q->flush_request = flush_wait;
  return 0;
}

void
flush_free (struct qcow2 *q)
{
  if (q->flusher) {
    free (q->flusher->work.v);
    free (q->flusher->freed.v);
    free (q->flusher->reusable.v);
    free (q->flusher->punch);
    free (q->flusher->carry_incs.v);
    free (q->flusher->carry_decs.v);
    free (q->flusher);
    q->flusher = NULL;
  }
}

bool
flush_active (const struct qcow2 *q)
{
  return q->flusher->active;
}

void
flush_set_full (struct qcow2 *q)
{
  q->flusher->full = true;
}

void
flush_wait (struct qcow2 *q, struct qcow2_req *req)
{
  struct flusher *fl = q->flusher;
  if (fl->state == FL_IDLE) {
    waitq_push (&fl->cur, req);
    fl->state = FL_START;
    waitq_wake (&fl->req);
  }
  else
    waitq_push (&fl->next, req);
}

void
flush_barrier_wait (struct qcow2 *q, struct qcow2_req *req)
{
  waitq_push (&q->flusher->barrier, req);
}

static void
flush_note_io (struct qcow2 *q, int64_t ret)
{
  struct flusher *fl = q->flusher;
  if (ret < 0 && !fl->err)
    fl->err = (int) ret;
  /* Every completion is of an op counted when it was submitted. */
  assert (fl->outstanding > 0);
  if (--fl->outstanding == 0 && fl->waiting_io) {
    fl->waiting_io = false;
    waitq_wake (&fl->req);
  }
}

static void
op_done (struct aio_op *op, int64_t ret)
{
  struct qcow2 *q = op->opaque;
  if (ret < 0)
    qlog (q, LOG_ERR, "%s during metadata flush: %s",
          op->type == AIO_FSYNC ? "fdatasync" : "write",
          strerror ((int) -ret));
  flush_note_io (q, ret);
}

/* Submit one fsync or write of the flusher's own; the run resumes when it
 * completes.
 */
static void
submit_op (struct qcow2 *q, enum aio_op_type type, void *buf, size_t len,
           uint64_t offset)
{
  struct flusher *fl = q->flusher;
  int r;

  fl->iov.iov_base = buf;
  fl->iov.iov_len = len;
  fl->op.type = type;
  fl->op.fd = q->fd;
  fl->op.iov = &fl->iov;
  fl->op.iovcnt = type == AIO_FSYNC ? 0 : 1;
  fl->op.offset = offset;
  fl->op.done = op_done;
  fl->op.opaque = q;
  r = aio_submit (q->aio, &fl->op);
  if (r < 0) {
    qlog (q, LOG_ERR, "submitting %s during metadata flush: %s",
          type == AIO_FSYNC ? "fdatasync" : "write", strerror (-r));
    if (!fl->err)
      fl->err = r;
    return;
  }
  fl->outstanding++;
  if (type == AIO_FSYNC && q->dfd != q->fd) {
    /* Guest data in an external data file must be durable too: a sync
     * that cannot be started fails the run like one that fails.
     */
    fl->data_sync = fl->op;
    fl->data_sync.fd = q->dfd;
    r = aio_submit (q->aio, &fl->data_sync);
    if (r < 0) {
      qlog (q, LOG_ERR, "submitting fdatasync of the data file during "
            "metadata flush: %s", strerror (-r));
      if (!fl->err)
        fl->err = r;
      return;
    }
    fl->outstanding++;
  }
}

/* Clusters for the flusher's own metadata: their increments belong to the
 * run in progress, not to the next one.  They come out of the space that
 * every allocation reserved for them (qcow2-space.c), so a flush never runs
 * out of space for the metadata of writes already acknowledged.  Returns 0
 * with the offset in *out, or -ENOMEM.
 */
static int
own_alloc (struct qcow2 *q, uint64_t count, uint64_t *out)
{
  uint64_t off = q->alloc_end;
  int r = extent_add (&q->flusher->work, off, count);

  if (r < 0)
    return r;
  space_consume (q, count);
  *out = off;
  return 0;
}

/* Replace the refcount table (in memory) by one that can index block
 * index need.  The new table is written and the header switched over in
 * FL_REFTABLE/FL_HEADER.
 */
static int
grow_reftable (struct qcow2 *q, uint64_t need)
{
  uint64_t cs = q->cluster_size;
  uint64_t entries = q->reftable_entries * 2;
  uint64_t clusters, off, old_off = q->reftable_offset;
  uint32_t old_clusters = q->reftable_clusters;
  uint64_t *t;

  if (entries < need + 1)
    entries = need + 1;
  clusters = round_up (entries * 8, cs) / cs;
  /* Leave room for the table's own clusters and a refcount block or two. */
  clusters += 1;
  if (clusters * cs > MAX_REFTABLE_BYTES * 4) {
    qlog (q, LOG_ERR, "refcount table would exceed %u bytes",
          MAX_REFTABLE_BYTES * 4);
    return -EFBIG;
  }
  t = buffer_alloc_zero (clusters * cs);
  if (!t)
    return -ENOMEM;
  if (own_alloc (q, clusters, &off) < 0) {
    free (t);
    return -ENOMEM;
  }
  memcpy (t, q->reftable, q->reftable_entries * 8);
  if (q->reftable_moved) {
    /* Grown twice in one run: the first new table was never published. */
    if (extent_add (&q->decs, old_off, old_clusters) < 0)
      qlog (q, LOG_WARNING, "out of memory: %u clusters of an unused "
            "refcount table at 0x%llx will leak", old_clusters,
            (unsigned long long) old_off);
  }
  else {
    q->old_reftable_offset = old_off;
    q->old_reftable_clusters = old_clusters;
  }
  free (q->reftable);
  q->reftable = t;
  q->reftable_offset = off;
  q->reftable_clusters = (uint32_t) clusters;
  q->reftable_entries = clusters * cs / 8;
  q->reftable_moved = true;
  qlog (q, LOG_INFO, "refcount table grown to %llu clusters at 0x%llx",
        (unsigned long long) clusters, (unsigned long long) off);
  return 0;
}

/* Remember a cluster whose refcount dropped to zero, to punch it out of
 * the file once the refcount is durable.
 */
static void
note_freed (struct qcow2 *q, uint64_t off)
{
  struct extent_list *l = &q->flusher->freed;
  if (l->n > 0 && l->v[l->n - 1].offset
      + (l->v[l->n - 1].count << q->cluster_bits) == off) {
    l->v[l->n - 1].count++;
    return;
  }
  /* Not punched, not reused: the space stays in the file, nothing else. */
  if (extent_add (l, off, 1) < 0)
    qlog (q, LOG_WARNING, "out of memory: freed cluster 0x%llx is not "
          "reused", (unsigned long long) off);
}

static void
punch_done (struct aio_op *op, int64_t ret)
{
  struct qcow2 *q = op->opaque;
  /* Punching is an optimisation: file systems without it keep the space. */
  if (ret < 0 && ret != -EOPNOTSUPP)
    qlog (q, LOG_DEBUG, "punching freed clusters at 0x%llx: %s",
          (unsigned long long) op->offset, strerror ((int) -ret));
  /* Counted when start_punches submitted it. */
  assert (q->flusher->outstanding > 0);
  q->flusher->outstanding--;
  if (q->flusher->outstanding == 0 && q->flusher->waiting_io) {
    q->flusher->waiting_io = false;
    waitq_wake (&q->flusher->req);
  }
}

static void
start_punches (struct qcow2 *q)
{
  struct flusher *fl = q->flusher;
  size_t n = fl->freed.n;

  if (n == 0)
    return;
  /* A refcount that reached zero for a cluster that still holds metadata
   * means the image lied (an L2 entry naming a refcount block, say):
   * punching it would destroy that metadata.  The check marks the image
   * corrupt; nothing is punched or reused then.
   */
  for (size_t i = 0; i < n; i++)
    if (overlap_check (q, META_DATA, fl->freed.v[i].offset,
                       fl->freed.v[i].count << q->cluster_bits) < 0) {
      if (!fl->err)
        fl->err = -EIO;
      fl->freed.n = 0;
      return;
    }
  /* Their zero refcounts are durable (FL_DECS_SYNC): once punched they
   * can be handed out again.
   */
  for (size_t i = 0; i < n && !fl->err; i++)
    if (extent_add (&fl->reusable, fl->freed.v[i].offset,
                    fl->freed.v[i].count) < 0) {
      /* Those left out stay free on disk, unused until the next open. */
      qlog (q, LOG_WARNING, "out of memory: %zu freed extents are not "
            "reused", n - i);
      break;
    }
  free (fl->punch);
  fl->punch = calloc (n, sizeof *fl->punch);
  if (!fl->punch) {
    fl->freed.n = 0;
    return;
  }
  for (size_t i = 0; i < n; i++) {
    struct aio_op *op = &fl->punch[i];
    op->type = AIO_PUNCH;
    op->fd = q->fd;
    op->offset = fl->freed.v[i].offset;
    op->length = fl->freed.v[i].count << q->cluster_bits;
    op->done = punch_done;
    op->opaque = q;
    if (aio_submit (q->aio, op) == 0)
      fl->outstanding++;
  }
  fl->freed.n = 0;
}

static int
cmp_extent (const void *a, const void *b)
{
  const struct extent *x = a, *y = b;
  return x->offset < y->offset ? -1 : x->offset > y->offset;
}

/* Whether host offset off lies in one of the n sorted extents v. */
static bool
in_extents (const struct qcow2 *q, const struct extent *v, size_t n,
            uint64_t off)
{
  size_t lo = 0, hi = n;
  while (lo < hi) {
    size_t mid = lo + (hi - lo) / 2;
    if (off < v[mid].offset)
      hi = mid;
    else if (off >= v[mid].offset + (v[mid].count << q->cluster_bits))
      lo = mid + 1;
    else
      return true;
  }
  return false;
}

/* At the end of a run that went well: the clusters it freed go to the
 * allocator.  A freed cluster that an L1 entry still names as an L2 table
 * means the refcounts were wrong (the overlap check guards the other
 * metadata when data is written): the image is marked corrupt instead.
 */
static void
make_reusable (struct qcow2 *q)
{
  struct flusher *fl = q->flusher;
  struct extent_list *r = &fl->reusable;

  if (r->n == 0 || fl->err) {
    r->n = 0;
    return;
  }
  qsort (r->v, r->n, sizeof *r->v, cmp_extent);
  for (uint32_t i = 0; i < q->l1_size; i++) {
    uint64_t l2 = be64toh (q->l1[i]) & L1E_OFFSET_MASK;
    if (l2 && in_extents (q, r->v, r->n, l2)) {
      corrupt_signal (q, "the L2 table at 0x%llx has a refcount of zero",
                      (unsigned long long) l2);
      r->n = 0;
      return;
    }
  }
  /* The decompressed copies of what is freed would outlive its bytes. */
  dcache_clear (q);
  for (size_t i = 0; i < r->n; i++) {
    /* A packing buffer holds a reference until it is retired. */
    assert (!cw_holds (q, r->v[i].offset, r->v[i].count));
    if (extent_add (&q->free_clusters, r->v[i].offset, r->v[i].count) < 0)
      break;                    /* not reused: only space lost */
    if (r->v[i].count > q->free_largest)
      q->free_largest = r->v[i].count;
  }
  r->n = 0;
}

/* Apply fl->work to the refcount blocks.  Returns 1 when all is applied,
 * 0 when blocked on a refcount block, -errno on failure.
 */
static int
apply_work (struct qcow2 *q)
{
  struct flusher *fl = q->flusher;

  while (fl->work_i < fl->work.n) {
    struct extent *x = &fl->work.v[fl->work_i];
    uint64_t c = (x->offset >> q->cluster_bits) + fl->work_done;
    uint64_t rbi = c >> q->rb_bits;
    uint64_t per_block = (uint64_t) 1 << q->rb_bits;
    uint64_t n, rboff;
    struct cache_entry *e;
    int r;

    if (fl->work_done == x->count) {
      fl->work_i++;
      fl->work_done = 0;
      continue;
    }
    if (rbi >= q->reftable_entries) {
      if (fl->decrement)
        return corrupt_signal (q, "freeing cluster 0x%llx outside the "
                               "refcount table",
                               (unsigned long long) c);
      r = grow_reftable (q, rbi);
      if (r < 0)
        return r;
      continue;
    }
    /* The one refcount block pinned below (a read-only image, which
     * reserves none, never gets here).
     */
    assert (q->rbc.min >= CACHE_MAX_PINS_RB);
    rboff = be64toh (q->reftable[rbi]) & REFT_OFFSET_MASK;
    if (rboff == 0) {
      if (fl->decrement)
        return corrupt_signal (q, "freeing cluster 0x%llx that has no "
                               "refcount block", (unsigned long long) c);
      r = cache_get_empty (&q->rbc, &fl->req, &e);
      if (r != CACHE_READY)
        return r < 0 ? r : 0;
      if (own_alloc (q, 1, &rboff) < 0) {
        cache_set_offset (e, 0);
        cache_put (e);
        return -ENOMEM;
      }
      cache_set_offset (e, rboff);
      /* Before the entry is set: it is counted as missing until then. */
      space_block_created (q, rbi);
      q->reftable[rbi] = htobe64 (rboff);
      if (rbi + 1 > q->reftable_used)
        q->reftable_used = rbi + 1;
      q->reftable_dirty = true;
      /* x may have moved: own_alloc can grow the extent array. */
      x = &fl->work.v[fl->work_i];
    }
    else {
      if ((rboff & (q->cluster_size - 1)) || rboff >= q->alloc_end)
        return corrupt_signal (q, "refcount block offset 0x%llx is "
                               "invalid", (unsigned long long) rboff);
      r = cache_get (&q->rbc, rboff, &fl->req, &e);
      if (r != CACHE_READY)
        return r < 0 ? r : 0;
    }

    n = per_block - (c & (per_block - 1));
    if (n > x->count - fl->work_done)
      n = x->count - fl->work_done;
    for (uint64_t i = 0; i < n; i++) {
      uint64_t idx = (c + i) & (per_block - 1);
      uint64_t v = refblock_get (q, e->buf, idx);
      if (fl->decrement) {
        if (v == 0) {
          cache_put (e);
          return corrupt_signal (q, "refcount of cluster 0x%llx would "
                                 "drop below zero",
                                 (unsigned long long) ((c + i)
                                                          << q->cluster_bits));
        }
        v--;
        if (v == 0)
          note_freed (q, (c + i) << q->cluster_bits);
      }
      else {
        if (v == q->refcount_max) {
          cache_put (e);
          return corrupt_signal (q, "refcount of cluster 0x%llx "
                                 "overflows", (unsigned long long)
                                 ((c + i) << q->cluster_bits));
        }
        v++;
      }
      refblock_set (q, e->buf, idx, v);
    }
    cache_mark_dirty (e);
    cache_put (e);
    fl->work_done += n;
  }
  fl->work.n = 0;
  fl->work_i = 0;
  fl->work_done = 0;
  return 1;
}

static void
swap_lists (struct extent_list *a, struct extent_list *b)
{
  struct extent_list t = *a;
  *a = *b;
  *b = t;
}

/* Keep the unapplied part of fl->work for the next run.  Nothing here
 * can fail: the remainder is moved down in place and the list handed
 * over whole (the carry list is empty: the run took it at its start).
 */
static void
requeue_work (struct qcow2 *q)
{
  struct flusher *fl = q->flusher;
  struct extent_list *carry = fl->decrement ? &fl->carry_decs
    : &fl->carry_incs;
  struct extent_list *w = &fl->work;
  size_t n = w->n - fl->work_i;

  assert (carry->n == 0);
  if (n > 0) {
    memmove (w->v, w->v + fl->work_i, n * sizeof *w->v);
    w->v[0].offset += fl->work_done << q->cluster_bits;
    w->v[0].count -= fl->work_done;
  }
  w->n = n;
  swap_lists (w, carry);
  w->n = 0;
  fl->work_i = 0;
  fl->work_done = 0;
}

/* Take the refcount changes owed (pending, and what a failed run left in
 * carry) into fl->work.  0, or -ENOMEM with nothing moved.
 */
static int
take_work (struct flusher *fl, struct extent_list *pending,
           struct extent_list *carry)
{
  assert (fl->work.n == 0);
  if (carry->n == 0) {
    /* The usual case: no copy. */
    swap_lists (&fl->work, pending);
    return 0;
  }
  if (extent_list_take (carry, pending) < 0)
    return -ENOMEM;
  swap_lists (&fl->work, carry);
  return 0;
}

static bool
l1_dirty (const struct qcow2 *q)
{
  return q->l1_dirty_lo >= 0;
}

/* The header's refcount table fields, in the in-memory first sector. */
static void
patch_header_reftable (struct qcow2 *q)
{
  uint8_t *h = q->header_sector;
  put_be64 (h + HDR_REFTABLE_OFFSET, q->reftable_offset);
  put_be32 (h + HDR_REFTABLE_CLUSTERS, q->reftable_clusters);
}

/* The steps of a run, one per state (the table at the top of the file).
 * Each runs its state and sets the next; it returns true to go on at once
 * and false when the run is blocked (on something that wakes fl->req) or
 * idle.  An error is recorded in fl->err and the step returns true: the
 * dispatcher then ends the run.
 */

static bool
step_idle (struct qcow2 *q)
{
  struct flusher *fl = q->flusher;
  /* Every flush that waited was woken or failed by the last run. */
  assert (!fl->cur.head && !fl->next.head);
  return false;
}

static bool
step_start (struct qcow2 *q)
{
  struct flusher *fl = q->flusher;

  if (!fl->cur.head) {
    fl->state = FL_IDLE;
    return false;
  }
  fl->active = true;
  fl->err = 0;
  fl->decrement = false;
  /* Lazy refcounts: with the dirty bit set, refcounts wait for close
   * (a crash is repaired at the next open).
   */
  if ((!q->lazy || fl->full)
      && take_work (fl, &q->incs, &fl->carry_incs) < 0) {
    /* Nothing was taken: the run fails, the changes stay owed. */
    fl->meta = false;
    fl->err = -ENOMEM;
    fl->state = FL_DONE;
    return true;
  }
  /* After the swap: the increments of these buffers' clusters were
   * recorded before, so they are applied before these decrements.
   */
  cw_retire (q);
  fl->meta = fl->work.n || cache_has_dirty (&q->rbc)
    || cache_has_dirty (&q->l2c) || l1_dirty (q) || q->reftable_dirty
    || q->reftable_moved
    || ((q->decs.n || fl->carry_decs.n) && (!q->lazy || fl->full));
  fl->state = fl->meta ? FL_CW : FL_SYNC;
  return true;
}

static bool
step_cw (struct qcow2 *q)
{
  struct flusher *fl = q->flusher;
  /* Compressed data linked from L2 must be on disk before the sync
   * that precedes the L2 writes.
   */
  unsigned started;
  int r = cw_flush_start (q, &started);

  /* The writes started are waited for before the run fails. */
  fl->outstanding += started;
  if (r < 0) {
    fl->err = r;
    return true;
  }
  fl->state = FL_CW_WAIT;
  return true;
}

static bool
step_cw_wait (struct qcow2 *q)
{
  struct flusher *fl = q->flusher;

  if (q->cw_inflight) {
    waitq_push (&q->cw_waiters, &fl->req);
    return false;
  }
  fl->state = FL_INCS;
  return true;
}

/* FL_INCS and FL_DECS_APPLY: apply fl->work, then go to next. */
static bool
step_apply (struct qcow2 *q, enum fl_state next)
{
  struct flusher *fl = q->flusher;
  int r = apply_work (q);

  if (r == 0)
    return false;               /* woken when the block is loaded */
  if (r < 0) {
    fl->err = r;
    return true;
  }
  fl->state = next;
  return true;
}

static bool
step_incs (struct qcow2 *q)
{
  assert (!q->flusher->decrement);
  return step_apply (q, FL_RB);
}

/* Start the write-back of every dirty table of c.  One that cannot be
 * started fails the run, as one that fails on completion does: the next
 * state must not make the file point at a table that was never written
 * (L1 at a fresh L2 table, whose cluster reads as zeros).  The tables
 * stay dirty for the next run; the writes started are waited for.
 */
static void
write_back (struct qcow2 *q, struct cache *c)
{
  struct flusher *fl = q->flusher;
  unsigned started;
  int r = cache_write_dirty (c, &started);

  fl->outstanding += started;
  if (r < 0 && !fl->err)
    fl->err = r;
}

static bool
step_rb (struct qcow2 *q)
{
  write_back (q, &q->rbc);
  q->flusher->state = FL_SYNC_RB;
  return true;
}

static bool
step_sync_rb (struct qcow2 *q)
{
  submit_op (q, AIO_FSYNC, NULL, 0, 0);
  q->flusher->state = FL_REFTABLE;
  return true;
}

static bool
step_reftable (struct qcow2 *q)
{
  struct flusher *fl = q->flusher;
  int r;

  if (!q->reftable_moved && !q->reftable_dirty) {
    fl->state = FL_L2;
    return true;
  }
  r = overlap_check (q, META_REFTABLE, q->reftable_offset,
                     (uint64_t) q->reftable_clusters << q->cluster_bits);
  if (r < 0) {
    fl->err = r;
    return true;
  }
  q->reftable_dirty = false;
  fl->reftable_pending = true;
  submit_op (q, AIO_WRITE, q->reftable,
             (size_t) q->reftable_clusters << q->cluster_bits,
             q->reftable_offset);
  fl->state = FL_REFTABLE_SYNC;
  return true;
}

static bool
step_reftable_sync (struct qcow2 *q)
{
  struct flusher *fl = q->flusher;
  assert (fl->reftable_pending);
  submit_op (q, AIO_FSYNC, NULL, 0, 0);
  fl->state = q->reftable_moved ? FL_HEADER : FL_L2;
  return true;
}

static bool
step_header (struct qcow2 *q)
{
  assert (q->reftable_moved);
  patch_header_reftable (q);
  submit_op (q, AIO_WRITE, q->header_sector, SECTOR, 0);
  q->flusher->state = FL_HEADER_SYNC;
  return true;
}

static bool
step_header_sync (struct qcow2 *q)
{
  submit_op (q, AIO_FSYNC, NULL, 0, 0);
  /* The old table is unreferenced once the header is durable.  Without
   * memory for its decrements its clusters keep their refcount: a leak
   * (qemu-img check -r leaks reclaims it), never corruption.
   */
  if (extent_add (&q->decs, q->old_reftable_offset,
                  q->old_reftable_clusters) < 0)
    qlog (q, LOG_WARNING, "out of memory: %u clusters of the old refcount "
          "table at 0x%llx will leak", q->old_reftable_clusters,
          (unsigned long long) q->old_reftable_offset);
  q->reftable_moved = false;
  q->flusher->state = FL_L2;
  return true;
}

static bool
step_l2 (struct qcow2 *q)
{
  struct flusher *fl = q->flusher;
  fl->reftable_pending = false;
  write_back (q, &q->l2c);
  fl->state = FL_SYNC_L2;
  return true;
}

static bool
step_sync_l2 (struct qcow2 *q)
{
  if (l1_dirty (q))
    submit_op (q, AIO_FSYNC, NULL, 0, 0);
  q->flusher->state = FL_L1;
  return true;
}

static bool
step_l1 (struct qcow2 *q)
{
  struct flusher *fl = q->flusher;

  assert (fl->l1_lo < 0);
  if (l1_dirty (q)) {
    uint64_t lo = ((uint64_t) q->l1_dirty_lo * 8) & ~(uint64_t) (SECTOR - 1);
    uint64_t hi = round_up (((uint64_t) q->l1_dirty_hi + 1) * 8, SECTOR);
    int r = overlap_check (q, META_L1, q->l1_offset + lo, hi - lo);
    if (r < 0) {
      fl->err = r;
      return true;
    }
    fl->l1_lo = q->l1_dirty_lo;
    fl->l1_hi = q->l1_dirty_hi;
    q->l1_dirty_lo = q->l1_dirty_hi = -1;
    submit_op (q, AIO_WRITE, (char *) q->l1 + lo, hi - lo,
               q->l1_offset + lo);
  }
  fl->state = FL_SYNC;
  return true;
}

static bool
step_sync (struct qcow2 *q)
{
  /* Written by FL_L1, or clean when the run began: L1 is frozen. */
  assert (!l1_dirty (q));
  submit_op (q, AIO_FSYNC, NULL, 0, 0);
  q->flusher->state = FL_DECS;
  return true;
}

static bool
step_decs (struct qcow2 *q)
{
  struct flusher *fl = q->flusher;

  assert (!l1_dirty (q));
  fl->l1_lo = fl->l1_hi = -1;
  if ((!q->decs.n && !fl->carry_decs.n) || (q->lazy && !fl->full)) {
    fl->state = FL_DONE;
    return true;
  }
  if (take_work (fl, &q->decs, &fl->carry_decs) < 0) {
    fl->err = -ENOMEM;
    return true;
  }
  fl->decrement = true;
  fl->state = FL_DECS_APPLY;
  return true;
}

static bool
step_decs_apply (struct qcow2 *q)
{
  assert (q->flusher->decrement);
  return step_apply (q, FL_DECS_RB);
}

static bool
step_decs_rb (struct qcow2 *q)
{
  write_back (q, &q->rbc);
  q->flusher->state = FL_DECS_SYNC;
  return true;
}

static bool
step_decs_sync (struct qcow2 *q)
{
  struct flusher *fl = q->flusher;
  submit_op (q, AIO_FSYNC, NULL, 0, 0);
  fl->decrement = false;
  fl->state = FL_PUNCH;
  return true;
}

static bool
step_punch (struct qcow2 *q)
{
  start_punches (q);
  q->flusher->state = FL_DONE;
  return true;
}

static bool
step_done (struct qcow2 *q)
{
  struct flusher *fl = q->flusher;

  make_reusable (q);
  fl->active = false;
  waitq_wake_all (q, &fl->barrier);
  if (fl->err)
    waitq_fail_all (q, &fl->cur, fl->err);
  else
    waitq_wake_all (q, &fl->cur);
  fl->err = 0;
  if (fl->next.head) {
    /* Queue behind the barrier waiters so they link first. */
    fl->cur = fl->next;
    fl->next.head = fl->next.tail = NULL;
    fl->state = FL_START;
    waitq_wake (&fl->req);
  }
  else
    fl->state = FL_IDLE;
  return false;
}

static bool (*const steps[]) (struct qcow2 *) = {
  [FL_IDLE] = step_idle,
  [FL_START] = step_start,
  [FL_CW] = step_cw,
  [FL_CW_WAIT] = step_cw_wait,
  [FL_INCS] = step_incs,
  [FL_RB] = step_rb,
  [FL_SYNC_RB] = step_sync_rb,
  [FL_REFTABLE] = step_reftable,
  [FL_REFTABLE_SYNC] = step_reftable_sync,
  [FL_HEADER] = step_header,
  [FL_HEADER_SYNC] = step_header_sync,
  [FL_L2] = step_l2,
  [FL_SYNC_L2] = step_sync_l2,
  [FL_L1] = step_l1,
  [FL_SYNC] = step_sync,
  [FL_DECS] = step_decs,
  [FL_DECS_APPLY] = step_decs_apply,
  [FL_DECS_RB] = step_decs_rb,
  [FL_DECS_SYNC] = step_decs_sync,
  [FL_PUNCH] = step_punch,
  [FL_DONE] = step_done,
};

/* End a run that failed: what it took but did not write goes back to be
 * written by a later run.
 */
static void
fail_run (struct qcow2 *q)
{
  struct flusher *fl = q->flusher;

  if (fl->work.n)
    requeue_work (q);
  if (fl->l1_lo >= 0) {
    if (q->l1_dirty_lo < 0 || fl->l1_lo < q->l1_dirty_lo)
      q->l1_dirty_lo = fl->l1_lo;
    if (fl->l1_hi > q->l1_dirty_hi)
      q->l1_dirty_hi = fl->l1_hi;
  }
  if (fl->reftable_pending)
    q->reftable_dirty = true;
  fl->state = FL_DONE;
}

/* One step of a run: returns when blocked or idle. */
static void
flush_step (struct qcow2 *q)
{
  struct flusher *fl = q->flusher;

  for (;;) {
    if (fl->outstanding) {
      fl->waiting_io = true;
      return;
    }
    if (fl->req.err) {
      /* A refcount block we waited for failed to load. */
      if (!fl->err)
        fl->err = fl->req.err;
      fl->req.err = 0;
    }
    if (fl->err && fl->state != FL_DONE && fl->state != FL_IDLE)
      fail_run (q);
    if (fl->state == FL_DONE || fl->state == FL_IDLE) {
      fl->l1_lo = fl->l1_hi = -1;
      fl->reftable_pending = false;
    }
    /* L1 and L2 are frozen from the start of a run to its end. */
    assert (fl->active == (fl->state != FL_IDLE && fl->state != FL_START));
    assert ((size_t) fl->state < sizeof steps / sizeof *steps);
    if (!steps[fl->state] (q))
      return;
  }
}
