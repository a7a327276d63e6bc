"""test-reply-thread.py: replies written by the reply thread (sender.c).

When one run of the engine leaves replies for several connections, the
loop hands all but one connection's sendmsg to a second thread.  Here
16 libnbd connections keep 4 requests each in flight (random reads and
writes of 512 bytes to 256 KiB, each connection in its own part of the
disk, every read checked against a shadow), while raw clients make the
thread's life hard: "stuck" clients send 1 MiB READs and never read a
reply (the thread's sendmsg fills their socket and comes back with
EAGAIN, and the loop's watcher takes over), and "quitters" send reads and
hang up without waiting (sendmsg fails with EPIPE, or the connection ends
while its replies are with the thread: conn_set_dead takes them back).
The thread must have run (its name, qnbd-reply, in /proc/PID/task), the
stuck clients must get their first reply once they read, every read
must match, and then the server must exit 0 on SIGTERM and leave a
clean image holding exactly what was written.  Bounded: ROUNDS rounds
per connection, a deadline on all of it.
"""

import os
import random
import struct
import threading
import time

import qnbdtest as qt

nbd = qt.require_nbd()
qt.requires("qemu-img")
qt.seed()

CONNS = 16
DEPTH = 4
ROUNDS = 150
REGION = 2 * 1024 * 1024
MIB = 1024 * 1024
STUCK_AT = CONNS * REGION       # one MiB past the workers' parts
SIZE = STUCK_AT + MIB
NBD_CMD_FLAG_DF = 1 << 2
STUCK = 2
QUITTERS = 24
DEADLINE = 240


def thread_names(pid):
    names = []
    for t in os.listdir("/proc/%d/task" % pid):
        try:
            with open("/proc/%d/task/%s/comm" % (pid, t)) as f:
                names.append(f.read().strip())
        except OSError:
            pass
    return names


def worker(srv, k, shadow, errors):
    try:
        h = srv.connect()
        base = k * REGION
        rnd = random.Random(k)
        inflight = {}           # cookie -> (kind, offset, buffer)
        done = 0
        issued = 0
        busy = set()            # 4 KiB blocks with a request in flight
        while done < ROUNDS:
            while issued < ROUNDS and len(inflight) < DEPTH:
                length = rnd.choice((512, 4096, 4096, 65536, 262144))
                off = base + rnd.randrange(0, REGION - length + 1, 512)
                blocks = set(range(off // 4096, (off + length - 1) // 4096 + 1))
                if blocks & busy:
                    break       # wait: the shadow must stay exact
                busy |= blocks
                if rnd.random() < 0.4:
                    data = qt.pattern(off, length, issued)
                    shadow.write(off, data)
                    c = h.aio_pwrite(nbd.Buffer.from_bytearray(data), off)
                    inflight[c] = ("w", off, blocks, None)
                else:
                    b = nbd.Buffer(length)
                    c = h.aio_pread(b, off)
                    inflight[c] = ("r", off, blocks, b)
                issued += 1
            h.poll(1000)
            for c in list(inflight):
                if h.aio_command_completed(c):
                    kind, off, blocks, b = inflight.pop(c)
                    busy -= blocks
                    if kind == "r":
                        got = b.to_bytearray()
                        qt.assert_same(got, shadow.read(off, len(got)), off)
                    done += 1
        h.shutdown()
    except Exception as e:          # reported by the main thread
        errors.append("connection %d: %r" % (k, e))


def structured_client(srv):
    c = qt.RawClient(srv.sock)
    c.go(structured=True)
    return c


def stuck_client(srv, n):
    """Sends n 1 MiB READs (one data chunk each: DF) of the part nobody
    writes, and reads nothing (yet)."""
    c = structured_client(srv)
    c.s.settimeout(5)
    for i in range(n):
        c.s.sendall(qt.nbd_request(qt.NBD_CMD_READ, i, STUCK_AT, MIB,
                                   NBD_CMD_FLAG_DF))
    return c


def quitters(srv, stop):
    n = 0
    while not stop.is_set() and n < QUITTERS:
        c = structured_client(srv)
        for i in range(8):
            c.s.sendall(qt.nbd_request(qt.NBD_CMD_READ, i,
                                       random.randrange(0, STUCK_AT, 65536),
                                       65536))
        time.sleep(random.random() * 0.02)
        c.close()
        n += 1


tmp = qt.tmpdir()
img = qt.create_image(tmp, "reply.qcow2", SIZE, cluster_size=65536)
srv = qt.Server(img)
shadow = qt.Shadow(SIZE)
start = time.monotonic()
h = srv.connect()
h.pwrite(qt.pattern(STUCK_AT, MIB), STUCK_AT)
shadow.write(STUCK_AT, qt.pattern(STUCK_AT, MIB))
h.shutdown()

stuck = [stuck_client(srv, 40) for _ in range(STUCK)]
errors = []
stop = threading.Event()
threads = [threading.Thread(target=worker, args=(srv, k, shadow, errors))
           for k in range(CONNS)]
quit_thread = threading.Thread(target=quitters, args=(srv, stop))
for t in threads:
    t.start()
quit_thread.start()
for t in threads:
    t.join(max(1, DEADLINE - (time.monotonic() - start)))
    assert not t.is_alive(), "a connection did not finish in %d s" % DEADLINE
stop.set()
quit_thread.join(30)
assert not errors, "; ".join(errors)
assert srv.alive(), "qnbd died"

names = thread_names(srv.pid)
qt.log("threads: %s" % " ".join(sorted(names)))
assert "qnbd-reply" in names, "no reply thread: the loop wrote every reply"

# The stuck clients' first reply is whole and right once they read.
for c in stuck:
    c.s.settimeout(20)
    magic, flags, rtype, cookie, length = struct.unpack(">IHHQI",
                                                        c.recv_exactly(20))
    assert magic == 0x668e33ef, "bad structured reply magic 0x%x" % magic
    assert rtype == 1 and length == 8 + MIB, \
        "chunk type %d of %d bytes, want one OFFSET_DATA" % (rtype, length)
    data = c.recv_exactly(length)
    off = struct.unpack(">Q", data[:8])[0]
    assert off == STUCK_AT, "chunk at offset %d" % off
    qt.assert_same(data[8:], shadow.read(off, MIB), off)
    c.close()

h = srv.connect()
shadow.verify(h)
h.shutdown()
qt.log("%d connections x %d requests in %.1f s" %
       (CONNS, ROUNDS, time.monotonic() - start))
qt.stop_and_compare(srv, img, shadow)
qt.log("PASS")
