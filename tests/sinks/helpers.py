"""Plain helpers shared by the sink and Kafka source tests (no fixtures here)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import pyarrow as pa

from flowship.components import Context
from flowship.metrics import Metrics
from flowship.model import hubble_decode


def make_ctx(name: str = "sink", data_dir: Path | None = None) -> Context:
    return Context(name=name, metrics=Metrics(), node_name="test-node",
                   data_dir=data_dir or Path(tempfile.mkdtemp(prefix="flowship-test-")))


def decode_fixtures(files: list[Path]) -> dict[str, pa.RecordBatch]:
    """Every recorded fixture file decoded, by file stem."""
    out = {}
    for path in files:
        result = hubble_decode.decode_lines(path.read_bytes())
        assert not result.errors, (path, result.errors[:3])
        out[path.stem] = result.batch
    return out


def distinct_flows(batches: list[pa.RecordBatch]) -> pa.RecordBatch:
    """All flows in one batch, one row per distinct uuid."""
    table = pa.Table.from_batches(batches)
    seen: set[str] = set()
    keep = []
    for i, u in enumerate(table.column("uuid").to_pylist()):
        if u not in seen:
            seen.add(u)
            keep.append(i)
    return table.take(keep).combine_chunks().to_batches()[0]


def aggregate_rows(batch: pa.RecordBatch, window: str = "60s") -> pa.RecordBatch:
    """Aggregate rows of ``batch`` as the aggregate stage emits them (kind="aggregates")."""
    from flowship.config import parse
    from flowship.pipeline.envelope import Envelope
    from flowship.stages.aggregate import AggregateConfig, AggregateStage

    stage = AggregateStage(parse(AggregateConfig, {"window": window, "clock": "event"}, "test"), make_ctx("agg"))
    out = stage.process(Envelope(batch, []))
    out += stage.close()
    rows = [e.batch for e in out if e.kind == "aggregates" and e.batch.num_rows]
    return pa.Table.from_batches(rows).combine_chunks().to_batches()[0]


def generated_flows(n: int, seed: int = 1, start_ns: int | None = None, spread_s: float = 600.0) -> pa.RecordBatch:
    """``n`` synthetic flows over ``spread_s`` seconds: a few namespaces, verdicts, ports and protocols."""
    import random

    from flowship.model.schema import flows_from_rows

    rng = random.Random(seed)
    start = start_ns if start_ns is not None else time.time_ns() - int(spread_s * 1e9)
    namespaces = ["shop", "db", "payments", "kube-system"]
    rows = []
    for i in range(n):
        src_ns, dst_ns = rng.choice(namespaces), rng.choice(namespaces)
        proto = rng.choice(["TCP", "TCP", "UDP", "ICMPv4"])
        verdict = rng.choice(["FORWARDED"] * 6 + ["DROPPED", "DROPPED", "AUDIT", "ERROR"])
        row = {
            "time": start + int(rng.random() * spread_s * 1e9),
            "node_name": f"node-{i % 3}",
            "verdict": verdict,
            "drop_reason": "POLICY_DENIED" if verdict == "DROPPED" else None,
            "flow_type": "L3_L4",
            "traffic_direction": rng.choice(["INGRESS", "EGRESS"]),
            "is_reply": rng.random() < 0.3,
            "ip_src": f"10.{rng.randint(0, 3)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
            "ip_dst": f"10.{rng.randint(0, 3)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
            "ip_version": 4,
            "l4_protocol": proto,
            "src_namespace": src_ns,
            "dst_namespace": dst_ns,
            "src_pod": f"{src_ns}-{rng.randint(0, 20)}",
            "dst_pod": f"{dst_ns}-{rng.randint(0, 20)}",
            "src_labels": [f"k8s:app={src_ns}", "k8s:tier=backend"],
            "bytes": rng.randint(0, 10**6),
            "packets": rng.randint(1, 1000),
        }
        if proto in ("TCP", "UDP"):
            row["src_port"] = rng.randint(1024, 65535)
            row["dst_port"] = rng.choice([80, 443, 5432, 53, 8080])
        if proto == "TCP":
            row["tcp_flags"] = rng.choice([0x002, 0x012, 0x010, 0x011, 0x004])
        else:
            row["icmp_type"] = 8 if proto == "ICMPv4" else None
        rows.append(row)
    return flows_from_rows(rows)


def record_durability(monkeypatch: object, module: object) -> list[tuple[str, str]]:
    """Record ``os.fsync`` and ``os.replace`` as ``module`` calls them, in order (then do them).

    Events are ("fsync", path of the descriptor) and ("rename", "src name -> dst name"); a test
    appends its own (an acknowledgement) to see what came first.
    """
    import os

    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: object, dst: object) -> None:
        events.append(("rename", f"{Path(src).name} -> {Path(dst).name}"))
        real_replace(src, dst)

    monkeypatch.setattr(module.os, "fsync", fsync)
    monkeypatch.setattr(module.os, "replace", replace)
    return events
