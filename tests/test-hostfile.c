/* tests/test-hostfile.c: the engine's backing policy, as a caller of lib/
 * sees it (the daemon's options are tested by test-backing-confine.sh).
 * Zeroed options confine: a backing file outside the image's directory is
 * refused, admitted by allow_dirs or FOLLOW, and NONE refuses it even
 * inside; a loop of three images fails with -ELOOP at its first repeat.
 */
#include <config.h>

#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "testlib.h"

#define MIB (1024 * 1024)

/* Open path with opts; return the -errno (0: opened, then closed) and the
 * message in err.
 */
static int
try_open (const char *path, const struct qcow2_opts *opts, char *err,
          size_t errlen)
{
  struct qcow2 *q = NULL;
  int r;

  err[0] = '\0';
  r = qcow2_open (path, opts, &q, err, errlen);
  if (r == 0) {
    uint8_t buf[4096], want[4096];
    memset (want, 0x5a, sizeof want);
    CHECK (sync_read (q, 0, buf, sizeof buf) == 0, "read %s", path);
    CHECK (memcmp (buf, want, sizeof buf) == 0, "backing data of %s", path);
    qcow2_close (q);
  }
  return r;
}

int
main (void)
{
  const char *d = test_dir ();
  char path[4096], out[4096], err[512];
  const char *allow[] = { out, NULL };
  struct qcow2_opts o = { 0 };
  int r;

  require_qemu_img ();
  snprintf (out, sizeof out, "%s/out", d);
  CHECK (shell ("cd %s && mkdir in out && "
                "qemu-img create -q -f raw out/b.raw 1M && "
                "qemu-io -f raw -c 'write -P 0x5a 0 1M' out/b.raw >/dev/null && "
                "qemu-img create -q -f qcow2 -b ../out/b.raw -F raw "
                "in/top.qcow2", d) == 0, "images");
  snprintf (path, sizeof path, "%s/in/top.qcow2", d);

  r = try_open (path, NULL, err, sizeof err);
  CHECK (r == -EACCES && strstr (err, "outside the image's directory"),
         "default: %d %s", r, err);
  printf ("ok - default (confine) refuses: %s\n", err);

  o.allow_dirs = allow;
  r = try_open (path, &o, err, sizeof err);
  CHECK (r == 0, "allow_dirs: %d %s", r, err);
  printf ("ok - allow_dirs admits\n");

  o.allow_dirs = NULL;
  o.backing = QCOW2_BACKING_FOLLOW;
  r = try_open (path, &o, err, sizeof err);
  CHECK (r == 0, "follow: %d %s", r, err);
  printf ("ok - follow admits\n");

  /* Inside the directory, none still refuses. */
  CHECK (shell ("cd %s && cp out/b.raw in/b.raw && "
                "qemu-img rebase -q -u -b b.raw -F raw in/top.qcow2", d) == 0,
         "rebase");
  r = try_open (path, NULL, err, sizeof err);
  CHECK (r == 0, "inside: %d %s", r, err);
  o.backing = QCOW2_BACKING_NONE;
  r = try_open (path, &o, err, sizeof err);
  CHECK (r == -EACCES && strstr (err, "--backing=none"), "none: %d %s", r,
         err);
  printf ("ok - none refuses: %s\n", err);

  /* a -> b -> c -> a */
  CHECK (shell ("cd %s/in && qemu-img create -q -f qcow2 a.qcow2 1M && "
                "qemu-img create -q -f qcow2 -b a.qcow2 -F qcow2 c.qcow2 && "
                "qemu-img create -q -f qcow2 -b c.qcow2 -F qcow2 b.qcow2 && "
                "qemu-img rebase -q -u -b b.qcow2 -F qcow2 a.qcow2", d) == 0,
         "loop");
  snprintf (path, sizeof path, "%s/in/a.qcow2", d);
  o.backing = QCOW2_BACKING_FOLLOW;
  r = try_open (path, &o, err, sizeof err);
  CHECK (r == -ELOOP && strstr (err, "backing chain loop: ")
         && strstr (err, "a.qcow2 is already in the chain"),
         "loop: %d %s", r, err);
  printf ("ok - loop refused: %s\n", err);
  return test_exit ();
}
