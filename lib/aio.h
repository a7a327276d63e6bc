/* lib/aio.h: asynchronous file I/O behind a small ops table.
 *
 * The qcow2 engine never blocks on file I/O: it fills a struct aio_op,
 * submits it, and is called back from aio_reap() when the kernel (io_uring),
 * a worker thread, or the test fake has finished it.  Every backend exposes
 * one file descriptor that becomes readable when completions are waiting, so
 * an event loop can watch it without knowing which backend is in use.
 */
#ifndef QNBD_AIO_H
#define QNBD_AIO_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

enum aio_op_type {
  AIO_READ,                     /* preadv of iov at offset */
  AIO_WRITE,                    /* pwritev of iov at offset */
  AIO_FSYNC,                    /* fdatasync of fd */
  AIO_PUNCH,                    /* deallocate [offset, offset+length): a hole
                                   punched, file size kept */
  AIO_CALL,                     /* run call (op) on a worker thread (CPU
                                   work that would hold up the loop); its
                                   return value is the result */
};

struct aio_op;

/* Whether an op may be done on the submitting thread, at once, instead of
 * by the backend.  Chosen per file by aio_inline_mode.
 */
enum aio_inline {
  AIO_INLINE_NONE,
  AIO_INLINE_NOWAIT,            /* reads: tried with RWF_NOWAIT, so page
                                   cache hits are copied at once */
  AIO_INLINE_ALL,               /* a file in memory (tmpfs): every op */
};

/* Completion callback.  ret is the number of bytes transferred (reads are
 * short only at end of file; writes are never short) or -errno.  Called only
 * from aio_reap(), never from aio_submit().
 */
typedef void aio_done_fn (struct aio_op *op, int64_t ret);

/* One request.  The caller owns the memory of the op and of iov, and keeps
 * both alive and unchanged until done is called.
 */
struct aio_op {
  enum aio_op_type type;
  int fd;
  const struct iovec *iov;      /* AIO_READ/AIO_WRITE only */
  int iovcnt;
  uint64_t offset;
  uint64_t length;              /* AIO_PUNCH only */
  /* AIO_CALL only.  Runs on another thread: it may touch only what the
   * op's owner handed over with it (no engine state), and must not block
   * for long.
   */
  int64_t (*call) (struct aio_op *op);
  aio_done_fn *done;
  void *opaque;                 /* for the caller */
  unsigned char inline_mode;    /* enum aio_inline (0: never inline) */

  /* Private to the backend. */
  struct aio_op *next;          /* backend queues */
  int64_t result;               /* filled by the backend before done */
  size_t transferred;           /* progress across short transfers */
  struct iovec *priv_iov;       /* backend's copy when resubmitting a remainder */
  int priv_iovcnt;
};

struct aio;

struct aio_ops {
  const char *name;
  /* Queue op.  0, or -errno (op not queued, done never called). */
  int (*submit) (struct aio *a, struct aio_op *op);
  /* Hand queued ops to the kernel/workers now (batching point). */
  void (*commit) (struct aio *a);
  /* Call done for every finished op; never blocks.  Returns the count. */
  int (*reap) (struct aio *a);
  /* Block until at least one op has finished (or none is pending). */
  void (*wait) (struct aio *a);
  void (*destroy) (struct aio *a);
};

/* Common part of every backend; backends embed it first. */
struct aio {
  const struct aio_ops *ops;
  int event_fd;                 /* eventfd: readable when reap has work */
  unsigned pending;             /* submitted, done not yet called */
  bool inline_ok;               /* real I/O backends: inline ops allowed */
  bool owner_kicked;            /* aio_kick_once since the last clear */
  /* An op went to the backend since the last clear (or was still in
   * flight then): its completion may have written event_fd.
   */
  bool backend_since_clear;
  bool raw_kicked;              /* aio_kick since the last reap (atomic:
                                   workers set it) */
  struct aio_op *inline_head, *inline_tail;  /* done inline, not reaped */
  unsigned inline_count;        /* ops on that list */
  /* Owner-thread notice that an op was done inline (aio_set_inline_ready),
   * or NULL: aio_kick_once.
   */
  void (*inline_ready) (void *arg);
  void *inline_ready_arg;
  struct aio_calls *calls;      /* io_uring: workers for AIO_CALL, or NULL
                                   until the first one (aio-calls.c) */
};

enum aio_kind {
  AIO_KIND_AUTO,                /* io_uring, else threads */
  AIO_KIND_URING,
  AIO_KIND_THREADS,
};

/* Create a backend.  AIO_KIND_AUTO falls back to threads when io_uring is
 * refused (ENOSYS, EPERM, seccomp).  Returns 0 or -errno.
 */
int aio_create (enum aio_kind kind, unsigned depth, struct aio **out);
int aio_uring_create (unsigned depth, struct aio **out);
int aio_threads_create (unsigned nthreads, struct aio **out);

/* Thin wrappers over the ops table.  aio_submit returns 0 or -errno. */
int aio_submit (struct aio *a, struct aio_op *op);
void aio_commit (struct aio *a);
int aio_reap (struct aio *a);
void aio_wait (struct aio *a);
void aio_destroy (struct aio *a);
const char *aio_name (const struct aio *a);

/* The descriptor to watch for readability. */
int aio_fd (const struct aio *a);

/* Make aio_fd() readable so that the owner's loop calls reap soon; used by
 * the engine for requests that finish without any I/O.
 */
void aio_kick (struct aio *a);

/* aio_kick, skipped when already done since the last aio_clear_kick.
 * Only for the thread that owns a (the one calling reap).
 */
void aio_kick_once (struct aio *a);

/* How ops on fd may be done inline: AIO_INLINE_ALL for tmpfs, whose reads
 * and writes are memory copies (io_uring would hand each to a worker
 * thread, as tmpfs refuses RWF_NOWAIT); AIO_INLINE_NOWAIT for other files
 * opened without O_DIRECT whose file system takes RWF_NOWAIT;
 * AIO_INLINE_NONE otherwise, or when QNBD_AIO_INLINE=0 is set.
 */
enum aio_inline aio_inline_mode (int fd, bool direct);

/* Instead of making aio_fd() readable when an op is done inline (so on
 * the owner's thread, inside aio_submit), call fn(arg) there; the owner
 * must then call aio_reap before it next sleeps.  fn NULL: the eventfd
 * again.  Saves the loop a write, a wake-up and a read per request
 * served from memory.
 */
void aio_set_inline_ready (struct aio *a, void (*fn) (void *arg), void *arg);

/* Drain the eventfd counter (aio_reap does, when it may be set). */
void aio_clear_kick (struct aio *a);

/* For backends (threads, fake): perform op now, on the calling thread, with
 * the full-transfer semantics promised to aio_done_fn: short transfers are
 * continued, EINTR is retried, and a read stops at end of file.  Touches no
 * field of op (but op->call may).  Returns the bytes transferred (0 for
 * AIO_FSYNC), what op->call returned (AIO_CALL), or -errno.
 */
int64_t aio_run_sync (const struct aio_op *op);

/* A backend without threads of its own (io_uring) hands AIO_CALL ops to a
 * small pool of workers (aio-calls.c), started at the first one.  submit
 * returns 0 or -errno; reap runs the done callbacks of the finished ones
 * (call it after aio_clear_kick: workers kick the eventfd) and returns
 * their count; wait blocks until one has finished and returns false at
 * once when none is in flight; destroy stops the workers (the owner has
 * drained).
 */
int aio_calls_submit (struct aio *a, struct aio_op *op);
int aio_calls_reap (struct aio *a);
bool aio_calls_wait (struct aio *a);
void aio_calls_destroy (struct aio *a);

#endif /* QNBD_AIO_H */
