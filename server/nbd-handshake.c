/* server/nbd-handshake.c: the fixed newstyle handshake and its options.
 *
 * The server greets, the client answers with its flags, then sends options
 * one at a time, each answered before the next (handshake_step parses one
 * message per call).  NBD_OPT_GO with an ACK, or NBD_OPT_EXPORT_NAME, ends
 * the handshake and the connection moves to transmission.
 *
 * The metadata contexts (NBD_OPT_LIST_META_CONTEXT,
 * NBD_OPT_SET_META_CONTEXT) are those of the table in nbd-meta.c; LIST
 * with no query at all lists every one.
 *
 * Each export's allowlist (access.c) is checked wherever an option names
 * the export: a refused client gets NBD_REP_ERR_POLICY (NBD_REP_ERR_TLS_REQD
 * when STARTTLS could let it in), a hang-up for EXPORT_NAME, and LIST
 * shows it only the exports it may use.
 *
 * Option data is read whole into the connection's bounded read buffer;
 * an option longer than MAX_OPTION_LENGTH, a bad magic, unknown client
 * flags or too many options close the connection.  Anything else a client
 * gets wrong is answered with an error reply and the haggling goes on.
 */
#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <assert.h>
#include <endian.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "internal.h"

static const char *
opt_name (uint32_t opt)
{
  switch (opt) {
  case NBD_OPT_EXPORT_NAME: return "EXPORT_NAME";
  case NBD_OPT_ABORT: return "ABORT";
  case NBD_OPT_LIST: return "LIST";
  case NBD_OPT_PEEK_EXPORT: return "PEEK_EXPORT";
  case NBD_OPT_STARTTLS: return "STARTTLS";
  case NBD_OPT_INFO: return "INFO";
  case NBD_OPT_GO: return "GO";
  case NBD_OPT_STRUCTURED_REPLY: return "STRUCTURED_REPLY";
  case NBD_OPT_LIST_META_CONTEXT: return "LIST_META_CONTEXT";
  case NBD_OPT_SET_META_CONTEXT: return "SET_META_CONTEXT";
  case NBD_OPT_EXTENDED_HEADERS: return "EXTENDED_HEADERS";
  default: return "unknown";
  }
}

static bool handshake_step (struct conn *c);

void
handshake_start (struct conn *c)
{
  struct nbd_greeting g = {
    .magic = htobe64 (NBD_MAGIC),
    .ihaveopt = htobe64 (NBD_IHAVEOPT),
    .flags = htobe16 (NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES),
  };

  c->step = handshake_step;
  conn_queue_copy (c, &g, sizeof g, NULL, 0);
}

/* Queue an option reply with len bytes of data. */
static int
send_opt_reply (struct conn *c, uint32_t opt, uint32_t type,
                const void *data, size_t len)
{
  struct nbd_option_reply h = {
    .magic = htobe64 (NBD_REP_MAGIC),
    .option = htobe32 (opt),
    .reply = htobe32 (type),
    .length = htobe32 (len),
  };

  return conn_queue_copy (c, &h, sizeof h, data, len);
}

/* Queue an error reply to option opt, with a message for the user. */
static int QNBD_PRINTF (4, 5)
send_opt_error (struct conn *c, uint32_t opt, uint32_t type,
                const char *fmt, ...)
{
  char msg[256];
  va_list args;
  int n;

  va_start (args, fmt);
  n = vsnprintf (msg, sizeof msg, fmt, args);
  va_end (args);
  if (n < 0)
    n = 0;
  if ((size_t) n >= sizeof msg)
    n = sizeof msg - 1;
  log_debug ("client %u: option %s: %s", c->id, opt_name (opt), msg);
  return send_opt_reply (c, opt, type, msg, n);
}

/* Queue an NBD_REP_INFO of type info, its payload data (len bytes). */
static int
send_info (struct conn *c, uint32_t opt, uint16_t info,
           const void *data, size_t len)
{
  unsigned char buf[2 + NBD_MAX_STRING];
  uint16_t be = htobe16 (info);

  if (len > NBD_MAX_STRING)
    len = NBD_MAX_STRING;
  memcpy (buf, &be, 2);
  memcpy (buf + 2, data, len);
  return send_opt_reply (c, opt, NBD_REP_INFO, buf, 2 + len);
}

/* The transmission flags c gets for e: the export's, and those that need
 * structured replies once they are negotiated.
 */
static uint16_t
transmission_flags (const struct conn *c, const struct export *e)
{
  uint16_t flags = export_eflags (e);

  if (c->structured)
    flags |= NBD_FLAG_SEND_DF;
  return flags;
}

/* Whether c may use e.  If not, one log line says who, which export and
 * why, and the client is answered for option opt: an error reply, or a
 * hang-up for EXPORT_NAME, which has no error reply.
 */
static bool
may_use (struct conn *c, uint32_t opt, const struct export *e)
{
  char buf[INET6_ADDRSTRLEN];
  enum access_verdict v;
  const char *why;

  v = access_check (e->access, c, &why);
  if (v == ACCESS_OK)
    return true;
  log_warning ("client %u (%s%s%s): export '%s' refused: %s", c->id,
               access_peer_name (&c->peer, buf, sizeof buf),
               c->tls_psk_user ? ", PSK user " : c->tls_dn ? ", " : "",
               c->tls_psk_user ? c->tls_psk_user : c->tls_dn ? c->tls_dn : "",
               e->name, why);
  if (opt == NBD_OPT_EXPORT_NAME)
    conn_set_dead (c);
  else if (v == ACCESS_TLS_REQUIRED)
    send_opt_error (c, opt, NBD_REP_ERR_TLS_REQD,
                    "export '%s' needs TLS: use STARTTLS first", e->name);
  else
    send_opt_error (c, opt, NBD_REP_ERR_POLICY,
                    "export '%s': access denied", e->name);
  return false;
}

static void
enter_transmission (struct conn *c, struct export *e)
{
  char names[128];

  c->exp = e;
  export_attach (e);            /* until the connection is freed */
  c->eflags = transmission_flags (c, e);
  /* Contexts chosen for another export do not carry over; by name: a
   * reload may have put a new export under it since (reload.c).
   */
  if (c->meta_exp == NULL || strcmp (c->meta_exp->name, e->name) != 0)
    c->meta = 0;
  conn_handshake_done (c);
  c->state = CONN_TRANSMISSION;
  c->step = request_step;
  log_info ("client %u: export '%s'%s%s%s", c->id, e->name,
            c->structured ? ", structured replies" : "",
            meta_names (c->meta, names, sizeof names),
            e->read_only ? ", read-only" : "");
}

/* NBD_OPT_EXPORT_NAME: no error reply is possible, only a hang-up. */
static void
opt_export_name (struct conn *c, const unsigned char *data, uint32_t len)
{
  struct nbd_export_name_reply r;
  struct export *e;

  e = export_find ((const char *) data, len);
  if (e == NULL) {
    log_info ("client %u: unknown export '%.*s', disconnecting", c->id,
              (int) (len < 256 ? len : 256), (const char *) data);
    conn_set_dead (c);
    return;
  }
  if (!may_use (c, NBD_OPT_EXPORT_NAME, e))
    return;
  memset (&r, 0, sizeof r);
  r.size = htobe64 (qcow2_size (e->q));
  r.eflags = htobe16 (transmission_flags (c, e));
  if (conn_queue_copy (c, &r, c->no_zeroes ? 10 : sizeof r, NULL, 0) == 0)
    enter_transmission (c, e);
}

/* NBD_OPT_INFO and NBD_OPT_GO. */
static void
opt_info_go (struct conn *c, uint32_t opt, const unsigned char *data,
             uint32_t len)
{
  const char *name = (const char *) data + 4;
  bool want_name = false, want_description = false;
  struct nbd_info_export ie;
  struct nbd_info_block_size ib;
  struct export *e;
  uint32_t namelen, minimum, preferred, maximum;
  uint16_t nr, i, info;

  /* name length, name, number of requests, requests */
  if (len < 6)
    goto invalid;
  memcpy (&namelen, data, 4);
  namelen = be32toh (namelen);
  if (namelen > len - 6)
    goto invalid;
  memcpy (&nr, data + 4 + namelen, 2);
  nr = be16toh (nr);
  if (len != 4 + namelen + 2 + 2 * (uint32_t) nr)
    goto invalid;
  for (i = 0; i < nr; i++) {
    memcpy (&info, data + 4 + namelen + 2 + 2 * i, 2);
    switch (be16toh (info)) {
    case NBD_INFO_NAME: want_name = true; break;
    case NBD_INFO_DESCRIPTION: want_description = true; break;
    default: break;             /* EXPORT, BLOCK_SIZE: always sent */
    }
  }

  e = export_find (name, namelen);
  if (e == NULL) {
    send_opt_error (c, opt, NBD_REP_ERR_UNKNOWN, "unknown export '%.*s'",
                    (int) (namelen < 200 ? namelen : 200), name);
    return;
  }
  if (!may_use (c, opt, e))
    return;

  ie.info = htobe16 (NBD_INFO_EXPORT);
  ie.size = htobe64 (qcow2_size (e->q));
  ie.eflags = htobe16 (transmission_flags (c, e));
  if (send_opt_reply (c, opt, NBD_REP_INFO, &ie, sizeof ie) < 0)
    return;

  if (want_name &&
      send_info (c, opt, NBD_INFO_NAME, e->name, strlen (e->name)) < 0)
    return;

  if (want_description && e->description &&
      send_info (c, opt, NBD_INFO_DESCRIPTION, e->description,
                 strlen (e->description)) < 0)
    return;

  /* Always: clients that did not ask may still use it, and those that
   * did are bound by it.
   */
  export_block_size (e, &minimum, &preferred, &maximum);
  ib.info = htobe16 (NBD_INFO_BLOCK_SIZE);
  ib.minimum = htobe32 (minimum);
  ib.preferred = htobe32 (preferred);
  ib.maximum = htobe32 (maximum);
  if (send_opt_reply (c, opt, NBD_REP_INFO, &ib, sizeof ib) < 0)
    return;

  if (send_opt_reply (c, opt, NBD_REP_ACK, NULL, 0) < 0)
    return;
  if (opt == NBD_OPT_GO)
    enter_transmission (c, e);
  return;

 invalid:
  send_opt_error (c, opt, NBD_REP_ERR_INVALID,
                  "malformed %s request", opt_name (opt));
}

/* NBD_OPT_LIST: one NBD_REP_SERVER per export, then ACK. */
static void
opt_list (struct conn *c, uint32_t len)
{
  unsigned char buf[4 + 2 * NBD_MAX_STRING];
  struct export *e;

  if (len != 0) {
    send_opt_error (c, NBD_OPT_LIST, NBD_REP_ERR_INVALID,
                    "LIST with data");
    return;
  }
  for (e = export_first (); e; e = e->next) {
    if (e->retired)             /* removed or replaced by a reload */
      continue;
    size_t nlen = strlen (e->name);
    size_t dlen = e->description ? strlen (e->description) : 0;
    uint32_t be = htobe32 (nlen);
    const char *why;

    /* Not even the names of the others. */
    if (access_check (e->access, c, &why) != ACCESS_OK)
      continue;

    /* Name length, name, then the description for humans. */
    memcpy (buf, &be, 4);
    memcpy (buf + 4, e->name, nlen);
    if (dlen)
      memcpy (buf + 4 + nlen, e->description, dlen);
    if (send_opt_reply (c, NBD_OPT_LIST, NBD_REP_SERVER,
                        buf, 4 + nlen + dlen) < 0)
      return;
  }
  send_opt_reply (c, NBD_OPT_LIST, NBD_REP_ACK, NULL, 0);
}

/* NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT: export name
 * length, name, number of queries, then each query as length and string.
 * Each context found gets an NBD_REP_META_CONTEXT (id 0 for LIST), then
 * an ACK.
 */
static void
opt_meta_context (struct conn *c, uint32_t opt, const unsigned char *data,
                  uint32_t len)
{
  bool list = opt == NBD_OPT_LIST_META_CONTEXT;
  unsigned char buf[4 + META_NAME_MAX];
  char names[128];
  uint32_t namelen, nr, qlen, i, pos;
  unsigned mask = 0;
  struct export *e;
  size_t k;

  /* SET replaces the previous choice, even when it fails. */
  if (!list) {
    c->meta = 0;
    c->meta_exp = NULL;
    if (!c->structured) {
      send_opt_error (c, opt, NBD_REP_ERR_INVALID,
                      "SET_META_CONTEXT before STRUCTURED_REPLY");
      return;
    }
  }

  if (len < 8)
    goto invalid;
  memcpy (&namelen, data, 4);
  namelen = be32toh (namelen);
  if (namelen > len - 8)
    goto invalid;
  memcpy (&nr, data + 4 + namelen, 4);
  nr = be32toh (nr);
  pos = 8 + namelen;
  for (i = 0; i < nr; i++) {
    if (len - pos < 4)
      goto invalid;
    memcpy (&qlen, data + pos, 4);
    qlen = be32toh (qlen);
    pos += 4;
    if (qlen > len - pos)
      goto invalid;
    mask |= meta_query ((const char *) data + pos, qlen, list);
    pos += qlen;
  }
  if (pos != len)
    goto invalid;

  e = export_find ((const char *) data + 4, namelen);
  if (e == NULL) {
    send_opt_error (c, opt, NBD_REP_ERR_UNKNOWN, "unknown export '%.*s'",
                    (int) (namelen < 200 ? namelen : 200),
                    (const char *) data + 4);
    return;
  }
  if (!may_use (c, opt, e))
    return;

  /* No query: LIST lists everything, SET selects nothing. */
  if (nr == 0 && list)
    mask = META_ALL;

  for (k = 0; k < META_NR; k++) {
    const struct meta_context *m = &meta_contexts[k];
    size_t nlen = strlen (m->name);
    uint32_t id = htobe32 (list ? 0 : m->id);

    assert (nlen <= META_NAME_MAX);
    if (!(mask & META_BIT (k)))
      continue;
    memcpy (buf, &id, 4);
    memcpy (buf + 4, m->name, nlen);
    if (send_opt_reply (c, opt, NBD_REP_META_CONTEXT, buf, 4 + nlen) < 0)
      return;
  }
  if (send_opt_reply (c, opt, NBD_REP_ACK, NULL, 0) < 0)
    return;
  if (!list) {
    c->meta = mask;
    c->meta_exp = e;
  }
  meta_names (mask, names, sizeof names);
  log_debug ("client %u: %s: %s", c->id, opt_name (opt),
             names[0] ? names + 2 : "");
  return;

 invalid:
  send_opt_error (c, opt, NBD_REP_ERR_INVALID,
                  "malformed %s request", opt_name (opt));
}

/* NBD_OPT_STARTTLS: the reply goes out in plaintext, then the TLS
 * session takes the stream over.
 */
static void
opt_starttls (struct conn *c, uint32_t len)
{
  if (tls_mode () == TLS_OFF) {
    send_opt_error (c, NBD_OPT_STARTTLS, NBD_REP_ERR_UNSUP,
                    "TLS is not enabled on this server");
    return;
  }
  if (c->tls) {
    send_opt_error (c, NBD_OPT_STARTTLS, NBD_REP_ERR_INVALID,
                    "STARTTLS on a TLS connection");
    return;
  }
  if (len != 0) {
    send_opt_error (c, NBD_OPT_STARTTLS, NBD_REP_ERR_INVALID,
                    "STARTTLS with data");
    return;
  }
  if (send_opt_reply (c, NBD_OPT_STARTTLS, NBD_REP_ACK, NULL, 0) < 0)
    return;
  /* The protocol: what was negotiated in plaintext does not count. */
  c->tls = true;
  c->structured = false;
  c->meta = 0;
  c->meta_exp = NULL;
  tls_start (c);
}

/* Whether option opt may be answered before TLS; if not, refuse it
 * without saying anything about the exports.
 */
static bool
tls_allows (struct conn *c, uint32_t opt)
{
  if (c->tls || tls_mode () != TLS_REQUIRE ||
      opt == NBD_OPT_STARTTLS || opt == NBD_OPT_ABORT)
    return true;
  if (opt == NBD_OPT_EXPORT_NAME) {
    /* No error reply is possible: only a hang-up. */
    log_info ("client %u: EXPORT_NAME without TLS, disconnecting", c->id);
    conn_set_dead (c);
    return false;
  }
  send_opt_error (c, opt, NBD_REP_ERR_TLS_REQD,
                  "TLS is required: use STARTTLS first");
  return false;
}

/* One option of length len, its data in data. */
static void
handle_option (struct conn *c, uint32_t opt, const unsigned char *data,
               uint32_t len)
{
  log_debug ("client %u: option %s (%" PRIu32 ", %" PRIu32 " bytes)",
             c->id, opt_name (opt), opt, len);

  if (!tls_allows (c, opt))
    return;
  switch (opt) {
  case NBD_OPT_EXPORT_NAME:
    opt_export_name (c, data, len);
    break;

  case NBD_OPT_INFO:
  case NBD_OPT_GO:
    opt_info_go (c, opt, data, len);
    break;

  case NBD_OPT_LIST:
    opt_list (c, len);
    break;

  case NBD_OPT_ABORT:
    /* Data, if any, is ignored (the protocol asks for leniency). */
    if (send_opt_reply (c, opt, NBD_REP_ACK, NULL, 0) == 0)
      conn_closing (c);
    break;

  case NBD_OPT_STRUCTURED_REPLY:
    if (len != 0) {
      send_opt_error (c, opt, NBD_REP_ERR_INVALID,
                      "STRUCTURED_REPLY with data");
      break;
    }
    c->structured = true;
    send_opt_reply (c, opt, NBD_REP_ACK, NULL, 0);
    break;

  case NBD_OPT_LIST_META_CONTEXT:
  case NBD_OPT_SET_META_CONTEXT:
    opt_meta_context (c, opt, data, len);
    break;

  case NBD_OPT_STARTTLS:
    opt_starttls (c, len);
    break;

  default:
    /* Extended headers: not yet. */
    send_opt_error (c, opt, NBD_REP_ERR_UNSUP,
                    "option %s (%" PRIu32 ") not supported",
                    opt_name (opt), opt);
    break;
  }
}

/* CONN_GREETING: the client's 32-bit flags. */
static bool
recv_client_flags (struct conn *c)
{
  const uint32_t known = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES;
  const unsigned char *p;
  uint32_t flags;
  size_t avail;

  p = conn_input (c, &avail);
  if (avail < 4)
    return false;
  memcpy (&flags, p, 4);
  conn_consume (c, 4);
  flags = be32toh (flags);

  if (flags & ~known) {
    log_info ("client %u: unknown client flags 0x%08" PRIx32
              ", disconnecting", c->id, flags);
    conn_set_dead (c);
    return false;
  }
  /* Fixed newstyle is served even to clients that do not say they know
   * it: they only ever send NBD_OPT_EXPORT_NAME anyway.
   */
  c->no_zeroes = (flags & NBD_FLAG_C_NO_ZEROES) != 0;
  c->state = CONN_HANDSHAKE;
  return true;
}

/* CONN_HANDSHAKE: one whole option. */
static bool
recv_option (struct conn *c)
{
  struct nbd_option h;
  const unsigned char *p;
  size_t avail;
  uint32_t opt, len;

  p = conn_input (c, &avail);
  if (avail < sizeof h)
    return false;
  memcpy (&h, p, sizeof h);
  opt = be32toh (h.option);
  len = be32toh (h.length);

  if (be64toh (h.magic) != NBD_IHAVEOPT) {
    log_info ("client %u: bad option magic, disconnecting", c->id);
    conn_set_dead (c);
    return false;
  }
  if (len > MAX_OPTION_LENGTH) {
    log_info ("client %u: option %s with %" PRIu32 " bytes of data, "
              "disconnecting", c->id, opt_name (opt), len);
    conn_set_dead (c);
    return false;
  }
  if (avail < sizeof h + len)
    return false;               /* rbuf can hold it: wait for the rest */

  if (++c->nr_options > MAX_OPTIONS) {
    log_info ("client %u: more than %d options, disconnecting",
              c->id, MAX_OPTIONS);
    conn_set_dead (c);
    return false;
  }

  /* Consume first: the data stays in place until the next read, and the
   * handler may close the connection.
   */
  conn_consume (c, sizeof h + len);
  handle_option (c, opt, p + sizeof h, len);
  return c->state == CONN_HANDSHAKE || c->state == CONN_TRANSMISSION;
}

static bool
handshake_step (struct conn *c)
{
  switch (c->state) {
  case CONN_GREETING:
    return recv_client_flags (c);
  case CONN_HANDSHAKE:
    return recv_option (c);
  default:
    return false;
  }
}
