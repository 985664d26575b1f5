"""The client-facing TLS context: loading the certificate and key, and saying what is wrong.

OpenSSL's own errors name neither the file nor the cause (``[SSL] PEM lib``), so the files are
read and recognised here first; OpenSSL still does the real parsing. An encrypted key is refused
instead of letting OpenSSL ask for its passphrase on a terminal that a service does not have.
"""

from __future__ import annotations

import ssl

from .config import Config
from .errors import ConfigError

CERT_MARKER = b"-----BEGIN CERTIFICATE-----"
KEY_MARKERS = (
    b"-----BEGIN PRIVATE KEY-----",
    b"-----BEGIN RSA PRIVATE KEY-----",
    b"-----BEGIN EC PRIVATE KEY-----",
)
ENCRYPTED_MARKERS = (b"-----BEGIN ENCRYPTED PRIVATE KEY-----", b"Proc-Type: 4,ENCRYPTED")


class CertificateError(ConfigError):
    """A TLS certificate or key that cannot be used; ``key`` and ``path`` name the file."""

    def __init__(self, key: str, path: str, reason: str) -> None:
        super().__init__(f"{key} {path}: {reason}")
        self.key = key
        self.path = path
        self.reason = reason


def pem_problem(data: bytes, *, is_key: bool) -> str | None:
    """Why ``data`` is not a usable PEM certificate (or unencrypted PEM key); None if it is."""
    if is_key:
        if any(marker in data for marker in ENCRYPTED_MARKERS):
            return (
                "the private key is encrypted (passphrase-protected); store it decrypted: "
                "openssl pkey -in KEY -out KEY.plain, then chmod 600 KEY.plain"
            )
        if not any(marker in data for marker in KEY_MARKERS):
            return "not a PEM private key (expected a '-----BEGIN PRIVATE KEY-----' block)"
        return None
    if CERT_MARKER not in data:
        return "not a PEM certificate (expected a '-----BEGIN CERTIFICATE-----' block)"
    return None


def _read(key: str, path: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise CertificateError(key, path, f"cannot read: {exc.strerror}") from None


def _no_passphrase() -> bytes:
    raise CertificateError("tls.key_path", "", "the private key is encrypted")


def load_certificate(context: ssl.SSLContext, config: Config) -> None:
    """Load ``config.tls``'s certificate chain and key into ``context`` (again on reload: new
    connections get the new certificate). Raises :class:`CertificateError`."""
    cert_path, key_path = config.tls.cert_path, config.tls.key_path
    if cert_path is None or key_path is None:
        raise ConfigError("tls.cert_path and tls.key_path: required when tls.mode = 'manual'")
    problem = pem_problem(_read("tls.cert_path", cert_path), is_key=False)
    if problem is not None:
        raise CertificateError("tls.cert_path", cert_path, problem)
    problem = pem_problem(_read("tls.key_path", key_path), is_key=True)
    if problem is not None:
        raise CertificateError("tls.key_path", key_path, problem)
    try:
        context.load_cert_chain(cert_path, key_path, password=_no_passphrase)
    except CertificateError as exc:
        raise CertificateError("tls.key_path", key_path, exc.reason) from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise CertificateError(
                "tls.key_path", key_path, f"does not match the certificate in {cert_path}"
            ) from None
        raise CertificateError(
            "tls.cert_path", cert_path, f"OpenSSL cannot use it with {key_path}: {exc}"
        ) from None
    except OSError as exc:  # the files changed between our read and OpenSSL's
        raise CertificateError("tls.cert_path", cert_path, f"cannot read: {exc.strerror}") from None


def server_tls_context(config: Config) -> ssl.SSLContext:
    """The client-facing TLS context; :func:`load_certificate` again on reload swaps the cert."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.set_alpn_protocols(["http/1.1"])
    load_certificate(context, config)
    return context
