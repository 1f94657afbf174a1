"""The aggregate stage: exact sums, percentiles within the documented error, windows and receipts."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from stage_helpers import T0, columns_batch, make_flows, new_context

from flowship.config import ConfigError, load_text
from flowship.model.aggregate_schema import aggregate_schema
from flowship.model.ids import connection_hashes
from flowship.pipeline.envelope import Envelope, Receipt
from flowship.stages.aggregate import RELATIVE_ERROR, AggregateConfig, AggregateStage

SEC = 1_000_000_000
GROUP_BY = ["src_namespace", "dst_port", "verdict", "http_status_class"]


def random_flows(rng: np.random.Generator, n: int, span_s: int = 300, weighted: bool = True) -> pa.RecordBatch:
    namespaces = np.array(["shop", "kube-system", "monitoring", None], dtype=object)
    return columns_batch(
        n,
        time=T0 + rng.integers(0, span_s * SEC, n),
        node_name=rng.choice(np.array(["node-a", "node-b"], dtype=object), n).tolist(),
        src_namespace=rng.choice(namespaces, n).tolist(),
        dst_port=rng.choice([80, 443, 53], n).tolist(),
        verdict=rng.choice(np.array(["FORWARDED", "DROPPED"], dtype=object), n, p=[0.9, 0.1]).tolist(),
        http_code=[int(c) if c else None for c in rng.choice([0, 200, 404, 503], n)],
        ip_src=[f"10.0.0.{i}" for i in rng.integers(1, 40, n)],
        ip_dst=[f"10.0.1.{i}" for i in rng.integers(1, 5, n)],
        src_port=rng.integers(30000, 30050, n).tolist(),
        l4_protocol=["TCP"] * n,
        bytes=rng.integers(0, 10_000, n).tolist(),
        packets=rng.integers(0, 20, n).tolist(),
        reply_bytes=[int(x) if x >= 0 else None for x in rng.integers(-5, 5000, n)],
        reply_packets=rng.integers(0, 10, n).tolist(),
        l7_latency_ns=[int(x) if rng.random() < 0.6 else None for x in rng.lognormal(15, 2, n)],
        sample_rate=(rng.choice([1, 10], n) if weighted else np.ones(n, dtype=np.int64)).tolist(),
    )


def run(batches: list[pa.RecordBatch], ticks: list[int | None] | None = None, compact_rows: int | None = None,
        **cfg) -> tuple[pa.Table, object]:
    """Feed batches (ticking after each when asked), close, and return every emitted row."""
    ctx = new_context("agg")
    stage = AggregateStage(AggregateConfig(**cfg), ctx)
    if compact_rows is not None:
        stage.compact_rows = compact_rows  # merge partial state often, to exercise merging
    outputs: list[Envelope] = []
    for i, batch in enumerate(batches):
        outputs += stage.process(Envelope(batch, [Receipt()]))
        if ticks and ticks[i] is not None:
            outputs += stage.tick(ticks[i])
    outputs += stage.close()
    assert all(env.kind == "aggregates" for env in outputs)
    schema = aggregate_schema(cfg.get("group_by", AggregateConfig().group_by))
    for env in outputs:
        assert env.batch.schema == schema
    return pa.Table.from_batches([env.batch for env in outputs], schema=schema), ctx


def plain(data: pa.Table | pa.RecordBatch) -> pa.Table | pa.RecordBatch:
    """Without timestamp columns (their Python values need pandas for nanoseconds)."""
    keep = [f.name for f in data.schema if not pa.types.is_timestamp(f.type)]
    return data.select(keep)


def total(table: pa.Table, column: str) -> float:
    return float(np.nansum(table.column(column).to_numpy(zero_copy_only=False).astype(np.float64)))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31), n=st.integers(1, 3000), pieces=st.integers(1, 6),
       window=st.sampled_from([10, 60, 90]), tick_every=st.sampled_from([None, 1, 2]))
def test_sums_are_preserved(seed, n, pieces, window, tick_every):
    rng = np.random.default_rng(seed)
    batch = random_flows(rng, n)
    # arrival order differs from flow time; some batches arrive after their window closed
    order = rng.permutation(n)
    batch = batch.take(pa.array(order))
    cuts = np.sort(rng.choice(np.arange(1, n), size=min(pieces - 1, n - 1), replace=False)) if n > 1 else []
    bounds = [0, *cuts.tolist(), n] if len(cuts) else [0, n]
    batches = [batch.slice(a, b - a) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    ticks = None
    if tick_every:
        ticks = [T0 + (i + 1) * 60 * SEC if i % tick_every == 0 else None for i in range(len(batches))]
    out, ctx = run(batches, ticks, compact_rows=int(rng.integers(1, 500)), window=window, group_by=GROUP_BY,
                   allowed_lateness=5)
    assert total(out, "flows_raw") == n
    for column in ("bytes", "packets", "reply_packets"):
        assert total(out, column) == float(np.asarray(batch.column(column).fill_null(0)).sum())
    assert total(out, "reply_bytes") == float(np.asarray(batch.column("reply_bytes").fill_null(0)).sum())
    weights = np.asarray(batch.column("sample_rate")).astype(np.float64)
    assert total(out, "flows") == pytest.approx(weights.sum())
    assert total(out, "bytes_estimate") == pytest.approx(float((np.asarray(batch.column("bytes")) * weights).sum()))
    lat = batch.column("l7_latency_ns")
    assert total(out, "latency_samples") == n - lat.null_count
    late = ctx.metrics.value("flowship_aggregate_late_flows_total")
    assert total(out, "late_flows") == late
    if not tick_every:
        assert late == 0


def reference_groups(batch: pa.RecordBatch, window_ns: int) -> dict:
    rows = plain(batch).to_pydict()
    conn = connection_hashes(batch)
    times = np.asarray(batch.column("time").cast(pa.int64()))
    groups: dict = defaultdict(lambda: {"lat": [], "conns": set(), "times": []})
    for i in range(batch.num_rows):
        code = rows["http_code"][i]
        cls = f"{code // 100}xx" if code and 1 <= code // 100 <= 5 else None
        key = ((times[i] // window_ns) * window_ns, rows["node_name"][i] or "test-node", rows["src_namespace"][i],
               rows["dst_port"][i], rows["verdict"][i], cls)
        g = groups[key]
        if rows["l7_latency_ns"][i]:
            g["lat"].append(rows["l7_latency_ns"][i])
        g["conns"].add(int(conn[i]))
        g["times"].append(int(times[i]))
    return groups


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_groups_connections_and_percentiles(seed):
    rng = np.random.default_rng(seed)
    batch = random_flows(rng, 4000, weighted=False)
    pieces = [batch.slice(i, 500) for i in range(0, batch.num_rows, 500)]
    out, _ = run(pieces, compact_rows=seed * 300, window=60, group_by=GROUP_BY)
    ref = reference_groups(batch, 60 * SEC)
    rows = plain(out).to_pydict()
    starts = np.asarray(out.column("window_start").cast(pa.int64()))
    firsts = np.asarray(out.column("first_seen").cast(pa.int64()))
    lasts = np.asarray(out.column("last_seen").cast(pa.int64()))
    assert out.num_rows == len(ref)
    checked = 0
    for i in range(out.num_rows):
        key = (starts[i], rows["node_name"][i], rows["src_namespace"][i], rows["dst_port"][i], rows["verdict"][i],
               rows["http_status_class"][i])
        g = ref[key]
        assert rows["connections"][i] == len(g["conns"])
        assert firsts[i] == min(g["times"]) and lasts[i] == max(g["times"])
        assert rows["latency_samples"][i] == len(g["lat"])
        if not g["lat"]:
            assert rows["latency_p50_ns"][i] is None and rows["latency_max_ns"][i] is None
            continue
        values = np.array(g["lat"], dtype=np.float64)
        assert rows["latency_max_ns"][i] == int(values.max())
        for column, q in (("latency_p50_ns", 0.5), ("latency_p95_ns", 0.95), ("latency_p99_ns", 0.99)):
            exact = float(np.quantile(values, q, method="inverted_cdf"))
            assert abs(rows[column][i] / exact - 1) <= RELATIVE_ERROR + 1e-6, (column, rows[column][i], exact)
            checked += 1
    assert checked > 50


def test_weighted_percentiles():
    # 9 fast flows sampled 1:1 and one slow flow that stands for 100 flows: p50 is the slow one
    rows = [{"l7_latency_ns": 1_000_000, "sample_rate": 1} for _ in range(9)]
    rows.append({"l7_latency_ns": 50_000_000, "sample_rate": 100})
    out, _ = run([make_flows(rows)], group_by=["verdict"])
    assert out.column("flows").to_pylist() == [109.0]
    p50 = out.column("latency_p50_ns")[0].as_py()
    assert abs(p50 / 50_000_000 - 1) <= RELATIVE_ERROR
    assert out.column("latency_max_ns").to_pylist() == [50_000_000]


def test_windows_close_on_tick_and_late_flows_count():
    ctx = new_context("agg")
    stage = AggregateStage(AggregateConfig(window=60, allowed_lateness=10, group_by=["verdict"]), ctx)
    base = (T0 // (60 * SEC)) * 60 * SEC
    first = make_flows([{"time": base + 5 * SEC, "verdict": "FORWARDED"},
                        {"time": base + 61 * SEC, "verdict": "FORWARDED"}])
    receipt = Receipt()
    assert stage.process(Envelope(first, [receipt])) == []
    assert stage.tick(base + 69 * SEC) == []  # window 0 ends at 60s, lateness 10s: not yet
    emitted = stage.tick(base + 70 * SEC)
    assert [e.batch.column("flows_raw").to_pylist() for e in emitted] == [[1]]
    assert not receipt.done  # the second window still holds it
    late = make_flows([{"time": base + 30 * SEC, "verdict": "FORWARDED"},
                       {"time": base + 65 * SEC, "verdict": "DROPPED"}])
    stage.process(Envelope(late, [Receipt()]))
    assert ctx.metrics.value("flowship_aggregate_late_flows_total") == 1
    again = stage.tick(base + 71 * SEC)
    assert len(again) == 1
    assert again[0].batch.column("late_flows").to_pylist() == [1]
    assert again[0].batch.column("window_start").cast(pa.int64()).to_pylist() == [base]
    rest = stage.close()
    assert len(rest) == 1
    assert sorted(rest[0].batch.column("verdict").to_pylist()) == ["DROPPED", "FORWARDED"]
    assert rest[0].batch.column("late_flows").to_pylist() == [0, 0]
    for env in emitted + again + rest:
        env.ack()
    assert receipt.done


def test_event_clock_for_replays():
    base = (T0 // (60 * SEC)) * 60 * SEC
    ctx = new_context("agg")
    stage = AggregateStage(AggregateConfig(window=60, allowed_lateness=0, clock="event", group_by=[]), ctx)
    stage.process(Envelope(make_flows([{"time": base + s * SEC} for s in (1, 59, 61, 119, 125)]), [Receipt()]))
    out = stage.tick(10**19)  # the wall clock does not matter
    assert [e.batch.column("flows_raw").to_pylist() for e in out] == [[2], [2]]
    assert [e.batch.column("flows_raw").to_pylist() for e in stage.close()] == [[1]]


def test_receipts_retained_per_window_until_outputs_acked():
    base = (T0 // (60 * SEC)) * 60 * SEC
    done = []
    stage = AggregateStage(AggregateConfig(window=60, group_by=["verdict"]), new_context("agg"))
    r1 = Receipt(on_done=lambda r: done.append("r1"))
    r2 = Receipt(on_done=lambda r: done.append("r2"))
    stage.process(Envelope(make_flows([{"time": base + 1 * SEC}, {"time": base + 70 * SEC},
                                       {"time": base + 130 * SEC}]), [r1]))
    stage.process(Envelope(make_flows([{"time": base + 80 * SEC}]), [r2]))
    assert r1._count == 3 and r2._count == 1  # one reference per window each batch touched
    outs = stage.close()
    assert [len(e.receipts) for e in outs] == [1, 2, 1]
    outs[0].ack()
    outs[2].ack()
    assert done == []
    outs[1].ack()
    assert sorted(done) == ["r1", "r2"]


def test_empty_input_releases_at_once():
    stage = AggregateStage(AggregateConfig(), new_context("agg"))
    receipt = Receipt()
    assert stage.process(Envelope(make_flows([]), [receipt])) == []
    assert receipt.done
    passthrough = Envelope(make_flows([{}]), [Receipt()], kind="aggregates")
    assert stage.process(passthrough) == [passthrough]


def test_max_groups_overflow():
    ctx = new_context("agg")
    rows = [{"dst_port": p, "bytes": 10} for p in (1, 2, 3, 4, 5, 1, 5)]
    stage = AggregateStage(AggregateConfig(group_by=["dst_port"], max_groups=3), ctx)
    stage.process(Envelope(make_flows(rows[:3]), [Receipt()]))
    stage.process(Envelope(make_flows(rows[3:]), [Receipt()]))
    (env,) = stage.close()
    rows = sorted(plain(env.batch).to_pylist(), key=lambda r: (r["dst_port"] is None, r["dst_port"]))
    assert [(r["dst_port"], r["overflow"], r["flows_raw"]) for r in rows] == [
        (1, False, 2), (2, False, 1), (3, False, 1), (None, True, 3)]
    assert sum(r["bytes"] for r in rows) == 70
    assert ctx.metrics.value("flowship_aggregate_overflow_flows_total") == 3


def test_fixtures(all_fixture_flows):
    out, _ = run([all_fixture_flows], window=60, group_by=["src_namespace", "l4_protocol", "verdict",
                                                           "http_status_class", "server_port"])
    assert total(out, "flows_raw") == 1518
    rows = plain(out).to_pylist()
    http_5xx = sum(r["flows_raw"] for r in rows if r["http_status_class"] == "5xx")
    assert http_5xx == 153
    dropped = sum(r["flows_raw"] for r in rows if r["verdict"] == "DROPPED")
    assert dropped == 2
    # replies group with their requests under server_port (the Prometheus scrapes of :9990)
    assert sum(r["flows_raw"] for r in rows if r["server_port"] == 9990) > 0
    assert all(r["server_port"] != 48532 for r in rows)
    with_latency = [r for r in rows if r["latency_samples"]]
    assert with_latency and all(r["latency_p50_ns"] <= r["latency_p99_ns"] <= r["latency_max_ns"]
                                for r in with_latency)


def test_config_validation():
    with pytest.raises(ConfigError) as err:
        load_text("stages:\n  - type: aggregate\n    window: 0s\n    group_by: [src_namespace, src_labels, bogus]\n",
                  "f.yaml")
    problems = err.value.problems
    assert "f.yaml: stages[0].window: expected a positive duration, got 0.0" in problems
    assert any(p.startswith("f.yaml: stages[0].group_by[1]: 'src_labels' is not a groupable") for p in problems)
    assert any(p.startswith("f.yaml: stages[0].group_by[2]: 'bogus'") for p in problems)
