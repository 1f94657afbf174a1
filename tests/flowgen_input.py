"""Generated test input: ``bench/flowgen.py`` Hubble JSON lines, every flow with its own uuid."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson

REPO = Path(__file__).resolve().parent.parent


def generate_lines(path: Path, count: int, timeout: float = 600) -> list[bytes]:
    """Writes ``count`` flows to ``path`` with the benchmark generator and returns the lines in order.

    Tests count deliveries by uuid, so a generator that repeated one would make a lost flow look delivered:
    uniqueness is asserted here, once for every user.
    """
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "flowgen.py"), str(path), "-n", str(count)],
                          capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in path.read_bytes().splitlines() if line.strip()]
    assert len(lines) == count, f"flowgen wrote {len(lines)} lines, asked for {count}"
    assert len({orjson.loads(line)["flow"]["uuid"] for line in lines}) == count, "every flow needs its own uuid"
    return lines
