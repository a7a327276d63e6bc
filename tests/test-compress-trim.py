"""test-compress-trim.py: --compress with trims, write-zeroes and
overwrites must lose nothing.

With --compress, compressed clusters are packed into one host cluster held
in memory until it is full.  If every compressed cluster packed so far is
trimmed, that host cluster must not be freed (and handed to the allocator,
and punched) while later clusters are still being packed into it.

First the exact sequence that once lost data (issue 9, item 1), then a
random mix of compressible and incompressible writes, trims, write-zeroes
and flushes, checked against a shadow copy, across a restart, and finally
with qemu-img check and compare.
"""

import os
import random

import qnbdtest as qt

nbd = qt.require_nbd()
qt.requires("qemu-img")
qt.seed()

CS = 64 * 1024


def fill(ch):
    return ch * CS


def packed_after_trim(tmp, name):
    """A --compress server on a new image where A was written, flushed,
    trimmed and flushed, then B written and flushed: B was packed into
    the host cluster that A's trim emptied.  Returns the server, a
    handle, the image, the shadow and a write function."""
    img = qt.create_image(tmp, name, 64 << 20, cluster_size=CS)
    shadow = qt.Shadow(64 << 20)
    srv = qt.Server(img, "--compress")
    h = srv.connect()

    def write(data, off):
        h.pwrite(data, off)
        shadow.write(off, data)

    write(fill(b"A"), 0)
    h.flush()
    h.trim(CS, 0)
    shadow.write(0, bytes(CS))
    h.flush()
    write(fill(b"B"), CS)
    h.flush()
    return srv, h, img, shadow, write


def exact_sequence(tmp):
    qt.log("=== the sequence of issue 9 ===")
    srv, h, img, shadow, write = packed_after_trim(tmp, "seq.qcow2")
    write(os.urandom(CS), 2 * CS)          # does not compress: stored whole
    write(fill(b"D"), 3 * CS)
    h.flush()
    qt.assert_same(h.pread(CS, 2 * CS), shadow.read(2 * CS, CS), 2 * CS)
    shadow.verify(h)
    h.shutdown()
    qt.stop_and_compare(srv, img, shadow)

    # Without the last writes, B must survive a restart.
    srv, h, img, shadow, write = packed_after_trim(tmp, "seq2.qcow2")
    h.shutdown()
    qt.stop_and_compare(srv, img, shadow)
    srv = qt.Server(img, "--compress")
    h = srv.connect()
    shadow.verify(h)
    h.shutdown()
    qt.stop_and_compare(srv, img, shadow)


def compressible(i):
    """A cluster that compresses, different for every i: to a few bytes,
    or to about 40% (so that a packed host cluster holds only two or three
    of them and is often emptied by trims before it is full)."""
    if i % 2:
        word = ("%08d-" % i).encode()
        return (word * (CS // len(word) + 1))[:CS]
    head = random.Random(i).randbytes(CS * 2 // 5)
    return head + bytes(CS - len(head))


def random_mix(tmp, cluster, rounds, ops):
    qt.log("=== random mix, %d-byte clusters ===" % cluster)
    global CS
    CS = cluster
    size = 256 * cluster + 3 * 512
    img = qt.create_image(tmp, "mix%d.qcow2" % cluster, size,
                          cluster_size=cluster)
    shadow = qt.Shadow(size)
    nclusters = size // cluster
    i = 0
    for rnd in range(rounds):
        srv = qt.Server(img, "--compress")
        h = srv.connect()
        # Most of the work in a few clusters, so that trims often empty
        # the cluster being packed.
        hot = random.sample(range(nclusters), 4)
        for _ in range(ops):
            i += 1
            c = random.choice(hot) if random.random() < 0.8 \
                else random.randrange(nclusters)
            off = c * cluster
            k = random.random()
            if k < 0.35:
                data = compressible(i)
                h.pwrite(data, off)
                shadow.write(off, data)
            elif k < 0.45:
                data = os.urandom(cluster)
                h.pwrite(data, off)
                shadow.write(off, data)
            elif k < 0.55:
                # Partial write: into a compressed cluster, the whole
                # cluster is rewritten uncompressed.
                o = off + random.randrange(cluster)
                n = min(random.randint(1, cluster), size - o)
                data = qt.pattern(o, n, i)
                h.pwrite(data, o)
                shadow.write(o, data)
            elif k < 0.75:
                n = cluster * random.randint(1, 3)
                n = min(n, size - off)
                h.trim(n, off)
                shadow.write(off, bytes(n))
            elif k < 0.85:
                n = min(cluster * random.randint(1, 2), size - off)
                flags = nbd.CMD_FLAG_NO_HOLE if random.random() < 0.3 else 0
                h.zero(n, off, flags)
                shadow.write(off, bytes(n))
            elif k < 0.95:
                h.flush()
            else:
                n = min(cluster * 2, size - off)
                qt.assert_same(h.pread(n, off), shadow.read(off, n), off)
        shadow.verify(h)
        h.shutdown()
        qt.stop_and_compare(srv, img, shadow)


tmp = qt.tmpdir()
exact_sequence(tmp)
random_mix(tmp, 64 * 1024, 3, 400)
random_mix(tmp, 4096, 3, 400)
qt.log("PASS")
