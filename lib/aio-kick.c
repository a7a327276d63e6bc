/* lib/aio-kick.c: the eventfd that tells the loop a backend has work
 * to reap (every backend kicks it; the owner clears it before reaping).
 */
#include <config.h>

#include <errno.h>
#include <stdint.h>
#include <unistd.h>

#include "aio.h"

void
aio_kick (struct aio *a)
{
  uint64_t one = 1;

  /* EAGAIN means the counter is saturated: the fd is readable already. */
  while (write (a->event_fd, &one, sizeof one) == -1 && errno == EINTR)
    ;
  /* After the write: a reap that sees the flag clears the counter. */
  __atomic_store_n (&a->raw_kicked, true, __ATOMIC_RELEASE);
}

void
aio_kick_once (struct aio *a)
{
  if (a->owner_kicked)
    return;
  a->owner_kicked = true;
  aio_kick (a);
}

void
aio_clear_kick (struct aio *a)
{
  uint64_t v;

  a->owner_kicked = false;
  /* An op still in flight may write the counter after the read below. */
  a->backend_since_clear = a->pending > a->inline_count;
  /* EAGAIN means nobody kicked since the last clear. */
  while (read (a->event_fd, &v, sizeof v) == -1 && errno == EINTR)
    ;
}
