"""``flowship history``: the real hubble CLI against an archive, checked against DuckDB over the same Parquet.

The archive is made the way users make one: ``flowship export`` of recorded Hubble flows (several days,
many hour partitions) and of generated flows moved to the last hours (so ``--since 24h`` means something)
into a local ``parquet`` sink, several files per hour. Every answer of the server is compared with a
DuckDB SQL query over the Parquet files: the same uuids, in the same (time, uuid) order.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import grpc
import orjson
import pytest
import yaml
from flowgen_input import generate_lines
from gotools import go_tool

from flowship.proto.observer import observer_pb2, observer_pb2_grpc

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "agent"))  # make_pki

GENERATED = 4000


def flowship(*args: str) -> list[str]:
    return [sys.executable, "-m", "flowship.cli", "--log-format", "json", *args]


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), **extra}


def shift_times(lines: list[bytes], newest: datetime) -> list[bytes]:
    """The flows moved by whole seconds so that the newest is at ``newest`` (nanoseconds kept)."""
    def parse(text: str) -> tuple[datetime, str]:
        seconds, _, fraction = text.rstrip("Z").partition(".")
        return datetime.fromisoformat(seconds).replace(tzinfo=UTC), fraction

    objs = [orjson.loads(line) for line in lines]
    last = max(parse(o["flow"]["time"])[0] for o in objs)
    delta = timedelta(seconds=int((newest - last).total_seconds()))
    out = []
    for o in objs:
        moment, fraction = parse(o["flow"]["time"])
        stamp = (moment + delta).strftime("%Y-%m-%dT%H:%M:%S") + (f".{fraction}" if fraction else "") + "Z"
        o["flow"]["time"] = stamp
        o["time"] = stamp
        out.append(orjson.dumps(o))
    return out


def export(tmp: Path, inputs: list[Path], sink: dict, extra_env: dict[str, str] | None = None) -> None:
    config = tmp / "export.yaml"
    config.write_text(yaml.safe_dump({
        "node_name": "archive-node", "data_dir": str(tmp / "state"),
        "sources": [{"type": "file", "paths": [str(p) for p in inputs]}],
        "sinks": [{"type": "parquet", "max_file_rows": 700, **sink}]}))
    proc = subprocess.run(flowship("export", "--config", str(config), "--no-progress"), capture_output=True,
                          timeout=300, env=env(**(extra_env or {})), cwd=tmp)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]


class History:
    """A ``flowship history`` process; ``address`` is what it printed once it listens."""

    def __init__(self, *args: str, extra_env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(flowship("history", *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env(**(extra_env or {})))
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line.startswith("listening on "):
            self.proc.kill()
            pytest.fail(f"flowship history did not start: {line}{self.proc.communicate(timeout=30)[1][-3000:]}")
        self.address = line.split()[-1]

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(30) == 0


@pytest.fixture(scope="module")
def hubble_cli() -> str:
    return go_tool("build-hubble-cli")


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory, fixture_files: list[Path]) -> Path:
    tmp = tmp_path_factory.mktemp("history")
    generated = tmp / "generated.jsonl"
    lines = generate_lines(generated, GENERATED)
    generated.write_bytes(b"\n".join(shift_times(lines, datetime.now(UTC) - timedelta(hours=2))) + b"\n")
    export(tmp, [*fixture_files, generated], {"path": str(tmp / "archive")})
    return tmp / "archive"


@pytest.fixture(scope="module")
def server(archive: Path) -> Iterator[History]:
    history = History("--archive", str(archive), "--listen", "127.0.0.1:0")
    yield history
    history.stop()


def sql(archive: Path, query: str) -> list[tuple]:
    """``query`` with ``flows`` standing for every Parquet file of the archive."""
    source = f"read_parquet('{archive}/flows/**/*.parquet', hive_partitioning=false)"
    return duckdb.sql(f"with flows as (select * from {source}) {query}").fetchall()


def sql_uuids(archive: Path, where: str = "true", limit: str = "") -> list[str]:
    return [r[0] for r in sql(archive, f"select uuid from flows where {where} order by time, uuid {limit}")]


def ns(moment: int) -> str:
    """An RFC 3339 time with nanoseconds, as ``hubble observe --since/--until`` takes it."""
    seconds, nanos = divmod(moment, 10**9)
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{nanos:09d}Z"


def observe(cli: str, server: History, *args: str) -> list[dict]:
    proc = subprocess.run([cli, "observe", "--server", server.address, "-o", "jsonpb", *args], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


def uuids(responses: list[dict]) -> list[str]:
    return [r["flow"]["uuid"] for r in responses]


@pytest.fixture(scope="module")
def window(archive: Path) -> tuple[int, int]:
    """Flow times at 10 % and 90 % of the recorded fixtures: bounds that fall on flows (inclusive ends)."""
    times = [r[0] for r in sql(archive, "select epoch_ns(time) from flows where time < '2025-01-01' order by time")]
    return times[len(times) // 10], times[len(times) * 9 // 10]


def between(window: tuple[int, int]) -> str:
    return f"epoch_ns(time) between {window[0]} and {window[1]}"


# ---------------------------------------------------------------------------------------------
# GetFlows through the hubble CLI
# ---------------------------------------------------------------------------------------------

def test_the_seed_question_since_24h_namespace_dropped(hubble_cli, server, archive) -> None:
    """``hubble observe --since 24h -n production --verdict DROPPED``: who was denied in production today."""
    got = observe(hubble_cli, server, "--since", "24h", "-n", "production", "--verdict", "DROPPED")
    since = int((datetime.now(UTC) - timedelta(hours=24)).timestamp() * 1e9)
    expected = sql_uuids(archive, f"epoch_ns(time) >= {since} and verdict = 'DROPPED' "
                                  "and (src_namespace = 'production' or dst_namespace = 'production')")
    assert len(expected) > 0
    assert uuids(got) == expected
    assert all(r["flow"]["verdict"] == "DROPPED" for r in got)


def test_a_time_range_across_partitions_comes_in_time_order(hubble_cli, server, archive, window) -> None:
    got = observe(hubble_cli, server, "--since", ns(window[0]), "--until", ns(window[1]))
    expected = sql_uuids(archive, between(window))
    assert len(expected) > 500
    assert uuids(got) == expected
    hours = sql(archive, f"select count(distinct date_trunc('hour', time)) from flows where {between(window)}")[0][0]
    assert hours >= 3  # the answer was assembled across partitions


def test_last_and_first_in_a_range(hubble_cli, server, archive, window) -> None:
    rng = ("--since", ns(window[0]), "--until", ns(window[1]))
    expected = sql_uuids(archive, between(window))
    assert uuids(observe(hubble_cli, server, *rng, "--last", "7")) == expected[-7:]
    assert uuids(observe(hubble_cli, server, *rng, "--first", "7")) == expected[:7]
    # across the whole archive: the newest and the oldest flows
    assert uuids(observe(hubble_cli, server, "--last", "25")) == sql_uuids(archive)[-25:]
    assert uuids(observe(hubble_cli, server, "--first", "3")) == sql_uuids(archive)[:3]


def test_last_n_with_a_filter_reaches_back_across_partitions(hubble_cli, server, archive) -> None:
    """The 5 newest drops lie in hours far apart: reading goes back hour by hour until it has 5."""
    expected = sql_uuids(archive, "verdict = 'DROPPED'")
    got = uuids(observe(hubble_cli, server, "--last", "5", "--verdict", "DROPPED"))
    assert got == expected[-5:]
    assert uuids(observe(hubble_cli, server, "--first", "4", "--verdict", "DROPPED")) == expected[:4]


def test_to_pod_and_namespace(hubble_cli, server, archive, window) -> None:
    got = observe(hubble_cli, server, "--since", ns(window[0]), "--until", ns(window[1]),
                  "--to-pod", "bookinfo/reviews")
    expected = sql_uuids(archive, f"{between(window)} and dst_namespace = 'bookinfo' "
                                  "and starts_with(dst_pod, 'reviews')")
    assert len(expected) > 0
    assert uuids(got) == expected
    got = observe(hubble_cli, server, "--since", ns(window[0]), "--until", ns(window[1]), "-n", "istio-system",
                  "--protocol", "tcp")
    expected = sql_uuids(archive, f"{between(window)} and l4_protocol = 'TCP' "
                                  "and (src_namespace = 'istio-system' or dst_namespace = 'istio-system')")
    assert len(expected) > 0
    assert uuids(got) == expected


def test_a_blacklist_from_not(hubble_cli, server, archive) -> None:
    """``--not -n kube-system``: the CLI sends a blacklist; flows with either side in kube-system are left out."""
    got = observe(hubble_cli, server, "--since", "24h", "--not", "-n", "kube-system")
    since = int((datetime.now(UTC) - timedelta(hours=24)).timestamp() * 1e9)
    expected = sql_uuids(archive, f"epoch_ns(time) >= {since} and coalesce(src_namespace, '') <> 'kube-system' "
                                  "and coalesce(dst_namespace, '') <> 'kube-system'")
    assert 0 < len(expected) < GENERATED
    assert uuids(got) == expected


def test_compact_output_asks_for_a_field_mask(hubble_cli, server) -> None:
    proc = subprocess.run([hubble_cli, "observe", "--server", server.address, "--last", "2", "--verdict", "DROPPED"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("DROPPED") == 2


# ---------------------------------------------------------------------------------------------
# Status, nodes, namespaces
# ---------------------------------------------------------------------------------------------

def test_status_counts_what_is_stored(hubble_cli, server, archive) -> None:
    count, nodes, oldest, newest = sql(archive, "select count(*), count(distinct node_name), min(epoch_ns(time)), "
                                                "max(epoch_ns(time)) from flows")[0]
    proc = subprocess.run([hubble_cli, "status", "--server", server.address], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "Healthcheck" in proc.stdout and "Ok" in proc.stdout
    assert f"Current/Max Flows: {count:,}/{count:,}" in proc.stdout
    assert f"Connected Nodes: {nodes}/{nodes}" in proc.stdout
    with grpc.insecure_channel(server.address) as channel:
        status = observer_pb2_grpc.ObserverStub(channel).ServerStatus(observer_pb2.ServerStatusRequest(), timeout=30)
        listed = observer_pb2_grpc.ObserverStub(channel).GetNodes(observer_pb2.GetNodesRequest(), timeout=30)
    assert status.num_flows == count and status.num_connected_nodes.value == nodes
    assert f"from {ns(oldest)} to {ns(newest)}" in status.version  # the time span, to the nanosecond
    per_node = dict(sql(archive, "select node_name, count(*) from flows where node_name is not null group by 1"))
    assert {n.name: n.num_flows for n in listed.nodes} == per_node


def test_namespaces(hubble_cli, server, archive) -> None:
    proc = subprocess.run([hubble_cli, "list", "namespaces", "--server", server.address], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    expected = {r[0] for r in sql(archive, "select src_namespace from flows union select dst_namespace from flows")
                if r[0]}
    assert set(proc.stdout.split()[1:]) == expected  # after the NAMESPACE header
    assert {"production", "kube-system", "bookinfo"} <= expected


# ---------------------------------------------------------------------------------------------
# gRPC details: field_mask, whitelist + blacklist, follow, invalid filters
# ---------------------------------------------------------------------------------------------

def get_flows(server: History, request: observer_pb2.GetFlowsRequest) -> list[observer_pb2.GetFlowsResponse]:
    with grpc.insecure_channel(server.address) as channel:
        return list(observer_pb2_grpc.ObserverStub(channel).GetFlows(request, timeout=60))


def test_field_mask(server, archive) -> None:
    request = observer_pb2.GetFlowsRequest(number=4)
    request.field_mask.paths.extend(["uuid", "verdict", "source.namespace"])
    got = get_flows(server, request)
    assert [r.flow.uuid for r in got] == sql_uuids(archive)[-4:]
    for r in got:
        fields = {f.name for f, _ in r.flow.ListFields()}
        assert fields <= {"uuid", "verdict", "source"} and "uuid" in fields
        assert {f.name for f, _ in r.flow.source.ListFields()} <= {"namespace"}


def test_whitelist_and_blacklist_together(server, archive, window) -> None:
    from flowship.proto.flow import flow_pb2

    request = observer_pb2.GetFlowsRequest(
        whitelist=[flow_pb2.FlowFilter(source_pod=["bookinfo/"]), flow_pb2.FlowFilter(http_status_code=["5+"],
                                                                                      event_type=[{"type": 129}])],
        blacklist=[flow_pb2.FlowFilter(destination_port=["9080"])])
    request.since.FromNanoseconds(window[0])
    request.until.FromNanoseconds(window[1])
    got = get_flows(server, request)
    expected = sql_uuids(archive, f"{between(window)} and (src_namespace = 'bookinfo' or http_code >= 500) "
                                  "and coalesce(dst_port, 0) <> 9080")
    assert len(expected) > 0
    assert [r.flow.uuid for r in got] == expected


def test_bad_requests_are_invalid_arguments(server) -> None:
    from flowship.proto.flow import flow_pb2

    with pytest.raises(grpc.RpcError) as first_and_follow:
        get_flows(server, observer_pb2.GetFlowsRequest(follow=True, first=True, number=1))
    assert first_and_follow.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as bad:
        get_flows(server, observer_pb2.GetFlowsRequest(whitelist=[flow_pb2.FlowFilter(http_status_code=["99"])]))
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "99" in (bad.value.details() or "")


def test_streams_are_capped_so_short_calls_find_a_thread(archive) -> None:
    from flowship.history import HistoryConfig, HistoryServer

    srv = HistoryServer(HistoryConfig(archive=str(archive), address="127.0.0.1:0", max_workers=3))
    port = srv.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = observer_pb2_grpc.ObserverStub(channel)
            follower = stub.GetFlows(observer_pb2.GetFlowsRequest(follow=True, number=1), timeout=60)
            next(follower)  # the stream is open and holds the one slot
            with pytest.raises(grpc.RpcError) as refused:
                next(stub.GetFlows(observer_pb2.GetFlowsRequest(number=1), timeout=30))
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert stub.ServerStatus(observer_pb2.ServerStatusRequest(), timeout=30).num_flows > 0
            follower.cancel()
    finally:
        srv.stop(0)


def test_follow_continues_with_files_published_later(hubble_cli, tmp_path, fixture_files) -> None:
    """``hubble observe -f --last 2``: the two newest stored flows, then the flows of files published later."""
    export(tmp_path, fixture_files[:1], {"path": str(tmp_path / "archive")})
    archive = tmp_path / "archive"
    history = History("--archive", str(archive), "--listen", "127.0.0.1:0")
    observer = subprocess.Popen([hubble_cli, "observe", "--server", history.address, "-o", "jsonpb", "-f",
                                 "--last", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in observer.stdout or []], daemon=True).start()

    def read(n: int) -> list[str]:
        return [json.loads(lines.get(timeout=60))["flow"]["uuid"] for _ in range(n)]

    try:
        assert read(2) == sql_uuids(archive)[-2:]
        later = tmp_path / "later.jsonl"
        generated = generate_lines(later, 60)
        later.write_bytes(b"\n".join(shift_times(generated, datetime.now(UTC) - timedelta(minutes=5))) + b"\n")
        export(tmp_path, [later], {"path": str(archive)})
        assert read(60) == sql_uuids(archive, "time > '2025-01-01'")
        assert lines.empty()
    finally:
        observer.terminate()
        observer.wait(10)
        history.stop()


# ---------------------------------------------------------------------------------------------
# The command line: errors, unix socket, TLS
# ---------------------------------------------------------------------------------------------

def test_a_missing_archive_is_a_usage_error(tmp_path) -> None:
    proc = subprocess.run(flowship("history", "--archive", str(tmp_path / "nowhere")), capture_output=True,
                          text=True, timeout=60, env=env())
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"flowship history: --archive {tmp_path / 'nowhere'}: no such directory (give the parquet sink's path)"]
    exposed = subprocess.run(flowship("history", "--archive", str(tmp_path), "--listen", "0.0.0.0:4255"),
                             capture_output=True, text=True, timeout=60, env=env())
    assert exposed.returncode == 2 and len(exposed.stderr.strip().splitlines()) == 1
    assert "reachable from other machines" in exposed.stderr


def test_a_busy_address_fails_the_start_and_an_empty_archive_is_served(server, tmp_path) -> None:
    busy = subprocess.run(flowship("history", "--archive", str(tmp_path), "--listen", server.address),
                          capture_output=True, text=True, timeout=60, env=env())
    assert busy.returncode == 1
    assert busy.stderr.strip().splitlines() == [
        f"flowship history: --listen: cannot listen on {server.address}: the address is already in use by another "
        "process (4244 is Cilium's Hubble server and 4245 Hubble Relay; choose another port)"]
    empty = History("--archive", str(tmp_path), "--listen", "127.0.0.1:0")  # a sink that has not written yet
    try:
        assert get_flows(empty, observer_pb2.GetFlowsRequest(number=10)) == []
        with grpc.insecure_channel(empty.address) as channel:
            status = observer_pb2_grpc.ObserverStub(channel).ServerStatus(observer_pb2.ServerStatusRequest(),
                                                                           timeout=30)
        assert status.num_flows == 0 and "no flows stored yet" in status.version
    finally:
        empty.stop()


def test_unix_socket_and_mtls(hubble_cli, archive, tmp_path) -> None:
    from certs import make_pki

    sock = tmp_path / "run" / "history.sock"
    history = History("--archive", str(archive), "--listen", f"unix://{sock}")
    try:
        assert oct(sock.stat().st_mode & 0o777) == "0o600"
        assert uuids(observe(hubble_cli, history, "--last", "3")) == sql_uuids(archive)[-3:]
    finally:
        history.stop()
    pki = make_pki(tmp_path, server_names="IP:127.0.0.1,DNS:hubble.local")
    history = History("--archive", str(archive), "--listen", "127.0.0.1:0", "--tls-cert", str(pki["server.crt"]),
                      "--tls-key", str(pki["server.key"]), "--tls-client-ca", str(pki["ca.crt"]))
    try:
        tls = ["--tls", "--tls-ca-cert-files", str(pki["ca.crt"]), "--tls-server-name", "hubble.local",
               "--tls-client-cert-file", str(pki["client.crt"]), "--tls-client-key-file", str(pki["client.key"])]
        assert uuids(observe(hubble_cli, history, "--last", "2", *tls)) == sql_uuids(archive)[-2:]
    finally:
        history.stop()


# ---------------------------------------------------------------------------------------------
# S3
# ---------------------------------------------------------------------------------------------

@pytest.mark.servers
def test_an_archive_on_s3(hubble_cli, tmp_path, fixture_files) -> None:
    """The aws layout on a private versitygw: the same answers as DuckDB over the objects read with pyarrow."""
    import pyarrow.dataset as ds
    from pyarrow import fs
    from s3server import S3Server, aws_env

    s3 = S3Server(tmp_path / "s3-server")
    s3.servers("start")
    try:
        bucket = s3.create_bucket("history")
        export(tmp_path, fixture_files, {"path": f"s3://{bucket}/archive", "layout": "aws", "cluster": "c1",
                                         "s3": {"endpoint_url": s3.endpoint}}, aws_env())
        s3fs = s3.filesystem()
        objects = [i.path for i in s3fs.get_file_info(fs.FileSelector(bucket, recursive=True))
                   if i.path.endswith(".parquet")]
        assert any("/cluster=c1/node=archive-node/year=" in o for o in objects)
        con = duckdb.connect()
        con.register("stored", ds.dataset(objects, format="parquet", filesystem=s3fs).to_table())
        drops = [r[0] for r in con.sql("select uuid from stored where verdict = 'DROPPED' "
                                       "order by time, uuid").fetchall()]
        every = [r[0] for r in con.sql("select uuid from stored order by time, uuid").fetchall()]
        history = History("--archive", f"s3://{bucket}/archive", "--listen", "127.0.0.1:0",
                          "--s3-endpoint", s3.endpoint, extra_env=aws_env())
        try:
            assert uuids(observe(hubble_cli, history, "--since", "2000-01-01T00:00:00Z", "--verdict",
                                 "DROPPED")) == drops
            assert uuids(observe(hubble_cli, history, "--last", "30")) == every[-30:]
        finally:
            history.stop()
        missing = subprocess.run(flowship("history", "--archive", "s3://no-such-bucket/x", "--s3-endpoint",
                                          s3.endpoint), capture_output=True, text=True, timeout=60, env=aws_env())
        assert missing.returncode == 2, missing.stderr
        assert "no-such-bucket" in missing.stderr and len(missing.stderr.strip().splitlines()) == 1
    finally:
        s3.servers("stop")


def test_an_export_killed_midway_to_s3_then_compacted_answers_like_duckdb(hubble_cli, tmp_path, s3) -> None:
    """The whole way a user takes: ``flowship export`` to a versitygw bucket, killed with SIGKILL midway and
    run again; ``flowship compact`` of the closed hours; then ``hubble observe`` against ``flowship history``
    on the bucket returns exactly what DuckDB returns over the same objects for the same filters."""
    import time

    import pyarrow.dataset as ds
    from pyarrow import fs
    from s3server import aws_env

    bucket = s3.create_bucket("killed-compacted")
    target = f"s3://{bucket}/archive"
    source = tmp_path / "flows.jsonl"
    lines = shift_times(generate_lines(source, 12000), datetime.now(UTC) - timedelta(hours=3))
    source.write_bytes(b"\n".join(lines) + b"\n")
    want = {orjson.loads(line)["flow"]["uuid"] for line in lines}
    config = tmp_path / "export.yaml"
    config.write_text(yaml.safe_dump({
        "node_name": "archive-node", "data_dir": str(tmp_path / "state"),
        "sources": [{"type": "file", "paths": [str(source)], "follow": False}],
        "sinks": [{"type": "parquet", "path": target, "layout": "aws", "cluster": "c1", "max_file_rows": 400,
                   "s3": {"endpoint_url": s3.endpoint}}]}))
    s3fs = s3.filesystem()

    def stored() -> list[str]:
        return [i.path for i in s3fs.get_file_info(fs.FileSelector(bucket, recursive=True))
                if i.type == fs.FileType.File and i.path.endswith(".parquet")]

    command = flowship("export", "--config", str(config), "--no-progress")
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env(**aws_env()))
    try:
        deadline = time.monotonic() + 120
        while len(stored()) < 3:
            assert first.poll() is None and time.monotonic() < deadline, "the export stored nothing to kill"
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    finally:
        if first.poll() is None:
            first.kill()
    assert len(stored()) * 400 < len(lines), "the first run finished before the kill: the test proves nothing"
    second = subprocess.run(command, capture_output=True, timeout=300, env=env(**aws_env()))
    assert second.returncode == 0, second.stderr.decode()[-3000:]
    compacted = subprocess.run(flowship("compact", target, "--s3-endpoint", s3.endpoint), capture_output=True,
                               text=True, timeout=300, env=env(**aws_env()))
    assert compacted.returncode == 0, compacted.stderr[-3000:]
    assert json.loads(compacted.stdout)["compacted"] >= 1
    objects = stored()
    assert all(o.rsplit("/", 1)[1].startswith("compacted-") for o in objects if "/hour=" in o), objects

    con = duckdb.connect()
    con.register("stored", ds.dataset(objects, format="parquet", filesystem=s3fs).to_table())
    assert {r[0] for r in con.sql("select uuid from stored").fetchall()} == want  # every flow is there

    def duck(where: str) -> list[str]:
        return [r[0] for r in con.sql(f"select uuid from stored where {where} order by time, uuid").fetchall()]

    history = History("--archive", target, "--listen", "127.0.0.1:0", "--s3-endpoint", s3.endpoint,
                      extra_env=aws_env())
    try:
        cases = [
            (["--since", "24h", "-n", "production", "--verdict", "DROPPED"],
             "(src_namespace = 'production' or dst_namespace = 'production') and verdict = 'DROPPED'"),
            (["--since", "24h", "--to-port", "5432"], "dst_port = 5432 and l4_protocol in ('TCP', 'UDP', 'SCTP')"),
            (["--since", "24h", "--from-pod", "payments/", "--verdict", "FORWARDED"],
             "src_namespace = 'payments' and verdict = 'FORWARDED'"),
        ]
        for args, where in cases:
            expected = duck(where)
            assert expected, f"{where}: the generated flows should match it"
            assert uuids(observe(hubble_cli, history, *args)) == expected, args
    finally:
        history.stop()


# ---------------------------------------------------------------------------------------------
# The two questions, answered from the archive with the hubble CLI
# ---------------------------------------------------------------------------------------------

def _endpoint(flow: dict, side: str) -> str:
    ep = flow.get(side, {})
    return f"{ep.get('namespace', '')}/{ep.get('pod_name', '')}"


def test_audit_denied_traffic(hubble_cli, server, archive) -> None:
    """Who tried what and was denied today: every drop grouped by source, destination, port and reason."""
    got: dict[tuple, int] = {}
    for r in observe(hubble_cli, server, "--since", "24h", "--verdict", "DROPPED"):
        flow = r["flow"]
        l4 = next(iter(flow.get("l4", {}).values()), {})
        key = (_endpoint(flow, "source"), _endpoint(flow, "destination"), l4.get("destination_port", 0),
               flow.get("drop_reason_desc", ""))
        got[key] = got.get(key, 0) + 1
    since = int((datetime.now(UTC) - timedelta(hours=24)).timestamp() * 1e9)
    rows = sql(archive, "select coalesce(src_namespace, '') || '/' || coalesce(src_pod, ''), "
                        "coalesce(dst_namespace, '') || '/' || coalesce(dst_pod, ''), coalesce(dst_port, 0), "
                        f"coalesce(drop_reason, ''), count(*) from flows where epoch_ns(time) >= {since} "
                        "and verdict = 'DROPPED' group by all")
    assert got == {tuple(r[:4]): r[4] for r in rows}
    assert any(reason == "POLICY_DENIED" for *_, reason in got)


def test_latency_isolation_per_hop(hubble_cli, server, archive) -> None:
    """Where the latency of production's call chains goes: the L7 latency of each hop, from the stored flows."""
    hops: dict[tuple[str, str], list[int]] = {}
    for r in observe(hubble_cli, server, "--since", "24h", "-n", "production", "--type", "l7"):
        flow = r["flow"]
        latency = int(flow.get("l7", {}).get("latency_ns", 0))
        if latency:
            hops.setdefault((_endpoint(flow, "source"), _endpoint(flow, "destination")), []).append(latency)
    since = int((datetime.now(UTC) - timedelta(hours=24)).timestamp() * 1e9)
    rows = sql(archive, "select coalesce(src_namespace, '') || '/' || coalesce(src_pod, ''), "
                        "coalesce(dst_namespace, '') || '/' || coalesce(dst_pod, ''), count(*), "
                        "sum(l7_latency_ns)::bigint from flows "
                        f"where epoch_ns(time) >= {since} and event_type = 129 and l7_latency_ns > 0 "
                        "and (src_namespace = 'production' or dst_namespace = 'production') group by all")
    expected = {(r[0], r[1]): (r[2], r[3]) for r in rows}
    assert len(expected) > 1
    assert {hop: (len(v), sum(v)) for hop, v in hops.items()} == expected
    slowest = max(expected, key=lambda hop: expected[hop][1] / expected[hop][0])
    assert slowest == max(hops, key=lambda hop: sum(hops[hop]) / len(hops[hop]))


# ---------------------------------------------------------------------------------------------
# The reader's own pieces
# ---------------------------------------------------------------------------------------------

def test_partition_hours_of_both_layouts() -> None:
    from flowship.history import partition_hour

    hour = int(datetime(2026, 12, 1, 13, tzinfo=UTC).timestamp()) // 3600
    assert partition_hour(["dt=2026-12-01", "hour=13"]) == hour
    assert partition_hour(["cluster=c", "node=n", "year=2026", "month=12", "day=01", "hour=13"]) == hour
    assert partition_hour(["somewhere", "else"]) is None
    assert partition_hour(["dt=yesterday", "hour=13"]) is None


PUSHDOWN_SPECS = [
    [{"verdict": ["DROPPED"]}],
    [{"source_pod": ["production/"], "verdict": ["DROPPED", "AUDIT"]}, {"destination_pod": ["production/"]}],
    [{"destination_pod": ["deathstar"]}],  # a bare name is namespace "default"
    [{"source_pod": ["xwing"]}, {"source_port": ["9080"]}],  # one filter without a namespace: no push-down
    [{"verdict": ["FORWARDED"]}, {"http_status_code": ["5+"], "event_type": [{"type": 129}]}],
    [{"destination_port": ["80", "53"], "verdict": ["FORWARDED"]}, {"source_port": ["53"]}],
    [{"traffic_direction": ["EGRESS"], "destination_identity": [2, 4]}, {"source_identity": [1]}],
]


@pytest.mark.parametrize("specs", PUSHDOWN_SPECS)
def test_the_pushed_down_scan_filter_never_loses_a_match(archive, specs) -> None:
    """The scan filter, for pyarrow (S3) and as DuckDB SQL (local), is a superset of what the compiler matches."""
    import pyarrow as pa
    import pyarrow.dataset as ds
    from google.protobuf.json_format import ParseDict

    from flowship.history import _pushdown, _pushdown_sql
    from flowship.model.flowfilter import compile_filter_set
    from flowship.model.schema import FLOW_SCHEMA
    from flowship.proto.flow import flow_pb2

    messages = [ParseDict(s, flow_pb2.FlowFilter()) for s in specs]
    table = ds.dataset(str(archive / "flows"), format="parquet", schema=FLOW_SCHEMA).to_table()
    batch = table.combine_chunks().to_batches()[0]
    matched = set(batch.filter(pa.array(compile_filter_set(messages).mask(batch))).column("uuid").to_pylist())
    everything = set(table["uuid"].to_pylist())
    expr = _pushdown(messages)
    kept = set(table.filter(expr).column("uuid").to_pylist()) if expr is not None else everything
    assert matched and matched <= kept
    where = _pushdown_sql(messages)
    assert (where is None) == (expr is None)
    if where is not None:
        source = f"read_parquet('{archive}/flows/**/*.parquet', hive_partitioning=false)"
        kept_sql = {r[0] for r in duckdb.execute(f"select uuid from {source} where {where[0]}", where[1]).fetchall()}
        assert kept_sql == kept  # both renderings keep the same rows


@pytest.mark.parametrize("specs", PUSHDOWN_SPECS)
def test_duckdb_and_pyarrow_scans_give_the_same_flows_in_the_same_order(archive, window, specs) -> None:
    """A local archive is read by DuckDB, an S3 one by pyarrow: for one query both return the same rows, every
    column equal, in (time, uuid) order, with the range's ends exact to the nanosecond."""
    import pyarrow as pa
    from google.protobuf.json_format import ParseDict

    import flowship.history as history
    from flowship.model.flowfilter import compile_filter_set
    from flowship.proto.flow import flow_pb2

    store = history.Archive(str(archive))
    whitelist = [ParseDict(s, flow_pb2.FlowFilter()) for s in specs]
    filters = compile_filter_set(whitelist)
    for since, until in ((None, None), window, (window[0] + 1, window[1] - 1)):
        files = store.files(since, until)
        local = list(store._ordered(files, since, until, whitelist, filters))
        scan = history._time_filter(since, until)
        narrowed = history._pushdown(whitelist)
        if narrowed is not None:
            scan = narrowed if scan is None else scan & narrowed
        reference = list(store._ordered_pyarrow(files, scan, filters))
        got = pa.Table.from_batches(local, schema=history.FLOW_SCHEMA)
        want = pa.Table.from_batches(reference, schema=history.FLOW_SCHEMA)
        assert got.num_rows == want.num_rows
        assert got.equals(want), [n for n in got.column_names if not got[n].equals(want[n])]
        times = got.column("time").cast(pa.int64()).to_pylist()
        assert times == sorted(times)
        if since is not None and times:
            assert since <= times[0] and times[-1] <= until


def test_files_written_before_a_column_existed_are_read_with_nulls(tmp_path) -> None:
    """An archive spans releases: a file without a newer column reads as null there (DuckDB's union by name)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    import flowship.history as history
    from flowship.model.schema import FLOW_SCHEMA

    hour = tmp_path / "flows" / "dt=2026-12-01" / "hour=10"
    hour.mkdir(parents=True)
    now = int(datetime(2026, 12, 1, 10, 30, tzinfo=UTC).timestamp()) * 10**9
    rows = {f.name: pa.nulls(2, f.type) for f in FLOW_SCHEMA}
    rows["time"] = pa.array([now, now + 1], FLOW_SCHEMA.field("time").type)
    rows["uuid"] = pa.array(["b", "a"])
    rows["verdict"] = pa.array(["DROPPED", "DROPPED"])
    rows["node_name"] = pa.array(["old-node", "old-node"])
    full = pa.table(rows, schema=FLOW_SCHEMA)
    pq.write_table(full.drop_columns(["dst_workload", "l7_latency_ns"]), hour / "old.parquet")
    pq.write_table(full.slice(0, 1).set_column(1, "uuid", pa.array(["c"])), hour / "new.parquet")
    got = pa.Table.from_batches(history.Archive(str(tmp_path)).select(None, None), schema=FLOW_SCHEMA)
    assert got.column("uuid").to_pylist() == ["b", "c", "a"]
    assert got.column("dst_workload").null_count == 3
    assert got.column("node_name").to_pylist() == ["old-node"] * 3


def test_a_damaged_file_fails_the_read_with_an_os_error(tmp_path, archive) -> None:
    """A truncated file (a disk error, a copy cut short) ends the query with an I/O error the server answers
    UNAVAILABLE with, naming the file; not a crash of the stream's thread."""
    import shutil

    import flowship.history as history

    shutil.copytree(archive, tmp_path / "copy")
    store = history.Archive(str(tmp_path / "copy"))
    victim = Path(store.list_files()[0].path)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    with pytest.raises(OSError, match=victim.name):
        list(store.select(None, None))


@pytest.mark.parametrize("newest_first", [False, True])
def test_hours_too_big_to_sort_in_memory_come_in_the_same_order_through_duckdb(archive, monkeypatch,
                                                                                newest_first) -> None:
    """An S3 hour past the in-memory sort limit is ordered by DuckDB (spilling): the same flows, the same order."""
    from google.protobuf.json_format import ParseDict

    import flowship.history as history
    from flowship.model.flowfilter import compile_filter_set
    from flowship.proto.flow import flow_pb2

    store = history.Archive(str(archive))
    whitelist = [ParseDict({"verdict": ["FORWARDED", "DROPPED"]}, flow_pb2.FlowFilter())]
    filters = compile_filter_set(whitelist)
    files = store.files(None, None)

    def uuids() -> list[str]:
        return [u for b in store._ordered_pyarrow(files, None, filters, newest_first=newest_first)
                for u in b.column("uuid").to_pylist()]

    in_memory = uuids()
    monkeypatch.setattr(history, "_SORT_IN_MEMORY_ROWS", 10)
    assert len(in_memory) > 100
    assert uuids() == in_memory
