/* lib/qcow2-alloc.c: the host cluster allocator.
 *
 * Allocation never waits: host clusters are handed out in memory, on the
 * loop thread, from the clusters earlier flushes freed or else from the end
 * of the file, so two allocations can never receive the same cluster.  The
 * refcount increments they owe are recorded as extents and applied to the
 * refcount blocks by the flusher, which is the only code that reads or
 * writes refcount blocks after open.  That keeps refcount I/O (and the
 * creation of new refcount blocks and tables) off the write path.
 */
#include <config.h>

#include <stdbool.h>

#include "qcow2-internal.h"
#include "qcow2-testing.h"

/* Test hook (qcow2-testing.h): the next reuse of a freed cluster is
 * found to overlap metadata, which no image can make happen on purpose
 * (freed clusters are checked when they are freed, too).
 */
static bool overlap_next_reuse;

/* Record the refcount increments owed by count clusters at off. */
static int
owe_increments (struct qcow2 *q, uint64_t off, uint64_t count)
{
  struct extent_list *l = &q->incs;

  /* Sequential allocations are the common case: grow the last extent. */
  if (l->n > 0 && l->v[l->n - 1].offset
      + (l->v[l->n - 1].count << q->cluster_bits) == off) {
    l->v[l->n - 1].count += count;
    return 0;
  }
  return extent_add (l, off, count);
}

int
alloc_fresh_clusters (struct qcow2 *q, uint64_t count, uint64_t *out)
{
  uint64_t off = q->alloc_end;
  int r = space_reserve_end (q, off + (count << q->cluster_bits));

  if (r < 0)
    return r;
  r = owe_increments (q, off, count);
  if (r < 0)
    return r;
  space_consume (q, count);
  *out = off;
  return 0;
}

void
qcow2_testing_overlap_next_reuse (void)
{
  overlap_next_reuse = true;
}

int
alloc_clusters (struct qcow2 *q, uint64_t count, uint64_t *out)
{
  struct extent_list *f = &q->free_clusters;
  uint64_t largest = 0;
  int r;

  /* First fit among the clusters freed by earlier flushes, so that an
   * image whose guest discards does not grow for ever.  free_largest
   * spares a walk of a long list of short extents that cannot fit.
   */
  for (size_t i = 0; i < f->n && count <= q->free_largest; i++) {
    uint64_t off = f->v[i].offset;
    if (f->v[i].count < count) {
      if (f->v[i].count > largest)
        largest = f->v[i].count;
      if (i + 1 == f->n)
        q->free_largest = largest;      /* nothing fits: now exact */
      continue;
    }
    /* Refcounts said free; make sure no metadata lives there (L2 tables
     * were checked when the clusters were freed).  They were punched:
     * their space is reserved again before anything is written there.
     */
    r = overlap_check (q, META_DATA, off, count << q->cluster_bits);
    if (r == 0 && overlap_next_reuse) {
      overlap_next_reuse = false;
      r = corrupt_signal (q, "test: freed cluster 0x%llx overlaps "
                          "metadata", (unsigned long long) off);
    }
    if (r == 0)
      r = space_reserve_range (q, off, count << q->cluster_bits);
    if (r == 0)
      r = owe_increments (q, off, count);
    if (r < 0)
      return r;
    f->v[i].offset += count << q->cluster_bits;
    f->v[i].count -= count;
    if (f->v[i].count == 0)
      f->v[i] = f->v[--f->n];
    *out = off;
    return 0;
  }
  return alloc_fresh_clusters (q, count, out);
}
