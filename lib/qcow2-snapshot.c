/* lib/qcow2-snapshot.c: the internal snapshot table.
 *
 * Read at open, synchronously, when needed: to serve a snapshot read-only
 * (its L1 table replaces the active one) and to rebuild refcounts (every
 * snapshot's L1 table reaches clusters too).  Snapshots are never created
 * or deleted here.
 */
#include <config.h>

#include <assert.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "qcow2-internal.h"

#define MAX_SNAPSHOTS 65536
#define MAX_SNAPSHOT_TABLE (64u << 20)

void
snapshot_table_free (struct snapshot *s, unsigned n)
{
  for (unsigned i = 0; i < n; i++) {
    free (s[i].id);
    free (s[i].name);
  }
  free (s);
}

int
snapshot_table_read (struct qcow2 *q, struct snapshot **out, unsigned *nout,
                     char *err, size_t errlen)
{
  struct snapshot *s = NULL;
  uint8_t *buf = NULL;
  size_t pos = 0, len;
  uint64_t l1_total = 0;
  unsigned n = q->nb_snapshots;
  int r;

  *out = NULL;
  *nout = 0;
  if (n == 0)
    return 0;
  if (n > MAX_SNAPSHOTS || q->snapshots_offset == 0
      || (q->snapshots_offset & (q->cluster_size - 1))) {
    snprintf (err, errlen, "invalid snapshot table (%u snapshots at 0x%"
              PRIx64 ")", n, q->snapshots_offset);
    return -EINVAL;
  }
  /* Entries are variable-sized; read generously, bounded. */
  len = (size_t) n * 1024 + 65536;
  if (len > MAX_SNAPSHOT_TABLE)
    len = MAX_SNAPSHOT_TABLE;
  /* Never past the end of the file (header_parse checked the start). */
  assert (q->snapshots_offset < q->file_end);
  if (len > q->file_end - q->snapshots_offset)
    len = q->file_end - q->snapshots_offset;
  buf = malloc (len);
  s = calloc (n, sizeof *s);
  if (!buf || !s) {
    r = -ENOMEM;
    snprintf (err, errlen, "out of memory for the snapshot table");
    goto fail;
  }
  r = blocking_pread (q->fd, buf, len, q->snapshots_offset, false);
  if (r < 0) {
    snprintf (err, errlen, "reading the snapshot table: %s", strerror (-r));
    goto fail;
  }
  for (unsigned i = 0; i < n; i++) {
    const uint8_t *e = buf + pos;
    uint32_t extra, id_len, name_len;
    size_t entry;

    if (pos + 40 > len)
      goto bad;
    s[i].l1_offset = get_be64 (e);
    s[i].l1_size = get_be32 (e + 8);
    id_len = get_be16 (e + 12);
    name_len = get_be16 (e + 14);
    extra = get_be32 (e + 36);
    entry = 40 + (size_t) extra + id_len + name_len;
    if (extra > 1024 || pos + entry > len)
      goto bad;
    s[i].disk_size = extra >= 16 ? get_be64 (e + 48) : q->size;
    s[i].date_sec = get_be32 (e + 16);
    s[i].date_nsec = get_be32 (e + 20);
    s[i].vm_clock_nsec = get_be64 (e + 24);
    /* The 64-bit VM state size in the extra data replaces the 32-bit one. */
    s[i].vm_state_size = extra >= 8 ? get_be64 (e + 40) : get_be32 (e + 32);
    s[i].icount = extra >= 24 ? get_be64 (e + 56) : UINT64_MAX;
    s[i].id = strndup ((const char *) e + 40 + extra, id_len);
    s[i].name = strndup ((const char *) e + 40 + extra + id_len, name_len);
    if (!s[i].id || !s[i].name) {
      r = -ENOMEM;
      snprintf (err, errlen, "out of memory for the snapshot table");
      goto fail;
    }
    if ((s[i].l1_offset & (q->cluster_size - 1))
        || (uint64_t) s[i].l1_size * 8 > MAX_L1_BYTES)
      goto bad;
    if (s[i].l1_size) {
      char what[80];
      snprintf (what, sizeof what, "snapshot %u L1 table", i + 1);
      r = header_in_file (what, s[i].l1_offset, (uint64_t) s[i].l1_size * 8,
                          q->file_end, err, errlen);
      if (r < 0)
        goto fail;
    }
    /* Tables of their own: together they fit in the file, which bounds
     * what reading all of them (the repair) costs.
     */
    l1_total += (uint64_t) s[i].l1_size * 8;
    if (l1_total > q->file_end) {
      r = -EINVAL;
      snprintf (err, errlen, "the snapshots' L1 tables add up to more than "
                "the file (%" PRIu64 " bytes)", q->file_end);
      goto fail;
    }
    pos += round_up (entry, 8);
  }
  q->snapshots_bytes = pos;
  free (buf);
  *out = s;
  *nout = n;
  return 0;

 bad:
  r = -EINVAL;
  snprintf (err, errlen, "snapshot table is corrupt");
 fail:
  free (buf);
  snapshot_table_free (s, n);
  return r;
}

int
snapshot_load (struct qcow2 *q, const char *which, char *err, size_t errlen)
{
  struct snapshot *s;
  unsigned n;
  const struct snapshot *pick = NULL;
  uint64_t bytes;
  uint64_t *l1;
  int r = snapshot_table_read (q, &s, &n, err, errlen);

  if (r < 0)
    return r;
  for (unsigned i = 0; i < n && !pick; i++)
    if (strcmp (s[i].name, which) == 0)
      pick = &s[i];
  for (unsigned i = 0; i < n && !pick; i++)
    if (strcmp (s[i].id, which) == 0)
      pick = &s[i];
  if (!pick) {
    snprintf (err, errlen, "no snapshot named or numbered '%s'", which);
    snapshot_table_free (s, n);
    return -ENOENT;
  }
  bytes = (uint64_t) pick->l1_size * 8;
  l1 = buffer_alloc_zero (round_up (bytes ? bytes : 1, SECTOR));
  if (!l1) {
    snapshot_table_free (s, n);
    snprintf (err, errlen, "out of memory");
    return -ENOMEM;
  }
  r = bytes ? blocking_pread (q->fd, l1, bytes, pick->l1_offset, false) : 0;
  if (r < 0) {
    free (l1);
    snapshot_table_free (s, n);
    snprintf (err, errlen, "reading the L1 table of snapshot '%s': %s",
              which, strerror (-r));
    return r;
  }
  r = header_l1_in_file ("snapshot's ", l1, pick->l1_size, q->file_end, err,
                         errlen);
  if (r < 0) {
    free (l1);
    snapshot_table_free (s, n);
    return r;
  }
  /* The snapshot's own size, and never more than its L1 can map. */
  q->size = pick->disk_size;
  {
    uint64_t cover = (uint64_t) pick->l1_size << q->l1_shift;
    if (q->size > cover)
      q->size = cover;
  }
  free (q->l1);
  q->l1 = l1;
  q->l1_size = pick->l1_size;
  q->l1_offset = pick->l1_offset;
  snapshot_table_free (s, n);
  return 0;
}
