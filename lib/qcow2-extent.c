/* lib/qcow2-extent.c: growable lists of host cluster extents (refcount
 * changes owed, clusters free for reuse).
 */
#include <config.h>

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2-internal.h"
#include "qcow2-testing.h"

/* Test hook (qcow2-testing.h): the nth extent_add from now fails. */
static unsigned fail_extent_add_in;

void
qcow2_testing_fail_extent_add (unsigned nth)
{
  fail_extent_add_in = nth;
}

int
extent_add (struct extent_list *l, uint64_t offset, uint64_t count)
{
  if (fail_extent_add_in && --fail_extent_add_in == 0)
    return -ENOMEM;
  if (l->n == l->cap) {
    size_t cap = l->cap ? l->cap * 2 : 16;
    struct extent *v = realloc (l->v, cap * sizeof *v);
    if (!v)
      return -ENOMEM;
    l->v = v;
    l->cap = cap;
  }
  l->v[l->n].offset = offset;
  l->v[l->n].count = count;
  l->n++;
  return 0;
}

int
extent_list_take (struct extent_list *dst, struct extent_list *src)
{
  if (src->n == 0)
    return 0;
  if (dst->n + src->n > dst->cap) {
    size_t cap = dst->cap ? dst->cap : 16;
    while (cap < dst->n + src->n)
      cap *= 2;
    struct extent *v = realloc (dst->v, cap * sizeof *v);
    if (!v)
      return -ENOMEM;
    dst->v = v;
    dst->cap = cap;
  }
  memcpy (dst->v + dst->n, src->v, src->n * sizeof *src->v);
  dst->n += src->n;
  src->n = 0;
  return 0;
}
