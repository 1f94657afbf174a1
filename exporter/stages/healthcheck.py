"""The ``healthcheck`` stage: removes health-check traffic that drowns real flows.

Kubernetes probes, load-balancer health paths, Cilium's own node and endpoint
health checks (and, if asked, Prometheus scrapes) are a large share of the
flows of a quiet cluster and tell nothing about the application. Each rule
is a column mask; the rules that recognise a request by its HTTP content
(User-Agent, path) also remove the rest of that exchange: the response has
no User-Agent, and the TCP flows of the connection carry no HTTP at all, so
they are matched by their connection hash (``flowship.model.ids``), which is
the same for both directions and for L3/L4 and L7 flows of one connection.

Pairing rule, precisely: when a flow is removed by an HTTP rule
(``kube_probe``, ``health_paths``, ``prometheus``), its connection hash is
remembered for ``connection_ttl`` of flow time (the newest flow time seen),
at most ``connection_memory`` connections (the least recently seen are
forgotten first). Every flow whose connection hash is remembered — in the
same batch, before or after the request, or in any later batch — is removed
too and counted as ``same_connection``. Flows of that connection that were
already passed on in an earlier batch (a SYN that arrived before the request
was seen) stay delivered.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from flowship.config import Duration
from flowship.stages.columns import MaskStage, Memo

if TYPE_CHECKING:  # Arrow and numpy are imported where rows are computed: a config validates without them
    import numpy as np
    import pyarrow as pa

DEFAULT_PATHS = ["/healthz", "/readyz", "/livez", "/health", "/ping"]

# Cilium reserved identities and labels of node-level endpoints.
HOST_IDENTITY, HEALTH_IDENTITY, REMOTE_NODE_IDENTITY = 1, 4, 6
NODE_IDENTITIES = (HOST_IDENTITY, HEALTH_IDENTITY, REMOTE_NODE_IDENTITY)
HEALTH_LABEL = "reserved:health"
NODE_LABELS = ("reserved:host", "reserved:health", "reserved:remote-node")
ICMP_ECHO = {"ICMPv4": (8, 0), "ICMPv6": (128, 129)}

# Reasons, in the order a removed flow is attributed to them.
REASONS = ("kube_probe", "health_path", "prometheus", "cilium_health", "node_health", "same_connection")


@dataclass
class HealthcheckConfig:
    """``type: healthcheck`` — every rule can be switched off on its own."""

    kube_probe: bool = True  # HTTP requests with User-Agent kube-probe/*
    health_paths: bool = True  # HTTP requests for one of `paths`
    paths: list[str] = field(default_factory=lambda: list(DEFAULT_PATHS))
    cilium_health: bool = True  # flows to/from Cilium's health endpoint (reserved:health, identity 4)
    node_health: bool = True  # node-to-node probes: TCP health_port and ICMP echo between node endpoints
    health_port: int = 4240
    prometheus: bool = False  # scrapes: a `prometheus_paths` path with User-Agent Prometheus/*
    prometheus_paths: list[str] = field(default_factory=lambda: ["/metrics"])
    same_connection: bool = True  # remove the rest of the connection of a removed HTTP exchange
    connection_memory: int = 65536
    connection_ttl: Duration = Duration(120.0)

    def validate(self) -> list[str]:
        problems = []
        for name in ("paths", "prometheus_paths"):
            for i, p in enumerate(getattr(self, name)):
                if not isinstance(p, str) or not p.startswith("/"):
                    problems.append(f"{name}[{i}]: expected a path starting with '/', got {p!r}")
        if isinstance(self.health_port, int) and not 0 < self.health_port < 65536:
            problems.append(f"health_port: expected a port 1..65535, got {self.health_port}")
        if isinstance(self.connection_memory, int) and self.connection_memory < 1:
            problems.append(f"connection_memory: expected an integer >= 1, got {self.connection_memory}")
        return problems


class RecentConnections:
    """A bounded set of connection hashes, each kept for ``ttl_ns`` of flow time."""

    def __init__(self, capacity: int, ttl_ns: int) -> None:
        import numpy as np

        self.capacity = capacity
        self.ttl_ns = ttl_ns
        self.keys = np.zeros(0, dtype=np.uint64)  # sorted
        self.seen = np.zeros(0, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.keys)

    def expire(self, now_ns: int) -> None:
        alive = self.seen >= now_ns - self.ttl_ns
        if not alive.all():
            self.keys, self.seen = self.keys[alive], self.seen[alive]

    def contains(self, hashes: np.ndarray) -> np.ndarray:
        import numpy as np

        if len(self.keys) == 0:
            return np.zeros(len(hashes), dtype=bool)
        pos = np.searchsorted(self.keys, hashes)
        pos[pos == len(self.keys)] = 0
        return self.keys[pos] == hashes

    def add(self, hashes: np.ndarray, now_ns: int) -> None:
        """Insert or refresh ``hashes`` as seen at ``now_ns``; expire and trim."""
        import numpy as np

        keys = np.concatenate([self.keys, hashes.astype(np.uint64)])
        seen = np.concatenate([self.seen, np.full(len(hashes), now_ns, dtype=np.int64)])
        order = np.lexsort((-seen, keys))  # by key, newest first
        keys, seen = keys[order], seen[order]
        first = np.ones(len(keys), dtype=bool)
        first[1:] = keys[1:] != keys[:-1]
        keys, seen = keys[first], seen[first]
        self.keys, self.seen = keys, seen
        self.expire(now_ns)
        keys, seen = self.keys, self.seen
        if len(keys) > self.capacity:
            newest = np.argsort(-seen, kind="stable")[: self.capacity]
            newest.sort()
            keys, seen = keys[newest], seen[newest]
        self.keys, self.seen = keys, seen


def _user_agent_starts(batch: pa.RecordBatch, prefix: str) -> np.ndarray:
    """User-Agent (column, or the headers list when the column is empty) starts with ``prefix``."""
    import pyarrow.compute as pc

    from flowship.model.columns import list_any, not_null, to_mask

    ua = batch.column("http_user_agent")
    mask = to_mask(pc.starts_with(ua, prefix))
    headers = batch.column("http_headers")
    fallback = ~not_null(ua) & not_null(headers)
    if fallback.any():
        def element(h: pa.Array) -> np.ndarray:
            key = pc.utf8_lower(pc.struct_field(h, "key"))
            return to_mask(pc.equal(key, "user-agent")) & to_mask(pc.starts_with(pc.struct_field(h, "value"), prefix))

        mask |= fallback & list_any(headers, element)
    return mask


def _labels_contain(batch: pa.RecordBatch, column: str, labels: tuple[str, ...], rows: np.ndarray) -> np.ndarray:
    """Rows (restricted to ``rows``) whose label list holds one of ``labels``."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from flowship.model.columns import list_any, to_mask

    out = np.zeros(batch.num_rows, dtype=bool)
    idx = np.flatnonzero(rows)
    if len(idx) == 0:
        return out
    sub = batch.column(column).take(pa.array(idx))
    value_set = pa.array(labels, pa.string())
    out[idx] = list_any(sub, lambda values: to_mask(pc.is_in(values, value_set=value_set)))
    return out


def _endpoint_in(batch: pa.RecordBatch, prefix: str, identities: tuple[int, ...],
                 labels: tuple[str, ...]) -> np.ndarray:
    """The endpoint has one of the reserved identities (or, if its identity is unknown, labels)."""
    import numpy as np

    from flowship.model.columns import uint_values

    ident = batch.column(f"{prefix}_identity")
    values = uint_values(ident)
    mask = np.isin(values, identities)
    unknown = values == 0
    return mask | _labels_contain(batch, f"{prefix}_labels", labels, unknown)


class HealthcheckStage(MaskStage):
    """Drops health-check flows; counts them per rule."""

    def __init__(self, config: HealthcheckConfig, ctx: Any) -> None:
        import pyarrow as pa

        super().__init__(config, ctx)
        self._paths = pa.array(sorted(set(config.paths)), pa.string())
        self._prom_paths = pa.array(sorted(set(config.prometheus_paths)), pa.string())
        self._recent = RecentConnections(config.connection_memory, int(float(config.connection_ttl) * 1e9))
        self._counters = {reason: ctx.metrics.stage_dropped(ctx.name, reason) for reason in REASONS}

    def rule_masks(self, batch: pa.RecordBatch) -> dict[str, np.ndarray]:
        """The rows each enabled content rule matches (before connection pairing)."""
        import numpy as np
        import pyarrow.compute as pc

        from flowship.model.columns import not_null, to_mask, uint_values, url_path

        cfg = self.config
        masks: dict[str, np.ndarray] = {}
        url = batch.column("http_url")
        has_http = not_null(url) | not_null(batch.column("http_user_agent")) | not_null(batch.column("http_method"))
        if has_http.any():
            path = url_path(url)
            if cfg.kube_probe:
                masks["kube_probe"] = _user_agent_starts(batch, "kube-probe/")
            if cfg.health_paths and len(self._paths):
                masks["health_path"] = to_mask(pc.is_in(path, value_set=self._paths))
            if cfg.prometheus:
                masks["prometheus"] = (to_mask(pc.is_in(path, value_set=self._prom_paths))
                                       & _user_agent_starts(batch, "Prometheus/"))
        if cfg.cilium_health:
            src = uint_values(batch.column("src_identity"))
            dst = uint_values(batch.column("dst_identity"))
            mask = (src == HEALTH_IDENTITY) | (dst == HEALTH_IDENTITY)
            mask |= _labels_contain(batch, "src_labels", (HEALTH_LABEL,), src == 0)
            mask |= _labels_contain(batch, "dst_labels", (HEALTH_LABEL,), dst == 0)
            masks["cilium_health"] = mask
        if cfg.node_health:
            proto = batch.column("l4_protocol")
            tcp = to_mask(pc.equal(proto, "TCP"))
            port = cfg.health_port
            candidate = tcp & ((uint_values(batch.column("dst_port")) == port)
                               | (uint_values(batch.column("src_port")) == port))
            icmp_type = uint_values(batch.column("icmp_type"), fill=-1)
            for name, types in ICMP_ECHO.items():
                candidate |= to_mask(pc.equal(proto, name)) & np.isin(icmp_type, types)
            if candidate.any():
                ends = (_endpoint_in(batch, "src", NODE_IDENTITIES, NODE_LABELS)
                        & _endpoint_in(batch, "dst", NODE_IDENTITIES, NODE_LABELS))
                masks["node_health"] = candidate & ends
            else:
                masks["node_health"] = candidate
        return masks

    def select(self, batch: pa.RecordBatch, alive: np.ndarray | None,
               memo: Memo) -> tuple[pa.RecordBatch, np.ndarray | None]:
        import numpy as np
        import pyarrow as pa
        import pyarrow.compute as pc

        from flowship.stages.columns import among, memo_connection_hashes

        # The content rules judge each row alone, so they run on the whole batch; the pairing and
        # its memory only ever look at the alive rows, as if the dead ones had been removed.
        n = batch.num_rows
        masks = self.rule_masks(batch)
        removed = np.zeros(n, dtype=bool)
        reason_of: dict[str, np.ndarray] = {}
        for reason in REASONS[:-1]:
            if reason in masks:
                new = among(masks[reason], alive) & ~removed
                reason_of[reason] = new
                removed |= new
        if self.config.same_connection:
            http_removed = np.zeros(n, dtype=bool)
            for reason in ("kube_probe", "health_path", "prometheus"):
                if reason in reason_of:
                    http_removed |= reason_of[reason]
            if http_removed.any() or len(self._recent):
                hashes = memo_connection_hashes(batch, memo)
                times = batch.column("time")
                if alive is not None:
                    times = times.filter(pa.array(alive, type=pa.bool_()))
                now = int(pc.max(times.cast(pa.int64())).as_py())
                self._recent.expire(now)
                paired = among(self._recent.contains(hashes), alive)
                if http_removed.any():
                    paired |= among(np.isin(hashes, hashes[http_removed]), alive)
                new = paired & ~removed
                reason_of["same_connection"] = new
                removed |= new
                touched = hashes[http_removed | paired]
                if len(touched):
                    self._recent.add(np.unique(touched), now)
        for reason, mask in reason_of.items():
            count = int(np.count_nonzero(mask))
            if count:
                self._counters[reason].inc(count)
        return batch, ~removed if removed.any() else None
