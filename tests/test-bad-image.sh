#!/usr/bin/env bash
# test-bad-image.sh: an image qnbd cannot serve makes it exit with status 1
# and exactly one line on stderr that names the file: a missing file, a file
# that is not qcow2, a truncated header, and a qcow2 v3 image with an
# incompatible feature bit qnbd does not know (bit 63).
#
# No -f: the default format is qcow2 (test-format-default.sh).

source "${srcdir:-.}/functions.sh"
set -e
set -x

requires qemu-img head dd timeout

# refused FILE: qnbd must refuse FILE with one line naming it.
refused ()
{
    local file=$1 st=0 err=$tmpdir/stderr lines
    timeout -k 5 20 "$QNBD" -k "$tmpdir/sock" "$file" \
        </dev/null >/dev/null 2>"$err" || st=$?
    cat "$err"
    if [ "$st" -ne 1 ]; then
        echo "$0: qnbd $file: exit status $st, expected 1" >&2
        return 1
    fi
    lines=$(wc -l < "$err")
    if [ "$lines" -ne 1 ]; then
        echo "$0: qnbd $file: $lines lines on stderr, expected 1" >&2
        return 1
    fi
    if ! grep -qF "$file" "$err"; then
        echo "$0: qnbd $file: the error does not name the file" >&2
        return 1
    fi
}

if [ ! -x "$QNBD" ]; then
    echo "$0: $QNBD is not built" >&2
    exit 1
fi

# A missing file.
refused "$tmpdir/missing.qcow2"

# Not a qcow2 file: text, then random bytes.
{ echo "this is not a qcow2 image"; head -c 1M /dev/urandom; } > "$tmpdir/text.img"
refused "$tmpdir/text.img"

# A good header cut short (qcow2 v2 headers are 72 bytes, v3 at least 104).
qemu-img create -f qcow2 "$tmpdir/good.qcow2" 64M
head -c 50 "$tmpdir/good.qcow2" > "$tmpdir/truncated.qcow2"
refused "$tmpdir/truncated.qcow2"

# incompatible_features (big-endian, bytes 72..79): set bit 63.
qemu-img create -f qcow2 -o compat=1.1 "$tmpdir/feature.qcow2" 64M
printf '\x80' | dd of="$tmpdir/feature.qcow2" bs=1 seek=72 conv=notrunc status=none
refused "$tmpdir/feature.qcow2"
