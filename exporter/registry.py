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
        "file": "flowship.sources.file:FileSourceConfig:FileSource",
        "stdin": "flowship.sources.stdin:StdinSourceConfig:StdinSource",
        "hubble": "flowship.sources.hubble:HubbleSourceConfig:HubbleSource",
        "kafka": "flowship.sources.kafka:KafkaSourceConfig:KafkaSource",
        "agent": "flowship.agent.source:AgentSourceConfig:AgentSource",
    },
    "stages": {
        "filter": "flowship.stages.filter:FilterConfig:FilterStage",
        "healthcheck": "flowship.stages.healthcheck:HealthcheckConfig:HealthcheckStage",
        "sample": "flowship.stages.sample:SampleConfig:SampleStage",
        "aggregate": "flowship.stages.aggregate:AggregateConfig:AggregateStage",
        "redact": "flowship.stages.redact:RedactConfig:RedactStage",
    },
    "sinks": {
        "parquet": "flowship.sinks.parquet:ParquetSinkConfig:ParquetSink",
        "file": "flowship.sinks.jsonl:FileSinkConfig:FileSink",
        "stdout": "flowship.sinks.jsonl:StdoutSinkConfig:StdoutSink",
        "loki": "flowship.sinks.loki:LokiSinkConfig:LokiSink",
        "elasticsearch": "flowship.sinks.elasticsearch:ElasticsearchSinkConfig:ElasticsearchSink",
        "kafka": "flowship.sinks.kafka:KafkaSinkConfig:KafkaSink",
        "http": "flowship.sinks.http:HttpSinkConfig:HttpSink",
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
