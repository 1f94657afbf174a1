"""The Go tools the tests use (hubble CLI, Prometheus, helm, kube-strict), built by their deploy/dev scripts."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def go_tool(script: str, timeout: float = 3600) -> str:
    """Build (or find cached) a Go tool through ``deploy/dev/<script>``; its path. Fails loudly when it cannot."""
    path = REPO / "deploy" / "dev" / script
    proc = subprocess.run([str(path)], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"could not build with {path} (it needs Go: go on PATH, /usr/local/go/bin/go or GO=..., "
                    f"and the Go module proxy):\n{proc.stderr[-3000:]}", pytrace=False)
    return proc.stdout.strip().splitlines()[-1]
