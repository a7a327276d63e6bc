#!/usr/bin/env bash
# test-reload-notice.sh: after a reload that changes only an export's
# settings, the new export over the same open image keeps the engine's
# notice for work ready on the loop's thread (docs/architecture.md,
# "Threading and events"): reads that need no I/O are answered without an
# eventfd write each.  Before, retiring the old export took the notice
# away from the image, and every read wrote the eventfd again.

source "${srcdir:-.}/functions.sh"
set -e
set -x

requires qemu-img strace nbdinfo
requires_python_nbd

img=$tmpdir/a.qcow2
conf=$tmpdir/qnbd.conf
qemu-img create -f qcow2 "$img" 64M

sock=$tmpdir/qnbd.sock
uri="nbd+unix:///?socket=$sock"
cat > "$conf" <<EOF
[server]
socket = $sock
[export a]
file = $img
description = first
EOF
aio=()
[ -n "$QNBD_TEST_AIO" ] && aio=("--aio=$QNBD_TEST_AIO")
"$QNBD" -C "$conf" "${aio[@]}" </dev/null 2>"$tmpdir/qnbd.err" &
qnbd_pid=$!
cleanup_fn kill_if_running "$qnbd_pid"
wait_for_path -S "$sock" "$qnbd_pid"

sed -i 's/description = first/description = second/' "$conf"
kill -HUP "$qnbd_pid"
for (( i = 0; i < 100; i++ )); do
    nbdinfo --list "$uri" 2>/dev/null | grep -q second && break
    sleep 0.1
done
nbdinfo --list "$uri" | grep -q second

# Reads of holes, one at a time, on a connection to the new export; the
# system calls counted while they run.
strace -f -c -e trace=write -o "$tmpdir/strace.out" -p "$qnbd_pid" &
strace_pid=$!
sleep 1
"$PYTHON" - "nbd+unix:///a?socket=$sock" <<'EOF'
import sys
import nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
for i in range(2000):
    h.pread(4096, (i * 65536) % (64 << 20))
h.shutdown()
EOF
sleep 0.5
kill -TERM "$strace_pid"
wait "$strace_pid" || true
cat "$tmpdir/strace.out"
writes=$(awk '$NF == "write" { print $4 }' "$tmpdir/strace.out")
writes=${writes:-0}
# A handful of log lines; one eventfd write per read would be 2000.
test "$writes" -lt 200

kill "$qnbd_pid"
wait "$qnbd_pid"
cat "$tmpdir/qnbd.err"
