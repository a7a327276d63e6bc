/* server/sockperm.c: who may connect to the Unix sockets qnbd creates
 * (--socket-mode, --socket-owner, --socket-group).
 *
 * A Unix socket's permissions are its access control: connecting needs
 * write permission on the socket file.  loop.c applies them between
 * bind and listen, so that no client connects while the file still has
 * the permissions the umask gave it.
 */
#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <errno.h>
#include <grp.h>
#include <limits.h>
#include <pwd.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "internal.h"

/* s as a number no larger than max, in base; false if it is not one. */
static bool
number (const char *s, int base, unsigned long max, unsigned long *out)
{
  char *end;

  if (*s == '\0' || *s == '-' || *s == '+')
    return false;
  errno = 0;
  *out = strtoul (s, &end, base);
  return errno == 0 && *end == '\0' && *out <= max;
}

int
sockperm_init (struct sockperm *p, const char *mode, const char *owner,
               const char *group)
{
  unsigned long n;

  *p = (struct sockperm) { .set_mode = false };
  if (mode) {
    if (!number (mode, 8, 0777, &n)) {
      log_error ("--socket-mode: '%s' is not an octal mode such as 0660",
                 mode);
      return -1;
    }
    p->mode = n;
    p->set_mode = true;
  }
  if (owner) {
    struct passwd *pw = getpwnam (owner);

    if (pw)
      p->uid = pw->pw_uid;
    else if (number (owner, 10, UINT_MAX - 1, &n))
      p->uid = n;
    else {
      log_error ("--socket-owner: %s: no such user", owner);
      return -1;
    }
    p->set_uid = true;
  }
  if (group) {
    struct group *gr = getgrnam (group);

    if (gr)
      p->gid = gr->gr_gid;
    else if (number (group, 10, UINT_MAX - 1, &n))
      p->gid = n;
    else {
      log_error ("--socket-group: %s: no such group", group);
      return -1;
    }
    p->set_gid = true;
  }
  /* A group or owner is given for others to connect: that needs write
   * permission, which no umask leaves to the group.
   */
  if ((p->set_uid || p->set_gid) && !p->set_mode) {
    p->mode = 0660;
    p->set_mode = true;
  }
  return 0;
}

int
sockperm_apply (const struct sockperm *p, const char *path)
{
  if ((p->set_uid || p->set_gid) &&
      chown (path, p->set_uid ? p->uid : (uid_t) -1,
             p->set_gid ? p->gid : (gid_t) -1) < 0) {
    log_error ("%s: --socket-owner/--socket-group: %m", path);
    return -1;
  }
  if (p->set_mode && chmod (path, p->mode) < 0) {
    log_error ("%s: --socket-mode: %m", path);
    return -1;
  }
  return 0;
}
