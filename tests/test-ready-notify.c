/* tests/test-ready-notify.c: qcow2_set_ready_notify, the engine's way of
 * telling a loop about work finished on the loop's own thread without the
 * eventfd (the server serves a read from memory with no eventfd write, no
 * extra poll and no read of the counter).
 *
 * Work ready outside qcow2_process calls the notice once until the next
 * qcow2_process, and leaves the descriptor unreadable; work made ready
 * inside qcow2_process (by a callback) uses the descriptor, so that a loop
 * polls its other descriptors before running it; taking the notice away
 * with work announced but not run makes the descriptor readable.
 */
#include <config.h>

#include <poll.h>
#include <string.h>
#include <sys/statfs.h>
#include <unistd.h>
#include <linux/magic.h>

#include "testlib.h"

#define MIB (1024u * 1024u)

static int notices;

static void
count_notice (void *arg)
{
  int *n = arg;
  (*n)++;
}

static bool
fd_readable (struct qcow2 *q)
{
  struct pollfd p = { .fd = qcow2_fd (q), .events = POLLIN };
  return poll (&p, 1, 0) == 1 && (p.revents & POLLIN);
}

struct rd {
  struct qcow2 *q;
  int ret;                      /* 1 until done */
  char buf[4096];
  struct rd *then;              /* read submitted from done, or NULL */
};

static void
rd_done (void *opaque, int ret)
{
  struct rd *r = opaque;

  r->ret = ret;
  if (r->then)
    CHECK (qcow2_read (r->q, 0, r->then->buf, sizeof r->then->buf, rd_done,
                       r->then) == 0, "read from a callback");
}

static struct qcow2 *
fresh_image (const char *name)
{
  char *path = make_image (name, "cluster_size=65536", 16 * MIB);
  struct qcow2 *q = open_image (path, NULL, false);
  free (path);
  return q;
}

/* A read of a hole needs no I/O: it is ready at once. */
static void
case_hole (const void *arg)
{
  struct qcow2 *q = fresh_image ("hole.qcow2");
  struct rd a = { .q = q, .ret = 1 }, b = { .q = q, .ret = 1 };

  (void) arg;
  notices = 0;
  qcow2_set_ready_notify (q, count_notice, &notices);
  CHECK (qcow2_read (q, 0, a.buf, sizeof a.buf, rd_done, &a) == 0, "read");
  CHECK (notices == 1, "notices %d", notices);
  CHECK (qcow2_read (q, MIB, b.buf, sizeof b.buf, rd_done, &b) == 0, "read");
  CHECK (notices == 1, "one notice until processed: %d", notices);
  CHECK (!fd_readable (q), "descriptor readable");
  CHECK (a.ret == 1 && b.ret == 1, "callback from inside submit");
  qcow2_process (q);
  CHECK (a.ret == 0 && b.ret == 0, "not delivered: %d %d", a.ret, b.ret);
  CHECK (!fd_readable (q), "descriptor readable after");
  /* The next one is announced again. */
  a.ret = 1;
  CHECK (qcow2_read (q, 0, a.buf, sizeof a.buf, rd_done, &a) == 0, "read");
  CHECK (notices == 2, "notices %d", notices);
  qcow2_process (q);
  CHECK (a.ret == 0, "not delivered");
  qcow2_set_ready_notify (q, NULL, NULL);
  qcow2_close (q);
}

/* An image on tmpfs with 64 KiB of 0x5a at 0, where every op is done
 * inline (at submit), or NULL when /dev/shm is not tmpfs.
 */
static char *
tmpfs_image (const char *name)
{
  struct statfs sf;
  char *path = NULL;

  if (statfs ("/dev/shm", &sf) != 0 || sf.f_type != TMPFS_MAGIC) {
    printf ("# /dev/shm is not tmpfs here: inline reads not covered\n");
    return NULL;
  }
  if (asprintf (&path, "/dev/shm/qnbd-test-ready-%d-%s", (int) getpid (),
                name) < 0)
    exit (1);
  CHECK (shell ("qemu-img create -q -f qcow2 %s 16M && "
                "qemu-io -f qcow2 -c 'write -P 0x5a 0 64k' %s > /dev/null",
                path, path) == 0, "qemu-img");
  return path;
}

/* Data in memory is copied at submit: ready at once. */
static void
case_inline_read (const void *arg)
{
  char *path = tmpfs_image ("inline.qcow2");
  struct qcow2 *q;
  struct rd a = { .ret = 1 };
  char data[4096];

  (void) arg;
  if (!path)
    return;
  q = open_image (path, NULL, false);
  a.q = q;
  notices = 0;
  /* Warm the L2 cache: the read below then needs the data read only. */
  CHECK (sync_read (q, 8192, data, sizeof data) == 0, "warm-up read");
  qcow2_set_ready_notify (q, count_notice, &notices);
  CHECK (qcow2_read (q, 0, a.buf, sizeof a.buf, rd_done, &a) == 0, "read");
  CHECK (notices == 1, "notices %d", notices);
  CHECK (!fd_readable (q), "descriptor readable");
  qcow2_process (q);
  CHECK (a.ret == 0, "not delivered: %d", a.ret);
  memset (data, 0x5a, sizeof data);
  CHECK (memcmp (a.buf, data, sizeof data) == 0, "data");
  qcow2_set_ready_notify (q, NULL, NULL);
  qcow2_close (q);
  unlink (path);
  free (path);
}

/* A read a callback submits inside qcow2_process is copied at once too,
 * but announced through the descriptor: the loop must get round to its
 * other descriptors before it runs that read's callback.
 */
static void
case_from_callback (const void *arg)
{
  char *path = tmpfs_image ("callback.qcow2");
  struct qcow2 *q;
  struct rd b = { .ret = 1 };
  struct rd a = { .ret = 1, .then = &b };
  char data[4096];

  (void) arg;
  if (!path)
    return;
  q = open_image (path, NULL, false);
  a.q = b.q = q;
  CHECK (sync_read (q, 8192, data, sizeof data) == 0, "warm-up read");
  notices = 0;
  qcow2_set_ready_notify (q, count_notice, &notices);
  CHECK (qcow2_read (q, 0, a.buf, sizeof a.buf, rd_done, &a) == 0, "read");
  CHECK (notices == 1, "notices %d", notices);
  qcow2_process (q);
  CHECK (a.ret == 0, "first not delivered");
  CHECK (b.ret == 1, "second delivered in the same round");
  CHECK (notices == 1, "notice from inside qcow2_process");
  CHECK (fd_readable (q), "work left and descriptor not readable");
  qcow2_process (q);
  CHECK (b.ret == 0, "second not delivered: %d", b.ret);
  CHECK (!fd_readable (q), "descriptor readable after");
  qcow2_set_ready_notify (q, NULL, NULL);
  qcow2_close (q);
  unlink (path);
  free (path);
}

/* Taking the notice away must not lose work it announced. */
static void
case_unset (const void *arg)
{
  struct qcow2 *q = fresh_image ("unset.qcow2");
  struct rd a = { .q = q, .ret = 1 };

  (void) arg;
  notices = 0;
  qcow2_set_ready_notify (q, count_notice, &notices);
  CHECK (qcow2_read (q, 0, a.buf, sizeof a.buf, rd_done, &a) == 0, "read");
  CHECK (notices == 1 && !fd_readable (q), "notice");
  qcow2_set_ready_notify (q, NULL, NULL);
  CHECK (fd_readable (q), "announced work dropped");
  qcow2_process (q);
  CHECK (a.ret == 0, "not delivered");
  /* Without a notice, the descriptor as before. */
  a.ret = 1;
  CHECK (qcow2_read (q, 0, a.buf, sizeof a.buf, rd_done, &a) == 0, "read");
  CHECK (notices == 1 && fd_readable (q), "descriptor not readable");
  qcow2_process (q);
  CHECK (a.ret == 0, "not delivered");
  qcow2_close (q);
}

static const struct test_case cases[] = {
  { "hole", case_hole, NULL },
  { "inline-read", case_inline_read, NULL },
  { "from-callback", case_from_callback, NULL },
  { "unset", case_unset, NULL },
};

int
main (int argc, char **argv)
{
  require_qemu_img ();
  return run_cases (argc, argv, cases, sizeof cases / sizeof cases[0]);
}
