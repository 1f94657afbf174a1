"""Each server stopped for 30 s in the middle of a run, then started again: no flow is lost.

One run exports generated flows to Parquet and, for each of Kafka,
OpenSearch and VictoriaLogs, to two sinks: one with a disk buffer (it keeps
accepting while its server is down) and one without (``memory`` mode: the
sink holds its requests and retries, and once its queue is full the source
waits). The file source follows its input, and the test appends the flows in
four parts: the first before the run, one while each server is down, so that
every outage happens with flows on their way to it. VictoriaLogs, Kafka and
OpenSearch are stopped in turn for 30 s each with ``deploy/dev/servers stop
NAME`` and started again; once every sink reports all flows delivered the
run is stopped with SIGTERM, and every sink holds every flow.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

from faultlib import (
    KafkaTopicReader,
    MonitoredExport,
    metric,
    network_sinks,
    opensearch_ids,
    parquet_duckdb_counts,
    parquet_files,
    parquet_uuids,
    tail,
    victorialogs_uuids,
    write_config,
)

FLOWS = 60_000
OUTAGE_SECONDS = 30.0
ORDER = (("victorialogs", "loki"), ("kafka", "kafka"), ("opensearch", "elasticsearch"))


def test_each_server_down_for_30s_mid_run_loses_nothing(tmp_path: Path, fault_servers, flows_input):
    generated, uuids = flows_input(FLOWS)
    lines = generated.read_bytes().splitlines(keepends=True)
    part = FLOWS // (len(ORDER) + 1)
    parts = [lines[i * part:(i + 1) * part if i < len(ORDER) else FLOWS] for i in range(len(ORDER) + 1)]
    source = tmp_path / "events.log"
    source.write_bytes(b"".join(parts[0]))
    appended = len(parts[0])
    tag = f"outage{int(time.time())}"
    buffered = network_sinks(fault_servers, tag, tmp_path / "buffers")
    memory = network_sinks(fault_servers, tag, None, kafka_queue=10000, suffix="_mem")
    config = write_config(tmp_path / "outage.yaml", {
        "data_dir": str(tmp_path / "state"), "queue_batches": 4, "shutdown_timeout": "120s",
        "sources": [{"type": "file", "paths": [str(source)], "follow": True, "batch_rows": 5000,
                     "read_size": "1MiB"}],
        "sinks": [{"type": "parquet", "path": str(tmp_path / "parquet"), "max_file_rows": 20000,
                   "max_file_age": "2s"}, *buffered, *memory],
    })
    log = tmp_path / "flowship.log"
    with MonitoredExport(config, log) as export:
        proc = export.proc
        started = time.monotonic()
        names = ["parquet", *(s["name"] for s in (*buffered, *memory))]
        print(f"\nserver outage test: {FLOWS} flows in {len(parts)} parts, each server down {OUTAGE_SECONDS:.0f}s")

        def delivered(sink: str) -> float:
            return metric(export.samples(), "flowship_sink_flows_total", sink=sink)

        def all_delivered(n: int) -> bool:
            samples = export.samples()
            return all(metric(samples, "flowship_sink_flows_total", sink=name) >= n for name in names)

        export.wait_for(f"every sink to deliver the first {appended} flows", lambda: all_delivered(appended),
                        timeout=180)
        print(f"  first part delivered after {time.monotonic() - started:.1f}s")
        for i, (server, sink) in enumerate(ORDER, start=1):
            fault_servers.stop(server)
            down_at = time.monotonic()
            with open(source, "ab") as fh:  # flows arrive while the server is down
                fh.write(b"".join(parts[i]))
            appended += len(parts[i])
            time.sleep(OUTAGE_SECONDS)
            assert proc.poll() is None, f"flowship exited while {server} was down:\n{tail(log)}"
            pending = {name: appended - delivered(name) for name in (sink, f"{sink}_mem")}
            fault_servers.start(server)
            downtime = time.monotonic() - down_at
            print(f"  {server}: down {downtime:.1f}s; flows not yet delivered at the end of the outage: "
                  + ", ".join(f"{k} {v:.0f}" for k, v in pending.items()))
            assert downtime >= OUTAGE_SECONDS
            assert all(v >= len(parts[i]) for v in pending.values()), \
                f"the sinks of {server} delivered flows while it was down: {pending}"
        export.wait_for("every sink to deliver every flow", lambda: all_delivered(FLOWS), timeout=300)
        print(f"  everything delivered after {time.monotonic() - started:.1f}s")
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=150)
        assert proc.returncode == 0, f"flowship failed:\n{tail(log)}"

    expected = set(uuids)
    parquet = parquet_uuids(parquet_files(tmp_path / "parquet"))
    assert parquet_duckdb_counts(tmp_path / "parquet") == (len(parquet), FLOWS)
    report = {"parquet": len(parquet) - FLOWS}
    for sinks in (buffered, memory):
        kafka, es, loki = sinks
        reader = KafkaTopicReader(fault_servers.kafka, kafka["topic"])
        try:
            got = reader.read_new()
        finally:
            reader.close()
        assert set(got) == expected, f"{kafka['name']}: {len(expected - set(got))} flows missing"
        report[kafka["name"]] = len(got) - FLOWS
        ids = opensearch_ids(fault_servers.opensearch, es["data_stream"])
        assert len(ids) == FLOWS and set(ids) == expected, \
            f"{es['name']}: {len(ids)} documents, {len(expected - set(ids))} flows missing"
        report[es["name"]] = 0
        vl = victorialogs_uuids(fault_servers.victorialogs, loki["static_labels"]["run"], FLOWS)
        got = [meta for meta, _ in vl]
        assert set(got) == expected, f"{loki['name']}: {len(expected - set(got))} flows missing"
        report[loki["name"]] = len(got) - FLOWS
    assert not any(p.stat().st_size for p in (tmp_path / "state" / "dead-letter").glob("*.jsonl"))
    print("  lost 0 in every sink; duplicates " + ", ".join(f"{k} {v}" for k, v in report.items()))
