"""The run loop: bounded queues, fan-out to every sink, back-pressure from a slow sink, per-sink stages,
the flush at shutdown, failures named after their component, and receipts released exactly once."""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sinks"))

import devservers  # noqa: E402

from flowship.components import Context, Sink, Source  # noqa: E402
from flowship.config import load_text  # noqa: E402
from flowship.metrics import Metrics  # noqa: E402
from flowship.model.schema import empty_flows  # noqa: E402
from flowship.pipeline.envelope import Envelope, Receipt  # noqa: E402
from flowship.pipeline.runtime import (  # noqa: E402
    EXIT_DEAD_LETTERED,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_REJECTED,
    EXIT_UNDELIVERED,
    BoundedQueue,
    Pipeline,
    RunSummary,
    SinkOutcome,
)

fixture_batches = devservers.fixture_batches
all_flows = devservers.all_flows


class ListSource(Source):
    """Emits batches with one counted receipt each; with ``follow`` it then waits for the stop."""

    def __init__(self, batches: list[pa.RecordBatch], metrics: Metrics, data_dir: Path, follow: bool = False) -> None:
        super().__init__(None, Context("list", metrics, "test-node", data_dir))
        self.batches, self.follow = batches, follow
        self.receipts: list[Receipt] = []
        self.completions: Counter[int] = Counter()
        self.returned = 0  # emit calls that returned (the rest block on a full queue)
        self.emitted = threading.Event()

    def run(self, emit: Any, stop: threading.Event) -> None:
        for i, batch in enumerate(self.batches):
            receipt = Receipt(lambda r: self.completions.update([r.position]), position=i, rows=batch.num_rows)
            self.receipts.append(receipt)
            emit(batch, receipt)
            self.returned += 1
        self.emitted.set()
        if self.follow:
            stop.wait()


class RecordingSink(Sink):
    """Acknowledges at once, or holds the envelopes until ``flush`` (``hold``), or waits for a gate."""

    def __init__(self, hold: bool = False, gate: threading.Event | None = None,
                 fail_on: int | None = None) -> None:
        super().__init__(None, None)
        self.hold, self.gate, self.fail_on = hold, gate, fail_on
        self.envs: list[Envelope] = []
        self.held: list[Envelope] = []
        self.calls: list[str] = []

    def start(self) -> None:
        self.calls.append("start")

    def write(self, env: Envelope) -> None:
        if self.fail_on is not None and len(self.envs) == self.fail_on:
            raise RuntimeError("disk on fire")
        while self.gate is not None and not self.gate.wait(0.05):
            pass
        self.envs.append(env)
        if self.hold:
            self.held.append(env)
        else:
            env.ack()

    def flush(self) -> None:
        self.calls.append("flush")
        for env in self.held:
            env.ack()
        self.held = []

    def close(self) -> None:
        self.calls.append("close")

    def uuids(self) -> list[str]:
        return [u for env in self.envs for u in env.batch.column("uuid").to_pylist()]


def pipeline(tmp_path: Path, sinks: list[dict], stages: list[dict] | None = None, queue_batches: int = 8,
             shutdown_timeout: str = "30s") -> Pipeline:
    """A pipeline whose configured source reads an empty file; the test adds its own source."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    text = yaml.safe_dump({"data_dir": str(tmp_path / "state"), "queue_batches": queue_batches,
                           "shutdown_timeout": shutdown_timeout, "hubble_metrics": {"enabled": False},
                           "sources": [{"type": "file", "paths": [str(empty)], "checkpoint": False}],
                           "stages": stages or [], "sinks": sinks})
    return load_text(text, "runtime.yaml")


def build(tmp_path: Path, batches: list[pa.RecordBatch], sinks: dict[str, RecordingSink], follow: bool = False,
          **kw: Any) -> tuple[Pipeline, ListSource]:
    specs = [{"type": "stdout", "name": name, **({"stages": kw.pop(f"{name}_stages")} if f"{name}_stages" in kw
                                                 else {})} for name in sinks]
    metrics = Metrics()
    source = ListSource(batches, metrics, tmp_path / "state", follow)
    p = Pipeline(pipeline(tmp_path, specs, **kw), metrics, sources=[source])
    for branch in p.branches:
        branch.sink = sinks[branch.name]
    return p, source


def split(batch: pa.RecordBatch, parts: int) -> list[pa.RecordBatch]:
    step = -(-batch.num_rows // parts)
    return [batch.slice(i, step) for i in range(0, batch.num_rows, step)]


def run_in_thread(p: Pipeline) -> tuple[threading.Thread, dict[str, RunSummary]]:
    result: dict[str, RunSummary] = {}
    thread = threading.Thread(target=lambda: result.setdefault("summary", p.run()), daemon=True)
    thread.start()
    return thread, result


def wait_for(condition: Any, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_bounded_queue_blocks_at_capacity_and_shows_its_depth():
    metrics = Metrics()
    q = BoundedQueue("input", 3, metrics)
    assert metrics.value("flowship_queue_capacity_batches", queue="input") == 3
    for i in range(3):
        assert q.put(i)
    assert metrics.value("flowship_queue_depth_batches", queue="input") == 3
    tries = []
    assert q.put("one too many", give_up=lambda: tries.append(1) or len(tries) >= 2) is False
    assert len(tries) == 2  # waited for room, then gave up as asked
    assert [q.get(0.1) for _ in range(3)] == [0, 1, 2]
    assert q.get(0.05) is None
    assert metrics.value("flowship_queue_depth_batches", queue="input") == 0


def test_fan_out_delivers_every_batch_to_every_sink_and_releases_each_receipt_once(tmp_path, all_flows):
    sinks = {"a": RecordingSink(), "b": RecordingSink(), "c": RecordingSink(hold=True)}
    batches = split(all_flows, 12)
    p, source = build(tmp_path, batches, sinks)
    summary = p.run()
    assert summary.exit_code == EXIT_OK, summary
    uuids = all_flows.column("uuid").to_pylist()
    for name, sink in sinks.items():
        assert sink.uuids() == uuids, name  # every row, in order, to every sink
        assert sink.calls == ["start", "flush", "close"], name
        assert summary.sinks[name] == all_flows.num_rows
    assert dict(source.completions) == {i: 1 for i in range(len(batches))}  # once each, after all three sinks
    assert all(r.done and not r.failed for r in source.receipts)


def test_a_receipt_completes_only_when_the_last_sink_has_the_rows(tmp_path, fixture_batches):
    gate = threading.Event()
    sinks = {"fast": RecordingSink(), "slow": RecordingSink(gate=gate)}
    p, source = build(tmp_path, [fixture_batches["hubble-otel-basic-sample-10-flows"]], sinks)
    thread, result = run_in_thread(p)
    wait_for(lambda: len(sinks["fast"].envs) == 1, "the fast sink")
    assert not source.receipts[0].done
    gate.set()
    thread.join(30)
    assert source.completions == {0: 1}
    assert result["summary"].exit_code == EXIT_OK


def test_a_slow_sink_back_pressures_the_source_through_bounded_queues(tmp_path, all_flows):
    capacity = 2
    gate = threading.Event()
    sinks = {"fast": RecordingSink(), "slow": RecordingSink(gate=gate)}
    batches = split(all_flows, 40)
    p, source = build(tmp_path, batches, sinks, queue_batches=capacity)
    depths: list[tuple[float, float]] = []
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.is_set():
            depths.append((p.metrics.value("flowship_queue_depth_batches", queue="input"),
                           p.metrics.value("flowship_queue_depth_batches", queue="sink:slow")))
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    thread, result = run_in_thread(p)
    wait_for(lambda: p.metrics.value("flowship_queue_depth_batches", queue="sink:slow") == capacity and
             p.metrics.value("flowship_queue_depth_batches", queue="input") == capacity, "both queues to fill")
    # one batch in the slow sink's write, `capacity` in its queue, one with the router, `capacity` in the input
    assert source.returned <= 2 * capacity + 2 < len(batches)
    assert len(sinks["fast"].envs) <= 2 * capacity + 2  # the fast sink is held back too: memory stays flat
    assert p.metrics.value("flowship_queue_capacity_batches", queue="sink:slow") == capacity
    gate.set()
    thread.join(60)
    sampling.set()
    sampler.join(5)
    assert result["summary"].exit_code == EXIT_OK
    assert sinks["slow"].uuids() == sinks["fast"].uuids() == all_flows.column("uuid").to_pylist()
    assert max(d for pair in depths for d in pair) <= capacity


def test_per_sink_stages_apply_only_to_their_sink(tmp_path, all_flows):
    dropped = pc.equal(all_flows.column("verdict"), "DROPPED")
    tcp = pc.equal(all_flows.column("l4_protocol"), "TCP")
    sinks = {"everything": RecordingSink(), "tcp_only": RecordingSink()}
    p, source = build(tmp_path, split(all_flows, 5), sinks,
                      stages=[{"type": "filter", "deny": [{"verdict": ["DROPPED"]}]}],
                      tcp_only_stages=[{"type": "filter", "allow": [{"protocol": ["tcp"]}]}])
    summary = p.run()
    assert summary.exit_code == EXIT_OK, summary
    kept = all_flows.filter(pc.invert(dropped))
    assert sinks["everything"].uuids() == kept.column("uuid").to_pylist()
    assert sinks["tcp_only"].uuids() == all_flows.filter(pc.and_(pc.invert(dropped), tcp)).column("uuid").to_pylist()
    assert 0 < len(sinks["tcp_only"].uuids()) < len(sinks["everything"].uuids())
    assert {k.split("/")[0] for k in summary.dropped} == {"filter[0]", "tcp_only.filter[0]"}
    assert all(r.done for r in source.receipts)  # rows a stage removed count as delivered


def test_a_fused_chain_that_drops_every_row_still_completes_each_receipt(tmp_path, all_flows):
    sinks = {"a": RecordingSink()}
    p, source = build(tmp_path, split(all_flows, 3), sinks,
                      stages=[{"type": "healthcheck"}, {"type": "filter", "deny": [{"verdict": ["FORWARDED"]}]},
                              {"type": "filter", "allow": [{"verdict": ["FORWARDED"]}]}, {"type": "sample"}])
    summary = p.run()
    assert summary.exit_code == EXIT_OK, summary
    assert sinks["a"].envs == []
    assert source.completions == {0: 1, 1: 1, 2: 1}
    assert sum(summary.dropped.values()) == all_flows.num_rows


def test_a_stop_flushes_held_rows_before_closing(tmp_path, all_flows):
    sinks = {"held": RecordingSink(hold=True)}
    p, source = build(tmp_path, split(all_flows, 4), sinks, follow=True)
    thread, result = run_in_thread(p)
    source.emitted.wait(30)
    wait_for(lambda: len(sinks["held"].envs) == 4, "the sink to get every batch")
    assert not any(r.done for r in source.receipts)
    p.stop()
    thread.join(60)
    summary = result["summary"]
    assert sinks["held"].calls == ["start", "flush", "close"]
    assert all(r.done for r in source.receipts)
    assert (summary.exit_code, summary.stopped, summary.sinks["held"]) == (EXIT_OK, True, all_flows.num_rows)


def test_empty_batches_are_acknowledged_without_reaching_a_sink(tmp_path, fixture_batches):
    sinks = {"a": RecordingSink()}
    p, source = build(tmp_path, [empty_flows(), fixture_batches["hubble-otel-basic-sample-5-dns-flows"]], sinks)
    assert p.run().exit_code == EXIT_OK
    assert [env.batch.num_rows for env in sinks["a"].envs] == [5]
    assert source.completions == {0: 1, 1: 1}


def test_a_failing_sink_is_named_and_its_rows_stay_unacknowledged(tmp_path, all_flows):
    sinks = {"good": RecordingSink(), "broken": RecordingSink(fail_on=2)}
    batches = split(all_flows, 6)
    p, source = build(tmp_path, batches, sinks, shutdown_timeout="5s")
    summary = p.run()
    assert summary.errors == ["sink broken: disk on fire"]
    assert summary.exit_code == EXIT_FAILED
    assert p.metrics.ready() is False
    assert [r.done for r in source.receipts[:2]] == [True, True]
    assert not any(r.done for r in source.receipts[2:])  # a checkpointing source reads them again
    assert sinks["broken"].calls[-1] == "close"  # closed all the same
    assert summary.outcomes["broken"].undelivered == batches[2].num_rows  # handed to it, never settled


def test_a_failing_source_is_named(tmp_path, fixture_batches):
    class Broken(ListSource):
        def run(self, emit: Any, stop: threading.Event) -> None:
            super().run(emit, stop)
            raise ValueError("the socket went away")

    sinks = {"a": RecordingSink()}
    p, _ = build(tmp_path, [], sinks)
    broken = Broken([fixture_batches["hubble-otel-basic-sample-10-flows"]], p.metrics, tmp_path / "state")
    p = Pipeline(p.config, p.metrics, sources=[broken])
    p.branches[0].sink = sinks["a"]
    summary = p.run()
    assert summary.errors == ["source list: the socket went away"]
    assert summary.exit_code == EXIT_FAILED


@pytest.mark.parametrize(("summary", "code"), [
    (RunSummary(outcomes={"s": SinkOutcome(delivered=10)}), EXIT_OK),
    (RunSummary(outcomes={"s": SinkOutcome(delivered=10)}, rejected=2), EXIT_REJECTED),
    (RunSummary(outcomes={"s": SinkOutcome(delivered=9, dead_lettered=1)}, rejected=2), EXIT_DEAD_LETTERED),
    (RunSummary(outcomes={"s": SinkOutcome(undelivered=1, dead_lettered=1)}), EXIT_UNDELIVERED),
    (RunSummary(outcomes={"s": SinkOutcome(buffered_batches=3)}), EXIT_UNDELIVERED),  # end of input: must drain
    (RunSummary(outcomes={"s": SinkOutcome(buffered_batches=3)}, stopped=True), EXIT_OK),  # kept for next start
    (RunSummary(outcomes={"s": SinkOutcome(unfinished=True)}, stopped=True), EXIT_UNDELIVERED),
    (RunSummary(outcomes={"s": SinkOutcome()}, clean_shutdown=False), EXIT_UNDELIVERED),
    (RunSummary(outcomes={"s": SinkOutcome(undelivered=5)}, errors=["sink s: x"]), EXIT_FAILED),
])
def test_exit_code_is_the_most_serious_outcome(summary, code):
    assert summary.exit_code == code
