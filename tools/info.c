/* tools/info.c: qnbd-img info, what qemu-img info prints for a qcow2
 * image, with its JSON field names; the header is read by the engine
 * (qcow2_read_info).
 */
#include <config.h>

#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "qcow2.h"
#include "qnbd-img.h"

static const char usage_text[] =
  "Usage: qnbd-img info [--output=human|json] FILE\n";

static const char *const compression_names[] = { "zlib", "zstd" };

/* A JSON string: quotes, backslashes and control characters escaped. */
static void
json_string (const char *s)
{
  putchar ('"');
  for (const unsigned char *p = (const unsigned char *) s; *p; p++)
    if (*p == '"' || *p == '\\')
      printf ("\\%c", *p);
    else if (*p < 0x20)
      printf ("\\u%04x", *p);
    else
      putchar (*p);
  putchar ('"');
}

static void
print_json (const char *path, const struct qcow2_info *in, uint64_t actual)
{
  const char *b = in->backing_file;

  printf ("{\n");
  if (b && in->backing_fmt[0])
    printf ("    \"backing-filename-format\": \"%s\",\n", in->backing_fmt);
  printf ("    \"virtual-size\": %" PRIu64 ",\n    \"filename\": ", in->size);
  json_string (path);
  printf (",\n    \"cluster-size\": %" PRIu32 ",\n    \"format\": \"qcow2\",\n"
          "    \"actual-size\": %" PRIu64 ",\n", in->cluster_size, actual);
  printf ("    \"format-specific\": {\n        \"type\": \"qcow2\",\n"
          "        \"data\": {\n            \"compat\": \"%s\",\n"
          "            \"compression-type\": \"%s\",\n",
          in->version == 2 ? "0.10" : "1.1",
          compression_names[in->compression_type]);
  if (in->version >= 3)
    printf ("            \"lazy-refcounts\": %s,\n",
            in->lazy_refcounts ? "true" : "false");
  printf ("            \"refcount-bits\": %u", in->refcount_bits);
  if (in->data_file) {
    printf (",\n            \"data-file\": ");
    json_string (in->data_file);
    printf (",\n            \"data-file-raw\": %s",
            in->data_file_raw ? "true" : "false");
  }
  if (in->version >= 3)
    printf (",\n            \"corrupt\": %s,\n            \"extended-l2\": %s",
            in->corrupt ? "true" : "false",
            in->extended_l2 ? "true" : "false");
  printf ("\n        }\n    },\n");
  if (b) {
    printf ("    \"full-backing-filename\": ");
    json_string (in->full_backing_file);
    printf (",\n    \"backing-filename\": ");
    json_string (b);
    printf (",\n");
  }
  printf ("    \"dirty-flag\": %s\n}\n", in->dirty ? "true" : "false");
}

/* "16 MiB", "196 KiB", "1.5 GiB": three significant digits, the next
 * unit from 1000 of the last, as qemu-img prints sizes.
 */
static void
print_size (uint64_t v)
{
  static const char *const units[] = {
    "", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei",
  };
  unsigned i = 0;

  while (i < 6 && (double) v >= 1000.0 * ldexp (1.0, 10 * (int) i))
    i++;
  printf ("%0.3g %sB", (double) v / ldexp (1.0, 10 * (int) i), units[i]);
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

int
cmd_info (int argc, char **argv)
{
  static const struct option longopts[] = {
    { "help", no_argument, NULL, 'h' },
    { "output", required_argument, NULL, 'O' },
    { NULL, 0, NULL, 0 },
  };
  struct qcow2_info in;
  struct stat st;
  bool json = false;
  char err[512];
  int c;

  while ((c = getopt_long (argc, argv, "hf:", longopts, NULL)) != -1)
    if (c == 'h') {
      fputs (usage_text, stdout);
      return 0;
    } else if (c == 'O' && (!strcmp (optarg, "json")
                            || !strcmp (optarg, "human")))
      json = !strcmp (optarg, "json");
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
  if (qcow2_read_info (argv[optind], &in, err, sizeof err) < 0) {
    img_error ("info: %s: %s", argv[optind], err);
    return 1;
  }
  /* Blocks the file holds, as du counts them. */
  if (stat (argv[optind], &st) < 0)
    st.st_blocks = 0;
  if (json)
    print_json (argv[optind], &in, (uint64_t) st.st_blocks * 512);
  else
    print_human (argv[optind], &in, (uint64_t) st.st_blocks * 512);
  qcow2_info_free (&in);
  return 0;
}
