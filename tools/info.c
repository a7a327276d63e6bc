/* tools/info.c: qnbd-img info, what qemu-img info prints for a qcow2
 * image, with its JSON field names; the header and the snapshot table are
 * read by the engine (qcow2_read_info_shared).  With --backing-chain each
 * backing file follows, qcow2 or raw.
 */
#include <config.h>

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "qcow2.h"
#include "qnbd-img.h"

static const char usage_text[] =
  "Usage: qnbd-img info [-f qcow2] [--output=human|json] [--backing-chain] "
  "[-U] FILE\n";

/* Longer chains are refused when the images are opened, too. */
#define MAX_CHAIN 32

static const char *const compression_names[] = { "zlib", "zstd" };

/* The "snapshots" array, with qemu-img's field names (and order). */
static void
print_json_snapshots (FILE *f, const struct qcow2_info *in)
{
  if (!in->nb_snapshots)
    return;
  fprintf (f, "    \"snapshots\": [\n");
  for (uint32_t i = 0; i < in->nb_snapshots; i++) {
    const struct qcow2_snapshot_info *sn = &in->snapshots[i];
    fprintf (f, "        {\n");
    if (sn->has_icount)
      fprintf (f, "            \"icount\": %" PRIu64 ",\n", sn->icount);
    fprintf (f, "            \"vm-clock-nsec\": %" PRIu64 ",\n"
             "            \"name\": ", sn->vm_clock_nsec % 1000000000);
    img_json_string (f, sn->name);
    fprintf (f, ",\n            \"date-sec\": %" PRIu32 ",\n"
             "            \"date-nsec\": %" PRIu32 ",\n"
             "            \"vm-clock-sec\": %" PRIu64 ",\n"
             "            \"id\": ", sn->date_sec, sn->date_nsec,
             sn->vm_clock_nsec / 1000000000);
    img_json_string (f, sn->id);
    fprintf (f, ",\n            \"vm-state-size\": %" PRIu64 "\n        }%s\n",
             sn->vm_state_size, i + 1 < in->nb_snapshots ? "," : "");
  }
  fprintf (f, "    ],\n");
}

static void
print_json (FILE *f, const char *path, const struct qcow2_info *in,
            uint64_t actual)
{
  const char *b = in->backing_file;

  fprintf (f, "{\n");
  if (b && in->backing_fmt[0])
    fprintf (f, "    \"backing-filename-format\": \"%s\",\n",
             in->backing_fmt);
  print_json_snapshots (f, in);
  fprintf (f, "    \"virtual-size\": %" PRIu64 ",\n    \"filename\": ",
           in->size);
  img_json_string (f, path);
  fprintf (f, ",\n    \"cluster-size\": %" PRIu32 ",\n"
           "    \"format\": \"qcow2\",\n"
           "    \"actual-size\": %" PRIu64 ",\n", in->cluster_size, actual);
  fprintf (f, "    \"format-specific\": {\n        \"type\": \"qcow2\",\n"
           "        \"data\": {\n            \"compat\": \"%s\",\n"
           "            \"compression-type\": \"%s\",\n",
           in->version == 2 ? "0.10" : "1.1",
           compression_names[in->compression_type]);
  if (in->version >= 3)
    fprintf (f, "            \"lazy-refcounts\": %s,\n",
             in->lazy_refcounts ? "true" : "false");
  fprintf (f, "            \"refcount-bits\": %u", in->refcount_bits);
  if (in->data_file) {
    fprintf (f, ",\n            \"data-file\": ");
    img_json_string (f, in->data_file);
    fprintf (f, ",\n            \"data-file-raw\": %s",
             in->data_file_raw ? "true" : "false");
  }
  if (in->version >= 3)
    fprintf (f, ",\n            \"corrupt\": %s,\n"
             "            \"extended-l2\": %s",
             in->corrupt ? "true" : "false",
             in->extended_l2 ? "true" : "false");
  fprintf (f, "\n        }\n    },\n");
  if (b) {
    fprintf (f, "    \"full-backing-filename\": ");
    img_json_string (f, in->full_backing_file);
    fprintf (f, ",\n    \"backing-filename\": ");
    img_json_string (f, b);
    fprintf (f, ",\n");
  }
  fprintf (f, "    \"dirty-flag\": %s\n}\n", in->dirty ? "true" : "false");
}

/* A raw file of the chain, as qemu-img describes one. */
static void
print_json_raw (FILE *f, const char *path, uint64_t size, uint64_t actual)
{
  fprintf (f, "{\n    \"virtual-size\": %" PRIu64 ",\n    \"filename\": ",
           size);
  img_json_string (f, path);
  fprintf (f, ",\n    \"format\": \"raw\",\n    \"actual-size\": %" PRIu64
           ",\n    \"dirty-flag\": false\n}\n", actual);
}

/* "16 MiB", "196 KiB", "1.5 GiB": three significant digits, the next
 * unit from 1000 of the last, as qemu-img prints sizes.
 */
static void
format_size (char *buf, size_t len, uint64_t v)
{
  static const char *const units[] = {
    "", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei",
  };
  unsigned i = 0;

  while (i < 6 && (double) v >= 1000.0 * ldexp (1.0, 10 * (int) i))
    i++;
  snprintf (buf, len, "%0.3g %sB", (double) v / ldexp (1.0, 10 * (int) i),
            units[i]);
}

static void
print_size (uint64_t v)
{
  char buf[32];

  format_size (buf, sizeof buf, v);
  fputs (buf, stdout);
}

/* The "Snapshot list:" table. */
static void
print_snapshots (const struct qcow2_info *in)
{
  if (!in->nb_snapshots)
    return;
  printf ("Snapshot list:\n%-10s%-17s%8s%20s%13s%11s\n", "ID", "TAG",
          "VM SIZE", "DATE", "VM CLOCK", "ICOUNT");
  for (uint32_t i = 0; i < in->nb_snapshots; i++) {
    const struct qcow2_snapshot_info *sn = &in->snapshots[i];
    uint64_t secs = sn->vm_clock_nsec / 1000000000;
    char size[32], date[32] = "", clock[48], icount[24] = "";
    time_t t = (time_t) sn->date_sec;
    struct tm tm;

    format_size (size, sizeof size, sn->vm_state_size);
    if (localtime_r (&t, &tm))
      strftime (date, sizeof date, "%Y-%m-%d %H:%M:%S", &tm);
    snprintf (clock, sizeof clock, "%02" PRIu64 ":%02u:%02u.%03u",
              secs / 3600, (unsigned) (secs / 60 % 60),
              (unsigned) (secs % 60),
              (unsigned) (sn->vm_clock_nsec / 1000000 % 1000));
    if (sn->has_icount)
      snprintf (icount, sizeof icount, "%" PRIu64, sn->icount);
    printf ("%-9s %-16s %8s%20s%13s%11s\n", sn->id, sn->name, size, date,
            clock, icount);
  }
}

static void
print_human (const char *path, const struct qcow2_info *in, uint64_t actual)
{
  printf ("image: %s\nfile format: qcow2\nvirtual size: ", path);
  print_size (in->size);
  printf (" (%" PRIu64 " bytes)\ndisk size: ", in->size);
  print_size (actual);
  printf ("\ncluster_size: %" PRIu32 "\n", in->cluster_size);
  if (in->backing_file && strcmp (in->backing_file, in->full_backing_file))
    printf ("backing file: %s (actual path: %s)\n", in->backing_file,
            in->full_backing_file);
  else if (in->backing_file)
    printf ("backing file: %s\n", in->backing_file);
  if (in->backing_file && in->backing_fmt[0])
    printf ("backing file format: %s\n", in->backing_fmt);
  if (in->dirty)
    printf ("cleanly shut down: no\n");
  print_snapshots (in);
  printf ("Format specific information:\n    compat: %s\n"
          "    compression type: %s\n", in->version == 2 ? "0.10" : "1.1",
          compression_names[in->compression_type]);
  if (in->version >= 3)
    printf ("    lazy refcounts: %s\n", in->lazy_refcounts ? "true" : "false");
  printf ("    refcount bits: %u\n", in->refcount_bits);
  if (in->data_file)
    printf ("    data file: %s\n    data file raw: %s\n", in->data_file,
            in->data_file_raw ? "true" : "false");
  if (in->version >= 3)
    printf ("    corrupt: %s\n    extended l2: %s\n",
            in->corrupt ? "true" : "false",
            in->extended_l2 ? "true" : "false");
}

static void
print_human_raw (const char *path, uint64_t size, uint64_t actual)
{
  printf ("image: %s\nfile format: raw\nvirtual size: ", path);
  print_size (size);
  printf (" (%" PRIu64 " bytes)\ndisk size: ", size);
  print_size (actual);
  putchar ('\n');
}

/* Whether a backing file without a format in the header is qcow2, as the
 * engine decides at open: by its magic.
 */
static bool
looks_qcow2 (const char *path)
{
  unsigned char m[4] = { 0 };
  FILE *f = fopen (path, "rb");
  bool yes = f && fread (m, 1, 4, f) == 4 && !memcmp (m, "QFI\xfb", 4);

  if (f)
    fclose (f);
  return yes;
}

/* Describe one image of a chain into f (JSON) or on stdout; *next is its
 * backing file (allocated; NULL at the end of the chain) and *next_raw
 * that file's format.  0, or 1 after saying why.
 */
static int
describe (FILE *f, const char *path, bool raw, bool json, bool force_share,
          char **next, bool *next_raw)
{
  struct qcow2_info in;
  struct stat st;
  char err[512];

  *next = NULL;
  if (stat (path, &st) < 0) {
    img_error ("info: %s: %s", path, strerror (errno));
    return 1;
  }
  if (raw) {
    if (json)
      print_json_raw (f, path, (uint64_t) st.st_size,
                      (uint64_t) st.st_blocks * 512);
    else
      print_human_raw (path, (uint64_t) st.st_size,
                       (uint64_t) st.st_blocks * 512);
    return 0;
  }
  if (qcow2_read_info_shared (path, force_share, &in, err, sizeof err) < 0) {
    img_error ("info: %s: %s", path, err);
    return 1;
  }
  /* Blocks the file holds, as du counts them. */
  if (json)
    print_json (f, path, &in, (uint64_t) st.st_blocks * 512);
  else
    print_human (path, &in, (uint64_t) st.st_blocks * 512);
  if (in.backing_file) {
    *next = strdup (in.full_backing_file);
    *next_raw = in.backing_fmt[0] ? !strcmp (in.backing_fmt, "raw")
      : !looks_qcow2 (in.full_backing_file);
  }
  qcow2_info_free (&in);
  if (in.backing_file && !*next) {
    img_error ("info: out of memory");
    return 1;
  }
  return 0;
}

/* Each line of the JSON object in buf, indented as an element of the
 * array qemu-img prints for a chain.
 */
static void
print_indented (const char *buf, bool last)
{
  for (const char *p = buf; *p;) {
    const char *nl = strchr (p, '\n');
    size_t n = nl ? (size_t) (nl - p) : strlen (p);
    bool final = !nl || !nl[1];
    printf ("    %.*s%s\n", (int) n, p, final && !last ? "," : "");
    p += n + (nl ? 1 : 0);
  }
}

/* The image, then (with chain) each backing file below it: qemu-img's
 * blocks separated by a blank line, or its JSON array.
 */
static int
describe_chain (const char *path, bool json, bool chain, bool force_share)
{
  struct { dev_t dev; ino_t ino; } seen[MAX_CHAIN];
  char *cur = strdup (path), *next = NULL;
  bool raw = false, next_raw = false;
  int status = 0;

  if (json && chain)
    printf ("[\n");
  for (unsigned depth = 0; cur && status == 0; depth++) {
    char *buf = NULL;
    size_t len = 0;
    FILE *f = json && chain ? open_memstream (&buf, &len) : stdout;
    struct stat st;

    if (!f || stat (cur, &st) < 0) {
      img_error ("info: %s: %s", cur, strerror (errno));
      status = 1;
      break;
    }
    for (unsigned i = 0; i < depth; i++)
      if (seen[i].dev == st.st_dev && seen[i].ino == st.st_ino) {
        img_error ("info: %s: backing chain loop: %s is already in the "
                   "chain", path, cur);
        status = 1;
      }
    if (status == 0 && depth == MAX_CHAIN) {
      img_error ("info: %s: backing chain longer than %d images", path,
                 MAX_CHAIN);
      status = 1;
    }
    if (status == 0) {
      seen[depth].dev = st.st_dev;
      seen[depth].ino = st.st_ino;
      if (depth > 0 && !json)
        putchar ('\n');
      status = describe (f, cur, raw, json, force_share, &next, &next_raw);
    }
    if (f != stdout) {
      fclose (f);
      if (status == 0)
        print_indented (buf, !next);
      free (buf);
    }
    free (cur);
    cur = chain ? next : NULL;
    if (!chain)
      free (next);
    next = NULL;
    raw = next_raw;
  }
  free (cur);
  if (json && chain && status == 0)
    printf ("]\n");
  return status;
}

int
cmd_info (int argc, char **argv)
{
  enum { OPT_CHAIN = 256 };
  static const struct option longopts[] = {
    { "help", no_argument, NULL, 'h' },
    { "output", required_argument, NULL, 'O' },
    { "backing-chain", no_argument, NULL, OPT_CHAIN },
    { "force-share", no_argument, NULL, 'U' },
    { NULL, 0, NULL, 0 },
  };
  bool json = false, chain = false, force_share = false;
  int c;

  while ((c = getopt_long (argc, argv, "hf:U", longopts, NULL)) != -1)
    if (c == 'h') {
      fputs (usage_text, stdout);
      return 0;
    } else if (c == 'O' && (!strcmp (optarg, "json")
                            || !strcmp (optarg, "human")))
      json = !strcmp (optarg, "json");
    else if (c == OPT_CHAIN)
      chain = true;
    else if (c == 'U')
      force_share = true;
    else if (c == 'O' || (c == 'f' && strcmp (optarg, "qcow2"))) {
      img_error ("info: --output=human|json and -f qcow2 only");
      return 1;
    } else if (c != 'f') {
      fputs (usage_text, stderr);
      return 1;
    }
  if (argc - optind != 1) {
    fputs (usage_text, stderr);
    return 1;
  }
  return describe_chain (argv[optind], json, chain, force_share);
}
