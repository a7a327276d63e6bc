/* lib/qcow2-space.c: file space reserved ahead of the allocator.
 *
 * A write that was acknowledged must not be lost because the file system
 * filled up afterwards.  Its data is written before the acknowledgement,
 * but the metadata that makes it reachable (a new L2 table, refcount
 * blocks, a larger refcount table) is written later by the flusher, and on
 * a full file system those writes used to fail after the fact.  So:
 *
 * - everything below q->file_end is reserved with fallocate (not a sparse
 *   ftruncate, which reserves nothing);
 * - an allocation at the end of the file succeeds only if, after it, the
 *   reserved space past alloc_end still holds every metadata cluster the
 *   flusher may need to count the references of everything allocated so
 *   far (space_headroom): refcount blocks not yet on disk and a refcount
 *   table grown to index them.  Otherwise it fails with ENOSPC before any
 *   data is written, and the client sees the error on that write;
 * - clusters reused from the free list were punched: they are reserved
 *   again before they are handed out.
 *
 * The file is grown in steps (an eighth of what is allocated, 64 MiB at
 * least), because writes past the end of a file extend it and file systems
 * serialise that; close gives back what was not used.  When a step does
 * not fit, the file grows by exactly what is needed for a while.
 *
 * Where fallocate is not supported, the file is grown with ftruncate and
 * nothing is reserved (a warning says so once).
 */
#include <config.h>

#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <syslog.h>
#include <unistd.h>

#include "qcow2-internal.h"

#define GROW_STEP_MIN (64ull << 20)
/* Exact grows before a full step is tried again (space may be back). */
#define EXACT_GROWS 1024u

/* Count the refcount blocks missing up to block index last (incremental:
 * each index is looked at once; space_block_created takes them off).
 */
static uint64_t
blocks_missing (struct qcow2 *q, uint64_t last)
{
  while (q->rb_scanned <= last && q->rb_scanned < q->reftable_entries) {
    uint64_t i = q->rb_scanned++;
    /* As the flusher reads it: reserved low bits alone mean no block. */
    if (i >= q->reftable_entries
        || (be64toh (q->reftable[i]) & REFT_OFFSET_MASK) == 0)
      q->rb_missing++;
  }
  /* Past the table: all missing, counted at once. */
  if (q->rb_scanned <= last) {
    q->rb_missing += last + 1 - q->rb_scanned;
    q->rb_scanned = last + 1;
  }
  return q->rb_missing;
}

/* Clusters a refcount table able to index block last would take, counted
 * twice: the flusher may grow it twice in one run, and the first new table
 * is released only after the second is published.
 */
static uint64_t
reftable_growth (const struct qcow2 *q, uint64_t last)
{
  uint64_t entries;

  if (last < q->reftable_entries)
    return 0;
  entries = q->reftable_entries * 2;
  if (entries < last + 1)
    entries = last + 1;
  return 2 * (round_up (entries * 8, q->cluster_size) / q->cluster_size + 1);
}

/* Metadata clusters the flusher may need once clusters up to end are
 * allocated.  The metadata's own clusters need refcounts too: the second
 * pass counts the blocks for those.
 */
static uint64_t
space_headroom (struct qcow2 *q, uint64_t end)
{
  uint64_t h = 2;

  for (int pass = 0; pass < 2; pass++) {
    uint64_t last = ((end >> q->cluster_bits) + h) >> q->rb_bits;
    h = blocks_missing (q, last) + reftable_growth (q, last) + 2;
  }
  return h;
}

/* Reserve [file_end, target).  0 or -errno (ENOSPC, EDQUOT, EFBIG...). */
static int
grow_file (struct qcow2 *q, uint64_t target)
{
  if (!q->no_fallocate) {
    if (fallocate (q->fd, 0, (off_t) q->file_end,
                   (off_t) (target - q->file_end)) == 0) {
      q->file_end = target;
      return 0;
    }
    if (errno != EOPNOTSUPP)
      return -errno;
    q->no_fallocate = true;
    qlog (q, LOG_WARNING, "%s: the file system cannot reserve space "
          "(fallocate): writes acknowledged just before it fills up may be "
          "lost", q->path);
  }
  if (ftruncate (q->fd, (off_t) target) < 0)
    return -errno;
  q->file_end = target;
  return 0;
}

int
space_reserve_end (struct qcow2 *q, uint64_t new_alloc_end)
{
  uint64_t need = new_alloc_end
    + (space_headroom (q, new_alloc_end) << q->cluster_bits);
  int r;

  if (need <= q->file_end)
    return 0;
  if (q->exact_grows == 0) {
    uint64_t step = q->alloc_end / 8, target;
    if (step < GROW_STEP_MIN)
      step = GROW_STEP_MIN;
    target = round_up (q->alloc_end + step, q->cluster_size);
    if (target < need)
      target = round_up (need, q->cluster_size);
    if (grow_file (q, target) == 0)
      return 0;
    q->exact_grows = EXACT_GROWS;
  }
  q->exact_grows--;
  r = grow_file (q, round_up (need, q->cluster_size));
  if (r < 0)
    qlog (q, LOG_DEBUG, "%s: reserving %llu bytes at 0x%llx: %s", q->path,
          (unsigned long long) (need - q->file_end),
          (unsigned long long) q->file_end, strerror (-r));
  return r;
}

int
space_reserve_range (struct qcow2 *q, uint64_t offset, uint64_t len)
{
  if (q->no_fallocate)
    return 0;
  if (fallocate (q->fd, 0, (off_t) offset, (off_t) len) == 0)
    return 0;
  if (errno == EOPNOTSUPP)
    return 0;                   /* grow_file will say so */
  return -errno;
}

void
space_consume (struct qcow2 *q, uint64_t count)
{
  q->alloc_end += count << q->cluster_bits;
  /* The flusher's metadata comes out of the headroom that every
   * allocation left (unless nothing can be reserved here).
   */
  assert (q->no_fallocate || q->alloc_end <= q->file_end);
}

void
space_block_created (struct qcow2 *q, uint64_t index)
{
  blocks_missing (q, index);
  assert (q->rb_missing > 0);
  q->rb_missing--;
}

void
space_open (struct qcow2 *q)
{
  /* Clusters below alloc_end are only ever handed out again from the free
   * list, and those had refcounts: their blocks exist.  (An image whose
   * refcounts claim a cluster far past its end must not make the first
   * write reserve blocks for the whole gap.)
   */
  q->rb_scanned = (q->alloc_end >> q->cluster_bits) >> q->rb_bits;
  q->rb_missing = 0;
  /* Tables written in place must have their space: a sparse copy of an
   * image may have holes there.  A failure only loses that guarantee.
   */
  uint64_t l1 = round_up ((uint64_t) q->l1_size * 8, SECTOR);
  uint64_t rt = (uint64_t) q->reftable_clusters << q->cluster_bits;
  if (q->no_fallocate)
    return;
  if ((l1 && fallocate (q->fd, FALLOC_FL_KEEP_SIZE, (off_t) q->l1_offset,
                        (off_t) l1) < 0 && errno != EOPNOTSUPP)
      || (rt && fallocate (q->fd, FALLOC_FL_KEEP_SIZE,
                           (off_t) q->reftable_offset, (off_t) rt) < 0
          && errno != EOPNOTSUPP))
    qlog (q, LOG_WARNING, "%s: reserving the space of the L1 and refcount "
          "tables: %s", q->path, strerror (errno));
}

int
space_trim (struct qcow2 *q)
{
  /* Only what was reserved past alloc_end goes: nothing there is
   * referenced.  (A raw image reserves nothing, so it is never cut.)
   */
  if (q->file_end > q->alloc_end
      && ftruncate (q->fd, (off_t) q->alloc_end) < 0)
    return -errno;
  if (q->file_end > q->alloc_end)
    q->file_end = q->alloc_end;
  return 0;
}
