"""The numpy dtypes in agent/events.py must match bpf/flowship_abi.h byte for byte.

Two independent checks: a host C program built from the header prints sizeof/offsetof of every
field and the value of every constant; and the BTF inside the built object (what the kernel actually
writes) is compared too.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from flowship.agent import btf, events
from flowship.agent.kernel_drops import DropReasons
from flowship.agent.loader import DEFAULT_OBJECT
from flowship.agent.ringbuf import BUSY_BIT, DISCARD_BIT, committed_prefix

REPO = Path(__file__).resolve().parents[2]
HEADER_DIR = REPO / "bpf"

STRUCTS = {
    "fs_flow_event": events.FLOW_EVENT_DTYPE,
    "fs_l7_event": events.L7_HEADER_DTYPE,
    "fs_config": events.CONFIG_DTYPE,
    "fs_sweep_args": events.SWEEP_ARGS_DTYPE,
    "fs_stats": events.STATS_DTYPE,
}

CONSTANTS = {
    "FS_KIND_": events.Kind,
    "FS_TRIG_": events.Trigger,
    "FS_HOOK_": events.Hook,
    "FS_EF_": events.EventFlags,
    "FS_TCP_": events.TcpFlags,
    "FS_L7_": events.L7Kind,
    "FS_AGG_": events.Aggregation,
    "FS_L7F_": events.L7Flags,
    "FS_STAT_": events.Stat,
}
SCALARS = {
    "FS_L7_SNAP_MAX": events.L7_SNAP_MAX,
    "FS_L7_PORT_WORDS": events.L7_PORT_WORDS,
    "FS_STAT_MAX": events.STAT_COUNT,
}


def _compiler() -> str:
    for cc in ("cc", "gcc", "clang"):
        if shutil.which(cc):
            return cc
    pytest.fail("no C compiler (cc/gcc/clang) to check bpf/flowship_abi.h: apt-get install clang")


@pytest.fixture(scope="module")
def c_layout(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    """name -> number printed by a C program compiled against the header."""
    lines = ["#include <stdio.h>", "#include <stddef.h>", '#include "flowship_abi.h"', "int main(void) {"]
    for struct, dtype in STRUCTS.items():
        lines.append(f'printf("{struct}.sizeof %zu\\n", sizeof(struct {struct}));')
        for name in dtype.names:
            lines.append(f'printf("{struct}.{name}.offset %zu\\n", offsetof(struct {struct}, {name}));')
            lines.append(f'printf("{struct}.{name}.size %zu\\n", sizeof(((struct {struct} *)0)->{name}));')
    for prefix, enum in CONSTANTS.items():
        for member in enum:
            cname = prefix + member.name
            lines.append(f'printf("{cname} %lld\\n", (long long)({cname}));')
    for cname in SCALARS:
        lines.append(f'printf("{cname} %lld\\n", (long long)({cname}));')
    lines += ["return 0;", "}"]
    d = tmp_path_factory.mktemp("abi")
    src, exe = d / "abi.c", d / "abi"
    src.write_text("\n".join(lines))
    subprocess.run([_compiler(), f"-I{HEADER_DIR}", "-o", str(exe), str(src)], check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return {k: int(v) for k, v in (line.split() for line in out.splitlines())}


@pytest.mark.parametrize("struct", list(STRUCTS))
def test_dtype_matches_c_header(c_layout: dict[str, int], struct: str) -> None:
    dtype = STRUCTS[struct]
    assert dtype.itemsize == c_layout[f"{struct}.sizeof"], f"sizeof(struct {struct})"
    for name in dtype.names:
        field, offset = dtype.fields[name][:2]
        assert offset == c_layout[f"{struct}.{name}.offset"], f"offsetof({struct}, {name})"
        assert field.itemsize == c_layout[f"{struct}.{name}.size"], f"sizeof({struct}.{name})"


def test_record_sizes_keep_the_ring_regular() -> None:
    # 8-byte ring header + record, no padding between records: sizes must be multiples of 8
    assert events.FLOW_EVENT_DTYPE.itemsize % 8 == 0
    assert events.L7_HEADER_DTYPE.itemsize % 8 == 0
    assert events.l7_event_dtype(256).itemsize == events.L7_HEADER_DTYPE.itemsize + 256


def test_constants_match_c_header(c_layout: dict[str, int]) -> None:
    for prefix, enum in CONSTANTS.items():
        for member in enum:
            assert int(member) == c_layout[prefix + member.name], prefix + member.name
    for cname, value in SCALARS.items():
        assert value == c_layout[cname], cname


def _object_btf_structs(obj: Path) -> dict[str, tuple[int, dict[str, int]]]:
    """struct name -> (size, {member: byte offset}) from `bpftool btf dump file OBJ`."""
    if not shutil.which("bpftool"):
        pytest.fail("bpftool is missing: apt-get install bpftool")
    text = subprocess.run(
        ["bpftool", "btf", "dump", "file", str(obj)], check=True, capture_output=True, text=True
    ).stdout
    structs: dict[str, tuple[int, dict[str, int]]] = {}
    current: dict[str, int] | None = None
    for line in text.splitlines():
        m = re.match(r"\[\d+\] STRUCT '(\w+)' size=(\d+)", line)
        if m:
            current = {}
            structs[m.group(1)] = (int(m.group(2)), current)
            continue
        m = re.match(r"\s+'(\w+)' type_id=\d+ bits_offset=(\d+)", line)
        if m and current is not None:
            current[m.group(1)] = int(m.group(2)) // 8
        elif not line.startswith("\t"):
            current = None
    return structs


def test_dtype_matches_built_object_btf() -> None:
    if not DEFAULT_OBJECT.exists():
        pytest.fail(f"{DEFAULT_OBJECT} is missing: build it with `make -C bpf`")
    structs = _object_btf_structs(DEFAULT_OBJECT)
    for struct in ("fs_flow_event", "fs_l7_event", "fs_config", "fs_sweep_args"):
        assert struct in structs, f"struct {struct} not in the object's BTF"
        size, members = structs[struct]
        dtype = STRUCTS[struct]
        assert size == dtype.itemsize, struct
        for name, offset in members.items():
            assert dtype.fields[name][1] == offset, f"{struct}.{name}"


def test_committed_prefix_stops_at_busy_and_skips_discard() -> None:
    size = 128
    lens = np.array([size, size | DISCARD_BIT, size, size | BUSY_BIT, size], dtype=np.uint32)
    n, keep = committed_prefix(lens, size)
    assert n == 3
    assert keep is not None and keep.tolist() == [True, False, True]
    n, keep = committed_prefix(np.array([size, size], dtype=np.uint32), size)
    assert (n, keep) == (2, None)
    n, _ = committed_prefix(np.array([size | BUSY_BIT, size], dtype=np.uint32), size)
    assert n == 0
    n, _ = committed_prefix(np.array([size, 64], dtype=np.uint32), size)
    assert n == -1  # irregular region: the reader falls back to a record walk


def test_btf_parser_reads_drop_reasons_of_this_kernel() -> None:
    if not btf.VMLINUX_BTF.exists():
        pytest.fail(f"{btf.VMLINUX_BTF} missing: kernel without CONFIG_DEBUG_INFO_BTF")
    reasons = DropReasons.from_kernel()
    # the values themselves vary between kernels; the names must round-trip
    for name in ("NOT_SPECIFIED", "NO_SOCKET", "NETFILTER_DROP"):
        assert reasons.name(reasons.value(name)) == name
    vals = np.array([reasons.value("NO_SOCKET"), reasons.value("NETFILTER_DROP"), 99999], dtype=np.uint32)
    assert reasons.names(vals).tolist() == ["NO_SOCKET", "NETFILTER_DROP", "99999"]
    # cross-check with bpftool's own reading of the same BTF
    if shutil.which("bpftool"):
        text = subprocess.run(
            ["bpftool", "btf", "dump", "file", str(btf.VMLINUX_BTF), "format", "c"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        m = re.search(r"SKB_DROP_REASON_NETFILTER_DROP = (\d+),", text)
        assert m and int(m.group(1)) == reasons.value("NETFILTER_DROP")
