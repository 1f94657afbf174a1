"""Helpers for the agent's namespace tests: preconditions, tcpdump recordings and tshark ground truth.

The topology itself is :class:`agent.topology.Topology` (the demo uses it too). Everything here fails
the test with what to run when the machine lacks something; nothing is skipped.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent import kernel_features, loader
from agent.topology import missing_tools

TEST_TOOLS = {"tcpdump": "tcpdump", "tshark": "tshark", "ping": "iputils-ping", "bpftool": "bpftool"}


def require_machine() -> None:
    """Fail (never skip) with the remedy when these tests cannot run here."""
    if os.geteuid() != 0:
        pytest.fail("the agent's namespace tests need root (eBPF, tc, network namespaces): run pytest as root")
    if not loader.DEFAULT_OBJECT.exists():
        pytest.fail(f"{loader.DEFAULT_OBJECT} is missing: build it with `make -C bpf`")
    missing = missing_tools() + [f"{t} (apt-get install {p})" for t, p in TEST_TOOLS.items() if not shutil.which(t)]
    if missing:
        pytest.fail("missing tools: " + ", ".join(missing) + " — `bash deploy/dev/setup` installs them")
    problems = kernel_features.check().problems()
    if problems:
        pytest.fail("eBPF is not usable here:\n" + "\n".join(problems))


@contextmanager
def tcpdump(ns: str, interfaces: list[str], directory: Path) -> Iterator[dict[str, Path]]:
    """Record each interface of a namespace to its own pcap for the duration of the block.

    Fails the test if tcpdump did not start or dropped packets: the ground truth must be complete.
    """
    procs: dict[str, subprocess.Popen[str]] = {}
    paths = {name: directory / f"{name}.pcap" for name in interfaces}
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
                pytest.fail(f"tcpdump on {name} did not start: {line}")
        yield paths
    finally:
        errors = {}
        for name, proc in procs.items():
            proc.send_signal(signal.SIGINT)
            try:
                _, errors[name] = proc.communicate(timeout=10)
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
    payload: bytes

    def key(self) -> tuple[str, int, str, int]:
        return (self.src, self.sport, self.dst, self.dport)


_FIELDS = ["frame.time_epoch", "frame.len", "ip.src", "ip.dst", "ip.proto", "tcp.srcport", "tcp.dstport",
           "udp.srcport", "udp.dstport", "tcp.flags", "tcp.payload", "udp.payload"]


def read_pcap(path: Path) -> list[Pkt]:
    """IPv4 packets of a pcap as tshark decodes them, with nanosecond timestamps."""
    cmd = ["tshark", "-r", str(path), "-n", "-T", "fields", "-E", "separator=|", "-E", "occurrence=f"]
    for f in _FIELDS:
        cmd += ["-e", f]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    pkts = []
    for line in out.splitlines():
        v = dict(zip(_FIELDS, line.split("|"), strict=True))
        if not v["ip.src"]:
            continue

        def num(k: str, v: dict[str, str] = v) -> int:
            return int(v[k], 0) if v[k] else 0

        sec, _, frac = v["frame.time_epoch"].partition(".")
        pkts.append(Pkt(
            time_ns=int(sec) * 10**9 + int((frac + "000000000")[:9]),
            length=int(v["frame.len"]), src=v["ip.src"], dst=v["ip.dst"], proto=num("ip.proto"),
            sport=num("tcp.srcport") or num("udp.srcport"), dport=num("tcp.dstport") or num("udp.dstport"),
            flags=num("tcp.flags"),
            payload=bytes.fromhex((v["tcp.payload"] or v["udp.payload"]).replace(":", "")),
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
