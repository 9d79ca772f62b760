"""The batching policy, driven by a fake clock: plain numbers for times."""

from __future__ import annotations

import pytest

from server.runtime.batching import (
    ArrivalGaps,
    BatchLimits,
    Limits,
    NextBatch,
    Waiting,
    next_batch,
)

LIMITS = Limits(BatchLimits(max_batch_size=3, max_wait_s=0.010),
                {"big": BatchLimits(max_batch_size=5, max_wait_s=0.100)})
BUSY = 0.001
"""An arrival gap well under every max_wait: company is likely."""


def jobs(*spec: tuple[str, float]) -> list[Waiting]:
    return [Waiting(task, since) for task, since in spec]


def test_nothing_waiting_means_nothing_to_run_and_no_timer() -> None:
    assert next_batch([], 5.0, LIMITS, BUSY) == NextBatch()


def test_a_full_batch_of_the_oldest_jobs_task_runs_at_once_skipping_other_tasks() -> None:
    waiting = jobs(("a", 1.0), ("b", 1.0), ("a", 1.0), ("a", 1.0), ("a", 1.0))
    assert next_batch(waiting, 1.0, LIMITS, BUSY) == NextBatch(take=(0, 2, 3))


def test_later_tiles_of_an_analysis_yield_to_a_whole_image_queued_after_them() -> None:
    """Another client's image does not wait behind a huge image's queued tiles: a tile with
    tiles of its analysis served before it ranks after a whole image."""
    tiles = [Waiting("faces", 1.0, rank) for rank in range(4, 12)]
    waiting = [*tiles, Waiting("classify", 2.0)]
    assert next_batch(waiting, 2.0, LIMITS, None) == NextBatch(take=(8,))
    # Of the same task, the whole image leads its batch and the earliest tiles fill it.
    waiting = [*tiles, Waiting("faces", 2.0)]
    assert next_batch(waiting, 2.0, LIMITS, BUSY) == NextBatch(take=(8, 0, 1))
    # An analysis's first tile is as early as a whole image: the older of the two goes first.
    waiting = [Waiting("faces", 1.0, 0), Waiting("classify", 2.0)]
    assert next_batch(waiting, 2.0, LIMITS, None) == NextBatch(take=(0,))


def test_a_partial_batch_waits_until_the_oldest_of_its_jobs_has_waited_max_wait() -> None:
    """The wait counts from the batch's oldest job, even where a younger one leads it."""
    waiting = [Waiting("a", 1.000, 3), Waiting("a", 1.004)]
    assert next_batch(waiting, 1.004, LIMITS, BUSY).wait_s == pytest.approx(0.006)
    assert next_batch(waiting, 1.010, LIMITS, BUSY) == NextBatch(take=(1, 0))


def test_a_partial_batch_waits_until_the_oldest_job_has_waited_max_wait() -> None:
    waiting = jobs(("a", 1.000), ("a", 1.004))
    first = next_batch(waiting, 1.004, LIMITS, BUSY)
    assert first.take == ()
    assert first.wait_s == pytest.approx(0.006)
    # The fake clock moves on: at max_wait the batch goes as it is.
    assert next_batch(waiting, 1.010, LIMITS, BUSY) == NextBatch(take=(0, 1))
    assert next_batch(waiting, 9.0, LIMITS, BUSY) == NextBatch(take=(0, 1))


def test_without_company_likely_a_partial_batch_goes_at_once() -> None:
    waiting = jobs(("a", 1.0))
    assert next_batch(waiting, 1.0, LIMITS, None) == NextBatch(take=(0,))  # too few arrivals
    assert next_batch(waiting, 1.0, LIMITS, 0.5) == NextBatch(take=(0,))   # far apart
    assert next_batch(waiting, 1.0, LIMITS, 0.005).take == ()              # close together


def test_per_task_limits_set_the_batch_size_and_the_wait() -> None:
    waiting = jobs(*[("big", 2.0)] * 4)
    assert next_batch(waiting, 2.05, LIMITS, BUSY).wait_s == pytest.approx(0.05)
    assert next_batch(waiting, 2.1, LIMITS, BUSY) == NextBatch(take=(0, 1, 2, 3))
    assert next_batch(jobs(*[("big", 2.0)] * 6), 2.0, LIMITS, BUSY).take == (0, 1, 2, 3, 4)
    assert LIMITS.largest_batch == 5
    # A task's company is judged against its own max_wait.
    assert next_batch(jobs(("big", 2.0)), 2.0, LIMITS, 0.05).take == ()
    assert next_batch(jobs(("a", 2.0)), 2.0, LIMITS, 0.05).take == (0,)


def test_an_infinite_clock_runs_whatever_the_oldest_task_has() -> None:
    waiting = jobs(("a", 1.0), ("b", 1.0))
    assert next_batch(waiting, float("inf"), LIMITS, BUSY) == NextBatch(take=(0,))


def test_bad_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="max_batch_size"):
        BatchLimits(0, 0.0)
    with pytest.raises(ValueError, match="max_wait_ms"):
        BatchLimits(1, float("nan"))


def test_arrival_gaps_are_a_running_average() -> None:
    gaps = ArrivalGaps()
    gaps.arrived(10.0)
    assert gaps.average_s is None
    gaps.arrived(10.4)
    assert gaps.average_s == pytest.approx(0.4)
    gaps.arrived(10.6)  # a gap of 0.2 weighs a quarter
    assert gaps.average_s == pytest.approx(0.35)
