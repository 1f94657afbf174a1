"""Envelopes and receipts: how a batch and its delivery promise travel together.

A source wraps every batch it emits with a :class:`Receipt`. The pipeline
retains the receipt once per sink branch; every branch releases it when its
sink has durably accepted the rows (written to disk, or acknowledged by the
server), or when a stage dropped the rows on purpose. When the count reaches
zero the source is told, and only then may it advance its checkpoint. This is
the at-least-once contract of flowship: a position is never committed before
every sink has its flows.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import pyarrow as pa

BatchKind = Literal["flows", "aggregates"]


class Receipt:
    """A reference-counted delivery promise for one source batch.

    ``on_done`` runs exactly once, in whichever thread releases the last
    reference. ``failed`` is set when a sink gave the rows up for good
    (dead-lettered); the source still advances, the loss is counted elsewhere.
    """

    __slots__ = ("_count", "_lock", "_on_done", "position", "rows", "done", "failed")

    def __init__(self, on_done: Callable[[Receipt], None] | None = None, position: object = None,
                 rows: int = 0) -> None:
        self._count = 1
        self._lock = threading.Lock()
        self._on_done = on_done
        self.position = position
        self.rows = rows
        self.done = False
        self.failed = False

    def retain(self, n: int = 1) -> None:
        with self._lock:
            if self.done:
                raise RuntimeError("retain() on a receipt that already completed")
            self._count += n

    def release(self, n: int = 1) -> None:
        with self._lock:
            self._count -= n
            if self._count < 0:
                raise RuntimeError("receipt released more often than retained")
            if self._count or self.done:
                return
            self.done = True
        if self._on_done is not None:
            self._on_done(self)


@dataclass
class Envelope:
    """A batch of rows plus every receipt its delivery settles."""

    batch: pa.RecordBatch
    receipts: list[Receipt] = field(default_factory=list)
    kind: BatchKind = "flows"
    on_ack: Callable[[int], None] | None = None  # the runtime counts delivered rows here
    counted: int = 0  # rows already reported to ``on_ack`` by :meth:`delivered`

    def delivered(self, rows: int) -> None:
        """Count rows the server accepted before the whole batch is settled.

        A sink that acknowledges a batch in parts (one bulk request after
        another) reports each part here, so that the run summary and the
        metrics count rows actually delivered, not only whole batches.
        """
        if self.on_ack is not None and rows:
            self.on_ack(rows)
            self.counted += rows

    def ack(self) -> None:
        """The rows are durably delivered (or deliberately dropped)."""
        if self.on_ack is not None:
            rest = self.batch.num_rows - self.counted
            if rest > 0:
                self.on_ack(rest)
            self.on_ack = None
        release_all(self.receipts)
        self.receipts = []

    def retain(self) -> None:
        for receipt in self.receipts:
            receipt.retain()

    def with_batch(self, batch: pa.RecordBatch) -> Envelope:
        """Same receipts, new rows: what a filtering or enriching stage returns."""
        return Envelope(batch, self.receipts, self.kind)


def release_all(receipts: Iterable[Receipt]) -> None:
    for receipt in receipts:
        receipt.release()
