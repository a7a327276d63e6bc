/* tests/test-chain-read.c: reads through a deep chain of mixed images,
 * each layer written at random, compared with what qemu-img reads:
 *
 *   base.raw         raw, shorter than everything above it
 *   c512.qcow2       512-byte clusters: finer than the layers above, and
 *                    many L2 tables, so that a small cache misses; ends
 *                    inside a cluster of the layer above
 *   extl2.qcow2      extended L2: data, zero and unallocated subclusters
 *   v2.qcow2         compat=0.10 (no zero flag), compressed clusters
 *   comp.qcow2       compressed clusters, zero clusters
 *   top.qcow2        1 MiB clusters, larger than the images below
 *
 * A hole is resolved down the chain in one pass while the slices are
 * cached, and by a request on the image below where one is not: both are
 * exercised, with a cold cache, a warm one, and one too small for the
 * chain.  Read maps must call zeros only what reads as zeros.
 */
#include <config.h>

#include <string.h>

#include "testlib.h"

#define KIB 1024u
#define MIB (1024u * 1024u)

static const uint64_t top_size = 8 * MIB;

/* A qemu-io command line of n random writes, zero writes and discards
 * inside size (compressed writes, whole clusters of cs, when comp).
 */
static char *
random_cmds (uint64_t size, uint64_t cs, int n, bool zeros, bool comp,
             int seed)
{
  size_t cap = 64 * (size_t) n + 64, len = 0;
  char *s = malloc (cap);

  if (!s)
    exit (1);
  s[0] = '\0';
  /* Compressed writes first, into clusters this layer has not written
   * (QEMU refuses them anywhere else).
   */
  for (uint64_t c = 0; comp && c < size / cs; c++)
    if (rnd () % 4 == 0) {
      if (len + 64 > cap && !(s = realloc (s, cap *= 2)))
        exit (1);
      len += (size_t) snprintf (s + len, cap - len,
                                " -c 'write -q -c -P %d %llu %llu'",
                                (seed * 31 + (int) c) % 250 + 1,
                                (unsigned long long) (c * cs),
                                (unsigned long long) cs);
    }
  for (int i = 0; i < n; i++) {
    uint64_t l = 1 + rnd () % (rnd () % 4 ? 9000 : 300000);
    uint64_t off = rnd () % (size - l);
    unsigned kind = (unsigned) (rnd () % 10);

    if (len + 64 > cap && !(s = realloc (s, cap *= 2)))
      exit (1);
    if (zeros && kind < 4)
      len += (size_t) snprintf (s + len, cap - len,
                                " -c 'write -q -z %llu %llu'",
                                (unsigned long long) off,
                                (unsigned long long) l);
    else if (zeros && kind < 5)
      len += (size_t) snprintf (s + len, cap - len,
                                " -c 'discard -q %llu %llu'",
                                (unsigned long long) off,
                                (unsigned long long) l);
    else
      len += (size_t) snprintf (s + len, cap - len,
                                " -c 'write -q -P %d %llu %llu'",
                                (seed * 17 + i) % 250 + 1,
                                (unsigned long long) off,
                                (unsigned long long) l);
  }
  return s;
}

static void
layer (const char *d, const char *name, const char *opts, uint64_t size,
       const char *below, const char *below_fmt, uint64_t cs, int n,
       bool zeros, bool comp, int seed)
{
  char *cmds = random_cmds (size, cs, n, zeros, comp, seed);

  CHECK (shell ("cd %s && qemu-img create -q -f qcow2 -o %s -b %s -F %s "
                "%s %llu && qemu-io -f qcow2 %s %s >/dev/null", d, opts,
                below, below_fmt, name, (unsigned long long) size, cmds,
                name) == 0, "layer %s", name);
  free (cmds);
}

static void
build_chain (const char *d)
{
  char *cmds = random_cmds (3 * MIB + 1536, 512, 40, false, false, 1);

  CHECK (shell ("cd %s && rm -f base.raw *.qcow2 && "
                "truncate -s %llu base.raw && qemu-io -f raw %s base.raw "
                ">/dev/null", d, (unsigned long long) (3 * MIB + 1536),
                cmds) == 0, "base");
  free (cmds);
  /* Ends inside a cluster of the image above it. */
  layer (d, "c512.qcow2", "cluster_size=512", 5 * MIB + 512, "base.raw",
         "raw", 512, 120, true, false, 2);
  layer (d, "extl2.qcow2", "cluster_size=65536,extended_l2=on", 6 * MIB,
         "c512.qcow2", "qcow2", 65536, 60, true, false, 3);
  layer (d, "v2.qcow2", "compat=0.10,cluster_size=32768", 6 * MIB,
         "extl2.qcow2", "qcow2", 32768, 40, false, true, 4);
  layer (d, "comp.qcow2", "cluster_size=65536", 7 * MIB, "v2.qcow2",
         "qcow2", 65536, 40, true, true, 5);
  /* Most of the top is holes: a cluster of data, one of zeros. */
  CHECK (shell ("cd %s && qemu-img create -q -f qcow2 -o cluster_size=1M "
                "-b comp.qcow2 -F qcow2 top.qcow2 %llu && qemu-io -f qcow2 "
                "-c 'write -q -P 0x66 1100000 5000' -c 'write -q -z 5M 1M' "
                "top.qcow2 >/dev/null", d, (unsigned long long) top_size)
         == 0, "top");
}

static struct qcow2 *
open_chain (const char *path, uint64_t l2_cache_bytes)
{
  struct qcow2_opts o = { 0 };
  struct qcow2 *q;
  char err[300];

  o.read_only = true;
  o.l2_cache_bytes = l2_cache_bytes;
  if (qcow2_open (path, &o, &q, err, sizeof err) < 0) {
    fprintf (stderr, "open %s: %s\n", path, err);
    exit (1);
  }
  return q;
}

static void
done_cb (void *opaque, int ret)
{
  *(int *) opaque = ret;
}

/* n random reads (odd offsets and lengths up to 1 MiB) compared with
 * want, each through the read map, whose zero extents must be zeros.
 */
static void
random_reads (struct qcow2 *q, const uint8_t *want, int n, const char *what)
{
  uint8_t *buf;
  struct qcow2_extent map[64];

  if (posix_memalign ((void **) &buf, 4096, MIB))
    exit (1);
  for (int i = 0; i < n; i++) {
    uint64_t len = 1 + rnd () % (rnd () % 2 ? 4096 : MIB);
    uint64_t off = rnd () % (top_size - len + 1);
    unsigned nmap = 0;
    uint64_t pos;
    int res = 1;

    if (rnd () % 3 == 0)
      off &= ~(uint64_t) 4095;
    pos = off;
    CHECK (qcow2_read_map (q, off, buf, len, map, 64, &nmap, done_cb, &res)
           == 0, "submit");
    run_until (q, &res);
    CHECK (res == 0, "%s: read %d at %llu+%llu: %d", what, i,
           (unsigned long long) off, (unsigned long long) len, res);
    CHECK (memcmp (buf, want + off, len) == 0, "%s: read %d at %llu+%llu",
           what, i, (unsigned long long) off, (unsigned long long) len);
    for (unsigned k = 0; k < nmap; k++) {
      if (map[k].flags & QCOW2_EXTENT_ZERO)
        for (uint64_t b = 0; b < map[k].length; b++)
          if (want[pos + b]) {
            CHECK (false, "%s: read %d: zero extent at %llu holds data",
                   what, i, (unsigned long long) (pos + b));
            break;
          }
      pos += map[k].length;
    }
    CHECK (pos == off + len, "%s: read %d: map covers %llu bytes", what, i,
           (unsigned long long) (pos - off));
  }
  free (buf);
}

int
main (void)
{
  const char *d;
  char top[512], raw[512];
  uint8_t *want = malloc (top_size);
  struct qcow2 *q;
  FILE *f;

  require_qemu_img ();
  d = test_dir ();
  build_chain (d);
  snprintf (top, sizeof top, "%s/top.qcow2", d);
  snprintf (raw, sizeof raw, "%s/want.raw", d);
  CHECK (shell ("qemu-img convert -O raw '%s' '%s'", top, raw) == 0,
         "convert");
  f = fopen (raw, "r");
  if (!want || !f || fread (want, 1, top_size, f) != top_size)
    exit (1);
  fclose (f);

  /* Cold: the first reads load the slices through requests below. */
  q = open_chain (top, 0);
  random_reads (q, want, 150, "cold cache");
  CHECK (engine_equals (q, want, top_size), "whole disk");
  /* Warm: every slice cached, holes resolved in one pass. */
  random_reads (q, want, 300, "warm cache");
  CHECK (qcow2_close (q) == 0, "close");
  printf ("ok - chain of six, default cache\n");

  /* 16 slices per image: lookups below keep missing. */
  q = open_chain (top, 1);
  random_reads (q, want, 300, "small cache");
  CHECK (engine_equals (q, want, top_size), "whole disk, small cache");
  CHECK (qcow2_close (q) == 0, "close");
  printf ("ok - chain of six, small cache\n");
  free (want);
  return test_exit ();
}
