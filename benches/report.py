#!/usr/bin/env python3
"""benches/report.py — turns the raw measurements of benches/run.sh into summary.md and PNGs.

usage: report.py RESULTS_DIR

Reads RESULTS_DIR/meta.tsv, raw.tsv, phases.tsv, small.tsv and resume.md (written by run.sh);
writes RESULTS_DIR/summary.md, part1.png, capped.png and scale.png. Can be re-run on a
results folder to redraw. MB = 10^6 bytes, MiB = 2^20 bytes.
"""

import json
import os
import re
import statistics
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

OUT = sys.argv[1]
MIB = 1 << 20
GIB = 1 << 30
RATIO_TARGET = 1.15
SPEEDUP_TARGET = 2.0
RSS_TARGET_MIB = 64
CAP_TARGET = 0.9


def read_tsv(name):
    path = os.path.join(OUT, name)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [line.rstrip("\n").split("\t") for line in f if line.strip()]


# A key written by several invocations (RESULTS_DIR): the values joined, except the settings
# (var_*) and load averages, where each part's own is kept by its key and the last one wins.
meta = {}
for row in read_tsv("meta.tsv"):
    k, v = row[0], (row[1] if len(row) > 1 else "")
    if k in meta and k in ("started", "duration_s", "commit", "dirty", "load_start", "var_PARTS"):
        meta[k] = f"{meta[k]}; {v}" if meta[k] != v else v
    else:
        meta[k] = v


def var(name, default=""):
    return meta.get("var_" + name, default)


# raw.tsv: part tool param run wall user sys maxrss_kib status
raw = []
for r in read_tsv("raw.tsv"):
    if len(r) < 9:
        r = r + ["nan"] * (9 - len(r))
    part, tool, param, run, wall, user, sys_, rss, status = r[:9]
    try:
        raw.append(dict(part=part, tool=tool, param=param, run=int(run), wall=float(wall),
                        cpu=float(user) + float(sys_), user=float(user), sys=float(sys_),
                        rss=float(rss) / 1024, ok=status == "0"))
    except ValueError:
        raw.append(dict(part=part, tool=tool, param=param, run=int(run), wall=float("nan"),
                        cpu=float("nan"), user=float("nan"), sys=float("nan"), rss=float("nan"),
                        ok=False))

# phases.tsv: part param run transfer_ms hash_tail_ms publish_ms read_back [connections]
phases = []
for r in read_tsv("phases.tsv"):
    r = r + [""] * (8 - len(r))

    def num(x):
        try:
            return float(x)
        except ValueError:
            return float("nan")

    phases.append(dict(part=r[0], param=r[1], run=int(r[2]), transfer=num(r[3]) / 1000,
                       tail=num(r[4]) / 1000, publish=num(r[5]) / 1000, read_back=num(r[6]),
                       connections=num(r[7])))


def med(xs):
    xs = [x for x in xs if x == x]
    return statistics.median(xs) if xs else float("nan")


def rows(part, tool=None, param=None, ok_only=True):
    return [r for r in raw if r["part"] == part and (tool is None or r["tool"] == tool)
            and (param is None or r["param"] == param) and (r["ok"] or not ok_only)]


def stat(rs, key):
    xs = [r[key] for r in rs]
    if not xs:
        return float("nan"), float("nan"), float("nan")
    return med(xs), min(xs), max(xs)


def f(x, nd=2):
    return "n/a" if x != x else f"{x:.{nd}f}"


def verdict(ok):
    return "n/a" if ok is None else ("PASS" if ok else "MISS")


LABELS = {
    "blobstage": "blobstage fetch (download + sha256 + verify + publish)",
    "curl": "curl -o (download to disk only, bound)",
    "curl_sync": "curl -o, then fsync of the file (downloaded durably, as blobstage publishes)",
    "openssl": "openssl dgst -sha256 of the file (hash only, bound)",
    "pipe": "curl \\| tee file \\| openssl dgst -sha256 (verified)",
    "aria2c": "aria2c -x{n} -s{n} --checksum=sha-256 (verified)",
    "rclone": "rclone copyto :http: --multi-thread-streams {n} + sha256sum",
    "hf_transfer": "hf_transfer.download(max_files={n}, chunk 16 MiB) + sha256sum",
}
PEERS = [p for p in var("PEERS").split() if p]
md = []
headline = []  # (metric, target, measured, verdict)

# ------------------------------------------------------------------ machine

def page_reporting_rows(meta):
    """The guest's free page reporting (a VM's balloon), when it has one: see benches/README.md."""
    order = meta.get("page_reporting_order")
    if not order:
        return []
    start, end = meta.get("reported_kib_start", ""), meta.get("reported_kib_end", "")
    # With RESULTS_DIR, the last invocation's.
    given = f"{(int(end) - int(start)) / 1048576:.1f} GiB" if start and end else "?"
    state = "off during the run" if var("PAGE_REPORTING") == "off" else f"on (order {order})"
    rows_ = [("free page reporting to the VM host", f"{state}; reported during the run: {given}")]
    if meta.get("touched_mib"):
        rows_.append(("free memory touched once before the runs",
                      f"{int(meta['touched_mib']) / 1024:.1f} GiB in {meta.get('touch_s', '?')} s"))
    return rows_


md.append(f"# blobstage benchmark suite, {meta.get('started', '?')}")
if "; " in meta.get("started", ""):
    md.append("")
    md.append("Results of more than one invocation of `benches/run.sh` (the later ones with "
              "`RESULTS_DIR` set, adding parts); the settings below are the last invocation's, and "
              "each part's load average is from the invocation that ran it.")
md.append("")
md.append("Produced by `benches/run.sh` (see `benches/README.md`). MB/s = 10^6 bytes per second; "
          "RSS in MiB. Medians over runs, spread as min–max.")
md.append("")
md.append("## Machine and run")
md.append("")
host = meta.get("host", "")
m = re.match(r'host: nproc=(\d+), cpu="([^"]*)", sha_ni=(\w+), kernel (.*)', host)
nproc, cpu, sha, kernel = m.groups() if m else ("?", "?", "?", "?")
md.append("| item | value |")
md.append("|---|---|")
for k, v in [("nproc", nproc), ("CPU model", cpu), ("SHA-NI", sha), ("memory", meta.get("mem")),
             ("kernel", kernel), ("OS", meta.get("os")), ("work dir file system", meta.get("fstype")),
             ("repo commit", f"{meta.get('commit')} ({meta.get('dirty', '?')} tracked files modified in the work tree)"),
             *page_reporting_rows(meta),
             ("load average (1, 5, 15 min) at start", meta.get("load_start")),
             *[(f"load average before part {p}", meta.get(f"load_part{p}")) for p in "12345" if meta.get(f"load_part{p}")],
             ("load average at end", meta.get("load_end")),
             ("duration (per invocation)", "; ".join(f"{int(d) / 60:.1f} min" for d in meta.get("duration_s", "").split("; ") if d.isdigit()) or "?"),
             ("tools", meta.get("versions")),
             *([("note", meta["note"])] if meta.get("note") else []),
             ("settings", ", ".join(f"{k[4:]}={v}" for k, v in meta.items() if k.startswith("var_")))]:
    md.append(f"| {k} | {v} |")
md.append("")
headline_at = len(md)  # the headline table is inserted here at the end

# ------------------------------------------------------------------ part 1

size1 = int(var("SIZE_MIB", "0") or 0) * MIB
streams = var("PEER_STREAMS", "16")
bound_wall = float("nan")
p1 = rows("1")
if p1 or rows("1", ok_only=False):
    md.append(f"## Part 1: unthrottled loopback origin, {size1 // MIB} MiB, time to a verified file")
    md.append("")
    tools = ["blobstage", "curl"] + (["curl_sync"] if rows("1", "curl_sync", ok_only=False) else []) \
        + ["openssl"] + PEERS
    st = {}
    for t in tools:
        rs = rows("1", t)
        st[t] = dict(n=len(rs), fails=len(rows("1", t, ok_only=False)) - len(rs),
                     wall=stat(rs, "wall"), cpu=stat(rs, "cpu"), rss=stat(rs, "rss"),
                     user=stat(rs, "user"), sys=stat(rs, "sys"))
    bound_wall = max(st["curl"]["wall"][0], st["openssl"]["wall"][0])
    bs = st["blobstage"]["wall"][0]
    md.append("| tool | runs ok | wall median (s) | wall min–max (s) | MB/s | CPU user+sys median (s) | CPU s per GiB | peak RSS median (max) (MiB) | wall / blobstage |")
    md.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for t in tools:
        s = st[t]
        w, lo, hi = s["wall"]
        fails = f" ({s['fails']} failed)" if s["fails"] else ""
        md.append(f"| {LABELS.get(t, t).format(n=streams)} | {s['n']}{fails} | {f(w)} | {f(lo)}–{f(hi)} | "
                  f"{f(size1 / w / 1e6, 0) if w == w and w > 0 else 'n/a'} | {f(s['cpu'][0])} | "
                  f"{f(s['cpu'][0] / (size1 / GIB))} | {f(s['rss'][0], 1)} ({f(s['rss'][2], 1)}) | {f(w / bs)} |")
    md.append(f"| **bound** = max(curl -o, openssl dgst) | | {f(bound_wall)} | | "
              f"{f(size1 / bound_wall / 1e6, 0)} | | | | {f(bound_wall / bs)} |")
    md.append("")
    if "curl_sync" in st and st["curl_sync"]["n"]:
        durable = max(st["curl_sync"]["wall"][0], st["openssl"]["wall"][0])
        md.append(f"Durable bound max(curl -o + fsync, openssl dgst) = {f(durable)} s: blobstage / "
                  f"durable bound = **{f(bs / durable)}** (informative; `curl -o` leaves the file "
                  f"in the page cache, blobstage's time includes making the blob durable).")
        md.append("")
    ratio = bs / bound_wall
    peer_walls = {p: st[p]["wall"][0] for p in PEERS if st[p]["n"]}
    best = min(peer_walls, key=peer_walls.get) if peer_walls else None
    speedup = peer_walls[best] / bs if best else float("nan")
    md.append(f"blobstage / bound = **{f(ratio)}** (target ≤ {RATIO_TARGET}); best peer: "
              f"**{best}** at {f(peer_walls.get(best, float('nan')))} s, blobstage's speedup over it "
              f"**{f(speedup)}x** (target ≥ {SPEEDUP_TARGET}x).")
    md.append("")
    ph = [p for p in phases if p["part"] == "1"]
    if ph:
        md.append(f"blobstage's phases (from its `staged` log line, medians): transfer (first byte to "
                  f"last byte written and hashed) {f(med([p['transfer'] for p in ph]))} s, of which hash "
                  f"tail (last byte written to digest ready) {f(med([p['tail'] for p in ph]))} s; "
                  f"publish (fsync + rename) {f(med([p['publish'] for p in ph]))} s; read back for "
                  f"hashing {f(med([p['read_back'] for p in ph]) / MIB, 0)} MiB. blobstage user / sys "
                  f"CPU median {f(st['blobstage']['user'][0])} / {f(st['blobstage']['sys'][0])} s; "
                  f"openssl alone {f(st['openssl']['cpu'][0] / (size1 / GIB))} CPU s per GiB.")
        md.append("")
    headline.append(("blobstage wall / bound (part 1)", f"≤ {RATIO_TARGET}", f(ratio), verdict(ratio <= RATIO_TARGET + 1e-9) if ratio == ratio else "n/a"))
    headline.append(("speedup over the best peer (part 1)", f"≥ {SPEEDUP_TARGET}x", f"{f(speedup)}x (best peer {best})", verdict(speedup >= SPEEDUP_TARGET) if speedup == speedup else "n/a"))
    headline.append(("CPU s per GiB: blobstage vs openssl dgst alone (part 1)", "—",
                     f"{f(st['blobstage']['cpu'][0] / (size1 / GIB))} vs {f(st['openssl']['cpu'][0] / (size1 / GIB))}", "—"))

    # plot: wall and CPU per tool
    fig, ax = plt.subplots(figsize=(9, 4.8))
    names = [t for t in tools if st[t]["n"]]
    walls = [st[t]["wall"][0] for t in names]
    errs = [[st[t]["wall"][0] - st[t]["wall"][1] for t in names], [st[t]["wall"][2] - st[t]["wall"][0] for t in names]]
    cpus = [st[t]["cpu"][0] for t in names]
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], walls, 0.4, yerr=errs, capsize=3, label="wall time, median (min–max)", color="tab:blue")
    ax.bar([i + 0.2 for i in x], cpus, 0.4, label="CPU user+sys, median", color="tab:orange")
    ax.axhline(bound_wall, color="k", ls="--", lw=1, label=f"bound max(curl -o, openssl) = {bound_wall:.2f} s")
    ax.set_xticks(list(x))
    ax.set_xticklabels([{"pipe": "curl|tee|openssl", "curl": "curl -o\n(no hash)", "openssl": "openssl dgst\n(no download)"}.get(t, t) for t in names], fontsize=9)
    ax.set_ylabel("seconds")
    ax.set_title(f"Part 1: {size1 // MIB} MiB from nginx on loopback, time to a verified file")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(OUT, "part1.png"), dpi=110)
    plt.close(fig)
    md.append("Plot: `part1.png`.")
    md.append("")

# ------------------------------------------------------------------ part 2

p2 = rows("2", ok_only=False)
if p2:
    cap_mibps = float(var("CAP_MIBPS", "16"))
    cap = cap_mibps * MIB / 1e6
    size2 = int(var("CAP_SIZE_MIB")) * MIB
    bound_mbps = size1 / bound_wall / 1e6 if bound_wall == bound_wall else float("inf")
    conns = [int(n) for n in var("CAP_CONNS").split()]
    tools2 = var("CAP_TOOLS").split()
    md.append(f"## Part 2: origin capped at {cap_mibps:g} MiB/s ({cap:.2f} MB/s) per connection, {size2 // MIB} MiB")
    md.append("")
    md.append("Throughput = blob size / median wall time to a verified file. `% of N×cap` is the "
              "throughput against N × cap; `ideal` is min(N × cap, the unthrottled bound of part 1 "
              f"= {f(bound_mbps, 0)} MB/s).")
    md.append("")
    hdr = "| N | N × cap (MB/s) | ideal (MB/s) |" + "".join(f" {t} MB/s (min–max) | {t} % of N×cap |" for t in tools2)
    md.append(hdr)
    md.append("|---:|---:|---:|" + "---:|---:|" * len(tools2))
    series = {t: [] for t in tools2}
    worst = None
    for n in conns:
        ideal = min(n * cap, bound_mbps)
        line = f"| {n} | {f(n * cap, 1)} | {f(ideal, 0)} |"
        for t in tools2:
            rs = rows("2", t, str(n))
            if not rs:
                why = "not run (aria2c caps -x at 16)" if t == "aria2c" and n > 16 else (
                    "failed" if rows("2", t, str(n), ok_only=False) else "not run")
                line += f" {why} | |"
                continue
            w, lo, hi = stat(rs, "wall")
            mbps = size2 / w / 1e6
            series[t].append((n, mbps, size2 / hi / 1e6, size2 / lo / 1e6))
            line += f" {f(mbps, 1)} ({f(size2 / hi / 1e6, 0)}–{f(size2 / lo / 1e6, 0)}) | {f(100 * mbps / (n * cap), 0)} % |"
            if t == "blobstage" and n * cap <= bound_mbps:
                frac = mbps / (n * cap)
                if worst is None or frac < worst[0]:
                    worst = (frac, n)
        md.append(line)
    md.append("")
    auto = rows("2", "blobstage", "auto")
    auto_point = None
    if auto:
        start = int(var("CONNECTIONS_PER_BLOB", "8"))
        size_auto = int(var("CAP_AUTO_SIZE_MIB", var("CAP_SIZE_MIB"))) * MIB
        w, lo, hi = stat(auto, "wall")
        mbps = size_auto / w / 1e6
        ended = [p["connections"] for p in phases if p["part"] == "2" and p["param"] == "auto"]
        ended_text = ", ".join(f"{c:.0f}" for c in ended if c == c) or "?"
        end_med = med(ended)
        auto_point = (end_med, mbps, size_auto / hi / 1e6, size_auto / lo / 1e6)
        fixed = dict((n, y) for n, y, _, _ in series.get("blobstage", []))
        against = ""
        if end_med == end_med and int(end_med) in fixed:
            against = (f", {f(mbps / fixed[int(end_med)])} × the fixed {int(end_med)} connections' "
                       f"{f(fixed[int(end_med)], 0)} MB/s")
        md.append(f"blobstage with its defaults (starts at {start} connections and adds more while "
                  f"they pay off, up to `max_connections_per_blob`), {size_auto // MIB} MiB blob: "
                  f"**{f(mbps, 1)} MB/s** ({f(size_auto / hi / 1e6, 0)}–{f(size_auto / lo / 1e6, 0)}) "
                  f"over the whole transfer, {f(mbps / (start * cap))} × its starting {start} × cap"
                  f"{against}; connections at the end, per run: {ended_text}. The time includes the "
                  f"growth: {start} connections for the first 2 s, then one step (× 1.5) every 1.5 s "
                  f"while each step pays.")
        md.append("")
    if worst:
        headline.append((f"capped origin: blobstage throughput / (N × {cap:.1f} MB/s), worst N while N × cap ≤ bound (part 2)",
                         f"≥ {CAP_TARGET}", f"{f(worst[0])} at N={worst[1]}", verdict(worst[0] >= CAP_TARGET)))
    fig, ax = plt.subplots(figsize=(8, 5))
    xs = [n for n in conns]
    ax.plot(xs, [n * cap for n in xs], "k--", lw=1, label=f"ideal N × cap ({cap:.1f} MB/s per connection)")
    if bound_mbps != float("inf"):
        ax.axhline(bound_mbps, color="grey", ls=":", lw=1.2, label=f"unthrottled bound, part 1 ({bound_mbps:.0f} MB/s)")
    markers = {"blobstage": "o", "aria2c": "s", "rclone": "^", "hf_transfer": "D"}
    for t, pts in series.items():
        if not pts:
            continue
        n_, y, lo, hi = zip(*pts)
        ax.errorbar(n_, y, yerr=[[a - b for a, b in zip(y, lo)], [b - a for a, b in zip(y, hi)]],
                    marker=markers.get(t, "o"), capsize=3, label=f"{t} (median, min–max)")
    if auto_point and auto_point[0] == auto_point[0]:
        n_, y, lo, hi = auto_point
        ax.errorbar([n_], [y], yerr=[[y - lo], [hi - y]], marker="*", ms=12, capsize=3, ls="none",
                    label=f"blobstage, defaults, {size_auto // MIB} MiB: mean over the transfer "
                          "(x = connections at the end)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xticks(xs)
    ax.set_xticklabels([str(n) for n in xs])
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("connections (N)")
    ax.set_ylabel("throughput to a verified file (MB/s, log scale)")
    ax.set_title(f"Part 2: nginx limit_rate {cap_mibps:g} MiB/s per connection, {size2 // MIB} MiB blob")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(OUT, "capped.png"), dpi=110)
    plt.close(fig)
    md.append("Plot: `capped.png`.")
    md.append("")

# ------------------------------------------------------------------ part 3

p3 = rows("3", ok_only=False)
if p3:
    sizes = [int(s) for s in var("SCALE_SIZES_MIB").split()]
    md.append("## Part 3: blobstage against blob size (unthrottled)")
    md.append("")
    md.append("| size (MiB) | runs ok | wall median (s) | wall min–max (s) | s per GiB | MB/s | CPU user+sys median (s) | peak RSS median (MiB) | peak RSS max (MiB) | hash tail median (s) |")
    md.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    pts = []
    for s in sizes:
        rs = rows("3", "blobstage", str(s))
        w, lo, hi = stat(rs, "wall")
        rss = stat(rs, "rss")
        tail = med([p["tail"] for p in phases if p["part"] == "3" and p["param"] == str(s)])
        md.append(f"| {s} | {len(rs)} | {f(w)} | {f(lo)}–{f(hi)} | {f(w / (s / 1024))} | {f(s * MIB / w / 1e6, 0)} | "
                  f"{f(stat(rs, 'cpu')[0])} | {f(rss[0], 1)} | {f(rss[2], 1)} | {f(tail)} |")
        if rs:
            pts.append((s, w, lo, hi, rss[0], rss[1], rss[2]))
    md.append("")
    by = {p[0]: p for p in pts}
    r2 = by.get(2048, (0,) * 7)[6] if 2048 in by else float("nan")
    r8 = by.get(8192, (0,) * 7)[6] if 8192 in by else float("nan")
    rmax = max((p[6] for p in pts), default=float("nan"))
    if pts:
        headline.append(("peak RSS at 2 GiB / 8 GiB, max over runs (part 3)", f"≤ {RSS_TARGET_MIB} MiB, flat",
                         f"{f(r2, 1)} / {f(r8, 1)} MiB (max over all sizes {f(rmax, 1)})",
                         verdict(rmax <= RSS_TARGET_MIB)))
        if len(pts) >= 2:
            a, b = pts[0], pts[-1]
            headline.append(("time per GiB, smallest vs largest size (part 3)", "flat (linear time)",
                             f"{f(a[1] / (a[0] / 1024))} vs {f(b[1] / (b[0] / 1024))} s/GiB", "—"))
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
        gib = [p[0] / 1024 for p in pts]
        ax1.errorbar(gib, [p[1] for p in pts], yerr=[[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]],
                     marker="o", capsize=3, label="blobstage fetch, wall (median, min–max)")
        if len(pts) >= 1:
            big = pts[-1]
            ax1.plot([0, big[0] / 1024], [0, big[1]], "k--", lw=1, label="linear through the largest size")
        ax1.set_xlabel("blob size (GiB)")
        ax1.set_ylabel("wall time to a verified, published file (s)")
        ax1.set_title("time against size")
        ax1.grid(alpha=0.3)
        ax1.legend(fontsize=8)
        ax2.errorbar(gib, [p[4] for p in pts], yerr=[[p[4] - p[5] for p in pts], [p[6] - p[4] for p in pts]],
                     marker="o", capsize=3, color="tab:green", label="blobstage peak RSS (median, min–max)")
        ax2.axhline(RSS_TARGET_MIB, color="r", ls="--", lw=1, label=f"target {RSS_TARGET_MIB} MiB")
        ax2.set_ylim(0, max(RSS_TARGET_MIB * 1.25, max(p[6] for p in pts) * 1.1))
        ax2.set_xlabel("blob size (GiB)")
        ax2.set_ylabel("peak RSS (MiB)")
        ax2.set_title("memory against size")
        ax2.grid(alpha=0.3)
        ax2.legend(fontsize=8, loc="lower right")
        fig.suptitle("Part 3: blobstage fetch from nginx on loopback, unthrottled")
        fig.tight_layout()
        fig.savefig(os.path.join(OUT, "scale.png"), dpi=110)
        plt.close(fig)
        md.append("Plot: `scale.png`.")
        md.append("")

# ------------------------------------------------------------------ part 4

small = read_tsv("small.tsv")
if small:
    tck = float(meta.get("clk_tck", "100") or 100)
    md.append(f"## Part 4: {var('SMALL_COUNT')} blobs of {var('SMALL_KIB')} KiB through the daemon, "
              f"{var('SMALL_CLIENTS')} concurrent clients")
    md.append("")
    md.append(f"Each pull: `POST /v1/pulls` on the daemon's Unix socket, then `GET /v1/pulls/<id>?wait=30s` "
              f"until `staged` (a new connection per request); fresh state dir and daemon per run; "
              f"`max_transfers = {var('SMALL_MAX_TRANSFERS')}`.")
    md.append("")
    md.append("| run | pulls staged | errors | wall (s) | pulls/s | p50 (ms) | p90 (ms) | p99 (ms) | daemon CPU user+sys (s) | daemon CPU per pull (ms) | daemon peak RSS (MiB) |")
    md.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rates = []
    for r in small:
        try:
            j = json.loads(r[1])
        except (ValueError, IndexError):
            md.append(f"| {r[0]} | failed: {r[1] if len(r) > 1 else ''} |")
            continue
        cpu = (float(r[2] or "nan") + float(r[3] or "nan")) / tck
        rates.append(j["per_s"] or 0)
        md.append(f"| {r[0]} | {j['staged']} | {j['errors']} | {f(j['wall_s'])} | {f(j['per_s'], 0)} | "
                  f"{j['p50_ms']} | {j['p90_ms']} | {j['p99_ms']} | {f(cpu)} | "
                  f"{f(1000 * cpu / max(1, j['staged']))} | {f(float(r[4] or 'nan') / 1024, 1)} |")
        if j.get("first_error"):
            md.append(f"| | first error: {j['first_error'][:200]} |")
    md.append("")
    if rates:
        md.append(f"Median: **{f(med(rates), 0)} pulls/s** (min {f(min(rates), 0)}, max {f(max(rates), 0)}).")
        md.append("")
        headline.append((f"{var('SMALL_KIB')} KiB blobs through the daemon, {var('SMALL_CLIENTS')} clients (part 4)", "—",
                         f"{f(med(rates), 0)} pulls/s", "—"))

# ------------------------------------------------------------------ part 5

resume = os.path.join(OUT, "resume.md")
if os.path.exists(resume):
    text = open(resume).read()
    md.append("## Part 5: resume after kill -9 at 50 % (benches/resume.sh)")
    md.append("")
    lines = text.splitlines()
    table = [l for l in lines if l.startswith("| run |") and "uninterrupted (s)" in l]
    if table:
        i = lines.index(table[0])
        j = i
        while j < len(lines) and lines[j].startswith("|"):
            j += 1
        md.extend(lines[i:j])
        md.append("")
    for l in lines:
        if l.startswith("setup:") or l.startswith("bound:") or "FAILED" in l:
            md.append(l)
            md.append("")
        if l.startswith("bound:"):
            m = re.search(r"(PASS|MISS) \(max over runs ([0-9.]+) MiB\)", l)
            if m:
                medrow = [x for x in lines if x.startswith("| **median**")]
                cells = [c.strip() for c in medrow[0].split("|")] if medrow else []
                extra = f"; (killed + resumed) / uninterrupted median {cells[5]}" if len(cells) > 5 else ""
                headline.append(("resume: bytes re-fetched after kill -9 at 50 %, max over runs (part 5)",
                                 "≤ 128 MiB", f"{m.group(2)} MiB{extra}", m.group(1)))
    md.append("Full report: `resume.md`.")
    md.append("")

# ------------------------------------------------------------------ headline

head = ["## Headline against the targets", "",
        "| metric | target | measured | verdict |", "|---|---|---|---|"]
head += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in headline]
if meta.get("failed") == "1":
    head += ["", "**Some measurements failed**; see the tables (runs ok) and the run's log."]
head.append("")
md[headline_at:headline_at] = head

with open(os.path.join(OUT, "summary.md"), "w") as fh:
    fh.write("\n".join(md) + "\n")
