/* tools/create.c: qnbd-img create, with qemu-img's command line and -o
 * options; the image itself is laid out by the engine (qcow2_create).
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

static const char usage_text[] =
  "Usage: qnbd-img create [-q] [-p] [-f qcow2] [-o OPTIONS] "
  "[-b BACKING -F FMT] FILE [SIZE]\n"
  "OPTIONS, comma separated: cluster_size=SIZE, compat=0.10|1.1,\n"
  "  refcount_bits=1..64, lazy_refcounts=on|off, extended_l2=on|off,\n"
  "  compression_type=zlib|zstd, data_file=NAME, data_file_raw=on|off,\n"
  "  backing_file=NAME, backing_fmt=qcow2|raw, size=SIZE,\n"
  "  preallocation=off|metadata|falloc|full\n"
  "SIZE: bytes, or with a suffix K, M, G, T (powers of 1024).\n";

static int
bad (const char *key, const char *val)
{
  img_error ("create: invalid value '%s' for option %s", val, key);
  return -EINVAL;
}

static int
set_prealloc (struct qcow2_create_opts *o, const char *val)
{
  static const char *const names[] = { "off", "metadata", "falloc", "full" };
  for (int i = 0; i < 4; i++)
    if (!strcmp (val, names[i])) {
      o->prealloc = (enum qcow2_prealloc) i;
      return 0;
    }
  return bad ("preallocation", val);
}

/* One key=value of -o. */
static int
set_option (struct qcow2_create_opts *o, const char *key, const char *val)
{
  uint64_t n;

  if (!strcmp (key, "size"))
    return parse_size (val, &o->size) < 0 ? bad (key, val) : 0;
  if (!strcmp (key, "cluster_size")) {
    if (parse_size (val, &n) < 0 || n > UINT32_MAX)
      return bad (key, val);
    o->cluster_size = (uint32_t) n;
  } else if (!strcmp (key, "compat")) {
    if (!strcmp (val, "0.10") || !strcmp (val, "v2"))
      o->version = 2;
    else if (!strcmp (val, "1.1") || !strcmp (val, "v3"))
      o->version = 3;
    else
      return bad (key, val);
  } else if (!strcmp (key, "refcount_bits")) {
    if (parse_size (val, &n) < 0 || n == 0 || n > 64)
      return bad (key, val);
    o->refcount_bits = (unsigned) n;
  } else if (!strcmp (key, "lazy_refcounts"))
    return parse_bool (val, &o->lazy_refcounts) < 0 ? bad (key, val) : 0;
  else if (!strcmp (key, "extended_l2"))
    return parse_bool (val, &o->extended_l2) < 0 ? bad (key, val) : 0;
  else if (!strcmp (key, "data_file_raw"))
    return parse_bool (val, &o->data_file_raw) < 0 ? bad (key, val) : 0;
  else if (!strcmp (key, "compression_type")) {
    if (strcmp (val, "zlib") && strcmp (val, "zstd"))
      return bad (key, val);
    o->compression_type = !strcmp (val, "zstd");
  } else if (!strcmp (key, "data_file"))
    o->data_file = *val ? val : NULL;
  else if (!strcmp (key, "backing_file"))
    o->backing_file = *val ? val : NULL;
  else if (!strcmp (key, "backing_fmt"))
    o->backing_fmt = val;
  else if (!strcmp (key, "preallocation"))
    return set_prealloc (o, val);
  else {
    img_error ("create: unknown option '%s' (qnbd-img create --help)", key);
    return -EINVAL;
  }
  return 0;
}

/* A -o argument: key=value[,key=value...], split in place. */
static int
parse_o (struct qcow2_create_opts *o, char *arg)
{
  for (char *save = NULL, *kv = strtok_r (arg, ",", &save); kv;
       kv = strtok_r (NULL, ",", &save)) {
    char *eq = strchr (kv, '=');
    if (!eq) {
      img_error ("create: option '%s' has no value (KEY=VALUE)", kv);
      return -EINVAL;
    }
    *eq = '\0';
    if (set_option (o, kv, eq + 1) < 0)
      return -EINVAL;
  }
  return 0;
}

static int
parse_args (int argc, char **argv, struct qcow2_create_opts *o, bool *prog)
{
  static const struct option longopts[] = {
    { "help", no_argument, NULL, 'h' },
    { NULL, 0, NULL, 0 },
  };
  int c;

  while ((c = getopt_long (argc, argv, "hqpf:o:b:F:", longopts, NULL)) != -1)
    switch (c) {
    case 'p':
      *prog = true;
      break;
    case 'q':
      /* qemu-img's "quiet": qnbd-img create says nothing when it works. */
      break;
    case 'h':
      fputs (usage_text, stdout);
      exit (0);
    case 'f':
      if (strcmp (optarg, "qcow2")) {
        img_error ("create: format '%s': only qcow2 is created", optarg);
        return -EINVAL;
      }
      break;
    case 'o':
      if (parse_o (o, optarg) < 0)
        return -EINVAL;
      break;
    case 'b':
      o->backing_file = optarg;
      break;
    case 'F':
      o->backing_fmt = optarg;
      break;
    default:
      fputs (usage_text, stderr);
      return -EINVAL;
    }
  return 0;
}

int
cmd_create (int argc, char **argv)
{
  struct qcow2_create_opts o = { 0 };
  struct progress prog;
  bool want_progress = false;
  char err[512];
  const char *path;
  int r;

  if (parse_args (argc, argv, &o, &want_progress) < 0)
    return 1;
  if (optind >= argc || argc - optind > 2
      || (argc - optind == 1 && !o.size && !o.backing_file)) {
    fputs (usage_text, stderr);
    return 1;
  }
  path = argv[optind];
  if (argc - optind == 2 && parse_size (argv[optind + 1], &o.size) < 0) {
    img_error ("create: invalid size '%s'", argv[optind + 1]);
    return 1;
  }
  if (o.backing_file && !o.backing_fmt) {
    img_error ("create: a backing file needs its format (-F qcow2 or -F raw)");
    return 1;
  }
  /* Only the data's space takes long: falloc and full. */
  progress_start (&prog, want_progress && o.prealloc >= QCOW2_PREALLOC_FALLOC);
  o.progress = progress_update;
  o.progress_opaque = &prog;
  r = qcow2_create (path, &o, err, sizeof err);
  progress_end (&prog);
  if (r < 0) {
    img_error ("create: %s: %s", path, err);
    return 1;
  }
  return 0;
}
