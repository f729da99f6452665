"""Convergence of a tree of edges across hosts: the scenarios of ``tests/test_topology.py``, timed.

The tree is the test's: an upstream, two regional edges and four leaf edges, each a process in
a network namespace of its own (``tests/_netns.py``), every tier link delaying packets 20 ms and
dropping 1 % of them each way (netem, or the module's relay on kernels without netem). Each
scenario runs on a freshly built tree, ``--repeat`` times:

- ``steady``: writes at the upstream and through a leaf, until every edge holds the upstream's
  rows (``converge_steady_s``);
- ``upstream_restart``: the upstream SIGKILLed and restarted from its files, from the restart
  until every edge holds its rows (``converge_upstream_restart_s``);
- ``uplink_cut``: a regional edge's uplink cut for 10 s, how long the edge took to notice
  (``notice_cut_s``), and from the heal until every edge holds the upstream's rows, 20 writes
  through a leaf included (``converge_uplink_cut_s``);
- ``region_kill``: a regional edge SIGKILLed, how long its leaves took to notice
  (``notice_region_lost_s``), and from its restart until they hold the upstream's rows again
  (``converge_region_kill_s``).

Each run prints a JSON line; the summary gives the median, min and max of each time. Both go
to ``results/<timestamp>-topology.{jsonl,md}``. A scenario whose assertions fail is a run with
``ok: false`` and the failure, not an end to the benchmark.

    python benchmarks/topology.py [--repeat 3] [--scenarios steady uplink_cut ...]

It needs root (network namespaces) and takes about 40 s per repeat. Seven servers share this
machine's cores: the times include their start-up and the engine's work on two cores, not only
the network's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

import perspective  # noqa: E402
import pytest  # noqa: E402

from tests._netns import Topology, why_unavailable  # noqa: E402
from tests.test_topology import SCENARIOS, build_tree  # noqa: E402


def run_once(name: str, repeat: int, links: Any) -> dict[str, Any]:
    """Build a tree, run scenario ``name`` on it, and return what it measured."""
    record: dict[str, Any] = {"scenario": name, "run": repeat}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="topology-") as directory, \
            Topology(mode=links) as net:
        record["links"] = net.mode
        try:
            tree = build_tree(net, Path(directory))
            record["setup_s"] = round(time.monotonic() - started, 3)
            measured = asyncio.run(SCENARIOS[name](tree))
        except (Exception, pytest.fail.Exception) as exc:
            record.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:4000])
            return record
    record.update({key: round(seconds, 3) for key, seconds in measured.items()}, ok=True)
    return record


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median, min and max of each time, per scenario, over the runs that passed."""
    rows = []
    for name in dict.fromkeys(r["scenario"] for r in records):
        mine = [r for r in records if r["scenario"] == name]
        passed = [r for r in mine if r["ok"]]
        keys = dict.fromkeys(k for r in passed for k in r if k.endswith("_s"))
        for key in keys:
            values = [r[key] for r in passed if key in r]
            rows.append({"scenario": name, "measure": key, "runs": len(mine),
                         "passed": len(passed), "median": round(statistics.median(values), 3),
                         "min": min(values), "max": max(values)})
        if not passed:
            rows.append({"scenario": name, "measure": "-", "runs": len(mine), "passed": 0})
    return rows


def _commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                          capture_output=True, text=True, check=False)
    return done.stdout.strip() or "unknown"


def report(args: argparse.Namespace, records: list[dict[str, Any]],
           summary: list[dict[str, Any]], seconds: float, load_before: float) -> str:
    links = sorted({r["links"] for r in records})
    lines = [
        f"# Topology convergence ({time.strftime('%Y-%m-%d %H:%M')})",
        "",
        f"`{' '.join(sys.argv)}`: {args.repeat} repeat(s), {', '.join(links)} links, "
        f"20 ms and 1 % loss each way per tier link; perspective-python "
        f"{perspective.__version__}, Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, load average before {load_before:.2f}, commit {_commit()}; "
        f"{seconds:.0f} s in all.",
        "",
        "| Scenario | Measure | Passed | Median s | Min s | Max s |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for row in summary:
        if row["measure"] == "-":
            lines.append(f"| {row['scenario']} | - | 0/{row['runs']} | | | |")
            continue
        lines.append(f"| {row['scenario']} | {row['measure']} | {row['passed']}/{row['runs']} | "
                     f"{row['median']:.2f} | {row['min']:.2f} | {row['max']:.2f} |")
    failures = [r for r in records if not r["ok"]]
    if failures:
        lines += ["", "Failed runs:", ""]
        lines += [f"- {r['scenario']} run {r['run']}: {r['error'].splitlines()[0]}"
                  for r in failures]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs of each scenario")
    parser.add_argument("--scenarios", nargs="+", choices=list(SCENARIOS),
                        default=list(SCENARIOS))
    parser.add_argument("--links", choices=["netem", "relay"],
                        help="how links are impaired (default: netem where the kernel has it)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    reason = why_unavailable()
    if reason is not None:
        sys.exit(f"topology: {reason}")
    # SIGTERM ends the run the way Ctrl-C does, through every ``finally``: no namespace is left.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    load_before = os.getloadavg()[0]
    started = time.monotonic()
    records = []
    for repeat in range(args.repeat):
        for name in args.scenarios:
            record = run_once(name, repeat, args.links)
            print(json.dumps(record), flush=True)
            records.append(record)
    seconds = time.monotonic() - started
    summary = summarize(records)
    for row in summary:
        print(json.dumps({"summary": True, **row}), flush=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stamp}-topology.jsonl").write_text("".join(
        json.dumps(r) + "\n" for r in [*records, *({"summary": True, **s} for s in summary)]))
    text = report(args, records, summary, seconds, load_before)
    (args.out / f"{stamp}-topology.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
