"""Thin ctypes layer over libbpf.so.1: open an object, set .rodata and map sizes, load, find fds.

Policy (what to attach where, how to read rings) lives in attach.py, ringbuf.py and capture.py;
this module only turns libbpf's C API into Python calls with errors that say what to do.
Written against libbpf 1.1 (Debian 12), using nothing newer than 1.0.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import mmap
import os
import re
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

# enum bpf_map_type / bpf_prog_type / bpf_attach_type values used here (uapi, stable)
BPF_MAP_TYPE_RINGBUF = 27
BPF_PROG_TYPE_SCHED_CLS = 3
BPF_PROG_TYPE_TRACING = 26
BPF_PROG_TYPE_SYSCALL = 31
BPF_TCX_INGRESS = 46
BPF_TCX_EGRESS = 47
BPF_TC_INGRESS = 1
BPF_TC_EGRESS = 2

DEFAULT_OBJECT = Path(__file__).resolve().parent / "_bpf" / "flowship.bpf.o"

VERIFIER_LOG_SIZE = 16 << 20
"""Bytes of verifier log per program. Mapped lazily (only what the kernel writes costs memory) and
only written when a load fails (libbpf then retries at log level 1), so it can be generous."""
VERIFIER_LOG_MAX = 256 << 20


class BpfError(OSError):
    """A libbpf or bpf() call failed; str() says which call and, for loads, the verifier's words."""


class BpfLoadError(BpfError):
    """The kernel refused a program: names it and quotes the verifier's complaint.

    program: the refused program (None when libbpf failed before any program, e.g. a map);
    log: the whole verifier log; truncated: the log did not fit (retry with a larger buffer);
    log_path: where the whole log was written for reading.
    """

    def __init__(self, err: int, msg: str, program: str | None, log: str, truncated: bool,
                 log_path: Path | None = None) -> None:
        super().__init__(err, msg)
        self.program = program
        self.log = log
        self.truncated = truncated
        self.log_path = log_path

    def __str__(self) -> str:
        return str(self.strerror)


class BpfUnavailableError(RuntimeError):
    """libbpf, the object file or a kernel feature is missing; the message says what to install or do."""


class _TcHook(ctypes.Structure):
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("ifindex", ctypes.c_int),
        ("attach_point", ctypes.c_int),
        ("parent", ctypes.c_uint32),
    ]


class _TcOpts(ctypes.Structure):
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("prog_fd", ctypes.c_int),
        ("flags", ctypes.c_uint32),
        ("prog_id", ctypes.c_uint32),
        ("handle", ctypes.c_uint32),
        ("priority", ctypes.c_uint32),
    ]


class _TestRunOpts(ctypes.Structure):
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("data_in", ctypes.c_void_p),
        ("data_out", ctypes.c_void_p),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_void_p),
        ("ctx_out", ctypes.c_void_p),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("repeat", ctypes.c_int),
        ("duration", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
    ]


RING_SAMPLE_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
_PRINT_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)

_P = ctypes.c_void_p
_I = ctypes.c_int
_U32 = ctypes.c_uint32
_S = ctypes.c_char_p
_PROTOS: dict[str, tuple[object, list[object]]] = {
    "bpf_object__open_file": (_P, [_S, _P]),
    "bpf_object__load": (_I, [_P]),
    "bpf_object__close": (None, [_P]),
    "bpf_object__find_map_by_name": (_P, [_P, _S]),
    "bpf_object__find_program_by_name": (_P, [_P, _S]),
    "bpf_object__next_map": (_P, [_P, _P]),
    "bpf_map__name": (_S, [_P]),
    "bpf_map__fd": (_I, [_P]),
    "bpf_map__set_max_entries": (_I, [_P, _U32]),
    "bpf_map__max_entries": (_U32, [_P]),
    "bpf_map__value_size": (_U32, [_P]),
    "bpf_map__key_size": (_U32, [_P]),
    "bpf_map__initial_value": (_P, [_P, ctypes.POINTER(ctypes.c_size_t)]),
    "bpf_object__next_program": (_P, [_P, _P]),
    "bpf_program__name": (_S, [_P]),
    "bpf_program__fd": (_I, [_P]),
    "bpf_program__autoload": (ctypes.c_bool, [_P]),
    "bpf_program__set_autoload": (_I, [_P, ctypes.c_bool]),
    "bpf_program__set_log_buf": (_I, [_P, _P, ctypes.c_size_t]),
    "bpf_program__attach": (_P, [_P]),
    "bpf_link__destroy": (_I, [_P]),
    "bpf_link_create": (_I, [_I, _I, _I, _P]),
    "bpf_tc_hook_create": (_I, [ctypes.POINTER(_TcHook)]),
    "bpf_tc_hook_destroy": (_I, [ctypes.POINTER(_TcHook)]),
    "bpf_tc_attach": (_I, [ctypes.POINTER(_TcHook), ctypes.POINTER(_TcOpts)]),
    "bpf_tc_detach": (_I, [ctypes.POINTER(_TcHook), ctypes.POINTER(_TcOpts)]),
    "bpf_prog_test_run_opts": (_I, [_I, ctypes.POINTER(_TestRunOpts)]),
    "bpf_map_lookup_elem": (_I, [_I, _P, _P]),
    "bpf_map_update_elem": (_I, [_I, _P, _P, ctypes.c_uint64]),
    "bpf_prog_query": (_I, [_I, _I, _U32, ctypes.POINTER(_U32), ctypes.POINTER(_U32), ctypes.POINTER(_U32)]),
    "bpf_obj_get_info_by_fd": (_I, [_I, _P, ctypes.POINTER(_U32)]),
    "libbpf_num_possible_cpus": (_I, []),
    "libbpf_probe_bpf_map_type": (_I, [_I, _P]),
    "libbpf_probe_bpf_prog_type": (_I, [_I, _P]),
    "libbpf_probe_bpf_helper": (_I, [_I, _I, _P]),
    "libbpf_set_print": (_P, [_PRINT_FN]),
    "ring_buffer__new": (_P, [_I, RING_SAMPLE_FN, _P, _P]),
    "ring_buffer__poll": (_I, [_P, _I]),
    "ring_buffer__consume": (_I, [_P]),
    "ring_buffer__free": (None, [_P]),
}


class _Log:
    """libbpf's print callback: keeps the latest messages so load errors can show the verifier log."""

    def __init__(self, libc: ctypes.CDLL) -> None:
        self._lock = threading.Lock()
        self._lines: list[str] = []
        self._vsnprintf = libc.vsnprintf
        self._vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_void_p]
        self._buf = ctypes.create_string_buffer(8192)
        self.callback = _PRINT_FN(self._print)

    def _print(self, level: int, fmt: bytes, args: int) -> int:
        with self._lock:
            self._vsnprintf(self._buf, len(self._buf), fmt, args)
            self._lines.append(self._buf.value.decode(errors="replace"))
            del self._lines[:-400]
        return 0

    def take(self) -> str:
        """Messages since the previous take()."""
        with self._lock:
            text = "".join(self._lines)
            self._lines.clear()
        return text


@functools.cache
def _lib() -> tuple[ctypes.CDLL, _Log]:
    name = ctypes.util.find_library("bpf") or "libbpf.so.1"
    try:
        lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
    except OSError:
        try:
            lib = ctypes.CDLL(name, use_errno=True)
        except OSError as exc:
            raise BpfUnavailableError(
                "libbpf.so.1 not found: install libbpf (Debian/Ubuntu: apt-get install libbpf1; "
                "Fedora: dnf install libbpf)"
            ) from exc
    for fn, (restype, argtypes) in _PROTOS.items():
        try:
            f = getattr(lib, fn)
        except AttributeError as exc:
            raise BpfUnavailableError(f"{name} lacks {fn}: libbpf >= 1.0 is required") from exc
        f.restype = restype
        f.argtypes = argtypes
    log = _Log(ctypes.CDLL(None))
    lib.libbpf_set_print(log.callback)
    return lib, log


def libbpf() -> ctypes.CDLL:
    """The loaded libbpf.so.1 with prototypes set."""
    return _lib()[0]


def _errno_error(call: str, ret: int | None = None, detail: str = "") -> BpfError:
    err = -ret if ret is not None and ret < 0 else ctypes.get_errno()
    msg = f"{call}: {os.strerror(err)}"
    if err == errno.EPERM:
        msg += " (needs root or CAP_BPF + CAP_NET_ADMIN + CAP_PERFMON)"
    if detail:
        msg += "\n" + detail
    return BpfError(err, msg)


def _check(call: str, ret: int) -> int:
    if ret < 0:
        raise _errno_error(call, ret)
    return ret


class BpfMap:
    """A map of a loaded (or about to be loaded) object."""

    def __init__(self, ptr: int, name: str) -> None:
        self._ptr = ptr
        self.name = name

    @property
    def fd(self) -> int:
        """File descriptor (valid after load)."""
        return _check(f"bpf_map__fd({self.name})", libbpf().bpf_map__fd(self._ptr))

    @property
    def max_entries(self) -> int:
        """Entries, or bytes for a ring buffer."""
        return int(libbpf().bpf_map__max_entries(self._ptr))

    @property
    def value_size(self) -> int:
        """Value size in bytes (per CPU for per-CPU maps)."""
        return int(libbpf().bpf_map__value_size(self._ptr))

    def set_max_entries(self, n: int) -> None:
        """Resize before load (ring buffers: a power-of-two multiple of the page size)."""
        _check(f"bpf_map__set_max_entries({self.name})", libbpf().bpf_map__set_max_entries(self._ptr, n))

    def initial_value(self) -> memoryview:
        """Writable view of a global-data map's contents (.rodata must be written before load)."""
        size = ctypes.c_size_t()
        addr = libbpf().bpf_map__initial_value(self._ptr, ctypes.byref(size))
        if not addr:
            raise _errno_error(f"bpf_map__initial_value({self.name})")
        return memoryview((ctypes.c_char * size.value).from_address(addr)).cast("B")

    def lookup(self, key: bytes, value_size: int) -> bytes:
        """One element by key (value_size: for per-CPU maps, CPUs x rounded value size)."""
        buf = ctypes.create_string_buffer(value_size)
        _check(f"bpf_map_lookup_elem({self.name})", libbpf().bpf_map_lookup_elem(self.fd, key, buf))
        return buf.raw

    def update(self, key: bytes, value: bytes, flags: int = 0) -> None:
        """Insert or replace one element."""
        _check(f"bpf_map_update_elem({self.name})", libbpf().bpf_map_update_elem(self.fd, key, value, flags))


class BpfLink:
    """A libbpf bpf_link (tracing attach); destroy() detaches."""

    def __init__(self, ptr: int, what: str) -> None:
        self._ptr: int | None = ptr
        self.what = what

    def destroy(self) -> None:
        """Detach; safe to call twice."""
        if self._ptr:
            libbpf().bpf_link__destroy(self._ptr)
            self._ptr = None


class BpfProgram:
    """A program of an object."""

    def __init__(self, ptr: int, name: str) -> None:
        self._ptr = ptr
        self.name = name

    @property
    def fd(self) -> int:
        """File descriptor (valid after load)."""
        return _check(f"bpf_program__fd({self.name})", libbpf().bpf_program__fd(self._ptr))

    def set_autoload(self, enabled: bool) -> None:
        """Skip loading this program (before load), e.g. when its hook is missing."""
        _check(f"bpf_program__set_autoload({self.name})", libbpf().bpf_program__set_autoload(self._ptr, enabled))

    def attach(self) -> BpfLink:
        """Attach by section name (tp_btf/..., fentry/...), as libbpf's auto-attach does."""
        ptr = libbpf().bpf_program__attach(self._ptr)
        if not ptr:
            raise _errno_error(f"bpf_program__attach({self.name})", detail=_lib()[1].take())
        return BpfLink(ptr, self.name)

    def test_run(self, data: bytes, repeat: int = 1) -> tuple[int, int]:
        """BPF_PROG_TEST_RUN of a packet program on data, repeat times: (last verdict, mean ns per run)."""
        buf = ctypes.create_string_buffer(data, len(data))
        opts = _TestRunOpts(sz=ctypes.sizeof(_TestRunOpts), data_in=ctypes.addressof(buf), data_size_in=len(data))
        opts.repeat = repeat
        _check(f"bpf_prog_test_run_opts({self.name})", libbpf().bpf_prog_test_run_opts(self.fd, ctypes.byref(opts)))
        return int(opts.retval), int(opts.duration)

    def run_syscall(self, ctx: bytes) -> tuple[int, bytes]:
        """Run a SEC("syscall") program once; the kernel writes the context back (returned)."""
        buf = ctypes.create_string_buffer(ctx, len(ctx))
        opts = _TestRunOpts(sz=ctypes.sizeof(_TestRunOpts), ctx_in=ctypes.addressof(buf), ctx_size_in=len(ctx))
        _check(f"bpf_prog_test_run_opts({self.name})", libbpf().bpf_prog_test_run_opts(self.fd, ctypes.byref(opts)))
        return int(opts.retval), buf.raw


class BpfObject:
    """An opened BPF object file; configure maps/programs, then load()."""

    def __init__(self, path: str | os.PathLike[str] = DEFAULT_OBJECT) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise BpfUnavailableError(
                f"{self.path} does not exist: build it with `make -C bpf` (needs clang, bpftool and kernel BTF)"
            )
        lib, log = _lib()
        log.take()
        ptr = lib.bpf_object__open_file(os.fsencode(self.path), None)
        if not ptr:
            raise _errno_error(f"bpf_object__open_file({self.path})", detail=log.take())
        self._ptr: int | None = ptr
        self.loaded = False

    def _obj(self) -> int:
        if not self._ptr:
            raise ValueError("BPF object is closed")
        return self._ptr

    def map(self, name: str) -> BpfMap:
        """Map by name (ELF symbol name)."""
        ptr = libbpf().bpf_object__find_map_by_name(self._obj(), name.encode())
        if not ptr:
            raise KeyError(f"no map {name!r} in {self.path}")
        return BpfMap(ptr, name)

    def maps(self) -> Iterator[BpfMap]:
        """Every map, including the internal .rodata/.bss ones."""
        lib = libbpf()
        ptr = lib.bpf_object__next_map(self._obj(), None)
        while ptr:
            yield BpfMap(ptr, lib.bpf_map__name(ptr).decode())
            ptr = lib.bpf_object__next_map(self._obj(), ptr)

    def rodata(self) -> BpfMap:
        """The object's .rodata map (libbpf names it '<object prefix>.rodata')."""
        for m in self.maps():
            if m.name.endswith(".rodata"):
                return m
        raise KeyError(f"no .rodata map in {self.path}")

    def program(self, name: str) -> BpfProgram:
        """Program by C function name."""
        ptr = libbpf().bpf_object__find_program_by_name(self._obj(), name.encode())
        if not ptr:
            raise KeyError(f"no program {name!r} in {self.path}")
        return BpfProgram(ptr, name)

    def programs(self) -> Iterator[BpfProgram]:
        """Every program of the object, in section order."""
        lib = libbpf()
        ptr = lib.bpf_object__next_program(self._obj(), None)
        while ptr:
            yield BpfProgram(ptr, lib.bpf_program__name(ptr).decode())
            ptr = lib.bpf_object__next_program(self._obj(), ptr)

    def load(self, log_size: int = VERIFIER_LOG_SIZE) -> None:
        """Create maps, run the verifier, load programs.

        Each program gets its own verifier log buffer of log_size bytes, so a refusal is reported
        with the program's name and the verifier's last words (BpfLoadError), not libbpf's
        printout of a log cut to fit its print buffer.
        """
        lib, log = _lib()
        log.take()
        buffers: dict[str, tuple[mmap.mmap, ctypes.Array[ctypes.c_char]]] = {}
        try:
            for prog in self.programs():
                if not lib.bpf_program__autoload(prog._ptr):
                    continue
                mm = mmap.mmap(-1, log_size)
                view = (ctypes.c_char * log_size).from_buffer(mm)
                buffers[prog.name] = (mm, view)
                _check(f"bpf_program__set_log_buf({prog.name})",
                       lib.bpf_program__set_log_buf(prog._ptr, ctypes.addressof(view), log_size))
            ret = lib.bpf_object__load(self._obj())
            if ret < 0:
                logs = {name: _read_log(mm) for name, (mm, _) in buffers.items()}
                raise _load_error(self.path.name, -ret, logs, log.take(), log_size)
        finally:
            for prog in self.programs():  # libbpf must not keep pointers into buffers freed here
                if prog.name in buffers:
                    lib.bpf_program__set_log_buf(prog._ptr, None, 0)
            for name in list(buffers):
                mm, view = buffers.pop(name)
                del view  # the last reference to the exported buffer, or mmap.close() refuses
                mm.close()
        self.loaded = True

    def close(self) -> None:
        """Free the object, its maps and programs (attached links keep their program alive)."""
        if self._ptr:
            libbpf().bpf_object__close(self._ptr)
            self._ptr = None

    def __enter__(self) -> BpfObject:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _tail(log: str, lines: int = 60) -> str:
    return "\n".join(log.splitlines()[-lines:])


def _read_log(mm: mmap.mmap) -> str:
    end = mm.find(b"\0")
    return mm[: end if end >= 0 else len(mm)].decode(errors="replace")


_LIBBPF_FAILED = re.compile(r"prog '([^']+)': (?:BPF program load failed|failed to load)")


def _load_error(obj_name: str, err: int, logs: dict[str, str], libbpf_log: str, log_size: int) -> BpfLoadError:
    """BpfLoadError for a failed bpf_object__load: which program, and what the verifier said."""
    failed = [name for name, text in logs.items() if text.strip()]
    m = _LIBBPF_FAILED.search(libbpf_log)
    program = failed[0] if failed else (m.group(1) if m else None)
    vlog = logs.get(program, "") if program else ""
    truncated = err == errno.ENOSPC and bool(vlog)
    msg = f"bpf_object__load({obj_name}): {os.strerror(err)}"
    if err == errno.EPERM:
        msg += " (needs root or CAP_BPF + CAP_NET_ADMIN + CAP_PERFMON)"
    path = None
    if vlog:
        path = Path(tempfile.gettempdir()) / f"flowship-verifier-{program}.log"
        try:
            path.write_text(vlog)
        except OSError:
            path = None
        c = verifier_complaint(vlog)
        msg += f"\nthe kernel's verifier refused program {program!r}"
        if c.insn:
            msg += f" at instruction {c.insn}"
        if c.source:
            msg += f"\n  source: {c.source}"
        msg += "\n  " + "\n  ".join(c.message or ["(no message: see the whole log)"])
        if truncated:
            msg += f"\n  (the log did not fit in {log_size} bytes: what is shown may not be the end)"
        if path:
            msg += f"\n  whole verifier log: {path}"
    else:
        if program:
            msg += f"\nprogram {program!r} could not be loaded"
        lines = [ln for ln in libbpf_log.splitlines() if ln.strip()]
        if lines:
            msg += "\nlibbpf said:\n  " + "\n  ".join(lines[-15:])
    return BpfLoadError(err, msg, program, vlog, truncated, path)


@dataclass
class VerifierComplaint:
    """The part of a verifier log that says why: failing instruction, its source line, the message."""

    insn: str | None
    source: str | None
    message: list[str]


_INSN = re.compile(r"^(\d+): \([0-9a-f]{2}\) (.*?)(?:\s+; .*)?$")
_LOG_FOOTER = re.compile(
    r"^(processed \d+ insns|verification time|stack depth|max_states_per_insn|"
    r"-- END PROG LOAD LOG --|libbpf: )"
)


def verifier_complaint(log: str, max_message_lines: int = 6) -> VerifierComplaint:
    """Extract the complaint from a verifier log.

    The verifier stops at the first instruction it cannot prove safe and prints its reason right
    after that instruction, followed by a statistics footer. So: drop the footer, take the lines
    after the last instruction as the message, that instruction as the culprit (insn number and
    text, without the register-state comment), and the last "; source" line before it.
    """
    lines = [ln.rstrip() for ln in log.splitlines()]
    while lines and (not lines[-1].strip() or _LOG_FOOTER.match(lines[-1])):
        lines.pop()
    last_insn = None
    for i in range(len(lines) - 1, -1, -1):
        if _INSN.match(lines[i]):
            last_insn = i
            break
    if last_insn is None:
        return VerifierComplaint(None, None, [ln for ln in lines if ln.strip()][-max_message_lines:])
    m = _INSN.match(lines[last_insn])
    assert m is not None
    insn = f"{m.group(1)} ({m.group(2).strip()})"
    source = None
    for j in range(last_insn - 1, -1, -1):
        if lines[j].startswith("; "):
            source = lines[j][2:].strip()
            break
    message = [ln for ln in lines[last_insn + 1:] if ln.strip()][:max_message_lines]
    return VerifierComplaint(insn, source, message)


def load_object(
    path: str | os.PathLike[str],
    configure: Callable[[BpfObject], None],
    log_size: int = VERIFIER_LOG_SIZE,
) -> BpfObject:
    """Open, configure (maps, .rodata, autoload) and load an object.

    When the verifier log did not fit (ENOSPC), libbpf cannot load the same object again, so it is
    reopened and reconfigured with a buffer four times larger, up to VERIFIER_LOG_MAX.
    """
    while True:
        obj = BpfObject(path)
        try:
            configure(obj)
            obj.load(log_size)
            return obj
        except BpfLoadError as exc:
            obj.close()
            if exc.truncated and log_size < VERIFIER_LOG_MAX:
                log_size *= 4
                continue
            raise
        except BaseException:
            obj.close()
            raise


# ---- attach primitives (used by attach.py) ----


def link_create(prog_fd: int, target_fd: int, attach_type: int) -> int:
    """bpf_link_create without options (tcx: target_fd is the ifindex); returns the link fd."""
    return _check("bpf_link_create", libbpf().bpf_link_create(prog_fd, target_fd, attach_type, None))


def tc_hook_create(ifindex: int) -> bool:
    """Create the clsact qdisc; False when one already existed (then it is not ours to remove)."""
    hook = _TcHook(sz=ctypes.sizeof(_TcHook), ifindex=ifindex, attach_point=BPF_TC_INGRESS | BPF_TC_EGRESS)
    ret = libbpf().bpf_tc_hook_create(ctypes.byref(hook))
    if ret == -errno.EEXIST:
        return False
    _check(f"bpf_tc_hook_create(ifindex {ifindex})", ret)
    return True


def tc_hook_destroy(ifindex: int) -> None:
    """Remove the clsact qdisc (with every filter on it): only for qdiscs we created."""
    hook = _TcHook(sz=ctypes.sizeof(_TcHook), ifindex=ifindex, attach_point=BPF_TC_INGRESS | BPF_TC_EGRESS)
    ret = libbpf().bpf_tc_hook_destroy(ctypes.byref(hook))
    if ret < 0 and ret not in (-errno.ENOENT, -errno.ENODEV, -errno.EINVAL):
        _check(f"bpf_tc_hook_destroy(ifindex {ifindex})", ret)


def tc_attach(ifindex: int, point: int, prog_fd: int) -> tuple[int, int]:
    """Add a direct-action filter; returns (handle, priority) for tc_detach."""
    hook = _TcHook(sz=ctypes.sizeof(_TcHook), ifindex=ifindex, attach_point=point)
    opts = _TcOpts(sz=ctypes.sizeof(_TcOpts), prog_fd=prog_fd)
    _check(f"bpf_tc_attach(ifindex {ifindex})", libbpf().bpf_tc_attach(ctypes.byref(hook), ctypes.byref(opts)))
    return int(opts.handle), int(opts.priority)


def tc_detach(ifindex: int, point: int, handle: int, priority: int) -> None:
    """Remove exactly the filter tc_attach added; a vanished device is not an error."""
    hook = _TcHook(sz=ctypes.sizeof(_TcHook), ifindex=ifindex, attach_point=point)
    opts = _TcOpts(sz=ctypes.sizeof(_TcOpts), handle=handle, priority=priority)
    ret = libbpf().bpf_tc_detach(ctypes.byref(hook), ctypes.byref(opts))
    if ret < 0 and ret not in (-errno.ENOENT, -errno.ENODEV, -errno.EINVAL):
        _check(f"bpf_tc_detach(ifindex {ifindex})", ret)


def prog_id(fd: int) -> int:
    """Kernel id of a loaded program (what `bpftool prog/link show` print)."""
    info = (ctypes.c_uint32 * 2)()  # struct bpf_prog_info starts with type, id
    size = ctypes.c_uint32(ctypes.sizeof(info))
    _check("bpf_obj_get_info_by_fd", libbpf().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)))
    return int(info[1])


def prog_query(target: int, attach_type: int, max_progs: int = 64) -> list[int]:
    """Ids of programs attached at a hook (tcx: target is the ifindex, in the caller's netns)."""
    ids = (ctypes.c_uint32 * max_progs)()
    count = ctypes.c_uint32(max_progs)
    flags = ctypes.c_uint32(0)
    ret = libbpf().bpf_prog_query(target, attach_type, 0, ctypes.byref(flags), ids, ctypes.byref(count))
    _check(f"bpf_prog_query(type {attach_type})", ret)
    return list(ids[: count.value])


def num_possible_cpus() -> int:
    """CPUs a per-CPU map holds values for."""
    return _check("libbpf_num_possible_cpus", libbpf().libbpf_num_possible_cpus())


def probe_map_type(map_type: int) -> bool:
    """Whether the kernel supports a map type."""
    return libbpf().libbpf_probe_bpf_map_type(map_type, None) == 1


def probe_prog_type(prog_type: int) -> bool:
    """Whether the kernel supports a program type."""
    return libbpf().libbpf_probe_bpf_prog_type(prog_type, None) == 1


def probe_helper(prog_type: int, helper_id: int) -> bool:
    """Whether programs of this type may call a helper (loads a tiny program that calls it)."""
    return libbpf().libbpf_probe_bpf_helper(prog_type, helper_id, None) == 1
