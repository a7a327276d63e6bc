/* server/tls.c: TLS sessions for NBD_OPT_STARTTLS (GnuTLS: x509, PSK).
 *
 * A session is a transport of conn.c (struct conn_transport): conn.c
 * reads and writes through tls_recv and tls_send, which first drive the
 * TLS handshake.  Everything is non-blocking on the connection's own
 * socket, on the loop's thread: when GnuTLS answers EAGAIN, the
 * direction it waits for (gnutls_record_get_direction) goes into
 * c->xport_wait and the connection's watcher waits for it.  GnuTLS may
 * hold decrypted records the socket will never announce again; conn.c
 * asks tls_pending before it waits.
 *
 * The credentials are loaded once, at startup, from the directory of
 * --tls-certificates, with the file names qemu and nbdkit use, or from the
 * keys file of --tls-psk ("username:hexkey" lines, which GnuTLS reads
 * itself).  With both, a client may use either.
 */
#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <assert.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <gnutls/gnutls.h>
#include <gnutls/x509.h>

#include "internal.h"

static enum tls_mode mode = TLS_OFF;
static bool verify_peer;
static gnutls_certificate_credentials_t x509_creds;
static gnutls_psk_server_credentials_t psk_creds;
static gnutls_priority_t psk_priority;  /* the defaults, plus PSK */

enum tls_mode
tls_mode (void)
{
  return mode;
}

/* dir/name into buf (PATH_MAX-sized); -1 (logged) when too long. */
static int
cert_path (char *buf, size_t size, const char *dir, const char *name)
{
  int n = snprintf (buf, size, "%s/%s", dir, name);

  if (n < 0 || (size_t) n >= size) {
    log_error ("--tls-certificates: %s/%s: path too long", dir, name);
    return -1;
  }
  return 0;
}

/* The keys of --tls-psk.  Returns 0 or -1 (logged). */
static int
load_psk (const char *file)
{
  int r;

  if (access (file, R_OK) < 0) {
    log_error ("--tls-psk: %s: %m", file);
    return -1;
  }
  r = gnutls_psk_allocate_server_credentials (&psk_creds);
  if (r == 0)
    r = gnutls_psk_set_server_credentials_file (psk_creds, file);
  if (r == 0)
    r = gnutls_priority_init (&psk_priority,
                              "@SYSTEM:+ECDHE-PSK:+DHE-PSK:+PSK", NULL);
  if (r == GNUTLS_E_INVALID_REQUEST)    /* no system priority file */
    r = gnutls_priority_init (&psk_priority,
                              "NORMAL:+ECDHE-PSK:+DHE-PSK:+PSK", NULL);
  if (r < 0) {
    log_error ("--tls-psk: %s: %s", file, gnutls_strerror (r));
    return -1;
  }
  return 0;
}

int
tls_init (enum tls_mode m, const char *certdir, const char *psk_file,
          bool verify)
{
  char ca[4096], cert[4096], key[4096];
  int r;

  mode = m;
  verify_peer = verify;
  if (m == TLS_OFF)
    return 0;
  if (certdir == NULL && psk_file == NULL) {
    log_error ("--tls=%s needs --tls-certificates=DIR or --tls-psk=FILE",
               m == TLS_ON ? "on" : "require");
    return -1;
  }
  if (psk_file && load_psk (psk_file) < 0)
    return -1;
  if (certdir == NULL)
    return 0;
  if (cert_path (ca, sizeof ca, certdir, "ca-cert.pem") < 0 ||
      cert_path (cert, sizeof cert, certdir, "server-cert.pem") < 0 ||
      cert_path (key, sizeof key, certdir, "server-key.pem") < 0)
    return -1;

  r = gnutls_certificate_allocate_credentials (&x509_creds);
  if (r < 0) {
    log_error ("TLS credentials: %s", gnutls_strerror (r));
    return -1;
  }
  r = gnutls_certificate_set_x509_key_file (x509_creds, cert, key,
                                            GNUTLS_X509_FMT_PEM);
  if (r < 0) {
    log_error ("%s, %s: %s", cert, key, gnutls_strerror (r));
    goto fail;
  }
  /* The CA is needed only to check client certificates. */
  if (verify || access (ca, F_OK) == 0) {
    r = gnutls_certificate_set_x509_trust_file (x509_creds, ca,
                                                GNUTLS_X509_FMT_PEM);
    if (r < 0) {
      log_error ("%s: %s", ca, gnutls_strerror (r));
      goto fail;
    }
    if (r == 0 && verify) {
      log_error ("%s: no CA certificate found", ca);
      goto fail;
    }
  }
  return 0;

 fail:
  gnutls_certificate_free_credentials (x509_creds);
  x509_creds = NULL;
  return -1;
}

void
tls_cleanup (void)
{
  if (x509_creds)
    gnutls_certificate_free_credentials (x509_creds);
  x509_creds = NULL;
  if (psk_creds)
    gnutls_psk_free_server_credentials (psk_creds);
  psk_creds = NULL;
  if (psk_priority)
    gnutls_priority_deinit (psk_priority);
  psk_priority = NULL;
}

/* GnuTLS said r (< 0) on c: EAGAIN with c->xport_wait set, or EPROTO
 * (logged) when the session cannot go on.
 */
static ssize_t
tls_fail (struct conn *c, gnutls_session_t s, int r, const char *what)
{
  if (r == GNUTLS_E_AGAIN || r == GNUTLS_E_INTERRUPTED) {
    c->xport_wait = gnutls_record_get_direction (s) ? EV_WRITE : EV_READ;
    errno = EAGAIN;
    return -1;
  }
  if (r == GNUTLS_E_CERTIFICATE_VERIFICATION_ERROR) {
    /* Why the client's certificate was refused, which gnutls_strerror
     * does not say (expired, signed by another CA, ...).
     */
    gnutls_datum_t why = { NULL, 0 };
    if (gnutls_certificate_verification_status_print
          (gnutls_session_get_verify_cert_status (s), GNUTLS_CRT_X509,
           &why, 0) == 0) {
      log_info ("client %u: TLS %s: %s", c->id, what, (char *) why.data);
      gnutls_free (why.data);
      errno = EPROTO;
      return -1;
    }
  }
  if (r == GNUTLS_E_PREMATURE_TERMINATION || r == GNUTLS_E_PUSH_ERROR ||
      r == GNUTLS_E_PULL_ERROR)
    log_debug ("client %u: TLS %s: %s", c->id, what, gnutls_strerror (r));
  else
    log_info ("client %u: TLS %s: %s", c->id, what, gnutls_strerror (r));
  errno = EPROTO;
  return -1;
}

/* Who the client is, for the exports' allowlists (access.c): its PSK
 * username, or the subject DN of its certificate when it was verified.
 * Returns 0, or -1 (logged) when out of memory.
 */
static int
tls_peer_identity (struct conn *c, gnutls_session_t s)
{
  const gnutls_datum_t *certs;
  gnutls_x509_crt_t crt;
  gnutls_datum_t dn = { NULL, 0 };
  unsigned n = 0;
  int r;

  if (gnutls_auth_get_type (s) == GNUTLS_CRD_PSK) {
    const char *user = gnutls_psk_server_get_username (s);

    if (user && (c->tls_psk_user = strdup (user)) == NULL)
      goto oom;
    return 0;
  }
  /* Without --tls-verify-peer a certificate proves nothing. */
  if (!verify_peer || gnutls_certificate_type_get (s) != GNUTLS_CRT_X509)
    return 0;
  certs = gnutls_certificate_get_peers (s, &n);
  if (certs == NULL || n == 0)
    return 0;
  r = gnutls_x509_crt_init (&crt);
  if (r < 0) {
    log_error ("client %u: TLS: %s", c->id, gnutls_strerror (r));
    return -1;
  }
  r = gnutls_x509_crt_import (crt, &certs[0], GNUTLS_X509_FMT_DER);
  if (r == 0)
    r = gnutls_x509_crt_get_dn2 (crt, &dn);
  gnutls_x509_crt_deinit (crt);
  if (r < 0) {
    log_info ("client %u: TLS: its certificate's DN: %s", c->id,
              gnutls_strerror (r));
    return 0;
  }
  c->tls_dn = strndup ((const char *) dn.data, dn.size);
  gnutls_free (dn.data);
  if (c->tls_dn == NULL)
    goto oom;
  return 0;

 oom:
  log_error ("client %u: %m", c->id);
  return -1;
}

/* Drive the TLS handshake: 0 when it is over, else tls_fail's answer. */
static int
tls_handshake (struct conn *c, gnutls_session_t s)
{
  int r;
  char *desc;

  if (c->tls_ready)
    return 0;
  r = gnutls_handshake (s);
  if (r < 0 && gnutls_error_is_fatal (r) == 0 && r != GNUTLS_E_AGAIN &&
      r != GNUTLS_E_INTERRUPTED)
    r = GNUTLS_E_AGAIN;         /* a warning alert: try again */
  if (r < 0)
    return tls_fail (c, s, r, "handshake");
  c->tls_ready = true;
  if (tls_peer_identity (c, s) < 0) {
    errno = ENOMEM;
    return -1;
  }
  desc = gnutls_session_get_desc (s);
  if (c->tls_psk_user)
    log_info ("client %u: TLS session %s, PSK user '%s'", c->id,
              desc ? desc : "", c->tls_psk_user);
  else if (c->tls_dn)
    log_info ("client %u: TLS session %s, client certificate verified: "
              "'%s'", c->id, desc ? desc : "", c->tls_dn);
  else
    log_info ("client %u: TLS session %s", c->id, desc ? desc : "");
  gnutls_free (desc);
  return 0;
}

static ssize_t
tls_recv (struct conn *c, const struct iovec *iov, int n)
{
  gnutls_session_t s = c->xport_data;
  ssize_t r;

  assert (n > 0);
  if (tls_handshake (c, s) < 0)
    return -1;
  /* One buffer at a time: a payload read goes straight into iov[0]. */
  r = gnutls_record_recv (s, iov[0].iov_base, iov[0].iov_len);
  if (r == GNUTLS_E_PREMATURE_TERMINATION)
    return 0;                   /* hung up without close_notify */
  if (r < 0)
    return tls_fail (c, s, r, "read");
  return r;
}

static ssize_t
tls_send (struct conn *c, const struct iovec *iov, int n)
{
  gnutls_session_t s = c->xport_data;
  ssize_t r;

  assert (n > 0);
  if (tls_handshake (c, s) < 0)
    return -1;
  /* After EAGAIN GnuTLS wants the same buffer again: conn.c offers the
   * same first unsent bytes until they are taken.
   */
  r = gnutls_record_send (s, iov[0].iov_base, iov[0].iov_len);
  if (r < 0)
    return tls_fail (c, s, r, "write");
  return r;
}

static bool
tls_pending (struct conn *c)
{
  return c->tls_ready && gnutls_record_check_pending (c->xport_data) > 0;
}

static void
tls_close (struct conn *c)
{
  gnutls_session_t s = c->xport_data;

  /* Best effort: the socket is non-blocking and closed next. */
  if (c->tls_ready && c->xport != NULL)
    gnutls_bye (s, GNUTLS_SHUT_WR);
  gnutls_deinit (s);
  free (c->tls_dn);
  free (c->tls_psk_user);
  c->tls_dn = c->tls_psk_user = NULL;
}

static const struct conn_transport tls_transport = {
  .recv = tls_recv,
  .send = tls_send,
  .pending = tls_pending,
  .close = tls_close,
};

int
tls_start (struct conn *c)
{
  gnutls_session_t s;
  int r;

  assert (mode != TLS_OFF && (x509_creds != NULL || psk_creds != NULL));
  r = gnutls_init (&s, GNUTLS_SERVER | GNUTLS_NONBLOCK);
  if (r < 0) {
    log_error ("client %u: TLS: %s", c->id, gnutls_strerror (r));
    conn_set_dead (c);
    return -1;
  }
  if (psk_priority)
    r = gnutls_priority_set (s, psk_priority);
  else
    r = gnutls_set_default_priority (s);
  if (r == 0 && x509_creds)
    r = gnutls_credentials_set (s, GNUTLS_CRD_CERTIFICATE, x509_creds);
  if (r == 0 && psk_creds)
    r = gnutls_credentials_set (s, GNUTLS_CRD_PSK, psk_creds);
  if (r < 0) {
    log_error ("client %u: TLS: %s", c->id, gnutls_strerror (r));
    gnutls_deinit (s);
    conn_set_dead (c);
    return -1;
  }
  if (verify_peer && x509_creds) {
    /* The handshake fails without a certificate the CA signed. */
    gnutls_certificate_server_set_request (s, GNUTLS_CERT_REQUIRE);
    gnutls_session_set_verify_cert (s, NULL, 0);
  }
  else
    gnutls_certificate_server_set_request (s, GNUTLS_CERT_IGNORE);
  gnutls_transport_set_int (s, c->fd);
  return conn_start_transport (c, &tls_transport, s);
}
