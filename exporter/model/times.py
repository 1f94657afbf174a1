"""Time as text: RFC 3339 in the spellings flowship writes, and back.

* protojson (Hubble JSON, aggregate rows as JSON): 0, 3, 6 or 9 fraction
  digits, as ``protojson`` prints a ``google.protobuf.Timestamp`` —
  :func:`format_time` for one value (the encoders build columns of it themselves);
* ECS (``date_nanos``, Loki labels and logfmt): always nine digits —
  :func:`nanos_times`;
* a Python ``datetime`` (aggregate values, "now"): :func:`datetime_text`.

:func:`parse_time` reads either (and any RFC 3339 offset) back to ns.
"""

from __future__ import annotations

import functools
import re
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from flowship.model.schema import TIMESTAMP

_TIME_RE = re.compile(r"(\d{4})-(\d\d)-(\d\d)[Tt ](\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))?(Z|z|[+-]\d\d:\d\d)$")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def parse_time(value: Any) -> int:
    """RFC 3339 text (or a protojson ``{seconds, nanos}`` object) → ns since the epoch."""
    if isinstance(value, dict):
        return int(value.get("seconds", 0)) * 1_000_000_000 + int(value.get("nanos", 0))
    if not isinstance(value, str):
        raise ValueError(f"timestamp must be RFC 3339 text, got {value!r}")
    m = _TIME_RE.match(value)
    if not m:
        raise ValueError(f"timestamp is not RFC 3339: {value!r}")
    y, mo, d, h, mi, s, frac, tz = m.groups()
    seconds = _seconds(y, mo, d, h, mi, s)
    if tz not in ("Z", "z"):
        sign = 1 if tz[0] == "+" else -1
        seconds -= sign * (int(tz[1:3]) * 3600 + int(tz[4:6]) * 60)
    nanos = int((frac or "0").ljust(9, "0"))
    return seconds * 1_000_000_000 + nanos


@functools.lru_cache(maxsize=4096)
def _seconds(y: str, mo: str, d: str, h: str, mi: str, s: str) -> int:
    return int((datetime(int(y), int(mo), int(d), int(h), int(mi), int(s), tzinfo=UTC) - _EPOCH).total_seconds())


def second_text(seconds: int) -> str:
    """Whole seconds since the epoch as ``YYYY-MM-DDTHH:MM:SS`` (UTC)."""
    return _second_text(seconds)


@functools.lru_cache(maxsize=4096)
def _second_text(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")


def format_time(ns: int) -> str:
    """ns since the epoch → RFC 3339 as protojson prints it (0/3/6/9 fraction digits)."""
    seconds, nanos = divmod(ns, 1_000_000_000)
    base = _second_text(seconds)
    if nanos == 0:
        return base + "Z"
    if nanos % 1_000_000 == 0:
        return f"{base}.{nanos // 1_000_000:03d}Z"
    if nanos % 1_000 == 0:
        return f"{base}.{nanos // 1_000:06d}Z"
    return f"{base}.{nanos:09d}Z"


def datetime_text(value: datetime) -> str:
    """A timezone-aware datetime as RFC 3339 (``isoformat`` with ``Z`` for UTC, microseconds when set)."""
    return value.isoformat().replace("+00:00", "Z")


def nanos_times(ts: pa.Array) -> pa.Array:
    """Timestamps as RFC 3339 text with nanoseconds and a Z (UTC)."""
    if not pa.types.is_timestamp(ts.type):
        return pc.cast(ts, pa.string())
    if ts.type != TIMESTAMP:
        ts = pc.cast(ts, TIMESTAMP)
    # strftime costs microseconds per value: format each distinct second once,
    # then append the nanoseconds as nine zero-padded digits.
    ns = ts.cast(pa.int64())
    valid = ns.is_valid()
    values = ns.fill_null(0).to_numpy(zero_copy_only=False)
    seconds = values // 1_000_000_000
    distinct, inverse = np.unique(seconds, return_inverse=True)
    as_ts = pa.array(distinct * 1_000_000_000, pa.int64()).cast(TIMESTAMP)
    text = pc.strftime(as_ts.cast(pa.timestamp("s", tz="UTC")), format="%Y-%m-%dT%H:%M:%S")
    sec_text = text.take(pa.array(inverse.reshape(-1), pa.int64()))
    frac = pc.utf8_lpad(pa.array(values - seconds * 1_000_000_000, pa.int64()).cast(pa.string()), 9, "0")
    out = pc.binary_join_element_wise(sec_text, ".", frac, "Z", "")
    return out if ns.null_count == 0 else pc.if_else(valid, out, pa.scalar(None, pa.string()))
