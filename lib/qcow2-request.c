/* lib/qcow2-request.c: the per-request state machine (reads, writes and
 * flushes), and the lists that park and wake requests.
 *
 * A read or write is cut into segments, one per L2 table it touches, and
 * runs them one after another.  Each state does one step and either goes on
 * at once or blocks (parked on a list, or waiting for its I/O):
 *
 *   state          does                                   resumed by
 *   RS_SEGMENT     pick the next segment, or finish       -
 *   RS_GET_L2      pin the segment's L2 table; a write    table loaded; slot
 *                  creates it when missing and copies it  free; flush ended
 *                  when shared with a snapshot
 *   RS_WAIT_DEPS   write: wait while an in-flight          that allocation
 *                  allocation covers one of our clusters  linked or failed
 *   RS_PLAN        map clusters to host offsets, reserve  -
 *                  new clusters, start COW reads or the
 *                  data I/O
 *   RS_COW_READ    wait for the old data a partial        I/O completion
 *                  allocation must preserve, then start
 *                  the merged head+data+tail writes
 *   RS_IO          wait for the segment's data I/O        I/O completion
 *   RS_LINK        write: point L2 entries at the new     flush ended (L2 is
 *                  clusters, release the reservations     frozen during one)
 *   RS_FUA         write with FUA, or a client flush:     flusher done
 *                  wait for a metadata flush
 *   RS_DONE        queue the completion callback          -
 *
 * Allocating writes are registered on the L2 table they will update
 * (struct alloc on the cache entry), so only writes into the same clusters
 * of the same table ever wait for each other.  The planning and I/O of read
 * and write segments live in qcow2-rw.c; write-zeroes, discard and block
 * status segments in qcow2-zero.c.
 */
#include <config.h>

#include <assert.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <syslog.h>

#include "qcow2-internal.h"

/* Work done per qcow2_process call, so that one client's large request
 * cannot hold up the loop (a 4 GiB CACHE of holes needs no I/O, so its
 * segments and chained callbacks would otherwise all run in one call):
 * at most RUN_BUDGET steps (a request run, a segment started, a callback
 * delivered), then the eventfd is kicked and the loop serves its other
 * watchers before coming back.  One run of a request does at most
 * RUN_SLICE segments before going to the back of the runnable list.
 */
#define RUN_BUDGET 512u
#define RUN_SLICE 4u


/* ---- wait lists ---- */

void
waitq_push (struct waitq *w, struct qcow2_req *req)
{
  /* A request waits for one thing at a time: on two lists, one of them
   * would lose it.
   */
  assert (!req->queued);
  req->queued = true;
  req->wait_next = NULL;
  if (w->tail)
    w->tail->wait_next = req;
  else
    w->head = req;
  w->tail = req;
}

static struct qcow2_req *
waitq_pop (struct waitq *w)
{
  struct qcow2_req *r = w->head;
  if (r) {
    w->head = r->wait_next;
    if (!w->head)
      w->tail = NULL;
    r->wait_next = NULL;
    r->queued = false;
  }
  return r;
}

static void
waitq_append (struct waitq *dst, struct waitq *src)
{
  if (!src->head)
    return;
  if (dst->tail)
    dst->tail->wait_next = src->head;
  else
    dst->head = src->head;
  dst->tail = src->tail;
  src->head = src->tail = NULL;
}

void
waitq_wake_all (struct qcow2 *q, struct waitq *w)
{
  waitq_append (&q->runnable, w);
}

void
waitq_fail_all (struct qcow2 *q, struct waitq *w, int err)
{
  for (struct qcow2_req *r = w->head; r; r = r->wait_next)
    if (!r->err)
      r->err = err;
  waitq_append (&q->runnable, w);
}

void
req_wake (struct qcow2_req *req)
{
  waitq_push (&req->q->runnable, req);
}

/* ---- helpers ---- */

/* The whole-cluster zero flag (v3 without extended L2, whose bitmap says
 * it per subcluster instead).
 */
bool
entry_is_zero (const struct qcow2 *q, uint64_t ent)
{
  return q->version >= 3 && !q->extl2 && !(ent & L2E_COMPRESSED)
    && (ent & L2E_ZERO);
}

/* A normal (uncompressed, non-zero) cluster written in place. */
/* With an external data file, offset 0 is a real cluster when COPIED is
 * set (guest cluster 0 lives at offset 0 of the data file).
 */
bool
entry_is_hole (const struct qcow2 *q, uint64_t ent)
{
  return !(ent & L2E_COMPRESSED) && !(ent & L2E_OFFSET_MASK)
    && !(q->data_file && (ent & L2E_COPIED));
}

bool
entry_is_inplace (const struct qcow2 *q, uint64_t ent)
{
  return (ent & L2E_COPIED) && !(ent & L2E_COMPRESSED)
    && !entry_is_zero (q, ent) && !entry_is_hole (q, ent);
}

bool
entry_reads_zero (const struct qcow2 *q, uint64_t ent)
{
  if (entry_is_zero (q, ent))
    return true;
  return entry_is_hole (q, ent) && !q->backing;
}

enum sc_kind
cluster_status (const struct qcow2 *q, uint64_t ent, uint64_t bmp,
                uint64_t coff, uint64_t *run_end)
{
  unsigned x, bits;

  *run_end = q->cluster_size;
  if (ent & L2E_COMPRESSED)
    return SC_COMPRESSED;
  if (!q->extl2) {
    if (entry_is_zero (q, ent))
      return SC_ZERO;
    return entry_is_hole (q, ent) ? SC_HOLE : SC_DATA;
  }
  x = (unsigned) (coff >> q->sc_bits);
  bits = (unsigned) ((bmp >> x) & 1) | (unsigned) ((bmp >> (31 + x)) & 2);
  while (x + 1 < SUBCLUSTERS
         && (((bmp >> (x + 1)) & 1) | ((bmp >> (32 + x)) & 2)) == bits)
    x++;
  *run_end = (uint64_t) (x + 1) << q->sc_bits;
  switch (bits) {
  case 0: return SC_HOLE;
  case 1: return entry_is_hole (q, ent) ? SC_BAD : SC_DATA;
  case 2: return SC_ZERO;
  default: return SC_BAD;       /* allocated and zero at once */
  }
}

uint64_t
sc_mask (const struct qcow2 *q, uint64_t lo, uint64_t hi)
{
  unsigned a = (unsigned) (lo >> q->sc_bits);
  unsigned b = (unsigned) ((hi + q->sc_size - 1) >> q->sc_bits);
  if (b <= a)
    return 0;
  return (SC_ALLOC_ALL >> (SUBCLUSTERS - (b - a))) << a;
}

void
alloc_hold (struct cache_entry *e, struct alloc *a, uint32_t first,
            uint32_t count)
{
  a->first = first;
  a->count = count;
  a->waiters.head = a->waiters.tail = NULL;
  a->next = e->allocs;
  e->allocs = a;
}

void
alloc_release (struct qcow2 *q, struct cache_entry *e, struct alloc *a)
{
  struct alloc **p = &e->allocs;
  while (*p && *p != a)
    p = &(*p)->next;
  if (*p)
    *p = a->next;
  waitq_wake_all (q, &a->waiters);
}

int
release_entry (struct qcow2 *q, uint64_t ent)
{
  if (ent & L2E_COMPRESSED)
    return compressed_release (q, ent);
  /* Clusters of an external data file are not refcounted. */
  if ((ent & L2E_OFFSET_MASK) && !q->data_file)
    return extent_add (&q->decs, ent & L2E_OFFSET_MASK, 1);
  return 0;
}

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
static bool
st_segment (struct qcow2_req *req)
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
    if ((req->type == REQ_WRITE || req->type == REQ_ZERO)
        && (req->flags & QCOW2_WRITE_FUA)) {
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
 * Returns 1 with req->l2 (its slice number slice) pinned, 0 when blocked,
 * or -errno.  The other slices of a new table are not cached: the cluster
 * comes from past everything the file ever held, so they read as zeros.
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
    return 0;
  }
  r = overlap_l2_reserve (q);
  if (r < 0)
    return r;
  r = cache_get_empty (&q->l2c, req, &e);
  if (r != CACHE_READY)
    return r < 0 ? r : 0;
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
  return 1;
}

static bool
st_get_l2 (struct qcow2_req *req)
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
      read_map_add (req, req->seg_len, true);
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
    if (r <= 0)
      goto out;
    req->state = RS_WAIT_DEPS;
    return true;
  }

  r = check_host_cluster (q, off, "L2 table");
  if (r < 0)
    goto out;
  r = cache_get (&q->l2c, off + slice * q->l2_slice_bytes, req, &e);
  if (r != CACHE_READY)
    goto out;

  if (write && !(l1e & L1E_COPIED)) {
    /* The table is shared with a snapshot: never modify it in place. */
    r = new_l2_table (req, l1i, slice, e);
    cache_put (e);
    if (r <= 0)
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

static bool
st_wait_deps (struct qcow2_req *req)
{
  struct qcow2 *q = req->q;
  uint32_t mask = q->l2_entries - 1;
  uint32_t first = (uint32_t) (req->seg_off >> q->cluster_bits) & mask;
  uint32_t last = (uint32_t) ((req->seg_off + req->seg_len - 1)
                              >> q->cluster_bits) & mask;

  for (struct alloc *a = req->l2->allocs; a; a = a->next)
    if (a->first <= last && first < a->first + a->count) {
      waitq_push (&a->waiters, req);
      return false;
    }
  req->state = RS_PLAN;
  return true;
}

static void
spend (struct qcow2 *q)
{
  if (q->top->run_budget > 0)
    q->top->run_budget--;
}

/* Whether req, about to start another segment, should yield first: it
 * has used its slice, or the call's budget is spent.  The first segment
 * of a run always goes on, so every run makes progress.
 */
static bool
should_yield (const struct qcow2_req *req, unsigned segs)
{
  return segs > 0 && (segs >= RUN_SLICE || req->q->top->run_budget == 0)
    && !req->err && req->seg_off + req->seg_len < req->offset + req->len;
}

/* Run req until it blocks, finishes or yields its turn. */
static void
req_run (struct qcow2_req *req)
{
  struct qcow2 *q = req->q;
  bool go = true;
  unsigned segs = 0;

  if (req->type == REQ_FLUSHER) {
    flush_step (q);
    return;
  }
  if (q->raw) {
    raw_run (req);
    return;
  }
  while (go) {
    if (req->err && req->outstanding == 0 && req->state != RS_DONE) {
      seg_release (req);
      if (req->children) {
        /* Children point at us: end only when the last one has. */
        req->state = RS_CHILDREN;
        return;
      }
      req->state = RS_DONE;
    }
    switch ((enum req_state) req->state) {
    case RS_SEGMENT:
      if (should_yield (req, segs)) {
        waitq_push (&q->runnable, req);
        return;
      }
      go = st_segment (req);
      if (req->state == RS_GET_L2) {
        segs++;
        spend (q);
      }
      break;
    case RS_GET_L2: go = st_get_l2 (req); break;
    case RS_WAIT_DEPS: go = st_wait_deps (req); break;
    case RS_PLAN:
      switch (req->type) {
      case REQ_WRITE: go = plan_write (req); break;
      case REQ_READ: go = plan_read (req); break;
      case REQ_STATUS:
        go = status_segment (req);
        if (go) {
          seg_release (req);
          req->state = RS_SEGMENT;
        }
        break;
      default:
        go = zero_segment (req);
        if (go) {
          seg_release (req);
          req->state = RS_SEGMENT;
        }
        break;
      }
      break;
    case RS_CHILDREN:
      if (req->children)
        return;
      req->state = RS_SEGMENT;
      break;
    case RS_COW_READ:
      if (req->outstanding)
        return;
      if (!req->err)
        start_writes (req);
      req->state = RS_IO;
      go = req->outstanding == 0;
      break;
    case RS_IO:
      if (req->outstanding)
        return;
      if (req->type == REQ_WRITE)
        req->state = RS_LINK;
      else {
        seg_release (req);
        req->state = RS_SEGMENT;
      }
      break;
    case RS_LINK: go = st_link (req); break;
    case RS_FUA:
      req->state = RS_FUA_DONE;
      flush_wait (q, req);
      return;
    case RS_FUA_DONE:
      req->state = RS_DONE;
      break;
    case RS_DONE:
      waitq_push (&q->completed, req);
      return;
    }
  }
}

/* One pass over every image of the chain.  A backing image's requests are
 * children of its parent's, so the whole chain is run together.  Returns
 * true if anything moved.
 */
static bool
chain_step (struct qcow2 *top, bool deliver)
{
  bool moved = false;
  for (struct qcow2 *b = top; b; b = b->backing) {
    struct qcow2_req *r;
    while (top->run_budget > 0 && (r = waitq_pop (&b->runnable))) {
      spend (top);
      req_run (r);
      moved = true;
    }
    while (deliver && top->run_budget > 0
           && (r = waitq_pop (&b->completed))) {
      spend (top);
      b->in_flight--;
      r->done (r->opaque, r->err);
      free (r);
      moved = true;
    }
  }
  return moved;
}

bool
req_chain_has_work (const struct qcow2 *q)
{
  for (const struct qcow2 *b = q->top; b; b = b->backing)
    if (b->runnable.head || b->completed.head)
      return true;
  return false;
}

void
req_run_all (struct qcow2 *q)
{
  struct qcow2 *top = q->top;

  top->run_budget = RUN_BUDGET;
  while (chain_step (top, true))
    ;
  if (req_chain_has_work (top))
    aio_kick_once (top->aio);
}

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
    else if ((offset | len) & (qcow2_min_align (q) - 1))
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
  req->state = type == REQ_FLUSH ? RS_FUA : RS_SEGMENT;
  return req;
}

void
req_start (struct qcow2_req *req)
{
  req->q->in_flight++;
  req_run (req);
  req_run_all_pending (req->q);
}

static int
submit (struct qcow2 *q, enum req_type type, uint64_t offset, void *buf,
        size_t len, unsigned flags, qcow2_done_fn *done, void *opaque)
{
  int err;
  struct qcow2_req *req = req_new (q, type, offset, len, buf, flags, done,
                                   opaque, &err);
  if (!req)
    return err;
  /* Run the first steps now; completions are still only delivered from
   * qcow2_process, so wake the loop if anything became ready.
   */
  req_start (req);
  return 0;
}

/* Advance whatever became runnable, but keep completions for the loop. */
void
req_run_all_pending (struct qcow2 *q)
{
  struct qcow2 *top = q->top;

  /* Inside qcow2_process (a callback submitting more), the outer loop
   * runs what became ready, within its budget.
   */
  if (top->in_process)
    return;
  top->run_budget = RUN_BUDGET;
  while (chain_step (top, false))
    ;
  aio_commit (top->aio);
  if (req_chain_has_work (top))
    aio_kick_once (top->aio);
}

int
qcow2_read (struct qcow2 *q, uint64_t offset, void *buf, size_t len,
            qcow2_done_fn *done, void *opaque)
{
  return submit (q, REQ_READ, offset, buf, len, 0, done, opaque);
}

int
qcow2_read_map (struct qcow2 *q, uint64_t offset, void *buf, size_t len,
                struct qcow2_extent *map, unsigned max, unsigned *n,
                qcow2_done_fn *done, void *opaque)
{
  int err;
  struct qcow2_req *req;

  if (max == 0)
    return -EINVAL;
  req = req_new (q, REQ_READ, offset, len, buf, 0, done, opaque, &err);
  if (!req)
    return err;
  *n = 0;
  req->ext = map;
  req->ext_max = max;
  req->ext_n = n;
  req_start (req);
  return 0;
}

int
qcow2_write (struct qcow2 *q, uint64_t offset, const void *buf, size_t len,
             unsigned flags, qcow2_done_fn *done, void *opaque)
{
  /* The engine never writes into the caller's buffer on the write path. */
  return submit (q, REQ_WRITE, offset, (void *) buf, len, flags, done,
                 opaque);
}

int
qcow2_flush (struct qcow2 *q, qcow2_done_fn *done, void *opaque)
{
  if (q->read_only) {
    /* Nothing to make durable; still answer asynchronously. */
    struct qcow2_req *req = calloc (1, sizeof *req);
    if (!req)
      return -ENOMEM;
    req->q = q;
    req->type = REQ_FLUSH;
    req->done = done;
    req->opaque = opaque;
    req->state = RS_DONE;
    q->in_flight++;
    req_run (req);
    aio_kick (q->aio);
    return 0;
  }
  return submit (q, REQ_FLUSH, 0, NULL, 0, 0, done, opaque);
}

size_t
qcow2_mem_held (const struct qcow2 *q)
{
  return q->top->mem_held;
}

void
qcow2_process (struct qcow2 *q)
{
  struct qcow2 *top = q->top;

  assert (!top->in_process);
  top->in_process = true;
  aio_reap (q->aio);
  req_run_all (q);
  aio_commit (q->aio);
  top->in_process = false;
}
