#!/usr/bin/env bash
# test-locking.sh: qnbd takes QEMU's image locks, so that two processes
# never have one image open for writing: qnbd refuses an image qemu-nbd (or
# another qnbd) writes, QEMU's tools refuse an image qnbd writes (and its
# backing and data files), readers coexist, and --force-share lets a
# read-only qnbd serve beside a writer.

source "${srcdir:-.}/functions.sh"
set -e
set -x

requires qemu-img qemu-io qemu-nbd nbdinfo timeout

img=$tmpdir/img.qcow2
qemu-img create -f qcow2 "$img" 16M
qemu-io -f qcow2 -c 'write -P 0x5a 0 1M' "$img"

# start_qemu_nbd ARGS... IMAGE: qemu-nbd on a socket in $tmpdir, stopped
# by pid at exit; sets qemu_pid and qemu_uri.
n_qemu=0
start_qemu_nbd ()
{
    local -
    set +x
    local s i
    n_qemu=$(( n_qemu + 1 ))
    s=$tmpdir/qemu$n_qemu.sock
    qemu-nbd -t -k "$s" "$@" </dev/null &
    qemu_pid=$!
    cleanup_fn kill_if_running "$qemu_pid"
    wait_for_path -S "$s" "$qemu_pid"
    qemu_uri="nbd+unix:///?socket=$s"
}

stop_qemu_nbd ()
{
    kill "$qemu_pid"
    wait "$qemu_pid" || true
}

# qnbd_refused NEEDLE ARGS...: qnbd must exit at once, non-zero, saying
# NEEDLE on stderr.
qnbd_refused ()
{
    local -
    set +x
    local needle=$1 pid i err=$tmpdir/refused.err
    shift
    "$QNBD" -k "$tmpdir/refused.sock" "$@" </dev/null 2>"$err" &
    pid=$!
    for (( i = 0; i < 100; i++ )); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        wait "$pid" || true
        echo "$0: qnbd $* was not refused" >&2
        cat "$err" >&2
        return 1
    fi
    if wait "$pid"; then
        echo "$0: qnbd $* exited with status 0" >&2
        return 1
    fi
    cat "$err"
    grep -qF -e "$needle" "$err"
}

# tool_refused NEEDLE CMD...: a QEMU tool must fail, saying NEEDLE.
tool_refused ()
{
    local needle=$1 out st=0
    shift
    out=$(timeout 30 "$@" 2>&1) || st=$?
    printf '%s\n' "$out"
    test "$st" -ne 0
    grep -qF -e "$needle" <<<"$out"
}

# 1. qemu-nbd writes the image: qnbd refuses it, read-write or read-only;
#    --force-share (read-only) serves beside it.
start_qemu_nbd -f qcow2 "$img"
# The holder is named: QEMU's OFD locks carry no PID, qnbd finds it in
# /proc/PID/fdinfo.
qnbd_refused "is locked by process $qemu_pid (qemu-nbd)" "$img"
qnbd_refused "is locked by process $qemu_pid (qemu-nbd) (write lock)" -r "$img"
qnbd_refused "--force-share" --force-share "$img"
start_qnbd -r --force-share "$img"
nbdinfo "$uri" | grep -q 'export-size: 16777216'
stop_qnbd
stop_qemu_nbd

# 2. qnbd writes the image: QEMU's tools refuse it (and say why), unless
#    told not to care; a second qnbd refuses it.
start_qnbd "$img"
writer_pid=$qnbd_pid
tool_refused 'Failed to get shared "write" lock' qemu-img info "$img"
tool_refused 'lock' qemu-io -f qcow2 -c 'read 0 4k' "$img"
tool_refused 'lock' qemu-nbd -k "$tmpdir/no.sock" -f qcow2 "$img"
qemu-img info -U "$img"
qnbd_refused "image is locked by process $writer_pid (qnbd)" "$img"
qnbd_refused "image is locked by process $writer_pid (qnbd)" -r "$img"
start_qnbd -r --force-share "$img"
nbdinfo "$uri" | grep -q 'export-size: 16777216'
stop_qnbd
stop_qnbd "$writer_pid"

# 3. Readers coexist: read-only qnbd beside read-only qemu-nbd.
start_qemu_nbd -r -f qcow2 "$img"
start_qnbd -r "$img"
nbdinfo "$uri" | grep -q 'export-size: 16777216'
nbdinfo "$qemu_uri" | grep -q 'export-size: 16777216'
# ... and a writer is refused by both.
tool_refused 'lock' qemu-io -f qcow2 -c 'write 0 4k' "$img"
stop_qnbd
stop_qemu_nbd

# 4. The backing file and the external data file are locked too.
base=$tmpdir/base.qcow2
top=$tmpdir/top.qcow2
qemu-img create -f qcow2 "$base" 16M
qemu-img create -f qcow2 -b "$base" -F qcow2 "$top"
start_qnbd "$top"
tool_refused 'lock' qemu-io -f qcow2 -c 'write 0 4k' "$base"
qemu-io -r -f qcow2 -c 'read 0 4k' "$base"     # reading it is fine
stop_qnbd

qemu-img create -f qcow2 -o data_file="$tmpdir/data.raw" "$tmpdir/ext.qcow2" 16M
start_qnbd "$tmpdir/ext.qcow2"
tool_refused 'lock' qemu-io -f raw -c 'write 0 4k' "$tmpdir/data.raw"
stop_qnbd

# 5. Locks go with the process: after qnbd stops, QEMU writes again.
qemu-io -f qcow2 -c 'write 0 4k' "$img"
