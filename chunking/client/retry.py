"""The retry policy, tus-js-client's: ``delays[n]`` seconds before retry ``n``; progress resets
``n``; ``on_should_retry(error, retry_attempt)`` overrides the decision."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Final

from chunking.client.errors import ClientClosedError, is_retryable

__all__ = ["DEFAULT_RETRY_DELAYS", "Retrier", "ShouldRetry"]

DEFAULT_RETRY_DELAYS: Final[tuple[float, ...]] = (0.0, 1.0, 3.0, 5.0)
"""Seconds to wait before each retry (tus-js-client's ``[0, 1000, 3000, 5000]`` ms)."""

ShouldRetry = Callable[[BaseException, int], bool]
"""``on_should_retry(error, retry_attempt) -> bool``; ``retry_attempt`` counts from 0."""


class Retrier:
    """One upload's (or stream's) retry counter. Pure: the caller sleeps."""

    def __init__(self, delays: Sequence[float], should_retry: ShouldRetry | None) -> None:
        self.delays = tuple(delays)
        self.should_retry = should_retry
        self.attempt = 0
        self._progress = 0
        self._progress_at_retry = 0

    def progressed(self, amount: int = 1) -> None:
        """The upload made progress (bytes acknowledged, a frame answered)."""
        self._progress += amount

    def next_delay(self, error: BaseException) -> float | None:
        """Seconds to wait before retrying after ``error``; None: give up."""
        if self._progress > self._progress_at_retry:
            self.attempt = 0
        if isinstance(error, ClientClosedError) or self.attempt >= len(self.delays):
            return None
        decide = self.should_retry or (lambda exc, attempt: is_retryable(exc))
        if not decide(error, self.attempt):
            return None
        delay = float(self.delays[self.attempt])
        self.attempt += 1
        self._progress_at_retry = self._progress
        retry_after = getattr(error, "retry_after_ms", None)
        if isinstance(retry_after, int) and retry_after > 0:
            delay = max(delay, retry_after / 1000)
        return delay
