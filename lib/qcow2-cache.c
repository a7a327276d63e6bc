/* lib/qcow2-cache.c: a cache of metadata tables (L2 slices, refcount
 * blocks), evicted by CLOCK (second chance), an approximation of LRU that
 * finds a victim in a few steps: a scan of every entry for the least
 * recently used one cost 20 us a miss with 8192 slices.
 *
 * One cache type serves both L2 tables and refcount blocks.  Entries are
 * pinned while a request uses them; an unpinned entry may be evicted when it
 * is clean.  Nothing here ever blocks: a miss starts a read and parks the
 * request on the entry, a full cache parks it on the cache, and a cache whose
 * only victims are dirty asks for a write-back first.
 *
 * Dirty L2 tables may only be written after the refcounts they rely on are
 * durable (DESIGN.md, "Ordering"), so an L2 victim is cleaned by a full
 * metadata flush.  Refcount blocks have no such dependency (increments are
 * always safe to write early, decrements are only applied once the L2 change
 * is durable), so a dirty refcount victim is simply written.
 */
#include <config.h>

#include <assert.h>
#include <errno.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2-internal.h"

/* What one entry costs: its table and its bookkeeping. */
static uint64_t
entry_cost (const struct cache *c)
{
  return c->entry_bytes + sizeof (struct cache_entry);
}

static unsigned
bucket_of (const struct cache *c, uint64_t offset)
{
  uint64_t k = offset >> c->entry_bits;
  return (unsigned) ((k * 0x9e3779b97f4a7c15ull) >> 32) & (c->nbuckets - 1);
}

static bool shrink_one (struct budget_member *m);

int
cache_init (struct cache *c, struct qcow2 *q, const char *what, unsigned n,
            unsigned min, uint32_t entry_bytes,
            struct qcow2_cache_budget *b)
{
  memset (c, 0, sizeof *c);
  c->q = q;
  c->what = what;
  c->entry_bytes = entry_bytes;
  c->entry_bits = (unsigned) __builtin_ctz (entry_bytes);
  c->min = min;
  c->n = n > min ? n : min;
  c->nbuckets = 16;
  c->buckets = calloc (c->nbuckets, sizeof *c->buckets);
  if (!c->buckets)
    return -ENOMEM;
  c->budget.shrink = shrink_one;
  return budget_join (b, &c->budget, min * entry_cost (c));
}

/* Forget entry i: the slot of the last entry takes its place. */
static void
drop_entry (struct cache *c, unsigned i)
{
  struct cache_entry *e = c->e[i];

  free (e->buf);
  free (e);
  c->e[i] = c->e[--c->count];
  if (c->hand >= c->count)
    c->hand = 0;
  budget_release (&c->budget, entry_cost (c));
}

void
cache_free (struct cache *c)
{
  while (c->count) {
    struct cache_entry *e = c->e[c->count - 1];
    /* Freed at close, after every request ended: nothing holds an
     * entry, waits on one or has a claim on one.
     */
    assert (e->ref == 0 && !e->claims && !e->waiters.head);
    drop_entry (c, c->count - 1);
  }
  budget_leave (&c->budget);
  free (c->e);
  free (c->buckets);
  c->e = NULL;
  c->buckets = NULL;
}

static struct cache_entry *
find (const struct cache *c, uint64_t offset)
{
  for (struct cache_entry *e = c->buckets[bucket_of (c, offset)]; e;
       e = e->hnext)
    if (e->offset == offset)
      return e;
  return NULL;
}

static void
hash_remove (struct cache *c, struct cache_entry *e)
{
  struct cache_entry **p = &c->buckets[bucket_of (c, e->offset)];
  while (*p && *p != e)
    p = &(*p)->hnext;
  if (*p == e)
    *p = e->hnext;
  e->hnext = NULL;
}

static void
hash_insert (struct cache *c, struct cache_entry *e)
{
  unsigned b = bucket_of (c, e->offset);
  e->hnext = c->buckets[b];
  c->buckets[b] = e;
}

/* Room for one more entry in e and in the hash (chains stay short). */
static int
make_room (struct cache *c)
{
  if (c->count == c->alloc) {
    unsigned alloc = c->alloc ? 2 * c->alloc : 16;
    struct cache_entry **v;

    if (alloc > c->n)
      alloc = c->n;
    v = realloc (c->e, alloc * sizeof *v);
    if (!v)
      return -ENOMEM;
    c->e = v;
    c->alloc = alloc;
  }
  if (c->count == c->nbuckets) {
    struct cache_entry **old = c->buckets;
    struct cache_entry **v = calloc (2 * c->nbuckets, sizeof *v);

    if (!v)
      return -ENOMEM;
    c->buckets = v;
    c->nbuckets *= 2;
    free (old);
    /* An entry is hashed exactly when it has an offset. */
    for (unsigned i = 0; i < c->count; i++)
      if (c->e[i]->offset)
        hash_insert (c, c->e[i]);
  }
  return 0;
}

/* A new, free entry (offset 0), counted against the budget by the
 * caller.  Returns it, or NULL with *err = -ENOMEM.
 */
static struct cache_entry *
new_entry (struct cache *c, int *err)
{
  struct cache_entry *e = NULL;

  if (make_room (c) == 0 && (e = calloc (1, sizeof *e)) != NULL) {
    e->buf = buffer_alloc_zero (c->entry_bytes);
    if (!e->buf) {
      free (e);
      e = NULL;
    }
  }
  if (!e) {
    *err = -ENOMEM;
    return NULL;
  }
  e->cache = c;
  c->e[c->count++] = e;
  return e;
}

/* The budget asks for memory back: drop a clean entry nothing uses, one
 * the clock hand would pass over last (a second chance, as for victims).
 */
static bool
shrink_one (struct budget_member *m)
{
  struct cache *c = (struct cache *) ((char *) m
                                      - offsetof (struct cache, budget));

  if (c->count <= c->min)
    return false;
  for (unsigned step = 0; step < 2 * c->count; step++) {
    unsigned i = c->hand;
    struct cache_entry *e = c->e[i];
    c->hand = c->hand + 1 == c->count ? 0 : c->hand + 1;
    if (e->ref || e->loading || e->writing || e->dirty || e->claims
        || e->waiters.head)
      continue;
    if (e->offset && e->used) {
      e->used = false;
      continue;
    }
    if (e->offset)
      hash_remove (c, e);
    drop_entry (c, i);
    return true;
  }
  return false;
}

void
cache_put (struct cache_entry *e)
{
  struct cache *c = e->cache;
  assert (e->ref > 0);
  e->ref--;
  if (e->ref == 0) {
    e->used = true;
    waitq_wake_all (c->q, &c->full);
  }
}

void
cache_mark_dirty (struct cache_entry *e)
{
  e->dirty = true;
}

static void
io_done (struct aio_op *op, int64_t ret)
{
  struct cache_entry *e = op->opaque;
  struct cache *c = e->cache;
  struct qcow2 *q = c->q;

  if (e->loading) {
    e->loading = false;
    if (ret >= 0 && ret < c->entry_bytes) {
      qlog (q, 3, "%s table at 0x%llx lies past the end of the file",
            c->what, (unsigned long long) e->offset);
      ret = -EIO;
    }
    if (ret < 0) {
      qlog (q, 3, "reading %s table at 0x%llx: %s", c->what,
            (unsigned long long) e->offset, strerror ((int) -ret));
      hash_remove (c, e);
      e->offset = 0;
      waitq_fail_all (q, &e->waiters, (int) ret);
      waitq_wake_all (q, &c->full);
      return;
    }
    waitq_wake_all (q, &e->waiters);
    return;
  }

  /* A write-back. */
  e->writing = false;
  if (ret < 0) {
    qlog (q, 3, "writing %s table at 0x%llx: %s", c->what,
          (unsigned long long) e->offset, strerror ((int) -ret));
    e->dirty = true;
  }
  waitq_wake_all (q, &e->waiters);
  if (e->for_flusher) {
    e->for_flusher = false;
    q->flush_io_done (q, ret);
  }
  else if (e->ref == 0)
    waitq_wake_all (q, &c->full);
}

static int
submit (struct cache_entry *e, enum aio_op_type type)
{
  struct qcow2 *q = e->cache->q;
  e->iov.iov_base = e->buf;
  e->iov.iov_len = e->cache->entry_bytes;
  e->op.type = type;
  e->op.fd = q->fd;
  e->op.inline_mode = q->fd_inline;
  e->op.iov = &e->iov;
  e->op.iovcnt = 1;
  e->op.offset = e->offset;
  e->op.done = io_done;
  e->op.opaque = e;
  return aio_submit (q->aio, &e->op);
}

/* Start writing e back.  Returns 0, or -errno with e still dirty: the
 * overlap check refused it (and marked the image corrupt), or the backend
 * refused the submission (logged here).
 */
static int
write_entry (struct cache_entry *e, bool for_flusher)
{
  struct qcow2 *q = e->cache->q;
  int r = overlap_check (q, e->cache == &q->l2c ? META_L2 : META_REFBLOCK,
                         e->offset, e->cache->entry_bytes);
  if (r < 0)
    return r;
  e->dirty = false;
  e->writing = true;
  e->for_flusher = for_flusher;
  r = submit (e, AIO_WRITE);
  if (r < 0) {
    qlog (q, 3, "submitting the write-back of %s at 0x%llx: %s",
          e->cache == &q->l2c ? "an L2 table" : "a refcount block",
          (unsigned long long) e->offset, strerror (-r));
    e->dirty = true;
    e->writing = false;
    e->for_flusher = false;
  }
  return r;
}

/* Pick a slot for a new table.  Returns it (unhashed), or NULL after parking
 * req: on the cache when every entry is pinned or busy, on a write-back or a
 * flush when only dirty victims are left.  *err is set on failure.
 */
static struct cache_entry *
take_victim (struct cache *c, struct qcow2_req *req, int *err)
{
  struct cache_entry *clean = NULL, *dirty = NULL;
  *err = 0;

  /* Grow while the cap and the budget allow it. */
  if (c->count < c->n && budget_take (&c->budget, entry_cost (c))) {
    clean = new_entry (c, err);
    if (!clean)
      budget_release (&c->budget, entry_cost (c));
    return clean;
  }
  /* The budget never refuses an entry below the minimum: there is one to
   * reuse, and enough of them for any request (CACHE_MAX_PINS_*).
   */
  assert (c->count >= c->min && c->count > 0);

  /* Two turns of the hand: the first may only clear "used" bits. */
  for (unsigned step = 0; step < 2 * c->count; step++) {
    struct cache_entry *e = c->e[c->hand];
    c->hand = c->hand + 1 == c->count ? 0 : c->hand + 1;
    if (e->offset == 0 && !e->ref) {
      clean = e;
      break;
    }
    if (e->ref || e->loading || e->writing)
      continue;
    if (e->used) {
      e->used = false;          /* a second chance */
      continue;
    }
    if (!e->dirty) {
      clean = e;
      break;
    }
    if (!dirty)
      dirty = e;
  }

  if (clean) {
    if (clean->offset)
      hash_remove (c, clean);
    clean->offset = 0;
    clean->claims = NULL;
    clean->load_err = 0;
    return clean;
  }

  if (dirty && c == &c->q->rbc) {
    int r = write_entry (dirty, false);
    if (r < 0)
      *err = r;
    else
      waitq_push (&dirty->waiters, req);
    return NULL;
  }
  if (dirty) {
    c->q->flush_request (c->q, req);
    return NULL;
  }
  waitq_push (&c->full, req);
  return NULL;
}

int
cache_get (struct cache *c, uint64_t offset, struct qcow2_req *req,
           struct cache_entry **out)
{
  struct cache_entry *e = find (c, offset);
  int r;

  budget_touch (&c->budget);
  if (e) {
    if (e->loading) {
      waitq_push (&e->waiters, req);
      return CACHE_WAIT;
    }
    e->ref++;
    *out = e;
    return CACHE_READY;
  }

  e = take_victim (c, req, &r);
  if (!e)
    return r < 0 ? r : CACHE_WAIT;

  e->offset = offset;
  e->loading = true;
  e->dirty = false;
  hash_insert (c, e);
  r = submit (e, AIO_READ);
  if (r < 0) {
    hash_remove (c, e);
    e->offset = 0;
    e->loading = false;
    return r;
  }
  waitq_push (&e->waiters, req);
  return CACHE_WAIT;
}

struct cache_entry *
cache_peek (struct cache *c, uint64_t offset)
{
  struct cache_entry *e;

  assert (c->q->read_only);
  e = find (c, offset);
  if (!e || e->loading)
    return NULL;
  budget_touch (&c->budget);
  e->used = true;
  return e;
}

int
cache_get_empty (struct cache *c, struct qcow2_req *req,
                 struct cache_entry **out)
{
  int r;
  struct cache_entry *e;

  budget_touch (&c->budget);
  e = take_victim (c, req, &r);

  if (!e)
    return r < 0 ? r : CACHE_WAIT;
  memset (e->buf, 0, c->entry_bytes);
  e->dirty = true;
  e->ref++;
  *out = e;
  return CACHE_READY;
}

void
cache_set_offset (struct cache_entry *e, uint64_t offset)
{
  struct cache *c = e->cache;
  struct cache_entry *old;

  if (e->offset)
    hash_remove (c, e);
  if (offset == 0) {
    e->offset = 0;
    e->dirty = false;
    return;
  }
  /* A stale clean copy of a table that was freed and reallocated. */
  old = find (c, offset);
  if (old && old != e && !old->ref && !old->loading && !old->writing) {
    hash_remove (c, old);
    old->offset = 0;
    old->dirty = false;
  }
  e->offset = offset;
  hash_insert (c, e);
}

int
cache_write_dirty (struct cache *c, unsigned *started)
{
  *started = 0;
  for (unsigned i = 0; i < c->count; i++) {
    struct cache_entry *e = c->e[i];
    if (e->offset && e->dirty && !e->writing && !e->loading) {
      /* The rest stay dirty too: the flusher's next run writes them. */
      int r = write_entry (e, true);
      if (r < 0)
        return r;
      (*started)++;
    }
  }
  return 0;
}

bool
cache_has_dirty (const struct cache *c)
{
  for (unsigned i = 0; i < c->count; i++)
    if (c->e[i]->offset && (c->e[i]->dirty || c->e[i]->writing))
      return true;
  return false;
}
