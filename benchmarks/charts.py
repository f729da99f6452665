"""Draw the documentation's performance charts from the benchmarks' JSON lines.

    python benchmarks/charts.py                  # writes docs/assets/performance/*.png
    python benchmarks/charts.py --out /tmp/charts

Each chart reads one results file in benchmarks/results/ (named in ``CHARTS``, with the
command that produced it) and plots medians over its repeats, ours beside Perspective's
reference handler where the benchmark ran both. docs/explanation/performance.md shows the
charts with their conditions; tests/test_docs.py runs this script, so a chart whose results
file or fields are gone fails the suite. Needs matplotlib (the ``docs`` extra).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display, and the same output on every machine

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
OUT = ROOT / "docs" / "assets" / "performance"

OURS, REFERENCE = "perspective-asgi", "Perspective's reference handler"
COLOURS = {"ours": "#3f51b5", "ref": "#9e9e9e"}
LABELS = {"ours": OURS, "ref": REFERENCE}

Row = dict[str, Any]


@dataclass(frozen=True)
class Chart:
    """One figure: the results file it reads and the function that draws it."""

    name: str
    source: str
    draw: Callable[[list[Row]], Figure]


def read(source: str) -> list[Row]:
    with open(RESULTS / source, encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]


def medians(rows: Iterable[Row], key: Callable[[Row], Any], value: str) -> dict[Any, float]:
    groups: defaultdict[Any, list[float]] = defaultdict(list)
    for row in rows:
        groups[key(row)].append(float(row[value]))
    return {group: statistics.median(values) for group, values in groups.items()}


def figure(title: str, width: float = 9.0) -> tuple[Figure, Any]:
    fig, axes = plt.subplots(1, 2, figsize=(width, 3.6), layout="constrained")
    fig.suptitle(title, fontsize=11)
    return fig, axes


def style(axes: Axes, ylabel: str, xlabel: str | None = None) -> None:
    axes.set_ylabel(ylabel)
    if xlabel:
        axes.set_xlabel(xlabel)
    axes.grid(axis="y", color="#eeeeee")
    axes.set_axisbelow(True)
    axes.spines[["top", "right"]].set_visible(False)


def by_stack(axes: Axes, rows: list[Row], scenario: str, value: str, ylabel: str) -> None:
    """Grouped bars: one group per stack, ours beside the reference where it ran."""
    found = medians((r for r in rows if r["scenario"] == scenario),
                    lambda r: (r["stack"], r["impl"]), value)
    stacks = sorted({stack for stack, _ in found})
    for offset, impl in ((-0.2, "ours"), (0.2, "ref")):
        xs = [i + offset for i, stack in enumerate(stacks) if (stack, impl) in found]
        ys = [found[stack, impl] for stack in stacks if (stack, impl) in found]
        axes.bar(xs, ys, width=0.4, color=COLOURS[impl], label=LABELS[impl])
    axes.set_xticks(range(len(stacks)), stacks)
    style(axes, ylabel)


def heavy_query_and_idle(rows: list[Row]) -> Figure:
    fig, (stall, idle) = figure("Per stack (raw ASGI has no reference handler)")
    by_stack(stall, rows, "stall", "ping_p99_ms",
             "other clients' ping p99 (ms, log)\nduring a 1M-row group-by")
    stall.set_yscale("log")
    by_stack(idle, rows, "idle", "kb_per_conn", "memory per idle connection (KB)")
    idle.set_ylim(0, idle.get_ylim()[1] * 1.35)  # room for the legend above the bars
    idle.legend(frameon=False, fontsize=8, loc="upper left")
    return fig


def shared_view_fanout(rows: list[Row]) -> Figure:
    fig, (latency, cpu) = figure("Identical subscribers of one view: 100-row updates at 20 Hz")
    # The reference ran with the feed on the loop; compare ours in the same condition.
    rows = [r for r in rows if r["scenario"] == "fanout" and r["feed"] == "loop"]
    for impl in ("ours", "ref"):
        own = [r for r in rows if r["impl"] == impl]
        p99 = medians(own, lambda r: r["clients"], "lat_p99_ms")
        used = medians(own, lambda r: r["clients"], "server_cpu")
        levels = sorted(p99)
        latency.plot(levels, [p99[n] for n in levels], "o-", color=COLOURS[impl],
                     label=LABELS[impl])
        cpu.plot(levels, [used[n] for n in levels], "o-", color=COLOURS[impl])
    latency.axhline(100, color="#c62828", linewidth=0.8, linestyle="--")
    latency.text(210, 104, "target: p99 <= 100 ms", color="#c62828", fontsize=8)
    style(latency, "update latency p99 (ms)", "subscribers")
    style(cpu, "server CPU (cores, 1 = its whole core)", "subscribers")
    latency.legend(frameon=False, fontsize=8)
    return fig


def edge_capacity(rows: list[Row]) -> Figure:
    fig, (capacity, upstream) = figure("Edges, each held to 0.2 core: capacity and upstream cost")
    results = [r for r in rows if r["scenario"] == "edge_capacity"]
    served = medians(results, lambda r: r["edges"], "capacity")
    cost = medians(results, lambda r: r["edges"], "upstream_cpu")
    edges = sorted(served)
    capacity.bar([str(n) for n in edges], [served[n] for n in edges], color=COLOURS["ours"])
    for i, n in enumerate(edges):
        capacity.text(i, served[n], f"{served[n]:.0f}", ha="center", va="bottom", fontsize=8)
    style(capacity, "subscribers at >= 99.9 % delivered,\np99 <= 100 ms", "edges")
    upstream.plot(edges, [cost[n] for n in edges], "o-", color=COLOURS["ours"])
    upstream.set_ylim(0, max(cost.values()) * 1.5)
    upstream.set_xticks(edges)
    style(upstream, "upstream CPU (cores)", "edges")
    return fig


CHARTS = [
    # python benchmarks/run.py --standard
    Chart("per-stack.png", "20261202-081959.jsonl", heavy_query_and_idle),
    # python benchmarks/run.py --standard --scenarios fanout --stacks starlette --feeds loop
    #     --clients 200 300 1000 1100 --decode-every 5 --loadgen-spare-cpu
    Chart("shared-views.png", "20261202-195949.jsonl", shared_view_fanout),
    # python benchmarks/edge_capacity.py --edge-cpu 0.2 --edges 1,2,4 --rounds 2
    Chart("edge-capacity.png", "20261203-073609-edge-capacity.jsonl", edge_capacity),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help=f"directory (default: {OUT})")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for chart in CHARTS:
        fig = chart.draw(read(chart.source))
        # No timestamp or version in the file, so that redrawing unchanged data changes nothing.
        fig.savefig(args.out / chart.name, dpi=110, metadata={"Software": None})
        plt.close(fig)
        print(args.out / chart.name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
