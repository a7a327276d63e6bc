/* lib/qcow2-lock.c: image locking compatible with QEMU's, so that qnbd and
 * QEMU (qemu-nbd, qemu-img, qemu-io, qemu-system) refuse an image the
 * other has open for writing.
 *
 * The scheme is QEMU's (its file locking, observed in /proc/locks): one
 * byte per permission, each locked shared (F_RDLCK) with open file
 * description locks (F_OFD_SETLK), which belong to the open file and not
 * to the process, so they survive fork and go away with the descriptor:
 *
 *   byte 100 + p   "I hold permission p"
 *   byte 200 + p   "I do not share permission p with anyone"
 *
 * p: 0 consistent read, 1 write, 2 write unchanged, 3 resize, 4 change
 * children.  A holder of p conflicts with anyone locking 200 + p, and the
 * reverse.  Shared locks never block each other, so conflicts are found
 * by asking (F_OFD_GETLK for a write lock on the counterpart byte), after
 * taking our own locks: two processes starting together then both see
 * each other, and both give up.
 *
 * OFD locks belong to no process, so F_OFD_GETLK says nothing of who
 * holds one (l_pid is -1).  To name the holder in the message, the open
 * files of every process we may look at are searched for one on the same
 * device and inode whose /proc/PID/fdinfo/FD lists a lock on the byte.
 */
#include <config.h>

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <syslog.h>
#include <sys/stat.h>
#include <unistd.h>

#include "qcow2-internal.h"

#define PERM_BASE   100
#define SHARED_BASE 200
#define NPERMS      5

enum {
  PERM_CONSISTENT_READ = 1u << 0,
  PERM_WRITE = 1u << 1,
  PERM_WRITE_UNCHANGED = 1u << 2,
  PERM_RESIZE = 1u << 3,
  PERM_GRAPH_MOD = 1u << 4,
};

static const char *const perm_names[NPERMS] = {
  "consistent read", "write", "write unchanged", "resize", "change children",
};

/* One byte, shared, or F_UNLCK. */
static int
set_byte (int fd, short type, off_t byte)
{
  struct flock fl = {
    .l_type = type, .l_whence = SEEK_SET, .l_start = byte, .l_len = 1,
  };
  return fcntl (fd, F_OFD_SETLK, &fl) < 0 ? -errno : 0;
}

/* Whether another open file holds a lock on byte: 1, 0, or -errno. */
static int
byte_taken (int fd, off_t byte)
{
  struct flock fl = {
    .l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = byte, .l_len = 1,
  };
  if (fcntl (fd, F_OFD_GETLK, &fl) < 0)
    return -errno;
  return fl.l_type != F_UNLCK;
}

/* Whether /proc/PID/fdinfo/FD lists a lock covering byte. */
static bool
fdinfo_locks (const char *pid, const char *fd, off_t byte)
{
  char path[600], line[256];
  bool found = false;
  FILE *f;

  snprintf (path, sizeof path, "/proc/%s/fdinfo/%s", pid, fd);
  f = fopen (path, "re");
  if (!f)
    return false;
  /* "lock:\t1: OFDLCK ADVISORY  READ  -1 08:01:1234 100 100" */
  while (!found && fgets (line, sizeof line, f)) {
    char *end;
    long long first, last;
    if (strncmp (line, "lock:", 5))
      continue;
    end = line + strcspn (line, "\n");
    *end = '\0';
    while (end > line && end[-1] != ' ')
      end--;
    last = strcmp (end, "EOF") ? atoll (end) : INT64_MAX;
    while (end > line && end[-1] == ' ')
      end--;
    while (end > line && end[-1] != ' ')
      end--;
    first = atoll (end);
    found = first <= byte && byte <= last;
  }
  fclose (f);
  return found;
}

/* The process (other than us) with an open file of st's device and inode
 * holding a lock on byte: its PID, its name in comm.  0 when none can be
 * seen (another user's process, no /proc).
 */
static pid_t
find_holder (const struct stat *st, off_t byte, char *comm, size_t len)
{
  DIR *proc = opendir ("/proc");
  pid_t self = getpid (), found = 0;
  struct dirent *p;

  if (!proc)
    return 0;
  while (!found && (p = readdir (proc))) {
    char path[600];
    struct dirent *d;
    DIR *fds;
    pid_t pid = (pid_t) atoi (p->d_name);
    if (pid <= 0 || pid == self)
      continue;
    snprintf (path, sizeof path, "/proc/%s/fd", p->d_name);
    fds = opendir (path);
    if (!fds)
      continue;
    while (!found && (d = readdir (fds))) {
      struct stat fst;
      if (d->d_name[0] == '.')
        continue;
      snprintf (path, sizeof path, "/proc/%s/fd/%s", p->d_name, d->d_name);
      if (stat (path, &fst) == 0 && fst.st_dev == st->st_dev
          && fst.st_ino == st->st_ino
          && fdinfo_locks (p->d_name, d->d_name, byte))
        found = pid;
    }
    closedir (fds);
  }
  closedir (proc);
  if (found) {
    char path[64];
    FILE *f;
    snprintf (path, sizeof path, "/proc/%d/comm", (int) found);
    comm[0] = '\0';
    f = fopen (path, "re");
    if (f && fgets (comm, (int) len, f))
      comm[strcspn (comm, "\n")] = '\0';
    if (f)
      fclose (f);
  }
  return found;
}

/* "WHAT is locked by process 1234 (qnbd)" or, when the holder cannot be
 * seen, "WHAT is in use by another process"; then why.
 */
static void
say_conflict (int fd, off_t byte, const char *what, const char *why,
              char *err, size_t errlen)
{
  struct stat st;
  char comm[64];
  pid_t pid = fstat (fd, &st) == 0 ? find_holder (&st, byte, comm,
                                                  sizeof comm) : 0;

  if (pid)
    snprintf (err, errlen, "%s is locked by process %d (%s) %s", what,
              (int) pid, comm, why);
  else
    snprintf (err, errlen, "%s is in use by another process %s", what, why);
}

static void
unlock_all (int fd)
{
  struct flock fl = {
    .l_type = F_UNLCK, .l_whence = SEEK_SET, .l_start = PERM_BASE,
    .l_len = SHARED_BASE + NPERMS - PERM_BASE,
  };
  fcntl (fd, F_OFD_SETLK, &fl);
}

int
lock_image (struct qcow2 *q, int fd, enum image_lock_mode mode,
            const char *what, char *err, size_t errlen)
{
  unsigned hold = PERM_CONSISTENT_READ, unshare = PERM_WRITE | PERM_RESIZE;
  int r = 0;

  /* As qemu-nbd: a writer resizes too; nobody else may write or resize
   * under any of us, unless a reader says it does not care (force-share).
   */
  if (mode == IMAGE_LOCK_WRITE)
    hold |= PERM_WRITE | PERM_RESIZE;
  else if (mode == IMAGE_LOCK_SHARE_ALL)
    unshare = 0;

  for (unsigned p = 0; p < NPERMS && r == 0; p++) {
    if (hold & (1u << p))
      r = set_byte (fd, F_RDLCK, PERM_BASE + p);
    if (r == 0 && (unshare & (1u << p)))
      r = set_byte (fd, F_RDLCK, SHARED_BASE + p);
  }
  if (r == -EINVAL || r == -EOPNOTSUPP || r == -ENOLCK) {
    /* A file system without byte-range locks: serve, but say so. */
    unlock_all (fd);
    qlog (q, LOG_WARNING, "%s: cannot lock (%s); another process could open "
          "it for writing too", what, strerror (-r));
    return 0;
  }
  if (r < 0) {
    unlock_all (fd);
    snprintf (err, errlen, "locking %s: %s", what, strerror (-r));
    return r;
  }

  /* Someone holds what we do not share, or does not share what we hold. */
  for (unsigned p = 0; p < NPERMS; p++) {
    char why[64];
    if ((unshare & (1u << p)) && (r = byte_taken (fd, PERM_BASE + p)) != 0) {
      snprintf (why, sizeof why, "(%s lock)", perm_names[p]);
      if (r > 0)
        say_conflict (fd, PERM_BASE + p, what, why, err, errlen);
      break;
    }
    if ((hold & (1u << p)) && (r = byte_taken (fd, SHARED_BASE + p)) != 0) {
      snprintf (why, sizeof why, "(which does not share %s)", perm_names[p]);
      if (r > 0)
        say_conflict (fd, SHARED_BASE + p, what, why, err, errlen);
      break;
    }
  }
  if (r < 0)
    snprintf (err, errlen, "checking the locks of %s: %s", what,
              strerror (-r));
  if (r != 0) {
    unlock_all (fd);
    return r > 0 ? -EBUSY : r;
  }
  return 0;
}
