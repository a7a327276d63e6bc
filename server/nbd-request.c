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
 *
 * Some requests take more than one engine call, one after the other:
 * CACHE asks where data is and reads it CACHE_CHUNK bytes at a time
 * (cache_step), and a TRIM with FUA is followed by a flush (trim_done).
 *
 * This file decides what to answer; nbd-reply.c builds every reply.  A
 * structured reply of several chunks (a sparse READ, a BLOCK_STATUS for
 * several metadata contexts) is one struct reply per chunk, filled there
 * and queued here in order: the last is the request's own reply, whose
 * release frees the request; the others live in req->chunks and release
 * nothing.  The output queue writes and releases in order, so the request
 * outlives its earlier chunks, and the data chunks point into the one read
 * buffer (gathered by writev, never copied).
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
  struct reply reply;           /* first: the last (or only) chunk of the
                                   reply; its release frees the request */
  struct conn *conn;
  uint64_t cookie;              /* echoed in the reply */
  uint64_t offset;
  uint32_t count;               /* length field of the request */
  uint16_t type;                /* NBD_CMD_* */
  uint16_t flags;               /* NBD_CMD_FLAG_* */
  void *data;                   /* READ/WRITE data (count bytes), CACHE
                                   scratch buffer, or NULL */
  size_t data_len;              /* bytes of data (a pool buffer's size) */
  size_t held;                  /* bytes counted in conn->buffered and the
                                   memory budget: this struct, data, ext,
                                   chunks, desc */
  int err;                      /* positive errno of the result, 0: success */
  const char *why;              /* message for a structured error, or NULL */

  /* Structured READ: which parts of data are zeros (qcow2_read_map).
   * BLOCK_STATUS: the engine's extents.
   */
  struct qcow2_extent *ext;
  unsigned ext_n;               /* entries of ext filled in */

  struct reply *chunks;         /* the chunks before the last, or NULL */
  struct nbd_block_descriptor *desc; /* BLOCK_STATUS payloads, or NULL */
  uint64_t cache_next;          /* CACHE: end of the part being read */
  unsigned cache_ext;           /* CACHE: the extent of ext being read */
  uint64_t cache_ext_off;       /* CACHE: bytes of it done */
  bool cache_asked;             /* CACHE: ext is a fresh answer */
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

/* Count n more bytes that req holds (freed with it). */
static void
charge (struct request *req, size_t n)
{
  req->held += n;
  req->conn->buffered += n;
  mem_hold (n);
}

/* Free a request whose reply has been written, dropped, or will never be
 * sent.  It is the release function of its (last) reply.
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
  if (req->held)
    mem_release (req->held);
  buffer_put (req->data, req->data_len);
  free (req->ext);
  free (req->chunks);
  free (req->desc);
  free (req);
}

/* The release of the chunks before the last: nothing, the request frees
 * them when its last chunk is released.
 */
static void
chunk_release (struct reply *r)
{
  (void) r;
}

/* Queue the chunks nbd-reply.c filled into rc, in order: the last is the
 * request's own reply, and req may be gone once it is queued.
 */
static void
queue_chunks (struct request *req, struct reply_chunks *rc)
{
  size_t i;

  assert (rc->last == &req->reply);
  for (i = 0; i < rc->n; i++) {
    rc->more[i].release = chunk_release;
    conn_queue_reply (req->conn, &rc->more[i]);
  }
  conn_queue_reply (req->conn, rc->last);
}

/* Whether the engine's zero map of a READ covers it exactly. */
static bool
read_map_usable (const struct request *req)
{
  uint64_t sum = 0;
  unsigned i;

  if (req->ext == NULL || req->ext_n == 0)
    return false;
  for (i = 0; i < req->ext_n; i++)
    sum += req->ext[i].length;
  if (sum != req->count) {
    log_debug ("client %u: READ map of %" PRIu64 " bytes for %" PRIu32
               ", sent as data", req->conn->id, sum, req->count);
    return false;
  }
  return true;
}

/* Queue the reply of a successful structured READ: sparse (its runs of
 * zeros as holes, nbd-reply.c) but with NBD_CMD_FLAG_DF, no usable map,
 * or no memory for the chunks, when the whole read is one OFFSET_DATA
 * chunk.
 */
static void
send_read (struct request *req)
{
  struct reply_chunks rc = { .cookie = req->cookie, .last = &req->reply };

  if ((req->flags & NBD_CMD_FLAG_DF) || !read_map_usable (req) ||
      (req->ext_n > 1 &&
       (req->chunks = calloc (req->ext_n - 1, sizeof *req->chunks)) == NULL)) {
    reply_structured_data (&req->reply, req->cookie, true, req->offset,
                           req->data, req->count);
    conn_queue_reply (req->conn, &req->reply);
    return;
  }

  if (req->ext_n > 1)
    charge (req, (req->ext_n - 1) * sizeof *req->chunks);
  rc.more = req->chunks;
  reply_read_sparse (&rc, req->offset, req->data, req->ext, req->ext_n);
  queue_chunks (req, &rc);
}

/* Queue the reply of a successful BLOCK_STATUS: one chunk per negotiated
 * context, from the one engine answer (nbd-reply.c).  Returns 0, or a
 * positive errno (nothing queued) for an error reply.
 */
static int
send_block_status (struct request *req)
{
  struct reply_chunks rc = { .cookie = req->cookie, .last = &req->reply };
  size_t max = (req->flags & NBD_CMD_FLAG_REQ_ONE) ? 1 : req->ext_n;
  size_t ndesc = META_NR * (size_t) req->ext_n;

  if (req->ext_n == 0) {
    log_error ("client %u: BLOCK_STATUS: the engine found no extent",
               req->conn->id);
    return EIO;
  }
  req->desc = calloc (ndesc, sizeof *req->desc);
  req->chunks = calloc (META_NR - 1, sizeof *req->chunks);
  if (req->desc == NULL || req->chunks == NULL)
    return ENOMEM;
  charge (req, ndesc * sizeof *req->desc
          + (META_NR - 1) * sizeof *req->chunks);
  rc.more = req->chunks;
  /* validate_request checked that some context was negotiated. */
  if (reply_block_status (&rc, req->conn->meta, req->ext, req->ext_n,
                          req->count, max, req->desc) < 0) {
    log_error ("client %u: BLOCK_STATUS: empty extents from the engine",
               req->conn->id);
    return EIO;
  }
  queue_chunks (req, &rc);
  return 0;
}

/* Fill in the reply from the request's result and queue it. */
static void
send_reply (struct request *req)
{
  struct conn *c = req->conn;
  struct reply *r = &req->reply;
  int err;

  r->release = request_release;
  if (c->state == CONN_DEAD) {
    /* Nobody to answer. */
    request_release (r);
    return;
  }
  /* With structured replies a success without payload may still be a
   * simple reply, and is: the client reads its 16 bytes in one go, where
   * a chunk costs it a second read (QD1 writes, docs/architecture.md).
   * READ must be structured; an error is, for its message.
   */
  if (!c->structured || (req->err == 0 && req->type != NBD_CMD_READ &&
                          req->type != NBD_CMD_BLOCK_STATUS)) {
    reply_simple (r, req->cookie, req->type, req->flags, req->err,
                  req->type == NBD_CMD_READ ? req->data : NULL,
                  req->type == NBD_CMD_READ ? req->count : 0);
    conn_queue_reply (c, r);
    return;
  }

  if (req->err == 0 && req->type == NBD_CMD_READ && req->count > 0) {
    send_read (req);
    return;
  }
  if (req->err == 0 && req->type == NBD_CMD_BLOCK_STATUS) {
    err = send_block_status (req);
    if (err == 0)
      return;
    req->err = err;
  }
  if (req->err)
    reply_structured_error (r, req->cookie, req->type, req->flags, req->err,
                            req->why);
  else
    reply_structured_done (r, req->cookie);
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

/* The request is over, with the engine's result ret (0 or -errno). */
static void
request_finish (struct request *req, int ret)
{
  struct conn *c = req->conn;

  if (ret < 0) {
    req->err = -ret;
    if (ret == -ENOTSUP && req->type == NBD_CMD_WRITE_ZEROES &&
        (req->flags & NBD_CMD_FLAG_FAST_ZERO))
      /* The expected answer when zeroing would take writing data. */
      log_debug ("client %u: WRITE_ZEROES of %" PRIu32 " bytes at %"
                 PRIu64 ": not fast", c->id, req->count, req->offset);
    else
      log_error ("client %u: %s of %" PRIu32 " bytes at %" PRIu64 ": %s",
                 c->id, cmd_name (req->type), req->count, req->offset,
                 strerror (-ret));
  }
  /* On a dead connection this only frees the request. */
  send_reply (req);
  conn_mark_pending (c);
}

/* The engine's completion callback (from qcow2_process only). */
static void
request_done (void *opaque, int ret)
{
  struct request *req = opaque;
  struct conn *c = req->conn;

  assert (c->engine_refs > 0);
  c->engine_refs--;
  request_finish (req, ret);
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

static void cache_step (struct request *req);
static int alloc_data (struct request *req, size_t len);

/* A part of a CACHE has finished (a block status or a read): go on, or
 * answer.  A connection going away or a server shutting down ends it
 * early, with success (the protocol lets a reply come before everything
 * is cached).
 */
static void
cache_done (void *opaque, int ret)
{
  struct request *req = opaque;
  struct conn *c = req->conn;

  assert (c->engine_refs > 0);
  c->engine_refs--;
  if (ret < 0 || req->cache_next >= req->offset + req->count
      || c->state == CONN_DEAD || c->shutdown) {
    request_finish (req, ret);
    return;
  }
  cache_step (req);
  conn_mark_pending (c);
}

/* The next engine call of a CACHE: only data is read (CACHE_CHUNK bytes
 * at a time), so the engine is first asked where it is; runs of zeros
 * and holes are done without reading them (a 4 GiB CACHE of a sparse
 * disk once meant 4 GiB of zeros made in memory while other clients
 * waited).  Extents of the block status answer are used up in order
 * (req->ext[req->cache_ext], req->cache_ext_off bytes of it done).
 */
static void
cache_step (struct request *req)
{
  struct conn *c = req->conn;
  struct qcow2 *q = c->exp->q;
  uint64_t end = req->offset + req->count;
  uint64_t pos = req->cache_next;

  if (req->cache_asked && req->ext_n == 0) {
    /* The engine describes at least a prefix: this is not expected. */
    request_finish (req, -EIO);
    return;
  }
  req->cache_asked = false;
  while (req->cache_ext < req->ext_n) {
    const struct qcow2_extent *e = &req->ext[req->cache_ext];
    uint64_t left = e->length - req->cache_ext_off;
    uint64_t len = left < CACHE_CHUNK ? left : CACHE_CHUNK;
    int err;

    if (len > end - pos)
      len = end - pos;
    if (e->flags & QCOW2_EXTENT_ZERO)
      len = left < end - pos ? left : end - pos;
    else if (req->data == NULL) {
      err = alloc_data (req, CACHE_CHUNK);
      if (err) {
        send_error (req, err, NULL);
        return;
      }
    }
    req->cache_ext_off += len;
    if (req->cache_ext_off == e->length) {
      req->cache_ext++;
      req->cache_ext_off = 0;
    }
    req->cache_next = pos + len;
    if (!(e->flags & QCOW2_EXTENT_ZERO)) {
      note_submitted (req, qcow2_read (q, pos, req->data, len, cache_done,
                                       req));
      return;
    }
    pos += len;
    if (pos >= end) {
      request_finish (req, 0);
      return;
    }
  }
  req->cache_ext = 0;
  req->cache_ext_off = 0;
  req->cache_asked = true;
  note_submitted (req, qcow2_block_status (q, pos, end - pos, req->ext,
                                           CACHE_EXTENTS, &req->ext_n,
                                           cache_done, req));
}

/* A TRIM has finished: with FUA, make it durable before answering. */
static void
trim_done (void *opaque, int ret)
{
  struct request *req = opaque;
  struct conn *c = req->conn;

  assert (c->engine_refs > 0);
  c->engine_refs--;
  if (ret == 0 && (req->flags & NBD_CMD_FLAG_FUA) && c->state != CONN_DEAD) {
    note_submitted (req, qcow2_flush (c->exp->q, request_done, req));
    conn_mark_pending (c);
    return;
  }
  request_finish (req, ret);
}

/* Give the request a data buffer of len bytes.  Returns 0 or ENOMEM. */
static int
alloc_data (struct request *req, size_t len)
{
  struct conn *c = req->conn;
  void *p = buffer_get (len);

  if (!p) {
    log_error ("client %u: %s of %" PRIu32 " bytes: out of memory",
               c->id, cmd_name (req->type), req->count);
    return ENOMEM;
  }
  req->data = p;
  req->data_len = len;
  charge (req, len);
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
  if (!export_write_ok (c->exp, req->offset, req->data, req->count)) {
    log_info ("client %u: refused a write to the first bytes of %s, "
              "a probed raw image: it would then probe as qcow2",
              c->id, c->exp->path);
    send_error (req, EPERM, "writing a qcow2 header into an image "
                "probed as raw (serve it with -f raw)");
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

/* The command flags valid with each command (FUA, being advertised, is
 * valid with all of them).
 */
static uint16_t
allowed_flags (const struct conn *c, uint16_t type)
{
  switch (type) {
  case NBD_CMD_READ:
    return NBD_CMD_FLAG_FUA |
      (c->eflags & NBD_FLAG_SEND_DF ? NBD_CMD_FLAG_DF : 0);
  case NBD_CMD_WRITE_ZEROES:
    return NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO;
  case NBD_CMD_BLOCK_STATUS:
    return NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_REQ_ONE;
  default:
    return NBD_CMD_FLAG_FUA;
  }
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
  case NBD_CMD_TRIM:
  case NBD_CMD_CACHE:
  case NBD_CMD_WRITE_ZEROES:
  case NBD_CMD_BLOCK_STATUS:
    break;
  default:
    *why = "unsupported command";
    return EINVAL;
  }

  if (req->flags & ~allowed_flags (c, req->type)) {
    *why = "unsupported command flags";
    return EINVAL;
  }

  if (e->read_only && (req->type == NBD_CMD_WRITE ||
                       req->type == NBD_CMD_TRIM ||
                       req->type == NBD_CMD_WRITE_ZEROES)) {
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

  if (req->type == NBD_CMD_BLOCK_STATUS) {
    if (!c->structured || c->meta == 0) {
      *why = "block status without a metadata context";
      return EINVAL;
    }
    if (req->count == 0) {
      *why = "block status of no bytes";
      return EINVAL;
    }
  }

  /* Only READ and WRITE carry a payload (the others are not bounded). */
  if ((req->type == NBD_CMD_READ || req->type == NBD_CMD_WRITE) &&
      req->count > MAX_PAYLOAD) {
    *why = "request larger than the maximum payload";
    return EINVAL;
  }
  /* Written so that offset + count cannot wrap around. */
  if (req->offset > size || req->count > size - req->offset) {
    *why = "request past the end of the export";
    return req->type == NBD_CMD_WRITE || req->type == NBD_CMD_WRITE_ZEROES
      ? ENOSPC : EINVAL;
  }
  if (align > 1 && (req->offset % align != 0 || req->count % align != 0)) {
    *why = "request not aligned to the minimum block size";
    return EINVAL;
  }
  return 0;
}

/* Start a structured READ: the engine also says which parts are zeros.
 * The map has room for every hole worth a chunk of its own and the data
 * around them; past it the engine calls the rest data.
 */
static void
start_read_map (struct conn *c, struct request *req)
{
  size_t max = 2 * (req->count / SPARSE_MIN_HOLE) + 2;

  if (max > SPARSE_MAX_EXTENTS)
    max = SPARSE_MAX_EXTENTS;
  req->ext = calloc (max, sizeof *req->ext);
  if (req->ext == NULL) {
    /* Without the map the reply is one data chunk: still right. */
    note_submitted (req, qcow2_read (c->exp->q, req->offset, req->data,
                                     req->count, request_done, req));
    return;
  }
  charge (req, max * sizeof *req->ext);
  note_submitted (req, qcow2_read_map (c->exp->q, req->offset, req->data,
                                       req->count, req->ext, max,
                                       &req->ext_n, request_done, req));
}

/* Start a validated READ of more than nothing. */
static void
start_read (struct conn *c, struct request *req)
{
  int err = alloc_data (req, req->count);

  if (err) {
    send_error (req, err, NULL);
    return;
  }
  if (c->structured && !(req->flags & NBD_CMD_FLAG_DF))
    start_read_map (c, req);
  else
    note_submitted (req, qcow2_read (c->exp->q, req->offset, req->data,
                                     req->count, request_done, req));
}

/* Start a validated WRITE of more than nothing: receive its payload. */
static void
start_write (struct conn *c, struct request *req)
{
  int err = alloc_data (req, req->count);

  if (err) {
    /* The payload must still be read past. */
    req->err = err;
    conn_recv_payload (c, NULL, req->count, skipped_payload_done, req);
    return;
  }
  conn_recv_payload (c, req->data, req->count, write_payload_done, req);
}

/* Start a validated WRITE_ZEROES of more than nothing. */
static void
start_write_zeroes (struct conn *c, struct request *req)
{
  unsigned flags = 0;

  if (req->flags & NBD_CMD_FLAG_FUA)
    flags |= QCOW2_WRITE_FUA;
  if (req->flags & NBD_CMD_FLAG_NO_HOLE)
    flags |= QCOW2_ZERO_NO_HOLE;
  if (req->flags & NBD_CMD_FLAG_FAST_ZERO)
    flags |= QCOW2_ZERO_FAST;
  note_submitted (req, qcow2_write_zeroes (c->exp->q, req->offset,
                                           req->count, flags, request_done,
                                           req));
}

/* Start a validated CACHE of more than nothing.  The data of the range is
 * read into a scratch buffer that is then dropped: that loads the L2
 * tables and fills the page cache.
 */
static void
start_cache (struct conn *c, struct request *req)
{
  req->ext = calloc (CACHE_EXTENTS, sizeof *req->ext);
  if (req->ext == NULL) {
    log_error ("client %u: CACHE: out of memory", c->id);
    send_error (req, ENOMEM, NULL);
    return;
  }
  charge (req, CACHE_EXTENTS * sizeof *req->ext);
  req->cache_next = req->offset;
  cache_step (req);
}

/* Start a validated BLOCK_STATUS. */
static void
start_block_status (struct conn *c, struct request *req)
{
  /* REQ_ONE sends one extent per context: a few more than one are
   * asked for, so that base:allocation can merge extents that differ
   * only in depth.
   */
  size_t max = (req->flags & NBD_CMD_FLAG_REQ_ONE)
    ? STATUS_REQ_ONE_EXTENTS : STATUS_MAX_EXTENTS;

  req->ext = calloc (max, sizeof *req->ext);
  if (req->ext == NULL) {
    log_error ("client %u: BLOCK_STATUS: out of memory", c->id);
    send_error (req, ENOMEM, NULL);
    return;
  }
  charge (req, max * sizeof *req->ext);
  note_submitted (req, qcow2_block_status (c->exp->q, req->offset,
                                           req->count, req->ext, max,
                                           &req->ext_n, request_done, req));
}

/* Start a validated request. */
static void
handle_request (struct conn *c, struct request *req)
{
  switch (req->type) {
  case NBD_CMD_READ:
    if (req->count == 0)
      send_reply (req);
    else
      start_read (c, req);
    return;

  case NBD_CMD_WRITE:
    if (req->count == 0)
      send_reply (req);
    else
      start_write (c, req);
    return;

  case NBD_CMD_FLUSH:
    /* A read-only export has nothing to flush. */
    if (c->exp->read_only)
      send_reply (req);
    else
      note_submitted (req, qcow2_flush (c->exp->q, request_done, req));
    return;

  case NBD_CMD_TRIM:
    /* With --discard=ignore a TRIM is a hint not taken, and FUA has
     * nothing to make durable.
     */
    if (req->count == 0 || !c->exp->discard)
      send_reply (req);
    else
      note_submitted (req, qcow2_discard (c->exp->q, req->offset,
                                          req->count, trim_done, req));
    return;

  case NBD_CMD_WRITE_ZEROES:
    if (req->count == 0)
      send_reply (req);
    else
      start_write_zeroes (c, req);
    return;

  case NBD_CMD_CACHE:
    if (req->count == 0)
      send_reply (req);
    else
      start_cache (c, req);
    return;

  case NBD_CMD_BLOCK_STATUS:
    start_block_status (c, req);
    return;

  default:
    abort ();                   /* validate_request let it through */
  }
}

/* The most a request will hold, from its header (mem_admit): a
 * bad one may be counted too high, never too low.
 */
static size_t
request_need (const struct conn *c, const struct nbd_request *hdr)
{
  size_t need = sizeof (struct request);
  size_t count = be32toh (hdr->length);
  size_t n;

  if (count > MAX_PAYLOAD)
    count = MAX_PAYLOAD;        /* refused without data */
  switch (be16toh (hdr->type)) {
  case NBD_CMD_READ:
    n = 2 * (count / SPARSE_MIN_HOLE) + 2;
    if (n > SPARSE_MAX_EXTENTS)
      n = SPARSE_MAX_EXTENTS;
    need += count;
    if (c->structured)
      need += n * (sizeof (struct qcow2_extent) + sizeof (struct reply));
    break;
  case NBD_CMD_WRITE:
    need += count;
    break;
  case NBD_CMD_CACHE:
    need += CACHE_CHUNK + CACHE_EXTENTS * sizeof (struct qcow2_extent);
    break;
  case NBD_CMD_BLOCK_STATUS:
    need += STATUS_MAX_EXTENTS * (sizeof (struct qcow2_extent)
                                  + META_NR
                                  * sizeof (struct nbd_block_descriptor))
      + (META_NR - 1) * sizeof (struct reply);
    break;
  }
  return need;
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

  if (c->state != CONN_TRANSMISSION || !conn_has_room (c) || c->mem_wait.waiting)
    return false;
  p = conn_input (c, &avail);
  if (avail < sizeof hdr)
    return false;
  memcpy (&hdr, p, sizeof hdr);
  if (!mem_admit (request_need (c, &hdr), c->in_flight == 0)) {
    /* Left unparsed until memory is freed. */
    conn_pause_for_memory (c);
    return false;
  }
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
  charge (req, sizeof *req);

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
