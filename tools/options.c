/* tools/options.c: values on qnbd-img's command lines, as qemu-img
 * spells them, and its error messages.
 */
#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qnbd-img.h"

int
parse_size (const char *s, uint64_t *out)
{
  static const char units[] = "bkmgtpe";
  const char *u;
  char *end;
  uint64_t v;
  unsigned shift = 0;

  if (*s < '0' || *s > '9')
    return -EINVAL;
  errno = 0;
  v = strtoull (s, &end, 10);
  if (errno)
    return -EINVAL;
  if (*end) {
    char c = *end >= 'A' && *end <= 'Z' ? (char) (*end - 'A' + 'a') : *end;
    u = strchr (units, c);
    if (!u || !c)
      return -EINVAL;
    shift = (unsigned) (u - units) * 10;
    end++;
    /* "64KB", "1GB" as well as "64K". */
    if (shift && (*end == 'b' || *end == 'B'))
      end++;
    if (*end)
      return -EINVAL;
  }
  if (shift && v > (UINT64_MAX >> shift))
    return -EINVAL;
  *out = v << shift;
  return 0;
}

int
parse_bool (const char *s, bool *out)
{
  if (!strcmp (s, "on") || !strcmp (s, "yes") || !strcmp (s, "true"))
    *out = true;
  else if (!strcmp (s, "off") || !strcmp (s, "no") || !strcmp (s, "false"))
    *out = false;
  else
    return -EINVAL;
  return 0;
}

void
img_error (const char *fmt, ...)
{
  va_list ap;

  fputs ("qnbd-img: ", stderr);
  va_start (ap, fmt);
  vfprintf (stderr, fmt, ap);
  va_end (ap);
  fputc ('\n', stderr);
}

void
img_json_string (FILE *f, const char *s)
{
  fputc ('"', f);
  for (const unsigned char *p = (const unsigned char *) s; *p; p++)
    if (*p == '"' || *p == '\\')
      fprintf (f, "\\%c", *p);
    else if (*p < 0x20)
      fprintf (f, "\\u%04x", *p);
    else
      fputc (*p, f);
  fputc ('"', f);
}
