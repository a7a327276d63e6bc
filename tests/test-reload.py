"""test-reload.py: SIGHUP reads the -C file again and applies it.

qnbd -C serves a, b and c; a client writes and verifies on c the whole
time and must see no error.  Then, one SIGHUP after the other:
(a) a removed and d added while a client of a is attached: that client
    goes on until it leaves, a is then closed (a clean image that
    qemu-img may open), d is served, a is no longer listed nor found;
(b) a file that does not parse: reported with file:line, nothing changes;
(c) an export whose image is missing: reported (name and path) and
    skipped, while another new export of the same reload appears;
(d) a changed description: shown to new connections;
(e) readonly for an export with a client attached: the client keeps
    writing, new clients do not get the export until it has left, then
    it is served read-only.
systemd's notifications (a fake NOTIFY_SOCKET): READY=1 at start,
RELOADING=1 with MONOTONIC_USEC= and READY=1 around each reload, STATUS=
with the numbers of exports and clients.
"""

import json
import os
import re
import signal
import socket
import struct
import subprocess
import threading
import time

import qnbdtest as qt

nbd = qt.require_nbd()
qt.requires("qemu-img", "nbdinfo")

SIZE = 16 * 1024 * 1024
tmp = qt.tmpdir()
sock = os.path.join(tmp, "qnbd.sock")
pidfile = os.path.join(tmp, "qnbd.pid")
cfg = os.path.join(tmp, "qnbd.conf")
images = {n: qt.create_image(tmp, n + ".qcow2", SIZE)
          for n in ("a", "b", "c", "d", "f")}


def write_cfg(exports, extra="", server=""):
    """exports: (name, key lines) in order; server: more [server] lines."""
    text = "[server]\nsocket = %s\npid-file = %s\n%s" % (sock, pidfile,
                                                         server)
    for name, keys in exports:
        text += "\n[export %s]\n%s\n" % (name, keys)
    text += extra
    with open(cfg + ".tmp", "w") as f:
        f.write(text)
    os.rename(cfg + ".tmp", cfg)


def file_of(name):
    return "file = %s" % images[name]


# ---------------------------------------------------------------------
# systemd's side: every datagram, in order.
# ---------------------------------------------------------------------

notify_path = os.path.join(tmp, "notify")
ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
ns.bind(notify_path)
ns.settimeout(0.2)
notes = []
notes_lock = threading.Lock()
stop_all = threading.Event()


def notify_reader():
    while True:
        try:
            msg = ns.recv(4096).decode()
        except socket.timeout:
            continue
        with notes_lock:
            notes.append(msg)


def count_notes(word):
    with notes_lock:
        return sum(1 for m in notes if word in m.split("\n"))


def wait_for(what, cond, timeout=30):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out waiting for " + what
        time.sleep(0.05)


reader = threading.Thread(target=notify_reader, daemon=True)
reader.start()



def reload(what):
    """SIGHUP, and wait for the READY=1 that ends the reload."""
    qt.log("--- reload: %s" % what)
    ready = count_notes("READY=1")
    reloading = count_notes("RELOADING=1")
    srv.proc.send_signal(signal.SIGHUP)
    wait_for("READY=1 after a reload", lambda: count_notes("READY=1") > ready)
    assert count_notes("RELOADING=1") == reloading + 1
    with notes_lock:
        before = [m for m in notes if "RELOADING=1" in m.split("\n")][-1]
    assert any(line.startswith("MONOTONIC_USEC=") and
               int(line.split("=")[1]) > 0 for line in before.split("\n")), \
        before


def listed():
    """{name: description} of NBD_OPT_LIST."""
    out = subprocess.run(["nbdinfo", "--list", "--json",
                          "nbd+unix:///?socket=" + sock],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return {e["export-name"]: e.get("description")
            for e in json.loads(out.stdout)["exports"]}


def connect(name):
    h = nbd.NBD()
    h.set_export_name(name)
    h.connect_unix(sock)
    return h


NBD_OPT_INFO, NBD_REP_ERR_UNKNOWN = 6, (1 << 31) + 6


def assert_unknown(name):
    """INFO gets NBD_REP_ERR_UNKNOWN, EXPORT_NAME a hang-up."""
    c = qt.RawClient(sock)
    c.client_flags()
    n = name.encode()
    replies = c.option(NBD_OPT_INFO, struct.pack(">I", len(n)) + n +
                       struct.pack(">H", 0))
    assert replies[-1][0] == NBD_REP_ERR_UNKNOWN, replies
    c.s.sendall(qt.NBD_IHAVEOPT +
                struct.pack(">II", qt.NBD_OPT_EXPORT_NAME, len(n)) + n)
    assert c.s.recv(1) == b"", "EXPORT_NAME %s: no hang-up" % name
    c.close()


def dirty(path):
    """The qcow2 header's dirty bit (incompatible features, bit 0)."""
    with open(path, "rb") as f:
        hdr = f.read(80)
    version, = struct.unpack(">I", hdr[4:8])
    if version < 3:
        return False
    return bool(struct.unpack(">Q", hdr[72:80])[0] & 1)


def use(h, tag, off=0):
    """Write, read back, flush on h."""
    data = qt.pattern(off, 65536, tag)
    h.pwrite(data, off)
    qt.assert_same(h.pread(65536, off), data, off)
    h.flush()


# ---------------------------------------------------------------------
# Start: a, b, c.
# ---------------------------------------------------------------------

write_cfg([("a", file_of("a") + "\ndescription = disk a"),
           ("b", file_of("b") + "\ndescription = disk b"),
           ("c", file_of("c"))])
qt.log("NOTIFY_SOCKET=%s" % notify_path)
srv = qt.ConfigServer(cfg, sock, pidfile, "-v",
                      env=dict(os.environ, NOTIFY_SOCKET=notify_path))
wait_for("READY=1 at start", lambda: count_notes("READY=1") == 1)
with notes_lock:
    assert "STATUS=3 exports, 0 clients" in notes[0].split("\n"), notes
assert set(listed()) == {"a", "b", "c"}

# The client of c: writes and verifies all along, must see no error.
c_errors = []
c_rounds = [0]
c_slowest = [0.0]               # seconds, the longest write+read round


def c_writer():
    try:
        h = connect("c")
        i = 0
        while not stop_all.is_set():
            t = time.monotonic()
            off = (i * 65536 * 5) % (SIZE - 65536)
            data = qt.pattern(off, 65536, i % 251)
            h.pwrite(data, off)
            qt.assert_same(h.pread(65536, off), data, off)
            if i % 8 == 0:
                h.flush()
            i += 1
            c_rounds[0] = i
            c_slowest[0] = max(c_slowest[0], time.monotonic() - t)
        h.flush()
        h.shutdown()
    except Exception as e:
        c_errors.append(repr(e))


writer = threading.Thread(target=c_writer, daemon=True)  # a failure exits
writer.start()
wait_for("the client of c", lambda: c_rounds[0] > 10)

# ---------------------------------------------------------------------
# (a) a removed and d added, while a client of a is attached.
# ---------------------------------------------------------------------

ha = connect("a")
use(ha, 1)
write_cfg([("b", file_of("b") + "\ndescription = disk b"),
           ("c", file_of("c")),
           ("d", file_of("d"))])
reload("a removed, d added")
assert set(listed()) == {"b", "c", "d"}, listed()
assert_unknown("a")
# The client of a goes on.
use(ha, 2, 1 << 20)
assert "export 'a' closed" not in srv.stderr()
hd = connect("d")
use(hd, 3)
hd.shutdown()
ha.shutdown()
wait_for("a closed", lambda: "export 'a' closed" in srv.stderr())
assert not dirty(images["a"]), "a left dirty"
qt.check_image(images["a"])     # no lock left on it either
wait_for("STATUS= after a and d left",
         lambda: any("STATUS=3 exports, 1 client" in m.split("\n")
                     for m in notes))

# ---------------------------------------------------------------------
# (b) a file that does not parse: nothing changes.
# ---------------------------------------------------------------------

write_cfg([("b", file_of("b")), ("x", file_of("a") + "\nredonly = yes")])
reload("a file that does not parse")
err = srv.stderr()
assert "qnbd.conf:10: unknown key 'redonly' in [export x]" in err, err
assert "the running configuration stays" in err, err
assert set(listed()) == {"b", "c", "d"}, listed()
assert listed()["b"] == "disk b"

# ---------------------------------------------------------------------
# (c) a missing image is skipped, another new export appears.
# ---------------------------------------------------------------------

missing = os.path.join(tmp, "missing.qcow2")
write_cfg([("b", file_of("b") + "\ndescription = disk b"),
           ("c", file_of("c")),
           ("d", file_of("d")),
           ("e", "file = " + missing),
           ("f", file_of("f"))])
reload("e missing, f new")
err = srv.stderr()
assert "reload: export 'e' (%s) skipped" % missing in err, err
assert set(listed()) == {"b", "c", "d", "f"}, listed()
hf = connect("f")
use(hf, 4)
hf.shutdown()

# ---------------------------------------------------------------------
# (d) a new description, for new connections; b's client goes on.
# ---------------------------------------------------------------------

hb = connect("b")
use(hb, 5)
# A client in the middle of its handshake: contexts chosen for b before
# the reload still hold when it enters b after it.
NBD_OPT_SET_META_CONTEXT, NBD_REP_META_CONTEXT = 10, 4
NBD_CMD_BLOCK_STATUS, NBD_REPLY_TYPE_BLOCK_STATUS = 7, 5
raw = qt.RawClient(sock)
raw.client_flags()
assert raw.option(qt.NBD_OPT_STRUCTURED_REPLY)[-1][0] == qt.NBD_REP_ACK
q = b"base:allocation"
r = raw.option(NBD_OPT_SET_META_CONTEXT, struct.pack(">I", 1) + b"b" +
               struct.pack(">II", 1, len(q)) + q)
assert [t for t, _ in r] == [NBD_REP_META_CONTEXT, qt.NBD_REP_ACK], r
write_cfg([("b", file_of("b") + "\ndescription = the new b"),
           ("c", file_of("c")),
           ("d", file_of("d")),
           ("f", file_of("f"))])
reload("b's description")
assert listed()["b"] == "the new b", listed()
assert "after a restart" not in srv.stderr()
use(hb, 6)
hb2 = connect("b")
use(hb2, 7)
hb2.shutdown()
r = raw.option(qt.NBD_OPT_GO, struct.pack(">I", 1) + b"b" +
               struct.pack(">H", 0))
assert r[-1][0] == qt.NBD_REP_ACK, r
raw.s.sendall(struct.pack(">IHHQQI", qt.NBD_REQUEST_MAGIC, 0,
                          NBD_CMD_BLOCK_STATUS, 1, 0, 65536))
magic, flags, rtype, cookie, n = struct.unpack(">IHHQI",
                                               raw.recv_exactly(20))
body = raw.recv_exactly(n)
assert magic == qt.NBD_STRUCTURED_REPLY_MAGIC and cookie == 1, magic
assert rtype == NBD_REPLY_TYPE_BLOCK_STATUS, (rtype, body)
raw.s.sendall(struct.pack(">IHHQQI", qt.NBD_REQUEST_MAGIC, 0,
                          qt.NBD_CMD_DISC, 2, 0, 0))
raw.close()

# ---------------------------------------------------------------------
# (e) b read-only while hb is attached: after it leaves.
# ---------------------------------------------------------------------

write_cfg([("b", file_of("b") + "\ndescription = the new b\nreadonly = yes"),
           ("c", file_of("c")),
           ("d", file_of("d")),
           ("f", file_of("f"))],
          server="max-memory = 64M\ntls = off\n")
reload("b read-only; [server] max-memory and tls")
assert "[server] tls changed: applies after a restart" in srv.stderr(), \
    srv.stderr()
# hb, and maybe the clients that just left if the server (slower under
# the sanitizers) has not yet seen them go.
assert re.search(r"reopened \(%s\) when its [1-3] clients? ha(s|ve) left"
                 % re.escape(images["b"]), srv.stderr()), srv.stderr()
use(hb, 8)                      # still what it negotiated: writable
assert "b" not in listed()
hb.shutdown()
wait_for("b reopened", lambda: "export 'b' reopened" in srv.stderr())
assert listed()["b"] == "the new b"
hb = connect("b")
assert hb.is_read_only()
assert hb.pread(65536, 0) == qt.pattern(0, 65536, 8)
hb.shutdown()

# ---------------------------------------------------------------------
# The client of c saw nothing; systemd saw every reload.
# ---------------------------------------------------------------------

# A storm of connections: STATUS= at most about once a second.
with notes_lock:
    before = len(notes)
t0 = time.monotonic()
for i in range(40):
    h = connect("f")
    h.shutdown()
elapsed = time.monotonic() - t0
time.sleep(1.2)
with notes_lock:
    storm = notes[before:]
qt.log("%d connections in %.2f s: %d notifications" %
       (40, elapsed, len(storm)))
assert 1 <= len(storm) <= elapsed + 3, storm
# The last one has the count of the end of the storm: c's client.
wait_for("STATUS= after the storm",
         lambda: notes[-1].split("\n")[-1] == "STATUS=4 exports, 1 client", 5)

stop_all.set()
writer.join(60)
assert not writer.is_alive(), "the client of c is stuck"
assert not c_errors, c_errors
qt.log("client of c: %d rounds, no error, slowest %.1f ms" %
       (c_rounds[0], c_slowest[0] * 1000))
wait_for("STATUS with no client",
         lambda: any("STATUS=4 exports, 0 clients" in m.split("\n")
                     for m in notes[-3:]), 10)
assert count_notes("RELOADING=1") == 5
assert srv.stop() == 0
for n in ("b", "c", "d", "f"):
    qt.check_image(images[n])

# Without -C, SIGHUP is logged and ignored.
single = qt.Server(images["f"], "-v")
h = single.connect()
single.proc.send_signal(signal.SIGHUP)
wait_for("SIGHUP ignored", lambda: "SIGHUP: ignored" in single.stderr())
use(h, 9)
h.shutdown()
assert single.stop() == 0
qt.log("PASS")
