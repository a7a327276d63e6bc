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
 * The work is bounded by the file: everything counted must lie inside it,
 * the new structures are sized by its size, and each L2 table is read once.
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

struct counts {
  struct qcow2 *q;
  uint32_t *c;                  /* per cluster (saturating) */
  uint64_t n;                   /* clusters covered by c */
  uint64_t file_size;           /* references must lie below this */
  struct l2ref *l2;             /* every L1 entry in use, of every L1 table */
  size_t nl2, capl2;
  uint32_t walk;                /* which L1 table is being walked */
  char *err;
  size_t errlen;
};

/* One L1 entry: the L2 table it names and which L1 table it is in. */
struct l2ref {
  uint64_t offset;
  uint32_t walk;
};

/* Count times references to every cluster of [off, off+len), which must
 * lie inside the file: references, not refcounts, size the repair.
 */
static int
mark (struct counts *k, uint64_t off, uint64_t len, uint32_t times,
      const char *what)
{
  char name[96];
  uint64_t first, last;

  if (len == 0)
    return 0;
  snprintf (name, sizeof name, "cannot repair refcounts: %s", what);
  if (header_in_file (name, off, len, k->file_size, k->err, k->errlen) < 0)
    return -EINVAL;
  first = off >> k->q->cluster_bits;
  last = (off + len - 1) >> k->q->cluster_bits;
  assert (last < k->n);
  for (uint64_t c = first; c <= last; c++)
    k->c[c] = k->c[c] > UINT32_MAX - times ? UINT32_MAX : k->c[c] + times;
  return 0;
}

/* Note the L2 tables an L1 table names; they are read later, once each. */
static int
walk_l1 (struct counts *k, const uint64_t *l1, uint32_t l1_size)
{
  struct qcow2 *q = k->q;
  uint64_t cs = q->cluster_size;

  k->walk++;
  for (uint32_t i = 0; i < l1_size; i++) {
    uint64_t l2off = be64toh (l1[i]) & L1E_OFFSET_MASK;
    if (!l2off)
      continue;
    if (l2off & (cs - 1)) {
      snprintf (k->err, k->errlen, "cannot repair refcounts: L2 table "
                "offset 0x%" PRIx64 " is unaligned", l2off);
      return -EINVAL;
    }
    if (mark (k, l2off, cs, 1, "L2 table") < 0)
      return -EINVAL;
    if (k->nl2 == k->capl2) {
      size_t cap = k->capl2 ? k->capl2 * 2 : 1024;
      struct l2ref *v = realloc (k->l2, cap * sizeof *v);
      if (!v)
        return -ENOMEM;
      k->l2 = v;
      k->capl2 = cap;
    }
    k->l2[k->nl2++] = (struct l2ref) { l2off, k->walk };
  }
  return 0;
}

static int
cmp_l2ref (const void *a, const void *b)
{
  const struct l2ref *x = a, *y = b;
  if (x->offset != y->offset)
    return x->offset < y->offset ? -1 : 1;
  return x->walk < y->walk ? -1 : x->walk > y->walk;
}

/* Count what the L2 tables reach.  A table shared by n L1 tables (internal
 * snapshots) gives its clusters n references, but is read once: a small
 * file cannot make the repair read much more than itself.  One L1 table
 * naming a table twice is corrupt (QEMU never shares a table that way).
 */
static int
count_l2_tables (struct counts *k, void *l2buf)
{
  struct qcow2 *q = k->q;
  uint64_t cs = q->cluster_size;
  uint32_t per = cs >> (q->extl2 ? 4 : 3);
  int r = 0;

  if (k->nl2 == 0)
    return 0;
  qsort (k->l2, k->nl2, sizeof *k->l2, cmp_l2ref);
  for (size_t i = 0, j; r == 0 && i < k->nl2; i = j) {
    uint64_t l2off = k->l2[i].offset;
    for (j = i + 1; j < k->nl2 && k->l2[j].offset == l2off; j++)
      if (k->l2[j].walk == k->l2[j - 1].walk) {
        snprintf (k->err, k->errlen, "cannot repair refcounts: L2 table at "
                  "0x%" PRIx64 " is used twice by one L1 table", l2off);
        return -EINVAL;
      }
    r = blocking_pread (q->fd, l2buf, cs, l2off, false);
    if (r < 0) {
      snprintf (k->err, k->errlen, "cannot repair refcounts: reading L2 "
                "table at 0x%" PRIx64 ": %s", l2off, strerror (-r));
      return r;
    }
    for (uint32_t e = 0; r == 0 && e < per; e++) {
      uint64_t ent = be64toh (((uint64_t *) l2buf)[(size_t) e
                                                   << (q->extl2 ? 1 : 0)]);
      if (ent & L2E_COMPRESSED) {
        uint64_t coff, csize;
        compressed_extent (q, ent, &coff, &csize);
        r = mark (k, coff & ~(uint64_t) (SECTOR - 1),
                  csize + (coff & (SECTOR - 1)), (uint32_t) (j - i),
                  "compressed cluster");
      }
      else if ((ent & L2E_OFFSET_MASK) && !q->data_file)
        r = mark (k, ent & L2E_OFFSET_MASK, cs, (uint32_t) (j - i),
                  "data cluster");
    }
  }
  return r;
}

static int
count_all (struct counts *k)
{
  struct qcow2 *q = k->q;
  struct snapshot *s = NULL;
  unsigned ns = 0;
  void *l2buf = malloc (q->cluster_size);
  int r;

  if (!l2buf)
    return -ENOMEM;
  r = mark (k, 0, q->cluster_size, 1, "header");
  if (r == 0 && q->backing_offset)
    r = mark (k, q->backing_offset, q->backing_size, 1, "backing file name");
  if (r == 0)
    r = mark (k, q->l1_offset, (uint64_t) q->l1_size * 8, 1, "L1 table");
  if (r == 0)
    r = walk_l1 (k, q->l1, q->l1_size);
  if (r == 0)
    r = snapshot_table_read (q, &s, &ns, k->err, k->errlen);
  if (r == 0 && ns)
    r = mark (k, q->snapshots_offset, q->snapshots_bytes, 1,
              "snapshot table");
  /* snapshot_table_read made sure these tables fit in the file together. */
  for (unsigned i = 0; r == 0 && i < ns; i++) {
    size_t bytes = (size_t) s[i].l1_size * 8;
    uint64_t *l1 = malloc (bytes ? bytes : 1);
    if (!l1) {
      r = -ENOMEM;
      break;
    }
    r = mark (k, s[i].l1_offset, bytes, 1, "snapshot L1 table");
    if (r == 0 && bytes)
      r = blocking_pread (q->fd, l1, bytes, s[i].l1_offset, false);
    if (r == 0)
      r = walk_l1 (k, l1, s[i].l1_size);
    free (l1);
  }
  if (r == 0)
    r = count_l2_tables (k, l2buf);
  snapshot_table_free (s, ns);
  free (k->l2);
  k->l2 = NULL;
  free (l2buf);
  return r;
}

/* Write the nrb new refcount blocks of the counts k, and the nrt clusters
 * of the new table that names them, past the end of the file at base;
 * durable when this returns 0.
 */
static int
write_refcounts (struct counts *k, uint64_t base, uint64_t nrt, uint64_t nrb,
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
repair_refcounts (struct qcow2 *q, char *err, size_t errlen)
{
  uint64_t cs = q->cluster_size;
  uint64_t per = (uint64_t) 1 << q->rb_bits;
  /* Sized by the file, never by what the old refcounts claim: a cluster
   * counted far past the end must not make the repair grow the file or
   * count clusters up to it.  Nothing past the end is referenced.
   */
  uint64_t base = round_up (q->file_end, cs), nfile = base / cs;
  uint64_t nrb = 1, nrt = 1, total;
  struct counts k = { .q = q, .file_size = q->file_end, .err = err,
                      .errlen = errlen };
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
  r = count_all (&k);
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
