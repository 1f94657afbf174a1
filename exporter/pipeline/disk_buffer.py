"""A per-sink disk buffer: an append-only, checksummed log of batches.

Between a sink's stages and the sink itself. Appending a batch makes it
durable (after the next fsync) and acknowledges it upstream at once, so the
source can checkpoint even while the sink is down; a drain thread then reads
batches back in order and hands them to the sink, and the buffer forgets a
batch only when the sink acknowledged it. After a crash, everything not yet
acknowledged by the sink is replayed (at-least-once: a batch the sink had
accepted just before the crash can be delivered twice).

On disk: ``<dir>/<20-digit number>.seg`` segment files of records

    magic "FSB1" | u32 payload length | u32 CRC-32 of payload | u8 kind | 3 bytes zero | payload

where the payload is one Arrow IPC stream (schema + one batch), and
``<dir>/ack.json`` holding the position (segment, offset) up to which the sink
acknowledged. On open, the segments after that position are scanned; a record
whose length or checksum does not hold (a torn write after a power cut) ends
the log there: it is reported, counted, and the file is truncated to the last
good record, which keeps every record before it.

Limits: ``max_bytes`` bounds the bytes the sink has not acknowledged yet
(disk use can exceed it by at most one segment, a quarter of the limit, since
space is given back a segment at a time); when full,
``when_full: block`` makes the sink's queue (and so the source) wait,
``drop_newest`` drops the incoming batch, counts its rows and logs it.
"""

from __future__ import annotations

import errno
import json
import os
import struct
import threading
import time
import zlib
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pyarrow as pa

from exporter.config import ByteSize, Duration
from exporter.metrics import Metrics
from exporter.pipeline.envelope import Envelope, Receipt

MAGIC = b"FSB1"
HEADER = struct.Struct("<4sIIB3x")
KINDS = {"flows": 0, "aggregates": 1}
KIND_NAMES = {v: k for k, v in KINDS.items()}


@dataclass
class BufferConfig:
    """``buffer:`` of a sink."""

    type: Literal["memory", "disk"] = "memory"
    path: str | None = None  # default: <data_dir>/buffers/<sink name>
    max_bytes: ByteSize = ByteSize(1 << 30)
    when_full: Literal["block", "drop_newest"] = "block"
    fsync: Literal["interval", "batch"] = "interval"  # fsync every fsync_interval, or after every batch
    fsync_interval: Duration = Duration(0.5)
    max_segment_bytes: ByteSize = ByteSize(64 << 20)

    def validate(self) -> list[str]:
        problems = []
        if isinstance(self.max_bytes, int) and isinstance(self.max_segment_bytes, int) \
                and self.max_segment_bytes > self.max_bytes:
            problems.append("max_segment_bytes: must not exceed max_bytes")
        return problems


def _serialize(batch: pa.RecordBatch) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


def _deserialize(payload: bytes) -> pa.RecordBatch:
    with pa.ipc.open_stream(payload) as reader:
        return reader.read_next_batch()


@dataclass(frozen=True)
class _Pos:
    segment: int
    offset: int


class DiskBuffer:
    """One sink's disk buffer. ``append`` from the sink thread, ``read`` from the drain thread."""

    def __init__(self, directory: Path, config: BufferConfig, metrics: Metrics, name: str, log) -> None:  # noqa: ANN001
        self.dir = Path(directory)
        self.config = config
        self.name = name
        self.log = log
        self._cond = threading.Condition()
        self._segments: dict[int, int] = {}  # segment number -> size in bytes
        self._write_fh = None
        self._write_seg = 0
        self._read_pos = _Pos(0, 0)
        self._acked = _Pos(0, 0)
        self._pending_sync: list[Envelope] = []
        self._inflight: deque[tuple[_Pos, Receipt]] = deque()
        self._last_sync = time.monotonic()
        self._closed = False
        self.replayed = 0
        self._bytes = metrics.gauge("flowship_buffer_bytes", "Bytes of segment files of a sink's disk buffer.", ["sink"]).labels(name)
        metrics.gauge("flowship_buffer_max_bytes", "Size limit of a sink's disk buffer.", ["sink"]).labels(name).set(
            config.max_bytes)
        self._records = metrics.gauge("flowship_buffer_records", "Batches in a sink's disk buffer not yet "
                                      "acknowledged by the sink.", ["sink"]).labels(name)
        self._dropped = metrics.counter("flowship_buffer_dropped_total", "Rows dropped because a disk buffer was "
                                        "full (when_full: drop_newest).", ["sink"]).labels(name)
        self._corrupt = metrics.counter("flowship_buffer_corrupt_total", "Torn or corrupt records found at "
                                        "the end of a disk buffer on open.", ["sink"]).labels(name)
        self._full_waits = metrics.counter("flowship_buffer_full_waits_total", "Times an append waited for "
                                           "space (when_full: block).", ["sink"]).labels(name)
        self._unacked_records = 0

    # -- open / recovery ----------------------------------------------------------------------
    def open(self) -> int:
        """Recover state from disk; returns how many batches will be replayed."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for tmp in self.dir.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
        ack_file = self.dir / "ack.json"
        if ack_file.exists():
            state = json.loads(ack_file.read_text())
            self._acked = _Pos(int(state["segment"]), int(state["offset"]))
        numbers = sorted(int(p.stem) for p in self.dir.glob("*.seg"))
        for number in numbers:
            if number < self._acked.segment:
                (self.dir / f"{number:020d}.seg").unlink()
                continue
            self._segments[number] = (self.dir / f"{number:020d}.seg").stat().st_size
        records = 0
        for number in sorted(self._segments):
            start = self._acked.offset if number == self._acked.segment else 0
            records += self._scan(number, start)
        self._unacked_records = records
        self.replayed = records
        self._read_pos = self._acked if self._segments else _Pos(0, 0)
        if self._segments and self._read_pos.segment not in self._segments:
            self._read_pos = _Pos(min(self._segments), 0)
        self._write_seg = max(self._segments) if self._segments else max(self._acked.segment, 1)
        self._open_writer()
        self._update_gauges()
        if records:
            self.log.info("disk buffer: replaying batches not acknowledged before the last stop",
                          sink=self.name, batches=records, bytes=sum(self._segments.values()))
        return records

    def _scan(self, number: int, start: int) -> int:
        """Count good records from ``start``; truncate at the first torn or corrupt one."""
        path = self.dir / f"{number:020d}.seg"
        count = 0
        with open(path, "r+b") as fh:
            offset = start
            fh.seek(offset)
            size = self._segments[number]
            while offset < size:
                header = fh.read(HEADER.size)
                problem = None
                if len(header) < HEADER.size:
                    problem = "truncated record header"
                else:
                    magic, length, crc, _kind = HEADER.unpack(header)
                    if magic != MAGIC:
                        problem = "bad record marker"
                    elif offset + HEADER.size + length > size:
                        problem = "truncated record payload"
                    else:
                        payload = fh.read(length)
                        if zlib.crc32(payload) != crc:
                            problem = "checksum mismatch"
                if problem:
                    self._corrupt.inc()
                    self.log.warning("disk buffer: dropping a torn or corrupt tail; records before it are kept",
                                     sink=self.name, segment=path.name, offset=offset, lost_bytes=size - offset,
                                     reason=problem)
                    fh.truncate(offset)
                    fh.flush()
                    os.fsync(fh.fileno())
                    self._segments[number] = offset
                    break
                offset += HEADER.size + length
                count += 1
        return count

    def _open_writer(self) -> None:
        path = self.dir / f"{self._write_seg:020d}.seg"
        self._write_fh = open(path, "ab")
        self._segments.setdefault(self._write_seg, path.stat().st_size)

    # -- append (sink thread) -----------------------------------------------------------------
    def append(self, env: Envelope, stop: threading.Event) -> bool:
        """Store a batch; it is acknowledged upstream after the next fsync. False: dropped or gave up."""
        payload = _serialize(env.batch)
        record = HEADER.pack(MAGIC, len(payload), zlib.crc32(payload), KINDS[env.kind]) + payload
        with self._cond:
            while self._size() + len(record) > self.config.max_bytes and self._size() > 0:
                if self.config.when_full == "drop_newest":
                    self._dropped.inc(env.batch.num_rows)
                    self.log.warning("disk buffer full: dropping the newest batch (when_full: drop_newest)",
                                     sink=self.name, rows=env.batch.num_rows, max_bytes=self.config.max_bytes)
                    env.ack()  # deliberately dropped and counted
                    return False
                self._full_waits.inc()
                self.log.warning("disk buffer full: waiting for the sink to catch up (when_full: block)",
                                 sink=self.name, max_bytes=self.config.max_bytes)
                self._cond.wait(timeout=1.0)
                if stop.is_set() and self._closed:
                    return False
            while True:
                try:
                    self._write(record)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                        raise
                    self._undo_partial_write()
                    if self.config.when_full == "drop_newest":
                        self._dropped.inc(env.batch.num_rows)
                        self.log.warning("disk buffer: no space left on device, dropping the newest batch",
                                         sink=self.name, rows=env.batch.num_rows, path=str(self.dir))
                        env.ack()
                        return False
                    self._full_waits.inc()
                    self.log.warning("disk buffer: no space left on device, waiting (when_full: block)",
                                     sink=self.name, path=str(self.dir))
                    self._cond.wait(timeout=1.0)
                    if stop.is_set() and self._closed:
                        return False
            self._pending_sync.append(env)
            self._unacked_records += 1
            self._update_gauges()
            self._cond.notify_all()
        if self.config.fsync == "batch":
            self.sync()
        return True

    def _write(self, record: bytes) -> None:
        if self._segments.get(self._write_seg, 0) >= self._segment_limit:
            self._write_fh.flush()
            os.fsync(self._write_fh.fileno())
            self._write_fh.close()
            self._write_seg += 1
            self._open_writer()
        self._write_fh.write(record)
        self._write_fh.flush()
        self._segments[self._write_seg] = self._segments.get(self._write_seg, 0) + len(record)

    def _undo_partial_write(self) -> None:
        """After ENOSPC, cut the segment back to its last complete record."""
        try:
            self._write_fh.close()
        except OSError:
            pass
        path = self.dir / f"{self._write_seg:020d}.seg"
        with open(path, "r+b") as fh:
            fh.truncate(self._segments.get(self._write_seg, 0))
        self._write_fh = open(path, "ab")

    def maybe_sync(self) -> None:
        if self._pending_sync and time.monotonic() - self._last_sync >= self.config.fsync_interval:
            self.sync()

    def sync(self) -> None:
        """fsync the open segment, then acknowledge what it made durable."""
        with self._cond:
            pending, self._pending_sync = self._pending_sync, []
            if self._write_fh is not None:
                self._write_fh.flush()
                os.fsync(self._write_fh.fileno())
            self._last_sync = time.monotonic()
        for env in pending:
            env.ack()

    # -- read (drain thread) ------------------------------------------------------------------
    def read(self, timeout: float) -> Envelope | None:
        """The next stored batch, as an envelope whose ack frees it in the buffer."""
        with self._cond:
            deadline = time.monotonic() + timeout
            while True:
                found = self._next_record()
                if found is not None:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed:
                    return None
                self._cond.wait(timeout=remaining)
            pos_after, kind, payload = found
            receipt = Receipt(self._on_sink_ack, position=pos_after)
            self._inflight.append((pos_after, receipt))
        return Envelope(_deserialize(payload), [receipt], KIND_NAMES.get(kind, "flows"))

    def _next_record(self) -> tuple[_Pos, int, bytes] | None:
        pos = self._read_pos
        while True:
            size = self._segments.get(pos.segment)
            if size is None:
                later = [s for s in self._segments if s > pos.segment]
                if not later:
                    return None
                pos = _Pos(min(later), 0)
                continue
            if pos.offset >= size:
                later = [s for s in self._segments if s > pos.segment]
                if not later:
                    self._read_pos = pos
                    return None
                pos = _Pos(min(later), 0)
                continue
            break
        if pos.segment == self._write_seg:
            self._write_fh.flush()
        with open(self.dir / f"{pos.segment:020d}.seg", "rb") as fh:
            fh.seek(pos.offset)
            _magic, length, _crc, kind = HEADER.unpack(fh.read(HEADER.size))
            payload = fh.read(length)
        self._read_pos = _Pos(pos.segment, pos.offset + HEADER.size + length)
        return self._read_pos, kind, payload

    def _on_sink_ack(self, _receipt: Receipt) -> None:
        with self._cond:
            advanced = None
            while self._inflight and self._inflight[0][1].done:
                advanced = self._inflight.popleft()[0]
                self._unacked_records -= 1
            if advanced is None:
                return
            self._acked = advanced
            # Give fully acknowledged segments back first: on a full disk that makes room for ack.json.
            # (A crash before the position is persisted replays from the oldest remaining segment.)
            for number in [s for s in self._segments if s < advanced.segment]:
                (self.dir / f"{number:020d}.seg").unlink(missing_ok=True)
                del self._segments[number]
            self._persist_ack()
            if advanced.segment == self._write_seg and advanced.offset >= self._segments.get(self._write_seg, 0):
                # Everything written was delivered: start the segment over to give the space back.
                self._write_fh.close()
                path = self.dir / f"{self._write_seg:020d}.seg"
                path.unlink(missing_ok=True)
                self._write_seg += 1
                self._open_writer()
                self._acked = self._read_pos = _Pos(self._write_seg, 0)
                self._persist_ack()
                del self._segments[self._write_seg - 1]
            self._update_gauges()
            self._cond.notify_all()

    def _persist_ack(self) -> None:
        tmp = self.dir / ".ack.json.tmp"
        try:
            with open(tmp, "w") as fh:
                json.dump({"segment": self._acked.segment, "offset": self._acked.offset}, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.dir / "ack.json")
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            tmp.unlink(missing_ok=True)
            # The position stays in memory and is written with the next acknowledgement; a crash
            # before then replays these batches again (duplicates, never loss).
            self.log.warning("disk buffer: no space left to record the acknowledged position; "
                             "will retry with the next acknowledgement", sink=self.name, path=str(self.dir))

    # -- state ----------------------------------------------------------------------------------
    def _size(self) -> int:
        """Bytes not yet acknowledged by the sink (what the limit applies to)."""
        return sum(size - (self._acked.offset if seg == self._acked.segment else 0)
                   for seg, size in self._segments.items() if seg >= self._acked.segment)

    @property
    def _segment_limit(self) -> int:
        # Space comes back a whole segment at a time: keep segments small against the limit.
        return max(1, min(self.config.max_segment_bytes, self.config.max_bytes // 4))

    def _update_gauges(self) -> None:
        self._bytes.set(sum(self._segments.values()))
        self._records.set(self._unacked_records)

    @property
    def empty(self) -> bool:
        with self._cond:
            return self._next_record_available() is False

    def _next_record_available(self) -> bool:
        pos = self._read_pos
        return any(size > (pos.offset if seg == pos.segment else 0)
                   for seg, size in self._segments.items() if seg >= pos.segment)

    @property
    def unacknowledged(self) -> int:
        with self._cond:
            return self._unacked_records

    def close(self) -> None:
        self.sync()
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            if self._write_fh is not None:
                self._write_fh.close()
                self._write_fh = None
