"""The ``aggregate`` stage: tumbling-window flow counts per group key.

Rows are assigned to the window ``[floor(time / window) * window, + window)``
and grouped by ``node_name`` plus ``group_by``. Each incoming batch is
reduced with Arrow's hash group-by into partial sums per (window, group);
the partials are kept per window and merged (again with group-by) when they
grow, and once more when the window is emitted. Group identity is a 64-bit
hash of the key values (computed per distinct value), so window state is a
few numpy arrays and Arrow tables, never Python objects per flow.

A window is emitted on ``tick(now)`` once ``now >= window_end +
allowed_lateness`` (``clock: wall``, the default, uses the wall clock handed
to tick; ``clock: event`` uses the newest flow time seen, for replays), and
on ``close()``. Flows for a window that was already emitted are not lost:
they open the window again, are emitted at the next tick as extra rows for
the same window and key (sums stay additive) and are counted in
``late_flows`` and ``flowship_aggregate_late_flows_total``.

Latency percentiles come from a log-bucketed histogram with 16 buckets per
power of two: the estimate is the geometric middle of the bucket holding the
(sample_rate-weighted) inverted-CDF quantile, clamped to the group's min/max,
so it is within 2^(1/32) - 1 = 2.2 % of the exact quantile.

Delivery: the receipts of every input envelope are retained once per window
its rows fell into and travel with that window's output envelope, so a
source never checkpoints past flows whose aggregate rows are not delivered.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from flowship.components import Stage
from flowship.config import Duration
from flowship.model.aggregate_schema import (
    DEFAULT_GROUP_BY,
    DERIVED_KEYS,
    aggregate_schema,
    groupable_columns,
    key_columns,
    key_type,
)
from flowship.model.columns import as_array, uint_values
from flowship.model.ids import connection_hashes, mix64
from flowship.pipeline.envelope import Envelope, Receipt

BUCKETS_PER_OCTAVE = 16
RELATIVE_ERROR = 2 ** (1 / (2 * BUCKETS_PER_OCTAVE)) - 1
QUANTILES = (("latency_p50_ns", 0.5), ("latency_p95_ns", 0.95), ("latency_p99_ns", 0.99))
OVERFLOW_KEY = np.uint64(0)
_NULL_HASH = np.uint64(0x9E3779B97F4A7C15)
_STATUS_CLASSES = pa.array([None, "1xx", "2xx", "3xx", "4xx", "5xx"], pa.string())
_COUNTERS = ("bytes", "packets", "reply_bytes", "reply_packets")


def _hash_text(value: str) -> int:
    return int.from_bytes(hashlib.blake2b(value.encode(), digest_size=8).digest(), "little")


def column_hash(column: pa.Array) -> np.ndarray:
    """A 64-bit hash of every value of one key column (nulls hash to a constant)."""
    column = as_array(column)
    n = len(column)
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        encoded = pc.dictionary_encode(column)
        table = np.array([_hash_text(v) for v in encoded.dictionary.to_pylist()] + [int(_NULL_HASH)],
                         dtype=np.uint64)
        idx = encoded.indices.fill_null(-1).to_numpy(zero_copy_only=False) if n else np.zeros(0, np.int64)
        return table[idx]
    if pa.types.is_timestamp(column.type):
        column = column.cast(pa.int64())
    values = column.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64).view(np.uint64)
    hashed = mix64(values ^ np.uint64(0x5851F42D4C957F2D))
    if column.null_count:
        hashed[~column.is_valid().to_numpy(zero_copy_only=False)] = _NULL_HASH
    return hashed


def http_status_class(batch: pa.RecordBatch) -> pa.Array:
    """"2xx", "5xx"... from http_code; null when there is no (valid) code."""
    code = uint_values(batch.column("http_code"))
    cls = code // 100
    cls[(cls < 1) | (cls > 5)] = 0
    return _STATUS_CLASSES.take(pa.array(cls))


def server_port(batch: pa.RecordBatch) -> pa.Array:
    """The service side's port: dst_port, or src_port on reply flows."""
    reply = batch.column("is_reply").fill_null(False)
    return pc.if_else(reply, batch.column("src_port"), batch.column("dst_port"))


def latency_bucket(latency_ns: np.ndarray) -> np.ndarray:
    return np.floor(np.log2(latency_ns.astype(np.float64)) * BUCKETS_PER_OCTAVE).astype(np.int32)


def bucket_value(bucket: np.ndarray) -> np.ndarray:
    """Geometric middle of a latency bucket."""
    return np.exp2((bucket.astype(np.float64) + 0.5) / BUCKETS_PER_OCTAVE)


def weighted_quantiles(keys: np.ndarray, buckets: np.ndarray, weights: np.ndarray,
                       quantiles: tuple[float, ...]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Per key: the bucket holding each inverted-CDF quantile. Inputs need not be sorted."""
    if len(keys) == 0:
        return keys, [np.zeros(0, dtype=np.int32) for _ in quantiles]
    order = np.lexsort((buckets, keys))
    keys, buckets, weights = keys[order], buckets[order], weights[order]
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    ends = np.r_[starts[1:], len(keys)]
    cum = np.cumsum(weights)
    before = cum[starts] - weights[starts]
    total = cum[ends - 1] - before
    out = []
    for q in quantiles:
        target = before + q * total
        idx = np.searchsorted(cum, target - 1e-9 * np.maximum(total, 1.0), side="left")
        idx = np.clip(idx, starts, ends - 1)
        out.append(buckets[idx])
    return keys[starts], out


@dataclass
class AggregateConfig:
    """``type: aggregate`` — tumbling windows of flow counts per group."""

    window: Duration = Duration(60.0)
    group_by: list[str] = field(default_factory=lambda: list(DEFAULT_GROUP_BY))
    allowed_lateness: Duration = Duration(10.0)
    max_groups: int = 100_000
    clock: Literal["wall", "event"] = "wall"

    def validate(self) -> list[str]:
        problems = []
        if self.window is not None and float(self.window) <= 0:
            problems.append(f"window: expected a positive duration, got {self.window}")
        if self.allowed_lateness is not None and float(self.allowed_lateness) < 0:
            problems.append(f"allowed_lateness: expected a duration >= 0, got {self.allowed_lateness}")
        if isinstance(self.max_groups, int) and self.max_groups < 1:
            problems.append(f"max_groups: expected an integer >= 1, got {self.max_groups}")
        known = set(groupable_columns())
        for i, name in enumerate(self.group_by or []):
            if name not in known:
                problems.append(f"group_by[{i}]: {name!r} is not a groupable flow column "
                                f"(scalar FLOW_SCHEMA columns or {', '.join(DERIVED_KEYS)})")
        return problems


@dataclass
class _Window:
    """State of one open window: admitted keys, partial aggregates, receipts."""

    start: int
    known: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.uint64))
    keys: list[pa.Table] = field(default_factory=list)
    metrics: list[pa.Table] = field(default_factory=list)
    connections: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    latency: list[pa.Table] = field(default_factory=list)
    pending_rows: int = 0
    compact_at: int = 262144  # merge partials beyond this many rows (doubles with the state: amortised)
    receipts: list[Receipt] = field(default_factory=list)
    has_overflow: bool = False


_METRIC_AGGS = [
    ("weight", "sum"), ("weight", "count"), ("bytes", "sum"), ("packets", "sum"), ("reply_bytes", "sum"),
    ("reply_packets", "sum"), ("bytes_w", "sum"), ("packets_w", "sum"), ("t", "min"), ("t", "max"),
    ("late", "sum"), ("lat", "count"), ("lat", "min"), ("lat", "max"),
]
# how partial columns combine when partials are merged
_MERGE = {"weight_sum": "sum", "weight_count": "sum", "bytes_sum": "sum", "packets_sum": "sum",
          "reply_bytes_sum": "sum", "reply_packets_sum": "sum", "bytes_w_sum": "sum", "packets_w_sum": "sum",
          "t_min": "min", "t_max": "max", "late_sum": "sum", "lat_count": "sum", "lat_min": "min", "lat_max": "max"}


def _reduce_metrics(table: pa.Table) -> pa.Table:
    merged = table.group_by("kh", use_threads=False).aggregate([(c, op) for c, op in _MERGE.items()])
    return pa.table({"kh": merged.column("kh"), **{c: merged.column(f"{c}_{op}") for c, op in _MERGE.items()}})


def _distinct_connections(kh: np.ndarray, pair: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(group key, group-and-connection hash) without repeated pairs."""
    pair, first = np.unique(pair, return_index=True)
    return kh[first], pair


def _merge_connections(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    if len(parts) == 1:
        return parts[0]
    return _distinct_connections(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))


def _reduce_latency(table: pa.Table) -> pa.Table:
    merged = table.group_by(["kh", "bucket"], use_threads=False).aggregate([("w", "sum")])
    return pa.table({"kh": merged.column("kh"), "bucket": merged.column("bucket"), "w": merged.column("w_sum")})


def _merged(parts: list[pa.Table], reduce: Any) -> pa.Table:
    """Partials of one window combined into one table (already reduced if there is one part)."""
    return parts[0] if len(parts) == 1 else reduce(pa.concat_tables(parts))


def _lookup_sorted(kh: np.ndarray, keys: np.ndarray, values: np.ndarray, default: Any) -> np.ndarray:
    """values[keys == kh] for each kh (``keys`` sorted and unique), ``default`` where absent."""
    out = np.full(len(kh), default, dtype=values.dtype if len(values) else np.float64)
    if len(keys) == 0:
        return out
    pos = np.clip(np.searchsorted(keys, kh), 0, len(keys) - 1)
    hit = keys[pos] == kh
    out[hit] = values[pos[hit]]
    return out


class AggregateStage(Stage):
    """Turns flow envelopes into aggregate envelopes, one per emitted window."""

    def __init__(self, config: AggregateConfig, ctx: Any) -> None:
        super().__init__(config, ctx)
        self.window_ns = int(round(float(config.window) * 1e9))
        self.lateness_ns = int(round(float(config.allowed_lateness) * 1e9))
        self.keys = key_columns(config.group_by)
        self.schema = aggregate_schema(config.group_by)
        self.windows: dict[int, _Window] = {}
        self.compact_rows = 262144  # first merge of a window's partials; later ones at twice the merged size
        self.closed_through: int | None = None  # windows ending at or before this were emitted
        self.max_event_ns: int | None = None
        self._late = ctx.metrics.counter("flowship_aggregate_late_flows_total",
                                         "Flows that arrived after their window was emitted.", ["stage"]).labels(ctx.name)
        self._overflow = ctx.metrics.counter("flowship_aggregate_overflow_flows_total",
                                             "Flows counted in the overflow group (beyond max_groups).",
                                             ["stage"]).labels(ctx.name)
        self._rows_out = ctx.metrics.counter("flowship_aggregate_rows_total",
                                             "Aggregate rows emitted.", ["stage"]).labels(ctx.name)
        self._open = ctx.metrics.gauge("flowship_aggregate_open_groups",
                                       "Groups held in open windows.", ["stage"]).labels(ctx.name)

    # -------------------------------------------------------------------------------- input
    def key_values(self, batch: pa.RecordBatch) -> list[pa.Array]:
        out = []
        for name in self.keys:
            if name == "http_status_class":
                out.append(http_status_class(batch))
            elif name == "server_port":
                out.append(server_port(batch))
            elif name == "node_name":
                out.append(batch.column("node_name").fill_null(self.ctx.node_name))
            else:
                out.append(batch.column(name))
        return out

    def _key_hash(self, values: list[pa.Array]) -> np.ndarray:
        # column hashes are already well mixed: combine them FNV-style, mix once at the end
        h = np.full(len(values[0]), np.uint64(0xCBF29CE484222325), dtype=np.uint64)
        with np.errstate(over="ignore"):
            for col in values:
                h ^= column_hash(col)
                h *= np.uint64(0x100000001B3)
        h = mix64(h)
        h[h == OVERFLOW_KEY] = np.uint64(1)
        return h

    def process(self, env: Envelope) -> list[Envelope]:
        if env.kind != "flows":
            return [env]
        touched = self.ingest(env.batch) if env.batch.num_rows else []
        for window in touched:
            for receipt in env.receipts:
                receipt.retain()
                window.receipts.append(receipt)
        env.ack()  # the input itself is done; the windows hold it from here
        return []

    def ingest(self, batch: pa.RecordBatch) -> list[_Window]:
        """Fold a flow batch into window state; returns the windows it touched."""
        n = batch.num_rows
        t = batch.column("time").cast(pa.int64()).to_numpy(zero_copy_only=False)
        ws = (t // self.window_ns) * self.window_ns
        newest = int(t.max())
        self.max_event_ns = newest if self.max_event_ns is None else max(self.max_event_ns, newest)
        values = self.key_values(batch)
        kh = self._key_hash(values)
        late = np.zeros(n, dtype=np.uint64)
        if self.closed_through is not None:
            is_late = ws + self.window_ns <= self.closed_through
            late[is_late] = 1
            if is_late.any():
                self._late.inc(int(is_late.sum()))
        weight = uint_values(batch.column("sample_rate"), fill=1).astype(np.float64)
        weight[weight == 0] = 1.0
        counters = {c: uint_values(batch.column(c)).astype(np.uint64) for c in _COUNTERS}
        lat_col = batch.column("l7_latency_ns")
        lat = uint_values(lat_col)
        has_lat = lat > 0
        conn = connection_hashes(batch)

        touched = []
        starts = np.unique(ws)
        for start in starts.tolist():
            rows = np.flatnonzero(ws == start) if len(starts) > 1 else np.arange(n)
            window = self.windows.get(start)
            if window is None:
                window = self.windows[start] = _Window(start, compact_at=self.compact_rows)
            touched.append(window)
            wkh = self._admit(window, kh[rows], rows, values)
            lat_rows = lat[rows]
            sub = pa.table({
                "kh": wkh,
                "weight": weight[rows],
                **{c: counters[c][rows] for c in _COUNTERS},
                "bytes_w": counters["bytes"][rows] * weight[rows],
                "packets_w": counters["packets"][rows] * weight[rows],
                "t": t[rows],
                "late": late[rows],
                "lat": pa.array(lat_rows, mask=~has_lat[rows], type=pa.uint64()),
            })
            partial = sub.group_by("kh", use_threads=False).aggregate(_METRIC_AGGS)
            window.metrics.append(partial.select(["kh", *_MERGE]))
            conns = _distinct_connections(wkh, mix64(wkh ^ mix64(conn[rows])))
            window.connections.append(conns)
            lat_hit = has_lat[rows]
            if lat_hit.any():
                lt = pa.table({"kh": wkh[lat_hit], "bucket": latency_bucket(lat_rows[lat_hit]),
                               "w": weight[rows][lat_hit]})
                window.latency.append(_reduce_latency(lt))
            window.pending_rows += partial.num_rows + len(conns[0])
            if window.pending_rows > window.compact_at:
                self._compact(window)
        self._open.set(sum(len(w.known) for w in self.windows.values()))
        return touched

    def _admit(self, window: _Window, kh: np.ndarray, rows: np.ndarray, values: list[pa.Array]) -> np.ndarray:
        """Register new keys of a window (up to max_groups); map the rest to the overflow key.

        ``kh`` are the keys of the batch rows ``rows``; ``values`` the key columns of the whole batch.
        """
        if len(window.known):
            pos = np.clip(np.searchsorted(window.known, kh), 0, len(window.known) - 1)
            candidates = np.flatnonzero(window.known[pos] != kh)
        else:
            candidates = np.arange(len(kh))
        if len(candidates) == 0:
            return kh
        uniq, first = np.unique(kh[candidates], return_index=True)
        first = candidates[first]
        room = max(self.config.max_groups - len(window.known), 0)
        admitted, rejected = uniq[:room], uniq[room:]
        if len(admitted):
            take = pa.array(rows[first[:room]])
            key_table = pa.table({"kh": admitted, **{name: col.take(take)
                                                      for name, col in zip(self.keys, values, strict=True)}})
            window.keys.append(key_table)
            window.known = np.union1d(window.known, admitted)
        if len(rejected):
            overflow = np.isin(kh, rejected)
            kh = kh.copy()
            kh[overflow] = OVERFLOW_KEY
            self._overflow.inc(int(overflow.sum()))
            if not window.has_overflow:
                window.has_overflow = True
                window.keys.append(pa.table({"kh": np.array([OVERFLOW_KEY], dtype=np.uint64),
                                             **{name: pa.nulls(1, key_type(name)) for name in self.keys}}))
        return kh

    def _compact(self, window: _Window) -> None:
        window.metrics = [_merged(window.metrics, _reduce_metrics)]
        window.connections = [_merge_connections(window.connections)]
        if window.latency:
            window.latency = [_merged(window.latency, _reduce_latency)]
        window.pending_rows = window.metrics[0].num_rows + len(window.connections[0][0])
        window.compact_at = max(window.compact_at, 2 * window.pending_rows)

    # ------------------------------------------------------------------------------- output
    def _emit(self, window: _Window) -> Envelope:
        metrics = _merged(window.metrics, _reduce_metrics)
        kh = metrics.column("kh").to_numpy()
        order = np.argsort(kh)
        kh = kh[order]
        metrics = metrics.take(pa.array(order))
        n = len(kh)
        keys = pa.concat_tables(window.keys)
        key_hashes = keys.column("kh").to_numpy()
        key_order = np.argsort(key_hashes)
        key_rows = key_order[np.searchsorted(key_hashes, kh, sorter=key_order)]

        conn_kh, _ = _merge_connections(window.connections)
        conn_keys, conn_counts = np.unique(conn_kh, return_counts=True)
        connections = _lookup_sorted(kh, conn_keys, conn_counts.astype(np.uint64), 0)

        lat_min = metrics.column("lat_min").to_numpy(zero_copy_only=False)
        lat_max = metrics.column("lat_max")
        lat_count = metrics.column("lat_count").to_numpy().astype(np.uint64)
        percentiles = {name: np.zeros(n, dtype=np.uint64) for name, _ in QUANTILES}
        if window.latency:
            lt = _merged(window.latency, _reduce_latency)
            lkeys, buckets = weighted_quantiles(lt.column("kh").to_numpy(), lt.column("bucket").to_numpy(),
                                                lt.column("w").to_numpy(), tuple(q for _, q in QUANTILES))
            lo = np.nan_to_num(lat_min.astype(np.float64), nan=0.0)
            hi = np.nan_to_num(lat_max.to_numpy(zero_copy_only=False).astype(np.float64), nan=0.0)
            for (name, _), b in zip(QUANTILES, buckets, strict=True):
                est = _lookup_sorted(kh, lkeys, bucket_value(b), 0.0)
                percentiles[name] = np.rint(np.clip(est, lo, hi)).astype(np.uint64)
        no_lat = lat_count == 0

        start = window.start
        ts = pa.timestamp("ns", tz="UTC")
        key_table = keys.take(pa.array(key_rows))
        columns: dict[str, Any] = {
            "window_start": pa.array(np.full(n, start, dtype=np.int64)).cast(ts),
            "window_end": pa.array(np.full(n, start + self.window_ns, dtype=np.int64)).cast(ts),
        }
        for name in self.keys:
            columns[name] = key_table.column(name).combine_chunks().cast(key_type(name))
        columns.update({
            "overflow": pa.array(kh == OVERFLOW_KEY),
            "flows": metrics.column("weight_sum"),
            "flows_raw": metrics.column("weight_count").cast(pa.uint64()),
            "bytes": metrics.column("bytes_sum").cast(pa.uint64()),
            "packets": metrics.column("packets_sum").cast(pa.uint64()),
            "reply_bytes": metrics.column("reply_bytes_sum").cast(pa.uint64()),
            "reply_packets": metrics.column("reply_packets_sum").cast(pa.uint64()),
            "bytes_estimate": metrics.column("bytes_w_sum").cast(pa.float64()),
            "packets_estimate": metrics.column("packets_w_sum").cast(pa.float64()),
            "connections": pa.array(connections, pa.uint64()),
            "first_seen": metrics.column("t_min").cast(ts),
            "last_seen": metrics.column("t_max").cast(ts),
            "latency_samples": pa.array(lat_count, pa.uint64()),
            **{name: pa.array(values, mask=no_lat, type=pa.uint64()) for name, values in percentiles.items()},
            "latency_max_ns": lat_max.cast(pa.uint64()),
            "late_flows": metrics.column("late_sum").cast(pa.uint64()),
        })
        # rows come out in group-hash order: deterministic, and no sort over the key columns
        batch = pa.RecordBatch.from_arrays([as_array(columns[f.name]) for f in self.schema], schema=self.schema)
        self._rows_out.inc(batch.num_rows)
        return Envelope(batch, window.receipts, kind="aggregates")

    def _emit_until(self, limit_ns: int | None) -> list[Envelope]:
        """Emit every window ending at or before ``limit_ns`` (all when None)."""
        due = sorted(s for s in self.windows if limit_ns is None or s + self.window_ns <= limit_ns)
        out = [self._emit(self.windows.pop(s)) for s in due]
        if limit_ns is not None:
            self.closed_through = limit_ns if self.closed_through is None else max(self.closed_through, limit_ns)
        self._open.set(sum(len(w.known) for w in self.windows.values()))
        return out

    def tick(self, now_ns: int) -> list[Envelope]:
        clock = now_ns if self.config.clock == "wall" else self.max_event_ns
        if clock is None:
            return []
        boundary = ((clock - self.lateness_ns) // self.window_ns) * self.window_ns
        return self._emit_until(boundary)

    def close(self) -> list[Envelope]:
        return self._emit_until(None)
