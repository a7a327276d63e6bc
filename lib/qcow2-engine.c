/* lib/qcow2-engine.c: the engine's entry points (every public request
 * call), and the loop that runs requests and delivers their completions.
 *
 * A request runs its state machine (the table at the top of
 * qcow2-segment.c) until it blocks, finishes, or yields its turn; the
 * state that plans a segment's I/O, and the steps after it, belong to the
 * request type's segment handler (struct seg_ops).
 */
#include <config.h>

#include <assert.h>
#include <errno.h>
#include <stdlib.h>

#include "qcow2-internal.h"

/* Work done per qcow2_process call, so that one client's large request
 * cannot hold up the loop (a 4 GiB CACHE of holes needs no I/O, so its
 * segments and chained callbacks would otherwise all run in one call):
 * at most RUN_BUDGET steps (a request run, a segment started, a callback
 * delivered), then the eventfd is kicked and the loop serves its other
 * watchers before coming back.  One run of a request does at most
 * RUN_SLICE segments before going to the back of the runnable list.
 */
#define RUN_BUDGET 512u
#define RUN_SLICE 4u

static void
spend (struct qcow2 *q)
{
  if (q->top->run_budget > 0)
    q->top->run_budget--;
}

/* Whether req, about to start another segment, should yield first: it
 * has used its slice, or the call's budget is spent.  The first segment
 * of a run always goes on, so every run makes progress.
 */
static bool
should_yield (const struct qcow2_req *req, unsigned segs)
{
  return segs > 0 && (segs >= RUN_SLICE || req->q->top->run_budget == 0)
    && !req->err && req->seg_off + req->seg_len < req->offset + req->len;
}

/* The segment handler of a request type (none: a client flush, which
 * goes straight to RS_FUA).
 */
static const struct seg_ops *
seg_ops_of (enum req_type type)
{
  switch (type) {
  case REQ_READ: return &rw_read_ops;
  case REQ_WRITE: return &rw_write_ops;
  case REQ_ZERO: case REQ_DISCARD: return &zero_ops;
  case REQ_STATUS: return &zero_status_ops;
  default: return NULL;
  }
}

/* End a failed request once none of its I/O is in flight.  Returns false
 * while its children still point at it.
 */
static bool
end_failed (struct qcow2_req *req)
{
  seg_release (req);
  if (req->children) {
    req->state = RS_CHILDREN;
    return false;
  }
  req->state = RS_DONE;
  return true;
}

/* Run req's state machine (the table in qcow2-segment.c) until it blocks,
 * finishes or yields its turn.
 */
static void
run_segments (struct qcow2_req *req)
{
  struct qcow2 *q = req->q;
  const struct seg_ops *ops = seg_ops_of (req->type);
  bool go = true;
  unsigned segs = 0;

  while (go) {
    if (req->err && req->outstanding == 0 && req->state != RS_DONE
        && !end_failed (req))
      return;
    switch ((enum req_state) req->state) {
    case RS_SEGMENT:
      if (should_yield (req, segs)) {
        waitq_push (&q->runnable, req);
        return;
      }
      go = seg_next (req);
      if (req->state == RS_GET_L2) {
        segs++;
        spend (q);
      }
      break;
    case RS_GET_L2: go = seg_get_l2 (req); break;
    case RS_WAIT_DEPS: go = seg_wait_claims (req); break;
    case RS_PLAN:
      assert (ops);
      go = ops->plan (req);
      break;
    case RS_CHILDREN:
      if (req->children)
        return;
      req->state = RS_SEGMENT;
      break;
    case RS_COW_READ:
      if (req->outstanding)
        return;
      assert (ops && ops->cow_done);
      if (!req->err)
        ops->cow_done (req);
      req->state = RS_IO;
      go = req->outstanding == 0;
      break;
    case RS_IO:
      if (req->outstanding)
        return;
      if (ops->link)
        req->state = RS_LINK;
      else {
        seg_release (req);
        req->state = RS_SEGMENT;
      }
      break;
    case RS_LINK: go = ops->link (req); break;
    case RS_FUA:
      req->state = RS_FUA_DONE;
      flush_wait (q, req);
      return;
    case RS_FUA_DONE:
      req->state = RS_DONE;
      break;
    case RS_DONE:
      waitq_push (&q->completed, req);
      return;
    }
  }
}

/* Run req until it blocks, finishes or yields its turn. */
static void
req_run (struct qcow2_req *req)
{
  if (req->run)
    req->run (req);             /* not a guest request: the flusher */
  else if (req->q->raw)
    raw_run (req);
  else
    run_segments (req);
}

/* One pass over every image of the chain.  A backing image's requests are
 * children of its parent's, so the whole chain is run together.  Returns
 * true if anything moved.
 */
static bool
chain_step (struct qcow2 *top, bool deliver)
{
  bool moved = false;
  for (struct qcow2 *b = top; b; b = b->backing) {
    struct qcow2_req *r;
    while (top->run_budget > 0 && (r = waitq_pop (&b->runnable))) {
      spend (top);
      req_run (r);
      moved = true;
    }
    while (deliver && top->run_budget > 0
           && (r = waitq_pop (&b->completed))) {
      spend (top);
      b->in_flight--;
      r->done (r->opaque, r->err);
      free (r);
      moved = true;
    }
  }
  return moved;
}

/* Tell the caller that qcow2_process has work without a syscall: through
 * its notice when it gave one, else through the eventfd.  Inside
 * qcow2_process always the eventfd, so that work left over when the run
 * budget ran out waits for the loop to have polled its other descriptors.
 */
static void
engine_kick (struct qcow2 *top)
{
  if (!top->ready_fn || top->in_process) {
    aio_kick_once (top->aio);
    return;
  }
  if (top->ready_notified)
    return;
  top->ready_notified = true;
  top->ready_fn (top->ready_arg);
}

static void
inline_ready (void *arg)
{
  engine_kick (arg);
}

void
qcow2_set_ready_notify (struct qcow2 *q, void (*fn) (void *arg), void *arg)
{
  struct qcow2 *top = q->top;

  assert (top == q);
  top->ready_fn = fn;
  top->ready_arg = arg;
  aio_set_inline_ready (top->aio, fn ? inline_ready : NULL, top);
  /* A notice given to the previous owner may not have been acted on. */
  if (top->ready_notified) {
    top->ready_notified = false;
    aio_kick_once (top->aio);
  }
}

bool
engine_has_work (const struct qcow2 *q)
{
  for (const struct qcow2 *b = q->top; b; b = b->backing)
    if (b->runnable.head || b->completed.head)
      return true;
  return false;
}

/* Advance runnable requests and deliver completions until nothing moves
 * or RUN_BUDGET steps are done; then kick the eventfd if work is left.
 */
static void
run_all (struct qcow2 *q)
{
  struct qcow2 *top = q->top;

  top->run_budget = RUN_BUDGET;
  while (chain_step (top, true))
    ;
  if (engine_has_work (top))
    aio_kick_once (top->aio);
}

/* Advance whatever became runnable, but keep completions for the loop. */
static void
run_pending (struct qcow2 *q)
{
  struct qcow2 *top = q->top;

  /* Inside qcow2_process (a callback submitting more), the outer loop
   * runs what became ready, within its budget.
   */
  if (top->in_process)
    return;
  top->run_budget = RUN_BUDGET;
  while (chain_step (top, false))
    ;
  aio_commit (top->aio);
  if (engine_has_work (top))
    engine_kick (top);
}

static void
req_start (struct qcow2_req *req)
{
  req->q->in_flight++;
  req_run (req);
  run_pending (req->q);
}

static int
submit (struct qcow2 *q, enum req_type type, uint64_t offset, void *buf,
        size_t len, unsigned flags, qcow2_done_fn *done, void *opaque)
{
  int err;
  struct qcow2_req *req = req_new (q, type, offset, len, buf, flags, done,
                                   opaque, &err);
  if (!req)
    return err;
  /* Run the first steps now; completions are still only delivered from
   * qcow2_process, so wake the loop if anything became ready.
   */
  req_start (req);
  return 0;
}

int
qcow2_read (struct qcow2 *q, uint64_t offset, void *buf, size_t len,
            qcow2_done_fn *done, void *opaque)
{
  return submit (q, REQ_READ, offset, buf, len, 0, done, opaque);
}

int
qcow2_read_map (struct qcow2 *q, uint64_t offset, void *buf, size_t len,
                struct qcow2_extent *map, unsigned max, unsigned *n,
                qcow2_done_fn *done, void *opaque)
{
  int err;
  struct qcow2_req *req;

  if (max == 0)
    return -EINVAL;
  req = req_new (q, REQ_READ, offset, len, buf, 0, done, opaque, &err);
  if (!req)
    return err;
  *n = 0;
  req->ext = map;
  req->ext_max = max;
  req->ext_n = n;
  req_start (req);
  return 0;
}

int
qcow2_write (struct qcow2 *q, uint64_t offset, const void *buf, size_t len,
             unsigned flags, qcow2_done_fn *done, void *opaque)
{
  /* The engine never writes into the caller's buffer on the write path. */
  return submit (q, REQ_WRITE, offset, (void *) buf, len, flags, done,
                 opaque);
}

int
qcow2_flush (struct qcow2 *q, qcow2_done_fn *done, void *opaque)
{
  if (q->read_only) {
    /* Nothing to make durable; still answer asynchronously. */
    struct qcow2_req *req = calloc (1, sizeof *req);
    if (!req)
      return -ENOMEM;
    req->q = q;
    req->type = REQ_FLUSH;
    req->done = done;
    req->opaque = opaque;
    q->in_flight++;
    waitq_push (&q->completed, req);
    engine_kick (q->top);
    return 0;
  }
  return submit (q, REQ_FLUSH, 0, NULL, 0, 0, done, opaque);
}

size_t
qcow2_mem_held (const struct qcow2 *q)
{
  return q->top->mem_held;
}

void
qcow2_process (struct qcow2 *q)
{
  struct qcow2 *top = q->top;

  assert (!top->in_process);
  top->in_process = true;
  top->ready_notified = false;
  aio_reap (q->aio);
  run_all (q);
  aio_commit (q->aio);
  top->in_process = false;
}

/* Whether a fast write-zeroes could need to write data: then it must fail
 * before changing anything (NBD: contents unchanged on ENOTSUP).  Decided
 * from the request alone, so sometimes more cautious than needed.
 */
static bool
fast_zero_may_write (const struct qcow2 *q, uint64_t offset, uint64_t len,
                     unsigned flags)
{
  uint64_t cs = q->cluster_size;
  uint64_t end = offset + len;
  if (q->raw)
    return flags & QCOW2_ZERO_NO_HOLE;
  if ((offset & (cs - 1)) || ((end & (cs - 1)) && end != q->size))
    return true;                /* partial clusters are written as data */
  return q->version < 3 && (q->backing || (flags & QCOW2_ZERO_NO_HOLE));
}

int
qcow2_write_zeroes (struct qcow2 *q, uint64_t offset, uint64_t len,
                    unsigned flags, qcow2_done_fn *done, void *opaque)
{
  int err;
  struct qcow2_req *req;

  if ((flags & QCOW2_ZERO_FAST) && offset <= q->size
      && len <= q->size - offset && len
      && fast_zero_may_write (q, offset, len, flags))
    return -ENOTSUP;
  req = req_new (q, REQ_ZERO, offset, len, NULL, flags, done, opaque, &err);
  if (!req)
    return err;
  req_start (req);
  return 0;
}

int
qcow2_discard (struct qcow2 *q, uint64_t offset, uint64_t len,
               qcow2_done_fn *done, void *opaque)
{
  int err;
  struct qcow2_req *req = req_new (q, REQ_DISCARD, offset, len, NULL, 0,
                                   done, opaque, &err);
  if (!req)
    return err;
  req_start (req);
  return 0;
}

int
qcow2_block_status (struct qcow2 *q, uint64_t offset, uint64_t len,
                    struct qcow2_extent *ext, unsigned max, unsigned *n,
                    qcow2_done_fn *done, void *opaque)
{
  int err;
  struct qcow2_req *req;

  if (max == 0 || len == 0)
    return -EINVAL;
  req = req_new (q, REQ_STATUS, offset, len, NULL, 0, done, opaque, &err);
  if (!req)
    return err;
  *n = 0;
  req->ext = ext;
  req->ext_max = max;
  req->ext_n = n;
  req_start (req);
  return 0;
}
