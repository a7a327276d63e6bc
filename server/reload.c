/* server/reload.c: a new configuration applied to the running exports.
 *
 * main.c reads the -C file again on SIGHUP and, only once all of it has
 * parsed and passed its checks, hands the exports it describes here; the
 * exports are then compared by name with those in force:
 *
 *  - a new name is opened and added (an image that fails to open is
 *    reported and skipped: the others still apply);
 *  - a name that is gone is retired: not listed, not found, while the
 *    clients attached to it go on; it is closed (flushed, marked clean)
 *    when the last of them leaves;
 *  - a change of the keys that need no reopen (sig_live) makes a new
 *    export over the same open image (export_update): new connections get
 *    the new settings, those attached keep the export they negotiated;
 *  - a change of the keys that do (sig_open) retires the export and opens
 *    the image again once no export uses the old open image: the image is
 *    locked, and two engines must never write one file.  Until then the
 *    name is pending: not served to new clients.
 *
 * A retired export loses its last client inside a connection's free,
 * which may run inside its own engine's completion callbacks: the removal
 * is done later, from the loop (sweep_timer).
 */
#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <assert.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

/* The configuration in force (the exports open or pending), by name. */
struct known {
  char *name;
  char *sig_open, *sig_live;
};
static struct known *known;
static size_t n_known;

/* A name waiting for the image q (of its previous settings) to close
 * before it is opened with spec.
 */
struct pending {
  struct pending *next;
  struct qcow2 *q;
  struct reload_export spec;    /* strings owned by main.c */
};
static struct pending *pendings;

static void (*made_hook) (struct export *e, void *opaque);

static ev_timer sweep_timer;
static bool sweep_ready;        /* sweep_timer initialised */

/* The export called name that new clients get (not retired), or NULL. */
static struct export *
current (const char *name)
{
  for (struct export *e = export_first (); e; e = e->next)
    if (!e->retired && strcmp (e->name, name) == 0)
      return e;
  return NULL;
}

static struct pending **
find_pending (const char *name)
{
  struct pending **p;

  for (p = &pendings; *p; p = &(*p)->next)
    if (strcmp ((*p)->spec.name, name) == 0)
      return p;
  return NULL;
}

static struct known *
find_known (const char *name)
{
  for (size_t i = 0; i < n_known; i++)
    if (strcmp (known[i].name, name) == 0)
      return &known[i];
  return NULL;
}

static bool
image_in_use (const struct qcow2 *q)
{
  for (struct export *e = export_first (); e; e = e->next)
    if (e->q == q)
      return true;
  return false;
}

/* Open x and serve it.  Returns 0 or -1 (export_add said why). */
static int
open_export (const struct reload_export *x)
{
  struct export *e;

  if (export_add (x->name, x->description, x->image, x->opts,
                  x->discard) < 0) {
    log_error ("reload: export '%s' (%s) skipped", x->name, x->image);
    return -1;
  }
  for (e = export_first (); e->next; e = e->next)
    ;
  if (made_hook)
    made_hook (e, x->opaque);
  loop_watch_export (e);
  return 0;
}

/* Remove the retired exports that have no client left, then open the
 * names that waited for their images to close.
 */
static void
sweep (void)
{
  struct export *e, *next;
  struct pending **p, *ready = NULL, **ready_tail = &ready;
  bool changed = false;

  for (e = export_first (); e; e = next) {
    next = e->next;
    if (!e->retired || e->clients > 0)
      continue;
    loop_unwatch_export (e);
    conn_forget_export (e);
    export_remove (e);
  }
  /* All decided before any open: a new image may get a closed one's
   * address.
   */
  for (p = &pendings; *p; ) {
    struct pending *x = *p;

    if (image_in_use (x->q)) {
      p = &x->next;
      continue;
    }
    *p = x->next;
    x->next = NULL;
    *ready_tail = x;
    ready_tail = &x->next;
  }
  while (ready) {
    struct pending *x = ready;

    ready = x->next;
    if (open_export (&x->spec) == 0)
      log_info ("reload: export '%s' reopened (%s)", x->spec.name,
                x->spec.image);
    changed = true;
    free (x);
  }
  if (changed)
    notify_status_changed ();
}

static void
sweep_cb (struct ev_loop *lp, ev_timer *w, int revents)
{
  (void) lp; (void) w; (void) revents;
  sweep ();
}

/* export.c: a retired export lost its last client. */
static void
export_idle (struct export *e)
{
  assert (e->retired && e->clients == 0);
  if (!ev_is_active (&sweep_timer))
    ev_timer_start (loop_get (), &sweep_timer);
}

/* Retire e; closed now if nobody uses it, else when the last one leaves. */
static void
retire (struct export *e, const char *why)
{
  export_retire (e);
  if (e->clients)
    log_info ("reload: export '%s' %s: %u client%s still attached, "
              "closed when %s", e->name, why, e->clients,
              e->clients == 1 ? "" : "s", e->clients == 1 ? "it leaves"
              : "they leave");
  else
    log_info ("reload: export '%s' %s", e->name, why);
}

/* The keys that need a reopen changed: reopen e with x once no export
 * uses its image.
 */
static void
reopen (struct export *e, const struct reload_export *x)
{
  struct pending *p = calloc (1, sizeof *p);
  unsigned users = 0;

  if (p == NULL) {
    log_error ("reload: export '%s': %m", x->name);
    return;
  }
  for (struct export *y = export_first (); y; y = y->next)
    if (y->q == e->q)
      users += y->clients;
  p->q = e->q;
  p->spec = *x;
  p->next = pendings;
  pendings = p;
  export_retire (e);
  if (users)
    log_info ("reload: export '%s' changed: reopened (%s) when its %u "
              "client%s %s left; until then new clients do not get it",
              x->name, x->image, users, users == 1 ? "" : "s",
              users == 1 ? "has" : "have");
}

/* Apply one export of the new configuration. */
static void
apply_one (const struct reload_export *x)
{
  struct known *k = find_known (x->name);
  struct export *e = current (x->name);
  struct pending **p = find_pending (x->name);

  if (e == NULL && p == NULL) {
    if (open_export (x) == 0)
      log_info ("reload: export '%s' added (%s)", x->name, x->image);
    return;
  }
  if (k && strcmp (k->sig_open, x->sig_open) == 0 &&
      strcmp (k->sig_live, x->sig_live) == 0)
    return;                     /* untouched */
  if (p) {
    (*p)->spec = *x;            /* still waiting: opened as it now says */
    return;
  }
  if (k == NULL || strcmp (k->sig_open, x->sig_open) != 0) {
    reopen (e, x);
    return;
  }
  struct export *e2 = export_update (e, x->description, x->discard);
  if (e2 == NULL)
    return;                     /* logged; the old settings stay */
  if (made_hook)
    made_hook (e2, x->opaque);
  loop_watch_export (e2);
  log_info ("reload: export '%s': new settings for new connections%s",
            x->name, e->clients ? " (those attached keep theirs)" : "");
}

static void
free_known (void)
{
  for (size_t i = 0; i < n_known; i++) {
    free (known[i].name);
    free (known[i].sig_open);
    free (known[i].sig_live);
  }
  free (known);
  known = NULL;
  n_known = 0;
}

/* Remember xs[0..n) as the configuration in force.  Returns 0 or -1. */
static int
remember (const struct reload_export *xs, size_t n)
{
  struct known *k = calloc (n ? n : 1, sizeof *k);

  if (k == NULL)
    return -1;
  free_known ();
  known = k;
  for (size_t i = 0; i < n; i++) {
    k[i].name = strdup (xs[i].name);
    k[i].sig_open = strdup (xs[i].sig_open);
    k[i].sig_live = strdup (xs[i].sig_live);
    n_known++;
    if (!k[i].name || !k[i].sig_open || !k[i].sig_live)
      return -1;
  }
  return 0;
}

int
reload_init (const struct reload_export *xs, size_t n,
             void (*made) (struct export *e, void *opaque))
{
  made_hook = made;
  ev_timer_init (&sweep_timer, sweep_cb, 0., 0.);
  sweep_ready = true;
  export_set_idle_hook (export_idle);
  if (remember (xs, n) < 0) {
    log_error ("reload: %m");
    return -1;
  }
  return 0;
}

void
reload_apply (const struct reload_export *xs, size_t n)
{
  size_t i, j;

  assert (sweep_ready);
  /* Names gone from the file. */
  for (i = 0; i < n_known; i++) {
    struct export *e;
    struct pending **p, *x;

    for (j = 0; j < n && strcmp (xs[j].name, known[i].name) != 0; j++)
      ;
    if (j < n)
      continue;
    if ((p = find_pending (known[i].name)) != NULL) {
      x = *p;
      *p = x->next;
      free (x);
    }
    if ((e = current (known[i].name)) != NULL)
      retire (e, "removed");
  }
  for (j = 0; j < n; j++)
    apply_one (&xs[j]);
  sweep ();
  if (remember (xs, n) < 0)
    /* The next reload then sees every export as changed: no harm. */
    log_error ("reload: %m");
}

void
reload_cleanup (void)
{
  struct pending *p;

  if (sweep_ready && ev_is_active (&sweep_timer))
    ev_timer_stop (loop_get (), &sweep_timer);
  while ((p = pendings) != NULL) {
    pendings = p->next;
    free (p);
  }
  free_known ();
}
