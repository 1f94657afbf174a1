"""File source against Hubble's rotation: every line exactly once in Parquet, across rotations and restarts.

Hubble's file exporter rotates with lumberjack: ``events.log`` is renamed to
``events-2026-12-02T10-33-00.000.log`` (UTC time of the rotation, in the
same directory), a new ``events.log`` is started, and with compression on
the backup is gzip'd to ``.log.gz`` and the plain one removed. The config
pattern ``paths: [events.log, events-*.log]`` matches both the live file and
its backups, so a rotated file must be recognised (device and inode, content
fingerprint) and continued, never read again. Rows are counted in the Parquet
the sink wrote, with DuckDB.
"""

from __future__ import annotations

import gzip
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import orjson
import pyarrow as pa
import pytest
from flowgen_input import generate_lines

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sinks"))

from helpers import make_ctx  # noqa: E402

from flowship.config import parse  # noqa: E402
from flowship.model.hubble_decode import decode_lines  # noqa: E402
from flowship.pipeline.envelope import Receipt  # noqa: E402
from flowship.sources.file import FileSource, FileSourceConfig  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TOTAL = 3000


@pytest.fixture(scope="session")
def unique_lines(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    """Hubble JSON lines from bench/flowgen.py, every one with its own uuid."""
    return generate_lines(tmp_path_factory.mktemp("flows") / "flows.jsonl", TOTAL)


class Lumberjack:
    """Writes events.log the way Hubble's exporter does, and rotates it the same way."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.live = directory / "events.log"
        self.fh = open(self.live, "ab")  # noqa: SIM115 - the writer keeps its file open, as Hubble does
        self.clock = datetime(2026, 12, 2, 10, 33, 0, tzinfo=UTC)
        self.backups: list[Path] = []

    def write(self, lines: list[bytes], pause: float = 0.0) -> None:
        for line in lines:
            self.fh.write(line + b"\n")
            self.fh.flush()
            if pause:
                time.sleep(pause)

    def rotate(self, compress: bool = False) -> Path:
        """Close, rename to events-<time>.log, open a new events.log; gzip the backup if asked."""
        self.fh.close()
        backup = self.dir / f"events-{self.clock:%Y-%m-%dT%H-%M-%S}.{self.clock.microsecond // 1000:03d}.log"
        self.clock += timedelta(minutes=1, milliseconds=125)
        os.rename(self.live, backup)
        self.fh = open(self.live, "ab")  # noqa: SIM115
        if compress:
            packed = backup.with_name(backup.name + ".gz")
            with open(backup, "rb") as src, gzip.open(packed, "wb") as dst:
                shutil.copyfileobj(src, dst)
            backup.unlink()
            backup = packed
        self.backups.append(backup)
        return backup

    def close(self) -> None:
        self.fh.close()


def parquet_counts(out: Path) -> tuple[int, int]:
    """(rows, distinct uuids) in the published Parquet files."""
    if not list(out.glob("flows/dt=*/hour=*/*.parquet")):
        return 0, 0
    rows = duckdb.sql(f"select count(*), count(distinct uuid) from read_parquet('{out}/flows/**/*.parquet', "
                      "hive_partitioning=true)").fetchall()
    return int(rows[0][0]), int(rows[0][1])


def config(tmp_path: Path, directory: Path, follow: bool, gz: bool = False) -> Path:
    patterns = [str(directory / "events.log"), str(directory / "events-*.log")]
    if gz:
        patterns.append(str(directory / "events-*.log.gz"))
    path = tmp_path / ("follow.yaml" if follow else "once.yaml")
    path.write_text(f"""
data_dir: {tmp_path / 'state'}
sources:
  - type: file
    paths: {orjson.dumps(patterns).decode()}
    follow: {str(follow).lower()}
    poll_interval: 0.05
    flush_interval: 0.2
sinks:
  - type: parquet
    path: {tmp_path / 'out'}
    max_file_age: 0.5s
""")
    return path


def export(cfg: Path, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flowship.cli", "--log-format", "json", "export", "--config",
                             str(cfg), "--no-progress"], cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(REPO)})


def stop(proc: subprocess.Popen) -> str:
    """SIGTERM, wait, and insist on a clean exit; returns the log."""
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    text = err.decode(errors="replace")
    assert proc.returncode == 0, text[-3000:]
    return text


def wait_rows(out: Path, expected: int, proc: subprocess.Popen, timeout: float = 60) -> tuple[int, int]:
    """Wait until the Parquet holds ``expected`` rows, then a little longer to see that no more come."""
    deadline = time.monotonic() + timeout
    counts = parquet_counts(out)
    while counts[0] < expected and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode(errors="replace")[-3000:]
        time.sleep(0.2)
        counts = parquet_counts(out)
    time.sleep(2.0)  # longer than max_file_age plus a tick: anything read twice would be published by now
    return parquet_counts(out)


def test_issue_case_50_rotate_30_is_80_rows(tmp_path: Path, unique_lines: list[bytes]) -> None:
    """The measured case: 50 lines, rotate, 30 more lines -> 80 rows, 80 distinct uuids (was 130)."""
    logs = tmp_path / "hubble"
    logs.mkdir()
    writer = Lumberjack(logs)
    proc = export(config(tmp_path, logs, follow=True), tmp_path)
    try:
        writer.write(unique_lines[:50])
        assert wait_rows(tmp_path / "out", 50, proc) == (50, 50)
        writer.rotate()
        writer.write(unique_lines[50:80])
        assert wait_rows(tmp_path / "out", 80, proc) == (80, 80)
    finally:
        writer.close()
        log = stop(proc) if proc.poll() is None else proc.stderr.read().decode()
    assert parquet_counts(tmp_path / "out") == (80, 80)
    assert "rotated file followed under its new name" in log


def test_rotations_while_writing_gzip_and_a_restart_read_every_line_once(tmp_path: Path,
                                                                          unique_lines: list[bytes]) -> None:
    """Several rotations while lines keep coming, gzip'd backups, a restart between rotations."""
    logs = tmp_path / "hubble"
    logs.mkdir()
    out = tmp_path / "out"
    cfg = config(tmp_path, logs, follow=True, gz=True)
    writer = Lumberjack(logs)
    written = 0

    def write(n: int, pause: float = 0.001) -> None:
        nonlocal written
        writer.write(unique_lines[written:written + n], pause)
        written += n

    proc = export(cfg, tmp_path)
    try:
        write(200)
        # rotations while writing: the next line goes to the new file right after the rename
        for compress in (False, True, False):
            write(150)
            writer.rotate(compress=compress)
            write(1, pause=0)
        write(100)
        assert wait_rows(out, written, proc) == (written, written)
        log = stop(proc)
        assert "rotated file followed under its new name" in log

        # down: more lines, a rotation with gzip, more lines into the new file
        write(120, pause=0)
        writer.rotate(compress=True)
        write(80, pause=0)
        proc = export(cfg, tmp_path)
        write(90)
        writer.rotate()
        write(60)
        writer.rotate(compress=True)
        write(40)
        assert wait_rows(out, written, proc) == (written, written)
    finally:
        writer.close()
        if proc.poll() is None:
            stop(proc)
    assert parquet_counts(out) == (written, written)
    assert any(p.name.endswith(".log.gz") for p in logs.iterdir())
    assert [p.name for p in logs.iterdir() if p.name.startswith("events-2026-12-02T10-3")], "lumberjack-style names"
    # the checkpoint knows each file by the fingerprint of its content, under the name it has now
    state = orjson.loads((tmp_path / "state" / "checkpoints" / "file.json").read_bytes())
    assert state["version"] == 2
    assert {Path(e["path"]).name for e in state["files"].values()} <= {p.name for p in logs.iterdir()}


def test_finite_runs_across_rotation_with_gzip_read_nothing_twice(tmp_path: Path, unique_lines: list[bytes]) -> None:
    """follow: false, run, rotate (gzip'd) and write, run again: the backup is known, only new lines are read."""
    logs = tmp_path / "hubble"
    logs.mkdir()
    out = tmp_path / "out"
    cfg = config(tmp_path, logs, follow=False, gz=True)
    writer = Lumberjack(logs)
    writer.write(unique_lines[:50])
    run = [sys.executable, "-m", "flowship.cli", "export", "--config", str(cfg), "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    first = subprocess.run(run, cwd=tmp_path, capture_output=True, env=env, timeout=120)
    assert first.returncode == 0, first.stderr.decode()[-3000:]
    assert parquet_counts(out) == (50, 50)
    writer.write(unique_lines[50:60])  # not read yet when the file is rotated
    writer.rotate(compress=True)
    writer.write(unique_lines[60:90])
    writer.close()
    second = subprocess.run(run, cwd=tmp_path, capture_output=True, env=env, timeout=120)
    assert second.returncode == 0, second.stderr.decode()[-3000:]
    assert parquet_counts(out) == (90, 90)


def test_new_content_on_a_known_inode_is_read_from_its_start(tmp_path: Path, unique_lines: list[bytes]) -> None:
    """Same (device, inode), other content: the fingerprint tells them apart.

    Inode numbers come back after a delete, and a file rewritten in place keeps
    its inode; here the file is rewritten in place so the inode is surely the
    same. An inode-keyed checkpoint would skip the first 100 lines of the new
    content (it is longer than the old offset).
    """
    logs = tmp_path / "hubble"
    logs.mkdir()
    out = tmp_path / "out"
    cfg = config(tmp_path, logs, follow=False)
    live = logs / "events.log"
    live.write_bytes(b"\n".join(unique_lines[:100]) + b"\n")
    old_inode = live.stat().st_ino
    run = [sys.executable, "-m", "flowship.cli", "export", "--config", str(cfg), "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    assert subprocess.run(run, cwd=tmp_path, capture_output=True, env=env, timeout=120).returncode == 0
    live.write_bytes(b"\n".join(unique_lines[100:250]) + b"\n")
    assert live.stat().st_ino == old_inode
    proc = subprocess.run(run, cwd=tmp_path, capture_output=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    assert parquet_counts(out) == (250, 250)


def read_once(tmp_path: Path, paths: list[str]) -> tuple[FileSource, list[pa.RecordBatch]]:
    """A finite FileSource run in this thread; every emitted batch acknowledged at once."""
    source = FileSource(parse(FileSourceConfig, {"paths": paths, "batch_rows": 100}, "t.yaml"),
                        make_ctx("file", tmp_path / "state"))
    batches: list[pa.RecordBatch] = []

    def emit(batch: pa.RecordBatch, receipt: Receipt) -> None:
        batches.append(batch)
        receipt.release()

    source.run(emit, threading.Event())
    return source, batches


def test_a_listed_file_that_is_missing_fails_and_an_empty_glob_does_not(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nope.jsonl'}: no such file"):
        read_once(tmp_path, [str(tmp_path / "nope.jsonl")])
    source, batches = read_once(tmp_path, [str(tmp_path / "none-*.jsonl")])
    assert (batches, source.files_read) == ([], 0)


def test_one_file_under_two_names_is_read_once_and_every_file_is_checkpointed(tmp_path: Path,
                                                                              fixture_lines: list[bytes]) -> None:
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_bytes(b"\n".join(fixture_lines[:250]) + b"\n")
    second.write_bytes(b"\n".join(fixture_lines[250:400]) + b"\n")
    os.link(first, tmp_path / "a-link.jsonl")
    source, batches = read_once(tmp_path, [str(first), str(tmp_path / "a-link.jsonl"), str(second)])
    flows = pa.Table.from_batches(batches).combine_chunks()
    assert flows.column("uuid").to_pylist() == \
        decode_lines(b"\n".join(fixture_lines[:400]) + b"\n").batch.column("uuid").to_pylist()
    state = orjson.loads((tmp_path / "state" / "checkpoints" / "file.json").read_bytes())
    positions = {Path(e["path"]).name: (e["offset"], e["line"]) for e in state["files"].values()}
    assert positions == {"a.jsonl": (first.stat().st_size, 250), "b.jsonl": (second.stat().st_size, 150)}
    assert source.summary()["lines"] == 400
