/* server/activation.c: the listening sockets systemd passes (socket
 * activation), matched to the listen entries of the command line or of
 * [server] in the configuration file.
 *
 * A descriptor is matched by the address it listens on (getsockname),
 * not by its name: the address is what clients reach, and a name in
 * FileDescriptorName= is free text that nothing checks against the
 * configuration.  The names (LISTEN_FDNAMES) only label the descriptors in
 * messages.  So:
 *
 *   - a Unix socket entry whose path (or file) a passed socket listens on
 *     is that socket: qnbd does not create it again (which would unlink
 *     systemd's socket file);
 *   - each address a TCP entry (bind, port) stands for is a passed socket
 *     listening there, or one qnbd creates; an IPv6 wildcard socket that
 *     also takes IPv4 (systemd's default for "ListenStream=10809") stands
 *     for the IPv4 wildcard as well;
 *   - a passed socket that no entry names is served all the same, with a
 *     warning naming it: systemd already accepts connections on it into
 *     its backlog, and refusing it would leave those clients hanging (or
 *     the service failing over a socket unit's extra line).  With no
 *     listen entry at all, the passed sockets are simply what is served.
 */
#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netdb.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "internal.h"

/* First descriptor systemd passes (SD_LISTEN_FDS_START). */
#define LISTEN_FDS_START 3

/* More descriptors than this is a broken environment, not a socket unit. */
#define LISTEN_FDS_MAX 1024

struct passed {
  int fd;
  char label[PATH_MAX + 128];   /* 'NAME' (fd N, ADDRESS), for messages */
  struct sockaddr_storage ss;   /* what it listens on */
  socklen_t len;
  bool dual_stack;              /* an IPv6 socket that takes IPv4 too */
  bool matched;                 /* a listen entry names it */
};

static struct passed *passed;
static unsigned n_passed;

/* Parse a decimal number of at most max; -1 if s is not one. */
static int
parse_number (const char *s, unsigned long max, unsigned long *out)
{
  char *end;

  if (s == NULL || *s < '0' || *s > '9')
    return -1;
  errno = 0;
  *out = strtoul (s, &end, 10);
  if (errno || *end != '\0' || *out > max)
    return -1;
  return 0;
}

/* The address of p, in text, into buf. */
static void
describe (const struct passed *p, char *buf, size_t size)
{
  const struct sockaddr_un *sun = (const struct sockaddr_un *) &p->ss;
  char host[NI_MAXHOST], serv[NI_MAXSERV];
  size_t plen;

  switch (p->ss.ss_family) {
  case AF_UNIX:
    plen = p->len > offsetof (struct sockaddr_un, sun_path)
      ? p->len - offsetof (struct sockaddr_un, sun_path) : 0;
    if (plen == 0)
      snprintf (buf, size, "unnamed Unix socket");
    else if (sun->sun_path[0] == '\0')
      snprintf (buf, size, "abstract Unix socket @%.*s", (int) plen - 1,
                sun->sun_path + 1);
    else
      snprintf (buf, size, "%.*s", (int) strnlen (sun->sun_path, plen),
                sun->sun_path);
    break;
  case AF_INET:
  case AF_INET6:
    if (getnameinfo ((const struct sockaddr *) &p->ss, p->len, host,
                     sizeof host, serv, sizeof serv,
                     NI_NUMERICHOST | NI_NUMERICSERV) != 0)
      snprintf (buf, size, "TCP socket");
    else
      snprintf (buf, size, p->ss.ss_family == AF_INET6 ? "[%s] port %s"
                : "%s port %s", host, serv);
    break;
  default:
    snprintf (buf, size, "socket of family %d", p->ss.ss_family);
  }
}

/* Fill p from descriptor fd named name (NULL: none).  Returns 0, or -1
 * (logged) when fd is not a listening stream socket: accepting on it
 * could never work.
 */
static int
inspect (struct passed *p, int fd, const char *name)
{
  char addr[PATH_MAX + 64];
  int type = 0, listening = 0, v6only = 1;
  socklen_t olen = sizeof type;

  p->fd = fd;
  p->len = sizeof p->ss;
  if (getsockname (fd, (struct sockaddr *) &p->ss, &p->len) < 0 ||
      getsockopt (fd, SOL_SOCKET, SO_TYPE, &type, &olen) < 0 ||
      (olen = sizeof listening,
       getsockopt (fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &olen)) < 0) {
    log_error ("socket activation: descriptor %d%s%s%s: %m", fd,
               name ? " '" : "", name ? name : "", name ? "'" : "");
    return -1;
  }
  describe (p, addr, sizeof addr);
  if (name)
    snprintf (p->label, sizeof p->label, "'%s' (fd %d, %s)", name, fd, addr);
  else
    snprintf (p->label, sizeof p->label, "fd %d (%s)", fd, addr);
  if (type != SOCK_STREAM || !listening) {
    log_error ("socket activation: %s is not a listening stream socket "
               "(ListenStream=)", p->label);
    return -1;
  }
  if (p->ss.ss_family == AF_INET6) {
    olen = sizeof v6only;
    if (getsockopt (fd, IPPROTO_IPV6, IPV6_V6ONLY, &v6only, &olen) < 0)
      v6only = 1;
    p->dual_stack = !v6only;
  }
  /* Not for the images' helpers or anything else qnbd may start. */
  if (fcntl (fd, F_SETFD, FD_CLOEXEC) < 0) {
    log_error ("socket activation: %s: fcntl: %m", p->label);
    return -1;
  }
  return 0;
}

int
activation_init (void)
{
  unsigned long pid, n, i;
  char *names = NULL, *name;
  const char *s;
  int r = -1;

  if (parse_number (getenv ("LISTEN_PID"), ULONG_MAX, &pid) < 0 ||
      (pid_t) pid != getpid () ||
      parse_number (getenv ("LISTEN_FDS"), LISTEN_FDS_MAX, &n) < 0)
    return 0;
  s = getenv ("LISTEN_FDNAMES");
  if (s && (names = strdup (s)) == NULL) {
    log_error ("socket activation: %m");
    return -1;
  }
  /* Children must not take the descriptors for theirs. */
  unsetenv ("LISTEN_PID");
  unsetenv ("LISTEN_FDS");
  unsetenv ("LISTEN_FDNAMES");

  /* One name per descriptor, or none at all. */
  if (names) {
    size_t colons = 0;
    for (s = names; *s; s++)
      colons += *s == ':';
    if (colons + 1 != n) {
      log_warning ("socket activation: LISTEN_FDNAMES has %zu names for "
                   "%lu descriptors: not using them", colons + 1, n);
      free (names);
      names = NULL;
    }
  }
  passed = calloc (n ? n : 1, sizeof *passed);
  if (passed == NULL) {
    log_error ("socket activation: %m");
    goto out;
  }
  name = names;
  for (i = 0; i < n; i++) {
    char *next = NULL;
    if (name && (next = strchr (name, ':')) != NULL)
      *next++ = '\0';
    if (inspect (&passed[i], LISTEN_FDS_START + i,
                 name && *name ? name : NULL) < 0)
      goto out;
    name = next;
  }
  n_passed = n;
  r = n;
 out:
  free (names);
  return r;
}

/* The passed socket listening on the Unix socket path, or NULL. */
static struct passed *
find_unix (const char *path)
{
  struct stat want, st;
  bool have_want = stat (path, &want) == 0 && S_ISSOCK (want.st_mode);

  for (unsigned i = 0; i < n_passed; i++) {
    struct passed *p = &passed[i];
    const struct sockaddr_un *sun = (const struct sockaddr_un *) &p->ss;
    char bound[sizeof sun->sun_path + 1];
    size_t plen;

    if (p->ss.ss_family != AF_UNIX ||
        p->len <= offsetof (struct sockaddr_un, sun_path) ||
        sun->sun_path[0] == '\0')
      continue;
    plen = strnlen (sun->sun_path,
                    p->len - offsetof (struct sockaddr_un, sun_path));
    memcpy (bound, sun->sun_path, plen);
    bound[plen] = '\0';
    if (strcmp (bound, path) == 0)
      return p;
    /* The same file by another name (/var/run and /run, say). */
    if (have_want && stat (bound, &st) == 0 && st.st_dev == want.st_dev &&
        st.st_ino == want.st_ino)
      return p;
  }
  return NULL;
}

/* Whether passed socket p listens on the address a. */
static bool
same_inet (const struct passed *p, const struct addrinfo *a)
{
  const struct sockaddr_in *p4 = (const struct sockaddr_in *) &p->ss;
  const struct sockaddr_in6 *p6 = (const struct sockaddr_in6 *) &p->ss;
  const struct sockaddr_in *a4 = (const struct sockaddr_in *) a->ai_addr;
  const struct sockaddr_in6 *a6 = (const struct sockaddr_in6 *) a->ai_addr;

  if (p->ss.ss_family == AF_INET && a->ai_family == AF_INET)
    return p4->sin_port == a4->sin_port &&
      p4->sin_addr.s_addr == a4->sin_addr.s_addr;
  if (p->ss.ss_family == AF_INET6 && a->ai_family == AF_INET6)
    return p6->sin6_port == a6->sin6_port &&
      memcmp (&p6->sin6_addr, &a6->sin6_addr, sizeof a6->sin6_addr) == 0;
  /* "[::]:port" taking IPv4 too covers "0.0.0.0:port". */
  if (p->ss.ss_family == AF_INET6 && a->ai_family == AF_INET)
    return p->dual_stack && p6->sin6_port == a4->sin_port &&
      IN6_IS_ADDR_UNSPECIFIED (&p6->sin6_addr) &&
      a4->sin_addr.s_addr == htonl (INADDR_ANY);
  return false;
}

/* The TCP entry addr (NULL: every address), port: each address it stands
 * for is a passed socket, or qnbd listens there itself.  Returns 0 or -1
 * (logged).
 */
static int
listen_tcp (const char *addr, const char *port)
{
  struct addrinfo hints = {
    .ai_flags = AI_PASSIVE,
    .ai_family = AF_UNSPEC,
    .ai_socktype = SOCK_STREAM,
  };
  struct addrinfo *ai, *a;
  char host[NI_MAXHOST];
  int r;

  r = getaddrinfo (addr, port, &hints, &ai);
  if (r != 0) {
    log_error ("%s port %s: %s", addr ? addr : "*", port, gai_strerror (r));
    return -1;
  }
  for (a = ai; a; a = a->ai_next) {
    bool found = false;

    for (unsigned i = 0; i < n_passed; i++)
      if (same_inet (&passed[i], a)) {
        passed[i].matched = found = true;
        log_info ("socket activation: %s is the listen entry %s port %s",
                  passed[i].label, addr ? addr : "*", port);
      }
    if (found)
      continue;
    if (getnameinfo (a->ai_addr, a->ai_addrlen, host, sizeof host, NULL, 0,
                     NI_NUMERICHOST) != 0) {
      log_error ("%s port %s: an address without a name", addr ? addr : "*",
                 port);
      goto fail;
    }
    log_info ("socket activation: %s port %s not passed: listening there",
              host, port);
    if (loop_listen_tcp (host, port) < 0)
      goto fail;
  }
  freeaddrinfo (ai);
  return 0;

 fail:
  freeaddrinfo (ai);
  return -1;
}

int
activation_listen (const char *const *socks, size_t n_socks,
                   const char *addr, const char *port)
{
  bool entries = n_socks > 0 || port != NULL;

  assert (n_passed > 0);
  for (size_t j = 0; j < n_socks; j++) {
    struct passed *p = find_unix (socks[j]);

    if (p) {
      p->matched = true;
      log_info ("socket activation: %s is the listen entry %s", p->label,
                socks[j]);
    }
    else {
      log_info ("socket activation: %s not passed: creating it", socks[j]);
      if (loop_listen_unix (socks[j]) < 0)
        return -1;
    }
  }
  if (port && listen_tcp (addr, port) < 0)
    return -1;

  for (unsigned i = 0; i < n_passed; i++) {
    struct passed *p = &passed[i];

    if (entries && !p->matched)
      log_warning ("socket activation: %s matches no listen entry "
                   "(socket, port, bind): serving it anyway", p->label);
    else if (!entries)
      log_info ("socket activation: serving %s", p->label);
    if (loop_listen_fd (p->fd) < 0)
      return -1;
  }
  return 0;
}

void
activation_cleanup (void)
{
  free (passed);
  passed = NULL;
  n_passed = 0;
}
