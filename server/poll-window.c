/* server/poll-window.c: how long the loop polls without sleeping after
 * work (busy-poll.c applies it), apart from libev so that it can be
 * tested alone (tests/test-poll-window.c).
 *
 * The window adapts to the gap between the first poll after work and the
 * next event, as QEMU's adaptive polling (poll-max-ns) does: an event
 * that came after a sleep, within max, doubles the window (from
 * POLL_WINDOW_MIN, up to max) so that the next such gap is spun through;
 * one that came after a longer sleep halves it (to 0 below the
 * minimum), so that a client that pauses longer than max costs no spin.
 * An event that came while spinning leaves the window as it is.
 */
#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <assert.h>

#include "internal.h"

void
poll_window_set_max (struct poll_window *w, unsigned max_us)
{
  w->max = max_us * 1e-6;
  if (w->window > w->max)
    w->window = w->max;
  if (w->window < POLL_WINDOW_MIN)
    w->window = 0;
  w->quiet_since = 0;
}

bool
poll_window_should_spin (struct poll_window *w, double now)
{
  assert (w->window == 0 ||
          (w->window >= POLL_WINDOW_MIN && w->window <= w->max));
  if (w->quiet_since == 0)
    w->quiet_since = now;
  return now - w->quiet_since < w->window;
}

void
poll_window_event (struct poll_window *w, double now,
                   bool while_spinning)
{
  double gap = now - w->quiet_since;

  assert (w->window == 0 ||
          (w->window >= POLL_WINDOW_MIN && w->window <= w->max));
  w->quiet_since = 0;
  if (while_spinning) {
    w->hits++;
    return;
  }
  if (gap <= w->max) {
    w->window = w->window == 0 ? POLL_WINDOW_MIN : 2 * w->window;
    if (w->window > w->max)
      w->window = w->max < POLL_WINDOW_MIN ? 0 : w->max;
    w->short_sleeps++;
  }
  else {
    w->window /= 2;
    if (w->window < POLL_WINDOW_MIN)
      w->window = 0;
    w->long_sleeps++;
  }
}
