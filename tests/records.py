"""One way to make an :class:`~claude_proxy.record.ExchangeRecord` in tests: every required
field has a plain default, and each test names only what it is about."""

from __future__ import annotations

from typing import Any

from claude_proxy.record import ExchangeRecord

DEFAULTS: dict[str, Any] = {
    "request_id": "r1",
    "start_time": 0.0,
    "client_key": "alice",
    "client_addr": "127.0.0.1:1",
    "method": "POST",
    "path": "/anthropic/v1/messages",
    "api": "anthropic",
    "status": 200,
    "outcome": "complete",
    "origin": "upstream",
    "bytes_in": 0,
    "bytes_out": 0,
    "ttfb": None,
    "duration": 0.0,
}


def exchange_record(**fields: Any) -> ExchangeRecord:
    """A relayed, complete ``POST /anthropic/v1/messages`` unless ``fields`` say otherwise."""
    return ExchangeRecord(**(DEFAULTS | fields))
