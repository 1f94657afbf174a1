"""Fuzzing configs: wrong types and unknown keys in every registered component's options.

For each source, stage and sink type in ``exporter/registry.py`` (and a
sink's ``buffer:``), the test puts a value of the wrong type on one option (a
nested option included: ``batch.max_bytes``, ``retry.concurrency``...) or an
unknown key, loads the document like ``flowship validate`` does, and
requires a ConfigError (never another exception) with a message that starts
with the file name and the key path, e.g.
``fuzzed.yaml: sinks[0].batch.max_bytes: expected a byte size...``.

Which values are wrong is decided by a small model of the config types
written here (not by the parser under test).
"""

from __future__ import annotations

import dataclasses
import keyword
import types
import typing
from typing import Any, Literal

import pytest
import yaml
from config_options import option_paths
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowship import registry
from flowship.config import ByteSize, ConfigError, Duration, Secret, load_text
from flowship.pipeline.disk_buffer import BufferConfig

FILENAME = "fuzzed.yaml"
FUZZ = settings(max_examples=400, deadline=10_000, suppress_health_check=[HealthCheck.too_slow])
CANDIDATES: list[Any] = [[1, 2], {"zz": 1}, "not-a-valid-value-zz", True, 1.5, -7, [{"a": None}], {"zz": [1]},
                         "12 parsecs", None, "", [], {}]
# A valid minimal neighbour for each kind, so the document has a source and a sink.
BASE = {"sources": [{"type": "stdin"}], "sinks": [{"type": "stdout"}]}


def accepts(tp: Any, value: Any) -> bool:
    """Would a value of this shape be a valid ``tp``? (An independent model of flowship.config's rules.)"""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(accepts(a, value) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is Literal:
        return value in typing.get_args(tp)
    if tp in (Duration, ByteSize):
        try:
            tp.parse(value)
            return True
        except (ValueError, TypeError):
            return False
    if origin is list:
        return isinstance(value, list) and all(accepts(typing.get_args(tp)[0], v) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(accepts(typing.get_args(tp)[1], v) for v in value.values())
    if dataclasses.is_dataclass(tp):
        return value is None or (isinstance(value, dict) and not value)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str or tp is Secret:  # a Secret is written as a string
        return isinstance(value, str) or (isinstance(value, (int, float)) and not isinstance(value, bool))
    raise AssertionError(f"config type {tp!r} is not modelled by this test")


def components() -> list[tuple[str, str, type]]:
    out = []
    for kind in ("sources", "stages", "sinks"):
        for name in registry.names(kind):
            out.append((kind, name, registry.config_class(kind, name)))
    assert {"file", "kafka", "hubble"} <= {n for k, n, _ in out if k == "sources"}
    assert {"parquet", "loki", "elasticsearch", "kafka"} <= {n for k, n, _ in out if k == "sinks"}
    return out


COMPONENTS = components()
TARGETS = [(kind, name, path, tp) for kind, name, cls in COMPONENTS for path, tp in option_paths(cls)]
TARGETS += [("sinks", name, f"buffer.{path}", tp) for name in registry.names("sinks")
            for path, tp in option_paths(BufferConfig)]
TARGETS = [t for t in TARGETS if any(not accepts(t[3], v) for v in CANDIDATES)]


def document(kind: str, name: str, option: str | None, value: Any) -> tuple[dict, str]:
    """A config with one ``kind`` entry of type ``name`` whose ``option`` (dotted) is set to ``value``."""
    entry: dict[str, Any] = {"type": name}
    if option is not None:
        node = entry
        parts = option.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    doc = {k: [dict(e) for e in v] for k, v in BASE.items()}
    doc[kind] = [entry]
    return doc, f"{kind}[0]"


def load(doc: dict) -> list[str]:
    """The problems ``flowship validate`` would print; any other exception fails the test."""
    try:
        load_text(yaml.safe_dump(doc), FILENAME)
    except ConfigError as exc:
        return exc.problems
    return []


def test_every_target_is_covered():
    assert len(TARGETS) > 100, len(TARGETS)  # options of every component, nested ones included


@FUZZ
@given(target=st.sampled_from(TARGETS), data=st.data())
def test_wrong_types_name_file_and_key_path(target, data, tried):
    kind, name, option, tp = target
    value = data.draw(st.sampled_from([v for v in CANDIDATES if not accepts(tp, v)]))
    tried["config: wrong-type values"] += 1
    doc, where = document(kind, name, option, value)
    problems = load(doc)
    expected = f"{FILENAME}: {where}.{option}"
    assert any(p.startswith(expected) for p in problems), (
        f"{kind} {name}: {option} = {value!r} gave {problems or 'no error'}; expected one starting with {expected}")


KEY = st.from_regex(r"[a-z][a-z0-9_]{0,15}", fullmatch=True).filter(lambda k: not keyword.iskeyword(k))


@FUZZ
@given(component=st.sampled_from(COMPONENTS), data=st.data(), key=KEY)
def test_unknown_keys_name_file_and_key_path(component, data, key, tried):
    kind, name, cls = component
    nested = [p for p, tp in option_paths(cls) if dataclasses.is_dataclass(tp) or (
        typing.get_origin(tp) in (typing.Union, types.UnionType)
        and any(dataclasses.is_dataclass(a) for a in typing.get_args(tp)))]
    prefix = data.draw(st.sampled_from(["", *(f"{p}." for p in nested)]))
    known = {p for p, _ in option_paths(cls)}
    if f"{prefix}{key}" in known or (not prefix and key in ("type", "name", "stages", "buffer")):
        return
    tried["config: unknown keys"] += 1
    doc, where = document(kind, name, f"{prefix}{key}", 1)
    problems = load(doc)
    expected = f"{FILENAME}: {where}.{prefix}{key}: unknown key"
    assert any(p.startswith(expected) for p in problems), (kind, name, prefix + key, problems)


@pytest.mark.parametrize(("kind", "name"), [(k, n) for k, n, _ in COMPONENTS])
def test_each_component_reports_a_wrong_mapping(kind, name, tried):
    tried["config: component given a non-mapping"] += 1
    doc = {k: list(v) for k, v in BASE.items()}
    doc[kind] = [["type", name]]
    problems = load(doc)
    assert any(p.startswith(f"{FILENAME}: {kind}[0]: expected a mapping") for p in problems), problems
