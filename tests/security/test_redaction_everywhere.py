"""A shared ``redact`` stage reaches every sink: nothing it covers leaves the process in clear.

``flowship export`` reads the recorded Hubble flows plus a few written for
this test (IPv4 and IPv6 endpoints, a NAT address, URLs with queries and an
address as host, secret-looking header values, a DNS answer, a ``cidr:``
label, summaries repeating all of it), hashes addresses, URL queries and
header values in one shared stage, and writes Parquet, Hubble JSON and ECS
files, Loki (VictoriaLogs), Elasticsearch (OpenSearch, with flowship's ECS
mapping: ``ip``-typed address fields) and Kafka. Everything is then read
back from where it landed — DuckDB, the files, LogsQL, ``_search``, a Kafka
consumer — and searched for every address, query and header value of the
input. The keyed hashes, computed here independently, must be there instead.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import duckdb
import orjson
import pyarrow as pa
from confluent_kafka import Consumer
from security_helpers import delete_topics, devservers, flowship, run_env

from flowship.model.hubble_decode import decode_lines
from flowship.model.hubble_encode import encode_lines
from flowship.model.schema import flows_from_rows

KEY = b"redaction-test-key-4f1c9a77"
T0 = 1_767_225_600_000_000_000  # 2026-01-01

CRAFTED = [
    {"time": T0 + 1_000, "node_name": "node-red", "verdict": "FORWARDED", "event_type": 129, "ip_version": 4,
     "ip_src": "10.77.1.23", "ip_dst": "10.77.2.34", "ip_src_xlated": "10.77.9.99", "l4_protocol": "TCP",
     "src_port": 40001, "dst_port": 8080, "flow_type": "L7", "l7_type": "REQUEST", "http_method": "GET",
     "http_url": "http://10.77.2.34:8080/api/orders?customer=alice-7731&token=qTok-9981",
     "http_protocol": "HTTP/1.1",
     "http_headers": [{"key": "Authorization", "value": "Bearer hdrSecret-4471"},
                      {"key": "Cookie", "value": "session=ck-55190-zz"},
                      {"key": "User-Agent", "value": "agent-secret-ua/1.0"}],
     "summary": "HTTP/1.1 GET http://10.77.2.34:8080/api/orders?customer=alice-7731&token=qTok-9981",
     "src_labels": ["reserved:world", "cidr:10.77.128.0/17"], "dst_namespace": "shop", "dst_pod": "orders-1"},
    {"time": T0 + 2_000, "node_name": "node-red", "verdict": "FORWARDED", "event_type": 129, "ip_version": 6,
     "ip_src": "fd00:77::15", "ip_dst": "fd00:77::16", "l4_protocol": "TCP", "src_port": 40002, "dst_port": 9090,
     "flow_type": "L7", "l7_type": "REQUEST", "http_method": "POST", "http_protocol": "HTTP/1.1",
     "http_url": "http://[fd00:77::16]:9090/login?user=bob-6620&otp=v6q-1234#frag-77",
     "http_headers": [{"key": "X-Api-Key", "value": "apiKeyHdr-8812-zz"}],
     "summary": "HTTP/1.1 POST http://[fd00:77::16]:9090/login?user=bob-6620&otp=v6q-1234#frag-77"},
    {"time": T0 + 3_000, "node_name": "node-red", "verdict": "FORWARDED", "event_type": 129, "ip_version": 4,
     "ip_src": "10.77.5.5", "ip_dst": "10.77.0.10", "l4_protocol": "UDP", "src_port": 53001, "dst_port": 53,
     "flow_type": "L7", "l7_type": "RESPONSE", "is_reply": True, "dns_query": "orders.shop.svc.cluster.local.",
     "dns_rcode": 0, "dns_qtypes": ["A"], "dns_rrtypes": ["A", "AAAA"], "dns_ips": ["10.77.4.56", "fd00:77::4:56"],
     "summary": 'DNS Answer "10.77.4.56,fd00:77::4:56" TTL: 30 (Proxy orders.shop.svc.cluster.local. A)'},
]


# ---------------------------------------------------------------------------------------------
# The expected tokens, computed without flowship's code
# ---------------------------------------------------------------------------------------------

def token(value: str) -> str:
    return hmac.new(KEY, value.encode(), hashlib.sha256).digest()[:16].hex()


def address_token(ip: str) -> str:
    address = ipaddress.ip_address(ip)
    digest = hmac.new(KEY, str(address).encode(), hashlib.sha256).digest()[:10]
    prefix = bytes.fromhex("20010db80004" if address.version == 4 else "20010db80006")
    return str(ipaddress.IPv6Address(prefix + digest))


# ---------------------------------------------------------------------------------------------
# What the input holds
# ---------------------------------------------------------------------------------------------

_RUN = re.compile(rb"[0-9A-Fa-f:.]{3,}")
_V4 = re.compile(rb"(?<![0-9])(?:[0-9]{1,3}\.){3}[0-9]{1,3}(?![0-9])")


def addresses_in(data: bytes) -> set[str]:
    """Every IPv4/IPv6 address written in ``data``, canonical."""
    out = set()
    for match in _RUN.finditer(data):
        run = match.group().decode()
        for candidate in (run, run.rstrip(".:")):
            try:
                out.add(str(ipaddress.ip_address(candidate)))
                break
            except ValueError:
                continue
        else:
            for v4 in _V4.finditer(match.group()):
                try:
                    out.add(str(ipaddress.ip_address(v4.group().decode())))
                except ValueError:
                    pass
    return out


def sensitive_values(batch: pa.RecordBatch) -> dict[str, set[str]]:
    """Queries (whole and per parameter value) and header values of the input."""
    queries: set[str] = set()
    for url in batch.column("http_url").drop_null().to_pylist():
        cut = min((i for i in (url.find("?"), url.find("#")) if i >= 0), default=-1)
        if cut >= 0:
            query = url[cut + 1:]
            queries.add(query)
            queries.update(v for part in re.split(r"[&#]", query) for v in [part.partition("=")[2] or part]
                           if len(v) >= 6)
    headers = {h["value"] for row in batch.column("http_headers").drop_null().to_pylist() for h in row
               if h["value"] and len(h["value"]) >= 6}
    headers.update(v for v in batch.column("http_user_agent").drop_null().to_pylist() if len(v) >= 6)
    return {"query": queries, "header value": headers}


# ---------------------------------------------------------------------------------------------
# Reading back from every sink
# ---------------------------------------------------------------------------------------------

def read_parquet(root: Path) -> tuple[int, bytes]:
    rows = duckdb.sql(f"select to_json(t)::varchar from read_parquet('{root}/**/*.parquet', "
                      "hive_partitioning=true) t").fetchall()
    return len(rows), "\n".join(row[0] for row in rows).encode()


def read_victorialogs(base: str, job: str, want: int, timeout: float = 60.0) -> tuple[int, bytes]:
    url = f"{base}/select/logsql/query?" + urllib.parse.urlencode({"query": f'_stream:{{job="{job}"}}'})
    deadline = time.monotonic() + timeout
    lines: list[bytes] = []
    while time.monotonic() < deadline:
        with urllib.request.urlopen(url, timeout=30) as resp:
            lines = [line for line in resp.read().splitlines() if line.strip()]
        if len(lines) >= want:
            break
        time.sleep(0.5)
    return len(lines), b"\n".join(lines)


def read_opensearch(base: str, stream: str) -> tuple[int, bytes]:
    devservers.http_json("POST", f"{base}/{stream}/_refresh")
    status, answer = devservers.http_json("GET", f"{base}/{stream}/_search?size=10000&track_total_hits=true")
    assert status == 200, answer
    hits = answer["hits"]["hits"]
    return len(hits), orjson.dumps([h["_source"] for h in hits])


def read_kafka(brokers: str, topic: str, want: int, timeout: float = 60.0) -> tuple[int, bytes]:
    consumer = Consumer({"bootstrap.servers": brokers, "group.id": f"check-{topic}", "auto.offset.reset": "earliest",
                         "enable.auto.commit": False})
    consumer.subscribe([topic])
    parts: list[bytes] = []
    count = 0
    deadline = time.monotonic() + timeout
    try:
        while count < want and time.monotonic() < deadline:
            for msg in consumer.consume(1000, 0.5):
                if msg.error() is None:
                    count += 1
                    parts += [msg.key() or b"", msg.value() or b""]  # headers: encoding names only
    finally:
        consumer.close()
    return count, b"\n".join(parts)


def test_redaction_reaches_every_sink(tmp_path, run_id, fixture_files, kafka_server, opensearch_server,
                                      victorialogs_server):
    from flowship.model import ecs_fields

    crafted = flows_from_rows(CRAFTED)
    data = b"".join(p.read_bytes() for p in fixture_files) + b"".join(encode_lines(crafted))
    inputs = tmp_path / "flows.jsonl"
    inputs.write_bytes(data)
    original = decode_lines(data).batch
    flows = original.num_rows
    assert flows == 1518 + len(CRAFTED)
    addresses = addresses_in(data)
    assert {"10.77.1.23", "10.77.9.99", "fd00:77::16", "10.77.4.56", "fd00:77::4:56", "10.77.128.0",
            "10.156.3.7"} <= addresses
    values = sensitive_values(original)
    assert {"customer=alice-7731&token=qTok-9981", "qTok-9981", "v6q-1234", "frag-77"} <= values["query"]
    assert {"Bearer hdrSecret-4471", "session=ck-55190-zz", "agent-secret-ua/1.0", "curl/7.52.1"} <= \
        values["header value"]

    key_file = tmp_path / "redact.key"
    key_file.write_bytes(KEY + b"\n")
    job, topic = f"flowship-red-{run_id}", f"flowship-red-{run_id}"
    stream, template = f"logs-flowship.red{run_id}-default", f"flowship-red-{run_id}"
    status, answer = devservers.http_json("PUT", f"{opensearch_server}/_index_template/{template}", {
        "index_patterns": [f"logs-flowship.red{run_id}-*"], "priority": 778, "data_stream": {},
        "template": {"mappings": {"properties": ecs_fields.es_properties()}}})
    assert status == 200, answer
    config = tmp_path / "flowship.yaml"
    config.write_text(f"""
data_dir: {tmp_path / 'state'}
sources:
  - type: file
    paths: ["{inputs}"]
stages:
  - type: redact
    mode: hash
    key_file: {key_file}
    fields: [ip, http_url_query, http_header_values]
    ip_format: address
sinks:
  - type: parquet
    path: {tmp_path / 'parquet'}
  - type: file
    name: file-hubble
    path: {tmp_path / 'flows.hubble.jsonl'}
  - type: file
    name: file-ecs
    format: ecs
    path: {tmp_path / 'flows.ecs.jsonl'}
  - type: loki
    url: {victorialogs_server}/insert/loki/api/v1/push
    static_labels: {{job: {job}}}
  - type: elasticsearch
    url: {opensearch_server}
    data_stream: {stream}
    aggregates_data_stream: logs-flowship.red{run_id}agg-default
    template: skip
  - type: kafka
    brokers: "{kafka_server}"
    topic: {topic}
""")
    try:
        proc = subprocess.run(flowship("export", "--config", str(config), "--no-progress"), capture_output=True,
                              timeout=300, env=run_env(), stdin=subprocess.DEVNULL)
        assert proc.returncode == 0, proc.stderr.decode()[-3000:]
        assert not (tmp_path / "state" / "dead-letter").exists()  # every sink accepted every redacted flow
        sinks = {
            "parquet": read_parquet(tmp_path / "parquet"),
            "file-hubble": (len((tmp_path / "flows.hubble.jsonl").read_bytes().splitlines()),
                            (tmp_path / "flows.hubble.jsonl").read_bytes()),
            "file-ecs": (len((tmp_path / "flows.ecs.jsonl").read_bytes().splitlines()),
                         (tmp_path / "flows.ecs.jsonl").read_bytes()),
            "loki": read_victorialogs(victorialogs_server, job, flows),
            "elasticsearch": read_opensearch(opensearch_server, stream),
            "kafka": read_kafka(kafka_server, topic, flows),
        }
        # OpenSearch indexed the hashed addresses as addresses: term and prefix queries on source.ip work
        counts = {}
        for name, value in (("one", address_token("10.77.1.23")), ("ipv4", "2001:db8:4::/48"),
                            ("ipv6", "2001:db8:6::/48")):
            status, answer = devservers.http_json("POST", f"{opensearch_server}/{stream}/_count",
                                                  {"query": {"term": {"source.ip": value}}})
            assert status == 200, answer
            counts[name] = answer["count"]
    finally:
        devservers.http_json("DELETE", f"{opensearch_server}/_data_stream/{stream}")
        devservers.http_json("DELETE", f"{opensearch_server}/_index_template/{template}")
        delete_topics(kafka_server, [topic])

    # Elasticsearch keeps one document per uuid (its _id): the recordings repeat a few flows
    distinct = len(set(original.column("uuid").to_pylist()))
    assert {name: count for name, (count, _) in sinks.items()} == \
        {**{name: flows for name in sinks}, "elasticsearch": distinct}
    for name, (_, text) in sinks.items():
        assert addresses_in(text) & addresses == set(), name
        for kind, originals in values.items():
            assert [v for v in originals if v.encode() in text] == [], (name, kind)

    # the keyed hashes are there instead (JSON escapes nothing in them)
    everywhere = [address_token("10.77.1.23"), address_token("10.77.2.34"), address_token("fd00:77::16"),
                  address_token("10.77.4.56"), address_token("fd00:77::4:56"), address_token("10.156.3.7"),
                  token("customer=alice-7731&token=qTok-9981"), token("user=bob-6620&otp=v6q-1234#frag-77")]
    with_headers = [token("Bearer hdrSecret-4471"), token("session=ck-55190-zz"), token("apiKeyHdr-8812-zz")]
    with_user_agent = [token("agent-secret-ua/1.0")]
    with_labels = [f"cidr:{address_token('10.77.128.0')}/17"]
    expected = {
        "parquet": everywhere + with_headers + with_user_agent + with_labels,
        "file-hubble": everywhere + with_headers + with_labels,
        "file-ecs": everywhere + with_user_agent + with_labels,
        "loki": everywhere + with_headers + with_labels,
        "elasticsearch": everywhere + with_user_agent + with_labels,
        "kafka": everywhere + with_headers + with_labels,
    }
    for name, (_, text) in sinks.items():
        assert [t for t in expected[name] if t.encode() not in text] == [], name
    # the URL keeps its shape: host in brackets, port, path, hashed query; the summary says the same
    url = f"http://[{address_token('10.77.2.34')}]:8080/api/orders?{token('customer=alice-7731&token=qTok-9981')}"
    for name in ("parquet", "file-hubble", "file-ecs", "elasticsearch", "kafka"):
        assert url.encode() in sinks[name][1], name
    assert f"HTTP/1.1 GET {url}".encode() in sinks["file-hubble"][1]
    by_uuid = dict(zip(original.column("uuid").to_pylist(), original.column("ip_src").to_pylist(), strict=True))
    sources = [ipaddress.ip_address(ip) for ip in by_uuid.values() if ip]
    assert counts == {"one": 1, "ipv4": sum(a.version == 4 for a in sources),
                      "ipv6": sum(a.version == 6 for a in sources)}


def test_remove_mode_and_token_format_leave_nothing_in_files(tmp_path, fixture_files):
    """The other two ways to redact, through the file sinks (no servers needed)."""
    data = b"".join(p.read_bytes() for p in fixture_files) + b"".join(encode_lines(flows_from_rows(CRAFTED)))
    inputs = tmp_path / "flows.jsonl"
    inputs.write_bytes(data)
    original = decode_lines(data).batch
    addresses, values = addresses_in(data), sensitive_values(original)
    (tmp_path / "redact.key").write_bytes(KEY)
    for variant, stage in (("remove", "mode: remove"),
                           ("token", f"mode: hash\n    key_file: {tmp_path / 'redact.key'}\n    ip_format: token")):
        out = tmp_path / variant
        config = tmp_path / f"{variant}.yaml"
        config.write_text(f"""
data_dir: {out / 'state'}
sources: [{{type: file, paths: ["{inputs}"]}}]
stages:
  - type: redact
    {stage}
    fields: [ip, http_url_query, http_header_values]
sinks:
  - {{type: parquet, path: {out / 'parquet'}}}
  - {{type: file, name: hubble, path: {out / 'hubble.jsonl'}}}
  - {{type: file, name: ecs, format: ecs, path: {out / 'ecs.jsonl'}}}
""")
        proc = subprocess.run(flowship("export", "--config", str(config), "--no-progress"), capture_output=True,
                              timeout=300, env=run_env(), stdin=subprocess.DEVNULL)
        assert proc.returncode == 0, proc.stderr.decode()[-3000:]
        texts = {"parquet": read_parquet(out / "parquet")[1], "hubble": (out / "hubble.jsonl").read_bytes(),
                 "ecs": (out / "ecs.jsonl").read_bytes()}
        for name, text in texts.items():
            assert addresses_in(text) & addresses == set(), (variant, name)
            for kind, originals in values.items():
                assert [v for v in originals if v.encode() in text] == [], (variant, name, kind)
        hubble = [orjson.loads(line)["flow"] for line in texts["hubble"].splitlines()]
        crafted = next(f for f in hubble if f.get("node_name") == "node-red" and "http" in f.get("l7", {}))
        if variant == "remove":
            assert "source" not in crafted.get("IP", {}) and "destination" not in crafted.get("IP", {})
            assert crafted["l7"]["http"]["url"] == "http://redacted:8080/api/orders"
            assert crafted["Summary"] == "HTTP/1.1 GET http://redacted:8080/api/orders"
            assert crafted["source"]["labels"] == ["reserved:world", "cidr:redacted/17"]
        else:
            host = "ip4:" + token("10.77.2.34")
            query = token("customer=alice-7731&token=qTok-9981")
            assert crafted["IP"]["source"] == "ip4:" + token("10.77.1.23")
            assert crafted["l7"]["http"]["url"] == f"http://[{host}]:8080/api/orders?{query}"
            assert crafted["Summary"] == f"HTTP/1.1 GET http://[{host}]:8080/api/orders?{query}"
            assert crafted["source"]["labels"] == ["reserved:world", f"cidr:ip4:{token('10.77.128.0')}/17"]
