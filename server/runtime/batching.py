"""The batching policy: which queued jobs run together next, and when.

One pure function, :func:`next_batch`, used by the in-process pool and by ``pixelstream
worker`` alike: given the jobs waiting (oldest first), each task's limits and the clock, it
says which jobs to run now, or how long to wait for more. It reads no clock and keeps no
state, so tests drive it with plain numbers.

The rule: the oldest job goes first, with the next waiting jobs of its task, up to the task's
``max_batch_size``. A batch that is not full yet waits for company until the oldest job has
waited ``max_wait_ms``, and only while jobs have lately been arriving closer together than
that (:class:`ArrivalGaps`): a lone request, or one client's requests one after another,
would only be delayed by waiting for company that never comes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

GAP_WEIGHT = 0.25
"""Weight of the newest gap between two jobs' arrivals in the running average of gaps."""


@dataclass(frozen=True)
class BatchLimits:
    max_batch_size: int
    max_wait_s: float

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or not self.max_wait_s >= 0:
            raise ValueError("max_batch_size must be >= 1 and max_wait_ms >= 0")


@dataclass(frozen=True)
class Limits:
    """The server's limits, and per task (a tasks file's ``max_batch_size``/``max_wait_ms``)
    those that differ."""

    default: BatchLimits
    per_task: Mapping[str, BatchLimits] = field(default_factory=dict)

    def of(self, task: str) -> BatchLimits:
        return self.per_task.get(task, self.default)

    @property
    def largest_batch(self) -> int:
        return max([self.default.max_batch_size,
                    *(limits.max_batch_size for limits in self.per_task.values())])


@dataclass(frozen=True)
class Waiting:
    """A queued job as the policy sees it: its task and when it was queued (any clock, the
    same as ``now``'s)."""

    task: str
    since: float


@dataclass(frozen=True)
class NextBatch:
    """Run the jobs at positions ``take`` (indices into the waiting jobs, oldest first) now;
    or, when ``take`` is empty, ask again after ``wait_s`` seconds or as soon as another job
    arrives (``wait_s`` None: only when another job arrives)."""

    take: tuple[int, ...] = ()
    wait_s: float | None = None


def next_batch(waiting: Sequence[Waiting], now: float, limits: Limits,
               arrival_gap_s: float | None) -> NextBatch:
    """The policy (see the module's docstring). ``arrival_gap_s``: the recent average time
    between jobs' arrivals (:attr:`ArrivalGaps.average_s`; None: too few jobs yet)."""
    if not waiting:
        return NextBatch()
    task = waiting[0].task
    task_limits = limits.of(task)
    same = [index for index, job in enumerate(waiting) if job.task == task]
    take = tuple(same[: task_limits.max_batch_size])
    if len(same) >= task_limits.max_batch_size:
        return NextBatch(take)
    remaining = waiting[0].since + task_limits.max_wait_s - now
    company_likely = arrival_gap_s is not None and arrival_gap_s < task_limits.max_wait_s
    if remaining > 0 and company_likely:
        return NextBatch(wait_s=remaining)
    return NextBatch(take)


class ArrivalGaps:
    """The running average of the time between jobs' arrivals."""

    def __init__(self) -> None:
        self.average_s: float | None = None
        self._last: float | None = None

    def arrived(self, now: float) -> None:
        if self._last is not None:
            gap = now - self._last
            average = self.average_s
            self.average_s = gap if average is None else average + GAP_WEIGHT * (gap - average)
        self._last = now
