#!/usr/bin/env bash
# test-tls.sh: NBD_OPT_STARTTLS with x509 certificates made here by
# certtool: libnbd (nbdinfo, nbdsh, nbdcopy with nbds:// URIs) and
# qemu-img/qemu-io read and write over TLS; with --tls=require a
# plaintext client gets nothing (and the log names no export); a client
# whose certificates come from another CA fails the handshake; with
# --tls-verify-peer a client without a certificate fails.  With
# --tls-psk, libnbd and qemu-io connect with the right key, not with
# another.  The same settings work as keys of a -C file.

source "${srcdir:-.}/functions.sh"
set -e
set -x

requires certtool
requires qemu-img qemu-io nbdinfo nbdcopy "$PYTHON"
requires_python_nbd

pki=$tmpdir/pki
make_ca "$pki/ca"
make_cert "$pki/ca" "$pki/server" server
make_cert "$pki/ca" "$pki/client" client
# A client that trusts the right CA but has no certificate of its own.
mkdir -p "$pki/anon"
cp "$pki/ca/ca-cert.pem" "$pki/anon/"
# A client of another CA: it trusts neither the server nor is trusted.
make_ca "$pki/other"
make_cert "$pki/other" "$pki/wrong" client

img=$tmpdir/disk.qcow2
qemu-img create -f qcow2 "$img" 64M

# tls_uri: the URI of the running server for a client with certificates
# in the directory $1.
tls_uri ()
{
    echo "nbds+unix:///?socket=$sock&tls-certificates=$1"
}

# --- --tls=on: libnbd reads and writes over TLS. --------------------
start_qnbd -v --tls=on --tls-certificates="$pki/server" "$img"
nbdinfo "$(tls_uri "$pki/client")"
# Plaintext is still served with --tls=on.
nbdinfo --size "$uri"

# (nbdsh refuses tls-certificates in a URI: the calls instead.)
SOCK=$sock CERTS=$pki/client "$PYTHON" -m nbd -c '
import os
h.set_tls(nbd.TLS_REQUIRE)
h.set_tls_certificates(os.environ["CERTS"])
h.connect_unix(os.environ["SOCK"])
assert h.get_tls_negotiated()
buf = b"".join(bytes([i % 251]) * 512 for i in range(256))
h.pwrite(buf, 1 << 20)
h.flush()
assert h.pread(len(buf), 1 << 20) == buf
'

# nbdcopy both ways: 8 MiB of data out and back.
head -c $((8 << 20)) /dev/urandom > "$tmpdir/data"
truncate -s 64M "$tmpdir/data"
nbdcopy "$tmpdir/data" "$(tls_uri "$pki/client")"
nbdcopy "$(tls_uri "$pki/client")" "$tmpdir/back"
cmp "$tmpdir/data" "$tmpdir/back"
rm -f "$tmpdir/back"

stop_qnbd

# --- qemu-img and qemu-io over TCP on 127.0.0.1. ---------------------
port=$("$PYTHON" -c '
import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])')
"$QNBD" -b 127.0.0.1 -p "$port" --pid-file "$tmpdir/tcp.pid" \
        --tls=require --tls-certificates="$pki/server" "$img" \
        2> "$tmpdir/tcp.err" &
tcp_pid=$!
cleanup_fn kill_if_running "$tcp_pid"
wait_for_path -s "$tmpdir/tcp.pid" "$tcp_pid"
obj="tls-creds-x509,id=tls0,endpoint=client,dir=$pki/client"
opts="driver=nbd,host=127.0.0.1,port=$port,tls-creds=tls0"
qemu-img info --object "$obj" --image-opts "$opts"
qemu-io --object "$obj" --image-opts "$opts" \
        -c 'write -P 0x5a 4M 1M' -c 'read -P 0x5a 4M 1M'
qemu-io --object "$obj" --image-opts "$opts" -r -c 'read -P 0x5a 4M 1M'
# No certificate of its own: fine without --tls-verify-peer.
qemu-io --object "tls-creds-x509,id=tls0,endpoint=client,dir=$pki/anon" \
        --image-opts "$opts" -r -c 'read -P 0x5a 4M 1M'
# A client that trusts another CA refuses the server's certificate
# (libnbd checks it only over TCP, where it has a host name).
if nbdinfo "nbds://127.0.0.1:$port/?tls-certificates=$pki/wrong" \
        2> "$tmpdir/wrong.err"; then
    echo "$0: a client of another CA accepted the server" >&2
    exit 1
fi
cat "$tmpdir/wrong.err"
if qemu-img info --image-opts "$opts" \
        --object "tls-creds-x509,id=tls0,endpoint=client,dir=$pki/wrong" \
        2> "$tmpdir/wrong.err"; then
    echo "$0: qemu-img with another CA accepted the server" >&2
    exit 1
fi
cat "$tmpdir/wrong.err"
nbdinfo --size "nbds://127.0.0.1:$port/?tls-certificates=$pki/client"
kill "$tcp_pid"
wait "$tcp_pid" || true
cat "$tmpdir/tcp.err"

# --- --tls=require: nothing without TLS. -----------------------------
start_qnbd -v -v -x secret-name --tls=require \
           --tls-certificates="$pki/server" "$img"
uri="nbd+unix:///secret-name?socket=$sock"
if nbdinfo "$uri" 2> "$tmpdir/plain.err"; then
    echo "$0: a plaintext client was served under --tls=require" >&2
    exit 1
fi
cat "$tmpdir/plain.err"
# Every option but STARTTLS and ABORT is refused with TLS_REQD, and
# EXPORT_NAME hangs up: nothing about the export leaks.
"$PYTHON" -m nbd -c '
import nbd
h.set_tls(nbd.TLS_DISABLE)
h.set_opt_mode(True)
h.connect_uri("nbd+unix:///secret-name?socket='"$sock"'")
for call in (lambda: h.opt_list(lambda n, d: 0),
             lambda: h.opt_info(),
             lambda: h.opt_list_meta_context(lambda n: 0),
             lambda: h.opt_go()):
    try:
        call()
    except nbd.Error as e:
        print(e)
    else:
        raise AssertionError("served without TLS")
'
nbdinfo --list "$(tls_uri "$pki/client")" > "$tmpdir/list"
err=${_qnbd_errfile[$qnbd_pid]}
# Each refused option of that client was answered NBD_REP_ERR_TLS_REQD.
for opt in STRUCTURED_REPLY LIST INFO GO; do
    grep -F "option $opt: TLS is required" "$err"
done
grep -F "EXPORT_NAME without TLS, disconnecting" "$err" || true
grep -F secret-name "$tmpdir/list"
stop_qnbd
# Nothing but the TLS client got as far as naming the export.
test "$(grep -c "client .*: export 'secret-name'" "$err" || true)" -le 1

# --- --tls-verify-peer: a client certificate from our CA is needed. --
start_qnbd --tls=require --tls-verify-peer \
           --tls-certificates="$pki/server" "$img"
SOCK=$sock CERTS=$pki/client "$PYTHON" -m nbd -c '
import os
h.set_tls(nbd.TLS_REQUIRE)
h.set_tls_certificates(os.environ["CERTS"])
h.connect_unix(os.environ["SOCK"])
assert h.pread(1 << 20, 4 << 20) == b"\x5a" * (1 << 20)
'
if nbdinfo "$(tls_uri "$pki/anon")" 2> "$tmpdir/anon.err"; then
    echo "$0: a client without a certificate was served" >&2
    exit 1
fi
cat "$tmpdir/anon.err"
# Its certificate is signed by another CA: the server refuses it.
if nbdinfo "$(tls_uri "$pki/wrong")" 2> "$tmpdir/wrong.err"; then
    echo "$0: a client of another CA was served" >&2
    exit 1
fi
cat "$tmpdir/wrong.err"
stop_qnbd

# --- --tls-psk: a keys file as qemu and nbdkit use. ------------------
# psk_key: 32 random bytes in hex.
psk_key ()
{
    head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n'
}
mkdir -p "$pki/psk" "$pki/badpsk"
printf 'alice:%s\n' "$(psk_key)" > "$pki/psk/keys.psk"
printf 'alice:%s\n' "$(psk_key)" > "$pki/badpsk/keys.psk"
start_qnbd -v --tls=require --tls-psk="$pki/psk/keys.psk" "$img"
psk_uri="nbds+unix://alice@/?socket=$sock"
nbdinfo --size "$psk_uri&tls-psk-file=$pki/psk/keys.psk"
nbdcopy "$tmpdir/data" "$psk_uri&tls-psk-file=$pki/psk/keys.psk"
nbdcopy "$psk_uri&tls-psk-file=$pki/psk/keys.psk" "$tmpdir/back"
cmp "$tmpdir/data" "$tmpdir/back"
qemu-io --object "tls-creds-psk,id=tls0,endpoint=client,dir=$pki/psk,username=alice" \
        --image-opts "driver=nbd,path=$sock,tls-creds=tls0" \
        -c 'write -P 0x6b 8M 64k' -c 'read -P 0x6b 8M 64k'
if nbdinfo --size "$psk_uri&tls-psk-file=$pki/badpsk/keys.psk" \
        2> "$tmpdir/badpsk.err"; then
    echo "$0: a client with the wrong key was served" >&2
    exit 1
fi
cat "$tmpdir/badpsk.err"
stop_qnbd
grep -F "PSK user 'alice'" "${_qnbd_errfile[$qnbd_pid]}"

# --- The same settings as keys of a -C file. -------------------------
img2=$tmpdir/disk2.qcow2
qemu-img create -f qcow2 "$img2" 32M
csock=$tmpdir/conf.sock
cat > "$tmpdir/qnbd.conf" <<EOF
[server]
socket = $csock
pid-file = $tmpdir/conf.pid
tls = require
tls-certificates = $pki/server
tls-verify-peer = true
[export one]
file = $img
readonly = true
[export two]
file = $img2
EOF
"$QNBD" -C "$tmpdir/qnbd.conf" 2> "$tmpdir/conf.err" &
conf_pid=$!
cleanup_fn kill_if_running "$conf_pid"
wait_for_path -s "$tmpdir/conf.pid" "$conf_pid"
nbdinfo --list --json \
        "nbds+unix:///?socket=$csock&tls-certificates=$pki/client" \
        > "$tmpdir/conf.list"
grep -F '"one"' "$tmpdir/conf.list"
grep -F '"two"' "$tmpdir/conf.list"
curi="nbds+unix:///two?socket=$csock&tls-certificates=$pki/client"
head -c 32M "$tmpdir/data" > "$tmpdir/data32"
nbdcopy "$tmpdir/data32" "$curi"
nbdcopy "$curi" "$tmpdir/back2"
cmp "$tmpdir/data32" "$tmpdir/back2"
if nbdinfo "nbd+unix:///two?socket=$csock" 2> "$tmpdir/conf-plain.err"; then
    echo "$0: tls = require in the file let a plaintext client in" >&2
    exit 1
fi
if nbdinfo "nbds+unix:///two?socket=$csock&tls-certificates=$pki/anon" \
        2> "$tmpdir/conf-anon.err"; then
    echo "$0: tls-verify-peer = true in the file let a client in" >&2
    exit 1
fi
kill "$conf_pid"
wait "$conf_pid" || true
cat "$tmpdir/conf.err"

check_image "$img"
check_image "$img2"
