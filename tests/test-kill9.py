#!/usr/bin/env python3
"""test-kill9.py: qnbd killed with SIGKILL at random moments under a
multi-connection write load, again and again.  After every kill the image
must pass qemu-img check with no errors (leaked clusters are allowed), and
every write that was acknowledged before a completed FLUSH must read back.

Each connection writes into its own slots (64 KiB each); a slot whose write
has been made durable by a flush is never written again, so what it must
hold afterwards is known exactly.
"""

import os
import random
import signal
import threading
import time

import qnbdtest as qt

nbd = qt.require_nbd()
qt.requires("qemu-img")
qt.seed()

ROUNDS = int(os.environ.get("KILL9_ROUNDS", "6"))
CONNS = 4
SLOT = 64 * 1024
SIZE = 256 << 20
SLOTS_PER_CONN = SIZE // SLOT // CONNS

tmp = qt.tmpdir()
img = qt.create_image(tmp, "kill9.qcow2", SIZE, cluster_size=4096)

durable = {}            # slot -> (offset, bytes): must read back exactly
lock = threading.Lock()


def writer(conn_index, h, stop):
    """Write random pieces into this connection's free slots, flushing now
    and then; record what each completed flush made durable."""
    first = conn_index * SLOTS_PER_CONN
    free = [s for s in range(first, first + SLOTS_PER_CONN)
            if s not in durable]
    random.shuffle(free)
    completed = []          # (slot, offset, data) acknowledged, not flushed
    busy = set()
    try:
        while not stop.is_set() and free:
            # Up to 16 writes in flight.
            while h.aio_in_flight() < 16 and free:
                slot = free.pop()
                off = slot * SLOT + random.randrange(0, SLOT // 512) * 512
                length = random.randrange(1, (slot + 1) * SLOT - off + 1)
                data = os.urandom(length)
                busy.add(slot)

                def done(err, slot=slot, off=off, data=data):
                    if err.value == 0:
                        completed.append((slot, off, data))
                    busy.discard(slot)
                    return 1
                h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), off,
                             completion=lambda e, d=done: d(e))
            if random.random() < 0.15:
                covered = list(completed)
                completed.clear()

                def flushed(err, covered=covered):
                    if err.value == 0:
                        with lock:
                            for slot, off, data in covered:
                                durable[slot] = (off, data)
                    return 1
                h.aio_flush(completion=lambda e, f=flushed: f(e))
            h.poll(-1)
    except nbd.Error:
        pass                # the server was killed under us


for rnd in range(ROUNDS):
    srv = qt.Server(img)
    handles = [srv.connect() for _ in range(CONNS)]
    stop = threading.Event()
    threads = [threading.Thread(target=writer, args=(i, h, stop))
               for i, h in enumerate(handles)]
    for t in threads:
        t.start()
    time.sleep(random.uniform(0.2, 1.5))
    os.kill(srv.pid, signal.SIGKILL)
    stop.set()
    for t in threads:
        t.join()
    srv.proc.wait()
    srv.status = -9
    for h in handles:
        try:
            h.shutdown()
        except nbd.Error:
            pass

    # The killed server's locks go with its last reference to the file,
    # which io_uring's teardown may hold for a moment after the process
    # was reaped: wait for them, as a restart by systemd would.
    deadline = time.monotonic() + 20
    while True:
        status, out = qt.run("qemu-img", "check", "-f", "qcow2", img,
                             check=False)
        if "Failed to get shared" not in out or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    qt.log("\n".join(l for l in out.splitlines()
                      if not l.startswith("Leaked cluster")))
    assert status in (0, 3), "round %d: qemu-img check status %d" % (rnd, status)
    assert "ERROR" not in out and "corrupt" not in out.lower(), \
        "round %d: corruption reported" % rnd

    # Everything made durable so far reads back.
    srv = qt.Server(img, "-r")
    h = srv.connect()
    with lock:
        items = list(durable.items())
    for slot, (off, data) in items:
        got = h.pread(len(data), off)
        qt.assert_same(got, data, off)
    h.shutdown()
    assert srv.stop() == 0
    qt.log("round %d: %d durable slots verified" % (rnd, len(items)))

assert durable, "no flush completed in any round: the test proved nothing"
qt.log("ok: %d kills, %d durable writes verified" % (ROUNDS, len(durable)))
