/* server/buffer-pool.c: request data buffers, reused.
 *
 * Every READ and WRITE needs an aligned data buffer.  posix_memalign and
 * free of a fresh 4 KiB buffer per request were a tenth of the daemon's
 * CPU time on 4 KiB random reads (splitting and coalescing heap chunks to
 * honour the alignment), so buffers up to POOL_MAX_SIZE are kept, per
 * power-of-two size, on a stack each, and handed out again.  The pool is
 * bounded (POOL_MAX_BYTES in all) so that a burst does not pin memory
 * that the heap trimming in memory.c would otherwise give back.
 *
 * Larger buffers (up to MAX_PAYLOAD) are mappings of their own, kept the
 * same way per power-of-two size up to LARGE_MAX_BYTES in all and unmapped
 * past that or at a trim.  In the heap they were not reused: a client
 * streaming 32 MiB reads took the daemon to 546 MiB of RSS, as each
 * 4 KiB-aligned 32 MiB chunk was carved from a new place.  A mapping
 * reused keeps its pages, so the RSS follows the data in flight.
 */
#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <stdlib.h>
#include <sys/mman.h>

#include "internal.h"

#define POOL_MIN_SHIFT 12                       /* 4 KiB */
#define POOL_MAX_SHIFT 17                       /* 128 KiB */
#define POOL_MAX_SIZE  (1u << POOL_MAX_SHIFT)
#define POOL_MAX_BYTES (8u << 20)
#define POOL_CLASSES   (POOL_MAX_SHIFT - POOL_MIN_SHIFT + 1)
#define LARGE_MAX_SHIFT 25                      /* 32 MiB: MAX_PAYLOAD */
#define LARGE_CLASSES  (LARGE_MAX_SHIFT - POOL_MAX_SHIFT)
#define LARGE_MAX_BYTES (64u << 20)

/* A free buffer holds the link to the next one of its class. */
struct free_buf {
  struct free_buf *next;
};

static struct free_buf *pool[POOL_CLASSES];
static size_t pool_bytes;
static struct free_buf *large[LARGE_CLASSES];
static size_t large_bytes;

/* The class of a mapped buffer of len bytes (over POOL_MAX_SIZE), or -1
 * when it is larger than any class.
 */
static int
large_class (size_t len, size_t *size)
{
  int k = 0;

  while (k < LARGE_CLASSES
         && ((size_t) 1 << (POOL_MAX_SHIFT + 1 + k)) < len)
    k++;
  if (k == LARGE_CLASSES)
    return -1;
  *size = (size_t) 1 << (POOL_MAX_SHIFT + 1 + k);
  return k;
}

static void *
large_get (size_t len)
{
  size_t size = len;
  int k = large_class (len, &size);
  void *p;

  if (k >= 0 && large[k]) {
    struct free_buf *b = large[k];
    large[k] = b->next;
    large_bytes -= size;
    return b;
  }
  if (k < 0)
    size = (len + BUFFER_ALIGN - 1) & ~((size_t) BUFFER_ALIGN - 1);
  p = mmap (NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
            -1, 0);
  return p == MAP_FAILED ? NULL : p;
}

static void
large_put (void *p, size_t len)
{
  size_t size = len;
  int k = large_class (len, &size);

  if (k < 0) {
    munmap (p, (len + BUFFER_ALIGN - 1) & ~((size_t) BUFFER_ALIGN - 1));
    return;
  }
  if (large_bytes + size > LARGE_MAX_BYTES) {
    munmap (p, size);
    return;
  }
  ((struct free_buf *) p)->next = large[k];
  large[k] = p;
  large_bytes += size;
}

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

  if (len > POOL_MAX_SIZE)
    return large_get (len);
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
  if (len > POOL_MAX_SIZE) {
    large_put (p, len);
    return;
  }
  if (pool_bytes + size > POOL_MAX_BYTES) {
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
  for (int k = 0; k < LARGE_CLASSES; k++)
    while (large[k]) {
      struct free_buf *b = large[k];
      large[k] = b->next;
      munmap (b, (size_t) 1 << (POOL_MAX_SHIFT + 1 + k));
    }
  large_bytes = 0;
}
