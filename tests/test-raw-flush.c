/* tests/test-raw-flush.c: a flush of a raw image makes what was written
 * durable: it reaches the file as an fdatasync, like a write with FUA.
 * (A raw image's client flush once started in the state that only syncs
 * for FUA, and was acknowledged without any sync.)
 */
#include <config.h>

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <unistd.h>

#include "aio-fake.h"
#include "testlib.h"

static unsigned
syncs_logged (struct aio *a)
{
  size_t n;
  const struct aio_fake_record *log = aio_fake_log (a, &n);
  unsigned syncs = 0;

  for (size_t i = 0; i < n; i++)
    if (log[i].type == AIO_FSYNC && log[i].result == 0)
      syncs++;
  return syncs;
}

int
main (void)
{
  char *path = NULL;
  struct aio *a;
  struct qcow2 *q;
  uint8_t *buf;
  int fd;

  if (asprintf (&path, "%s/disk.raw", test_dir ()) < 0
      || (fd = open (path, O_CREAT | O_RDWR, 0644)) < 0
      || ftruncate (fd, 4 << 20) < 0 || close (fd) < 0
      || aio_fake_create (&a) < 0 || posix_memalign ((void **) &buf, 4096,
                                                     4096))
    return 1;
  {
    struct qcow2_opts o = { .format = QCOW2_FORMAT_RAW, .aio = a };
    char err[256];
    if (qcow2_open (path, &o, &q, err, sizeof err) < 0) {
      fprintf (stderr, "open %s: %s\n", path, err);
      return 1;
    }
  }
  CHECK (strcmp (qcow2_format_name (q), "raw") == 0, "opened as raw");
  fill_pattern (buf, 4096, 1);

  CHECK (sync_write (q, 0, buf, 4096, 0) == 0, "write");
  aio_fake_clear_log (a);
  CHECK (sync_flush (q) == 0, "flush");
  CHECK (syncs_logged (a) == 1, "a flush of a raw image is one fdatasync "
         "(%u seen)", syncs_logged (a));

  aio_fake_clear_log (a);
  CHECK (sync_write (q, 4096, buf, 4096, QCOW2_WRITE_FUA) == 0, "FUA write");
  CHECK (syncs_logged (a) == 1, "a FUA write of a raw image syncs once "
         "(%u seen)", syncs_logged (a));

  aio_fake_clear_log (a);
  aio_fake_fail_next (a, AIO_FSYNC, 0, EIO);
  CHECK (sync_flush (q) == -EIO, "a flush whose fdatasync fails fails");
  qcow2_close (q);
  aio_destroy (a);
  free (buf);
  free (path);
  return test_exit ();
}
