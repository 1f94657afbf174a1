"""Smoke tests for the local development servers (deploy/dev/servers).

They expect Kafka, OpenSearch, VictoriaLogs and versitygw (S3) to be running already:

    deploy/dev/servers start

A server that does not answer makes its test FAIL (not skip), with the command
that starts it. Addresses can be overridden with FLOWSHIP_KAFKA_BOOTSTRAP,
FLOWSHIP_OPENSEARCH_URL and FLOWSHIP_VICTORIALOGS_URL (or the *_PORT variables
that deploy/dev/servers reads).
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from typing import Any

import pytest

KAFKA_BOOTSTRAP = os.environ.get(
    "FLOWSHIP_KAFKA_BOOTSTRAP",
    "127.0.0.1:" + os.environ.get("FLOWSHIP_KAFKA_PORT", "9092"),
)
OPENSEARCH_URL = os.environ.get(
    "FLOWSHIP_OPENSEARCH_URL",
    "http://127.0.0.1:" + os.environ.get("FLOWSHIP_OPENSEARCH_PORT", "9200"),
).rstrip("/")
VICTORIALOGS_URL = os.environ.get(
    "FLOWSHIP_VICTORIALOGS_URL",
    "http://127.0.0.1:" + os.environ.get("FLOWSHIP_VICTORIALOGS_PORT", "9428"),
).rstrip("/")

pytestmark = pytest.mark.servers

RUN_ID = uuid.uuid4().hex[:12]


def _start_hint(name: str) -> str:
    return f"start it with: deploy/dev/servers start {name}"


def _require_tcp(name: str, host_port: str) -> None:
    host, _, port = host_port.rpartition(":")
    problem = None
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=3):
            pass
    except OSError as exc:
        problem = str(exc)
    if problem is not None:
        pytest.fail(f"{name} is not reachable at {host_port} ({problem}); {_start_hint(name)}", pytrace=False)


def _http(
    method: str,
    url: str,
    body: bytes | str | dict[str, Any] | None = None,
    content_type: str = "application/json",
    timeout: float = 30,
) -> tuple[int, bytes]:
    data: bytes | None
    if isinstance(body, dict):
        data = json.dumps(body).encode()
    elif isinstance(body, str):
        data = body.encode()
    else:
        data = body
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _require_http(name: str, url: str) -> None:
    problem = None
    try:
        _http("GET", url, timeout=5)
    except (urllib.error.URLError, OSError) as exc:
        problem = str(exc)
    if problem is not None:
        pytest.fail(f"{name} is not reachable at {url} ({problem}); {_start_hint(name)}", pytrace=False)


# ---------------------------------------------------------------- Kafka


def test_kafka_produce_consume() -> None:
    _require_tcp("kafka", KAFKA_BOOTSTRAP)
    if importlib.util.find_spec("confluent_kafka") is None:
        pytest.fail("the confluent-kafka package is missing: pip install confluent-kafka", pytrace=False)
    from confluent_kafka import Consumer, KafkaException, Producer

    topic = f"flowship-devsmoke-{RUN_ID}"
    payload = f"hello {RUN_ID}".encode()

    producer = Producer({"bootstrap.servers": KAFKA_BOOTSTRAP, "message.timeout.ms": 30000})
    try:
        producer.list_topics(timeout=10)
    except KafkaException as exc:
        pytest.fail(f"kafka at {KAFKA_BOOTSTRAP} does not answer metadata requests ({exc}); {_start_hint('kafka')}")
    errors: list[Any] = []
    producer.produce(topic, payload, key=b"k", on_delivery=lambda err, _msg: err and errors.append(err))
    remaining = producer.flush(30)
    assert remaining == 0, f"{remaining} message(s) not delivered to {topic}"
    assert not errors, f"delivery failed: {errors}"

    consumer = Consumer(
        {
            "bootstrap.servers": KAFKA_BOOTSTRAP,
            "group.id": f"flowship-devsmoke-{RUN_ID}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + 45
        received = None
        while time.monotonic() < deadline:
            msg = consumer.poll(1.0)
            if msg is None:
                continue
            if msg.error():
                continue
            received = msg
            break
    finally:
        consumer.close()
    assert received is not None, f"no message consumed from {topic} within 45 s"
    assert received.value() == payload
    assert received.key() == b"k"


# ---------------------------------------------------------------- OpenSearch


def test_opensearch_data_stream_bulk_search() -> None:
    _require_http("opensearch", OPENSEARCH_URL)
    status, body = _http("GET", f"{OPENSEARCH_URL}/_cluster/health")
    health = json.loads(body)
    assert status == 200 and health["status"] in ("green", "yellow"), health

    stream = f"flowship-devsmoke-{RUN_ID}"
    template = f"flowship-devsmoke-{RUN_ID}"
    status, body = _http(
        "PUT",
        f"{OPENSEARCH_URL}/_index_template/{template}",
        {
            "index_patterns": [f"{stream}*"],
            "data_stream": {},
            "priority": 500,
            "template": {
                "settings": {"number_of_shards": 1, "number_of_replicas": 0},
                "mappings": {
                    "properties": {
                        "@timestamp": {"type": "date_nanos"},
                        "src_addr": {"type": "ip"},
                        "bytes": {"type": "long"},
                        "proto": {"type": "keyword"},
                    }
                },
            },
        },
    )
    assert status == 200, body
    try:
        docs = [
            {"@timestamp": "2026-01-02T03:04:05.123456789Z", "src_addr": "10.1.2.3", "bytes": 100, "proto": "tcp"},
            {"@timestamp": "2026-01-02T03:04:06.000000001Z", "src_addr": "10.9.9.9", "bytes": 200, "proto": "udp"},
            {"@timestamp": "2026-01-02T03:04:07Z", "src_addr": "2001:db8::1", "bytes": 300, "proto": "tcp"},
        ]
        ndjson = "".join(json.dumps({"create": {}}) + "\n" + json.dumps(d) + "\n" for d in docs)
        status, body = _http(
            "POST", f"{OPENSEARCH_URL}/{stream}/_bulk?refresh=true", ndjson, content_type="application/x-ndjson"
        )
        result = json.loads(body)
        assert status == 200 and not result["errors"], result
        assert all(item["create"]["_index"].startswith(f".ds-{stream}-") for item in result["items"]), result

        status, body = _http("GET", f"{OPENSEARCH_URL}/{stream}/_count")
        assert status == 200 and json.loads(body)["count"] == 3, body

        status, body = _http(
            "POST",
            f"{OPENSEARCH_URL}/{stream}/_search",
            {"query": {"term": {"src_addr": "10.0.0.0/8"}}, "sort": [{"@timestamp": "asc"}]},
        )
        hits = json.loads(body)["hits"]
        assert status == 200 and hits["total"]["value"] == 2, body
        assert hits["hits"][0]["_source"]["@timestamp"] == "2026-01-02T03:04:05.123456789Z"
    finally:
        _http("DELETE", f"{OPENSEARCH_URL}/_data_stream/{stream}")
        _http("DELETE", f"{OPENSEARCH_URL}/_index_template/{template}")


# ---------------------------------------------------------------- VictoriaLogs


def test_victorialogs_loki_push_and_logsql_query() -> None:
    _require_http("victorialogs", f"{VICTORIALOGS_URL}/health")
    line = f"flowship devsmoke line {RUN_ID}"
    push = {
        "streams": [
            {
                "stream": {"job": "flowship-devsmoke", "run": RUN_ID},
                "values": [[str(time.time_ns()), line]],
            }
        ]
    }
    status, body = _http("POST", f"{VICTORIALOGS_URL}/insert/loki/api/v1/push", push)
    assert status in (200, 204), body

    query = urllib.parse.urlencode({"query": f'run:"{RUN_ID}"'})
    deadline = time.monotonic() + 30
    rows: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        status, body = _http(
            "POST",
            f"{VICTORIALOGS_URL}/select/logsql/query",
            query,
            content_type="application/x-www-form-urlencoded",
        )
        assert status == 200, body
        rows = [json.loads(r) for r in body.decode().splitlines() if r.strip()]
        if rows:
            break
        time.sleep(0.5)
    assert rows, f"pushed line not returned by LogsQL within 30 s (run {RUN_ID})"
    assert rows[0]["_msg"] == line
    assert rows[0]["job"] == "flowship-devsmoke"


VERSITYGW_ADDRESS = "127.0.0.1:" + os.environ.get("FLOWSHIP_VERSITYGW_PORT", "7070")


def test_versitygw_bucket_put_get() -> None:
    """The dev S3 server takes the root credentials deploy/dev/servers gave it: bucket, put, list, get."""
    from pyarrow import fs

    _require_tcp("versitygw", VERSITYGW_ADDRESS)
    s3 = fs.S3FileSystem(access_key=os.environ.get("FLOWSHIP_S3_ACCESS_KEY", "flowship-dev"),
                         secret_key=os.environ.get("FLOWSHIP_S3_SECRET_KEY", "flowship-dev-secret"),
                         endpoint_override=VERSITYGW_ADDRESS, scheme="http", region="us-east-1",
                         allow_bucket_creation=True, allow_bucket_deletion=True)
    bucket = f"smoke-{RUN_ID}"
    s3.create_dir(bucket)
    try:
        with s3.open_output_stream(f"{bucket}/a/b.txt") as out:
            out.write(b"flowship")
        listed = [i.path for i in s3.get_file_info(fs.FileSelector(bucket, recursive=True))
                  if i.type == fs.FileType.File]
        assert listed == [f"{bucket}/a/b.txt"]
        with s3.open_input_stream(f"{bucket}/a/b.txt") as src:
            assert src.read() == b"flowship"
    finally:
        s3.delete_dir(bucket)
