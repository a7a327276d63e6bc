#!/usr/bin/env bash
# test-enospc.sh: qnbd on a file system that fills up, and under a file
# size limit.
#
# 1. A real full file system: a small tmpfs, mounted in a private mount
#    namespace (unshare -m as root, unshare -rm otherwise; that part is
#    skipped when neither is allowed), nearly filled by a ballast file.  A
#    client writes until a write fails: it must get ENOSPC (or EIO), the
#    server keeps serving reads and in-place writes, and, once the ballast
#    is deleted, a flush succeeds, the failed writes can be redone, and
#    everything acknowledged reads back.
# 2. A file size limit (ulimit -f on the qnbd process): writes past it, and
#    the engine's ftruncate that grows the file ahead of its allocations,
#    fail with EFBIG (SIGXFSZ, whose default action kills the process, must
#    not end qnbd); the client sees ENOSPC, the server keeps running, and
#    after a restart without the limit what was flushed before reads back.
# 3. The same limit hit by the synchronous writes of open (the repair of a
#    lazy_refcounts image left dirty): qnbd exits with an error, not killed
#    by SIGXFSZ, and the image opens normally once the limit is gone.
#
# Each time, after stopping the server, qemu-img check must find no
# corruption (leaks are allowed: a failed allocation may strand clusters),
# and the image must stay consistent when the server is started again and
# goes on allocating.

# The tmpfs needs a mount namespace of our own: run the whole test in one.
if [ -z "${QNBD_ENOSPC_INNER:-}" ]; then
    export QNBD_ENOSPC_INNER=1
    if [ "$(id -u)" = 0 ] && unshare -m true 2>/dev/null; then
        exec unshare -m --propagation private bash "$0" "$@"
    elif unshare -rm true 2>/dev/null; then
        exec unshare -rm bash "$0" "$@"
    fi
    QNBD_ENOSPC_INNER=none
fi

source "${srcdir:-.}/functions.sh"
set -e
set -x

requires qemu-img
requires_python_nbd

# The client: phases of one workload over 1 MiB chunks, its state kept in
# a JSON file between runs.  Chunk i of version v holds bytes that only
# (i, v) give, so nothing needs saving but the versions.
cat > "$tmpdir/client.py" <<'PY'
import errno, json, os, random, sys
import nbd

CHUNK = 1 << 20
uri, statefile, phase = sys.argv[1], sys.argv[2], sys.argv[3]

def data(i, v):
    return random.Random("%d-%d" % (i, v)).randbytes(CHUNK)

def load():
    with open(statefile) as f:
        return json.load(f)

def save(st):
    with open(statefile, "w") as f:
        json.dump(st, f)

def log(*a):
    print(*a, flush=True)

h = nbd.NBD()
h.connect_uri(uri)
nchunks = h.get_size() // CHUNK

def check_read(st, chunks, what):
    for i in chunks:
        v = st["version"].get(str(i), 0)
        got = h.pread(CHUNK, i * CHUNK)
        want = data(i, v) if v else bytes(CHUNK)
        assert got == want, "%s: chunk %d (version %d) reads back wrong" % \
            (what, i, v)

if phase == "fill":
    # Write the lower half until a write fails, flushing every 2 chunks.
    st = {"version": {}, "acked": [], "durable": [], "failed": [],
          "errno": 0}
    pending = []
    for i in range(nchunks // 2):
        try:
            h.pwrite(data(i, 1), i * CHUNK)
        except nbd.Error as e:
            log("write of chunk %d failed: %s" % (i, e))
            st["errno"] = e.errnum
            st["failed"].append(i)
            break
        st["version"][str(i)] = 1
        st["acked"].append(i)
        pending.append(i)
        if len(pending) == 2:
            try:
                h.flush()
                st["durable"] += pending
                pending = []
            except nbd.Error as e:
                log("flush after chunk %d failed: %s" % (i, e))
                st["errno"] = e.errnum
                break
    assert st["errno"] not in (errno.ENOTCONN, errno.ESHUTDOWN), \
        "the server went away"
    assert st["errno"] in (errno.ENOSPC, errno.EIO), \
        "no write failed with ENOSPC or EIO (errno %d)" % st["errno"]
    # More allocating writes keep failing, or work: either way an answer.
    for i in range(nchunks // 2, nchunks // 2 + 3):
        try:
            h.pwrite(data(i, 1), i * CHUNK)
            st["version"][str(i)] = 1
            st["acked"].append(i)
            log("write of chunk %d worked" % i)
        except nbd.Error as e:
            log("write of chunk %d failed: %s" % (i, e))
            assert e.errnum in (errno.ENOSPC, errno.EIO), e
            st["failed"].append(i)
    # Reads work; so does overwriting data already allocated.
    check_read(st, st["acked"], "reading while full")
    h.pwrite(data(0, 2), 0)
    st["version"]["0"] = 2
    if 0 in st["durable"]:
        st["durable"].remove(0)
    check_read(st, [0], "in-place write while full")
    try:
        h.flush()
        log("flush while full worked")
        st["durable"] = list(st["acked"])
    except nbd.Error as e:
        log("flush while full failed: %s" % e)
        assert e.errnum in (errno.ENOSPC, errno.EIO), e
    log("acked %d chunks, %d durable, %d failed" %
        (len(st["acked"]), len(st["durable"]), len(st["failed"])))
    save(st)

elif phase in ("recover", "recover-restarted"):
    # Space again.  With the same server, everything acknowledged is still
    # there; after a restart only what a flush made durable is sure.
    st = load()
    sure = st["acked"] if phase == "recover" else st["durable"]
    check_read(st, sure, "after recovering")
    redo = sorted(set(st["failed"]) | set(st["acked"]) - set(sure))
    for i in redo:
        h.pwrite(data(i, 3), i * CHUNK)
        st["version"][str(i)] = 3
    h.flush()
    st["acked"] = sorted(set(st["acked"]) | set(redo))
    st["durable"] = list(st["acked"])
    st["failed"] = []
    check_read(st, st["acked"], "after redoing the failed writes")
    save(st)

elif phase == "more":
    # Allocate more (the upper half), flush.
    st = load()
    for i in range(nchunks - 4, nchunks):
        h.pwrite(data(i, 4), i * CHUNK)
        st["version"][str(i)] = 4
        st["acked"].append(i)
    h.flush()
    st["durable"] = list(st["acked"])
    check_read(st, st["acked"], "after writing more")
    save(st)

elif phase == "verify":
    st = load()
    check_read(st, range(nchunks), "verifying every chunk")

h.shutdown()
PY

client ()
{
    "$PYTHON" "$tmpdir/client.py" "$uri" "$1" "$2"
}

# check_consistent IMAGE: qemu-img check finds no corruption (leaks are
# allowed).
check_consistent ()
{
    local st=0
    qemu-img check "$1" > "$tmpdir/check.out" 2>&1 || st=$?
    grep -v '^Leaked cluster' "$tmpdir/check.out"
    if [ "$st" -ne 0 ] && [ "$st" -ne 3 ]; then
        echo "$0: qemu-img check $1 exited with status $st" >&2
        return 1
    fi
}

# stop_any: stop the server; it may report a failed final flush, but must
# not die of a signal or hang.
stop_any ()
{
    local st=0
    stop_qnbd || st=$?
    if [ "$_qnbd_timed_out" = 1 ] || [ "$st" -ge 128 ]; then
        echo "$0: qnbd ended with status $st" \
             "$([ "$st" = 153 ] && echo '(killed by SIGXFSZ)')" >&2
        return 1
    fi
}

alive ()
{
    kill -0 "$qnbd_pid" 2>/dev/null
}

parts=0

# ---- 1. a full file system ----
if [ "$QNBD_ENOSPC_INNER" = 1 ] && mkdir "$tmpdir/fs" &&
   mount -t tmpfs -o size=16m qnbd-enospc "$tmpdir/fs"; then
    cleanup_fn umount -l "$tmpdir/fs"
    parts=$((parts + 1))
    img=$tmpdir/fs/full.qcow2
    state=$tmpdir/full.json
    qemu-img create -f qcow2 "$img" 64M
    # Leave about 5 MiB free.
    dd if=/dev/zero of="$tmpdir/fs/ballast" bs=1M count=11 status=none
    df -k "$tmpdir/fs"

    start_qnbd "$img"
    client "$state" fill
    alive
    df -k "$tmpdir/fs"

    rm "$tmpdir/fs/ballast"
    client "$state" recover
    alive
    stop_qnbd
    check_consistent "$img"

    start_qnbd "$img"
    client "$state" verify
    client "$state" more
    stop_qnbd
    check_consistent "$img"
    start_qnbd -r "$img"
    client "$state" verify
    stop_qnbd
else
    echo "$0: no private tmpfs here: skipping the full file system part" >&2
fi

# ---- 2. a file size limit: EFBIG ----
img=$tmpdir/limited.qcow2
state=$tmpdir/limited.json
qemu-img create -f qcow2 "$img" 64M
limit_kb=$(( ($(stat -c %s "$img") + (5 << 20)) / 1024 ))
real_qnbd=$QNBD
cat > "$tmpdir/qnbd-fsize" <<EOF
#!/usr/bin/env bash
ulimit -f $limit_kb
exec "$real_qnbd" "\$@"
EOF
chmod +x "$tmpdir/qnbd-fsize"
parts=$((parts + 1))

QNBD=$tmpdir/qnbd-fsize start_qnbd "$img"
fill_st=0
client "$state" fill || fill_st=$?
# Fails, saying so, if qnbd died (SIGXFSZ kills it by default).
stop_any
[ "$fill_st" -eq 0 ]
check_consistent "$img"

start_qnbd "$img"
client "$state" recover-restarted
client "$state" more
stop_qnbd
check_consistent "$img"
start_qnbd -r "$img"
client "$state" verify
stop_qnbd

# ---- 3. the file size limit hit by the synchronous writes at open ----
# A lazy_refcounts image left dirty is repaired at open, with new refcount
# structures written past the end of the file by the main thread.  Past
# the limit, that write must fail with EFBIG and qnbd exit with an error
# (SIGXFSZ, whose default action kills the process, must not end it).
img=$tmpdir/dirty.qcow2
qemu-img create -f qcow2 -o lazy_refcounts=on "$img" 64M
qemu-io -f qcow2 -c "write -P 0x5a 0 4M" "$img"
# The dirty bit (incompatible feature bit 0, the last byte of the field
# at offset 72).
printf '\x01' | dd of="$img" bs=1 seek=79 conv=notrunc status=none
limit_kb=$(( ($(stat -c %s "$img") + 1023) / 1024 ))
st=0
( ulimit -f "$limit_kb"; exec timeout 60 "$real_qnbd" -k "$tmpdir/dirty.sock" \
      "$img" ) 2> "$tmpdir/dirty.err" || st=$?
cat "$tmpdir/dirty.err"
if [ "$st" -eq 0 ] || [ "$st" -ge 124 ]; then
    echo "$0: qnbd exited with status $st repairing past the file size" \
         "limit: want an error exit (1), not a signal or a hang" >&2
    exit 1
fi
qemu-img check "$img"
start_qnbd "$img"
"$PYTHON" - "$uri" <<'PY'
import sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
assert h.pread(1 << 20, 3 << 20) == b"\x5a" * (1 << 20)
h.shutdown()
PY
stop_qnbd
check_consistent "$img"

[ "$parts" -gt 0 ] || exit 77
