"""``stdin`` source fed through a real pipe: lines split across reads, bad lines reported by line number,
EOF ends the run, a pause or a stop flushes what was read, and ``flowship export`` delivers every flow."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pyarrow as pa
import pytest
import structlog

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sinks"))

from helpers import make_ctx  # noqa: E402

from flowship.config import parse  # noqa: E402
from flowship.model.hubble_decode import decode_lines  # noqa: E402
from flowship.pipeline.envelope import Receipt  # noqa: E402
from flowship.sources.stdin import StdinSource, StdinSourceConfig  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


class Piped:
    """A StdinSource reading the read end of an os.pipe in a thread; the test writes the other end."""

    def __init__(self, tmp_path: Path, **options: object) -> None:
        read_fd, self.write_fd = os.pipe()
        self.reader = os.fdopen(read_fd, "rb", buffering=0)
        self.ctx = make_ctx("stdin", tmp_path)
        self.source = StdinSource(parse(StdinSourceConfig, options, "t.yaml"), self.ctx, stream=self.reader)
        self.stop = threading.Event()
        self.batches: list[pa.RecordBatch] = []
        self.receipts: list[Receipt] = []
        self.emitted = threading.Condition()
        self.thread = threading.Thread(target=self.source.run, args=(self.emit, self.stop), daemon=True)
        self.thread.start()

    def emit(self, batch: pa.RecordBatch, receipt: Receipt) -> None:
        with self.emitted:
            self.batches.append(batch)
            self.receipts.append(receipt)
            self.emitted.notify_all()

    def write(self, data: bytes, chunk: int = 0) -> None:
        step = chunk or len(data)
        for start in range(0, len(data), step):
            os.write(self.write_fd, data[start:start + step])

    def close_input(self) -> None:
        os.close(self.write_fd)
        self.write_fd = -1

    def wait_rows(self, rows: int, timeout: float = 30) -> None:
        with self.emitted:
            assert self.emitted.wait_for(lambda: self.rows >= rows, timeout), f"{self.rows} of {rows} rows emitted"

    def wait_lines(self, lines: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self.source.stats.lines < lines:
            assert time.monotonic() < deadline, f"{self.source.stats.lines} of {lines} lines read"
            time.sleep(0.01)

    def finish(self, timeout: float = 30) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the source did not return"

    @property
    def rows(self) -> int:
        return sum(b.num_rows for b in self.batches)

    def flows(self) -> pa.RecordBatch:
        return pa.Table.from_batches(self.batches).combine_chunks().to_batches()[0]

    def cleanup(self) -> None:
        self.stop.set()
        if self.write_fd >= 0:
            os.close(self.write_fd)
        self.thread.join(10)
        self.reader.close()


@pytest.fixture()
def piped(tmp_path: Path) -> Iterator[type[Piped]]:
    made: list[Piped] = []

    def make(**options: object) -> Piped:
        made.append(Piped(tmp_path, **options))
        return made[-1]

    yield make
    for p in made:
        p.cleanup()


def test_eof_ends_the_source_with_every_line_decoded(piped, fixture_lines):
    data = b"\n".join(fixture_lines) + b"\n"
    p = piped()
    p.write(data, chunk=777)  # reads end mid-line: the partial line waits for the rest
    p.close_input()
    p.finish()
    assert not p.stop.is_set()
    assert p.flows().equals(decode_lines(data).batch)
    assert p.source.summary() == {"lines": 1518, "flows": 1518, "rejected": 0, "rejected_by_reason": {},
                                  "lost_events": 0}
    assert all(r.rows == 0 and not r.done for r in p.receipts)  # nothing to checkpoint: plain receipts
    for r in p.receipts:
        r.release()
    assert all(r.done for r in p.receipts)


def test_a_last_line_without_newline_is_read_at_eof(piped, fixture_lines):
    p = piped()
    p.write(b"\n".join(fixture_lines[:3]))
    p.close_input()
    p.finish()
    assert p.flows().column("uuid").to_pylist() == decode_lines(b"\n".join(fixture_lines[:3])).batch.column(
        "uuid").to_pylist()
    assert p.source.stats.flows == 3


def test_bad_lines_are_reported_with_stdin_and_their_line_number(piped, fixture_lines):
    p = piped()
    with structlog.testing.capture_logs() as logs:
        p.write(b"\n".join(fixture_lines[:100]) + b"\n")
        p.wait_lines(100)  # the next lines come in a later read: numbering carries on across reads
        p.write(b"not json\n" + fixture_lines[100] + b"\n" + b'{"flow": 3}\n' + b'{"hello": 1}\n' +
                fixture_lines[101] + b"\n")
        p.close_input()
        p.finish()
    rejected = [(e["where"], e["reason"].split(":")[0]) for e in logs if e["event"] == "rejected input line"]
    assert rejected == [("<stdin>:101", "invalid JSON"), ("<stdin>:103", "'flow' is not an object"),
                        ("<stdin>:104", "neither a flow, a lost_events record nor a known Hubble event")]
    assert p.rows == 102
    summary = p.source.summary()
    assert (summary["lines"], summary["flows"], summary["rejected"]) == (105, 102, 3)
    assert summary["rejected_by_reason"] == {"invalid_json": 1, "bad_value": 1, "not_a_flow": 1}
    assert p.ctx.metrics.value("flowship_source_rejected_total", source="stdin", reason="invalid_json") == 1


def test_a_pause_in_the_input_emits_a_partial_batch(piped, fixture_lines):
    p = piped(flush_interval="50ms")
    p.write(b"\n".join(fixture_lines[:5]) + b"\n")
    p.wait_rows(5)  # the pipe is still open: the pause made the source emit what it had
    assert p.thread.is_alive()
    p.write(b"\n".join(fixture_lines[5:12]) + b"\n")
    p.wait_rows(12)
    p.close_input()
    p.finish()
    assert p.flows().equals(decode_lines(b"\n".join(fixture_lines[:12])).batch)


def test_a_stop_flushes_what_was_read(piped, fixture_lines):
    p = piped(flush_interval="1h")
    p.write(b"\n".join(fixture_lines[:40]) + b"\n" + fixture_lines[40][:30])  # and half a line
    p.wait_lines(40)
    assert p.rows == 0
    with structlog.testing.capture_logs() as logs:
        p.stop.set()
        p.finish()
    assert p.rows == 40  # everything decoded goes out
    # the half line cannot be completed any more: it is counted and reported, not silently lost
    assert [e["where"] for e in logs if e["event"] == "rejected input line"] == ["<stdin>:41"]
    assert p.source.summary()["rejected"] == 1


def test_lost_events_are_counted(piped):
    lost = orjson.dumps({"lost_events": {"source": "HUBBLE_RING_BUFFER", "num_events_lost": "7", "cpu": 1},
                         "node_name": "node-1", "time": "2024-05-01T12:00:00Z"})
    p = piped()
    p.write(lost + b"\n")
    p.close_input()
    p.finish()
    assert p.source.summary()["lost_events"] == 7
    assert p.rows == 0


def test_export_from_a_pipe_delivers_every_good_flow_and_exits_3_for_rejected_lines(tmp_path, fixture_lines):
    config = tmp_path / "c.yaml"
    out = tmp_path / "out.jsonl"
    config.write_text(f"data_dir: {tmp_path / 'state'}\nsources: [{{type: stdin}}]\n"
                      f"sinks: [{{type: file, path: {out}}}]\n")
    data = b"\n".join(fixture_lines[:200]) + b"\n{oops\n" + b"\n".join(fixture_lines[200:]) + b"\n"
    proc = subprocess.Popen([sys.executable, "-m", "flowship.cli", "--log-format", "json", "export", "--config",
                             str(config), "--no-progress"], cwd=tmp_path, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)})
    _, err = proc.communicate(data, timeout=120)
    assert proc.returncode == 3, err.decode()[-2000:]
    events = [orjson.loads(line) for line in err.splitlines() if line.startswith(b"{")]
    assert [(e["where"], e["reason"][:12]) for e in events if e.get("event") == "rejected input line"] == \
        [("<stdin>:201", "invalid JSON")]
    written = decode_lines(out.read_bytes()).batch
    assert written.equals(decode_lines(b"\n".join(fixture_lines) + b"\n").batch)
