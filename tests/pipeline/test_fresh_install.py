"""A fresh install works: the wheel, installed with its declared dependencies into an empty venv, runs.

The development environment has more packages than pyproject declares; a module that imports one of
them passes every other test and breaks on a new machine (``pyroute2`` made the node's own addresses
``reserved:world`` that way). Here the wheel is built from a copy of the sources (with the built eBPF
object), installed into ``python -m venv`` without system site-packages, and run from outside the
checkout: every module of the installed package imports, the node's addresses are detected, the shipped
configs validate, a recorded Hubble file exports to Parquet, and (as root) the agent captures.

Slow-ish (about 50 s with pip's cache warm, more when it downloads the dependencies): marked ``install``.
Needs the package index or pip's cache for the dependencies; a failure to get them fails the test.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pyarrow.dataset as ds
import pytest

pytestmark = pytest.mark.install

REPO = Path(__file__).resolve().parents[2]
OBJECT = REPO / "agent" / "_bpf" / "flowship.bpf.o"

IMPORT_EVERYTHING = r"""
import importlib, json, pkgutil, sys
import flowship, flowship.agent
failed = {}
for pkg in (flowship, flowship.agent):
    for mod in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
        try:
            importlib.import_module(mod.name)
        except Exception as exc:
            failed[mod.name] = f"{type(exc).__name__}: {exc}"
from flowship.agent import loader
from flowship.agent.enrich import detect_local_ips
print(json.dumps({"failed": failed, "agent": flowship.agent.__file__, "core": flowship.__file__,
                  "object": str(loader.DEFAULT_OBJECT), "local_ips": detect_local_ips()}))
"""


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


class Installed:
    """The venv with the wheel installed, and how to run things in it as a new user would."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.bin = root / "venv" / "bin"
        self.env = {"PATH": f"{self.bin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    "HOME": str(root), "LANG": "C.UTF-8", "NODE_NAME": "fresh-node"}

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return _run(list(args), self.root, self.env, timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    if not OBJECT.exists():
        pytest.fail(f"{OBJECT} is missing: build it with `make -C bpf`; the wheel ships it")
    root = tmp_path_factory.mktemp("fresh-install")
    src = root / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("exporter", "agent"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(REPO / name, src / name)
    env = {**os.environ, "FLOWSHIP_SKIP_BPF": "1"}  # the object is already built (and copied with agent/)
    env.pop("PYTHONPATH", None)
    # built in pip's isolated build environment, from the build requirements pyproject declares
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(root / "dist"), str(src)],
                 root, env)
    assert built.returncode == 0, f"building the wheel failed:\n{built.stdout}{built.stderr}"
    (wheel,) = (root / "dist").glob("flowship-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        tops = {name.split("/", 1)[0] for name in archive.namelist()}
    assert tops == {"flowship", "flowship-0.1.0.dist-info"}, f"the wheel installs more than the flowship package: {tops}"
    made = _run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")], root, env)
    assert made.returncode == 0, made.stderr
    inst = _run([sys.executable, "-m", "pip", "--python", str(root / "venv" / "bin" / "python"), "install", "-q",
                 "--disable-pip-version-check", str(wheel)], root, env, timeout=900)
    if inst.returncode:
        pytest.fail("installing the wheel with its declared dependencies failed (it needs the package index or "
                    f"pip's cache):\n{inst.stdout[-3000:]}{inst.stderr[-3000:]}")
    return Installed(root)


def test_every_module_imports_from_the_installed_package(installed: Installed) -> None:
    proc = installed.run(str(installed.bin / "python"), "-I", "-c", IMPORT_EVERYTHING)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["failed"] == {}, f"modules that do not import on a fresh install (undeclared dependency?): " \
                                f"{out['failed']}"
    site = str(installed.root / "venv")
    assert out["agent"].startswith(site) and out["core"].startswith(site)  # not the checkout
    assert Path(out["object"]).read_bytes() == OBJECT.read_bytes()  # the eBPF object ships in the wheel
    assert "127.0.0.1" in out["local_ips"], "the node's own addresses are not detected on a fresh install"


def test_shipped_configs_validate(installed: Installed) -> None:
    for path in sorted((REPO / "configs").glob("*.yaml")):
        proc = installed.run(str(installed.bin / "flowship"), "validate", "--config", str(path))
        assert proc.returncode == 0, f"{path.name}: {proc.stdout}{proc.stderr}"
    proc = installed.run(str(installed.bin / "flowship"), "validate", "--config",
                         str(REPO / "configs" / "cluster-agent-to-kafka.yaml"))
    assert json.loads(proc.stdout.split("\n", 1)[1])["node_name"] == "fresh-node"


def test_export_of_a_recorded_file_to_parquet(installed: Installed, fixture_files: list[Path]) -> None:
    source = next(p for p in fixture_files if "400-tcp" in p.name)
    lines = sum(1 for line in source.read_bytes().splitlines() if line.strip())
    config = installed.root / "export.yaml"
    config.write_text(f"sources:\n  - type: file\n    paths: [{json.dumps(str(source))}]\n"
                      f"sinks:\n  - type: parquet\n    path: {installed.root / 'out'}\n"
                      f"data_dir: {installed.root / 'state'}\n")
    proc = installed.run(str(installed.bin / "flowship"), "--log-level", "warning", "export", "--config",
                         str(config), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    files = [str(p) for p in (installed.root / "out").rglob("*.parquet")]
    assert ds.dataset(files).count_rows() == lines


@pytest.mark.kernel
def test_installed_agent_captures(installed: Installed) -> None:
    if os.geteuid() != 0:
        pytest.fail("the installed agent's smoke run needs root (eBPF): run pytest as root")
    config = installed.root / "agent.yaml"
    config.write_text(f"sources:\n  - type: agent\n    interfaces: []\n    observer: {{enabled: false}}\n"
                      f"sinks:\n  - type: parquet\n    path: {installed.root / 'agent-out'}\n"
                      f"data_dir: {installed.root / 'agent-state'}\n")
    proc = installed.run(str(installed.bin / "flowship"), "--log-format", "json", "agent", "--config", str(config),
                         "--duration", "2", "--no-progress", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert '"agent capturing"' in proc.stderr, proc.stderr
