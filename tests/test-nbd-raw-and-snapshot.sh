#!/usr/bin/env bash
# test-nbd-raw-and-snapshot.sh: what -f, -l and the format probe serve.
#
# - a raw file served with -f raw: nbdcopy into it and out of it, the file
#   then holds exactly what was copied in; no warning;
# - the same file served with -f auto: probed as raw, with exactly one
#   warning line on stderr, and served the same; a write that would give
#   it a qcow2 magic is refused (EPERM), which -f raw allows;
# - a qcow2 image served with -f auto: probed as qcow2, no warning;
# - -l NAME and -l ID serve an internal snapshot, read-only, with the data
#   qemu-img convert -l gives; an unknown snapshot makes qnbd exit 1;
# - an image written compressed (qemu-img convert -c) reads back exactly.

source "${srcdir:-.}/functions.sh"
set -e
set -x

requires qemu-img qemu-io nbdcopy nbdinfo cmp head truncate seq awk timeout
requires_python_nbd

size=$(( 6 * 1024 * 1024 ))

# Data with holes, compressible text and random bytes.
src=$tmpdir/src.raw
{
    seq -f 'line %g of the source' 1 30000
    head -c $(( 1024 * 1024 )) /dev/urandom
} > "$src"
truncate -s $(( 4 * 1024 * 1024 )) "$src"
head -c 100000 /dev/urandom >> "$src"
truncate -s $size "$src"

# warnings ERRFILE: the number of warning lines qnbd printed.
warnings ()
{
    grep -c '^qnbd: warning: ' "$1" || true
}

# errfile: the stderr of the last qnbd started.
errfile ()
{
    echo "${_qnbd_errfile[$qnbd_pid]}"
}

# differ A B: the files A and B differ.
differ ()
{
    if cmp -s "$1" "$2"; then
        echo "$0: $1 and $2 are the same" >&2
        return 1
    fi
}

# ------------------------------------------------------------------
# A raw file, -f raw.
raw=$tmpdir/disk.raw
truncate -s $size "$raw"
start_qnbd -f raw "$raw"
test "$(nbdinfo --size "$uri")" = $size
nbdcopy "$src" "$uri"
nbdcopy "$uri" "$tmpdir/got.raw"
cmp "$src" "$tmpdir/got.raw"
nbdinfo --map "$uri"
stop_qnbd
cmp "$src" "$raw"
test "$(warnings "$(errfile)")" = 0

# ------------------------------------------------------------------
# The same file probed: served as raw, one warning line naming it.
start_qnbd -f auto "$raw"
nbdcopy "$uri" "$tmpdir/got.raw"
cmp "$src" "$tmpdir/got.raw"
cat "$(errfile)"
test "$(warnings "$(errfile)")" = 1
grep -F "$raw" "$(errfile)" | grep -q 'raw'

# Writes to the first bytes are fine, unless they write a qcow2 magic or
# write part of the first four bytes.
"$PYTHON" - "$uri" <<'EOF'
import errno, sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
h.pwrite(b"not a magic" + bytes(501), 0)
for data, off, what in ((b"QFI\xfb" + bytes(508), 0, "qcow2 magic"),
                        (b"Q", 0, "one byte of the first four"),
                        (b"FI\xfb" + bytes(509), 1, "three of the first four")):
    try:
        h.pwrite(data, off)
    except nbd.Error as e:
        assert e.errnum == errno.EPERM, "%s: %s" % (what, e)
        print("%s: refused: %s" % (what, e))
        continue
    raise AssertionError("%s: write succeeded" % what)
assert h.pread(11, 0) == b"not a magic"
h.pwrite(b"abcdef", 4)
h.shutdown()
EOF
stop_qnbd
head -c 10 "$raw" | cmp - <(printf 'not abcdef')

# -f raw says the file is raw on purpose: the magic may be written.
start_qnbd -f raw "$raw"
"$PYTHON" -c '
import sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
h.pwrite(b"QFI\xfb", 0)
h.shutdown()' "$uri"
stop_qnbd
head -c 4 "$raw" | cmp - <(printf 'QFI\xfb')

# ------------------------------------------------------------------
# A qcow2 image probed: no warning.
img=$tmpdir/disk.qcow2
qemu-img convert -f raw -O qcow2 "$src" "$img"
start_qnbd -f auto "$img"
nbdcopy "$uri" "$tmpdir/got.raw"
cmp "$src" "$tmpdir/got.raw"
stop_qnbd
test "$(warnings "$(errfile)")" = 0

# ------------------------------------------------------------------
# Internal snapshots: -l NAME and -l ID serve the snapshot, read-only.
qemu-io -f qcow2 -c 'write -P 0x61 0 1M' -c 'write -P 0x62 5M 64k' "$img"
qemu-img snapshot -c first "$img"
qemu-io -f qcow2 -c 'write -P 0x71 512k 1M' -c 'write -z 4M 128k' \
    -c 'discard 5M 64k' "$img"
qemu-img snapshot -c second "$img"
qemu-io -f qcow2 -c 'write -P 0x81 0 3M' "$img"
qemu-img snapshot -l "$img"
qemu-img convert -f qcow2 -O raw -l snapshot.name=first "$img" "$tmpdir/first.raw"
qemu-img convert -f qcow2 -O raw -l snapshot.name=second "$img" "$tmpdir/second.raw"
qemu-img convert -f qcow2 -O raw "$img" "$tmpdir/active.raw"
differ "$tmpdir/first.raw" "$tmpdir/second.raw"
differ "$tmpdir/second.raw" "$tmpdir/active.raw"
id_second=$(qemu-img snapshot -l "$img" | awk '$2 == "second" { print $1 }')
test -n "$id_second"

for sel in first "$id_second"; do
    start_qnbd -l "$sel" "$img"
    nbdinfo --is read-only "$uri"
    nbdcopy "$uri" "$tmpdir/got.raw"
    if [ "$sel" = first ]; then
        cmp "$tmpdir/first.raw" "$tmpdir/got.raw"
    else
        cmp "$tmpdir/second.raw" "$tmpdir/got.raw"
    fi
    # Writes are refused.
    "$PYTHON" -c '
import errno, sys, nbd
h = nbd.NBD()
h.set_strict_mode(0)
h.connect_uri(sys.argv[1])
assert h.is_read_only()
try:
    h.pwrite(b"x" * 512, 0)
    raise AssertionError("write to a snapshot succeeded")
except nbd.Error as e:
    assert e.errnum == errno.EPERM, e
h.shutdown()' "$uri"
    stop_qnbd
done

# An unknown snapshot: exit status 1, one line naming the file.
st=0
timeout -k 5 20 "$QNBD" -k "$tmpdir/nosnap.sock" -l nosuchsnapshot "$img" \
    </dev/null >/dev/null 2>"$tmpdir/nosnap.err" || st=$?
cat "$tmpdir/nosnap.err"
test "$st" = 1
test "$(wc -l < "$tmpdir/nosnap.err")" = 1
grep -qF "$img" "$tmpdir/nosnap.err"

# The active image was not touched by serving its snapshots.
check_image "$img"
qemu-img convert -f qcow2 -O raw "$img" "$tmpdir/got.raw"
cmp "$tmpdir/active.raw" "$tmpdir/got.raw"

# ------------------------------------------------------------------
# A compressed image.
cimg=$tmpdir/compressed.qcow2
qemu-img convert -c -f raw -O qcow2 -o cluster_size=65536 "$src" "$cimg"
qemu-img map --output=json "$cimg" | head -5
start_qnbd -f qcow2 "$cimg"
nbdcopy "$uri" "$tmpdir/got.raw"
cmp "$src" "$tmpdir/got.raw"
stop_qnbd
check_image "$cimg"
