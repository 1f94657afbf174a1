"""``hubble`` source: flows from a Hubble agent (:4244) or Hubble Relay (:4245) over gRPC.

Calls ``observer.Observer/GetFlows`` with the configured whitelist/blacklist
FlowFilters (passed through as Hubble's own JSON), follows the stream by
default, and emits FLOW_SCHEMA batches of up to ``batch_rows`` flows or
whatever arrived within ``batch_interval``.

Delivery: the time of the newest flow whose batch every sink accepted is
checkpointed under the data dir (with the uuids of the flows at exactly that
time). After a restart the request carries ``since`` = that time, and the
flows at that instant that were already delivered are skipped, so only flows
emitted but not yet acknowledged are sent again (at-least-once, bounded by
what was in flight). After a broken stream the source reconnects with
exponential backoff and resumes from the newest flow it emitted. Hubble keeps
flows in a ring (4095 per node by default): what the ring dropped meanwhile
cannot be fetched again; ``LostEvent`` responses are counted in
``flowship_lost_events_total{source, lost_source}`` and logged.

A connection that fails because of TLS (wrong CA, missing or refused client
certificate, server name mismatch) is reported with that reason
(:func:`tls_diagnosis`); it ends a ``follow: false`` run with an error, since
no retry can fix it, while a following source logs it and keeps retrying.
"""

from __future__ import annotations

import queue
import random
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from google.protobuf import json_format

from flowship.components import Context, Emit, Source
from flowship.config import Duration
from flowship.pipeline.checkpoint import CheckpointStore, OrderedAcks
from flowship.pipeline.envelope import Receipt
from flowship.proto.flow import flow_pb2

if TYPE_CHECKING:  # gRPC is imported by the methods that connect: validating a config (filters) needs protobuf only
    import grpc

    from flowship.proto.observer import observer_pb2

# gRPC status codes that no retry can fix, by name.
_FATAL = frozenset({"INVALID_ARGUMENT", "UNIMPLEMENTED", "PERMISSION_DENIED", "UNAUTHENTICATED"})


class TLSError(ConnectionError):
    """The server was reached but TLS or client authentication failed: a config problem, not an outage."""


# An HTTP/2 client preface and an empty SETTINGS frame: a gRPC server that accepted the handshake answers.
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
_CLIENT_CERT_ALERTS = ("CERTIFICATE_REQUIRED", "UNKNOWN_CA", "BAD_CERTIFICATE", "CERTIFICATE_UNKNOWN",
                       "UNSUPPORTED_CERTIFICATE", "ACCESS_DENIED", "HANDSHAKE_FAILURE", "DECRYPT_ERROR")


def tls_diagnosis(address: str, ca_file: str | None, cert_file: str | None, key_file: str | None,
                  server_name: str | None, timeout: float = 5.0) -> str | None:
    """Why a TLS connection to ``address`` fails, in words; None when it works or the cause is not TLS.

    gRPC only says "failed to connect" (or "Socket closed" when the server refuses the client
    certificate), so the handshake is repeated here with Python's ssl module and the same files, which
    reports the verification result and the server's alert.
    """
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    name = server_name or host
    try:
        ctx = ssl.create_default_context(cafile=ca_file)
        if cert_file:
            ctx.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        return f"cannot use the TLS files: {exc}"
    ctx.set_alpn_protocols(["h2"])
    try:
        raw = socket.create_connection((host, int(port)), timeout=timeout)
    except (OSError, ValueError):
        return None  # not reachable at all: an outage, not a TLS problem
    try:
        with ctx.wrap_socket(raw, server_hostname=name) as conn:
            conn.settimeout(timeout)
            conn.sendall(_H2_PREFACE)
            if conn.recv(9):
                return None
            if not cert_file:
                return ("client certificate missing: the server closed the connection right after the TLS "
                        "handshake, so it requires one (set cert_file and key_file)")
            return (f"client certificate refused: the server closed the connection right after the TLS "
                    f"handshake (is cert_file {cert_file} signed by a CA the server trusts, with "
                    f"extendedKeyUsage clientAuth?)")
    except ssl.SSLCertVerificationError as exc:
        if exc.verify_code == 62:  # X509_V_ERR_HOSTNAME_MISMATCH
            return (f"server name mismatch: the server's certificate is not valid for {name!r} "
                    f"(set server_name to a name the certificate holds)")
        if exc.verify_code in (2, 18, 19, 20, 21):  # no issuer, self-signed, untrusted chain
            source = f"ca_file {ca_file}" if ca_file else "the system's trusted CAs"
            return (f"wrong CA: the server's certificate is not signed by {source} "
                    f"({exc.verify_message})")
        return f"the server's certificate was rejected: {exc.verify_message}"
    except ssl.SSLError as exc:
        reason = exc.reason or ""
        if any(alert in reason for alert in _CLIENT_CERT_ALERTS):
            if not cert_file:
                return f"client certificate missing: the server requires one (set cert_file and key_file): {reason}"
            return f"client certificate refused: the server rejected cert_file {cert_file}: {reason}"
        if reason in ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "HTTP_REQUEST"):
            return "the server does not speak TLS at this address (tls: false?)"
        return f"TLS handshake failed: {exc}"
    except TimeoutError:
        return None
    except OSError as exc:
        return f"the server closed the connection during the TLS handshake ({exc})"
    finally:
        raw.close()


def speaks_tls(address: str, timeout: float = 5.0) -> bool:
    """True when the server at ``address`` completes a TLS handshake (certificates not checked)."""
    host, _, port = address.rpartition(":")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as raw, \
                ctx.wrap_socket(raw, server_hostname=host.strip("[]") or None):
            return True
    except (OSError, ValueError):
        return False


def parse_filters(items: list[Any], key: str) -> tuple[list[flow_pb2.FlowFilter], list[str]]:
    """FlowFilter dicts (Hubble JSON, proto or camelCase names) → messages, plus problems."""
    out, problems = [], []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            problems.append(f"{key}[{i}]: expected a FlowFilter mapping, got {item!r}")
            continue
        try:
            out.append(json_format.ParseDict(item, flow_pb2.FlowFilter()))
        except json_format.ParseError as exc:
            problems.append(f"{key}[{i}]: invalid FlowFilter: {exc}")
    return out, problems


def parse_since(value: str, now_ns: int | None = None) -> int:
    """RFC 3339 time, or a duration ("10m", "1h") meaning that long ago → ns since the epoch."""
    from flowship.model.times import parse_time

    try:
        return parse_time(value)
    except ValueError:
        pass
    seconds = Duration.parse(value)  # raises ValueError
    return (time.time_ns() if now_ns is None else now_ns) - int(seconds * 1e9)


class ObserverEndpoint(Protocol):
    """Where an Observer listens and how to reach it: the hubble source's and history's live source's options."""

    address: str
    tls: bool
    ca_file: str | None
    cert_file: str | None
    key_file: str | None
    server_name: str | None


def observer_channel(c: ObserverEndpoint) -> grpc.Channel:
    """A gRPC channel to an Observer: TLS when asked for or when a CA or client certificate is given."""
    import grpc

    options: list[tuple[str, Any]] = [("grpc.keepalive_time_ms", 30_000),
                                      ("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    if c.tls or c.ca_file or c.cert_file:
        creds = grpc.ssl_channel_credentials(
            root_certificates=Path(c.ca_file).read_bytes() if c.ca_file else None,
            private_key=Path(c.key_file).read_bytes() if c.key_file else None,
            certificate_chain=Path(c.cert_file).read_bytes() if c.cert_file else None)
        if c.server_name:
            options.append(("grpc.ssl_target_name_override", c.server_name))
        return grpc.secure_channel(c.address, creds, options)
    return grpc.insecure_channel(c.address, options)


@dataclass
class HubbleSourceConfig:
    address: str = "localhost:4245"        # Relay; a node's agent listens on :4244
    follow: bool = True                    # false: read what the ring holds, then finish
    since: str | None = None               # RFC 3339 or "10m" ago; a checkpoint, when present, wins
    until: str | None = None
    whitelist: list[Any] = field(default_factory=list)   # Hubble FlowFilter objects (JSON form)
    blacklist: list[Any] = field(default_factory=list)
    field_mask: list[str] = field(default_factory=list)  # Flow field paths to receive (empty: all)
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None           # client certificate for mTLS
    key_file: str | None = None
    server_name: str | None = None         # TLS name to verify, e.g. "*.default.hubble-grpc.cilium.io"
    batch_rows: int = 4096
    batch_interval: Duration = Duration(0.5)
    checkpoint: bool = True
    backoff_initial: Duration = Duration(0.5)
    backoff_max: Duration = Duration(30.0)
    connect_timeout: Duration = Duration(10.0)

    def validate(self) -> list[str]:
        problems: list[str] = []
        for key in ("whitelist", "blacklist"):
            problems += parse_filters(getattr(self, key), key)[1]
        for key in ("since", "until"):
            value = getattr(self, key)
            if value is not None:
                try:
                    parse_since(value)
                except ValueError:
                    problems.append(f"{key}: expected an RFC 3339 time or a duration like \"10m\", got {value!r}")
        if self.field_mask:
            from google.protobuf import field_mask_pb2

            mask = field_mask_pb2.FieldMask(paths=self.field_mask)
            if not mask.IsValidForDescriptor(flow_pb2.Flow.DESCRIPTOR):
                problems.append(f"field_mask: unknown Flow field path in {self.field_mask}")
        uses_tls = self.tls or any((self.ca_file, self.cert_file, self.key_file))
        if uses_tls:
            for key in ("ca_file", "cert_file", "key_file"):
                path = getattr(self, key)
                if path and not Path(path).is_file():
                    problems.append(f"{key}: file not found: {path}")
            if bool(self.cert_file) != bool(self.key_file):
                problems.append("cert_file: cert_file and key_file go together (mTLS)")
        if self.batch_rows < 1:
            problems.append(f"batch_rows: expected an integer >= 1, got {self.batch_rows}")
        if ":" not in self.address:
            problems.append(f"address: expected host:port, got {self.address!r}")
        return problems


@dataclass
class _Position:
    time_ns: int
    uuids: frozenset[str]        # uuids of the flows at exactly time_ns (for skipping on resume)


_END = object()


class HubbleSource(Source):
    config: HubbleSourceConfig

    def __init__(self, config: HubbleSourceConfig, ctx: Context) -> None:
        super().__init__(config, ctx)
        self.whitelist, _ = parse_filters(config.whitelist, "whitelist")
        self.blacklist, _ = parse_filters(config.blacklist, "blacklist")
        self.store = CheckpointStore(ctx.data_dir, ctx.name) if config.checkpoint else None
        self.acks = OrderedAcks(self._advance)
        self.flows = 0
        self.lost = 0
        self.reconnects = 0
        self.skipped_duplicates = 0
        self._flows_in = ctx.metrics.flows_in(ctx.name)
        self._reconnect_counter = ctx.metrics.counter(
            "flowship_hubble_reconnects_total", "Times a hubble source opened GetFlows again.", ["source"]
        ).labels(ctx.name)
        self._call: Any = None
        self._call_lock = threading.Lock()
        self.position: _Position | None = None  # newest flow emitted: where a new stream resumes

    # -- positions --------------------------------------------------------------------------
    def _advance(self, position: _Position) -> None:
        if self.store is not None:
            self.store.save({"time_ns": position.time_ns, "uuids": sorted(position.uuids)})

    def _start_position(self) -> _Position | None:
        if self.store is not None:
            state = self.store.load()
            if "time_ns" in state:
                return _Position(int(state["time_ns"]), frozenset(state.get("uuids") or ()))
        if self.config.since:
            return _Position(parse_since(self.config.since), frozenset())
        return None

    # -- the stream -------------------------------------------------------------------------
    def _channel(self) -> grpc.Channel:
        return observer_channel(self.config)

    def _uses_tls(self) -> bool:
        c = self.config
        return bool(c.tls or c.ca_file or c.cert_file)

    def _wait_ready(self, channel: grpc.Channel) -> None:
        """Connect within ``connect_timeout``; a failure says why (TLSError when TLS is the cause)."""
        import grpc

        c = self.config
        states: list[grpc.ChannelConnectivity] = []
        settled = threading.Event()

        def watch(state: grpc.ChannelConnectivity) -> None:
            states.append(state)
            if state in (grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.TRANSIENT_FAILURE):
                settled.set()

        channel.subscribe(watch, try_to_connect=True)
        try:
            settled.wait(float(c.connect_timeout))
        finally:
            channel.unsubscribe(watch)
        if states and states[-1] == grpc.ChannelConnectivity.READY:
            return
        if self._uses_tls():
            reason = tls_diagnosis(c.address, c.ca_file, c.cert_file, c.key_file, c.server_name,
                                   timeout=min(5.0, float(c.connect_timeout)))
            if reason:
                raise TLSError(reason)
        elif speaks_tls(c.address, timeout=min(5.0, float(c.connect_timeout))):
            raise TLSError("the server speaks TLS and this source does not: set tls: true (with ca_file, and "
                           "cert_file and key_file when the server requires client certificates)")
        raise ConnectionError(f"cannot connect to {c.address}")

    def _request(self, position: _Position | None) -> observer_pb2.GetFlowsRequest:
        from flowship.proto.observer import observer_pb2

        c = self.config
        req = observer_pb2.GetFlowsRequest(follow=c.follow, whitelist=self.whitelist, blacklist=self.blacklist)
        if position is not None:
            req.since.FromNanoseconds(position.time_ns)
        if not c.follow:
            req.number = 2**64 - 1  # everything the ring holds, as `hubble observe --all` asks
        if c.until:
            req.until.FromNanoseconds(parse_since(c.until))
        if c.field_mask:
            req.field_mask.paths.extend(c.field_mask)
        return req

    def _reader(self, call: Any, out: queue.Queue) -> None:
        import grpc

        try:
            for resp in call:
                out.put(resp)
            out.put(_END)
        except grpc.RpcError as exc:
            out.put(exc)
        except Exception as exc:  # noqa: BLE001 - handed to the main loop
            out.put(exc)

    def run(self, emit: Emit, stop: threading.Event) -> None:
        import grpc

        self.position = self._start_position()
        delay = float(self.config.backoff_initial)
        first = True
        while not stop.is_set():
            if not first:
                self.reconnects += 1
                self._reconnect_counter.inc()
            first = False
            channel = self._channel()
            try:
                self._wait_ready(channel)
                ended, got_any = self._stream(channel, emit, stop)
                if got_any:
                    delay = float(self.config.backoff_initial)
                if ended and not self.config.follow:
                    return  # the ring was read to its end
                if ended:
                    continue  # the server closed the stream: open it again
            except grpc.RpcError as exc:
                code = exc.code() if hasattr(exc, "code") else None
                if code is not None and code.name in _FATAL:
                    raise RuntimeError(f"hubble source {self.ctx.name}: {self.config.address} refused GetFlows: "
                                       f"{code.name}: {exc.details()}") from None
                if stop.is_set():
                    return
                self.ctx.log.warning("hubble stream failed, reconnecting", address=self.config.address,
                                     code=code.name if code else None, details=exc.details() if code else str(exc),
                                     retry_in_s=round(delay, 2))
            except TLSError as exc:
                # A wrong CA, a missing or refused client certificate, a name mismatch: retrying cannot
                # finish a finite read; a following source keeps trying (certificates may be rotated).
                if not self.config.follow:
                    raise RuntimeError(f"hubble source {self.ctx.name}: TLS with {self.config.address} "
                                       f"failed: {exc}") from None
                self.ctx.log.error("hubble TLS handshake failed, retrying", address=self.config.address,
                                   reason=str(exc), retry_in_s=round(delay, 2))
            except ConnectionError as exc:
                self.ctx.log.warning("hubble server unreachable, retrying", error=str(exc), retry_in_s=round(delay, 2))
            finally:
                channel.close()
            stop.wait(delay * (0.8 + 0.4 * random.random()))
            delay = min(delay * 2, float(self.config.backoff_max))

    def _stream(self, channel: grpc.Channel, emit: Emit, stop: threading.Event) -> tuple[bool, bool]:
        """Read one GetFlows stream from ``self.position``; returns (ended normally, got anything).

        ``self.position`` follows every emitted batch, also when the stream
        then breaks, so the next stream resumes right after it.
        """
        import grpc

        from flowship.model.proto import from_flow_messages, timestamp_ns
        from flowship.proto.observer import observer_pb2, observer_pb2_grpc

        position = self.position
        stub = observer_pb2_grpc.ObserverStub(channel)
        call = stub.GetFlows(self._request(position))
        with self._call_lock:
            self._call = call
        responses: queue.Queue = queue.Queue(maxsize=2 * self.config.batch_rows)
        reader = threading.Thread(target=self._reader, args=(call, responses), daemon=True,
                                  name=f"hubble-{self.ctx.name}")
        reader.start()
        messages: list[flow_pb2.Flow] = []
        nodes: list[str] = []
        times: list[int | None] = []
        started = 0.0
        skip_before = position
        got_any = False
        interval = float(self.config.batch_interval)

        def flush() -> None:
            nonlocal messages, nodes, times, position
            if not messages:
                return
            batch = from_flow_messages(messages, nodes, times)
            newest = max(t for t in times if t is not None) if any(t is not None for t in times) else None
            if newest is not None:
                at_newest = frozenset(m.uuid for m, t in zip(messages, times, strict=True) if t == newest and m.uuid)
                if position is not None and position.time_ns == newest:
                    at_newest |= position.uuids
                if position is None or newest >= position.time_ns:
                    position = _Position(newest, at_newest)
                    self.position = position
            receipt: Receipt = self.acks.issue(position, rows=batch.num_rows)
            self.flows += batch.num_rows
            self._flows_in.inc(batch.num_rows)
            emit(batch, receipt)
            messages, nodes, times = [], [], []

        try:
            while True:
                if stop.is_set():
                    call.cancel()
                    flush()
                    return False, got_any
                timeout = 0.2 if not messages else max(0.0, min(0.2, started + interval - time.monotonic()))
                try:
                    item = responses.get(timeout=timeout)
                except queue.Empty:
                    if messages and time.monotonic() - started >= interval:
                        flush()
                    continue
                if item is _END:
                    flush()
                    return True, got_any
                if isinstance(item, Exception):
                    flush()
                    if isinstance(item, grpc.RpcError) and item.code() == grpc.StatusCode.CANCELLED and stop.is_set():
                        return False, got_any
                    raise item
                got_any = True
                kind = item.WhichOneof("response_types")
                if kind == "flow":
                    flow = item.flow
                    t = timestamp_ns(flow.time) if flow.HasField("time") else (
                        timestamp_ns(item.time) if item.HasField("time") else None)
                    if skip_before is not None and t is not None and (
                            t < skip_before.time_ns or (t == skip_before.time_ns and flow.uuid in skip_before.uuids)):
                        self.skipped_duplicates += 1
                        continue
                    if not messages:
                        started = time.monotonic()
                    messages.append(flow)
                    nodes.append(item.node_name)
                    times.append(t)
                    if len(messages) >= self.config.batch_rows:
                        flush()
                elif kind == "lost_events":
                    lost = item.lost_events
                    source = flow_pb2.LostEventSource.Name(lost.source)
                    self.lost += lost.num_events_lost
                    self.ctx.metrics.lost_events(self.ctx.name, source).inc(lost.num_events_lost)
                    self.ctx.log.warning("hubble reported lost flows", lost_source=source,
                                         count=lost.num_events_lost, node=item.node_name)
                elif kind == "node_status":
                    status = item.node_status
                    self.ctx.log.info("hubble node status", state=observer_pb2.NodeState.Name(status.state_change),
                                      nodes=list(status.node_names), message=status.message)
        finally:
            call.cancel()
            with self._call_lock:
                self._call = None
            deadline = time.monotonic() + 5
            while reader.is_alive() and time.monotonic() < deadline:
                try:  # a reader blocked on a full queue needs room to notice the cancel
                    while True:
                        responses.get_nowait()
                except queue.Empty:
                    pass
                reader.join(0.05)

    def summary(self) -> dict[str, Any]:
        return {"flows": self.flows, "lost_events": self.lost, "reconnects": self.reconnects,
                "skipped_duplicates": self.skipped_duplicates}
