"""Minimal reader of the kernel's BTF (/sys/kernel/btf/vmlinux): enum values and type names.

Used for facts that differ between kernels and that the agent must know at run time: the names of
enum skb_drop_reason values, and whether types that reveal a feature exist (tcx, tp_btf hooks).
Only the type section is walked; nothing here needs libbpf.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")

BTF_MAGIC = 0xEB9F
KIND_PTR = 2
KIND_ENUM = 6
KIND_TYPEDEF = 8
KIND_FUNC_PROTO = 13
KIND_ENUM64 = 19

# bytes following struct btf_type, per kind: fixed part and per-member part (vlen entries)
_EXTRA = {
    1: (4, 0),  # INT
    2: (0, 0),  # PTR
    3: (12, 0),  # ARRAY
    4: (0, 12),  # STRUCT
    5: (0, 12),  # UNION
    6: (0, 8),  # ENUM
    7: (0, 0),  # FWD
    8: (0, 0),  # TYPEDEF
    9: (0, 0),  # VOLATILE
    10: (0, 0),  # CONST
    11: (0, 0),  # RESTRICT
    12: (0, 0),  # FUNC
    13: (0, 8),  # FUNC_PROTO
    14: (4, 0),  # VAR
    15: (0, 12),  # DATASEC
    16: (0, 0),  # FLOAT
    17: (4, 0),  # DECL_TAG
    18: (0, 0),  # TYPE_TAG
    19: (0, 12),  # ENUM64
}


@dataclass
class Btf:
    """Names of every type by kind, and the members of every enum."""

    names: dict[int, set[str]] = field(default_factory=dict)
    enums: dict[str, dict[str, int]] = field(default_factory=dict)
    # type id -> (kind, name, referenced type id); and FUNC_PROTO id -> parameter type ids
    types: dict[int, tuple[int, str, int]] = field(default_factory=dict)
    protos: dict[int, list[int]] = field(default_factory=dict)
    typedefs: dict[str, int] = field(default_factory=dict)

    def has(self, kind: int, name: str) -> bool:
        """Whether a type of this kind and name exists."""
        return name in self.names.get(kind, ())

    def enum(self, name: str) -> dict[str, int]:
        """Members of an enum (KeyError if the kernel has no such enum)."""
        return self.enums[name]

    def tracepoint_args(self, name: str) -> list[str] | None:
        """Parameter types of a raw tracepoint (what tp_btf/<name> programs receive), None when absent.

        The kernel describes each one as `typedef void (*btf_trace_<name>)(void *, args...)`; the
        leading context pointer is left out. Types are named by kind: "ptr", "enum skb_drop_reason",
        "int", ... which is enough to tell signatures apart (kfree_skb gained its reason in 5.17).
        """
        tid = self.typedefs.get(f"btf_trace_{name}")
        if tid is None:
            return None
        seen = 0
        while tid in self.types and self.types[tid][0] in (KIND_TYPEDEF, KIND_PTR) and seen < 8:
            tid = self.types[tid][2]
            seen += 1
        params = self.protos.get(tid)
        if params is None:
            return None
        return [self._describe(t) for t in params[1:]]

    def _describe(self, tid: int) -> str:
        kind, name, _ = self.types.get(tid, (0, "", 0))
        if kind == KIND_PTR:
            return "ptr"
        if kind in (KIND_ENUM, KIND_ENUM64):
            return f"enum {name}"
        return name or f"kind{kind}"


def parse(data: bytes) -> Btf:
    """Parse raw BTF bytes (little- or big-endian)."""
    magic_le = struct.unpack_from("<H", data, 0)[0]
    endian = "<" if magic_le == BTF_MAGIC else ">"
    if struct.unpack_from(endian + "H", data, 0)[0] != BTF_MAGIC:
        raise ValueError("not BTF data (bad magic)")
    hdr_len, type_off, type_len, str_off, str_len = struct.unpack_from(endian + "5I", data, 4)
    types = memoryview(data)[hdr_len + type_off : hdr_len + type_off + type_len]
    strs = data[hdr_len + str_off : hdr_len + str_off + str_len]

    def name_at(off: int) -> str:
        end = strs.index(b"\0", off)
        return strs[off:end].decode()

    out = Btf()
    head = struct.Struct(endian + "3I")
    member32 = struct.Struct(endian + "Ii")
    member64 = struct.Struct(endian + "III")
    pos = 0
    tid = 0  # type ids start at 1, in section order
    limit = len(types)
    while pos < limit:
        name_off, info, _size = head.unpack_from(types, pos)
        pos += 12
        kind = (info >> 24) & 0x1F
        vlen = info & 0xFFFF
        fixed, per = _EXTRA.get(kind, (None, None))
        if fixed is None:
            raise ValueError(f"unknown BTF kind {kind}")
        tid += 1
        if kind in (KIND_PTR, KIND_TYPEDEF, KIND_ENUM, KIND_ENUM64, 1):
            out.types[tid] = (kind, name_at(name_off) if name_off else "", _size)
            if kind == KIND_TYPEDEF and name_off:
                out.typedefs[out.types[tid][1]] = tid
        elif kind == KIND_FUNC_PROTO:
            out.protos[tid] = [member32.unpack_from(types, pos + i * 8)[1] for i in range(vlen)]
        if name_off:
            name = name_at(name_off)
            out.names.setdefault(kind, set()).add(name)
            if kind == KIND_ENUM:
                signed = bool(info >> 31)
                members = {}
                for i in range(vlen):
                    moff, val = member32.unpack_from(types, pos + i * 8)
                    members[name_at(moff)] = val if signed else val & 0xFFFFFFFF
                out.enums[name] = members
            elif kind == KIND_ENUM64:
                members = {}
                for i in range(vlen):
                    moff, lo, hi = member64.unpack_from(types, pos + i * 12)
                    members[name_at(moff)] = (hi << 32) | lo
                out.enums[name] = members
        pos += fixed + per * vlen
    return out


def load(path: Path = VMLINUX_BTF) -> Btf:
    """Parse the running kernel's BTF; FileNotFoundError says how to get it."""
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"{path} is missing: the kernel needs CONFIG_DEBUG_INFO_BTF=y (most distribution kernels since 5.8)"
        ) from exc
    return parse(data)
