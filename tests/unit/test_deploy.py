"""The container and Kubernetes files: valid offline, and in agreement with the config."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from claude_proxy.config import parse

ROOT = Path(__file__).parents[2]
K8S = ROOT / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.30.0"


def documents() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out.append((path.name, doc))
    return out


@pytest.mark.parametrize(("name", "doc"), documents(), ids=[n for n, _ in documents()])
def test_manifest_is_valid(name: str, doc: dict[str, Any]) -> None:
    if doc["kind"] == "Kustomization":
        listed = {r for r in doc["resources"]}
        assert listed == {p.name for p in K8S.glob("*.yaml")} - {
            "kustomization.yaml",
            "secret.example.yaml",
        }
        return
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def by_kind(kind: str) -> dict[str, Any]:
    (doc,) = [d for _, d in documents() if d["kind"] == kind]
    return doc


def shipped_config() -> Any:
    text = by_kind("ConfigMap")["data"]["config.toml"]
    import tomllib

    from claude_proxy.config import _expand_tree

    secret_keys = by_kind("Secret")["stringData"]
    raw = _expand_tree(tomllib.loads(text), secret_keys, "")
    return parse(raw)


def test_probes_and_ports_agree_with_config() -> None:
    config = shipped_config()
    deployment = by_kind("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == config.port
    assert ports["admin"] == config.admin.port
    assert config.bind_address == "0.0.0.0" and config.admin.bind_address == "0.0.0.0"
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    pre_stop = float(
        re.search(
            r"sleep\((\d+)\)", " ".join(container["lifecycle"]["preStop"]["exec"]["command"])
        ).group(1)
    )  # type: ignore[union-attr]
    assert pod["terminationGracePeriodSeconds"] > config.shutdown_timeout + pre_stop
    # workload identity: the pod label and the service account annotation
    assert (
        deployment["spec"]["template"]["metadata"]["labels"]["azure.workload.identity/use"]
        == "true"
    )
    account = by_kind("ServiceAccount")
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    assert "azure.workload.identity/client-id" in account["metadata"]["annotations"]
    assert config.upstream_auth.type == "azure_workload_identity"
    # every ${VAR} the config uses comes from the Secret
    env_from = container["envFrom"][0]["secretRef"]["name"]
    assert env_from == by_kind("Secret")["metadata"]["name"]
    service = by_kind("Service")
    assert {p["targetPort"] for p in service["spec"]["ports"]} == {"http", "admin"}


def test_dockerfile_agrees() -> None:
    text = (ROOT / "Dockerfile").read_text()
    config = shipped_config()
    assert f"127.0.0.1:{config.admin.port}/healthz" in text
    assert re.search(rf"EXPOSE {config.port} {config.admin.port}", text)
    assert "USER 10001" in text and 'ENTRYPOINT ["claude-proxy"]' in text
    assert "CLAUDE_PROXY_CONFIG_FILE=/etc/claude-proxy/config.toml" in text
