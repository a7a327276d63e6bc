#!/usr/bin/python3
"""bench/report.py: turn bench/run's fio results into a markdown table.

    report.py --one FIO.json CPU_TICKS       one line for the progress log
    report.py --results results.tsv --clk-tck 100 [--meta k=v]...
              [--markdown FILE] [--plot FILE.png --plot-dir DIR]

results.tsv has one line per measurement:
    workload  server  round  server-cpu-ticks  fio-json
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
}
ORDER = list(WORKLOADS)

SERVERS = {
    "qnbd": "qnbd (default: writeback)",
    "qnbd-none": "qnbd --cache=none",
    "qnbd-threads": "qnbd --aio=threads",
    "qemu-nbd": "qemu-nbd --cache=none",
    "qemu-nbd-wb": "qemu-nbd --cache=writeback",
    "nbdkit": "nbdkit file (raw copy)",
}
SERVER_ORDER = list(SERVERS)


def load_fio(path):
    with open(path) as f:
        text = f.read()
    d = json.loads(text[text.index("{"):])
    ios = iops = bw = 0.0
    for job in d["jobs"]:
        if job.get("error"):
            raise SystemExit(f"{path}: fio job error {job['error']}")
        for rw in ("read", "write"):
            ios += job[rw]["total_ios"]
            iops += job[rw]["iops"]
            bw += job[rw]["bw_bytes"]
    return {"ios": ios, "iops": iops, "mibs": bw / 1048576.0}


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
    return (f"{m['iops'] / 1000:.1f}k IOPS, {m['mibs']:.0f} MiB/s, "
            f"server CPU {cpu_us:.1f} µs/IO")


def primary_qnbd(servers):
    for s in ("qnbd", "qnbd-none"):
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
    runs = {}   # (workload, server) -> list of {value, cpu_us}
    with open(a.results) as f:
        for line in f:
            w, s, r, ticks, path = line.rstrip("\n").split("\t")
            m = load_fio(path)
            unit = WORKLOADS[w][1]
            cpu_us = int(ticks) / a.clk_tck / m["ios"] * 1e6 if m["ios"] else None
            runs.setdefault((w, s), []).append(
                {"v": value(m, unit), "cpu": cpu_us})

    med = {}    # (w, s) -> (median, min, max, median cpu)
    for key, lst in runs.items():
        vs = [x["v"] for x in lst]
        cpus = [x["cpu"] for x in lst if x["cpu"] is not None]
        med[key] = (statistics.median(vs), min(vs), max(vs),
                    statistics.median(cpus) if cpus else None)

    def m(w, s):
        return med[(w, s)][0] if (w, s) in med else None

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
      "column's server (higher is better); CPU is the server process's "
      "utime+stime during the measured run over the number of I/Os fio "
      "completed (lower is better).")
    p("")
    p("| workload | server | median | min–max | × qemu-nbd none "
      "| × qemu-nbd wb | × nbdkit raw | server CPU µs/IO "
      "| CPU × qemu-nbd |")
    p("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for w in ORDER:
        servers = [s for s in SERVER_ORDER if (w, s) in med]
        if not servers:
            continue
        title, unit, _ = WORKLOADS[w]
        ref = reference_qemu(servers)
        for s in servers:
            v, lo, hi, c = med[(w, s)]
            p(f"| {title} ({unit}) | {SERVERS[s]} | {fmt_value(v, unit)} "
              f"| {fmt_value(lo, unit)}–{fmt_value(hi, unit)} "
              f"| {fmt_ratio(ratio(v, m(w, 'qemu-nbd')))} "
              f"| {fmt_ratio(ratio(v, m(w, 'qemu-nbd-wb')))} "
              f"| {fmt_ratio(ratio(v, m(w, 'nbdkit')))} "
              f"| {'–' if c is None else f'{c:.1f}'} "
              f"| {fmt_ratio(ratio(c, cpu(w, ref)) if ref else None)} |")
    p("")

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


def plot(a, med, m):
    rows = []
    for w in ORDER:
        servers = [s for s in SERVER_ORDER if (w, s) in med]
        q = primary_qnbd(servers)
        if q is None:
            continue

        def r(o):
            x = m(w, o)
            return f"{m(w, q) / x:.3f}" if x else "NaN"
        label = w + ("\\n(--cache=none)" if q == "qnbd-none" else "")
        rows.append(f"\"{label}\" {r('qemu-nbd')} {r('qemu-nbd-wb')} "
                    f"{r('nbdkit')}")
    dat = os.path.join(a.plot_dir, "ratios.dat")
    with open(dat, "w") as f:
        f.write("\n".join(rows) + "\n")
    gp = os.path.join(a.plot_dir, "ratios.gp")
    with open(gp, "w") as f:
        f.write(f"""set terminal pngcairo size 1100,520 noenhanced font ",10"
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
plot "{dat}" using 2:xtic(1) title "/ qemu-nbd --cache=none", \\
     "" using 3 title "/ qemu-nbd --cache=writeback", \\
     "" using 4 title "/ nbdkit file (raw)"
""")
    rc = subprocess.run(["gnuplot", gp], capture_output=True, text=True)
    if rc.returncode != 0:
        # pngcairo may be missing (gnuplot-nox has it; older builds do not)
        with open(gp) as f:
            script = f.read().replace("pngcairo size 1100,520 noenhanced "
                                      "font \",10\"", "png size 1100,520")
        rc = subprocess.run(["gnuplot"], input=script, capture_output=True,
                            text=True)
        if rc.returncode != 0:
            print("gnuplot failed: " + rc.stderr, file=sys.stderr)


if __name__ == "__main__":
    main()
