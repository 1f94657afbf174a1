"""A disk buffer whose file system fills up while its sink is stalled.

The loki sink's disk buffer lives on a 4 MiB tmpfs mounted for the test; its
``max_bytes`` is far larger, so it is the file system that fills (ENOSPC),
not the buffer's own limit. The sink is stalled by a fault-injection proxy in
front of the real VictoriaLogs that refuses every connection, as a stopped
server would, and is brought back once the buffer is full.

* ``when_full: block``: the source waits, the log says why, nothing is lost;
  once the sink is back every flow is delivered exactly once.
* ``when_full: drop_newest``: batches that do not fit are dropped and counted;
  ``flowship_buffer_dropped_total`` equals the input minus what was delivered.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import time
from contextlib import closing
from pathlib import Path

import pytest
from faultlib import FaultProxy, MonitoredExport, log_events, metric, tail, victorialogs_uuids, write_config

FLOWS = 20_000
BLOCK_MESSAGE = "disk buffer: no space left on device, waiting (when_full: block)"
DROP_MESSAGES = ("disk buffer: no space left on device, dropping the newest batch",
                 "disk buffer full: dropping the newest batch (when_full: drop_newest)")


@pytest.fixture()
def small_tmpfs(tmp_path: Path):
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"mounting a 4 MiB tmpfs failed (the disk-full tests need root): {proc.stderr.strip()}",
                    pytrace=False)
    try:
        yield mount_point
    finally:
        if subprocess.run(["umount", str(mount_point)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def fill(directory: Path) -> int:
    """Take every byte left on the file system with one file; returns how many."""
    written = 0
    with open(directory / "filler", "wb", buffering=0) as fh:
        chunk = b"\0" * 4096
        while True:
            try:
                written += fh.write(chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                return written


def dumped(dump: Path, name: str, **labels: str) -> float:
    for s in json.loads(dump.read_text())["samples"]:
        if s["name"] == name and s["labels"] == labels:
            return s["value"]
    return 0.0


def setup_run(tmp_path: Path, tmpfs: Path, servers, flows_input, when_full: str):  # noqa: ANN001
    source, uuids = flows_input(FLOWS)
    proxy = FaultProxy(servers.ports["victorialogs"])
    proxy.down()
    run = f"diskfull{when_full.replace('_', '')}{int(time.time())}"
    config = write_config(tmp_path / "disk-full.yaml", {
        "data_dir": str(tmp_path / "state"), "queue_batches": 2, "shutdown_timeout": "120s",
        "sources": [{"type": "file", "paths": [str(source)], "batch_rows": 1000, "read_size": "64KiB"}],
        "sinks": [{"type": "loki", "url": f"http://127.0.0.1:{proxy.port}/insert/loki/api/v1/push",
                   "static_labels": {"job": "flowship", "run": run},
                   "retry": {"initial_backoff": "100ms", "max_backoff": "500ms"},
                   "buffer": {"type": "disk", "path": str(tmpfs / "loki"), "max_bytes": "256MiB",
                              "max_segment_bytes": "1MiB", "when_full": when_full}}],
    })
    return source, uuids, proxy, run, config


def sink_back(proxy: FaultProxy, proc: subprocess.Popen) -> None:
    """The stalled server answers again; the run delivers what the buffer holds and ends."""
    proxy.up()
    proc.wait(timeout=300)


def test_block_waits_on_a_full_disk_and_then_delivers_everything(tmp_path, small_tmpfs, fault_servers, flows_input):
    _source, uuids, proxy, run, config = setup_run(tmp_path, small_tmpfs, fault_servers, flows_input, "block")
    log, dump = tmp_path / "flowship.log", tmp_path / "metrics.json"
    with closing(proxy), MonitoredExport(config, log, dump) as export:
        proc = export.proc
        export.wait_for("the buffer to report the full disk", lambda: any(
            e.get("event") == BLOCK_MESSAGE for e in log_events(log)), timeout=120)
        line = next(e for e in log_events(log) if e.get("event") == BLOCK_MESSAGE)
        assert line["level"] == "warning" and line["sink"] == "loki" and line["path"] == str(small_tmpfs / "loki")
        # Take the last free bytes too: even acknowledging must work on a completely full disk.
        filler = fill(small_tmpfs)
        samples = export.samples()
        read = metric(samples, "flowship_flows_in_total", source="file")
        assert read < FLOWS, "the source should be waiting for the full buffer"
        assert metric(samples, "flowship_buffer_full_waits_total", sink="loki") >= 1
        assert metric(samples, "flowship_sink_flows_total", sink="loki") == 0
        print(f"\nblock: disk full ({filler} bytes were left), source waiting after {read:.0f} of {FLOWS} flows")
        sink_back(proxy, proc)
        assert proc.returncode == 0, f"flowship failed:\n{tail(log)}"
    assert dumped(dump, "flowship_sink_flows_total", sink="loki") == FLOWS
    assert dumped(dump, "flowship_buffer_dropped_total", sink="loki") == 0
    got = [meta for meta, _ in victorialogs_uuids(fault_servers.victorialogs, run, FLOWS)]
    assert len(got) == FLOWS and set(got) == set(uuids), f"{len(set(uuids) - set(got))} flows missing"
    assert not os.listdir(small_tmpfs / "loki") or all(
        p.stat().st_size == 0 for p in (small_tmpfs / "loki").glob("*.seg"))


def test_drop_newest_drops_exactly_what_it_counts(tmp_path, small_tmpfs, fault_servers, flows_input):
    _source, uuids, proxy, run, config = setup_run(tmp_path, small_tmpfs, fault_servers, flows_input, "drop_newest")
    log, dump = tmp_path / "flowship.log", tmp_path / "metrics.json"
    with closing(proxy), MonitoredExport(config, log, dump) as export:
        proc = export.proc

        def all_read_and_dropping() -> bool:
            samples = export.samples()
            return (metric(samples, "flowship_flows_in_total", source="file") == FLOWS
                    and metric(samples, "flowship_buffer_dropped_total", sink="loki") > 0)

        export.wait_for("the source to finish while the full buffer drops", all_read_and_dropping, timeout=120)
        sink_back(proxy, proc)
        assert proc.returncode == 0, f"flowship failed:\n{tail(log)}"
    dropped = dumped(dump, "flowship_buffer_dropped_total", sink="loki")
    delivered = dumped(dump, "flowship_sink_flows_total", sink="loki")
    logged = sum(e["rows"] for e in log_events(log) if e.get("event") in DROP_MESSAGES)
    got = [meta for meta, _ in victorialogs_uuids(fault_servers.victorialogs, run, int(delivered))]
    print(f"\ndrop_newest: {FLOWS} flows in, {delivered:.0f} delivered, {dropped:.0f} dropped and counted")
    assert dropped > 0 and delivered > 0
    assert dropped == FLOWS - delivered == logged
    assert len(got) == delivered and len(set(got)) == len(got) and set(got) <= set(uuids)
