"""test-limits.py: max-connections, max-connections-per-client and
idle-timeout.

- max-connections = 3 (Unix socket): three clients are greeted, the next
  ones are closed at once without a byte; the refusals make one log line
  (rate-limited), and once a client leaves a new one is served.
- max-connections-per-client = 2 (127.0.0.1 and a Unix socket): two TCP
  clients from 127.0.0.1, not a third; Unix-socket clients are not
  counted, so three of them are served beside.
- idle-timeout = 2: a client that says nothing after GO is closed within a
  few seconds (cleanly: end of file, one log line); one that sends a
  request every half second for longer than that is not, nor one whose
  write payload trickles in over 3 s, nor one 3 s into its handshake
  (that is --handshake-limit's); without --idle-timeout a silent client
  stays.
"""

import os
import socket
import struct
import time

import qnbdtest as qt
import accesslib as al

qt.requires("qemu-img")

tmp = qt.tmpdir()
img = qt.create_image(tmp, "disk.qcow2", 16 << 20)


def greeted(address):
    """A raw client, if the server greets it; None if it hangs up."""
    try:
        return qt.RawClient(address, timeout=10)
    except (EOFError, ConnectionResetError):
        return None


def wait_for(what, cond, seconds=10):
    deadline = time.monotonic() + seconds
    while not cond():
        assert time.monotonic() < deadline, "timed out: " + what
        time.sleep(0.05)


# --- max-connections ------------------------------------------------
srv = qt.Server(img, "--max-connections=3")
held = [greeted(srv.sock) for _ in range(3)]
assert all(held), "a client under the limit was refused"
for _ in range(5):
    assert greeted(srv.sock) is None, "a fourth connection was served"
held.pop().close()
# The freed place is taken once the server has seen the hang-up.
wait_for("a connection after one left",
         lambda: (lambda c: c and (held.append(c) or True))(greeted(srv.sock)))
for c in held:
    c.close()
assert srv.stop() == 0
log = srv.stderr()
n = log.count("refusing a connection")
assert n == 1, "%d log lines for 5 refused connections" % n
assert "(max-connections)" in log

# --- max-connections-per-client ---------------------------------------
sock = os.path.join(tmp, "lim.sock")
pidfile = os.path.join(tmp, "lim.pid")
port = qt.free_port()
cfg = os.path.join(tmp, "lim.conf")
with open(cfg, "w") as f:
    f.write("[server]\nsocket = %s\nbind = 127.0.0.1\nport = %d\n"
            "pid-file = %s\nmax-connections-per-client = 2\n"
            "idle-timeout = 2\n\n[export disk]\nfile = %s\n"
            % (sock, port, pidfile, img))
srv = qt.ConfigServer(cfg, sock, pidfile, "-v", port=port)
tcp = ("127.0.0.1", port)
a, b = greeted(tcp), greeted(tcp)
assert a and b, "two connections from 127.0.0.1 refused"
assert greeted(tcp) is None, "a third connection from 127.0.0.1 served"
locals_ = [greeted(sock) for _ in range(3)]
assert all(locals_), "Unix-socket clients were counted per client"
a.close()
wait_for("a TCP connection after one left",
         lambda: (lambda c: c and (locals_.append(c) or True))(greeted(tcp)))
for c in [b] + locals_:
    c.close()
assert "already 2 from it (max-connections-per-client)" in srv.stderr()

# --- idle-timeout (2 s in that file) ----------------------------------
quiet = qt.RawClient(sock)
quiet.go()
t0 = time.monotonic()
assert al.closed_within(quiet.s, 10), "an idle client was kept"
took = time.monotonic() - t0
qt.log("idle client closed after %.1f s" % took)
assert 1.5 < took < 6, "closed after %.1f s, idle-timeout is 2" % took
quiet.close()

busy = qt.RawClient(sock)
busy.go()
busy.s.sendall(qt.nbd_request(qt.NBD_CMD_WRITE, 1, 0, 4096) + b"\x5a" * 4096)
assert busy.simple_reply() == (0, 1)
t0 = time.monotonic()
cookie = 2
while time.monotonic() - t0 < 5:
    busy.s.sendall(qt.nbd_request(qt.NBD_CMD_READ, cookie, 0, 4096))
    assert busy.simple_reply() == (0, cookie), "busy client: no reply"
    assert busy.recv_exactly(4096) == b"\x5a" * 4096
    cookie += 1
    time.sleep(0.5)
# A request whose payload comes slowly is not idleness either.
busy.s.sendall(qt.nbd_request(qt.NBD_CMD_WRITE, 99, 4096, 4096))
for i in range(6):
    busy.s.sendall(b"\x11" * 512)
    time.sleep(0.5)
busy.s.sendall(b"\x11" * 1024)
assert busy.simple_reply() == (0, 99), "slow payload cut off"
busy.s.sendall(qt.nbd_request(qt.NBD_CMD_DISC, 100, 0, 0))
busy.close()
# A silent handshake is --handshake-limit's business, not this one's.
c = qt.RawClient(sock)
c.client_flags()
time.sleep(3)
r = c.option(qt.NBD_OPT_GO, struct.pack(">I", 4) + b"disk" +
             struct.pack(">H", 0))
assert r[-1][0] == qt.NBD_REP_ACK, "GO after 3 s of handshake: %r" % r
c.close()
assert srv.stop() == 0
log = srv.stderr()
assert log.count("idle for 2 s, disconnecting") == 1, \
    "want exactly one idle disconnection"

# Without --idle-timeout a silent client stays.
srv = qt.Server(img)
c = qt.RawClient(srv.sock)
c.go()
assert not al.closed_within(c.s, 3), "closed without --idle-timeout"
c.close()
assert srv.stop() == 0

# Bad values.
for arg in ("--idle-timeout=-1", "--max-connections=x",
            "--max-connections-per-client=1.5"):
    st, out = qt.run(qt.QNBD, arg, img, check=False)
    assert st == 1 and arg.split("=")[0] in out, arg
qt.check_image(img)
print("ok")
