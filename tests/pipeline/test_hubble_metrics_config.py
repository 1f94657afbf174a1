"""``hubble_metrics:``: the hubble_* series are a section of the config, on by default."""

from __future__ import annotations

from flowship.config import ConfigError, load_text
from flowship.metrics import Metrics
from flowship.pipeline.runtime import Pipeline


def _config(tmp_path, lines: list[bytes], extra: str = "") -> str:
    flows = tmp_path / "flows.jsonl"
    flows.write_bytes(b"\n".join(lines) + b"\n")
    return (f"data_dir: {tmp_path}/state\nsources: [{{type: file, paths: [{flows}]}}]\n"
            f"sinks:\n  - type: file\n    path: {tmp_path}/out.jsonl\n{extra}")


def test_hubble_metrics_on_by_default_and_off_when_disabled(tmp_path, fixture_lines):
    lines = fixture_lines[:200]
    default = load_text(_config(tmp_path, lines), "a.yaml")
    assert default.hubble_metrics.enabled
    metrics = Metrics()
    assert Pipeline(default, metrics).run().exit_code == 0
    assert metrics.value("hubble_flows_processed_total") == len(lines)

    off = load_text(_config(tmp_path, lines, "hubble_metrics: {enabled: false}\n"), "b.yaml")
    metrics = Metrics()
    assert Pipeline(off, metrics).run().exit_code == 0
    assert "hubble_flows_processed_total" not in metrics.exposition().decode()


def test_hubble_metrics_keys_are_checked(tmp_path, fixture_lines):
    text = _config(tmp_path, fixture_lines[:1], "hubble_metrics: {enabled: 3, rate: 1}\n")
    try:
        load_text(text, "c.yaml")
    except ConfigError as exc:
        assert any(p.startswith("c.yaml: hubble_metrics.enabled: expected true or false") for p in exc.problems)
        assert any(p.startswith("c.yaml: hubble_metrics.rate: unknown key") for p in exc.problems)
    else:
        raise AssertionError("invalid hubble_metrics accepted")


def test_hubble_metrics_handlers_are_configurable(tmp_path, fixture_lines):
    """``metrics:`` picks Cilium's handlers and their context options; the rest write nothing."""
    lines = fixture_lines[:200]
    extra = "hubble_metrics:\n  metrics: ['drop:sourceContext=pod', flow]\n"
    config = load_text(_config(tmp_path, lines, extra), "d.yaml")
    assert config.hubble_metrics.metrics == ["drop:sourceContext=pod", "flow"]
    metrics = Metrics()
    assert Pipeline(config, metrics).run().exit_code == 0
    text = metrics.exposition().decode()
    assert metrics.value("hubble_flows_processed_total") == len(lines)
    assert "hubble_tcp_flags_total" not in text and "hubble_port_distribution_total" not in text
    assert "_created" not in text
    default = load_text(_config(tmp_path, lines), "e.yaml")
    assert default.hubble_metrics.metrics == ["dns", "drop", "tcp", "flow", "port-distribution", "icmp", "httpV2"]
