"""ECS, by its old module name: the mapping in :mod:`exporter.model.ecs_fields`, documents out in
:mod:`exporter.model.ecs_encode`, documents back in :mod:`exporter.model.ecs_decode`.

Kept for the modules outside the model and sinks that still import from here.
"""

from __future__ import annotations

from exporter.model.ecs_decode import decode_ndjson, documents_to_flows
from exporter.model.ecs_encode import (
    aggregate_documents,
    encode_documents,
    encode_ndjson,
    ndjson_array,
    to_documents,
)
from exporter.model.ecs_fields import ECS_VERSION, FLOW_FIELDS, NOT_EXPORTED, es_properties, field_table

__all__ = ["ECS_VERSION", "FLOW_FIELDS", "NOT_EXPORTED", "aggregate_documents", "decode_ndjson",
           "documents_to_flows", "encode_documents", "encode_ndjson", "es_properties", "field_table",
           "ndjson_array", "to_documents"]
