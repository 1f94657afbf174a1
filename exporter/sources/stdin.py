"""``stdin`` source: Hubble JSON lines piped in, e.g. ``hubble observe -o jsonpb --follow | flowship export``.

Nothing to checkpoint: what was read cannot be read again, so a stop flushes
everything already decoded before exiting.
"""

from __future__ import annotations

import os
import select
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from exporter.components import Context, Emit, Source
from exporter.config import Duration
from exporter.model.schema import empty_flows
from exporter.pipeline.envelope import Receipt
from exporter.sources.lines import BatchAccumulator, LineDecoder, LineStats, split_complete


@dataclass
class StdinSourceConfig:
    batch_rows: int = 65536
    flush_interval: Duration = Duration(1.0)  # emit a partial batch when input pauses this long


class StdinSource(Source):
    config: StdinSourceConfig

    def __init__(self, config: StdinSourceConfig, ctx: Context, stream: Any = None) -> None:
        super().__init__(config, ctx)
        self.stream = stream if stream is not None else sys.stdin.buffer
        self.stats = LineStats()

    def run(self, emit: Emit, stop: threading.Event) -> None:
        decoder = LineDecoder(self.ctx, "<stdin>", self.stats)
        acc = BatchAccumulator(self.config.batch_rows)
        fd = self.stream.fileno()
        pending = b""
        last_emit = time.monotonic()

        def flush() -> None:
            batch, position = acc.take()
            if position is not None:
                emit(batch if batch is not None else empty_flows(), Receipt(rows=0))

        while not stop.is_set():
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready:
                data = os.read(fd, 4 * 1024 * 1024)
                if not data:
                    break
                lines, pending = split_complete(pending + data)
                if lines:
                    acc.add(decoder.decode(lines), decoder.line)
            if acc.full or (acc.rows and time.monotonic() - last_emit >= self.config.flush_interval):
                flush()
                last_emit = time.monotonic()
        if pending.strip():
            acc.add(decoder.decode(pending + b"\n"), decoder.line)
        flush()

    def summary(self) -> dict[str, Any]:
        return {"lines": self.stats.lines, "flows": self.stats.flows, "rejected": self.stats.rejected,
                "rejected_by_reason": dict(self.stats.reasons), "lost_events": self.stats.lost_events}
