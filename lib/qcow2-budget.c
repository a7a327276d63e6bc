/* lib/qcow2-budget.c: one memory budget shared by the metadata caches of
 * many images (a daemon serving 200 exports must not let each one grow
 * its caches to their own bounds).
 *
 * A member (one cache of one image) reserves a small minimum when it
 * joins, enough for any request to make progress: a join that does not
 * fit fails, so the minimums never overcommit the budget.  Beyond its
 * minimum a member grows only while the budget has room; when it has
 * none, the budget asks the coldest other member (least recently used as
 * a whole) that holds more than its minimum to give back one clean,
 * unpinned entry, and when no member can, the member that wants to grow
 * must reuse one of its own entries instead (its own CLOCK, which sends
 * dirty victims through the flusher as always).
 *
 * Why the coldest member gives memory back rather than the grower always
 * recycling its own: the budget would then belong to whichever images
 * filled it first, and a disk that becomes busy later would run for ever
 * on its minimum while idle disks kept their tables.  Only clean entries
 * are taken from another image: a dirty one may only be written by that
 * image's flusher, in its order.
 *
 * The public calls (qcow2_cache_budget_*) are defined here, beside the
 * state they reach, like the test hooks elsewhere.
 */
#include <config.h>

#include <assert.h>
#include <errno.h>
#include <stdlib.h>

#include "qcow2-internal.h"

struct qcow2_cache_budget {
  uint64_t total;               /* bytes the members may hold together */
  uint64_t committed;           /* sum over members of max(bytes, min) */
  uint64_t peak;                /* highest committed so far */
  uint64_t tick;                /* advanced by every budget_touch */
  struct budget_member *members;
};

struct qcow2_cache_budget *
qcow2_cache_budget_new (uint64_t bytes)
{
  struct qcow2_cache_budget *b = calloc (1, sizeof *b);

  if (b)
    b->total = bytes;
  return b;
}

void
qcow2_cache_budget_free (struct qcow2_cache_budget *b)
{
  if (!b)
    return;
  /* Every image that used it is closed: its caches left. */
  assert (b->members == NULL && b->committed == 0);
  free (b);
}

uint64_t
qcow2_cache_budget_used (const struct qcow2_cache_budget *b)
{
  return b->committed;
}

uint64_t
qcow2_testing_budget_peak (const struct qcow2_cache_budget *b)
{
  return b->peak;
}

/* What m counts against the budget. */
static uint64_t
charge (const struct budget_member *m)
{
  return m->bytes > m->min_bytes ? m->bytes : m->min_bytes;
}

static void
commit (struct qcow2_cache_budget *b, uint64_t add)
{
  b->committed += add;
  assert (b->committed <= b->total);
  if (b->committed > b->peak)
    b->peak = b->committed;
}

int
budget_join (struct qcow2_cache_budget *b, struct budget_member *m,
             uint64_t min_bytes)
{
  m->b = NULL;
  m->bytes = 0;
  m->min_bytes = min_bytes;
  m->stamp = 0;
  if (!b)
    return 0;
  if (min_bytes > b->total - b->committed)
    return -ENOBUFS;
  m->b = b;
  commit (b, min_bytes);
  m->prev = NULL;
  m->next = b->members;
  if (m->next)
    m->next->prev = m;
  b->members = m;
  return 0;
}

void
budget_leave (struct budget_member *m)
{
  struct qcow2_cache_budget *b = m->b;

  if (!b)
    return;
  assert (b->committed >= charge (m));
  b->committed -= charge (m);
  if (m->prev)
    m->prev->next = m->next;
  else
    b->members = m->next;
  if (m->next)
    m->next->prev = m->prev;
  m->b = NULL;
}

void
budget_touch (struct budget_member *m)
{
  if (m->b)
    m->stamp = ++m->b->tick;
}

/* The least recently used member but m holding more than its minimum
 * whose stamp is past after, or NULL.  Members already asked for this
 * growth have stamps up to after: a member is touched before it first
 * takes memory, so every member holding any has a stamp of its own.
 */
static struct budget_member *
coldest_other (const struct budget_member *m, uint64_t after)
{
  struct budget_member *best = NULL;

  for (struct budget_member *o = m->b->members; o; o = o->next) {
    if (o == m || o->bytes <= o->min_bytes || o->stamp <= after)
      continue;
    if (!best || o->stamp < best->stamp)
      best = o;
  }
  return best;
}

/* Members asked to give memory back for one growth, at most: each ask is
 * a walk of the member list, and a growth that finds none is only a
 * reuse of the grower's own entries.
 */
#define BUDGET_ASKS 4

bool
budget_take (struct budget_member *m, uint64_t bytes)
{
  struct qcow2_cache_budget *b = m->b;
  uint64_t extra;
  uint64_t after = 0;

  if (!b) {
    m->bytes += bytes;
    return true;
  }
  extra = m->bytes + bytes - charge (m);
  if (m->bytes + bytes <= m->min_bytes)
    extra = 0;                  /* inside its reservation */
  for (unsigned i = 0; extra > b->total - b->committed && i < BUDGET_ASKS;
       i++) {
    struct budget_member *o = coldest_other (m, after);

    if (!o)
      break;
    after = o->stamp;
    /* Each entry it gives back calls budget_release. */
    while (extra > b->total - b->committed && o->bytes > o->min_bytes
           && o->shrink (o))
      ;
  }
  if (extra > b->total - b->committed)
    return false;
  commit (b, extra);
  m->bytes += bytes;
  return true;
}

void
budget_release (struct budget_member *m, uint64_t bytes)
{
  uint64_t before = charge (m);

  assert (m->bytes >= bytes);
  m->bytes -= bytes;
  if (m->b) {
    assert (m->b->committed >= before - charge (m));
    m->b->committed -= before - charge (m);
  }
}
