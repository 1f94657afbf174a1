"""The agent's namespace tests on the kernels of the matrix, each booted in a VM (tests/vm/harness.py).

One VM per kernel line, one at a time (TCG is slow and the machine is shared). A failure inside the
guest fails here with the guest's pytest output; a missing kernel or tool fails with what installs it.
The host's own kernel is covered by running tests/agent directly.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path

import harness  # tests/vm/harness.py (pytest puts this folder on sys.path)
import pytest

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(1800)]


def _failures(junit: Path) -> list[str]:
    if not junit.exists():
        return []
    out = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        for bad in list(case.findall("failure")) + list(case.findall("error")):
            out.append(f"{case.get('classname')}::{case.get('name')}: {(bad.get('message') or '')[:300]}")
    return out


@pytest.mark.parametrize("kernel", sorted(harness.KERNEL_LINES))
def test_namespace_tests_pass_in_vm(kernel: str) -> None:
    if os.geteuid() != 0:
        pytest.fail("the VM matrix needs root (QEMU on the host's root filesystem, eBPF in the guest)")
    try:
        res = harness.run(kernel)
    except RuntimeError as exc:
        pytest.fail(str(exc))
    print(f"{res.release}: {res.summary()} in {res.seconds:.0f} s (boot {res.boot_seconds} s)")
    if res.rc is None:
        pytest.fail(f"Linux {res.release}: the guest's pytest did not finish in time ({res.seconds:.0f} s); "
                    f"VM console tail:\n{res.vm_log[-3000:]}\npytest output:\n{res.pytest_log[-3000:]}")
    if res.rc != 0:
        failed = "\n".join(_failures(res.junit))
        pytest.fail(f"Linux {res.release}: {res.summary()}\n{failed}\n--- guest pytest output (tail) ---\n"
                    f"{res.pytest_log[-8000:]}")
    assert "passed" in res.summary(), res.summary()
