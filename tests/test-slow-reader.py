"""test-slow-reader.py: a client that never reads its replies: the server
must not buffer without bound.

The server stops reading a connection's socket while the connection has
CONN_MAX_IN_FLIGHT (64) requests unanswered or CONN_MAX_BUFFERED (64 MiB)
of data held by them (server/internal.h, conn_has_room in server/conn.c).
A request counts until its reply has been written to the socket, and the
one that crosses the byte limit may be a READ of MAX_PAYLOAD (32 MiB), so
one connection holds less than 64 + 32 = 96 MiB of data however much it
sends; the requests it keeps sending wait in the kernel's socket buffers.

Two raw clients stuff the socket with requests and never read a reply:
- "simple": NBD_OPT_EXPORT_NAME, then 32 MiB READs (the byte limit
  binds: two requests are taken, 64 MiB);
- "structured": NBD_OPT_STRUCTURED_REPLY + NBD_OPT_GO, then 512 KiB READs
  of data and of holes (the count limit binds: 64 requests, 32 MiB).
Each sends its requests without blocking until the socket has taken
nothing more for STALL seconds.  The daemon's VmRSS is sampled all along
(the daemon is killed at once if it passes the bound, so that a server
that does buffer without bound cannot take the machine down) and its
VmHWM must stay under RSS_BOUND_MB: the design allows 2 x 96 MiB of
request data for the two clients, plus the engine's caches; in practice
the daemon holds 96 MiB of data (about 120 MiB of RSS).  An
AddressSanitizer build gets more room (qnbdtest.rss_bound_kib).

While both are stuck, a libnbd client connects, writes, reads back and
flushes, within a deadline.  Then the first reply of each stuck client is
read and checked, both are closed, the daemon must give back their
descriptors and, within TRIM_WAIT seconds, their memory: its VmRSS must
fall under FREED_BOUND_MB (the heap is kept from shrinking while in use,
for speed, and trimmed once connections have let go of much of it: see
server/memory.c; without that the RSS stayed at the peak, and grew with
each round of slow readers).  Then it must serve the libnbd client again,
exit 0 on SIGTERM, and leave a clean image holding exactly what was
written.
"""

import socket
import struct
import threading
import time

import qnbdtest as qt

nbd = qt.require_nbd()
qt.requires("qemu-img", "qemu-io")
qt.seed()

MiB = 1024 * 1024
SIZE = 128 * MiB
DATA_END = 64 * MiB             # [0, DATA_END) is filled before serving
FILL = 0x5a
BIG_READ = 32 * MiB             # MAX_PAYLOAD
SMALL_READ = 512 * 1024
STALL = 3.0                     # seconds without progress: the socket is full
MAX_REQUESTS = 50000            # per client; far more than sockets hold
REQUEST_SIZE = 28               # bytes of a request header
RSS_BOUND_MB = 256
FREED_BOUND_MB = 64             # RSS once the slow readers have gone
TRIM_WAIT = 10.0                # seconds the daemon gets to give it back
DEADLINE = 60.0                 # seconds the libnbd client may take

tmp = qt.tmpdir()
img = qt.create_image(tmp, "disk.qcow2", SIZE, cluster_size=65536)
qt.run("qemu-io", "-f", "qcow2", "-c",
       "write -P 0x%x 0 %d" % (FILL, DATA_END), img)
shadow = qt.Shadow(SIZE)
shadow.write(0, bytes([FILL]) * DATA_END)

srv = qt.Server(img)
bound_kib = qt.rss_bound_kib(srv.pid, RSS_BOUND_MB)
qt.log("RSS bound %d MiB%s" % (bound_kib // 1024,
                                " (AddressSanitizer build)"
                                if qt.sanitized(srv.pid) else ""))


def rss():
    return qt.proc_status_kib(srv.pid, "VmRSS")


def hwm():
    return qt.proc_status_kib(srv.pid, "VmHWM")


peak = [0]


def sample():
    """Note the RSS; kill the daemon and fail as soon as it is over the
    bound (it would otherwise go on to eat the machine)."""
    r = max(rss(), hwm())
    peak[0] = max(peak[0], r)
    if r > bound_kib:
        srv.proc.kill()
        srv.proc.wait()
        srv.show_stderr()
        raise AssertionError(
            "qnbd buffers without bound: RSS %d MiB > %d MiB while clients "
            "do not read their replies (daemon killed)" %
            (r // 1024, bound_kib // 1024))


def libnbd_round(tag, offsets):
    """A libnbd client writes 1 MiB at each offset, reads it back and
    flushes, in a thread that must finish within DEADLINE seconds (a
    server stuck on the slow clients would hang it)."""
    result = {}

    def work():
        try:
            t0 = time.monotonic()
            h = srv.connect()
            for off in offsets:
                data = qt.pattern(off, MiB, tag)
                h.pwrite(data, off)
                shadow.write(off, data)
                qt.assert_same(h.pread(MiB, off), data, off)
            qt.assert_same(h.pread(65536, DATA_END - 65536),
                           shadow.read(DATA_END - 65536, 65536),
                           DATA_END - 65536)
            h.flush()
            h.shutdown()
            result["time"] = time.monotonic() - t0
        except BaseException as e:          # judged by the main thread
            result["error"] = e

    t = threading.Thread(target=work, daemon=True)
    t.start()
    deadline = time.monotonic() + DEADLINE
    while t.is_alive() and time.monotonic() < deadline:
        t.join(0.2)
        sample()
    if t.is_alive():
        srv.show_stderr()
        raise AssertionError("libnbd client %d: not done after %gs: the "
                             "server stalls behind the slow readers" %
                             (tag, DEADLINE))
    if "error" in result:
        raise result["error"]
    qt.log("libnbd client %d: %d MiB written and read back in %.2fs" %
           (tag, len(offsets), result["time"]))


class Stuffer:
    """A raw client and the requests it will try to send."""

    def __init__(self, name, structured, length, offsets):
        self.name = name
        self.c = qt.RawClient(srv.sock)
        if structured:
            size, _ = self.c.go(structured=True)
        else:
            size, _ = self.c.export_name()
        assert size == SIZE, "%s: export size %d" % (name, size)
        self.length = length
        self.blob = b"".join(
            qt.nbd_request(qt.NBD_CMD_READ, i + 1,
                           offsets[i % len(offsets)], length)
            for i in range(MAX_REQUESTS))
        self.sent = 0
        self.last_progress = time.monotonic()
        self.c.s.setblocking(False)

    def push(self):
        """Send what the socket takes; whether it took anything."""
        progress = False
        while self.sent < len(self.blob):
            try:
                n = self.c.s.send(self.blob[self.sent:self.sent + 65536])
            except BlockingIOError:
                break
            except OSError as e:
                raise AssertionError("%s: the server dropped the connection "
                                     "(%s) after %d requests" %
                                     (self.name, e, self.requests))
            self.sent += n
            progress = True
        if progress:
            self.last_progress = time.monotonic()
        return progress

    def stalled(self):
        return time.monotonic() - self.last_progress >= STALL

    @property
    def requests(self):
        return self.sent // REQUEST_SIZE


baseline_fds = qt.fd_count(srv.pid)
qt.log("daemon: %d descriptors, RSS %d MiB before the slow readers" %
       (baseline_fds, rss() // 1024))

t0 = time.monotonic()
slow = [
    Stuffer("simple", False, BIG_READ,
            [0, BIG_READ, 2 * BIG_READ, 3 * BIG_READ]),
    Stuffer("structured", True, SMALL_READ,
            [(i % 2) * DATA_END + (i // 2) * 3 * MiB for i in range(40)]),
]
while True:
    for s in slow:
        s.push()
    sample()
    if all(s.stalled() or s.sent == len(s.blob) for s in slow):
        break
    time.sleep(0.05)
for s in slow:
    qt.log("%s: %d READ requests of %d KiB (%d MiB asked for) sent, none "
           "of the replies read" % (s.name, s.requests, s.length // 1024,
                                    s.requests * s.length // MiB))
    assert s.sent < len(s.blob), \
        "%s: the server took all %d requests without their replies being " \
        "read" % (s.name, MAX_REQUESTS)
qt.log("sockets full after %.1fs; daemon RSS %d MiB, peak %d MiB" %
       (time.monotonic() - t0, rss() // 1024, peak[0] // 1024))

# The slow clients are stuck: another client must be served all the same.
libnbd_round(1, [DATA_END + 8 * MiB + i * 3 * MiB for i in range(8)])
for s in slow:
    assert not s.push(), "%s: the server read again while its replies " \
        "were still unread" % s.name
sample()
stuck_peak = max(peak[0], hwm())
qt.log("peak RSS of the daemon under the slow readers: %d MiB (bound %d "
       "MiB)" % (stuck_peak // 1024, bound_kib // 1024))
assert stuck_peak <= bound_kib

# The first reply of each stuck client is whole and right.
for s in slow:
    s.c.s.setblocking(True)
    s.c.s.settimeout(20)
simple, structured = slow
# Replies go out in the order the reads finish: the first one answers one
# of the requests the server took (2 for "simple", 64 for "structured").
err, cookie = simple.c.simple_reply()
assert err == 0 and cookie in (1, 2), \
    "simple: first reply error %d cookie %d" % (err, cookie)
off = (cookie - 1) * BIG_READ
data = simple.c.recv_exactly(BIG_READ)
qt.assert_same(data, shadow.read(off, BIG_READ), off)
del data
magic, flags, rtype, cookie, length = struct.unpack(
    ">IHHQI", structured.c.recv_exactly(20))
assert magic == qt.NBD_STRUCTURED_REPLY_MAGIC and 1 <= cookie <= 64, \
    "structured: first chunk magic 0x%x cookie %d" % (magic, cookie)
qt.log("first replies of the slow clients read and checked")

# Hang up on the rest: the daemon drops their replies and descriptors.
for s in slow:
    s.c.s.shutdown(socket.SHUT_RDWR)
    s.c.close()
deadline = time.monotonic() + 20
while qt.fd_count(srv.pid) > baseline_fds and time.monotonic() < deadline:
    time.sleep(0.1)
fds = qt.fd_count(srv.pid)
assert fds <= baseline_fds, \
    "daemon holds %d descriptors, %d before the slow readers" % \
    (fds, baseline_fds)
closed_rss = rss()
qt.log("slow clients closed: daemon back to %d descriptors, RSS %d MiB" %
       (fds, closed_rss // 1024))

# And the memory they made the daemon use goes back to the system.
freed_bound = qt.rss_bound_kib(srv.pid, FREED_BOUND_MB)
t1 = time.monotonic()
while rss() > freed_bound and time.monotonic() - t1 < TRIM_WAIT:
    time.sleep(0.1)
freed_rss = rss()
qt.log("daemon RSS %d MiB under the slow readers (peak), %d MiB when they "
       "had gone, %d MiB %.1fs later (bound %d MiB)" %
       (stuck_peak // 1024, closed_rss // 1024, freed_rss // 1024,
        time.monotonic() - t1, freed_bound // 1024))
assert freed_rss <= freed_bound, \
    "daemon RSS still %d MiB %gs after the slow readers had gone (bound %d " \
    "MiB): their memory was not given back" % \
    (freed_rss // 1024, TRIM_WAIT, freed_bound // 1024)

libnbd_round(2, [DATA_END + 40 * MiB + i * 2 * MiB for i in range(4)])
h = srv.connect()
shadow.verify(h)
h.shutdown()
sample()
qt.log("daemon at the end: RSS %d MiB, VmHWM %d MiB" %
       (rss() // 1024, hwm() // 1024))

qt.stop_and_compare(srv, img, shadow)
qt.log("PASS (%.1fs)" % (time.monotonic() - t0))
