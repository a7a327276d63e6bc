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
 * SIGHUP calls the reload function main.c gave (loop_on_reload); without
 * one (no -C file) it is logged and ignored.
 *
 * The memory accounting (memory.c) and the connections (conn.c) get the
 * libev loop, and the connections their protocol, from loop_init: neither
 * calls back into this file.
 */
#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
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

/* Seconds between two log lines about connections refused at accept: a
 * flood of them must not flood the log.
 */
#define REFUSE_LOG_INTERVAL 10.

static struct ev_loop *loop;

struct listener {
  struct listener *next;        /* every listener */
  ev_io io;                     /* on fd; io.data == this */
  int fd;                       /* listening socket, -1 once closed */
  bool tcp;                     /* set TCP_NODELAY on accepted sockets */
  char *unix_path;              /* socket file to remove at exit, or NULL */
};

static struct listener *listeners;
static unsigned max_connections;        /* 0: no limit */
static unsigned max_per_client;         /* 0: no limit */
static bool shutting_down;

static ev_signal sigterm_watcher;
static ev_signal sigint_watcher;
static ev_signal sighup_watcher;
static void (*reload_fn) (void);        /* SIGHUP, or NULL: ignored */
static ev_timer grace_timer;            /* shutdown taking too long */
static ev_timer pause_timer;            /* accept paused after EMFILE */

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

/* Whether a connection from p is over a limit; if so, say it (at most
 * once every REFUSE_LOG_INTERVAL seconds, with the number not said).
 */
static bool
over_limit (const struct peer_addr *p)
{
  static ev_tstamp last_said = -REFUSE_LOG_INTERVAL;
  static unsigned unsaid;
  char buf[INET6_ADDRSTRLEN], more[64] = "";
  unsigned n = conn_count (), from = 0;

  if (!max_connections || n < max_connections) {
    /* Unix-socket clients are all one address, and all local. */
    if (!max_per_client || p->family == AF_UNIX)
      return false;
    from = conn_count_peer (p);
    if (from < max_per_client)
      return false;
  }

  if (ev_now (loop) - last_said < REFUSE_LOG_INTERVAL) {
    unsaid++;
    return true;
  }
  if (unsaid)
    snprintf (more, sizeof more, " (and %u more refused before)", unsaid);
  if (from)
    log_warning ("refusing a connection from %s: already %u from it "
                 "(max-connections-per-client)%s",
                 access_peer_name (p, buf, sizeof buf), from, more);
  else
    log_warning ("refusing a connection from %s: already %u "
                 "(max-connections)%s",
                 access_peer_name (p, buf, sizeof buf), n, more);
  last_said = ev_now (loop);
  unsaid = 0;
  return true;
}

static void
accept_cb (struct ev_loop *lp, ev_io *w, int revents)
{
  struct listener *l = w->data;
  struct sockaddr_storage ss;
  socklen_t sslen;
  struct peer_addr peer;
  int i, fd, one = 1;

  (void) lp; (void) revents;
  for (i = 0; i < ACCEPT_BATCH; i++) {
    sslen = sizeof ss;
    fd = accept4 (l->fd, (struct sockaddr *) &ss, &sslen,
                  SOCK_NONBLOCK | SOCK_CLOEXEC);
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

    access_peer_from (&peer, (struct sockaddr *) &ss, sslen);
    if (over_limit (&peer)) {
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

/* The permissions of the Unix sockets we create (--socket-mode ...). */
static const struct sockperm *sockperm;

void
loop_set_sockperm (const struct sockperm *p)
{
  sockperm = p;
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
  if (sockperm && sockperm_apply (sockperm, path) < 0) {
    close (fd);
    unlink (path);
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

/* Called for the descriptor, and for the engine's notice (export_ready)
 * with EV_CUSTOM.
 */
static void
export_cb (struct ev_loop *lp, ev_io *w, int revents)
{
  struct export *e = w->data;

  (void) lp; (void) revents;
  qcow2_process (e->q);
  /* Write the replies the callbacks queued, a batch per connection. */
  conn_run_pending ();
}

/* The engine has work ready on this thread (a read served from memory):
 * run export_cb in this loop iteration, after the callback that submitted
 * it, instead of through an eventfd write, a poll and a read.
 */
static void
export_ready (void *arg)
{
  struct export *e = arg;

  ev_feed_event (loop, &e->io, EV_CUSTOM);
}

void
loop_watch_export (struct export *e)
{
  ev_io_init (&e->io, export_cb, qcow2_fd (e->q), EV_READ);
  e->io.data = e;
  ev_io_start (loop, &e->io);
  qcow2_set_ready_notify (e->q, export_ready, e);
}

/* Stop watching an engine: before its image is closed. */
void
loop_unwatch_export (struct export *e)
{
  struct export *x;

  if (!ev_is_active (&e->io))
    return;
  /* A reload that changed only settings made a new export over the same
   * open image: the notice goes to it (setting it also kicks the eventfd
   * for a notice given to e and not yet run).
   */
  for (x = export_first (); x; x = x->next)
    if (x != e && x->q == e->q && ev_is_active (&x->io))
      break;
  if (x)
    qcow2_set_ready_notify (x->q, export_ready, x);
  else
    qcow2_set_ready_notify (e->q, NULL, NULL);
  /* A notice fed but not yet run must not run on a closed image. */
  ev_clear_pending (loop, &e->io);
  ev_io_stop (loop, &e->io);
}

static void
unwatch_exports (void)
{
  struct export *e;

  for (e = export_first (); e; e = e->next)
    loop_unwatch_export (e);
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

/* A connection has been freed (conn.c calls it, from conn_init). */
static void
conn_freed (void)
{
  notify_status_changed ();
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

static void
sighup_cb (struct ev_loop *lp, ev_signal *w, int revents)
{
  (void) lp; (void) w; (void) revents;
  if (shutting_down)
    return;
  if (reload_fn == NULL) {
    log_info ("SIGHUP: ignored (no -C configuration file to read again)");
    return;
  }
  reload_fn ();
}

void
loop_on_reload (void (*fn) (void))
{
  reload_fn = fn;
}

struct ev_loop *
loop_get (void)
{
  assert (loop != NULL);
  return loop;
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
  /* Before any reload function exists too: SIGHUP must not kill us. */
  ev_signal_init (&sighup_watcher, sighup_cb, SIGHUP);
  ev_signal_start (loop, &sighup_watcher);
  ev_timer_init (&grace_timer, grace_cb, SHUTDOWN_GRACE, 0.);
  ev_timer_init (&pause_timer, pause_cb, ACCEPT_PAUSE, 0.);
  mem_init (loop);
  notify_init (loop);
  conn_init (loop, handshake_start, conn_freed);
  busy_poll_init (loop);
  busy_poll_set_probe (conn_probe_lone);
  return 0;
}

void
loop_set_max_connections (unsigned n)
{
  max_connections = n;
}

void
loop_set_max_per_client (unsigned n)
{
  max_per_client = n;
}

int
loop_run (void)
{
  ev_run (loop, 0);
  busy_poll_report ();
  /* Every connection is gone, and with it every job of the thread. */
  sender_stop ();
  unwatch_exports ();
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
    unwatch_exports ();
    ev_signal_stop (loop, &sigterm_watcher);
    ev_signal_stop (loop, &sigint_watcher);
    ev_signal_stop (loop, &sighup_watcher);
    notify_cleanup ();
    if (ev_is_active (&grace_timer))
      ev_timer_stop (loop, &grace_timer);
    if (ev_is_active (&pause_timer))
      ev_timer_stop (loop, &pause_timer);
    mem_cleanup ();
    ev_loop_destroy (loop);
    loop = NULL;
  }
}
