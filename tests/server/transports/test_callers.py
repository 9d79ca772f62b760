"""The checks every HTTP transport makes before reading a body, on plain requests."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from starlette.requests import Request

from chunking.errors import ErrorCode, ProtocolError
from server.auth import TokenAuth
from server.transports.callers import http_caller


def request(headers: dict[str, str], auth: TokenAuth, host: str = "2001:db8::7") -> Request:
    scope: dict[str, Any] = {
        "type": "http", "method": "POST", "path": "/", "query_string": b"",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": (host, 5000), "app": SimpleNamespace(state=SimpleNamespace(auth=auth)),
    }
    return Request(scope)


APP: Any = SimpleNamespace(settings=SimpleNamespace(allowed_origins=()))


def test_a_foreign_origin_is_refused_naming_what_it_may_not_do() -> None:
    with pytest.raises(ProtocolError) as refused:
        http_caller(request({"host": "127.0.0.1:8000", "origin": "http://evil.test"},
                            TokenAuth(())), APP, "upload here")
    assert refused.value.code is ErrorCode.FORBIDDEN_ORIGIN
    assert refused.value.message == "this origin may not upload here"


def test_a_missing_token_is_refused_where_tokens_are_required() -> None:
    with pytest.raises(ProtocolError) as refused:
        http_caller(request({"host": "127.0.0.1:8000"}, TokenAuth(("s3cret",))), APP, "x")
    assert refused.value.code is ErrorCode.UNAUTHORIZED


def test_the_client_is_the_principal_else_the_address_grouped_by_64() -> None:
    anonymous = http_caller(request({"host": "127.0.0.1:8000"}, TokenAuth(())), APP, "x")
    neighbour = http_caller(request({"host": "127.0.0.1:8000"}, TokenAuth(()),
                                    host="2001:db8::9"), APP, "x")
    assert anonymous.principal is None
    assert anonymous.client == anonymous.address == neighbour.address
    known = http_caller(request({"host": "127.0.0.1:8000", "authorization": "Bearer s3cret"},
                                TokenAuth(("s3cret",))), APP, "x")
    assert known.principal is not None
    assert known.client == known.principal
