/* tests/test-refcount-growth.c: allocation past what the refcount table
 * covers creates refcount blocks and moves the refcount table to a larger
 * one (512-byte clusters make that happen after a few MiB), for several
 * refcount widths; the result passes qemu-img check and compare.
 */
#include <config.h>

#include <string.h>

#include "testlib.h"

int
main (void)
{
  static const char *opts[] = {
    "cluster_size=512",
    "cluster_size=512,refcount_bits=1",
    "cluster_size=512,refcount_bits=64",
    "cluster_size=1024,refcount_bits=2",
  };
  const uint64_t size = 48 << 20;
  uint8_t *shadow = malloc (size), *buf;

  require_qemu_img ();
  if (posix_memalign ((void **) &buf, 4096, 1 << 20) || !shadow)
    return 1;
  for (size_t v = 0; v < sizeof opts / sizeof opts[0]; v++) {
    char name[32];
    char *path;
    struct qcow2 *q;

    snprintf (name, sizeof name, "grow-%zu.qcow2", v);
    path = make_image (name, opts[v], size);
    memset (shadow, 0, size);
    q = open_image (path, NULL, false);
    /* Sequential 1 MiB writes with a flush every few: many table growths. */
    for (uint64_t off = 0; off + (1 << 20) <= 40 << 20; off += 1 << 20) {
      fill_pattern (buf, 1 << 20, off);
      CHECK (sync_write (q, off, buf, 1 << 20, 0) == 0, "write");
      memcpy (shadow + off, buf, 1 << 20);
      if ((off >> 20) % 7 == 6)
        CHECK (sync_flush (q) == 0, "flush");
    }
    CHECK (engine_equals (q, shadow, size), "contents (%s)", opts[v]);
    CHECK (qcow2_close (q) == 0, "close");
    CHECK (qemu_img_check_clean (path), "check (%s)", opts[v]);
    CHECK (qemu_img_compare (path, shadow, size), "compare (%s)", opts[v]);
    printf ("ok %zu - %s\n", v, opts[v]);
    free (path);
  }
  free (shadow);
  free (buf);
  return test_exit ();
}
