/* tests/test-nbd-reply.c: the chunks of a structured reply of several
 * (server/nbd-reply.c), checked on their wire bytes:
 *
 * - a sparse READ: runs of zeros of at least SPARSE_MIN_HOLE bytes are
 *   OFFSET_HOLE chunks, shorter ones are merged into the data around
 *   them, only the last chunk has NBD_REPLY_FLAG_DONE;
 * - a BLOCK_STATUS: one chunk per negotiated context, in the order of the
 *   meta_contexts table, with its id, neighbours of equal status merged,
 *   clipped to the request's length and to max descriptors, and an error
 *   when the engine's extents give a context no descriptor.
 */
#include <config.h>

#include <endian.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "internal.h"
#include "testlib.h"

/* The chunk header of r, in host order. */
static struct nbd_structured_reply
header (const struct reply *r)
{
  struct nbd_structured_reply h;

  memcpy (&h, r->iov[0].iov_base, sizeof h);
  h.magic = be32toh (h.magic);
  h.flags = be16toh (h.flags);
  h.type = be16toh (h.type);
  h.cookie = be64toh (h.cookie);
  h.length = be32toh (h.length);
  return h;
}

/* The 64-bit offset of an OFFSET_DATA or OFFSET_HOLE chunk. */
static uint64_t
chunk_offset (const struct reply *r)
{
  uint64_t be;

  memcpy (&be, (const char *) r->iov[0].iov_base
          + sizeof (struct nbd_structured_reply), 8);
  return be64toh (be);
}

static void
check_chunk (const struct reply *r, uint16_t type, bool done, uint64_t off,
             uint64_t len, const char *what)
{
  struct nbd_structured_reply h = header (r);

  CHECK (h.magic == NBD_STRUCTURED_REPLY_MAGIC && h.cookie == 42,
         "%s: header", what);
  CHECK (h.type == type, "%s: type %u, want %u", what, h.type, type);
  CHECK (!!(h.flags & NBD_REPLY_FLAG_DONE) == done, "%s: done flag", what);
  CHECK (chunk_offset (r) == off, "%s: offset %llu, want %llu", what,
         (unsigned long long) chunk_offset (r), (unsigned long long) off);
  if (type == NBD_REPLY_TYPE_OFFSET_DATA)
    CHECK (r->iov[1].iov_len == len && h.length == 8 + len,
           "%s: %zu bytes of data, want %llu", what, r->iov[1].iov_len,
           (unsigned long long) len);
}

static void
test_sparse_read (void)
{
  static char data[5 * 4096 + 512];
  const struct qcow2_extent ext[] = {
    { 4096, 0, 1 },                             /* data */
    { 512, QCOW2_EXTENT_ZERO, 1 },              /* short zeros: data */
    { 3584, 0, 1 },                             /* data */
    { 8192, QCOW2_EXTENT_ZERO | QCOW2_EXTENT_HOLE, 0 }, /* hole */
    { 4096, QCOW2_EXTENT_ZERO, 1 },             /* hole too */
    { 512, 0, 1 },                              /* data, last */
  };
  struct reply more[5], last;
  struct reply_chunks rc = { .cookie = 42, .last = &last, .more = more };

  reply_read_sparse (&rc, 1 << 20, data, ext, 6);
  CHECK (rc.n == 2, "sparse read: %zu chunks before the last, want 2", rc.n);
  check_chunk (&more[0], NBD_REPLY_TYPE_OFFSET_DATA, false, 1 << 20, 8192,
               "first data");
  CHECK (more[0].iov[1].iov_base == data, "data is pointed to, not copied");
  check_chunk (&more[1], NBD_REPLY_TYPE_OFFSET_HOLE, false,
               (1 << 20) + 8192, 0, "hole");
  check_chunk (&last, NBD_REPLY_TYPE_OFFSET_DATA, true,
               (1 << 20) + 5 * 4096, 512, "last data");
}

/* The descriptors of a BLOCK_STATUS chunk: its id, then (length, flags)
 * pairs into d (host order).  Returns how many.
 */
static size_t
status_chunk (const struct reply *r, uint32_t *id,
              struct nbd_block_descriptor *d, size_t max)
{
  struct nbd_structured_reply h = header (r);
  size_t n = r->iov[1].iov_len / sizeof *d, i;
  uint32_t be;

  CHECK (h.type == NBD_REPLY_TYPE_BLOCK_STATUS, "block status type %u",
         h.type);
  CHECK (h.length == 4 + r->iov[1].iov_len, "block status length");
  memcpy (&be, (const char *) r->iov[0].iov_base + sizeof h, 4);
  *id = be32toh (be);
  for (i = 0; i < n && i < max; i++) {
    memcpy (&d[i], (const char *) r->iov[1].iov_base + i * sizeof *d,
            sizeof *d);
    d[i].length = be32toh (d[i].length);
    d[i].status_flags = be32toh (d[i].status_flags);
  }
  return n;
}

static void
test_block_status (void)
{
  const struct qcow2_extent ext[] = {
    { 65536, 0, 1 },
    { 65536, QCOW2_EXTENT_ZERO, 1 },
    { 65536, QCOW2_EXTENT_ZERO | QCOW2_EXTENT_HOLE, 2 },
    { 65536, QCOW2_EXTENT_ZERO | QCOW2_EXTENT_HOLE, 0 },
  };
  struct nbd_block_descriptor desc[META_NR * 4], d[8];
  struct reply more[META_NR - 1], last;
  struct reply_chunks rc = { .cookie = 42, .last = &last, .more = more };
  uint32_t id;
  size_t n;

  CHECK (strcmp (meta_contexts[0].name, "base:allocation") == 0 &&
         strcmp (meta_contexts[1].name, "qemu:allocation-depth") == 0,
         "the contexts served");

  /* Both contexts, the range ending inside the last extent. */
  CHECK (reply_block_status (&rc, META_ALL, ext, 4, 3 * 65536 + 4096, 4,
                             desc) == 0, "block status of both contexts");
  CHECK (rc.n == 1, "one chunk before the last");
  CHECK (!(header (&more[0]).flags & NBD_REPLY_FLAG_DONE) &&
         (header (&last).flags & NBD_REPLY_FLAG_DONE), "done flags");
  n = status_chunk (&more[0], &id, d, 8);
  CHECK (id == meta_contexts[0].id && n == 3, "base:allocation: id %u, "
         "%zu descriptors", id, n);
  CHECK (d[0].length == 65536 && d[0].status_flags == 0 &&
         d[1].length == 65536 && d[1].status_flags == NBD_STATE_ZERO &&
         d[2].length == 65536 + 4096 &&
         d[2].status_flags == (NBD_STATE_ZERO | NBD_STATE_HOLE),
         "base:allocation merged and clipped");
  n = status_chunk (&last, &id, d, 8);
  CHECK (id == meta_contexts[1].id && n == 3, "depth: id %u, %zu "
         "descriptors", id, n);
  CHECK (d[0].length == 2 * 65536 && d[0].status_flags == 1 &&
         d[1].status_flags == 2 && d[2].length == 4096 &&
         d[2].status_flags == 0, "depth merged and clipped");

  /* One context, at most one descriptor (REQ_ONE). */
  rc.n = 0;
  CHECK (reply_block_status (&rc, META_BIT (1), ext, 4, 4 * 65536, 1,
                             desc) == 0, "block status, depth alone");
  n = status_chunk (&last, &id, d, 8);
  CHECK (rc.n == 0 && id == meta_contexts[1].id && n == 1 &&
         d[0].length == 2 * 65536, "depth alone, one descriptor");

  /* Extents of no length give no descriptor: an error, nothing to send. */
  {
    const struct qcow2_extent empty[] = { { 0, 0, 1 } };

    rc.n = 0;
    CHECK (reply_block_status (&rc, META_ALL, empty, 1, 65536, 4,
                               desc) == -EIO && rc.n == 0,
           "empty extents refused");
  }
}

int
main (void)
{
  test_sparse_read ();
  test_block_status ();
  printf ("ok - sparse read and block status chunks\n");
  return test_exit ();
}
