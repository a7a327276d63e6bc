/* lib/qcow2-refcount.c: reading and writing refcount entries of any width
 * (1 to 64 bits) inside a refcount block.
 */
#include <config.h>

#include "qcow2-internal.h"

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
