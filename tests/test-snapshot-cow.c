/* tests/test-snapshot-cow.c: writing to an image with an internal snapshot
 * never modifies a cluster (data or L2 table) whose refcount is above one;
 * the snapshot reads back unchanged, the active layer has the new data, and
 * qemu-img check finds no errors and no leaks.
 */
#include <config.h>

#include <string.h>

#include "testlib.h"

int
main (void)
{
  const uint64_t size = 16 << 20;
  uint8_t *shadow = malloc (size), *buf;
  struct qcow2 *q;
  char *path;
  int st;

  require_qemu_img ();
  path = make_image ("snap.qcow2", "cluster_size=4096", size);
  st = shell ("qemu-io -f qcow2 -c 'write -q -P 0xaa 0 6M' "
              "-c 'write -q -P 0xbb 10M 1M' '%s' >/dev/null", path);
  CHECK (st == 0, "qemu-io");
  st = shell ("qemu-img snapshot -c snap1 '%s'", path);
  CHECK (st == 0, "snapshot");
  memset (shadow, 0, size);
  memset (shadow, 0xaa, 6 << 20);
  memset (shadow + (10 << 20), 0xbb, 1 << 20);

  if (posix_memalign ((void **) &buf, 4096, 3 << 20))
    return 1;
  q = open_image (path, NULL, false);
  for (int i = 0; i < 40; i++) {
    uint64_t len = 1 + rnd () % (3 << 20);
    uint64_t off = rnd () % (size - len);
    fill_pattern (buf, len, (uint64_t) i + 50);
    CHECK (sync_write (q, off, buf, len, 0) == 0, "write %d", i);
    memcpy (shadow + off, buf, len);
  }
  CHECK (engine_equals (q, shadow, size), "active contents");
  CHECK (qcow2_close (q) == 0, "close");
  CHECK (qemu_img_check_clean (path), "qemu-img check");
  CHECK (qemu_img_compare (path, shadow, size), "active compare");

  /* The snapshot still holds the old data. */
  st = shell ("qemu-img convert -l snapshot.name=snap1 -O raw '%s' "
              "'%s.snap.raw'", path, path);
  CHECK (st == 0, "convert the snapshot");
  st = shell ("qemu-io -f raw -c 'read -q -P 0xaa 0 6M' "
              "-c 'read -q -P 0 6M 4M' -c 'read -q -P 0xbb 10M 1M' "
              "-c 'read -q -P 0 11M 5M' '%s.snap.raw' | grep -q Pattern",
              path);
  CHECK (st != 0, "snapshot data changed");
  free (shadow);
  free (buf);
  free (path);
  printf ("ok - snapshot copy-on-write\n");
  return test_exit ();
}
