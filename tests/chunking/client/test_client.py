"""The Client's own life cycle (chunking.client.client)."""

from __future__ import annotations

import asyncio

import pytest

from chunking.client import (
    Client,
    ClientClosedError,
    InvalidImageError,
)
from tests.conftest import WAIT_S
from tests.support.pyclient_record import (
    Recorder,
    padded,
)


async def test_an_empty_image_is_refused_before_anything_is_sent(colors_server) -> None:
    async with Client(colors_server.ws_url) as client:
        with pytest.raises(InvalidImageError):
            await client.analyze(b"")


async def test_closing_the_client_ends_its_calls(colors_server, gate) -> None:
    record = Recorder()
    client = Client(colors_server.ws_url)
    await client.connect()
    with gate.closed():
        call = asyncio.create_task(client.analyze(padded((3, 3, 3), 1000), task="gate",
                                                  **record.callbacks))
        await record.wait("decoding")
        await client.close()
        with pytest.raises(ClientClosedError):
            async with asyncio.timeout(WAIT_S):
                await call
    assert not [n for n, _ in record.stages if n == "retrying"]
