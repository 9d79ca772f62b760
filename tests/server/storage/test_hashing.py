"""server.storage.hashing: a SHA-256 computed on a thread behind the writes, in order."""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
from collections.abc import Callable
from typing import Any

import pytest

from server.storage.hashing import INLINE_BYTES, BackgroundHasher

pytestmark = pytest.mark.asyncio(loop_scope="function")


class ManualExecutor(concurrent.futures.Executor):
    """Runs what is submitted only when the test says so."""

    def __init__(self) -> None:
        self.queued: list[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = []

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
               ) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self.queued.append((lambda: fn(*args, **kwargs), future))
        return future

    def run_all(self) -> None:
        while self.queued:
            call, future = self.queued.pop(0)
            future.set_result(call())


async def test_the_digest_is_the_sha256_of_every_chunk_in_order() -> None:
    sizes = [10, 1 << 20, 5, INLINE_BYTES, INLINE_BYTES - 1, 3 << 20, 1, 700_000]
    chunks = [os.urandom(size) for size in sizes]
    with concurrent.futures.ThreadPoolExecutor(2) as executor:
        hasher = BackgroundHasher(executor)
        for chunk in chunks:
            hasher.update(chunk)
        await hasher.wait()
        assert hasher.hexdigest() == hashlib.sha256(b"".join(chunks)).hexdigest()
        assert hasher.hashed == sum(sizes)


async def test_small_chunks_queue_behind_a_large_one_being_hashed() -> None:
    executor = ManualExecutor()
    hasher = BackgroundHasher(executor)
    large, small = os.urandom(INLINE_BYTES), b"tail"
    hasher.update(large)
    hasher.update(small)  # would be hashed inline, but must not overtake the large chunk
    assert len(executor.queued) == 1  # one drain takes both, in order
    assert hasher.hashed == 0
    with pytest.raises(RuntimeError, match="before wait"):
        hasher.hexdigest()
    executor.run_all()
    await hasher.wait()
    assert hasher.hexdigest() == hashlib.sha256(large + small).hexdigest()


async def test_small_chunks_alone_are_hashed_in_the_callers_thread() -> None:
    executor = ManualExecutor()
    hasher = BackgroundHasher(executor)
    hasher.update(b"abc")
    hasher.update(memoryview(b"defg"))
    assert executor.queued == []
    await hasher.wait()
    assert hasher.hexdigest() == hashlib.sha256(b"abcdefg").hexdigest()


async def test_a_new_drain_starts_after_the_last_one_ended() -> None:
    executor = ManualExecutor()
    hasher = BackgroundHasher(executor)
    first, second = os.urandom(INLINE_BYTES), os.urandom(INLINE_BYTES + 1)
    hasher.update(first)
    executor.run_all()
    hasher.update(second)
    assert len(executor.queued) == 1
    executor.run_all()
    await hasher.wait()
    assert hasher.hexdigest() == hashlib.sha256(first + second).hexdigest()
