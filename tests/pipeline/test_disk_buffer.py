"""Per-sink disk buffers: durability, replay, torn tails, limits, and isolation of a stalled sink."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pyarrow as pa
import pytest
import structlog

from exporter.config import ByteSize, load_text
from exporter.metrics import Metrics
from exporter.model.hubble_json import decode_lines
from exporter.pipeline.disk_buffer import BufferConfig, DiskBuffer
from exporter.pipeline.envelope import Envelope, Receipt
from exporter.pipeline.runtime import Pipeline

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


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_torn_tail_is_detected_and_good_records_kept(tmp_path, fixture_lines, damage):
    parts = batches(fixture_lines)[:6]
    metrics = Metrics()
    buf = new_buffer(tmp_path, metrics)
    buf.open()
    for part in parts:
        buf.append(Envelope(part, [Receipt()]), threading.Event())
    buf.close()
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
    got = []
    while (env := again.read(timeout=0.2)) is not None:
        got.append(env.batch.column("uuid").to_pylist())
        env.ack()
    assert got == [p.column("uuid").to_pylist() for p in parts[:5]]
    again.close()


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
