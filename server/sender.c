/* server/sender.c: a second thread that writes replies for the loop.
 *
 * Why: with many connections each holding a few requests (16 clients at
 * queue depth 4), every loop iteration ends with a sendmsg per
 * connection, each waking its client: 38% of the loop's CPU time went
 * there, and on a machine whose cores the clients themselves keep busy
 * one thread gets one thread's share of them (docs/architecture.md,
 * "The server").  conn.c hands this thread a job per connection (the
 * socket and an iovec array over replies it keeps queued and untouched)
 * and goes on reading and running the engine while the replies go out.
 *
 * Jobs are staged on the loop and handed over together (sender_flush),
 * and handed back together, so the lock is taken once per batch each
 * way: taken per job, its contention cost five futex calls per loop
 * iteration.
 *
 * The thread only calls sendmsg: the replies, the connection and every
 * other piece of state stay the loop's.  A job is the loop's again once
 * its done function has run on the loop (through an ev_async), or once
 * sender_cancel returned (a connection dying while its job is out, which
 * must not close the socket, nor free the replies, under the thread).
 */
#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <assert.h>
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <string.h>
#include <sys/socket.h>

#include "internal.h"

static struct ev_loop *sender_loop;
static sender_done_fn *sender_done;
static pthread_t thread;
static bool started, failed;
static ev_async done_async;

/* Both lists are FIFO, under lock.  A job is on pending from submit until
 * the thread takes it, on done from its sendmsg until the loop (or a
 * cancel) takes it back.
 */
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t pending_cv = PTHREAD_COND_INITIALIZER;  /* pending, stop */
static pthread_cond_t done_cv = PTHREAD_COND_INITIALIZER;  /* a job done */
static struct send_job *pending_head, **pending_tail = &pending_head;
static struct send_job *done_head, **done_tail = &done_head;
static bool stopping;

/* Jobs submitted since the last sender_flush: the loop's alone. */
static struct send_job *staged_head, **staged_tail = &staged_head;

static void
push (struct send_job ***tail, struct send_job *j)
{
  j->next = NULL;
  **tail = j;
  *tail = &j->next;
}

/* Remove j from the list at head (it is there), keeping tail right. */
static void
unlink_job (struct send_job **head, struct send_job ***tail,
            struct send_job *j)
{
  struct send_job **p = head;

  while (*p != j) {
    assert (*p != NULL);
    p = &(*p)->next;
  }
  *p = j->next;
  if (*tail == &j->next)
    *tail = p;
  j->next = NULL;
}

static void *
sender_main (void *arg)
{
  (void) arg;
  pthread_mutex_lock (&lock);
  for (;;) {
    struct send_job *batch;

    while (pending_head == NULL && !stopping)
      pthread_cond_wait (&pending_cv, &lock);
    if (pending_head == NULL)
      break;
    /* Take every job waiting: one wake-up of the loop for all. */
    batch = pending_head;
    pending_head = NULL;
    pending_tail = &pending_head;
    for (struct send_job *j = batch; j; j = j->next)
      j->state = SEND_RUNNING;
    pthread_mutex_unlock (&lock);

    for (struct send_job *j = batch; j; j = j->next) {
      struct msghdr msg = { .msg_iov = j->iov, .msg_iovlen = j->niov };
      ssize_t n;

      do
        n = sendmsg (j->fd, &msg, MSG_NOSIGNAL);
      while (n < 0 && errno == EINTR);
      j->result = n < 0 ? -errno : n;
    }
    /* The whole batch handed back at once: the lock is taken once. */
    pthread_mutex_lock (&lock);
    for (struct send_job *j = batch, *next; j; j = next) {
      next = j->next;
      j->state = SEND_DONE;
      push (&done_tail, j);
    }
    pthread_cond_broadcast (&done_cv);
    pthread_mutex_unlock (&lock);
    ev_async_send (sender_loop, &done_async);
    pthread_mutex_lock (&lock);
  }
  pthread_mutex_unlock (&lock);
  return NULL;
}

/* On the loop: hand the finished jobs back, one at a time: a done
 * function may end another connection, which takes its job back with
 * sender_cancel, so none is held outside the list meanwhile.
 */
static void
done_cb (struct ev_loop *l, ev_async *w, int revents)
{
  (void) l; (void) w; (void) revents;
  for (;;) {
    struct send_job *j;

    pthread_mutex_lock (&lock);
    j = done_head;
    if (j) {
      unlink_job (&done_head, &done_tail, j);
      j->state = SEND_IDLE;
    }
    pthread_mutex_unlock (&lock);
    if (j == NULL)
      return;
    sender_done (j);            /* may free j's connection */
  }
}

void
sender_init (struct ev_loop *l, sender_done_fn *done)
{
  sender_loop = l;
  sender_done = done;
}

/* Start the thread at its first use: a server with one client never
 * has it.  Returns whether it runs.
 */
static bool
sender_start (void)
{
  sigset_t all, old;
  int r;

  if (started || failed)
    return started;
  assert (sender_loop != NULL);         /* sender_init was called */
  ev_async_init (&done_async, done_cb);
  ev_async_start (sender_loop, &done_async);
  /* Signals are the loop's (libev's handlers): none for this thread. */
  sigfillset (&all);
  pthread_sigmask (SIG_BLOCK, &all, &old);
  r = pthread_create (&thread, NULL, sender_main, NULL);
  pthread_sigmask (SIG_SETMASK, &old, NULL);
  if (r == 0)
    pthread_setname_np (thread, "qnbd-reply");  /* for ps, and the tests */
  if (r != 0) {
    log_warning ("reply thread: %s: replies are written by the loop",
                 strerror (r));
    ev_async_stop (sender_loop, &done_async);
    failed = true;
    return false;
  }
  /* Jobs finished before the loop last looked wake nobody otherwise. */
  ev_unref (sender_loop);
  started = true;
  return true;
}

bool
sender_submit (struct send_job *j)
{
  assert (j->state == SEND_IDLE);
  assert (j->fd >= 0 && j->niov > 0);
  if (!sender_start ())
    return false;
  j->state = SEND_STAGED;
  push (&staged_tail, j);
  return true;
}

void
sender_flush (void)
{
  if (staged_head == NULL)
    return;
  pthread_mutex_lock (&lock);
  /* The thread waits only for an empty list: one wake-up per batch. */
  if (pending_head == NULL)
    pthread_cond_signal (&pending_cv);
  for (struct send_job *j = staged_head; j; j = j->next)
    j->state = SEND_QUEUED;
  *pending_tail = staged_head;
  pending_tail = staged_tail;
  pthread_mutex_unlock (&lock);
  staged_head = NULL;
  staged_tail = &staged_head;
}

void
sender_cancel (struct send_job *j)
{
  if (j->state == SEND_STAGED) {
    unlink_job (&staged_head, &staged_tail, j);
    j->state = SEND_IDLE;
    return;
  }
  pthread_mutex_lock (&lock);
  switch (j->state) {
  case SEND_IDLE:
  case SEND_STAGED:             /* not under the lock: handled above */
    break;
  case SEND_QUEUED:
    unlink_job (&pending_head, &pending_tail, j);
    break;
  case SEND_RUNNING:
    /* One non-blocking sendmsg: the wait is short. */
    while (j->state == SEND_RUNNING)
      pthread_cond_wait (&done_cv, &lock);
    /* fall through */
  case SEND_DONE:
    unlink_job (&done_head, &done_tail, j);
    break;
  }
  j->state = SEND_IDLE;
  pthread_mutex_unlock (&lock);
}

void
sender_stop (void)
{
  if (!started)
    return;
  pthread_mutex_lock (&lock);
  stopping = true;
  pthread_cond_signal (&pending_cv);
  pthread_mutex_unlock (&lock);
  pthread_join (thread, NULL);
  ev_ref (sender_loop);
  ev_async_stop (sender_loop, &done_async);
  started = false;
  assert (staged_head == NULL && pending_head == NULL && done_head == NULL);
}
