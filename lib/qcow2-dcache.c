/* lib/qcow2-dcache.c: the last few compressed clusters, decompressed.
 *
 * Why: a read of 4 KiB from a compressed cluster inflates the whole
 * cluster (180 µs for 64 KiB of zlib), so reading a compressed image
 * 4 KiB at a time in order inflated each cluster 16 times.  Kept here, the
 * cluster's next reads are a copy.
 *
 * Entries are named by where the compressed bytes lie in the file (offset
 * and size: the L2 descriptor).  Those bytes never change while a cluster
 * refers to them (a write to a compressed cluster allocates a new one);
 * they can change only once their host cluster is freed and allocated
 * again, and freed clusters become allocatable in one place
 * (make_reusable, qcow2-flush.c), which empties this cache first.  A
 * decompression that started before that must not fill it afterwards:
 * each fill carries the generation it started in.
 *
 * Loop thread only: the decompression runs on a worker, but takes its
 * generation when planned and gives its buffer over when done, both on
 * the loop.
 */
#include <config.h>

#include <stdlib.h>
#include <string.h>

#include "qcow2-internal.h"

/* Entries in cluster sizes up to 64 KiB: 16 (1 MiB); one for 1 and 2 MiB
 * clusters, like QEMU's single decompressed cluster.
 */
#define DCACHE_BYTES (1u << 20)

static unsigned
capacity (const struct qcow2 *q)
{
  unsigned n = DCACHE_BYTES >> q->cluster_bits;
  return n > 0 ? n : 1;
}

const char *
dcache_lookup (struct qcow2 *q, uint64_t coff, uint64_t csize)
{
  struct dcache *d = &q->dcache;

  for (unsigned i = 0; i < d->n; i++)
    if (d->v[i].coff == coff && d->v[i].csize == csize) {
      d->v[i].used = ++d->tick;
      d->hits++;
      return d->v[i].data;
    }
  d->misses++;
  return NULL;
}

uint64_t
dcache_generation (const struct qcow2 *q)
{
  return q->dcache.gen;
}

void
dcache_fill (struct qcow2 *q, uint64_t coff, uint64_t csize, uint64_t gen,
             char *data)
{
  struct dcache *d = &q->dcache;
  struct dcache_entry *slot = NULL;

  if (gen != d->gen) {
    free (data);                /* its bytes may have been freed since */
    return;
  }
  for (unsigned i = 0; i < d->n; i++)
    if (d->v[i].coff == coff && d->v[i].csize == csize) {
      free (data);              /* two reads of one cluster at once */
      d->v[i].used = ++d->tick;
      return;
    }
  if (!d->v) {
    d->v = calloc (capacity (q), sizeof *d->v);
    if (!d->v) {
      free (data);              /* only speed lost */
      return;
    }
  }
  if (d->n < capacity (q))
    slot = &d->v[d->n++];
  else {
    slot = &d->v[0];
    for (unsigned i = 1; i < d->n; i++)
      if (d->v[i].used < slot->used)
        slot = &d->v[i];
    free (slot->data);
  }
  slot->coff = coff;
  slot->csize = csize;
  slot->data = data;
  slot->used = ++d->tick;
}

void
dcache_clear (struct qcow2 *q)
{
  struct dcache *d = &q->dcache;

  d->gen++;
  for (unsigned i = 0; i < d->n; i++)
    free (d->v[i].data);
  d->n = 0;
}

void
dcache_free (struct qcow2 *q)
{
  dcache_clear (q);
  free (q->dcache.v);
  q->dcache.v = NULL;
}
