/* lib/qcow2-testing.h: hooks for the tests, never used by the daemon. */
#ifndef QNBD_QCOW2_TESTING_H
#define QNBD_QCOW2_TESTING_H

#include <stdbool.h>

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

#endif /* QNBD_QCOW2_TESTING_H */
