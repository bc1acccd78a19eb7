#!/usr/bin/env python3
"""Turns scripts/bench.sh's JSON lines into the BENCHMARKS.md section between the
`<!-- bench:begin -->` and `<!-- bench:end -->` markers (or prints it, with '-')."""
import datetime
import json
import os
import platform
import subprocess
import sys

results, target, commit = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "", sys.argv[3] if len(sys.argv) > 3 else "?"
rows = [json.loads(l) for l in open(results) if l.strip()]
by = {}
for r in rows:
    by.setdefault(r["scenario"], []).append(r)


def cpu_model():
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def sh(cmd):
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True).stdout.strip()
    except OSError:
        return "?"


out = []
w = out.append
small = os.environ.get("BENCH_WORKLOAD", "big") == "small"
title = "Second workload (small deltas)" if small else "Relay benchmark"
paths = [p for p in ("direct", "websocat", "litellm", "turnpike", "turnpike-1w") if any(r["path"] == p for r in rows)]
names = {"direct": "direct", "websocat": "websocat", "litellm": "LiteLLM", "turnpike": "turnpike",
         "turnpike-1w": "turnpike (1 worker)"}
w(f"## {title}: {' vs '.join(names[p] for p in paths)} ({datetime.date.today()}, commit {commit})")
w("")
w(f"Machine: {os.cpu_count()} cores ({cpu_model()}), {round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30)} GiB, "
  f"Linux {platform.release()}, {sh('rustc --version')}. Load generator, upstream and relay share the cores.")
upstream = ("`BENCH_WORKLOAD=small scripts/bench.sh` … upstream `bench upstream-async`: one tokio thread, "
            "~60-byte deltas each written and flushed on its own, stamped at send"
            if small else
            "`scripts/bench.sh` … upstream `bench upstream`: a thread per connection, ~200-byte deltas stamped at send")
w(f"Command: {upstream} (release builds; websocat 4.0.0-alpha3 `--text ws-l: ws://`, TCP_NODELAY by "
  "`scripts/nodelay.c` preloaded; " + ("LiteLLM 1.108.7 `litellm --num_workers 1` (uvloop), its "
  "`/openai/v1/responses` WebSocket passthrough; " if "litellm" in paths else "") +
  "latency = stamp → client receive).")
w("")
labels = {
    "s1_500eps": "1 session, 500 events/s",
    "s100_50keps": "100 sessions, 50k events/s paced",
    "s1000_20keps": "1,000 sessions, 20k events/s paced",
    "s100_saturation": "100 sessions, unpaced (saturation)",
    "s25x4lanes_50keps": "25 sessions × 4 lanes side by side, 50k events/s paced",
}
def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def merged(rs, path):
    """The median of each figure over a path's rounds, and the rounds' p50 range."""
    rows_of = [x for x in rs if x["path"] == path]
    runs = [x["r"] for x in rows_of]
    if not runs:
        return None
    m = {k: median([r[k] for r in runs]) for k in ("p50_us", "p99_us", "p999_us", "events_per_s")}
    cpu = [r["cpu_s_per_m_events"] for r in runs if r.get("cpu_s_per_m_events") is not None]
    m["cpu"] = median(cpu) if cpu else None
    m["cpu_range"] = (min(cpu), max(cpu)) if cpu else None
    # The user share of the relay's CPU (runs that recorded it: system time is the kernel's).
    share = [r["relay_user_s"] / r["relay_cpu_s"] for r in runs
             if r.get("relay_user_s") is not None and r.get("relay_cpu_s")]
    m["user_share"] = median(share) if share else None
    # The relay's context switches per event, voluntary (it waited) and involuntary (preempted).
    sw = [(r["relay_vol_switches_per_event"], r["relay_invol_switches_per_event"]) for r in runs
          if r.get("relay_vol_switches_per_event") is not None]
    m["switches"] = (median([v for v, _ in sw]), median([i for _, i in sw])) if sw else None
    m["p50_range"] = (min(r["p50_us"] for r in runs), max(r["p50_us"] for r in runs))
    # The upstream's and the load generator's CPU, in cores over the run: neither may bound a row.
    up = [r["upstream_cpu_s"] / r["secs"] for r in runs if r.get("upstream_cpu_s") is not None and r.get("secs")]
    gen = [r["loadgen_cpu_s"] / r["secs"] for r in runs if "loadgen_cpu_s" in r and r.get("secs")]
    m["up_cores"] = median(up) if up else None
    m["gen_cores"] = median(gen) if gen else None
    m["failed"] = sum(r["failed"] for r in runs)
    m["runs"] = len(runs)
    return m


if any(k in by for k in labels):
    w("Medians over the rounds (each round runs the paths one after another); p50 and CPU "
      "show [lowest–highest] round. *added* = the path's figure minus direct's. *upstream / load gen*: "
      "their CPU in cores over the run; *sw*: the relay's context switches per event, voluntary "
      "(it waited for work) + involuntary (another process took its CPU)" + (" — the async upstream has one thread, so at ≥ 0.90 (⚑) it, "
      "not the path, bounds the row's events/s" if small else "") + ".")
    w("")
    w("| workload | path | p50 µs | p99 µs | p99.9 µs | added p50 / p99 / p99.9 µs | events/s | relay CPU-s per 1M events | upstream / load gen cores | rounds, failed sessions |")
    w("|---|---|---|---|---|---|---|---|---|---|")
    for scen, label in labels.items():
        rs = by.get(scen, [])
        direct = merged(rs, "direct")
        for path in paths:
            m = merged(rs, path)
            if m is None:
                continue
            added = "—"
            if direct and path != "direct":
                added = " / ".join(f"{m[k] - direct[k]:+.0f}" for k in ("p50_us", "p99_us", "p999_us"))
            cpu = "—" if m["cpu"] is None else f"{m['cpu']:.2f} [{m['cpu_range'][0]:.2f}–{m['cpu_range'][1]:.2f}]"
            if m["user_share"] is not None:
                cpu += f", user {m['user_share']:.0%}"
            if m["switches"] is not None:
                cpu += ", sw {:.2f} + {:.2f}".format(*m["switches"])
            lo, hi = m["p50_range"]
            load = " / ".join("—" if c is None else f"{c:.2f}" for c in (m["up_cores"], m["gen_cores"]))
            if small and m["up_cores"] is not None and m["up_cores"] >= 0.9:
                load += " ⚑"
            w(f"| {label} | {names[path]} | {m['p50_us']:.0f} [{lo:.0f}–{hi:.0f}] | {m['p99_us']:.0f} | {m['p999_us']:.0f} | {added} | "
              f"{m['events_per_s']:,.0f} | {cpu} | {load} | {m['runs']}, {m['failed']} |")
    w("")
shorts = {"s100_short20": "100 sessions, turns of 20 events, unpaced",
          "s100_short200": "100 sessions, turns of 200 events, unpaced"}
if any(k in by for k in shorts):
    w("Short turns (#40): saturation in turns/s and the relay's CPU per turn (its CPU per event "
      "× events per turn), medians over the rounds; *vs websocat* = turnpike's figure ÷ websocat's.")
    w("")
    w("| workload | path | turns/s | relay CPU µs per turn | vs websocat (turns/s, CPU/turn) | p50 µs | rounds, failed sessions |")
    w("|---|---|---|---|---|---|---|")
    for scen, label in shorts.items():
        rs = by.get(scen, [])
        per_turn = rs[0]["r"]["events_per_turn"] if rs else 1
        ws = merged(rs, "websocat")
        for path in paths:
            m = merged(rs, path)
            if m is None:
                continue
            tps = m["events_per_s"] / per_turn
            cpu = None if m["cpu"] is None else m["cpu"] * per_turn
            vs = "—"
            if ws and path not in ("websocat", "direct") and cpu is not None and ws["cpu"]:
                vs = f"{tps / (ws['events_per_s'] / per_turn):.2f}×, {cpu / (ws['cpu'] * per_turn):.2f}×"
            cpu_s = "—" if cpu is None else f"{cpu:.1f}"
            w(f"| {label} | {names[path]} | {tps:,.0f} | {cpu_s} | {vs} | {m['p50_us']:.0f} | {m['runs']}, {m['failed']} |")
    w("")
if "ttfe" in by:
    w("Time to first event (request sent → first event read), 100 fresh WebSockets one after another, "
      "3 turns each; turn 1 needs an upstream socket (turnpike dials one: each client has its own "
      "`session-id`), turns 2–3 reuse it:")
    w("")
    w("| path | turn 1 p50 / p90 µs | turns 2–3 p50 / p90 µs |")
    w("|---|---|---|")
    for x in by["ttfe"]:
        r = x["r"]
        w(f"| {x['path']} | {r['fresh_p50_us']:.0f} / {r['fresh_p90_us']:.0f} | {r['warm_p50_us']:.0f} / {r['warm_p90_us']:.0f} |")
    w("")
if "http" in by:
    w("The HTTP surface beside the WebSocket mode, same upstream: one client, 300 streamed turns of "
      "200 events one after another — HTTP: `POST /v1/responses` with `stream: true` on one keep-alive "
      "connection; WebSocket: one socket. `turnpike` sends an HTTP client's turn on a pooled upstream "
      "WebSocket (`upstream.http_transport = \"ws\"`, the default), `turnpike, HTTP upstream` as a POST "
      "(`\"http\"`). Medians over the rounds; *first event* = request written → first SSE event read.")
    w("")
    w("| transport | path | first event p50 / p90 µs | first delta: written → upstream stamp / stamp → read, p50 µs | events/s | relay CPU-s per 1M events |")
    w("|---|---|---|---|---|---|")
    for scen, transport in (("http", "HTTP + SSE"), ("http_ws", "WebSocket")):
        for path in ("direct", "turnpike", "turnpike-httpup"):
            runs = [x["r"] for x in by.get(scen, []) if x["path"] == path]
            if not runs:
                continue
            first = "—"
            if "first_p50_us" in runs[0]:
                first = f"{median([r['first_p50_us'] for r in runs]):.0f} / {median([r['first_p90_us'] for r in runs]):.0f}"
            legs = "—"
            if "delta_there_p50_us" in runs[0]:
                legs = f"{median([r['delta_there_p50_us'] for r in runs]):.0f} / {median([r['delta_back_p50_us'] for r in runs]):.0f}"
            cpu = [r["cpu_s_per_m_events"] for r in runs if r.get("cpu_s_per_m_events") is not None]
            cpu = f"{median(cpu):.2f}" if cpu else "—"
            shown = {"turnpike-httpup": "turnpike, HTTP upstream"}.get(path, path)
            w(f"| {transport} | {shown} | {first} | {legs} | {median([r['events_per_s'] for r in runs]):,.0f} | {cpu} |")
    w("")
idle = by.get("idle1k", []) + by.get("idle10k", [])
if idle:
    w("Memory per idle session (each ran one turn and holds its upstream socket; fresh relays; "
      "sessions opened in two halves). *Overall*: RSS with all open minus before, per session — "
      "includes what the first sessions warm once (SQLite page cache, request pools); "
      "*marginal*: the second half's growth per session:")
    w("")
    w("| sessions | path | open | RSS before → half → all (MiB) | KiB per session overall | marginal |")
    w("|---|---|---|---|---|---|")
    for x in idle:
        r = x["r"]
        w(f"| {r['sessions']:,} | {x['path']} | {r['open']:,} | {r['rss_before_kib'] / 1024:.1f} → "
          f"{r['rss_half_kib'] / 1024:.1f} → {r['rss_with_kib'] / 1024:.1f} | {r['kib_per_session']:.1f} | "
          f"{r['marginal_kib_per_session']:.1f} |")
    w("")
if "rows" in by:
    w("Accounting (`examples/rowbench.rs`: the accounting actor's batch query — usage row, ledger row, key spend, "
      "user balance — 20,000 records in batches of 500; then 1,000 with one transaction each) and the spool "
      "(one record appended and fsynced, 500 times: what a lone terminal event waits for):")
    w("")
    w("| database | batched rows/s | one tx per row, rows/s | spool append+fsync p50 / p99 / max µs |")
    w("|---|---|---|---|")
    for x in by["rows"]:
        r = x["r"]
        w(f"| {x['path']} | {r['batched_rows_per_s']:,.0f} | {r['per_row_tx_rows_per_s']:,.0f} | "
          f"{r['spool_fsync_p50_us']} / {r['spool_fsync_p99_us']} / {r['spool_fsync_max_us']} |")
    w("")
section = "\n".join(out)
print(section)
if target == "-":
    sys.exit(0)
path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "BENCHMARKS.md")
text = open(path).read()
# Each workload has its own section: `bench:` (big deltas), `bench-small:` (small deltas).
marker = "bench" if os.environ.get("BENCH_WORKLOAD", "big") == "big" else "bench-small"
begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
if begin in text and end in text:
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    text = f"{head}{begin}\n{section}\n{end}{tail}"
else:
    text = text.rstrip("\n") + f"\n\n{begin}\n{section}\n{end}\n"
open(path, "w").write(text)
print(f"bench: written to {os.path.normpath(path)}", file=sys.stderr)
