"""test-memory-budget.py: --max-memory bounds what all clients together
make the daemon hold.

With --max-memory=64M, CLIENTS raw clients each send READs of 32 MiB
(MAX_PAYLOAD) and never read a reply.  Each connection alone may hold
about 96 MiB (its own limits), so without the daemon-wide budget they
took 8 x 64 MiB; with it, the daemon stops parsing their requests once
they hold 64 MiB between them.  Its RSS is sampled all along and must
stay under BUDGET_MB + SLACK_MB (engine caches, read buffers, the
interpreter-free base of the daemon; more under AddressSanitizer:
qnbdtest.rss_bound_kib).

While they are stuck, a libnbd client writes and reads back 128 KiB
pieces (a connection with nothing in flight may always start a small
request) within a deadline.  Then the stuck clients hang up, and a
client that streams 32 MiB reads is served, one after the other: the
large buffers are reused, so the RSS stays near what is in flight.
"""

import threading
import time

import qnbdtest as qt

nbd = qt.require_nbd()
qt.requires("qemu-img")
qt.seed()

MiB = 1024 * 1024
SIZE = 256 * MiB
BIG_READ = 32 * MiB
CLIENTS = 8
BUDGET_MB = 64
SLACK_MB = 48
STALL = 2.0                     # seconds without progress: socket full
DEADLINE = 60.0

tmp = qt.tmpdir()
img = qt.create_image(tmp, "disk.qcow2", SIZE, cluster_size=65536)
srv = qt.Server(img, "--max-memory=%dM" % BUDGET_MB)
bound = qt.rss_bound_kib(srv.pid, BUDGET_MB + SLACK_MB)
peak = [0]


def sample():
    r = max(qt.proc_status_kib(srv.pid, "VmRSS"),
            qt.proc_status_kib(srv.pid, "VmHWM"))
    peak[0] = max(peak[0], r)
    if r > bound:
        srv.proc.kill()
        srv.proc.wait()
        raise AssertionError("daemon RSS %d MiB > %d MiB with clients that "
                             "do not read (daemon killed)" %
                             (r // 1024, bound // 1024))


blob = b"".join(qt.nbd_request(qt.NBD_CMD_READ, i + 1,
                               (i % 8) * BIG_READ, BIG_READ)
                for i in range(2000))
stuck = []
for i in range(CLIENTS):
    c = qt.RawClient(srv.sock)
    c.export_name()
    c.s.setblocking(False)
    stuck.append([c, 0, time.monotonic()])

t0 = time.monotonic()
while True:
    for s in stuck:
        try:
            n = s[0].s.send(blob[s[1]:s[1] + 65536])
            if n:
                s[1] += n
                s[2] = time.monotonic()
        except BlockingIOError:
            pass
    sample()
    if all(time.monotonic() - s[2] > STALL for s in stuck):
        break
    assert time.monotonic() - t0 < DEADLINE, "clients still sending"
    time.sleep(0.05)
qt.log("%d clients stuck; daemon peak RSS %d MiB (bound %d MiB)" %
       (CLIENTS, peak[0] // 1024, bound // 1024))

# A well-behaved client is served beside them.
result = {}


def work():
    try:
        h = srv.connect()
        for i in range(16):
            off = 200 * MiB + i * 128 * 1024
            data = qt.pattern(off, 128 * 1024, 1)
            h.pwrite(data, off)
            qt.assert_same(h.pread(128 * 1024, off), data, off)
        h.flush()
        h.shutdown()
        result["ok"] = True
    except BaseException as e:
        result["error"] = e


t = threading.Thread(target=work, daemon=True)
t.start()
end = time.monotonic() + DEADLINE
while t.is_alive() and time.monotonic() < end:
    t.join(0.2)
    sample()
assert not t.is_alive(), "the libnbd client got no answer beside the " \
    "stuck clients"
if "error" in result:
    raise result["error"]
qt.log("libnbd client served; peak RSS %d MiB" % (peak[0] // 1024))

for s in stuck:
    s[0].close()
time.sleep(1.0)

# One client streaming 32 MiB reads, up to 4 in flight.
h = srv.connect()
buf = nbd.Buffer(BIG_READ)
cookies = []
for i in range(48):
    while h.aio_in_flight() >= 4:
        h.poll(1000)
        sample()
    cookies.append(h.aio_pread(buf, (i % 8) * BIG_READ))
while h.aio_in_flight() > 0:
    h.poll(1000)
for c in cookies:
    assert h.aio_command_completed(c)
sample()
h.shutdown()
qt.log("after streaming 32 MiB reads: daemon RSS %d MiB, peak %d MiB" %
       (qt.proc_status_kib(srv.pid, "VmRSS") // 1024, peak[0] // 1024))
assert srv.stop() == 0
