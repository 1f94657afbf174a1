"""Typed configuration: YAML in, validated dataclasses out.

Each component declares its options as a dataclass next to its code; this
module turns YAML into those dataclasses and rejects anything else with an
error naming the file, the key path and what was expected, e.g.::

    flowship.yaml: sinks[1].batch.max_bytes: expected a byte size like "4MiB", got "lots"

Supported field types: str, int, float, bool, Duration, ByteSize, Secret (a
credential: written like a string, redacted when printed), Literal[...],
list[T], dict[str, T], T | None, nested dataclasses and ``Any`` (passed through).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from flowship.hubble_metrics_config import HubbleMetricsConfig
from flowship.secrets import Secret, resolve
from flowship.units import ByteSize, Duration

__all__ = ["ByteSize", "ConfigError", "Duration", "PipelineConfig", "Secret", "load_file", "load_text", "parse"]


class ConfigError(Exception):
    """One or more problems in a config file; ``str()`` lists every one."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


def secret_value(value: str | Secret | None) -> str | None:
    """Resolve ``env:NAME`` and ``file:/path`` references for credentials (see :mod:`flowship.secrets`).

    Secrets stay out of config files that get committed; the resolved value is
    never logged (components log the reference, not the value).
    """
    if value is None:
        return None
    return value.reveal() if isinstance(value, Secret) else resolve(value)


def positive_ints(obj: Any, *names: str) -> list[str]:
    """``<name>: expected an integer >= 1, got N`` for each named integer field below 1 (for ``validate``).

    A value of the wrong type is left alone: the parser has reported it already.
    """
    out = []
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, int) and value < 1:
            out.append(f"{name}: expected an integer >= 1, got {value}")
    return out


def secret_problems(config: PipelineConfig) -> list[str]:
    """``env:``/``file:`` references that would not resolve now, by key path (values never shown)."""
    problems: list[str] = []

    def walk(obj: Any, path: str) -> None:
        if isinstance(obj, Secret):
            if problem := obj.problem():
                problems.append(f"{config.filename}: {path}: {problem}")
        elif isinstance(obj, str):
            if obj.startswith("env:") and obj[4:] not in os.environ:
                problems.append(f"{config.filename}: {path}: environment variable {obj[4:]} is not set")
            elif obj.startswith("file:") and not os.access(obj[5:], os.R_OK):
                problems.append(f"{config.filename}: {path}: file {obj[5:]} is missing or unreadable")
        elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            for f in dataclasses.fields(obj):
                walk(getattr(obj, f.name), f"{path}.{f.name}")
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{path}.{k}")
        elif isinstance(obj, list):
            for i, v in enumerate(obj):
                walk(v, f"{path}[{i}]")

    for kind, specs in (("sources", config.sources), ("stages", config.stages), ("sinks", config.sinks)):
        for i, spec in enumerate(specs):
            walk(spec.config, f"{kind}[{i}]")
            for j, stage in enumerate(spec.stages):
                walk(stage.config, f"{kind}[{i}].stages[{j}]")
    return problems


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp in (Duration, ByteSize):
        return tp.expected
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"a mapping of {_describe(typing.get_args(tp)[1])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp) if a is not type(None))
    return {str: "a string", Secret: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(tp, str(tp))


def _fmt_path(path: str) -> str:
    return path or "<top level>"


class _Parser:
    def __init__(self, filename: str) -> None:
        self.filename = filename
        self.problems: list[str] = []

    def fail(self, path: str, message: str) -> None:
        self.problems.append(f"{self.filename}: {_fmt_path(path)}: {message}")

    def convert(self, tp: Any, value: Any, path: str) -> Any:
        origin = typing.get_origin(tp)
        if tp is Any:
            return value
        if origin in (typing.Union, types.UnionType):
            args = typing.get_args(tp)
            if value is None and type(None) in args:
                return None
            candidates = [a for a in args if a is not type(None)]
            if len(candidates) == 1:
                return self.convert(candidates[0], value, path)
            for candidate in candidates:
                sub = _Parser(self.filename)
                result = sub.convert(candidate, value, path)
                if not sub.problems:
                    return result
            self.fail(path, f"expected {_describe(tp)}, got {value!r}")
            return None
        if origin is Literal:
            allowed = typing.get_args(tp)
            if value not in allowed:
                self.fail(path, f"expected one of {', '.join(repr(a) for a in allowed)}, got {value!r}")
            return value
        if tp in (Duration, ByteSize):
            try:
                return tp.parse(value)
            except (ValueError, TypeError):
                self.fail(path, f"expected {tp.expected}, got {value!r}")
                return None
        if origin is list:
            (item,) = typing.get_args(tp)
            if not isinstance(value, list):
                self.fail(path, f"expected a list, got {type(value).__name__} {value!r}")
                return []
            return [self.convert(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
        if origin is dict:
            _, item = typing.get_args(tp)
            if not isinstance(value, dict):
                self.fail(path, f"expected a mapping, got {type(value).__name__} {value!r}")
                return {}
            return {str(k): self.convert(item, v, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
        if dataclasses.is_dataclass(tp):
            return self.dataclass(tp, value, path)
        if tp is bool:
            if not isinstance(value, bool):
                self.fail(path, f"expected true or false, got {value!r}")
            return value
        if tp is int:
            if isinstance(value, bool) or not isinstance(value, int):
                self.fail(path, f"expected an integer, got {value!r}")
            return value
        if tp is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                self.fail(path, f"expected a number, got {value!r}")
                return value
            return float(value)
        if tp is str or tp is Secret:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                value = str(value)  # a port or a number-like name written without quotes
            elif not isinstance(value, str):
                self.fail(path, f"expected a string, got {type(value).__name__} {value!r}")
                return value
            return Secret(value) if tp is Secret else value
        raise TypeError(f"config type {tp!r} is not supported")

    def dataclass(self, cls: type, value: Any, path: str) -> Any:
        if value is None:
            value = {}
        if not isinstance(value, dict):
            self.fail(path, f"expected a mapping, got {type(value).__name__} {value!r}")
            return None
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        kwargs: dict[str, Any] = {}
        problems_before = len(self.problems)
        for key, raw in value.items():
            sub = f"{path}.{key}" if path else str(key)
            if key not in fields:
                known = ", ".join(sorted(fields))
                self.fail(sub, f"unknown key (known keys here: {known})")
                continue
            kwargs[key] = self.convert(hints[key], raw, sub)
        for name, f in fields.items():
            if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                self.fail(f"{path}.{name}" if path else name,
                          f"required key is missing (expected {_describe(hints[name])})")
        if any(p.startswith(f"{self.filename}: {_fmt_path(path)}") for p in self.problems):
            # Construct anyway when possible so that later checks can run.
            pass
        try:
            obj = cls(**kwargs)
        except TypeError:
            return None
        check = getattr(obj, "validate", None)
        if callable(check):
            try:
                messages = check() or []
            except (TypeError, AttributeError, ValueError):
                if len(self.problems) == problems_before:
                    raise
                messages = []  # a value of the wrong type, already reported, tripped the semantic checks
            for message in messages:
                key, _, text = message.partition(": ") if ": " in message else ("", "", message)
                where = f"{path}.{key}" if path and key else (key or path)
                self.fail(where, text)
        return obj


def parse(cls: type, data: Any, filename: str, path: str = "") -> Any:
    """Build ``cls`` from plain data or raise ConfigError listing every problem."""
    parser = _Parser(filename)
    obj = parser.dataclass(cls, data, path)
    if parser.problems:
        raise ConfigError(parser.problems)
    return obj


# -------------------------------------------------------------------------------------------
# The top-level document
# -------------------------------------------------------------------------------------------

@dataclass
class ComponentSpec:
    """One entry of ``sources:``, ``stages:`` or ``sinks:``, resolved through the registry."""

    type: str
    name: str
    config: Any
    stages: list[ComponentSpec] = field(default_factory=list)
    buffer: Any = None  # sinks: flowship.pipeline.disk_buffer.BufferConfig


@dataclass
class PipelineConfig:
    node_name: str
    sources: list[ComponentSpec]
    stages: list[ComponentSpec]
    sinks: list[ComponentSpec]
    metrics_address: str | None
    data_dir: Path
    shutdown_timeout: float
    queue_batches: int
    filename: str
    hubble_metrics: HubbleMetricsConfig = field(default_factory=HubbleMetricsConfig)


@dataclass
class _TopLevel:
    node_name: str | None = None
    sources: list[dict[str, Any]] = field(default_factory=list)
    stages: list[dict[str, Any]] = field(default_factory=list)
    sinks: list[dict[str, Any]] = field(default_factory=list)
    metrics: str | None = None  # "host:port" for /metrics, /healthz, /readyz
    data_dir: str = "./.flowship"  # checkpoints and other state
    shutdown_timeout: Duration = Duration(30.0)
    queue_batches: int = 8  # bounded queue length between pipeline steps
    hubble_metrics: HubbleMetricsConfig = field(default_factory=HubbleMetricsConfig)


def _component(kind: str, raw: Any, path: str, filename: str, parser: _Parser,
               allow_stages: bool) -> ComponentSpec | None:
    from flowship import registry

    if not isinstance(raw, dict):
        parser.fail(path, f"expected a mapping with a 'type' key, got {raw!r}")
        return None
    type_name = raw.get("type")
    known = registry.names(kind)
    if type_name is None:
        parser.fail(f"{path}.type", f"required key is missing (one of: {', '.join(known)})")
        return None
    if type_name not in known:
        parser.fail(f"{path}.type", f"unknown {kind[:-1]} type {type_name!r} (one of: {', '.join(known)})")
        return None
    body = {k: v for k, v in raw.items() if k not in ("type", "name", "stages", "buffer")}
    name = str(raw.get("name") or type_name)
    config_cls = registry.config_class(kind, type_name)
    sub = _Parser(filename)
    config = sub.dataclass(config_cls, body, path)
    parser.problems.extend(sub.problems)
    stages: list[ComponentSpec] = []
    if "stages" in raw:
        if not allow_stages:
            parser.fail(f"{path}.stages", "only sinks have their own stages")
        elif not isinstance(raw["stages"], list):
            parser.fail(f"{path}.stages", f"expected a list, got {raw['stages']!r}")
        else:
            for i, item in enumerate(raw["stages"]):
                spec = _component("stages", item, f"{path}.stages[{i}]", filename, parser, False)
                if spec:
                    stages.append(spec)
    buffer = None
    if "buffer" in raw:
        if not allow_stages:
            parser.fail(f"{path}.buffer", "only sinks have a buffer")
        else:
            from flowship.pipeline.disk_buffer import BufferConfig

            sub = _Parser(filename)
            buffer = sub.dataclass(BufferConfig, raw["buffer"], f"{path}.buffer")
            parser.problems.extend(sub.problems)
    return ComponentSpec(type_name, name, config, stages, buffer)


def _node_name(value: str | None, parser: _Parser) -> str:
    """``node_name``: as written, ``env:NAME`` / ``file:/path`` resolved now, or this host's name.

    A DaemonSet passes the Kubernetes node name in the environment (``NODE_NAME`` from
    ``spec.nodeName``); it can differ from the hostname, and enrichment tells this node's pods and
    addresses from other nodes' by it. A reference that does not resolve is a config error, not a
    silent fallback to the hostname.
    """
    if not value:
        return socket.gethostname()
    try:
        resolved = secret_value(value)
    except (ValueError, OSError) as exc:
        parser.fail("node_name", f"{value!r}: {getattr(exc, 'strerror', None) or exc}")
        return value
    if not resolved:
        parser.fail("node_name", f"{value!r} resolves to an empty string")
    return resolved or value


def _check_buffer_paths(sinks: list[ComponentSpec], data_dir: Path, parser: _Parser) -> None:
    """Two disk buffers in one directory would read each other's batches: each sink needs its own."""
    owners: list[tuple[Path, int, str]] = []
    for i, spec in enumerate(sinks):
        buffer = spec.buffer
        if buffer is None or getattr(buffer, "type", None) != "disk":
            continue
        raw = Path(buffer.path) if buffer.path else data_dir / "buffers" / spec.name
        path = raw.expanduser().resolve()
        for other, j, other_name in owners:
            if path == other or other in path.parents or path in other.parents:
                how = "is the same directory as" if path == other else \
                    "is inside" if other in path.parents else "contains"
                parser.fail(f"sinks[{i}].buffer.path", f"{str(raw)!r} {how} the disk buffer of sink {other_name!r} "
                            f"(sinks[{j}]): give each sink its own buffer path")
                break
        owners.append((path, i, spec.name))


def load_text(text: str, filename: str, *, sources_optional: bool = False) -> PipelineConfig:
    """Parse and validate a whole config document.

    ``sources_optional``: the config may leave out ``sources:`` (``flowship agent`` adds its own).
    """
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "?"
        raise ConfigError([f"{filename}: {where}: not valid YAML: {getattr(exc, 'problem', exc)}"]) from None
    if data is None:
        data = {}
    parser = _Parser(filename)
    top = parser.dataclass(_TopLevel, data, "")
    if top is None:
        raise ConfigError(parser.problems)
    sources = [s for i, raw in enumerate(top.sources)
               if (s := _component("sources", raw, f"sources[{i}]", filename, parser, False))]
    stages = [s for i, raw in enumerate(top.stages)
              if (s := _component("stages", raw, f"stages[{i}]", filename, parser, False))]
    sinks = [s for i, raw in enumerate(top.sinks)
             if (s := _component("sinks", raw, f"sinks[{i}]", filename, parser, True))]
    # Without a sink every flow would be read and thrown away, with exit 0. Without a source nothing
    # runs, except under ``flowship agent``, which adds its capture source (``sources_optional``).
    if not top.sources and not ("sources" not in data and sources_optional):
        parser.fail("sources", "at least one source is needed" if "sources" in data
                    else "required key is missing: a config needs at least one source")
    if not top.sinks:
        parser.fail("sinks", "at least one sink is needed" if "sinks" in data
                    else "required key is missing: a config needs at least one sink")
    if top.queue_batches is not None and isinstance(top.queue_batches, int) and top.queue_batches < 1:
        parser.fail("queue_batches", f"expected an integer >= 1, got {top.queue_batches}")
    for kind, specs in (("sources", sources), ("sinks", sinks)):
        seen: set[str] = set()
        for i, spec in enumerate(specs):
            if spec.name in seen:
                parser.fail(f"{kind}[{i}].name", f"duplicate name {spec.name!r}: give each {kind[:-1]} its own 'name'")
            seen.add(spec.name)
    node_name = _node_name(top.node_name, parser)
    _check_buffer_paths(sinks, Path(top.data_dir), parser)
    if parser.problems:
        raise ConfigError(parser.problems)
    return PipelineConfig(
        node_name=node_name,
        sources=sources,
        stages=stages,
        sinks=sinks,
        metrics_address=top.metrics,
        data_dir=Path(top.data_dir),
        shutdown_timeout=float(top.shutdown_timeout),
        queue_batches=top.queue_batches,
        filename=filename,
        hubble_metrics=top.hubble_metrics,
    )


def load_file(path: str | Path, *, sources_optional: bool = False) -> PipelineConfig:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read config: {exc.strerror}"]) from None
    return load_text(text, str(path), sources_optional=sources_optional)
