/* lib/qcow2-testing.h: hooks for the tests, never used by the daemon. */
#ifndef QNBD_QCOW2_TESTING_H
#define QNBD_QCOW2_TESTING_H

/* Make the nth call from now (1: the next) of the engine's extent-list
 * append fail with -ENOMEM, as under memory pressure; 0: none.
 */
void qcow2_testing_fail_extent_add (unsigned nth);

#endif /* QNBD_QCOW2_TESTING_H */
