#!/usr/bin/env bash
# test-nbdcopy.sh: the README's flow.  nbdcopy a raw file (random data with
# a hole in the middle) into the export, stop qnbd with SIGTERM (exit 0),
# then qemu-img check must find a clean image holding exactly that data.

source "${srcdir:-.}/functions.sh"
set -e
set -x

requires qemu-img nbdcopy head truncate

img=$tmpdir/disk.qcow2
src=$tmpdir/src.raw
size=$(( 48 * 1024 * 1024 ))

# 16 MiB random, 8 MiB hole, random again up to 4 KiB short of the end,
# then a hole.
head -c $(( 16 * 1024 * 1024 )) /dev/urandom > "$src"
truncate -s $(( 24 * 1024 * 1024 )) "$src"
head -c $(( 24 * 1024 * 1024 - 4096 )) /dev/urandom >> "$src"
truncate -s "$size" "$src"

qemu-img create -f qcow2 "$img" "$size"
start_qnbd "$img"
nbdcopy "$src" "$uri"
stop_qnbd

check_image "$img"
compare_raw "$src" "$img"
