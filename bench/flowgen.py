"""Synthetic flows shaped like real Hubble output, for benchmarks and tests.

Traffic is generated as *connections*, each reported as several flows in
time order, both directions sharing the connection's addresses and ports:

* TCP between pods, to the outside world and to the API server: SYN, SYN-ACK,
  data in both directions, FIN; a few connections denied by policy (only
  dropped SYNs) or in policy audit mode;
* HTTP through the L7 proxy: the handshake (REDIRECTED), then request and
  response flows (L7, with URL, method, User-Agent header, status code,
  latency), some URLs with a query string, some 404/503 answers;
* DNS to CoreDNS: query and answer (resolved address, TTL), NXDOMAIN for
  names that do not exist;
* health traffic: kubelet probes from ``reserved:host`` (``kube-probe``
  User-Agent, ``/healthz`` ``/readyz``), Prometheus scrapes of ``/metrics``,
  and Cilium's node health checks from ``reserved:remote-node`` to
  ``reserved:health`` on port 4240 and by ICMP echo.

Endpoints are pods in several namespaces with Cilium label sets and
identities, spread over nodes, plus the reserved identities (host, world,
health, remote-node, kube-apiserver). Everything is built column-wise with
numpy and Arrow ``take`` on small dictionaries, so millions of flows cost
seconds; ``write_jsonl`` turns them into Hubble JSON lines with flowship's
own encoder.

    python bench/flowgen.py flows.jsonl.gz -n 1000000
"""

from __future__ import annotations

import argparse
import base64
import gzip
import hashlib
import ipaddress
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flowship.model.schema import FLOW_SCHEMA  # noqa: E402

DEFAULT_START_NS = 1_767_225_600_000_000_000  # 2026-01-01T00:00:00Z
NAMESPACES = ["production", "staging", "kube-system", "monitoring", "payments", "default"]
APPS = ["frontend", "product-api", "database", "billing-service", "payment-processor", "support-dashboard",
        "coredns", "prometheus", "redis", "kafka"]
TEAMS = ["shop", "platform", "payments"]
VERDICTS = ["FORWARDED", "DROPPED", "REDIRECTED", "AUDIT"]
DROP_REASONS = ["POLICY_DENIED", "CT_MAP_INSERTION_FAILED", "STALE_OR_UNROUTABLE_IP"]
HTTP_PATHS = ["/api/v1/orders", "/api/v1/orders?page=2", "/products/123", "/products/456", "/status/42",
              "/charge", "/static/app.js", "/api/v1/users?id=7&expand=true"]
PROBE_PATHS = ["/healthz", "/readyz"]
AGENTS = ["curl/8.5.0", "python-requests/2.31", "Go-http-client/1.1", "kube-probe/1.29", "Prometheus/2.53.0"]
DNS_NAMES = [f"{app}.{ns}.svc.cluster.local." for ns in NAMESPACES for app in APPS] + [
    "api.github.com.", "cdn.example.net.", "nonexistent.example.", "database.production.svc.svc.cluster.local."]
NXDOMAIN = {"nonexistent.example.", "database.production.svc.svc.cluster.local."}
HEALTH_PORT = 4240
TCP_PORTS = np.array([5432, 6379, 9092, 443, 8443])
HTTP_PORTS = np.array([80, 8080, 3000])
# connection kinds: probability, mean extra flows beyond the first two
TCP, HTTP, DNS, PROBE, SCRAPE, HEALTH = range(6)
KIND_P = [0.45, 0.22, 0.15, 0.07, 0.05, 0.06]
KIND_EXTRA = np.array([6.0, 8.0, 0.0, 4.0, 4.0, 2.0])


def _take(values: list, idx: np.ndarray, type_: pa.DataType | None = None, mask: np.ndarray | None = None) -> pa.Array:
    """values[idx] as an Arrow array; null where ``mask`` is False."""
    indices = pa.array(idx.astype(np.int64), mask=None if mask is None else ~mask)
    return pa.array(values, type=type_ or pa.string()).take(indices)


def _take_lists(lists: list[list[str]], idx: np.ndarray) -> pa.Array:
    """lists[idx] as a list<string> column: one string take instead of Arrow's slower list take."""
    lengths = np.array([len(item) for item in lists], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    flat = pa.array([value for item in lists for value in item], pa.string())
    row_lengths = lengths[idx]
    offsets = np.zeros(len(idx) + 1, dtype=np.int64)
    np.cumsum(row_lengths, out=offsets[1:])
    positions = np.repeat(starts[idx] - offsets[:-1], row_lengths) + np.arange(offsets[-1])
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), flat.take(pa.array(positions)))


def _uuids(rng: np.random.Generator, n: int) -> pa.Array:
    """Random version-4 uuids as text, built without a Python object per row."""
    raw = rng.integers(0, 256, (n, 16), dtype=np.uint8)
    raw[:, 6] = (raw[:, 6] & 0x0F) | 0x40
    raw[:, 8] = (raw[:, 8] & 0x3F) | 0x80
    hexdigits = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
    digits = np.empty((n, 32), dtype=np.uint8)
    digits[:, 0::2] = hexdigits[raw >> 4]
    digits[:, 1::2] = hexdigits[raw & 0x0F]
    dash = np.full((n, 1), ord("-"), dtype=np.uint8)
    text = np.concatenate([digits[:, :8], dash, digits[:, 8:12], dash, digits[:, 12:16], dash, digits[:, 16:20],
                           dash, digits[:, 20:]], axis=1)
    offsets = np.arange(0, 36 * (n + 1), 36, dtype=np.int32)
    return pa.Array.from_buffers(pa.string(), n, [None, pa.py_buffer(offsets), pa.py_buffer(text.tobytes())])


class _Endpoints:
    """Pods and reserved endpoints: attribute lists indexed by endpoint number."""

    def __init__(self, pods: int, namespaces: int) -> None:
        self.nodes = max(1, pods // 40)
        names = NAMESPACES + [f"ns-{i:02d}" for i in range(len(NAMESPACES), namespaces)]
        self.ip, self.ns, self.pod, self.labels, self.workload, self.kind, self.identity, self.node = \
            [], [], [], [], [], [], [], []
        for i in range(pods):
            ns, app = names[i % namespaces], APPS[(i // namespaces) % len(APPS)]
            node = i % self.nodes
            version, team = i % 3, TEAMS[(i // 7) % len(TEAMS)]
            self.ip.append(f"10.244.{node}.{(i // self.nodes) % 250 + 2}")
            self.ns.append(ns)
            self.pod.append(f"{app}-{(i * 2654435761) % 16**5:05x}-{'bcdfghjk'[i % 8]}{i % 10}")
            self.labels.append([f"k8s:app={app}", f"k8s:io.kubernetes.pod.namespace={ns}",
                                "k8s:io.cilium.k8s.policy.cluster=default",
                                f"k8s:io.cilium.k8s.policy.serviceaccount={app}", f"k8s:team={team}",
                                f"k8s:version=v{version}"])
            self.workload.append(app)
            self.kind.append("Deployment")
            self.identity.append(16000 + ((i % namespaces) * len(APPS) + APPS.index(app)) * 3 + version)
            self.node.append(node)
        self.pods = pods
        self.host = self._reserved([f"192.168.0.{k + 10}" for k in range(self.nodes)], "reserved:host", 1)
        self.remote_node = self._reserved([f"192.168.0.{k + 10}" for k in range(self.nodes)],
                                          "reserved:remote-node", 6)
        self.health = self._reserved([f"10.244.{k}.250" for k in range(self.nodes)], "reserved:health", 4)
        self.world = self._reserved([f"34.{120 + k // 200}.{k % 200}.{(k * 37) % 250 + 1}" for k in range(64)],
                                    "reserved:world", 2, node=False)
        self.apiserver = self._reserved(["10.96.0.1"], "reserved:kube-apiserver", 7, node=False)
        self.coredns = np.array([i for i in range(pods) if self.workload[i] == "coredns"] or [0])
        self.prometheus = np.array([i for i in range(pods) if self.workload[i] == "prometheus"] or [0])
        self.node_arr = np.array(self.node)

    def _reserved(self, ips: list[str], label: str, identity: int, node: bool = True) -> np.ndarray:
        first = len(self.ip)
        for k, ip in enumerate(ips):
            self.ip.append(ip)
            self.ns.append(None)
            self.pod.append(None)
            self.labels.append([label])
            self.workload.append(None)
            self.kind.append(None)
            self.identity.append(identity)
            self.node.append(k if node else 0)
        return np.arange(first, len(self.ip))


def _connections(rng: np.random.Generator, ep: _Endpoints, n: int) -> dict[str, np.ndarray]:
    """Per connection: kind, client, server, ports, protocol, flows, verdict kind, observation point."""
    est = int(n / (2 + float(np.dot(KIND_P, KIND_EXTRA))) * 1.15) + 16
    kind = rng.choice(6, est, p=KIND_P)
    count = 2 + rng.poisson(KIND_EXTRA[kind])
    first = np.concatenate([[0], np.cumsum(count)[:-1]])
    keep = first < n
    kind, count, first = kind[keep], count[keep], first[keep]
    count[-1] = n - first[-1]  # the last connection is cut at n flows
    m = len(kind)
    pods = ep.pods
    servers = max(1, pods // 10)
    client = rng.integers(0, pods, m)
    # each client talks to a few servers
    server = (client * 7 + rng.integers(0, 3, m) * 13) % servers
    sport = np.where(kind == HTTP, HTTP_PORTS[server % len(HTTP_PORTS)], TCP_PORTS[server % len(TCP_PORTS)])
    outside = (kind == TCP) & (rng.random(m) < 0.08)
    server[outside] = ep.world[rng.integers(0, len(ep.world), int(outside.sum()))]
    sport[outside] = 443
    api = (kind == TCP) & ~outside & (rng.random(m) < 0.04)
    server[api] = ep.apiserver[0]
    sport[api] = 443
    dns = kind == DNS
    server[dns] = ep.coredns[rng.integers(0, len(ep.coredns), int(dns.sum()))]
    sport[dns] = 53
    probe = kind == PROBE
    server[probe] = rng.integers(0, pods, int(probe.sum()))
    client[probe] = ep.host[ep.node_arr[server[probe]]]
    sport[probe] = 8080
    scrape = kind == SCRAPE
    client[scrape] = ep.prometheus[rng.integers(0, len(ep.prometheus), int(scrape.sum()))]
    server[scrape] = rng.integers(0, pods, int(scrape.sum()))
    sport[scrape] = 9090
    health = kind == HEALTH
    node_a = rng.integers(0, ep.nodes, m)
    node_b = (node_a + 1 + rng.integers(0, max(1, ep.nodes - 1), m)) % ep.nodes
    client[health] = ep.remote_node[node_a[health]]
    server[health] = np.where(rng.random(int(health.sum())) < 0.7, ep.health[node_b[health]], ep.host[node_b[health]])
    sport[health] = HEALTH_PORT
    proto = np.where(dns, 1, 0)  # 0 TCP, 1 UDP, 2 ICMPv4
    proto[health & (rng.random(m) < 0.5)] = 2
    cport = rng.integers(32768, 61000, m)
    # verdict kind of the whole connection: 0 normal, 1 denied (only dropped SYNs), 2 audit
    policy = np.where(rng.random(m) < 0.03, 1, np.where(rng.random(m) < 0.01, 2, 0))
    policy[kind >= PROBE] = 0
    proxied = (kind == HTTP) | (kind == PROBE) | (kind == SCRAPE) | dns
    egress = rng.random(m) < 0.5  # observed at the client's node (EGRESS) or the server's (INGRESS)
    return {"kind": kind, "count": count, "client": client, "server": server, "sport": sport, "cport": cport,
            "proto": proto, "policy": policy, "proxied": proxied, "egress": egress,
            "start": rng.random(m), "path": rng.integers(0, len(HTTP_PATHS), m),
            "agent": rng.integers(0, 3, m), "dns_name": rng.integers(0, len(DNS_NAMES), m),
            "bad_server": rng.random(m) < 0.1}


def generate_batch(n: int, seed: int = 0, start_ns: int = DEFAULT_START_NS, pods: int = 400, *,
                   duration_s: float | None = None, namespaces: int | None = None) -> pa.RecordBatch:
    """``n`` flows of connections starting over ``duration_s`` (default n/100 s) between ``pods`` pods."""
    rng = np.random.default_rng(seed)
    ep = _Endpoints(pods, namespaces or len(NAMESPACES))
    c = _connections(rng, ep, n)
    conn = np.repeat(np.arange(len(c["kind"])), c["count"])
    rank = np.arange(n) - np.repeat(np.cumsum(c["count"]) - c["count"], c["count"])
    last = rank == c["count"][conn] - 1
    # flows of a connection follow its start by exponential gaps; then all flows in time order
    duration_ns = int((duration_s if duration_s is not None else n / 100) * 1e9)
    gaps = rng.exponential(20e6, n)
    gaps[rank == 0] = 0
    within = np.cumsum(gaps) - np.repeat(np.cumsum(gaps)[np.cumsum(c["count"]) - c["count"]], c["count"])
    times = (c["start"][conn] * duration_ns).astype(np.int64) + within.astype(np.int64)
    order = np.argsort(times, kind="stable")
    times, conn, rank, last = times[order], conn[order], rank[order], last[order]
    times += start_ns

    kind, proto, policy = c["kind"][conn], c["proto"][conn], c["policy"][conn]
    tcp, udp, icmp = proto == 0, proto == 1, proto == 2
    denied = policy == 1
    l7_kind = (kind == HTTP) | (kind == PROBE) | (kind == SCRAPE)
    # TCP: SYN, SYN-ACK, then data (or request/response pairs through the proxy), FIN at the end
    l7 = l7_kind & (rank >= 2) & ~last & ~denied
    reply = np.where(rank == 0, False, np.where(rank == 1, True, rng.random(n) < 0.45))
    reply = np.where(l7, rank % 2 == 1, reply)
    reply = np.where(udp | icmp, rank % 2 == 1, reply)
    reply[denied] = False
    flags = np.where(rank == 0, 0x002, np.where(rank == 1, 0x012, np.where(last, 0x011,
                     np.where(rng.random(n) < 0.5, 0x010, 0x018))))
    flags[denied] = 0x002
    dns = (kind == DNS) & ~denied

    client, server = c["client"][conn], c["server"][conn]
    src, dst = np.where(reply, server, client), np.where(reply, client, server)
    sport_c, cport_c = c["sport"][conn], c["cport"][conn]
    src_port, dst_port = np.where(reply, sport_c, cport_c), np.where(reply, cport_c, sport_c)

    verdict = np.zeros(n, np.int64)  # FORWARDED
    verdict[c["proxied"][conn] & ~l7 & ~dns] = 2  # REDIRECTED to the proxy
    verdict[policy == 2] = 3
    verdict[denied] = 1
    stray = rng.random(n) < 0.002  # other drops: conntrack, stale addresses
    verdict[stray] = 1
    drop_reason = np.where(denied, 0, np.where(stray, rng.integers(1, 3, n), -1))
    dropped = verdict == 1
    observed_at = np.where(c["egress"][conn], client, server)

    ip = pa.array(ep.ip, pa.string())
    ip_src, ip_dst = ip.take(pa.array(src)), ip.take(pa.array(dst))
    http = l7 & ~dropped
    request, response = http & ~reply, http & reply
    probe, scrape = kind == PROBE, kind == SCRAPE
    path = np.where(probe, len(HTTP_PATHS) + (c["path"][conn] % 2), np.where(scrape, len(HTTP_PATHS) + 2,
                                                                            c["path"][conn]))
    paths = pa.array(HTTP_PATHS + PROBE_PATHS + ["/metrics"], pa.string())
    server_ip = ip.take(pa.array(server))
    url = pc.binary_join_element_wise("http://", server_ip, ":", pa.array(sport_c).cast(pa.string()),
                                      paths.take(pa.array(path)), "")
    agent = np.where(probe, 3, np.where(scrape, 4, c["agent"][conn]))
    bad = c["bad_server"][conn] & (kind == HTTP)
    code = np.where(bad & (rng.random(n) < 0.3), 503, np.where(rng.random(n) < 0.03, 404, 200))
    headers = [[{"key": "User-Agent", "value": a}, {"key": "Accept", "value": "*/*"}] for a in AGENTS]
    dns_name = c["dns_name"][conn]
    nxdomain = np.isin(dns_name, [DNS_NAMES.index(name) for name in NXDOMAIN])
    dns_answer = dns & reply
    answered = dns_answer & ~nxdomain
    answer_ip = ip.take(pa.array(rng.integers(0, pods, n)))
    dns_ips = pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32)), answer_ip,
                                       mask=pa.array(~answered))
    l7_or_dns = (http | dns) & ~dropped
    l7_type = np.where(l7_or_dns, np.where(reply, 2, 1), 0)
    one_node = [f"node-{k:02d}" for k in range(ep.nodes)]

    cols: dict[str, pa.Array] = {
        "time": pa.array(times).cast(pa.timestamp("ns", tz="UTC")),
        "uuid": _uuids(rng, n),
        "node_name": _take(one_node, np.array(ep.node)[observed_at]),
        "verdict": _take(VERDICTS, verdict),
        "drop_reason": _take(DROP_REASONS, np.maximum(drop_reason, 0), mask=drop_reason >= 0),
        "flow_type": _take(["L3_L4", "L7"], l7_or_dns.astype(np.int64)),
        "event_type": pa.array(np.where(dropped, 1, np.where(l7_or_dns, 129, 4)).astype(np.int32)),
        "traffic_direction": _take(["INGRESS", "EGRESS"], c["egress"][conn].astype(np.int64)),
        "is_reply": pa.array(reply),
        "ip_src": ip_src, "ip_dst": ip_dst,
        "ip_version": pa.array(np.full(n, 4, np.uint8)),
        "l4_protocol": _take(["TCP", "UDP", "ICMPv4"], proto),
        "src_port": pa.array(src_port.astype(np.uint16), mask=icmp),
        "dst_port": pa.array(dst_port.astype(np.uint16), mask=icmp),
        "icmp_type": pa.array(np.where(reply, 0, 8).astype(np.uint8), mask=~icmp),
        "icmp_code": pa.array(np.zeros(n, np.uint8), mask=~icmp),
        "tcp_flags": pa.array(flags.astype(np.uint16), mask=~tcp | (l7_or_dns & tcp)),
        "l7_type": _take([None, "REQUEST", "RESPONSE"], l7_type),
        "l7_latency_ns": pa.array(rng.lognormal(15, 1.3, n).astype(np.uint64), mask=~(l7_or_dns & reply)),
        "http_method": _take(["GET", "POST"], (path == 5).astype(np.int64), mask=http),
        "http_url": pc.if_else(pa.array(http), url, pa.scalar(None, pa.string())),
        "http_code": pa.array(code.astype(np.uint16), mask=~response),
        "http_protocol": _take(["HTTP/1.1"], np.zeros(n, np.int64), mask=http),
        "http_user_agent": _take(AGENTS, agent, mask=request),
        "http_headers": _take(headers, agent, FLOW_SCHEMA.field("http_headers").type, mask=request),
        "dns_query": _take(DNS_NAMES, dns_name, mask=dns),
        "dns_rcode": pa.array(np.where(nxdomain, 3, 0).astype(np.uint16), mask=~dns_answer),
        "dns_qtypes": _take([["A"]], np.zeros(n, np.int64), pa.list_(pa.string()), mask=dns),
        "dns_rrtypes": _take([["A"]], np.zeros(n, np.int64), pa.list_(pa.string()), mask=answered),
        "dns_ips": dns_ips,
        "dns_ttl": pa.array(np.full(n, 30, np.uint32), mask=~answered),
        "bytes": pa.array(np.where(tcp & (rank >= 2), rng.integers(60, 20000, n), 60).astype(np.uint64)),
        "packets": pa.array(rng.integers(1, 30, n).astype(np.uint64)),
        "sample_rate": pa.array(np.ones(n, np.uint32)),
    }
    for side, idx in (("src", src), ("dst", dst)):
        take = pa.array(idx)
        cols[f"{side}_identity"] = pa.array(np.array(ep.identity, np.uint32)[idx])
        cols[f"{side}_namespace"] = pa.array(ep.ns, pa.string()).take(take)
        cols[f"{side}_pod"] = pa.array(ep.pod, pa.string()).take(take)
        cols[f"{side}_labels"] = _take_lists(ep.labels, idx)
        cols[f"{side}_workload"] = pa.array(ep.workload, pa.string()).take(take)
        cols[f"{side}_workload_kind"] = pa.array(ep.kind, pa.string()).take(take)
    cols["community_id"] = _community_ids(c, ep.ip).take(pa.array(conn))
    arrays = [cols[f.name] if f.name in cols else pa.nulls(n, f.type) for f in FLOW_SCHEMA]
    arrays = [a.cast(f.type) if a.type != f.type else a for a, f in zip(arrays, FLOW_SCHEMA, strict=True)]
    return pa.RecordBatch.from_arrays(arrays, schema=FLOW_SCHEMA)


def _community_ids(c: dict[str, np.ndarray], ips: list[str]) -> pa.Array:
    """Community ID v1 of every connection (both directions share it), the tuples packed with numpy.

    The same result as :func:`flowship.model.ids.community_ids` on the connection's flows; only the
    SHA-1 runs per connection.
    """
    addr = np.array([int(ipaddress.IPv4Address(ip)) for ip in ips], dtype=np.int64)
    icmp = c["proto"] == 2
    a, b = addr[c["client"]], addr[c["server"]]
    pa_, pb = np.where(icmp, 8, c["cport"]), np.where(icmp, 0, c["sport"])  # ICMP echo: type 8 pairs with 0
    swap = (a > b) | ((a == b) & (pa_ > pb))
    a, b, pa_, pb = np.where(swap, b, a), np.where(swap, a, b), np.where(swap, pb, pa_), np.where(swap, pa_, pb)
    m = len(a)
    packed = np.zeros((m, 16), dtype=np.uint8)  # seed 0 (2 bytes), saddr, daddr, proto, 0, sport, dport
    packed[:, 2:6] = a.astype(">u4").view(np.uint8).reshape(m, 4)
    packed[:, 6:10] = b.astype(">u4").view(np.uint8).reshape(m, 4)
    packed[:, 10] = np.array([6, 17, 1], dtype=np.uint8)[c["proto"]]
    packed[:, 12:14] = pa_.astype(">u2").view(np.uint8).reshape(m, 2)
    packed[:, 14:16] = pb.astype(">u2").view(np.uint8).reshape(m, 2)
    raw = packed.tobytes()
    sha1, b64 = hashlib.sha1, base64.b64encode
    return pa.array(["1:" + b64(sha1(raw[i:i + 16]).digest()).decode() for i in range(0, 16 * m, 16)], pa.string())


def write_jsonl(path: Path, n: int, chunk: int = 100_000, seed: int = 0) -> None:
    """Hubble JSON lines (gzip when the name ends in .gz), generated ``chunk`` flows at a time."""
    from flowship.model.hubble_encode import encode_lines

    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as fh:
        for i in range(0, n, chunk):
            batch = generate_batch(min(chunk, n - i), seed=seed + i, start_ns=DEFAULT_START_NS + i * 10_000_000)
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
