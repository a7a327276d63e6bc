/* tests/testlib.c: helpers shared by the engine's unit tests. */
#include <config.h>

#include <errno.h>
#include <stdarg.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "aio-fake.h"
#include "qcow2-testing.h"
#include "testlib.h"

int test_failures;
static char dir[256];
static pid_t dir_owner;          /* not the child processes of run_cases */

static void
remove_dir (void)
{
  if (dir[0] && getpid () == dir_owner && !getenv ("KEEP_TEST_DIR"))
    shell ("rm -rf '%s'", dir);
}

const char *
test_dir (void)
{
  if (!dir[0]) {
    const char *t = getenv ("TMPDIR");
    snprintf (dir, sizeof dir, "%s/qnbd-test-XXXXXX", t ? t : "/tmp");
    if (!mkdtemp (dir)) {
      perror ("mkdtemp");
      exit (1);
    }
    dir_owner = getpid ();
    atexit (remove_dir);
  }
  return dir;
}

int
shell (const char *fmt, ...)
{
  char cmd[4096];
  va_list ap;
  int st;
  va_start (ap, fmt);
  vsnprintf (cmd, sizeof cmd, fmt, ap);
  va_end (ap);
  st = system (cmd);
  return WIFEXITED (st) ? WEXITSTATUS (st) : 255;
}

void
require_qemu_img (void)
{
  if (shell ("qemu-img --version >/dev/null 2>&1") != 0) {
    fprintf (stderr, "SKIP: qemu-img not installed\n");
    exit (77);
  }
}

char *
make_image (const char *name, const char *opts, uint64_t size)
{
  char *path;
  if (asprintf (&path, "%s/%s", test_dir (), name) < 0)
    exit (1);
  if (shell ("qemu-img create -q -f qcow2 %s%s '%s' %llu", opts ? "-o " : "",
             opts ? opts : "", path, (unsigned long long) size) != 0) {
    fprintf (stderr, "qemu-img create failed for %s\n", path);
    exit (1);
  }
  return path;
}

char *
create_image (const char *name, const struct qcow2_create_opts *opts)
{
  char *path, err[256];
  int r;

  if (asprintf (&path, "%s/%s", test_dir (), name) < 0)
    exit (1);
  r = qcow2_create (path, opts, err, sizeof err);
  if (r < 0) {
    fprintf (stderr, "qcow2_create %s: %s\n", path, err);
    exit (1);
  }
  return path;
}

static void
log_hook (void *opaque, int level, const char *msg)
{
  (void) opaque;
  if (level <= 4 || getenv ("TEST_VERBOSE"))
    fprintf (stderr, "engine: %s\n", msg);
}

struct qcow2 *
open_image (const char *path, struct aio *aio, bool ro)
{
  struct qcow2_opts o = { 0 };
  struct qcow2 *q;
  char err[256];
  const char *kind = getenv ("QNBD_AIO");
  int r;

  o.read_only = ro;
  o.aio = aio;
  o.log = log_hook;
  if (kind && strcmp (kind, "threads") == 0)
    o.aio_mode = QCOW2_AIO_THREADS;
  else if (kind && strcmp (kind, "io_uring") == 0)
    o.aio_mode = QCOW2_AIO_URING;
  r = qcow2_open (path, &o, &q, err, sizeof err);
  if (r < 0) {
    fprintf (stderr, "open %s: %s\n", path, err);
    exit (1);
  }
  return q;
}

static void
done_cb (void *opaque, int ret)
{
  int *p = opaque;
  *p = ret;
}

void
run_until (struct qcow2 *q, const int *flag)
{
  struct aio *a = NULL;
  (void) a;
  for (int spins = 0; ; spins++) {
    qcow2_process (q);
    if (flag ? *flag != 1 : qcow2_in_flight (q) == 0)
      return;
    if (spins > 10000000) {
      fprintf (stderr, "run_until: stuck\n");
      exit (1);
    }
    /* Fake I/O completes at reap; real I/O may need a moment. */
    if (strcmp (qcow2_aio_name (q), "fake") != 0)
      usleep (50);
  }
}

int
sync_read (struct qcow2 *q, uint64_t off, void *buf, size_t len)
{
  int res = 1, r = qcow2_read (q, off, buf, len, done_cb, &res);
  if (r < 0)
    return r;
  run_until (q, &res);
  return res;
}

int
sync_write (struct qcow2 *q, uint64_t off, const void *buf, size_t len,
            unsigned flags)
{
  int res = 1, r = qcow2_write (q, off, buf, len, flags, done_cb, &res);
  if (r < 0)
    return r;
  run_until (q, &res);
  return res;
}

int
sync_flush (struct qcow2 *q)
{
  int res = 1, r = qcow2_flush (q, done_cb, &res);
  if (r < 0)
    return r;
  run_until (q, &res);
  return res;
}

int
sync_discard (struct qcow2 *q, uint64_t off, uint64_t len)
{
  int res = 1, r = qcow2_discard (q, off, len, done_cb, &res);
  if (r < 0)
    return r;
  run_until (q, &res);
  return res;
}

bool
qemu_img_check_clean (const char *path)
{
  int st = shell ("qemu-img check '%s' > '%s.check' 2>&1", path, path);
  if (st != 0) {
    fprintf (stderr, "qemu-img check %s exited %d:\n", path, st);
    shell ("cat '%s.check' >&2", path);
    return false;
  }
  return true;
}

bool
engine_equals (struct qcow2 *q, const uint8_t *shadow, uint64_t size)
{
  size_t chunk = 1 << 20;
  uint8_t *buf;
  bool ok = true;

  if (posix_memalign ((void **) &buf, 4096, chunk))
    return false;
  for (uint64_t off = 0; off < size && ok; off += chunk) {
    size_t n = size - off < chunk ? size - off : chunk;
    int r = sync_read (q, off, buf, n);
    if (r < 0 || memcmp (buf, shadow + off, n) != 0) {
      for (size_t i = 0; i < n; i++)
        if (buf[i] != shadow[off + i]) {
          fprintf (stderr, "mismatch at 0x%llx: got %02x want %02x (r=%d)\n",
                   (unsigned long long) (off + i), buf[i], shadow[off + i], r);
          break;
        }
      ok = false;
    }
  }
  free (buf);
  return ok;
}

bool
qemu_img_compare (const char *path, const uint8_t *shadow, uint64_t size)
{
  char raw[512];
  FILE *f;
  snprintf (raw, sizeof raw, "%s.shadow.raw", path);
  f = fopen (raw, "w");
  if (!f || fwrite (shadow, 1, size, f) != size || fclose (f) != 0)
    return false;
  return shell ("qemu-img compare -q -f raw -F qcow2 '%s' '%s'", raw,
                path) == 0;
}

static uint64_t rnd_state = 0x9e3779b97f4a7c15ull;

uint64_t
rnd (void)
{
  /* xorshift64* */
  rnd_state ^= rnd_state >> 12;
  rnd_state ^= rnd_state << 25;
  rnd_state ^= rnd_state >> 27;
  return rnd_state * 2685821657736338717ull;
}

void
fill_pattern (uint8_t *buf, size_t len, uint64_t seed)
{
  for (size_t i = 0; i < len; i++)
    buf[i] = (uint8_t) ((seed * 31 + i * 7 + (i >> 9)) ^ (seed >> 3));
}

void
fill_noise (uint8_t *buf, size_t len, uint64_t seed)
{
  uint64_t x = seed * 0x9e3779b97f4a7c15ull + 1;

  for (size_t i = 0; i < len; i++) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    buf[i] = (uint8_t) x;
  }
}

int
test_exit (void)
{
  if (test_failures) {
    fprintf (stderr, "%d check(s) failed\n", test_failures);
    return 1;
  }
  return 0;
}

/* Run one case in a child; true when it passed. */
static bool
run_case (const struct test_case *c)
{
  pid_t pid;
  int st;

  fflush (NULL);                /* or the child prints it again */
  pid = fork ();
  if (pid < 0) {
    perror ("fork");
    exit (1);
  }
  if (pid == 0) {
    c->run (c->arg);
    exit (test_exit ());
  }
  if (waitpid (pid, &st, 0) < 0) {
    perror ("waitpid");
    exit (1);
  }
  if (WIFSIGNALED (st))
    fprintf (stderr, "%s: killed by signal %d\n", c->name, WTERMSIG (st));
  printf ("%s - %s\n", WIFEXITED (st) && WEXITSTATUS (st) == 0
          ? "ok" : "not ok", c->name);
  return WIFEXITED (st) && WEXITSTATUS (st) == 0;
}

static const struct test_case *
find_case (const struct test_case *cases, size_t n, const char *name)
{
  for (size_t i = 0; i < n; i++)
    if (strcmp (cases[i].name, name) == 0)
      return &cases[i];
  return NULL;
}

int
run_cases (int argc, char **argv, const struct test_case *cases, size_t n)
{
  unsigned ran = 0, failed = 0;

  if (argc == 2 && strcmp (argv[1], "--list") == 0) {
    for (size_t i = 0; i < n; i++)
      printf ("%s\n", cases[i].name);
    return 0;
  }
  for (int i = 1; i < argc; i++)
    if (!find_case (cases, n, argv[i])) {
      fprintf (stderr, "%s: no case named %s (--list shows them)\n",
               argv[0], argv[i]);
      return 2;
    }
  test_dir ();                  /* one directory for all, removed here */
  if (argc > 1)
    for (int i = 1; i < argc; i++, ran++)
      failed += !run_case (find_case (cases, n, argv[i]));
  else
    for (size_t i = 0; i < n; i++, ran++)
      failed += !run_case (&cases[i]);
  if (failed)
    fprintf (stderr, "%u of %u case(s) failed\n", failed, ran);
  return failed ? 1 : 0;
}

const char *const io_kind_names[] = { "data", "L1", "L2", "refcount block",
                                      "refcount table", "header",
                                      "fdatasync", "other" };

enum io_kind
classify_io (struct qcow2 *q, const struct aio_fake_record *r)
{
  if (r->type == AIO_FSYNC)
    return IO_SYNC;
  if (r->type != AIO_WRITE)
    return IO_OTHER;
  switch (qcow2_testing_classify (q, r->offset)) {
  case QCOW2_TESTING_HEADER: return IO_HEADER;
  case QCOW2_TESTING_L1: return IO_L1;
  case QCOW2_TESTING_REFTABLE: return IO_REFTABLE;
  case QCOW2_TESTING_L2: return IO_L2;
  case QCOW2_TESTING_REFBLOCK: return IO_REFBLOCK;
  case QCOW2_TESTING_OTHER: break;
  }
  return IO_DATA;
}
