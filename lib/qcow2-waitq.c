/* lib/qcow2-waitq.c: the lists that park requests and make them runnable.
 *
 * A request waits for one thing at a time, on exactly one list; waking
 * moves it to its image's runnable list, which the engine's loop drains.
 * Nothing here runs a request, so any layer may park or wake one.
 */
#include <config.h>

#include <assert.h>

#include "qcow2-internal.h"

void
waitq_push (struct waitq *w, struct qcow2_req *req)
{
  /* A request waits for one thing at a time: on two lists, one of them
   * would lose it.
   */
  assert (!req->queued);
  req->queued = true;
  req->wait_next = NULL;
  if (w->tail)
    w->tail->wait_next = req;
  else
    w->head = req;
  w->tail = req;
}

struct qcow2_req *
waitq_pop (struct waitq *w)
{
  struct qcow2_req *r = w->head;
  if (r) {
    w->head = r->wait_next;
    if (!w->head)
      w->tail = NULL;
    r->wait_next = NULL;
    r->queued = false;
  }
  return r;
}

static void
waitq_append (struct waitq *dst, struct waitq *src)
{
  if (!src->head)
    return;
  if (dst->tail)
    dst->tail->wait_next = src->head;
  else
    dst->head = src->head;
  dst->tail = src->tail;
  src->head = src->tail = NULL;
}

void
waitq_wake_all (struct qcow2 *q, struct waitq *w)
{
  waitq_append (&q->runnable, w);
}

void
waitq_fail_all (struct qcow2 *q, struct waitq *w, int err)
{
  for (struct qcow2_req *r = w->head; r; r = r->wait_next)
    if (!r->err)
      r->err = err;
  waitq_append (&q->runnable, w);
}

void
waitq_wake (struct qcow2_req *req)
{
  waitq_push (&req->q->runnable, req);
}
