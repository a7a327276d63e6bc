"""test-log-escape.py: strings from clients are escaped in the log.

A client asks (with NBD_OPT_GO, then NBD_OPT_EXPORT_NAME) for exports
whose names hold a newline followed by a forged log line, and a terminal
escape sequence.  The daemon runs with -vv so that it logs the options
and the unknown names; its stderr must hold no line that a client wrote
(every line starts with "qnbd: ") and no ESC byte, and the names must be
there, escaped.
"""

import struct

import qnbdtest as qt

qt.requires("qemu-img")

FORGED = b"\nqnbd: client 99: export 'root' granted"
ESCAPE = b"\x1b[31mred\x1b[0m"

tmp = qt.tmpdir()
img = qt.create_image(tmp, "disk.qcow2", 16 << 20)
srv = qt.Server(img, "-vv")

c = qt.RawClient(srv.sock)
c.client_flags()
name = b"x" + FORGED + ESCAPE
replies = c.option(qt.NBD_OPT_GO,
                   struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
assert replies[-1][0] & (1 << 31), "GO of an unknown export: %r" % replies
name = b"y" + ESCAPE + FORGED
c.s.sendall(qt.NBD_IHAVEOPT + struct.pack(">II", qt.NBD_OPT_EXPORT_NAME,
                                          len(name)) + name)
assert c.s.recv(1) == b"", "the server kept an unknown EXPORT_NAME"
c.close()

# Another client is still served.
h = qt.RawClient(srv.sock)
h.export_name()
h.close()
assert srv.stop() == 0

with open(srv.errfile, "rb") as f:
    log = f.read()
qt.log(log.decode("ascii", "replace"))
assert b"\x1b" not in log, "an ESC byte reached the log"
for line in log.split(b"\n"):
    assert line == b"" or line.startswith(b"qnbd: "), \
        "a line the daemon did not write: %r" % line
assert b"\\x0aqnbd: client 99" in log, "the forged line is not in the log, escaped"
assert b"\\x1b[31m" in log, "the escape sequence is not in the log, escaped"
