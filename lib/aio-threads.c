/* lib/aio-threads.c: the worker-thread backend, for where io_uring is
 * refused (old kernels, seccomp, io_uring_disabled).
 *
 * This file owns a small pool of threads that run ops with blocking
 * preadv/pwritev/fdatasync (aio_run_sync), and the three lists that carry
 * ops between the owner's loop thread and the workers.  Workers never call
 * done: they put the finished op on the done list and signal the eventfd,
 * and aio_reap() runs the callbacks on the loop thread, which is what lets
 * the engine keep its metadata lock-free.
 */
#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "aio.h"

#define THREADS_DEFAULT_COUNT 4

struct threads {
  struct aio base;              /* first: a struct aio * is a struct threads * */
  pthread_t *tids;
  unsigned nthreads;

  /* Loop thread only.  Ops submitted since the last commit, in order; commit
   * hands them to the workers in one lock round trip.
   */
  struct aio_op *staged_head;
  struct aio_op **staged_tail;

  /* Lock order: lock is the only lock, and no callback runs under it.
   * It guards everything below.
   */
  pthread_mutex_t lock;
  pthread_cond_t work_cond;     /* workers: queue not empty, or stopping */
  pthread_cond_t done_cond;     /* threads_wait: done list not empty */
  /* Ops for the workers, taken from the head; order matters only for
   * fairness, since in-flight ops never depend on each other.
   */
  struct aio_op *queue_head;
  struct aio_op **queue_tail;
  /* Finished ops with op->result set, in completion order. */
  struct aio_op *done_head;
  struct aio_op **done_tail;
  bool stopping;                /* set by destroy: workers exit */
};

static void
list_append (struct aio_op ***tail, struct aio_op *op)
{
  op->next = NULL;
  **tail = op;
  *tail = &op->next;
}

static void *
threads_worker (void *arg)
{
  struct threads *t = arg;

  pthread_mutex_lock (&t->lock);
  for (;;) {
    struct aio_op *op;
    bool was_empty;

    while (!t->queue_head && !t->stopping)
      pthread_cond_wait (&t->work_cond, &t->lock);
    if (t->stopping)
      break;
    op = t->queue_head;
    t->queue_head = op->next;
    if (!t->queue_head)
      t->queue_tail = &t->queue_head;
    pthread_mutex_unlock (&t->lock);

    op->result = aio_run_sync (op);

    pthread_mutex_lock (&t->lock);
    was_empty = !t->done_head;
    list_append (&t->done_tail, op);
    if (was_empty) {
      /* Only the first op on an empty list needs to wake anyone: reap
       * clears the eventfd before it takes the list, so every op added
       * later is either taken by that reap or finds the list empty and
       * signals again.
       */
      pthread_cond_signal (&t->done_cond);
      pthread_mutex_unlock (&t->lock);
      aio_kick (&t->base);
      pthread_mutex_lock (&t->lock);
    }
  }
  pthread_mutex_unlock (&t->lock);
  return NULL;
}

static int
threads_submit (struct aio *a, struct aio_op *op)
{
  struct threads *t = (struct threads *) a;

  op->result = 0;
  op->transferred = 0;
  op->priv_iov = NULL;
  op->priv_iovcnt = 0;
  list_append (&t->staged_tail, op);
  return 0;
}

static void
threads_commit (struct aio *a)
{
  struct threads *t = (struct threads *) a;
  unsigned n = 0;

  if (!t->staged_head)
    return;
  for (struct aio_op *op = t->staged_head; op && n < 2; op = op->next)
    n++;

  pthread_mutex_lock (&t->lock);
  *t->queue_tail = t->staged_head;
  t->queue_tail = t->staged_tail;
  if (n == 1)
    pthread_cond_signal (&t->work_cond);
  else
    pthread_cond_broadcast (&t->work_cond);
  pthread_mutex_unlock (&t->lock);

  t->staged_head = NULL;
  t->staged_tail = &t->staged_head;
}

static int
threads_reap (struct aio *a)
{
  struct threads *t = (struct threads *) a;
  struct aio_op *op, *next;
  int count = 0;

  pthread_mutex_lock (&t->lock);
  op = t->done_head;
  t->done_head = NULL;
  t->done_tail = &t->done_head;
  pthread_mutex_unlock (&t->lock);

  for (; op; op = next) {
    /* done may submit op again, which rewrites op->next. */
    next = op->next;
    a->pending--;
    op->done (op, op->result);
    count++;
  }
  return count;
}

static void
threads_wait (struct aio *a)
{
  struct threads *t = (struct threads *) a;

  if (a->pending == 0)
    return;
  /* Staged ops would never finish: hand them over before sleeping. */
  threads_commit (a);
  pthread_mutex_lock (&t->lock);
  while (!t->done_head)
    pthread_cond_wait (&t->done_cond, &t->lock);
  pthread_mutex_unlock (&t->lock);
}

/* Stop and join the workers, then free everything.  The caller must have
 * drained first (pending == 0): an op a worker is running is finished before
 * the join returns, but ops still queued are dropped and no done callback of
 * an unfinished op is ever called.
 */
static void
threads_destroy (struct aio *a)
{
  struct threads *t = (struct threads *) a;

  pthread_mutex_lock (&t->lock);
  t->stopping = true;
  pthread_cond_broadcast (&t->work_cond);
  pthread_mutex_unlock (&t->lock);
  for (unsigned i = 0; i < t->nthreads; i++)
    pthread_join (t->tids[i], NULL);

  pthread_cond_destroy (&t->done_cond);
  pthread_cond_destroy (&t->work_cond);
  pthread_mutex_destroy (&t->lock);
  close (a->event_fd);
  free (t->tids);
  free (t);
}

static const struct aio_ops threads_ops = {
  .name = "threads",
  .submit = threads_submit,
  .commit = threads_commit,
  .reap = threads_reap,
  .wait = threads_wait,
  .destroy = threads_destroy,
};

int
aio_threads_create (unsigned nthreads, struct aio **out)
{
  struct threads *t;
  sigset_t all, old;
  int r = 0;

  *out = NULL;
  if (nthreads == 0)
    nthreads = THREADS_DEFAULT_COUNT;
  t = calloc (1, sizeof *t);
  if (!t)
    return -ENOMEM;
  t->tids = calloc (nthreads, sizeof *t->tids);
  if (!t->tids) {
    free (t);
    return -ENOMEM;
  }
  t->base.ops = &threads_ops;
  t->staged_tail = &t->staged_head;
  t->queue_tail = &t->queue_head;
  t->done_tail = &t->done_head;
  pthread_mutex_init (&t->lock, NULL);
  pthread_cond_init (&t->work_cond, NULL);
  pthread_cond_init (&t->done_cond, NULL);

  t->base.inline_ok = true;
  t->base.event_fd = eventfd (0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (t->base.event_fd == -1) {
    r = -errno;
    goto err;
  }

  /* Workers inherit the creator's signal mask.  Block everything in them so
   * that SIGTERM and friends reach the loop thread, which handles them.
   */
  sigfillset (&all);
  pthread_sigmask (SIG_SETMASK, &all, &old);
  for (; t->nthreads < nthreads; t->nthreads++) {
    r = -pthread_create (&t->tids[t->nthreads], NULL, threads_worker, t);
    if (r < 0)
      break;
  }
  pthread_sigmask (SIG_SETMASK, &old, NULL);
  if (r < 0) {
    /* Destroy joins the workers that did start and frees the rest. */
    threads_destroy (&t->base);
    return r;
  }

  *out = &t->base;
  return 0;

 err:
  pthread_cond_destroy (&t->done_cond);
  pthread_cond_destroy (&t->work_cond);
  pthread_mutex_destroy (&t->lock);
  free (t->tids);
  free (t);
  return r;
}
