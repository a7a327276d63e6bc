/* lib/qcow2-claim.c: the per-L2-slice allocation queues.  A write (or a
 * write-zeroes, or a discard) claims the clusters of a cached slice it is
 * about to change; only a later request into the same clusters of the same
 * slice waits for the claim, everything else goes on.
 */
#include <config.h>

#include <assert.h>

#include "qcow2-internal.h"

void
claim_add (struct cache_entry *e, struct claim *a, uint32_t first,
           uint32_t count)
{
  a->first = first;
  a->count = count;
  a->waiters.head = a->waiters.tail = NULL;
  a->next = e->claims;
  e->claims = a;
}

void
claim_drop (struct qcow2 *q, struct cache_entry *e, struct claim *a)
{
  struct claim **p = &e->claims;
  while (*p && *p != a)
    p = &(*p)->next;
  /* Only a claim made with claim_add on this entry is dropped, once. */
  assert (*p == a);
  *p = a->next;
  waitq_wake_all (q, &a->waiters);
}

struct claim *
claim_find (struct cache_entry *e, uint32_t first, uint32_t last)
{
  for (struct claim *a = e->claims; a; a = a->next)
    if (a->first <= last && first < a->first + a->count)
      return a;
  return NULL;
}
