"""The Hubble FlowFilter compiler: allow/deny filter lists evaluated on flow batches.

Filters are written like Hubble's ``flow.FlowFilter`` JSON (the same field
names, the same meaning), so an allow/deny list that works with
``hubble observe`` or Hubble's exporter works here unchanged:

* inside one filter every field that is set must match (AND);
* the entries of one field's list are alternatives (OR);
* filters of one list are alternatives (OR);
* a flow passes when (``allow`` is empty or any allow filter matches) and no
  deny filter matches — GetFlows' whitelist/blacklist rule.

:func:`compile_filter_set` turns the lists (plain dicts from YAML/JSON or
``flow_pb2.FlowFilter`` messages) into a callable that evaluates a whole
flow batch with Arrow kernels and numpy masks; Python only runs once per
distinct value (a pod name, a label set, a node name). Regular expressions
(``dns_query``, ``http_path``, ``http_url``) run in Arrow's RE2 engine, the
engine Hubble itself uses, so their syntax and meaning match Hubble's.
The ``filter`` stage, the ``sample`` stage's ``always_keep`` and the Observer
server's GetFlows whitelist/blacklist all use this compiler.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from flowship.model.columns import distinct_map, list_any, not_null, to_mask, uint_values, url_path
from flowship.model.schema import TCP_FLAG_BITS
from flowship.proto.flow import flow_pb2

Predicate = Callable[[pa.RecordBatch], np.ndarray]


class FilterError(ValueError):
    """Problems in a filter list; each entry reads ``key.path: message``."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


# ------------------------------------------------------------------------------------------
# enums and small parsers
# ------------------------------------------------------------------------------------------

def _enum_names(enum: Any) -> dict[Any, str]:
    """name → name and number → name for a protobuf enum."""
    table: dict[Any, str] = {}
    for value in enum.DESCRIPTOR.values:
        table[value.name] = value.name
        table[value.number] = value.name
    return table


_VERDICTS = _enum_names(flow_pb2.Verdict)
_DROP_REASONS = _enum_names(flow_pb2.DropReason)
_DIRECTIONS = _enum_names(flow_pb2.TrafficDirection)
_DROP_REASON_CODES = {v.name: v.number for v in flow_pb2.DropReason.DESCRIPTOR.values}
# ip_version column holds 4 or 6 (null when no IP layer)
_IP_VERSIONS: dict[Any, int | None] = {"IPv4": 4, "IPv6": 6, "IP_NOT_USED": None, 1: 4, 2: 6, 0: None}
# Cilium monitor message types, for event_type filters written with names
_EVENT_TYPE_NAMES = {"drop": 1, "debug": 2, "capture": 3, "trace": 4, "policy-verdict": 5,
                     "recorder": 6, "trace-sock": 7, "l7": 129, "agent": 130}
_L4_PROTOCOLS = {"tcp": ["TCP"], "udp": ["UDP"], "sctp": ["SCTP"], "icmpv4": ["ICMPv4"],
                 "icmpv6": ["ICMPv6"], "icmp": ["ICMPv4", "ICMPv6"], "vrrp": ["VRRP"], "igmp": ["IGMP"]}
_L7_PROTOCOLS = ("http", "dns", "kafka")
_PORTED = pa.array(["TCP", "UDP", "SCTP"])

_HTTP_CODE_FULL = re.compile(r"^[1-5][0-9]{2}$")
_HTTP_CODE_PREFIX = re.compile(r"^[1-5][0-9]?\+$")

# Kubernetes label selector pieces (the subset Hubble accepts through k8s.io/apimachinery)
_KEY = r"[A-Za-z0-9](?:[-A-Za-z0-9_./:]*[A-Za-z0-9])?"
_VALUE = r"(?:[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?)?"
_REQ_EXISTS = re.compile(rf"^(!?)\s*({_KEY})$")
_REQ_EQUAL = re.compile(rf"^({_KEY})\s*(==|=|!=)\s*({_VALUE})$")
_REQ_SET = re.compile(rf"^({_KEY})\s+(in|notin)\s*\(([^()]*)\)$")
_VALUE_RE = re.compile(rf"^{_VALUE}$")

# Hubble's FQDN pattern language (patterns.go): '*' is [-.0-9a-z]*, everything else literal.
_FQDN_ANY = r"(?:[-0-9_a-z]+(?:\.[-0-9_a-z]+)*)"
_DEFAULT_CLUSTER = "default"


def _as_list(value: Any) -> list:
    """Hubble JSON fields are lists; a single value written without brackets is accepted too."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def _column(batch: pa.RecordBatch, name: str) -> pa.Array:
    return batch.column(name)


def _is_in(batch: pa.RecordBatch, name: str, values: list, type_: pa.DataType | None = None) -> np.ndarray:
    value_set = pa.array(values, type=type_ or batch.schema.field(name).type)
    return to_mask(pc.is_in(_column(batch, name), value_set=value_set))


def _check_regex(pattern: Any, path: str, problems: list[str]) -> str | None:
    """Validate a regex with the engine that will run it (RE2 in Arrow)."""
    if not isinstance(pattern, str):
        problems.append(f"{path}: expected a regular expression string, got {pattern!r}")
        return None
    try:
        pc.match_substring_regex(pa.array([""]), pattern=pattern)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        problems.append(f"{path}: invalid regular expression {pattern!r}: {exc}")
        return None
    return pattern


def _regex_any(column: pa.Array, patterns: list[str]) -> np.ndarray:
    """Rows whose (non-null) value contains a match of any pattern (Go's MatchString)."""
    combined = "|".join(f"(?:{p})" for p in patterns)
    return to_mask(pc.match_substring_regex(column, pattern=combined))


def _strings(values: list, path: str, problems: list[str]) -> list[str]:
    out = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (str, int)):
            problems.append(f"{path}[{i}]: expected a string, got {v!r}")
            continue
        out.append(str(v))
    return out


def _parse_each(values: list, path: str, problems: list[str], parse: Callable[[str], Any],
                what: str = "") -> list:
    """``parse`` of each string value; a ValueError becomes a problem at that value's key path."""
    out = []
    for i, v in enumerate(_strings(values, path, problems)):
        try:
            out.append(parse(v))
        except ValueError as exc:
            problems.append(f"{path}[{i}]: invalid {what} {v!r}: {exc}" if what else f"{path}[{i}]: {exc}")
    return out


def _enum_values(values: list, table: Mapping[Any, Any], what: str, path: str,
                 problems: list[str]) -> list:
    out = []
    for i, v in enumerate(values):
        key = v.upper() if isinstance(v, str) and v.upper() in table and v not in table else v
        if isinstance(v, bool) or key not in table:
            names = ", ".join(sorted({str(n) for n in table if isinstance(n, str)}))
            problems.append(f"{path}[{i}]: unknown {what} {v!r} (one of: {names})")
            continue
        out.append(table[key])
    return out


def _uints(values: list, path: str, problems: list[str], limit: int = 2**32 - 1) -> list[int]:
    out = []
    for i, v in enumerate(values):
        try:
            if isinstance(v, bool):
                raise ValueError
            number = int(v, 10) if isinstance(v, str) else int(v)
            if not 0 <= number <= limit or (isinstance(v, float) and v != number):
                raise ValueError
        except (TypeError, ValueError):
            problems.append(f"{path}[{i}]: expected an integer 0..{limit}, got {v!r}")
            continue
        out.append(number)
    return out


def _mappings(values: list, allowed: set[str], path: str, problems: list[str]) -> list[dict]:
    out = []
    for i, v in enumerate(values):
        if not isinstance(v, Mapping):
            problems.append(f"{path}[{i}]: expected a mapping with keys {', '.join(sorted(allowed))}, got {v!r}")
            continue
        bad = [k for k in v if k not in allowed]
        for k in bad:
            problems.append(f"{path}[{i}].{k}: unknown key (known keys here: {', '.join(sorted(allowed))})")
        if not bad:
            out.append(dict(v))
    return out


# ------------------------------------------------------------------------------------------
# one builder per FlowFilter field: (values, key path, problems) -> Predicate | None
# ------------------------------------------------------------------------------------------

def _build_uuid(values: list, path: str, problems: list[str]) -> Predicate | None:
    uuids = _strings(values, path, problems)
    return lambda batch: _is_in(batch, "uuid", uuids)


def _build_ip(column: str) -> Callable[[list, str, list[str]], Predicate | None]:
    def build(values: list, path: str, problems: list[str]) -> Predicate | None:
        exact: list[str] = []
        networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for i, v in enumerate(_strings(values, path, problems)):
            try:
                if "/" in v:
                    networks.append(ipaddress.ip_network(v, strict=False))
                else:
                    ipaddress.ip_address(v)
                    exact.append(v)
            except ValueError:
                kind = "CIDR" if "/" in v else "IP address"
                problems.append(f"{path}[{i}]: invalid {kind} {v!r}")

        def contained(value: str) -> bool:
            try:
                address = ipaddress.ip_address(value)
            except ValueError:
                return False
            return any(address.version == net.version and address in net for net in networks)

        def predicate(batch: pa.RecordBatch) -> np.ndarray:
            col = _column(batch, column)
            mask = _is_in(batch, column, exact) if exact else np.zeros(len(col), dtype=bool)
            if networks:
                mask |= distinct_map(col, contained)
            return mask

        return predicate

    return build


def _parse_namespaced(values: list, path: str, problems: list[str]) -> list[tuple[str, str]]:
    """Hubble's ``[namespace/][name-prefix]``; a bare name means namespace "default"."""
    out = []
    for i, v in enumerate(_strings(values, path, problems)):
        parts = v.split("/")
        if len(parts) > 1:
            ns, prefix = parts[0], parts[1]
        elif parts[0] == "":
            ns, prefix = "", ""
        else:
            ns, prefix = "default", parts[0]
        if ns == "" and prefix == "":
            problems.append(f"{path}[{i}]: invalid filter, must be [namespace/][<name>], got {v!r}")
            continue
        out.append((ns, prefix))
    return out


def _build_namespaced(ns_column: str, name_column: str) -> Callable[[list, str, list[str]], Predicate | None]:
    def build(values: list, path: str, problems: list[str]) -> Predicate | None:
        entries = _parse_namespaced(values, path, problems)

        def predicate(batch: pa.RecordBatch) -> np.ndarray:
            ns = _column(batch, ns_column).fill_null("")
            name = _column(batch, name_column).fill_null("")
            mask = np.zeros(batch.num_rows, dtype=bool)
            for f_ns, prefix in entries:
                hit = to_mask(pc.equal(ns, f_ns))
                if prefix:
                    hit &= to_mask(pc.starts_with(name, prefix))
                mask |= hit
            # an endpoint with neither namespace nor name matches nothing
            mask &= ~(to_mask(pc.equal(ns, "")) & to_mask(pc.equal(name, "")))
            return mask

        return predicate

    return build


def fqdn_pattern_regex(pattern: str) -> str:
    """One Hubble FQDN pattern as a regex fragment; raises ValueError on bad patterns."""
    pattern = pattern.strip()
    if pattern.endswith("."):
        pattern = pattern[:-1]
    pattern = pattern.lower()
    if pattern == "":
        raise ValueError("empty pattern")
    if pattern.endswith("."):
        raise ValueError("multiple trailing dots in pattern")
    out = []
    for ch in pattern:
        if ch == ".":
            out.append(r"\.")
        elif ch == "*":
            out.append("[-.0-9a-z]*")
        elif ch == "-" or ch == "_" or "0" <= ch <= "9" or "a" <= ch <= "z":
            out.append(ch)
        else:
            raise ValueError(f"{ch!r}: invalid rune in pattern")
    return "".join(out)


def _build_fqdn(column: str) -> Callable[[list, str, list[str]], Predicate | None]:
    def build(values: list, path: str, problems: list[str]) -> Predicate | None:
        fragments = _parse_each(values, path, problems, fqdn_pattern_regex, "FQDN pattern")
        regex = r"\A(?:" + "|".join(fragments) + r")\z"
        return lambda batch: list_any(_column(batch, column),
                                      lambda names: to_mask(pc.match_substring_regex(names, pattern=regex)))

    return build


def _build_node_name(values: list, path: str, problems: list[str]) -> Predicate | None:
    fragments = []
    for i, v in enumerate(_strings(values, path, problems)):
        if v == "":
            problems.append(f"{path}[{i}]: empty pattern")
            continue
        parts = v.split("/")
        if len(parts) > 2:
            problems.append(f"{path}[{i}]: too many slashes in pattern {v!r}")
            continue
        cluster, node = (parts if len(parts) == 2 else ["", parts[0]])
        try:
            c = fqdn_pattern_regex(cluster) if cluster else _FQDN_ANY
            n = fqdn_pattern_regex(node) if node else _FQDN_ANY
        except ValueError as exc:
            problems.append(f"{path}[{i}]: invalid node name pattern {v!r}: {exc}")
            continue
        fragments.append(f"{c}/{n}")
    regex = re.compile(r"\A(?:" + "|".join(fragments) + r")\Z")

    def matches(name: str) -> bool:
        if name == "":
            return False
        if "/" not in name:
            name = f"{_DEFAULT_CLUSTER}/{name}"
        return regex.match(name) is not None

    return lambda batch: distinct_map(_column(batch, "node_name"), matches)


# --- labels -------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Requirement:
    source: str  # "any" matches every label source
    key: str
    op: str  # exists, !exists, in, notin
    values: frozenset[str] = frozenset()


def _split_top_level(selector: str) -> list[str]:
    parts, depth, current = [], 0, []
    for ch in selector:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def _split_key(key: str) -> tuple[str, str]:
    if ":" in key:
        source, name = key.split(":", 1)
        if ":" in name or not source or not name:
            raise ValueError(f"invalid label key {key!r}: use source:key with one colon")
        return source, name
    return "any", key


def parse_label_selector(selector: str) -> list[_Requirement]:
    """A Kubernetes label selector with Cilium source prefixes (``k8s:app=x``) → requirements.

    An empty selector selects everything; a key without a source prefix
    matches labels of any source, as in Hubble.
    """
    if selector.strip() == "":
        return []
    requirements = []
    for raw in _split_top_level(selector):
        text = raw.strip()
        if m := _REQ_SET.match(text):
            source, key = _split_key(m.group(1))
            items = [x.strip() for x in m.group(3).split(",")] if m.group(3).strip() else []
            for item in items:
                if not _VALUE_RE.match(item):
                    raise ValueError(f"invalid label value {item!r} in {text!r}")
            requirements.append(_Requirement(source, key, m.group(2), frozenset(items)))
        elif m := _REQ_EQUAL.match(text):
            source, key = _split_key(m.group(1))
            op = "notin" if m.group(2) == "!=" else "in"
            requirements.append(_Requirement(source, key, op, frozenset([m.group(3)])))
        elif m := _REQ_EXISTS.match(text):
            source, key = _split_key(m.group(2))
            requirements.append(_Requirement(source, key, "!exists" if m.group(1) else "exists"))
        else:
            raise ValueError(f"invalid label selector {text!r} in {selector!r}")
    return requirements


def parse_label(label: str) -> tuple[str, str, str]:
    """Cilium's ``source:key=value`` label string → (source, key, value)."""
    colon = label.find(":")
    equal = label.find("=")
    if colon >= 0 and (equal < 0 or colon < equal):
        source, rest = label[:colon], label[colon + 1:]
    else:
        source, rest = "unspec", label
    key, _, value = rest.partition("=")
    return source, key, value


def _label_matcher(selectors: list[list[_Requirement]]) -> Callable[[pa.Array], np.ndarray]:
    """Build a row mask over a list<string> label column for OR-ed selectors."""

    def evaluate(column: pa.Array) -> np.ndarray:
        n = len(column)
        values = pc.list_flatten(column)
        parents = pc.list_parent_indices(column).to_numpy(zero_copy_only=False)
        if len(values):
            encoded = pc.dictionary_encode(values)
            distinct = [parse_label(s) for s in encoded.dictionary.to_pylist()]
            idx = encoded.indices.fill_null(0).to_numpy(zero_copy_only=False)
        else:
            distinct, idx = [], np.zeros(0, dtype=np.int64)
        cache: dict[tuple, np.ndarray] = {}

        def rows_with(source: str, key: str, allowed: frozenset[str] | None) -> np.ndarray:
            ck = (source, key, allowed)
            if ck not in cache:
                table = np.array([(source == "any" or s == source) and k == key
                                  and (allowed is None or v in allowed) for s, k, v in distinct] + [False])
                hits = table[idx] if len(idx) else np.zeros(0, dtype=bool)
                cache[ck] = np.bincount(parents[hits], minlength=n) > 0 if len(idx) else np.zeros(n, dtype=bool)
            return cache[ck]

        result = np.zeros(n, dtype=bool)
        for requirements in selectors:
            mask = np.ones(n, dtype=bool)
            for req in requirements:
                if req.op == "exists":
                    mask &= rows_with(req.source, req.key, None)
                elif req.op == "!exists":
                    mask &= ~rows_with(req.source, req.key, None)
                elif req.op == "in":
                    mask &= rows_with(req.source, req.key, req.values)
                else:  # notin, !=: key absent, or no label with the key has one of the values
                    mask &= ~rows_with(req.source, req.key, req.values)
            result |= mask
        return result

    return evaluate


def _build_label(column: str) -> Callable[[list, str, list[str]], Predicate | None]:
    def build(values: list, path: str, problems: list[str]) -> Predicate | None:
        selectors = _parse_each(values, path, problems, parse_label_selector)
        evaluate = _label_matcher(selectors)
        return lambda batch: evaluate(_column(batch, column))

    return build


# --- the rest -----------------------------------------------------------------------------

def _entries_mask(present: np.ndarray, entries: list[dict], columns: dict[str, pa.Array]) -> np.ndarray:
    """Rows where ``present`` and, for any entry, every set (non-empty) sub-field equals its column."""
    mask = np.zeros(len(present), dtype=bool)
    for entry in entries:
        hit = present.copy()
        for key, column in columns.items():
            if entry.get(key):
                hit &= to_mask(pc.equal(column, entry[key]))
        mask |= hit
    return mask


def _build_workload(prefix: str) -> Callable[[list, str, list[str]], Predicate | None]:
    def build(values: list, path: str, problems: list[str]) -> Predicate | None:
        entries = _mappings(values, {"name", "kind"}, path, problems)

        def predicate(batch: pa.RecordBatch) -> np.ndarray:
            name = _column(batch, f"{prefix}_workload")
            kind = _column(batch, f"{prefix}_workload_kind")
            return _entries_mask(not_null(name), entries, {"name": name, "kind": kind})

        return predicate

    return build


def _build_enum_column(column: str, table: Mapping[Any, str], what: str) -> Callable[..., Predicate | None]:
    def build(values: list, path: str, problems: list[str]) -> Predicate | None:
        names = _enum_values(values, table, what, path, problems)
        return lambda batch: _is_in(batch, column, names)

    return build


def _build_drop_reason(values: list, path: str, problems: list[str]) -> Predicate | None:
    names = _enum_values(values, _DROP_REASONS, "drop reason", path, problems)
    codes = [_DROP_REASON_CODES[n] for n in names]
    return lambda batch: _is_in(batch, "drop_reason", names) | _is_in(batch, "drop_reason_code", codes)


def _build_interface(values: list, path: str, problems: list[str]) -> Predicate | None:
    entries = _mappings(values, {"index", "name"}, path, problems)
    for i, e in enumerate(entries):
        if "index" in e:
            e["index"] = (_uints([e["index"]], f"{path}[{i}].index", problems) or [0])[0]

    def predicate(batch: pa.RecordBatch) -> np.ndarray:
        index = _column(batch, "interface_index")
        name = _column(batch, "interface_name")
        return _entries_mask(not_null(index) | not_null(name), entries, {"index": index, "name": name})

    return predicate


def _build_event_type(values: list, path: str, problems: list[str]) -> Predicate | None:
    entries = _mappings(values, {"type", "match_sub_type", "sub_type"}, path, problems)
    parsed = []
    for i, e in enumerate(entries):
        t = e.get("type", 0)
        if isinstance(t, str) and t in _EVENT_TYPE_NAMES:
            t = _EVENT_TYPE_NAMES[t]
        t_ok = _uints([t], f"{path}[{i}].type", problems, limit=2**31 - 1)
        s_ok = _uints([e.get("sub_type", 0)], f"{path}[{i}].sub_type", problems, limit=2**31 - 1)
        if t_ok and s_ok:
            parsed.append((t_ok[0], bool(e.get("match_sub_type")), s_ok[0]))

    def predicate(batch: pa.RecordBatch) -> np.ndarray:
        present = not_null(_column(batch, "event_type"))
        etype = uint_values(_column(batch, "event_type"))
        subtype = uint_values(_column(batch, "event_subtype"))
        mask = np.zeros(batch.num_rows, dtype=bool)
        for t, match_sub, s in parsed:
            hit = present & (etype == t)
            if match_sub:
                hit &= subtype == s
            mask |= hit
        return mask

    return predicate


def _build_http_status(values: list, path: str, problems: list[str]) -> Predicate | None:
    ranges = []
    for i, v in enumerate(_strings(values, path, problems)):
        if _HTTP_CODE_FULL.match(v):
            ranges.append((int(v), int(v)))
        elif _HTTP_CODE_PREFIX.match(v):
            digits = v[:-1]
            scale = 10 ** (3 - len(digits))
            ranges.append((int(digits) * scale, int(digits) * scale + scale - 1))
        else:
            problems.append(f"{path}[{i}]: invalid status code prefix {v!r} (like \"200\", \"5+\" or \"40+\")")

    def predicate(batch: pa.RecordBatch) -> np.ndarray:
        code = uint_values(_column(batch, "http_code"))
        mask = np.zeros(batch.num_rows, dtype=bool)
        for lo, hi in ranges:
            mask |= (code >= lo) & (code <= hi)
        return mask & (code != 0)

    return predicate


def _has_http(batch: pa.RecordBatch) -> np.ndarray:
    return (not_null(_column(batch, "http_method")) | not_null(_column(batch, "http_url"))
            | not_null(_column(batch, "http_code")) | not_null(_column(batch, "http_protocol")))


def _build_protocol(values: list, path: str, problems: list[str]) -> Predicate | None:
    l4: list[str] = []
    l7: list[str] = []
    for i, v in enumerate(_strings(values, path, problems)):
        p = v.lower()
        if p in _L4_PROTOCOLS:
            l4.extend(_L4_PROTOCOLS[p])
        elif p in _L7_PROTOCOLS:
            l7.append(p)
        else:
            known = ", ".join(sorted([*_L4_PROTOCOLS, *_L7_PROTOCOLS]))
            problems.append(f"{path}[{i}]: unknown protocol {v!r} (one of: {known})")

    def predicate(batch: pa.RecordBatch) -> np.ndarray:
        mask = _is_in(batch, "l4_protocol", l4) if l4 else np.zeros(batch.num_rows, dtype=bool)
        if "http" in l7:
            mask |= _has_http(batch)
        if "dns" in l7:
            mask |= not_null(_column(batch, "dns_query")) | not_null(_column(batch, "dns_rcode"))
        # kafka: flows carry no Kafka columns, so nothing matches
        return mask

    return predicate


def _build_port(column: str) -> Callable[[list, str, list[str]], Predicate | None]:
    def build(values: list, path: str, problems: list[str]) -> Predicate | None:
        ports = _uints(values, path, problems, limit=65535)

        def predicate(batch: pa.RecordBatch) -> np.ndarray:
            ported = to_mask(pc.is_in(_column(batch, "l4_protocol"), value_set=_PORTED))
            return ported & _is_in(batch, column, ports)

        return predicate

    return build


def _build_reply(values: list, path: str, problems: list[str]) -> Predicate | None:
    wanted = set()
    for i, v in enumerate(values):
        if not isinstance(v, bool):
            problems.append(f"{path}[{i}]: expected true or false, got {v!r}")
        else:
            wanted.add(v)

    def predicate(batch: pa.RecordBatch) -> np.ndarray:
        is_reply = _column(batch, "is_reply")
        known = not_null(is_reply)
        dropped = to_mask(pc.equal(_column(batch, "verdict"), "DROPPED"))
        reply = to_mask(is_reply)
        # Hubble treats an unknown is_reply as false for dropped flows only.
        usable = known | dropped
        mask = np.zeros(batch.num_rows, dtype=bool)
        if True in wanted:
            mask |= reply
        if False in wanted:
            mask |= ~reply
        return mask & usable

    return predicate


def _build_regex(column: str, on_path: bool = False) -> Callable[[list, str, list[str]], Predicate | None]:
    def build(values: list, path: str, problems: list[str]) -> Predicate | None:
        patterns = [p for i, v in enumerate(values) if (p := _check_regex(v, f"{path}[{i}]", problems)) is not None]

        def predicate(batch: pa.RecordBatch) -> np.ndarray:
            col = _column(batch, column)
            if on_path:
                present = to_mask(pc.not_equal(col, ""))
                return present & _regex_any(url_path(col), patterns)
            if column == "http_url":
                return to_mask(pc.not_equal(col, "")) & _regex_any(col, patterns)
            return _regex_any(col, patterns)

        return predicate

    return build


def _build_identity(column: str) -> Callable[[list, str, list[str]], Predicate | None]:
    def build(values: list, path: str, problems: list[str]) -> Predicate | None:
        ids = _uints(values, path, problems)
        return lambda batch: _is_in(batch, column, ids)

    return build


def _build_http_method(values: list, path: str, problems: list[str]) -> Predicate | None:
    methods = [m.upper() for m in _strings(values, path, problems)]
    return lambda batch: to_mask(pc.is_in(pc.utf8_upper(_column(batch, "http_method")),
                                          value_set=pa.array(methods, pa.string())))


def _build_http_header(values: list, path: str, problems: list[str]) -> Predicate | None:
    entries = _mappings(values, {"key", "value"}, path, problems)

    def element_mask(headers: pa.Array) -> np.ndarray:
        keys = pc.struct_field(headers, "key")
        vals = pc.struct_field(headers, "value")
        mask = np.zeros(len(headers), dtype=bool)
        for e in entries:
            mask |= to_mask(pc.equal(keys, str(e.get("key", "")))) & to_mask(pc.equal(vals, str(e.get("value", ""))))
        return mask

    return lambda batch: list_any(_column(batch, "http_headers"), element_mask)


def _build_tcp_flags(values: list, path: str, problems: list[str]) -> Predicate | None:
    masks = []
    for i, v in enumerate(values):
        if isinstance(v, str):
            names = [x.strip().upper() for x in v.split(",") if x.strip()]
        elif isinstance(v, Mapping):
            names = [str(k).upper() for k, on in v.items() if on]
            for k, on in v.items():
                if not isinstance(on, bool):
                    problems.append(f"{path}[{i}].{k}: expected true or false, got {on!r}")
        else:
            problems.append(f"{path}[{i}]: expected a TCPFlags mapping like {{SYN: true}} or \"SYN,ACK\", got {v!r}")
            continue
        bits = 0
        for name in names:
            if name not in TCP_FLAG_BITS:
                problems.append(f"{path}[{i}]: unknown TCP flag {name!r} (one of: {', '.join(TCP_FLAG_BITS)})")
            else:
                bits |= TCP_FLAG_BITS[name]
        masks.append(bits)

    def predicate(batch: pa.RecordBatch) -> np.ndarray:
        col = _column(batch, "tcp_flags")
        present = not_null(col)
        flags = uint_values(col)
        mask = np.zeros(batch.num_rows, dtype=bool)
        for bits in masks:
            mask |= (flags & bits) == bits
        return mask & present

    return predicate


def _build_ip_version(values: list, path: str, problems: list[str]) -> Predicate | None:
    versions = _enum_values(values, _IP_VERSIONS, "IP version", path, problems)

    def predicate(batch: pa.RecordBatch) -> np.ndarray:
        col = _column(batch, "ip_version")
        mask = _is_in(batch, "ip_version", [v for v in versions if v is not None])
        if None in versions:
            mask |= ~not_null(col) | to_mask(pc.equal(col, 0))
        return mask

    return predicate


def _build_trace_id(values: list, path: str, problems: list[str]) -> Predicate | None:
    _strings(values, path, problems)
    # Flows carry no trace context column: like Hubble with untraced flows, nothing matches.
    return lambda batch: np.zeros(batch.num_rows, dtype=bool)


def _build_rcode_nonzero(values: list, path: str, problems: list[str]) -> Predicate | None:
    if len(values) != 1 or not isinstance(values[0], bool):
        problems.append(f"{path}: expected true or false, got {values!r}")
        return None
    want = values[0]

    def predicate(batch: pa.RecordBatch) -> np.ndarray:
        col = _column(batch, "dns_rcode")
        nonzero = to_mask(pc.not_equal(col, 0))
        return nonzero if want else not_null(col) & ~nonzero

    return predicate


_BUILDERS: dict[str, Callable[[list, str, list[str]], Predicate | None]] = {
    "uuid": _build_uuid,
    "source_ip": _build_ip("ip_src"),
    "destination_ip": _build_ip("ip_dst"),
    "source_pod": _build_namespaced("src_namespace", "src_pod"),
    "destination_pod": _build_namespaced("dst_namespace", "dst_pod"),
    "source_service": _build_namespaced("src_service_namespace", "src_service"),
    "destination_service": _build_namespaced("dst_service_namespace", "dst_service"),
    "source_fqdn": _build_fqdn("src_names"),
    "destination_fqdn": _build_fqdn("dst_names"),
    "source_label": _build_label("src_labels"),
    "destination_label": _build_label("dst_labels"),
    "source_workload": _build_workload("src"),
    "destination_workload": _build_workload("dst"),
    "traffic_direction": _build_enum_column("traffic_direction", _DIRECTIONS, "traffic direction"),
    "verdict": _build_enum_column("verdict", _VERDICTS, "verdict"),
    "drop_reason_desc": _build_drop_reason,
    "interface": _build_interface,
    "event_type": _build_event_type,
    "http_status_code": _build_http_status,
    "protocol": _build_protocol,
    "source_port": _build_port("src_port"),
    "destination_port": _build_port("dst_port"),
    "reply": _build_reply,
    "dns_query": _build_regex("dns_query"),
    "source_identity": _build_identity("src_identity"),
    "destination_identity": _build_identity("dst_identity"),
    "http_method": _build_http_method,
    "http_path": _build_regex("http_url", on_path=True),
    "http_url": _build_regex("http_url"),
    "http_header": _build_http_header,
    "tcp_flags": _build_tcp_flags,
    "node_name": _build_node_name,
    "ip_version": _build_ip_version,
    "trace_id": _build_trace_id,
    # flowship extension (not a Hubble field): DNS answers with an error rcode
    "dns_rcode_nonzero": _build_rcode_nonzero,
}

FILTER_FIELDS: tuple[str, ...] = tuple(_BUILDERS)
_HTTP_FIELDS = frozenset({"http_status_code", "http_method", "http_path", "http_url", "http_header"})
_L7_EVENT_TYPE = _EVENT_TYPE_NAMES["l7"]
_JSON_NAMES = {f.json_name: f.name for f in flow_pb2.FlowFilter.DESCRIPTOR.fields}
_JSON_NAMES["dnsRcodeNonzero"] = "dns_rcode_nonzero"


# ------------------------------------------------------------------------------------------
# compiling filters and filter lists
# ------------------------------------------------------------------------------------------

def _as_mapping(spec: Any) -> Any:
    if isinstance(spec, flow_pb2.FlowFilter):
        from google.protobuf.json_format import MessageToDict

        return MessageToDict(spec, preserving_proto_field_name=True)
    return spec


def _compile_one(spec: Any, path: str, problems: list[str]) -> Predicate:
    spec = _as_mapping(spec)
    if not isinstance(spec, Mapping):
        problems.append(f"{path}: expected a filter mapping like {{verdict: [DROPPED]}}, got {spec!r}")
        return lambda batch: np.zeros(batch.num_rows, dtype=bool)
    parts: list[Predicate] = []
    http_keys = [k for k in spec if _JSON_NAMES.get(k, k) in _HTTP_FIELDS and _as_list(spec[k])]
    event_types = _as_list(spec.get("event_type", spec.get("eventType")))
    if http_keys and event_types and not any(
            isinstance(e, Mapping) and e.get("type") in (_L7_EVENT_TYPE, "l7") for e in event_types):
        problems.append(f"{path}.{http_keys[0]}: filtering by HTTP fields requires the event_type filter "
                        "to match L7 events (type 129)")
    for key, raw in spec.items():
        name = _JSON_NAMES.get(key, key)
        sub = f"{path}.{key}" if path else str(key)
        builder = _BUILDERS.get(name)
        if builder is None:
            problems.append(f"{sub}: unknown filter field (known fields: {', '.join(FILTER_FIELDS)})")
            continue
        values = _as_list(raw)
        if not values:
            continue  # an empty list is an unset field, as in protobuf
        predicate = builder(values, sub, problems)
        if predicate is not None:
            parts.append(predicate)

    def matches(batch: pa.RecordBatch) -> np.ndarray:
        mask = np.ones(batch.num_rows, dtype=bool)
        for part in parts:
            mask &= part(batch)
            if not mask.any():
                break
        return mask

    return matches


def compile_flow_filter(spec: Mapping[str, Any] | flow_pb2.FlowFilter, path: str = "") -> Predicate:
    """One FlowFilter → a function giving the numpy mask of the rows it matches."""
    problems: list[str] = []
    predicate = _compile_one(spec, path, problems)
    if problems:
        raise FilterError(problems)
    return predicate


@dataclass
class FilterSet:
    """Compiled allow and deny lists; call it with a batch to get the rows that pass."""

    allow: list[Predicate] = field(default_factory=list)
    deny: list[Predicate] = field(default_factory=list)

    def evaluate(self, batch: pa.RecordBatch) -> tuple[np.ndarray, np.ndarray]:
        """(allowed, denied) masks: allowed by the allow list, and hit by the deny list."""
        n = batch.num_rows
        if self.allow:
            allowed = np.zeros(n, dtype=bool)
            for predicate in self.allow:
                allowed |= predicate(batch)
        else:
            allowed = np.ones(n, dtype=bool)
        denied = np.zeros(n, dtype=bool)
        for predicate in self.deny:
            denied |= predicate(batch)
        return allowed, denied

    def mask(self, batch: pa.RecordBatch) -> np.ndarray:
        allowed, denied = self.evaluate(batch)
        return allowed & ~denied

    def __call__(self, batch: pa.RecordBatch) -> pa.BooleanArray:
        return pa.array(self.mask(batch), type=pa.bool_())


def compile_filter_set(allow: Iterable[Any] | None, deny: Iterable[Any] | None = None, path: str = "") -> FilterSet:
    """Compile Hubble-style allow (whitelist) and deny (blacklist) filter lists.

    Entries are dicts written like Hubble's FlowFilter JSON or
    ``flow_pb2.FlowFilter`` messages. Raises :class:`FilterError` listing every
    problem with its key path (``allow[0].verdict[1]: unknown verdict ...``).
    """
    problems: list[str] = []
    prefix = f"{path}." if path else ""
    allow_fns = [_compile_one(spec, f"{prefix}allow[{i}]", problems) for i, spec in enumerate(allow or [])]
    deny_fns = [_compile_one(spec, f"{prefix}deny[{i}]", problems) for i, spec in enumerate(deny or [])]
    if problems:
        raise FilterError(problems)
    return FilterSet(allow_fns, deny_fns)


def compile_filter_list(filters: Iterable[Any] | None, path: str) -> Callable[[pa.RecordBatch], np.ndarray]:
    """OR of a list of filters (no deny side): used by stages that take filter lists."""
    problems: list[str] = []
    fns = [_compile_one(spec, f"{path}[{i}]", problems) for i, spec in enumerate(filters or [])]
    if problems:
        raise FilterError(problems)

    def matches(batch: pa.RecordBatch) -> np.ndarray:
        mask = np.zeros(batch.num_rows, dtype=bool)
        for fn in fns:
            mask |= fn(batch)
        return mask

    return matches


def filter_problems(compile_fn: Callable[[], Any]) -> list[str]:
    """Run a compile step and return its problems as config validation messages."""
    try:
        compile_fn()
    except FilterError as exc:
        return exc.problems
    return []
