/* server/conn.c: the lifetime of a client connection.
 *
 * A connection owns its socket, its read buffer and its output queue.  It
 * has one ev_io watcher; after every event conn_update_watchers() works out
 * what the watcher should wait for from the state of the buffers (room to
 * read, replies to write, the in-flight limits), so no code path has to
 * remember to re-arm it.
 *
 * States (enum conn_state):
 *
 *   CONN_GREETING --client flags--> CONN_HANDSHAKE --GO/EXPORT_NAME-->
 *   CONN_TRANSMISSION --DISC, EOF, SIGTERM and idle--> CONN_CLOSING
 *   --all replied--> CONN_DEAD --last engine callback--> freed
 *
 * A broken stream (bad magic, socket error, hostile client) goes straight
 * to CONN_DEAD, and so does a connection that has not reached
 * CONN_TRANSMISSION --handshake-limit seconds after it was accepted (its
 * handshake_timer): a client that connects and then says nothing, or
 * stops between options, would otherwise hold a descriptor, and a place
 * under --shared, for ever.  In transmission a connection may stay idle as
 * long as it likes, unless --idle-timeout says otherwise (its idle_timer):
 * with nothing in flight and no byte received nor reply written for that
 * long, it is closed like one that sent NBD_CMD_DISC.  A dead connection is freed only when no request of it
 * is still inside the engine: each such request holds a reference
 * (engine_refs), because its completion callback will still run.
 *
 * The connection does not know the protocol it carries: conn_init gives
 * it the protocol's start (the handshake's greeting), which sets c->step,
 * and process_input calls c->step for each message; the handshake sets
 * it to the transmission phase's step when it ends.  Waiting for memory
 * is memory.c's line (mem_wait), with conn_mem_wake as the callback.
 *
 * Bytes go through the socket directly, or through c->xport (a TLS
 * session of tls.c) once conn_start_transport's switch happened: after
 * the reply queued before it is written, with nothing read in between.
 * A transport that waits (EAGAIN) names what for in c->xport_wait, which
 * joins the watcher's interest; input it already holds is fed to the
 * watcher as a read event, since the socket will not announce it.
 *
 * Completion callbacks run inside qcow2_process(); they queue replies and
 * mark the connection pending.  conn_run_pending(), called by the loop
 * right after qcow2_process(), then writes each pending connection's
 * replies (many in one writev) and parses input the limits held back.
 */
#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <assert.h>
#include <errno.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include "internal.h"

/* Connections with replies to write after one run of the engine from
 * which the reply thread takes all but one (sender.c): a single client
 * gains nothing from the hand-over, and its latency would pay for it.
 */
#define HAND_OVER_MIN 2

/* Handshake replies queued and unread beyond which no more options are
 * parsed (a client that sends options without reading the answers).
 */
#define HANDSHAKE_MAX_OUTPUT (64u * 1024)

static struct ev_loop *conn_loop;       /* from conn_init */
static conn_start_fn *conn_start;       /* the protocol's start */
static void (*conn_freed) (void);       /* told of each connection freed */
static struct conn *conns;              /* every connection; order unused */
static unsigned nr_conns;
static unsigned last_id;
static unsigned handshake_limit = DEFAULT_HANDSHAKE_LIMIT; /* s, 0: none */
static unsigned idle_timeout;           /* s, 0: none */

/* Connections to run after the engine's completions.  LIFO: the order
 * does not matter, each is run once.
 */
static struct conn *pending_head;

static void conn_io_cb (struct ev_loop *l, ev_io *w, int revents);
static void handshake_timeout_cb (struct ev_loop *l, ev_timer *w,
                                  int revents);
static void idle_timeout_cb (struct ev_loop *l, ev_timer *w, int revents);
static void conn_step (struct conn *c);
static void conn_update_watchers (struct conn *c);
static void conn_mem_wake (struct mem_waiter *w);
static void conn_sent (struct send_job *j);

void
conn_init (struct ev_loop *l, conn_start_fn *start, void (*freed) (void))
{
  conn_loop = l;
  conn_start = start;
  conn_freed = freed;
  sender_init (l, conn_sent);
}

int
conn_new (int fd)
{
  struct conn *c;
  struct sockaddr_storage ss;
  socklen_t sslen = sizeof ss;

  c = calloc (1, sizeof *c);
  if (c == NULL || (c->rbuf = malloc (CONN_RBUF_SIZE)) == NULL) {
    log_error ("new connection: %m");
    free (c);
    close (fd);
    return -1;
  }
  mem_hold (CONN_RBUF_SIZE);
  c->id = ++last_id;
  c->fd = fd;
  c->state = CONN_GREETING;
  c->out_tail = &c->out_head;
  c->mem_wait.wake = conn_mem_wake;
  ev_io_init (&c->io, conn_io_cb, fd, 0);
  c->io.data = c;
  ev_timer_init (&c->handshake_timer, handshake_timeout_cb,
                 handshake_limit, 0.);
  c->handshake_timer.data = c;
  if (handshake_limit > 0)
    ev_timer_start (conn_loop, &c->handshake_timer);
  ev_timer_init (&c->idle_timer, idle_timeout_cb, idle_timeout, 0.);
  c->idle_timer.data = c;
  /* Unknown (family 0) if it fails: allow-address then refuses it. */
  if (getpeername (fd, (struct sockaddr *) &ss, &sslen) == 0)
    access_peer_from (&c->peer, (struct sockaddr *) &ss, sslen);

  c->next = conns;
  if (conns)
    conns->prev = c;
  conns = c;
  nr_conns++;
  log_info ("client %u: connected (%u connection%s)",
            c->id, nr_conns, nr_conns == 1 ? "" : "s");

  /* Send the greeting at once rather than after a loop iteration. */
  assert (conn_start != NULL);          /* conn_init was called */
  conn_start (c);
  assert (c->step != NULL);             /* the protocol's next step */
  conn_step (c);
  conn_update_watchers (c);
  return 0;
}

unsigned
conn_count (void)
{
  return nr_conns;
}

unsigned
conn_count_peer (const struct peer_addr *p)
{
  unsigned n = 0;

  for (struct conn *c = conns; c; c = c->next)
    if (access_peer_same (&c->peer, p))
      n++;
  return n;
}

void
conn_set_handshake_limit (unsigned seconds)
{
  handshake_limit = seconds;
}

void
conn_set_idle_timeout (unsigned seconds)
{
  idle_timeout = seconds;
}

void
conn_handshake_done (struct conn *c)
{
  assert (c->state != CONN_DEAD);
  if (ev_is_active (&c->handshake_timer))
    ev_timer_stop (conn_loop, &c->handshake_timer);
  if (idle_timeout > 0) {
    c->last_active = ev_now (conn_loop);
    ev_timer_set (&c->idle_timer, idle_timeout, 0.);
    ev_timer_start (conn_loop, &c->idle_timer);
  }
}

static void
conn_free (struct conn *c)
{
  assert (c->state == CONN_DEAD);
  assert (c->fd == -1);
  assert (c->engine_refs == 0);
  assert (c->in_flight == 0);
  assert (c->buffered == 0);
  assert (c->out_head == NULL);
  assert (c->rx_done == NULL);
  assert (!c->pending);
  assert (c->tx.state == SEND_IDLE);
  assert (!c->mem_wait.waiting);
  assert (!ev_is_active (&c->io));
  assert (!ev_is_active (&c->handshake_timer));
  assert (!ev_is_active (&c->idle_timer));

  if (c->prev)
    c->prev->next = c->next;
  else
    conns = c->next;
  if (c->next)
    c->next->prev = c->prev;
  nr_conns--;
  log_debug ("client %u: freed", c->id);
  if (c->exp)
    export_detach (c->exp);
  free (c->rbuf);
  free (c);
  mem_release (CONN_RBUF_SIZE);
  if (conn_freed)
    conn_freed ();
}

void
conn_forget_export (const struct export *e)
{
  struct export *now = NULL;
  bool looked = false;

  for (struct conn *c = conns; c; c = c->next) {
    assert (c->exp != e);
    if (c->meta_exp != e)
      continue;
    /* What the contexts were chosen for is a name (see
     * enter_transmission): keep it through the export serving it now.
     */
    if (!looked) {
      now = export_find (e->name, strlen (e->name));
      if (now && strcmp (now->name, e->name) != 0)
        now = NULL;             /* the default export, not this name */
      looked = true;
    }
    c->meta_exp = now;
  }
}

/* ------------------------------------------------------------------ */
/* Input.                                                              */
/* ------------------------------------------------------------------ */

bool
conn_has_room (const struct conn *c)
{
  return c->in_flight < CONN_MAX_IN_FLIGHT &&
    c->buffered < CONN_MAX_BUFFERED;
}

const unsigned char *
conn_input (const struct conn *c, size_t *len)
{
  *len = c->rend - c->rstart;
  return c->rbuf + c->rstart;
}

void
conn_consume (struct conn *c, size_t n)
{
  assert (n <= c->rend - c->rstart);
  c->rstart += n;
  if (c->rstart == c->rend)
    c->rstart = c->rend = 0;
}

void
conn_recv_payload (struct conn *c, void *buf, size_t len,
                   conn_payload_fn *done, void *opaque)
{
  assert (len > 0);
  assert (c->rx_done == NULL && c->rx_want == 0);
  c->rx_buf = buf;
  c->rx_want = len;
  c->rx_done = done;
  c->rx_opaque = opaque;
}

/* The payload is complete (ok), or will never be (!ok). */
static void
finish_payload (struct conn *c, bool ok)
{
  conn_payload_fn *done = c->rx_done;
  void *opaque = c->rx_opaque;

  assert (done != NULL);
  c->rx_buf = NULL;
  c->rx_want = 0;
  c->rx_done = NULL;
  c->rx_opaque = NULL;
  done (c, opaque, ok);
}

/* Should the socket be read now? */
static bool
want_read (const struct conn *c)
{
  /* Bytes after STARTTLS belong to the next transport. */
  if (c->xport_next)
    return false;
  switch (c->state) {
  case CONN_GREETING:
  case CONN_HANDSHAKE:
    return c->rend < CONN_RBUF_SIZE || c->rstart > 0;
  case CONN_TRANSMISSION:
    /* A payload in progress is always read: it is already paid for. */
    if (c->rx_want > 0)
      return true;
    return conn_has_room (c) && !c->mem_wait.waiting &&
      (c->rend < CONN_RBUF_SIZE || c->rstart > 0);
  case CONN_CLOSING:
  case CONN_DEAD:
    return false;
  }
  abort ();
}

/* The client has gone (end of file). */
static void
conn_eof (struct conn *c)
{
  if (c->rx_done) {
    log_info ("client %u: disconnected in the middle of a request", c->id);
    finish_payload (c, false);
  }
  else
    log_debug ("client %u: end of input", c->id);

  /* In transmission, what is in flight is still answered (the client may
   * only have shut down its sending side); otherwise there is nothing
   * worth finishing.
   */
  if (c->state == CONN_TRANSMISSION)
    conn_closing (c);
  else
    conn_set_dead (c);
}

/* Read what the socket has.  Payload bytes go straight into the payload
 * buffer when nothing is buffered before them; the rest into rbuf.
 */
static void
conn_recv (struct conn *c)
{
  struct iovec iov[2];
  int n = 0;
  ssize_t r;
  size_t direct = 0;

  if (!want_read (c))
    return;

  /* Keep the unparsed bytes at the start of rbuf.  They are few (less
   * than one request header, or one option during the handshake).
   */
  if (c->rstart > 0) {
    memmove (c->rbuf, c->rbuf + c->rstart, c->rend - c->rstart);
    c->rend -= c->rstart;
    c->rstart = 0;
  }

  if (c->rx_want > 0 && c->rx_buf && c->rend == 0) {
    iov[n].iov_base = c->rx_buf;
    iov[n].iov_len = c->rx_want;
    direct = c->rx_want;
    n++;
  }
  if (c->rend < CONN_RBUF_SIZE) {
    iov[n].iov_base = c->rbuf + c->rend;
    iov[n].iov_len = CONN_RBUF_SIZE - c->rend;
    n++;
  }
  if (n == 0)
    return;

  do
    r = c->xport ? c->xport->recv (c, iov, n) : readv (c->fd, iov, n);
  while (r < 0 && errno == EINTR);
  if (r < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK)
      return;
    if (c->xport) {                     /* logged by the transport */
      conn_set_dead (c);
      return;
    }
    if (errno == ECONNRESET)
      log_debug ("client %u: read: %m", c->id);
    else
      log_info ("client %u: read: %m", c->id);
    conn_set_dead (c);
    return;
  }
  if (r == 0) {
    conn_eof (c);
    return;
  }
  c->last_active = ev_now (conn_loop);

  if (direct > 0) {
    size_t d = (size_t) r < direct ? (size_t) r : direct;

    c->rx_buf += d;
    c->rx_want -= d;
    r -= d;
    if (c->rx_want == 0)
      finish_payload (c, true);
  }
  c->rend += r;
}

/* Parse what rbuf holds, as far as the state and the limits allow. */
static void
process_input (struct conn *c)
{
  for (;;) {
    if (c->rx_want > 0) {
      size_t avail = c->rend - c->rstart;
      size_t n = avail < c->rx_want ? avail : c->rx_want;

      if (n == 0)
        return;
      if (c->rx_buf) {
        memcpy (c->rx_buf, c->rbuf + c->rstart, n);
        c->rx_buf += n;
      }
      c->rx_want -= n;
      conn_consume (c, n);
      if (c->rx_want > 0)
        return;
      finish_payload (c, true);
      continue;
    }

    switch (c->state) {
    case CONN_GREETING:
    case CONN_HANDSHAKE:
      if (c->out_bytes > HANDSHAKE_MAX_OUTPUT || c->xport_next)
        return;
      /* fall through */
    case CONN_TRANSMISSION:
      if (!c->step (c))
        return;
      break;
    case CONN_CLOSING:
    case CONN_DEAD:
      return;
    }
  }
}

/* ------------------------------------------------------------------ */
/* Output.                                                             */
/* ------------------------------------------------------------------ */

static size_t
reply_length (const struct reply *r)
{
  return r->iov[0].iov_len + r->iov[1].iov_len;
}

void
conn_queue_reply (struct conn *c, struct reply *r)
{
  r->next = NULL;
  r->sent = 0;
  if (c->state == CONN_DEAD) {
    /* Nobody to send it to. */
    r->release (r);
    return;
  }
  *c->out_tail = r;
  c->out_tail = &r->next;
  c->out_bytes += reply_length (r);
}

static void
release_copy (struct reply *r)
{
  free (r);
}

int
conn_queue_copy (struct conn *c, const void *hdr, size_t hlen,
                 const void *data, size_t dlen)
{
  struct reply *r;
  unsigned char *p;

  r = malloc (sizeof *r + hlen + dlen);
  if (r == NULL) {
    log_error ("client %u: %m", c->id);
    conn_set_dead (c);
    return -1;
  }
  p = (unsigned char *) (r + 1);
  memcpy (p, hdr, hlen);
  if (dlen)
    memcpy (p + hlen, data, dlen);
  r->iov[0].iov_base = p;
  r->iov[0].iov_len = hlen + dlen;
  r->iov[1].iov_base = NULL;
  r->iov[1].iov_len = 0;
  r->release = release_copy;
  conn_queue_reply (c, r);
  return 0;
}

/* Drop the first reply of the queue (written, or the socket is gone). */
static void
pop_reply (struct conn *c)
{
  struct reply *r = c->out_head;

  c->out_head = r->next;
  if (c->out_head == NULL)
    c->out_tail = &c->out_head;
  r->release (r);
}

/* Fill iov (IOV_BATCH entries) with the queued replies, skipping what of
 * the first is already sent.  Returns the number of entries.
 */
static int
gather_replies (const struct conn *c, struct iovec *iov)
{
  size_t skip = c->out_head->sent;
  int i = 0, k;

  for (struct reply *r = c->out_head; r && i + 2 <= IOV_BATCH; r = r->next) {
    for (k = 0; k < 2; k++) {
      size_t len = r->iov[k].iov_len;

      if (skip >= len) {
        skip -= len;
        continue;
      }
      iov[i].iov_base = (char *) r->iov[k].iov_base + skip;
      iov[i].iov_len = len - skip;
      skip = 0;
      i++;
    }
  }
  return i;
}

/* n bytes of the queue were written: release the replies they complete.
 * Returns their number.
 */
static unsigned
retire_written (struct conn *c, size_t n)
{
  unsigned done = 0;

  c->out_bytes -= n;
  while (n > 0) {
    struct reply *r = c->out_head;
    size_t left = reply_length (r) - r->sent;

    if (n < left) {
      r->sent += n;
      break;
    }
    n -= left;
    pop_reply (c);
    done++;
  }
  if (done)
    c->last_active = ev_now (conn_loop);
  return done;
}

/* A write failed with err (not EINTR, EAGAIN): the connection ends. */
static void
write_failed (struct conn *c, int err)
{
  if (c->xport) {                       /* logged by the transport */
    conn_set_dead (c);
    return;
  }
  /* A client that hangs up without reading its replies is common
   * (NBD_OPT_ABORT, a killed client): not worth more than debug.
   */
  if (err == EPIPE || err == ECONNRESET)
    log_debug ("client %u: write: %s", c->id, strerror (err));
  else
    log_info ("client %u: write: %s", c->id, strerror (err));
  conn_set_dead (c);
}

/* Write as much of the output queue as the socket takes.  Returns the
 * number of replies written completely.  Nothing while the reply thread
 * has the queue's head (c->tx out).
 */
static unsigned
conn_send (struct conn *c)
{
  unsigned done = 0;

  while (c->out_head && c->fd >= 0 && c->tx.state == SEND_IDLE) {
    struct iovec iov[IOV_BATCH];
    struct msghdr msg = { .msg_iov = iov };
    ssize_t n;
    int i = gather_replies (c, iov);

    msg.msg_iovlen = i;
    if (c->xport)
      n = c->xport->send (c, iov, i);
    else
      n = sendmsg (c->fd, &msg, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR)
        continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK)
        break;
      write_failed (c, errno);
      break;
    }
    done += retire_written (c, n);
  }

  /* The last plaintext reply (STARTTLS's) is out: switch. */
  if (c->xport_next && c->out_head == NULL && c->fd >= 0) {
    c->xport = c->xport_next;
    c->xport_next = NULL;
  }
  return done;
}

/* Whether c's replies may go to the reply thread: plain socket,
 * transmission (the handshake's replies switch transports and are few).
 */
static bool
may_hand_over (const struct conn *c)
{
  return c->out_head && c->fd >= 0 && c->tx.state == SEND_IDLE &&
    !c->xport && !c->xport_next &&
    (c->state == CONN_TRANSMISSION || c->state == CONN_CLOSING);
}

/* Give c's queued replies to the reply thread.  Returns false when it
 * cannot take them (then they are the loop's to write).
 */
static bool
hand_over (struct conn *c)
{
  assert (may_hand_over (c));
  c->tx.fd = c->fd;
  c->tx.niov = gather_replies (c, c->tx.iov);
  return sender_submit (&c->tx);
}

/* The reply thread made c's sendmsg (sender.c, on the loop). */
static void
conn_sent (struct send_job *j)
{
  struct conn *c = (struct conn *) ((char *) j - offsetof (struct conn, tx));

  /* A dead connection took its job back (conn_set_dead). */
  assert (c->state != CONN_DEAD);
  assert (j->state == SEND_IDLE);
  if (j->result >= 0)
    retire_written (c, j->result);
  else if (j->result != -EAGAIN && j->result != -EWOULDBLOCK)
    write_failed (c, -j->result);
  /* EAGAIN: the watcher waits for room, now that the queue is ours. */
  if (c->state != CONN_DEAD)
    conn_step (c);
  conn_update_watchers (c);
}

int
conn_start_transport (struct conn *c, const struct conn_transport *t,
                      void *data)
{
  assert (c->xport_next == NULL && c->xport_data == NULL);
  c->xport_next = t;
  c->xport_data = data;
  if (c->rend != c->rstart) {
    log_info ("client %u: sent data before the reply that switches "
              "the transport, disconnecting", c->id);
    conn_set_dead (c);
    return -1;
  }
  return 0;
}

/* ------------------------------------------------------------------ */
/* State changes.                                                      */
/* ------------------------------------------------------------------ */

void
conn_closing (struct conn *c)
{
  if (c->state == CONN_CLOSING || c->state == CONN_DEAD)
    return;
  if (c->rx_done)
    finish_payload (c, false);
  c->state = CONN_CLOSING;
  log_debug ("client %u: closing (%u request%s in flight)",
             c->id, c->in_flight, c->in_flight == 1 ? "" : "s");
}

void
conn_pause_for_memory (struct conn *c)
{
  mem_wait (&c->mem_wait);
}

/* Memory was freed: c gets another try (memory.c, from the loop). */
static void
conn_mem_wake (struct mem_waiter *w)
{
  struct conn *c = (struct conn *) ((char *) w - offsetof (struct conn,
                                                           mem_wait));

  conn_step (c);
  conn_update_watchers (c);
}

void
conn_set_dead (struct conn *c)
{
  if (c->state == CONN_DEAD)
    return;
  if (c->rx_done)
    finish_payload (c, false);
  c->state = CONN_DEAD;
  if (c->mem_wait.waiting)
    mem_cancel (&c->mem_wait);

  if (ev_is_active (&c->handshake_timer))
    ev_timer_stop (conn_loop, &c->handshake_timer);
  if (ev_is_active (&c->idle_timer))
    ev_timer_stop (conn_loop, &c->idle_timer);
  /* Also when inactive: it may have an event fed (pending input). */
  ev_io_stop (conn_loop, &c->io);
  c->events = 0;
  /* The reply thread must be done with the socket and the replies. */
  sender_cancel (&c->tx);
  if (c->xport_next || c->xport)
    (c->xport_next ? c->xport_next : c->xport)->close (c);
  c->xport = c->xport_next = NULL;
  c->xport_data = NULL;
  c->xport_wait = 0;
  close (c->fd);
  c->fd = -1;

  while (c->out_head)
    pop_reply (c);
  c->out_bytes = 0;
  c->rstart = c->rend = 0;
  log_info ("client %u: disconnected", c->id);
}

/* Set the watcher's interest from the connection's state.  Closes a
 * connection that has finished closing, and frees a dead one that the
 * engine no longer refers to: c may be gone when this returns.
 */
static void
conn_update_watchers (struct conn *c)
{
  int events = 0;

  /* Shutting down and nothing left to answer: close (the client was told
   * ESHUTDOWN about anything it sent since).
   */
  if (c->state == CONN_TRANSMISSION && c->shutdown && c->in_flight == 0)
    conn_closing (c);

  if (c->state == CONN_CLOSING && c->engine_refs == 0 &&
      c->out_head == NULL) {
    assert (c->in_flight == 0);
    conn_set_dead (c);
  }
  if (c->state == CONN_DEAD) {
    if (c->engine_refs == 0 && !c->pending)
      conn_free (c);
    return;
  }

  if (want_read (c))
    events |= EV_READ;
  if (c->out_head && c->tx.state == SEND_IDLE)
    events |= EV_WRITE;
  events |= c->xport_wait;

  if (events != c->events) {
    if (ev_is_active (&c->io))
      ev_io_stop (conn_loop, &c->io);
    if (events) {
      ev_io_set (&c->io, c->fd, events);
      ev_io_start (conn_loop, &c->io);
    }
    c->events = events;
  }

  /* Input the transport holds would never make the socket readable. */
  if (c->xport && want_read (c) && c->xport->pending (c))
    ev_feed_event (conn_loop, &c->io, EV_READ);

  /* A live connection always waits for something: its socket, the
   * engine, or memory.  Otherwise nothing would ever wake it again.
   */
  assert (events != 0 || c->engine_refs > 0 || c->mem_wait.waiting ||
          c->tx.state != SEND_IDLE);
}

/* Parse and write until neither makes progress.  Writing replies can make
 * room for more requests, parsing requests can queue more replies.
 */
static void
conn_step (struct conn *c)
{
  for (;;) {
    process_input (c);
    if (conn_send (c) == 0 || c->state == CONN_DEAD || c->rend == c->rstart)
      break;
  }
}

static void
conn_io_cb (struct ev_loop *l, ev_io *w, int revents)
{
  struct conn *c = w->data;

  (void) l;
  /* What the transport waited for came: it goes on in recv or send. */
  if (revents & c->xport_wait) {
    revents |= EV_READ;
    c->xport_wait = 0;
  }
  if (revents & EV_READ)
    conn_recv (c);
  if (c->state != CONN_DEAD)
    conn_step (c);
  conn_update_watchers (c);
}

/* --handshake-limit seconds since the accept, and the connection is not
 * transmitting yet: it is closed.  Still in CONN_GREETING or
 * CONN_HANDSHAKE, or in CONN_CLOSING after NBD_OPT_ABORT with its reply
 * never read; the timer was stopped on the way to CONN_TRANSMISSION.
 */
static void
handshake_timeout_cb (struct ev_loop *l, ev_timer *w, int revents)
{
  struct conn *c = w->data;

  (void) l; (void) revents;
  assert (c->state != CONN_TRANSMISSION && c->state != CONN_DEAD);
  log_info ("client %u: handshake not finished in %u s, disconnecting",
            c->id, handshake_limit);
  conn_set_dead (c);
  /* No engine request refers to it (requests start in transmission), so
   * this frees it, unless the loop is about to run it as pending.
   */
  if (!c->pending)
    conn_update_watchers (c);
}

/* --idle-timeout: a connection with a request in flight (or a reply
 * unwritten, a payload on its way, a request waiting for memory or input
 * not parsed yet) is busy, not idle: it waits for us.  One that has
 * been quiet for long enough is closed, the rest are looked at again
 * when their time would be up.
 */
static void
idle_timeout_cb (struct ev_loop *l, ev_timer *w, int revents)
{
  struct conn *c = w->data;
  ev_tstamp now = ev_now (l), left;

  (void) revents;
  assert (c->state != CONN_DEAD);
  if (c->state != CONN_TRANSMISSION)
    return;                     /* closing: it ends by itself */
  if (c->in_flight > 0 || c->out_head || c->rx_want > 0 ||
      c->mem_wait.waiting || c->rend != c->rstart)
    c->last_active = now;
  left = c->last_active + idle_timeout - now;
  if (left > 0) {
    ev_timer_set (w, left, 0.);
    ev_timer_start (l, w);
    return;
  }
  log_info ("client %u: idle for %u s, disconnecting", c->id, idle_timeout);
  conn_closing (c);
  if (!c->pending)
    conn_update_watchers (c);
}

/* busy-poll.c's probe, while the loop spins with nothing from its poll:
 * with one client, waiting for its next request or for the rest of a
 * write's payload, its socket is read without the epoll_wait that would
 * report it first (one system call less on a QD1 round trip).  Returns
 * true when it read something (or the client went).  TLS, and a client
 * whose requests are with the engine, take the watcher's way.
 */
bool
conn_probe_lone (void)
{
  struct conn *c = conns;
  size_t unparsed;
  uint32_t want;
  enum conn_state state;

  if (nr_conns != 1 || c->state != CONN_TRANSMISSION || c->xport ||
      c->xport_next || (c->in_flight > 0 && c->rx_want == 0) ||
      c->pending || c->out_head || c->tx.state != SEND_IDLE ||
      !want_read (c))
    return false;
  unparsed = c->rend - c->rstart;
  want = c->rx_want;
  state = c->state;
  conn_recv (c);
  if (c->state == state && c->rend - c->rstart == unparsed &&
      c->rx_want == want)
    return false;                       /* EAGAIN */
  if (c->state != CONN_DEAD)
    conn_step (c);
  conn_update_watchers (c);
  return true;
}

void
conn_mark_pending (struct conn *c)
{
  if (!c->pending) {
    c->pending = true;
    c->pending_next = pending_head;
    pending_head = c;
  }
}

/* Write the replies of the pending connections: with several of them,
 * all but the last go to the reply thread, so their sendmsg calls (and
 * the wake-ups of their clients) run beside the loop rather than on it.
 */
void
conn_run_pending (void)
{
  unsigned n = 0;
  bool hand = false;

  for (struct conn *c = pending_head; c && !hand; c = c->pending_next)
    hand = ++n >= HAND_OVER_MIN;
  while (pending_head) {
    struct conn *c = pending_head;

    pending_head = c->pending_next;
    c->pending_next = NULL;
    c->pending = false;
    if (c->state != CONN_DEAD && hand && pending_head) {
      process_input (c);
      if (!may_hand_over (c) || !hand_over (c))
        conn_step (c);
    }
    else if (c->state != CONN_DEAD)
      conn_step (c);
    conn_update_watchers (c);
  }
  sender_flush ();
}

void
conn_shutdown_all (void)
{
  struct conn *c, *next;

  for (c = conns; c; c = next) {
    next = c->next;
    switch (c->state) {
    case CONN_GREETING:
    case CONN_HANDSHAKE:
      conn_set_dead (c);
      break;
    case CONN_TRANSMISSION:
      c->shutdown = true;
      break;
    case CONN_CLOSING:
    case CONN_DEAD:
      break;
    }
    if (!c->pending)
      conn_update_watchers (c);
  }
}

void
conn_kill_all (void)
{
  struct conn *c, *next;

  for (c = conns; c; c = next) {
    next = c->next;
    conn_set_dead (c);
    if (!c->pending)
      conn_update_watchers (c);
  }
}
