/* tests/test-concurrent-random.c: many requests in flight at once on real
 * I/O, with an L2 cache far smaller than the disk, so that requests wait for
 * free slots, dirty tables are cleaned by flushes they trigger, and
 * allocations into the same tables and clusters overlap in time.  Within a
 * batch writes never overlap each other (their order would be undefined);
 * reads run alongside.  The result must match a shadow copy and pass
 * qemu-img check and compare.
 */
#include <config.h>

#include <string.h>

#include "testlib.h"

#define BATCH 64

struct op {
  uint64_t off, len;
  uint8_t *buf;
  int res;
};

static void
done_cb (void *opaque, int ret)
{
  *(int *) opaque = ret;
}

static bool
overlaps (const struct op *ops, int n, uint64_t off, uint64_t len)
{
  for (int i = 0; i < n; i++)
    if (off < ops[i].off + ops[i].len && ops[i].off < off + len)
      return true;
  return false;
}

static void
run_path (char *path, const char *opts, uint64_t size, uint64_t cache)
{
  struct qcow2_opts o = { 0 };
  struct op w[BATCH], r[BATCH];
  uint8_t *shadow = calloc (1, size);
  char err[256];
  struct qcow2 *q;

  o.l2_cache_bytes = cache;
  if (getenv ("QNBD_AIO") && strcmp (getenv ("QNBD_AIO"), "threads") == 0)
    o.aio_mode = QCOW2_AIO_THREADS;
  if (qcow2_open (path, &o, &q, err, sizeof err) < 0) {
    fprintf (stderr, "open: %s\n", err);
    exit (1);
  }
  for (int i = 0; i < BATCH; i++)
    if (posix_memalign ((void **) &w[i].buf, 4096, 256 << 10)
        || posix_memalign ((void **) &r[i].buf, 4096, 256 << 10))
      exit (1);

  for (int batch = 0; batch < 25; batch++) {
    int nw = 0, nr = 0, fres = 1;
    while (nw < BATCH) {
      uint64_t len = 1 + rnd () % (batch % 2 ? 256 << 10 : 9000);
      uint64_t off = rnd () % (size - len);
      if (overlaps (w, nw, off, len))
        continue;
      w[nw].off = off;
      w[nw].len = len;
      w[nw].res = 1;
      fill_pattern (w[nw].buf, len, (uint64_t) batch * 1000 + (uint64_t) nw);
      CHECK (qcow2_write (q, off, w[nw].buf, len,
                          nw % 13 == 0 ? QCOW2_WRITE_FUA : 0, done_cb,
                          &w[nw].res) == 0, "submit");
      nw++;
      if (nw == BATCH / 2)
        CHECK (qcow2_flush (q, done_cb, &fres) == 0, "flush");
    }
    /* Reads of ranges no write of this batch touches. */
    while (nr < BATCH / 2) {
      uint64_t len = 1 + rnd () % (128 << 10);
      uint64_t off = rnd () % (size - len);
      if (overlaps (w, nw, off, len))
        continue;
      r[nr].off = off;
      r[nr].len = len;
      r[nr].res = 1;
      CHECK (qcow2_read (q, off, r[nr].buf, len, done_cb, &r[nr].res) == 0,
             "submit read");
      nr++;
    }
    run_until (q, NULL);
    CHECK (fres == 0, "flush result %d", fres);
    for (int i = 0; i < nr; i++) {
      CHECK (r[i].res == 0, "read %d: %d", i, r[i].res);
      CHECK (memcmp (r[i].buf, shadow + r[i].off, r[i].len) == 0,
             "read %d data at %llu", i, (unsigned long long) r[i].off);
    }
    for (int i = 0; i < nw; i++) {
      CHECK (w[i].res == 0, "write %d: %d", i, w[i].res);
      memcpy (shadow + w[i].off, w[i].buf, w[i].len);
    }
  }
  CHECK (engine_equals (q, shadow, size), "contents (%s)", opts);
  CHECK (qcow2_close (q) == 0, "close");
  CHECK (qemu_img_check_clean (path), "check (%s)", opts);
  CHECK (qemu_img_compare (path, shadow, size), "compare (%s)", opts);
  for (int i = 0; i < BATCH; i++) {
    free (w[i].buf);
    free (r[i].buf);
  }
  free (shadow);
  free (path);
  printf ("ok - %s, L2 cache %llu bytes\n", opts,
          (unsigned long long) cache);
}

static void
run (const char *name, const char *opts, uint64_t size, uint64_t cache)
{
  run_path (make_image (name, opts, size), opts, size, cache);
}

/* An image the engine made with every cluster preallocated (qnbd-img
 * create -o preallocation=metadata): writes land in place, none allocates.
 */
static void
run_prealloc (const char *name, uint32_t cluster, uint64_t size,
              uint64_t cache)
{
  struct qcow2_create_opts co = {
    .size = size, .cluster_size = cluster,
    .prealloc = QCOW2_PREALLOC_METADATA,
  };
  char opts[64];

  snprintf (opts, sizeof opts, "cluster_size=%u,preallocation=metadata",
            cluster);
  run_path (create_image (name, &co), opts, size, cache);
}

int
main (void)
{
  require_qemu_img ();
  /* 4 KiB clusters: a table maps 2 MiB, 64 MiB needs 32, the cache has 16. */
  run ("conc-4k.qcow2", "cluster_size=4096", 64 << 20, 16 * 4096);
  /* 512-byte clusters: tables map 32 KiB; lots of tables and refblocks. */
  run ("conc-512.qcow2", "cluster_size=512", 8 << 20, 16 * 512);
  run ("conc-64k.qcow2", "cluster_size=65536", 128 << 20, 0);
  run_prealloc ("conc-prealloc-4k.qcow2", 4096, 64 << 20, 16 * 4096);
  run_prealloc ("conc-prealloc-64k.qcow2", 65536, 128 << 20, 0);
  return test_exit ();
}
