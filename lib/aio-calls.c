/* lib/aio-calls.c: worker threads for AIO_CALL ops, for the io_uring
 * backend, which has no threads of its own (the kernel has no op that runs
 * our code).
 *
 * The engine hands CPU work that would hold up the loop (decompressing a
 * cluster, compressing one for --compress) to the backend as an op; here
 * one worker per online CPU (at most CALL_THREADS_MAX) runs it and puts it
 * on the done list, and the backend's reap runs the done callbacks
 * on the loop thread, like any I/O completion.  The pool starts at the
 * first call, so images that never need it cost no threads.
 */
#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <unistd.h>

#include "aio.h"

/* The work is CPU-bound: more workers than CPUs only take turns. */
#define CALL_THREADS_MAX 16

struct aio_calls {
  struct aio *a;                /* whose eventfd is kicked */
  pthread_t tids[CALL_THREADS_MAX];
  unsigned nthreads;
  unsigned in_flight;           /* loop thread only: submitted, not reaped */

  /* lock guards everything below; no callback runs under it. */
  pthread_mutex_t lock;
  pthread_cond_t work_cond;     /* workers: queue not empty, or stopping */
  pthread_cond_t done_cond;     /* aio_calls_wait: done list not empty */
  struct aio_op *queue_head, **queue_tail;  /* for the workers, in order */
  struct aio_op *done_head, **done_tail;    /* finished, result set */
  bool stopping;
};

static void
append (struct aio_op ***tail, struct aio_op *op)
{
  op->next = NULL;
  **tail = op;
  *tail = &op->next;
}

static void *
worker (void *arg)
{
  struct aio_calls *p = arg;

  pthread_mutex_lock (&p->lock);
  for (;;) {
    struct aio_op *op;
    bool was_empty;

    while (!p->queue_head && !p->stopping)
      pthread_cond_wait (&p->work_cond, &p->lock);
    if (p->stopping)
      break;
    op = p->queue_head;
    p->queue_head = op->next;
    if (!p->queue_head)
      p->queue_tail = &p->queue_head;
    pthread_mutex_unlock (&p->lock);

    op->result = op->call (op);

    pthread_mutex_lock (&p->lock);
    was_empty = !p->done_head;
    append (&p->done_tail, op);
    if (was_empty) {
      /* Reap clears the eventfd before it takes the list, so only the
       * first op on an empty list needs to kick (as in aio-threads.c).
       */
      pthread_cond_signal (&p->done_cond);
      pthread_mutex_unlock (&p->lock);
      aio_kick (p->a);
      pthread_mutex_lock (&p->lock);
    }
  }
  pthread_mutex_unlock (&p->lock);
  return NULL;
}

static int
start (struct aio *a)
{
  struct aio_calls *p = calloc (1, sizeof *p);
  sigset_t all, old;
  long cpus = sysconf (_SC_NPROCESSORS_ONLN);
  unsigned want = cpus < 1 ? 1
    : cpus > CALL_THREADS_MAX ? CALL_THREADS_MAX : (unsigned) cpus;
  int r = 0;

  if (!p)
    return -ENOMEM;
  p->a = a;
  p->queue_tail = &p->queue_head;
  p->done_tail = &p->done_head;
  pthread_mutex_init (&p->lock, NULL);
  pthread_cond_init (&p->work_cond, NULL);
  pthread_cond_init (&p->done_cond, NULL);
  /* Signals belong to the loop thread. */
  sigfillset (&all);
  pthread_sigmask (SIG_SETMASK, &all, &old);
  for (; p->nthreads < want; p->nthreads++) {
    r = -pthread_create (&p->tids[p->nthreads], NULL, worker, p);
    if (r < 0)
      break;
  }
  pthread_sigmask (SIG_SETMASK, &old, NULL);
  a->calls = p;
  if (p->nthreads == 0) {
    aio_calls_destroy (a);
    return r;
  }
  return 0;
}

int
aio_calls_submit (struct aio *a, struct aio_op *op)
{
  struct aio_calls *p;
  int r;

  if (!a->calls && (r = start (a)) < 0)
    return r;
  p = a->calls;
  pthread_mutex_lock (&p->lock);
  append (&p->queue_tail, op);
  pthread_cond_signal (&p->work_cond);
  pthread_mutex_unlock (&p->lock);
  p->in_flight++;
  return 0;
}

int
aio_calls_reap (struct aio *a)
{
  struct aio_calls *p = a->calls;
  struct aio_op *op, *next;
  int count = 0;

  if (!p || p->in_flight == 0)
    return 0;
  pthread_mutex_lock (&p->lock);
  op = p->done_head;
  p->done_head = NULL;
  p->done_tail = &p->done_head;
  pthread_mutex_unlock (&p->lock);
  for (; op; op = next) {
    next = op->next;            /* done may submit op again */
    p->in_flight--;
    a->pending--;
    op->done (op, op->result);
    count++;
  }
  return count;
}

bool
aio_calls_wait (struct aio *a)
{
  struct aio_calls *p = a->calls;

  if (!p || p->in_flight == 0)
    return false;
  pthread_mutex_lock (&p->lock);
  while (!p->done_head)
    pthread_cond_wait (&p->done_cond, &p->lock);
  pthread_mutex_unlock (&p->lock);
  return true;
}

void
aio_calls_destroy (struct aio *a)
{
  struct aio_calls *p = a->calls;

  if (!p)
    return;
  pthread_mutex_lock (&p->lock);
  p->stopping = true;
  pthread_cond_broadcast (&p->work_cond);
  pthread_mutex_unlock (&p->lock);
  for (unsigned i = 0; i < p->nthreads; i++)
    pthread_join (p->tids[i], NULL);
  pthread_cond_destroy (&p->done_cond);
  pthread_cond_destroy (&p->work_cond);
  pthread_mutex_destroy (&p->lock);
  free (p);
  a->calls = NULL;
}
