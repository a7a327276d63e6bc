"""test-tcp.py: qnbd serves over TCP on 127.0.0.1 (-b, -p) as it does on a
Unix socket: two connections write and read, and the image checks clean.
"""

import qnbdtest as qt

nbd = qt.require_nbd()
qt.requires("qemu-img")

SIZE = 32 * 1024 * 1024

tmp = qt.tmpdir()
img = qt.create_image(tmp, "disk.qcow2", SIZE)
srv = qt.Server(img, tcp=True)
qt.log("uri: %s" % srv.uri)
shadow = qt.Shadow(SIZE)

h1 = srv.connect()
h2 = srv.connect()
assert h1.get_size() == SIZE
for i in range(32):
    off = i * 1000003 % (SIZE - 70000)
    data = qt.pattern(off, 70000, i)
    h = h1 if i % 2 else h2
    h.pwrite(data, off)
    shadow.write(off, data)
h1.flush()
shadow.verify(h2)
h1.shutdown()
h2.shutdown()

qt.stop_and_compare(srv, img, shadow)
qt.log("PASS")
