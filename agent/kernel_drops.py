"""Names of the kernel's drop reasons, read from the running kernel's BTF.

enum skb_drop_reason grows and renumbers between kernel releases, so the numbers in drop events
only mean something against the BTF of the kernel that produced them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from flowship.agent import btf

PREFIX = "SKB_DROP_REASON_"


class DropReasons:
    """numeric enum skb_drop_reason value <-> short name (NO_SOCKET, NETFILTER_DROP, ...)."""

    def __init__(self, members: dict[str, int]) -> None:
        self.by_value: dict[int, str] = {}
        for name, value in members.items():
            short = name.removeprefix(PREFIX)
            self.by_value.setdefault(value, short)
        self.by_name = {v: k for k, v in self.by_value.items()}

    @classmethod
    def from_kernel(cls, path: Path = btf.VMLINUX_BTF) -> DropReasons:
        """From /sys/kernel/btf/vmlinux; a kernel without the enum (< 5.17) gives an empty table."""
        try:
            members = btf.load(path).enum("skb_drop_reason")
        except KeyError:
            members = {}
        return cls(members)

    def name(self, value: int) -> str:
        """Short name, or the number as text when this kernel's BTF does not know it."""
        return self.by_value.get(int(value), str(int(value)))

    def value(self, name: str) -> int:
        """Number of a short name on this kernel (KeyError if unknown)."""
        return self.by_name[name.removeprefix(PREFIX)]

    def names(self, values: np.ndarray) -> np.ndarray:
        """Vectorised name lookup: one dict lookup per distinct value, not per row."""
        uniq, inverse = np.unique(np.asarray(values), return_inverse=True)
        table = np.array([self.name(v) for v in uniq], dtype=object)
        return table[inverse].reshape(np.shape(values))
