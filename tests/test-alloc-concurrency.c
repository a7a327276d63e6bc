/* tests/test-alloc-concurrency.c: the per-L2-table allocation queues.
 *
 * With the fake backend holding every I/O, allocating writes into different
 * L2 tables, and into different clusters of one L2 table, must all have
 * their data writes in flight at once; a write into a cluster whose
 * allocation is in flight must wait for it.  Completions are released out
 * of order, and the final image must be correct and clean.
 */
#include <config.h>

#include <string.h>

#include "aio-fake.h"
#include "testlib.h"

static int results[8];

static void
done_cb (void *opaque, int ret)
{
  *(int *) opaque = ret;
}

static unsigned
held_writes (struct aio *a)
{
  unsigned n = 0;
  for (unsigned i = 0; i < aio_fake_held (a); i++) {
    struct aio_fake_record r;
    if (aio_fake_held_info (a, i, &r) == 0 && r.type == AIO_WRITE)
      n++;
  }
  return n;
}

int
main (void)
{
  const uint64_t size = 64 << 20, cs = 4096;
  const uint64_t l2_cover = cs * (cs / 8);       /* 2 MiB per L2 table */
  uint8_t *shadow = calloc (1, size), *buf[5];
  struct aio *a;
  struct qcow2 *q;
  char *path;

  require_qemu_img ();
  path = make_image ("conc.qcow2", "cluster_size=4096", size);
  if (aio_fake_create (&a) < 0)
    return 1;
  q = open_image (path, a, false);

  for (int i = 0; i < 5; i++) {
    if (posix_memalign ((void **) &buf[i], 4096, 8192))
      return 1;
    fill_pattern (buf[i], 8192, (uint64_t) i + 1);
    results[i] = 1;
  }

  aio_fake_set_hold (a, true);
  /* A: L2 table 0, partial cluster 2 (needs COW of zeros: one write). */
  CHECK (qcow2_write (q, 2 * cs + 100, buf[0], 1000, 0, done_cb,
                      &results[0]) == 0, "submit A");
  /* B: L2 table 3. */
  CHECK (qcow2_write (q, 3 * l2_cover + 5 * cs, buf[1], cs, 0, done_cb,
                      &results[1]) == 0, "submit B");
  /* C: L2 table 0 again, a different cluster. */
  CHECK (qcow2_write (q, 7 * cs, buf[2], 2 * cs, 0, done_cb,
                      &results[2]) == 0, "submit C");
  qcow2_process (q);
  CHECK (held_writes (a) == 3, "A, B and C in flight together (held %u)",
         held_writes (a));

  /* D: the same cluster as A: must wait for A's allocation. */
  CHECK (qcow2_write (q, 2 * cs + 2000, buf[3], 500, 0, done_cb,
                      &results[3]) == 0, "submit D");
  /* E: L2 table 5: independent of everything, goes at once. */
  CHECK (qcow2_write (q, 5 * l2_cover, buf[4], cs, 0, done_cb,
                      &results[4]) == 0, "submit E");
  qcow2_process (q);
  CHECK (held_writes (a) == 4, "D waits, E goes (held %u)", held_writes (a));

  /* Release newest first: E, C, B, then A; D must follow A. */
  aio_fake_release_all (a, true);
  qcow2_process (q);
  CHECK (results[4] == 0 && results[2] == 0 && results[1] == 0
         && results[0] == 0, "A B C E done: %d %d %d %d", results[0],
         results[1], results[2], results[4]);
  CHECK (results[3] == 1, "D not done before its write ran");
  CHECK (held_writes (a) == 1, "D's write submitted after A linked (held %u)",
         held_writes (a));
  aio_fake_release_all (a, false);
  qcow2_process (q);
  CHECK (results[3] == 0, "D done");
  aio_fake_set_hold (a, false);

  memcpy (shadow + 2 * cs + 100, buf[0], 1000);
  memcpy (shadow + 3 * l2_cover + 5 * cs, buf[1], cs);
  memcpy (shadow + 7 * cs, buf[2], 2 * cs);
  memcpy (shadow + 2 * cs + 2000, buf[3], 500);
  memcpy (shadow + 5 * l2_cover, buf[4], cs);
  CHECK (engine_equals (q, shadow, size), "contents");

  /* Many allocating writes in flight, completed in reverse order. */
  aio_fake_set_hold (a, true);
  {
    static uint8_t data[64][4096];
    int res[64];
    for (int i = 0; i < 64; i++) {
      uint64_t off = (uint64_t) (i * 37 % 64) * l2_cover / 4 + (uint64_t) i * cs;
      fill_pattern (data[i], cs, 100 + (uint64_t) i);
      res[i] = 1;
      CHECK (qcow2_write (q, off, data[i], cs, 0, done_cb, &res[i]) == 0,
             "submit %d", i);
      memcpy (shadow + off, data[i], cs);
    }
    qcow2_process (q);
    CHECK (held_writes (a) == 64, "64 allocating writes in flight (%u)",
           held_writes (a));
    aio_fake_release_all (a, true);
    qcow2_process (q);
    aio_fake_set_hold (a, false);
    for (int i = 0; i < 64; i++)
      CHECK (res[i] == 0, "write %d: %d", i, res[i]);
  }
  CHECK (engine_equals (q, shadow, size), "contents after reverse release");
  CHECK (qcow2_close (q) == 0, "close");
  aio_destroy (a);
  CHECK (qemu_img_check_clean (path), "qemu-img check");
  CHECK (qemu_img_compare (path, shadow, size), "qemu-img compare");
  for (int i = 0; i < 5; i++)
    free (buf[i]);
  free (shadow);
  free (path);
  printf ("ok - per-L2 allocation concurrency\n");
  return test_exit ();
}
