"""``python -m claude_proxy``: the same as the ``claude-proxy`` command."""

from .cli import main

raise SystemExit(main())
