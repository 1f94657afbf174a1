"""``stdin`` source: Hubble JSON lines piped in, e.g. ``hubble observe -o jsonpb --follow | flowship export``.

Nothing to checkpoint: what was read cannot be read again, so a stop flushes
everything already decoded before exiting. Gzip input (``zcat``-less
``flowship export < events.log.gz``) is recognised by its magic bytes and
decompressed as it arrives; a byte order mark and multi-line JSON documents
are handled as in every line source (:mod:`flowship.sources.lines`).
"""

from __future__ import annotations

import os
import select
import sys
import threading
import time
import zlib
from dataclasses import dataclass
from typing import Any

from flowship.components import Context, Emit, Source
from flowship.config import Duration
from flowship.pipeline.envelope import Receipt
from flowship.sources.lines import BatchAccumulator, LineDecoder, LineStats, split_complete


@dataclass
class StdinSourceConfig:
    batch_rows: int = 65536
    flush_interval: Duration = Duration(1.0)  # emit a partial batch when input pauses this long


GZIP_MAGIC = b"\x1f\x8b"


class _Gunzip:
    """Incremental gzip decompression of a stream, member after member (as ``cat a.gz b.gz`` gives)."""

    def __init__(self) -> None:
        self._z = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        self.in_member = False  # inside a member that has not ended yet
        self.total = 0  # decompressed bytes so far

    def feed(self, data: bytes) -> bytes:
        """Decompressed bytes of ``data``; zlib.error for a corrupt stream."""
        out = []
        while data:
            self.in_member = True
            out.append(self._z.decompress(data))
            if not self._z.eof:
                break
            self.in_member = False
            data = self._z.unused_data
            self._z = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        piece = b"".join(out)
        self.total += len(piece)
        return piece


class StdinSource(Source):
    config: StdinSourceConfig

    def __init__(self, config: StdinSourceConfig, ctx: Context, stream: Any = None) -> None:
        super().__init__(config, ctx)
        self.stream = stream if stream is not None else sys.stdin.buffer
        self.stats = LineStats()

    def run(self, emit: Emit, stop: threading.Event) -> None:
        from flowship.model.schema import empty_flows  # Arrow: when the source runs, not when it is validated

        decoder = LineDecoder(self.ctx, "<stdin>", self.stats)
        acc = BatchAccumulator(self.config.batch_rows)
        fd = self.stream.fileno()
        pending = b""
        last_emit = time.monotonic()

        def flush() -> None:
            batch, position = acc.take()
            if position is not None:
                emit(batch if batch is not None else empty_flows(), Receipt(rows=0))

        head = b""  # the first bytes, until there are enough to tell gzip from text
        gunzip: _Gunzip | None = None
        while not stop.is_set():
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready:
                data = os.read(fd, 4 * 1024 * 1024)
                if not data:
                    break
                if head is not None:
                    head += data
                    if len(head) < len(GZIP_MAGIC):
                        continue
                    data, head = head, None
                    if data.startswith(GZIP_MAGIC):
                        gunzip = _Gunzip()
                if gunzip is not None:
                    try:
                        data = gunzip.feed(data)
                    except zlib.error as exc:
                        self._corrupt(decoder, pending, gunzip, exc)
                        pending, gunzip = b"", None
                        break
                lines, pending = split_complete(pending + data)
                if lines:
                    acc.add(decoder.decode(lines), decoder.line)
            if acc.full or (acc.rows and time.monotonic() - last_emit >= self.config.flush_interval):
                flush()
                last_emit = time.monotonic()
        if head:  # a single byte of input
            pending += head
        if gunzip is not None and gunzip.in_member:
            self._corrupt(decoder, pending, gunzip, "the stream ends inside a gzip member")
            pending = b""
        if pending.strip():
            acc.add(decoder.decode(pending + b"\n"), decoder.line)
        acc.add(decoder.finish(), decoder.line)
        flush()

    @staticmethod
    def _corrupt(decoder: LineDecoder, pending: bytes, gunzip: _Gunzip, error: object) -> None:
        """A gzip stream cut short or damaged: every complete line before it was kept; say where it broke."""
        decoder.reject(decoder.line + 1, f"truncated or corrupt gzip stream after {gunzip.total} bytes: {error}")
        if pending.strip():
            decoder.line += 1  # the partial line before the cut is not trustworthy

    def summary(self) -> dict[str, Any]:
        return {"lines": self.stats.lines, "flows": self.stats.flows, "rejected": self.stats.rejected,
                "rejected_by_reason": dict(self.stats.reasons), "lost_events": self.stats.lost_events}
