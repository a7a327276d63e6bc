"""test-nbd-block-status.py: NBD_CMD_BLOCK_STATUS with the metadata
contexts base:allocation and qemu:allocation-depth, judged against
qemu-img map.

The image is the top of a backing chain of depth 3 with a raw file at the
bottom, each layer smaller than the one above (so part of the disk is
allocated nowhere), prepared with qemu-io: data, zero clusters
(write -z), holes, a raw hole, a discarded cluster over backing data, and
different cluster sizes per layer.

- The whole map of both contexts, read through qnbd, must agree with
  `qemu-img map --output=json` at every byte.
- Random ranges: extents start at the offset asked for, never go past its
  end, and agree with the map; with NBD_CMD_FLAG_REQ_ONE each context
  answers with exactly one extent.
- A client that selects one context gets one chunk per request.
- An image of more extents than one reply holds (4 KiB clusters, every
  other one written) is described by prefixes that join up exactly.
- NBD_OPT_LIST_META_CONTEXT: no query lists both contexts, "base:" and
  "qemu:" list their namespace, unknown queries are ignored; "base:"
  selects nothing in NBD_OPT_SET_META_CONTEXT.
"""

import json
import os
import random

import qnbdtest as qt

nbd = qt.require_nbd()
qt.requires("qemu-img", "qemu-io")
qt.seed()

BASE = "base:allocation"
DEPTH = "qemu:allocation-depth"
KIB = 1024
MIB = 1024 * 1024

tmp = qt.tmpdir()
base = os.path.join(tmp, "base.raw")
mid = os.path.join(tmp, "mid.qcow2")
top = os.path.join(tmp, "top.qcow2")

# base.raw (8 MiB, sparse): data, a punched hole, the rest holes.
with open(base, "wb") as f:
    f.truncate(8 * MIB)
qt.run("qemu-io", "-f", "raw",
       "-c", "write -P 0x11 0 1M",
       "-c", "write -P 0x12 3M 512k",
       "-c", "write -P 0x13 7M 1M",
       "-c", "write -z 3500k 4k",
       base)
# mid.qcow2 (12 MiB, 32 KiB clusters, extended L2: 1 KiB subclusters)
# over it: data and zero clusters, some past the end of the raw file, and
# single subclusters of data and of zeros inside otherwise empty clusters.
qt.run("qemu-img", "create", "-f", "qcow2", "-o",
       "cluster_size=32768,extended_l2=on",
       "-b", base, "-F", "raw", mid, str(12 * MIB))
qt.run("qemu-io", "-f", "qcow2",
       "-c", "write -P 0x21 512k 1M",
       "-c", "write -z 3M 64k",
       "-c", "write -P 0x22 9M 256k",
       "-c", "write -z 10M 1M",
       "-c", "write -P 0x23 %d 2k" % (6 * MIB + 3 * KIB),
       "-c", "write -z %d 1k" % (6 * MIB + 9 * KIB),
       "-c", "write -P 0x24 %d 1k" % (100 * KIB + 5 * KIB),
       mid)
# top.qcow2 (16 MiB, 64 KiB clusters): data, zero clusters, a discard.
qt.run("qemu-img", "create", "-f", "qcow2", "-o", "cluster_size=65536",
       "-b", mid, "-F", "qcow2", top, str(16 * MIB))
qt.run("qemu-io", "-f", "qcow2",
       "-c", "write -P 0x31 256k 128k",
       "-c", "write -z 1M 128k",
       "-c", "write -P 0x32 12M 64k",
       "-c", "write -z 7M 64k",
       "-c", "write -z 13M 2M",
       "-c", "discard 12M 64k",
       "-c", "write -P 0x33 5M 64k",
       "-c", "discard 5M 64k",
       top)
SIZE = 16 * MIB

# The reference: qemu-img map.  Each entry has "data" and "zero" (so
# NBD_STATE_HOLE is "not data" and NBD_STATE_ZERO is "zero"), "present"
# (allocated in some layer of the chain) and "depth".  qemu-img's depth
# counts from 0 for the top image, and for a range allocated nowhere it
# names the last layer it looked at, not a layer that has it.  Our
# qemu:allocation-depth counts from 1 for the top image and says 0 for
# "allocated nowhere": so ours = depth + 1 where present, 0 where not.
# (A raw file is "present" everywhere within its size, holes included:
# qemu's raw driver and ours agree on that.)
status, out = qt.run("qemu-img", "map", "--output=json", "-f", "qcow2", top)
REF = []                # (start, length, base:allocation flags, depth)
for e in json.loads(out):
    flags = (0 if e["data"] else nbd.STATE_HOLE) | \
        (nbd.STATE_ZERO if e["zero"] else 0)
    depth = e["depth"] + 1 if e["present"] else 0
    REF.append((e["start"], e["length"], flags, depth))
assert sum(r[1] for r in REF) == SIZE
assert {r[3] for r in REF} == {0, 1, 2, 3}, "the chain is not exercised"


def ref_value(ctx, pos):
    """The reference value of ctx at byte pos."""
    for start, length, flags, depth in REF:
        if start <= pos < start + length:
            return flags if ctx == BASE else depth
    raise AssertionError("offset %d outside the map" % pos)


def ref_boundaries():
    return {r[0] for r in REF} | {SIZE}


def agree(ctx, offset, entries, what):
    """The extents entries ([len, value, ...]) starting at offset agree
    with the reference at every byte."""
    pos = offset
    bounds = sorted(ref_boundaries())
    for i in range(0, len(entries), 2):
        length, value = entries[i], entries[i + 1]
        assert length > 0, "%s: empty extent" % what
        end = pos + length
        assert end <= SIZE, "%s: extent past the end of the disk" % what
        # Every piece of the extent between reference boundaries.
        cuts = [pos] + [b for b in bounds if pos < b < end]
        for c in cuts:
            want = ref_value(ctx, c)
            assert value == want, \
                "%s: %s at %d: %d, qemu-img map says %d" % \
                (what, ctx, c, value, want)
        pos = end
    return pos - offset


def query(h, length, offset, flags=0):
    """One BLOCK_STATUS: {context: entries}; each context at most once."""
    got = {}

    def cb(ctx, off, entries, err):
        assert off == offset, "extents for offset %d, asked %d" % (off, offset)
        assert ctx not in got, "two chunks for %s" % ctx
        got[ctx] = list(entries)
        return 0

    h.block_status(length, offset, cb, flags)
    return got


def handle(*contexts):
    h = nbd.NBD()
    for c in contexts:
        h.add_meta_context(c)
    h.connect_uri(srv.uri)
    return h


srv = qt.Server(top)
h = handle(BASE, DEPTH)
assert h.can_meta_context(BASE) and h.can_meta_context(DEPTH), \
    "contexts not negotiated"

# --- The whole map of each context. ---
for ctx in (BASE, DEPTH):
    pos = 0
    calls = 0
    while pos < SIZE:
        got = query(h, SIZE - pos, pos)
        assert set(got) == {BASE, DEPTH}, "chunks for %s" % sorted(got)
        n = agree(ctx, pos, got[ctx], "map at %d" % pos)
        assert 0 < n <= SIZE - pos
        pos += n
        calls += 1
    qt.log("%s: whole map agrees with qemu-img map (%d requests)" %
           (ctx, calls))

# --- Random ranges, with and without REQ_ONE. ---
starts = [r[0] for r in REF]
for i in range(300):
    if i % 3 == 0:
        offset = random.choice(starts)
    else:
        offset = random.randrange(SIZE)
    if random.random() < 0.3:
        offset &= ~511
    length = random.randint(1, SIZE - offset)
    if random.random() < 0.5:
        length = min(length, random.randint(1, 300 * KIB))
    req_one = random.random() < 0.5
    flags = nbd.CMD_FLAG_REQ_ONE if req_one else 0
    what = "%d+%d%s" % (offset, length, " REQ_ONE" if req_one else "")
    got = query(h, length, offset, flags)
    assert set(got) == {BASE, DEPTH}, "%s: chunks for %s" % (what, sorted(got))
    for ctx, entries in got.items():
        if req_one:
            assert len(entries) == 2, \
                "%s: %s: %d extents" % (what, ctx, len(entries) // 2)
        n = agree(ctx, offset, entries, what)
        assert n <= length, "%s: %s: %d bytes described, asked %d" % \
            (what, ctx, n, length)
h.shutdown()

# --- One context selected: one chunk. ---
for ctx in (BASE, DEPTH):
    h = handle(ctx)
    assert h.can_meta_context(ctx)
    other = DEPTH if ctx == BASE else BASE
    assert not h.can_meta_context(other), "%s selected unasked" % other
    got = query(h, SIZE, 0)
    assert list(got) == [ctx], "chunks for %s, want %s" % (sorted(got), ctx)
    agree(ctx, 0, got[ctx], "only " + ctx)
    h.shutdown()

# --- More extents than one answer holds: prefixes that join up. ---
small = qt.create_image(tmp, "small.qcow2", 12 * MIB, cluster_size=4096)
srv2 = qt.Server(small)
h = nbd.NBD()
h.add_meta_context(BASE)
h.connect_uri(srv2.uri)
NCL = 12 * MIB // 4096
for i in range(0, NCL, 2):
    h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(b"\x5a" * 4096)),
                 i * 4096)
    if h.aio_in_flight() >= 32:
        h.poll(-1)
while h.aio_in_flight():
    h.poll(-1)
pos = 0
calls = 0
while pos < 12 * MIB:
    got = query(h, 12 * MIB - pos, pos)
    ents = got[BASE]
    assert 0 < len(ents) // 2 <= 1024, "%d extents" % (len(ents) // 2)
    for i in range(0, len(ents), 2):
        length, flags = ents[i], ents[i + 1]
        assert length == 4096, "extent of %d bytes at %d" % (length, pos)
        want = 0 if (pos // 4096) % 2 == 0 else nbd.STATE_HOLE | nbd.STATE_ZERO
        assert flags == want, "at %d: flags %d, want %d" % (pos, flags, want)
        pos += length
    calls += 1
assert calls > 1, "one answer described %d extents" % NCL
qt.log("%d extents in %d answers" % (NCL, calls))
h.shutdown()
assert srv2.stop() == 0
qt.check_image(small)

# --- Listing contexts. ---


def list_contexts(*queries):
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri(srv.uri)
    for q in queries:
        h.add_meta_context(q)
    found = []
    n = h.opt_list_meta_context(lambda name: found.append(name) or 0)
    assert n == len(found)
    h.opt_abort()
    qt.log("list %s: %s" % (list(queries), found))
    return sorted(found)


assert list_contexts() == [BASE, DEPTH]
assert list_contexts("base:") == [BASE]
assert list_contexts("qemu:") == [DEPTH]
assert list_contexts("qemu:", "base:") == [BASE, DEPTH]
assert list_contexts(BASE, "x-unknown:thing", "nocolon") == [BASE]
assert list_contexts(DEPTH, DEPTH) == [DEPTH]
assert list_contexts("qemu:dirty-bitmap:x", "base:other") == []

# SET ignores the "base:" wildcard: nothing is selected.
h = handle("base:")
assert not h.can_meta_context(BASE)
h.shutdown()

assert srv.stop() == 0
qt.log("PASS")
