#!/usr/bin/env bash
# test-qnbd-img-map.sh: "qnbd-img map" prints what "qemu-img map" prints,
# byte for byte, in JSON and in the human table, on images qemu-io wrote:
# data, zero clusters (write -z, with and without -u), discarded and
# compressed clusters, a 3-deep backing chain over a raw file with a
# shorter backing file, extended L2 subclusters, external data files (raw
# and not), clusters of 512 B and 2 MiB, compat 0.10, images made with
# preallocation=metadata by qemu-img and by qnbd-img, --start-offset and
# --max-length; -U on an image a writer holds.  Hostile images (an L2
# table past the end, an unaligned data cluster, a loop in the backing
# chain) give a clear error and exit status 1, quickly.
# "qnbd-img info --backing-chain" and the snapshot list agree with
# "qemu-img info" on every field they share.

source "${srcdir:-.}/functions.sh"
set -e
set -x

requires qemu-img qemu-io qemu-nbd jq timeout
: "${QNBD_IMG:=$PWD/../tools/qnbd-img}"

cd "$tmpdir"

# What qemu reports depends on the host file's blocks (its test for
# metadata preallocation, its holes): let them settle before both look.
settle ()
{
    sync
}

# same_map ARGS...: JSON and human output, and the exit status, are
# qemu-img's (error messages only differ in the program's name).  qemu's
# answer is taken twice around ours, so that a file system still moving
# blocks cannot fail the test on its own.
same_map ()
{
    local fmt ours theirs again
    settle
    for fmt in json human; do
        theirs=$(qemu-img map --output=$fmt "$@" 2>&1; echo "status $?")
        ours=$("$QNBD_IMG" map --output=$fmt "$@" 2>&1; echo "status $?")
        ours=${ours//qnbd-img: /qemu-img: }
        if [ "$ours" != "$theirs" ]; then
            again=$(qemu-img map --output=$fmt "$@" 2>&1; echo "status $?")
            if [ "$ours" != "$again" ]; then
                diff -u <(printf '%s\n' "$again") <(printf '%s\n' "$ours")
            fi
        fi
        printf '%s\n' "$ours"
    done
}

M=$(( 1024 * 1024 ))

# Data, zeros with and without -u, discard, compressed, a partial cluster.
qemu-img create -q -f qcow2 a.qcow2 4M
qemu-io -c "write -P 1 0 128k" -c "write -z 256k 64k" -c "write -z -u 512k 64k" \
        -c "write -c 1M 64k" -c "write 2M 64k" -c "discard 2M 64k" \
        -c "write 3M 512" -c "write -P 7 3584k 192k" a.qcow2 >/dev/null
same_map a.qcow2
same_map --start-offset=100000 --max-length=200000 a.qcow2
same_map --start-offset=3M --max-length=1 a.qcow2
same_map --start-offset=5M a.qcow2
same_map -f qcow2 "$tmpdir/a.qcow2"

# compat 0.10: no zero flag.
qemu-img create -q -f qcow2 -o compat=0.10 v2.qcow2 4M
qemu-io -c "write -P 1 0 128k" -c "write -z 256k 64k" -c "discard 0 64k" \
        v2.qcow2 >/dev/null
same_map v2.qcow2

# A 3-deep chain: raw base (4 MiB), mid (3 MiB: shorter), top (4 MiB).
qemu-img create -q -f raw base.raw 4M
qemu-io -f raw -c "write -P 3 1M 64k" -c "write -P 3 2M 4k" base.raw >/dev/null
qemu-img create -q -f qcow2 -b base.raw -F raw mid.qcow2 3M
qemu-io -c "write -P 4 0 64k" -c "write -z 192k 64k" -c "write -c 2560k 64k" \
        mid.qcow2 >/dev/null
qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2 4M
qemu-io -c "write -P 5 64k 64k" -c "write -z 1088k 64k" -c "discard 0 64k" \
        -c "write -P 6 3M 64k" top.qcow2 >/dev/null
same_map top.qcow2
same_map mid.qcow2
same_map "$tmpdir/top.qcow2"
same_map --start-offset=2M top.qcow2

# Extended L2: subclusters of 2 KiB, alone and over a backing file.
qemu-img create -q -f qcow2 -o extended_l2=on e.qcow2 4M
qemu-io -c "write -P 1 0 2k" -c "write -P 2 8k 2k" -c "write -z 32k 2k" \
        -c "write -z -u 40k 4k" -c "write -c 1M 64k" -c "discard 2M 64k" \
        e.qcow2 >/dev/null
same_map e.qcow2
qemu-img create -q -f qcow2 -o extended_l2=on -b mid.qcow2 -F qcow2 eb.qcow2 4M
qemu-io -c "write -P 1 0 2k" -c "write -P 2 72k 2k" -c "write -z 96k 2k" \
        -c "write -z -u 128k 64k" eb.qcow2 >/dev/null
same_map eb.qcow2

# Clusters of 512 B and 2 MiB.
for cs in 512 2M; do
    qemu-img create -q -f qcow2 -o cluster_size=$cs c$cs.qcow2 8M
    qemu-io -c "write -P 1 1000 5000" -c "write -z 3M 1M" -c "write -P 2 6M 1M" \
            -c "discard 6M 512k" c$cs.qcow2 >/dev/null
    same_map c$cs.qcow2
done
qemu-io -c "write -c 5M 512" c512.qcow2 >/dev/null
same_map c512.qcow2

# External data files, raw and not.
qemu-img create -q -f qcow2 -o data_file="$tmpdir/d.raw",data_file_raw=on \
    df.qcow2 4M
qemu-io -c "write -P 1 64k 64k" -c "write -z 1M 64k" df.qcow2 >/dev/null
same_map df.qcow2
qemu-img create -q -f qcow2 -o data_file="$tmpdir/d2.raw" df2.qcow2 4M
qemu-io -c "write -P 1 64k 64k" -c "write -z 1M 64k" -c "discard 64k 64k" \
        -c "write 2M 4k" df2.qcow2 >/dev/null
same_map df2.qcow2

# Metadata preallocation, by qemu-img and by qnbd-img, then written.
qemu-img create -q -f qcow2 -o preallocation=metadata pm.qcow2 8M
"$QNBD_IMG" create -q -f qcow2 -o preallocation=metadata qpm.qcow2 8M
"$QNBD_IMG" create -q -f qcow2 -o preallocation=metadata,cluster_size=2M \
    qpm2.qcow2 8M
"$QNBD_IMG" create -q -f qcow2 -o preallocation=falloc qpf.qcow2 8M
for img in pm qpm qpm2 qpf; do
    same_map $img.qcow2
done
for img in pm qpm; do
    qemu-io -c "write -P 1 64k 4k" -c "write -z 1M 64k" -c "write -P 2 7M 1M" \
            $img.qcow2 >/dev/null
    same_map $img.qcow2
done

# A writer holds the image: refused without -U, mapped with it.
qemu-nbd -k "$tmpdir/nbd.sock" -f qcow2 a.qcow2 &
nbd_pid=$!
cleanup_fn sh -c "kill $nbd_pid 2>/dev/null; true"
for i in $(seq 100); do
    test -S "$tmpdir/nbd.sock" && break
    sleep 0.1
done
if "$QNBD_IMG" map a.qcow2 2>err; then
    false
fi
grep -i "in use\|lock" err
diff <(qemu-img map -U --output=json a.qcow2) \
     <("$QNBD_IMG" map -U --output=json a.qcow2)
diff <(qemu-img map --force-share a.qcow2) \
     <("$QNBD_IMG" map --force-share a.qcow2)
kill $nbd_pid
wait $nbd_pid || true

# Hostile images: a clear error, exit status 1, no hang.
hostile ()
{
    local img=$1 want=$2 status=0
    timeout 20 "$QNBD_IMG" map "$img" >/dev/null 2>err || status=$?
    cat err
    test $status = 1
    grep -q "$want" err
}
cp a.qcow2 l2-past-end.qcow2
cp a.qcow2 unaligned.qcow2
python3 - <<'EOF'
import struct
def l1_offset(f):
    f.seek(40)
    return struct.unpack('>Q', f.read(8))[0]
with open('l2-past-end.qcow2', 'r+b') as f:
    f.seek(l1_offset(f))
    f.write(struct.pack('>Q', (1 << 63) | (1 << 40)))
with open('unaligned.qcow2', 'r+b') as f:
    f.seek(l1_offset(f))
    l2 = struct.unpack('>Q', f.read(8))[0] & 0x00fffffffffffe00
    f.seek(l2)
    old = struct.unpack('>Q', f.read(8))[0]
    f.seek(l2)
    f.write(struct.pack('>Q', old | 0x200))
EOF
hostile l2-past-end.qcow2 "past the end of the file"
hostile unaligned.qcow2 "unaligned"
# A subcluster both allocated and zero.
cp e.qcow2 bad-bitmap.qcow2
python3 - <<'EOF'
import struct
with open('bad-bitmap.qcow2', 'r+b') as f:
    f.seek(40)
    f.seek(struct.unpack('>Q', f.read(8))[0])
    l2 = struct.unpack('>Q', f.read(8))[0] & 0x00fffffffffffe00
    f.seek(l2 + 8)
    bmp = struct.unpack('>Q', f.read(8))[0]
    f.seek(l2 + 8)
    f.write(struct.pack('>Q', bmp | (1 << 32)))
EOF
hostile bad-bitmap.qcow2 "invalid subcluster bitmap"
qemu-img create -q -f qcow2 loop1.qcow2 1M
qemu-img create -q -f qcow2 -b loop1.qcow2 -F qcow2 loop2.qcow2 1M
qemu-img rebase -u -b loop2.qcow2 -F qcow2 loop1.qcow2
hostile loop2.qcow2 "loop"

# info: snapshots and --backing-chain, in JSON (every field qemu-img has,
# the same values, and no other) and in text (the same text).
same_info ()
{
    local ours theirs
    ours=$("$QNBD_IMG" info --output=json "$@")
    theirs=$(qemu-img info --output=json "$@")
    jq -e -n --argjson a "$ours" --argjson b "$theirs" '
        ($b | del(.. | .children?)) as $b
        | [$b | paths(scalars)] as $pb | [$a | paths(scalars)] as $pa
        | ($pb - $pa) == [] and ($pa - $pb) == []
          and all($pb[]; . as $p | ($a | getpath($p)) == ($b | getpath($p)))' \
        >/dev/null
    diff -u <(qemu-img info "$@" | sed '/^Child node/,/^[^ ]/{/^Child node/d;/^ /d}') \
            <("$QNBD_IMG" info "$@")
}
qemu-img snapshot -c first a.qcow2
qemu-io -c "write -P 9 0 64k" a.qcow2 >/dev/null
qemu-img snapshot -c "the second" a.qcow2
qemu-img snapshot -c s1 mid.qcow2
same_info a.qcow2
same_info --backing-chain top.qcow2
same_info --backing-chain "$tmpdir/eb.qcow2"
same_info --backing-chain df.qcow2
test "$("$QNBD_IMG" info --output=json a.qcow2 | jq '.snapshots | length')" = 2

# A writer holds the image: info refuses without -U, describes with it.
qemu-nbd -k "$tmpdir/nbd2.sock" -f qcow2 top.qcow2 &
nbd_pid=$!
cleanup_fn sh -c "kill $nbd_pid 2>/dev/null; true"
for i in $(seq 100); do
    test -S "$tmpdir/nbd2.sock" && break
    sleep 0.1
done
if "$QNBD_IMG" info top.qcow2 2>err; then
    false
fi
cat err
grep "locked by process $nbd_pid (qemu-nbd)" err
same_info -U --backing-chain top.qcow2
kill $nbd_pid
wait $nbd_pid || true

# A loop in the chain: the images up to it, then an error.
status=0
timeout 20 "$QNBD_IMG" info --backing-chain loop2.qcow2 >/dev/null 2>err \
    || status=$?
cat err
test $status = 1
grep -q "loop" err
