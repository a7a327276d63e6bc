/* lib/qcow2-check.c: qnbd-img check: the references of an image
 * (qcow2-refs.c) against its refcounts, reported as qemu-img check does
 * (leaks, corruptions, the image end offset, allocation figures), and
 * repaired on request: leaks freed in place (-r leaks), or the whole
 * refcount structure rebuilt past the end of the file (qcow2-repair.c)
 * and the COPIED flags set by the new refcounts (-r all).
 *
 * A pass reads the refcounts of the clusters of the file, counts every
 * reference (leniently: a reference that cannot be right is reported and
 * left out), adds the refcount structures' own, compares, and walks the
 * active L1 table again for the COPIED flags and the allocation figures.
 * A repair is followed by a pass that only reports, as qemu-img's double
 * check.  What a pass holds is bounded by the file's size.
 */
#include <config.h>

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "qcow2-internal.h"

/* Refcount blocks read for clusters past the end of the file, per pass. */
#define MAX_BLOCK_READS 4096

struct check {
  struct qcow2 *q;              /* header fields, fd, L1 and refcount table */
  const struct qcow2_check_opts *o;
  struct qcow2_check_result *res;
  uint64_t file_size;
  uint64_t n;                   /* clusters compared: the file's and one */
  uint64_t *rc;                 /* refcounts on disk of those clusters */
  struct refs k;                /* references to them */
  bool rebuild;                 /* the refcount structure itself is wrong */
  void *blk;                    /* one refcount block, for rc_get */
  uint64_t blk_off;
  unsigned blk_reads;           /* rc_get's reads in this pass */
  char *err;
  size_t errlen;
};

static void
say (struct check *c, const char *fmt, ...)
  __attribute__ ((format (printf, 2, 3)));

static void
say (struct check *c, const char *fmt, ...)
{
  char msg[256];
  va_list ap;

  if (!c->o->message)
    return;
  va_start (ap, fmt);
  vsnprintf (msg, sizeof msg, fmt, ap);
  va_end (ap);
  c->o->message (c->o->opaque, msg);
}

static void
report (void *opaque, const char *msg)
{
  struct check *c = opaque;
  say (c, "%s", msg);
}

static void
progress (void *opaque, uint64_t done, uint64_t total)
{
  struct check *c = opaque;
  if (c->o->progress)
    c->o->progress (c->o->opaque, done, total);
}

static int
fail (struct check *c, int r, const char *fmt, ...)
  __attribute__ ((format (printf, 3, 4)));

static int
fail (struct check *c, int r, const char *fmt, ...)
{
  va_list ap;
  va_start (ap, fmt);
  vsnprintf (c->err, c->errlen, fmt, ap);
  va_end (ap);
  return r;
}

/* The refcount block a refcount table entry names, when it can be read:
 * 0 otherwise (check_refblocks says why).
 */
static uint64_t
refblock_at (const struct check *c, uint64_t index)
{
  uint64_t e, off;

  if (index >= c->q->reftable_entries)
    return 0;
  e = be64toh (c->q->reftable[index]);
  off = e & REFT_OFFSET_MASK;
  if ((e & ~REFT_OFFSET_MASK) || (off & (c->q->cluster_size - 1))
      || off >= c->file_size)
    return 0;
  return off;
}

/* The refcount on disk of any cluster, inside the file or past it. */
static int
rc_get (struct check *c, uint64_t cluster, uint64_t *out)
{
  struct qcow2 *q = c->q;
  uint64_t off;
  int r;

  if (cluster < c->n) {
    *out = c->rc[cluster];
    return 0;
  }
  *out = 0;
  off = refblock_at (c, cluster >> q->rb_bits);
  if (!off)
    return 0;
  if (off != c->blk_off) {
    /* References past the end that flip between refcount blocks would
     * read a block each: a small file must not make the check read
     * terabytes.
     */
    if (++c->blk_reads > MAX_BLOCK_READS)
      return fail (c, -EFBIG, "too many references past the end of the "
                   "file, in too many refcount blocks");
    c->blk_off = 0;
    r = blocking_pread (q->fd, c->blk, q->cluster_size, off, true);
    if (r < 0)
      return fail (c, r, "reading the refcount block at 0x%" PRIx64 ": %s",
                   off, strerror (-r));
    c->blk_off = off;
  }
  *out = refblock_get (q, c->blk, cluster & (((uint64_t) 1 << q->rb_bits)
                                             - 1));
  return 0;
}

/* The refcounts of the clusters compared, into c->rc. */
static int
read_refcounts (struct check *c)
{
  struct qcow2 *q = c->q;
  uint64_t per = (uint64_t) 1 << q->rb_bits;
  uint64_t nb = (c->n + per - 1) / per;
  int r;

  if (nb > q->reftable_entries)
    nb = q->reftable_entries;
  for (uint64_t i = 0; i < nb; i++) {
    uint64_t off = refblock_at (c, i);
    if (!off)
      continue;
    r = blocking_pread (q->fd, c->blk, q->cluster_size, off, true);
    if (r < 0)
      return fail (c, r, "reading the refcount block at 0x%" PRIx64 ": %s",
                   off, strerror (-r));
    c->blk_off = off;
    for (uint64_t j = 0; j < per && i * per + j < c->n; j++)
      c->rc[i * per + j] = refblock_get (q, c->blk, j);
    progress (c, i + 1, nb);
  }
  return 0;
}

/* The refcount table and blocks: their own references, and whether the
 * table names what a refcount block can be.
 */
static int
check_refblocks (struct check *c)
{
  struct qcow2 *q = c->q;
  struct refs *k = &c->k;
  uint64_t cs = q->cluster_size;
  uint64_t file_clusters = round_up (c->file_size, cs) / cs;
  int r = refs_mark (k, q->reftable_offset,
                     (uint64_t) q->reftable_clusters * cs, 1,
                     "refcount table");

  for (uint64_t i = 0; r == 0 && i < q->reftable_entries; i++) {
    uint64_t e = be64toh (q->reftable[i]), off = e & REFT_OFFSET_MASK;
    if (!e)
      continue;
    if (e & ~REFT_OFFSET_MASK)
      refs_problem (k, "ERROR refcount table entry %" PRIu64 " has reserved "
                    "bits set", i);
    else if (off & (cs - 1))
      refs_problem (k, "ERROR refcount block %" PRIu64 " is not cluster "
                    "aligned; refcount table entry corrupted", i);
    else if (off / cs >= file_clusters)
      refs_problem (k, "ERROR refcount block %" PRIu64 " is outside image",
                    i);
    else {
      r = refs_mark (k, off, cs, 1, "refcount block");
      if (r < 0 || k->c[off / cs] == 1)
        continue;
      refs_problem (k, "ERROR refcount block %" PRIu64 " refcount=%"
                    PRIu32, i, k->c[off / cs]);
    }
    c->rebuild = true;
  }
  return r;
}

/* Refcounts against references: leaks, corruptions, the end in use. */
static void
compare (struct check *c)
{
  uint64_t highest = 0;
  bool any = false;

  for (uint64_t i = 0; i < c->n; i++) {
    uint64_t r1 = c->rc[i], r2 = c->k.c[i];
    if (r1 || r2) {
      highest = i;
      any = true;
    }
    if (r1 == r2)
      continue;
    /* Raising a refcount from 0 may need a refcount block: a rebuild. */
    if (r1 == 0)
      c->rebuild = true;
    if (r1 > r2)
      c->res->leaks++;
    else
      c->res->corruptions++;
    say (c, "%s cluster %" PRIu64 " refcount=%" PRIu64 " reference=%" PRIu64,
         r1 > r2 ? "Leaked" : "ERROR", i, r1, r2);
  }
  c->res->image_end_offset = any ? (highest + 1) * c->q->cluster_size : 0;
}

/* Whether the COPIED flag of an entry (an L2 table's in L1, a data
 * cluster's in L2) says what the refcount of its cluster says: 1, nobody
 * else uses it.  Data clusters of an external data file have none.
 */
static int
copied_wrong (struct check *c, uint64_t ent, uint64_t cluster, bool data,
              bool *wrong, uint64_t *rc)
{
  int r = 0;

  *rc = 1;
  if (!data || !c->q->data_file)
    r = rc_get (c, cluster, rc);
  *wrong = r == 0 && (*rc == 1) != ((ent & L2E_COPIED) != 0);
  return r;
}

/* A wrong COPIED flag: reported, and with fix set right in *ent. */
static void
copied_fix (struct check *c, uint64_t *ent, bool fix, const char *what,
            uint32_t l1_index, uint64_t rc)
{
  char where[48] = "";

  if (l1_index != UINT32_MAX)
    snprintf (where, sizeof where, "l1_index=%" PRIu32 " ", l1_index);
  say (c, "%s OFLAG_COPIED %s: %s%s=%" PRIx64 " refcount=%" PRIu64,
       fix ? "Repairing" : "ERROR", what, where,
       l1_index != UINT32_MAX ? "l1_entry" : "l2_entry", *ent, rc);
  if (fix) {
    *ent ^= L2E_COPIED;
    c->res->corruptions_fixed++;
  }
  else
    c->res->corruptions++;
}

/* The figures of one active L2 table (qemu-img's allocated, fragmented,
 * compressed clusters) and its COPIED flags; *changed when fix changed
 * an entry.
 */
static int
walk_active_l2 (struct check *c, uint64_t *t, bool fix, bool *changed)
{
  struct qcow2 *q = c->q;
  uint32_t per = q->cluster_size >> (q->extl2 ? 4 : 3);
  struct qcow2_check_result *res = c->res;
  uint64_t next = 0;
  int r = 0;

  for (uint32_t e = 0; r == 0 && e < per; e++) {
    uint64_t *p = &t[(size_t) e << (q->extl2 ? 1 : 0)];
    uint64_t ent = be64toh (*p), off = ent & L2E_OFFSET_MASK, rc;
    bool wrong;
    if (ent & L2E_COMPRESSED) {
      /* Compressed clusters share sectors: fragmented by nature. */
      res->allocated_clusters++;
      res->compressed_clusters++;
      res->fragmented_clusters++;
      continue;
    }
    /* In an external data file, offset 0 is guest cluster 0's. */
    if (!off && !(q->data_file && (ent & L2E_COPIED)))
      continue;
    res->allocated_clusters++;
    if (next && off != next)
      res->fragmented_clusters++;
    next = off + q->cluster_size;
    r = copied_wrong (c, ent, off >> q->cluster_bits, true, &wrong, &rc);
    if (r == 0 && wrong) {
      copied_fix (c, &ent, fix, "data cluster", UINT32_MAX, rc);
      *p = htobe64 (ent);
      *changed |= fix;
    }
  }
  return r;
}

static int
cmp_u64 (const void *a, const void *b)
{
  uint64_t x = *(const uint64_t *) a, y = *(const uint64_t *) b;
  return x < y ? -1 : x > y;
}

/* The COPIED flags of the active L1 entries; with fix set right on disk.
 * The tables they name, in the file, each once, into *tables (sorted).
 */
static int
check_l1_entries (struct check *c, bool fix, uint64_t *tables, size_t *nt,
                  bool *wrote)
{
  struct qcow2 *q = c->q;
  uint64_t cs = q->cluster_size;
  int r = 0;

  *nt = 0;
  for (uint32_t i = 0; r == 0 && i < q->l1_size; i++) {
    uint64_t ent = be64toh (q->l1[i]), l2off = ent & L1E_OFFSET_MASK, rc;
    bool wrong;
    if (!l2off || (l2off & (cs - 1)))
      continue;
    r = copied_wrong (c, ent, l2off / cs, false, &wrong, &rc);
    if (r == 0 && wrong) {
      copied_fix (c, &ent, fix, "L2 cluster", i, rc);
      q->l1[i] = htobe64 (ent);
      if (fix) {
        r = blocking_pwrite (q->fd, &q->l1[i], 8, q->l1_offset + 8 * i);
        *wrote = true;
      }
    }
    /* A table outside the file was reported by the count. */
    if (c->file_size >= cs && l2off <= c->file_size - cs)
      tables[(*nt)++] = l2off;
  }
  qsort (tables, *nt, sizeof *tables, cmp_u64);
  size_t j = 0;
  for (size_t i = 0; i < *nt; i++)
    if (j == 0 || tables[i] != tables[j - 1])
      tables[j++] = tables[i];
  *nt = j;
  return r;
}

/* The active L1 table again: COPIED flags of L1 and L2 entries, and the
 * allocation figures.  With fix, wrong flags are set right on disk.  A
 * table named twice is read once: the reads are bounded by the file.
 */
static int
check_active (struct check *c, bool fix)
{
  struct qcow2 *q = c->q;
  uint64_t cs = q->cluster_size;
  uint64_t *t = malloc (cs);
  uint64_t *tables = malloc (((size_t) q->l1_size + 1) * sizeof *tables);
  bool wrote = false;
  size_t nt = 0;
  int r = 0;

  if (!t || !tables) {
    free (t);
    free (tables);
    return fail (c, -ENOMEM, "out of memory");
  }
  r = check_l1_entries (c, fix, tables, &nt, &wrote);
  for (size_t i = 0; r == 0 && i < nt; i++) {
    bool changed = false;
    r = blocking_pread (q->fd, t, cs, tables[i], true);
    if (r == 0)
      r = walk_active_l2 (c, t, fix, &changed);
    if (r == 0 && changed) {
      r = blocking_pwrite (q->fd, t, cs, tables[i]);
      wrote = true;
    }
    progress (c, i + 1, nt);
  }
  if (r == 0 && wrote && fdatasync (q->fd) < 0)
    r = -errno;
  if (r < 0 && !c->err[0])
    fail (c, r, "%s the tables: %s", wrote ? "writing" : "reading",
          strerror (-r));
  free (t);
  free (tables);
  return r;
}

/* One pass over the image: res filled (but for what was fixed, which the
 * caller keeps); with fix_copied, wrong COPIED flags are set right.  On
 * return c->rc and c->k.c stay for a repair of leaks.
 */
static int
run_pass (struct check *c, bool fix_copied)
{
  struct qcow2 *q = c->q;
  struct qcow2_check_result *res = c->res;
  uint64_t cs = q->cluster_size;
  struct stat st;
  int r;

  res->corruptions = res->leaks = res->check_errors = 0;
  res->allocated_clusters = res->fragmented_clusters = 0;
  res->compressed_clusters = 0;
  res->total_clusters = (q->size + cs - 1) / cs;
  if (fstat (q->fd, &st) < 0)
    return fail (c, -errno, "%s", strerror (errno));
  c->file_size = q->file_end = (uint64_t) st.st_size;
  /* The file's clusters and one past them (a lenient count reaches
   * into it).
   */
  c->n = round_up (c->file_size, cs) / cs + 1;
  free (c->rc);
  free (c->k.c);
  c->rc = calloc (c->n, sizeof *c->rc);
  c->k = (struct refs) { .q = q, .n = c->n, .file_size = c->file_size,
                         .lenient = true, .report = report,
                         .progress = progress, .opaque = c, .err = c->err,
                         .errlen = c->errlen };
  c->k.c = calloc (c->n, sizeof *c->k.c);
  c->blk_off = 0;
  c->blk_reads = 0;
  c->rebuild = false;
  if (!c->rc || !c->k.c)
    return fail (c, -ENOMEM, "out of memory for %" PRIu64 " clusters",
                 c->n);
  r = read_refcounts (c);
  if (r == 0)
    r = refs_count (&c->k);
  if (r == 0)
    r = check_refblocks (c);
  if (r < 0)
    return r;
  res->corruptions += c->k.corruptions;
  compare (c);
  return check_active (c, fix_copied);
}

/* -r leaks: each refcount above its references lowered to them, in the
 * refcount blocks where it is.  Not when the blocks themselves are wrong,
 * or a referenced cluster has none: that needs -r all (as qemu-img).
 */
static int
fix_leaks (struct check *c)
{
  struct qcow2 *q = c->q;
  uint64_t per = (uint64_t) 1 << q->rb_bits;
  int r = 0;

  if (c->rebuild) {
    say (c, "ERROR need to rebuild refcount structures");
    return fail (c, -EIO, "the refcount structure must be rebuilt: use "
                 "-r all");
  }
  for (uint64_t i = 0; r == 0 && i * per < c->n; i++) {
    uint64_t off = refblock_at (c, i);
    bool changed = false;
    if (!off)
      continue;
    r = blocking_pread (q->fd, c->blk, q->cluster_size, off, true);
    for (uint64_t j = 0; r == 0 && j < per && i * per + j < c->n; j++) {
      uint64_t cl = i * per + j;
      if (c->rc[cl] <= c->k.c[cl])
        continue;
      say (c, "Repairing cluster %" PRIu64 " refcount=%" PRIu64
           " reference=%" PRIu32, cl, c->rc[cl], c->k.c[cl]);
      refblock_set (q, c->blk, j, c->k.c[cl]);
      c->res->leaks_fixed++;
      changed = true;
    }
    if (r == 0 && changed)
      r = blocking_pwrite (q->fd, c->blk, q->cluster_size, off);
  }
  c->blk_off = 0;
  if (r == 0 && fdatasync (q->fd) < 0)
    r = -errno;
  if (r < 0)
    fail (c, r, "writing the refcounts: %s", strerror (-r));
  return r;
}

/* -r all: the refcount structure rebuilt from the references (past the
 * end of the file), then the COPIED flags set by it.  References that
 * cannot be right (outside the file, unaligned) stay: nothing says where
 * their data is.
 */
static int
fix_all (struct check *c)
{
  struct qcow2 *q = c->q;
  uint64_t leaks = c->res->leaks, corruptions = c->res->corruptions;
  int r;

  say (c, "Rebuilding refcount structure");
  q->file_end = c->file_size;
  r = repair_refcounts (q, true, c->err, c->errlen);
  if (r < 0)
    return r;
  c->res->rebuilt = true;
  r = run_pass (c, true);
  if (r < 0)
    return r;
  /* What the rebuild itself set right (the COPIED flags were counted as
   * they were fixed).
   */
  c->res->leaks_fixed += leaks > c->res->leaks ? leaks - c->res->leaks : 0;
  if (corruptions > c->res->corruptions)
    c->res->corruptions_fixed += corruptions - c->res->corruptions;
  return 0;
}

/* After a repair that leaves nothing wrong, the header says so: not
 * corrupt, not dirty (the refcounts are right).
 */
static int
mark_clean (struct check *c)
{
  struct qcow2 *q = c->q;
  uint64_t bits = INCOMPAT_CORRUPT | INCOMPAT_DIRTY;
  int r;

  if (q->version < 3 || !(q->incompat & bits))
    return 0;
  q->incompat &= ~bits;
  put_be64 ((uint8_t *) q->header_sector + HDR_INCOMPAT, q->incompat);
  r = header_write_sync (q);
  if (r < 0)
    fail (c, r, "writing the header: %s", strerror (-r));
  return r;
}

static int
repair (struct check *c)
{
  struct qcow2_check_result *res = c->res;
  int r = 0;

  if (c->o->fix == QCOW2_CHECK_NO_FIX || (!res->leaks && !res->corruptions))
    return 0;
  if (c->o->fix == QCOW2_CHECK_FIX_ALL)
    r = fix_all (c);
  else
    r = fix_leaks (c);
  if (r < 0)
    return r;
  /* qemu-img's double check: what the result says is what is there. */
  r = run_pass (c, false);
  if (r == 0 && !res->corruptions && !res->check_errors)
    r = mark_clean (c);
  return r;
}

/* Open and lock path, and read its header, L1 and refcount tables into
 * c->q (the fields that the count and the rebuild use).
 */
static int
open_image (struct check *c, const char *path)
{
  bool fix = c->o->fix != QCOW2_CHECK_NO_FIX;
  struct qcow2 *q = c->q;
  uint64_t cs, l1_bytes;
  struct stat st;
  void *hdr;
  int r;

  q->fd = q->dfd = open (path, (fix ? O_RDWR : O_RDONLY) | O_CLOEXEC);
  if (q->fd < 0 || fstat (q->fd, &st) < 0)
    return fail (c, -errno, "%s", strerror (errno));
  if (!S_ISREG (st.st_mode))
    return fail (c, -EINVAL, "not a regular file");
  /* Before reading anything: a writer elsewhere may be changing it. */
  r = lock_image (q, q->fd, fix ? IMAGE_LOCK_WRITE : c->o->force_share
                  ? IMAGE_LOCK_SHARE_ALL : IMAGE_LOCK_READ, "image", c->err,
                  c->errlen);
  if (r < 0)
    return r;
  q->header_sector = buffer_alloc_zero (SECTOR);
  if (!q->header_sector)
    return fail (c, -ENOMEM, "out of memory");
  r = blocking_pread (q->fd, q->header_sector, SECTOR, 0, true);
  if (r < 0)
    return fail (c, r, "reading the header: %s", strerror (-r));
  if (st.st_size < 4 || get_be32 (q->header_sector) != QCOW2_MAGIC)
    return fail (c, -EMEDIUMTYPE, "not a qcow2 image");
  cs = get_be32 ((uint8_t *) q->header_sector + HDR_CLUSTER_BITS);
  cs = cs >= QCOW2_MIN_CLUSTER_BITS && cs <= QCOW2_MAX_CLUSTER_BITS
    ? (uint64_t) 1 << cs : SECTOR;
  hdr = buffer_alloc_zero (cs);
  if (!hdr)
    return fail (c, -ENOMEM, "out of memory");
  r = blocking_pread (q->fd, hdr, cs, 0, true);
  /* An image marked corrupt is checked like any other. */
  q->read_only = true;
  if (r == 0)
    r = header_parse (q, hdr, cs < (uint64_t) st.st_size ? cs
                      : (uint64_t) st.st_size, (uint64_t) st.st_size,
                      c->err, c->errlen);
  else
    fail (c, r, "reading the header: %s", strerror (-r));
  free (hdr);
  if (r < 0)
    return r;
  q->read_only = !fix;

  l1_bytes = (uint64_t) q->l1_size * 8;
  q->l1_buf_bytes = round_up (l1_bytes ? l1_bytes : 1, SECTOR);
  q->l1 = buffer_alloc_zero (q->l1_buf_bytes);
  q->reftable_entries = ((uint64_t) q->reftable_clusters << q->cluster_bits)
    / 8;
  q->reftable = buffer_alloc_zero ((size_t) q->reftable_clusters
                                   << q->cluster_bits);
  c->blk = buffer_alloc_zero (q->cluster_size);
  if (!q->l1 || !q->reftable || !c->blk)
    return fail (c, -ENOMEM, "out of memory for the tables");
  /* header_parse made sure both lie inside the file. */
  r = blocking_pread (q->fd, q->l1, l1_bytes, q->l1_offset, true);
  if (r == 0)
    r = blocking_pread (q->fd, q->reftable, q->reftable_entries * 8,
                        q->reftable_offset, true);
  if (r < 0)
    return fail (c, r, "reading the tables: %s", strerror (-r));
  return 0;
}

int
qcow2_check (const char *path, const struct qcow2_check_opts *opts,
             struct qcow2_check_result *res, char *err, size_t errlen)
{
  struct check c = { .o = opts, .res = res, .err = err, .errlen = errlen };
  int r;

  memset (res, 0, sizeof *res);
  err[0] = '\0';
  c.q = calloc (1, sizeof *c.q);
  if (!c.q)
    return fail (&c, -ENOMEM, "out of memory");
  c.q->fd = c.q->dfd = -1;
  c.q->path = (char *) path;
  r = open_image (&c, path);
  if (r == 0)
    r = run_pass (&c, false);
  if (r == 0)
    r = repair (&c);
  if (c.q->fd >= 0)
    close (c.q->fd);
  free (c.q->data_file);
  free (c.q->l1);
  free (c.q->reftable);
  free (c.q->header_sector);
  free (c.q);
  free (c.rc);
  free (c.k.c);
  free (c.blk);
  return r;
}
