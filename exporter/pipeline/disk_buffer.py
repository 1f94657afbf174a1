"""A per-sink disk buffer: an append-only log of independently checksummed batches.

Between a sink's stages and the sink itself. Appending a batch makes it
durable (after the next fsync) and acknowledges it upstream then, so the
source can checkpoint even while the sink is down; a drain thread reads
batches back in order and hands them to the sink, and the buffer forgets a
batch only when the sink acknowledged it. After a crash, everything not yet
acknowledged by the sink is replayed (at-least-once: a batch the sink had
accepted just before the crash can be delivered twice).

On disk (format version 2), ``<dir>/<20-digit number>.seg`` segment files:

    segment header (24 bytes): "FSBUFSEG" | u16 version | u16 0 | u64 segment number | u32 CRC-32 of the 20 before
    record header (24 bytes):  "FSR2" | u32 payload length | u32 rows | u8 kind | 3 bytes 0 | u32 CRC-32 of payload
                               | u32 CRC-32 of the 20 header bytes before it
    payload:                   one Arrow IPC stream (schema + one batch)

Every record carries its own checks, so damage costs only the damaged
record: on open each segment is scanned, a record whose header or payload
does not check out is counted (``flowship_buffer_corrupt_total``), logged
with its segment and offset, and skipped; the scan resynchronises at the
next record header that checks out, and the records on both sides are
delivered. Nothing is truncated or rewritten: after a restart new batches
go to a new segment. Version-1 segments (``"FSB1" | u32 length | u32 CRC |
u8 kind | 3 bytes 0 | payload``, no segment header) are still read; a
segment of an unknown version is reported and left in place, unread.

``<dir>/ack.json`` holds the position (segment, offset) up to which the
sink acknowledged. The drain reads only records that were fsync'd, new
segment files and ``ack.json`` renames are made durable with an fsync of
the directory, and ``ack.json`` is rewritten (fsync, rename) only with
positions of records the sink had, so after a power cut it never points
past durable data. On open it is checked against the segments: a damaged
or impossible ``ack.json`` (not JSON, not an object, a segment that does
not exist, an offset past the end or inside a record) is reported with its
path, and the buffer replays every segment from the oldest (duplicates,
never loss); nothing is deleted on its word. Files in the directory that
are not the buffer's own are reported once and ignored.

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
import re
import struct
import threading
import time
import zlib
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa

from flowship.metrics import Metrics
from flowship.pipeline.envelope import Envelope, Receipt
from flowship.units import ByteSize, Duration

FORMAT_VERSION = 2
SEGMENT_MAGIC = b"FSBUFSEG"
SEGMENT_HEADER = struct.Struct("<8sHHQI")
RECORD_MAGIC = b"FSR2"
RECORD_HEADER = struct.Struct("<4sIIB3xII")
_RECORD_CHECKED = RECORD_HEADER.size - 4  # bytes covered by the header's own CRC
V1_MAGIC = b"FSB1"
V1_HEADER = struct.Struct("<4sIIB3x")
KINDS = {"flows": 0, "aggregates": 1}
KIND_NAMES = {v: k for k, v in KINDS.items()}
SEGMENT_NAME = re.compile(r"^[0-9]{20}\.seg$")
ACK_FILE = "ack.json"
ACK_TMP = ".ack.json.tmp"
RESET_BYTES = 1 << 20  # a fully acknowledged write segment at least this big is replaced by a fresh one


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


def encode_record(payload: bytes, rows: int, kind: int, crc: int | None = None) -> bytes:
    """One version-2 record: checked header, then the payload (``crc``: its CRC-32, if known)."""
    crc = zlib.crc32(payload) if crc is None else crc
    head = struct.pack("<4sIIB3xI", RECORD_MAGIC, len(payload), rows, kind, crc)
    return head + struct.pack("<I", zlib.crc32(head)) + payload


def segment_header(number: int) -> bytes:
    head = struct.pack("<8sHHQ", SEGMENT_MAGIC, FORMAT_VERSION, 0, number)
    return head + struct.pack("<I", zlib.crc32(head))


def _fsync_dir(path: Path) -> None:
    """Make a file's creation, rename or removal in ``path`` survive a power cut."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- scanning segments ------------------------------------------------------------------------

@dataclass
class _Record:
    offset: int  # of the record header
    payload: int  # of the payload
    end: int
    rows: int  # 0 when unknown (version 1 does not record it)
    kind: int
    crc: int  # CRC-32 of the payload


@dataclass
class _Damage:
    offset: int
    end: int
    rows: int | None  # known when the record header survived
    reason: str


@dataclass
class _Segment:
    number: int
    path: Path
    version: int
    data_start: int  # first byte after the segment header
    size: int
    durable: int  # bytes known to be fsync'd; the drain reads no further
    records: list[_Record] = field(default_factory=list)
    damage: list[_Damage] = field(default_factory=list)
    header_problem: str | None = None

    def boundaries(self) -> set[int]:
        """Offsets an acknowledged position in this segment can have."""
        return {0, self.data_start, *(r.end for r in self.records), *(d.end for d in self.damage)}


def _parse_v2(data: bytes, view: memoryview, pos: int) -> _Record | _Damage | None:
    """The record at ``pos``; a damage whose extent is known; None if no valid header is here."""
    n = len(data)
    if n - pos < RECORD_HEADER.size or data[pos:pos + 4] != RECORD_MAGIC:
        return None
    magic, length, rows, kind, payload_crc, header_crc = RECORD_HEADER.unpack_from(data, pos)
    if zlib.crc32(view[pos:pos + _RECORD_CHECKED]) != header_crc:
        return None
    start, end = pos + RECORD_HEADER.size, pos + RECORD_HEADER.size + length
    if end > n:
        return _Damage(pos, n, rows, "record cut short (torn write)")
    if zlib.crc32(view[start:end]) != payload_crc:
        return _Damage(pos, end, rows, "payload checksum mismatch")
    return _Record(pos, start, end, rows, kind, payload_crc)


def _parse_v1(data: bytes, view: memoryview, pos: int) -> _Record | _Damage | None:
    n = len(data)
    if n - pos < V1_HEADER.size or data[pos:pos + 4] != V1_MAGIC:
        return None
    _magic, length, crc, kind = V1_HEADER.unpack_from(data, pos)
    start, end = pos + V1_HEADER.size, pos + V1_HEADER.size + length
    if end > n:
        return None  # the length may itself be damaged: resynchronise instead of trusting it
    if zlib.crc32(view[start:end]) != crc:
        return None
    return _Record(pos, start, end, 0, kind, crc)


def _scan(data: bytes, start: int, version: int) -> tuple[list[_Record], list[_Damage]]:
    """Every record that checks out from ``start``; the damaged stretches between them."""
    parse, magic = (_parse_v2, RECORD_MAGIC) if version == 2 else (_parse_v1, V1_MAGIC)
    view = memoryview(data)
    records: list[_Record] = []
    damage: list[_Damage] = []
    pos, n = start, len(data)
    bad_from: int | None = None
    while pos < n:
        found = parse(data, view, pos)
        if found is None:
            if bad_from is None:
                bad_from = pos
            nxt = data.find(magic, pos + 1)
            pos = n if nxt < 0 else nxt
            continue
        if bad_from is not None:
            damage.append(_Damage(bad_from, pos, None, "unreadable record header"))
            bad_from = None
        if isinstance(found, _Damage):
            damage.append(found)
        else:
            records.append(found)
        pos = found.end
    if bad_from is not None:
        reason = "torn or unreadable tail" if not records or bad_from >= records[-1].end else \
            "unreadable record header"
        damage.append(_Damage(bad_from, n, None, reason))
    return records, damage


def _load_segment(path: Path, number: int, fsync: bool) -> _Segment | str:
    """Scan one segment file; a string says why it cannot be read at all (it is then left alone)."""
    with open(path, "rb") as fh:
        data = fh.read()
        if fsync:
            # What is read now gets acknowledged later: it has to be on disk, not just in the page cache.
            os.fsync(fh.fileno())
    n = len(data)
    if n == 0:
        return _Segment(number, path, FORMAT_VERSION, 0, 0, 0)
    if data.startswith(SEGMENT_MAGIC) and n >= SEGMENT_HEADER.size:
        _magic, version, _flags, _number, crc = SEGMENT_HEADER.unpack_from(data)
        if zlib.crc32(data[:SEGMENT_HEADER.size - 4]) == crc:
            if version != FORMAT_VERSION:
                return (f"segment format version {version}; this flowship reads versions 1 and "
                        f"{FORMAT_VERSION} (written by a newer flowship?)")
            records, damage = _scan(data, SEGMENT_HEADER.size, 2)
            return _Segment(number, path, 2, SEGMENT_HEADER.size, n, n, records, damage)
    if data.startswith(V1_MAGIC):
        records, damage = _scan(data, 0, 1)
        return _Segment(number, path, 1, 0, n, n, records, damage)
    # Neither header checks out: a damaged segment header, or not a segment at all.
    for version, start in ((2, SEGMENT_HEADER.size), (1, 0)):
        records, damage = _scan(data, min(start, n), version)
        if records:
            return _Segment(number, path, version, start, n, n, records, damage,
                            header_problem="segment header damaged; its records check out on their own")
    return "no flowship buffer segment header and no record that checks out (not a buffer segment?)"


@dataclass(frozen=True, order=True)
class _Pos:
    segment: int
    offset: int


def _read_ack(path: Path) -> tuple[_Pos | None, str | None]:
    """The acknowledged position in ``ack.json``, or why it cannot be used."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        return None, f"cannot be read: {exc.strerror}"
    if not raw.strip():
        return None, "empty file"
    try:
        state: Any = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        return None, f"not valid JSON ({exc}); starts with {raw[:60]!r}"
    if not isinstance(state, dict):
        return None, f"expected a JSON object with 'segment' and 'offset', got a {type(state).__name__}: " \
                     f"{raw[:60]!r}"
    seg, off = state.get("segment"), state.get("offset")
    if type(seg) is not int or type(off) is not int or seg < 0 or off < 0:
        return None, f"'segment' and 'offset' must be non-negative integers, got segment={seg!r}, offset={off!r}"
    return _Pos(seg, off), None


def _check_ack(acked: _Pos, segments: dict[int, _Segment]) -> str | None:
    """Why ``acked`` cannot be a position this buffer wrote, given the segment files; None if it can."""
    numbers = sorted(segments)
    if acked.segment < numbers[0]:
        return None  # those segments were acknowledged completely and removed
    seg = segments.get(acked.segment)
    if seg is None:
        if acked.segment > numbers[-1]:
            return (f"names segment {acked.segment}, newer than every segment file (the newest is "
                    f"{numbers[-1]:020d}.seg)")
        return f"names segment {acked.segment}, which has no file although older and newer ones exist"
    if acked.offset > seg.size:
        return (f"points to offset {acked.offset} of {seg.path.name}, past its end ({seg.size} bytes): the "
                "segment is shorter than what was acknowledged (power loss, or an older copy restored)")
    if acked.offset not in seg.boundaries():
        return f"points to offset {acked.offset} of {seg.path.name}, which is not a record boundary"
    return None


@dataclass
class _Plan:
    """What a directory holds and where replay starts, before anything is changed on disk."""

    segments: dict[int, _Segment]
    rejected: dict[int, str]  # segment number -> why it is left unread
    stray: list[str]
    acked: _Pos | None  # the valid acknowledged position, if any
    ack_problem: str | None
    start: _Pos | None  # first position to replay; None: nothing to replay


def _plan(directory: Path, fsync: bool) -> _Plan:
    segments: dict[int, _Segment] = {}
    rejected: dict[int, str] = {}
    stray: list[str] = []
    entries = sorted(os.scandir(directory), key=lambda e: e.name) if directory.exists() else []
    for entry in entries:
        name = entry.name
        if name in (ACK_FILE, ACK_TMP):
            continue
        if SEGMENT_NAME.match(name) and entry.is_file(follow_symlinks=False):
            number = int(name[:20])
            loaded = _load_segment(Path(entry.path), number, fsync)
            if isinstance(loaded, str):
                rejected[number] = loaded
            else:
                segments[number] = loaded
            continue
        stray.append(name)
    acked, problem = _read_ack(directory / ACK_FILE)
    if acked is not None and problem is None and segments:
        problem = _check_ack(acked, segments)
        if problem is not None:
            acked = None
    numbers = sorted(segments)
    if not numbers:
        start = None
    elif acked is not None and acked.segment in segments:
        start = acked
    else:
        start = _Pos(numbers[0], 0)
    return _Plan(segments, rejected, stray, acked, problem, start)


def pending_batches(directory: Path) -> Iterator[pa.RecordBatch]:
    """The batches a buffer in ``directory`` would replay on open, read without changing anything."""
    plan = _plan(Path(directory), fsync=False)
    if plan.start is None:
        return
    for number in sorted(plan.segments):
        if number < plan.start.segment:
            continue
        seg = plan.segments[number]
        data = seg.path.read_bytes()
        for rec in seg.records:
            if number == plan.start.segment and rec.offset < plan.start.offset:
                continue
            yield _deserialize(data[rec.payload:rec.end])


class DiskBuffer:
    """One sink's disk buffer. ``append`` from the sink thread, ``read`` from the drain thread."""

    def __init__(self, directory: Path, config: BufferConfig, metrics: Metrics, name: str, log) -> None:  # noqa: ANN001
        self.dir = Path(directory)
        self.config = config
        self.name = name
        self.log = log
        self._cond = threading.Condition()
        self._ack_lock = threading.Lock()  # one ack.json writer at a time
        self._segments: dict[int, _Segment] = {}
        self._write_fh = None
        self._write_seg = 0
        self._read_seg = 0  # segment and index of the next record to read
        self._read_idx = 0
        self._acked = _Pos(0, 0)
        self._persisted = _Pos(-1, -1)
        self._pending_sync: list[Envelope] = []
        self._inflight: deque[tuple[_Pos, Receipt]] = deque()
        self._last_sync = time.monotonic()
        self._closed = False
        self.replayed = 0
        self.damaged_records = 0
        self.damaged_rows = 0
        self._bytes = metrics.gauge("flowship_buffer_bytes", "Bytes of segment files of a sink's disk buffer.", ["sink"]).labels(name)
        metrics.gauge("flowship_buffer_max_bytes", "Size limit of a sink's disk buffer.", ["sink"]).labels(name).set(
            config.max_bytes)
        self._records = metrics.gauge("flowship_buffer_records", "Batches in a sink's disk buffer not yet "
                                      "acknowledged by the sink.", ["sink"]).labels(name)
        self._dropped = metrics.counter("flowship_buffer_dropped_total", "Rows dropped because a disk buffer was "
                                        "full (when_full: drop_newest).", ["sink"]).labels(name)
        self._corrupt = metrics.counter("flowship_buffer_corrupt_total", "Damaged records of a disk buffer, "
                                        "skipped (each costs its own rows only).", ["sink"]).labels(name)
        self._corrupt_rows = metrics.counter("flowship_buffer_corrupt_rows_total", "Rows of skipped damaged "
                                             "records whose header still gave their row count.",
                                             ["sink"]).labels(name)
        self._ack_recoveries = metrics.counter("flowship_buffer_ack_recoveries_total", "Opens of a disk buffer "
                                               "whose ack.json was damaged or impossible, so that every segment "
                                               "was replayed.", ["sink"]).labels(name)
        self._stray = metrics.gauge("flowship_buffer_stray_files", "Files in a disk buffer directory that are "
                                    "not the buffer's own (ignored).", ["sink"]).labels(name)
        self._full_waits = metrics.counter("flowship_buffer_full_waits_total", "Times an append waited for "
                                           "space (when_full: block).", ["sink"]).labels(name)
        self._unacked_records = 0

    # -- open / recovery ----------------------------------------------------------------------
    def open(self) -> int:
        """Recover state from disk; returns how many batches will be replayed."""
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / ACK_TMP).unlink(missing_ok=True)
        plan = _plan(self.dir, fsync=True)
        ack_path = self.dir / ACK_FILE
        if plan.stray:
            self.log.warning("disk buffer: ignoring files that are not the buffer's own", sink=self.name,
                             path=str(self.dir), files=plan.stray[:20], count=len(plan.stray))
        self._stray.set(len(plan.stray))
        for number, why in sorted(plan.rejected.items()):
            self.log.error("disk buffer: cannot read a segment; it is left in place and not replayed",
                           sink=self.name, segment=str(self.dir / f"{number:020d}.seg"), reason=why)
        if plan.ack_problem is not None:
            self._ack_recoveries.inc()
            self.log.warning("disk buffer: ack.json is damaged or impossible; replaying every segment from the "
                             "oldest (the sink may receive batches twice; nothing is deleted)", sink=self.name,
                             path=str(ack_path), problem=plan.ack_problem, segments=len(plan.segments))
        start = plan.start
        for number in sorted(plan.segments):
            seg = plan.segments[number]
            if seg.header_problem:
                self.log.warning("disk buffer: " + seg.header_problem, sink=self.name, segment=str(seg.path))
            skip_before = start.offset if start is not None and number == start.segment else 0
            fully_acked = start is None or number < start.segment
            live_records = [] if fully_acked else [r for r in seg.records if r.offset >= skip_before]
            live_damage = [] if fully_acked else [d for d in seg.damage if d.offset >= skip_before]
            if not live_records and not live_damage:
                # Acknowledged completely (by a valid ack.json), or holds nothing at all.
                seg.path.unlink(missing_ok=True)
                continue
            for d in live_damage:
                self._report_damage(seg, d)
            self._segments[number] = seg
        if start is not None and start.segment not in self._segments:
            later = [n for n in self._segments if n > start.segment]
            start = _Pos(min(later), 0) if later else None
        self._acked = start if start is not None else _Pos(0, 0)
        if start is not None:
            self._read_seg = start.segment
            self._read_idx = next((i for i, r in enumerate(self._segments[start.segment].records)
                                   if r.offset >= start.offset), len(self._segments[start.segment].records))
        records = sum(1 for _ in self._unread())
        self._unacked_records = records
        self.replayed = records
        newest = max([*plan.segments, *plan.rejected, plan.acked.segment if plan.acked else 0, 0])
        self._write_seg = newest + 1
        self._new_segment(self._write_seg)
        if start is None:
            self._read_seg, self._read_idx = self._write_seg, 0
            self._acked = _Pos(self._write_seg, 0)
        if plan.ack_problem is not None or plan.acked is None:
            self._persist_ack()  # a valid file from now on, so the problem is reported once
        self._update_gauges()
        if records:
            self.log.info("disk buffer: replaying batches not acknowledged before the last stop",
                          sink=self.name, batches=records, bytes=self._size())
        return records

    def _report_damage(self, seg: _Segment, d: _Damage) -> None:
        self.damaged_records += 1
        self._corrupt.inc()
        if d.rows:
            self.damaged_rows += d.rows
            self._corrupt_rows.inc(d.rows)
        self.log.warning("disk buffer: skipping a damaged record; the records before and after it are delivered",
                         sink=self.name, segment=str(seg.path), offset=d.offset, bytes=d.end - d.offset,
                         rows=d.rows if d.rows is not None else "unknown", reason=d.reason)

    def _unread(self) -> Iterator[tuple[_Segment, int]]:
        for number in sorted(self._segments):
            if number < self._read_seg:
                continue
            seg = self._segments[number]
            first = self._read_idx if number == self._read_seg else 0
            for i in range(first, len(seg.records)):
                yield seg, i

    def _new_segment(self, number: int) -> None:
        """Create segment ``number`` durably and make it the one appended to."""
        path = self.dir / f"{number:020d}.seg"
        try:
            with open(path, "xb") as fh:
                fh.write(segment_header(number))
                fh.flush()
                os.fsync(fh.fileno())
            _fsync_dir(self.dir)
        except OSError:
            path.unlink(missing_ok=True)
            raise
        fh = open(path, "ab")  # noqa: SIM115 - kept open for appending
        old = self._write_fh
        self._write_fh = fh
        self._write_seg = number
        self._segments[number] = _Segment(number, path, FORMAT_VERSION, SEGMENT_HEADER.size,
                                          SEGMENT_HEADER.size, SEGMENT_HEADER.size)
        if old is not None:
            old.close()

    # -- append (sink thread) -----------------------------------------------------------------
    def append(self, env: Envelope, stop: threading.Event) -> bool:
        """Store a batch; it is acknowledged upstream after the next fsync. False: dropped or gave up."""
        payload = _serialize(env.batch)
        crc = zlib.crc32(payload)
        record = encode_record(payload, env.batch.num_rows, KINDS[env.kind], crc)
        while True:
            unsynced = False
            with self._cond:
                if self._size() + len(record) > self.config.max_bytes and self._unacked_records > 0:
                    if self.config.when_full == "drop_newest":
                        return self._drop(env, "disk buffer full: dropping the newest batch (when_full: drop_newest)",
                                          max_bytes=self.config.max_bytes)
                    if self._pending_sync:
                        unsynced = True  # the drain reads only fsync'd records: make them readable first
                    else:
                        self._full_waits.inc()
                        self.log.warning("disk buffer full: waiting for the sink to catch up (when_full: block)",
                                         sink=self.name, max_bytes=self.config.max_bytes)
                        self._cond.wait(timeout=1.0)
                        if stop.is_set() and self._closed:
                            return False
                        continue
                else:
                    try:
                        self._write(record, env.batch.num_rows, KINDS[env.kind], crc)
                    except OSError as exc:
                        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                            raise
                        self._undo_partial_write()
                        if self.config.when_full == "drop_newest":
                            return self._drop(env, "disk buffer: no space left on device, dropping the newest batch",
                                              path=str(self.dir))
                        if self._pending_sync:
                            unsynced = True
                        else:
                            self._full_waits.inc()
                            self.log.warning("disk buffer: no space left on device, waiting (when_full: block)",
                                             sink=self.name, path=str(self.dir))
                            self._cond.wait(timeout=1.0)
                            if stop.is_set() and self._closed:
                                return False
                            continue
                    else:
                        self._pending_sync.append(env)
                        self._unacked_records += 1
                        self._update_gauges()
                        break
            if unsynced:
                self.sync()
        if self.config.fsync == "batch":
            self.sync()
        return True

    def _drop(self, env: Envelope, message: str, **fields: Any) -> bool:
        self._dropped.inc(env.batch.num_rows)
        self.log.warning(message, sink=self.name, rows=env.batch.num_rows, **fields)
        env.ack()  # deliberately dropped and counted
        return False

    def _write(self, record: bytes, rows: int, kind: int, crc: int) -> None:
        seg = self._segments[self._write_seg]
        if seg.size >= self._segment_limit and seg.records:
            old_fh = self._write_fh
            old_fh.flush()
            os.fsync(old_fh.fileno())
            seg.durable = seg.size
            self._new_segment(self._write_seg + 1)  # closes the old file once the new one exists
            seg = self._segments[self._write_seg]
            self._cond.notify_all()
        offset = seg.size
        self._write_fh.write(record)
        self._write_fh.flush()
        header = RECORD_HEADER.size
        seg.records.append(_Record(offset, offset + header, offset + len(record), rows, kind, crc))
        seg.size = offset + len(record)

    def _undo_partial_write(self) -> None:
        """After ENOSPC, cut the segment back to its last complete record."""
        try:
            self._write_fh.close()
        except OSError:
            pass
        seg = self._segments[self._write_seg]
        with open(seg.path, "r+b") as fh:
            fh.truncate(seg.size)
        self._write_fh = open(seg.path, "ab")  # noqa: SIM115 - kept open for appending

    def maybe_sync(self) -> None:
        if (self._pending_sync or self._acked != self._persisted) and \
                time.monotonic() - self._last_sync >= self.config.fsync_interval:
            self.sync()

    def sync(self) -> None:
        """fsync the open segment, acknowledge upstream what it made durable, then record the sink's position."""
        with self._cond:
            pending, self._pending_sync = self._pending_sync, []
            if self._write_fh is not None:
                self._write_fh.flush()
                os.fsync(self._write_fh.fileno())
                seg = self._segments[self._write_seg]
                seg.durable = seg.size
            self._last_sync = time.monotonic()
            self._cond.notify_all()
        for env in pending:
            env.ack()
        self._persist_ack()

    # -- read (drain thread) ------------------------------------------------------------------
    def read(self, timeout: float) -> Envelope | None:
        """The next stored batch, as an envelope whose ack frees it in the buffer."""
        deadline = time.monotonic() + timeout
        while True:
            with self._cond:
                while True:
                    found = self._next_record()
                    if found is not None:
                        break
                    now = time.monotonic()
                    remaining = deadline - now
                    if self._closed:
                        return None
                    write = self._segments.get(self._write_seg)
                    due = self._last_sync + self.config.fsync_interval - now
                    if write is not None and write.size > write.durable and due <= 0:
                        break  # records wait for an fsync nobody else did yet: do it here
                    if remaining <= 0:
                        return None
                    self._cond.wait(timeout=min(remaining, due) if write is not None and write.size > write.durable
                                    else remaining)
                if found is not None:
                    seg, rec = found
                    receipt = Receipt(self._on_sink_ack, position=_Pos(seg.number, rec.end))
                    self._inflight.append((receipt.position, receipt))
            if found is None:
                self.sync()
                continue
            batch, problem = self._load(seg, rec)
            if batch is not None:
                return Envelope(batch, [receipt], KIND_NAMES.get(rec.kind, "flows"))
            # Damaged since the segment was scanned: skip it like any damaged record.
            with self._cond:
                self._report_damage(seg, _Damage(rec.offset, rec.end, rec.rows or None, problem or "unreadable"))
            receipt.release()

    def _load(self, seg: _Segment, rec: _Record) -> tuple[pa.RecordBatch | None, str | None]:
        try:
            with open(seg.path, "rb") as fh:
                fh.seek(rec.payload)
                payload = fh.read(rec.end - rec.payload)
        except OSError as exc:
            return None, f"cannot be read: {exc.strerror}"
        if len(payload) != rec.end - rec.payload:
            return None, "segment file is shorter than when it was scanned"
        if zlib.crc32(payload) != rec.crc:
            return None, "payload checksum mismatch"
        try:
            return _deserialize(payload), None
        except (pa.ArrowException, OSError, ValueError) as exc:
            return None, f"payload is not an Arrow batch ({exc})"

    def _next_record(self) -> tuple[_Segment, _Record] | None:
        """The next record that is fsync'd (nothing else may be acknowledged), advancing the read position."""
        for seg, i in self._unread():
            rec = seg.records[i]
            if rec.end > seg.durable:
                return None
            self._read_seg, self._read_idx = seg.number, i + 1
            return seg, rec
        return None

    def _on_sink_ack(self, _receipt: Receipt) -> None:
        with self._cond:
            advanced = None
            while self._inflight and self._inflight[0][1].done:
                advanced = self._inflight.popleft()[0]
                self._unacked_records -= 1
            if advanced is None:
                return
            self._acked = advanced
            # Give fully acknowledged segments back. A crash before ack.json records the new position
            # replays from the oldest remaining segment (duplicates, never loss).
            done = advanced.segment != self._write_seg and advanced.offset >= self._segments[advanced.segment].size
            for number in [s for s in self._segments if s < advanced.segment or done and s == advanced.segment]:
                self._segments.pop(number).path.unlink(missing_ok=True)
            write = self._segments[self._write_seg]
            if advanced.segment == self._write_seg and advanced.offset >= write.size \
                    and write.size >= min(RESET_BYTES, self._segment_limit):
                # Everything written was delivered: continue in a fresh segment to give the space back.
                try:
                    self._new_segment(self._write_seg + 1)
                except OSError as exc:
                    if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                        raise
                else:
                    self._segments.pop(write.number).path.unlink(missing_ok=True)
                    self._acked = _Pos(self._write_seg, 0)
                    self._read_seg, self._read_idx = self._write_seg, 0
            self._update_gauges()
            self._cond.notify_all()

    def _persist_ack(self) -> None:
        """Write the sink's position: tmp file, fsync, rename, fsync of the directory."""
        with self._ack_lock:
            with self._cond:
                pos = self._acked
            if pos == self._persisted:
                return
            tmp = self.dir / ACK_TMP
            try:
                with open(tmp, "w") as fh:
                    json.dump({"version": FORMAT_VERSION, "segment": pos.segment, "offset": pos.offset}, fh)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, self.dir / ACK_FILE)
                _fsync_dir(self.dir)
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                tmp.unlink(missing_ok=True)
                # The position stays in memory and is written with the next sync; a crash before then
                # replays these batches again (duplicates, never loss).
                self.log.warning("disk buffer: no space left to record the acknowledged position; "
                                 "will retry with the next sync", sink=self.name, path=str(self.dir))
                return
            self._persisted = pos

    # -- state ----------------------------------------------------------------------------------
    def _size(self) -> int:
        """Bytes not yet acknowledged by the sink (what the limit applies to)."""
        total = 0
        for number, seg in self._segments.items():
            if number > self._acked.segment:
                total += seg.size
            elif number == self._acked.segment:
                total += seg.size - self._acked.offset
        return total

    @property
    def _segment_limit(self) -> int:
        # Space comes back a whole segment at a time: keep segments small against the limit.
        return max(1, min(self.config.max_segment_bytes, self.config.max_bytes // 4))

    def _update_gauges(self) -> None:
        self._bytes.set(sum(seg.size for seg in self._segments.values()))
        self._records.set(self._unacked_records)

    @property
    def empty(self) -> bool:
        """No record left to read (fsync'd or not)."""
        with self._cond:
            return next(self._unread(), None) is None

    @property
    def unacknowledged(self) -> int:
        with self._cond:
            return self._unacked_records

    def close(self) -> None:
        """Sync; when the sink acknowledged everything, also give the last segment's space back."""
        self.sync()
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            if self._write_fh is not None:
                self._write_fh.close()
                self._write_fh = None
                write = self._segments[self._write_seg]
                if not self._inflight and self._unacked_records == 0 and \
                        (not write.records or self._acked == _Pos(write.number, write.size)):
                    # ack.json already names its end; a missing segment there means "all delivered".
                    self._segments.pop(write.number).path.unlink(missing_ok=True)
                    self._update_gauges()
