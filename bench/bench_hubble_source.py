"""Hubble GetFlows ingest per stream: flowship's ``hubble`` source beside a plain grpcio client.

A server process streams pre-encoded GetFlowsResponse messages of generated flows (about 1 KB each, as a
Relay sends them) as fast as gRPC takes them; each client reads the same stream of ``--flows`` flows:

- ``grpcio raw``: a plain grpcio client that only counts the response bytes (the client library's ceiling);
- ``grpcio parse``: the same, parsing every message into ``GetFlowsResponse``;
- ``flowship``: the ``hubble`` source (``follow: false``) emitting Arrow batches of the flow schema.

Prints flows per second (wall) and per CPU-second of the client process, three runs each, and the medians.

    python3 bench/bench_hubble_source.py --flows 200000
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent import futures
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

METHOD = "/observer.Observer/GetFlows"


def encode_responses(flows: int, path: Path) -> None:
    """GetFlowsResponse bytes of generated flows, length-prefixed, into ``path``."""
    from flowgen import generate_batch

    from flowship.model.proto import to_flow_messages
    from flowship.proto.observer import observer_pb2

    with open(path, "wb") as out:
        for start in range(0, flows, 50_000):
            batch = generate_batch(min(50_000, flows - start), seed=start)
            for msg in to_flow_messages(batch):
                resp = observer_pb2.GetFlowsResponse(flow=msg, node_name=msg.node_name)
                resp.time.CopyFrom(msg.time)
                data = resp.SerializeToString()
                out.write(len(data).to_bytes(4, "little") + data)


def serve(path: str, port_file: str) -> None:
    """The server process: streams the file's responses to every GetFlows call, then ends the stream."""
    import grpc

    blob = Path(path).read_bytes()
    messages, i = [], 0
    while i < len(blob):
        n = int.from_bytes(blob[i:i + 4], "little")
        messages.append(blob[i + 4:i + 4 + n])
        i += 4 + n

    def get_flows(request: bytes, context: grpc.ServicerContext):
        yield from messages

    handler = grpc.method_handlers_generic_handler("observer.Observer", {
        "GetFlows": grpc.unary_stream_rpc_method_handler(get_flows, request_deserializer=None,
                                                         response_serializer=None)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), handlers=[handler])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    Path(port_file).write_text(str(port))
    server.wait_for_termination()


def client(variant: str, address: str, flows: int) -> dict:
    import grpc

    started, cpu = time.perf_counter(), time.process_time()
    if variant.startswith("grpcio"):
        from flowship.proto.observer import observer_pb2

        channel = grpc.insecure_channel(address)
        call = channel.unary_stream(METHOD, request_serializer=lambda b: b, response_deserializer=None)
        request = observer_pb2.GetFlowsRequest(number=2**64 - 1).SerializeToString()
        count = nbytes = 0
        parse = variant == "grpcio parse"
        for data in call(request):
            count += 1
            nbytes += len(data)
            if parse:
                observer_pb2.GetFlowsResponse.FromString(data)
        channel.close()
    else:
        from flowship.components import Context
        from flowship.config import parse as parse_config
        from flowship.metrics import Metrics
        from flowship.sources.hubble import HubbleSource, HubbleSourceConfig

        config = parse_config(HubbleSourceConfig, {"address": address, "follow": False, "checkpoint": False},
                              "bench")
        ctx = Context(name="hubble", metrics=Metrics(), node_name="bench", data_dir=Path(tempfile.mkdtemp()))
        source = HubbleSource(config, ctx)
        rows = [0]

        def emit(batch, receipt) -> None:  # noqa: ANN001 - the receipt is left open: no checkpoint here
            rows[0] += batch.num_rows

        source.run(emit, threading.Event())
        count, nbytes = rows[0], 0
    wall, used = time.perf_counter() - started, time.process_time() - cpu
    assert count == flows, f"{variant}: {count} of {flows} flows"
    return {"flows": count, "wall_s": wall, "cpu_s": used, "bytes": nbytes}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flows", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--serve", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--client", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(*args.serve)
        return 0
    if args.client:
        print(json.dumps(client(args.client[0], args.client[1], args.flows)))
        return 0
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryDirectory() as tmp:
        data, port_file = Path(tmp) / "responses.bin", Path(tmp) / "port"
        encode_responses(args.flows, data)
        size = data.stat().st_size
        server = subprocess.Popen([sys.executable, __file__, "--serve", str(data), str(port_file)], env=env)
        try:
            deadline = time.monotonic() + 60
            while not port_file.exists() or not port_file.read_text():
                assert time.monotonic() < deadline and server.poll() is None, "the server did not start"
                time.sleep(0.1)
            address = f"127.0.0.1:{port_file.read_text()}"
            with socket.create_connection(("127.0.0.1", int(port_file.read_text())), timeout=5):
                pass
            print(f"{args.flows:,} flows, {size / args.flows:,.0f} bytes per GetFlowsResponse on the wire, "
                  f"{args.runs} runs each, {os.cpu_count()} CPUs")
            print(f"{'client':<14} {'flows/s wall':>13} {'flows per CPU-s':>16}  runs (flows/CPU-s)")
            for variant in ("grpcio raw", "grpcio parse", "flowship"):
                results = []
                for _ in range(args.runs):
                    proc = subprocess.run([sys.executable, __file__, "--flows", str(args.flows), "--client", variant,
                                           address], capture_output=True, text=True, env=env, timeout=1800)
                    if proc.returncode != 0:
                        print(f"{variant}: failed\n{proc.stderr[-2000:]}")
                        break
                    results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
                if not results:
                    continue
                wall = statistics.median(r["flows"] / r["wall_s"] for r in results)
                cpu = statistics.median(r["flows"] / r["cpu_s"] for r in results)
                runs = ", ".join(f"{r['flows'] / r['cpu_s']:,.0f}" for r in results)
                print(f"{variant:<14} {wall:>13,.0f} {cpu:>16,.0f}  {runs}")
        finally:
            server.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
