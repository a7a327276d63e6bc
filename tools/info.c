/* tools/info.c: qnbd-img info (not written yet). */
#include <config.h>

#include "qnbd-img.h"

int
cmd_info (int argc, char **argv)
{
  (void) argc;
  (void) argv;
  error ("info: not implemented yet");
  return 1;
}
