/* tests/test-corrupt-image.c: images whose tables point at each other.
 * Reads and writes of the broken range fail with EIO (never a crash, never
 * a write into other metadata); a write that would overwrite metadata marks
 * the image corrupt on disk, after which it only opens read-only.  The rest
 * of the image keeps being served.
 */
#include <config.h>

#include <endian.h>
#include <errno.h>
#include <string.h>

#include "testlib.h"

static uint64_t
get64 (FILE *f, uint64_t off)
{
  uint64_t v = 0;
  if (fseek (f, (long) off, SEEK_SET) || fread (&v, 8, 1, f) != 1)
    exit (1);
  return be64toh (v);
}

static void
put64 (FILE *f, uint64_t off, uint64_t v)
{
  v = htobe64 (v);
  if (fseek (f, (long) off, SEEK_SET) || fwrite (&v, 8, 1, f) != 1)
    exit (1);
}

/* Make an image with data at 0 and at 1 MiB, then point an entry of the
 * first L2 table (index idx) at target: 0 the L1 table, 1 a refcount
 * block, 2 inside the header, 3 that L2 table itself.
 */
static char *
broken_image (const char *name, unsigned idx, int target_kind)
{
  char *path = make_image (name, "cluster_size=65536", 64 << 20);
  uint64_t l1, l2, reft, rb, target;
  FILE *f;

  if (shell ("qemu-io -f qcow2 -c 'write -q -P 0x61 0 128k' "
             "-c 'write -q -P 0x62 1M 64k' '%s'", path) != 0)
    exit (1);
  f = fopen (path, "r+");
  if (!f)
    exit (1);
  l1 = get64 (f, 40);
  reft = get64 (f, 48);
  l2 = get64 (f, l1) & 0x00fffffffffffe00ull;
  rb = get64 (f, reft) & ~511ull;
  target = target_kind == 0 ? l1 : target_kind == 1 ? rb
    : target_kind == 3 ? l2 : 512;
  put64 (f, l2 + 8 * idx, target | (1ull << 63));
  fclose (f);
  return path;
}

static bool
corrupt_bit (const char *path)
{
  FILE *f = fopen (path, "r");
  bool c = f && (get64 (f, 72) & 2);
  if (f)
    fclose (f);
  return c;
}

int
main (void)
{
  uint8_t *buf;
  struct qcow2 *q;
  char *path, err[256];
  int r;

  require_qemu_img ();
  if (posix_memalign ((void **) &buf, 4096, 1 << 20))
    return 1;

  /* Cluster 0 of the disk mapped onto the L1 table. */
  path = broken_image ("l2-to-l1.qcow2", 0, 0);
  q = open_image (path, NULL, false);
  CHECK (sync_read (q, 0, buf, 4096) == -EIO, "read of the broken cluster");
  CHECK (sync_write (q, 100, buf, 4096, 0) == -EIO, "write refused");
  CHECK (sync_read (q, 65536, buf, 4096) == 0 && buf[0] == 0x61,
         "the next cluster still reads");
  CHECK (sync_read (q, 1 << 20, buf, 4096) == 0 && buf[0] == 0x62,
         "other data still reads");
  qcow2_close (q);
  free (path);

  /* Cluster 1 mapped onto a refcount block: a write would destroy
   * refcounts, so the image is marked corrupt instead.
   */
  path = broken_image ("l2-to-refblock.qcow2", 1, 1);
  q = open_image (path, NULL, false);
  memset (buf, 0xee, 4096);
  CHECK (sync_write (q, 65536, buf, 4096, 0) == -EIO, "write refused");
  CHECK (sync_write (q, 4 << 20, buf, 4096, 0) == -EIO, "writes stopped");
  CHECK (sync_read (q, 1 << 20, buf, 4096) == 0 && buf[0] == 0x62,
         "reads go on");
  qcow2_close (q);
  CHECK (corrupt_bit (path), "marked corrupt on disk");
  CHECK (qcow2_open (path, NULL, &q, err, sizeof err) < 0
         && strstr (err, "corrupt"), "read-write open refused: %s", err);
  CHECK (shell ("qemu-img check '%s' 2>&1 | grep -q 'ERROR\\|corrupt'", path)
         == 0, "qemu-img agrees the image is broken");
  q = open_image (path, NULL, true);
  CHECK (sync_read (q, 0, buf, 4096) == 0 && buf[0] == 0x61,
         "still served read-only");
  qcow2_close (q);
  free (path);

  /* Cluster 2 mapped onto its own L2 table: a client write there would
   * overwrite the table (and with it the mapping of every cluster it
   * holds), so the image is marked corrupt instead.
   */
  path = broken_image ("l2-to-itself.qcow2", 2, 3);
  q = open_image (path, NULL, false);
  memset (buf, 0xee, 4096);
  CHECK (sync_write (q, 2 * 65536, buf, 4096, 0) == -EIO,
         "write onto the L2 table refused");
  CHECK (sync_read (q, 0, buf, 4096) == 0 && buf[0] == 0x61,
         "the table still maps cluster 0");
  CHECK (sync_read (q, 1 << 20, buf, 4096) == 0 && buf[0] == 0x62,
         "reads go on");
  qcow2_close (q);
  CHECK (corrupt_bit (path), "marked corrupt on disk");
  q = open_image (path, NULL, true);
  CHECK (sync_read (q, 65536, buf, 4096) == 0 && buf[0] == 0x61,
         "the table is intact on disk");
  qcow2_close (q);
  free (path);

  /* Cluster 1 mapped onto a refcount block, then discarded: the block's
   * refcount drops to zero.  Punching it (or handing it to the allocator)
   * would destroy the refcounts; the image is marked corrupt instead, and
   * the next allocating write fails with EIO, not ENOMEM.
   */
  path = broken_image ("l2-to-refblock-discard.qcow2", 1, 1);
  {
    uint8_t before[512], after[512];
    uint64_t rb;
    FILE *f = fopen (path, "r");
    CHECK (f != NULL, "open");
    rb = get64 (f, get64 (f, 48)) & ~511ull;
    CHECK (fseek (f, (long) rb, SEEK_SET) == 0
           && fread (before, 1, sizeof before, f) == sizeof before, "read");
    fclose (f);
    q = open_image (path, NULL, false);
    r = sync_discard (q, 65536, 65536);
    if (r == 0)
      r = sync_flush (q);
    CHECK (r == -EIO, "the flush that would free the block fails (%d)", r);
    memset (buf, 0xee, 65536);
    r = sync_write (q, 8 << 20, buf, 65536, 0);
    CHECK (r == -EIO, "an allocating write after it: %d (%s)", r,
           strerror (-r));
    qcow2_close (q);
    CHECK (corrupt_bit (path), "marked corrupt on disk");
    f = fopen (path, "r");
    CHECK (f && fseek (f, (long) rb, SEEK_SET) == 0
           && fread (after, 1, sizeof after, f) == sizeof after, "reread");
    if (f)
      fclose (f);
    /* Not punched: the header's refcount (entry 0, 16 bits) is still 1
     * (the block's own entry did drop to zero: that is the lie).
     */
    CHECK (before[0] == 0 && before[1] == 1 && after[0] == 0
           && after[1] == 1, "the refcount block is still there");
  }
  free (path);

  /* An L2 entry pointing inside the header cluster (unaligned). */
  path = broken_image ("l2-unaligned.qcow2", 0, 2);
  q = open_image (path, NULL, false);
  CHECK (sync_read (q, 0, buf, 512) == -EIO, "read of an unaligned cluster");
  CHECK (sync_write (q, 0, buf, 512, 0) == -EIO, "write of it");
  qcow2_close (q);
  free (path);
  free (buf);
  printf ("ok - corrupt images\n");
  return test_exit ();
}
