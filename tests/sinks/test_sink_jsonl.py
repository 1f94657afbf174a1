"""``file`` and ``stdout`` sinks: JSON lines that decode back to the flows written, ECS documents, aggregate rows,
durability before acknowledgement, rotation by size."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import orjson
import pyarrow as pa
import pytest
from helpers import aggregate_rows

from flowship.components import Context
from flowship.config import ConfigError, load_text, parse
from flowship.model import ecs_decode, ecs_encode
from flowship.model.hubble_decode import decode_lines
from flowship.pipeline.envelope import Envelope, Receipt
from flowship.sinks import jsonl
from flowship.sinks.jsonl import FileSink, FileSinkConfig, StdoutSink, StdoutSinkConfig

REPO = Path(__file__).resolve().parents[2]
NINE_DIGITS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z$")


def file_sink(ctx: Context, path: Path, **options: object) -> FileSink:
    sink = FileSink(parse(FileSinkConfig, {"path": str(path), **options}, "t.yaml"), ctx)
    sink.start()
    return sink


def write_all(sink: FileSink | StdoutSink, batch: pa.RecordBatch, parts: int = 4,
              kind: str = "flows") -> list[Receipt]:
    step = -(-batch.num_rows // parts)
    receipts = []
    for start in range(0, batch.num_rows, step):
        receipt = Receipt(rows=min(step, batch.num_rows - start))
        sink.write(Envelope(batch.slice(start, step), [receipt], kind))
        receipts.append(receipt)
    return receipts


def test_hubble_lines_decode_back_to_the_same_flows(tmp_path, ctx, all_flows):
    out = tmp_path / "sub" / "flows.jsonl"
    sink = file_sink(ctx, out)
    receipts = write_all(sink, all_flows)
    assert all(r.done for r in receipts)  # acknowledged by write itself: appended, flushed, fsynced
    sink.close()

    data = out.read_bytes()
    lines = data.split(b"\n")
    assert lines[-1] == b"" and len(lines) - 1 == all_flows.num_rows == 1481
    for line in lines[:-1]:
        event = orjson.loads(line)
        assert set(event) >= {"flow", "time", "node_name"}
        assert event["flow"]["uuid"]
    result = decode_lines(data)
    assert result.errors == []
    assert result.batch.equals(all_flows)
    assert ctx.metrics.value("flowship_sink_bytes_total", sink="sink") == len(data)
    assert ctx.metrics.value("flowship_sink_batches_total", sink="sink", outcome="ok") == len(receipts)


def test_hubble_line_of_a_recorded_drop_keeps_its_fields(tmp_path, ctx, fixture_batches):
    out = tmp_path / "drops.jsonl"
    sink = file_sink(ctx, out)
    sink.write(Envelope(fixture_batches["cilium-docs-exporter-fieldmask-2-drops"], [Receipt()]))
    sink.close()
    second = orjson.loads(out.read_bytes().splitlines()[1])
    flow = second["flow"]
    assert second["time"] == flow["time"] == "2023-08-21T12:12:18.510175415Z"
    assert (flow["verdict"], flow["drop_reason_desc"], flow["IP"]["source"], flow["IP"]["destination"],
            flow["l4"]["TCP"]["source_port"], flow["l4"]["TCP"]["destination_port"]) == \
        ("DROPPED", "POLICY_DENIED", "10.244.1.60", "10.244.1.5", 44916, 80)


def test_appends_to_an_existing_file(tmp_path, ctx, fixture_batches):
    out = tmp_path / "flows.jsonl"
    batch = fixture_batches["hubble-otel-basic-sample-10-flows"]
    for _ in range(2):
        sink = file_sink(ctx, out)
        sink.write(Envelope(batch, [Receipt()]))
        sink.close()
    back = decode_lines(out.read_bytes()).batch
    assert back.num_rows == 20
    assert back.column("uuid").to_pylist() == batch.column("uuid").to_pylist() * 2


def test_ecs_lines_are_the_documents_of_the_elasticsearch_sink(tmp_path, ctx, all_flows):
    out = tmp_path / "ecs.jsonl"
    sink = file_sink(ctx, out, format="ecs")
    write_all(sink, all_flows)
    sink.close()
    lines = out.read_bytes().splitlines()
    docs = [orjson.loads(line) for line in lines]
    assert docs == ecs_encode.to_documents(all_flows)
    assert {d["event"]["dataset"] for d in docs} == {"flowship.flows"}
    back, bad = ecs_decode.decode_ndjson(lines)
    assert bad == []
    for column in ("uuid", "verdict", "ip_src", "ip_dst", "src_port", "dst_port", "l4_protocol", "dns_query",
                   "http_code"):
        assert back.column(column).to_pylist() == all_flows.column(column).to_pylist(), column
    assert back.column("time").cast(pa.int64()).equals(all_flows.column("time").cast(pa.int64()))


@pytest.mark.parametrize("fmt", ["hubble", "ecs"])
def test_aggregate_rows_drop_nulls_and_write_nine_fraction_digits(tmp_path, ctx, all_flows, fmt):
    rows = aggregate_rows(all_flows)
    out = tmp_path / "agg.jsonl"
    sink = file_sink(ctx, out, format=fmt)
    receipts = write_all(sink, rows, parts=3, kind="aggregates")
    sink.close()
    assert all(r.done for r in receipts)
    objects = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert len(objects) == rows.num_rows == 127
    if fmt == "ecs":
        assert objects == ecs_encode.aggregate_documents(rows)
        assert {o["event"]["dataset"] for o in objects} == {"flowship.aggregates"}
        return
    plain = rows.drop_columns(["window_start", "window_end", "first_seen", "last_seen"]).to_pylist()
    starts = rows.column("window_start").cast(pa.int64()).to_pylist()
    for obj, want, start in zip(objects, plain, starts, strict=True):
        assert None not in obj.values()
        assert {k: v for k, v in obj.items() if k not in ("window_start", "window_end", "first_seen",
                                                          "last_seen")} == \
            {k: v for k, v in want.items() if v is not None}
        for key in ("window_start", "window_end", "first_seen", "last_seen"):
            assert NINE_DIGITS.match(obj[key]), obj[key]
        assert obj["window_start"].endswith(f".{start % 10**9:09d}Z")
    assert list(objects[0])[:2] == ["window_start", "window_end"]  # schema order
    assert sum(o["flows"] for o in objects) == all_flows.num_rows


def test_aggregate_time_text_is_exact(tmp_path, ctx):
    """One row with a known window start: RFC 3339, UTC, nine digits, as docs/config.md shows."""
    start = 1_714_564_800 * 10**9  # 2024-05-01T12:00:00Z
    ts = pa.timestamp("ns", tz="UTC")
    row = pa.RecordBatch.from_pydict({"window_start": pa.array([start], ts),
                                      "window_end": pa.array([start + 60 * 10**9 + 5], ts),
                                      "verdict": ["FORWARDED"], "drop_reason": pa.array([None], pa.string()),
                                      "flows": [3.0]})
    out = tmp_path / "one.jsonl"
    sink = file_sink(ctx, out)
    sink.write(Envelope(row, [Receipt()], "aggregates"))
    sink.close()
    assert out.read_bytes() == (b'{"window_start":"2024-05-01T12:00:00.000000000Z",'
                                b'"window_end":"2024-05-01T12:01:00.000000005Z","verdict":"FORWARDED","flows":3.0}\n')


def test_fsync_comes_before_the_acknowledgement(tmp_path, ctx, fixture_batches, monkeypatch):
    events: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        events.append(f"fsync {Path(os.readlink(f'/proc/self/fd/{fd}')).name} {os.fstat(fd).st_size}")
        real_fsync(fd)

    monkeypatch.setattr(jsonl.os, "fsync", fsync)
    out = tmp_path / "flows.jsonl"
    sink = file_sink(ctx, out)
    sink.write(Envelope(fixture_batches["hubble-otel-basic-sample-5-dns-flows"],
                        [Receipt(on_done=lambda r: events.append(f"ack {out.stat().st_size}"))]))
    size = out.stat().st_size
    assert events == [f"fsync flows.jsonl {size}", f"ack {size}"]

    events.clear()
    unsynced = file_sink(ctx, tmp_path / "fast.jsonl", fsync=False)
    unsynced.write(Envelope(fixture_batches["hubble-otel-basic-sample-5-dns-flows"],
                            [Receipt(on_done=lambda r: events.append("ack"))]))
    assert events == ["ack"]
    assert decode_lines((tmp_path / "fast.jsonl").read_bytes()).batch.num_rows == 5  # flushed all the same


def test_rotation_by_size_keeps_max_backups(tmp_path, ctx, fixture_batches):
    batch = fixture_batches["hubble-otel-basic-sample-10-flows"]
    size = len(b"".join(jsonl.encode(batch, "flows", "hubble")))
    out = tmp_path / "flows.jsonl"
    sink = file_sink(ctx, out, max_bytes=int(size * 1.5), max_backups=2)
    for i in range(5):
        sink.write(Envelope(batch, [Receipt()]))
        assert out.stat().st_size == size, f"write {i}: one batch per file"
    sink.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flows.jsonl", "flows.jsonl.1", "flows.jsonl.2"]
    for name in ("flows.jsonl", "flows.jsonl.1", "flows.jsonl.2"):
        assert decode_lines((tmp_path / name).read_bytes()).batch.equals(batch)


def test_rotation_order_and_no_backups(tmp_path, ctx, fixture_batches):
    batches = [fixture_batches["hubble-otel-basic-sample-5-dns-flows"],
               fixture_batches["hubble-otel-basic-sample-5-http-flows"],
               fixture_batches["cilium-docs-exporter-fieldmask-2-drops"]]
    out = tmp_path / "flows.jsonl"
    sink = file_sink(ctx, out, max_bytes=1, max_backups=5)  # every batch starts a new file
    for batch in batches:
        sink.write(Envelope(batch, [Receipt()]))
    sink.close()
    uuids = {name: decode_lines((tmp_path / name).read_bytes()).batch.column("uuid").to_pylist()
             for name in ("flows.jsonl", "flows.jsonl.1", "flows.jsonl.2")}
    assert uuids == {"flows.jsonl": batches[2].column("uuid").to_pylist(),  # newest in the live file
                     "flows.jsonl.1": batches[1].column("uuid").to_pylist(),  # .1 is the newest backup
                     "flows.jsonl.2": batches[0].column("uuid").to_pylist()}

    lone = tmp_path / "lone" / "flows.jsonl"
    sink = file_sink(ctx, lone, max_bytes=1, max_backups=0)
    for batch in batches:
        sink.write(Envelope(batch, [Receipt()]))
    sink.close()
    assert [p.name for p in lone.parent.iterdir()] == ["flows.jsonl"]
    assert decode_lines(lone.read_bytes()).batch.equals(batches[2])


def test_stdout_sink_writes_each_batch_before_acknowledging(ctx, all_flows, monkeypatch):
    raw = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(raw))
    sink = StdoutSink(StdoutSinkConfig(), ctx)
    sink.start()
    receipts = []
    for start in range(0, all_flows.num_rows, 500):
        written = len(raw.getvalue())
        receipt = Receipt(on_done=lambda r, before=written: receipts.append(len(raw.getvalue()) > before))
        sink.write(Envelope(all_flows.slice(start, 500), [receipt]))
    sink.flush()
    sink.close()
    assert receipts == [True, True, True]  # the lines were in the stream when each batch was acknowledged
    assert decode_lines(raw.getvalue()).batch.equals(all_flows)


def test_stdout_sink_through_a_real_pipe(tmp_path, fixture_lines):
    """``flowship export`` from stdin to stdout: what comes out of the pipe decodes to what went in."""
    config = tmp_path / "c.yaml"
    config.write_text(f"data_dir: {tmp_path / 'state'}\nsources: [{{type: stdin}}]\nsinks: [{{type: stdout}}]\n")
    data = b"\n".join(fixture_lines) + b"\n"
    proc = subprocess.run([sys.executable, "-m", "flowship.cli", "export", "--config", str(config), "--no-progress"],
                          input=data, capture_output=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert decode_lines(proc.stdout).batch.equals(decode_lines(data).batch)


def test_format_must_be_hubble_or_ecs():
    with pytest.raises(ConfigError) as caught:
        load_text("sources: [{type: stdin}]\nsinks: [{type: stdout}, {type: file, format: csv}]\n", "c.yaml")
    assert "c.yaml: sinks[1].format: " in str(caught.value)
    assert "'csv'" in str(caught.value)
