/* server/internal.h: what the daemon's files share.
 *
 * One section per source file, listing that file's structs and externs, so
 * that a declaration tells where its definition lives.  Nothing here is
 * visible outside server/.
 *
 * The whole daemon runs on one thread, the libev loop: no locks anywhere.
 */
#ifndef QNBD_SERVER_INTERNAL_H
#define QNBD_SERVER_INTERNAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/uio.h>

#include <ev.h>

#include "qcow2.h"
#include "nbd-protocol.h"

#define QNBD_PRINTF(fmt, args) __attribute__ ((__format__ (__printf__, fmt, args)))

/* ------------------------------------------------------------------ */
/* Limits.                                                             */
/* ------------------------------------------------------------------ */

/* Largest READ/WRITE payload; advertised as the maximum block size.
 * TRIM, WRITE_ZEROES, CACHE and BLOCK_STATUS carry no payload and are not
 * bound by it (the kernel sends TRIMs of about 2 GiB).
 */
#define MAX_PAYLOAD         (32u * 1024 * 1024)

/* NBD_CMD_CACHE reads the data of its range into a scratch buffer of at
 * most this many bytes, one engine read after the other, finding it with
 * block status calls of at most CACHE_EXTENTS extents.
 */
#define CACHE_CHUNK         (8u * 1024 * 1024)
#define CACHE_EXTENTS       64

/* Most extents asked of the engine for one NBD_CMD_BLOCK_STATUS (fewer
 * with NBD_CMD_FLAG_REQ_ONE, which sends only the first).  The answer may
 * then cover only a prefix of the range, which the protocol allows.
 */
#define STATUS_MAX_EXTENTS  1024
#define STATUS_REQ_ONE_EXTENTS 16

/* A structured READ reply describes a run of zeros with an
 * NBD_REPLY_TYPE_OFFSET_HOLE chunk only from this length on: shorter runs
 * go out as data, so that replies are not cut into many small chunks.
 */
#define SPARSE_MIN_HOLE     4096

/* Most extents of a READ's zero map (qcow2_read_map); past it the engine
 * reports the rest as data, which is still true.
 */
#define SPARSE_MAX_EXTENTS  1024

/* Longest option data accepted during the handshake: more is a hostile
 * client, which is disconnected.
 */
#define MAX_OPTION_LENGTH   (64u * 1024)

/* Options one client may send before it is disconnected. */
#define MAX_OPTIONS         64

/* Per connection: requests received and not yet answered, and the data
 * bytes they hold.  Past either, the socket is not read.
 */
#define CONN_MAX_IN_FLIGHT  64

/* The default of --max-memory: past it no connection starts a request
 * (except as mem_admit says) until replies drain.
 */
#define DEFAULT_MAX_MEMORY  (512u * 1024 * 1024)
/* The default of --cache-size: what the metadata caches (L2 slices,
 * refcount blocks) of all exports hold together.  One image's caches
 * stop at 36 MiB by themselves (32 MiB of L2), so a single export is
 * not held back by it.
 */
#define DEFAULT_CACHE_SIZE  (64u * 1024 * 1024)
/* A request of at most this many bytes may always start on a connection
 * that has nothing else in flight.
 */
#define SMALL_REQUEST       (256u * 1024)
#define CONN_MAX_BUFFERED   (64u * 1024 * 1024)

/* Size of a connection's read buffer: holds the largest option with its
 * header, and many request headers at a time.
 */
#define CONN_RBUF_SIZE      (128u * 1024)

/* Alignment of request data buffers (O_DIRECT needs it). */
#define BUFFER_ALIGN        4096

/* Seconds a client gets by default from its connection to the end of the
 * handshake (--handshake-limit), as with qemu-nbd.
 */
#define DEFAULT_HANDSHAKE_LIMIT 10

/* Microseconds the loop may poll without sleeping after work (--busy-poll):
 * QEMU's default for its adaptive polling too.
 */
#define DEFAULT_BUSY_POLL 32

/* The most --busy-poll takes: a longer spin only burns the core (the
 * message refusing more says 10000).
 */
#define MAX_BUSY_POLL 10000

/* ------------------------------------------------------------------ */
/* activation.c                                                        */
/* ------------------------------------------------------------------ */

/* Socket activation: the listening sockets systemd passed us (LISTEN_PID,
 * LISTEN_FDS, LISTEN_FDNAMES; the variables are then removed).  Returns
 * their number, 0 when not activated, or -1 (logged) when one is not a
 * listening stream socket.
 */
int activation_init (void);

/* Listen on every passed socket, and on each listen entry systemd did not
 * pass: the Unix sockets socks[0..n_socks), and TCP on addr (NULL: every
 * address) and port when port is not NULL.  A passed socket is matched to
 * an entry by its address; one that matches none is served with a warning
 * (unless there is no entry at all).  After activation_init returned > 0.
 * Returns 0 or -1 (logged).
 */
int activation_listen (const char *const *socks, size_t n_socks,
                       const char *addr, const char *port);

/* Free what activation_init kept (at exit). */
void activation_cleanup (void);

/* ------------------------------------------------------------------ */
/* main.c                                                              */
/* ------------------------------------------------------------------ */

/* (main.c has no externs: it parses options and calls the others.) */

/* ------------------------------------------------------------------ */
/* log.c                                                               */
/* ------------------------------------------------------------------ */

/* 0: errors and warnings only; 1 (-v): and information; 2 (-vv): and
 * debugging.
 */
extern int log_verbosity;

/* Print one line to stderr, prefixed "qnbd: ".  errno is preserved, so
 * "%m" works in the format.
 */
void log_error (const char *fmt, ...) QNBD_PRINTF (1, 2);
void log_warning (const char *fmt, ...) QNBD_PRINTF (1, 2);
void log_info (const char *fmt, ...) QNBD_PRINTF (1, 2);
void log_debug (const char *fmt, ...) QNBD_PRINTF (1, 2);

/* The engine's log hook (struct qcow2_opts.log).  While log_engine_quiet
 * is set, the engine's messages are demoted to debugging: qcow2_open
 * failures are reported by the caller as one line of their own.
 */
void log_engine (void *opaque, int level, const char *msg);
extern bool log_engine_quiet;

/* ------------------------------------------------------------------ */
/* access.c                                                            */
/* ------------------------------------------------------------------ */

/* A client's address, as the access rules and the per-client connection
 * limit see it: an IPv4-mapped IPv6 address is the IPv4 address.
 */
struct peer_addr {
  int family;                   /* AF_INET, AF_INET6, AF_UNIX (no address),
                                   0: unknown */
  unsigned char a[16];          /* the address (4 bytes for AF_INET) */
};

/* One network of allow-address. */
struct access_net {
  int family;                   /* AF_INET or AF_INET6 */
  unsigned char a[16];
  unsigned bits;                /* prefix length */
};

/* Who may use an export (its allow-* and tls-required keys): plain data,
 * read by access_check.  NULL, or an empty rule, lets everyone in.
 */
struct access {
  bool address_rule;            /* allow-address given: it must match */
  bool unix_ok;                 /* "unix" listed: Unix-socket clients */
  struct access_net *nets;
  size_t n_nets;
  char **dns;                   /* allow-tls-dn, subject DNs as GnuTLS
                                   prints them */
  size_t n_dns;
  char **psk_users;             /* allow-psk-user */
  size_t n_psk_users;
  bool tls_required;            /* tls-required */
  unsigned refs;                /* the export_options of a configuration
                                   and each export made from them (a
                                   reload may make several, see
                                   access_ref) */
};

/* The peer_addr of the socket address sa (len bytes). */
void access_peer_from (struct peer_addr *p, const struct sockaddr *sa,
                       socklen_t len);
/* Whether a and b are the same address (all Unix clients are one). */
bool access_peer_same (const struct peer_addr *a, const struct peer_addr *b);
/* p as text for log lines, in buf (at least INET6_ADDRSTRLEN bytes) or a
 * constant ("unix").
 */
const char *access_peer_name (const struct peer_addr *p, char *buf,
                              size_t size);

/* Add to a: the networks of list (allow-address: "unix", ADDR or
 * ADDR/BITS, separated by spaces or commas); the PSK usernames of list;
 * one DN.  Return 0, or -1 with the word that is wrong (or that could
 * not be stored) in bad (size bytes).
 */
int access_add_addresses (struct access *a, const char *list, char *bad,
                          size_t size);
int access_add_psk_users (struct access *a, const char *list, char *bad,
                          size_t size);
int access_add_dn (struct access *a, const char *dn);

enum access_verdict {
  ACCESS_OK,
  ACCESS_REFUSED,               /* NBD_REP_ERR_POLICY */
  ACCESS_TLS_REQUIRED,          /* STARTTLS may let it in: TLS_REQD */
};

struct conn;

/* Whether connection c may use an export with rules a (NULL: anyone);
 * when not, *why says which rule refused it.
 */
enum access_verdict access_check (const struct access *a,
                                  const struct conn *c, const char **why);

/* Whether a has rules that only a TLS client can pass. */
bool access_needs_tls (const struct access *a);

/* a (made with refs 1) is used once more: by an export a reload made
 * from the same options.  Returns a.
 */
struct access *access_ref (struct access *a);

/* Drop one use of a, freed with the last (NULL: nothing). */
void access_free (struct access *a);

/* ------------------------------------------------------------------ */
/* privs.c                                                             */
/* ------------------------------------------------------------------ */

/* The user and group of --user and --group. */
struct privs {
  const char *user;             /* its name (for initgroups), or NULL;
                                   allocated, kept for the process's life */
  uid_t uid;
  gid_t gid;
  bool set_uid, set_gid;
};

/* Look up user and group (names or numbers; either may be NULL) into p.
 * Only root can change them: otherwise, as when a name is unknown,
 * returns -1 after saying why.  Returns 0.
 */
int privs_init (struct privs *p, const char *user, const char *group);

/* Give path (a file we created) to p's user and group, so that the
 * dropped user may remove it.  Returns 0 or -1 (logged).
 */
int privs_chown (const struct privs *p, const char *path);

/* Become p's user and group for good: supplementary groups, group, then
 * user, and check that root cannot be had back.  Returns 0 or -1
 * (logged; the process must then exit).
 */
int privs_drop (const struct privs *p);

/* ------------------------------------------------------------------ */
/* sockperm.c                                                          */
/* ------------------------------------------------------------------ */

/* The mode, owner and group of the Unix sockets qnbd creates. */
struct sockperm {
  mode_t mode;
  uid_t uid;
  gid_t gid;
  bool set_mode, set_uid, set_gid;
};

/* Read --socket-mode (octal), --socket-owner and --socket-group (names
 * or numbers; any may be NULL) into p; an owner or group without a mode
 * means mode 0660.  Returns 0, or -1 after saying what is wrong.
 */
int sockperm_init (struct sockperm *p, const char *mode, const char *owner,
                   const char *group);

/* Give the socket file path p's owner, group and mode.  Returns 0 or -1
 * (logged).
 */
int sockperm_apply (const struct sockperm *p, const char *path);

/* ------------------------------------------------------------------ */
/* config.c                                                            */
/* ------------------------------------------------------------------ */

/* What config_read calls for the file's contents, in order; where is
 * "FILE:LINE" of the line concerned.  Each returns 0, or -1 once it has
 * said why (config_read then stops and fails).
 */
struct config_ops {
  /* A section starts: [server] (name NULL) or [export name]. */
  int (*section) (void *opaque, const char *where, const char *name);
  /* key = value, in the current section. */
  int (*key) (void *opaque, const char *where, const char *key,
              const char *value);
  /* The section whose header is at where ends. */
  int (*end) (void *opaque, const char *where);
};

/* Read the configuration file path.  Returns 0, or -1 after logging the
 * file, the line and the cause (unknown sections, a second [server] or a
 * second export of one name are config.c's own errors).
 */
int config_read (const char *path, const struct config_ops *ops,
                 void *opaque);

/* ------------------------------------------------------------------ */
/* export.c                                                            */
/* ------------------------------------------------------------------ */

/* One image served under one name.  Every connection to it shares the one
 * open engine, so the effects of a flush are seen by all of them
 * (NBD_FLAG_CAN_MULTI_CONN).
 */
struct export {
  struct export *next;          /* list of all exports, in creation order */
  char *name;                   /* export name ("" is the default) */
  char *description;            /* NBD_INFO_DESCRIPTION, or NULL */
  char *path;                   /* image file */
  struct qcow2 *q;              /* the open image */
  bool read_only;               /* served read-only */
  bool discard;                 /* TRIM releases clusters (--discard=unmap);
                                   false: TRIM succeeds doing nothing */
  bool probed_raw;              /* not qcow2, served as raw because the
                                   format was probed (-f auto): writes may
                                   not give it a qcow2 magic (export_write_ok) */
  struct access *access;        /* who may use it (access.c), NULL: anyone;
                                   freed with the export */
  ev_io io;                     /* on qcow2_fd (q); io.data == this */

  /* Reload (reload.c).  An export is what a client negotiated: a reload
   * never changes one in place.  It retires it (no new clients: not
   * found, not listed) and, for settings that need no reopen, adds a new
   * export over the same open image (export_update).  A retired export is
   * removed once its last client has gone.
   */
  bool retired;
  unsigned clients;             /* connections in transmission on it */
  bool q_owner;                 /* the one of the exports sharing q that
                                   closes it */
};

/* Open the image at path and add it under name; discard says whether
 * TRIM releases clusters.  On failure prints one line "qnbd: PATH: reason"
 * and returns -1; returns 0 on success.  An image probed as raw (opts
 * format QCOW2_FORMAT_AUTO) is served with one warning line.
 */
int export_add (const char *name, const char *description,
                const char *path, const struct qcow2_opts *opts,
                bool discard);

/* The first export (the default one), or NULL when there is none. */
struct export *export_first (void);

/* What the engines hold for requests in flight (counted in the memory
 * budget beside the connections' own).
 */
size_t export_mem_held (void);

/* The export called name (len bytes, not NUL-terminated), or NULL.  The
 * empty name finds the default export when no export is called "".
 */
struct export *export_find (const char *name, size_t len);

/* NBD transmission flags of the export (those that need structured
 * replies, such as NBD_FLAG_SEND_DF, are added by the handshake).
 */
uint16_t export_eflags (const struct export *e);

/* Whether a write of len bytes of data at offset may go to e.  Always true
 * but on a probed raw image, whose first four bytes may only be written
 * whole and never with the qcow2 magic: the next probe would otherwise
 * take the guest's data for a qcow2 header (and, say, its backing file
 * name for a file to open on the host).
 */
bool export_write_ok (const struct export *e, uint64_t offset,
                      const void *data, size_t len);

/* Block size constraints of the export (NBD_INFO_BLOCK_SIZE). */
void export_block_size (const struct export *e, uint32_t *minimum,
                        uint32_t *preferred, uint32_t *maximum);

/* The export "" means when none is called so: the first not retired. */
struct export *export_default (void);

/* ---- export.c, for reload.c ---- */

/* Exports not retired. */
unsigned export_count (void);
/* A connection enters transmission on e (not retired) / is freed. */
void export_attach (struct export *e);
void export_detach (struct export *e);
/* hook (e) is called when a retired export loses its last client (from
 * inside the connection's free, maybe from the engine's callbacks: the
 * hook must not close e there).
 */
void export_set_idle_hook (void (*hook) (struct export *e));
/* No new client gets e. */
void export_retire (struct export *e);
/* A new export with old's name and open image but these settings, in
 * old's place; old is retired.  A per-export setting that needs no reopen
 * is one more parameter here, or is attached by main.c's made hook
 * (reload_init).  Returns it, or NULL (logged).
 */
struct export *export_update (struct export *old, const char *description,
                              bool discard);
/* Take the retired export e, without clients and no longer watched, out
 * of the list; close its image (flushed, marked clean) unless another
 * export shares it.  Returns 0, or -1 if the close failed (logged).
 */
int export_remove (struct export *e);

/* Close every export (flushing it) and free the list.  Returns 0, or -1
 * if some image failed to close cleanly (logged).
 */
int export_close_all (void);

/* The metadata caches of every export opened from now on share bytes
 * (--cache-size).  Returns 0, or -1 (logged) when out of memory.
 */
int export_set_cache_size (uint64_t bytes);
/* Free that budget, once every export is closed. */
void export_free_cache_budget (void);

/* ------------------------------------------------------------------ */
/* poll-window.c                                                       */
/* ------------------------------------------------------------------ */

/* The shortest window worth spinning, in seconds. */
#define POLL_WINDOW_MIN 4e-6

/* When to poll without sleeping.  Times are seconds of CLOCK_MONOTONIC.
 * window is 0, or between POLL_WINDOW_MIN and max.
 */
struct poll_window {
  double max;                   /* --busy-poll; below the minimum: off */
  double window;                /* spin this long after quiet_since */
  double quiet_since;           /* first poll after work; 0: work since */
  unsigned long hits;           /* events that came while spinning */
  unsigned long short_sleeps;   /* ... after a sleep of at most max */
  unsigned long long_sleeps;    /* ... after a longer one */
};

/* Set the longest window (the window shrinks to it). */
void poll_window_set_max (struct poll_window *w, unsigned max_us);
/* Before a poll at now: whether it should not block. */
bool poll_window_should_spin (struct poll_window *w, double now);
/* Something came at now, from a poll that did (while_spinning: did not)
 * block.
 */
void poll_window_event (struct poll_window *w, double now,
                        bool while_spinning);

/* ------------------------------------------------------------------ */
/* busy-poll.c                                                         */
/* ------------------------------------------------------------------ */

/* The loop's busy polling: set up on loop l (loop_init), started or
 * stopped by busy_poll_configure (max_us 0: never spin; at start and on
 * reload), its counts logged (-vv) by busy_poll_report at exit.
 */
void busy_poll_init (struct ev_loop *l);
void busy_poll_configure (unsigned max_us);
void busy_poll_report (void);
/* While spinning, when the poll brought nothing, fn is called up to a few
 * times; it returns true when it found (and handled) input itself.
 */
void busy_poll_set_probe (bool (*fn) (void));

/* ------------------------------------------------------------------ */
/* notify.c                                                            */
/* ------------------------------------------------------------------ */

/* What systemd is told through NOTIFY_SOCKET (nothing when it is not
 * set).  Timers run on libev loop l (loop_init); notify_cleanup stops
 * them (at exit).
 */
void notify_init (struct ev_loop *l);
void notify_cleanup (void);
/* READY=1 with STATUS=: listening, or a reload is over. */
void notify_ready (void);
/* RELOADING=1 with MONOTONIC_USEC=: a reload starts. */
void notify_reloading (void);
/* The number of exports or connections changed: STATUS= now, or at the
 * end of the interval if one was sent less than a second ago.
 */
void notify_status_changed (void);

/* ------------------------------------------------------------------ */
/* loop.c                                                              */
/* ------------------------------------------------------------------ */

/* Set up the libev loop everything runs on, SIGTERM/SIGINT handling, and
 * ignore SIGPIPE; hand the loop to memory.c and conn.c, and conn.c the
 * protocol's first step (handshake_start).  Returns 0 or -1 (logged).
 */
int loop_init (void);

/* Maximum simultaneous connections (0: no limit). */
void loop_set_max_connections (unsigned n);

/* Maximum simultaneous connections from one client address (0: no
 * limit); Unix-socket clients are not counted.
 */
void loop_set_max_per_client (unsigned n);

/* Listen on a new Unix socket at path (a stale socket file is removed
 * first; the file is removed again at exit).  Returns 0 or -1 (logged).
 */
int loop_listen_unix (const char *path);

/* What loop_listen_unix gives the sockets it creates, between bind and
 * listen (p stays valid; NULL: what the umask leaves).
 */
void loop_set_sockperm (const struct sockperm *p);

/* Listen on TCP port on addr (NULL: every address, IPv4 and IPv6).
 * Returns 0 or -1 (logged).
 */
int loop_listen_tcp (const char *addr, const char *port);

/* Listen on an inherited, already listening socket (systemd).  Returns 0
 * or -1 (logged).
 */
int loop_listen_fd (int fd);

/* Watch the engine descriptor of e and run its completions. */
void loop_watch_export (struct export *e);
/* Stop that (before e is removed). */
void loop_unwatch_export (struct export *e);

/* SIGHUP calls fn (main.c's reload), from the loop. */
void loop_on_reload (void (*fn) (void));

/* The libev loop of loop_init. */
struct ev_loop *loop_get (void);

/* Run until a SIGTERM/SIGINT has been handled and every connection has
 * gone; then stop watching the engines (the images may be closed).
 * Returns 0.
 */
int loop_run (void);

/* Remove the Unix socket files created by loop_listen_unix, close the
 * listeners, stop watching the engines and free the loop's state.
 */
void loop_cleanup (void);

/* ---- buffer-pool.c: request data buffers, reused ---- */

/* A BUFFER_ALIGN-aligned buffer of at least len bytes, or NULL. */
void *buffer_get (size_t len);
/* Give back a buffer from buffer_get (len as asked). */
void buffer_put (void *p, size_t len);
/* Free every pooled buffer (before a heap trim, and at exit). */
void buffer_pool_drain (void);

/* ------------------------------------------------------------------ */
/* memory.c                                                            */
/* ------------------------------------------------------------------ */

/* Start the accounting on libev loop l (its timers run there). */
void mem_init (struct ev_loop *l);
/* Stop its timers and free the pooled buffers (at exit). */
void mem_cleanup (void);

/* The heap memory held by connections: their read buffers and request
 * data.  Called when n bytes of it are allocated (mem_hold) or freed
 * (mem_release); once much of it has been freed and stays so for a
 * moment, the heap is given back to the system (malloc_trim).
 */
void mem_hold (size_t n);
void mem_release (size_t n);

/* The daemon-wide memory budget (--max-memory), in bytes. */
void mem_set_max_memory (size_t bytes);
/* Whether a connection may start a request that will hold need bytes:
 * everything held stays within the budget, or the request is small
 * (SMALL_REQUEST) and its connection holds no other (so every client goes
 * on, one small request at a time, however much others hold).
 */
bool mem_admit (size_t need, bool conn_idle);

/* One in the line of those waiting for memory to be freed. */
struct mem_waiter {
  struct mem_waiter *next;      /* the line, oldest first */
  bool waiting;                 /* in the line */
  void (*wake) (struct mem_waiter *w); /* set by the owner: memory was
                                   freed, w is out of the line; called
                                   from the loop, oldest first */
};
/* Join the line (w is not in it). */
void mem_wait (struct mem_waiter *w);
/* Leave the line (w is in it) without being woken. */
void mem_cancel (struct mem_waiter *w);

/* ------------------------------------------------------------------ */
/* sender.c                                                            */
/* ------------------------------------------------------------------ */

/* iovecs per sendmsg (conn.c's and the reply thread's). */
#define IOV_BATCH 64

enum send_state {
  SEND_IDLE,                    /* the loop's */
  SEND_STAGED,                  /* submitted, not yet flushed */
  SEND_QUEUED,                  /* waiting for the reply thread */
  SEND_RUNNING,                 /* its sendmsg is being made */
  SEND_DONE,                    /* made; the done function is to run */
};

/* One sendmsg made by the reply thread.  The caller keeps what iov points
 * to, and fd open, until the job is idle again.
 */
struct send_job {
  struct send_job *next;        /* sender.c's lists */
  enum send_state state;        /* under sender.c's lock */
  int fd;
  int niov;
  struct iovec iov[IOV_BATCH];
  ssize_t result;               /* bytes written, or -errno */
};

/* Called on the loop for each job made, which is idle again. */
typedef void sender_done_fn (struct send_job *j);

/* Jobs finish on loop l and are handed back to done.  Called once. */
void sender_init (struct ev_loop *l, sender_done_fn *done);
/* Hand j (idle) to the reply thread, started at the first call, at the
 * next sender_flush.  Returns false when the thread cannot run (said
 * once): send it yourself.
 */
bool sender_submit (struct send_job *j);
/* Give the thread every job submitted since the last flush. */
void sender_flush (void);
/* Take j back now, made or not (waits for a sendmsg being made); its
 * done function is not called.
 */
void sender_cancel (struct send_job *j);
/* End the thread, once no job is out (the loop has ended). */
void sender_stop (void);

/* ------------------------------------------------------------------ */
/* conn.c                                                              */
/* ------------------------------------------------------------------ */

struct conn;

/* One message on a connection's output queue: a header and an optional
 * payload, written with writev.
 */
struct reply {
  struct reply *next;           /* output queue, in order of writing */
  struct iovec iov[2];          /* header, payload (iov_len may be 0) */
  size_t sent;                  /* bytes of iov[0] + iov[1] already written */
  void (*release) (struct reply *r); /* once written, or dropped */
  unsigned char hdr[128];       /* storage iov[0] may point to */
};

enum conn_state {
  CONN_GREETING,                /* greeting sent, waiting for the client flags */
  CONN_HANDSHAKE,               /* option haggling */
  CONN_TRANSMISSION,            /* reading requests, sending replies */
  CONN_CLOSING,                 /* no more reading: finish in-flight requests,
                                   write the queued replies, then close */
  CONN_DEAD,                    /* socket closed; freed once no engine
                                   request refers to it */
};

/* The protocol's side of a connection: parse what the input holds (one
 * message).  Returns true when something was consumed (call again), false
 * when more input is needed or the protocol cannot go on now.
 */
typedef bool conn_step_fn (struct conn *c);

/* The protocol's start on a new connection: queue what it is sent first,
 * and set its step.
 */
typedef void conn_start_fn (struct conn *c);

/* Called when a payload asked for with conn_recv_payload has fully
 * arrived (ok) or will never arrive (!ok: the connection is going away).
 */
typedef void conn_payload_fn (struct conn *c, void *opaque, bool ok);

/* How a connection's bytes reach its socket, when not directly (plain
 * readv/sendmsg): a TLS session (tls.c).  conn.c calls only through this
 * table, so it does not depend on the library behind it.
 */
struct conn_transport {
  /* Like readv and writev on c->fd: bytes moved (the transport may move
   * fewer than asked, e.g. only into iov[0]), 0 at the end of input
   * (recv), or -1 with errno set.  EAGAIN: nothing now, and c->xport_wait
   * says which readiness of the socket (EV_READ, EV_WRITE) to wait for.
   * Another error has been logged, with its cause, by the transport.
   */
  ssize_t (*recv) (struct conn *c, const struct iovec *iov, int n);
  ssize_t (*send) (struct conn *c, const struct iovec *iov, int n);
  /* Input already read from the socket but not yet returned by recv:
   * the socket may never become readable again for it.
   */
  bool (*pending) (struct conn *c);
  /* Free the transport's state (c->xport_data); the socket is still
   * open and is closed by conn.c afterwards.
   */
  void (*close) (struct conn *c);
};

/* A client connection.  Found from its watcher through io.data. */
struct conn {
  struct conn *prev, *next;     /* every connection (conn.c) */
  struct conn *pending_next;    /* the run-after-completions list */
  bool pending;                 /* on that list */
  unsigned id;                  /* for log messages */
  int fd;                       /* the socket, -1 once closed */
  ev_io io;                     /* on fd; io.data == this */
  ev_timer handshake_timer;     /* --handshake-limit, from the accept to
                                   transmission; handshake_timer.data == this */
  ev_timer idle_timer;          /* --idle-timeout, in transmission;
                                   idle_timer.data == this */
  ev_tstamp last_active;        /* last bytes read, or reply written */
  struct peer_addr peer;        /* the client's address */
  int events;                   /* EV_READ/EV_WRITE interest set on io */
  enum conn_state state;
  conn_step_fn *step;           /* the protocol's parser for this state:
                                   set by the handshake at conn_new (conn.c
                                   only calls it), then by it again on
                                   entering transmission */

  /* Input: unparsed bytes are rbuf[rstart, rend). */
  unsigned char *rbuf;          /* CONN_RBUF_SIZE bytes */
  size_t rstart, rend;

  /* A payload being received (rx_want > 0), into rx_buf, or thrown away
   * when rx_buf is NULL.  Bytes go straight from the socket into rx_buf
   * when rbuf is empty.
   */
  unsigned char *rx_buf;        /* where the next payload byte goes */
  size_t rx_want;               /* payload bytes still to come */
  conn_payload_fn *rx_done;     /* called once rx_want reaches 0 */
  void *rx_opaque;

  /* Negotiated during the handshake. */
  bool no_zeroes;               /* NBD_FLAG_C_NO_ZEROES */
  bool structured;              /* NBD_OPT_STRUCTURED_REPLY acknowledged */
  unsigned meta;                /* the contexts (META_BIT mask) of the
                                   last NBD_OPT_SET_META_CONTEXT ... */
  struct export *meta_exp;      /* ... which named this export */
  unsigned nr_options;          /* options received so far */
  struct export *exp;           /* the export, from transmission on */
  uint16_t eflags;              /* its transmission flags */
  bool shutdown;                /* server shutting down: new requests get
                                   ESHUTDOWN, close once idle */

  /* Transmission.  A request counts in in_flight from its header until
   * its reply is written (or dropped), and in engine_refs while the engine
   * holds it (its completion callback has not run).  A dead connection is
   * freed only once engine_refs is 0.
   */
  unsigned in_flight;
  unsigned engine_refs;
  size_t buffered;              /* bytes held by in-flight requests (their
                                   structs, data, extent arrays) */
  struct mem_waiter mem_wait;   /* waits for memory when .waiting */

  /* The transport (NULL: the plain socket), and the one that takes over
   * once the output queue has drained (conn_start_transport).
   */
  const struct conn_transport *xport, *xport_next;
  void *xport_data;             /* the transport's state */
  int xport_wait;               /* EV_READ/EV_WRITE the transport waits
                                   for (its last EAGAIN), 0: none */
  bool tls;                     /* STARTTLS accepted (nbd-handshake.c) */
  bool tls_ready;               /* its TLS handshake is over (tls.c) */
  char *tls_dn;                 /* the verified client certificate's
                                   subject DN, or NULL (tls.c) */
  char *tls_psk_user;           /* the PSK username, or NULL (tls.c) */

  /* Output queue.  While tx is out (not SEND_IDLE) the reply thread
   * writes the first replies of it: nothing else writes, and none of
   * them is released, until tx comes back (conn_sent).
   */
  struct send_job tx;
  struct reply *out_head;
  struct reply **out_tail;
  size_t out_bytes;             /* bytes queued and not yet written */
};

/* Connections run on libev loop l, start with start (the handshake's);
 * freed, if not NULL, is called after each connection is freed.  Called
 * once, before conn_new.
 */
void conn_init (struct ev_loop *l, conn_start_fn *start,
                void (*freed) (void));

/* Take over an accepted, non-blocking socket: start the protocol (the
 * start of conn_init).  Returns 0 or -1 (logged; fd is closed either way
 * on failure).
 */
int conn_new (int fd);

/* Number of live connections (not yet freed). */
unsigned conn_count (void);

/* Number of live connections from address p. */
unsigned conn_count_peer (const struct peer_addr *p);

/* Seconds a connection in transmission may stay idle (nothing in flight,
 * nothing received) before it is closed (0: for ever, the default).
 */
void conn_set_idle_timeout (unsigned seconds);

/* Seconds a new connection gets to finish its handshake before it is
 * closed (0: no limit).  Default DEFAULT_HANDSHAKE_LIMIT.
 */
void conn_set_handshake_limit (unsigned seconds);

/* The handshake of c is over (NBD_OPT_GO or NBD_OPT_EXPORT_NAME
 * succeeded): the handshake limit no longer applies to it, the idle
 * timeout does from now on.
 */
void conn_handshake_done (struct conn *c);

/* Whether c may take another request: under both in-flight limits. */
bool conn_has_room (const struct conn *c);

/* Unparsed input: *len bytes at the returned pointer. */
const unsigned char *conn_input (const struct conn *c, size_t *len);

/* Mark n bytes of the unparsed input as used. */
void conn_consume (struct conn *c, size_t n);

/* Receive the next len bytes (len > 0) of the stream into buf (NULL:
 * discard them), then call done.  done is never called from inside this
 * call, but from the input processing that follows it.
 */
void conn_recv_payload (struct conn *c, void *buf, size_t len,
                        conn_payload_fn *done, void *opaque);

/* Append r to the output queue. */
void conn_queue_reply (struct conn *c, struct reply *r);

/* Queue one message: copies hdr (hlen bytes) then data (dlen bytes) into
 * a new reply.  Returns 0, or -1 when out of memory (the connection is
 * then closed).
 */
int conn_queue_copy (struct conn *c, const void *hdr, size_t hlen,
                     const void *data, size_t dlen);

/* Stop reading: finish in-flight requests, write their replies, close. */
void conn_closing (struct conn *c);

/* Close the socket now and drop everything queued (broken stream). */
void conn_set_dead (struct conn *c);

/* Once every queued reply is written, carry the stream over transport t
 * with state data (its close is called when the connection ends, even
 * if it never took over); until then no input is read or parsed.  Input
 * already received and not parsed is a protocol violation (the client
 * had to wait for the reply): then the connection is closed and -1
 * returned.  Returns 0.
 */
int conn_start_transport (struct conn *c, const struct conn_transport *t,
                          void *data);

/* busy-poll.c's probe (loop_init sets it): with one client, in
 * transmission and waiting for a request, read its socket now.  True
 * when there was something (then handled, as its watcher would).
 */
bool conn_probe_lone (void);

/* Note that c needs attention after the engine's completions: its replies
 * are written and its watchers updated by conn_run_pending.
 */
void conn_mark_pending (struct conn *c);

/* Run every connection marked pending. */
void conn_run_pending (void);

/* c stops parsing requests until memory is freed (mem_wait): its next
 * request does not fit in the memory budget.
 */
void conn_pause_for_memory (struct conn *c);

/* Server shutdown: connections still in the handshake are closed; the
 * others finish what is in flight, answer new requests with ESHUTDOWN
 * (so that the client disconnects), and are closed once idle.
 */
void conn_shutdown_all (void);

/* Close every connection at once (the shutdown took too long). */
void conn_kill_all (void);

/* The export e is about to be freed (reload.c): no connection attached to
 * it; those whose meta contexts were chosen for it now point at the
 * export serving its name, or at none.
 */
void conn_forget_export (const struct export *e);

/* ------------------------------------------------------------------ */
/* tls.c                                                               */
/* ------------------------------------------------------------------ */

enum tls_mode {
  TLS_OFF,                      /* STARTTLS not supported */
  TLS_ON,                       /* STARTTLS offered, plaintext allowed */
  TLS_REQUIRE,                  /* nothing but STARTTLS and ABORT before it */
};

/* Load the credentials for mode: x509 from certdir (ca-cert.pem,
 * server-cert.pem, server-key.pem), and/or the PSK keys file psk_file
 * (username:hexkey lines); at least one.  With verify_peer, x509 clients
 * must show a certificate signed by that CA.  Returns 0 or -1 (logged).
 */
int tls_init (enum tls_mode mode, const char *certdir, const char *psk_file,
              bool verify_peer);

/* The mode of tls_init (TLS_OFF without it). */
enum tls_mode tls_mode (void);

/* STARTTLS was accepted on c and its reply queued: a TLS session takes
 * the stream over once that reply is written (its handshake driven by the
 * connection's watcher).  Returns 0, or -1 (logged, c is dead).
 */
int tls_start (struct conn *c);

/* Free the credentials (at exit). */
void tls_cleanup (void);

/* ------------------------------------------------------------------ */
/* reload.c                                                            */
/* ------------------------------------------------------------------ */

/* One export of a configuration file, as reload.c compares them.  The
 * strings (and opts) must live as long as the daemon: a reopen may use
 * them long after the reload.
 */
struct reload_export {
  const char *name, *description, *image;
  const struct qcow2_opts *opts;
  bool discard;
  /* Its section's keys as read, "key=value" lines: those whose change
   * needs the image reopened, and the others.
   */
  const char *sig_open, *sig_live;
  void *opaque;                 /* main.c's, for made below */
};

/* The exports xs[0..n) are open (startup).  made, if not NULL, is called
 * with each export a reload makes (opened, or with new settings over the
 * same image) and the opaque of its reload_export, before any client can
 * get it: where main.c attaches to an export what export_add does not
 * take.  Returns 0 or -1 (logged).
 */
int reload_init (const struct reload_export *xs, size_t n,
                 void (*made) (struct export *e, void *opaque));

/* A configuration file read again, whole and valid: apply its exports
 * (see reload.c).  Problems are logged; the rest still applies.
 */
void reload_apply (const struct reload_export *xs, size_t n);

/* Free what reload.c holds (at exit, before loop_cleanup). */
void reload_cleanup (void);

/* ------------------------------------------------------------------ */
/* nbd-meta.c                                                          */
/* ------------------------------------------------------------------ */

/* The metadata contexts served (NBD_OPT_SET_META_CONTEXT), described once
 * in meta_contexts.  A set of them is a mask (conn.meta): context i is
 * META_BIT (i).
 */
#define META_NR 2
#define META_BIT(i) (1u << (i))
#define META_ALL ((1u << META_NR) - 1)
#define META_NAME_MAX 64        /* longest name */

struct meta_context {
  const char *name;             /* "namespace:leaf" */
  uint32_t id;                  /* answered to SET_META_CONTEXT, and carried
                                   by its NBD_REPLY_TYPE_BLOCK_STATUS chunks */
  uint32_t (*status) (const struct qcow2_extent *x); /* how an extent of
                                   the engine is reported in it */
};
extern const struct meta_context meta_contexts[META_NR];

/* The contexts (a mask) query q (len bytes) selects.  list: for
 * NBD_OPT_LIST_META_CONTEXT, where a namespace alone ("base:") stands for
 * all its contexts; SET must ignore that form.  Anything else unknown
 * selects nothing, as the protocol asks.
 */
unsigned meta_query (const char *q, uint32_t len, bool list);

/* For log lines: ", name" for each context of mask, in buf (size bytes,
 * cut if need be); "" for none.  Returns buf.
 */
const char *meta_names (unsigned mask, char *buf, size_t size);

/* ------------------------------------------------------------------ */
/* nbd-handshake.c                                                     */
/* ------------------------------------------------------------------ */

/* The conn_start_fn of conn_init: queue the greeting of a new connection
 * (it is in CONN_GREETING) and make the handshake its step; the handshake
 * makes request_step the step when it ends.
 */
void handshake_start (struct conn *c);

/* ------------------------------------------------------------------ */
/* nbd-request.c                                                       */
/* ------------------------------------------------------------------ */

/* The step (conn_step_fn) of a connection in transmission: parse one
 * request from the input and start it.  Returns true when a request was consumed (call again), false when
 * more input is needed, the connection is full (in-flight limits), or it
 * is no longer transmitting.
 */
bool request_step (struct conn *c);

/* ------------------------------------------------------------------ */
/* nbd-reply.c                                                         */
/* ------------------------------------------------------------------ */

/* Fill r (its hdr and iov) as a simple reply to command cmd with flags:
 * error err (a positive errno, 0 for success) and, on success, len bytes
 * of data (a READ).
 */
void reply_simple (struct reply *r, uint64_t cookie, uint16_t cmd,
                   uint16_t flags, int err, void *data, size_t len);

/* Fill r as an NBD_REPLY_TYPE_OFFSET_DATA chunk of a structured READ
 * reply: len > 0 bytes of data (pointed to, not copied) at offset; done:
 * the last chunk (NBD_REPLY_FLAG_DONE).
 */
void reply_structured_data (struct reply *r, uint64_t cookie, bool done,
                            uint64_t offset, void *data, size_t len);

/* A structured reply of several chunks being filled: the last chunk goes
 * into *last, those before it into more[0..n), in the order they are to
 * be queued.
 */
struct reply_chunks {
  uint64_t cookie;
  struct reply *last;
  struct reply *more;           /* room for the chunks before the last */
  size_t n;                     /* of more, filled */
};

/* Fill rc with a structured READ reply of the data at offset whose zero
 * map is ext[0..n) (n > 0, covering the data exactly): runs of zeros of
 * at least SPARSE_MIN_HOLE bytes become OFFSET_HOLE chunks, the rest
 * OFFSET_DATA chunks pointing into data, in order.  rc->more has room for
 * n - 1 chunks.
 */
void reply_read_sparse (struct reply_chunks *rc, uint64_t offset,
                        void *data, const struct qcow2_extent *ext,
                        unsigned n);

/* Fill rc with a BLOCK_STATUS reply: a chunk per context of meta (a
 * non-empty META_BIT mask), in the order of meta_contexts, each of at
 * most max descriptors that cover at most count bytes, from the engine's
 * extents ext[0..n) (n > 0).  desc has room for META_NR * n descriptors
 * (the chunks point into it) and rc->more for META_NR - 1 chunks.
 * Returns 0, or -EIO when the extents give a context no descriptor (rc
 * then holds nothing to queue).
 */
int reply_block_status (struct reply_chunks *rc, unsigned meta,
                        const struct qcow2_extent *ext, unsigned n,
                        uint64_t count, size_t max,
                        struct nbd_block_descriptor *desc);

/* Fill r as NBD_REPLY_TYPE_NONE with NBD_REPLY_FLAG_DONE (success). */
void reply_structured_done (struct reply *r, uint64_t cookie);

/* Fill r as NBD_REPLY_TYPE_ERROR with NBD_REPLY_FLAG_DONE, answering
 * command cmd with flags: error err (a positive errno), with message msg
 * (NULL: strerror (err)).
 */
void reply_structured_error (struct reply *r, uint64_t cookie, uint16_t cmd,
                             uint16_t flags, int err, const char *msg);

/* The NBD_E* value to send for the positive errno err in answer to command
 * cmd with flags.  The one place where errno becomes a wire value: ENOTSUP
 * only answers a WRITE_ZEROES with FAST_ZERO and EOVERFLOW a READ with DF
 * or a command without payload, as the protocol says (EINVAL otherwise);
 * errno values that NBD lacks are logged (debug) before they are folded
 * into NBD_EIO.
 */
uint32_t reply_nbd_errno (int err, uint16_t cmd, uint16_t flags);

#endif /* QNBD_SERVER_INTERNAL_H */
