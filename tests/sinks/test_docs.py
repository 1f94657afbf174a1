"""docs/sinks.md documents every option of the network sinks and the Kafka source.

The classes come from the registry: every sink or source that talks to a server (a ``url:`` or
``brokers:`` option), with the sections nested in its config (``batch:``, ``retry:``, ``create_topic:``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path

import pytest

from flowship import registry

DOC = (Path(__file__).resolve().parents[2] / "docs" / "sinks.md").read_text()


def with_nested(cls: type) -> list[type]:
    """``cls`` and the config dataclasses nested in it."""
    out = [cls]
    for tp in typing.get_type_hints(cls).values():
        union = typing.get_origin(tp) in (typing.Union, types.UnionType)
        for inner in (typing.get_args(tp) if union else (tp,)):
            if dataclasses.is_dataclass(inner) and inner not in out:
                out += [c for c in with_nested(inner) if c not in out]
    return out


def networked() -> list[type]:
    out: list[type] = []
    for kind in ("sinks", "sources"):
        for name in registry.names(kind):
            cls = registry.config_class(kind, name)
            if {f.name for f in dataclasses.fields(cls)} & {"url", "brokers"}:
                out += [c for c in with_nested(cls) if c not in out]
    return out


CLASSES = networked()


def test_the_network_components_are_found():
    names = {c.__name__ for c in CLASSES}
    assert {"LokiSinkConfig", "ElasticsearchSinkConfig", "KafkaSinkConfig", "CreateTopicConfig",
            "KafkaSourceConfig", "RetryConfig"} <= names, names


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_option_is_documented(cls):
    missing = [f.name for f in dataclasses.fields(cls) if f"`{f.name}`" not in DOC]
    assert missing == [], f"{cls.__name__}: options missing from docs/sinks.md"
