/* tests/test-open-bounds.c: a small hostile image cannot make open
 * expensive.  Tables and table offsets read at open must lie inside the
 * file, and the repair of a dirty image sizes itself from the file, not
 * from what its refcounts claim: a 9 MiB image whose refcount table counts
 * a cluster at 2 TiB must neither grow the file nor take long.
 */
#include <config.h>

#include <fcntl.h>
#include <inttypes.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "testlib.h"

#define CS 65536u

static uint64_t
get64 (int fd, uint64_t off)
{
  uint64_t v = 0;
  if (pread (fd, &v, 8, (off_t) off) != 8)
    exit (1);
  return be64toh (v);
}

static void
put64 (int fd, uint64_t off, uint64_t v)
{
  v = htobe64 (v);
  if (pwrite (fd, &v, 8, (off_t) off) != 8)
    exit (1);
}

static void
put32 (int fd, uint64_t off, uint32_t v)
{
  v = htobe32 (v);
  if (pwrite (fd, &v, 4, (off_t) off) != 4)
    exit (1);
}

static uint64_t
file_size (const char *path)
{
  struct stat st;
  return stat (path, &st) == 0 ? (uint64_t) st.st_size : 0;
}

static double
now (void)
{
  struct timespec ts;
  clock_gettime (CLOCK_MONOTONIC, &ts);
  return (double) ts.tv_sec + (double) ts.tv_nsec / 1e9;
}

static long
max_rss_kib (void)
{
  struct rusage ru;
  getrusage (RUSAGE_SELF, &ru);
  return ru.ru_maxrss;
}

/* A 64 MiB disk, 64 KiB clusters, 8 MiB of data (a 9 MiB file), opened
 * by fd for patching.
 */
static char *
make_victim (const char *name, const char *opts, int *fd)
{
  char *path = make_image (name, opts, 64u << 20);
  CHECK (shell ("qemu-io -f qcow2 -c 'write -q -P 0x5a 0 8M' '%s'",
                path) == 0, "qemu-io write");
  *fd = open (path, O_RDWR);
  CHECK (*fd >= 0, "open %s", path);
  return path;
}

static int
try_open (const char *path, bool ro, char *err, size_t errlen)
{
  struct qcow2_opts o = { .read_only = ro };
  struct qcow2 *q = NULL;
  int r;

  err[0] = '\0';
  r = qcow2_open (path, &o, &q, err, errlen);
  if (r == 0)
    r = qcow2_close (q);
  return r;
}

static void
expect_refused (const char *what, const char *path, bool ro,
                const char *needle)
{
  char err[300];
  uint64_t before = file_size (path);
  double t0 = now ();
  int r = try_open (path, ro, err, sizeof err);

  CHECK (r < 0, "%s: opened", what);
  CHECK (strstr (err, needle) != NULL, "%s: message '%s' lacks '%s'", what,
         err, needle);
  CHECK (file_size (path) == before, "%s: the file changed size", what);
  CHECK (now () - t0 < 5, "%s: open took %.1f s", what, now () - t0);
  printf ("ok - %s: %s\n", what, err);
}

int
main (void)
{
  char err[300], *path;
  uint64_t reft, l1, size;
  int fd;

  require_qemu_img ();
  alarm (120);                  /* the unfixed repair writes for long */

  /* Dirty (lazy refcounts), and a refcount table entry far out naming the
   * first refcount block again: its counts then claim clusters at 2 TiB.
   */
  {
    long rss0 = max_rss_kib ();
    double t0;
    path = make_victim ("far.qcow2", "cluster_size=65536,lazy_refcounts=on",
                        &fd);
    reft = get64 (fd, 48);
    put64 (fd, reft + 1024 * 8, get64 (fd, reft));
    put64 (fd, 72, get64 (fd, 72) | 1);       /* dirty */
    close (fd);
    size = file_size (path);
    t0 = now ();
    CHECK (try_open (path, false, err, sizeof err) == 0, "far: %s", err);
    printf ("far refcounts: repaired in %.2f s, file %" PRIu64 " -> %"
            PRIu64 " bytes, max RSS +%ld KiB\n", now () - t0, size,
            file_size (path), max_rss_kib () - rss0);
    CHECK (now () - t0 < 5, "far: repair took %.1f s", now () - t0);
    CHECK (file_size (path) < size + (1u << 20), "far: file grew to %"
           PRIu64, file_size (path));
    CHECK (max_rss_kib () - rss0 < 64 * 1024, "far: RSS grew by %ld KiB",
           max_rss_kib () - rss0);
    CHECK (qemu_img_check_clean (path), "far: check after repair");
    free (path);
  }

  /* The same far refcounts on a clean image: the first allocating write
   * must not reserve the gap up to the cluster they claim (2 TiB).  The
   * file size limit turns such a reservation into EFBIG, not a full disk.
   */
  {
    struct rlimit fsize = { 1ull << 30, 1ull << 30 }, old;
    struct qcow2 *q;
    uint8_t *buf = malloc (CS), *back = malloc (CS);
    CHECK (buf && back, "malloc");
    path = make_victim ("farclean.qcow2", "cluster_size=65536", &fd);
    reft = get64 (fd, 48);
    put64 (fd, reft + 1024 * 8, get64 (fd, reft));
    close (fd);
    size = file_size (path);
    getrlimit (RLIMIT_FSIZE, &old);
    signal (SIGXFSZ, SIG_IGN);
    setrlimit (RLIMIT_FSIZE, &fsize);
    q = open_image (path, NULL, false);
    memset (buf, 0xc3, CS);
    CHECK (sync_write (q, 32u << 20, buf, CS, 0) == 0,
           "far, clean: allocating write failed");
    CHECK (sync_flush (q) == 0, "far, clean: flush");
    CHECK (sync_read (q, 32u << 20, back, CS) == 0
           && memcmp (buf, back, CS) == 0, "far, clean: read back");
    CHECK (qcow2_close (q) == 0, "far, clean: close");
    setrlimit (RLIMIT_FSIZE, &old);
    printf ("far refcounts, clean image: file %" PRIu64 " -> %" PRIu64
            " bytes\n", size, file_size (path));
    CHECK (file_size (path) < size + (1u << 20), "far, clean: file grew to %"
           PRIu64, file_size (path));
    CHECK (qemu_img_check_clean (path), "far, clean: check after write");
    free (buf);
    free (back);
    free (path);
  }

  /* A refcount block past the end of the file. */
  path = make_victim ("rb.qcow2", "cluster_size=65536", &fd);
  reft = get64 (fd, 48);
  put64 (fd, reft + 8, 1ull << 40);
  close (fd);
  expect_refused ("refcount block past the end", path, false,
                  "refcount block offset 0x10000000000 is past the end of "
                  "the file");
  free (path);

  /* An L2 table past the end of the file, read-write and read-only. */
  path = make_victim ("l2.qcow2", "cluster_size=65536", &fd);
  l1 = get64 (fd, 40);
  put64 (fd, l1, (1ull << 63) | (1ull << 40));
  close (fd);
  expect_refused ("L2 table past the end", path, false,
                  "L2 table offset 0x10000000000 is past the end of the "
                  "file");
  expect_refused ("L2 table past the end, read-only", path, true,
                  "L2 table offset 0x10000000000 is past the end of the "
                  "file");
  free (path);

  /* The header's own tables past the end. */
  path = make_victim ("hdr.qcow2", "cluster_size=65536", &fd);
  reft = get64 (fd, 48);
  put64 (fd, 48, 1ull << 41);
  close (fd);
  expect_refused ("refcount table past the end", path, false,
                  "refcount table offset 0x20000000000 is past the end of "
                  "the file");
  fd = open (path, O_RDWR);
  put64 (fd, 48, reft);
  l1 = get64 (fd, 40);
  put64 (fd, 40, 1ull << 41);
  close (fd);
  expect_refused ("L1 table past the end", path, true,
                  "L1 table offset 0x20000000000 is past the end of the "
                  "file");
  fd = open (path, O_RDWR);
  put64 (fd, 40, l1);
  put32 (fd, 60, 1);                        /* one snapshot ... */
  put64 (fd, 64, 1ull << 41);               /* ... far away */
  close (fd);
  expect_refused ("snapshot table past the end", path, false,
                  "snapshot table offset 0x20000000000 is past the end of "
                  "the file");
  free (path);

  /* Dirty, with a long L1 table whose every entry names the same L2
   * table: the repair must not read that table thousands of times.
   */
  path = make_victim ("samel2.qcow2", "cluster_size=65536,lazy_refcounts=on",
                      &fd);
  {
    uint64_t e;
    l1 = get64 (fd, 40);
    e = get64 (fd, l1);
    for (unsigned i = 1; i < CS / 8; i++)
      put64 (fd, l1 + i * 8, e);
    put32 (fd, 36, CS / 8);
    put64 (fd, 72, get64 (fd, 72) | 1);
  }
  close (fd);
  expect_refused ("one L2 table named many times", path, false,
                  "used twice");
  free (path);

  /* A snapshot whose L1 table lies past the end of the file. */
  path = make_image ("snap.qcow2", "cluster_size=65536", 64u << 20);
  CHECK (shell ("qemu-io -f qcow2 -c 'write -q -P 1 0 1M' '%s' && "
                "qemu-img snapshot -c s1 '%s'", path, path) == 0, "snapshot");
  fd = open (path, O_RDWR);
  put64 (fd, get64 (fd, 64), 1ull << 41);
  close (fd);
  {
    struct qcow2_opts o = { .read_only = true, .snapshot = "s1" };
    struct qcow2 *q = NULL;
    int r = qcow2_open (path, &o, &q, err, sizeof err);
    CHECK (r < 0 && strstr (err, "L1 table offset 0x20000000000 is past the "
                            "end of the file"), "snapshot L1: %d %s", r, err);
    printf ("ok - snapshot L1 past the end: %s\n", err);
  }
  free (path);

  return test_exit ();
}
