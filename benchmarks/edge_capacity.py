"""Edge capacity per unit of CPU: each edge held to a CPU quota in a cgroup of its own.

``edge_fanout.py`` found that 2 and 4 edges add no capacity on a 2-core machine: the edges and
the load generators share the same cores. Here every ``perspective-asgi edge`` process runs in
a cgroup with a CPU quota (``--edge-cpu 0.2``: ``cpu.max`` "20000 100000" on cgroup v2,
``cpu.cfs_quota_us`` on a host whose cpu controller is still on cgroup v1), so each edge has
the same fraction of a core however many there are, and the capacity is a number of
subscribers per edge core. The upstream (our raw ASGI app, ``_bench_server.py``, its "feed"
table updated from a thread) runs in a cgroup without a limit, which only counts its CPU; the
load generators (``run.py``'s fan-out subscribers: one websocket, one view, ``on_update`` in
row mode) run outside every cgroup of the run, at SCHED_IDLE priority unless
``--no-loadgen-idle``, so the edges and the upstream are never the ones kept waiting.

For 1, 2 and 4 edges it searches the largest number of subscribers per edge (all edges get
the same number) that is OK, >= 99.9 % of updates delivered and p99 latency <= 100 ms, in most
of ``--repeats`` windows: doubling from ``--start`` until a level fails, then bisecting, or
walking ``--ladder`` until a level fails. Per edge count it reports the capacity, subscribers
per edge core (capacity / (edges x edge CPU)), the upstream's CPU (its cgroup's usage over the
windows) and its CPU per edge, and each edge's CPU (near its quota at capacity) and throttled
periods. The end projects a tree: subscribers per edge core, edges per upstream core, and an
upstream -> E regional edges -> E x E leaves tree. JSON lines and the summary go to
``results/<timestamp>-edge-capacity.{jsonl,md}``.

    python benchmarks/edge_capacity.py                             # 1, 2, 4 edges at 0.2 core
    python benchmarks/edge_capacity.py --edge-cpu 0.2 --edges 1,2 --duration 3 --ladder 10,20

Run it as root (it creates and removes cgroups under the cgroup file systems' roots).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import signal
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _bench_client as clients  # noqa: E402
import edge_fanout  # noqa: E402
import run as harness  # noqa: E402

#: Every directory this benchmark creates starts with this, then this process's pid, so a run
#: that was killed outright leaves directories the next run can recognise and remove.
CGROUP_PREFIX = "perspective-asgi-edge-capacity-"


# --- cgroups ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CgroupLayout:
    """Where this host enforces CPU quotas and where it counts CPU time.

    On a cgroup v2 host both are the unified hierarchy (``cpu.max``, ``cpu.stat``). On a
    hybrid host the cpu controller is bound to a v1 hierarchy (``cpu.cfs_quota_us``, its
    ``cpu.stat`` for throttling), while the unified hierarchy, mounted beside it without
    controllers, still counts every cgroup's ``usage_usec``.
    """

    #: "cpu.max" (cgroup v2) or "cfs" (cgroup v1's cpu controller).
    quota: str
    quota_root: Path
    #: "cpu.stat" (cgroup v2's ``usage_usec``) or "cpuacct" (v1's ``cpuacct.usage``, in ns).
    usage: str
    usage_root: Path

    @classmethod
    def detect(cls, mounts: str = "/proc/self/mounts") -> CgroupLayout:
        unified: Path | None = None
        v1: dict[str, Path] = {}
        for line in Path(mounts).read_text().splitlines():
            _source, target, fstype, options, *_ = line.split()
            if fstype == "cgroup2":
                unified = Path(target)
            elif fstype == "cgroup":
                for option in options.split(","):
                    if option in ("cpu", "cpuacct"):
                        v1.setdefault(option, Path(target))
        if unified is not None and "cpu" in _words(unified / "cgroup.controllers"):
            quota, quota_root = "cpu.max", unified
        elif "cpu" in v1:
            quota, quota_root = "cfs", v1["cpu"]
        else:
            raise RuntimeError("no cgroup hierarchy offers the cpu controller (looked for "
                               "cgroup2 with 'cpu' in cgroup.controllers, or a v1 cpu mount)")
        if unified is not None:
            usage, usage_root = "cpu.stat", unified
        elif "cpuacct" in v1:
            usage, usage_root = "cpuacct", v1["cpuacct"]
        else:
            raise RuntimeError("no cgroup hierarchy counts CPU time (no cgroup2, no cpuacct)")
        return cls(quota, quota_root, usage, usage_root)

    def describe(self) -> str:
        if self.quota == "cpu.max":
            return f"cgroup v2 at {self.quota_root} (cpu.max; usage_usec from cpu.stat)"
        return (f"cgroup v1 cpu controller at {self.quota_root} (cpu.cfs_quota_us / "
                f"cfs_period_us); CPU time from {self.usage} at {self.usage_root}")


def _words(path: Path) -> list[str]:
    try:
        return path.read_text().split()
    except OSError:
        return []


def _stat(path: Path) -> dict[str, int]:
    return {key: int(value) for key, value in
            (line.split() for line in path.read_text().splitlines() if line.strip())}


@dataclass
class CpuGroup:
    """One process's cgroup: its directory in each hierarchy, an optional quota, its CPU."""

    layout: CgroupLayout
    quota_dir: Path | None
    usage_dir: Path
    name: str

    def dirs(self) -> list[Path]:
        return list(dict.fromkeys(d for d in (self.quota_dir, self.usage_dir) if d))

    def add(self, pid: int) -> None:
        """Move ``pid`` (all its threads; its later children follow) into this group."""
        for directory in self.dirs():
            (directory / "cgroup.procs").write_text(str(pid))

    def limit(self, cores: float, period_us: int) -> str:
        """Cap the group at ``cores`` of CPU per ``period_us``; return the setting written."""
        if self.quota_dir is None:
            raise RuntimeError(f"cgroup {self.name} was made without a quota directory")
        quota_us = max(1000, round(cores * period_us))  # the kernel's smallest quota is 1 ms
        if self.layout.quota == "cpu.max":
            setting = f"{quota_us} {period_us}"
            (self.quota_dir / "cpu.max").write_text(setting)
            return f"cpu.max {setting}"
        (self.quota_dir / "cpu.cfs_period_us").write_text(str(period_us))
        (self.quota_dir / "cpu.cfs_quota_us").write_text(str(quota_us))
        return f"cpu.cfs_quota_us {quota_us}, cpu.cfs_period_us {period_us}"

    def usage_s(self) -> float:
        """CPU seconds used by every process that has been in the group."""
        if self.layout.usage == "cpu.stat":
            return _stat(self.usage_dir / "cpu.stat")["usage_usec"] / 1e6
        return int((self.usage_dir / "cpuacct.usage").read_text()) / 1e9

    def throttling(self) -> tuple[int, float]:
        """Periods in which the quota ran out, and the seconds spent waiting for the next."""
        if self.quota_dir is None:
            return 0, 0.0
        stat = _stat(self.quota_dir / "cpu.stat")
        if self.layout.quota == "cpu.max":
            return stat.get("nr_throttled", 0), stat.get("throttled_usec", 0) / 1e6
        return stat.get("nr_throttled", 0), stat.get("throttled_time", 0) / 1e9

    def remove(self) -> None:
        """Kill whatever is still in the group (only this run's processes can be), then rmdir."""
        for directory in reversed(self.dirs()):
            _remove_cgroup(directory)


def _remove_cgroup(directory: Path, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while directory.exists():
        pids = [int(p) for p in _words(directory / "cgroup.procs")]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if not pids:
            try:
                directory.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:  # EBUSY while the last task finishes exiting
                pass
        if time.monotonic() > deadline:
            print(f"could not remove {directory} (still holds {pids}); remove it by hand",
                  file=sys.stderr)
            return
        time.sleep(0.05)


class RunCgroups:
    """This run's cgroups, under one directory per hierarchy; ``close`` removes them all."""

    def __init__(self, layout: CgroupLayout) -> None:
        self.layout = layout
        self.groups: list[CpuGroup] = []
        roots = list(dict.fromkeys((layout.quota_root, layout.usage_root)))
        for root in roots:
            _sweep_stale(root)
        self.tops = {root: root / f"{CGROUP_PREFIX}{os.getpid()}" for root in roots}
        for top in self.tops.values():
            top.mkdir()
        if layout.quota == "cpu.max":
            # A v2 leaf has a cpu.max only if every ancestor lists cpu in subtree_control. The
            # root may enable it while it holds processes; our own directory holds none.
            root = layout.quota_root
            for directory in (root, self.tops[root]):
                control = directory / "cgroup.subtree_control"
                if "cpu" not in _words(control):
                    try:
                        control.write_text("+cpu")
                    except OSError as exc:
                        self.close()
                        raise RuntimeError(f"cannot enable the cpu controller in {control}: "
                                           f"{exc}") from None

    def group(self, name: str, *, limited: bool) -> CpuGroup:
        """A new, empty group; ``limited`` gives it a directory where a quota can be set."""
        quota_dir = self.tops[self.layout.quota_root] / name if limited else None
        usage_dir = self.tops[self.layout.usage_root] / name
        group = CpuGroup(self.layout, quota_dir, usage_dir, name)
        for directory in group.dirs():
            directory.mkdir()
        self.groups.append(group)
        return group

    def close(self) -> None:
        for group in reversed(self.groups):
            group.remove()
        self.groups.clear()
        for top in self.tops.values():
            _remove_cgroup(top)


def _sweep_stale(root: Path) -> None:
    """Remove what earlier runs of this benchmark left behind, if they were killed outright."""
    for top in root.glob(f"{CGROUP_PREFIX}*"):
        pid = top.name.removeprefix(CGROUP_PREFIX)
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            for child in top.iterdir():
                if child.is_dir():
                    _remove_cgroup(child)
            _remove_cgroup(top)


# --- the tier under test ------------------------------------------------------------------------


@dataclass
class Sample:
    """Counters read at one moment: CPU seconds of each group, edges' throttling."""

    at: float
    upstream_s: float
    edges_s: list[float]
    edges_proc_s: list[float]
    throttled: list[tuple[int, float]]


@dataclass
class Tier:
    """One upstream and its edges, each process in a cgroup of its own."""

    upstream: harness.ServerProcess
    upstream_group: CpuGroup
    edges: list[edge_fanout.Edge] = field(default_factory=list)
    edge_groups: list[CpuGroup] = field(default_factory=list)
    quota_setting: str = ""

    def sample(self) -> Sample:
        return Sample(
            at=time.perf_counter(),
            upstream_s=self.upstream_group.usage_s(),
            edges_s=[g.usage_s() for g in self.edge_groups],
            edges_proc_s=[e.cpu_seconds() for e in self.edges],
            throttled=[g.throttling() for g in self.edge_groups],
        )

    def settle(self, quota: float, timeout: float = 30) -> None:
        """Wait (bounded) until every edge is idle: no backlog left from the last level."""
        deadline = time.monotonic() + timeout
        before = self.sample()
        while time.monotonic() < deadline:
            time.sleep(0.5)
            after = self.sample()
            wall = after.at - before.at
            if all((b - a) / wall < quota / 4
                   for a, b in zip(before.edges_s, after.edges_s, strict=True)):
                return
            before = after


@contextlib.contextmanager
def tier(args: argparse.Namespace, cgroups: RunCgroups, edge_count: int,
         label: str) -> Iterator[Tier]:
    """Start the upstream and ``edge_count`` edges in their cgroups; stop and remove them."""
    with contextlib.ExitStack() as stack:
        upstream_group = cgroups.group(f"{label}-upstream", limited=False)
        stack.callback(upstream_group.remove)
        upstream = harness.ServerProcess(harness.config(
            "asgi", "ours", tables=["feed"], feed_mode="thread", feed_hz=args.feed_hz,
            feed_rows=args.feed_rows, feed_limit=args.feed_limit))
        stack.callback(upstream.stop)
        assert upstream.process.pid is not None
        upstream_group.add(upstream.process.pid)
        upstream.wait_ready()
        result = Tier(upstream, upstream_group)
        for index in range(edge_count):
            group = cgroups.group(f"{label}-edge{index}", limited=True)
            stack.callback(group.remove)
            edge = edge_fanout.Edge(upstream.url)
            stack.callback(edge.stop)
            # Moved at once: the interpreter is still starting, with no thread of its own yet.
            group.add(edge.process.pid)
            result.edges.append(edge)
            result.edge_groups.append(group)
        for edge in result.edges:
            edge.wait_ready()
        # The quota goes on once the edges are up: starting at a fifth of a core would only
        # make the run longer, and the cgroup has counted the edge's CPU from its first
        # instruction either way.
        for group in result.edge_groups:
            result.quota_setting = group.limit(args.edge_cpu, args.cpu_period_us)
        yield result


# --- measuring ----------------------------------------------------------------------------------


def _spread(values: list[float]) -> float:
    """Half the range, as a fraction of the median (0 for one value)."""
    if len(values) < 2:
        return 0.0
    m = statistics.median(values)
    return (max(values) - min(values)) / 2 / m if m else 0.0


def window(args: argparse.Namespace, the_tier: Tier, gens: list[tuple[Any, Any]],
           base: dict[str, Any]) -> dict[str, Any]:
    """One feed window of ``args.duration`` s: what the subscribers got, what it cost."""
    before = the_tier.sample()
    first = the_tier.upstream.call("feed_start")
    time.sleep(args.duration)
    stopped = the_tier.upstream.call("feed_stop")
    after = the_tier.sample()
    time.sleep(args.drain)  # the last batches reach the subscribers
    harness._tell(gens, (first, stopped["last"]))
    replies = harness._wait(gens, 120)
    told = time.perf_counter()
    wall = after.at - before.at
    delivered = sum(r["delivered"] for r in replies)
    expected = sum(r["expected"] for r in replies)
    latencies = [x for r in replies for x in r["latencies"]]
    edge_cpu = [(b - a) / wall for a, b in zip(before.edges_s, after.edges_s, strict=True)]
    record = {**base, **harness.rounded({
        "delivered": delivered / expected if expected else float("nan"),
        "lat_p50_ms": statistics.median(latencies) if latencies else float("nan"),
        "lat_p99_ms": clients.pct(latencies, 0.99),
        "upstream_cpu": (after.upstream_s - before.upstream_s) / wall,
        "edge_cpu_mean": statistics.mean(edge_cpu),
        "loadgen_cpu": sum(r["loadgen_cpu_s"] for r in replies) / (told - before.at),
    })}
    record["edge_cpu"] = [round(c, 3) for c in edge_cpu]
    # The same CPU from /proc/<pid>/stat, a check on the cgroup's count.
    record["edge_cpu_proc"] = [round((b - a) / wall, 3) for a, b in
                               zip(before.edges_proc_s, after.edges_proc_s, strict=True)]
    record["edge_throttled"] = [b[0] - a[0] for a, b in
                                zip(before.throttled, after.throttled, strict=True)]
    record["edge_throttled_s"] = [round(b[1] - a[1], 3) for a, b in
                                  zip(before.throttled, after.throttled, strict=True)]
    record["edge_periods"] = round(wall * 1e6 / args.cpu_period_us)
    record["updates"] = stopped["last"] - first + 1
    record["late_ticks"] = stopped["late"]
    record["closed"] = sum(r["closed"] for r in replies)
    record["ok"] = bool(record["delivered"] >= args.min_delivered
                        and record["lat_p99_ms"] <= args.max_p99_ms)
    return record


def measure_level(args: argparse.Namespace, the_tier: Tier, per_edge: int,
                  base: dict[str, Any], emit: Callable[[dict[str, Any]], None]
                  ) -> dict[str, Any]:
    """``per_edge`` subscribers on every edge, ``args.repeats`` windows; the level's medians."""
    edges = len(the_tier.edges)
    base = {**base, "per_edge": per_edge, "clients": per_edge * edges}
    the_tier.settle(args.edge_cpu)
    params: dict[str, Any] = {"sample_rate": 1.0, "decode_every": args.decode_every}
    if args.loadgen_idle:
        params["spare_cpus"] = sorted(os.sched_getaffinity(0))
    gens: list[tuple[Any, Any]] = []
    windows: list[dict[str, Any]] = []
    level: dict[str, Any] = {"scenario": "edge_capacity_level", **base}
    try:
        for edge in the_tier.edges:
            processes = max(1, math.ceil(per_edge / args.subscribers_per_loadgen))
            gens += harness._spawn_loadgens("fanout", edge.url, per_edge, processes, params)
        harness._wait(gens, args.connect_timeout)
        for rep in range(args.repeats):
            record = window(args, the_tier, gens,
                            {"scenario": "edge_capacity_window", **base, "rep": rep})
            emit(record)
            windows.append(record)
    except (TimeoutError, RuntimeError, EOFError) as exc:
        harness._kill(gens)
        level.update({"error": str(exc), "ok": False, "windows": len(windows)})
        emit(level)
        return level
    except BaseException:
        harness._kill(gens)
        raise
    harness._finish(gens)
    passed = sum(1 for w in windows if w["ok"])
    level["windows_ok"] = f"{passed}/{len(windows)}"
    level["ok"] = passed * 2 > len(windows)
    for key in ("delivered", "lat_p50_ms", "lat_p99_ms", "upstream_cpu", "edge_cpu_mean",
                "loadgen_cpu"):
        values = [w[key] for w in windows]
        level[key] = round(statistics.median(values), 4)
        level[f"{key}_spread"] = round(_spread(values), 3)
    level["delivered_min"] = min(w["delivered"] for w in windows)
    level["edge_cpu"] = [round(statistics.median(w["edge_cpu"][i] for w in windows), 3)
                         for i in range(edges)]
    level["edge_throttled"] = [sum(w["edge_throttled"][i] for w in windows)
                               for i in range(edges)]
    level["edge_periods"] = sum(w["edge_periods"] for w in windows)
    emit(level)
    return level


def search(args: argparse.Namespace, the_tier: Tier, base: dict[str, Any],
           emit: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """The largest OK subscribers per edge: the ladder, or doubling then bisecting."""
    levels: list[dict[str, Any]] = []

    def ok(per_edge: int) -> bool:
        levels.append(measure_level(args, the_tier, per_edge, base, emit))
        return bool(levels[-1]["ok"])

    best, failed = 0, None
    if args.ladder:
        for per_edge in args.ladder:
            if not ok(per_edge):
                failed = per_edge
                break
            best = per_edge
    else:
        per_edge = args.start
        while True:
            if ok(per_edge):
                best = per_edge
            else:
                failed = per_edge
            if failed is None:
                if per_edge >= args.max_per_edge:
                    break
                per_edge = min(per_edge * 2, args.max_per_edge)
            elif failed - best <= max(1, int(best * args.resolution)):
                break
            else:
                per_edge = (best + failed) // 2
    edges = len(the_tier.edges)
    at_best = next((lv for lv in levels if lv["per_edge"] == best and lv["ok"]), None)
    at_fail = next((lv for lv in levels if lv["per_edge"] == failed), None)
    measured = [lv for lv in levels if "upstream_cpu" in lv]
    # The upstream's cost does not depend on the edges' subscribers; at capacity if there is
    # one, else over every level measured.
    upstream_cpu = (at_best["upstream_cpu"] if at_best else
                    statistics.median(lv["upstream_cpu"] for lv in measured) if measured
                    else float("nan"))
    result: dict[str, Any] = {
        "scenario": "edge_capacity", **base,
        "capacity_per_edge": best, "capacity": best * edges,
        "at_least": failed is None,  # no level failed: the capacity is above the last tried
        "first_failed_per_edge": failed,
        "subscribers_per_edge_core": round(best * edges / (edges * args.edge_cpu), 1),
        "upstream_cpu": upstream_cpu,
        "upstream_cpu_per_edge": round(upstream_cpu / edges, 4),
        "edge_cpu": at_best["edge_cpu"] if at_best else None,
        "edge_cpu_of_quota": (round(at_best["edge_cpu_mean"] / args.edge_cpu, 3)
                              if at_best else None),
        "lat_p99_ms": at_best["lat_p99_ms"] if at_best else None,
        "throttled_at_capacity": at_best["edge_throttled"] if at_best else None,
        "throttled_at_failed": at_fail.get("edge_throttled") if at_fail else None,
        "edge_cpu_at_failed": at_fail.get("edge_cpu") if at_fail else None,
        "periods_per_level": at_best["edge_periods"] if at_best else None,
        "levels": [lv["per_edge"] for lv in levels],
    }
    emit(result)
    return result


# --- the report ---------------------------------------------------------------------------------


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _pm(values: list[float], digits: int = 0) -> str:
    text = f"{_median(values):,.{digits}f}"
    return text + (f" +-{_spread(values) * 100:.0f}%" if len(values) > 1 else "")


def conditions(args: argparse.Namespace, layout: CgroupLayout, quota: str) -> dict[str, Any]:
    cpu = harness._lscpu()
    return {
        "scenario": "edge_capacity_conditions",
        "machine": f"{cpu.get('Model name', platform.processor() or 'unknown')}, "
                   f"{os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable here), "
                   f"{harness._memory_gib()}, {platform.system()} {platform.release()}",
        "cpus": os.cpu_count(),
        "cgroups": layout.describe(),
        "edge_cpu": args.edge_cpu, "cpu_period_us": args.cpu_period_us, "quota": quota,
        "feed_hz": args.feed_hz, "feed_rows": args.feed_rows, "feed_limit": args.feed_limit,
        "duration_s": args.duration, "drain_s": args.drain, "repeats": args.repeats,
        "rounds": args.rounds, "min_delivered": args.min_delivered,
        "max_p99_ms": args.max_p99_ms, "decode_every": args.decode_every,
        "loadgen": ("outside every quota, SCHED_IDLE" if args.loadgen_idle
                    else "outside every quota, normal priority"),
        "search": (f"ladder {args.ladder} per edge" if args.ladder else
                   f"doubling from {args.start} per edge (at most {args.max_per_edge}), "
                   f"then bisecting to {args.resolution:.0%}"),
        "python": platform.python_version(),
        "perspective": harness.perspective.__version__,
        "commit": harness._commit(),
        "load_before": round(os.getloadavg()[0], 2),
    }


def projection(args: argparse.Namespace, results: list[dict[str, Any]]) -> dict[str, Any]:
    """Subscribers per edge core, edges per upstream core, and a two-level tree's size."""
    by_edges: dict[int, list[dict[str, Any]]] = {}
    for r in results:
        by_edges.setdefault(r["edges"], []).append(r)
    per_core = {e: _median([r["subscribers_per_edge_core"] for r in rs])
                for e, rs in by_edges.items()}
    upstream = {e: _median([r["upstream_cpu"] for r in rs]) for e, rs in by_edges.items()}
    # The most conservative figure: the edge count whose edges served the fewest per core.
    s = min(per_core.values())
    widest = max(by_edges)
    per_edge_cost = upstream[widest] / widest
    record: dict[str, Any] = {
        "scenario": "edge_capacity_projection",
        "subscribers_per_edge_core": s,
        "upstream_cpu_per_edge": round(per_edge_cost, 4),
        "edges_per_upstream_core": math.floor(1 / per_edge_cost) if per_edge_cost > 0 else None,
    }
    # The marginal cost of one more edge (least squares over the edge counts) and what the
    # upstream spends with none (the feed itself), when there are two edge counts to fit.
    if len(upstream) >= 2:
        xs, ys = list(upstream), list(upstream.values())
        mx, my = statistics.mean(xs), statistics.mean(ys)
        slope = (sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
                 / sum((x - mx) ** 2 for x in xs))
        record["upstream_cpu_marginal_per_edge"] = round(slope, 4)
        record["upstream_cpu_base"] = round(my - slope * mx, 4)
        if slope > 0:
            record["edges_per_upstream_core_marginal"] = math.floor(
                (1 - record["upstream_cpu_base"]) / slope)
    fan = record["edges_per_upstream_core"]
    if fan:
        record["tree_regional_edges"] = fan
        record["tree_leaves"] = fan * fan
        record["tree_subscribers_one_core_per_leaf"] = round(fan * fan * s)
        record["tree_cores"] = 1 + fan + fan * fan
    return record


def summary(args: argparse.Namespace, cond: dict[str, Any], levels: list[dict[str, Any]],
            results: list[dict[str, Any]], proj: dict[str, Any], seconds: float) -> str:
    q = args.edge_cpu
    rate = args.feed_hz * args.feed_rows
    lines = [
        f"# Edge capacity per CPU ({time.strftime('%Y-%m-%d %H:%M')})",
        "",
        f"`python benchmarks/edge_capacity.py {' '.join(sys.argv[1:])}`, {seconds:.0f} s.",
        "",
        "Conditions:",
        "",
        f"- Machine: {cond['machine']}; load average (1 min) before {cond['load_before']}, "
        f"after {os.getloadavg()[0]:.2f}; Python {cond['python']}, perspective-python "
        f"{cond['perspective']}; commit {cond['commit']}",
        f"- Each edge: {q} core ({cond['quota']}); {cond['cgroups']}",
        "- Upstream: raw ASGI app in a cgroup without a limit (its CPU is that cgroup's "
        "usage over the windows), one subscriber per edge",
        f"- Updates at the upstream: {args.feed_hz:g} Hz x {args.feed_rows} rows = "
        f"{rate:,.0f} rows/s from a thread; the table keeps its last {args.feed_limit:,} rows",
        f"- Subscribers: row-mode `on_update` on a view of seq and ts, the same number on "
        f"every edge; every {args.decode_every} decodes; load generators "
        f"{cond['loadgen']}",
        f"- OK: >= {args.min_delivered:.1%} delivered and p99 <= {args.max_p99_ms:g} ms in "
        f"most of {args.repeats} windows of {args.duration:g} s (+{args.drain:g} s drain); "
        f"search: {cond['search']}; {args.rounds} round(s)",
        "",
        "## Capacity per edge count",
        "",
        "Medians over rounds (+-: half the range); the CPU figures are at the capacity level.",
        "",
    ]
    rows = []
    by_edges: dict[int, list[dict[str, Any]]] = {}
    for r in results:
        by_edges.setdefault(r["edges"], []).append(r)
    base = _median([r["capacity"] for r in by_edges.get(1, [])])
    for edges in sorted(by_edges):
        rs = by_edges[edges]
        capacity = [r["capacity"] for r in rs]
        above = "+" if any(r["at_least"] for r in rs) else ""
        edge_cpu = [c for r in rs for c in (r["edge_cpu"] or [])]
        of_quota = [r["edge_cpu_of_quota"] for r in rs if r["edge_cpu_of_quota"] is not None]
        throttled = [t for r in rs for t in (r["throttled_at_capacity"] or [])]
        throttled_fail = [t for r in rs for t in (r["throttled_at_failed"] or [])]
        periods = [r["periods_per_level"] for r in rs if r["periods_per_level"]]
        ratio = _median(capacity) / base if base and base == base else float("nan")
        rows.append([
            str(edges), _pm(capacity) + above,
            _pm([r["capacity_per_edge"] for r in rs]),
            _pm([r["subscribers_per_edge_core"] for r in rs]),
            f"{ratio:.2f}x" if ratio == ratio else "-",
            _pm([r["upstream_cpu"] for r in rs], 3),
            _pm([r["upstream_cpu_per_edge"] for r in rs], 4),
            (f"{min(edge_cpu):.3f}-{max(edge_cpu):.3f} ({_median(of_quota):.0%})"
             if edge_cpu else "-"),
            (f"{_median(throttled):.0f} of {_median(periods):.0f}" if throttled else "-")
            + (f" / {_median(throttled_fail):.0f}" if throttled_fail else ""),
            _pm([r["lat_p99_ms"] for r in rs if r["lat_p99_ms"] is not None], 1),
        ])
    lines.append(harness._table(
        ["Edges", "Capacity (subscribers)", "Per edge", "Per edge core", "vs 1 edge",
         "Upstream CPU (cores)", "Upstream CPU per edge", "Each edge's CPU (of quota)",
         "Throttled periods per edge at capacity / first failed level", "p99 ms"],
        rows, set(range(1, 10))))
    fan = proj.get("edges_per_upstream_core")
    s = proj["subscribers_per_edge_core"]
    lines += [
        "",
        "## Projection",
        "",
        f"At {args.feed_hz:g} Hz x {args.feed_rows} rows ({rate:,.0f} rows/s), a "
        f"{args.feed_limit:,}-row table and edges at {q} core each, on this machine:",
        "",
        f"- Subscribers per edge core: {s:,.0f} (the lowest over the edge counts)",
        f"- Upstream CPU per edge: {proj['upstream_cpu_per_edge']:.4f} cores (its total "
        f"with {max(by_edges)} edges, divided by {max(by_edges)}); edges per upstream core: "
        f"{fan if fan else '-'}",
    ]
    if "upstream_cpu_marginal_per_edge" in proj:
        lines.append(
            f"- Marginal cost of one more edge: {proj['upstream_cpu_marginal_per_edge']:.4f} "
            f"cores, over a base of {proj['upstream_cpu_base']:.4f} (the feed itself; a "
            f"least-squares line over the edge counts): "
            f"{proj.get('edges_per_upstream_core_marginal', '-')} edges per upstream core")
    if fan:
        lines.append(
            f"- Two levels, upstream -> {fan} regional edges -> {fan}x{fan} = "
            f"{fan * fan:,} leaf edges: a regional edge whose only subscribers are edges "
            f"costs what the upstream costs per edge, so one core each serves {fan} leaves. "
            f"With one core per leaf: {proj['tree_subscribers_one_core_per_leaf']:,} "
            f"subscribers on {proj['tree_cores']:,} cores (1 + {fan} + {fan * fan:,}); it "
            f"leaves out what the regional edges spend replicating the upstream, small next "
            f"to serving their leaves, and the network between the machines")
    lines += [
        "",
        "## Levels",
        "",
        harness._table(
            ["Round", "Edges", "Per edge", "Subscribers", "OK windows", "Delivered (min)",
             "p50 ms", "p99 ms", "Upstream CPU", "Edge CPU (mean)", "Throttled / periods",
             "Load-gen CPU"],
            [[str(lv["round"]), str(lv["edges"]), str(lv["per_edge"]), str(lv["clients"]),
              *([f"error: {lv['error']}", "", "", "", "", "", "", ""] if "error" in lv else [
                  lv["windows_ok"], f"{lv['delivered_min']:.4f}", f"{lv['lat_p50_ms']:.1f}",
                  f"{lv['lat_p99_ms']:.1f} +-{lv['lat_p99_ms_spread'] * 100:.0f}%",
                  f"{lv['upstream_cpu']:.3f}", f"{lv['edge_cpu_mean']:.3f}",
                  f"{sum(lv['edge_throttled'])} / {lv['edge_periods'] * lv['edges']}",
                  f"{lv['loadgen_cpu']:.2f}"])]
             for lv in levels], {0, 1, 2, 3, 5, 6, 7, 8, 9, 10, 11}),
        "",
    ]
    return "\n".join(lines)


# --- main ---------------------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.replace(",", " ").split()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edges", type=_int_list, default=[1, 2, 4],
                        help="edge counts, comma-separated (default: 1,2,4)")
    parser.add_argument("--edge-cpu", type=float, default=0.2,
                        help="each edge's CPU quota in cores (default: %(default)s)")
    parser.add_argument("--cpu-period-us", type=int, default=100_000,
                        help="the quota's period (default: %(default)s, the kernel's)")
    parser.add_argument("--feed-hz", type=float, default=20, help="updates per second")
    parser.add_argument("--feed-rows", type=int, default=100, help="rows per update")
    parser.add_argument("--feed-limit", type=int, default=1000,
                        help="rows the feed table keeps (default: %(default)s); the engine's "
                        "cost per update and view grows with it")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per window")
    parser.add_argument("--drain", type=float, default=1.0,
                        help="seconds after a window for its last updates to arrive")
    parser.add_argument("--repeats", type=int, default=3, help="windows per level")
    parser.add_argument("--rounds", type=int, default=1,
                        help="searches per edge count, the order of the edge counts flipped "
                        "every round")
    parser.add_argument("--ladder", type=_int_list,
                        help="subscribers per edge to try in order, up to the first failure "
                        "(default: search)")
    parser.add_argument("--start", type=int, default=10,
                        help="search: the first level, subscribers per edge")
    parser.add_argument("--max-per-edge", type=int, default=640,
                        help="search: the doubling stops here")
    parser.add_argument("--resolution", type=float, default=0.1,
                        help="search: bisect until the gap is this fraction of the capacity")
    parser.add_argument("--min-delivered", type=float, default=0.999)
    parser.add_argument("--max-p99-ms", type=float, default=100.0)
    parser.add_argument("--decode-every", type=int, default=1, metavar="N",
                        help="only every Nth subscriber decodes its updates, the others count "
                        "messages (default 1)")
    parser.add_argument("--loadgen-idle", action=argparse.BooleanOptionalAction, default=True,
                        help="load generators at SCHED_IDLE priority (default: on)")
    parser.add_argument("--subscribers-per-loadgen", type=int, default=200)
    parser.add_argument("--connect-timeout", type=float, default=300)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    if not 0 < args.edge_cpu <= (os.cpu_count() or 1):
        parser.error("--edge-cpu must be above 0 and at most the machine's cores")

    # SIGTERM ends the run the way Ctrl-C does, through every ``finally``: no cgroup is left.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    harness._bench_server.raise_nofile()
    layout = CgroupLayout.detect()
    records: list[dict[str, Any]] = []

    def emit(record: dict[str, Any]) -> None:
        records.append(record)
        print(json.dumps(record), flush=True)

    started = time.perf_counter()
    cgroups = RunCgroups(layout)
    quota = ""
    try:
        cond = conditions(args, layout, quota="")
        for round_ in range(args.rounds):
            for edge_count in harness.alternate(args.edges, round_):
                label = f"r{round_}-e{edge_count}"
                with tier(args, cgroups, edge_count, label) as the_tier:
                    quota = the_tier.quota_setting
                    search(args, the_tier, {"round": round_, "edges": edge_count}, emit)
    finally:
        cgroups.close()
    seconds = time.perf_counter() - started
    cond["quota"] = quota
    results = [r for r in records if r["scenario"] == "edge_capacity"]
    levels = [r for r in records if r["scenario"] == "edge_capacity_level"]
    proj = projection(args, results)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stamp}-edge-capacity.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in [cond, *records, proj]))
    text = summary(args, cond, levels, results, proj, seconds)
    (args.out / f"{stamp}-edge-capacity.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
