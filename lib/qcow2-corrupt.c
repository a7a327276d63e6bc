/* lib/qcow2-corrupt.c: what the engine does when the image contradicts
 * itself: refuse further writes, mark the image corrupt on disk, and check
 * untrusted host offsets before they are used.
 */
#include <config.h>

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <syslog.h>

#include "qcow2-internal.h"

int
corrupt_signal (struct qcow2 *q, const char *fmt, ...)
{
  char msg[400];
  va_list ap;

  va_start (ap, fmt);
  vsnprintf (msg, sizeof msg, fmt, ap);
  va_end (ap);
  if (!q->broken) {
    qlog (q, LOG_ERR, "%s: image is corrupt, refusing further writes: %s",
          q->path, msg);
    if (!q->read_only && q->version >= 3) {
      put_be64 ((uint8_t *) q->header_sector + HDR_INCOMPAT,
                q->incompat | INCOMPAT_CORRUPT);
      if (header_write_sync (q) < 0)
        qlog (q, LOG_ERR, "%s: could not mark the image corrupt", q->path);
    }
  }
  q->broken = true;
  return -EIO;
}

/* Host offsets read from the image are untrusted. */
int
corrupt_check_cluster (struct qcow2 *q, uint64_t off, const char *what)
{
  if ((off & (q->cluster_size - 1)) || off < q->cluster_size
      || off >= q->alloc_end) {
    qlog (q, LOG_ERR, "%s offset 0x%llx is invalid (unaligned or outside "
          "the file)", what, (unsigned long long) off);
    return -EIO;
  }
  /* Cheap checks only: the header, L1 and refcount tables. */
  if ((off >= q->l1_offset && off < q->l1_offset
       + round_up ((uint64_t) q->l1_size * 8, q->cluster_size))
      || (off >= q->reftable_offset && off < q->reftable_offset
          + ((uint64_t) q->reftable_clusters << q->cluster_bits))) {
    qlog (q, LOG_ERR, "%s offset 0x%llx points into the image's own "
          "tables", what, (unsigned long long) off);
    return -EIO;
  }
  return 0;
}
