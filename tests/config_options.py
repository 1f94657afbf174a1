"""The options of a component's config dataclass, nested sections included (``batch.max_bytes``).

Shared by the config fuzz test and the compliance test (``tests/`` is on the import path of every test).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any


def nested_dataclass(tp: Any) -> type | None:
    """The config dataclass an option of type ``tp`` holds (``RetryConfig``, ``KubernetesConfig | None``), if any."""
    union = typing.get_origin(tp) in (typing.Union, types.UnionType)
    return next((a for a in (typing.get_args(tp) if union else (tp,)) if dataclasses.is_dataclass(a)), None)


def option_paths(cls: type, prefix: str = "", depth: int = 0, max_depth: int = 2) -> list[tuple[str, Any]]:
    """(dotted option path, type) of a config dataclass and, ``max_depth`` levels deep, of its nested ones."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp, path = hints[f.name], f"{prefix}{f.name}"
        out.append((path, tp))
        inner = nested_dataclass(tp)
        if inner is not None and depth < max_depth:
            out.extend(option_paths(inner, f"{path}.", depth + 1, max_depth))
    return out
