#!/usr/bin/env bash
# test-qnbd-img-check.sh: "qnbd-img check" agrees with "qemu-img check"
# (exit status and every JSON field: leaks, corruptions, image end offset,
# allocation figures) on clean images over a matrix of options, on leaky
# images (refcounts patched up, a lazy-refcount qnbd killed with SIGKILL)
# and on corrupt ones (the fixtures of test-corrupt-image.c: L2 entries
# pointing at the L1 table, a refcount block, the header, their own
# table, past the end of the file; refcounts patched down; an unaligned
# L2 table).  After "-r leaks" and "-r all" the image is what qemu-img
# check -r leaves (clean, but for what neither can repair) and reads the
# same data as before.  A repair is refused while qnbd serves the image,
# and qnbd is refused while a repair runs, each naming the other's PID;
# a read-only check is refused beside a writer unless -U.

source "${srcdir:-.}/functions.sh"
set -e
set -x

requires qemu-img qemu-io jq python3 timeout
: "${QNBD_IMG:=$PWD/../tools/qnbd-img}"

M=$(( 1024 * 1024 ))

# same_check IMAGE [ARGS...]: both tools' exit status and JSON agree.
same_check ()
{
    local img=$1 ours theirs st_o=0 st_t=0
    shift
    ours=$(timeout 60 "$QNBD_IMG" check --output=json "$@" "$img") || st_o=$?
    theirs=$(qemu-img check --output=json "$@" "$img" 2>/dev/null) || st_t=$?
    printf 'qnbd-img (%s): %s\nqemu-img (%s): %s\n' "$st_o" "$ours" \
           "$st_t" "$theirs"
    test "$st_o" = "$st_t"
    jq -e -n --argjson a "$ours" --argjson b "$theirs" '$a == $b' >/dev/null
}

# patch IMAGE WHAT ARG: damage an image of 64 KiB clusters that qemu-io
# wrote (data at 0 and 1 MiB): an entry of the first L2 table (index
# ARG) pointed at the L1 table, the first refcount block, the header
# (unaligned), its own table or past the end of the file; a refcount
# changed (cluster ARG, +1 or -1); the first L1 entry made unaligned.
patch ()
{
    python3 - "$@" <<'EOF'
import struct, sys
path, what, arg = sys.argv[1], sys.argv[2], int(sys.argv[3])
f = open(path, 'r+b')
def get(off):
    f.seek(off)
    return struct.unpack('>Q', f.read(8))[0]
def put(off, v):
    f.seek(off)
    f.write(struct.pack('>Q', v))
l1, reft = get(40), get(48)
l2 = get(l1) & 0x00fffffffffffe00
rb = get(reft) & ~511
targets = {'to-l1': l1, 'to-rb': rb, 'to-hdr': 512, 'to-self': l2,
           'past': 1 << 40}
if what in targets:
    put(l2 + 8 * arg, targets[what] | (1 << 63))
elif what in ('ref-up', 'ref-down'):
    f.seek(rb + 2 * arg)
    v = struct.unpack('>H', f.read(2))[0] + (1 if what == 'ref-up' else -1)
    f.seek(rb + 2 * arg)
    f.write(struct.pack('>H', v))
elif what == 'l1-unaligned':
    put(l1, get(l1) + 512)
EOF
}

# repaired IMAGE MODE: "-r MODE" gives the exit status and JSON that
# qemu-img's own "-r MODE" gives on a copy; after it both tools agree
# on the image, and it reads as it did before (as qemu-img reads it).
repaired ()
{
    local img=$1 mode=$2 st_o=0 st_t=0 before=$1.before theirs=$1.qemu
    cp "$img" "$before"
    cp "$img" "$theirs"
    timeout 60 "$QNBD_IMG" check -r "$mode" "$img" || st_o=$?
    qemu-img check -r "$mode" "$theirs" || st_t=$?
    test "$st_o" = "$st_t"
    same_check "$img"
    # Unless qemu-img cannot read it (an unaligned data cluster).  A
    # data cluster that is its own L2 table reads as the table, whose
    # COPIED flags the repair changes (qemu-img's too).
    if qemu-img compare -q "$before" "$before" 2>/dev/null; then
        case $img in
            *to-self*) ;;
            *) qemu-img compare "$before" "$img" ;;
        esac
        qemu-img compare "$theirs" "$img"
    fi
    rm -f "$before" "$theirs"
}

# --- clean images, a matrix of options -------------------------------------
n=0
clean ()
{
    local img
    n=$(( n + 1 ))
    img=$tmpdir/clean$n.qcow2
    qemu-img create -q -f qcow2 "$@" "$img" 16M
    qemu-io -f qcow2 -c 'write -q -P 0x61 0 3M' -c 'write -q -P 0x62 9M 64k' \
        -c 'write -q -z 14M 1M' -c 'discard -q 1M 512k' "$img"
    # Compressed clusters (an external data file cannot hold them).
    case "$*" in
        *data_file*) ;;
        *) qemu-io -f qcow2 -c 'write -q -c -P 0x63 12M 2M' "$img" ;;
    esac
    same_check "$img"
}
clean
same_check "$tmpdir/clean1.qcow2" -r all
clean -o cluster_size=512
clean -o cluster_size=2M
clean -o refcount_bits=1
clean -o refcount_bits=64
clean -o compat=0.10
clean -o extended_l2=on,cluster_size=128k
clean -o lazy_refcounts=on,compression_type=zstd
clean -o data_file="$tmpdir/clean-data.raw"
# Internal snapshots: their L1 tables share L2 tables and data.
img=$tmpdir/snap.qcow2
qemu-img create -q -f qcow2 "$img" 16M
qemu-io -f qcow2 -c 'write -q -P 0x61 0 2M' "$img"
qemu-img snapshot -c one "$img"
qemu-io -f qcow2 -c 'write -q -P 0x62 1M 2M' "$img"
qemu-img snapshot -c two "$img"
qemu-io -f qcow2 -c 'write -q -P 0x63 512k 64k' "$img"
same_check "$img"
# A backing file, and images qnbd-img made.
qemu-img create -q -f qcow2 -b "$tmpdir/snap.qcow2" -F qcow2 \
    "$tmpdir/overlay.qcow2"
qemu-io -f qcow2 -c 'write -q -P 0x64 4M 1M' "$tmpdir/overlay.qcow2"
same_check "$tmpdir/overlay.qcow2"
"$QNBD_IMG" create -o preallocation=metadata "$tmpdir/pre.qcow2" 64M
same_check "$tmpdir/pre.qcow2"

# --- leaks and corruptions --------------------------------------------------
damaged ()
{
    local name=$1
    shift
    img=$tmpdir/$name.qcow2
    qemu-img create -q -f qcow2 "$img" 64M
    qemu-io -f qcow2 -c 'write -q -P 0x61 0 128k' -c 'write -q -P 0x62 1M 64k' \
        "$img"
    patch "$img" "$@"
    same_check "$img"
}

damaged leak ref-up 6
repaired "$img" leaks
damaged leak2 ref-up 6
repaired "$img" all

for fixture in "to-l1 0" "to-rb 1" "to-hdr 0" "to-self 2" "past 3" \
               "ref-down 5" "ref-down 4"; do
    set -- $fixture
    damaged "$1-$2" "$@"
    # -r leaks frees the leaks only; -r all what can be repaired.
    cp "$img" "$img.2"
    repaired "$img" leaks
    repaired "$img.2" all
done

# An unaligned L2 table: qemu-img goes on to read a table at that offset
# (which counts what happens to be there); qnbd-img reports the entry
# and leaves the table out.  Both call it corrupt.
img=$tmpdir/l1-unaligned.qcow2
qemu-img create -q -f qcow2 "$img" 64M
qemu-io -f qcow2 -c 'write -q -P 0x61 0 128k' "$img"
patch "$img" l1-unaligned 0
st=0
"$QNBD_IMG" check "$img" 2>"$tmpdir/err" || st=$?
cat "$tmpdir/err"
test "$st" = 2
grep -qF 'Table is not cluster aligned; L1 entry corrupted' "$tmpdir/err"

# A lazy-refcount image left dirty by a qnbd killed during writes: its
# refcounts lag behind its references.
img=$tmpdir/lazy.qcow2
qemu-img create -q -f qcow2 -o lazy_refcounts=on "$img" 64M
start_qnbd "$img"
qemu-io -f raw -c 'write -q -P 0x65 0 8M' -c flush \
    -c 'write -q -P 0x66 16M 4M' -c flush "$uri"
kill -9 "$qnbd_pid"
wait "$qnbd_pid" || true
same_check "$img"
repaired "$img" all

# The same with a backing file, repaired by qnbd's open: the name of the
# backing file lies in the header cluster, which has one reference (the
# rebuild once counted it twice: a leak).
img=$tmpdir/lazy-overlay.qcow2
qemu-img create -q -f qcow2 -o lazy_refcounts=on -b "$tmpdir/snap.qcow2" \
    -F qcow2 "$img"
start_qnbd "$img"
qemu-io -f raw -c 'write -q -P 0x65 0 1M' -c flush "$uri"
kill -9 "$qnbd_pid"
wait "$qnbd_pid" || true
same_check "$img"
start_qnbd "$img"
stop_qnbd
check_image "$img"

# Hostile headers and tables: check ends (in time) with status 1 or a
# verdict, never a crash.
img=$tmpdir/hostile.qcow2
qemu-img create -q -f qcow2 "$img" 64M
qemu-io -f qcow2 -c 'write -q -P 0x61 0 1M' "$img"
for off in 48 56 40 36 60 64; do
    cp "$img" "$tmpdir/h.qcow2"
    printf '\xff\xff\xff\xf0' | dd of="$tmpdir/h.qcow2" bs=1 seek=$off \
        conv=notrunc status=none
    st=0
    timeout 60 "$QNBD_IMG" check "$tmpdir/h.qcow2" || st=$?
    case $st in 0|1|2|3) ;; *) echo "$0: check exited $st" >&2; exit 1 ;; esac
done

# Not qcow2: qemu-img's "format does not support checks".
head -c 1M /dev/zero > "$tmpdir/raw.img"
st=0
"$QNBD_IMG" check "$tmpdir/raw.img" || st=$?
test "$st" = 63
st=0
"$QNBD_IMG" check -f raw "$tmpdir/raw.img" || st=$?
test "$st" = 63

# --- locks ------------------------------------------------------------------
img=$tmpdir/served.qcow2
qemu-img create -q -f qcow2 "$img" 16M
start_qnbd "$img"
for args in "-r leaks" "-r all" ""; do
    st=0
    "$QNBD_IMG" check $args "$img" 2>"$tmpdir/err" || st=$?
    cat "$tmpdir/err"
    test "$st" = 1
    grep -qF "image is locked by process $qnbd_pid (qnbd)" "$tmpdir/err"
done
"$QNBD_IMG" check -U "$img"
stop_qnbd

# qnbd is refused while a repair runs: the repair is stopped (SIGSTOP)
# once it holds its locks, which /proc/PID/fdinfo shows.
img=$tmpdir/big.qcow2
"$QNBD_IMG" create -o cluster_size=512,preallocation=metadata "$img" 128M
python3 - "$QNBD_IMG" "$img" "$tmpdir" <<'EOF'
import glob, os, signal, subprocess, sys, time
tool, img, tmp = sys.argv[1:]
for attempt in range(20):
    p = subprocess.Popen([tool, 'check', '-r', 'all', img])
    held = False
    deadline = time.time() + 30
    while p.poll() is None and time.time() < deadline and not held:
        for fdinfo in glob.glob('/proc/%d/fdinfo/*' % p.pid):
            try:
                held = held or 'lock:' in open(fdinfo).read()
            except OSError:
                pass
    if held:
        os.kill(p.pid, signal.SIGSTOP)
        if p.poll() is None:
            break
    p.wait()
else:
    sys.exit('could not catch the repair holding its lock')
try:
    r = subprocess.run([os.environ['QNBD'], '-k', tmp + '/refused.sock', img],
                       stdin=subprocess.DEVNULL, capture_output=True,
                       text=True, timeout=30)
    print(r.stderr)
    want = 'is locked by process %d (qnbd-img)' % p.pid
    assert r.returncode != 0 and want in r.stderr, (r.returncode, want)
finally:
    os.kill(p.pid, signal.SIGCONT)
    assert p.wait(timeout=120) == 0
EOF
check_image "$img"

# -p: progress on a terminal only (script(1) gives one), for check and
# for create with falloc or full preallocation.
"$QNBD_IMG" create -p -o preallocation=full "$tmpdir/full.qcow2" 32M \
    2>"$tmpdir/err"
"$QNBD_IMG" check -p "$tmpdir/full.qcow2" 2>>"$tmpdir/err" >/dev/null
test ! -s "$tmpdir/err"
if command -v script >/dev/null; then
    for cmd in "create -p -o preallocation=falloc $tmpdir/falloc.qcow2 32M" \
               "check -p $tmpdir/full.qcow2"; do
        timeout 60 script -qec "$QNBD_IMG $cmd" /dev/null >"$tmpdir/tty"
        grep -qF '(100.00/100%)' "$tmpdir/tty"
    done
fi

# Hostile: every L1 entry of a 4 TiB disk names one table whose entries
# point past the end of the file, alternating between refcount block
# ranges.  The check reads that table once and bounds its refcount
# lookups: it ends at once (qemu-img reads the table 8192 times).
img=$tmpdir/dup.qcow2
qemu-img create -q -f qcow2 "$img" 4T
qemu-io -f qcow2 -c 'write -q 0 64k' "$img"
python3 - "$img" <<'PY'
import struct, sys
f = open(sys.argv[1], 'r+b')
f.seek(36); n = struct.unpack('>I', f.read(4))[0]
f.seek(40); l1 = struct.unpack('>Q', f.read(8))[0]
f.seek(l1); e = f.read(8)
f.seek(l1); f.write(e * n)
l2 = struct.unpack('>Q', e)[0] & 0x00fffffffffffe00
f.seek(l2)
f.write(b''.join(struct.pack('>Q', (1 << 63) | ((i % 2) << 40) | (1 << 30)
                             | (i << 16)) for i in range(8192)))
PY
st=0
timeout 60 "$QNBD_IMG" check "$img" >/dev/null 2>&1 || st=$?
test "$st" = 2
