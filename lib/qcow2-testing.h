/* lib/qcow2-testing.h: hooks for the tests, never used by the daemon.
 *
 * The unit tests see the engine through qcow2.h and this file only, so
 * that the engine's internals can move without editing them.
 */
#ifndef QNBD_QCOW2_TESTING_H
#define QNBD_QCOW2_TESTING_H

#include <stdbool.h>
#include <stdint.h>

struct qcow2;
struct qcow2_cache_budget;

/* Make the nth call from now (1: the next) of the engine's extent-list
 * append fail with -ENOMEM, as under memory pressure; 0: none.
 */
void qcow2_testing_fail_extent_add (unsigned nth);

/* While refuse is true, the automatic choice of I/O backend acts as if the
 * kernel refused io_uring (its fallback to threads runs everywhere).
 */
void qcow2_testing_refuse_uring (bool refuse);

/* The next allocation that reuses a freed cluster finds it overlapping
 * metadata (as a corrupt image could make it): the image is marked
 * corrupt and that write fails with EIO.
 */
void qcow2_testing_overlap_next_reuse (void);

/* What an offset of the image file holds, as the engine's tables say now,
 * so that a test can tell which metadata an op it recorded wrote.
 */
enum qcow2_testing_region {
  QCOW2_TESTING_HEADER,         /* the first cluster */
  QCOW2_TESTING_L1,             /* the L1 table */
  QCOW2_TESTING_REFTABLE,       /* the refcount table's clusters */
  QCOW2_TESTING_L2,             /* any byte of an L2 table L1 points to
                                   (they are written in slices) */
  QCOW2_TESTING_REFBLOCK,       /* the first byte of a refcount block the
                                   refcount table points to (they are
                                   written whole) */
  QCOW2_TESTING_OTHER,          /* data clusters, free space */
};
enum qcow2_testing_region qcow2_testing_classify (const struct qcow2 *q,
                                                  uint64_t offset);

/* The descriptor of the image file itself (not of a backing file or an
 * external data file), as the I/O backend sees it in its ops.
 */
int qcow2_testing_image_fd (const struct qcow2 *q);

/* The highest qcow2_cache_budget_used of b since it was made. */
uint64_t qcow2_testing_budget_peak (const struct qcow2_cache_budget *b);

/* Bytes the metadata caches of q (not of its backing files) hold now:
 * their tables and each one's bookkeeping, as a budget counts them.
 */
uint64_t qcow2_testing_cache_bytes (const struct qcow2 *q);

/* Reads of compressed clusters q's decompressed-cluster cache answered
 * (hits) and did not (misses) since q was opened.
 */
void qcow2_testing_dcache_counts (const struct qcow2 *q, uint64_t *hits,
                                  uint64_t *misses);

#endif /* QNBD_QCOW2_TESTING_H */
