"""Every registered source, stage and sink meets the same bar; the list comes from ``flowship.registry``.

For each ``type:`` in the registry:

- docs: ``docs/config.md`` has a section naming it (under Sources, Stages or Sinks), directly or
  through the page it links to, and that text names every field of its config dataclass;
- guarantees: ``docs/guarantees.md`` has a row for it in the table of its kind;
- config errors: a wrong-typed value on any of its options is a ConfigError naming the key path
  (``sinks[0].max_file_age: ...``);
- sinks: a local sink (no ``url:``/``brokers:``) runs for real through the pipeline and, at the end of
  the input and after a stop, has acknowledged every row and holds every flow; a network sink is
  driven by a test module under ``tests/sinks`` that uses the real server;
- stages: each runs through the pipeline and releases every receipt; the flows it removes are counted;
- credentials: every option holding a credential is set by a config of
  ``tests/security/test_secrets_never_leak.py``.

A new component fails here until it has all of these.
"""

from __future__ import annotations

import ast
import dataclasses
import io
import json
import re
import sys
import threading
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from config_options import nested_dataclass, option_paths

from flowship import registry
from flowship.components import Context, Source
from flowship.config import ConfigError, load_text
from flowship.metrics import Metrics
from flowship.model.hubble_decode import decode_lines
from flowship.pipeline.envelope import Receipt
from flowship.pipeline.runtime import Pipeline
from flowship.secrets import Secret

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
KINDS = {"sources": "Sources", "stages": "Stages", "sinks": "Sinks"}
COMPONENTS = [(kind, name) for kind in KINDS for name in registry.names(kind)]
SINKS = registry.names("sinks")
FILENAME = "compliance.yaml"


def component_id(value: Any) -> str:
    return "-".join(value) if isinstance(value, tuple) else str(value)


def test_the_registry_is_read_whole():
    assert {"file", "stdin", "hubble", "kafka"} <= set(registry.names("sources"))
    assert {"filter", "healthcheck", "sample", "aggregate", "redact"} <= set(registry.names("stages"))
    assert {"parquet", "file", "stdout", "loki", "elasticsearch", "kafka"} <= set(SINKS)


def fields_of(kind: str, name: str) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(registry.config_class(kind, name)) if f.init]


def option_types(cls: type) -> list[tuple[str, Any]]:
    """(dotted option path, type) of a config dataclass and of the dataclasses nested in it."""
    return option_paths(cls, max_depth=3)


# -- docs ---------------------------------------------------------------------------------------

@dataclasses.dataclass
class Heading:
    level: int
    title: str
    own: str  # text up to the next heading of any level
    body: str  # text up to the next heading of the same or a higher level, subsections included
    start: int  # line numbers of the heading and of the end of ``body``
    end: int


def headings(text: str) -> list[Heading]:
    lines = text.splitlines()
    marks: list[tuple[int, int, str]] = []
    fenced = False
    for i, line in enumerate(lines):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"(#+)\s+(.*)", line)):
            marks.append((i, len(m.group(1)), m.group(2).strip()))
    out = []
    for j, (i, level, title) in enumerate(marks):
        next_any = marks[j + 1][0] if j + 1 < len(marks) else len(lines)
        next_same = next((k for k, lv, _ in marks[j + 1:] if lv <= level), len(lines))
        out.append(Heading(level, title, "\n".join(lines[i:next_any]), "\n".join(lines[i:next_same]), i, next_same))
    return out


def slug(title: str) -> str:
    """The anchor GitHub gives a heading."""
    return re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", title.lower()))


def names_in(title: str) -> list[str]:
    """The component names a heading is about: its `quoted` words (`type: agent` counts), else its first word."""
    quoted = re.findall(r"`(?:type:\s*)?([^`]+?):?`", title)
    return quoted or title.split()[:1]


def about(name: str, candidates: list[Heading]) -> Heading | None:
    """The heading about ``name``: one that is only its name (or its name — a description) first."""
    exact = [h for h in candidates if re.fullmatch(rf"`?{re.escape(name)}`?(\s+—.*)?", h.title)]
    return (exact or [h for h in candidates if name in names_in(h.title)] or [None])[0]


def doc_text(kind: str, name: str) -> str:
    """config.md's section about ``kind``/``name`` and the sections of other pages it links to for it."""
    config = headings((DOCS / "config.md").read_text())
    top = next(h for h in config if h.level == 2 and h.title == KINDS[kind])
    subsections = [h for h in config if h.level == 3 and top.start < h.start < top.end]
    own = about(name, subsections)
    if own is not None:
        text = own.body
    else:
        text = top.own
        assert f"`{name}`" in text, f"docs/config.md: the {KINDS[kind]} section does not name `{name}`"
    linked = []
    for page, anchor in re.findall(r"\]\(([\w.-]+\.md)(?:#([\w-]+))?\)", text):
        if page == "config.md":
            continue
        found = headings((DOCS / page).read_text())
        target = (next((h for h in found if slug(h.title) == anchor), None) if anchor
                  else about(name, found))
        if target is not None:
            linked.append(target.body)
    return "\n".join([text, *linked])


def named(option: str, text: str) -> bool:
    """``option`` is named as `option` (a table row, prose) or as a key of a YAML example."""
    quoted = rf"`{re.escape(option)}[`:\s=(\[]"
    yaml_key = rf"^\s*(- )?{re.escape(option)}:(\s|$)"
    return re.search(quoted, text) is not None or re.search(yaml_key, text, re.MULTILINE) is not None


@pytest.mark.parametrize(("kind", "name"), COMPONENTS, ids=component_id)
def test_documented_with_every_field(kind, name):
    text = doc_text(kind, name)
    missing = [f.name for f in fields_of(kind, name) if not named(f.name, text)]
    assert missing == [], (f"{kind} {name}: fields missing from its section in docs/config.md "
                           "(or the section of the page it links to)")


@pytest.mark.parametrize(("kind", "name"), COMPONENTS, ids=component_id)
def test_nested_options_are_documented(kind, name):
    """Options of nested sections (``batch.max_bytes``, ``observer.tls.key_file``) are named in docs/."""
    text = "\n".join(p.read_text() for p in DOCS.glob("*.md"))
    nested = [path for path, _ in option_types(registry.config_class(kind, name)) if "." in path]
    missing = [path for path in nested if not named(path.rsplit(".", 1)[1], text)]
    assert missing == [], f"{kind} {name}: nested options no page of docs/ names"


@pytest.mark.parametrize(("kind", "name"), COMPONENTS, ids=component_id)
def test_listed_in_guarantees(kind, name):
    guarantees = headings((DOCS / "guarantees.md").read_text())
    section = next((h for h in guarantees if h.level == 2 and h.title == KINDS[kind]), None)
    assert section is not None, f"docs/guarantees.md has no '## {KINDS[kind]}' section"
    rows = [line for line in section.body.splitlines() if line.startswith(f"| `{name}`")]
    assert rows, f"docs/guarantees.md: no row for {kind} `{name}` in '## {KINDS[kind]}'"


# -- config errors --------------------------------------------------------------------------------

def admits_mapping(tp: Any) -> bool:
    if tp is Any or nested_dataclass(tp) is not None:
        return True
    union = typing.get_origin(tp) in (typing.Union, types.UnionType)
    return any(a is Any or typing.get_origin(a) is dict or a is dict
               for a in (typing.get_args(tp) if union else (tp,)))


def wrong_value(tp: Any) -> Any:
    """A value no option of this type accepts: a list where a mapping is expected, else a mapping."""
    return [1, 2] if admits_mapping(tp) else {"zz": 1}


def document(kind: str, name: str, option: str, value: Any) -> dict:
    entry: dict[str, Any] = {"type": name}
    node = entry
    *parents, leaf = option.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    doc: dict[str, Any] = {"sources": [{"type": "stdin"}], "sinks": [{"type": "stdout"}]}
    doc[kind] = [entry]
    return doc


CONFIG_TARGETS = [(kind, name, option, tp) for kind, name in COMPONENTS
                  for option, tp in option_types(registry.config_class(kind, name))]


@pytest.mark.parametrize(("kind", "name", "option", "tp"), CONFIG_TARGETS,
                         ids=[f"{k}-{n}-{o}" for k, n, o, _ in CONFIG_TARGETS])
def test_a_wrong_type_names_the_key_path(kind, name, option, tp):
    doc = document(kind, name, option, wrong_value(tp))
    with pytest.raises(ConfigError) as caught:
        load_text(yaml.safe_dump(doc), FILENAME)
    assert f"{FILENAME}: {kind}[0].{option}: " in str(caught.value), str(caught.value)


# -- sinks: acknowledgements and the flush at the end ------------------------------------------------

def needs_server(name: str) -> bool:
    return any(f.name in ("url", "brokers") for f in fields_of("sinks", name))


LOCAL_SINKS = [n for n in SINKS if not needs_server(n)]
NETWORK_SINKS = [n for n in SINKS if needs_server(n)]


def parquet_uuids(out: Path, stdout: io.BytesIO) -> list[str]:
    files = sorted(p for p in (out / "parquet").rglob("*.parquet") if not p.name.startswith("."))
    return [u for p in files for u in pq.read_table(p, columns=["uuid"]).column("uuid").to_pylist()]


def file_uuids(out: Path, stdout: io.BytesIO) -> list[str]:
    return decode_lines((out / "flows.jsonl").read_bytes()).batch.column("uuid").to_pylist()


def stdout_uuids(out: Path, stdout: io.BytesIO) -> list[str]:
    return decode_lines(stdout.getvalue()).batch.column("uuid").to_pylist()


# How to configure each local sink into ``out`` and read back what it holds after the run.
LOCAL: dict[str, tuple[dict[str, Any], Callable[[Path, io.BytesIO], list[str]]]] = {
    "parquet": ({"path": "{out}/parquet"}, parquet_uuids),
    "file": ({"path": "{out}/flows.jsonl"}, file_uuids),
    "stdout": ({}, stdout_uuids),
}


class BatchesSource(Source):
    """Emits the given batches with a receipt each; then returns, or waits for the stop when ``follow``."""

    def __init__(self, batches: list[pa.RecordBatch], follow: bool, ctx: Any) -> None:
        super().__init__(None, ctx)
        self.batches, self.follow = batches, follow
        self.receipts: list[Receipt] = []
        self.emitted = threading.Event()

    def run(self, emit: Any, stop: threading.Event) -> None:
        for batch in self.batches:
            receipt = Receipt(rows=batch.num_rows)
            self.receipts.append(receipt)
            emit(batch, receipt)
        self.emitted.set()
        if self.follow:
            stop.wait()


def test_every_sink_is_local_or_served():
    assert set(LOCAL) == set(LOCAL_SINKS), (
        "every sink without url:/brokers: needs an entry in LOCAL (its config and how to read it back)")
    assert NETWORK_SINKS, "the registry has network sinks"


ENDINGS = ["end of input", "stop"]


def fixture_flows(fixture_lines: list[bytes]) -> pa.RecordBatch:
    flows = decode_lines(b"\n".join(fixture_lines)).batch
    assert flows.num_rows > 100
    return flows


@dataclasses.dataclass
class Run:
    summary: Any
    source: BatchesSource
    batches: int
    stdout: io.BytesIO


def run_pipeline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flows: pa.RecordBatch, sink: dict,
                 stages: list[dict], ending: str) -> Run:
    """``flows`` in 7 batches through ``stages`` into ``sink``; the run ends with its input or with a stop."""
    step = max(1, flows.num_rows // 7)
    batches = [flows.slice(i, step) for i in range(0, flows.num_rows, step)]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    config = load_text(yaml.safe_dump({"data_dir": str(tmp_path / "state"), "shutdown_timeout": "30s",
                                       "sources": [{"type": "file", "paths": [str(empty)]}],
                                       "stages": stages, "sinks": [sink]}), FILENAME)
    stdout = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(stdout))
    metrics = Metrics()
    source = BatchesSource(batches, ending == "stop", Context("batches", metrics, "test-node", tmp_path / "state"))
    pipeline = Pipeline(config, metrics, sources=[source])

    def stop_when_emitted(p: Pipeline) -> None:
        if ending == "stop":
            threading.Thread(target=lambda: (source.emitted.wait(60), p.stop()), daemon=True).start()

    summary = pipeline.run(stop_when_emitted)
    sys.stdout.flush()
    return Run(summary, source, len(batches), stdout)


def assert_every_batch_acknowledged(run: Run) -> None:
    assert run.summary.exit_code == 0, run.summary
    assert len(run.source.receipts) == run.batches
    assert all(r.done and not r.failed for r in run.source.receipts), "a batch was not acknowledged"


@pytest.mark.parametrize("ending", ENDINGS)
@pytest.mark.parametrize("name", LOCAL_SINKS)
def test_local_sink_acknowledges_every_row_and_holds_it_after_the_run(tmp_path, monkeypatch, fixture_lines, name,
                                                                     ending):
    flows = fixture_flows(fixture_lines)
    options, read_back = LOCAL[name]
    sink = {"type": name, **{k: v.format(out=tmp_path) for k, v in options.items()}}
    run = run_pipeline(tmp_path, monkeypatch, flows, sink, [], ending)
    assert_every_batch_acknowledged(run)
    assert run.summary.sinks[name] == flows.num_rows
    assert sorted(read_back(tmp_path, run.stdout)) == sorted(flows.column("uuid").to_pylist())


# Options a stage cannot do without, or that make it remove flows from the fixtures; the rest are defaults.
STAGE_OPTIONS: dict[str, dict[str, Any]] = {
    "redact": {"fields": ["ip"]},
    "filter": {"deny": [{"verdict": ["DROPPED"]}]},
}


@pytest.mark.parametrize("ending", ENDINGS)
@pytest.mark.parametrize("name", registry.names("stages"))
def test_stage_releases_every_receipt_and_counts_what_it_removes(tmp_path, monkeypatch, fixture_lines, name,
                                                                 ending):
    """Rows a stage removes on purpose count as delivered; what it holds (aggregate windows) goes out at the end."""
    flows = fixture_flows(fixture_lines)
    stage = {"type": name, **STAGE_OPTIONS.get(name, {})}
    run = run_pipeline(tmp_path, monkeypatch, flows, {"type": "file", "path": str(tmp_path / "out.jsonl")},
                       [stage], ending)
    assert_every_batch_acknowledged(run)
    written = (tmp_path / "out.jsonl").read_bytes().splitlines()
    assert run.summary.sinks["file"] == len(written) > 0
    if name == "aggregate":
        rows = [json.loads(line) for line in written]
        assert sum(r["flows"] for r in rows) == flows.num_rows
        return
    dropped = sum(v for k, v in run.summary.dropped.items() if k.split("/")[0] in (name, f"{name}[0]"))
    rows = flows.num_rows
    assert len(written) + dropped == rows, run.summary.dropped


def real_server_modules() -> dict[str, str]:
    """Test modules under tests/sinks that use a real server (a dev-server fixture), by file name."""
    fixtures = ("kafka_server", "opensearch_server", "victorialogs_server", "devservers.", "mark.servers")
    out = {}
    for path in sorted((REPO / "tests" / "sinks").glob("test_*.py")):
        text = path.read_text()
        if any(f in text for f in fixtures):
            out[path.name] = text
    return out


@pytest.mark.parametrize("name", NETWORK_SINKS)
def test_network_sink_has_a_real_server_test(name):
    modules = real_server_modules()
    users = [m for m, text in modules.items()
             if re.search(rf"""["']?type["']?\s*[:=]\s*["']?{re.escape(name)}\b""", text)
             or re.search(rf"\bflowship\.sinks\.{re.escape(name)}\b", text)]
    assert users, (f"sink {name}: no module under tests/sinks drives it against a real server "
                   f"(modules using one: {sorted(modules)})")


# -- credentials -------------------------------------------------------------------------------------

LEAK_TEST = REPO / "tests" / "security" / "test_secrets_never_leak.py"
CREDENTIAL = re.compile(r"password|passphrase|token|secret|api_key|key_file|key_env|key_location")
# Credential options no config of the leak test sets yet: each needs a component of its kind in that
# test's run (see docs/guarantees.md, "Not shown by any test yet"). Remove a line once it is covered.
NOT_YET_IN_THE_LEAK_TEST = {
    ("sources", "hubble", "key_file"),
    ("sources", "kafka", "ssl_key_location"),
    ("sources", "kafka", "ssl_key_password"),
    ("sources", "agent", "observer.tls.key_file"),
    ("stages", "redact", "key_file"),
}


def holds_credential(option: str, tp: Any) -> bool:
    args = typing.get_args(tp) or (tp,)
    if tp is Secret or Secret in args:
        return True
    texty = tp is str or str in args
    return texty and CREDENTIAL.search(option.rsplit(".", 1)[-1]) is not None


def credential_options() -> set[tuple[str, str, str]]:
    return {(kind, name, option) for kind, name in COMPONENTS
            for option, tp in option_types(registry.config_class(kind, name)) if holds_credential(option, tp)}


def leak_test_configs() -> list[dict]:
    """The YAML documents the leak test writes: its string and f-string literals holding a config."""
    tree = ast.parse(LEAK_TEST.read_text())
    docs = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            text = "".join(v.value if isinstance(v, ast.Constant) else "PLACEHOLDER" for v in node.values)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value
        else:
            continue
        if "sinks:" not in text and "sources:" not in text:
            continue
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError:
            continue
        if isinstance(data, dict):
            docs.append(data)
    return docs


def set_options(entry: dict, prefix: str = "") -> set[str]:
    out = set()
    for key, value in entry.items():
        out.add(f"{prefix}{key}")
        if isinstance(value, dict):
            out |= set_options(value, f"{prefix}{key}.")
    return out


def test_credential_options_are_found():
    found = credential_options()
    assert {("sinks", "loki", "password"), ("sinks", "loki", "bearer_token"), ("sinks", "elasticsearch", "api_key"),
            ("sinks", "kafka", "sasl_password"), ("sources", "kafka", "sasl_password")} <= found, found
    assert ("sinks", "kafka", "key") not in found  # the message key is no credential


def test_every_credential_option_is_in_the_leak_test():
    covered = set()
    configs = leak_test_configs()
    assert len(configs) >= 3, "the leak test's configs were not found"
    for doc in configs:
        for kind in KINDS:
            for entry in doc.get(kind) or []:
                if isinstance(entry, dict) and "type" in entry:
                    covered |= {(kind, entry["type"], option) for option in set_options(entry)}
    missing = credential_options() - covered
    assert missing - NOT_YET_IN_THE_LEAK_TEST == set(), (
        "credential options no config of tests/security/test_secrets_never_leak.py sets")
    assert NOT_YET_IN_THE_LEAK_TEST - missing == set(), "covered now: remove them from NOT_YET_IN_THE_LEAK_TEST"
