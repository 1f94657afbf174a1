"""``http`` sink: batches of JSON records POSTed to any HTTP endpoint.

For receivers without a sink of their own: a webhook, a log store's JSON
ingestion API (VictoriaLogs ``/insert/jsonline``, Fluent Bit's or Vector's
``http`` source, an HTTP collector in front of a SIEM). Each flow is one
JSON record — Hubble JSON (``format: hubble``, the line Hubble's exporter
writes) or an ECS document (``format: ecs``) — and a request carries a
batch of them as JSON lines (``framing: ndjson``) or as one JSON array
(``framing: json_array``), optionally gzip-compressed.

Batching, retries (429, 5xx and transport errors, honouring Retry-After),
halving on 413 and dead letters (other 4xx) come from
:mod:`flowship.sinks.delivery`; auth and TLS from
:mod:`flowship.sinks.http_client`. A batch is acknowledged once the
endpoint answered 2xx for every request that holds its rows. A retried
request is sent again whole, so a receiver that accepted part of it sees
those records twice: every record carries the flow's ``uuid`` to dedupe on.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import orjson
import pyarrow as pa

from flowship.components import Context
from flowship.secrets import Secret
from flowship.sinks import http_client, jsonl
from flowship.sinks.delivery import BatchConfig, DeliveryConfig, DeliverySink, SendResult

_CONTENT_TYPES = {"ndjson": "application/x-ndjson", "json_array": "application/json"}


@dataclass
class HttpSinkConfig(http_client.HttpClientConfig, DeliveryConfig):
    """``type: http`` — see docs/sinks.md. Auth and TLS keys: :class:`flowship.sinks.http_client.HttpClientConfig`."""

    url: str = ""
    format: jsonl.Format = "hubble"
    framing: Literal["ndjson", "json_array"] = "ndjson"
    compression: Literal["none", "gzip"] = "none"
    content_type: str | None = None  # default: application/x-ndjson or application/json by framing
    bearer_token: Secret | None = None
    batch: BatchConfig = field(default_factory=BatchConfig)  # a 413 answer halves a request anyway

    token_key = "bearer_token"
    token_scheme = "Bearer"

    def validate(self) -> list[str]:
        problem = http_client.url_problem("url", self.url, "the endpoint as http(s)://host[:port]/path")
        return ([problem] if problem else []) + self.http_problems()


def request_body(records: list[bytes], framing: str, compression: str) -> bytes:
    """One request body from newline-terminated JSON records."""
    if framing == "ndjson":
        body = b"".join(records)
    else:
        body = b"[" + b",".join(r[:-1] for r in records) + b"]"
    return gzip.compress(body, compresslevel=1) if compression == "gzip" else body


class HttpSink(DeliverySink):
    """Sends flows (and aggregate rows) as JSON records to one HTTP endpoint."""

    log_name = "http"

    def __init__(self, config: HttpSinkConfig, ctx: Context) -> None:
        super().__init__(config, ctx)
        self._headers: dict[str, str] = {}
        self._http = None

    def connect(self) -> dict[str, Any]:
        c = self.config
        headers = {"User-Agent": "flowship", "Content-Type": c.content_type or _CONTENT_TYPES[c.framing]}
        if c.compression == "gzip":
            headers["Content-Encoding"] = "gzip"
        headers.update(c.request_headers())
        self._headers = headers
        self._http = http_client.pool(c, c.retry.concurrency)
        return {"url": c.url, "format": c.format, "framing": c.framing}

    def disconnect(self) -> None:
        if self._http is not None:
            self._http.clear()

    def encode_flows(self, batch: pa.RecordBatch) -> tuple[list, np.ndarray, list]:
        return self._records(jsonl.encode(batch, "flows", self.config.format))

    def encode_aggregates(self, batch: pa.RecordBatch) -> tuple[list, np.ndarray, list]:
        return self._records(jsonl.encode(batch, "aggregates", self.config.format))

    @staticmethod
    def _records(lines: list[bytes]) -> tuple[list, np.ndarray, list]:
        return lines, np.fromiter(map(len, lines), dtype=np.int64, count=len(lines)), []

    def send(self, records: list) -> SendResult:
        c = self.config
        body = request_body(records, c.framing, c.compression)
        resp = http_client.post(self._http, c.url, body, self._headers, float(c.retry.request_timeout))
        http_client.raise_for_status(resp.status, resp.data, resp.headers.get("Retry-After"))
        return SendResult(sent_bytes=len(body))

    def describe(self, record: bytes) -> Any:
        return orjson.loads(record)
