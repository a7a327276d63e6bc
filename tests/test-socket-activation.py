"""test-socket-activation.py: started the way systemd's qnbd.socket starts
it (a listening socket as fd 3, LISTEN_PID and LISTEN_FDS=1 in the
environment), qnbd serves that socket, ignores -k, creates no socket of its
own, and still exits 0 on SIGTERM.
"""

import os
import socket
import subprocess

import qnbdtest as qt

nbd = qt.require_nbd()
qt.requires("qemu-img")

SIZE = 16 * 1024 * 1024

tmp = qt.tmpdir()
img = qt.create_image(tmp, "disk.qcow2", SIZE)
path = os.path.join(tmp, "activated.sock")
ignored = os.path.join(tmp, "ignored.sock")

lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
lsock.bind(path)
lsock.listen(16)

# The shell sets LISTEN_PID to its own pid, which exec keeps for qnbd; the
# listening socket becomes fd 3.
fd = lsock.fileno()
move = "" if fd == 3 else "exec 3<&%d %d<&-; " % (fd, fd)
cmd = ['sh', '-c', move + 'export LISTEN_PID=$$ LISTEN_FDS=1; exec "$@"',
       'sh', qt.QNBD, '-k', ignored]
if qt.TEST_AIO:
    cmd.append('--aio=' + qt.TEST_AIO)
cmd.append(img)
qt.log("+ " + " ".join(cmd))
err = open(os.path.join(tmp, "qnbd.err"), "w+")
proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                        pass_fds=(lsock.fileno(),))
lsock.close()                   # qnbd has it now
try:
    # The listening socket accepts connections into its backlog whoever
    # holds it: wait (bounded) for qnbd's greeting before using libnbd,
    # which would wait for ever.
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(20)
    probe.connect(path)
    greeting = probe.recv(8)
    probe.close()
    assert greeting == b"NBDMAGIC", "no greeting on the passed socket: %r" % greeting
    h = nbd.NBD()
    h.connect_uri("nbd+unix:///?socket=" + path)
    assert h.get_size() == SIZE
    data = qt.pattern(12345, 100000, 1)
    h.pwrite(data, 12345)
    qt.assert_same(h.pread(100000, 12345), data, 12345)
    h.shutdown()
    assert not os.path.exists(ignored), "qnbd created the -k socket as well"
    proc.terminate()
    status = proc.wait(30)
finally:
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    err.seek(0)
    qt.log("--- stderr of qnbd ---\n" + err.read() + "--- end ---")
assert status == 0, "qnbd exited with status %d" % status
qt.check_image(img)
qt.log("PASS")
