#!/usr/bin/env bash
# tests/test-nbd-compress.sh: qnbd --compress stores what nbdcopy writes as
# compressed clusters: the image ends up much smaller than the data, passes
# qemu-img check, and reads back identically with QEMU.  Mixed data (text,
# noise that stays uncompressed) packs no larger than qemu-img convert -c
# makes it; writes of parts of clusters are accepted and stored
# uncompressed; an image made by qnbd-img with compression_type=zstd gets
# zstd clusters.
source "${srcdir:-.}/functions.sh"
set -e
requires qemu-img nbdcopy qemu-io
: "${QNBD_IMG:=$PWD/../tools/qnbd-img}"

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

# Mixed data: text, noise, and text again, 1 MiB each, twice.
mix=$dir/mix.raw
for i in 1 2; do
    head -c $((1 << 20)) "$src"
    head -c $((1 << 20)) /dev/urandom
    tail -c $((1 << 20)) "$src" | tr a-z b-za
done > "$mix"
msize=$(stat -c %s "$mix")
qemu-img convert -c -O qcow2 "$mix" "$dir/conv.qcow2"
qemu-img create -q -f qcow2 "$img" "$msize"
start_qnbd --compress "$img"
nbdcopy "$mix" "$uri"
stop_qnbd
qemu-img check "$img"
qemu-img compare -f raw -F qcow2 "$mix" "$img"
# Space taken (a packing run's clusters that nothing was packed into are
# holes in the middle of the file), within the last cluster of the two
# open runs: qemu-img leaves the end of a cluster it did not fill a hole.
ours=$(du -k "$img" | cut -f1); theirs=$(du -k "$dir/conv.qcow2" | cut -f1)
echo "mixed data: $ours KiB ($(stat -c %s "$img") bytes)," \
    "qemu-img convert -c: $theirs KiB ($(stat -c %s "$dir/conv.qcow2") bytes)"
[ "$ours" -le $((theirs + 128)) ]

# Parts of clusters: accepted, stored as normal clusters, and a whole
# cluster written over one of them is compressed again.
start_qnbd --compress "$img"
qemu-io -f raw -c 'write -P 0x5a 1000 3000' -c 'write -P 0x17 70000 100' \
    -c 'write -P 0x33 131072 65536' "$uri"
stop_qnbd
printf '\x5a%.0s' $(seq 3000) | dd of="$mix" bs=1 seek=1000 conv=notrunc \
    status=none
printf '\x17%.0s' $(seq 100) | dd of="$mix" bs=1 seek=70000 conv=notrunc \
    status=none
head -c 65536 /dev/zero | tr '\0' '\063' | dd of="$mix" bs=1 seek=131072 \
    conv=notrunc status=none
qemu-img check "$img"
qemu-img compare -f raw -F qcow2 "$mix" "$img"
# Of 64 compressed clusters (the noise is not), the two written in part
# are not any more; the one written whole is.
qemu-img check "$img" | grep -q '64.58% compressed clusters'

# zstd: the image says which, qnbd-img makes it, qnbd writes it.
if [ -x "$QNBD_IMG" ]; then
    rm -f "$img"
    "$QNBD_IMG" create -f qcow2 -o compression_type=zstd "$img" "$msize"
    start_qnbd --compress "$img"
    nbdcopy "$mix" "$uri"
    stop_qnbd
    qemu-img info "$img" | grep -q 'compression type: zstd'
    qemu-img check "$img"
    qemu-img check "$img" | grep -Eq '[1-9][0-9.]*% compressed clusters'
    qemu-img compare -f raw -F qcow2 "$mix" "$img"
    echo "zstd: $(stat -c %s "$img") bytes"
fi
