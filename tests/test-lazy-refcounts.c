/* tests/test-lazy-refcounts.c: images with lazy_refcounts=on are written
 * with the dirty bit set; one left dirty (by a process that died without
 * closing it, or by QEMU killed mid-write) has its refcounts rebuilt at the
 * next read-write open; a clean close clears the bit.  Also: serving an
 * internal snapshot read-only by name and by id.
 */
#include <config.h>

#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "testlib.h"

#define SIZE (24u << 20)

static bool
dirty_bit (const char *path)
{
  uint8_t h[80];
  FILE *f = fopen (path, "r");
  bool d = f && fread (h, 1, 80, f) == 80 && (h[79] & 1);
  if (f)
    fclose (f);
  return d;
}

int
main (void)
{
  uint8_t *shadow = calloc (1, SIZE), *buf;
  char *path;
  struct qcow2 *q;
  pid_t pid;
  int st;

  require_qemu_img ();
  if (!shadow || posix_memalign ((void **) &buf, 4096, 1 << 20))
    return 1;
  path = make_image ("lazy.qcow2", "lazy_refcounts=on,cluster_size=4096",
                     SIZE);
  for (int i = 0; i < 30; i++) {
    uint64_t len = 1 + rnd () % (1 << 20);
    uint64_t off = rnd () % (SIZE - len);
    fill_pattern (buf, len, (uint64_t) i);
    memcpy (shadow + off, buf, len);
  }

  /* A child writes and flushes, then dies without closing. */
  rnd ();
  pid = fork ();
  if (pid == 0) {
    uint64_t seed = 0x9e3779b97f4a7c15ull;
    (void) seed;
    q = open_image (path, NULL, false);
    if (!dirty_bit (path))
      _exit (3);
    for (uint64_t off = 0; off < SIZE; off += 1 << 20) {
      if (sync_write (q, off, shadow + off, 1 << 20, 0) != 0)
        _exit (4);
    }
    if (sync_flush (q) != 0)
      _exit (5);
    _exit (0);
  }
  CHECK (waitpid (pid, &st, 0) == pid && WIFEXITED (st)
         && WEXITSTATUS (st) == 0, "child status %d", st);
  CHECK (dirty_bit (path), "left dirty");

  /* Read-only opens do not repair (and do not need to). */
  q = open_image (path, NULL, true);
  CHECK (engine_equals (q, shadow, SIZE), "read-only view of dirty image");
  qcow2_close (q);

  q = open_image (path, NULL, false);
  CHECK (engine_equals (q, shadow, SIZE), "contents after repair");
  fill_pattern (buf, 100000, 77);
  CHECK (sync_write (q, 5000, buf, 100000, 0) == 0, "write after repair");
  memcpy (shadow + 5000, buf, 100000);
  CHECK (qcow2_close (q) == 0, "close");
  CHECK (!dirty_bit (path), "clean after close");
  CHECK (qemu_img_check_clean (path), "check after repair");
  CHECK (qemu_img_compare (path, shadow, SIZE), "compare after repair");

  /* QEMU itself killed while dirty. */
  free (path);
  path = make_image ("lazy-qemu.qcow2", "lazy_refcounts=on", SIZE);
  st = shell ("qemu-io -f qcow2 -c 'write -q -P 0x5a 0 3M' "
              "-c 'write -q -P 0x5b 7M 65k' -c flush -c 'sigraise 9' "
              "'%s' >/dev/null 2>&1", path);
  CHECK (dirty_bit (path), "qemu left it dirty (%d)", st);
  memset (shadow, 0, SIZE);
  memset (shadow, 0x5a, 3 << 20);
  memset (shadow + (7 << 20), 0x5b, 65 << 10);
  q = open_image (path, NULL, false);
  CHECK (engine_equals (q, shadow, SIZE), "qemu's dirty image");
  CHECK (qcow2_close (q) == 0, "close");
  CHECK (qemu_img_check_clean (path), "check qemu's image after repair");

  /* Snapshots, read-only, by name and by id. */
  {
    struct qcow2_opts o = { 0 };
    char err[256];
    free (path);
    path = make_image ("snaps.qcow2", "cluster_size=65536", SIZE);
    CHECK (shell ("qemu-io -f qcow2 -c 'write -q -P 0x41 0 2M' '%s' && "
                  "qemu-img snapshot -c first '%s' && "
                  "qemu-io -f qcow2 -c 'write -q -P 0x42 1M 2M' '%s' && "
                  "qemu-img snapshot -c second '%s' && "
                  "qemu-io -f qcow2 -c 'write -q -P 0x43 0 4M' '%s'",
                  path, path, path, path, path) == 0, "snapshots");
    memset (shadow, 0, SIZE);
    memset (shadow, 0x41, 2 << 20);
    o.read_only = true;
    o.snapshot = "first";
    CHECK (qcow2_open (path, &o, &q, err, sizeof err) == 0, "open: %s", err);
    CHECK (engine_equals (q, shadow, SIZE), "snapshot 'first'");
    qcow2_close (q);
    memset (shadow + (1 << 20), 0x42, 2 << 20);
    o.snapshot = "2";
    CHECK (qcow2_open (path, &o, &q, err, sizeof err) == 0, "open: %s", err);
    CHECK (engine_equals (q, shadow, SIZE), "snapshot id 2");
    qcow2_close (q);
    o.snapshot = "nope";
    CHECK (qcow2_open (path, &o, &q, err, sizeof err) < 0
           && strstr (err, "nope"), "missing snapshot: %s", err);
    o.read_only = false;
    o.snapshot = "first";
    CHECK (qcow2_open (path, &o, &q, err, sizeof err) < 0, "snapshot rw");
  }
  free (shadow);
  free (buf);
  free (path);
  printf ("ok - lazy refcounts, dirty repair, snapshots\n");
  return test_exit ();
}
