#!/usr/bin/python3
"""bench/report.py: turn bench/run's fio results into a markdown table.

    report.py --one FIO.json CPU_TICKS       one line for the progress log
    report.py --results results.tsv --clk-tck 100 [--meta k=v]...
              [--markdown FILE] [--plot FILE.png --plot-dir DIR]

results.tsv has one line per measurement:
    workload  server  round  server-cpu-ticks  fio-json
(for the compress workload the JSON is bench/run's own: nbdcopy's bytes,
seconds, CPU time and the image's file size).
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys

CLK_TCK = os.sysconf("SC_CLK_TCK")

# workload: (title, unit, fio job in words)
WORKLOADS = {
    "randread": ("4k random read QD32", "IOPS",
                 "tmpfs, fully allocated qcow2"),
    "randwrite": ("4k random write QD32", "IOPS",
                  "tmpfs, fully allocated qcow2"),
    "randrw": ("4k random 70/30 read/write QD32", "IOPS",
               "tmpfs, fully allocated qcow2"),
    "seqread": ("1M sequential read QD8", "MiB/s",
                "tmpfs, fully allocated qcow2"),
    "seqwrite": ("1M sequential write QD8", "MiB/s",
                 "tmpfs, fully allocated qcow2"),
    "sparse": ("4k random read QD32, 256 GiB sparse", "IOPS",
               "tmpfs, 256 GiB qcow2 with data written at random"),
    "alloc1": ("64k allocating random write, 1 conn QD8", "MiB/s",
               "real disk, O_DIRECT, empty qcow2"),
    "alloc4": ("64k allocating random write, 4 conns QD8 each", "MiB/s",
               "real disk, O_DIRECT, empty qcow2"),
    "compress": ("1G of mixed data, nbdcopy into an empty image, compressed",
                 "MiB/s", "tmpfs, empty qcow2"),
    "cread": ("4k sequential read QD1 of a compressed image", "IOPS",
              "tmpfs, the compress workload's mixed data converted with "
              "qemu-img convert -c"),
    "conn16": ("4k random read, 16 conns QD4 each", "IOPS",
               "tmpfs, fully allocated qcow2"),
    "chain8": ("4k random read QD32, 8-deep backing chain", "IOPS",
               "tmpfs, 8 qcow2 layers, 1/8 of the clusters in each"),
    "qd1read": ("4k random read QD1", "IOPS",
                "tmpfs, fully allocated qcow2"),
    "qd1write": ("4k random write QD1", "IOPS",
                 "tmpfs, fully allocated qcow2"),
    "prealloc": ("64k allocating random write, 1 conn QD8, "
                 "preallocation=metadata image", "MiB/s",
                 "real disk, O_DIRECT, qcow2 from qnbd-img create "
                 "-o preallocation=metadata"),
    "prealloc0": ("64k allocating random write, 1 conn QD8, empty image "
                  "(baseline of the preallocated one)", "MiB/s",
                  "real disk, O_DIRECT, empty qcow2"),
}
ORDER = list(WORKLOADS)

SERVERS = {
    "qnbd": "qnbd (default: writeback)",
    "qnbd-none": "qnbd --cache=none",
    "qnbd-threads": "qnbd --aio=threads",
    "qemu-nbd": "qemu-nbd --cache=none",
    "qemu-nbd-wb": "qemu-nbd --cache=writeback",
    "nbdkit": "nbdkit file (raw copy)",
    "nbdkit-null": "nbdkit null (no work, sleeps between requests)",
    "floor": "bench/nbd-floor (no work, never sleeps: the ceiling)",
    "floor-file": "bench/nbd-floor on the raw file (pread/pwrite only)",
    "qnbd-flat": "qnbd on the flat image (the chain converted)",
    "qnbd-compress": "qnbd --compress",
    "qemu-nbd-compress": "qemu-nbd, compress filter (writeback)",
}

# Where a workload's qemu-nbd is not one of the two plain ones, the
# ratio columns take it in the place of the one it resembles.
COLUMN_ALIAS = {
    "compress": {"qemu-nbd-wb": "qemu-nbd-compress"},
}
SERVER_ORDER = list(SERVERS)


def load_fio(path):
    """Totals of one measurement: ios, iops, mibs; client: the client's
    (fio's or nbdcopy's) CPU time over the run's wall time, in % of one
    core; p50/p99: completion latency in µs (of the direction that did
    most I/O); file_size: the image after nbdcopy."""
    with open(path) as f:
        text = f.read()
    d = json.loads(text[text.index("{"):])
    if d.get("nbdcopy"):
        secs = d["seconds"]
        return {"ios": d["ios"], "iops": d["ios"] / secs,
                "mibs": d["bytes"] / secs / 1048576.0,
                "client": (d["client_usr"] + d["client_sys"]) / secs * 100,
                "file_size": d["file_size"], "p50": None, "p99": None}
    ios = iops = bw = client = 0.0
    p50 = p99 = None
    most = 0
    for job in d["jobs"]:
        if job.get("error"):
            raise SystemExit(f"{path}: fio job error {job['error']}")
        for rw in ("read", "write"):
            ios += job[rw]["total_ios"]
            iops += job[rw]["iops"]
            bw += job[rw]["bw_bytes"]
            pct = job[rw].get("clat_ns", {}).get("percentile", {})
            if job[rw]["total_ios"] > most and "50.000000" in pct:
                most = job[rw]["total_ios"]
                p50 = pct["50.000000"] / 1000.0
                p99 = pct["99.000000"] / 1000.0
        # usr_cpu/sys_cpu are % of job_runtime, which group_reporting
        # sums over the jobs; the run's wall time is the direction's
        # runtime.
        wall = max(job["read"]["runtime"], job["write"]["runtime"])
        if wall:
            client += ((job["usr_cpu"] + job["sys_cpu"])
                       * job.get("job_runtime", wall) / wall)
    return {"ios": ios, "iops": iops, "mibs": bw / 1048576.0,
            "client": client, "file_size": None, "p50": p50, "p99": p99}


def value(m, unit):
    return m["iops"] if unit == "IOPS" else m["mibs"]


def fmt_value(v, unit):
    if v is None:
        return "–"
    if unit == "IOPS":
        return f"{v / 1000:.1f}k" if v >= 1000 else f"{v:.0f}"
    return f"{v:.0f}"


def fmt_ratio(x):
    return "–" if x is None else f"{x:.2f}×"


def one(path, ticks):
    m = load_fio(path)
    cpu_us = ticks / CLK_TCK / m["ios"] * 1e6 if m["ios"] else float("nan")
    extra = ""
    if m["file_size"] is not None:
        extra += f", file {m['file_size'] / 1048576:.1f} MiB"
    if m["p50"] is not None:
        extra += f", clat p50 {m['p50']:.1f} µs p99 {m['p99']:.1f} µs"
    return (f"{m['iops'] / 1000:.1f}k IOPS, {m['mibs']:.0f} MiB/s, "
            f"server CPU {cpu_us:.1f} µs/IO, client CPU "
            f"{m['client']:.0f}% of a core{extra}")


def primary_qnbd(servers):
    for s in ("qnbd", "qnbd-none", "qnbd-compress"):
        if s in servers:
            return s
    return None


def reference_qemu(servers):
    for s in ("qemu-nbd", "qemu-nbd-wb"):
        if s in servers:
            return s
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--one", nargs=2)
    ap.add_argument("--results")
    ap.add_argument("--clk-tck", type=int, default=CLK_TCK)
    ap.add_argument("--meta", action="append", default=[])
    ap.add_argument("--markdown")
    ap.add_argument("--plot")
    ap.add_argument("--plot-dir")
    ap.add_argument("--times")
    a = ap.parse_args()

    if a.one:
        print(one(a.one[0], int(a.one[1])))
        return

    meta = dict(kv.split("=", 1) for kv in a.meta)
    size = meta.get("sparse_size", "256G")
    if size != "256G":
        # --sparse-size: name the workload after the image it used.
        WORKLOADS["sparse"] = (f"4k random read QD32, {size} sparse",
                               *WORKLOADS["sparse"][1:])
    csize = meta.get("compress_size", "1G")
    WORKLOADS["compress"] = (WORKLOADS["compress"][0].replace(
        "1G", csize, 1), *WORKLOADS["compress"][1:])
    runs = {}   # (workload, server) -> list of {value, cpu_us}
    with open(a.results) as f:
        for line in f:
            w, s, r, ticks, path = line.rstrip("\n").split("\t")
            m = load_fio(path)
            unit = WORKLOADS[w][1]
            cpu_us = int(ticks) / a.clk_tck / m["ios"] * 1e6 if m["ios"] else None
            runs.setdefault((w, s), []).append(
                {"v": value(m, unit), "cpu": cpu_us, "client": m["client"],
                 "file_size": m["file_size"], "p50": m["p50"],
                 "p99": m["p99"]})

    def median_of(lst, k):
        xs = [x[k] for x in lst if x[k] is not None]
        return statistics.median(xs) if xs else None

    med = {}    # (w, s) -> (median, min, max, median cpu)
    extra = {}  # (w, s) -> {client, file_size, p50, p99}: medians
    for key, lst in runs.items():
        vs = [x["v"] for x in lst]
        med[key] = (statistics.median(vs), min(vs), max(vs),
                    median_of(lst, "cpu"))
        extra[key] = {k: median_of(lst, k)
                      for k in ("client", "file_size", "p50", "p99")}

    def m(w, s):
        s = COLUMN_ALIAS.get(w, {}).get(s, s)
        return med[(w, s)][0] if (w, s) in med else None

    def ex(w, s, k):
        return extra[(w, s)][k] if (w, s) in extra else None

    def cpu(w, s):
        return med[(w, s)][3] if (w, s) in med else None

    def ratio(x, y):
        return x / y if x is not None and y else None

    out = []
    p = out.append
    p(f"## Results ({meta.get('mode', '?')} run, {meta.get('date', '?')})")
    p("")
    p(f"- machine: {meta.get('host', '?')}")
    p(f"- qnbd {meta.get('qnbd', '?')}; {meta.get('qemu-nbd', '?')} "
      f"(--aio={meta.get('qemu_aio', '?')}); {meta.get('nbdkit', '?')}; "
      f"{meta.get('fio', '?')}")
    p(f"- {meta.get('rounds', '?')} round(s) of {meta.get('runtime', '?')} s "
      f"per server and workload (after a {meta.get('warmup', '?')} s warm-up "
      f"run, none for the allocating writes), servers interleaved; "
      f"median and min–max over the rounds")
    p(f"- images: {meta.get('data_size', '?')} qcow2 + raw copy in "
      f"{meta.get('work', '?')}; sparse {meta.get('sparse', '?')}; "
      f"allocating writes into an empty {meta.get('alloc_size', '?')} qcow2 "
      f"in {meta.get('disk', '?')}")
    p(f"- whole run took {meta.get('elapsed', '?')} s")
    p("")
    p("Ratios are the median of the row's server over the median of the "
      "column's server (higher is better; for compress, the qemu-nbd wb "
      "column is qemu-nbd with the compress filter); server CPU is the "
      "server process's utime+stime during the measured run over the "
      "number of I/Os fio completed (for compress: per 64 KiB cluster; "
      "lower is better); client CPU is fio's (or nbdcopy's) usr+sys time "
      "over the run's wall time, in % of one core (the machine has "
      f"{meta.get('host', '?').split(',')[0]}).")
    p("")
    p("| workload | server | median | min–max | × qemu-nbd none "
      "| × qemu-nbd wb | × nbdkit raw | server CPU µs/IO "
      "| CPU × qemu-nbd | client CPU % of a core |")
    p("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for w in ORDER:
        servers = [s for s in SERVER_ORDER if (w, s) in med]
        if not servers:
            continue
        title, unit, _ = WORKLOADS[w]
        ref = reference_qemu(servers)
        if w == "compress" and "qemu-nbd-compress" in servers:
            ref = "qemu-nbd-compress"
        for s in servers:
            v, lo, hi, c = med[(w, s)]
            cl = ex(w, s, "client")
            p(f"| {title} ({unit}) | {SERVERS[s]} | {fmt_value(v, unit)} "
              f"| {fmt_value(lo, unit)}–{fmt_value(hi, unit)} "
              f"| {fmt_ratio(ratio(v, m(w, 'qemu-nbd')))} "
              f"| {fmt_ratio(ratio(v, m(w, 'qemu-nbd-wb')))} "
              f"| {fmt_ratio(ratio(v, m(w, 'nbdkit')))} "
              f"| {'–' if c is None else f'{c:.1f}'} "
              f"| {fmt_ratio(ratio(c, cpu(w, ref)) if ref else None)} "
              f"| {'–' if cl is None else f'{cl:.0f}%'} |")
    p("")
    more_tables(p, med, extra, m, ratio)

    # Targets of issue 5.  Throughput ratios are against qemu-nbd
    # --cache=none (the command) where it ran, else against the
    # writeback variant; the last column compares with whichever qemu-nbd
    # variant was faster.
    targets = []

    def tgt(w, other, want, kind="ge"):
        q = primary_qnbd([s for s in SERVER_ORDER if (w, s) in med])
        if q is None:
            return
        if other == "qemu":
            ref = reference_qemu([s for s in SERVER_ORDER if (w, s) in med])
            if ref is None:
                return
            r = ratio(m(w, q), m(w, ref))
            alts = [x for x in (m(w, "qemu-nbd"), m(w, "qemu-nbd-wb")) if x]
            best = ratio(m(w, q), max(alts)) if len(alts) > 1 else None
            label = SERVERS[ref]
        else:
            if (w, other) not in med:
                return
            r = ratio(m(w, q), m(w, other))
            best = None
            label = SERVERS[other]
        if r is None:
            return
        ok = r >= want if kind == "ge" else r <= want
        sign = "≥" if kind == "ge" else "≤"
        targets.append((f"{WORKLOADS[w][0]}: {SERVERS[q]} vs {label}",
                        f"{sign} {want}×", f"{r:.3f}×",
                        fmt_ratio(best), "met" if ok else "**NOT met**"))

    tgt("randread", "qemu", 1.6)
    tgt("randread", "nbdkit", 0.9)
    tgt("randwrite", "qemu", 1.6)
    tgt("randwrite", "nbdkit", 0.85)
    tgt("randrw", "qemu", 1.5)
    tgt("seqread", "nbdkit", 0.9)
    tgt("seqwrite", "nbdkit", 0.9)
    tgt("alloc4", "qemu", 2.0)
    if ("alloc1", "qnbd-none") in med and ("alloc4", "qnbd-none") in med:
        r = ratio(m("alloc4", "qnbd-none"), m("alloc1", "qnbd-none"))
        targets.append(("64k allocating writes: qnbd 4 conns vs 1 conn",
                        "> 1×", f"{r:.3f}×", "–",
                        "met" if r > 1 else "**NOT met**"))
    for w in ("randread", "randwrite", "randrw"):
        servers = [s for s in SERVER_ORDER if (w, s) in med]
        q, ref = primary_qnbd(servers), reference_qemu(servers)
        if q and ref and cpu(w, q) is not None and cpu(w, ref):
            r = cpu(w, q) / cpu(w, ref)
            alts = [cpu(w, x) for x in ("qemu-nbd", "qemu-nbd-wb")
                    if cpu(w, x)]
            best = cpu(w, q) / min(alts) if len(alts) > 1 else None
            targets.append((f"server CPU per request, {WORKLOADS[w][0]}: "
                            f"{SERVERS[q]} vs {SERVERS[ref]}",
                            "≤ 0.5×", f"{r:.3f}×", fmt_ratio(best),
                            "met" if r <= 0.5 else "**NOT met**"))
    tgt("sparse", "qemu", 1.5)

    if targets:
        p("### Targets (issue 5)")
        p("")
        p("| target | wanted | measured | vs the faster qemu-nbd variant "
          "| |")
        p("|---|---:|---:|---:|---|")
        for t in targets:
            p("| " + " | ".join(t) + " |")
        met = sum(1 for t in targets if t[4] == "met")
        p("")
        p(f"{met} of {len(targets)} targets met in this run.")
        p("")

    targets12(p, med, extra, m, ratio)

    if a.times:
        with open(a.times) as f:
            times = [line.rstrip("\n").split("\t") for line in f
                     if line.strip()]
        if times:
            p("### Time per step")
            p("")
            p("| step | seconds (a workload: all rounds, servers, checks) |")
            p("|---|---:|")
            for w, t in times:
                p(f"| {w} | {t} |")
            p("")

    text = "\n".join(out)
    print(text)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write("# qnbd benchmark results\n\n")
            f.write("Written by `bench/run`; see bench/README.md for what "
                    "each workload measures.\n\n")
            f.write(text)

    if a.plot and shutil.which("gnuplot"):
        plot(a, med, m)


def fmt_us(x):
    return "–" if x is None else f"{x:.1f}"


def fmt_mib(x):
    return "–" if x is None else f"{x / 1048576:.1f}"


def more_tables(p, med, extra, m, ratio):
    """The views of issue 12's and 13's workloads the main table cannot
    give: file sizes, chain against flat, latency, preallocation gain."""
    def have(w, s):
        return (w, s) in med

    def ex(w, s, k):
        return extra[(w, s)][k] if (w, s) in extra else None

    if have("compress", "qnbd-compress") or have("compress",
                                                 "qemu-nbd-compress"):
        q_size = ex("compress", "qemu-nbd-compress", "file_size")
        q_v = m("compress", "qemu-nbd-compress")
        p("### Compressed ingest (nbdcopy)")
        p("")
        p("| server | MiB/s | × qemu-nbd | file MiB | size × qemu-nbd's "
          "| nbdcopy CPU % of a core |")
        p("|---|---:|---:|---:|---:|---:|")
        for s in ("qnbd-compress", "qemu-nbd-compress"):
            if not have("compress", s):
                continue
            v = m("compress", s)
            size = ex("compress", s, "file_size")
            cl = ex("compress", s, "client")
            p(f"| {SERVERS[s]} | {v:.1f} | {fmt_ratio(ratio(v, q_v))} "
              f"| {fmt_mib(size)} | {fmt_ratio(ratio(size, q_size))} "
              f"| {'–' if cl is None else f'{cl:.0f}%'} |")
        p("")

    if have("chain8", "qnbd") or have("chain8", "qnbd-flat"):
        ref = reference_qemu([s for s in SERVER_ORDER if have("chain8", s)])
        p("### 8-deep backing chain against the flat image")
        p("")
        p("| server | IOPS | × qnbd flat | × qemu-nbd (chain) "
          "| server CPU µs/IO |")
        p("|---|---:|---:|---:|---:|")
        for s in ("qnbd", ref, "qnbd-flat"):
            if s is None or not have("chain8", s):
                continue
            v = m("chain8", s)
            p(f"| {SERVERS[s]}{' (chain)' if s != 'qnbd-flat' else ''} "
              f"| {fmt_value(v, 'IOPS')} "
              f"| {fmt_ratio(ratio(v, m('chain8', 'qnbd-flat')))} "
              f"| {fmt_ratio(ratio(v, m('chain8', ref)) if ref else None)} "
              f"| {fmt_us(med[('chain8', s)][3])} |")
        p("")

    qd1 = [s for s in SERVER_ORDER
           if have("qd1read", s) or have("qd1write", s)]
    if qd1:
        ref = reference_qemu(qd1)
        p("### QD1 latency (fio completion latency, µs; medians of rounds)")
        p("")
        p("| server | read IOPS | read p50 | read p99 | × qemu-nbd "
          "| write IOPS | write p50 | write p99 | × qemu-nbd |")
        p("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for s in qd1:
            row = [SERVERS[s]]
            for w in ("qd1read", "qd1write"):
                v = m(w, s)
                row += [fmt_value(v, "IOPS"), fmt_us(ex(w, s, "p50")),
                        fmt_us(ex(w, s, "p99")),
                        fmt_ratio(ratio(v, m(w, ref)) if ref else None)]
            p("| " + " | ".join(row) + " |")
        p("")

    pre = [s for s in SERVER_ORDER
           if have("prealloc", s) and have("prealloc0", s)]
    if pre:
        p("### Metadata preallocation (issue 13): 64k allocating random "
          "writes, 1 conn QD8")
        p("")
        p("| server | empty image MiB/s | preallocated MiB/s | gain "
          "| server CPU µs/IO empty | preallocated |")
        p("|---|---:|---:|---:|---:|---:|")
        for s in pre:
            e, f = m("prealloc0", s), m("prealloc", s)
            p(f"| {SERVERS[s]} | {e:.0f} | {f:.0f} "
              f"| {fmt_ratio(ratio(f, e))} "
              f"| {fmt_us(med[('prealloc0', s)][3])} "
              f"| {fmt_us(med[('prealloc', s)][3])} |")
        p("")


def targets12(p, med, extra, m, ratio):
    """Targets of issue 12 (and the measurement issue 13 asks for)."""
    rows = []

    def row(what, want, r, ok):
        if r is not None:
            rows.append((what, want, f"{r:.3f}×",
                         "met" if ok(r) else "**NOT met**"))

    def ex(w, s, k):
        return extra[(w, s)][k] if (w, s) in extra else None

    r = ratio(m("compress", "qnbd-compress"),
              m("compress", "qemu-nbd-compress"))
    row("compressed ingest speed: qnbd --compress vs qemu-nbd compress "
        "filter", "≥ 1.5×", r, lambda x: x >= 1.5)
    r = ratio(ex("compress", "qnbd-compress", "file_size"),
              ex("compress", "qemu-nbd-compress", "file_size"))
    row("compressed image file size: qnbd vs qemu-nbd", "≤ 1.0×", r,
        lambda x: x <= 1.0)
    r = ratio(m("conn16", "qnbd"), m("conn16", "nbdkit"))
    row("4k random read, 16 conns QD4: qnbd vs nbdkit file (raw)",
        "≥ 1.0×", r, lambda x: x >= 1.0)
    r = ratio(m("chain8", "qnbd"), m("chain8", "qnbd-flat"))
    row("4k random read QD32, 8-deep chain: qnbd vs qnbd on the flat image",
        "≥ 0.8×", r, lambda x: x >= 0.8)
    for w, name in (("qd1read", "read"), ("qd1write", "write")):
        servers = [s for s in SERVER_ORDER if (w, s) in med]
        ref = reference_qemu(servers)
        if ref:
            r = ratio(m(w, "qnbd"), m(w, ref))
            row(f"4k random {name} QD1: qnbd vs {SERVERS[ref]}", "≥ 2.0×",
                r, lambda x: x >= 2.0)
    if rows:
        p("### Targets (issue 12)")
        p("")
        p("| target | wanted | measured | |")
        p("|---|---:|---:|---|")
        for t in rows:
            p("| " + " | ".join(t) + " |")
        met = sum(1 for t in rows if t[3] == "met")
        p("")
        p(f"{met} of {len(rows)} targets met in this run.")
        p("")
    ceil = []
    for w, name in (("qd1read", "read"), ("qd1write", "write")):
        servers = [s for s in SERVER_ORDER if (w, s) in med]
        ref = reference_qemu(servers)
        if not ref:
            continue
        null = ratio(m(w, "nbdkit-null"), m(w, ref))
        floor = ratio(m(w, "floor"), m(w, ref))
        floor_file = ratio(m(w, "floor-file"), m(w, ref))
        of_floor = ratio(m(w, "qnbd"), m(w, "floor"))
        of_floor_file = ratio(m(w, "qnbd"), m(w, "floor-file"))
        parts = []
        if null is not None:
            parts.append(f"nbdkit null {null:.2f}×")
        if floor is not None:
            parts.append(f"bench/nbd-floor {floor:.2f}×")
        if floor_file is not None:
            parts.append(f"on the raw file {floor_file:.2f}×")
        if of_floor is not None:
            parts.append(f"qnbd at {of_floor:.2f} of the floor")
        if of_floor_file is not None:
            parts.append(f"at {of_floor_file:.2f} of the floor on the file")
        if parts:
            ceil.append(f"{name}: " + ", ".join(parts))
    if ceil:
        p("QD1, servers that do no work against the same qemu-nbd "
          "(nbdkit null sleeps between requests; bench/nbd-floor never "
          "sleeps, so only the client's wake-up is left: no server can "
          "pass it with this client on this machine; on the raw file it "
          "also reads or writes the data, the least a server keeping data "
          "does; both answer with structured replies as the others do): " +
          "; ".join(ceil) + ".")
        p("")
    gains = []
    for s in ("qnbd-none", "qemu-nbd"):
        g = ratio(m("prealloc", s), m("prealloc0", s))
        if g is not None:
            gains.append(f"{SERVERS[s]} {g:.2f}×")
    if gains:
        p("Issue 13, 64k allocating random writes into a "
          "`qnbd-img create -o preallocation=metadata` image over the same "
          "into an empty image (gain, > 1× is a gain): "
          + ", ".join(gains) + ".")
        p("")


def plot(a, med, m):
    rows = []
    used = [False, False, False]    # a column gnuplot gets only if used
    for w in ORDER:
        servers = [s for s in SERVER_ORDER if (w, s) in med]
        q = primary_qnbd(servers)
        if q is None:
            continue

        def r(i, o):
            x = m(w, o)
            if not x:
                return "NaN"
            used[i] = True
            return f"{m(w, q) / x:.3f}"
        label = w + ("\\n(--cache=none)" if q == "qnbd-none" else "")
        rows.append(f"\"{label}\" {r(0, 'qemu-nbd')} {r(1, 'qemu-nbd-wb')} "
                    f"{r(2, 'nbdkit')}")
    titles = ("/ qemu-nbd --cache=none",
              "/ qemu-nbd --cache=writeback (compress: the compress filter)",
              "/ nbdkit file (raw)")
    # the labels come with the first column plotted
    columns = [f'"{{dat}}" using {i + 2}{":xtic(1)" if n == 0 else ""} '
               f'title "{titles[i]}"'
               for n, i in enumerate(i for i in range(3) if used[i])]
    if not columns:
        return
    dat = os.path.join(a.plot_dir, "ratios.dat")
    with open(dat, "w") as f:
        f.write("\n".join(rows) + "\n")
    gp = os.path.join(a.plot_dir, "ratios.gp")
    with open(gp, "w") as f:
        f.write(f"""set terminal pngcairo size 1600,520 noenhanced font ",10"
set output "{a.plot}"
set title "qnbd throughput / other server (median of rounds; >1: qnbd faster)"
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.8 border -1
set boxwidth 0.9
set bmargin 4
set yrange [0:*]
set grid ytics
set key top right
set ylabel "ratio"
set arrow from graph 0, first 1 to graph 1, first 1 nohead lw 2 lc rgb "black"
plot """ + ", \\\n     ".join(c.format(dat=dat) for c in columns) + "\n")
    rc = subprocess.run(["gnuplot", gp], capture_output=True, text=True)
    if rc.returncode != 0:
        # pngcairo may be missing (gnuplot-nox has it; older builds do not)
        with open(gp) as f:
            script = f.read().replace("pngcairo size 1600,520 noenhanced "
                                      "font \",10\"", "png size 1600,520")
        rc = subprocess.run(["gnuplot"], input=script, capture_output=True,
                            text=True)
        if rc.returncode != 0:
            print("gnuplot failed: " + rc.stderr, file=sys.stderr)


if __name__ == "__main__":
    main()
