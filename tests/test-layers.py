#!/usr/bin/env python3
"""The layer order of lib/ (docs/architecture.md, "## Layers of lib/"),
checked on the objects the build made.

Every object of libqnbd.a may use (nm: an undefined symbol that another
lib/ object defines) only objects of lower layers, or of its own layer
listed before it in the table.  So nothing calls upwards and no two
objects use each other; notifications that go up use callbacks, which
leave no symbol.  Every lib/ source must have a line in the table.

Also checks itself: the same graph against the table upside down must
fail, or the check proves nothing.
"""
import os
import re
import subprocess
import sys

top_srcdir = os.environ.get("top_srcdir", os.path.join(os.path.dirname(__file__), ".."))
builddir = os.environ.get("abs_top_builddir", os.path.join(top_srcdir, "build"))
DOC = os.path.join(top_srcdir, "docs", "architecture.md")
LIBDIR = os.path.join(builddir, "lib")
PREFIX = "libqnbd_a-"


def read_table():
    """[(layer, file)] in the order of the table, bottom first."""
    lines = open(DOC).read().split("\n")
    start = next(i for i, l in enumerate(lines) if l.startswith("## Layers of lib/"))
    fence = next(i for i in range(start, len(lines)) if lines[i].startswith("```"))
    table = []
    for l in lines[fence + 1:]:
        if l.startswith("```"):
            break
        m = re.match(r"^(\S+)\s+(\S+\.c)\b", l)
        if m:
            table.append((m.group(1), m.group(2)))
    return table


def library_sources():
    """The .c files of libqnbd_a_SOURCES in lib/Makefile.am."""
    text = open(os.path.join(top_srcdir, "lib", "Makefile.am")).read()
    block = text[text.index("libqnbd_a_SOURCES"):].split("$(NULL)")[0]
    return re.findall(r"([\w.-]+\.c)\b", block)


def read_graph():
    """{file: {used file: [symbols]}} from nm of the build's objects."""
    objs = [PREFIX + src[:-2] + ".o" for src in library_sources()]
    missing = [o for o in objs if not os.path.exists(os.path.join(LIBDIR, o))]
    if missing:
        sys.exit(f"{', '.join(missing)} not in {LIBDIR}: build first")
    defined, undefined = {}, {}
    for o in objs:
        src = o[len(PREFIX):-2] + ".c"
        out = subprocess.run(["nm", "-P", os.path.join(LIBDIR, o)],
                             capture_output=True, text=True, check=True).stdout
        undefined[src] = set()
        for line in out.splitlines():
            sym, kind = line.split()[:2]
            if kind == "U":
                undefined[src].add(sym)
            elif kind in "TDRBCGS":
                defined[sym] = src
    graph = {}
    for src, syms in undefined.items():
        graph[src] = {}
        for s in syms:
            if s in defined and defined[s] != src:
                graph[src].setdefault(defined[s], []).append(s)
    return graph


def violations(table, graph):
    rank = {f: i for i, (_, f) in enumerate(table)}
    layer = {f: l for l, f in table}
    errs = []
    for f in sorted(graph):
        if f not in rank:
            errs.append(f"lib/{f} has no line in the layer table of {DOC}")
            continue
    for f in sorted(rank):
        if f not in graph:
            errs.append(f"the layer table names lib/{f}, which the build has no object for")
    for f in sorted(graph):
        for g, syms in sorted(graph[f].items()):
            if f in rank and g in rank and rank[g] >= rank[f]:
                where = "the layer above" if layer[g] != layer[f] else "later in its own layer"
                errs.append(f"lib/{f} ({layer[f]}) uses lib/{g} ({layer[g]}, {where}): "
                            + ", ".join(sorted(syms)))
    return errs


def main():
    table = read_table()
    graph = read_graph()
    errs = violations(table, graph)
    for e in errs:
        print("FAIL:", e)
    edges = sum(len(v) for v in graph.values())
    print(f"{len(table)} files in {len(set(l for l, _ in table))} layers, "
          f"{edges} uses between files, {len(errs)} against the order")
    upside_down = violations(list(reversed(table)), graph)
    if edges and not upside_down:
        print("FAIL: the table upside down passes too: the check sees nothing")
        return 1
    return 1 if errs else 0


if __name__ == "__main__":
    sys.exit(main())
