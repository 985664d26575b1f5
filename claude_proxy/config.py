"""Configuration: discovery, ``${VAR}`` expansion, layering and validation.

One call, :func:`load_config`, turns a TOML file, ``CLAUDE_PROXY__*`` environment variables and CLI
overrides (in rising precedence) into frozen dataclasses, or raises :class:`ConfigError` naming the
dotted key and the fix. Nothing here logs, binds or fetches credentials.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import ipaddress
import os
import re
import tomllib
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from .errors import ConfigError

CONFIG_FILE_ENV = "CLAUDE_PROXY_CONFIG_FILE"
ENV_PREFIX = "CLAUDE_PROXY__"
DEFAULT_SCOPE = "https://ai.azure.com/.default"
SINGLE_UPSTREAM = "default"  # the name of the upstream given by upstream_url

AuthType = Literal[
    "api_key",
    "azure_ad",
    "azure_cli",
    "azure_managed_identity",
    "azure_workload_identity",
    "azure_certificate",
    "azure_default",
]
Rotation = Literal["hourly", "daily", "never"]
AccessFormat = Literal["text", "json"]
Level = Literal["trace", "debug", "info", "warn", "warning", "error"]
TlsMode = Literal["off", "manual"]
# The standard variable that names the collector when telemetry.otlp_endpoint is not set.
OTLP_ENDPOINT_ENV = "OTEL_EXPORTER_OTLP_ENDPOINT"

OnRedisError = Literal["allow", "deny"]


@dataclass(frozen=True, slots=True)
class LimitSettings:
    """What a key or a JWT policy may use; a field left unset is no limit."""

    requests_per_minute: int | None = field(default=None, kw_only=True)
    tokens_per_minute: int | None = field(default=None, kw_only=True)  # input + output
    tokens_per_day: int | None = field(default=None, kw_only=True)  # UTC day
    max_concurrent: int | None = field(default=None, kw_only=True)
    allowed_models: tuple[str, ...] | None = field(default=None, kw_only=True)  # fnmatch globs
    expires: datetime.date | None = field(default=None, kw_only=True)  # last valid day (UTC)

    def counted(self) -> bool:
        """Whether a limit needs counts kept (the others are checked from the request alone)."""
        return any(
            v is not None
            for v in (
                self.requests_per_minute,
                self.tokens_per_minute,
                self.tokens_per_day,
                self.max_concurrent,
            )
        )

    def limited(self) -> bool:
        return self.counted() or self.allowed_models is not None or self.expires is not None


@dataclass(frozen=True, slots=True)
class ClientKey(LimitSettings):
    """A named client key; the name goes to logs and metrics, the key never does.

    ``key_sha256`` (hex) may stand for ``key``, so the config holds no usable secret.
    """

    name: str
    key: str | None = field(default=None, repr=False)
    key_sha256: str | None = None


@dataclass(frozen=True, slots=True)
class JwtPolicy(LimitSettings):
    """Limits for the JWT users whose ``claim`` equals (or, for a list, contains) ``value``."""

    claim: str
    value: str
    name: str | None = None  # for logs, metrics and /usage; default "claim=value"

    @property
    def label(self) -> str:
        return self.name or f"{self.claim}={self.value}"


@dataclass(frozen=True, slots=True)
class ClientJwtConfig:
    """Bearer tokens from an OIDC issuer (Entra ID), validated locally against its JWKS."""

    issuer: str
    audience: str
    identity_claim: str = "oid"
    name_claim: str = "preferred_username"
    jwks_uri: str | None = None  # else from <issuer>/.well-known/openid-configuration
    require_policy: bool = False
    leeway: float = 60.0  # seconds of clock skew allowed on exp and nbf
    fetch_timeout: float = 5.0  # one discovery or JWKS fetch
    policies: tuple[JwtPolicy, ...] = ()


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """Where limit counts live: in this process, or in Redis shared by workers and replicas."""

    redis_url: str | None = field(default=None, repr=False)  # may hold a password
    redis_timeout: float = 0.05
    on_redis_error: OnRedisError = "allow"
    key_prefix: str = "claude-proxy:"


@dataclass(frozen=True, slots=True)
class UpstreamAuthConfig:
    type: AuthType
    api_key: str | None = field(default=None, repr=False)
    tenant_id: str | None = None
    client_id: str | None = None
    client_secret: str | None = field(default=None, repr=False)
    scope: str = DEFAULT_SCOPE
    authority_host: str | None = None
    certificate_path: str | None = None
    certificate_password: str | None = field(default=None, repr=False)
    # How long one token acquisition may take before it counts as failed.
    token_timeout: float = 30.0


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """One upstream (a Foundry resource, or api.anthropic.com / api.openai.com)."""

    name: str  # in logs and metric labels
    url: str
    priority: int = 1  # lower is tried first (PTU before pay-as-you-go)
    weight: int = 1  # share among the upstreams of the same priority
    auth: UpstreamAuthConfig | None = None  # None: the top-level [upstream_auth]


@dataclass(frozen=True, slots=True)
class RouteConfig:
    """Requests whose body names a model matching one of ``models`` go to ``upstreams``."""

    models: tuple[str, ...]  # fnmatch globs over the body's top-level "model"
    upstreams: tuple[str, ...]  # upstream names


# RFC 9110 §15.5.30 / §15.6.4 and Anthropic's 529: answers that say the request was not processed
DEFAULT_FAILOVER_STATUS = (429, 503, 529)


@dataclass(frozen=True, slots=True)
class FailoverConfig:
    """When a request moves on to the next upstream (before the client has seen a byte)."""

    on_status: tuple[int, ...] = DEFAULT_FAILOVER_STATUS
    max_attempts: int = 3  # upstreams tried per request, the first included
    replay_limit: int = 16 * 1024 * 1024  # request body bytes kept for another attempt
    cooldown: float = 10.0  # seconds an upstream is skipped after a refusal with no hint
    max_cooldown: float = 300.0  # the longest a retry hint may keep an upstream out
    circuit_failures: int = 3  # consecutive connect failures that open an upstream's circuit


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    log_path: str | None = None  # a directory; None: stdout
    rotation: Rotation = "daily"
    level: Level = "info"
    log_prefix: str = "claude-proxy"
    access_log: bool = True
    access_format: AccessFormat = "text"
    # A directory for the access log's own file (<log_prefix>-access.log); None: with the rest.
    access_log_path: str | None = None
    # Rotated files kept per log file; 0 keeps all.
    backup_count: int = 0


@dataclass(frozen=True, slots=True)
class AdminConfig:
    bind_address: str = "127.0.0.1"
    port: int | None = None
    # distinct model names used as metric labels; later ones are counted as "other"
    max_model_labels: int = 64


@dataclass(frozen=True, slots=True)
class TlsConfig:
    mode: TlsMode = "off"
    cert_path: str | None = None
    key_path: str | None = None
    https_port: int = 8443


@dataclass(frozen=True, slots=True)
class TelemetryConfig:
    """OpenTelemetry over OTLP/HTTP; off while ``otlp_endpoint`` is None."""

    # the collector's base URL (http://collector:4318); /v1/traces and /v1/metrics are appended
    otlp_endpoint: str | None = None
    sample_ratio: float = 1.0  # share of new traces kept; a client's traceparent decides its own
    propagate: bool = False  # send a traceparent naming the proxy's span to the upstream


@dataclass(frozen=True, slots=True)
class Config:
    # One upstream (the original's form), or [[upstreams]]: exactly one of the two is set.
    upstream_url: str | None = None
    upstream_auth: UpstreamAuthConfig | None = None  # for every upstream without its own
    upstreams: tuple[UpstreamConfig, ...] = ()
    routes: tuple[RouteConfig, ...] = ()
    failover: FailoverConfig = FailoverConfig()
    bind_address: str = "127.0.0.1"
    port: int = 8080
    client_api_key: str | None = field(default=None, repr=False)
    client_api_keys: tuple[ClientKey, ...] = ()
    # A TOML file of more [[client_api_keys]] (a mounted Secret), re-read when it changes.
    client_api_keys_file: str | None = None
    client_api_keys_file_interval: float = 5.0
    client_jwt: ClientJwtConfig | None = None
    limits: LimitsConfig = LimitsConfig()
    passthrough_unauthenticated: bool = True
    connect_timeout: float = 10.0
    idle_timeout: float = 600.0
    header_timeout: float = 30.0
    keepalive_timeout: float = 75.0
    pool_idle_timeout: float = 60.0
    shutdown_timeout: float = 30.0
    max_header_bytes: int = 65536
    max_headers: int = 128
    workers: int = 1
    logging: LoggingConfig = LoggingConfig()
    admin: AdminConfig = AdminConfig()
    tls: TlsConfig = TlsConfig()
    telemetry: TelemetryConfig = TelemetryConfig()

    def targets(self) -> tuple[UpstreamConfig, ...]:
        """Every upstream with its auth resolved: ``upstream_url`` is one named ``default``."""
        if not self.upstreams:
            assert self.upstream_url is not None and self.upstream_auth is not None
            return (UpstreamConfig(SINGLE_UPSTREAM, self.upstream_url, auth=self.upstream_auth),)
        return tuple(
            u if u.auth is not None else dataclasses.replace(u, auth=self.upstream_auth)
            for u in self.upstreams
        )

    @property
    def first_url(self) -> str:
        """The upstream a single-upstream feature (the client snippets, the demo) points at."""
        return self.upstream_url or self.upstreams[0].url

    def client_keys(self) -> tuple[ClientKey, ...]:
        """Every accepted client key: ``client_api_key`` (named ``default``) plus the named ones."""
        single = (ClientKey("default", self.client_api_key),) if self.client_api_key else ()
        return single + self.client_api_keys


@dataclass(frozen=True, slots=True)
class Loaded:
    """A validated config and where it came from."""

    config: Config
    path: Path | None
    searched: tuple[str, ...]


# --------------------------------------------------------------------------- discovery


def candidate_paths(home: Path | None = None) -> list[Path]:
    """The default places searched, in order, after ``--config`` and the environment variable."""
    home = home or Path.home()
    return [
        Path("config.toml"),
        home / ".config" / "claude-proxy" / "config.toml",
        home / ".claude-proxy.toml",
    ]


def discover(explicit: str | None, env: Mapping[str, str]) -> tuple[Path | None, tuple[str, ...]]:
    """Find the config file as the original does; a named file that does not exist is an error."""
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise ConfigError(f"--config: file {explicit} does not exist")
        return path, (f"--config {explicit}",)
    named = env.get(CONFIG_FILE_ENV)
    if named:
        path = Path(named).expanduser()
        if not path.is_file():
            raise ConfigError(f"{CONFIG_FILE_ENV}: file {named} does not exist")
        return path, (f"{CONFIG_FILE_ENV}={named}",)
    searched = ["--config (not given)", f"{CONFIG_FILE_ENV} (not set)"]
    for path in candidate_paths():
        searched.append(str(path))
        if path.is_file():
            return path, tuple(searched)
    return None, tuple(searched)


# --------------------------------------------------------------------------- expansion

_VAR = re.compile(r"\$(?:(\$)|\{([^}]*)\}|([A-Za-z_][A-Za-z0-9_]*))")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def expand(value: str, env: Mapping[str, str], key: str) -> str:
    """Expand ``${VAR}`` and ``$VAR``; ``$$`` is a literal ``$``; an unset variable is an error."""

    def substitute(match: re.Match[str]) -> str:
        if match.group(1):
            return "$"
        name = match.group(2) if match.group(2) is not None else match.group(3)
        if not _NAME.match(name):
            raise ConfigError(
                f"{key}: '${{{name}}}' is not a valid variable name; write $$ for '$'"
            )
        if name not in env:
            raise ConfigError(
                f"{key}: environment variable {name} is not set; set it, "
                f"or write $$ for a literal '$'"
            )
        return env[name]

    return _VAR.sub(substitute, value)


def _expand_tree(node: Any, env: Mapping[str, str], key: str) -> Any:
    if isinstance(node, str):
        return expand(node, env, key)
    if isinstance(node, dict):
        return {k: _expand_tree(v, env, f"{key}.{k}" if key else k) for k, v in node.items()}
    if isinstance(node, list):
        return [_expand_tree(v, env, f"{key}[{i}]") for i, v in enumerate(node)]
    return node


# --------------------------------------------------------------------------- layering


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
        if not isinstance(tree, dict):
            raise ConfigError(f"{part}: expected a table")
    tree[leaf] = value


def _field_type(dotted: str) -> Any:
    """The declared type of a dotted key, or None when no such key exists."""
    cls: Any = Config
    for part in dotted.split("."):
        hints = _hints(cls)
        if part not in hints:
            return None
        cls = _strip_optional(hints[part])
    return cls


def _coerce_text(text: str, tp: Any, name: str) -> Any:
    """Turn an environment or CLI string into the value type that ``tp`` expects."""
    base = _strip_optional(tp)
    if base is bool:
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name}: expected true or false; got {text!r}")
    if base is int or base is float:
        try:
            return base(text)
        except ValueError:
            raise ConfigError(f"{name}: expected a number; got {text!r}") from None
    if typing.get_origin(base) is tuple:
        try:
            return tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{name}: expected a TOML array ({exc})") from None
    return text


def env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    """``CLAUDE_PROXY__UPSTREAM_AUTH__TYPE=azure_cli`` and friends, as a nested dict."""
    tree: dict[str, Any] = {}
    for name, text in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        dotted = name[len(ENV_PREFIX) :].lower().replace("__", ".")
        tp = _field_type(dotted)
        if tp is None or dataclasses.is_dataclass(tp):
            raise ConfigError(
                f"{name}: no setting {dotted!r}; see config.example.toml for the keys"
            )
        _set_dotted(tree, dotted, _coerce_text(text, tp, name))
    return tree


def _merge(low: dict[str, Any], high: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(low)
    for key, value in high.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


# --------------------------------------------------------------------------- validation

_HINTS: dict[Any, dict[str, Any]] = {}


def _hints(cls: Any) -> dict[str, Any]:
    if not dataclasses.is_dataclass(cls):
        return {}
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _strip_optional(tp: Any) -> Any:
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _describe(value: Any) -> str:
    return type(value).__name__ if not isinstance(value, str) else repr(value)


def _convert(value: Any, tp: Any, key: str, secret: bool) -> Any:
    base = _strip_optional(tp)
    shown = "a value" if secret else _describe(value)
    if typing.get_origin(base) is Literal:
        choices = typing.get_args(base)
        if value not in choices:
            raise ConfigError(f"{key}: expected one of {', '.join(choices)}; got {shown}")
        return value
    if dataclasses.is_dataclass(base):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table; got {_describe(value)}")
        return _build(base, value, key)  # type: ignore[arg-type]
    if typing.get_origin(base) is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected an array; got {_describe(value)}")
        (item,) = typing.get_args(base)[:1]
        return tuple(_convert(v, item, f"{key}[{i}]", secret) for i, v in enumerate(value))
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base is int and isinstance(value, bool):
        raise ConfigError(f"{key}: expected an integer; got bool")
    if base is datetime.date and not (
        isinstance(value, datetime.date) and not isinstance(value, datetime.datetime)
    ):
        raise ConfigError(f"{key}: expected a TOML date such as 2027-06-30; got {shown}")
    if not isinstance(value, base):
        raise ConfigError(f"{key}: expected {base.__name__}; got {shown}")
    return value


def _build(cls: type[Any], raw: Mapping[str, Any], prefix: str) -> Any:
    hints = _hints(cls)
    for key in raw:
        if key not in hints:
            where = f"{prefix}.{key}" if prefix else key
            known = ", ".join(sorted(hints))
            raise ConfigError(f"{where}: unknown key; expected one of {known}")
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        if f.name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{key}: required but not set")
            continue
        kwargs[f.name] = _convert(raw[f.name], hints[f.name], key, secret=not f.repr)
    return cls(**kwargs)


_AUTH_NEEDS: dict[str, tuple[str, ...]] = {
    "api_key": ("api_key",),
    "azure_ad": ("tenant_id", "client_id", "client_secret"),
    "azure_certificate": ("tenant_id", "client_id", "certificate_path"),
}


def _check_url(value: str, key: str) -> None:
    url = urlsplit(value)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ConfigError(f"{key}: expected http(s)://host[:port][/prefix]; got {value!r}")
    if url.query or url.fragment:
        raise ConfigError(f"{key}: must not carry a query or fragment")
    try:
        url.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise ConfigError(f"{key}: bad port in {value!r}") from None


def _check_auth(auth: UpstreamAuthConfig, key: str) -> None:
    if auth.token_timeout <= 0:
        raise ConfigError(f"{key}.token_timeout: must be greater than 0")
    for needed in _AUTH_NEEDS.get(auth.type, ()):
        if not getattr(auth, needed):
            raise ConfigError(f"{key}.{needed}: required when {key}.type = {auth.type!r}")


def _check_upstreams(config: Config) -> None:
    if config.upstream_url is not None and config.upstreams:
        raise ConfigError(
            "upstream_url: give upstream_url (one upstream) or [[upstreams]] (several), not both"
        )
    if config.upstream_url is None and not config.upstreams:
        raise ConfigError(
            "upstream_url: required; or one [[upstreams]] table per upstream (name, url)"
        )
    if config.upstream_url is not None:
        _check_url(config.upstream_url, "upstream_url")
    if config.upstream_auth is not None:
        _check_auth(config.upstream_auth, "upstream_auth")
    names: set[str] = set()
    for i, up in enumerate(config.upstreams):
        where = f"upstreams[{i}]"
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", up.name):
            raise ConfigError(
                f"{where}.name: expected letters, digits, '-', '_' or '.'; got {up.name!r}"
            )
        if up.name in names:
            raise ConfigError(f"{where}.name: duplicate upstream name {up.name!r}")
        names.add(up.name)
        _check_url(up.url, f"{where}.url")
        if up.weight < 1:
            raise ConfigError(f"{where}.weight: must be at least 1")
        if up.auth is not None:
            _check_auth(up.auth, f"{where}.auth")
        elif config.upstream_auth is None:
            raise ConfigError(
                f"{where}.auth: required, since there is no top-level [upstream_auth]; "
                "give [upstreams.auth] here or an [upstream_auth] for every upstream"
            )
    if config.upstream_url is not None and config.upstream_auth is None:
        raise ConfigError("upstream_auth: required (a table with type = ...)")
    for i, route in enumerate(config.routes):
        where = f"routes[{i}]"
        if not route.models or any(not m.strip() for m in route.models):
            raise ConfigError(f"{where}.models: expected one or more non-empty model globs")
        if not route.upstreams:
            raise ConfigError(f"{where}.upstreams: expected one or more upstream names")
        for j, name in enumerate(route.upstreams):
            if name in route.upstreams[:j]:
                raise ConfigError(f"{where}.upstreams[{j}]: {name!r} is named twice")
            if name not in names:
                known = ", ".join(sorted(names)) or "none: routes need [[upstreams]]"
                raise ConfigError(f"{where}.upstreams[{j}]: no upstream {name!r} ({known})")
    fo = config.failover
    for j, status in enumerate(fo.on_status):
        if not 400 <= status <= 599:
            raise ConfigError(f"failover.on_status[{j}]: expected a 4xx or 5xx status")
    if fo.max_attempts < 1:
        raise ConfigError("failover.max_attempts: must be at least 1 (1: no failover)")
    if fo.replay_limit < 0:
        raise ConfigError("failover.replay_limit: expected 0 or more bytes")
    if not fo.cooldown > 0:
        raise ConfigError("failover.cooldown: must be greater than 0")
    if fo.max_cooldown < fo.cooldown:
        raise ConfigError(
            f"failover.max_cooldown: must be at least failover.cooldown ({fo.cooldown:g})"
        )
    if fo.circuit_failures < 1:
        raise ConfigError("failover.circuit_failures: must be at least 1")


def _check(config: Config) -> None:
    _check_upstreams(config)
    for key, port in (
        ("port", config.port),
        ("admin.port", config.admin.port),
        ("tls.https_port", config.tls.https_port),
    ):
        if port is not None and not 0 <= port <= 65535:
            raise ConfigError(f"{key}: expected 0..65535")
    for key in (
        "connect_timeout",
        "idle_timeout",
        "header_timeout",
        "keepalive_timeout",
        "pool_idle_timeout",
        "shutdown_timeout",
        "client_api_keys_file_interval",
    ):
        if getattr(config, key) <= 0:
            raise ConfigError(f"{key}: must be greater than 0")
    if config.workers < 1:
        raise ConfigError("workers: must be at least 1")
    if config.logging.backup_count < 0:
        raise ConfigError("logging.backup_count: expected 0 (keep every file) or more")
    if not 1 <= config.admin.max_model_labels <= 10000:
        raise ConfigError("admin.max_model_labels: expected 1..10000 (each name is a label value)")
    _check_keys(config)
    _check_jwt(config.client_jwt)
    _check_limits(config)
    _check_listeners(config)
    _check_telemetry(config.telemetry)


_SHA256_HEX = re.compile(r"[0-9a-f]{64}\Z")


def _check_keys(config: Config) -> None:
    if config.client_api_key == "":
        raise ConfigError("client_api_key: empty; remove the key to disable client keys")
    names: set[str] = set()
    digests: set[str] = set()
    for i, ck in enumerate(config.client_api_keys):
        check_key_entry(ck, f"client_api_keys[{i}]")
    for i, ck in enumerate(config.client_keys()):
        if ck.name in names:
            raise ConfigError(
                f"client_api_keys[{i}].name: duplicate name {ck.name!r}; names must be unique "
                "across client_api_key (named default), client_api_keys and client_api_keys_file"
            )
        names.add(ck.name)
        digest = key_digest(ck)
        if digest in digests:
            raise ConfigError("client_api_keys: the same key appears twice; give each key one name")
        digests.add(digest)


def check_key_entry(ck: ClientKey, where: str) -> None:
    """One ``[[client_api_keys]]`` entry, inline or from ``client_api_keys_file``."""
    if ck.key is not None and ck.key_sha256 is not None:
        raise ConfigError(f"{where}: give key or key_sha256, not both")
    if ck.key_sha256 is not None and not _SHA256_HEX.match(ck.key_sha256.lower()):
        raise ConfigError(
            f"{where}.key_sha256: expected 64 hex digits (claude-proxy hash-key prints them)"
        )
    if ck.key is None and ck.key_sha256 is None:
        raise ConfigError(f"{where}.key: required; or key_sha256 (from claude-proxy hash-key)")
    if ck.key == "":
        raise ConfigError(f"{where}.key: empty")
    _check_limit_settings(ck, where)


def key_digest(ck: ClientKey) -> str:
    """The SHA-256 hex digest of a client key, from ``key`` or as configured."""
    if ck.key_sha256 is not None:
        return ck.key_sha256.lower()
    return hashlib.sha256((ck.key or "").encode()).hexdigest()


def _check_limit_settings(settings: LimitSettings, where: str) -> None:
    for name in ("requests_per_minute", "tokens_per_minute", "tokens_per_day", "max_concurrent"):
        value = getattr(settings, name)
        if value is not None and value < 1:
            raise ConfigError(f"{where}.{name}: must be at least 1; remove it for no limit")
    if settings.allowed_models is not None:
        for j, pattern in enumerate(settings.allowed_models):
            if not pattern.strip():
                raise ConfigError(f"{where}.allowed_models[{j}]: empty pattern")


def _check_jwt(jwt: ClientJwtConfig | None) -> None:
    if jwt is None:
        return
    for key in ("issuer", "jwks_uri"):
        url = getattr(jwt, key)
        if url is not None and (urlsplit(url).scheme != "https" or not urlsplit(url).hostname):
            raise ConfigError(f"client_jwt.{key}: expected an https:// URL; got {url!r}")
    for key in ("audience", "identity_claim", "name_claim"):
        if not getattr(jwt, key):
            raise ConfigError(f"client_jwt.{key}: empty")
    if not 0 <= jwt.leeway <= 300:
        raise ConfigError("client_jwt.leeway: expected 0..300 seconds")
    if jwt.fetch_timeout <= 0:
        raise ConfigError("client_jwt.fetch_timeout: must be greater than 0")
    labels: set[str] = set()
    for i, policy in enumerate(jwt.policies):
        where = f"client_jwt.policies[{i}]"
        if not policy.claim or not policy.value:
            raise ConfigError(f"{where}: claim and value must not be empty")
        if policy.label in labels:
            raise ConfigError(f"{where}.name: duplicate policy name {policy.label!r}")
        labels.add(policy.label)
        _check_limit_settings(policy, where)


def _first_counted(config: Config) -> str | None:
    """The first key or policy whose limits need counts kept, as a dotted key; or None."""
    for i, ck in enumerate(config.client_api_keys):
        if ck.counted():
            return f"client_api_keys[{i}] ({ck.name})"
    for i, policy in enumerate(config.client_jwt.policies if config.client_jwt else ()):
        if policy.counted():
            return f"client_jwt.policies[{i}] ({policy.label})"
    return None


def _check_limits(config: Config) -> None:
    limits = config.limits
    if not 0 < limits.redis_timeout <= 5:
        raise ConfigError("limits.redis_timeout: expected more than 0 and at most 5 seconds")
    if limits.redis_url is not None and urlsplit(limits.redis_url).scheme not in (
        "redis",
        "rediss",
        "unix",
    ):
        raise ConfigError("limits.redis_url: expected redis://, rediss:// or unix://")
    counted = _first_counted(config)
    if counted and config.workers > 1 and limits.redis_url is None:
        raise ConfigError(
            f"limits.redis_url: required with workers = {config.workers}, because "
            f"{counted} has counted limits: each worker would count alone and let "
            f"{config.workers} times the limit through. Set limits.redis_url, or workers = 1"
        )


def _check_listeners(config: Config) -> None:
    for key, host in (
        ("bind_address", config.bind_address),
        ("admin.bind_address", config.admin.bind_address),
    ):
        try:
            ipaddress.ip_address(host)
        except ValueError:
            if host != "localhost":
                raise ConfigError(f"{key}: expected an IP address; got {host!r}") from None
    if config.tls.mode == "manual" and not (config.tls.cert_path and config.tls.key_path):
        raise ConfigError("tls.cert_path and tls.key_path: required when tls.mode = 'manual'")


def _check_telemetry(telemetry: TelemetryConfig) -> None:
    if not 0.0 <= telemetry.sample_ratio <= 1.0:
        raise ConfigError("telemetry.sample_ratio: expected a number from 0.0 to 1.0")
    if telemetry.otlp_endpoint is None:
        return
    key = f"telemetry.otlp_endpoint (or {OTLP_ENDPOINT_ENV})"
    url = urlsplit(telemetry.otlp_endpoint)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ConfigError(
            f"{key}: expected http(s)://host[:port], the collector's OTLP/HTTP address "
            f"(port 4318 by default); got {telemetry.otlp_endpoint!r}"
        )
    if url.username is not None or url.password is not None:
        raise ConfigError(
            f"{key}: no credentials in the URL; put them in OTEL_EXPORTER_OTLP_HEADERS"
        )
    if url.query or url.fragment:
        raise ConfigError(f"{key}: must not carry a query or fragment")
    if url.path.rstrip("/").endswith(("/v1/traces", "/v1/metrics", "/v1/logs")):
        raise ConfigError(
            f"{key}: give the collector's base URL (http://collector:4318); the proxy appends "
            f"/v1/traces and /v1/metrics itself"
        )
    try:
        url.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise ConfigError(f"{key}: bad port in {telemetry.otlp_endpoint!r}") from None


def _otel_defaults(raw: dict[str, Any], env: Mapping[str, str]) -> None:
    """``OTEL_EXPORTER_OTLP_ENDPOINT`` names the collector when the config does not (as the
    OpenTelemetry SDKs do: an explicit setting wins over the standard variable)."""
    endpoint = env.get(OTLP_ENDPOINT_ENV)
    if not endpoint:
        return
    table = raw.setdefault("telemetry", {})
    if isinstance(table, dict) and table.get("otlp_endpoint") is None:
        table["otlp_endpoint"] = endpoint


def parse(raw: Mapping[str, Any], file_keys: tuple[ClientKey, ...] = ()) -> Config:
    """Validate an already merged mapping into a :class:`Config`.

    ``file_keys``: the keys read from ``client_api_keys_file``, appended to the inline ones
    before the keys are checked (so a name used in both places is an error).
    """
    config: Config = _build(Config, raw, "")
    if file_keys:
        config = dataclasses.replace(config, client_api_keys=config.client_api_keys + file_keys)
    _check(config)
    return config


def parse_keys_file(text: str, where: str) -> tuple[ClientKey, ...]:
    """The ``[[client_api_keys]]`` entries of a keys file's ``text``; ``where`` names it in
    errors. Values are taken literally (a mounted Secret holds the keys themselves). A file
    without entries is an error: a rotation gone wrong must not leave the proxy open."""
    prefix = f"client_api_keys_file ({where})"
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{prefix}: not valid TOML: {exc}") from None
    unknown = sorted(set(data) - {"client_api_keys"})
    if unknown:
        raise ConfigError(
            f"{prefix}: unknown key {unknown[0]!r}; expected only [[client_api_keys]] entries"
        )
    entries = data.get("client_api_keys", [])
    if not isinstance(entries, list) or not entries:
        raise ConfigError(
            f"{prefix}: no [[client_api_keys]] entries; write one table per key, "
            'with name = "..." and key = "..."'
        )
    keys = _convert(entries, tuple[ClientKey, ...], f"{prefix}: client_api_keys", secret=True)
    for i, ck in enumerate(keys):
        check_key_entry(ck, f"{prefix}: client_api_keys[{i}]")
    return tuple(keys)


def read_keys_file(path: Path) -> tuple[ClientKey, ...]:
    """Read and validate ``client_api_keys_file``."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"client_api_keys_file: cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"client_api_keys_file ({path}): not UTF-8 text") from None
    return parse_keys_file(text, str(path))


def keys_file_path(raw: Mapping[str, Any]) -> Path | None:
    value = raw.get("client_api_keys_file")
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"client_api_keys_file: expected a file path; got {_describe(value)}")
    return Path(value).expanduser()


def read_file(path: Path, env: Mapping[str, str]) -> dict[str, Any]:
    """Read and ``${VAR}``-expand one TOML file."""
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    expanded: dict[str, Any] = _expand_tree(data, env, "")
    return expanded


def load_config(
    explicit: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> Loaded:
    """Discover, read, layer (CLI > environment > file > defaults) and validate the config.

    ``overrides`` maps dotted keys (``"upstream_auth.type"``) to values already typed.
    """
    env = os.environ if env is None else env
    path, searched = discover(explicit, env)
    raw = read_file(path, env) if path else {}
    raw = _merge(raw, env_overrides(env))
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(raw, dotted, value)
    _otel_defaults(raw, env)
    if "upstream_url" not in raw and "upstreams" not in raw and path is None:
        raise ConfigError(
            "no config file found and upstream_url is not set; searched: "
            + "; ".join(searched)
            + ". Copy config.example.toml to config.toml, or pass --config"
        )
    keys_file = keys_file_path(raw)
    file_keys = read_keys_file(keys_file) if keys_file is not None else ()
    return Loaded(parse(raw, file_keys), path, searched)


def _literal(value: str) -> bool:
    """Whether ``value`` holds text of its own besides ``${VAR}`` / ``$VAR`` references."""
    return bool(_VAR.sub(lambda m: "$" if m.group(1) else "", value).strip())


def literal_secrets(raw: Mapping[str, Any], cls: Any = Config, prefix: str = "") -> list[str]:
    """The dotted keys of secret fields that a file (``raw``, not yet expanded) writes out
    literally rather than taking from the environment; for the file-permission warning."""
    found: list[str] = []
    fields = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
    for name, value in raw.items():
        f = fields.get(name)
        if f is None:
            continue
        key = f"{prefix}.{name}" if prefix else name
        tp = _strip_optional(_hints(cls)[name])
        if isinstance(value, str):
            if not f.repr and _literal(value):
                found.append(key)
        elif isinstance(value, dict):
            found += literal_secrets(value, tp, key)
        elif isinstance(value, list) and typing.get_origin(tp) is tuple:
            item = typing.get_args(tp)[0]
            for i, entry in enumerate(value):
                if isinstance(entry, dict):
                    found += literal_secrets(entry, item, f"{key}[{i}]")
    return found


def walk_secrets(config: Config) -> Iterator[str]:
    """Every secret value in ``config`` (fields declared with ``repr=False``); for redaction."""
    stack: list[Any] = [config]
    while stack:
        node = stack.pop()
        if isinstance(node, tuple):
            stack.extend(node)
            continue
        if not dataclasses.is_dataclass(node):
            continue
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            if not f.repr and isinstance(value, str) and value:
                yield value
            elif dataclasses.is_dataclass(value) or isinstance(value, tuple):
                stack.append(value)


# --------------------------------------------------------------------------- reload (SIGHUP)

# What a running server takes on SIGHUP. Everything else (listeners, upstream, its auth, the
# pool's timeouts, workers, log files, the admin listener, TLS mode) is fixed when it starts.
RELOADABLE = frozenset(
    {
        "client_api_key",
        "client_api_keys",
        "passthrough_unauthenticated",
        "logging.level",
        "logging.access_log",
        "tls.cert_path",
        "tls.key_path",
    }
)
_KEY_FIELDS = frozenset({"client_api_key", "client_api_keys"})


@dataclass(frozen=True, slots=True)
class ReloadPlan:
    """What a SIGHUP does: ``config`` is the snapshot to apply (the new reloadable values, every
    other field as running); ``changes`` and ``restart_needed`` are lines for the log."""

    config: Config
    changes: tuple[str, ...]
    restart_needed: tuple[str, ...]


def _same_table(before: Any, after: Any) -> bool:
    """Both are the same config table: compared field by field (an optional table that is
    set on one side only, like ``client_jwt``, is compared as one value)."""
    return dataclasses.is_dataclass(before) and type(before) is type(after)


def _differences(old: Any, new: Any, prefix: str = "") -> Iterator[tuple[str, Any, Any, bool]]:
    """(dotted key, old value, new value, is secret) for every setting that differs."""
    for f in dataclasses.fields(old):
        before, after = getattr(old, f.name), getattr(new, f.name)
        key = prefix + f.name
        if _same_table(before, after):
            yield from _differences(before, after, key + ".")
        elif before != after:
            yield key, before, after, not f.repr


def _show(value: Any) -> str:
    if value is None:
        return "(unset)"
    if dataclasses.is_dataclass(value):
        return "(a table)"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, str) else str(value)


def _with_reloadable(old: Any, new: Any, prefix: str = "") -> Any:
    """``old`` with the reloadable fields taken from ``new``; ``old`` itself if none differ."""
    changed: dict[str, Any] = {}
    for f in dataclasses.fields(old):
        before, after = getattr(old, f.name), getattr(new, f.name)
        key = prefix + f.name
        if _same_table(before, after):
            merged = _with_reloadable(before, after, key + ".")
            if merged is not before:
                changed[f.name] = merged
        elif key in RELOADABLE and before != after:
            changed[f.name] = after
    return dataclasses.replace(old, **changed) if changed else old


def key_changes(old: Config, new: Config) -> tuple[str, ...]:
    """Client keys added, removed, replaced and given other limits, by name (never a key)."""
    before = {k.name: k for k in old.client_keys()}
    after = {k.name: k for k in new.client_keys()}
    kept = [name for name in after if name in before]
    groups = {
        "added": [name for name in after if name not in before],
        "removed": [name for name in before if name not in after],
        "replaced": [n for n in kept if _secret_of(before[n]) != _secret_of(after[n])],
        "with other limits": [n for n in kept if _limits_of(before[n]) != _limits_of(after[n])],
    }
    return tuple(
        f"client keys {label}: {', '.join(names)}" for label, names in groups.items() if names
    )


def _secret_of(key: ClientKey) -> tuple[str | None, str | None]:
    return key.key, key.key_sha256


def _limits_of(key: ClientKey) -> tuple[Any, ...]:
    return tuple(getattr(key, f.name) for f in dataclasses.fields(LimitSettings))


def reload_plan(old: Config, new: Config) -> ReloadPlan:
    """Compare the running config with a newly loaded one (pure): what to apply, what changed,
    and which changed settings keep their running value until a restart."""
    changes: list[str] = list(key_changes(old, new))
    restart: list[str] = []
    for key, before, after, secret in _differences(old, new):
        if key in _KEY_FIELDS:
            continue
        if key in RELOADABLE:
            changes.append(f"{key}: {_show(before)} -> {_show(after)}")
        elif secret:
            restart.append(f"{key}: changed; the running value stays until a restart")
        else:
            restart.append(f"{key}: {_show(before)} stays in force; {_show(after)} needs a restart")
    return ReloadPlan(_with_reloadable(old, new), tuple(changes), tuple(restart))
