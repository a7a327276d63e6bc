/* tests/test-zero-discard.c: write-zeroes (with and without NO_HOLE and
 * FAST_ZERO), discard and block status on v3 and v2 images: contents match
 * a shadow copy, block status matches what each cluster should be, freed
 * space is punched out of the file, and qemu-img check finds no errors and
 * no leaks.
 */
#include <config.h>

#include <errno.h>
#include <string.h>
#include <sys/stat.h>

#include "testlib.h"

#define CS 65536u
#define SIZE (32u << 20)
#define NCL (SIZE / CS)

enum { C_HOLE, C_DATA, C_ZERO };       /* what block status must say */

static uint8_t shadow[SIZE];
static int state[NCL];

static void
done_cb (void *opaque, int ret)
{
  *(int *) opaque = ret;
}

static int
zeroes (struct qcow2 *q, uint64_t off, uint64_t len, unsigned flags)
{
  int res = 1, r = qcow2_write_zeroes (q, off, len, flags, done_cb, &res);
  if (r < 0)
    return r;
  run_until (q, &res);
  return res;
}

/* Block status over the whole disk, compared with state[]. */
static void
check_status (struct qcow2 *q, bool v3)
{
  struct qcow2_extent ext[64];
  uint64_t off = 0;

  while (off < SIZE) {
    unsigned n = 0;
    int res = 1;
    CHECK (qcow2_block_status (q, off, SIZE - off, ext, 64, &n, done_cb,
                               &res) == 0, "status submit");
    run_until (q, &res);
    CHECK (res == 0 && n > 0, "status %d n=%u", res, n);
    if (res != 0 || n == 0)
      return;
    for (unsigned i = 0; i < n; i++) {
      for (uint64_t p = off; p < off + ext[i].length; p += CS) {
        int st = state[p / CS];
        uint32_t want = st == C_DATA ? 0
          : QCOW2_EXTENT_HOLE | QCOW2_EXTENT_ZERO;
        CHECK (ext[i].flags == want, "cluster %llu: flags %u want %u (v%d)",
               (unsigned long long) (p / CS), ext[i].flags, want, v3 ? 3 : 2);
        if (st == C_HOLE)
          CHECK (ext[i].depth == 0, "hole depth");
        if (st == C_DATA)
          CHECK (ext[i].depth == 1, "data depth");
      }
      off += ext[i].length;
    }
  }
}

/* qcow2_read_map over the whole disk: zero extents are zeros in the
 * shadow, and clusters known to be holes or zero are reported as such.
 */
static void
check_read_map (struct qcow2 *q)
{
  const uint64_t chunk = 4 << 20;
  struct qcow2_extent map[256];
  uint8_t *buf;

  if (posix_memalign ((void **) &buf, 4096, chunk))
    exit (1);
  for (uint64_t off = 0; off < SIZE; off += chunk) {
    unsigned n = 0;
    int res = 1;
    uint64_t pos = off;
    CHECK (qcow2_read_map (q, off, buf, chunk, map, 256, &n, done_cb, &res)
           == 0, "read_map submit");
    run_until (q, &res);
    CHECK (res == 0 && n > 0, "read_map %d", res);
    CHECK (memcmp (buf, shadow + off, chunk) == 0, "read_map data");
    for (unsigned i = 0; i < n; i++) {
      bool zero = map[i].flags & QCOW2_EXTENT_ZERO;
      for (uint64_t p = pos; p < pos + map[i].length; p += CS) {
        if (zero)
          CHECK (shadow[p] == 0 && shadow[p + CS - 1] == 0,
                 "zero extent over data at %llu", (unsigned long long) p);
        else
          CHECK (state[p / CS] == C_DATA, "cluster %llu is %d but read as "
                 "data", (unsigned long long) (p / CS), state[p / CS]);
      }
      pos += map[i].length;
    }
    CHECK (pos == off + chunk, "read_map covers the read");
  }
  free (buf);
}

static void
run (const char *name, const char *opts, bool v3)
{
  char *path = make_image (name, opts, SIZE);
  struct qcow2 *q = open_image (path, NULL, false);
  uint8_t *buf;
  struct stat st1, st2;

  if (posix_memalign ((void **) &buf, 4096, 4 << 20))
    exit (1);
  memset (shadow, 0, SIZE);
  for (unsigned i = 0; i < NCL; i++)
    state[i] = C_HOLE;
  check_status (q, v3);

  /* Fill the first 24 MiB with data. */
  for (uint64_t off = 0; off < (24u << 20); off += 4 << 20) {
    fill_pattern (buf, 4 << 20, off);
    CHECK (sync_write (q, off, buf, 4 << 20, 0) == 0, "fill");
    memcpy (shadow + off, buf, 4 << 20);
  }
  for (unsigned i = 0; i < (24u << 20) / CS; i++)
    state[i] = C_DATA;
  CHECK (sync_flush (q) == 0, "flush");
  check_status (q, v3);

  /* Aligned write-zeroes: zero flag (v3) or unallocated (v2). */
  CHECK (zeroes (q, 2 * CS, 3 * CS, 0) == 0, "zeroes aligned");
  memset (shadow + 2 * CS, 0, 3 * CS);
  for (int i = 2; i < 5; i++)
    state[i] = v3 ? C_ZERO : C_HOLE;

  /* NO_HOLE: allocation kept; reads as zeros. */
  CHECK (zeroes (q, 8 * CS, 2 * CS, QCOW2_ZERO_NO_HOLE) == 0, "no_hole");
  memset (shadow + 8 * CS, 0, 2 * CS);
  for (int i = 8; i < 10; i++)
    state[i] = v3 ? C_ZERO : C_DATA;

  /* Unaligned: partial clusters written with zeros. */
  CHECK (zeroes (q, 12 * CS + 1000, 2 * CS, 0) == 0, "zeroes unaligned");
  memset (shadow + 12 * CS + 1000, 0, 2 * CS);
  state[13] = v3 ? C_ZERO : C_HOLE;

  /* FAST_ZERO: fine when no data must be written, refused otherwise. */
  CHECK (zeroes (q, 16 * CS, CS, QCOW2_ZERO_FAST) == 0, "fast aligned");
  memset (shadow + 16 * CS, 0, CS);
  state[16] = v3 ? C_ZERO : C_HOLE;
  CHECK (zeroes (q, 18 * CS + 512, 512, QCOW2_ZERO_FAST) == -ENOTSUP,
         "fast unaligned refused");
  /* Refused before anything changes: the aligned part stays as it was. */
  CHECK (zeroes (q, 17 * CS, CS + 512, QCOW2_ZERO_FAST) == -ENOTSUP,
         "fast with a partial cluster refused");

  /* Discard: whole clusters released, partial ones left alone. */
  CHECK (sync_discard (q, 20 * CS + 100, 3 * CS) == 0, "discard");
  memset (shadow + 21 * CS, 0, 2 * CS);
  state[21] = state[22] = C_HOLE;

  /* Zeroes over a range with no L2 table, and past written data. */
  CHECK (zeroes (q, SIZE - 3 * CS, 3 * CS, 0) == 0, "zeroes unallocated");
  CHECK (sync_discard (q, SIZE - 3 * CS, 3 * CS) == 0, "discard unallocated");

  /* Writing into a zeroed cluster allocates again. */
  fill_pattern (buf, 5000, 99);
  CHECK (sync_write (q, 3 * CS + 10, buf, 5000, 0) == 0, "rewrite");
  memcpy (shadow + 3 * CS + 10, buf, 5000);
  state[3] = C_DATA;
  fill_pattern (buf, 700, 98);
  CHECK (sync_write (q, 8 * CS + 10, buf, 700, 0) == 0, "rewrite no_hole");
  memcpy (shadow + 8 * CS + 10, buf, 700);
  state[8] = C_DATA;

  CHECK (engine_equals (q, shadow, SIZE), "contents (%s)", opts);
  check_status (q, v3);
  check_read_map (q);
  CHECK (stat (path, &st1) == 0, "stat");
  CHECK (qcow2_close (q) == 0, "close");
  CHECK (stat (path, &st2) == 0, "stat");
  CHECK (st2.st_blocks < st1.st_blocks, "freed clusters punched (%lld -> "
         "%lld blocks)", (long long) st1.st_blocks, (long long) st2.st_blocks);
  CHECK (qemu_img_check_clean (path), "check (%s)", opts);
  CHECK (qemu_img_compare (path, shadow, SIZE), "compare (%s)", opts);

  /* Reopened, the state is the same. */
  q = open_image (path, NULL, true);
  check_status (q, v3);
  qcow2_close (q);
  free (buf);
  free (path);
  printf ("ok - %s\n", opts);
}

int
main (void)
{
  require_qemu_img ();
  run ("zd3.qcow2", "cluster_size=65536", true);
  run ("zd2.qcow2", "compat=0.10,cluster_size=65536", false);
  return test_exit ();
}
