/* tests/test-nbd-errno.c: the errno values the daemon sends, by command
 * and flags (server/nbd-reply.c).  The protocol allows NBD_ENOTSUP only in
 * answer to a WRITE_ZEROES with FAST_ZERO, and NBD_EOVERFLOW only to a
 * READ with DF or a command without payload; a client that did not ask
 * for them gets NBD_EINVAL.  EDQUOT and EFBIG become NBD_ENOSPC.  Checked
 * on the wire bytes of simple and structured error replies.
 */
#include <config.h>

#include <endian.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "internal.h"
#include "testlib.h"

static uint32_t
simple_error (uint16_t cmd, uint16_t flags, int err)
{
  struct reply r;
  struct nbd_simple_reply h;

  memset (&r, 0, sizeof r);
  reply_simple (&r, 7, cmd, flags, err, NULL, 0);
  memcpy (&h, r.iov[0].iov_base, sizeof h);
  return be32toh (h.error);
}

static uint32_t
structured_error (uint16_t cmd, uint16_t flags, int err)
{
  struct reply r;
  struct nbd_structured_reply_error e;

  memset (&r, 0, sizeof r);
  reply_structured_error (&r, 7, cmd, flags, err, NULL);
  memcpy (&e, (char *) r.iov[0].iov_base
          + sizeof (struct nbd_structured_reply), sizeof e);
  return be32toh (e.error);
}

static void
expect (uint16_t cmd, uint16_t flags, int err, uint32_t want,
        const char *what)
{
  CHECK (simple_error (cmd, flags, err) == want,
         "simple reply, %s: %u, want %u", what,
         simple_error (cmd, flags, err), want);
  CHECK (structured_error (cmd, flags, err) == want,
         "structured reply, %s: %u, want %u", what,
         structured_error (cmd, flags, err), want);
}

int
main (void)
{
  expect (NBD_CMD_WRITE_ZEROES, NBD_CMD_FLAG_FAST_ZERO, ENOTSUP, NBD_ENOTSUP,
          "fast zero that would be slow");
  expect (NBD_CMD_WRITE_ZEROES, NBD_CMD_FLAG_FAST_ZERO, EOPNOTSUPP,
          NBD_ENOTSUP, "fast zero, EOPNOTSUPP");
  expect (NBD_CMD_WRITE_ZEROES, 0, ENOTSUP, NBD_EINVAL,
          "write-zeroes without FAST_ZERO");
  expect (NBD_CMD_TRIM, 0, EOPNOTSUPP, NBD_EINVAL, "trim not supported");
  expect (NBD_CMD_READ, 0, ENOTSUP, NBD_EINVAL, "read, ENOTSUP");
  expect (NBD_CMD_READ, NBD_CMD_FLAG_DF, EOVERFLOW, NBD_EOVERFLOW,
          "read with DF too large");
  expect (NBD_CMD_READ, 0, EOVERFLOW, NBD_EINVAL, "read without DF");
  expect (NBD_CMD_WRITE, 0, EOVERFLOW, NBD_EINVAL, "write (has payload)");
  expect (NBD_CMD_BLOCK_STATUS, 0, EOVERFLOW, NBD_EOVERFLOW,
          "block status (no payload)");
  expect (NBD_CMD_WRITE, 0, EFBIG, NBD_ENOSPC, "EFBIG");
  expect (NBD_CMD_WRITE, 0, EDQUOT, NBD_ENOSPC, "EDQUOT");
  expect (NBD_CMD_WRITE, 0, ENOSPC, NBD_ENOSPC, "ENOSPC");
  expect (NBD_CMD_WRITE, 0, EROFS, NBD_EPERM, "EROFS");
  expect (NBD_CMD_READ, 0, EBADF, NBD_EIO, "anything else");
  printf ("ok - errno values by command and flags\n");
  return test_exit ();
}
