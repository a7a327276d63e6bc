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
 * not release ops already held, but aio_wait then runs the oldest held op
 * when nothing else has finished (so that qcow2_close can end).
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

/* Refuse the next submission of this type (after skip more of that type
 * were accepted): aio_submit returns -err at once, as a real backend does
 * when it cannot queue an op, and the op is neither run nor logged.
 * err is a positive errno.
 */
void aio_fake_refuse_submit (struct aio *a, enum aio_op_type type,
                             unsigned skip, int err);

/* The number of faults (fail_next, refuse_submit) that have not fired,
 * and forgetting them.
 */
unsigned aio_fake_faults_pending (const struct aio *a);
void aio_fake_clear_faults (struct aio *a);

/* The log of every op submitted so far. */
const struct aio_fake_record *aio_fake_log (const struct aio *a, size_t *n);
void aio_fake_clear_log (struct aio *a);

/* Crash simulation.  With data recording on (off by default), every write
 * that runs from now on keeps a copy of the bytes it wrote, taken when it
 * runs (so it is exactly what reached the file), for the crash simulator
 * of tests/crash-sim.h.  The copies live until the log is cleared or the
 * backend destroyed.  Punches and fsyncs need no data: their log records
 * (offset, length, completed_seq) say all.
 */
void aio_fake_record_data (struct aio *a, bool on);

/* The bytes written by log record i (record->length of them), or NULL when
 * it is not a write, has not run, failed, or ran with recording off.  When
 * fd is not NULL it receives the file descriptor of the op (the same for
 * every op of one image; another for a backing file or a data file), or -1
 * for a record of an op that has not run yet.  Valid until the next clear.
 */
const void *aio_fake_log_data (const struct aio *a, size_t i, int *fd);

/* The size of the op's file just after log record i ran (with data
 * recording on), or -1.  Files also change size outside the backend
 * (ftruncate); an fdatasync makes the size it finds durable, which is
 * what a crash simulator needs to know.
 */
int64_t aio_fake_log_file_size (const struct aio *a, size_t i);

/* The number of ops run so far (the completed_seq the next op to run will
 * get); since the last aio_fake_clear_log.  A test reads it when a request
 * completes to know which file state the completion may rely on.
 */
unsigned aio_fake_completed (const struct aio *a);

/* Complete held op i with -err without doing it (its completion is
 * delivered by the next reap), so that a test can fail exactly the op it
 * picked with aio_fake_held_info.  Returns 0 or -ENOENT.
 */
int aio_fake_fail_held (struct aio *a, unsigned i, int err);

#endif /* QNBD_AIO_FAKE_H */
