/* tests/test-qcow2-basic.c: random writes and reads through the engine on
 * real I/O, for several cluster sizes, refcount widths and both qcow2
 * versions, checked against a shadow copy, by qemu-img check, and by
 * qemu-img compare.
 */
#include <config.h>

#include <string.h>

#include "testlib.h"

struct variant {
  const char *opts;
  uint64_t size;
};

static void
run_variant (const struct variant *v, int n)
{
  char name[64];
  uint8_t *shadow, *buf;
  struct qcow2 *q;
  char *path;
  uint64_t cs;

  snprintf (name, sizeof name, "basic-%d.qcow2", n);
  path = make_image (name, v->opts, v->size);
  shadow = calloc (1, v->size);
  if (posix_memalign ((void **) &buf, 4096, 1 << 20) || !shadow)
    exit (1);

  q = open_image (path, NULL, false);
  cs = qcow2_cluster_size (q);
  CHECK (qcow2_size (q) == v->size, "size %llu",
         (unsigned long long) qcow2_size (q));

  for (int i = 0; i < 300; i++) {
    uint64_t len = 1 + rnd () % (i % 3 == 0 ? 3 * cs : 70000);
    uint64_t off;
    if (len > v->size)
      len = v->size;
    off = rnd () % (v->size - len + 1);
    if (i % 17 == 0)
      off = v->size - len;                      /* the very end */
    else if (i % 5 == 0)
      off = (off / cs) * cs + cs - 1 < v->size - len
        ? (off / cs) * cs + cs - 1 : off;        /* straddle a cluster */
    if (len > (1 << 20))
      len = 1 << 20;
    fill_pattern (buf, len, (uint64_t) i);
    CHECK (sync_write (q, off, buf, len, i % 11 == 0 ? QCOW2_WRITE_FUA : 0)
           == 0, "write %d", i);
    memcpy (shadow + off, buf, len);
    if (i % 7 == 0) {
      uint64_t roff = rnd () % v->size;
      uint64_t rlen = 1 + rnd () % 200000;
      if (rlen > v->size - roff)
        rlen = v->size - roff;
      if (rlen > (1 << 20))
        rlen = 1 << 20;
      CHECK (sync_read (q, roff, buf, rlen) == 0, "read");
      CHECK (memcmp (buf, shadow + roff, rlen) == 0,
             "read back at %llu+%llu", (unsigned long long) roff,
             (unsigned long long) rlen);
    }
    if (i % 50 == 49)
      CHECK (sync_flush (q) == 0, "flush");
  }
  CHECK (engine_equals (q, shadow, v->size), "contents (%s)", v->opts);
  CHECK (qcow2_close (q) == 0, "close");
  CHECK (qemu_img_check_clean (path), "check (%s)", v->opts);
  CHECK (qemu_img_compare (path, shadow, v->size), "compare (%s)", v->opts);

  /* Reopen and read again: everything was written back. */
  q = open_image (path, NULL, true);
  CHECK (engine_equals (q, shadow, v->size), "contents after reopen");
  qcow2_close (q);
  free (shadow);
  free (buf);
  free (path);
  printf ("ok %d - %s\n", n, v->opts);
}

int
main (void)
{
  static const struct variant variants[] = {
    { "cluster_size=65536", 64 << 20 },
    { "cluster_size=4096", 24 << 20 },
    { "cluster_size=2097152", 40 << 20 },
    { "cluster_size=512,refcount_bits=1", 5 << 20 },
    { "cluster_size=4096,refcount_bits=64", 10 << 20 },
    { "cluster_size=4096,refcount_bits=8", 9 << 20 },
    { "compat=0.10,cluster_size=65536", 32 << 20 },
    { "compat=0.10,cluster_size=4096", 12 << 20 },
  };

  require_qemu_img ();
  for (size_t i = 0; i < sizeof variants / sizeof variants[0]; i++)
    run_variant (&variants[i], (int) i);
  return test_exit ();
}
