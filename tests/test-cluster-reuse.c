/* tests/test-cluster-reuse.c: clusters freed by discards are allocated
 * again, so an image whose guest keeps writing and discarding does not grow
 * without end; and what is written into reused clusters reads back, passes
 * qemu-img check and compare.  With 64 KiB clusters, and with extended L2
 * entries (partial writes into reused clusters leave subclusters that must
 * still read as they should).
 */
#include <config.h>

#include <string.h>
#include <sys/stat.h>

#include "testlib.h"

#define KIB 1024u
#define MIB (1u << 20)

static void
done_cb (void *opaque, int ret)
{
  *(int *) opaque = ret;
}

static int
discard (struct qcow2 *q, uint64_t off, uint64_t len)
{
  int res = 1;
  int r = qcow2_discard (q, off, len, done_cb, &res);
  if (r < 0)
    return r;
  run_until (q, &res);
  return res;
}

static uint64_t
file_size (const char *path)
{
  struct stat st;
  return stat (path, &st) == 0 ? (uint64_t) st.st_size : 0;
}

static void
rounds (const char *name, const char *opts, uint64_t max_write,
        uint64_t bound)
{
  const uint64_t size = 64 * MIB, per_round = 4 * MIB;
  const int nrounds = 20;
  char *path = make_image (name, opts, size);
  uint8_t *shadow = calloc (1, size), *buf = malloc (max_write);
  struct qcow2 *q = open_image (path, NULL, false);
  uint64_t grown;

  for (int round = 0; round < nrounds; round++) {
    uint64_t offs[256], lens[256];
    unsigned n = 0;
    for (uint64_t done = 0; done < per_round && n < 256; n++) {
      uint64_t len = 512 + rnd () % (max_write - 512);
      uint64_t off = rnd () % (size - len);
      if (max_write == 64 * KIB) {
        off &= ~(uint64_t) (64 * KIB - 1);
        len = 64 * KIB;
      }
      fill_pattern (buf, len, (uint64_t) round * 1000 + n);
      CHECK (sync_write (q, off, buf, len, 0) == 0, "%s: write", name);
      memcpy (shadow + off, buf, len);
      offs[n] = off;
      lens[n] = len;
      done += len;
    }
    CHECK (sync_flush (q) == 0, "%s: flush", name);
    CHECK (engine_equals (q, shadow, size), "%s: round %d reads", name,
           round);
    /* Discard most of it again (what a guest's fstrim does). */
    for (unsigned i = 0; i < n; i += 1 + (i % 5 == 4)) {
      CHECK (discard (q, offs[i], lens[i]) == 0, "%s: discard", name);
      /* Discard releases whole clusters (or subclusters): read back. */
      CHECK (sync_read (q, offs[i], shadow + offs[i], lens[i]) == 0,
             "%s: read back", name);
    }
    CHECK (sync_flush (q) == 0, "%s: flush", name);
  }
  CHECK (engine_equals (q, shadow, size), "%s: final reads", name);
  CHECK (qcow2_close (q) == 0, "%s: close", name);
  grown = file_size (path);
  CHECK (grown <= bound, "%s: file is %llu MiB after %d rounds of %llu "
         "MiB written and discarded", name,
         (unsigned long long) (grown / MIB), nrounds,
         (unsigned long long) (per_round / MIB));
  CHECK (qemu_img_check_clean (path), "%s: check", name);
  CHECK (qemu_img_compare (path, shadow, size), "%s: compare", name);
  printf ("ok - %s: %llu KiB file after %llu MiB written and discarded\n",
          name, (unsigned long long) (grown / KIB),
          (unsigned long long) (nrounds * per_round / MIB));
  free (shadow);
  free (buf);
  free (path);
}

int
main (void)
{
  require_qemu_img ();
  /* Whole clusters: 80 MiB written in all, never more than 4 MiB of it
   * live; without reuse the file held 74 MiB.
   */
  rounds ("c64k.qcow2", "cluster_size=65536", 64 * KIB, 24 * MIB);
  /* Partial clusters stay allocated (their discard frees nothing), so
   * the disk fills up; but the file never outgrows it (without reuse:
   * 67 and 69 MiB).
   */
  rounds ("c64k-partial.qcow2", "cluster_size=65536", 100 * KIB, 64 * MIB);
  if (shell ("qemu-img create -f qcow2 -o help 2>/dev/null "
             "| grep -q extended_l2") == 0)
    rounds ("extl2.qcow2", "cluster_size=65536,extended_l2=on", 100 * KIB,
            64 * MIB);
  return test_exit ();
}
