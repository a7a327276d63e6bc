/* lib/qcow2-refcount.c: refcount entries of any width, and the cluster
 * allocator.
 *
 * Allocation never waits: host clusters are handed out in memory, on the
 * loop thread, from the clusters earlier flushes freed or else from the end
 * of the file, so two allocations can never receive the same cluster.  The refcount increments they owe are recorded as extents
 * and applied to the refcount blocks by the flusher, which is the only code
 * that reads or writes refcount blocks after open.  That keeps refcount I/O
 * (and the creation of new refcount blocks and tables) off the write path.
 */
#include <config.h>

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "qcow2-internal.h"
#include "qcow2-testing.h"

uint64_t
refblock_get (const struct qcow2 *q, const void *block, uint64_t i)
{
  const uint8_t *b = block;
  switch (q->refcount_order) {
  case 0: return (b[i / 8] >> (i % 8)) & 1;
  case 1: return (b[i / 4] >> (2 * (i % 4))) & 3;
  case 2: return (b[i / 2] >> (4 * (i % 2))) & 15;
  case 3: return b[i];
  case 4: return be16toh (((const uint16_t *) block)[i]);
  case 5: return be32toh (((const uint32_t *) block)[i]);
  default: return be64toh (((const uint64_t *) block)[i]);
  }
}

void
refblock_set (const struct qcow2 *q, void *block, uint64_t i, uint64_t v)
{
  uint8_t *b = block;
  unsigned shift, width;
  switch (q->refcount_order) {
  case 0: case 1: case 2:
    /* Sub-byte widths are packed from the least significant bit up. */
    width = 1u << q->refcount_order;
    shift = (unsigned) (i % (8 / width)) * width;
    b[i / (8 / width)] = (uint8_t) ((b[i / (8 / width)]
                                     & ~(((1u << width) - 1) << shift))
                                    | ((v & ((1u << width) - 1)) << shift));
    return;
  case 3: b[i] = (uint8_t) v; return;
  case 4: ((uint16_t *) block)[i] = htobe16 ((uint16_t) v); return;
  case 5: ((uint32_t *) block)[i] = htobe32 ((uint32_t) v); return;
  default: ((uint64_t *) block)[i] = htobe64 (v); return;
  }
}

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

/* Test hook (qcow2-testing.h): the next reuse of a freed cluster is
 * found to overlap metadata, which no image can make happen on purpose
 * (freed clusters are checked when they are freed, too).
 */
static bool overlap_next_reuse;

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
      r = signal_corruption (q, "test: freed cluster 0x%llx overlaps "
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
