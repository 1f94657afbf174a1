"""Credentials in configs: a value that is redacted wherever it is printed.

A config field typed :class:`Secret` (or ``Secret | None``) holds what the
YAML said: a literal, ``env:NAME`` (read from the environment) or
``file:/path`` (read from a file, trailing whitespace removed). ``repr`` and
``str`` show a reference's name (``Secret('env:LOKI_TOKEN')``) and never a
value; the value comes only from :meth:`Secret.reveal`, called where it is
put on the wire (an ``Authorization`` header, a librdkafka property).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["Secret", "resolve", "reveal"]


def resolve(value: str) -> str:
    """The value behind ``env:NAME`` / ``file:/path``, or ``value`` itself when it is a literal.

    Raises ValueError for an unset variable and OSError for a file that cannot be read.
    """
    if value.startswith("env:"):
        name = value[4:]
        if name not in os.environ:
            raise ValueError(f"environment variable {name} is not set")
        return os.environ[name]
    if value.startswith("file:"):
        return Path(value[5:]).read_text().strip()
    return value


class Secret:
    """A credential from a config; see the module doc."""

    __slots__ = ("_raw",)

    def __init__(self, raw: str) -> None:
        if isinstance(raw, Secret):
            raw = raw._raw
        if not isinstance(raw, str):
            raise TypeError(f"a Secret holds a string, not {type(raw).__name__}")
        self._raw = raw

    @property
    def reference(self) -> str | None:
        """``env:NAME`` or ``file:/path`` as written; None for a literal (which is never shown)."""
        return self._raw if self._raw.startswith(("env:", "file:")) else None

    def reveal(self) -> str:
        """The credential itself: put it on the wire, never in a log line or a message."""
        return resolve(self._raw)

    def problem(self) -> str | None:
        """Why the reference would not resolve now (None when it would, or for a literal)."""
        raw = self._raw
        if raw.startswith("env:") and raw[4:] not in os.environ:
            return f"environment variable {raw[4:]} is not set"
        if raw.startswith("file:") and not os.access(raw[5:], os.R_OK):
            return f"file {raw[5:]} is missing or unreadable"
        return None

    def __repr__(self) -> str:
        return f"Secret({self.reference!r})" if self.reference else "Secret('***')"

    __str__ = __repr__

    def __bool__(self) -> bool:
        return bool(self._raw)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._raw == self._raw

    def __hash__(self) -> int:
        return hash((Secret, self._raw))


def reveal(value: Secret | None) -> str | None:
    """``value.reveal()``, or None for an unset field."""
    return None if value is None else value.reveal()
