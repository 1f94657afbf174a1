"""``loki`` sink: flows as log lines through the Loki push API.

Every row becomes one entry: its stream is chosen by a small, bounded label
set (node, namespace, verdict, flow type by default), its line is the Hubble
JSON of the flow (``line_format: hubble``) or a logfmt line, and per-entry
identifiers (uuid, Community ID, pods) travel as structured metadata, which
costs no stream cardinality. The request body is snappy-compressed protobuf
(``logproto.PushRequest``) by default, or JSON.

Anything that accepts Loki pushes works: Grafana Loki at
``/loki/api/v1/push``, VictoriaLogs at ``/insert/loki/api/v1/push``.

Batching, retries (429, 5xx, transport errors), splitting on 413 and dead
letters (other 4xx, with the server's reason) come from
:mod:`flowship.sinks.delivery`; an envelope is acknowledged when Loki has
accepted all of its entries.

Aggregate rows (``kind="aggregates"``) are pushed as logfmt or JSON lines
with their own labels (``aggregate_labels`` plus ``kind="aggregates"``).
"""

from __future__ import annotations

import gzip
import re
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, Literal

import cramjam
import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from flowship.components import Context
from flowship.config import ByteSize, Duration
from flowship.model.columns import nonempty
from flowship.model.hubble_encode import encode_text_column
from flowship.model.schema import FLOW_SCHEMA
from flowship.model.times import nanos_times
from flowship.proto.logproto import push_pb2
from flowship.secrets import Secret
from flowship.sinks import aggregate_json, http_client, row_times
from flowship.sinks.delivery import BatchConfig, DeliveryConfig, DeliverySink, SendResult

MAX_LABELS = 15  # Loki's default max_label_names_per_series
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
# Columns that would explode the number of streams: they belong in the line or in structured metadata.
_HIGH_CARDINALITY = re.compile(
    r"^(uuid|community_id|time|start_time|summary|ip_.*|.*_port|.*_pod|.*_names|.*_labels|eth_.*|"
    r"http_url|http_headers|http_user_agent|dns_query|dns_ips|dns_cnames|dns_ttl|socket_cookie|cgroup_id|"
    r".*bytes|.*packets|.*_ns|.*_id|.*_identity|aggregate_.*_count|icmp_.*|tcp_flags|interface_index|"
    r"window_start|window_end|first_seen|last_seen|flows|flows_raw|connections|.*_estimate|late_flows)$")
_FLOW_TYPES = {f.name: f.type for f in FLOW_SCHEMA}

# logfmt lines leave out these columns (bulky lists or duplicates of other columns)
_LOGFMT_SKIP = frozenset({"src_labels", "dst_labels", "node_labels", "http_headers"})


def _default_labels() -> dict[str, str]:
    return {"node": "node_name", "namespace": "src_namespace", "verdict": "verdict", "flow_type": "flow_type"}


@dataclass
class LokiBatchConfig(BatchConfig):
    max_events: int = 10000
    max_bytes: ByteSize = ByteSize(4 * 1024 * 1024)  # before compression
    timeout: Duration = Duration(1.0)


@dataclass
class LokiSinkConfig(http_client.HttpClientConfig, DeliveryConfig):
    """``type: loki`` — see docs/sinks.md. Auth and TLS keys: :class:`flowship.sinks.http_client.HttpClientConfig`."""

    url: str = "http://127.0.0.1:3100/loki/api/v1/push"
    encoding: Literal["protobuf", "json"] = "protobuf"
    gzip: bool = False  # JSON bodies only (protobuf bodies are always snappy)
    labels: dict[str, str] = field(default_factory=_default_labels)  # label name -> flow column
    aggregate_labels: dict[str, str] = field(default_factory=lambda: {"node": "node_name"})
    static_labels: dict[str, str] = field(default_factory=lambda: {"job": "flowship"})
    structured_metadata: list[str] = field(default_factory=lambda: ["uuid", "community_id", "src_pod", "dst_pod"])
    line_format: Literal["hubble", "logfmt"] = "hubble"
    aggregate_line_format: Literal["logfmt", "json"] = "logfmt"
    tenant: str | None = None  # X-Scope-OrgID
    bearer_token: Secret | None = None
    max_line_bytes: ByteSize = ByteSize(256 * 1024)
    on_oversize: Literal["truncate", "dead_letter"] = "truncate"
    batch: LokiBatchConfig = field(default_factory=LokiBatchConfig)

    token_key = "bearer_token"
    token_scheme = "Bearer"

    def validate(self) -> list[str]:
        problems: list[str] = []
        if problem := http_client.url_problem("url", self.url, "an http:// or https:// push URL"):
            problems.append(problem)
        problems += _check_labels("labels", self.labels or {}, self.static_labels or {}, flows=True)
        problems += _check_labels("aggregate_labels", self.aggregate_labels or {},
                                  {**(self.static_labels or {}), "kind": "aggregates"}, flows=False)
        for key, value in (self.static_labels or {}).items():
            if not _LABEL_NAME.match(key) or key.startswith("__"):
                problems.append(f"static_labels.{key}: not a valid Loki label name ([a-zA-Z_][a-zA-Z0-9_]*, "
                                "no leading __)")
            if not isinstance(value, str) or not value:
                problems.append(f"static_labels.{key}: expected a non-empty string")
        for i, name in enumerate(self.structured_metadata or []):
            tp = _FLOW_TYPES.get(name)
            if tp is None:
                problems.append(f"structured_metadata[{i}]: {name!r} is not a flow column")
            elif pa.types.is_list(tp) or pa.types.is_struct(tp):
                problems.append(f"structured_metadata[{i}]: {name!r} is a list; pick scalar columns")
        if isinstance(self.max_line_bytes, int) and self.max_line_bytes < 1024:
            problems.append(f"max_line_bytes: expected at least 1KiB, got {self.max_line_bytes}")
        return problems + self.http_problems()


def _check_labels(key: str, labels: dict[str, str], fixed: dict[str, str], flows: bool) -> list[str]:
    problems = []
    for name, column in labels.items():
        where = f"{key}.{name}"
        if not _LABEL_NAME.match(name) or name.startswith("__"):
            problems.append(f"{where}: {name!r} is not a valid Loki label name ([a-zA-Z_][a-zA-Z0-9_]*, "
                            "no leading __)")
        if name in fixed:
            problems.append(f"{where}: {name!r} is already a static label")
        if not isinstance(column, str):
            problems.append(f"{where}: expected a column name")
            continue
        if _HIGH_CARDINALITY.match(column):
            problems.append(f"{where}: column {column!r} has too many distinct values for a label (one stream "
                            "per value); put it in structured_metadata or the line")
            continue
        tp = _FLOW_TYPES.get(column)
        if flows and tp is None:
            problems.append(f"{where}: {column!r} is not a flow column")
        elif tp is not None and (pa.types.is_list(tp) or pa.types.is_struct(tp)):
            problems.append(f"{where}: column {column!r} is a list and cannot be a label")
    total = len(labels) + len(fixed)
    if total > MAX_LABELS:
        problems.append(f"{key}: {total} labels with the static ones; Loki accepts at most {MAX_LABELS} per stream")
    return problems


# ---------------------------------------------------------------------------------------------
# Columnar text helpers
# ---------------------------------------------------------------------------------------------

def _as_text(arr: pa.Array) -> pa.Array:
    """Any scalar column as text (times as RFC 3339, booleans as true/false)."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if pa.types.is_timestamp(arr.type):
        return nanos_times(arr)
    if pa.types.is_boolean(arr.type):
        return pc.if_else(arr, pa.scalar("true"), pa.scalar("false"))
    if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
        joined = pc.binary_join(arr.cast(pa.list_(pa.string())), ",")
        return pc.if_else(pc.equal(joined, ""), pa.scalar(None, pa.string()), joined)
    if pa.types.is_floating(arr.type):
        return pc.if_else(pc.is_finite(arr), arr.cast(pa.string()), pa.scalar(None, pa.string()))
    return arr.cast(pa.string())


def _join_present(pieces: list[pa.Array], sep: str, n: int) -> pa.Array:
    """Join non-null pieces with ``sep`` between present ones only ('' when none)."""
    parts: list[pa.Array] = []
    before: pa.Array | None = None
    for piece in pieces:
        present = pc.is_valid(piece)
        if before is not None:
            parts.append(pc.if_else(pc.and_(before, present), pa.scalar(sep), pa.scalar("")))
            before = pc.or_(before, present)
        else:
            before = present
        parts.append(piece.fill_null(""))
    if not parts:
        return pa.array([""] * n, pa.string())
    return pc.binary_join_element_wise(*parts, "") if len(parts) > 1 else parts[0]


def _label_escape(arr: pa.Array) -> pa.Array:
    out = pc.replace_substring(arr, "\\", "\\\\")
    out = pc.replace_substring(out, '"', '\\"')
    return pc.replace_substring(out, "\n", "\\n")


def label_selectors(batch: pa.RecordBatch, labels: dict[str, str], static: dict[str, str]) -> pa.Array:
    """Prometheus selector text per row, labels sorted by name: ``{a="x", b="y"}``."""
    n = batch.num_rows
    names = batch.schema.names
    entries = [(k, True, v) for k, v in static.items()]
    entries += [(k, False, col) for k, col in labels.items() if col in names]
    pieces = []
    for name, is_static, source in sorted(entries, key=itemgetter(0)):
        if is_static:
            pieces.append(pa.array([f'{name}="{_escape_one(source)}"'] * n, pa.string()))
            continue
        text = _as_text(batch.column(source))
        text = pc.if_else(pc.equal(text, ""), pa.scalar(None, pa.string()), text)  # empty = absent in Loki
        pieces.append(pc.binary_join_element_wise(f'{name}="', _label_escape(text), '"', ""))
    body = _join_present(pieces, ", ", n)
    return pc.binary_join_element_wise("{", body, "}", "")


def _escape_one(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _plain_text(arr: pa.Array) -> bool:
    """No value needs logfmt quoting: no space, quote, '=', backslash or control byte, no empty value."""
    if arr.null_count == len(arr):
        return True
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32, count=len(arr) + 1, offset=arr.offset * 4)
    lengths = np.diff(offsets)
    valid = np.asarray(arr.is_valid())
    if np.any(lengths[valid] == 0):
        return False
    lo, hi = int(offsets[0]), int(offsets[-1])
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8, count=hi - lo, offset=lo) if hi > lo else np.zeros(0)
    return not bool(np.any((data <= 0x20) | (data == 0x22) | (data == 0x3D) | (data == 0x5C)))


def _quote_logfmt(text: pa.Array) -> pa.Array:
    needs = pc.match_substring_regex(text, r'[\s"=\\]|^$')
    escaped = pc.replace_substring(pc.replace_substring(text, "\\", "\\\\"), '"', '\\"')
    escaped = pc.replace_substring(pc.replace_substring(escaped, "\n", "\\n"), "\r", "\\r")
    quoted = pc.binary_join_element_wise('"', escaped, '"', "")
    return pc.if_else(needs, quoted, text)


def _logfmt_value(arr: pa.Array) -> pa.Array:
    text = _as_text(arr)
    if (pa.types.is_string(arr.type) or pa.types.is_list(arr.type)) and not _plain_text(text):
        encoded = pc.dictionary_encode(text)  # quote each distinct value once
        text = _quote_logfmt(encoded.dictionary).take(encoded.indices)
    return text


def logfmt_lines(batch: pa.RecordBatch, skip: frozenset[str] = _LOGFMT_SKIP) -> pa.Array:
    """One logfmt line per row: ``key=value`` for every non-null column, in schema order."""
    pieces = []
    for name in batch.schema.names:
        if name in skip:
            continue
        arr = batch.column(name)
        if arr.null_count == len(arr):
            continue
        pieces.append(pc.binary_join_element_wise(f"{name}=", _logfmt_value(arr), ""))
    return _join_present(pieces, " ", batch.num_rows)


# ---------------------------------------------------------------------------------------------
# Protobuf wire encoding (logproto), column by column
# ---------------------------------------------------------------------------------------------

def varints(values: np.ndarray) -> pa.Array:
    """Protobuf base-128 varints of non-negative integers, as a binary array."""
    v = np.asarray(values, dtype=np.uint64)
    n = len(v)
    nbytes = np.ones(n, dtype=np.int64)
    for k in range(1, 10):
        nbytes += v >= np.uint64(1 << (7 * k))
    width = int(nbytes.max()) if n else 1
    mat = np.zeros((n, width), dtype=np.uint8)
    rest = v.copy()
    for k in range(width):
        byte = (rest & np.uint64(0x7F)).astype(np.uint8)
        rest >>= np.uint64(7)
        mat[:, k] = byte | np.where(k < nbytes - 1, 0x80, 0).astype(np.uint8)
    data = mat[np.arange(width)[None, :] < nbytes[:, None]]
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(nbytes, out=offsets[1:])
    return pa.Array.from_buffers(pa.binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(data.tobytes())])


def varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(tag: bytes, payload: pa.Array) -> pa.Array:
    """A length-delimited protobuf field (tag, length, payload) per row; null payload → null."""
    lengths = pc.binary_length(payload).fill_null(0).to_numpy(zero_copy_only=False)
    return pc.binary_join_element_wise(pa.scalar(tag, pa.binary()), varints(lengths), payload,
                                       pa.scalar(b"", pa.binary()))


def entry_fields(times_ns: np.ndarray, lines: pa.Array, metadata: list[tuple[str, pa.Array]]) -> pa.Array:
    """``StreamAdapter.entries`` fields (tag 2) of every row as protobuf bytes."""
    seconds = times_ns // 1_000_000_000
    nanos = times_ns - seconds * 1_000_000_000
    ts = pc.binary_join_element_wise(pa.scalar(b"\x08", pa.binary()), varints(seconds),
                                     pa.scalar(b"\x10", pa.binary()), varints(nanos), pa.scalar(b"", pa.binary()))
    parts = [_field(b"\x0a", ts), _field(b"\x12", lines.cast(pa.binary()))]
    for name, values in metadata:
        key = b"\x0a" + varint(len(name.encode())) + name.encode()
        present = pc.is_valid(values)
        pair = pc.binary_join_element_wise(pa.scalar(key, pa.binary()),
                                           _field(b"\x12", values.cast(pa.binary()).fill_null(b"")),
                                           pa.scalar(b"", pa.binary()))
        meta = _field(b"\x1a", pair)
        parts.append(pc.if_else(present, meta, pa.scalar(b"", pa.binary())))
    body = pc.binary_join_element_wise(*parts, pa.scalar(b"", pa.binary()))
    return _field(b"\x12", body)


def streams(records: list[tuple[str, int, bytes]]) -> dict[str, list[bytes]]:
    """Payloads of (selector, time ns, payload) records grouped by stream, sorted by time in each."""
    grouped: dict[str, list[tuple[int, bytes]]] = {}
    for selector, ts, payload in records:
        grouped.setdefault(selector, []).append((ts, payload))
    return {selector: [p for _, p in sorted(entries, key=itemgetter(0))] for selector, entries in grouped.items()}


def push_request(records: list[tuple[str, int, bytes]]) -> bytes:
    """A PushRequest from (selector, time ns, entry field bytes) records, sorted per stream."""
    out = []
    for selector, entries in streams(records).items():
        label = selector.encode()
        body = b"".join([b"\x0a", varint(len(label)), label, *entries])
        out.append(b"\x0a" + varint(len(body)) + body)
    return b"".join(out)


def json_request(records: list[tuple[str, int, bytes]], label_json: dict[str, bytes]) -> bytes:
    """The JSON push body from (selector, time ns, value-array bytes) records."""
    parts = [b'{"stream":' + label_json[selector] + b',"values":[' + b",".join(entries) + b"]}"
             for selector, entries in streams(records).items()]
    return b'{"streams":[' + b",".join(parts) + b"]}"


def parse_selector(selector: str) -> dict[str, str]:
    """Labels of a selector this module wrote (``{a="x", b="y"}``)."""
    out = {}
    for m in re.finditer(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', selector):
        out[m.group(1)] = re.sub(r"\\(.)", lambda g: {"n": "\n"}.get(g.group(1), g.group(1)), m.group(2))
    return out


def _classify(text: str) -> str:
    lower = text.lower()
    for needle, reason in (("line too long", "line_too_long"), ("line_too_long", "line_too_long"),
                           ("too far behind", "out_of_order"), ("out of order", "out_of_order"),
                           ("too old", "too_old"), ("greater_than_max_sample_age", "too_old"),
                           ("invalid labels", "invalid_labels"), ("error parsing labels", "invalid_labels"),
                           ("max label", "too_many_labels"), ("label name too long", "label_too_long"),
                           ("label value too long", "label_too_long"), ("structured metadata", "structured_metadata"),
                           ("cannot parse", "bad_request"), ("cannot unmarshal", "bad_request")):
        if needle in lower:
            return reason
    return "http_400"


# ---------------------------------------------------------------------------------------------
# The sink
# ---------------------------------------------------------------------------------------------

class LokiSink(DeliverySink):
    """Pushes flows (and aggregate rows) to a Loki push endpoint."""

    log_name = "loki"

    def __init__(self, config: LokiSinkConfig, ctx: Context) -> None:
        super().__init__(config, ctx)
        self._label_json: dict[str, bytes] = {}
        self._headers: dict[str, str] = {}
        self._http = None
        self._oversize = ctx.metrics.counter("flowship_loki_truncated_lines_total",
                                             "Lines cut to max_line_bytes.", ["sink"]).labels(ctx.name)

    def connect(self) -> dict[str, Any]:
        c = self.config
        headers = {"User-Agent": "flowship"}
        if c.encoding == "protobuf":
            headers["Content-Type"] = "application/x-protobuf"
        else:
            headers["Content-Type"] = "application/json"
            if c.gzip:
                headers["Content-Encoding"] = "gzip"
        if c.tenant:
            headers["X-Scope-OrgID"] = c.tenant
        headers.update(c.request_headers())
        self._headers = headers
        self._http = http_client.pool(c, c.retry.concurrency)
        return {"url": c.url, "encoding": c.encoding, "labels": sorted(c.labels)}

    def disconnect(self) -> None:
        if self._http is not None:
            self._http.clear()

    # -- encoding -------------------------------------------------------------------------
    def encode_flows(self, batch: pa.RecordBatch) -> tuple[list, np.ndarray, list]:
        c = self.config
        selectors = label_selectors(batch, c.labels, c.static_labels)
        times = batch.column("time").cast(pa.int64()).to_numpy(zero_copy_only=False)
        if c.line_format == "hubble":
            lines = encode_text_column(batch).cast(pa.binary())
        else:
            lines = logfmt_lines(batch).cast(pa.binary())
        meta_cols = [name for name in c.structured_metadata if name in batch.schema.names]
        metadata = [(name, nonempty(_as_text(batch.column(name)))) for name in meta_cols]
        return self._records(selectors, times, lines, metadata)

    def encode_aggregates(self, batch: pa.RecordBatch) -> tuple[list, np.ndarray, list]:
        c = self.config
        selectors = label_selectors(batch, c.aggregate_labels, {**c.static_labels, "kind": "aggregates"})
        times = row_times(batch, "aggregates")
        if c.aggregate_line_format == "logfmt":
            lines = logfmt_lines(batch, frozenset()).cast(pa.binary())
        else:
            lines = pa.array(aggregate_json(batch), pa.binary())
        return self._records(selectors, times, lines, [])

    def _records(self, selectors: pa.Array, times: np.ndarray, lines: pa.Array,
                 metadata: list[tuple[str, pa.Array]]) -> tuple[list, np.ndarray, list]:
        """Records (selector, time ns, payload), their sizes, and refused oversize rows."""
        c = self.config
        n = len(lines)
        refused: list = []
        lengths = pc.binary_length(lines).to_numpy(zero_copy_only=False)
        over = np.flatnonzero(lengths > c.max_line_bytes)
        if len(over) and c.on_oversize == "truncate":
            values = lines.to_pylist()
            for i in over.tolist():
                values[i] = _truncate_utf8(values[i], c.max_line_bytes)
            lines = pa.array(values, pa.binary())
            self._oversize.inc(len(over))
        elif len(over):
            selector_list = selectors.to_pylist()
            line_list = lines.to_pylist()
            for i in over.tolist():
                refused.append(("line_too_long", f"line of {lengths[i]} bytes exceeds max_line_bytes "
                                f"{c.max_line_bytes}", {"labels": selector_list[i], "timestamp": str(times[i]),
                                                        "line": line_list[i]}))
            mask = np.ones(n, dtype=bool)
            mask[over] = False
            keep = pa.array(mask)
            selectors = selectors.filter(keep)
            lines = lines.filter(keep)
            times = times[mask]
            metadata = [(name, values.filter(keep)) for name, values in metadata]
        selector_list = selectors.to_pylist()
        if c.encoding == "protobuf":
            payloads = entry_fields(times, lines, metadata)
        else:
            payloads = self._json_values(times, lines, metadata)
            for sel in set(selector_list):
                if sel not in self._label_json:
                    self._label_json[sel] = orjson.dumps(parse_selector(sel))
        sizes = pc.binary_length(payloads).to_numpy(zero_copy_only=False).astype(np.int64) + 8
        records = list(zip(selector_list, times.tolist(), payloads.to_pylist(), strict=True))
        return records, sizes, refused

    @staticmethod
    def _json_values(times: np.ndarray, lines: pa.Array, metadata: list[tuple[str, pa.Array]]) -> pa.Array:
        line_list = lines.to_pylist()
        meta_lists = [(name, values.to_pylist()) for name, values in metadata]
        out = []
        for i, (ts, line) in enumerate(zip(times.tolist(), line_list, strict=True)):
            meta = {name: values[i] for name, values in meta_lists if values[i] is not None}
            value = [str(ts), line.decode("utf-8", "replace")]
            if meta:
                value.append(meta)
            out.append(orjson.dumps(value))
        return pa.array(out, pa.binary())

    # -- sending --------------------------------------------------------------------------
    def send(self, records: list) -> SendResult:
        c = self.config
        if c.encoding == "protobuf":
            raw = push_request(records)
            body = cramjam.snappy.compress_raw(raw)
            body = bytes(body)
        else:
            body = json_request(records, self._label_json)
            if c.gzip:
                body = gzip.compress(body, compresslevel=1)
        resp = http_client.post(self._http, c.url, body, self._headers, float(c.retry.request_timeout))
        http_client.raise_for_status(resp.status, resp.data, resp.headers.get("Retry-After"), _classify)
        return SendResult(sent_bytes=len(body))

    def describe(self, record: tuple[str, int, bytes]) -> dict:
        selector, ts, payload = record
        out: dict[str, Any] = {"labels": selector, "timestamp": str(ts)}
        if self.config.encoding == "protobuf":
            entry = push_pb2.StreamAdapter.FromString(payload).entries[0]
            out["line"] = entry.line
            if entry.structuredMetadata:
                out["structured_metadata"] = {p.name: p.value for p in entry.structuredMetadata}
        else:
            value = orjson.loads(payload)
            out["line"] = value[1]
            if len(value) > 2:
                out["structured_metadata"] = value[2]
        return out


def _truncate_utf8(value: bytes, limit: int) -> bytes:
    cut = value[:limit]
    return cut.decode("utf-8", "ignore").encode("utf-8")
