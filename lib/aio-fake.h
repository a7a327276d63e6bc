/* lib/aio-fake.h: a recording, controllable I/O backend for unit tests.
 *
 * It performs real pread/pwrite/fdatasync on the file, but only when the test
 * lets it: with hold on, submitted ops wait in a list until the test releases
 * them, in any order.  Every op is recorded (submission order, release order),
 * and errors can be injected, so tests can check concurrency, write ordering
 * and error handling of the engine.
 */
#ifndef QNBD_AIO_FAKE_H
#define QNBD_AIO_FAKE_H

#include "aio.h"

struct aio_fake_record {
  enum aio_op_type type;
  uint64_t offset;
  uint64_t length;              /* sum of iov lengths; 0 for fsync */
  unsigned submit_seq;          /* 0, 1, 2 ... in submission order */
  int completed_seq;            /* release order, -1 while held */
  int64_t result;
};

int aio_fake_create (struct aio **out);

/* With hold on, ops wait until released; with hold off (the default) each op
 * runs at commit time and completes at the next reap.  Turning hold off does
 * not release ops already held.
 */
void aio_fake_set_hold (struct aio *a, bool hold);

/* Number of ops held now. */
unsigned aio_fake_held (const struct aio *a);

/* Describe held op i (0 = oldest held).  Returns 0 or -ENOENT. */
int aio_fake_held_info (const struct aio *a, unsigned i,
                        struct aio_fake_record *rec);

/* Run held op i now; its completion is delivered by the next reap. */
int aio_fake_release (struct aio *a, unsigned i);

/* Run every held op, newest first when reverse is true. */
void aio_fake_release_all (struct aio *a, bool reverse);

/* Fail the next op of this type (after skip more of that type have run)
 * with -err instead of doing it.  err is a positive errno.
 */
void aio_fake_fail_next (struct aio *a, enum aio_op_type type,
                         unsigned skip, int err);

/* The log of every op submitted so far. */
const struct aio_fake_record *aio_fake_log (const struct aio *a, size_t *n);
void aio_fake_clear_log (struct aio *a);

#endif /* QNBD_AIO_FAKE_H */
