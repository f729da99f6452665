"""Shared views beyond identical row-mode subscribers: datagrid-shaped viewers, and a mix.

``run.py --scenarios fanout`` measures subscribers that all hold the same view with row-mode
``on_update``. This measures the two other shapes the shared-views issue names, ours and the
reference handler on the same stack, both subscribed at once and fed in alternating windows:

- ``viewer``: every subscriber holds the same view, newest rows first
  (``columns=["seq", "ts"], sort=[["seq", "desc"]]``), listens with ``on_update`` without a
  mode and, after each notification, reads its top 50 rows with ``to_columns``, one read in
  flight at a time, as ``<perspective-viewer>``'s datagrid does. ``delivered`` counts
  notifications; the latency is the age of the newest row when the read that first shows it
  returns.
- ``mixed``: row-mode subscribers as in ``run.py``'s fan-out, half of them on one
  configuration and half each on a configuration of its own (a filter that keeps every row;
  the shared half has the same filter, so every view costs the same). Besides the reference,
  ours with ``share_views=False`` (what a connection cost before sharing) runs too: nothing
  may be slower with sharing on.

The feed updates the "feed" table (its last 1,000 rows) 20 times a second with 100 rows. The
server is pinned to one core and the load generators to the other. Per window: delivered
fraction, latency p50 and p99, server CPU and CPU per subscriber-update; "OK" is >= 99.9 %
delivered and p99 <= 100 ms. The summary's capacity is the largest level OK in most windows.

    python benchmarks/shared_views.py                          # both scenarios, starlette
    python benchmarks/shared_views.py --scenarios viewer --clients 50 100 200 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run as harness  # noqa: E402

#: Each implementation: the server's ``impl`` and settings, by label.
IMPLS: dict[str, dict[str, Any]] = {
    "ours": {"impl": "ours"},
    "ours-unshared": {"impl": "ours", "share_views": False},
    "ref": {"impl": "ref"},
}
#: Each scenario: the load generator's kind, its parameters, and what it compares.
SCENARIOS: dict[str, tuple[str, dict[str, Any], tuple[str, ...]]] = {
    "viewer": ("viewer", {"window": 50}, ("ours", "ref")),
    "mixed": ("fanout", {"mixed": True, "sample_rate": 1.0}, ("ours", "ours-unshared", "ref")),
}

def measure(args: argparse.Namespace, scenario: str, level: int) -> list[dict[str, Any]]:
    """One level of one scenario: every implementation subscribed, windows alternated."""
    kind, params, impls = SCENARIOS[scenario]
    servers = harness.start_servers([
        harness.config(args.stack, IMPLS[label]["impl"], tables=["feed"], feed_mode="loop",
                       feed_limit=args.feed_limit,
                       **{k: v for k, v in IMPLS[label].items() if k != "impl"})
        for label in impls
    ])
    processes = harness._fanout_processes(level)
    gens = [harness._spawn_loadgens(kind, s.url, level, processes, params) for s in servers]
    records: list[dict[str, Any]] = []
    ok = False
    try:
        for gen in gens:
            harness._wait(gen, 240)
        cases = list(zip(impls, servers, gens, strict=True))
        for rep in range(args.repeats):
            for label, server, gen in harness.alternate(cases, rep):
                record: dict[str, Any] = {"scenario": scenario, "stack": args.stack,
                                          "impl": label, "clients": level, "rep": rep}
                record.update(harness._fanout_window(args, server, gen, "loop"))
                updates = record["updates"] or 1
                record["cpu_per_sub_update_us"] = round(
                    record["server_cpu"] * args.fanout_seconds / (updates * level) * 1e6, 1)
                harness.emit(record)
                records.append(record)
        ok = True
    except (TimeoutError, RuntimeError, EOFError) as exc:
        harness.emit({"scenario": scenario, "stack": args.stack, "clients": level,
                      "error": str(exc)})
    finally:
        for gen in gens:
            harness._finish(gen) if ok else harness._kill(gen)
        harness.stop_servers(servers)
    return records


def summary(records: list[dict[str, Any]]) -> str:
    """Per scenario and implementation: each level's medians, and the capacity."""
    lines = []
    for scenario in dict.fromkeys(r["scenario"] for r in records):
        _, _, impls = SCENARIOS[scenario]
        lines += [f"### {scenario}", "",
                  "| Subscribers | " + " | ".join(
                      f"{i}: OK / CPU us per sub-update / p99 ms" for i in impls) + " |",
                  "| --- |" + " --- |" * len(impls)]
        levels = sorted({r["clients"] for r in records if r["scenario"] == scenario})
        capacity = dict.fromkeys(impls, 0)
        for level in levels:
            cells = []
            for impl in impls:
                mine = [r for r in records if r["scenario"] == scenario and r["impl"] == impl
                        and r["clients"] == level]
                if not mine:
                    cells.append("-")
                    continue
                passed = sum(1 for r in mine if r["ok"])
                if passed * 2 > len(mine):
                    capacity[impl] = max(capacity[impl], level)
                cpu = statistics.median(r["cpu_per_sub_update_us"] for r in mine)
                p99 = statistics.median(r["lat_p99_ms"] for r in mine)
                delivered = min(r["delivered"] for r in mine)
                cells.append(f"{passed}/{len(mine)} / {cpu:.0f} / {p99:.0f}"
                             + ("" if delivered >= 0.999 else f" ({delivered:.1%} min)"))
            lines.append(f"| {level} | " + " | ".join(cells) + " |")
        lines += ["", "Capacity (largest level OK in most windows): " + ", ".join(
            f"{impl} {capacity[impl]}" for impl in impls), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenarios", nargs="+", choices=list(SCENARIOS),
                        default=list(SCENARIOS))
    parser.add_argument("--stack", choices=[s for s, i in harness.STACKS.items() if "ref" in i],
                        default="starlette")
    parser.add_argument("--clients", nargs="+", type=int, default=[50, 100, 200, 400])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.5, help="feed window")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    args.fanout_seconds, args.fanout_drain, args.feed_limit = args.seconds, 0.5, 1000
    args.pin = True
    harness._bench_server.raise_nofile()
    harness.pin(args)
    load_before = os.getloadavg()
    records: list[dict[str, Any]] = []
    for scenario in args.scenarios:
        for level in args.clients:
            records += measure(args, scenario, level)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(exist_ok=True)
    (args.out / f"{stamp}-shared.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in records))
    text = (f"# Shared views: {', '.join(args.scenarios)} ({stamp})\n\n"
            f"`{' '.join(sys.argv)}`; {args.stack}; load average before "
            f"{load_before[0]:.2f}; perspective-python {harness.perspective.__version__}\n\n"
            + summary(records))
    (args.out / f"{stamp}-shared.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
