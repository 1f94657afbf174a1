"""``parquet`` sink: Hive-partitioned Parquet files for offline analytics.

Layout: ``<path>/flows/dt=YYYY-MM-DD/hour=HH/<file>.parquet`` (and
``<path>/aggregates/...`` for aggregate rows), partitioned by the flow's own
time (UTC). Each file is written in one go from an in-memory buffer that is
sorted by time first, so rows are sorted by time inside every file and memory
is bounded by ``max_file_rows`` and ``max_buffer_bytes`` per open partition. A
file is published when its buffer reaches either limit or its oldest row
waited ``max_file_age``, and at shutdown.

Publishing is atomic: the file is written under a dot-prefixed ``.tmp`` name
(skipped by Parquet readers' discovery and by ``*.parquet`` globs), fsync'd,
renamed into place, and the directory fsync'd. Only then are the flows in it
acknowledged, so a crash loses nothing that was acknowledged; it can leave a
``.tmp`` file behind, which the next start removes.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from flowship.components import Context, Sink
from flowship.config import ByteSize, Duration, positive_ints
from flowship.model.schema import LOW_CARDINALITY_COLUMNS
from flowship.pipeline.envelope import Envelope, Receipt
from flowship.sinks import row_times, time_column

HOUR_NS = 3600 * 1_000_000_000


@dataclass
class ParquetSinkConfig:
    path: str = "./flows"
    max_file_rows: int = 131_072  # rows per file (one sort + write)
    max_buffer_bytes: ByteSize = ByteSize(128 << 20)  # publish a partition's file once it holds this much
    row_group_rows: int = 131_072  # rows per row group (DuckDB reads row groups in parallel)
    max_file_age: Duration = Duration(60.0)  # publish a partly filled file after this long
    compression: str = "zstd"
    compression_level: int = 1  # zstd 1: ~20 % faster writes than 3 for ~4 % larger files here
    dictionary_columns: list[str] = field(default_factory=lambda: sorted(LOW_CARDINALITY_COLUMNS))
    fsync: bool = True

    def validate(self) -> list[str]:
        problems = positive_ints(self, "max_file_rows", "row_group_rows")
        if self.compression not in ("zstd", "snappy", "gzip", "lz4", "brotli", "none"):
            problems.append(f"compression: expected one of zstd, snappy, gzip, lz4, brotli, none; got {self.compression!r}")
        return problems


@dataclass
class _Partition:
    kind: str
    hour: int  # hours since the epoch
    batches: list[pa.RecordBatch] = field(default_factory=list)
    receipts: list[Receipt] = field(default_factory=list)
    acks: list[Envelope] = field(default_factory=list)
    rows: int = 0
    nbytes: int = 0
    opened: float = field(default_factory=time.monotonic)


class ParquetSink(Sink):
    config: ParquetSinkConfig

    def __init__(self, config: ParquetSinkConfig, ctx: Context) -> None:
        super().__init__(config, ctx)
        self.root = Path(config.path)
        self._open: dict[tuple[str, int], _Partition] = {}
        self._files = ctx.metrics.sink_batches(ctx.name, "file_written")
        self._bytes = ctx.metrics.sink_bytes(ctx.name)
        self._latency = ctx.metrics.sink_latency(ctx.name)
        self._seq = 0
        self.files_written: list[Path] = []

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for leftover in self.root.glob("*/dt=*/hour=*/.*.tmp"):
            self.ctx.log.warning("removing unpublished file from an earlier run", file=str(leftover))
            leftover.unlink(missing_ok=True)

    # -- buffering ----------------------------------------------------------------------------
    def write(self, env: Envelope) -> None:
        batch = env.batch
        times = row_times(batch, env.kind)
        hours = times // HOUR_NS
        distinct = np.unique(hours)
        # The envelope's receipts settle once every partition holding its rows is published.
        for _ in distinct[1:]:
            env.retain()
        count_delivered = env.on_ack
        for hour in distinct.tolist():
            part = self._open.get((env.kind, hour))
            if part is None:
                part = self._open[(env.kind, hour)] = _Partition(env.kind, hour)
            rows = batch if len(distinct) == 1 else batch.filter(pa.array(hours == hour))
            part.batches.append(rows)
            part.rows += rows.num_rows
            part.nbytes += rows.nbytes
            part.acks.append(Envelope(rows, list(env.receipts), env.kind, count_delivered))
            if part.rows >= self.config.max_file_rows or part.nbytes >= self.config.max_buffer_bytes:
                self._publish(part)
        env.receipts = []
        env.on_ack = None

    def tick(self, now_ns: int) -> None:
        now = time.monotonic()
        for part in list(self._open.values()):
            if now - part.opened >= self.config.max_file_age:
                self._publish(part)

    def flush(self) -> None:
        for part in list(self._open.values()):
            self._publish(part)

    # -- publishing ---------------------------------------------------------------------------
    def _publish(self, part: _Partition) -> None:
        self._open.pop((part.kind, part.hour), None)
        if not part.rows:
            return
        started = time.perf_counter()
        table = pa.Table.from_batches(part.batches).combine_chunks()
        column = time_column(table, part.kind)
        table = table.take(pc.sort_indices(table, sort_keys=[(column, "ascending")]))
        # Files never exceed max_file_rows even when one batch overshoots the buffer.
        for start in range(0, table.num_rows, self.config.max_file_rows):
            self._write_file(part, table.slice(start, self.config.max_file_rows))
        for env in part.acks:
            env.ack()
        self._latency.observe(time.perf_counter() - started)

    def _write_file(self, part: _Partition, table: pa.Table) -> None:
        when = datetime.fromtimestamp(part.hour * 3600, UTC)
        directory = self.root / part.kind / f"dt={when:%Y-%m-%d}" / f"hour={when:%H}"
        directory.mkdir(parents=True, exist_ok=True)
        self._seq += 1
        first = table.column(time_column(table, part.kind))[0].cast(pa.int64()).as_py()
        name = f"{self.ctx.node_name}-{first}-{self._seq:06d}-{uuid.uuid4().hex[:8]}.parquet"
        final = directory / name
        tmp = directory / f".{name}.tmp"
        dictionary = [c for c in self.config.dictionary_columns if c in table.schema.names]
        compression = None if self.config.compression == "none" else self.config.compression
        level = self.config.compression_level if compression in ("zstd", "gzip", "brotli") else None
        with open(tmp, "wb") as fh:
            pq.write_table(table, fh, row_group_size=self.config.row_group_rows, compression=compression,
                           compression_level=level, use_dictionary=dictionary or False,
                           write_statistics=True, coerce_timestamps=None)
            fh.flush()
            if self.config.fsync:
                os.fsync(fh.fileno())
        os.replace(tmp, final)
        if self.config.fsync:
            dir_fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        self._files.inc()
        self._bytes.inc(final.stat().st_size)
        self.files_written.append(final)
        self.ctx.log.debug("parquet file published", file=str(final), rows=table.num_rows)
