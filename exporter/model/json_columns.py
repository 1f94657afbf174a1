"""Vectorised JSON text: whole columns of JSON fragments from Arrow columns.

Encoding a flow through a Python dict costs tens of microseconds; building
the text of every row at once with Arrow kernels costs well under one. A
*fragment* column holds ``"key":value`` text for each row, or null where the
field is absent; :func:`join` writes the present fragments of an object
separated by commas (Arrow skips the nulls, so no comma is ever trimmed
afterwards) and :func:`member` wraps an object's members as a fragment of
its parent. Values come from :func:`strings`, :func:`numbers`,
:func:`quoted_numbers`, :func:`booleans`, :func:`string_lists` and
:func:`time_literals`; :func:`keep` marks absent values without copying text.

Escaping follows orjson byte for byte: ``"`` and ``\\`` backslashed,
``\\b \\t \\n \\f \\r`` short, other control characters as ``\\u00XX``,
everything else (``/``, DEL, non-ASCII) as is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

STR = pa.string()
NULL_STR = pa.scalar(None, STR)
_SKIP = pc.JoinOptions(null_handling="skip")
_EMPTY = pc.JoinOptions(null_handling="replace", null_replacement="")


def contiguous(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    return values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values


def _bytes_need_escape(values: pa.Array) -> bool:
    """Whether any value holds a quote, a backslash or a control character (one pass over the bytes)."""
    if len(values) == 0 or values.null_count == len(values):
        return False
    width = np.int64 if pa.types.is_large_string(values.type) else np.int32
    offsets = np.frombuffer(values.buffers()[1], dtype=width, count=len(values) + 1,
                            offset=values.offset * np.dtype(width).itemsize)
    lo, hi = int(offsets[0]), int(offsets[-1])
    if hi <= lo:
        return False
    data = np.frombuffer(values.buffers()[2], dtype=np.uint8, count=hi - lo, offset=lo)
    return bool(data.min() < 0x20 or (data == 0x22).any() or (data == 0x5C).any())


def strings(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    """JSON string literals (quoted, escaped as orjson does); null stays null.

    Values needing escapes are rare: then the column is dictionary-encoded and
    each distinct value is escaped once by orjson itself.
    """
    values = contiguous(values)
    if values.type != STR:
        values = values.cast(STR)
    if not _bytes_need_escape(values):
        return pc.binary_join_element_wise('"', values, '"', "")
    encoded = pc.dictionary_encode(values)
    literals = pa.array([orjson.dumps(v).decode() for v in encoded.dictionary.to_pylist()], STR)
    return literals.take(encoded.indices)


def numbers(values: pa.Array) -> pa.Array:
    return pc.cast(values, STR)


def quoted_numbers(values: pa.Array) -> pa.Array:
    """64-bit integers as protojson writes them: decimal text in quotes."""
    return pc.binary_join_element_wise('"', pc.cast(values, STR), '"', "")


def booleans(values: pa.Array) -> pa.Array:
    return pc.if_else(values, "true", "false")


def lists(values: pa.Array | pa.ChunkedArray, items: Callable[[pa.Array], pa.Array]) -> pa.Array:
    """list<T> → JSON arrays of ``items(flattened values)``; null elements → ``null``.

    Null and empty lists give null (absent): protojson omits empty repeated fields.
    """
    values = contiguous(values)
    n = len(values)
    if n == 0 or values.null_count == n:
        return pa.nulls(n, STR)
    offsets = values.offsets
    start, end = offsets[0].as_py(), offsets[-1].as_py()
    flat = values.values.slice(start, end - start)
    text = pc.fill_null(items(flat), "null")
    if start:
        offsets = pc.subtract(offsets, pa.scalar(start, offsets.type))
    joined = pc.binary_join(pa.ListArray.from_arrays(offsets, text), ",")
    arrays = pc.binary_join_element_wise("[", joined, "]", "")
    return keep(arrays, pc.greater(pc.list_value_length(values), 0))


def string_lists(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    """list<string> → JSON arrays of strings (null and empty lists → null, null elements → ``null``).

    When no element needs escaping each list is one join with ``","`` between
    the elements; lists holding a null element take the general path.
    """
    values = contiguous(values)
    n = len(values)
    if n == 0 or values.null_count == n:
        return pa.nulls(n, STR)
    flat = values.values
    if flat.type != STR or _bytes_need_escape(flat):
        return lists(values, strings)
    text = pc.binary_join_element_wise('["', pc.binary_join(values, '","'), '"]', "")
    if flat.null_count:
        text = pc.if_else(pc.is_valid(text), text, lists(values, strings))
    return keep(text, pc.greater(pc.list_value_length(values), 0))


def literal(text: str, n: int) -> pa.Array:
    """The same text on every row."""
    return pa.repeat(text, n).cast(STR) if n else pa.array([], STR)


def keep(text: pa.Array, mask: pa.Array) -> pa.Array:
    """``text`` where ``mask`` is true, null elsewhere (a null mask counts as false).

    The text buffers are shared: only a new validity bitmap is built.
    """
    mask = pc.fill_null(mask, False)
    if text.null_count:
        mask = pc.and_(mask, pc.is_valid(text))
    if text.offset or mask.offset or text.type != STR:
        return pc.if_else(mask, text, NULL_STR)
    buffers = text.buffers()
    return pa.Array.from_buffers(STR, len(text), [mask.buffers()[1], buffers[1], buffers[2]])


def present(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Where a value is set as protojson sees it: not null, not zero, not empty, not false."""
    values = contiguous(values)
    t = values.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return pc.fill_null(pc.greater(pc.binary_length(values), 0), False)
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return pc.fill_null(pc.greater(pc.list_value_length(values), 0), False)
    if pa.types.is_boolean(t):
        return pc.fill_null(values, False)
    return pc.fill_null(pc.not_equal(values, pa.scalar(0, t)), False)


def any_of(masks: Sequence[pa.Array]) -> pa.Array:
    out = masks[0]
    for m in masks[1:]:
        out = pc.or_(out, m)
    return out


def field(key: str, value: pa.Array) -> pa.Array:
    """``"key":value`` where value is not null."""
    return pc.binary_join_element_wise(orjson.dumps(key).decode() + ":", value, "")


def join(fragments: Sequence[pa.Array], n: int) -> pa.Array:
    """The present fragments of each row, comma-separated ('' when none is present)."""
    if not fragments:
        return pa.array([""] * n, STR)
    if len(fragments) == 1:
        return pc.fill_null(fragments[0], "")
    some = any_of([pc.is_valid(f) for f in fragments])
    if some.false_count:
        # Arrow drops the rows where every input is null (pyarrow 26): give those rows one empty fragment
        fragments = [pc.if_else(some, fragments[0], ""), *fragments[1:]]
    return pc.binary_join_element_wise(*fragments, ",", options=_SKIP)


def member(key: str, body: pa.Array, where: pa.Array | None = None) -> pa.Array:
    """``"key":{body}`` — everywhere, or only where ``where`` is true."""
    text = pc.binary_join_element_wise(orjson.dumps(key).decode() + ":{", body, "}", "")
    return text if where is None else keep(text, where)


def concat(pieces: Sequence[pa.Array | str]) -> pa.Array:
    """Pieces written one after the other; a null piece writes nothing."""
    return pc.binary_join_element_wise(*pieces, "", options=_EMPTY)


def time_literals(ns: pa.Array | pa.ChunkedArray, second_text: Callable[[int], str]) -> pa.Array:
    """Timestamps as quoted RFC 3339 text trimmed like protojson (0, 3, 6 or 9 fraction digits).

    The text of each distinct second comes from ``second_text``; digits and
    trimming are numpy on a fixed-width byte matrix, so no Python runs per row.
    """
    ns = contiguous(ns)
    n = len(ns)
    if n == 0 or ns.null_count == n:
        return pa.nulls(n, STR)
    ints = pc.fill_null(ns.cast(pa.int64()), 0).to_numpy(zero_copy_only=False)
    seconds, nanos = np.divmod(ints, 1_000_000_000)
    distinct, inverse = np.unique(seconds, return_inverse=True)
    bases = [second_text(int(s)) for s in distinct]
    if any(len(b) != 19 for b in bases):  # years outside 1000..9999: rare enough for Python
        text = pa.array([f'"{bases[i]}{_fraction(int(v))}Z"' for i, v in zip(inverse.reshape(-1), nanos, strict=True)], STR)
        return keep(text, pc.is_valid(ns))
    base_bytes = np.frombuffer("".join(bases).encode(), dtype=np.uint8).reshape(len(bases), 19)
    digits = (nanos[:, None] // (10 ** np.arange(8, -1, -1, dtype=np.int64))) % 10 + 48
    width = np.where(nanos == 0, 0, np.where(nanos % 1_000_000 == 0, 3, np.where(nanos % 1000 == 0, 6, 9)))
    matrix = np.empty((n, 32), dtype=np.uint8)
    matrix[:, 0] = 0x22
    matrix[:, 1:20] = base_bytes[inverse.reshape(-1)]
    matrix[:, 20] = 0x2E
    matrix[:, 21:30] = digits
    matrix[:, 30] = 0x5A
    matrix[:, 31] = 0x22
    wanted = np.ones((n, 32), dtype=bool)
    wanted[:, 20] = width > 0
    wanted[:, 21:30] = np.arange(9) < width[:, None]
    lengths = 22 + (width > 0) + width
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    data = matrix[wanted]
    text = pa.Array.from_buffers(STR, n, [None, pa.py_buffer(offsets), pa.py_buffer(data)])
    return keep(text, pc.is_valid(ns)) if ns.null_count else text


def _fraction(nanos: int) -> str:
    if nanos == 0:
        return ""
    if nanos % 1_000_000 == 0:
        return f".{nanos // 1_000_000:03d}"
    if nanos % 1_000 == 0:
        return f".{nanos // 1_000:06d}"
    return f".{nanos:09d}"


def text_buffer(lines: pa.Array) -> memoryview:
    """The bytes of a string column's values laid end to end, without copying."""
    width = np.int64 if pa.types.is_large_string(lines.type) else np.int32
    offsets = np.frombuffer(lines.buffers()[1], dtype=width, count=len(lines) + 1,
                            offset=lines.offset * np.dtype(width).itemsize)
    data = lines.buffers()[2]
    if data is None:
        return memoryview(b"")
    return memoryview(data)[int(offsets[0]):int(offsets[-1])]
