"""The supervisor: start, replace a worker that exits, stop; workers ignore SIGTERM and
nothing is replaced once stopping has begun."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from multiprocessing.synchronize import Event

import pytest

from server.runtime.supervisor import Supervisor
from tests.support.idle_worker import wait_for_stop

WAIT_S = 30.0


STARTED: list[Event] = []
"""Per slot, set by the slot's worker once it runs."""


@pytest.fixture
def supervisor() -> Iterator[Supervisor]:
    made = Supervisor(wait_for_stop, 2, name="test-worker", args_for=lambda slot: (STARTED[slot],))
    STARTED[:] = [made.context.Event() for _ in range(2)]
    made.start()
    for event in STARTED:
        assert event.wait(WAIT_S)
    yield made
    made.stop(grace_s=WAIT_S)


def test_workers_ignore_sigterm_and_end_when_the_supervisor_stops_them(
        supervisor: Supervisor) -> None:
    processes = list(supervisor.processes)
    for process in processes:
        assert process is not None
        assert process.pid is not None
        os.kill(process.pid, signal.SIGTERM)
    # Still there: a replacement would not be needed, and none is made.
    assert supervisor.watch(0.2) == []
    assert all(p is not None and p.is_alive() for p in processes)
    supervisor.stop(grace_s=WAIT_S)
    assert [p.exitcode for p in processes if p is not None] == [0, 0]  # ended, not killed
    assert supervisor.restarts == 0


def test_a_worker_that_dies_is_replaced_in_its_slot(supervisor: Supervisor) -> None:
    victim = supervisor.processes[1]
    assert victim is not None
    victim.kill()
    victim.join(WAIT_S)
    STARTED[1].clear()
    assert supervisor.watch(WAIT_S) == [1]
    assert STARTED[1].wait(WAIT_S)
    replacement = supervisor.processes[1]
    assert replacement is not None
    assert replacement is not victim
    assert replacement.is_alive()
    assert supervisor.restarts == 1


def test_nothing_is_replaced_once_stopping_began(supervisor: Supervisor) -> None:
    victim = supervisor.processes[0]
    assert victim is not None
    supervisor.begin_stop()
    victim.kill()
    victim.join(WAIT_S)
    assert supervisor.watch(0.0) == []
    assert supervisor.spawn(0) is None
    assert supervisor.processes[0] is victim
    assert supervisor.restarts == 0
