"""Pipeline throughput and memory: decode, columnar stages, Parquet, encoders.

Prints flows/s and peak RSS for each case, each run in its own process so
the RSS figures are not mixed. Cases (issue targets in brackets):

  decode          Hubble JSON → Arrow, columnar fast path and the line decoder
  stages→parquet  pre-decoded batches → filter + healthcheck + sample → Parquet   [≥ 1M/s]
  aggregate       pre-decoded batches → aggregate 10s → Parquet
  end-to-end      Hubble JSON file → filter + healthcheck + sample → Parquet,
                  at N and 4N flows (memory must stay flat)                        [≥ 300k/s]
  encode          Arrow → Hubble JSON (columnar and reference), Arrow → ECS JSON

Usage: python3 bench/bench_pipeline.py [-n FLOWS] [--cases a,b]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

STAGES_YAML = """
  - type: filter
    deny:
      - destination_port: ["4240"]
  - type: healthcheck
  - type: sample
    rate: 10
"""


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


INPUT = Path(os.environ.get("FLOWSHIP_BENCH_DIR", tempfile.gettempdir())) / "flowship-bench"


def _jsonl(n: int) -> Path:
    return INPUT / f"flows-{n}.jsonl"


def _arrow(n: int) -> Path:
    return INPUT / f"flows-{n}.arrow"


def prepare(n: int) -> None:
    """Generate the inputs once, in the parent, so the cases' RSS is theirs alone."""
    import pyarrow as pa
    from flowgen import generate_batch, write_jsonl

    INPUT.mkdir(parents=True, exist_ok=True)
    for size in (n, 4 * n):
        if not _jsonl(size).exists():
            write_jsonl(_jsonl(size), size)
    if not _arrow(n).exists():
        batches = [generate_batch(min(65536, n - i), seed=i, start_ns=1_767_225_600_000_000_000 + i * 10_000_000)
                   for i in range(0, n, 65536)]
        with pa.OSFile(str(_arrow(n)), "wb") as sink, pa.ipc.new_file(sink, batches[0].schema) as writer:
            for b in batches:
                writer.write_batch(b)


def _batches(n: int) -> list:
    import pyarrow as pa

    with pa.memory_map(str(_arrow(n))) as source:
        reader = pa.ipc.open_file(source)
        return [reader.get_batch(i) for i in range(reader.num_record_batches)]


def _stages(yaml_text: str):  # noqa: ANN202
    from flowship.config import load_text
    from flowship.metrics import Metrics
    from flowship.pipeline.runtime import _build_stages

    cfg = load_text(f"sources: [{{type: stdin}}]\nstages:{yaml_text}\nsinks: [{{type: stdout}}]\n", "<bench>")
    return _build_stages(cfg.stages, Metrics(), cfg, "")


def case_decode(n: int) -> dict:
    from flowship.model.hubble_decode import decode_lines

    data = _jsonl(n).read_bytes()
    chunks, start = [], 0
    while start < len(data):
        end = data.find(b"\n", start + (4 << 20))
        end = len(data) if end < 0 else end + 1
        chunks.append(data[start:end])
        start = end
    out = {"bytes_per_flow": round(len(data) / n)}
    for label, fast in (("columnar", True), ("line decoder", False)):
        t = time.perf_counter()
        rows = sum(decode_lines(c, fast=fast).batch.num_rows for c in chunks)
        out[f"{label} flows/s"] = round(rows / (time.perf_counter() - t))
    return out


def case_stages_parquet(n: int, aggregate: bool = False) -> dict:
    from flowship.components import Context
    from flowship.metrics import Metrics
    from flowship.pipeline.envelope import Envelope, Receipt
    from flowship.pipeline.runtime import _close_stages, _run_stages
    from flowship.sinks.parquet import ParquetSink, ParquetSinkConfig

    batches = _batches(n)
    stages = _stages("\n  - type: aggregate\n    window: 10s\n" if aggregate else STAGES_YAML)
    with tempfile.TemporaryDirectory() as tmp:
        ctx = Context(name="parquet", metrics=Metrics(), node_name="bench", data_dir=Path(tmp))
        sink = ParquetSink(ParquetSinkConfig(path=str(Path(tmp) / "out"), fsync=False), ctx)
        sink.start()
        t = time.perf_counter()
        written = 0
        for batch in batches:
            for env in _run_stages(stages, [Envelope(batch, [Receipt()])]):
                written += env.batch.num_rows
                sink.write(env)
        for env in _close_stages(stages):
            written += env.batch.num_rows
            sink.write(env)
        sink.flush()
        seconds = time.perf_counter() - t
    return {"flows/s": round(n / seconds), "rows written": written}


def case_end_to_end(n: int) -> dict:
    from flowship.config import load_text
    from flowship.metrics import Metrics
    from flowship.pipeline.runtime import Pipeline

    with tempfile.TemporaryDirectory() as tmp:
        path = _jsonl(n)
        cfg = load_text(f"""
data_dir: {tmp}/state
sources: [{{type: file, paths: ["{path}"]}}]
stages:{STAGES_YAML}
sinks: [{{type: parquet, path: {tmp}/out, fsync: false}}]
""", "<bench>")
        before = _rss_mib()
        t = time.perf_counter()
        summary = Pipeline(cfg, Metrics()).run()
        seconds = time.perf_counter() - t
    return {"flows/s": round(n / seconds), "flows in": summary.sources["file"]["flows"],
            "rows out": summary.sinks["parquet"], "RSS before run MiB": round(before)}


def case_encode(n: int) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from encode_reference import encode_lines_slow

    from flowship.model.hubble_encode import encode_ndjson

    batches = _batches(n)
    out = {}
    for label, fn in (("hubble columnar", encode_ndjson),
                      ("hubble reference", lambda b: b"".join(encode_lines_slow(b)))):
        t = time.perf_counter()
        size = sum(len(fn(b)) for b in batches)
        out[f"{label} flows/s"] = round(n / (time.perf_counter() - t))
    out["hubble bytes/flow"] = round(size / n)
    from flowship.model import ecs_encode

    t = time.perf_counter()
    size = 0
    for b in batches:
        encoded = ecs_encode.encode_ndjson(b)
        size += len(encoded) if isinstance(encoded, bytes) else sum(map(len, encoded))
    out["ecs flows/s"] = round(n / (time.perf_counter() - t))
    out["ecs bytes/flow"] = round(size / n)
    return out


CASES = {
    "decode": lambda n: case_decode(n),
    "stages-parquet": lambda n: case_stages_parquet(n),
    "aggregate-parquet": lambda n: case_stages_parquet(n, aggregate=True),
    "end-to-end": lambda n: case_end_to_end(n),
    "end-to-end-4x": lambda n: case_end_to_end(4 * n),
    "encode": lambda n: case_encode(n),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=500_000, help="flows per case (end-to-end-4x uses 4n)")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "prepare":
        prepare(args.n)
        return 0
    if args.child:
        os.sched_setaffinity(0, {0})  # one core, as the targets are stated
        result = CASES[args.child](args.n)
        result["peak RSS MiB"] = round(_rss_mib())
        print(json.dumps(result))
        return 0
    print(f"machine: {os.cpu_count()} cores, python {sys.version.split()[0]}, n={args.n}, one core per case")
    # In a process of its own: Linux keeps the peak RSS across fork+exec, so the parent stays small.
    subprocess.run([sys.executable, __file__, "--child", "prepare", "-n", str(args.n)], check=True)
    for name in args.cases.split(","):
        proc = subprocess.run([sys.executable, __file__, "--child", name, "-n", str(args.n)],
                              capture_output=True, text=True)
        if proc.returncode:
            print(f"{name:18} FAILED: {proc.stderr.strip().splitlines()[-1] if proc.stderr else proc.returncode}")
            continue
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{name:18} " + "  ".join(f"{k}: {v:,}" if isinstance(v, int) else f"{k}: {v}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
