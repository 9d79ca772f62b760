"""The WebSocket protocol without a socket or a worker: a ServerConnection over the upload
service with a memory store, a scripted queue and a fake clock (milliseconds per test).

The same rules run through uvicorn and real workers in test_protocol_server.py."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from chunking.codec import encode_client_text
from chunking.messages import Cancel, Chunk, Upload
from server.protocol import ServerConnection
from server.state import AppState
from tests.support.service_app import FakeClock, ScriptedQueue, service_app

WAIT_S = 5.0


class Peer:
    """One connection and what it sent back, decoded."""

    def __init__(self, app: AppState, clock: FakeClock, principal: str | None = None) -> None:
        self.output = asyncio.Event()
        self.connection = ServerConnection(app, principal, "10.0.0.1", clock=clock,
                                           on_output=self.output.set)
        self.received: list[dict[str, Any]] = []

    async def send(self, message: Any) -> list[dict[str, Any]]:
        await self.connection.receive_text(encode_client_text(message))
        return self.take()

    def take(self) -> list[dict[str, Any]]:
        messages = [orjson.loads(frame) for frame in self.connection.data_to_send()]
        self.received += messages
        return messages

    async def until(self, kind: str) -> dict[str, Any]:
        """The next message of type ``kind`` (queued later, by an analysis)."""
        async with asyncio.timeout(WAIT_S):
            while True:
                for message in self.take():
                    if message["type"] == kind:
                        return message
                self.output.clear()
                if self.connection.pending == 0:
                    await self.output.wait()


@pytest.fixture
async def parts(tmp_path: Path) -> AsyncIterator[tuple[AppState, ScriptedQueue, FakeClock]]:
    state, queue = service_app(tmp_path, messages_per_second=10.0, message_burst=20)
    yield state, queue, FakeClock()
    for task in list(state.background):
        task.cancel()
    await asyncio.gather(*state.background, return_exceptions=True)
    await state.store.close()


async def test_welcome_names_the_limits_and_tasks(parts) -> None:
    app, _, clock = parts
    peer = Peer(app, clock)
    peer.connection.start()
    (welcome,) = peer.take()
    assert welcome["type"] == "welcome"
    assert welcome["limits"]["max_chunk_bytes"] == app.limits.max_chunk_bytes
    assert welcome["tasks"] == ["colors"]


async def test_an_upload_goes_through_every_stage_to_its_result(parts) -> None:
    app, queue, clock = parts
    peer = Peer(app, clock)
    data = b"x" * 1000
    (accepted,) = await peer.send(Upload(id="u1", size=len(data)))
    assert (accepted["type"], accepted["offset"]) == ("accepted", 0)
    (progress,) = await peer.send(Chunk(id="u1", offset=0, data=data[:600]))
    assert (progress["stage"], progress["received"], progress["total"]) == ("upload", 600, 1000)
    (progress,) = await peer.send(Chunk(id="u1", offset=600, data=data[600:]))
    assert progress["received"] == 1000
    assert (await peer.until("progress"))["stage"] == "queued"
    (ticket,) = queue.tickets
    queue.answer(ticket, {"colors": ["red"]})
    result = await peer.until("result")
    assert (result["id"], result["result"], result["cached"]) == ("u1", {"colors": ["red"]}, False)
    stages = [m["stage"] for m in peer.received if m["type"] == "progress"]
    assert stages == ["upload", "upload", "queued", "decoding", "inference"]
    assert not app.uploads.live  # delivered: the token names nothing now


async def test_a_wrong_offset_names_the_expected_one_and_the_upload_stays_open(parts) -> None:
    app, _, clock = parts
    peer = Peer(app, clock)
    await peer.send(Upload(id="u1", size=100))
    await peer.send(Chunk(id="u1", offset=0, data=b"a" * 10))
    (error,) = await peer.send(Chunk(id="u1", offset=50, data=b"b" * 10))
    assert (error["code"], error["expected"], error["id"]) == ("offset_mismatch", 10, "u1")
    (replay,) = await peer.send(Chunk(id="u1", offset=0, data=b"a" * 10))
    assert (replay["type"], replay["received"]) == ("progress", 10)
    (progress,) = await peer.send(Chunk(id="u1", offset=10, data=b"c" * 10))
    assert progress["received"] == 20


async def test_the_message_rate_limit_follows_the_clock(tmp_path: Path) -> None:
    app, _ = service_app(tmp_path, messages_per_second=10.0, message_burst=2)
    clock = FakeClock()
    peer = Peer(app, clock)
    assert (await peer.send(Cancel(id="a")))[0]["code"] == "unknown_upload"
    assert (await peer.send(Cancel(id="a")))[0]["code"] == "unknown_upload"
    (limited,) = await peer.send(Cancel(id="a"))
    assert (limited["code"], limited["retry_after_ms"]) == ("rate_limited", 100)
    clock.now += 0.1
    assert (await peer.send(Cancel(id="a")))[0]["code"] == "unknown_upload"
    await app.store.close()


async def test_a_resume_takes_the_upload_from_the_older_connection(parts) -> None:
    app, _, clock = parts
    first, second = Peer(app, clock), Peer(app, clock)
    (accepted,) = await first.send(Upload(id="u1", size=30))
    await first.send(Chunk(id="u1", offset=0, data=b"a" * 10))
    (resumed,) = await second.send(Upload(id="r", size=30, resume=accepted["resume"]))
    assert (resumed["id"], resumed["offset"]) == ("r", 10)
    (error,) = await first.send(Chunk(id="u1", offset=10, data=b"b" * 10))
    assert error["code"] == "unknown_upload"
    (progress,) = await second.send(Chunk(id="r", offset=10, data=b"b" * 10))
    assert progress["received"] == 20


async def test_a_resume_needs_the_same_size_and_principal(parts) -> None:
    app, _, clock = parts
    owner = Peer(app, clock, principal="alice")
    (accepted,) = await owner.send(Upload(id="u1", size=30))
    (error,) = await Peer(app, clock, principal="bob").send(
        Upload(id="u1", size=30, resume=accepted["resume"]))
    assert error["code"] == "unknown_upload"
    (error,) = await Peer(app, clock, principal="alice").send(
        Upload(id="u1", size=31, resume=accepted["resume"]))
    assert error["code"] == "bad_message"


async def test_an_outcome_reached_while_disconnected_waits_for_the_resume(parts) -> None:
    app, queue, clock = parts
    first = Peer(app, clock)
    (accepted,) = await first.send(Upload(id="u1", size=4))
    await first.send(Chunk(id="u1", offset=0, data=b"abcd"))
    await first.until("progress")  # queued
    first.connection.close()
    queue.answer(queue.tickets[0])
    live = app.uploads.live[accepted["resume"]]
    async with asyncio.timeout(WAIT_S):
        while live.undelivered is None:
            await live.changed().wait()
    second = Peer(app, clock)
    messages = await second.send(Upload(id="again", size=4, resume=accepted["resume"]))
    assert [m["type"] for m in messages] == ["accepted", "result"]
    assert messages[1]["id"] == "again"
    assert accepted["resume"] not in app.uploads.live


async def test_cancel_after_the_last_byte_withdraws_the_job(parts) -> None:
    app, queue, clock = parts
    peer = Peer(app, clock)
    (accepted,) = await peer.send(Upload(id="u1", size=4))
    live = app.uploads.live[accepted["resume"]]
    await peer.send(Chunk(id="u1", offset=0, data=b"abcd"))
    await peer.until("progress")  # queued: the job exists
    (cancelled,) = await peer.send(Cancel(id="u1"))
    assert cancelled == {"type": "cancelled", "id": "u1"}
    await asyncio.gather(live.analysis, return_exceptions=True)
    assert queue.withdrawn == [queue.tickets[0].job.job_id]
    assert app.budget.held == 0


async def test_a_checksum_mismatch_discards_the_upload(parts) -> None:
    app, _, clock = parts
    peer = Peer(app, clock)
    await peer.send(Upload(id="u1", size=4, sha256=hashlib.sha256(b"other").hexdigest()))
    progress, error = await peer.send(Chunk(id="u1", offset=0, data=b"abcd"))
    assert (progress["received"], error["code"]) == (4, "checksum_mismatch")
    assert not app.uploads.live
    assert app.budget.held == 0


async def test_a_known_checksum_is_answered_from_the_cache_without_bytes(parts) -> None:
    app, queue, clock = parts
    data = b"abcd"
    peer = Peer(app, clock)
    await peer.send(Upload(id="u1", size=4))
    await peer.send(Chunk(id="u1", offset=0, data=data))
    await peer.until("progress")
    queue.answer(queue.tickets[0], {"colors": ["blue"]})
    await peer.until("result")
    accepted, result = await peer.send(
        Upload(id="u2", size=4, sha256=hashlib.sha256(data).hexdigest()))
    assert (accepted["offset"], result["cached"]) == (4, True)
    assert result["result"] == {"colors": ["blue"]}
    assert len(queue.tickets) == 1


async def test_frames_are_taken_in_order_at_most_limit_at_a_time(parts) -> None:
    """The sender takes a frame at a time, so what a slow peer has not taken stays pending."""
    state, _, clock = parts
    peer = Peer(state, clock)
    peer.connection.start()
    for _ in range(3):
        await peer.connection.receive_text("not json")
    assert peer.connection.pending == 4  # welcome, then one error per message
    first = peer.connection.data_to_send(limit=1)
    assert [orjson.loads(frame)["type"] for frame in first] == ["welcome"]
    assert peer.connection.pending == 3
    rest = peer.connection.data_to_send(limit=10)
    assert [orjson.loads(frame)["code"] for frame in rest] == ["bad_message"] * 3
    assert peer.connection.pending == 0
    assert peer.connection.data_to_send(limit=1) == []
