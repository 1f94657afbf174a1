"""Helpers for the agent's namespace tests: preconditions, tcpdump recordings and tshark ground truth.

The topology itself is :class:`flowship.agent.topology.Topology` (the demo uses it too). Everything here fails
the test with what to run when the machine lacks something; nothing is skipped.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from flowship.agent import kernel_features, loader
from flowship.agent.topology import missing_tools

TEST_TOOLS = {"tcpdump": "tcpdump", "tshark": "tshark", "ping": "iputils-ping", "bpftool": "bpftool"}


def require_machine() -> None:
    """Fail (never skip) with the remedy when these tests cannot run here."""
    require_root("the agent's namespace tests need root (eBPF, tc, network namespaces)")
    require_tools(TEST_TOOLS, missing_tools())
    require_ebpf()


def require_root(why: str) -> None:
    """Root, and the built BPF object."""
    if os.geteuid() != 0:
        pytest.fail(f"{why}: run pytest as root")
    if not loader.DEFAULT_OBJECT.exists():
        pytest.fail(f"{loader.DEFAULT_OBJECT} is missing: build it with `make -C bpf`")


def require_tools(tools: dict[str, str], missing: list[str] | None = None) -> None:
    """Every command of ``tools`` (command → Debian package) on PATH."""
    missing = (missing or []) + [f"{t} (apt-get install {p})" for t, p in tools.items() if not shutil.which(t)]
    if missing:
        pytest.fail("missing tools: " + ", ".join(missing) + " — `bash deploy/dev/setup` installs them")


def require_ebpf(drops: bool = False) -> None:
    """A kernel that can run the capture (``drops``: and report kernel drops)."""
    features = kernel_features.check()
    if drops and (problems := features.problems() + features.warnings()):
        pytest.fail("the kernel cannot report drops here:\n" + "\n".join(problems))
    if problems := features.problems():
        pytest.fail("eBPF is not usable here:\n" + "\n".join(problems))


@contextmanager
def veth_pair(cli: str, srv: str, cli_if: str, srv_if: str, cli_addrs: tuple[str, str], srv_addrs: tuple[str, str],
              timeout: float = 60.0) -> Iterator[None]:
    """Namespaces ``cli`` and ``srv`` joined by a veth pair, an IPv4 /24 and an IPv6 /64 (``(v4, v6)``) on each
    end, for the duration of the block. Returns once the server's addresses answer pings from the client
    (links up, neighbours resolved); the namespaces are deleted at the end."""
    def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=timeout)

    try:
        sh("ip", "netns", "add", cli)
        sh("ip", "netns", "add", srv)
        sh("ip", "link", "add", cli_if, "netns", cli, "type", "veth", "peer", "name", srv_if, "netns", srv)
        for ns, ifname, (v4, v6) in ((cli, cli_if, cli_addrs), (srv, srv_if, srv_addrs)):
            sh("ip", "-n", ns, "addr", "add", f"{v4}/24", "dev", ifname)
            sh("ip", "-n", ns, "addr", "add", f"{v6}/64", "dev", ifname, "nodad")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "-n", ns, "link", "set", ifname, "up")
        for addr in srv_addrs:
            deadline = time.monotonic() + 20
            while sh("ip", "netns", "exec", cli, "ping", "-c", "1", "-W", "1", addr, check=False).returncode:
                if time.monotonic() > deadline:
                    pytest.fail(f"{addr} unreachable over the test veth pair")
                time.sleep(0.2)
        yield
    finally:
        for ns in (cli, srv):
            sh("ip", "netns", "del", ns, check=False)


@contextmanager
def tcpdump(ns: str, interfaces: list[str], directory: Path) -> Iterator[dict[str, Path]]:
    """Record each interface of a namespace to its own pcap (``<interface>.pcap``) for the duration of the block."""
    with record(ns, {name: directory / f"{name}.pcap" for name in interfaces}) as paths:
        yield paths


@contextmanager
def record(ns: str, paths: dict[str, Path], settle: float = 0.0, stop_timeout: float = 10.0
           ) -> Iterator[dict[str, Path]]:
    """Record interfaces of a namespace to the given pcap files for the duration of the block (and ``settle``
    seconds more, for the last packets in flight).

    Fails the test if tcpdump did not start or dropped packets: the ground truth must be complete.
    """
    procs: dict[str, subprocess.Popen[str]] = {}
    try:
        for name, path in paths.items():
            proc = subprocess.Popen(
                ["ip", "netns", "exec", ns, "tcpdump", "-i", name, "-n", "-U", "-Z", "root", "--immediate-mode",
                 "-B", "65536", "-s", "0", "-w", str(path)],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            procs[name] = proc
            assert proc.stderr is not None
            line = proc.stderr.readline()
            if "listening on" not in line:
                rest = proc.stderr.read() if proc.poll() is not None else ""
                pytest.fail(f"tcpdump on {name} did not start: {line}{rest}")
        yield paths
        time.sleep(settle)
    finally:
        errors = {}
        for name, proc in procs.items():
            proc.send_signal(signal.SIGINT)
            try:
                _, errors[name] = proc.communicate(timeout=stop_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, errors[name] = proc.communicate()
    for name, err in errors.items():
        m = re.search(r"(\d+) packets? dropped by kernel", err)
        if m is None or int(m.group(1)):
            pytest.fail(f"tcpdump on {name} lost packets, ground truth incomplete: {err}")


@dataclass
class Pkt:
    time_ns: int
    length: int
    src: str
    dst: str
    proto: int
    sport: int
    dport: int
    flags: int
    seq: int
    payload: bytes
    icmp_type: int
    icmp_id: int

    def key(self) -> tuple[str, int, str, int]:
        return (self.src, self.sport, self.dst, self.dport)


_FIELDS = [
    "frame.time_epoch", "frame.len", "ip.src", "ip.dst", "ipv6.src", "ipv6.dst", "ip.proto", "ipv6.nxt",
    "tcp.srcport", "tcp.dstport", "udp.srcport", "udp.dstport", "tcp.flags", "tcp.seq_raw", "tcp.payload",
    "udp.payload", "icmp.type", "icmpv6.type", "icmp.ident", "icmpv6.echo.identifier",
]  # fmt: skip


def read_pcap(path: Path) -> list[Pkt]:
    """IP packets (v4 and v6) of a pcap as tshark decodes them, with nanosecond timestamps."""
    cmd = ["tshark", "-r", str(path), "-n", "-T", "fields", "-E", "separator=|", "-E", "occurrence=f"]
    for f in _FIELDS:
        cmd += ["-e", f]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    pkts = []
    for line in out.splitlines():
        v = dict(zip(_FIELDS, line.split("|"), strict=True))
        src = v["ip.src"] or v["ipv6.src"]
        if not src:
            continue

        def num(k: str, v: dict[str, str] = v) -> int:
            return int(v[k], 0) if v[k] else 0

        sec, _, frac = v["frame.time_epoch"].partition(".")
        pkts.append(Pkt(
            time_ns=int(sec) * 10**9 + int((frac + "000000000")[:9]),
            length=int(v["frame.len"]), src=src, dst=v["ip.dst"] or v["ipv6.dst"],
            proto=num("ip.proto") or num("ipv6.nxt"),
            sport=num("tcp.srcport") or num("udp.srcport"), dport=num("tcp.dstport") or num("udp.dstport"),
            flags=num("tcp.flags"), seq=num("tcp.seq_raw"),
            payload=bytes.fromhex((v["tcp.payload"] or v["udp.payload"]).replace(":", "")),
            icmp_type=num("icmp.type") or num("icmpv6.type"),
            icmp_id=num("icmp.ident") or num("icmpv6.echo.identifier"),
        ))
    return pkts


@dataclass
class Direction:
    packets: int = 0
    bytes: int = 0
    flags: int = 0


def directions(pkts: list[Pkt], src: str, sport: int, dst: str, dport: int, proto: int = 6) -> tuple[Direction,
                                                                                                      Direction]:
    """(initiator → responder, responder → initiator) totals of one connection."""
    fwd, rev = Direction(), Direction()
    for p in pkts:
        if p.proto != proto:
            continue
        if p.key() == (src, sport, dst, dport):
            d = fwd
        elif p.key() == (dst, dport, src, sport):
            d = rev
        else:
            continue
        d.packets += 1
        d.bytes += p.length
        d.flags |= p.flags
    return fwd, rev


def first_time(pkts: list[Pkt], key: tuple[str, int, str, int], pred) -> int:  # noqa: ANN001
    """Timestamp of the first packet of a direction that satisfies pred."""
    for p in pkts:
        if p.key() == key and pred(p):
            return p.time_ns
    raise AssertionError(f"no packet of {key} matches")


def handshake_ns(pkts: list[Pkt], src: str, sport: int, dst: str, dport: int) -> int:
    syn = first_time(pkts, (src, sport, dst, dport), lambda p: p.flags & 0x12 == 0x02)
    synack = first_time(pkts, (dst, dport, src, sport), lambda p: p.flags & 0x12 == 0x12)
    return synack - syn


def message_starts(pkts: list[Pkt], key: tuple[str, int, str, int], prefix: bytes) -> list[int]:
    """Times of segments of a direction whose payload starts with prefix (HTTP message starts)."""
    return [p.time_ns for p in pkts if p.key() == key and p.payload.startswith(prefix)]


CTL = ((0x02, "SYN"), (0x01, "FIN"), (0x04, "RST"))


def control_order(pkts: list[Pkt], src: str, sport: int, dst: str, dport: int) -> list[tuple[str, int]]:
    """First (side:flag, time) of SYN/SYN-ACK/FIN/RST per side, in packet order."""
    seen: dict[str, int] = {}
    for p in pkts:
        if p.proto != 6:
            continue
        side = "c" if p.key() == (src, sport, dst, dport) else "s" if p.key() == (dst, dport, src, sport) else None
        if side is None:
            continue
        for bit, name in CTL:
            if p.flags & bit:
                label = f"{side}:{'SYN-ACK' if bit == 0x02 and p.flags & 0x10 else name}"
                seen.setdefault(label, p.time_ns)
    return list(seen.items())
