"""test-nbd-trim-zeroes.py: NBD_CMD_TRIM and NBD_CMD_WRITE_ZEROES.

On a qcow2 v3 image with 64 KiB clusters, filled with data first:

- TRIM of cluster-aligned ranges, and of unaligned ones (the engine
  releases the whole clusters inside and leaves partial ones alone), one
  of them larger than the 32 MiB payload limit, one with FUA;
- WRITE_ZEROES without and with NO_HOLE, aligned and not, with FUA, and
  one larger than the payload limit;
- FAST_ZERO: succeeds on whole clusters, fails with ENOTSUP on part of a
  cluster holding data, which it must leave untouched;

every read checked against a shadow copy.  Then the image checks clean
and compares equal to the shadow.  A read-only export (-r) refuses TRIM
and WRITE_ZEROES with EPERM, and --discard=ignore makes TRIM succeed
without touching the data.
"""

import errno

import qnbdtest as qt

nbd = qt.require_nbd()
qt.requires("qemu-img")
qt.seed()

CLUSTER = 65536
SIZE = 100 * 1024 * 1024 + 3 * CLUSTER + 4096   # ends in a partial cluster
MIB = 1024 * 1024


def expect_error(fn, want, what):
    try:
        fn()
    except nbd.Error as e:
        qt.log("%s: %s" % (what, e))
        assert e.errnum == want, "%s: errno %s, want %s" % \
            (what, e.errnum, errno.errorcode[want])
        return
    raise AssertionError("%s: succeeded, want %s" %
                         (what, errno.errorcode[want]))


def check(h, shadow, offset, length):
    """The export holds what the shadow says over [offset, offset+length)."""
    pos = offset
    while pos < offset + length:
        n = min(8 * MIB, offset + length - pos)
        qt.assert_same(h.pread(n, pos), shadow.read(pos, n), pos)
        pos += n


def trim(h, shadow, offset, length, flags=0):
    """TRIM, and in the shadow zero the whole clusters inside the range
    (qcow2_discard leaves partial clusters alone)."""
    qt.log("trim %d+%d flags %d" % (offset, length, flags))
    h.trim(length, offset, flags)
    start = -(-offset // CLUSTER) * CLUSTER
    end = (offset + length) // CLUSTER * CLUSTER
    if end > start:
        shadow.write(start, bytes(end - start))
    if offset + length == SIZE and SIZE % CLUSTER:
        # The partial last cluster may be released or not: either way it
        # must read as before or as zeros.
        tail = SIZE - SIZE % CLUSTER
        lo = max(tail, offset)
        got = h.pread(SIZE - lo, lo)
        if got != shadow.read(lo, SIZE - lo):
            qt.assert_same(got, bytes(SIZE - lo), lo)
            shadow.write(lo, got)
    check(h, shadow, max(0, offset - CLUSTER),
          min(SIZE, offset + length + CLUSTER) - max(0, offset - CLUSTER))


def zero(h, shadow, offset, length, flags=0):
    qt.log("zero %d+%d flags %d" % (offset, length, flags))
    h.zero(length, offset, flags)
    shadow.write(offset, bytes(length))
    check(h, shadow, max(0, offset - CLUSTER),
          min(SIZE, offset + length + CLUSTER) - max(0, offset - CLUSTER))


tmp = qt.tmpdir()
img = qt.create_image(tmp, "disk.qcow2", SIZE, cluster_size=CLUSTER,
                      compat="1.1")
shadow = qt.Shadow(SIZE)
srv = qt.Server(img)
h = srv.connect()
assert h.can_trim(), "TRIM not advertised"
assert h.can_zero(), "WRITE_ZEROES not advertised"
assert h.can_fast_zero(), "FAST_ZERO not advertised"

# Data everywhere but in a few gaps.
for off in range(0, SIZE, 4 * MIB):
    n = min(4 * MIB, SIZE - off)
    if (off // (4 * MIB)) % 7 == 3:
        continue
    data = qt.pattern(off, n, 1)
    h.pwrite(data, off)
    shadow.write(off, data)
h.flush()

# --- TRIM ---
trim(h, shadow, 0, 4 * CLUSTER)                          # aligned
trim(h, shadow, 10 * CLUSTER + 100, 5 * CLUSTER)         # unaligned ends
trim(h, shadow, 20 * CLUSTER + 5, 1000)                  # inside one cluster
trim(h, shadow, 30 * CLUSTER, 2 * CLUSTER, nbd.CMD_FLAG_FUA)
trim(h, shadow, 4 * MIB, 36 * MIB)                       # > 32 MiB
trim(h, shadow, SIZE - 4096, 4096)                       # the partial end

# --- WRITE_ZEROES ---
zero(h, shadow, 44 * MIB, 3 * CLUSTER)                   # aligned
zero(h, shadow, 45 * MIB + 777, 2 * CLUSTER + 999)       # unaligned
zero(h, shadow, 46 * MIB, 4 * CLUSTER, nbd.CMD_FLAG_NO_HOLE)
zero(h, shadow, 47 * MIB + 512, CLUSTER + 4096, nbd.CMD_FLAG_NO_HOLE)
zero(h, shadow, 48 * MIB, 2 * CLUSTER, nbd.CMD_FLAG_FUA)
zero(h, shadow, 48 * MIB + 5 * CLUSTER + 3, 70000,
     nbd.CMD_FLAG_FUA | nbd.CMD_FLAG_NO_HOLE)
zero(h, shadow, 56 * MIB + CLUSTER, 34 * MIB)            # > 32 MiB

# The data around the zeroed ranges was checked by zero(); write over a
# zeroed range again to see it is writable as ever.
data = qt.pattern(46 * MIB + 1000, 100000, 2)
h.pwrite(data, 46 * MIB + 1000)
shadow.write(46 * MIB + 1000, data)
check(h, shadow, 46 * MIB, 2 * MIB)

# --- FAST_ZERO ---
# Whole clusters of a v3 image: the zero flag, fast.
zero(h, shadow, 92 * MIB, 8 * CLUSTER, nbd.CMD_FLAG_FAST_ZERO)
# Part of a cluster holding data would need zeros written: ENOTSUP, and
# the data stays.
off = 93 * MIB + 1000
assert shadow.read(off, 5000) != bytes(5000), "the test wants data there"
expect_error(lambda: h.zero(5000, off, nbd.CMD_FLAG_FAST_ZERO),
             errno.ENOTSUP, "fast zero of part of a data cluster")
check(h, shadow, 93 * MIB, CLUSTER)

# Past the end: ENOSPC (WRITE_ZEROES) and EINVAL (TRIM); nothing changes.
h2 = srv.connect(strict=False)
expect_error(lambda: h2.zero(2 * CLUSTER, SIZE - CLUSTER), errno.ENOSPC,
             "write zeroes across the end")
expect_error(lambda: h2.trim(2 * CLUSTER, SIZE - CLUSTER), errno.EINVAL,
             "trim across the end")
h2.shutdown()

h.flush()
shadow.verify(h)
h.shutdown()
qt.stop_and_compare(srv, img, shadow)

# --- A read-only export refuses both. ---
ro = qt.Server(img, "-r")
h = ro.connect(strict=False)
assert h.is_read_only()
assert not h.can_trim() and not h.can_zero(), \
    "TRIM/WRITE_ZEROES advertised on a read-only export"
expect_error(lambda: h.trim(CLUSTER, 0), errno.EPERM, "trim, read-only")
expect_error(lambda: h.zero(CLUSTER, 5 * MIB), errno.EPERM,
             "write zeroes, read-only")
expect_error(lambda: h.zero(CLUSTER, 5 * MIB, nbd.CMD_FLAG_NO_HOLE),
             errno.EPERM, "write zeroes with NO_HOLE, read-only")
check(h, shadow, 0, 8 * MIB)
h.shutdown()
assert ro.stop() == 0

# --- --discard=ignore: TRIM succeeds and changes nothing. ---
ign = qt.Server(img, "--discard=ignore")
h = ign.connect()
assert h.can_trim()
off = 50 * MIB
assert shadow.read(off, 4 * CLUSTER) != bytes(4 * CLUSTER)
h.trim(4 * CLUSTER, off)
h.trim(4 * CLUSTER, off, nbd.CMD_FLAG_FUA)
check(h, shadow, off, 4 * CLUSTER)
h.shutdown()
qt.stop_and_compare(ign, img, shadow)
qt.log("PASS")
