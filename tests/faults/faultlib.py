"""Helpers of the fault tests: own server instances, flowship processes, and reading every sink back.

The fault tests stop, restart and slow down servers, so they never touch the
shared development servers: :class:`FaultServers` runs its own Kafka,
OpenSearch and VictoriaLogs through ``deploy/dev/servers`` with a private
``FLOWSHIP_RUN`` directory and ports of their own. Everything a test checks
is read back from where a user would read it: Parquet with DuckDB, the Kafka
topic with a consumer, OpenSearch with ``_count`` and a scroll over ``_id``,
VictoriaLogs with LogsQL, and a disk buffer's segment files as the exporter
itself would replay them.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from flowgen_input import generate_lines

REPO = Path(__file__).resolve().parents[2]
SERVERS = REPO / "deploy" / "dev" / "servers"
RUNNER = Path(__file__).resolve().parent / "export_with_metrics.py"


# ---------------------------------------------------------------------------------------------
# Servers of our own
# ---------------------------------------------------------------------------------------------

def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(method: str, url: str, body: Any = None, timeout: float = 60.0) -> tuple[int, Any]:
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw, status = resp.read(), resp.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read(), exc.code
    try:
        return status, (orjson.loads(raw) if raw else None)
    except orjson.JSONDecodeError:
        return status, raw.decode("utf-8", "replace")


@dataclass
class FaultServers:
    """Kafka, OpenSearch and VictoriaLogs started for the fault tests only."""

    run_dir: Path
    ports: dict[str, int]
    log: list[str] = field(default_factory=list)
    # Addresses, from the ports.
    kafka: str = field(init=False)
    opensearch: str = field(init=False)
    victorialogs: str = field(init=False)
    loki_push: str = field(init=False)

    @property
    def env(self) -> dict[str, str]:
        p = self.ports
        return {**os.environ, "FLOWSHIP_RUN": str(self.run_dir),
                "FLOWSHIP_KAFKA_PORT": str(p["kafka"]), "FLOWSHIP_KAFKA_CONTROLLER_PORT": str(p["kafka_controller"]),
                "FLOWSHIP_OPENSEARCH_PORT": str(p["opensearch"]),
                "FLOWSHIP_OPENSEARCH_TRANSPORT_PORT": str(p["opensearch_transport"]),
                "FLOWSHIP_VICTORIALOGS_PORT": str(p["victorialogs"])}

    def __post_init__(self) -> None:
        self.kafka = f"127.0.0.1:{self.ports['kafka']}"
        self.opensearch = f"http://127.0.0.1:{self.ports['opensearch']}"
        self.victorialogs = f"http://127.0.0.1:{self.ports['victorialogs']}"
        self.loki_push = f"{self.victorialogs}/insert/loki/api/v1/push"

    NAMES = ("kafka", "opensearch", "victorialogs")  # no names means these, not every dev server

    def _servers(self, verb: str, *names: str, timeout: float = 600) -> subprocess.CompletedProcess:
        names = names or self.NAMES
        proc = subprocess.run([str(SERVERS), verb, *names], capture_output=True, text=True, timeout=timeout,
                              env=self.env, cwd=REPO)
        self.log.append(f"$ deploy/dev/servers {verb} {' '.join(names)} -> {proc.returncode}\n"
                        f"{proc.stdout}{proc.stderr}")
        return proc

    def start(self, *names: str) -> None:
        """Start (or restart after a stop) and wait until each answers; fail the test if one cannot."""
        proc = self._servers("start", *names)
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-20:])
            pytest.fail(f"the fault tests' own servers ({', '.join(names) or 'all'}) did not start with "
                        f"FLOWSHIP_RUN={self.run_dir} and ports {self.ports}:\n{tail}\n"
                        "Check `deploy/dev/servers install` works, and that nothing else listens on these "
                        "ports (override them with FLOWSHIP_FAULTS_PORTS=kafka,controller,opensearch,"
                        "transport,victorialogs).", pytrace=False)

    def stop(self, *names: str) -> None:
        proc = self._servers("stop", *names, timeout=120)
        if proc.returncode != 0:
            pytest.fail(f"`deploy/dev/servers stop {' '.join(names)}` failed:\n{proc.stdout}{proc.stderr}",
                        pytrace=False)


# ---------------------------------------------------------------------------------------------
# Configs and flowship processes
# ---------------------------------------------------------------------------------------------

def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def network_sinks(servers: FaultServers, tag: str, buffer_dir: Path | None, *, kafka_queue: int | None = None,
                  suffix: str = "") -> list[dict]:
    """A kafka, an elasticsearch (OpenSearch) and a loki (VictoriaLogs) sink named after ``tag``.

    With ``buffer_dir`` each gets a disk buffer there; retries back off at most
    1 s so that a server coming back is noticed at once.
    """
    retry = {"initial_backoff": "100ms", "max_backoff": "1s"}
    kafka: dict[str, Any] = {"type": "kafka", "name": f"kafka{suffix}", "brokers": servers.kafka,
                             "topic": f"faults.{tag}{suffix}", "create_topic": {"partitions": 3},
                             "message_timeout": "600s"}
    if kafka_queue:
        kafka["queue_max_messages"] = kafka_queue
    sinks = [
        kafka,
        {"type": "elasticsearch", "name": f"elasticsearch{suffix}", "url": servers.opensearch,
         "data_stream": f"logs-flowship.{tag}{suffix}-default",
         "aggregates_data_stream": f"logs-flowship.{tag}{suffix}agg-default", "retry": retry},
        {"type": "loki", "name": f"loki{suffix}", "url": servers.loki_push,
         "static_labels": {"job": "flowship", "run": f"{tag}{suffix}"}, "retry": retry},
    ]
    if buffer_dir is not None:
        for sink in sinks:
            sink["buffer"] = {"type": "disk", "path": str(buffer_dir / sink["name"]), "max_bytes": "1GiB"}
    return sinks


def flowship(*args: str) -> list[str]:
    return [sys.executable, "-m", "flowship.cli", "--log-format", "json", *args]


def spawn(cmd: list[str], log_path: Path, cwd: Path) -> subprocess.Popen:
    """Start a process with stderr (the JSON log) appended to ``log_path``."""
    log = open(log_path, "ab")  # noqa: SIM115 - handed to the child
    try:
        return subprocess.Popen(cmd, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                                env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"})
    finally:
        log.close()


def spawn_export(config: Path, log_path: Path, metrics: str | None = None, dump: Path | None = None) -> subprocess.Popen:
    """``flowship export --config`` (or the same run plus a final metrics dump when ``dump`` is given)."""
    if dump is not None:
        cmd = [sys.executable, str(RUNNER), "--config", str(config), "--dump", str(dump)]
    else:
        cmd = flowship("export", "--config", str(config), "--no-progress")
    if metrics:
        cmd += ["--metrics", metrics]
    return spawn(cmd, log_path, config.parent)


def stop_process(proc: subprocess.Popen) -> None:
    """End a process this test started (SIGKILL), if it still runs."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)


class MonitoredExport:
    """``flowship export`` serving /metrics on a free port, ended (SIGKILL if still running) on leaving ``with``.

    ``proc``, ``address`` and ``log`` are what a test asserts on; :meth:`samples` scrapes the metrics and
    :meth:`wait_for` polls, failing with the log's tail if the process exits first.
    """

    def __init__(self, config: Path, log: Path, dump: Path | None = None) -> None:
        self.address = f"127.0.0.1:{free_port()}"
        self.log = log
        self.proc = spawn_export(config, log, metrics=self.address, dump=dump)

    def __enter__(self) -> MonitoredExport:
        return self

    def __exit__(self, *exc: object) -> None:
        stop_process(self.proc)

    def samples(self) -> dict[tuple[str, tuple], float]:
        return scrape(self.address)

    def wait_for(self, what: str, predicate: Callable[[], Any], timeout: float, interval: float = 0.25) -> Any:
        return wait_for(what, predicate, timeout, interval, proc=self.proc, log_path=self.log)


def log_events(log_path: Path) -> list[dict]:
    """The JSON log lines of a flowship process (other lines are skipped)."""
    out = []
    for line in log_path.read_bytes().splitlines():
        if line.startswith(b"{"):
            try:
                out.append(orjson.loads(line))
            except orjson.JSONDecodeError:
                continue
    return out


def scrape(address: str) -> dict[tuple[str, tuple], float]:
    """Samples of a flowship /metrics endpoint: (name, sorted label items) -> value; {} if it does not answer."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except (OSError, urllib.error.URLError):
        return {}
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_for(what: str, predicate, timeout: float, interval: float = 0.25, proc: subprocess.Popen | None = None,
             log_path: Path | None = None):  # noqa: ANN001
    """Poll until ``predicate()`` is truthy; fail naming ``what`` (and the process log's tail) otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            value = predicate()
            if value:
                return value
            pytest.fail(f"flowship exited (code {proc.returncode}) while waiting for {what}"
                        + (f"; log tail:\n{tail(log_path)}" if log_path else ""), pytrace=False)
        if time.monotonic() > deadline:
            pytest.fail(f"gave up after {timeout:.0f}s waiting for {what}"
                        + (f"; log tail:\n{tail(log_path)}" if log_path else ""), pytrace=False)
        time.sleep(interval)


def tail(log_path: Path | None, lines: int = 25) -> str:
    if log_path is None or not log_path.exists():
        return ""
    return "\n".join(line[:400] for line in log_path.read_text(errors="replace").splitlines()[-lines:])


# ---------------------------------------------------------------------------------------------
# Input
# ---------------------------------------------------------------------------------------------

def generate_input(path: Path, flows: int) -> list[str]:
    """``bench/flowgen.py`` writes ``flows`` Hubble JSON lines; returns their uuids in line order."""
    return [orjson.loads(line)["flow"]["uuid"] for line in generate_lines(path, flows)]


# ---------------------------------------------------------------------------------------------
# Reading every sink back
# ---------------------------------------------------------------------------------------------

def parquet_files(root: Path) -> set[Path]:
    return set(root.glob("flows/dt=*/hour=*/*.parquet"))


def parquet_uuids(files) -> list[str]:  # noqa: ANN001
    import pyarrow.parquet as pq

    out: list[str] = []
    for f in sorted(files):
        out.extend(pq.read_table(f, columns=["uuid"]).column("uuid").to_pylist())
    return out


def parquet_duckdb_counts(root: Path) -> tuple[int, int]:
    """(rows, distinct uuids) as an analyst would count them with DuckDB."""
    import duckdb

    rows = duckdb.sql(f"select count(*), count(distinct uuid) from read_parquet('{root}/flows/**/*.parquet', "
                      "hive_partitioning=true)").fetchall()
    return int(rows[0][0]), int(rows[0][1])


class KafkaTopicReader:
    """Reads a topic incrementally from the beginning: each call returns what arrived since the last."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        from confluent_kafka import Consumer

        self.topic = topic
        self.consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"faults-reader-{os.getpid()}-{topic}",
                                  "enable.auto.commit": False, "auto.offset.reset": "earliest",
                                  "enable.partition.eof": False})
        self.next: dict[int, int] = {}

    def _partitions(self) -> list[int]:
        meta = self.consumer.list_topics(self.topic, timeout=30)
        info = meta.topics.get(self.topic)
        if info is None or info.error is not None:
            return []
        return sorted(info.partitions)

    def read_new(self, timeout: float = 120.0) -> list[str]:
        """uuids (from the Hubble JSON values) of every message up to the current end of each partition."""
        from confluent_kafka import TopicPartition

        ends = {}
        for p in self._partitions():
            _low, high = self.consumer.get_watermark_offsets(TopicPartition(self.topic, p), timeout=30)
            self.next.setdefault(p, 0)
            if high > self.next[p]:
                ends[p] = high
        if not ends:
            return []
        self.consumer.assign([TopicPartition(self.topic, p, self.next[p]) for p in ends])
        out: list[str] = []
        deadline = time.monotonic() + timeout
        while any(self.next[p] < end for p, end in ends.items()):
            if time.monotonic() > deadline:
                raise AssertionError(f"could not read {self.topic} up to {ends} (at {self.next})")
            for msg in self.consumer.consume(num_messages=20000, timeout=1.0):
                if msg.error() is not None:
                    continue
                p = msg.partition()
                if msg.offset() < self.next[p] or p not in ends or msg.offset() >= ends[p]:
                    continue
                self.next[p] = msg.offset() + 1
                out.append(orjson.loads(msg.value())["flow"]["uuid"])
        self.consumer.unassign()
        return out

    def close(self) -> None:
        self.consumer.close()


def opensearch_count(url: str, stream: str) -> int:
    http_json("POST", f"{url}/{stream}/_refresh")
    status, body = http_json("GET", f"{url}/{stream}/_count")
    if status == 404:
        return 0
    assert status == 200, body
    return int(body["count"])


def opensearch_ids(url: str, stream: str) -> list[str]:
    """Every document ``_id`` of a data stream, with a scroll (the sink's ``_id`` is the flow uuid)."""
    http_json("POST", f"{url}/{stream}/_refresh")
    status, body = http_json("POST", f"{url}/{stream}/_search?scroll=2m",
                             {"size": 10000, "_source": False, "sort": ["_doc"], "query": {"match_all": {}}})
    if status == 404:
        return []
    assert status == 200, body
    ids: list[str] = []
    while True:
        hits = body["hits"]["hits"]
        if not hits:
            break
        ids.extend(h["_id"] for h in hits)
        status, body = http_json("POST", f"{url}/_search/scroll", {"scroll": "2m", "scroll_id": body["_scroll_id"]})
        assert status == 200, body
    http_json("DELETE", f"{url}/_search/scroll", {"scroll_id": body.get("_scroll_id")})
    return ids


def logsql(url: str, query: str, timeout: float = 120.0) -> list[dict]:
    data = urllib.parse.urlencode({"query": query}).encode()
    with urllib.request.urlopen(urllib.request.Request(f"{url}/select/logsql/query", data=data),
                                timeout=timeout) as resp:
        return [orjson.loads(line) for line in resp.read().splitlines() if line.strip()]


def victorialogs_count(url: str, run: str) -> int:
    rows = logsql(url, f'{{run="{run}"}} | stats count() c')
    return int(rows[0]["c"]) if rows else 0


def victorialogs_uuids(url: str, run: str, expect_at_least: int, timeout: float = 60.0) -> list[tuple[str, str]]:
    """(structured-metadata uuid, uuid inside the Hubble JSON line) of every entry of a run.

    VictoriaLogs makes pushed entries searchable about a second later, so this
    waits until the count reaches ``expect_at_least`` and then stops changing.
    """
    deadline = time.monotonic() + timeout
    last = -1
    while time.monotonic() < deadline:
        n = victorialogs_count(url, run)
        if n >= expect_at_least and n == last:
            break
        last = n
        time.sleep(1.5)
    rows = logsql(url, f'{{run="{run}"}} | fields uuid, flow.uuid')
    return [(r.get("uuid", ""), r.get("flow.uuid", "")) for r in rows]


def buffer_uuids(directory: Path) -> list[str]:
    """uuids of the rows a disk buffer would replay: every record after its acknowledged position that checks out."""
    from flowship.pipeline.disk_buffer import pending_batches

    return [u for batch in pending_batches(directory) for u in batch.column("uuid").to_pylist()]


def checkpoint_line(data_dir: Path, input_path: Path, source: str = "file") -> int:
    """Lines of ``input_path`` the file source has checkpointed (0 before the first checkpoint)."""
    path = data_dir / "checkpoints" / f"{source}.json"
    if not path.exists():
        return 0
    state = orjson.loads(path.read_bytes())
    files = state.get("files", {})
    if state.get("version") == 2:  # keyed by content fingerprint, each entry naming its path
        return max((int(e.get("line", 0)) for e in files.values() if e.get("path") == str(input_path)), default=0)
    return int(files.get(str(input_path), {}).get("line", 0))


def duplicates(values: list[str]) -> int:
    return len(values) - len(set(values))


# ---------------------------------------------------------------------------------------------
# Memory of a process
# ---------------------------------------------------------------------------------------------

class RssSampler:
    """Samples VmRSS (and the kernel's VmHWM peak) of a process every ``interval`` seconds."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[int] = []
        self.hwm = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _read(self) -> tuple[int, int] | None:
        try:
            text = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return None
        values = {}
        for line in text.splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, rest = line.split(":", 1)
                values[key] = int(rest.split()[0]) * 1024
        if "VmRSS" not in values:
            return None  # a zombie
        return values["VmRSS"], values.get("VmHWM", 0)

    def _run(self) -> None:
        while not self._stop.is_set():
            got = self._read()
            if got is None:
                return
            self.samples.append(got[0])
            self.hwm = max(self.hwm, got[1])
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    @property
    def peak(self) -> int:
        return max([self.hwm, *self.samples]) if self.samples else self.hwm


# ---------------------------------------------------------------------------------------------
# A TCP proxy that can be slowed down or made to refuse
# ---------------------------------------------------------------------------------------------

class FaultProxy:
    """TCP proxy on 127.0.0.1 in front of a real server, for slow-sink and stalled-sink faults.

    ``rate`` limits the client→server direction (request bodies) to that many
    bytes per second across all connections (None: unlimited). ``down()``
    closes every connection and makes new ones fail at once (the server looks
    stopped); ``up()`` forwards again.
    """

    def __init__(self, target_port: int, rate: float | None = None) -> None:
        self.target = ("127.0.0.1", target_port)
        self.rate = rate
        self._down = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._allowance = 0.0
        self._last = time.monotonic()
        self.forwarded = 0
        self.refused = 0
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, name="fault-proxy", daemon=True)
        self._thread.start()

    def set_rate(self, rate: float | None) -> None:
        self.rate = rate

    def down(self) -> None:
        self._down.set()
        with self._lock:
            conns, self._conns = self._conns, set()
        for c in conns:
            _close(c)

    def up(self) -> None:
        self._down.clear()

    def close(self) -> None:
        self._stop.set()
        self.down()
        self._thread.join(timeout=5)
        self._listener.close()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self._down.is_set():
                self.refused += 1
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                _close(client)  # RST: like a port nobody listens on
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                _close(client)
                continue
            with self._lock:
                self._conns.update((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _throttle(self, n: int) -> None:
        while self.rate and not self._down.is_set():
            with self._lock:
                now = time.monotonic()
                self._allowance = min(self.rate, self._allowance + (now - self._last) * self.rate)
                self._last = now
                if self._allowance >= n or self._allowance >= self.rate:
                    self._allowance -= n
                    return
                wait = (n - self._allowance) / self.rate
            time.sleep(min(wait, 0.05))

    def _pump(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        try:
            while True:
                chunk = src.recv(16384 if upstream and self.rate else 65536)
                if not chunk:
                    break
                if upstream:
                    self._throttle(len(chunk))
                if self._down.is_set():
                    break
                dst.sendall(chunk)
                if upstream:
                    self.forwarded += len(chunk)
        except OSError:
            pass
        finally:
            with self._lock:
                self._conns.discard(src)
                self._conns.discard(dst)
            _close(src)
            _close(dst)


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        s.close()
    except OSError:
        pass
