"""``file`` and ``stdout`` sinks: JSON lines, as Hubble JSON or as ECS documents.

``format: hubble`` writes ExportEvent lines exactly as Hubble's exporter does
(the ``file`` source and Hubble tooling read them back); ``format: ecs``
writes the ECS documents the Elasticsearch sink indexes, for SIEM tools that
tail files. The file sink appends, flushes and (by default) fsyncs each batch
before acknowledging it, and rotates by size keeping ``max_backups`` old
files, like Hubble's exporter.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Literal

from flowship.components import Context, Sink
from flowship.config import ByteSize
from flowship.pipeline.envelope import Envelope
from flowship.sinks import aggregate_json

if TYPE_CHECKING:
    import pyarrow as pa

Format = Literal["hubble", "ecs"]


def encode(batch: pa.RecordBatch, kind: str, fmt: Format) -> list[bytes]:
    """Lines (newline-terminated) for a batch in the chosen format.

    Aggregate rows have no Hubble form: ``format: hubble`` writes them as
    :func:`flowship.sinks.aggregate_json` objects.
    """
    # the encoders are Arrow code: imported when rows are written, not when a config is validated
    if fmt == "ecs":
        from flowship.model import ecs_encode

        return ecs_encode.encode_ndjson(batch, kind=kind)
    if kind != "flows":
        return [line + b"\n" for line in aggregate_json(batch)]
    from flowship.model.hubble_encode import encode_lines

    return encode_lines(batch)


def encode_body(batch: pa.RecordBatch, kind: str, fmt: Format) -> bytes | memoryview:
    """The lines of :func:`encode` laid end to end, as one buffer.

    Flows are written straight from the encoder's Arrow text buffer: no
    Python object per line, so a sink's memory stays near one batch of text.
    """
    if kind != "flows":
        return b"".join(encode(batch, kind, fmt))
    if fmt == "ecs":
        from flowship.model import ecs_encode

        return ecs_encode.ndjson_buffer(batch)
    from flowship.model.hubble_encode import ndjson_buffer

    return ndjson_buffer(batch)


@dataclass
class FileSinkConfig:
    path: str = "./flows.jsonl"
    format: Format = "hubble"
    fsync: bool = True  # fsync before acknowledging each batch
    max_bytes: ByteSize = ByteSize(0)  # rotate when the file would exceed this; 0 = never
    max_backups: int = 5


@dataclass
class StdoutSinkConfig:
    format: Format = "hubble"


class _LineSink(Sink):
    def __init__(self, config, ctx: Context) -> None:  # noqa: ANN001 - either config type
        super().__init__(config, ctx)
        self._bytes = ctx.metrics.sink_bytes(ctx.name)
        self._batches = ctx.metrics.sink_batches(ctx.name, "ok")
        self._latency = ctx.metrics.sink_latency(ctx.name)

    def _stream(self) -> BinaryIO:
        raise NotImplementedError

    def _durable(self, stream: BinaryIO) -> None:
        stream.flush()

    def write(self, env: Envelope) -> None:
        started = time.perf_counter()
        data = encode_body(env.batch, env.kind, self.config.format)
        stream = self._stream_for(len(data))
        stream.write(data)
        self._durable(stream)
        self._bytes.inc(len(data))
        self._batches.inc()
        self._latency.observe(time.perf_counter() - started)
        env.ack()

    def _stream_for(self, size: int) -> BinaryIO:
        return self._stream()


class StdoutSink(_LineSink):
    config: StdoutSinkConfig

    def _stream(self) -> BinaryIO:
        return sys.stdout.buffer


class FileSink(_LineSink):
    config: FileSinkConfig

    def __init__(self, config: FileSinkConfig, ctx: Context) -> None:
        super().__init__(config, ctx)
        self.path = Path(config.path)
        self._fh: BinaryIO | None = None

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "ab")

    def _stream(self) -> BinaryIO:
        assert self._fh is not None, "start() opens the file"
        return self._fh

    def _stream_for(self, size: int) -> BinaryIO:
        fh = self._stream()
        limit = self.config.max_bytes
        if limit and fh.tell() > 0 and fh.tell() + size > limit:
            self._rotate()
        return self._stream()

    def _rotate(self) -> None:
        assert self._fh is not None
        self._fh.close()
        for i in range(self.config.max_backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
        if self.config.max_backups > 0:
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        else:
            self.path.unlink()
        self._fh = open(self.path, "ab")

    def _durable(self, stream: BinaryIO) -> None:
        stream.flush()
        if self.config.fsync:
            os.fsync(stream.fileno())

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
