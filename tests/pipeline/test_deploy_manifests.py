"""The deployment manifests parse, and the flowship configs inside them validate."""

from __future__ import annotations

from pathlib import Path

import yaml

from exporter.config import load_text

REPO = Path(__file__).resolve().parents[2]


def test_manifests_parse_and_embedded_configs_validate():
    seen = []
    for path in sorted((REPO / "deploy" / "kubernetes").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc and doc.get("kind") and doc.get("apiVersion"), f"{path.name}: not a Kubernetes object"
            if doc["kind"] == "ConfigMap" and "flowship.yaml" in doc["data"]:
                config = load_text(doc["data"]["flowship.yaml"], f"{path.name}:{doc['metadata']['name']}")
                seen.append((config.sources[0].type, [s.type for s in config.sinks]))
            if doc["kind"] == "DaemonSet":
                caps = doc["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]
                assert caps["drop"] == ["ALL"] and "BPF" in caps["add"]
    assert ("agent", ["kafka"]) in seen
    assert ("kafka", ["parquet", "elasticsearch", "loki"]) in seen
