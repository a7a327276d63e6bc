"""test-errors.py: bad requests get an error reply and the connection goes
on; broken streams get a disconnect and nothing else; other clients keep
being served throughout.

- a read past the end fails with EINVAL, a write past the end with ENOSPC
  (NBD spec), and so do requests whose offset + length wraps around; the
  same connection then keeps working;
- a write to a read-only export (-r) fails with EPERM;
- raw sockets sending junk at each stage of the handshake and of the
  transmission phase, or hanging up in the middle of a request, are
  disconnected, while a libnbd client keeps reading and writing;
- NBD_CMD_DISC sent behind writes still in flight: the writes land;
- after all that, SIGTERM makes qnbd exit 0 and the image checks clean.
"""

import errno
import os
import socket
import struct

import qnbdtest as qt

nbd = qt.require_nbd()
qt.requires("qemu-img")

SIZE = 8 * 1024 * 1024 + 3 * 512

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = b"IHAVEOPT"
OPT_EXPORT_NAME = 1
REQUEST_MAGIC = 0x25609513
FLAG_C_FIXED_NEWSTYLE = 1
FLAG_C_NO_ZEROES = 2


def expect_error(fn, want, what):
    try:
        fn()
    except nbd.Error as e:
        qt.log("%s: %s" % (what, e))
        assert e.errnum == want, "%s: errno %s (%s), want %s" % \
            (what, e.errnum, e.errno, errno.errorcode[want])
        return
    raise AssertionError("%s: succeeded, want %s" % (what, errno.errorcode[want]))


def still_works(h, shadow, tag):
    """The libnbd connection h reads and writes correctly."""
    off = 4096 * (tag % 1000) + 7
    data = qt.pattern(off, 5000, tag)
    h.pwrite(data, off)
    shadow.write(off, data)
    qt.assert_same(h.pread(5000, off), data, off)
    qt.assert_same(h.pread(4096, 0), shadow.read(0, 4096), 0)


def recv_exactly(s, n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise AssertionError("server hung up after %d of %d bytes" %
                                 (len(buf), n))
        buf += chunk
    return buf


def raw_connect(sock_path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(sock_path)
    greeting = recv_exactly(s, 18)
    assert greeting[:16] == NBDMAGIC + IHAVEOPT, "bad greeting %r" % greeting
    return s


def expect_hangup(s, what):
    """Drain whatever the server sends (an error reply is fine) until it
    closes the connection; fail if it is still open after 10 s."""
    total = 0
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            total += len(chunk)
    except socket.timeout:
        raise AssertionError("%s: server did not disconnect within 10s" % what)
    except ConnectionResetError:
        pass
    finally:
        s.close()
    qt.log("%s: disconnected (after %d bytes)" % (what, total))


def raw_transmission(sock_path):
    """A raw socket in the transmission phase of the default export,
    reached with NBD_OPT_EXPORT_NAME."""
    s = raw_connect(sock_path)
    s.sendall(struct.pack(">I", FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES))
    s.sendall(IHAVEOPT + struct.pack(">II", OPT_EXPORT_NAME, 0))
    size, flags = struct.unpack(">QH", recv_exactly(s, 10))
    assert size == SIZE, "export size %d, want %d" % (size, SIZE)
    return s


tmp = qt.tmpdir()
img = qt.create_image(tmp, "disk.qcow2", SIZE)
shadow = qt.Shadow(SIZE)
srv = qt.Server(img)
h = srv.connect(strict=False)
assert h.get_size() == SIZE

# --- Requests past the end: an error, and the connection goes on. ---
still_works(h, shadow, 1)
expect_error(lambda: h.pread(512, SIZE), errno.EINVAL, "read at the end")
expect_error(lambda: h.pread(1024, SIZE - 512), errno.EINVAL,
             "read across the end")
expect_error(lambda: h.pread(1024, (1 << 64) - 512), errno.EINVAL,
             "read with offset+length wrapping")
still_works(h, shadow, 2)
expect_error(lambda: h.pwrite(b"x" * 512, SIZE), errno.ENOSPC,
             "write at the end")
expect_error(lambda: h.pwrite(b"y" * 1024, SIZE - 512), errno.ENOSPC,
             "write across the end")
expect_error(lambda: h.pwrite(b"z" * 1024, (1 << 64) - 512), errno.ENOSPC,
             "write with offset+length wrapping")
# A failed write must not have touched the last sector.
qt.assert_same(h.pread(512, SIZE - 512), shadow.read(SIZE - 512, 512),
               SIZE - 512)
still_works(h, shadow, 3)

# --- Junk from raw sockets, while h keeps working. ---
s = raw_connect(srv.sock)
s.sendall(b"\xff" * 4 + os.urandom(60))
expect_hangup(s, "unknown client flags")
still_works(h, shadow, 4)

s = raw_connect(srv.sock)
s.sendall(struct.pack(">I", FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES))
s.sendall(b"NOTANOPT" + os.urandom(56))
expect_hangup(s, "bad option magic")
still_works(h, shadow, 5)

s = raw_connect(srv.sock)
s.sendall(struct.pack(">I", FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES))
s.sendall(IHAVEOPT + struct.pack(">II", 6, 0xffffffff))   # 4 GiB option
# The server may hang up at once or read and drop the payload: either way,
# our end of file must end the connection, and nothing else may happen.
s.shutdown(socket.SHUT_WR)
expect_hangup(s, "oversized option")
still_works(h, shadow, 6)

s = raw_connect(srv.sock)
s.sendall(struct.pack(">I", FLAG_C_FIXED_NEWSTYLE))
s.close()
still_works(h, shadow, 7)

s = raw_transmission(srv.sock)
s.sendall(os.urandom(28))                 # a request with a bad magic
expect_hangup(s, "request with a bad magic")
still_works(h, shadow, 8)

s = raw_transmission(srv.sock)
# A write header promising 64 KiB, 100 bytes of it, then a hang-up.  None
# of it may reach the disk (checked at the end against the shadow).
s.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, 1, 1, 0, 65536))
s.sendall(b"\xaa" * 100)
s.close()
still_works(h, shadow, 9)

s = raw_transmission(srv.sock)
s.sendall(struct.pack(">IHHQ", REQUEST_MAGIC, 0, 0, 2))   # half a header
s.close()
still_works(h, shadow, 10)

# --- DISC behind writes in flight: the server handles them first. ---
h2 = srv.connect()
keep = []
for i in range(8):
    off = 2 * 1024 * 1024 + i * 70000
    data = qt.pattern(off, 70000, 20)
    shadow.write(off, data)
    b = nbd.Buffer.from_bytearray(data)
    keep.append(b)
    h2.aio_pwrite(b, off)
h2.shutdown()                       # NBD_CMD_DISC after the writes
h3 = srv.connect()
shadow.verify(h3)
h3.shutdown()
still_works(h, shadow, 11)

# --- A read-only export refuses writes with EPERM. ---
h.shutdown()
status = srv.stop()
assert status == 0, "qnbd exited with status %d" % status
qt.check_image(img)

ro = qt.Server(img, "-r")
h = ro.connect(strict=False)
assert h.is_read_only()
expect_error(lambda: h.pwrite(b"w" * 512, 0), errno.EPERM,
             "write on a read-only export")
shadow.verify(h)
h.shutdown()
status = ro.stop()
assert status == 0, "qnbd -r exited with status %d" % status

raw = tmp + "/shadow.raw"
shadow.save_raw(raw)
qt.compare_raw(raw, img)
qt.check_image(img)
qt.log("PASS")
