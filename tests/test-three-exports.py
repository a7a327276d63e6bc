"""test-three-exports.py: one daemon, three kinds of export, a reload.

The case an operator runs: a -C file with a read-only export, a TLS-only
export that admits one client certificate (allow-tls-dn), and a
compressed backup export, on a Unix socket and 127.0.0.1, TLS on.  Real
clients use all three at once (qemu-io reads the read-only one and is
refused a write; nbdcopy over TLS with alice's certificate fills the
secure one, bob's is refused; a libnbd client writes whole clusters into
the backup one).  While the backup client keeps writing and verifying,
SIGHUP adds a fourth export and removes the read-only one: the writer
sees no error, the new export serves, the removed one is gone from the
list and its image is left clean.  At the end every image passes
qemu-img check, and the backup image holds compressed clusters with the
data written.
"""

import json
import os
import signal
import subprocess
import threading
import time

import qnbdtest as qt
import accesslib as al

nbd = qt.require_nbd()
qt.requires("qemu-img", "qemu-io", "nbdinfo", "nbdcopy", "certtool")

tmp = qt.tmpdir()
pki = al.Pki(os.path.join(tmp, "pki"))
server_certs = pki.server()
alice = pki.client("alice")
bob = pki.client("bob")

SIZE = 32 << 20
CLUSTER = 64 << 10
ro = qt.create_image(tmp, "ro.qcow2", SIZE)
qt.run("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 1M", ro)
secure = qt.create_image(tmp, "secure.qcow2", SIZE)
backup = qt.create_image(tmp, "backup.qcow2", SIZE)
fourth = qt.create_image(tmp, "fourth.qcow2", SIZE)

sock = os.path.join(tmp, "qnbd.sock")
pidfile = os.path.join(tmp, "qnbd.pid")
port = qt.free_port()
SERVER = """\
[server]
socket = %s
bind = 127.0.0.1
port = %d
pid-file = %s
tls = on
tls-certificates = %s
tls-verify-peer = yes
""" % (sock, port, pidfile, server_certs)
RO = "\n[export ro]\nfile = %s\nreadonly = yes\n" % ro
SECURE = ("\n[export secure]\nfile = %s\ntls-required = yes\n"
          "allow-tls-dn = O=qnbd test,CN=alice\n" % secure)
BACKUP = "\n[export backup]\nfile = %s\ncompress = yes\n" % backup
FOURTH = "\n[export fourth]\nfile = %s\n" % fourth
cfg = os.path.join(tmp, "qnbd.conf")
with open(cfg, "w") as f:
    f.write(SERVER + RO + SECURE + BACKUP)
srv = qt.ConfigServer(cfg, sock, pidfile, "-v", port=port)


def listed(certs):
    """The export names NBD_OPT_LIST gives a TLS client with certs."""
    out = subprocess.run(
        ["nbdinfo", "--list", "--json",
         "nbds+unix:///?socket=%s&tls-certificates=%s" % (sock, certs)],
        check=True, stdout=subprocess.PIPE).stdout
    return sorted(e["export-name"] for e in json.loads(out)["exports"])


# --- The backup writer: whole clusters, each read back. -------------
stop = threading.Event()
errors = []
rounds = [0]
written = {}


def backup_writer():
    h = nbd.NBD()
    try:
        h.set_export_name("backup")
        h.connect_unix(sock)
        i = 0
        while not stop.is_set():
            n = i % (SIZE // CLUSTER)
            # Compressible, and different each round.
            data = (b"round %9d, cluster %6d\n" % (i, n)) * (CLUSTER // 32)
            h.pwrite(data, n * CLUSTER)
            if h.pread(CLUSTER, n * CLUSTER) != data:
                raise AssertionError("backup cluster %d read back wrong" % n)
            written[n] = data
            i += 1
            rounds[0] = i
        h.flush()
        h.shutdown()
    except Exception as e:      # the main thread reports it
        errors.append(e)


writer = threading.Thread(target=backup_writer)
writer.start()

# --- All three at once, with real clients. ---------------------------
tcp_opts = ("driver=nbd,host=127.0.0.1,port=%d,export=ro" % port)
qt.run("qemu-io", "--image-opts", tcp_opts, "-r", "-c", "read -P 0x5a 0 1M")
st, out = qt.run("qemu-io", "--image-opts", tcp_opts, "-c", "write 0 64k",
                 check=False)
assert st != 0 or "failed" in out, \
    "a write to the read-only export was not refused"

data = os.path.join(tmp, "data")
with open(data, "wb") as f:
    f.write(os.urandom(8 << 20))
    f.truncate(SIZE)
uri = "nbds+unix:///secure?socket=%s&tls-certificates=%%s" % sock
qt.run("nbdcopy", data, uri % alice)
back = os.path.join(tmp, "back")
qt.run("nbdcopy", uri % alice, back)
qt.run("cmp", data, back)
st, out = qt.run("nbdinfo", "--size", uri % bob, check=False)
assert st != 0, "bob was served the secure export"
# Plaintext: the secure export is not even listed.
c = al.TlsClient(sock)
assert c.list() == ["backup", "ro"], c.list()
assert c.info("secure") == "TLS_REQD"
c.close()
assert listed(alice) == ["backup", "ro", "secure"]
assert listed(bob) == ["backup", "ro"]

# --- SIGHUP: add fourth, remove ro, while backup is being written. ---
h_ro = nbd.NBD()                # a client of ro across the reload
h_ro.set_export_name("ro")
h_ro.connect_unix(sock)
while rounds[0] < 20 and not errors:
    time.sleep(0.05)
with open(cfg, "w") as f:
    f.write(SERVER + SECURE + BACKUP + FOURTH)
srv.proc.send_signal(signal.SIGHUP)
deadline = time.monotonic() + 30
while "reload: export 'fourth' added" not in srv.stderr():
    assert time.monotonic() < deadline, "the reload did not happen"
    time.sleep(0.1)
assert listed(alice) == ["backup", "fourth", "secure"], listed(alice)
h4 = nbd.NBD()
h4.set_export_name("fourth")
h4.connect_uri("nbd+unix:///fourth?socket=%s" % sock)
h4.pwrite(b"\x44" * 4096, 0)
h4.flush()
assert h4.pread(4096, 0) == b"\x44" * 4096
h4.shutdown()
# The client of ro, attached before, is still served until it leaves.
assert h_ro.pread(4096, 0) == b"\x5a" * 4096
h_ro.shutdown()
c = al.TlsClient(sock)
assert c.info("ro") == "UNKNOWN"
c.close()
deadline = time.monotonic() + 30
while "export 'ro' closed" not in srv.stderr():
    assert time.monotonic() < deadline, "ro was not closed"
    time.sleep(0.1)
qt.check_image(ro)              # clean, and no longer locked

n_before = rounds[0]
while rounds[0] < n_before + 20 and not errors:
    time.sleep(0.05)
stop.set()
writer.join(60)
assert not writer.is_alive(), "the backup writer hung"
assert not errors, "the backup client saw: %r" % errors
qt.log("backup writer: %d rounds, no error" % rounds[0])

assert srv.stop() == 0
for img in (secure, backup, fourth):
    qt.check_image(img)
# What the writer last wrote is in the image, compressed.
raw = os.path.join(tmp, "backup.raw")
qt.run("qemu-img", "convert", "-O", "raw", backup, raw)
with open(raw, "rb") as f:
    for n, want in written.items():
        f.seek(n * CLUSTER)
        assert f.read(CLUSTER) == want, "backup cluster %d lost" % n
out = qt.run("qemu-img", "check", "--output=json", backup)[1]
assert json.loads(out).get("compressed-clusters", 0) > 0, \
    "no compressed cluster in backup"
out = qt.run("qemu-img", "map", "--output=json", fourth)[1]
assert any(e["data"] for e in json.loads(out))
