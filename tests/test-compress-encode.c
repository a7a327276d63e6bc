/* tests/test-compress-encode.c: compressed_encode, the cluster compressor
 * of --compress, and compressed_decode, on their own.
 *
 * - Its deflate output is byte for byte what a fresh raw deflate stream
 *   with the same parameters gives, cluster after cluster on one thread
 *   (the stream is reused), and inflates with QEMU's 4 KiB window.
 * - Random clusters are refused (stored uncompressed by the caller), with
 *   zlib and zstd images.
 * - A cluster whose bytes look random but that repeats itself within the
 *   window is still compressed: the cheap trial that refuses random data
 *   must not refuse it.
 * - Several threads at once, each with its own compressor, give the same
 *   results; their compressors are freed when they exit (LeakSanitizer).
 * - Clusters of 512 bytes (never compressed: a sector cannot be saved),
 *   4 KiB (the smallest the random trial looks at) and 2 MiB.
 * - Decoding reuses the thread's inflate stream or zstd context too: a
 *   cluster that fails (garbage, a stream cut short, one that ends before
 *   the cluster is full) is -EIO and leaves nothing behind for the next
 *   one, which decodes exactly.
 */
#include <config.h>

#include <errno.h>
#include <pthread.h>
#include <string.h>
#include <zlib.h>

#include "qcow2-internal.h"
#include "testlib.h"

#define MAX_CS (2u << 20)

static struct qcow2 *
codec (unsigned type, uint32_t cluster_bits)
{
  struct qcow2 *q = calloc (1, sizeof *q);

  if (!q)
    exit (1);
  q->compression_type = type;
  q->cluster_bits = cluster_bits;
  q->cluster_size = (uint64_t) 1 << cluster_bits;
  return q;
}

/* Words with some variation: compressible, different per seed. */
static void
text_fill (uint8_t *buf, size_t len, uint64_t seed)
{
  static const char words[] = "the quick brown fox jumps over a lazy "
    "qcow2 image served by qnbd to nbd-client and qemu ";

  for (size_t i = 0; i < len; i++)
    buf[i] = (uint8_t) words[(i * 3 + seed * 11 + i / 97) % (sizeof words - 1)];
}

/* A fresh stream per cluster, as QEMU does it (with our parameters). */
static size_t
reference_deflate (const void *in, size_t len, void *out, size_t cap)
{
  z_stream z;
  size_t n = 0;

  memset (&z, 0, sizeof z);
  if (deflateInit2 (&z, QCOW2_DEFLATE_LEVEL, Z_DEFLATED,
                    -QCOW2_DEFLATE_WINDOW_BITS, QCOW2_DEFLATE_MEMLEVEL,
                    Z_DEFAULT_STRATEGY) != Z_OK)
    exit (1);
  z.next_in = (Bytef *) in;
  z.avail_in = (uInt) len;
  z.next_out = out;
  z.avail_out = (uInt) cap;
  if (deflate (&z, Z_FINISH) == Z_STREAM_END)
    n = cap - z.avail_out;
  deflateEnd (&z);
  return n;
}

/* Inflate as QEMU does (4 KiB window). */
static bool
qemu_inflates (const void *in, size_t inlen, const void *want, size_t len)
{
  uint8_t *out = malloc (len);
  z_stream z;
  int r;
  bool ok;

  memset (&z, 0, sizeof z);
  if (!out || inflateInit2 (&z, -12) != Z_OK)
    exit (1);
  z.next_in = (Bytef *) in;
  z.avail_in = (uInt) inlen;
  z.next_out = out;
  z.avail_out = (uInt) len;
  r = inflate (&z, Z_FINISH);
  ok = r == Z_STREAM_END && z.avail_out == 0 && memcmp (out, want, len) == 0;
  inflateEnd (&z);
  free (out);
  return ok;
}

/* Encode, decode with the engine's decoder, compare. */
static bool
round_trip (struct qcow2 *q, const uint8_t *in, uint8_t *out, uint8_t *back,
            size_t *n)
{
  size_t cs = q->cluster_size;

  *n = compressed_encode (q, in, out, cs - SECTOR);
  if (*n == 0)
    return false;
  return compressed_decode (q, out, *n, back) == 0
    && memcmp (back, in, cs) == 0;
}

struct bufs {
  uint8_t *in, *out, *ref, *back;
};

static void
bufs_alloc (struct bufs *b)
{
  b->in = malloc (MAX_CS);
  b->out = malloc (MAX_CS);
  b->ref = malloc (MAX_CS);
  b->back = malloc (MAX_CS);
  if (!b->in || !b->out || !b->ref || !b->back)
    exit (1);
}

static void
bufs_free (struct bufs *b)
{
  free (b->in);
  free (b->out);
  free (b->ref);
  free (b->back);
}

/* A mix of kinds on one thread; returns the failures it found. */
static int
mix (unsigned type, uint32_t cluster_bits, int clusters, uint64_t seed)
{
  struct qcow2 *q = codec (type, cluster_bits);
  size_t cs = q->cluster_size, n, unit;
  struct bufs b;
  int bad = 0;

  bufs_alloc (&b);
  for (int i = 0; i < clusters; i++) {
    if (cs <= SECTOR) {
      /* Saving a sector is impossible: never worth compressing. */
      text_fill (b.in, cs, seed + (uint64_t) i);
      if (compressed_encode (q, b.in, b.out, cs - SECTOR) != 0)
        bad++;
      continue;
    }
    switch (i % 4) {
    case 0:
    case 2:
      text_fill (b.in, cs, seed + (uint64_t) i);
      if (!round_trip (q, b.in, b.out, b.back, &n))
        bad++;
      else if (type == 0
               && (reference_deflate (b.in, cs, b.ref, cs - SECTOR) != n
                   || memcmp (b.ref, b.out, n) != 0
                   || !qemu_inflates (b.out, n, b.in, cs)))
        bad++;
      break;
    case 1:
      fill_noise (b.in, cs, seed + (uint64_t) i);
      if (compressed_encode (q, b.in, b.out, cs - SECTOR) != 0)
        bad++;
      break;
    case 3:
      /* Random bytes, but the first 3000 (of small clusters about 3/8)
       * repeated: every byte value about equally frequent (the trial
       * runs), yet deflate's 4 KiB window shrinks it.  Not a multiple of
       * 64, which the sample would see as the same few bytes.
       */
      unit = cs * 3 / 8 - 5 < 3000 ? cs * 3 / 8 - 5 : 3000;
      fill_noise (b.in, unit, seed + (uint64_t) i);
      for (size_t k = unit; k < cs; k++)
        b.in[k] = b.in[k % unit];
      if (!round_trip (q, b.in, b.out, b.back, &n) || n > cs / 2)
        bad++;
      else if (type == 0 && !qemu_inflates (b.out, n, b.in, cs))
        bad++;
      break;
    }
  }
  bufs_free (&b);
  free (q);
  return bad;
}

static void
case_zlib (const void *arg)
{
  (void) arg;
  CHECK (mix (0, 16, 64, 1) == 0, "64 KiB clusters");
}

static void
case_zstd (const void *arg)
{
  (void) arg;
#ifdef HAVE_ZSTD
  CHECK (mix (1, 16, 64, 2) == 0, "64 KiB clusters");
#else
  printf ("# built without zstd\n");
#endif
}

static void
case_sizes (const void *arg)
{
  (void) arg;
  /* 512 B: too small for the random trial; 4 KiB: the smallest with it. */
  CHECK (mix (0, 9, 64, 3) == 0, "512 B clusters");
  CHECK (mix (0, 12, 64, 4) == 0, "4 KiB clusters");
  CHECK (mix (0, 21, 8, 5) == 0, "2 MiB clusters");
#ifdef HAVE_ZSTD
  CHECK (mix (1, 9, 32, 6) == 0, "zstd 512 B clusters");
  CHECK (mix (1, 21, 8, 7) == 0, "zstd 2 MiB clusters");
#endif
}

/* Failures in between good clusters, on one thread. */
static int
decode_errors (unsigned type)
{
  struct qcow2 *q = codec (type, 16), *half_q = codec (type, 15);
  size_t cs = q->cluster_size, n, shorter;
  struct bufs b;
  uint8_t *half = malloc (cs);
  int bad = 0;

  bufs_alloc (&b);
  if (!half)
    exit (1);
  /* A valid stream of half a cluster: it ends before the cluster does. */
  text_fill (half, cs / 2, 9);
  shorter = compressed_encode (half_q, half, b.ref, cs / 2);
  for (int i = 0; i < 12; i++) {
    text_fill (b.in, cs, 40 + (uint64_t) i);
    if (!round_trip (q, b.in, b.out, b.back, &n)) {
      bad++;
      continue;
    }
    switch (i % 4) {
    case 0:
      fill_noise (half, cs / 4, (uint64_t) i);
      if (compressed_decode (q, half, cs / 4, b.back) != -EIO)
        bad++;
      break;
    case 1:
      if (compressed_decode (q, b.out, n / 2, b.back) != -EIO)
        bad++;
      break;
    case 2:
      if (shorter == 0 || compressed_decode (q, b.ref, shorter, b.back)
          != -EIO)
        bad++;
      break;
    case 3:
      break;
    }
    /* The same cluster again, right after the failure. */
    memset (b.back, 0, cs);
    if (compressed_decode (q, b.out, n, b.back) != 0
        || memcmp (b.back, b.in, cs) != 0)
      bad++;
  }
  bufs_free (&b);
  free (half);
  free (half_q);
  free (q);
  return bad;
}

static void
case_decode_errors (const void *arg)
{
  (void) arg;
  CHECK (decode_errors (0) == 0, "zlib");
#ifdef HAVE_ZSTD
  CHECK (decode_errors (1) == 0, "zstd");
#endif
}

struct worker {
  pthread_t tid;
  unsigned type;
  uint64_t seed;
  int bad;
};

static void *
worker_run (void *arg)
{
  struct worker *w = arg;

  w->bad = mix (w->type, 16, 48, w->seed);
  return NULL;
}

static void
case_threads (const void *arg)
{
  struct worker w[6];

  (void) arg;
  for (int round = 0; round < 2; round++) {
    for (int i = 0; i < 6; i++) {
      w[i].type = 0;
#ifdef HAVE_ZSTD
      w[i].type = (unsigned) i & 1;
#endif
      w[i].seed = (uint64_t) (100 * round + 10 * i);
      CHECK (pthread_create (&w[i].tid, NULL, worker_run, &w[i]) == 0,
             "pthread_create");
    }
    for (int i = 0; i < 6; i++) {
      pthread_join (w[i].tid, NULL);
      CHECK (w[i].bad == 0, "thread %d: %d bad clusters", i, w[i].bad);
    }
  }
}

static const struct test_case cases[] = {
  { "zlib", case_zlib, NULL },
  { "zstd", case_zstd, NULL },
  { "sizes", case_sizes, NULL },
  { "threads", case_threads, NULL },
  { "decode-errors", case_decode_errors, NULL },
};

int
main (int argc, char **argv)
{
  return run_cases (argc, argv, cases, sizeof cases / sizeof cases[0]);
}
