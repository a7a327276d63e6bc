/* lib/qcow2-compress.c: compressed clusters: decoding L2 entries, and
 * decompressing zlib (raw deflate) or zstd data into a whole cluster.
 */
#include <config.h>

#include <errno.h>
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

static int
inflate_cluster (const void *in, size_t inlen, void *out, size_t outlen)
{
  z_stream z;
  int r;

  memset (&z, 0, sizeof z);
  if (inflateInit2 (&z, -15) != Z_OK)
    return -ENOMEM;
  z.next_in = (Bytef *) in;
  z.avail_in = (uInt) inlen;
  z.next_out = out;
  z.avail_out = (uInt) outlen;
  r = inflate (&z, Z_FINISH);
  /* The stored data is padded to a sector: a full output buffer is
   * success even if the stream end was not seen.
   */
  if (r != Z_STREAM_END && !(r == Z_BUF_ERROR && z.avail_out == 0)
      && !(r == Z_OK && z.avail_out == 0))
    r = -EIO;
  else
    r = z.avail_out == 0 ? 0 : -EIO;
  inflateEnd (&z);
  return r;
}

#ifdef HAVE_ZSTD
static int
zstd_cluster (const void *in, size_t inlen, void *out, size_t outlen)
{
  ZSTD_DCtx *d = ZSTD_createDCtx ();
  ZSTD_inBuffer ib = { in, inlen, 0 };
  ZSTD_outBuffer ob = { out, outlen, 0 };
  int r = 0;

  if (!d)
    return -ENOMEM;
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
  ZSTD_freeDCtx (d);
  return r;
}
#endif

int
compressed_decode (const struct qcow2 *q, const void *in, size_t inlen,
                   void *out)
{
  switch (q->compression_type) {
  case 0:
    return inflate_cluster (in, inlen, out, q->cluster_size);
#ifdef HAVE_ZSTD
  case 1:
    return zstd_cluster (in, inlen, out, q->cluster_size);
#endif
  default:
    return -ENOTSUP;
  }
}
