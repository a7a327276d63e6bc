"""test-server-layers.py: the daemon's objects call each other one way.

docs/architecture.md lists the files of server/ in an order where each
calls only files above it: conn.c reaches the protocol through c->step,
memory.c wakes waiting connections through their callback, loop.c hands
the loop down.  From the symbols each object defines and uses (nm), this
fails when the objects' calls form a cycle, naming it.
"""

import os
import shutil
import subprocess

import qnbdtest as qt

if shutil.which("nm") is None:
    qt.skip("nm not found")
objdir = os.path.dirname(os.path.abspath(qt.QNBD))
objs = sorted(f for f in os.listdir(objdir)
              if f.startswith("qnbd-") and f.endswith(".o"))
if not objs:
    qt.skip("no objects in %s" % objdir)


def nm(obj, *flags):
    out = subprocess.run(["nm", *flags, os.path.join(objdir, obj)],
                         check=True, capture_output=True, text=True).stdout
    return [line.split() for line in out.splitlines() if line.strip()]


owner = {}
for o in objs:
    for f in nm(o, "--defined-only"):
        if len(f) == 3 and f[1] in "TDBRC":
            owner[f[2]] = o
uses = {o: {} for o in objs}
for o in objs:
    for f in nm(o, "--undefined-only"):
        d = owner.get(f[-1])
        if d and d != o:
            uses[o].setdefault(d, []).append(f[-1])

# Depth-first search for a cycle.
state = {}


def visit(o, path):
    state[o] = "open"
    for d in sorted(uses[o]):
        if state.get(d) == "open":
            cyc = path[path.index(d):] + [d]
            raise AssertionError("server objects call each other: " +
                                 " -> ".join(cyc) + " (" + ", ".join(
                                     "%s uses %s" % (a, " ".join(uses[a][b]))
                                     for a, b in zip(cyc, cyc[1:])) + ")")
        if d not in state:
            visit(d, path + [d])
    state[o] = "done"


for o in objs:
    if o not in state:
        visit(o, [o])
qt.log("%d objects, no cycle" % len(objs))
