"""Shared pieces of the agent benchmarks: a veth pair between two namespaces, the C load generators
(bench/netload.c, compiled on first use) and a `flowship agent` process attached to the pair.

Everything runs inside namespaces the benchmark creates and removes; only those addresses are targets.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLI_IP, SRV_IP = "10.98.0.1", "10.98.0.2"


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def build_netload() -> Path:
    """Compile bench/netload.c into a cache folder (once per source change)."""
    src = REPO / "bench" / "netload.c"
    out = Path(tempfile.gettempdir()) / f"flowship-netload-{int(src.stat().st_mtime)}"
    if not out.exists():
        cc = shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            sys.exit("a C compiler is needed for the load generators: apt-get install gcc")
        sh(cc, "-O2", "-pthread", "-o", str(out), str(src))
    return out


@dataclass
class Pair:
    cli: str
    srv: str
    cli_if: str = "bc0"
    srv_if: str = "bs0"

    def run(self, ns: str, *cmd: str, **kw) -> subprocess.Popen[str]:  # noqa: ANN003
        return subprocess.Popen(["ip", "netns", "exec", ns, *cmd], text=True, **kw)


@contextmanager
def veth_pair() -> Iterator[Pair]:
    """client namespace ─ veth ─ server namespace; removed on exit."""
    if os.geteuid() != 0:
        sys.exit("the agent benchmarks need root (namespaces, eBPF)")
    tag = f"{os.getpid() % 100000:05d}"
    pair = Pair(cli=f"fsb-c{tag}", srv=f"fsb-s{tag}")
    try:
        sh("ip", "netns", "add", pair.cli)
        sh("ip", "netns", "add", pair.srv)
        sh("ip", "link", "add", pair.cli_if, "netns", pair.cli, "type", "veth", "peer", "name", pair.srv_if,
           "netns", pair.srv)
        for ns, ifname, ip in ((pair.cli, pair.cli_if, CLI_IP), (pair.srv, pair.srv_if, SRV_IP)):
            sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", ifname)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "-n", ns, "link", "set", ifname, "up")
        for _ in range(50):
            if sh("ip", "netns", "exec", pair.cli, "ping", "-c", "1", "-W", "1", SRV_IP, check=False).returncode == 0:
                break
            time.sleep(0.1)
        yield pair
    finally:
        sh("ip", "netns", "del", pair.cli, check=False)
        sh("ip", "netns", "del", pair.srv, check=False)


class Agent:
    """A `flowship agent` process attached to the server end of the pair (tc ingress + egress)."""

    def __init__(self, pair: Pair, workdir: Path, metrics_port: int = 0, extra: str = "") -> None:
        self.pair = pair
        self.workdir = workdir
        self.metrics_port = metrics_port
        self.extra = extra
        self.proc: subprocess.Popen[str] | None = None

    def config(self) -> Path:
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = self.workdir / "agent.yaml"
        cfg.write_text(f"""
node_name: bench
data_dir: {self.workdir}/state
{f"metrics: 127.0.0.1:{self.metrics_port}" if self.metrics_port else ""}
sources:
  - type: agent
    netns: {self.pair.srv}
    interfaces: [{self.pair.srv_if}]
    observer: {{enabled: false}}
{self.extra}
sinks:
  - type: parquet
    path: {self.workdir}/flows
""")
        return cfg

    def start(self) -> Agent:
        self.proc = subprocess.Popen([sys.executable, "-m", "flowship.cli", "--log-format", "json", "agent",
                                      "--config", str(self.config()), "--no-progress"], cwd=REPO,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            if '"agent capturing"' in line:
                return self
        raise RuntimeError(f"agent did not start: {self.proc.communicate()[1]}")

    def cpu_seconds(self) -> float:
        """user + system CPU time of the agent process so far."""
        assert self.proc is not None
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def _status_bytes(self, key: str) -> int:
        """A memory figure of the agent's /proc/PID/status (``VmRSS``, ``VmHWM``), in bytes."""
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) * 1024
        return 0

    def rss_bytes(self) -> int:
        return self._status_bytes("VmRSS")

    def hwm_bytes(self) -> int:
        return self._status_bytes("VmHWM")

    def metric(self, name: str) -> float:
        """Sum of a series from the agent's /metrics endpoint."""
        body = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        total = 0.0
        for line in body.splitlines():
            if line.startswith(name) and (len(line) == len(name) or line[len(name)] in " {"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def stop(self) -> str:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=120)
        if self.proc.returncode != 0:
            raise RuntimeError(f"agent exited {self.proc.returncode}: {err[-2000:]}")
        return err

    def summary(self, err: str) -> dict:
        for line in err.splitlines():
            if '"run summary"' in line:
                return json.loads(line)
        return {}


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]
