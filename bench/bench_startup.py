"""Start-up cost of the ``flowship`` command: CPU-seconds of short runs, each in a fresh process.

Short runs (``--version``, ``--help``, ``validate`` in CI, a small ``export`` in a kernel VM) pay mostly
for imports; this measures them as the shell sees them: user+sys CPU of the child process and wall time,
the median of ``--runs`` fresh interpreters per case. ``--against PATH`` runs the same cases from another
checkout in the same run (interleaved, so both see the same machine load); ``--importtime`` prints the
imports of each case with the largest cumulative time (``python -X importtime``). Both checkouts' modules are
byte-compiled first, as an install does (otherwise, under PYTHONDONTWRITEBYTECODE, every run would compile
flowship's sources again).

    python bench/bench_startup.py --runs 10 --against /path/to/other/checkout --importtime
"""

from __future__ import annotations

import argparse
import compileall
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]

# Runs the CLI of the checkout at ROOT whatever the interpreter has installed: ``flowship`` is that
# checkout's exporter/ and ``flowship.agent`` its agent/ (the package-dir mapping of pyproject.toml).
BOOTSTRAP = """\
import importlib.util, sys
root = sys.argv.pop(1)
for name, folder in (("flowship", "exporter"), ("flowship.agent", "agent")):
    spec = importlib.util.spec_from_file_location(name, f"{root}/{folder}/__init__.py",
                                                  submodule_search_locations=[f"{root}/{folder}"])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
sys.argv[0] = "flowship"
from flowship.cli import main
sys.exit(main())
"""

# Two recorded Hubble flows (tests fixtures' shape): enough for a whole export, decode to Parquet write.
FLOW_LINES = b"""\
{"flow":{"time":"2023-08-21T12:12:13.517394084Z","verdict":"DROPPED","IP":{"source":"fe80::64d8:8aff:fe72:fc14","destination":"ff02::2","ipVersion":"IPv6"},"l4":{"ICMPv6":{"type":133}},"source":{},"destination":{},"node_name":"kind-kind/kind-worker","drop_reason_desc":"INVALID_SOURCE_IP"},"node_name":"kind-kind/kind-worker","time":"2023-08-21T12:12:13.517394084Z"}
{"flow":{"time":"2023-08-21T12:12:18.510175415Z","verdict":"DROPPED","IP":{"source":"10.244.1.60","destination":"10.244.1.5","ipVersion":"IPv4"},"l4":{"TCP":{"source_port":44916,"destination_port":80,"flags":{"SYN":true}}},"source":{"namespace":"default","pod_name":"xwing"},"destination":{"namespace":"default","pod_name":"deathstar-7848d6c4d5-th9v2"},"node_name":"kind-kind/kind-worker","drop_reason_desc":"POLICY_DENIED"},"node_name":"kind-kind/kind-worker","time":"2023-08-21T12:12:18.510175415Z"}
"""


@dataclass
class Case:
    name: str
    args: list[str]
    stdin: bytes | None = None


@dataclass
class Sample:
    cpu: float  # user + sys seconds of the child
    wall: float


def cases(work: Path) -> list[Case]:
    """The short runs worth being cheap: what CI, a person at a shell and a kernel VM start."""
    config = work / "export.yaml"
    config.write_text(f"sources:\n  - type: stdin\nsinks:\n  - type: parquet\n    path: {work / 'flows'}\n"
                      f"data_dir: {work / 'state'}\n")
    return [
        Case("--version", ["--version"]),
        Case("--help", ["--help"]),
        Case("validate export-default", ["validate", str(HERE / "configs" / "export-default.yaml")]),
        Case("validate hubble-relay-to-s3", ["validate", str(HERE / "configs" / "hubble-relay-to-s3.yaml")]),
        Case("validate hubble-relay-full", ["validate", str(HERE / "configs" / "hubble-relay-full.yaml")]),
        Case("export 2 lines -> parquet", ["--log-format", "json", "export", "--no-progress", "--config", str(config)],
             FLOW_LINES),
    ]


def run_once(root: Path, case: Case, extra: list[str] | None = None) -> tuple[Sample, subprocess.CompletedProcess]:
    """One fresh interpreter; its CPU from the RUSAGE_CHILDREN delta (the only child reaped meanwhile)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *(extra or []), "-c", BOOTSTRAP, str(root), *case.args],
                          input=case.stdin, capture_output=True, env={**os.environ, "NODE_NAME": "node-1"})
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Sample(cpu, wall), proc


def top_imports(root: Path, case: Case, count: int) -> list[tuple[int, str]]:
    """(cumulative µs, module) of the ``count`` costliest imports of one run, nested imports included."""
    _, proc = run_once(root, case, ["-X", "importtime"])
    rows = []
    for line in proc.stderr.decode(errors="replace").splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cumulative, name = (part.strip() for part in line[len("import time:"):].split("|"))
        rows.append((int(cumulative), name))
    return sorted(rows, reverse=True)[:count]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="fresh processes per case and checkout (default 7)")
    parser.add_argument("--against", type=Path, help="another checkout to run side by side (e.g. main)")
    parser.add_argument("--importtime", action="store_true", help="print each case's costliest imports")
    parser.add_argument("--top", type=int, default=12, help="imports listed per case with --importtime")
    args = parser.parse_args()
    roots = {"this": HERE}
    if args.against:
        roots = {"against": args.against.resolve(), "this": HERE}
    for root in roots.values():
        for folder in ("exporter", "agent"):
            compileall.compile_dir(root / folder, quiet=1)
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, {args.runs} runs per case, "
          "byte-compiled; "
          + ", ".join(f"{label} = {root}" for label, root in roots.items()))
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        work = Path(tmp)
        for case in cases(work):
            samples: dict[str, list[Sample]] = {label: [] for label in roots}
            for _ in range(args.runs):
                for label, root in roots.items():  # interleaved: both checkouts see the same load
                    sample, proc = run_once(root, case)
                    if proc.returncode != 0:
                        sys.stderr.write(f"{case.name} ({label}) exited {proc.returncode}:\n"
                                         f"{proc.stderr.decode(errors='replace')[-2000:]}\n")
                        return 1
                    samples[label].append(sample)
            cells = [f"{label} {statistics.median(s.cpu for s in runs):.3f} CPU-s "
                     f"{statistics.median(s.wall for s in runs):.3f} s wall"
                     for label, runs in samples.items()]
            print(f"{case.name:28s} " + "   ".join(cells))
            if args.importtime:
                for label, root in roots.items():
                    print(f"    {label}: costliest imports (cumulative ms)")
                    for micros, name in top_imports(root, case, args.top):
                        print(f"      {micros / 1000:8.1f}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
