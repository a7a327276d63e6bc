"""test-fairness-compressed.py: readers of compressed clusters must not
stall another client.

Decompressing a 64 KiB cluster takes a good part of a millisecond; done on
the loop thread, 4 clients reading compressed data (each with READERS_DEPTH
reads of 2 MiB in flight) pushed another client's 99th percentile latency
of 4 KiB reads to 145 ms.  Decompression runs on worker threads (an
AIO_CALL op of the I/O backend), so the loop goes on serving meanwhile.

The image is made by qemu-img convert -c (every cluster compressed), then
DATA bytes past the compressed part are written uncompressed by qemu-io;
a probing client reads 4 KiB of them at random, one at a time, for
PROBE_SECONDS while the readers run (each in a process of its own), and
its latency is judged as in test-fairness.py (qnbdtest.judge_latency).
Before the fix: p50 16.6 ms, p99 106 ms; after: p50 0.05 ms, p99 3.5 ms.
The readers check some of what they read.

Then the same with writers: a server with --compress, 4 clients writing
2 MiB of compressible text (whole clusters, compressed on the way in)
with WRITERS_DEPTH writes in flight, and the probe beside them.
Compression also runs on the workers.
"""

import os
import random
import subprocess
import sys
import time

import qnbdtest as qt

MiB = 1024 * 1024
COMPRESSED = 64 * MiB           # [0, COMPRESSED) is compressed
DATA = 16 * MiB                 # then [COMPRESSED, +DATA) is not
SIZE = COMPRESSED + DATA
READERS = 4
READERS_DEPTH = 4
WRITERS_DEPTH = 4
READ = 2 * MiB
PROBE_SECONDS = 6.0
P99_BOUND = 0.050               # seconds
MEDIAN_BOUND = 0.010


def content(off, n):
    """The compressed part: text-like, so that it compresses but takes
    real work to decompress."""
    rnd = random.Random(off)
    words = [bytes(rnd.choice(b"abcdefghijklmnopqrstuvwxyz ")
                   for _ in range(rnd.randrange(2, 9))) for _ in range(256)]
    out = bytearray()
    while len(out) < n:
        out += rnd.choice(words)
    return bytes(out[:n])


def reader(uri, seconds, raw):
    """One client reading compressed data, READERS_DEPTH reads in flight;
    every tenth read is checked against raw."""
    import nbd
    with open(raw, "rb") as f:
        want = f.read(COMPRESSED)
    h = nbd.NBD()
    h.connect_uri(uri)
    slots = [[nbd.Buffer(READ), None, 0] for _ in range(READERS_DEPTH)]
    n = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for s in slots:
            if s[1] is not None:
                if not h.aio_command_completed(s[1]):
                    continue
                n += 1
                if n % 10 == 0 and \
                   s[0].to_bytearray() != want[s[2]:s[2] + READ]:
                    print("reader: wrong data at %d" % s[2], flush=True)
                    sys.exit(1)
            s[2] = random.randrange(COMPRESSED // READ) * READ
            s[1] = h.aio_pread(s[0], s[2])
        h.poll(1000)
    while h.aio_in_flight() > 0:
        h.poll(1000)
    h.shutdown()
    print("reader: %d reads of %d MiB of compressed data" %
          (n, READ // MiB), flush=True)
    sys.exit(0 if n > 0 else 1)


def writer(uri, seconds):
    """One client writing compressible whole clusters, WRITERS_DEPTH
    writes in flight."""
    import nbd
    h = nbd.NBD()
    h.connect_uri(uri)
    blobs = [nbd.Buffer.from_bytearray(bytearray(content(k * READ, READ)))
             for k in range(WRITERS_DEPTH)]
    slots = [None] * WRITERS_DEPTH
    n = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for k in range(WRITERS_DEPTH):
            if slots[k] is not None:
                if not h.aio_command_completed(slots[k]):
                    continue
                n += 1
            off = random.randrange(COMPRESSED // READ) * READ
            slots[k] = h.aio_pwrite(blobs[k], off)
        h.poll(1000)
    while h.aio_in_flight() > 0:
        h.poll(1000)
    h.shutdown()
    print("writer: %d writes of %d MiB of compressible data" %
          (n, READ // MiB), flush=True)
    sys.exit(0 if n > 0 else 1)


if len(sys.argv) == 5 and sys.argv[1] == "--reader":
    reader(sys.argv[2], float(sys.argv[3]), sys.argv[4])
if len(sys.argv) == 4 and sys.argv[1] == "--writer":
    writer(sys.argv[2], float(sys.argv[3]))

nbd = qt.require_nbd()
qt.requires("qemu-img", "qemu-io")
qt.seed()

tmp = qt.tmpdir()
raw = os.path.join(tmp, "src.raw")
with open(raw, "wb") as f:
    for off in range(0, COMPRESSED, MiB):
        f.write(content(off, MiB))
    f.truncate(SIZE)
img = os.path.join(tmp, "disk.qcow2")
qt.run("qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", raw, img)
qt.run("qemu-io", "-f", "qcow2", "-c",
       "write -P 0x5a %d %d" % (COMPRESSED, DATA), img)
srv = qt.Server(img)


def probe(h, seconds):
    lat = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        off = COMPRESSED + random.randrange(DATA // 4096) * 4096
        t0 = time.monotonic()
        buf = h.pread(4096, off)
        lat.append(time.monotonic() - t0)
        assert buf == b"\x5a" * 4096, "wrong data at %d" % off
    return sorted(lat)


h = srv.connect()


def measure(role, extra, what):
    """The probe's latencies with READERS clients of role (--reader or
    --writer) running beside it, judged against the probe alone."""
    quiet = probe(h, 1.0)
    load = [subprocess.Popen([sys.executable, os.path.abspath(__file__),
                              role, srv.uri, str(PROBE_SECONDS + 2)] + extra)
            for _ in range(READERS)]
    try:
        time.sleep(1.0)
        lat = probe(h, PROBE_SECONDS)
    finally:
        status = max(p.wait(120) for p in load)
    assert status == 0, "the %s clients failed (status %d)" % (role, status)
    quiet += probe(h, 1.0)
    return qt.judge_latency(lat, sorted(quiet), P99_BOUND, MEDIAN_BOUND,
                            "4 KiB reads beside %d %s of compressed "
                            "clusters" % (READERS, what))


qt.assert_latency_in_tries(lambda: measure("--reader", [raw], "readers"))
h.shutdown()
assert srv.stop() == 0

# ---- writers under --compress ----
wimg = os.path.join(tmp, "wdisk.qcow2")
qt.run("qemu-img", "create", "-f", "qcow2", wimg, str(SIZE))
qt.run("qemu-io", "-f", "qcow2", "-c",
       "write -P 0x5a %d %d" % (COMPRESSED, DATA), wimg)
srv = qt.Server(wimg, "--compress")
h = srv.connect()
qt.assert_latency_in_tries(lambda: measure("--writer", [], "writers"))
h.shutdown()
assert srv.stop() == 0
qt.check_image(wimg)
