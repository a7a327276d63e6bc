#!/usr/bin/env bash
# test-tls-clients.sh: the TLS cases test-tls.sh leaves out.  nbd-client
# (the kernel client's user-space half, which does the TLS handshake)
# lists the exports of a --tls=require server with its certificate
# options and is refused without them; a server whose certificate has
# expired is refused by libnbd and QEMU; a client whose certificate has
# expired is refused under --tls-verify-peer, one from the same CA that is
# still valid is served.

source "${srcdir:-.}/functions.sh"
set -e
set -x

requires certtool nbd-client nbdinfo qemu-img "$PYTHON"

pki=$tmpdir/pki
make_ca "$pki/ca"
make_cert "$pki/ca" "$pki/server" server
make_cert "$pki/ca" "$pki/client" client
make_cert "$pki/ca" "$pki/old-server" server expired
make_cert "$pki/ca" "$pki/old-client" client expired

img=$tmpdir/disk.qcow2
qemu-img create -f qcow2 "$img" 16M

port=$("$PYTHON" -c '
import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])')

# serve DIR [OPTIONS]: qnbd on 127.0.0.1:$port with --tls=require and the
# server certificate of DIR, export "disk1"; sets srv_pid.
serve ()
{
    local dir=$1
    shift
    rm -f "$tmpdir/srv.pid"
    "$QNBD" -b 127.0.0.1 -p "$port" --pid-file "$tmpdir/srv.pid" -v \
            ${QNBD_TEST_AIO:+--aio=$QNBD_TEST_AIO} \
            --tls=require --tls-certificates="$dir" -x disk1 "$@" "$img" \
            2>> "$tmpdir/srv.err" &
    srv_pid=$!
    cleanup_fn kill_if_running "$srv_pid"
    wait_for_path -s "$tmpdir/srv.pid" "$srv_pid" && return 0
    cat "$tmpdir/srv.err" >&2
    return 1
}
unserve ()
{
    kill "$srv_pid"
    wait "$srv_pid"
}
# refused CMD...: CMD must fail.
refused ()
{
    if "$@" > "$tmpdir/refused.out" 2>&1; then
        cat "$tmpdir/refused.out"
        echo "$0: served: $*" >&2
        exit 1
    fi
    cat "$tmpdir/refused.out"
}

# --- nbd-client -l: the export list, over TLS only. ------------------
serve "$pki/server"
timeout 30 nbd-client -l 127.0.0.1 "$port" \
        -cacertfile "$pki/client/ca-cert.pem" \
        -certfile "$pki/client/client-cert.pem" \
        -keyfile "$pki/client/client-key.pem" \
        -tlshostname localhost > "$tmpdir/list"
grep -x disk1 "$tmpdir/list"
# In plaintext it is told TLS is required, and learns no export name.
refused timeout 30 nbd-client -l 127.0.0.1 "$port"
grep -F "TLS is required" "$tmpdir/refused.out"
if grep -F disk1 "$tmpdir/refused.out"; then
    echo "$0: the export name leaked to a plaintext client" >&2
    exit 1
fi
# Trusting another CA, it refuses the server.
refused timeout 30 nbd-client -l 127.0.0.1 "$port" \
        -cacertfile "$pki/old-server/server-cert.pem" -tlshostname localhost
unserve

# --- An expired server certificate: clients refuse the server. -------
serve "$pki/old-server"
refused nbdinfo "nbds://127.0.0.1:$port/disk1?tls-certificates=$pki/client"
refused qemu-img info \
        --object "tls-creds-x509,id=tls0,endpoint=client,dir=$pki/client" \
        --image-opts "driver=nbd,host=127.0.0.1,port=$port,export=disk1,tls-creds=tls0"
unserve

# --- An expired client certificate under --tls-verify-peer. ----------
serve "$pki/server" --tls-verify-peer
nbdinfo --size "nbds://127.0.0.1:$port/disk1?tls-certificates=$pki/client"
refused nbdinfo --size \
        "nbds://127.0.0.1:$port/disk1?tls-certificates=$pki/old-client"
unserve
cat "$tmpdir/srv.err"
grep -F "The certificate chain uses expired certificate" \
     "$tmpdir/srv.err"

check_image "$img"
