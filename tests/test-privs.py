"""test-privs.py: --user and --group.

As root: qnbd --user=nobody --group=nogroup (of an image only root may
open) runs with every uid and gid of
/proc/PID/status those of nobody/nogroup and no supplementary group, the
export still reads and writes, and at exit the socket and the pid file,
given to nobody in a sticky directory, are removed.  The same from the
keys of a -C file.  With --tls-psk the keys file, which GnuTLS reads at
each handshake, must be readable by the user.  Unknown users and groups are refused before anything
is opened.  Not as root (setpriv, as nobody): --user is refused with a
clear error.  The test skips when not run as root.
"""

import grp
import os
import pwd
import shutil
import stat
import subprocess
import time

import qnbdtest as qt
import accesslib as al

nbd = qt.require_nbd()
qt.requires("qemu-img")
if os.geteuid() != 0:
    qt.skip("--user/--group need root (running as uid %d)" % os.geteuid())
try:
    nobody = pwd.getpwnam("nobody")
    nogroup = grp.getgrnam("nogroup")
except KeyError as e:
    qt.skip("no user nobody or group nogroup: %s" % e)

tmp = qt.tmpdir()
os.chmod(tmp, 0o711)
img = qt.create_image(tmp, "disk.qcow2", 16 << 20)
os.chmod(img, 0o600)                    # nobody could not open it
# Where the dropped user can remove what it owns: sticky, as /tmp.
run = os.path.join(tmp, "run")
os.mkdir(run)
os.chmod(run, 0o1777)


def ids(pid):
    out = {}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("Uid", "Gid", "Groups"):
                out[k] = v.split()
    return out


def check_dropped(srv):
    # The pid file is written as root, just before the drop.
    deadline = time.monotonic() + 10
    while ids(srv.pid)["Uid"][0] == "0" and time.monotonic() < deadline:
        time.sleep(0.05)
    st = ids(srv.pid)
    qt.log("qnbd: %r" % st)
    assert st["Uid"] == [str(nobody.pw_uid)] * 4, st
    assert st["Gid"] == [str(nogroup.gr_gid)] * 4, st
    assert all(int(g) != 0 for g in st["Groups"]), st


def read_write(srv, tag):
    h = srv.connect()
    data = bytes([tag]) * 65536
    h.pwrite(data, tag << 16)
    h.flush()
    assert h.pread(65536, tag << 16) == data
    h.shutdown()


srv = qt.Server(img, "--user=nobody", "--group=nogroup", "-v",
                directory=run)
check_dropped(srv)
assert os.stat(srv.sock).st_uid == nobody.pw_uid
read_write(srv, 1)
assert srv.stop() == 0
assert not os.path.exists(srv.sock), "the socket was left behind"
assert not os.path.exists(srv.pidfile), "the pid file was left behind"

# The same from the [server] keys.
sock = os.path.join(run, "cfg.sock")
pidfile = os.path.join(run, "cfg.pid")
cfg = os.path.join(tmp, "qnbd.conf")
with open(cfg, "w") as f:
    f.write("[server]\nsocket = %s\npid-file = %s\nuser = nobody\n"
            "group = nogroup\n\n[export disk]\nfile = %s\n"
            % (sock, pidfile, img))
srv = qt.ConfigServer(cfg, sock, pidfile)
check_dropped(srv)
read_write(srv, 2)
assert srv.stop() == 0
qt.check_image(img)

# GnuTLS reads the PSK keys file at each handshake: one nobody cannot
# read is refused at startup, one it can serves PSK clients.
keys = al.psk_file(os.path.join(tmp, "keys.psk"), ["alice"])
os.chmod(keys, 0o600)
st, out = qt.run(qt.QNBD, "-k", os.path.join(run, "psk.sock"),
                 "--user=nobody", "--tls=require", "--tls-psk=" + keys,
                 img, check=False)
assert st == 1 and "read at each handshake" in out, out
os.chmod(keys, 0o644)
srv = qt.Server(img, "--user=nobody", "--tls=require", "--tls-psk=" + keys,
                directory=run)
h = nbd.NBD()
h.set_tls(nbd.TLS_REQUIRE)
h.set_tls_psk_file(keys)
h.set_tls_username("alice")
h.connect_unix(srv.sock)
assert h.get_tls_negotiated()
h.pwrite(b"\x33" * 4096, 0)
assert h.pread(4096, 0) == b"\x33" * 4096
h.shutdown()
assert srv.stop() == 0

# Names that do not exist, before anything is opened.
for args, why in ((["--user=no-such-user-qnbd"], "no such user"),
                  (["--user=nobody", "--group=no-such-group-qnbd"],
                   "no such group"),
                  (["--user=4000000000"], "no such user: give --group")):
    st, out = qt.run(qt.QNBD, "-k", os.path.join(run, "x.sock"), *args,
                     img, check=False)
    assert st == 1 and why in out, (args, out)
    assert not os.path.exists(os.path.join(run, "x.sock"))

# Not root: refused, clearly.
setpriv = shutil.which("setpriv")
if setpriv is None:
    qt.log("setpriv not found: not checking the refusal as nobody")
else:
    st, out = qt.run(setpriv, "--reuid=nobody", "--regid=nogroup",
                     "--clear-groups", qt.QNBD, "--user=nobody",
                     "-k", os.path.join(run, "y.sock"), img, check=False)
    assert st == 1 and "only root can change its user" in out, out
print("ok")
