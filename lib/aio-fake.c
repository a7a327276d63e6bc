/* lib/aio-fake.c: the recording, controllable backend of aio-fake.h.
 *
 * This file owns the fake's queues, its log and its fault-injection rules.
 * Ops really happen (aio_run_sync on the op's fd), but only when the test
 * allows it, on the calling thread, so a test decides the order in which the
 * engine's I/O reaches the file and in which the engine hears about it.
 *
 * An op's life: submit puts it on the staged list (hold off) or the held
 * list (hold on); commit runs the staged ones, aio_fake_release* runs held
 * ones; running records the result and puts the op on the ready list and
 * kicks the eventfd; the next reap calls done.  done therefore never runs
 * inside submit, commit or release, exactly as with the real backends.
 *
 * Sequence numbers count from 0 and start again at aio_fake_clear_log, so
 * that a test can clear the log and then check absolute numbers.
 *
 * For crash simulation the fake can also keep the bytes of every write
 * (aio_fake_record_data): a side array parallel to the log holds, per
 * record, the descriptor the op ran on, a copy of what it wrote and the
 * size of the file, taken when it ran.
 */
#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <assert.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <unistd.h>

#include "aio-fake.h"

/* The record of an op submitted before the last aio_fake_clear_log. */
#define FAKE_NO_RECORD SIZE_MAX

/* A submitted op that has not run yet. */
struct fake_entry {
  struct aio_op *op;
  unsigned submit_seq;
  size_t rec;                   /* index in the log, or FAKE_NO_RECORD */
};

struct fake_rule {
  enum aio_op_type type;
  bool at_submit;               /* refuses a submission, not a run */
  unsigned skip;                /* ops of this type to let through first */
  int err;                      /* positive errno */
};

/* What the log keeps beside record i: filled when the op runs. */
struct fake_rdata {
  void *data;                   /* copy of the bytes written, or NULL */
  int fd;                       /* -1 until run */
  int64_t file_size;            /* after it ran (recording on), or -1 */
};

/* A growable array: data holds len elements of room for cap. */
struct fake_vec {
  void *data;
  size_t len;
  size_t cap;
};

struct fake {
  struct aio base;              /* first: a struct aio * is a struct fake * */
  bool hold;
  /* Submitted with hold off, run at the next commit, in submission order. */
  struct fake_vec staged;       /* of struct fake_entry */
  /* Submitted with hold on, in submission order; the test picks the order
   * in which they run.
   */
  struct fake_vec held;         /* of struct fake_entry */
  /* Run, done not yet called; reap calls done in run order. */
  struct aio_op *ready_head;
  struct aio_op **ready_tail;
  struct fake_vec log;          /* of struct aio_fake_record */
  /* Pending faults, oldest first.  An op is failed by at most one rule. */
  struct fake_vec rules;        /* of struct fake_rule */
  unsigned next_submit_seq;
  int next_completed_seq;
  bool record_data;             /* keep copies of written bytes */
  struct fake_vec rdata;        /* of struct fake_rdata, parallel to log */
};

static const struct aio_ops fake_ops;

static struct fake *
to_fake (struct aio *a)
{
  assert (a->ops == &fake_ops);
  return (struct fake *) a;
}

static const struct fake *
to_fake_const (const struct aio *a)
{
  assert (a->ops == &fake_ops);
  return (const struct fake *) a;
}

/* Make room for one more element.  Returns 0 or -ENOMEM. */
static int
fake_vec_reserve (struct fake_vec *v, size_t elem)
{
  size_t cap;
  void *p;

  if (v->len < v->cap)
    return 0;
  cap = v->cap ? v->cap * 2 : 16;
  p = realloc (v->data, cap * elem);
  if (!p)
    return -ENOMEM;
  v->data = p;
  v->cap = cap;
  return 0;
}

static uint64_t
iov_total (const struct aio_op *op)
{
  uint64_t total = 0;

  if (op->type == AIO_FSYNC)
    return 0;
  if (op->type == AIO_PUNCH)
    return op->length;
  for (int i = 0; i < op->iovcnt; i++)
    total += op->iov[i].iov_len;
  return total;
}

/* Returns -err if a rule fails this op (when it runs, or when it is
 * submitted if at_submit), else 0.  Every rule of the type and moment
 * that does not fire counts the op towards its skip.
 */
static int
fake_injected (struct fake *f, enum aio_op_type type, bool at_submit)
{
  struct fake_rule *rules = f->rules.data;
  int ret = 0;

  for (size_t i = 0; i < f->rules.len;) {
    if (rules[i].type != type || rules[i].at_submit != at_submit) {
      i++;
      continue;
    }
    if (ret == 0 && rules[i].skip == 0) {
      ret = -rules[i].err;
      memmove (&rules[i], &rules[i + 1],
               (f->rules.len - i - 1) * sizeof *rules);
      f->rules.len--;
      continue;
    }
    if (rules[i].skip > 0)
      rules[i].skip--;
    i++;
  }
  return ret;
}

/* A copy of the bytes op writes (its iov gathered), or NULL. */
static void *
copy_write_data (const struct aio_op *op)
{
  uint64_t total = iov_total (op), done = 0;
  char *p = malloc (total ? total : 1);

  if (!p)
    return NULL;
  for (int i = 0; i < op->iovcnt; i++) {
    memcpy (p + done, op->iov[i].iov_base, op->iov[i].iov_len);
    done += op->iov[i].iov_len;
  }
  return p;
}

/* Record the outcome ret of e and queue its completion. */
static void
fake_finish (struct fake *f, const struct fake_entry *e, int64_t ret)
{
  struct aio_op *op = e->op;

  op->result = ret;
  if (e->rec != FAKE_NO_RECORD) {
    struct aio_fake_record *rec = f->log.data;
    struct fake_rdata *rd = f->rdata.data;
    rec[e->rec].completed_seq = f->next_completed_seq;
    rec[e->rec].result = ret;
    rd[e->rec].fd = op->fd;
    /* A copy that cannot be made is reported as missing (NULL). */
    if (f->record_data && op->type == AIO_WRITE && ret >= 0)
      rd[e->rec].data = copy_write_data (op);
    if (f->record_data) {
      struct stat st;
      if (fstat (op->fd, &st) == 0)
        rd[e->rec].file_size = (int64_t) st.st_size;
    }
  }
  f->next_completed_seq++;

  op->next = NULL;
  *f->ready_tail = op;
  f->ready_tail = &op->next;
  aio_kick (&f->base);
}

static void
fake_run (struct fake *f, const struct fake_entry *e)
{
  int64_t ret = fake_injected (f, e->op->type, false);

  if (ret == 0)
    ret = aio_run_sync (e->op);
  fake_finish (f, e, ret);
}

static int
fake_submit (struct aio *a, struct aio_op *op)
{
  struct fake *f = to_fake (a);
  struct fake_vec *q = f->hold ? &f->held : &f->staged;
  struct aio_fake_record *rec;
  struct fake_entry *e;
  int r = fake_injected (f, op->type, true);

  if (r < 0)
    return r;
  /* Reserve both before changing anything, so that -ENOMEM leaves no
   * trace, as the contract of submit requires.
   */
  if (fake_vec_reserve (&f->log, sizeof *rec) < 0
      || fake_vec_reserve (&f->rdata, sizeof (struct fake_rdata)) < 0
      || fake_vec_reserve (q, sizeof *e) < 0)
    return -ENOMEM;

  op->next = NULL;
  op->result = 0;
  op->transferred = 0;
  op->priv_iov = NULL;
  op->priv_iovcnt = 0;

  rec = (struct aio_fake_record *) f->log.data + f->log.len;
  rec->type = op->type;
  rec->offset = op->type == AIO_FSYNC ? 0 : op->offset;
  rec->length = iov_total (op);
  rec->submit_seq = f->next_submit_seq;
  rec->completed_seq = -1;
  rec->result = 0;
  /* rdata grows with the log, so that rdata.len == log.len always. */
  ((struct fake_rdata *) f->rdata.data)[f->rdata.len].data = NULL;
  ((struct fake_rdata *) f->rdata.data)[f->rdata.len].fd = -1;
  ((struct fake_rdata *) f->rdata.data)[f->rdata.len].file_size = -1;
  f->rdata.len++;

  e = (struct fake_entry *) q->data + q->len++;
  e->op = op;
  e->submit_seq = f->next_submit_seq++;
  e->rec = f->log.len++;
  return 0;
}

static void
fake_commit (struct aio *a)
{
  struct fake *f = to_fake (a);
  struct fake_entry *staged = f->staged.data;

  /* fake_run never calls back into the engine, so staged cannot grow
   * while we walk it.
   */
  for (size_t i = 0; i < f->staged.len; i++)
    fake_run (f, &staged[i]);
  f->staged.len = 0;
}

static int
fake_reap (struct aio *a)
{
  struct fake *f = to_fake (a);
  struct aio_op *op, *next;
  int count = 0;

  /* Take the whole list first: ops that done submits again must wait for
   * their own commit and reap, as they would with a real backend.
   */
  op = f->ready_head;
  f->ready_head = NULL;
  f->ready_tail = &f->ready_head;
  for (; op; op = next) {
    next = op->next;
    a->pending--;
    op->done (op, op->result);
    count++;
  }
  return count;
}

/* Held ops finish only when the test releases them, so waiting for them
 * would hang the test: run what is staged and return at once.  Once hold
 * is off, an op left held finishes when somebody waits, the oldest first,
 * as a slow one would on a real backend (qcow2_close waits).
 */
static void
fake_wait (struct aio *a)
{
  struct fake *f = to_fake (a);

  fake_commit (a);
  if (!f->hold && f->held.len > 0 && !f->ready_head)
    aio_fake_release (a, 0);
}

static void
free_rdata (struct fake *f)
{
  struct fake_rdata *rd = f->rdata.data;

  for (size_t i = 0; i < f->rdata.len; i++)
    free (rd[i].data);
  f->rdata.len = 0;
}

/* Held and staged ops are dropped without their done being called. */
static void
fake_destroy (struct aio *a)
{
  struct fake *f = to_fake (a);

  free_rdata (f);
  free (f->rdata.data);
  free (f->staged.data);
  free (f->held.data);
  free (f->log.data);
  free (f->rules.data);
  close (a->event_fd);
  free (f);
}

static const struct aio_ops fake_ops = {
  .name = "fake",
  .submit = fake_submit,
  .commit = fake_commit,
  .reap = fake_reap,
  .wait = fake_wait,
  .destroy = fake_destroy,
};

int
aio_fake_create (struct aio **out)
{
  struct fake *f;

  *out = NULL;
  f = calloc (1, sizeof *f);
  if (!f)
    return -ENOMEM;
  f->base.ops = &fake_ops;
  f->base.event_fd = eventfd (0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (f->base.event_fd == -1) {
    int r = -errno;
    free (f);
    return r;
  }
  f->ready_tail = &f->ready_head;
  *out = &f->base;
  return 0;
}

void
aio_fake_set_hold (struct aio *a, bool hold)
{
  to_fake (a)->hold = hold;
}

unsigned
aio_fake_held (const struct aio *a)
{
  return (unsigned) to_fake_const (a)->held.len;
}

int
aio_fake_held_info (const struct aio *a, unsigned i,
                    struct aio_fake_record *rec)
{
  const struct fake *f = to_fake_const (a);
  const struct fake_entry *e;

  if (i >= f->held.len)
    return -ENOENT;
  /* Built from the entry, not the log, which may have been cleared. */
  e = (const struct fake_entry *) f->held.data + i;
  rec->type = e->op->type;
  rec->offset = e->op->type == AIO_FSYNC ? 0 : e->op->offset;
  rec->length = iov_total (e->op);
  rec->submit_seq = e->submit_seq;
  rec->completed_seq = -1;
  rec->result = 0;
  return 0;
}

int
aio_fake_release (struct aio *a, unsigned i)
{
  struct fake *f = to_fake (a);
  struct fake_entry *held = f->held.data;
  struct fake_entry e;

  if (i >= f->held.len)
    return -ENOENT;
  e = held[i];
  memmove (&held[i], &held[i + 1], (f->held.len - i - 1) * sizeof *held);
  f->held.len--;
  fake_run (f, &e);
  return 0;
}

void
aio_fake_release_all (struct aio *a, bool reverse)
{
  struct fake *f = to_fake (a);
  struct fake_entry *held = f->held.data;
  size_t n = f->held.len;

  /* As in commit, running adds nothing to held. */
  for (size_t k = 0; k < n; k++)
    fake_run (f, &held[reverse ? n - 1 - k : k]);
  f->held.len = 0;
}

static void
add_rule (struct aio *a, enum aio_op_type type, bool at_submit,
          unsigned skip, int err)
{
  struct fake *f = to_fake (a);
  struct fake_rule *rule;

  /* The header gives no way to report ENOMEM here; a test that cannot
   * allocate 16 rules has bigger problems, and will see its fault missing.
   */
  if (fake_vec_reserve (&f->rules, sizeof *rule) < 0)
    return;
  rule = (struct fake_rule *) f->rules.data + f->rules.len++;
  rule->type = type;
  rule->at_submit = at_submit;
  rule->skip = skip;
  rule->err = err;
}

void
aio_fake_fail_next (struct aio *a, enum aio_op_type type,
                    unsigned skip, int err)
{
  add_rule (a, type, false, skip, err);
}

void
aio_fake_refuse_submit (struct aio *a, enum aio_op_type type,
                        unsigned skip, int err)
{
  add_rule (a, type, true, skip, err);
}

unsigned
aio_fake_faults_pending (const struct aio *a)
{
  return (unsigned) to_fake_const (a)->rules.len;
}

void
aio_fake_clear_faults (struct aio *a)
{
  to_fake (a)->rules.len = 0;
}

/* The pointer stays valid until the next submit or clear. */
const struct aio_fake_record *
aio_fake_log (const struct aio *a, size_t *n)
{
  const struct fake *f = to_fake_const (a);

  *n = f->log.len;
  return f->log.data;
}

void
aio_fake_clear_log (struct aio *a)
{
  struct fake *f = to_fake (a);
  struct fake_entry *held = f->held.data;
  struct fake_entry *staged = f->staged.data;

  /* Ops not run yet lose their record; they still run and complete. */
  for (size_t i = 0; i < f->held.len; i++)
    held[i].rec = FAKE_NO_RECORD;
  for (size_t i = 0; i < f->staged.len; i++)
    staged[i].rec = FAKE_NO_RECORD;
  f->log.len = 0;
  free_rdata (f);
  f->next_submit_seq = 0;
  f->next_completed_seq = 0;
}

void
aio_fake_record_data (struct aio *a, bool on)
{
  to_fake (a)->record_data = on;
}

const void *
aio_fake_log_data (const struct aio *a, size_t i, int *fd)
{
  const struct fake *f = to_fake_const (a);
  const struct fake_rdata *rd = f->rdata.data;

  if (i >= f->rdata.len) {
    if (fd)
      *fd = -1;
    return NULL;
  }
  if (fd)
    *fd = rd[i].fd;
  return rd[i].data;
}

int64_t
aio_fake_log_file_size (const struct aio *a, size_t i)
{
  const struct fake *f = to_fake_const (a);

  if (i >= f->rdata.len)
    return -1;
  return ((const struct fake_rdata *) f->rdata.data)[i].file_size;
}

unsigned
aio_fake_completed (const struct aio *a)
{
  return (unsigned) to_fake_const (a)->next_completed_seq;
}

int
aio_fake_fail_held (struct aio *a, unsigned i, int err)
{
  struct fake *f = to_fake (a);
  struct fake_entry *held = f->held.data;
  struct fake_entry e;

  if (i >= f->held.len)
    return -ENOENT;
  e = held[i];
  memmove (&held[i], &held[i + 1], (f->held.len - i - 1) * sizeof *held);
  f->held.len--;
  fake_finish (f, &e, -(int64_t) err);
  return 0;
}
