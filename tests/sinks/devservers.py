"""Start the real development servers for sink tests (deploy/dev/servers) and reach them.

A server that cannot be started makes the test fail with what to run; there
are no mocks of Kafka, OpenSearch or VictoriaLogs.

The fixtures at the end (the servers, a run id, the recorded flows) are shared by
the sink, security and Kafka source tests, which take them by name, e.g.
``kafka_server = devservers.kafka_server`` in a conftest.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from helpers import decode_fixtures, distinct_flows

REPO = Path(__file__).resolve().parents[2]
SERVERS = REPO / "deploy" / "dev" / "servers"

KAFKA = os.environ.get("FLOWSHIP_KAFKA_BOOTSTRAP", "127.0.0.1:" + os.environ.get("FLOWSHIP_KAFKA_PORT", "9092"))
OPENSEARCH = os.environ.get("FLOWSHIP_OPENSEARCH_URL",
                            "http://127.0.0.1:" + os.environ.get("FLOWSHIP_OPENSEARCH_PORT", "9200")).rstrip("/")
VICTORIALOGS = os.environ.get("FLOWSHIP_VICTORIALOGS_URL",
                              "http://127.0.0.1:" + os.environ.get("FLOWSHIP_VICTORIALOGS_PORT", "9428")).rstrip("/")


def tcp_open(host_port: str, timeout: float = 2.0) -> bool:
    host, _, port = host_port.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            return True
    except OSError:
        return False


def http_json(method: str, url: str, body: Any = None, timeout: float = 30.0,
              content_type: str = "application/json") -> tuple[int, Any]:
    data = None
    if body is not None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            status = resp.status
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        status = exc.code
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw.decode("utf-8", "replace")


def answers(name: str, address: str) -> bool:
    if name == "kafka":
        return tcp_open(address)
    try:
        with urllib.request.urlopen(address + ("/health" if name == "victorialogs" else "/"), timeout=3) as r:
            return r.status == 200
    except (OSError, urllib.error.URLError):
        return False


def start(name: str, address: str, env: dict[str, str] | None = None) -> None:
    """``deploy/dev/servers start <name>``; fail the test with the reason if the server does not answer."""
    if not SERVERS.exists():
        pytest.fail(f"{SERVERS} is missing: the dev server scripts are needed for {name}", pytrace=False)
    proc = subprocess.run([str(SERVERS), "start", name], capture_output=True, text=True, timeout=900,
                          env={**os.environ, **(env or {})}, cwd=REPO)
    if proc.returncode == 0 or answers(name, address):
        deadline = time.monotonic() + 120
        while not answers(name, address):
            if time.monotonic() > deadline:
                break
            time.sleep(1)
        if answers(name, address):
            return
    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
    pytest.fail(f"{name} could not be started at {address}.\n`deploy/dev/servers start {name}` said:\n{tail}\n"
                f"Run `deploy/dev/servers start {name}` (and `deploy/dev/servers logs {name}`) to fix it.",
                pytrace=False)


def stop(name: str, env: dict[str, str] | None = None) -> None:
    proc = subprocess.run([str(SERVERS), "stop", name], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})}, cwd=REPO)
    if proc.returncode != 0:
        pytest.fail(f"`deploy/dev/servers stop {name}` failed:\n{proc.stdout}{proc.stderr}", pytrace=False)


# ---------------------------------------------------------------------------------------------
# Shared fixtures
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def fixture_batches(fixture_files: list[Path]) -> dict[str, pa.RecordBatch]:
    """Every recorded fixture file decoded, by file stem."""
    return decode_fixtures(fixture_files)


@pytest.fixture(scope="session")
def all_flows(fixture_batches: dict[str, pa.RecordBatch]) -> pa.RecordBatch:
    """All fixture flows in one batch, one row per distinct uuid."""
    return distinct_flows(list(fixture_batches.values()))


@pytest.fixture()
def run_id() -> str:
    """Unique, lowercase: usable in topic, index, data stream and label names on the shared servers."""
    return f"{int(time.time())}{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="session")
def kafka_server() -> str:
    start("kafka", KAFKA)
    return KAFKA


@pytest.fixture(scope="session")
def opensearch_server() -> str:
    start("opensearch", OPENSEARCH)
    return OPENSEARCH


@pytest.fixture(scope="session")
def victorialogs_server() -> str:
    start("victorialogs", VICTORIALOGS)
    return VICTORIALOGS


def logsql_query(base: str, logsql: str, limit: int = 0) -> list[dict]:
    """Rows VictoriaLogs answers for a LogsQL query (``/select/logsql/query``, JSON lines)."""
    params = {"query": logsql}
    if limit:
        params["limit"] = str(limit)
    url = f"{base}/select/logsql/query?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=30) as resp:
        assert resp.status == 200
        body = resp.read().decode()
    return [json.loads(line) for line in body.splitlines() if line.strip()]


def logsql_wait_rows(base: str, logsql: str, want: int = 1, timeout: float = 30.0) -> list[dict]:
    """The rows of a LogsQL query, polled until there are ``want``: a filter can find fresh entries later than
    a count over the same stream does (both pass through VictoriaLogs' asynchronous ingestion)."""
    deadline = time.monotonic() + timeout
    while True:
        rows = logsql_query(base, logsql)
        if len(rows) >= want or time.monotonic() > deadline:
            return rows
        time.sleep(0.5)


def logsql_wait_count(base: str, where: str, want: int, timeout: float = 30.0) -> int:
    """Entries matching the LogsQL filter ``where``, polled until there are ``want`` (ingestion is asynchronous)."""
    deadline = time.monotonic() + timeout
    got = -1
    while time.monotonic() < deadline:
        rows = logsql_query(base, f"{where} | stats count() c")
        got = int(rows[0]["c"]) if rows else 0
        if got >= want:
            return got
        time.sleep(0.5)
    return got
