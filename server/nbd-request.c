/* server/nbd-request.c: the transmission phase: parse a request header,
 * validate it, receive its payload, hand it to the engine, and queue its
 * reply when the engine calls back.
 *
 * Each request has its own data buffer and reply, so requests run in
 * parallel and are answered in the order they finish, not the order they
 * came.  A bad but well-formed request gets an error reply and the
 * connection goes on; a broken stream (bad magic) closes the connection.
 *
 * A request's life:
 *
 *   request_step          header parsed, validated      (in_flight + 1)
 *   [conn_recv_payload]   WRITE: its data arrives
 *   qcow2_read/write/...  submitted                     (engine_refs + 1)
 *   request_done          engine callback               (engine_refs - 1)
 *   send_reply            reply queued on the connection
 *   request_release       reply written or dropped      (in_flight - 1)
 */
#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <assert.h>
#include <endian.h>
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

struct request {
  struct reply reply;           /* first: a reply is released as its request */
  struct conn *conn;
  uint64_t cookie;              /* echoed in the reply */
  uint64_t offset;
  uint32_t count;               /* length field of the request */
  uint16_t type;                /* NBD_CMD_* */
  uint16_t flags;               /* NBD_CMD_FLAG_* */
  void *data;                   /* READ/WRITE data (count bytes), or NULL */
  size_t held;                  /* bytes counted in conn->buffered */
  int err;                      /* positive errno of the result, 0: success */
  const char *why;              /* message for a structured error, or NULL */
};

static const char *
cmd_name (uint16_t type)
{
  switch (type) {
  case NBD_CMD_READ: return "READ";
  case NBD_CMD_WRITE: return "WRITE";
  case NBD_CMD_DISC: return "DISC";
  case NBD_CMD_FLUSH: return "FLUSH";
  case NBD_CMD_TRIM: return "TRIM";
  case NBD_CMD_CACHE: return "CACHE";
  case NBD_CMD_WRITE_ZEROES: return "WRITE_ZEROES";
  case NBD_CMD_BLOCK_STATUS: return "BLOCK_STATUS";
  default: return "unknown";
  }
}

/* Free a request whose reply has been written, dropped, or will never be
 * sent.  It is the release function of its reply.
 */
static void
request_release (struct reply *r)
{
  struct request *req = (struct request *) r;
  struct conn *c = req->conn;

  assert (c->in_flight > 0);
  assert (c->buffered >= req->held);
  c->in_flight--;
  c->buffered -= req->held;
  free (req->data);
  free (req);
}

/* Fill in the reply from the request's result and queue it. */
static void
send_reply (struct request *req)
{
  struct conn *c = req->conn;
  struct reply *r = &req->reply;

  r->release = request_release;
  if (c->structured) {
    if (req->err)
      reply_structured_error (r, req->cookie, req->err, req->why);
    else if (req->type == NBD_CMD_READ && req->count > 0)
      reply_structured_data (r, req->cookie, req->offset,
                             req->data, req->count);
    else
      reply_structured_done (r, req->cookie);
  }
  else
    reply_simple (r, req->cookie, req->err,
                  req->type == NBD_CMD_READ ? req->data : NULL,
                  req->type == NBD_CMD_READ ? req->count : 0);
  conn_queue_reply (c, r);
}

/* Answer the request with an error now. */
static void
send_error (struct request *req, int err, const char *why)
{
  req->err = err;
  req->why = why;
  send_reply (req);
}

/* The engine's completion callback (from qcow2_process only). */
static void
request_done (void *opaque, int ret)
{
  struct request *req = opaque;
  struct conn *c = req->conn;

  assert (c->engine_refs > 0);
  c->engine_refs--;
  if (ret < 0) {
    req->err = -ret;
    log_error ("client %u: %s of %" PRIu32 " bytes at %" PRIu64 ": %s",
               c->id, cmd_name (req->type), req->count, req->offset,
               strerror (-ret));
  }
  /* On a dead connection this only frees the request. */
  send_reply (req);
  conn_mark_pending (c);
}

/* Account for a request submitted to the engine, or answer its refusal. */
static void
note_submitted (struct request *req, int r)
{
  if (r == 0) {
    req->conn->engine_refs++;
    return;
  }
  log_debug ("client %u: %s refused by the engine: %s",
             req->conn->id, cmd_name (req->type), strerror (-r));
  send_error (req, -r, NULL);
}

/* Give the request a data buffer of count bytes.  Returns 0 or ENOMEM. */
static int
alloc_data (struct request *req)
{
  struct conn *c = req->conn;
  void *p;

  if (posix_memalign (&p, BUFFER_ALIGN, req->count) != 0) {
    log_error ("client %u: %s of %" PRIu32 " bytes: out of memory",
               c->id, cmd_name (req->type), req->count);
    return ENOMEM;
  }
  req->data = p;
  req->held = req->count;
  c->buffered += req->held;
  return 0;
}

/* A WRITE's payload has arrived (ok) or never will (!ok). */
static void
write_payload_done (struct conn *c, void *opaque, bool ok)
{
  struct request *req = opaque;
  unsigned flags = 0;

  if (!ok) {
    request_release (&req->reply);
    return;
  }
  if (req->flags & NBD_CMD_FLAG_FUA)
    flags |= QCOW2_WRITE_FUA;
  note_submitted (req, qcow2_write (c->exp->q, req->offset, req->data,
                               req->count, flags, request_done, req));
}

/* The payload of a refused WRITE has been thrown away: answer it. */
static void
skipped_payload_done (struct conn *c, void *opaque, bool ok)
{
  struct request *req = opaque;

  (void) c;
  if (!ok) {
    request_release (&req->reply);
    return;
  }
  send_reply (req);
}

/* Check a request against the protocol and the export.  Returns 0, or a
 * positive errno for the error reply with *why saying what was wrong.
 */
static int
validate_request (struct conn *c, const struct request *req,
                  const char **why)
{
  const struct export *e = c->exp;
  uint64_t size = qcow2_size (e->q);
  uint32_t align = qcow2_min_align (e->q);

  switch (req->type) {
  case NBD_CMD_READ:
  case NBD_CMD_WRITE:
  case NBD_CMD_FLUSH:
    break;
  default:
    /* TRIM, CACHE, WRITE_ZEROES and BLOCK_STATUS are not advertised. */
    *why = "unsupported command";
    return EINVAL;
  }

  /* FUA is advertised, so it must be accepted on every command. */
  if (req->flags & ~NBD_CMD_FLAG_FUA) {
    *why = "unsupported command flags";
    return EINVAL;
  }

  if (req->type == NBD_CMD_WRITE && e->read_only) {
    *why = "the export is read-only";
    return EPERM;
  }

  if (req->type == NBD_CMD_FLUSH) {
    if (req->offset != 0 || req->count != 0) {
      *why = "flush with a nonzero offset or length";
      return EINVAL;
    }
    return 0;
  }

  if (req->count > MAX_PAYLOAD) {
    *why = "request larger than the maximum payload";
    return EINVAL;
  }
  /* Written so that offset + count cannot wrap around. */
  if (req->offset > size || req->count > size - req->offset) {
    *why = "request past the end of the export";
    return req->type == NBD_CMD_WRITE ? ENOSPC : EINVAL;
  }
  if (align > 1 && (req->offset % align != 0 || req->count % align != 0)) {
    *why = "request not aligned to the minimum block size";
    return EINVAL;
  }
  return 0;
}

/* Start a validated request. */
static void
handle_request (struct conn *c, struct request *req)
{
  int err;

  switch (req->type) {
  case NBD_CMD_READ:
    if (req->count == 0) {
      send_reply (req);
      return;
    }
    err = alloc_data (req);
    if (err) {
      send_error (req, err, NULL);
      return;
    }
    note_submitted (req, qcow2_read (c->exp->q, req->offset, req->data,
                                req->count, request_done, req));
    return;

  case NBD_CMD_WRITE:
    if (req->count == 0) {
      send_reply (req);
      return;
    }
    err = alloc_data (req);
    if (err) {
      /* The payload must still be read past. */
      req->err = err;
      conn_recv_payload (c, NULL, req->count, skipped_payload_done, req);
      return;
    }
    conn_recv_payload (c, req->data, req->count, write_payload_done, req);
    return;

  case NBD_CMD_FLUSH:
    /* A read-only export has nothing to flush. */
    if (c->exp->read_only) {
      send_reply (req);
      return;
    }
    note_submitted (req, qcow2_flush (c->exp->q, request_done, req));
    return;

  default:
    abort ();                   /* validate_request let it through */
  }
}

bool
request_step (struct conn *c)
{
  const unsigned char *p;
  struct nbd_request hdr;
  struct request *req;
  size_t avail;
  const char *why = NULL;
  int err;

  if (c->state != CONN_TRANSMISSION || !conn_has_room (c))
    return false;
  p = conn_input (c, &avail);
  if (avail < sizeof hdr)
    return false;
  memcpy (&hdr, p, sizeof hdr);
  conn_consume (c, sizeof hdr);

  if (be32toh (hdr.magic) != NBD_REQUEST_MAGIC) {
    log_info ("client %u: bad request magic 0x%08" PRIx32 ", disconnecting",
              c->id, be32toh (hdr.magic));
    conn_set_dead (c);
    return false;
  }

  /* No reply, no request: finish what is in flight, then close. */
  if (be16toh (hdr.type) == NBD_CMD_DISC) {
    log_debug ("client %u: DISC", c->id);
    conn_closing (c);
    return false;
  }

  req = calloc (1, sizeof *req);
  if (req == NULL) {
    log_error ("client %u: %m", c->id);
    conn_set_dead (c);
    return false;
  }
  req->conn = c;
  req->cookie = be64toh (hdr.cookie);
  req->offset = be64toh (hdr.offset);
  req->count = be32toh (hdr.length);
  req->type = be16toh (hdr.type);
  req->flags = be16toh (hdr.flags);
  c->in_flight++;

  err = validate_request (c, req, &why);
  if (err == 0 && c->shutdown) {
    /* The protocol's answer to anything sent during a shutdown. */
    why = "the server is shutting down";
    err = ESHUTDOWN;
  }
  if (err) {
    log_debug ("client %u: %s flags 0x%" PRIx16 " offset %" PRIu64
               " length %" PRIu32 ": %s",
               c->id, cmd_name (req->type), req->flags, req->offset,
               req->count, why);
    if (req->type == NBD_CMD_WRITE && req->count > 0) {
      if (req->count > MAX_PAYLOAD) {
        /* The client broke the advertised limit: answer, then hang up
         * rather than read that much to stay in step.
         */
        send_error (req, err, why);
        conn_closing (c);
        return false;
      }
      req->err = err;
      req->why = why;
      conn_recv_payload (c, NULL, req->count, skipped_payload_done, req);
      return true;
    }
    send_error (req, err, why);
    return true;
  }

  handle_request (c, req);
  return true;
}
