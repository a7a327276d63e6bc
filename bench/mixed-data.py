#!/usr/bin/python3
"""bench/mixed-data.py: the source file of the compress workload.

    mixed-data.py FILE SIZE

Writes SIZE bytes of mixed data to FILE, in 1 MiB pieces in a fixed cycle
of 8: 3 of binaries (regular files under /usr/bin and /usr/lib), 3 of
text (files under /usr/share that look like text), 2 of random bytes (a
PRNG with a fixed seed).  That is 3/8 binaries, 3/8 text and 1/4 random,
mixed finely enough that every part of the disk sees all three.  Files
are taken in sorted path order and concatenated, wrapping round when the
tree is smaller than the share it must fill, so the same machine always
gives the same file.
"""

import os
import random
import sys

PIECE = 1 << 20
CYCLE = "btrbtbtr"      # b: binaries, t: text, r: random

# Already compressed: they would make "text" incompressible.
SKIP_SUFFIXES = (".gz", ".xz", ".bz2", ".zst", ".lz4", ".zip", ".jar",
                 ".png", ".jpg", ".jpeg", ".gif", ".svgz", ".ico", ".woff",
                 ".woff2", ".mo", ".pyc", ".deb", ".ttf", ".otf", ".pf2")


def walk(roots, want):
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                if not os.path.isfile(path) or os.path.islink(path):
                    continue
                if want(path):
                    yield path


def is_binary(path):
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def is_text(path):
    if path.endswith(SKIP_SUFFIXES):
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    return len(head) > 0 and b"\0" not in head


class Stream:
    """Endless concatenation of the files a walk yields."""

    def __init__(self, roots, want):
        self.roots, self.want = roots, want
        self.files = walk(roots, want)
        self.data, self.pos = b"", 0
        self.any = False

    def read(self, n):
        out = []
        while n > 0:
            if self.pos == len(self.data):
                self.next_file()
                continue
            chunk = self.data[self.pos:self.pos + n]
            self.pos += len(chunk)
            n -= len(chunk)
            out.append(chunk)
        return b"".join(out)

    def next_file(self):
        try:
            path = next(self.files)
        except StopIteration:
            if not self.any:
                raise SystemExit(f"mixed-data.py: no files in {self.roots}")
            self.files = walk(self.roots, self.want)
            return
        try:
            with open(path, "rb") as f:
                self.data, self.pos = f.read(), 0
        except OSError:
            self.data, self.pos = b"", 0
        self.any = self.any or len(self.data) > 0


def main():
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    path = sys.argv[1]
    size = int(sys.argv[2])
    assert size % PIECE == 0, "SIZE must be a multiple of 1 MiB"
    binaries = Stream(["/usr/bin", "/usr/lib"], is_binary)
    text = Stream(["/usr/share"], is_text)
    rng = random.Random(12)
    with open(path, "wb") as f:
        for i in range(size // PIECE):
            kind = CYCLE[i % len(CYCLE)]
            if kind == "b":
                f.write(binaries.read(PIECE))
            elif kind == "t":
                f.write(text.read(PIECE))
            else:
                f.write(rng.randbytes(PIECE))


if __name__ == "__main__":
    main()
