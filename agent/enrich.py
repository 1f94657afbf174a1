"""Endpoint enrichment: who is behind an IP, in Hubble's terms.

Fills the ``src_*``/``dst_*`` endpoint columns of flow batches (namespace, pod,
labels, workload and kind, identity, service, names, cluster) from

* node-level knowledge — this node's IPs are ``reserved:host`` (identity 1),
  other nodes' InternalIPs ``reserved:remote-node`` (6), configured health IPs
  ``reserved:health`` (4), the API server's endpoints get ``reserved:kube-apiserver``
  (7), and anything unknown is ``reserved:world`` (2), as Cilium labels them;
* the Kubernetes API — pods, services, EndpointSlices and nodes, listed and
  then watched by :mod:`flowship.agent.kubernetes` into a :class:`KubeState`;
* a static map — CIDRs with what to say about them, longest prefix first;
* DNS answers seen by the agent — IP → names, for ``*_names``.

Lookups are per *distinct* IP of a batch (dictionary-encode, resolve, take), so
the per-row work stays in Arrow. Identities of pods are a stable hash of their
identity labels: the same on every node and across restarts, so that flows
from different agents agree, at the price of a small chance of collisions
(24-bit space). See docs/agent-enrichment.md.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import socket
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
import structlog

from flowship.agent import netlink
from flowship.agent.kubernetes import (
    DEFAULT_EXCLUDED_LABELS,
    RESOURCES,
    KubeClient,
    KubernetesConfig,
    KubeWatcher,
    in_cluster_credentials,
    kubeconfig_credentials,
)
from flowship.config import Duration
from flowship.metrics import Metrics

# Cilium's reserved identities (numbers and labels as Hubble shows them).
RESERVED_IDENTITIES: dict[str, int] = {
    "host": 1, "world": 2, "unmanaged": 3, "health": 4, "init": 5, "remote-node": 6, "kube-apiserver": 7,
    "ingress": 8,
}
ReservedName = Literal["host", "world", "unmanaged", "health", "init", "remote-node", "kube-apiserver", "ingress"]

# Cluster-local identities are hashed into [256, 2^24): below Cilium's local-scope bit.
IDENTITY_MIN = 256
IDENTITY_SPACE = (1 << 24) - IDENTITY_MIN


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------

@dataclass
class StaticEndpoint:
    """One entry of ``enrich.static``: what to say about the IPs of a CIDR."""

    cidr: str
    namespace: str | None = None
    pod: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    workload: str | None = None
    workload_kind: str | None = None
    service: str | None = None
    service_namespace: str | None = None
    names: list[str] = field(default_factory=list)
    cluster: str | None = None
    identity: int | None = None
    reserved: ReservedName | None = None

    def validate(self) -> list[str]:
        problems = []
        try:
            ipaddress.ip_network(self.cidr, strict=False)
        except ValueError:
            problems.append(f"cidr: expected an IP network like 10.0.1.0/24 or an address, got {self.cidr!r}")
        if self.identity is not None and not 0 < self.identity < 2**32:
            problems.append(f"identity: expected 1..4294967295, got {self.identity}")
        return problems


@dataclass
class EnrichConfig:
    """``enrich:`` in the agent's config. Everything is optional."""

    static: list[StaticEndpoint] = field(default_factory=list)
    kubernetes: KubernetesConfig | None = None
    cluster: str = "default"               # cluster name of endpoints (Cilium's cluster-name)
    host_ips: list[str] = field(default_factory=list)      # this node's IPs, besides detected ones
    detect_host_ips: bool = True           # add the addresses of this network namespace's interfaces
    health_ips: list[str] = field(default_factory=list)
    unknown_as_world: bool = True          # unknown IPs get reserved:world (identity 2)
    dns_names: bool = True                 # learn IP → names from DNS answers the agent parsed
    dns_min_ttl: Duration = Duration(3600.0)
    dns_max_ips: int = 65536
    rebuild_interval: Duration = Duration(1.0)  # at most one index rebuild per interval after changes

    def validate(self) -> list[str]:
        problems = []
        for key in ("host_ips", "health_ips"):
            for i, ip in enumerate(getattr(self, key)):
                try:
                    ipaddress.ip_address(ip)
                except ValueError:
                    problems.append(f"{key}[{i}]: expected an IP address, got {ip!r}")
        return problems


# ---------------------------------------------------------------------------------------------
# What is known about one IP
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class EndpointInfo:
    """The endpoint columns of one side of a flow (without the ``src_``/``dst_`` prefix)."""

    identity: int | None = None
    cluster: str | None = None
    namespace: str | None = None
    pod: str | None = None
    labels: tuple[str, ...] | None = None
    workload: str | None = None
    workload_kind: str | None = None
    service: str | None = None
    service_namespace: str | None = None
    names: tuple[str, ...] | None = None


ENDPOINT_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(EndpointInfo))


def reserved_info(name: str, extra_labels: Iterable[str] = ()) -> EndpointInfo:
    labels = tuple(sorted({f"reserved:{name}", *extra_labels}))
    return EndpointInfo(identity=RESERVED_IDENTITIES[name], labels=labels)


def identity_for_labels(labels: Iterable[str]) -> int:
    """A stable identity number for a label set (same set → same number everywhere)."""
    digest = hashlib.sha256("\x00".join(sorted(set(labels))).encode()).digest()
    return IDENTITY_MIN + int.from_bytes(digest[:8], "big") % IDENTITY_SPACE


def hubble_labels(labels: dict[str, str], namespace: str | None, *, service_account: str | None = None,
                  cluster: str | None = None, exclude: Iterable[str] = ()) -> tuple[str, ...]:
    """``{"app": "frontend"}`` → ``("k8s:app=frontend", "k8s:io.kubernetes.pod.namespace=ns", ...)``."""
    skip = set(exclude)
    out = {f"k8s:{k}={v}" for k, v in labels.items() if k not in skip}
    if namespace:
        out.add(f"k8s:io.kubernetes.pod.namespace={namespace}")
    if service_account:
        out.add(f"k8s:io.cilium.k8s.policy.serviceaccount={service_account}")
    if cluster:
        out.add(f"k8s:io.cilium.k8s.policy.cluster={cluster}")
    return tuple(sorted(out))


_CRONJOB_SUFFIX = re.compile(r"^(.+)-\d{8,}$")


def workload_of(owner_refs: list[dict] | None, labels: dict[str, str]) -> tuple[str | None, str | None]:
    """(name, kind) of the controller that owns a pod, as Hubble's ``workloads`` shows it.

    A ReplicaSet ``frontend-5d8f7c9b4`` is the Deployment ``frontend`` (its
    pod-template-hash suffix removed); a Job named ``<cronjob>-<minutes>`` is
    that CronJob's.
    """
    owner = next((o for o in owner_refs or [] if o.get("controller")), None)
    if owner is None and owner_refs:
        owner = owner_refs[0]
    if not owner or not owner.get("name"):
        return None, None
    name, kind = owner["name"], owner.get("kind") or ""
    if kind == "ReplicaSet":
        template_hash = labels.get("pod-template-hash")
        if template_hash and name.endswith("-" + template_hash):
            return name[: -len(template_hash) - 1], "Deployment"
        head, dash, tail = name.rpartition("-")
        if dash and head and tail.isalnum():
            return head, "Deployment"
        return name, "ReplicaSet"
    if kind == "Job":
        match = _CRONJOB_SUFFIX.match(name)
        if match:
            return match.group(1), "CronJob"
        return name, "Job"
    return name, kind or None


# ---------------------------------------------------------------------------------------------
# Kubernetes objects → compact entries
# ---------------------------------------------------------------------------------------------

def _meta(obj: dict) -> dict:
    return obj.get("metadata") or {}


def _key(obj: dict) -> str:
    meta = _meta(obj)
    return meta.get("uid") or f"{meta.get('namespace', '')}/{meta.get('name', '')}"


@dataclass(frozen=True, slots=True)
class _PodEntry:
    ips: tuple[str, ...]
    info: EndpointInfo


@dataclass(frozen=True, slots=True)
class _ServiceEntry:
    namespace: str
    name: str
    ips: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class _SliceEntry:
    namespace: str
    service: str | None
    ips: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class _NodeEntry:
    name: str
    ips: tuple[str, ...]


def pod_entry(obj: dict, cluster: str, exclude: Iterable[str]) -> _PodEntry | None:
    meta, spec, status = _meta(obj), obj.get("spec") or {}, obj.get("status") or {}
    if spec.get("hostNetwork"):
        return None  # its IPs are the node's: reserved:host / remote-node
    if status.get("phase") in ("Succeeded", "Failed"):
        return None  # finished pods give their IPs back
    ips = tuple(p["ip"] for p in status.get("podIPs") or [] if p.get("ip"))
    if not ips and status.get("podIP"):
        ips = (status["podIP"],)
    if not ips:
        return None
    namespace = meta.get("namespace")
    pod_labels = meta.get("labels") or {}
    labels = hubble_labels(pod_labels, namespace, service_account=spec.get("serviceAccountName"),
                           cluster=cluster, exclude=exclude)
    workload, kind = workload_of(meta.get("ownerReferences"), pod_labels)
    info = EndpointInfo(identity=identity_for_labels(labels), cluster=cluster, namespace=namespace,
                        pod=meta.get("name"), labels=labels, workload=workload, workload_kind=kind)
    return _PodEntry(ips, info)


def service_entry(obj: dict) -> _ServiceEntry | None:
    meta, spec = _meta(obj), obj.get("spec") or {}
    ips = [ip for ip in spec.get("clusterIPs") or [spec.get("clusterIP")] if ip and ip != "None"]
    ips += spec.get("externalIPs") or []
    ips += [i["ip"] for i in ((obj.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
            if i.get("ip")]
    return _ServiceEntry(meta.get("namespace", ""), meta.get("name", ""), tuple(dict.fromkeys(ips)))


def slice_entry(obj: dict) -> _SliceEntry:
    meta = _meta(obj)
    service = (meta.get("labels") or {}).get("kubernetes.io/service-name")
    ips: list[str] = []
    for endpoint in obj.get("endpoints") or []:
        ips.extend(endpoint.get("addresses") or [])
    return _SliceEntry(meta.get("namespace", ""), service, tuple(dict.fromkeys(ips)))


def node_entry(obj: dict) -> _NodeEntry:
    addresses = (obj.get("status") or {}).get("addresses") or []
    ips = tuple(a["address"] for a in addresses if a.get("type") == "InternalIP" and a.get("address"))
    return _NodeEntry(_meta(obj).get("name", ""), ips)


class KubeState:
    """The watched objects, reduced to what enrichment needs; thread-safe."""

    def __init__(self, cluster: str, exclude_labels: Iterable[str] = DEFAULT_EXCLUDED_LABELS) -> None:
        self.cluster = cluster
        self.exclude = tuple(exclude_labels)
        self.lock = threading.Lock()
        self.generation = 0
        self.objects: dict[str, dict[str, Any]] = {name: {} for name in RESOURCES}
        self.synced: set[str] = set()

    def _convert(self, resource: str, obj: dict) -> Any:
        if resource == "pods":
            return pod_entry(obj, self.cluster, self.exclude)
        if resource == "services":
            return service_entry(obj)
        if resource == "endpointslices":
            return slice_entry(obj)
        return node_entry(obj)

    def replace(self, resource: str, items: list[dict]) -> None:
        """A fresh list: the store for that resource becomes exactly these objects."""
        converted = {}
        for obj in items:
            entry = self._convert(resource, obj)
            if entry is not None:
                converted[_key(obj)] = entry
        with self.lock:
            self.objects[resource] = converted
            self.synced.add(resource)
            self.generation += 1

    def apply(self, resource: str, event_type: str, obj: dict) -> None:
        key = _key(obj)
        entry = None if event_type == "DELETED" else self._convert(resource, obj)
        with self.lock:
            store = self.objects[resource]
            if entry is None:
                if store.pop(key, None) is None:
                    return
            else:
                store[key] = entry
            self.generation += 1

    def counts(self) -> dict[str, int]:
        with self.lock:
            return {name: len(store) for name, store in self.objects.items()}


# ---------------------------------------------------------------------------------------------
# The index: IP → EndpointInfo
# ---------------------------------------------------------------------------------------------

def _ip_key(ip: str) -> tuple[int, int] | None:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return None
    return addr.version, int(addr)


class StaticMap:
    """Longest-prefix match over the static entries (per address family and prefix length)."""

    def __init__(self, entries: Iterable[StaticEndpoint], cluster: str) -> None:
        # (version, prefix length) -> {network int -> info}, longest prefixes first
        tables: dict[tuple[int, int], dict[int, EndpointInfo]] = {}
        for entry in entries:
            net = ipaddress.ip_network(entry.cidr, strict=False)
            tables.setdefault((net.version, net.prefixlen), {})[int(net.network_address)] = self._info(entry, cluster)
        self.tables = sorted(tables.items(), key=lambda kv: -kv[0][1])

    @staticmethod
    def _info(entry: StaticEndpoint, cluster: str) -> EndpointInfo:
        if entry.reserved:
            base = reserved_info(entry.reserved)
            labels = base.labels
            identity = entry.identity or base.identity
        else:
            labels = hubble_labels(entry.labels, entry.namespace,
                                   cluster=(entry.cluster or cluster) if entry.namespace else None)
            identity = entry.identity or (identity_for_labels(labels) if labels else None)
        return EndpointInfo(
            identity=identity, cluster=entry.cluster or (cluster if entry.namespace else None),
            namespace=entry.namespace, pod=entry.pod, labels=labels or None, workload=entry.workload,
            workload_kind=entry.workload_kind or ("Deployment" if entry.workload else None),
            service=entry.service, service_namespace=entry.service_namespace or (
                entry.namespace if entry.service else None),
            names=tuple(entry.names) or None)

    def lookup(self, version: int, value: int) -> EndpointInfo | None:
        bits = 32 if version == 4 else 128
        for (v, plen), table in self.tables:
            if v != version:
                continue
            mask = ((1 << plen) - 1) << (bits - plen) if plen else 0
            hit = table.get(value & mask)
            if hit is not None:
                return hit
        return None


class Index:
    """An immutable snapshot: node IPs, pods, services, static map; memoised per IP."""

    def __init__(self, *, host_ips: Iterable[str], health_ips: Iterable[str], static: StaticMap,
                 state: KubeState | None, node_name: str, cluster: str, unknown_as_world: bool,
                 kube_apiserver: bool) -> None:
        self.static = static
        self.unknown_as_world = unknown_as_world
        self.exact: dict[tuple[int, int], EndpointInfo] = {}
        self._memo: dict[str, EndpointInfo | None] = {}
        apiserver: set[tuple[int, int]] = set()
        host = {k for ip in host_ips if (k := _ip_key(ip))}
        remote: set[tuple[int, int]] = set()
        pods: dict[tuple[int, int], EndpointInfo] = {}
        services: dict[tuple[int, int], tuple[str, str]] = {}
        backends: dict[tuple[int, int], tuple[str, str]] = {}
        if state is not None:
            with state.lock:
                for node in state.objects["nodes"].values():
                    keys = {k for ip in node.ips if (k := _ip_key(ip))}
                    (host if node.name == node_name else remote).update(keys)
                for pod in state.objects["pods"].values():
                    for ip in pod.ips:
                        if (k := _ip_key(ip)) is not None:
                            pods[k] = pod.info
                for svc in state.objects["services"].values():
                    for ip in svc.ips:
                        if (k := _ip_key(ip)) is not None:
                            services[k] = (svc.namespace, svc.name)
                for sl in sorted(state.objects["endpointslices"].values(),
                                 key=lambda s: (s.namespace, s.service or "")):
                    if not sl.service:
                        continue
                    for ip in sl.ips:
                        if (k := _ip_key(ip)) is None:
                            continue
                        backends.setdefault(k, (sl.namespace, sl.service))
                        if kube_apiserver and sl.namespace == "default" and sl.service == "kubernetes":
                            apiserver.add(k)
        for k, info in pods.items():
            svc = backends.get(k)
            self.exact[k] = replace(info, service=svc[1], service_namespace=svc[0]) if svc else info
        for k, (ns, name) in services.items():
            self.exact.setdefault(k, EndpointInfo(cluster=cluster, namespace=ns, service=name, service_namespace=ns))
        for k in apiserver - host - remote:
            self.exact.setdefault(k, reserved_info("kube-apiserver"))
        for k in remote:
            extra = ("reserved:kube-apiserver",) if k in apiserver else ()
            self.exact[k] = reserved_info("remote-node", extra)
        for ip in health_ips:
            if (k := _ip_key(ip)) is not None:
                self.exact[k] = reserved_info("health")
        for k in host:
            extra = ("reserved:kube-apiserver",) if k in apiserver else ()
            self.exact[k] = reserved_info("host", extra)
        self.world = reserved_info("world")

    def lookup(self, ip: str) -> EndpointInfo | None:
        if ip in self._memo:
            return self._memo[ip]
        key = _ip_key(ip)
        info = None
        if key is not None:
            info = self.exact.get(key)
            if info is None:
                info = self.static.lookup(*key)
            if info is None and self.unknown_as_world:
                info = self.world
        if len(self._memo) < 1_000_000:
            self._memo[ip] = info
        return info


# ---------------------------------------------------------------------------------------------
# Names learnt from DNS answers
# ---------------------------------------------------------------------------------------------

class DnsNames:
    """IP → names (query and CNAMEs of the answers that returned it), expiring, bounded."""

    def __init__(self, min_ttl_s: float, max_ips: int) -> None:
        self.min_ttl_ns = int(min_ttl_s * 1e9)
        self.max_ips = max_ips
        self.lock = threading.Lock()
        self._by_ip: OrderedDict[str, dict[str, int]] = OrderedDict()  # ip -> {name: expiry ns}

    def learn(self, ip: str, names: Iterable[str], ttl_s: int, now_ns: int) -> None:
        expiry = now_ns + max(self.min_ttl_ns, int(ttl_s) * 1_000_000_000)
        with self.lock:
            entry = self._by_ip.pop(ip, None) or {}
            for name in names:
                name = name.rstrip(".").lower()
                if name:
                    entry[name] = max(entry.get(name, 0), expiry)
            self._by_ip[ip] = entry
            while len(self._by_ip) > self.max_ips:
                self._by_ip.popitem(last=False)

    def learn_batch(self, batch: pa.RecordBatch) -> int:
        """Learn from the DNS response rows of a flow batch; returns the rows used."""
        mask = pc.and_kleene(pc.equal(batch.column("l7_type"), "RESPONSE"),
                             pc.greater(pc.list_value_length(batch.column("dns_ips")), 0)).fill_null(False)
        rows = batch.filter(mask)
        times = rows.column("time").cast(pa.int64()).to_pylist()
        for t, query, ips, cnames, ttl in zip(times, *(rows.column(c).to_pylist() for c in (
                "dns_query", "dns_ips", "dns_cnames", "dns_ttl")), strict=True):
            names = [query or "", *(cnames or [])]
            for ip in ips:
                self.learn(ip, names, ttl or 0, t if t is not None else time.time_ns())
        return rows.num_rows

    def names(self, ip: str, now_ns: int) -> tuple[str, ...] | None:
        with self.lock:
            entry = self._by_ip.get(ip)
            if not entry:
                return None
            live = sorted(name for name, expiry in entry.items() if expiry > now_ns)
            if len(live) != len(entry):
                for name in [n for n, e in entry.items() if e <= now_ns]:
                    del entry[name]
                if not entry:
                    del self._by_ip[ip]
            return tuple(live) or None




# ---------------------------------------------------------------------------------------------
# The enricher
# ---------------------------------------------------------------------------------------------

_IFADDRMSG = struct.Struct("=BBBBI")  # struct ifaddrmsg
RTM_NEWADDR, RTM_GETADDR = 20, 22
IFA_ADDRESS, IFA_LOCAL = 1, 2


def parse_addr_messages(data: bytes) -> tuple[list[str], bool]:
    """Addresses in RTM_NEWADDR messages of one netlink read, and whether the dump ended.

    IFA_LOCAL is the interface's own address where both are given (on point-to-point links IFA_ADDRESS
    is the peer's); IPv6 gives IFA_ADDRESS only.
    """
    out: list[str] = []
    found, done = netlink.messages(data, "netlink RTM_GETADDR")
    for mtype, body, end in found:
        if mtype != RTM_NEWADDR:
            continue
        family = data[body]
        attrs = netlink.attributes(data, body + _IFADDRMSG.size, end)
        raw = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)
        if raw and family in (socket.AF_INET, socket.AF_INET6):
            out.append(socket.inet_ntop(family, raw))
    return out, done


def detect_local_ips() -> list[str]:
    """Addresses of this network namespace's interfaces (the node's own IPs, which become reserved:host).

    One RTM_GETADDR dump over a NETLINK_ROUTE socket (the socket lives in the calling thread's network
    namespace). No dependency beyond the standard library; a failure raises rather than returning [],
    because an empty list silently turns the node's own traffic into reserved:world.
    """
    out: list[str] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0) as sock:
        sock.bind((0, 0))
        sock.send(netlink.dump_request(RTM_GETADDR, 1, _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)))
        done = False
        while not done:
            addrs, done = parse_addr_messages(sock.recv(1 << 16))
            out.extend(addrs)
    return sorted(set(out))


class Enricher:
    """Fills endpoint columns of flow batches; owns the Kubernetes watchers if configured."""

    def __init__(self, config: EnrichConfig, node_name: str, metrics: Metrics | None = None,
                 log: Any = None, scratch_dir: str | None = None) -> None:
        self.config = config
        self.node_name = node_name
        self.metrics = metrics
        self.log = log or structlog.get_logger().bind(component="enrich")
        self.static = StaticMap(config.static, config.cluster)
        self.host_ips = list(config.host_ips) + (detect_local_ips() if config.detect_host_ips else [])
        self.state: KubeState | None = None
        self.watcher: KubeWatcher | None = None
        self.dns = DnsNames(float(config.dns_min_ttl), config.dns_max_ips) if config.dns_names else None
        kube = config.kubernetes
        if kube is not None and kube.enabled:
            if kube.kubeconfig:
                creds = kubeconfig_credentials(kube.kubeconfig, kube.context, scratch_dir)
            else:
                creds = in_cluster_credentials(kube.service_account_dir)
            self.state = KubeState(config.cluster, kube.exclude_labels)
            self.watcher = KubeWatcher(KubeClient(creds, float(kube.request_timeout)), self.state, kube,
                                       metrics, self.log)
        self._index: Index | None = None
        self._index_generation = -1
        self._index_built = 0.0
        self._lock = threading.Lock()

    def start(self) -> None:
        if self.watcher is not None:
            self.watcher.start()

    def stop(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()

    def wait_synced(self, timeout: float = 30.0) -> bool:
        """True once every watched resource was listed (immediately without Kubernetes)."""
        return True if self.watcher is None else self.watcher.wait_synced(timeout)

    def index(self, force: bool = False) -> Index:
        """The current snapshot; rebuilt after changes, at most once per rebuild_interval."""
        with self._lock:
            generation = self.state.generation if self.state is not None else 0
            now = time.monotonic()
            stale = self._index is None or generation != self._index_generation
            if stale and (force or self._index is None
                          or now - self._index_built >= float(self.config.rebuild_interval)):
                kube = self.config.kubernetes
                self._index = Index(host_ips=self.host_ips, health_ips=self.config.health_ips,
                                    static=self.static, state=self.state, node_name=self.node_name,
                                    cluster=self.config.cluster, unknown_as_world=self.config.unknown_as_world,
                                    kube_apiserver=bool(kube and kube.kube_apiserver))
                self._index_generation = generation
                self._index_built = now
                if self.metrics is not None and self.state is not None:
                    gauge = self.metrics.gauge("flowship_k8s_objects", "Kubernetes objects held for enrichment.",
                                               ["resource"])
                    for resource, count in self.state.counts().items():
                        gauge.labels(resource).set(count)
            assert self._index is not None
            return self._index

    def lookup(self, ip: str, now_ns: int | None = None) -> EndpointInfo | None:
        info = self.index().lookup(ip)
        return self._with_names(ip, info, time.time_ns() if now_ns is None else now_ns)

    def _with_names(self, ip: str, info: EndpointInfo | None, now_ns: int) -> EndpointInfo | None:
        if self.dns is None:
            return info
        names = self.dns.names(ip, now_ns)
        if not names:
            return info
        merged = tuple(sorted(set(names) | set(info.names or ()))) if info else names
        return replace(info, names=merged) if info else EndpointInfo(names=merged)

    def learn_dns(self, batch: pa.RecordBatch) -> int:
        """Remember the names of IPs in DNS answers of this batch (before enriching it)."""
        return self.dns.learn_batch(batch) if self.dns is not None else 0

    def enrich(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        """Fill the src_/dst_ endpoint columns that are null; values already present are kept."""
        if batch.num_rows == 0:
            return batch
        index = self.index()
        now = time.time_ns()
        names = batch.schema.names
        columns = list(batch.columns)
        for side in ("src", "dst"):
            encoded = pc.dictionary_encode(batch.column(f"ip_{side}"))
            if isinstance(encoded, pa.ChunkedArray):
                encoded = encoded.combine_chunks()
            infos = [self._with_names(ip, index.lookup(ip), now) for ip in encoded.dictionary.to_pylist()]
            for attr in ENDPOINT_FIELDS:
                name = f"{side}_{attr}"
                pos = names.index(name)
                field_type = batch.schema.field(pos).type
                per_ip = pa.array([None if info is None else _value(getattr(info, attr)) for info in infos],
                                  type=field_type)
                filled = per_ip.take(encoded.indices)
                existing = columns[pos]
                columns[pos] = filled if existing.null_count == len(existing) else pc.coalesce(existing, filled)
        return pa.RecordBatch.from_arrays(columns, schema=batch.schema)


def _value(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v
