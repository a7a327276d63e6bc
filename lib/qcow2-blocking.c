/* lib/qcow2-blocking.c: whole-buffer synchronous I/O, for open, repair,
 * header updates and emergencies; the request path never blocks.
 */
#include <config.h>

#include <errno.h>
#include <string.h>
#include <unistd.h>

#include "qcow2-internal.h"

int
blocking_pread (int fd, void *buf, size_t len, uint64_t off,
                bool zero_past_eof)
{
  size_t done = 0;
  while (done < len) {
    ssize_t r = pread (fd, (char *) buf + done, len - done,
                       (off_t) (off + done));
    if (r < 0 && errno == EINTR)
      continue;
    if (r < 0)
      return -errno;
    if (r == 0) {
      if (!zero_past_eof)
        return -EIO;
      memset ((char *) buf + done, 0, len - done);
      break;
    }
    done += (size_t) r;
  }
  return 0;
}

int
blocking_pwrite (int fd, const void *buf, size_t len, uint64_t off)
{
  size_t done = 0;
  while (done < len) {
    ssize_t r = pwrite (fd, (const char *) buf + done, len - done,
                        (off_t) (off + done));
    if (r < 0 && errno == EINTR)
      continue;
    if (r < 0)
      return -errno;
    done += (size_t) r;
  }
  return 0;
}
