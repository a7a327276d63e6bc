#!/usr/bin/env bash
# test-sigterm.sh: SIGTERM while a client is writing makes qnbd finish what
# is in flight, flush, and exit with status 0 within a few seconds; the
# image then checks clean (no errors, no leaks).

source "${srcdir:-.}/functions.sh"
set -e
set -x

requires qemu-img
requires_python_nbd

img=$tmpdir/disk.qcow2
qemu-img create -f qcow2 -o cluster_size=4096 "$img" 256M

start_qnbd "$img"

# Write load: 16 writes of 4..256 KiB always in flight at random places
# (mostly allocating), until the server goes away or 60 s have passed.
"$PYTHON" - "$uri" > "$tmpdir/writer.log" 2>&1 <<'PY' &
import random, sys, time
import nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
size = h.get_size()
buf = nbd.Buffer.from_bytearray(random.randbytes(256 * 1024))
deadline = time.monotonic() + 60
n = 0
try:
    while time.monotonic() < deadline:
        while h.aio_in_flight() < 16:
            length = random.randint(1, 64) * 4096
            off = random.randrange(0, size - length) & ~511
            h.aio_pwrite(nbd.Buffer.from_bytearray(buf.to_bytearray()[:length]), off)
            n += 1
        h.poll(1000)
        while h.aio_peek_command_completed() > 0:
            h.aio_command_completed(h.aio_peek_command_completed())
except nbd.Error as e:
    print("writer stopped after %d writes: %s" % (n, e))
    sys.exit(0)
print("writer ran out of time after %d writes" % n)
sys.exit(1)
PY
writer=$!
cleanup_fn kill_if_running "$writer"
sleep 2

# The writer must still be running: otherwise there was no load.
kill -0 "$writer"

start=$(date +%s)
QNBD_STOP_TIMEOUT=100 stop_qnbd
elapsed=$(( $(date +%s) - start ))
echo "qnbd exited ${elapsed}s after SIGTERM"

st=0
wait "$writer" || st=$?
cat "$tmpdir/writer.log"
test "$st" -eq 0

check_image "$img"
