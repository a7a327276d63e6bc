#!/usr/bin/env bash
# test-enospc-acked.sh: on a file system that fills up and stays full, no
# acknowledged write is lost.
#
# A small tmpfs (in a private mount namespace) holds an image much larger
# than itself.  A client writes 1 MiB chunks all over the disk, without
# flushing, until writes fail, and tries a few more.  Every write that
# failed must have failed with ENOSPC (or EIO), and every write that was
# acknowledged must be on disk once the server has stopped: the space of
# new data clusters and of every metadata cluster they will need (L2
# tables, refcount blocks, a grown refcount table) is reserved before the
# write is acknowledged, so the flush at SIGTERM cannot run out of space.
# SIGTERM must then end the server with status 0, qemu-img check must find
# no corruption, and a new server (the file system still full) must read
# back every acknowledged chunk.
#
# Geometries: 64 KiB clusters (the issue's case: a 1 GiB image on a 64 MiB
# tmpfs), 4 KiB clusters (an L2 table per 2 MiB, a refcount block per
# 8 MiB), 512-byte clusters with 64-bit refcounts (a refcount block per
# 32 KiB, and a refcount table that must grow), and lazy refcounts.

if [ -z "${QNBD_ENOSPC_INNER:-}" ]; then
    export QNBD_ENOSPC_INNER=1
    if [ "$(id -u)" = 0 ] && unshare -m true 2>/dev/null; then
        exec unshare -m --propagation private bash "$0" "$@"
    elif unshare -rm true 2>/dev/null; then
        exec unshare -rm bash "$0" "$@"
    fi
    echo "$0: no private mount namespace here (needs root or user namespaces)" >&2
    exit 77
fi

source "${srcdir:-.}/functions.sh"
set -e
set -x

requires qemu-img
requires_python_nbd

cat > "$tmpdir/client.py" <<'PY'
import errno, json, random, sys
import nbd

uri, statefile, phase, chunk = sys.argv[1], sys.argv[2], sys.argv[3], \
    int(sys.argv[4])

def data(i):
    return random.Random("chunk-%d" % i).randbytes(chunk)

h = nbd.NBD()
h.connect_uri(uri)
n = h.get_size() // chunk

if phase == "fill":
    order = list(range(n))
    random.Random(7).shuffle(order)
    acked, failed, errs = [], [], set()
    for i in order:
        try:
            h.pwrite(data(i), i * chunk)
            acked.append(i)
        except nbd.Error as e:
            assert e.errnum in (errno.ENOSPC, errno.EIO), \
                "write of chunk %d: %s" % (i, e)
            errs.add(e.errnum)
            failed.append(i)
            if len(failed) >= 8:
                break
    print("acknowledged %d chunks of %d bytes, %d failed (%s)" %
          (len(acked), chunk, len(failed), sorted(errs)), flush=True)
    assert failed, "the file system never filled up"
    assert len(acked) > 4, "almost nothing fitted"
    with open(statefile, "w") as f:
        json.dump(acked, f)
elif phase == "verify":
    with open(statefile) as f:
        acked = json.load(f)
    for i in acked:
        got = h.pread(chunk, i * chunk)
        assert got == data(i), "acknowledged chunk %d was lost" % i
    print("all %d acknowledged chunks read back" % len(acked), flush=True)
h.shutdown()
PY

fs=$tmpdir/fs
mkdir "$fs"
if ! mount -t tmpfs -o size=64m qnbd-enospc-acked "$fs"; then
    echo "$0: cannot mount a tmpfs here" >&2
    exit 77
fi
cleanup_fn umount -l "$fs"

# run NAME FS_MIB IMAGE_SIZE CHUNK QEMU_IMG_OPTIONS
run ()
{
    local name=$1 fs_mib=$2 size=$3 chunk=$4 opts=$5 st
    rm -f "$fs"/*
    mount -o remount,size="${fs_mib}m" "$fs"
    local img=$fs/$name.qcow2 state=$tmpdir/$name.json
    qemu-img create -f qcow2 -o "$opts" "$img" "$size"

    start_qnbd "$img"
    "$PYTHON" "$tmpdir/client.py" "$uri" "$state" fill "$chunk"
    df -k "$fs"
    st=0
    stop_qnbd || st=$?
    if [ "$st" -ne 0 ]; then
        echo "$0: $name: qnbd exited with status $st after SIGTERM on a full file system" >&2
        return 1
    fi
    local cst=0
    qemu-img check "$img" > "$tmpdir/check.out" 2>&1 || cst=$?
    grep -v '^Leaked cluster' "$tmpdir/check.out"
    if [ "$cst" -ne 0 ] && [ "$cst" -ne 3 ]; then
        echo "$0: $name: qemu-img check exited with status $cst" >&2
        return 1
    fi
    start_qnbd -r "$img"
    "$PYTHON" "$tmpdir/client.py" "$uri" "$state" verify "$chunk"
    stop_qnbd
}

run c64k 64 1G $((1 << 20)) cluster_size=65536
run c4k 16 256M $((256 << 10)) cluster_size=4096
run c512-refcount64 8 64M $((64 << 10)) cluster_size=512,refcount_bits=64
run c4k-lazy 16 256M $((256 << 10)) cluster_size=4096,lazy_refcounts=on
echo "PASS"
