"""``flowship compact``: every flow kept exactly once, sorted files of the asked sizes, crashes at every step,
retention, S3.

Archives are written by the real parquet sink (or ``flowship export``) and read back with DuckDB and pyarrow,
the way a user queries them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from flowgen_input import generate_lines
from s3server import S3Server, aws_env

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sinks"))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from flowgen import generate_batch  # noqa: E402
from helpers import aggregate_rows, make_ctx  # noqa: E402

from flowship.compact import partition_start  # noqa: E402
from flowship.config import parse  # noqa: E402
from flowship.pipeline.envelope import Envelope, Receipt  # noqa: E402
from flowship.sinks.parquet import ParquetSink, ParquetSinkConfig  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CRASHING = Path(__file__).resolve().parent / "compact_crash.py"
HOUR_NS = 3600 * 10**9


def write_archive(root: str, batch: pa.RecordBatch, max_file_rows: int, layout: str = "hourly",
                  env: dict[str, str] | None = None, kind: str = "flows") -> None:
    """The real parquet sink writes ``batch`` (in slices, as a pipeline would) with small files."""
    options = {"path": root, "max_file_rows": max_file_rows, "layout": layout}
    if root.startswith("s3://") and env:
        options["s3"] = {"endpoint_url": env["FLOWSHIP_TEST_S3_ENDPOINT"]}
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_EC2_METADATA_DISABLED")}
    if env:
        os.environ.update({k: env[k] for k in saved})
    try:
        sink = ParquetSink(parse(ParquetSinkConfig, options, "t.yaml"), make_ctx("archive"))
        sink.start()
        for start in range(0, batch.num_rows, 997):
            sink.write(Envelope(batch.slice(start, 997), [Receipt()], kind))
        sink.flush()
        sink.close()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def flows_over_hours(hours: int, rows: int, start_ns: int, seed: int = 0) -> pa.RecordBatch:
    return generate_batch(rows, seed=seed, start_ns=start_ns, duration_s=hours * 3600 - 60)


def local_uuids(root: Path) -> Counter:
    """Every uuid in every visible file (readers skip dot-prefixed names)."""
    files = sorted(p for p in (root / "flows").rglob("*.parquet") if not p.name.startswith("."))
    return Counter(u for f in files for u in pq.read_table(f, columns=["uuid"]).column("uuid").to_pylist())


def compact(*args: str, env: dict[str, str] | None = None, crash_at: int = 0, when: str = "before",
            timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(CRASHING), "--log-format", "json", "compact", *args]
    run_env = {**(env or os.environ), "PYTHONPATH": str(REPO), "FLOWSHIP_CRASH_AT": str(crash_at),
               "FLOWSHIP_CRASH_WHEN": when}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=run_env)


def summary_of(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def changes_of(proc: subprocess.CompletedProcess) -> int:
    return int(proc.stderr.rsplit("changes=", 1)[1].split()[0])


@pytest.fixture(scope="module")
def six_hours() -> pa.RecordBatch:
    return flows_over_hours(6, 30_000, start_ns=1_767_225_600 * 10**9)  # 2026-01-01T00Z: long closed


# ---------------------------------------------------------------------------------------------
# layout parsing
# ---------------------------------------------------------------------------------------------


def test_partition_start_reads_both_layouts():
    want = 1_700_000_000 // 3600 * 3600 * 10**9  # 2023-11-14T22:00Z
    assert partition_start("flows/dt=2023-11-14/hour=22") == want
    assert partition_start("flows/cluster=c/node=n/year=2023/month=11/day=14/hour=22") == want
    assert partition_start("flows/dt=2023-11-14") is None
    assert partition_start("flows/dt=2023-11-14/hour=24") is None


# ---------------------------------------------------------------------------------------------
# local archives
# ---------------------------------------------------------------------------------------------


def test_compaction_keeps_every_flow_once_in_sorted_files_of_the_asked_size(tmp_path: Path, six_hours):
    root = tmp_path / "archive"
    write_archive(str(root), six_hours, max_file_rows=400)
    before_files = sorted((root / "flows").rglob("*.parquet"))
    partitions = {p.parent for p in before_files}
    assert len(partitions) == 6 and len(before_files) > 6 * 10
    before = local_uuids(root)
    assert sum(before.values()) == 30_000 == len(before)
    schema_before = pq.read_schema(before_files[0])

    summary = summary_of(compact(str(root), "--max-file-rows", "3000", "--row-group-rows", "1000"))
    assert summary["compacted"] == 6 and summary["files_in"] == len(before_files) and summary["rows"] == 30_000
    after_files = sorted((root / "flows").rglob("*.parquet"))
    assert local_uuids(root) == before
    for directory in partitions:
        files = sorted(directory.glob("*.parquet"))
        rows = [pq.read_metadata(f).num_rows for f in files]
        assert all(r == 3000 for r in rows[:-1]) and 0 < rows[-1] <= 3000, rows
        times = np.concatenate([pq.read_table(f, columns=["time"]).column("time").cast(pa.int64()).to_numpy()
                                for f in files])
        assert (np.diff(times) >= 0).all(), f"{directory}: rows not in time order across its files"
        meta = pq.read_metadata(files[0])
        assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [1000, 1000, 1000]
    # the schema is the sink's, so every reader keeps working: DuckDB with Hive partitions
    counted = duckdb.sql(f"select count(*), count(distinct uuid), count(distinct hour) from read_parquet("
                         f"'{root}/flows/**/*.parquet', hive_partitioning=true)").fetchall()[0]
    assert counted == (30_000, 30_000, 6)
    assert pq.read_schema(after_files[0]) == schema_before

    again = summary_of(compact(str(root), "--max-file-rows", "3000"))
    assert again["compacted"] == 0, "a compacted archive is left as it is"
    assert sorted((root / "flows").rglob("*.parquet")) == after_files


def test_open_partitions_and_single_files_are_left_alone(tmp_path: Path):
    now_hour = time.time_ns() // HOUR_NS * HOUR_NS
    root = tmp_path / "archive"
    write_archive(str(root), flows_over_hours(1, 2000, start_ns=now_hour, seed=1), max_file_rows=300)
    write_archive(str(root), flows_over_hours(1, 200, start_ns=now_hour - 5 * HOUR_NS, seed=2), max_file_rows=1000)
    files = sorted((root / "flows").rglob("*.parquet"))
    summary = summary_of(compact(str(root)))
    assert summary["compacted"] == 0 and summary["partitions_seen"] == 2
    assert sorted((root / "flows").rglob("*.parquet")) == files
    summary = summary_of(compact(str(root), "--settle", "0"))
    assert summary["compacted"] == 0, "the current hour is still open even with --settle 0"


def test_late_files_are_merged_by_the_next_run(tmp_path: Path, six_hours):
    root = tmp_path / "archive"
    write_archive(str(root), six_hours.slice(0, 5000), max_file_rows=500)
    summary_of(compact(str(root)))
    late = six_hours.slice(5000, 100)  # the same hour again: a replay from Kafka, a slow node
    write_archive(str(root), late, max_file_rows=500)
    summary = summary_of(compact(str(root)))
    assert summary["compacted"] >= 1
    assert local_uuids(root) == Counter(six_hours.slice(0, 5100).column("uuid").to_pylist())


def test_aggregate_rows_are_compacted_by_their_window(tmp_path: Path, six_hours):
    rows = aggregate_rows(six_hours, window="60s")
    root = tmp_path / "archive"
    write_archive(str(root), rows, max_file_rows=50, kind="aggregates")
    before = sorted((root / "aggregates").rglob("*.parquet"))
    assert len(before) > 6
    summary = summary_of(compact(str(root)))
    assert summary["rows"] == rows.num_rows
    after = sorted((root / "aggregates").rglob("*.parquet"))
    assert len(after) == 6
    merged = pa.concat_tables(pq.read_table(f) for f in after)
    assert merged.num_rows == rows.num_rows
    starts = merged.column("window_start").cast(pa.int64()).to_numpy()
    for f in after:
        own = pq.read_table(f, columns=["window_start"]).column("window_start").cast(pa.int64()).to_numpy()
        assert (np.diff(own) >= 0).all()
    assert sorted(starts.tolist()) == sorted(rows.column("window_start").cast(pa.int64()).to_numpy().tolist())


def crash_points(tmp_path: Path, seed: int) -> tuple[Path, Counter, int]:
    """An archive of two closed hours (several files each), its uuids, and how many changes compacting it makes."""
    original = tmp_path / "original"
    batch = flows_over_hours(2, 3000, start_ns=1_767_225_600 * 10**9, seed=seed)
    write_archive(str(original), batch, max_file_rows=800)
    clean = tmp_path / "clean"
    shutil.copytree(original, clean)
    return original, Counter(batch.column("uuid").to_pylist()), changes_of(compact(str(clean)))


def test_a_crash_at_every_step_loses_and_duplicates_nothing(tmp_path: Path):
    original, want, steps = crash_points(tmp_path, seed=3)
    # per partition: the output, the journal, the rename, each input deleted, the journal deleted
    assert steps >= 2 * (1 + 1 + 1 + 2 + 1), f"a clean run made {steps} changes"
    for when in ("before", "after"):
        for step in range(1, steps + 1):
            root = tmp_path / f"crash-{when}-{step}"
            shutil.copytree(original, root)
            crashed = compact(str(root), crash_at=step, when=when)
            assert crashed.returncode == 137, (step, when, crashed.stderr[-2000:])
            summary_of(compact(str(root)))
            assert local_uuids(root) == want, f"crash {when} change {step}: flows lost or duplicated"
            assert not list(root.rglob(".*.pending")) and not list((root / "_flowship").rglob("*.json")), step
            leftovers = [p for p in root.rglob("*") if p.is_file() and p.name.startswith(".")]
            assert leftovers == [], (step, when, leftovers)
            shutil.rmtree(root)


def test_a_history_reader_sees_every_flow_once_at_every_step_of_a_compaction(tmp_path: Path):
    """``flowship history`` lists the archive while compaction may be switching a partition's files: at every
    change compaction makes (stopped there by a crash, before and after it), the reader sees each flow once."""
    from flowship.history import Archive

    original, want, steps = crash_points(tmp_path, seed=7)
    seen_both = 0
    for when in ("before", "after"):
        for step in range(1, steps + 1):
            root = tmp_path / f"crash-{when}-{step}"
            shutil.copytree(original, root)
            assert compact(str(root), crash_at=step, when=when).returncode == 137
            names = {p.name for p in root.rglob("*.parquet")}
            seen_both += any(n.startswith("compacted-") for n in names) and any(
                not n.startswith("compacted-") for n in names)
            archive = Archive(str(root))
            got = Counter(u for b in archive.select(None, None) for u in b.column("uuid").to_pylist())
            assert got == want, f"a reader after a crash {when} change {step}: flows lost or seen twice"
            assert archive.summary().flows == sum(want.values())
            shutil.rmtree(root)
    assert seen_both, "no step left compacted outputs beside their inputs: the case this test is about"


def test_retention_deletes_old_hours_and_dry_run_changes_nothing(tmp_path: Path):
    now_hour = time.time_ns() // HOUR_NS * HOUR_NS
    root = tmp_path / "archive"
    old = flows_over_hours(2, 1000, start_ns=now_hour - 40 * 24 * HOUR_NS, seed=4)
    recent = flows_over_hours(2, 1000, start_ns=now_hour - 10 * 24 * HOUR_NS, seed=5)
    write_archive(str(root), old, max_file_rows=300)
    write_archive(str(root), recent, max_file_rows=300)
    files = sorted((root / "flows").rglob("*.parquet"))

    dry = compact(str(root), "--retention", "30d", "--dry-run")
    summary = summary_of(dry)
    assert summary["deleted_partitions"] == 2 and summary["compacted"] == 2
    assert "would delete" in dry.stderr
    assert sorted((root / "flows").rglob("*.parquet")) == files

    summary = summary_of(compact(str(root), "--retention", "30d"))
    assert summary["deleted_partitions"] == 2
    assert local_uuids(root) == Counter(recent.column("uuid").to_pylist())
    assert len({p.parent for p in (root / "flows").rglob("*.parquet")}) == 2


def test_command_line_mistakes_are_one_line(tmp_path: Path):
    missing = compact(str(tmp_path / "nope"))
    assert missing.returncode == 1
    assert f"flowship compact: {tmp_path / 'nope'}: no such directory" in missing.stderr
    assert "Traceback" not in missing.stderr
    bad = compact(str(tmp_path), "--retention", "soon")
    assert bad.returncode == 2 and "--retention" in bad.stderr


def test_export_then_compact_with_the_aws_layout(tmp_path: Path):
    """What a user does: flowship export writes the archive, flowship compact merges it."""
    lines = generate_lines(tmp_path / "flows.jsonl", 5000)
    config = tmp_path / "export.yaml"
    config.write_text(json.dumps({
        "data_dir": str(tmp_path / "state"), "node_name": "node-a",
        "sources": [{"type": "file", "paths": [str(tmp_path / "flows.jsonl")], "follow": False}],
        "sinks": [{"type": "parquet", "path": str(tmp_path / "archive"), "layout": "aws", "cluster": "c1",
                   "max_file_rows": 250}]}))
    proc = subprocess.run([sys.executable, "-m", "flowship.cli", "export", "--config", str(config), "--no-progress"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    root = tmp_path / "archive"
    assert len(list((root / "flows").rglob("*.parquet"))) >= 20
    summary = summary_of(compact(str(root)))
    assert summary["rows"] == 5000
    files = list((root / "flows").rglob("*.parquet"))
    assert all("/cluster=c1/node=node-a/year=" in str(f) for f in files)
    assert sum(local_uuids(root).values()) == 5000 == len(lines)


# ---------------------------------------------------------------------------------------------
# S3
# ---------------------------------------------------------------------------------------------


def s3_uuids(server: S3Server, bucket: str) -> Counter:
    from pyarrow import fs

    s3fs = server.filesystem()
    infos = s3fs.get_file_info(fs.FileSelector(f"{bucket}/archive/flows", recursive=True))
    keys = [i.path for i in infos if i.type == fs.FileType.File and not i.base_name.startswith(".")]
    return Counter(u for k in keys for u in pq.read_table(k, filesystem=s3fs, columns=["uuid"])
                   .column("uuid").to_pylist())


def test_compaction_and_a_crash_on_s3(tmp_path: Path, s3: S3Server):
    bucket = s3.create_bucket("compact")
    env = {**aws_env(), "FLOWSHIP_TEST_S3_ENDPOINT": s3.endpoint}
    batch = flows_over_hours(3, 6000, start_ns=1_767_225_600 * 10**9, seed=6)
    write_archive(f"s3://{bucket}/archive", batch, max_file_rows=700, layout="aws", env=env)
    want = Counter(batch.column("uuid").to_pylist())
    assert s3_uuids(s3, bucket) == want
    target = f"s3://{bucket}/archive"
    # die after the first partition's outputs got their names, before its inputs are deleted
    crashed = compact(target, "--s3-endpoint", s3.endpoint, env=env, crash_at=3, when="after")
    assert crashed.returncode == 137, crashed.stderr[-2000:]
    summary = summary_of(compact(target, "--s3-endpoint", s3.endpoint, env=env))
    assert summary["recovered"] == 1
    assert s3_uuids(s3, bucket) == want
    from pyarrow import fs

    infos = s3.filesystem().get_file_info(fs.FileSelector(bucket, recursive=True))
    names = [i.path for i in infos if i.type == fs.FileType.File]
    assert all(n.rsplit("/", 1)[1].startswith("compacted-") for n in names), names
    assert len(names) == 3
