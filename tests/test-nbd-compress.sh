#!/usr/bin/env bash
# tests/test-nbd-compress.sh: qnbd --compress stores what nbdcopy writes as
# compressed clusters: the image ends up much smaller than the data, passes
# qemu-img check, and reads back identically with QEMU.
source "${srcdir:-.}/functions.sh"
set -e
requires qemu-img nbdcopy

dir=$tmpdir
img=$dir/backup.qcow2
src=$dir/src.raw
# 32 MiB of compressible text.
for i in $(seq 1 2000); do
    echo "line $i: qnbd stores backups compressed when asked to, densely packed"
done > "$dir/chunk"
while [ "$(stat -c %s "$src" 2>/dev/null || echo 0)" -lt $((32 << 20)) ]; do
    cat "$dir/chunk" >> "$src"
done
truncate -s 32M "$src"
qemu-img create -q -f qcow2 "$img" 32M

start_qnbd --compress "$img"
nbdcopy "$src" "$uri"
stop_qnbd

size=$(stat -c %s "$img")
echo "image: $size bytes for 32 MiB"
[ "$size" -lt $((8 << 20)) ]
qemu-img check "$img"
qemu-img check "$img" | grep -Eq '[1-9][0-9.]*% compressed clusters'
qemu-img compare -f raw -F qcow2 "$src" "$img"
