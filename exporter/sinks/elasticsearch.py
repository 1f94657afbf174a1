"""``elasticsearch`` sink: ECS documents into Elasticsearch 8/9 or OpenSearch 2.x.

Documents are the ECS mapping of :mod:`flowship.model.ecs_encode`, written with
``_bulk`` ``create`` actions whose ``_id`` is the flow uuid: a retried request
cannot duplicate a flow, and a 409 answer means "already delivered". By
default flows go to the data stream ``logs-flowship.flows-default`` (aggregate
rows to ``logs-flowship.aggregates-default``); ``mode: index`` writes dated
indices (``flowship-flows-%Y.%m.%d``, dated by flow time) instead.

At start the sink installs its index templates (mapping: ``ip``, ``keyword``,
``long``, ``date_nanos`` for ``@timestamp``...) when missing, and, with
``retention:``, an ILM policy (Elasticsearch) or ISM policy (OpenSearch).

Client: elastic-transport (the HTTP layer under elasticsearch-py) rather than
the elasticsearch-py client, which refuses to talk to anything that does not
answer ``X-Elastic-Product: Elasticsearch`` (so not to OpenSearch). The
transport gives node pools, keep-alive and TLS without that check; its own
retries are turned off because :mod:`flowship.sinks.delivery` retries per
item, dead-letters refused documents with the server's reason and splits
requests answered with 413. Only the failed items of a bulk are sent again
(their ``_id`` makes that idempotent); an item is retried, with exponential
backoff and without limit by default (``retry.max_attempts: 0``), when its
error is the state of the cluster rather than the document (see
:func:`item_retryable`: cluster/index blocks, 429, 5xx, unavailable shards,
disconnected nodes), so a blocked index stalls the sink and fills its queue
or buffer instead of filling the dead-letter file. Documents the server
refuses for themselves (mapping and parsing errors, too large) are
dead-lettered and counted in ``flowship_sink_dead_letter_total{sink,reason}``.
"""

from __future__ import annotations

import gzip
import re
import uuid as uuidlib
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
from elastic_transport import NodeConfig, Serializer, Transport, TransportError

from flowship.components import Context
from flowship.config import ByteSize, Duration
from flowship.model import ecs_encode, ecs_fields
from flowship.model.schema import TIMESTAMP
from flowship.secrets import Secret
from flowship.sinks import http_client, row_times
from flowship.sinks.delivery import BatchConfig, DeliveryConfig, DeliverySink, RetryableError, SendResult

_ID_NAMESPACE = uuidlib.UUID("0b6e3c5e-2f59-4c1a-9d1e-4f3b8a6c7d21")
_INDEX_NAME = re.compile(r'^[a-z0-9][^A-Z\\/*?"<>| ,#:]*$')
_FILTER_PATH = "errors,items.*.status,items.*.error"


@dataclass
class ElasticsearchBatchConfig(BatchConfig):
    max_events: int = 5000
    max_bytes: ByteSize = ByteSize(10 * 1024 * 1024)
    timeout: Duration = Duration(1.0)


@dataclass
class ElasticsearchSinkConfig(http_client.HttpClientConfig, DeliveryConfig):
    """``type: elasticsearch`` — see docs/sinks.md. Auth and TLS keys: :class:`flowship.sinks.http_client.HttpClientConfig`."""

    url: str | list[str] = "http://127.0.0.1:9200"
    flavor: Literal["auto", "elasticsearch", "opensearch"] = "auto"
    mode: Literal["data_stream", "index"] = "data_stream"
    data_stream: str = "logs-flowship.flows-default"
    aggregates_data_stream: str = "logs-flowship.aggregates-default"
    index: str = "flowship-flows-%Y.%m.%d"  # mode: index; strftime of the flow time (UTC)
    aggregates_index: str = "flowship-aggregates-%Y.%m.%d"
    template: Literal["install", "overwrite", "skip"] = "install"
    template_priority: int = 200
    number_of_shards: int = 1
    number_of_replicas: int | None = None  # None: the server's default
    refresh_interval: str | None = None
    retention: Duration | None = None  # delete indices older than this (ILM / ISM policy)
    rollover_max_age: Duration = Duration(86400.0)  # data streams, with retention
    rollover_max_primary_shard_size: str = "50gb"
    policy_name: str = "flowship-flows"
    pipeline: str | None = None  # ingest pipeline
    api_key: Secret | None = None  # Elasticsearch "ApiKey" credentials (base64 id:key)
    compression: bool = False  # gzip request bodies
    batch: ElasticsearchBatchConfig = field(default_factory=ElasticsearchBatchConfig)

    token_key = "api_key"
    token_scheme = "ApiKey"

    def urls(self) -> list[str]:
        return [self.url] if isinstance(self.url, str) else list(self.url or [])

    def validate(self) -> list[str]:
        problems = []
        urls = self.urls()
        if not urls:
            problems.append("url: at least one URL is needed")
        for u in urls:
            if problem := http_client.url_problem("url", u, "http(s)://host:port"):
                problems.append(problem)
        names = (("data_stream", self.data_stream), ("aggregates_data_stream", self.aggregates_data_stream)) \
            if self.mode == "data_stream" else (("index", self.index), ("aggregates_index", self.aggregates_index))
        for key, name in names:
            sample = re.sub(r"%[a-zA-Z]", "0", name) if isinstance(name, str) else name
            if not isinstance(sample, str) or not _INDEX_NAME.match(sample) or sample.startswith(("-", "_", "+")):
                problems.append(f"{key}: {name!r} is not a valid index name (lowercase, no spaces or \\/*?\"<>|,#:)")
        if self.mode == "data_stream" and self.data_stream == self.aggregates_data_stream:
            problems.append("aggregates_data_stream: must differ from data_stream")
        if self.retention is not None and float(self.retention) <= 0:
            problems.append("retention: expected a positive duration")
        return problems + self.http_problems()


# Bulk item errors a later attempt can succeed on: the cluster or the index is in a state that
# passes (a write or read-only block, a full write queue, a shard moving or a node leaving),
# whatever the document. OpenSearch 2.19 answers ``index.blocks.write`` with 403
# ``blocked by: [FORBIDDEN/8/index write (api)]``, ``index.blocks.read_only`` with 403
# ``[FORBIDDEN/5/index read-only (api)]`` and ``read_only_allow_delete`` with 429
# ``[TOO_MANY_REQUESTS/12/disk usage exceeded flood-stage watermark...]``.
RETRYABLE_ITEM_STATUSES = frozenset({401, 403, 408, 429})  # blocks, credentials, timeouts, back-pressure
RETRYABLE_ITEM_TYPES = frozenset({
    "cluster_block_exception",
    "es_rejected_execution_exception",
    "rejected_execution_exception",  # OpenSearch's name for it
    "opensearch_rejected_execution_exception",
    "circuit_breaking_exception",
    "unavailable_shards_exception",
    "no_shard_available_action_exception",
    "primary_missing_action_exception",
    "shard_not_in_primary_mode_exception",
    "node_disconnected_exception",
    "node_not_connected_exception",
    "node_closed_exception",
    "connect_transport_exception",
    "receive_timeout_transport_exception",
    "send_request_transport_exception",
    "process_cluster_event_timeout_exception",
    "no_node_available_exception",
    "timeout_exception",
    "security_exception",
})


def item_retryable(status: int, error_type: str) -> bool:
    """Whether a failed bulk item is retried (True) or dead-lettered as an error of the document itself.

    Everything else (400 ``mapper_parsing_exception``, ``document_parsing_exception``,
    ``illegal_argument_exception``, ``strict_dynamic_mapping_exception``, a document too large)
    fails again however often it is sent.
    """
    return status >= 500 or status in RETRYABLE_ITEM_STATUSES or error_type in RETRYABLE_ITEM_TYPES


class _RawBytes(Serializer):
    """Leaves bodies as bytes both ways: the sink parses responses itself (orjson)."""

    mimetype: ClassVar[str] = "application/json"

    def loads(self, data: bytes) -> bytes:
        return data

    def dumps(self, data: Any) -> bytes:
        if isinstance(data, bytes):
            return data
        if isinstance(data, str):
            return data.encode()
        return orjson.dumps(data)


def _pattern_of(name: str, mode: str) -> str:
    """Index pattern a template needs to cover ``name``."""
    if mode == "index":
        head = name.split("%", 1)[0]
        return head + "*"
    parts = name.split("-")
    if len(parts) >= 3:  # type-dataset-namespace
        return "-".join(parts[:-1]) + "-*"
    return name


def _duration_text(seconds: float) -> str:
    if seconds % 86400 == 0:
        return f"{int(seconds // 86400)}d"
    if seconds % 3600 == 0:
        return f"{int(seconds // 3600)}h"
    if seconds % 60 == 0:
        return f"{int(seconds // 60)}m"
    return f"{max(1, int(seconds))}s"


def index_names(times: pa.Array, pattern: str) -> pa.Array:
    """Index name per row from a strftime pattern of the flow time (UTC)."""
    if "%" not in pattern:
        return pa.array([pattern] * len(times), pa.string())
    ns = times.cast(pa.int64()).fill_null(0).to_numpy(zero_copy_only=False)
    unit = 1_000_000_000 if re.search(r"%[HIMSpsTrRc]", pattern) else 86_400_000_000_000
    floored = ns // unit * unit
    distinct, inverse = np.unique(floored, return_inverse=True)
    names = pc.strftime(pa.array(distinct, pa.int64()).cast(TIMESTAMP).cast(pa.timestamp("s", tz="UTC")),
                        format=pattern)
    return names.take(pa.array(inverse.reshape(-1), pa.int64()))


def _bulk_records(targets: pa.Array, ids: pa.Array, docs: pa.Array) -> tuple[list[bytes], np.ndarray, list]:
    lines = pc.binary_join_element_wise('{"create":{"_index":"', targets, '","_id":"', ids, '"}}\n', docs, "\n", "")
    sizes = pc.binary_length(lines).to_numpy(zero_copy_only=False).astype(np.int64)
    return lines.cast(pa.binary()).to_pylist(), sizes, []


class ElasticsearchSink(DeliverySink):
    """Bulk-indexes ECS documents; see the module doc."""

    log_name = "elasticsearch"

    def __init__(self, config: ElasticsearchSinkConfig, ctx: Context) -> None:
        super().__init__(config, ctx)
        self.transport: Transport | None = None
        self.flavor: str = config.flavor
        self.server_version: str = ""
        self.policy_installed: bool | None = None  # None: no retention configured
        self._bulk_path = "/_bulk?filter_path=" + _FILTER_PATH
        if config.pipeline:
            self._bulk_path += f"&pipeline={config.pipeline}"
        self._headers = {"content-type": "application/x-ndjson", "accept": "application/json"}

    def connect(self) -> dict[str, Any]:
        c = self.config
        nodes = []
        headers = {"user-agent": "flowship", **c.request_headers()}
        for u in c.urls():
            parts = urlsplit(u)
            port = parts.port or (443 if parts.scheme == "https" else 9200)
            tls = http_client.tls_options(c) if parts.scheme == "https" else {}
            nodes.append(NodeConfig(parts.scheme, parts.hostname, port, path_prefix=parts.path.rstrip("/"),
                                    headers=headers, request_timeout=float(c.retry.request_timeout),
                                    connections_per_node=max(2, c.retry.concurrency), **tls))
        raw = _RawBytes()
        self.transport = Transport(nodes, serializers={"application/json": raw, "application/x-ndjson": raw,
                                                       "text/*": raw, "application/*": raw},
                                   max_retries=0, retry_on_status=(), retry_on_timeout=False, meta_header=False)
        self._probe()
        if c.template != "skip":
            self._install_templates()
        return {"urls": c.urls(), "flavor": self.flavor, "version": self.server_version, "mode": c.mode}

    def disconnect(self) -> None:
        if self.transport is not None:
            self.transport.close()

    # -- requests -------------------------------------------------------------------------
    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """One request without retries: (status, parsed JSON body or None)."""
        headers = {"accept": "application/json"}
        if body is not None:
            headers["content-type"] = "application/json"
        resp = self.transport.perform_request(method, path, body=body, headers=headers)
        data = resp.body
        parsed = None
        if data:
            try:
                parsed = orjson.loads(data)
            except orjson.JSONDecodeError:
                parsed = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
        return resp.meta.status, parsed

    def _probe(self) -> None:
        try:
            status, info = self.request("GET", "/")
        except TransportError as exc:
            raise RuntimeError(f"cannot reach {', '.join(self.config.urls())}: {exc}") from None
        if status in (401, 403):
            raise RuntimeError(f"{self.config.urls()[0]} refused the credentials (HTTP {status})")
        version = (info or {}).get("version", {}) if isinstance(info, dict) else {}
        self.server_version = str(version.get("number", ""))
        detected = "opensearch" if version.get("distribution") == "opensearch" else "elasticsearch"
        if self.flavor == "auto":
            self.flavor = detected
        elif self.flavor != detected:
            self.ctx.log.warning("configured flavor differs from the server", configured=self.flavor,
                                 server=detected)

    def _template_body(self, kind: str) -> tuple[str, dict]:
        c = self.config
        target = (c.data_stream if kind == "flows" else c.aggregates_data_stream) if c.mode == "data_stream" \
            else (c.index if kind == "flows" else c.aggregates_index)
        pattern = _pattern_of(target, c.mode)
        name = pattern.rstrip("*").rstrip("-_.") or f"flowship-{kind}"
        settings: dict[str, Any] = {"number_of_shards": c.number_of_shards}
        if c.number_of_replicas is not None:
            settings["number_of_replicas"] = c.number_of_replicas
        if c.refresh_interval:
            settings["refresh_interval"] = c.refresh_interval
        if c.retention is not None and self.flavor == "elasticsearch":
            settings["lifecycle"] = {"name": c.policy_name}
        mappings = {
            "dynamic_templates": [
                {"strings_as_keyword": {"match_mapping_type": "string",
                                        "mapping": {"type": "keyword", "ignore_above": 1024}}},
            ],
            "properties": ecs_fields.es_properties(aggregates=kind == "aggregates"),
        }
        body: dict[str, Any] = {
            "index_patterns": [pattern],
            "priority": c.template_priority,
            "template": {"settings": {"index": settings}, "mappings": mappings},
            "_meta": {"managed_by": "flowship", "ecs_version": ecs_fields.ECS_VERSION},
        }
        if c.mode == "data_stream":
            body["data_stream"] = {}
        return name, body

    def _install_templates(self) -> None:
        c = self.config
        if c.retention is not None:
            self._install_policy()
        for kind in ("flows", "aggregates"):
            name, body = self._template_body(kind)
            status, _ = self.request("HEAD", f"/_index_template/{name}")
            if status == 200 and c.template == "install":
                continue
            status, answer = self.request("PUT", f"/_index_template/{name}", body)
            if status >= 300:
                raise RuntimeError(f"installing index template {name} failed (HTTP {status}): {answer}")
            self.ctx.log.info("index template installed", template=name, patterns=body["index_patterns"])

    def _install_policy(self) -> None:
        c = self.config
        retention = _duration_text(float(c.retention))
        rollover_age = _duration_text(float(c.rollover_max_age))
        if self.flavor == "elasticsearch":
            hot: dict[str, Any] = {"actions": {}}
            if c.mode == "data_stream":
                hot["actions"]["rollover"] = {"max_age": rollover_age,
                                              "max_primary_shard_size": c.rollover_max_primary_shard_size}
            body = {"policy": {"phases": {"hot": hot, "delete": {"min_age": retention,
                                                                  "actions": {"delete": {}}}}}}
            status, answer = self.request("PUT", f"/_ilm/policy/{c.policy_name}", body)
        else:
            hot_actions = [{"rollover": {"min_index_age": rollover_age}}] if c.mode == "data_stream" else []
            patterns = [_pattern_of(t, c.mode) for t in (
                (c.data_stream, c.aggregates_data_stream) if c.mode == "data_stream"
                else (c.index, c.aggregates_index))]
            body = {"policy": {
                "description": "flowship retention",
                "default_state": "hot",
                "states": [
                    {"name": "hot", "actions": hot_actions,
                     "transitions": [{"state_name": "delete", "conditions": {"min_index_age": retention}}]},
                    {"name": "delete", "actions": [{"delete": {}}], "transitions": []},
                ],
                "ism_template": [{"index_patterns": patterns, "priority": c.template_priority}],
            }}
            path = f"/_plugins/_ism/policies/{c.policy_name}"
            status, existing = self.request("GET", path)
            if status == 200 and isinstance(existing, dict):
                path += f"?if_seq_no={existing.get('_seq_no')}&if_primary_term={existing.get('_primary_term')}"
            status, answer = self.request("PUT", path, body)
        if status >= 300:
            self.ctx.log.warning("retention policy not installed: indices are kept until deleted by hand",
                                 flavor=self.flavor, status=status, answer=str(answer)[:300])
            self.policy_installed = False
        else:
            self.policy_installed = True
            self.ctx.log.info("retention policy installed", policy=c.policy_name, retention=retention)

    # -- encoding -------------------------------------------------------------------------
    def encode_flows(self, batch: pa.RecordBatch) -> tuple[list[bytes], np.ndarray, list]:
        """Bulk records (action line + document line), their sizes, nothing refused."""
        c = self.config
        if c.mode == "data_stream":
            targets = pa.array([c.data_stream] * batch.num_rows, pa.string())
        else:
            targets = index_names(batch.column("time"), c.index)
        return _bulk_records(targets, batch.column("uuid"), ecs_encode.ndjson_array(batch))

    def encode_aggregates(self, batch: pa.RecordBatch) -> tuple[list[bytes], np.ndarray, list]:
        """As :meth:`encode_flows`; the ``_id`` of an aggregate row is a digest of its document."""
        c = self.config
        doc_bytes = [orjson.dumps(d) for d in ecs_encode.aggregate_documents(batch)]
        docs = pa.array(doc_bytes, pa.binary()).cast(pa.string())
        ids = pa.array([str(uuidlib.uuid5(_ID_NAMESPACE, d.hex())) for d in doc_bytes], pa.string())
        if c.mode == "data_stream":
            targets = pa.array([c.aggregates_data_stream] * batch.num_rows, pa.string())
        else:
            times = pa.array(row_times(batch, "aggregates"), pa.int64()).cast(TIMESTAMP)
            targets = index_names(times, c.aggregates_index)
        return _bulk_records(targets, ids, docs)

    # -- sending --------------------------------------------------------------------------
    def send(self, records: list[bytes]) -> SendResult:
        body = b"".join(records)
        headers = dict(self._headers)
        if self.config.compression:
            body = gzip.compress(body, compresslevel=1)
            headers["content-encoding"] = "gzip"
        try:
            resp = self.transport.perform_request("POST", self._bulk_path, body=body, headers=headers)
        except TransportError as exc:
            raise RetryableError("transport", f"{type(exc).__name__}: {exc}") from None
        data = resp.body or b""
        http_client.raise_for_status(resp.meta.status, data, resp.meta.headers.get("retry-after"))
        result = SendResult(sent_bytes=len(body))
        try:
            answer = orjson.loads(data) if data else {}
        except orjson.JSONDecodeError:
            raise RetryableError("bad_response", f"bulk answer is not JSON: {data[:200]!r}") from None
        if not isinstance(answer, dict):
            raise RetryableError("bad_response", f"unexpected bulk answer: {str(answer)[:200]}")
        if not answer.get("errors"):
            return result
        items = answer.get("items") or []
        if len(items) != len(records):
            raise RetryableError("bad_response", f"bulk answered {len(items)} items for {len(records)} actions")
        kinds = set()
        for i, item in enumerate(items):
            (_, outcome), = item.items()
            st = outcome.get("status", 0)
            if st < 300:
                continue
            if st == 409:
                result.duplicates += 1
                continue
            error = outcome.get("error") or {}
            etype = error.get("type", f"http_{st}") if isinstance(error, dict) else f"http_{st}"
            if item_retryable(st, etype):
                result.retry.append(i)
                kinds.add(f"item_{st}")
                if not result.retry_reason:
                    reason = error.get("reason", "") if isinstance(error, dict) else str(error)
                    result.retry_reason = f"{etype}: {reason}"[:300]
                continue
            result.dead.append((i, etype, orjson.dumps(error).decode() if isinstance(error, dict) else str(error)))
        if kinds:
            result.retry_kind = sorted(kinds)[0]
        return result

    def describe(self, record: bytes) -> dict:
        action, _, doc = record.partition(b"\n")
        meta = orjson.loads(action).get("create", {})
        try:
            document = orjson.loads(doc)
        except orjson.JSONDecodeError:
            document = doc.decode("utf-8", "replace")
        return {"index": meta.get("_index"), "id": meta.get("_id"), "document": document}
