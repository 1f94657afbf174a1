"""A slow sink: memory stays flat and the other sinks keep flowing.

The loki sink pushes to the real VictoriaLogs through a proxy that lets only
256 KiB/s of request bodies through; it has a disk buffer. Parquet and Kafka
have none. The same run is made with N and 2N flows while the RSS of the
flowship process is sampled: Parquet and Kafka reach the total while Loki
lags behind with the rest on disk, the peak RSS of the 2N run is not larger
than the N run's (give or take a margin far below what 2x input would add),
and once the proxy lets everything through Loki gets every flow.
"""

from __future__ import annotations

import time
from contextlib import closing
from pathlib import Path

from faultlib import (
    FaultProxy,
    KafkaTopicReader,
    MonitoredExport,
    RssSampler,
    metric,
    tail,
    victorialogs_uuids,
    write_config,
)

SIZES = (100_000, 200_000)
RATE = 256 * 1024  # bytes per second towards VictoriaLogs
MiB = 1 << 20


def run_once(tmp_path: Path, servers, source: Path, uuids: list[str]) -> dict:  # noqa: ANN001
    n = len(uuids)
    tag = f"slow{n}x{int(time.time())}"
    proxy = FaultProxy(servers.ports["victorialogs"], rate=RATE)
    config = write_config(tmp_path / f"slow-{n}.yaml", {
        "data_dir": str(tmp_path / f"state-{n}"), "queue_batches": 4, "shutdown_timeout": "300s",
        "sources": [{"type": "file", "paths": [str(source)], "batch_rows": 5000, "read_size": "1MiB"}],
        "sinks": [
            {"type": "parquet", "path": str(tmp_path / f"parquet-{n}"), "max_file_rows": 20000, "max_file_age": "2s"},
            {"type": "kafka", "brokers": servers.kafka, "topic": f"faults.{tag}", "create_topic": {"partitions": 3}},
            {"type": "loki", "url": f"http://127.0.0.1:{proxy.port}/insert/loki/api/v1/push",
             "static_labels": {"job": "flowship", "run": tag},
             "buffer": {"type": "disk", "path": str(tmp_path / f"buffer-{n}"), "max_bytes": "2GiB"}},
        ],
    })
    log = tmp_path / f"flowship-{n}.log"
    with closing(proxy), MonitoredExport(config, log) as export:
        proc = export.proc
        with RssSampler(proc.pid) as rss:
            def others_done() -> dict | None:
                samples = export.samples()
                if all(metric(samples, "flowship_sink_flows_total", sink=s) >= n for s in ("parquet", "kafka")):
                    return samples
                return None

            at_total = export.wait_for("parquet and kafka to deliver every flow", others_done, timeout=300)
            loki_then = metric(at_total, "flowship_sink_flows_total", sink="loki")
            buffered_then = metric(at_total, "flowship_buffer_bytes", sink="loki")
            proxy.set_rate(None)
            proc.wait(timeout=300)
        assert proc.returncode == 0, f"flowship failed:\n{tail(log)}"
    reader = KafkaTopicReader(servers.kafka, f"faults.{tag}")
    try:
        kafka = reader.read_new()
    finally:
        reader.close()
    got = [meta for meta, _ in victorialogs_uuids(servers.victorialogs, tag, n)]
    assert set(kafka) == set(uuids) and set(got) == set(uuids)
    result = {"flows": n, "input_bytes": source.stat().st_size, "peak_rss": rss.peak, "samples": len(rss.samples),
              "loki_at_total": loki_then, "loki_buffer_bytes_at_total": buffered_then}
    print(f"  {n} flows ({result['input_bytes'] / MiB:.0f} MiB of input): peak RSS {rss.peak / MiB:.0f} MiB "
          f"({len(rss.samples)} samples); when parquet and kafka had all flows, loki had {loki_then:.0f} "
          f"and {buffered_then / MiB:.1f} MiB on disk")
    return result


def test_slow_sink_memory_flat_and_others_keep_flowing(tmp_path: Path, fault_servers, flows_input):
    print(f"\nslow sink test: loki throttled to {RATE // 1024} KiB/s")
    small, large = (run_once(tmp_path, fault_servers, *flows_input(n)) for n in SIZES)
    for r in (small, large):
        # The slow sink lagged, and what it had not delivered waited in its disk buffer.
        assert r["loki_at_total"] < r["flows"], r
        assert r["loki_buffer_bytes_at_total"] > 0, r
    # Twice the input adds far less than holding the extra input would (109 MiB of JSON, more as Arrow). The
    # peak of the same run spreads by tens of MiB on this machine (28 to 65 MiB of growth seen), hence the margin.
    growth = large["peak_rss"] - small["peak_rss"]
    extra_input = large["input_bytes"] - small["input_bytes"]
    print(f"  peak RSS growth with 2x input: {growth / MiB:.0f} MiB (extra input {extra_input / MiB:.0f} MiB)")
    assert growth < 0.75 * extra_input, (small, large)
    assert large["peak_rss"] < 1.5 * small["peak_rss"], (small, large)
