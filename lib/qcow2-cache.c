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
#include <stdlib.h>
#include <string.h>

#include "qcow2-internal.h"

static unsigned
bucket_of (const struct cache *c, uint64_t offset)
{
  uint64_t k = offset >> c->entry_bits;
  return (unsigned) ((k * 0x9e3779b97f4a7c15ull) >> 32) & (c->nbuckets - 1);
}

int
cache_init (struct cache *c, struct qcow2 *q, const char *what, unsigned n,
            uint32_t entry_bytes)
{
  memset (c, 0, sizeof *c);
  c->q = q;
  c->what = what;
  c->entry_bytes = entry_bytes;
  c->entry_bits = (unsigned) __builtin_ctz (entry_bytes);
  c->n = n;
  c->nbuckets = 1;
  while (c->nbuckets < n)
    c->nbuckets <<= 1;
  c->e = calloc (n, sizeof *c->e);
  c->buckets = malloc (c->nbuckets * sizeof *c->buckets);
  if (!c->e || !c->buckets)
    return -ENOMEM;
  for (unsigned i = 0; i < c->nbuckets; i++)
    c->buckets[i] = -1;
  for (unsigned i = 0; i < n; i++) {
    c->e[i].hnext = -1;
    c->e[i].cache = c;
  }
  return 0;
}

void
cache_free (struct cache *c)
{
  if (c->e)
    for (unsigned i = 0; i < c->n; i++) {
      /* Freed at close, after every request ended: nothing holds an
       * entry, waits on one or has a claim on one.
       */
      assert (c->e[i].ref == 0 && !c->e[i].claims
              && !c->e[i].waiters.head);
      free (c->e[i].buf);
    }
  free (c->e);
  free (c->buckets);
  c->e = NULL;
  c->buckets = NULL;
}

static struct cache_entry *
find (const struct cache *c, uint64_t offset)
{
  for (int i = c->buckets[bucket_of (c, offset)]; i >= 0; i = c->e[i].hnext)
    if (c->e[i].offset == offset)
      return &c->e[i];
  return NULL;
}

static void
hash_remove (struct cache *c, struct cache_entry *e)
{
  int idx = (int) (e - c->e);
  int *p = &c->buckets[bucket_of (c, e->offset)];
  while (*p >= 0 && *p != idx)
    p = &c->e[*p].hnext;
  if (*p == idx)
    *p = e->hnext;
  e->hnext = -1;
}

static void
hash_insert (struct cache *c, struct cache_entry *e)
{
  unsigned b = bucket_of (c, e->offset);
  e->hnext = c->buckets[b];
  c->buckets[b] = (int) (e - c->e);
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

  /* Two turns of the hand: the first may only clear "used" bits. */
  for (unsigned step = 0; step < 2 * c->n; step++) {
    struct cache_entry *e = &c->e[c->hand];
    c->hand = c->hand + 1 == c->n ? 0 : c->hand + 1;
    if (e->offset == 0) {
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
    if (!clean->buf) {
      clean->buf = buffer_alloc_zero (c->entry_bytes);
      if (!clean->buf) {
        *err = -ENOMEM;
        return NULL;
      }
    }
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

int
cache_get_empty (struct cache *c, struct qcow2_req *req,
                 struct cache_entry **out)
{
  int r;
  struct cache_entry *e = take_victim (c, req, &r);

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
  for (unsigned i = 0; i < c->n; i++) {
    struct cache_entry *e = &c->e[i];
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
  for (unsigned i = 0; i < c->n; i++)
    if (c->e[i].offset && (c->e[i].dirty || c->e[i].writing))
      return true;
  return false;
}
