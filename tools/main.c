/* tools/main.c: qnbd-img, the image tool on the engine of qnbd: the
 * command line's first word picks a subcommand (one file each).
 */
#include <config.h>

#include <stdio.h>
#include <string.h>

#include "qnbd-img.h"

static const struct {
  const char *name;
  int (*run) (int argc, char **argv);
  const char *usage;
} commands[] = {
  { "create", cmd_create, "create [-q] [-p] [-f qcow2] [-o OPTIONS] "
    "[-b BACKING -F FMT] FILE [SIZE]" },
  { "info", cmd_info, "info [--output=human|json] [--backing-chain] [-U] "
    "FILE" },
  /* map: allocation per range (tools/map.c). */
  { "map", cmd_map, "map [-f qcow2|raw] [--output=human|json] "
    "[--start-offset=N] [--max-length=N] [-U] FILE" },
  /* check: tools/check.c */
  { "check", cmd_check, "check [-q] [-p] [-U] [-f qcow2] [-r leaks|all] "
    "[--output=human|json] FILE" },
};

static void
usage (FILE *f)
{
  fprintf (f, "Usage: qnbd-img COMMAND [ARGS...]\n\nCommands:\n");
  for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
    fprintf (f, "  qnbd-img %s\n", commands[i].usage);
  fprintf (f, "\nqnbd-img COMMAND --help describes a command; see also "
           "qnbd-img(1).\n");
}

int
main (int argc, char **argv)
{
  if (argc < 2) {
    usage (stderr);
    return 1;
  }
  if (!strcmp (argv[1], "--help") || !strcmp (argv[1], "-h")) {
    usage (stdout);
    return 0;
  }
  if (!strcmp (argv[1], "--version") || !strcmp (argv[1], "-V")) {
    printf ("qnbd-img %s\n", PACKAGE_VERSION);
    return 0;
  }
  for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
    if (!strcmp (argv[1], commands[i].name))
      return commands[i].run (argc - 1, argv + 1);
  img_error ("unknown command '%s' (qnbd-img --help lists them)", argv[1]);
  return 1;
}
