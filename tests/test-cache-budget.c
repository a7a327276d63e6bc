/* tests/test-cache-budget.c: several images share one metadata-cache
 * budget (qcow2_opts.budget), as a daemon's exports do.
 *
 *   shared        three images (4 KiB, 512-byte and 64 KiB clusters) with
 *                 many requests in flight on each at once, under a budget
 *                 of their minimums and a few tables more: every read
 *                 returns what was written, the budget is never exceeded
 *                 (its own count, its peak, and what the caches hold),
 *                 and the images pass qemu-img check and compare
 *   minimum       a budget of exactly the two images' minimums: both
 *                 still make progress; a third image finds no room
 *                 (ENOBUFS) and opens again once one is closed
 *   cold-gives    a busy image takes the tables of an idle one, which
 *                 keeps at least its minimum and still reads right
 */
#include <config.h>

#include <errno.h>
#include <poll.h>
#include <string.h>

#include "qcow2-testing.h"
#include "testlib.h"

#define BATCH 32

struct img {
  const char *name, *opts;
  uint64_t size;
  char *path;
  struct qcow2 *q;
  uint8_t *shadow;
};

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

static struct qcow2 *
open_budget (const char *path, struct qcow2_cache_budget *b, int *ret)
{
  struct qcow2_opts o = { 0 };
  struct qcow2 *q = NULL;
  char err[256];
  const char *kind = getenv ("QNBD_AIO");

  o.budget = b;
  if (kind && strcmp (kind, "threads") == 0)
    o.aio_mode = QCOW2_AIO_THREADS;
  *ret = qcow2_open (path, &o, &q, err, sizeof err);
  if (*ret < 0 && *ret != -ENOBUFS) {
    fprintf (stderr, "open %s: %s\n", path, err);
    exit (1);
  }
  return *ret < 0 ? NULL : q;
}

/* What an image reserves from a budget when it opens. */
static uint64_t
minimum_of (const char *path)
{
  struct qcow2_cache_budget *b = qcow2_cache_budget_new (1ull << 40);
  uint64_t min;
  int r;
  struct qcow2 *q = open_budget (path, b, &r);

  min = qcow2_cache_budget_used (b);
  CHECK (min > 0, "no reservation");
  CHECK (min == qcow2_testing_budget_peak (b), "I/O at open");
  qcow2_close (q);
  CHECK (qcow2_cache_budget_used (b) == 0, "close gave back %llu",
         (unsigned long long) qcow2_cache_budget_used (b));
  qcow2_cache_budget_free (b);
  return min;
}

static void
make (struct img *im)
{
  im->path = make_image (im->name, im->opts, im->size);
  im->shadow = calloc (1, im->size);
  if (!im->shadow)
    exit (1);
}

/* The budget holds: by its count, and by what the caches hold. */
static void
check_budget (struct qcow2_cache_budget *b, uint64_t total,
              struct img *ims, int n)
{
  uint64_t held = 0;

  for (int i = 0; i < n; i++)
    if (ims[i].q)
      held += qcow2_testing_cache_bytes (ims[i].q);
  CHECK (qcow2_cache_budget_used (b) <= total, "used %llu of %llu",
         (unsigned long long) qcow2_cache_budget_used (b),
         (unsigned long long) total);
  CHECK (held <= qcow2_cache_budget_used (b), "caches hold %llu, budget "
         "counts %llu", (unsigned long long) held,
         (unsigned long long) qcow2_cache_budget_used (b));
}

/* Run every image until nothing is in flight, checking the budget on the
 * way.
 */
static void
run_all (struct qcow2_cache_budget *b, uint64_t total, struct img *ims,
         int n)
{
  for (int spins = 0; ; spins++) {
    struct pollfd p[8];
    unsigned busy = 0;

    for (int i = 0; i < n; i++) {
      qcow2_process (ims[i].q);
      busy += qcow2_in_flight (ims[i].q);
      p[i].fd = qcow2_fd (ims[i].q);
      p[i].events = POLLIN;
    }
    check_budget (b, total, ims, n);
    if (busy == 0)
      return;
    if (spins > 1000000) {
      fprintf (stderr, "run_all: stuck with %u in flight\n", busy);
      exit (1);
    }
    poll (p, (nfds_t) n, 10);
  }
}

static bool
overlaps (const struct op *ops, int n, uint64_t off, uint64_t len)
{
  for (int i = 0; i < n; i++)
    if (off < ops[i].off + ops[i].len && ops[i].off < off + len)
      return true;
  return false;
}

/* Rounds of BATCH non-overlapping writes and BATCH/2 reads of what no
 * write of the round touches on every image at once, checked against the
 * shadows.
 */
static void
random_io (struct qcow2_cache_budget *b, uint64_t total, struct img *ims,
           int n, int rounds, uint64_t max_len)
{
  static struct op w[4][BATCH], r[4][BATCH];

  for (int i = 0; i < n; i++)
    for (int j = 0; j < BATCH; j++)
      if ((!w[i][j].buf && posix_memalign ((void **) &w[i][j].buf, 4096,
                                           256 << 10))
          || (!r[i][j].buf && posix_memalign ((void **) &r[i][j].buf,
                                              4096, 256 << 10)))
        exit (1);
  for (int round = 0; round < rounds; round++) {
    for (int i = 0; i < n; i++) {
      struct img *im = &ims[i];
      for (int j = 0; j < BATCH; j++) {
        uint64_t len, off;
        do {
          len = 1 + rnd () % max_len;
          off = rnd () % (im->size - len);
        } while (overlaps (w[i], j, off, len));
        w[i][j] = (struct op) { off, len, w[i][j].buf, 1 };
        fill_pattern (w[i][j].buf, len, rnd ());
        CHECK (qcow2_write (im->q, off, w[i][j].buf, len, 0, done_cb,
                            &w[i][j].res) == 0, "submit write");
      }
      for (int j = 0; j < BATCH / 2; j++) {
        uint64_t len, off;
        do {
          len = 1 + rnd () % max_len;
          off = rnd () % (im->size - len);
        } while (overlaps (w[i], BATCH, off, len));
        r[i][j] = (struct op) { off, len, r[i][j].buf, 1 };
        CHECK (qcow2_read (im->q, off, r[i][j].buf, len, done_cb,
                           &r[i][j].res) == 0, "submit read");
      }
    }
    run_all (b, total, ims, n);
    for (int i = 0; i < n; i++) {
      for (int j = 0; j < BATCH / 2; j++) {
        CHECK (r[i][j].res == 0, "%s: read: %d", ims[i].name, r[i][j].res);
        CHECK (memcmp (r[i][j].buf, ims[i].shadow + r[i][j].off,
                       r[i][j].len) == 0, "%s: read at %llu", ims[i].name,
               (unsigned long long) r[i][j].off);
      }
      for (int j = 0; j < BATCH; j++) {
        CHECK (w[i][j].res == 0, "%s: write: %d", ims[i].name,
               w[i][j].res);
        memcpy (ims[i].shadow + w[i][j].off, w[i][j].buf, w[i][j].len);
      }
    }
  }
}

static void
finish (struct img *im)
{
  CHECK (engine_equals (im->q, im->shadow, im->size), "%s: contents",
         im->name);
  CHECK (qcow2_close (im->q) == 0, "%s: close", im->name);
  im->q = NULL;
  CHECK (qemu_img_check_clean (im->path), "%s: check", im->name);
  CHECK (qemu_img_compare (im->path, im->shadow, im->size), "%s: compare",
         im->name);
  free (im->shadow);
  free (im->path);
}

static void
shared (const void *arg)
{
  struct img ims[3] = {
    { "b4k.qcow2", "cluster_size=4096", 32 << 20, NULL, NULL, NULL },
    { "b512.qcow2", "cluster_size=512", 4 << 20, NULL, NULL, NULL },
    { "b64k.qcow2", "cluster_size=65536", 256 << 20, NULL, NULL, NULL },
  };
  uint64_t total = 0;
  struct qcow2_cache_budget *b;
  int r;

  (void) arg;
  for (int i = 0; i < 3; i++) {
    make (&ims[i]);
    total += minimum_of (ims[i].path);
  }
  /* Room for a few 4 KiB tables more than the minimums. */
  total += 6 * 4096;
  b = qcow2_cache_budget_new (total);
  for (int i = 0; i < 3; i++)
    ims[i].q = open_budget (ims[i].path, b, &r);
  random_io (b, total, ims, 3, 12, 64 << 10);
  for (int i = 0; i < 3; i++)
    finish (&ims[i]);
  CHECK (qcow2_testing_budget_peak (b) <= total, "peak %llu of %llu",
         (unsigned long long) qcow2_testing_budget_peak (b),
         (unsigned long long) total);
  CHECK (qcow2_cache_budget_used (b) == 0, "closed, still used");
  printf ("shared: budget %llu bytes, peak %llu\n",
          (unsigned long long) total,
          (unsigned long long) qcow2_testing_budget_peak (b));
  qcow2_cache_budget_free (b);
}

static void
minimum (const void *arg)
{
  struct img ims[3] = {
    { "m4k.qcow2", "cluster_size=4096", 64 << 20, NULL, NULL, NULL },
    { "m512.qcow2", "cluster_size=512", 4 << 20, NULL, NULL, NULL },
    { "m3.qcow2", "cluster_size=512", 1 << 20, NULL, NULL, NULL },
  };
  uint64_t total;
  struct qcow2_cache_budget *b;
  int r;

  (void) arg;
  for (int i = 0; i < 3; i++)
    make (&ims[i]);
  total = minimum_of (ims[0].path) + minimum_of (ims[1].path);
  b = qcow2_cache_budget_new (total);
  ims[0].q = open_budget (ims[0].path, b, &r);
  ims[1].q = open_budget (ims[1].path, b, &r);
  CHECK (qcow2_cache_budget_used (b) == total, "minimums");
  CHECK (open_budget (ims[2].path, b, &r) == NULL && r == -ENOBUFS,
         "a third image found room: %d", r);
  random_io (b, total, ims, 2, 8, 32 << 10);
  finish (&ims[1]);
  /* What the closed one reserved is free again. */
  ims[2].q = open_budget (ims[2].path, b, &r);
  CHECK (ims[2].q != NULL, "reopen after a close: %d", r);
  finish (&ims[0]);
  if (ims[2].q)
    finish (&ims[2]);
  CHECK (qcow2_testing_budget_peak (b) <= total, "peak");
  qcow2_cache_budget_free (b);
}

static void
read_all (struct qcow2_cache_budget *b, uint64_t total, struct img *ims,
          int n, int which, uint64_t step)
{
  static uint8_t buf[4096];

  for (uint64_t off = 0; off < ims[which].size; off += step) {
    int res = 1;
    CHECK (qcow2_read (ims[which].q, off, buf, sizeof buf, done_cb,
                       &res) == 0, "submit");
    run_all (b, total, ims, n);
    CHECK (res == 0 && memcmp (buf, ims[which].shadow + off, sizeof buf)
           == 0, "%s: read at %llu", ims[which].name,
           (unsigned long long) off);
  }
}

static void
cold_gives (const void *arg)
{
  /* 4 KiB clusters: one L2 table (a 4 KiB entry) maps 2 MiB. */
  struct img ims[2] = {
    { "cold.qcow2", "cluster_size=4096", 64 << 20, NULL, NULL, NULL },
    { "busy.qcow2", "cluster_size=4096", 64 << 20, NULL, NULL, NULL },
  };
  uint64_t total, cold_full, min;
  struct qcow2_cache_budget *b;
  int r;

  (void) arg;
  for (int i = 0; i < 2; i++) {
    make (&ims[i]);
    /* A table for every 2 MiB. */
    for (uint64_t off = 0; off < ims[i].size; off += 2 << 20)
      ims[i].shadow[off] = (uint8_t) (1 + i);
  }
  for (int i = 0; i < 2; i++) {
    struct qcow2 *q = open_image (ims[i].path, NULL, false);
    for (uint64_t off = 0; off < ims[i].size; off += 2 << 20)
      CHECK (sync_write (q, off, ims[i].shadow + off, 1, 0) == 0, "fill");
    qcow2_close (q);
  }
  min = minimum_of (ims[0].path);
  /* Both minimums and 24 tables more: the cold image takes them all. */
  total = 2 * min + 24 * (4096 + 512);
  b = qcow2_cache_budget_new (total);
  for (int i = 0; i < 2; i++)
    ims[i].q = open_budget (ims[i].path, b, &r);
  read_all (b, total, ims, 2, 0, 2 << 20);
  cold_full = qcow2_testing_cache_bytes (ims[0].q);
  CHECK (cold_full > min, "the first image did not grow: %llu",
         (unsigned long long) cold_full);
  read_all (b, total, ims, 2, 1, 2 << 20);
  read_all (b, total, ims, 2, 1, 2 << 20);
  CHECK (qcow2_testing_cache_bytes (ims[1].q) > min, "the busy image did "
         "not grow: %llu", (unsigned long long)
         qcow2_testing_cache_bytes (ims[1].q));
  CHECK (qcow2_testing_cache_bytes (ims[0].q) < cold_full, "the idle image "
         "kept its %llu bytes", (unsigned long long) cold_full);
  read_all (b, total, ims, 2, 0, 2 << 20);
  for (int i = 0; i < 2; i++)
    finish (&ims[i]);
  qcow2_cache_budget_free (b);
}

int
main (int argc, char **argv)
{
  static const struct test_case cases[] = {
    { "shared", shared, NULL },
    { "minimum", minimum, NULL },
    { "cold-gives", cold_gives, NULL },
  };

  require_qemu_img ();
  return run_cases (argc, argv, cases, sizeof cases / sizeof cases[0]);
}
