/* server/access.c: who may use an export, and a client's address.
 *
 * An export's rules (struct access, hanging off struct export) are plain
 * data: lists filled from its allow-* keys, read by access_check for a
 * connection.  A rule that is not given lets everyone through; the rules
 * given must all pass:
 *
 *   allow-address   the client's address is in one of the networks; a
 *                   Unix-socket client only when "unix" is listed
 *   tls-required    the client did STARTTLS
 *   allow-tls-dn,   the client did STARTTLS and is either an x509 client
 *   allow-psk-user  whose verified certificate's subject DN is listed, or
 *                   a PSK client whose username is listed
 *
 * A client refused for want of TLS could get in after STARTTLS
 * (ACCESS_TLS_REQUIRED); one refused for its address or identity cannot
 * (ACCESS_REFUSED).
 *
 * Addresses are kept as struct peer_addr, where an IPv4-mapped IPv6
 * address (::ffff:a.b.c.d, what an IPv6 socket shows of an IPv4 client) is
 * the IPv4 address: it matches IPv4 networks and counts as that address
 * for the per-client connection limit.
 */
#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <arpa/inet.h>
#include <assert.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "internal.h"

static const unsigned char v4_mapped[12] = {
  0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff,
};

void
access_peer_from (struct peer_addr *p, const struct sockaddr *sa,
                  socklen_t len)
{
  memset (p, 0, sizeof *p);
  if (sa->sa_family == AF_INET && len >= sizeof (struct sockaddr_in)) {
    const struct sockaddr_in *sin = (const struct sockaddr_in *) sa;

    p->family = AF_INET;
    memcpy (p->a, &sin->sin_addr, 4);
  }
  else if (sa->sa_family == AF_INET6 &&
           len >= sizeof (struct sockaddr_in6)) {
    const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *) sa;

    if (memcmp (&sin6->sin6_addr, v4_mapped, 12) == 0) {
      p->family = AF_INET;
      memcpy (p->a, (const unsigned char *) &sin6->sin6_addr + 12, 4);
    }
    else {
      p->family = AF_INET6;
      memcpy (p->a, &sin6->sin6_addr, 16);
    }
  }
  else if (sa->sa_family == AF_UNIX)
    p->family = AF_UNIX;
}

bool
access_peer_same (const struct peer_addr *a, const struct peer_addr *b)
{
  return a->family == b->family && memcmp (a->a, b->a, sizeof a->a) == 0;
}

const char *
access_peer_name (const struct peer_addr *p, char *buf, size_t size)
{
  assert (size >= INET6_ADDRSTRLEN);
  switch (p->family) {
  case AF_INET:
  case AF_INET6:
    if (inet_ntop (p->family, p->a, buf, size))
      return buf;
    break;
  case AF_UNIX:
    return "unix";
  }
  return "unknown address";
}

/* Whether the first bits bits of a and b are the same. */
static bool
prefix_equal (const unsigned char *a, const unsigned char *b, unsigned bits)
{
  unsigned whole = bits / 8, rest = bits % 8;
  unsigned char mask = (unsigned char) (0xff00 >> rest);

  if (memcmp (a, b, whole) != 0)
    return false;
  return rest == 0 || ((a[whole] ^ b[whole]) & mask) == 0;
}

/* One network of allow-address ("unix", ADDR or ADDR/BITS) into a.
 * Returns 0, or -1 when it is not one.
 */
static int
add_network (struct access *a, const char *s)
{
  struct access_net n = { 0 };
  char addr[INET6_ADDRSTRLEN + 1];
  const char *slash = strchr (s, '/');
  size_t len = slash ? (size_t) (slash - s) : strlen (s);
  unsigned max;
  struct access_net *nets;

  if (strcmp (s, "unix") == 0) {
    a->unix_ok = true;
    return 0;
  }
  if (len == 0 || len >= sizeof addr)
    return -1;
  memcpy (addr, s, len);
  addr[len] = '\0';
  if (inet_pton (AF_INET, addr, n.a) == 1) {
    n.family = AF_INET;
    max = 32;
  }
  else if (inet_pton (AF_INET6, addr, n.a) == 1) {
    n.family = AF_INET6;
    max = 128;
  }
  else
    return -1;

  n.bits = max;
  if (slash) {
    char *end;
    unsigned long b;

    if (slash[1] < '0' || slash[1] > '9')
      return -1;
    b = strtoul (slash + 1, &end, 10);
    if (*end != '\0' || b > max)
      return -1;
    n.bits = b;
  }
  /* ::ffff:a.b.c.d/BITS: the IPv4 network, as clients are seen. */
  if (n.family == AF_INET6 && n.bits >= 96 &&
      memcmp (n.a, v4_mapped, 12) == 0) {
    memmove (n.a, n.a + 12, 4);
    memset (n.a + 4, 0, 12);
    n.family = AF_INET;
    n.bits -= 96;
  }

  nets = realloc (a->nets, (a->n_nets + 1) * sizeof *nets);
  if (nets == NULL)
    return -1;
  a->nets = nets;
  a->nets[a->n_nets++] = n;
  return 0;
}

/* Append a copy of the n bytes at s to the list *v of *len strings. */
static int
add_string (char ***v, size_t *len, const char *s, size_t n)
{
  char **nv = realloc (*v, (*len + 1) * sizeof *nv);

  if (nv == NULL)
    return -1;
  *v = nv;
  if ((nv[*len] = strndup (s, n)) == NULL)
    return -1;
  (*len)++;
  return 0;
}

/* Call add for each word of list (separated by spaces, tabs or commas).
 * Returns 0, or -1 with the bad word in bad (size bytes) when add fails.
 */
static int
each_word (struct access *a, const char *list, char *bad, size_t size,
           int (*add) (struct access *a, const char *word))
{
  static const char sep[] = " \t,";
  char word[256];
  size_t n, count = 0;

  for (const char *p = list + strspn (list, sep); *p;
       p += n, p += strspn (p, sep)) {
    n = strcspn (p, sep);
    count++;
    if (n < sizeof word) {
      memcpy (word, p, n);
      word[n] = '\0';
      if (add (a, word) == 0)
        continue;
    }
    snprintf (bad, size, "%.*s", (int) n, p);
    return -1;
  }
  if (count == 0) {
    snprintf (bad, size, "(an empty list)");
    return -1;
  }
  return 0;
}

static int
add_psk_user (struct access *a, const char *user)
{
  return add_string (&a->psk_users, &a->n_psk_users, user, strlen (user));
}

int
access_add_addresses (struct access *a, const char *list, char *bad,
                      size_t size)
{
  a->address_rule = true;
  return each_word (a, list, bad, size, add_network);
}

int
access_add_psk_users (struct access *a, const char *list, char *bad,
                      size_t size)
{
  return each_word (a, list, bad, size, add_psk_user);
}

int
access_add_dn (struct access *a, const char *dn)
{
  if (*dn == '\0')
    return -1;
  return add_string (&a->dns, &a->n_dns, dn, strlen (dn));
}

/* Whether string s is one of v[0..n). */
static bool
listed (char *const *v, size_t n, const char *s)
{
  for (size_t i = 0; i < n; i++)
    if (strcmp (v[i], s) == 0)
      return true;
  return false;
}

static bool
address_allowed (const struct access *a, const struct peer_addr *p)
{
  if (p->family == AF_UNIX)
    return a->unix_ok;
  for (size_t i = 0; i < a->n_nets; i++)
    if (a->nets[i].family == p->family &&
        prefix_equal (a->nets[i].a, p->a, a->nets[i].bits))
      return true;
  return false;
}

enum access_verdict
access_check (const struct access *a, const struct conn *c,
              const char **why)
{
  *why = NULL;
  if (a == NULL)
    return ACCESS_OK;
  if (a->address_rule && !address_allowed (a, &c->peer)) {
    *why = "address not in allow-address";
    return ACCESS_REFUSED;
  }
  if (a->tls_required && !c->tls) {
    *why = "TLS is required (tls-required)";
    return ACCESS_TLS_REQUIRED;
  }
  if (a->n_dns == 0 && a->n_psk_users == 0)
    return ACCESS_OK;
  if (!c->tls) {
    *why = "TLS is required (allow-tls-dn, allow-psk-user)";
    return ACCESS_TLS_REQUIRED;
  }
  if (c->tls_psk_user) {
    if (listed (a->psk_users, a->n_psk_users, c->tls_psk_user))
      return ACCESS_OK;
    *why = "PSK user not in allow-psk-user";
    return ACCESS_REFUSED;
  }
  if (c->tls_dn) {
    if (listed (a->dns, a->n_dns, c->tls_dn))
      return ACCESS_OK;
    *why = "certificate DN not in allow-tls-dn";
    return ACCESS_REFUSED;
  }
  *why = "no verified client certificate nor PSK user";
  return ACCESS_REFUSED;
}

bool
access_needs_tls (const struct access *a)
{
  return a && (a->tls_required || a->n_dns || a->n_psk_users);
}

struct access *
access_ref (struct access *a)
{
  if (a) {
    assert (a->refs > 0);
    a->refs++;
  }
  return a;
}

void
access_free (struct access *a)
{
  if (a == NULL)
    return;
  assert (a->refs > 0);
  if (--a->refs > 0)
    return;
  for (size_t i = 0; i < a->n_dns; i++)
    free (a->dns[i]);
  for (size_t i = 0; i < a->n_psk_users; i++)
    free (a->psk_users[i]);
  free (a->dns);
  free (a->psk_users);
  free (a->nets);
  free (a);
}
