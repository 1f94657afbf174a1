"""What the HTTP and DNS parsers and pairers share: the parse-error value, a batch's keys, its rows in order."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NamedTuple

import numpy as np


class ParseError(NamedTuple):
    """Why a payload snippet was not read as the protocol (a short, bounded reason)."""

    reason: str


def batch_keys(conn: np.ndarray, ts_ns: np.ndarray) -> tuple[list[int], list[int]]:
    """Connection keys and kernel timestamps of a batch as lists (the pairers read them row by row)."""
    return np.asarray(conn, dtype=np.uint64).tolist(), np.asarray(ts_ns, dtype=np.int64).tolist()


def rows_in_order(n: int, ts_l: list[int], expire: Callable[[int], int]) -> Iterator[int]:
    """The row indices ``0..n-1`` of a batch, with ``expire`` run around them.

    Pending entries older than the TTL are expired at the batch's first
    timestamp, before the new rows compete for room, and again at its last
    once every row has been read.
    """
    if ts_l:
        expire(min(ts_l))
    yield from range(n)
    if ts_l:
        expire(max(ts_l))
