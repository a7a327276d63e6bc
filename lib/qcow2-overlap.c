/* lib/qcow2-overlap.c: the last check before a metadata or data write.
 *
 * A corrupt image can make two structures claim the same cluster (an L2
 * entry pointing at the L1 table, a refcount block inside the header...).
 * Writing then would destroy good metadata, so every write-back of a table,
 * and every data cluster taken from an L2 entry, is checked against the
 * structures whose location is known in memory.  On a hit the image is
 * marked corrupt (on disk, so that other tools see it too) and no further
 * write happens.
 */
#include <config.h>

#include <errno.h>

#include "qcow2-internal.h"

static bool
hits (uint64_t off, uint64_t len, uint64_t start, uint64_t size)
{
  return size && off < start + size && start < off + len;
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
  if (!what && kind == META_REFBLOCK) {
    for (uint64_t i = 0; i < q->l1_size && !what; i++) {
      uint64_t l2 = be64toh (q->l1[i]) & L1E_OFFSET_MASK;
      if (l2 && hits (off, len, l2, cs))
        what = "an L2 table";
    }
  }
  if (!what)
    return 0;
  return signal_corruption (q, "a %s write at 0x%llx (%llu bytes) would "
                            "overwrite %s",
                            kind == META_L2 ? "L2 table"
                            : kind == META_REFBLOCK ? "refcount block"
                            : kind == META_L1 ? "L1 table"
                            : kind == META_REFTABLE ? "refcount table"
                            : "data", (unsigned long long) off,
                            (unsigned long long) len, what);
}
