/* tests/test-dcache.c: the decompressed-cluster cache (lib/qcow2-dcache.c).
 *
 * - rules: a fill is found again; the least recently used entry goes
 *   when it is full; a clear forgets everything, and a fill that started
 *   before a clear is dropped (its compressed bytes may have been freed
 *   and allocated again meanwhile);
 * - sequential: reading a compressed image 4 KiB at a time decompresses
 *   each cluster once and reads back exactly; a second pass over what the
 *   cache holds decompresses nothing; reads of whole clusters neither
 *   fill it nor need it;
 * - overwrite: a cluster read from the cache, then overwritten in part
 *   (its copy-on-write also reads it from the cache), reads the new data,
 *   also after a flush freed the old compressed cluster; the image stays
 *   clean;
 * - reuse: a compressed cluster is read, everything is discarded and
 *   flushed (its host cluster is freed), and a new compressed cluster is
 *   packed at the very same offset with the same size (the test checks
 *   that it was): reading it gives the new data, not the old copy.
 */
#include <config.h>

#include <endian.h>
#include <fcntl.h>
#include <string.h>
#include <unistd.h>

#include "qcow2-internal.h"
#include "qcow2-testing.h"
#include "testlib.h"

#define CLUSTER 65536u
#define SIZE (2u << 20)                 /* 32 clusters, the cache holds 16 */

static char *
cluster_of (int tag)
{
  char *p = malloc (CLUSTER);
  if (!p)
    exit (1);
  memset (p, tag, CLUSTER);
  return p;
}

static void
rules (const void *arg)
{
  struct qcow2 *q = calloc (1, sizeof *q);
  const char *got;
  uint64_t gen;

  (void) arg;
  if (!q)
    exit (1);
  q->cluster_bits = 16;
  for (int i = 0; i < 16; i++)
    dcache_fill (q, 0x10000 + i * 512, 300, dcache_generation (q),
                 cluster_of (i));
  for (int i = 0; i < 16; i++) {
    got = dcache_lookup (q, 0x10000 + i * 512, 300);
    CHECK (got && got[0] == i && got[CLUSTER - 1] == i, "entry %d", i);
  }
  CHECK (!dcache_lookup (q, 0x10000, 301), "same offset, other size");

  /* Full: the 17th fill pushes out the one used longest ago (entry 0,
   * after entry 0 is used again: entry 1).
   */
  CHECK (dcache_lookup (q, 0x10000, 300) != NULL, "entry 0 used");
  dcache_fill (q, 0x90000, 300, dcache_generation (q), cluster_of (99));
  CHECK (!dcache_lookup (q, 0x10000 + 512, 300), "entry 1 evicted");
  CHECK (dcache_lookup (q, 0x10000, 300) != NULL, "entry 0 kept");
  got = dcache_lookup (q, 0x90000, 300);
  CHECK (got && got[5] == 99, "the new entry");

  /* Two reads of one cluster at once: the second fill is dropped. */
  dcache_fill (q, 0x90000, 300, dcache_generation (q), cluster_of (100));
  got = dcache_lookup (q, 0x90000, 300);
  CHECK (got && got[5] == 99, "a second fill of one entry");

  /* A clear forgets all; a fill planned before it is dropped. */
  gen = dcache_generation (q);
  dcache_clear (q);
  CHECK (dcache_generation (q) != gen, "a clear bumps the generation");
  for (int i = 0; i < 16; i++)
    CHECK (!dcache_lookup (q, 0x10000 + i * 512, 300), "cleared %d", i);
  dcache_fill (q, 0x20000, 300, gen, cluster_of (7));
  CHECK (!dcache_lookup (q, 0x20000, 300), "a stale fill is dropped");
  dcache_fill (q, 0x20000, 300, dcache_generation (q), cluster_of (8));
  got = dcache_lookup (q, 0x20000, 300);
  CHECK (got && got[0] == 8, "a fresh fill is kept");
  dcache_free (q);
  free (q);
}

/* A raw file of compressible data, converted with qemu-img -c. */
static char *
compressed_image (const char *name, uint8_t *data)
{
  char raw[512], *path;
  FILE *f;

  for (uint32_t i = 0; i < SIZE; i++)
    data[i] = (uint8_t) ((i / 100) % 7 == 0 ? 0 : (i * 13 / 4096) ^ (i >> 9));
  snprintf (raw, sizeof raw, "%s/%s.raw", test_dir (), name);
  path = malloc (strlen (test_dir ()) + strlen (name) + 2);
  if (!path)
    exit (1);
  sprintf (path, "%s/%s", test_dir (), name);
  f = fopen (raw, "w");
  if (!f || fwrite (data, 1, SIZE, f) != SIZE || fclose (f))
    exit (1);
  if (shell ("qemu-img convert -c -f raw -O qcow2 -o cluster_size=%u "
             "'%s' '%s'", CLUSTER, raw, path) != 0)
    exit (1);
  return path;
}

static void
sequential (const void *arg)
{
  uint8_t *data = malloc (SIZE), *buf;
  char *path;
  struct qcow2 *q;
  uint64_t hits, misses;
  bool same = true;

  (void) arg;
  if (!data || posix_memalign ((void **) &buf, 4096, CLUSTER))
    exit (1);
  path = compressed_image ("seq.qcow2", data);
  q = open_image (path, NULL, true);
  for (uint32_t off = 0; off < SIZE; off += 4096) {
    CHECK (sync_read (q, off, buf, 4096) == 0, "read at %u", off);
    same = same && memcmp (buf, data + off, 4096) == 0;
  }
  CHECK (same, "the data read back");
  qcow2_testing_dcache_counts (q, &hits, &misses);
  CHECK (misses == SIZE / CLUSTER && hits == SIZE / 4096 - misses,
         "one decompression per cluster: %llu hits, %llu misses",
         (unsigned long long) hits, (unsigned long long) misses);
  /* The last 16 clusters are still there. */
  for (uint32_t off = SIZE / 2; off < SIZE; off += 4096)
    CHECK (sync_read (q, off, buf, 4096) == 0 &&
           memcmp (buf, data + off, 4096) == 0, "again at %u", off);
  qcow2_testing_dcache_counts (q, &hits, &misses);
  CHECK (misses == SIZE / CLUSTER, "second pass: %llu misses",
         (unsigned long long) misses);
  /* Whole clusters: decompressed in place, each a miss, nothing kept. */
  for (int pass = 0; pass < 2; pass++)
    for (uint32_t off = 0; off < SIZE / 2; off += CLUSTER)
      CHECK (sync_read (q, off, buf, CLUSTER) == 0 &&
             memcmp (buf, data + off, CLUSTER) == 0, "whole at %u", off);
  qcow2_testing_dcache_counts (q, &hits, &misses);
  CHECK (misses == 2 * SIZE / CLUSTER, "whole clusters: %llu misses",
         (unsigned long long) misses);
  CHECK (qcow2_close (q) == 0, "close");
  free (path);
  free (data);
  free (buf);
}

static void
overwrite (const void *arg)
{
  uint8_t *data = malloc (SIZE), *buf;
  char *path;
  struct qcow2 *q;
  uint64_t hits, misses;

  (void) arg;
  if (!data || posix_memalign ((void **) &buf, 4096, CLUSTER))
    exit (1);
  path = compressed_image ("over.qcow2", data);
  q = open_image (path, NULL, false);
  for (int round = 0; round < 2; round++) {
    uint32_t at = round * 3 * CLUSTER;
    uint64_t hits_before;

    CHECK (sync_read (q, at, buf, 4096) == 0 &&
           memcmp (buf, data + at, 4096) == 0, "read %d", round);
    qcow2_testing_dcache_counts (q, &hits_before, &misses);
    CHECK (sync_read (q, at + 8192, buf, 4096) == 0 &&
           memcmp (buf, data + at + 8192, 4096) == 0, "again %d", round);
    qcow2_testing_dcache_counts (q, &hits, &misses);
    CHECK (hits == hits_before + 1, "from the cache: %llu hits",
           (unsigned long long) (hits - hits_before));
    fill_pattern (data + at + 1000, 5000, 42 + round);
    CHECK (sync_write (q, at + 1000, data + at + 1000, 5000, 0) == 0,
           "write %d", round);
    if (round == 1)
      CHECK (sync_flush (q) == 0, "flush");
    CHECK (sync_read (q, at, buf, CLUSTER) == 0 &&
           memcmp (buf, data + at, CLUSTER) == 0, "new data %d", round);
  }
  CHECK (engine_equals (q, data, SIZE), "contents");
  CHECK (qcow2_close (q) == 0, "close");
  CHECK (qemu_img_check_clean (path), "check");
  CHECK (qemu_img_compare (path, data, SIZE), "compare");
  free (path);
  free (data);
  free (buf);
}

/* The L2 entry of guest cluster idx, read from the file (the image is
 * closed).
 */
static uint64_t
l2_entry_in_file (const char *path, uint64_t idx)
{
  int fd = open (path, O_RDONLY);
  uint64_t v = 0, l1 = 0, l2 = 0;

  if (fd < 0 ||
      pread (fd, &v, 8, 40) != 8 ||
      pread (fd, &l1, 8, (off_t) be64toh (v)) != 8 ||
      pread (fd, &l2, 8, (off_t) ((be64toh (l1) & 0x00fffffffffffe00ull)
                                  + idx * 8)) != 8)
    exit (1);
  close (fd);
  return be64toh (l2);
}

static void
reuse (const void *arg)
{
  const uint32_t n = 40;        /* clusters: over 1 MiB compressed */
  uint8_t *data = calloc (n, CLUSTER);
  char raw[512], path[512], err[256];
  struct qcow2_opts o = { 0 };
  struct qcow2 *q;
  uint64_t before, after, hits, misses;
  FILE *f;

  (void) arg;
  if (!data)
    exit (1);
  /* Cluster 0 compresses to a few bytes; the others to about half. */
  memset (data, 'a', CLUSTER);
  for (uint32_t i = 1; i < n; i++)
    fill_noise (data + (uint64_t) i * CLUSTER, CLUSTER / 2, i);
  snprintf (raw, sizeof raw, "%s/reuse.raw", test_dir ());
  snprintf (path, sizeof path, "%s/reuse.qcow2", test_dir ());
  f = fopen (raw, "w");
  if (!f || fwrite (data, CLUSTER, n, f) != n || fclose (f))
    exit (1);
  if (shell ("qemu-img convert -c -f raw -O qcow2 -o cluster_size=%u "
             "'%s' '%s'", CLUSTER, raw, path) != 0)
    exit (1);
  before = l2_entry_in_file (path, 0);
  CHECK (before & (1ull << 62), "cluster 0 is compressed");

  o.compress = true;
  if (qcow2_open (path, &o, &q, err, sizeof err) < 0) {
    fprintf (stderr, "%s\n", err);
    exit (1);
  }
  CHECK (sync_read (q, 0, data, 4096) == 0 && data[100] == 'a',
         "cluster 0 read (and kept)");
  CHECK (sync_read (q, 8192, data, 4096) == 0 && data[100] == 'a',
         "cluster 0 read again");
  qcow2_testing_dcache_counts (q, &hits, &misses);
  CHECK (hits == 1 && misses == 1, "cluster 0 kept: %llu hits, %llu misses",
         (unsigned long long) hits, (unsigned long long) misses);
  /* Every cluster dropped: the host clusters of the compressed data are
   * free once a flush has made the change durable.
   */
  CHECK (sync_discard (q, 0, (uint64_t) n * CLUSTER) == 0, "discard");
  CHECK (sync_flush (q) == 0 && sync_flush (q) == 0, "flush");
  /* Compressed the same size, packed where cluster 0's data was. */
  memset (data, 'b', CLUSTER);
  CHECK (sync_write (q, 5 * CLUSTER, data, CLUSTER, 0) == 0, "write");
  CHECK (sync_read (q, 5 * CLUSTER + 4096, data, 4096) == 0, "read");
  CHECK (data[0] == 'b' && data[4095] == 'b',
         "the new cluster reads 0x%02x, not 'b'", data[0]);
  CHECK (qcow2_close (q) == 0, "close");
  after = l2_entry_in_file (path, 5);
  CHECK (after == before, "the new cluster's descriptor 0x%llx is not the "
         "old one's, 0x%llx: the case tested nothing",
         (unsigned long long) after, (unsigned long long) before);
  CHECK (qemu_img_check_clean (path), "check");
  free (data);
}

int
main (int argc, char **argv)
{
  static const struct test_case cases[] = {
    { "rules", rules, NULL },
    { "sequential", sequential, NULL },
    { "overwrite", overwrite, NULL },
    { "reuse", reuse, NULL },
  };

  require_qemu_img ();
  return run_cases (argc, argv, cases, sizeof cases / sizeof cases[0]);
}
