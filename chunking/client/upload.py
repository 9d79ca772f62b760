"""One upload: its attempts on one socket each, driven by the sans-I/O
:class:`~chunking.exchange.UploadExchange`, and the retries across sockets.

An :class:`Attempt` adds to its exchange what needs an event loop: the futures the upload
waits on, the stall timer (armed while the server owes a reply), the pause before resending
after a refused chunk. An :class:`UploadJob` runs attempts until one ends with a
result or the retry policy gives up; it keeps the resume token between them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from chunking.client.connection import Connection, UploadReply
from chunking.client.errors import (
    ClientClosedError,
    ConnectionLostError,
    PixelstreamError,
    UnknownUploadError,
    error_code,
    error_from_message,
)
from chunking.client.retry import Retrier
from chunking.client.sources import ImageSource
from chunking.exchange import (
    Acknowledged,
    AnnounceRefused,
    ChunkRefused,
    ExchangeEvent,
    Failed,
    Finished,
    StageReached,
    Started,
    UploadExchange,
    Withdrawn,
)
from chunking.messages import Accepted, Result, Stage

if TYPE_CHECKING:
    from chunking.client.client import Client

__all__ = ["Attempt", "ProgressCallback", "StageCallback", "UploadJob"]

log = logging.getLogger("pixelstream.client")

ProgressCallback = Callable[[int, int, int], None]
"""``on_progress(sent, acknowledged, total)``: bytes handed to the socket, and bytes the server
holds. ``sent`` goes back after a rewind or a resume; both go back to 0 when the server has
discarded the upload's bytes and it starts over."""
StageCallback = Callable[[str, dict[str, Any]], None]
"""``on_stage(stage, detail)``: see :mod:`chunking.client` for the stages and details."""

_T = TypeVar("_T")


def _settle(future: asyncio.Future[_T], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
        future.exception()  # retrieved: nobody may be awaiting it any more


class Attempt:
    """An upload's life on one socket, from ``upload`` to its outcome (or the socket's end)."""

    def __init__(self, conn: Connection, exchange: UploadExchange, job: UploadJob) -> None:
        loop = asyncio.get_running_loop()
        self.conn = conn
        self.exchange = exchange
        self.job = job
        self.accepted: asyncio.Future[Accepted] = loop.create_future()
        self.outcome: asyncio.Future[Result] = loop.create_future()
        self.paused_until = 0.0
        self._timer: asyncio.TimerHandle | None = None

    @property
    def wire_id(self) -> str:
        return self.exchange.id

    @property
    def in_flight(self) -> int:
        return self.exchange.in_flight

    # Stall detection: armed while a reply is owed, re-armed by each reply. -----------------

    def _arm(self) -> None:
        self.disarm()
        timeout = self.job.client.stall_timeout
        if timeout is not None and self.exchange.replies_owed and self.conn.error is None:
            self._timer = asyncio.get_running_loop().call_later(
                timeout, self.conn.stalled, timeout
            )

    def disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # Sending ----------------------------------------------------------------------------------

    async def announce(self) -> Accepted:
        job = self.job
        if self.accepted.done():
            self.accepted = asyncio.get_running_loop().create_future()
        was_owed = self.exchange.replies_owed
        message = self.exchange.announce(
            sha256=job.sha256, name=job.source.name, task=job.task, options=job.options,
            resume=job.token,
        )
        if not was_owed:
            self._arm()
        await self.conn.send(message)
        return await self.accepted

    async def send_all(self) -> None:
        """Send every byte the server does not hold yet, within the socket's window."""
        conn, exchange, loop = self.conn, self.exchange, asyncio.get_running_loop()
        while not exchange.all_acknowledged:
            if self.outcome.done():
                return  # an outcome before the last byte was acknowledged: a failure
            conn.check()
            wait = self.paused_until - loop.time()
            if wait > 0:
                await conn.signal.wait(wait)
                continue
            span = exchange.next_span(conn.window_free())
            if span is None:
                await conn.signal.wait()
                continue
            data = await self.job.source.read(span.offset, span.length)
            was_owed = exchange.replies_owed
            chunk = exchange.chunk(span, data)
            if chunk is None:
                continue  # rewound (or ended) while reading: the span is void
            if not was_owed:
                self._arm()
            await conn.send(chunk)
            self.job.emit_progress(exchange.sent, exchange.acknowledged)

    # Messages from the reader ----------------------------------------------------------------

    def on_message(self, message: UploadReply) -> None:
        owed = self.exchange.replies_owed
        events = self.exchange.receive(message)
        if owed:
            self._arm()  # a reply came: the stall clock starts again (if more are owed)
        for event in events:
            self._on_event(event)

    def _on_event(self, event: ExchangeEvent) -> None:
        if isinstance(event, Started):
            if not self.accepted.done():
                self.accepted.set_result(Accepted(self.wire_id, event.offset, event.resume))
        elif isinstance(event, Acknowledged):
            if event.advanced:
                self.job.acknowledged(event.acknowledged)
            self.job.emit_progress(event.sent, event.acknowledged)
            self.conn.signal.pulse()
        elif isinstance(event, StageReached):
            self.job.emit_stage(event.stage.value, event.detail)
        elif isinstance(event, AnnounceRefused):
            _settle(self.accepted, error_from_message(event.error))
            self.conn.signal.pulse()
        elif isinstance(event, ChunkRefused):
            error = error_from_message(event.error)
            delay = self.job.retrier.next_delay(error)
            if delay is None:
                self.exchange.abandon()
                self._finish(error, None)
            else:
                assert event.error.expected is not None
                self._rewind(event.error.expected, delay, error)
        elif isinstance(event, Finished):
            self._finish(None, event.result)
        elif isinstance(event, Failed):
            self._finish(error_from_message(event.error), None)
        elif isinstance(event, Withdrawn):
            self._finish(ClientClosedError("the upload was cancelled"), None)

    def _rewind(self, expected: int, delay: float, error: PixelstreamError) -> None:
        self.exchange.rewind(expected)
        self.paused_until = asyncio.get_running_loop().time() + delay
        self.job.emit_stage("retrying", {"attempt": self.job.retrier.attempt, "delay": delay,
                                         "error": error, "code": error.code.value})
        self.conn.signal.pulse()

    def _finish(self, error: BaseException | None, result: Result | None) -> None:
        self.disarm()
        if error is not None:
            _settle(self.accepted, error)
            _settle(self.outcome, error)
        elif result is not None and not self.outcome.done():
            self.outcome.set_result(result)
        self.conn.signal.pulse()

    def fail(self, error: ConnectionLostError) -> None:
        self.exchange.connection_lost()
        self._finish(error, None)


class UploadJob:
    """One ``analyze`` call's upload, across sockets: attempts until a result, or a give-up."""

    def __init__(
        self,
        client: Client,
        source: ImageSource,
        *,
        task: str | None,
        options: Mapping[str, Any],
        sha256: str | None,
        on_progress: ProgressCallback | None,
        on_stage: StageCallback | None,
    ) -> None:
        self.client = client
        self.source = source
        self.task = task
        self.options = dict(options)
        self.sha256 = sha256
        self.on_progress = on_progress
        self.on_stage = on_stage
        self.retrier = Retrier(client.retry_delays, client.on_should_retry)
        self.token: str | None = None
        self.held = 0

    # Callbacks, guarded: a failing callback is logged, never breaks the upload. --------------

    def emit_progress(self, sent: int, acknowledged: int) -> None:
        if self.on_progress is not None:
            try:
                self.on_progress(sent, acknowledged, self.source.size)
            except Exception:
                log.exception("on_progress raised")

    def emit_stage(self, stage: str, detail: dict[str, Any]) -> None:
        if self.on_stage is not None:
            try:
                self.on_stage(stage, detail)
            except Exception:
                log.exception("on_stage raised")

    def acknowledged(self, held: int) -> None:
        if held > self.held:
            self.retrier.progressed(held - self.held)
            self.held = held

    # The loop ---------------------------------------------------------------------------------

    async def run(self) -> Result:
        while True:
            try:
                return await self._attempt()
            except (PixelstreamError, ConnectionLostError) as error:
                delay = self.retrier.next_delay(error)
                if delay is None:
                    raise
                log.info("retrying upload in %.1f s after %s", delay, error_code(error))
                self.emit_stage("retrying", {"attempt": self.retrier.attempt, "delay": delay,
                                             "error": error, "code": error_code(error)})
                if delay > 0:
                    await asyncio.sleep(delay)

    async def _attempt(self) -> Result:
        client = self.client
        conn = await client._connection()
        limits = conn.limits
        chunk_size = max(1, min(client.chunk_size, limits.max_chunk_bytes, limits.window_bytes))
        exchange = UploadExchange(client._next_id(), self.source.size, chunk_size=chunk_size)
        attempt = Attempt(conn, exchange, self)
        conn.attempts[attempt.wire_id] = attempt
        slot = False
        try:
            await conn.acquire_slot()
            slot = True
            accepted = await self._announce(attempt)
            resumed = self.token is not None
            self.token = accepted.resume
            self.acknowledged(accepted.offset)
            self.emit_stage(Stage.UPLOAD.value, {"offset": accepted.offset, "resumed": resumed})
            self.emit_progress(exchange.sent, exchange.acknowledged)
            await attempt.send_all()
            conn.release_slot()
            slot = False
            result = await attempt.outcome
            self.token = None
            return result
        except PixelstreamError:
            if not exchange.live:
                self.token = None  # the server discarded it: a retry starts over
            raise
        finally:
            attempt.disarm()
            if slot:
                conn.release_slot()
            conn.attempts.pop(attempt.wire_id, None)
            conn.signal.pulse()
            cancel = exchange.cancel()
            if cancel is not None and conn.error is None:
                # Giving up (a timeout, a cancel, retries spent): free the server's bytes. Sent
                # before the call returns, so anything the caller sends next comes after it.
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(1.0):
                        await conn.send(cancel)

    async def _announce(self, attempt: Attempt) -> Accepted:
        while True:
            try:
                return await attempt.announce()
            except UnknownUploadError:
                if self.token is None:
                    raise
                self.token = None  # the server no longer holds it: start over, at once
