/* server/nbd-meta.c: the metadata contexts served, for
 * NBD_CMD_BLOCK_STATUS: the one table that the handshake
 * (NBD_OPT_LIST_META_CONTEXT, NBD_OPT_SET_META_CONTEXT) and the block
 * status reply (nbd-reply.c) both read.
 *
 *   base:allocation         NBD_STATE_HOLE, NBD_STATE_ZERO
 *   qemu:allocation-depth   0: allocated nowhere in the backing chain,
 *                           1: in the image itself, 2: in its backing
 *                           file, and so on
 *
 * A query is a context's full name; LIST also takes a namespace alone
 * ("base:", "qemu:") for every context in it.
 */
#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <stdio.h>
#include <string.h>

#include "internal.h"

static uint32_t
status_allocation (const struct qcow2_extent *x)
{
  uint32_t flags = 0;

  if (x->flags & QCOW2_EXTENT_HOLE)
    flags |= NBD_STATE_HOLE;
  if (x->flags & QCOW2_EXTENT_ZERO)
    flags |= NBD_STATE_ZERO;
  return flags;
}

static uint32_t
status_depth (const struct qcow2_extent *x)
{
  return x->depth;
}

/* In the order they are listed and their chunks sent.  Bit i of a mask
 * is meta_contexts[i]; the ids are what SET_META_CONTEXT answers and
 * what the BLOCK_STATUS chunks carry.
 */
const struct meta_context meta_contexts[META_NR] = {
  { "base:allocation", 1, status_allocation },
  { "qemu:allocation-depth", 2, status_depth },
};

unsigned
meta_query (const char *q, uint32_t len, bool list)
{
  unsigned mask = 0;
  size_t i;

  for (i = 0; i < META_NR; i++) {
    const char *name = meta_contexts[i].name;
    size_t ns = strchr (name, ':') - name + 1;  /* "base:" */

    if ((strlen (name) == len && memcmp (name, q, len) == 0) ||
        (list && len == ns && memcmp (name, q, ns) == 0))
      mask |= META_BIT (i);
  }
  return mask;
}

const char *
meta_names (unsigned mask, char *buf, size_t size)
{
  size_t i, n = 0;

  buf[0] = '\0';
  for (i = 0; i < META_NR; i++) {
    int r;

    if (!(mask & META_BIT (i)) || n >= size)
      continue;
    r = snprintf (buf + n, size - n, ", %s", meta_contexts[i].name);
    if (r > 0)
      n += r;
  }
  return buf;
}
