/* lib/qcow2-internal.h: what the engine's files share.  One section per .c
 * file lists what that file offers the others; docs/architecture.md says
 * which file may call which (the layers).
 *
 * How functions report failure, one convention per kind of result:
 *  - Anything that can fail returns int: 0 on success, -errno on failure.
 *    What it produces goes through out-parameters (host offsets, entries,
 *    descriptors), never as a special value of the result.
 *  - A call that may park a request on a wait list returns int:
 *    CACHE_READY (0) when done, CACHE_WAIT (1) when the request was parked
 *    and will be woken to call again, or -errno.
 *  - A step of a request's state machine (seg_*, struct seg_ops) returns
 *    bool: true to go on at once, false when parked or waiting for I/O.
 *    Its failure is recorded in req->err (the first error wins), which the
 *    engine turns into the end of the request.
 *  - A constructor returns the new object, or NULL with -errno in *err.
 *  - A bool predicate cannot fail; a void function cannot fail, or says in
 *    its comment where its failure goes (req->err, a flusher's error).
 *  - Failure is logged once, where it is first understood (qlog, with the
 *    path and the cause), and then only passed up.
 */
#ifndef QNBD_QCOW2_INTERNAL_H
#define QNBD_QCOW2_INTERNAL_H

#include <endian.h>
#include <stdbool.h>
#include <stdint.h>
#include <stddef.h>
#include <string.h>
#include <sys/uio.h>

#include "aio.h"
#include "qcow2.h"

/* ---- on-disk format constants ---- */
#define QCOW2_MAGIC            0x514649fbu  /* "QFI\xfb" */
#define QCOW2_MIN_CLUSTER_BITS 9
#define QCOW2_MAX_CLUSTER_BITS 21
#define QCOW2_V2_HEADER_LEN    72
#define QCOW2_V3_HEADER_LEN    104

/* Byte offsets of the header's fields (qcow2-spec.txt, "Header"). */
#define HDR_MAGIC              0
#define HDR_VERSION            4
#define HDR_BACKING_OFFSET     8
#define HDR_BACKING_SIZE       16
#define HDR_CLUSTER_BITS       20
#define HDR_SIZE               24
#define HDR_CRYPT_METHOD       32
#define HDR_L1_SIZE            36
#define HDR_L1_OFFSET          40
#define HDR_REFTABLE_OFFSET    48
#define HDR_REFTABLE_CLUSTERS  56
#define HDR_NB_SNAPSHOTS       60
#define HDR_SNAPSHOTS_OFFSET   64
#define HDR_INCOMPAT           72   /* version 3 from here on */
#define HDR_COMPAT             80
#define HDR_AUTOCLEAR          88
#define HDR_REFCOUNT_ORDER     96
#define HDR_HEADER_LENGTH      100

#define INCOMPAT_DIRTY         (1ull << 0)
#define INCOMPAT_CORRUPT       (1ull << 1)
#define INCOMPAT_DATA_FILE     (1ull << 2)
#define INCOMPAT_COMPRESSION   (1ull << 3)
#define INCOMPAT_EXTL2         (1ull << 4)
#define COMPAT_LAZY_REFCOUNTS  (1ull << 0)
/* The external data file is a raw image of the disk: kept up to date. */
#define AUTOCLEAR_DATA_FILE_RAW (1ull << 1)

#define L1E_OFFSET_MASK        0x00fffffffffffe00ull
#define L2E_OFFSET_MASK        0x00fffffffffffe00ull
#define L1E_COPIED             (1ull << 63)
#define L2E_COPIED             (1ull << 63)
#define L2E_COMPRESSED         (1ull << 62)
#define L2E_ZERO               (1ull << 0)
/* Extended L2 entries: a second word with one bit per subcluster saying
 * "allocated" (low half) and one saying "reads as zeros" (high half).
 */
#define SUBCLUSTERS            32u
#define SC_ALLOC_ALL           0x00000000ffffffffull
#define SC_ZERO_ALL            0xffffffff00000000ull
#define REFT_OFFSET_MASK       0xfffffffffffffe00ull

/* Bounds on tables read from an untrusted file (QEMU uses the same L1 cap). */
#define MAX_L1_BYTES           (32u << 20)
#define MAX_REFTABLE_BYTES     (8u << 20)

/* Sector size used for metadata and O_DIRECT alignment. */
#define SECTOR                 512u
#define BUF_ALIGN              4096u

struct qcow2;
struct qcow2_req;
struct cache_entry;

/* A singly linked list of requests waiting for one event.  A request waits
 * for at most one thing at a time, so the link lives in the request; the
 * order of waking does not matter for correctness, FIFO is kept for fairness.
 */
struct waitq {
  struct qcow2_req *head, *tail;
};

/* An extent of host clusters whose refcounts change at the next flush. */
struct extent {
  uint64_t offset;              /* host byte offset, cluster aligned */
  uint64_t count;               /* clusters */
};

struct extent_list {
  struct extent *v;
  size_t n, cap;
};

/* One in-flight allocating write into an L2 table: the guest clusters it
 * covers are reserved until the L2 entries are linked.  Kept on the L2 cache
 * entry, so overlap checks only look at allocations in the same table.
 */
struct claim {
  uint32_t first;               /* first L2 index */
  uint32_t count;               /* number of clusters */
  struct claim *next;           /* next in entry->claims */
  struct waitq waiters;         /* writes that overlap and wait for us */
};


/* ---- qcow2-log.c, qcow2-buffer.c, qcow2-blocking.c: support ---- */

void qlog (struct qcow2 *q, int level, const char *fmt, ...)
  __attribute__ ((format (printf, 3, 4)));
/* A zeroed buffer aligned for O_DIRECT (free with free). */
void *buffer_alloc_zero (size_t size);
/* Blocking whole-buffer I/O, for open time and emergencies only.  Reads
 * past the end of the file give zeros, or -EIO unless zero_past_eof.
 * Return 0 or -errno.
 */
int blocking_pread (int fd, void *buf, size_t len, uint64_t off,
               bool zero_past_eof);
int blocking_pwrite (int fd, const void *buf, size_t len, uint64_t off);

/* ---- qcow2-extent.c: growable lists of cluster extents ---- */

/* Append an extent.  0, or -ENOMEM with l unchanged. */
int extent_add (struct extent_list *l, uint64_t offset, uint64_t count);
/* Move every extent of src to the end of dst.  0, or -ENOMEM with both
 * unchanged.
 */
int extent_list_take (struct extent_list *dst, struct extent_list *src);

/* ---- qcow2-waitq.c: parking and waking requests ---- */

void waitq_push (struct waitq *w, struct qcow2_req *req);
/* Move every waiter to the image's runnable list. */
void waitq_wake_all (struct qcow2 *q, struct waitq *w);
/* Wake every waiter with err set: each ends with that error. */
void waitq_fail_all (struct qcow2 *q, struct waitq *w, int err);
/* Make req runnable (it must not be waiting on a list). */
void waitq_wake (struct qcow2_req *req);
/* The first waiter, taken off w (NULL when empty). */
struct qcow2_req *waitq_pop (struct waitq *w);

/* ---- qcow2-budget.c: one memory budget for many images' caches ---- */

/* One cache's share of a struct qcow2_cache_budget (qcow2.h). */
struct budget_member {
  struct qcow2_cache_budget *b; /* NULL: no budget, only the cache's cap */
  struct budget_member *prev, *next;  /* the budget's members */
  uint64_t bytes;               /* held now */
  uint64_t min_bytes;           /* reserved at join: always available */
  uint64_t stamp;               /* the budget's tick at its last use */
  /* Set by the owner: give back one entry held beyond min_bytes that
   * nothing uses and that is clean (calling budget_release); false when
   * there is none.
   */
  bool (*shrink) (struct budget_member *m);
};

/* Join b (NULL: none) reserving min_bytes.  Returns 0, or -ENOBUFS when
 * the budget cannot hold that reservation.
 */
int budget_join (struct qcow2_cache_budget *b, struct budget_member *m,
                 uint64_t min_bytes);
/* Leave the budget, giving back everything m counted. */
void budget_leave (struct budget_member *m);
/* m is being used: the members least recently touched give memory back
 * first.
 */
void budget_touch (struct budget_member *m);
/* May m hold bytes more?  true (counted) inside its reservation or while
 * the budget has room, which colder members are asked to make; false
 * when it has none.
 */
bool budget_take (struct budget_member *m, uint64_t bytes);
void budget_release (struct budget_member *m, uint64_t bytes);

/* ---- qcow2-corrupt.c: an image that contradicts itself ---- */

/* Stop all writes to an image found inconsistent and mark it corrupt on
 * disk (so that qemu-img check -r is needed); returns -EIO.
 */
int corrupt_signal (struct qcow2 *q, const char *fmt, ...)
  __attribute__ ((format (printf, 2, 3)));
/* Host cluster offsets read from the image are untrusted: 0 or -EIO. */
int corrupt_check_cluster (struct qcow2 *q, uint64_t off, const char *what);

/* ---- qcow2-cache.c: cache of L2 slices and refcount blocks ---- */

struct cache_entry {
  uint64_t offset;              /* host offset of the table; 0 = free slot */
  void *buf;                    /* entry_bytes, big-endian as on disk */
  unsigned ref;                 /* pins; pinned entries are never evicted */
  bool used;                    /* used since the clock hand last passed */
  bool loading;                 /* read in flight */
  bool dirty;                   /* differs from the file */
  bool writing;                 /* write-back in flight */
  int load_err;                 /* -errno of a failed load */
  struct waitq waiters;         /* requests waiting for the load */
  struct claim *claims;         /* L2 only: in-flight allocations */
  struct cache_entry *hnext;    /* hash chain */
  struct cache *cache;
  struct aio_op op;             /* the load or write-back */
  struct iovec iov;
  bool for_flusher;             /* write-back counted by the flusher */
};

/* Most entries of a cache one request pins at once: of the L2 cache, a
 * table shared with a snapshot and the copy that replaces it
 * (new_l2_table, in qcow2-segment.c); of the refcount cache, the one
 * block the flusher works on (apply_work, in qcow2-flush.c).  A request
 * waiting for a slot holds none, so a cache that can always have this
 * many entries always lets some request go on.
 */
#define CACHE_MAX_PINS_L2 2
#define CACHE_MAX_PINS_RB 1

struct cache {
  struct qcow2 *q;
  const char *what;             /* "L2" or "refcount" (for logs) */
  unsigned entry_shift;         /* L2: 1 when entries are 128 bits */
  uint32_t entry_bytes;         /* bytes per cached table (or L2 slice) */
  unsigned entry_bits;          /* log2 of entry_bytes */
  unsigned n;                   /* most entries (the cache's own cap) */
  unsigned min;                 /* entries it may always have */
  unsigned count;               /* entries that exist (each has a buffer) */
  unsigned alloc;               /* room in e */
  struct cache_entry **e;       /* created as the cache grows, in no order */
  struct cache_entry **buckets; /* hash heads */
  unsigned nbuckets;            /* power of two, at least count */
  unsigned hand;                /* CLOCK: the next entry to consider */
  struct waitq full;            /* requests waiting for an unpinned slot */
  struct budget_member budget;  /* its share of the daemon's budget */
};

enum cache_get_result {
  CACHE_READY,                  /* pinned and loaded */
  CACHE_WAIT,                   /* req queued; rerun it when woken */
};

/* A cache of at most n entries of entry_bytes, always allowed min of
 * them (CACHE_MAX_PINS_*, or 0 for a cache that is never used),
 * the rest as the budget b (NULL: none) has room.  Entries are created
 * when first needed.  Returns 0, -ENOMEM, or -ENOBUFS when b cannot hold
 * the minimum.
 */
int cache_init (struct cache *c, struct qcow2 *q, const char *what,
                unsigned n, unsigned min, uint32_t entry_bytes,
                struct qcow2_cache_budget *b);
void cache_free (struct cache *c);
/* Find or load the table at offset and pin it.  Returns CACHE_READY with
 * *out set, CACHE_WAIT after queueing req (on the load, on a full cache, or
 * on a flush that must clean a victim), or -errno.
 */
int cache_get (struct cache *c, uint64_t offset, struct qcow2_req *req,
               struct cache_entry **out);
/* A pinned, zero-filled, dirty entry for a table that is new on disk (no
 * read), not yet hashed: give it its offset with cache_set_offset.  Taking
 * the slot before allocating the cluster means a wait never leaks one.
 * Returns CACHE_READY, CACHE_WAIT or -errno like cache_get.
 */
int cache_get_empty (struct cache *c, struct qcow2_req *req,
                     struct cache_entry **out);
/* Place e at offset (0: give the slot back unused). */
void cache_set_offset (struct cache_entry *e, uint64_t offset);
void cache_put (struct cache_entry *e);
/* The loaded entry at offset, counted as a use but not pinned, or NULL
 * (not cached, or still loading).  Only for read-only images, whose
 * tables never change: what the caller reads from it stays true after
 * the entry is evicted.
 */
struct cache_entry *cache_peek (struct cache *c, uint64_t offset);
void cache_mark_dirty (struct cache_entry *e);
/* Start writing back every dirty entry for the flusher; each finished
 * write calls q->flush_io_done.  Returns 0, or -errno when a write could
 * not be started: that entry and those not tried yet stay dirty.  Either
 * way *started is the number of writes started (their completions are
 * owed to the flusher).
 */
int cache_write_dirty (struct cache *c, unsigned *started);
bool cache_has_dirty (const struct cache *c);

/* ---- qcow2-refcount.c: refcount entries inside a refcount block ---- */

uint64_t refblock_get (const struct qcow2 *q, const void *block, uint64_t i);
void refblock_set (const struct qcow2 *q, void *block, uint64_t i,
                   uint64_t v);

/* ---- qcow2-alloc.c: the host cluster allocator ---- */

/* Reserve count contiguous host clusters, reusing freed ones when it can;
 * their refcount increments are recorded for the next flush.  Never waits.
 * Returns 0 with the host offset in *out, or -errno: -ENOSPC when the file
 * system cannot hold them and the metadata they will need, -EIO when the
 * image is found corrupt, -ENOMEM.
 */
int alloc_clusters (struct qcow2 *q, uint64_t count, uint64_t *out);
/* The same, always at the end of the file: clusters nothing was ever
 * written to, which read as zeros (new L2 tables rely on it).
 */
int alloc_fresh_clusters (struct qcow2 *q, uint64_t count, uint64_t *out);

/* ---- qcow2-space.c: file space reserved ahead of the allocator ---- */

/* Make sure the file's reserved space reaches new_alloc_end plus the
 * metadata the flusher may need then.  0 or -errno (-ENOSPC).
 */
int space_reserve_end (struct qcow2 *q, uint64_t new_alloc_end);
/* Reserve the space of clusters being reused (they were punched). */
int space_reserve_range (struct qcow2 *q, uint64_t offset, uint64_t len);
/* Move alloc_end over count clusters already reserved. */
void space_consume (struct qcow2 *q, uint64_t count);
/* The flusher made the refcount block of this reftable index. */
void space_block_created (struct qcow2 *q, uint64_t index);
/* Open (read-write), once alloc_end is known: reserve the L1 and refcount
 * tables' own space, and start counting missing refcount blocks there.
 */
void space_open (struct qcow2 *q);
/* Close: give back the space reserved past alloc_end (0 or -errno). */
int space_trim (struct qcow2 *q);

/* ---- qcow2-flush.c: ordered metadata write-back ---- */

/* Queue req until a metadata flush finishing after now has completed
 * (starting one if idle).
 */
void flush_wait (struct qcow2 *q, struct qcow2_req *req);
/* True while a flush is writing metadata: L1/L2 must not change. */
bool flush_active (const struct qcow2 *q);
/* Queue req until the flush in progress has finished. */
void flush_barrier_wait (struct qcow2 *q, struct qcow2_req *req);
int flush_init (struct qcow2 *q);
void flush_free (struct qcow2 *q);
/* Make the next runs apply refcounts even in lazy mode (close). */
void flush_set_full (struct qcow2 *q);

/* ---- requests: the types every request-layer file shares ---- */

enum req_type {
  REQ_READ,
  REQ_WRITE,
  REQ_FLUSH,                    /* a client's flush: waits on the flusher */
  REQ_FLUSHER,                  /* the flusher itself (one per image) */
  REQ_ZERO,                     /* write-zeroes */
  REQ_DISCARD,                  /* trim */
  REQ_STATUS,                   /* block status */
};

/* The request states; the table at the top of qcow2-segment.c says what
 * each does.
 */
enum req_state {
  RS_SEGMENT,
  RS_GET_L2,
  RS_WAIT_DEPS,
  RS_PLAN,
  RS_COW_READ,
  RS_IO,
  RS_LINK,
  RS_FUA,
  RS_FUA_DONE,
  RS_CHILDREN,
  RS_DONE,
};

struct req_io;

/* One request.  See the state table at the top of qcow2-segment.c. */
struct qcow2_req {
  struct qcow2 *q;
  enum req_type type;
  /* Set for the one request that is not a guest request, the flusher's:
   * the loop calls it instead of the segment state machine.
   */
  void (*run) (struct qcow2_req *req);
  int state;                    /* enum req_state */
  uint64_t offset;              /* guest byte offset */
  size_t len;
  char *buf;
  unsigned flags;               /* QCOW2_WRITE_* */
  qcow2_done_fn *done;
  void *opaque;
  int err;                      /* first -errno met; ends the request */

  /* The segment (part of the request inside one L2 table) in progress. */
  uint64_t seg_off;
  size_t seg_len;
  struct cache_entry *l2;       /* pinned while the segment runs */
  unsigned outstanding;         /* I/O ops of this segment in flight */
  struct req_io *ios;           /* this segment's I/O ops (qcow2-rw.c) */
  unsigned nios;

  bool queued;                  /* on a waitq (runnable, completed, other) */
  struct qcow2_req *wait_next;

  /* Write-zeroes and discard hold their clusters like an allocation, so
   * that a write into them waits (even while they wait for a flush).
   */
  struct claim zres;
  bool zres_on;

  /* Write-zeroes: partial clusters are written by child write requests. */
  unsigned children;            /* children not finished yet */
  struct qcow2_req *parent;

  /* Raw images: one op at a time per request (qcow2-raw.c). */
  struct aio_op op;
  struct iovec iov;
  uint64_t raw_pos;             /* write-zeroes progress */

  /* Block status output. */
  struct qcow2_extent *ext;
  unsigned ext_max;
  unsigned *ext_n;
  unsigned segments;            /* L2 tables looked at so far */
  uint64_t status_pos;          /* progress inside the segment */
  bool status_full;             /* ext[] is full: answer a prefix */
  struct qcow2_extent *child_ext; /* a backing image's answer */
  unsigned child_n;
};

/* One I/O op of a segment, planned by its handler (qcow2-rw.c) and freed
 * with the segment (seg_release).  For an allocating run it also holds the
 * reservation and the COW buffers of its first and last cluster.
 */
struct req_io {
  struct aio_op op;
  struct qcow2_req *req;
  struct iovec iov[3];
  bool is_write;
  bool from_backing;            /* a read of the backing image (guest, len) */
  bool alloc;                   /* an allocating write run */
  bool reuse;                   /* ... that keeps its own host cluster */
  bool self;                    /* a read through this image (from_backing) */
  struct qcow2 *src;            /* a read resolved down the chain: the
                                   backing image whose file holds the data,
                                   or that a from_backing read runs on
                                   (NULL: req->q, or its backing file) */
  uint64_t cov_start, cov_end;  /* in-cluster extent written with the COW */
  bool started;
  uint64_t host;                /* host offset of the op */
  uint64_t guest;               /* guest offset of the data part */
  size_t len;                   /* guest bytes in the data part */
  uint32_t first, count;        /* L2 index range (alloc runs) */
  bool compressed;              /* one whole cluster, stored compressed */
  uint64_t cdesc;               /* its L2 descriptor, once in the cache */
  void *zbuf;                   /* ... its compressed bytes (worker) */
  size_t zlen;                  /* their size; 0: does not compress */
  struct claim a;               /* reservation (alloc runs) */
  void *cow_buf[2];             /* old contents of first/last cluster */
  struct req_io *cow_for;       /* COW read: the write it feeds */

  /* Reads of compressed data: decompressed on completion into dst. */
  void *cbuf;                   /* the sectors holding the data */
  size_t cbuf_len;              /* its size and zbuf's, in mem_held */
  size_t cskip;                 /* where the data starts in cbuf */
  size_t csize;
  char *dst;                    /* where the cluster's bytes go */
  size_t dst_off, dst_len;      /* part of the cluster wanted */
  char *decoded;                /* the whole cluster (worker), for dcache */
  uint64_t dcache_gen;          /* dcache_generation when planned */
};


/* ---- qcow2-entry.c: what an L2 entry says ---- */

/* No data here in this image (reads fall to the backing file, or zeros). */
bool entry_is_hole (const struct qcow2 *q, uint64_t ent);
/* Reads of this entry return zeros (no data, nothing showing through). */
bool entry_reads_zero (const struct qcow2 *q, uint64_t ent);
bool entry_is_zero (const struct qcow2 *q, uint64_t ent);
bool entry_is_inplace (const struct qcow2 *q, uint64_t ent);

/* What a run of guest bytes inside one cluster holds. */
enum sc_kind {
  SC_DATA,                      /* host data at the entry's offset */
  SC_ZERO,                      /* reads as zeros */
  SC_HOLE,                      /* unallocated: the backing file, or zeros */
  SC_COMPRESSED,                /* the whole cluster, compressed */
  SC_BAD,                       /* an impossible bitmap: reads fail */
};

/* The kind of the byte at offset coff inside the cluster whose L2 entry is
 * ent (bitmap bmp, 0 without extended L2), and in *run_end the in-cluster
 * offset where the run of bytes of that kind ends.  Without subclusters
 * the run is the whole cluster.
 */
enum sc_kind entry_status (const struct qcow2 *q, uint64_t ent,
                           uint64_t bmp, uint64_t coff, uint64_t *run_end);
/* The subcluster bits (low half of a bitmap) covering in-cluster bytes
 * [lo, hi), rounded outwards.
 */
uint64_t entry_sc_mask (const struct qcow2 *q, uint64_t lo, uint64_t hi);

/* Drop the reference an L2 entry holds on its cluster(s), after the change
 * is durable.
 */
int entry_release (struct qcow2 *q, uint64_t ent);

/* ---- qcow2-claim.c: per-slice allocation queues ---- */

/* Reserve L2 indexes [first, first + count) of e (qcow2-claim.c):
 * overlapping writes wait until claim_drop.
 */
void claim_add (struct cache_entry *e, struct claim *a, uint32_t first,
                uint32_t count);
void claim_drop (struct qcow2 *q, struct cache_entry *e, struct claim *a);
/* The claim of e overlapping L2 indexes [first, last], or NULL. */
struct claim *claim_find (struct cache_entry *e, uint32_t first,
                          uint32_t last);

/* ---- qcow2-request.c: request lifetime ---- */

/* Validate and create a request (not started).  NULL with *err set when
 * refused.
 */
struct qcow2_req *req_new (struct qcow2 *q, enum req_type type,
                           uint64_t offset, uint64_t len, void *buf,
                           unsigned flags, qcow2_done_fn *done, void *opaque,
                           int *err);
/* Start a child request on target (the parent's image or its backing
 * file) for part of a parent's work: it runs from the chain loop, never
 * inside this call, and done (opaque, err) runs when it ends.  The caller
 * counts it (outstanding or children).  NULL with *err when refused.
 */
struct qcow2_req *req_spawn (struct qcow2 *target, enum req_type type,
                             uint64_t offset, uint64_t len, void *buf,
                             qcow2_done_fn *done, void *opaque, int *err);
/* Record in a read's map that [pos, pos+len) is zeros or data. */
void req_map_add (struct qcow2_req *req, uint64_t len, bool zero);

/* ---- qcow2-segment.c: the states every segment goes through ---- */

/* RS_SEGMENT: pick the next segment or finish; RS_GET_L2: pin its L2
 * slice (creating or copying the table for a write); RS_WAIT_DEPS: wait
 * for a claim on the same clusters.  Each returns true to go on at once,
 * false when parked.
 */
bool seg_next (struct qcow2_req *req);
bool seg_get_l2 (struct qcow2_req *req);
bool seg_wait_claims (struct qcow2_req *req);
/* Free everything the current segment holds.  No I/O may be in flight. */
void seg_release (struct qcow2_req *req);

/* What a request type does in the states that differ: plan a segment
 * (RS_PLAN: map it, start its I/O, set the next state; true to go on at
 * once), start the merged writes once COW reads are in (RS_COW_READ), and
 * link new clusters after the data I/O (RS_LINK; NULL: the segment ends
 * with its I/O).  One table per handler file.
 */
struct seg_ops {
  bool (*plan) (struct qcow2_req *req);
  void (*cow_done) (struct qcow2_req *req);
  bool (*link) (struct qcow2_req *req);
};

/* ---- qcow2-rw.c: read and write segments ---- */

/* Reads: plan zeros for holes and merged reads for data.  Writes: plan
 * the mapping, claims, new clusters and COW reads; then the merged
 * head+data+tail writes (cow_done); then link the new clusters into the
 * L2 table (false while parked on the flush barrier).
 */
extern const struct seg_ops rw_read_ops, rw_write_ops;

/* ---- qcow2-zero.c: write-zeroes, discard and block status segments ---- */

/* Write-zeroes and discard: apply to the segment's L2 entries (or none
 * when it has no table); false while parked on the flush barrier.  Block
 * status: describe the segment; false while the backing image is asked
 * about a hole.
 */
extern const struct seg_ops zero_ops, zero_status_ops;

/* ---- qcow2-compress.c: compressed clusters ---- */

/* Host byte offset and size of the compressed data an L2 entry names. */
void compressed_extent (const struct qcow2 *q, uint64_t ent, uint64_t *offset,
                        uint64_t *size);
/* Queue the refcount decrements for dropping a compressed cluster. */
int compressed_release (struct qcow2 *q, uint64_t ent);
/* Decompress into out (one cluster).  Returns 0 or -EIO/-ENOTSUP. */
int compressed_decode (const struct qcow2 *q, const void *in, size_t inlen,
                       void *out);
/* How clusters are deflated.  QEMU inflates with a 4 KiB window: a longer
 * one would make the image unreadable there.  QEMU deflates at level 6
 * with memLevel 9; level 5 with memLevel 8 (a hash table that stays in
 * cache) took 27% less CPU on a 1 GiB mix of binaries, text and random
 * data (bench/mixed-data.py) for a file 0.23% larger; memLevel 8 alone
 * made it no larger and saved 12%.  Level 4 (still lazy matching, shorter
 * chains) ingests that mix 13% faster again for 0.7% more than level 5:
 * 504 MiB against QEMU's 507-509 (qnbd packs clusters tighter, and stores
 * random ones raw).  Level 3 (greedy matching) is 2.8% larger than level
 * 5 and doubles small repetitive clusters.
 */
#define QCOW2_DEFLATE_WINDOW_BITS 12
#define QCOW2_DEFLATE_LEVEL 4
#define QCOW2_DEFLATE_MEMLEVEL 8
/* Compress one cluster into out (cap bytes) with the image's compression
 * type.  Returns the size, or 0 when it does not fit in cap.  Touches no
 * engine state: runs on the I/O backend's worker threads.
 */
size_t compressed_encode (const struct qcow2 *q, const void *in, void *out,
                          size_t cap);

/* ---- qcow2-overlap.c: refuse writes that would hit other metadata ---- */

enum meta_kind {
  META_DATA,                    /* a guest data cluster */
  META_L1,
  META_L2,
  META_REFTABLE,
  META_REFBLOCK,
};

/* 0, or -EIO after marking the image corrupt when [off, off+len) overlaps
 * metadata that a write of this kind must never touch.
 */
int overlap_check (struct qcow2 *q, enum meta_kind kind, uint64_t off,
                   uint64_t len);
/* The sorted offsets of the active L2 tables, as L1 names them. */
struct overlap_l2_set {
  uint64_t *v;
  size_t n, cap;
};
/* Build the set from L1 (open).  0 or -ENOMEM. */
int overlap_l2_rebuild (struct qcow2 *q);
/* Room for one more table, so that overlap_l2_replace cannot fail. */
int overlap_l2_reserve (struct qcow2 *q);
/* L1 now names table new where it named old (0: none). */
void overlap_l2_replace (struct qcow2 *q, uint64_t old, uint64_t new);
void overlap_free (struct qcow2 *q);

/* ---- qcow2-snapshot.c: the internal snapshot table ---- */

struct snapshot {
  uint64_t l1_offset;
  uint32_t l1_size;
  uint64_t disk_size;
  char *id, *name;
  /* What qnbd-img info lists. */
  uint32_t date_sec, date_nsec;
  uint64_t vm_clock_nsec;
  uint64_t vm_state_size;
  uint64_t icount;              /* UINT64_MAX: not recorded */
};

/* Read the snapshot table (open time, synchronous).  Returns 0 or -errno
 * with a reason in err.
 */
int snapshot_table_read (struct qcow2 *q, struct snapshot **out, unsigned *n,
                         char *err, size_t errlen);
void snapshot_table_free (struct snapshot *s, unsigned n);
/* Make the snapshot named or numbered which the image's contents. */
int snapshot_load (struct qcow2 *q, const char *which, char *err,
                   size_t errlen);

/* ---- qcow2-refs.c: every reference to every cluster counted ---- */

struct l2ref;

/* A count in progress.  The caller sets q, c (n zeroed counters, which
 * must cover the file and one cluster past it when lenient), file_size,
 * err and errlen; lenient, report, progress and opaque as it needs.
 */
struct refs {
  struct qcow2 *q;
  uint32_t *c;                  /* references per cluster (saturating) */
  uint64_t n;                   /* clusters covered by c */
  uint64_t file_size;           /* references must lie below this */
  bool lenient;                 /* report problems and go on (check) */
  uint64_t corruptions;         /* lenient: problems reported */
  void (*report) (void *opaque, const char *msg);
  void (*progress) (void *opaque, uint64_t done, uint64_t total);
  void *opaque;
  char *err;
  size_t errlen;
  struct l2ref *l2;             /* every L1 entry in use, of every L1 table */
  size_t nl2, capl2;
  uint32_t walk;                /* which L1 table is being walked */
};

/* Count every reference but the refcount structures' own.  0, or -errno
 * with a reason in k->err.
 */
int refs_count (struct refs *k);
/* Count times references to every cluster of [off, off+len). */
int refs_mark (struct refs *k, uint64_t off, uint64_t len, uint32_t times,
               const char *what);
/* Lenient: one problem found, counted and reported. */
void refs_problem (struct refs *k, const char *fmt, ...)
  __attribute__ ((format (printf, 2, 3)));

/* ---- qcow2-repair.c: refcounts of an image left dirty ---- */

/* Count every reference and write a new refcount structure (synchronous).
 * Strict (at open): a reference that cannot be right fails the repair;
 * lenient (qnbd-img check -r all): it is left out, uncounted.  Returns 0
 * or -errno with a reason in err.
 */
int repair_refcounts (struct qcow2 *q, bool lenient, char *err,
                      size_t errlen);

/* ---- qcow2-cwrite.c: compressed writes through a packing cache ---- */

/* Compress one cluster of data into out (cluster_size bytes).  Returns the
 * compressed size, or 0 when it does not shrink by a sector at least.
 * Touches nothing of q but its geometry: safe on a worker thread.
 */
size_t cw_compress (const struct qcow2 *q, const void *in, void *out);
/* Pack n bytes of compressed cluster into the cache (loop thread).
 * Returns 0 with the L2 descriptor in *desc, or -errno.
 */
int cw_pack (struct qcow2 *q, const void *cdata, size_t n, uint64_t *desc);
/* Copy [start, start+len) from the cache if it is there. */
bool cw_lookup (struct qcow2 *q, uint64_t start, uint64_t len, void *dst);
/* Flusher: write the open runs' data not on disk yet.  *started says how
 * many writes were started (each completes through q->flush_io_done),
 * also when it returns -errno for one that could not be.  Returns 0 or
 * -errno.
 */
int cw_flush_start (struct qcow2 *q, unsigned *started);
/* Flusher, when a run starts: queue the decrements of the packing buffers'
 * own references that are no longer needed.
 */
void cw_retire (struct qcow2 *q);
/* Whether references cw_retire has still to hand to a flush are left. */
bool cw_retired_owed (const struct qcow2 *q);
/* Close, before the final flush: nothing more is packed; that flush drops
 * the open buffer's own reference.
 */
void cw_close (struct qcow2 *q);
/* Close, after that flush: the clusters at the end of the file an open
 * run never used are not kept (space_trim cuts them).
 */
void cw_close_trim (struct qcow2 *q);
/* Whether clusters [offset, offset + count clusters) include one that a
 * packing buffer still holds (which must never be freed).
 */
bool cw_holds (const struct qcow2 *q, uint64_t offset, uint64_t count);
void cw_free (struct qcow2 *q);

/* ---- qcow2-dcache.c: the last compressed clusters read, decompressed ---- */

struct dcache_entry {
  uint64_t coff, csize;         /* the compressed bytes: offset, size */
  char *data;                   /* the cluster, decompressed */
  uint64_t used;                /* tick of the last use (LRU) */
};

struct dcache {
  struct dcache_entry *v;       /* allocated at the first fill */
  unsigned n;
  uint64_t tick;
  uint64_t gen;                 /* bumped by each dcache_clear */
  uint64_t hits, misses;        /* for the tests */
};

/* The cluster whose compressed bytes are [coff, coff + csize), if kept;
 * valid until the loop runs anything else.
 */
const char *dcache_lookup (struct qcow2 *q, uint64_t coff, uint64_t csize);
/* Taken when a decompression is planned, given back to dcache_fill. */
uint64_t dcache_generation (const struct qcow2 *q);
/* Keep data (one cluster, malloc'd; the cache owns it now) unless a clear
 * came after gen.
 */
void dcache_fill (struct qcow2 *q, uint64_t coff, uint64_t csize,
                  uint64_t gen, char *data);
/* Before freed clusters may be allocated again: forget everything. */
void dcache_clear (struct qcow2 *q);
void dcache_free (struct qcow2 *q);

/* ---- qcow2-header.c: header parse/validate and header field writes ---- */

/* Fill q's header fields from buf (the header cluster, len bytes) and
 * validate them against file_size.  Returns 0, or -errno with a reason in
 * err.
 */
int header_parse (struct qcow2 *q, const void *buf, size_t len,
                  uint64_t file_size, char *err, size_t errlen);
/* Write the in-memory first sector of the header (q->header_sector, with
 * fields already patched) and fdatasync: open time and emergencies only
 * (the flusher writes it asynchronously).  0 or -errno.
 */
int header_write_sync (struct qcow2 *q);
/* The header cluster (len bytes) of a new image from q's header fields,
 * its backing format and data file names, and backing_name (or NULL).
 * 0, or -EINVAL with a reason in err when it does not fit.
 */
int header_build (const struct qcow2 *q, const char *backing_name, void *buf,
                  size_t len, char *err, size_t errlen);
/* Set or clear the dirty bit in the header, durably (synchronous). */
int header_set_dirty (struct qcow2 *q, bool dirty);
/* Open-time bounds: what is read at open must lie in the file, so that a
 * small file cannot make open read, allocate or write much.  Each returns
 * 0, or -EINVAL with "WHAT offset 0x... is past the end of the file (size
 * N)" in err.  header_in_file: all of [off, off+len); header_l1_in_file:
 * every L2 table an L1 table names starts inside the file.
 */
int header_in_file (const char *what, uint64_t off, uint64_t len,
                    uint64_t file_size, char *err, size_t errlen);
int header_l1_in_file (const char *what, const uint64_t *l1, uint32_t n,
                       uint64_t file_size, char *err, size_t errlen);

/* ---- qcow2-info.c: a header described ---- */

/* name as an image at path finds it: relative to path's directory.
 * Allocated (free it); NULL when out of memory.
 */
char *info_beside (const char *path, const char *name);

/* ---- qcow2-lock.c: image locks shared with QEMU ---- */

enum image_lock_mode {
  IMAGE_LOCK_READ,              /* reading; refuse writers */
  IMAGE_LOCK_WRITE,             /* writing; refuse writers and readers
                                   that refuse writers */
  IMAGE_LOCK_SHARE_ALL,         /* reading; refuse nobody (force-share) */
};

/* Lock fd (the file what names, for messages) as QEMU does for such an
 * open.  Returns 0; -EBUSY when another process's locks conflict, with
 * "WHAT is in use by another process (... lock)" in err; or -errno.  A
 * file system without locks is served with a warning.  The locks go away
 * with the descriptor.
 */
int lock_image (struct qcow2 *q, int fd, enum image_lock_mode mode,
                const char *what, char *err, size_t errlen);

/* ---- qcow2-engine.c: entry points and the request loop ---- */

/* Whether a request of q's chain is runnable or has a callback to run
 * (close drains until none has).
 */
bool engine_has_work (const struct qcow2 *q);

/* ---- qcow2-raw.c: raw images ---- */

/* Run a request on a raw image until it blocks or finishes. */
void raw_run (struct qcow2_req *req);

/* ---- qcow2-open.c: open and close ---- */



/* ---- qcow2-hostfile.c: the host files a chain opens ---- */

/* What a file is to the chain: it decides which checks apply. */
enum hostfile_kind {
  HOSTFILE_IMAGE,               /* the image the caller named */
  HOSTFILE_BACKING,             /* a backing file the header names */
  HOSTFILE_DATA,                /* an external data file the header names */
};

/* Open path for the chain of top (flags as for open(2)): refuse what the
 * backing policy forbids, anything but a regular file (without blocking on
 * a FIFO), and a file already open in the chain.  At depth 0 (top itself,
 * HOSTFILE_IMAGE) this also sets up the chain's policy from opts.
 * Returns the descriptor, or -errno with a reason (without path) in err.
 */
int hostfile_open (struct qcow2 *top, const struct qcow2_opts *opts,
                   enum hostfile_kind kind, const char *path, int flags,
                   char *err, size_t errlen);
/* Free what hostfile_open kept in top. */
void hostfile_free (struct qcow2 *top);

/* ---- the image ---- */

struct qcow2 {
  int fd;
  char *path;
  bool raw;                     /* a raw file: no mapping at all */
  int dfd;                      /* data clusters: fd, or an external data
                                   file (guest offset = its offset) */
  char *data_file;              /* external data file name, or NULL */
  bool data_file_raw;           /* the data file reads as the disk: zeroes
                                   and discards zero it too */
  struct qcow2 *backing;        /* read-only, shares aio; NULL if none */
  struct qcow2 *top;            /* the image the caller opened */
  struct hostfiles *hostfiles;  /* top only: the chain's policy and files
                                   (qcow2-hostfile.c) */
  unsigned depth;               /* 0 for the top image */
  char backing_fmt[16];         /* from the header extension, or "" */
  bool read_only;
  unsigned char lock_mode;      /* enum image_lock_mode of fd and dfd */
  bool direct;
  unsigned char fd_inline;      /* enum aio_inline for fd ... */
  unsigned char dfd_inline;     /* ... and for dfd */
  bool broken;                  /* corruption seen: refuse writes */
  struct aio *aio;
  bool own_aio;
  qcow2_log_fn *log;
  void *log_opaque;

  /* Header fields. */
  uint32_t version;
  uint32_t cluster_bits;
  uint32_t cluster_size;
  uint64_t size;
  uint32_t l1_size;
  uint64_t l1_offset;
  uint64_t reftable_offset;
  uint32_t reftable_clusters;
  uint32_t nb_snapshots;
  uint64_t snapshots_offset;
  uint64_t incompat, compat, autoclear;
  uint32_t refcount_order;
  uint32_t header_length;
  uint8_t compression_type;     /* 0 zlib, 1 zstd */
  uint64_t backing_size_bytes;  /* virtual size of the backing image */
  uint64_t snapshots_bytes;     /* size of the snapshot table */
  bool lazy;                    /* lazy refcounts: dirty bit set while open */
  bool compress;                /* whole-cluster writes stored compressed */
  struct cw_buf *cw_cur;        /* run of clusters being packed */
  struct cw_buf *cw_tail;       /* an older run with room left, or NULL */
  struct cw_buf *cw_sealed;     /* full runs being written */
  unsigned cw_inflight;         /* sealed runs not yet written */
  struct extent_list cw_retired; /* buffers' own references to drop */
  bool cw_closed;               /* closing: nothing more is packed */
  uint64_t cw_unused[2];        /* closing: [from, to) unused clusters of
                                   an open run at the end of the file */
  struct waitq cw_waiters;      /* the flusher, waiting for those */
  uint64_t backing_offset;
  uint32_t backing_size;
  void *header_sector;          /* first 512 bytes of the file, aligned */

  /* Derived. */
  uint32_t l2_bits;             /* log2 of entries per cached L2 slice */
  uint32_t l1_shift;            /* log2 of the guest bytes an L1 entry maps */
  uint32_t l2_slice_bytes;      /* an L2 slice: 4 KiB, or the cluster */
  bool extl2;                   /* 128-bit L2 entries with subclusters */
  uint32_t sc_bits;             /* log2 of the subcluster size */
  uint32_t sc_size;             /* cluster_size / 32, or cluster_size */
  uint32_t l2_entries;          /* per slice */
  uint32_t refcount_bits;       /* 1 << refcount_order */
  uint32_t rb_bits;             /* log2 of entries per refcount block */
  uint64_t refcount_max;

  /* L1 table, big-endian, in an aligned buffer. */
  uint64_t *l1;
  struct overlap_l2_set l2_tables;  /* the tables L1 names, sorted */
  size_t l1_buf_bytes;
  int64_t l1_dirty_lo, l1_dirty_hi;  /* dirty index range, -1 if clean */

  /* Refcount table, big-endian, in an aligned buffer. */
  uint64_t *reftable;
  uint64_t reftable_entries;
  uint64_t reftable_used;       /* entries up to the last non-zero one */
  bool reftable_dirty;          /* entries changed (written in place) */
  bool reftable_moved;          /* a new, larger table awaits its header */
  uint64_t old_reftable_offset;
  uint32_t old_reftable_clusters;

  uint64_t alloc_end;           /* next free host offset (cluster aligned) */
  uint64_t file_end;            /* reserved up to here (qcow2-space.c) */
  uint64_t rb_scanned;          /* refcount blocks looked at for headroom */
  uint64_t rb_missing;          /* ... and how many of them were missing */
  unsigned exact_grows;         /* grow by exactly what is needed */
  bool no_fallocate;            /* nothing can be reserved here */
  bool refcounts_untrusted;     /* counted past the end: rebuild at open */
  struct extent_list incs;      /* refcount +1 owed at the next flush */
  struct extent_list decs;      /* refcount -1 owed after L2/L1 are durable */
  struct extent_list free_clusters;  /* refcount 0 on disk: reusable */
  uint64_t free_largest;        /* no free extent is longer than this */

  struct cache l2c;             /* L2 tables */
  struct cache rbc;             /* refcount blocks */
  struct dcache dcache;         /* compressed clusters, decompressed */
  void *zero_cluster;           /* one cluster of zeros, never written */

  /* Requests. */
  unsigned in_flight;           /* accepted, callback not yet run */
  struct waitq runnable;        /* ready to advance */
  struct waitq completed;       /* finished; callbacks not yet run */
  struct flusher *flusher;
  /* Set by the flusher (qcow2-flush.c) for the layers below it: a write it
   * counted has ended; req must wait for a flush to end (a dirty victim).
   */
  void (*flush_io_done) (struct qcow2 *q, int64_t ret);
  void (*flush_request) (struct qcow2 *q, struct qcow2_req *req);
  /* Top image only: steps (segments run, callbacks delivered) left to the
   * current qcow2_process call, and whether one is running.
   */
  unsigned run_budget;
  bool in_process;
  /* Top image only: the caller's notice for work ready on its own thread
   * (qcow2_set_ready_notify), and whether it was given since the last
   * qcow2_process.
   */
  void (*ready_fn) (void *arg);
  void *ready_arg;
  bool ready_notified;
  size_t mem_held;              /* top image only: qcow2_mem_held */
};

static inline uint64_t
l2_get (const struct cache_entry *e, uint32_t i)
{
  return be64toh (((const uint64_t *) e->buf)[(size_t) i
                                             << e->cache->entry_shift]);
}

static inline void
l2_set (struct cache_entry *e, uint32_t i, uint64_t v)
{
  ((uint64_t *) e->buf)[(size_t) i << e->cache->entry_shift] = htobe64 (v);
}

/* The subcluster bitmap of entry i (0 when entries have none). */
static inline uint64_t
l2_get_bitmap (const struct cache_entry *e, uint32_t i)
{
  if (!e->cache->entry_shift)
    return 0;
  return be64toh (((const uint64_t *) e->buf)[2 * (size_t) i + 1]);
}

static inline void
l2_set_bitmap (struct cache_entry *e, uint32_t i, uint64_t v)
{
  if (e->cache->entry_shift)
    ((uint64_t *) e->buf)[2 * (size_t) i + 1] = htobe64 (v);
}

/* Big-endian fields of on-disk structures, at any alignment. */
static inline uint16_t
get_be16 (const uint8_t *p)
{
  uint16_t v;
  memcpy (&v, p, 2);
  return be16toh (v);
}

static inline uint32_t
get_be32 (const uint8_t *p)
{
  uint32_t v;
  memcpy (&v, p, 4);
  return be32toh (v);
}

static inline uint64_t
get_be64 (const uint8_t *p)
{
  uint64_t v;
  memcpy (&v, p, 8);
  return be64toh (v);
}

static inline void
put_be32 (uint8_t *p, uint32_t v)
{
  v = htobe32 (v);
  memcpy (p, &v, 4);
}

static inline void
put_be64 (uint8_t *p, uint64_t v)
{
  v = htobe64 (v);
  memcpy (p, &v, 8);
}

/* The index, in its L2 slice, of the entry that maps guest byte off. */
static inline uint32_t
l2_index (const struct qcow2 *q, uint64_t off)
{
  return (uint32_t) (off >> q->cluster_bits) & (q->l2_entries - 1);
}

/* The alignment requests must have: a sector with O_DIRECT. */
static inline uint32_t
image_min_align (const struct qcow2 *q)
{
  return q->direct ? SECTOR : 1;
}

static inline uint64_t
round_up (uint64_t v, uint64_t a)
{
  return (v + a - 1) / a * a;
}

#endif /* QNBD_QCOW2_INTERNAL_H */
