/* tests/crash-sim.c: the power-loss simulator of crash-sim.h.
 *
 * The ops the engine ran on the image are taken from the fake backend's log
 * in the order they ran (completed_seq), with the bytes of every write.  A
 * crash point k is "after the k-th op ran"; the image at k is built from
 * the base (the initial file plus everything that ran before the last
 * fdatasync before k) and a chosen subset of the ops between that
 * fdatasync and k.
 *
 * The base is kept twice, in memory (base) and in the state file (work),
 * and only ever moves forward: crash points are visited in order.  A state
 * is the state file with some ops applied on top; after judging it, the
 * bytes they covered are restored from the memory copy and the file is
 * truncated back to the base size.  Judging never changes the state file
 * itself: what must open the image read-write (the repair of lazy
 * refcounts, the "carry on after the crash" check) works on a copy.
 */
#include <config.h>

#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <syslog.h>
#include <time.h>
#include <unistd.h>

#include "aio-fake.h"
#include "crash-sim.h"
#include "qcow2.h"
#include "testlib.h"

#define SEC 512u
#define MAGIC "CRASHSIM"
#define MAX_REPORTS 5           /* detailed failure reports per cs_check */
#define NO_ACK UINT64_MAX

/* A guest request or flush. */
struct greq {
  enum cs_kind kind;
  bool flush;
  bool fua;
  bool cancelled;
  bool acked;
  int ret;
  uint64_t off, len;            /* sectors it changes (discard: the whole
                                   clusters inside the range) */
  uint64_t submit_ev, ack_ev;   /* event counter; ack_ev NO_ACK until acked */
  unsigned submit_ops, ack_ops; /* ops run at submission and at callback */
};

/* A write, punch or fdatasync of the image, in the order they ran. */
struct cs_op {
  enum aio_op_type type;
  uint64_t off, len;
  const uint8_t *data;          /* writes */
  unsigned seq;                 /* completed_seq */
  size_t log_index;
  int64_t fsize;                /* file size just after it ran, or -1 */
};

/* Part of an op applied in a state (host byte range). */
struct piece {
  const struct cs_op *op;
  uint64_t off, len;
};

struct cs {
  struct cs_config cfg;
  char *path, *work, *copy;
  struct aio *a;
  uint8_t *initial;             /* guest contents at the start */
  uint8_t *guest;               /* guest contents read from a state */
  uint8_t *guest2;
  uint8_t zero[SEC];

  uint8_t *base;                /* the base image, in memory */
  uint64_t base_size, base_cap;
  int wfd;                      /* the state file */

  struct greq *r;               /* r[0] unused: ids start at 1 */
  unsigned nr, rcap;
  uint64_t ev;

  /* For each guest sector, the ids of the requests that change it. */
  uint64_t nsec;
  uint32_t *sx_start;           /* nsec + 1 */
  unsigned *sx_ids;

  struct cs_op *ops;
  size_t nops;
  size_t applied;               /* ops[0..applied) are in the base */

  uint64_t rng;
  unsigned reports;
  int engine_errors;            /* LOG_ERR messages from the engine */
  struct cs_stats st;
};

/* ---- small helpers ---- */

static uint64_t
mix64 (uint64_t x)
{
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ull;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebull;
  x ^= x >> 31;
  return x;
}

static double
now (void)
{
  struct timespec t;
  clock_gettime (CLOCK_MONOTONIC, &t);
  return (double) t.tv_sec + (double) t.tv_nsec / 1e9;
}

static uint64_t
cs_rand (struct cs *s)
{
  s->rng = s->rng * 6364136223846793005ull + 1442695040888963407ull;
  return mix64 (s->rng);
}

static void
die (const char *what)
{
  perror (what);
  exit (1);
}

static void *
xmalloc (size_t n)
{
  void *p = malloc (n ? n : 1);
  if (!p)
    die ("malloc");
  return p;
}

static void
pwrite_full (int fd, const void *buf, size_t len, uint64_t off)
{
  while (len > 0) {
    ssize_t r = pwrite (fd, buf, len, (off_t) off);
    if (r < 0 && errno == EINTR)
      continue;
    if (r <= 0)
      die ("crash-sim: pwrite");
    buf = (const char *) buf + r;
    len -= (size_t) r;
    off += (uint64_t) r;
  }
}

static void
write_zeros (int fd, uint64_t off, uint64_t len)
{
  static const uint8_t z[65536];
  while (len > 0) {
    size_t n = len < sizeof z ? (size_t) len : sizeof z;
    pwrite_full (fd, z, n, off);
    off += n;
    len -= n;
  }
}

/* Make dst a copy of the file src, keeping its holes (the engine grows
 * images well ahead of what they hold).
 */
static void
copy_file (const char *src, const char *dst)
{
  int in = open (src, O_RDONLY | O_CLOEXEC);
  int out = open (dst, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  static char buf[1 << 16];
  off_t size, pos = 0;

  if (in < 0 || out < 0)
    die ("crash-sim: copy_file open");
  size = lseek (in, 0, SEEK_END);
  if (size < 0 || ftruncate (out, size) < 0)
    die ("crash-sim: copy_file size");
  while (pos < size) {
    off_t data = lseek (in, pos, SEEK_DATA), hole;
    if (data < 0) {
      if (errno == ENXIO)
        break;                  /* only a hole left */
      data = pos;               /* no SEEK_DATA here: copy everything */
      hole = size;
    }
    else {
      hole = lseek (in, data, SEEK_HOLE);
      if (hole < 0)
        hole = size;
    }
    for (pos = data; pos < hole;) {
      size_t want = hole - pos < (off_t) sizeof buf ? (size_t) (hole - pos)
        : sizeof buf;
      ssize_t n = pread (in, buf, want, pos);
      if (n <= 0)
        die ("crash-sim: copy_file read");
      pwrite_full (out, buf, (size_t) n, (uint64_t) pos);
      pos += n;
    }
  }
  close (in);
  if (close (out) < 0)
    die ("crash-sim: copy_file close");
}

/* ---- the guest data ---- */

static void
gen_sector (unsigned id, uint64_t sector, uint8_t *out)
{
  uint64_t h = mix64 (((uint64_t) id << 40) ^ sector ^ 0x5a5a5a5a5a5aull);

  /* A header saying whose sector this is, then a repeated word: unique
   * per (write, sector), and compressible, so that writes of whole
   * clusters can be stored compressed.  One write in four fills with
   * noise instead, so that with compression on some whole clusters do
   * not shrink and are stored as normal clusters beside the packed ones.
   */
  uint64_t le = htole64 (h);

  if (id % 4 == 3) {
    for (unsigned i = 16; i < SEC; i += 8) {
      h = mix64 (h);
      le = htole64 (h);
      memcpy (out + i, &le, 8);
    }
  }
  else
    /* Byte i of the filler is byte i % 8 of h (little-endian), written a
     * word at a time (this runs for every sector of every state).
     */
    for (unsigned i = 16; i < SEC; i += 8)
      memcpy (out + i, &le, 8);
  memcpy (out, MAGIC, 8);
  for (int i = 0; i < 4; i++)
    out[8 + i] = (uint8_t) (id >> (8 * i));
  for (int i = 0; i < 8; i++)
    out[12 + i] = (uint8_t) (sector >> (8 * i));
}

void
cs_fill (unsigned id, uint64_t off, size_t len, void *buf)
{
  for (size_t done = 0; done < len; done += SEC)
    gen_sector (id, (off + done) / SEC, (uint8_t *) buf + done);
}

/* Whose data a sector holds: the write id, or 0 when it has no header. */
static unsigned
sector_owner (const uint8_t *p, uint64_t *sector)
{
  unsigned id = 0;
  uint64_t sec = 0;

  if (memcmp (p, MAGIC, 8) != 0)
    return 0;
  for (int i = 0; i < 4; i++)
    id |= (unsigned) p[8 + i] << (8 * i);
  for (int i = 0; i < 8; i++)
    sec |= (uint64_t) p[12 + i] << (8 * i);
  *sector = sec;
  return id;
}

/* ---- tracking ---- */

struct cs *
cs_new (const struct cs_config *cfg, struct aio *a, const uint8_t *initial)
{
  struct cs *s = calloc (1, sizeof *s);
  int fd;
  off_t size;

  if (!s)
    die ("calloc");
  s->cfg = *cfg;
  s->a = a;
  s->path = strdup (cfg->path);
  if (!s->path || asprintf (&s->work, "%s.crash", cfg->path) < 0
      || asprintf (&s->copy, "%s.crash2", cfg->path) < 0)
    die ("strdup");
  s->cfg.path = s->path;
  s->cfg.name = cfg->name;
  s->wfd = -1;
  s->nsec = cfg->disk_size / SEC;
  s->initial = xmalloc (cfg->disk_size);
  s->guest = xmalloc (cfg->disk_size);
  s->guest2 = xmalloc (cfg->disk_size);
  memcpy (s->initial, initial, cfg->disk_size);
  s->r = calloc (64, sizeof *s->r);
  s->rcap = 64;
  s->nr = 1;
  if (!s->r)
    die ("calloc");

  /* The file now is the initial image. */
  fd = open (cfg->path, O_RDONLY | O_CLOEXEC);
  if (fd < 0)
    die ("crash-sim: open image");
  size = lseek (fd, 0, SEEK_END);
  if (size < 0)
    die ("crash-sim: lseek");
  s->base_size = (uint64_t) size;
  s->base_cap = s->base_size + (1 << 20);
  s->base = calloc (1, s->base_cap);
  if (!s->base)
    die ("calloc");
  for (uint64_t done = 0; done < s->base_size;) {
    ssize_t n = pread (fd, s->base + done, s->base_size - done,
                       (off_t) done);
    if (n <= 0)
      die ("crash-sim: reading the initial image");
    done += (uint64_t) n;
  }
  close (fd);
  return s;
}

void
cs_free (struct cs *s)
{
  if (!s)
    return;
  if (s->wfd >= 0)
    close (s->wfd);
  unlink (s->work);
  unlink (s->copy);
  free (s->path);
  free (s->work);
  free (s->copy);
  free (s->initial);
  free (s->guest);
  free (s->guest2);
  free (s->base);
  free (s->r);
  free (s->sx_start);
  free (s->sx_ids);
  free (s->ops);
  free (s);
}

static unsigned
new_req (struct cs *s)
{
  if (s->nr == s->rcap) {
    struct greq *r = realloc (s->r, 2 * s->rcap * sizeof *r);
    if (!r)
      die ("realloc");
    s->r = r;
    s->rcap *= 2;
  }
  memset (&s->r[s->nr], 0, sizeof s->r[s->nr]);
  s->r[s->nr].ack_ev = NO_ACK;
  s->r[s->nr].submit_ev = ++s->ev;
  s->r[s->nr].submit_ops = aio_fake_completed (s->a);
  return s->nr++;
}

unsigned
cs_submit (struct cs *s, enum cs_kind kind, uint64_t off, uint64_t len,
           bool fua)
{
  unsigned id = new_req (s);
  struct greq *g = &s->r[id];

  g->kind = kind;
  g->fua = fua;
  g->off = off;
  g->len = len;
  if (kind == CS_DISCARD) {
    /* Only whole clusters are released; partial ones are left alone. */
    uint64_t cs = s->cfg.cluster_size;
    uint64_t a = (off + cs - 1) / cs * cs, b = (off + len) / cs * cs;
    g->off = a;
    g->len = b > a ? b - a : 0;
  }
  return id;
}

unsigned
cs_submit_flush (struct cs *s)
{
  unsigned id = new_req (s);
  s->r[id].flush = true;
  return id;
}

void
cs_cancel (struct cs *s, unsigned id)
{
  s->r[id].cancelled = true;
}

void
cs_ack (struct cs *s, unsigned id, int ret)
{
  struct greq *g = &s->r[id];
  g->acked = true;
  g->ret = ret;
  g->ack_ev = ++s->ev;
  g->ack_ops = aio_fake_completed (s->a);
}

unsigned
cs_requests (const struct cs *s)
{
  return s->nr - 1;
}

void
cs_get_stats (const struct cs *s, struct cs_stats *st)
{
  *st = s->st;
}

/* ---- loading the log ---- */

static int
op_cmp (const void *a, const void *b)
{
  const struct cs_op *x = a, *y = b;
  return x->seq < y->seq ? -1 : x->seq > y->seq;
}

static void
load_ops (struct cs *s)
{
  size_t n;
  const struct aio_fake_record *log = aio_fake_log (s->a, &n);

  free (s->ops);
  s->ops = calloc (n ? n : 1, sizeof *s->ops);
  s->nops = 0;
  if (!s->ops)
    die ("calloc");
  for (size_t i = 0; i < n; i++) {
    int fd;
    const void *data = aio_fake_log_data (s->a, i, &fd);
    struct cs_op *op;

    if (fd != s->cfg.fd || log[i].completed_seq < 0 || log[i].result < 0)
      continue;
    if (log[i].type == AIO_READ)
      continue;
    if (log[i].type == AIO_WRITE && !data) {
      fprintf (stderr, "crash-sim: write %zu (0x%" PRIx64 "+%" PRIu64
               ") has no recorded data\n", i, log[i].offset, log[i].length);
      exit (1);
    }
    op = &s->ops[s->nops++];
    op->type = log[i].type;
    op->off = log[i].offset;
    op->len = log[i].length;
    op->data = data;
    op->seq = (unsigned) log[i].completed_seq;
    op->log_index = i;
    op->fsize = aio_fake_log_file_size (s->a, i);
  }
  qsort (s->ops, s->nops, sizeof *s->ops, op_cmp);
  s->st.ops = (unsigned) s->nops;
  for (size_t i = 0; i < s->nops; i++)
    if (s->ops[i].type == AIO_FSYNC)
      s->st.syncs++;
}

/* The per-sector lists of requests that change each sector. */
static void
index_sectors (struct cs *s)
{
  uint64_t total = 0;
  uint32_t *fill;

  free (s->sx_start);
  free (s->sx_ids);
  s->sx_start = calloc (s->nsec + 1, sizeof *s->sx_start);
  if (!s->sx_start)
    die ("calloc");
  for (unsigned id = 1; id < s->nr; id++) {
    struct greq *g = &s->r[id];
    if (g->flush || g->cancelled)
      continue;
    for (uint64_t sc = g->off / SEC; sc < (g->off + g->len) / SEC; sc++)
      s->sx_start[sc + 1]++;
    total += g->len / SEC;
  }
  if (total > UINT32_MAX)
    die ("too many sectors written");
  for (uint64_t sc = 0; sc < s->nsec; sc++)
    s->sx_start[sc + 1] += s->sx_start[sc];
  s->sx_ids = xmalloc ((size_t) total * sizeof *s->sx_ids);
  fill = calloc (s->nsec, sizeof *fill);
  if (!fill)
    die ("calloc");
  for (unsigned id = 1; id < s->nr; id++) {
    struct greq *g = &s->r[id];
    if (g->flush || g->cancelled)
      continue;
    for (uint64_t sc = g->off / SEC; sc < (g->off + g->len) / SEC; sc++)
      s->sx_ids[s->sx_start[sc] + fill[sc]++] = id;
  }
  free (fill);
}

/* ---- the base and the state file ---- */

static void
base_reserve (struct cs *s, uint64_t size)
{
  if (size <= s->base_cap)
    return;
  uint64_t cap = s->base_cap * 2 > size ? s->base_cap * 2 : size;
  uint8_t *p = realloc (s->base, cap);
  if (!p)
    die ("realloc");
  memset (p + s->base_cap, 0, cap - s->base_cap);
  s->base = p;
  s->base_cap = cap;
}

/* Give the base a new size (memory past base_size is always zeros). */
static void
base_set_size (struct cs *s, uint64_t size)
{
  if (size > s->base_size)
    base_reserve (s, size);
  else
    memset (s->base + size, 0, s->base_size - size);
  if (ftruncate (s->wfd, (off_t) size) < 0)
    die ("crash-sim: ftruncate");
  s->base_size = size;
}

/* Apply an op to the base: memory and state file.  An fdatasync makes the
 * file size it found durable (the engine also changes it with ftruncate,
 * which the backend does not see).
 */
static void
base_apply (struct cs *s, const struct cs_op *op)
{
  if (op->type == AIO_FSYNC) {
    if (op->fsize >= 0 && (uint64_t) op->fsize != s->base_size)
      base_set_size (s, (uint64_t) op->fsize);
  }
  else if (op->type == AIO_WRITE) {
    base_reserve (s, op->off + op->len);
    memcpy (s->base + op->off, op->data, op->len);
    if (op->off + op->len > s->base_size)
      s->base_size = op->off + op->len;
    pwrite_full (s->wfd, op->data, op->len, op->off);
  }
  else if (op->type == AIO_PUNCH && op->off < s->base_size) {
    uint64_t len = op->len;
    if (op->off + len > s->base_size)
      len = s->base_size - op->off;
    memset (s->base + op->off, 0, len);
    write_zeros (s->wfd, op->off, len);
  }
}

/* Put pieces on top of the base in the state file, which first gets size
 * (not smaller than the base); returns the file size.
 */
static uint64_t
state_apply (struct cs *s, uint64_t size, const struct piece *p, size_t n)
{
  if (size > s->base_size && ftruncate (s->wfd, (off_t) size) < 0)
    die ("crash-sim: ftruncate");
  if (size < s->base_size)
    size = s->base_size;

  for (size_t i = 0; i < n; i++) {
    if (p[i].op->type == AIO_WRITE) {
      pwrite_full (s->wfd, p[i].op->data + (p[i].off - p[i].op->off),
                   p[i].len, p[i].off);
      if (p[i].off + p[i].len > size)
        size = p[i].off + p[i].len;
    }
    else if (p[i].op->type == AIO_PUNCH && p[i].off < size) {
      /* A punch keeps the file size. */
      uint64_t len = p[i].len;
      if (p[i].off + len > size)
        len = size - p[i].off;
      write_zeros (s->wfd, p[i].off, len);
    }
  }
  return size;
}

/* Give the state file back its base contents. */
static void
state_undo (struct cs *s, const struct piece *p, size_t n, uint64_t size)
{
  for (size_t i = 0; i < n; i++) {
    uint64_t off = p[i].off, len = p[i].len;
    if (off >= s->base_size)
      continue;
    if (off + len > s->base_size)
      len = s->base_size - off;
    pwrite_full (s->wfd, s->base + off, len, off);
  }
  if (size != s->base_size && ftruncate (s->wfd, (off_t) s->base_size) < 0)
    die ("crash-sim: ftruncate");
}

/* ---- judging one state ---- */

static void
log_hook (void *opaque, int level, const char *msg)
{
  struct cs *s = opaque;
  if (level <= LOG_ERR) {
    s->engine_errors++;
    fprintf (stderr, "engine: %s\n", msg);
  }
  else if (getenv ("TEST_VERBOSE"))
    fprintf (stderr, "engine: %s\n", msg);
}

static struct qcow2 *
open_state (struct cs *s, const char *path, bool ro, struct aio **a,
            char *err, size_t errlen)
{
  struct qcow2_opts o = { 0 };
  struct qcow2 *q = NULL;
  int r;

  if (aio_fake_create (a) < 0)
    die ("aio_fake_create");
  o.read_only = ro;
  o.aio = *a;
  o.log = log_hook;
  o.log_opaque = s;
  r = qcow2_open (path, &o, &q, err, errlen);
  if (r < 0) {
    aio_destroy (*a);
    *a = NULL;
    return NULL;
  }
  return q;
}

static void
close_state (struct qcow2 *q, struct aio *a, int *ret)
{
  int r = qcow2_close (q);
  if (ret)
    *ret = r;
  aio_destroy (a);
}

/* Read the whole disk into buf.  Returns 0 or -errno. */
static int
read_disk (struct cs *s, struct qcow2 *q, uint8_t *buf)
{
  const uint64_t chunk = 1 << 20;
  for (uint64_t off = 0; off < s->cfg.disk_size; off += chunk) {
    uint64_t n = s->cfg.disk_size - off < chunk ? s->cfg.disk_size - off
      : chunk;
    int r = sync_read (q, off, buf + off, n);
    if (r < 0)
      return r;
  }
  return 0;
}

/* Describe request id for a report. */
static void
describe (const struct cs *s, unsigned id, char *out, size_t len)
{
  const struct greq *g = &s->r[id];
  static const char *kinds[] = { "write", "write-zeroes", "discard" };
  char ack[64];

  if (g->acked)
    snprintf (ack, sizeof ack, "acked at ev %" PRIu64 " after %u ops, ret %d",
              g->ack_ev, g->ack_ops, g->ret);
  else
    snprintf (ack, sizeof ack, "never acked");
  snprintf (out, len, "#%u %s%s 0x%" PRIx64 "+%" PRIu64 " (submitted at ev %"
            PRIu64 " after %u ops, %s)", id,
            g->flush ? "flush" : kinds[g->kind], g->fua ? "+FUA" : "",
            g->off, g->len, g->submit_ev, g->submit_ops, ack);
}

/* The latest flush submission that a completed flush covers at k. */
static uint64_t
flush_line (const struct cs *s, unsigned k)
{
  uint64_t l = 0;
  for (unsigned id = 1; id < s->nr; id++) {
    const struct greq *g = &s->r[id];
    if (g->flush && g->acked && g->ret == 0 && g->ack_ops <= k
        && g->submit_ev > l)
      l = g->submit_ev;
  }
  return l;
}

static bool
guaranteed (const struct greq *g, uint64_t line, unsigned k)
{
  if (g->flush || g->cancelled || !g->acked || g->ret != 0)
    return false;
  return g->ack_ev < line || (g->fua && g->ack_ops <= k);
}

/* Check the guest contents in buf against what the model allows at k.
 * Returns the number of bad sectors (reports the first few).
 */
static unsigned
verify_guest (struct cs *s, const uint8_t *buf, unsigned k, const char *desc)
{
  uint64_t line = flush_line (s, k);
  unsigned bad = 0;
  uint8_t want[SEC];

  for (uint64_t sc = 0; sc < s->nsec; sc++) {
    const uint8_t *x = buf + sc * SEC;
    const uint8_t *init = s->initial + sc * SEC;
    uint32_t lo = s->sx_start[sc], hi = s->sx_start[sc + 1];
    uint64_t t = 0, owner_sec = 0;
    unsigned tid = 0, owner = 0;
    bool ok = false;
    const char *why = "matches none of the writes allowed";

    if (lo == hi) {
      /* Never written by the guest: the initial contents. */
      if (memcmp (x, init, SEC) == 0)
        continue;
      why = "changed although no guest write reached it";
      goto report;
    }
    for (uint32_t i = lo; i < hi; i++) {
      const struct greq *g = &s->r[s->sx_ids[i]];
      if (guaranteed (g, line, k) && g->submit_ev > t) {
        t = g->submit_ev;
        tid = s->sx_ids[i];
      }
    }

    owner = sector_owner (x, &owner_sec);
    if (owner) {
      const struct greq *g = NULL;
      for (uint32_t i = lo; i < hi; i++)
        if (s->sx_ids[i] == owner)
          g = &s->r[owner];
      if (!g || owner_sec != sc || g->kind != CS_WRITE)
        why = "holds data the guest never wrote there";
      else if (g->submit_ops >= k)
        why = "holds a write submitted after the crash point";
      else if (g->ack_ev < t)
        why = "holds a write that a guaranteed write replaced (stale)";
      else {
        gen_sector (owner, sc, want);
        ok = memcmp (x, want, SEC) == 0;
        if (!ok)
          why = "holds a damaged copy of a write";
      }
    }
    else {
      bool zero = memcmp (x, s->zero, SEC) == 0;
      bool is_init = memcmp (x, init, SEC) == 0;
      if (tid == 0 && is_init)
        ok = true;
      for (uint32_t i = lo; i < hi && !ok; i++) {
        const struct greq *g = &s->r[s->sx_ids[i]];
        if (g->kind == CS_WRITE || g->submit_ops >= k || g->ack_ev < t)
          continue;
        if (g->kind == CS_DISCARD && s->cfg.discard_shows_initial)
          ok = is_init;
        else
          ok = zero;
      }
      if (!ok && is_init)
        why = "holds the initial contents, but a guaranteed write replaced "
          "them";
      else if (!ok && zero)
        why = "reads as zeros, but no write allowed there makes zeros";
    }
    if (ok)
      continue;

  report:
    bad++;
    if (s->reports < MAX_REPORTS) {
      char d[256];
      fprintf (stderr, "FAIL %s: %s: guest sector %" PRIu64 " (0x%" PRIx64
               ") %s", s->cfg.name, desc, sc, sc * SEC, why);
      if (owner)
        fprintf (stderr, " [it holds write #%u's data for sector %" PRIu64
                 "]", owner, owner_sec);
      fprintf (stderr, "\n");
      if (tid) {
        describe (s, tid, d, sizeof d);
        fprintf (stderr, "  latest guaranteed write there: %s\n", d);
      }
      for (uint32_t i = lo; i < hi; i++) {
        describe (s, s->sx_ids[i], d, sizeof d);
        fprintf (stderr, "  writes there: %s\n", d);
      }
    }
  }
  return bad;
}

/* qemu-img check: 0 clean, 3 leaks only; anything else fails.  Returns the
 * exit status.
 */
static int
qemu_check (struct cs *s, const char *path, const char *desc)
{
  double t0 = now ();
  int st = shell ("qemu-img check -q '%s' >/dev/null 2>&1", path);

  s->st.qemu_secs += now () - t0;
  if (st != 0 && st != 3 && s->reports < MAX_REPORTS) {
    fprintf (stderr, "FAIL %s: %s: qemu-img check exited %d:\n",
             s->cfg.name, desc, st);
    /* The errors, not the (often many) leaked clusters. */
    shell ("qemu-img check '%s' 2>&1 | grep -v '^Leaked cluster' | head -30 "
           ">&2", path);
  }
  return st;
}

/* Keep a failing image for a closer look when CRASH_KEEP_DIR is set. */
static void
keep_image (struct cs *s, const char *path)
{
  const char *dir = getenv ("CRASH_KEEP_DIR");
  char dst[1024];
  if (!dir)
    return;
  snprintf (dst, sizeof dst, "%s/%s-state%u.qcow2", dir, s->cfg.name,
            s->st.states);
  copy_file (path, dst);
  fprintf (stderr, "crash-sim: kept %s\n", dst);
}

static void
done_int (void *opaque, int ret)
{
  *(int *) opaque = ret;
}

/* The "carry on" check: open the crash image read-write, write new data
 * over it, flush, close; the image must stay consistent and read back
 * what was there plus what was written.
 */
static bool
carry_on (struct cs *s, const char *desc)
{
  char err[256];
  struct aio *a;
  struct qcow2 *q;
  uint64_t cs = s->cfg.cluster_size, size = s->cfg.disk_size;
  uint8_t *buf = xmalloc (4 * cs);
  bool ok = true;
  int r, st;

  copy_file (s->work, s->copy);
  q = open_state (s, s->copy, false, &a, err, sizeof err);
  if (!q) {
    fprintf (stderr, "FAIL %s: %s: reopening read-write: %s\n", s->cfg.name,
             desc, err);
    free (buf);
    return false;
  }
  if (read_disk (s, q, s->guest2) < 0)
    ok = false;
  for (unsigned i = 0; i < 6 && ok; i++) {
    uint64_t len = (1 + cs_rand (s) % (4 * cs / SEC)) * SEC;
    uint64_t off = cs_rand (s) % ((size - len) / SEC + 1) * SEC;
    unsigned id = 0xf0000000u + i;
    cs_fill (id, off, len, buf);
    if (i == 5) {
      /* And one discard, which frees clusters the crash may have left
       * with odd refcounts.
       */
      int res = 1;
      r = qcow2_discard (q, off, len, done_int, &res);
      if (r == 0) {
        run_until (q, &res);
        r = res;
      }
      if (r < 0)
        ok = false;
      else {
        uint64_t a0 = (off + cs - 1) / cs * cs, b0 = (off + len) / cs * cs;
        for (uint64_t o = a0; o < b0; o += SEC)
          memcpy (s->guest2 + o, s->cfg.discard_shows_initial
                  ? s->initial + o : s->zero, SEC);
      }
      continue;
    }
    if (sync_write (q, off, buf, len, 0) < 0)
      ok = false;
    memcpy (s->guest2 + off, buf, len);
  }
  if (ok && sync_flush (q) < 0)
    ok = false;
  close_state (q, a, &r);
  if (!ok || r < 0) {
    fprintf (stderr, "FAIL %s: %s: writing after the crash failed (close "
             "%d)\n", s->cfg.name, desc, r);
    free (buf);
    return false;
  }
  st = qemu_check (s, s->copy, desc);
  if (st != 0 && st != 3) {
    fprintf (stderr, "FAIL %s: %s: after writing on the crashed image\n",
             s->cfg.name, desc);
    ok = false;
  }
  q = open_state (s, s->copy, true, &a, err, sizeof err);
  if (!q) {
    fprintf (stderr, "FAIL %s: %s: reopening after writing: %s\n",
             s->cfg.name, desc, err);
    free (buf);
    return false;
  }
  if (read_disk (s, q, s->guest) < 0
      || memcmp (s->guest, s->guest2, size) != 0) {
    fprintf (stderr, "FAIL %s: %s: contents after writing on the crashed "
             "image are not what was written\n", s->cfg.name, desc);
    ok = false;
  }
  close_state (q, a, NULL);
  free (buf);
  return ok;
}

/* Judge the state now in the state file.  Returns true when it passes. */
static bool
judge (struct cs *s, unsigned k, const char *desc)
{
  char err[256];
  struct aio *a;
  struct qcow2 *q;
  const char *img = s->work;
  bool ok = true;
  int st, r;
  double t0;

  s->st.states++;
  if (!s->cfg.lazy) {
    st = qemu_check (s, s->work, desc);
    if (st == 3)
      s->st.leaky++;
    else if (st != 0)
      ok = false;
  }
  else {
    /* Dirty: only the engine's repair makes the refcounts right. */
    copy_file (s->work, s->copy);
    img = s->copy;
  }

  s->engine_errors = 0;
  t0 = now ();
  q = open_state (s, img, !s->cfg.lazy, &a, err, sizeof err);
  if (!q) {
    fprintf (stderr, "FAIL %s: %s: the engine cannot open it: %s\n",
             s->cfg.name, desc, err);
    ok = false;
  }
  else {
    if (s->cfg.lazy)
      s->st.repaired++;
    r = read_disk (s, q, s->guest);
    if (r < 0) {
      fprintf (stderr, "FAIL %s: %s: reading it: %s\n", s->cfg.name, desc,
               strerror (-r));
      ok = false;
    }
    else if (verify_guest (s, s->guest, k, desc) > 0)
      ok = false;
    close_state (q, a, &r);
    if (r < 0) {
      fprintf (stderr, "FAIL %s: %s: closing it: %s\n", s->cfg.name, desc,
               strerror (-r));
      ok = false;
    }
    s->st.engine_secs += now () - t0;
    if (s->engine_errors) {
      fprintf (stderr, "FAIL %s: %s: the engine logged errors\n",
               s->cfg.name, desc);
      ok = false;
    }
    if (s->cfg.lazy) {
      st = qemu_check (s, s->copy, desc);
      if (st == 3)
        s->st.leaky++;
      else if (st != 0) {
        fprintf (stderr, "FAIL %s: %s: after the engine's repair\n",
                 s->cfg.name, desc);
        ok = false;
      }
    }
  }

  if (ok && s->cfg.continue_every
      && s->st.states % s->cfg.continue_every == 0) {
    s->st.continued++;
    if (!carry_on (s, desc))
      ok = false;
  }

  if (!ok) {
    s->st.failures++;
    test_failures++;
    keep_image (s, s->work);
    s->reports++;
  }
  return ok;
}

/* ---- choosing states ---- */

/* Pieces for the ops ops[first..last] chosen by mode: 0 none, 1 all, 2 a
 * random subset, 3 a random subset torn at 512-byte sectors.
 */
static size_t
choose (struct cs *s, size_t first, size_t last, int mode, struct piece *p,
        size_t cap, char *desc, size_t dlen)
{
  unsigned pct = 25 + (unsigned) (cs_rand (s) % 3) * 25;
  size_t n = 0, taken = 0, total = 0;

  for (size_t i = first; i <= last && mode != 0; i++) {
    const struct cs_op *op = &s->ops[i];
    if (op->type == AIO_FSYNC)
      continue;
    total++;
    if (mode >= 2 && cs_rand (s) % 100 >= pct)
      continue;
    taken++;
    if (mode == 3 && op->len > SEC) {
      /* Torn: each sector of the write on its own. */
      uint64_t pos = op->off, end = op->off + op->len;
      while (pos < end) {
        uint64_t next = (pos / SEC + 1) * SEC;
        if (next > end)
          next = end;
        if (cs_rand (s) % 2 && n < cap) {
          p[n].op = op;
          p[n].off = pos;
          p[n].len = next - pos;
          n++;
        }
        pos = next;
      }
      continue;
    }
    if (n < cap) {
      p[n].op = op;
      p[n].off = op->off;
      p[n].len = op->len;
      n++;
    }
  }
  if (mode == 0)
    for (size_t i = first; i <= last; i++)
      total += s->ops[i].type != AIO_FSYNC;
  snprintf (desc, dlen, "%s of %zu op(s) since the last sync",
            mode == 0 ? "none" : mode == 1 ? "all"
            : mode == 2 ? "a random subset" : "a torn random subset",
            total);
  if (mode >= 2) {
    size_t l = strlen (desc);
    snprintf (desc + l, dlen - l, " (%zu kept)", taken);
  }
  return n;
}

static int
size_cmp (const void *a, const void *b)
{
  size_t x = *(const size_t *) a, y = *(const size_t *) b;
  return x < y ? -1 : x > y;
}

unsigned
cs_check (struct cs *s, unsigned max_states, uint64_t seed)
{
  size_t *points, npoints, ncand = 0;
  struct piece *p;
  size_t pcap;
  unsigned budget = max_states;
  const char *only = getenv ("CRASH_POINT");

  memset (&s->st, 0, sizeof s->st);
  s->reports = 0;
  if (getenv ("CRASH_DUMP"))
    for (unsigned id = 1; id < s->nr; id++) {
      char d[256];
      describe (s, id, d, sizeof d);
      fprintf (stderr, "request %s\n", d);
    }
  s->rng = seed ^ 0x2545f4914f6cdd1dull;
  load_ops (s);
  index_sectors (s);
  s->applied = 0;

  /* The state file starts as the initial image. */
  s->wfd = open (s->work, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (s->wfd < 0)
    die ("crash-sim: creating the state file");
  pwrite_full (s->wfd, s->base, s->base_size, 0);

  /* Candidate crash points: just after each op (index into ops), and
   * before any (-1, kept as index 0 with "nothing").
   */
  points = xmalloc ((s->nops + 1) * sizeof *points);
  pcap = 0;
  for (size_t i = 0; i < s->nops; i++)
    if (s->ops[i].type != AIO_FSYNC || i + 1 == s->nops
        || s->ops[i + 1].type != AIO_FSYNC)
      points[ncand++] = i;
  npoints = ncand;
  if (npoints > budget / 3 + 1 && !only) {
    /* Spread the points over the run, each somewhere in its stretch. */
    size_t want = budget / 3 + 1;
    for (size_t j = 0; j < want; j++) {
      size_t lo = j * ncand / want, hi = (j + 1) * ncand / want;
      size_t pick = points[lo + (hi > lo ? cs_rand (s) % (hi - lo) : 0)];
      /* Half the time, the last op before the next sync instead: the
       * most ops are pending there, and a flush's last writes (L1, the
       * header) are exposed only there.
       */
      if (cs_rand (s) % 2)
        for (size_t x = pick; x + 1 < s->nops; x++)
          if (s->ops[x + 1].type == AIO_FSYNC) {
            if (s->ops[x].type != AIO_FSYNC)
              pick = x;
            break;
          }
      points[j] = pick;
    }
    /* Stretches overlap after the move: keep the points in order. */
    qsort (points, want, sizeof *points, size_cmp);
    npoints = want;
    points[npoints - 1] = ncand ? s->nops - 1 : 0;
  }
  /* Room for every op torn into sectors: a state never needs more. */
  for (size_t i = 0; i < s->nops; i++)
    pcap += s->ops[i].len / SEC + 2;
  p = xmalloc (pcap * sizeof *p);

  /* Crash point "before anything ran": the initial image. */
  if (budget > 0 && !only) {
    judge (s, 0, "crash before any write");
    budget--;
  }
  s->st.crash_points = 1;

  for (size_t j = 0; j < npoints && budget > 0 && s->nops > 0; j++) {
    size_t i = points[j], f = SIZE_MAX;
    unsigned k = s->ops[i].seq + 1;
    unsigned per;
    int modes[8], nm = 0;

    if (only && (unsigned) atoi (only) != k)
      continue;
    /* The last sync at or before op i. */
    for (size_t x = i + 1; x-- > 0;)
      if (s->ops[x].type == AIO_FSYNC) {
        f = x;
        break;
      }
    /* Everything before that sync is durable, and so is the file size
     * it found.
     */
    if (f != SIZE_MAX)
      for (; s->applied <= f; s->applied++)
        base_apply (s, &s->ops[s->applied]);

    per = budget / (unsigned) (npoints - j);
    if (per < 1)
      per = 1;
    if (f == i) {
      modes[nm++] = 1;          /* nothing pending */
    }
    else {
      modes[nm++] = 1;
      if (per >= 2)
        modes[nm++] = 0;
      for (unsigned m = 2; m < per && nm < 8; m++)
        modes[nm++] = m % 2 ? 3 : 2;
    }
    s->st.crash_points++;
    for (int m = 0; m < nm && budget > 0; m++) {
      char d1[160], desc[400];
      size_t first = f == SIZE_MAX ? 0 : f + 1;
      size_t n = first <= i ? choose (s, first, i, modes[m], p, pcap, d1,
                                      sizeof d1) : 0;
      uint64_t size = s->base_size;

      /* A file size changed since the sync may or may not be durable. */
      if (s->ops[i].fsize > 0 && cs_rand (s) % 2)
        size = (uint64_t) s->ops[i].fsize;
      if (first > i)
        snprintf (d1, sizeof d1, "nothing since the last sync");
      snprintf (desc, sizeof desc, "crash point k=%u (after op %zu of %zu, "
                "%s sync before it), %s", k, i, s->nops,
                f == SIZE_MAX ? "no" : "a", d1);
      size = state_apply (s, size, p, n);
      if (!judge (s, k, desc) && s->reports <= MAX_REPORTS) {
        fprintf (stderr, "  state: %s\n  pending ops:", desc);
        for (size_t x = first; x <= i; x++) {
          bool in = false;
          for (size_t y = 0; y < n; y++)
            in |= p[y].op == &s->ops[x];
          fprintf (stderr, " [%s 0x%" PRIx64 "+%" PRIu64 " seq %u%s]",
                   s->ops[x].type == AIO_WRITE ? "write"
                   : s->ops[x].type == AIO_PUNCH ? "punch" : "sync",
                   s->ops[x].off, s->ops[x].len, s->ops[x].seq,
                   in ? " kept" : "");
        }
        fprintf (stderr, "\n");
      }
      state_undo (s, p, n, size);
      budget--;
    }
  }
  free (points);
  free (p);
  close (s->wfd);
  s->wfd = -1;
  return s->st.states;
}
