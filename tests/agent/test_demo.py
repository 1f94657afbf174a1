"""`flowship demo` answers the seed article's two questions from data it captured itself."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.kernel
REPO = Path(__file__).resolve().parents[2]


def test_demo_prints_latency_per_hop_and_the_dropped_calls(tmp_path):
    if os.geteuid() != 0:
        pytest.fail("flowship demo needs root (network namespaces, eBPF): run the tests as root")
    before = set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())
    proc = subprocess.run([sys.executable, "-m", "flowship.cli", "--log-level", "warning", "demo", "--out",
                           str(tmp_path / "demo")], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    lines = {m.group(1) + " " + m.group(2): m.group(0) for m in
             re.finditer(r"^(production/\S+)\s+(production/\S+:\d+)\s.*$", out, flags=re.M)}
    front = lines["production/frontend production/product-api:8080"].split()
    db = lines["production/product-api production/database:5000"].split()
    # columns: client server conns hs-p50 hs-p95 requests st-p50 st-p95 st-max 5xx
    assert front[2] == "12" and front[5] == "18" and front[9] == "6"  # 3 rounds; the kube-probe is filtered out
    assert db[2] == "18" and db[5] == "18" and db[9] == "0"
    assert float(front[7]) > 200.0 > float(db[7])  # the slow endpoint's time is the product-api's own
    denied = re.search(r"^production/frontend\s+production/database\s+6432\s+TCP\s+POLICY_DENIED / NETFILTER_DROP"
                       r"\s+(\d+)\s+(\d+)\s", out, flags=re.M)
    assert denied, out
    assert int(denied.group(1)) == 3 and int(denied.group(2)) >= 6  # 3 rounds, each a SYN and its retransmission
    drops = out[out.index("2. Which calls were dropped"):]
    topology_rows = [line for line in drops.splitlines() if "production/" in line or "10.99.0." in line]
    assert len(topology_rows) == 1, topology_rows  # the denied port only: no rows for normal closes
    # nothing left behind (namespaces that were there before belong to someone else)
    left = set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()) - before
    assert not [n for n in left if n.startswith(("fs-node-", "fs-frontend-"))], left
