/* lib/qcow2-testing.c: what the unit tests may see of an open image
 * (lib/qcow2-testing.h), read from the engine's state without changing it.
 */
#include <config.h>

#include "qcow2-internal.h"
#include "qcow2-testing.h"

enum qcow2_testing_region
qcow2_testing_classify (const struct qcow2 *q, uint64_t off)
{
  if (off < q->cluster_size)
    return QCOW2_TESTING_HEADER;
  if (off >= q->l1_offset && off < q->l1_offset + q->l1_size * 8ull)
    return QCOW2_TESTING_L1;
  if (off >= q->reftable_offset
      && off < q->reftable_offset
      + ((uint64_t) q->reftable_clusters << q->cluster_bits))
    return QCOW2_TESTING_REFTABLE;
  for (uint64_t i = 0; i < q->l1_size; i++) {
    uint64_t l2 = be64toh (q->l1[i]) & L1E_OFFSET_MASK;
    if (l2 && off >= l2 && off < l2 + q->cluster_size)
      return QCOW2_TESTING_L2;
  }
  for (uint64_t i = 0; i < q->reftable_entries; i++)
    if ((be64toh (q->reftable[i]) & REFT_OFFSET_MASK) == off)
      return QCOW2_TESTING_REFBLOCK;
  return QCOW2_TESTING_OTHER;
}

int
qcow2_testing_image_fd (const struct qcow2 *q)
{
  return q->fd;
}

uint64_t
qcow2_testing_cache_bytes (const struct qcow2 *q)
{
  return q->l2c.budget.bytes + q->rbc.budget.bytes;
}

void
qcow2_testing_dcache_counts (const struct qcow2 *q, uint64_t *hits,
                             uint64_t *misses)
{
  *hits = q->dcache.hits;
  *misses = q->dcache.misses;
}
