/* lib/qcow2-map.c: the allocation map of an open image and its chain, as
 * qemu-img map reports it (qnbd-img map).
 *
 * Synchronous and read-only: the L2 tables are read with blocking reads,
 * beside the engine's cache, so the image must be open read-only with no
 * request in flight.  Each call describes one run of guest bytes that
 * every field of the answer holds for; the caller merges runs.
 *
 * What qemu-img says is more than what the L2 entries say, and its rules
 * are followed here so that the two tools print the same map:
 *  - a range no image of the chain allocates reads as zeros at the depth
 *    of the first image that has no backing file below it, or whose
 *    backing file ends before the range;
 *  - in an image that looks preallocated (more clusters with a refcount
 *    than the file holds blocks, by qemu's margin), data clusters are
 *    looked up in the host file too: where it has a hole, or ends, the
 *    data reads as zeros;
 *  - a raw backing file is described by its holes (SEEK_DATA, SEEK_HOLE),
 *    always as present.
 */
#include <config.h>

#include <assert.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "qcow2-internal.h"

/* L2 entries read at once (a cluster of 16-byte entries at most). */
#define CHUNK_BYTES 65536u

#define ST_DATA   1u
#define ST_ZERO   2u
#define ST_OFFSET 4u

struct map_layer {
  struct qcow2 *q;
  char *data_path;              /* the external data file as opened */
  int prealloc;                 /* -1: not looked at yet, 0 or 1 */
  uint64_t chunk_table;         /* L2 table the chunk is from (0: none) */
  uint32_t chunk_first;         /* its first entry's index */
  uint32_t chunk_n;             /* entries in it */
  uint8_t *chunk;
};

struct qcow2_mapper {
  unsigned n;
  struct map_layer *l;          /* l[0] is the top image */
};

/* One layer's answer for [off, off + *pnum). */
struct status {
  unsigned st;                  /* ST_* */
  uint64_t pnum;
  uint64_t host;                /* with ST_OFFSET */
  int fd;                       /* ... in this file */
  const char *file;
};

void
qcow2_map_free (struct qcow2_mapper *m)
{
  if (!m)
    return;
  for (unsigned i = 0; i < m->n; i++) {
    free (m->l[i].data_path);
    free (m->l[i].chunk);
  }
  free (m->l);
  free (m);
}

struct qcow2_mapper *
qcow2_map_new (struct qcow2 *q, int *err)
{
  struct qcow2_mapper *m;
  unsigned n = 0;

  /* The tables are read from the file: nothing may be newer in memory. */
  if (!q->read_only || q->in_flight) {
    *err = -EINVAL;
    return NULL;
  }
  m = calloc (1, sizeof *m);
  for (struct qcow2 *b = q; b; b = b->backing)
    n++;
  if (m)
    m->l = calloc (n, sizeof *m->l);
  if (!m || !m->l) {
    free (m);
    *err = -ENOMEM;
    return NULL;
  }
  for (struct qcow2 *b = q; b; b = b->backing) {
    struct map_layer *L = &m->l[m->n++];
    L->q = b;
    L->prealloc = -1;
    if (b->data_file) {
      L->data_path = info_beside (b->path, b->data_file);
      if (!L->data_path) {
        qcow2_map_free (m);
        *err = -ENOMEM;
        return NULL;
      }
    }
  }
  return m;
}

/* Like qemu's file driver: whether host bytes [h, h + n) of fd are data
 * or a hole, and for how long.  *eof: the answer reaches the end of the
 * file; *pnum 0: h is past it.
 */
static unsigned
host_status (int fd, uint64_t h, uint64_t n, uint64_t *pnum, bool *eof)
{
  struct stat st;
  off_t d, hole;
  unsigned r;

  *eof = false;
  if (fstat (fd, &st) < 0) {
    *pnum = n;
    return ST_DATA;
  }
  if (h >= (uint64_t) st.st_size) {
    *pnum = 0;
    *eof = true;
    return 0;
  }
  if (n > (uint64_t) st.st_size - h)
    n = (uint64_t) st.st_size - h;
  d = lseek (fd, (off_t) h, SEEK_DATA);
  if (d < 0) {
    /* ENXIO: a hole to the end; anything else: no idea, say data. */
    r = errno == ENXIO ? ST_ZERO : ST_DATA;
    *pnum = n;
  }
  else if ((uint64_t) d > h) {
    r = ST_ZERO;
    *pnum = (uint64_t) d - h < n ? (uint64_t) d - h : n;
  }
  else {
    hole = lseek (fd, (off_t) h, SEEK_HOLE);
    r = ST_DATA;
    *pnum = hole > d && (uint64_t) (hole - d) < n ? (uint64_t) (hole - d) : n;
  }
  *eof = h + *pnum == (uint64_t) st.st_size;
  return r;
}

/* The refcount of cluster i, 0 where no refcount block covers it.  The
 * last block read is kept in *blk (at *blk_off).
 */
static int
refcount_of (struct qcow2 *q, uint64_t i, void **blk, uint64_t *blk_off,
             uint64_t *out)
{
  uint64_t idx = i >> q->rb_bits, rb;
  int r;

  *out = 0;
  if (idx >= q->reftable_entries)
    return 0;
  rb = be64toh (q->reftable[idx]) & REFT_OFFSET_MASK;
  if (!rb)
    return 0;
  if (rb & (q->cluster_size - 1))
    return -EIO;
  if (*blk_off != rb) {
    r = blocking_pread (q->fd, *blk, q->cluster_size, rb, true);
    if (r < 0)
      return r;
    *blk_off = rb;
  }
  *out = refblock_get (q, *blk, i & (((uint64_t) 1 << q->rb_bits) - 1));
  return 0;
}

/* qemu's test for metadata preallocation: as many clusters have a
 * refcount as the file's blocks would fill, and a margin more.  Any
 * failure says no, as in qemu.
 */
static bool
looks_preallocated (struct qcow2 *q)
{
  struct stat st;
  uint64_t real, threshold, end, count = 0, blk_off = 0, rc;
  void *blk;

  if (fstat (q->fd, &st) < 0)
    return false;
  real = (uint64_t) st.st_blocks * 512 / q->cluster_size;
  threshold = real * 10 / 9 > real + 2 ? real * 10 / 9 : real + 2;
  end = ((uint64_t) st.st_size + q->cluster_size - 1) >> q->cluster_bits;
  blk = malloc (q->cluster_size);
  if (!blk)
    return false;
  for (uint64_t i = 0; i < end && count < threshold; i++) {
    if (refcount_of (q, i, &blk, &blk_off, &rc) < 0) {
      count = 0;
      break;
    }
    count += rc != 0;
  }
  free (blk);
  return count >= threshold;
}

/* The chunk of L2 entries holding entry idx of the table at l2off. */
static int
load_chunk (struct map_layer *L, uint64_t l2off, uint32_t idx,
            uint32_t per_table, char *err, size_t errlen)
{
  struct qcow2 *q = L->q;
  uint32_t esize = q->extl2 ? 16 : 8;
  uint32_t n = CHUNK_BYTES / esize;
  int r;

  if (L->chunk_table == l2off && idx >= L->chunk_first
      && idx < L->chunk_first + L->chunk_n)
    return 0;
  if (!L->chunk && !(L->chunk = malloc (CHUNK_BYTES))) {
    snprintf (err, errlen, "out of memory");
    return -ENOMEM;
  }
  if (n > per_table - idx)
    n = per_table - idx;
  L->chunk_table = 0;
  r = blocking_pread (q->fd, L->chunk, (size_t) n * esize,
                      l2off + (uint64_t) idx * esize, true);
  if (r < 0) {
    snprintf (err, errlen, "reading the L2 table at 0x%" PRIx64 ": %s",
              l2off, strerror (-r));
    return r;
  }
  L->chunk_table = l2off;
  L->chunk_first = idx;
  L->chunk_n = n;
  return 0;
}

/* What one subcluster run of an L2 entry is, as qemu's block status says
 * it: st and, with ST_OFFSET, the host offset of in-cluster byte coff.
 */
static int
entry_to_status (struct qcow2 *q, uint64_t ent, uint64_t bmp, uint64_t coff,
                 uint64_t *run_end, unsigned *st, uint64_t *host,
                 char *err, size_t errlen)
{
  enum sc_kind kind = entry_status (q, ent, bmp, coff, run_end);
  uint64_t base = ent & L2E_OFFSET_MASK;
  bool has_host = !entry_is_hole (q, ent);

  *st = 0;
  if (kind == SC_BAD) {
    snprintf (err, errlen, "invalid subcluster bitmap 0x%016" PRIx64
              " (L2 entry 0x%016" PRIx64 ")", bmp, ent);
    return -EIO;
  }
  if (kind == SC_COMPRESSED) {
    *st = ST_DATA;
    return 0;
  }
  if (has_host && (base & (q->cluster_size - 1))) {
    snprintf (err, errlen, "cluster offset 0x%" PRIx64 " is unaligned "
              "(L2 entry 0x%016" PRIx64 ")", base, ent);
    return -EIO;
  }
  /* Without subclusters the zero flag may come with or without a host
   * cluster; with them, a hole in an allocated cluster keeps its offset.
   */
  if (kind == SC_DATA)
    *st = ST_DATA | ST_OFFSET;
  else if (kind == SC_ZERO)
    *st = ST_ZERO | (base || (q->extl2 && has_host) ? ST_OFFSET : 0);
  else if (q->extl2 && has_host)
    *st = ST_OFFSET;
  *host = base + coff;
  return 0;
}

/* The qcow2 image of L on its own: the run of [off, off + n) that has
 * one status (and contiguous host offsets).
 */
static int
qcow2_layer_status (struct map_layer *L, uint64_t off, uint64_t n,
                    struct status *s, char *err, size_t errlen)
{
  struct qcow2 *q = L->q;
  uint64_t cs = q->cluster_size;
  uint64_t l1i = off >> q->l1_shift;
  uint64_t table_end = (l1i + 1) << q->l1_shift;
  uint32_t per_table = 1u << (q->l1_shift - q->cluster_bits);
  uint32_t esize = q->extl2 ? 16 : 8;
  uint64_t l2off, pos = off, end = off + n;
  int r;

  s->st = 0;
  s->fd = q->dfd;
  s->file = q->data_file ? L->data_path : q->path;
  if (end > table_end)
    end = table_end;
  l2off = l1i < q->l1_size ? be64toh (q->l1[l1i]) & L1E_OFFSET_MASK : 0;
  if (!l2off) {
    s->pnum = end - off;
    return 0;
  }
  if (l2off & (cs - 1)) {
    snprintf (err, errlen, "L2 table offset 0x%" PRIx64 " is unaligned "
              "(L1 entry %" PRIu64 ")", l2off, l1i);
    return -EIO;
  }
  while (pos < end) {
    uint32_t idx = (uint32_t) (pos >> q->cluster_bits) & (per_table - 1);
    uint64_t cstart = pos & ~(cs - 1), run_end, host = 0, ent, bmp;
    const uint8_t *p;
    unsigned st;

    r = load_chunk (L, l2off, idx, per_table, err, errlen);
    if (r < 0)
      return r;
    p = L->chunk + (size_t) (idx - L->chunk_first) * esize;
    ent = get_be64 (p);
    bmp = q->extl2 ? get_be64 (p + 8) : 0;
    r = entry_to_status (q, ent, bmp, pos - cstart, &run_end, &st, &host,
                         err, errlen);
    if (r < 0)
      return r;
    if (pos == off) {
      s->st = st;
      s->host = host;
    }
    else if (st != s->st
             || ((st & ST_OFFSET) && host != s->host + (pos - off)))
      break;
    pos = cstart + run_end < end ? cstart + run_end : end;
  }
  s->pnum = pos - off;
  return 0;
}

/* One layer as qemu's generic block layer sees it: allocated (*present)
 * when it says data or zeros; zeros where nothing is below it; the host
 * file's holes in the data of a preallocated image.
 */
static int
layer_status (struct map_layer *L, uint64_t off, uint64_t n,
              struct status *s, bool *present, char *err, size_t errlen)
{
  struct qcow2 *q = L->q;
  uint64_t fpnum;
  unsigned fst;
  bool eof;
  int r;

  if (q->raw) {
    s->st = host_status (q->fd, off, n, &s->pnum, &eof) | ST_OFFSET;
    /* Shorter than at open: what is gone reads as zeros. */
    if (s->pnum == 0) {
      s->st = ST_ZERO;
      s->pnum = n;
    }
    s->host = off;
    s->fd = q->fd;
    s->file = q->path;
    *present = true;
    return 0;
  }
  r = qcow2_layer_status (L, off, n, s, err, errlen);
  if (r < 0)
    return r;
  *present = (s->st & (ST_DATA | ST_ZERO)) != 0;
  if (!*present && (!q->backing || off >= q->backing_size_bytes))
    s->st |= ST_ZERO;
  if ((s->st & (ST_DATA | ST_ZERO | ST_OFFSET)) != (ST_DATA | ST_OFFSET))
    return 0;
  if (L->prealloc < 0)
    L->prealloc = looks_preallocated (q);
  if (!L->prealloc)
    return 0;
  fst = host_status (s->fd, s->host, s->pnum, &fpnum, &eof);
  /* Past the end of the host file, or a hole up to it: zeros. */
  if (eof && (fpnum == 0 || (fst & ST_ZERO)))
    s->st |= ST_ZERO;
  else {
    s->pnum = fpnum;
    s->st |= fst & ST_ZERO;
  }
  return 0;
}

int
qcow2_map_next (struct qcow2_mapper *m, uint64_t offset, uint64_t len,
                struct qcow2_map_run *run, char *err, size_t errlen)
{
  struct status s;
  bool present = false;
  unsigned depth = 0;
  int r;

  if (len == 0 || offset >= m->l[0].q->size
      || len > m->l[0].q->size - offset) {
    snprintf (err, errlen, "range outside the disk");
    return -EINVAL;
  }
  for (;;) {
    struct map_layer *L = &m->l[depth];
    r = layer_status (L, offset, len, &s, &present, err, errlen);
    if (r < 0)
      return r;
    if (s.st & (ST_DATA | ST_ZERO))
      break;
    /* Not here: the backing file answers, for as far as it reaches. */
    len = s.pnum;
    if (len > L->q->backing_size_bytes - offset)
      len = L->q->backing_size_bytes - offset;
    depth++;
    /* Only an image with a backing file can leave a range unanswered. */
    assert (depth < m->n && len > 0);
  }
  run->length = s.pnum;
  run->depth = depth;
  run->present = present;
  run->zero = (s.st & ST_ZERO) != 0;
  run->data = (s.st & ST_DATA) != 0;
  run->has_offset = (s.st & ST_OFFSET) != 0;
  run->offset = run->has_offset ? s.host : 0;
  run->file = run->has_offset ? s.file : NULL;
  return 0;
}
