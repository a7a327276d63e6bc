/* tests/test-aio.c: unit test of the I/O backends (lib/aio*.c).
 *
 * The same suite runs on io_uring (default depth, and a tiny ring so that
 * the overflow list is used), on the thread pool (default and one thread)
 * and on the fake with hold off; then the fake's own controls are checked:
 * hold and out-of-order release, the log, and fault injection.  Everything
 * works on one temporary file under $TMPDIR (or /tmp).
 *
 * Prints one line per check; exits 0 if all pass, 1 otherwise.
 */
#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/magic.h>
#include <sys/resource.h>
#include <sys/statfs.h>
#include <unistd.h>

#include "aio.h"
#include "qcow2-testing.h"
#include "aio-fake.h"

static int failures;
static const char *backend = "-";      /* prefix of every line */

#define CHECK(cond)                                                     \
  do {                                                                  \
    bool ok_ = (cond);                                                  \
    printf ("%s [%s] line %d: %s\n", ok_ ? "ok  " : "FAIL", backend,    \
            __LINE__, #cond);                                           \
    if (!ok_)                                                           \
      failures++;                                                       \
  } while (0)

static char path[4096];
static int fd = -1;
static pthread_t main_thread;

/* A test request: the op and the buffers it points at. */
struct top {
  struct aio_op op;
  struct iovec iov[4];
  int64_t ret;
  int ndone;                    /* times done ran: must end at 1 */
  bool on_main;                 /* done ran on the thread that reaps */
  int order;                    /* when done ran, counted per test */
  /* For chained ops: submit this many more from the callback. */
  struct aio *chain_aio;
  int chain_left;
};

static int done_counter;
/* The inline mode every test op asks for (suites run with each). */
static enum aio_inline inline_mode = AIO_INLINE_NONE;

static void
top_done (struct aio_op *op, int64_t ret)
{
  struct top *t = op->opaque;

  t->ret = ret;
  t->ndone++;
  t->on_main = pthread_equal (pthread_self (), main_thread);
  t->order = done_counter++;
  if (t->chain_left > 0 && ret >= 0) {
    /* Re-entrancy: the engine submits from done callbacks all the time. */
    t->chain_left--;
    t->op.offset += 512;
    if (aio_submit (t->chain_aio, &t->op) < 0)
      t->ret = -9999;
  }
}

static void
top_init (struct top *t, enum aio_op_type type, uint64_t offset)
{
  memset (t, 0, sizeof *t);
  t->op.type = type;
  t->op.fd = fd;
  t->op.iov = t->iov;
  t->op.offset = offset;
  t->op.done = top_done;
  t->op.opaque = t;
  t->op.inline_mode = (unsigned char) inline_mode;
}

/* Split buf into pieces of the given lengths (summing to the buffer). */
static void
top_iov (struct top *t, char *buf, const size_t *lens, int n)
{
  for (int i = 0; i < n; i++) {
    t->iov[i].iov_base = buf;
    t->iov[i].iov_len = lens[i];
    buf += lens[i];
  }
  t->op.iovcnt = n;
}

/* Reap until nothing is pending; the alarm set in main catches a hang. */
static int
drain (struct aio *a)
{
  int n = 0;

  aio_commit (a);
  while (a->pending > 0) {
    aio_wait (a);
    n += aio_reap (a);
  }
  return n;
}

static bool
fd_readable (struct aio *a, int timeout_ms)
{
  struct pollfd p = { .fd = aio_fd (a), .events = POLLIN };
  return poll (&p, 1, timeout_ms) == 1 && (p.revents & POLLIN);
}

static void
fill (char *buf, size_t len, unsigned seed)
{
  for (size_t i = 0; i < len; i++)
    buf[i] = (char) (seed * 131 + i * 7 + (i >> 9));
}

static int64_t
run_one (struct aio *a, struct top *t)
{
  if (aio_submit (a, &t->op) < 0)
    return -10000;
  drain (a);
  return t->ndone == 1 ? t->ret : -10001;
}

/* Multi-iovec write and read back at odd offsets, with the completion
 * signalled through aio_fd.
 */
static void
test_rw (struct aio *a)
{
  static const size_t wlens[] = { 1, 511, 4096, 3333 };
  static const size_t rlens[] = { 3000, 2, 2000, 2939 };
  const size_t total = 7941;
  char *w = malloc (total), *r = malloc (total), *check = malloc (total);
  struct top t;

  fill (w, total, 1);
  top_init (&t, AIO_WRITE, 4097);
  top_iov (&t, w, wlens, 4);
  CHECK (aio_submit (a, &t.op) == 0);
  CHECK (a->pending == 1);
  aio_commit (a);
  CHECK (fd_readable (a, 5000));
  while (a->pending > 0) {
    aio_wait (a);
    aio_reap (a);
  }
  CHECK (t.ndone == 1);
  CHECK (t.ret == (int64_t) total);
  CHECK (t.on_main);
  CHECK (pread (fd, check, total, 4097) == (ssize_t) total
         && memcmp (check, w, total) == 0);

  memset (r, 0, total);
  top_init (&t, AIO_READ, 4097);
  top_iov (&t, r, rlens, 4);
  CHECK (run_one (a, &t) == (int64_t) total);
  CHECK (memcmp (r, w, total) == 0);

  free (w);
  free (r);
  free (check);
}

/* Reads that cross or start past end of file are short, never errors. */
static void
test_eof (struct aio *a)
{
  static const size_t lens[] = { 50, 200, 3 };
  char buf[253], want[100];
  struct top t;

  CHECK (ftruncate (fd, 10000) == 0);
  fill (want, sizeof want, 2);
  CHECK (pwrite (fd, want, sizeof want, 9900) == (ssize_t) sizeof want);

  memset (buf, 0, sizeof buf);
  top_init (&t, AIO_READ, 9900);
  top_iov (&t, buf, lens, 3);
  CHECK (run_one (a, &t) == 100);
  CHECK (memcmp (buf, want, 100) == 0);

  top_init (&t, AIO_READ, 20000);
  top_iov (&t, buf, lens, 3);
  CHECK (run_one (a, &t) == 0);
}

static void
test_fsync_and_empty (struct aio *a)
{
  struct top t;

  top_init (&t, AIO_FSYNC, 0);
  CHECK (run_one (a, &t) == 0);

  top_init (&t, AIO_WRITE, 123);
  t.op.iovcnt = 0;
  CHECK (run_one (a, &t) == 0);

  /* Refused at submit: done is never called and nothing is pending. */
  top_init (&t, AIO_READ, 0);
  t.op.iov = NULL;
  t.op.iovcnt = 1;
  CHECK (aio_submit (a, &t.op) == -EINVAL);
  CHECK (a->pending == 0);
}

#define NCONC 200
#define CONC_LEN 4096

/* Many ops in flight at once, fsyncs among them, all in one commit. */
static void
test_concurrent (struct aio *a)
{
  static const size_t lens[] = { 1000, CONC_LEN - 1000 };
  struct top *t = calloc (NCONC, sizeof *t);
  char *w = malloc ((size_t) NCONC * CONC_LEN);
  char *r = malloc ((size_t) NCONC * CONC_LEN);
  int bad = 0, n;

  for (int i = 0; i < NCONC; i++) {
    char *b = w + (size_t) i * CONC_LEN;
    fill (b, CONC_LEN, 100 + i);
    if (i % 50 == 25) {
      top_init (&t[i], AIO_FSYNC, 0);
      continue;
    }
    top_init (&t[i], AIO_WRITE, 7 + (uint64_t) i * CONC_LEN);
    top_iov (&t[i], b, lens, 2);
  }
  for (int i = 0; i < NCONC; i++)
    if (aio_submit (a, &t[i].op) < 0)
      bad++;
  CHECK (bad == 0);
  CHECK (a->pending == NCONC);
  n = drain (a);
  CHECK (n == NCONC);
  for (int i = 0; i < NCONC; i++)
    if (t[i].ndone != 1 || !t[i].on_main
        || t[i].ret != (t[i].op.type == AIO_FSYNC ? 0 : CONC_LEN))
      bad++;
  CHECK (bad == 0);

  memset (r, 0, (size_t) NCONC * CONC_LEN);
  for (int i = 0; i < NCONC; i++) {
    top_init (&t[i], AIO_READ, 7 + (uint64_t) i * CONC_LEN);
    top_iov (&t[i], r + (size_t) i * CONC_LEN, lens, 2);
    if (aio_submit (a, &t[i].op) < 0)
      bad++;
  }
  CHECK (drain (a) == NCONC);
  for (int i = 0; i < NCONC; i++) {
    if (t[i].ndone != 1 || t[i].ret != CONC_LEN)
      bad++;
    else if (i % 50 != 25
             && memcmp (r + (size_t) i * CONC_LEN, w + (size_t) i * CONC_LEN,
                        CONC_LEN) != 0)
      bad++;
  }
  CHECK (bad == 0);

  free (t);
  free (w);
  free (r);
}

/* done submits the same op again; the backend must cope. */
static void
test_chain (struct aio *a)
{
  char buf[512];
  struct iovec iov = { buf, sizeof buf };
  struct top t;

  fill (buf, sizeof buf, 3);
  top_init (&t, AIO_WRITE, 1 << 20);
  t.op.iov = &iov;
  t.op.iovcnt = 1;
  t.chain_aio = a;
  t.chain_left = 9;
  CHECK (aio_submit (a, &t.op) == 0);
  drain (a);
  CHECK (t.ndone == 10);
  CHECK (t.ret == 512);
  CHECK (t.chain_left == 0);
}

/* An error from the kernel reaches done as -errno. */
static void
test_errors (struct aio *a)
{
  char buf[16] = { 0 };
  struct iovec iov = { buf, sizeof buf };
  int rofd = open (path, O_RDONLY | O_CLOEXEC);
  struct top t;

  CHECK (rofd >= 0);
  top_init (&t, AIO_WRITE, 0);
  t.op.fd = rofd;
  t.op.iov = &iov;
  t.op.iovcnt = 1;
  CHECK (run_one (a, &t) == -EBADF);
  close (rofd);
}

/* A write cut short by RLIMIT_FSIZE: the backend must continue after the
 * short part (which lands in the file) and then report -EFBIG.
 */
static void
test_short_write (struct aio *a)
{
  static const size_t lens[] = { 1000, 5000, 2192 };
  const uint64_t limit = 4u << 20;
  char *w = malloc (8192), check[3000];
  struct rlimit old, lim;
  struct top t;

  CHECK (getrlimit (RLIMIT_FSIZE, &old) == 0);
  lim = old;
  lim.rlim_cur = limit;
  CHECK (setrlimit (RLIMIT_FSIZE, &lim) == 0);

  fill (w, 8192, 4);
  top_init (&t, AIO_WRITE, limit - 3000);
  top_iov (&t, w, lens, 3);
  CHECK (run_one (a, &t) == -EFBIG);
  CHECK (pread (fd, check, 3000, limit - 3000) == 3000
         && memcmp (check, w, 3000) == 0);

  CHECK (setrlimit (RLIMIT_FSIZE, &old) == 0);
  CHECK (ftruncate (fd, 1 << 21) == 0);
  free (w);
}

static void
test_kick (struct aio *a)
{
  aio_reap (a);
  CHECK (!fd_readable (a, 0));
  aio_kick (a);
  aio_kick (a);
  CHECK (fd_readable (a, 0));
  CHECK (aio_reap (a) == 0);
  CHECK (!fd_readable (a, 0));
}

/* AIO_CALL: the function runs off the loop thread (but on the fake,
 * which runs everything on release), done runs on it, the result comes
 * back, and calls chained from done callbacks work.
 */
static pthread_t call_thread;

static int64_t
call_fn (struct aio_op *op)
{
  struct top *t = op->opaque;

  call_thread = pthread_self ();
  return 1000 + t->chain_left;
}

static void
test_call (struct aio *a)
{
  struct top t[8];

  for (int i = 0; i < 8; i++) {
    top_init (&t[i], AIO_CALL, 0);
    t[i].op.call = call_fn;
    t[i].op.iov = NULL;
  }
  CHECK (run_one (a, &t[0]) == 1000);
  CHECK (t[0].on_main);
  CHECK (strcmp (aio_name (a), "fake") == 0
         || !pthread_equal (call_thread, main_thread));
  for (int i = 1; i < 8; i++)
    CHECK (aio_submit (a, &t[i].op) == 0);
  CHECK (drain (a) == 7);
  for (int i = 1; i < 8; i++)
    CHECK (t[i].ndone == 1 && t[i].ret == 1000 && t[i].on_main);
  /* Re-entrancy: a call submitted from a done callback. */
  top_init (&t[0], AIO_CALL, 0);
  t[0].op.call = call_fn;
  t[0].op.iov = NULL;
  t[0].chain_aio = a;
  t[0].chain_left = 3;
  CHECK (aio_submit (a, &t[0].op) == 0);
  drain (a);
  CHECK (t[0].ndone == 4 && t[0].ret == 1000);
  top_init (&t[0], AIO_CALL, 0);
  CHECK (aio_submit (a, &t[0].op) == -EINVAL);   /* no function */
}

static void
suite (const char *name, struct aio *a)
{
  backend = name;
  test_rw (a);
  test_eof (a);
  test_fsync_and_empty (a);
  test_concurrent (a);
  test_chain (a);
  test_errors (a);
  test_short_write (a);
  test_kick (a);
  test_call (a);
  CHECK (a->pending == 0);
  aio_destroy (a);
}

/* Destroy while ops are in flight or queued: their done is never called,
 * and (checked by ASan) nothing touches freed memory or leaks.
 */
static void
destroy_busy (const char *name, struct aio *a)
{
  static const size_t lens[] = { 2048, 2048 };
  struct top *t = calloc (50, sizeof *t);
  char *buf = malloc (4096);
  int called = 0;

  backend = name;
  fill (buf, 4096, 9);
  for (int i = 0; i < 50; i++) {
    top_init (&t[i], AIO_WRITE, (uint64_t) i * 4096);
    top_iov (&t[i], buf, lens, 2);
    CHECK (aio_submit (a, &t[i].op) == 0);
    if (i == 25)
      aio_commit (a);
  }
  aio_destroy (a);
  for (int i = 0; i < 50; i++)
    called += t[i].ndone;
  CHECK (called == 0);
  free (buf);
  free (t);
}

static void
test_create (void)
{
  struct aio *a;
  int r;

  backend = "create";
  qcow2_testing_refuse_uring (true);
  CHECK (aio_create (AIO_KIND_AUTO, 0, &a) == 0);
  CHECK (strcmp (aio_name (a), "threads") == 0);
  aio_destroy (a);
  qcow2_testing_refuse_uring (false);

  r = aio_uring_create (8, &a);
  if (r == 0) {
    aio_destroy (a);
    CHECK (aio_create (AIO_KIND_AUTO, 0, &a) == 0);
    CHECK (strcmp (aio_name (a), "io_uring") == 0);
    aio_destroy (a);
  }
  else
    printf ("skip [create] io_uring refused here (%s)\n", strerror (-r));
  r = aio_create (AIO_KIND_URING, 16, &a);
  CHECK (r == 0 ? strcmp (aio_name (a), "io_uring") == 0 : a == NULL);
  aio_destroy (a);

  CHECK (aio_create (AIO_KIND_THREADS, 64, &a) == 0);
  CHECK (strcmp (aio_name (a), "threads") == 0);
  aio_destroy (a);
}

/* Hold, out-of-order release, and what the log says about it. */
static void
test_fake_hold (void)
{
  struct aio *a;
  struct aio_fake_record rec;
  const struct aio_fake_record *log;
  size_t n;
  char w0[1000], w1[1000], r0[1000], old[1000], now[1000];
  struct iovec iw0 = { w0, sizeof w0 }, iw1 = { w1, sizeof w1 };
  struct iovec ir0 = { r0, sizeof r0 };
  struct top t[4];

  backend = "fake-hold";
  CHECK (aio_fake_create (&a) == 0);
  CHECK (strcmp (aio_name (a), "fake") == 0);

  /* Hold off: nothing runs before commit, done waits for reap. */
  fill (w0, sizeof w0, 5);
  top_init (&t[0], AIO_WRITE, 0);
  t[0].op.iov = &iw0;
  t[0].op.iovcnt = 1;
  CHECK (aio_submit (a, &t[0].op) == 0);
  CHECK (aio_fake_held (a) == 0);
  CHECK (aio_reap (a) == 0);
  log = aio_fake_log (a, &n);
  CHECK (n == 1 && log[0].completed_seq == -1 && log[0].submit_seq == 0);
  aio_commit (a);
  CHECK (t[0].ndone == 0);
  CHECK (fd_readable (a, 0));
  CHECK (aio_reap (a) == 1);
  CHECK (t[0].ret == 1000);
  log = aio_fake_log (a, &n);
  CHECK (n == 1 && log[0].completed_seq == 0 && log[0].result == 1000);

  /* Hold on: W0' (offset 0), W1 (offset 8192), FSYNC, R0 (offset 0). */
  aio_fake_clear_log (a);
  aio_fake_set_hold (a, true);
  CHECK (pread (fd, old, sizeof old, 8192) == (ssize_t) sizeof old);
  fill (w0, sizeof w0, 6);
  fill (w1, sizeof w1, 7);
  top_init (&t[0], AIO_WRITE, 0);
  t[0].op.iov = &iw0;
  t[0].op.iovcnt = 1;
  top_init (&t[1], AIO_WRITE, 8192);
  t[1].op.iov = &iw1;
  t[1].op.iovcnt = 1;
  top_init (&t[2], AIO_FSYNC, 0);
  top_init (&t[3], AIO_READ, 0);
  t[3].op.iov = &ir0;
  t[3].op.iovcnt = 1;
  for (int i = 0; i < 4; i++)
    CHECK (aio_submit (a, &t[i].op) == 0);
  CHECK (aio_fake_held (a) == 4);
  CHECK (a->pending == 4);
  CHECK (aio_fake_held_info (a, 1, &rec) == 0
         && rec.type == AIO_WRITE && rec.offset == 8192 && rec.length == 1000
         && rec.submit_seq == 1 && rec.completed_seq == -1);
  CHECK (aio_fake_held_info (a, 2, &rec) == 0
         && rec.type == AIO_FSYNC && rec.length == 0 && rec.submit_seq == 2);
  CHECK (aio_fake_held_info (a, 4, &rec) == -ENOENT);
  CHECK (aio_fake_release (a, 4) == -ENOENT);

  /* Commit and wait must not run held ops, nor block on them. */
  aio_commit (a);
  aio_wait (a);
  CHECK (aio_reap (a) == 0);
  CHECK (pread (fd, now, sizeof now, 8192) == (ssize_t) sizeof now
         && memcmp (now, old, sizeof now) == 0);

  /* Release the fsync, then W0'; W1 and R0 stay held. */
  done_counter = 0;
  CHECK (aio_fake_release (a, 2) == 0);
  CHECK (aio_fake_held (a) == 3);
  CHECK (aio_fake_release (a, 0) == 0);
  CHECK (aio_fake_held (a) == 2);
  CHECK (aio_fake_held_info (a, 0, &rec) == 0 && rec.submit_seq == 1);
  CHECK (fd_readable (a, 0));
  CHECK (aio_reap (a) == 2);
  CHECK (t[2].ndone == 1 && t[2].ret == 0 && t[2].order == 0);
  CHECK (t[0].ndone == 1 && t[0].ret == 1000 && t[0].order == 1);
  CHECK (t[1].ndone == 0 && t[3].ndone == 0);
  CHECK (a->pending == 2);

  /* The rest newest first: R0 then W1. */
  aio_fake_release_all (a, true);
  CHECK (aio_fake_held (a) == 0);
  CHECK (aio_reap (a) == 2);
  CHECK (t[3].ret == 1000 && t[3].order == 2);
  CHECK (memcmp (r0, w0, sizeof r0) == 0);
  CHECK (t[1].ret == 1000 && t[1].order == 3);
  CHECK (pread (fd, now, sizeof now, 8192) == (ssize_t) sizeof now
         && memcmp (now, w1, sizeof now) == 0);
  CHECK (a->pending == 0);

  log = aio_fake_log (a, &n);
  CHECK (n == 4);
  CHECK (log[0].type == AIO_WRITE && log[0].offset == 0
         && log[0].length == 1000 && log[0].submit_seq == 0
         && log[0].completed_seq == 1 && log[0].result == 1000);
  CHECK (log[1].type == AIO_WRITE && log[1].offset == 8192
         && log[1].submit_seq == 1 && log[1].completed_seq == 3);
  CHECK (log[2].type == AIO_FSYNC && log[2].submit_seq == 2
         && log[2].completed_seq == 0 && log[2].result == 0);
  CHECK (log[3].type == AIO_READ && log[3].submit_seq == 3
         && log[3].completed_seq == 2 && log[3].result == 1000);

  /* Release in forward order too. */
  aio_fake_clear_log (a);
  top_init (&t[0], AIO_FSYNC, 0);
  top_init (&t[1], AIO_FSYNC, 0);
  CHECK (aio_submit (a, &t[0].op) == 0 && aio_submit (a, &t[1].op) == 0);
  aio_fake_release_all (a, false);
  CHECK (aio_reap (a) == 2 && t[0].order < t[1].order);
  log = aio_fake_log (a, &n);
  CHECK (n == 2 && log[0].completed_seq == 0 && log[1].completed_seq == 1);

  /* Clearing the log forgets held ops, which still run and complete. */
  top_init (&t[0], AIO_FSYNC, 0);
  CHECK (aio_submit (a, &t[0].op) == 0);
  aio_fake_clear_log (a);
  CHECK (aio_fake_held_info (a, 0, &rec) == 0 && rec.type == AIO_FSYNC);
  CHECK (aio_fake_release (a, 0) == 0);
  CHECK (aio_reap (a) == 1 && t[0].ndone == 1 && t[0].ret == 0);
  log = aio_fake_log (a, &n);
  CHECK (n == 0);

  /* Destroy with an op still held: dropped, nothing leaks. */
  top_init (&t[0], AIO_FSYNC, 0);
  CHECK (aio_submit (a, &t[0].op) == 0);
  aio_destroy (a);
  CHECK (t[0].ndone == 0);
}

/* aio_fake_fail_next: the chosen op fails without touching the file. */
static void
test_fake_faults (void)
{
  struct aio *a;
  const struct aio_fake_record *log;
  size_t n;
  char buf[3][512], zero[512], now[512];
  struct iovec iov[3];
  struct top t[3];

  backend = "fake-fault";
  CHECK (aio_fake_create (&a) == 0);
  memset (zero, 0, sizeof zero);
  for (int i = 0; i < 3; i++)
    CHECK (pwrite (fd, zero, sizeof zero, 65536 + i * 512) == 512);

  /* The second write fails with EIO; a read rule does not count writes. */
  aio_fake_fail_next (a, AIO_WRITE, 1, EIO);
  aio_fake_fail_next (a, AIO_READ, 0, EIO);
  for (int i = 0; i < 3; i++) {
    fill (buf[i], sizeof buf[i], 10 + i);
    iov[i].iov_base = buf[i];
    iov[i].iov_len = sizeof buf[i];
    top_init (&t[i], AIO_WRITE, 65536 + i * 512);
    t[i].op.iov = &iov[i];
    t[i].op.iovcnt = 1;
    CHECK (aio_submit (a, &t[i].op) == 0);
  }
  CHECK (drain (a) == 3);
  CHECK (t[0].ret == 512 && t[1].ret == -EIO && t[2].ret == 512);
  CHECK (pread (fd, now, 512, 65536 + 512) == 512
         && memcmp (now, zero, 512) == 0);
  CHECK (pread (fd, now, 512, 65536 + 1024) == 512
         && memcmp (now, buf[2], 512) == 0);
  log = aio_fake_log (a, &n);
  CHECK (n == 3 && log[1].result == -EIO && log[1].completed_seq == 1);

  /* The pending read rule fires on the next read. */
  top_init (&t[0], AIO_READ, 65536);
  t[0].op.iov = &iov[0];
  t[0].op.iovcnt = 1;
  CHECK (run_one (a, &t[0]) == -EIO);

  /* fsync: ENOSPC once, then fine again. */
  aio_fake_fail_next (a, AIO_FSYNC, 0, ENOSPC);
  top_init (&t[0], AIO_FSYNC, 0);
  CHECK (run_one (a, &t[0]) == -ENOSPC);
  top_init (&t[0], AIO_FSYNC, 0);
  CHECK (run_one (a, &t[0]) == 0);

  /* Skips are counted as ops run, not as they are submitted. */
  aio_fake_clear_log (a);
  aio_fake_set_hold (a, true);
  aio_fake_fail_next (a, AIO_WRITE, 0, EIO);
  for (int i = 0; i < 2; i++) {
    top_init (&t[i], AIO_WRITE, 65536 + i * 512);
    t[i].op.iov = &iov[i];
    t[i].op.iovcnt = 1;
    CHECK (aio_submit (a, &t[i].op) == 0);
  }
  CHECK (aio_fake_release (a, 1) == 0);
  CHECK (aio_fake_release (a, 0) == 0);
  CHECK (aio_reap (a) == 2);
  CHECK (t[1].ret == -EIO && t[0].ret == 512);
  log = aio_fake_log (a, &n);
  CHECK (n == 2 && log[0].submit_seq == 0 && log[0].completed_seq == 1
         && log[1].result == -EIO && log[1].completed_seq == 0);

  /* Turning hold off does not release what is held. */
  top_init (&t[0], AIO_FSYNC, 0);
  CHECK (aio_submit (a, &t[0].op) == 0);
  aio_fake_set_hold (a, false);
  aio_commit (a);
  CHECK (aio_reap (a) == 0 && aio_fake_held (a) == 1);
  CHECK (aio_fake_release (a, 0) == 0);
  CHECK (aio_reap (a) == 1 && t[0].ret == 0);
  CHECK (a->pending == 0);
  aio_destroy (a);
}

/* aio_fake_refuse_submit: the chosen submission fails at once; the op is
 * not counted, logged or run, and run-time rules do not count it.
 */
static void
test_fake_refuse (void)
{
  struct aio *a;
  size_t n;
  struct top t[3];

  backend = "fake-refuse";
  CHECK (aio_fake_create (&a) == 0);
  aio_fake_refuse_submit (a, AIO_FSYNC, 1, EAGAIN);
  aio_fake_fail_next (a, AIO_FSYNC, 1, EIO);
  CHECK (aio_fake_faults_pending (a) == 2);
  for (int i = 0; i < 3; i++)
    top_init (&t[i], AIO_FSYNC, 0);
  CHECK (aio_submit (a, &t[0].op) == 0);
  CHECK (aio_submit (a, &t[1].op) == -EAGAIN);
  CHECK (a->pending == 1 && aio_fake_faults_pending (a) == 1);
  CHECK (aio_submit (a, &t[2].op) == 0);
  CHECK (drain (a) == 2);
  CHECK (t[0].ret == 0 && t[1].ndone == 0 && t[2].ret == -EIO);
  aio_fake_log (a, &n);
  CHECK (n == 2 && aio_fake_faults_pending (a) == 0);
  aio_destroy (a);
}

/* Which files get which inline mode. */
static void
test_inline_mode (void)
{
  struct statfs sf;
  int shm;

  backend = "inline-mode";
  if (fstatfs (fd, &sf) == 0 && sf.f_type != TMPFS_MAGIC) {
    CHECK (aio_inline_mode (fd, false) == AIO_INLINE_NOWAIT);
    CHECK (aio_inline_mode (fd, true) == AIO_INLINE_NONE);
  }
  shm = open ("/dev/shm", O_RDONLY | O_DIRECTORY);
  if (shm >= 0 && fstatfs (shm, &sf) == 0 && sf.f_type == TMPFS_MAGIC) {
    CHECK (aio_inline_mode (shm, false) == AIO_INLINE_ALL);
    CHECK (aio_inline_mode (shm, true) == AIO_INLINE_ALL);
  }
  if (shm >= 0)
    close (shm);
}

int
main (void)
{
  const char *tmpdir = getenv ("TMPDIR");
  struct aio *a;
  int r;

  setvbuf (stdout, NULL, _IOLBF, 0);
  /* A backend that loses a completion hangs drain(): fail, don't hang. */
  alarm (120);
  /* The RLIMIT_FSIZE test would otherwise be killed by the signal. */
  signal (SIGXFSZ, SIG_IGN);
  main_thread = pthread_self ();

  snprintf (path, sizeof path, "%s/qnbd-test-aio-XXXXXX",
            tmpdir && *tmpdir ? tmpdir : "/tmp");
  fd = mkstemp (path);
  if (fd == -1) {
    perror ("mkstemp");
    return 1;
  }

  test_create ();

  r = aio_uring_create (0, &a);
  if (r == 0) {
    suite ("io_uring", a);
    CHECK (aio_uring_create (4, &a) == 0);
    suite ("io_uring-depth4", a);
  }
  else
    printf ("skip [io_uring] refused here (%s)\n", strerror (-r));

  /* Ops done inline on the submitting thread, completed by reap. */
  inline_mode = AIO_INLINE_NOWAIT;
  if (aio_uring_create (0, &a) == 0)
    suite ("io_uring-inline-nowait", a);
  CHECK (aio_threads_create (0, &a) == 0);
  suite ("threads-inline-nowait", a);
  inline_mode = AIO_INLINE_ALL;
  if (aio_uring_create (0, &a) == 0)
    suite ("io_uring-inline-all", a);
  CHECK (aio_threads_create (0, &a) == 0);
  suite ("threads-inline-all", a);
  inline_mode = AIO_INLINE_NONE;
  test_inline_mode ();

  backend = "threads";
  CHECK (aio_threads_create (0, &a) == 0);
  suite ("threads", a);
  backend = "threads-1";
  CHECK (aio_threads_create (1, &a) == 0);
  suite ("threads-1", a);
  backend = "fake";
  CHECK (aio_fake_create (&a) == 0);
  suite ("fake", a);

  if (aio_uring_create (4, &a) == 0)
    destroy_busy ("io_uring-destroy", a);
  if (aio_threads_create (1, &a) == 0)
    destroy_busy ("threads-destroy", a);
  if (aio_fake_create (&a) == 0)
    destroy_busy ("fake-destroy", a);

  test_fake_hold ();
  test_fake_faults ();
  test_fake_refuse ();

  close (fd);
  unlink (path);
  printf ("%s: %d failure(s)\n", failures ? "FAIL" : "PASS", failures);
  return failures ? 1 : 0;
}
