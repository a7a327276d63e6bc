/* server/config.c: reading the configuration file (qnbd -C FILE).
 *
 * The file is INI, read by libinih: a [server] section and one
 * [export NAME] section per export.  This file knows the sections, not
 * the keys: each key goes to the caller (main.c), which validates it
 * exactly as the command-line option of the same name.  Every message
 * names the file and the line ("qnbd.conf:7: ...").
 *
 * libinih reports neither where a section starts nor sections without
 * keys, so the line reader given to it notes the section headers itself;
 * libinih parses the keys.  The file is read twice: once for syntax,
 * because libinih goes on past a bad line and would hand us the keys
 * after it before we learnt of it, then for the keys.
 */
#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <assert.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <ini.h>

#include "internal.h"

/* "path:line" */
#define WHERE_MAX (PATH_MAX + 16)

struct reader {
  const char *path;
  FILE *fp;
  const struct config_ops *ops;         /* NULL on the syntax pass */
  void *opaque;
  unsigned line;                        /* of the line last read */
  char where[WHERE_MAX];           /* "path:line" of that line */
  char section_where[WHERE_MAX];   /* "path:line" of its header */
  char section[INI_MAX_LINE];           /* as libinih names it */
  char name[INI_MAX_LINE];              /* the export's, from section */
  bool in_section;
  char **names;                         /* the export names seen */
  size_t n_names;
  bool failed;
};

static int
fail (struct reader *r, const char *fmt, const char *arg)
{
  log_error ("%s: %s%s%s", r->where, fmt, arg ? arg : "", arg ? "]" : "");
  r->failed = true;
  return -1;
}

/* The section [text] starts on the current line. */
static int
section_start (struct reader *r, const char *text, size_t len)
{
  const char *name = NULL;
  char **names;
  size_t i;

  if (len >= sizeof r->section)
    return fail (r, "section name too long", NULL);
  memcpy (r->section, text, len);
  r->section[len] = '\0';
  strcpy (r->section_where, r->where);
  r->in_section = true;

  if (strcmp (r->section, "server") == 0) {
    for (i = 0; i < r->n_names; i++)
      if (r->names[i] == NULL)
        return fail (r, "duplicate section [", "server");
  }
  else if (strncmp (r->section, "export", 6) == 0 &&
           (r->section[6] == ' ' || r->section[6] == '\t')) {
    /* Blanks around the name are not part of it. */
    for (text = r->section + 6; *text == ' ' || *text == '\t'; text++)
      ;
    len = strlen (text);
    while (len && (text[len - 1] == ' ' || text[len - 1] == '\t'))
      len--;
    memcpy (r->name, text, len);
    r->name[len] = '\0';
    name = r->name;
    for (i = 0; i < r->n_names; i++)
      if (r->names[i] && strcmp (r->names[i], name) == 0)
        return fail (r, "duplicate section [", r->section);
  }
  else
    return fail (r, "unknown section [", r->section);

  /* NULL stands for [server]. */
  names = realloc (r->names, (r->n_names + 1) * sizeof *r->names);
  if (names == NULL)
    return fail (r, "out of memory", NULL);
  r->names = names;
  r->names[r->n_names] = NULL;
  if (name && (r->names[r->n_names] = strdup (name)) == NULL)
    return fail (r, "out of memory", NULL);
  r->n_names++;

  if (r->ops && r->ops->section (r->opaque, r->where, name) < 0) {
    r->failed = true;
    return -1;
  }
  return 0;
}

static int
section_end (struct reader *r)
{
  if (!r->in_section)
    return 0;
  r->in_section = false;
  if (r->ops && r->ops->end (r->opaque, r->section_where) < 0) {
    r->failed = true;
    return -1;
  }
  return 0;
}

/* libinih's line reader: one whole line, noting section headers. */
static char *
read_line (char *buf, int size, void *stream)
{
  struct reader *r = stream;
  const char *s, *close;
  size_t len;

  if (r->failed || fgets (buf, size, r->fp) == NULL)
    return NULL;
  r->line++;
  snprintf (r->where, sizeof r->where, "%s:%u", r->path, r->line);
  len = strlen (buf);
  if (len == (size_t) size - 1 && buf[len - 1] != '\n' && !feof (r->fp)) {
    log_error ("%s: line longer than %d bytes", r->where, size - 2);
    r->failed = true;
    return NULL;
  }

  /* As libinih sees a header: '[' first, after blanks. */
  for (s = buf; *s == ' ' || *s == '\t'; s++)
    ;
  if (*s == '[') {
    close = strchr (s, ']');
    if (close == NULL)
      return buf;               /* libinih calls it a syntax error */
    if (section_end (r) < 0 || section_start (r, s + 1, close - s - 1) < 0)
      return NULL;
  }
  return buf;
}

static int
syntax_pass (void *user, const char *section, const char *key,
             const char *value)
{
  (void) user; (void) section; (void) key; (void) value;
  return 1;
}

static int
key_pass (void *user, const char *section, const char *key,
          const char *value)
{
  struct reader *r = user;

  if (r->failed)
    return 1;                   /* reported already */
  if (!r->in_section) {
    fail (r, "key outside a section", NULL);
    return 1;
  }
  /* Both of us read the same header (libinih keeps its first 49 bytes). */
  assert (strncmp (section, r->section, strlen (section)) == 0);
  if (r->ops->key (r->opaque, r->where, key, value) < 0)
    r->failed = true;
  return 1;
}

/* One pass over the file; ops NULL: the syntax pass. */
static int
pass (struct reader *r, const struct config_ops *ops)
{
  int line;

  rewind (r->fp);
  r->ops = ops;
  r->line = 0;
  r->in_section = false;
  r->failed = false;
  for (size_t i = 0; i < r->n_names; i++)
    free (r->names[i]);
  free (r->names);
  r->names = NULL;
  r->n_names = 0;

  line = ini_parse_stream (read_line, r, ops ? key_pass : syntax_pass, r);
  if (r->failed)
    return -1;
  if (line > 0) {
    log_error ("%s:%d: not a section header, 'key = value' or a comment",
               r->path, line);
    return -1;
  }
  if (line < 0 || ferror (r->fp)) {
    log_error ("%s: %m", r->path);
    return -1;
  }
  return section_end (r);
}

int
config_read (const char *path, const struct config_ops *ops, void *opaque)
{
  struct reader r = { .path = path, .opaque = opaque };
  int ret;

  snprintf (r.where, sizeof r.where, "%s", path);
  r.fp = fopen (path, "re");
  if (r.fp == NULL) {
    log_error ("%s: %m", path);
    return -1;
  }
  ret = pass (&r, NULL);
  if (ret == 0)
    ret = pass (&r, ops);
  for (size_t i = 0; i < r.n_names; i++)
    free (r.names[i]);
  free (r.names);
  fclose (r.fp);
  return ret;
}
