"""The container and Kubernetes files: valid offline, and in agreement with the config."""

from __future__ import annotations

import dataclasses
import fnmatch
import re
import tomllib
from pathlib import Path
from typing import Any

import dockerfile
import kubernetes_validate
import pytest
import yaml

from claude_proxy.config import Config, load_config, parse

ROOT = Path(__file__).parents[2]
K8S = ROOT / "deploy" / "kubernetes"
DOCKER = ROOT / "deploy" / "docker"
KUBERNETES_VERSION = "1.30.0"
# In the directory but not in kustomization.yaml, each for a reason its header gives.
NOT_LISTED = {"kustomization.yaml", "secret.example.yaml", "ingress.yaml", "servicemonitor.yaml"}
LONG_STREAM = 600.0  # seconds: Claude Code and Codex streams this long are normal


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
        listed = set(doc["resources"])
        assert listed == {p.name for p in K8S.glob("*.yaml")} - NOT_LISTED
        return
    if doc["kind"] == "ServiceMonitor":
        pytest.skip("a CRD: its shape is checked by test_service_monitor_scrapes_the_admin_port")
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def by_kind(kind: str, name: str | None = None) -> dict[str, Any]:
    (doc,) = [
        d
        for _, d in documents()
        if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    return doc


def container() -> dict[str, Any]:
    (c,) = by_kind("Deployment")["spec"]["template"]["spec"]["containers"]
    return c


def shipped_raw() -> dict[str, Any]:
    return tomllib.loads(by_kind("ConfigMap")["data"]["config.toml"])


def has_field(name: str) -> bool:
    return name in {f.name for f in dataclasses.fields(Config)}


def shipped_config() -> Config:
    """The ConfigMap's config, validated. ``client_api_keys_file`` is checked on its own
    (test_client_keys_come_from_a_mounted_secret_file) while config.py does not know it yet."""
    raw = shipped_raw()
    if not has_field("client_api_keys_file"):
        raw.pop("client_api_keys_file")
    return parse(raw)


def pre_stop_seconds() -> float:
    command = " ".join(container()["lifecycle"]["preStop"]["exec"]["command"])
    found = re.search(r"sleep\((\d+)\)", command)
    assert found, command
    return float(found.group(1))


def test_probes_and_ports_agree_with_config() -> None:
    config = shipped_config()
    c = container()
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["http"] == config.port
    assert ports["admin"] == config.admin.port
    assert config.bind_address == "0.0.0.0" and config.admin.bind_address == "0.0.0.0"
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    env = {e["name"]: e["value"] for e in c["env"]}
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert env["CLAUDE_PROXY_CONFIG_FILE"] == mounts["config"] + "/config.toml"


def test_grace_period_outlasts_a_long_stream() -> None:
    """SIGTERM comes after preStop; the drain then waits up to shutdown_timeout for streams;
    the kubelet's kill comes terminationGracePeriodSeconds after preStop began."""
    config = shipped_config()
    pod = by_kind("Deployment")["spec"]["template"]["spec"]
    assert config.shutdown_timeout >= LONG_STREAM
    assert config.idle_timeout >= LONG_STREAM
    margin = pod["terminationGracePeriodSeconds"] - (config.shutdown_timeout + pre_stop_seconds())
    assert 5 <= margin <= 60
    # a pod scaled away drains as long: the HPA must not flap faster than that
    hpa = by_kind("HorizontalPodAutoscaler")
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= LONG_STREAM


def test_the_hpa_alone_sets_the_replica_count() -> None:
    deployment = by_kind("Deployment")
    assert "replicas" not in deployment["spec"]
    target = by_kind("HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])


def test_workload_identity() -> None:
    deployment = by_kind("Deployment")
    pod = deployment["spec"]["template"]
    assert pod["metadata"]["labels"]["azure.workload.identity/use"] == "true"
    account = by_kind("ServiceAccount")
    assert pod["spec"]["serviceAccountName"] == account["metadata"]["name"]
    assert "azure.workload.identity/client-id" in account["metadata"]["annotations"]
    assert shipped_config().upstream_auth.type == "azure_workload_identity"


def test_client_keys_come_from_a_mounted_secret_file() -> None:
    keys_file = Path(shipped_raw()["client_api_keys_file"])
    c = container()
    pod = by_kind("Deployment")["spec"]["template"]["spec"]
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == str(keys_file.parent)]
    # a directory mount: kubelet replaces the file when the Secret changes; subPath never does
    assert "subPath" not in mount and mount["readOnly"] is True
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    secret = by_kind("Secret")
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]
    assert volume["secret"]["defaultMode"] & 0o007 == 0  # not world-readable
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsUser"]
    # the file is a list of [[client_api_keys]] entries that today's validation accepts
    entries = tomllib.loads(secret["stringData"][keys_file.name])
    assert set(entries) == {"client_api_keys"}
    raw = shipped_raw()
    raw.pop("client_api_keys_file")
    assert [k.name for k in parse({**raw, **entries}).client_api_keys] == ["team-a", "team-b"]
    assert "envFrom" not in c  # no key in the environment


def services() -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for _, d in documents() if d["kind"] == "Service"}


def test_metrics_are_not_on_the_client_facing_service() -> None:
    found = services()
    client = found["claude-proxy"]
    assert [p["targetPort"] for p in client["spec"]["ports"]] == ["http"]
    admin = [
        s for s in found.values() if any(p["targetPort"] == "admin" for p in s["spec"]["ports"])
    ]
    assert [s["metadata"]["name"] for s in admin] == ["claude-proxy-admin"]
    backend = by_kind("Ingress")["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": "claude-proxy", "port": {"name": "http"}}


def test_service_monitor_scrapes_the_admin_port() -> None:
    monitor = by_kind("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor) == {"apiVersion", "kind", "metadata", "spec"}
    selector = monitor["spec"]["selector"]["matchLabels"]
    selected = [
        s for s in services().values() if selector.items() <= s["metadata"]["labels"].items()
    ]
    assert [s["metadata"]["name"] for s in selected] == ["claude-proxy-admin"]
    (endpoint,) = monitor["spec"]["endpoints"]
    assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme"}
    assert endpoint["port"] in {p["name"] for p in selected[0]["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    for key in ("interval", "scrapeTimeout"):
        assert re.fullmatch(r"\d+(ms|s|m|h)", endpoint[key]), key


def test_network_policy_keeps_the_admin_port_to_monitoring() -> None:
    policy = by_kind("NetworkPolicy")
    pod_labels = by_kind("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    rules = policy["spec"]["ingress"]
    by_port = {p["port"]: rule for rule in rules for p in rule["ports"]}
    assert set(by_port) == {"http", "admin"}
    assert by_port["admin"]["from"], "the admin port must not be open to every pod"
    assert all("namespaceSelector" in src for src in by_port["admin"]["from"])


def test_ingress_is_tuned_for_streams() -> None:
    notes = by_kind("Ingress")["metadata"]["annotations"]
    prefix = "nginx.ingress.kubernetes.io/"
    assert notes[prefix + "proxy-buffering"] == "off"
    assert notes[prefix + "proxy-request-buffering"] == "off"
    for key in ("proxy-read-timeout", "proxy-send-timeout"):
        assert float(notes[prefix + key]) >= LONG_STREAM, key


# --------------------------------------------------------------------------- the image


def instructions() -> list[Any]:
    return list(dockerfile.parse_file(str(ROOT / "Dockerfile")))


def one(cmd: str) -> Any:
    found = [i for i in instructions() if i.cmd == cmd]
    assert found, cmd
    return found[-1]


def copies() -> dict[str, str]:
    """COPY source -> destination, for single-source COPYs."""
    out = {}
    for i in instructions():
        if i.cmd == "COPY" and len(i.value) == 2:
            out[i.value[0]] = i.value[1]
    return out


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for i in instructions():
        if i.cmd == "ENV":
            env.update(zip(i.value[::2], i.value[1::2], strict=True))
    return env


def test_dockerfile_runs_unprivileged_with_the_console_script() -> None:
    assert one("USER").value == ("10001",)
    assert one("ENTRYPOINT").json and one("ENTRYPOINT").value == ("claude-proxy",)
    assert one("FROM").value[0].startswith("python:3.1")


def test_the_image_works_from_environment_variables_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The image's own config file plus the two settings nobody can guess."""
    env = image_env()
    config_file = env["CLAUDE_PROXY_CONFIG_FILE"]
    assert copies()["deploy/docker/image-config.toml"] == config_file
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    loaded = load_config(
        env={
            "CLAUDE_PROXY_CONFIG_FILE": str(DOCKER / "image-config.toml"),
            "CLAUDE_PROXY__UPSTREAM_URL": "https://my-resource.services.ai.azure.com",
            "CLAUDE_PROXY__UPSTREAM_AUTH__TYPE": "azure_managed_identity",
        }
    )
    config = loaded.config
    assert config.bind_address == "0.0.0.0" and config.admin.bind_address == "0.0.0.0"
    assert one("EXPOSE").value == (str(config.port), str(config.admin.port))
    # and the variables override the file, as they do everywhere
    again = load_config(
        env={
            "CLAUDE_PROXY_CONFIG_FILE": str(DOCKER / "image-config.toml"),
            "CLAUDE_PROXY__UPSTREAM_URL": "https://x.example",
            "CLAUDE_PROXY__UPSTREAM_AUTH__TYPE": "azure_cli",
            "CLAUDE_PROXY__ADMIN__PORT": "9191",
        }
    )
    assert again.config.admin.port == 9191


def test_healthcheck_runs_the_script_that_reads_the_config() -> None:
    check = one("HEALTHCHECK")
    assert check.json and check.value[0] == "CMD"
    assert check.value[1:] == ("python", copies()["deploy/docker/healthcheck.py"])
    assert "load_config()" in (DOCKER / "healthcheck.py").read_text()


def dockerignore_excludes(path: str) -> bool:
    """Docker's .dockerignore rules: patterns in order, the last that matches wins; a pattern
    that matches a directory matches what is inside it; ``**`` spans directories."""

    def match(parts: list[str], pattern: list[str]) -> bool:
        if not pattern:
            return not parts
        if pattern[0] == "**":
            return any(match(parts[i:], pattern[1:]) for i in range(len(parts) + 1))
        return (
            bool(parts)
            and fnmatch.fnmatchcase(parts[0], pattern[0])
            and match(parts[1:], pattern[1:])
        )

    excluded = False
    parts = path.split("/")
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/").split("/")
        if any(match(parts[:n], pattern) for n in range(1, len(parts) + 1)):
            excluded = not negate
    return excluded


@pytest.mark.parametrize(
    ("path", "excluded"),
    [
        ("pyproject.toml", False),
        ("README.md", False),
        ("claude_proxy/server.py", False),
        ("deploy/docker/healthcheck.py", False),
        ("deploy/docker/image-config.toml", False),
        ("claude_proxy/__pycache__/server.cpython-311.pyc", True),
        (".venv/bin/python", True),
        (".git/HEAD", True),
        ("config.toml", True),  # a local config may hold secrets
        ("tests/conftest.py", True),
        ("bench/results/x.json", True),
        ("claude_proxy.egg-info/PKG-INFO", True),
        ("deploy/kubernetes/secret.example.yaml", True),
    ],
)
def test_dockerignore(path: str, excluded: bool) -> None:
    assert dockerignore_excludes(path) is excluded


def test_every_copied_file_reaches_the_build() -> None:
    for i in instructions():
        if i.cmd == "COPY":
            for source in i.value[:-1]:
                assert (ROOT / source).exists(), source
                assert not dockerignore_excludes(source), source


def test_stop_timeout_outlasts_the_drain() -> None:
    """Docker sends SIGKILL 10 s after SIGTERM unless told otherwise: --stop-timeout must cover
    shutdown_timeout, in the Dockerfile's example and the README's."""
    default = Config.__dataclass_fields__["shutdown_timeout"].default
    assert isinstance(default, float)
    for text in ((ROOT / "Dockerfile").read_text(), (ROOT / "README.md").read_text()):
        found = [int(n) for n in re.findall(r"--stop-timeout[ =](\d+)", text)]
        assert found and all(n > default for n in found), found
