/* lib/qcow2-cwrite.c: compressed writes, packed through a small write cache.
 *
 * With compression on (backup-style exports), a write that covers a whole
 * cluster stores it compressed.  The compression itself (cw_compress) runs
 * on a worker thread (qcow2-rw.c hands it to the I/O backend as a call);
 * packing (cw_pack) runs on the loop.  Compressed clusters are packed byte
 * by byte into a run of contiguous host clusters held in memory, across
 * the cluster boundaries inside the run as qcow2 allows (a compressed
 * cluster then holds a reference on each host cluster it touches): packing
 * each host cluster on its own left on average half a compressed cluster
 * unused at its end, and made a file 14% larger than QEMU's for the same
 * data.  A run that a compressed cluster does not fit into stays open as
 * the tail (cw_tail) while it has room for small ones, beside the new run
 * (cw_cur), so that runs end nearly full too.  The file only sees a run
 * written in whole clusters, when it is full (sealed) or when a flush
 * needs it on disk.  At most one write of a run is in flight: two writes
 * of the same bytes could reach the file in either order, an older copy
 * last.  The buffer holds one reference of
 * its own on each cluster of the run while clusters may still be packed
 * into it or its write is in flight: otherwise trimming every cluster
 * packed so far would free a host cluster (punch it, hand it to the
 * allocator) under later appends.  Those references are dropped
 * (cw_retire) once the buffer is sealed and written, or at close; they are
 * queued as decrements only when the next flush run starts, so the
 * increments recorded when the buffer was made are always applied first.
 *
 * The L2 entry of a compressed cluster is linked as soon as its data is in
 * the cache, so: reads look in the cache first (cw_lookup), and the flusher
 * writes the cache and waits for sealed runs before its first sync (data
 * before the L2 entries that point at it).
 */
#include <config.h>

#include <assert.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <syslog.h>

#include "qcow2-internal.h"

/* Bytes of host clusters one packing run holds (at least two clusters). */
#define CW_RUN_BYTES (1u << 20)

struct cw_buf {
  uint64_t host;                /* first host cluster of the run */
  uint64_t nclusters;           /* clusters in the run */
  char *buf;                    /* its contents */
  uint32_t fill;                /* bytes used */
  uint32_t wfrom;               /* bytes before it: in a write started */
  bool dirty;                   /* fill > wfrom, or a write of it failed */
  bool sealed;                  /* full: on the sealed list, no appends */
  bool seal_pending;            /* sealed while a write was in flight */
  unsigned writes;              /* writes of it in flight (0 or 1) */
  struct aio_op op;             /* that write */
  struct iovec iov;
  uint32_t wlo;                 /* its start, for a retry when it fails */
  struct cw_buf *next;          /* sealed list */
  struct qcow2 *q;
};

static uint64_t
run_bytes (const struct qcow2 *q, const struct cw_buf *b)
{
  return b->nclusters << q->cluster_bits;
}

/* A sealed buffer is dropped once no write of it is in flight or due. */
static void
maybe_free (struct qcow2 *q, struct cw_buf *b)
{
  struct cw_buf **p = &q->cw_sealed;

  if (!b->sealed || b->writes || b->seal_pending)
    return;
  while (*p && *p != b)
    p = &(*p)->next;
  if (*p)
    *p = b->next;
  free (b->buf);
  free (b);
  if (--q->cw_inflight == 0)
    waitq_wake_all (q, &q->cw_waiters);
}

/* The buffer's own references on its run are no longer needed. */
static void
retire_ref (struct qcow2 *q, const struct cw_buf *b)
{
  if (extent_add (&q->cw_retired, b->host, b->nclusters) < 0)
    /* The references stay: the clusters leak (qemu-img check -r finds
     * them), nothing is lost.
     */
    qlog (q, LOG_WARNING, "out of memory: clusters 0x%llx+%llu of "
          "compressed data keep one reference too many",
          (unsigned long long) b->host, (unsigned long long) b->nclusters);
}

/* The write of b's whole clusters holding bytes [wfrom, fill), which the
 * run's later appends do not change but in its last cluster.  done is
 * called on the loop when it ends.  Returns 0 or -errno.
 */
static int
submit_write (struct qcow2 *q, struct cw_buf *b, aio_done_fn *done)
{
  uint64_t cs = q->cluster_size;
  uint32_t lo = b->wfrom & ~(uint32_t) (cs - 1);
  uint64_t hi = round_up (b->fill, cs);
  int r;

  /* Two writes of one cluster in flight could land in either order. */
  assert (b->writes == 0 && hi > lo && hi <= run_bytes (q, b));
  r = overlap_check (q, META_DATA, b->host + lo, hi - lo);
  if (r < 0)
    return r;
  b->iov.iov_base = b->buf + lo;
  b->iov.iov_len = hi - lo;
  memset (&b->op, 0, sizeof b->op);
  b->op.type = AIO_WRITE;
  b->op.fd = q->fd;
  b->op.iov = &b->iov;
  b->op.iovcnt = 1;
  b->op.offset = b->host + lo;
  b->op.done = done;
  b->op.opaque = b;
  r = aio_submit (q->aio, &b->op);
  if (r < 0)
    return r;
  b->writes++;
  b->wlo = lo;
  /* Appends go on in the last cluster: it is written again. */
  b->wfrom = b->fill & ~(uint32_t) (cs - 1);
  b->dirty = false;
  return 0;
}

/* A write of b failed: what it covered is written again. */
static void
write_failed (struct cw_buf *b)
{
  if (b->wlo < b->wfrom)
    b->wfrom = b->wlo;
  b->dirty = true;
}

static void sealed_done (struct aio_op *op, int64_t ret);

/* Write sealed buffer b: what is not on disk yet. */
static int
write_sealed (struct qcow2 *q, struct cw_buf *b)
{
  int r;

  /* Sealed because something did not fit after it. */
  assert (b->fill > 0);
  b->seal_pending = false;
  r = submit_write (q, b, sealed_done);
  if (r < 0) {
    maybe_free (q, b);
    return corrupt_signal (q, "cannot write compressed data: %s",
                           strerror (-r));
  }
  return 0;
}

static void
sealed_done (struct aio_op *op, int64_t ret)
{
  struct cw_buf *b = op->opaque;
  struct qcow2 *q = b->q;

  b->writes--;
  if (ret < 0)
    corrupt_signal (q, "writing clusters of compressed data at 0x%llx: "
                    "%s", (unsigned long long) op->offset,
                    strerror ((int) -ret));
  else
    retire_ref (q, b);
  maybe_free (q, b);
}

static void
flush_write_done (struct aio_op *op, int64_t ret)
{
  struct cw_buf *b = op->opaque;
  struct qcow2 *q = b->q;

  b->writes--;
  if (ret < 0)
    write_failed (b);
  q->flush_io_done (q, ret);
  if (b->seal_pending)
    write_sealed (q, b);
  else
    maybe_free (q, b);
}

/* Run b (the current run or the tail, no longer either) is full: write
 * it.  It stays readable from memory until written.
 */
static int
seal (struct qcow2 *q, struct cw_buf *b)
{
  if (!b)
    return 0;
  b->sealed = true;
  b->next = q->cw_sealed;
  q->cw_sealed = b;
  q->cw_inflight++;
  if (b->writes) {
    /* The flusher's write of it is in flight: this one follows it. */
    b->seal_pending = true;
    return 0;
  }
  return write_sealed (q, b);
}

size_t
cw_compress (const struct qcow2 *q, const void *in, void *out)
{
  /* Worth it only if at least a sector is saved. */
  return compressed_encode (q, in, out, q->cluster_size - SECTOR);
}

/* A new run of host clusters to pack into, as q->cw_cur.  Returns 0 or
 * -errno.
 */
static int
new_run (struct qcow2 *q)
{
  uint64_t cs = q->cluster_size;
  uint64_t n = CW_RUN_BYTES / cs > 2 ? CW_RUN_BYTES / cs : 2;
  struct cw_buf *b = calloc (1, sizeof *b);
  int r;

  if (!b)
    return -ENOMEM;
  /* alloc_clusters records the buffer's own references.  When the file
   * has no room for a run, one cluster still holds a compressed cluster.
   */
  r = alloc_clusters (q, n, &b->host);
  if (r == -ENOSPC)
    r = alloc_clusters (q, n = 1, &b->host);
  if (r == 0) {
    b->nclusters = n;
    b->buf = buffer_alloc_zero (n * cs);
    if (!b->buf) {
      /* Never written: only the references of the run are left over. */
      retire_ref (q, b);
      r = -ENOMEM;
    }
  }
  if (r < 0) {
    free (b);
    return r;
  }
  b->q = q;
  q->cw_cur = b;
  return 0;
}

static uint64_t
room (const struct qcow2 *q, const struct cw_buf *b)
{
  return b ? run_bytes (q, b) - b->fill : 0;
}

/* The open run n bytes go into: the tail when they fit there, else the
 * current run, or a new one.  Returns it, or NULL with *err set.
 */
static struct cw_buf *
pick_run (struct qcow2 *q, size_t n, int *err)
{
  /* Less room than this in a run is not worth keeping it open for. */
  uint64_t keep = q->cluster_size / 16 > SECTOR ? q->cluster_size / 16
    : SECTOR;
  struct cw_buf *old;

  *err = 0;
  if (room (q, q->cw_tail) >= n)
    return q->cw_tail;
  if (room (q, q->cw_cur) >= n)
    return q->cw_cur;
  old = q->cw_cur;
  q->cw_cur = NULL;
  if (old && room (q, old) >= keep
      && room (q, old) > room (q, q->cw_tail)) {
    *err = seal (q, q->cw_tail);
    q->cw_tail = old;
  }
  else
    *err = seal (q, old);
  if (*err == 0)
    *err = new_run (q);
  return *err < 0 ? NULL : q->cw_cur;
}

int
cw_pack (struct qcow2 *q, const void *cdata, size_t n, uint64_t *desc)
{
  uint64_t cs = q->cluster_size, off, start, sectors;
  unsigned x = 62 - (q->cluster_bits - 8);
  struct cw_buf *b;
  int r;

  assert (n > 0 && n <= cs - SECTOR);
  assert (!q->cw_closed);
  b = pick_run (q, n, &r);
  if (!b)
    return r;
  off = b->host + b->fill;
  start = off & ~(uint64_t) (SECTOR - 1);
  sectors = ((off - start) + n + SECTOR - 1) / SECTOR;
  /* One reference on each host cluster the sectors holding it touch, as
   * compressed_release counts them.
   */
  r = extent_add (&q->incs, start & ~(cs - 1),
                  ((start + sectors * SECTOR - 1) >> q->cluster_bits)
                  - (start >> q->cluster_bits) + 1);
  if (r < 0)
    return r;
  memcpy (b->buf + b->fill, cdata, n);
  b->fill += (uint32_t) n;
  b->dirty = true;
  *desc = L2E_COMPRESSED | off | ((sectors - 1) << x);
  if (b == q->cw_tail && room (q, b) < SECTOR) {
    q->cw_tail = NULL;
    /* Packed and linked either way: a failed seal marks the image
     * corrupt, which stops further writes.
     */
    seal (q, b);
  }
  return 0;
}

/* Whether b holds bytes [start, start + len) of the file. */
static bool
run_has (const struct qcow2 *q, const struct cw_buf *b, uint64_t start,
         uint64_t len)
{
  return b && start >= b->host && start + len <= b->host + run_bytes (q, b);
}

bool
cw_lookup (struct qcow2 *q, uint64_t start, uint64_t len, void *dst)
{
  struct cw_buf *b = run_has (q, q->cw_cur, start, len) ? q->cw_cur
    : run_has (q, q->cw_tail, start, len) ? q->cw_tail : NULL;

  for (struct cw_buf *s = q->cw_sealed; s && !b; s = s->next)
    if (run_has (q, s, start, len))
      b = s;
  if (!b)
    return false;
  memcpy (dst, b->buf + (start - b->host), len);
  return true;
}

/* The flusher's write of open run b, if it needs one: 1 when started, 0,
 * or -errno.
 */
static int
flush_run (struct qcow2 *q, struct cw_buf *b)
{
  /* Appends may go on during this write: they only add bytes past what
   * it covers for sure, leave the buffer dirty, and are not linked until
   * the flush ends.
   */
  if (!b || !b->dirty || b->writes)
    return 0;
  int r = submit_write (q, b, flush_write_done);
  return r < 0 ? r : 1;
}

int
cw_flush_start (struct qcow2 *q, unsigned *started)
{
  int r = flush_run (q, q->cw_cur), t = flush_run (q, q->cw_tail);

  *started = (r > 0) + (t > 0);
  return r < 0 ? r : t < 0 ? t : 0;
}

void
cw_retire (struct qcow2 *q)
{
  struct extent_list *l = &q->cw_retired;
  size_t moved = 0;

  if (l->n == 0)
    return;
  while (moved < l->n
         && extent_add (&q->decs, l->v[moved].offset, l->v[moved].count) == 0)
    moved++;
  /* What did not fit is retried at the next run. */
  memmove (l->v, l->v + moved, (l->n - moved) * sizeof *l->v);
  l->n -= moved;
}

bool
cw_retired_owed (const struct qcow2 *q)
{
  return q->cw_retired.n > 0;
}

void
cw_close (struct qcow2 *q)
{
  /* The final flush writes the open runs, then drops their references: a
   * host cluster whose compressed clusters were all trimmed is freed
   * then, and so are the clusters of a run nothing was packed into.
   */
  if (!q->cw_closed) {
    if (q->cw_cur)
      retire_ref (q, q->cw_cur);
    if (q->cw_tail)
      retire_ref (q, q->cw_tail);
    for (int i = 0; i < 2; i++) {
      const struct cw_buf *b = i ? q->cw_tail : q->cw_cur;
      if (b && b->host + run_bytes (q, b) == q->alloc_end) {
        q->cw_unused[0] = b->host + round_up (b->fill, q->cluster_size);
        q->cw_unused[1] = q->alloc_end;
      }
    }
  }
  q->cw_closed = true;
}

void
cw_close_trim (struct qcow2 *q)
{
  /* Their references were dropped by the final flush, and nothing was
   * allocated after them (the flusher's own clusters come from the end).
   */
  if (q->cw_unused[1] && q->alloc_end == q->cw_unused[1]) {
    assert (q->cw_unused[0] <= q->cw_unused[1]);
    q->alloc_end = q->cw_unused[0];
  }
}

static bool
run_meets (const struct qcow2 *q, const struct cw_buf *b, uint64_t offset,
           uint64_t end)
{
  return b && b->host < end && offset < b->host + run_bytes (q, b);
}

bool
cw_holds (const struct qcow2 *q, uint64_t offset, uint64_t count)
{
  uint64_t end = offset + (count << q->cluster_bits);

  if (!q->cw_closed && (run_meets (q, q->cw_cur, offset, end)
                        || run_meets (q, q->cw_tail, offset, end)))
    return true;
  for (const struct cw_buf *b = q->cw_sealed; b; b = b->next)
    if (run_meets (q, b, offset, end))
      return true;
  return false;
}

static void
free_open (struct cw_buf **b)
{
  if (*b) {
    free ((*b)->buf);
    free (*b);
    *b = NULL;
  }
}

void
cw_free (struct qcow2 *q)
{
  /* Called after the final flush: nothing is in flight. */
  free_open (&q->cw_cur);
  free_open (&q->cw_tail);
  free (q->cw_retired.v);
  q->cw_retired.v = NULL;
  q->cw_retired.n = q->cw_retired.cap = 0;
}
