"""/openapi.json tells the truth: every status with its schema, the real content types, the
request bodies; and schemathesis, fuzzing a live server from it, finds nothing wrong."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from chunking.errors import ErrorCode
from server.app import create_app
from server.errors import HTTP_STATUS
from server.openapi import ANALYZE
from server.tasks.builtin.colors import Colors
from tests.conftest import RunningServer, fast_settings, start_server

ROOT = Path(__file__).resolve().parents[2]
FUZZ_S = int(os.environ.get("PIXELSTREAM_SCHEMATHESIS_S", "30"))
"""How long schemathesis fuzzes in the test run (the whole run is bounded by it)."""


def document(**settings: Any) -> dict[str, Any]:
    app = create_app(fast_settings(**settings), tasks=[Colors()])
    return app.openapi()


def test_the_analyze_routes_document_every_status_they_answer() -> None:
    paths = document()["paths"]
    expected = {str(HTTP_STATUS[code]) for code in ANALYZE} | {"200", "408"}
    for path in ("/api/analyze", "/v1/analyze"):
        responses = paths[path]["post"]["responses"]
        assert set(responses) == expected, path
        for status, response in responses.items():
            if status == "200":
                continue
            (schema,) = response["content"].values()
            assert "application/json" in response["content"]
            refs = str(schema["schema"])
            assert "#/components/schemas/Error" in refs
        codes_400 = responses["400"]["content"]["application/json"]["schema"]["allOf"][1]
        assert set(codes_400["properties"]["code"]["enum"]) == {
            "bad_message", "bad_base64", "invalid_image", "forbidden_host"}
        assert "Retry-After" in responses["503"]["headers"]
        assert "Retry-After" in responses["429"]["headers"]


def test_bodies_and_content_types_are_the_real_ones() -> None:
    doc = document()
    paths = doc["paths"]
    json_body = paths["/api/analyze"]["post"]["requestBody"]["content"]["application/json"]
    assert json_body["schema"]["required"] == ["image"]
    assert json_body["schema"]["properties"]["task"]["enum"] == ["colors", "", None]
    form = paths["/v1/analyze"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert form["schema"]["properties"]["file"]["format"] == "binary"
    assert list(paths["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    assert list(paths["/"]["get"]["responses"]["200"]["content"]) == ["text/html"]
    assert set(paths["/readyz"]["get"]["responses"]) == {"200", "400", "503"}
    error = doc["components"]["schemas"]["Error"]
    assert error["required"] == ["code", "message"]
    assert set(error["properties"]["code"]["enum"]) == {code.value for code in ErrorCode}
    assert "securitySchemes" not in doc["components"]


def test_with_tokens_the_analyze_routes_declare_them() -> None:
    doc = document(api_tokens=("secret",))
    assert set(doc["components"]["securitySchemes"]) == {"bearer", "query_token"}
    assert doc["paths"]["/api/analyze"]["post"]["security"] == [{"bearer": []},
                                                               {"query_token": []}]
    assert "security" not in doc["paths"]["/healthz"]["get"]


@pytest.fixture(scope="module")
def served() -> Iterator[RunningServer]:
    running = start_server(fast_settings(), tasks=(Colors(),))
    yield running
    running.stop()


def test_schemathesis_finds_no_failure(served: RunningServer) -> None:
    """schemathesis's default checks, for ``FUZZ_S`` seconds, with the repository's
    schemathesis.toml (which says why a well-formed analyze request may still be refused)."""
    command = [
        sys.executable, "-c", "from schemathesis.cli import schemathesis; schemathesis()",
        "--config-file", str(ROOT / "schemathesis.toml"),
        "run", f"{served.http_url}/openapi.json",
        "--max-time", str(FUZZ_S), "--seed", "20251205",
        "--request-timeout", "20",
    ]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                         timeout=FUZZ_S + 240, check=False)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-6000:]
    assert "Tested: " in output
