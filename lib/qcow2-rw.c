/* lib/qcow2-rw.c: planning and running the I/O of read and write segments.
 *
 * A read segment maps each cluster of one L2 table to zeros, a merged
 * read of host data, a compressed cluster to decompress, or (for a hole in
 * an image with a backing file) a read of the backing image.  A write
 * segment writes clusters it owns in place and gives every other cluster a
 * new host cluster, written as one vectored write of head (old data, from
 * the cluster, a compressed cluster, the backing file, or zeros), guest data
 * and tail.  The new L2 entries are linked only after the data is written.
 */
#include <config.h>

#include <assert.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <syslog.h>

#include "qcow2-internal.h"

/* A data cluster named by an L2 entry.  In an external data file the
 * mapping is one to one and nothing else lives there.
 */
static int
check_data_cluster (struct qcow2 *q, uint64_t off)
{
  if (!q->data_file)
    return corrupt_check_cluster (q, off, "data cluster");
  if (off & (q->cluster_size - 1)) {
    qlog (q, LOG_ERR, "data file offset 0x%llx is unaligned",
          (unsigned long long) off);
    return -EIO;
  }
  return 0;
}

/* Decompress io's cluster (read into io->cbuf) and deliver the part
 * wanted to io->dst.  When that is a part, the whole cluster goes to
 * io->decoded, which decompress_done gives to the decompressed-cluster
 * cache for the next reads of the cluster; a read of all of it (large
 * reads, copy-on-write) rarely has one, and is decompressed in place.
 * An AIO_CALL: runs on a worker thread, so that the loop goes on serving
 * other clients (4 readers of compressed clusters pushed another
 * client's p99 latency to 145 ms when this ran on the loop).  It touches
 * only io's buffers, which nothing else uses until the call is done, and
 * the image's geometry, which never changes; it logs nothing.  Returns 0,
 * -ENOMEM, or -EIO for data that does not decompress.
 */
static int64_t
decompress_call (struct aio_op *op)
{
  struct req_io *io = op->opaque;
  const struct qcow2 *q = io->req->q;
  const void *in = (char *) io->cbuf + io->cskip;
  char *whole;

  if (io->dst_off == 0 && io->dst_len == q->cluster_size)
    return compressed_decode (q, in, io->csize, io->dst) < 0 ? -EIO : 0;
  whole = malloc (q->cluster_size);
  if (!whole)
    return -ENOMEM;
  if (compressed_decode (q, in, io->csize, whole) < 0) {
    free (whole);
    return -EIO;
  }
  memcpy (io->dst, whole + io->dst_off, io->dst_len);
  io->decoded = whole;
  return 0;
}

static void
decompress_done (struct aio_op *op, int64_t ret)
{
  struct req_io *io = op->opaque;
  struct qcow2_req *req = io->req;

  if (ret == -EIO)
    qlog (req->q, LOG_ERR, "compressed cluster at host offset 0x%llx cannot "
          "be decompressed", (unsigned long long) (io->host + io->cskip));
  if (io->decoded) {
    dcache_fill (req->q, io->host + io->cskip, io->csize, io->dcache_gen,
                 io->decoded);
    io->decoded = NULL;
  }
  if (ret < 0 && !req->err)
    req->err = (int) ret;
  if (--req->outstanding == 0)
    waitq_wake (req);
}

/* Hand the decompression of io's cluster to the I/O backend's workers; it
 * counts in req->outstanding like an I/O.  Returns 0 or -errno.
 */
static int
start_decompress (struct qcow2_req *req, struct req_io *io)
{
  int r;

  memset (&io->op, 0, sizeof io->op);
  io->op.type = AIO_CALL;
  io->op.call = decompress_call;
  io->op.done = decompress_done;
  io->op.opaque = io;
  r = aio_submit (req->q->aio, &io->op);
  if (r < 0)
    return r;
  req->outstanding++;
  return 0;
}

/* Compress a whole-cluster write (its data in iov[0]) into io->zbuf, on a
 * worker thread: compressing on the loop held up every other client.
 * Returns the compressed size (0: it does not shrink).
 */
static int64_t
compress_call (struct aio_op *op)
{
  struct req_io *io = op->opaque;
  return (int64_t) cw_compress (io->req->q, io->iov[0].iov_base, io->zbuf);
}

static void
compress_done (struct aio_op *op, int64_t ret)
{
  struct req_io *io = op->opaque;
  struct qcow2_req *req = io->req;

  if (ret < 0 && !req->err)
    req->err = (int) ret;
  io->zlen = ret > 0 ? (size_t) ret : 0;
  if (--req->outstanding == 0)
    waitq_wake (req);
}

/* Hand the compression of io's cluster to the backend's workers; it
 * counts in req->outstanding like an I/O.  start_writes packs the result.
 */
static int
start_compress (struct qcow2_req *req, struct req_io *io, char *data)
{
  struct qcow2 *q = req->q;
  int r;

  io->zbuf = malloc (q->cluster_size);
  if (!io->zbuf)
    return -ENOMEM;
  io->cbuf_len += q->cluster_size;
  q->top->mem_held += q->cluster_size;
  io->iov[0].iov_base = data;
  io->iov[0].iov_len = io->len;
  memset (&io->op, 0, sizeof io->op);
  io->op.type = AIO_CALL;
  io->op.call = compress_call;
  io->op.done = compress_done;
  io->op.opaque = io;
  r = aio_submit (q->aio, &io->op);
  if (r < 0)
    return r;
  req->outstanding++;
  return 0;
}

/* Store a compressed whole-cluster write once its compression is done:
 * packed into the compressed-write cache, or, when it did not shrink,
 * written whole into a new cluster like any other.  Returns 0 or -errno.
 */
static int
finish_compressed (struct qcow2_req *req, struct req_io *io)
{
  int r;

  if (io->zlen) {
    r = cw_pack (req->q, io->zbuf, io->zlen, &io->cdesc);
    if (r < 0)
      return r;
    /* In the cache: nothing to write now; linked like any other. */
    io->started = true;
    return 0;
  }
  io->compressed = false;
  r = alloc_clusters (req->q, io->count, &io->host);
  if (r < 0)
    return r;
  io->op.iovcnt = 1;
  return 0;
}

/* Set io up to read the compressed cluster ent and deliver bytes
 * [dst_off, dst_off + dst_len) of it to dst.  Returns 0 or -errno.
 */
static int
plan_compressed (struct qcow2_req *req, struct req_io *io, uint64_t ent,
                 char *dst, size_t dst_off, size_t dst_len)
{
  struct qcow2 *q = req->q;
  uint64_t coff, csize, start, len;
  const char *kept;

  compressed_extent (q, ent, &coff, &csize);
  start = coff & ~(uint64_t) (SECTOR - 1);
  len = round_up (csize + (coff - start), SECTOR);
  if (coff < q->cluster_size || start + len > q->alloc_end + SECTOR) {
    qlog (q, LOG_ERR, "compressed cluster at 0x%llx lies outside the file",
          (unsigned long long) coff);
    return -EIO;
  }
  kept = dcache_lookup (q, coff, csize);
  if (kept) {
    /* Done now: no read, no decompression, nothing to start. */
    memcpy (dst, kept + dst_off, dst_len);
    io->req = req;
    io->started = true;
    return 0;
  }
  io->dcache_gen = dcache_generation (q);
  io->cbuf = buffer_alloc_zero (len);
  if (!io->cbuf)
    return -ENOMEM;
  io->cbuf_len = len;
  q->top->mem_held += len;
  io->req = req;
  io->host = start;
  io->cskip = coff - start;
  io->csize = csize;
  io->iov[0].iov_base = io->cbuf;
  io->iov[0].iov_len = len;
  io->dst = dst;
  io->dst_off = dst_off;
  io->dst_len = dst_len;
  if (cw_lookup (q, start, len, io->cbuf)) {
    /* Still in the compressed write cache: no read. */
    io->started = true;
    return start_decompress (req, io);
  }
  return 0;
}

static void
io_done (struct aio_op *op, int64_t ret)
{
  struct req_io *io = op->opaque;
  struct qcow2_req *req = io->req;

  if (ret < 0) {
    qlog (io->src ? io->src : req->q, LOG_ERR,
          "%s at host offset 0x%llx: %s",
          io->is_write ? "write" : "read", (unsigned long long) io->host,
          strerror ((int) -ret));
    if (!req->err)
      req->err = (int) ret;
  }
  else if (!io->is_write) {
    /* Past the end of the file reads as zeros. */
    size_t want = io->iov[0].iov_len;
    if ((size_t) ret < want)
      memset ((char *) io->iov[0].iov_base + ret, 0, want - ret);
    if (io->cbuf && !req->err) {
      /* The call takes over the read's place in outstanding. */
      int r = start_decompress (req, io);
      if (r < 0)
        req->err = r;
    }
  }
  if (--req->outstanding == 0)
    waitq_wake (req);
}

static void
backing_done (void *opaque, int ret)
{
  struct req_io *io = opaque;
  struct qcow2_req *req = io->req;
  if (ret < 0 && !req->err)
    req->err = ret;
  if (--req->outstanding == 0)
    waitq_wake (req);
}

/* Read [io->guest, io->guest + io->len) of the backing image as a request
 * of its own; the chain loop runs it, never this call.
 */
static void
backing_start (struct qcow2_req *req, struct req_io *io)
{
  struct qcow2 *b = io->src ? io->src : io->self ? req->q : req->q->backing;
  int err;
  struct qcow2_req *child = req_spawn (b, REQ_READ, io->guest, io->len,
                                       io->iov[0].iov_base, backing_done,
                                       io, &err);
  io->started = true;
  if (!child) {
    if (!req->err)
      req->err = err;
    return;
  }
  req->outstanding++;
}

static void
io_start (struct qcow2_req *req, struct req_io *io, int niov)
{
  struct qcow2 *q = req->q;
  /* A data read resolved down the chain reads a backing image's file. */
  struct qcow2 *f = io->src && !io->from_backing ? io->src : q;
  int r;
  if (io->from_backing) {
    backing_start (req, io);
    return;
  }
  io->op.type = io->is_write ? AIO_WRITE : AIO_READ;
  /* Compressed data always lives in the image file itself. */
  io->op.fd = io->cbuf ? q->fd : f->dfd;
  io->op.inline_mode = io->cbuf ? q->fd_inline : f->dfd_inline;
  io->op.iov = io->iov;
  io->op.iovcnt = niov;
  io->op.offset = io->alloc ? io->host + io->cov_start : io->host;
  io->op.done = io_done;
  io->op.opaque = io;
  io->started = true;
  r = aio_submit (q->aio, &io->op);
  if (r < 0) {
    if (!req->err)
      req->err = r;
    return;
  }
  req->outstanding++;
}

/* A new read op of the segment: guest bytes [pos, pos + len) into dst. */
static struct req_io *
new_read (struct qcow2_req *req, uint64_t pos, uint64_t len, char *dst)
{
  struct req_io *io = &req->ios[req->nios++];
  io->req = req;
  io->guest = pos;
  io->len = len;
  io->iov[0].iov_base = dst;
  io->iov[0].iov_len = len;
  return io;
}

/* Read guest bytes [pos, cend), a hole over the backing file, from it
 * (zeros past its end), extending last's backing read when it continues
 * there.  Returns the read a following hole may extend, or NULL.
 */
static struct req_io *
add_backing_read (struct qcow2_req *req, struct req_io *last, uint64_t pos,
                  uint64_t cend, char *dst)
{
  struct qcow2 *q = req->q;
  uint64_t bend = cend < q->backing_size_bytes
    ? cend : q->backing_size_bytes;

  if (bend < cend)
    memset (dst + (bend - pos), 0, cend - bend);
  req_map_add (req, bend - pos, false);
  req_map_add (req, cend - bend, true);
  if (last && last->from_backing && !last->src
      && last->guest + last->len == pos) {
    last->len += bend - pos;
    last->iov[0].iov_len = last->len;
  }
  else {
    last = new_read (req, pos, bend - pos, dst);
    last->from_backing = true;
  }
  return bend < cend ? NULL : last;
}

/* Read guest bytes [pos, cend) from host offset host, extending last's
 * host read when it continues there.  Returns the read.
 */
static struct req_io *
add_data_read (struct qcow2_req *req, struct req_io *last, struct qcow2 *src,
               uint64_t host, uint64_t pos, uint64_t cend, char *dst)
{
  req_map_add (req, cend - pos, false);
  if (last && !last->from_backing && last->src == src
      && last->host + last->len == host) {
    last->len += cend - pos;
    last->iov[0].iov_len = last->len;
    return last;
  }
  last = new_read (req, pos, cend - pos, dst);
  last->host = host;
  last->src = src;
  return last;
}

/* Where guest bytes from pos of a hole over q's backing file come from,
 * found by walking down the chain while each image's L2 slice is cached:
 * a backing image is read-only, so its entries, once looked at, stay true
 * without a pin.  A read of an 8-deep chain otherwise went through a child
 * request per image above the one with the data.
 */
struct chain_piece {
  enum { PIECE_ZERO, PIECE_DATA, PIECE_CHILD } kind;
  struct qcow2 *img;            /* DATA: whose file; CHILD: where it runs */
  uint64_t cluster;             /* DATA: the host cluster L2 names ... */
  uint64_t host;                /* ... and the host offset of pos */
  uint64_t end;                 /* the piece is [pos, end) */
};

/* Fill pc for guest bytes from pos (below end, inside q's backing file):
 * the longest run from pos with one source, found without waiting.
 */
static void
resolve_hole (const struct qcow2 *q, uint64_t pos, uint64_t end,
              struct chain_piece *pc)
{
  struct qcow2 *b = q->backing;
  uint64_t lim = q->backing_size_bytes;

  pc->end = end;
  for (;;) {
    uint64_t l1i, l2off, cstart, run_end, ent, bmp;
    struct cache_entry *e;
    enum sc_kind kind;

    if (pos >= lim) {
      pc->kind = PIECE_ZERO;    /* past the end of the backing file */
      return;
    }
    if (pc->end > lim)
      pc->end = lim;
    /* From here on [pos, pc->end) lies inside b. */
    assert (lim == b->size);
    pc->img = b;
    if (b->raw) {
      pc->kind = PIECE_DATA;
      pc->host = pos;
      return;
    }
    l1i = pos >> b->l1_shift;
    l2off = l1i < b->l1_size ? be64toh (b->l1[l1i]) & L1E_OFFSET_MASK : 0;
    if (l2off == 0) {
      uint64_t l1end = (pos | (((uint64_t) 1 << b->l1_shift) - 1)) + 1;
      if (pc->end > l1end)
        pc->end = l1end;
      kind = SC_HOLE;
    }
    else {
      uint64_t slice = (pos & (((uint64_t) 1 << b->l1_shift) - 1))
        >> (b->cluster_bits + b->l2_bits);
      e = cache_peek (&b->l2c, l2off + slice * b->l2_slice_bytes);
      if (!e) {
        pc->kind = PIECE_CHILD; /* its request loads the slice */
        return;
      }
      ent = l2_get (e, l2_index (b, pos));
      bmp = l2_get_bitmap (e, l2_index (b, pos));
      cstart = pos & ~((uint64_t) b->cluster_size - 1);
      kind = entry_status (b, ent, bmp, pos - cstart, &run_end);
      if (pc->end > cstart + run_end)
        pc->end = cstart + run_end;
      if (kind == SC_DATA) {
        pc->kind = PIECE_DATA;
        pc->cluster = ent & L2E_OFFSET_MASK;
        pc->host = pc->cluster + (pos - cstart);
        return;
      }
      if (kind == SC_COMPRESSED || kind == SC_BAD) {
        /* Decompressed, or refused with its message, by b's own read. */
        pc->kind = PIECE_CHILD;
        return;
      }
    }
    if (kind == SC_ZERO || !b->backing) {
      pc->kind = PIECE_ZERO;
      return;
    }
    lim = b->backing_size_bytes;
    b = b->backing;
  }
}

/* Read guest bytes [pos, cend), a hole over the backing file, from where
 * the chain has them, as data reads of the images below, zeros, and child
 * requests where a slice is not cached.  Each new op takes one of
 * req->ios[cap]; spare ones are there only when ops of the rest of the
 * segment leave some (rem: at most that many): otherwise what is left
 * is one child request on the backing image.  Returns the op a following
 * read may extend, or NULL; NULL with req->err set on failure.
 */
static struct req_io *
read_through_chain (struct qcow2_req *req, struct req_io *last, uint64_t pos,
                    uint64_t cend, size_t cap, size_t rem)
{
  struct qcow2 *q = req->q;

  while (pos < cend) {
    struct chain_piece pc;
    char *d = req->buf + (pos - req->offset);
    bool room = cap - req->nios >= rem + 2;

    resolve_hole (q, pos, cend, &pc);
    assert (pc.end > pos && pc.end <= cend);
    if (pc.kind == PIECE_ZERO) {
      memset (d, 0, pc.end - pos);
      req_map_add (req, pc.end - pos, true);
      last = NULL;
    }
    else if (!room && pc.end < cend) {
      /* Keep the last slot for the rest, as before, in one child. */
      return add_backing_read (req, last, pos, cend, d);
    }
    else if (pc.kind == PIECE_DATA) {
      int r = pc.img->raw ? 0 : check_data_cluster (pc.img, pc.cluster);
      if (r < 0) {
        req->err = r;
        return NULL;
      }
      last = add_data_read (req, last, pc.img, pc.host, pos, pc.end, d);
    }
    else if (last && last->from_backing && last->src == pc.img
             && last->guest + last->len == pos) {
      last->len += pc.end - pos;
      last->iov[0].iov_len = last->len;
      req_map_add (req, pc.end - pos, false);
    }
    else {
      last = new_read (req, pos, pc.end - pos, d);
      last->from_backing = true;
      last->src = pc.img;
      req_map_add (req, pc.end - pos, false);
    }
    pos = pc.end;
  }
  return last;
}

/* Plan a read segment: zeros for holes, merged reads for data. */
static bool
plan_read (struct qcow2_req *req)
{
  struct qcow2 *q = req->q;
  uint64_t cs = q->cluster_size;
  uint64_t pos = req->seg_off, end = req->seg_off + req->seg_len;
  /* At most one op per subcluster run (per cluster without them), and
   * over a backing file about as many spare ones for holes that the
   * images below cut finer (zeroed for every segment: no more).
   */
  size_t nruns = ((end - 1) >> q->sc_bits) - (pos >> q->sc_bits) + 1;
  size_t cap = q->backing ? 2 * nruns + 1 : nruns;
  struct req_io *last = NULL;
  int r;

  req->ios = calloc (cap, sizeof *req->ios);
  if (!req->ios) {
    req->err = -ENOMEM;
    return true;
  }
  while (pos < end) {
    uint32_t idx = l2_index (q, pos);
    uint64_t ent = req->l2 ? l2_get (req->l2, idx) : 0;
    uint64_t bmp = req->l2 ? l2_get_bitmap (req->l2, idx) : 0;
    uint64_t cstart = pos & ~(cs - 1), run_end;
    enum sc_kind kind = entry_status (q, ent, bmp, pos - cstart, &run_end);
    uint64_t cend = cstart + run_end;
    char *dst = req->buf + (pos - req->offset);

    if (cend > end)
      cend = end;
    if (kind == SC_COMPRESSED) {
      r = plan_compressed (req, &req->ios[req->nios++], ent, dst,
                           pos & (cs - 1), cend - pos);
      if (r < 0) {
        req->err = r;
        break;
      }
      req_map_add (req, cend - pos, false);
      last = NULL;
    }
    else if (kind == SC_BAD) {
      qlog (q, LOG_ERR, "L2 entry of guest offset 0x%llx has an invalid "
            "subcluster bitmap 0x%llx", (unsigned long long) cstart,
            (unsigned long long) bmp);
      req->err = -EIO;
      break;
    }
    else if (kind == SC_HOLE && q->backing && pos < q->backing_size_bytes) {
      /* A hole: what the backing chain has there shows through.  The
       * ops the rest of the segment may need (one per subcluster).
       */
      size_t rem = cend < end
        ? ((end - 1) >> q->sc_bits) - (cend >> q->sc_bits) + 1 : 0;
      last = read_through_chain (req, last, pos, cend, cap, rem);
      if (req->err)
        break;
    }
    else if (kind != SC_DATA) {
      memset (dst, 0, cend - pos);
      req_map_add (req, cend - pos, true);
      last = NULL;
    }
    else {
      r = check_data_cluster (q, ent & L2E_OFFSET_MASK);
      if (r < 0) {
        req->err = r;
        break;
      }
      last = add_data_read (req, last, NULL,
                            (ent & L2E_OFFSET_MASK) + (pos & (cs - 1)),
                            pos, cend, dst);
    }
    pos = cend;
  }
  assert (req->nios <= cap);
  if (!req->err)
    for (unsigned i = 0; i < req->nios; i++)
      if (!req->ios[i].started)
        io_start (req, &req->ios[i], 1);
  req->state = RS_IO;
  return req->outstanding == 0;
}

/* A fresh cluster buffer for io's COW source k and the read op that will
 * fill it (the caller says from where).  NULL after setting req->err.
 */
static struct req_io *
cow_read (struct qcow2_req *req, struct req_io *io, int k,
          struct req_io **next_io)
{
  struct req_io *rd;

  io->cow_buf[k] = buffer_alloc_zero (req->q->cluster_size);
  if (!io->cow_buf[k]) {
    req->err = -ENOMEM;
    return NULL;
  }
  rd = (*next_io)++;
  rd->req = req;
  rd->cow_for = io;
  return rd;
}

/* Guest offset of L2 index idx of the segment's table. */
static uint64_t
idx_guest (const struct qcow2_req *req, uint32_t idx)
{
  const struct qcow2 *q = req->q;
  unsigned table_bits = q->cluster_bits + q->l2_bits;
  return (req->seg_off >> table_bits << table_bits)
    + ((uint64_t) idx << q->cluster_bits);
}

/* Fill io->cow_buf[k] with the old contents of L2 index idx, or point at
 * zeros.  Returns the buffer to copy from, or NULL after setting req->err;
 * the read that fills it is added at *next_io.
 */
static char *
cow_source (struct qcow2_req *req, struct req_io *io, int k, uint32_t idx,
            struct req_io **next_io)
{
  struct qcow2 *q = req->q;
  uint64_t ent = l2_get (req->l2, idx);
  uint64_t guest = idx_guest (req, idx);
  struct req_io *rd;

  if (!entry_is_zero (q, ent) && entry_is_hole (q, ent) && q->backing
      && guest < q->backing_size_bytes) {
    /* Copy-on-write from the backing image. */
    if (!(rd = cow_read (req, io, k, next_io)))
      return NULL;
    rd->from_backing = true;
    rd->guest = guest;
    rd->len = q->backing_size_bytes - guest < q->cluster_size
      ? q->backing_size_bytes - guest : q->cluster_size;
    rd->iov[0].iov_base = io->cow_buf[k];
    rd->iov[0].iov_len = rd->len;
    return io->cow_buf[k];
  }
  if (entry_is_zero (q, ent) || entry_is_hole (q, ent))
    return q->zero_cluster;
  if (ent & L2E_COMPRESSED) {
    int r;
    if (!(rd = cow_read (req, io, k, next_io)))
      return NULL;
    r = plan_compressed (req, rd, ent, io->cow_buf[k], 0, q->cluster_size);
    if (r < 0) {
      req->err = r;
      return NULL;
    }
    return io->cow_buf[k];
  }
  if (check_data_cluster (q, ent & L2E_OFFSET_MASK) < 0) {
    req->err = -EIO;
    return NULL;
  }
  if (!(rd = cow_read (req, io, k, next_io)))
    return NULL;
  rd->host = ent & L2E_OFFSET_MASK;
  rd->iov[0].iov_base = io->cow_buf[k];
  rd->iov[0].iov_len = q->cluster_size;
  return io->cow_buf[k];
}

/* With extended L2: fill io->cow_buf[k] with what the guest sees at
 * in-cluster bytes [lo, hi) of L2 index idx (placed at offset lo, as in a
 * whole cluster), or point at zeros.  Old data is read through the image
 * itself, so every subcluster kind (and the backing chain) is handled by
 * the read path; a compressed cluster takes cow_source's way.
 */
static char *
cow_source_sc (struct qcow2_req *req, struct req_io *io, int k, uint32_t idx,
               uint64_t lo, uint64_t hi, struct req_io **next_io)
{
  struct qcow2 *q = req->q;
  uint64_t ent = l2_get (req->l2, idx);
  uint64_t bmp = l2_get_bitmap (req->l2, idx);
  uint64_t guest = idx_guest (req, idx);
  uint64_t bsize = q->backing ? q->backing_size_bytes : 0;
  bool all_zero = true, all_hole = true;
  uint64_t limit;
  struct req_io *rd;

  if (ent & L2E_COMPRESSED)
    return cow_source (req, io, k, idx, next_io);
  for (uint64_t pos = lo, run_end; pos < hi; pos = run_end) {
    enum sc_kind kind = entry_status (q, ent, bmp, pos, &run_end);
    if (kind != SC_HOLE)
      all_hole = false;
    if (kind != SC_ZERO && !(kind == SC_HOLE && guest + pos >= bsize))
      all_zero = false;
  }
  /* Past the end of the disk (or of the backing file it is read from)
   * the subcluster holds zeros.
   */
  limit = all_hole ? bsize : q->size;
  if (all_zero || guest + lo >= limit)
    return q->zero_cluster;
  if (!(rd = cow_read (req, io, k, next_io)))
    return NULL;
  rd->from_backing = true;
  /* Straight to the backing file when it is all unallocated here. */
  rd->self = !all_hole;
  rd->guest = guest + lo;
  rd->len = guest + hi <= limit ? hi - lo : limit - rd->guest;
  rd->iov[0].iov_base = (char *) io->cow_buf[k] + lo;
  rd->iov[0].iov_len = rd->len;
  return io->cow_buf[k];
}

/* Whether every subcluster that in-cluster bytes [lo, hi) touch is data. */
static bool
range_is_data (const struct qcow2 *q, uint64_t ent, uint64_t bmp,
               uint64_t lo, uint64_t hi)
{
  for (uint64_t pos = lo, run_end; pos < hi; pos = run_end)
    if (entry_status (q, ent, bmp, pos, &run_end) != SC_DATA)
      return false;
  return true;
}

/* How one cluster of a write segment is written (see plan_write). */
struct wclass {
  bool inplace;                 /* its data clusters: write over them */
  bool reuse;                   /* its own cluster, new subclusters in it */
  bool whole;                   /* a whole new cluster, to compress */
  uint64_t host;                /* in place: the byte; reuse: the cluster */
  uint64_t cov_start, cov_end;  /* in-cluster extent written with the COW */
};

/* Classify in-cluster bytes [ws, we) of L2 index idx: written in place,
 * in its own cluster with copy-on-write (reuse), or into a new cluster.
 * Returns 0, or -EIO when the entry names an invalid host cluster.
 */
static int
classify_cluster (struct qcow2_req *req, uint32_t idx, uint64_t ws,
                  uint64_t we, struct wclass *c)
{
  struct qcow2 *q = req->q;
  uint64_t cs = q->cluster_size, scs = q->sc_size;
  uint64_t ent = l2_get (req->l2, idx);
  uint64_t bmp = l2_get_bitmap (req->l2, idx);

  c->inplace = entry_is_inplace (q, ent);
  c->reuse = false;
  c->host = 0;
  c->cov_start = 0;
  c->cov_end = cs;
  if (c->inplace) {
    if (check_data_cluster (q, ent & L2E_OFFSET_MASK) < 0)
      return -EIO;
    c->host = (ent & L2E_OFFSET_MASK) + ws;
    if (q->extl2 && !range_is_data (q, ent, bmp, ws, we)) {
      uint64_t dummy;
      c->reuse = true;
      c->inplace = false;
      c->host = ent & L2E_OFFSET_MASK;
      c->cov_start = entry_status (q, ent, bmp, ws, &dummy) == SC_DATA
        ? ws : ws & ~(scs - 1);
      c->cov_end = entry_status (q, ent, bmp, we - 1, &dummy) == SC_DATA
        ? we : round_up (we, scs);
    }
  }
  else if (q->extl2 && entry_is_hole (q, ent)) {
    /* Nothing to copy from outside the touched subclusters. */
    c->cov_start = ws & ~(scs - 1);
    c->cov_end = round_up (we, scs);
  }
  c->whole = !c->inplace && !c->reuse && q->compress && ws == 0 && we == cs;
  return 0;
}

/* Add cluster idx, guest bytes [pos, cend) classified as c, to the write
 * runs: it extends last when it continues it the same way, else it starts
 * a new run.  Returns the run it is in.
 */
static struct req_io *
add_write_run (struct qcow2_req *req, struct req_io *last, uint32_t idx,
               uint64_t pos, uint64_t cend, const struct wclass *c)
{
  if (last && !last->alloc && c->inplace
      && last->host + last->len == c->host)
    last->len += cend - pos;
  else if (last && last->alloc && !c->inplace && !c->reuse && !last->reuse
           && !c->whole && !last->compressed
           && last->first + last->count == idx) {
    last->len += cend - pos;
    last->count++;
    last->cov_end = c->cov_end;
  }
  else {
    last = &req->ios[req->nios++];
    last->req = req;
    last->is_write = true;
    last->alloc = !c->inplace;
    last->reuse = c->reuse;
    last->host = c->host;
    last->guest = pos;
    last->len = cend - pos;
    last->first = idx;
    last->count = 1;
    last->compressed = c->whole;
    last->cov_start = c->cov_start;
    last->cov_end = c->cov_end;
  }
  return last;
}

/* Cut the segment into write runs, one req->ios entry each, in place or
 * allocating.  Returns 0 or -errno.
 */
static int
classify_write (struct qcow2_req *req)
{
  struct qcow2 *q = req->q;
  uint64_t cs = q->cluster_size;
  uint64_t pos = req->seg_off, end = req->seg_off + req->seg_len;
  struct req_io *last = NULL;

  while (pos < end) {
    uint32_t idx = l2_index (q, pos);
    uint64_t cstart = pos & ~(cs - 1);
    uint64_t cend = cstart + cs < end ? cstart + cs : end;
    struct wclass c;
    int r = classify_cluster (req, idx, pos - cstart, cend - cstart, &c);

    if (r < 0)
      return r;
    last = add_write_run (req, last, idx, pos, cend, &c);
    pos = cend;
  }
  return 0;
}

/* Give allocating run io its host clusters: its own cluster (reuse), the
 * fixed place in an external data file, or new ones from the allocator.
 * Returns 0 or -errno.
 */
static int
reserve_run (struct qcow2_req *req, struct req_io *io)
{
  struct qcow2 *q = req->q;

  if (io->reuse) {
    if (!q->data_file
        && overlap_check (q, META_DATA, io->host + io->cov_start,
                          io->cov_end - io->cov_start) < 0)
      return -EIO;
  }
  /* An external data file has a fixed mapping and no refcounts. */
  else if (q->data_file)
    io->host = io->guest & ~(q->cluster_size - 1);
  else {
    int r = alloc_clusters (q, io->count, &io->host);
    if (r < 0)
      return r;
  }
  return 0;
}

/* Pick what allocating run io copies its head (src[0]) and tail (src[1])
 * from: zeros, or a cluster buffer filled by a read added at *next_io.
 * The guest data runs from gfirst in the run's first cluster to glast in
 * its last.  Returns 0 or -errno (also in req->err).
 */
static int
pick_cow_sources (struct qcow2_req *req, struct req_io *io, uint64_t gfirst,
                  uint64_t glast, char *src[2], struct req_io **next_io)
{
  struct qcow2 *q = req->q;
  bool head = gfirst > io->cov_start, tail = io->cov_end > glast;
  uint32_t last = io->first + io->count - 1;

  src[0] = src[1] = NULL;
  if (q->extl2 && head && tail && io->count == 1) {
    /* One read serves both ends. */
    src[0] = src[1] = cow_source_sc (req, io, 0, io->first, io->cov_start,
                                     io->cov_end, next_io);
    if (!src[0])
      goto failed;
    return 0;
  }
  if (head) {
    src[0] = q->extl2
      ? cow_source_sc (req, io, 0, io->first, io->cov_start, gfirst, next_io)
      : cow_source (req, io, 0, io->first, next_io);
    if (!src[0])
      goto failed;
  }
  if (!tail)
    return 0;
  if (!q->extl2 && head && io->count == 1)
    src[1] = src[0];            /* the same whole cluster as the head's */
  else if (q->extl2)
    src[1] = cow_source_sc (req, io, 1, last, glast, io->cov_end, next_io);
  else
    src[1] = cow_source (req, io, 1, last, next_io);
  if (!src[1])
    goto failed;
  return 0;

 failed:
  assert (req->err < 0);
  return req->err;
}

/* The one vectored write of allocating run io: the head from src[0], the
 * guest data, the tail from src[1] (sources laid out as whole clusters).
 */
static void
build_write_vector (struct req_io *io, char *data, uint64_t gfirst,
                    uint64_t glast, char *const src[2])
{
  int n = 0;

  /* The COW extent always contains the guest data. */
  assert (io->cov_start <= gfirst && glast <= io->cov_end);
  if (gfirst > io->cov_start) {
    io->iov[n].iov_base = src[0] + io->cov_start;
    io->iov[n++].iov_len = gfirst - io->cov_start;
  }
  io->iov[n].iov_base = data;
  io->iov[n++].iov_len = io->len;
  if (io->cov_end > glast) {
    io->iov[n].iov_base = src[1] + glast;
    io->iov[n++].iov_len = io->cov_end - glast;
  }
  io->op.iovcnt = n;
}

/* Prepare write run io: check an in-place run, start compressing a whole
 * new cluster, or reserve an allocating run and set up its vector, with
 * the reads of its COW sources added at *next_io.  Returns 0 or -errno.
 */
static int
prepare_write_run (struct qcow2_req *req, struct req_io *io,
                   struct req_io **next_io)
{
  struct qcow2 *q = req->q;
  uint64_t cs = q->cluster_size;
  char *data = req->buf + (io->guest - req->offset);
  uint64_t gfirst = io->guest & (cs - 1);
  uint64_t glast = ((io->guest + io->len - 1) & (cs - 1)) + 1;
  char *src[2];
  int r;

  if (!io->alloc) {
    if (!q->data_file
        && overlap_check (q, META_DATA, io->host, io->len) < 0)
      return -EIO;
    io->iov[0].iov_base = data;
    io->iov[0].iov_len = io->len;
    return 0;
  }
  if (io->compressed) {
    /* Compressed on a worker while the COW reads run; start_writes
     * packs it, or writes it whole when it does not shrink.
     */
    return start_compress (req, io, data);
  }
  r = reserve_run (req, io);
  if (r < 0)
    return r;
  r = pick_cow_sources (req, io, gfirst, glast, src, next_io);
  if (r < 0)
    return r;
  build_write_vector (io, data, gfirst, glast, src);
  return 0;
}

/* Plan a write segment: in-place runs for clusters we own, allocating runs
 * (head + guest data + tail in one vectored write) for everything else.
 *
 * The head and tail (copy-on-write) cover io->cov_start..guest in the run's
 * first cluster and guest end..io->cov_end in its last.  Without extended
 * L2 that is the whole cluster.  With it, only the subclusters the write
 * touches when the old cluster had no host cluster, and in a cluster we own
 * ("reuse": written in place, then its bitmap updated) only the touched
 * subclusters that were not data yet.
 */
static bool
plan_write (struct qcow2_req *req)
{
  struct qcow2 *q = req->q;
  uint64_t pos = req->seg_off, end = req->seg_off + req->seg_len;
  size_t nclusters = ((end - 1) >> q->cluster_bits)
    - (pos >> q->cluster_bits) + 1;
  struct req_io *next_io;
  unsigned nwrites;
  int r;

  /* At most one write per cluster plus two COW reads per run. */
  req->ios = calloc (nclusters * 3, sizeof *req->ios);
  if (!req->ios) {
    req->err = -ENOMEM;
    return true;
  }
  r = classify_write (req);
  /* Each allocating run's clusters are held on the L2 table before
   * anything can fail, even when classifying did, so that seg_release
   * finds the record of every run it releases.
   */
  for (unsigned i = 0; i < req->nios; i++)
    if (req->ios[i].alloc)
      claim_add (req->l2, &req->ios[i].a, req->ios[i].first,
                 req->ios[i].count);
  if (r < 0) {
    req->err = r;
    return true;
  }
  assert (req->nios <= nclusters);

  /* Host clusters, compression and COW sources of each run. */
  nwrites = req->nios;
  next_io = &req->ios[nwrites];
  for (unsigned i = 0; i < nwrites && !req->err; i++) {
    r = prepare_write_run (req, &req->ios[i], &next_io);
    if (r < 0) {
      req->err = r;
      break;
    }
  }
  req->nios = (unsigned) (next_io - req->ios);
  assert (req->nios <= nclusters * 3);
  if (req->err)
    return true;

  /* COW reads first; the writes they feed start when all have finished. */
  for (unsigned i = nwrites; i < req->nios; i++)
    if (!req->ios[i].started)
      io_start (req, &req->ios[i], 1);
  req->state = RS_COW_READ;
  return req->outstanding == 0;
}

static void
start_writes (struct qcow2_req *req)
{
  for (unsigned i = 0; i < req->nios && !req->err; i++) {
    struct req_io *io = &req->ios[i];
    if (io->compressed && !io->started) {
      int r = finish_compressed (req, io);
      if (r < 0) {
        req->err = r;
        break;
      }
    }
    if (io->is_write && !io->started)
      io_start (req, io, io->alloc ? io->op.iovcnt : 1);
  }
}

static bool
st_link (struct qcow2_req *req)
{
  struct qcow2 *q = req->q;
  struct cache_entry *e = req->l2;
  bool linked = false;

  /* New entries are linked only after their data is written. */
  assert (req->outstanding == 0 && !req->err);
  for (unsigned i = 0; i < req->nios; i++) {
    struct req_io *io = &req->ios[i];
    if (!io->alloc)
      continue;
    assert (io->started);
    if (!linked && flush_active (q)) {
      /* The flusher is writing L2 tables: link when it is done. */
      flush_barrier_wait (q, req);
      return false;
    }
    linked = true;
    for (uint32_t k = 0; k < io->count; k++) {
      uint32_t i2 = io->first + k;
      uint64_t old = l2_get (e, i2);
      uint64_t bmp = l2_get_bitmap (e, i2);
      uint64_t lo = k == 0 ? io->cov_start : 0;
      uint64_t hi = k == io->count - 1 ? io->cov_end : q->cluster_size;
      uint64_t written = entry_sc_mask (q, lo, hi);

      /* The written subclusters become data; the others keep what they
       * were (none of them is data unless the cluster was kept).
       */
      if (old & L2E_COMPRESSED)
        bmp = 0;
      if (!io->reuse)
        bmp &= ~SC_ALLOC_ALL;
      bmp = (bmp | written) & ~(written << 32);
      if (io->reuse) {
        l2_set_bitmap (e, i2, bmp);
        continue;
      }
      if (entry_release (q, old) < 0)
        qlog (q, LOG_WARNING, "out of memory: a replaced cluster will leak");
      l2_set (e, i2, io->compressed ? io->cdesc
              : (io->host + ((uint64_t) k << q->cluster_bits)) | L2E_COPIED);
      l2_set_bitmap (e, i2, io->compressed ? 0 : bmp);
    }
  }
  if (linked)
    cache_mark_dirty (e);
  seg_release (req);
  req->state = RS_SEGMENT;
  return true;
}


const struct seg_ops rw_read_ops = { .plan = plan_read };
const struct seg_ops rw_write_ops = {
  .plan = plan_write,
  .cow_done = start_writes,
  .link = st_link,
};
