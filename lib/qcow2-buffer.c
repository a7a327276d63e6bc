/* lib/qcow2-buffer.c: buffers that O_DIRECT I/O can use. */
#include <config.h>

#include <stdlib.h>
#include <string.h>

#include "qcow2-internal.h"

void *
buffer_alloc_zero (size_t size)
{
  void *p;
  if (posix_memalign (&p, BUF_ALIGN, round_up (size ? size : 1, BUF_ALIGN)))
    return NULL;
  memset (p, 0, size);
  return p;
}
