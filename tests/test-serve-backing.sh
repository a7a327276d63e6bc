#!/usr/bin/env bash
# test-serve-backing.sh: an overlay is served with its backing chain: a qcow2
# base, and a raw base.  Reads of clusters the overlay does not have come
# from the base; writes through qnbd (partial clusters over base data, so
# copy-on-write from the base) go to the overlay only, the base is never
# modified, and the overlay then checks clean and reads back (through the
# chain) exactly the expected data.

source "${srcdir:-.}/functions.sh"
set -e
set -x

requires qemu-img qemu-io nbdcopy cmp md5sum

size=$(( 16 * 1024 * 1024 ))

# Written to the base, then to the overlay, then through qnbd.
base_writes=(
    -c 'write -P 0x11 0 4M'
    -c 'write -P 0x12 6M 1M'
    -c "write -P 0x13 $(( size - 65536 )) 64k"
)
overlay_writes=(
    -c 'write -P 0x21 1M 64k'
    -c 'write -P 0x22 6815744 4096'
)
served_writes=(
    -c 'write -P 0x31 100000 5000'
    -c 'write -P 0x32 2000000 70000'
    -c 'write -P 0x33 6300000 1'
    -c 'write -P 0x34 12M 128k'
    -c "write -P 0x35 $(( size - 1000 )) 1000"
)

for base_fmt in qcow2 raw; do
    base=$tmpdir/base.$base_fmt
    overlay=$tmpdir/overlay.qcow2
    expected=$tmpdir/expected.raw
    got=$tmpdir/got.raw

    qemu-img create -f "$base_fmt" "$base" $size
    qemu-io -f "$base_fmt" "${base_writes[@]}" "$base"
    qemu-img create -f qcow2 -o cluster_size=65536 \
        -b "$base" -F "$base_fmt" "$overlay"
    qemu-io -f qcow2 "${overlay_writes[@]}" "$overlay"
    qemu-img convert -f qcow2 -O raw "$overlay" "$expected"
    base_sum=$(md5sum < "$base")

    start_qnbd "$overlay"
    nbdcopy "$uri" "$got"
    cmp "$expected" "$got"

    qemu-io -f raw "${served_writes[@]}" "$uri"
    qemu-io -f raw "${served_writes[@]}" "$expected"
    nbdcopy "$uri" "$got"
    cmp "$expected" "$got"
    stop_qnbd

    test "$(md5sum < "$base")" = "$base_sum"
    check_image "$overlay"
    compare_raw "$expected" "$overlay"
    rm -f "$base" "$overlay" "$expected" "$got"
done
