"""``hubble_metrics:`` of a config: which of Cilium's handlers, with which options (Cilium's syntax).

Apart from :mod:`flowship.hubble_metrics`, which computes the series with Arrow: loading and validating a
config (``flowship validate``) needs only this.
"""

from __future__ import annotations

from dataclasses import dataclass, field

HANDLERS = ("flow", "drop", "tcp", "dns", "http", "httpV2", "icmp", "port-distribution")
DEFAULT_METRICS = ("dns", "drop", "tcp", "flow", "port-distribution", "icmp", "httpV2")
CONTEXT_IDENTIFIERS = ("identity", "namespace", "pod", "pod-short", "pod-name", "dns", "ip", "reserved-identity",
                       "workload-name", "app")
CONTEXT_LABELS = ("source_ip", "source_pod", "source_namespace", "source_workload", "source_app", "destination_ip",
                  "destination_pod", "destination_namespace", "destination_workload", "destination_app",
                  "traffic_direction")
_CONTEXT_KEYS = {"sourcecontext": "source", "sourceegresscontext": "source_egress",
                 "sourceingresscontext": "source_ingress", "destinationcontext": "destination",
                 "destinationegresscontext": "destination_egress", "destinationingresscontext": "destination_ingress",
                 "labelscontext": "labels"}
_HANDLER_KEYS = {"dns": ("query", "ignoreaaaa"), "http": ("exemplars",), "httpV2": ("exemplars",)}


def _parse_identifiers(text: str | None) -> list[str] | None:
    if text is None:
        return None
    out = []
    for part in text.split("|"):
        if part.lower() not in CONTEXT_IDENTIFIERS:
            raise ValueError(f"unknown context {part!r} (known: {', '.join(CONTEXT_IDENTIFIERS)})")
        out.append(part.lower())
    return out


def parse_context(options: dict[str, str]) -> tuple[dict[str, list[str] | None], list[str]]:
    """A handler's context options: identifiers per side (None: not given) and the labels in Cilium's order.

    ValueError names the wrong value; :class:`flowship.hubble_metrics.ContextOptions` computes the values.
    """
    parsed = {attr: options.get(key) for key, attr in _CONTEXT_KEYS.items()}
    sides = {attr: _parse_identifiers(text) for attr, text in parsed.items() if attr != "labels"}
    labels: list[str] = []
    if parsed["labels"] is not None:
        wanted = parsed["labels"].split(",")
        for label in wanted:
            if label not in CONTEXT_LABELS:
                raise ValueError(f"invalid labelsContext value: {label!r} (known: {', '.join(CONTEXT_LABELS)})")
        labels = [label for label in CONTEXT_LABELS if label in wanted]
    return sides, labels


@dataclass(frozen=True)
class MetricSpec:
    """One entry of ``hubble_metrics.metrics``: a handler and its options (keys lower-cased, as Cilium compares)."""

    handler: str
    options: dict[str, str] = field(default_factory=dict)


def parse_metric(text: str) -> MetricSpec:
    """``name[:key=value;flag;...]`` in Cilium's ``--hubble-metrics`` syntax; ValueError says what is wrong."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"expected a string such as 'drop:sourceContext=pod', got {text!r}")
    name, _, rest = text.strip().partition(":")
    if name not in HANDLERS:
        raise ValueError(f"unknown metric {name!r} (known: {', '.join(HANDLERS)})")
    options: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in rest.split(";"))):
        key, _, value = part.partition("=")
        key = key.strip().lower()
        if key not in _CONTEXT_KEYS and key not in _HANDLER_KEYS.get(name, ()):
            known = list(_HANDLER_KEYS.get(name, ())) + ["sourceContext", "destinationContext", "labelsContext",
                                                          "source/destination Egress/Ingress Context"]
            raise ValueError(f"{name}: unknown option {part.split('=')[0]!r} (known: {', '.join(known)})")
        options[key] = value.strip()
    parse_context(options)  # raises on a bad context value
    return MetricSpec(name, options)


@dataclass
class HubbleMetricsConfig:
    """``hubble_metrics:`` at the top level of a config."""

    enabled: bool = True  # hubble_* series of the flows entering the pipeline, before the shared stages
    metrics: list[str] = field(default_factory=lambda: list(DEFAULT_METRICS))  # Cilium's handler:options syntax

    def validate(self) -> list[str]:
        problems = []
        seen: dict[str, tuple[int, str]] = {}
        for i, text in enumerate(self.metrics):
            try:
                spec = parse_metric(text)
            except ValueError as exc:
                problems.append(f"metrics[{i}]: {exc}")
                continue
            family = "http" if spec.handler in ("http", "httpV2") else spec.handler
            if family in seen:
                first, other = seen[family]
                problems.append(f"metrics[{i}]: {spec.handler!r} given twice (also metrics[{first}])"
                                if other == spec.handler else
                                f"metrics[{i}]: {spec.handler!r} and {other!r} (metrics[{first}]) write the same "
                                "series: pick one")
            seen[family] = (i, spec.handler)
        return problems

    def specs(self) -> list[MetricSpec]:
        return [parse_metric(text) for text in self.metrics]
