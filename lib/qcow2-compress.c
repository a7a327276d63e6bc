/* lib/qcow2-compress.c: compressed clusters: decoding L2 entries,
 * decompressing zlib (raw deflate) or zstd data into a whole cluster, and
 * compressing a cluster.
 *
 * Compression and decompression run on the I/O backend's worker
 * threads, each with a compressor of its own that lives as long as the
 * thread (its deflate and inflate streams, its zstd contexts): setting
 * up a deflate stream for every cluster (deflateInit2 allocates and
 * clears 256 KiB of tables) took 30% of the CPU of compressing it, and
 * QEMU's compress filter pays that too.
 */
#include <config.h>

#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>
#ifdef HAVE_ZSTD
#include <zstd.h>
#endif

#include "qcow2-internal.h"

void
compressed_extent (const struct qcow2 *q, uint64_t ent, uint64_t *offset,
                   uint64_t *size)
{
  unsigned x = 62 - (q->cluster_bits - 8);
  uint64_t off = ent & (((uint64_t) 1 << x) - 1);
  uint64_t sectors = ((ent >> x) & (((uint64_t) 1 << (q->cluster_bits - 8))
                                    - 1)) + 1;
  *offset = off;
  *size = sectors * SECTOR - (off & (SECTOR - 1));
}

int
compressed_release (struct qcow2 *q, uint64_t ent)
{
  uint64_t off, size, first, last;
  compressed_extent (q, ent, &off, &size);
  /* The same clusters qemu counted when it stored the data: every cluster
   * touched by the sectors holding it.
   */
  first = (off & ~(uint64_t) (SECTOR - 1)) >> q->cluster_bits;
  last = ((off & ~(uint64_t) (SECTOR - 1)) + size + (off & (SECTOR - 1)) - 1)
    >> q->cluster_bits;
  return extent_add (&q->decs, first << q->cluster_bits, last - first + 1);
}

/* What one thread keeps from one cluster to the next. */
struct compressor {
  z_stream z;
  bool z_ready;                 /* z initialised (deflateInit2) */
  z_stream zi;
  bool zi_ready;                /* zi initialised (inflateInit2) */
#ifdef HAVE_ZSTD
  ZSTD_CCtx *zc;
  ZSTD_DCtx *zd;
#endif
};

static pthread_key_t compressor_key;
static bool compressor_key_ok;
static pthread_once_t compressor_once = PTHREAD_ONCE_INIT;

static void
compressor_free (void *arg)
{
  struct compressor *c = arg;

  if (c->z_ready)
    deflateEnd (&c->z);
  if (c->zi_ready)
    inflateEnd (&c->zi);
#ifdef HAVE_ZSTD
  ZSTD_freeCCtx (c->zc);
  ZSTD_freeDCtx (c->zd);
#endif
  free (c);
}

static void
compressor_key_create (void)
{
  compressor_key_ok = pthread_key_create (&compressor_key,
                                          compressor_free) == 0;
}

/* This thread's compressor, made at its first cluster and freed when the
 * thread exits; NULL when out of memory (then a cluster is stored
 * uncompressed, or decompressed with a stream of its own).
 */
static struct compressor *
thread_compressor (void)
{
  struct compressor *c;

  pthread_once (&compressor_once, compressor_key_create);
  if (!compressor_key_ok)
    return NULL;
  c = pthread_getspecific (compressor_key);
  if (c)
    return c;
  c = calloc (1, sizeof *c);
  if (c && pthread_setspecific (compressor_key, c) != 0) {
    free (c);
    c = NULL;
  }
  return c;
}

/* Inflate into out, with this thread's stream (c) or, without one, a
 * stream of its own.
 */
static int
inflate_cluster (struct compressor *c, const void *in, size_t inlen,
                 void *out, size_t outlen)
{
  z_stream own, *z = c ? &c->zi : &own;
  int r;

  if (c && c->zi_ready) {
    if (inflateReset (z) != Z_OK)
      return -EIO;
  }
  else {
    memset (z, 0, sizeof *z);
    if (inflateInit2 (z, -15) != Z_OK)
      return -ENOMEM;
    if (c)
      c->zi_ready = true;
  }
  z->next_in = (Bytef *) in;
  z->avail_in = (uInt) inlen;
  z->next_out = out;
  z->avail_out = (uInt) outlen;
  r = inflate (z, Z_FINISH);
  /* The stored data is padded to a sector: a full output buffer is
   * success even if the stream end was not seen.
   */
  if (r != Z_STREAM_END && !(r == Z_BUF_ERROR && z->avail_out == 0)
      && !(r == Z_OK && z->avail_out == 0))
    r = -EIO;
  else
    r = z->avail_out == 0 ? 0 : -EIO;
  if (!c)
    inflateEnd (z);
  return r;
}

#ifdef HAVE_ZSTD
/* The same for zstd: this thread's context, reset, or one of its own. */
static int
zstd_cluster (struct compressor *c, const void *in, size_t inlen,
              void *out, size_t outlen)
{
  ZSTD_DCtx *d = c ? c->zd : NULL;
  ZSTD_inBuffer ib = { in, inlen, 0 };
  ZSTD_outBuffer ob = { out, outlen, 0 };
  int r = 0;

  if (d)
    ZSTD_DCtx_reset (d, ZSTD_reset_session_only);
  else {
    d = ZSTD_createDCtx ();
    if (!d)
      return -ENOMEM;
    if (c)
      c->zd = d;
  }
  /* Decompress as a stream: the compressed size is only known to the
   * sector, so stop when the cluster is full.
   */
  while (ob.pos < ob.size) {
    size_t ret = ZSTD_decompressStream (d, &ob, &ib);
    if (ZSTD_isError (ret)) {
      r = -EIO;
      break;
    }
    if (ret == 0 && ob.pos < ob.size) {
      r = -EIO;                 /* frame ended early */
      break;
    }
    if (ib.pos == ib.size && ob.pos < ob.size) {
      r = -EIO;
      break;
    }
  }
  if (!c)
    ZSTD_freeDCtx (d);
  return r;
}
#endif

int
compressed_decode (const struct qcow2 *q, const void *in, size_t inlen,
                   void *out)
{
  struct compressor *c = thread_compressor ();

  switch (q->compression_type) {
  case 0:
    return inflate_cluster (c, in, inlen, out, q->cluster_size);
#ifdef HAVE_ZSTD
  case 1:
    return zstd_cluster (c, in, inlen, out, q->cluster_size);
#endif
  default:
    return -ENOTSUP;
  }
}

/* ------------------------------------------------------------------ */
/* Compression.                                                        */
/* ------------------------------------------------------------------ */

/* Whether the bytes of a cluster are spread nearly evenly over all 256
 * values, as in encrypted or already compressed data, judged from a
 * sample of 8 bytes in every 64.  Sum of squared counts: with n bytes
 * drawn uniformly its expected value is n(n-1)/256 + n; the sample passes
 * up to 5/4 of that collision term, a Renyi entropy of about 7.7 bits per
 * byte.  Text and most code stay well below; it only decides whether a
 * cheap trial runs first, never the outcome.
 */
static bool
looks_incompressible (const unsigned char *p, size_t len)
{
  uint32_t count[256] = { 0 };
  uint64_t n = 0, sq = 0;

  for (size_t i = 0; i + 8 <= len; i += 64) {
    for (int j = 0; j < 8; j++)
      count[p[i + j]]++;
    n += 8;
  }
  /* Too few bytes to tell (clusters under 4 KiB). */
  if (n < 512)
    return false;
  for (int v = 0; v < 256; v++)
    sq += (uint64_t) count[v] * count[v];
  return (sq - n) * 256 * 4 <= n * (n - 1) * 5;
}

/* Raw deflate with a 4 KiB window (QCOW2_DEFLATE_*), as QEMU writes. */

static size_t
deflate_cluster (struct compressor *c, const void *in, size_t inlen,
                 void *out, size_t cap)
{
  z_stream *z = &c->z;
  size_t n = 0;

  if (!c->z_ready) {
    memset (z, 0, sizeof *z);
    if (deflateInit2 (z, QCOW2_DEFLATE_LEVEL, Z_DEFLATED,
                      -QCOW2_DEFLATE_WINDOW_BITS, QCOW2_DEFLATE_MEMLEVEL,
                      Z_DEFAULT_STRATEGY) != Z_OK)
      return 0;
    c->z_ready = true;
  }
  else if (deflateReset (z) != Z_OK)
    return 0;
  z->next_in = (Bytef *) in;
  z->avail_in = (uInt) inlen;
  z->next_out = out;
  z->avail_out = (uInt) cap;
  if (deflate (z, Z_FINISH) == Z_STREAM_END)
    n = cap - z->avail_out;
  return n;
}

#ifdef HAVE_ZSTD
/* zstd into out at level; 0 when it does not fit in cap (or no memory). */
static size_t
zstd_compress_cluster (struct compressor *c, const void *in, size_t inlen,
                       void *out, size_t cap, int level)
{
  size_t n;

  if (!c->zc) {
    c->zc = ZSTD_createCCtx ();
    if (!c->zc)
      return 0;
  }
  n = ZSTD_compressCCtx (c->zc, out, cap, in, inlen, level);
  return ZSTD_isError (n) ? 0 : n;
}
#endif

size_t
compressed_encode (const struct qcow2 *q, const void *in, void *out,
                   size_t cap)
{
  struct compressor *c = thread_compressor ();

  if (!c)
    return 0;
  switch (q->compression_type) {
  case 0:
#ifdef HAVE_ZSTD
    /* Deflate spends as long failing on random bytes as compressing
     * text (1.1 ms for 64 KiB), and a mixed disk is often a quarter
     * random.  zstd at level 1 says no in 20 us; of the 16384 clusters
     * of a 1 GiB mix of binaries, text and random data
     * (bench/mixed-data.py) it refused one that deflate shrinks by a
     * sector.  Without memory for it, the cluster is stored as it is.
     */
    if (looks_incompressible (in, q->cluster_size)
        && zstd_compress_cluster (c, in, q->cluster_size, out, cap, 1) == 0)
      return 0;
#endif
    return deflate_cluster (c, in, q->cluster_size, out, cap);
#ifdef HAVE_ZSTD
  case 1:
    /* zstd's default level, as QEMU writes: level 1 made the file 2%
     * larger than QEMU's for the same data (for 20% less CPU).
     */
    return zstd_compress_cluster (c, in, q->cluster_size, out, cap,
                                  ZSTD_CLEVEL_DEFAULT);
#endif
  default:
    return 0;
  }
}
