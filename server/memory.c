/* server/memory.c: what the daemon's connections hold, its memory budget
 * (--max-memory), the connections waiting for memory, and giving the heap
 * back to the system.
 *
 * It knows nothing of connections: they count what they hold (mem_hold,
 * mem_release), ask before starting a request (mem_admit), and wait in
 * line (mem_wait) with a wake callback of their own.  The loop hands its
 * libev loop down once (mem_init) for the two timers kept here.
 */
#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <assert.h>
#include <malloc.h>

#include "internal.h"

/* The heap is trimmed once connections hold at least TRIM_MIN bytes
 * less than at their peak since the last trim, and have not taken them
 * back for TRIM_DELAY seconds.
 */
#define TRIM_MIN (16u << 20)
#define TRIM_DELAY 1.

static struct ev_loop *mem_loop;        /* from mem_init */
static ev_timer trim_timer;             /* heap to give back */
static ev_timer resume_timer;           /* waiters to retry */

static size_t heap_held;                /* bytes connections hold now */
static size_t heap_peak;                /* the most since the last trim */
static size_t max_memory = DEFAULT_MAX_MEMORY; /* --max-memory */

/* Waiting for memory, oldest first, so that they get it in turn. */
static struct mem_waiter *waiters, **waiters_tail = &waiters;

/* ------------------------------------------------------------------ */
/* Giving the heap back.                                               */
/* ------------------------------------------------------------------ */

/* main.c keeps request buffers (up to 32 MiB) in the heap rather than in
 * mappings of their own (M_MMAP_THRESHOLD), and the heap from shrinking
 * under them (M_TRIM_THRESHOLD): a freed buffer is reused by the next
 * request without the kernel zeroing its pages again, which is what makes
 * large requests fast.  The price is that glibc never gives back what a
 * burst made the heap grow to: after a client that did not read its
 * replies (a connection buffers up to 96 MiB) has gone, the daemon stays
 * at its peak, and as each burst finds the holes the last one left too
 * small or in the wrong place, the heap grows with every round.  Measured
 * after rounds of two such clients (tests/test-slow-reader.py does one):
 * 115, 147, 211, 275, 339, then 371 MiB of RSS for good, with nothing in
 * use; with the trim below, 2 MiB a second after each round.
 *
 * So connections count the heap they hold (read buffers and request
 * data), and once they hold TRIM_MIN bytes less than at their peak and
 * have not taken them back for TRIM_DELAY seconds, malloc_trim(0) returns
 * the free pages to the system: the top of the heap, and the whole pages
 * of the free chunks in its middle (MADV_DONTNEED), in every arena.  It
 * stays off the fast path: a client that keeps its buffers busy never
 * falls that far from its peak, one that takes them back within
 * TRIM_DELAY stops the countdown, and connections that come and go a few
 * at a time move 128 KiB each.  A trim costs a walk of the free lists
 * and the madvise calls (about 15 ms for 100 MiB), then the page faults
 * of the next burst: once per burst at most, and never more often than
 * every TRIM_DELAY.
 */

static void
trim_cb (struct ev_loop *lp, ev_timer *w, int revents)
{
  double t;
  int released;

  (void) lp; (void) w; (void) revents;
  t = ev_time ();
  buffer_pool_drain ();
  released = malloc_trim (0);
  log_debug ("heap trimmed in %.1f ms (%s); connections hold %zu KiB, "
             "%zu KiB at their peak", (ev_time () - t) * 1000.,
             released ? "memory given back" : "nothing to give back",
             heap_held >> 10, heap_peak >> 10);
  heap_peak = heap_held;
}

void
mem_hold (size_t n)
{
  heap_held += n;
  if (heap_held > heap_peak)
    heap_peak = heap_held;
  /* Taken back: the countdown starts again when it is freed again. */
  if (ev_is_active (&trim_timer) && heap_peak - heap_held < TRIM_MIN)
    ev_timer_stop (mem_loop, &trim_timer);
}

void
mem_release (size_t n)
{
  assert (heap_held >= n);
  heap_held -= n;
  /* Retried from the loop, not from inside whatever freed the memory
   * (often the writing of a connection's replies).
   */
  if (waiters && heap_held < max_memory && !ev_is_active (&resume_timer)) {
    ev_timer_set (&resume_timer, 0., 0.);
    ev_timer_start (mem_loop, &resume_timer);
  }
  if (heap_peak - heap_held >= TRIM_MIN && !ev_is_active (&trim_timer)) {
    ev_timer_set (&trim_timer, TRIM_DELAY, 0.);
    ev_timer_start (mem_loop, &trim_timer);
  }
}

/* ------------------------------------------------------------------ */
/* The budget.                                                         */
/* ------------------------------------------------------------------ */

void
mem_set_max_memory (size_t bytes)
{
  max_memory = bytes;
}

/* Connections count what they hold (read buffers, requests and their data
 * and extent arrays), the engines what they hold for requests (compressed
 * data being decompressed), and a request is parsed only when what it
 * will hold fits beside them; otherwise its connection stops reading and
 * waits in line (mem_wait) until enough is freed.  One small request per
 * connection always goes, so that clients that do not read their replies,
 * having filled the budget, cannot starve the others: what the daemon
 * holds stays under the budget plus SMALL_REQUEST and a read buffer per
 * connection (--shared bounds them).
 */
bool
mem_admit (size_t need, bool conn_idle)
{
  if (heap_held + export_mem_held () + need <= max_memory)
    return true;
  return conn_idle && need <= SMALL_REQUEST;
}

void
mem_wait (struct mem_waiter *w)
{
  assert (!w->waiting);
  assert (w->wake != NULL);
  w->waiting = true;
  w->next = NULL;
  *waiters_tail = w;
  waiters_tail = &w->next;
}

void
mem_cancel (struct mem_waiter *w)
{
  struct mem_waiter **pp = &waiters;

  assert (w->waiting);
  while (*pp != w)
    pp = &(*pp)->next;
  *pp = w->next;
  if (waiters_tail == &w->next)
    waiters_tail = pp;
  w->next = NULL;
  w->waiting = false;
}

static void
resume_cb (struct ev_loop *lp, ev_timer *t, int revents)
{
  struct mem_waiter *list = waiters;

  (void) lp; (void) t; (void) revents;
  /* Each gets one try, in turn; one that still does not fit goes to the
   * back of the (new) line.
   */
  waiters = NULL;
  waiters_tail = &waiters;
  while (list) {
    struct mem_waiter *w = list;

    list = w->next;
    w->next = NULL;
    w->waiting = false;
    w->wake (w);
  }
}

/* ------------------------------------------------------------------ */
/* Setup and teardown.                                                 */
/* ------------------------------------------------------------------ */

void
mem_init (struct ev_loop *l)
{
  mem_loop = l;
  ev_timer_init (&trim_timer, trim_cb, TRIM_DELAY, 0.);
  ev_timer_init (&resume_timer, resume_cb, 0., 0.);
}

void
mem_cleanup (void)
{
  if (mem_loop) {
    if (ev_is_active (&trim_timer))
      ev_timer_stop (mem_loop, &trim_timer);
    if (ev_is_active (&resume_timer))
      ev_timer_stop (mem_loop, &resume_timer);
  }
  buffer_pool_drain ();
  mem_loop = NULL;
}
