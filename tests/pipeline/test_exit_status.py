"""Exit status and run summary of ``flowship export`` against the real dev servers.

A finite run exits 0 only when every flow it read reached every sink; the
end of the input waits for the sinks (``shutdown_timeout`` bounds only the
drain after a signal); flows left undelivered give exit 4, dead-lettered
ones exit 5; the summary counts rows the server accepted, including those of
a batch that is only partly acknowledged. Counts are taken on the servers.
Needs OpenSearch (:9200) and Kafka (:9092): ``bash deploy/dev/servers start``.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from flowgen_input import generate_lines

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sinks"))

import devservers  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
EXIT_UNDELIVERED, EXIT_DEAD_LETTERED = 4, 5

pytestmark = pytest.mark.servers


@pytest.fixture(scope="module")
def opensearch() -> str:
    devservers.start("opensearch", devservers.OPENSEARCH)
    return devservers.OPENSEARCH


@pytest.fixture()
def stream(opensearch: str) -> Iterator[str]:
    """A data stream name of this test alone; deleted afterwards."""
    run = f"{int(time.time())}{uuid.uuid4().hex[:6]}"
    names = [f"logs-flowshipexit{run}.flows-default", f"logs-flowshipexit{run}.aggregates-default"]
    yield names[0]
    for name in names:
        devservers.http_json("DELETE", f"{opensearch}/_data_stream/{name}")
        devservers.http_json("DELETE", f"{opensearch}/_index_template/{name}")


@pytest.fixture(scope="module")
def flows(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    """20,000 generated Hubble JSON lines, each with its own uuid."""
    return generate_lines(tmp_path_factory.mktemp("input") / "flows.jsonl", 20000)


def es_sink(url: str, data_stream: str, **extra: object) -> dict:
    return {"type": "elasticsearch", "name": "es", "url": url, "data_stream": data_stream,
            "aggregates_data_stream": data_stream.replace(".flows-", ".aggregates-"), **extra}


def write_config(path: Path, settings: dict) -> Path:
    path.write_text(orjson.dumps(settings).decode())  # JSON is YAML
    return path


def export(config: Path, cwd: Path, timeout: float = 300) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", "flowship.cli", "export", "--config", str(config), "--no-progress"],
                          cwd=cwd, capture_output=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO)})
    return proc.returncode, proc.stderr.decode(errors="replace")


def summary_block(log: str) -> str:
    """The human summary the CLI prints at the end (from its ``flowship: finished|stopped`` line)."""
    start = max(log.rfind("flowship: finished"), log.rfind("flowship: stopped"))
    assert start >= 0, log[-3000:]
    return log[start:]


def delivered(log: str, sink: str) -> int:
    found = re.search(rf"^  sink {sink}: (\d+) rows delivered$", summary_block(log), re.M)
    assert found, summary_block(log)
    return int(found.group(1))


def server_count(url: str, target: str) -> int:
    devservers.http_json("POST", f"{url}/{target}/_refresh")
    status, body = devservers.http_json("GET", f"{url}/{target}/_count")
    if status == 404:
        return 0
    assert status == 200, body
    return int(body["count"])


def test_finite_run_waits_for_the_disk_buffer_and_exits_0_with_every_flow_indexed(
        tmp_path: Path, opensearch: str, stream: str, flows: list[bytes]) -> None:
    """The issue's case, smaller: a shutdown_timeout far below the drain time no longer cuts it short."""
    source = tmp_path / "flows.jsonl"
    source.write_bytes(b"\n".join(flows) + b"\n")
    config = write_config(tmp_path / "c.yaml", {
        "data_dir": str(tmp_path / "state"), "shutdown_timeout": "1s",
        "sources": [{"type": "file", "paths": [str(source)], "batch_rows": 5000}],
        "sinks": [es_sink(opensearch, stream, buffer={"type": "disk"},
                          batch={"max_events": 1000}, retry={"concurrency": 1})],
    })
    started = time.monotonic()
    code, log = export(config, tmp_path)
    took = time.monotonic() - started
    assert code == 0, summary_block(log)
    assert server_count(opensearch, stream) == len(flows)
    assert delivered(log, "es") == len(flows)
    assert "flowship: finished" in log and "every flow delivered (exit 0)" in log
    assert "left in the disk buffer" not in log
    assert took > 1.0, "the drain took less than shutdown_timeout: the test shows nothing"


def test_sigterm_mid_drain_counts_rows_of_partly_acknowledged_batches(
        tmp_path: Path, opensearch: str, stream: str, flows: list[bytes]) -> None:
    """One 20,000-row batch goes out in requests of 1,000: rows count as each request is accepted."""
    source = tmp_path / "flows.jsonl"
    source.write_bytes(b"\n".join(flows) + b"\n")
    settings = {
        "data_dir": str(tmp_path / "state"), "shutdown_timeout": "1s",
        "sources": [{"type": "file", "paths": [str(source)], "batch_rows": len(flows)}],
        "sinks": [es_sink(opensearch, stream, buffer={"type": "disk"},
                          batch={"max_events": 1000}, retry={"concurrency": 1})],
    }
    config = write_config(tmp_path / "c.yaml", settings)
    proc = subprocess.Popen([sys.executable, "-m", "flowship.cli", "export", "--config", str(config),
                             "--no-progress"], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        deadline = time.monotonic() + 120
        while server_count(opensearch, stream) < 2000:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()[-3000:]
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = err.decode(errors="replace")
    indexed = server_count(opensearch, stream)
    assert indexed < len(flows), "everything was indexed before the signal: the test shows nothing"
    reported = delivered(log, "es")
    # Counted per accepted request, not per whole batch (the batch is not settled: that would say 0).
    assert 2000 <= reported <= indexed, (reported, indexed)
    # Stopped by a signal, the rest kept durably in the disk buffer: that is a clean stop.
    assert proc.returncode == 0, summary_block(log)
    assert "flowship: stopped" in log and "left in the disk buffer: 1 batches" in summary_block(log)

    # The next start replays the buffer and delivers the rest; ids are the flow uuids, so no duplicates.
    code, log = export(config, tmp_path)
    assert code == 0, summary_block(log)
    assert server_count(opensearch, stream) == len(flows)


def test_dead_lettered_flows_exit_5_and_are_in_the_summary(
        tmp_path: Path, opensearch: str, stream: str, flows: list[bytes]) -> None:
    """A flow breaking the index mapping is dead-lettered; the others are indexed; exit 5 says so."""
    lines = flows[:2000]
    bad = orjson.loads(lines[1000])
    bad["flow"]["IP"]["source"] = "not-an-ip"
    lines = [*lines[:1000], orjson.dumps(bad), *lines[1001:]]
    source = tmp_path / "flows.jsonl"
    source.write_bytes(b"\n".join(lines) + b"\n")
    config = write_config(tmp_path / "c.yaml", {
        "data_dir": str(tmp_path / "state"),
        "sources": [{"type": "file", "paths": [str(source)]}],
        "sinks": [es_sink(opensearch, stream)],
    })
    code, log = export(config, tmp_path)
    assert code == EXIT_DEAD_LETTERED, summary_block(log)
    assert server_count(opensearch, stream) == 1999
    block = summary_block(log)
    assert delivered(log, "es") == 1999
    assert "dead-lettered: 1 rows" in block and "(exit 5)" in block
    (entry,) = (tmp_path / "state" / "dead-letter" / "es.jsonl").read_bytes().splitlines()
    assert orjson.loads(entry)["record"]["id"] == bad["flow"]["uuid"]


# ---------------------------------------------------------------------------------------------
# Kafka: unreachable, and a TLS server whose certificate the configured CA did not sign
# ---------------------------------------------------------------------------------------------

def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_cert(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    proc = subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                           "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", f"/CN={name}",
                           "-addext", "subjectAltName=IP:127.0.0.1"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return cert, key


class TLSListener:
    """Accepts TLS connections with a certificate of its own and does nothing else: a broker behind a wrong CA."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert, key)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.handshakes_failed = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.settimeout(5)
            try:
                with self.ctx.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                self.handshakes_failed += 1

    def close(self) -> None:
        self.sock.close()


def kafka_settings(tmp_path: Path, source: Path, brokers: str, **sink: object) -> dict:
    return {
        "data_dir": str(tmp_path / "state"), "shutdown_timeout": "30s",
        "sources": [{"type": "file", "paths": [str(source)]}],
        "sinks": [{"type": "kafka", "name": "kafka", "brokers": brokers, "topic": f"flowship-exit-{uuid.uuid4().hex[:8]}",
                   "flush_timeout": "3s", **sink}],
    }


def test_unreachable_kafka_with_short_flush_timeout_exits_4(tmp_path: Path, flows: list[bytes]) -> None:
    source = tmp_path / "flows.jsonl"
    source.write_bytes(b"\n".join(flows[:1000]) + b"\n")
    config = write_config(tmp_path / "c.yaml", kafka_settings(tmp_path, source, f"127.0.0.1:{closed_port()}"))
    code, log = export(config, tmp_path)
    block = summary_block(log)
    assert code == EXIT_UNDELIVERED, block
    assert delivered(log, "kafka") == 0
    assert "not delivered: 1000 rows" in block and "(exit 4)" in block
    # not acknowledged, so not checkpointed: the next run reads the 1,000 flows again
    assert not (tmp_path / "state" / "checkpoints" / "file.json").exists()


def test_kafka_behind_a_wrong_ca_exits_4(tmp_path: Path, flows: list[bytes]) -> None:
    server_cert, server_key = make_cert(tmp_path, "broker")
    other_ca, _ = make_cert(tmp_path, "other-ca")
    listener = TLSListener(server_cert, server_key)
    try:
        source = tmp_path / "flows.jsonl"
        source.write_bytes(b"\n".join(flows[:1000]) + b"\n")
        config = write_config(tmp_path / "c.yaml", kafka_settings(
            tmp_path, source, f"127.0.0.1:{listener.port}", security_protocol="ssl",
            ssl_ca_location=str(other_ca)))
        code, log = export(config, tmp_path)
    finally:
        listener.close()
    block = summary_block(log)
    assert code == EXIT_UNDELIVERED, block
    assert listener.handshakes_failed > 0, "the client never tried the TLS handshake"
    assert "certificate verify failed" in log
    assert delivered(log, "kafka") == 0
    assert "not delivered: 1000 rows" in block


def test_sigterm_with_a_sink_still_busy_at_the_deadline_exits_4(tmp_path: Path, flows: list[bytes]) -> None:
    """No buffer, broker unreachable: after SIGTERM the flush outlives shutdown_timeout; the flows are in no buffer."""
    source = tmp_path / "flows.jsonl"
    source.write_bytes(b"\n".join(flows[:1000]) + b"\n")
    settings = kafka_settings(tmp_path, source, f"127.0.0.1:{closed_port()}", flush_timeout="120s")
    settings["shutdown_timeout"] = "1s"
    config = write_config(tmp_path / "c.yaml", settings)
    proc = subprocess.Popen([sys.executable, "-m", "flowship.cli", "export", "--config", str(config),
                             "--no-progress"], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        time.sleep(3)  # the input is read; the sink waits for a broker that is not there
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        took = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            proc.kill()
    block = summary_block(err.decode(errors="replace"))
    assert proc.returncode == EXIT_UNDELIVERED, block
    assert took < 15, f"the shutdown deadline (1s) did not bound the stop: {took:.1f}s"
    assert "flowship: stopped" in block and "still busy at the shutdown deadline" in block
    assert "not delivered: 1000 rows" in block


def test_progress_line_shows_what_each_sink_has_left() -> None:
    """While the sinks drain at the end of the input, the progress line says what it waits for."""
    from flowship.metrics import Metrics
    from flowship.progress import Progress

    metrics = Metrics()
    metrics.flows_in("file").inc(1000)
    metrics.flows_out("es").inc(400)
    metrics.flows_out("parquet").inc(1000)
    line = Progress(metrics, ["es", "parquet"], pending=lambda: {"es": 600, "parquet": 0}).line()
    assert "es 400 (left 600)" in line and "parquet 1,000 |" in line
