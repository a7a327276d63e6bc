/* server/log.c: the daemon's messages, one line each on stderr, prefixed
 * "qnbd: ", filtered by verbosity, non-printable bytes escaped; and the
 * engine's log hook.
 */
#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <errno.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <syslog.h>

#include "internal.h"

int log_verbosity = 0;
bool log_engine_quiet = false;

/* Levels, lowest = most important. */
enum log_level {
  LEVEL_ERROR,                  /* always printed */
  LEVEL_WARNING,                /* always printed */
  LEVEL_INFO,                   /* with -v */
  LEVEL_DEBUG,                  /* with -vv */
};

static bool
enabled (enum log_level level)
{
  switch (level) {
  case LEVEL_ERROR:
  case LEVEL_WARNING:
    return true;
  case LEVEL_INFO:
    return log_verbosity >= 1;
  case LEVEL_DEBUG:
    return log_verbosity >= 2;
  }
  return true;
}

/* Copy src to dst (of size n), with every byte that is not printable
 * ASCII written as \xNN and a backslash as \\: messages carry strings from
 * clients (export names, option data) and images (file names), and a raw
 * newline or terminal escape would let them forge log lines or drive the
 * terminal reading the log.
 */
static void
escape (char *dst, size_t n, const char *src)
{
  static const char hex[] = "0123456789abcdef";
  size_t o = 0;

  for (const unsigned char *p = (const unsigned char *) src; *p; p++) {
    bool plain = *p >= 0x20 && *p < 0x7f && *p != '\\';
    size_t need = plain ? 1 : *p == '\\' ? 2 : 4;

    if (o + need >= n)
      break;
    if (plain)
      dst[o++] = *p;
    else if (*p == '\\') {
      dst[o++] = '\\';
      dst[o++] = '\\';
    }
    else {
      dst[o++] = '\\';
      dst[o++] = 'x';
      dst[o++] = hex[*p >> 4];
      dst[o++] = hex[*p & 15];
    }
  }
  dst[o] = '\0';
}

/* Format the whole line first and write it with one call, so that lines
 * are never interleaved with another process's output on the same stderr.
 * errno is kept for the caller, and for "%m".
 */
static void
vlog (enum log_level level, const char *fmt, va_list args)
{
  int saved_errno = errno;
  char line[1024], out[4 * sizeof line];
  int n;

  if (!enabled (level)) {
    errno = saved_errno;
    return;
  }

  n = snprintf (line, sizeof line, "qnbd: %s",
                level == LEVEL_WARNING ? "warning: " : "");
  if (n < 0)
    n = 0;
  if ((size_t) n < sizeof line) {
    errno = saved_errno;
    vsnprintf (line + n, sizeof line - n, fmt, args);
  }
  escape (out, sizeof out, line);
  fprintf (stderr, "%s\n", out);
  fflush (stderr);
  errno = saved_errno;
}

void
log_error (const char *fmt, ...)
{
  va_list args;

  va_start (args, fmt);
  vlog (LEVEL_ERROR, fmt, args);
  va_end (args);
}

void
log_warning (const char *fmt, ...)
{
  va_list args;

  va_start (args, fmt);
  vlog (LEVEL_WARNING, fmt, args);
  va_end (args);
}

void
log_info (const char *fmt, ...)
{
  va_list args;

  va_start (args, fmt);
  vlog (LEVEL_INFO, fmt, args);
  va_end (args);
}

void
log_debug (const char *fmt, ...)
{
  va_list args;

  va_start (args, fmt);
  vlog (LEVEL_DEBUG, fmt, args);
  va_end (args);
}

/* The engine reports with syslog levels. */
void
log_engine (void *opaque, int level, const char *msg)
{
  const char *name = opaque;    /* the image path, or NULL */

  if (log_engine_quiet)
    level = LOG_DEBUG;

  switch (level) {
  case LOG_EMERG:
  case LOG_ALERT:
  case LOG_CRIT:
  case LOG_ERR:
    log_error ("%s%s%s", name ? name : "", name ? ": " : "", msg);
    break;
  case LOG_WARNING:
    log_warning ("%s%s%s", name ? name : "", name ? ": " : "", msg);
    break;
  case LOG_NOTICE:
  case LOG_INFO:
    log_info ("%s%s%s", name ? name : "", name ? ": " : "", msg);
    break;
  default:
    log_debug ("%s%s%s", name ? name : "", name ? ": " : "", msg);
    break;
  }
}
