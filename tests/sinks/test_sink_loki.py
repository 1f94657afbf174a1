"""Loki sink: config rules, wire encoding, and pushes to a real VictoriaLogs (Loki push API)."""

from __future__ import annotations

import json
import time

import cramjam
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from devservers import logsql_query, logsql_wait_count
from fakes import FakeFaultServer
from helpers import aggregate_rows, make_ctx

from flowship.config import ConfigError, parse
from flowship.model import hubble_encode
from flowship.pipeline.envelope import Envelope, Receipt
from flowship.proto.logproto import push_pb2
from flowship.sinks.loki import (
    LokiSink,
    LokiSinkConfig,
    entry_fields,
    label_selectors,
    logfmt_lines,
    parse_selector,
    push_request,
    varints,
)

# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------


def _cfg(**kw) -> LokiSinkConfig:
    return parse(LokiSinkConfig, kw, "flowship.yaml", "sinks[0]")


def test_default_labels_are_bounded():
    c = _cfg()
    assert c.labels == {"node": "node_name", "namespace": "src_namespace", "verdict": "verdict",
                        "flow_type": "flow_type"}
    assert c.encoding == "protobuf" and c.line_format == "hubble"
    assert c.structured_metadata == ["uuid", "community_id", "src_pod", "dst_pod"]


@pytest.mark.parametrize("column", ["ip_src", "dst_port", "src_pod", "uuid", "community_id", "http_url",
                                    "src_labels", "bytes", "time"])
def test_high_cardinality_label_columns_are_rejected(column):
    with pytest.raises(ConfigError) as err:
        _cfg(labels={"x": column})
    assert f"flowship.yaml: sinks[0].labels.x: column {column!r}" in str(err.value)
    assert "structured_metadata" in str(err.value)


def test_label_name_rules():
    with pytest.raises(ConfigError) as err:
        _cfg(labels={"bad-name": "verdict", "__reserved": "flow_type", "job": "l4_protocol", "ok": "no_such"})
    text = str(err.value)
    assert "labels.bad-name: 'bad-name' is not a valid Loki label name" in text
    assert "labels.__reserved" in text
    assert "labels.job: 'job' is already a static label" in text
    assert "labels.ok: 'no_such' is not a flow column" in text


def test_at_most_15_labels():
    many = {f"l{i}": "verdict" for i in range(15)}
    with pytest.raises(ConfigError, match="Loki accepts at most 15"):
        _cfg(labels=many)  # 15 + the static job label


def test_structured_metadata_must_be_scalar_columns():
    with pytest.raises(ConfigError) as err:
        _cfg(structured_metadata=["uuid", "src_labels", "nope"])
    assert "structured_metadata[1]: 'src_labels' is a list" in str(err.value)
    assert "structured_metadata[2]: 'nope' is not a flow column" in str(err.value)


# ---------------------------------------------------------------------------------------------
# encoding
# ---------------------------------------------------------------------------------------------


def test_varints_match_protobuf():
    values = [0, 1, 127, 128, 300, 16383, 16384, 2**31, 2**35 + 7, 2**63 - 1, 2**64 - 1]
    import numpy as np

    got = varints(np.array(values, dtype=np.uint64)).to_pylist()
    from google.protobuf.internal.encoder import _VarintBytes

    assert got == [_VarintBytes(v) for v in values]


def test_selectors_escape_and_sort():
    batch = pa.RecordBatch.from_pydict({"verdict": ["DROPPED", None, 'we"ird\\x'], "node_name": ["n1", "n2", ""]})
    sel = label_selectors(batch, {"verdict": "verdict", "node": "node_name"}, {"job": "flowship"}).to_pylist()
    assert sel == ['{job="flowship", node="n1", verdict="DROPPED"}', '{job="flowship", node="n2"}',
                   '{job="flowship", verdict="we\\"ird\\\\x"}']
    assert parse_selector(sel[2]) == {"job": "flowship", "verdict": 'we"ird\\x'}


def test_push_request_decodes_with_generated_code(fixture_batches):
    batch = fixture_batches["hubble-otel-basic-sample-10-flows"]
    sink = LokiSink(_cfg(), make_ctx())
    records, sizes, refused = sink.encode(batch)
    assert len(records) == 10 and refused == [] and len(sizes) == 10
    # shuffle the records: the request must still sort entries by time within each stream
    raw = push_request(list(reversed(records)))
    req = push_pb2.PushRequest.FromString(raw)
    lines = [line[:-1] for line in hubble_encode.encode_lines(batch)]
    times = batch.column("time").cast(pa.int64()).to_pylist()
    uuids = batch.column("uuid").to_pylist()
    seen = {}
    for stream in req.streams:
        labels = parse_selector(stream.labels)
        assert labels["job"] == "flowship" and "node" in labels
        stamps = [e.timestamp.seconds * 10**9 + e.timestamp.nanos for e in stream.entries]
        assert stamps == sorted(stamps)
        for e in stream.entries:
            meta = {p.name: p.value for p in e.structuredMetadata}
            seen[meta["uuid"]] = (e.timestamp.seconds * 10**9 + e.timestamp.nanos, e.line.encode(), meta)
    assert len(seen) == 10
    for i, u in enumerate(uuids):
        ts, line, meta = seen[u]
        assert ts == times[i] and line == lines[i]
        assert meta["community_id"] == batch.column("community_id")[i].as_py()


def test_entry_fields_without_metadata_match_generated_code():
    import numpy as np

    lines = pa.array([b"a", b"\xc3\xa9" * 100, b""], pa.binary())
    times = np.array([0, 1_700_000_000_999_999_999, 5], dtype=np.int64)
    raw = entry_fields(times, lines, []).to_pylist()
    for b, t, line in zip(raw, times.tolist(), lines.to_pylist(), strict=True):
        stream = push_pb2.StreamAdapter.FromString(b)
        (entry,) = stream.entries
        assert entry.timestamp.seconds * 10**9 + entry.timestamp.nanos == t
        assert entry.line.encode() == line


def test_logfmt_lines_quote_what_needs_quoting():
    batch = pa.RecordBatch.from_pydict({
        "verdict": ["DROPPED", None], "src_pod": ["a b", 'q"x'], "dst_port": pa.array([80, None], pa.uint16()),
        "is_reply": [True, False], "dns_ips": [["1.1.1.1", "2.2.2.2"], None]})
    assert logfmt_lines(batch).to_pylist() == [
        'verdict=DROPPED src_pod="a b" dst_port=80 is_reply=true dns_ips=1.1.1.1,2.2.2.2',
        'src_pod="q\\"x" is_reply=false']


def test_oversize_lines_truncated_or_refused():
    rows = pa.RecordBatch.from_pydict({"time": pa.array([1, 2], pa.int64()).cast(pa.timestamp("ns", tz="UTC")),
                                       "summary": ["x" * 3000, "short"]})
    sink = LokiSink(_cfg(line_format="logfmt", max_line_bytes="1KiB", structured_metadata=[]), make_ctx())
    records, _, refused = sink.encode(rows)
    assert refused == [] and len(records) == 2
    entry = push_pb2.StreamAdapter.FromString(records[0][2]).entries[0]
    assert len(entry.line.encode()) == 1024
    sink = LokiSink(_cfg(line_format="logfmt", max_line_bytes="1KiB", on_oversize="dead_letter",
                         structured_metadata=[]), make_ctx())
    records, _, refused = sink.encode(rows)
    assert len(records) == 1 and len(refused) == 1
    assert refused[0][0] == "line_too_long" and refused[0][2]["line"].startswith(b"time=")


# ---------------------------------------------------------------------------------------------
# against VictoriaLogs (Loki push API)
# ---------------------------------------------------------------------------------------------


def _push(url: str, batches: list[tuple[pa.RecordBatch, str]], ctx=None, **kw) -> tuple[LokiSink, list]:
    ctx = ctx or make_ctx("loki")
    sink = LokiSink(_cfg(url=url, **kw), ctx)
    sink.start()
    done: list = []
    for batch, kind in batches:
        receipt = Receipt(on_done=lambda r: done.append(r.failed), rows=batch.num_rows)
        sink.write(Envelope(batch, [receipt], kind))
    sink.flush()
    sink.close()
    return sink, done


def _push_url(base: str) -> str:
    # keep the line verbatim in _msg (VictoriaLogs would otherwise unpack JSON lines into fields)
    return f"{base}/insert/loki/api/v1/push?disable_message_parsing=1"


@pytest.mark.servers
@pytest.mark.parametrize("encoding", ["protobuf", "json"])
def test_flows_arrive_in_victorialogs(victorialogs_server, all_flows, run_id, encoding):
    job = f"flowship-test-{run_id}-{encoding}"
    ctx = make_ctx("loki")
    _, done = _push(_push_url(victorialogs_server), [(all_flows, "flows")], ctx, encoding=encoding,
                    static_labels={"job": job})
    assert done == [False]
    n = all_flows.num_rows
    assert logsql_wait_count(victorialogs_server, f'_stream:{{job="{job}"}}', n) == n
    # per-verdict counts equal the batch's
    rows = logsql_query(victorialogs_server, f'_stream:{{job="{job}"}} | stats by (verdict) count() c')
    got = {r["verdict"]: int(r["c"]) for r in rows}
    want = {v["values"]: v["counts"] for v in pc.value_counts(all_flows.column("verdict")).to_pylist()}
    assert got == want
    # one flow in detail: the line is the Hubble JSON line, ids travel as structured metadata
    i = 7
    uuid = all_flows.column("uuid")[i].as_py()
    (hit,) = logsql_query(victorialogs_server, f'_stream:{{job="{job}"}} uuid:="{uuid}"')
    expected_line = hubble_encode.encode_lines(all_flows)[i][:-1].decode()
    assert hit["_msg"] == expected_line
    assert hit["community_id"] == all_flows.column("community_id")[i].as_py()
    assert hit["verdict"] == all_flows.column("verdict")[i].as_py()
    assert hit["node"] == all_flows.column("node_name")[i].as_py()
    ns = all_flows.column("time").cast(pa.int64())[i].as_py()
    assert hit["_time"].startswith(time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ns // 10**9)))
    assert ctx.metrics.value("flowship_sink_bytes_total", sink="loki") > 0
    assert ctx.metrics.value("flowship_sink_dead_letter_total", sink="loki") == 0


@pytest.mark.servers
def test_logfmt_lines_and_aggregates_in_victorialogs(victorialogs_server, fixture_batches, run_id):
    job = f"flowship-test-{run_id}-logfmt"
    flows = fixture_batches["cilium-docs-exporter-fieldmask-2-drops"]
    aggs = aggregate_rows(fixture_batches["hubble-otel-basic-sample-400-tcp-flows"])
    _, done = _push(_push_url(victorialogs_server), [(flows, "flows"), (aggs, "aggregates")],
                    line_format="logfmt", static_labels={"job": job})
    assert done == [False, False]
    assert logsql_wait_count(victorialogs_server, f'_stream:{{job="{job}",verdict="DROPPED"}}', 2) == 2
    assert logsql_wait_count(victorialogs_server, f'_stream:{{job="{job}",kind="aggregates"}}', aggs.num_rows) == aggs.num_rows
    hits = logsql_query(victorialogs_server, f'_stream:{{job="{job}",verdict="DROPPED"}} "drop_reason=POLICY_DENIED"')
    assert len(hits) == 1
    assert "src_pod=xwing" in hits[0]["_msg"] and "dst_port=80" in hits[0]["_msg"]
    agg_hits = logsql_query(victorialogs_server, f'_stream:{{job="{job}",kind="aggregates"}}')
    assert all("flows=" in h["_msg"] and "window_start=" in h["_msg"] for h in agg_hits)
    total = sum(float(part.split("=", 1)[1]) for h in agg_hits for part in h["_msg"].split()
                if part.startswith("flows="))
    assert total == fixture_batches["hubble-otel-basic-sample-400-tcp-flows"].num_rows


@pytest.mark.servers
def test_too_long_line_is_dead_lettered_with_the_rest_delivered(victorialogs_server, fixture_batches, run_id,
                                                              tmp_path):
    job = f"flowship-test-{run_id}-oversize"
    batch = fixture_batches["hubble-otel-basic-sample-5-http-flows"]
    summaries = batch.column("summary").to_pylist()
    summaries[2] = "y" * 5000
    batch = batch.set_column(batch.schema.get_field_index("summary"), "summary", pa.array(summaries))
    ctx = make_ctx("loki", tmp_path)
    _, done = _push(_push_url(victorialogs_server), [(batch, "flows")], ctx, static_labels={"job": job},
                    max_line_bytes="4KiB", on_oversize="dead_letter")
    assert done == [True]  # delivered, with one row in the dead-letter file
    assert logsql_wait_count(victorialogs_server, f'_stream:{{job="{job}"}}', 4) == 4
    (entry,) = [orjson.loads(x) for x in (tmp_path / "dead-letter" / "loki.jsonl").read_bytes().splitlines()]
    assert entry["reason"] == "line_too_long"
    assert entry["record"]["labels"].startswith("{") and "yyyy" in entry["record"]["line"]
    assert ctx.metrics.value("flowship_sink_dead_letter_total", sink="loki", reason="line_too_long") == 1


# ---------------------------------------------------------------------------------------------
# fault injection (answers a real server does not give on demand)
# ---------------------------------------------------------------------------------------------


def _entries(body: bytes) -> int:
    req = push_pb2.PushRequest.FromString(bytes(cramjam.snappy.decompress_raw(body)))
    return sum(len(s.entries) for s in req.streams)


def test_429_with_retry_after_then_delivered(fixture_batches):
    flows = fixture_batches["hubble-otel-basic-sample-10-flows"]
    with FakeFaultServer([(429, {"Retry-After": "1"}, b"Ingestion rate limit exceeded"),
                          (500, {}, b"internal")]) as fake:
        t0 = time.monotonic()
        _, done = _push(fake.url + "/loki/api/v1/push", [(flows, "flows")],
                        retry={"initial_backoff": "10ms", "max_backoff": "50ms"}, tenant="team-a",
                        username="u", password="env:FLOWSHIP_TEST_LOKI_PASSWORD")
        assert time.monotonic() - t0 >= 1.0
    assert fake.statuses() == [429, 500, 204]
    assert done == [False]
    assert _entries(fake.requests[-1][2]) == 10
    headers = fake.requests[-1][1]
    assert headers["Content-Type"] == "application/x-protobuf"
    assert headers["X-Scope-OrgID"] == "team-a"
    assert headers["Authorization"].startswith("Basic ")


@pytest.fixture(autouse=True)
def _password(monkeypatch):
    monkeypatch.setenv("FLOWSHIP_TEST_LOKI_PASSWORD", "s3cret")


def test_413_splits_until_requests_fit(all_flows):
    limit = 60_000

    def by_size(body: bytes):
        return (413, {}, b"request too large") if len(body) > limit else (204, {}, b"")

    with FakeFaultServer(default=by_size) as fake:
        _, done = _push(fake.url + "/loki/api/v1/push", [(all_flows, "flows")],
                        batch={"max_events": 100000, "max_bytes": "64MiB"})
    assert done == [False]
    accepted = sum(_entries(body) for _, _, body, status in fake.requests if status == 204)
    assert accepted == all_flows.num_rows
    assert 413 in fake.statuses()


def test_400_dead_letters_with_the_server_reason(fixture_batches, tmp_path):
    flows = fixture_batches["hubble-otel-basic-sample-5-dns-flows"]
    ctx = make_ctx("loki", tmp_path)
    with FakeFaultServer([(400, {}, b"entry for stream '{job=\"x\"}' has timestamp too old: 2021-10-04")]) as fake:
        _, done = _push(fake.url + "/loki/api/v1/push", [(flows, "flows")], ctx)
    assert done == [True]
    entries = [orjson.loads(x) for x in (tmp_path / "dead-letter" / "loki.jsonl").read_bytes().splitlines()]
    assert len(entries) == 5
    assert {e["reason"] for e in entries} == {"too_old"}
    assert "timestamp too old" in entries[0]["detail"]
    assert {e["record"]["structured_metadata"]["uuid"] for e in entries} == set(flows.column("uuid").to_pylist())


def test_json_body_gzip(fixture_batches):
    flows = fixture_batches["hubble-otel-basic-sample-5-dns-flows"]
    with FakeFaultServer() as fake:
        _push(fake.url + "/loki/api/v1/push", [(flows, "flows")], encoding="json", gzip=True)
    import gzip

    (_, headers, body, _), = fake.requests
    assert headers["Content-Encoding"] == "gzip" and headers["Content-Type"] == "application/json"
    doc = json.loads(gzip.decompress(body))
    values = [v for s in doc["streams"] for v in s["values"]]
    assert len(values) == 5
    assert all(isinstance(v[0], str) and v[0].isdigit() and v[2]["uuid"] for v in values)
