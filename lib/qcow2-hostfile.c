/* lib/qcow2-hostfile.c: the host files an image chain opens.
 *
 * An image is untrusted input, and the names in its header (backing file,
 * external data file) are paths on the host that the daemon, often root,
 * opens, reads and, for a data file, writes.  Every file the chain opens
 * goes through hostfile_open, which enforces:
 * - the backing policy: CONFINE keeps the named files inside the opened
 *   image's directory and the allowed directories, after symlinks; NONE
 *   refuses names altogether; FOLLOW takes them as they are;
 * - regular files only: a FIFO would hang the open, a device (/dev/zero)
 *   is endless or has side effects;
 * - each file at most once in the chain (device and inode): a loop would
 *   otherwise be opened again and again, and a data file that is an image
 *   of the chain would let guest writes land on its metadata.
 */
#include <config.h>

#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "qcow2-internal.h"

struct file_id {
  dev_t dev;
  ino_t ino;
};

struct hostfiles {
  enum qcow2_backing_policy policy;
  char **dirs;                  /* CONFINE: real paths, no trailing '/' */
  size_t n_dirs;
  struct file_id *ids;          /* every file the chain has open */
  size_t n_ids;
};

void
hostfile_free (struct qcow2 *top)
{
  struct hostfiles *h = top->hostfiles;

  if (!h)
    return;
  for (size_t i = 0; i < h->n_dirs; i++)
    free (h->dirs[i]);
  free (h->dirs);
  free (h->ids);
  free (h);
  top->hostfiles = NULL;
}

/* Add the real path of dir (which must be a directory) to the allowed
 * ones.  what names it in the error.
 */
static int
allow_dir (struct hostfiles *h, const char *what, const char *dir, char *err,
           size_t errlen)
{
  char *real = realpath (dir, NULL);
  struct stat st;
  char **dirs;
  int r;

  if (!real || stat (real, &st) < 0) {
    r = -errno;
    snprintf (err, errlen, "%s %s: %s", what, dir, strerror (-r));
    free (real);
    return r;
  }
  if (!S_ISDIR (st.st_mode)) {
    snprintf (err, errlen, "%s %s: not a directory", what, dir);
    free (real);
    return -ENOTDIR;
  }
  dirs = realloc (h->dirs, (h->n_dirs + 1) * sizeof *dirs);
  if (!dirs) {
    free (real);
    snprintf (err, errlen, "out of memory");
    return -ENOMEM;
  }
  h->dirs = dirs;
  h->dirs[h->n_dirs++] = real;
  return 0;
}

/* The chain's policy, from the options the image was opened with. */
static int
hostfiles_init (struct qcow2 *top, const struct qcow2_opts *opts,
                const char *path, char *err, size_t errlen)
{
  struct hostfiles *h = calloc (1, sizeof *h);
  const char *slash = strrchr (path, '/');
  char *dir;
  int r = 0;

  if (!h) {
    snprintf (err, errlen, "out of memory");
    return -ENOMEM;
  }
  top->hostfiles = h;
  h->policy = opts->backing;
  if (h->policy != QCOW2_BACKING_CONFINE)
    return 0;

  /* The directory of the path as given: relative names in the header are
   * resolved from it too.
   */
  if (!slash)
    dir = strdup (".");
  else if (slash == path)
    dir = strdup ("/");
  else
    dir = strndup (path, (size_t) (slash - path));
  if (!dir) {
    snprintf (err, errlen, "out of memory");
    return -ENOMEM;
  }
  r = allow_dir (h, "the image's directory", dir, err, errlen);
  free (dir);
  for (size_t i = 0; r == 0 && opts->allow_dirs && opts->allow_dirs[i]; i++)
    r = allow_dir (h, "allowed directory", opts->allow_dirs[i], err, errlen);
  return r;
}

/* real (a path realpath gave) lies inside one of the allowed directories. */
static bool
inside_allowed (const struct hostfiles *h, const char *real)
{
  for (size_t i = 0; i < h->n_dirs; i++) {
    const char *d = h->dirs[i];
    size_t len = strlen (d);

    if (strcmp (d, "/") == 0)
      return true;
    if (strncmp (real, d, len) == 0 && real[len] == '/')
      return true;
  }
  return false;
}

static const char *
kind_name (enum hostfile_kind kind)
{
  return kind == HOSTFILE_BACKING ? "backing file" : "data file";
}

/* Open path (already checked) without blocking and without following a
 * symlink in its last component when nofollow; refuse it unless it is a
 * regular file, and unless it is the very file want describes (want may
 * be NULL).  Returns the descriptor (blocking again) or -errno.
 */
static int
open_regular (const char *path, int flags, bool nofollow,
              const struct stat *want, char *err, size_t errlen)
{
  struct stat st;
  int fd, fl, r;

  fd = open (path, flags | O_CLOEXEC | O_NONBLOCK
             | (nofollow ? O_NOFOLLOW : 0));
  if (fd < 0) {
    r = -errno;
    if (r == -EINVAL && (flags & O_DIRECT))
      snprintf (err, errlen, "the file system does not support O_DIRECT "
                "(--cache=none)");
    else if (r == -ELOOP && nofollow)
      snprintf (err, errlen, "replaced by a symbolic link while being "
                "opened");
    else
      snprintf (err, errlen, "%s", strerror (-r));
    return r;
  }
  if (fstat (fd, &st) < 0) {
    r = -errno;
    snprintf (err, errlen, "%s", strerror (-r));
    goto fail;
  }
  if (!S_ISREG (st.st_mode)) {
    r = -EINVAL;
    snprintf (err, errlen, "not a regular file");
    goto fail;
  }
  if (want && (st.st_dev != want->st_dev || st.st_ino != want->st_ino)) {
    r = -EACCES;
    snprintf (err, errlen, "replaced by another file while being opened");
    goto fail;
  }
  /* From here on, I/O on it must wait for the disk like any file's. */
  fl = fcntl (fd, F_GETFL);
  if (fl < 0 || fcntl (fd, F_SETFL, fl & ~O_NONBLOCK) < 0) {
    r = -errno;
    snprintf (err, errlen, "%s", strerror (-r));
    goto fail;
  }
  return fd;

 fail:
  close (fd);
  return r;
}

/* Remember fd's file as part of the chain, unless it already is. */
static int
add_to_chain (struct hostfiles *h, int fd, enum hostfile_kind kind,
              const char *path, char *err, size_t errlen)
{
  struct file_id *ids;
  struct stat st;

  if (fstat (fd, &st) < 0) {
    snprintf (err, errlen, "%s", strerror (errno));
    return -errno;
  }
  for (size_t i = 0; i < h->n_ids; i++) {
    if (h->ids[i].dev != st.st_dev || h->ids[i].ino != st.st_ino)
      continue;
    if (kind == HOSTFILE_BACKING)
      snprintf (err, errlen, "backing chain loop: %s is already in the "
                "chain", path);
    else
      snprintf (err, errlen, "%s is already in the chain (as an image or "
                "a data file)", path);
    return -ELOOP;
  }
  ids = realloc (h->ids, (h->n_ids + 1) * sizeof *ids);
  if (!ids) {
    snprintf (err, errlen, "out of memory");
    return -ENOMEM;
  }
  h->ids = ids;
  h->ids[h->n_ids].dev = st.st_dev;
  h->ids[h->n_ids].ino = st.st_ino;
  h->n_ids++;
  return 0;
}

int
hostfile_open (struct qcow2 *top, const struct qcow2_opts *opts,
               enum hostfile_kind kind, const char *path, int flags,
               char *err, size_t errlen)
{
  struct hostfiles *h;
  struct stat want;
  char *real = NULL;
  int fd, r;

  if (kind == HOSTFILE_IMAGE) {
    /* Opened once per chain, first: the top image sets the rules. */
    assert (!top->hostfiles);
    r = hostfiles_init (top, opts, path, err, errlen);
    if (r < 0)
      return r;
  }
  h = top->hostfiles;

  switch (kind == HOSTFILE_IMAGE ? QCOW2_BACKING_FOLLOW : h->policy) {
  case QCOW2_BACKING_NONE:
    snprintf (err, errlen, "refused: with --backing=none an image may name "
              "no %s", kind_name (kind));
    return -EACCES;

  case QCOW2_BACKING_CONFINE:
    real = realpath (path, NULL);
    if (!real) {
      r = -errno;
      snprintf (err, errlen, "%s", strerror (-r));
      return r;
    }
    if (!inside_allowed (h, real)) {
      if (strcmp (real, path) == 0)
        snprintf (err, errlen, "outside the image's directory and the "
                  "allowed directories (--backing, --allow-dir)");
      else
        snprintf (err, errlen, "resolves to %s, outside the image's "
                  "directory and the allowed directories (--backing, "
                  "--allow-dir)", real);
      free (real);
      return -EACCES;
    }
    /* realpath left no symlink in real: one swapped in for its last
     * component now is refused by O_NOFOLLOW, and any other change by
     * comparing what was opened with what was checked.
     */
    if (stat (real, &want) < 0) {
      r = -errno;
      snprintf (err, errlen, "%s", strerror (-r));
      free (real);
      return r;
    }
    if (!S_ISREG (want.st_mode)) {
      snprintf (err, errlen, "not a regular file");
      free (real);
      return -EINVAL;
    }
    fd = open_regular (real, flags, true, &want, err, errlen);
    free (real);
    break;

  case QCOW2_BACKING_FOLLOW:
  default:
    /* Devices are not even opened: opening some has effects. */
    if (stat (path, &want) == 0 && !S_ISREG (want.st_mode)) {
      snprintf (err, errlen, "not a regular file");
      return -EINVAL;
    }
    fd = open_regular (path, flags, false, NULL, err, errlen);
    break;
  }
  if (fd < 0)
    return fd;

  r = add_to_chain (h, fd, kind, path, err, errlen);
  if (r < 0) {
    close (fd);
    return r;
  }
  return fd;
}
