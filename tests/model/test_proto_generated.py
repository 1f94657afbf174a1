"""The committed protobuf code is what the .proto files generate, and the wire names match Hubble's."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from flowship.proto.flow import flow_pb2
from flowship.proto.observer import observer_pb2

REPO = Path(__file__).resolve().parents[2]
# The .proto files live in exporter/proto/ and are imported as flowship.proto (pyproject's package-dir), so
# protoc runs over a copy laid out as flowship/proto/ to give the generated imports their installed names.
PROTOS = ["flowship/proto/flow/flow.proto", "flowship/proto/observer/observer.proto"]


def _source(proto: str) -> Path:
    return REPO / "exporter" / proto.removeprefix("flowship/")


def test_generated_code_is_current(tmp_path):
    for proto in PROTOS:
        (tmp_path / proto).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(_source(proto), tmp_path / proto)
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", ".", "--python_out=.", "--pyi_out=.",
                    "--grpc_python_out=.", *PROTOS], cwd=tmp_path, check=True)
    for proto in PROTOS:
        stem = proto.removesuffix(".proto")
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
            generated = (tmp_path / (stem + suffix)).read_text()
            committed = _source(stem + suffix).read_text()
            assert _strip_version_lines(generated) == _strip_version_lines(committed), f"{stem}{suffix} is stale"


def _strip_version_lines(text: str) -> str:
    """Generator version banners differ between grpcio-tools releases; the code must not."""
    return "\n".join(line for line in text.splitlines()
                     if "Protobuf Python Version" not in line and "GRPC_GENERATED_VERSION" not in line
                     and not line.startswith("_runtime_version.ValidateProtobufRuntimeVersion")
                     and "_runtime_version.Domain.PUBLIC" not in line)


def test_wire_names_and_numbers_match_hubble():
    flow = flow_pb2.Flow.DESCRIPTOR
    expected = {"time": 1, "uuid": 34, "verdict": 2, "drop_reason": 3, "ethernet": 4, "IP": 5, "l4": 6,
                "source": 8, "destination": 9, "Type": 10, "node_name": 11, "node_labels": 37,
                "source_names": 13, "destination_names": 14, "l7": 15, "reply": 16, "event_type": 19,
                "source_service": 20, "destination_service": 21, "traffic_direction": 22,
                "policy_match_type": 23, "trace_observation_point": 24, "drop_reason_desc": 25, "is_reply": 26,
                "interface": 28, "proxy_port": 29, "socket_cookie": 32, "cgroup_id": 33, "trace_reason": 36,
                "Summary": 100000, "extensions": 150000, "aggregate": 21007}
    assert {f.name: f.number for f in flow.fields if f.name in expected} == expected
    assert flow.full_name == "flow.Flow"
    req = observer_pb2.GetFlowsRequest.DESCRIPTOR
    assert {f.name: f.number for f in req.fields} == {"number": 1, "first": 9, "follow": 3, "blacklist": 5,
                                                      "whitelist": 6, "since": 7, "until": 8, "field_mask": 10}
    resp = observer_pb2.GetFlowsResponse.DESCRIPTOR
    assert {f.name: f.number for f in resp.fields} == {"flow": 1, "node_status": 2, "lost_events": 3,
                                                       "node_name": 1000, "time": 1001}
    assert observer_pb2.DESCRIPTOR.services_by_name["Observer"].full_name == "observer.Observer"
    assert flow_pb2.DropReason.Value("POLICY_DENIED") == 133
    assert flow_pb2.TraceObservationPoint.Value("TO_ENDPOINT") == 101
    assert flow_pb2.LostEventSource.Value("HUBBLE_RING_BUFFER") == 3
