/* lib/qcow2-entry.c: what an L2 entry (and its subcluster bitmap) says
 * about a guest cluster, and the references an entry gives up when it is
 * replaced.
 */
#include <config.h>

#include "qcow2-internal.h"

/* The whole-cluster zero flag (v3 without extended L2, whose bitmap says
 * it per subcluster instead).
 */
bool
entry_is_zero (const struct qcow2 *q, uint64_t ent)
{
  return q->version >= 3 && !q->extl2 && !(ent & L2E_COMPRESSED)
    && (ent & L2E_ZERO);
}

/* A normal (uncompressed, non-zero) cluster written in place. */
/* With an external data file, offset 0 is a real cluster when COPIED is
 * set (guest cluster 0 lives at offset 0 of the data file).
 */
bool
entry_is_hole (const struct qcow2 *q, uint64_t ent)
{
  return !(ent & L2E_COMPRESSED) && !(ent & L2E_OFFSET_MASK)
    && !(q->data_file && (ent & L2E_COPIED));
}

bool
entry_is_inplace (const struct qcow2 *q, uint64_t ent)
{
  return (ent & L2E_COPIED) && !(ent & L2E_COMPRESSED)
    && !entry_is_zero (q, ent) && !entry_is_hole (q, ent);
}

bool
entry_reads_zero (const struct qcow2 *q, uint64_t ent)
{
  if (entry_is_zero (q, ent))
    return true;
  return entry_is_hole (q, ent) && !q->backing;
}

enum sc_kind
entry_status (const struct qcow2 *q, uint64_t ent, uint64_t bmp,
              uint64_t coff, uint64_t *run_end)
{
  unsigned x, bits;

  *run_end = q->cluster_size;
  if (ent & L2E_COMPRESSED)
    return SC_COMPRESSED;
  if (!q->extl2) {
    if (entry_is_zero (q, ent))
      return SC_ZERO;
    return entry_is_hole (q, ent) ? SC_HOLE : SC_DATA;
  }
  x = (unsigned) (coff >> q->sc_bits);
  bits = (unsigned) ((bmp >> x) & 1) | (unsigned) ((bmp >> (31 + x)) & 2);
  while (x + 1 < SUBCLUSTERS
         && (((bmp >> (x + 1)) & 1) | ((bmp >> (32 + x)) & 2)) == bits)
    x++;
  *run_end = (uint64_t) (x + 1) << q->sc_bits;
  switch (bits) {
  case 0: return SC_HOLE;
  case 1: return entry_is_hole (q, ent) ? SC_BAD : SC_DATA;
  case 2: return SC_ZERO;
  default: return SC_BAD;       /* allocated and zero at once */
  }
}

uint64_t
entry_sc_mask (const struct qcow2 *q, uint64_t lo, uint64_t hi)
{
  unsigned a = (unsigned) (lo >> q->sc_bits);
  unsigned b = (unsigned) ((hi + q->sc_size - 1) >> q->sc_bits);
  if (b <= a)
    return 0;
  return (SC_ALLOC_ALL >> (SUBCLUSTERS - (b - a))) << a;
}

int
entry_release (struct qcow2 *q, uint64_t ent)
{
  if (ent & L2E_COMPRESSED)
    return compressed_release (q, ent);
  /* Clusters of an external data file are not refcounted. */
  if ((ent & L2E_OFFSET_MASK) && !q->data_file)
    return extent_add (&q->decs, ent & L2E_OFFSET_MASK, 1);
  return 0;
}
