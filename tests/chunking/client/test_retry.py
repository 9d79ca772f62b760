"""The retry policy (chunking.client.retry), alone."""

from __future__ import annotations

import chunking.client.retry as retry_module
from chunking.client import (
    BusyError,
    ClientClosedError,
    ConnectionLostError,
    InvalidImageError,
    StalledError,
    is_retryable,
)


def test_the_retry_rule() -> None:
    retrier = retry_module.Retrier([0, 1, 3], None)
    lost = ConnectionLostError("x")
    assert [retrier.next_delay(lost) for _ in range(4)] == [0, 1, 3, None]
    retrier.progressed()
    assert retrier.next_delay(lost) == 0  # progress: the counter starts again
    assert retrier.next_delay(BusyError("b", retry_after_ms=2500)) == 2.5  # retry_after wins
    assert retrier.next_delay(InvalidImageError("i")) is None  # not retryable
    assert retry_module.Retrier([5], lambda e, n: True).next_delay(ClientClosedError()) is None
    assert is_retryable(StalledError())
    assert not is_retryable(ClientClosedError())
    assert not is_retryable(ValueError())
