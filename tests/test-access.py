"""test-access.py: who may use an export (allow-address, allow-tls-dn,
allow-psk-user, tls-required), seen by raw and by real clients.

One qnbd -C with --tls=on (x509 with --tls-verify-peer, and PSK) on a Unix
socket and on 127.0.0.1 serves, the first being the default export:
  far      allow-address = 10.0.0.0/8, 192.0.2.1  (not 127.0.0.1)
  open     no rule
  local    allow-address = 127.0.0.1/32 ::1
  mapped   allow-address = ::ffff:127.0.0.0/104  (an IPv4 network)
  unixonly allow-address = unix
  dn       allow-tls-dn = O=qnbd test,CN=alice
  psk      allow-psk-user = alice
  tlsonly  tls-required
A TCP client lists only open, local, mapped; INFO/GO of far, of the
default name and of unixonly get NBD_REP_ERR_POLICY, of dn, psk and
tlsonly NBD_REP_ERR_TLS_REQD; LIST_META_CONTEXT is refused alike; one that
lists and then GOes an export it may not use is refused and may then GO
one it may; EXPORT_NAME of a refused export hangs up.  A Unix client sees
open and unixonly.  Over TLS, alice's certificate opens dn, bob's does not
(POLICY after STARTTLS, TLS_REQD before it), a certificate with alice's
DN from another CA gets no TLS session; with PSK (libnbd) alice opens
psk, bob does not, and alice's PSK does not open dn.  tlsonly serves TLS
clients only.  nbdinfo --list shows what LIST allows.  Each refusal is one
log line naming client, export and rule.  Then the configurations these
keys cannot work in are refused at startup, naming the line.
"""

import os
import re
import ssl
import signal
import subprocess
import time

import qnbdtest as qt
import accesslib as al

nbd = qt.require_nbd()
qt.requires("certtool", "qemu-img", "qemu-io", "nbdinfo")

tmp = qt.tmpdir()
pki = al.Pki(os.path.join(tmp, "pki"))
server_certs = pki.server()
alice = pki.client("alice")
bob = pki.client("bob")
keys = al.psk_file(os.path.join(tmp, "keys.psk"), ["alice", "bob"])
ca = pki.ca_cert

EXPORTS = {
    "far": "allow-address = 10.0.0.0/8, 192.0.2.1\n",
    "open": "",
    "local": "allow-address = 127.0.0.1/32 ::1\n",
    "mapped": "allow-address = ::ffff:127.0.0.0/104\n",
    "unixonly": "allow-address = unix\n",
    "dn": "allow-tls-dn = O=qnbd test,CN=alice\n",
    "psk": "allow-psk-user = alice\n",
    "tlsonly": "tls-required = yes\n",
}
images = {}
for i, name in enumerate(EXPORTS):
    images[name] = qt.create_image(tmp, name + ".qcow2", 4 << 20)
    qt.run("qemu-io", "-f", "qcow2", "-c",
           "write -P 0x%02x 0 4096" % (0x40 + i), images[name])


def pattern_of(name):
    return bytes([0x40 + list(EXPORTS).index(name)]) * 4096


sock = os.path.join(tmp, "qnbd.sock")
pidfile = os.path.join(tmp, "qnbd.pid")
port = qt.free_port()
text = """\
[server]
socket = %s
bind = 127.0.0.1
port = %d
pid-file = %s
tls = on
tls-certificates = %s
tls-verify-peer = yes
tls-psk = %s
""" % (sock, port, pidfile, server_certs, keys)
for name, rules in EXPORTS.items():
    text += "\n[export %s]\nfile = %s\n%s" % (name, images[name], rules)
cfg = os.path.join(tmp, "qnbd.conf")
with open(cfg, "w") as f:
    f.write(text)
srv = qt.ConfigServer(cfg, sock, pidfile, "-v", port=port)
tcp = ("127.0.0.1", port)

# --- Plaintext over TCP from 127.0.0.1 ------------------------------
c = al.TlsClient(tcp)
assert c.list() == ["local", "mapped", "open"], c.list()
want = {"far": "POLICY", "": "POLICY", "open": "ACK", "local": "ACK",
        "mapped": "ACK", "unixonly": "POLICY", "dn": "TLS_REQD",
        "psk": "TLS_REQD", "tlsonly": "TLS_REQD", "nosuch": "UNKNOWN"}
for name, w in want.items():
    got = c.info(name)
    assert got == w, "TCP INFO %r: %s, want %s" % (name, got, w)
    got = c.list_meta(name)
    assert got == w, "TCP LIST_META_CONTEXT %r: %s, want %s" % (name, got, w)
# A client that lists, then asks for what it may not have, then goes on.
assert c.info("far", qt.NBD_OPT_GO) == "POLICY"
assert c.info("", qt.NBD_OPT_GO) == "POLICY"
assert c.info("local", qt.NBD_OPT_GO) == "ACK"
assert c.read(0, 4096) == pattern_of("local")
c.close()

c = al.TlsClient(tcp)
assert c.export_name_closes("far"), "EXPORT_NAME of a refused export"
c.close()
c = al.TlsClient(tcp)
assert c.export_name_closes(""), "EXPORT_NAME of the refused default"
c.close()

# --- Plaintext over the Unix socket ---------------------------------
c = al.TlsClient(sock)
assert c.list() == ["open", "unixonly"], c.list()
assert c.info("local", qt.NBD_OPT_GO) == "POLICY"
assert c.info("unixonly", qt.NBD_OPT_GO) == "ACK"
assert c.read(0, 4096) == pattern_of("unixonly")
c.close()

# --- x509: alice and bob, options before and after STARTTLS ---------
c = al.TlsClient(sock)
assert c.info("dn") == "TLS_REQD"
c.starttls(ca, alice)
assert c.list() == ["dn", "open", "tlsonly", "unixonly"], c.list()
assert c.info("dn") == "ACK"
assert c.info("psk") == "POLICY", "a certificate opened a PSK-only export"
assert c.info("dn", qt.NBD_OPT_GO) == "ACK"
assert c.read(0, 4096) == pattern_of("dn")
c.close()

c = al.TlsClient(sock)
c.starttls(ca, bob)
assert c.list() == ["open", "tlsonly", "unixonly"], c.list()
assert c.info("dn") == "POLICY"
assert c.info("dn", qt.NBD_OPT_GO) == "POLICY"
assert c.info("tlsonly", qt.NBD_OPT_GO) == "ACK"
assert c.read(0, 4096) == pattern_of("tlsonly")
c.close()

# A certificate of another CA with alice's very DN: no TLS at all.
evil = al.Pki(os.path.join(tmp, "evil")).client("alice")
c = al.TlsClient(sock)
try:
    c.starttls(ca, evil)
    got = c.list()
    raise AssertionError("another CA's alice was served: %r" % got)
except (ssl.SSLError, EOFError, ConnectionResetError, BrokenPipeError) as e:
    qt.log("another CA's alice: %r" % e)
c.close()

# Over TCP, TLS does not lift the address rule.
c = al.TlsClient(tcp)
c.starttls(ca, alice)
assert c.list() == ["dn", "local", "mapped", "open", "tlsonly"], c.list()
assert c.info("far") == "POLICY"
c.close()


# --- Real clients ----------------------------------------------------
def nbdinfo(*args):
    return qt.run("nbdinfo", *args, check=False)


st, out = nbdinfo("--list", "nbd://127.0.0.1:%d/" % port)
assert st == 0 and set(re.findall(r"export=\"?'?([a-z]+)", out)) == \
    {"local", "mapped", "open"}, "nbdinfo --list over TCP"
st, out = nbdinfo("--size", "nbd://127.0.0.1:%d/far" % port)
assert st != 0, "nbdinfo reached a refused export"
st, out = nbdinfo("--size", "nbd://127.0.0.1:%d/local" % port)
assert st == 0 and out.strip() == str(4 << 20), out

uri = "nbds+unix:///%%s?socket=%s&tls-certificates=%%s" % sock
st, out = nbdinfo("--size", uri % ("dn", alice))
assert st == 0, "alice's certificate refused by nbdinfo"
st, out = nbdinfo("--size", uri % ("dn", bob))
assert st != 0, "bob's certificate let in by nbdinfo"


def psk_handle(user, name):
    h = nbd.NBD()
    h.set_tls(nbd.TLS_REQUIRE)
    h.set_tls_psk_file(keys)
    h.set_tls_username(user)
    h.set_export_name(name)
    h.connect_unix(sock)
    return h


h = psk_handle("alice", "psk")
h.pwrite(b"\x99" * 4096, 8192)
h.flush()
assert h.pread(4096, 0) == pattern_of("psk")
assert h.pread(4096, 8192) == b"\x99" * 4096
h.shutdown()
for user, name in (("bob", "psk"), ("alice", "dn")):
    try:
        psk_handle(user, name)
        raise AssertionError("PSK %s got export %s" % (user, name))
    except nbd.Error as e:
        qt.log("PSK %s, export %s: refused: %s" % (user, name, e))

# libnbd's own LIST, as alice over PSK.
h = nbd.NBD()
h.set_tls(nbd.TLS_REQUIRE)
h.set_tls_psk_file(keys)
h.set_tls_username("alice")
h.set_opt_mode(True)
h.connect_unix(sock)
seen = []
h.opt_list(lambda name, desc: seen.append(name))
h.opt_abort()
assert sorted(seen) == ["open", "psk", "tlsonly", "unixonly"], seen

# A plaintext libnbd client cannot have tlsonly.
h = nbd.NBD()
h.set_tls(nbd.TLS_DISABLE)
h.set_export_name("tlsonly")
try:
    h.connect_unix(sock)
    raise AssertionError("tlsonly served in plaintext")
except nbd.Error as e:
    qt.log("plaintext tlsonly: refused: %s" % e)

# --- A reload changes the rules for new connections -----------------
# "far" now admits 127.0.0.1, "open" gets a rule that refuses it, and a
# new export "late" comes with its own rule: each applies at once.
EXPORTS["far"] = "allow-address = 127.0.0.1\n"
EXPORTS["open"] = "allow-address = 10.0.0.0/8\n"
EXPORTS["late"] = "allow-address = unix\n"
images["late"] = qt.create_image(tmp, "late.qcow2", 4 << 20)
text2 = text.split("\n[export ")[0]
for name, rules in EXPORTS.items():
    text2 += "\n[export %s]\nfile = %s\n%s" % (name, images[name], rules)
with open(cfg, "w") as f:
    f.write(text2)
before = srv.stderr().count("reload: export 'late' added")
srv.proc.send_signal(signal.SIGHUP)
deadline = time.monotonic() + 30
while srv.stderr().count("reload: export 'late' added") == before:
    assert time.monotonic() < deadline, "the reload did not happen"
    time.sleep(0.1)
c = al.TlsClient(tcp)
assert c.list() == ["far", "local", "mapped"], c.list()
assert c.info("open", qt.NBD_OPT_GO) == "POLICY"
assert c.info("late") == "POLICY"
assert c.info("far", qt.NBD_OPT_GO) == "ACK"
assert c.read(0, 4096) == pattern_of("far")
c.close()
c = al.TlsClient(sock)
assert c.list() == ["late", "unixonly"], c.list()
assert c.info("late", qt.NBD_OPT_GO) == "ACK"
c.close()

assert srv.stop() == 0
log = srv.stderr()
for line in ("(127.0.0.1): export 'far' refused: address not in "
             "allow-address",
             "(unix): export 'local' refused: address not in allow-address",
             "export 'dn' refused: certificate DN not in allow-tls-dn",
             "PSK user bob): export 'psk' refused: PSK user not in "
             "allow-psk-user",
             "export 'tlsonly' refused: TLS is required",
             "client certificate verified: 'O=qnbd test,CN=alice'"):
    assert line in log, "no log line %r" % line
for name in images.values():
    qt.check_image(name)


# --- Configurations refused at startup ------------------------------
def refused(extra_server, rules, why):
    bad = os.path.join(tmp, "bad.conf")
    with open(bad, "w") as f:
        f.write("[server]\nsocket = %s\n%s\n[export x]\nfile = %s\n%s" %
                (os.path.join(tmp, "bad.sock"), extra_server,
                 images["open"], rules))
    p = subprocess.run([qt.QNBD, "-C", bad], capture_output=True, text=True,
                       timeout=30)
    qt.log(p.stderr.rstrip())
    assert p.returncode == 1, "started with %r" % rules
    assert why in p.stderr, "%r: no %r in the error" % (rules, why)


refused("", "allow-address = 10.0.0.0/33\n", "bad.conf:6: key 'allow-address'")
refused("", "allow-address = 10.0.0.0/8 nohost\n", "'nohost'")
refused("", "allow-address = ,\n", "allow-address")
refused("", "tls-required = yes\n", "need tls on or require")
refused("", "allow-psk-user = alice\n", "need tls on or require")
refused("tls = on\ntls-certificates = %s\n" % server_certs,
        "allow-tls-dn = CN=alice\n", "allow-tls-dn needs tls-certificates "
        "and tls-verify-peer")
refused("tls = on\ntls-certificates = %s\n" % server_certs,
        "allow-psk-user = alice\n", "allow-psk-user needs tls-psk")
p = subprocess.run([qt.QNBD, "--allow-address=::1/129", images["open"]],
                   capture_output=True, text=True, timeout=30)
assert p.returncode == 1 and "--allow-address: '::1/129'" in p.stderr, \
    p.stderr
print("ok")
