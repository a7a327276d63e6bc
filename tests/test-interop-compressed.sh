#!/usr/bin/env bash
# test-interop-compressed.sh: images with compressed clusters, written by
# qemu-img convert -c (zlib, and zstd where the image says so), are read
# correctly through qnbd; writes through qnbd (QEMU's NBD client) into
# compressed clusters, partial and whole, land where they should; the image
# then checks clean and holds exactly the expected data.

source "${srcdir:-.}/functions.sh"
set -e
set -x

requires qemu-img qemu-io nbdcopy cmp head

size=$(( 8 * 1024 * 1024 ))
src=$tmpdir/src.raw

# Compressible data (repeated text), incompressible data (random), a hole,
# and a partial last cluster's worth of text.
{
    for i in $(seq 1 40000); do echo "line $i of some compressible text"; done
    head -c $(( 1024 * 1024 )) /dev/urandom
} > "$src"
truncate -s $(( 5 * 1024 * 1024 )) "$src"
for i in $(seq 1 20000); do echo "tail line $i"; done >> "$src"
truncate -s "$size" "$src"

# The writes made through the export, also applied to the expected data.
writes=(
    -c 'write -P 0x5a 70000 1000'
    -c 'write -P 0x6b 131072 65536'
    -c 'write -P 0x7c 1000000 300000'
)

for ctype in zlib zstd; do
    for cluster in 4096 65536; do
        img=$tmpdir/c$cluster-$ctype.qcow2
        expected=$tmpdir/expected.raw
        got=$tmpdir/got.raw

        qemu-img convert -c -f raw -O qcow2 \
            -o cluster_size=$cluster,compression_type=$ctype "$src" "$img"
        qemu-img info "$img"
        cp "$src" "$expected"

        start_qnbd "$img"
        nbdcopy "$uri" "$got"
        cmp "$expected" "$got"

        qemu-io -f raw "${writes[@]}" "$uri"
        qemu-io -f raw "${writes[@]}" "$expected"
        nbdcopy "$uri" "$got"
        cmp "$expected" "$got"
        stop_qnbd

        check_image "$img"
        compare_raw "$expected" "$img"
        rm -f "$img" "$expected" "$got"
    done
done
