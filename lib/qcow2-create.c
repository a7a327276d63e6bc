/* lib/qcow2-create.c: a new qcow2 image, laid out whole at once
 * (qnbd-img create).
 *
 * The file, in clusters: the header, the refcount table, the refcount
 * blocks, the L1 table; with preallocation then every L2 table and after
 * them every data cluster in guest order.  Each of those clusters is used
 * once, so the refcount blocks are all ones up to the end of the file: a
 * full block is built once and copied.  Metadata goes out in writes of up
 * to CHUNK bytes, not one call per entry, so that a 1 TiB image and its
 * 128 MiB of L2 tables takes seconds; the data clusters are never written
 * (the file is extended with ftruncate) unless preallocation=full asks
 * for zeros.  With an external data file the data clusters live there at
 * their guest offsets and have no refcounts.
 */
#include <config.h>

#include <assert.h>
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

#define CHUNK (8u << 20)
/* fallocate of the data, a step at a time (for progress). */
#define FALLOC_STEP ((uint64_t) 1 << 30)

struct create {
  const struct qcow2_create_opts *o;
  struct qcow2 *q;              /* the header's fields; lock_image and
                                   refblock_set take an image */
  uint64_t cs;
  uint64_t l2_entries;          /* per table */
  uint64_t l1_clusters;
  uint64_t n_guest;             /* guest clusters mapped by preallocation */
  uint64_t n_data;              /* ... of them in the image file */
  uint64_t rb_entries;          /* refcounts per block */
  uint64_t n_rb;
  uint64_t rb_off, l2_off, data_off, end;
  void *full_rb;                /* a refcount block of ones */
  char *err;
  size_t errlen;
};

static int
fail (struct create *c, int ret, const char *fmt, ...)
  __attribute__ ((format (printf, 3, 4)));

static int
fail (struct create *c, int ret, const char *fmt, ...)
{
  va_list ap;
  va_start (ap, fmt);
  vsnprintf (c->err, c->errlen, fmt, ap);
  va_end (ap);
  return ret;
}

static bool
is_pow2 (uint64_t v)
{
  return v && !(v & (v - 1));
}

/* The virtual size of the backing file, which must exist and be of the
 * format named.
 */
static int
backing_size (struct create *c, const char *path, uint64_t *size)
{
  const struct qcow2_create_opts *o = c->o;
  char *name = info_beside (path, o->backing_file);
  uint8_t hdr[QCOW2_V2_HEADER_LEN];
  struct stat st;
  int fd, r = 0;

  if (!name)
    return fail (c, -ENOMEM, "out of memory");
  fd = open (name, O_RDONLY | O_CLOEXEC);
  if (fd < 0 || fstat (fd, &st) < 0)
    r = fail (c, -errno, "backing file %s: %s", name, strerror (errno));
  else if (!strcmp (o->backing_fmt, "raw"))
    *size = (uint64_t) st.st_size;
  else if (blocking_pread (fd, hdr, sizeof hdr, 0, true) < 0
           || get_be32 (hdr + HDR_MAGIC) != QCOW2_MAGIC)
    r = fail (c, -EINVAL, "backing file %s is not a qcow2 image", name);
  else
    *size = get_be64 (hdr + HDR_SIZE);
  if (fd >= 0)
    close (fd);
  free (name);
  return r;
}

/* What qcow2 and the engine allow together; defaults filled in. */
static int
check_opts (struct create *c, uint64_t size)
{
  const struct qcow2_create_opts *o = c->o;
  struct qcow2 *q = c->q;
  uint32_t cs = o->cluster_size ? o->cluster_size : 65536;
  unsigned rb = o->refcount_bits ? o->refcount_bits : 16;

  q->version = o->version ? o->version : 3;
  if (!is_pow2 (cs) || cs < 512 || cs > (2u << 20))
    return fail (c, -EINVAL, "cluster size %" PRIu32 " is not a power of two "
                 "from 512 to 2M", cs);
  if (!is_pow2 (rb) || rb > 64)
    return fail (c, -EINVAL, "refcount bits %u is not a power of two from "
                 "1 to 64", rb);
  if (q->version != 2 && q->version != 3)
    return fail (c, -EINVAL, "compat must be 0.10 or 1.1");
  if (q->version == 2 && (rb != 16 || o->lazy_refcounts || o->extended_l2
                          || o->compression_type || o->data_file))
    return fail (c, -EINVAL, "compat=0.10 has only 16 refcount bits and no "
                 "lazy refcounts, extended L2, compression type or data file");
  if (size % 512 || size > ((uint64_t) 1 << 62))
    return fail (c, -EINVAL, "size %" PRIu64 " is not a multiple of 512 "
                 "up to 4 EiB", size);
  if (o->extended_l2 && cs < 16384)
    return fail (c, -EINVAL, "extended L2 entries need clusters of at least "
                 "16K");
  if (o->compression_type > 1)
    return fail (c, -EINVAL, "compression type must be zlib or zstd");
  if (o->data_file_raw && (!o->data_file || o->backing_file))
    return fail (c, -EINVAL, "data_file_raw needs a data file and no backing "
                 "file");
  if (o->backing_file && (!o->backing_fmt || (strcmp (o->backing_fmt, "raw")
                                              && strcmp (o->backing_fmt,
                                                         "qcow2"))))
    return fail (c, -EINVAL, "a backing file needs its format: qcow2 or raw");
  /* Preallocated clusters would hide the backing file; with subclusters
   * they can stay unallocated (the backing file shows) yet be reserved.
   */
  if (o->backing_file && o->prealloc != QCOW2_PREALLOC_OFF && !o->extended_l2)
    return fail (c, -EINVAL, "preallocation with a backing file needs "
                 "extended_l2=on");

  q->cluster_bits = (uint32_t) __builtin_ctz (cs);
  q->refcount_order = (uint32_t) __builtin_ctz (rb);
  q->size = size;
  q->compat = o->lazy_refcounts ? COMPAT_LAZY_REFCOUNTS : 0;
  q->incompat = (o->data_file ? INCOMPAT_DATA_FILE : 0)
    | (o->compression_type ? INCOMPAT_COMPRESSION : 0)
    | (o->extended_l2 ? INCOMPAT_EXTL2 : 0);
  q->autoclear = o->data_file_raw ? AUTOCLEAR_DATA_FILE_RAW : 0;
  q->compression_type = (uint8_t) o->compression_type;
  q->data_file = (char *) o->data_file;
  if (o->backing_file)
    snprintf (q->backing_fmt, sizeof q->backing_fmt, "%s", o->backing_fmt);
  return 0;
}

/* Where everything goes.  The refcount blocks must count themselves and
 * the table that lists them: grow both until they cover the file.
 */
static int
plan (struct create *c)
{
  struct qcow2 *q = c->q;
  uint64_t l1_size, fixed, n_l2 = 0, reft = 1, nrb = 1;

  c->cs = (uint64_t) 1 << q->cluster_bits;
  c->l2_entries = c->cs / (c->o->extended_l2 ? 16 : 8);
  l1_size = (q->size + c->cs * c->l2_entries - 1) / (c->cs * c->l2_entries);
  if (l1_size * 8 > MAX_L1_BYTES)
    return fail (c, -EFBIG, "the disk needs an L1 table of %" PRIu64
                 " entries, over the %u that can be opened", l1_size,
                 MAX_L1_BYTES / 8);
  q->l1_size = (uint32_t) l1_size;
  /* An empty disk's L1 table takes no cluster (one would be a leak). */
  c->l1_clusters = (l1_size * 8 + c->cs - 1) / c->cs;
  if (c->o->prealloc != QCOW2_PREALLOC_OFF) {
    n_l2 = l1_size;
    c->n_guest = (q->size + c->cs - 1) / c->cs;
    c->n_data = c->o->data_file ? 0 : c->n_guest;
  }
  c->rb_entries = c->cs * 8 >> q->refcount_order;
  fixed = 1 + c->l1_clusters + n_l2 + c->n_data;
  for (;;) {
    uint64_t nrb2 = (fixed + reft + nrb + c->rb_entries - 1) / c->rb_entries;
    uint64_t reft2 = (nrb2 * 8 + c->cs - 1) / c->cs;
    if (nrb2 == nrb && reft2 == reft)
      break;
    nrb = nrb2;
    reft = reft2;
  }
  if (reft * c->cs > MAX_REFTABLE_BYTES)
    return fail (c, -EFBIG, "the refcount table would be over %u bytes",
                 MAX_REFTABLE_BYTES);
  c->n_rb = nrb;
  q->reftable_offset = c->cs;
  q->reftable_clusters = (uint32_t) reft;
  c->rb_off = (1 + reft) * c->cs;
  /* An empty L1 table is nowhere (as QEMU writes it). */
  q->l1_offset = l1_size ? c->rb_off + nrb * c->cs : 0;
  c->l2_off = c->rb_off + (nrb + c->l1_clusters) * c->cs;
  c->data_off = c->l2_off + n_l2 * c->cs;
  c->end = c->data_off + c->n_data * c->cs;
  assert (c->end / c->cs <= nrb * c->rb_entries);
  return 0;
}

static void fill_zeros (struct create *c, void *buf, uint64_t first,
                        uint64_t n);

/* Write count clusters from off, fill() making them CHUNK bytes at a
 * time; the data's zeros (fill_zeros) report their progress.
 */
static int
write_clusters (struct create *c, int fd, uint64_t off, uint64_t count,
                void (*fill) (struct create *, void *, uint64_t, uint64_t))
{
  uint64_t per = CHUNK / c->cs ? CHUNK / c->cs : 1;
  void *buf = malloc ((count < per ? count : per) * c->cs);
  int r = 0;

  if (!buf && count)
    return fail (c, -ENOMEM, "out of memory");
  for (uint64_t i = 0; i < count && r == 0; i += per) {
    uint64_t n = count - i < per ? count - i : per;
    fill (c, buf, i, n);
    r = blocking_pwrite (fd, buf, n * c->cs, off + i * c->cs);
    if (r < 0)
      fail (c, r, "cannot write: %s", strerror (-r));
    else if (fill == fill_zeros && c->o->progress)
      c->o->progress (c->o->progress_opaque, i + n, count);
  }
  free (buf);
  return r;
}

/* Refcount blocks [first, first + n): 1 for every cluster of the file. */
static void
fill_refblocks (struct create *c, void *buf, uint64_t first, uint64_t n)
{
  uint64_t used = c->end / c->cs;

  for (uint64_t i = first; i < first + n; i++) {
    void *b = (char *) buf + (i - first) * c->cs;
    uint64_t start = i * c->rb_entries;
    uint64_t ones = used > start ? used - start : 0;
    if (ones >= c->rb_entries) {
      memcpy (b, c->full_rb, c->cs);
      continue;
    }
    memset (b, 0, c->cs);
    for (uint64_t j = 0; j < ones; j++)
      refblock_set (c->q, b, j, 1);
  }
}

/* L2 tables [first, first + n): each guest cluster at its own data
 * cluster, in guest order.  With subclusters none is marked allocated:
 * they read as zeros (or the backing file) until written, and the first
 * write still needs no allocation.
 */
static void
fill_l2 (struct create *c, void *buf, uint64_t first, uint64_t n)
{
  uint64_t *e = buf, base = c->o->data_file ? 0 : c->data_off;
  unsigned words = c->o->extended_l2 ? 2 : 1;

  memset (buf, 0, n * c->cs);
  for (uint64_t t = first; t < first + n; t++)
    for (uint64_t j = 0; j < c->l2_entries; j++) {
      uint64_t g = t * c->l2_entries + j;
      if (g >= c->n_guest)
        return;
      e[((t - first) * c->l2_entries + j) * words]
        = htobe64 ((base + g * c->cs) | L2E_COPIED);
    }
}

/* The refcount table and the L1 table, each written whole. */
static int
write_tables (struct create *c, int fd)
{
  struct qcow2 *q = c->q;
  uint64_t reft_bytes = (uint64_t) q->reftable_clusters * c->cs;
  uint64_t l1_bytes = c->l1_clusters * c->cs;
  uint64_t *t = calloc (1, reft_bytes > l1_bytes ? reft_bytes : l1_bytes);
  uint64_t n_l2 = c->n_guest ? q->l1_size : 0;
  int r;

  if (!t)
    return fail (c, -ENOMEM, "out of memory");
  for (uint64_t i = 0; i < c->n_rb; i++)
    t[i] = htobe64 (c->rb_off + i * c->cs);
  r = blocking_pwrite (fd, t, reft_bytes, q->reftable_offset);
  if (r == 0) {
    memset (t, 0, l1_bytes);
    for (uint64_t i = 0; i < n_l2; i++)
      t[i] = htobe64 ((c->l2_off + i * c->cs) | L1E_COPIED);
    r = blocking_pwrite (fd, t, l1_bytes, q->l1_offset);
  }
  free (t);
  return r < 0 ? fail (c, r, "cannot write: %s", strerror (-r)) : 0;
}

static void
fill_zeros (struct create *c, void *buf, uint64_t first, uint64_t n)
{
  (void) first;
  memset (buf, 0, n * c->cs);
}

/* The data's space, len bytes at off of fd: reserved (falloc) or written
 * with zeros (full); metadata leaves it to the ftruncate before.
 */
static int
prealloc_data (struct create *c, int fd, uint64_t off, uint64_t len,
               const char *what)
{
  /* In steps, so that -p can show how far it got. */
  for (uint64_t done = 0; c->o->prealloc == QCOW2_PREALLOC_FALLOC
         && done < len; done += FALLOC_STEP) {
    uint64_t n = len - done < FALLOC_STEP ? len - done : FALLOC_STEP;
    if (fallocate (fd, 0, (off_t) (off + done), (off_t) n) < 0)
      return fail (c, -errno, "cannot reserve the %s's space: %s", what,
                   strerror (errno));
    if (c->o->progress)
      c->o->progress (c->o->progress_opaque, done + n, len);
  }
  if (c->o->prealloc == QCOW2_PREALLOC_FULL) {
    int r = write_clusters (c, fd, off, len / c->cs, fill_zeros);
    void *tail = r == 0 && len % c->cs ? calloc (1, len % c->cs) : NULL;
    if (r == 0 && len % c->cs && !tail)
      r = fail (c, -ENOMEM, "out of memory");
    else if (tail && (r = blocking_pwrite (fd, tail, len % c->cs,
                                           off + len / c->cs * c->cs)) < 0)
      fail (c, r, "cannot write: %s", strerror (-r));
    free (tail);
    return r;
  }
  return 0;
}

/* Everything of the image file after its header. */
static int
write_image (struct create *c, int fd)
{
  struct qcow2 *q = c->q;
  int r;

  c->full_rb = malloc (c->cs);
  if (!c->full_rb)
    return fail (c, -ENOMEM, "out of memory");
  for (uint64_t j = 0; j < c->rb_entries; j++)
    refblock_set (q, c->full_rb, j, 1);
  if (ftruncate (fd, (off_t) c->end) < 0)
    return fail (c, -errno, "cannot extend the image to %" PRIu64
                 " bytes: %s", c->end, strerror (errno));
  r = write_tables (c, fd);
  if (r == 0)
    r = write_clusters (c, fd, c->rb_off, c->n_rb, fill_refblocks);
  if (r == 0 && c->n_guest)
    r = write_clusters (c, fd, c->l2_off, q->l1_size, fill_l2);
  if (r == 0)
    r = prealloc_data (c, fd, c->data_off, c->n_data * c->cs, "image");
  return r;
}

/* Open path for writing, locked as QEMU would, and empty it. */
static int
open_locked (struct create *c, const char *path, const char *what, int *fd)
{
  int r;

  *fd = open (path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (*fd < 0)
    return fail (c, -errno, "cannot create %s %s: %s", what, path,
                 strerror (errno));
  r = lock_image (c->q, *fd, IMAGE_LOCK_WRITE, what, c->err, c->errlen);
  if (r == 0 && ftruncate (*fd, 0) < 0)
    r = fail (c, -errno, "cannot truncate %s %s: %s", what, path,
              strerror (errno));
  if (r < 0) {
    close (*fd);
    *fd = -1;
  }
  return r;
}

/* The external data file: as long as the disk, its clusters at their
 * guest offsets.
 */
static int
write_data_file (struct create *c, const char *path, int *dfd)
{
  char *name = info_beside (path, c->o->data_file);
  int r;

  if (!name)
    return fail (c, -ENOMEM, "out of memory");
  r = open_locked (c, name, "data file", dfd);
  if (r == 0 && ftruncate (*dfd, (off_t) c->q->size) < 0)
    r = fail (c, -errno, "cannot extend data file %s: %s", name,
              strerror (errno));
  if (r == 0 && c->n_guest)
    r = prealloc_data (c, *dfd, 0, c->q->size, "data file");
  if (r == 0 && fsync (*dfd) < 0)
    r = fail (c, -errno, "data file %s: %s", name, strerror (errno));
  if (r < 0 && *dfd >= 0)
    unlink (name);
  free (name);
  return r;
}

static int
create_files (struct create *c, const char *path)
{
  void *hdr = calloc (1, c->cs);
  int fd = -1, dfd = -1, r;

  if (!hdr)
    return fail (c, -ENOMEM, "out of memory");
  r = header_build (c->q, c->o->backing_file, hdr, c->cs, c->err, c->errlen);
  if (r == 0)
    r = open_locked (c, path, "image", &fd);
  if (r == 0 && c->o->data_file)
    r = write_data_file (c, path, &dfd);
  if (r == 0)
    r = write_image (c, fd);
  /* The tables are durable before a header names them: a crash in
   * between leaves a file that is not an image, never one whose header
   * points at tables that were lost.
   */
  if (r == 0 && fdatasync (fd) < 0)
    r = fail (c, -errno, "cannot sync: %s", strerror (errno));
  if (r == 0 && (r = blocking_pwrite (fd, hdr, c->cs, 0)) < 0)
    fail (c, r, "cannot write the header: %s", strerror (-r));
  if (r == 0 && fsync (fd) < 0)
    r = fail (c, -errno, "cannot sync: %s", strerror (errno));
  /* Half an image is worse than none. */
  if (r < 0 && fd >= 0)
    unlink (path);
  if (fd >= 0)
    close (fd);
  if (dfd >= 0)
    close (dfd);
  free (hdr);
  return r;
}

int
qcow2_create (const char *path, const struct qcow2_create_opts *opts,
              char *err, size_t errlen)
{
  struct create c = { .o = opts, .err = err, .errlen = errlen };
  uint64_t size = opts->size;
  int r = 0;

  c.q = calloc (1, sizeof *c.q);
  if (!c.q)
    return fail (&c, -ENOMEM, "out of memory");
  c.q->path = (char *) path;
  c.q->fd = c.q->dfd = -1;
  /* The backing file must exist, and gives the size when none is. */
  if (opts->backing_file && opts->backing_fmt
      && (!strcmp (opts->backing_fmt, "raw")
          || !strcmp (opts->backing_fmt, "qcow2"))) {
    uint64_t bsize = 0;
    r = backing_size (&c, path, &bsize);
    if (size == 0)
      size = bsize;
  }
  if (r == 0)
    r = check_opts (&c, size);
  if (r == 0)
    r = plan (&c);
  if (r == 0)
    r = create_files (&c, path);
  free (c.full_rb);
  free (c.q);
  return r;
}
