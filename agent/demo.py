"""``flowship demo``: the seed article's two scenarios, live, on this machine.

Builds the frontend → product-api → database topology in network namespaces
(:mod:`flowship.agent.topology`), captures it with the agent (eBPF on the server-side
veths, so each connection is seen once), writes Parquet, and prints the two
answers the article works out by hand with ``hubble observe``:

1. where the latency of the call chain goes, per hop: TCP handshake time
   versus server time (the product-api's slow endpoint stands out, and its
   server time includes its own call to the database);
2. which calls were dropped: source, destination, port and reason, with the
   number of calls (distinct connections) and of dropped packets (an nftables
   rule in the database namespace drops connections to port 6432: each call is
   a SYN and its retransmission). Kernel frees that accompany normal work, such
   as the queue purge on every close, are not drops and are not listed.

Everything it creates (namespaces, links, processes, BPF links) is removed
when it finishes, also on error or Ctrl-C. Needs root.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from flowship.agent import topology as topo
from flowship.config import load_text

ROUNDS = 3

CONFIG = """
node_name: demo-node
data_dir: {out}/.state
shutdown_timeout: 30s
sources:
  - type: agent
    netns: {node_ns}
    interfaces: [v-api, v-db, v-dns]
    http_ports: [{api_port}, {db_port}]
    observer:
      enabled: false
    enrich:
      static:
{static}
stages:
  - type: healthcheck
sinks:
  - type: parquet
    path: {out}/flows
"""


def _static_map() -> str:
    lines = []
    kinds = {"database": "StatefulSet"}
    for pod in topo.PODS:
        lines.append(f"        - {{cidr: {pod.ip}/32, namespace: production, pod: {pod.name}-0, "
                     f"labels: {{app: {pod.name}}}, workload: {pod.name}, "
                     f"workload_kind: {kinds.get(pod.name, 'Deployment')}}}")
    return "\n".join(lines)


def build_config(out: Path, node_ns: str, extra_config: str | None) -> Any:
    text = CONFIG.format(out=out, node_ns=node_ns, api_port=topo.API_PORT, db_port=topo.DB_PORT,
                         static=_static_map())
    config = load_text(text, "<demo>")
    if extra_config:
        from flowship.config import load_file

        extra = load_file(extra_config, sources_optional=True)  # only its sinks are used
        config.sinks.extend(extra.sinks)  # the demo's flows also go wherever the given config sends flows
    return config


def _topology_drops(flows: pa.Table) -> tuple[pa.Table, int]:
    """The flows that involve the topology's addresses, and how many dropped calls elsewhere were captured.

    Kernel drops are reported for every namespace of the machine, so a busy host adds its own (loopback
    resets of other programs, say) to the demo's Parquet data; the answer is about the topology.
    """
    from flowship import report

    prefix = topo.SUBNET + "."
    ours = pc.or_(pc.starts_with(pc.fill_null(flows.column("ip_src"), ""), prefix),
                  pc.starts_with(pc.fill_null(flows.column("ip_dst"), ""), prefix))
    others = report.dropped_calls(flows.filter(pc.invert(ours)))
    return flows.filter(ours), sum(d.calls for d in others)


def run_demo(args: argparse.Namespace) -> int:
    from flowship import report
    from flowship.agent.source import AgentSource
    from flowship.metrics import Metrics
    from flowship.pipeline.runtime import Pipeline

    if os.geteuid() != 0:
        print("flowship demo needs root: it creates network namespaces and attaches eBPF programs.")
        return 1
    missing = topo.missing_tools()
    if missing:
        print("flowship demo needs: " + ", ".join(missing) + " (bash deploy/dev/setup installs them)")
        return 1
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    print(f"building the topology: frontend {topo.PODS[0].ip} -> product-api {topo.PODS[1].ip}:{topo.API_PORT} "
          f"-> database {topo.PODS[2].ip}:{topo.DB_PORT}, dns {topo.PODS[3].ip}")
    with topo.Topology() as t:
        t.start_services()
        config = build_config(out, t.node, args.config)
        pipeline = Pipeline(config, Metrics())
        source = next(s for s in pipeline.sources if isinstance(s, AgentSource))
        box: dict[str, Any] = {}
        runner = threading.Thread(target=lambda: box.setdefault("summary", pipeline.run()), daemon=True)
        runner.start()
        try:
            if not source.started.wait(30):
                print(f"the agent did not start: {box.get('summary')}")
                return 1
            print(f"capturing on {', '.join(['v-api', 'v-db', 'v-dns'])}; generating traffic ({ROUNDS} rounds: "
                  "keep-alive and new connections, a slow endpoint, a 503, a kube-probe, DNS, a denied port)")
            for _ in range(ROUNDS):
                t.run_frontend()
            time.sleep(1.0)
        finally:
            pipeline.stop()
            runner.join(60)
        summary = box.get("summary")
        if summary is None or summary.errors:
            print(f"the capture failed: {summary.errors if summary else 'did not stop'}")
            return 1
    flows = report.load_flows(out / "flows")
    print(f"\ncaptured {flows.num_rows} flows into {out / 'flows'}\n")
    print("1. Where the latency goes, per hop (client -> server:port). Handshake = SYN -> SYN-ACK on the node")
    print("   (network + server TCP stack); server time = request -> first response segment (the service's")
    print("   own processing, including its downstream calls):\n")
    print(report.format_latency(report.latency_by_hop(flows)))
    print("\n2. Which calls were dropped (and why; calls = distinct connections, packets = their dropped packets):\n")
    ours, others = _topology_drops(flows)
    print(report.format_drops(report.dropped_calls(ours)))
    if others:
        print(f"\n({others} other dropped calls on this machine, outside the demo's namespaces, are in the Parquet "
              "data too: the kernel reports the drops of every namespace)")
    print(f"\nQuery the data yourself: duckdb -c \"select * from read_parquet('{out}/flows/flows/**/*.parquet')\"")
    return 0
