#!/usr/bin/env bash
# fuzz/make-corpus.sh DIR: seed images for fuzz-qcow2-open, made with
# qemu-img and qemu-io (small, varied: versions, cluster sizes, refcount
# widths, compression, backing names, snapshots, lazy refcounts, extended
# L2 entries; tables past the end of the file).
set -euo pipefail
out=${1:?usage: make-corpus.sh DIR}
mkdir -p "$out"
cd "$out"
n=0
mk () {
    n=$((n + 1))
    qemu-img create -q -f qcow2 "$@" "seed-$n.qcow2" 2M
    qemu-io -f qcow2 -c 'write -q -P 0x5a 0 70k' -c 'write -q -z 128k 64k' \
        -c 'write -q -P 0x11 1M 4k' "seed-$n.qcow2" >/dev/null
}
mk -o cluster_size=512
mk -o cluster_size=4096,refcount_bits=1
mk -o cluster_size=65536
mk -o compat=0.10,cluster_size=4096
mk -o cluster_size=4096,refcount_bits=64
mk -o lazy_refcounts=on,cluster_size=4096
mk -o extended_l2=on,cluster_size=16384
mk -o cluster_size=4096
qemu-img snapshot -c s1 "seed-$n.qcow2"
head -c 300k /dev/urandom > base.raw
n=$((n + 1))
qemu-img create -q -f qcow2 -b base.raw -F raw -o cluster_size=4096 "seed-$n.qcow2" 2M
qemu-io -f qcow2 -c 'write -q -P 0x22 4k 8k' "seed-$n.qcow2" >/dev/null
n=$((n + 1))
qemu-img create -q -f qcow2 -b base.raw -F raw -o extended_l2=on,cluster_size=16384 "seed-$n.qcow2" 2M
qemu-io -f qcow2 -c 'write -q -P 0x23 5k 3k' -c 'write -q -z 40k 2k' \
    -c 'discard -q 64k 16k' "seed-$n.qcow2" >/dev/null
# Hostile seeds: tables and refcounts pointing far past the end of a small
# file (open must stay cheap: tests/test-open-bounds.c).
put64 () {  # FILE OFFSET VALUE: a big-endian 64-bit field
    local hex esc=
    hex=$(printf '%016x' "$3")
    for i in 0 2 4 6 8 10 12 14; do esc="$esc\\x${hex:$i:2}"; done
    printf "$esc" | dd of="$1" bs=1 seek="$2" conv=notrunc status=none
}
get64 () {  # FILE OFFSET
    echo $((0x$(od -An -tx1 -j "$2" -N 8 "$1" | tr -d ' \n')))
}
mk -o lazy_refcounts=on,cluster_size=4096
f=seed-$n.qcow2 reft=$(get64 "seed-$n.qcow2" 48)
put64 "$f" $((reft + 8 * 100)) "$(get64 "$f" "$reft")"   # counts far away
put64 "$f" 72 1                                         # dirty
mk -o cluster_size=4096                                  # ... and clean
f=seed-$n.qcow2 reft=$(get64 "seed-$n.qcow2" 48)
put64 "$f" $((reft + 8 * 100)) "$(get64 "$f" "$reft")"
mk -o cluster_size=4096
f=seed-$n.qcow2
put64 "$f" "$(get64 "$f" 40)" $(( (1 << 63) | (1 << 40) ))  # L2 past the end
mk -o cluster_size=4096
f=seed-$n.qcow2
put64 "$f" $(( $(get64 "$f" 48) + 8 )) $((1 << 40))   # refcount block too
head -c 1M /dev/zero | tr '\0' 'a' > text.raw
n=$((n + 1))
qemu-img convert -q -c -O qcow2 -o cluster_size=4096 text.raw "seed-$n.qcow2"
rm -f text.raw
# Every cluster preallocated (as qnbd-img create makes them too).
mk -o cluster_size=4096,preallocation=metadata
# The base file stays: a seed naming it opens its backing file.
ls -l "$out" | tail -n +2 | wc -l
