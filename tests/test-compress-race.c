/* tests/test-compress-race.c: compressed writes racing with what else may
 * happen while their compression runs on a worker and their packed data
 * sits in the packing cache, with the fake backend holding every op.
 *
 * overlap: a flush writes the open packing run; more compressed writes
 * fill the run meanwhile, which seals it.  The sealing write must not be
 * in flight beside the flush's write of the same clusters: the file could
 * take them in either order, the older copy last, and lose the clusters
 * packed in between once the buffer is freed.
 *
 * read: a read of a cluster whose new compressed data is still in a
 * worker gets the old data or the new, whole (the write is not
 * acknowledged yet); once the write is acknowledged, reads get the new
 * data, from the packing cache before any of it reached the file; a
 * partial write of that cluster waits for the compressed write and lands
 * over it.
 *
 * close: the last write seals a packing run, whose write is still in
 * flight when the image is closed.  The run's own references are dropped
 * when that write ends, inside the final flush: they must still reach the
 * refcounts (the run's clusters leaked, refcount one too high, found by
 * test-nbd-compress.sh now and then under the sanitizers).
 */
#include <config.h>

#include <string.h>
#include <unistd.h>

#include "aio-fake.h"
#include "testlib.h"

#define CS 65536u
#define SIZE (16u << 20)

static void
done_cb (void *opaque, int ret)
{
  *(int *) opaque = ret;
}

/* Compresses to about half: noise and runs of one byte, in turns. */
static void
half_fill (uint8_t *buf, size_t len, uint64_t seed)
{
  fill_noise (buf, len, seed);
  for (size_t i = 512; i < len; i += 1024)
    memset (buf + i, (uint8_t) (seed + i / 1024),
            len - i < 512 ? len - i : 512);
}

static struct qcow2 *
open_compress (const char *path, struct aio *a)
{
  struct qcow2_opts o = { 0 };
  struct qcow2 *q;
  char err[256];

  o.aio = a;
  o.compress = true;
  if (qcow2_open (path, &o, &q, err, sizeof err) < 0) {
    fprintf (stderr, "%s\n", err);
    exit (1);
  }
  return q;
}

/* Release held ops of type t until none is left (others stay held). */
static void
release_type (struct qcow2 *q, struct aio *a, enum aio_op_type t)
{
  for (int round = 0; round < 10000; round++) {
    bool any = false;
    qcow2_process (q);
    for (unsigned i = 0; i < aio_fake_held (a); i++) {
      struct aio_fake_record r;
      if (aio_fake_held_info (a, i, &r) == 0 && r.type == t) {
        aio_fake_release (a, i);
        any = true;
        break;
      }
    }
    if (!any)
      break;
  }
  /* What the last calls' completions unblock. */
  for (int i = 0; i < 100; i++)
    qcow2_process (q);
}

/* Close q and its backend; the file must be clean and hold shadow. */
static void
close_and_verify (struct qcow2 *q, struct aio *a, const char *path,
                  const uint8_t *shadow)
{
  CHECK (qcow2_close (q) == 0, "close");
  aio_destroy (a);
  CHECK (qemu_img_check_clean (path), "check of %s", path);
  CHECK (qemu_img_compare (path, shadow, SIZE), "compare of %s", path);
}

/* Whether two held writes cover a common byte. */
static bool
held_writes_overlap (struct aio *a)
{
  unsigned n = aio_fake_held (a);
  for (unsigned i = 0; i < n; i++)
    for (unsigned j = i + 1; j < n; j++) {
      struct aio_fake_record x, y;
      if (aio_fake_held_info (a, i, &x) < 0
          || aio_fake_held_info (a, j, &y) < 0
          || x.type != AIO_WRITE || y.type != AIO_WRITE)
        continue;
      if (x.offset < y.offset + y.length && y.offset < x.offset + x.length)
        return true;
    }
  return false;
}

static void
test_overlap (void)
{
  uint8_t *shadow = calloc (1, SIZE), *buf;
  char *path = make_image ("crace-overlap.qcow2", "cluster_size=65536", SIZE);
  struct aio *a;
  struct qcow2 *q;
  int wres = 1, fres = 1;

  if (!shadow || posix_memalign ((void **) &buf, 4096, 4u << 20)
      || aio_fake_create (&a) < 0)
    exit (1);
  q = open_compress (path, a);
  half_fill (buf, CS, 1);
  CHECK (sync_write (q, 0, buf, CS, 0) == 0, "first write");
  memcpy (shadow, buf, CS);

  aio_fake_set_hold (a, true);
  CHECK (qcow2_flush (q, done_cb, &fres) == 0, "flush");
  for (int i = 0; i < 100 && aio_fake_held (a) == 0; i++)
    qcow2_process (q);
  CHECK (aio_fake_held (a) == 1, "the flush writes the packing run first "
         "(%u held)", aio_fake_held (a));

  /* 64 clusters of about half a cluster each: more than a run holds. */
  half_fill (buf, 4u << 20, 2);
  CHECK (qcow2_write (q, CS, buf, 4u << 20, 0, done_cb, &wres) == 0,
         "write");
  memcpy (shadow + CS, buf, 4u << 20);
  release_type (q, a, AIO_CALL);
  CHECK (aio_fake_held (a) >= 2, "the run was sealed (%u held)",
         aio_fake_held (a));
  CHECK (!held_writes_overlap (a), "two writes of the same clusters are "
         "in flight at once");

  for (int i = 0; i < 10000 && (wres == 1 || fres == 1); i++) {
    qcow2_process (q);
    aio_fake_release_all (a, true);
  }
  aio_fake_set_hold (a, false);
  run_until (q, NULL);
  CHECK (wres == 0 && fres == 0, "write %d, flush %d", wres, fres);
  CHECK (engine_equals (q, shadow, SIZE), "contents");
  close_and_verify (q, a, path, shadow);
  free (shadow);
  free (buf);
  free (path);
}

static void
test_read (void)
{
  uint8_t *shadow = calloc (1, SIZE), *old, *new, *part, *got;
  char *path = make_image ("crace-read.qcow2", "cluster_size=65536", SIZE);
  const uint64_t x = 3 * CS;
  struct aio *a;
  struct qcow2 *q;
  int wres = 1, rres = 1, pres = 1;

  if (!shadow || posix_memalign ((void **) &old, 4096, CS)
      || posix_memalign ((void **) &new, 4096, CS)
      || posix_memalign ((void **) &part, 4096, 4096)
      || posix_memalign ((void **) &got, 4096, CS)
      || aio_fake_create (&a) < 0)
    exit (1);
  q = open_compress (path, a);
  half_fill (old, CS, 10);
  half_fill (new, CS, 11);
  fill_pattern (part, 4096, 12);
  CHECK (sync_write (q, x, old, CS, 0) == 0, "old data");
  CHECK (sync_flush (q) == 0, "flush");

  aio_fake_set_hold (a, true);
  aio_fake_clear_log (a);
  CHECK (qcow2_write (q, x, new, CS, 0, done_cb, &wres) == 0, "write");
  for (int i = 0; i < 100 && aio_fake_held (a) == 0; i++)
    qcow2_process (q);
  {
    struct aio_fake_record r;
    CHECK (aio_fake_held (a) == 1 && aio_fake_held_info (a, 0, &r) == 0
           && r.type == AIO_CALL, "the compression is held");
  }
  /* Op 0 (the compression) stays held; the read's ops run. */
  CHECK (qcow2_read (q, x, got, CS, done_cb, &rres) == 0, "read");
  CHECK (qcow2_write (q, x + 1000, part, 4096, 0, done_cb, &pres) == 0,
         "partial write");
  for (int i = 0; i < 10000 && rres == 1; i++) {
    qcow2_process (q);
    if (aio_fake_held (a) > 1)
      aio_fake_release (a, 1);
  }
  CHECK (rres == 0, "read done while the compression runs: %d", rres);
  CHECK (memcmp (got, old, CS) == 0 || memcmp (got, new, CS) == 0,
         "the read got the old or the new data, whole");
  CHECK (wres == 1 && pres == 1, "the writes wait for the compression");

  aio_fake_set_hold (a, false);
  aio_fake_release_all (a, false);
  run_until (q, NULL);
  CHECK (wres == 0 && pres == 0, "writes: %d, %d", wres, pres);
  memcpy (shadow + x, new, CS);
  memcpy (shadow + x + 1000, part, 4096);
  CHECK (sync_read (q, x, got, CS) == 0
         && memcmp (got, shadow + x, CS) == 0,
         "the new data, then the partial write over it");

  /* Acknowledged, its packing run not written yet: the cache answers. */
  CHECK (sync_write (q, x + CS, new, CS, 0) == 0, "cached write");
  memcpy (shadow + x + CS, new, CS);
  CHECK (sync_read (q, x + CS, got, CS) == 0 && memcmp (got, new, CS) == 0,
         "read from the packing cache");
  close_and_verify (q, a, path, shadow);
  free (shadow);
  free (old);
  free (new);
  free (part);
  free (got);
  free (path);
}

/* Whether a write is held. */
static bool
write_held (struct aio *a)
{
  for (unsigned i = 0; i < aio_fake_held (a); i++) {
    struct aio_fake_record r;
    if (aio_fake_held_info (a, i, &r) == 0 && r.type == AIO_WRITE)
      return true;
  }
  return false;
}

static void
test_close (void)
{
  uint8_t *buf, *shadow = calloc (1, SIZE);
  bool sealed = false;

  if (!shadow || posix_memalign ((void **) &buf, 4096, CS))
    exit (1);
  /* Clusters of about half a cluster fill 1 MiB runs, the tail run
   * taking the small remainders: the first count from 32 on whose last
   * write seals a run is the case (63 today).
   */
  for (int n = 32; n <= 96 && !sealed; n++) {
    char *path = make_image ("crace-close.qcow2", "cluster_size=65536", SIZE);
    struct aio *a;
    struct qcow2 *q;
    int wres = 1;

    if (aio_fake_create (&a) < 0)
      exit (1);
    q = open_compress (path, a);
    for (int i = 0; i < n - 1; i++) {
      half_fill (buf, CS, 100 + (uint64_t) i);
      CHECK (sync_write (q, (uint64_t) i * CS, buf, CS, 0) == 0, "write");
      memcpy (shadow + (uint64_t) i * CS, buf, CS);
    }
    /* The last write with its compression let through, writes held. */
    aio_fake_set_hold (a, true);
    half_fill (buf, CS, 100 + (uint64_t) n - 1);
    CHECK (qcow2_write (q, (uint64_t) (n - 1) * CS, buf, CS, 0, done_cb,
                        &wres) == 0, "last write");
    memcpy (shadow + (uint64_t) (n - 1) * CS, buf, CS);
    release_type (q, a, AIO_CALL);
    CHECK (wres == 0, "last write: %d", wres);
    sealed = write_held (a);
    /* Close with the sealing write still in flight: it ends inside the
     * final flush.
     */
    aio_fake_set_hold (a, false);
    if (sealed)
      close_and_verify (q, a, path, shadow);
    else {
      CHECK (qcow2_close (q) == 0, "close");
      aio_destroy (a);
    }
    unlink (path);
    free (path);
  }
  CHECK (sealed, "no write sealed a run");
  free (shadow);
  free (buf);
}

int
main (void)
{
  require_qemu_img ();
  test_close ();
  printf ("ok - close\n");
  test_overlap ();
  printf ("ok - overlap\n");
  test_read ();
  printf ("ok - read\n");
  return test_exit ();
}
