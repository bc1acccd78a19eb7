#!/usr/bin/env python3
"""Where a one-session latency tail is spent, from the scheduler's view (docs/benchmarks-history.md, "The
one-session tail").

    perf sched record -o S.data -- target/release/examples/bench stream URL KEY 1 3 1500 2000
    perf sched timehist -w -i S.data > S.txt
    python3 scripts/sched_gaps.py S.txt

Finds the three threads of the path from their wake-ups — the upstream's connection thread
(woken by its pacing timer, it stamps and writes an event), the relay thread it wakes, the
client thread the relay wakes — and prints, for the two hops, how many events took over 0.5 ms
and how many of those overlap a run of a kernel thread (kdamond, kworker, ksoftirqd …) on the
machine. The relay hop runs from the upstream's wake-up of a relay thread to a relay thread's
wake-up of the client: one thread when the session and its upstream connection share one, two
(and a wake-up between them) when they do not."""
import sys
from collections import Counter

SLOW = 0.0005

wakes, kernel_runs = [], []
for line in open(sys.argv[1]):
    p = line.split()
    if len(p) < 3:
        continue
    try:
        t = float(p[0])
    except ValueError:
        continue
    if "awakened:" in line:
        wakes.append((t, p[2], line.split("awakened:")[1].strip()))
    elif len(p) >= 6 and p[2].split("[")[0].startswith(("kdamond", "kworker", "ksoftirqd", "kswapd")):
        try:
            kernel_runs.append((t - float(p[5]) / 1e3, t, p[2]))
        except ValueError:
            pass

pairs = Counter((w, tg) for _, w, tg in wakes if w.startswith("bench") and tg.startswith("actix-rt"))
if not pairs:
    sys.exit("no upstream → relay wake-ups found (is this a turnpike run?)")
(up, _), _ = pairs.most_common(1)[0]
client = Counter(tg for _, w, tg in wakes if w.startswith("actix-rt") and tg.startswith("bench")).most_common(1)
client = client[0][0] if client else None
relays = {tg for _, w, tg in wakes if w == up and tg.startswith("actix-rt")}


def hop(start, end):
    """(gap, at) for each `start` wake-up followed by an `end` one."""
    out, pending = [], None
    for t, w, tg in wakes:
        if start(w, tg):
            pending = t
        elif end(w, tg) and pending is not None:
            out.append((t - pending, pending))
            pending = None
    return out


def report(name, gaps):
    slow = [(g, t) for g, t in gaps if g > SLOW]
    by = Counter(next((k for s, e, k in kernel_runs if s < t + g and e > t), "nothing").split("[")[0] for g, t in slow)
    worst = max((g for g, _ in gaps), default=0) * 1e6
    print(f"{name}: {len(gaps)} events, {len(slow)} over {SLOW * 1e6:.0f} µs (max {worst:.0f} µs); "
          f"a kernel thread ran meanwhile: {dict(by) or '-'}")


report("upstream woken → relay woken", hop(lambda w, tg: tg == up, lambda w, tg: w == up and tg in relays))
report("relay woken → client woken", hop(lambda w, tg: w == up and tg in relays, lambda w, tg: w.startswith("actix-rt") and tg == client))
runs = [k for k in kernel_runs if k[2].startswith("kdamond")]
if runs:
    span = runs[-1][1] - runs[0][0]
    print(f"kdamond: {len(runs)} runs, mean {sum(e - s for s, e, _ in runs) / len(runs) * 1e3:.2f} ms, "
          f"one every {span / len(runs) * 1e3:.0f} ms")
