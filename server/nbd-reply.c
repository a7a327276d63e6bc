/* server/nbd-reply.c: the replies of the transmission phase, simple and
 * structured, and the mapping of errno values to NBD error values.
 *
 * Each function fills a struct reply (its header storage and iovecs) for
 * conn_queue_reply(); payload data is pointed to, never copied.  A reply
 * of several chunks (a sparse READ, a BLOCK_STATUS for several metadata
 * contexts) is filled into a struct reply_chunks, whose chunks the caller
 * queues in order; nothing here queues or allocates.
 */
#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <assert.h>
#include <endian.h>
#include <errno.h>
#include <string.h>

#include "internal.h"

uint32_t
reply_nbd_errno (int err, uint16_t cmd, uint16_t flags)
{
  switch (err) {
  case 0:
    return NBD_SUCCESS;
  case EPERM:
  case EROFS:
    return NBD_EPERM;
  case EIO:
    return NBD_EIO;
  case ENOMEM:
    return NBD_ENOMEM;
  case EINVAL:
    return NBD_EINVAL;
  case ENOSPC:
#ifdef EDQUOT
  case EDQUOT:
#endif
  case EFBIG:
    return NBD_ENOSPC;
  case EOVERFLOW:
    /* A client that did not ask for DF (or sent a payload) may not
     * expect it.
     */
    if ((cmd == NBD_CMD_READ && (flags & NBD_CMD_FLAG_DF))
        || (cmd != NBD_CMD_READ && cmd != NBD_CMD_WRITE))
      return NBD_EOVERFLOW;
    return NBD_EINVAL;
  case ENOTSUP:
#if EOPNOTSUPP != ENOTSUP
  case EOPNOTSUPP:
#endif
    /* Kept for "zeroing would not be fast"; anything else not supported
     * is an invalid request as far as the protocol goes.
     */
    if (cmd == NBD_CMD_WRITE_ZEROES && (flags & NBD_CMD_FLAG_FAST_ZERO))
      return NBD_ENOTSUP;
    return NBD_EINVAL;
  case ESHUTDOWN:
    return NBD_ESHUTDOWN;
  default:
    /* The client only learns "I/O error": keep the real reason where an
     * administrator can find it.
     */
    log_debug ("errno %d (%s) sent to the client as EIO",
               err, strerror (err));
    return NBD_EIO;
  }
}

/* Point the reply's header iovec at its own storage, n bytes. */
static void
set_header (struct reply *r, size_t n, void *data, size_t len)
{
  r->iov[0].iov_base = r->hdr;
  r->iov[0].iov_len = n;
  r->iov[1].iov_base = data;
  r->iov[1].iov_len = len;
}

void
reply_simple (struct reply *r, uint64_t cookie, uint16_t cmd,
              uint16_t flags, int err, void *data, size_t len)
{
  struct nbd_simple_reply h = {
    .magic = htobe32 (NBD_SIMPLE_REPLY_MAGIC),
    .error = htobe32 (reply_nbd_errno (err, cmd, flags)),
    .cookie = htobe64 (cookie),
  };

  _Static_assert (sizeof h <= sizeof r->hdr, "reply header storage");
  memcpy (r->hdr, &h, sizeof h);
  /* An error reply never carries data. */
  set_header (r, sizeof h, err ? NULL : data, err ? 0 : len);
}

/* Write a chunk header of payload length len into r->hdr; done: the last
 * chunk of the reply.
 */
static void
chunk_header (struct reply *r, uint64_t cookie, bool done, uint16_t type,
              uint32_t len)
{
  struct nbd_structured_reply h = {
    .magic = htobe32 (NBD_STRUCTURED_REPLY_MAGIC),
    .flags = htobe16 (done ? NBD_REPLY_FLAG_DONE : 0),
    .type = htobe16 (type),
    .cookie = htobe64 (cookie),
    .length = htobe32 (len),
  };

  memcpy (r->hdr, &h, sizeof h);
}

void
reply_structured_data (struct reply *r, uint64_t cookie, bool done,
                       uint64_t offset, void *data, size_t len)
{
  struct nbd_structured_reply_offset_data d = {
    .offset = htobe64 (offset),
  };
  const size_t hlen = sizeof (struct nbd_structured_reply);

  _Static_assert (sizeof (struct nbd_structured_reply) + sizeof d <=
                  sizeof r->hdr, "reply header storage");
  chunk_header (r, cookie, done, NBD_REPLY_TYPE_OFFSET_DATA, sizeof d + len);
  memcpy (r->hdr + hlen, &d, sizeof d);
  set_header (r, hlen + sizeof d, data, len);
}

/* Fill r as an NBD_REPLY_TYPE_OFFSET_HOLE chunk: len > 0 bytes of zeros
 * at offset; done: the last chunk.
 */
static void
reply_structured_hole (struct reply *r, uint64_t cookie, bool done,
                       uint64_t offset, uint32_t len)
{
  struct nbd_structured_reply_offset_hole h = {
    .offset = htobe64 (offset),
    .length = htobe32 (len),
  };
  const size_t hlen = sizeof (struct nbd_structured_reply);

  _Static_assert (sizeof (struct nbd_structured_reply) + sizeof h <=
                  sizeof r->hdr, "reply header storage");
  chunk_header (r, cookie, done, NBD_REPLY_TYPE_OFFSET_HOLE, sizeof h);
  memcpy (r->hdr + hlen, &h, sizeof h);
  set_header (r, hlen + sizeof h, NULL, 0);
}

/* Fill r as an NBD_REPLY_TYPE_BLOCK_STATUS chunk for the metadata context
 * id: n > 0 descriptors (pointed to, not copied); done: the last chunk.
 */
static void
reply_structured_status (struct reply *r, uint64_t cookie, bool done,
                         uint32_t id, struct nbd_block_descriptor *desc,
                         size_t n)
{
  const size_t hlen = sizeof (struct nbd_structured_reply);
  uint32_t be = htobe32 (id);

  _Static_assert (sizeof (struct nbd_structured_reply) + sizeof be <=
                  sizeof r->hdr, "reply header storage");
  chunk_header (r, cookie, done, NBD_REPLY_TYPE_BLOCK_STATUS,
                sizeof be + n * sizeof *desc);
  memcpy (r->hdr + hlen, &be, sizeof be);
  set_header (r, hlen + sizeof be, desc, n * sizeof *desc);
}

void
reply_structured_done (struct reply *r, uint64_t cookie)
{
  chunk_header (r, cookie, true, NBD_REPLY_TYPE_NONE, 0);
  set_header (r, sizeof (struct nbd_structured_reply), NULL, 0);
}

void
reply_structured_error (struct reply *r, uint64_t cookie, uint16_t cmd,
                        uint16_t flags, int err, const char *msg)
{
  const size_t hlen = sizeof (struct nbd_structured_reply);
  const size_t elen = sizeof (struct nbd_structured_reply_error);
  const size_t room = sizeof r->hdr - hlen - elen;
  struct nbd_structured_reply_error e;
  size_t mlen;

  if (msg == NULL)
    msg = strerror (err);
  /* The message fits in the header storage; cut it if need be. */
  mlen = strlen (msg);
  if (mlen > room)
    mlen = room;

  e.error = htobe32 (reply_nbd_errno (err, cmd, flags));
  e.length = htobe16 (mlen);
  chunk_header (r, cookie, true, NBD_REPLY_TYPE_ERROR, elen + mlen);
  memcpy (r->hdr + hlen, &e, elen);
  memcpy (r->hdr + hlen + elen, msg, mlen);
  set_header (r, hlen + elen + mlen, NULL, 0);
}

/* The next chunk of rc to fill: the last one (done) goes into rc->last. */
static struct reply *
next_chunk (struct reply_chunks *rc, bool done)
{
  return done ? rc->last : &rc->more[rc->n++];
}

/* A run of a READ's data sent as one chunk: [off, off + len) from the
 * request's offset, zeros (an OFFSET_HOLE) or data.
 */
struct span {
  uint64_t off;
  uint64_t len;
  bool hole;
};

static void
read_span (struct reply_chunks *rc, uint64_t offset, char *data,
           const struct span *s, bool done)
{
  struct reply *r = next_chunk (rc, done);

  if (s->hole)
    reply_structured_hole (r, rc->cookie, done, offset + s->off,
                           (uint32_t) s->len);
  else
    reply_structured_data (r, rc->cookie, done, offset + s->off,
                           data + s->off, s->len);
}

void
reply_read_sparse (struct reply_chunks *rc, uint64_t offset, void *data,
                   const struct qcow2_extent *ext, unsigned n)
{
  struct span cur = { 0 };
  uint64_t pos = 0;
  unsigned i;

  assert (n > 0);
  /* Each extent after the first starts at most one new span, so there
   * are at most n - 1 spans before the last.
   */
  for (i = 0; i < n; i++) {
    const struct qcow2_extent *x = &ext[i];
    bool hole = (x->flags & QCOW2_EXTENT_ZERO) && x->length >= SPARSE_MIN_HOLE;

    if (i > 0 && hole == cur.hole)
      cur.len += x->length;
    else {
      if (i > 0)
        read_span (rc, offset, data, &cur, false);
      cur = (struct span) { .off = pos, .len = x->length, .hole = hole };
    }
    pos += x->length;
  }
  read_span (rc, offset, data, &cur, true);
  assert (rc->n < n);
}

/* Fill d with the descriptors of context m from the engine's extents
 * ext[0..n): neighbours of equal status merged, at most max of them, and
 * none past count bytes.  Returns how many (0: none, which must not be
 * sent).
 */
static size_t
status_descriptors (const struct meta_context *m,
                    const struct qcow2_extent *ext, unsigned n,
                    uint64_t count, size_t max,
                    struct nbd_block_descriptor *d)
{
  uint64_t left = count;
  size_t k = 0, i;

  for (i = 0; i < n && left > 0; i++) {
    const struct qcow2_extent *x = &ext[i];
    uint64_t len = x->length < left ? x->length : left;
    uint32_t v = m->status (x);

    if (len == 0)
      continue;
    if (k > 0 && d[k - 1].status_flags == v)
      d[k - 1].length += len;   /* the sum stays below count */
    else {
      if (k == max)
        break;
      d[k].length = len;
      d[k].status_flags = v;
      k++;
    }
    left -= len;
  }
  for (i = 0; i < k; i++) {
    d[i].length = htobe32 (d[i].length);
    d[i].status_flags = htobe32 (d[i].status_flags);
  }
  return k;
}

int
reply_block_status (struct reply_chunks *rc, unsigned meta,
                    const struct qcow2_extent *ext, unsigned n,
                    uint64_t count, size_t max,
                    struct nbd_block_descriptor *desc)
{
  size_t nd[META_NR], i;
  unsigned nr = 0, done = 0;

  /* Work out every chunk before filling any: an error is still possible. */
  for (i = 0; i < META_NR; i++) {
    nd[i] = 0;
    if (!(meta & META_BIT (i)))
      continue;
    nd[i] = status_descriptors (&meta_contexts[i], ext, n, count, max,
                                desc + i * n);
    if (nd[i] == 0)
      return -EIO;
    nr++;
  }
  assert (nr > 0);

  for (i = 0; i < META_NR; i++) {
    bool last;

    if (nd[i] == 0)
      continue;
    last = ++done == nr;
    reply_structured_status (next_chunk (rc, last), rc->cookie, last,
                             meta_contexts[i].id, desc + i * n, nd[i]);
  }
  assert (rc->n == nr - 1);
  return 0;
}
