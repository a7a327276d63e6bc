/* lib/qcow2-overlap.c: the last check before a metadata or data write.
 *
 * A corrupt image can make two structures claim the same cluster (an L2
 * entry pointing at the L1 table, a refcount block inside the header...).
 * Writing then would destroy good metadata, so every write-back of a table,
 * and every data cluster taken from an L2 entry, is checked against the
 * structures whose location is known in memory.  On a hit the image is
 * marked corrupt (on disk, so that other tools see it too) and no further
 * write happens.
 *
 * The active L2 tables are known from L1, but a scan of L1 per data write
 * would cost up to 4 million entries; their offsets are kept sorted beside
 * it instead (q->l2_tables), so a check is one binary search.  New tables
 * come from the end of the file: adding one is nearly always an append.
 */
#include <config.h>

#include <assert.h>
#include <errno.h>
#include <stdlib.h>

#include "qcow2-internal.h"

static bool
hits (uint64_t off, uint64_t len, uint64_t start, uint64_t size)
{
  return size && off < start + size && start < off + len;
}

/* Index of the first table that ends after off (n when none does). */
static size_t
l2_first_ending_after (const struct qcow2 *q, uint64_t off)
{
  size_t lo = 0, hi = q->l2_tables.n;
  while (lo < hi) {
    size_t mid = lo + (hi - lo) / 2;
    if (q->l2_tables.v[mid] + q->cluster_size <= off)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo;
}

static bool
hits_l2_table (const struct qcow2 *q, uint64_t off, uint64_t len)
{
  size_t i = l2_first_ending_after (q, off);
  return i < q->l2_tables.n && q->l2_tables.v[i] < off + len;
}

static int
cmp_u64 (const void *a, const void *b)
{
  uint64_t x = *(const uint64_t *) a, y = *(const uint64_t *) b;
  return x < y ? -1 : x > y;
}

int
overlap_l2_rebuild (struct qcow2 *q)
{
  struct overlap_l2_set *t = &q->l2_tables;
  size_t n = 0;

  free (t->v);
  t->v = malloc (((size_t) q->l1_size + 1) * sizeof *t->v);
  t->n = 0;
  t->cap = t->v ? (size_t) q->l1_size + 1 : 0;
  if (!t->v)
    return -ENOMEM;
  for (uint32_t i = 0; i < q->l1_size; i++) {
    uint64_t l2 = be64toh (q->l1[i]) & L1E_OFFSET_MASK;
    if (l2)
      t->v[n++] = l2;
  }
  qsort (t->v, n, sizeof *t->v, cmp_u64);
  /* Two L1 entries naming one table is caught elsewhere; keep it once. */
  t->n = 0;
  for (size_t i = 0; i < n; i++)
    if (t->n == 0 || t->v[t->n - 1] != t->v[i])
      t->v[t->n++] = t->v[i];
  return 0;
}

int
overlap_l2_reserve (struct qcow2 *q)
{
  struct overlap_l2_set *t = &q->l2_tables;
  if (t->n < t->cap)
    return 0;
  size_t cap = t->cap ? t->cap * 2 : 16;
  uint64_t *v = realloc (t->v, cap * sizeof *v);
  if (!v)
    return -ENOMEM;
  t->v = v;
  t->cap = cap;
  return 0;
}

void
overlap_l2_replace (struct qcow2 *q, uint64_t old, uint64_t new)
{
  struct overlap_l2_set *t = &q->l2_tables;
  size_t i;

  if (old) {
    i = l2_first_ending_after (q, old);
    if (i < t->n && t->v[i] == old) {
      memmove (t->v + i, t->v + i + 1, (t->n - i - 1) * sizeof *t->v);
      t->n--;
    }
  }
  /* overlap_l2_reserve made room; a new table never exists already. */
  assert (t->n < t->cap);
  i = l2_first_ending_after (q, new);
  assert (i == t->n || t->v[i] != new);
  memmove (t->v + i + 1, t->v + i, (t->n - i) * sizeof *t->v);
  t->v[i] = new;
  t->n++;
}

void
overlap_free (struct qcow2 *q)
{
  free (q->l2_tables.v);
  q->l2_tables.v = NULL;
  q->l2_tables.n = q->l2_tables.cap = 0;
}

int
overlap_check (struct qcow2 *q, enum meta_kind kind, uint64_t off,
               uint64_t len)
{
  uint64_t cs = q->cluster_size;
  const char *what = NULL;

  if (off < cs)
    what = "the header";
  else if (kind != META_L1
           && hits (off, len, q->l1_offset,
                    round_up ((uint64_t) q->l1_size * 8, cs)))
    what = "the L1 table";
  else if (kind != META_REFTABLE
           && hits (off, len, q->reftable_offset,
                    (uint64_t) q->reftable_clusters << q->cluster_bits))
    what = "the refcount table";
  else if (hits (off, len, q->snapshots_offset,
                 q->nb_snapshots ? round_up (q->snapshots_bytes ?
                                             q->snapshots_bytes : 1, cs) : 0))
    what = "the snapshot table";
  else if (kind == META_L2 || kind == META_DATA) {
    /* Refcount blocks: a scan of the entries in use (one per 2 GiB of
     * file with 64 KiB clusters), only for writes that could hit.
     */
    for (uint64_t i = 0; i < q->reftable_used && !what; i++) {
      uint64_t rb = be64toh (q->reftable[i]) & REFT_OFFSET_MASK;
      if (rb && hits (off, len, rb, cs))
        what = "a refcount block";
    }
  }
  /* An L2 table's own write-back is a slice of itself: not checked. */
  if (!what && (kind == META_REFBLOCK || kind == META_DATA)
      && hits_l2_table (q, off, len))
    what = "an L2 table";
  if (!what)
    return 0;
  return corrupt_signal (q, "a %s write at 0x%llx (%llu bytes) would "
                         "overwrite %s",
                         kind == META_L2 ? "L2 table"
                         : kind == META_REFBLOCK ? "refcount block"
                         : kind == META_L1 ? "L1 table"
                         : kind == META_REFTABLE ? "refcount table"
                         : "data", (unsigned long long) off,
                         (unsigned long long) len, what);
}
