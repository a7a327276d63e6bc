/* tests/test-data-file.c: images with an external data file (data_file=,
 * and data_file_raw=on): guest data lives in the data file at the guest
 * offset, metadata in the image; reads, writes, partial clusters, zeroes
 * and discards match a shadow copy, the data file of a data_file_raw image
 * equals the disk byte for byte (after zeroes and discards too, with the
 * data_file_raw bit kept), and qemu-img check and compare agree.
 */
#include <config.h>

#include <string.h>
#include <unistd.h>

#include "testlib.h"

#define SIZE (16u << 20)

static void
done_cb (void *opaque, int ret)
{
  *(int *) opaque = ret;
}

static void
run (const char *name, bool raw)
{
  const char *d = test_dir ();
  uint8_t *shadow = calloc (1, SIZE), *buf, *data;
  char path[512], dpath[512];
  struct qcow2 *q;
  FILE *f;

  if (!shadow || !(data = malloc (SIZE))
      || posix_memalign ((void **) &buf, 4096, 1 << 20))
    exit (1);
  snprintf (path, sizeof path, "%s/%s.qcow2", d, name);
  snprintf (dpath, sizeof dpath, "%s/%s.data", d, name);
  CHECK (shell ("cd %s && qemu-img create -q -f qcow2 -o cluster_size=65536,"
                "data_file=%s.data%s %s.qcow2 16M && "
                "qemu-io -f qcow2 -c 'write -q -P 0x71 64k 200k' %s.qcow2",
                d, name, raw ? ",data_file_raw=on" : "", name, name) == 0,
         "create");
  memset (shadow + 65536, 0x71, 200 << 10);

  q = open_image (path, NULL, false);
  CHECK (engine_equals (q, shadow, SIZE), "reads (%s)", name);
  for (int i = 0; i < 50; i++) {
    uint64_t len = 1 + rnd () % 300000;
    uint64_t off = rnd () % (SIZE - len);
    if (i == 0)
      off = 0, len = 1000;      /* guest cluster 0: offset 0 in the file */
    fill_pattern (buf, len, (uint64_t) i);
    CHECK (sync_write (q, off, buf, len, 0) == 0, "write %d", i);
    memcpy (shadow + off, buf, len);
  }
  CHECK (sync_flush (q) == 0, "flush");
  CHECK (engine_equals (q, shadow, SIZE), "after writes (%s)", name);
  if (raw) {
    f = fopen (dpath, "r");
    memset (data, 0, SIZE);
    CHECK (f && fread (data, 1, SIZE, f) > 0, "read data file");
    if (f)
      fclose (f);
    CHECK (memcmp (data, shadow, SIZE) == 0, "data file is the raw disk");
  }
  {
    int res = 1;
    CHECK (qcow2_write_zeroes (q, 4u << 20, 1 << 20, 0, done_cb, &res) == 0,
           "zeroes");
    run_until (q, &res);
    CHECK (res == 0, "zeroes: %d", res);
    memset (shadow + (4u << 20), 0, 1 << 20);
    res = 1;
    CHECK (qcow2_discard (q, 8u << 20, 1 << 20, done_cb, &res) == 0,
           "discard");
    run_until (q, &res);
    CHECK (res == 0, "discard: %d", res);
    memset (shadow + (8u << 20), 0, 1 << 20);
    /* Partial clusters, and zeroes that keep the clusters allocated. */
    res = 1;
    CHECK (qcow2_write_zeroes (q, 100000, 70000, 0, done_cb, &res) == 0,
           "partial zeroes");
    run_until (q, &res);
    CHECK (res == 0, "partial zeroes: %d", res);
    memset (shadow + 100000, 0, 70000);
    res = 1;
    CHECK (qcow2_write_zeroes (q, 2u << 20, 256 << 10, QCOW2_ZERO_NO_HOLE,
                               done_cb, &res) == 0, "zeroes, no hole");
    run_until (q, &res);
    CHECK (res == 0, "zeroes, no hole: %d", res);
    memset (shadow + (2u << 20), 0, 256 << 10);
    res = 1;
    CHECK (qcow2_discard (q, 6u << 20, 128 << 10, done_cb, &res) == 0,
           "discard 2");
    run_until (q, &res);
    CHECK (res == 0, "discard 2: %d", res);
    memset (shadow + (6u << 20), 0, 128 << 10);
    /* Written again after the zeroes: it lands at the guest offset. */
    fill_pattern (buf, 65536, 99);
    CHECK (sync_write (q, 4u << 20, buf, 65536, 0) == 0, "rewrite");
    memcpy (shadow + (4u << 20), buf, 65536);
  }
  CHECK (engine_equals (q, shadow, SIZE), "after zeroes (%s)", name);
  CHECK (qcow2_close (q) == 0, "close");
  if (raw) {
    /* The data file stays a raw image of the disk, and says so. */
    f = fopen (dpath, "r");
    memset (data, 0, SIZE);
    CHECK (f && fread (data, 1, SIZE, f) > 0, "read data file");
    if (f)
      fclose (f);
    CHECK (memcmp (data, shadow, SIZE) == 0,
           "data file is the raw disk after zeroes and discards");
    snprintf (dpath, sizeof dpath, "%s/expected.raw", d);
    f = fopen (dpath, "w");
    CHECK (f && fwrite (shadow, 1, SIZE, f) == SIZE && fclose (f) == 0,
           "write expected.raw");
    CHECK (shell ("cd %s && qemu-img compare -q -f raw -F raw %s.data "
                  "expected.raw", d, name) == 0,
           "qemu-img compare of the data file");
    CHECK (shell ("cd %s && qemu-img info -U %s.qcow2 | "
                  "grep -q 'data file raw: true'", d, name) == 0,
           "qemu-img info still shows data file raw");
  }
  /* qemu resolves a relative data file name from its working directory. */
  CHECK (chdir (d) == 0, "chdir");
  CHECK (qemu_img_check_clean (path), "check (%s)", name);
  CHECK (qemu_img_compare (path, shadow, SIZE), "compare (%s)", name);
  free (shadow);
  free (data);
  free (buf);
  printf ("ok - %s\n", name);
}

int
main (void)
{
  char path[512], err[300];
  struct qcow2 *q;

  require_qemu_img ();
  run ("ext", false);
  run ("extraw", true);

  /* The data file is missing: a clear error naming it. */
  snprintf (path, sizeof path, "%s/ext.data", test_dir ());
  CHECK (unlink (path) == 0, "unlink");
  snprintf (path, sizeof path, "%s/ext.qcow2", test_dir ());
  CHECK (qcow2_open (path, NULL, &q, err, sizeof err) < 0
         && strstr (err, "ext.data"), "missing data file: %s", err);
  printf ("ok - missing data file: %s\n", err);
  return test_exit ();
}
