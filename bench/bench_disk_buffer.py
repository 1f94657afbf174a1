"""Disk buffer throughput: this tree's implementation against an older one, side by side in one run.

The older implementation is read from git (``--old-rev``, default the
commit before the checksummed format 2) and loaded as its own module, so
both run on the same machine, disk and input in the same process, in
alternating rounds (the median of ``--rounds`` is printed). Cases:

  append        the sink thread's part: serialize, frame, write, fsync every
                ``fsync_interval`` (0.5 s), acknowledge upstream
  append-batch  the same with ``fsync: batch`` (an fsync per batch)
  drain         append and a drain thread handing every batch to a sink that
                acknowledges at once, until the last one is acknowledged
  replay        open a buffer holding every batch (scan and checks) and
                read it all back

Usage: python3 bench/bench_disk_buffer.py [-n FLOWS] [--batch ROWS] [--rounds N] [--dir DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import structlog  # noqa: E402
from flowgen import generate_batch  # noqa: E402

from flowship.config import ByteSize, Duration  # noqa: E402
from flowship.metrics import Metrics  # noqa: E402
from flowship.pipeline import disk_buffer as new_impl  # noqa: E402
from flowship.pipeline.envelope import Envelope, Receipt  # noqa: E402

OLD_REV = "2fd4ae9"


def load_old(rev: str) -> ModuleType:
    """The disk buffer module as it was at ``rev``, importable beside the current one."""
    source = subprocess.run(["git", "show", f"{rev}:exporter/pipeline/disk_buffer.py"], capture_output=True,
                            text=True, check=True, cwd=HERE.parent).stdout
    spec = importlib.util.spec_from_loader("disk_buffer_old", loader=None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    exec(compile(source, f"{rev}:exporter/pipeline/disk_buffer.py", "exec"), module.__dict__)  # noqa: S102
    return module


def make(impl: ModuleType, directory: Path, **kw: object):  # noqa: ANN201 - either module's DiskBuffer
    config = impl.BufferConfig(type="disk", max_bytes=ByteSize(8 << 30), **kw)
    return impl.DiskBuffer(directory, config, Metrics(), "bench", structlog.get_logger())


def case_append(impl: ModuleType, directory: Path, parts: list, fsync: str) -> float:
    buf = make(impl, directory, fsync=fsync, fsync_interval=Duration(0.5))
    buf.open()
    stop = threading.Event()
    started = time.perf_counter()
    for part in parts:
        buf.append(Envelope(part, [Receipt()]), stop)
        buf.maybe_sync()
    buf.sync()
    elapsed = time.perf_counter() - started
    buf.close()
    return elapsed


def case_drain(impl: ModuleType, directory: Path, parts: list) -> float:
    buf = make(impl, directory)
    buf.open()
    stop = threading.Event()
    acked = threading.Event()
    total = len(parts)

    def sink() -> None:
        n = 0
        while n < total:
            env = buf.read(timeout=0.5)
            if env is not None:
                env.ack()
                n += 1
        acked.set()

    t = threading.Thread(target=sink, daemon=True)
    started = time.perf_counter()
    t.start()
    for part in parts:
        buf.append(Envelope(part, [Receipt()]), stop)
        buf.maybe_sync()
    buf.sync()
    acked.wait(timeout=600)
    elapsed = time.perf_counter() - started
    buf.close()
    return elapsed


def case_replay(impl: ModuleType, directory: Path, parts: list) -> float:
    case_append(impl, directory, parts, "interval")
    started = time.perf_counter()
    buf = make(impl, directory)
    assert buf.open() == len(parts)
    n = 0
    while n < len(parts):
        env = buf.read(timeout=0.5)
        if env is not None:
            env.ack()
            n += 1
    elapsed = time.perf_counter() - started
    buf.close()
    return elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=200_000, help="flows per case")
    ap.add_argument("--batch", type=int, default=5000, help="rows per batch")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--old-rev", default=OLD_REV)
    ap.add_argument("--dir", help="where the buffers go (default: a temporary directory on /var/tmp)")
    args = ap.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))  # warnings of a full buffer off
    batch = generate_batch(args.n)
    parts = [batch.slice(i, args.batch) for i in range(0, batch.num_rows, args.batch)]
    framed = sum(len(new_impl._serialize(p)) for p in parts)
    impls = {"old": load_old(args.old_rev), "new": new_impl}
    cases = {
        "append": lambda impl, d: case_append(impl, d, parts, "interval"),
        "append-batch": lambda impl, d: case_append(impl, d, parts, "batch"),
        "drain": lambda impl, d: case_drain(impl, d, parts),
        "replay": lambda impl, d: case_replay(impl, d, parts),
    }
    root = Path(args.dir or tempfile.mkdtemp(prefix="bench-diskbuf-", dir="/var/tmp"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"disk buffer: {args.n} flows in {len(parts)} batches of {args.batch}, {framed / 2**20:.0f} MiB of "
          f"Arrow IPC; old = {args.old_rev}, new = this tree; median of {args.rounds} rounds, in {root}")
    print(f"{'case':14s} {'old flows/s':>12s} {'new flows/s':>12s} {'old MiB/s':>10s} {'new MiB/s':>10s} {'new/old':>8s}")
    try:
        for name, run in cases.items():
            times: dict[str, list[float]] = {"old": [], "new": []}
            for r in range(args.rounds):
                for label in (("old", "new") if r % 2 == 0 else ("new", "old")):
                    d = root / f"{name}-{label}-{r}"
                    times[label].append(run(impls[label], d))
                    shutil.rmtree(d, ignore_errors=True)
            old, new = statistics.median(times["old"]), statistics.median(times["new"])
            print(f"{name:14s} {args.n / old:12,.0f} {args.n / new:12,.0f} {framed / old / 2**20:10.0f} "
                  f"{framed / new / 2**20:10.0f} {old / new:8.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
