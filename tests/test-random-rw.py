"""test-random-rw.py: random reads and writes of 1 byte to 1 MiB at odd
offsets, clustered around cluster boundaries, L2-table boundaries and the
very end of the disk, checked against a shadow copy; then, with the server
stopped, qemu-img check must find a clean image and qemu-img compare the
same data as the shadow.

Besides writes and reads, WRITE_ZEROES (the range must read as zeros) and
TRIM (each byte must read as what it held or as zero, and keep reading the
same) at the same kind of offsets.

Five images: 4 KiB clusters (an L2 table then covers 2 MiB, so a small disk
crosses several), 64 KiB clusters (an L2 table covers 512 MiB: the disk
is a little larger than that, sparse), 32 KiB clusters with extended L2
entries (1 KiB subclusters), and two served with --compress (zlib and
zstd), where a third of the writes are whole clusters of data that
compresses, so that compressed clusters are read, partly overwritten,
zeroed and trimmed.  All sizes end in a partial cluster.
"""

import json
import random

import qnbdtest as qt

nbd = qt.require_nbd()
qt.requires("qemu-img")
qt.seed()

OPS = 300
MAX_LEN = 1 << 20


def hot_spots(size, cluster, l2_span):
    """Offsets worth hitting: cluster and L2 boundaries, and the end."""
    spots = [0, cluster, 3 * cluster, size - 1]
    b = l2_span
    while b < size:
        spots.append(b)
        b += l2_span
    spots.append(size - size % cluster if size % cluster else size - cluster)
    return spots


def random_request(size, spots):
    """An (offset, length) inside the disk, near a hot spot most of the
    time, with an odd length and alignment most of the time."""
    r = random.random()
    if r < 0.15:
        length = random.randint(1, 16)
    elif r < 0.7:
        length = random.randint(1, 128 * 1024)
    else:
        length = random.randint(1, MAX_LEN)
    length = min(length, size)
    if random.random() < 0.8:
        centre = random.choice(spots)
        offset = centre - random.randint(0, length) + random.randint(-700, 700)
    else:
        offset = random.randrange(size)
    if random.random() < 0.2:
        offset &= ~511
    offset = max(0, min(offset, size - length))
    return offset, length


def compressible(offset, length, tag):
    """Bytes that compress (a block repeated, then zeros) and still depend
    on their offset and on tag."""
    block = qt.pattern(offset, 256, tag)
    data = block * (length // 2 // 256 + 1)
    return data[:length // 2] + bytes(length - length // 2)


def trim(h, shadow, offset, length):
    """TRIM, then each byte must be what it was or zero; the shadow takes
    what the disk now holds (later reads must keep seeing it)."""
    old = shadow.read(offset, length)
    h.trim(length, offset)
    got = h.pread(length, offset)
    if got != old and got != bytes(length):
        for i in range(length):
            assert got[i] == old[i] or got[i] == 0, \
                "TRIM at %d+%d: byte %d is 0x%02x, was 0x%02x" % \
                (offset, length, offset + i, got[i], old[i])
    shadow.write(offset, got)


def run(tmp, name, size, cluster, extended_l2=False, compress=None):
    qt.log("=== %s: size %d, cluster %d%s%s ===" %
           (name, size, cluster, ", extended L2" if extended_l2 else "",
            ", --compress (%s)" % compress if compress else ""))
    opts = []
    if extended_l2:
        opts.append("extended_l2=on")
    if compress:
        opts.append("compression_type=%s" % compress)
    img = qt.create_image(tmp, name, size, cluster_size=cluster,
                          extra_opts=",".join(opts) or None)
    l2_span = cluster // (16 if extended_l2 else 8) * cluster
    spots = hot_spots(size, cluster, l2_span)
    if extended_l2:
        # Subcluster boundaries inside the first clusters.
        spots += [k * cluster // 32 for k in range(1, 64)]
    shadow = qt.Shadow(size)

    srv = qt.Server(img, *(["--compress"] if compress else []))
    h = srv.connect()
    assert h.get_size() == size, "size %d, want %d" % (h.get_size(), size)

    # The last byte and the last sector, written first so that every later
    # read of the end also checks them.
    for off, data in ((size - 1, b"\xee"), (size - 512, qt.pattern(size - 512, 511, 1))):
        h.pwrite(data, off)
        shadow.write(off, data)

    for i in range(OPS):
        offset, length = random_request(size, spots)
        kind = random.random()
        if compress and kind < 0.2:
            # Whole clusters (the only writes stored compressed).
            n = random.randint(1, 4)
            offset = random.randrange(size // cluster - n + 1) * cluster
            data = compressible(offset, n * cluster, i)
            h.pwrite(data, offset)
            shadow.write(offset, data)
        elif kind < 0.55:
            data = qt.pattern(offset, length, i)
            flags = nbd.CMD_FLAG_FUA if random.random() < 0.1 else 0
            h.pwrite(data, offset, flags)
            shadow.write(offset, data)
        elif kind < 0.59:
            h.zero(length, offset)
            shadow.write(offset, bytes(length))
        elif kind < 0.63:
            trim(h, shadow, offset, length)
        elif kind < 0.97:
            qt.assert_same(h.pread(length, offset), shadow.read(offset, length),
                           offset)
        else:
            h.flush()

    # Everything, through a second connection.
    h.flush()
    h2 = srv.connect()
    shadow.verify(h2)
    h2.shutdown()
    h.shutdown()

    qt.stop_and_compare(srv, img, shadow)
    if compress:
        _, out = qt.run("qemu-img", "check", "--output=json", img)
        n = json.loads(out).get("compressed-clusters", 0)
        qt.log("%d compressed clusters at the end" % n)
        assert n > 0, "no cluster was left compressed: the run tested little"


tmp = qt.tmpdir()
run(tmp, "c4k.qcow2", 8 * 1024 * 1024 + 5 * 4096 + 1536, 4096)
run(tmp, "c64k.qcow2", 512 * 1024 * 1024 + 3 * 65536 + 2560, 65536)
# 1 KiB subclusters; the disk ends half-way into one.
run(tmp, "c32k-extl2.qcow2", 16 * 1024 * 1024 + 5 * 32768 + 1536, 32768,
    extended_l2=True)
run(tmp, "c64k-zlib.qcow2", 32 * 1024 * 1024 + 7 * 65536 + 2560, 65536,
    compress="zlib")
run(tmp, "c16k-zstd.qcow2", 8 * 1024 * 1024 + 5 * 16384 + 1536, 16384,
    compress="zstd")
qt.log("PASS")
