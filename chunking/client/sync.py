"""The client for scripts without asyncio: its own event loop in a background thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

from chunking.client.client import DEFAULT_URL, Client
from chunking.client.frames import FrameEvent, FrameSource, FrameStats, FrameStream
from chunking.client.sources import Source
from chunking.messages import Result, Welcome

__all__ = ["SyncClient", "SyncFrameStream", "analyze_sync"]

_T = TypeVar("_T")


class SyncClient:
    """:class:`Client` for scripts: its own event loop in a background thread.

    ``with SyncClient(url, token=...) as client: client.analyze("photo.jpg")``; arguments are
    the :class:`Client`'s and ``analyze``'s. Callbacks run in the background thread.
    ``analyze`` may be called from several threads at once: the uploads share the socket.
    """

    def __init__(self, url: str = DEFAULT_URL, **client_options: Any) -> None:
        self._client = Client(url, **client_options)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> SyncClient:
        self.connect()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def client(self) -> Client:
        return self._client

    def connect(self) -> Welcome:
        if self._loop is None:
            loop = asyncio.new_event_loop()
            ready = threading.Event()

            def run() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(ready.set)
                loop.run_forever()

            self._thread = threading.Thread(target=run, name="pixelstream-client", daemon=True)
            self._thread.start()
            ready.wait()
            self._loop = loop
        return self._call(self._client.connect())

    def analyze(self, source: Source, **options: Any) -> Result:
        return self._call(self._client.analyze(source, **options))

    def stream_frames(self, source: FrameSource, **options: Any) -> SyncFrameStream:
        return SyncFrameStream(self, self._client.stream_frames(source, **options))

    def close(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            self._call(self._client.close())
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            loop.close()
            self._loop = self._thread = None

    def _call(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        if self._loop is None:
            coroutine.close()
            raise RuntimeError("the SyncClient is not connected (use `with SyncClient(...)`)")
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise


class SyncFrameStream:
    """:class:`FrameStream` as a plain iterator (from :meth:`SyncClient.stream_frames`)."""

    def __init__(self, owner: SyncClient, frames: FrameStream) -> None:
        self._owner = owner
        self._frames = frames

    @property
    def stats(self) -> FrameStats:
        return self._frames.stats

    def __iter__(self) -> Iterator[FrameEvent]:
        try:
            while True:
                try:
                    yield self._owner._call(self._frames.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            self.close()

    def __enter__(self) -> SyncFrameStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def stop(self) -> None:
        loop = self._owner._loop
        if loop is not None:
            loop.call_soon_threadsafe(self._frames.stop)

    def close(self) -> None:
        if self._owner._loop is not None:
            self._owner._call(self._frames.aclose())


def analyze_sync(source: Source, *, url: str = DEFAULT_URL, token: str | None = None,
                 **options: Any) -> Result:
    """One upload from a script: ``analyze_sync("photo.jpg", task="classify")``.

    Keyword arguments go to :meth:`Client.analyze` (``task``, ``options``, callbacks, ...) or,
    for the client's own (``base64``, ``retry_delays``, ...), to :class:`Client`. Not for use
    inside a running event loop.
    """
    client_keys = {"base64", "chunk_size", "retry_delays", "on_should_retry", "stall_timeout",
                   "connect_timeout", "ping_interval"}
    client_options = {k: options.pop(k) for k in list(options) if k in client_keys}

    async def one() -> Result:
        async with Client(url, token=token, **client_options) as client:
            return await client.analyze(source, **options)

    return asyncio.run(one())
