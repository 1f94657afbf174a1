"""The serving half of a Hubble ``observer.Observer``: what the agent's live server and ``flowship history`` share.

Two servers answer the Hubble API: the agent's (:mod:`flowship.agent.observer`, over its ring of recent
flows) and the archive's (:mod:`flowship.history`, over the Parquet a ``parquet`` sink wrote). They differ in
where flows come from and agree on everything else, which lives here so that both behave alike:

- :class:`FlowRequest`: a GetFlowsRequest compiled once — FlowFilters through the one compiler
  (:func:`flowship.model.flowfilter.compile_filter_set`), time bounds, the field mask;
- :func:`observer_handler` / :func:`health_handler`: the gRPC services, registered generically so that
  GetFlows can answer pre-serialized bytes;
- :func:`new_grpc_server` and :func:`listen`: keepalive options, TLS/mTLS, unix sockets (0600, a stale socket
  replaced, a live one left alone) and bind errors that say why;
- :func:`client_id`: whom a stream counts against.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import stat
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import field_mask_pb2, timestamp_pb2

from flowship.proto.flow import flow_pb2
from flowship.proto.observer import observer_pb2

try:
    from importlib.metadata import version as _dist_version

    VERSION = _dist_version("flowship")
except Exception:  # noqa: BLE001 - running from a source tree
    VERSION = "0.1.0"


@dataclass
class ObserverTLSConfig:
    """Server TLS; with ``client_ca_file`` clients must present a certificate (mTLS)."""

    cert_file: str
    key_file: str
    client_ca_file: str | None = None

    def validate(self) -> list[str]:
        return [f"{key}: file not found: {getattr(self, key)}"
                for key in ("cert_file", "key_file", "client_ca_file")
                if getattr(self, key) and not Path(getattr(self, key)).is_file()]


def unix_path(address: str) -> str | None:
    """The socket path of a ``unix:PATH`` / ``unix:///PATH`` address, else None."""
    if not address.startswith("unix:"):
        return None
    rest = address[len("unix:"):]
    return "/" + rest.lstrip("/") if rest.startswith("//") else rest


def is_private(address: str) -> bool:
    """True for a unix socket or a loopback address: only this machine can connect."""
    if unix_path(address) is not None:
        return True
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # every interface (":4244", "0.0.0.0"), or a name that may resolve anywhere


def address_problems(address: str, tls: ObserverTLSConfig | None, allow_unauthenticated: bool,
                     enabled: bool = True) -> list[str]:
    """What is wrong with a listen address: its form, or exposing flows to other machines without mTLS."""
    problems = []
    path = unix_path(address)
    if path is not None and not path:
        problems.append(f"address: expected unix:PATH with a path, got {address!r}")
    if path is None and ":" not in address:
        problems.append(f"address: expected unix:PATH, host:port or :port, got {address!r}")
    mtls = tls is not None and bool(tls.client_ca_file)
    if enabled and not is_private(address) and not mtls and not allow_unauthenticated:
        problems.append(
            f"address: {address!r} is reachable from other machines, and the Observer serves every "
            "flow (URLs, headers, addresses) to whoever connects: set tls with client_ca_file (mTLS) to "
            "expose it, use a loopback address or unix:PATH, or set allow_unauthenticated: true")
    return problems


# ---------------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------------

def ts_ns(ts: timestamp_pb2.Timestamp) -> int:
    return ts.seconds * 1_000_000_000 + ts.nanos


def flow_response(msg: flow_pb2.Flow, node_name: str) -> observer_pb2.GetFlowsResponse:
    """The GetFlows envelope of one flow: its node (else the server's) and its time, as Hubble sends them."""
    out = observer_pb2.GetFlowsResponse(flow=msg, node_name=msg.node_name or node_name)
    if msg.HasField("time"):
        out.time.CopyFrom(msg.time)
    return out


class FlowRequest:
    """A compiled GetFlowsRequest: which flows match, and how to shape each response.

    ``since`` and ``until`` are inclusive, as in Hubble. A ``ValueError`` (``FilterError`` is one) means the
    request is invalid: servers answer it with INVALID_ARGUMENT.
    """

    def __init__(self, request: observer_pb2.GetFlowsRequest, node_name: str) -> None:
        from flowship.model.flowfilter import compile_filter_set

        self.filters = None
        if request.whitelist or request.blacklist:
            self.filters = compile_filter_set(list(request.whitelist), list(request.blacklist))
        self.since = ts_ns(request.since) if request.HasField("since") else None
        self.until = ts_ns(request.until) if request.HasField("until") else None
        self.mask: field_mask_pb2.FieldMask | None = None
        if request.HasField("field_mask") and request.field_mask.paths:
            # Paths of fields newer Cilium versions define (the hubble CLI asks for e.g.
            # ingress_allowed_by) select nothing here; a mask with no known path is an error.
            known = [p for p in request.field_mask.paths
                     if field_mask_pb2.FieldMask(paths=[p]).IsValidForDescriptor(flow_pb2.Flow.DESCRIPTOR)]
            if not known:
                raise ValueError(f"invalid field_mask paths: {list(request.field_mask.paths)}")
            self.mask = field_mask_pb2.FieldMask(paths=known)
        self.node_name = node_name

    def response(self, msg: flow_pb2.Flow) -> bytes:
        """A serialized GetFlowsResponse with the field mask (if any) applied."""
        if self.mask is None:
            return flow_response(msg, self.node_name).SerializeToString()
        masked = flow_pb2.Flow()
        self.mask.MergeMessage(msg, masked)
        return flow_response(masked, self.node_name).SerializeToString()


# ---------------------------------------------------------------------------------------------
# Services
# ---------------------------------------------------------------------------------------------

def client_id(context: grpc.ServicerContext) -> str:
    """Who a stream counts against: the client certificate's CN under mTLS, else the peer's address.

    The port is left out (each connection has its own), so one host's connections share a limit; over
    a unix socket every local client is one peer.
    """
    auth = context.auth_context() or {}
    names = auth.get("x509_common_name") or []
    if names:
        return "cn:" + names[0].decode(errors="replace")
    peer = context.peer() or "unknown"
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        return kind + ":" + rest.rpartition(":")[0]
    return kind


def observer_handler(servicer: Any) -> grpc.GenericRpcHandler:
    """observer.Observer with GetFlows answering pre-serialized bytes (no per-response copy).

    ``servicer`` has GetFlows (yielding bytes), GetNodes, GetNamespaces and ServerStatus.
    """
    ob = observer_pb2
    return grpc.method_handlers_generic_handler("observer.Observer", {
        "GetFlows": grpc.unary_stream_rpc_method_handler(
            servicer.GetFlows, request_deserializer=ob.GetFlowsRequest.FromString),
        "GetNodes": grpc.unary_unary_rpc_method_handler(
            servicer.GetNodes, request_deserializer=ob.GetNodesRequest.FromString,
            response_serializer=ob.GetNodesResponse.SerializeToString),
        "GetNamespaces": grpc.unary_unary_rpc_method_handler(
            servicer.GetNamespaces, request_deserializer=ob.GetNamespacesRequest.FromString,
            response_serializer=ob.GetNamespacesResponse.SerializeToString),
        "ServerStatus": grpc.unary_unary_rpc_method_handler(
            servicer.ServerStatus, request_deserializer=ob.ServerStatusRequest.FromString,
            response_serializer=ob.ServerStatusResponse.SerializeToString),
    })


def health_handler() -> grpc.GenericRpcHandler:
    """grpc.health.v1.Health/Check answering SERVING (``hubble status`` asks it first).

    Written out by hand: HealthCheckResponse{status: SERVING} is the two bytes
    ``08 01``; the request (a service name) needs no decoding.
    """
    serving = b"\x08\x01"

    def check(request: bytes, context: grpc.ServicerContext) -> bytes:
        return serving

    return grpc.method_handlers_generic_handler("grpc.health.v1.Health", {
        "Check": grpc.unary_unary_rpc_method_handler(check),
    })


# ---------------------------------------------------------------------------------------------
# Listening
# ---------------------------------------------------------------------------------------------

def new_grpc_server(max_workers: int, keepalive_s: float, keepalive_timeout_s: float) -> grpc.Server:
    """A gRPC server whose keepalive pings find clients that vanished without closing their streams."""
    # Past max_workers * 2 calls waiting, gRPC itself answers RESOURCE_EXHAUSTED instead of queueing.
    return grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="observer"),
                       options=[
                           ("grpc.so_reuseport", 0),
                           # A follower whose client vanished without closing (a node gone, a
                           # partition) would hold its stream forever: pings find it.
                           ("grpc.keepalive_time_ms", int(keepalive_s * 1000)),
                           ("grpc.keepalive_timeout_ms", int(keepalive_timeout_s * 1000)),
                           ("grpc.http2.ping_timeout_ms", int(keepalive_timeout_s * 1000)),
                           ("grpc.http2.max_pings_without_data", 0),
                           # clients' own keepalive pings (the hubble source's every 30 s) are welcome
                           ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
                       ],
                       maximum_concurrent_rpcs=max_workers * 2)


def listen(server: grpc.Server, address: str, tls: ObserverTLSConfig | None, where: str,
           tcp_hint: str = "") -> int:
    """Binds ``address`` (host:port, :port or unix:PATH); returns the port, 0 for a unix socket.

    A failure raises OSError naming ``where`` (the config key or option of the address) and the reason;
    ``tcp_hint`` is added to a TCP bind failure (which ports to avoid, how to turn the server off).
    """
    shown = address
    if address.startswith(":"):
        address = "[::]" + address
    path = unix_path(address)
    if path is not None:
        parent = Path(path).parent
        if not parent.exists():
            parent.mkdir(parents=True, mode=0o700)
        busy = _unix_in_use(path)
        if busy:  # gRPC would unlink the file and take the name from the process serving it
            raise OSError(f"{where}: cannot listen on {shown}: {busy}")
    try:
        if tls is not None:
            creds = grpc.ssl_server_credentials(
                [(Path(tls.key_file).read_bytes(), Path(tls.cert_file).read_bytes())],
                root_certificates=Path(tls.client_ca_file).read_bytes() if tls.client_ca_file else None,
                require_client_auth=tls.client_ca_file is not None)
            port = server.add_secure_port(address, creds)
        else:
            port = server.add_insecure_port(address)
    except RuntimeError:  # grpc >= 1.5x: "Failed to bind to address ..."
        port = 0
    if path is None:
        if port == 0:
            raise OSError(f"{where}: cannot listen on {shown}: {_bind_reason(address)}"
                          + (f" {tcp_hint}" if tcp_hint else ""))
        return port
    if port == 0:
        raise OSError(f"{where}: cannot listen on {shown}: {_unix_bind_reason(path)}")
    os.chmod(path, 0o600)  # flows are private to this user (the parent directory is too, when ours)
    return 0


def _bind_reason(address: str) -> str:
    """Why a TCP address cannot be bound, found by trying it (gRPC's own error omits the reason)."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]") or "::"
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except (OSError, ValueError) as exc:
        return f"cannot resolve it ({exc})"
    family, _, _, _, sockaddr = infos[0]
    probe = socket.socket(family, socket.SOCK_STREAM)
    try:
        probe.bind(sockaddr)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return "the address is already in use by another process"
        return exc.strerror or str(exc)
    finally:
        probe.close()
    return "gRPC could not bind it"


def _unix_in_use(path: str) -> str | None:
    """Why ``path`` cannot become the socket: another process serves it, or it is not a socket.

    A socket file nobody listens on is left over from a process that died; it is replaced.
    """
    if not os.path.lexists(path):
        return None
    if not stat.S_ISSOCK(os.lstat(path).st_mode):
        return "the path exists and is not a socket"
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except OSError:
        return None  # stale
    finally:
        probe.close()
    return "another process is serving this socket (a second server on the same path?)"


def _unix_bind_reason(path: str) -> str:
    parent = Path(path).parent
    if not parent.is_dir():
        return f"the directory {parent} does not exist"
    if not os.access(parent, os.W_OK):
        return f"the directory {parent} is not writable by this user"
    return "gRPC could not bind it"

