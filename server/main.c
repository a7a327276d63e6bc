/* server/main.c: the command line and startup of qnbd.
 *
 * Parse the options (or the -C configuration file, whose keys go through
 * the same parsing), open the images (an image that cannot be opened is one
 * line on stderr and exit status 1), listen (Unix socket, TCP, or the
 * sockets systemd passes), write the pid file, tell systemd we are ready,
 * run the loop until SIGTERM, then close the image, which flushes it.
 */
#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <assert.h>
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

enum {
  OPT_CACHE = 256,
  OPT_CACHE_SIZE,
  OPT_AIO,
  OPT_ALLOW_DIR,
  OPT_BACKING,
  OPT_BUSY_POLL,
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
  /* Access control, limits, privileges. */
  OPT_ALLOW_ADDRESS,
  OPT_ALLOW_PSK_USER,
  OPT_ALLOW_TLS_DN,
  OPT_GROUP,
  OPT_IDLE_TIMEOUT,
  OPT_MAX_CONNECTIONS,
  OPT_MAX_PER_CLIENT,
  OPT_TLS_REQUIRED,
  OPT_USER,
  OPT_SOCKET_MODE,
  OPT_SOCKET_OWNER,
  OPT_SOCKET_GROUP,
};

static const char short_options[] = "b:C:D:e:f:hk:l:p:rtUvx:";
static const struct option long_options[] = {
  { "aio",            required_argument, NULL, OPT_AIO },
  { "allow-dir",      required_argument, NULL, OPT_ALLOW_DIR },
  { "backing",        required_argument, NULL, OPT_BACKING },
  { "bind",           required_argument, NULL, 'b' },
  { "cache",          required_argument, NULL, OPT_CACHE },
  { "cache-size",     required_argument, NULL, OPT_CACHE_SIZE },
  { "compress",       no_argument,       NULL, OPT_COMPRESS },
  { "config",         required_argument, NULL, 'C' },
  { "busy-poll",      required_argument, NULL, OPT_BUSY_POLL },
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
  { "allow-address",  required_argument, NULL, OPT_ALLOW_ADDRESS },
  { "allow-psk-user", required_argument, NULL, OPT_ALLOW_PSK_USER },
  { "allow-tls-dn",   required_argument, NULL, OPT_ALLOW_TLS_DN },
  { "group",          required_argument, NULL, OPT_GROUP },
  { "idle-timeout",   required_argument, NULL, OPT_IDLE_TIMEOUT },
  { "max-connections", required_argument, NULL, OPT_MAX_CONNECTIONS },
  { "max-connections-per-client", required_argument, NULL,
    OPT_MAX_PER_CLIENT },
  { "tls-required",   no_argument,       NULL, OPT_TLS_REQUIRED },
  { "user",           required_argument, NULL, OPT_USER },
  { "socket-mode",    required_argument, NULL, OPT_SOCKET_MODE },
  { "socket-owner",   required_argument, NULL, OPT_SOCKET_OWNER },
  { "socket-group",   required_argument, NULL, OPT_SOCKET_GROUP },
  { NULL, 0, NULL, 0 },
};

static void
usage (FILE *fp)
{
  fprintf (fp,
"Usage: qnbd [OPTION]... IMAGE\n"
"       qnbd -C FILE [-v]... [--aio=MODE]\n"
"Export the qcow2 (or raw) image IMAGE over the Network Block Device protocol.\n"
"\n"
"  -C, --config=FILE        serve the exports of the configuration file FILE\n"
"                           (see qnbd(8)); the other options are then its\n"
"                           keys, not command-line options\n"
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
"      --busy-poll=USEC     after answering, poll without sleeping for up\n"
"                           to USEC microseconds while clients' next\n"
"                           requests come that soon (default: %d; 0: never)\n"
"      --max-memory=SIZE    stop taking requests while they hold SIZE\n"
"                           bytes (suffixes K, M, G; default: 512M)\n"
"      --cache-size=SIZE    the metadata caches of all exports together\n"
"                           hold at most SIZE bytes (default: 64M)\n"
"      --tls=off|on|require TLS (STARTTLS): off (default), on: offered,\n"
"                           require: nothing is served without it\n"
"      --tls-certificates=DIR  ca-cert.pem, server-cert.pem, server-key.pem\n"
"      --tls-psk=FILE       pre-shared keys, username:hexkey lines\n"
"      --tls-verify-peer    require a client certificate signed by the CA\n"
"      --max-connections=N  the same as --shared\n"
"      --max-connections-per-client=N  at most N connections at once from\n"
"                           one address (0: no limit; Unix sockets: none)\n"
"      --idle-timeout=N     close connections that have nothing in flight\n"
"                           and send nothing for N seconds (0: never)\n"
"      --user=USER, --group=GROUP  once listening and the images open,\n"
"                           run as USER and GROUP (root only)\n"
"      --socket-mode=MODE, --socket-owner=USER, --socket-group=GROUP\n"
"                           of the Unix sockets qnbd creates (an owner or\n"
"                           group alone: mode 0660)\n"
"\n"
"Who may use the export (the rules given must all pass):\n"
"      --allow-address=LIST addresses (ADDR[/BITS], \"unix\" for Unix-\n"
"                           socket clients), by spaces or commas (repeatable)\n"
"      --allow-tls-dn=DN    TLS clients whose verified certificate has this\n"
"                           subject DN (repeatable; --tls-verify-peer)\n"
"      --allow-psk-user=LIST  TLS clients with these PSK usernames\n"
"      --tls-required       only clients that did STARTTLS\n"
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
"sockets it is given, and creates only those of --socket, --port and\n"
"--bind that systemd did not pass (see qnbd(8), SOCKET ACTIVATION).\n",
           DEFAULT_PORT, DEFAULT_HANDSHAKE_LIMIT, DEFAULT_BUSY_POLL);
}

/* Where the configuration file key being parsed is, for bad_arg:
 * its messages then name the file, the line, the key and the section.
 */
static struct {
  const char *where, *key, *section;
  bool failed;                  /* bad_arg said why: the file is refused */
} config_pos;

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

/* A bad argument arg of the option opt ("--port"), or of the key being
 * read from the configuration file: the message says what is wrong.  A
 * key returns (config_pos.failed is set: the file is refused, at startup
 * or by a reload that must leave the running state alone); an option
 * exits.
 */
static void
bad_arg (const char *opt, const char *arg, const char *what)
{
  if (config_pos.where) {
    log_error ("%s: key '%s' in [%s]: '%s' %s", config_pos.where,
               config_pos.key, config_pos.section, arg, what);
    config_pos.failed = true;
    return;
  }
  bad_usage ("%s: '%s' %s", opt, arg, what);
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

/* One export: the command line's image, or a section of the
 * configuration file.
 */
struct export_options {
  const char *name, *description;
  const char *image;
  struct qcow2_opts opts;               /* how to open the image */
  const char **allow_dirs;              /* opts.allow_dirs, ours to free */
  size_t n_allow_dirs;
  bool discard;                         /* --discard=unmap */
  char *where;                          /* "FILE:LINE" of its section */
  struct access *access;                /* --allow-*, --tls-required; then
                                           the export's */
  char *sig[2];                         /* its keys as read, for reload:
                                           [0] RELOAD_LIVE, [1] REOPEN */
};

/* What the command line (or the configuration file) asks for. */
struct options {
  const char **socks;                   /* where to listen */
  size_t n_socks;
  const char *addr, *port;
  const char *pid_file;
  const char *config;                   /* -C */
  uint64_t max_memory;                  /* --max-memory, 0: not given */
  char *sig_restart;                    /* [server] keys a reload cannot
                                           apply, "key=value" lines */
  struct export_options *exports;
  size_t n_exports;
  struct export_options *exp;           /* the one options apply to */
  unsigned shared;                      /* --shared, 0: no limit */
  unsigned handshake_limit;             /* --handshake-limit */
  unsigned busy_poll;                   /* --busy-poll, microseconds */
  enum qcow2_aio_mode aio_mode;         /* --aio, for every export */
  char **strings;                       /* copies of the file's values */
  size_t n_strings;
  int tls;                              /* --tls, enum tls_mode */
  const char *tls_certificates;         /* --tls-certificates */
  const char *tls_psk;                  /* --tls-psk */
  bool tls_verify_peer;                 /* --tls-verify-peer */
  unsigned max_per_client;              /* --max-connections-per-client */
  unsigned idle_timeout;                /* --idle-timeout */
  const char *user, *group;             /* --user, --group */
  unsigned verbose;                     /* the file's verbose key */
  const char *socket_mode, *socket_owner, *socket_group;
  struct sockperm sockperm;             /* what they are */
  struct privs privs;                   /* what they are */
  uint64_t cache_size;                  /* --cache-size */
};

static void __attribute__ ((__noreturn__))
out_of_memory (void)
{
  log_error ("%m");
  exit (EXIT_FAILURE);
}

static void *
grow (void *array, size_t n, size_t size)
{
  array = realloc (array, (n + 1) * size);
  if (array == NULL)
    out_of_memory ();
  return array;
}

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
  char what[128];

  for (; k->word; k++)
    if (strcmp (arg, k->word) == 0)
      return k->value;
  snprintf (what, sizeof what, "is not one of %s", choices);
  bad_arg (opt, arg, what);
  return 0;                     /* a key: the file is refused */
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
static const struct keyword booleans[] = {
  { "true", true }, { "yes", true }, { "on", true }, { "1", true },
  { "false", false }, { "no", false }, { "off", false }, { "0", false },
  { NULL, 0 },
};
static const struct keyword tls_modes[] = {
  { "off", TLS_OFF }, { "on", TLS_ON }, { "require", TLS_REQUIRE },
  { NULL, 0 },
};
static const struct keyword aio_modes[] = {
  { "io_uring", QCOW2_AIO_URING }, { "threads", QCOW2_AIO_THREADS },
  { "auto", QCOW2_AIO_AUTO }, { NULL, 0 },
};

/* The export's --allow-dir list, kept NULL-terminated for the engine. */
static void
add_allow_dir (struct export_options *e, const char *dir)
{
  e->allow_dirs = grow (e->allow_dirs, e->n_allow_dirs + 1,
                        sizeof *e->allow_dirs);
  e->allow_dirs[e->n_allow_dirs++] = dir;
  e->allow_dirs[e->n_allow_dirs] = NULL;
  e->opts.allow_dirs = e->allow_dirs;
}

/* The export's access rules, made on first use. */
static struct access *
export_access (struct export_options *e)
{
  if (e->access == NULL) {
    if ((e->access = calloc (1, sizeof *e->access)) == NULL)
      out_of_memory ();
    e->access->refs = 1;
  }
  return e->access;
}

/* The options of access control, limits and privileges (c); false
 * when c is not one of them.
 */
static bool
parse_access_option (int c, const char *arg, struct options *o)
{
  char bad[300];

  switch (c) {
  case OPT_ALLOW_ADDRESS:
    if (access_add_addresses (export_access (o->exp), arg, bad,
                              sizeof bad) < 0)
      bad_arg ("--allow-address", bad, "is not an address, ADDR/BITS "
               "or unix");
    return true;
  case OPT_ALLOW_PSK_USER:
    if (access_add_psk_users (export_access (o->exp), arg, bad,
                              sizeof bad) < 0)
      bad_arg ("--allow-psk-user", bad, "is not a username");
    return true;
  case OPT_ALLOW_TLS_DN:
    if (access_add_dn (export_access (o->exp), arg) < 0)
      bad_arg ("--allow-tls-dn", arg, "is not a DN");
    return true;
  case OPT_TLS_REQUIRED:
    export_access (o->exp)->tls_required = true;
    return true;
  case OPT_MAX_CONNECTIONS:
    if (parse_uint (arg, UINT_MAX, &o->shared) < 0)
      bad_arg ("--max-connections", arg, "is not a number");
    return true;
  case OPT_MAX_PER_CLIENT:
    if (parse_uint (arg, UINT_MAX, &o->max_per_client) < 0)
      bad_arg ("--max-connections-per-client", arg, "is not a number");
    return true;
  case OPT_IDLE_TIMEOUT:
    if (parse_uint (arg, UINT_MAX, &o->idle_timeout) < 0)
      bad_arg ("--idle-timeout", arg, "is not a number of seconds");
    return true;
  case OPT_USER: o->user = arg; return true;
  case OPT_GROUP: o->group = arg; return true;
  case OPT_SOCKET_MODE: o->socket_mode = arg; return true;
  case OPT_SOCKET_OWNER: o->socket_owner = arg; return true;
  case OPT_SOCKET_GROUP: o->socket_group = arg; return true;
  default: return false;
  }
}

/* One option c (getopt_long's answer) with its argument arg.  The
 * configuration file's keys come here too: one validation for both.
 */
static void
parse_option (int c, const char *arg, struct options *o)
{
  struct export_options *e = o->exp;
  unsigned port_n;
  uint64_t max_memory;

  if (parse_access_option (c, arg, o))
    return;
  switch (c) {
  case 'k':
    /* A second --socket replaces the first; the file may list several. */
    if (!config_pos.where)
      o->n_socks = 0;
    o->socks = grow (o->socks, o->n_socks, sizeof *o->socks);
    o->socks[o->n_socks++] = arg;
    break;
  case 'b': o->addr = arg; break;
  case 'x': e->name = arg; break;
  case 'D': e->description = arg; break;
  case 'r': e->opts.read_only = true; break;
  case 'U': e->opts.force_share = true; break;
  case 't': break;              /* qnbd always serves until it is stopped */
  case OPT_COMPRESS: e->opts.compress = true; break;
  case OPT_ALLOW_DIR: add_allow_dir (e, arg); break;
  case OPT_PID_FILE: o->pid_file = arg; break;
  case OPT_TLS:
    o->tls = keyword ("--tls", arg, tls_modes, "off, on or require");
    break;
  case OPT_TLS_CERTIFICATES: o->tls_certificates = arg; break;
  case OPT_TLS_PSK: o->tls_psk = arg; break;
  case OPT_TLS_VERIFY_PEER: o->tls_verify_peer = true; break;
  case 'v': log_verbosity++; break;
  case 'p':
    if (parse_uint (arg, 65535, &port_n) < 0 || port_n == 0)
      bad_arg ("--port", arg, "is not a port number");
    o->port = arg;
    break;
  case 'e':
    if (parse_uint (arg, UINT_MAX, &o->shared) < 0)
      bad_arg ("--shared", arg, "is not a number");
    break;
  case OPT_HANDSHAKE_LIMIT:
    if (parse_uint (arg, UINT_MAX, &o->handshake_limit) < 0)
      bad_arg ("--handshake-limit", arg, "is not a number of seconds");
    break;
  case OPT_BUSY_POLL:
    if (parse_uint (arg, MAX_BUSY_POLL, &o->busy_poll) < 0)
      bad_arg ("--busy-poll", arg,
               "is not a number of microseconds up to 10000");
    break;
  case 'f':
    e->opts.format = keyword ("--format", arg, formats,
                              "qcow2, raw or auto");
    break;
  case 'l':
    /* As with qemu-nbd, a snapshot is always served read-only. */
    e->opts.snapshot = arg;
    e->opts.read_only = true;
    break;
  case OPT_DISCARD:
    e->discard = keyword ("--discard", arg, discards, "unmap or ignore");
    break;
  case OPT_BACKING:
    e->opts.backing = keyword ("--backing", arg, backings,
                               "confine, follow or none");
    break;
  case OPT_CACHE:
    e->opts.direct = keyword ("--cache", arg, caches,
                              "writeback or none");
    break;
  case OPT_AIO:
    e->opts.aio_mode = keyword ("--aio", arg, aio_modes,
                                "io_uring or threads");
    break;
  case OPT_L2_CACHE_SIZE:
    if (parse_size (arg, &e->opts.l2_cache_bytes) < 0)
      bad_arg ("--l2-cache-size", arg, "is not a size");
    break;
  case OPT_MAX_MEMORY:
    if (parse_size (arg, &max_memory) < 0 || max_memory == 0
        || max_memory > SIZE_MAX)
      bad_arg ("--max-memory", arg, "is not a size");
    else
      o->max_memory = max_memory;
    break;
  case OPT_CACHE_SIZE:
    if (parse_size (arg, &o->cache_size) < 0 || o->cache_size == 0)
      bad_arg ("--cache-size", arg, "is not a size");
    break;
  case 'C': o->config = arg; break;
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

/* A new export with the defaults, which options then change. */
static struct export_options *
new_export (struct options *o)
{
  struct export_options *e;

  o->exports = grow (o->exports, o->n_exports, sizeof *o->exports);
  e = &o->exports[o->n_exports++];
  *e = (struct export_options) {
    .name = "",
    .opts = {
      .aio_mode = o->aio_mode,
      .format = QCOW2_FORMAT_QCOW2,
      .backing = QCOW2_BACKING_CONFINE,
    },
    .discard = true,
  };
  return e;
}

/* What an export must not combine; where names its section, NULL on the
 * command line.  Returns 0, or -1 for a section (logged); exits for the
 * command line.
 */
static int
check_export (const struct export_options *e)
{
  const char *err = NULL;

  if (e->opts.force_share && !e->opts.read_only)
    err = e->where ? "force-share needs readonly (or snapshot)"
      : "--force-share needs --read-only (or --load-snapshot)";
  else if (e->n_allow_dirs && e->opts.backing != QCOW2_BACKING_CONFINE)
    err = e->where ? "allow-dir only applies to backing=confine"
      : "--allow-dir only applies to --backing=confine";
  if (err == NULL)
    return 0;
  if (e->where == NULL)
    bad_usage ("%s", err);
  log_error ("%s: %s in [export %s]", e->where, err, e->name);
  return -1;
}

/* The keys of the configuration file: the long option each one is, and
 * the section it belongs in.  "file" is the export's image.
 */
#define KEY_FILE (-1)
#define KEY_VERBOSE (-2)        /* -v, -vv: 1, 2 */
static const struct config_key {
  const char *key;
  int opt;
  bool server;                  /* [server], else [export NAME] */
  bool repeatable;
} config_keys[] = {
  { "socket", 'k', true, true },
  { "port", 'p', true, false },
  { "bind", 'b', true, false },
  { "shared", 'e', true, false },
  { "handshake-limit", OPT_HANDSHAKE_LIMIT, true, false },
  { "busy-poll", OPT_BUSY_POLL, true, false },
  { "max-memory", OPT_MAX_MEMORY, true, false },
  { "cache-size", OPT_CACHE_SIZE, true, false },
  { "pid-file", OPT_PID_FILE, true, false },
  { "tls", OPT_TLS, true, false },
  { "tls-certificates", OPT_TLS_CERTIFICATES, true, false },
  { "tls-psk", OPT_TLS_PSK, true, false },
  { "tls-verify-peer", OPT_TLS_VERIFY_PEER, true, false },
  { "verbose", KEY_VERBOSE, true, false },
  { "file", KEY_FILE, false, false },
  { "format", 'f', false, false },
  { "readonly", 'r', false, false },
  { "description", 'D', false, false },
  { "discard", OPT_DISCARD, false, false },
  { "compress", OPT_COMPRESS, false, false },
  { "snapshot", 'l', false, false },
  { "force-share", 'U', false, false },
  { "backing", OPT_BACKING, false, false },
  { "allow-dir", OPT_ALLOW_DIR, false, true },
  { "cache", OPT_CACHE, false, false },
  { "l2-cache-size", OPT_L2_CACHE_SIZE, false, false },
  { "max-connections", OPT_MAX_CONNECTIONS, true, false },
  { "max-connections-per-client", OPT_MAX_PER_CLIENT, true, false },
  { "idle-timeout", OPT_IDLE_TIMEOUT, true, false },
  { "user", OPT_USER, true, false },
  { "group", OPT_GROUP, true, false },
  { "socket-mode", OPT_SOCKET_MODE, true, false },
  { "socket-owner", OPT_SOCKET_OWNER, true, false },
  { "socket-group", OPT_SOCKET_GROUP, true, false },
  { "allow-address", OPT_ALLOW_ADDRESS, false, true },
  { "allow-tls-dn", OPT_ALLOW_TLS_DN, false, true },
  { "allow-psk-user", OPT_ALLOW_PSK_USER, false, true },
  { "tls-required", OPT_TLS_REQUIRED, false, false },
};
#define N_CONFIG_KEYS (sizeof config_keys / sizeof config_keys[0])

/* What a reload (SIGHUP) does when a key changes ("RELOAD" in
 * qnbd.conf(5)).  An export key in reopen_keys needs the image opened
 * again; any other export key is swapped in for new connections.  A
 * [server] key in live_server_keys applies at once (apply_limits); any
 * other one needs a restart (the reload says so).
 */
enum { RELOAD_LIVE, RELOAD_REOPEN, RELOAD_RESTART };
static const char *const reopen_keys[] = {
  "file", "format", "readonly", "compress", "snapshot", "force-share",
  "backing", "allow-dir", "cache", "l2-cache-size", NULL,
};
static const char *const live_server_keys[] = {
  "shared", "handshake-limit", "max-memory", "verbose", "busy-poll", NULL,
};

static int
reload_class (const struct config_key *k)
{
  const char *const *list = k->server ? live_server_keys : reopen_keys;

  for (; *list; list++)
    if (strcmp (*list, k->key) == 0)
      return k->server ? RELOAD_LIVE : RELOAD_REOPEN;
  return k->server ? RELOAD_RESTART : RELOAD_LIVE;
}

/* Add the line "key=value" to *sig (NULL: nothing).  Returns 0 or -1. */
static int
append_sig (char **sig, const char *key, const char *value)
{
  size_t old, len;
  char *p;

  if (sig == NULL)
    return 0;
  old = *sig ? strlen (*sig) : 0;
  len = strlen (key) + 1 + strlen (value) + 1;
  p = realloc (*sig, old + len + 1);
  if (p == NULL)
    return -1;
  snprintf (p + old, len + 1, "%s=%s\n", key, value);
  *sig = p;
  return 0;
}

/* What the reading of the configuration file keeps between calls. */
struct config_state {
  struct options *o;
  bool seen[N_CONFIG_KEYS];     /* in the current section */
  char section[NBD_MAX_STRING + 16];
};

static int
config_section (void *opaque, const char *where, const char *name)
{
  struct config_state *st = opaque;
  struct options *o = st->o;

  memset (st->seen, 0, sizeof st->seen);
  o->exp = NULL;
  if (name == NULL) {
    snprintf (st->section, sizeof st->section, "server");
    return 0;
  }
  snprintf (st->section, sizeof st->section, "export %s", name);
  o->exp = new_export (o);
  o->strings = grow (o->strings, o->n_strings + 1, sizeof *o->strings);
  o->exp->name = o->strings[o->n_strings++] = strdup (name);
  o->strings = grow (o->strings, o->n_strings + 1, sizeof *o->strings);
  o->exp->where = o->strings[o->n_strings++] = strdup (where);
  if (o->exp->name == NULL || o->exp->where == NULL)
    out_of_memory ();
  return 0;
}

static int
config_key (void *opaque, const char *where, const char *key,
            const char *value)
{
  struct config_state *st = opaque;
  struct options *o = st->o;
  const struct config_key *k;
  char *copy, **sig;
  size_t i;

  for (i = 0; i < N_CONFIG_KEYS; i++)
    if (strcmp (config_keys[i].key, key) == 0 &&
        config_keys[i].server == (o->exp == NULL))
      break;
  if (i == N_CONFIG_KEYS) {
    log_error ("%s: unknown key '%s' in [%s]", where, key, st->section);
    return -1;
  }
  k = &config_keys[i];
  if (st->seen[i] && !k->repeatable) {
    log_error ("%s: key '%s' given twice in [%s]", where, key, st->section);
    return -1;
  }
  st->seen[i] = true;

  /* The values outlive libinih's line buffer. */
  o->strings = grow (o->strings, o->n_strings + 1, sizeof *o->strings);
  copy = o->strings[o->n_strings++] = strdup (value);
  if (copy == NULL)
    out_of_memory ();

  switch (reload_class (k)) {
  case RELOAD_LIVE: sig = o->exp ? &o->exp->sig[0] : NULL; break;
  case RELOAD_REOPEN: sig = &o->exp->sig[1]; break;
  default: sig = &o->sig_restart; break;
  }
  if (append_sig (sig, key, value) < 0)
    out_of_memory ();
  config_pos.where = where;
  config_pos.key = key;
  config_pos.section = st->section;
  if (k->opt == KEY_FILE)
    o->exp->image = copy;
  else if (k->opt == KEY_VERBOSE) {
    if (parse_uint (copy, 2, &o->verbose) < 0)
      bad_arg ("verbose", copy, "is not 0, 1 or 2");
  }
  else {
    bool flag = false;
    for (i = 0; i < sizeof long_options / sizeof long_options[0]; i++)
      if (long_options[i].val == k->opt)
        flag = long_options[i].has_arg == no_argument;
    /* Switches take a boolean; false leaves the default (off). */
    if (!flag || keyword ("", copy, booleans, "true or false"))
      parse_option (k->opt, copy, o);
  }
  config_pos.where = NULL;
  return config_pos.failed ? -1 : 0;
}

static int
config_end (void *opaque, const char *where)
{
  struct config_state *st = opaque;
  struct export_options *e = st->o->exp;

  if (e == NULL)
    return 0;
  if (e->image == NULL) {
    log_error ("%s: key 'file' missing in [%s]", where, st->section);
    return -1;
  }
  return check_export (e);
}

/* Fill o from the configuration file o->config.  Returns 0, or -1 once
 * the file, the line and the cause are logged.
 */
static int
read_config (struct options *o)
{
  static const struct config_ops ops = {
    .section = config_section, .key = config_key, .end = config_end,
  };
  struct config_state st = { .o = o };

  config_pos.failed = false;
  if (config_read (o->config, &ops, &st) < 0)
    return -1;
  if (o->n_exports == 0) {
    log_error ("%s: no [export NAME] section", o->config);
    return -1;
  }
  return 0;
}

/* The long name of option c, for messages. */
static const char *
option_name (int c)
{
  for (const struct option *l = long_options; l->name; l++)
    if (l->val == c)
      return l->name;
  return "?";
}

/* What an export's access rules need of the server's TLS settings. */
static void
check_access (const struct options *o, const struct export_options *e)
{
  const struct access *a = e->access;
  const char *err = NULL;

  if (a == NULL)
    return;
  if (access_needs_tls (a) && o->tls == TLS_OFF)
    err = "tls-required, allow-tls-dn and allow-psk-user need tls on or "
      "require";
  else if (a->n_dns && (!o->tls_verify_peer || !o->tls_certificates))
    err = "allow-tls-dn needs tls-certificates and tls-verify-peer "
      "(a DN is only worth what its verification is)";
  else if (a->n_psk_users && !o->tls_psk)
    err = "allow-psk-user needs tls-psk";
  if (err == NULL)
    return;
  if (e->where == NULL)
    bad_usage ("%s", err);
  log_error ("%s: %s, in [export %s]", e->where, err, e->name);
  exit (EXIT_FAILURE);
}

/* Fill o from the command line; a usage error exits. */
/* How many -v the command line gave: the file's verbose adds none. */
static int cmdline_verbosity;

static void
parse_options (int argc, char *argv[], struct options *o)
{
  int c, other = 0;

  o->exp = new_export (o);
  while ((c = getopt_long (argc, argv, short_options, long_options,
                           NULL)) != -1) {
    parse_option (c, optarg, o);
    if (c != 'C' && c != 'v' && c != OPT_AIO)
      other = c;
  }
  cmdline_verbosity = log_verbosity;

  if (o->config) {
    /* One place says what is served: the file. */
    if (optind != argc)
      bad_usage ("%s", "-C: the exports are in the configuration file: "
                 "no IMAGE argument");
    if (other)
      bad_usage ("--%s cannot be used with -C: the configuration file "
                 "says it", option_name (other));
    o->aio_mode = o->exp->opts.aio_mode;
    o->n_exports = 0;
    free (o->exp->allow_dirs);
    if (read_config (o) < 0)
      exit (EXIT_FAILURE);
    if ((int) o->verbose > log_verbosity)
      log_verbosity = o->verbose;
  }
  else {
    if (optind != argc - 1)
      bad_usage ("%s", optind >= argc ? "no image given"
                 : "more than one image given");
    o->exp->image = argv[optind];
    if (o->n_socks && (o->addr || o->port))
      bad_usage ("%s", "--socket cannot be used with --port or --bind");
    check_export (o->exp);
  }
  o->exp = NULL;
  for (size_t i = 0; i < o->n_exports; i++)
    check_access (o, &o->exports[i]);
}

/* ------------------------------------------------------------------ */
/* Reload (SIGHUP): the -C file read again, into a new struct options.  */
/* ------------------------------------------------------------------ */

/* The options in force, and those of earlier reloads: a pending reopen
 * (reload.c) still points at their strings, so none is freed.
 */
static struct options *running;
struct generation {
  struct generation *prev;
  struct options *o;
};
static struct generation *generations;

/* Free what read_config allocated in o (a file a reload refused). */
static void
free_options (struct options *o)
{
  for (size_t i = 0; i < o->n_exports; i++) {
    free (o->exports[i].allow_dirs);
    free (o->exports[i].sig[0]);
    free (o->exports[i].sig[1]);
    access_free (o->exports[i].access);
  }
  for (size_t i = 0; i < o->n_strings; i++)
    free (o->strings[i]);
  free (o->strings);
  free (o->exports);
  free (o->socks);
  free (o->sig_restart);
  free (o);
}

/* reload.c made e from the export_options opaque: its access rules are
 * those of its section (shared with any other export made from them).
 */
static void
export_made (struct export *e, void *opaque)
{
  struct export_options *eo = opaque;

  assert (e->access == NULL);
  e->access = access_ref (eo->access);
}

/* Hand o's exports to reload.c (apply: reload_apply, else reload_init).
 * Returns 0 or -1 (logged).
 */
static int
reload_exports (const struct options *o, bool apply)
{
  struct reload_export *xs = calloc (o->n_exports, sizeof *xs);

  if (xs == NULL) {
    log_error ("reload: %m");
    return -1;
  }
  for (size_t i = 0; i < o->n_exports; i++) {
    const struct export_options *e = &o->exports[i];

    xs[i] = (struct reload_export) {
      .name = e->name, .description = e->description, .image = e->image,
      .opts = &e->opts, .discard = e->discard,
      .sig_live = e->sig[0] ? e->sig[0] : "",
      .sig_open = e->sig[1] ? e->sig[1] : "",
      .opaque = (void *) e,
    };
  }
  if (apply)
    reload_apply (xs, o->n_exports);
  else if (reload_init (xs, o->n_exports, export_made) < 0) {
    free (xs);
    return -1;
  }
  free (xs);
  return 0;
}

/* The limits of [server] that apply without a restart. */
static void
apply_limits (const struct options *o)
{
  loop_set_max_connections (o->shared);
  conn_set_handshake_limit (o->handshake_limit);
  busy_poll_configure (o->busy_poll);
  mem_set_max_memory (o->max_memory ? (size_t) o->max_memory
                      : DEFAULT_MAX_MEMORY);
  log_verbosity = (int) o->verbose > cmdline_verbosity ? (int) o->verbose
    : cmdline_verbosity;
}

/* The lines of sig (NULL: none) for key, in order, into buf. */
static void
key_lines (const char *sig, const char *key, char *buf, size_t size)
{
  size_t klen = strlen (key), n = 0;

  buf[0] = '\0';
  for (const char *l = sig; l && *l; l = strchr (l, '\n') + 1) {
    size_t len = strchr (l, '\n') + 1 - l;

    if (strncmp (l, key, klen) == 0 && l[klen] == '=' && n + len < size) {
      memcpy (buf + n, l, len);
      n += len;
      buf[n] = '\0';
    }
  }
}

/* Say which [server] keys changed that apply only after a restart (the
 * listen addresses, pid-file, TLS): old and new are their sig_restart.
 */
static void
warn_restart (const char *old, const char *new, const char *path)
{
  char changed[256] = "", a[1024], b[1024];
  size_t n = 0;

  for (size_t i = 0; i < N_CONFIG_KEYS; i++) {
    const struct config_key *k = &config_keys[i];

    if (!k->server || reload_class (k) != RELOAD_RESTART)
      continue;
    key_lines (old, k->key, a, sizeof a);
    key_lines (new, k->key, b, sizeof b);
    if (strcmp (a, b) != 0 && n < sizeof changed)
      n += snprintf (changed + n, sizeof changed - n, "%s%s",
                     n ? ", " : "", k->key);
  }
  if (n)
    log_warning ("reload: %s: [server] %s changed: applies after a "
                 "restart, not now", path, changed);
}

/* SIGHUP (loop.c): read the -C file again; apply it only if all of it
 * is good.
 */
static void
reload_config (void)
{
  struct options *o = calloc (1, sizeof *o);
  struct generation *g = calloc (1, sizeof *g);

  notify_reloading ();
  if (o == NULL || g == NULL) {
    log_error ("reload: %m");
    free (o);
    free (g);
    notify_ready ();
    return;
  }
  log_info ("reload: reading %s", running->config);
  o->config = running->config;
  o->aio_mode = running->aio_mode;
  o->handshake_limit = DEFAULT_HANDSHAKE_LIMIT;
  o->busy_poll = DEFAULT_BUSY_POLL;
  if (read_config (o) < 0) {
    log_error ("reload: %s refused: the running configuration stays",
               o->config);
    free_options (o);
    free (g);
    notify_ready ();
    return;
  }
  warn_restart (running->sig_restart, o->sig_restart, o->config);
  apply_limits (o);
  reload_exports (o, true);
  g->o = running;
  g->prev = generations;
  generations = g;
  running = o;
  notify_ready ();
}

/* Set up the loop and listen where o says (or on the activated sockets
 * systemd passed).  Returns 0 or -1 (logged).
 */
static int
start_listening (const struct options *o, int activated)
{
  size_t j;

  if (loop_init () < 0)
    return -1;
  loop_set_max_connections (o->shared);
  loop_set_max_per_client (o->max_per_client);
  conn_set_handshake_limit (o->handshake_limit);
  conn_set_idle_timeout (o->idle_timeout);
  busy_poll_configure (o->busy_poll);
  /* systemd's sockets, matched to the entries (activation.c). */
  if (activated > 0)
    return activation_listen (o->socks, o->n_socks, o->addr,
                              o->addr || o->port ? (o->port ? o->port
                                                    : DEFAULT_PORT) : NULL);
  for (j = 0; j < o->n_socks; j++)
    if (loop_listen_unix (o->socks[j]) < 0)
      return -1;
  /* TCP by default, and beside sockets when the file asks for it. */
  if (o->n_socks && !o->addr && !o->port)
    return 0;
  return loop_listen_tcp (o->addr, o->port ? o->port : DEFAULT_PORT);
}

/* Open every export: a bad image fails before any socket exists. */
static void
open_exports (struct options *o)
{
  int r = 0;

  for (size_t i = 0; i < o->n_exports && r == 0; i++) {
    struct export_options *e = &o->exports[i];

    r = export_add (e->name, e->description, e->image, &e->opts,
                    e->discard);
    /* The rules now belong to the export (and are freed with it). */
    if (r == 0) {
      export_find (e->name, strlen (e->name))->access = e->access;
      e->access = NULL;
    }
  }
  /* Only the open needed them: the engine keeps their real paths. */
  for (size_t i = 0; i < o->n_exports; i++) {
    free (o->exports[i].allow_dirs);
    o->exports[i].allow_dirs = NULL;
    o->exports[i].opts.allow_dirs = NULL;
  }
  if (r < 0) {
    export_close_all ();
    exit (EXIT_FAILURE);
  }
}

/* --user, --group: the pid file and our Unix sockets go to the user
 * first, so that it may remove them at exit (which also needs the
 * directory writable by it, or sticky as /tmp is).
 */
static int
drop_privileges (const struct options *o, int activated)
{
  if (!o->privs.set_uid && !o->privs.set_gid)
    return 0;
  if (o->pid_file && privs_chown (&o->privs, o->pid_file) < 0)
    return -1;
  /* (Unless --socket-owner/--socket-group said whose they are.) */
  for (size_t i = 0; activated == 0 && i < o->n_socks &&
         !o->sockperm.set_uid && !o->sockperm.set_gid; i++)
    if (privs_chown (&o->privs, o->socks[i]) < 0)
      return -1;
  if (privs_drop (&o->privs) < 0)
    return -1;
  /* GnuTLS reads the keys file at each PSK handshake, as the user. */
  if (o->tls_psk && access (o->tls_psk, R_OK) < 0) {
    log_error ("--tls-psk: %s: %m, once running as --user/--group "
               "(it is read at each handshake)", o->tls_psk);
    return -1;
  }
  return 0;
}

int
main (int argc, char *argv[])
{
  /* Static: what it holds lives as long as the process. */
  static struct options o = {
    .handshake_limit = DEFAULT_HANDSHAKE_LIMIT,
    .busy_poll = DEFAULT_BUSY_POLL,
    .aio_mode = QCOW2_AIO_AUTO,
    .cache_size = DEFAULT_CACHE_SIZE,
  };
  int activated, status = EXIT_SUCCESS;
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
  /* Before the images are opened: a mistake costs nothing yet. */
  if (privs_init (&o.privs, o.user, o.group) < 0 ||
      sockperm_init (&o.sockperm, o.socket_mode, o.socket_owner,
                     o.socket_group) < 0)
    exit (EXIT_FAILURE);
  loop_set_sockperm (&o.sockperm);
  if (o.max_memory)
    mem_set_max_memory ((size_t) o.max_memory);

  activated = activation_init ();
  if (activated < 0)
    exit (EXIT_FAILURE);

  if (export_set_cache_size (o.cache_size) < 0)
    exit (EXIT_FAILURE);
  open_exports (&o);

  if (tls_init (o.tls, o.tls_certificates, o.tls_psk,
                o.tls_verify_peer) < 0 ||
      start_listening (&o, activated) < 0)
    goto fail;
  for (e = export_first (); e; e = e->next)
    loop_watch_export (e);
  if (o.config) {
    running = &o;
    if (reload_exports (&o, false) < 0)
      goto fail;
    loop_on_reload (reload_config);
  }

  if (o.pid_file && write_pid_file (o.pid_file) < 0)
    goto fail;
  if (drop_privileges (&o, activated) < 0) {
    if (o.pid_file)
      unlink (o.pid_file);
    goto fail;
  }
  if (log_verbosity >= 1)
    for (size_t i = 0; i < o.n_exports; i++)
      print_uri (o.exports[i].image, o.exports[i].name,
                 o.n_socks ? o.socks[0] : NULL, o.addr,
                 o.port ? o.port : DEFAULT_PORT, activated);
  notify_ready ();

  loop_run ();

  reload_cleanup ();
  if (export_close_all () < 0)
    status = EXIT_FAILURE;
  export_free_cache_budget ();
  loop_cleanup ();
  activation_cleanup ();
  tls_cleanup ();
  if (o.pid_file)
    unlink (o.pid_file);
  log_debug ("exiting with status %d", status);
  return status;

 fail:
  /* The loop first: it stops watching the images that close_all frees. */
  reload_cleanup ();
  loop_cleanup ();
  export_close_all ();
  exit (EXIT_FAILURE);
}
