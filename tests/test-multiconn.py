"""test-multiconn.py: four connections to one export at once.

1. All four write concurrently, each its own stripes; stripes are not
   cluster-aligned, so neighbouring stripes of different connections share
   clusters (two connections allocating the same cluster at once).
2. All four write the same data to one region at once (any order of
   execution gives the same result).
3. Overlapping writes from different connections, one after the other.
4. One connection flushes; every connection then reads the whole disk and
   must see every write, whoever made it (multi-conn consistency).
Then the server is stopped, and the image must check clean and compare
equal to the shadow copy.
"""

import time

import qnbdtest as qt

nbd = qt.require_nbd()
qt.requires("qemu-img")
qt.seed()

CONNS = 4
SIZE = 16 * 1024 * 1024
CLUSTER = 4096
STRIPE = 100000                 # not a multiple of the cluster size


def wait_all(handles, pending):
    """Poll every handle until pending (a dict cookie-list per handle) is
    empty; every command must succeed."""
    deadline = time.monotonic() + 60
    while any(h.aio_in_flight() for h in handles):
        assert time.monotonic() < deadline, "replies missing after 60s"
        for h in handles:
            if h.aio_in_flight():
                h.poll(10)
    for h, cookies in pending.items():
        for c in cookies:
            # Raises nbd.Error if the command failed.
            assert h.aio_command_completed(c), "command %d not completed" % c
        cookies.clear()


tmp = qt.tmpdir()
img = qt.create_image(tmp, "disk.qcow2", SIZE, cluster_size=CLUSTER)
srv = qt.Server(img)
handles = [srv.connect() for _ in range(CONNS)]
for h in handles:
    assert h.can_multi_conn(), "multi-conn not advertised"
shadow = qt.Shadow(SIZE)
pending = {h: [] for h in handles}
keep = []                       # buffers must live until completion

# 1. Concurrent writes, stripe k goes to connection k % CONNS.
stripes = (SIZE // 2) // STRIPE
for k in range(stripes):
    h = handles[k % CONNS]
    off = k * STRIPE
    data = qt.pattern(off, STRIPE, 1)
    shadow.write(off, data)
    b = nbd.Buffer.from_bytearray(data)
    keep.append(b)
    pending[h].append(h.aio_pwrite(b, off))
qt.log("phase 1: %d writes in flight on %d connections" %
       (sum(h.aio_in_flight() for h in handles), CONNS))
wait_all(handles, pending)

# 2. The same data to the same region from every connection at once.
off, length = SIZE // 2 + 12345, 300000
data = qt.pattern(off, length, 2)
shadow.write(off, data)
for h in handles:
    b = nbd.Buffer.from_bytearray(data)
    keep.append(b)
    pending[h].append(h.aio_pwrite(b, off))
wait_all(handles, pending)

# 3. Overlapping writes, in a known order, each on another connection.
base = SIZE // 2 + 1024 * 1024
for i, (rel, length) in enumerate(((0, 1 << 20), (4096 + 17, 200000),
                                   (150000, 500000), (1000, 10))):
    h = handles[i % CONNS]
    o = base + rel
    data = qt.pattern(o, length, 10 + i)
    h.pwrite(data, o)
    shadow.write(o, data)
    # Every other connection sees it at once.
    for other in handles:
        qt.assert_same(other.pread(length, o), data, o)

# 4. Flush on one connection, then everyone reads everything.
handles[3].flush()
for h in handles:
    shadow.verify(h)
for h in handles:
    h.shutdown()

qt.stop_and_compare(srv, img, shadow)
qt.log("PASS")
