/* tests/test-header-bad.c: images the engine must refuse at open, each with
 * a message that names the problem, and never a crash.  The headers are
 * built by hand so that every field can be wrong.
 */
#include <config.h>

#include <endian.h>
#include <fcntl.h>
#include <string.h>
#include <unistd.h>

#include "testlib.h"

static uint8_t img[3 * 65536];

static void
put32 (size_t off, uint32_t v)
{
  v = htobe32 (v);
  memcpy (img + off, &v, 4);
}

static void
put64 (size_t off, uint64_t v)
{
  v = htobe64 (v);
  memcpy (img + off, &v, 8);
}

/* A valid empty v3 image: header, reftable at cluster 1, refblock at 2,
 * L1 at cluster 3 ... we keep everything in 4 KiB clusters.
 */
static void
good_image (void)
{
  memset (img, 0, sizeof img);
  put32 (0, 0x514649fb);
  put32 (4, 3);
  put32 (20, 12);                       /* 4 KiB clusters */
  put64 (24, 1 << 20);                  /* 1 MiB disk */
  put32 (36, 1);                        /* one L1 entry */
  put64 (40, 3 * 4096);
  put64 (48, 1 * 4096);
  put32 (56, 1);
  put32 (96, 4);
  put32 (100, 104);
  put64 (4096, 2 * 4096);               /* reftable[0] -> refblock */
  for (int i = 0; i < 4; i++)           /* clusters 0..3: refcount 1 */
    img[2 * 4096 + 2 * i + 1] = 1;
}

static void
expect_refused (const char *what, size_t len, const char *needle)
{
  char path[512], err[256] = "";
  struct qcow2 *q = NULL;
  int fd, r;

  snprintf (path, sizeof path, "%s/bad.qcow2", test_dir ());
  fd = open (path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
  if (fd < 0 || write (fd, img, len) != (ssize_t) len || close (fd) < 0)
    exit (1);
  r = qcow2_open (path, NULL, &q, err, sizeof err);
  CHECK (r < 0, "%s: opened", what);
  CHECK (strstr (err, needle) != NULL, "%s: message '%s' lacks '%s'", what,
         err, needle);
  if (r == 0)
    qcow2_close (q);
  printf ("ok - %s: %s\n", what, err);
}

int
main (void)
{
  char path[512], err[256];
  struct qcow2 *q;
  int fd;

  /* The hand-made image itself opens. */
  good_image ();
  snprintf (path, sizeof path, "%s/good.qcow2", test_dir ());
  fd = open (path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
  if (fd < 0 || write (fd, img, 4 * 4096) != 4 * 4096 || close (fd) < 0)
    return 1;
  CHECK (qcow2_open (path, NULL, &q, err, sizeof err) == 0, "good: %s", err);
  qcow2_close (q);

  good_image ();
  expect_refused ("empty file", 0, "too short");
  good_image ();
  put32 (0, 0x12345678);
  expect_refused ("bad magic", 4 * 4096, "not a qcow2 image (use -f raw");
  good_image ();
  put32 (4, 4);
  expect_refused ("version 4", 4 * 4096, "version 4");
  good_image ();
  put32 (20, 8);
  expect_refused ("cluster_bits 8", 4 * 4096, "cluster_bits");
  good_image ();
  put32 (20, 40);
  expect_refused ("cluster_bits 40", 4 * 4096, "cluster_bits");
  good_image ();
  put32 (32, 1);
  expect_refused ("encryption", 4 * 4096, "encrypted");
  good_image ();
  put64 (72, 1ull << 9);
  expect_refused ("unknown incompatible bit", 4 * 4096, "bit 9");
  good_image ();
  put64 (72, 1ull << 4);        /* extended L2 needs 16k clusters */
  expect_refused ("extended L2 with 4k clusters", 4 * 4096, "16384");
  good_image ();
  put64 (72, 1ull << 1);
  expect_refused ("corrupt bit", 4 * 4096, "corrupt");
  good_image ();
  put32 (36, 0);
  expect_refused ("L1 too small", 4 * 4096, "too small");
  good_image ();
  put32 (36, 0x10000000);
  expect_refused ("huge l1_size", 4 * 4096, "too large");
  good_image ();
  put64 (40, 1ull << 50);
  expect_refused ("L1 past the end", 4 * 4096, "past the end of the file");
  good_image ();
  put64 (40, 3 * 4096 + 8);
  expect_refused ("L1 unaligned", 4 * 4096, "unaligned");
  good_image ();
  put64 (48, 99 * 4096);
  expect_refused ("reftable past the end", 4 * 4096, "refcount table");
  good_image ();
  put32 (56, 0);
  expect_refused ("reftable empty", 4 * 4096, "refcount table");
  good_image ();
  put32 (100, 7);
  expect_refused ("bad header_length", 4 * 4096, "header_length");
  good_image ();
  put32 (96, 7);
  expect_refused ("refcount_order 7", 4 * 4096, "refcount_order");
  good_image ();
  put64 (8, 4000);
  put32 (16, 5);
  expect_refused ("backing file", 4 * 4096, "backing");
  good_image ();
  put32 (104, 0x12345);
  put32 (108, 100000);                  /* extension longer than the cluster */
  expect_refused ("runaway extension", 4 * 4096, "extension");
  good_image ();
  expect_refused ("truncated", 100, "truncated");
  return test_exit ();
}
