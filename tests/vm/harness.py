"""Boot a Debian kernel in a VM on the host's root filesystem and run the agent's namespace tests in it.

virtme-ng (`vng`) boots the kernel under QEMU with the host's `/` shared over 9p (read-write, so the
guest runs this checkout and writes its results here). KVM is not usable on these machines (nested
virtualisation hangs the guest), so QEMU emulates the CPU (TCG): boot takes ~40 s and Python is
slow, hence one lean pytest run per boot. The guest's /tmp and /var/tmp are its own: results go to a
directory on the shared filesystem.

    python3 tests/vm/harness.py 6.1 [-- PYTEST ARGS]     # one kernel line: 6.1, 6.12 (newest installed)
    python3 tests/vm/harness.py --list

Kernels and tools come from `bash deploy/dev/setup` (qemu-system-x86, busybox-static, virtme-ng and
the packages linux-image-6.1.0-N-amd64 and linux-image-6.12.N+deb12-amd64).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BOOT = Path("/boot")
RESULTS = Path(os.environ.get("FLOWSHIP_VM_RESULTS", "/var/lib/flowship-vm"))

# Kernel lines of the matrix: name -> vmlinuz file pattern (Debian 12's own and its backports line).
KERNEL_LINES = {
    "6.1": re.compile(r"^vmlinuz-(6\.1\.0-\d+-amd64)$"),
    "6.12": re.compile(r"^vmlinuz-(6\.12\.\d+\+deb12-amd64)$"),
}

# The namespace tests, lean: the topology scenario (HTTP 200/slow/503, SYNs, the nftables-denied port),
# TCP (IPv4/IPv6), UDP/ICMP and HTTP checked against tcpdump/tshark, netfilter and no-socket drops,
# detach cleanup in both attach modes, the verifier report and feature probing. Real veths, namespaces
# and traffic, the same checks as on the host.
DEFAULT_TESTS = [
    *(f"tests/agent/test_kernel_capture.py::{t}" for t in (
        "test_tcp_connection_matches_tcpdump", "test_udp_and_icmp_match_tcpdump", "test_http_snippets",
        "test_kernel_drops_netfilter_and_no_socket", "test_close_leaves_nothing_behind")),
    "tests/agent/test_kernel_scenario.py",
    "tests/agent/test_kernel_drops.py",
    "tests/agent/test_loader_verifier.py",
    "tests/agent/test_kernel_features.py",
]
# Tests that cannot apply to a kernel line (tcx exists from 6.6 on).
DESELECT = {"6.1": ["tests/agent/test_kernel_capture.py::test_close_leaves_nothing_behind[tcx]"]}

TOOLS = {"vng": "pip install virtme-ng", "qemu-system-x86_64": "apt-get install qemu-system-x86",
         "busybox": "apt-get install busybox-static"}


@dataclass
class VmResult:
    """Outcome of one VM run: the guest's pytest exit code (None: it never finished) and its output."""

    kernel: str
    release: str
    rc: int | None
    seconds: float
    boot_seconds: float | None
    pytest_log: str
    vm_log: str
    junit: Path
    out_dir: Path

    def summary(self) -> str:
        """The pytest closing line, or what went wrong."""
        for line in reversed(self.pytest_log.splitlines()):
            if re.search(r"\d+ (passed|failed|error)", line):
                return line.strip("= ")
        return "pytest did not finish" if self.rc is None else f"pytest exited {self.rc}"


def missing_tools() -> list[str]:
    """Tools the harness needs that are not installed, each with how to get it."""
    return [f"{tool} ({how})" for tool, how in TOOLS.items() if not shutil.which(tool)]


def installed_kernels() -> dict[str, str]:
    """Newest installed release per kernel line, e.g. {"6.1": "6.1.0-57-amd64"}."""
    found: dict[str, list[str]] = {}
    for path in BOOT.glob("vmlinuz-*"):
        for line, pat in KERNEL_LINES.items():
            m = pat.match(path.name)
            if m and Path(f"/lib/modules/{m.group(1)}").is_dir():
                found.setdefault(line, []).append(m.group(1))
    return {line: max(rels, key=_version_key) for line, rels in found.items()}


def _version_key(release: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", release))


def guest_script(out: Path, pytest_args: list[str]) -> str:
    """What the guest runs: bpffs, then pytest on this checkout with results under out."""
    py = Path(sys.executable).resolve()  # pyenv shims are not on the guest's PATH
    q = shlex.quote
    args = " ".join(q(a) for a in pytest_args)
    return f"""#!/bin/sh
# written by tests/vm/harness.py; runs inside the VM
cut -d' ' -f1 /proc/uptime > {q(str(out / "uptime"))}  # seconds from kernel start to this script
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
mkdir -p /run/netns
cd {q(str(REPO))}
export PYTHONPATH={q(str(REPO))} HOME=/root FLOWSHIP_TEST_TIME_SCALE=10
{q(str(py))} -m pytest -p no:cacheprovider -q -o addopts=-ra --junitxml={q(str(out / "junit.xml"))} {args} \\
    > {q(str(out / "pytest.log"))} 2>&1
echo $? > {q(str(out / "rc"))}
"""


def run(kernel: str, pytest_args: list[str] | None = None, timeout: float = 1500, memory: str = "2G",
        cpus: int = 2, out_dir: Path | None = None) -> VmResult:
    """Boot the newest installed kernel of a line and run pytest in it; never raises for test failures."""
    missing = missing_tools()
    if missing:
        raise RuntimeError("the VM harness needs: " + ", ".join(missing) + " (`bash deploy/dev/setup` installs them)")
    kernels = installed_kernels()
    if kernel not in kernels:
        raise RuntimeError(f"no Linux {kernel} kernel installed under {BOOT} (have: {kernels or 'none'}): "
                           "`bash deploy/dev/setup` installs the matrix's kernel packages")
    release = kernels[kernel]
    out = out_dir or RESULTS / f"{release}-{os.getpid()}-{int(time.time())}"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    script = out / "guest.sh"
    args = pytest_args or [*DEFAULT_TESTS, *(f"--deselect={t}" for t in DESELECT.get(kernel, []))]
    script.write_text(guest_script(out, args))
    cmd = ["vng", "--disable-kvm", "-r", str(BOOT / f"vmlinuz-{release}"), "--memory", memory,
           "--cpus", str(cpus), "--rw", "--", f"sh {shlex.quote(str(script))}"]
    started = time.monotonic()
    with open(out / "vm.log", "w") as vm_log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=vm_log, stderr=subprocess.STDOUT,
                                cwd=REPO, start_new_session=True)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # vng and the QEMU it started, nothing else
            proc.wait()
    seconds = time.monotonic() - started
    uptime = out / "uptime"
    boot = float(uptime.read_text()) if uptime.exists() and uptime.read_text().strip() else None
    rc_file = out / "rc"
    rc = int(rc_file.read_text()) if rc_file.exists() and rc_file.read_text().strip() else None
    pytest_log = (out / "pytest.log").read_text(errors="replace") if (out / "pytest.log").exists() else ""
    return VmResult(kernel, release, rc, seconds, boot, pytest_log, (out / "vm.log").read_text(errors="replace"),
                    out / "junit.xml", out)


def main(argv: list[str] | None = None) -> int:
    """CLI: run the namespace tests in one kernel's VM; exit code is the guest pytest's."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kernel", nargs="?", choices=sorted(KERNEL_LINES), help="kernel line")
    ap.add_argument("--list", action="store_true", help="print the installed kernels of the matrix")
    ap.add_argument("--timeout", type=float, default=1500)
    ap.add_argument("pytest_args", nargs="*", help="after --: what pytest runs in the guest")
    args = ap.parse_args(argv)
    if args.list or not args.kernel:
        for line, rel in sorted(installed_kernels().items()):
            print(f"{line}: {rel}")
        return 0
    res = run(args.kernel, args.pytest_args or None, timeout=args.timeout)
    print(res.pytest_log[-6000:])
    boot = f"{res.boot_seconds:.0f} s" if res.boot_seconds is not None else "?"
    print(f"vm {res.release}: {res.summary()} ({res.seconds:.0f} s, boot {boot}); results in {res.out_dir}")
    return 1 if res.rc is None else res.rc


if __name__ == "__main__":
    sys.exit(main())
