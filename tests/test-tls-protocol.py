"""test-tls-protocol.py: NBD_OPT_STARTTLS step by step, from a raw client
that does TLS with Python's ssl module (certificates made by certtool).

With --tls=on:
- STARTTLS with data is refused (NBD_REP_ERR_INVALID) and the haggling
  goes on; STARTTLS is then accepted and the stream is TLS;
- a second STARTTLS, on the TLS stream, is NBD_REP_ERR_INVALID;
- structured replies negotiated before STARTTLS are forgotten:
  SET_META_CONTEXT is refused, GO gives no DF flag and a READ gets a
  simple reply, with the data written before, over TLS;
- a request header that arrives in one TLS record with the previous
  request's payload is served (GnuTLS holds it, the socket is quiet);
- bytes sent after STARTTLS before its reply close the connection.
With --tls=require:
- LIST gets NBD_REP_ERR_TLS_REQD with no export in it, EXPORT_NAME gets a
  hang-up and not one byte;
- a client that stops in the middle of the TLS handshake is cut off by
  --handshake-limit.
"""

import os
import socket
import ssl
import struct
import subprocess
import time

import qnbdtest as qt

qt.requires("certtool", "qemu-img")

NBD_OPT_LIST = 3
NBD_OPT_STARTTLS = 5
NBD_OPT_SET_META_CONTEXT = 10
NBD_REP_ERR_INVALID = (1 << 31) + 3
NBD_REP_ERR_TLS_REQD = (1 << 31) + 5
NBD_FLAG_SEND_DF = 1 << 7
LIMIT = 1                       # --handshake-limit of the last server

d = qt.tmpdir()


def certtool(*args, stdout=None):
    subprocess.run(["certtool", *args], check=True, stdout=stdout,
                   stderr=subprocess.DEVNULL)


def template(name, text):
    path = os.path.join(d, name)
    with open(path, "w") as f:
        f.write(text)
    return path


# A CA, and a server certificate it signs, in the files qnbd reads.
certs = os.path.join(d, "server")
os.mkdir(certs)
ca_key = os.path.join(d, "ca-key.pem")
ca_cert = os.path.join(certs, "ca-cert.pem")
key = os.path.join(certs, "server-key.pem")
with open(ca_key, "w") as f:
    certtool("--generate-privkey", stdout=f)
certtool("--generate-self-signed", "--load-privkey", ca_key,
         "--template", template("ca.info", "cn = test CA\nca\n"
                                "cert_signing_key\nexpiration_days = 2\n"),
         "--outfile", ca_cert)
with open(key, "w") as f:
    certtool("--generate-privkey", stdout=f)
certtool("--generate-certificate", "--load-privkey", key,
         "--load-ca-certificate", ca_cert, "--load-ca-privkey", ca_key,
         "--template", template("server.info", "cn = localhost\n"
                                "dns_name = localhost\ntls_www_server\n"
                                "encryption_key\nsigning_key\n"
                                "expiration_days = 2\n"),
         "--outfile", os.path.join(certs, "server-cert.pem"))

ctx = ssl.create_default_context(cafile=ca_cert)

img = os.path.join(d, "disk.qcow2")
qt.run("qemu-img", "create", "-f", "qcow2", img, "16M")
qt.run("qemu-io", "-f", "qcow2", "-c", "write -P 0x33 0 4096", img)


def starttls(c):
    r = c.option(NBD_OPT_STARTTLS)
    assert r == [(qt.NBD_REP_ACK, b"")], "STARTTLS: %r" % r
    c.s = ctx.wrap_socket(c.s, server_hostname="localhost")


# --- --tls=on ---------------------------------------------------------
srv = qt.Server(img, "--tls=on", "--tls-certificates=" + certs, "-v", "-v")
c = qt.RawClient(srv.sock)
c.client_flags()
r = c.option(qt.NBD_OPT_STRUCTURED_REPLY)
assert r[-1][0] == qt.NBD_REP_ACK, r
r = c.option(NBD_OPT_STARTTLS, b"junk")
assert r[-1][0] == NBD_REP_ERR_INVALID, "STARTTLS with data: %r" % r
starttls(c)
qt.log("TLS: %s" % (c.s.version(),))
r = c.option(NBD_OPT_STARTTLS)
assert r[-1][0] == NBD_REP_ERR_INVALID, "second STARTTLS: %r" % r
query = b"base:allocation"
r = c.option(NBD_OPT_SET_META_CONTEXT, struct.pack(">II", 0, 1) +
             struct.pack(">I", len(query)) + query)
assert r[-1][0] == NBD_REP_ERR_INVALID, \
    "SET_META_CONTEXT kept STRUCTURED_REPLY from before TLS: %r" % r
r = c.option(qt.NBD_OPT_GO, struct.pack(">IH", 0, 0))
assert r[-1][0] == qt.NBD_REP_ACK, "GO: %r" % r
eflags = [struct.unpack(">HQH", data)[2] for t, data in r
          if t == qt.NBD_REP_INFO and data[:2] == b"\0\0"][0]
assert not eflags & NBD_FLAG_SEND_DF, "DF without structured replies"
c.s.sendall(qt.nbd_request(qt.NBD_CMD_READ, 7, 0, 4096))
err, cookie = c.simple_reply()
assert (err, cookie) == (0, 7), (err, cookie)
assert c.recv_exactly(4096) == b"\x33" * 4096

# A WRITE header in a record of its own, then its payload and a READ
# header in one record: the payload is read straight into its buffer and
# GnuTLS keeps the READ header, which the socket will never announce.
c.s.sendall(qt.nbd_request(qt.NBD_CMD_WRITE, 9, 65536, 4096))
c.s.sendall(b"\x44" * 4096 + qt.nbd_request(qt.NBD_CMD_READ, 10, 0, 4096))
seen = set()
for _ in range(2):
    err, cookie = c.simple_reply()
    assert err == 0 and cookie in (9, 10) and cookie not in seen, \
        (err, cookie)
    seen.add(cookie)
    if cookie == 10:
        assert c.recv_exactly(4096) == b"\x33" * 4096
c.s.sendall(qt.nbd_request(qt.NBD_CMD_DISC, 8, 0, 0))
c.close()

# Data pipelined behind STARTTLS: the client had to wait for the reply.
c = qt.RawClient(srv.sock)
c.client_flags()
c.s.sendall(qt.NBD_IHAVEOPT + struct.pack(">II", NBD_OPT_STARTTLS, 0) +
            qt.NBD_IHAVEOPT + struct.pack(">II", NBD_OPT_LIST, 0))
got = b""
while True:
    chunk = c.s.recv(4096)
    if not chunk:
        break
    got += chunk
assert len(got) <= 20, "served after a pipelined STARTTLS: %r" % got
c.close()
srv.stop()
assert "sent data before the reply" in srv.stderr()

# --- --tls=require ----------------------------------------------------
srv = qt.Server(img, "--tls=require", "--tls-certificates=" + certs,
                "-x", "hidden", "--handshake-limit=%d" % LIMIT, "-v")
c = qt.RawClient(srv.sock)
c.client_flags()
r = c.option(NBD_OPT_LIST)
assert len(r) == 1 and r[0][0] == NBD_REP_ERR_TLS_REQD, "LIST: %r" % r
assert b"hidden" not in r[0][1]
c.s.sendall(qt.NBD_IHAVEOPT + struct.pack(">II", qt.NBD_OPT_EXPORT_NAME, 6)
            + b"hidden")
assert c.s.recv(4096) == b"", "EXPORT_NAME answered without TLS"
c.close()

# TLS works, and the export is there.
c = qt.RawClient(srv.sock)
c.client_flags()
starttls(c)
r = c.option(NBD_OPT_LIST)
assert r[-1][0] == qt.NBD_REP_ACK and b"hidden" in r[0][1], r
c.close()

# A client that stops in the middle of the TLS handshake.
c = qt.RawClient(srv.sock)
c.client_flags()
r = c.option(NBD_OPT_STARTTLS)
assert r == [(qt.NBD_REP_ACK, b"")], r
start = time.monotonic()
c.s.settimeout(LIMIT + 10)
c.s.sendall(b"\x16\x03\x01")    # the first bytes of a ClientHello
assert c.s.recv(4096) == b"", "a stalled handshake got an answer"
took = time.monotonic() - start
assert took < LIMIT + 5, "cut off after %.1f s" % took
c.close()
srv.stop()
assert "handshake not finished" in srv.stderr()
print("ok")
