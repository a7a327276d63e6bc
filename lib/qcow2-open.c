/* lib/qcow2-open.c: opening and closing an image and its chain, and the
 * accessors of the public API.
 *
 * Open is the one place that does synchronous I/O: it reads the header, the
 * L1 table and the refcount table before the image is handed to the loop.
 */
#include <config.h>

#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <syslog.h>
#include <sys/stat.h>
#include <unistd.h>

#include "qcow2-internal.h"

#define DEFAULT_L2_CACHE_MAX (32u << 20)
#define MIN_L2_CACHE_ENTRIES 16u
#define MIN_L2_CACHE_BYTES   (1u << 20)
#define RB_CACHE_BYTES       (4u << 20)

/* Open path at depth (0: the image the caller named; more: a backing file
 * of top, read-only).
 */
static int image_open (const char *path, const struct qcow2_opts *opts,
                       unsigned depth, struct qcow2 *top, struct qcow2 **out,
                       char *err, size_t errlen);

/* The end of the last cluster that has a non-zero refcount: the last
 * refcount block in use is read (and the one before it, while empty).
 * Every refcount block must start inside the file: refcount blocks are
 * durable before the table names them.
 */
static int
last_counted_cluster (struct qcow2 *q, uint64_t file_size, uint64_t *end,
                      char *err, size_t errlen)
{
  uint64_t per = (uint64_t) 1 << q->rb_bits;
  void *block;
  int r = 0;

  *end = 0;
  for (uint64_t i = 0; i < q->reftable_used; i++) {
    uint64_t rb = be64toh (q->reftable[i]) & REFT_OFFSET_MASK;
    if (rb && header_in_file ("refcount block", rb, 1, file_size, err,
                              errlen) < 0)
      return -EINVAL;
  }
  block = buffer_alloc_zero (q->cluster_size);
  if (!block) {
    snprintf (err, errlen, "out of memory");
    return -ENOMEM;
  }
  for (uint64_t i = q->reftable_used; i > 0 && *end == 0; i--) {
    uint64_t rb = be64toh (q->reftable[i - 1]) & REFT_OFFSET_MASK;
    if (!rb)
      continue;
    if (rb & (q->cluster_size - 1))
      continue;                 /* corrupt; the flusher will say so */
    r = blocking_pread (q->fd, block, q->cluster_size, rb, true);
    if (r < 0)
      break;
    for (uint64_t k = per; k > 0; k--)
      if (refblock_get (q, block, k - 1)) {
        *end = ((i - 1) * per + k) << q->cluster_bits;
        break;
      }
  }
  free (block);
  if (r < 0)
    snprintf (err, errlen, "reading the refcounts: %s", strerror (-r));
  return r;
}

/* L2 tables are cached in slices of this size: a miss reads 4 KiB, not
 * a cluster, and a flush writes back only the slices that changed.
 */
#define L2_SLICE_BYTES 4096u

/* Whether the L2 tables can be sliced: not when a write may have to copy
 * a whole table (one shared with an internal snapshot, an L1 entry without
 * COPIED), nor when the caller asked for whole tables.
 */
static bool
can_slice (const struct qcow2 *q, const struct qcow2_opts *opts)
{
  if (q->cluster_size <= L2_SLICE_BYTES || opts->whole_l2_tables)
    return false;
  if (!q->read_only) {
    if (q->nb_snapshots)
      return false;
    for (uint32_t i = 0; i < q->l1_size; i++) {
      uint64_t e = be64toh (q->l1[i]);
      if ((e & L1E_OFFSET_MASK) && !(e & L1E_COPIED))
        return false;
    }
  }
  return true;
}

/* The geometry of what the L2 cache holds (l2_bits, l2_entries: per
 * slice), set once here; l1_shift (per table) comes from the header.
 */
static void
choose_l2_slices (struct qcow2 *q, const struct qcow2_opts *opts)
{
  uint32_t bytes = can_slice (q, opts) ? L2_SLICE_BYTES : q->cluster_size;

  q->l2_slice_bytes = bytes;
  q->l2_bits = (uint32_t) __builtin_ctz (bytes) - (q->extl2 ? 4 : 3);
  q->l2_entries = 1u << q->l2_bits;
  assert (q->cluster_bits + q->l2_bits <= q->l1_shift);
}

static unsigned
l2_cache_entries (const struct qcow2 *q, uint64_t bytes)
{
  uint64_t coverage = (uint64_t) q->l2_entries << q->cluster_bits;
  uint64_t n;

  if (bytes)
    n = bytes / q->l2_slice_bytes;
  else {
    /* Enough to map the whole disk, within a memory bound. */
    n = (q->size + coverage - 1) / coverage;
    if (n > DEFAULT_L2_CACHE_MAX / q->l2_slice_bytes)
      n = DEFAULT_L2_CACHE_MAX / q->l2_slice_bytes;
  }
  /* Every request in flight pins one entry: keep room for many. */
  if (n < MIN_L2_CACHE_ENTRIES)
    n = MIN_L2_CACHE_ENTRIES;
  if (!bytes && n < MIN_L2_CACHE_BYTES / q->l2_slice_bytes)
    n = MIN_L2_CACHE_BYTES / q->l2_slice_bytes;
  if (n > 1u << 20)
    n = 1u << 20;
  return (unsigned) n;
}

static void
free_image (struct qcow2 *q)
{
  if (q->backing)
    free_image (q->backing);
  hostfile_free (q);
  cw_free (q);
  dcache_free (q);
  cache_free (&q->l2c);
  cache_free (&q->rbc);
  flush_free (q);
  if (q->aio && q->own_aio)
    aio_destroy (q->aio);
  if (q->dfd >= 0 && q->dfd != q->fd)
    close (q->dfd);
  if (q->fd >= 0)
    close (q->fd);
  free (q->data_file);
  free (q->l1);
  free (q->reftable);
  free (q->header_sector);
  free (q->zero_cluster);
  free (q->incs.v);
  free (q->decs.v);
  free (q->free_clusters.v);
  overlap_free (q);
  free (q->path);
  free (q);
}

/* Say in err why opening failed, and return ret. */
#define FAIL(ret, ...) \
  do { snprintf (err, errlen, __VA_ARGS__); return (ret); } while (0)

#define MAX_CHAIN_DEPTH 32

/* Open the backing file the header names, relative to q's directory. */
static int
open_backing (struct qcow2 *q, const struct qcow2_opts *opts, char *err,
              size_t errlen)
{
  struct qcow2_opts bo = *opts;
  char name[1024], *path = NULL, berr[300];
  const char *slash;
  int r;

  if (q->depth + 1 >= MAX_CHAIN_DEPTH) {
    snprintf (err, errlen, "backing chain longer than %d images",
              MAX_CHAIN_DEPTH);
    return -ELOOP;
  }
  r = blocking_pread (q->fd, name, q->backing_size, q->backing_offset, true);
  if (r < 0) {
    snprintf (err, errlen, "reading the backing file name: %s",
              strerror (-r));
    return r;
  }
  name[q->backing_size] = '\0';
  if (strlen (name) != q->backing_size) {
    snprintf (err, errlen, "backing file name contains a NUL byte");
    return -EINVAL;
  }
  slash = strrchr (q->path, '/');
  if (name[0] == '/' || !slash)
    path = strdup (name);
  else if (asprintf (&path, "%.*s/%s", (int) (slash - q->path), q->path,
                     name) < 0)
    path = NULL;
  if (!path) {
    snprintf (err, errlen, "out of memory");
    return -ENOMEM;
  }

  bo.read_only = true;
  bo.aio = q->aio;
  /* A format the image names is used as is: never probe past it. */
  if (q->backing_fmt[0] == '\0')
    bo.format = QCOW2_FORMAT_AUTO;
  else if (strcmp (q->backing_fmt, "qcow2") == 0)
    bo.format = QCOW2_FORMAT_QCOW2;
  else if (strcmp (q->backing_fmt, "raw") == 0)
    bo.format = QCOW2_FORMAT_RAW;
  else {
    snprintf (err, errlen, "backing file %s has format '%s', which is not "
              "supported (only qcow2 and raw)", path, q->backing_fmt);
    free (path);
    return -ENOTSUP;
  }
  r = image_open (path, &bo, q->depth + 1, q->top, &q->backing, berr,
                  sizeof berr);
  if (r < 0)
    snprintf (err, errlen, "backing file %s: %s", path, berr);
  else if (!q->backing_fmt[0])
    qlog (q, LOG_INFO, "backing file %s has no format in the image; probed "
          "as %s", path, qcow2_format_name (q->backing));
  free (path);
  return r;
}

/* Open the external data file the header names, next to the image unless
 * the name is absolute, with the image's own flags.
 */
static int
open_data_file (struct qcow2 *q, int flags, char *err, size_t errlen)
{
  const char *slash = strrchr (q->path, '/');
  char *path = NULL, derr[300];
  int r;

  if (q->data_file[0] == '/' || !slash)
    path = strdup (q->data_file);
  else if (asprintf (&path, "%.*s/%s", (int) (slash - q->path), q->path,
                     q->data_file) < 0)
    path = NULL;
  if (!path) {
    snprintf (err, errlen, "out of memory");
    return -ENOMEM;
  }
  r = hostfile_open (q->top, NULL, HOSTFILE_DATA, path, flags, derr,
                     sizeof derr);
  /* QEMU resolves it from the working directory: accept that too. */
  if (r == -ENOENT && q->data_file[0] != '/')
    r = hostfile_open (q->top, NULL, HOSTFILE_DATA, q->data_file, flags,
                       derr, sizeof derr);
  if (r < 0)
    snprintf (err, errlen, "external data file %s: %s", path, derr);
  else
    q->dfd = r;
  free (path);
  /* Compressed clusters cannot live in a data file. */
  q->compress = false;
  return r < 0 ? r : 0;
}

/* A raw file: its size is the disk size and nothing needs reading. */
static int
open_raw (struct qcow2 *q, uint64_t file_size, char *err, size_t errlen)
{
  q->raw = true;
  q->size = q->direct ? file_size & ~(uint64_t) (SECTOR - 1) : file_size;
  q->cluster_bits = 16;
  q->cluster_size = 1u << 16;
  q->zero_cluster = buffer_alloc_zero (q->cluster_size);
  if (!q->zero_cluster) {
    snprintf (err, errlen, "out of memory");
    return -ENOMEM;
  }
  return 0;
}

int
qcow2_open (const char *path, const struct qcow2_opts *opts,
            struct qcow2 **out, char *err, size_t errlen)
{
  return image_open (path, opts, 0, NULL, out, err, errlen);
}

/* The phases of image_open, in order.  Each says why it failed in err and
 * returns -errno; what it set up is left in q for free_image.
 */

/* Open the file with the image's flags (returned in *flags) and lock it. */
static int
open_locked (struct qcow2 *q, const struct qcow2_opts *opts, int *flags,
             uint64_t *file_size, char *err, size_t errlen)
{
  struct stat st;
  int r;

  *flags = (q->read_only ? O_RDONLY : O_RDWR) | O_CLOEXEC;
  if (q->direct)
    *flags |= O_DIRECT;
  r = hostfile_open (q->top, opts,
                     q->depth ? HOSTFILE_BACKING : HOSTFILE_IMAGE, q->path,
                     *flags, err, errlen);
  if (r < 0)
    return r;
  q->fd = q->dfd = r;
  if (fstat (q->fd, &st) < 0)
    FAIL (-errno, "%s", strerror (errno));
  *file_size = (uint64_t) st.st_size;
  /* Before reading anything: a writer elsewhere may be changing it. */
  if (opts->force_share && !q->read_only)
    FAIL (-EINVAL, "force-share is only possible read-only");
  q->lock_mode = q->read_only ? (opts->force_share ? IMAGE_LOCK_SHARE_ALL
                                 : IMAGE_LOCK_READ) : IMAGE_LOCK_WRITE;
  return lock_image (q, q->fd, q->lock_mode, "image", err, errlen);
}

/* Read and parse the header, or take the file as raw (q->raw). */
static int
read_header (struct qcow2 *q, const struct qcow2_opts *opts,
             uint64_t file_size, char *err, size_t errlen)
{
  void *hdr;
  uint64_t hdr_len;
  uint32_t cb;
  bool magic_ok;
  int r;

  /* The first sector tells the cluster size; the header cluster holds the
   * extensions.
   */
  q->header_sector = buffer_alloc_zero (SECTOR);
  if (!q->header_sector)
    FAIL (-ENOMEM, "out of memory");
  r = blocking_pread (q->fd, q->header_sector, SECTOR, 0, true);
  if (r < 0)
    FAIL (r, "reading the header: %s", strerror (-r));
  magic_ok = file_size >= 4
    && get_be32 ((const uint8_t *) q->header_sector + HDR_MAGIC)
       == QCOW2_MAGIC;
  if (opts->format == QCOW2_FORMAT_RAW
      || (opts->format == QCOW2_FORMAT_AUTO && !magic_ok))
    return open_raw (q, file_size, err, errlen);
  /* The format the caller asked for, not one a backing image names: a
   * damaged qcow2 must never be taken for raw, so say how to serve a file
   * that really is raw.
   */
  if (!magic_ok && q->depth == 0 && file_size >= 4)
    FAIL (-EINVAL, "not a qcow2 image (use -f raw to serve it as a raw "
          "file)");
  if (file_size < QCOW2_V2_HEADER_LEN)
    FAIL (-EINVAL, "file is too short to be a qcow2 image");
  cb = get_be32 ((const uint8_t *) q->header_sector + HDR_CLUSTER_BITS);
  hdr_len = cb >= QCOW2_MIN_CLUSTER_BITS && cb <= QCOW2_MAX_CLUSTER_BITS
    ? (uint64_t) 1 << cb : SECTOR;
  hdr = buffer_alloc_zero (hdr_len);
  if (!hdr)
    FAIL (-ENOMEM, "out of memory");
  r = blocking_pread (q->fd, hdr, hdr_len, 0, true);
  if (r < 0)
    snprintf (err, errlen, "reading the header: %s", strerror (-r));
  else
    r = header_parse (q, hdr, hdr_len < file_size ? hdr_len : file_size,
                      file_size, err, errlen);
  free (hdr);
  return r;
}

/* Open and lock the external data file the header names. */
static int
open_data_file_locked (struct qcow2 *q, int flags, char *err, size_t errlen)
{
  char what[300];
  int r = open_data_file (q, flags, err, errlen);

  if (r < 0 || q->dfd == q->fd)
    return r;
  snprintf (what, sizeof what, "external data file %s", q->data_file);
  return lock_image (q, q->dfd, q->lock_mode, what, err, errlen);
}

/* Read the L1 table and the refcount table. */
static int
load_tables (struct qcow2 *q, uint64_t file_size, char *err, size_t errlen)
{
  uint64_t l1_bytes = (uint64_t) q->l1_size * 8;
  int r;

  q->l1_buf_bytes = round_up (l1_bytes ? l1_bytes : 1, SECTOR);
  q->l1 = buffer_alloc_zero (q->l1_buf_bytes);
  if (!q->l1)
    FAIL (-ENOMEM, "out of memory for the L1 table");
  r = blocking_pread (q->fd, q->l1, round_up (l1_bytes, SECTOR), q->l1_offset,
                 true);
  if (r < 0)
    FAIL (r, "reading the L1 table: %s", strerror (-r));
  r = header_l1_in_file ("", q->l1, q->l1_size, file_size, err, errlen);
  if (r < 0)
    return r;
  /* The tail of the last sector may hold other data; keep it zero here so
   * a write-back of that sector never invents entries.  (The L1 table
   * occupies whole clusters, so the sector is ours.)
   */

  q->reftable_entries = ((uint64_t) q->reftable_clusters << q->cluster_bits)
    / 8;
  q->reftable = buffer_alloc_zero ((size_t) q->reftable_clusters
                                   << q->cluster_bits);
  if (!q->reftable)
    FAIL (-ENOMEM, "out of memory for the refcount table");
  r = blocking_pread (q->fd, q->reftable,
                 (size_t) q->reftable_clusters << q->cluster_bits,
                 q->reftable_offset, true);
  if (r < 0)
    FAIL (r, "reading the refcount table: %s", strerror (-r));

  for (uint64_t i = q->reftable_entries; i > 0; i--)
    if (q->reftable[i - 1]) {
      q->reftable_used = i;
      break;
    }
  return 0;
}

/* Where new clusters come from: past everything the file already holds.
 * Every cluster with a refcount should lie inside the file; when one does
 * not, the refcounts are rebuilt before the first write (prepare_writes).
 */
static int
find_alloc_end (struct qcow2 *q, uint64_t file_size, char *err,
                size_t errlen)
{
  uint64_t end;
  int r;

  q->file_end = file_size;
  q->alloc_end = round_up (file_size, q->cluster_size);
  /* A dirty image's refcounts are rebuilt later, not trusted here. */
  if (!q->read_only && !(q->incompat & INCOMPAT_DIRTY)) {
    r = last_counted_cluster (q, file_size, &end, err, errlen);
    if (r < 0)
      return r;
    /* Counts past the end of the file are leaks at best (a crash of a
     * writer that counts before it writes), a hostile image at worst:
     * allocating past them would make the first write reserve the whole
     * gap.  The refcounts are rebuilt from the tables instead.
     */
    if (end > q->alloc_end) {
      qlog (q, LOG_WARNING, "%s: the refcounts count clusters up to 0x%llx, "
            "past the end of the file (%llu bytes): rebuilding them", q->path,
            (unsigned long long) end, (unsigned long long) file_size);
      q->refcounts_untrusted = true;
    }
  }
  end = round_up (q->l1_offset + (uint64_t) q->l1_size * 8, q->cluster_size);
  if (end > q->alloc_end)
    q->alloc_end = end;
  return 0;
}

/* The table caches and the flusher. */
static int
setup_caches (struct qcow2 *q, const struct qcow2_opts *opts, char *err,
              size_t errlen)
{
  int r;

  q->zero_cluster = buffer_alloc_zero (q->cluster_size);
  if (!q->zero_cluster)
    FAIL (-ENOMEM, "out of memory");
  choose_l2_slices (q, opts);
  r = cache_init (&q->l2c, q, "L2", l2_cache_entries (q, opts->l2_cache_bytes),
                  CACHE_MAX_PINS_L2, q->l2_slice_bytes, opts->budget);
  q->l2c.entry_shift = q->extl2 ? 1 : 0;
  if (r == 0) {
    unsigned n = RB_CACHE_BYTES >> q->cluster_bits;
    /* Only the flusher uses refcount blocks: never a read-only image. */
    r = cache_init (&q->rbc, q, "refcount", n < 4 ? 4 : n,
                    q->read_only ? 0 : CACHE_MAX_PINS_RB, q->cluster_size,
                    opts->budget);
  }
  if (r == 0)
    r = flush_init (q);
  if (r == -ENOBUFS)
    FAIL (r, "the metadata cache budget has no room left for the "
          "smallest cache of this image (%u+%u bytes of tables)",
          CACHE_MAX_PINS_L2 * q->l2_slice_bytes,
          q->read_only ? 0 : CACHE_MAX_PINS_RB * q->cluster_size);
  if (r < 0)
    FAIL (r, "out of memory for the caches");
  return 0;
}

/* Everything a qcow2 image needs in memory before it is served. */
static int
load_qcow2 (struct qcow2 *q, const struct qcow2_opts *opts, int flags,
            uint64_t file_size, char *err, size_t errlen)
{
  int r = 0;

  if (q->data_file)
    r = open_data_file_locked (q, flags, err, errlen);
  if (r == 0)
    r = load_tables (q, file_size, err, errlen);
  if (r == 0)
    r = find_alloc_end (q, file_size, err, errlen);
  if (r == 0)
    r = setup_caches (q, opts, err, errlen);
  return r;
}

/* The caller's I/O backend or one of our own, and how each file's I/O
 * may run inline.
 */
static int
setup_aio (struct qcow2 *q, const struct qcow2_opts *opts, char *err,
           size_t errlen)
{
  if (opts->aio)
    q->aio = opts->aio;
  else {
    enum aio_kind kind = opts->aio_mode == QCOW2_AIO_URING ? AIO_KIND_URING
      : opts->aio_mode == QCOW2_AIO_THREADS ? AIO_KIND_THREADS
      : AIO_KIND_AUTO;
    int r = aio_create (kind, 256, &q->aio);
    if (r < 0)
      FAIL (r, "cannot set up asynchronous I/O (%s): %s",
            kind == AIO_KIND_URING ? "io_uring" : "threads", strerror (-r));
    q->own_aio = true;
  }
  q->fd_inline = opts->no_inline_io ? AIO_INLINE_NONE
    : aio_inline_mode (q->fd, q->direct);
  q->dfd_inline = q->dfd == q->fd ? q->fd_inline
    : opts->no_inline_io ? AIO_INLINE_NONE
    : aio_inline_mode (q->dfd, q->direct);
  return 0;
}

/* Make a writable image ready for writes: repair refcounts left dirty,
 * set up the space accounting, and mark the image dirty when its
 * refcounts are lazy.
 */
static int
prepare_writes (struct qcow2 *q, char *err, size_t errlen)
{
  int r;

  if (q->read_only)
    return 0;
  /* Left dirty with lazy refcounts, or counting past the end of the
   * file: the refcounts cannot be trusted.
   */
  if ((q->incompat & INCOMPAT_DIRTY) || q->refcounts_untrusted) {
    r = repair_refcounts (q, false, err, errlen);
    if (r < 0)
      return r;
    q->incompat &= ~INCOMPAT_DIRTY;
    q->refcounts_untrusted = false;
  }
  /* After the repair, which may move the refcount table and alloc_end. */
  space_open (q);
  r = overlap_l2_rebuild (q);
  if (r < 0)
    FAIL (r, "out of memory for the L2 table set");
  /* Lazy refcounts: mark the image dirty while open, so refcount updates
   * can wait until close; a crash leaves the bit set for the repair above.
   */
  if (q->compat & COMPAT_LAZY_REFCOUNTS) {
    r = header_set_dirty (q, true);
    if (r < 0)
      FAIL (r, "setting the dirty bit: %s", strerror (-r));
    q->lazy = true;
  }
  return 0;
}

/* Bits for features we do not maintain must be cleared before writing.
 * A raw data file we keep raw (qcow2-zero.c), so that bit stays.
 */
static int
clear_autoclear (struct qcow2 *q, char *err, size_t errlen)
{
  uint64_t keep;
  int r;

  q->data_file_raw = q->data_file
    && (q->autoclear & AUTOCLEAR_DATA_FILE_RAW);
  if (q->read_only
      || !(q->autoclear & ~(q->data_file_raw ? AUTOCLEAR_DATA_FILE_RAW : 0)))
    return 0;
  keep = q->autoclear & AUTOCLEAR_DATA_FILE_RAW
    & (q->data_file_raw ? ~0ull : 0);
  put_be64 ((uint8_t *) q->header_sector + HDR_AUTOCLEAR, keep);
  r = header_write_sync (q);
  if (r < 0)
    FAIL (r, "clearing autoclear feature bits: %s", strerror (-r));
  q->autoclear = keep;
  return 0;
}

static int
image_open (const char *path, const struct qcow2_opts *opts, unsigned depth,
            struct qcow2 *top, struct qcow2 **out, char *err, size_t errlen)
{
  static const struct qcow2_opts defaults;
  struct qcow2 *q;
  uint64_t file_size = 0;
  int r, flags = 0;

  if (!opts)
    opts = &defaults;
  q = calloc (1, sizeof *q);
  if (!q) {
    snprintf (err, errlen, "out of memory");
    return -ENOMEM;
  }
  q->fd = -1;
  q->dfd = -1;
  q->depth = depth;
  q->top = top ? top : q;
  q->read_only = opts->read_only;
  q->direct = opts->direct;
  q->compress = opts->compress && !opts->read_only;
  q->log = opts->log;
  q->log_opaque = opts->log_opaque;
  q->l1_dirty_lo = q->l1_dirty_hi = -1;
  q->path = strdup (path);
  if (!q->path) {
    snprintf (err, errlen, "out of memory");
    r = -ENOMEM;
    goto fail;
  }

  r = open_locked (q, opts, &flags, &file_size, err, errlen);
  if (r == 0)
    r = read_header (q, opts, file_size, err, errlen);
  /* A raw file has no metadata to load. */
  if (r == 0 && !q->raw)
    r = load_qcow2 (q, opts, flags, file_size, err, errlen);
  if (r == 0)
    r = setup_aio (q, opts, err, errlen);
  if (r == 0 && opts->snapshot) {
    if (!q->read_only) {
      snprintf (err, errlen, "a snapshot can only be served read-only");
      r = -EINVAL;
    }
    else
      r = snapshot_load (q, opts->snapshot, err, errlen);
  }
  if (r == 0)
    r = prepare_writes (q, err, errlen);
  if (r == 0)
    r = clear_autoclear (q, err, errlen);
  if (r == 0 && q->backing_offset) {
    r = open_backing (q, opts, err, errlen);
    if (r == 0)
      q->backing_size_bytes = q->backing->size;
  }
  if (r == 0) {
    *out = q;
    return 0;
  }

 fail:
  free_image (q);
  return r;
}

static void
close_flush_done (void *opaque, int ret)
{
  int *res = opaque;
  *res = ret;
}

/* Run the loop by hand until cond holds or nothing can move any more. */
static void
drain (struct qcow2 *q, const int *flag)
{
  for (;;) {
    qcow2_process (q);
    if (flag ? *flag != 1 : q->in_flight == 0)
      return;
    if (q->aio->pending == 0 && !engine_has_work (q)) {
      qlog (q, LOG_ERR, "%u requests stuck at close", q->in_flight);
      return;
    }
    if (q->aio->pending)
      aio_wait (q->aio);
  }
}

int
qcow2_close (struct qcow2 *q)
{
  int ret = 0;

  if (!q)
    return 0;
  drain (q, NULL);
  if (!q->read_only && !q->broken) {
    int res = 1;
    /* At close even lazy refcounts are written, then the image is clean. */
    if (q->lazy)
      flush_set_full (q);
    cw_close (q);
    /* A packing run whose write was still in flight drops its own
     * references when the write ends, inside the flush, after the flush
     * took the ones owed: a second flush writes those (or the run's
     * clusters leak, a refcount one too high each).
     */
    for (int pass = 0; pass < 2 && ret == 0; pass++) {
      res = 1;
      if (qcow2_flush (q, close_flush_done, &res) == 0) {
        drain (q, &res);
        ret = res == 1 ? -EIO : res;
      }
      if (!cw_retired_owed (q))
        break;
    }
    if (ret == 0 && q->lazy)
      ret = header_set_dirty (q, false);
    /* Give back what was reserved ahead and not used. */
    if (ret == 0) {
      int r;
      cw_close_trim (q);
      r = space_trim (q);
      if (r < 0)
        qlog (q, LOG_WARNING, "%s: trimming the file at close: %s", q->path,
              strerror (-r));
    }
  }
  if (ret < 0)
    qlog (q, LOG_ERR, "%s: writing back metadata at close failed (%s): "
          "writes since the last successful flush may be lost", q->path,
          strerror (-ret));
  free_image (q);
  return ret;
}

uint64_t
qcow2_size (const struct qcow2 *q)
{
  return q->size;
}

uint32_t
qcow2_cluster_size (const struct qcow2 *q)
{
  return q->cluster_size;
}

bool
qcow2_read_only (const struct qcow2 *q)
{
  return q->read_only;
}

uint32_t
qcow2_min_align (const struct qcow2 *q)
{
  return image_min_align (q);
}

int
qcow2_fd (const struct qcow2 *q)
{
  return aio_fd (q->aio);
}

unsigned
qcow2_in_flight (const struct qcow2 *q)
{
  return q->in_flight;
}

const char *
qcow2_format_name (const struct qcow2 *q)
{
  return q->raw ? "raw" : "qcow2";
}

const char *
qcow2_aio_name (const struct qcow2 *q)
{
  return aio_name (q->aio);
}
