"""Sink throughput: flows/s from one exporter process to the local dev servers, next to each
server's own ingest limit measured with its own tool on the same machine.

    deploy/dev/servers start
    python3 bench/bench_sinks.py                    # all sinks, 200k flows each
    python3 bench/bench_sinks.py --flows 500000 --sinks kafka

For every sink the same synthetic flows (bench/flowgen.py) are written through the sink in
batches of 10k rows and flushed. Printed per sink:

* wall flows/s — end to end, until every flow is acknowledged by the server;
* flows per CPU-second of the exporter process (all its threads: encoding, HTTP, librdkafka) —
  what one exporter core sustains when the server is not the limit;
* bytes on the wire per flow (request bodies after compression; Kafka: librdkafka's tx_bytes);
* the server's own limit on this machine: Kafka's ProducerPerformance (jars from the dev-server
  cache), a curl bulk load of the same ECS documents into OpenSearch, a curl push of the same
  snappy protobuf bodies to VictoriaLogs.

Numbers are noisy on small machines with servers on the same cores: compare within one run.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.flowgen import generate_batch  # noqa: E402
from flowship.components import Context  # noqa: E402
from flowship.config import parse  # noqa: E402
from flowship.metrics import Metrics  # noqa: E402
from flowship.model import ecs_encode, ecs_fields  # noqa: E402
from flowship.pipeline.envelope import Envelope, Receipt  # noqa: E402

KAFKA = os.environ.get("FLOWSHIP_KAFKA_BOOTSTRAP", "127.0.0.1:9092")
OPENSEARCH = os.environ.get("FLOWSHIP_OPENSEARCH_URL", "http://127.0.0.1:9200")
VICTORIALOGS = os.environ.get("FLOWSHIP_VICTORIALOGS_URL", "http://127.0.0.1:9428")
CACHE = Path(os.environ.get("FLOWSHIP_CACHE", Path.home() / ".cache" / "flowship"))
BATCH = 10_000


def batches(n: int, seed: int = 0) -> list[pa.RecordBatch]:
    out = []
    start = time.time_ns() - 3600 * 10**9
    for i in range(0, n, BATCH):
        out.append(generate_batch(min(BATCH, n - i), seed=seed + i, start_ns=start + i * 10**6))
    return out


def run_sink(name: str, sink_cls, config_cls, config: dict, data: list[pa.RecordBatch]) -> dict:
    ctx = Context(name=name, metrics=Metrics(), node_name="bench", data_dir=Path(tempfile.mkdtemp()))
    sink = sink_cls(parse(config_cls, config, "bench"), ctx)
    sink.start()
    done = []
    flows = sum(b.num_rows for b in data)
    cpu0, t0 = time.process_time(), time.perf_counter()
    for b in data:
        sink.write(Envelope(b, [Receipt(on_done=lambda r: done.append(r.failed), rows=b.num_rows)]))
    sink.flush()
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    wire = ctx.metrics.value("flowship_sink_bytes_total", sink=name)
    if hasattr(sink, "stats"):
        time.sleep(1.2)  # one more librdkafka statistics report, with the final byte counts
    stats = getattr(sink, "stats", None)
    if stats and stats.get("tx_bytes"):
        wire = stats["tx_bytes"]  # bytes librdkafka sent to the brokers (compressed batches + protocol)
    sink.close()
    assert len(done) == len(data) and not any(done), f"{name}: not every batch was delivered"
    return {"flows": flows, "wall": wall, "cpu": cpu, "bytes": wire}


# ---------------------------------------------------------------------------------------------
# sinks
# ---------------------------------------------------------------------------------------------

def bench_kafka(data: list[pa.RecordBatch], encoding: str, run: str) -> dict:
    from flowship.sinks.kafka import KafkaSink, KafkaSinkConfig

    topic = f"bench-{run}-{encoding}"
    return run_sink("kafka", KafkaSink, KafkaSinkConfig, {
        "brokers": KAFKA, "topic": topic, "encoding": encoding, "create_topic": {"partitions": 6},
        "librdkafka": {"statistics.interval.ms": "500"}}, data)


def bench_opensearch(data: list[pa.RecordBatch], run: str) -> dict:
    from flowship.sinks.elasticsearch import ElasticsearchSink, ElasticsearchSinkConfig

    ds = f"logs-bench{run}.flows-default"
    try:
        return run_sink("opensearch", ElasticsearchSink, ElasticsearchSinkConfig, {
            "url": OPENSEARCH, "data_stream": ds, "aggregates_data_stream": f"logs-bench{run}.aggregates-default",
            "refresh_interval": "30s", "retry": {"concurrency": 2}}, data)
    finally:
        _http("DELETE", f"{OPENSEARCH}/_data_stream/{ds}")


def bench_loki(data: list[pa.RecordBatch], line_format: str, run: str) -> dict:
    from flowship.sinks.loki import LokiSink, LokiSinkConfig

    return run_sink("loki", LokiSink, LokiSinkConfig, {
        "url": f"{VICTORIALOGS}/insert/loki/api/v1/push", "line_format": line_format,
        "static_labels": {"job": f"bench-{run}-{line_format}"}}, data)


# ---------------------------------------------------------------------------------------------
# the servers' own tools
# ---------------------------------------------------------------------------------------------

def _http(method: str, url: str, body: bytes | None = None) -> int:
    req = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def kafka_server_limit(data: list[pa.RecordBatch], run: str, records: int) -> tuple[float, str]:
    from flowship.sinks.kafka import encode_values

    libs = CACHE / "kafka-4.4.0" / "libs"
    tools = CACHE / "kafka-tools-4.4.0"
    java = shutil.which("java")
    if not libs.exists() or not java:
        return float("nan"), f"no Kafka jars in {libs}"
    if not list(tools.glob("kafka-tools-*.jar")) and shutil.which("mvn"):
        # ProducerPerformance lives in kafka-tools, which the broker itself does not need
        tools.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mvn", "-B", "-q", "-ntp", "dependency:copy", "-Dartifact=org.apache.kafka:kafka-tools:4.4.0",
                        f"-DoutputDirectory={tools}"], capture_output=True, timeout=600, cwd=tempfile.gettempdir())
    payloads = Path(tempfile.mkdtemp()) / "payloads.txt"
    values = encode_values(data[0], "hubble-json")
    payloads.write_bytes(b"\n".join(values))
    topic = f"bench-{run}-perf"
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": KAFKA})
    admin.create_topics([NewTopic(topic, 6, 1)])[topic].result(30)
    cmd = [java, "-Xmx512m", "-cp", f"{libs}/*:{tools}/*", "org.apache.kafka.tools.ProducerPerformance", "--topic", topic,
           "--num-records", str(records), "--throughput", "-1", "--payload-file", str(payloads),
           "--payload-delimiter", "\n", "--producer-props", f"bootstrap.servers={KAFKA}", "acks=all",
           "enable.idempotence=true", "compression.type=zstd", "linger.ms=50", "batch.size=1048576"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600).stdout.strip().splitlines()
    last = out[-1] if out else ""
    try:
        return float(last.split("records sent,")[1].split("records/sec")[0].strip()), last
    except (IndexError, ValueError):
        return float("nan"), last


def post_with_two_curls(files: list[Path], content_type: str, url: str) -> float:
    """POST every file to ``url`` with curl, split between two concurrent clients (like the sinks' default
    concurrency); returns the wall time in seconds."""
    t0 = time.perf_counter()
    procs = []
    for half in (files[0::2], files[1::2]):
        script = " && ".join(f"curl -s -o /dev/null -H 'Content-Type: {content_type}' -XPOST "
                             f"{url} --data-binary @{p}" for p in half)
        procs.append(subprocess.Popen(["bash", "-c", script or "true"]))
    for p in procs:
        p.wait()
    return time.perf_counter() - t0


def opensearch_server_limit(data: list[pa.RecordBatch], run: str) -> tuple[float, str]:
    if not shutil.which("curl"):
        return float("nan"), "curl missing"
    index = f"bench-{run}-curl"
    _http("PUT", f"{OPENSEARCH}/{index}", b'{"settings":{"number_of_shards":1,"refresh_interval":"30s"},'
          b'"mappings":{"properties":' + __import__("orjson").dumps(ecs_fields.es_properties()) + b"}}")
    tmp = Path(tempfile.mkdtemp())
    files = []
    for i, b in enumerate(data):
        docs = ecs_encode.encode_documents(b)
        ids = b.column("uuid").to_pylist()
        body = b"".join(b'{"create":{"_index":"%s","_id":"%s"}}\n%s\n' % (index.encode(), u.encode(), d)
                        for u, d in zip(ids, docs, strict=True))
        path = tmp / f"bulk{i}.ndjson"
        path.write_bytes(body)
        files.append(path)
    flows = sum(b.num_rows for b in data)
    wall = post_with_two_curls(files, "application/x-ndjson", f"{OPENSEARCH}/_bulk")
    _http("POST", f"{OPENSEARCH}/{index}/_refresh")
    with urllib.request.urlopen(f"{OPENSEARCH}/{index}/_count", timeout=60) as resp:
        count = __import__("json").loads(resp.read())["count"]
    _http("DELETE", f"{OPENSEARCH}/{index}")
    shutil.rmtree(tmp, ignore_errors=True)
    return count / wall, f"{count}/{flows} docs in {wall:.1f}s (2 curl clients, {BATCH} docs per bulk)"


def victorialogs_server_limit(data: list[pa.RecordBatch], run: str) -> tuple[float, str]:
    import cramjam

    from flowship.model import hubble_encode
    from flowship.sinks.loki import entry_fields, label_selectors, push_request

    if not shutil.which("curl"):
        return float("nan"), "curl missing"
    tmp = Path(tempfile.mkdtemp())
    files = []
    for i, b in enumerate(data):
        lines = pa.array([x[:-1] for x in hubble_encode.encode_lines(b)], pa.binary())
        sel = label_selectors(b, {"node": "node_name", "namespace": "src_namespace", "verdict": "verdict"},
                              {"job": f"bench-{run}-curl"}).to_pylist()
        times = b.column("time").cast(pa.int64()).to_numpy()
        entries = entry_fields(times, lines, [("uuid", b.column("uuid"))]).to_pylist()
        body = bytes(cramjam.snappy.compress_raw(push_request(list(zip(sel, times.tolist(), entries, strict=True)))))
        path = tmp / f"push{i}.bin"
        path.write_bytes(body)
        files.append(path)
    flows = sum(b.num_rows for b in data)
    wall = post_with_two_curls(files, "application/x-protobuf", f"{VICTORIALOGS}/insert/loki/api/v1/push")
    shutil.rmtree(tmp, ignore_errors=True)
    return flows / wall, f"{flows} lines in {wall:.1f}s (2 curl clients, snappy protobuf, {BATCH} per push)"


# ---------------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--flows", type=int, default=200_000)
    ap.add_argument("--sinks", default="kafka,opensearch,loki")
    ap.add_argument("--no-server-tools", action="store_true", help="skip the servers' own ingest measurements")
    args = ap.parse_args()
    run = f"{int(time.time())}"
    wanted = set(args.sinks.split(","))
    data = batches(args.flows)
    rows = []

    def add(label: str, result: dict, limit: tuple[float, str] | None) -> None:
        rows.append((label, result, limit))
        print(f"{label:28s} {result['flows'] / result['wall']:>10,.0f} flows/s wall  "
              f"{result['flows'] / max(result['cpu'], 1e-9):>10,.0f} flows/CPU-s  "
              f"{result['bytes'] / result['flows']:>7.0f} B/flow on the wire", flush=True)
        if limit:
            print(f"{'':28s} server's own tool: {limit[0]:,.0f}/s — {limit[1]}", flush=True)

    if "kafka" in wanted:
        for encoding in ("hubble-json", "ecs-json", "protobuf", "arrow"):
            subset = data if encoding != "protobuf" else data[: max(1, len(data) // 10)]
            add(f"kafka {encoding}", bench_kafka(subset, encoding, run), None)
        if not args.no_server_tools:
            limit = kafka_server_limit(data, run, args.flows * 2)
            print(f"{'kafka (server)':28s} ProducerPerformance: {limit[0]:,.0f} records/s — {limit[1]}", flush=True)
    if "opensearch" in wanted:
        limit = None if args.no_server_tools else opensearch_server_limit(data, run)
        add("opensearch bulk (ECS)", bench_opensearch(data, run), limit)
    if "loki" in wanted:
        add("loki protobuf, hubble lines", bench_loki(data, "hubble", run), None)
        limit = None if args.no_server_tools else victorialogs_server_limit(data, run)
        add("loki protobuf, logfmt lines", bench_loki(data, "logfmt", run), limit)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS of the exporter process: {peak:.0f} MiB; machine: {os.cpu_count()} CPUs, "
          f"{os.uname().sysname} {os.uname().release}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
