/* tools/check.c: qnbd-img check, qemu-img check's command line, output
 * and exit codes; the image is checked (and repaired) by the engine
 * (qcow2_check).
 */
#include <config.h>

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2.h"
#include "qnbd-img.h"

/* qemu-img check's exit codes. */
#define EXIT_CLEAN       0
#define EXIT_INCOMPLETE  1      /* not checked: an error, or -r failed */
#define EXIT_CORRUPT     2
#define EXIT_LEAKS       3      /* leaks only */
#define EXIT_UNSUPPORTED 63     /* a format without checks (raw) */

static const char usage_text[] =
  "Usage: qnbd-img check [-q] [-p] [-U] [-f qcow2] [-r leaks|all] "
  "[--output=human|json] FILE\n"
  "  -r leaks   free leaked clusters\n"
  "  -r all     also rebuild the refcounts and repair what they imply\n"
  "  -U         check even while another process writes the image\n"
  "  -p         show progress on a terminal\n"
  "Exit status: 0 clean, 1 not checked, 2 corruptions, 3 leaks only, "
  "63 not a qcow2 image.\n";

struct check_args {
  struct qcow2_check_opts o;
  bool json, quiet, progress;
  const char *format;
  const char *path;
};

static int
parse_args (int argc, char **argv, struct check_args *a)
{
  static const struct option longopts[] = {
    { "help", no_argument, NULL, 'h' },
    { "output", required_argument, NULL, 'O' },
    { "force-share", no_argument, NULL, 'U' },
    { "repair", required_argument, NULL, 'r' },
    { NULL, 0, NULL, 0 },
  };
  int c;

  while ((c = getopt_long (argc, argv, "hqpUf:r:", longopts, NULL)) != -1)
    switch (c) {
    case 'h':
      fputs (usage_text, stdout);
      exit (0);
    case 'q':
      a->quiet = true;
      break;
    case 'p':
      a->progress = true;
      break;
    case 'U':
      a->o.force_share = true;
      break;
    case 'f':
      a->format = optarg;
      break;
    case 'r':
      if (!strcmp (optarg, "leaks"))
        a->o.fix = QCOW2_CHECK_FIX_LEAKS;
      else if (!strcmp (optarg, "all"))
        a->o.fix = QCOW2_CHECK_FIX_ALL;
      else {
        img_error ("check: invalid -r '%s' (leaks or all)", optarg);
        return -EINVAL;
      }
      break;
    case 'O':
      if (strcmp (optarg, "human") && strcmp (optarg, "json")) {
        img_error ("check: --output=%s: human or json", optarg);
        return -EINVAL;
      }
      a->json = !strcmp (optarg, "json");
      break;
    default:
      fputs (usage_text, stderr);
      return -EINVAL;
    }
  if (optind != argc - 1) {
    fputs (usage_text, stderr);
    return -EINVAL;
  }
  if (a->o.force_share && a->o.fix != QCOW2_CHECK_NO_FIX) {
    img_error ("check: -U (force share) cannot go with -r: a repair "
               "writes the image");
    return -EINVAL;
  }
  a->path = argv[optind];
  return 0;
}

/* Only fields that are not zero, as qemu-img prints them. */
static void
json_field (bool *first, const char *name, uint64_t v, bool always)
{
  if (!v && !always)
    return;
  printf ("%s\n    \"%s\": %" PRIu64, *first ? "" : ",", name, v);
  *first = false;
}

static void
print_json (const struct check_args *a, const struct qcow2_check_result *r)
{
  bool first = true;

  printf ("{");
  json_field (&first, "image-end-offset", r->image_end_offset, false);
  json_field (&first, "compressed-clusters", r->compressed_clusters, false);
  json_field (&first, "total-clusters", r->total_clusters, false);
  json_field (&first, "corruptions", r->corruptions, false);
  json_field (&first, "check-errors", r->check_errors, true);
  json_field (&first, "leaks", r->leaks, false);
  json_field (&first, "corruptions-fixed", r->corruptions_fixed, false);
  json_field (&first, "leaks-fixed", r->leaks_fixed, false);
  json_field (&first, "allocated-clusters", r->allocated_clusters, false);
  printf (",\n    \"filename\": ");
  img_json_string (stdout, a->path);
  printf (",\n    \"format\": \"qcow2\"");
  first = false;
  json_field (&first, "fragmented-clusters", r->fragmented_clusters, false);
  printf ("\n}\n");
}

static void
print_human (const struct qcow2_check_result *r)
{
  if (r->corruptions_fixed || r->leaks_fixed)
    printf ("The following inconsistencies were found and repaired:\n\n"
            "    %" PRIu64 " leaked clusters\n    %" PRIu64 " corruptions\n\n"
            "Double checking the fixed image now...\n", r->leaks_fixed,
            r->corruptions_fixed);
  if (!r->corruptions && !r->leaks && !r->check_errors)
    printf ("No errors were found on the image.\n");
  if (r->corruptions)
    printf ("\n%" PRIu64 " errors were found on the image.\nData may be "
            "corrupted, or further writes to the image may corrupt it.\n",
            r->corruptions);
  if (r->leaks)
    printf ("\n%" PRIu64 " leaked clusters were found on the image.\nThis "
            "means waste of disk space, but no harm to data.\n", r->leaks);
  if (r->check_errors)
    printf ("\n%" PRIu64 " internal errors have occurred during the "
            "check.\n", r->check_errors);
  if (r->total_clusters && r->allocated_clusters) {
    double alloc = (double) r->allocated_clusters;
    printf ("%" PRIu64 "/%" PRIu64 " = %0.2f%% allocated, %0.2f%% "
            "fragmented, %0.2f%% compressed clusters\n",
            r->allocated_clusters, r->total_clusters,
            alloc * 100 / (double) r->total_clusters,
            (double) r->fragmented_clusters * 100 / alloc,
            (double) r->compressed_clusters * 100 / alloc);
  }
  if (r->image_end_offset)
    printf ("Image end offset: %" PRIu64 "\n", r->image_end_offset);
}

/* Each inconsistency, on stderr as it is found (as qemu-img). */
static void
message (void *opaque, const char *msg)
{
  struct progress *p = opaque;

  if (p->on)
    fputs ("\r\033[K", stderr);
  fprintf (stderr, "%s\n", msg);
  p->shown = -1;
}

int
cmd_check (int argc, char **argv)
{
  struct check_args a = { 0 };
  struct qcow2_check_result res;
  struct progress prog;
  char err[512];
  int r;

  if (parse_args (argc, argv, &a) < 0)
    return EXIT_INCOMPLETE;
  if (a.format && strcmp (a.format, "qcow2")) {
    img_error ("check: format '%s' does not support checks", a.format);
    return EXIT_UNSUPPORTED;
  }
  progress_start (&prog, a.progress);
  a.o.message = message;
  a.o.progress = progress_update;
  a.o.opaque = &prog;
  r = qcow2_check (a.path, &a.o, &res, err, sizeof err);
  progress_end (&prog);
  if (r == -EMEDIUMTYPE) {
    img_error ("check: %s: %s, a format that does not support checks",
               a.path, err);
    return EXIT_UNSUPPORTED;
  }
  if (r < 0) {
    img_error ("check: %s: %s", a.path, err);
    return EXIT_INCOMPLETE;
  }
  if (a.json)
    print_json (&a, &res);
  else if (!a.quiet)
    print_human (&res);
  return res.check_errors ? EXIT_INCOMPLETE : res.corruptions ? EXIT_CORRUPT
    : res.leaks ? EXIT_LEAKS : EXIT_CLEAN;
}
