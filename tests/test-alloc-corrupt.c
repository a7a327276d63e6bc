/* tests/test-alloc-corrupt.c: when the allocator finds that a cluster it
 * was about to hand out overlaps metadata, the image is corrupt: the write
 * that asked for it fails with EIO (it once failed with ENOMEM, as if the
 * server were short of memory, and the client retried), later writes fail
 * with EIO too, reads go on, and the header carries the corrupt bit.
 */
#include <config.h>

#include <errno.h>
#include <string.h>

#include "testlib.h"
#include "qcow2-testing.h"

#define CS 65536u

int
main (void)
{
  char *path = make_image ("alloc-corrupt.qcow2", "cluster_size=65536",
                           64u << 20);
  struct qcow2 *q = open_image (path, NULL, false);
  uint8_t buf[CS], back[CS];
  int r;

  /* Free a cluster: write, discard, and flush until its zero refcount is
   * durable and it has been handed to the allocator.
   */
  fill_pattern (buf, CS, 1);
  CHECK (sync_write (q, 0, buf, CS, 0) == 0, "first write");
  fill_pattern (buf, CS, 2);
  CHECK (sync_write (q, 4 * CS, buf, CS, 0) == 0, "write kept");
  CHECK (sync_flush (q) == 0, "flush");
  CHECK (sync_discard (q, 0, CS) == 0, "discard");
  for (int i = 0; i < 3; i++)
    CHECK (sync_flush (q) == 0, "flush %d", i);

  qcow2_testing_overlap_next_reuse ();
  r = sync_write (q, 8 * CS, buf, CS, 0);
  CHECK (r == -EIO, "the write that met the overlap fails with EIO, "
         "not %d (%s)", r, strerror (-r));
  r = sync_write (q, 12 * CS, buf, CS, 0);
  CHECK (r == -EIO, "later writes fail with EIO, not %d", r);
  CHECK (sync_read (q, 4 * CS, back, CS) == 0 && memcmp (back, buf, CS) == 0,
         "reads go on");
  qcow2_close (q);
  CHECK (shell ("qemu-img info %s | grep -q 'corrupt: true'", path) == 0,
         "the header says corrupt");
  free (path);
  return test_exit ();
}
