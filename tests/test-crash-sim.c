/* tests/test-crash-sim.c: crash consistency, by simulated power loss.
 *
 * For each kind of image below, a random workload runs through the engine
 * on the fake backend, with its I/O held and released in random order (so
 * that writes complete out of order) and recorded with their data.  Then
 * tests/crash-sim.c builds the images a power loss could leave at many
 * points of the run (everything before the last completed fdatasync, plus
 * any subset of what ran after it, torn or not) and checks each: qemu-img
 * check finds no corruption (leaks are allowed), lazy_refcounts images are
 * repaired by the engine at open, and every sector reads back as the guest
 * may expect: what was acknowledged before a completed flush (or written
 * with FUA) is there, and nothing older or made-up is.
 *
 * The workload: allocating writes across many L2 tables, partial-cluster
 * writes, overwrites, new L2 tables, refcount table growth (512-byte
 * clusters with 64-bit refcounts), write-zeroes (with and without
 * NO_HOLE), discards, flushes, FUA writes, reads, writes into compressed
 * clusters (an image from qemu-img convert -c), copy-on-write from a
 * backing file (v3 and v2), clusters shared with an internal snapshot,
 * images the engine made with every cluster preallocated (prealloc*),
 * lazy refcounts, the compressed write cache (opts.compress), and writes
 * and syncs the backend refuses to queue (c4k-refused); a small L2 cache
 * makes evictions start flushes of their own.  Every 25th crash
 * image is also opened read-write, written, closed and checked again
 * ("carried on"), as a server restarted after the power loss would.
 *
 * Before the random part, directed cases replay, step by step, orderings
 * the simulator found wrong (repro_* below).
 *
 * Environment:
 *   CRASH_STATES    how many crash states to judge in all (default 2000;
 *                   "make check-crash" runs 100000).  Each costs a qemu-img
 *                   check (10 ms with 4 KiB clusters, 30-130 ms with 512
 *                   bytes: it walks every cluster of the file, which the
 *                   engine grows 64 MiB ahead) and an engine open and read.
 *   CRASH_SEED      seed of the workloads and of the choice of states
 *   CRASH_SCENARIO  run only the scenario of that name
 *   CRASH_POINT     judge only that crash point (k, as in the reports)
 *   CRASH_KEEP_DIR  copy every failing crash image there
 *   CRASH_AVOID_ZERO_RACE  keep discards and write-zeroes apart from the
 *                   requests in flight (repro_discard_overtaken shows why)
 *   CRASH_CARRY_ON  every how many states the crash image is also opened
 *                   read-write, written, closed and checked (default 25;
 *                   0: never)
 */
#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <string.h>
#include <syslog.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>

#include "aio-fake.h"
#include "crash-sim.h"
#include "qcow2-testing.h"
#include "testlib.h"

enum base_kind {
  PLAIN,                        /* qemu-img create */
  COMPRESSED,                   /* qemu-img convert -c of initial data */
  BACKING,                      /* an empty overlay of a raw backing file */
  SNAPSHOT,                     /* initial data, then an internal snapshot */
  PREALLOC,                     /* qcow2_create, preallocation=metadata:
                                   every cluster allocated, none written */
};

struct scenario {
  const char *name;
  enum base_kind base;
  const char *opts;             /* qemu-img -o options */
  uint64_t size;
  uint32_t cluster;
  bool lazy;
  bool compress;                /* opts.compress (compressed write cache) */
  bool v2_backing;              /* discarded clusters show the backing */
  uint64_t l2_cache;            /* bytes; 0: the engine's default */
  unsigned nreq;                /* guest requests per workload */
  unsigned max_len;             /* longest write, bytes */
  unsigned weight;              /* share of the crash states (qemu-img
                                   check is slow on c512-lazy's images) */
  uint32_t subcluster;          /* extended L2: what a discard releases */
  unsigned refuse;              /* per 1000 requests: a write or fdatasync
                                   submission refused (EAGAIN) soon after */
  uint64_t budget;              /* bytes of a metadata-cache budget shared
                                   with a busy neighbour image; 0: none */
};

static const struct scenario scenarios[] = {
  /* Many L2 tables (each covers 32 KiB), a 16-entry L2 cache, refcount
   * blocks of 64 entries and a one-cluster refcount table that must grow.
   */
  { "c512-refgrow", PLAIN, "cluster_size=512,refcount_bits=64", 8 << 20,
    512, false, false, false, 16 * 512, 700, 24 << 10, 4, 0, 0, 0 },
  { "c4k", PLAIN, "cluster_size=4096", 8 << 20, 4096, false, false, false,
    0, 500, 64 << 10, 6, 0, 0, 0 },
  { "c4k-lazy", PLAIN, "cluster_size=4096,lazy_refcounts=on", 8 << 20,
    4096, true, false, false, 0, 400, 64 << 10, 4, 0, 0, 0 },
  { "c512-lazy", PLAIN,
    "cluster_size=512,lazy_refcounts=on,refcount_bits=64", 8 << 20, 512,
    true, false, false, 16 * 512, 600, 24 << 10, 1, 0, 0, 0 },
  { "compressed-zlib", COMPRESSED, "cluster_size=4096", 8 << 20, 4096,
    false, false, false, 0, 400, 32 << 10, 4, 0, 0, 0 },
#ifdef HAVE_ZSTD
  { "compressed-zstd", COMPRESSED,
    "cluster_size=4096,compression_type=zstd", 4 << 20, 4096, false, false,
    false, 0, 250, 32 << 10, 2, 0, 0, 0 },
#endif
  { "backing-v3", BACKING, "cluster_size=4096", 8 << 20, 4096, false,
    false, false, 0, 400, 32 << 10, 4, 0, 0, 0 },
  { "backing-v2", BACKING, "cluster_size=4096,compat=0.10", 8 << 20, 4096,
    false, false, true, 0, 300, 32 << 10, 2, 0, 0, 0 },
  /* Every L2 table (32 KiB of disk each) is shared with the snapshot and
   * copied at its first write.
   */
  { "snapshot", SNAPSHOT, "cluster_size=512", 4 << 20, 512, false, false,
    false, 16 * 512, 400, 16 << 10, 2, 0, 0, 0 },
  { "compress-cache", PLAIN, "cluster_size=4096", 8 << 20, 4096, false,
    true, false, 0, 400, 32 << 10, 2, 0, 0, 0 },
  /* A 32 KiB disk: discards, write-zeroes and overwrites often drop every
   * compressed cluster packed so far into the open packing cluster (which
   * must not be freed while later ones are packed into it).
   */
  { "compress-trim", PLAIN, "cluster_size=4096", 32 << 10, 4096, false,
    true, false, 0, 400, 16 << 10, 2, 0, 0, 0 },
  { "compress-trim-lazy", PLAIN, "cluster_size=4096,lazy_refcounts=on",
    32 << 10, 4096, true, true, false, 0, 300, 16 << 10, 1, 0, 0, 0 },
  /* 64 KiB clusters: L2 tables cached and written in 4 KiB slices, with
   * several slices (each maps 32 MiB) of one table.
   */
  { "c64k-slices", PLAIN, "cluster_size=65536", 128 << 20, 65536, false,
    false, false, 16 * 4096, 400, 128 << 10, 3, 0, 0, 0 },
  /* Subclusters: 512 bytes, and 1 KiB over a backing file. */
  { "extl2", PLAIN, "cluster_size=16384,extended_l2=on", 8 << 20, 16384,
    false, false, false, 0, 400, 64 << 10, 3, 512, 0, 0 },
  { "extl2-backing", BACKING, "cluster_size=32768,extended_l2=on", 8 << 20,
    32768, false, false, false, 0, 400, 64 << 10, 3, 1024, 0, 0 },
  { "extl2-lazy", PLAIN,
    "cluster_size=16384,extended_l2=on,lazy_refcounts=on", 8 << 20, 16384,
    true, false, false, 0, 300, 64 << 10, 2, 512, 0, 0 },
  /* The backend now and then refuses to queue a write or an fdatasync
   * (as io_uring does with a full ring): the request or flush that needed
   * it fails, nothing that flush covered may be lost, and what it left
   * dirty is written by the next.
   */
  { "c4k-refused", PLAIN, "cluster_size=4096", 8 << 20, 4096, false, false,
    false, 16 * 4096, 400, 64 << 10, 2, 0, 30, 0 },
  /* A 64 KiB budget shared with another image (4 KiB clusters, 128 L2
   * tables) that a neighbour keeps writing: this one (256 tables) holds
   * its reservation and what is left, the neighbour's growth takes clean
   * tables from it, which it must then read again, and its dirty victims
   * are still cleaned by the flusher.
   */
  { "c512-budget", PLAIN, "cluster_size=512", 8 << 20, 512, false, false,
    false, 0, 500, 24 << 10, 2, 0, 0, 64 << 10 },
  /* Made by the engine (qnbd-img create -o preallocation=metadata): writes
   * need no allocation, discards and write-zeroes free clusters that later
   * writes allocate again.  (opts: for the reports only.)
   */
  { "prealloc", PREALLOC, "cluster_size=4096,preallocation=metadata",
    8 << 20, 4096, false, false, false, 16 * 4096, 400, 64 << 10, 2, 0, 0,
    0 },
  { "prealloc-lazy", PREALLOC,
    "cluster_size=16384,lazy_refcounts=on,preallocation=metadata", 8 << 20,
    16384, true, false, false, 0, 300, 64 << 10, 1, 0, 0, 0 },
};

/* ---- the workload ---- */

struct wl {
  const struct scenario *sc;
  struct qcow2 *q;
  struct aio *a;
  struct cs *cs;
  uint64_t rng;
  unsigned in_flight;
  unsigned errors;
  unsigned refusals;            /* submissions the backend was told to
                                   refuse */
  unsigned failed;              /* requests that failed because of them */
  unsigned grown;               /* "refcount table grown" messages */
  uint64_t recent[16];          /* offsets of recent writes, for overwrites */
  unsigned nrecent;
  /* With CRASH_AVOID_ZERO_RACE: the clusters of the discards and
   * write-zeroes in flight, which no other request may touch (to look for
   * bugs other than the one repro_discard_overtaken shows).
   */
  bool avoid_zero_race;
  struct gop *zeroing[64];
  unsigned nzeroing;
  struct qcow2 *nb;             /* the neighbour sharing the budget */
  uint64_t nb_size;
  unsigned nb_took;             /* times it took tables from this image */
};

struct gop {
  struct wl *w;
  unsigned id;                  /* crash-sim id; 0 for reads */
  void *buf;
  const char *what;
  uint64_t off, len;
};

static uint64_t
wrand (struct wl *w)
{
  w->rng ^= w->rng << 13;
  w->rng ^= w->rng >> 7;
  w->rng ^= w->rng << 17;
  return w->rng;
}

static void
wl_log (void *opaque, int level, const char *msg)
{
  struct wl *w = opaque;
  if (strstr (msg, "refcount table grown"))
    w->grown++;
  if (level <= LOG_ERR) {
    w->errors++;
    fprintf (stderr, "engine: %s\n", msg);
  }
  else if (getenv ("TEST_VERBOSE"))
    fprintf (stderr, "engine: %s\n", msg);
}

static void
gop_done (void *opaque, int ret)
{
  struct gop *g = opaque;
  struct wl *w = g->w;

  if (g->id)
    cs_ack (w->cs, g->id, ret);
  for (unsigned i = 0; i < w->nzeroing; i++)
    if (w->zeroing[i] == g)
      w->zeroing[i] = w->zeroing[--w->nzeroing];
  if (ret == -EAGAIN && w->sc->refuse)
    w->failed++;
  else
    CHECK (ret == 0, "%s: %s failed: %s", w->sc->name, g->what,
           strerror (-ret));
  w->in_flight--;
  free (g->buf);
  free (g);
}

/* An offset for a request of len bytes: near a recent write (overwrites,
 * partial clusters next to allocated ones), or anywhere.
 */
static uint64_t
pick_offset (struct wl *w, uint64_t len)
{
  uint64_t size = w->sc->size, off;

  if (w->nrecent && wrand (w) % 100 < 40) {
    off = w->recent[wrand (w) % (w->nrecent < 16 ? w->nrecent : 16)];
    off += (wrand (w) % 17) * 512;
    off -= off >= 8 * 512 ? 8 * 512 : off;
  }
  else
    off = wrand (w) % (size / 512) * 512;
  if (off + len > size)
    off = size - len;
  return off;
}

/* Whether [off, off+len) shares a cluster with a discard or write-zeroes
 * in flight (only when avoiding that race).
 */
static bool
zero_race (struct wl *w, uint64_t off, uint64_t len)
{
  uint64_t cs = w->sc->cluster;
  if (!w->avoid_zero_race)
    return false;
  for (unsigned i = 0; i < w->nzeroing; i++) {
    const struct gop *z = w->zeroing[i];
    if (off / cs <= (z->off + z->len - 1) / cs
        && z->off / cs <= (off + len - 1) / cs)
      return true;
  }
  return false;
}

static void
submit_one (struct wl *w)
{
  const struct scenario *sc = w->sc;
  struct gop *g = calloc (1, sizeof *g);
  unsigned roll = (unsigned) (wrand (w) % 100);
  uint64_t len = 0, off = 0;
  int r;

  if (!g)
    exit (1);
  g->w = w;
  if (w->avoid_zero_race && roll >= 7 && roll < 20) {
    /* Keep discards and write-zeroes apart from each other, and later
     * requests apart from them.
     */
    bool found = false;
    for (int tries = 0; tries < 8 && !found; tries++) {
      len = (1 + wrand (w) % (8 * sc->cluster / 512)) * 512;
      off = pick_offset (w, len);
      found = !zero_race (w, off, len) && w->nzeroing < 64;
    }
    if (found) {
      g->off = off;
      g->len = len;
    }
    else
      roll = 25;                /* no luck: a write instead */
  }
  if (roll < 7) {
    g->what = "flush";
    g->id = cs_submit_flush (w->cs);
    r = qcow2_flush (w->q, gop_done, g);
  }
  else if (roll < 14) {
    unsigned flags = 0;
    if (!w->avoid_zero_race) {
      len = (1 + wrand (w) % (8 * sc->cluster / 512)) * 512;
      off = pick_offset (w, len);
    }
    if (wrand (w) % 100 < 30)
      flags |= QCOW2_ZERO_NO_HOLE;
    if (wrand (w) % 100 < 10)
      flags |= QCOW2_WRITE_FUA;
    g->what = "write-zeroes";
    g->id = cs_submit (w->cs, CS_ZERO, off, len, flags & QCOW2_WRITE_FUA);
    r = qcow2_write_zeroes (w->q, off, len, flags, gop_done, g);
  }
  else if (roll < 20) {
    if (!w->avoid_zero_race) {
      len = (1 + wrand (w) % (8 * sc->cluster / 512)) * 512;
      off = pick_offset (w, len);
    }
    g->what = "discard";
    g->id = cs_submit (w->cs, CS_DISCARD, off, len, false);
    r = qcow2_discard (w->q, off, len, gop_done, g);
  }
  else if (roll < 25) {
    len = (1 + wrand (w) % (sc->max_len / 512)) * 512;
    off = pick_offset (w, len);
    g->what = "read";
    g->buf = malloc (len);
    if (!g->buf)
      exit (1);
    r = qcow2_read (w->q, off, g->buf, len, gop_done, g);
  }
  else {
    bool fua = wrand (w) % 100 < 8;
    if (sc->compress && wrand (w) % 2) {
      /* Whole clusters, which the compressed write cache takes. */
      len = (1 + wrand (w) % 4) * (uint64_t) sc->cluster;
      off = wrand (w) % ((sc->size - len) / sc->cluster + 1) * sc->cluster;
    }
    else {
      len = (1 + wrand (w) % (sc->max_len / 512)) * 512;
      off = pick_offset (w, len);
    }
    for (int tries = 0; tries < 8 && zero_race (w, off, len); tries++)
      off = wrand (w) % ((sc->size - len) / 512 + 1) * 512;
    if (zero_race (w, off, len)) {
      free (g);
      return;
    }
    g->what = fua ? "FUA write" : "write";
    g->id = cs_submit (w->cs, CS_WRITE, off, len, fua);
    g->buf = malloc (len);
    if (!g->buf)
      exit (1);
    cs_fill (g->id, off, len, g->buf);
    w->recent[w->nrecent++ % 16] = off;
    r = qcow2_write (w->q, off, g->buf, len, fua ? QCOW2_WRITE_FUA : 0,
                     gop_done, g);
  }
  if (r < 0) {
    CHECK (0, "%s: %s refused: %s", sc->name, g->what, strerror (-r));
    if (g->id)
      cs_cancel (w->cs, g->id);
    free (g->buf);
    free (g);
    return;
  }
  if (g->len)
    w->zeroing[w->nzeroing++] = g;
  w->in_flight++;
}

/* Run the workload with hold on: requests are submitted while the I/O of
 * earlier ones is held, and held ops run in a random order.
 */
/* The neighbour writes a block of its disk and reads it back, on real
 * I/O, so that its caches grow into the shared budget.
 */
static void
neighbour_io (struct wl *w)
{
  static uint8_t buf[4096], back[4096];
  uint64_t off = (wrand (w) % (w->nb_size / sizeof buf)) * sizeof buf;

  uint64_t before = qcow2_testing_cache_bytes (w->q);

  fill_pattern (buf, sizeof buf, off);
  CHECK (sync_write (w->nb, off, buf, sizeof buf, 0) == 0
         && sync_read (w->nb, off, back, sizeof back) == 0
         && memcmp (buf, back, sizeof buf) == 0,
         "%s: the neighbour at %" PRIu64, w->sc->name, off);
  if (qcow2_testing_cache_bytes (w->q) < before)
    w->nb_took++;
}

static void
run_workload (struct wl *w)
{
  unsigned submitted = 0, stuck = 0;
  unsigned maxq = 1 + (unsigned) (wrand (w) % 12);

  aio_fake_set_hold (w->a, true);
  while (submitted < w->sc->nreq || w->in_flight > 0) {
    unsigned roll = (unsigned) (wrand (w) % 100);
    unsigned held = aio_fake_held (w->a);

    if (submitted < w->sc->nreq && w->in_flight < maxq
        && (roll < 45 || held == 0)) {
      if (w->sc->refuse && wrand (w) % 1000 < w->sc->refuse) {
        enum aio_op_type type = wrand (w) % 3 ? AIO_WRITE : AIO_FSYNC;
        aio_fake_refuse_submit (w->a, type, (unsigned) (wrand (w) % 8),
                                EAGAIN);
        w->refusals++;
      }
      submit_one (w);
      submitted++;
      if (wrand (w) % 50 == 0)
        maxq = 1 + (unsigned) (wrand (w) % 12);
    }
    else if (held > 0) {
      unsigned how = (unsigned) (wrand (w) % 100);
      if (how < 4)
        aio_fake_release_all (w->a, wrand (w) % 2);
      else if (how < 30)
        aio_fake_release (w->a, 0);
      else
        aio_fake_release (w->a, (unsigned) (wrand (w) % held));
    }
    if (w->nb && wrand (w) % 4 == 0)
      neighbour_io (w);
    qcow2_process (w->q);
    if (aio_fake_held (w->a) == 0 && w->in_flight > 0
        && submitted >= w->sc->nreq) {
      if (++stuck > 1000) {
        fprintf (stderr, "%s: workload stuck with %u requests in flight\n",
                 w->sc->name, w->in_flight);
        exit (1);
      }
    }
    else
      stuck = 0;
  }
  aio_fake_set_hold (w->a, false);
  aio_fake_release_all (w->a, false);
  run_until (w->q, NULL);
}

/* ---- images ---- */

/* The initial contents of the prepared images: data in most clusters,
 * holes in some, all compressible.
 */
static void
write_initial_raw (const char *path, uint64_t size, uint32_t cluster)
{
  FILE *f = fopen (path, "w");
  uint8_t *buf = malloc (cluster);

  if (!f || !buf)
    exit (1);
  for (uint64_t off = 0; off < size; off += cluster) {
    if ((off / cluster) % 5 == 3)
      memset (buf, 0, cluster);
    else
      cs_fill (0, off, cluster, buf);
    if (fwrite (buf, 1, cluster, f) != cluster)
      exit (1);
  }
  if (fclose (f) != 0)
    exit (1);
  free (buf);
}

static char *
make_scenario_image (const struct scenario *sc, unsigned round)
{
  char *path, raw[600];

  if (asprintf (&path, "%s/%s-%u.qcow2", test_dir (), sc->name, round) < 0)
    exit (1);
  snprintf (raw, sizeof raw, "%s/%s-%u.raw", test_dir (), sc->name, round);
  switch (sc->base) {
  case PLAIN:
    free (path);
    snprintf (raw, sizeof raw, "%s-%u.qcow2", sc->name, round);
    return make_image (raw, sc->opts, sc->size);
  case COMPRESSED:
    write_initial_raw (raw, sc->size, sc->cluster);
    if (shell ("qemu-img convert -q -c -f raw -O qcow2 -o %s '%s' '%s'",
               sc->opts, raw, path) != 0)
      exit (1);
    break;
  case PREALLOC: {
    struct qcow2_create_opts co = {
      .size = sc->size, .cluster_size = sc->cluster,
      .lazy_refcounts = sc->lazy, .prealloc = QCOW2_PREALLOC_METADATA,
    };
    free (path);
    snprintf (raw, sizeof raw, "%s-%u.qcow2", sc->name, round);
    return create_image (raw, &co);
  }
  case SNAPSHOT:
    write_initial_raw (raw, sc->size, sc->cluster);
    if (shell ("qemu-img convert -q -f raw -O qcow2 -o %s '%s' '%s'",
               sc->opts, raw, path) != 0
        || shell ("qemu-img snapshot -c before '%s'", path) != 0)
      exit (1);
    break;
  case BACKING:
    write_initial_raw (raw, sc->size, sc->cluster);
    /* Relative to the overlay, as the engine resolves it. */
    if (shell ("qemu-img create -q -f qcow2 -o %s -b '%s-%u.raw' -F raw "
               "'%s' %" PRIu64, sc->opts, sc->name, round, path,
               sc->size) != 0)
      exit (1);
    break;
  }
  return path;
}

/* ---- a directed case: a refcount made durable before its data ---- */

static void
int_done (void *opaque, int ret)
{
  *(int *) opaque = ret;
}

/* A flush makes the refcount of a newly allocated cluster durable while
 * the data write into it is still in flight (allocations are counted at
 * the next flush, linked only when their data is written).  Power is
 * lost before the data write reaches the file.  If the file ends before
 * that cluster, the crash image has a cluster with refcount 1 past its
 * end, which is only a leak.  But the next read-write open starts
 * allocating at the end of the file (alloc_end = file size), hands out
 * that cluster again and increments its refcount to 2, while one L2 entry
 * with COPIED points at it: qemu-img check reports "ERROR OFLAG_COPIED
 * data cluster ... refcount=2".
 *
 * The engine keeps the file grown well ahead of its allocations
 * (qcow2-space.c), which hides this as long as the step it grows by fits;
 * here it does not (EFBIG under a file size limit, SIGXFSZ ignored), as on
 * a file system nearly full, and the file grows by just what the
 * allocation reserves.
 */
static void
repro_refcount_past_eof (void)
{
  const uint64_t cs = 4096;
  struct qcow2_opts o = { 0 };
  struct aio *a;
  struct qcow2 *q;
  char err[256], crash[600];
  uint8_t *buf;
  uint64_t data_host = 0;
  int wres = 1, fres = 1, r;
  char *path = make_image ("repro-eof.qcow2", "cluster_size=4096", 1 << 20);

  struct rlimit old_lim, lim;
  struct stat st;

  snprintf (crash, sizeof crash, "%s/repro-eof-crash.qcow2", test_dir ());
  if (aio_fake_create (&a) < 0 || posix_memalign ((void **) &buf, 4096, cs))
    exit (1);
  o.aio = a;
  if (qcow2_open (path, &o, &q, err, sizeof err) < 0) {
    fprintf (stderr, "open: %s\n", err);
    exit (1);
  }
  memset (buf, 0xab, cs);

  /* The file may grow by what one allocation reserves (the data cluster,
   * the new L2 table, and room for refcount blocks and a larger refcount
   * table), but not by a whole step.
   */
  signal (SIGXFSZ, SIG_IGN);
  if (stat (path, &st) < 0 || getrlimit (RLIMIT_FSIZE, &old_lim) < 0)
    exit (1);
  lim = old_lim;
  lim.rlim_cur = (rlim_t) round_up ((uint64_t) st.st_size, cs) + 16 * cs;
  if (setrlimit (RLIMIT_FSIZE, &lim) < 0)
    exit (1);

  /* An allocating write; its data write is held. */
  aio_fake_set_hold (a, true);
  r = qcow2_write (q, 0, buf, cs, 0, int_done, &wres);
  CHECK (r == 0 && aio_fake_held (a) == 1, "write submitted");
  {
    struct aio_fake_record rec;
    if (aio_fake_held_info (a, 0, &rec) == 0)
      data_host = rec.offset;
  }
  /* A flush runs to completion meanwhile: every op but the data write. */
  r = qcow2_flush (q, int_done, &fres);
  CHECK (r == 0, "flush submitted");
  for (int spins = 0; fres == 1 && spins < 1000; spins++) {
    for (unsigned i = 0; i < aio_fake_held (a);) {
      struct aio_fake_record rec;
      aio_fake_held_info (a, i, &rec);
      if (rec.type == AIO_WRITE && rec.offset == data_host)
        i++;
      else
        aio_fake_release (a, i);
    }
    qcow2_process (q);
  }
  CHECK (fres == 0 && wres == 1, "the flush completed (%d) while the data "
         "write is held (%d)", fres, wres);

  /* Power loss now: the file as it is, without the data write. */
  setrlimit (RLIMIT_FSIZE, &old_lim);
  CHECK (shell ("cp '%s' '%s'", path, crash) == 0, "copy");
  aio_fake_set_hold (a, false);
  aio_fake_release_all (a, false);
  run_until (q, &wres);
  qcow2_close (q);
  aio_destroy (a);

  r = shell ("qemu-img check -q '%s' >/dev/null 2>&1", crash);
  CHECK (r == 0 || r == 3, "the crash image: qemu-img check exited %d", r);

  /* Carry on after the crash: one more allocating write. */
  q = open_image (crash, NULL, false);
  CHECK (sync_write (q, 64 << 10, buf, cs, 0) == 0, "write after crash");
  CHECK (qcow2_close (q) == 0, "close after crash");
  r = shell ("qemu-img check -q '%s' >/dev/null 2>&1", crash);
  if (r != 0 && r != 3) {
    fprintf (stderr, "FAIL: cluster 0x%" PRIx64 " got refcount 1 from a "
             "flush while its data write was in flight; after a crash "
             "before that write, the image ends before it, and a write "
             "after reopening allocated it again:\n", data_host);
    shell ("qemu-img check '%s' >&2", crash);
  }
  CHECK (r == 0 || r == 3, "reusing a cluster past the end of a crashed "
         "image: qemu-img check exited %d", r);
  printf ("%s - directed: refcount durable before data, crash, reopen, "
          "write\n", r == 0 || r == 3 ? "ok" : "not ok");
  free (buf);
  free (path);
}

/* ---- a directed case: a discard overtaken by a copy-on-write ---- */

/* A discard (or write-zeroes) that reaches its L2 table while a flush is
 * running parks on the flush barrier after its overlap check.  A write
 * into the same cluster submitted after it does not wait for it: it plans
 * its copy-on-write from the old contents (here the backing file) at
 * once.  When the flush ends the discard sets the zero flag, and then the
 * write links its new cluster over it, carrying the old data into the
 * part of the cluster it did not write.  Whatever order the two took, the
 * rest of the cluster must read as zeros.
 */
static void
repro_discard_overtaken (bool discard)
{
  const uint64_t cs = 4096, x = 64 << 10;
  struct qcow2_opts o = { 0 };
  struct aio *a;
  struct qcow2 *q;
  char err[256], *path, raw[600];
  const char *what = discard ? "discard" : "write-zeroes";
  uint8_t *buf, *got, *base;
  int fres = 1, dres = 1, wres = 1, r;
  FILE *f;

  if (posix_memalign ((void **) &buf, 4096, cs)
      || posix_memalign ((void **) &got, 4096, cs) || !(base = malloc (1 << 20)))
    exit (1);
  snprintf (raw, sizeof raw, "%s/repro-overtaken-%d.raw", test_dir (),
            discard);
  fill_pattern (base, 1 << 20, 5);
  f = fopen (raw, "w");
  if (!f || fwrite (base, 1, 1 << 20, f) != 1 << 20 || fclose (f) != 0)
    exit (1);
  if (asprintf (&path, "%s/repro-overtaken-%d.qcow2", test_dir (),
                discard) < 0
      || shell ("qemu-img create -q -f qcow2 -o cluster_size=4096 -b "
                "'repro-overtaken-%d.raw' -F raw '%s' 1M", discard,
                path) != 0)
    exit (1);
  if (aio_fake_create (&a) < 0)
    exit (1);
  o.aio = a;
  if (qcow2_open (path, &o, &q, err, sizeof err) < 0) {
    fprintf (stderr, "open: %s\n", err);
    exit (1);
  }
  /* The L2 table exists and is cached; metadata is dirty. */
  memset (buf, 0x11, cs);
  CHECK (sync_write (q, x + 2 * cs, buf, cs, 0) == 0, "first write");

  /* A flush starts; its I/O is held, so it stays active. */
  aio_fake_set_hold (a, true);
  CHECK (qcow2_flush (q, int_done, &fres) == 0, "flush");
  /* The discard of cluster x parks on the flush barrier... */
  r = discard ? qcow2_discard (q, x, cs, int_done, &dres)
    : qcow2_write_zeroes (q, x, cs, 0, int_done, &dres);
  CHECK (r == 0, "%s", what);
  /* ... and a write of the first 1 KiB of x, submitted after it, plans
   * its copy-on-write from the backing file at once.
   */
  memset (buf, 0x22, 1024);
  CHECK (qcow2_write (q, x, buf, 1024, 0, int_done, &wres) == 0, "write");
  aio_fake_set_hold (a, false);
  aio_fake_release_all (a, false);
  run_until (q, NULL);
  CHECK (fres == 0 && dres == 0 && wres == 0, "results %d %d %d", fres, dres,
         wres);

  CHECK (sync_read (q, x, got, cs) == 0, "read");
  memset (buf + 1024, 0, cs - 1024);
  r = memcmp (got, buf, cs) == 0;
  if (!r)
    fprintf (stderr, "FAIL: a %s parked on the flush barrier was overtaken "
             "by a later partial write into the same cluster: bytes "
             "1024..4095 of the cluster read %s instead of zeros\n", what,
             memcmp (got + 1024, base + x + 1024, cs - 1024) == 0
             ? "the backing file's (old) data" : "something else");
  CHECK (r, "%s overtaken by a copy-on-write write", what);
  printf ("%s - directed: %s parked on the flush barrier, then a partial "
          "write into the same cluster\n", r ? "ok" : "not ok", what);
  qcow2_close (q);
  aio_destroy (a);
  free (buf);
  free (got);
  free (base);
  free (path);
}

/* ---- one round: image, workload, crash states ---- */

/* A budget of sc->budget bytes for o, and a neighbour image opened with
 * it (real I/O, not recorded: only the image under test is judged).
 */
static void
open_neighbour (struct wl *w, struct qcow2_opts *o, unsigned round)
{
  struct qcow2_opts no = { 0 };
  char name[64], err[256], *path;

  snprintf (name, sizeof name, "%s-%u-neighbour.qcow2", w->sc->name, round);
  w->nb_size = 256 << 20;
  path = make_image (name, "cluster_size=4096", w->nb_size);
  o->budget = qcow2_cache_budget_new (w->sc->budget);
  no.budget = o->budget;
  if (!o->budget || qcow2_open (path, &no, &w->nb, err, sizeof err) < 0) {
    fprintf (stderr, "%s: neighbour: %s\n", w->sc->name, err);
    exit (1);
  }
  free (path);
}

static unsigned
run_round (const struct scenario *sc, unsigned round, unsigned states,
           uint64_t seed, struct cs_stats *total, double *workload_secs)
{
  struct wl w = { .sc = sc, .rng = seed | 1 };
  struct qcow2_opts o = { 0 };
  struct cs_config cfg = { 0 };
  struct cs_stats st;
  struct timespec t0, t1;
  uint8_t *initial;
  char err[256], *path;
  int fd, r;

  clock_gettime (CLOCK_MONOTONIC, &t0);
  w.avoid_zero_race = getenv ("CRASH_AVOID_ZERO_RACE") != NULL;
  path = make_scenario_image (sc, round);
  if (aio_fake_create (&w.a) < 0)
    exit (1);
  o.aio = w.a;
  o.log = wl_log;
  o.log_opaque = &w;
  o.l2_cache_bytes = sc->l2_cache;
  o.compress = sc->compress;
  if (sc->budget)
    open_neighbour (&w, &o, round);
  if (qcow2_open (path, &o, &w.q, err, sizeof err) < 0) {
    fprintf (stderr, "%s: open: %s\n", sc->name, err);
    exit (1);
  }
  fd = qcow2_testing_image_fd (w.q);

  /* What the guest sees before the workload. */
  initial = malloc (sc->size);
  if (!initial)
    exit (1);
  for (uint64_t off = 0; off < sc->size; off += 1 << 20) {
    uint64_t n = sc->size - off < (1 << 20) ? sc->size - off : 1 << 20;
    r = sync_read (w.q, off, initial + off, n);
    CHECK (r == 0, "%s: initial read", sc->name);
  }
  aio_fake_clear_log (w.a);

  cfg.name = sc->name;
  cfg.path = path;
  cfg.fd = fd;
  cfg.disk_size = sc->size;
  cfg.cluster_size = sc->subcluster ? sc->subcluster : sc->cluster;
  cfg.lazy = sc->lazy;
  cfg.discard_shows_initial = sc->v2_backing;
  cfg.continue_every = getenv ("CRASH_CARRY_ON")
    ? (unsigned) strtoul (getenv ("CRASH_CARRY_ON"), NULL, 0) : 25;
  w.cs = cs_new (&cfg, w.a, initial);
  aio_fake_record_data (w.a, true);

  run_workload (&w);
  /* Those that did not fire would fail the close. */
  aio_fake_clear_faults (w.a);
  r = qcow2_close (w.q);
  CHECK (r == 0, "%s: close: %s", sc->name, strerror (-r));
  /* A refused submission is logged as an error. */
  CHECK (w.errors == 0 || sc->refuse, "%s: the engine logged %u errors "
         "during the workload", sc->name, w.errors);
  if (sc->refuse)
    CHECK (w.failed > 0, "%s: no request failed of %u refusals", sc->name,
           w.refusals);
  r = shell ("qemu-img check -q '%s' >/dev/null 2>&1", path);
  CHECK (r == 0 || r == 3, "%s: qemu-img check after close exited %d",
         sc->name, r);
  clock_gettime (CLOCK_MONOTONIC, &t1);
  *workload_secs += (double) (t1.tv_sec - t0.tv_sec)
    + (double) (t1.tv_nsec - t0.tv_nsec) / 1e9;
  if (!strncmp (sc->name, "c512-refgrow", 12))
    CHECK (w.grown > 0, "%s: the refcount table never grew", sc->name);

  cs_check (w.cs, states, seed * 7919 + round);
  cs_get_stats (w.cs, &st);
  printf ("  %-16s round %u: %u requests, %u ops (%u syncs), reftable "
          "grown %u, %u crash points, %u states (%u leaky, %u repaired, "
          "%u carried on), %u failed; qemu-img %.1f s, engine %.1f s\n",
          sc->name, round, cs_requests (w.cs), st.ops, st.syncs, w.grown,
          st.crash_points, st.states, st.leaky, st.repaired, st.continued,
          st.failures, st.qemu_secs, st.engine_secs);
  if (sc->refuse)
    printf ("  %-16s round %u: %u submissions refused, %u requests failed\n",
            sc->name, round, w.refusals, w.failed);
  fflush (stdout);
  total->states += st.states;
  total->crash_points += st.crash_points;
  total->leaky += st.leaky;
  total->failures += st.failures;

  if (w.nb) {
    CHECK (w.nb_took > 0, "%s: the neighbour never took a table",
           sc->name);
    CHECK (qcow2_testing_budget_peak (o.budget) <= sc->budget,
           "%s: budget peak %" PRIu64, sc->name,
           qcow2_testing_budget_peak (o.budget));
    CHECK (qcow2_close (w.nb) == 0, "%s: neighbour close", sc->name);
    qcow2_cache_budget_free (o.budget);
  }
  cs_free (w.cs);
  aio_destroy (w.a);
  free (initial);
  free (path);
  return st.states;
}

int
main (void)
{
  const char *e = getenv ("CRASH_STATES");
  const char *only = getenv ("CRASH_SCENARIO");
  unsigned total_states = e ? (unsigned) strtoul (e, NULL, 0) : 2000;
  uint64_t seed = getenv ("CRASH_SEED")
    ? strtoull (getenv ("CRASH_SEED"), NULL, 0) : 20240601;
  const unsigned per_round = 1500;   /* then a fresh workload */
  unsigned nsc = sizeof scenarios / sizeof scenarios[0], wsum = 0;
  struct cs_stats total = { 0 };
  struct timespec t0, t1;
  double workload_secs = 0, secs;

  require_qemu_img ();
  clock_gettime (CLOCK_MONOTONIC, &t0);
  for (unsigned i = 0; i < nsc; i++)
    if (!only || !strcmp (only, scenarios[i].name))
      wsum += scenarios[i].weight;
  if (wsum == 0) {
    fprintf (stderr, "no scenario named %s\n", only);
    return 1;
  }
  if (!only) {
    repro_refcount_past_eof ();
    repro_discard_overtaken (true);
    repro_discard_overtaken (false);
  }
  printf ("crash simulation: %u states, seed %" PRIu64 "\n", total_states,
          seed);
  for (unsigned i = 0; i < nsc; i++) {
    const struct scenario *sc = &scenarios[i];
    unsigned share, rounds;
    if (only && strcmp (only, sc->name))
      continue;
    share = (unsigned) ((uint64_t) total_states * sc->weight / wsum);
    if (share < 1 && total_states > 0)
      share = 1;
    if (share == 0)
      continue;
    rounds = (share + per_round - 1) / per_round;
    for (unsigned r = 0; r < rounds; r++) {
      unsigned n = share / rounds + (r < share % rounds);
      run_round (sc, r, n, seed + i * 1000003ull + r * 7919ull, &total,
                 &workload_secs);
    }
  }
  clock_gettime (CLOCK_MONOTONIC, &t1);
  secs = (double) (t1.tv_sec - t0.tv_sec)
    + (double) (t1.tv_nsec - t0.tv_nsec) / 1e9;
  printf ("crash states tried: %u at %u crash points (%u leaky, %u failed) "
          "in %.1f s (workloads %.1f s)\n", total.states, total.crash_points,
          total.leaky, total.failures, secs, workload_secs);
  printf (test_failures ? "not ok - crash simulation\n"
          : "ok - crash simulation\n");
  return test_exit ();
}
