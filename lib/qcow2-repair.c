/* lib/qcow2-repair.c: rebuilding the refcounts of an image that was not
 * closed cleanly while its refcounts were lazy (the dirty bit), or whose
 * refcounts count clusters past the end of the file.
 *
 * Runs at open, synchronously, before anything is served.  Every cluster
 * that the header, the L1 tables (active and snapshots), the L2 tables and
 * the snapshot table reach is counted, and a new refcount table with new
 * refcount blocks is written past the end of the file.  Only then does the
 * header switch to it, so a crash during the repair leaves the old (dirty)
 * state, which the next open repairs again.
 *
 * The references are counted by qcow2-refs.c.  The work is bounded by the
 * file: everything counted must lie inside it, the new structures are
 * sized by its size, and each L2 table is read once.
 */
#include <config.h>

#include <assert.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <syslog.h>
#include <unistd.h>

#include "qcow2-internal.h"

/* Write the nrb new refcount blocks of the counts k, and the nrt clusters
 * of the new table that names them, past the end of the file at base;
 * durable when this returns 0.
 */
static int
write_refcounts (struct refs *k, uint64_t base, uint64_t nrt, uint64_t nrb,
                 uint64_t *table, void *block)
{
  struct qcow2 *q = k->q;
  uint64_t cs = q->cluster_size;
  uint64_t per = (uint64_t) 1 << q->rb_bits;
  int r;

  for (uint64_t b = 0; b < nrb; b++) {
    uint64_t off = base + (nrt + b) * cs;
    memset (block, 0, cs);
    for (uint64_t i = 0; i < per && b * per + i < k->n; i++) {
      if (k->c[b * per + i] > q->refcount_max) {
        snprintf (k->err, k->errlen, "cannot repair refcounts: cluster %"
                  PRIu64 " has more references than refcount_bits allows",
                  b * per + i);
        return -EOVERFLOW;
      }
      refblock_set (q, block, i, k->c[b * per + i]);
    }
    table[b] = htobe64 (off);
    r = blocking_pwrite (q->fd, block, cs, off);
    if (r < 0)
      goto io_err;
  }
  r = blocking_pwrite (q->fd, table, nrt * cs, base);
  if (r == 0 && fdatasync (q->fd) < 0)
    r = -errno;
  if (r == 0)
    return 0;
 io_err:
  snprintf (k->err, k->errlen, "writing repaired refcounts: %s",
            strerror (-r));
  return r;
}

int
repair_refcounts (struct qcow2 *q, bool lenient, char *err,
                  size_t errlen)
{
  uint64_t cs = q->cluster_size;
  uint64_t per = (uint64_t) 1 << q->rb_bits;
  /* Sized by the file, never by what the old refcounts claim: a cluster
   * counted far past the end must not make the repair grow the file or
   * count clusters up to it.  Nothing past the end is referenced (a
   * lenient count may reach into the cluster after the end: the new
   * structures go after that one).
   */
  uint64_t base = round_up (q->file_end, cs) + (lenient ? cs : 0);
  uint64_t nfile = base / cs;
  uint64_t nrb = 1, nrt = 1, total;
  struct refs k = { .q = q, .file_size = q->file_end, .err = err,
                    .errlen = errlen, .lenient = lenient };
  uint64_t *table = NULL;
  void *block = NULL;
  int r;

  err[0] = '\0';
  /* New table and blocks go past the end; they must count themselves. */
  for (;;) {
    uint64_t rb = (nfile + nrb + nrt + per - 1) / per;
    uint64_t rt = (rb * 8 + cs - 1) / cs;
    if (rb == nrb && rt == nrt)
      break;
    nrb = rb;
    nrt = rt;
  }
  total = nfile + nrt + nrb;
  if (nrt * cs > MAX_REFTABLE_BYTES * 4) {
    snprintf (err, errlen, "cannot repair refcounts: image too large");
    return -EFBIG;
  }
  k.n = total;
  k.c = calloc (total, sizeof *k.c);
  table = buffer_alloc_zero (nrt * cs);
  block = buffer_alloc_zero (cs);
  if (!k.c || !table || !block) {
    r = -ENOMEM;
    snprintf (err, errlen, "out of memory repairing refcounts");
    goto out;
  }
  r = refs_count (&k);
  if (r < 0) {
    if (!err[0])
      snprintf (err, errlen, "cannot repair refcounts: %s", strerror (-r));
    goto out;
  }
  for (uint64_t c = nfile; c < total; c++)
    k.c[c]++;

  r = write_refcounts (&k, base, nrt, nrb, table, block);
  if (r < 0)
    goto out;

  /* Switch the header over, then the image is consistent again. */
  {
    uint8_t *h = q->header_sector;
    put_be64 (h + HDR_REFTABLE_OFFSET, base);
    put_be32 (h + HDR_REFTABLE_CLUSTERS, (uint32_t) nrt);
    r = header_write_sync (q);
    if (r < 0)
      goto io_err;
  }
  free (q->reftable);
  q->reftable = table;
  table = NULL;
  q->reftable_offset = base;
  q->reftable_clusters = (uint32_t) nrt;
  q->reftable_entries = nrt * cs / 8;
  q->reftable_used = nrb;
  q->alloc_end = base + (nrt + nrb) * cs;
  if (q->incompat & INCOMPAT_DIRTY)
    qlog (q, LOG_WARNING, "%s was not closed cleanly (lazy refcounts): "
          "refcounts rebuilt", q->path);
  else
    qlog (q, LOG_WARNING, "%s: refcounts rebuilt", q->path);
  goto out;

 io_err:
  snprintf (err, errlen, "writing repaired refcounts: %s", strerror (-r));
 out:
  free (k.c);
  free (table);
  free (block);
  return r;
}
