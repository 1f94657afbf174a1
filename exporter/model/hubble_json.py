"""Hubble JSON, by its old module name: decode in :mod:`exporter.model.hubble_decode`,
encode in :mod:`exporter.model.hubble_encode`, times in :mod:`exporter.model.times`.

Kept for the modules outside the model and sinks that still import from here.
"""

from __future__ import annotations

from exporter.model.hubble_decode import decode_lines
from exporter.model.hubble_encode import encode_lines, encode_lines_slow, encode_ndjson, flow_dicts
from exporter.model.times import format_time, parse_time

__all__ = ["decode_lines", "encode_lines", "encode_lines_slow", "encode_ndjson", "flow_dicts", "format_time",
           "parse_time"]
