"""Flow batches (and aggregate rows) as ECS documents.

* :func:`to_documents` — one nested ``dict`` per row (tests, slow paths);
* :func:`encode_ndjson` / :func:`ndjson_array` / :func:`encode_documents` —
  the fast path: each document is assembled as JSON text column by column with
  Arrow kernels, so the cost per row stays in C++;
* :func:`aggregate_documents` — aggregate rows: the table applied to whichever
  flow columns the row carries, every other column under ``flowship.aggregate.*``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from flowship.model import json_columns as jc
from flowship.model.ecs_fields import AGGREGATES_DATASET, ECS_VERSION, FLOW_FIELDS, Cols, Field
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


def _json_values(arr: pa.Array) -> pa.Array:
    """JSON text of each value as orjson writes the Python value (null where the field is absent).

    Empty lists are absent, as in :func:`to_documents`; null list elements are ``null``.
    """
    t = arr.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return jc.strings(arr)
    if pa.types.is_boolean(t):
        return jc.booleans(arr)
    if pa.types.is_integer(t):
        return jc.numbers(arr)
    if (pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_string(t.value_type):
        return jc.string_lists(arr.cast(pa.list_(pa.string())) if pa.types.is_large_list(t) else arr)
    # anything else (floats, timestamps...): orjson itself, value by value
    values = [None if v is None or (isinstance(v, list) and not v) else orjson.dumps(v).decode()
              for v in arr.to_pylist()]
    return pa.array(values, pa.string())


def _is_low(node: Field | dict) -> bool:
    if isinstance(node, Field):
        return not node.per_row
    return all(_is_low(child) for child in node.values())


def _needs_of(node: Field | dict) -> set[str]:
    if isinstance(node, Field):
        return set(node.needs)
    return set().union(*(_needs_of(child) for child in node.values())) if node else set()


@functools.lru_cache(maxsize=16)
def _plan(names: tuple[str, ...]) -> tuple[tuple, ...]:
    """The document's object tree for one set of columns, planned once per schema.

    Each entry is ``("run", members, columns)`` for consecutive members that
    do not vary per row, ``("object", key, members)`` or ``("field", key_json, field)``.
    """
    present = set(names)
    tree: dict = {}
    for f in FLOW_FIELDS:
        if all(n in present for n in f.needs):
            node = tree
            path = f.path.split(".")
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = f
    return _plan_members(tree, runs=True)


def _plan_members(tree: dict, runs: bool) -> tuple[tuple, ...]:
    out: list[tuple] = []
    items = list(tree.items())
    i = 0
    while i < len(items):
        if runs and _is_low(items[i][1]):
            j = i
            while j < len(items) and _is_low(items[j][1]):
                j += 1
            run = dict(items[i:j])
            out.append(("run", _plan_members(run, runs=False), tuple(sorted(_needs_of(run)))))
            i = j
            continue
        key, node = items[i]
        key_json = orjson.dumps(key).decode()
        if isinstance(node, dict):
            out.append(("object", key, _plan_members(node, runs)))
        else:
            out.append(("field", key_json, node))
        i += 1
    return tuple(out)


class _Renderer:
    """Builds ECS JSON text column by column.

    Each member of an object is a fragment column (``"key":value`` or null
    where absent); an object's fragments are joined with commas skipping the
    absent ones. Consecutive members that do not vary per row (a run) are
    rendered once per distinct combination of their input columns and
    gathered, which keeps repetitive content (pod labels, namespaces,
    verdicts) off the per-row path.
    """

    def __init__(self, batch: pa.RecordBatch) -> None:
        self.batch = batch
        self.n = batch.num_rows
        self.plan = _plan(tuple(batch.schema.names))
        self._codes: dict[str, tuple[np.ndarray, int]] = {}

    def render(self, newline: bool = False) -> pa.Array:
        body = jc.join(self._fragments(self.plan, Cols(self.batch), self.n), self.n)
        return pc.binary_join_element_wise("{", body, "}\n" if newline else "}", "")

    def _fragments(self, plan: tuple[tuple, ...], cols: Cols, n: int) -> list[pa.Array]:
        out = []
        for entry in plan:
            if entry[0] == "run":
                text = self._run(entry[1], entry[2])
                out.append(jc.keep(text, pc.not_equal(text, "")))
            elif entry[0] == "object":
                inner = self._fragments(entry[2], cols, n)
                if not inner:
                    continue
                some = jc.any_of([pc.is_valid(f) for f in inner])
                out.append(jc.member(entry[1], jc.join(inner, n), some))
            else:
                arr = entry[2].compute(cols)
                if isinstance(arr, pa.ChunkedArray):
                    arr = arr.combine_chunks()
                out.append(pc.binary_join_element_wise(entry[1] + ":", _json_values(arr), ""))
        return out

    # -- runs of members that repeat across rows -------------------------------------------
    def _run(self, plan: tuple[tuple, ...], needs: tuple[str, ...]) -> pa.Array:
        key = np.zeros(self.n, dtype=np.int64)
        for name in needs:
            codes, card = self._column_codes(name)
            if card > 1:
                key = key * card + codes
                if key.max(initial=0) > (1 << 40):
                    _, key = np.unique(key, return_inverse=True)
                    key = key.reshape(-1).astype(np.int64)
        distinct, first, inverse = np.unique(key, return_index=True, return_inverse=True)
        if len(distinct) * 2 > self.n:
            return jc.join(self._fragments(plan, Cols(self.batch), self.n), self.n)
        sub = self.batch.take(pa.array(first, pa.int64()))
        text = jc.join(self._fragments(plan, Cols(sub), len(first)), len(first))
        return text.take(pa.array(inverse.reshape(-1), pa.int64()))

    def _column_codes(self, name: str) -> tuple[np.ndarray, int]:
        """Codes equal exactly where the column's values are equal (null, [] and [null] all distinct)."""
        if name not in self._codes:
            arr = jc.contiguous(self.batch.column(name))
            if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
                if pa.types.is_string(arr.type.value_type):
                    text = pc.fill_null(jc.string_lists(arr), "[]")
                    arr = jc.keep(text, pc.is_valid(arr))
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
    return _Renderer(batch).render()


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
    return _Renderer(batch).render(newline=True).cast(pa.binary()).to_pylist()


def ndjson_buffer(batch: pa.RecordBatch) -> memoryview:
    """Every flow as one ECS JSON line, laid end to end: a view of the Arrow text buffer (no copy)."""
    if batch.num_rows == 0:
        return memoryview(b"")
    return jc.text_buffer(_Renderer(batch).render(newline=True))


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
