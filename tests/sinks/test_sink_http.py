"""HTTP sink: config rules, request bodies, delivery into a real VictoriaLogs (``/insert/jsonline``), faults."""

from __future__ import annotations

import base64
import gzip
import json

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from devservers import logsql_query, logsql_wait_count, logsql_wait_rows
from fakes import FakeFaultServer
from helpers import aggregate_rows, make_ctx

from flowship.config import ConfigError, parse
from flowship.model import ecs_encode, hubble_encode
from flowship.pipeline.envelope import Envelope, Receipt
from flowship.sinks.http import HttpSink, HttpSinkConfig, request_body


def _cfg(**kw) -> HttpSinkConfig:
    return parse(HttpSinkConfig, kw, "flowship.yaml", "sinks[0]")


def _send(url: str, batches: list[tuple[pa.RecordBatch, str]], ctx=None, **kw) -> list[bool]:
    """Write the batches through a started sink, flush, close; the receipts' ``failed`` flags."""
    sink = HttpSink(_cfg(url=url, **kw), ctx or make_ctx("http"))
    sink.start()
    done: list[bool] = []
    for batch, kind in batches:
        sink.write(Envelope(batch, [Receipt(on_done=lambda r: done.append(r.failed), rows=batch.num_rows)], kind))
    sink.flush()
    sink.close()
    return done


# ---------------------------------------------------------------------------------------------
# configuration and bodies
# ---------------------------------------------------------------------------------------------


def test_url_is_required_and_named_in_the_error():
    with pytest.raises(ConfigError) as err:
        _cfg()
    assert "flowship.yaml: sinks[0].url: expected the endpoint as http(s)://host[:port]/path, got ''" in str(err.value)


def test_credentials_in_the_url_are_refused():
    with pytest.raises(ConfigError) as err:
        _cfg(url="https://user:pw@collector.example/ingest")
    assert "sinks[0].url: remove the user name and password from the URL" in str(err.value)


def test_header_names_are_checked():
    with pytest.raises(ConfigError) as err:
        _cfg(url="http://127.0.0.1:1/x", headers={"Bad Header": "v"})
    assert "sinks[0].headers.Bad Header: not a valid HTTP header name" in str(err.value)


def test_framings_and_compression():
    records = [b'{"a":1}\n', b'{"b":"x"}\n']
    assert request_body(records, "ndjson", "none") == b'{"a":1}\n{"b":"x"}\n'
    assert json.loads(request_body(records, "json_array", "none")) == [{"a": 1}, {"b": "x"}]
    assert gzip.decompress(request_body(records, "ndjson", "gzip")) == b'{"a":1}\n{"b":"x"}\n'


# ---------------------------------------------------------------------------------------------
# a real server: VictoriaLogs' JSON-lines ingestion
# ---------------------------------------------------------------------------------------------


@pytest.mark.servers
def test_hubble_records_arrive_in_victorialogs(victorialogs_server, all_flows, run_id):
    job = f"flowship-http-{run_id}-hubble"
    url = (f"{victorialogs_server}/insert/jsonline?_time_field=time&_msg_field=flow.uuid"
           f"&_stream_fields=node_name&extra_fields=job={job}")
    ctx = make_ctx("http")
    assert _send(url, [(all_flows, "flows")], ctx, batch={"max_events": 100}) == [False]
    n = all_flows.num_rows
    assert logsql_wait_count(victorialogs_server, f'job:="{job}"', n) == n
    rows = logsql_query(victorialogs_server, f"job:=\"{job}\" | stats by (flow.verdict) count() c")
    want = {v["values"]: v["counts"] for v in pc.value_counts(all_flows.column("verdict")).to_pylist()}
    assert {r["flow.verdict"]: int(r["c"]) for r in rows} == want
    i = 3
    uuid = all_flows.column("uuid")[i].as_py()
    (hit,) = logsql_wait_rows(victorialogs_server, f'job:="{job}" _msg:="{uuid}"')
    line = orjson.loads(hubble_encode.encode_lines(all_flows)[i])
    assert hit["_msg"] == uuid
    assert hit["node_name"] == line["node_name"] == all_flows.column("node_name")[i].as_py()
    assert hit["_time"] == line["time"]  # VictoriaLogs keeps the nanoseconds
    assert ctx.metrics.value("flowship_sink_dead_letter_total", sink="http") == 0
    assert ctx.metrics.value("flowship_sink_bytes_total", sink="http") > 0


@pytest.mark.servers
def test_ecs_documents_gzip_and_aggregates_arrive(victorialogs_server, fixture_batches, run_id):
    job = f"flowship-http-{run_id}-ecs"
    flows = fixture_batches["hubble-otel-basic-sample-400-tcp-flows"]
    aggs = aggregate_rows(flows)
    url = f"{victorialogs_server}/insert/jsonline?_time_field=@timestamp&extra_fields=job={job}"
    assert _send(url, [(flows, "flows"), (aggs, "aggregates")], format="ecs", compression="gzip") == [False, False]
    total = flows.num_rows + aggs.num_rows
    assert logsql_wait_count(victorialogs_server, f'job:="{job}"', total) == total
    docs = ecs_encode.to_documents(flows)
    uuid = flows.column("uuid")[0].as_py()
    (hit,) = logsql_wait_rows(victorialogs_server, f'job:="{job}" event.id:="{uuid}"')
    assert hit["source.ip"] == docs[0]["source"]["ip"]
    assert hit["destination.port"] == str(docs[0]["destination"]["port"])


# ---------------------------------------------------------------------------------------------
# fault injection (answers a real server does not give on demand)
# ---------------------------------------------------------------------------------------------


def test_503_is_retried_then_delivered_once(fixture_batches):
    flows = fixture_batches["hubble-otel-basic-sample-10-flows"]
    with FakeFaultServer([(503, {}, b"busy"), (503, {"Retry-After": "0"}, b"busy")], default=(200, {}, b"")) as srv:
        ctx = make_ctx("http")
        done = _send(f"{srv.url}/ingest", [(flows, "flows")], ctx,
                     retry={"initial_backoff": "10ms", "max_backoff": "20ms"})
        assert done == [False]
        assert srv.statuses() == [503, 503, 200]
        bodies = [body for _, _, body, _ in srv.requests]
    assert bodies[0] == bodies[2]  # the same request, sent whole again
    uuids = [orjson.loads(line)["flow"]["uuid"] for line in bodies[2].splitlines()]
    assert uuids == flows.column("uuid").to_pylist()
    assert ctx.metrics.value("flowship_sink_errors_total", sink="http", kind="http_503") == 2


def test_400_dead_letters_the_request_with_the_server_words(fixture_batches, tmp_path):
    flows = fixture_batches["hubble-otel-basic-sample-5-http-flows"]
    with FakeFaultServer([(400, {}, b"field flow.time: cannot parse")]) as srv:
        ctx = make_ctx("http", tmp_path)
        assert _send(f"{srv.url}/ingest", [(flows, "flows")], ctx) == [True]
    entries = [orjson.loads(x) for x in (tmp_path / "dead-letter" / "http.jsonl").read_bytes().splitlines()]
    assert len(entries) == flows.num_rows
    assert {e["reason"] for e in entries} == {"http_400"}
    assert "cannot parse" in entries[0]["detail"]
    assert [e["record"]["flow"]["uuid"] for e in entries] == flows.column("uuid").to_pylist()
    assert ctx.metrics.value("flowship_sink_dead_letter_total", sink="http", reason="http_400") == flows.num_rows


def test_json_array_body_and_auth_headers(fixture_batches):
    flows = fixture_batches["hubble-otel-basic-sample-10-flows"]
    with FakeFaultServer(default=(202, {}, b"")) as srv:
        done = _send(f"{srv.url}/hook?x=1", [(flows, "flows")], framing="json_array",
                     username="collector", password="pw-123", headers={"X-Tenant": "t1"})
        assert done == [False]
        ((path, headers, body, _),) = srv.requests
    assert path == "/hook?x=1"
    assert headers["Content-Type"] == "application/json"
    assert headers["Authorization"] == "Basic " + base64.b64encode(b"collector:pw-123").decode()
    assert headers["X-Tenant"] == "t1"
    assert [r["flow"]["uuid"] for r in json.loads(body)] == flows.column("uuid").to_pylist()


def test_bearer_token_header(fixture_batches):
    flows = fixture_batches["hubble-otel-basic-sample-10-flows"]
    with FakeFaultServer(default=(200, {}, b"")) as srv:
        assert _send(f"{srv.url}/in", [(flows, "flows")], bearer_token="tok-9") == [False]
        ((_, headers, body, _),) = srv.requests
    assert headers["Authorization"] == "Bearer tok-9"
    assert headers["Content-Type"] == "application/x-ndjson"
    assert len(body.splitlines()) == flows.num_rows
