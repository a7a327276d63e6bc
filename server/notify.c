/* server/notify.c: what systemd is told (Type=notify, NOTIFY_SOCKET).
 *
 * READY=1 once listening and after a reload, RELOADING=1 before one
 * (with MONOTONIC_USEC=, which Type=notify-reload of systemd 253 wants;
 * older versions ignore it), and STATUS= with the number of exports and
 * connections.  The status follows the connection count, but a storm of
 * connections must not become a storm of datagrams: after one is sent,
 * the next waits until STATUS_INTERVAL has passed, and then carries the
 * count of that moment.
 */
#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"

/* Seconds between two STATUS= sent for connections coming and going. */
#define STATUS_INTERVAL 1.

static struct ev_loop *loop;
static ev_timer status_timer;   /* active: the interval is running */
static bool status_stale;       /* the count changed during it */

/* Send one datagram to NOTIFY_SOCKET, if systemd asked for them. */
static void QNBD_PRINTF (1, 2)
notify_send (const char *fmt, ...)
{
  const char *path = getenv ("NOTIFY_SOCKET");
  struct sockaddr_un sun = { .sun_family = AF_UNIX };
  char msg[256];
  va_list args;
  size_t len;
  int fd, n;

  if (path == NULL || *path == '\0')
    return;
  len = strlen (path);
  if ((path[0] != '/' && path[0] != '@') || len >= sizeof sun.sun_path) {
    log_warning ("NOTIFY_SOCKET=%s: unusable address", path);
    return;
  }
  memcpy (sun.sun_path, path, len);
  if (path[0] == '@')
    sun.sun_path[0] = '\0';     /* abstract namespace */

  va_start (args, fmt);
  n = vsnprintf (msg, sizeof msg, fmt, args);
  va_end (args);
  if (n < 0 || (size_t) n >= sizeof msg)
    n = strlen (msg);

  fd = socket (AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    log_warning ("NOTIFY_SOCKET: socket: %m");
    return;
  }
  if (sendto (fd, msg, n, MSG_NOSIGNAL, (struct sockaddr *) &sun,
              offsetof (struct sockaddr_un, sun_path) + len) < 0)
    log_warning ("NOTIFY_SOCKET=%s: %m", path);
  close (fd);
}

/* "STATUS=3 exports, 2 clients" */
static const char *
status_line (char *buf, size_t size)
{
  unsigned e = export_count (), c = conn_count ();

  snprintf (buf, size, "STATUS=%u export%s, %u client%s",
            e, e == 1 ? "" : "s", c, c == 1 ? "" : "s");
  return buf;
}

static void
restart_interval (void)
{
  status_stale = false;
  if (loop == NULL)
    return;
  if (ev_is_active (&status_timer))
    ev_timer_stop (loop, &status_timer);
  ev_timer_set (&status_timer, STATUS_INTERVAL, 0.);
  ev_timer_start (loop, &status_timer);
}

static void
status_cb (struct ev_loop *lp, ev_timer *w, int revents)
{
  char buf[96];

  (void) lp; (void) w; (void) revents;
  if (!status_stale)
    return;
  notify_send ("%s", status_line (buf, sizeof buf));
  restart_interval ();
}

void
notify_init (struct ev_loop *l)
{
  loop = l;
  ev_timer_init (&status_timer, status_cb, STATUS_INTERVAL, 0.);
}

void
notify_cleanup (void)
{
  if (loop && ev_is_active (&status_timer))
    ev_timer_stop (loop, &status_timer);
  loop = NULL;
}

void
notify_ready (void)
{
  char buf[96];

  notify_send ("READY=1\n%s", status_line (buf, sizeof buf));
  restart_interval ();
}

void
notify_reloading (void)
{
  struct timespec ts;

  clock_gettime (CLOCK_MONOTONIC, &ts);
  notify_send ("RELOADING=1\nMONOTONIC_USEC=%llu\nSTATUS=reloading",
               (unsigned long long) ts.tv_sec * 1000000ull +
               (unsigned long long) ts.tv_nsec / 1000);
}

void
notify_status_changed (void)
{
  const char *path = getenv ("NOTIFY_SOCKET");
  char buf[96];

  /* Called at every accept and close: nothing to do without systemd. */
  if (path == NULL || *path == '\0')
    return;
  if (loop && ev_is_active (&status_timer)) {
    status_stale = true;
    return;
  }
  notify_send ("%s", status_line (buf, sizeof buf));
  restart_interval ();
}
