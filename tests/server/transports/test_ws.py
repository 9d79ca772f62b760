"""``GET /v1/ws``: the handshake's token and Origin checks, through a real server."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
import pytest
from websockets.exceptions import InvalidStatus

from chunking.errors import ErrorCode
from server.transports import ws as ws_module
from tests.conftest import RunningServer, connect

pytestmark = pytest.mark.asyncio(loop_scope="function")

TOKENS = ("first-secret-token", "second-secret-token")
ALLOWED = ("https://app.example", "http://dev.example:8080")


@pytest.fixture
def token_server(server_factory: Callable[..., RunningServer]) -> RunningServer:
    return server_factory(api_tokens=TOKENS)


@pytest.fixture
def allow_list_server(server_factory: Callable[..., RunningServer]) -> RunningServer:
    return server_factory(allowed_origins=ALLOWED)


async def welcome_of(url: str, **kwargs: Any) -> dict[str, Any]:
    async with connect(url, **kwargs) as ws:
        message: dict[str, Any] = orjson.loads(await ws.recv())
    assert message["type"] == "welcome"
    return message


async def refusal_of(url: str, **kwargs: Any) -> tuple[int, dict[str, Any]]:
    with pytest.raises(InvalidStatus) as refused:
        async with connect(url, **kwargs):
            pass
    response = refused.value.response
    return response.status_code, orjson.loads(response.body)


# Tokens -------------------------------------------------------------------------------------


async def test_without_tokens_configured_anyone_may_connect(colors_server) -> None:
    await welcome_of(colors_server.ws_url)


@pytest.mark.parametrize(
    ("query", "headers"),
    [("", {}), ("?token=wrong", {}), ("?token=", {}),
     ("", {"Authorization": "Bearer wrong"}), ("", {"Authorization": f"Basic {TOKENS[0]}"})],
    ids=["none", "wrong query", "empty query", "wrong bearer", "not bearer"],
)
async def test_a_missing_or_wrong_token_is_refused_with_401(
    token_server, query: str, headers: dict[str, str]
) -> None:
    status, body = await refusal_of(token_server.ws_url + query, additional_headers=headers)
    assert status == 401
    assert body["code"] == "unauthorized"
    assert TOKENS[0] not in str(body)


@pytest.mark.parametrize("token", TOKENS)
async def test_a_token_in_the_query_is_accepted(token_server, token: str) -> None:
    await welcome_of(f"{token_server.ws_url}?token={token}")


@pytest.mark.parametrize("token", TOKENS)
async def test_a_token_in_the_authorization_header_is_accepted(token_server, token: str) -> None:
    await welcome_of(token_server.ws_url, additional_headers={"Authorization": f"Bearer {token}"})


async def test_a_browser_with_a_token_in_the_query_passes_both_checks(token_server) -> None:
    own_origin = f"http://127.0.0.1:{token_server.port}"
    await welcome_of(f"{token_server.ws_url}?token={TOKENS[0]}", origin=own_origin)


# Origins ------------------------------------------------------------------------------------


async def test_same_origin_is_accepted_without_an_allow_list(colors_server) -> None:
    await welcome_of(colors_server.ws_url, origin=f"http://127.0.0.1:{colors_server.port}")


@pytest.mark.parametrize(
    "origin",
    ["http://evil.example", "http://localhost:{port}", "http://127.0.0.1:1",
     "https://127.0.0.1:{port}0", "null"],
)
async def test_a_foreign_origin_is_refused_with_403(colors_server, origin: str) -> None:
    status, body = await refusal_of(
        colors_server.ws_url, origin=origin.format(port=colors_server.port)
    )
    assert status == 403
    assert body["code"] == "forbidden_origin"


@pytest.mark.parametrize("origin", ALLOWED)
async def test_allow_listed_origins_are_accepted(allow_list_server, origin: str) -> None:
    await welcome_of(allow_list_server.ws_url, origin=origin)


async def test_with_an_allow_list_even_the_own_origin_must_be_on_it(allow_list_server) -> None:
    status, _ = await refusal_of(
        allow_list_server.ws_url, origin=f"http://127.0.0.1:{allow_list_server.port}"
    )
    assert status == 403
    status, _ = await refusal_of(allow_list_server.ws_url, origin="http://app.example")
    assert status == 403


async def test_a_program_without_origin_is_not_checked(allow_list_server) -> None:
    await welcome_of(allow_list_server.ws_url)


async def test_origin_is_checked_before_the_token(server_factory) -> None:
    server = server_factory(api_tokens=TOKENS, allowed_origins=ALLOWED)
    status, _ = await refusal_of(f"{server.ws_url}?token={TOKENS[0]}", origin="http://evil.example")
    assert status == 403
    status, _ = await refusal_of(server.ws_url, origin=ALLOWED[0])
    assert status == 401
    await welcome_of(f"{server.ws_url}?token={TOKENS[1]}", origin=ALLOWED[0])


async def test_refused_handshakes_open_no_session(token_server) -> None:
    await refusal_of(token_server.ws_url)
    await refusal_of(token_server.ws_url, origin="http://evil.example")
    registry = token_server.state.metrics.registry
    assert registry.get_sample_value("pixelstream_active_sockets") == 0


# Where the server cannot answer a handshake with HTTP --------------------------------------


class _BareWebSocket:
    """Just enough of Starlette's WebSocket for ``_refuse``: no denial-response extension."""

    def __init__(self, extensions: dict[str, Any]) -> None:
        self.scope: dict[str, Any] = {"extensions": extensions}
        self.closed_with: int | None = None
        self.denied: Any = None

    async def close(self, code: int = 1000) -> None:
        self.closed_with = code

    async def send_denial_response(self, response: Any) -> None:
        self.denied = response


async def test_refusal_falls_back_to_close_1008_without_the_http_response_extension() -> None:
    bare = _BareWebSocket({})
    await ws_module._refuse(bare, ErrorCode.UNAUTHORIZED, "no")  # type: ignore[arg-type]
    assert bare.closed_with == 1008
    assert bare.denied is None

    capable = _BareWebSocket({"websocket.http.response": {}})
    await ws_module._refuse(capable, ErrorCode.UNAUTHORIZED, "no")  # type: ignore[arg-type]
    assert capable.closed_with is None
    assert capable.denied.status_code == 401
    assert orjson.loads(capable.denied.body) == {"code": "unauthorized", "message": "no"}
