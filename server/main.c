/* server/main.c: the command line and startup of qnbd.
 *
 * Parse the options, open the image (an image that cannot be opened is one
 * line on stderr and exit status 1), listen (Unix socket, TCP, or the
 * sockets systemd passes), write the pid file, tell systemd we are ready,
 * run the loop until SIGTERM, then close the image, which flushes it.
 */
#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <malloc.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "internal.h"

#ifndef PACKAGE_VERSION
#define PACKAGE_VERSION "(unknown version)"
#endif

#define DEFAULT_PORT "10809"

/* First descriptor systemd passes (SD_LISTEN_FDS_START). */
#define LISTEN_FDS_START 3

enum {
  OPT_CACHE = 256,
  OPT_AIO,
  OPT_ALLOW_DIR,
  OPT_BACKING,
  OPT_COMPRESS,
  OPT_DISCARD,
  OPT_HANDSHAKE_LIMIT,
  OPT_L2_CACHE_SIZE,
  OPT_MAX_MEMORY,
  OPT_PID_FILE,
  OPT_TLS,
  OPT_TLS_CERTIFICATES,
  OPT_TLS_PSK,
  OPT_TLS_VERIFY_PEER,
  OPT_VERSION,
};

static const char short_options[] = "b:D:e:f:hk:l:p:rtUvx:";
static const struct option long_options[] = {
  { "aio",            required_argument, NULL, OPT_AIO },
  { "allow-dir",      required_argument, NULL, OPT_ALLOW_DIR },
  { "backing",        required_argument, NULL, OPT_BACKING },
  { "bind",           required_argument, NULL, 'b' },
  { "cache",          required_argument, NULL, OPT_CACHE },
  { "compress",       no_argument,       NULL, OPT_COMPRESS },
  { "description",    required_argument, NULL, 'D' },
  { "discard",        required_argument, NULL, OPT_DISCARD },
  { "export-name",    required_argument, NULL, 'x' },
  { "force-share",    no_argument,       NULL, 'U' },
  { "format",         required_argument, NULL, 'f' },
  { "handshake-limit", required_argument, NULL, OPT_HANDSHAKE_LIMIT },
  { "help",           no_argument,       NULL, 'h' },
  { "l2-cache-size",  required_argument, NULL, OPT_L2_CACHE_SIZE },
  { "max-memory",     required_argument, NULL, OPT_MAX_MEMORY },
  { "load-snapshot",  required_argument, NULL, 'l' },
  { "persistent",     no_argument,       NULL, 't' },
  { "pid-file",       required_argument, NULL, OPT_PID_FILE },
  { "port",           required_argument, NULL, 'p' },
  { "read-only",      no_argument,       NULL, 'r' },
  { "shared",         required_argument, NULL, 'e' },
  { "socket",         required_argument, NULL, 'k' },
  { "tls",            required_argument, NULL, OPT_TLS },
  { "tls-certificates", required_argument, NULL, OPT_TLS_CERTIFICATES },
  { "tls-psk",        required_argument, NULL, OPT_TLS_PSK },
  { "tls-verify-peer", no_argument,      NULL, OPT_TLS_VERIFY_PEER },
  { "verbose",        no_argument,       NULL, 'v' },
  { "version",        no_argument,       NULL, OPT_VERSION },
  { NULL, 0, NULL, 0 },
};

static void
usage (FILE *fp)
{
  fprintf (fp,
"Usage: qnbd [OPTION]... IMAGE\n"
"Export the qcow2 (or raw) image IMAGE over the Network Block Device protocol.\n"
"\n"
"Listening (default: TCP port %s on every address):\n"
"  -k, --socket=PATH        listen on the Unix socket PATH\n"
"  -p, --port=N             listen on TCP port N\n"
"  -b, --bind=ADDR          listen on the IPv4 or IPv6 address ADDR only\n"
"  -e, --shared=N           at most N connections at once (0: no limit)\n"
"      --handshake-limit=N  close connections that have not finished the\n"
"                           handshake N seconds after connecting\n"
"                           (default: %d; 0: no limit)\n"
"  -t, --persistent         keep serving after a client disconnects\n"
"                           (always the case; accepted for qemu-nbd users)\n"
"      --pid-file=PATH      write the process id to PATH once listening\n"
"      --max-memory=SIZE    stop taking requests while they hold SIZE\n"
"                           bytes (suffixes K, M, G; default: 512M)\n"
"      --tls=off|on|require TLS (STARTTLS): off (default), on: offered,\n"
"                           require: nothing is served without it\n"
"      --tls-certificates=DIR  ca-cert.pem, server-cert.pem, server-key.pem\n"
"      --tls-psk=FILE       pre-shared keys, username:hexkey lines\n"
"      --tls-verify-peer    require a client certificate signed by the CA\n"
"\n"
"The export:\n"
"  -x, --export-name=NAME   export name (default: \"\")\n"
"  -D, --description=TEXT   description shown to clients\n"
"  -r, --read-only          refuse writes\n"
"  -U, --force-share        with -r: serve even while another process\n"
"                           writes the image (no lock refusing writers)\n"
"  -l, --load-snapshot=SNAPSHOT  serve the internal snapshot SNAPSHOT (its\n"
"                           name or id), read-only\n"
"      --compress               store whole-cluster writes compressed\n"
"                               (backup-style exports)\n"
"      --discard=unmap|ignore   unmap (default): TRIM releases clusters;\n"
"                               ignore: TRIM succeeds and does nothing\n"
"\n"
"The image:\n"
"  -f, --format=qcow2|raw|auto  the image format (default: qcow2; a file\n"
"                               that is not qcow2 is refused); auto probes:\n"
"                               qcow2 by its magic, else raw\n"
"      --backing=confine|follow|none  the backing and data files the image\n"
"                               names: confine (default): only inside the\n"
"                               image's directory or an --allow-dir;\n"
"                               follow: anywhere; none: refuse them\n"
"      --allow-dir=DIR          confine: allow files inside DIR too\n"
"                               (repeatable)\n"
"      --cache=writeback|none   none: bypass the host page cache (O_DIRECT)\n"
"      --aio=io_uring|threads   the I/O backend (default: io_uring, threads\n"
"                               when the kernel refuses io_uring)\n"
"      --l2-cache-size=BYTES    L2 table cache size (suffixes K, M, G)\n"
"\n"
"  -v, --verbose            say more (twice: debugging messages)\n"
"  -h, --help               show this help and exit\n"
"      --version            show the version and exit\n"
"\n"
"Started by systemd with socket activation (LISTEN_FDS), qnbd serves the\n"
"sockets it is given and ignores --socket, --port and --bind.\n",
           DEFAULT_PORT, DEFAULT_HANDSHAKE_LIMIT);
}

static void __attribute__ ((__noreturn__)) QNBD_PRINTF (1, 2)
bad_usage (const char *fmt, ...)
{
  va_list args;

  fprintf (stderr, "qnbd: ");
  va_start (args, fmt);
  vfprintf (stderr, fmt, args);
  va_end (args);
  fprintf (stderr, "\nTry 'qnbd --help' for more information.\n");
  exit (EXIT_FAILURE);
}

/* A decimal number with an optional binary suffix (K, M, G, T). */
static int
parse_size (const char *s, uint64_t *out)
{
  char *end;
  unsigned long long v;
  unsigned shift = 0;

  if (*s < '0' || *s > '9')
    return -1;
  errno = 0;
  v = strtoull (s, &end, 10);
  if (errno)
    return -1;
  switch (*end) {
  case '\0': break;
  case 'k': case 'K': shift = 10; end++; break;
  case 'm': case 'M': shift = 20; end++; break;
  case 'g': case 'G': shift = 30; end++; break;
  case 't': case 'T': shift = 40; end++; break;
  default: return -1;
  }
  if (*end == 'i' || *end == 'I')       /* "MiB" */
    end++;
  if (*end == 'b' || *end == 'B')
    end++;
  if (*end != '\0' || (shift && v > (UINT64_MAX >> shift)))
    return -1;
  *out = (uint64_t) v << shift;
  return 0;
}

static int
parse_uint (const char *s, unsigned max, unsigned *out)
{
  char *end;
  unsigned long v;

  if (*s < '0' || *s > '9')
    return -1;
  errno = 0;
  v = strtoul (s, &end, 10);
  if (errno || *end != '\0' || v > max)
    return -1;
  *out = v;
  return 0;
}

/* The descriptors systemd passed us, or 0 when not socket-activated.
 * The environment variables are removed so that children do not see
 * them.
 */
static int
socket_activation (void)
{
  const char *s;
  unsigned pid, n;

  s = getenv ("LISTEN_PID");
  if (s == NULL || parse_uint (s, UINT_MAX, &pid) < 0 ||
      (pid_t) pid != getpid ())
    return 0;
  s = getenv ("LISTEN_FDS");
  if (s == NULL || parse_uint (s, 1024, &n) < 0)
    return 0;
  unsetenv ("LISTEN_PID");
  unsetenv ("LISTEN_FDS");
  unsetenv ("LISTEN_FDNAMES");
  return n;
}

/* Tell systemd (Type=notify) that we are ready, if it asked. */
static void
notify_ready (void)
{
  const char *path = getenv ("NOTIFY_SOCKET");
  struct sockaddr_un sun = { .sun_family = AF_UNIX };
  static const char msg[] = "READY=1";
  size_t len;
  int fd;

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

  fd = socket (AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    log_warning ("NOTIFY_SOCKET: socket: %m");
    return;
  }
  if (sendto (fd, msg, sizeof msg - 1, MSG_NOSIGNAL, (struct sockaddr *) &sun,
              offsetof (struct sockaddr_un, sun_path) + len) < 0)
    log_warning ("NOTIFY_SOCKET=%s: %m", path);
  close (fd);
}

/* Create a fresh temporary file beside path for writing: never through a
 * symlink or into a file that exists (someone who can write the directory
 * could plant one at a name we use, pointing at a file of their choice).
 * Returns the descriptor and the name in *tmp, or -1 after logging.
 */
static int
create_beside (const char *path, char **tmp)
{
  for (unsigned i = 0; i < 100; i++) {
    int fd, r;

    r = i == 0 ? asprintf (tmp, "%s.tmp", path)
      : asprintf (tmp, "%s.tmp.%ld.%u", path, (long) getpid (), i);
    if (r < 0) {
      log_error ("%s: %m", path);
      return -1;
    }
    fd = open (*tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC,
               0644);
    if (fd >= 0)
      return fd;
    if (errno != EEXIST) {
      log_error ("%s: %m", *tmp);
      free (*tmp);
      return -1;
    }
    free (*tmp);
  }
  log_error ("%s: no free temporary name beside it", path);
  return -1;
}

/* Write our pid to path, whole: a reader never sees a partial file.  The
 * rename replaces whatever path is (a symlink included) without following
 * it.
 */
static int
write_pid_file (const char *path)
{
  char *tmp, text[32];
  int fd, n;
  ssize_t r;

  fd = create_beside (path, &tmp);
  if (fd < 0)
    return -1;
  n = snprintf (text, sizeof text, "%ld\n", (long) getpid ());
  r = write (fd, text, n);
  if (r != n || close (fd) != 0) {
    if (r >= 0 && r != n)
      errno = EIO;              /* a short write to a new file */
    log_error ("%s: %m", tmp);
    if (r != n)
      close (fd);
    unlink (tmp);
    free (tmp);
    return -1;
  }
  if (rename (tmp, path) < 0) {
    log_error ("%s: %m", path);
    unlink (tmp);
    free (tmp);
    return -1;
  }
  free (tmp);
  return 0;
}

/* Print s to fp, %-escaping what a URI cannot hold as is. */
static void
print_uri_escaped (FILE *fp, const char *s, const char *also_safe)
{
  for (; *s; s++) {
    unsigned char ch = *s;

    if ((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
        (ch >= '0' && ch <= '9') || strchr ("-._~", ch) ||
        (ch && strchr (also_safe, ch)))
      fputc (ch, fp);
    else
      fprintf (fp, "%%%02X", ch);
  }
}

/* -v: say where the export can be reached, as an NBD URI. */
static void
print_uri (const char *image, const char *name, const char *sock,
           const char *addr, const char *port, int activated)
{
  if (activated) {
    fprintf (stderr, "qnbd: serving %s on %d socket%s from systemd\n",
             image, activated, activated == 1 ? "" : "s");
    return;
  }
  fprintf (stderr, "qnbd: serving %s at ", image);
  if (sock) {
    fputs ("nbd+unix:///", stderr);
    print_uri_escaped (stderr, name, "");
    fputs ("?socket=", stderr);
    print_uri_escaped (stderr, sock, "/");
  }
  else {
    fputs ("nbd://", stderr);
    if (addr == NULL)
      fputs ("localhost", stderr);
    else if (strchr (addr, ':'))
      fprintf (stderr, "[%s]", addr);
    else
      fputs (addr, stderr);
    fprintf (stderr, ":%s/", port);
    print_uri_escaped (stderr, name, "");
  }
  fputc ('\n', stderr);
  fflush (stderr);
}

/* What the command line asks for. */
struct options {
  const char *sock, *addr, *port;       /* where to listen */
  const char *name, *description;       /* the export */
  const char *pid_file;
  const char *image;
  struct qcow2_opts opts;               /* how to open the image */
  const char **allow_dirs;              /* opts.allow_dirs, ours to free */
  size_t n_allow_dirs;
  bool discard;                         /* --discard=unmap */
  unsigned shared;                      /* --shared, 0: no limit */
  unsigned handshake_limit;             /* --handshake-limit */
  int tls;                              /* --tls, enum tls_mode */
  const char *tls_certificates;         /* --tls-certificates */
  const char *tls_psk;                  /* --tls-psk */
  bool tls_verify_peer;                 /* --tls-verify-peer */
};

/* One word among a few, as the argument of option opt: its value, or a
 * usage error listing them (choices, for the message).
 */
struct keyword {
  const char *word;
  int value;
};

static int
keyword (const char *opt, const char *arg, const struct keyword *k,
         const char *choices)
{
  for (; k->word; k++)
    if (strcmp (arg, k->word) == 0)
      return k->value;
  bad_usage ("%s: '%s': use %s", opt, arg, choices);
}

static const struct keyword formats[] = {
  { "qcow2", QCOW2_FORMAT_QCOW2 }, { "raw", QCOW2_FORMAT_RAW },
  { "auto", QCOW2_FORMAT_AUTO }, { NULL, 0 },
};
static const struct keyword discards[] = {
  { "unmap", true }, { "ignore", false }, { NULL, 0 },
};
static const struct keyword backings[] = {
  { "confine", QCOW2_BACKING_CONFINE }, { "follow", QCOW2_BACKING_FOLLOW },
  { "none", QCOW2_BACKING_NONE }, { NULL, 0 },
};
static const struct keyword caches[] = {
  { "writeback", false }, { "none", true }, { NULL, 0 },
};
static const struct keyword tls_modes[] = {
  { "off", TLS_OFF }, { "on", TLS_ON }, { "require", TLS_REQUIRE },
  { NULL, 0 },
};
static const struct keyword aio_modes[] = {
  { "io_uring", QCOW2_AIO_URING }, { "threads", QCOW2_AIO_THREADS },
  { "auto", QCOW2_AIO_AUTO }, { NULL, 0 },
};

/* One option c (getopt_long's answer) with its argument optarg. */
static void
parse_option (int c, struct options *o)
{
  unsigned port_n;
  uint64_t max_memory;

  switch (c) {
  case 'k': o->sock = optarg; break;
  case 'b': o->addr = optarg; break;
  case 'x': o->name = optarg; break;
  case 'D': o->description = optarg; break;
  case 'r': o->opts.read_only = true; break;
  case 'U': o->opts.force_share = true; break;
  case 't': break;              /* qnbd always serves until it is stopped */
  case OPT_COMPRESS: o->opts.compress = true; break;
  case OPT_ALLOW_DIR: o->allow_dirs[o->n_allow_dirs++] = optarg; break;
  case OPT_PID_FILE: o->pid_file = optarg; break;
  case OPT_TLS:
    o->tls = keyword ("--tls", optarg, tls_modes, "off, on or require");
    break;
  case OPT_TLS_CERTIFICATES: o->tls_certificates = optarg; break;
  case OPT_TLS_PSK: o->tls_psk = optarg; break;
  case OPT_TLS_VERIFY_PEER: o->tls_verify_peer = true; break;
  case 'v': log_verbosity++; break;
  case 'p':
    if (parse_uint (optarg, 65535, &port_n) < 0 || port_n == 0)
      bad_usage ("--port: '%s' is not a port number", optarg);
    o->port = optarg;
    break;
  case 'e':
    if (parse_uint (optarg, UINT_MAX, &o->shared) < 0)
      bad_usage ("--shared: '%s' is not a number", optarg);
    break;
  case OPT_HANDSHAKE_LIMIT:
    if (parse_uint (optarg, UINT_MAX, &o->handshake_limit) < 0)
      bad_usage ("--handshake-limit: '%s' is not a number of seconds",
                 optarg);
    break;
  case 'f':
    o->opts.format = keyword ("--format", optarg, formats,
                              "qcow2, raw or auto");
    break;
  case 'l':
    /* As with qemu-nbd, a snapshot is always served read-only. */
    o->opts.snapshot = optarg;
    o->opts.read_only = true;
    break;
  case OPT_DISCARD:
    o->discard = keyword ("--discard", optarg, discards, "unmap or ignore");
    break;
  case OPT_BACKING:
    o->opts.backing = keyword ("--backing", optarg, backings,
                               "confine, follow or none");
    break;
  case OPT_CACHE:
    o->opts.direct = keyword ("--cache", optarg, caches,
                              "writeback or none");
    break;
  case OPT_AIO:
    o->opts.aio_mode = keyword ("--aio", optarg, aio_modes,
                                "io_uring or threads");
    break;
  case OPT_L2_CACHE_SIZE:
    if (parse_size (optarg, &o->opts.l2_cache_bytes) < 0)
      bad_usage ("--l2-cache-size: '%s' is not a size", optarg);
    break;
  case OPT_MAX_MEMORY:
    if (parse_size (optarg, &max_memory) < 0 || max_memory == 0
        || max_memory > SIZE_MAX)
      bad_usage ("--max-memory: '%s' is not a size", optarg);
    mem_set_max_memory ((size_t) max_memory);
    break;
  case 'h':
    usage (stdout);
    exit (EXIT_SUCCESS);
  case OPT_VERSION:
    printf ("qnbd %s\n", PACKAGE_VERSION);
    exit (EXIT_SUCCESS);
  default:
    fprintf (stderr, "Try 'qnbd --help' for more information.\n");
    exit (EXIT_FAILURE);
  }
}

/* Fill o from the command line; a usage error exits. */
static void
parse_options (int argc, char *argv[], struct options *o)
{
  int c;

  /* --allow-dir can be given at most once per argument. */
  o->allow_dirs = calloc ((size_t) argc + 1, sizeof *o->allow_dirs);
  if (o->allow_dirs == NULL) {
    log_error ("%m");
    exit (EXIT_FAILURE);
  }
  o->opts.allow_dirs = o->allow_dirs;

  while ((c = getopt_long (argc, argv, short_options, long_options,
                           NULL)) != -1)
    parse_option (c, o);

  if (optind != argc - 1)
    bad_usage ("%s", optind >= argc ? "no image given" : "more than one image given");
  o->image = argv[optind];
  if (o->sock && (o->addr || o->port))
    bad_usage ("%s", "--socket cannot be used with --port or --bind");
  if (o->opts.force_share && !o->opts.read_only)
    bad_usage ("%s", "--force-share needs --read-only (or --load-snapshot)");
  if (o->port == NULL)
    o->port = DEFAULT_PORT;
}

/* Set up the loop and listen where o says (or on the activated sockets
 * systemd passed).  Returns 0 or -1 (logged).
 */
static int
start_listening (const struct options *o, int activated)
{
  int i;

  if (loop_init () < 0)
    return -1;
  loop_set_max_connections (o->shared);
  conn_set_handshake_limit (o->handshake_limit);
  if (activated > 0) {
    if (o->sock || o->addr)
      log_info ("socket activation: ignoring --socket/--port/--bind");
    for (i = 0; i < activated; i++)
      if (loop_listen_fd (LISTEN_FDS_START + i) < 0)
        return -1;
    return 0;
  }
  if (o->sock)
    return loop_listen_unix (o->sock);
  return loop_listen_tcp (o->addr, o->port);
}

int
main (int argc, char *argv[])
{
  struct options o = {
    .name = "",
    .opts = {
      .aio_mode = QCOW2_AIO_AUTO,
      .format = QCOW2_FORMAT_QCOW2,
      .backing = QCOW2_BACKING_CONFINE,
    },
    .discard = true,
    .handshake_limit = DEFAULT_HANDSHAKE_LIMIT,
  };
  int r, activated, status = EXIT_SUCCESS;
  struct export *e;

  /* Request buffers (up to 32 MiB) are allocated and freed per request.
   * Left to its defaults glibc maps each large one afresh and the kernel
   * zeroes every page of it on first touch: half the CPU of a 1 MiB read.
   * Keep them in the heap, and the heap from shrinking under them.
   * What a burst of them leaves free is given back later, once the
   * connections have let go of it (memory.c, "Giving the heap back").
   */
  mallopt (M_MMAP_THRESHOLD, 64 << 20);
  mallopt (M_TRIM_THRESHOLD, 256 << 20);

  /* Past a file size limit (ulimit -f) a write, a file extension or the
   * refcount repair at open must fail with EFBIG, not kill the daemon.
   */
  signal (SIGXFSZ, SIG_IGN);

  parse_options (argc, argv, &o);

  activated = socket_activation ();

  if (o.n_allow_dirs && o.opts.backing != QCOW2_BACKING_CONFINE)
    bad_usage ("%s", "--allow-dir only applies to --backing=confine");

  /* The image first: a bad one must fail before any socket exists. */
  r = export_add (o.name, o.description, o.image, &o.opts, o.discard);
  /* Only the open needed them: the engine keeps their real paths. */
  free (o.allow_dirs);
  o.opts.allow_dirs = NULL;
  if (r < 0)
    exit (EXIT_FAILURE);

  if (tls_init (o.tls, o.tls_certificates, o.tls_psk,
                o.tls_verify_peer) < 0 ||
      start_listening (&o, activated) < 0)
    goto fail;
  for (e = export_first (); e; e = e->next)
    loop_watch_export (e);

  if (o.pid_file && write_pid_file (o.pid_file) < 0)
    goto fail;
  if (log_verbosity >= 1)
    print_uri (o.image, o.name, o.sock, o.addr, o.port, activated);
  notify_ready ();

  loop_run ();

  if (export_close_all () < 0)
    status = EXIT_FAILURE;
  loop_cleanup ();
  tls_cleanup ();
  if (o.pid_file)
    unlink (o.pid_file);
  log_debug ("exiting with status %d", status);
  return status;

 fail:
  /* The loop first: it stops watching the images that close_all frees. */
  loop_cleanup ();
  export_close_all ();
  exit (EXIT_FAILURE);
}
