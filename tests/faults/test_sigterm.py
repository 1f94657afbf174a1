"""SIGTERM during heavy load: a clean exit within the deadline, and nothing lost across two runs.

``flowship export`` exports a generated input to Parquet, Kafka, OpenSearch
and VictoriaLogs (network sinks behind disk buffers) and gets SIGTERM while
it is busy. VictoriaLogs is reached through a proxy that lets 64 KiB/s
through, so the loki sink surely has batches in flight and in its buffer
when the signal comes. It must exit 0 within ``shutdown_timeout``. Then:

* everything acknowledged is in the sinks: each sink holds at least the rows
  it reported as delivered, and every line up to the source's checkpoint is
  in each sink or in that sink's disk buffer;
* a second run (no signal) delivers the rest, including whatever the first
  run left in the buffers, and every flow is in every sink.

Both runs share the data directory (checkpoints and buffers); the second one
has a longer ``shutdown_timeout`` because at the end of a finite input that
setting also bounds how long the disk buffers may still drain.
"""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

from faultlib import (
    FaultProxy,
    KafkaTopicReader,
    MonitoredExport,
    buffer_uuids,
    checkpoint_line,
    log_events,
    metric,
    network_sinks,
    opensearch_ids,
    parquet_files,
    parquet_uuids,
    tail,
    victorialogs_uuids,
    write_config,
)

FLOWS = 100_000
SHUTDOWN_TIMEOUT = 20.0
KEPT = "sink did not drain its disk buffer before the shutdown deadline; the remaining batches are kept for the next start"
REPLAYING = "disk buffer: replaying batches not acknowledged before the last stop"


def delivered_counts(log: Path) -> dict[str, int]:
    """``sink NAME: N rows delivered`` lines of the run summary the CLI prints."""
    text = log.read_text(errors="replace")
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^  sink (\S+): (\d+) rows delivered$", text, re.M)}


def test_sigterm_under_load_exits_clean_and_loses_nothing(tmp_path: Path, fault_servers, flows_input):
    source, uuids = flows_input(FLOWS)
    line_of = {u: i + 1 for i, u in enumerate(uuids)}
    tag = f"sigterm{int(time.time())}"
    state, out, buffers = tmp_path / "state", tmp_path / "parquet", tmp_path / "buffers"
    kafka, es, loki = network_sinks(fault_servers, tag, buffers)
    proxy = FaultProxy(fault_servers.ports["victorialogs"], rate=64 * 1024)
    loki["url"] = f"http://127.0.0.1:{proxy.port}/insert/loki/api/v1/push"
    settings = {
        "data_dir": str(state), "queue_batches": 4, "shutdown_timeout": f"{SHUTDOWN_TIMEOUT:g}s",
        "sources": [{"type": "file", "paths": [str(source)], "batch_rows": 5000, "read_size": "1MiB"}],
        "sinks": [{"type": "parquet", "path": str(out), "max_file_rows": 20000, "max_file_age": "2s"},
                  kafka, es, loki],
    }
    config = write_config(tmp_path / "sigterm.yaml", settings)
    # When a finite input ends, shutdown_timeout also bounds how long the disk buffers may drain before
    # the process exits (the rest waits for the next start); the second run allows enough for all of it.
    second_config = write_config(tmp_path / "second.yaml", {**settings, "shutdown_timeout": "300s"})
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    print(f"\nSIGTERM test: {FLOWS} flows, shutdown_timeout {SHUTDOWN_TIMEOUT:g}s")
    with MonitoredExport(config, first_log) as export:
        proc = export.proc

        def busy() -> dict | None:
            samples = export.samples()
            read = metric(samples, "flowship_flows_in_total", source="file")
            if read >= FLOWS // 4 and all(metric(samples, "flowship_sink_flows_total", sink=s) > 0
                                          for s in ("parquet", "kafka")):
                return samples
            return None

        samples = export.wait_for("the export to be busy", busy, timeout=180, interval=0.1)
        read = metric(samples, "flowship_flows_in_total", source="file")
        behind = {s: FLOWS - metric(samples, "flowship_sink_flows_total", sink=s)
                  for s in ("parquet", "kafka", "elasticsearch", "loki")}
        assert read < FLOWS, "the source read everything before the signal; use a larger input"
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        proc.wait(timeout=SHUTDOWN_TIMEOUT + 15)  # the deadline plus the interpreter's own exit
        took = time.monotonic() - signalled
        assert proc.returncode == 0, f"exit {proc.returncode} after SIGTERM:\n{tail(first_log)}"
    proxy.set_rate(None)
    reported = delivered_counts(first_log)
    kept = [e["sink"] for e in log_events(first_log) if e.get("event") == KEPT]
    checkpoint = checkpoint_line(state, source)
    print(f"  SIGTERM after {read:.0f} flows read, still to deliver {behind}; exit 0 after {took:.1f}s; checkpoint line {checkpoint}; "
          f"delivered {reported}; sinks that left batches in their buffer: {kept or 'none'}")
    assert set(reported) == {"parquet", "kafka", "elasticsearch", "loki"}
    assert "loki" in kept, "the throttled loki sink should have left batches in its disk buffer"

    # Everything acknowledged is in the sinks.
    topic = KafkaTopicReader(fault_servers.kafka, kafka["topic"])
    try:
        have = {
            "parquet": parquet_uuids(parquet_files(out)),
            "kafka": topic.read_new(),
            "elasticsearch": opensearch_ids(fault_servers.opensearch, es["data_stream"]),
            "loki": [m for m, _ in victorialogs_uuids(fault_servers.victorialogs, loki["static_labels"]["run"],
                                                      reported["loki"])],
        }
        for sink, got in have.items():
            assert len(got) >= reported[sink], f"{sink} reported {reported[sink]} delivered but holds {len(got)}"
            assert len(set(got)) >= reported[sink] or sink in ("kafka", "loki"), sink
            held = set(got) | set(buffer_uuids(buffers / sink))
            missing = [u for u in uuids[:checkpoint] if u not in held]
            assert not missing, (f"{sink}: {len(missing)} checkpointed flows are neither delivered nor buffered, "
                                 f"e.g. line {line_of[missing[0]]}")
        assert len(have["parquet"]) == reported["parquet"]

        # The next start delivers the rest, the buffers' leftovers included.
        with MonitoredExport(second_config, second_log) as second:
            proc = second.proc
            proc.wait(timeout=420)
            assert proc.returncode == 0, f"the second run failed:\n{tail(second_log)}"
        replayed = {e["sink"]: e["batches"] for e in log_events(second_log) if e.get("event") == REPLAYING}
        assert set(kept) <= set(replayed), (kept, replayed)
        have["parquet"] = parquet_uuids(parquet_files(out))
        have["kafka"] += topic.read_new()
        have["elasticsearch"] = opensearch_ids(fault_servers.opensearch, es["data_stream"])
        have["loki"] = [m for m, _ in victorialogs_uuids(fault_servers.victorialogs, loki["static_labels"]["run"],
                                                         FLOWS)]
    finally:
        topic.close()
        proxy.close()
    expected = set(uuids)
    for sink, got in have.items():
        assert set(got) == expected, f"{sink}: {len(expected - set(got))} flows lost across the two runs"
    assert len(have["elasticsearch"]) == FLOWS
    print(f"  second run replayed buffered batches {replayed or 'none'}; lost 0; duplicates "
          + ", ".join(f"{k} {len(v) - FLOWS}" for k, v in have.items()))
