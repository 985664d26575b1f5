from __future__ import annotations

import pytest

from claude_proxy.credentials import rejection_backoff


@pytest.mark.parametrize(
    ("streak", "expected"),
    [(0, 0.0), (1, 0.0), (2, 1.0), (3, 2.0), (4, 4.0), (6, 16.0), (7, 30.0), (40, 30.0)],
)
def test_rejection_backoff_doubles_after_the_first_and_is_capped(
    streak: int, expected: float
) -> None:
    assert rejection_backoff(streak, 1.0, 30.0) == expected
