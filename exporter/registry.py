"""The registry: ``type:`` names of sources, stages and sinks → (config class, class).

Adding a component is one module plus one line here. Entries are imported
lazily so that a missing optional dependency (say, confluent-kafka) only
matters to configs that use it.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

# kind -> type name -> "module:ConfigClass:ComponentClass"
_ENTRIES: dict[str, dict[str, str]] = {
    "sources": {
        "file": "exporter.sources.file:FileSourceConfig:FileSource",
        "stdin": "exporter.sources.stdin:StdinSourceConfig:StdinSource",
        "hubble": "exporter.sources.hubble:HubbleSourceConfig:HubbleSource",
        "kafka": "exporter.sources.kafka:KafkaSourceConfig:KafkaSource",
        "agent": "agent.source:AgentSourceConfig:AgentSource",
    },
    "stages": {
        "filter": "exporter.stages.filter:FilterConfig:FilterStage",
        "healthcheck": "exporter.stages.healthcheck:HealthcheckConfig:HealthcheckStage",
        "sample": "exporter.stages.sample:SampleConfig:SampleStage",
        "aggregate": "exporter.stages.aggregate:AggregateConfig:AggregateStage",
        "redact": "exporter.stages.redact:RedactConfig:RedactStage",
    },
    "sinks": {
        "parquet": "exporter.sinks.parquet:ParquetSinkConfig:ParquetSink",
        "file": "exporter.sinks.jsonl:FileSinkConfig:FileSink",
        "stdout": "exporter.sinks.jsonl:StdoutSinkConfig:StdoutSink",
        "loki": "exporter.sinks.loki:LokiSinkConfig:LokiSink",
        "elasticsearch": "exporter.sinks.elasticsearch:ElasticsearchSinkConfig:ElasticsearchSink",
        "kafka": "exporter.sinks.kafka:KafkaSinkConfig:KafkaSink",
    },
}


def names(kind: str) -> list[str]:
    """Type names of a kind whose module is present in this installation."""
    out = []
    for name, target in _ENTRIES[kind].items():
        module = target.split(":")[0]
        if importlib.util.find_spec(module) is not None:
            out.append(name)
    return out


def _resolve(kind: str, type_name: str) -> tuple[type, type]:
    module_name, config_name, class_name = _ENTRIES[kind][type_name].split(":")
    module = importlib.import_module(module_name)
    return getattr(module, config_name), getattr(module, class_name)


def config_class(kind: str, type_name: str) -> type:
    return _resolve(kind, type_name)[0]


def component_class(kind: str, type_name: str) -> type:
    return _resolve(kind, type_name)[1]


def build(kind: str, type_name: str, config: Any, ctx: Any) -> Any:
    return component_class(kind, type_name)(config, ctx)
