"""test-connection-storm.py: thousands of connections opened and dropped.

A libnbd client connects first and then writes, reads back and checks,
in a thread, for the whole test: none of its requests may fail or wait
longer than LATENCY seconds.  Meanwhile, on the Unix socket:

Phase 1, five threads at once, each a way of leaving:
  - connect and close at once, the greeting unread;
  - close in the middle of the handshake: the client flags and the magic
    of an option, and no more;
  - NBD_OPT_GO (or NBD_OPT_EXPORT_NAME), then close before any request;
  - NBD_OPT_GO, the header of a 1 MiB NBD_CMD_WRITE and only part of its
    payload, then close (none of it may reach the disk);
  - NBD_OPT_GO, a READ or NBD_CMD_DISC, then close without reading.
Phase 2: HOLD connections open at once, against the server's --shared
  limit of SHARED connections (the libnbd client holds one): exactly
  SHARED - 1 are served and left in all the states above, the rest must be
  refused cleanly (end of file instead of a greeting); then all are closed
  at once.

Afterwards the daemon must be alive, hold no more descriptors than before
the storm, have stayed under RSS_BOUND_MB (qnbdtest.rss_bound_kib),
serve the data the libnbd client wrote (and zeros where the cut-off
writes were aimed), exit 0 on SIGTERM and leave an image that qemu-img
check finds clean.
"""

import os
import random
import resource
import threading
import time

import qnbdtest as qt

nbd = qt.require_nbd()
qt.requires("qemu-img")
qt.seed()

MiB = 1024 * 1024
SIZE = 64 * MiB
VERIFY_END = 32 * MiB           # the libnbd client writes [0, VERIFY_END)
STORM_WRITE = 1 * MiB           # cut-off writes aim at [VERIFY_END, SIZE)
HOLD = 600
SHARED = 501
# The parked connections of phase 2 hold a 128 KiB read buffer each, and
# the cut-off writes among them a 1 MiB data buffer: about 150 MiB of RSS
# when MALLOC_PERTURB_ (set by "make check") has glibc touch every byte.
RSS_BOUND_MB = 256
LATENCY = 10.0                  # seconds one libnbd request may take
SETTLE = 20.0                   # seconds the daemon gets to close sockets

# Per style: how many connections (phase 1).
COUNTS = {
    "close-at-once": 900,
    "close-mid-handshake": 500,
    "close-after-go": 500,
    "close-mid-write": 300,
    "close-mid-request": 200,
}

# Both this process and the daemon (which inherits the limit) hold HOLD
# descriptors at once, and a few more.
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
want = HOLD + 200
if soft != resource.RLIM_INFINITY and soft < want:
    if hard != resource.RLIM_INFINITY and hard < want:
        qt.skip("RLIMIT_NOFILE hard limit %d is below %d" % (hard, want))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))

tmp = qt.tmpdir()
img = qt.create_image(tmp, "disk.qcow2", SIZE, cluster_size=65536)
shadow = qt.Shadow(SIZE)
srv = qt.Server(img, "--shared", str(SHARED))
bound = qt.rss_bound_kib(srv.pid, RSS_BOUND_MB)
start_fds = qt.fd_count(srv.pid)
qt.log("daemon: %d descriptors, RSS %d MiB at the start%s" %
       (start_fds, qt.proc_status_kib(srv.pid, "VmRSS") // 1024,
        " (AddressSanitizer build)" if qt.sanitized(srv.pid) else ""))


def rss_kib():
    return max(qt.proc_status_kib(srv.pid, "VmRSS"),
               qt.proc_status_kib(srv.pid, "VmHWM"))


def settle(want, what):
    """Wait until the daemon holds at most want descriptors."""
    deadline = time.monotonic() + SETTLE
    while qt.fd_count(srv.pid) > want and time.monotonic() < deadline:
        time.sleep(0.05)
    n = qt.fd_count(srv.pid)
    if n > want:
        d = "/proc/%d/fd" % srv.pid
        names = []
        for f in os.listdir(d):
            try:
                names.append(os.readlink(os.path.join(d, f)))
            except OSError:
                pass
        raise AssertionError("%s: the daemon still holds %d descriptors "
                             "after %gs, %d expected: %s" %
                             (what, n, SETTLE, want, sorted(names)))
    return n


# ---------------------------------------------------------------------
# The libnbd client that must never fail.
# ---------------------------------------------------------------------

class Verifier(threading.Thread):

    def __init__(self):
        super().__init__(daemon=True)
        self.h = srv.connect()
        self.stop = threading.Event()
        self.rounds = 0
        self.worst = 0.0
        self.error = None
        self.rng = random.Random(random.randrange(1 << 32))

    def timed(self, fn, *args):
        t = time.monotonic()
        r = fn(*args)
        self.worst = max(self.worst, time.monotonic() - t)
        return r

    def run(self):
        rng, h = self.rng, self.h
        try:
            while not self.stop.is_set():
                length = rng.choice((512, 4096, 65536, 65536 + 512,
                                     rng.randrange(1, 2048) * 512))
                off = rng.randrange(0, (VERIFY_END - length) // 512 + 1) * 512
                data = qt.pattern(off, length, self.rounds)
                self.timed(h.pwrite, data, off)
                shadow.write(off, data)
                qt.assert_same(self.timed(h.pread, length, off), data, off)
                # Where the cut-off writes aim: still zeros.
                z = rng.randrange(VERIFY_END, SIZE - 65536 + 1)
                qt.assert_same(self.timed(h.pread, 65536, z), bytes(65536), z)
                if self.rounds % 16 == 15:
                    self.timed(h.flush)
                self.rounds += 1
        except BaseException as e:          # judged by the main thread
            self.error = e

    def check(self, what):
        if self.error is not None:
            raise AssertionError("libnbd client failed during %s: %r" %
                                 (what, self.error))
        assert self.is_alive(), "libnbd client ended during %s" % what
        assert self.worst < LATENCY, "libnbd client: a request took " \
            "%.1fs during %s" % (self.worst, what)


# ---------------------------------------------------------------------
# The ways of leaving.  Each returns after closing its socket.
# ---------------------------------------------------------------------

WRITE_JUNK = b"\xee" * STORM_WRITE


def storm_offset(rng):
    return rng.randrange(VERIFY_END // 512, (SIZE - STORM_WRITE) // 512) * 512


def close_at_once(i, rng):
    c = qt.RawClient(srv.sock, greet=False)
    c.close()


def close_mid_handshake(i, rng):
    c = qt.RawClient(srv.sock)
    if i % 3 == 0:
        c.s.sendall(b"\0\0")                    # half the client flags
    else:
        c.client_flags()
        c.s.sendall(qt.NBD_IHAVEOPT[:1 + i % len(qt.NBD_IHAVEOPT)])
    c.close()


def close_after_go(i, rng):
    c = qt.RawClient(srv.sock)
    size, _ = c.export_name() if i % 4 == 0 else c.go(structured=i % 2 == 1)
    assert size == SIZE
    c.close()


def close_mid_write(i, rng):
    c = qt.RawClient(srv.sock)
    c.go(structured=i % 2 == 1)
    c.s.sendall(qt.nbd_request(qt.NBD_CMD_WRITE, i, storm_offset(rng),
                               STORM_WRITE))
    c.s.sendall(WRITE_JUNK[:rng.randrange(0, STORM_WRITE)])
    c.close()


def close_mid_request(i, rng):
    c = qt.RawClient(srv.sock)
    c.go(structured=i % 2 == 1)
    if i % 3 == 0:
        c.s.sendall(qt.nbd_request(qt.NBD_CMD_DISC, i, 0, 0))
    else:
        # Some past the end (an error reply), some only part of a header.
        off = SIZE - 512 if i % 7 == 0 else \
            rng.randrange(0, (SIZE - 65536) // 512 + 1) * 512
        req = qt.nbd_request(qt.NBD_CMD_READ, i, off, 65536)
        c.s.sendall(req if i % 5 else req[:20])
    c.close()


STYLES = {
    "close-at-once": close_at_once,
    "close-mid-handshake": close_mid_handshake,
    "close-after-go": close_after_go,
    "close-mid-write": close_mid_write,
    "close-mid-request": close_mid_request,
}

done = {name: 0 for name in STYLES}
failures = []


def storm(name, n, seed):
    rng = random.Random(seed)
    try:
        for i in range(n):
            STYLES[name](i, rng)
            done[name] += 1
    except BaseException as e:
        failures.append("%s, connection %d: %r" % (name, done[name] + 1, e))


# ---------------------------------------------------------------------
# The test.
# ---------------------------------------------------------------------

t0 = time.monotonic()
v = Verifier()
v.start()
peak = rss_kib()

# Phase 1: the five ways of leaving, at once.
threads = [threading.Thread(target=storm,
                            args=(name, COUNTS[name], random.randrange(1 << 32)),
                            daemon=True)
           for name in STYLES]
for t in threads:
    t.start()
while any(t.is_alive() for t in threads):
    peak = max(peak, rss_kib())
    for t in threads:
        t.join(0.1)
assert not failures, "\n".join(failures)
v.check("phase 1")
phase1 = sum(done.values())
qt.log("phase 1: %d connections (%s) in %.1fs; libnbd client: %d rounds" %
       (phase1, ", ".join("%s %d" % kv for kv in done.items()),
        time.monotonic() - t0, v.rounds))
# The libnbd client's socket is the one descriptor more than at the start.
settle(start_fds + 1, "phase 1")

# Phase 2: HOLD at once; SHARED - 1 are served (the libnbd client is the
# other), the rest are refused.
t1 = time.monotonic()
rounds1 = v.rounds
held = [qt.RawClient(srv.sock, greet=False) for _ in range(HOLD)]
served, refused = [], 0
for c in held:
    try:
        c.greeting()
        served.append(c)
    except EOFError:
        refused += 1            # the refusal: end of file, nothing else
        c.close()
qt.log("phase 2: %d connections open at once: %d served, %d refused "
       "(--shared %d, the libnbd client holds one)" %
       (HOLD, len(served), refused, SHARED))
assert len(served) == SHARED - 1 and refused == HOLD - (SHARED - 1), \
    "served %d and refused %d, want %d and %d" % \
    (len(served), refused, SHARED - 1, HOLD - (SHARED - 1))
assert qt.fd_count(srv.pid) <= start_fds + SHARED, \
    "the daemon holds %d descriptors" % qt.fd_count(srv.pid)

# Leave the served ones in every state, then close them all at once.
rng = random.Random(random.randrange(1 << 32))
for i, c in enumerate(served):
    k = i % 6
    if k == 1:
        c.client_flags()
        c.s.sendall(qt.NBD_IHAVEOPT[:4])
    elif k >= 2:
        c.go(structured=i % 2 == 1)
    if k == 3:
        c.s.sendall(qt.nbd_request(qt.NBD_CMD_READ, i,
                                   rng.randrange(0, SIZE // 65536) * 65536,
                                   65536))
    elif k == 4:
        c.s.sendall(qt.nbd_request(qt.NBD_CMD_WRITE, i, storm_offset(rng),
                                   STORM_WRITE))
        c.s.sendall(WRITE_JUNK[:100 * 1024])
    elif k == 5:
        c.s.sendall(qt.nbd_request(qt.NBD_CMD_READ, i, 0, 65536)[:13])
peak = max(peak, rss_kib())
qt.log("phase 2: all served connections parked; daemon: %d descriptors, "
       "RSS %d MiB" % (qt.fd_count(srv.pid), rss_kib() // 1024))
v.check("phase 2")
for c in served:
    c.close()
settle(start_fds + 1, "phase 2")
peak = max(peak, rss_kib())
v.check("phase 2")
qt.log("phase 2 over in %.1fs; libnbd client: %d rounds" %
       (time.monotonic() - t1, v.rounds - rounds1))

# A last round for the libnbd client with the storm over, then stop it.
time.sleep(0.2)
v.check("the end")
v.stop.set()
v.join(LATENCY)
assert not v.is_alive(), "libnbd client stuck"
assert v.error is None, "libnbd client failed: %r" % v.error
assert v.rounds > 0
qt.log("libnbd client: %d write/read/check rounds, slowest request %.3fs" %
       (v.rounds, v.worst))
v.h.flush()
v.h.shutdown()

assert srv.alive(), "qnbd died"
fds = settle(start_fds, "the end")
peak = max(peak, rss_kib())
qt.log("%d connections handled; daemon: %d descriptors (%d at the start), "
       "peak RSS %d MiB (bound %d MiB)" %
       (phase1 + HOLD + 1, fds, start_fds, peak // 1024, bound // 1024))
assert peak < bound, "daemon RSS %d MiB over the bound" % (peak // 1024)

h = srv.connect()
shadow.verify(h)
h.shutdown()
qt.stop_and_compare(srv, img, shadow)
qt.log("PASS (%.1fs)" % (time.monotonic() - t0))
