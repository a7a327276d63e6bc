/* server/loop.c: the event loop: listening sockets, accepting clients,
 * the engine's completion descriptors, and shutdown on SIGTERM/SIGINT.
 *
 * Shutdown: the listeners close at once, connections still haggling are
 * closed, the others stop reading and finish what is in flight.  When the
 * last connection is gone the loop returns, and main closes the images
 * (which flushes them).  A second signal, or SHUTDOWN_GRACE seconds,
 * closes the remaining connections without waiting for their replies to
 * be read (their engine requests still complete first).
 *
 * Memory: once connections have given back much of the heap memory they
 * held, the free part of the heap is returned to the system (see "Giving
 * the heap back" below).
 */
#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <malloc.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "internal.h"

/* Seconds connections get to finish after SIGTERM. */
#define SHUTDOWN_GRACE 10.

/* Seconds accepting pauses when out of descriptors. */
#define ACCEPT_PAUSE 1.

/* Connections accepted per wakeup of a listener. */
#define ACCEPT_BATCH 32

/* The heap is trimmed once connections hold at least TRIM_MIN bytes
 * less than at their peak since the last trim, and have not taken them
 * back for TRIM_DELAY seconds.
 */
#define TRIM_MIN (16u << 20)
#define TRIM_DELAY 1.

struct ev_loop *loop;

struct listener {
  struct listener *next;        /* every listener */
  ev_io io;                     /* on fd; io.data == this */
  int fd;                       /* listening socket, -1 once closed */
  bool tcp;                     /* set TCP_NODELAY on accepted sockets */
  char *unix_path;              /* socket file to remove at exit, or NULL */
};

static struct listener *listeners;
static unsigned max_connections;        /* 0: no limit */
static bool shutting_down;

static ev_signal sigterm_watcher;
static ev_signal sigint_watcher;
static ev_timer grace_timer;            /* shutdown taking too long */
static ev_timer pause_timer;            /* accept paused after EMFILE */
static ev_timer trim_timer;             /* heap to give back */

static size_t heap_held;                /* bytes connections hold now */
static size_t heap_peak;                /* the most since the last trim */
static size_t max_memory = DEFAULT_MAX_MEMORY; /* --max-memory */
static ev_timer resume_timer;           /* paused connections to retry */

/* ------------------------------------------------------------------ */
/* Listeners.                                                          */
/* ------------------------------------------------------------------ */

static void
set_listeners_active (bool active)
{
  struct listener *l;

  for (l = listeners; l; l = l->next) {
    if (l->fd < 0)
      continue;
    if (active && !ev_is_active (&l->io))
      ev_io_start (loop, &l->io);
    else if (!active && ev_is_active (&l->io))
      ev_io_stop (loop, &l->io);
  }
}

static void
pause_cb (struct ev_loop *lp, ev_timer *w, int revents)
{
  (void) lp; (void) w; (void) revents;
  if (!shutting_down)
    set_listeners_active (true);
}

static void
accept_cb (struct ev_loop *lp, ev_io *w, int revents)
{
  struct listener *l = w->data;
  int i, fd, one = 1;

  (void) lp; (void) revents;
  for (i = 0; i < ACCEPT_BATCH; i++) {
    fd = accept4 (l->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
      switch (errno) {
      case EINTR:
      case ECONNABORTED:
      case EPROTO:
        continue;
      case EAGAIN:
#if EWOULDBLOCK != EAGAIN
      case EWOULDBLOCK:
#endif
        return;
      case EMFILE:
      case ENFILE:
      case ENOBUFS:
      case ENOMEM:
        /* The listener would stay readable: pause rather than spin. */
        log_error ("accept: %m (pausing for %g s)", ACCEPT_PAUSE);
        set_listeners_active (false);
        ev_timer_set (&pause_timer, ACCEPT_PAUSE, 0.);
        ev_timer_start (loop, &pause_timer);
        return;
      default:
        log_error ("accept: %m");
        return;
      }
    }

    if (max_connections && conn_count () >= max_connections) {
      log_info ("refusing a connection: already %u (--shared %u)",
                conn_count (), max_connections);
      close (fd);
      continue;
    }
    if (l->tcp &&
        setsockopt (fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) < 0)
      log_debug ("TCP_NODELAY: %m");
    conn_new (fd);
  }
}

static int
add_listener (int fd, bool tcp, const char *unix_path)
{
  struct listener *l;

  l = calloc (1, sizeof *l);
  if (l == NULL || (unix_path && (l->unix_path = strdup (unix_path)) == NULL)) {
    log_error ("listen: %m");
    free (l);
    close (fd);
    return -1;
  }
  l->fd = fd;
  l->tcp = tcp;
  ev_io_init (&l->io, accept_cb, fd, EV_READ);
  l->io.data = l;
  ev_io_start (loop, &l->io);
  l->next = listeners;
  listeners = l;
  return 0;
}

int
loop_listen_unix (const char *path)
{
  struct sockaddr_un sun = { .sun_family = AF_UNIX };
  struct stat st;
  int fd;

  if (strlen (path) >= sizeof sun.sun_path) {
    log_error ("%s: socket path too long (at most %zu bytes)",
               path, sizeof sun.sun_path - 1);
    return -1;
  }
  strcpy (sun.sun_path, path);

  /* A socket file left by a server that died is in the way of bind. */
  if (lstat (path, &st) == 0) {
    if (!S_ISSOCK (st.st_mode)) {
      log_error ("%s: exists and is not a socket", path);
      return -1;
    }
    if (unlink (path) < 0) {
      log_error ("%s: removing the stale socket: %m", path);
      return -1;
    }
  }

  fd = socket (AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    log_error ("socket: %m");
    return -1;
  }
  if (bind (fd, (struct sockaddr *) &sun, sizeof sun) < 0) {
    log_error ("%s: bind: %m", path);
    close (fd);
    return -1;
  }
  if (listen (fd, SOMAXCONN) < 0) {
    log_error ("%s: listen: %m", path);
    close (fd);
    unlink (path);
    return -1;
  }
  if (add_listener (fd, false, path) < 0) {
    unlink (path);
    return -1;
  }
  return 0;
}

int
loop_listen_tcp (const char *addr, const char *port)
{
  struct addrinfo hints = {
    .ai_flags = AI_PASSIVE,
    .ai_family = AF_UNSPEC,
    .ai_socktype = SOCK_STREAM,
  };
  struct addrinfo *ai, *a;
  int r, fd, one = 1, count = 0;
  const char *where = addr ? addr : "*";

  r = getaddrinfo (addr, port, &hints, &ai);
  if (r != 0) {
    log_error ("%s port %s: %s", where, port, gai_strerror (r));
    return -1;
  }

  for (a = ai; a; a = a->ai_next) {
    fd = socket (a->ai_family, a->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC,
                 a->ai_protocol);
    if (fd < 0) {
      /* No IPv6 (or IPv4) in this kernel: use the other family. */
      if (errno == EAFNOSUPPORT)
        continue;
      log_error ("socket: %m");
      goto fail;
    }
    setsockopt (fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    /* So that "::" does not also take the IPv4 port that "0.0.0.0",
     * next in the list, wants.
     */
    if (a->ai_family == AF_INET6)
      setsockopt (fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one);
    if (bind (fd, a->ai_addr, a->ai_addrlen) < 0) {
      if (errno == EADDRNOTAVAIL && addr == NULL) {
        close (fd);
        continue;
      }
      log_error ("%s port %s: bind: %m", where, port);
      close (fd);
      goto fail;
    }
    if (listen (fd, SOMAXCONN) < 0) {
      log_error ("%s port %s: listen: %m", where, port);
      close (fd);
      goto fail;
    }
    if (add_listener (fd, true, NULL) < 0)
      goto fail;
    count++;
  }
  freeaddrinfo (ai);
  if (count == 0) {
    log_error ("%s port %s: no address to listen on", where, port);
    return -1;
  }
  return 0;

 fail:
  freeaddrinfo (ai);
  return -1;
}

int
loop_listen_fd (int fd)
{
  struct sockaddr_storage ss;
  socklen_t len = sizeof ss;
  int flags;

  if (getsockname (fd, (struct sockaddr *) &ss, &len) < 0) {
    log_error ("inherited descriptor %d: %m", fd);
    return -1;
  }
  flags = fcntl (fd, F_GETFL);
  if (flags < 0 || fcntl (fd, F_SETFL, flags | O_NONBLOCK) < 0 ||
      fcntl (fd, F_SETFD, FD_CLOEXEC) < 0) {
    log_error ("inherited descriptor %d: fcntl: %m", fd);
    return -1;
  }
  return add_listener (fd, ss.ss_family == AF_INET || ss.ss_family == AF_INET6,
                       NULL);
}

/* ------------------------------------------------------------------ */
/* Engine completions.                                                 */
/* ------------------------------------------------------------------ */

static void
export_cb (struct ev_loop *lp, ev_io *w, int revents)
{
  struct export *e = w->data;

  (void) lp; (void) revents;
  qcow2_process (e->q);
  /* Write the replies the callbacks queued, a batch per connection. */
  conn_run_pending ();
}

void
loop_watch_export (struct export *e)
{
  ev_io_init (&e->io, export_cb, qcow2_fd (e->q), EV_READ);
  e->io.data = e;
  ev_io_start (loop, &e->io);
}

/* ------------------------------------------------------------------ */
/* Giving the heap back.                                               */
/* ------------------------------------------------------------------ */

/* main.c keeps request buffers (up to 32 MiB) in the heap rather than in
 * mappings of their own (M_MMAP_THRESHOLD), and the heap from shrinking
 * under them (M_TRIM_THRESHOLD): a freed buffer is reused by the next
 * request without the kernel zeroing its pages again, which is what makes
 * large requests fast.  The price is that glibc never gives back what a
 * burst made the heap grow to: after a client that did not read its
 * replies (a connection buffers up to 96 MiB) has gone, the daemon stays
 * at its peak, and as each burst finds the holes the last one left too
 * small or in the wrong place, the heap grows with every round.  Measured
 * after rounds of two such clients (tests/test-slow-reader.py does one):
 * 115, 147, 211, 275, 339, then 371 MiB of RSS for good, with nothing in
 * use; with the trim below, 2 MiB a second after each round.
 *
 * So connections count the heap they hold (read buffers and request
 * data), and once they hold TRIM_MIN bytes less than at their peak and
 * have not taken them back for TRIM_DELAY seconds, malloc_trim(0) returns
 * the free pages to the system: the top of the heap, and the whole pages
 * of the free chunks in its middle (MADV_DONTNEED), in every arena.  It
 * stays off the fast path: a client that keeps its buffers busy never
 * falls that far from its peak, one that takes them back within
 * TRIM_DELAY stops the countdown, and connections that come and go a few
 * at a time move 128 KiB each.  A trim costs a walk of the free lists
 * and the madvise calls (about 15 ms for 100 MiB), then the page faults
 * of the next burst: once per burst at most, and never more often than
 * every TRIM_DELAY.
 */

static void
trim_cb (struct ev_loop *lp, ev_timer *w, int revents)
{
  double t;
  int released;

  (void) lp; (void) w; (void) revents;
  t = ev_time ();
  buffer_pool_drain ();
  released = malloc_trim (0);
  log_debug ("heap trimmed in %.1f ms (%s); connections hold %zu KiB, "
             "%zu KiB at their peak", (ev_time () - t) * 1000.,
             released ? "memory given back" : "nothing to give back",
             heap_held >> 10, heap_peak >> 10);
  heap_peak = heap_held;
}

void
loop_heap_hold (size_t n)
{
  heap_held += n;
  if (heap_held > heap_peak)
    heap_peak = heap_held;
  /* Taken back: the countdown starts again when it is freed again. */
  if (ev_is_active (&trim_timer) && heap_peak - heap_held < TRIM_MIN)
    ev_timer_stop (loop, &trim_timer);
}

void
loop_set_max_memory (size_t bytes)
{
  max_memory = bytes;
}

/* The memory budget.  Connections count what they hold (read buffers,
 * requests and their data and extent arrays), the engines what they hold
 * for requests (compressed data being decompressed), and a request is
 * parsed only when what it will hold fits beside them (loop_mem_admit);
 * otherwise its connection stops reading and waits on conn.c's paused
 * list until enough is freed.  One small request per connection always
 * goes, so that clients that do not read their replies, having filled the
 * budget, cannot starve the others: what the daemon holds stays under the
 * budget plus SMALL_REQUEST and a read buffer per connection (--shared
 * bounds them).
 */
bool
loop_mem_admit (size_t need, bool conn_idle)
{
  if (heap_held + export_mem_held () + need <= max_memory)
    return true;
  return conn_idle && need <= SMALL_REQUEST;
}

static void
resume_cb (struct ev_loop *lp, ev_timer *w, int revents)
{
  (void) lp; (void) w; (void) revents;
  conn_resume_paused ();
}

void
loop_heap_release (size_t n)
{
  assert (heap_held >= n);
  heap_held -= n;
  /* Retried from the loop, not from inside whatever freed the memory
   * (often the writing of a connection's replies).
   */
  if (conn_any_paused () && heap_held < max_memory
      && !ev_is_active (&resume_timer)) {
    ev_timer_set (&resume_timer, 0., 0.);
    ev_timer_start (loop, &resume_timer);
  }
  if (heap_peak - heap_held >= TRIM_MIN && !ev_is_active (&trim_timer)) {
    ev_timer_set (&trim_timer, TRIM_DELAY, 0.);
    ev_timer_start (loop, &trim_timer);
  }
}

/* ------------------------------------------------------------------ */
/* Shutdown.                                                           */
/* ------------------------------------------------------------------ */

static void
check_done (void)
{
  if (shutting_down && conn_count () == 0)
    ev_break (loop, EVBREAK_ALL);
}

void
loop_conn_freed (void)
{
  check_done ();
}

static void
close_listeners (void)
{
  struct listener *l;

  for (l = listeners; l; l = l->next) {
    if (l->fd < 0)
      continue;
    if (ev_is_active (&l->io))
      ev_io_stop (loop, &l->io);
    close (l->fd);
    l->fd = -1;
  }
}

static void
grace_cb (struct ev_loop *lp, ev_timer *w, int revents)
{
  (void) lp; (void) w; (void) revents;
  log_info ("%u connection%s still open after %g s, closing them",
            conn_count (), conn_count () == 1 ? "" : "s", SHUTDOWN_GRACE);
  conn_kill_all ();
  check_done ();
}

static void
signal_cb (struct ev_loop *lp, ev_signal *w, int revents)
{
  (void) lp; (void) revents;
  if (shutting_down) {
    log_info ("signal %d again: closing every connection now", w->signum);
    conn_kill_all ();
    check_done ();
    return;
  }

  log_info ("signal %d: shutting down", w->signum);
  shutting_down = true;
  close_listeners ();
  if (ev_is_active (&pause_timer))
    ev_timer_stop (loop, &pause_timer);
  conn_shutdown_all ();
  ev_timer_set (&grace_timer, SHUTDOWN_GRACE, 0.);
  ev_timer_start (loop, &grace_timer);
  check_done ();
}

/* ------------------------------------------------------------------ */
/* Setup and teardown.                                                 */
/* ------------------------------------------------------------------ */

int
loop_init (void)
{
  /* A client that hangs up must not kill the server: writes to its
   * socket fail with EPIPE instead.
   */
  signal (SIGPIPE, SIG_IGN);


  loop = ev_default_loop (EVFLAG_AUTO);
  if (loop == NULL) {
    log_error ("cannot initialise libev (bad LIBEV_FLAGS?)");
    return -1;
  }
  ev_signal_init (&sigterm_watcher, signal_cb, SIGTERM);
  ev_signal_start (loop, &sigterm_watcher);
  ev_signal_init (&sigint_watcher, signal_cb, SIGINT);
  ev_signal_start (loop, &sigint_watcher);
  ev_timer_init (&grace_timer, grace_cb, SHUTDOWN_GRACE, 0.);
  ev_timer_init (&pause_timer, pause_cb, ACCEPT_PAUSE, 0.);
  ev_timer_init (&trim_timer, trim_cb, TRIM_DELAY, 0.);
  ev_timer_init (&resume_timer, resume_cb, 0., 0.);
  return 0;
}

void
loop_set_max_connections (unsigned n)
{
  max_connections = n;
}

int
loop_run (void)
{
  ev_run (loop, 0);
  return 0;
}

void
loop_cleanup (void)
{
  struct listener *l, *next;

  close_listeners ();
  for (l = listeners; l; l = next) {
    next = l->next;
    if (l->unix_path) {
      if (unlink (l->unix_path) < 0 && errno != ENOENT)
        log_warning ("%s: %m", l->unix_path);
      free (l->unix_path);
    }
    free (l);
  }
  listeners = NULL;

  if (loop) {
    ev_signal_stop (loop, &sigterm_watcher);
    ev_signal_stop (loop, &sigint_watcher);
    if (ev_is_active (&grace_timer))
      ev_timer_stop (loop, &grace_timer);
    if (ev_is_active (&pause_timer))
      ev_timer_stop (loop, &pause_timer);
    if (ev_is_active (&trim_timer))
      ev_timer_stop (loop, &trim_timer);
    if (ev_is_active (&resume_timer))
      ev_timer_stop (loop, &resume_timer);
    buffer_pool_drain ();
    ev_loop_destroy (loop);
    loop = NULL;
  }
}
