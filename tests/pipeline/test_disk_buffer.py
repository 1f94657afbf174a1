"""Per-sink disk buffers: durability, replay, torn tails, limits, and isolation of a stalled sink."""

from __future__ import annotations

import json
import struct
import threading
import time
import zlib
from pathlib import Path

import pyarrow as pa
import pytest
import structlog

from flowship.config import ByteSize, ConfigError, Duration, load_text
from flowship.metrics import Metrics
from flowship.model.hubble_decode import decode_lines
from flowship.pipeline.disk_buffer import BufferConfig, DiskBuffer, _serialize
from flowship.pipeline.envelope import Envelope, Receipt
from flowship.pipeline.runtime import Pipeline

LOG = structlog.get_logger()


def batches(fixture_lines, size: int = 100) -> list[pa.RecordBatch]:
    batch = decode_lines(b"\n".join(fixture_lines)).batch
    return [batch.slice(i, size) for i in range(0, batch.num_rows, size)]


def new_buffer(path: Path, metrics: Metrics | None = None, **kw) -> DiskBuffer:
    return DiskBuffer(path, BufferConfig(type="disk", **kw), metrics or Metrics(), "test", LOG)


def test_append_ack_and_replay_after_restart(tmp_path, fixture_lines):
    parts = batches(fixture_lines)
    buf = new_buffer(tmp_path, max_segment_bytes=ByteSize(200_000))
    assert buf.open() == 0
    upstream = [Receipt() for _ in parts]
    for part, receipt in zip(parts, upstream, strict=True):
        buf.append(Envelope(part, [receipt]), threading.Event())
    buf.sync()
    assert all(r.done for r in upstream)  # durable on disk: acknowledged upstream
    assert len(list(tmp_path.glob("*.seg"))) > 1  # rolled into several segments
    delivered = []
    for _ in range(5):  # the sink takes five batches, then the process dies
        env = buf.read(timeout=1)
        delivered.append(env.batch.column("uuid").to_pylist())
        env.ack()
    buf.close()

    again = new_buffer(tmp_path, max_segment_bytes=ByteSize(200_000))
    assert again.open() == len(parts) - 5
    rest = []
    while (env := again.read(timeout=0.2)) is not None:
        rest.append(env.batch.column("uuid").to_pylist())
        env.ack()
    expected = [p.column("uuid").to_pylist() for p in parts]
    assert delivered + rest == expected
    assert again.unacknowledged == 0
    again.close()
    assert sum(p.stat().st_size for p in tmp_path.glob("*.seg")) == 0  # space given back


class RecordingLog:
    """Keeps what the buffer logs, to check that a problem names its file."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict]] = []

    def _add(self, level: str, message: str, **kw) -> None:
        self.events.append((level, message, kw))

    def info(self, message: str, **kw) -> None:
        self._add("info", message, **kw)

    def warning(self, message: str, **kw) -> None:
        self._add("warning", message, **kw)

    def error(self, message: str, **kw) -> None:
        self._add("error", message, **kw)

    def find(self, text: str) -> list[dict]:
        return [kw for _level, message, kw in self.events if text in message]


def fill(path: Path, parts: list[pa.RecordBatch], **kw) -> list[tuple[int, int]]:
    """Append ``parts`` to a fresh buffer and close it; returns each record's (offset, end) in its segment."""
    buf = new_buffer(path, **kw)
    buf.open()
    for part in parts:
        buf.append(Envelope(part, [Receipt()]), threading.Event())
    spans = [(r.offset, r.end) for seg in buf._segments.values() for r in seg.records]
    buf.close()
    return spans


def drain(buf: DiskBuffer) -> list[list[str]]:
    got = []
    while (env := buf.read(timeout=0.3)) is not None:
        got.append(env.batch.column("uuid").to_pylist())
        env.ack()
    return got


def uuids(parts: list[pa.RecordBatch]) -> list[list[str]]:
    return [p.column("uuid").to_pylist() for p in parts]


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_torn_tail_is_detected_and_good_records_kept(tmp_path, fixture_lines, damage):
    parts = batches(fixture_lines)[:6]
    fill(tmp_path, parts)
    (segment,) = tmp_path.glob("*.seg")
    data = bytearray(segment.read_bytes())
    if damage == "truncate":
        data = data[:-100]  # a write cut short by a power loss
    else:
        data[-50] ^= 0xFF  # a corrupt sector
    segment.write_bytes(bytes(data))

    metrics2 = Metrics()
    again = new_buffer(tmp_path, metrics2)
    assert again.open() == 5
    assert metrics2.value("flowship_buffer_corrupt_total") == 1
    assert metrics2.value("flowship_buffer_corrupt_rows_total") == 100  # the record header survived
    assert drain(again) == uuids(parts[:5])
    again.close()


@pytest.mark.parametrize("where", ["payload", "header", "magic", "zeroed"])
def test_a_damaged_record_costs_only_itself(tmp_path, fixture_lines, where):
    parts = batches(fixture_lines)[:8]
    spans = fill(tmp_path, parts)
    (segment,) = tmp_path.glob("*.seg")
    data = bytearray(segment.read_bytes())
    offset, end = spans[3]
    if where == "payload":
        for i in range(8):  # 8 flipped bytes inside the record
            data[offset + 2000 + i * 97] ^= 0x5A
    elif where == "header":
        data[offset + 5] ^= 0x40  # the payload length: the scan has to find the next record by itself
    elif where == "magic":
        data[offset:offset + 4] = b"XXXX"
    else:
        data[offset:end] = bytes(end - offset)  # a sector of zeros
    segment.write_bytes(bytes(data))

    metrics, log = Metrics(), RecordingLog()
    again = DiskBuffer(tmp_path, BufferConfig(type="disk"), metrics, "test", log)
    assert again.open() == 7
    assert drain(again) == uuids(parts[:3] + parts[4:])  # the records on both sides are delivered
    assert metrics.value("flowship_buffer_corrupt_total", sink="test") == 1
    assert again.damaged_records == 1
    (report,) = log.find("skipping a damaged record")
    assert report["segment"] == str(segment) and report["offset"] == offset
    assert report["rows"] == (100 if where == "payload" else "unknown")
    again.close()
    assert not list(tmp_path.glob("*.seg"))  # delivered: space given back


def _write_ack(path: Path, content: bytes) -> None:
    (path / "ack.json").write_bytes(content)


@pytest.mark.parametrize("content", [
    b"garbage{", b"", b'{"segment": 1, "off', b"[]", b"[1, 2]", b'{"segment": "1", "offset": 0}',
    b'{"segment": -1, "offset": 0}', b'{"segment": 99, "offset": 0}', b'{"segment": 1, "offset": 999999999}',
    b'{"segment": 1, "offset": 31}',
], ids=["garbage", "empty", "cut-short", "list", "list-of-numbers", "string-segment", "negative", "segment-too-high",
        "offset-past-end", "offset-inside-a-record"])
def test_a_damaged_or_impossible_ack_file_is_reported_and_everything_replayed(tmp_path, fixture_lines, content):
    parts = batches(fixture_lines)[:5]
    fill(tmp_path, parts)
    _write_ack(tmp_path, content)
    files_before = sorted(p.name for p in tmp_path.glob("*.seg"))

    metrics, log = Metrics(), RecordingLog()
    again = DiskBuffer(tmp_path, BufferConfig(type="disk"), metrics, "test", log)
    assert again.open() == 5  # never a crash, never a deletion: replay from the oldest segment
    assert set(files_before) <= {p.name for p in tmp_path.glob("*.seg")}
    (report,) = log.find("ack.json is damaged or impossible")
    assert report["path"] == str(tmp_path / "ack.json") and report["problem"]
    assert metrics.value("flowship_buffer_ack_recoveries_total", sink="test") == 1
    assert drain(again) == uuids(parts)
    again.close()

    third = DiskBuffer(tmp_path, BufferConfig(type="disk"), Metrics(), "test", RecordingLog())
    assert third.open() == 0  # the position was rewritten: reported once, not at every start
    assert not third.log.find("ack.json")
    third.close()


def test_a_valid_ack_file_skips_what_was_delivered(tmp_path, fixture_lines):
    parts = batches(fixture_lines)[:5]
    spans = fill(tmp_path, parts)
    _write_ack(tmp_path, b'{"segment": 1, "offset": %d}' % spans[1][1])
    log = RecordingLog()
    again = DiskBuffer(tmp_path, BufferConfig(type="disk"), Metrics(), "test", log)
    assert again.open() == 3
    assert not log.find("ack.json")
    assert drain(again) == uuids(parts[2:])
    again.close()


def test_stray_files_are_reported_and_ignored(tmp_path, fixture_lines):
    parts = batches(fixture_lines)[:3]
    fill(tmp_path, parts)
    (tmp_path / "backup.seg").write_bytes(b"not a segment")
    (tmp_path / "123.seg").write_bytes(b"short name")
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "00000000000000000009.seg.orig").write_bytes(b"x")
    (tmp_path / "subdir").mkdir()
    metrics, log = Metrics(), RecordingLog()
    again = DiskBuffer(tmp_path, BufferConfig(type="disk"), metrics, "test", log)
    assert again.open() == 3
    (report,) = log.find("ignoring files that are not the buffer's own")
    assert sorted(report["files"]) == sorted(["backup.seg", "123.seg", "notes.txt", "00000000000000000009.seg.orig",
                                              "subdir"])
    assert metrics.value("flowship_buffer_stray_files", sink="test") == 5
    assert drain(again) == uuids(parts)
    again.close()
    assert (tmp_path / "backup.seg").read_bytes() == b"not a segment"  # left alone


def test_segment_of_an_unknown_version_is_left_in_place(tmp_path, fixture_lines):
    parts = batches(fixture_lines)[:2]
    fill(tmp_path, parts)
    future = tmp_path / "00000000000000000000.seg"
    head = struct.pack("<8sHHQ", b"FSBUFSEG", 7, 0, 0)
    future.write_bytes(head + struct.pack("<I", zlib.crc32(head)) + b"records of a newer format")
    log = RecordingLog()
    again = DiskBuffer(tmp_path, BufferConfig(type="disk"), Metrics(), "test", log)
    assert again.open() == 2
    (report,) = log.find("cannot read a segment")
    assert report["segment"] == str(future) and "version 7" in report["reason"]
    assert drain(again) == uuids(parts)
    again.close()
    assert future.exists()


def test_version_1_segments_are_still_replayed(tmp_path, fixture_lines):
    parts = batches(fixture_lines)[:4]
    data = b""
    for part in parts:  # the format flowship wrote before version 2
        payload = _serialize(part)
        data += struct.pack("<4sIIB3x", b"FSB1", len(payload), zlib.crc32(payload), 0) + payload
    (tmp_path / "00000000000000000003.seg").write_bytes(data)
    first_end = 16 + len(_serialize(parts[0]))
    _write_ack(tmp_path, b'{"segment": 3, "offset": %d}' % first_end)
    again = new_buffer(tmp_path)
    assert again.open() == 3
    assert drain(again) == uuids(parts[1:])
    assert [p.name for p in tmp_path.glob("*.seg")] == ["00000000000000000004.seg"]  # new batches: version 2
    again.close()


def test_the_drain_reads_only_fsynced_records_so_the_ack_never_passes_durable_data(tmp_path, fixture_lines):
    parts = batches(fixture_lines)[:6]
    buf = new_buffer(tmp_path, fsync_interval=Duration(60))
    buf.open()
    for part in parts[:4]:
        buf.append(Envelope(part, [Receipt()]), threading.Event())
    buf.sync()
    (segment,) = tmp_path.glob("*.seg")
    durable = segment.stat().st_size
    upstream = [Receipt() for _ in parts[4:]]
    for part, receipt in zip(parts[4:], upstream, strict=True):
        buf.append(Envelope(part, [receipt]), threading.Event())
    assert not any(r.done for r in upstream)  # not fsync'd: not acknowledged to the source either
    assert drain(buf) == uuids(parts[:4])  # the un-fsync'd records are not handed to the sink
    buf._persist_ack()
    ack = json.loads((tmp_path / "ack.json").read_text())
    assert ack["segment"] == int(segment.stem) and ack["offset"] <= durable
    # A power cut now loses what was not fsync'd; the position still names durable data.
    with open(segment, "r+b") as fh:
        fh.truncate(durable)
    log = RecordingLog()
    again = DiskBuffer(tmp_path, BufferConfig(type="disk"), Metrics(), "test", log)
    assert again.open() == 0
    assert not log.find("ack.json") and not log.find("damaged")
    again.close()


def test_shared_buffer_path_is_rejected_by_validate(tmp_path):
    text = f"""
data_dir: {tmp_path / 'state'}
sources: [{{type: file, paths: ["{tmp_path / 'in.jsonl'}"]}}]
sinks:
  - {{type: stdout, name: a, buffer: {{type: disk, path: {tmp_path / 'buf'}}}}}
  - {{type: stdout, name: b, buffer: {{type: disk, path: "{tmp_path / 'buf'}/"}}}}
  - {{type: stdout, name: c, buffer: {{type: disk, path: {tmp_path / 'state' / 'buffers' / 'd'}}}}}
  - {{type: stdout, name: d, buffer: {{type: disk}}}}
  - {{type: stdout, name: e, buffer: {{type: memory, path: {tmp_path / 'buf'}}}}}
"""
    with pytest.raises(ConfigError) as err:
        load_text(text, "c.yaml")
    problems = err.value.problems
    assert len(problems) == 2, problems
    assert problems[0].startswith("c.yaml: sinks[1].buffer.path: ") and "sink 'a' (sinks[0])" in problems[0]
    assert problems[1].startswith("c.yaml: sinks[3].buffer.path: ") and "sink 'c' (sinks[2])" in problems[1]


def test_drop_newest_counts_exactly(tmp_path, fixture_lines):
    parts = batches(fixture_lines)
    metrics = Metrics()
    buf = new_buffer(tmp_path, metrics, max_bytes=ByteSize(400_000), when_full="drop_newest")
    buf.open()
    kept = dropped = 0
    for part in parts:
        receipt = Receipt()
        if buf.append(Envelope(part, [receipt]), threading.Event()):
            kept += part.num_rows
        else:
            dropped += part.num_rows
            assert receipt.done  # a deliberate, counted drop releases the source
    assert kept and dropped
    assert metrics.value("flowship_buffer_dropped_total") == dropped
    assert sum(p.stat().st_size for p in tmp_path.glob("*.seg")) <= 400_000
    buf.close()


def test_block_waits_for_the_sink(tmp_path, fixture_lines):
    parts = batches(fixture_lines)[:8]
    buf = new_buffer(tmp_path, max_bytes=ByteSize(250_000), when_full="block")
    buf.open()
    appended = []

    def producer() -> None:
        for i, part in enumerate(parts):
            buf.append(Envelope(part, [Receipt()]), threading.Event())
            appended.append(i)

    t = threading.Thread(target=producer, daemon=True)
    t.start()
    time.sleep(1.0)
    assert 0 < len(appended) < len(parts)  # blocked on the limit, nothing dropped
    received = 0
    while received < len(parts):
        env = buf.read(timeout=5)
        assert env is not None
        received += 1
        env.ack()
    t.join(timeout=10)
    assert appended == list(range(len(parts)))
    buf.close()


class GatedSink:
    """Fault injection: a sink that accepts nothing until its gate opens (a sink outage)."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.uuids: list[str] = []

    def start(self) -> None: ...

    def write(self, env: Envelope) -> None:
        while not self.gate.wait(0.1):
            pass
        self.uuids.extend(env.batch.column("uuid").to_pylist())
        env.ack()

    def tick(self, now_ns: int) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


def _config(tmp_path: Path, src: Path, shutdown: str = "30s") -> str:
    return f"""
data_dir: {tmp_path / 'state'}
shutdown_timeout: {shutdown}
sources: [{{type: file, paths: ["{src}"], batch_rows: 100}}]
sinks:
  - {{type: parquet, path: {tmp_path / 'out'}}}
  - type: stdout
    name: slow
    buffer: {{type: disk, fsync: batch}}
"""


def test_stalled_sink_does_not_block_others_and_catches_up(tmp_path, fixture_lines):
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"\n".join(fixture_lines) + b"\n")
    pipeline = Pipeline(load_text(_config(tmp_path, src), "c.yaml"), Metrics())
    gated = GatedSink()
    slow = next(b for b in pipeline.branches if b.name == "slow")
    slow.sink = gated

    result = {}
    runner = threading.Thread(target=lambda: result.setdefault("summary", pipeline.run()), daemon=True)
    runner.start()
    deadline = time.monotonic() + 30
    # While the slow sink is down the source finishes: the buffer took everything and acknowledged it.
    checkpoint = tmp_path / "state" / "checkpoints" / "file.json"
    while not checkpoint.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    while '"line": 1518' not in checkpoint.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert '"line": 1518' in checkpoint.read_text()
    assert gated.uuids == []
    gated.gate.set()
    runner.join(timeout=60)
    summary = result["summary"]
    assert summary.exit_code == 0
    assert summary.sinks["parquet"] == 1518
    assert len(gated.uuids) == 1518


def test_buffer_survives_restart_when_the_sink_never_came_back(tmp_path, fixture_lines):
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"\n".join(fixture_lines[:600]) + b"\n")
    first = Pipeline(load_text(_config(tmp_path, src, shutdown="3s"), "c.yaml"), Metrics())
    next(b for b in first.branches if b.name == "slow").sink = GatedSink()  # never opens
    # The end of the input waits for the sinks without a deadline; a stop (as by SIGTERM) ends it.
    checkpoint = tmp_path / "state" / "checkpoints" / "file.json"

    def stop_once_checkpointed(pipeline: Pipeline) -> None:
        def wait() -> None:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and '"line": 600' not in (
                    checkpoint.read_text() if checkpoint.exists() else ""):
                time.sleep(0.05)
            pipeline.stop()
        threading.Thread(target=wait, daemon=True).start()

    summary = first.run(on_started=stop_once_checkpointed)
    slow = summary.outcomes["slow"]
    assert (slow.buffered_batches, slow.undelivered, summary.exit_code) == (1, 600, 0)  # stopped, kept on disk

    second = Pipeline(load_text(_config(tmp_path, src), "c.yaml"), Metrics())
    working = GatedSink()
    working.gate.set()
    next(b for b in second.branches if b.name == "slow").sink = working
    summary = second.run()
    assert summary.sources["file"]["flows"] == 0  # the file was fully checkpointed before
    assert len(working.uuids) == 600  # all of it replayed from the buffer
    assert len(set(working.uuids)) == len(set(fixture_lines[:600]))
