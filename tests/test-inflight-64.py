"""test-inflight-64.py: 64 requests in flight on one connection.

Round 1: 64 aio_pwrite to distinct places (some in the same cluster, some
allocating, some sharing an L2 table) all issued before any reply is read.
Round 2: 64 aio_pread of the same places, in another order, all in flight.
Round 3: 64 mixed requests: new writes to fresh places interleaved with
reads of places written in round 1.
Whatever order the replies come back in, each request must complete without
error exactly once and every read must return the data written there.
"""

import random
import time

import qnbdtest as qt

nbd = qt.require_nbd()
qt.requires("qemu-img")
qt.seed()

N = 64
SIZE = 64 * 1024 * 1024
CLUSTER = 65536


class Tracker:
    """Completion bookkeeping for one round of aio requests."""

    def __init__(self):
        self.done = {}          # request index -> errno
        self.order = []         # completion order of indices
        self.twice = []         # indices completed more than once

    def callback(self, i):
        def cb(err):
            # No assert here: an exception inside a libnbd callback would
            # not reach the test.  wait() judges.
            if i in self.done:
                self.twice.append(i)
            self.done[i] = err.value
            self.order.append(i)
            return 1            # retire the command
        return cb

    def wait(self, h, n):
        deadline = time.monotonic() + 60
        while len(self.done) < n:
            assert time.monotonic() < deadline, \
                "only %d of %d replies after 60s" % (len(self.done), n)
            h.poll(1000)
        assert h.aio_in_flight() == 0, "%d still in flight" % h.aio_in_flight()
        assert not self.twice, "requests completed twice: %r" % self.twice
        failed = {i: e for i, e in self.done.items() if e != 0}
        assert not failed, "requests failed: %r" % failed
        qt.log("completion order: %s" % self.order)


def places(count, rng):
    """count non-overlapping (offset, length) regions of 1..200 KiB, some
    inside one cluster, some crossing cluster boundaries."""
    out = []
    slot = SIZE // (2 * count)
    for i in range(count):
        base = (2 * i) * slot
        length = rng.choice((1, 512, 4096, 65536, 65536 + 1, 3 * 65536 - 7,
                             rng.randint(1, 200 * 1024)))
        offset = base + rng.randint(0, slot - length)
        if rng.random() < 0.3:
            # Straddle a cluster edge, still inside this region's slot.
            offset = base + 4 * CLUSTER - length // 2
        out.append((offset, length))
    return out


tmp = qt.tmpdir()
img = qt.create_image(tmp, "disk.qcow2", SIZE, cluster_size=CLUSTER)
srv = qt.Server(img)
h = srv.connect()
rng = random.Random(random.randrange(1 << 32))
shadow = qt.Shadow(SIZE)

# Round 1: 64 writes in flight.
regions = places(N, rng)
t = Tracker()
bufs = []
for i, (off, length) in enumerate(regions):
    data = qt.pattern(off, length, 1)
    shadow.write(off, data)
    b = nbd.Buffer.from_bytearray(data)
    bufs.append(b)
    h.aio_pwrite(b, off, t.callback(i))
peak = h.aio_in_flight()
qt.log("in flight after issuing the writes: %d" % peak)
t.wait(h, N)

# Round 2: 64 reads in flight, issued in a shuffled order.
order = list(range(N))
rng.shuffle(order)
t = Tracker()
rbufs = {}
for i in order:
    off, length = regions[i]
    rbufs[i] = nbd.Buffer(length)
    h.aio_pread(rbufs[i], off, t.callback(i))
t.wait(h, N)
for i, (off, length) in enumerate(regions):
    qt.assert_same(bytes(rbufs[i].to_bytearray()), shadow.read(off, length), off)

# Round 3: writes to the free slots between round-1 regions, interleaved
# with reads of round-1 regions (never the same bytes, so any order of
# execution gives the same answers).
slot = SIZE // (2 * N)
t = Tracker()
rbufs = {}
bufs = []
for i in range(N):
    if i % 2 == 0:
        off = (2 * i + 1) * slot + rng.randint(0, slot // 2)
        length = rng.randint(1, slot // 2)
        data = qt.pattern(off, length, 3)
        shadow.write(off, data)
        b = nbd.Buffer.from_bytearray(data)
        bufs.append(b)
        flags = nbd.CMD_FLAG_FUA if i % 8 == 0 else 0
        h.aio_pwrite(b, off, t.callback(i), flags)
    else:
        off, length = regions[i]
        rbufs[i] = (off, nbd.Buffer(length))
        h.aio_pread(rbufs[i][1], off, t.callback(i))
t.wait(h, N)
for i, (off, b) in rbufs.items():
    qt.assert_same(bytes(b.to_bytearray()), shadow.read(off, len(b)), off)

h.flush()
shadow.verify(h)
h.shutdown()

qt.stop_and_compare(srv, img, shadow)
qt.log("PASS")
