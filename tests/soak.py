#!/usr/bin/env python3
"""tests/soak.py: the soak test (make check-soak; not in the default run).

64 connections to one export, each keeping 16 requests in flight: a mix of
reads, writes, flushes and trims, for SOAK_SECONDS (default 120).  With
that many connections most replies are written by the reply thread
(server/sender.c), and the clients that never read below have theirs
come back to the loop with EAGAIN.  Each
connection owns its own part of the disk and keeps a shadow of it, so every
read is checked as it completes.  At the end all data is verified, qemu-img
check must be clean, and the daemon's peak RSS must stay under the bound
below (SOAK_RSS_MB, default 320 MiB: the memory budget, 128 MiB, and
the daemon's own; a normal build peaks near 70 MiB without the clients
below and near 220 MiB with them, AddressSanitizer builds get eight times
the bound for their quarantine).

Beside them, NONREADERS raw clients send READs of 32 MiB and never read a
reply, for the whole run: the daemon runs with --max-memory=SOAK_MAX_MB
(default 128) and must keep the RSS bound with them (they would take
16 x 64 MiB without the daemon-wide budget) while still serving the 64
connections.

Then a second run, for SOAK_COMPRESS_SECONDS (default a quarter of
SOAK_SECONDS), serves another image with --compress to 16 connections
whose writes are mostly whole clusters that compress (to a few bytes, or
to about 40%), mixed with partial writes, trims, write-zeroes and flushes:
trims then often empty the host cluster being packed, which must never be
freed while later clusters are packed into it.  The same checks apply.

Last, for SOAK_PREALLOC_SECONDS (default a quarter of SOAK_SECONDS), the
64 connections work on an image made by "qnbd-img create -o
preallocation=metadata": writes land in place without allocating, trims
free clusters that later writes allocate again.  The same checks apply.

The first two runs use the default busy polling (server/busy-poll.c: the
loop spins while the connections keep it busy), the last one
--busy-poll=0 (it always sleeps), so both ways of waiting are soaked.
"""

import os
import random
import threading
import time

import qnbdtest as qt

nbd = qt.require_nbd()
qt.requires("qemu-img")
qt.seed()

SECONDS = float(os.environ.get("SOAK_SECONDS", "120"))
COMPRESS_SECONDS = float(os.environ.get("SOAK_COMPRESS_SECONDS",
                                        str(SECONDS / 4)))
COMPRESS_CONNS = 16
PREALLOC_SECONDS = float(os.environ.get("SOAK_PREALLOC_SECONDS",
                                        str(SECONDS / 4)))
QNBD_IMG = os.environ.get("QNBD_IMG") or os.path.join(
    os.path.dirname(qt.QNBD), "..", "tools", "qnbd-img")
RSS_MB = int(os.environ.get("SOAK_RSS_MB", "320"))
MAX_MB = int(os.environ.get("SOAK_MAX_MB", "128"))
NONREADERS = 16
BIG_READ = 32 << 20
CONNS = 64
DEPTH = 16
PART = 4 << 20                  # bytes of disk per connection
SIZE = CONNS * PART

tmp = qt.tmpdir()
img = qt.create_image(tmp, "soak.qcow2", SIZE, cluster_size=65536)
srv = qt.Server(img, "--max-memory=%dM" % MAX_MB)
failures = []
counts = [0] * CONNS
peak_rss = [0]


def rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def compressible(n, salt):
    """n bytes that compress: a repeated word, or 40% random then zeros."""
    if salt % 2:
        word = ("%012d-" % salt).encode()
        return (word * (n // len(word) + 1))[:n]
    head = os.urandom(n * 2 // 5)
    return head + bytes(n - len(head))


def client(i, deadline, srv=srv, compress=False):
    h = srv.connect()
    base = i * PART
    shadow = bytearray(PART)
    busy = set()                # 64 KiB blocks with a request in flight
    try:
        while time.monotonic() < deadline:
            while h.aio_in_flight() < DEPTH:
                blk = random.randrange(PART // 65536)
                if blk in busy:
                    break
                off = blk * 65536 + random.randrange(0, 128) * 512
                length = random.randrange(1, blk * 65536 + 65536 - off + 1)
                kind = random.random()
                busy.add(blk)

                def done(err, blk=blk):
                    if err.value != 0:
                        failures.append("conn %d: errno %d" % (i, err.value))
                    busy.discard(blk)
                    counts[i] += 1
                    return 1
                if compress and kind < 0.35:
                    # A whole cluster: stored compressed, or, one in five
                    # random, refused by the compressor's fast trial and
                    # stored as a normal cluster.
                    start = blk * 65536
                    if kind < 0.28:
                        data = compressible(65536, counts[i] + i * 7919)
                    else:
                        data = os.urandom(65536)
                    shadow[start:start + 65536] = data
                    h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)),
                                 base + start, completion=done)
                elif compress and 0.9 <= kind < 0.93:
                    start = blk * 65536
                    shadow[start:start + 65536] = bytes(65536)
                    h.aio_zero(65536, base + start, completion=done)
                elif kind < 0.45:
                    data = os.urandom(length)
                    shadow[off:off + length] = data
                    h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)),
                                 base + off, completion=done)
                elif kind < 0.9:
                    buf = nbd.Buffer(length)
                    want = bytes(shadow[off:off + length])

                    def rdone(err, buf=buf, want=want, off=off, d=done):
                        if err.value == 0 and buf.to_bytearray() != want:
                            failures.append("conn %d: bad data at %d"
                                            % (i, base + off))
                        return d(err)
                    h.aio_pread(buf, base + off, completion=rdone)
                elif kind < 0.95:
                    # A flush holds no block: its completion must not free
                    # one that another request may have taken since.
                    busy.discard(blk)

                    def fdone(err):
                        if err.value != 0:
                            failures.append("conn %d: flush errno %d"
                                            % (i, err.value))
                        counts[i] += 1
                        return 1
                    h.aio_flush(completion=fdone)
                else:
                    start = blk * 65536
                    shadow[start:start + 65536] = bytes(65536)
                    h.aio_trim(65536, base + start, completion=done)
            h.poll(100)
        while h.aio_in_flight() > 0:
            h.poll(1000)
        got = h.pread(PART, base)
        if got != bytes(shadow):
            failures.append("conn %d: final contents differ" % i)
    except nbd.Error as e:
        failures.append("conn %d: %s" % (i, e))
    h.shutdown()


with open("/proc/%d/maps" % srv.pid) as f:
    if "libasan" in f.read():
        RSS_MB *= 8


def nonreader(deadline):
    """A client that sends 32 MiB READs until its socket is full and
    never reads a reply."""
    c = qt.RawClient(srv.sock)
    c.export_name()
    blob = b"".join(qt.nbd_request(qt.NBD_CMD_READ, k + 1,
                                   (k % (SIZE // BIG_READ)) * BIG_READ,
                                   BIG_READ) for k in range(2000))
    sent = 0
    c.s.settimeout(0.5)
    while time.monotonic() < deadline and sent < len(blob):
        try:
            sent += c.s.send(blob[sent:sent + 65536])
        except OSError:
            pass
    while time.monotonic() < deadline:
        time.sleep(0.5)
    c.close()


deadline = time.monotonic() + SECONDS
threads = [threading.Thread(target=client, args=(i, deadline))
           for i in range(CONNS)]
threads += [threading.Thread(target=nonreader, args=(deadline,))
            for i in range(NONREADERS)]
for t in threads:
    t.start()
while any(t.is_alive() for t in threads):
    peak_rss[0] = max(peak_rss[0], rss_kib(srv.pid))
    time.sleep(0.5)
for t in threads:
    t.join()
assert srv.stop() == 0
qt.check_image(img)
qt.log("%d requests, peak RSS %d MiB (bound %d MiB)"
       % (sum(counts), peak_rss[0] // 1024, RSS_MB))
assert not failures, "\n".join(failures[:20])
assert peak_rss[0] < RSS_MB * 1024, "RSS above the bound"

# ---- the compressed-write cache ----
cimg = qt.create_image(tmp, "soak-compress.qcow2", COMPRESS_CONNS * PART,
                       cluster_size=65536)
csrv = qt.Server(cimg, "--compress")
counts = [0] * CONNS
deadline = time.monotonic() + COMPRESS_SECONDS
threads = [threading.Thread(target=client, args=(i, deadline, csrv, True))
           for i in range(COMPRESS_CONNS)]
for t in threads:
    t.start()
for t in threads:
    t.join()
assert csrv.stop() == 0
qt.check_image(cimg)
qt.log("--compress: %d requests" % sum(counts))
assert not failures, "\n".join(failures[:20])

# ---- a preallocated image made by qnbd-img ----
pimg = os.path.join(tmp, "soak-prealloc.qcow2")
qt.run(QNBD_IMG, "create", "-o", "cluster_size=65536,preallocation=metadata",
       pimg, str(SIZE))
psrv = qt.Server(pimg, "--busy-poll=0")
counts = [0] * CONNS
deadline = time.monotonic() + PREALLOC_SECONDS
threads = [threading.Thread(target=client, args=(i, deadline, psrv))
           for i in range(CONNS)]
for t in threads:
    t.start()
for t in threads:
    t.join()
assert psrv.stop() == 0
qt.check_image(pimg)
qt.log("preallocation=metadata: %d requests" % sum(counts))
assert not failures, "\n".join(failures[:20])
