"""The loader's report of a verifier refusal: which program, which instruction, the verifier's words.

One test reads a real log (Linux 6.1 refusing fs_tc_ingress before the fix in bpf/l7_payload.h);
the others compile a tiny object with one program the verifier must refuse and load it on this
kernel, also with a log buffer too small for the log (the loader must retry with a larger one).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from flowship.agent import loader

DATA = Path(__file__).resolve().parent / "data"
REPO = Path(__file__).resolve().parents[2]

BAD_C = r"""
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

struct {
	__uint(type, BPF_MAP_TYPE_HASH); /* array lookups with a constant key can be non-NULL */
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} counts SEC(".maps");

SEC("tc")
int fine_prog(struct __sk_buff *skb)
{
	return 0;
}

SEC("tc")
int null_deref_prog(struct __sk_buff *skb)
{
	__u32 key = 0;
	__u64 *v = bpf_map_lookup_elem(&counts, &key);

	return *v + 1; /* no NULL check: the verifier must refuse this */
}

char LICENSE[] SEC("license") = "GPL";
"""


def test_complaint_of_a_real_6_1_log() -> None:
    log = (DATA / "verifier-6.1-fs_tc_ingress.log").read_text()
    c = loader.verifier_complaint(log)
    assert c.insn == "2686 (call bpf_skb_load_bytes#26)"
    assert c.source is not None and "bpf_skb_load_bytes(skb, off, (__u8 *)(e + 1), n)" in c.source
    assert c.message == [
        "invalid access to memory, mem_size=328 off=72 size=0",
        "R3 min value is outside of the allowed memory range",
    ]


def test_complaint_without_instructions_keeps_the_last_lines() -> None:
    c = loader.verifier_complaint("func#0 @0\nunknown opcode 8d\nprocessed 0 insns (limit 1000000)\n")
    assert c.insn is None and c.message == ["func#0 @0", "unknown opcode 8d"]


@pytest.fixture(scope="module")
def bad_object(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if os.geteuid() != 0:
        pytest.fail("loading BPF programs needs root: run pytest as root")
    clang = shutil.which("clang")
    if clang is None:
        pytest.fail("clang is missing (apt-get install clang; `bash deploy/dev/setup` installs it)")
    vmlinux_h = REPO / "bpf" / "build" / "vmlinux.h"
    if not vmlinux_h.exists():
        pytest.fail(f"{vmlinux_h} is missing: build the eBPF object first (`make -C bpf`)")
    d = tmp_path_factory.mktemp("bad-bpf")
    (d / "bad.bpf.c").write_text(BAD_C)
    subprocess.run([clang, "-O2", "-g", "-target", "bpf", "-I", str(vmlinux_h.parent), "-c", str(d / "bad.bpf.c"),
                    "-o", str(d / "bad.bpf.o")], check=True, capture_output=True, text=True)
    return d / "bad.bpf.o"


def test_refusal_names_program_instruction_and_reason(bad_object: Path) -> None:
    with pytest.raises(loader.BpfLoadError) as info:
        loader.load_object(bad_object, lambda obj: None)
    exc = info.value
    text = str(exc)
    assert exc.program == "null_deref_prog"
    assert "refused program 'null_deref_prog' at instruction" in text
    assert "invalid mem access 'map_value_or_null'" in text
    assert "source: return *v + 1;" in text
    assert not exc.truncated
    assert exc.log_path is not None and exc.log_path.read_text() == exc.log


def test_too_small_log_buffer_is_retried_larger(bad_object: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sizes: list[int] = []
    real_load = loader.BpfObject.load

    def spy(self: loader.BpfObject, log_size: int = loader.VERIFIER_LOG_SIZE) -> None:
        sizes.append(log_size)
        real_load(self, log_size)

    monkeypatch.setattr(loader.BpfObject, "load", spy)
    with pytest.raises(loader.BpfLoadError) as info:
        loader.load_object(bad_object, lambda obj: None, log_size=128)
    assert sizes[0] == 128 and len(sizes) >= 2, sizes  # the kernel said ENOSPC at least once
    assert not info.value.truncated
    assert "invalid mem access 'map_value_or_null'" in str(info.value)


def test_program_left_out_is_not_verified(bad_object: Path) -> None:
    obj = loader.load_object(bad_object, lambda o: o.program("null_deref_prog").set_autoload(False))
    try:
        assert obj.program("fine_prog").fd >= 0
    finally:
        obj.close()
