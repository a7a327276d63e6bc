"""test-socket-perms.py: --socket-mode, --socket-owner, --socket-group.

The Unix sockets qnbd creates get the mode, owner and group asked for
(an owner or group alone gives mode 0660), from options or from the keys
of [server]; and they decide who connects: as root, a client running as
nobody (setpriv) is refused by a 0600 socket and served by a 0666 one,
and by a 0660 socket of group nogroup when it is in that group.  Bad
values stop qnbd before it listens.  The ownership cases skip when not
run as root.
"""

import grp
import os
import pwd
import shutil
import stat
import subprocess

import qnbdtest as qt
import accesslib as al

qt.requires("qemu-img", "nbdinfo")
tmp = qt.tmpdir()
os.chmod(tmp, 0o711)            # others may reach the sockets in it
img = qt.create_image(tmp, "disk.qcow2", 16 << 20)
root = os.geteuid() == 0


def mode_of(srv):
    st = os.stat(srv.sock)
    assert stat.S_ISSOCK(st.st_mode)
    return stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid


def nbdinfo_as_nobody(srv, groups="nogroup"):
    """nbdinfo --size over srv's socket, as nobody: its exit status."""
    cmd = ["setpriv", "--reuid=nobody", "--regid=nogroup",
           "--groups=" + groups if groups else "--clear-groups",
           "nbdinfo", "--size", "nbd+unix:///?socket=%s" % srv.sock]
    st, out = qt.run(*cmd, check=False)
    return st


srv = qt.Server(img, "--socket-mode=0600", directory=tmp)
assert mode_of(srv)[0] == 0o600, oct(mode_of(srv)[0])
qt.run("nbdinfo", "--size", srv.uri)
if root and shutil.which("setpriv"):
    assert nbdinfo_as_nobody(srv) != 0, "nobody connected to a 0600 socket"
srv.stop()

srv = qt.Server(img, "--socket-mode=666", directory=tmp)
assert mode_of(srv)[0] == 0o666
if root and shutil.which("setpriv"):
    assert nbdinfo_as_nobody(srv, groups=None) == 0
srv.stop()

if root:
    nobody = pwd.getpwnam("nobody")
    nogroup = grp.getgrnam("nogroup")
    srv = qt.Server(img, "--socket-group=nogroup", directory=tmp)
    assert mode_of(srv) == (0o660, 0, nogroup.gr_gid), mode_of(srv)
    if shutil.which("setpriv"):
        assert nbdinfo_as_nobody(srv) == 0, "nogroup's member refused"
    srv.stop()
    srv = qt.Server(img, "--socket-owner=nobody", "--socket-mode=0640",
                    directory=tmp)
    assert mode_of(srv) == (0o640, nobody.pw_uid, 0), mode_of(srv)
    srv.stop()
    assert not os.path.exists(srv.sock), "socket left behind"

# The same as keys of [server].
sock = os.path.join(tmp, "cfg.sock")
pidfile = os.path.join(tmp, "cfg.pid")
cfg = os.path.join(tmp, "qnbd.conf")
with open(cfg, "w") as f:
    f.write("[server]\nsocket = %s\npid-file = %s\nsocket-mode = 0604\n"
            "[export d]\nfile = %s\n" % (sock, pidfile, img))
srv = qt.ConfigServer(cfg, sock, pidfile)
assert mode_of(srv)[0] == 0o604
srv.stop()

# Bad values: exit 1 before listening, saying which.
for args, want in ((["--socket-mode=0999"], "--socket-mode: '0999'"),
                   (["--socket-mode=rw"], "--socket-mode: 'rw'"),
                   (["--socket-group=no-such-group-here"],
                    "--socket-group: no-such-group-here: no such group"),
                   (["--socket-owner=no-such-user-here"],
                    "--socket-owner: no-such-user-here: no such user")):
    bad = os.path.join(tmp, "bad.sock")
    p = subprocess.run([qt.QNBD, "-k", bad, *args, img],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       universal_newlines=True, timeout=30)
    qt.log(p.stderr)
    assert p.returncode == 1, (args, p.returncode)
    assert want in p.stderr, (want, p.stderr)
    assert not os.path.exists(bad)
qt.check_image(img)
