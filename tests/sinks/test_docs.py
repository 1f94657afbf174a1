"""docs/sinks.md documents every option of the network sinks and the Kafka source."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from exporter.sinks.delivery import BatchConfig, RetryConfig
from exporter.sinks.elasticsearch import ElasticsearchSinkConfig
from exporter.sinks.kafka import CreateTopicConfig, KafkaSinkConfig
from exporter.sinks.loki import LokiSinkConfig
from exporter.sources.kafka import KafkaSourceConfig

DOC = (Path(__file__).resolve().parents[2] / "docs" / "sinks.md").read_text()


@pytest.mark.parametrize("cls", [BatchConfig, RetryConfig, LokiSinkConfig, ElasticsearchSinkConfig, KafkaSinkConfig,
                                 CreateTopicConfig, KafkaSourceConfig])
def test_every_option_is_documented(cls):
    missing = [f.name for f in dataclasses.fields(cls) if f"`{f.name}`" not in DOC]
    assert missing == [], f"{cls.__name__}: options missing from docs/sinks.md"
