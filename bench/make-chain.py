#!/usr/bin/python3
"""bench/make-chain.py: the backing chain of the chain8 workload.

    make-chain.py DIR SIZE DEPTH

Creates DIR/layer0.qcow2 (the base) ... DIR/layer{DEPTH-1}.qcow2 (the
top), each backed by the one below, with qemu-img, and writes with
qemu-io into each layer its own 1/DEPTH of the clusters (64 KiB), so
that every cluster is allocated in exactly one layer.  Which layer holds
which cluster is a fixed pseudo-random shuffle (seeded), so a read of a
random cluster walks down through a uniformly random number of layers,
and the same chain comes out every time.  Layer k's clusters are filled
with the byte k+1 (qemu-io's pattern), never zero, so no server can
answer them as holes.  Finally DIR/flat.qcow2 is the chain converted to
one image with the same data (qemu-img convert), and qemu-img compare
confirms it.
"""

import os
import random
import subprocess
import sys

CLUSTER = 65536
# qemu-io opens the image once per call: batch the writes
BATCH = 4096


def run(*args):
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)


def main():
    if len(sys.argv) != 4:
        raise SystemExit(__doc__)
    d, size, depth = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    assert size % (CLUSTER * depth) == 0, \
        "SIZE must be a multiple of DEPTH clusters"
    clusters = list(range(size // CLUSTER))
    random.Random(8).shuffle(clusters)
    share = len(clusters) // depth
    below = None
    for k in range(depth):
        img = os.path.join(d, f"layer{k}.qcow2")
        if below is None:
            run("qemu-img", "create", "-q", "-f", "qcow2", img, str(size))
        else:
            run("qemu-img", "create", "-q", "-f", "qcow2", "-b", below,
                "-F", "qcow2", img)
        mine = sorted(clusters[k * share:(k + 1) * share])
        # one write per run of consecutive clusters
        runs = []
        for c in mine:
            if runs and runs[-1][0] + runs[-1][1] == c:
                runs[-1][1] += 1
            else:
                runs.append([c, 1])
        for i in range(0, len(runs), BATCH):
            cmds = []
            for c, n in runs[i:i + BATCH]:
                cmds += ["-c", f"write -q -P {k + 1} {c * CLUSTER} "
                               f"{n * CLUSTER}"]
            run("qemu-io", "-f", "qcow2", *cmds, img)
        below = img
    flat = os.path.join(d, "flat.qcow2")
    run("qemu-img", "convert", "-f", "qcow2", "-O", "qcow2", below, flat)
    run("qemu-img", "compare", "-q", "-f", "qcow2", "-F", "qcow2", below,
        flat)


if __name__ == "__main__":
    main()
