/* server/export.c: the exports, each a name and a description over one
 * open image.
 *
 * An image is opened once, whatever the number of connections to it: all
 * of them drive the same engine, which is what makes multi-conn safe (a
 * flush on one connection covers the writes completed on every other).
 * The command line gives one export, a configuration file several.
 */
#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <assert.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

static struct export *exports;          /* in creation order */
static struct export **exports_tail = &exports;

/* Told when a retired export has lost its last client (reload.c). */
static void (*idle_hook) (struct export *e);
/* Shared by the metadata caches of every export (--cache-size). */
static struct qcow2_cache_budget *cache_budget;
static uint64_t cache_size;

/* Whether the environment variable name is set to "0". */
static bool
env_is_zero (const char *name)
{
  const char *v = getenv (name);
  return v && strcmp (v, "0") == 0;
}

/* What to add to the message of an open that failed with r. */
static const char *
cache_budget_hint (int r)
{
  static char hint[80];

  if (r != -ENOBUFS || !cache_budget)
    return "";
  snprintf (hint, sizeof hint, "; the exports' cache-size (%" PRIu64
            " bytes) is too small", cache_size);
  return hint;
}

int
export_add (const char *name, const char *description, const char *path,
            const struct qcow2_opts *opts, bool discard)
{
  struct export *e;
  struct qcow2_opts o = *opts;
  char err[256] = "";
  int r;

  if (strlen (name) > NBD_MAX_STRING) {
    log_error ("export name is longer than %d bytes", NBD_MAX_STRING);
    return -1;
  }
  if (description && strlen (description) > NBD_MAX_STRING) {
    log_error ("description is longer than %d bytes", NBD_MAX_STRING);
    return -1;
  }
  for (e = exports; e; e = e->next) {
    if (!e->retired && strcmp (e->name, name) == 0) {
      log_error ("export name '%s' is used twice", name);
      return -1;
    }
  }

  e = calloc (1, sizeof *e);
  if (e == NULL ||
      (e->name = strdup (name)) == NULL ||
      (e->path = strdup (path)) == NULL ||
      (description && (e->description = strdup (description)) == NULL)) {
    log_error ("%s: %m", path);
    goto fail;
  }

  /* Switches for measurements and bug hunts (bench/README.md), read here:
   * the engine itself reads no environment.
   */
  o.whole_l2_tables = env_is_zero ("QNBD_L2_SLICES");
  o.no_inline_io = env_is_zero ("QNBD_AIO_INLINE");

  /* The engine's messages name the image. */
  o.log = log_engine;
  o.log_opaque = e->path;
  o.budget = cache_budget;

  /* An image that cannot be opened is reported in exactly one line: what
   * the engine logs on the way is only for -vv.
   */
  log_engine_quiet = true;
  r = qcow2_open (path, &o, &e->q, err, sizeof err);
  log_engine_quiet = false;
  if (r < 0) {
    /* Among several exports, say which one. */
    log_error ("%s: %s%s%s%s%s", path, err[0] ? err : strerror (-r),
               *name ? " (export '" : "", name, *name ? "')" : "",
               cache_budget_hint (r));
    goto fail;
  }
  e->read_only = opts->read_only || qcow2_read_only (e->q);
  e->discard = discard;
  e->q_owner = true;

  /* Probing is only safe for images that can never become qcow2 (see
   * export_write_ok); say what happened so that -f raw can be made
   * explicit.
   */
  if (opts->format == QCOW2_FORMAT_AUTO &&
      strcmp (qcow2_format_name (e->q), "raw") == 0) {
    e->probed_raw = true;
    log_warning ("%s: not a qcow2 image: serving it as raw (probed by "
                 "-f auto; use -f raw to say so)", path);
  }

  log_debug ("export '%s': %s, %" PRIu64 " bytes, cluster size %" PRIu32
             ", %s%s I/O", e->name, e->path, qcow2_size (e->q),
             qcow2_cluster_size (e->q), qcow2_aio_name (e->q),
             opts->direct ? " O_DIRECT" : "");

  *exports_tail = e;
  exports_tail = &e->next;
  return 0;

 fail:
  if (e) {
    free (e->name);
    free (e->path);
    free (e->description);
    free (e);
  }
  return -1;
}

struct export *
export_first (void)
{
  return exports;
}

struct export *
export_default (void)
{
  struct export *e;

  for (e = exports; e && e->retired; e = e->next)
    ;
  return e;
}

size_t
export_mem_held (void)
{
  size_t n = 0;

  for (struct export *e = exports; e; e = e->next)
    if (e->q_owner)
      n += qcow2_mem_held (e->q);
  return n;
}

struct export *
export_find (const char *name, size_t len)
{
  struct export *e;

  for (e = exports; e; e = e->next) {
    if (!e->retired && strlen (e->name) == len &&
        memcmp (e->name, name, len) == 0)
      return e;
  }
  /* "" is the default export (NBD protocol), which is the first one. */
  if (len == 0)
    return export_default ();
  return NULL;
}

uint16_t
export_eflags (const struct export *e)
{
  uint16_t flags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH |
    NBD_FLAG_SEND_FUA | NBD_FLAG_CAN_MULTI_CONN | NBD_FLAG_SEND_CACHE;

  if (e->read_only)
    flags |= NBD_FLAG_READ_ONLY;
  else
    /* TRIM is advertised with --discard=ignore too: it then succeeds
     * without doing anything, which the protocol allows.
     */
    flags |= NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES |
      NBD_FLAG_SEND_FAST_ZERO;
  return flags;
}

bool
export_write_ok (const struct export *e, uint64_t offset, const void *data,
                 size_t len)
{
  static const unsigned char qcow2_magic[4] = { 'Q', 'F', 'I', 0xfb };

  if (!e->probed_raw || offset >= sizeof qcow2_magic)
    return true;
  /* Bytes 0-3 written piecemeal could assemble the magic unseen. */
  if (offset != 0 || len < sizeof qcow2_magic)
    return false;
  return memcmp (data, qcow2_magic, sizeof qcow2_magic) != 0;
}

void
export_block_size (const struct export *e, uint32_t *minimum,
                   uint32_t *preferred, uint32_t *maximum)
{
  uint32_t cluster = qcow2_cluster_size (e->q);

  /* Smaller requests than the engine's alignment are refused by it. */
  *minimum = qcow2_min_align (e->q);
  if (*minimum < 1)
    *minimum = 1;

  /* A write of a whole cluster needs no copy-on-write: that is the size
   * at which I/O is efficient.  Clamp it to what clients expect of a
   * preferred size (a power of 2 of at least 512, well below the maximum
   * payload).
   */
  *preferred = cluster;
  if (*preferred < 4096)
    *preferred = 4096;
  if (*preferred > 2u * 1024 * 1024)
    *preferred = 2u * 1024 * 1024;
  if (*preferred < *minimum)
    *preferred = *minimum;

  *maximum = MAX_PAYLOAD;
}

int
export_close_all (void)
{
  struct export *e, *next;
  int ret = 0, r;

  for (e = exports; e; e = next) {
    next = e->next;
    /* An image shared by several exports (reload.c) closes once. */
    if (e->q && e->q_owner) {
      r = qcow2_close (e->q);
      if (r < 0) {
        log_error ("%s: closing the image: %s", e->path, strerror (-r));
        ret = -1;
      }
      else
        log_debug ("export '%s' closed", e->name);
    }
    access_free (e->access);
    free (e->name);
    free (e->description);
    free (e->path);
    free (e);
  }
  exports = NULL;
  exports_tail = &exports;
  return ret;
}

/* ------------------------------------------------------------------ */
/* Reload: exports retired, replaced, removed.                         */
/* ------------------------------------------------------------------ */

void
export_set_idle_hook (void (*hook) (struct export *e))
{
  idle_hook = hook;
}

void
export_attach (struct export *e)
{
  assert (!e->retired);
  e->clients++;
}

void
export_detach (struct export *e)
{
  assert (e->clients > 0);
  e->clients--;
  if (e->clients == 0 && e->retired && idle_hook)
    idle_hook (e);
}

void
export_retire (struct export *e)
{
  e->retired = true;
}

unsigned
export_count (void)
{
  unsigned n = 0;

  for (struct export *e = exports; e; e = e->next)
    n += !e->retired;
  return n;
}

struct export *
export_update (struct export *old, const char *description, bool discard)
{
  struct export *e;

  assert (!old->retired);
  if (description && strlen (description) > NBD_MAX_STRING) {
    log_error ("export '%s': description is longer than %d bytes",
               old->name, NBD_MAX_STRING);
    return NULL;
  }
  e = calloc (1, sizeof *e);
  if (e == NULL ||
      (e->name = strdup (old->name)) == NULL ||
      (e->path = strdup (old->path)) == NULL ||
      (description && (e->description = strdup (description)) == NULL)) {
    log_error ("export '%s': %m", old->name);
    goto fail;
  }
  e->q = old->q;
  e->read_only = old->read_only;
  e->probed_raw = old->probed_raw;
  e->discard = discard;
  /* The new one lives longer (the old one only serves those attached). */
  e->q_owner = old->q_owner;
  old->q_owner = false;

  /* Right after the old one: the default export stays first. */
  e->next = old->next;
  old->next = e;
  if (exports_tail == &old->next)
    exports_tail = &e->next;
  old->retired = true;
  return e;

 fail:
  if (e) {
    free (e->name);
    free (e->path);
    free (e);
  }
  return NULL;
}

int
export_remove (struct export *e)
{
  struct export **p, *x;
  int r = 0;

  assert (e->retired && e->clients == 0);
  for (p = &exports; *p != e; p = &(*p)->next)
    assert (*p != NULL);
  *p = e->next;
  if (exports_tail == &e->next)
    exports_tail = p;

  if (e->q_owner) {
    /* Another export still serves this image: it closes it later. */
    for (x = exports; x && x->q != e->q; x = x->next)
      ;
    if (x)
      x->q_owner = true;
    else if ((r = qcow2_close (e->q)) < 0)
      log_error ("%s: closing the image: %s", e->path, strerror (-r));
    else
      log_info ("export '%s' closed (%s)", e->name, e->path);
  }
  access_free (e->access);
  free (e->name);
  free (e->description);
  free (e->path);
  free (e);
  return r < 0 ? -1 : 0;
}

int
export_set_cache_size (uint64_t bytes)
{
  struct qcow2_cache_budget *b;

  /* Images keep the budget they were opened with. */
  if (cache_budget && qcow2_cache_budget_used (cache_budget) > 0) {
    log_error ("cache-size cannot change while exports are open");
    return -1;
  }
  b = qcow2_cache_budget_new (bytes);
  if (!b) {
    log_error ("cache-size: %m");
    return -1;
  }
  qcow2_cache_budget_free (cache_budget);
  cache_budget = b;
  cache_size = bytes;
  return 0;
}

void
export_free_cache_budget (void)
{
  qcow2_cache_budget_free (cache_budget);
  cache_budget = NULL;
}
