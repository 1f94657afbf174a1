"""Flow batches (and aggregate rows) as ECS documents.

* :func:`to_documents` — one nested ``dict`` per row (tests, slow paths);
* :func:`encode_ndjson` / :func:`ndjson_array` / :func:`encode_documents` —
  the fast path: each document is assembled as JSON text column by column with
  Arrow kernels, so the cost per row stays in C++;
* :func:`aggregate_documents` — aggregate rows: the table applied to whichever
  flow columns the row carries, every other column under ``flowship.aggregate.*``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from flowship.model.ecs_fields import AGGREGATES_DATASET, ECS_VERSION, FLOW_FIELDS, Cols, Field, when
from flowship.model.times import datetime_text, nanos_times

# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------

def _applicable(batch: pa.RecordBatch, fields: Iterable[Field], aggregates: bool = False) -> list[Field]:
    names = set(batch.schema.names)
    return [f for f in fields if all(n in names for n in f.needs) and not (aggregates and f.flow_only)]


def _field_arrays(batch: pa.RecordBatch, fields: Sequence[Field]) -> list[pa.Array]:
    cols = Cols(batch)
    out = []
    for f in fields:
        arr = f.compute(cols)
        if isinstance(arr, pa.ChunkedArray):
            arr = arr.combine_chunks()
        out.append(arr)
    return out


def _set_path(doc: dict, path: tuple[str, ...], value: Any) -> None:
    node = doc
    for key in path[:-1]:
        nxt = node.get(key)
        if nxt is None:
            nxt = node[key] = {}
        node = nxt
    node[path[-1]] = value


def _documents(fields: Sequence[Field], arrays: Sequence[pa.Array], n: int) -> list[dict]:
    docs: list[dict] = [{} for _ in range(n)]
    for f, arr in zip(fields, arrays, strict=True):
        path = tuple(f.path.split("."))
        values = arr.to_pylist()
        skip_empty = f.kind == "list"
        if len(path) == 1:
            key = path[0]
            for doc, v in zip(docs, values, strict=True):
                if v is None or (skip_empty and not v):
                    continue
                doc[key] = v
        else:
            for doc, v in zip(docs, values, strict=True):
                if v is None or (skip_empty and not v):
                    continue
                _set_path(doc, path, v)
    return docs


def to_documents(batch: pa.RecordBatch) -> list[dict]:
    """One nested ECS document (dict) per flow row; absent values are left out."""
    fields = _applicable(batch, FLOW_FIELDS)
    return _documents(fields, _field_arrays(batch, fields), batch.num_rows)


def _needs_escape(arr: pa.Array) -> bool:
    """Whether any value holds a quote, a backslash or a control character."""
    if len(arr) == 0 or arr.null_count == len(arr):
        return False
    width = np.int64 if pa.types.is_large_string(arr.type) else np.int32
    offsets = np.frombuffer(arr.buffers()[1], dtype=width, count=len(arr) + 1,
                            offset=arr.offset * np.dtype(width).itemsize)
    lo, hi = int(offsets[0]), int(offsets[-1])
    if hi <= lo:
        return False
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8, count=hi - lo, offset=lo)
    return bool(np.any((data < 0x20) | (data == 0x22) | (data == 0x5C)))


def _json_strings(arr: pa.Array, distinct: bool = False) -> pa.Array:
    """String values as JSON string literals (quoted, escaped); null stays null.

    ``distinct`` quotes each distinct value once and gathers (cheaper for
    repetitive values such as labels).
    """
    if distinct or _needs_escape(arr):
        encoded = pc.dictionary_encode(arr)
        values = encoded.dictionary
        if _needs_escape(values):
            literals = pa.array([orjson.dumps(v).decode() for v in values.to_pylist()], pa.string())
        else:
            literals = pc.binary_join_element_wise('"', values, '"', "")
        return literals.take(encoded.indices)
    return pc.binary_join_element_wise('"', arr, '"', "")


def _json_values(f: Field, arr: pa.Array) -> pa.Array:
    """JSON text of each value (null where the field is absent)."""
    if f.kind == "str":
        if not pa.types.is_string(arr.type):
            arr = arr.cast(pa.string())
        return _json_strings(arr)
    if f.kind == "int":
        return arr.cast(pa.string())
    if f.kind == "bool":
        return pc.if_else(arr, pa.scalar("true"), pa.scalar("false"))
    # list of strings: quote the flattened values, rebuild the lists, join
    if pa.types.is_large_list(arr.type):
        arr = arr.cast(pa.list_(pa.string()))
    nonempty = pc.greater(pc.list_value_length(arr), 0)
    flat = arr.values
    if not pa.types.is_string(flat.type):
        flat = flat.cast(pa.string())
    offsets = arr.offsets
    start = offsets[0].as_py()
    end = offsets[-1].as_py()
    literals = _json_strings(flat.slice(start, end - start), distinct=True)
    rebased = pc.subtract(offsets, pa.scalar(start, offsets.type)) if start else offsets
    rebuilt = pa.ListArray.from_arrays(rebased, literals)
    joined = pc.binary_join(rebuilt, ",")
    text = pc.binary_join_element_wise("[", joined, "]", "")
    return pc.if_else(pc.and_(nonempty, pc.is_valid(arr)).fill_null(False), text, pa.scalar(None, pa.string()))


def _is_low(node: Field | dict) -> bool:
    if isinstance(node, Field):
        return not node.per_row
    return all(_is_low(child) for child in node.values())


def _needs_of(node: Field | dict) -> set[str]:
    if isinstance(node, Field):
        return set(node.needs)
    return set().union(*(_needs_of(child) for child in node.values())) if node else set()


class _Renderer:
    """Builds ECS JSON text column by column.

    Members of an object are emitted as text pieces; a comma goes before a
    member only where an earlier sibling is present, so nothing is trimmed
    afterwards and each document is concatenated once. Consecutive members
    that do not vary per row (a run) are rendered once per distinct
    combination of their input columns and gathered, which keeps repetitive
    content (pod labels, namespaces, verdicts) off the per-row path.
    """

    def __init__(self, batch: pa.RecordBatch, fields: Sequence[Field]) -> None:
        self.batch = batch
        self.n = batch.num_rows
        self.cols = Cols(batch)
        self.tree: dict = {}
        for f in fields:
            node = self.tree
            path = f.path.split(".")
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = f
        self._codes: dict[str, tuple[np.ndarray, int]] = {}

    def render(self) -> pa.Array:
        pieces: list[pa.Array] = []
        self._members(self.tree, pieces, self.cols, runs=True)
        parts = [p.fill_null("") for p in pieces if p is not None and p.null_count < len(p)]
        return pc.binary_join_element_wise("{", *parts, "}", "")

    # -- members ---------------------------------------------------------------------------
    def _members(self, tree: dict, out: list, cols: Cols, runs: bool) -> pa.Array:
        """Append the pieces of an object's members to ``out``; return its presence mask."""
        before: pa.Array | None = None
        items = list(tree.items())
        i = 0
        while i < len(items):
            if runs and _is_low(items[i][1]):
                j = i
                while j < len(items) and _is_low(items[j][1]):
                    j += 1
                text = self._run(dict(items[i:j]))
                present = pc.not_equal(text, "")
                piece = text
                i = j
            else:
                key, node = items[i]
                i += 1
                key_json = orjson.dumps(key).decode()
                if isinstance(node, dict):
                    inner: list = []
                    present = self._members(node, inner, cols, runs)
                    piece = [when(present, f"{key_json}:{{"), *inner, when(present, "}")]
                else:
                    values = _json_values(node, self._compute(node, cols))
                    present = pc.is_valid(values)
                    piece = pc.binary_join_element_wise(f"{key_json}:", values, "")
            if before is None:
                before = present
            else:
                out.append(when(pc.and_(before, present), ","))
                before = pc.or_(before, present)
            if isinstance(piece, list):
                out.extend(piece)
            else:
                out.append(piece)
        return before if before is not None else pa.array([False] * cols.n, pa.bool_())

    @staticmethod
    def _compute(f: Field, cols: Cols) -> pa.Array:
        arr = f.compute(cols)
        return arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr

    def _text(self, tree: dict, cols: Cols) -> pa.Array:
        """Members of ``tree`` as one text column (no braces; '' when none is present)."""
        pieces: list = []
        self._members(tree, pieces, cols, runs=False)
        parts = [p.fill_null("") for p in pieces if p is not None]
        if not parts:
            return pa.array([""] * cols.n, pa.string())
        if len(parts) == 1:
            return parts[0]
        return pc.binary_join_element_wise(*parts, "")

    # -- runs of members that repeat across rows -------------------------------------------
    def _run(self, tree: dict) -> pa.Array:
        needs = sorted(_needs_of(tree))
        key = np.zeros(self.n, dtype=np.int64)
        for name in needs:
            codes, card = self._column_codes(name)
            if card > 1:
                key = key * card + codes
                if card and key.max(initial=0) > (1 << 40):
                    _, key = np.unique(key, return_inverse=True)
                    key = key.reshape(-1).astype(np.int64)
        distinct, first, inverse = np.unique(key, return_index=True, return_inverse=True)
        if len(distinct) * 2 > self.n:
            return self._text(tree, self.cols)
        sub = self.batch.take(pa.array(first, pa.int64()))
        text = self._text(tree, Cols(sub))
        return text.take(pa.array(inverse.reshape(-1), pa.int64()))

    def _column_codes(self, name: str) -> tuple[np.ndarray, int]:
        if name not in self._codes:
            arr = self.batch.column(name)
            if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
                if pa.types.is_string(arr.type.value_type):
                    arr = pc.binary_join(arr, "\x1f")
                else:
                    arr = pa.array([None if v is None else orjson.dumps(v).decode() for v in arr.to_pylist()],
                                   pa.string())
            encoded = pc.dictionary_encode(arr, null_encoding="encode")
            codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
            self._codes[name] = (codes, len(encoded.dictionary))
        return self._codes[name]


def ndjson_array(batch: pa.RecordBatch) -> pa.Array:
    """Every flow as one ECS JSON document (no newline), as an Arrow string array."""
    if batch.num_rows == 0:
        return pa.array([], pa.string())
    return _Renderer(batch, _applicable(batch, FLOW_FIELDS)).render()


def encode_documents(batch: pa.RecordBatch, kind: str = "flows") -> list[bytes]:
    """Each row as one ECS JSON document (UTF-8 bytes, no newline).

    ``kind`` is the envelope kind: ``"flows"`` or ``"aggregates"``.
    """
    if batch.num_rows == 0:
        return []
    if kind != "flows":
        return [orjson.dumps(doc) for doc in aggregate_documents(batch)]
    return ndjson_array(batch).cast(pa.binary()).to_pylist()


def encode_ndjson(batch: pa.RecordBatch, kind: str = "flows") -> list[bytes]:
    """Each row as one ECS JSON line (UTF-8 bytes ending in a newline)."""
    if batch.num_rows == 0:
        return []
    if kind != "flows":
        return [orjson.dumps(doc) + b"\n" for doc in aggregate_documents(batch)]
    lines = pc.binary_join_element_wise(ndjson_array(batch), "\n", "")
    return lines.cast(pa.binary()).to_pylist()


def ndjson_buffer(batch: pa.RecordBatch) -> memoryview:
    """Every flow as one ECS JSON line, laid end to end: a view of the Arrow text buffer (no copy)."""
    from flowship.model.hubble_encode import text_buffer

    if batch.num_rows == 0:
        return memoryview(b"")
    return text_buffer(pc.binary_join_element_wise(ndjson_array(batch), "\n", ""))


# ---------------------------------------------------------------------------------------------
# Aggregate rows
# ---------------------------------------------------------------------------------------------

_WINDOW_START = ("window_start", "start_time", "start", "time")
_WINDOW_END = ("window_end", "end_time", "end")


def _plain(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, datetime):
        return datetime_text(value)
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def aggregate_documents(batch: pa.RecordBatch) -> list[dict]:
    """ECS documents for aggregate rows (``kind="aggregates"``), whatever their columns.

    Window bounds become ``@timestamp`` (the window start), ``event.start`` and
    ``event.end``; flow columns the aggregate kept as group keys are mapped as
    for flows (``src_namespace`` → ``flowship.source.namespace``...); every
    other column (counts, sums, percentiles) goes under ``flowship.aggregate``.
    """
    n = batch.num_rows
    names = batch.schema.names
    start_col = next((c for c in _WINDOW_START if c in names), None)
    end_col = next((c for c in _WINDOW_END if c in names), None)
    fields = [f for f in _applicable(batch, FLOW_FIELDS, aggregates=True)
              if f.path not in ("@timestamp", "event.start", "event.end", "event.duration")]
    docs = _documents(fields, _field_arrays(batch, fields), n)
    used = {col for f in fields for col in f.needs}
    used.update(c for c in (start_col, end_col) if c)
    # the aggregate stage's direction-independent service port is the destination port of requests
    server_ports = batch.column("server_port").to_pylist() if "server_port" in names and "dst_port" not in names \
        else None
    if server_ports is not None:
        used.add("server_port")
    starts = nanos_times(batch.column(start_col)).to_pylist() if start_col else [None] * n
    ends = nanos_times(batch.column(end_col)).to_pylist() if end_col else [None] * n
    extra = [(name, nanos_times(batch.column(name)).to_pylist() if pa.types.is_timestamp(batch.schema.field(name).type)
              else batch.column(name).to_pylist()) for name in names if name not in used]
    now = datetime_text(datetime.now(UTC))
    out = []
    for i, doc in enumerate(docs):
        head: dict[str, Any] = {"@timestamp": starts[i] or ends[i] or now, "ecs": {"version": ECS_VERSION}}
        event: dict[str, Any] = {"kind": "metric", "category": ["network"], "type": ["info"],
                                 "dataset": AGGREGATES_DATASET, "module": "flowship"}
        if starts[i]:
            event["start"] = starts[i]
        if ends[i]:
            event["end"] = ends[i]
        head["event"] = event
        aggregate = {name: _plain(values[i]) for name, values in extra if values[i] is not None}
        for key, value in doc.items():
            if key in head and isinstance(value, dict):
                head[key].update(value)
            else:
                head[key] = value
        if server_ports is not None and server_ports[i] is not None:
            head.setdefault("destination", {})["port"] = server_ports[i]
        if aggregate:
            head.setdefault("flowship", {})["aggregate"] = aggregate
        out.append(head)
    return out
