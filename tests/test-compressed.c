/* tests/test-compressed.c: images compressed by qemu-img convert -c (zlib,
 * and zstd when built with it) read back exactly; writes into compressed
 * clusters decompress, merge and allocate normal clusters, and the old
 * compressed clusters' refcounts drop (qemu-img check finds no leaks).
 */
#include <config.h>

#include <string.h>

#include "testlib.h"

static void
run (const char *name, const char *opts)
{
  const uint64_t size = 12 << 20;
  uint8_t *shadow = malloc (size), *buf;
  char raw[512], *path;
  struct qcow2 *q;
  FILE *f;

  if (!shadow || posix_memalign ((void **) &buf, 4096, 1 << 20))
    exit (1);
  /* Compressible but not trivial data, with holes. */
  for (uint64_t i = 0; i < size; i++)
    shadow[i] = (uint8_t) ((i / 100) % 7 == 0 ? 0 : (i * 13 / 4096) ^ (i >> 7));
  memset (shadow + (3 << 20), 0, 1 << 20);
  snprintf (raw, sizeof raw, "%s/%s.raw", test_dir (), name);
  f = fopen (raw, "w");
  if (!f || fwrite (shadow, 1, size, f) != size || fclose (f))
    exit (1);
  if (asprintf (&path, "%s/%s", test_dir (), name) < 0)
    exit (1);
  CHECK (shell ("qemu-img convert -q -c -f raw -O qcow2 %s '%s' '%s'", opts,
                raw, path) == 0, "convert %s", opts);

  q = open_image (path, NULL, false);
  CHECK (engine_equals (q, shadow, size), "compressed contents (%s)", opts);
  for (int i = 0; i < 60; i++) {
    uint64_t len = 1 + rnd () % 150000;
    uint64_t off = rnd () % (size - len);
    fill_pattern (buf, len, (uint64_t) i);
    CHECK (sync_write (q, off, buf, len, 0) == 0, "write %d", i);
    memcpy (shadow + off, buf, len);
  }
  CHECK (engine_equals (q, shadow, size), "contents after writes (%s)", opts);
  CHECK (qcow2_close (q) == 0, "close");
  CHECK (qemu_img_check_clean (path), "check (%s)", opts);
  CHECK (qemu_img_compare (path, shadow, size), "compare (%s)", opts);
  free (shadow);
  free (buf);
  free (path);
  printf ("ok - %s\n", opts);
}

int
main (void)
{
  require_qemu_img ();
  run ("zlib.qcow2", "-o cluster_size=65536");
  run ("zlib-4k.qcow2", "-o cluster_size=4096");
#ifdef HAVE_ZSTD
  run ("zstd.qcow2", "-o compression_type=zstd");
#endif
  return test_exit ();
}
