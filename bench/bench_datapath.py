"""What the agent costs the traffic it watches: throughput and per-request latency across a veth pair.

Two namespaces joined by a veth pair; `flowship agent` (the whole process: eBPF on tc ingress and egress
of the server end, user-space assembly, Parquet sink) is started and stopped between rounds, so rounds
without and with the agent alternate in one run and machine noise hits both alike. Each round runs
  - iperf3 TCP for --seconds (bits/s received), and
  - a TCP ping-pong of --requests round trips of 64 bytes (bench/netload.c, TCP_NODELAY; every RTT).
Printed: throughput per side (median of rounds) and the loss as the median of the per-pair ratios (a round
with the agent against the round without it next to it in time), RTT p50/p99 per side over all round
trips and what the agent adds in µs, and the agent's own CPU while the traffic ran.
Targets: < 3 % throughput loss, < 5 µs added per request at p99.

    sudo python3 bench/bench_datapath.py [--rounds 4] [--seconds 5] [--requests 20000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from netload import SRV_IP, Agent, Pair, build_netload, percentile, veth_pair  # noqa: E402

PP_PORT = 7001


def iperf(pair: Pair, seconds: float) -> float:
    """Received bits/s of one iperf3 TCP run client → server."""
    srv = pair.run(pair.srv, "iperf3", "-s", "-1", "-B", SRV_IP, "-p", "5201", stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    try:
        out = subprocess.run(["ip", "netns", "exec", pair.cli, "iperf3", "-c", SRV_IP, "-p", "5201", "-t",
                              str(seconds), "-J"], capture_output=True, text=True, check=True).stdout
    finally:
        srv.wait(timeout=30)
    return float(json.loads(out)["end"]["sum_received"]["bits_per_second"])


def pingpong(pair: Pair, netload: Path, requests: int) -> list[float]:
    """RTTs in µs of `requests` 64-byte round trips on one connection."""
    out = subprocess.run(["ip", "netns", "exec", pair.cli, str(netload), "pp-client", SRV_IP,
                          str(PP_PORT),
                          str(requests), "64"], capture_output=True, text=True, check=True).stdout
    return [int(x) / 1000 for x in out.split()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=4, help="rounds per side (alternating)")
    ap.add_argument("--seconds", type=float, default=5.0, help="iperf3 time per round")
    ap.add_argument("--requests", type=int, default=20000, help="ping-pong round trips per round")
    args = ap.parse_args()
    netload = build_netload()
    results: dict[str, dict[str, list[float]]] = {s: {"bps": [], "rtt": []} for s in ("without", "with")}
    agent_cpu: list[float] = []
    with veth_pair() as pair, tempfile.TemporaryDirectory() as tmp:
        server = pair.run(pair.srv, str(netload), "pp-server", SRV_IP, str(PP_PORT),
                          stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE)
        assert server.stdout is not None
        server.stdout.readline()
        try:
            pingpong(pair, netload, 2000)  # warm-up
            for r in range(args.rounds):
                for side in ("without", "with") if r % 2 == 0 else ("with", "without"):
                    agent = Agent(pair, Path(tmp) / f"{side}{r}").start() if side == "with" else None
                    try:
                        if agent is not None:
                            time.sleep(1.0)  # let the agent's start-up settle
                            cpu0, t0 = agent.cpu_seconds(), time.monotonic()
                        results[side]["bps"].append(iperf(pair, args.seconds))
                        results[side]["rtt"].extend(pingpong(pair, netload, args.requests))
                        if agent is not None:
                            agent_cpu.append((agent.cpu_seconds() - cpu0) / (time.monotonic() - t0))
                    finally:
                        if agent is not None:
                            agent.stop()
                    print(f"round {r + 1} {side:>7}: {results[side]['bps'][-1] / 1e9:6.2f} Gbit/s", flush=True)
        finally:
            assert server.stdin is not None
            server.stdin.close()
            server.wait(timeout=10)
    base, agent = results["without"], results["with"]
    bps0, bps1 = statistics.median(base["bps"]), statistics.median(agent["bps"])
    print(f"\nveth pair, {args.rounds} alternating rounds per side, {args.seconds:g}s iperf3 + {args.requests} "
          f"ping-pongs per round; machine: {_machine()}")
    ratios = [w / wo for w, wo in zip(agent["bps"], base["bps"], strict=True)]
    print(f"throughput (median)   without {bps0 / 1e9:7.2f} Gbit/s   with {bps1 / 1e9:7.2f} Gbit/s   "
          f"loss {100 * (1 - statistics.median(ratios)):+.2f} % (median of per-pair ratios; "
          f"pairs range {100 * (1 - max(ratios)):+.1f} .. {100 * (1 - min(ratios)):+.1f} %)")
    for q, name in ((0.5, "p50"), (0.99, "p99")):
        r0, r1 = percentile(base["rtt"], q), percentile(agent["rtt"], q)
        print(f"request RTT {name:<9} without {r0:7.2f} µs      with {r1:7.2f} µs      added {r1 - r0:+.2f} µs")
    print(f"agent process CPU while traffic ran: {100 * statistics.median(agent_cpu):.1f} % of one core (median)")


def _machine() -> str:
    import os
    import platform

    return f"{os.cpu_count()} cores, kernel {platform.release()}"


if __name__ == "__main__":
    main()
