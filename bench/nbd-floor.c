/* bench/nbd-floor.c: an NBD server that does no work and never sleeps.
 *
 * The QD1 workloads ask what is left of a request's round trip when the
 * server costs nothing: nbdkit's null plugin does no work but sleeps in
 * poll, so each request wakes it; this one spins on a non-blocking
 * socket, so the only wake-up left is the client's.  Its IOPS is the
 * ceiling for any server with this client on this machine (bench/run's
 * qd1read and qd1write, server "floor").  Not a real server: one client
 * at a time, reads return zeros and writes are dropped, unless FILE is
 * given: then they are a pread or a pwrite of FILE, the least a server
 * that keeps data does.
 *
 * It answers as the real servers do, for the client's work depends on it:
 * structured replies when the client asks for them (a READ then gets one
 * OFFSET_DATA chunk, which libnbd reads in four recv calls against two
 * for a simple reply), simple replies to everything else.
 *
 *   nbd-floor SOCKET SIZE [FILE]
 */
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

#define NBD_OPT_EXPORT_NAME 1
#define NBD_OPT_ABORT 2
#define NBD_OPT_INFO 6
#define NBD_OPT_GO 7
#define NBD_OPT_STRUCTURED_REPLY 8
#define NBD_REP_ACK 1
#define NBD_REP_INFO 3
#define NBD_REP_ERR_UNSUP 0x80000001u
#define NBD_CMD_READ 0
#define NBD_CMD_WRITE 1
#define NBD_CMD_DISC 2
#define NBD_REPLY_FLAG_DONE 1
#define NBD_REPLY_TYPE_OFFSET_DATA 1
#define NBD_FLAG_HAS_FLAGS 1
#define NBD_FLAG_SEND_FLUSH 4
#define NBD_FLAG_FIXED_NEWSTYLE 1
#define NBD_FLAG_NO_ZEROES 2
#define MAX_PAYLOAD (32u << 20)

static uint64_t size;
static char *buf;               /* options, write payloads */
static char *zeros;             /* what reads return */
static int data_fd = -1;        /* FILE, or -1 */
static int structured;          /* the client asked for structured replies */

/* Read exactly len bytes, spinning while there are none. */
static int
get (int fd, void *p, size_t len)
{
  while (len) {
    ssize_t n = recv (fd, p, len, MSG_DONTWAIT);
    if (n == 0)
      return -1;
    if (n < 0) {
      if (errno == EAGAIN || errno == EINTR)
        continue;
      return -1;
    }
    p = (char *) p + n;
    len -= n;
  }
  return 0;
}

static int
put (int fd, const void *p, size_t len)
{
  while (len) {
    ssize_t n = send (fd, p, len, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EAGAIN || errno == EINTR)
        continue;
      return -1;
    }
    p = (const char *) p + n;
    len -= n;
  }
  return 0;
}

static int
option_reply (int fd, uint32_t opt, uint32_t type, const void *data,
              uint32_t len)
{
  struct __attribute__ ((packed)) {
    uint64_t magic; uint32_t opt, type, len;
  } h = { htobe64 (0x3e889045565a9ULL), htobe32 (opt), htobe32 (type),
          htobe32 (len) };

  return put (fd, &h, sizeof h) < 0 || (len && put (fd, data, len) < 0)
    ? -1 : 0;
}

/* Options until GO or EXPORT_NAME: 0 to transmit, -1 to hang up. */
static int
handshake (int fd)
{
  struct __attribute__ ((packed)) {
    uint64_t magic, ihaveopt; uint16_t flags;
  } greeting = { htobe64 (0x4e42444d41474943ULL),
                 htobe64 (0x49484156454F5054ULL),
                 htobe16 (NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES) };
  uint16_t tflags = htobe16 (NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH);
  uint32_t cflags;

  if (put (fd, &greeting, sizeof greeting) < 0 ||
      get (fd, &cflags, 4) < 0)
    return -1;
  for (;;) {
    struct __attribute__ ((packed)) {
      uint64_t magic; uint32_t opt, len;
    } o;
    uint32_t opt, len;

    if (get (fd, &o, sizeof o) < 0)
      return -1;
    opt = be32toh (o.opt);
    len = be32toh (o.len);
    if (len > 65536 || get (fd, buf, len) < 0)
      return -1;
    if (opt == NBD_OPT_EXPORT_NAME) {
      uint64_t be_size = htobe64 (size);
      return put (fd, &be_size, 8) < 0 || put (fd, &tflags, 2) < 0 ? -1 : 0;
    }
    if (opt == NBD_OPT_ABORT)
      return -1;
    if (opt == NBD_OPT_STRUCTURED_REPLY && len == 0) {
      structured = 1;
      if (option_reply (fd, opt, NBD_REP_ACK, NULL, 0) < 0)
        return -1;
      continue;
    }
    if (opt == NBD_OPT_GO || opt == NBD_OPT_INFO) {
      struct __attribute__ ((packed)) {
        uint16_t type; uint64_t size; uint16_t flags;
      } info = { 0, htobe64 (size), tflags };
      if (option_reply (fd, opt, NBD_REP_INFO, &info, sizeof info) < 0 ||
          option_reply (fd, opt, NBD_REP_ACK, NULL, 0) < 0)
        return -1;
      if (opt == NBD_OPT_GO)
        return 0;
      continue;
    }
    if (option_reply (fd, opt, NBD_REP_ERR_UNSUP, NULL, 0) < 0)
      return -1;
  }
}

static void
transmit (int fd)
{
  for (;;) {
    struct __attribute__ ((packed)) {
      uint32_t magic; uint16_t flags, type; uint64_t cookie, offset;
      uint32_t len;
    } rq;
    struct __attribute__ ((packed)) {
      uint32_t magic, error; uint64_t cookie;
    } rp = { htobe32 (0x67446698), 0, 0 };
    struct __attribute__ ((packed)) {
      uint32_t magic; uint16_t flags, type; uint64_t cookie;
      uint32_t len; uint64_t offset;
    } chunk;
    void *head = &rp;
    size_t head_len = sizeof rp;
    uint32_t len;
    uint16_t type;

    if (get (fd, &rq, sizeof rq) < 0 || be32toh (rq.magic) != 0x25609513)
      return;
    type = be16toh (rq.type);
    len = be32toh (rq.len);
    rp.cookie = rq.cookie;
    if (type == NBD_CMD_DISC)
      return;
    if (len > MAX_PAYLOAD)
      return;
    if (type == NBD_CMD_WRITE && get (fd, buf, len) < 0)
      return;
    if (data_fd >= 0 && type == NBD_CMD_WRITE &&
        pwrite (data_fd, buf, len, be64toh (rq.offset)) != (ssize_t) len)
      return;
    if (data_fd >= 0 && type == NBD_CMD_READ &&
        pread (data_fd, zeros, len, be64toh (rq.offset)) != (ssize_t) len)
      return;
    if (structured && type == NBD_CMD_READ) {
      chunk.magic = htobe32 (0x668e33ef);
      chunk.flags = htobe16 (NBD_REPLY_FLAG_DONE);
      chunk.type = htobe16 (NBD_REPLY_TYPE_OFFSET_DATA);
      chunk.cookie = rq.cookie;
      chunk.len = htobe32 (8 + len);
      chunk.offset = rq.offset;
      head = &chunk;
      head_len = sizeof chunk;
    }
    /* One sendmsg for header and data, as a real server's. */
    {
      struct iovec iov[2] = {
        { head, head_len },
        { zeros, type == NBD_CMD_READ ? len : 0 },
      };
      struct msghdr msg = { .msg_iov = iov, .msg_iovlen = 2 };
      size_t want = iov[0].iov_len + iov[1].iov_len;
      ssize_t n = sendmsg (fd, &msg, MSG_NOSIGNAL);

      if (n < 0)
        return;
      /* The rest, if the socket took only part (large reads). */
      if ((size_t) n < want) {
        if ((size_t) n < head_len) {
          if (put (fd, (char *) head + n, head_len - n) < 0)
            return;
          n = head_len;
        }
        if (put (fd, zeros + (n - head_len), want - n) < 0)
          return;
      }
    }
  }
}

int
main (int argc, char **argv)
{
  struct sockaddr_un sun = { .sun_family = AF_UNIX };
  int lfd;

  if (argc < 3 || argc > 4 || strlen (argv[1]) >= sizeof sun.sun_path) {
    fprintf (stderr, "usage: nbd-floor SOCKET SIZE [FILE]\n");
    return 2;
  }
  if (argc == 4 && (data_fd = open (argv[3], O_RDWR)) < 0) {
    perror (argv[3]);
    return 1;
  }
  size = strtoull (argv[2], NULL, 10);
  buf = malloc (MAX_PAYLOAD);
  zeros = calloc (1, MAX_PAYLOAD);
  strcpy (sun.sun_path, argv[1]);
  lfd = socket (AF_UNIX, SOCK_STREAM, 0);
  if (buf == NULL || zeros == NULL || lfd < 0 ||
      bind (lfd, (struct sockaddr *) &sun, sizeof sun) < 0 ||
      listen (lfd, 16) < 0) {
    perror (argv[1]);
    return 1;
  }
  for (;;) {
    int fd = accept (lfd, NULL, NULL);

    if (fd < 0)
      continue;
    structured = 0;
    if (handshake (fd) == 0)
      transmit (fd);
    close (fd);
  }
}
