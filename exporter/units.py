"""Quantities written in configs with a unit: durations and byte sizes.

Apart from :mod:`flowship.config` so that components below it (the disk buffer) can use them without
importing the config loader.
"""

from __future__ import annotations

import re


class Duration(float):
    """Seconds, written as a number or with a unit: 500ms, 10s, 5m, 1h, 7d."""

    _UNITS = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}

    @classmethod
    def parse(cls, value: object) -> Duration:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, (int, float)):
            return cls(float(value))
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ns|us|ms|s|m|h|d)?\s*", str(value))
        if not match:
            raise ValueError
        return cls(float(match.group(1)) * cls._UNITS[match.group(2) or "s"])

    expected = 'a duration like "10s", "500ms" or "5m"'


class ByteSize(int):
    """Bytes, written as a number or with a unit: 512KiB, 64MiB, 1GB."""

    _UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2,
              "mib": 1024**2, "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "tib": 1024**4}

    @classmethod
    def parse(cls, value: object) -> ByteSize:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, int):
            return cls(value)
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        if not match or match.group(2).lower() not in cls._UNITS:
            raise ValueError
        return cls(int(float(match.group(1)) * cls._UNITS[match.group(2).lower()]))

    expected = 'a byte size like "4MiB" or 1048576'
