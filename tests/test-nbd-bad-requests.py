"""test-nbd-bad-requests.py: misuse of metadata contexts and of the newer
commands gets an error and nothing else, seen on a raw socket.

Handshake (each answered, the haggling goes on):
- NBD_OPT_SET_META_CONTEXT before NBD_OPT_STRUCTURED_REPLY: ERR_INVALID;
- a SET/LIST_META_CONTEXT whose lengths do not add up: ERR_INVALID;
- one naming an unknown export: ERR_UNKNOWN;
- a SET that fails drops the contexts an earlier SET chose;
- the transmission flags: TRIM, WRITE_ZEROES, FAST_ZERO, CACHE on a
  writable export; DF only with structured replies.
Transmission (each an error reply, the connection goes on):
- BLOCK_STATUS without a context, or without structured replies: EINVAL;
- flags a command does not take (NO_HOLE on TRIM, REQ_ONE on READ, DF
  without structured replies): EINVAL;
- TRIM, WRITE_ZEROES, CACHE, BLOCK_STATUS past the end: EINVAL (ENOSPC for
  WRITE_ZEROES); of length 0: success (EINVAL for BLOCK_STATUS);
- a structured sparse READ on the wire: hole and data chunks, in order,
  NBD_REPLY_FLAG_DONE on the last one only;
- with structured replies, a command other than READ and BLOCK_STATUS
  that succeeds gets a simple reply (the protocol allows either; a client
  reads it in one go, where a chunk costs it a second read), and one that
  fails a structured error (which carries a message).
"""

import socket
import struct

import qnbdtest as qt

nbd = qt.require_nbd()
qt.requires("qemu-img", "qemu-io")

SIZE = 4 * 1024 * 1024

IHAVEOPT = b"IHAVEOPT"
REP_MAGIC = 0x0003e889045565a9
REQUEST_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698
STRUCTURED_MAGIC = 0x668e33ef

OPT_ABORT, OPT_GO = 2, 7
OPT_STRUCTURED_REPLY, OPT_LIST_META, OPT_SET_META = 8, 9, 10
REP_ACK, REP_INFO, REP_META_CONTEXT = 1, 3, 4
REP_ERR_INVALID = (1 << 31) | 3
REP_ERR_UNKNOWN = (1 << 31) | 6

CMD_READ, CMD_WRITE, CMD_FLUSH = 0, 1, 3
CMD_TRIM, CMD_CACHE, CMD_WRITE_ZEROES, CMD_BLOCK_STATUS = 4, 5, 6, 7
FLAG_NO_HOLE, FLAG_DF, FLAG_REQ_ONE = 2, 4, 8
TYPE_NONE, TYPE_DATA, TYPE_HOLE, TYPE_BLOCK_STATUS, TYPE_ERROR = \
    0, 1, 2, 5, (1 << 15) | 1
EINVAL, ENOSPC = 22, 28

EF_SEND_TRIM, EF_SEND_WRITE_ZEROES, EF_SEND_DF = 1 << 5, 1 << 6, 1 << 7
EF_SEND_CACHE, EF_SEND_FAST_ZERO = 1 << 10, 1 << 11


def recv_exactly(s, n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise AssertionError("server hung up after %d of %d bytes" %
                                 (len(buf), n))
        buf += chunk
    return buf


class Raw:
    """A raw NBD client on the server's Unix socket."""

    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(20)
        self.s.connect(path)
        recv_exactly(self.s, 18)
        self.s.sendall(struct.pack(">I", 3))    # fixed newstyle, no zeroes
        self.cookie = 0

    def option(self, opt, data=b""):
        """Send an option; return its replies [(type, data)] up to the
        final one (ACK or an error)."""
        self.s.sendall(IHAVEOPT + struct.pack(">II", opt, len(data)) + data)
        replies = []
        while True:
            magic, o, rtype, n = struct.unpack(">QIII",
                                               recv_exactly(self.s, 20))
            assert magic == REP_MAGIC and o == opt, "bad option reply"
            replies.append((rtype, recv_exactly(self.s, n)))
            if rtype == REP_ACK or rtype & (1 << 31):
                return replies

    def meta(self, opt, name, queries, raw=None):
        data = struct.pack(">I", len(name)) + name + \
            struct.pack(">I", len(queries))
        for q in queries:
            data += struct.pack(">I", len(q)) + q
        return self.option(opt, raw if raw is not None else data)

    def go(self):
        replies = self.option(OPT_GO, struct.pack(">IH", 0, 0))
        assert replies[-1][0] == REP_ACK, "GO failed: %r" % replies
        for rtype, data in replies:
            if rtype == REP_INFO and struct.unpack(">H", data[:2])[0] == 0:
                _, size, eflags = struct.unpack(">HQH", data)
                assert size == SIZE
                return eflags
        raise AssertionError("no NBD_INFO_EXPORT")

    def request(self, cmd, offset, length, flags=0):
        self.cookie += 1
        self.s.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd,
                                   self.cookie, offset, length))
        return self.cookie

    def simple_reply(self):
        magic, err, cookie = struct.unpack(">IIQ", recv_exactly(self.s, 16))
        assert magic == SIMPLE_MAGIC, "not a simple reply: 0x%x" % magic
        assert cookie == self.cookie
        return err

    def chunks(self):
        """Every chunk of the reply to the last request: [(flags, type,
        payload)], the last with NBD_REPLY_FLAG_DONE; a simple reply
        (which must be a success) as [(1, None, b"")]."""
        out = []
        while True:
            head = recv_exactly(self.s, 4)
            if not out and struct.unpack(">I", head)[0] == SIMPLE_MAGIC:
                err, cookie = struct.unpack(">IQ", recv_exactly(self.s, 12))
                assert cookie == self.cookie
                assert err == 0, "an error (%d) in a simple reply" % err
                return [(1, None, b"")]
            magic, flags, rtype, cookie, n = struct.unpack(
                ">IHHQI", head + recv_exactly(self.s, 16))
            assert magic == STRUCTURED_MAGIC, "not a chunk: 0x%x" % magic
            assert cookie == self.cookie
            out.append((flags, rtype, recv_exactly(self.s, n)))
            if flags & 1:
                return out

    def error_of(self, chunks):
        """The error of a structured reply (0: success)."""
        for flags, rtype, payload in chunks:
            if rtype == TYPE_ERROR:
                return struct.unpack(">I", payload[:4])[0]
        return 0

    def close(self):
        self.s.close()


tmp = qt.tmpdir()
img = qt.create_image(tmp, "disk.qcow2", SIZE, cluster_size=65536)
qt.run("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 64k",
       "-c", "write -P 0x22 192k 64k", img)
srv = qt.Server(img)

# --- Handshake. ---
c = Raw(srv.sock)
r = c.meta(OPT_SET_META, b"", [b"base:allocation"])
assert [t for t, _ in r] == [REP_ERR_INVALID], \
    "SET before STRUCTURED_REPLY: %r" % r
# LIST is allowed before (the protocol only says SHOULD NOT).
r = c.meta(OPT_LIST_META, b"", [])
assert [t for t, _ in r] == [REP_META_CONTEXT] * 2 + [REP_ACK], r
assert c.option(OPT_STRUCTURED_REPLY)[0][0] == REP_ACK
for opt in (OPT_LIST_META, OPT_SET_META):
    good = struct.pack(">I", 0) + struct.pack(">I", 1) + \
        struct.pack(">I", 15) + b"base:allocation"
    for bad in (b"", good[:6], good[:-1], good + b"x",
                struct.pack(">I", 100) + good[4:],
                good[:8] + struct.pack(">I", 16) + good[12:]):
        r = c.meta(opt, b"", [], raw=bad)
        assert [t for t, _ in r] == [REP_ERR_INVALID], \
            "malformed %r: %r" % (bad, r)
    r = c.meta(opt, b"nosuchexport", [b"base:allocation"])
    assert [t for t, _ in r] == [REP_ERR_UNKNOWN], r
# A good SET, then a failed one: no context is left.
r = c.meta(OPT_SET_META, b"", [b"base:allocation", b"qemu:allocation-depth"])
assert [t for t, _ in r] == [REP_META_CONTEXT] * 2 + [REP_ACK], r
ids = {d[4:]: struct.unpack(">I", d[:4])[0] for t, d in r[:2]}
assert len(set(ids.values())) == 2, "context ids not unique: %r" % ids
r = c.meta(OPT_SET_META, b"", [], raw=b"\0\0")
assert [t for t, _ in r] == [REP_ERR_INVALID]
eflags = c.go()
for bit, what in ((EF_SEND_TRIM, "TRIM"), (EF_SEND_WRITE_ZEROES,
                  "WRITE_ZEROES"), (EF_SEND_FAST_ZERO, "FAST_ZERO"),
                  (EF_SEND_CACHE, "CACHE"), (EF_SEND_DF, "DF")):
    assert eflags & bit, "%s not advertised: 0x%x" % (what, eflags)

# --- Transmission, structured, no context left. ---
c.request(CMD_BLOCK_STATUS, 0, 65536)
assert c.error_of(c.chunks()) == EINVAL, "BLOCK_STATUS without a context"
for cmd, flags, offset, length, want, what in (
        (CMD_TRIM, FLAG_NO_HOLE, 0, 65536, EINVAL, "NO_HOLE on TRIM"),
        (CMD_READ, FLAG_REQ_ONE, 0, 512, EINVAL, "REQ_ONE on READ"),
        (CMD_CACHE, FLAG_DF, 0, 512, EINVAL, "DF on CACHE"),
        (CMD_TRIM, 0, SIZE - 512, 1024, EINVAL, "TRIM past the end"),
        (CMD_CACHE, 0, SIZE - 512, 1024, EINVAL, "CACHE past the end"),
        (CMD_WRITE_ZEROES, 0, SIZE, 512, ENOSPC, "WRITE_ZEROES past the end"),
        (CMD_TRIM, 0, 4096, 0, 0, "TRIM of 0 bytes"),
        (CMD_WRITE_ZEROES, 0, 4096, 0, 0, "WRITE_ZEROES of 0 bytes"),
        (CMD_CACHE, 0, 4096, 0, 0, "CACHE of 0 bytes"),
        (CMD_CACHE, 0, 0, SIZE, 0, "CACHE of everything"),
        (CMD_READ, FLAG_DF, 0, 512, 0, "DF READ")):
    c.request(cmd, offset, length, flags)
    ch = c.chunks()
    err = c.error_of(ch)
    assert err == want, "%s: error %d, want %d" % (what, err, want)
    if cmd != CMD_READ:
        assert (ch[0][1] is None) == (err == 0), \
            "%s: %s reply" % (what, "a structured" if ch[0][1] is not None
                              else "a simple")

# Successful writes, zeroes, trims and flushes: simple replies.
for cmd, length in ((CMD_WRITE, 4096), (CMD_WRITE_ZEROES, 4096),
                    (CMD_TRIM, 65536), (CMD_FLUSH, 0)):
    c.request(cmd, 1024 * 1024 if length else 0, length)
    if cmd == CMD_WRITE:
        c.s.sendall(b"\x5a" * length)
    assert c.chunks() == [(1, None, b"")], "command %d: not simple" % cmd
c.request(CMD_READ, 1024 * 1024, 4096)
ch = c.chunks()
assert ch in ([(1, TYPE_DATA, struct.pack(">Q", 1024 * 1024) + bytes(4096))],
              [(1, TYPE_HOLE, struct.pack(">QI", 1024 * 1024, 4096))]), \
    "WRITE, WRITE_ZEROES, TRIM: the range does not read as zeroes: %r" % ch

# A sparse READ on the wire: data, hole, data, hole; DONE on the last.
c.request(CMD_READ, 0, 512 * 1024)
ch = c.chunks()
qt.log("sparse read: %s" % [(f, t, len(p)) for f, t, p in ch])
assert [t for f, t, p in ch] == [TYPE_DATA, TYPE_HOLE, TYPE_DATA, TYPE_HOLE]
assert [f for f, t, p in ch] == [0, 0, 0, 1]
pos = 0
for f, t, p in ch:
    off = struct.unpack(">Q", p[:8])[0]
    assert off == pos
    pos += len(p) - 8 if t == TYPE_DATA else struct.unpack(">I", p[8:12])[0]
assert pos == 512 * 1024
c.close()

# --- A SET_META_CONTEXT, then block status on the wire. ---
c = Raw(srv.sock)
c.option(OPT_STRUCTURED_REPLY)
r = c.meta(OPT_SET_META, b"", [b"qemu:allocation-depth", b"base:allocation"])
ids = {d[4:]: struct.unpack(">I", d[:4])[0] for t, d in r[:2]}
c.go()
c.request(CMD_BLOCK_STATUS, 0, 1024 * 1024, FLAG_REQ_ONE)
ch = c.chunks()
assert [f for f, t, p in ch] == [0, 1] and \
    all(t == TYPE_BLOCK_STATUS for f, t, p in ch), ch
got = {}
for f, t, p in ch:
    cid, length, status = struct.unpack(">III", p)
    got[cid] = (length, status)
assert got == {ids[b"base:allocation"]: (65536, 0),
               ids[b"qemu:allocation-depth"]: (65536, 1)}, got
c.request(CMD_BLOCK_STATUS, 0, 0)
assert c.error_of(c.chunks()) == EINVAL, "BLOCK_STATUS of 0 bytes"
c.request(CMD_BLOCK_STATUS, SIZE - 512, 1024)
assert c.error_of(c.chunks()) == EINVAL, "BLOCK_STATUS past the end"
c.close()

# --- Simple replies: no BLOCK_STATUS, no DF. ---
c = Raw(srv.sock)
eflags = c.go()
assert not eflags & EF_SEND_DF, "DF advertised without structured replies"
c.request(CMD_BLOCK_STATUS, 0, 65536)
assert c.simple_reply() == EINVAL
c.request(CMD_READ, 0, 512, FLAG_DF)
assert c.simple_reply() == EINVAL
c.request(CMD_WRITE_ZEROES, 65536, 65536, FLAG_NO_HOLE)
assert c.simple_reply() == 0
c.request(CMD_READ, 65536, 512)
assert c.simple_reply() == 0 and recv_exactly(c.s, 512) == bytes(512)
c.close()

assert srv.stop() == 0
qt.check_image(img)
qt.log("PASS")
