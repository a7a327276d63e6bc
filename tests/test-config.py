"""test-config.py: qnbd -C serves the exports of a configuration file.

Three exports (read-only qcow2, raw, qcow2 with compress) on a Unix
socket and on 127.0.0.1 at once: nbdinfo --list shows them with their
descriptions, clients write and read all three at the same time, the
read-only one refuses writes, an unknown name is refused.  Then bad files
(unknown key, bad value, no file=, unknown section, an export twice, a
line that is not INI) each exit 1 naming the file, the line and the key,
and -C with an IMAGE argument is refused.
"""

import os
import re
import struct
import subprocess
import threading
import time

import qnbdtest as qt

nbd = qt.require_nbd()
qt.requires("qemu-img", "nbdinfo")

SIZE = 16 * 1024 * 1024
tmp = qt.tmpdir()



def write_cfg(name, text):
    path = os.path.join(tmp, name)
    with open(path, "w") as f:
        f.write(text)
    return path


ro = qt.create_image(tmp, "ro.qcow2", SIZE)
qt.run("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 1M", ro)
raw = os.path.join(tmp, "disk.raw")
with open(raw, "wb") as f:
    f.truncate(SIZE)
comp = qt.create_image(tmp, "comp.qcow2", SIZE)
sock = os.path.join(tmp, "cfg.sock")
port = qt.free_port()

cfg = write_cfg("qnbd.conf", """\
# three disks
[server]
socket = %s
bind = 127.0.0.1
port = %d
pid-file = %s
max-memory = 64M

[export ro]
file = %s
readonly = yes
description = the read-only one

[export raw]
file = %s
format = raw
description = a raw disk

[export comp]
file = %s
compress = true
discard = ignore
description = backups, compressed
""" % (sock, port, os.path.join(tmp, "qnbd-config.pid"), ro, raw, comp))

srv = qt.ConfigServer(cfg, sock, os.path.join(tmp, "qnbd-config.pid"),
                      port=port)

# Every export listed, with its description, on both listeners.
for uri in ("nbd+unix:///?socket=" + sock, "nbd://127.0.0.1:%d/" % port):
    out = qt.run("nbdinfo", "--list", uri)[1]
    for name, desc in (("ro", "the read-only one"), ("raw", "a raw disk"),
                       ("comp", "backups, compressed")):
        assert 'export="%s"' % name in out, out
        assert desc in out, out

# An unknown export: INFO/GO answered with an error.
r = subprocess.run(["nbdinfo", "nbd+unix:///nope?socket=" + sock],
                   capture_output=True, text=True, timeout=60)
assert r.returncode != 0, r.stdout
assert "nope" in r.stderr, r.stderr


# The same at the protocol level: INFO gets NBD_REP_ERR_UNKNOWN,
# EXPORT_NAME (no error reply possible) a clean hang-up, and a known name
# its own size.
NBD_OPT_INFO, NBD_REP_ERR_UNKNOWN = 6, (1 << 31) + 6
c = qt.RawClient(sock)
c.client_flags()
replies = c.option(NBD_OPT_INFO, struct.pack(">I", 4) + b"nope" +
                   struct.pack(">H", 0))
assert replies[-1][0] == NBD_REP_ERR_UNKNOWN, replies
replies = c.option(NBD_OPT_INFO, struct.pack(">I", 3) + b"raw" +
                   struct.pack(">H", 0))
assert replies[-1][0] == qt.NBD_REP_ACK, replies
c.s.sendall(qt.NBD_IHAVEOPT + struct.pack(">II", qt.NBD_OPT_EXPORT_NAME, 4)
            + b"nope")
assert c.s.recv(1) == b"", "EXPORT_NAME of an unknown name: no hang-up"
c.close()
c = qt.RawClient(("127.0.0.1", port))
c.client_flags()
c.s.sendall(qt.NBD_IHAVEOPT + struct.pack(">II", qt.NBD_OPT_EXPORT_NAME, 4)
            + b"comp")
size, eflags = struct.unpack(">QH", c.recv_exactly(10))
assert size == SIZE
c.close()


def uri_of(name, tcp):
    if tcp:
        return "nbd://127.0.0.1:%d/%s" % (port, name)
    return "nbd+unix:///%s?socket=%s" % (name, sock)


errors = []


def worker(name, tcp, tag):
    try:
        h = nbd.NBD()
        h.connect_uri(uri_of(name, tcp))
        assert h.get_size() == SIZE
        for i in range(16):
            off = (i * 65536 * 7 + tag * 1048576) % (SIZE - 65536)
            if name == "comp":
                # Compressible, so that clusters are stored compressed.
                data = (b"%d at %d; " % (tag, off) * 8192)[:65536]
            else:
                data = qt.pattern(off, 65536, tag)
            h.pwrite(data, off)
            got = h.pread(65536, off)
            qt.assert_same(got, data, off)
        h.flush()
        h.shutdown()
    except Exception as e:     # reported by the main thread
        errors.append("%s: %r" % (name, e))


threads = [threading.Thread(target=worker, args=(n, tcp, t))
           for t, (n, tcp) in enumerate([("raw", False), ("raw", True),
                                         ("comp", False), ("comp", True)])]
for t in threads:
    t.start()

# Meanwhile the read-only export reads its data and refuses a write.
h = nbd.NBD()
h.connect_uri(uri_of("ro", True))
assert h.is_read_only()
assert h.pread(4096, 0) == b"\x5a" * 4096
h.set_strict_mode(0)
try:
    h.pwrite(b"x" * 4096, 0)
    raise AssertionError("a write to the read-only export succeeded")
except nbd.Error as e:
    qt.log("write to ro refused: %s" % e)
h.shutdown()

for t in threads:
    t.join(120)
    assert not t.is_alive(), "a client is stuck"
assert not errors, errors

assert srv.stop() == 0
for img in (ro, comp):
    qt.check_image(img)
out = qt.run("qemu-img", "check", comp)[1]
assert re.search(r"[1-9][0-9.]*% compressed clusters", out), out
qt.log("exports served together")

# Bad configuration files: exit 1 before listening, file:line: key.
img = ro
cases = [
    ("[export a]\nfile = %s\nredonly = yes\n" % img,
     "bad1.conf:3: unknown key 'redonly' in [export a]"),
    ("[server]\nport = 70000\n[export a]\nfile = %s\n" % img,
     "bad2.conf:2: key 'port' in [server]: '70000' is not a port number"),
    ("[export a]\nfile = %s\nformat = qcow3\n" % img,
     "bad3.conf:3: key 'format' in [export a]: 'qcow3'"),
    ("[export a]\nreadonly = yes\n",
     "bad4.conf:1: key 'file' missing in [export a]"),
    ("[export a]\nfile = %s\n[exports b]\nfile = %s\n" % (img, img),
     "bad5.conf:3: unknown section [exports b]"),
    ("[export a]\nfile = %s\n\n[export  a ]\nfile = %s\n" % (img, img),
     "bad6.conf:4: duplicate section [export  a ]"),
    ("[server]\nsocket = %s\n[export a]\nfile = %s\nthis is not ini\n"
     % (sock, img), "bad7.conf:5:"),
    ("[server]\nfile = %s\n" % img,
     "bad8.conf:2: unknown key 'file' in [server]"),
    ("[export a]\nfile = %s\nport = 1\n" % img,
     "bad9.conf:3: unknown key 'port' in [export a]"),
    ("[export a]\nfile = %s\nforce-share = yes\n" % img,
     "bad10.conf:1: force-share needs readonly"),
    # A name longer than libinih keeps of a section header.
    ("[export %s]\nfile = %s\nbad = 1\n" % ("n" * 60, img),
     "bad11.conf:3: unknown key 'bad' in [export %s]" % ("n" * 60)),
    ("[export a]\nfile = %s\n" % os.path.join(tmp, "missing.qcow2"),
     "missing.qcow2: No such file or directory (export 'a')"),
    ("[server]\nverbose = 3\n[export a]\nfile = %s\n" % img,
     "bad13.conf:2: key 'verbose' in [server]: '3' is not 0, 1 or 2"),
]
for i, (text, want) in enumerate(cases, 1):
    path = write_cfg("bad%d.conf" % i, text)
    r = subprocess.run([qt.QNBD, "-C", path], capture_output=True,
                       text=True, timeout=30)
    qt.log("bad%d.conf: %s" % (i, r.stderr.strip()))
    assert r.returncode == 1, (i, r.returncode, r.stderr)
    assert want in r.stderr, (want, r.stderr)
    assert not os.path.exists(sock), "bad%d.conf: it listened" % i

# verbose = 1 in [server] is -v: the URI of each export is logged.
vsock = os.path.join(tmp, "v.sock")
vcfg = write_cfg("verbose.conf", "[server]\nsocket = %s\npid-file = %s\n"
                 "verbose = 1\n[export quiet]\nfile = %s\nreadonly = yes\n"
                 % (vsock, os.path.join(tmp, "v.pid"), img))
vproc = subprocess.Popen([qt.QNBD, "-C", vcfg], stderr=subprocess.PIPE,
                         text=True)
deadline = time.monotonic() + 30
while not os.path.exists(os.path.join(tmp, "v.pid")):
    assert time.monotonic() < deadline and vproc.poll() is None
    time.sleep(0.1)
vproc.terminate()
verr = vproc.communicate(timeout=30)[1]
qt.log(verr)
assert "serving " in verr and "/quiet" in verr, verr

# -C serves the file's exports, not an IMAGE of the command line.
for extra in ([img], ["-r"], ["-k", sock]):
    r = subprocess.run([qt.QNBD, "-C", cfg] + extra, capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 1, (extra, r.stderr)
    assert "-C" in r.stderr, r.stderr
assert not os.path.exists(sock)

qt.log("PASS")
