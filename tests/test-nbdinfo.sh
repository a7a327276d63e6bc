#!/usr/bin/env bash
# test-nbdinfo.sh: what qnbd advertises, as nbdinfo sees it: the size of a
# 20 GiB image, multi-conn, flush and FUA on a writable export, and
# read-only on an export served with -r.

source "${srcdir:-.}/functions.sh"
set -e
set -x

requires qemu-img nbdinfo "$PYTHON"

img=$tmpdir/disk.qcow2
qemu-img create -f qcow2 "$img" 20G

info=$tmpdir/info.json

# field NAME: the field NAME of the (only) export in $info, as JSON.
field ()
{
    "$PYTHON" -c '
import json, sys
with open(sys.argv[1]) as f:
    e = json.load(f)["exports"][0]
print(json.dumps(e[sys.argv[2]]))' "$info" "$1"
}

# A writable export.
start_qnbd "$img"
nbdinfo --json "$uri" > "$info"
cat "$info"
test "$(field export-size)" = 21474836480
test "$(field is_read_only)" = false
test "$(field can_multi_conn)" = true
test "$(field can_flush)" = true
test "$(field can_fua)" = true
stop_qnbd

# A read-only export.
start_qnbd -r "$img"
nbdinfo --json "$uri" > "$info"
cat "$info"
test "$(field export-size)" = 21474836480
test "$(field is_read_only)" = true
stop_qnbd

check_image "$img"
