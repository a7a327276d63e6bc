/* lib/qcow2.h: the public API of the non-blocking qcow2 engine.
 *
 * The engine knows nothing of NBD or of an event loop.  A caller opens an
 * image, watches qcow2_fd() for readability and calls qcow2_process() when it
 * is readable; requests are submitted with qcow2_read/write/flush and finish
 * through their completion callback, always from inside qcow2_process() and
 * never from inside the call that submitted them.
 *
 * All functions run on one thread (the caller's loop): the engine has no
 * locks.  Errors are returned as negative errno values.
 */
#ifndef QNBD_QCOW2_H
#define QNBD_QCOW2_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct aio;
struct qcow2;
struct qcow2_cache_budget;

/* Completion of one request: ret is 0 or -errno. */
typedef void qcow2_done_fn (void *opaque, int ret);

/* Log hook: the engine prints nothing itself.  level uses syslog's values
 * (LOG_ERR, LOG_WARNING, LOG_INFO, LOG_DEBUG).
 */
typedef void qcow2_log_fn (void *opaque, int level, const char *msg);

enum qcow2_aio_mode {
  QCOW2_AIO_AUTO,               /* io_uring, threads when refused */
  QCOW2_AIO_URING,
  QCOW2_AIO_THREADS,
};

enum qcow2_format {
  QCOW2_FORMAT_QCOW2,           /* the default: anything else is refused */
  QCOW2_FORMAT_RAW,
  QCOW2_FORMAT_AUTO,            /* qcow2 by its magic, else raw */
};

/* Which host files an image may reach through the names in its header
 * (backing file, external data file).  Whatever the policy they must be
 * regular files, and no file may appear twice in a chain.
 */
enum qcow2_backing_policy {
  QCOW2_BACKING_CONFINE,        /* the default: they must resolve (after
                                   symlinks) inside the opened image's
                                   directory or one of allow_dirs */
  QCOW2_BACKING_FOLLOW,         /* any regular file the names reach */
  QCOW2_BACKING_NONE,           /* refuse images that name either */
};

struct qcow2_opts {
  enum qcow2_format format;
  enum qcow2_backing_policy backing;
  const char *const *allow_dirs; /* NULL-terminated; with CONFINE */
  bool read_only;
  bool force_share;             /* read-only: take no lock that refuses
                                   writers (QEMU's force-share) */
  bool direct;                  /* O_DIRECT (--cache=none) */
  enum qcow2_aio_mode aio_mode;
  struct aio *aio;              /* use this backend (tests); NULL: create */
  uint64_t l2_cache_bytes;      /* 0: default (covers the disk, bounded) */
  struct qcow2_cache_budget *budget; /* shared by the metadata caches of
                                   the images opened with it (backing
                                   files included); NULL: each image's
                                   caches are bounded only by their own
                                   size */
  const char *snapshot;         /* serve this internal snapshot (name or id),
                                   read-only; NULL: the active image */
  bool compress;                /* store whole-cluster writes compressed */
  bool whole_l2_tables;         /* cache whole L2 tables, never 4 KiB
                                   slices of them */
  bool no_inline_io;            /* every op goes to the I/O backend; none
                                   is done on the caller's thread */
  qcow2_log_fn *log;            /* NULL: silent */
  void *log_opaque;
};

/* Write flags. */
#define QCOW2_WRITE_FUA  (1u << 0)  /* durable (data and metadata) on completion */
#define QCOW2_ZERO_NO_HOLE (1u << 1) /* write-zeroes: keep clusters allocated */
#define QCOW2_ZERO_FAST  (1u << 2)  /* write-zeroes: fail with -ENOTSUP rather
                                       than write any data */

/* One extent of a block-status answer. */
struct qcow2_extent {
  uint64_t length;
  uint32_t flags;               /* QCOW2_EXTENT_* */
  uint32_t depth;               /* 0: allocated nowhere in the chain; 1: in
                                   this image; 2: in its backing file ... */
};
#define QCOW2_EXTENT_HOLE (1u << 0)  /* not allocated (as NBD_STATE_HOLE) */
#define QCOW2_EXTENT_ZERO (1u << 1)  /* reads as zeros (as NBD_STATE_ZERO) */

/* One memory budget for the metadata caches (L2 slices, refcount blocks)
 * of many images: bytes counts their tables and the bookkeeping of each.
 * Every image opened with it reserves a small minimum at open (enough to
 * make progress; an open that finds no room for it fails with -ENOBUFS)
 * and grows past it only while the budget has room, taking clean tables
 * back from the images used least recently when it has none.  An
 * image's own bound (l2_cache_bytes, or the default) still applies.
 * Returns NULL when out of memory.
 */
struct qcow2_cache_budget *qcow2_cache_budget_new (uint64_t bytes);
/* Free a budget that no open image uses any more (NULL: nothing). */
void qcow2_cache_budget_free (struct qcow2_cache_budget *b);
/* Bytes counted against it now: never more than its size. */
uint64_t qcow2_cache_budget_used (const struct qcow2_cache_budget *b);

/* Open path.  On failure returns -errno and writes a one-line reason (without
 * the path) into err.  Opening reads the header, L1 and refcount table
 * synchronously, and opens the backing chain read-only (qcow2 or raw images,
 * sharing this image's I/O backend); everything after open is asynchronous.
 */
int qcow2_open (const char *path, const struct qcow2_opts *opts,
                struct qcow2 **out, char *err, size_t errlen);

/* Finish every request in flight, write back all metadata, fdatasync, and
 * free the image.  Blocks.  Returns 0 or the first -errno met while writing
 * back; the image is freed either way.
 */
int qcow2_close (struct qcow2 *q);

/* Virtual disk size in bytes, cluster size, and whether writes are refused. */
uint64_t qcow2_size (const struct qcow2 *q);
uint32_t qcow2_cluster_size (const struct qcow2 *q);
bool qcow2_read_only (const struct qcow2 *q);

/* Smallest offset/length alignment requests must have (1, or 512 with
 * O_DIRECT); requests not aligned to it fail with -EINVAL.
 */
uint32_t qcow2_min_align (const struct qcow2 *q);

/* The descriptor to watch; when readable, call qcow2_process(). */
int qcow2_fd (const struct qcow2 *q);

/* Reap I/O completions, advance waiting requests, call completion callbacks. */
void qcow2_process (struct qcow2 *q);

/* For a caller whose loop can run something before it next sleeps: work
 * that becomes ready on the caller's own thread (a read copied from the
 * page cache or tmpfs, a request needing no I/O) calls fn(arg) instead of
 * making qcow2_fd() readable, at most once per qcow2_process call, and
 * never from inside qcow2_process.  fn must not call the engine; it must
 * see to it that qcow2_process runs before the loop sleeps.  qcow2_fd()
 * still becomes readable for I/O the kernel or a worker thread finishes.
 * fn NULL (the default) goes back to the descriptor alone.  q must be the
 * image the caller opened (the top of its chain).
 */
void qcow2_set_ready_notify (struct qcow2 *q, void (*fn) (void *arg),
                             void *arg);

/* Number of requests submitted whose callback has not run yet. */
unsigned qcow2_in_flight (const struct qcow2 *q);

/* Bytes the engine holds for requests in flight beyond their callers'
 * buffers (compressed data read for decompression), over the whole chain.
 */
size_t qcow2_mem_held (const struct qcow2 *q);

/* Requests.  Each returns 0 when accepted (done will be called later from
 * qcow2_process) or -errno when refused at once (done is never called):
 * -EINVAL past the end or misaligned, -EROFS on a read-only image, -EIO once
 * the image has been marked corrupt, -ENOMEM.  buf must stay valid until done;
 * with O_DIRECT it must be 4096-byte aligned.
 */
int qcow2_read (struct qcow2 *q, uint64_t offset, void *buf, size_t len,
                qcow2_done_fn *done, void *opaque);
/* A read that also says which parts of buf are known zeros (holes, zero
 * clusters): up to max extents in map, in order, covering [offset,
 * offset+len), flags QCOW2_EXTENT_HOLE|QCOW2_EXTENT_ZERO for zeros, 0 for
 * data (which may still happen to be zeros).  *n is set before done runs.
 * For sparse NBD read replies.
 */
int qcow2_read_map (struct qcow2 *q, uint64_t offset, void *buf, size_t len,
                    struct qcow2_extent *map, unsigned max, unsigned *n,
                    qcow2_done_fn *done, void *opaque);
int qcow2_write (struct qcow2 *q, uint64_t offset, const void *buf,
                 size_t len, unsigned flags,
                 qcow2_done_fn *done, void *opaque);
/* Make every write completed before this call durable, metadata included. */
int qcow2_flush (struct qcow2 *q, qcow2_done_fn *done, void *opaque);

/* Make the range read as zeros.  Whole clusters get the zero flag (v3) or
 * are unallocated (v2, when nothing shows through); partial clusters are
 * written with zeros unless they already read as zeros.  Flags:
 * QCOW2_WRITE_FUA, QCOW2_ZERO_NO_HOLE, QCOW2_ZERO_FAST.
 */
int qcow2_write_zeroes (struct qcow2 *q, uint64_t offset, uint64_t len,
                        unsigned flags, qcow2_done_fn *done, void *opaque);

/* Release the whole clusters inside the range: they read as zeros after
 * (or as the backing file, on v2 images).  Partial clusters are left
 * alone.  Freed space is punched out of the file.
 */
int qcow2_discard (struct qcow2 *q, uint64_t offset, uint64_t len,
                   qcow2_done_fn *done, void *opaque);

/* Describe [offset, offset+len) as up to max extents in ext (merged, in
 * order, covering a prefix of the range); *n is set before done runs.
 */
int qcow2_block_status (struct qcow2 *q, uint64_t offset, uint64_t len,
                        struct qcow2_extent *ext, unsigned max, unsigned *n,
                        qcow2_done_fn *done, void *opaque);

/* "qcow2" or "raw". */
const char *qcow2_format_name (const struct qcow2 *q);

/* Name of the I/O backend in use ("io_uring", "threads", "fake"). */
const char *qcow2_aio_name (const struct qcow2 *q);

/* ---- Creating an image (lib/qcow2-create.c), synchronous ---- */

enum qcow2_prealloc {
  QCOW2_PREALLOC_OFF,           /* header, refcounts and L1 only */
  QCOW2_PREALLOC_METADATA,      /* every L2 table, each entry naming its
                                   own data cluster; the file extended
                                   sparse (ftruncate), no data written */
  QCOW2_PREALLOC_FALLOC,        /* metadata, and the data's blocks reserved */
  QCOW2_PREALLOC_FULL,          /* metadata, and the data written as zeros */
};

struct qcow2_create_opts {
  uint64_t size;                /* virtual size, a multiple of 512; 0 with
                                   a backing file: the backing file's */
  uint32_t cluster_size;        /* 0: 65536 */
  unsigned version;             /* 2 (compat 0.10) or 3 (1.1); 0: 3 */
  unsigned refcount_bits;       /* 1, 2, 4 ... 64; 0: 16 */
  bool lazy_refcounts;
  bool extended_l2;
  unsigned compression_type;    /* 0 zlib, 1 zstd */
  const char *data_file;        /* external data file, or NULL */
  bool data_file_raw;
  const char *backing_file;     /* or NULL */
  const char *backing_fmt;      /* "qcow2" or "raw": needed with a backing
                                   file (a guess would let a raw disk's
                                   contents choose the format) */
  enum qcow2_prealloc prealloc;
  /* falloc and full: the data's bytes done of total, as they go. */
  void (*progress) (void *opaque, uint64_t done, uint64_t total);
  void *progress_opaque;
};

/* Create (or overwrite) the qcow2 image path, and its external data file.
 * Names in the header (backing file, data file) are relative to path's
 * directory, as when the image is opened.  Returns 0, or -errno with a
 * one-line reason (without the path) in err.
 */
int qcow2_create (const char *path, const struct qcow2_create_opts *opts,
                  char *err, size_t errlen);

/* ---- What an image's header says (lib/qcow2-info.c), synchronous ---- */

struct qcow2_info {
  uint64_t size;                /* virtual size */
  uint32_t cluster_size;
  unsigned version;             /* 2 or 3 */
  unsigned refcount_bits;
  unsigned compression_type;    /* 0 zlib, 1 zstd */
  bool lazy_refcounts;
  bool extended_l2;
  bool corrupt;
  bool dirty;
  char *data_file;              /* external data file name, or NULL */
  bool data_file_raw;
  char *backing_file;           /* as the header names it, or NULL */
  char *full_backing_file;      /* ... beside the image, as opened */
  char backing_fmt[16];         /* from the header extension, or "" */
  uint32_t nb_snapshots;
  struct qcow2_snapshot_info *snapshots; /* nb_snapshots of them */
};

/* An internal snapshot, as qemu-img info lists it. */
struct qcow2_snapshot_info {
  char *id, *name;
  uint64_t vm_state_size;
  uint32_t date_sec, date_nsec;
  uint64_t vm_clock_nsec;
  bool has_icount;
  uint64_t icount;
};

/* Read and validate the header of the qcow2 image path (nothing else is
 * opened; an image marked corrupt or dirty is described, not refused).
 * Returns 0, or -errno with a one-line reason (without the path) in err.
 * Free what it holds with qcow2_info_free.
 */
int qcow2_read_info (const char *path, struct qcow2_info *info, char *err,
                     size_t errlen);
/* The same, taking the lock a reader takes, as qemu-img does: -EBUSY
 * ("image is in use ...") while a writer holds the image, unless
 * force_share (which takes none: qcow2_read_info).
 */
int qcow2_read_info_shared (const char *path, bool force_share,
                            struct qcow2_info *info, char *err,
                            size_t errlen);
void qcow2_info_free (struct qcow2_info *info);

/* ---- The allocation map (lib/qcow2-map.c), synchronous ---- */

/* A run of guest bytes, described as qemu-img map describes it. */
struct qcow2_map_run {
  uint64_t length;
  unsigned depth;               /* the image of the chain that says what
                                   the bytes are: 0 the top image, 1 its
                                   backing file ... */
  bool present;                 /* that image allocates them (data, zero
                                   clusters, a raw file) */
  bool zero;                    /* they read as zeros */
  bool data;                    /* they are stored (compressed or not) */
  bool has_offset;
  uint64_t offset;              /* where they are stored, in file */
  const char *file;             /* the host file (image, external data
                                   file, raw backing file); NULL without
                                   an offset */
};

struct qcow2_mapper;

/* A map of q, open read-only with nothing in flight: its tables are read
 * synchronously.  NULL with -errno in *err (-EINVAL when q is writable or
 * busy).
 */
struct qcow2_mapper *qcow2_map_new (struct qcow2 *q, int *err);
/* The run starting at guest offset (inside the disk) that every field of
 * *run holds for, at most len bytes (the caller merges runs).  0, or
 * -errno with a one-line reason in err (-EIO for tables that contradict
 * themselves).
 */
int qcow2_map_next (struct qcow2_mapper *m, uint64_t offset, uint64_t len,
                    struct qcow2_map_run *run, char *err, size_t errlen);
void qcow2_map_free (struct qcow2_mapper *m);
/* ---- Checking and repairing an image (lib/qcow2-check.c) ---- */

enum qcow2_check_fix {
  QCOW2_CHECK_NO_FIX,           /* read-only: report */
  QCOW2_CHECK_FIX_LEAKS,        /* free clusters nothing references */
  QCOW2_CHECK_FIX_ALL,          /* and rebuild the refcounts, set the
                                   COPIED flags by them */
};

struct qcow2_check_opts {
  enum qcow2_check_fix fix;
  bool force_share;             /* without fix: check even while another
                                   process writes the image */
  /* Each inconsistency found or repaired, one line ("Leaked cluster 5
   * refcount=1 reference=0"), as it is met.
   */
  void (*message) (void *opaque, const char *msg);
  /* Work done of total in the current pass (progress bars). */
  void (*progress) (void *opaque, uint64_t done, uint64_t total);
  void *opaque;
};

/* What qemu-img check reports, with its meanings. */
struct qcow2_check_result {
  uint64_t corruptions;         /* refcounts below the references, and
                                   references that cannot be right */
  uint64_t leaks;               /* refcounts above the references */
  uint64_t check_errors;        /* what could not be checked or fixed */
  uint64_t corruptions_fixed, leaks_fixed;
  uint64_t image_end_offset;    /* past the last cluster in use */
  uint64_t total_clusters;      /* of the virtual disk */
  uint64_t allocated_clusters, fragmented_clusters, compressed_clusters;
  bool rebuilt;                 /* the refcount structure was rewritten */
};

/* Check the qcow2 image path: every reference counted against the
 * refcounts; with a fix, repair, then check again (the result is that
 * of the last check, with what was fixed).  Locks the image as QEMU
 * does.  Returns 0 (the image's state is in res); -EMEDIUMTYPE when path
 * is not a qcow2 image; or -errno with a one-line reason (without the
 * path) in err: it cannot be opened, read, or is in use (-EBUSY).
 */
int qcow2_check (const char *path, const struct qcow2_check_opts *opts,
                 struct qcow2_check_result *res, char *err, size_t errlen);

#endif /* QNBD_QCOW2_H */
