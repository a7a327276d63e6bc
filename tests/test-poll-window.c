/* tests/test-poll-window.c: how long the loop spins after work
 * (server/poll-window.c), on made-up times:
 *
 * - events that needed a sleep but came within the maximum open the
 *   window (4 us) and double it up to the maximum;
 * - the window is what should_spin answers, counted from the first poll
 *   after work, and work starts a new count;
 * - events that came while spinning leave the window alone;
 * - events after longer sleeps halve it down to 0, where it stays while
 *   the client keeps pausing that long (an idle server never spins);
 * - a maximum below the minimum window never spins; lowering the maximum
 *   (a reload) shrinks the window at once.
 */
#include <config.h>

#include <stdio.h>

#include "internal.h"
#include "testlib.h"

#define US 1e-6

static double now = 1000.;

/* A poll at now, then an event gap seconds later: whether the poll spun. */
static bool
poll_then_event (struct poll_window *w, double gap)
{
  bool spin = poll_window_should_spin (w, now);

  now += gap;
  poll_window_event (w, now, spin && gap < w->window);
  return spin;
}

#define expect_window(w, us) \
  CHECK ((w)->window > (us) * US - 1e-9 && (w)->window < (us) * US + 1e-9, \
         "window %.1f us, expected %.1f us", (w)->window / US, (double) (us))

int
main (void)
{
  struct poll_window w = { 0 };

  poll_window_set_max (&w, 32);
  expect_window (&w, 0);
  /* Nothing spins at first: the poll sleeps, the event comes in 10 us. */
  CHECK (!poll_then_event (&w, 10 * US), "spun with a window of 0");
  expect_window (&w, 4);
  poll_then_event (&w, 10 * US);        /* spun 4 us, then slept */
  expect_window (&w, 8);
  poll_then_event (&w, 10 * US);
  expect_window (&w, 16);
  CHECK (w.short_sleeps == 3 && w.hits == 0,
         "short sleeps %lu, hits %lu", w.short_sleeps, w.hits);

  /* Within the window: a hit, the window stays. */
  CHECK (poll_then_event (&w, 10 * US), "did not spin with a window of 16 us");
  expect_window (&w, 16);
  CHECK (w.hits == 1, "hits %lu", w.hits);

  /* should_spin counts from the first poll after work. */
  CHECK (poll_window_should_spin (&w, now), "no spin right after work");
  CHECK (poll_window_should_spin (&w, now + 15 * US),
         "no spin 15 us after work");
  CHECK (!poll_window_should_spin (&w, now + 17 * US),
         "spun 17 us after work with a window of 16 us");
  now += 20 * US;
  poll_window_event (&w, now, false);   /* work: a new count */
  CHECK (poll_window_should_spin (&w, now + 1 * US),
         "no spin after new work");
  now += 2 * US;
  poll_window_event (&w, now, true);

  /* Up to the maximum, not past it. */
  poll_then_event (&w, 20 * US);
  expect_window (&w, 32);
  poll_then_event (&w, 31 * US);
  expect_window (&w, 32);

  /* A client pausing longer than the maximum closes it again... */
  poll_then_event (&w, 100 * US);
  expect_window (&w, 16);
  poll_then_event (&w, 1.);
  expect_window (&w, 8);
  poll_then_event (&w, 40 * US);
  expect_window (&w, 4);
  poll_then_event (&w, 40 * US);
  expect_window (&w, 0);
  /* ... and then nothing spins, however often it comes. */
  for (int i = 0; i < 1000; i++)
    CHECK (!poll_then_event (&w, 40 * US),
           "spun with a window of 0 (event %d)", i);
  expect_window (&w, 0);
  CHECK (w.long_sleeps == 1004, "long sleeps %lu", w.long_sleeps);

  /* A lower maximum (a reload) shrinks the window at once. */
  for (int i = 0; i < 4; i++)
    poll_then_event (&w, 31 * US);
  expect_window (&w, 32);
  poll_window_set_max (&w, 10);
  expect_window (&w, 10);
  poll_then_event (&w, 20 * US);        /* longer than the new maximum */
  expect_window (&w, 5);

  /* 0, or less than the minimum window: never spins. */
  poll_window_set_max (&w, 0);
  expect_window (&w, 0);
  for (int i = 0; i < 100; i++)
    CHECK (!poll_then_event (&w, 0), "spun with --busy-poll=0");
  poll_window_set_max (&w, 3);
  for (int i = 0; i < 100; i++)
    CHECK (!poll_then_event (&w, 1 * US),
           "spun with a maximum below the minimum window");
  expect_window (&w, 0);

  return test_exit ();
}
