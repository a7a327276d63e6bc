/* lib/qcow2-refs.c: every reference to every cluster of an image counted
 * (the header, the L1 tables of the image and of its snapshots, the L2
 * tables, data and compressed clusters, the snapshot table): what the
 * refcounts must say.  The refcount rebuild (qcow2-repair.c) and the
 * check (qcow2-check.c) both count with it.
 *
 * Strict (k->lenient false, the rebuild at open): the first reference
 * that cannot be right (outside the file, an unaligned table) stops the
 * count with a reason in k->err.  Lenient (check, repair by qnbd-img):
 * each is reported through k->report, counted in k->corruptions and left
 * out, and the count goes on.
 *
 * The work is bounded by the file: each L2 table is read once, however
 * many L1 tables name it, and nothing outside the file is read.
 */
#include <config.h>

#include <assert.h>
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2-internal.h"

/* One L1 entry: the L2 table it names and which L1 table it is in. */
struct l2ref {
  uint64_t offset;
  uint32_t walk;
};

void
refs_problem (struct refs *k, const char *fmt, ...)
{
  char msg[256];
  va_list ap;

  va_start (ap, fmt);
  vsnprintf (msg, sizeof msg, fmt, ap);
  va_end (ap);
  k->corruptions++;
  if (k->report)
    k->report (k->opaque, msg);
}

int
refs_mark (struct refs *k, uint64_t off, uint64_t len, uint32_t times,
           const char *what)
{
  uint64_t first, last;

  if (len == 0)
    return 0;
  if (!k->lenient) {
    char name[96];
    snprintf (name, sizeof name, "cannot repair refcounts: %s", what);
    if (header_in_file (name, off, len, k->file_size, k->err, k->errlen) < 0)
      return -EINVAL;
  }
  /* Lenient: as qemu-img check, a reference into the last, partial
   * cluster of the file counts; one a cluster or more past it does not.
   */
  else if (off > UINT64_MAX - len
           || off + len >= k->file_size + k->q->cluster_size) {
    refs_problem (k, "ERROR: counting reference for region exceeding the "
                  "end of the file by one cluster or more: offset 0x%"
                  PRIx64 " size 0x%" PRIx64, off, len);
    return 0;
  }
  first = off >> k->q->cluster_bits;
  last = (off + len - 1) >> k->q->cluster_bits;
  assert (last < k->n);
  for (uint64_t c = first; c <= last; c++)
    k->c[c] = k->c[c] > UINT32_MAX - times ? UINT32_MAX : k->c[c] + times;
  return 0;
}

/* Whether [off, off + len) was counted (lies inside what refs_mark
 * accepts).
 */
static bool
in_file (const struct refs *k, uint64_t off, uint64_t len)
{
  return off <= UINT64_MAX - len && off + len <= k->file_size;
}

/* Note the L2 tables an L1 table names; they are read later, once each. */
static int
walk_l1 (struct refs *k, const uint64_t *l1, uint32_t l1_size)
{
  struct qcow2 *q = k->q;
  uint64_t cs = q->cluster_size;

  k->walk++;
  for (uint32_t i = 0; i < l1_size; i++) {
    uint64_t l2off = be64toh (l1[i]) & L1E_OFFSET_MASK;
    if (!l2off)
      continue;
    if (l2off & (cs - 1)) {
      if (k->lenient) {
        refs_problem (k, "ERROR l2_offset=%" PRIx64 ": Table is not "
                      "cluster aligned; L1 entry corrupted", l2off);
        continue;
      }
      snprintf (k->err, k->errlen, "cannot repair refcounts: L2 table "
                "offset 0x%" PRIx64 " is unaligned", l2off);
      return -EINVAL;
    }
    if (refs_mark (k, l2off, cs, 1, "L2 table") < 0)
      return -EINVAL;
    /* Lenient: a table outside the file holds nothing to count. */
    if (!in_file (k, l2off, cs))
      continue;
    if (k->nl2 == k->capl2) {
      size_t cap = k->capl2 ? k->capl2 * 2 : 1024;
      struct l2ref *v = realloc (k->l2, cap * sizeof *v);
      if (!v)
        return -ENOMEM;
      k->l2 = v;
      k->capl2 = cap;
    }
    k->l2[k->nl2++] = (struct l2ref) { l2off, k->walk };
  }
  return 0;
}

static int
cmp_l2ref (const void *a, const void *b)
{
  const struct l2ref *x = a, *y = b;
  if (x->offset != y->offset)
    return x->offset < y->offset ? -1 : 1;
  return x->walk < y->walk ? -1 : x->walk > y->walk;
}

/* Lenient: what an entry says that cannot be right.  true when its
 * cluster is still to be counted.
 */
static bool
entry_sane (struct refs *k, uint64_t ent, uint64_t bitmap)
{
  struct qcow2 *q = k->q;
  uint64_t off = ent & L2E_OFFSET_MASK;

  if (ent & L2E_COMPRESSED) {
    if (bitmap)
      refs_problem (k, "ERROR compressed cluster with non-zero subcluster "
                    "allocation bitmap, entry=0x%" PRIx64, ent);
    if (ent & L2E_COPIED)
      refs_problem (k, "ERROR: coffset=0x%" PRIx64 ": copied flag must "
                    "never be set for compressed clusters",
                    (uint64_t) (ent & ~(L2E_COPIED | L2E_COMPRESSED)));
    return true;
  }
  /* In an external data file, offset 0 is guest cluster 0's. */
  if (!off && !(q->data_file && (ent & L2E_COPIED))) {
    if (bitmap & SC_ALLOC_ALL)
      refs_problem (k, "ERROR: Unallocated cluster has non-zero "
                    "subcluster allocation map");
    return false;
  }
  if ((bitmap >> 32) & bitmap)
    refs_problem (k, "ERROR offset=%" PRIx64 ": Allocated cluster has "
                  "corrupted subcluster allocation bitmap", off);
  if (off & (q->cluster_size - 1)) {
    bool data = q->extl2 ? (bitmap & SC_ALLOC_ALL) != 0
      : !(ent & L2E_ZERO);
    refs_problem (k, data ? "ERROR offset=%" PRIx64 ": Data cluster is not "
                  "properly aligned; L2 entry corrupted."
                  : "ERROR offset=%" PRIx64 ": Preallocated cluster is not "
                  "properly aligned; L2 entry corrupted.", off);
  }
  return true;
}

/* Count what one L2 table reaches, times times. */
static int
count_l2_table (struct refs *k, const void *l2buf, uint32_t times)
{
  struct qcow2 *q = k->q;
  uint32_t per = q->cluster_size >> (q->extl2 ? 4 : 3);
  const uint64_t *t = l2buf;
  int r = 0;

  for (uint32_t e = 0; r == 0 && e < per; e++) {
    uint64_t ent = be64toh (t[(size_t) e << (q->extl2 ? 1 : 0)]);
    uint64_t bitmap = q->extl2 ? be64toh (t[2 * (size_t) e + 1]) : 0;
    if (k->lenient && !entry_sane (k, ent, bitmap))
      continue;
    if (ent & L2E_COMPRESSED) {
      uint64_t coff, csize;
      compressed_extent (q, ent, &coff, &csize);
      r = refs_mark (k, coff & ~(uint64_t) (SECTOR - 1),
                     csize + (coff & (SECTOR - 1)), times,
                     "compressed cluster");
    }
    else if ((ent & L2E_OFFSET_MASK) && !q->data_file)
      r = refs_mark (k, ent & L2E_OFFSET_MASK, q->cluster_size, times,
                     "data cluster");
  }
  return r;
}

/* Count what the L2 tables reach.  A table shared by n L1 tables (internal
 * snapshots) gives its clusters n references, but is read once: a small
 * file cannot make the count read much more than itself.  One L1 table
 * naming a table twice is corrupt (QEMU never shares a table that way).
 */
static int
count_l2_tables (struct refs *k, void *l2buf)
{
  struct qcow2 *q = k->q;
  uint64_t cs = q->cluster_size;
  int r = 0;

  if (k->nl2 == 0)
    return 0;
  qsort (k->l2, k->nl2, sizeof *k->l2, cmp_l2ref);
  for (size_t i = 0, j; r == 0 && i < k->nl2; i = j) {
    uint64_t l2off = k->l2[i].offset;
    for (j = i + 1; j < k->nl2 && k->l2[j].offset == l2off; j++)
      if (k->l2[j].walk == k->l2[j - 1].walk && !k->lenient) {
        snprintf (k->err, k->errlen, "cannot repair refcounts: L2 table at "
                  "0x%" PRIx64 " is used twice by one L1 table", l2off);
        return -EINVAL;
      }
    r = blocking_pread (q->fd, l2buf, cs, l2off, true);
    if (r < 0) {
      snprintf (k->err, k->errlen, "reading L2 table at 0x%" PRIx64 ": %s",
                l2off, strerror (-r));
      return r;
    }
    r = count_l2_table (k, l2buf, (uint32_t) (j - i));
    if (k->progress)
      k->progress (k->opaque, j, k->nl2);
  }
  return r;
}

/* The snapshots' L1 tables, and the tables they name. */
static int
count_snapshots (struct refs *k)
{
  struct qcow2 *q = k->q;
  struct snapshot *s = NULL;
  unsigned ns = 0;
  int r = snapshot_table_read (q, &s, &ns, k->err, k->errlen);

  if (r == 0 && ns)
    r = refs_mark (k, q->snapshots_offset, q->snapshots_bytes, 1,
                   "snapshot table");
  /* snapshot_table_read made sure these tables fit in the file together. */
  for (unsigned i = 0; r == 0 && i < ns; i++) {
    size_t bytes = (size_t) s[i].l1_size * 8;
    uint64_t *l1 = malloc (bytes ? bytes : 1);
    if (!l1) {
      r = -ENOMEM;
      break;
    }
    r = refs_mark (k, s[i].l1_offset, bytes, 1, "snapshot L1 table");
    if (r == 0 && bytes)
      r = blocking_pread (q->fd, l1, bytes, s[i].l1_offset, false);
    if (r == 0)
      r = walk_l1 (k, l1, s[i].l1_size);
    free (l1);
  }
  snapshot_table_free (s, ns);
  return r;
}

int
refs_count (struct refs *k)
{
  struct qcow2 *q = k->q;
  void *l2buf = malloc (q->cluster_size);
  int r;

  if (!l2buf)
    return -ENOMEM;
  k->walk = 0;
  k->nl2 = 0;
  /* The header cluster holds the extensions and the backing file's name
   * too: one reference for all of them (as QEMU counts).
   */
  r = refs_mark (k, 0, q->cluster_size, 1, "header");
  if (r == 0)
    r = refs_mark (k, q->l1_offset, (uint64_t) q->l1_size * 8, 1,
                   "L1 table");
  if (r == 0)
    r = walk_l1 (k, q->l1, q->l1_size);
  if (r == 0)
    r = count_snapshots (k);
  if (r == 0)
    r = count_l2_tables (k, l2buf);
  free (k->l2);
  k->l2 = NULL;
  k->nl2 = k->capl2 = 0;
  free (l2buf);
  return r;
}
