"""Checkpoints: OrderedAcks advances only over a contiguous prefix of completed batches, and CheckpointStore
persists a position by write, fsync and rename, so a crash at any moment leaves the last saved file whole."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sinks"))

from helpers import record_durability  # noqa: E402

from flowship.pipeline import checkpoint as checkpoint_module  # noqa: E402
from flowship.pipeline.checkpoint import CheckpointStore, OrderedAcks  # noqa: E402
from flowship.pipeline.envelope import Receipt  # noqa: E402


def acks() -> tuple[OrderedAcks, list[object]]:
    advances: list[object] = []
    return OrderedAcks(advances.append), advances


def test_advances_only_over_contiguous_done_positions():
    tracker, advances = acks()
    receipts = [tracker.issue(position, rows=10) for position in range(1, 6)]
    assert tracker.in_flight == 5
    receipts[2].release()  # 3 is done, 1 and 2 are not: nothing may be persisted
    assert (advances, tracker.committed) == ([], None)
    receipts[0].release()
    assert (advances, tracker.committed) == ([1], 1)
    receipts[1].release()  # 2 completes the prefix up to 3: one advance, to the newest position
    assert (advances, tracker.committed) == ([1, 3], 3)
    receipts[4].release()
    assert advances == [1, 3]
    receipts[3].release()
    assert (advances, tracker.committed, tracker.in_flight) == ([1, 3, 5], 5, 0)


def test_a_batch_held_by_several_sinks_completes_with_the_last_one():
    tracker, advances = acks()
    receipt = tracker.issue("a")
    receipt.retain(2)  # fanned out to three sinks
    receipt.release()
    receipt.release()
    assert advances == []
    receipt.release()
    assert advances == ["a"]
    with pytest.raises(RuntimeError, match="released more often than retained"):
        receipt.release()
    assert advances == ["a"]


def test_positions_reported_under_concurrent_completion_never_go_back():
    """A thread that finished an older prefix must not report it after a newer one was reported.

    Thread 1 completes batch 1 and is slow to report it; meanwhile thread 2 completes batch 2.
    Reporting 2 and then 1 would leave the older position as the last one persisted.
    """
    reported: list[int] = []
    second: list[threading.Thread] = []

    def on_advance(position: int) -> None:
        if position == 1:
            second[0].start()
            second[0].join(1.0)  # let the other completion run while this one is still reporting
        reported.append(position)

    tracker = OrderedAcks(on_advance)
    first, later = tracker.issue(1), tracker.issue(2)
    second.append(threading.Thread(target=later.release))
    first.release()
    second[0].join(10)
    assert reported == [1, 2]
    assert tracker.committed == 2


def test_many_threads_completing_in_random_order_report_a_rising_sequence():
    reported: list[int] = []
    tracker = OrderedAcks(reported.append)
    receipts = [tracker.issue(i) for i in range(2000)]
    order = receipts[:]
    random.Random(7).shuffle(order)
    threads = [threading.Thread(target=lambda part=order[k::8]: [r.release() for r in part]) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert reported == sorted(reported) and len(set(reported)) == len(reported)
    assert reported[-1] == tracker.committed == 1999
    assert tracker.in_flight == 0


def test_store_saves_and_loads_under_the_data_dir(tmp_path):
    store = CheckpointStore(tmp_path, "my source/1")
    assert store.path == tmp_path / "checkpoints" / "my_source_1.json"
    assert store.load() == {}  # nothing saved yet
    state = {"version": 2, "files": {"abc": {"offset": 123, "line": 4}}}
    store.save(state)
    assert json.loads(store.path.read_text()) == state
    assert CheckpointStore(tmp_path, "my source/1").load() == state
    assert [p.name for p in store.path.parent.iterdir()] == ["my_source_1.json"]  # no temp file left


def test_save_is_write_fsync_rename(tmp_path, monkeypatch):
    events = record_durability(monkeypatch, checkpoint_module)
    store = CheckpointStore(tmp_path, "file")
    store.save({"n": 1})
    tmp = store.path.with_name(".file.json.tmp")
    assert events == [("fsync", str(tmp)), ("rename", ".file.json.tmp -> file.json")]
    assert store.path.read_text() == '{"n": 1}'


def test_a_crash_before_the_rename_leaves_the_last_checkpoint_and_a_torn_temp_is_ignored(tmp_path, monkeypatch):
    store = CheckpointStore(tmp_path, "file")
    store.save({"offset": 100})

    def crash(src: object, dst: object) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(checkpoint_module.os, "replace", crash)
    with pytest.raises(OSError):
        store.save({"offset": 200})
    monkeypatch.undo()
    tmp = store.path.with_name(".file.json.tmp")
    tmp.write_bytes(b'{"offset": 2')  # torn: as a crash in the middle of the write leaves it
    assert CheckpointStore(tmp_path, "file").load() == {"offset": 100}
    store.save({"offset": 300})  # the next save overwrites the torn temp file
    assert store.load() == {"offset": 300}
    assert not tmp.exists()


@pytest.mark.parametrize("content", [b'{"version": 2, "files": {"ab', b"", b"\x00\x00\x00", b"[1, 2]", b'"text"'])
def test_a_damaged_checkpoint_is_a_clear_error_naming_the_file(tmp_path, content):
    store = CheckpointStore(tmp_path, "file")
    store.path.parent.mkdir(parents=True)
    store.path.write_bytes(content)
    with pytest.raises(RuntimeError) as caught:
        store.load()
    message = str(caught.value)
    assert message.startswith(f"checkpoint {store.path} is unreadable (")
    assert message.endswith("move it away to start over")


def test_an_unreadable_checkpoint_file_is_a_clear_error(tmp_path):
    store = CheckpointStore(tmp_path, "file")
    store.path.mkdir(parents=True)  # a directory where the file should be
    with pytest.raises(RuntimeError, match=f"checkpoint {store.path} is unreadable"):
        store.load()


def test_receipts_without_a_tracker_still_complete():
    """A source with nothing to checkpoint (stdin) emits plain receipts: releasing them is all."""
    receipt = Receipt(rows=5)
    receipt.release()
    assert receipt.done and not receipt.failed


def test_export_with_a_damaged_checkpoint_refuses_to_start_and_names_the_file(tmp_path):
    """Not a traceback, not a silent start from the beginning: exit 1 and what to do."""
    (tmp_path / "in.jsonl").write_text("")
    checkpoint = tmp_path / "state" / "checkpoints" / "file.json"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_text("[1, 2]")
    config = tmp_path / "c.yaml"
    config.write_text(f"data_dir: {tmp_path / 'state'}\nsources: [{{type: file, paths: [{tmp_path / 'in.jsonl'}]}}]\n"
                      f"sinks: [{{type: file, path: {tmp_path / 'out.jsonl'}}}]\n")
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-m", "flowship.cli", "export", "--config", str(config), "--no-progress"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(repo)})
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert f"flowship: cannot start: checkpoint {checkpoint} is unreadable (expected a JSON object, got list); " \
           "move it away to start over" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert checkpoint.read_text() == "[1, 2]"  # left for the operator to look at
