/* fuzz/fuzz-nbd-server.c: libFuzzer harness for the daemon's handling of
 * untrusted clients: the handshake (options, lengths, meta contexts) and
 * the transmission phase (request headers, flags, payloads).
 *
 * Each input is the byte stream one client sends.  A connection is made
 * over a socketpair to a real export (a small qcow2 image on a memfd); the
 * input is written, the client side shut down, and the loop run until the
 * server has closed the connection.  A crash, hang, sanitizer report or
 * leak is a finding; so is a connection the server never closes.
 */
#include <config.h>

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <ev.h>

#include "internal.h"

static bool ready;

static void
setup (void)
{
  struct qcow2_opts o = { 0 };
  char path[64];
  int fd = memfd_create ("fuzz-export.qcow2", 0);

  if (fd < 0) {
    perror ("memfd_create");
    exit (1);
  }
  snprintf (path, sizeof path, "/proc/self/fd/%d", fd);
  /* A 4 MiB image with some data, made once. */
  {
    char cmd[256];
    snprintf (cmd, sizeof cmd, "qemu-img create -q -f qcow2 %s 4M && "
              "qemu-io -f qcow2 -c 'write -q -P 0x33 0 100k' %s >/dev/null",
              path, path);
    if (system (cmd) != 0) {
      fprintf (stderr, "fuzz: qemu-img failed\n");
      exit (1);
    }
  }
  o.format = QCOW2_FORMAT_QCOW2;
  if (export_add ("", "fuzz", path, &o, true) < 0 || loop_init () < 0)
    exit (1);
  loop_watch_export (export_first ());
  ready = true;
}

int
LLVMFuzzerTestOneInput (const uint8_t *data, size_t size)
{
  int sv[2];
  size_t off = 0;
  char sink[65536];

  if (!ready)
    setup ();
  if (socketpair (AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, sv) < 0)
    return 0;
  if (conn_new (sv[1]) < 0) {
    close (sv[0]);
    return 0;
  }
  /* Feed the input, reading whatever the server answers so that it never
   * blocks on a full socket.
   */
  for (int spins = 0; spins < 200000 && conn_count () > 0; spins++) {
    if (off < size) {
      ssize_t n = write (sv[0], data + off, size - off);
      if (n > 0)
        off += (size_t) n;
      if (off == size)
        shutdown (sv[0], SHUT_WR);
    }
    else if (off == size && size == 0) {
      shutdown (sv[0], SHUT_WR);
      off = 1;
    }
    while (read (sv[0], sink, sizeof sink) > 0)
      ;
    ev_run (EV_DEFAULT, EVRUN_NOWAIT);
  }
  if (conn_count () > 0) {
    fprintf (stderr, "fuzz: the server never closed the connection\n");
    abort ();
  }
  close (sv[0]);
  return 0;
}
