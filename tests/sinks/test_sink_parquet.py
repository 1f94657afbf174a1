"""``parquet`` sink on its own: what lands on disk, where, when it becomes visible and when it is acknowledged.

Files are read back with pyarrow and compared value for value with the recorded
Hubble flows that went in; the Hive layout is the one docs/config.md documents
(``<path>/flows/dt=YYYY-MM-DD/hour=HH/*.parquet``, by the flow's own time in UTC).
"""

from __future__ import annotations

import time
import types
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import structlog
from helpers import aggregate_rows, generated_flows, record_durability

from flowship.components import Context
from flowship.config import ConfigError, load_text, parse
from flowship.pipeline.envelope import Envelope, Receipt
from flowship.sinks import parquet as parquet_module
from flowship.sinks import parquet_store as store_module
from flowship.sinks.parquet import ParquetSink, ParquetSinkConfig

HOUR_NS = 3600 * 10**9
TCP = "hubble-otel-basic-sample-400-tcp-flows"  # 400 flows within one hour


def new_sink(ctx: Context, root: Path, **options: object) -> ParquetSink:
    sink = ParquetSink(parse(ParquetSinkConfig, {"path": str(root), **options}, "t.yaml"), ctx)
    sink.start()
    return sink


def tracked(batch: pa.RecordBatch, kind: str = "flows") -> tuple[Envelope, Receipt]:
    receipt = Receipt(rows=batch.num_rows)
    return Envelope(batch, [receipt], kind), receipt


def published(root: Path, kind: str = "flows") -> list[Path]:
    return sorted(root.glob(f"{kind}/dt=*/hour=*/*.parquet"))


def read_all(files: list[Path], key: str = "uuid") -> pa.Table:
    table = pa.concat_tables(pq.read_table(f) for f in files)
    return table.sort_by(key)


def by_uuid(batch: pa.RecordBatch) -> pa.Table:
    return pa.Table.from_batches([batch]).sort_by("uuid")


def partition_of(ns: int) -> str:
    when = datetime.fromtimestamp(ns // 10**9, UTC)
    return f"dt={when:%Y-%m-%d}/hour={when:%H}"


def test_files_read_back_equal_the_recorded_flows(tmp_path, ctx, all_flows):
    sink = new_sink(ctx, tmp_path / "out")
    receipts = []
    for start in range(0, all_flows.num_rows, 400):
        env, receipt = tracked(all_flows.slice(start, 400))
        sink.write(env)
        receipts.append(receipt)
    sink.flush()
    sink.close()
    assert all(r.done for r in receipts)

    back = read_all(published(tmp_path / "out"))
    assert back.num_rows == all_flows.num_rows == 1481
    assert back.schema.equals(all_flows.schema)
    assert back.equals(by_uuid(all_flows))
    dropped = back.filter(pa.compute.is_in(back.column("uuid"), pa.array(["2524e21a-c1de-81d6-ae51-46f1e02607d3"])))
    row = dropped.drop_columns(["time", "start_time"]).to_pylist()[0]
    assert (row["verdict"], row["drop_reason"], row["ip_src"], row["ip_dst"], row["src_port"], row["dst_port"],
            row["l4_protocol"], row["node_name"]) == ("DROPPED", "POLICY_DENIED", "10.244.1.60", "10.244.1.5",
                                                      44916, 80, "TCP", "kind-kind/kind-worker")
    assert dropped.column("time").cast(pa.int64()).to_pylist() == [1692619938510175415]


def test_hive_partitions_follow_the_flow_time_in_utc_and_files_are_sorted_by_time(tmp_path, ctx, all_flows):
    sink = new_sink(ctx, tmp_path / "out")
    sink.write(Envelope(all_flows, [Receipt()]))
    sink.flush()

    times = all_flows.column("time").cast(pa.int64()).to_pylist()
    expected = {partition_of(t) for t in times}
    files = published(tmp_path / "out")
    assert {f"{f.parent.parent.name}/{f.parent.name}" for f in files} == expected
    assert len(expected) == 5  # the recordings span five hours
    for f in files:
        got = pq.read_table(f).column("time").cast(pa.int64()).to_pylist()
        assert got == sorted(got)
        assert {partition_of(t) for t in got} == {f"{f.parent.parent.name}/{f.parent.name}"}
        assert f.name.startswith(f"test-node-{got[0]}-")  # node name and first time in the file name

    # a Hive-aware reader sees the partition keys and every row
    dataset = ds.dataset(tmp_path / "out" / "flows", format="parquet", partitioning="hive")
    table = dataset.to_table(columns=["uuid", "dt", "hour"])
    assert table.num_rows == all_flows.num_rows
    by_id = dict(zip(all_flows.column("uuid").to_pylist(), times, strict=True))
    for uuid, dt, hour in zip(*(table.column(c).to_pylist() for c in ("uuid", "dt", "hour")), strict=True):
        assert partition_of(by_id[uuid]) == f"dt={dt}/hour={int(hour):02d}"


def test_day_boundary_goes_to_two_days(tmp_path, ctx):
    midnight = int(datetime(2024, 1, 1, tzinfo=UTC).timestamp()) * 10**9
    flows = generated_flows(2, start_ns=midnight - 1)
    flows = flows.set_column(flows.schema.get_field_index("time"), "time",
                             pa.array([midnight - 1, midnight], pa.timestamp("ns", tz="UTC")))
    sink = new_sink(ctx, tmp_path / "out")
    sink.write(Envelope(flows, [Receipt()]))
    sink.flush()
    names = [f"{f.parent.parent.name}/{f.parent.name}" for f in published(tmp_path / "out")]
    assert names == ["dt=2023-12-31/hour=23", "dt=2024-01-01/hour=00"]


def test_a_batch_over_two_hours_is_acknowledged_once_both_files_are_published(tmp_path, ctx):
    t0 = 1_700_000_000 * 10**9 // HOUR_NS * HOUR_NS  # the start of an hour
    flows = generated_flows(4, start_ns=t0)
    times = [t0 + 1, t0 + 2, t0 + 3, t0 + HOUR_NS + 5]
    flows = flows.set_column(flows.schema.get_field_index("time"), "time",
                             pa.array(times, pa.timestamp("ns", tz="UTC")))
    delivered: list[int] = []
    env, receipt = tracked(flows)
    env.on_ack = delivered.append
    sink = new_sink(ctx, tmp_path / "out", max_file_rows=3)
    sink.write(env)
    # the first hour reached max_file_rows and is published; the second still waits
    assert [f.parent.name for f in published(tmp_path / "out")] == [partition_of(t0).split("/")[1]]
    assert not receipt.done
    sink.flush()
    assert receipt.done
    assert sorted(delivered) == [1, 3]  # rows counted per published part, all four in the end


def test_files_appear_only_complete_under_their_final_name(tmp_path, ctx, fixture_batches, monkeypatch):
    """While a file is written only a dot-prefixed .tmp exists; the final name appears by rename."""
    root = tmp_path / "out"
    seen_while_writing: list[list[str]] = []
    real_write = pq.write_table

    def write_table(table: pa.Table, where: object, **kw: object) -> None:
        real_write(table, where, **kw)
        tmp = Path(where.name)
        final = tmp.with_name(tmp.name[1:-len(".tmp")])
        assert tmp.name.startswith(".") and tmp.name.endswith(".parquet.tmp")
        assert not final.exists(), "the final name existed before the rename"
        seen_while_writing.append(sorted(p.name for p in tmp.parent.iterdir() if not p.name.startswith(".")))
        for done in seen_while_writing[-1]:
            assert pq.read_metadata(tmp.parent / done).num_rows == 150  # earlier files: complete

    monkeypatch.setattr(pq, "write_table", write_table)
    sink = new_sink(ctx, root, max_file_rows=150)
    sink.write(Envelope(fixture_batches[TCP], [Receipt()]))
    sink.flush()
    assert [len(names) for names in seen_while_writing] == [0, 1, 2]  # 150 + 150 + 100 rows
    assert not list(root.rglob(".*.tmp"))


def test_acknowledged_only_after_file_rename_and_directory_are_fsynced(tmp_path, ctx, fixture_batches, monkeypatch):
    events = record_durability(monkeypatch, store_module)
    receipt = Receipt(on_done=lambda r: events.append(("ack", "")), rows=10)
    sink = new_sink(ctx, tmp_path / "out")
    sink.write(Envelope(fixture_batches[TCP].slice(0, 10), [receipt]))
    assert events == []  # buffered: nothing durable, nothing acknowledged
    sink.flush()
    [final] = published(tmp_path / "out")
    tmp_name = f".{final.name}.tmp"
    assert events == [("fsync", str(final.parent / tmp_name)), ("rename", f"{tmp_name} -> {final.name}"),
                      ("fsync", str(final.parent)), ("ack", "")]


def test_fsync_false_skips_fsync_but_still_renames(tmp_path, ctx, all_flows, monkeypatch):
    calls: list[int] = []
    monkeypatch.setattr(store_module.os, "fsync", calls.append)
    sink = new_sink(ctx, tmp_path / "out", fsync=False)
    env, receipt = tracked(all_flows.slice(0, 50))
    sink.write(env)
    sink.flush()
    assert calls == []
    assert receipt.done
    assert read_all(published(tmp_path / "out")).num_rows == 50


def test_a_failed_write_acknowledges_nothing_and_the_next_start_removes_its_tmp(tmp_path, ctx, all_flows,
                                                                                monkeypatch):
    root = tmp_path / "out"
    first = new_sink(ctx, root)
    first.write(Envelope(all_flows.slice(0, 100), [Receipt()]))
    first.flush()
    good = published(root)

    def torn(table: pa.Table, where: object, **kw: object) -> None:
        where.write(b"PAR1 half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pq, "write_table", torn)
    second = new_sink(ctx, root)
    env, receipt = tracked(all_flows.slice(100, 100))
    second.write(env)
    with pytest.raises(OSError, match="No space left"):
        second.flush()
    assert not receipt.done
    assert published(root) == good
    leftovers = list(root.rglob(".*.tmp"))
    assert len(leftovers) == 1
    # Parquet readers skip the dot-prefixed leftover
    assert ds.dataset(root / "flows", format="parquet", partitioning="hive").to_table().num_rows == 100

    monkeypatch.undo()
    with structlog.testing.capture_logs() as logs:
        new_sink(ctx, root)
    assert not list(root.rglob(".*.tmp"))
    assert published(root) == good
    assert [e["file"] for e in logs if e["event"] == "removing unpublished file from an earlier run"] == \
        [str(leftovers[0])]


def test_max_file_rows_caps_every_file(tmp_path, ctx, all_flows):
    sink = new_sink(ctx, tmp_path / "out", max_file_rows=100, row_group_rows=40)
    for start in range(0, all_flows.num_rows, 250):
        sink.write(Envelope(all_flows.slice(start, 250), [Receipt()]))
    assert sink.files_written, "a partition that reaches max_file_rows is published at once"
    sink.flush()
    files = published(tmp_path / "out")
    for f in files:
        meta = pq.ParquetFile(f).metadata
        assert meta.num_rows <= 100
        assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)][:-1] == \
            [40] * (meta.num_row_groups - 1)
    assert read_all(files).equals(by_uuid(all_flows))
    assert ctx.metrics.value("flowship_sink_batches_total", sink="sink", outcome="file_written") == len(files)
    assert ctx.metrics.value("flowship_sink_bytes_total", sink="sink") == sum(f.stat().st_size for f in files)


def test_max_buffer_bytes_publishes_early(tmp_path, ctx, fixture_batches):
    one_hour = fixture_batches[TCP]
    part = one_hour.slice(0, 100)
    sink = new_sink(ctx, tmp_path / "out", max_buffer_bytes=part.nbytes * 2)
    env1, r1 = tracked(part)
    sink.write(env1)
    assert not r1.done and sink.files_written == []
    env2, r2 = tracked(part)
    sink.write(env2)
    assert r1.done and r2.done
    assert len(sink.files_written) == 1


def test_max_file_age_publishes_a_partly_filled_file_on_tick(tmp_path, ctx, all_flows, monkeypatch):
    offset = [0.0]
    clock = types.SimpleNamespace(monotonic=lambda: time.monotonic() + offset[0], perf_counter=time.perf_counter)
    monkeypatch.setattr(parquet_module, "time", clock)
    sink = new_sink(ctx, tmp_path / "out", max_file_age="60s")
    env, receipt = tracked(all_flows.slice(0, 30))
    sink.write(env)
    sink.tick(time.time_ns())
    assert not receipt.done and published(tmp_path / "out") == []
    offset[0] = 61.0
    sink.tick(time.time_ns())
    assert receipt.done
    assert read_all(published(tmp_path / "out")).num_rows == 30


def test_aggregate_rows_go_to_their_own_dataset(tmp_path, ctx, all_flows):
    rows = aggregate_rows(all_flows)
    sink = new_sink(ctx, tmp_path / "out")
    env, receipt = tracked(rows, "aggregates")
    sink.write(env)
    sink.flush()
    assert receipt.done
    assert published(tmp_path / "out", "flows") == []
    files = published(tmp_path / "out", "aggregates")
    starts = rows.column("window_start").cast(pa.int64()).to_pylist()
    assert {f"{f.parent.parent.name}/{f.parent.name}" for f in files} == {partition_of(t) for t in starts}
    back = pa.concat_tables(pq.read_table(f) for f in files)
    keys = ["window_start", "node_name", "src_namespace", "src_workload", "dst_namespace", "dst_workload",
            "server_port", "l4_protocol", "verdict", "drop_reason", "http_method", "http_status_class"]
    order = [(k, "ascending") for k in keys]
    assert back.sort_by(order).equals(pa.Table.from_batches([rows]).sort_by(order))
    assert sum(back.column("flows").to_pylist()) == all_flows.num_rows


@pytest.mark.parametrize(("compression", "codec"), [("zstd", "ZSTD"), ("snappy", "SNAPPY"), ("none", "UNCOMPRESSED")])
def test_compression_and_dictionary_columns_are_as_configured(tmp_path, ctx, all_flows, compression, codec):
    sink = new_sink(ctx, tmp_path / "out", compression=compression, dictionary_columns=["verdict"])
    sink.write(Envelope(all_flows, [Receipt()]))
    sink.flush()
    meta = pq.ParquetFile(published(tmp_path / "out")[0]).metadata
    names = meta.schema.names
    group = meta.row_group(0)
    assert {group.column(i).compression for i in range(group.num_columns)} == {codec}
    assert "RLE_DICTIONARY" in group.column(names.index("verdict")).encodings
    assert "RLE_DICTIONARY" not in group.column(names.index("uuid")).encodings


@pytest.mark.parametrize(("option", "message"), [
    ("compression: lzma", "c.yaml: sinks[0].compression: expected one of zstd, snappy, gzip, lz4, brotli, none; "
                          "got 'lzma'"),
    ("max_file_rows: 0", "c.yaml: sinks[0].max_file_rows: expected an integer >= 1, got 0"),
    ("row_group_rows: -5", "c.yaml: sinks[0].row_group_rows: expected an integer >= 1, got -5"),
    ("max_buffer_bytes: lots", "c.yaml: sinks[0].max_buffer_bytes: "),
    ("fsync: sometimes", "c.yaml: sinks[0].fsync: "),
])
def test_config_errors_name_the_key_path(option, message):
    with pytest.raises(ConfigError) as caught:
        load_text(f"sources: [{{type: stdin}}]\nsinks:\n  - type: parquet\n    {option}\n", "c.yaml")
    assert message in str(caught.value), str(caught.value)


def test_rows_in_time_order_or_shuffled_give_the_same_sorted_file(tmp_path, ctx):
    flows = pa.Table.from_batches([generated_flows(3000, start_ns=1_700_000_000 * 10**9, spread_s=60.0)])
    in_order = flows.sort_by("time")
    shuffled = in_order.take(pa.array(list(range(1, 3000, 2)) + list(range(0, 3000, 2))))
    tables = []
    for name, table in (("in_order", in_order), ("shuffled", shuffled)):
        sink = new_sink(ctx, tmp_path / name, row_group_rows=1000)
        for batch in table.to_batches(max_chunksize=700):
            sink.write(Envelope(batch, [Receipt()]))
        sink.flush()
        [file] = published(tmp_path / name)
        assert pq.ParquetFile(file).metadata.num_row_groups == 3
        tables.append(pq.read_table(file))
    got = tables[0].column("time").cast(pa.int64()).to_pylist()
    assert got == sorted(got)
    assert tables[0].equals(tables[1]) and tables[0].equals(in_order)
