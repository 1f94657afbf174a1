"""Synthetic flows shaped like real Hubble output, for benchmarks.

Many pods in a few namespaces, service ports, verdict mix (mostly FORWARDED,
some DROPPED/REDIRECTED), TCP/UDP/ICMP, HTTP request/response pairs with
latency and User-Agents (including kube-probe and Prometheus), DNS queries
with NXDOMAIN answers, labels lists like Cilium's. Built column-wise with
numpy, so generating millions of flows is cheap; ``write_jsonl`` turns them
into Hubble JSON lines with flowship's own encoder.
"""

from __future__ import annotations

import argparse
import gzip
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa

from exporter.model.ids import complete
from exporter.model.schema import FLOW_SCHEMA

NAMESPACES = ["production", "staging", "kube-system", "monitoring", "payments", "default"]
APPS = ["frontend", "product-api", "database", "billing-service", "payment-processor", "support-dashboard",
        "coredns", "prometheus", "redis", "kafka"]
VERDICTS = np.array(["FORWARDED"] * 90 + ["DROPPED"] * 3 + ["REDIRECTED"] * 6 + ["AUDIT"])
PORTS = np.array([80, 8080, 443, 5432, 6379, 9090, 53, 3000, 9092, 4240], dtype=np.uint16)
URLS = ["/products/123", "/products/456", "/status/42", "/charge", "/healthz", "/metrics", "/api/v1/orders?page=2"]
AGENTS = ["curl/8.1.2", "kube-probe/1.29", "Prometheus/2.45.0", "python-requests/2.31", "Go-http-client/1.1"]
DNS_NAMES = ["product-api.production.svc.cluster.local.", "database.production.svc.cluster.local.",
             "nonexistent.example.", "api.github.com.", "kafka.default.svc.cluster.local."]


def generate_batch(n: int, seed: int = 0, start_ns: int = 1_767_225_600_000_000_000, pods: int = 400) -> pa.RecordBatch:
    """``n`` flows over about n/100 seconds of traffic between ``pods`` pods."""
    rng = np.random.default_rng(seed)
    times = start_ns + np.sort(rng.integers(0, max(n, 1) * 10_000_000, n, dtype=np.int64))
    # Flows come in connections (handshake, data, request/response, close): ~8 flows each,
    # both directions sharing the connection's ports, as Hubble reports them.
    conns = max(n // 8, 1)
    conn = rng.integers(0, conns, n)
    conn_src = rng.integers(0, pods, conns)
    conn_dst = rng.integers(0, pods, conns)
    conn_kind = rng.choice(4, conns, p=[0.6, 0.2, 0.15, 0.05])  # 0 tcp, 1 http, 2 dns, 3 icmp
    conn_port = PORTS[rng.integers(0, len(PORTS), conns)]
    conn_sport = rng.integers(32768, 61000, conns).astype(np.uint16)
    src = conn_src[conn]
    dst = conn_dst[conn]
    pod_ns = np.array([NAMESPACES[i % len(NAMESPACES)] for i in range(pods)], dtype=object)
    pod_app = np.array([APPS[i % len(APPS)] for i in range(pods)], dtype=object)
    pod_name = np.array([f"{APPS[i % len(APPS)]}-{i:05d}-x{i % 7}" for i in range(pods)], dtype=object)
    pod_ip = np.array([f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}" for i in range(pods)], dtype=object)
    labels = [[f"k8s:app={APPS[i % len(APPS)]}", f"k8s:io.kubernetes.pod.namespace={NAMESPACES[i % len(NAMESPACES)]}",
               "k8s:io.cilium.k8s.policy.cluster=default"] for i in range(pods)]
    kind = conn_kind[conn]
    proto = np.where(kind == 2, "UDP", np.where(kind == 3, "ICMPv4", "TCP")).astype(object)
    dport = np.where(kind == 2, 53, conn_port[conn]).astype(np.uint16)
    sport = conn_sport[conn]
    is_reply = rng.random(n) < 0.45
    sp, dp = np.where(is_reply, dport, sport), np.where(is_reply, sport, dport)
    ip_s, ip_d = pod_ip[src], pod_ip[dst]
    ip_s, ip_d = np.where(is_reply, ip_d, ip_s), np.where(is_reply, ip_s, ip_d)
    verdict = VERDICTS[rng.integers(0, len(VERDICTS), n)]
    flags = np.where(kind == 0, rng.choice([2, 18, 16, 24, 17, 4], n), np.where(kind == 1, 24, 0)).astype(np.uint16)
    http = kind == 1
    l7 = http | (kind == 2)
    url_i = rng.integers(0, len(URLS), n)
    agent_i = rng.integers(0, len(AGENTS), n)
    code = np.where(rng.random(n) < 0.08, 503, 200)
    dns_i = rng.integers(0, len(DNS_NAMES), n)

    def col(values, mask=None):
        return [None if mask is not None and not mask[i] else values[i] for i in range(n)]

    data = {
        "time": pa.array(times, pa.int64()).cast(FLOW_SCHEMA.field("time").type),
        "uuid": pa.array([""] * n),
        "node_name": pa.array(["node-1"] * n),
        "verdict": pa.array(verdict),
        "drop_reason": pa.array(np.where(verdict == "DROPPED", "POLICY_DENIED", None)),
        "flow_type": pa.array(np.where(l7, "L7", "L3_L4")),
        "traffic_direction": pa.array(np.where(rng.random(n) < 0.5, "EGRESS", "INGRESS")),
        "is_reply": pa.array(is_reply),
        "event_type": pa.array(np.where(l7, 129, 4).astype(np.int32)),
        "ip_src": pa.array(ip_s), "ip_dst": pa.array(ip_d),
        "ip_version": pa.array(np.full(n, 4, np.uint8)),
        "l4_protocol": pa.array(proto),
        "src_port": pa.array(np.where(kind == 3, 0, sp).astype(np.uint16), mask=kind == 3),
        "dst_port": pa.array(np.where(kind == 3, 0, dp).astype(np.uint16), mask=kind == 3),
        "icmp_type": pa.array(np.where(is_reply, 0, 8).astype(np.uint8), mask=kind != 3),
        "icmp_code": pa.array(np.zeros(n, np.uint8), mask=kind != 3),
        "tcp_flags": pa.array(flags, mask=kind != 0),
        "src_namespace": pa.array(pod_ns[src]), "dst_namespace": pa.array(pod_ns[dst]),
        "src_pod": pa.array(pod_name[src]), "dst_pod": pa.array(pod_name[dst]),
        "src_workload": pa.array(pod_app[src]), "dst_workload": pa.array(pod_app[dst]),
        "src_labels": pa.array([labels[i] for i in src]), "dst_labels": pa.array([labels[i] for i in dst]),
        "src_identity": pa.array((src * 7 + 1000).astype(np.uint32)),
        "dst_identity": pa.array((dst * 7 + 1000).astype(np.uint32)),
        "l7_type": pa.array(np.where(l7, np.where(is_reply, "RESPONSE", "REQUEST"), None)),
        "l7_latency_ns": pa.array(rng.lognormal(15, 1.2, n).astype(np.uint64), mask=~(l7 & is_reply)),
        "http_method": pa.array(np.where(http, "GET", None)),
        "http_url": pa.array(col([f"http://{ip_d[i]}:{dp[i]}{URLS[url_i[i]]}" for i in range(n)], http)),
        "http_code": pa.array(code.astype(np.uint16), mask=~(http & is_reply)),
        "http_protocol": pa.array(np.where(http, "HTTP/1.1", None)),
        "http_user_agent": pa.array(col([AGENTS[a] for a in agent_i], http & ~is_reply)),
        "http_headers": pa.array(col([[{"key": "User-Agent", "value": AGENTS[a]}] for a in agent_i], http & ~is_reply),
                                 FLOW_SCHEMA.field("http_headers").type),
        "dns_query": pa.array(col([DNS_NAMES[d] for d in dns_i], kind == 2)),
        "dns_rcode": pa.array(np.where(dns_i == 2, 3, 0).astype(np.uint16), mask=~((kind == 2) & is_reply)),
        "dns_qtypes": pa.array(col([["A"]] * n, kind == 2)),
        "dns_ips": pa.array(col([["10.96.0.10"]] * n, (kind == 2) & is_reply & (dns_i != 2))),
    }
    arrays = [data[f.name] if f.name in data else pa.nulls(n, f.type) for f in FLOW_SCHEMA]
    arrays = [a.cast(f.type) if a.type != f.type else a for a, f in zip(arrays, FLOW_SCHEMA, strict=True)]
    return complete(pa.RecordBatch.from_arrays(arrays, schema=FLOW_SCHEMA))


def write_jsonl(path: Path, n: int, chunk: int = 100_000, seed: int = 0) -> None:
    """Hubble JSON lines (gzip when the name ends in .gz)."""
    from exporter.model.hubble_json import encode_lines

    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as fh:
        start = 1_767_225_600_000_000_000
        for i in range(0, n, chunk):
            batch = generate_batch(min(chunk, n - i), seed=seed + i, start_ns=start + i * 10_000_000)
            fh.write(b"".join(encode_lines(batch, extensions=False)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="file to write (Hubble JSON lines; .gz for gzip)")
    parser.add_argument("-n", type=int, default=1_000_000)
    args = parser.parse_args()
    write_jsonl(args.out, args.n)
    print(f"wrote {args.n} flows to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
