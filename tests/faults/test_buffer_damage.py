"""A disk buffer that is damaged, cut short by a power loss, or given a bad ``ack.json``.

Every case runs real ``flowship export`` processes against the development
Kafka broker (``bash deploy/dev/servers start``; these tests stop no
server, so they share it). A first run fills a sink's disk buffer while
that sink's server cannot be reached: the file source reads the whole
input and checkpoints it, so from then on the buffer holds the only copy.
The test then damages the buffer the way a disk or a power cut would, and
a second run with a working Kafka sink on the same buffer must deliver
everything except the damaged records themselves, and say what it skipped.

* 8 flipped bytes inside one record, or a damaged record header: that
  record's rows are missing from the topic, every other flow is there;
  the skip is counted (metric with the sink label), logged with segment
  and offset, and in the run summary.
* ``ack.json`` garbage, empty, cut short, a JSON list, naming a segment
  past the files, or an offset past the end: the first start exits 0,
  names the file, and replays everything (nothing deleted).
* Stray files in the buffer directory: reported by name and ignored.
* Power loss: ``kill -9`` at moments of a run that is delivering, then
  every buffer file cut back to what had been fsync'd (or its un-fsync'd
  tail overwritten with zeros), then a restart. ``ack.json`` never points
  past the fsync'd data, and after the last run every flow is in Kafka.
* Two sinks with one ``buffer.path``: ``flowship validate`` rejects it.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import orjson
import pytest
import yaml
from faultlib import (
    REPO,
    KafkaTopicReader,
    buffer_uuids,
    checkpoint_line,
    flowship,
    free_port,
    generate_input,
    log_events,
    port_in_use,
    spawn,
    spawn_export,
    stop_process,
    tail,
    write_config,
)

from flowship.pipeline.disk_buffer import RECORD_HEADER, SEGMENT_HEADER

KAFKA = os.environ.get("FLOWSHIP_KAFKA", "127.0.0.1:9092")
FLOWS = 50_000
BATCH_ROWS = 671
RECORDER = Path(__file__).resolve().parent / "export_recording_fsync.py"


@pytest.fixture(scope="module")
def kafka() -> str:
    if not port_in_use(int(KAFKA.rsplit(":", 1)[1])):
        pytest.fail(f"no Kafka broker at {KAFKA}: start the development servers with `bash deploy/dev/servers "
                    "start` (or point FLOWSHIP_KAFKA at a broker)", pytrace=False)
    return KAFKA


@pytest.fixture(scope="module")
def flows(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    path = tmp_path_factory.mktemp("buffer-input") / f"flows-{FLOWS}.jsonl"
    return path, generate_input(path, FLOWS)


def _config(root: Path, source: Path, sink: dict, shutdown: str = "60s") -> Path:
    sink = {**sink, "name": "out", "buffer": {"type": "disk", "path": str(root / "buffer")}}
    return write_config(root / "flowship.yaml", {
        "data_dir": str(root / "state"), "shutdown_timeout": shutdown,
        "sources": [{"type": "file", "paths": [str(source)], "batch_rows": BATCH_ROWS}],
        "sinks": [sink],
    })


def _kafka_sink(kafka: str, topic: str) -> dict:
    return {"type": "kafka", "brokers": kafka, "topic": topic, "create_topic": {"partitions": 1}}


def _run(config: Path, log: Path, timeout: float = 300) -> int:
    proc = spawn_export(config, log)
    try:
        return proc.wait(timeout=timeout)
    finally:
        stop_process(proc)


@pytest.fixture(scope="module")
def filled(tmp_path_factory: pytest.TempPathFactory, flows) -> Path:
    """A state dir and disk buffer holding the whole checkpointed input that no sink ever received."""
    source, uuids = flows
    root = tmp_path_factory.mktemp("filled")
    # A loki sink whose server refuses connections: it retries and never acknowledges, so when the
    # shutdown deadline passes every batch is still in the buffer.
    down = {"type": "loki", "url": f"http://127.0.0.1:{free_port()}/insert/loki/api/v1/push",
            "retry": {"initial_backoff": "100ms", "max_backoff": "1s"}}
    config = _config(root, source, down, shutdown="3s")
    log = root / "fill.log"
    # A finite run waits for its sinks without a deadline, so stop it as an operator would: SIGTERM once
    # the source has checkpointed the whole input (the shutdown deadline then leaves it all in the buffer).
    proc = spawn_export(config, log)
    try:
        deadline = time.monotonic() + 180
        while checkpoint_line(root / "state", source) < FLOWS and proc.poll() is None:
            assert time.monotonic() < deadline, f"the source did not checkpoint the input in time:\n{tail(log)}"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        stop_process(proc)
    assert checkpoint_line(root / "state", source) == FLOWS, f"the source did not checkpoint everything:\n{tail(log)}"
    held = buffer_uuids(root / "buffer")
    assert sorted(held) == sorted(uuids), f"the buffer holds {len(held)} of {FLOWS} flows:\n{tail(log)}"
    return root


def _copy(filled: Path, dest: Path) -> Path:
    shutil.copytree(filled / "state", dest / "state")
    shutil.copytree(filled / "buffer", dest / "buffer")
    return dest


def _records(segment: Path) -> list[tuple[int, int, int]]:
    """(offset, end, rows) of each record of a version-2 segment, read with the format's own layout."""
    data = segment.read_bytes()
    out, pos = [], SEGMENT_HEADER.size
    while pos < len(data):
        _magic, length, rows, _kind, _crc, _hcrc = RECORD_HEADER.unpack_from(data, pos)
        out.append((pos, pos + RECORD_HEADER.size + length, rows))
        pos += RECORD_HEADER.size + length
    return out


def _deliver(root: Path, source: Path, kafka: str, tag: str) -> tuple[int, list[str], Path]:
    """A second run with a working Kafka sink on the buffer; returns exit code, uuids in the topic, log."""
    topic = f"flowship.buffer.{tag}.{int(time.time() * 1000)}"
    config = _config(root, source, _kafka_sink(kafka, topic))
    log = root / f"deliver-{tag}.log"
    code = _run(config, log)
    reader = KafkaTopicReader(kafka, topic)
    try:
        return code, reader.read_new(), log
    finally:
        reader.close()


def _messages(log: Path, text: str) -> list[dict]:
    return [e for e in log_events(log) if text in str(e.get("event", ""))]


@pytest.mark.parametrize("where", ["payload", "header"])
def test_a_damaged_record_costs_only_its_own_flows(tmp_path, kafka, flows, filled, where):
    source, uuids = flows
    root = _copy(filled, tmp_path)
    (segment,) = sorted((root / "buffer").glob("*.seg"))
    records = _records(segment)
    k = len(records) // 3
    offset, end, rows = records[k]
    data = bytearray(segment.read_bytes())
    if where == "payload":
        for i in range(8):  # 8 flipped bytes inside one record
            data[offset + RECORD_HEADER.size + 1000 + 131 * i] ^= 0xA5
    else:
        data[offset + 4:offset + 12] = b"\xff" * 8  # its length and row count: the scan must resynchronise
    segment.write_bytes(bytes(data))
    first_row = sum(r for _o, _e, r in records[:k])
    lost = set(uuids[first_row:first_row + rows])

    code, got, log = _deliver(root, source, kafka, f"damage-{where}")
    assert code == 0, tail(log)
    assert len(got) == len(set(got)) == FLOWS - rows, f"{len(got)} messages, {len(set(got))} distinct"
    assert set(got) == set(uuids) - lost  # exactly the damaged record is missing
    (report,) = _messages(log, "skipping a damaged record")
    assert report["segment"] == str(segment) and report["offset"] == offset and report["sink"] == "out"
    assert report["rows"] == (rows if where == "payload" else "unknown")
    (summary,) = [e for e in log_events(log) if e.get("event") == "run summary"]
    assert summary["dropped"]["disk buffer of out/damaged records"] == 1
    print(f"\n  {where} damage in record {k} ({rows} flows) at offset {offset}: {len(set(got))} of {FLOWS} "
          f"delivered, lost {FLOWS - len(set(got))} (the damaged record's flows only)")


def test_damage_is_counted_in_the_metrics(tmp_path, kafka, flows, filled):
    source, uuids = flows
    root = _copy(filled, tmp_path)
    (segment,) = sorted((root / "buffer").glob("*.seg"))
    records = _records(segment)
    data = bytearray(segment.read_bytes())
    for offset, _end, _rows in (records[1], records[-2]):
        data[offset + RECORD_HEADER.size + 500] ^= 0xFF
    segment.write_bytes(bytes(data))
    topic = f"flowship.buffer.metrics.{int(time.time() * 1000)}"
    config = _config(root, source, _kafka_sink(kafka, topic))
    dump = root / "metrics.json"
    proc = spawn_export(config, root / "deliver.log", dump=dump)
    try:
        assert proc.wait(timeout=300) == 0, tail(root / "deliver.log")
    finally:
        stop_process(proc)
    samples = {(s["name"], tuple(sorted(s["labels"].items()))): s["value"]
               for s in orjson.loads(dump.read_bytes())["samples"]}
    assert samples[("flowship_buffer_corrupt_total", (("sink", "out"),))] == 2
    assert samples[("flowship_buffer_corrupt_rows_total", (("sink", "out"),))] == records[1][2] + records[-2][2]
    assert samples[("flowship_sink_flows_total", (("sink", "out"),))] == FLOWS - records[1][2] - records[-2][2]


BAD_ACKS = {
    "garbage": lambda seg, size: b"\x00\x17garbage{",
    "empty": lambda seg, size: b"",
    "cut-short": lambda seg, size: b'{"version": 2, "segment": %d, "off' % seg,
    "list": lambda seg, size: b"[]",
    "segment-past-the-files": lambda seg, size: b'{"segment": %d, "offset": 0}' % (seg + 5),
    "offset-past-the-end": lambda seg, size: b'{"segment": %d, "offset": %d}' % (seg, size + 4096),
}


@pytest.mark.parametrize("case", list(BAD_ACKS))
def test_a_bad_ack_file_is_named_and_everything_replayed(tmp_path, kafka, flows, filled, case):
    source, uuids = flows
    root = _copy(filled, tmp_path)
    (segment,) = sorted((root / "buffer").glob("*.seg"))
    ack = root / "buffer" / "ack.json"
    ack.write_bytes(BAD_ACKS[case](int(segment.stem), segment.stat().st_size))

    code, got, log = _deliver(root, source, kafka, f"ack-{case}")
    assert code == 0, f"the first start after the damage failed:\n{tail(log)}"
    assert set(got) == set(uuids), f"{FLOWS - len(set(got))} flows lost"
    (report,) = _messages(log, "ack.json is damaged or impossible")
    assert report["path"] == str(ack) and report["problem"]
    assert not _messages(log, "Traceback")
    # The next start is quiet: the file was rewritten and the buffer is empty.
    code2, got2, log2 = _deliver(root, source, kafka, f"ack-{case}-again")
    assert code2 == 0 and got2 == [] and not _messages(log2, "ack.json")


def test_stray_files_are_named_and_ignored(tmp_path, kafka, flows, filled):
    source, uuids = flows
    root = _copy(filled, tmp_path)
    buf = root / "buffer"
    (buf / "backup.seg").write_bytes(b"copy of something")
    (buf / "1.seg").write_bytes(b"")
    (buf / "README").write_text("notes")
    code, got, log = _deliver(root, source, kafka, "stray")
    assert code == 0, tail(log)
    assert len(got) == FLOWS and set(got) == set(uuids)
    (report,) = _messages(log, "ignoring files that are not the buffer's own")
    assert sorted(report["files"]) == ["1.seg", "README", "backup.seg"] and report["path"] == str(buf)
    assert (buf / "backup.seg").read_bytes() == b"copy of something"


# -- power loss -------------------------------------------------------------------------------

def _durable_sizes(fsync_log: Path) -> dict[str, int]:
    sizes: dict[str, int] = defaultdict(int)
    if fsync_log.exists():
        for line in fsync_log.read_text().splitlines():
            path, _, size = line.rpartition("\t")
            sizes[path] = max(sizes[path], int(size))
    return sizes


def _power_cut(buffer: Path, fsync_log: Path, zero_tail: bool) -> dict[str, int]:
    """Leave each segment as a power cut could: its fsync'd bytes, then nothing (or zeros)."""
    durable = _durable_sizes(fsync_log)
    lost = {}
    for seg in sorted(buffer.glob("*.seg")):
        keep = durable.get(os.path.realpath(seg), 0)
        size = seg.stat().st_size
        if keep == 0:
            seg.unlink()  # created, never fsync'd: its directory entry may not survive either
            lost[seg.name] = size
            continue
        if size > keep:
            with open(seg, "r+b") as fh:
                fh.truncate(keep)
                if zero_tail:
                    fh.seek(keep)
                    fh.write(bytes(size - keep))
            lost[seg.name] = size - keep
    return lost


def test_power_loss_never_leaves_ack_past_durable_data_and_loses_nothing(tmp_path, kafka, flows):
    source, uuids = flows
    rng = random.Random(int(os.environ.get("FLOWSHIP_FAULTS_SEED", "99")))
    topic = f"flowship.buffer.powerloss.{int(time.time() * 1000)}"
    config = _config(tmp_path, source, {**_kafka_sink(kafka, topic)})
    # A long fsync interval: more un-fsync'd data for a power cut to take.
    cfg = yaml.safe_load(config.read_text())
    cfg["sinks"][0]["buffer"]["fsync_interval"] = "1s"
    cfg["sources"][0]["read_size"] = "512KiB"  # records of a few hundred flows
    write_config(config, cfg)
    buffer, fsync_log, log = tmp_path / "buffer", tmp_path / "fsync.log", tmp_path / "flowship.log"
    env_cmd = [sys.executable, str(RECORDER), "--config", str(config)]
    cuts = []
    try:
        for life in range(8):
            fsync_log.unlink(missing_ok=True)
            proc = subprocess.Popen(env_cmd, cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=open(log, "ab"),  # noqa: SIM115 - handed to the child
                                    env={**os.environ, "PYTHONPATH": str(REPO), "FSYNC_WATCH": str(buffer),
                                         "FSYNC_LOG": str(fsync_log)})
            # Cut once this life has made progress (a 25th of the input checkpointed, so the cut meets
            # data on any machine speed), then at a random moment: fsync'd or not, as it comes.
            started, begun = time.monotonic(), checkpoint_line(tmp_path / "state", source)
            while (proc.poll() is None and time.monotonic() - started < 120
                   and checkpoint_line(tmp_path / "state", source) - begun < FLOWS // 25):
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.4))
            kill_after = time.monotonic() - started
            if proc.poll() is not None:
                assert proc.returncode == 0, f"flowship failed on its own (exit {proc.returncode}):\n{tail(log)}"
                break  # the export finished before this cut
            proc.kill()
            proc.wait(timeout=30)
            lost = _power_cut(buffer, fsync_log, zero_tail=life % 2 == 1)
            ack = orjson.loads((buffer / "ack.json").read_bytes()) if (buffer / "ack.json").exists() else None
            if ack is not None:
                seg = buffer / f"{ack['segment']:020d}.seg"
                if seg.exists():
                    durable = _durable_sizes(fsync_log).get(os.path.realpath(seg), 0)
                    assert ack["offset"] <= durable, (f"life {life}: ack.json points to offset {ack['offset']} of "
                                                      f"{seg.name}, past its fsync'd {durable} bytes")
            cuts.append((life, round(kill_after, 2), checkpoint_line(tmp_path / "state", source), lost))
        final = spawn(flowship("export", "--config", str(config), "--no-progress"), log, tmp_path)
        try:
            assert final.wait(timeout=300) == 0, tail(log)
        finally:
            stop_process(final)
    finally:
        if "proc" in locals():
            stop_process(proc)
    reader = KafkaTopicReader(kafka, topic)
    try:
        got = reader.read_new()
    finally:
        reader.close()
    missing = set(uuids) - set(got)
    assert not missing, f"{len(missing)} flows lost after simulated power cuts {cuts}"
    assert not _messages(log, "ack.json is damaged"), "an ack.json written by flowship was found impossible"
    # The cuts must have mattered: un-fsync'd data removed while the source had checkpointed past some of it.
    assert sum(1 for _l, _k, line, lost in cuts if lost and line) >= 2, f"too few telling power cuts: {cuts}"
    print(f"\n  power cuts (life, kill after s, checkpoint line, bytes lost per segment): {cuts}; "
          f"{len(got)} messages, {len(set(got))} distinct of {FLOWS}, lost 0")


def test_two_sinks_on_one_buffer_path_fail_validate(tmp_path, flows):
    source, _ = flows
    config = write_config(tmp_path / "shared.yaml", {
        "data_dir": str(tmp_path / "state"),
        "sources": [{"type": "file", "paths": [str(source)]}],
        "sinks": [{"type": "parquet", "name": "a", "path": str(tmp_path / "pq"),
                   "buffer": {"type": "disk", "path": str(tmp_path / "buf")}},
                  {"type": "stdout", "name": "b", "buffer": {"type": "disk", "path": str(tmp_path / "buf")}}],
    })
    proc = subprocess.run(flowship("validate", "--config", str(config)), capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert proc.returncode == 6, proc.stderr  # invalid configuration
    assert f"{config}: sinks[1].buffer.path: " in proc.stderr and "sink 'a' (sinks[0])" in proc.stderr
