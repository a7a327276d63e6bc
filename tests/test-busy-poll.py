"""test-busy-poll.py: the loop polls without sleeping only while its
clients keep it busy (--busy-poll, the busy-poll key of -C files).

(a) By default a burst of pipelined reads is served right and the loop
    times its polls (the -vv report at exit counts the events).  With
    the longest window (10000 us, so that a loaded machine still gives
    short gaps) some requests are caught while spinning.  Left alone
    after a burst, the daemon uses no CPU either way: an idle server
    must never spin.
(b) --busy-poll=0: the same burst is served right, nothing spins (no
    report), and idle is idle.
(c) A -C file with busy-poll = 0, then reloads: 10000 applies at once
    (the next burst spins), 20000 is refused with the file, the key and the
    value named, and the running value stays.
(d) --busy-poll=20000 on the command line is a usage error.
(e) The probe: while the loop spins, the socket of a lone client waiting
    for its next request (or for a write's payload) may be read directly;
    QD1 reads and writes are served right.  With a second client
    connected, it never reads.
"""

import os
import re
import signal
import socket
import subprocess
import threading
import time

import qnbdtest as qt

nbd = qt.require_nbd()
qt.requires("qemu-img")

SIZE = 8 * 1024 * 1024
BLOCK = 4096
DEPTH = 32
ROUNDS = 100
tmp = qt.tmpdir()
img = qt.create_image(tmp, "disk.qcow2", SIZE)
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    """User plus system CPU time of process pid."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


DISK = b"".join(qt.pattern(off, 1024 * 1024)
                for off in range(0, SIZE, 1024 * 1024))


def fill(h):
    """Write DISK, what every read must then return."""
    for off in range(0, SIZE, 1024 * 1024):
        h.pwrite(DISK[off:off + 1024 * 1024], off)
    h.flush()


def burst(h):
    """ROUNDS rounds of DEPTH pipelined 4 KiB reads, each checked."""
    n = SIZE // BLOCK
    for r in range(ROUNDS):
        bufs = []
        for i in range(DEPTH):
            off = ((r * DEPTH + i) * 7919 % n) * BLOCK
            buf = nbd.Buffer(BLOCK)
            cookie = h.aio_pread(buf, off)
            bufs.append((cookie, buf, off))
        for cookie, buf, off in bufs:
            while not h.aio_command_completed(cookie):
                h.poll(-1)
            qt.assert_same(buf.to_bytearray(), DISK[off:off + BLOCK], off)


def assert_idle(pid, what):
    time.sleep(0.3)
    before = cpu_seconds(pid)
    time.sleep(1.0)
    used = cpu_seconds(pid) - before
    qt.log("%s: %.2f s of CPU in 1 s idle" % (what, used))
    assert used <= 0.05, "%s: %.2f s of CPU in 1 s of idling" % (what, used)


REPORT = re.compile(r"busy polling: (\d+) events while spinning \((\d+) read "
                    r"by the probe\), (\d+) after a short sleep, (\d+) after "
                    r"a long one")


def report(srv):
    """The counts of the -vv report at exit (while spinning, of which read
    by the probe, after a short sleep, after a long one), or None."""
    m = REPORT.search(srv.stderr())
    return tuple(int(x) for x in m.groups()) if m else None


def idle_then_stop(srv, h, what):
    """Check that srv idles, hang up, stop it; the counts it reported."""
    assert_idle(srv.pid, what)
    h.shutdown()
    assert srv.stop() == 0
    counts = report(srv)
    qt.log("%s: %s" % (what, counts))
    return counts


# (a) the default
srv = qt.Server(img, "-vv")
h = srv.connect()
fill(h)
burst(h)
counts = idle_then_stop(srv, h, "default, after a burst")
assert counts is not None, "no busy polling report at exit"
qt.check_image(img)

srv = qt.Server(img, "-vv", "--busy-poll=10000")
h = srv.connect()
burst(h)
counts = idle_then_stop(srv, h, "--busy-poll=10000, after a burst")
assert counts is not None and counts[0] > 0, \
    "no request came while spinning: %s" % (counts,)

# (b) --busy-poll=0
srv = qt.Server(img, "-vv", "--busy-poll=0")
h = srv.connect()
burst(h)
counts = idle_then_stop(srv, h, "--busy-poll=0")
assert counts is None, "spun with --busy-poll=0: %s" % (counts,)

# (c) the key, and reloads
sock = os.path.join(tmp, "cfg.sock")
pidfile = os.path.join(tmp, "cfg.pid")
cfg = os.path.join(tmp, "qnbd.conf")


def write_cfg(value):
    with open(cfg + ".tmp", "w") as f:
        f.write("[server]\nsocket = %s\npid-file = %s\nbusy-poll = %s\n"
                "[export disk]\nfile = %s\n" % (sock, pidfile, value, img))
    os.rename(cfg + ".tmp", cfg)


notify_path = os.path.join(tmp, "notify")
ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
ns.bind(notify_path)
ready = []


def notify_reader():
    while True:
        msg = ns.recv(4096).decode()
        if "READY=1" in msg.split("\n"):
            ready.append(msg)


threading.Thread(target=notify_reader, daemon=True).start()


def reload(srv):
    n = len(ready)
    srv.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while len(ready) == n:
        assert time.monotonic() < deadline, "no READY=1 after the reload"
        time.sleep(0.05)


write_cfg(0)
env = dict(os.environ, NOTIFY_SOCKET=notify_path)
srv = qt.ConfigServer(cfg, sock, pidfile, "-vv", env=env)
h = nbd.NBD()
h.set_export_name("disk")
h.connect_unix(sock)
burst(h)
write_cfg(20000)
reload(srv)
err = srv.stderr()
assert re.search(r"qnbd\.conf:\d+: key 'busy-poll' in \[server\]: '20000' "
                 r"is not a number of microseconds up to 10000", err), err
assert "refused: the running configuration stays" in err, err
burst(h)
write_cfg(10000)
reload(srv)
burst(h)
counts = idle_then_stop(srv, h, "busy-poll = 10000 by a reload")
assert counts is not None and counts[0] > 0, \
    "a reload to busy-poll = 10000 did not spin: %s" % (counts,)

# (d) out of range on the command line
out = subprocess.run([qt.QNBD, "--busy-poll=20000", "-k", sock, img],
                     capture_output=True, text=True, timeout=30)
assert out.returncode == 1, (out.returncode, out.stderr)
assert "--busy-poll: '20000' is not a number of microseconds up to 10000" \
    in out.stderr, out.stderr

# (e) the probe
def qd1(h, n=300):
    """n requests one at a time: a third writes (DISK's own bytes), the
    rest checked reads."""
    for i in range(n):
        off = (i * 7919 % (SIZE // BLOCK)) * BLOCK
        if i % 3 == 0:
            h.pwrite(DISK[off:off + BLOCK], off)
        else:
            qt.assert_same(h.pread(BLOCK, off), DISK[off:off + BLOCK], off)


# How many requests the probe reads first is timing: under load, or
# with sanitizers, this client's requests mostly land while the loop is
# in its poll (CI counted 0 and 1 of 300 where an idle machine counts
# 50-90).  What it reads must be served right, and with a second client
# it must read nothing; its gain is measured in bench/ (qd1read).
srv = qt.Server(img, "-vv", "--busy-poll=10000")
h = srv.connect()
qd1(h)
counts = idle_then_stop(srv, h, "one client at QD1")
assert counts is not None, "no busy polling report at exit"

srv = qt.Server(img, "-vv", "--busy-poll=10000")
other = srv.connect()
h = srv.connect()               # the newer: first in the daemon's list
qd1(h)
other.shutdown()
counts = idle_then_stop(srv, h, "two clients at QD1")
assert counts is not None and counts[1] == 0, \
    "the probe read with two clients connected: %s" % (counts,)
qt.check_image(img)

qt.log("ok")
