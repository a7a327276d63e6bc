"""test-cache-size.py: the exports of one daemon share one metadata-cache
budget (cache-size in [server], --cache-size).

40 exports with 4 KiB clusters (an L2 table maps 2 MiB) under a budget a
little larger than their reservations: a client writes into 32 tables of
each, one export after the other, then reads everything back, so that
every export's tables were given to the others and read again.  The
images are clean after.  Then a budget too small for the exports'
reservations stops the start with a message naming cache-size, and bad
values are refused.
"""

import os
import subprocess

import qnbdtest as qt

nbd = qt.require_nbd()
qt.requires("qemu-img")

N = 40
SIZE = 256 * 1024 * 1024
tmp = qt.tmpdir()
sock = os.path.join(tmp, "cs.sock")
pidfile = os.path.join(tmp, "cs.pid")

imgs = [qt.create_image(tmp, "d%d.qcow2" % i, SIZE, cluster_size=4096)
        for i in range(N)]


def write_cfg(name, cache_size):
    path = os.path.join(tmp, name)
    with open(path, "w") as f:
        f.write("[server]\nsocket = %s\npid-file = %s\ncache-size = %s\n"
                % (sock, pidfile, cache_size))
        for i, img in enumerate(imgs):
            f.write("[export d%d]\nfile = %s\n" % (i, img))
    return path



# Each reserves about 13 KiB (two L2 tables and a refcount block of 4 KiB
# with their bookkeeping): 40 take about half of the 1 MiB.
srv = qt.ConfigServer(write_cfg("ok.conf", "1M"),
                      sock, pidfile)
offsets = [(k * 8 + 3) * 1024 * 1024 + 4096 * k for k in range(32)]


def connect(i):
    h = nbd.NBD()
    h.set_export_name("d%d" % i)
    h.connect_unix(sock)
    return h


for i in range(N):
    h = connect(i)
    for off in offsets:
        h.pwrite(qt.pattern(off, 4096, i), off)
    h.flush()
    h.shutdown()
for i in range(N):
    h = connect(i)
    for off in offsets:
        qt.assert_same(h.pread(4096, off), qt.pattern(off, 4096, i), off)
    h.shutdown()
assert srv.stop() == 0
for img in imgs[:4]:
    qt.check_image(img)
qt.log("%d exports served under cache-size = 1M" % N)

# Too small for the reservations: nothing is served, and the message says
# which setting.
r = subprocess.run([qt.QNBD, "-C", write_cfg("small.conf", "64K")],
                   capture_output=True, text=True, timeout=60)
qt.log(r.stderr.strip())
assert r.returncode == 1, r.returncode
assert "cache-size" in r.stderr, r.stderr
assert not os.path.exists(sock)

# Bad values, in the file and on the command line.
r = subprocess.run([qt.QNBD, "-C", write_cfg("bad.conf", "lots")],
                   capture_output=True, text=True, timeout=30)
assert r.returncode == 1 and "bad.conf:4: key 'cache-size'" in r.stderr, \
    r.stderr
r = subprocess.run([qt.QNBD, "--cache-size=0", "-k", sock, imgs[0]],
                   capture_output=True, text=True, timeout=30)
assert r.returncode == 1 and "--cache-size" in r.stderr, r.stderr
assert not os.path.exists(sock)

# One image on the command line, with its own --cache-size.
srv = qt.Server(imgs[0], "--cache-size=128K")
h = nbd.NBD()
h.connect_unix(srv.sock)
qt.assert_same(h.pread(4096, offsets[5]), qt.pattern(offsets[5], 4096, 0),
               offsets[5])
h.shutdown()
assert srv.stop() == 0
