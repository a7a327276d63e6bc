/* tests/test-compressed-write.c: with compression on, whole-cluster writes
 * are stored compressed and packed densely (the file ends up far smaller
 * than the data), partial writes and incompressible clusters fall back to
 * normal clusters, overwriting compressed clusters frees their space, reads
 * of data still in the write cache are right, and the image passes
 * qemu-img check and reads back identically with QEMU.
 */
#include <config.h>

#include <string.h>
#include <sys/stat.h>

#include "testlib.h"

#define SIZE (32u << 20)

static void
done_cb (void *opaque, int ret)
{
  *(int *) opaque = ret;
}

/* Compressible, but different per cluster. */
static void
text_fill (uint8_t *buf, size_t len, uint64_t seed)
{
  static const char words[] = "qnbd serves qcow2 images over nbd quickly ";
  for (size_t i = 0; i < len; i++)
    buf[i] = (uint8_t) words[(i + seed * 7) % (sizeof words - 1)]
      ^ (uint8_t) ((i / 4096 + seed) & 3);
}

static void
run (const char *name, const char *opts)
{
  uint8_t *shadow = calloc (1, SIZE), *buf;
  char *path = make_image (name, opts, SIZE);
  struct qcow2_opts o = { 0 };
  struct qcow2 *q;
  char err[256];
  struct stat st;

  if (!shadow || posix_memalign ((void **) &buf, 4096, 1 << 20))
    exit (1);
  o.compress = true;
  if (qcow2_open (path, &o, &q, err, sizeof err) < 0) {
    fprintf (stderr, "%s\n", err);
    exit (1);
  }
  /* 24 MiB of compressible data, written 1 MiB at a time. */
  for (uint64_t off = 0; off < (24u << 20); off += 1 << 20) {
    text_fill (buf, 1 << 20, off >> 16);
    CHECK (sync_write (q, off, buf, 1 << 20, 0) == 0, "write");
    memcpy (shadow + off, buf, 1 << 20);
    if (off == 8u << 20)
      CHECK (sync_flush (q) == 0, "flush");
  }
  /* Read back at once: part of it is only in the write cache. */
  CHECK (engine_equals (q, shadow, SIZE), "contents from cache (%s)", opts);

  /* Incompressible clusters, partial writes, overwrites of compressed
   * clusters, many in flight at once.
   */
  {
    static uint8_t data[16][65536];
    int res[16];
    for (int i = 0; i < 16; i++) {
      uint64_t off = (uint64_t) (i * 3) << 16;
      size_t len = i % 4 == 0 ? 1000 : 65536;
      if (i % 3 == 0)
        for (size_t k = 0; k < len; k++)
          data[i][k] = (uint8_t) rnd ();
      else
        text_fill (data[i], len, 1000 + (uint64_t) i);
      res[i] = 1;
      CHECK (qcow2_write (q, off + (i % 4 == 0 ? 300 : 0), data[i], len, 0,
                          done_cb, &res[i]) == 0, "submit");
      memcpy (shadow + off + (i % 4 == 0 ? 300 : 0), data[i], len);
    }
    run_until (q, NULL);
    for (int i = 0; i < 16; i++)
      CHECK (res[i] == 0, "write %d: %d", i, res[i]);
  }
  CHECK (engine_equals (q, shadow, SIZE), "contents (%s)", opts);
  CHECK (qcow2_close (q) == 0, "close");
  CHECK (stat (path, &st) == 0 && st.st_size < (12 << 20),
         "packed: %lld bytes for 24 MiB", (long long) st.st_size);
  CHECK (qemu_img_check_clean (path), "check (%s)", opts);
  CHECK (qemu_img_compare (path, shadow, SIZE), "compare (%s)", opts);
  CHECK (shell ("qemu-img check '%s' | grep -Eq "
                "'[1-9][0-9.]*%% compressed clusters'", path) == 0,
         "qemu-img check counts compressed clusters");

  /* Reopened without compression: reads, and overwrites decompress. */
  q = open_image (path, NULL, false);
  CHECK (engine_equals (q, shadow, SIZE), "reopened (%s)", opts);
  text_fill (buf, 5000, 99);
  CHECK (sync_write (q, (5u << 20) + 77, buf, 5000, 0) == 0, "partial");
  memcpy (shadow + (5u << 20) + 77, buf, 5000);
  CHECK (qcow2_close (q) == 0, "close");
  CHECK (qemu_img_check_clean (path), "check after overwrite");
  CHECK (qemu_img_compare (path, shadow, SIZE), "compare after overwrite");
  free (shadow);
  free (buf);
  free (path);
  printf ("ok - %s\n", opts);
}

int
main (void)
{
  require_qemu_img ();
  run ("cw-zlib.qcow2", "cluster_size=65536");
  run ("cw-4k.qcow2", "cluster_size=4096");
#ifdef HAVE_ZSTD
  run ("cw-zstd.qcow2", "compression_type=zstd");
#endif
  return test_exit ();
}
