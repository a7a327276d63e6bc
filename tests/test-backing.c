/* tests/test-backing.c: a chain of depth 3 with a raw file at the bottom
 * (raw <- qcow2 <- qcow2): reads fall through the chain, partial writes
 * copy the rest of the cluster from below, write-zeroes and discard hide
 * the backing data, block status reports the layer of each extent, and the
 * result passes qemu-img check and compare.  Also: a backing file smaller
 * than the overlay, one named without a format (probed), and a missing one.
 */
#include <config.h>

#include <string.h>

#include "testlib.h"

#define MIB (1u << 20)

static void
done_cb (void *opaque, int ret)
{
  *(int *) opaque = ret;
}

static uint32_t
depth_at (struct qcow2 *q, uint64_t off, uint32_t *flags)
{
  struct qcow2_extent ext[4];
  unsigned n = 0;
  int res = 1;
  if (qcow2_block_status (q, off, 4096, ext, 4, &n, done_cb, &res) < 0)
    return 99;
  run_until (q, &res);
  if (res != 0 || n == 0)
    return 98;
  *flags = ext[0].flags;
  return ext[0].depth;
}

static int
op (struct qcow2 *q, int kind, uint64_t off, uint64_t len)
{
  int res = 1, r;
  r = kind ? qcow2_discard (q, off, len, done_cb, &res)
    : qcow2_write_zeroes (q, off, len, 0, done_cb, &res);
  if (r < 0)
    return r;
  run_until (q, &res);
  return res;
}

/* Turn the backing-format header extension into an unknown one, as in
 * images made by old tools that did not record the format.
 */
static void
forget_backing_format (const char *path)
{
  uint8_t h[4096];
  FILE *f = fopen (path, "r+");
  uint32_t p;

  if (!f || fread (h, 1, sizeof h, f) != sizeof h)
    exit (1);
  p = (uint32_t) h[100] << 24 | (uint32_t) h[101] << 16
    | (uint32_t) h[102] << 8 | h[103];
  while (p + 8 <= sizeof h) {
    uint32_t type = (uint32_t) h[p] << 24 | (uint32_t) h[p + 1] << 16
      | (uint32_t) h[p + 2] << 8 | h[p + 3];
    uint32_t len = (uint32_t) h[p + 4] << 24 | (uint32_t) h[p + 5] << 16
      | (uint32_t) h[p + 6] << 8 | h[p + 7];
    if (type == 0)
      break;
    if (type == 0xe2792aca) {
      h[p] = 0x7e;              /* an unknown extension type */
      break;
    }
    p += 8 + ((len + 7) & ~7u);
  }
  if (fseek (f, 0, SEEK_SET) || fwrite (h, 1, sizeof h, f) != sizeof h
      || fclose (f))
    exit (1);
}

static void
chain (const char *compat)
{
  const char *d = test_dir ();
  const uint64_t size = 16 * MIB;
  uint8_t *shadow = malloc (size), *orig = malloc (size), *buf;
  char top[512], expect[512];
  struct qcow2 *q;
  uint32_t fl;
  FILE *f;

  if (!shadow || !orig || posix_memalign ((void **) &buf, 4096, 2 * MIB))
    exit (1);
  /* base.raw is 12 MiB: the top 4 MiB of the disk lie past it. */
  CHECK (shell ("cd %s && rm -f base.raw mid.qcow2 top.qcow2 && "
                "qemu-io -f raw -c 'write -q -P 0x11 0 12M' "
                "-c 'write -q -P 0x12 1M 64k' base.raw >/dev/null 2>&1 || "
                "{ truncate -s 12M base.raw && qemu-io -f raw "
                "-c 'write -q -P 0x11 0 12M' -c 'write -q -P 0x12 1M 64k' "
                "base.raw >/dev/null; }", d) == 0, "base");
  CHECK (shell ("cd %s && qemu-img create -q -f qcow2 -o compat=%s,"
                "cluster_size=65536 -b base.raw -F raw mid.qcow2 16M && "
                "qemu-io -f qcow2 -c 'write -q -P 0x22 2M 1M' "
                "-c 'write -q -P 0x23 5M 4k' mid.qcow2 >/dev/null", d, compat)
         == 0, "mid");
  CHECK (shell ("cd %s && qemu-img create -q -f qcow2 -o compat=%s,"
                "cluster_size=4096 -b mid.qcow2 -F qcow2 top.qcow2 16M && "
                "qemu-io -f qcow2 -c 'write -q -P 0x33 3M 512k' "
                "-c 'write -q -P 0x34 5M 100' top.qcow2 >/dev/null", d, compat)
         == 0, "top");
  snprintf (top, sizeof top, "%s/top.qcow2", d);
  snprintf (expect, sizeof expect, "%s/expect.raw", d);
  CHECK (shell ("qemu-img convert -O raw '%s' '%s'", top, expect) == 0,
         "convert");
  f = fopen (expect, "r");
  if (!f || fread (shadow, 1, size, f) != size)
    exit (1);
  fclose (f);
  memcpy (orig, shadow, size);

  q = open_image (top, NULL, false);
  CHECK (engine_equals (q, shadow, size), "chain reads (%s)", compat);
  CHECK (depth_at (q, 0, &fl) == 3 && fl == 0, "base data at depth 3");
  CHECK (depth_at (q, 2 * MIB, &fl) == 2 && fl == 0, "mid data at depth 2");
  CHECK (depth_at (q, 3 * MIB, &fl) == 1 && fl == 0, "top data at depth 1");
  CHECK (depth_at (q, 13 * MIB, &fl) == 0
         && fl == (QCOW2_EXTENT_HOLE | QCOW2_EXTENT_ZERO), "past base: hole");

  /* Partial writes: the rest of each cluster comes from below. */
  for (int i = 0; i < 40; i++) {
    uint64_t len = 1 + rnd () % 70000;
    uint64_t off = rnd () % (size - len);
    fill_pattern (buf, len, (uint64_t) i);
    CHECK (sync_write (q, off, buf, len, 0) == 0, "write %d", i);
    memcpy (shadow + off, buf, len);
  }
  /* Zeroes and discards must hide what is below. */
  CHECK (op (q, 0, 6 * MIB, MIB) == 0, "zeroes");
  memset (shadow + 6 * MIB, 0, MIB);
  CHECK (op (q, 0, 8 * MIB + 100, 10000) == 0, "zeroes unaligned");
  memset (shadow + 8 * MIB + 100, 0, 10000);
  CHECK (op (q, 1, 10 * MIB, MIB) == 0, "discard");
  if (strcmp (compat, "1.1") == 0)
    memset (shadow + 10 * MIB, 0, MIB);
  else                                    /* v2 shows the backing again */
    memcpy (shadow + 10 * MIB, orig + 10 * MIB, MIB);
  CHECK (engine_equals (q, shadow, size), "after writes (%s)", compat);
  CHECK (qcow2_close (q) == 0, "close");
  CHECK (qemu_img_check_clean (top), "check (%s)", compat);
  CHECK (qemu_img_compare (top, shadow, size), "compare (%s)", compat);
  free (shadow);
  free (orig);
  free (buf);
  printf ("ok - chain raw <- qcow2 <- qcow2 (compat=%s)\n", compat);
}

int
main (void)
{
  const char *d;
  char path[512], err[300];
  struct qcow2 *q;

  require_qemu_img ();
  chain ("1.1");
  chain ("0.10");
  d = test_dir ();

  /* No backing format recorded: probed (raw here), still read right. */
  CHECK (shell ("cd %s && qemu-img create -q -f qcow2 -b base.raw -F raw "
                "noformat.qcow2 12M && "
                "qemu-img convert -O raw noformat.qcow2 noformat.raw", d) == 0,
         "noformat");
  snprintf (path, sizeof path, "%s/noformat.qcow2", d);
  forget_backing_format (path);
  q = open_image (path, NULL, true);
  {
    uint8_t *want = malloc (12 * MIB);
    FILE *f;
    snprintf (err, sizeof err, "%s/noformat.raw", d);
    f = fopen (err, "r");
    CHECK (f && fread (want, 1, 12 * MIB, f) == 12 * MIB, "read raw");
    if (f)
      fclose (f);
    CHECK (engine_equals (q, want, 12 * MIB), "probed backing");
    free (want);
  }
  qcow2_close (q);

  /* A missing backing file fails at open, naming it. */
  CHECK (shell ("cd %s && qemu-img create -q -f qcow2 -b gone.raw -F raw "
                "-u orphan.qcow2 1M", d) == 0, "orphan");
  snprintf (path, sizeof path, "%s/orphan.qcow2", d);
  CHECK (qcow2_open (path, NULL, &q, err, sizeof err) < 0, "orphan opened");
  CHECK (strstr (err, "gone.raw") != NULL, "message: %s", err);
  printf ("ok - missing backing file: %s\n", err);
  return test_exit ();
}
