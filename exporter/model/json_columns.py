"""Vectorised JSON building: whole columns of JSON text from Arrow columns.

Encoding a flow per Python dict costs tens of microseconds; building the
text of every row at once with Arrow's string kernels costs a fraction of a
microsecond per row. The pieces here compose: a *member* column holds
``"key":value`` text or null (an absent field), :func:`obj` joins members
into ``{...}`` skipping nulls, and values come from :func:`string`,
:func:`number`, :func:`quoted_number`, :func:`boolean`, :func:`string_list`.

Strings are escaped for ``\\``, ``"`` and the common control characters;
rows holding other control characters are reported by :func:`needs_slow_path`
so callers can encode them with a real JSON library instead (the object
marker of :func:`obj` is such a character, so it never collides with data).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from flowship.model.columns import nonempty, nonzero

STR = pa.string()
_CONTROL = r"[\x00-\x08\x0b\x0c\x0e-\x1f]"


def _lit(n: int, text: str) -> pa.Array:
    return pa.array([text] * n, STR) if n else pa.array([], STR)


_SPECIAL = r'[\\"\n\r\t]'
# Marks the start of an object's members; removed with the comma after it by finish().
_OPEN = "\x01"


def escape(values: pa.Array) -> pa.Array:
    values = values.cast(STR) if values.type != STR else values
    if values.null_count == len(values) or not pc.any(pc.match_substring_regex(values, _SPECIAL)).as_py():
        return values  # nothing to escape: the common case, one scan
    values = pc.replace_substring(values, "\\", "\\\\")
    values = pc.replace_substring(values, '"', '\\"')
    values = pc.replace_substring(values, "\n", "\\n")
    values = pc.replace_substring(values, "\r", "\\r")
    return pc.replace_substring(values, "\t", "\\t")


def needs_slow_path(values: pa.Array) -> np.ndarray:
    """Rows whose text holds control characters this module does not escape."""
    if values.null_count == len(values):
        return np.zeros(len(values), dtype=bool)
    hit = pc.match_substring_regex(values, _CONTROL)
    return pc.fill_null(hit, False).to_numpy(zero_copy_only=False)


def string(values: pa.Array) -> pa.Array:
    """JSON string literals (null stays null)."""
    return pc.binary_join_element_wise('"', escape(values), '"', "")


def number(values: pa.Array) -> pa.Array:
    return pc.cast(values, STR)


def quoted_number(values: pa.Array) -> pa.Array:
    """64-bit integers as protojson writes them: in quotes."""
    return pc.binary_join_element_wise('"', pc.cast(values, STR), '"', "")


def boolean(values: pa.Array) -> pa.Array:
    return pc.if_else(values, "true", "false")


def string_list(values: pa.Array) -> pa.Array:
    """list<string> → JSON arrays of strings (null and empty lists → null)."""
    return object_list(values, string)


def object_list(values: pa.Array, build) -> pa.Array:  # noqa: ANN001 - build: struct array → object text
    """list<struct> → JSON arrays of objects built by ``build`` from the flattened structs."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if values.null_count == len(values):
        return pa.nulls(len(values), STR)
    items = build(values.values)
    rebuilt = pa.ListArray.from_arrays(values.offsets, items)  # null rows become null through if_else below
    text = pc.binary_join_element_wise("[", pc.binary_join(rebuilt, ","), "]", "")
    return pc.if_else(pc.equal(pc.list_value_length(values), 0), pa.scalar(None, STR), text)


def member(key: str, value: pa.Array) -> pa.Array:
    """``,"key":value`` where value is not null (the comma is dropped for first members)."""
    return pc.binary_join_element_wise(f',"{key}":', value, "")


def obj(members: list[pa.Array], n: int, keep_empty: bool = False) -> pa.Array:
    """``{m1,m2,...}`` of the non-null members; null when all are null unless ``keep_empty``.

    The text carries an internal marker until :func:`finish` runs on the final column.
    """
    if not members:
        return _lit(n, "{}") if keep_empty else pa.nulls(n, STR)
    parts = [pc.fill_null(mem, "") for mem in members]
    text = pc.binary_join_element_wise("{" + _OPEN, *parts, "}", "")
    if keep_empty:
        return text
    any_member = pc.is_valid(members[0])
    for m in members[1:]:
        any_member = pc.or_(any_member, pc.is_valid(m))
    return pc.if_else(any_member, text, pa.scalar(None, STR))


def finish(text: pa.Array) -> pa.Array:
    """Remove the object markers (and the comma each one precedes): the text is JSON now."""
    return pc.replace_substring(pc.replace_substring(text, _OPEN + ",", ""), _OPEN, "")


def omit_default(values: pa.Array) -> pa.Array:
    """Null where the value is zero, empty or false: protojson omits default values."""
    if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
        return nonempty(values)
    if pa.types.is_boolean(values.type):
        return pc.if_else(values, True, pa.scalar(None, pa.bool_()))
    return nonzero(values)
