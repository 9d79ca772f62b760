"""The batching policy: which queued jobs run together next, and when.

One pure function, :func:`next_batch`, used by the in-process pool and by ``pixelstream
worker`` alike: given the jobs waiting (oldest first), each task's limits and the clock, it
says which jobs to run now, or how long to wait for more. It reads no clock and keeps no
state, so tests drive it with plain numbers.

The rule: the job with the fewest jobs of its own analysis served before it goes first (a
whole image: none; a tile: its index among the image's tiles), the oldest among equals, with
the next waiting jobs of its task in that order, up to the task's ``max_batch_size``. So one
client's image never waits behind the hundreds of tiles of another's huge image: those tiles
yield to it, and a tiled analysis takes whatever capacity the whole images leave (least
attained service first, as schedulers do for jobs of unknown length).

A batch that is not full yet waits for company until its oldest job has waited
``max_wait_ms``, and only while jobs have lately been arriving closer together than that
(:class:`ArrivalGaps`): a lone request, or one client's requests one after another, would
only be delayed by waiting for company that never comes.
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
    """A queued job as the policy sees it: its task, when it was queued (any clock, the same
    as ``now``'s) and its ``rank``: how many jobs of its analysis come before it (a tile's
    index; 0 for a whole image)."""

    task: str
    since: float
    rank: int = 0


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
    # Fewest predecessors in its analysis first; the waiting list's own order (oldest first)
    # among equals.
    order = sorted(range(len(waiting)), key=lambda index: waiting[index].rank)
    first = waiting[order[0]]
    task_limits = limits.of(first.task)
    same = [index for index in order if waiting[index].task == first.task]
    take = tuple(same[: task_limits.max_batch_size])
    if len(same) >= task_limits.max_batch_size:
        return NextBatch(take)
    remaining = min(waiting[index].since for index in same) + task_limits.max_wait_s - now
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
