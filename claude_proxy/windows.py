"""Fixed windows aligned to the wall clock, and the counts a limit store reports for them.

Pure; shared by limits.py and redis_store.py (which must not import each other).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

MINUTE: Final = 60
DAY: Final = 86400
CONCURRENCY_LEASE: Final = 900.0  # a permit a crashed replica never released ends after this


def window_index(now: float, period: int) -> int:
    return int(now // period)


@dataclass(frozen=True, slots=True)
class Counts:
    """One subject's counts in the current windows, as a store reports them."""

    requests_minute: int = 0
    tokens_minute: int = 0
    tokens_day: int = 0
    concurrent: int = 0
