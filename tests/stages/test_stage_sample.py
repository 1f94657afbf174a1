"""The sample stage: whole connections, deterministic, re-weighted, with always-keep rules."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from stage_helpers import columns_batch, dropped, make_flows, new_context

from flowship.config import ConfigError, load_text
from flowship.model.ids import connection_hashes
from flowship.stages.sample import SampleConfig, SampleStage, sample_keep


def connection_rows(n_conns: int, rng: np.random.Generator, flows_per_conn: tuple[int, int] = (1, 12)) -> dict:
    """Columns of flows from ``n_conns`` TCP/UDP connections, both directions mixed, some L7."""
    src_ip, dst_ip, sport, dport, proto, verdict, code, rcode = [], [], [], [], [], [], [], []
    for c in range(n_conns):
        a = f"10.{(c >> 16) & 255}.{(c >> 8) & 255}.{c & 255}"
        b = f"10.200.{rng.integers(0, 4)}.{rng.integers(1, 250)}"
        p = "TCP" if rng.random() < 0.8 else "UDP"
        port_a, port_b = int(rng.integers(32768, 60999)), int(rng.choice([80, 443, 53, 8080, 5432]))
        for _ in range(int(rng.integers(*flows_per_conn))):
            forward = rng.random() < 0.5
            src_ip.append(a if forward else b)
            dst_ip.append(b if forward else a)
            sport.append(port_a if forward else port_b)
            dport.append(port_b if forward else port_a)
            proto.append(p)
            verdict.append("FORWARDED")
            code.append(None)
            rcode.append(None)
    n = len(src_ip)
    return dict(n=n, ip_src=src_ip, ip_dst=dst_ip, src_port=sport, dst_port=dport, l4_protocol=proto,
                verdict=verdict, http_code=code, dns_rcode=rcode)


def sampled(batch: pa.RecordBatch, rate: int, **cfg) -> tuple[pa.RecordBatch, object]:
    ctx = new_context("sample")
    return SampleStage(SampleConfig(rate=rate, always_keep=cfg.pop("always_keep", []), **cfg), ctx).transform(batch), ctx


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31), rate=st.integers(2, 20), n_conns=st.integers(1, 300),
       sampler_seed=st.integers(0, 2**32 - 1))
def test_whole_connections_kept_or_dropped(seed, rate, n_conns, sampler_seed):
    rng = np.random.default_rng(seed)
    cols = connection_rows(n_conns, rng)
    n = cols.pop("n")
    batch = columns_batch(n, **cols)
    out, ctx = sampled(batch, rate, seed=sampler_seed)
    conns_in = connection_hashes(batch)
    conns_out = set(connection_hashes(out).tolist()) if out.num_rows else set()
    for h in set(conns_in.tolist()):
        rows_in = int((conns_in == h).sum())
        rows_out = int((connection_hashes(out) == h).sum()) if out.num_rows else 0
        assert rows_out in (0, rows_in)
        assert (h in conns_out) == (rows_out > 0)
    assert set(out.column("sample_rate").to_pylist()) <= {rate}
    assert dropped(ctx, "sampled") == n - out.num_rows
    # the same flows split into other batches, in another stage instance: the same decision
    half = n // 2
    again = [sampled(batch.slice(0, half), rate, seed=sampler_seed)[0],
             sampled(batch.slice(half), rate, seed=sampler_seed)[0]]
    assert sum(b.num_rows for b in again) == out.num_rows
    assert pa.Table.from_batches(again).column("uuid").to_pylist() == out.column("uuid").to_pylist()


def test_reweighted_count_estimates_the_input():
    rng = np.random.default_rng(20240611)
    cols = connection_rows(20000, rng)
    n = cols.pop("n")
    batch = columns_batch(n, **cols)
    rate = 10
    out, _ = sampled(batch, rate)
    estimate = int(np.asarray(out.column("sample_rate")).sum())
    # standard deviation of the estimate: rate * sqrt(p (1-p) sum(k_i^2)) with k_i flows per connection
    _, k = np.unique(connection_hashes(batch), return_counts=True)
    p = 1 / rate
    sigma = rate * np.sqrt(p * (1 - p) * float((k.astype(np.float64) ** 2).sum()))
    assert abs(estimate - n) < 4 * sigma, (estimate, n, sigma)
    kept_conns = len(np.unique(connection_hashes(out)))
    assert abs(kept_conns - len(k) / rate) < 4 * np.sqrt(len(k) * p * (1 - p))


def test_chained_samplers_compose():
    rng = np.random.default_rng(7)
    cols = connection_rows(30000, rng, flows_per_conn=(1, 3))
    n = cols.pop("n")
    batch = columns_batch(n, **cols)
    first, _ = sampled(batch, 10)
    second, _ = sampled(first, 10)
    assert set(second.column("sample_rate").to_pylist()) == {100}
    conns = len(np.unique(connection_hashes(batch)))
    kept = len(np.unique(connection_hashes(second)))
    p = 1 / 100
    assert abs(kept - conns * p) < 4 * np.sqrt(conns * p * (1 - p)), (kept, conns)
    assert kept > 0


def test_default_always_keep(ctx):
    conn = {"ip_src": "10.0.0.1", "ip_dst": "10.0.0.2", "l4_protocol": "UDP", "src_port": 5000, "dst_port": 53}
    rows = [
        {**conn, "verdict": "FORWARDED", "dns_query": "a.example.", "dns_rcode": 0},
        {**conn, "verdict": "FORWARDED", "dns_query": "b.example.", "dns_rcode": 3},
        {**conn, "verdict": "DROPPED", "drop_reason": "POLICY_DENIED"},
        {**conn, "verdict": "ERROR"},
        {**conn, "verdict": "FORWARDED", "http_code": 503, "l4_protocol": "TCP", "dst_port": 80},
        {**conn, "verdict": "FORWARDED", "http_code": 404, "l4_protocol": "TCP", "dst_port": 80},
    ]
    batch = make_flows(rows)
    hashes = connection_hashes(batch)
    # find a sampler seed that drops both connections, so only always-keep flows survive
    seed = next(s for s in range(1000) if not sample_keep(hashes, np.ones(6, dtype=np.int64), 1000, s).any())
    stage = SampleStage(SampleConfig(rate=1000, seed=seed), ctx)
    out = stage.transform(batch)
    assert out.column("dns_rcode").to_pylist() == [3, None, None, None]
    assert out.column("verdict").to_pylist() == ["FORWARDED", "DROPPED", "ERROR", "FORWARDED"]
    assert out.column("http_code").to_pylist() == [None, None, None, 503]
    assert out.column("sample_rate").to_pylist() == [1, 1, 1, 1]
    assert dropped(ctx, "sampled") == 2
    assert ctx.metrics.value("flowship_sample_always_kept_total") == 4


def test_rate_one_and_incoming_rates():
    batch = make_flows([{"ip_src": "10.0.0.1", "ip_dst": "10.0.0.2", "l4_protocol": "TCP", "src_port": p,
                         "dst_port": 80, "sample_rate": 5} for p in range(1000, 1400)])
    out, _ = sampled(batch, 1)
    assert out.num_rows == 400 and set(out.column("sample_rate").to_pylist()) == {5}
    out, _ = sampled(batch, 4)
    assert set(out.column("sample_rate").to_pylist()) == {20}
    assert 60 < out.num_rows < 140


def test_sample_rate_saturates():
    batch = make_flows([{"ip_src": "10.0.0.1", "ip_dst": "10.0.0.2", "l4_protocol": "TCP", "src_port": p,
                         "dst_port": 80, "sample_rate": 2**31} for p in range(1000, 1400)])
    out, _ = sampled(batch, 4)
    assert out.num_rows > 0
    assert set(out.column("sample_rate").to_pylist()) == {2**32 - 1}


def test_config_validation():
    with pytest.raises(ConfigError) as err:
        load_text("stages:\n  - type: sample\n    rate: 0\n    always_keep:\n      - {verdict: [DROP]}\n", "f.yaml")
    assert "f.yaml: stages[0].rate: expected an integer 1..4294967295, got 0" in err.value.problems
    assert any(p.startswith("f.yaml: stages[0].always_keep[0].verdict[0]: unknown verdict 'DROP'")
               for p in err.value.problems)
    cfg = load_text("sources: [{type: stdin}]\nsinks: [{type: stdout}]\nstages:\n  - type: sample\n    rate: 50\n",
                    "f.yaml").stages[0].config
    assert cfg.rate == 50 and cfg.always_keep[0] == {"verdict": ["DROPPED", "ERROR"]}
