/* lib/qcow2-cwrite.c: compressed writes, packed through a small write cache.
 *
 * With compression on (backup-style exports), a write that covers a whole
 * cluster stores it compressed.  The compression itself (cw_compress) runs
 * on a worker thread (qcow2-rw.c hands it to the I/O backend as a call);
 * packing (cw_pack) runs on the loop.  Compressed clusters are packed byte
 * by byte into one host cluster held in memory; the file only sees that cluster
 * written whole, when it is full (sealed) or when a flush needs it on disk.
 * Each compressed cluster adds one reference to the host cluster that holds
 * it, as qcow2 counts them.  The buffer holds one reference of its own
 * while clusters may still be packed into it or its write is in flight:
 * otherwise trimming every cluster packed so far would free the host
 * cluster (punch it, hand it to the allocator) under later appends.  That
 * reference is dropped (cw_retire) once the buffer is sealed and written,
 * or at close; it is queued as a decrement only when the next flush run
 * starts, so the increment recorded when the buffer was made is always
 * applied first.
 *
 * The L2 entry of a compressed cluster is linked as soon as its data is in
 * the cache, so: reads look in the cache first (cw_lookup), and the flusher
 * writes the cache and waits for sealed clusters before its first sync
 * (data before the L2 entries that point at it).
 */
#include <config.h>

#include <assert.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <syslog.h>
#include <zlib.h>
#ifdef HAVE_ZSTD
#include <zstd.h>
#endif

#include "qcow2-internal.h"

struct cw_buf {
  uint64_t host;                /* host cluster */
  char *buf;                    /* its contents */
  uint32_t fill;                /* bytes used */
  bool dirty;                   /* changed since its last write started */
  bool sealed;                  /* full: on the sealed list, no appends */
  unsigned writes;              /* writes of it in flight */
  struct aio_op sop, fop;       /* the sealing write, the flusher's write */
  struct iovec siov, fiov;
  struct cw_buf *next;          /* sealed list */
  struct qcow2 *q;
};

/* Compress one cluster into out (cap bytes).  Returns the size, or 0 when
 * it does not shrink enough to be worth it.
 */
static size_t
compress_cluster (const struct qcow2 *q, const void *in, void *out,
                  size_t cap)
{
  if (q->compression_type == 0) {
    z_stream z;
    size_t n = 0;
    memset (&z, 0, sizeof z);
    if (deflateInit2 (&z, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9,
                      Z_DEFAULT_STRATEGY) != Z_OK)
      return 0;
    z.next_in = (Bytef *) in;
    z.avail_in = q->cluster_size;
    z.next_out = out;
    z.avail_out = (uInt) cap;
    if (deflate (&z, Z_FINISH) == Z_STREAM_END)
      n = cap - z.avail_out;
    deflateEnd (&z);
    return n;
  }
#ifdef HAVE_ZSTD
  {
    size_t n = ZSTD_compress (out, cap, in, q->cluster_size, 1);
    return ZSTD_isError (n) ? 0 : n;
  }
#else
  return 0;
#endif
}

/* A sealed buffer is dropped once no write of it is in flight. */
static void
maybe_free (struct qcow2 *q, struct cw_buf *b)
{
  struct cw_buf **p = &q->cw_sealed;

  if (!b->sealed || b->writes)
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

/* The buffer's own reference on its host cluster is no longer needed. */
static void
retire_ref (struct qcow2 *q, uint64_t host)
{
  if (extent_add (&q->cw_retired, host, 1) < 0)
    /* The reference stays: the cluster leaks (qemu-img check -r finds
     * it), nothing is lost.
     */
    qlog (q, LOG_WARNING, "out of memory: cluster 0x%llx of compressed data "
          "keeps one reference too many", (unsigned long long) host);
}

static void
sealed_done (struct aio_op *op, int64_t ret)
{
  struct cw_buf *b = op->opaque;
  struct qcow2 *q = b->q;

  if (ret < 0)
    corrupt_signal (q, "writing a cluster of compressed data at 0x%llx: "
                    "%s", (unsigned long long) b->host,
                    strerror ((int) -ret));
  else
    retire_ref (q, b->host);
  b->writes--;
  maybe_free (q, b);
}

static void
flush_write_done (struct aio_op *op, int64_t ret)
{
  struct cw_buf *b = op->opaque;
  struct qcow2 *q = b->q;
  if (ret < 0)
    b->dirty = true;
  b->writes--;
  q->flush_io_done (q, ret);
  maybe_free (q, b);
}

static int
submit_write (struct qcow2 *q, struct cw_buf *b, struct aio_op *op,
              struct iovec *iov, aio_done_fn *done)
{
  int r = overlap_check (q, META_DATA, b->host, q->cluster_size);
  if (r < 0)
    return r;
  iov->iov_base = b->buf;
  iov->iov_len = q->cluster_size;
  memset (op, 0, sizeof *op);
  op->type = AIO_WRITE;
  op->fd = q->fd;
  op->iov = iov;
  op->iovcnt = 1;
  op->offset = b->host;
  op->done = done;
  op->opaque = b;
  r = aio_submit (q->aio, op);
  if (r == 0)
    b->writes++;
  return r;
}

/* The current cluster is full: write it whole and start afresh.  It stays
 * readable from memory until written.
 */
static int
seal (struct qcow2 *q)
{
  struct cw_buf *b = q->cw_cur;
  int r;

  q->cw_cur = NULL;
  if (!b)
    return 0;
  b->sealed = true;
  b->next = q->cw_sealed;
  q->cw_sealed = b;
  q->cw_inflight++;
  r = submit_write (q, b, &b->sop, &b->siov, sealed_done);
  if (r < 0) {
    maybe_free (q, b);
    return corrupt_signal (q, "cannot write compressed data: %s",
                           strerror (-r));
  }
  return 0;
}

size_t
cw_compress (const struct qcow2 *q, const void *in, void *out)
{
  /* Worth it only if at least a sector is saved. */
  return compress_cluster (q, in, out, q->cluster_size - SECTOR);
}

int
cw_pack (struct qcow2 *q, const void *cdata, size_t n, uint64_t *desc)
{
  uint64_t cs = q->cluster_size, off, sectors;
  unsigned x = 62 - (q->cluster_bits - 8);
  int r;

  assert (n > 0 && n <= cs - SECTOR);
  if (q->cw_cur && q->cw_cur->fill + n > cs) {
    r = seal (q);
    if (r < 0)
      return r;
  }
  if (!q->cw_cur) {
    /* alloc_clusters records the buffer's own reference. */
    struct cw_buf *b = calloc (1, sizeof *b);
    r = -ENOMEM;
    if (b)
      b->buf = buffer_alloc_zero (cs);
    if (!b || !b->buf || (r = alloc_clusters (q, 1, &b->host)) < 0) {
      if (b)
        free (b->buf);
      free (b);
      return r;
    }
    b->q = q;
    q->cw_cur = b;
  }
  assert (!q->cw_closed);
  /* The reference of the compressed cluster stored here. */
  r = extent_add (&q->incs, q->cw_cur->host, 1);
  if (r < 0)
    return r;
  off = q->cw_cur->host + q->cw_cur->fill;
  memcpy (q->cw_cur->buf + q->cw_cur->fill, cdata, n);
  q->cw_cur->fill += (uint32_t) n;
  q->cw_cur->dirty = true;
  sectors = ((off & (SECTOR - 1)) + n + SECTOR - 1) / SECTOR;
  *desc = L2E_COMPRESSED | off | ((sectors - 1) << x);
  return 0;
}

bool
cw_lookup (struct qcow2 *q, uint64_t start, uint64_t len, void *dst)
{
  struct cw_buf *b = q->cw_cur;
  for (;;) {
    if (b && start >= b->host && start + len <= b->host + q->cluster_size) {
      memcpy (dst, b->buf + (start - b->host), len);
      return true;
    }
    b = b == q->cw_cur ? q->cw_sealed : b ? b->next : NULL;
    if (!b)
      return false;
  }
}

int
cw_flush_start (struct qcow2 *q)
{
  struct cw_buf *b = q->cw_cur;
  int r;
  /* Appends may go on during this write: they only add bytes past what
   * it covers for sure, leave the buffer dirty, and are not linked until
   * the flush ends.
   */
  if (!b || !b->dirty || b->writes)
    return 0;
  b->dirty = false;
  r = submit_write (q, b, &b->fop, &b->fiov, flush_write_done);
  if (r < 0) {
    b->dirty = true;
    return r;
  }
  return 1;
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

void
cw_close (struct qcow2 *q)
{
  /* The final flush writes the buffer, then drops its reference: a host
   * cluster whose compressed clusters were all trimmed is freed then.
   */
  if (q->cw_cur && !q->cw_closed)
    retire_ref (q, q->cw_cur->host);
  q->cw_closed = true;
}

bool
cw_holds (const struct qcow2 *q, uint64_t offset, uint64_t count)
{
  uint64_t end = offset + (count << q->cluster_bits);
  const struct cw_buf *b = q->cw_cur;

  if (b && !q->cw_closed && b->host >= offset && b->host < end)
    return true;
  for (b = q->cw_sealed; b; b = b->next)
    if (b->host >= offset && b->host < end)
      return true;
  return false;
}

void
cw_free (struct qcow2 *q)
{
  /* Called after the final flush: nothing is in flight. */
  if (q->cw_cur) {
    free (q->cw_cur->buf);
    free (q->cw_cur);
    q->cw_cur = NULL;
  }
  free (q->cw_retired.v);
  q->cw_retired.v = NULL;
  q->cw_retired.n = q->cw_retired.cap = 0;
}
