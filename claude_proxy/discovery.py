"""``python -m claude_proxy.discovery``: exit 0 when a config would be found, else 1.

Used by ``make run`` to choose between the real proxy and the demo.
"""

from __future__ import annotations

import os
import sys

from .config import ENV_PREFIX, discover
from .errors import ConfigError


def configured(env: dict[str, str]) -> bool:
    try:
        path, _ = discover(None, env)
    except ConfigError:
        return True  # a named file is missing: let the proxy itself say so
    return path is not None or f"{ENV_PREFIX}UPSTREAM_URL" in env


if __name__ == "__main__":
    sys.exit(0 if configured(dict(os.environ)) else 1)
