"""kill -9 of ``flowship export`` at random moments: nothing acknowledged is ever lost.

One large generated input is exported from a checkpointing file source to
Parquet, Kafka, OpenSearch and the Loki push API (VictoriaLogs) at once, each
network sink behind a disk buffer. The process is killed with SIGKILL at
seeded random moments (or as soon as it has moved the checkpoint by a
fifteenth of the input, so that the export cannot finish before the twelfth
kill on a fast machine) and started again each time, then left to finish.

After every kill the test reads what each sink holds and what each buffer
would replay, and checks the two invariants that make at-least-once true:

* no loss at the checkpoint: every line up to the persisted checkpoint is in
  each sink or in that sink's disk buffer;
* every extra copy is explained: a flow delivered again by a later process
  was either replayed from that sink's disk buffer (the sink had it but its
  acknowledgement was not persisted yet) or read again by the source after
  its checkpoint.

At the end every flow uuid is in every sink; OpenSearch holds no duplicate
(the flow uuid is the document ``_id``); duplicates in Parquet and Kafka are
counted, reported and each one explained as above. A reader removes them by
uuid, e.g. ``select distinct on (uuid) * from read_parquet(...)``.
"""

from __future__ import annotations

import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from faultlib import (
    KafkaTopicReader,
    buffer_uuids,
    checkpoint_line,
    duplicates,
    opensearch_count,
    opensearch_ids,
    parquet_duckdb_counts,
    parquet_files,
    parquet_uuids,
    spawn_export,
    stop_process,
    tail,
    victorialogs_uuids,
    write_config,
)
from faultlib import (
    network_sinks as make_network_sinks,
)

FLOWS = 200_000
KILLS = 12
SEED = int(os.environ.get("FLOWSHIP_FAULTS_SEED", "4242"))
KILL_AFTER = (1.5, 8.0)  # seconds after the process started (earlier if it already checkpointed a lot)


@dataclass
class Lifetime:
    number: int
    kill_after: float | None  # None: left to finish
    started_at_line: int
    exit_code: int | None = None
    ended_at_line: int = 0
    delivered: dict[str, list[str]] = field(default_factory=dict)  # parquet, kafka: uuids delivered in this life
    replay: dict[str, list[str]] = field(default_factory=dict)  # disk buffer contents left for the next life
    opensearch: int = 0


def test_kill9_at_random_moments_loses_nothing(tmp_path: Path, fault_servers, flows_input):
    source, uuids = flows_input(FLOWS)
    line_of = {u: i + 1 for i, u in enumerate(uuids)}
    tag = f"kill9{int(time.time())}"
    state, out, buffers = tmp_path / "state", tmp_path / "parquet", tmp_path / "buffers"
    sinks = [{"type": "parquet", "path": str(out), "max_file_rows": 20000, "max_file_age": "2s"},
             *make_network_sinks(fault_servers, tag, buffers)]
    config = write_config(tmp_path / "kill9.yaml", {
        "data_dir": str(state), "queue_batches": 4, "shutdown_timeout": "300s",
        "sources": [{"type": "file", "paths": [str(source)], "batch_rows": 5000, "read_size": "1MiB"}],
        "sinks": sinks,
    })
    stream = sinks[2]["data_stream"]
    run_label = sinks[3]["static_labels"]["run"]
    topic = KafkaTopicReader(fault_servers.kafka, sinks[1]["topic"])
    rng = random.Random(SEED)
    log = tmp_path / "flowship.log"
    lives: list[Lifetime] = []
    seen_files: set[Path] = set()
    replay = {"kafka": [], "elasticsearch": [], "loki": []}
    print(f"\nkill -9 test: {FLOWS} flows, seed {SEED}, up to {KILLS} kills, then a run to the end")
    try:
        for number in range(1, KILLS + 2):
            final = number == KILLS + 1
            life = Lifetime(number, None if final else round(rng.uniform(*KILL_AFTER), 2),
                            checkpoint_line(state, source))
            proc = spawn_export(config, log)
            if final:
                proc.wait(timeout=420)
            else:
                started = time.monotonic()
                # The seeded moment, or earlier once this process moved the checkpoint by a fifteenth of the
                # input, so that a fast machine cannot finish the export before the kills are done.
                while proc.poll() is None:
                    elapsed = time.monotonic() - started
                    advanced = checkpoint_line(state, source) - life.started_at_line
                    if elapsed >= life.kill_after or advanced >= FLOWS // 15:
                        life.kill_after = round(elapsed, 2)
                        proc.kill()
                        proc.wait(timeout=30)
                        break
                    time.sleep(0.05)
            life.exit_code = proc.returncode
            life.ended_at_line = checkpoint_line(state, source)
            files = parquet_files(out)
            life.delivered["parquet"] = parquet_uuids(files - seen_files)
            seen_files = files
            life.delivered["kafka"] = topic.read_new()
            life.replay = {name: buffer_uuids(buffers / name) for name in replay}
            life.opensearch = opensearch_count(fault_servers.opensearch, stream)
            lives.append(life)
            how = "finished" if life.exit_code == 0 else (
                f"killed {life.kill_after:.2f}s after start" if life.exit_code == -9 else f"exit {life.exit_code}")
            print(f"  life {number:2d}: {how}; checkpoint line {life.started_at_line} -> {life.ended_at_line}; "
                  f"delivered parquet {len(life.delivered['parquet'])}, kafka {len(life.delivered['kafka'])}; "
                  f"opensearch total {life.opensearch}; left in buffers "
                  + ", ".join(f"{k} {len(v)}" for k, v in life.replay.items()))
            if life.exit_code == 0:
                break
            assert life.exit_code == -9, f"flowship failed on its own (exit {life.exit_code}):\n{tail(log)}"
        assert lives[-1].exit_code == 0, f"the last run did not finish cleanly:\n{tail(log)}"
        kills = sum(1 for life in lives if life.exit_code == -9)
        assert kills >= 10, f"only {kills} kills happened before the export finished; the input is too small"

        # -- invariants after every kill ------------------------------------------------------
        delivered_so_far = {"parquet": set(), "kafka": set()}
        previous_replay: dict[str, list[str]] = {"parquet": [], "kafka": []}
        previous_line = 0
        explained = {"parquet": 0, "kafka": 0}
        for life in lives:
            assert life.ended_at_line >= life.started_at_line == previous_line
            for sink in ("parquet", "kafka"):
                got = Counter(life.delivered[sink])
                replayed = Counter(previous_replay[sink])
                for u, copies in got.items():
                    assert u in line_of, f"{sink}: uuid {u} is not from the input"
                    reread = 1 if line_of[u] > life.started_at_line else 0
                    # Each copy a process delivers comes from its buffer's replay or from reading the file.
                    assert copies <= replayed[u] + reread, (
                        f"{sink}: life {life.number} delivered {u} (line {line_of[u]}) {copies} times; only "
                        f"{replayed[u]} replays and {reread} re-reads (checkpoint {life.started_at_line}) explain it")
                    if u in delivered_so_far[sink]:
                        explained[sink] += copies
                    else:
                        explained[sink] += copies - 1
                delivered_so_far[sink].update(got)
                held = delivered_so_far[sink] | set(life.replay.get(sink, []))
                missing = [u for u in uuids[:life.ended_at_line] if u not in held]
                assert not missing, (f"{sink}: {len(missing)} flows at or before checkpoint line "
                                     f"{life.ended_at_line} are neither delivered nor buffered after life "
                                     f"{life.number}, e.g. line {line_of[missing[0]]}")
            assert life.opensearch + len(life.replay["elasticsearch"]) >= life.ended_at_line, (
                f"after life {life.number} OpenSearch has {life.opensearch} flows and its buffer "
                f"{len(life.replay['elasticsearch'])}, fewer than the checkpoint's {life.ended_at_line}")
            previous_replay = {"parquet": [], "kafka": life.replay["kafka"]}
            previous_line = life.ended_at_line

        # -- the end state ---------------------------------------------------------------------
        expected = set(uuids)
        assert lives[-1].ended_at_line == FLOWS
        assert all(not v for v in lives[-1].replay.values()), "disk buffers still hold flows after the run"
        parquet_all = [u for life in lives for u in life.delivered["parquet"]]
        kafka_all = [u for life in lives for u in life.delivered["kafka"]]
        parquet_rows, parquet_distinct = parquet_duckdb_counts(out)
        assert (parquet_rows, parquet_distinct) == (len(parquet_all), FLOWS)
        assert set(parquet_all) == expected
        assert set(kafka_all) == expected
        os_ids = opensearch_ids(fault_servers.opensearch, stream)
        assert len(os_ids) == FLOWS and set(os_ids) == expected, \
            f"OpenSearch: {len(os_ids)} documents, {len(set(os_ids))} distinct, {len(expected - set(os_ids))} missing"
        vl = victorialogs_uuids(fault_servers.victorialogs, run_label, FLOWS)
        vl_uuids = [meta for meta, _ in vl]
        assert all(meta == line for meta, line in vl), "structured metadata uuid differs from the line's uuid"
        assert set(vl_uuids) == expected, f"VictoriaLogs misses {len(expected - set(vl_uuids))} flows"
        assert not list((state / "dead-letter").glob("*.jsonl")) or all(
            p.stat().st_size == 0 for p in (state / "dead-letter").glob("*.jsonl")), "flows were dead-lettered"
        dups = {"parquet": duplicates(parquet_all), "kafka": duplicates(kafka_all), "opensearch": 0,
                "victorialogs": duplicates(vl_uuids)}
        assert dups["parquet"] == explained["parquet"] and dups["kafka"] == explained["kafka"]
        print(f"  result: {len(lives)} runs ({kills} killed), {FLOWS} flows per run's input, lost 0 in every sink; "
              "duplicates " + ", ".join(f"{k} {v}" for k, v in dups.items())
              + f"; kill moments (s after start): {[life.kill_after for life in lives if life.exit_code == -9]}")
    finally:
        topic.close()
        if "proc" in locals():
            stop_process(proc)
