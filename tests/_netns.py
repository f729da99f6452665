"""Hosts on one machine, for tests of a tier of servers: network namespaces joined by links that
delay and drop packets the way a wide-area network does.

    with Topology() as net:
        up, edge = net.add_host("up"), net.add_host("edge")
        link = net.link(up, edge)                # 20 ms each way, 1 % of packets lost each way
        net.run(edge, ["python", "-m", "perspective_asgi", "edge",
                       f"ws://{link.address(up)}:8000/websocket", "--host", "0.0.0.0"])
        net.cut(link)                            # both ends down
        net.heal(link)
    # every namespace, link and process it made is gone, whether the body failed or not

Each host is a namespace named ``pat-<pid>-<n>-<host>`` (``n`` counts this process's
topologies), so that runs side by side do not collide, and a run that was killed is recognised
by its dead pid: the next ``Topology`` removes what it left, processes included. Each host also
has a management link to the root namespace, never impaired, at ``Host.address``: the test
process stays in the root namespace and reaches every host's servers through it. The tier links
and the management links share one /24 of 10.0.0.0/8 per topology, one not routed in the root
namespace yet; hosts have no default route, so nothing a host sends leaves the machine.

The impairment is ``tc qdisc ... netem`` on both ends of a veth pair when the kernel has netem.
A kernel built without it (``CONFIG_NET_SCH_NETEM`` off, as in some VM images) gets the same
from a relay: the link is then a pair of TUN devices, and a process of this module
(``python -m tests._netns relay``), in a namespace of its own, copies each packet from one to
the other after the delay, dropping the lost ones. ``Topology.mode`` says which one a topology
uses; ``PERSPECTIVE_ASGI_TEST_LINKS=netem`` or ``=relay`` chooses.

The module uses the standard library only: the relay runs it as a script.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import fcntl
import ipaddress
import math
import os
import random
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

__all__ = ["Host", "Impairment", "Link", "NetnsError", "Topology", "why_unavailable"]

#: Names of this module's namespaces start with it; a leftover is ``PREFIX-<dead pid>-...``.
PREFIX = "pat"
#: The ``ip`` command to use, when not iproute2's ``ip`` on the PATH (a test simulates a
#: machine where namespaces cannot be made by pointing it at ``false``).
IP_ENV = "PERSPECTIVE_ASGI_TEST_IP"
#: ``netem`` or ``relay``: how links are impaired; by default netem where the kernel has it.
LINKS_ENV = "PERSPECTIVE_ASGI_TEST_LINKS"
ROOT = Path(__file__).resolve().parent.parent
#: Seconds any one ``ip``/``tc`` command may take.
COMMAND_TIMEOUT = 30.0
#: Seconds a process started in a host gets to exit after SIGKILL.
KILL_TIMEOUT = 10.0
#: The most hosts and links a topology has: each takes a /30 of its /24.
MAX_HOSTS = MAX_LINKS = 31

Mode = Literal["netem", "relay"]
#: The root namespace's end of a management link: ``p<pid in base 36>-<topology>-<host>``.
MANAGEMENT_DEVICE = re.compile(r"^p([0-9a-z]+)-(\d+)-(\d+)$")


class NetnsError(RuntimeError):
    """An ``ip`` or ``tc`` command failed, or a relay did not start."""


@dataclass(frozen=True)
class Impairment:
    """What a tier link does to each packet, in each direction."""

    #: Added to every packet's trip, each way: 20 ms makes a 40 ms round trip.
    delay_ms: float = 20.0
    #: Share of packets dropped, each way, independently.
    loss_percent: float = 1.0


@dataclass(frozen=True)
class Host:
    """One network namespace: ``address`` is where the root namespace reaches it."""

    name: str
    netns: str
    address: str


@dataclass(frozen=True)
class Link:
    """An impaired link between two hosts, each end on the same /30."""

    a: Host
    b: Host
    #: Host name to (its device on this link, its address on this link).
    ends: dict[str, tuple[str, str]]

    def address(self, host: Host) -> str:
        """``host``'s address on this link: what the other end connects to."""
        return self.ends[host.name][1]


def _ip() -> str:
    return os.environ.get(IP_ENV, "ip")


def _run(args: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        done = subprocess.run(list(args), capture_output=True, text=True,
                              timeout=COMMAND_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetnsError(f"`{' '.join(args)}`: {exc}") from None
    if check and done.returncode != 0:
        output = (done.stderr or done.stdout).strip() or "no output"
        raise NetnsError(f"`{' '.join(args)}` exited with {done.returncode}: {output}")
    return done


def _netem_in(netns: str) -> bool:
    tc = shutil.which("tc")
    if tc is None:
        return False
    added = _run([tc, "-n", netns, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"],
                 check=False)
    return added.returncode == 0


def _probe() -> tuple[str | None, bool]:
    """(why namespaces cannot be made here, or None; whether the kernel has netem)."""
    if os.geteuid() != 0:
        return f"network namespaces need root; this process runs as uid {os.geteuid()}", False
    ip = _ip()
    if shutil.which(ip) is None:
        return f"no {ip!r} command (iproute2) to make network namespaces with", False
    probe = f"{PREFIX}-{os.getpid()}-probe"
    _run([ip, "netns", "del", probe], check=False)
    try:
        _run([ip, "netns", "add", probe])
    except NetnsError as exc:
        return f"cannot make a network namespace: {exc}", False
    try:
        netem = _netem_in(probe)
    finally:
        _run([ip, "netns", "del", probe], check=False)
    if not netem and not os.path.exists("/dev/net/tun"):
        return "neither tc netem nor /dev/net/tun: no way to delay and drop packets", False
    return None, netem


def why_unavailable() -> str | None:
    """Why a ``Topology`` cannot be made on this machine, or ``None`` when it can."""
    return _probe()[0]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _namespaces() -> list[str]:
    listed = _run([_ip(), "netns", "list"]).stdout
    return [line.split()[0] for line in listed.splitlines() if line.strip()]


def _kill_processes_in(netns: str) -> None:
    # What is left in a namespace was started there by one of our processes (a server's
    # workers, say): end each by its pid.
    pids = _run([_ip(), "netns", "pids", netns], check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


def _delete(netns: str) -> None:
    _kill_processes_in(netns)
    _run([_ip(), "netns", "del", netns])


def _management_devices() -> dict[str, int]:
    """The root namespace's ends of management links, by this module's naming, each with the
    pid of the process that made it."""
    listed = _run([_ip(), "-o", "link", "show", "type", "veth"]).stdout
    devices = {}
    for line in listed.splitlines():
        # "19: p534-1-0@if2: <BROADCAST,..."
        name = line.split(":")[1].strip().split("@")[0] if line.count(":") >= 2 else ""
        match = MANAGEMENT_DEVICE.match(name)
        if match:
            devices[name] = int(match[1], 36)
    return devices


def remove_leftovers(prefix: str = PREFIX) -> list[str]:
    """Delete the namespaces (and end the processes in them) and the management links of runs
    that were killed before they could clean up: those named after a pid that no longer runs.
    Returns their names."""
    pattern = re.compile(rf"^{re.escape(prefix)}-(\d+)-")
    removed = []
    for name in _namespaces():
        match = pattern.match(name)
        if match and int(match[1]) != os.getpid() and not _alive(int(match[1])):
            _delete(name)
            removed.append(name)
    # A namespace outlives its name while the kernel holds it (closing TCP connections, for
    # one), and with it the root namespace's end of its management link: delete that too.
    for device, pid in _management_devices().items():
        if pid != os.getpid() and not _alive(pid):
            _run([_ip(), "link", "del", device], check=False)
            removed.append(device)
    return removed


def _routed_networks() -> list[ipaddress.IPv4Network]:
    """The root namespace's IPv4 routes and addresses, but the default route."""
    lines = _run([_ip(), "-4", "-o", "route", "show", "table", "all"]).stdout.splitlines()
    lines += _run([_ip(), "-4", "-o", "addr", "show"]).stdout.splitlines()
    networks = []
    for line in lines:
        for token in line.split():
            with contextlib.suppress(ValueError):
                network = ipaddress.IPv4Network(token, strict=False)
                if network.prefixlen > 0:
                    networks.append(network)
                break
    return networks


def _free_subnet(seed: int) -> ipaddress.IPv4Network:
    taken = _routed_networks()
    for step in range(32_512):
        k = (seed + step) % 32_512
        candidate = ipaddress.IPv4Network(f"10.{128 + k // 256}.{k % 256}.0/24")
        if not any(candidate.overlaps(network) for network in taken):
            return candidate
    raise NetnsError("no /24 of 10.128.0.0/9 is free in the root namespace")


def _base36(number: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    text = ""
    while True:
        number, digit = divmod(number, 36)
        text = digits[digit] + text
        if not number:
            return text


def _wait_line(popen: subprocess.Popen[bytes], timeout: float) -> bytes:
    assert popen.stdout is not None
    ready, _, _ = select.select([popen.stdout], [], [], timeout)
    return popen.stdout.readline() if ready else b""


class Topology:
    """Hosts (network namespaces) and links between them; a context manager that removes all
    it made on exit.

    Args:
        impairment: what each tier link does to packets, in each direction.
        mode: ``"netem"`` or ``"relay"`` (see the module's docstring); by default
            ``PERSPECTIVE_ASGI_TEST_LINKS``, or netem where the kernel has it.
    """

    _made = 0

    def __init__(self, impairment: Impairment | None = None, *, mode: Mode | None = None) -> None:
        self.impairment = impairment or Impairment()
        self._mode: Mode | None = mode or _mode_from_env()
        Topology._made += 1
        #: Distinguishes this topology's names from others of this process and of others.
        self.tag = f"{os.getpid()}-{Topology._made}"
        self._short = f"{_base36(os.getpid())}-{Topology._made}"
        self.hosts: dict[str, Host] = {}
        self._devices: list[str] = []
        self.links: list[Link] = []
        self._netns: list[str] = []
        self._processes: list[subprocess.Popen[Any]] = []
        self._relays: list[subprocess.Popen[bytes]] = []
        self._wire: str | None = None
        self._subnet: ipaddress.IPv4Network | None = None
        #: Namespaces of killed runs removed when this one started.
        self.removed_leftovers: list[str] = []

    @property
    def mode(self) -> Mode:
        """How tier links are impaired: ``"netem"`` or ``"relay"``."""
        if self._mode is None:
            reason, netem = _probe()
            if reason is not None:
                raise NetnsError(reason)
            self._mode = "netem" if netem else "relay"
        return self._mode

    def __enter__(self) -> Topology:
        self.removed_leftovers = remove_leftovers()
        self._subnet = _free_subnet(os.getpid() * 7 + Topology._made)
        # Probed now, so that a machine that cannot impair links fails here, not at a link.
        self._mode = self.mode
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def _address(self, index: int) -> str:
        assert self._subnet is not None, "use the Topology as a context manager"
        return str(self._subnet.network_address + index)

    def add_host(self, name: str) -> Host:
        """Make a host named ``name`` (a few lowercase letters and digits) with its management
        link to the root namespace; return it."""
        if not re.fullmatch(r"[a-z][a-z0-9]{0,7}", name) or name in self.hosts:
            raise ValueError(f"host name {name!r}: taken, or not 1-8 lowercase letters/digits")
        index = len(self.hosts)
        if index >= MAX_HOSTS:
            raise ValueError(f"at most {MAX_HOSTS} hosts")
        ip = _ip()
        netns = f"{PREFIX}-{self.tag}-{name}"
        _run([ip, "netns", "add", netns])
        self._netns.append(netns)
        _run([ip, "-n", netns, "link", "set", "lo", "up"])
        outside, inside = self._address(4 * index + 1), self._address(4 * index + 2)
        device = f"p{self._short}-{index}"
        _run([ip, "link", "add", device, "type", "veth", "peer", "name", "mgmt", "netns", netns])
        self._devices.append(device)
        _run([ip, "addr", "add", f"{outside}/30", "dev", device])
        _run([ip, "link", "set", device, "up"])
        _run([ip, "-n", netns, "addr", "add", f"{inside}/30", "dev", "mgmt"])
        _run([ip, "-n", netns, "link", "set", "mgmt", "up"])
        # The test connects to this address: it must go down this link and nowhere else.
        route = _run([ip, "-4", "-o", "route", "get", inside]).stdout
        if f" dev {device} " not in f" {route} ":
            raise NetnsError(f"{inside} is not routed through {device}: {route.strip()}")
        host = self.hosts[name] = Host(name, netns, inside)
        return host

    def link(self, a: Host, b: Host) -> Link:
        """Join hosts ``a`` and ``b`` with an impaired link of their own; return it."""
        index = len(self.links)
        if index >= MAX_LINKS:
            raise ValueError(f"at most {MAX_LINKS} links")
        ends = {a.name: (f"to-{b.name}", self._address(128 + 4 * index + 1)),
                b.name: (f"to-{a.name}", self._address(128 + 4 * index + 2))}
        if self.mode == "netem":
            self._veth(a, b, ends)
        else:
            self._tun_pair(index, a, b, ends)
        ip = _ip()
        for host in (a, b):
            device, address = ends[host.name]
            _run([ip, "-n", host.netns, "addr", "add", f"{address}/30", "dev", device])
            _run([ip, "-n", host.netns, "link", "set", device, "up"])
        link = Link(a, b, ends)
        self.links.append(link)
        return link

    def _veth(self, a: Host, b: Host, ends: dict[str, tuple[str, str]]) -> None:
        ip, tc = _ip(), shutil.which("tc") or "tc"
        _run([ip, "-n", a.netns, "link", "add", ends[a.name][0], "type", "veth", "peer",
              "name", ends[b.name][0], "netns", b.netns])
        for host in (a, b):
            _run([tc, "-n", host.netns, "qdisc", "add", "dev", ends[host.name][0], "root",
                  "netem", "delay", f"{self.impairment.delay_ms}ms",
                  "loss", f"{self.impairment.loss_percent}%"])

    def _tun_pair(self, index: int, a: Host, b: Host, ends: dict[str, tuple[str, str]]) -> None:
        ip = _ip()
        if self._wire is None:
            self._wire = f"{PREFIX}-{self.tag}-wire"
            _run([ip, "netns", "add", self._wire])
            self._netns.append(self._wire)
        names = (f"t{index}a", f"t{index}b")
        relay = subprocess.Popen(
            [ip, "netns", "exec", self._wire, sys.executable, "-m", "tests._netns", "relay",
             "--delay-ms", str(self.impairment.delay_ms),
             "--loss-percent", str(self.impairment.loss_percent), *names],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
            # The relay exits when its stdin closes: when this process ends, however it ends.
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )
        self._relays.append(relay)
        line = _wait_line(relay, COMMAND_TIMEOUT)
        if line.strip() != b"ready":
            raise NetnsError(f"relay {names} did not start: {line!r}, exit {relay.poll()}")
        for host, tun in zip((a, b), names, strict=True):
            _run([ip, "-n", self._wire, "link", "set", tun, "netns", host.netns])
            _run([ip, "-n", host.netns, "link", "set", tun, "name", ends[host.name][0]])

    def _set(self, link: Link, state: str) -> None:
        for host in (link.a, link.b):
            _run([_ip(), "-n", host.netns, "link", "set", link.ends[host.name][0], state])

    def cut(self, link: Link) -> None:
        """Take both ends of ``link`` down: nothing crosses it until ``heal``."""
        self._set(link, "down")

    def heal(self, link: Link) -> None:
        """Bring both ends of ``link`` up again, with their addresses and routes."""
        self._set(link, "up")

    def run(self, host: Host, args: Sequence[str], **popen: Any) -> subprocess.Popen[Any]:
        """Start ``args`` inside ``host`` (``ip netns exec``); it is killed at the latest when
        the topology closes."""
        process: subprocess.Popen[Any] = subprocess.Popen(
            [_ip(), "netns", "exec", host.netns, *args], **popen
        )
        self._processes.append(process)
        return process

    def close(self) -> None:
        """End every process started in a host, then remove every namespace made (their
        links go with them). Raises ``NetnsError`` after trying all, if any could not be."""
        for process in [*self._processes, *self._relays]:
            if process.poll() is None:
                process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(KILL_TIMEOUT)
            for pipe in (process.stdin, process.stdout):
                if pipe is not None:
                    pipe.close()
        failures = []
        for device in self._devices:
            # Deleted with its namespace, unless the kernel keeps that a while: not ours to keep.
            _run([_ip(), "link", "del", device], check=False)
        self._devices.clear()
        for netns in reversed(self._netns):
            try:
                _delete(netns)
            except NetnsError as exc:
                failures.append(str(exc))
        self._netns.clear()
        if failures:
            raise NetnsError("; ".join(failures))


def _mode_from_env() -> Mode | None:
    value = os.environ.get(LINKS_ENV, "")
    if value == "netem":
        return "netem"
    if value == "relay":
        return "relay"
    if value:
        raise ValueError(f"{LINKS_ENV} must be netem or relay, not {value!r}")
    return None


# The relay: a link made of two TUN devices, for kernels without netem ---------------------------

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
#: Packets a direction holds at most, as netem's default limit: more are dropped.
RELAY_LIMIT = 1000


def _open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


@dataclass
class _Direction:
    """Packets on their way to ``target``, each with the time it is due there."""

    target: int
    due: collections.deque[tuple[float, bytes]] = field(default_factory=collections.deque)


def relay(names: Sequence[str], impairment: Impairment) -> None:
    """Make TUN devices ``names`` (two) and copy packets between them, delayed and thinned by
    ``impairment``, until stdin closes."""
    first, second = (_open_tun(name) for name in names)
    directions = {first: _Direction(second), second: _Direction(first)}
    delay, loss = impairment.delay_ms / 1000, impairment.loss_percent / 100
    chance = random.Random()
    poller = select.poll()
    for fd in (first, second, sys.stdin.fileno()):
        poller.register(fd, select.POLLIN)
    print("ready", flush=True)
    while True:
        now = time.monotonic()
        for direction in directions.values():
            while direction.due and direction.due[0][0] <= now:
                packet = direction.due.popleft()[1]
                # A device that is down refuses writes: the packet is lost, as on a cut cable.
                with contextlib.suppress(OSError):
                    os.write(direction.target, packet)
        waiting = [d.due[0][0] for d in directions.values() if d.due]
        timeout = math.ceil(max(0.0, min(waiting) - now) * 1000) if waiting else None
        for fd, _ in poller.poll(timeout):
            if fd not in directions:
                if not os.read(fd, 1):
                    return  # the topology's process has gone: so does its link
                continue
            direction = directions[fd]
            for _ in range(256):
                try:
                    packet = os.read(fd, 65_536)
                except BlockingIOError:
                    break
                if chance.random() >= loss and len(direction.due) < RELAY_LIMIT:
                    direction.due.append((time.monotonic() + delay, packet))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests._netns")
    commands = parser.add_subparsers(dest="command", required=True)
    relaying = commands.add_parser("relay", help="be one link of a topology (two TUN devices)")
    relaying.add_argument("--delay-ms", type=float, default=Impairment.delay_ms)
    relaying.add_argument("--loss-percent", type=float, default=Impairment.loss_percent)
    relaying.add_argument("names", nargs=2)
    args = parser.parse_args(argv)
    relay(args.names, Impairment(args.delay_ms, args.loss_percent))


if __name__ == "__main__":
    main()
