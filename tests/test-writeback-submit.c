/* tests/test-writeback-submit.c: a metadata write or fdatasync of a flush
 * that the I/O backend refuses at submission (it returns an error at
 * once, as io_uring does when it cannot get a queue entry, or a thread
 * pool out of memory).
 *
 * A flush is run once without faults to count its writes and syncs, then
 * again on a fresh image for each of them in turn, with the backend
 * refusing that one.  A flush that reports success promises that what it
 * covered survives a crash: the image file is copied from inside its
 * completion callback (the fake backend writes through, so the copy is
 * what a crash at that moment leaves) and the copy must read back every
 * acknowledged write.  A refused fdatasync can never be followed by a
 * success.  In every case the next flush, with no fault, succeeds, and
 * after close the image reads back and qemu-img check finds it clean.
 *
 * Each variant (cluster size, refcount width, external data file) is a
 * case: test-writeback-submit --list shows them.
 */
#include <config.h>

#include <errno.h>
#include <string.h>
#include <syslog.h>

#include "aio-fake.h"
#include "testlib.h"

#define SIZE (4u << 20)

/* The writes before the flush: every span / 16 bytes, len bytes each. */
struct variant {
  const char *name;
  const char *opts;             /* qemu-img create -o */
  bool data_file;               /* guest data in NAME.data */
  uint64_t span;
  size_t len;
};

struct wb_case {
  char name[64];
  const struct variant *v;
  enum aio_op_type type;        /* the kind of submission refused */
};

/* The flush whose completion copies the image file. */
struct flush_ctx {
  int res;
  const char *path;
  const char *copy;
};

static void
log_hook (void *opaque, int level, const char *msg)
{
  (void) opaque;
  (void) level;
  if (getenv ("TEST_VERBOSE"))
    fprintf (stderr, "engine: %s\n", msg);
}

/* Open path with the fake backend a; read-only sharing the locks (the
 * copy of an image names the data file that the image holds open).
 */
static struct qcow2 *
open_fake (const char *path, struct aio *a, bool ro)
{
  struct qcow2_opts o = { 0 };
  struct qcow2 *q;
  char err[256];

  o.aio = a;
  o.log = log_hook;
  o.read_only = ro;
  o.force_share = ro;
  if (qcow2_open (path, &o, &q, err, sizeof err) < 0) {
    fprintf (stderr, "open %s: %s\n", path, err);
    exit (1);
  }
  return q;
}

/* A fresh image named name (in the test directory), its path in path. */
static void
create (const struct variant *v, const char *name, char *path, size_t len)
{
  snprintf (path, len, "%s/%s.qcow2", test_dir (), name);
  if (shell ("rm -f '%s' '%s.data' && "
             "qemu-img create -q -f qcow2 -o %s%s%s%s '%s' %u",
             path, path, v->opts, v->data_file ? ",data_file=" : "",
             v->data_file ? path : "", v->data_file ? ".data" : "", path,
             SIZE) != 0)
    exit (1);
}

static void
write_all (struct qcow2 *q, const struct variant *v, uint8_t *shadow)
{
  uint8_t *buf = malloc (v->len);

  if (!buf)
    exit (1);
  for (uint64_t off = 0; off < v->span; off += v->span / 16) {
    fill_pattern (buf, v->len, off + 1);
    CHECK (sync_write (q, off, buf, v->len, 0) == 0, "%s: write at %llu",
           v->name, (unsigned long long) off);
    memcpy (shadow + off, buf, v->len);
  }
  free (buf);
}

static void
flush_done (void *opaque, int ret)
{
  struct flush_ctx *f = opaque;

  f->res = ret;
  if (f->copy && shell ("cp --sparse=always '%s' '%s'", f->path, f->copy))
    exit (1);
}

static unsigned
count_type (struct aio *a, enum aio_op_type type)
{
  size_t n;
  const struct aio_fake_record *log = aio_fake_log (a, &n);
  unsigned c = 0;

  for (size_t i = 0; i < n; i++)
    c += log[i].type == type;
  return c;
}

/* Submissions of c->type in the flush when nothing fails. */
static unsigned
reference_count (const struct wb_case *c, uint8_t *shadow)
{
  char path[512];
  struct aio *a;
  struct qcow2 *q;
  unsigned n;

  create (c->v, c->name, path, sizeof path);
  if (aio_fake_create (&a) < 0)
    exit (1);
  q = open_fake (path, a, false);
  write_all (q, c->v, shadow);
  aio_fake_clear_log (a);
  CHECK (sync_flush (q) == 0, "%s: reference flush", c->name);
  n = count_type (a, c->type);
  qcow2_close (q);
  aio_destroy (a);
  return n;
}

/* What a crash right after the flush's completion leaves reads back. */
static void
check_copy (const struct wb_case *c, unsigned skip, const char *copy,
            const uint8_t *shadow)
{
  struct aio *a;
  struct qcow2 *q;
  int r;

  if (aio_fake_create (&a) < 0)
    exit (1);
  q = open_fake (copy, a, true);
  CHECK (engine_equals (q, shadow, SIZE), "%s, submission %u refused: "
         "the flush reported success but a crash then loses data",
         c->name, skip);
  qcow2_close (q);
  aio_destroy (a);
  /* Leaks are allowed there: the cluster of a write in flight. */
  r = shell ("qemu-img check -q -U '%s' >/dev/null 2>&1", copy);
  CHECK (r == 0 || r == 3, "%s, submission %u refused: the image as the "
         "flush left it: qemu-img check exited %d", c->name, skip, r);
}

/* One flush with submission number skip (from 0) of c->type refused. */
static void
trial (const struct wb_case *c, unsigned skip)
{
  uint8_t *shadow = calloc (1, SIZE);
  char name[96], path[512], copy[600];
  struct flush_ctx f = { 1, path, copy };
  struct aio *a;
  struct qcow2 *q;

  if (!shadow)
    exit (1);
  snprintf (name, sizeof name, "%s-%u", c->name, skip);
  create (c->v, name, path, sizeof path);
  snprintf (copy, sizeof copy, "%s.crash", path);
  if (aio_fake_create (&a) < 0)
    exit (1);
  q = open_fake (path, a, false);
  write_all (q, c->v, shadow);

  aio_fake_clear_log (a);
  aio_fake_refuse_submit (a, c->type, skip, EIO);
  CHECK (qcow2_flush (q, flush_done, &f) == 0, "%s: flush", name);
  run_until (q, &f.res);
  if (getenv ("TEST_VERBOSE"))
    fprintf (stderr, "%s: the flush got %d\n", name, f.res);
  CHECK (aio_fake_faults_pending (a) == 0, "%s: submission %u was never "
         "made", c->name, skip);
  if (f.res == 0) {
    CHECK (c->type != AIO_FSYNC, "%s: fdatasync submission %u refused, "
           "yet the flush reported success", c->name, skip);
    check_copy (c, skip, copy, shadow);
  }
  else
    CHECK (f.res == -EIO, "%s: the flush got %d", name, f.res);

  CHECK (sync_flush (q) == 0, "%s: the next flush", name);
  CHECK (qcow2_close (q) == 0, "%s: close", name);
  aio_destroy (a);
  CHECK (qemu_img_check_clean (path), "%s: qemu-img check", name);
  q = open_image (path, NULL, true);
  CHECK (engine_equals (q, shadow, SIZE), "%s: contents after reopening",
         name);
  qcow2_close (q);
  shell ("rm -f '%s' '%s'", path, copy);
  free (shadow);
}

static void
run_case (const void *arg)
{
  const struct wb_case *c = arg;
  uint8_t *shadow = calloc (1, SIZE);
  unsigned n, step, last = 0;

  if (!shadow)
    exit (1);
  n = reference_count (c, shadow);
  CHECK (n > 0, "%s: the flush made no such submission", c->name);
  if (getenv ("TEST_VERBOSE"))
    fprintf (stderr, "%s: %u submissions\n", c->name, n);
  /* Refcount blocks, the refcount table and the header come first, then
   * L2 tables by the dozen: beyond the first few, a sample of them.
   */
  step = n <= 24 ? 1 : (n - 12 + 11) / 12;
  for (unsigned skip = 0; skip < n; skip += skip < 12 ? 1 : step) {
    trial (c, skip);
    last = skip;
  }
  if (last != n - 1)
    trial (c, n - 1);
  free (shadow);
}

static const struct variant variants[] = {
  /* Two new L2 tables, the one refcount block. */
  { "c4k", "cluster_size=4096", false, SIZE, 2048 },
  /* 512-byte clusters: new refcount blocks, the refcount table changed
   * in place, many small L2 tables.
   */
  { "c512", "cluster_size=512", false, SIZE, 8192 },
  /* The one-cluster refcount table of 64-bit refcounts moves: a new
   * table and the header.
   */
  { "moved", "cluster_size=512,refcount_bits=64", false, SIZE, 160 << 10 },
  /* The fdatasync of the external data file beside the image's own. */
  { "data-file", "cluster_size=4096", true, SIZE, 2048 },
};
#define N_VARIANTS (sizeof variants / sizeof variants[0])

int
main (int argc, char **argv)
{
  static struct wb_case wc[2 * N_VARIANTS];
  static struct test_case tc[2 * N_VARIANTS];
  size_t n = 0;

  for (size_t i = 0; i < N_VARIANTS; i++)
    for (int k = 0; k < 2; k++) {
      wc[n].v = &variants[i];
      wc[n].type = k ? AIO_FSYNC : AIO_WRITE;
      snprintf (wc[n].name, sizeof wc[n].name, "%s-%s", variants[i].name,
                k ? "fsync" : "write");
      tc[n] = (struct test_case) { wc[n].name, run_case, &wc[n] };
      n++;
    }
  if (!(argc == 2 && strcmp (argv[1], "--list") == 0))
    require_qemu_img ();
  return run_cases (argc, argv, tc, n);
}
