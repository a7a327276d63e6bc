/* tests/test-flush-order.c: the write ordering of DESIGN.md.
 *
 * Allocating writes issue only data writes; metadata goes out at flush, in
 * the order data -> refcount blocks -> fdatasync -> L2 tables -> fdatasync
 * -> L1 -> fdatasync, which is what keeps the image consistent whatever
 * subset of unsynced writes a crash keeps.
 */
#include <config.h>

#include <string.h>

#include "aio-fake.h"
#include "testlib.h"

int
main (void)
{
  const uint64_t size = 256 << 20;
  uint8_t *buf;
  struct aio *a;
  struct qcow2 *q;
  char *path;
  size_t n;
  const struct aio_fake_record *log;
  enum io_kind k[4096];
  int first_sync = -1, last_rb = -1, first_l2 = -1, last_l2 = -1, l1 = -1;
  int sync_between_l2_l1 = 0, last = -1;

  require_qemu_img ();
  path = make_image ("order.qcow2", "cluster_size=65536", size);
  if (aio_fake_create (&a) < 0 || posix_memalign ((void **) &buf, 4096, 65536))
    return 1;
  q = open_image (path, a, false);

  fill_pattern (buf, 65536, 7);
  for (int i = 0; i < 6; i++)
    CHECK (sync_write (q, (uint64_t) i * (40 << 20) + 4096, buf, 8192, 0)
           == 0, "write %d", i);

  log = aio_fake_log (a, &n);
  for (size_t i = 0; i < n; i++)
    CHECK (classify_io (q, &log[i]) == IO_DATA
           || classify_io (q, &log[i]) == IO_OTHER,
           "op %zu before the flush is %s, "
           "not data: metadata must wait for a flush", i,
           io_kind_names[classify_io (q, &log[i])]);

  aio_fake_clear_log (a);
  CHECK (sync_flush (q) == 0, "flush");
  log = aio_fake_log (a, &n);
  CHECK (n < 4096, "log size");
  for (size_t i = 0; i < n && i < 4096; i++) {
    k[i] = classify_io (q, &log[i]);
    if (getenv ("TEST_VERBOSE"))
      fprintf (stderr, "%zu: %s 0x%llx+%llu\n", i, io_kind_names[k[i]],
               (unsigned long long) log[i].offset,
               (unsigned long long) log[i].length);
    switch (k[i]) {
    case IO_SYNC:
      if (first_sync < 0)
        first_sync = (int) i;
      if (last_l2 >= 0 && l1 < 0)
        sync_between_l2_l1 = 1;
      break;
    case IO_REFBLOCK: last_rb = (int) i; break;
    case IO_L2:
      if (first_l2 < 0)
        first_l2 = (int) i;
      last_l2 = (int) i;
      break;
    case IO_L1: l1 = (int) i; break;
    case IO_DATA:
      CHECK (0, "data write during flush at op %zu", i);
      break;
    default: break;
    }
    last = (int) i;
  }
  CHECK (last_rb >= 0, "refcount blocks written");
  CHECK (first_l2 >= 0 && l1 >= 0, "L2 tables and L1 written");
  CHECK (last_rb < first_sync && first_sync < first_l2,
         "refcount blocks, then sync, then L2 (%d %d %d)", last_rb,
         first_sync, first_l2);
  CHECK (sync_between_l2_l1 && last_l2 < l1, "L2, sync, then L1");
  CHECK (last >= 0 && k[last] == IO_SYNC, "ends with a sync");

  /* A second flush with nothing new is a single fdatasync. */
  aio_fake_clear_log (a);
  CHECK (sync_flush (q) == 0, "flush 2");
  log = aio_fake_log (a, &n);
  CHECK (n == 1 && log[0].type == AIO_FSYNC, "idle flush is one sync (%zu)",
         n);

  /* FUA: the write and its metadata are durable when it completes. */
  aio_fake_clear_log (a);
  CHECK (sync_write (q, 100 << 20, buf, 4096, QCOW2_WRITE_FUA) == 0, "fua");
  log = aio_fake_log (a, &n);
  CHECK (n >= 3 && log[n - 1].type == AIO_FSYNC, "FUA ends with a sync");

  CHECK (qcow2_close (q) == 0, "close");
  aio_destroy (a);
  CHECK (qemu_img_check_clean (path), "qemu-img check");
  free (buf);
  free (path);
  printf ("ok - flush order\n");
  return test_exit ();
}
