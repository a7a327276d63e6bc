"""test-sd-notify.py: with NOTIFY_SOCKET set (systemd's Type=notify), qnbd
sends READY=1 once it is listening: a client connecting right after the
notification is served.
"""

import os
import socket
import subprocess

import qnbdtest as qt

nbd = qt.require_nbd()
qt.requires("qemu-img")

tmp = qt.tmpdir()
img = qt.create_image(tmp, "disk.qcow2", 1024 * 1024)
notify_path = os.path.join(tmp, "notify")
sock = os.path.join(tmp, "qnbd.sock")

ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
ns.bind(notify_path)
ns.settimeout(20)

cmd = [qt.QNBD, "-k", sock]
if qt.TEST_AIO:
    cmd.append("--aio=" + qt.TEST_AIO)
cmd.append(img)
env = dict(os.environ, NOTIFY_SOCKET=notify_path)
err = open(os.path.join(tmp, "qnbd.err"), "w+")
qt.log("+ NOTIFY_SOCKET=%s %s" % (notify_path, " ".join(cmd)))
proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL,
                        stdout=err, stderr=err)
try:
    msg = ns.recv(4096).decode()
    qt.log("notification: %r" % msg)
    assert "READY=1" in msg.split("\n"), "no READY=1 in %r" % msg
    # Ready means listening: connect at once, no retry.
    h = nbd.NBD()
    h.connect_uri("nbd+unix:///?socket=" + sock)
    assert h.get_size() == 1024 * 1024
    h.shutdown()
    proc.terminate()
    status = proc.wait(30)
finally:
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    err.seek(0)
    qt.log("--- stderr of qnbd ---\n" + err.read() + "--- end ---")
assert status == 0, "qnbd exited with status %d" % status
qt.log("PASS")
