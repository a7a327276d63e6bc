/* lib/qcow2-info.c: what an image's header (and snapshot table) says,
 * for qnbd-img info:
 * parsed and validated by qcow2-header.c, as at open, but read-only and
 * without opening anything else, so that images qnbd would not serve
 * (marked corrupt, left dirty) can still be described.
 */
#include <config.h>

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "qcow2-internal.h"

char *
info_beside (const char *path, const char *name)
{
  const char *slash = strrchr (path, '/');
  char *s;

  if (name[0] == '/' || !slash)
    return strdup (name);
  if (asprintf (&s, "%.*s/%s", (int) (slash - path), path, name) < 0)
    return NULL;
  return s;
}

/* The header cluster of fd into q (which it points at). */
static int
read_header (struct qcow2 *q, int fd, uint64_t file_size, void **buf,
             size_t *len, char *err, size_t errlen)
{
  uint8_t first[QCOW2_V2_HEADER_LEN];
  uint32_t bits;
  int r = blocking_pread (fd, first, sizeof first, 0, true);

  if (r < 0) {
    snprintf (err, errlen, "cannot read the header: %s", strerror (-r));
    return r;
  }
  /* The header and its extensions fill at most the first cluster. */
  bits = get_be32 (first + HDR_CLUSTER_BITS);
  *len = bits >= QCOW2_MIN_CLUSTER_BITS && bits <= QCOW2_MAX_CLUSTER_BITS
    ? (size_t) 1 << bits : sizeof first;
  *buf = calloc (1, *len);
  if (!*buf) {
    snprintf (err, errlen, "out of memory");
    return -ENOMEM;
  }
  r = blocking_pread (fd, *buf, *len, 0, true);
  if (r < 0) {
    snprintf (err, errlen, "cannot read the header: %s", strerror (-r));
    return r;
  }
  return header_parse (q, *buf, *len, file_size, err, errlen);
}

static void
fill_info (const struct qcow2 *q, struct qcow2_info *info)
{
  info->size = q->size;
  info->cluster_size = q->cluster_size;
  info->version = q->version;
  info->refcount_bits = q->refcount_bits;
  info->compression_type = q->compression_type;
  info->lazy_refcounts = (q->compat & COMPAT_LAZY_REFCOUNTS) != 0;
  info->extended_l2 = q->extl2;
  info->corrupt = (q->incompat & INCOMPAT_CORRUPT) != 0;
  info->dirty = (q->incompat & INCOMPAT_DIRTY) != 0;
  info->data_file_raw = (q->autoclear & AUTOCLEAR_DATA_FILE_RAW) != 0;
  info->nb_snapshots = q->nb_snapshots;
  memcpy (info->backing_fmt, q->backing_fmt, sizeof info->backing_fmt);
}

/* The backing file name, which header_parse found inside the file. */
static int
read_backing_name (const struct qcow2 *q, int fd, struct qcow2_info *info,
                   char *err, size_t errlen)
{
  int r;

  if (!q->backing_offset)
    return 0;
  info->backing_file = calloc (1, (size_t) q->backing_size + 1);
  if (!info->backing_file) {
    snprintf (err, errlen, "out of memory");
    return -ENOMEM;
  }
  r = blocking_pread (fd, info->backing_file, q->backing_size,
                      q->backing_offset, false);
  if (r == 0)
    info->full_backing_file = info_beside (q->path, info->backing_file);
  if (r == 0 && !info->full_backing_file) {
    snprintf (err, errlen, "out of memory");
    return -ENOMEM;
  }
  if (r < 0)
    snprintf (err, errlen, "cannot read the backing file name: %s",
              strerror (-r));
  return r;
}

/* The snapshot table, as qemu-img info lists it. */
static int
read_snapshots (struct qcow2 *q, struct qcow2_info *info, char *err,
                size_t errlen)
{
  struct snapshot *s;
  unsigned n;
  int r = snapshot_table_read (q, &s, &n, err, errlen);

  if (r < 0 || n == 0)
    return r;
  info->snapshots = calloc (n, sizeof *info->snapshots);
  if (!info->snapshots) {
    snapshot_table_free (s, n);
    snprintf (err, errlen, "out of memory");
    return -ENOMEM;
  }
  for (unsigned i = 0; i < n; i++) {
    struct qcow2_snapshot_info *d = &info->snapshots[i];
    /* The strings change hands. */
    d->id = s[i].id;
    d->name = s[i].name;
    s[i].id = s[i].name = NULL;
    d->vm_state_size = s[i].vm_state_size;
    d->date_sec = s[i].date_sec;
    d->date_nsec = s[i].date_nsec;
    d->vm_clock_nsec = s[i].vm_clock_nsec;
    d->has_icount = s[i].icount != UINT64_MAX;
    d->icount = s[i].icount;
  }
  info->nb_snapshots = n;
  snapshot_table_free (s, n);
  return 0;
}

int
qcow2_read_info (const char *path, struct qcow2_info *info, char *err,
                 size_t errlen)
{
  return qcow2_read_info_shared (path, true, info, err, errlen);
}

int
qcow2_read_info_shared (const char *path, bool force_share,
                        struct qcow2_info *info, char *err, size_t errlen)
{
  struct qcow2 *q = calloc (1, sizeof *q);
  void *buf = NULL;
  size_t len = 0;
  struct stat st;
  int fd = -1, r = 0;

  memset (info, 0, sizeof *info);
  if (!q)
    r = -ENOMEM;
  if (r == 0 && ((fd = open (path, O_RDONLY | O_CLOEXEC)) < 0
                 || fstat (fd, &st) < 0))
    r = -errno;
  if (r < 0)
    snprintf (err, errlen, "%s", strerror (-r));
  if (r == 0) {
    q->read_only = true;
    q->path = (char *) path;
    q->fd = fd;
    q->file_end = (uint64_t) st.st_size;
    /* Before reading: a writer may be changing it (the lock goes with
     * the descriptor).
     */
    if (!force_share)
      r = lock_image (q, fd, IMAGE_LOCK_READ, "image", err, errlen);
  }
  if (r == 0)
    r = read_header (q, fd, (uint64_t) st.st_size, &buf, &len, err, errlen);
  if (r == 0) {
    fill_info (q, info);
    info->data_file = q->data_file;
    q->data_file = NULL;
    r = read_backing_name (q, fd, info, err, errlen);
  }
  if (r == 0)
    r = read_snapshots (q, info, err, errlen);
  if (r < 0)
    qcow2_info_free (info);
  if (fd >= 0)
    close (fd);
  if (q)
    free (q->data_file);
  free (q);
  free (buf);
  return r;
}

void
qcow2_info_free (struct qcow2_info *info)
{
  free (info->data_file);
  free (info->backing_file);
  free (info->full_backing_file);
  info->data_file = info->backing_file = info->full_backing_file = NULL;
  for (uint32_t i = 0; info->snapshots && i < info->nb_snapshots; i++) {
    free (info->snapshots[i].id);
    free (info->snapshots[i].name);
  }
  free (info->snapshots);
  info->snapshots = NULL;
}
