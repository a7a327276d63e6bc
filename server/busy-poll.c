/* server/busy-poll.c: poll without sleeping for a moment after work, when
 * the next request has been coming within that moment (the moment's
 * policy: poll-window.c).
 *
 * Why: a loop that sleeps in epoll_wait as soon as it has answered makes
 * its client wake it for the next request.  In this kind of VM that
 * wake-up (an IPI to a halted vCPU) costs the client more than the
 * request costs us: with one connection at queue depth 32 the client was
 * the bottleneck, and every time we answered fast enough to fall asleep
 * it lost 8-15% of its IOPS (docs/architecture.md, "Busy polling").  At
 * queue depth 1 the round trip itself is the wake-ups on both sides.
 *
 * How: while the loop "spins" an ev_idle watcher is active, so libev
 * polls with a zero timeout.  How long it spins after work adapts to the
 * gaps between work and the next event (poll-window.c): an idle daemon,
 * or one whose clients pause for longer than the maximum, never spins;
 * one whose clients keep it busy spins at most the window after each
 * iteration.
 *
 * This file is the libev side: an ev_prepare that decides before each
 * poll, an ev_check that times what the poll brought, and the ev_idle.
 */
#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <assert.h>
#include <stdbool.h>
#include <time.h>

#include "internal.h"

static struct ev_loop *bp_loop;
static struct poll_window policy;
static ev_prepare before_poll;
static ev_check after_poll;
static ev_idle spinning;        /* active: the next poll does not block */
static bool spun;               /* the poll about to run, or just run, did
                                   not block */
static bool (*probe) (void);    /* reads a lone client's socket */
static unsigned long probe_hits;

/* Probes per poll while spinning: an event only the poll reports (another
 * socket, the engine's eventfd, a signal) waits for at most this many
 * system calls more.
 */
#define PROBES_PER_POLL 4

/* libev's time is the wall clock, which can jump. */
static double
monotonic_now (void)
{
  struct timespec ts;

  clock_gettime (CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Nothing came from the zero-timeout poll: ask the probe. */
static void
spinning_cb (struct ev_loop *l, ev_idle *w, int revents)
{
  (void) l; (void) w; (void) revents;
  if (!probe)
    return;
  for (int i = 0; i < PROBES_PER_POLL; i++)
    if (probe ()) {
      probe_hits++;
      poll_window_event (&policy, monotonic_now (), true);
      return;
    }
}

void
busy_poll_set_probe (bool (*fn) (void))
{
  probe = fn;
}

static void
before_poll_cb (struct ev_loop *l, ev_prepare *w, int revents)
{
  (void) w; (void) revents;
  /* Timed even with a window of 0: a short gap is what opens one. */
  spun = poll_window_should_spin (&policy, monotonic_now ());
  if (spun && !ev_is_active (&spinning))
    ev_idle_start (l, &spinning);
  else if (!spun && ev_is_active (&spinning))
    ev_idle_stop (l, &spinning);
}

/* Run first after each poll (check watchers are queued last, and libev
 * runs the queue from its end): what else is pending came from the poll.
 */
static void
after_poll_cb (struct ev_loop *l, ev_check *w, int revents)
{
  (void) w; (void) revents;
  /* libev queues idle watchers only when nothing else is pending. */
  if (ev_is_pending (&spinning) || ev_pending_count (l) == 0)
    return;
  /* Started by a reload after this iteration's prepare: not timed. */
  if (policy.quiet_since == 0)
    return;
  poll_window_event (&policy, monotonic_now (), spun);
}

void
busy_poll_init (struct ev_loop *l)
{
  bp_loop = l;
  ev_prepare_init (&before_poll, before_poll_cb);
  ev_check_init (&after_poll, after_poll_cb);
  ev_idle_init (&spinning, spinning_cb);
}

void
busy_poll_configure (unsigned max_us)
{
  assert (bp_loop != NULL);
  poll_window_set_max (&policy, max_us);
  if (max_us > 0 && !ev_is_active (&before_poll)) {
    /* Neither keeps the loop from ending. */
    ev_prepare_start (bp_loop, &before_poll);
    ev_unref (bp_loop);
    ev_check_start (bp_loop, &after_poll);
    ev_unref (bp_loop);
  }
  else if (max_us == 0 && ev_is_active (&before_poll)) {
    ev_ref (bp_loop);
    ev_prepare_stop (bp_loop, &before_poll);
    ev_ref (bp_loop);
    ev_check_stop (bp_loop, &after_poll);
    if (ev_is_active (&spinning))
      ev_idle_stop (bp_loop, &spinning);
  }
}

void
busy_poll_report (void)
{
  if (policy.hits + policy.short_sleeps + policy.long_sleeps)
    log_debug ("busy polling: %lu events while spinning (%lu read by the "
               "probe), %lu after a short sleep, %lu after a long one; "
               "window %.0f us", policy.hits, probe_hits, policy.short_sleeps,
               policy.long_sleeps, policy.window * 1e6);
}
