/* tools/progress.c: -p, a progress figure on stderr, qemu-img's
 * "    (42.00/100%)" redrawn in place, only when stderr is a terminal.
 */
#include <config.h>

#include <stdio.h>
#include <unistd.h>

#include "qnbd-img.h"

void
progress_start (struct progress *p, bool wanted)
{
  p->on = wanted && isatty (STDERR_FILENO);
  p->shown = -1;
  if (p->on)
    progress_update (p, 0, 1);
}

void
progress_update (void *opaque, uint64_t done, uint64_t total)
{
  struct progress *p = opaque;
  /* Hundredths of a percent: redrawn only when the figure changes. */
  int now = total ? (int) ((double) done / (double) total * 10000) : 0;

  if (!p->on || now == p->shown)
    return;
  p->shown = now;
  fprintf (stderr, "    (%.2f/100%%)\r", now / 100.0);
  fflush (stderr);
}

void
progress_end (struct progress *p)
{
  if (!p->on)
    return;
  progress_update (p, 1, 1);
  fputc ('\n', stderr);
  p->on = false;
}
