"""test-nbd-sparse-read.py: structured READ replies describe zeros with
NBD_REPLY_TYPE_OFFSET_HOLE chunks.

An image written with qemu-io (data, unallocated clusters, zero clusters,
data over a backing file's data, and past the end of the smaller backing
file clusters allocated nowhere) is read through qnbd:

- every read returns the right data, with structured replies (libnbd
  puts the chunks together) and without;
- the chunks of a read (pread_structured) cover it exactly, without
  overlap; a run of zeros of at least 4 KiB arrives as a hole chunk, and
  data as data chunks; zeros shorter than 4 KiB (512-byte clusters) go
  out inside the data chunk.  (Unallocated clusters over the backing file
  are read from it, and may be sent as data even where it has none.);
- with NBD_CMD_FLAG_DF the whole read is one data chunk;
- a read with more zero runs than the server maps (4 KiB clusters, every
  other one written, 16 MiB at once) is still exact.
"""

import os
import random

import qnbdtest as qt

nbd = qt.require_nbd()
qt.requires("qemu-img", "qemu-io")
qt.seed()

KIB = 1024
MIB = 1024 * 1024
CLUSTER = 65536
SIZE = 8 * MIB

tmp = qt.tmpdir()
backing = os.path.join(tmp, "backing.qcow2")
img = os.path.join(tmp, "disk.qcow2")
expected = os.path.join(tmp, "expected.raw")

qt.run("qemu-img", "create", "-f", "qcow2", backing, str(7 * MIB))
qt.run("qemu-io", "-f", "qcow2", "-c", "write -P 0x42 6M 512k", backing)
qt.run("qemu-img", "create", "-f", "qcow2", "-o", "cluster_size=%d" % CLUSTER,
       "-b", backing, "-F", "qcow2", img, str(SIZE))
qt.run("qemu-io", "-f", "qcow2",
       "-c", "write -P 0x11 0 256k",          # data
       "-c", "write -z 256k 128k",            # zero clusters
       "-c", "write -P 0x12 512k 64k",        # data after a hole
       "-c", "write -P 0x13 1M 1000",         # partial cluster
       "-c", "write -P 0x14 2M 1M",
       "-c", "write -z 2304k 64k",            # zeros inside data
       "-c", "write -P 0x15 6208k 64k",       # over the backing data
       img)
qt.run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", img, expected)
with open(expected, "rb") as f:
    WANT = f.read()
assert len(WANT) == SIZE


def chunks_of(h, length, offset, flags=0):
    """pread_structured: (data, [(offset, length, status), ...])."""
    chunks = []

    def cb(buf, off, status, err):
        chunks.append((off, len(buf), status))
        if status == nbd.READ_HOLE:
            assert buf == bytes(len(buf)), "hole chunk with data in it"
        return 0

    data = h.pread_structured(length, offset, cb, flags)
    return data, sorted(chunks)


def check_cover(chunks, offset, length, what):
    """The chunks cover [offset, offset+length) exactly once."""
    pos = offset
    for off, n, status in chunks:
        assert n > 0, "%s: empty chunk" % what
        assert off == pos, "%s: chunk at %d, expected %d" % (what, off, pos)
        assert status in (nbd.READ_DATA, nbd.READ_HOLE), \
            "%s: chunk status %d" % (what, status)
        pos += n
    assert pos == offset + length, "%s: chunks end at %d" % (what, pos)


srv = qt.Server(img)
h = srv.connect()
assert h.get_structured_replies_negotiated()
assert h.can_df(), "DF not advertised with structured replies"

# --- Holes arrive as hole chunks, data as data chunks. ---
cases = [
    (0, 1 * MIB),            # data, zero clusters, hole, data, hole
    (256 * KIB, 128 * KIB),  # zero clusters only
    (3 * MIB, 2 * MIB),      # unallocated (over the backing file's hole)
    (2 * MIB, 1 * MIB),      # data with a zero cluster inside
    (6 * MIB - 4096, 2 * MIB + 4096),  # backing data, overlay data,
                                       # allocated nowhere
    (7 * MIB + 4096, 8192),  # allocated nowhere
]
for offset, length in cases:
    what = "read %d+%d" % (offset, length)
    data, chunks = chunks_of(h, length, offset)
    qt.assert_same(data, WANT[offset:offset + length], offset)
    check_cover(chunks, offset, length, what)
    qt.log("%s: %s" % (what, chunks))
    for off, n, status in chunks:
        if status == nbd.READ_HOLE:
            assert n >= 4096, "%s: hole chunk of %d bytes" % (what, n)
    # Zero clusters, and clusters allocated nowhere in the chain, came as
    # holes.
    holes = [(o, n) for o, n, s in chunks if s == nbd.READ_HOLE]
    for zoff, zlen in ((256 * KIB, 128 * KIB), (2304 * KIB, 64 * KIB),
                       (7 * MIB, 1 * MIB)):
        lo, hi = max(zoff, offset), min(zoff + zlen, offset + length)
        if hi - lo >= 4096:
            assert any(o <= lo and hi <= o + n for o, n in holes), \
                "%s: zeros %d..%d not sent as a hole" % (what, lo, hi)
    data_chunks = [(o, n) for o, n, s in chunks if s == nbd.READ_DATA]
    for doff, dlen in ((0, 256 * KIB), (2 * MIB, 256 * KIB), (6 * MIB, 64 * KIB)):
        lo, hi = max(doff, offset), min(doff + dlen, offset + length)
        if hi > lo:
            assert any(o <= lo and hi <= o + n for o, n in data_chunks), \
                "%s: data %d..%d not in one data chunk" % (what, lo, hi)

# --- DF: one data chunk, zeros included. ---
for offset, length in cases + [(100, 65536), (0, 8 * MIB - 4096)]:
    length = min(length, 32 * MIB)
    data, chunks = chunks_of(h, length, offset, nbd.CMD_FLAG_DF)
    qt.assert_same(data, WANT[offset:offset + length], offset)
    assert chunks == [(offset, length, nbd.READ_DATA)], \
        "DF read %d+%d: chunks %s" % (offset, length, chunks)

# --- Random reads, structured and simple. ---
hs = srv.connect()
h2 = nbd.NBD()
h2.set_request_structured_replies(False)
h2.connect_uri(srv.uri)
assert not h2.get_structured_replies_negotiated()
assert not h2.can_df(), "DF advertised without structured replies"
for i in range(200):
    offset = random.randrange(SIZE)
    length = random.randint(1, min(SIZE - offset, 2 * MIB))
    qt.assert_same(hs.pread(length, offset), WANT[offset:offset + length],
                   offset)
    qt.assert_same(h2.pread(length, offset), WANT[offset:offset + length],
                   offset)
    _, chunks = chunks_of(hs, length, offset)
    check_cover(chunks, offset, length, "random read %d+%d" % (offset, length))
hs.shutdown()
h2.shutdown()
h.shutdown()
assert srv.stop() == 0
qt.check_image(img)

# --- Small zeros stay inside the data chunk; a crowded map. ---
for cluster, size in ((512, 1 * MIB), (4096, 20 * MIB)):
    small = qt.create_image(tmp, "c%d.qcow2" % cluster, size,
                            cluster_size=cluster)
    srv = qt.Server(small)
    h = srv.connect()
    want = bytearray(size)
    for c in range(0, size // cluster, 2):
        piece = qt.pattern(c * cluster, cluster, cluster)
        h.pwrite(piece, c * cluster)
        want[c * cluster:(c + 1) * cluster] = piece
    want = bytes(want)
    length = min(size, 16 * MIB)
    data, chunks = chunks_of(h, length, 0)
    qt.assert_same(data, want[:length], 0)
    check_cover(chunks, 0, length, "%d-byte clusters" % cluster)
    qt.log("%d-byte clusters, every other one written: %d chunks" %
           (cluster, len(chunks)))
    if cluster < 4096:
        assert chunks == [(0, length, nbd.READ_DATA)], \
            "512-byte holes sent apart: %s" % chunks[:8]
    else:
        assert any(s == nbd.READ_HOLE for o, n, s in chunks), \
            "no hole chunk for 4 KiB holes"
    h.shutdown()
    assert srv.stop() == 0
    qt.check_image(small)

qt.log("PASS")
