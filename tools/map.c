/* tools/map.c: qnbd-img map, the allocation of an image and its backing
 * chain per range, merged and printed as qemu-img map prints it (JSON
 * lines, or the "Offset Length Mapped to File" table).  The engine says
 * what each run is (qcow2_map_next); this file only merges and prints.
 */
#include <config.h>

#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2.h"
#include "qnbd-img.h"

static const char usage_text[] =
  "Usage: qnbd-img map [-f qcow2|raw] [--output=human|json] "
  "[--start-offset=N] [--max-length=N] [-U] FILE\n";

/* Probe at most this much at once, as qemu-img does. */
#define PROBE_MAX (1ull << 30)

struct entry {
  uint64_t start;
  struct qcow2_map_run r;
};

/* Whether next continues cur: every field the same, and the host
 * offsets (in the same file) contiguous.
 */
static bool
mergeable (const struct entry *cur, const struct entry *next)
{
  const struct qcow2_map_run *a = &cur->r, *b = &next->r;

  if (a->length == 0 || a->zero != b->zero || a->data != b->data
      || a->depth != b->depth || a->present != b->present
      || a->has_offset != b->has_offset)
    return false;
  if (a->has_offset && (strcmp (a->file, b->file)
                        || a->offset + a->length != b->offset))
    return false;
  return true;
}

static void
print_json (const struct entry *e, bool more)
{
  const struct qcow2_map_run *r = &e->r;

  printf ("{ \"start\": %" PRIu64 ", \"length\": %" PRIu64 ", \"depth\": %u,"
          " \"present\": %s, \"zero\": %s, \"data\": %s", e->start,
          r->length, r->depth, r->present ? "true" : "false",
          r->zero ? "true" : "false", r->data ? "true" : "false");
  if (r->has_offset)
    printf (", \"offset\": %" PRIu64, r->offset);
  putchar ('}');
  if (more)
    puts (",");
}

/* "0" or "0x1f000", left-aligned in 16 columns. */
static void
print_hex (uint64_t v)
{
  char s[24];

  snprintf (s, sizeof s, v ? "0x%" PRIx64 : "0", v);
  printf ("%-16s", s);
}

/* The table lists stored data only; a run of data that has no offset
 * (compressed) cannot be listed.  The next entry is made to look like
 * zeros when it is not plain data, so that such runs merge as qemu-img
 * merges them.  Returns false on the run it cannot list.
 */
static bool
print_human (const struct entry *e, struct entry *next)
{
  const struct qcow2_map_run *r = &e->r;

  if (r->data && !r->has_offset) {
    img_error ("File contains external, encrypted or compressed clusters.");
    return false;
  }
  if (r->data && !r->zero) {
    print_hex (e->start);
    print_hex (r->length);
    print_hex (r->offset);
    printf ("%s\n", r->file);
  }
  if (next && (!next->r.data || next->r.zero)) {
    next->r.data = false;
    next->r.zero = true;
  }
  return true;
}

static bool
dump (bool json, const struct entry *e, struct entry *next)
{
  if (json) {
    print_json (e, next != NULL);
    return true;
  }
  return print_human (e, next);
}

/* Walk [start, end) and print the merged runs; 0 or 1 (the exit status). */
static int
map_image (struct qcow2 *q, const char *path, bool json, uint64_t start,
           uint64_t end)
{
  struct qcow2_mapper *m;
  struct entry cur = { .start = start }, next;
  char err[512];
  int r;

  m = qcow2_map_new (q, &r);
  if (!m) {
    img_error ("map: %s: %s", path, strerror (-r));
    return 1;
  }
  if (json)
    putchar ('[');
  else
    printf ("%-16s%-16s%-16s%s\n", "Offset", "Length", "Mapped to", "File");
  while (cur.start + cur.r.length < end) {
    uint64_t off = cur.start + cur.r.length;
    uint64_t n = end - off < PROBE_MAX ? end - off : PROBE_MAX;

    next.start = off;
    r = qcow2_map_next (m, off, n, &next.r, err, sizeof err);
    if (r < 0) {
      fflush (stdout);
      img_error ("map: %s: could not read the image's metadata at offset "
                 "%" PRIu64 ": %s", path, off, err);
      qcow2_map_free (m);
      return 1;
    }
    if (mergeable (&cur, &next)) {
      cur.r.length += next.r.length;
      continue;
    }
    if (cur.r.length > 0 && !dump (json, &cur, &next)) {
      qcow2_map_free (m);
      return 1;
    }
    cur = next;
  }
  r = dump (json, &cur, NULL);
  if (json)
    puts ("]");
  qcow2_map_free (m);
  return r ? 0 : 1;
}

int
cmd_map (int argc, char **argv)
{
  enum { OPT_START = 256, OPT_MAX };
  static const struct option longopts[] = {
    { "help", no_argument, NULL, 'h' },
    { "output", required_argument, NULL, 'O' },
    { "start-offset", required_argument, NULL, OPT_START },
    { "max-length", required_argument, NULL, OPT_MAX },
    { "force-share", no_argument, NULL, 'U' },
    { NULL, 0, NULL, 0 },
  };
  struct qcow2_opts opts = {
    .read_only = true,
    .backing = QCOW2_BACKING_FOLLOW,
  };
  uint64_t start = 0, max_len = UINT64_MAX, end;
  bool json = false;
  struct qcow2 *q;
  char err[512];
  int c, status;

  while ((c = getopt_long (argc, argv, "hf:U", longopts, NULL)) != -1)
    if (c == 'h') {
      fputs (usage_text, stdout);
      return 0;
    }
    else if (c == 'O' && (!strcmp (optarg, "json")
                          || !strcmp (optarg, "human")))
      json = !strcmp (optarg, "json");
    else if (c == 'f' && (!strcmp (optarg, "qcow2")
                          || !strcmp (optarg, "raw")))
      opts.format = strcmp (optarg, "raw") ? QCOW2_FORMAT_QCOW2
        : QCOW2_FORMAT_RAW;
    else if (c == 'U')
      opts.force_share = true;
    else if ((c == OPT_START && parse_size (optarg, &start) == 0)
             || (c == OPT_MAX && parse_size (optarg, &max_len) == 0))
      ;
    else if (c == 'O' || c == 'f' || c == OPT_START || c == OPT_MAX) {
      img_error ("map: invalid value '%s' (--output=human|json, -f "
                 "qcow2|raw, offsets and lengths in bytes or with K, M, G, "
                 "T suffixes)", optarg);
      return 1;
    }
    else {
      fputs (usage_text, stderr);
      return 1;
    }
  if (argc - optind != 1) {
    fputs (usage_text, stderr);
    return 1;
  }
  if (qcow2_open (argv[optind], &opts, &q, err, sizeof err) < 0) {
    img_error ("map: %s: %s", argv[optind], err);
    return 1;
  }
  end = qcow2_size (q);
  if (max_len < end && start + max_len < end)
    end = start + max_len;
  status = map_image (q, argv[optind], json, start, end);
  qcow2_close (q);
  return status;
}
