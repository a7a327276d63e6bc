/* server/nbd-reply.c: the replies of the transmission phase, simple and
 * structured, and the mapping of errno values to NBD error values.
 *
 * Each function fills a struct reply (its header storage and iovecs) for
 * conn_queue_reply(); payload data is pointed to, never copied.
 */
#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

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

void
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

void
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
