/* server/privs.c: --user and --group, dropping root once set up.
 *
 * main.c binds the sockets, opens every image and loads the TLS
 * credentials as root, gives the files it created (pid file, Unix
 * sockets) to the user, then calls privs_drop: from then on everything,
 * images opened later included, is done as that user.
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
#include <unistd.h>

#include "internal.h"

/* s as a whole decimal number no larger than max, into *out. */
static bool
number (const char *s, unsigned long max, unsigned long *out)
{
  char *end;

  if (*s < '0' || *s > '9')
    return false;
  errno = 0;
  *out = strtoul (s, &end, 10);
  return errno == 0 && *end == '\0' && *out <= max;
}

int
privs_init (struct privs *p, const char *user, const char *group)
{
  unsigned long n;

  *p = (struct privs) { .user = user };
  if (user == NULL && group == NULL)
    return 0;
  if (geteuid () != 0) {
    log_error ("--user/--group: only root can change its user and group "
               "(running as uid %ld)", (long) geteuid ());
    return -1;
  }
  if (user) {
    struct passwd *pw;

    errno = 0;
    pw = getpwnam (user);
    if (pw == NULL && number (user, UINT_MAX - 1, &n)) {
      pw = getpwuid (n);
      if (pw == NULL && group == NULL) {
        /* Its group would stay root's. */
        log_error ("--user: %s: no such user: give --group too", user);
        return -1;
      }
      p->uid = n;
      p->user = NULL;               /* no name: no supplementary groups */
    }
    else if (pw == NULL) {
      log_error ("--user: %s: %s", user,
                 errno ? strerror (errno) : "no such user");
      return -1;
    }
    if (pw) {
      p->uid = pw->pw_uid;
      p->gid = pw->pw_gid;          /* unless --group says otherwise */
      /* pw is overwritten by the next lookup; kept for initgroups. */
      p->user = strdup (pw->pw_name);
      if (p->user == NULL) {
        log_error ("--user: %s: %m", user);
        return -1;
      }
      p->set_gid = true;
    }
    p->set_uid = true;
  }
  if (group) {
    struct group *gr;

    errno = 0;
    gr = getgrnam (group);
    if (gr)
      p->gid = gr->gr_gid;
    else if (number (group, UINT_MAX - 1, &n))
      p->gid = n;
    else {
      log_error ("--group: %s: %s", group,
                 errno ? strerror (errno) : "no such group");
      return -1;
    }
    p->set_gid = true;
  }
  return 0;
}

int
privs_chown (const struct privs *p, const char *path)
{
  if (lchown (path, p->set_uid ? p->uid : (uid_t) -1,
              p->set_gid ? p->gid : (gid_t) -1) < 0) {
    log_error ("%s: chown: %m", path);
    return -1;
  }
  return 0;
}

int
privs_drop (const struct privs *p)
{
  if (!p->set_uid && !p->set_gid)
    return 0;
  /* Groups first: once the uid is not root, they cannot change. */
  if (p->set_gid) {
    int r = p->user ? initgroups (p->user, p->gid)
      : setgroups (1, &p->gid);

    if (r < 0) {
      log_error ("--user/--group: setting the supplementary groups: %m");
      return -1;
    }
    if (setgid (p->gid) < 0) {
      log_error ("--group: setgid %ld: %m", (long) p->gid);
      return -1;
    }
  }
  if (p->set_uid) {
    if (setuid (p->uid) < 0) {
      log_error ("--user: setuid %ld: %m", (long) p->uid);
      return -1;
    }
    /* A uid of 0, or a kernel that left a way back, would be no drop. */
    if (p->uid != 0 && setuid (0) == 0) {
      log_error ("--user: root could be had back after setuid %ld",
                 (long) p->uid);
      return -1;
    }
  }
  log_info ("running as uid %ld, gid %ld", (long) getuid (),
            (long) getgid ());
  return 0;
}
