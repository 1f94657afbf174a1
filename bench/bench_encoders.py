"""Hubble JSON and ECS encoders: flows per CPU-second, old vs new in one run; peak RSS of the file sink.

    python3 bench/bench_encoders.py [-n 1000000] [--before e363add] [--skip-rss | --skip-rates]

Rates are time.process_time of the encoding alone, on generated flows
(bench/flowgen.py, 65,536 a batch) and on the recorded fixture flows, for
the per-row reference encoders (tests/encode_reference.py), the encoders of
an earlier revision (``--before``, loaded from git) and the current ones,
interleaved so that a busy machine slows all of them alike. The RSS cases
run each in a fresh process: n flows written batch by batch to the ``file``
sink (both formats) and to the ``parquet`` sink; the ``none`` case only
builds the input, to show what the sinks add.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests"))

import pyarrow as pa  # noqa: E402

Encoder = Callable[[pa.RecordBatch], object]


def _module_at(rev: str, path: str, name: str, replace: dict[str, str]) -> types.ModuleType:
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:{path}"], check=True,
                            capture_output=True, text=True).stdout
    for old, new in replace.items():
        source = source.replace(old, new)
    module = types.ModuleType(name)
    module.__file__ = f"{rev}:{path}"
    sys.modules[name] = module
    exec(compile(source, module.__file__, "exec"), module.__dict__)  # noqa: S102 - a revision of this repo
    return module


def before_encoders(rev: str) -> dict[str, Encoder]:
    """The columnar encoders as they were at ``rev`` (they share the unchanged modules of today)."""
    _module_at(rev, "exporter/model/json_columns.py", "before_json_columns", {})
    hubble = _module_at(rev, "exporter/model/hubble_encode.py", "before_hubble_encode",
                        {"from flowship.model import json_columns as jc": "import before_json_columns as jc"})
    ecs = _module_at(rev, "exporter/model/ecs_encode.py", "before_ecs_encode", {})
    return {"hubble": hubble.encode_ndjson, "ecs": lambda b: b"".join(ecs.encode_ndjson(b))}


def current_encoders() -> dict[str, Encoder]:
    from flowship.model import ecs_encode, hubble_encode

    return {"hubble": hubble_encode.ndjson_buffer, "ecs": ecs_encode.ndjson_buffer}


def reference_encoders() -> dict[str, Encoder]:
    from encode_reference import ecs_lines_slow, encode_lines_slow

    return {"hubble": lambda b: b"".join(encode_lines_slow(b)),
            "ecs": lambda b: b"\n".join(ecs_lines_slow(b)) + b"\n"}


def _fixture_batch() -> pa.RecordBatch:
    from flowship.model.hubble_decode import decode_lines

    folder = Path(os.environ.get("FLOWSHIP_FIXTURES", REPO.parent / "shared" / "fixtures" / "hubble"))
    data = b"\n".join(p.read_bytes().strip() for p in sorted(folder.glob("*.jsonl")))
    return decode_lines(data).batch


def rates(variants: dict[str, dict[str, Encoder]], inputs: dict[str, list[pa.RecordBatch]],
          rounds: int) -> None:
    """Flows per CPU-second of each encoder, the variants interleaved round by round (best round kept)."""
    print(f"{'input':<22} {'format':<7} " + " ".join(f"{v:>12}" for v in variants) + "   bytes/flow")
    for label, batches in inputs.items():
        flows = sum(b.num_rows for b in batches)
        for fmt in ("hubble", "ecs"):
            best: dict[str, float] = {}
            size = 0
            for r in range(rounds):
                for variant, encoders in variants.items():
                    if variant == "reference" and r:
                        continue  # tens of seconds a round: once is enough
                    started = time.process_time()
                    size = sum(len(memoryview(encoders[fmt](b))) for b in batches)
                    rate = flows / (time.process_time() - started)
                    best[variant] = max(best.get(variant, 0.0), rate)
            print(f"{label:<22} {fmt:<7} " + " ".join(f"{best[v]:>12,.0f}" for v in variants)
                  + f"   {size / flows:,.0f}")


def rss_child(case: str, n: int, out: str) -> None:
    """Write n flows to one sink, batch by batch; print peak RSS before and after, and the sink's CPU rate.

    Four generated batches are written in turn, so the input costs the same
    small amount of memory in every case and the difference is the sink's.
    """
    from flowgen import generate_batch

    from flowship.components import Context
    from flowship.config import parse
    from flowship.metrics import Metrics
    from flowship.pipeline.envelope import Envelope

    ctx = Context(case, Metrics(), "bench", Path(out))
    sink = None
    if case.startswith("file"):
        from flowship.sinks.jsonl import FileSink, FileSinkConfig

        fmt = case.split("-")[1]
        sink = FileSink(parse(FileSinkConfig, {"path": f"{out}/flows.jsonl", "format": fmt, "fsync": False},
                              "bench"), ctx)
    elif case == "parquet":
        from flowship.sinks.parquet import ParquetSink, ParquetSinkConfig

        sink = ParquetSink(parse(ParquetSinkConfig, {"path": f"{out}/parquet", "fsync": False}, "bench"), ctx)
    inputs = [generate_batch(65536, seed=i, start_ns=1_767_225_600_000_000_000 + i * 655_360_000_000)
              for i in range(4)]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cpu = 0.0
    if sink is not None:
        sink.start()
        for i, start in enumerate(range(0, n, 65536)):
            batch = inputs[i % len(inputs)].slice(0, min(65536, n - start))
            started = time.process_time()
            sink.write(Envelope(batch, []))
            cpu += time.process_time() - started
        started = time.process_time()
        sink.close()
        cpu += time.process_time() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"RESULT {before:.0f} {peak:.0f} {n / cpu if cpu else 0:.0f}")


def rss(n: int) -> None:
    print(f"\npeak RSS, {n:,} flows written 65,536 a batch (fresh process each; input: 4 generated batches):")
    print(f"{'sink':<14} {'RSS before MiB':>15} {'peak RSS MiB':>13} {'sink flows per CPU-s':>21}")
    for case in ("none", "file-hubble", "file-ecs", "parquet"):
        with tempfile.TemporaryDirectory() as tmp:
            done = subprocess.run([sys.executable, __file__, "--child", case, "-n", str(n), "--out", tmp],
                                  check=True, capture_output=True, text=True)
        line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
        before, peak, rate = (int(v) for v in line.split()[1:])
        print(f"{case:<14} {before:>15,} {peak:>13,} {rate:>21,}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=1_000_000, help="flows for the RSS cases")
    parser.add_argument("--rate-flows", type=int, default=262_144, help="generated flows for the rate cases")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--before", default="e363add", help="git revision of the earlier encoders ('' = none)")
    parser.add_argument("--skip-rss", action="store_true")
    parser.add_argument("--skip-rates", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        rss_child(args.child, args.n, args.out)
        return 0
    if args.skip_rates:
        rss(args.n)
        return 0
    from flowgen import generate_batch

    variants = {"reference": reference_encoders()}
    if args.before:
        variants[f"@{args.before}"] = before_encoders(args.before)
    variants["current"] = current_encoders()
    generated = [generate_batch(min(65536, args.rate_flows - i), seed=i) for i in range(0, args.rate_flows, 65536)]
    print(f"flows per CPU-second (python {sys.version.split()[0]}, pyarrow {pa.__version__}, "
          f"load average {os.getloadavg()[0]:.1f}):")
    rates(variants, {"generated": generated, "fixtures (1,518 flows)": [_fixture_batch()]}, args.rounds)
    if not args.skip_rss:
        rss(args.n)
    return 0


if __name__ == "__main__":
    sys.exit(main())
