"""tests/qnbdtest.py: helpers for the python integration tests.

The python tests run under the interpreter configure chose (TEST_PYTHON,
normally /usr/bin/python3, which has libnbd's binding from python3-libnbd).
A test begins:

    import qnbdtest as qt
    nbd = qt.require_nbd()          # exit 77 when the binding is missing
    qt.requires("qemu-img")

    tmp = qt.tmpdir()
    img = qt.create_image(tmp, "disk.qcow2", 64 << 20, cluster_size=4096)
    srv = qt.Server(img)
    h = srv.connect()
    ...
    h.shutdown()
    assert srv.stop() == 0
    qt.check_image(img)

Every server is stopped by pid (SIGTERM, then SIGKILL) when the test exits,
and the temporary directory is removed (unless QNBD_TEST_KEEP=1).
"""

import atexit
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

SKIP = 77

HERE = os.path.dirname(os.path.abspath(__file__))
QNBD = os.environ.get("QNBD") or os.path.join(os.getcwd(), "..", "server", "qnbd")
TEST_AIO = os.environ.get("QNBD_TEST_AIO", "")
START_TIMEOUT = 20.0            # seconds to wait for the socket
STOP_TIMEOUT = 30.0             # seconds between SIGTERM and SIGKILL


def log(*args):
    """Print to the test log at once."""
    print(*args, flush=True)


def skip(why):
    """Skip the test (automake's exit status 77)."""
    log("SKIP: %s" % why)
    sys.exit(SKIP)


def require_nbd():
    """Return libnbd's python module, or skip the test."""
    try:
        import nbd
    except ImportError:
        skip("%s cannot import nbd (apt-get install python3-libnbd)" %
             sys.executable)
    return nbd


def requires(*cmds):
    """Skip the test unless every command is on PATH."""
    for c in cmds:
        if shutil.which(c) is None:
            skip("required program %r not found" % c)


def seed():
    """Seed the random generator and log the seed, so a failure can be
    replayed with QNBD_TEST_SEED=N."""
    s = os.environ.get("QNBD_TEST_SEED")
    s = int(s) if s else random.randrange(1 << 32)
    log("random seed: %d (replay with QNBD_TEST_SEED=%d)" % (s, s))
    random.seed(s)
    return s


# ---------------------------------------------------------------------
# Cleanup at exit, including when the harness's timeout sends SIGTERM.
# ---------------------------------------------------------------------

_servers = []
_tmpdirs = []


def _cleanup():
    for srv in reversed(_servers):
        srv._kill_quietly()
    if os.environ.get("QNBD_TEST_KEEP") == "1":
        for d in _tmpdirs:
            log("keeping %s" % d)
    else:
        for d in _tmpdirs:
            shutil.rmtree(d, ignore_errors=True)


atexit.register(_cleanup)
signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))


def tmpdir():
    """A fresh temporary directory, removed at exit."""
    d = tempfile.mkdtemp(prefix="qnbd-test.")
    _tmpdirs.append(d)
    return d


def free_port():
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------

def run(*cmd, check=True):
    """Run a command, log it and its output; return (status, output)."""
    log("+ " + " ".join(cmd))
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       universal_newlines=True)
    if p.stdout:
        log(p.stdout.rstrip("\n"))
    if check and p.returncode != 0:
        raise AssertionError("%s exited with status %d" % (cmd[0], p.returncode))
    return p.returncode, p.stdout


def create_image(directory, name, size, cluster_size=None, compat=None,
                 extra_opts=None):
    """qemu-img create -f qcow2 a new image; return its path."""
    path = os.path.join(directory, name)
    opts = []
    if cluster_size is not None:
        opts.append("cluster_size=%d" % cluster_size)
    if compat is not None:
        opts.append("compat=%s" % compat)
    if extra_opts:
        opts.append(extra_opts)
    cmd = ["qemu-img", "create", "-f", "qcow2"]
    if opts:
        cmd += ["-o", ",".join(opts)]
    cmd += [path, str(size)]
    run(*cmd)
    return path


def check_image(path):
    """qemu-img check must find no errors and no leaked clusters."""
    status, out = run("qemu-img", "check", "-f", "qcow2", path, check=False)
    assert "No errors were found on the image." in out, \
        "qemu-img check did not report a clean image"
    assert "leak" not in out.lower(), "qemu-img check reports leaked clusters"
    assert status == 0, "qemu-img check exited with status %d" % status


def compare_raw(raw, image):
    """The qcow2 image must hold exactly the data of the raw file."""
    status, out = run("qemu-img", "compare", "-f", "raw", "-F", "qcow2",
                      raw, image, check=False)
    assert status == 0 and "Images are identical." in out, \
        "qemu-img compare %s %s: status %d" % (raw, image, status)


# ---------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------

class Server:
    """One qnbd serving one image on a Unix socket (or, with tcp=True, on
    127.0.0.1 and a free port), started at construction and ready when the
    constructor returns."""

    count = 0

    def __init__(self, image, *args, tcp=False, directory=None):
        Server.count += 1
        n = Server.count
        self.dir = directory or tmpdir()
        self.image = image
        self.sock = os.path.join(self.dir, "qnbd%d.sock" % n)
        self.pidfile = os.path.join(self.dir, "qnbd%d.pid" % n)
        self.errfile = os.path.join(self.dir, "qnbd%d.err" % n)
        self.port = None
        self.status = None

        if not os.access(QNBD, os.X_OK):
            raise AssertionError("%s is not built" % QNBD)
        cmd = [QNBD]
        if tcp:
            self.port = free_port()
            cmd += ["-b", "127.0.0.1", "-p", str(self.port)]
        else:
            cmd += ["-k", self.sock]
        cmd += ["--pid-file", self.pidfile]
        if TEST_AIO:
            cmd.append("--aio=" + TEST_AIO)
        cmd += list(args) + [image]
        log("+ " + " ".join(cmd))
        with open(self.errfile, "wb") as err:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                         stdout=err, stderr=err)
        self.pid = self.proc.pid
        _servers.append(self)
        self._wait_ready(tcp)

    def _ready(self, tcp):
        if not os.path.exists(self.pidfile) or os.path.getsize(self.pidfile) == 0:
            return False
        if tcp:
            return True
        return os.path.exists(self.sock)

    def _wait_ready(self, tcp):
        deadline = time.monotonic() + START_TIMEOUT
        while not self._ready(tcp):
            st = self.proc.poll()
            if st is not None:
                self.status = st
                self.show_stderr()
                raise AssertionError("qnbd exited with status %d before it "
                                     "was ready" % st)
            if time.monotonic() > deadline:
                self.show_stderr()
                raise AssertionError("qnbd (pid %d) not ready after %ds" %
                                     (self.pid, START_TIMEOUT))
            time.sleep(0.05)
        # The pid file must name the process we started.
        for _ in range(20):
            with open(self.pidfile) as f:
                text = f.read().strip()
            if text == str(self.pid):
                break
            time.sleep(0.1)
        assert text == str(self.pid), \
            "pid file says %r, expected %d" % (text, self.pid)

    @property
    def uri(self):
        if self.port is not None:
            return "nbd://127.0.0.1:%d/" % self.port
        return "nbd+unix:///?socket=%s" % self.sock

    def connect(self, strict=True):
        """A new libnbd handle connected to the export.  With strict=False
        libnbd sends requests it would otherwise refuse itself, so that the
        server's answer is what the test sees."""
        import nbd
        h = nbd.NBD()
        if not strict:
            h.set_strict_mode(0)
        h.connect_uri(self.uri)
        return h

    def show_stderr(self):
        try:
            with open(self.errfile, errors="replace") as f:
                text = f.read()
        except OSError:
            return
        if text:
            log("--- stderr of qnbd (pid %d) ---" % self.pid)
            log(text.rstrip("\n"))
            log("--- end of stderr of qnbd (pid %d) ---" % self.pid)

    def stderr(self):
        with open(self.errfile, errors="replace") as f:
            return f.read()

    def alive(self):
        return self.proc.poll() is None

    def stop(self, timeout=STOP_TIMEOUT):
        """SIGTERM, wait up to timeout seconds (then SIGKILL and fail),
        return the exit status (negative: killed by that signal)."""
        if self.status is not None:
            return self.status
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.status = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.status = self.proc.wait()
            self.show_stderr()
            raise AssertionError("qnbd (pid %d) still running %ds after "
                                 "SIGTERM" % (self.pid, timeout))
        self.show_stderr()
        log("qnbd (pid %d) exited with status %d" % (self.pid, self.status))
        return self.status

    def _kill_quietly(self):
        if self.status is not None or self.proc.poll() is not None:
            return
        try:
            self.stop()
        except AssertionError as e:
            log(str(e))


# ---------------------------------------------------------------------
# Shadow copy: what the export must contain
# ---------------------------------------------------------------------

class ConfigServer(Server):
    """qnbd -C cfg [args], ready when its pid file (pidfile, as the file
    says) and the Unix socket sock exist; env: its environment."""

    def __init__(self, cfg, sock, pidfile, *args, port=None, env=None):
        Server.count += 1
        d = os.path.dirname(cfg)
        self.dir = d
        self.image = None
        self.sock = sock
        self.pidfile = pidfile
        self.errfile = os.path.join(d, "qnbd%d.err" % Server.count)
        self.port = port
        self.status = None
        cmd = [QNBD, "-C", cfg, *args]
        if TEST_AIO:
            cmd.append("--aio=" + TEST_AIO)
        log("+ " + " ".join(cmd))
        with open(self.errfile, "wb") as err:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                         stdout=err, stderr=err, env=env)
        self.pid = self.proc.pid
        _servers.append(self)
        self._wait_ready(False)


class Shadow:
    """A sparse in-memory copy of the disk: what every write put there, and
    zeros elsewhere.  Kept in 64 KiB chunks so that a large virtual disk
    costs only what was written."""

    CHUNK = 64 * 1024

    def __init__(self, size):
        self.size = size
        self.chunks = {}

    def write(self, offset, data):
        assert 0 <= offset and offset + len(data) <= self.size
        pos = 0
        while pos < len(data):
            idx, off = divmod(offset + pos, self.CHUNK)
            n = min(self.CHUNK - off, len(data) - pos)
            c = self.chunks.get(idx)
            if c is None:
                c = self.chunks[idx] = bytearray(self.CHUNK)
            c[off:off + n] = data[pos:pos + n]
            pos += n

    def read(self, offset, length):
        assert 0 <= offset and offset + length <= self.size
        out = bytearray(length)
        pos = 0
        while pos < length:
            idx, off = divmod(offset + pos, self.CHUNK)
            n = min(self.CHUNK - off, length - pos)
            c = self.chunks.get(idx)
            if c is not None:
                out[pos:pos + n] = c[off:off + n]
            pos += n
        return bytes(out)

    def save_raw(self, path):
        """Write the shadow as a sparse raw file of the disk's size."""
        with open(path, "wb") as f:
            f.truncate(self.size)
            for idx in sorted(self.chunks):
                off = idx * self.CHUNK
                f.seek(off)
                f.write(self.chunks[idx][:min(self.CHUNK, self.size - off)])

    def verify(self, h, step=1024 * 1024):
        """Read the whole export through handle h in pieces of step bytes
        and compare with the shadow; name the first differing byte."""
        off = 0
        while off < self.size:
            n = min(step, self.size - off)
            # Skip the read for large unwritten stretches of a big disk:
            # sample their first and last sector instead.
            if n == step and all(i not in self.chunks for i in
                                 range(off // self.CHUNK,
                                       (off + n - 1) // self.CHUNK + 1)):
                for o in (off, off + n - 512):
                    assert_same(h.pread(512, o), bytes(512), o)
            else:
                assert_same(h.pread(n, off), self.read(off, n), off)
            off += n


def stop_and_compare(srv, img, shadow):
    """The end of a test that wrote through srv: the server must exit 0,
    qemu-img check must find img clean, and qemu-img compare must find
    exactly the shadow's data in it."""
    status = srv.stop()
    assert status == 0, "qnbd exited with status %d" % status
    check_image(img)
    raw = img + ".shadow.raw"
    shadow.save_raw(raw)
    compare_raw(raw, img)
    os.unlink(raw)


def assert_same(got, want, offset):
    """Compare two byte strings read at offset; on a difference, name the
    first differing byte and show a little of both."""
    if got == want:
        return
    assert len(got) == len(want), \
        "at offset %d: got %d bytes, want %d" % (offset, len(got), len(want))
    i = next(i for i in range(len(got)) if got[i] != want[i])
    raise AssertionError(
        "data differs at offset %d (0x%x): got %s... want %s..." %
        (offset + i, offset + i, bytes(got[i:i + 16]).hex(),
         bytes(want[i:i + 16]).hex()))


def pattern(offset, length, tag=0):
    """Bytes that depend on their own disk offset and on tag, so that data
    written to the wrong place or read from the wrong place shows."""
    rnd = random.Random((offset << 8) ^ tag)
    return rnd.randbytes(length)


# ---------------------------------------------------------------------
# The daemon seen from /proc, and a raw protocol client: for tests that
# misbehave on purpose (partial handshakes, replies never read).
# ---------------------------------------------------------------------

def proc_status_kib(pid, field):
    """A field of /proc/PID/status in KiB ("VmRSS", "VmHWM"), 0 if absent."""
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def fd_count(pid):
    """How many descriptors process pid has open."""
    return len(os.listdir("/proc/%d/fd" % pid))


def sanitized(pid):
    """Whether process pid runs with AddressSanitizer (its quarantine of
    freed memory and its shadow raise the RSS several times over)."""
    with open("/proc/%d/maps" % pid) as f:
        return "libasan" in f.read()


def rss_bound_kib(pid, mb):
    """A bound of mb MiB on the RSS of process pid, in KiB; 512 MiB more
    for an AddressSanitizer build, whose quarantine keeps up to 256 MiB of
    freed memory resident (quarantine_size_mb) and whose shadow and
    metadata add to the rest."""
    return (mb + (512 if sanitized(pid) else 0)) * 1024


def percentile(lat, p):
    """The p-th quantile (0 < p < 1) of the sorted list lat."""
    return lat[min(len(lat) - 1, int(len(lat) * p))]


def judge_latency(lat, quiet, p99_bound, median_bound, what):
    """Judge the latencies lat (sorted, seconds) of a client beside some
    load: their p99 must stay under p99_bound, or under four times the
    p99 of quiet (the same client measured without that load) when the
    machine itself is that slow, and their median under median_bound.
    Returns None when they pass, else why not."""
    noise = percentile(quiet, 0.99)
    bound = max(p99_bound, 4 * noise)
    log("%s: %d requests, p50 %.2f ms, p99 %.2f ms, max %.2f ms "
        "(without it: p99 %.2f ms; bounds p99 %.0f ms, p50 %.0f ms)" %
        (what, len(lat), percentile(lat, 0.5) * 1e3,
         percentile(lat, 0.99) * 1e3, lat[-1] * 1e3, noise * 1e3,
         bound * 1e3, median_bound * 1e3))
    if percentile(lat, 0.5) >= median_bound:
        return "%s: median latency %.1f ms" % \
            (what, percentile(lat, 0.5) * 1e3)
    if percentile(lat, 0.99) >= bound:
        return "%s: p99 latency %.1f ms (bound %.0f ms)" % \
            (what, percentile(lat, 0.99) * 1e3, bound * 1e3)
    return None


def assert_latency_in_tries(measure, tries=3):
    """Run measure() (which returns judge_latency's verdict) up to tries
    times, until it passes: tests run in parallel on shared cores, and a
    moment when the machine is overloaded must not fail a test whose
    failure (a loop stalled by one client) shows every time."""
    for i in range(tries):
        why = measure()
        if why is None:
            return
        log("try %d of %d: %s" % (i + 1, tries, why))
    raise AssertionError(why)


NBD_MAGIC = b"NBDMAGIC"
NBD_IHAVEOPT = b"IHAVEOPT"
NBD_REP_MAGIC = 0x0003e889045565a9
NBD_REQUEST_MAGIC = 0x25609513
NBD_SIMPLE_REPLY_MAGIC = 0x67446698
NBD_STRUCTURED_REPLY_MAGIC = 0x668e33ef
NBD_FLAG_C_FIXED_NEWSTYLE = 1
NBD_FLAG_C_NO_ZEROES = 2
NBD_OPT_EXPORT_NAME, NBD_OPT_GO, NBD_OPT_STRUCTURED_REPLY = 1, 7, 8
NBD_REP_ACK, NBD_REP_INFO = 1, 3
NBD_CMD_READ, NBD_CMD_WRITE, NBD_CMD_DISC = 0, 1, 2


def nbd_request(cmd, cookie, offset, length, flags=0):
    """The 28 bytes of an NBD request header."""
    return struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, flags, cmd, cookie,
                       offset, length)


class RawClient:
    """An NBD client on a plain socket (the Unix socket path, or a
    (host, port) tuple), driven one protocol step at a time so that a test
    can stop anywhere.  The constructor connects; greet=True (default) also
    reads the server's greeting."""

    def __init__(self, address, timeout=20, greet=True):
        family = socket.AF_INET if isinstance(address, tuple) else socket.AF_UNIX
        self.s = socket.socket(family, socket.SOCK_STREAM)
        self.s.settimeout(timeout)
        self.s.connect(address)
        if greet:
            self.greeting()

    def recv_exactly(self, n):
        buf = bytearray()
        while len(buf) < n:
            chunk = self.s.recv(min(n - len(buf), 1 << 20))
            if not chunk:
                raise EOFError("server hung up after %d of %d bytes" %
                               (len(buf), n))
            buf += chunk
        return bytes(buf)

    def greeting(self):
        g = self.recv_exactly(18)
        assert g[:16] == NBD_MAGIC + NBD_IHAVEOPT, "bad greeting %r" % g

    def client_flags(self, flags=NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES):
        self.s.sendall(struct.pack(">I", flags))

    def option(self, opt, data=b""):
        """Send an option; return its replies [(type, data)] up to the
        final one (ACK or an error)."""
        self.s.sendall(NBD_IHAVEOPT + struct.pack(">II", opt, len(data)) + data)
        replies = []
        while True:
            magic, o, rtype, n = struct.unpack(">QIII", self.recv_exactly(20))
            assert magic == NBD_REP_MAGIC and o == opt, "bad option reply"
            replies.append((rtype, self.recv_exactly(n)))
            if rtype == NBD_REP_ACK or rtype & (1 << 31):
                return replies

    def go(self, structured=False):
        """Client flags, [STRUCTURED_REPLY,] GO on the default export;
        returns (size, transmission flags)."""
        self.client_flags()
        if structured:
            r = self.option(NBD_OPT_STRUCTURED_REPLY)
            assert r[-1][0] == NBD_REP_ACK, "STRUCTURED_REPLY refused: %r" % r
        replies = self.option(NBD_OPT_GO, struct.pack(">IH", 0, 0))
        assert replies[-1][0] == NBD_REP_ACK, "GO failed: %r" % replies
        for rtype, data in replies:
            if rtype == NBD_REP_INFO and struct.unpack(">H", data[:2])[0] == 0:
                _, size, eflags = struct.unpack(">HQH", data)
                return size, eflags
        raise AssertionError("GO: no NBD_INFO_EXPORT")

    def export_name(self):
        """Client flags and EXPORT_NAME of the default export; returns
        (size, transmission flags)."""
        self.client_flags()
        self.s.sendall(NBD_IHAVEOPT + struct.pack(">II", NBD_OPT_EXPORT_NAME, 0))
        return struct.unpack(">QH", self.recv_exactly(10))

    def simple_reply(self):
        """The header of the next simple reply: (error, cookie)."""
        magic, err, cookie = struct.unpack(">IIQ", self.recv_exactly(16))
        assert magic == NBD_SIMPLE_REPLY_MAGIC, "not a simple reply: 0x%x" % magic
        return err, cookie

    def close(self):
        self.s.close()
