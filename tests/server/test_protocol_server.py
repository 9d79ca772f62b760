"""The WebSocket protocol, rule by rule, through a real socket to a real server."""

from __future__ import annotations

import asyncio
import hashlib
import struct
import zlib
from typing import Any

import pytest

from server.auth import principal_of
from tests.conftest import make_image, unique_image

pytestmark = pytest.mark.asyncio(loop_scope="function")



def is_outcome(upload_id: str) -> Any:
    return lambda m: m.get("id") == upload_id and m["type"] in ("result", "error", "cancelled")


async def test_welcome_announces_limits_and_tasks(colors_server, open_client) -> None:
    async with open_client(colors_server.ws_url) as client:
        welcome = client.welcome
    assert welcome["protocol"] == 1
    assert welcome["session"]
    assert welcome["limits"] == colors_server.settings.limits.to_dict()
    assert welcome["tasks"] == ["colors", "gate"]
    assert welcome["default_task"] == "colors"


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "base64"])
async def test_upload_goes_through_every_stage_in_order(colors_server, open_client,
                                                        binary: bool) -> None:
    data = make_image(400, 300, "PNG", seed=2 if binary else 3)
    async with open_client(colors_server.ws_url) as client:
        accepted = await client.send_upload("u1", data, chunk_size=10_000, binary=binary,
                                            name="x.png", options={"colors": 3})
        messages = await client.messages_until(is_outcome("u1"))
    assert accepted["offset"] == 0
    assert accepted["resume"]
    uploads = [m for m in messages if m.get("stage") == "upload"]
    assert [m["received"] for m in uploads] == [
        min(len(data), offset + 10_000) for offset in range(0, len(data), 10_000)
    ]
    assert all(m["total"] == len(data) for m in uploads)
    stages = [m["stage"] for m in messages if m["type"] == "progress" and m["stage"] != "upload"]
    assert stages[0] == "queued"
    assert stages[-2:] == ["decoding", "inference"]
    queued = [m for m in messages if m.get("stage") == "queued"]
    assert queued[0]["position"] >= 1
    result = messages[-1]
    assert result["type"] == "result"
    assert result["task"] == "colors"
    assert result["cached"] is False
    assert result["image"] == {"width": 400, "height": 300, "format": "PNG"}
    assert len(result["result"]["colors"]) <= 3
    assert set(result["timings_ms"]) >= {"upload", "queue", "decode", "inference"}
    assert result["model"] == "pixelstream/median-cut-palette"


async def test_chunk_below_the_offset_is_acknowledged_with_the_true_offset(
    colors_server, open_client
) -> None:
    image = unique_image(320, 240)
    async with open_client(colors_server.ws_url) as client:
        await client.upload("u1", len(image))
        await client.expect("accepted", id="u1")
        await client.chunk("u1", 0, image[:5000])
        await client.expect("progress", id="u1", received=5000)
        await client.chunk("u1", 1000, image[1000:3000])  # a replay
        replay = await client.expect("progress", id="u1")
        assert replay["received"] == 5000
        await client.chunk("u1", 5000, image[5000:])
        result = await client.outcome("u1")
    assert result["type"] == "result"


@pytest.mark.parametrize(
    ("offset", "length", "expected_code"),
    [(6000, 10, "offset_mismatch"), (4000, 2000, "offset_mismatch")],
    ids=["gap", "partial overlap"],
)
async def test_out_of_order_chunks_get_offset_mismatch_and_the_upload_stays_open(
    colors_server, open_client, offset: int, length: int, expected_code: str
) -> None:
    image = unique_image(320, 240)
    async with open_client(colors_server.ws_url) as client:
        await client.upload("u1", len(image))
        await client.expect("accepted", id="u1")
        await client.chunk("u1", 0, image[:5000])
        await client.chunk("u1", offset, image[offset : offset + length])
        error = await client.expect("error", id="u1")
        assert error["code"] == expected_code
        assert error["expected"] == 5000
        await client.chunk("u1", 5000, image[5000:])  # the client rewinds
        assert (await client.outcome("u1"))["type"] == "result"


async def test_chunk_past_the_declared_size_is_refused(colors_server, open_client) -> None:
    async with open_client(colors_server.ws_url) as client:
        await client.upload("u1", 100)
        await client.expect("accepted", id="u1")
        await client.chunk("u1", 0, b"x" * 101)
        error = await client.expect("error", id="u1")
    assert (error["code"], error["expected"]) == ("offset_mismatch", 0)


async def test_oversized_chunk_and_bad_base64_are_refused_without_closing(
    colors_server, open_client
) -> None:
    image = unique_image(320, 240)
    limit = colors_server.settings.max_chunk_bytes
    async with open_client(colors_server.ws_url) as client:
        await client.upload("u1", len(image))
        await client.expect("accepted", id="u1")
        await client.chunk("u1", 0, image[:1000])
        await client.expect("progress", id="u1", received=1000)
        await client.chunk("u1", 1000, b"x" * (limit + 1))
        error = await client.expect("error", id="u1")
        assert (error["code"], error["expected"]) == ("too_large", 1000)
        await client.chunk("u1", 1000, b"x" * (limit + 1), binary=False)
        error = await client.expect("error", id="u1")
        assert (error["code"], error["expected"]) == ("too_large", 1000)
        await client.send({"type": "chunk", "id": "u1", "offset": 1000, "data": "not base64!"})
        error = await client.expect("error", id="u1")
        assert (error["code"], error["expected"]) == ("bad_base64", 1000)
        await client.chunk("u1", 1000, image[1000:], binary=False)
        assert (await client.outcome("u1"))["type"] == "result"


async def test_upload_over_max_image_bytes_is_refused_before_anything_is_held(
    colors_server, open_client
) -> None:
    held = len(colors_server.state.store)
    async with open_client(colors_server.ws_url) as client:
        await client.upload("big", colors_server.settings.max_image_bytes + 1)
        error = await client.expect("error", id="big")
    assert error["code"] == "too_large"
    assert len(colors_server.state.store) == held


async def test_duplicate_and_unknown_ids(colors_server, open_client) -> None:
    async with open_client(colors_server.ws_url) as client:
        await client.upload("u1", 10)
        await client.expect("accepted", id="u1")
        await client.upload("u1", 10)
        assert (await client.expect("error", id="u1"))["code"] == "duplicate_upload"
        await client.chunk("nope", 0, b"abc")
        assert (await client.expect("error", id="nope"))["code"] == "unknown_upload"
        await client.send({"type": "cancel", "id": "nope"})
        assert (await client.expect("error", id="nope"))["code"] == "unknown_upload"
        await client.send({"type": "cancel", "id": "u1"})
        await client.expect("cancelled", id="u1")


async def test_too_many_uploads_counts_only_uploads_still_receiving(
    colors_server, open_client
) -> None:
    limit = colors_server.settings.max_uploads
    async with open_client(colors_server.ws_url) as client:
        for n in range(limit):
            await client.upload(f"u{n}", 1000)
            await client.expect("accepted", id=f"u{n}")
        await client.upload("extra", 1000)
        assert (await client.expect("error", id="extra"))["code"] == "too_many_uploads"
        await client.send({"type": "cancel", "id": "u0"})
        await client.expect("cancelled", id="u0")
        await client.send_upload("extra", unique_image(320, 240))
        assert (await client.outcome("extra"))["type"] == "result"


async def test_unknown_task_and_bad_options(colors_server, open_client) -> None:
    async with open_client(colors_server.ws_url) as client:
        await client.upload("u1", 10, task="segment")
        error = await client.expect("error", id="u1")
        assert error["code"] == "unknown_task"
        await client.upload("u2", 10, options={"colors": 99})
        assert (await client.expect("error", id="u2"))["code"] == "bad_message"
        await client.upload("u3", 10, options={"flavour": 1})
        assert (await client.expect("error", id="u3"))["code"] == "bad_message"


async def test_checksum_mismatch_discards_the_upload(colors_server, open_client) -> None:
    image = unique_image(320, 240)
    async with open_client(colors_server.ws_url) as client:
        await client.send_upload("u1", unique_image(320, 240), sha256="0" * 64)
        error = await client.outcome("u1")
        assert error["code"] == "checksum_mismatch"
        await client.chunk("u1", 0, image[:10])
        assert (await client.expect("error", id="u1"))["code"] == "unknown_upload"


async def test_matching_checksum_is_accepted(colors_server, open_client) -> None:
    data = make_image(50, 50, seed=77)
    async with open_client(colors_server.ws_url) as client:
        await client.send_upload("u1", data, sha256=hashlib.sha256(data).hexdigest().upper())
        assert (await client.outcome("u1"))["type"] == "result"


@pytest.mark.parametrize(
    "payload",
    [b"this is not an image at all" * 10, make_image(320, 240, seed=4)[:3000]],
    ids=["text", "truncated png"],
)
async def test_bytes_that_are_not_a_whole_image_are_invalid_image(
    colors_server, open_client, payload: bytes
) -> None:
    async with open_client(colors_server.ws_url) as client:
        await client.send_upload("u1", payload)
        error = await client.outcome("u1")
    assert error["type"] == "error"
    assert error["code"] == "invalid_image"


def png_claiming(width: int, height: int) -> bytes:
    """A real 1x1 PNG whose header claims other dimensions (a decompression bomb's shape)."""
    data = bytearray(make_image(1, 1, "PNG"))
    ihdr = 8 + 8  # signature, then length + "IHDR"
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13]))
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


async def test_decompression_bomb_is_too_many_pixels(colors_server, open_client) -> None:
    async with open_client(colors_server.ws_url) as client:
        await client.send_upload("bomb", png_claiming(60_000, 60_000))
        error = await client.outcome("bomb")
    assert error["code"] == "too_many_pixels"


async def test_cancel_while_receiving_frees_the_bytes(colors_server, open_client) -> None:
    image = unique_image(320, 240)
    store = colors_server.state.store
    async with open_client(colors_server.ws_url) as client:
        await client.upload("u1", len(image))
        accepted = await client.expect("accepted", id="u1")
        await client.chunk("u1", 0, image[:1000])
        await client.expect("progress", id="u1")
        await client.send({"type": "cancel", "id": "u1"})
        await client.expect("cancelled", id="u1")
        await client.chunk("u1", 1000, image[1000:2000])
        assert (await client.expect("error", id="u1"))["code"] == "unknown_upload"
    assert accepted["resume"] not in colors_server.state.live
    assert all(h.meta.upload_id != "u1" or h.token != accepted["resume"]
               for h in store._uploads.values())


async def test_cancel_after_the_last_byte_suppresses_the_result(
    colors_server, open_client, gate
) -> None:
    pool = colors_server.state.service.pool
    async with open_client(colors_server.ws_url) as client:
        with gate.closed():
            await client.send_upload("block", unique_image(320, 240), task="gate")
            await client.expect("progress", id="block", stage="decoding")
            await client.send_upload("u1", unique_image(320, 240))
            await client.expect("progress", id="u1", stage="queued")
            assert pool.depth == 1
            await client.send({"type": "cancel", "id": "u1"})
            await client.expect("cancelled", id="u1")
            assert pool.depth == 0
        await client.outcome("block")
        # Nothing more about u1 may arrive: a later upload's result is the next thing we see.
        await client.send_upload("after", make_image(20, 20, seed=6))
        seen = await client.messages_until(is_outcome("after"))
    assert not [m for m in seen + client.inbox
                if m.get("id") == "u1" and m["type"] in ("result", "error")]


async def test_queue_positions_count_down_to_one(colors_server, open_client, gate) -> None:
    async with open_client(colors_server.ws_url) as client:
        with gate.closed():
            await client.send_upload("block", unique_image(320, 240), task="gate")
            await client.expect("progress", id="block", stage="decoding")
            for n in range(3):
                await client.send_upload(f"q{n}", make_image(30, 30 + n, seed=300 + n),
                                         task="gate")
                first = await client.expect("progress", id=f"q{n}", stage="queued")
                assert first["position"] == n + 1
        messages = await client.messages_until(is_outcome("q2"))
    positions = [m["position"] for m in client.inbox + messages
                 if m.get("id") == "q2" and m.get("stage") == "queued"]
    assert positions == sorted(positions, reverse=True)


async def test_resume_on_a_new_socket_continues_from_the_server_offset(
    colors_server, open_client
) -> None:
    data = make_image(300, 300, "PNG", seed=9)
    digest = hashlib.sha256(data).hexdigest()
    async with open_client(colors_server.ws_url) as first:
        await first.upload("u1", len(data), sha256=digest, options={"colors": 2})
        token = (await first.expect("accepted", id="u1"))["resume"]
        await first.chunk("u1", 0, data[:20_000])
        await first.expect("progress", id="u1", received=20_000)
        # A second socket takes over while the first still looks open (half-open connection).
        async with open_client(colors_server.ws_url) as second:
            await second.upload("again", len(data), sha256=digest, resume=token)
            accepted = await second.expect("accepted", id="again")
            assert accepted["offset"] == 20_000
            assert accepted["resume"] == token
            await first.chunk("u1", 20_000, data[20_000:30_000])
            assert (await first.expect("error", id="u1"))["code"] == "unknown_upload"
            await second.chunk("again", 0, data[:20_000])  # a replay is harmless
            await second.expect("progress", id="again", received=20_000)
            for offset in range(20_000, len(data), 50_000):
                await second.chunk("again", offset, data[offset : offset + 50_000])
            result = await second.outcome("again")
    assert result["type"] == "result"
    assert len(result["result"]["colors"]) <= 2  # the original upload's options


async def test_resume_must_match_size_and_checksum(colors_server, open_client) -> None:
    async with open_client(colors_server.ws_url) as client:
        await client.upload("u1", 500)
        token = (await client.expect("accepted", id="u1"))["resume"]
        await client.upload("u2", 501, resume=token)
        assert (await client.expect("error", id="u2"))["code"] == "bad_message"
        await client.upload("u3", 500, resume="no-such-token")
        assert (await client.expect("error", id="u3"))["code"] == "unknown_upload"


async def test_result_that_arrives_while_disconnected_is_delivered_on_resume(
    colors_server, open_client, gate
) -> None:
    data = make_image(200, 200, "PNG", seed=10)
    async with open_client(colors_server.ws_url) as holder:
        with gate.closed():
            await holder.send_upload("block", unique_image(320, 240), task="gate")
            await holder.expect("progress", id="block", stage="decoding")
            async with open_client(colors_server.ws_url) as client:
                token = (await client.send_upload("u1", data))["resume"]
                await client.expect("progress", id="u1", stage="queued")
            # The socket is gone while its upload waits in the queue.
        await holder.outcome("block")
    async with open_client(colors_server.ws_url) as client:
        await client.upload("r", len(data), resume=token)
        accepted = await client.expect("accepted", id="r")
        assert accepted["offset"] == len(data)
        outcome = await client.outcome("r")
    assert outcome["type"] == "result"
    assert outcome["image"]["width"] == 200
    assert token not in colors_server.state.live


async def test_cached_result_by_declared_checksum_needs_no_chunks(
    colors_server, open_client
) -> None:
    data = make_image(120, 80, "JPEG", seed=11)
    digest = hashlib.sha256(data).hexdigest()
    async with open_client(colors_server.ws_url) as client:
        await client.send_upload("first", data, sha256=digest)
        first = await client.outcome("first")
        assert first["cached"] is False
        await client.upload("second", len(data), sha256=digest)
        accepted = await client.expect("accepted", id="second")
        assert accepted["offset"] == len(data)
        second = await client.outcome("second")
        # Without a declared checksum the server hashes the bytes and still finds it.
        await client.send_upload("third", data)
        third = await client.outcome("third")
    assert second["cached"] is True
    assert third["cached"] is True
    assert second["result"] == first["result"] == third["result"]
    assert second["image"] == first["image"]


async def test_different_options_are_not_a_cache_hit(colors_server, open_client) -> None:
    data = make_image(90, 90, seed=12)
    async with open_client(colors_server.ws_url) as client:
        await client.send_upload("a", data, options={"colors": 2})
        await client.send_upload("b", data, options={"colors": 4})
        a, b = await client.outcome("a"), await client.outcome("b")
    assert b["cached"] is False
    assert len(a["result"]["colors"]) <= 2


async def test_malformed_messages_never_close_the_socket(colors_server, open_client) -> None:
    bad: list[str | bytes] = [
        "not json", "[]", '"x"', "{}", '{"type": "nope"}', '{"type": "upload"}',
        '{"type": "upload", "id": "../x", "size": 1}', '{"type": "upload", "id": "a", "size": -1}',
        '{"type": "chunk", "id": "a", "offset": -5, "data": ""}', b"", b"\x00",
        b"\x00\x05{}{}{}", b"\xff\xff", '{"type": "frame", "stream": "c", "seq": "1"}',
    ]
    async with open_client(colors_server.ws_url) as client:
        for message in bad:
            await client.send_raw(message)
            error = await client.next()
            assert error["type"] == "error", message
            assert error["code"] == "bad_message", message
        await client.send_upload("ok", unique_image(320, 240))
        assert (await client.outcome("ok"))["type"] == "result"


async def test_an_error_on_one_upload_does_not_disturb_the_others(colors_server, open_client
                                                                  ) -> None:
    good = make_image(256, 256, seed=13)
    async with open_client(colors_server.ws_url) as client, \
            open_client(colors_server.ws_url) as other:
        await client.upload("good", len(good))
        await client.expect("accepted", id="good")
        await other.upload("good", len(good))
        await other.expect("accepted", id="good")
        await client.send_upload("bad", b"garbage" * 100)
        await client.chunk("good", 0, good[:1000])
        await client.chunk("good", 5000, good[5000:6000])  # an error for "good" too
        await client.expect("error", id="good")
        await client.chunk("good", 1000, good[1000:])
        await other.chunk("good", 0, good)
        outcomes = {m["id"]: m for m in [await client.outcome("bad"), await client.outcome("good")]}
        assert outcomes["bad"]["code"] == "invalid_image"
        assert outcomes["good"]["type"] == "result"
        assert (await other.outcome("good"))["type"] == "result"


async def test_sixteen_sockets_upload_at_once_binary_and_base64(colors_server, open_client
                                                                ) -> None:
    images = [make_image(200 + n, 150, "PNG", seed=100 + n) for n in range(16)]

    async def one(n: int) -> dict[str, Any]:
        async with open_client(colors_server.ws_url) as client:
            await client.send_upload(f"u{n}", images[n], chunk_size=7_000, binary=n % 2 == 0)
            return await client.outcome(f"u{n}")

    results = await asyncio.gather(*(one(n) for n in range(16)))
    for n, result in enumerate(results):
        assert result["type"] == "result", result
        assert result["image"]["width"] == 200 + n


async def test_one_socket_carries_several_uploads_interleaved(colors_server, open_client) -> None:
    images = {f"u{n}": make_image(100, 100 + n, seed=200 + n) for n in range(3)}
    async with open_client(colors_server.ws_url) as client:
        for upload_id, data in images.items():
            await client.upload(upload_id, len(data))
            await client.expect("accepted", id=upload_id)
        for offset in range(0, max(map(len, images.values())), 3000):
            for upload_id, data in images.items():
                if offset < len(data):
                    await client.chunk(upload_id, offset, data[offset : offset + 3000])
        results = {uid: await client.outcome(uid) for uid in images}
    assert {uid: r["image"]["height"] for uid, r in results.items()} == {
        "u0": 100, "u1": 101, "u2": 102
    }


# Camera frames ----------------------------------------------------------------------------------


async def test_frames_get_results_with_stream_and_seq(colors_server, open_client) -> None:
    frame = make_image(64, 48, "JPEG", seed=20)
    async with open_client(colors_server.ws_url) as client:
        await client.frame("cam0", 1, frame)
        result = await client.expect("result", stream="cam0", seq=1)
        await client.frame("cam0", 2, make_image(64, 48, "JPEG", seed=21), binary=False)
        second = await client.expect("result", stream="cam0", seq=2)
    assert result["image"]["format"] == "JPEG"
    assert "id" not in result
    assert second["cached"] is False


async def test_latest_frame_wins_and_superseded_frames_are_dropped(
    colors_server, open_client, gate
) -> None:
    frames = [make_image(64, 48, "JPEG", seed=30 + n) for n in range(10)]
    async with open_client(colors_server.ws_url) as client:
        with gate.closed():
            await client.frame("cam0", 1, frames[0], task="gate")
            for seq, frame in enumerate(frames[1:], start=2):
                await client.frame("cam0", seq, frame, task="gate")
            # 1 runs (held at the gate), 10 waits, 2..9 were each replaced by the next.
            dropped = [await client.expect("dropped", stream="cam0", seq=seq)
                       for seq in range(2, 10)]
        first = await client.expect("result", stream="cam0", seq=1)
        last = await client.expect("result", stream="cam0", seq=10)
    assert all(m["reason"] == "superseded" for m in dropped)
    assert first["task"] == last["task"] == "gate"
    assert not [m for m in client.inbox if m.get("stream") == "cam0"]


async def test_frame_seq_must_grow(colors_server, open_client) -> None:
    frame = make_image(32, 32, "PNG", seed=40)
    async with open_client(colors_server.ws_url) as client:
        await client.frame("cam0", 5, frame)
        await client.expect("result", stream="cam0", seq=5)
        await client.frame("cam0", 5, frame)
        error = await client.expect("error", stream="cam0")
    assert (error["code"], error["seq"]) == ("bad_message", 5)


async def test_frame_that_is_not_an_image(colors_server, open_client) -> None:
    async with open_client(colors_server.ws_url) as client:
        await client.frame("cam0", 1, b"garbage")
        error = await client.expect("error", stream="cam0", seq=1)
    assert error["code"] == "invalid_image"


# Limits that need their own server ---------------------------------------------------------------


async def test_rate_limit_answers_with_retry_after(server_factory, open_client) -> None:
    server = server_factory(messages_per_second=5.0, message_burst=5)
    async with open_client(server.ws_url) as client:
        for _ in range(8):
            await client.send({"type": "cancel", "id": "x"})
        codes = [(await client.next()) for _ in range(8)]
    limited = [m for m in codes if m["code"] == "rate_limited"]
    assert len(limited) >= 2
    assert all(m["retry_after_ms"] > 0 for m in limited)
    assert codes[0]["code"] == "unknown_upload"


async def test_busy_when_the_queue_is_full(server_factory, open_client, gate) -> None:
    server = server_factory(max_queue=1, max_batch_size=1)
    async with open_client(server.ws_url) as client:
        with gate.closed():
            await client.send_upload("run", unique_image(320, 240), task="gate")
            await client.expect("progress", id="run", stage="decoding")
            await client.send_upload("wait", unique_image(320, 240))
            await client.expect("progress", id="wait", stage="queued")
            await client.upload("refused", 100)
            error = await client.expect("error", id="refused")
            assert error["code"] == "busy"
            assert error["retry_after_ms"] > 0
            await client.frame("cam", 1, unique_image(320, 240))
            assert (await client.expect("error", stream="cam"))["code"] == "busy"
        assert (await client.outcome("wait"))["type"] == "result"


async def test_idle_partial_uploads_expire(server_factory, open_client) -> None:
    server = server_factory(upload_idle_timeout_s=0.3)
    async with open_client(server.ws_url) as client:
        await client.upload("slow", 1000)
        token = (await client.expect("accepted", id="slow"))["resume"]
        await client.chunk("slow", 0, b"x" * 10)
        error = await client.expect("error", id="slow")
        assert error["code"] == "upload_expired"
        await client.upload("again", 1000, resume=token)
        assert (await client.expect("error", id="again"))["code"] == "unknown_upload"
    assert len(server.state.store) == 0


async def test_metrics_count_what_happened(colors_server, open_client) -> None:
    import httpx

    async with open_client(colors_server.ws_url) as client:
        await client.send_upload("m1", make_image(40, 40, seed=60))
        await client.outcome("m1")
        async with httpx.AsyncClient() as http:
            text = (await http.get(colors_server.http_url + "/metrics")).text
    for name in ("pixelstream_uploads_total", "pixelstream_upload_bytes_total",
                 "pixelstream_active_sockets", "pixelstream_queue_depth",
                 "pixelstream_stage_seconds_bucket", "pixelstream_batch_size_bucket",
                 "pixelstream_cache_lookups_total"):
        assert name in text
    assert 'pixelstream_uploads_total{outcome="completed"}' in text


# Bytes per second, the memory budget, results bound to principals -------------------------------


async def test_inbound_bytes_per_second_are_limited_per_socket(server_factory, open_client
                                                               ) -> None:
    server = server_factory(socket_bytes_per_second=100_000)
    burst = server.settings.limits.max_message_bytes  # a second's worth, at least one message
    chunk = 200_000
    async with open_client(server.ws_url) as client:
        await client.upload("u1", 2_000_000)
        await client.expect("accepted", id="u1")
        sent = 0
        while sent + chunk <= burst:
            await client.chunk("u1", sent, b"x" * chunk)
            assert (await client.expect("progress", id="u1"))["received"] == sent + chunk
            sent += chunk
        await client.chunk("u1", sent, b"x" * chunk)
        error = await client.expect("error", id="u1")
        assert error["code"] == "rate_limited"
        assert "bytes" in error["message"]
        assert error["expected"] == sent  # where to resume, once the wait is over
        assert 500 <= error["retry_after_ms"] <= 2100
        async with open_client(server.ws_url) as other:  # per socket: another is not limited
            await other.upload("o1", 300_000)
            await other.expect("accepted", id="o1")
            await other.chunk("o1", 0, b"y" * chunk)
            assert (await other.expect("progress", id="o1"))["received"] == chunk


async def test_upload_bytes_that_do_not_fit_the_memory_budget_are_busy(
    server_factory, open_client, gate
) -> None:
    """An upload holds the bytes it received, not its declared size: a declared upload is
    accepted while its first chunk fits, and a chunk past the budget is answered ``busy``
    (the client resumes from ``expected`` once memory frees)."""
    server = server_factory(memory_budget_bytes=1_000_000)
    held = unique_image(400, 400, "BMP")  # 480 KB, reserved from its bytes to its result
    chunk = server.settings.max_chunk_bytes
    async with open_client(server.ws_url) as client:
        with gate.closed():
            await client.send_upload("held", held, task="gate")
            await client.expect("progress", id="held", stage="decoding")
            assert server.state.budget.held == len(held)
            await client.upload("big", 900_000)
            await client.expect("accepted", id="big")  # declared, nothing held yet
            assert server.state.budget.held == len(held)
            offset = 0
            while True:
                await client.chunk("big", offset, b"b" * chunk)
                answer = await client.expect(lambda m: m.get("id") == "big")
                if answer["type"] == "error":
                    break
                offset += chunk
            assert answer["code"] == "busy"
            assert answer["retry_after_ms"] > 0
            assert answer["expected"] == offset
            # Refused once the held upload, the chunk in hand and its copy would not fit.
            assert len(held) + offset + 2 * chunk > 1_000_000
            await client.send({"type": "cancel", "id": "big"})
            await client.expect("cancelled", id="big")
            assert server.state.budget.held == len(held)
        assert (await client.outcome("held"))["type"] == "result"
    assert server.state.budget.held == 0


async def test_over_the_memory_budget_no_socket_is_read_until_memory_frees(
    server_factory, open_client, gate
) -> None:
    """A frame waiting for the worker (held by the gate) puts the process over its budget:
    every reader stops before its next read, so a second socket's message waits, unread,
    until the held job finishes and gives its reservation back."""
    server = server_factory(memory_budget_bytes=1_000_000, max_chunk_bytes=600_000)
    budget = server.state.budget
    held = unique_image(400, 400, "BMP")
    frame = unique_image(430, 430, "BMP")  # 555 KB: with the held upload, over the budget
    async with open_client(server.ws_url) as holder, open_client(server.ws_url) as other:
        with gate.closed():
            await holder.send_upload("held", held, task="gate")
            await holder.expect("progress", id="held", stage="decoding")
            await holder.frame("cam", 1, frame)  # queued behind the gate: its bytes stay
            await wait_until(lambda: budget.over, "the budget to be spent")
            # The other socket's reader was already waiting in receive(): it reads one more
            # message, then stops before the next.
            (session,) = [s for s in server.state.sessions if not s.uploads]
            await other.send({"type": "cancel", "id": "first"})
            assert (await other.expect("error", id="first"))["code"] == "unknown_upload"
            await other.send({"type": "cancel", "id": "second"})
            await wait_until(lambda: budget.waiting >= 2, "both readers to stop")
            metrics = server.state.metrics.registry
            assert metrics.get_sample_value("pixelstream_reads_paused") >= 2
            assert session.messages_received == 1  # "second" waits unread
            await other.upload("later", 10)  # read, and its size reserved, once there is room
        # The gate opens: the held upload's result gives 480 KB back, and reading resumes.
        assert (await holder.outcome("held"))["type"] == "result"
        assert (await other.expect("error", id="second"))["code"] == "unknown_upload"
        assert (await other.expect("accepted", id="later"))["offset"] == 0
        assert (await holder.expect("result", stream="cam"))["seq"] == 1
        await other.send({"type": "cancel", "id": "later"})
        await other.expect("cancelled", id="later")
    await wait_until(lambda: budget.held == 0, "every byte to be given back")
    assert budget.peak > budget.limit  # it did go over: by one frame, never unboundedly


async def wait_until(predicate: Any, what: str) -> None:
    """Bounded polling of the server's state (it lives on another thread's loop)."""
    import time

    deadline = time.monotonic() + 30
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def test_results_are_bound_to_the_principal_that_asked(server_factory, open_client
                                                             ) -> None:
    """With tokens, one client cannot learn what another analysed: neither from
    ``cached: true`` nor from the answer to a bare checksum (which needs no bytes)."""
    import httpx

    server = server_factory(api_tokens=("alice-token", "bob-token"))
    data = unique_image(120, 90)
    digest = hashlib.sha256(data).hexdigest()
    alice = f"{server.ws_url}?token=alice-token"
    bob = f"{server.ws_url}?token=bob-token"
    async with open_client(alice) as client:
        await client.send_upload("a1", data, sha256=digest)
        assert (await client.outcome("a1"))["cached"] is False
        await client.upload("a2", len(data), sha256=digest)
        assert (await client.expect("accepted", id="a2"))["offset"] == len(data)
        assert (await client.outcome("a2"))["cached"] is True  # her own: from the cache
    async with open_client(bob) as client:
        await client.upload("b1", len(data), sha256=digest)
        assert (await client.expect("accepted", id="b1"))["offset"] == 0  # bytes, please
        for offset in range(0, len(data), 16384):
            await client.chunk("b1", offset, data[offset : offset + 16384])
        assert (await client.outcome("b1"))["cached"] is False
    other = unique_image(100, 80)
    async with httpx.AsyncClient(timeout=30) as http:
        answers = []
        for token in ("alice-token", "bob-token", "alice-token"):
            response = await http.post(f"{server.http_url}/v1/analyze",
                                       headers={"Authorization": f"Bearer {token}"},
                                       files={"file": ("o.png", other, "image/png")})
            answers.append(response.json()["cached"])
    assert answers == [False, False, True]


async def test_one_client_cannot_reserve_the_whole_memory_budget(server_factory,
                                                                 open_client) -> None:
    """Declared uploads that never send hold nothing; the bytes a client does send count
    against its share (a quarter of the budget, or one largest upload): past it, its chunks
    are ``busy`` while other clients' still fit."""
    server = server_factory(api_tokens=("alice-token", "bob-token"),
                            memory_budget_bytes=32 * 1024 * 1024)  # share: 8 MiB here
    budget = server.state.budget
    assert budget.share == 8 * 1024 * 1024
    size, chunk = 5 * 1024 * 1024, server.settings.max_chunk_bytes
    async with open_client(f"{server.ws_url}?token=alice-token") as alice:
        for n in range(4):
            await alice.upload(f"a{n}", size)
            await alice.expect("accepted", id=f"a{n}")
        assert budget.held == 0  # declared, not sent: nothing held
        refused = None
        for upload_id in ("a0", "a1"):
            for offset in range(0, size - chunk, chunk):  # never the last chunk: parked
                await alice.chunk(upload_id, offset, b"a" * chunk)
                answer = await alice.expect(lambda m, u=upload_id: m.get("id") == u)
                if answer["type"] == "error":
                    refused = answer
                    break
            if refused:
                break
        assert refused is not None
        assert (refused["id"], refused["code"]) == ("a1", "busy")
        assert "one client" in refused["message"]
        assert refused["retry_after_ms"] > 0
        assert budget.owned(principal_of("alice-token")) <= budget.share
        async with open_client(f"{server.ws_url}?token=bob-token") as bob:
            await bob.send_upload("b1", unique_image(96, 64))
            assert (await bob.outcome("b1"))["type"] == "result"
        await alice.send({"type": "cancel", "id": "a0"})
        await alice.expect("cancelled", id="a0")
        await alice.chunk("a1", refused["expected"], b"a" * chunk)  # her bytes were given back
        assert (await alice.expect("progress", id="a1"))["received"] > refused["expected"]
