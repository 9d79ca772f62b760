"""Worker processes kept running: started, replaced when one exits, stopped together.

One :class:`Supervisor` serves the in-process pool (whose workers talk over pipes; the pool
notices an exit when a pipe closes and asks for a replacement with :meth:`Supervisor.spawn`)
and ``pixelstream worker`` / the gateway's own stream workers (:meth:`Supervisor.watch`
notices exits by the processes' sentinels).

Workers ignore SIGINT and SIGTERM (:func:`ignore_stop_signals`): a Ctrl-C or a service
manager's SIGTERM goes to the whole process group, and a worker killed mid-batch would lose
its jobs; the process that owns them decides when they stop: a message on their pipe (the
pool), or :data:`STOP_SIGNAL` (:meth:`Supervisor.stop`; a worker handles it with
:func:`on_stop_request` and ends after its batch). A signal, not a shared
``multiprocessing.Event``: setting one of those hangs when a process that waited on it was
killed. Once stopping begins (:meth:`Supervisor.begin_stop`), nothing is replaced.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import time
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from typing import Any

log = logging.getLogger("pixelstream.supervisor")

STOP_SIGNAL = signal.SIGUSR1
"""What :meth:`Supervisor.stop` sends a worker to ask it to end after its current batch."""


def ignore_stop_signals() -> None:
    """In a worker: leave SIGINT and SIGTERM to the process that supervises it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def on_stop_request(stop: Callable[[], None]) -> None:
    """In a worker (main thread): call ``stop`` when the supervisor asks it to end."""
    signal.signal(STOP_SIGNAL, lambda *_: stop())


class Supervisor:
    """``count`` worker processes, one per slot, each running ``target(*args)``.

    ``args_for(slot)`` gives a slot's arguments (a worker's tasks may depend on its slot)."""

    def __init__(self, target: Callable[..., None], count: int, *, name: str,
                 args_for: Callable[[int], tuple[Any, ...]] = lambda slot: ()) -> None:
        self._context = multiprocessing.get_context("spawn")  # never fork: threads, a loop
        self.target = target
        self.count = count
        self.name = name
        self.args_for = args_for
        self.processes: list[BaseProcess | None] = [None] * count
        self.stopping = False
        self.restarts = 0
        # At interpreter exit, multiprocessing terminates (SIGTERM) then joins its children:
        # workers ignore SIGTERM, so any left running are killed first (atexit runs this
        # before multiprocessing's own handler, registered earlier).
        atexit.register(self._kill_leftovers)

    @property
    def context(self) -> Any:
        return self._context

    def start(self) -> None:
        for slot in range(self.count):
            self.spawn(slot)

    def spawn(self, slot: int, *args: Any) -> BaseProcess | None:
        """Start slot's worker (again) with ``args`` before the slot's own; None once
        stopping began."""
        if self.stopping:
            return None
        process = self._context.Process(
            target=self.target, args=(*args, *self.args_for(slot)),
            name=self.name, daemon=True)
        process.start()
        if self.processes[slot] is not None:
            self.restarts += 1
        self.processes[slot] = process
        return process

    def slot_of(self, process: BaseProcess) -> int:
        return self.processes.index(process)

    def watch(self, timeout_s: float) -> list[int]:
        """Wait up to ``timeout_s`` for a worker to exit; replace every one that did (unless
        stopping). The slots replaced."""
        alive = [p for p in self.processes if p is not None]
        multiprocessing.connection.wait([p.sentinel for p in alive], timeout_s)
        replaced: list[int] = []
        for slot, process in enumerate(self.processes):
            if process is not None and not process.is_alive() and not self.stopping:
                log.error("worker %s exited (%s); starting another", process.pid,
                          process.exitcode)
                self.spawn(slot)
                replaced.append(slot)
        return replaced

    def begin_stop(self) -> None:
        """From now on nothing is replaced."""
        self.stopping = True

    def _kill_leftovers(self) -> None:
        self.stopping = True
        for process in self.processes:
            if process is not None and process.is_alive():
                process.kill()
                process.join(5)

    def stop(self, grace_s: float = 30.0) -> None:
        """Stop every worker: each ends its current batch, or is killed after ``grace_s``."""
        self.begin_stop()
        for process in self.processes:
            if process is not None and process.pid is not None and process.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, STOP_SIGNAL)
        deadline = time.monotonic() + grace_s
        for process in self.processes:
            if process is not None:
                process.join(max(0.0, deadline - time.monotonic()))
        for process in self.processes:
            if process is not None and process.is_alive():
                log.warning("worker %s did not stop in %g s; killing it", process.pid, grace_s)
                process.kill()
                process.join(5)
