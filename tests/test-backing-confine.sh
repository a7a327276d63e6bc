#!/usr/bin/env bash
# test-backing-confine.sh: the host files an image can reach through its
# backing file and external data file names (--backing, --allow-dir).
#
# The images live in $dir; $out is a directory beside it holding a 0600
# "secret" that no image in $dir may read by default:
# - confine (the default): an absolute name outside $dir, "../out/secret",
#   and a symlink inside $dir pointing outside are refused, for backing
#   files and data files; --allow-dir $out admits them; a chain that stays
#   inside $dir is served;
# - follow: the outside files are served (as before);
# - none: any backing file or data file is refused;
# - every mode: a FIFO backing file is refused at once (no hang), and so is
#   /dev/zero as a data file: only regular files;
# - a chain that names a file already in it (itself, or a 2-image loop) is
#   refused quickly and cheaply, even with a 32 MiB L1 table per image.

source "${srcdir:-.}/functions.sh"
set -e
set -x

requires qemu-img qemu-io nbdcopy nbdinfo cmp head mkfifo timeout
[ -x /usr/bin/time ] || { echo "$0: SKIP: /usr/bin/time not found" >&2; exit 77; }

dir=$tmpdir/images
out=$tmpdir/out
mkdir "$dir" "$out"
# qemu-img resolves a relative data file name from its working directory.
cd "$dir"

secret=$out/secret
head -c 1M /dev/urandom > "$secret"
chmod 600 "$secret"
head -c 1M /dev/urandom > "$out/data"

# refused MESSAGE [QNBD ARGS...] IMAGE: qnbd must exit 1 within 20 s with
# one line on stderr that names IMAGE and contains MESSAGE.
refused ()
{
    local msg=$1 st=0 err=$tmpdir/stderr lines
    shift
    timeout -k 5 20 "$QNBD" -k "$tmpdir/refused.sock" "$@" \
        </dev/null >/dev/null 2>"$err" || st=$?
    cat "$err"
    rm -f "$tmpdir/refused.sock"
    if [ "$st" -ne 1 ]; then
        echo "$0: qnbd $*: exit status $st, expected 1" >&2
        return 1
    fi
    lines=$(wc -l < "$err")
    if [ "$lines" -ne 1 ]; then
        echo "$0: qnbd $*: $lines lines on stderr, expected 1" >&2
        return 1
    fi
    if ! grep -qF "${!#}" "$err" || ! grep -qF -- "$msg" "$err"; then
        echo "$0: qnbd $*: expected the image's name and '$msg'" >&2
        return 1
    fi
}

# serves_secret [QNBD ARGS...] IMAGE: qnbd serves IMAGE and its first MiB
# is the secret.
serves_secret ()
{
    start_qnbd "$@"
    nbdcopy "$uri" "$tmpdir/got"
    stop_qnbd
    cmp -n 1048576 "$secret" "$tmpdir/got"
}

outside="outside the image's directory"

# ------------------------------------------------------------------
# A backing file named by its absolute path, outside.
qemu-img create -f qcow2 -b "$secret" -F raw "$dir/abs.qcow2"
refused "$outside" "$dir/abs.qcow2"
refused "$outside" --backing=confine "$dir/abs.qcow2"
serves_secret --backing=follow "$dir/abs.qcow2"
serves_secret --allow-dir "$out" "$dir/abs.qcow2"
mkdir "$tmpdir/other"
serves_secret --allow-dir "$tmpdir/other" --allow-dir "$out/" -r "$dir/abs.qcow2"
# A mistyped --allow-dir is an error, not a directory that allows nothing.
refused "allowed directory $tmpdir/nothing: No such file" \
    --allow-dir "$tmpdir/nothing" "$dir/abs.qcow2"
refused "backing file" --backing=none "$dir/abs.qcow2"

# A relative name climbing out.
qemu-img create -f qcow2 -b ../out/secret -F raw "$dir/dotdot.qcow2"
refused "$outside" "$dir/dotdot.qcow2"
serves_secret --backing=follow "$dir/dotdot.qcow2"

# A symlink inside the directory pointing outside: the name looks inside,
# the file is not.
ln -s ../out/secret "$dir/link"
qemu-img create -f qcow2 -b link -F raw -o backing_fmt=raw "$dir/link.qcow2"
refused "$outside" "$dir/link.qcow2"
serves_secret --backing=follow "$dir/link.qcow2"

# A chain inside the directory is served by default, and refused by none.
qemu-img create -f qcow2 "$dir/base.qcow2" 1M
qemu-io -f qcow2 -c 'write -P 0x5a 0 64k' "$dir/base.qcow2"
qemu-img create -f qcow2 -b base.qcow2 -F qcow2 "$dir/top.qcow2"
start_qnbd "$dir/top.qcow2"
nbdcopy "$uri" "$tmpdir/got"
stop_qnbd
head -c 65536 "$tmpdir/got" | cmp - <(head -c 65536 /dev/zero | tr '\0' 'Z')
refused "backing file" --backing=none "$dir/top.qcow2"
# An image with neither is served by none.
start_qnbd --backing=none "$dir/base.qcow2"
stop_qnbd

# ------------------------------------------------------------------
# A FIFO as backing file: refused in every mode, without blocking on it.
mkfifo "$dir/fifo"
qemu-img create -f qcow2 -u -b fifo -F raw "$dir/fifo.qcow2" 1M
refused "not a regular file" "$dir/fifo.qcow2"
refused "not a regular file" --backing=follow "$dir/fifo.qcow2"

# ------------------------------------------------------------------
# External data files.
qemu-img create -f qcow2 -o data_file=img.data "$dir/df.qcow2" 1M
start_qnbd "$dir/df.qcow2"
stop_qnbd
refused "data file" --backing=none "$dir/df.qcow2"

# /dev/zero: not a regular file, in every mode.
qemu-img amend -o data_file=/dev/zero "$dir/df.qcow2"
refused "not a regular file" --backing=follow "$dir/df.qcow2"
refused "/dev/zero" "$dir/df.qcow2"

# A data file outside (clients write it): refused unless followed or
# allowed.
qemu-img amend -o data_file="$out/data" "$dir/df.qcow2"
refused "$outside" "$dir/df.qcow2"
qemu-img amend -o data_file=../out/data "$dir/df.qcow2"
refused "$outside" "$dir/df.qcow2"
for opt in --backing=follow:33 "--allow-dir=$out:44"; do
    start_qnbd "${opt%:*}" "$dir/df.qcow2"
    qemu-io -f raw -c "write -P 0x${opt##*:} 0 64k" "$uri"
    stop_qnbd
    cmp -n 65536 "$out/data" \
        <(head -c 65536 /dev/zero | tr '\0' "$(printf "\x${opt##*:}")")
done

# ------------------------------------------------------------------
# Loops: an image that is its own backing file, and two images naming
# each other, in every mode that follows backing files.
qemu-img create -f qcow2 "$dir/self.qcow2" 1M
qemu-img rebase -u -b self.qcow2 -F qcow2 "$dir/self.qcow2"
qemu-img create -f qcow2 "$dir/a.qcow2" 1M
qemu-img create -f qcow2 -b a.qcow2 -F qcow2 "$dir/b.qcow2"
qemu-img rebase -u -b b.qcow2 -F qcow2 "$dir/a.qcow2"
for mode in confine follow; do
    refused "backing chain loop: $dir/self.qcow2 is already in the chain" \
        --backing=$mode "$dir/self.qcow2"
    refused "backing chain loop" --backing=$mode "$dir/a.qcow2"
done
# A hard link is the same file under another name.
ln "$dir/a.qcow2" "$dir/hard.qcow2"
qemu-img rebase -u -b hard.qcow2 -F qcow2 "$dir/b.qcow2"
refused "backing chain loop" "$dir/a.qcow2"
# An image whose data file is itself: guest writes would land on its own
# metadata.
qemu-img create -f qcow2 -o data_file=own.data "$dir/own.qcow2" 1M
qemu-img amend -o data_file=own.qcow2 "$dir/own.qcow2"
refused "own.qcow2 is already in the chain" --backing=follow "$dir/own.qcow2"

# A loop of images with 32 MiB L1 tables (512-byte clusters, 128 GiB) is
# refused after reading one of them, not 32: in little time and memory.
qemu-img create -f qcow2 -o cluster_size=512 "$dir/big.qcow2" 128G
qemu-img rebase -u -b big.qcow2 -F qcow2 "$dir/big.qcow2"
start=$(date +%s%N)
/usr/bin/time -f '%M' -o "$tmpdir/maxrss" \
    timeout -k 5 60 "$QNBD" -r -k "$tmpdir/big.sock" "$dir/big.qcow2" \
    </dev/null >/dev/null 2>"$tmpdir/stderr" || true
ms=$(( ($(date +%s%N) - start) / 1000000 ))
cat "$tmpdir/stderr"
grep -qF "backing chain loop" "$tmpdir/stderr"
rss_kib=$(tail -1 "$tmpdir/maxrss")
echo "refused in $ms ms, peak RSS $rss_kib KiB"
test "$rss_kib" -lt $(( 300 * 1024 ))
test "$ms" -lt 10000
