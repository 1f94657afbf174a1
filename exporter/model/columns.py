"""Small column helpers shared by the model's decoders, encoders and filter compiler, the stages and the sinks.

Flow columns repeat the same few values many times (a batch of 64k flows
holds a few hundred pods, URLs or label sets), so anything that needs Python
(an ``ipaddress`` check, a label parse, an HMAC) runs once per distinct value
and is mapped back to the rows with a numpy gather (:func:`distinct_map`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# scheme://authority of an absolute URL, and everything from '?' or '#' on.
_URL_PREFIX = r"^[A-Za-z][A-Za-z0-9+.\-]*://[^/?#]*"
_URL_SUFFIX = r"[?#].*$"


def as_array(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    """One contiguous array (RecordBatch columns already are; Table columns may not be)."""
    if isinstance(column, pa.ChunkedArray):
        return column.combine_chunks()
    return column


def to_mask(values: pa.Array | pa.ChunkedArray | np.ndarray) -> np.ndarray:
    """A boolean Arrow result as a numpy bool array, nulls counting as False."""
    if isinstance(values, np.ndarray):
        return values.astype(bool, copy=False)
    values = as_array(values)
    if values.null_count:
        values = values.fill_null(False)
    return values.to_numpy(zero_copy_only=False)


def distinct_map(column: pa.Array | pa.ChunkedArray, fn: Callable[[Any], Any], default: Any = False,
                 dtype: Any = bool) -> np.ndarray:
    """Apply ``fn`` to each distinct non-null value; nulls get ``default``."""
    column = as_array(column)
    n = len(column)
    if n == 0:
        return np.zeros(0, dtype=dtype)
    encoded = column if pa.types.is_dictionary(column.type) else pc.dictionary_encode(column)
    dictionary = encoded.dictionary.to_pylist()
    table = np.empty(len(dictionary) + 1, dtype=dtype)
    for i, value in enumerate(dictionary):
        table[i] = fn(value)
    table[-1] = default
    indices = encoded.indices
    if indices.null_count:
        indices = indices.fill_null(-1)
    return table[indices.to_numpy(zero_copy_only=False)]


def list_any(column: pa.Array | pa.ChunkedArray, element_mask: Callable[[pa.Array], np.ndarray]) -> np.ndarray:
    """Rows of a list column where at least one element satisfies ``element_mask``."""
    column = as_array(column)
    n = len(column)
    values = pc.list_flatten(column)
    if len(values) == 0:
        return np.zeros(n, dtype=bool)
    hits = element_mask(values)
    parents = pc.list_parent_indices(column).to_numpy(zero_copy_only=False)
    counts = np.bincount(parents[hits], minlength=n)
    return counts > 0


def url_path(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    """The path part of URLs that may be absolute (``http://h:8080/p?q``) or a request path."""
    stripped = pc.replace_substring_regex(as_array(column), _URL_PREFIX, "")
    return pc.replace_substring_regex(stripped, _URL_SUFFIX, "")


def not_null(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    return to_mask(pc.is_valid(as_array(column)))


def uint_values(column: pa.Array | pa.ChunkedArray, fill: int = 0) -> np.ndarray:
    """An integer column as int64 numpy values, nulls replaced by ``fill``."""
    column = as_array(column)
    if column.null_count:
        if fill < 0:
            column = column.cast(pa.int64())
        column = column.fill_null(fill)
    return column.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)


def nonempty(arr: pa.Array) -> pa.Array:
    """Empty strings (and empty lists) become null: protojson omits them and ECS treats them as absent."""
    if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
        return pc.if_else(pc.equal(pc.list_value_length(arr), 0), pa.scalar(None, arr.type), arr)
    return pc.if_else(pc.equal(arr, ""), pa.scalar(None, arr.type), arr)


def nonzero(arr: pa.Array) -> pa.Array:
    """Zeros become null (protojson omits default values)."""
    return pc.if_else(pc.equal(arr, 0), pa.scalar(None, arr.type), arr)
