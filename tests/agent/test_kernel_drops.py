"""DROPPED means refused: in two namespaces where nftables denies one port, only that port's packets are DROPPED.

Real namespaces, a veth pair, an nftables rule and real TCP traffic (IPv4 and IPv6): connections that
open, exchange requests and close normally before and after three attempts at the denied port. The
capture reports drops of every namespace (the agent's default); the events of the test's two namespaces
are assembled into flow rows exactly as the agent does, and:

* every DROPPED row is a SYN of a denied attempt (port 9999, NETFILTER_DROP), and each attempt is one;
* the normal connections have no DROPPED row, whatever the kernel freed while closing them;
* every drop event of the namespaces is accounted for: exported as DROPPED or counted as benign;
* every reason in this kernel's BTF is classified (agent/drop_reasons.py).

Lean on purpose (two helper processes, no tcpdump) so that the kernel-matrix harness can run it inside
VMs: ``pytest -m kernel tests/agent/test_kernel_drops.py``. Needs root and the built object.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import netns
import numpy as np
import pyarrow as pa
import pytest

from flowship.agent import btf, drop_reasons
from flowship.agent.assemble import AssembleConfig, Assembler
from flowship.agent.capture import CaptureBatch, CaptureConfig, KernelCapture
from flowship.agent.kernel_drops import DropReasons
from flowship.metrics import Metrics
from flowship.report import dropped_calls

pytestmark = pytest.mark.kernel

DENIED, OPEN = 9999, 8080

SERVER = r"""
import socket, sys, threading
port = int(sys.argv[1])
s = socket.socket(socket.AF_INET6)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", port)); s.listen(64); print("ready", flush=True)
def serve(c):
    buf = b""
    while True:
        d = c.recv(65536)
        if not d:
            break
        buf += d
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            c.sendall(b"r" * int(line) + b"\n")
    c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

CLIENT = r"""
import json, socket, sys
v4, v6, open_port, denied = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
out = {"normal": [], "denied": []}
def normal(host, sizes):
    c = socket.create_connection((host, open_port), timeout=10)
    port = c.getsockname()[1]
    for size in sizes:
        c.sendall(b"%d\n" % size); got = b""
        while not got.endswith(b"\n"):
            got += c.recv(65536)
        assert len(got) == size + 1
    c.shutdown(socket.SHUT_WR)
    while c.recv(65536):
        pass
    c.close(); out["normal"].append([host, port])
def quick(host):  # request, answer, close without waiting for the server's FIN
    c = socket.create_connection((host, open_port), timeout=10)
    c.sendall(b"100\n"); got = b""
    while not got.endswith(b"\n"):
        got += c.recv(65536)
    out["normal"].append([host, c.getsockname()[1]]); c.close()
def refused(host):
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET); s.settimeout(1.5)
    s.bind(("::" if ":" in host else "0.0.0.0", 0)); port = s.getsockname()[1]
    try:
        s.connect((host, denied)); outcome = "connected"
    except OSError as e:
        outcome = type(e).__name__
    s.close(); out["denied"].append([host, port, outcome])
def round_of_normal():
    for host in (v4, v6):
        normal(host, [10, 70000, 5])
        quick(host)
round_of_normal()
for host in (v4, v6, v4):
    refused(host)
round_of_normal()
print(json.dumps(out), flush=True)
"""


def test_every_drop_reason_of_this_kernel_is_classified() -> None:
    if not btf.VMLINUX_BTF.exists():
        pytest.fail(f"{btf.VMLINUX_BTF} is missing: the kernel needs CONFIG_DEBUG_INFO_BTF to name drop reasons")
    names = DropReasons.from_kernel().by_name
    assert names, f"the BTF of {os.uname().release} has no enum skb_drop_reason (kernel < 5.17?)"
    unclassified = sorted(n for n in names if n not in drop_reasons.CLASSES)
    assert not unclassified, f"classify these in agent/drop_reasons.py and docs/agent.md: {unclassified}"


def sh(*cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=timeout)


@dataclass
class Pair:
    cli: str
    srv: str
    srv_if: str
    cli4: str = "10.79.0.1"
    srv4: str = "10.79.0.2"
    cli6: str = "fd79::1"
    srv6: str = "fd79::2"

    def inodes(self) -> list[int]:
        return [os.stat(f"/run/netns/{ns}").st_ino for ns in (self.cli, self.srv)]


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    netns.require_root("the kernel drop test needs root (eBPF, network namespaces, nftables)")
    netns.require_tools({"ip": "iproute2", "nft": "nftables"})
    netns.require_ebpf(drops=True)
    tag = f"{os.getpid() % 100000:05d}"
    p = Pair(cli=f"fsd-c{tag}", srv=f"fsd-s{tag}", srv_if=f"fds{tag}")
    # links up and neighbours resolved before the capture starts
    with netns.veth_pair(p.cli, p.srv, f"fdc{tag}", p.srv_if, (p.cli4, p.cli6), (p.srv4, p.srv6)):
        rules = ("add table inet fsdrops\n"
                 "add chain inet fsdrops input { type filter hook input priority 0; policy accept; }\n"
                 f"add rule inet fsdrops input tcp dport {DENIED} drop\n")
        subprocess.run(["ip", "netns", "exec", p.srv, "nft", "-f", "-"], input=rules, text=True, check=True,
                       capture_output=True)
        yield p


def run_traffic(p: Pair) -> tuple[dict, CaptureBatch]:
    """The scenario under a capture that reports the drops of every namespace (the agent's default)."""
    server = subprocess.Popen(["ip", "netns", "exec", p.srv, sys.executable, "-c", SERVER, str(OPEN)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    cap = KernelCapture()
    try:
        assert server.stdout is not None
        if server.stdout.readline().strip() != "ready":
            pytest.fail(f"test server did not start: {server.stderr.read() if server.stderr else ''}")
        cap.start([p.srv_if], CaptureConfig(netns=p.srv, drop_netns=None, sweep_interval_s=None))
        client = sh("ip", "netns", "exec", p.cli, sys.executable, "-c", CLIENT, p.srv4, p.srv6, str(OPEN),
                    str(DENIED), timeout=600)
        time.sleep(1.0)  # closes finish (FIN/ACK, TIME_WAIT entries) while the capture still listens
        batch = cap.finish()
    finally:
        cap.close()
        server.kill()
        server.communicate()
    return json.loads(client.stdout), batch


@pytest.fixture(scope="module")
def scenario(pair: Pair) -> tuple[dict, CaptureBatch]:
    return run_traffic(pair)


def assemble(batch: CaptureBatch, inodes: list[int], **cfg: object) -> tuple[pa.Table, Metrics, Assembler]:
    """Flow rows of the test namespaces' events, assembled as the agent source does."""
    ours = batch.drops[np.isin(batch.drops["netns_ino"], inodes)]
    only_ours = CaptureBatch(flows=batch.flows, drops=ours, l7=batch.l7, lost=batch.lost, stats=batch.stats,
                             wall_offset_ns=batch.wall_offset_ns)
    metrics = Metrics()
    asm = Assembler(AssembleConfig(node_name="test-node", **cfg), metrics=metrics, drop_names=DropReasons.from_kernel())
    rows = asm.assemble(only_ours, {})
    return pa.Table.from_batches([rows]), metrics, asm


COLUMNS = ["verdict", "ip_src", "ip_dst", "src_port", "dst_port", "tcp_flags", "kernel_drop_reason", "drop_reason",
           "uuid"]


def rows_of(table: pa.Table) -> list[dict]:
    return table.select(COLUMNS).to_pylist()


def test_only_the_denied_port_is_dropped(pair: Pair, scenario: tuple[dict, CaptureBatch]) -> None:
    traffic, batch = scenario
    assert [d[2] for d in traffic["denied"]] == ["TimeoutError"] * 3
    table, metrics, asm = assemble(batch, pair.inodes())
    rows = rows_of(table)
    dropped = [r for r in rows if r["verdict"] == "DROPPED"]
    denied = {(host, port) for host, port, _ in traffic["denied"]}
    stray = [(r["ip_src"], r["src_port"], r["ip_dst"], r["dst_port"], r["kernel_drop_reason"]) for r in dropped
             if (r["ip_dst"], r["dst_port"]) not in ((pair.srv4, DENIED), (pair.srv6, DENIED))]
    assert not stray, f"DROPPED verdicts outside the denied port: {stray}"
    assert {r["kernel_drop_reason"] for r in dropped} == {"NETFILTER_DROP"}
    assert {r["drop_reason"] for r in dropped} == {"POLICY_DENIED"}
    assert all(r["tcp_flags"] & 0x02 for r in dropped)  # the refused SYNs (and retransmissions)
    assert {(r["ip_dst"], r["src_port"]) for r in dropped} == denied  # each attempt, and nothing else
    assert len(dropped) >= 2 * len(denied)  # a SYN and at least one retransmission each

    normal = {port for _, port in traffic["normal"]}
    assert len(normal) == 8
    assert not [r for r in rows if r["verdict"] == "DROPPED" and {r["src_port"], r["dst_port"]} & normal]

    # every drop event of the two namespaces is either a DROPPED row or counted as benign
    mask = np.isin(batch.drops["netns_ino"], pair.inodes())
    events = int(mask.sum())
    seen = np.unique(DropReasons.from_kernel().names(batch.drops["drop_reason"][mask]), return_counts=True)
    print(f"kernel drop events in the test namespaces ({os.uname().release}):", dict(zip(seen[0].tolist(), seen[1].tolist(), strict=True)))
    counted = metrics.value("flowship_agent_kernel_drops_total")
    assert counted == events == len(dropped) + asm.totals["benign_drops"]
    assert metrics.value("flowship_agent_kernel_drops_total", **{"class": "dropped"}) == len(dropped)

    calls = dropped_calls(table)  # the report counts calls: one per denied attempt, packets beside them
    assert {(c.destination, c.port, c.reason, c.calls) for c in calls} == {
        (pair.srv4, DENIED, "POLICY_DENIED / NETFILTER_DROP", 2), (pair.srv6, DENIED, "POLICY_DENIED / NETFILTER_DROP", 1)}
    assert sum(c.packets for c in calls) == len(dropped)


def test_listed_benign_reasons_are_exported_as_traced(pair: Pair, scenario: tuple[dict, CaptureBatch]) -> None:
    _, batch = scenario
    everything, _, asm = assemble(batch, pair.inodes(), drop_export_benign=drop_reasons.export_set(["ALL"]))
    default, _, _ = assemble(batch, pair.inodes())
    traced = [r for r in rows_of(everything) if r["verdict"] == "TRACED"]
    assert asm.totals["benign_drops"] == 0
    assert all(drop_reasons.classify(r["kernel_drop_reason"]) != drop_reasons.DROP and r["drop_reason"] is None
               for r in traced)
    # the DROPPED rows do not change when benign reasons are exported
    assert sorted(r["uuid"] for r in rows_of(everything) if r["verdict"] == "DROPPED") == sorted(
        r["uuid"] for r in rows_of(default) if r["verdict"] == "DROPPED")
    assert everything.num_rows == default.num_rows + len(traced)
