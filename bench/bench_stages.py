"""Throughput and memory of the columnar stages on synthetic flows shaped like the Hubble fixtures.

    python bench/bench_stages.py [--flows 2000000] [--batch 65536] [--only filter,sample]

Flows are generated directly as Arrow columns (a few seconds for millions):
many namespaces, pods with Cilium label sets, client/server connections in
both directions, TCP flags, ~20 % HTTP (including kube-probe and Prometheus
requests), ~15 % DNS (some NXDOMAIN), drops, reserved identities and node
health ICMP. Arrow is limited to one CPU thread so the figures are per core.
Each scenario warms up on three batches, then pushes every batch through
fresh stages (and closes them, so the aggregate's final windows count);
flows/s is measured over that pass, in wall time and in this process's
CPU time (the fairer figure on a shared machine). Peak RSS is the process high-water
mark during the pass (reset before it through /proc/self/clear_refs), so
it includes the generated input, whose size is printed first.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from exporter.components import Context  # noqa: E402
from exporter.config import parse  # noqa: E402
from exporter.metrics import Metrics  # noqa: E402
from exporter.model.schema import FLOW_SCHEMA  # noqa: E402
from exporter.pipeline.envelope import Envelope, Receipt  # noqa: E402
from exporter.registry import component_class, config_class  # noqa: E402

T0 = 1_700_000_000_000_000_000


def _take(values: list, idx: np.ndarray, type_: pa.DataType) -> pa.Array:
    return pa.array(values, type=type_).take(pa.array(idx))


def generate(n: int, seed: int = 1) -> pa.Table:
    """``n`` synthetic flows as one table of FLOW_SCHEMA."""
    rng = np.random.default_rng(seed)
    # endpoints: 40 namespaces x 50 pods, plus reserved ones (host, world, health, remote-node)
    namespaces = [f"ns-{i:02d}" for i in range(39)] + ["kube-system"]
    pods, pod_ns, pod_ip, pod_labels, pod_workload, pod_identity = [], [], [], [], [], []
    for i in range(2000):
        ns = namespaces[i % 40]
        app = f"app-{(i // 40) % 25}"
        pods.append(f"{app}-{i:05x}-x{i % 7}")
        pod_ns.append(ns)
        pod_ip.append(f"10.{(i >> 8) & 255}.{i & 255}.{(i * 7) % 250 + 1}")
        pod_labels.append([f"k8s:app={app}", f"k8s:io.kubernetes.pod.namespace={ns}",
                           "k8s:io.cilium.k8s.policy.cluster=default", f"k8s:io.cilium.k8s.policy.serviceaccount={app}",
                           f"k8s:version=v{i % 3}", "k8s:team=platform" if i % 2 else "k8s:team=shop"])
        pod_workload.append(app)
        pod_identity.append(16000 + i // 4)
    reserved = [("reserved:host", 1, "192.168.0.10"), ("reserved:world", 2, "34.120.1.1"),
                ("reserved:health", 4, "10.250.0.9"), ("reserved:remote-node", 6, "192.168.0.11")]
    for label, ident, ip in reserved:
        pods.append(None)
        pod_ns.append(None)
        pod_ip.append(ip)
        pod_labels.append([label])
        pod_workload.append(None)
        pod_identity.append(ident)
    n_ep = len(pods)
    host, world, health, remote = n_ep - 4, n_ep - 3, n_ep - 2, n_ep - 1

    # connections: client -> server, protocol, ports, kind of traffic
    n_conn = max(n // 6, 1)
    kind = rng.choice(6, n_conn, p=[0.50, 0.20, 0.15, 0.06, 0.05, 0.04])  # tcp, http, dns, kube-probe, prom, health
    # clients talk to a few services each: 200 server pods, 3 preferred servers per client
    client = rng.integers(0, 2000, n_conn)
    server = (client * 7 + rng.integers(0, 3, n_conn) * 13) % 200
    server[rng.random(n_conn) < 0.05] = world
    client[kind == 3] = host
    client[kind == 5] = remote
    server[kind == 5] = np.where(rng.random(int((kind == 5).sum())) < 0.5, health, host)
    cport = rng.integers(32768, 61000, n_conn)
    sport = np.array([80, 443, 8080, 9090, 5432, 6379, 3306])[server % 7]
    sport[kind == 2] = 53
    sport[kind == 5] = 4240
    proto = np.where(kind == 2, 1, 0)  # 0 TCP, 1 UDP, 2 ICMPv4
    proto[(kind == 5) & (rng.random(n_conn) < 0.5)] = 2

    conn = rng.integers(0, n_conn, n)
    reply = rng.random(n) < 0.45
    ckind = kind[conn]
    src = np.where(reply, server[conn], client[conn])
    dst = np.where(reply, client[conn], server[conn])
    sp = np.where(reply, sport[conn], cport[conn])
    dp = np.where(reply, cport[conn], sport[conn])
    p = proto[conn]
    l7 = ((ckind == 1) | (ckind == 3) | (ckind == 4)) & (rng.random(n) < 0.6)
    dns = (ckind == 2) & (rng.random(n) < 0.8)

    verdict_idx = rng.choice(4, n, p=[0.85, 0.03, 0.11, 0.01])  # FORWARDED, DROPPED, REDIRECTED, AUDIT
    verdict_idx[l7 | dns] = 2
    verdicts = ["FORWARDED", "DROPPED", "REDIRECTED", "AUDIT"]
    dropped = verdict_idx == 1
    drop_reason = np.where(dropped, rng.choice(3, n), -1)

    times = T0 + np.sort(rng.integers(0, 600 * 10**9, n))
    paths = ["/api/v1/orders", "/api/v1/users", "/productpage", "/reviews/0", "/healthz", "/metrics", "/readyz",
             "/static/app.js"]
    path_idx = rng.choice(len(paths), n, p=[0.3, 0.2, 0.2, 0.1, 0.0, 0.0, 0.0, 0.2])
    path_idx[ckind == 3] = rng.choice([4, 6], int((ckind == 3).sum()))
    path_idx[ckind == 4] = 5
    server_ip = pa.array(pod_ip, pa.string()).take(pa.array(server[conn]))
    url = pc.binary_join_element_wise("http://", server_ip, ":", pc.cast(pa.array(sport[conn]), pa.string()),
                                      _take(paths, path_idx, pa.string()), "")
    agents = ["curl/8.5.0", "kube-probe/1.29", "Prometheus/2.53.0", "Go-http-client/1.1"]
    agent_idx = rng.choice([0, 3], n)
    agent_idx[ckind == 3] = 1
    agent_idx[ckind == 4] = 2
    is_request = l7 & ~reply
    code = np.where(l7 & reply, rng.choice([200, 200, 200, 201, 404, 503], n), 0)
    header_lists = [[{"key": "User-Agent", "value": a}, {"key": "Accept", "value": "*/*"},
                     {"key": "X-Request-Id", "value": f"req-{i}"}] for i, a in enumerate(agents)]
    queries = [f"svc-{i}.ns-{i % 40:02d}.svc.cluster.local." for i in range(300)] + ["api.example.com.", "cdn.example.net."]
    q_idx = rng.integers(0, len(queries), n)
    rcode = np.where(rng.random(n) < 0.25, 3, 0)

    cols: dict[str, pa.Array] = {}
    cols["time"] = pa.array(times, type=pa.timestamp("ns", tz="UTC"))
    cols["uuid"] = pc.binary_join_element_wise("bench-", pc.cast(pa.array(np.arange(n)), pa.string()), "")
    # the node that reports the flow: the source endpoint's node (reserved endpoints: node 0)
    cols["node_name"] = _take([f"node-{i:02d}" for i in range(50)], np.where(src < 2000, src % 50, 0), pa.string())
    cols["verdict"] = _take(verdicts, verdict_idx, pa.string())
    cols["drop_reason"] = pa.array(["POLICY_DENIED", "CT_MAP_INSERTION_FAILED", "STALE_OR_UNROUTABLE_IP"]).take(
        pa.array(drop_reason, mask=drop_reason < 0))
    cols["flow_type"] = pa.array(["L3_L4", "L7"]).take(pa.array((l7 | dns).astype(np.int64)))
    cols["event_type"] = pa.array(np.where(l7 | dns, 129, 4).astype(np.int32))
    cols["traffic_direction"] = _take(["INGRESS", "EGRESS"], rng.integers(0, 2, n), pa.string())
    cols["is_reply"] = pa.array(reply)
    ip_arr = pa.array(pod_ip, pa.string())
    cols["ip_src"] = ip_arr.take(pa.array(src))
    cols["ip_dst"] = ip_arr.take(pa.array(dst))
    cols["ip_version"] = pa.array(np.full(n, 4, dtype=np.uint8))
    cols["l4_protocol"] = pa.array(["TCP", "UDP", "ICMPv4"]).take(pa.array(p))
    ported = p < 2
    cols["src_port"] = pa.array(sp.astype(np.uint16), mask=~ported)
    cols["dst_port"] = pa.array(dp.astype(np.uint16), mask=~ported)
    icmp = p == 2
    cols["icmp_type"] = pa.array(np.where(reply, 0, 8).astype(np.uint8), mask=~icmp)
    cols["icmp_code"] = pa.array(np.zeros(n, dtype=np.uint8), mask=~icmp)
    flags = rng.choice([0x002, 0x012, 0x010, 0x018, 0x011], n)
    cols["tcp_flags"] = pa.array(flags.astype(np.uint16), mask=p != 0)
    for side, idx in (("src", src), ("dst", dst)):
        cols[f"{side}_identity"] = pa.array(np.array(pod_identity, dtype=np.uint32)[idx])
        cols[f"{side}_namespace"] = pa.array(pod_ns, pa.string()).take(pa.array(idx))
        cols[f"{side}_pod"] = pa.array(pods, pa.string()).take(pa.array(idx))
        cols[f"{side}_labels"] = pa.array(pod_labels, pa.list_(pa.string())).take(pa.array(idx))
        cols[f"{side}_workload"] = pa.array(pod_workload, pa.string()).take(pa.array(idx))
        cols[f"{side}_workload_kind"] = pa.array(["Deployment" if w else None for w in pod_workload],
                                                 pa.string()).take(pa.array(idx))
    cols["l7_type"] = pa.array([None, "REQUEST", "RESPONSE"], pa.string()).take(
        pa.array(np.where(l7 | dns, np.where(reply, 2, 1), 0)))
    lat = rng.lognormal(15, 1.5, n).astype(np.uint64)
    cols["l7_latency_ns"] = pa.array(lat, mask=~((l7 | dns) & reply))
    cols["http_method"] = pa.array(["GET"] * 1).take(pa.array(np.zeros(n, dtype=np.int64), mask=~l7))
    cols["http_url"] = pc.if_else(pa.array(l7), url, pa.nulls(n, pa.string()))
    cols["http_code"] = pa.array(code.astype(np.uint16), mask=~(l7 & reply))
    cols["http_user_agent"] = pa.array(agents, pa.string()).take(pa.array(agent_idx, mask=~is_request))
    cols["http_headers"] = pa.array(header_lists, FLOW_SCHEMA.field("http_headers").type).take(
        pa.array(agent_idx, mask=~is_request))
    cols["dns_query"] = pa.array(queries, pa.string()).take(pa.array(q_idx, mask=~dns))
    cols["dns_rcode"] = pa.array(rcode.astype(np.uint16), mask=~(dns & reply))
    cols["bytes"] = pa.array(rng.integers(60, 20000, n).astype(np.uint64))
    cols["packets"] = pa.array(rng.integers(1, 30, n).astype(np.uint64))
    cols["sample_rate"] = pa.array(np.ones(n, dtype=np.uint32))
    arrays = [cols[f.name] if f.name in cols else pa.nulls(n, f.type) for f in FLOW_SCHEMA]
    return pa.Table.from_arrays(arrays, schema=FLOW_SCHEMA)


SCENARIOS: dict[str, list[tuple[str, dict]]] = {
    "filter": [("filter", {"allow": [{"verdict": ["FORWARDED", "REDIRECTED", "DROPPED"]}, {"protocol": ["dns"]}],
                           "deny": [{"source_pod": ["kube-system/"]}, {"destination_port": ["4240"]}]})],
    "filter-labels": [("filter", {"allow": [{"source_label": ["k8s:team=shop", "k8s:app in (app-1, app-2)"]}]})],
    "healthcheck": [("healthcheck", {"prometheus": True})],
    "sample": [("sample", {"rate": 10})],
    "aggregate": [("aggregate", {"window": "60s"})],
    "redact": [("redact", {"fields": ["ip", "http_url_query"], "mode": "hash", "key_env": "FLOWSHIP_BENCH_KEY"})],
    "chained": [("healthcheck", {"prometheus": True}),
                ("filter", {"deny": [{"source_pod": ["kube-system/"]}]}),
                ("sample", {"rate": 10}),
                ("aggregate", {"window": "60s"})],
    # the same stages, sampling first: later stages see a tenth of the rows. Nearly the same flows
    # survive (an always-kept 5xx of an unsampled probe connection loses its request, so stays)
    "chained-sample-first": [("sample", {"rate": 10}),
                             ("healthcheck", {"prometheus": True}),
                             ("filter", {"deny": [{"source_pod": ["kube-system/"]}]}),
                             ("aggregate", {"window": "60s"})],
}


def build_stages(spec: list[tuple[str, dict]]) -> list:
    stages = []
    metrics = Metrics()
    for i, (type_name, body) in enumerate(spec):
        config = parse(config_class("stages", type_name), body, "<bench>", f"stages[{i}]")
        ctx = Context(name=f"{type_name}-{i}", metrics=metrics, node_name="bench", data_dir=Path("/tmp"))
        stages.append(component_class("stages", type_name)(config, ctx))
    return stages


def run_once(stages: list, batches: list[pa.RecordBatch]) -> int:
    """Push every batch through the stages, then close them in order; returns rows out."""
    rows_out = 0
    for batch in batches:
        envs = [Envelope(batch, [Receipt()])]
        for stage in stages:
            envs = [out for env in envs for out in stage.process(env)]
        rows_out += sum(e.batch.num_rows for e in envs)
    for i, stage in enumerate(stages):
        produced = stage.close()
        for later in stages[i + 1:]:
            produced = [out for env in produced for out in later.process(env)]
        rows_out += sum(e.batch.num_rows for e in produced)
    return rows_out


def reset_peak_rss() -> None:
    """Start a new high-water mark (Linux: writing 5 to clear_refs resets VmHWM)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_scenario(name: str, batches: list[pa.RecordBatch]) -> tuple[int, int, float, float, float]:
    """Warm up on a few batches (fresh stages), then time a full pass with fresh stages."""
    run_once(build_stages(SCENARIOS[name]), batches[:3])
    gc.collect()
    reset_peak_rss()
    stages = build_stages(SCENARIOS[name])
    start, cpu_start = time.perf_counter(), time.process_time()
    rows_out = run_once(stages, batches)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return sum(b.num_rows for b in batches), rows_out, elapsed, cpu, peak_rss_mib()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flows", type=int, default=2_000_000)
    parser.add_argument("--batch", type=int, default=65536)
    parser.add_argument("--only", default=",".join(SCENARIOS))
    args = parser.parse_args()
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    os.environ.setdefault("FLOWSHIP_BENCH_KEY", "bench-key")

    t = time.perf_counter()
    table = generate(args.flows)
    batches = table.to_batches(max_chunksize=args.batch)
    gen_s = time.perf_counter() - t
    base_mib = peak_rss_mib()
    print(f"generated {table.num_rows:,} flows in {len(batches)} batches of <= {args.batch:,} rows "
          f"({table.nbytes / 2**20:,.0f} MiB of Arrow data) in {gen_s:.1f}s; RSS after generation {base_mib:,.0f} MiB")
    print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs "
          "(flows/s = per wall second; per CPU s = per second of this process's CPU time)")
    print(f"{'scenario':<20} {'flows in':>11} {'rows out':>11} {'wall s':>7} {'flows/s':>11} {'CPU s':>6} "
          f"{'per CPU s':>11} {'peak RSS MiB':>13}")
    for name in args.only.split(","):
        rows_in, rows_out, elapsed, cpu, peak = run_scenario(name, batches)
        print(f"{name:<20} {rows_in:>11,} {rows_out:>11,} {elapsed:>7.2f} {rows_in / elapsed:>11,.0f} {cpu:>6.2f} "
              f"{rows_in / cpu:>11,.0f} {peak:>13,.0f}")


if __name__ == "__main__":
    main()
