"""Client settings for this proxy: what ``claude-proxy env TARGET`` prints (pure).

Each target renders the text a client reads (Claude Code's ``settings.json``, Codex's
``config.toml``, shell ``export`` lines) from the config, a base URL and a key, and
:func:`merge_settings` merges an ``env`` object into an existing ``settings.json`` text.
Nothing here reads or writes files.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping
from typing import Any, Literal
from urllib.parse import urlsplit

from .config import Config

Target = Literal["claude-code", "claude-code-foundry", "codex", "shell"]
TARGETS: tuple[Target, ...] = ("claude-code", "claude-code-foundry", "codex", "shell")
PLACEHOLDER = "<your proxy key>"
FOUNDRY_SUFFIXES = (".services.ai.azure.com", ".openai.azure.com", ".cognitiveservices.azure.com")
CODEX_PROVIDER = "claude-proxy"
# Settings that would make Claude Code ignore what a target writes.
OVERRIDDEN: dict[Target, tuple[str, ...]] = {
    "claude-code": ("CLAUDE_CODE_USE_FOUNDRY",),  # Foundry mode ignores ANTHROPIC_BASE_URL
    "claude-code-foundry": ("CLAUDE_CODE_SKIP_FOUNDRY_AUTH",),  # would send no key at all
}


class SettingsError(ValueError):
    """An existing settings file that cannot be merged into safely."""


def is_foundry(upstream_url: str) -> bool:
    """Whether the upstream is a Foundry resource root, under which clients add ``/anthropic``
    or ``/openai`` themselves (a path prefix in ``upstream_url`` already chose one)."""
    parts = urlsplit(upstream_url)
    host = (parts.hostname or "").lower()
    return host.endswith(FOUNDRY_SUFFIXES) and parts.path.strip("/") == ""


def base_url(config: Config, override: str | None = None) -> str:
    """The proxy's URL as a client on this machine reaches it; ``override`` (``--url``) wins.

    A wildcard bind address becomes loopback; with ``tls.mode = "manual"`` the HTTPS listener
    is given. Raises ValueError when the port is chosen at start (0).
    """
    if override:
        return override.rstrip("/")
    host = {"0.0.0.0": "127.0.0.1", "::": "localhost"}.get(config.bind_address)
    host = host or config.bind_address
    if ":" in host:
        host = f"[{host}]"
    tls = config.tls.mode == "manual"
    port = config.tls.https_port if tls else config.port
    if port == 0:
        raise ValueError("the port is 0 (chosen at start); give the proxy's URL with --url")
    return f"{'https' if tls else 'http'}://{host}:{port}"


def anthropic_base(config: Config, base: str) -> str:
    return base + "/anthropic" if is_foundry(config.first_url) else base


def openai_base(config: Config, base: str) -> str:
    return base + ("/openai/v1" if is_foundry(config.first_url) else "/v1")


def claude_code_env(config: Config, base: str, key: str, *, foundry_mode: bool) -> dict[str, str]:
    """The ``env`` object of Claude Code's ``settings.json`` for this proxy."""
    url = anthropic_base(config, base)
    if foundry_mode:
        return {
            "CLAUDE_CODE_USE_FOUNDRY": "1",
            "ANTHROPIC_FOUNDRY_BASE_URL": url,
            "ANTHROPIC_FOUNDRY_API_KEY": key,
        }
    return {"ANTHROPIC_BASE_URL": url, "ANTHROPIC_AUTH_TOKEN": key}


def _toml_string(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def codex_toml(config: Config, base: str, key: str) -> str:
    """A ``~/.codex/config.toml`` provider block (root keys first, as TOML requires)."""
    return (
        f"# Codex through claude-proxy at {base}: merge into ~/.codex/config.toml\n"
        f"model_provider = {_toml_string(CODEX_PROVIDER)}\n"
        '# model = "<your deployment name>"\n'
        "\n"
        f"[model_providers.{CODEX_PROVIDER}]\n"
        f'name = "claude-proxy"\n'
        f"base_url = {_toml_string(openai_base(config, base))}\n"
        'wire_api = "responses"\n'
        f"experimental_bearer_token = {_toml_string(key)}\n"
        '# or, to keep the key out of the file: env_key = "CLAUDE_PROXY_KEY", the key in that\n'
        "# variable, and the line above removed\n"
    )


def shell_exports(config: Config, base: str, key: str) -> str:
    """``export`` lines for the Anthropic and OpenAI SDKs."""
    values = {
        "ANTHROPIC_BASE_URL": anthropic_base(config, base),
        "ANTHROPIC_API_KEY": key,
        "OPENAI_BASE_URL": openai_base(config, base),
        "OPENAI_API_KEY": key,
    }
    return "".join(f"export {name}={shlex.quote(value)}\n" for name, value in values.items())


def render(target: Target, config: Config, base: str, key: str = PLACEHOLDER) -> str:
    """What ``claude-proxy env TARGET`` prints."""
    if target == "codex":
        return codex_toml(config, base, key)
    if target == "shell":
        return shell_exports(config, base, key)
    env = claude_code_env(config, base, key, foundry_mode=target == "claude-code-foundry")
    return json.dumps({"env": env}, indent=2) + "\n"


def merge_settings(
    existing: str | None, env: Mapping[str, str], remove: tuple[str, ...] = ()
) -> tuple[str, list[str]]:
    """``existing`` settings.json text with ``env`` merged into its ``env`` object.

    Every other key, in ``env`` and outside it, is kept; the names in ``remove`` are dropped
    from ``env``. Returns the new text and the names removed. Raises :class:`SettingsError`
    when ``existing`` is not a JSON object (or its ``env`` is not one): never overwrite what
    cannot be read back.
    """
    data: Any = {}
    if existing is not None and existing.strip():
        try:
            data = json.loads(existing)
        except json.JSONDecodeError as exc:
            raise SettingsError(f"not valid JSON ({exc}); fix or move it first") from None
    if not isinstance(data, dict):
        raise SettingsError("not a JSON object; fix or move it first")
    current = data.setdefault("env", {})
    if not isinstance(current, dict):
        raise SettingsError('its "env" is not a JSON object; fix or move it first')
    removed = [name for name in remove if name in current]
    for name in removed:
        del current[name]
    current.update(env)
    return json.dumps(data, indent=2) + "\n", removed
