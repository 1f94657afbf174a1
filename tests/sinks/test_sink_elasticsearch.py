"""Elasticsearch/OpenSearch sink against a real OpenSearch 2.19 (deploy/dev/servers start opensearch)."""

from __future__ import annotations

import os
import tempfile
import threading
import time
from pathlib import Path

import devservers
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from devservers import http_json
from fakes import FakeFaultServer
from helpers import aggregate_rows, generated_flows, make_ctx

from flowship.config import ConfigError, parse
from flowship.model import ecs_encode, times
from flowship.model.schema import flows_from_rows
from flowship.pipeline.envelope import Envelope, Receipt
from flowship.sinks.elasticsearch import ElasticsearchSink, ElasticsearchSinkConfig, index_names


def _cfg(**kw) -> ElasticsearchSinkConfig:
    return parse(ElasticsearchSinkConfig, kw, "flowship.yaml", "sinks[0]")


def _names(run_id: str) -> dict:
    return {"data_stream": f"logs-flowshiptest{run_id}.flows-default",
            "aggregates_data_stream": f"logs-flowshiptest{run_id}.aggregates-default"}


class Writer:
    """A started sink plus the receipts of what was written to it."""

    def __init__(self, url: str, ctx=None, **kw) -> None:
        self.ctx = ctx or make_ctx("es")
        self.sink = ElasticsearchSink(_cfg(url=url, **kw), self.ctx)
        self.sink.start()
        self.done: list[bool] = []
        self.lock = threading.Lock()

    def write(self, batch: pa.RecordBatch, kind: str = "flows") -> None:
        def on_done(r: Receipt) -> None:
            with self.lock:
                self.done.append(r.failed)

        self.sink.write(Envelope(batch, [Receipt(on_done=on_done, rows=batch.num_rows)], kind))

    def finish(self) -> list[bool]:
        self.sink.flush()
        self.sink.close()
        return self.done


def _refresh_count(url: str, target: str, query: dict | None = None) -> int:
    http_json("POST", f"{url}/{target}/_refresh")
    status, body = http_json("POST", f"{url}/{target}/_count", {"query": query or {"match_all": {}}})
    assert status == 200, body
    return body["count"]


def _search_all(url: str, target: str, size: int = 10000) -> list[dict]:
    http_json("POST", f"{url}/{target}/_refresh")
    status, body = http_json("POST", f"{url}/{target}/_search", {"size": size, "query": {"match_all": {}}})
    assert status == 200, body
    return body["hits"]["hits"]


@pytest.fixture()
def cleanup(opensearch_server):
    """Delete the data streams, indices and templates a test created."""
    created: list[str] = []
    yield created
    for name in created:
        http_json("DELETE", f"{opensearch_server}/_data_stream/{name}")
        http_json("DELETE", f"{opensearch_server}/{name}")
        http_json("DELETE", f"{opensearch_server}/_index_template/{name}")


# ---------------------------------------------------------------------------------------------
# configuration and helpers
# ---------------------------------------------------------------------------------------------


def test_config_validation():
    with pytest.raises(ConfigError) as err:
        _cfg(url="localhost:9200", data_stream="Logs-Bad Name", username="u")
    text = str(err.value)
    assert "sinks[0].url: expected http(s)://host:port" in text
    assert "sinks[0].data_stream: 'Logs-Bad Name' is not a valid index name" in text
    assert "sinks[0].password: required with username" in text
    c = _cfg(url=["http://a:9200", "http://b:9200"], mode="index", retention="30d")
    assert c.urls() == ["http://a:9200", "http://b:9200"] and c.retention == 30 * 86400


def test_index_names_follow_flow_time():
    times = pa.array([0, 86_400 * 10**9 - 1, 86_400 * 10**9, None], pa.int64()).cast(pa.timestamp("ns", tz="UTC"))
    assert index_names(times, "flowship-flows-%Y.%m.%d").to_pylist()[:3] == [
        "flowship-flows-1970.01.01", "flowship-flows-1970.01.01", "flowship-flows-1970.01.02"]
    assert index_names(times[:1], "f-%Y.%m.%d-%H").to_pylist() == ["f-1970.01.01-00"]


# ---------------------------------------------------------------------------------------------
# against OpenSearch
# ---------------------------------------------------------------------------------------------


@pytest.mark.servers
def test_fixture_flows_are_indexed_exactly(opensearch_server, all_flows, run_id, cleanup):
    names = _names(run_id)
    cleanup += [names["data_stream"], names["aggregates_data_stream"], f"logs-flowshiptest{run_id}.flows",
                f"logs-flowshiptest{run_id}.aggregates"]
    w = Writer(opensearch_server, **names)
    assert w.sink.flavor == "opensearch" and w.sink.server_version.startswith("2.")
    w.write(all_flows)
    assert w.finish() == [False]
    n = all_flows.num_rows
    assert _refresh_count(opensearch_server, names["data_stream"]) == n
    # every stored _source equals the ECS document, and _id is the flow uuid
    expected = {d["event"]["id"]: d for d in ecs_encode.to_documents(all_flows)}
    hits = _search_all(opensearch_server, names["data_stream"])
    assert len(hits) == n
    for hit in hits:
        assert hit["_id"] == hit["_source"]["event"]["id"]
        assert hit["_source"] == expected[hit["_id"]]
    # the template mapped the fields as ECS wants them
    status, mapping = http_json("GET", f"{opensearch_server}/{names['data_stream']}/_mapping")
    (index_mapping,) = mapping.values()
    props = index_mapping["mappings"]["properties"]
    assert props["@timestamp"]["type"] == "date_nanos"
    assert props["source"]["properties"]["ip"]["type"] == "ip"
    assert props["related"]["properties"]["ip"]["type"] == "ip"
    assert props["destination"]["properties"]["port"]["type"] == "long"
    assert props["event"]["properties"]["action"]["type"] == "keyword"
    # writing the same flows again changes nothing: create + uuid _id → 409 = already delivered
    ctx = make_ctx("es")
    w = Writer(opensearch_server, ctx, **names)
    w.write(all_flows)
    assert w.finish() == [False]
    assert _refresh_count(opensearch_server, names["data_stream"]) == n
    assert ctx.metrics.value("flowship_sink_duplicates_total", sink="es") == n


@pytest.mark.servers
def test_siem_query_dropped_flows_of_a_namespace_in_a_time_range(opensearch_server, run_id, cleanup):
    names = _names(run_id)
    cleanup += [names["data_stream"], names["aggregates_data_stream"], f"logs-flowshiptest{run_id}.flows",
                f"logs-flowshiptest{run_id}.aggregates"]
    start = time.time_ns() - 3600 * 10**9
    flows = generated_flows(3000, seed=7, start_ns=start, spread_s=3600)
    w = Writer(opensearch_server, **names, batch={"max_events": 700})
    for offset in range(0, flows.num_rows, 1000):
        w.write(flows.slice(offset, 1000))
    assert w.finish() == [False, False, False]
    lo, hi = start + 600 * 10**9, start + 1800 * 10**9
    t = flows.column("time").cast(pa.int64())
    in_range = pc.and_(pc.greater_equal(t, lo), pc.less(t, hi))
    dropped = pc.equal(flows.column("verdict"), "DROPPED")
    shop = pc.or_(pc.equal(flows.column("src_namespace"), "shop"), pc.equal(flows.column("dst_namespace"), "shop"))
    want = pc.sum(pc.and_(pc.and_(in_range, dropped), shop).cast(pa.int64())).as_py()
    assert want > 20
    lo_text = times.nanos_times(pa.array([lo], pa.int64()).cast(pa.timestamp("ns", tz="UTC")))[0].as_py()
    hi_text = times.nanos_times(pa.array([hi], pa.int64()).cast(pa.timestamp("ns", tz="UTC")))[0].as_py()
    query = {"bool": {"filter": [
        {"term": {"event.type": "denied"}},
        {"bool": {"should": [{"term": {"flowship.source.namespace": "shop"}},
                             {"term": {"flowship.destination.namespace": "shop"}}], "minimum_should_match": 1}},
        {"range": {"@timestamp": {"gte": lo_text, "lt": hi_text}}},
    ]}}
    assert _refresh_count(opensearch_server, names["data_stream"], query) == want
    # the same via the node-local view (orchestrator.namespace) equals the Arrow computation too
    local_dst = pc.xor(pc.equal(flows.column("traffic_direction"), "INGRESS"), flows.column("is_reply"))
    local_ns = pc.if_else(local_dst, flows.column("dst_namespace"), flows.column("src_namespace"))
    want_local = pc.sum(pc.and_(pc.and_(in_range, dropped), pc.equal(local_ns, "shop")).cast(pa.int64())).as_py()
    query_local = {"bool": {"filter": [{"term": {"event.action": "flow_dropped"}},
                                       {"term": {"orchestrator.namespace": "shop"}},
                                       {"range": {"@timestamp": {"gte": lo_text, "lt": hi_text}}}]}}
    assert _refresh_count(opensearch_server, names["data_stream"], query_local) == want_local


@pytest.mark.servers
def test_document_breaking_the_mapping_is_dead_lettered_rest_delivered(opensearch_server, run_id, cleanup, tmp_path):
    names = _names(run_id)
    cleanup += [names["data_stream"], names["aggregates_data_stream"], f"logs-flowshiptest{run_id}.flows",
                f"logs-flowshiptest{run_id}.aggregates"]
    flows = generated_flows(50, seed=3)
    ips = flows.column("ip_src").to_pylist()
    ips[17] = "not-an-ip"
    flows = flows.set_column(flows.schema.get_field_index("ip_src"), "ip_src", pa.array(ips))
    ctx = make_ctx("es", tmp_path)
    w = Writer(opensearch_server, ctx, **names)
    w.write(flows)
    assert w.finish() == [True]  # acknowledged, with one row given up on
    assert _refresh_count(opensearch_server, names["data_stream"]) == 49
    (entry,) = [orjson.loads(x) for x in (tmp_path / "dead-letter" / "es.jsonl").read_bytes().splitlines()]
    assert entry["reason"] == "mapper_parsing_exception"
    assert "source.ip" in entry["detail"]
    assert entry["record"]["id"] == flows.column("uuid")[17].as_py()
    assert entry["record"]["document"]["source"]["ip"] == "not-an-ip"
    assert ctx.metrics.value("flowship_sink_dead_letter_total", sink="es", reason="mapper_parsing_exception") == 1


@pytest.mark.servers
def test_blocked_index_is_retried_then_delivered_after_the_block_is_lifted(opensearch_server, run_id, cleanup):
    prefix = f"flowshiptest{run_id}-flows-"
    day = time.strftime("%Y.%m.%d", time.gmtime())
    index = prefix + day
    cleanup += [index, f"flowshiptest{run_id}-flows", f"flowshiptest{run_id}-aggs"]
    now = time.time_ns()
    first = generated_flows(100, seed=11, start_ns=now - 10**9, spread_s=0.5)
    second = generated_flows(300, seed=12, start_ns=now - 10**9, spread_s=0.5)
    ctx = make_ctx("es")
    w = Writer(opensearch_server, ctx, mode="index", index=prefix + "%Y.%m.%d",
               aggregates_index=f"flowshiptest{run_id}-aggs-%Y.%m.%d",
               retry={"initial_backoff": "50ms", "max_backoff": "300ms"}, batch={"timeout": "50ms"})
    w.write(first)
    w.sink.flush()
    assert w.done == [False]
    status, body = http_json("PUT", f"{opensearch_server}/{index}/_settings",
                             {"index.blocks.read_only_allow_delete": True})
    assert status == 200, body
    try:
        w.write(second)
        deadline = time.monotonic() + 30
        while ctx.metrics.value("flowship_sink_batches_total", sink="es", outcome="retry") < 3:
            assert time.monotonic() < deadline, "the blocked writes were not retried"
            w.sink.tick(0)  # the runtime ticks every second; the batch timeout is 50ms
            time.sleep(0.1)
        assert w.done == [False]  # the second envelope is held, not acknowledged, not dropped
    finally:
        status, body = http_json("PUT", f"{opensearch_server}/{index}/_settings",
                                 {"index.blocks.read_only_allow_delete": None})
        assert status == 200, body
    assert w.finish() == [False, False]
    assert _refresh_count(opensearch_server, index) == 400
    assert ctx.metrics.value("flowship_sink_dead_letter_total", sink="es") == 0
    kinds = {k for k in ("item_429", "http_429", "item_403", "http_403")
             if ctx.metrics.value("flowship_sink_errors_total", sink="es", kind=k)}
    assert kinds, "the block was reported as a retryable error"


def _backing_index(url: str, data_stream: str) -> str:
    status, body = http_json("GET", f"{url}/_data_stream/{data_stream}")
    assert status == 200, body
    return body["data_streams"][0]["indices"][-1]["index_name"]


def _set_block(url: str, index: str, block: str, value: bool | None) -> None:
    status, body = http_json("PUT", f"{url}/{index}/_settings", {f"index.blocks.{block}": value})
    assert status == 200, body


@pytest.mark.servers
@pytest.mark.parametrize("block", ["write", "read_only"])
def test_write_blocked_backing_index_stalls_the_sink_then_every_flow_is_indexed_once(
        opensearch_server, run_id, cleanup, tmp_path, block):
    """``index.blocks.write`` / ``read_only`` (403 cluster_block_exception) mid-run: items are retried, the sink
    holds its envelopes and blocks its writer; once the block is cleared every flow is indexed exactly once and
    only the document that breaks the mapping is dead-lettered."""
    names = _names(run_id)
    cleanup += [names["data_stream"], names["aggregates_data_stream"], f"logs-flowshiptest{run_id}.flows",
                f"logs-flowshiptest{run_id}.aggregates"]
    now = time.time_ns()
    first = generated_flows(200, seed=21, start_ns=now - 10**9, spread_s=0.5)
    held = [generated_flows(600, seed=22 + i, start_ns=now - 10**9, spread_s=0.5) for i in range(3)]
    ips = held[1].column("ip_src").to_pylist()
    ips[123] = "not-an-ip"  # an error of the document itself, sent while the index is blocked
    held[1] = held[1].set_column(held[1].schema.get_field_index("ip_src"), "ip_src", pa.array(ips))
    bad_id = held[1].column("uuid")[123].as_py()
    ctx = make_ctx("es", tmp_path)
    w = Writer(opensearch_server, ctx, **names, batch={"max_events": 300, "timeout": "50ms"},
               retry={"initial_backoff": "50ms", "max_backoff": "500ms", "concurrency": 1})
    w.write(first)
    w.sink.flush()
    assert w.done == [False]
    backing = _backing_index(opensearch_server, names["data_stream"])
    _set_block(opensearch_server, backing, block, True)
    writer = threading.Thread(target=lambda: [w.write(b) for b in held], daemon=True)
    try:
        writer.start()
        deadline = time.monotonic() + 30
        while ctx.metrics.value("flowship_sink_errors_total", sink="es", kind="item_403") < 5:
            assert time.monotonic() < deadline, "the blocked items were not retried"
            time.sleep(0.1)
        time.sleep(1.0)
        assert writer.is_alive(), "the writer was not held back while the index was blocked"
        assert w.done == [False], "an envelope was acknowledged while its flows were blocked"
        assert ctx.metrics.value("flowship_sink_dead_letter_total", sink="es") == 0
        assert _refresh_count(opensearch_server, names["data_stream"]) == 200
    finally:
        _set_block(opensearch_server, backing, block, None)
    writer.join(60)
    assert not writer.is_alive()
    assert w.finish() == [False, False, True, False]  # the third envelope holds the dead-lettered document
    uuids = [u for b in [first, *held] for u in b.column("uuid").to_pylist() if u != bad_id]
    assert len(set(uuids)) == len(uuids) == 2000 - 1
    assert _refresh_count(opensearch_server, names["data_stream"]) == len(uuids)
    assert _refresh_count(opensearch_server, names["data_stream"], {"ids": {"values": uuids}}) == len(uuids)
    (entry,) = [orjson.loads(x) for x in (tmp_path / "dead-letter" / "es.jsonl").read_bytes().splitlines()]
    assert entry["reason"] == "mapper_parsing_exception" and entry["record"]["id"] == bad_id
    assert ctx.metrics.value("flowship_sink_dead_letter_total", sink="es") == 1
    assert ctx.metrics.value("flowship_sink_dead_letter_total", sink="es", reason="mapper_parsing_exception") == 1


@pytest.mark.servers
def test_export_run_with_the_index_write_blocked_for_a_while_indexes_every_flow_once(opensearch_server, run_id,
                                                                                    cleanup, tmp_path):
    """`flowship export` (file source → OpenSearch) with ``index.blocks.write=true`` set on the data stream's
    backing index mid-run for 8 s, then cleared: the run waits, exits 0, every flow is indexed exactly once and
    nothing is dead-lettered."""
    import signal
    import subprocess
    import sys

    from flowship.model.hubble_encode import encode_lines

    names = _names(run_id)
    cleanup += [names["data_stream"], names["aggregates_data_stream"], f"logs-flowshiptest{run_id}.flows",
                f"logs-flowshiptest{run_id}.aggregates"]
    flows = generated_flows(30000, seed=41)
    uuids = flows.column("uuid").to_pylist()
    assert len(set(uuids)) == len(uuids)
    (tmp_path / "in.jsonl").write_bytes(b"".join(encode_lines(flows)))
    config = tmp_path / "flowship.yaml"
    config.write_text(f"""
node_name: es-block
data_dir: {tmp_path}/state
shutdown_timeout: 120s
sources:
  - type: file
    paths: [{tmp_path}/in.jsonl]
    batch_rows: 500
sinks:
  - type: elasticsearch
    url: {opensearch_server}
    data_stream: {names["data_stream"]}
    aggregates_data_stream: {names["aggregates_data_stream"]}
    batch:
      max_events: 250
      timeout: 100ms
    retry:
      initial_backoff: 100ms
      max_backoff: 1s
      concurrency: 1
""")
    log = tmp_path / "export.log"
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-m", "flowship.cli", "--log-format", "json", "export", "--config",
                             str(config)], cwd=tmp_path, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": str(repo)})
    backing = None
    try:
        deadline = time.monotonic() + 60
        while backing is None:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            status, body = http_json("GET", f"{opensearch_server}/_data_stream/{names['data_stream']}")
            if status == 200:
                backing = body["data_streams"][0]["indices"][-1]["index_name"]
            else:
                time.sleep(0.05)
        _set_block(opensearch_server, backing, "write", True)
        try:
            time.sleep(1)  # a bulk request already past the block check when it was set still lands
            before = _refresh_count(opensearch_server, names["data_stream"])
            assert before < len(uuids), "the run ended before the block was set"
            time.sleep(7)
            assert proc.poll() is None, "the run ended while the index was blocked"
            assert _refresh_count(opensearch_server, names["data_stream"]) == before
            assert not (tmp_path / "state" / "dead-letter").exists(), "blocked flows were dead-lettered"
            assert '"records refused, retrying"' in log.read_text() and "FORBIDDEN/8/index write" in log.read_text()
        finally:
            _set_block(opensearch_server, backing, "write", None)
        assert proc.wait(120) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
    assert _refresh_count(opensearch_server, names["data_stream"]) == len(uuids)
    assert _refresh_count(opensearch_server, names["data_stream"], {"ids": {"values": uuids}}) == len(uuids)
    assert not (tmp_path / "state" / "dead-letter").exists()


def test_bulk_item_errors_retried_or_dead_lettered():
    """Which bulk item errors are the cluster's state (retried) and which the document's (dead-lettered)."""
    from flowship.sinks.elasticsearch import item_retryable

    for status, etype in [(403, "cluster_block_exception"), (429, "cluster_block_exception"),
                          (429, "es_rejected_execution_exception"), (429, "rejected_execution_exception"),
                          (503, "unavailable_shards_exception"), (500, "node_disconnected_exception"),
                          (503, "no_shard_available_action_exception"), (429, "circuit_breaking_exception")]:
        assert item_retryable(status, etype), (status, etype)
    for status, etype in [(400, "mapper_parsing_exception"), (400, "document_parsing_exception"),
                          (400, "illegal_argument_exception"), (400, "strict_dynamic_mapping_exception"),
                          (413, "http_413"), (400, "parse_exception")]:
        assert not item_retryable(status, etype), (status, etype)


@pytest.mark.servers
def test_aggregate_rows_go_to_their_data_stream(opensearch_server, fixture_batches, run_id, cleanup):
    names = _names(run_id)
    cleanup += [names["data_stream"], names["aggregates_data_stream"], f"logs-flowshiptest{run_id}.flows",
                f"logs-flowshiptest{run_id}.aggregates"]
    flows = fixture_batches["hubble-otel-basic-sample-400-tcp-flows"]
    aggs = aggregate_rows(flows)
    w = Writer(opensearch_server, **names)
    w.write(aggs, "aggregates")
    w.write(aggs, "aggregates")  # a retry of the same rows: same content → same _id
    assert w.finish() == [False, False]
    hits = _search_all(opensearch_server, names["aggregates_data_stream"])
    assert len(hits) == aggs.num_rows
    assert sum(h["_source"]["flowship"]["aggregate"]["flows"] for h in hits) == flows.num_rows
    assert all(h["_source"]["event"]["kind"] == "metric" for h in hits)


@pytest.mark.servers
def test_retention_without_ism_plugin_is_a_warning(opensearch_server, run_id, cleanup):
    names = _names(run_id)
    cleanup += [names["data_stream"], names["aggregates_data_stream"], f"logs-flowshiptest{run_id}.flows",
                f"logs-flowshiptest{run_id}.aggregates"]
    status, plugins = http_json("GET", f"{opensearch_server}/_cat/plugins?format=json")
    has_ism = any("index-management" in p.get("component", "") for p in plugins or [])
    w = Writer(opensearch_server, **names, retention="30d", policy_name=f"flowshiptest{run_id}")
    assert w.sink.policy_installed is has_ism
    w.write(generated_flows(10))
    assert w.finish() == [False]
    assert _refresh_count(opensearch_server, names["data_stream"]) == 10
    if has_ism:
        http_json("DELETE", f"{opensearch_server}/_plugins/_ism/policies/flowshiptest{run_id}")


@pytest.fixture(scope="module")
def own_opensearch():
    """A second OpenSearch on its own ports and data dir, which this module may stop and start."""
    port = int(os.environ.get("FLOWSHIP_TEST_OPENSEARCH_PORT", "19200"))
    run = Path(tempfile.mkdtemp(prefix="flowship-os-run-"))
    env = {"FLOWSHIP_RUN": str(run), "FLOWSHIP_OPENSEARCH_PORT": str(port),
           "FLOWSHIP_OPENSEARCH_TRANSPORT_PORT": str(port + 100)}
    url = f"http://127.0.0.1:{port}"
    devservers.start("opensearch", url, env)
    yield url, env
    devservers.stop("opensearch", env)


@pytest.mark.servers
def test_server_stopped_mid_run_loses_nothing(own_opensearch, run_id):
    url, env = own_opensearch
    names = _names(run_id)
    ctx = make_ctx("es")
    w = Writer(url, ctx, **names, retry={"initial_backoff": "100ms", "max_backoff": "1s"},
               batch={"max_events": 500, "timeout": "100ms"})
    batches = [generated_flows(1000, seed=100 + i) for i in range(6)]
    w.write(batches[0])
    w.sink.flush()
    assert w.done == [False]
    devservers.stop("opensearch", env)
    assert not devservers.answers("opensearch", url)
    writer = threading.Thread(target=lambda: [w.write(b) for b in batches[1:]])
    writer.start()
    deadline = time.monotonic() + 30
    while ctx.metrics.value("flowship_sink_errors_total", sink="es", kind="transport") < 2:
        assert time.monotonic() < deadline, "no transport errors while the server was down"
        time.sleep(0.2)
    assert w.done == [False]  # nothing acknowledged while the server is down
    devservers.start("opensearch", url, env)
    writer.join(120)
    assert w.finish() == [False] * 6
    assert _refresh_count(url, names["data_stream"]) == 6000
    assert ctx.metrics.value("flowship_sink_dead_letter_total", sink="es") == 0


# ---------------------------------------------------------------------------------------------
# fault injection: answers OpenSearch does not give on demand
# ---------------------------------------------------------------------------------------------


def _bulk_answer(body: bytes, statuses=None) -> tuple[int, dict, bytes]:
    lines = [x for x in body.split(b"\n") if x]
    actions = lines[0::2]
    items = []
    for i, _ in enumerate(actions):
        st = (statuses or {}).get(i, 201)
        item = {"status": st}
        if st >= 300:
            item["error"] = {"type": "es_rejected_execution_exception" if st == 429 else "x", "reason": "busy"}
        items.append({"create": item})
    errors = any(it["create"]["status"] >= 300 for it in items)
    return 200, {"Content-Type": "application/json"}, orjson.dumps({"errors": errors, "items": items})


def test_413_splits_bulk_requests(all_flows):
    limit = 200_000
    accepted = []

    def answer(body: bytes):
        if len(body) > limit:
            return 413, {}, b"Request Entity Too Large"
        accepted.append(body.count(b'{"create"'))
        return _bulk_answer(body)

    with FakeFaultServer(default=answer) as fake:
        w = Writer(fake.url, batch={"max_events": 100000, "max_bytes": "64MiB"})
        w.write(all_flows)
        assert w.finish() == [False]
    assert 413 in fake.statuses()
    assert sum(accepted) == all_flows.num_rows


def test_item_429_retried_request_429_honours_retry_after():
    flows = flows_from_rows([{"time": 10**18 + i, "uuid": f"u{i}", "ip_src": "10.0.0.1"} for i in range(10)])
    sizes = []

    def first(body):
        return _bulk_answer(body, {2: 429, 5: 503, 7: 409})

    def second(body):
        sizes.append(body.count(b'{"create"'))
        return _bulk_answer(body)

    with FakeFaultServer([(429, {"Retry-After": "1"}, b'{"error":"too many requests"}'), first, second]) as fake:
        t0 = time.monotonic()
        w = Writer(fake.url, retry={"initial_backoff": "10ms", "max_backoff": "20ms"})
        w.write(flows)
        assert w.finish() == [False]
        assert time.monotonic() - t0 >= 1.0
    assert fake.statuses() == [200] * 0 + [429, 200, 200]
    assert sizes == [2]  # only the 429 and 503 items were sent again
    assert w.ctx.metrics.value("flowship_sink_duplicates_total", sink="es") == 1
