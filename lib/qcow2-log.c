/* lib/qcow2-log.c: the engine's one way to tell a person something:
 * through the log callback the caller gave (none: silent).
 */
#include <config.h>

#include <stdarg.h>
#include <stdio.h>

#include "qcow2-internal.h"

void
qlog (struct qcow2 *q, int level, const char *fmt, ...)
{
  char msg[512];
  va_list ap;

  if (!q->log)
    return;
  va_start (ap, fmt);
  vsnprintf (msg, sizeof msg, fmt, ap);
  va_end (ap);
  q->log (q->log_opaque, level, msg);
}
