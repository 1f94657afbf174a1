"""Mask stages run by the runtime, fused: the same rows and the same counters as one stage after another."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from stage_helpers import make_flows

from flowship.components import Context
from flowship.config import parse
from flowship.metrics import Metrics
from flowship.pipeline.envelope import Envelope, Receipt
from flowship.pipeline.runtime import _close_stages, _run_stages
from flowship.registry import component_class, config_class
from flowship.stages import columns
from flowship.stages.columns import MaskStage, select_through

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from flowgen import generate_batch  # noqa: E402

HC = ("healthcheck", {"prometheus": True})
NO_KUBE_SYSTEM = ("filter", {"deny": [{"source_pod": ["kube-system/"]}]})
NO_PROBE_PATHS = ("filter", {"deny": [{"http_path": ["/healthz", "/readyz"]}]})
SAMPLE = ("sample", {"rate": 10})
SAMPLE_3 = ("sample", {"rate": 3, "seed": 7})
CHAINS = {
    "healthcheck-filter-sample": [HC, NO_KUBE_SYSTEM, SAMPLE],
    # the allow list rejects rows the healthcheck removed already: they must not count twice
    "healthcheck-allow-sample": [HC, ("filter", {"allow": [{"verdict": ["FORWARDED"]}, {"protocol": ["dns"]}]}),
                                 SAMPLE],
    # replies gone, the requests that remain still take their connections: pairing sees only alive rows
    "no-replies-healthcheck-sample": [("filter", {"deny": [{"reply": [True]}]}), HC, SAMPLE],
    # the filter removes probe requests first, so the healthcheck must not pair their connections
    "filter-healthcheck": [NO_PROBE_PATHS, HC],
    # few rows survive the sampler: they are copied before the healthcheck, then the rest fuses
    "sample-healthcheck-filter": [SAMPLE, HC, NO_KUBE_SYSTEM],
    # the second sampler reads the sample_rate the first one wrote
    "sample-sample-filter": [SAMPLE_3, SAMPLE_3, NO_KUBE_SYSTEM],
    "healthcheck-redact-filter-sample": [HC, ("redact", {"fields": ["ip"], "mode": "hash", "key_env": "FUSED_KEY"}),
                                         NO_KUBE_SYSTEM, SAMPLE],
    "healthcheck-sample-aggregate-filter": [HC, SAMPLE, ("aggregate", {"window": "60s"}), NO_KUBE_SYSTEM],
}
COUNTERS = ("flowship_stage_dropped_total", "flowship_sample_always_kept_total")


def build(spec: list[tuple[str, dict]]) -> tuple[list, Metrics]:
    metrics = Metrics()
    stages = []
    for i, (type_name, body) in enumerate(spec):
        config = parse(config_class("stages", type_name), body, "<test>", f"stages[{i}]")
        ctx = Context(name=f"{type_name}[{i}]", metrics=metrics, node_name="test-node", data_dir=Path("/tmp"))
        stages.append(component_class("stages", type_name)(config, ctx))
    return stages, metrics


def one_by_one(stages: list, envs: list[Envelope]) -> list[Envelope]:
    for stage in stages:
        envs = [out for env in envs for out in stage.process(env)]
    return envs


def counters(metrics: Metrics) -> dict[tuple, float]:
    out = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.name in COUNTERS:
                out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def outputs(spec: list[tuple[str, dict]], batches: list[pa.RecordBatch], fused: bool) -> tuple[list, dict]:
    """(kind, table) of every envelope out, closing the stages at the end, and the counters."""
    stages, metrics = build(spec)
    run = _run_stages if fused else one_by_one
    envs = [out for batch in batches for out in run(stages, [Envelope(batch, [Receipt()])])]
    if fused:
        envs += _close_stages(stages)
    else:
        for i, stage in enumerate(stages):
            envs += one_by_one(stages[i + 1:], stage.close())
    return [(env.kind, pa.Table.from_batches([env.batch])) for env in envs], counters(metrics)


def assert_same(spec: list[tuple[str, dict]], batches: list[pa.RecordBatch]) -> tuple[list, dict]:
    expected, expected_counters = outputs(spec, batches, fused=False)
    got, got_counters = outputs(spec, batches, fused=True)
    assert [kind for kind, _ in got] == [kind for kind, _ in expected]
    for (_, g), (_, e) in zip(got, expected, strict=True):
        assert g.schema == e.schema
        assert g.equals(e), "fused rows differ from one stage after another"
    assert got_counters == expected_counters
    return got, got_counters


@pytest.fixture(autouse=True)
def _redact_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FUSED_KEY", "fused-test-key")


@pytest.fixture(params=["compacting", "never-compacting"])
def compaction(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both ways a fused run may go: survivors copied early when few are left, or always at the end."""
    if request.param == "never-compacting":
        monkeypatch.setattr(columns, "COMPACT_BELOW", 0.0)


@pytest.fixture(scope="module")
def generated() -> list[pa.RecordBatch]:
    batch = generate_batch(40_000, seed=3, pods=300, duration_s=300)
    return pa.Table.from_batches([batch]).to_batches(max_chunksize=7_000)


@pytest.mark.parametrize("chain", sorted(CHAINS))
def test_fused_chain_matches_stages_one_by_one_on_generated_flows(chain, generated, compaction):
    got, got_counters = assert_same(CHAINS[chain], generated)
    assert sum(t.num_rows for _, t in got) > 0
    assert any(v for (name, _), v in got_counters.items() if name == "flowship_stage_dropped_total")


@pytest.mark.parametrize("chain", sorted(CHAINS))
def test_fused_chain_matches_stages_one_by_one_on_fixture_flows(chain, all_fixture_flows, compaction):
    step = -(-all_fixture_flows.num_rows // 4)
    assert_same(CHAINS[chain], [all_fixture_flows.slice(i, step) for i in range(0, all_fixture_flows.num_rows, step)])


def test_every_reason_of_the_healthcheck_counts_the_same_fused(generated, compaction):
    spec = [("sample", {"rate": 2}), HC, NO_KUBE_SYSTEM]
    _, got = assert_same(spec, generated)
    reasons = {dict(labels)["reason"] for (name, labels), v in got.items()
               if name == "flowship_stage_dropped_total" and dict(labels)["stage"] == "healthcheck[1]" and v}
    assert {"kube_probe", "health_path", "prometheus", "same_connection", "node_health"} <= reasons


def test_the_filter_decides_before_the_healthcheck_pairs(generated):
    """A probe request the filter removed does not take its connection's TCP flows with it."""
    _, paired_after_filter = assert_same([NO_PROBE_PATHS, HC], generated)
    _, paired_alone = outputs([HC], generated, fused=True)
    key = ("flowship_stage_dropped_total", (("reason", "same_connection"), ("stage", "healthcheck[1]")))
    alone = ("flowship_stage_dropped_total", (("reason", "same_connection"), ("stage", "healthcheck[0]")))
    assert paired_after_filter.get(key, 0) < paired_alone[alone]


def test_a_batch_whose_rows_all_drop_is_empty_and_later_stages_count_nothing(generated):
    spec = [("filter", {"allow": [{"verdict": ["TRACED"]}]}), HC, SAMPLE]
    got, got_counters = assert_same(spec, generated[:2])
    assert [t.num_rows for _, t in got] == [0, 0]
    dropped = {dict(labels)["stage"]: v for (name, labels), v in got_counters.items()
               if name == "flowship_stage_dropped_total" and v}
    assert dropped == {"filter[0]": generated[0].num_rows + generated[1].num_rows}


def test_an_envelope_whose_rows_all_drop_keeps_its_receipt_until_acknowledged():
    stages, _ = build([("filter", {"deny": [{"verdict": ["FORWARDED"]}]}), SAMPLE])
    done = []
    receipt = Receipt(lambda r: done.append(r.position), position=9)
    [env] = _run_stages(stages, [Envelope(make_flows([{"verdict": "FORWARDED"}] * 3), [receipt])])
    assert env.batch.num_rows == 0 and env.receipts == [receipt] and not done
    env.ack()
    assert done == [9]


def test_the_survivors_are_copied_once_by_a_fused_run(generated, monkeypatch):
    copies = []
    real = columns.filter_rows

    def counting(batch: pa.RecordBatch, keep: np.ndarray) -> pa.RecordBatch:
        copies.append(int(np.count_nonzero(keep)))
        return real(batch, keep)

    monkeypatch.setattr(columns, "filter_rows", counting)
    stages, _ = build(CHAINS["healthcheck-filter-sample"])
    assert all(isinstance(s, MaskStage) for s in stages)
    out = select_through(stages, generated[0])
    assert copies == [out.num_rows]


def test_aggregate_rows_pass_mask_stages_untouched(generated):
    stages, _ = build([HC, SAMPLE])
    aggregates = Envelope(generated[0], [Receipt()], kind="aggregates")
    [env] = _run_stages(stages, [aggregates])
    assert env is aggregates


def test_fused_output_keeps_the_schema_of_its_input(generated):
    stages, _ = build(CHAINS["healthcheck-filter-sample"])
    [env] = _run_stages(stages, [Envelope(generated[1], [Receipt()])])
    assert env.batch.schema == generated[1].schema


def test_the_stages_of_a_fused_run_hash_the_connections_of_a_batch_once(generated, monkeypatch):
    import flowship.model.ids as ids

    hashed = []
    real = ids.connection_hashes

    def counting(batch: pa.RecordBatch) -> np.ndarray:
        hashed.append(batch.num_rows)
        return real(batch)

    monkeypatch.setattr(ids, "connection_hashes", counting)
    stages, _ = build(CHAINS["healthcheck-filter-sample"])
    select_through(stages, generated[0])
    assert hashed == [generated[0].num_rows]
