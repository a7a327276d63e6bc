/* tests/test-faults.c: I/O errors (EIO, ENOSPC) injected with the fake
 * backend, one at a time, on every kind of op the engine issues:
 *
 *   data writes (allocating and in place), the copy-on-write read of a
 *   partial write over a backing file, data reads, L2 table loads;
 *   during a flush: the refcount block, refcount table, L2 table and L1
 *   writes and each kind of fdatasync.
 *
 * In every case the request (or the flush) that met the error fails with
 * it, later requests work, a later flush succeeds, and after closing and
 * reopening the image everything acknowledged reads back and qemu-img
 * check finds no corruption (leaks are allowed: an error may strand a
 * cluster).  Writes that failed leave their range undefined, so the test
 * rewrites it before judging the contents, except where the engine
 * promises more (a failed allocating write is never linked: the old data
 * stays).
 *
 * Last, the image must stay consistent when the engine opens it again and
 * goes on allocating after an allocating write failed (ENOSPC, typically,
 * or EFBIG past a file size limit) and a flush counted the cluster it had
 * reserved.
 *
 * Each case has a name and passes or fails alone: test-faults --list
 * shows them, test-faults NAME... runs those only.
 */
#include <config.h>

#include <assert.h>
#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <string.h>
#include <syslog.h>
#include <sys/resource.h>
#include <sys/stat.h>

#include "aio-fake.h"
#include "qcow2-testing.h"
#include "testlib.h"

#define SIZE (4u << 20)

struct t {
  const char *name;
  char *path;
  struct aio *a;
  struct qcow2 *q;
  uint8_t *shadow;              /* what every acknowledged write left */
  unsigned errors;              /* engine LOG_ERR messages */
};

/* One case: what it does, the error it injects, and for the flush cases
 * which op of the flush fails and the writes that make the flush issue it.
 */
struct fault_case {
  char name[64];
  void (*run) (const struct fault_case *c);
  int err;                      /* a positive errno */
  enum io_kind kind;            /* the nth op (from 0) of this kind fails */
  unsigned nth;
  const char *opts;             /* qemu-img create -o */
  uint64_t span;                /* the writes before the flush: spread */
  size_t len;                   /* over span bytes, len bytes each */
};

static void
done_cb (void *opaque, int ret)
{
  *(int *) opaque = ret;
}

static void
log_hook (void *opaque, int level, const char *msg)
{
  struct t *t = opaque;
  if (level <= LOG_ERR)
    t->errors++;
  if (getenv ("TEST_VERBOSE"))
    fprintf (stderr, "engine: %s\n", msg);
}

static void
t_open (struct t *t, bool ro)
{
  struct qcow2_opts o = { 0 };
  char err[256];

  if (aio_fake_create (&t->a) < 0)
    exit (1);
  o.aio = t->a;
  o.read_only = ro;
  o.log = log_hook;
  o.log_opaque = t;
  if (qcow2_open (t->path, &o, &t->q, err, sizeof err) < 0) {
    fprintf (stderr, "%s: open: %s\n", t->name, err);
    exit (1);
  }
}

static int
t_close (struct t *t)
{
  int r = qcow2_close (t->q);
  aio_destroy (t->a);
  t->q = NULL;
  t->a = NULL;
  return r;
}

/* What qemu-img check says, without the list of leaked clusters. */
static void
show_check (const char *path)
{
  shell ("qemu-img check -U '%s' 2>&1 | grep -v '^Leaked cluster' "
         "| head -20 >&2", path);
}

/* A fresh image (qemu-img create options) with data in a few places. */
static void
t_start (struct t *t, const char *name, const char *opts, const char *raw)
{
  memset (t, 0, sizeof *t);
  t->name = name;
  t->shadow = calloc (1, SIZE);
  if (!t->shadow)
    exit (1);
  if (raw) {
    /* An overlay of a raw backing file holding a pattern. */
    char base[600];
    FILE *f;
    snprintf (base, sizeof base, "%s/%s", test_dir (), raw);
    fill_pattern (t->shadow, SIZE, 99);
    f = fopen (base, "w");
    if (!f || fwrite (t->shadow, 1, SIZE, f) != SIZE || fclose (f) != 0)
      exit (1);
    if (asprintf (&t->path, "%s/%s.qcow2", test_dir (), name) < 0)
      exit (1);
    if (shell ("qemu-img create -q -f qcow2 -o %s -b '%s' -F raw '%s' %u",
               opts, raw, t->path, SIZE) != 0)
      exit (1);
  }
  else {
    char file[256];
    snprintf (file, sizeof file, "%s.qcow2", name);
    t->path = make_image (file, opts, SIZE);
  }
  t_open (t, false);
}

static int
t_write (struct t *t, uint64_t off, size_t len, uint64_t seed)
{
  uint8_t *buf = malloc (len);
  int r;
  if (!buf)
    exit (1);
  fill_pattern (buf, len, seed);
  r = sync_write (t->q, off, buf, len, 0);
  if (r == 0)
    memcpy (t->shadow + off, buf, len);
  free (buf);
  return r;
}

/* The engine's view equals the shadow. */
static bool
t_equals (struct t *t)
{
  return engine_equals (t->q, t->shadow, SIZE);
}

/* Finish a case: more writes work, a flush works, close, qemu-img check
 * (no corruption; leaks allowed), reopen, contents.
 */
static void
t_finish (struct t *t)
{
  int r;

  CHECK (t_write (t, 3 << 20, 70000, 1234) == 0, "%s: a later write",
         t->name);
  CHECK (t_write (t, 5000, 3000, 1235) == 0, "%s: a later write in place",
         t->name);
  CHECK (sync_flush (t->q) == 0, "%s: a later flush", t->name);
  CHECK (t_equals (t), "%s: contents before close", t->name);
  r = t_close (t);
  CHECK (r == 0, "%s: close: %s", t->name, strerror (-r));
  r = shell ("qemu-img check -q '%s' >/dev/null 2>&1", t->path);
  if (r != 0 && r != 3)
    show_check (t->path);
  CHECK (r == 0 || r == 3, "%s: qemu-img check exited %d", t->name, r);
  t_open (t, true);
  CHECK (t_equals (t), "%s: contents after reopening", t->name);
  t_close (t);
  free (t->shadow);
  free (t->path);
}

/* Flush with every op held; the nth op (from 0) of kind k fails with err,
 * the others run in order.  Returns the flush's result; *hit says whether
 * such an op came.
 */
static int
flush_failing (struct t *t, enum io_kind k, unsigned nth, int err, bool *hit)
{
  int res = 1;
  unsigned seen = 0, idle = 0;

  *hit = false;
  aio_fake_set_hold (t->a, true);
  if (qcow2_flush (t->q, done_cb, &res) < 0) {
    aio_fake_set_hold (t->a, false);
    return -EINVAL;
  }
  while (res == 1) {
    struct aio_fake_record rec;
    if (aio_fake_held (t->a) == 0) {
      qcow2_process (t->q);
      if (++idle > 1000) {
        fprintf (stderr, "%s: flush stuck\n", t->name);
        exit (1);
      }
      continue;
    }
    idle = 0;
    aio_fake_held_info (t->a, 0, &rec);
    if (!*hit && classify_io (t->q, &rec) == k && seen++ == nth) {
      *hit = true;
      aio_fake_fail_held (t->a, 0, err);
    }
    else
      aio_fake_release (t->a, 0);
    qcow2_process (t->q);
  }
  aio_fake_set_hold (t->a, false);
  aio_fake_release_all (t->a, false);
  run_until (t->q, NULL);
  return res;
}

/* ---- the cases ---- */

static const int errs[] = { EIO, ENOSPC };

static const char *
ename (int e)
{
  return e == EIO ? "EIO" : "ENOSPC";
}

/* A failing data write: allocating (the old data stays) and in place. */
static void
case_data_write (const struct fault_case *c)
{
  const char *name = c->name;
  int err = c->err;
  struct t t;
  int r;

  t_start (&t, name, "cluster_size=4096", NULL);
  CHECK (t_write (&t, 8192, 8192, 1) == 0, "%s: first write", name);

  aio_fake_fail_next (t.a, AIO_WRITE, 0, err);
  r = t_write (&t, 1 << 20, 12288, 2);
  CHECK (r == -err, "%s: allocating write got %d", name, r);
  CHECK (t_equals (&t), "%s: a failed allocating write is not linked",
         name);

  aio_fake_fail_next (t.a, AIO_WRITE, 0, err);
  r = t_write (&t, 8192, 4096, 3);
  CHECK (r == -err, "%s: in-place write got %d", name, r);
  /* Undefined after a failed in-place write: write it again. */
  CHECK (t_write (&t, 8192, 4096, 4) == 0, "%s: rewrite", name);
  CHECK (t_write (&t, 1 << 20, 12288, 5) == 0, "%s: allocating again", name);
  CHECK (sync_flush (t.q) == 0, "%s: flush", name);
  t_finish (&t);
}

/* A failing read: of data, of an L2 table being loaded, and the COW read
 * of a partial write over a backing file.
 */
static void
case_reads (const struct fault_case *c)
{
  const char *name = c->name;
  int err = c->err;
  struct t t;
  char raw[80];
  uint8_t *buf = malloc (65536);
  int r;

  if (!buf)
    exit (1);
  snprintf (raw, sizeof raw, "%s.raw", name);
  t_start (&t, name, "cluster_size=4096", raw);
  CHECK (t_write (&t, 4096, 4096, 1) == 0, "%s: write", name);

  aio_fake_fail_next (t.a, AIO_READ, 0, err);
  r = sync_read (t.q, 4096, buf, 4096);
  CHECK (r == -err, "%s: data read got %d", name, r);
  r = sync_read (t.q, 4096, buf, 4096);
  CHECK (r == 0 && memcmp (buf, t.shadow + 4096, 4096) == 0,
         "%s: the read again", name);

  /* A read of the backing file (a hole in the overlay). */
  aio_fake_fail_next (t.a, AIO_READ, 0, err);
  r = sync_read (t.q, 2 << 20, buf, 65536);
  CHECK (r == -err, "%s: backing read got %d", name, r);

  /* The COW read of a partial allocating write. */
  aio_fake_fail_next (t.a, AIO_READ, 0, err);
  r = t_write (&t, (2 << 20) + 512, 1024, 2);
  CHECK (r == -err, "%s: COW write got %d", name, r);
  CHECK (t_equals (&t), "%s: after the failed COW", name);
  CHECK (t_write (&t, (2 << 20) + 512, 1024, 3) == 0, "%s: COW again",
         name);
  CHECK (sync_flush (t.q) == 0, "%s: flush", name);

  /* An L2 table load: reopen so that the cache is cold. */
  CHECK (t_close (&t) == 0, "%s: close", name);
  t_open (&t, false);
  aio_fake_fail_next (t.a, AIO_READ, 0, err);
  r = sync_read (t.q, 4096, buf, 4096);
  CHECK (r == -err, "%s: read with failing L2 load got %d", name, r);
  aio_fake_fail_next (t.a, AIO_READ, 0, err);
  r = t_write (&t, 4096 + 1024, 512, 4);
  CHECK (r == -err, "%s: write with failing L2 load got %d", name, r);
  r = sync_read (t.q, 4096, buf, 4096);
  CHECK (r == 0 && memcmp (buf, t.shadow + 4096, 4096) == 0,
         "%s: the read again", name);

  /* The flusher loading a refcount block (cold after a reopen). */
  CHECK (t_close (&t) == 0, "%s: close", name);
  t_open (&t, false);
  CHECK (t_write (&t, 4096, 512, 5) == 0, "%s: write", name);
  CHECK (t_write (&t, 3 << 20, 8192, 6) == 0, "%s: allocating write", name);
  aio_fake_fail_next (t.a, AIO_READ, 0, err);
  r = sync_flush (t.q);
  CHECK (r == -err, "%s: flush with a failing refcount block load got %d",
         name, r);
  CHECK (sync_flush (t.q) == 0, "%s: the next flush", name);
  free (buf);
  t_finish (&t);
}

/* A flush whose nth op of kind k fails.  opts and the writes before it
 * are chosen so that the flush has such an op.
 */
static void
case_flush (const struct fault_case *c)
{
  const char *name = c->name;
  enum io_kind k = c->kind;
  unsigned nth = c->nth;
  int err = c->err;
  uint64_t span = c->span;
  size_t len = c->len;
  struct t t;
  bool hit;
  int r;

  t_start (&t, name, c->opts, NULL);
  /* Allocations spread over span bytes of disk: new L2 tables, new
   * refcount blocks, refcount table entries.
   */
  for (uint64_t off = 0; off < span; off += span / 16)
    CHECK (t_write (&t, off, len, off) == 0, "%s: write", name);

  r = flush_failing (&t, k, nth, err, &hit);
  CHECK (hit, "%s: the flush issued no %s op number %u", name,
         io_kind_names[k], nth);
  CHECK (r == -err, "%s: the flush got %d", name, r);

  /* Requests go on; the next flush must write what the failed one did
   * not.
   */
  CHECK (t_write (&t, span / 32, 4096, 77) == 0, "%s: write after", name);
  r = sync_flush (t.q);
  CHECK (r == 0, "%s: the next flush got %d", name, r);

  /* Durable now: reopen (no close, which would write everything again)
   * and read back what was acknowledged before that flush.
   */
  {
    struct t u = t;
    struct qcow2_opts o = { 0 };
    struct aio *a2;
    struct qcow2 *q2;
    char e2[256];
    if (aio_fake_create (&a2) < 0)
      exit (1);
    o.aio = a2;
    o.read_only = true;
    o.force_share = true;       /* the first open still holds it */
    if (qcow2_open (t.path, &o, &q2, e2, sizeof e2) < 0) {
      CHECK (0, "%s: open after the flush: %s", name, e2);
    }
    else {
      u.q = q2;
      CHECK (t_equals (&u), "%s: what the second flush made durable, "
             "read by another open", name);
      qcow2_close (q2);
    }
    aio_destroy (a2);
    r = shell ("qemu-img check -q -U '%s' >/dev/null 2>&1", t.path);
    if (r != 0 && r != 3)
      show_check (t.path);
    CHECK (r == 0 || r == 3, "%s: qemu-img check after the second flush "
           "(before close) exited %d", name, r);
  }
  t_finish (&t);
}

/* Discards: their refcount decrements are written after L1 (a later
 * stage of the flush) and the freed clusters are punched; a failing
 * refcount block write there fails the flush, a failing punch does not.
 */
static void
case_discard (const struct fault_case *c)
{
  const char *name = c->name;
  int err = c->err;
  struct t t;
  bool hit;
  int r;

  t_start (&t, name, "cluster_size=4096", NULL);
  CHECK (t_write (&t, 0, 65536, 1) == 0, "%s: write", name);
  CHECK (t_write (&t, 1 << 20, 65536, 2) == 0, "%s: write", name);
  CHECK (sync_flush (t.q) == 0, "%s: flush", name);
  {
    int res = 1;
    CHECK (qcow2_discard (t.q, 0, 32768, done_cb, &res) == 0, "discard");
    run_until (t.q, &res);
    CHECK (res == 0, "%s: discard got %d", name, res);
    memset (t.shadow, 0, 32768);
  }
  r = flush_failing (&t, IO_REFBLOCK, 0, err, &hit);
  CHECK (hit && r == -err, "%s: flush with a failing decrement got %d "
         "(hit %d)", name, r, hit);
  CHECK (sync_flush (t.q) == 0, "%s: the next flush", name);
  {
    int res = 1;
    CHECK (qcow2_discard (t.q, 1 << 20, 32768, done_cb, &res) == 0,
           "discard");
    run_until (t.q, &res);
    CHECK (res == 0, "%s: discard got %d", name, res);
    memset (t.shadow + (1 << 20), 0, 32768);
  }
  aio_fake_fail_next (t.a, AIO_PUNCH, 0, err);
  r = sync_flush (t.q);
  CHECK (r == 0, "%s: a failing punch fails the flush (%d)", name, r);
  CHECK (t_equals (&t), "%s: contents", name);
  t_finish (&t);
}

/* An allocating write at the end of the file fails (the disk is full):
 * its cluster stays reserved, and the next flush gives it refcount 1
 * although nothing was written there.  Close, reopen, write again.
 */
static void
case_reopen_after_failed_alloc (const struct fault_case *c)
{
  const char *name = c->name;
  int err = c->err;
  struct t t;
  int r;

  t_start (&t, name, "cluster_size=4096", NULL);
  CHECK (t_write (&t, 0, 4096, 1) == 0, "%s: write", name);
  CHECK (sync_flush (t.q) == 0, "%s: flush", name);
  aio_fake_fail_next (t.a, AIO_WRITE, 0, err);
  r = t_write (&t, 8192, 4096, 2);
  CHECK (r == -err, "%s: write got %d", name, r);
  CHECK (sync_flush (t.q) == 0, "%s: flush", name);
  CHECK (t_close (&t) == 0, "%s: close", name);
  r = shell ("qemu-img check -q '%s' >/dev/null 2>&1", t.path);
  CHECK (r == 0 || r == 3, "%s: qemu-img check after the failure: %d",
         name, r);

  /* Space again: the server is restarted and the guest writes on. */
  t_open (&t, false);
  CHECK (t_write (&t, 8192, 4096, 3) == 0, "%s: write after reopening",
         name);
  CHECK (t_write (&t, 1 << 20, 4096, 4) == 0, "%s: write after reopening",
         name);
  CHECK (t_close (&t) == 0, "%s: close", name);
  r = shell ("qemu-img check -q '%s' >/dev/null 2>&1", t.path);
  if (r != 0 && r != 3)
    show_check (t.path);
  CHECK (r == 0 || r == 3, "%s: qemu-img check after writing on exited %d "
         "(a cluster counted for the failed write was handed out again)",
         name, r);
  t_open (&t, true);
  CHECK (t_equals (&t), "%s: contents", name);
  t_close (&t);
  free (t.shadow);
  free (t.path);
}

/* The same with the file size limit as the cause: the engine cannot grow
 * the file ahead of its allocations (ftruncate fails with EFBIG, SIGXFSZ
 * ignored), the allocating write past the limit fails, close cannot trim
 * the file to the allocation point either, and after the limit is lifted
 * the server is started again and writes on.
 */
static void
case_reopen_after_efbig (const struct fault_case *c)
{
  const char *name = c->name;
  struct rlimit old_lim, lim;
  struct stat st;
  struct t t;
  int r;

  t_start (&t, name, "cluster_size=4096", NULL);
  signal (SIGXFSZ, SIG_IGN);
  if (stat (t.path, &st) < 0 || getrlimit (RLIMIT_FSIZE, &old_lim) < 0)
    exit (1);
  /* Room for the new L2 table, not for the data cluster after it. */
  lim = old_lim;
  lim.rlim_cur = (rlim_t) round_up ((uint64_t) st.st_size, 4096) + 4096;
  if (setrlimit (RLIMIT_FSIZE, &lim) < 0)
    exit (1);
  r = t_write (&t, 0, 4096, 1);
  CHECK (r == -EFBIG, "%s: write past the limit got %d", name, r);
  CHECK (sync_flush (t.q) == 0, "%s: flush", name);
  t_close (&t);
  setrlimit (RLIMIT_FSIZE, &old_lim);
  r = shell ("qemu-img check -q '%s' >/dev/null 2>&1", t.path);
  CHECK (r == 0 || r == 3, "%s: qemu-img check after the failure: %d",
         name, r);

  t_open (&t, false);
  CHECK (t_write (&t, 0, 4096, 2) == 0, "%s: write after reopening", name);
  CHECK (t_close (&t) == 0, "%s: close", name);
  r = shell ("qemu-img check -q '%s' >/dev/null 2>&1", t.path);
  if (r != 0 && r != 3)
    show_check (t.path);
  CHECK (r == 0 || r == 3, "%s: qemu-img check after writing on exited %d "
         "(a cluster counted for the failed write, past the end of the "
         "file, was handed out again)", name, r);
  t_open (&t, true);
  CHECK (t_equals (&t), "%s: contents", name);
  t_close (&t);
  free (t.shadow);
  free (t.path);
}

/* The refcount block a flush needs fails to load, and under memory
 * pressure the increments that run had taken could not be queued again:
 * they were lost, and the next flush linked clusters whose refcount stayed
 * zero (qemu-img check: "ERROR cluster ... refcount=0 reference=1").  A
 * failed run now keeps what it did not apply for the next one.
 */
static void
case_requeue_nomem (const struct fault_case *c)
{
  struct t t;
  bool hit;
  int r;

  t_start (&t, c->name, "cluster_size=4096", NULL);
  CHECK (t_write (&t, 1 << 20, 3 * 4096, 77) == 0, "%s: write", t.name);
  CHECK (t_write (&t, 2 << 20, 5 * 4096, 78) == 0, "%s: write", t.name);
  qcow2_testing_fail_extent_add (1);
  r = flush_failing (&t, IO_OTHER, 0, EIO, &hit);
  qcow2_testing_fail_extent_add (0);
  CHECK (hit && r == -EIO, "%s: the flush fails (%d, hit %d)", t.name, r,
         hit);
  t_finish (&t);
}

/* The flush cases, each run with each error.  variant tells apart two
 * cases that fail the same op under different options.
 */
static const struct {
  enum io_kind kind;
  unsigned nth;
  const char *variant;
  const char *opts;
  uint64_t span;
  size_t len;
} flush_cases[] = {
  /* 4 KiB clusters, 4 MiB disk: two L2 tables, one refcount block. */
  { IO_REFBLOCK, 0, NULL, "cluster_size=4096", SIZE, 2048 },
  { IO_L2, 0, NULL, "cluster_size=4096", SIZE, 2048 },
  { IO_L2, 1, NULL, "cluster_size=4096", SIZE, 2048 },
  { IO_L1, 0, NULL, "cluster_size=4096", SIZE, 2048 },
  /* 512-byte clusters: refcount blocks cover 128 KiB of file, so the
   * writes need new ones, and an in-place refcount table update.
   */
  { IO_REFTABLE, 0, "c512", "cluster_size=512", SIZE, 16384 },
  { IO_REFBLOCK, 1, "c512", "cluster_size=512", SIZE, 16384 },
  /* The syncs: after refcount blocks, after L2, after L1. */
  { IO_SYNC, 0, NULL, "cluster_size=4096", SIZE, 2048 },
  { IO_SYNC, 1, NULL, "cluster_size=4096", SIZE, 2048 },
  { IO_SYNC, 2, NULL, "cluster_size=4096", SIZE, 2048 },
  /* 64-bit refcounts at 512 bytes: the one-cluster refcount table
   * covers 2 MiB of file; 2.5 MiB of writes make it move, and the
   * header is rewritten to point at the new one.
   */
  { IO_REFTABLE, 0, "moved", "cluster_size=512,refcount_bits=64", SIZE,
    160 << 10 },
  { IO_HEADER, 0, "moved", "cluster_size=512,refcount_bits=64", SIZE,
    160 << 10 },
};
#define N_FLUSH (sizeof flush_cases / sizeof flush_cases[0])

/* The cases run with each error, in order; "flush" stands for one case
 * per line of flush_cases.
 */
static const struct {
  const char *name;
  void (*run) (const struct fault_case *c);
} err_cases[] = {
  { "data-write", case_data_write },
  { "reads", case_reads },
  { "flush", case_flush },
  { "discard", case_discard },
  { "reopen-after-failed-alloc", case_reopen_after_failed_alloc },
};
#define N_ERR_CASES (sizeof err_cases / sizeof err_cases[0])
#define N_CASES (2 + 2 * (N_ERR_CASES - 1 + N_FLUSH))

static void
run_fault_case (const void *arg)
{
  const struct fault_case *c = arg;
  c->run (c);
}

/* A flush case's name: flush-KIND-NTH[-VARIANT]-ERROR. */
static void
name_flush_case (struct fault_case *c, const char *variant)
{
  char kind[32];

  snprintf (kind, sizeof kind, "%s", io_kind_names[c->kind]);
  for (char *p = kind; *p; p++)
    if (*p == ' ')
      *p = '_';
  snprintf (c->name, sizeof c->name, "flush-%s-%u%s%s-%s", kind, c->nth,
            variant ? "-" : "", variant ? variant : "", ename (c->err));
}

/* The flush cases with error err, from fc[0] on; returns their number. */
static size_t
make_flush_cases (struct fault_case *fc, int err)
{
  for (size_t f = 0; f < N_FLUSH; f++) {
    fc[f] = (struct fault_case) {
      .run = case_flush, .err = err, .kind = flush_cases[f].kind,
      .nth = flush_cases[f].nth, .opts = flush_cases[f].opts,
      .span = flush_cases[f].span, .len = flush_cases[f].len,
    };
    name_flush_case (&fc[f], flush_cases[f].variant);
  }
  return N_FLUSH;
}

/* Every case, in the order they run; returns their number. */
static size_t
make_cases (struct fault_case *fc)
{
  size_t n = 0;

  fc[n++] = (struct fault_case) { .name = "requeue-nomem",
                                  .run = case_requeue_nomem };
  for (unsigned e = 0; e < 2; e++)
    for (unsigned i = 0; i < N_ERR_CASES; i++) {
      if (err_cases[i].run == case_flush) {
        n += make_flush_cases (fc + n, errs[e]);
        continue;
      }
      fc[n] = (struct fault_case) { .run = err_cases[i].run, .err = errs[e] };
      snprintf (fc[n].name, sizeof fc[n].name, "%s-%s", err_cases[i].name,
                ename (errs[e]));
      n++;
    }
  fc[n++] = (struct fault_case) { .name = "reopen-after-efbig",
                                  .run = case_reopen_after_efbig };
  return n;
}

int
main (int argc, char **argv)
{
  static struct fault_case fc[N_CASES];
  static struct test_case tc[N_CASES];
  size_t n = make_cases (fc);

  assert (n == N_CASES);
  for (size_t i = 0; i < n; i++)
    tc[i] = (struct test_case) { fc[i].name, run_fault_case, &fc[i] };
  if (!(argc == 2 && strcmp (argv[1], "--list") == 0))
    require_qemu_img ();
  return run_cases (argc, argv, tc, n);
}
