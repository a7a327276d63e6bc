"""tests/accesslib.py: what the access-control and limit tests share.

- Pki: a CA made by certtool, and the directories of server and client
  credentials under the names qnbd, libnbd and qemu read (ca-cert.pem,
  server-cert.pem, server-key.pem; client-cert.pem, client-key.pem), one
  client per common name;
- psk_file: a keys file of username:hexkey lines;
- TlsClient: qnbdtest's RawClient that can switch to TLS after
  NBD_OPT_STARTTLS (Python's ssl module, with a client certificate or
  none), with the option replies the tests look at.
"""

import os
import socket
import ssl
import struct
import subprocess

import qnbdtest as qt

NBD_OPT_LIST = 3
NBD_OPT_STARTTLS = 5
NBD_OPT_INFO = 6
NBD_OPT_LIST_META_CONTEXT = 9
NBD_REP_SERVER = 2
NBD_REP_ERR_POLICY = (1 << 31) + 2
NBD_REP_ERR_TLS_REQD = (1 << 31) + 5
NBD_REP_ERR_UNKNOWN = (1 << 31) + 6

REPLY_NAMES = {
    qt.NBD_REP_ACK: "ACK",
    NBD_REP_ERR_POLICY: "POLICY",
    NBD_REP_ERR_TLS_REQD: "TLS_REQD",
    NBD_REP_ERR_UNKNOWN: "UNKNOWN",
}


def certtool(*args, stdout=None):
    subprocess.run(["certtool", *args], check=True, stdout=stdout,
                   stderr=subprocess.DEVNULL)


class Pki:
    """A CA in directory d, and credentials it signs."""

    def __init__(self, d):
        self.d = d
        os.makedirs(d, exist_ok=True)
        self.ca_key = os.path.join(d, "ca-key.pem")
        self.ca_cert = os.path.join(d, "ca-cert.pem")
        with open(self.ca_key, "w") as f:
            certtool("--generate-privkey", stdout=f)
        certtool("--generate-self-signed", "--load-privkey", self.ca_key,
                 "--template", self._template("ca.info", "cn = test CA\nca\n"
                                              "cert_signing_key\n"
                                              "expiration_days = 2\n"),
                 "--outfile", self.ca_cert)

    def _template(self, name, text):
        path = os.path.join(self.d, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def _cert(self, name, role, cn, usage):
        out = os.path.join(self.d, name)
        os.makedirs(out, exist_ok=True)
        key = os.path.join(out, role + "-key.pem")
        with open(key, "w") as f:
            certtool("--generate-privkey", stdout=f)
        certtool("--generate-certificate", "--load-privkey", key,
                 "--load-ca-certificate", self.ca_cert,
                 "--load-ca-privkey", self.ca_key,
                 "--template", self._template(
                     name + ".info",
                     "organization = qnbd test\ncn = %s\n"
                     "dns_name = localhost\nip_address = 127.0.0.1\n"
                     "%s\nencryption_key\nsigning_key\n"
                     "expiration_days = 2\n" % (cn, usage)),
                 "--outfile", os.path.join(out, role + "-cert.pem"))
        with open(self.ca_cert) as src, \
                open(os.path.join(out, "ca-cert.pem"), "w") as dst:
            dst.write(src.read())
        return out

    def server(self):
        """The directory of --tls-certificates."""
        return self._cert("server", "server", "localhost", "tls_www_server")

    def client(self, cn):
        """The directory of a client whose certificate's CN is cn."""
        return self._cert("client-" + cn, "client", cn, "tls_www_client")


def psk_file(path, users):
    """A --tls-psk keys file with a random key per user; returns path."""
    with open(path, "w") as f:
        for u in users:
            f.write("%s:%s\n" % (u, os.urandom(32).hex()))
    return path



class TlsClient(qt.RawClient):
    """A raw client (Unix socket path or (host, port)) that has sent its
    flags; starttls() switches it to TLS with the client credentials of
    directory certs (or none: ca_cert alone)."""

    def __init__(self, address, timeout=20):
        super().__init__(address, timeout=timeout)
        self.client_flags()

    def starttls(self, ca_cert, certs=None):
        r = self.option(NBD_OPT_STARTTLS)
        assert r == [(qt.NBD_REP_ACK, b"")], "STARTTLS: %r" % r
        ctx = ssl.create_default_context(cafile=ca_cert)
        if certs:
            ctx.load_cert_chain(os.path.join(certs, "client-cert.pem"),
                                os.path.join(certs, "client-key.pem"))
        self.s = ctx.wrap_socket(self.s, server_hostname="localhost")

    def list(self):
        """The export names NBD_OPT_LIST gives, or the error's name."""
        r = self.option(NBD_OPT_LIST)
        if r[-1][0] != qt.NBD_REP_ACK:
            return REPLY_NAMES.get(r[-1][0], hex(r[-1][0]))
        names = []
        for t, data in r[:-1]:
            assert t == NBD_REP_SERVER, "LIST reply %d" % t
            n = struct.unpack(">I", data[:4])[0]
            names.append(data[4:4 + n].decode())
        return sorted(names)

    def info(self, name, opt=NBD_OPT_INFO):
        """The final reply to INFO (or GO) of name, by its name."""
        b = name.encode()
        r = self.option(opt, struct.pack(">I", len(b)) + b +
                        struct.pack(">H", 0))
        return REPLY_NAMES.get(r[-1][0], hex(r[-1][0]))

    def list_meta(self, name):
        """The final reply to LIST_META_CONTEXT of name (no query)."""
        b = name.encode()
        r = self.option(NBD_OPT_LIST_META_CONTEXT, struct.pack(">I", len(b))
                        + b + struct.pack(">I", 0))
        return REPLY_NAMES.get(r[-1][0], hex(r[-1][0]))

    def export_name_closes(self, name):
        """Whether NBD_OPT_EXPORT_NAME of name gets a hang-up (and not a
        byte)."""
        b = name.encode()
        self.s.sendall(qt.NBD_IHAVEOPT +
                       struct.pack(">II", qt.NBD_OPT_EXPORT_NAME, len(b)) + b)
        try:
            return self.s.recv(4096) == b""
        except (ConnectionResetError, ssl.SSLError):
            return True

    def read(self, offset, length, cookie=1):
        """After a successful GO: READ, return the data."""
        self.s.sendall(qt.nbd_request(qt.NBD_CMD_READ, cookie, offset, length))
        err, c = self.simple_reply()
        assert (err, c) == (0, cookie), (err, c)
        return self.recv_exactly(length)


def closed_within(s, seconds):
    """Whether socket s is closed by the peer within seconds (it must send
    nothing meanwhile)."""
    s.settimeout(seconds)
    try:
        data = s.recv(4096)
    except socket.timeout:
        return False
    except ConnectionResetError:
        return True
    assert data == b"", "got %r while waiting for a hang-up" % data
    return True
