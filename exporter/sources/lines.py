"""Shared machinery of the line-oriented sources (file, stdin).

Turns a byte stream of Hubble JSON lines into flow batches: splits on line
boundaries (carrying a partial last line over), decodes with
:mod:`exporter.model.hubble_json`, reports each bad line with ``name:line``
and its reason, counts lost events, and groups decoded rows into batches of
about ``batch_rows`` so that the columnar stages see large batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from exporter.components import Context
from exporter.model.hubble_json import decode_lines

MAX_REPORTED_ERRORS = 20  # per input: after that, errors are only counted


@dataclass
class LineStats:
    lines: int = 0
    flows: int = 0
    rejected: int = 0
    lost_events: int = 0
    other_events: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


def _reason_category(reason: str) -> str:
    """A short, bounded label for the rejected-lines metric."""
    if reason.startswith("invalid JSON"):
        return "invalid_json"
    if "timestamp" in reason or "no time" in reason:
        return "bad_time"
    if "neither a flow" in reason or "expected a JSON object" in reason:
        return "not_a_flow"
    if "truncated" in reason:
        return "truncated"
    return "bad_value"


class LineDecoder:
    """Decode complete-line chunks of one named input; keep per-input counts."""

    def __init__(self, ctx: Context, name: str, stats: LineStats) -> None:
        self.ctx = ctx
        self.name = name
        self.stats = stats
        self.line = 0  # number of the last line consumed
        self._reported = 0

    def decode(self, chunk: bytes) -> pa.RecordBatch:
        result = decode_lines(chunk, first_line=self.line + 1)
        self.line += chunk.count(b"\n") + (0 if chunk.endswith(b"\n") or not chunk else 1)
        self.stats.lines += chunk.count(b"\n")
        for number, reason in result.errors:
            self.reject(number, reason)
        for lost in result.lost_events:
            count = int(lost.get("num_events_lost") or 0)
            self.stats.lost_events += count
            self.ctx.metrics.record_lost(self.ctx.name, str(lost.get("source")), count)
            self.ctx.log.warning("upstream lost events", input=self.name, lost_source=lost.get("source"),
                                 count=count, node=lost.get("node_name"))
        self.stats.other_events += result.other_events
        self.stats.flows += result.batch.num_rows
        return result.batch

    def reject(self, number: int, reason: str) -> None:
        category = _reason_category(reason)
        self.stats.rejected += 1
        self.stats.reasons[category] = self.stats.reasons.get(category, 0) + 1
        self.ctx.metrics.rejected(self.ctx.name, category).inc()
        if self._reported < MAX_REPORTED_ERRORS:
            where = f"{self.name}:{number}" if number > 0 else self.name
            self.ctx.log.warning("rejected input line", where=where, reason=reason[:300])
            self._reported += 1
            if self._reported == MAX_REPORTED_ERRORS:
                self.ctx.log.warning("more rejected lines are counted but not logged", input=self.name)


class BatchAccumulator:
    """Collects decoded batches until ``batch_rows``, remembering the last position."""

    def __init__(self, batch_rows: int) -> None:
        self.batch_rows = batch_rows
        self._batches: list[pa.RecordBatch] = []
        self._rows = 0
        self.position: Any = None

    def add(self, batch: pa.RecordBatch, position: Any) -> None:
        if batch.num_rows:
            self._batches.append(batch)
            self._rows += batch.num_rows
        self.position = position

    @property
    def full(self) -> bool:
        return self._rows >= self.batch_rows

    @property
    def rows(self) -> int:
        return self._rows

    def take(self) -> tuple[pa.RecordBatch | None, Any]:
        """(combined batch or None if only positions advanced, position) and reset."""
        position, batches = self.position, self._batches
        self._batches, self._rows, self.position = [], 0, None
        if not batches:
            return None, position
        if len(batches) == 1:
            return batches[0], position
        return pa.Table.from_batches(batches).combine_chunks().to_batches()[0], position


def split_complete(buffer: bytes) -> tuple[bytes, bytes]:
    """(complete lines, trailing partial line)."""
    cut = buffer.rfind(b"\n")
    if cut < 0:
        return b"", buffer
    return buffer[: cut + 1], buffer[cut + 1:]
