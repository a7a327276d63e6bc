"""test-handshake-limit.py: --handshake-limit closes connections that do
not finish the handshake in time, and only those.

Without a limit, clients that connect and never finish the handshake
hold their connections for ever: under --shared N, N of them lock every
other client out.  qnbd runs here with --handshake-limit=1 and --shared 2:
- one raw client reads the greeting and sends nothing, another sends its
  client flags and NBD_OPT_STRUCTURED_REPLY (answered), then half of the
  next option.  While they hang, a third connection is refused (the
  limit of 2 is reached); after about a second both are cut off (end of
  file), each with one log line, and the daemon is back to its
  descriptors;
- within CATCH_UP seconds of that, a libnbd client connects, writes and
  reads back;
- a libnbd client (NBD_OPT_GO) and a raw client (NBD_OPT_EXPORT_NAME)
  in the transmission phase stay idle for IDLE seconds, more than the
  limit, and are still served afterwards.
Then qnbd exits 0 on SIGTERM.  A second qnbd with --handshake-limit=0 (no
limit) leaves a silent client alone for IDLE seconds, after which it
finishes its handshake and reads; a bad value is refused.
"""

import socket
import subprocess
import time

import qnbdtest as qt

nbd = qt.require_nbd()
qt.requires("qemu-img")

MiB = 1024 * 1024
SIZE = 16 * MiB
LIMIT = 1                       # --handshake-limit
SHARED = 2                      # --shared
IDLE = 2.5                      # seconds idle in transmission (> LIMIT)
LATE = 3.0                      # the cut-off may come this much after LIMIT
CATCH_UP = 3.0                  # seconds for the libnbd client after that
SETTLE = 10.0                   # seconds the daemon gets to close sockets
TIMEOUT_LINE = "handshake not finished in %d s, disconnecting" % LIMIT

tmp = qt.tmpdir()
img = qt.create_image(tmp, "disk.qcow2", SIZE)
shadow = qt.Shadow(SIZE)


def settle(srv, want, what):
    """Wait until the daemon holds at most want descriptors."""
    deadline = time.monotonic() + SETTLE
    while qt.fd_count(srv.pid) > want and time.monotonic() < deadline:
        time.sleep(0.05)
    n = qt.fd_count(srv.pid)
    assert n <= want, "%s: the daemon holds %d descriptors, %d expected" % \
        (what, n, want)


def wait_hang_up(c, what):
    """Block until the server closes c's connection; return the time."""
    c.s.settimeout(LIMIT + LATE)
    try:
        data = c.s.recv(65536)
    except ConnectionResetError:
        data = b""
    except socket.timeout:
        raise AssertionError("%s: still connected %gs after the handshake "
                             "limit of %ds" % (what, LATE, LIMIT))
    assert data == b"", "%s: got %r instead of end of file" % (what, data)
    return time.monotonic()


def raw_read(c, cookie, offset, length):
    """One READ on a raw client in transmission (simple replies)."""
    c.s.sendall(qt.nbd_request(qt.NBD_CMD_READ, cookie, offset, length))
    err, got = c.simple_reply()
    assert err == 0 and got == cookie, \
        "READ: error %d, cookie %d (want 0, %d)" % (err, got, cookie)
    return c.recv_exactly(length)


# ---------------------------------------------------------------------
# --handshake-limit=1 --shared 2
# ---------------------------------------------------------------------

srv = qt.Server(img, "-v", "--handshake-limit=%d" % LIMIT,
                "--shared", str(SHARED))
baseline = qt.fd_count(srv.pid)
qt.log("daemon: %d descriptors at the start" % baseline)

t0 = time.monotonic()
silent = qt.RawClient(srv.sock)                 # greeting read, then nothing
halfway = qt.RawClient(srv.sock)
halfway.client_flags()
r = halfway.option(qt.NBD_OPT_STRUCTURED_REPLY)
assert r[-1][0] == qt.NBD_REP_ACK, "STRUCTURED_REPLY refused: %r" % r
halfway.s.sendall(qt.NBD_IHAVEOPT + b"\0\0")    # half an option header

# Both slots are taken: everyone else is locked out, for now.
try:
    qt.RawClient(srv.sock, timeout=LIMIT / 2).close()
    raise AssertionError("a third connection was served under --shared %d" %
                         SHARED)
except EOFError:
    qt.log("a third connection is refused while the two hang")

cut = [wait_hang_up(silent, "silent client"),
       wait_hang_up(halfway, "client stopped in the middle of an option")]
silent.close()
halfway.close()
qt.log("stuck clients cut off %.2fs and %.2fs after they connected" %
       (cut[0] - t0, cut[1] - t0))
assert min(cut) - t0 >= LIMIT * 0.9, \
    "cut off after %.2fs, before the limit of %ds" % (min(cut) - t0, LIMIT)
settle(srv, baseline, "after the cut-off")

# The slots are free again: a real client gets in and works at once.
h = srv.connect()
data = qt.pattern(0, MiB, 1)
h.pwrite(data, 0)
shadow.write(0, data)
qt.assert_same(h.pread(MiB, 0), data, 0)
took = time.monotonic() - max(cut)
qt.log("libnbd client connected, wrote and read back %.2fs after the "
       "cut-off" % took)
assert took < CATCH_UP, "libnbd client took %.2fs" % took

# Idle in transmission for longer than the limit: still served.
raw = qt.RawClient(srv.sock)
size, _ = raw.export_name()
assert size == SIZE, "export size %d" % size
qt.log("idle in transmission for %gs (limit %ds)" % (IDLE, LIMIT))
time.sleep(IDLE)
qt.assert_same(h.pread(MiB, 0), data, 0)
data2 = qt.pattern(MiB, 65536, 2)
h.pwrite(data2, MiB)
shadow.write(MiB, data2)
h.flush()
qt.assert_same(raw_read(raw, 7, 0, 65536), data[:65536], 0)
qt.assert_same(raw_read(raw, 8, MiB, 65536), data2, MiB)
qt.log("both idle clients (NBD_OPT_GO, NBD_OPT_EXPORT_NAME) still served")
raw.s.sendall(qt.nbd_request(qt.NBD_CMD_DISC, 9, 0, 0))
raw.close()
h.shutdown()
settle(srv, baseline, "the end")

status = srv.stop()
assert status == 0, "qnbd exited with status %d" % status
lines = [l for l in srv.stderr().splitlines() if TIMEOUT_LINE in l]
assert len(lines) == 2, "want 2 lines %r in the log, got %d" % \
    (TIMEOUT_LINE, len(lines))

# ---------------------------------------------------------------------
# --handshake-limit=0: no limit.
# ---------------------------------------------------------------------

srv = qt.Server(img, "--handshake-limit=0")
slow = qt.RawClient(srv.sock)
time.sleep(IDLE)
size, _ = slow.go()
assert size == SIZE, "export size %d" % size
qt.assert_same(raw_read(slow, 1, 0, 65536), data[:65536], 0)
qt.log("--handshake-limit=0: a client silent for %gs finished its "
       "handshake and read" % IDLE)
slow.close()
status = srv.stop()
assert status == 0, "qnbd exited with status %d" % status

for bad in ("-1", "1s", "", "x"):
    p = subprocess.run([qt.QNBD, "--handshake-limit=" + bad, img],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       universal_newlines=True)
    assert p.returncode == 1 and "--handshake-limit" in p.stdout, \
        "--handshake-limit=%s: status %d, %r" % (bad, p.returncode, p.stdout)

qt.check_image(img)
raw_file = tmp + "/shadow.raw"
shadow.save_raw(raw_file)
qt.compare_raw(raw_file, img)
qt.log("PASS (%.1fs)" % (time.monotonic() - t0))
