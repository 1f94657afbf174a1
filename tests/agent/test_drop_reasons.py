"""The kernel drop classification: consistent, documented as coded, validated in config.

That it covers every reason of the running kernel is checked in test_kernel_drops.py (run on every kernel
of the matrix).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from flowship.agent import drop_reasons as dr
from flowship.config import ConfigError, load_text

DOCS = Path(__file__).resolve().parents[2] / "docs" / "agent.md"


def test_classes_are_disjoint_and_unknown_reasons_are_drops() -> None:
    lists = [list(dr.DROP_REASONS), list(dr.BENIGN_REASONS), list(dr.NOT_REPORTED_REASONS)]
    everything = [n for names in lists for n in names]
    assert len(everything) == len(set(everything))
    assert dr.classify("QUEUE_PURGE") == dr.BENIGN and dr.classify("NETFILTER_DROP") == dr.DROP
    assert dr.classify("SOME_FUTURE_REASON") == dr.DROP and dr.classify("65538") == dr.DROP
    assert set(dr.HUBBLE_DROP_REASONS) <= set(dr.DROP_REASONS)


def _section() -> str:
    text = DOCS.read_text()
    return text[text.index("#### Which kernel drops are drops"):text.index("### L7")]


def test_docs_table_matches_the_code() -> None:
    section = _section()
    benign = dict(re.findall(r"^\| `([A-Z0-9_]+)` \| (.+) \|$", section.split("| not reported")[0], re.M))
    assert benign == dr.BENIGN_REASONS
    not_reported = re.findall(r"^\| `([A-Z0-9_]+)` \|", section.split("| not reported")[1], re.M)
    assert not_reported == list(dr.NOT_REPORTED_REASONS)
    listed = re.search(r"^Drop reasons \(verdict DROPPED\): (.+)\.$", section, re.M)
    assert listed is not None
    assert re.findall(r"`([A-Z0-9_]+)`", listed.group(1)) == sorted(dr.DROP_REASONS)


def _agent_config(export: str) -> str:
    return f"sources:\n  - type: agent\n    drop_export_benign: {export}\nsinks:\n  - type: parquet\n    path: /tmp/x\n"


def test_export_list_is_validated_with_key_paths() -> None:
    with pytest.raises(ConfigError) as err:
        load_text(_agent_config("[QUEUE_PURGE, NETFILTER_DROP, NOPE, NOT_SPECIFIED]"), "f.yaml")
    problems = err.value.problems
    assert len(problems) == 3
    assert problems[0].startswith("f.yaml: sources[0].drop_export_benign[1]: 'NETFILTER_DROP' is a real drop")
    assert problems[1].startswith("f.yaml: sources[0].drop_export_benign[2]: 'NOPE' is not a kernel drop reason")
    assert problems[2].startswith("f.yaml: sources[0].drop_export_benign[3]: 'NOT_SPECIFIED' is never reported")
    config = load_text(_agent_config("[QUEUE_PURGE, SKB_DROP_REASON_TCP_OLD_DATA]"), "f.yaml")
    assert dr.export_set(config.sources[0].config.drop_export_benign) == {"QUEUE_PURGE", "TCP_OLD_DATA"}
    assert dr.export_set(load_text(_agent_config("[ALL]"), "f.yaml").sources[0].config.drop_export_benign) == set(
        dr.BENIGN_REASONS)
