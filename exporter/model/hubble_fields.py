"""What the Hubble JSON decoder and encoder agree on: flowship's extension object, enum and IP-version names."""

from __future__ import annotations

from typing import Any

# flowship-only columns carried in the "flowship" extension object
EXTENSION_COLUMNS: tuple[str, ...] = (
    "start_time", "flow_event", "kernel_drop_reason", "bytes", "packets", "reply_bytes",
    "reply_packets", "tcp_handshake_ns", "server_time_ns", "sample_rate",
)
EXT_TIME = frozenset({"start_time"})
EXT_INT = frozenset({"bytes", "packets", "reply_bytes", "reply_packets", "tcp_handshake_ns",
                      "server_time_ns", "sample_rate"})

L4_PORTED = ("TCP", "UDP", "SCTP")
IP_VERSION_IN = {"IPv4": 4, "IPv6": 6, "IP_NOT_USED": None, 1: 4, 2: 6, 0: None}
IP_VERSION_OUT = {4: "IPv4", 6: "IPv6"}

# protojson enum numbers, for input that writes enums as numbers
ENUMS: dict[str, dict[int, str]] = {}


def enum_tables() -> dict[str, dict[int, str]]:
    if not ENUMS:
        from flowship.proto.flow import flow_pb2

        for key, enum in (("verdict", flow_pb2.Verdict), ("Type", flow_pb2.FlowType),
                          ("drop_reason_desc", flow_pb2.DropReason),
                          ("traffic_direction", flow_pb2.TrafficDirection),
                          ("trace_observation_point", flow_pb2.TraceObservationPoint),
                          ("trace_reason", flow_pb2.TraceReason), ("l7type", flow_pb2.L7FlowType),
                          ("lost_source", flow_pb2.LostEventSource)):
            ENUMS[key] = {v.number: v.name for v in enum.DESCRIPTOR.values}
    return ENUMS


def enum_name(table: str, value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return enum_tables()[table].get(value, str(value))
    if isinstance(value, str):
        return value
    raise ValueError(f"enum value must be a name or number, got {value!r}")
