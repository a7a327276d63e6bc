"""test-socket-activation.py: started the way systemd's socket units start
it (listening sockets from fd 3 on, LISTEN_PID, LISTEN_FDS and
LISTEN_FDNAMES in the environment), qnbd serves what it is given, matched
to its listen entries by address:

1. one image, one passed socket at the path of -k: qnbd serves that
   socket and does not create it again (the file is systemd's, same
   inode, still there after qnbd exits 0 on SIGTERM);
2. -C with three listen entries and three named descriptors: the Unix
   socket and the TCP address systemd passed are served as passed, the
   configured socket it did not pass is created by qnbd (and removed at
   exit), and the passed socket no entry names is served with a warning
   naming it by its LISTEN_FDNAMES name; every one reaches every export;
3. a passed descriptor that is not a listening socket is refused: exit 1,
   naming it;
4. one image with -b 127.0.0.1 -p PORT and a passed Unix socket: qnbd
   listens on that TCP address itself (not passed) and serves the Unix
   socket with a warning.
"""

import fcntl
import os
import re
import socket
import subprocess

import qnbdtest as qt

nbd = qt.require_nbd()
qt.requires("qemu-img")

SIZE = 16 * 1024 * 1024
tmp = qt.tmpdir()
img = qt.create_image(tmp, "disk.qcow2", SIZE)


def unix_listener(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(16)
    return s


def start(socks, names, args, errname):
    """qnbd args with socks as fds 3, 4, ... and names in LISTEN_FDNAMES
    (None: unset), LISTEN_PID its own pid.  Returns (proc, stderr file)."""
    fds = [s.fileno() for s in socks]
    want = list(range(3, 3 + len(fds)))

    def arrange():
        # In the child, before exec: out of the way first, then into place,
        # as the fds Python holds may be among 3, 4, ...
        high = [fcntl.fcntl(f, fcntl.F_DUPFD, 100) for f in fds]
        for h, w in zip(high, want):
            os.dup2(h, w)
            os.close(h)
        os.environ["LISTEN_PID"] = str(os.getpid())

    env = dict(os.environ, LISTEN_FDS=str(len(socks)))
    env.pop("LISTEN_FDNAMES", None)
    if names is not None:
        env["LISTEN_FDNAMES"] = ":".join(names)
    cmd = [qt.QNBD] + args
    if qt.TEST_AIO:
        cmd.append('--aio=' + qt.TEST_AIO)
    qt.log("+ LISTEN_FDS=%d LISTEN_FDNAMES=%s %s" %
           (len(socks), env.get("LISTEN_FDNAMES"), " ".join(cmd)))
    err = open(os.path.join(tmp, errname), "w+")
    # The environment is the child's own (no env=): LISTEN_PID is set in
    # it by arrange, once the pid is known.
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=err,
                                stderr=err, preexec_fn=arrange,
                                pass_fds=want)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    for s in socks:
        s.close()               # qnbd has them now
    return proc, err


def greeting(family, addr):
    """Wait (bounded) for qnbd's greeting: a listening socket accepts
    connections into its backlog whoever holds it, and libnbd would wait
    for ever."""
    probe = socket.socket(family, socket.SOCK_STREAM)
    probe.settimeout(20)
    probe.connect(addr)
    got = probe.recv(8)
    probe.close()
    assert got == b"NBDMAGIC", "no greeting on %r: %r" % (addr, got)


def write_read(uri, name, offset):
    """uri has {} where the export name goes."""
    h = nbd.NBD()
    h.connect_uri(uri.format(name))
    assert h.get_export_name() == name
    assert h.get_size() == SIZE
    data = qt.pattern(offset, 65536, offset)
    h.pwrite(data, offset)
    qt.assert_same(h.pread(65536, offset), data, offset)
    h.shutdown()


def stop(proc, err):
    try:
        proc.terminate()
        status = proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        err.seek(0)
        text = err.read()
        qt.log("--- stderr of qnbd ---\n" + text + "--- end ---")
    return status, text


# 1. One image, -k naming the passed socket.
path = os.path.join(tmp, "activated.sock")
proc, err = start([unix_listener(path)], None, ['-v', '-k', path, img],
                  "qnbd1.err")
try:
    ino = os.stat(path).st_ino
    greeting(socket.AF_UNIX, path)
    write_read("nbd+unix:///{}?socket=" + path, "", 12345)
    assert os.stat(path).st_ino == ino, "qnbd made the -k socket again"
finally:
    status, text = stop(proc, err)
assert status == 0, "qnbd exited with status %d" % status
assert "warning" not in text, "a warning for the passed -k socket"
assert os.path.exists(path), "qnbd removed systemd's socket file"

# 2. A configuration file, named descriptors: passed (Unix), passed (TCP),
# not passed (Unix), passed and not configured (Unix).
img2 = qt.create_image(tmp, "disk2.qcow2", SIZE)
passed_sock = os.path.join(tmp, "passed.sock")
own_sock = os.path.join(tmp, "own.sock")
extra_sock = os.path.join(tmp, "extra.sock")
tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
tcp.bind(("127.0.0.1", 0))
tcp.listen(16)
port = tcp.getsockname()[1]
cfg = os.path.join(tmp, "qnbd.conf")
with open(cfg, "w") as f:
    f.write("""[server]
socket = %s
socket = %s
bind = 127.0.0.1
port = %d

[export one]
file = %s

[export two]
file = %s
""" % (passed_sock, own_sock, port, img, img2))
socks = [unix_listener(passed_sock), tcp, unix_listener(extra_sock)]
proc, err = start(socks, ["disk-unix", "disk-tcp", "stray"],
                  ['-v', '-C', cfg], "qnbd2.err")
try:
    ino = os.stat(passed_sock).st_ino
    greeting(socket.AF_UNIX, passed_sock)
    greeting(socket.AF_INET, ("127.0.0.1", port))
    greeting(socket.AF_UNIX, extra_sock)
    greeting(socket.AF_UNIX, own_sock)
    off = 0
    for uri in ("nbd+unix:///{}?socket=" + passed_sock,
                "nbd://127.0.0.1:%d/{}" % port,
                "nbd+unix:///{}?socket=" + own_sock,
                "nbd+unix:///{}?socket=" + extra_sock):
        for name in ("one", "two"):
            off += 65536
            write_read(uri, name, off)
    assert os.stat(passed_sock).st_ino == ino, "qnbd made a passed socket again"
finally:
    status, text = stop(proc, err)
assert status == 0, "qnbd exited with status %d" % status
warnings = [l for l in text.splitlines() if "warning" in l]
assert len(warnings) == 1 and "'stray'" in warnings[0] and \
    extra_sock in warnings[0], "want one warning naming 'stray': %r" % warnings
for name, where in (("disk-unix", passed_sock),
                    ("disk-tcp", "127.0.0.1 port %d" % port)):
    assert re.search(r"'%s' \(fd \d, %s\) is the listen entry" %
                     (name, re.escape(where)), text), \
        "no line naming %s as the entry %s" % (name, where)
assert "%s not passed: creating it" % own_sock in text
assert os.path.exists(passed_sock), "qnbd removed systemd's socket file"
assert not os.path.exists(own_sock), "qnbd left its own socket file"
qt.check_image(img)
qt.check_image(img2)

# 3. A descriptor that is not a listening socket.
a, b = socket.socketpair()
b.close()
proc, err = start([a], ["bogus"], ['-k', path, img], "qnbd3.err")
try:
    status = proc.wait(30)
finally:
    if proc.poll() is None:
        proc.kill()
        proc.wait()
err.seek(0)
text = err.read()
qt.log(text)
assert status == 1, "qnbd took a socket pair for a listener: %r" % status
assert "'bogus'" in text and "not a listening stream socket" in text, text

# 4. A TCP entry systemd did not pass.
port = qt.free_port()
path4 = os.path.join(tmp, "four.sock")
proc, err = start([unix_listener(path4)], ["four"],
                  ['-v', '-b', '127.0.0.1', '-p', str(port), img], "qnbd4.err")
try:
    greeting(socket.AF_UNIX, path4)
    greeting(socket.AF_INET, ("127.0.0.1", port))
    write_read("nbd://127.0.0.1:%d/{}" % port, "", 1 << 20)
    write_read("nbd+unix:///{}?socket=" + path4, "", 2 << 20)
finally:
    status, text = stop(proc, err)
assert status == 0, "qnbd exited with status %d" % status
assert "127.0.0.1 port %d not passed: listening there" % port in text
assert re.search(r"warning: .*'four' \(fd 3, %s\) matches no listen entry"
                 % re.escape(path4), text), text
qt.check_image(img)
qt.log("PASS")
