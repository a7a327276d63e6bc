/* lib/qcow2-header.c: parse and validate the qcow2 header and its
 * extensions.
 *
 * The image is untrusted input: every field is checked before anything uses
 * it, and what the engine cannot honour is refused with a message naming
 * the problem (the caller adds the path).
 */
#include <config.h>

#include <errno.h>
#include <unistd.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2-internal.h"

#define EXT_END            0x00000000u
#define EXT_BACKING_FORMAT 0xe2792acau
#define EXT_FEATURE_TABLE  0x6803f857u
#define EXT_DATA_FILE      0x44415441u

#define KNOWN_INCOMPAT (INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE \
                        | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2)

static int
fail (char *err, size_t errlen, int ret, const char *fmt, ...)
{
  va_list ap;
  va_start (ap, fmt);
  vsnprintf (err, errlen, fmt, ap);
  va_end (ap);
  return ret;
}

/* The name of incompatible feature bit from the feature name table, if
 * the image has one; the image's own words help the user most.
 */
static void
feature_name (const uint8_t *buf, size_t len, size_t ext_start, unsigned bit,
              char *name, size_t namelen)
{
  size_t p = ext_start;

  snprintf (name, namelen, "unknown");
  while (p + 8 <= len) {
    uint32_t type = get_be32 (buf + p), elen = get_be32 (buf + p + 4);
    if (type == EXT_END || elen > len - p - 8)
      return;
    if (type == EXT_FEATURE_TABLE)
      for (size_t i = 0; i + 48 <= elen; i += 48) {
        const uint8_t *f = buf + p + 8 + i;
        if (f[0] == 0 && f[1] == bit) {
          size_t n = strnlen ((const char *) f + 2, 46);
          if (n >= namelen)
            n = namelen - 1;
          memcpy (name, f + 2, n);
          name[n] = '\0';
          for (size_t k = 0; k < n; k++)
            if (name[k] < 0x20 || name[k] > 0x7e)
              name[k] = '?';
          return;
        }
      }
    p += 8 + round_up (elen, 8);
  }
}

int
header_in_file (const char *what, uint64_t off, uint64_t len,
                uint64_t file_size, char *err, size_t errlen)
{
  if (off < file_size && len <= file_size - off)
    return 0;
  return fail (err, errlen, -EINVAL, "%s offset 0x%" PRIx64 " is past the "
               "end of the file (size %" PRIu64 ")", what, off, file_size);
}

int
header_l1_in_file (const char *what, const uint64_t *l1, uint32_t n,
                   uint64_t file_size, char *err, size_t errlen)
{
  char name[80];

  for (uint32_t i = 0; i < n; i++) {
    uint64_t off = be64toh (l1[i]) & L1E_OFFSET_MASK;
    /* Only the start: slices of a new table nobody wrote are not in the
     * file yet (qcow2-segment.c), and read as zeros.
     */
    if (off && off >= file_size) {
      snprintf (name, sizeof name, "%sL2 table", what);
      return header_in_file (name, off, 1, file_size, err, errlen);
    }
  }
  return 0;
}

/* The fixed fields of the header, version 2 or 3. */
static int
parse_fields (struct qcow2 *q, const uint8_t *b, size_t len, char *err,
              size_t errlen)
{
  if (len < QCOW2_V2_HEADER_LEN)
    return fail (err, errlen, -EINVAL, "file is too short to be a qcow2 image");
  if (get_be32 (b + HDR_MAGIC) != QCOW2_MAGIC)
    return fail (err, errlen, -EINVAL, "not a qcow2 image (bad magic)");

  q->version = get_be32 (b + HDR_VERSION);
  if (q->version != 2 && q->version != 3)
    return fail (err, errlen, -ENOTSUP, "unsupported qcow2 version %" PRIu32,
                 q->version);
  q->backing_offset = get_be64 (b + HDR_BACKING_OFFSET);
  q->backing_size = get_be32 (b + HDR_BACKING_SIZE);
  q->cluster_bits = get_be32 (b + HDR_CLUSTER_BITS);
  q->size = get_be64 (b + HDR_SIZE);
  if (get_be32 (b + HDR_CRYPT_METHOD) != 0)
    return fail (err, errlen, -ENOTSUP, "encrypted images are not supported "
                 "(crypt_method %" PRIu32 ")", get_be32 (b + HDR_CRYPT_METHOD));
  q->l1_size = get_be32 (b + HDR_L1_SIZE);
  q->l1_offset = get_be64 (b + HDR_L1_OFFSET);
  q->reftable_offset = get_be64 (b + HDR_REFTABLE_OFFSET);
  q->reftable_clusters = get_be32 (b + HDR_REFTABLE_CLUSTERS);
  q->nb_snapshots = get_be32 (b + HDR_NB_SNAPSHOTS);
  q->snapshots_offset = get_be64 (b + HDR_SNAPSHOTS_OFFSET);

  if (q->cluster_bits < QCOW2_MIN_CLUSTER_BITS
      || q->cluster_bits > QCOW2_MAX_CLUSTER_BITS)
    return fail (err, errlen, -EINVAL, "invalid cluster_bits %" PRIu32
                 " (must be 9 to 21)", q->cluster_bits);
  q->cluster_size = 1u << q->cluster_bits;

  if (q->version == 2) {
    q->incompat = q->compat = q->autoclear = 0;
    q->refcount_order = 4;
    q->header_length = QCOW2_V2_HEADER_LEN;
    return 0;
  }
  if (len < QCOW2_V3_HEADER_LEN)
    return fail (err, errlen, -EINVAL, "version 3 header is truncated");
  q->incompat = get_be64 (b + HDR_INCOMPAT);
  q->compat = get_be64 (b + HDR_COMPAT);
  q->autoclear = get_be64 (b + HDR_AUTOCLEAR);
  q->refcount_order = get_be32 (b + HDR_REFCOUNT_ORDER);
  q->header_length = get_be32 (b + HDR_HEADER_LENGTH);
  if (q->header_length < QCOW2_V3_HEADER_LEN || q->header_length % 8
      || q->header_length > q->cluster_size || q->header_length > len)
    return fail (err, errlen, -EINVAL, "invalid header_length %" PRIu32,
                 q->header_length);
  if (q->refcount_order > 6)
    return fail (err, errlen, -EINVAL, "invalid refcount_order %" PRIu32,
                 q->refcount_order);
  return 0;
}

/* The feature bits and what they ask for: refuse what the engine cannot
 * honour.
 */
static int
check_features (struct qcow2 *q, const uint8_t *b, size_t len,
                uint64_t file_size, char *err, size_t errlen)
{
  if (q->incompat & ~KNOWN_INCOMPAT) {
    unsigned bit = (unsigned) __builtin_ctzll (q->incompat & ~KNOWN_INCOMPAT);
    char name[64];
    feature_name (b, len, q->header_length, bit, name, sizeof name);
    return fail (err, errlen, -ENOTSUP, "unsupported incompatible feature "
                 "bit %u (%s)", bit, name);
  }
  if ((q->incompat & INCOMPAT_DATA_FILE) && q->nb_snapshots)
    return fail (err, errlen, -EINVAL, "an image with an external data file "
                 "cannot have internal snapshots");
  q->extl2 = (q->incompat & INCOMPAT_EXTL2) != 0;
  /* 32 subclusters of at least one sector each (QEMU's own limit too). */
  if (q->extl2 && q->cluster_bits < 14)
    return fail (err, errlen, -ENOTSUP, "extended L2 entries need clusters "
                 "of at least 16384 bytes (this image has %" PRIu32 ")",
                 q->cluster_size);
  q->compression_type = q->header_length > 104 ? b[104] : 0;
  if (!(q->incompat & INCOMPAT_COMPRESSION) && q->compression_type != 0)
    return fail (err, errlen, -EINVAL, "compression type %u set without the "
                 "compression type feature bit", q->compression_type);
#ifdef HAVE_ZSTD
  if (q->compression_type > 1)
#else
  if (q->compression_type > 0)
#endif
    return fail (err, errlen, -ENOTSUP, "compression type %u (%s) is not "
                 "supported by this build", q->compression_type,
                 q->compression_type == 1 ? "zstd" : "unknown");
  if ((q->incompat & INCOMPAT_CORRUPT) && !q->read_only)
    return fail (err, errlen, -EUCLEAN, "image is marked corrupt; repair it "
                 "with 'qemu-img check -r all' or serve it read-only");
  if (q->backing_offset != 0
      && (q->backing_size == 0 || q->backing_size > 1023
          || q->backing_offset > file_size
          || q->backing_size > file_size - q->backing_offset))
    return fail (err, errlen, -EINVAL, "invalid backing file name location "
                 "(offset 0x%" PRIx64 ", %" PRIu32 " bytes)", q->backing_offset,
                 q->backing_size);
  return 0;
}

/* The geometry, and the tables the header points at: they must lie inside
 * the file, on cluster boundaries.
 */
static int
check_tables (struct qcow2 *q, uint64_t file_size, char *err, size_t errlen)
{
  uint64_t cs = q->cluster_size, l1_bytes, l1_need, coverage, reft_bytes;

  /* One L1 entry maps a whole table; what the cache holds of one (the
   * slice geometry, l2_bits) is qcow2-open.c's choice.
   */
  q->l1_shift = 2 * q->cluster_bits - (q->extl2 ? 4 : 3);
  q->sc_bits = q->extl2 ? q->cluster_bits - 5 : q->cluster_bits;
  q->sc_size = 1u << q->sc_bits;
  coverage = (uint64_t) 1 << q->l1_shift;
  l1_bytes = (uint64_t) q->l1_size * 8;
  if (l1_bytes > MAX_L1_BYTES)
    return fail (err, errlen, -EFBIG, "L1 table too large (%" PRIu32
                 " entries)", q->l1_size);
  if (q->size > (uint64_t) 1 << 62)
    return fail (err, errlen, -EFBIG, "disk size %" PRIu64 " too large",
                 q->size);
  l1_need = (q->size + coverage - 1) / coverage;
  if (l1_need > q->l1_size)
    return fail (err, errlen, -EINVAL, "L1 table (%" PRIu32 " entries) too "
                 "small for a %" PRIu64 "-byte disk", q->l1_size, q->size);
  if (q->l1_size && ((q->l1_offset & (cs - 1)) || q->l1_offset == 0))
    return fail (err, errlen, -EINVAL, "L1 table at 0x%" PRIx64 " is "
                 "unaligned", q->l1_offset);
  if (q->l1_size && header_in_file ("L1 table", q->l1_offset, l1_bytes,
                                    file_size, err, errlen) < 0)
    return -EINVAL;
  reft_bytes = (uint64_t) q->reftable_clusters * cs;
  if (q->reftable_clusters == 0 || reft_bytes > MAX_REFTABLE_BYTES)
    return fail (err, errlen, -EINVAL, "invalid refcount table size (%"
                 PRIu32 " clusters)", q->reftable_clusters);
  if ((q->reftable_offset & (cs - 1)) || q->reftable_offset == 0)
    return fail (err, errlen, -EINVAL, "refcount table at 0x%" PRIx64
                 " is unaligned", q->reftable_offset);
  if (header_in_file ("refcount table", q->reftable_offset, reft_bytes,
                      file_size, err, errlen) < 0)
    return -EINVAL;
  if (q->nb_snapshots && (q->snapshots_offset & (cs - 1)))
    return fail (err, errlen, -EINVAL, "snapshot table offset is unaligned");
  /* Each entry takes at least 40 bytes. */
  if (q->nb_snapshots
      && header_in_file ("snapshot table", q->snapshots_offset,
                         (uint64_t) q->nb_snapshots * 40, file_size, err,
                         errlen) < 0)
    return -EINVAL;
  return 0;
}

/* Walk the extensions so that a malformed list is caught at open, taking
 * the names of the external data file and of the backing file's format.
 */
static int
parse_extensions (struct qcow2 *q, const uint8_t *b, size_t len, char *err,
                  size_t errlen)
{
  size_t p = q->header_length;

  while (p + 8 <= len) {
    uint32_t type = get_be32 (b + p), elen = get_be32 (b + p + 4);
    if (type == EXT_END)
      break;
    if (elen > len - p - 8)
      return fail (err, errlen, -EINVAL, "header extension 0x%08" PRIx32
                   " runs past the header cluster", type);
    if (type == EXT_DATA_FILE && (q->incompat & INCOMPAT_DATA_FILE)) {
      if (elen == 0 || elen > 4096 || memchr (b + p + 8, 0, elen))
        return fail (err, errlen, -EINVAL, "invalid external data file "
                     "name extension");
      free (q->data_file);
      q->data_file = strndup ((const char *) b + p + 8, elen);
      if (!q->data_file)
        return fail (err, errlen, -ENOMEM, "out of memory");
    }
    if (type == EXT_BACKING_FORMAT) {
      if (elen == 0 || elen >= sizeof q->backing_fmt)
        return fail (err, errlen, -EINVAL, "invalid backing format "
                     "extension (%" PRIu32 " bytes)", elen);
      memcpy (q->backing_fmt, b + p + 8, elen);
      q->backing_fmt[elen] = '\0';
    }
    p += 8 + round_up (elen, 8);
  }

  if ((q->incompat & INCOMPAT_DATA_FILE) && !q->data_file)
    return fail (err, errlen, -EINVAL, "the image uses an external data file "
                 "but does not name it");
  return 0;
}

int
header_parse (struct qcow2 *q, const void *vbuf, size_t len,
              uint64_t file_size, char *err, size_t errlen)
{
  const uint8_t *b = vbuf;
  int r;

  r = parse_fields (q, b, len, err, errlen);
  if (r == 0)
    r = check_features (q, b, len, file_size, err, errlen);
  if (r == 0)
    r = check_tables (q, file_size, err, errlen);
  if (r == 0)
    r = parse_extensions (q, b, len, err, errlen);
  if (r < 0)
    return r;

  q->refcount_bits = 1u << q->refcount_order;
  q->rb_bits = q->cluster_bits + 3 - q->refcount_order;
  q->refcount_max = q->refcount_order == 6 ? UINT64_MAX
    : ((uint64_t) 1 << q->refcount_bits) - 1;
  return 0;
}

int
header_write_sync (struct qcow2 *q)
{
  int r = blocking_pwrite (q->fd, q->header_sector, SECTOR, 0);
  if (r == 0 && fdatasync (q->fd) < 0)
    r = -errno;
  return r;
}

int
header_set_dirty (struct qcow2 *q, bool dirty)
{
  if (q->version < 3)
    return 0;
  if (dirty)
    q->incompat |= INCOMPAT_DIRTY;
  else
    q->incompat &= ~INCOMPAT_DIRTY;
  put_be64 ((uint8_t *) q->header_sector + HDR_INCOMPAT, q->incompat);
  return header_write_sync (q);
}

/* One header extension at p: type, length, the data padded to 8 bytes.
 * Returns the offset past it, or 0 when it does not fit in len.
 */
static size_t
put_extension (uint8_t *b, size_t len, size_t p, uint32_t type,
               const void *data, size_t dlen)
{
  size_t end = p + 8 + round_up (dlen, 8);
  if (end > len)
    return 0;
  put_be32 (b + p, type);
  put_be32 (b + p + 4, (uint32_t) dlen);
  if (dlen)
    memcpy (b + p + 8, data, dlen);
  return end;
}

int
header_build (const struct qcow2 *q, const char *backing_name, void *vbuf,
              size_t len, char *err, size_t errlen)
{
  uint8_t *b = vbuf;
  size_t p, blen = backing_name ? strlen (backing_name) : 0;

  memset (b, 0, len);
  put_be32 (b + HDR_MAGIC, QCOW2_MAGIC);
  put_be32 (b + HDR_VERSION, q->version);
  put_be32 (b + HDR_CLUSTER_BITS, q->cluster_bits);
  put_be64 (b + HDR_SIZE, q->size);
  put_be32 (b + HDR_L1_SIZE, q->l1_size);
  put_be64 (b + HDR_L1_OFFSET, q->l1_offset);
  put_be64 (b + HDR_REFTABLE_OFFSET, q->reftable_offset);
  put_be32 (b + HDR_REFTABLE_CLUSTERS, q->reftable_clusters);
  p = QCOW2_V2_HEADER_LEN;
  if (q->version >= 3) {
    put_be64 (b + HDR_INCOMPAT, q->incompat);
    put_be64 (b + HDR_COMPAT, q->compat);
    put_be64 (b + HDR_AUTOCLEAR, q->autoclear);
    put_be32 (b + HDR_REFCOUNT_ORDER, q->refcount_order);
    /* With the compression type byte, padded to 8 (as QEMU writes it). */
    p = QCOW2_V3_HEADER_LEN + 8;
    put_be32 (b + HDR_HEADER_LENGTH, (uint32_t) p);
    b[QCOW2_V3_HEADER_LEN] = q->compression_type;
  }
  if (q->backing_fmt[0])
    p = put_extension (b, len, p, EXT_BACKING_FORMAT, q->backing_fmt,
                       strlen (q->backing_fmt));
  if (p && q->data_file)
    p = put_extension (b, len, p, EXT_DATA_FILE, q->data_file,
                       strlen (q->data_file));
  if (p)
    p = put_extension (b, len, p, EXT_END, NULL, 0);
  if (!p || blen > 1023 || blen > len - p)
    return fail (err, errlen, -EINVAL, "the header extensions and backing "
                 "file name do not fit in one %zu-byte cluster", len);
  if (blen) {
    memcpy (b + p, backing_name, blen);
    put_be64 (b + HDR_BACKING_OFFSET, p);
    put_be32 (b + HDR_BACKING_SIZE, (uint32_t) blen);
  }
  return 0;
}
