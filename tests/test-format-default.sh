#!/usr/bin/env bash
# test-format-default.sh: without -f qnbd serves qcow2 only.  A qcow2 image
# whose magic was damaged must not be served as raw (a guest could then
# overwrite what is left of its metadata): it is refused with one line
# naming the file and saying how to serve a raw file.  With -f raw the same
# file is served as raw, byte for byte.

source "${srcdir:-.}/functions.sh"
set -e
set -x

requires qemu-img nbdcopy nbdinfo dd cmp timeout

img=$tmpdir/damaged.qcow2
qemu-img create -f qcow2 "$img" 64M
# "QFI\xfb" -> "XFI\xfb"
printf 'X' | dd of="$img" bs=1 conv=notrunc status=none

# The default refuses it: status 1, one line, the path, the hint.
st=0
timeout -k 5 20 "$QNBD" -k "$tmpdir/sock" "$img" \
    </dev/null >/dev/null 2>"$tmpdir/err" || st=$?
cat "$tmpdir/err"
test "$st" -eq 1
test "$(wc -l < "$tmpdir/err")" -eq 1
grep -qF "$img: not a qcow2 image (use -f raw to serve it as a raw file)" \
    "$tmpdir/err"
test ! -e "$tmpdir/sock"

# -f raw serves the file itself: its size, its bytes.
start_qnbd -f raw "$img"
test "$(nbdinfo --size "$uri")" = "$(stat -c %s "$img")"
nbdcopy "$uri" "$tmpdir/got"
cmp "$img" "$tmpdir/got"
stop_qnbd

# -f auto still probes it as raw, with a warning.
start_qnbd -f auto -r "$img"
nbdcopy "$uri" "$tmpdir/got"
cmp "$img" "$tmpdir/got"
stop_qnbd
grep -q 'warning: .*not a qcow2 image' "$tmpdir"/qnbd2.err

# A good qcow2 image is served without -f.
qemu-img create -f qcow2 "$tmpdir/good.qcow2" 1M
start_qnbd "$tmpdir/good.qcow2"
test "$(nbdinfo --size "$uri")" = 1048576
stop_qnbd
