#!/usr/bin/env bash
# test-qnbd-img-create.sh: images made by "qnbd-img create" over a matrix
# of options (cluster sizes 512 B to 2 MiB, refcount bits 1 to 64, compat
# 0.10 and 1.1, extended L2, lazy refcounts, zstd, every preallocation
# mode, backing files, external data files): qemu-img check finds each
# clean, qemu-img info shows the options asked for, the preallocation
# asked for is there (and metadata preallocation wrote no data), qemu-io
# writes and reads back a pattern across cluster boundaries (and still
# reads the backing file where nothing was written), and qnbd serves the
# image with its size and that data.  Bad option sets are refused.
# "qnbd-img info" agrees with "qemu-img info" on each image, in JSON
# (every field) and in text.

source "${srcdir:-.}/functions.sh"
set -e
set -x

requires qemu-img qemu-io nbdinfo jq
: "${QNBD_IMG:=$PWD/../tools/qnbd-img}"

M=$(( 1024 * 1024 ))
# Every disk; the pattern is written at 3 MiB - 1536, 2 MiB + 2560 long.
S=$(( 16 * M ))

# The bases of the backing-file cases: 0x5b everywhere.
qemu-img create -q -f raw "$tmpdir/base.raw" $S
qemu-io -f raw -c "write -P 0x5b 0 $S" "$tmpdir/base.raw" >/dev/null
qemu-img convert -f raw -O qcow2 "$tmpdir/base.raw" "$tmpdir/base.qcow2"

# clean_end IMAGE: qemu-img check finds no corruption and no leak (exit
# status 0); prints the image end offset.  (Called as $(clean_end ...),
# where bash turns set -e off: hence the returns.)
clean_end ()
{
    local out
    out=$(qemu-img check --output=json "$1") || return 1
    printf '%s\n' "$out" >&2
    jq -e '."check-errors" == 0 and ((.corruptions // 0) + (.leaks // 0)) == 0' \
       <<<"$out" >/dev/null || return 1
    jq '."image-end-offset"' <<<"$out"
}

# What the image's preallocation must look like: off (the file ends
# before the disk would), meta (it reaches past the disk but holds almost
# no blocks: nothing was written), alloc (its blocks are all there), any.
check_prealloc ()
{
    local img=$1 size=$2 kind=$3 end actual
    end=$(clean_end "$img")
    actual=$(( $(stat -c %b "$img") * 512 ))
    case $kind in
        off) test "$end" -lt "$size" ;;
        meta) test "$end" -ge "$size" && test "$actual" -lt $(( size / 2 )) ;;
        alloc) test "$end" -ge "$size" && test "$actual" -ge "$size" ;;
        any) ;;
    esac
}

# same_info IMAGE: "qnbd-img info" says what "qemu-img info" says: the
# JSON has every field of qemu-img's with the same value (but those it
# does not describe: the children and snapshots newer QEMUs list) and no
# other; the human output is the same text.
same_info ()
{
    local img=$1 ours theirs
    ours=$("$QNBD_IMG" info --output=json "$img")
    theirs=$(qemu-img info --output=json "$img")
    printf '%s\n' "$ours"
    jq -e -n --argjson a "$ours" --argjson b "$theirs" '
        ($b | del(.children, .snapshots)) as $b
        | [$b | paths(scalars)] as $pb | [$a | paths(scalars)] as $pa
        | ($pb - $pa) == [] and ($pa - $pb) == []
          and all($pb[]; . as $p | ($a | getpath($p)) == ($b | getpath($p)))' \
        >/dev/null
    diff -u <(qemu-img info "$img" | sed -n '/^Child node/q;p') \
            <("$QNBD_IMG" info "$img")
}

# one NAME SIZE PREALLOC JQ [CREATE ARGS...]: create $tmpdir/NAME.qcow2
# (SIZE may be "" to take the backing file's); JQ must hold on its
# qemu-img info.  Writes 0xa5 over [off, off + len), across clusters.
one ()
{
    local name=$1 size=$2 kind=$3 expect=$4
    shift 4
    local img=$tmpdir/$name.qcow2 info end off=$(( 3 * M - 1536 )) len=$(( 2 * M + 2560 ))

    "$QNBD_IMG" create "$@" "$img" $size
    size=${size:-$S}
    info=$(qemu-img info --output=json "$img")
    printf '%s\n' "$info"
    jq -e ".\"virtual-size\" == $size and .format == \"qcow2\" and ($expect)" \
       <<<"$info" >/dev/null
    check_prealloc "$img" "$size" "$kind"
    same_info "$img"

    qemu-io -f qcow2 -c "write -P 0xa5 $off $len" -c "read -P 0xa5 $off $len" \
            "$img" >/dev/null
    end=$(clean_end "$img")

    start_qnbd "$img"
    test "$(nbdinfo --size "$uri")" = "$size"
    qemu-io -f raw -c "read -P 0xa5 $off $len" \
            -c "write -P 0x3c $(( 9 * M + 4096 )) $(( M + 512 ))" \
            -c "read -P 0x3c $(( 9 * M + 4096 )) $(( M + 512 ))" "$uri" \
        | grep -c '^read ' | grep -qx 2
    if [ -n "$(jq -r '."backing-filename" // empty' <<<"$info")" ]; then
        qemu-io -r -f raw -c "read -P 0x5b 0 $(( 2 * M ))" \
                -c "read -P 0x5b $(( 6 * M )) $(( 10 * M ))" "$uri" \
            | grep -c '^read ' | grep -qx 2
    fi
    stop_qnbd
    # Preallocated, the image took nothing more for qnbd's writes.
    if [ "$kind" = meta ] || [ "$kind" = alloc ]; then
        test "$(clean_end "$img")" = "$end"
    else
        clean_end "$img" >/dev/null
    fi
    qemu-io -r -f qcow2 -c "read -P 0x3c $(( 9 * M + 4096 )) $(( M + 512 ))" \
            "$img" | grep -q '^read '
}

fs='."format-specific".data'

# Cluster sizes and refcount widths, with and without preallocation.
one c512 $S off ".\"cluster-size\" == 512" -o cluster_size=512
one c4k $S off ".\"cluster-size\" == 4096" -o cluster_size=4K
one c64k $S off \
    ".\"cluster-size\" == 65536 and $fs.compat == \"1.1\"
     and $fs.\"refcount-bits\" == 16" -f qcow2
one c2m $S any ".\"cluster-size\" == 2097152" -o cluster_size=2M
one rb1 $S off "$fs.\"refcount-bits\" == 1" -o refcount_bits=1
one rb64 $S off "$fs.\"refcount-bits\" == 64" -o refcount_bits=64
one v2 $S off "$fs.compat == \"0.10\"" -o compat=0.10
one lazy $S off "$fs.\"lazy-refcounts\" == true" -o compat=1.1,lazy_refcounts=on
one zstd $S off "$fs.\"compression-type\" == \"zstd\"" -o compression_type=zstd
one extl2 $S off "$fs.\"extended-l2\" == true" -o extended_l2=on

one meta $S meta "true" -o preallocation=metadata
one falloc $S alloc "true" -o preallocation=falloc
one full $S alloc "true" -o preallocation=full
one meta512rb1 $S meta ".\"cluster-size\" == 512 and $fs.\"refcount-bits\" == 1" \
    -o cluster_size=512,refcount_bits=1,preallocation=metadata
one meta4k $(( S + 512 )) meta ".\"cluster-size\" == 4096" \
    -o cluster_size=4k,preallocation=metadata
one meta2mrb64 $S any \
    ".\"cluster-size\" == 2097152 and $fs.\"refcount-bits\" == 64
     and $fs.\"extended-l2\" == true" \
    -o cluster_size=2M,refcount_bits=64,extended_l2=on,preallocation=metadata
one metav2 $S meta "$fs.compat == \"0.10\"" -o compat=0.10,preallocation=metadata
one metaextl2 $S meta "$fs.\"extended-l2\" == true" \
    -o extended_l2=on,cluster_size=32K,preallocation=metadata

# Backing files: named relative to the image, the size taken from them.
one bq "" off \
    ".\"backing-filename\" == \"base.qcow2\"
     and .\"backing-filename-format\" == \"qcow2\"" \
    -b base.qcow2 -F qcow2
one braw $S off \
    ".\"backing-filename\" == \"base.raw\"
     and .\"backing-filename-format\" == \"raw\"" \
    -o backing_file=base.raw,backing_fmt=raw
one bmeta "" meta ".\"backing-filename\" == \"base.raw\" and $fs.\"extended-l2\" == true" \
    -b base.raw -F raw -o extended_l2=on,preallocation=metadata

# External data files, named absolute: QEMU (7.2) looks for a relative
# name in its working directory, qnbd and qnbd-img beside the image.
one df $S off "$fs.\"data-file\" == \"$tmpdir/df.data\" and $fs.\"data-file-raw\" == false" \
    -o data_file="$tmpdir/df.data"
one dfmeta $S off "$fs.\"data-file\" == \"$tmpdir/dfmeta.data\"" \
    -o data_file="$tmpdir/dfmeta.data",preallocation=metadata
one dfraw $S off "$fs.\"data-file-raw\" == true" \
    -o data_file="$tmpdir/dfraw.data",data_file_raw=on,preallocation=falloc
test "$(stat -c %s "$tmpdir/dfraw.data")" = $S
test $(( $(stat -c %b "$tmpdir/dfraw.data") * 512 )) -ge $S

# An empty disk has an empty L1 table: no cluster for it.
"$QNBD_IMG" create "$tmpdir/empty.qcow2" 0
clean_end "$tmpdir/empty.qcow2" >/dev/null
same_info "$tmpdir/empty.qcow2"

# The dirty and corrupt bits (incompatible features, byte 79 of the
# header) are described too, and qnbd-img info refuses what is not qcow2.
"$QNBD_IMG" create "$tmpdir/flags.qcow2" 1M
printf '\003' | dd of="$tmpdir/flags.qcow2" bs=1 seek=79 conv=notrunc status=none
same_info "$tmpdir/flags.qcow2"
"$QNBD_IMG" info --output=json "$tmpdir/flags.qcow2" \
    | jq -e '."dirty-flag" and ."format-specific".data.corrupt' >/dev/null
if "$QNBD_IMG" info "$tmpdir/base.raw" 2>"$tmpdir/err"; then
    echo "$0: info of a raw file succeeded" >&2
    exit 1
fi
grep -qF 'not a qcow2 image' "$tmpdir/err"

# An image a running qnbd serves is not replaced: the lock says who has
# it, and the image is left as it was.
"$QNBD_IMG" create "$tmpdir/served.qcow2" 16M
start_qnbd "$tmpdir/served.qcow2"
if "$QNBD_IMG" create "$tmpdir/served.qcow2" 32M 2>"$tmpdir/err"; then
    echo "$0: create replaced an image qnbd serves" >&2
    exit 1
fi
cat "$tmpdir/err"
grep -qF "image is locked by process $qnbd_pid (qnbd)" "$tmpdir/err"
test "$(nbdinfo --size "$uri")" = $S
stop_qnbd
check_image "$tmpdir/served.qcow2"

# A crash during create must not leave a header that names tables not
# yet on disk: everything else is made durable before the header is
# written (the header is the pwrite at offset 0).
if command -v strace >/dev/null; then
    # (LeakSanitizer cannot work under ptrace: leaks are not this step's.)
    ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_leaks=0" \
    strace -o "$tmpdir/create.trace" -e trace=pwrite64,fsync,fdatasync \
        "$QNBD_IMG" create -o cluster_size=64K,preallocation=metadata \
        "$tmpdir/ordered.qcow2" 1G
    awk '/^pwrite64\(/ { if ($NF ~ /^0\)/ || $0 ~ /, 0\) *= [0-9]+$/) hdr = NR; else last = NR }
         /^f(data)?sync\(/ { if (!hdr) sync = NR }
         END { if (!hdr || !last || !sync || sync < last || sync > hdr) {
                   print "create: header written before the tables were synced"; exit 1 } }' \
        "$tmpdir/create.trace" || { cat "$tmpdir/create.trace" >&2; exit 1; }
    echo "ok - create syncs its tables before it writes the header"
else
    echo "skip - strace: the order of create's writes"
fi

# What cannot be made is refused, with the reason, and leaves no file.
refused ()
{
    local want=$1 out
    shift
    if out=$("$QNBD_IMG" create "$@" "$tmpdir/bad.qcow2" 64M 2>&1); then
        echo "$0: create $* was accepted" >&2
        return 1
    fi
    printf '%s\n' "$out"
    grep -qF -- "$want" <<<"$out"
    test ! -e "$tmpdir/bad.qcow2"
}
refused "extended_l2=on" -b base.raw -F raw -o preallocation=metadata
refused "compat=0.10" -o compat=0.10,refcount_bits=1
refused "power of two" -o cluster_size=3000
refused "at least 16K" -o extended_l2=on,cluster_size=4K
refused "needs its format" -b base.raw
refused "unknown option 'nonsense'" -o nonsense=1
refused "data_file_raw" -o data_file_raw=on
