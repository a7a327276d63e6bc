#!/usr/bin/env bash
# test-interop-qemu-io.sh: images written by qemu-io are served correctly.
#
# For cluster sizes 4 KiB, 64 KiB and 2 MiB, and for qcow2 v2 (compat=0.10)
# and v3 (compat=1.1), qemu-io writes patterns (aligned and not, across
# cluster edges, rewrites, zeroes, discards, the last sectors of the disk);
# what qemu-img convert -O raw makes of the image is the expected data.
# Through qnbd, both nbdcopy (libnbd) and qemu-img compare (QEMU's NBD
# client) must read exactly that; afterwards the image must still check
# clean and hold the same data.

source "${srcdir:-.}/functions.sh"
set -e
set -x

requires qemu-img qemu-io nbdcopy cmp

size=$(( 16 * 1024 * 1024 ))
end4k=$(( size - 4096 ))
last=$(( size - 1 ))

for cluster in 4096 65536 2097152; do
    for compat in 0.10 1.1; do
        img=$tmpdir/c$cluster-v$compat.qcow2
        expected=$tmpdir/expected.raw
        got=$tmpdir/got.raw

        qemu-img create -f qcow2 -o cluster_size=$cluster,compat=$compat \
                 "$img" $size
        qemu-io -f qcow2 \
            -c 'write -P 0xab 0 64k' \
            -c 'write -P 0xcd 65535 3' \
            -c 'write -P 0x44 32k 16k' \
            -c 'write -P 0x11 1M 4k' \
            -c 'write -P 0x12 1049600 1' \
            -c 'write -P 0x22 3145216 1536' \
            -c 'write -P 0x55 8M 256k' \
            -c 'write -z 8454144 128k' \
            -c 'write -z 5M 1M' \
            -c 'write -P 0x66 10M 256k' \
            -c 'discard 10M 128k' \
            -c 'write -P 0x7e 2097151 2' \
            -c "write -P 0x33 $end4k 4k" \
            -c "write -P 0xee $last 1" \
            "$img"
        qemu-img check -f qcow2 "$img"
        qemu-img convert -f qcow2 -O raw "$img" "$expected"

        start_qnbd "$img"
        nbdcopy "$uri" "$got"
        cmp "$expected" "$got"
        qemu-img compare -f raw -F raw "$expected" "$uri"
        stop_qnbd

        check_image "$img"
        compare_raw "$expected" "$img"
        rm -f "$img" "$expected" "$got"
    done
done
