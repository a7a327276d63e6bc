/* server/buffer-pool.c: request data buffers, reused.
 *
 * Every READ and WRITE needs an aligned data buffer.  posix_memalign and
 * free of a fresh 4 KiB buffer per request were a tenth of the daemon's
 * CPU time on 4 KiB random reads (splitting and coalescing heap chunks to
 * honour the alignment), so buffers up to POOL_MAX_SIZE are kept, per
 * power-of-two size, on a stack each, and handed out again.  The pool is
 * bounded (POOL_MAX_BYTES in all) so that a burst does not pin memory
 * that the heap trimming in loop.c would otherwise give back.
 */
#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <stdlib.h>

#include "internal.h"

#define POOL_MIN_SHIFT 12                       /* 4 KiB */
#define POOL_MAX_SHIFT 17                       /* 128 KiB */
#define POOL_MAX_SIZE  (1u << POOL_MAX_SHIFT)
#define POOL_MAX_BYTES (8u << 20)
#define POOL_CLASSES   (POOL_MAX_SHIFT - POOL_MIN_SHIFT + 1)

/* A free buffer holds the link to the next one of its class. */
struct free_buf {
  struct free_buf *next;
};

static struct free_buf *pool[POOL_CLASSES];
static size_t pool_bytes;

/* The class of a buffer of len bytes, or -1 when it is not pooled. */
static int
size_class (size_t len, size_t *size)
{
  int k = 0;

  if (len > POOL_MAX_SIZE)
    return -1;
  while (((size_t) 1 << (POOL_MIN_SHIFT + k)) < len)
    k++;
  *size = (size_t) 1 << (POOL_MIN_SHIFT + k);
  return k;
}

void *
buffer_get (size_t len)
{
  size_t size = len;
  int k = size_class (len, &size);
  void *p;

  if (k >= 0 && pool[k]) {
    struct free_buf *b = pool[k];
    pool[k] = b->next;
    pool_bytes -= size;
    return b;
  }
  if (posix_memalign (&p, BUFFER_ALIGN, size ? size : 1) != 0)
    return NULL;
  return p;
}

void
buffer_put (void *p, size_t len)
{
  size_t size = len;
  int k = size_class (len, &size);

  if (!p)
    return;
  if (k < 0 || pool_bytes + size > POOL_MAX_BYTES) {
    free (p);
    return;
  }
  ((struct free_buf *) p)->next = pool[k];
  pool[k] = p;
  pool_bytes += size;
}

void
buffer_pool_drain (void)
{
  for (int k = 0; k < POOL_CLASSES; k++)
    while (pool[k]) {
      struct free_buf *b = pool[k];
      pool[k] = b->next;
      free (b);
    }
  pool_bytes = 0;
}
