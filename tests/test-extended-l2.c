/* tests/test-extended-l2.c: images with extended L2 entries (subclusters,
 * qemu-img create -o extended_l2=on).
 *
 *  - an image QEMU wrote subcluster by subcluster (data, zeros, discards,
 *    over a backing file) reads like qemu-img convert says;
 *  - a small write into an empty cluster writes only the subclusters it
 *    touches: qemu-img map shows the rest still coming from the backing
 *    file, and the file holds one subcluster of new data, not a cluster;
 *  - block status follows the subclusters;
 *  - concurrent writes to different subclusters of one cluster;
 *  - random writes, write-zeroes and discards, with and without a backing
 *    file, with compressed clusters, with clusters shared with a snapshot
 *    and with an external data file, end in an image that qemu-img check
 *    and compare accept.
 */
#include <config.h>

#include <string.h>
#include <sys/stat.h>

#include "aio-fake.h"
#include "testlib.h"

#define KIB 1024u
#define MIB (1u << 20)

static void
done_cb (void *opaque, int ret)
{
  int *p = opaque;
  *p = ret;
}

static int
zero_op (struct qcow2 *q, int kind, uint64_t off, uint64_t len,
         unsigned flags)
{
  int res = 1, r;
  r = kind ? qcow2_discard (q, off, len, done_cb, &res)
    : qcow2_write_zeroes (q, off, len, flags, done_cb, &res);
  if (r < 0)
    return r;
  run_until (q, &res);
  return res;
}

static bool
load_raw (const char *image, uint8_t *buf, uint64_t size)
{
  char raw[600];
  FILE *f;
  bool ok;
  snprintf (raw, sizeof raw, "%s.raw", image);
  if (shell ("qemu-img convert -O raw '%s' '%s'", image, raw) != 0)
    return false;
  f = fopen (raw, "r");
  ok = f && fread (buf, 1, size, f) == size;
  if (f)
    fclose (f);
  return ok;
}

/* First extent of block status at off: its flags, depth and length. */
static uint64_t
status_at (struct qcow2 *q, uint64_t off, uint64_t len, uint32_t *flags,
           uint32_t *depth)
{
  struct qcow2_extent ext[8];
  unsigned n = 0;
  int res = 1;
  if (qcow2_block_status (q, off, len, ext, 8, &n, done_cb, &res) < 0)
    return 0;
  run_until (q, &res);
  if (res != 0 || n == 0)
    return 0;
  *flags = ext[0].flags;
  *depth = ext[0].depth;
  return ext[0].length;
}

/* An image written by QEMU, subcluster by subcluster, over a backing. */
static void
read_qemu_image (void)
{
  const char *d = test_dir ();
  const uint64_t size = 4 * MIB;
  uint8_t *want = malloc (size);
  char path[512];
  struct qcow2 *q;
  uint32_t fl, dp;

  CHECK (shell ("cd %s && qemu-img create -q -f raw rbase.raw 4M && "
                "qemu-io -f raw -c 'write -q -P 0x55 0 4M' rbase.raw && "
                "qemu-img create -q -f qcow2 -o extended_l2=on,"
                "cluster_size=64k -b rbase.raw -F raw qe.qcow2 4M && "
                "qemu-io -f qcow2 -c 'write -q -P 0x11 4k 2k' "
                "-c 'write -q -P 0x12 64k 64k' -c 'write -q -z 70k 4k' "
                "-c 'discard -q 80k 8k' -c 'write -q -P 0x13 1000 10' "
                "-c 'write -q -z 1M 100k' -c 'write -q -P 0x14 2103296 3k' "
                "qe.qcow2 >/dev/null", d) == 0, "qemu-io on an extl2 image");
  snprintf (path, sizeof path, "%s/qe.qcow2", d);
  CHECK (load_raw (path, want, size), "convert");
  q = open_image (path, NULL, true);
  CHECK (engine_equals (q, want, size), "reads of a QEMU-written image");
  /* 4k..6k data, 6k..64k backing, 70k..74k zeros. */
  CHECK (status_at (q, 4 * KIB, 64 * KIB, &fl, &dp) == 2 * KIB && fl == 0
         && dp == 1, "data subcluster: len/flags/depth");
  CHECK (status_at (q, 6 * KIB, 64 * KIB, &fl, &dp) == 58 * KIB && fl == 0
         && dp == 2, "backing shows through the rest of the cluster");
  CHECK (status_at (q, 70 * KIB, 4 * KIB, &fl, &dp) == 4 * KIB
         && fl == (QCOW2_EXTENT_HOLE | QCOW2_EXTENT_ZERO) && dp == 1,
         "zero subclusters");
  qcow2_close (q);
  free (want);
  printf ("ok - reads an image QEMU wrote by subclusters\n");
}

/* A 512-byte write into an empty 64k cluster over a backing file. */
static void
small_write_cost (void)
{
  const char *d = test_dir ();
  const uint64_t size = 4 * MIB;
  uint8_t *want = malloc (size), buf[512];
  char path[512];
  struct qcow2 *q;
  struct aio *a;
  const struct aio_fake_record *log;
  size_t nlog;
  uint64_t data_bytes = 0;
  uint32_t fl, dp;

  CHECK (shell ("cd %s && qemu-img create -q -f qcow2 -o extended_l2=on,"
                "cluster_size=64k -b rbase.raw -F raw small.qcow2 4M", d)
         == 0, "create");
  snprintf (path, sizeof path, "%s/small.qcow2", d);
  CHECK (load_raw (path, want, size), "convert");
  /* The recording backend says how many bytes of data the write wrote. */
  CHECK (aio_fake_create (&a) == 0, "fake backend");
  q = open_image (path, a, false);
  aio_fake_clear_log (a);
  memset (buf, 0xa7, sizeof buf);
  /* Subcluster 16 of cluster 3 (subclusters are 2k). */
  CHECK (sync_write (q, 3 * 64 * KIB + 32 * KIB + 700, buf, 512, 0) == 0,
         "write");
  log = aio_fake_log (a, &nlog);
  for (size_t i = 0; i < nlog; i++)
    if (log[i].type == AIO_WRITE && classify_io (q, &log[i]) == IO_DATA)
      data_bytes += log[i].length;
  memcpy (want + 3 * 64 * KIB + 32 * KIB + 700, buf, 512);
  CHECK (status_at (q, 3 * 64 * KIB, 64 * KIB, &fl, &dp) == 32 * KIB
         && dp == 2, "before the written subcluster: backing");
  CHECK (status_at (q, 3 * 64 * KIB + 32 * KIB, 64 * KIB, &fl, &dp)
         == 2 * KIB && dp == 1 && fl == 0, "one subcluster of data");
  CHECK (engine_equals (q, want, size), "reads");
  CHECK (qcow2_close (q) == 0, "close");
  CHECK (qemu_img_check_clean (path), "check");
  CHECK (qemu_img_compare (path, want, size), "compare");
  CHECK (shell ("qemu-img map --output=json '%s' | grep -q "
                "'\"start\": 229376, \"length\": 2048, \"depth\": 0, "
                "\"present\": true, \"zero\": false, \"data\": true'", path)
         == 0, "qemu-img map: one 2k subcluster of data at 224k");
  /* Only the written subcluster was written (the cluster's space is
   * reserved whole, but just 2k of it is written).
   */
  CHECK (data_bytes == 2 * KIB, "the write wrote %llu bytes of data",
         (unsigned long long) data_bytes);
  aio_destroy (a);
  free (want);
  printf ("ok - a 512-byte write copies one 2k subcluster, not 64k\n");
}

/* Writes to different subclusters of one cluster, all in flight at once. */
static void
concurrent_subclusters (void)
{
  char *path = make_image ("conc.qcow2", "extended_l2=on,cluster_size=64k",
                           2 * MIB);
  uint8_t *shadow = calloc (1, 2 * MIB);
  uint8_t *bufs[40];
  int res[40];
  struct qcow2 *q = open_image (path, NULL, false);
  int pending = 0;

  for (int i = 0; i < 40; i++) {
    uint64_t off = (uint64_t) (i % 4) * 64 * KIB + (uint64_t) (i / 4) * 6 * KIB
      + (uint64_t) (i % 3) * 100;
    uint64_t len = 1000 + (uint64_t) i * 37;
    bufs[i] = malloc (len);
    fill_pattern (bufs[i], len, 1000 + (uint64_t) i);
    memcpy (shadow + off, bufs[i], len);
    res[i] = 1;
    CHECK (qcow2_write (q, off, bufs[i], len, 0, done_cb, &res[i]) == 0,
           "submit %d", i);
  }
  for (;;) {
    pending = 0;
    for (int i = 0; i < 40; i++)
      pending += res[i] == 1;
    if (!pending)
      break;
    run_until (q, &res[0]);
    for (int i = 0; i < 40; i++)
      if (res[i] == 1) {
        run_until (q, &res[i]);
        break;
      }
  }
  for (int i = 0; i < 40; i++) {
    CHECK (res[i] == 0, "write %d: %d", i, res[i]);
    free (bufs[i]);
  }
  CHECK (engine_equals (q, shadow, 2 * MIB), "reads");
  CHECK (qcow2_close (q) == 0, "close");
  CHECK (qemu_img_check_clean (path), "check");
  CHECK (qemu_img_compare (path, shadow, 2 * MIB), "compare");
  free (shadow);
  free (path);
  printf ("ok - concurrent writes to subclusters of the same clusters\n");
}

/* Random writes, zeroes and discards against a shadow copy (sc: the
 * image's subcluster size).
 */
static void
random_ops (const char *name, uint64_t sc, const char *create)
{
  const char *d = test_dir ();
  const uint64_t size = 8 * MIB;
  uint8_t *shadow = malloc (size), *buf = malloc (300 * KIB);
  char path[512];
  struct qcow2 *q;

  CHECK (shell ("cd %s && %s", d, create) == 0, "create %s", name);
  snprintf (path, sizeof path, "%s/%s", d, name);
  CHECK (load_raw (path, shadow, size), "convert");
  q = open_image (path, NULL, false);
  CHECK (engine_equals (q, shadow, size), "%s: initial reads", name);
  for (int i = 0; i < 400; i++) {
    unsigned kind = (unsigned) (rnd () % 10);
    uint64_t len = rnd () % 4 == 0 ? 1 + rnd () % (300 * KIB)
      : 1 + rnd () % (8 * KIB);
    uint64_t off = rnd () % (size - len);
    if (rnd () % 2) {
      /* Sector aligned, as most clients write. */
      off &= ~511ull;
      len = (len + 511) & ~511ull;
    }
    if (kind < 6) {
      fill_pattern (buf, len, 5000 + (uint64_t) i);
      CHECK (sync_write (q, off, buf, len, 0) == 0, "%s: write %d", name, i);
      memcpy (shadow + off, buf, len);
    }
    else if (kind < 8) {
      unsigned flags = kind == 7 ? QCOW2_ZERO_NO_HOLE : 0;
      CHECK (zero_op (q, 0, off, len, flags) == 0, "%s: zeroes %d", name, i);
      memset (shadow + off, 0, len);
    }
    else {
      /* Discard may drop whole subclusters (they read zeros then: the
       * zero bit hides a backing file) and leaves the rest as it was.
       */
      uint64_t a = (off + sc - 1) & ~(sc - 1);
      uint64_t b = (off + len) & ~(sc - 1);
      CHECK (zero_op (q, 1, off, len, 0) == 0, "%s: discard %d", name, i);
      CHECK (sync_read (q, off, buf, len) == 0, "%s: read %d", name, i);
      for (uint64_t p = off; p < off + len; p++) {
        bool inside = p >= a && p < b;
        if (buf[p - off] != shadow[p] && !(inside && buf[p - off] == 0)) {
          CHECK (false, "%s: discard %d changed byte 0x%llx", name, i,
                 (unsigned long long) p);
          break;
        }
      }
      memcpy (shadow + off, buf, len);
    }
    if (i % 50 == 49)
      CHECK (sync_flush (q) == 0, "flush");
  }
  CHECK (engine_equals (q, shadow, size), "%s: reads after ops", name);
  CHECK (qcow2_close (q) == 0, "close");
  CHECK (qemu_img_check_clean (path), "%s: check", name);
  CHECK (qemu_img_compare (path, shadow, size), "%s: compare", name);
  /* And once more through a fresh open. */
  q = open_image (path, NULL, true);
  CHECK (engine_equals (q, shadow, size), "%s: reads after reopen", name);
  qcow2_close (q);
  free (shadow);
  free (buf);
  printf ("ok - random writes, zeroes and discards: %s\n", name);
}

int
main (void)
{
  require_qemu_img ();
  if (shell ("qemu-img create -f qcow2 -o help 2>/dev/null "
             "| grep -q extended_l2") != 0) {
    printf ("skip - this qemu-img has no extended_l2\n");
    return 77;
  }
  read_qemu_image ();
  small_write_cost ();
  concurrent_subclusters ();
  random_ops ("plain.qcow2", 2 * KIB, "qemu-img create -q -f qcow2 -o extended_l2=on,"
              "cluster_size=64k plain.qcow2 8M");
  random_ops ("big.qcow2", 64 * KIB, "qemu-img create -q -f qcow2 -o extended_l2=on,"
              "cluster_size=2M big.qcow2 8M");
  random_ops ("over.qcow2", KIB, "qemu-img create -q -f raw b8.raw 8M && "
              "qemu-io -f raw -c 'write -q -P 0x3c 0 8M' b8.raw && "
              "qemu-img create -q -f qcow2 -o extended_l2=on,"
              "cluster_size=32k -b b8.raw -F raw over.qcow2 8M && "
              "qemu-io -f qcow2 -c 'write -q -P 0x41 100k 300k' "
              "-c 'write -q -z 1M 200k' over.qcow2 >/dev/null");
  random_ops ("comp.qcow2", 2 * KIB, "qemu-img create -q -f raw src.raw 8M && "
              "qemu-io -f raw -c 'write -q -P 0x61 0 3M' "
              "-c 'write -q -P 0x62 5M 2M' src.raw && "
              "qemu-img convert -c -O qcow2 -o extended_l2=on,"
              "cluster_size=64k src.raw comp.qcow2");
  /* Clusters shared with an internal snapshot are copied whole. */
  random_ops ("snap.qcow2", 2 * KIB, "qemu-img create -q -f qcow2 -o "
              "extended_l2=on,cluster_size=64k snap.qcow2 8M && "
              "qemu-io -f qcow2 -c 'write -q -P 0x71 0 3M' "
              "-c 'write -q -P 0x72 4100k 7k' -c 'write -q -z 5M 9k' "
              "snap.qcow2 >/dev/null && qemu-img snapshot -c s1 snap.qcow2");
  random_ops ("df.qcow2", 2 * KIB, "qemu-img create -q -f qcow2 -o "
              "extended_l2=on,cluster_size=64k,data_file=$PWD/df.raw "
              "df.qcow2 8M");
  return test_exit ();
}
