/* fuzz/fuzz-qcow2-open.c: libFuzzer harness for the engine's handling of
 * untrusted image files: the header, extensions, L1/L2/refcount tables,
 * compressed clusters, backing names and snapshot tables.
 *
 * Each input is an image file.  It is opened read-write (so dirty images
 * are repaired and corrupt ones refused), then read, written, zeroed,
 * discarded, flushed and closed through the fake I/O backend, which runs
 * everything on this thread; then checked and repaired (qcow2_check, -r
 * all).  Any crash, hang, sanitizer report or leak is a finding.
 */
#include <config.h>

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <unistd.h>

#include "aio-fake.h"
#include "qcow2.h"

/* EFBIG means a request tried to grow the file past the harness's bound
 * (LLVMFuzzerInitialize): no image of max_len bytes may make one write
 * reserve that much, so it is a finding, not an error to shrug off.
 */
static void
done_cb (void *opaque, int ret)
{
  if (ret == -EFBIG)
    abort ();
  *(int *) opaque = ret;
}

static void
run (struct qcow2 *q, int *res)
{
  for (int spins = 0; *res == 1 && spins < 100000; spins++)
    qcow2_process (q);
}

static void
exercise (struct qcow2 *q)
{
  static char buf[1 << 20] __attribute__ ((aligned (4096)));
  struct qcow2_extent ext[16];
  uint64_t size = qcow2_size (q);
  uint64_t steps[] = { 0, 512, 65536, 1 << 20, size / 2, size - 1 };
  unsigned n;

  for (size_t i = 0; i < sizeof steps / sizeof steps[0]; i++) {
    uint64_t off = steps[i];
    uint64_t len = 70000;
    int res = 1;
    if (off >= size)
      continue;
    if (len > size - off)
      len = size - off;
    if (qcow2_read (q, off, buf, len, done_cb, &res) == 0)
      run (q, &res);
    res = 1;
    if (qcow2_block_status (q, off, size - off, ext, 16, &n, done_cb,
                            &res) == 0)
      run (q, &res);
    if (qcow2_read_only (q))
      continue;
    res = 1;
    memset (buf, (int) i, len);
    if (qcow2_write (q, off, buf, len, 0, done_cb, &res) == 0)
      run (q, &res);
    res = 1;
    if (qcow2_write_zeroes (q, off, len, 0, done_cb, &res) == 0)
      run (q, &res);
    res = 1;
    if (qcow2_discard (q, off, len, done_cb, &res) == 0)
      run (q, &res);
  }
  if (!qcow2_read_only (q)) {
    int res = 1;
    if (qcow2_flush (q, done_cb, &res) == 0)
      run (q, &res);
  }
}

/* The image lives in a memfd, whose blocks are memory: an image whose
 * metadata lies far beyond its end makes the first allocating write
 * reserve (fallocate) the whole gap, gigabytes of RAM here.  Files are
 * bounded instead, so that such growth fails with EFBIG (and done_cb
 * reports it) rather than exhausting the machine.
 */
int
LLVMFuzzerInitialize (int *argc, char ***argv)
{
  struct rlimit fsize = { 256 << 20, 256 << 20 };

  (void) argc;
  (void) argv;
  signal (SIGXFSZ, SIG_IGN);
  if (setrlimit (RLIMIT_FSIZE, &fsize) < 0)
    perror ("setrlimit RLIMIT_FSIZE");
  return 0;
}

int
LLVMFuzzerTestOneInput (const uint8_t *data, size_t size)
{
  struct qcow2_opts o = { 0 };
  struct qcow2 *q;
  struct aio *a;
  char path[64], err[256];
  int fd = memfd_create ("fuzz.qcow2", 0);

  if (fd < 0)
    return 0;
  if (write (fd, data, size) != (ssize_t) size || aio_fake_create (&a) < 0) {
    close (fd);
    return 0;
  }
  snprintf (path, sizeof path, "/proc/self/fd/%d", fd);
  o.aio = a;
  /* Backing and data file names are still parsed, resolved and checked,
   * but confined to the image's directory, /proc/self/fd, where every
   * entry resolves elsewhere: no host file is ever opened through them.
   */
  o.backing = QCOW2_BACKING_CONFINE;
  if (qcow2_open (path, &o, &q, err, sizeof err) == 0) {
    exercise (q);
    qcow2_close (q);
  }
  o.read_only = true;
  if (qcow2_open (path, &o, &q, err, sizeof err) == 0) {
    exercise (q);
    qcow2_close (q);
  }
  /* qnbd-img check -r all on the input as it came: its first pass is
   * the read-only check.
   */
  if (ftruncate (fd, 0) == 0
      && pwrite (fd, data, size, 0) == (ssize_t) size) {
    struct qcow2_check_opts co = { .fix = QCOW2_CHECK_FIX_ALL };
    struct qcow2_check_result res;
    qcow2_check (path, &co, &res, err, sizeof err);
  }
  aio_destroy (a);
  close (fd);
  return 0;
}
