"""test-pid-file-symlink.py: the pid file is never written through a
symlink planted at its name or at the temporary name beside it.

Someone who can write the pid file's directory plants symlinks at
PATH.tmp (the name qnbd tries first for the new file) and at PATH, each
pointing at a file of theirs.  qnbd must start, leave both files as they
were, and replace the symlink at PATH by a regular file holding its pid.
"""

import os

import qnbdtest as qt

qt.requires("qemu-img")

tmp = qt.tmpdir()
img = qt.create_image(tmp, "disk.qcow2", 16 << 20)
run = os.path.join(tmp, "run")
os.mkdir(run)
victims = {}
for name in ("tmp-victim", "pid-victim"):
    v = os.path.join(tmp, name)
    with open(v, "w") as f:
        f.write("precious %s\n" % name)
    victims[v] = "precious %s\n" % name

# qnbdtest.Server names its pid file qnbdN.pid after its count.
pidfile = os.path.join(run, "qnbd%d.pid" % (qt.Server.count + 1))
os.symlink(os.path.join(tmp, "tmp-victim"), pidfile + ".tmp")
os.symlink(os.path.join(tmp, "pid-victim"), pidfile)

srv = qt.Server(img, directory=run)
assert srv.pidfile == pidfile, "pid file %s, planted %s" % (srv.pidfile, pidfile)
for v, text in victims.items():
    with open(v) as f:
        got = f.read()
    assert got == text, "%s was written through a symlink: %r" % (v, got)
assert not os.path.islink(pidfile), "the pid file is still a symlink"
with open(pidfile) as f:
    assert f.read() == "%d\n" % srv.pid
assert os.path.islink(pidfile + ".tmp"), "the planted .tmp symlink is gone"
assert srv.stop() == 0
assert not os.path.exists(pidfile), "pid file left behind"
for v, text in victims.items():
    with open(v) as f:
        assert f.read() == text, "%s changed at exit" % v
