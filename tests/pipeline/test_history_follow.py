"""``flowship history`` follow streams handed over from the archive to a live source: no gap, no duplicate.

One timeline of recorded Hubble flows, 100 ms apart over two minutes, is split the way it is in production:
a real ``parquet`` sink stored the flows up to the seam T (all but a few late ones, still unpublished), and
the live source — a flowship agent's Observer ring, or a Kafka topic a real kafka sink wrote — holds the
flows from T-30 s to T+60 s, partly published only after the client started following. Every client must
get each flow of the timeline exactly once.
"""

from __future__ import annotations

import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pyarrow as pa
import pytest

from flowship.agent.observer import ObserverConfig, ObserverServer
from flowship.config import parse
from flowship.history import HistoryConfig, HistoryServer
from flowship.history_live import KafkaLiveConfig, ObserverLiveConfig
from flowship.model.flowfilter import compile_filter_set
from flowship.model.hubble_decode import decode_lines
from flowship.pipeline.envelope import Envelope, Receipt
from flowship.proto.flow import flow_pb2
from flowship.proto.observer import observer_pb2, observer_pb2_grpc
from flowship.sinks.parquet import ParquetSink, ParquetSinkConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sinks"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import devservers  # noqa: E402
from helpers import make_ctx  # noqa: E402
from test_history import History, hubble_cli, ns  # noqa: E402, F401 - the module fixture is used here too

kafka = devservers.kafka_server
run_id = devservers.run_id

FLOWS = 1200
STEP_NS = 100_000_000  # 100 ms between flows
SEAM = 600  # the archive holds flows 0..600 (T = time of flow 600) ...
LIVE_FROM = 300  # ... the live source flows 300..1199 (T-30 s .. T+60 s)
LATE = (560, 575, 590)  # flows before T that the sink has not published yet: only the live source has them
WINDOW = 20.0


@pytest.fixture(scope="module")
def timeline(fixture_files: list[Path]) -> pa.RecordBatch:
    """FLOWS distinct recorded flows of one node, re-timed 100 ms apart and ending a few minutes ago."""
    seen: set[str] = set()
    rows: list[pa.RecordBatch] = []
    for path in fixture_files:
        batch = decode_lines(path.read_bytes()).batch
        uuids = batch.column("uuid").to_pylist()
        keep = [i for i, u in enumerate(uuids) if u and u not in seen and not seen.add(u)]
        rows.append(batch.take(pa.array(keep, type=pa.int64())))
    table = pa.Table.from_batches(rows).combine_chunks().slice(0, FLOWS)
    assert table.num_rows == FLOWS
    base = (time.time_ns() // 10**9 - 600) * 10**9 + 123
    times = pa.array(base + np.arange(FLOWS, dtype=np.int64) * STEP_NS).cast(table.schema.field("time").type)
    table = table.set_column(table.schema.get_field_index("time"), "time", times)
    table = table.set_column(table.schema.get_field_index("node_name"), "node_name",
                             pa.array(["node-1"] * FLOWS, type=table.schema.field("node_name").type))
    return table.to_batches()[0]


def t(timeline: pa.RecordBatch, i: int) -> int:
    return timeline.column("time")[i].cast(pa.int64()).as_py()


def uuids(batch: pa.RecordBatch, rows: list[int] | range) -> list[str]:
    return [batch.column("uuid")[i].as_py() for i in rows]


ARCHIVED = [i for i in range(SEAM + 1) if i not in LATE]
# What a follower from the start gets: the archive in order, then the live source's new flows in its order
HANDED_OVER = ARCHIVED + list(LATE) + list(range(SEAM + 1, FLOWS))


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory, timeline: pa.RecordBatch) -> Path:
    root = tmp_path_factory.mktemp("follow") / "archive"
    sink = ParquetSink(parse(ParquetSinkConfig, {"path": str(root), "max_file_rows": 200}, "t.yaml"),
                       make_ctx("parquet"))
    sink.start()
    done: list[bool] = []
    stored = timeline.take(pa.array(ARCHIVED))
    sink.write(Envelope(stored, [Receipt(on_done=lambda r: done.append(r.failed), rows=stored.num_rows)]))
    sink.flush()
    sink.close()
    assert done == [False]
    assert len(list(root.rglob("*.parquet"))) >= 3
    return root


class Ring:
    """A flowship agent's Observer server, fed by hand the way the agent feeds it."""

    def __init__(self, max_flows: int = 4095, **options: object) -> None:
        config = parse(ObserverConfig, {"address": "127.0.0.1:0", "max_flows": max_flows, "follow_poll": "50ms",
                                        **options}, "agent.yaml", "observer")
        self.server = ObserverServer(config, node_name="node-1")
        self.address = f"127.0.0.1:{self.server.start()}"

    def publish(self, batch: pa.RecordBatch, rows: range, chunk: int = 100) -> None:
        for start in range(rows.start, rows.stop, chunk):
            self.server.publish(batch.slice(start, min(chunk, rows.stop - start)))


@pytest.fixture()
def ring() -> Iterator[Ring]:
    r = Ring()
    yield r
    r.server.stop(0)


def history(archive: Path, live: ObserverLiveConfig | KafkaLiveConfig) -> HistoryServer:
    server = HistoryServer(HistoryConfig(archive=str(archive), address="127.0.0.1:0", live=live))
    server.start()
    return server


class Follower:
    """A GetFlows follow stream read by a thread, so that the test can publish while it reads."""

    def __init__(self, port: int, request: observer_pb2.GetFlowsRequest) -> None:
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.call = observer_pb2_grpc.ObserverStub(self.channel).GetFlows(request, timeout=120)
        self.responses: queue.Queue[observer_pb2.GetFlowsResponse | None] = queue.Queue()
        self.error: grpc.RpcError | None = None
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for r in self.call:
                self.responses.put(r)
        except grpc.RpcError as exc:
            self.error = exc
        self.responses.put(None)

    def take(self, n: int, timeout: float = 60) -> list[observer_pb2.GetFlowsResponse]:
        out = []
        deadline = time.monotonic() + timeout
        while len(out) < n:
            r = self.responses.get(timeout=max(0.1, deadline - time.monotonic()))
            assert r is not None, f"the stream ended after {len(out)} of {n}: {self.error}"
            out.append(r)
        return out

    def quiet(self, seconds: float = 1.0) -> bool:
        """Nothing more arrives for ``seconds`` (and the stream is still open)."""
        try:
            r = self.responses.get(timeout=seconds)
        except queue.Empty:
            return True
        pytest.fail(f"unexpected response after the last flow: {r}")

    def close(self) -> None:
        self.call.cancel()
        self.channel.close()


def follow_from(start_ns: int, **kw) -> observer_pb2.GetFlowsRequest:
    request = observer_pb2.GetFlowsRequest(follow=True, **kw)
    request.since.FromNanoseconds(start_ns)
    return request


# ---------------------------------------------------------------------------------------------
# An Observer
# ---------------------------------------------------------------------------------------------

def test_follow_hands_over_from_the_archive_to_the_ring_at_the_seam(archive, timeline, ring) -> None:
    """Archive to T, ring from T-30 s: every flow once; the late flows the archive lacked come from the ring."""
    ring.publish(timeline, range(LIVE_FROM, 900))
    server = history(archive, ObserverLiveConfig(ring.address, window=WINDOW))
    follower = Follower(server.port or 0, follow_from(t(timeline, 0)))
    try:
        got = follower.take(900 - (FLOWS - 900))
        assert ring.server.followers() == 1  # the live part is a real follow stream on the ring
        ring.publish(timeline, range(900, FLOWS))  # published while the client follows
        got += follower.take(FLOWS - len(got))
        assert follower.quiet()
        assert all(r.HasField("flow") for r in got)
        assert [r.flow.uuid for r in got] == uuids(timeline, HANDED_OVER)
        assert len({r.flow.uuid for r in got}) == FLOWS
        assert [r.node_name for r in got] == ["node-1"] * FLOWS
    finally:
        follower.close()
        server.stop(0)


def test_last_n_then_follow(archive, timeline, ring) -> None:
    """``--last 5 -f``: the archive's five newest flows, then the ring's new ones."""
    ring.publish(timeline, range(LIVE_FROM, FLOWS))
    server = history(archive, ObserverLiveConfig(ring.address, window=WINDOW))
    follower = Follower(server.port or 0, observer_pb2.GetFlowsRequest(follow=True, number=5))
    try:
        expected = ARCHIVED[-5:] + list(LATE) + list(range(SEAM + 1, FLOWS))
        assert [r.flow.uuid for r in follower.take(len(expected))] == uuids(timeline, expected)
        assert follower.quiet()
    finally:
        follower.close()
        server.stop(0)


def test_follow_alone_reads_the_live_source_from_now(archive, timeline, ring) -> None:
    """``hubble observe -f``: no stored flows, as in Hubble, and the live flows published from now on."""
    ring.publish(timeline, range(LIVE_FROM, 900))
    server = history(archive, ObserverLiveConfig(ring.address, window=WINDOW))
    follower = Follower(server.port or 0, observer_pb2.GetFlowsRequest(follow=True))
    try:
        deadline = time.monotonic() + 10
        while ring.server.followers() == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert follower.quiet(0.5)
        ring.publish(timeline, range(900, FLOWS))
        assert [r.flow.uuid for r in follower.take(FLOWS - 900)] == uuids(timeline, range(900, FLOWS))
        assert follower.quiet()
    finally:
        follower.close()
        server.stop(0)


def test_filters_and_the_field_mask_apply_to_live_flows(archive, timeline, ring) -> None:
    ring.publish(timeline, range(LIVE_FROM, FLOWS))
    namespaces = timeline.column("src_namespace").to_pylist()
    namespace = max(set(namespaces[SEAM + 1:]) - {None}, key=namespaces[SEAM + 1:].count)
    whitelist = [flow_pb2.FlowFilter(source_pod=[f"{namespace}/"])]
    blacklist = [flow_pb2.FlowFilter(verdict=[flow_pb2.Verdict.Value("DROPPED")])]
    matches = compile_filter_set(whitelist, blacklist).mask(timeline)
    expected = [i for i in HANDED_OVER if matches[i]]
    assert 0 < len([i for i in expected if i <= SEAM]) and 0 < len([i for i in expected if i > SEAM]) < FLOWS - SEAM
    request = follow_from(t(timeline, 0), whitelist=whitelist, blacklist=blacklist)
    request.field_mask.paths.extend(["uuid", "source.namespace"])
    server = history(archive, ObserverLiveConfig(ring.address, window=WINDOW))
    follower = Follower(server.port or 0, request)
    try:
        got = follower.take(len(expected))
        assert follower.quiet()
        assert [r.flow.uuid for r in got] == uuids(timeline, expected)
        assert {r.flow.source.namespace for r in got} == {namespace}
        assert all({f.name for f, _ in r.flow.ListFields()} == {"uuid", "source"} for r in got)
    finally:
        follower.close()
        server.stop(0)


def test_until_ends_the_stream_in_the_live_part(archive, timeline, ring) -> None:
    ring.publish(timeline, range(LIVE_FROM, FLOWS))
    server = history(archive, ObserverLiveConfig(ring.address, window=WINDOW))
    try:
        request = follow_from(t(timeline, 0))
        request.until.FromNanoseconds(t(timeline, 800))
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            got = list(observer_pb2_grpc.ObserverStub(channel).GetFlows(request, timeout=60))  # ends by itself
        assert [r.flow.uuid for r in got] == uuids(timeline, [i for i in HANDED_OVER if i <= 800])
    finally:
        server.stop(0)


def test_a_ring_that_no_longer_holds_the_window_sends_a_lost_event(archive, timeline) -> None:
    """The ring keeps 255 flows: the window before the seam is gone, and the client is told so, as Hubble does."""
    small = Ring(max_flows=255)
    small.publish(timeline, range(LIVE_FROM, FLOWS))
    oldest = FLOWS - 255
    server = history(archive, ObserverLiveConfig(small.address, window=WINDOW))
    follower = Follower(server.port or 0, follow_from(t(timeline, 0)))
    try:
        got = follower.take(len(ARCHIVED) + 1 + 255)
        assert follower.quiet()
        assert [r.flow.uuid for r in got[:len(ARCHIVED)]] == uuids(timeline, ARCHIVED)
        lost = got[len(ARCHIVED)]
        assert lost.HasField("lost_events") and not lost.HasField("flow")
        assert lost.lost_events.source == flow_pb2.LostEventSource.Value("HUBBLE_RING_BUFFER")
        assert lost.lost_events.num_events_lost == 1
        assert lost.lost_events.first.ToNanoseconds() == t(timeline, SEAM) - int(WINDOW * 1e9)
        assert lost.lost_events.last.ToNanoseconds() == t(timeline, oldest)
        assert [r.flow.uuid for r in got[len(ARCHIVED) + 1:]] == uuids(timeline, range(oldest, FLOWS))
    finally:
        follower.close()
        server.stop(0)
        small.server.stop(0)


def test_a_cancel_or_a_stop_ends_the_live_stream(archive, timeline, ring) -> None:
    ring.publish(timeline, range(LIVE_FROM, FLOWS))
    server = history(archive, ObserverLiveConfig(ring.address, window=WINDOW))
    try:
        follower = Follower(server.port or 0, follow_from(t(timeline, 0)))
        follower.take(len(HANDED_OVER))
        assert ring.server.followers() == 1
        follower.close()
        deadline = time.monotonic() + 3
        while ring.server.followers() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ring.server.followers() == 0  # the history server closed its live stream with the client's
        follower = Follower(server.port or 0, follow_from(t(timeline, 0)))
        follower.take(len(HANDED_OVER))
        started = time.monotonic()
        server.stop(2)
        follower.thread.join(5)
        assert not follower.thread.is_alive() and time.monotonic() - started < 4
        deadline = time.monotonic() + 3
        while ring.server.followers() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ring.server.followers() == 0
    finally:
        server.stop(0)


def test_an_unreachable_live_observer_is_unavailable(archive, timeline) -> None:
    # nothing listens on port 1
    server = history(archive, ObserverLiveConfig("127.0.0.1:1", window=WINDOW, connect_timeout=2))
    try:
        follower = Follower(server.port or 0, follow_from(t(timeline, 0)))
        got = follower.take(len(ARCHIVED))  # the stored part is served first
        assert [r.flow.uuid for r in got] == uuids(timeline, ARCHIVED)
        follower.thread.join(30)
        assert follower.error is not None and follower.error.code() == grpc.StatusCode.UNAVAILABLE
        assert "the live Observer 127.0.0.1:1" in (follower.error.details() or "")
    finally:
        server.stop(0)


def test_hubble_observe_follows_across_the_seam(hubble_cli, archive, timeline, ring) -> None:  # noqa: F811
    """``flowship history --live-observer`` and the real ``hubble observe --since ... -f``."""
    import json

    ring.publish(timeline, range(LIVE_FROM, 900))
    server = History("--archive", str(archive), "--listen", "127.0.0.1:0", "--live-observer", ring.address,
                     "--live-window", str(WINDOW))
    observer = subprocess.Popen([hubble_cli, "observe", "--server", server.address, "-o", "jsonpb", "-f",
                                 "--since", ns(t(timeline, 0))], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in observer.stdout or []], daemon=True).start()
    try:
        got = [json.loads(lines.get(timeout=60))["flow"]["uuid"] for _ in range(HANDED_OVER.index(899) + 1)]
        ring.publish(timeline, range(900, FLOWS))
        got += [json.loads(lines.get(timeout=60))["flow"]["uuid"] for _ in range(FLOWS - len(got))]
        assert got == uuids(timeline, HANDED_OVER)
        time.sleep(1)
        assert lines.empty()
    finally:
        observer.terminate()
        observer.wait(10)
        server.stop()


def test_hubble_observe_reports_the_lost_window(hubble_cli, archive, timeline) -> None:  # noqa: F811
    small = Ring(max_flows=255)
    small.publish(timeline, range(LIVE_FROM, FLOWS))
    server = History("--archive", str(archive), "--listen", "127.0.0.1:0", "--live-observer", small.address,
                     "--live-window", str(WINDOW))
    observer = subprocess.Popen([hubble_cli, "observe", "--server", server.address, "-f", "--last", "3"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in observer.stdout or []], daemon=True).start()
    try:
        got = [lines.get(timeout=60) for _ in range(3 + 1 + 255)]
        assert sum("EVENTS LOST" in line for line in got) == 1
        lost = next(line for line in got if "EVENTS LOST" in line)
        assert got.index(lost) == 3 and "HUBBLE_RING_BUFFER" in lost and "(first: " in lost, lost
    finally:
        observer.terminate()
        observer.wait(10)
        server.stop()
        small.server.stop(0)


def test_a_live_observer_over_mtls(archive, timeline, tmp_path) -> None:
    """``--live-tls-ca/-cert/-key/-server-name``: the live Observer demands a client certificate, as Relay's peers do."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "agent"))
    from certs import make_pki

    pki = make_pki(tmp_path, server_names="DNS:hubble-peer.local")
    secured = Ring(tls={"cert_file": str(pki["server.crt"]), "key_file": str(pki["server.key"]),
                        "client_ca_file": str(pki["ca.crt"])})
    secured.publish(timeline, range(LIVE_FROM, FLOWS))
    server = History("--archive", str(archive), "--listen", "127.0.0.1:0", "--live-observer", secured.address,
                     "--live-tls-ca", str(pki["ca.crt"]), "--live-tls-cert", str(pki["client.crt"]),
                     "--live-tls-key", str(pki["client.key"]), "--live-tls-server-name", "hubble-peer.local",
                     "--live-window", str(WINDOW))
    follower = Follower(int(server.address.rpartition(":")[2]), follow_from(t(timeline, 0)))
    try:
        assert [r.flow.uuid for r in follower.take(len(HANDED_OVER))] == uuids(timeline, HANDED_OVER)
        assert follower.quiet()
    finally:
        follower.close()
        server.stop()
        secured.server.stop(0)


def test_command_line_errors_of_the_live_options(archive) -> None:
    from test_history import env, flowship

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(flowship("history", "--archive", str(archive), *args), capture_output=True, text=True,
                              timeout=60, env=env())

    both = run("--live-observer", "127.0.0.1:4244", "--live-kafka", "127.0.0.1:9092")
    assert both.returncode == 2 and "either --live-observer or --live-kafka" in both.stderr
    missing = run("--live-observer", "127.0.0.1:4244", "--live-tls-ca", "/nonexistent/ca.crt")
    assert missing.returncode == 2
    assert missing.stderr.strip() == "flowship history: --live-tls-ca: file not found: /nonexistent/ca.crt"
    window = run("--live-kafka", "127.0.0.1:9092", "--live-window", "0")
    assert window.returncode == 2 and "--live-window: expected a positive number" in window.stderr


# ---------------------------------------------------------------------------------------------
# A Kafka topic
# ---------------------------------------------------------------------------------------------

def produce(brokers: str, topic: str, batch: pa.RecordBatch, encoding: str = "hubble-json") -> None:
    """Flows through a real kafka sink, as agents produce them."""
    from flowship.sinks.kafka import KafkaSink, KafkaSinkConfig

    sink = KafkaSink(parse(KafkaSinkConfig, {"brokers": brokers, "topic": topic, "encoding": encoding,
                                             "create_topic": {"partitions": 1}}, "t"), make_ctx("kafka"))
    sink.start()
    done: list[bool] = []
    sink.write(Envelope(batch, [Receipt(on_done=lambda r: done.append(r.failed), rows=batch.num_rows)]))
    sink.flush()
    sink.close()
    assert done == [False]


@pytest.mark.servers
@pytest.mark.parametrize("encoding", ["hubble-json", "arrow"])
def test_follow_hands_over_from_the_archive_to_a_kafka_topic(archive, timeline, kafka, run_id, encoding) -> None:
    topic = f"history-follow-{encoding}-{run_id}"
    produce(kafka, topic, timeline.slice(LIVE_FROM, 900 - LIVE_FROM), encoding)
    server = history(archive, KafkaLiveConfig(kafka, topic=topic, window=WINDOW))
    follower = Follower(server.port or 0, follow_from(t(timeline, 0)))
    try:
        got = follower.take(HANDED_OVER.index(899) + 1)
        produce(kafka, topic, timeline.slice(900, FLOWS - 900), encoding)  # while the client follows
        got += follower.take(FLOWS - len(got))
        assert follower.quiet()
        assert [r.flow.uuid for r in got] == uuids(timeline, HANDED_OVER)
    finally:
        follower.close()
        server.stop(0)


@pytest.mark.servers
def test_a_topic_whose_retention_reached_into_the_window_sends_a_lost_event(archive, timeline, kafka,
                                                                            run_id) -> None:
    from confluent_kafka import TopicPartition
    from confluent_kafka.admin import AdminClient

    topic = f"history-follow-deleted-{run_id}"
    produce(kafka, topic, timeline.slice(LIVE_FROM, FLOWS - LIVE_FROM))  # one message per flow
    kept = 1000
    admin = AdminClient({"bootstrap.servers": kafka})
    for future in admin.delete_records([TopicPartition(topic, 0, kept - LIVE_FROM)]).values():
        future.result(30)
    server = history(archive, KafkaLiveConfig(kafka, topic=topic, window=WINDOW))
    follower = Follower(server.port or 0, follow_from(t(timeline, 0)))
    try:
        got = follower.take(len(ARCHIVED) + 1 + FLOWS - kept)
        assert follower.quiet()
        assert [r.flow.uuid for r in got[:len(ARCHIVED)]] == uuids(timeline, ARCHIVED)
        lost = got[len(ARCHIVED)].lost_events
        assert lost.source == flow_pb2.LostEventSource.Value("HUBBLE_RING_BUFFER") and lost.num_events_lost == 1
        assert lost.first.ToNanoseconds() == t(timeline, SEAM) - int(WINDOW * 1e9)
        assert [r.flow.uuid for r in got[len(ARCHIVED) + 1:]] == uuids(timeline, range(kept, FLOWS))
    finally:
        follower.close()
        server.stop(0)

