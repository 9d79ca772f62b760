"""API tokens, where a request presents one, and the browser Origin rule (PROTOCOL.md)."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

import pytest
from starlette.datastructures import Headers, QueryParams

from server.auth import (
    HostPolicy,
    TokenAuth,
    host_name,
    origin_allowed,
    presented_token,
    principal_of,
    read_token_digests,
)

# TokenAuth ----------------------------------------------------------------------------------


def test_without_tokens_nothing_is_required_and_nobody_is_a_principal() -> None:
    for tokens in ([], ["", ""]):
        token_auth = TokenAuth(tokens)
        assert not token_auth.required
        assert token_auth.principal("anything") is None
        assert token_auth.principal(None) is None


def test_every_configured_token_is_accepted() -> None:
    token_auth = TokenAuth(["alpha-secret", "beta-secret"])
    assert token_auth.required
    assert token_auth.principal("alpha-secret") == principal_of("alpha-secret")
    assert token_auth.principal("beta-secret") == principal_of("beta-secret")


@pytest.mark.parametrize(
    "presented",
    [None, "", "alpha", "alpha-secret ", "ALPHA-SECRET", "alpha-secretx", "beta-secret"],
)
def test_wrong_tokens_have_no_principal(presented: str | None) -> None:
    assert TokenAuth(["alpha-secret"]).principal(presented) is None


def test_principal_is_a_hash_prefix_never_the_token() -> None:
    token = "s3cret-token-value"
    principal = TokenAuth([token]).principal(token)
    assert principal == "tok_" + hashlib.sha256(token.encode()).hexdigest()[:16]
    assert token not in principal
    assert principal != principal_of("another-token")
    assert principal == principal_of(token)  # stable: uploads are bound to it


@pytest.mark.parametrize("presented", ["t0", "t2", "t4", "wrong", "x" * 200])
def test_every_token_is_compared_in_constant_time(
    monkeypatch: pytest.MonkeyPatch, presented: str
) -> None:
    """No early exit on a match, and no plain ``==``: timing must not tell which token (or
    how much of one) matched."""
    calls: list[tuple[bytes, bytes]] = []
    compare = hmac.compare_digest

    def counting_compare(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return compare(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting_compare)  # as server.auth calls it
    tokens = [f"t{n}" for n in range(5)]
    token_auth = TokenAuth(tokens)
    token_auth.principal(presented)
    assert len(calls) == len(tokens)
    # Fixed-length digests are compared, so the token's length leaks nothing either.
    assert {len(a) for a, _ in calls} == {len(b) for _, b in calls} == {32}


# A file of hashed tokens ------------------------------------------------------------------


def sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def test_a_tokens_file_holds_digests_with_comments_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(
        "# issued 2025-01-01\n"
        f"{sha('file-alpha')}\n"
        "\n"
        f"   {sha('file-beta').upper()}   # the beta team\n"
        f"sha256:{sha('file-gamma')}\n"
    )
    auth = TokenAuth.from_settings(["plain-token"], path)
    assert auth.required
    for token in ("file-alpha", "file-beta", "file-gamma", "plain-token"):
        assert auth.principal(token) == principal_of(token), token
    for wrong in ("file-delta", sha("file-alpha"), "", None):
        assert auth.principal(wrong) is None  # the digest itself is not a token


def test_a_token_has_the_same_principal_from_the_list_or_the_file(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(sha("shared") + "\n")
    assert TokenAuth.from_settings([], path).principal("shared") == (
        TokenAuth(["shared"]).principal("shared"))


@pytest.mark.parametrize(
    "text", ["not-a-digest\n", sha("x")[:-1] + "\n", sha("x") + "0\n", "# only a comment\n", ""],
    ids=["word", "short", "long", "no digests", "empty"],
)
def test_a_bad_tokens_file_is_refused_naming_the_line_not_its_text(
    tmp_path: Path, text: str
) -> None:
    path = tmp_path / "tokens"
    path.write_text(text)
    with pytest.raises(ValueError, match="api_tokens_file") as refused:
        read_token_digests(path)
    assert "not-a-digest" not in str(refused.value)
    if text.startswith(("not", sha("x")[:8])):
        assert "line 1" in str(refused.value)


def test_a_missing_tokens_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot be read"):
        read_token_digests(tmp_path / "absent")


def test_tokens_from_the_file_are_compared_in_constant_time_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "tokens"
    path.write_text("".join(sha(f"f{n}") + "\n" for n in range(3)))
    calls: list[bytes] = []
    compare = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: calls.append(a) or compare(a, b))
    TokenAuth.from_settings(["p0", "p1"], path).principal("f0")
    assert len(calls) == 5


# presented_token ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "query", "expected"),
    [
        ({"Authorization": "Bearer abc"}, "", "abc"),
        ({"authorization": "bearer abc"}, "", "abc"),
        ({"Authorization": "BEARER   abc  "}, "", "abc"),
        ({}, "token=q1", "q1"),
        ({}, "other=1&token=q%2Bx", "q+x"),
        ({"Authorization": "Bearer head"}, "token=query", "head"),
        ({"Authorization": "Basic dXNlcjpwdw=="}, "token=q1", "q1"),
        ({"Authorization": "Bearer "}, "token=q1", "q1"),
        ({"Authorization": "Basic dXNlcjpwdw=="}, "", None),
        ({}, "token=", None),
        ({}, "", None),
    ],
)
def test_presented_token(headers: dict[str, str], query: str, expected: str | None) -> None:
    assert presented_token(Headers(headers), QueryParams(query)) == expected


# origin_allowed -----------------------------------------------------------------------------


def test_no_origin_is_a_program_and_is_not_checked() -> None:
    assert origin_allowed(None, "example.com", [])
    assert origin_allowed(None, None, ["https://app.example"])


@pytest.mark.parametrize(
    ("origin", "host"),
    [
        ("http://127.0.0.1:8000", "127.0.0.1:8000"),
        ("http://localhost:8000", "localhost:8000"),
        ("http://Example.COM:8000", "example.com:8000"),
        ("http://example.com", "example.com"),
        ("http://example.com", "example.com:80"),
        ("http://example.com:80", "example.com"),
        ("https://example.com", "example.com"),
        ("https://example.com", "example.com:443"),
        ("http://[::1]:8000", "[::1]:8000"),
    ],
)
def test_without_an_allow_list_the_servers_own_origin_is_allowed(origin: str, host: str) -> None:
    assert origin_allowed(origin, host, [])


@pytest.mark.parametrize(
    ("origin", "host"),
    [
        ("http://evil.example", "example.com"),
        ("http://localhost:8000", "127.0.0.1:8000"),  # same machine, another origin
        ("http://example.com:8001", "example.com:8000"),
        ("http://example.com:8000", "example.com"),
        ("https://example.com", "example.com:80"),
        ("http://example.com.evil.example", "example.com"),
        ("http://evil.example", None),
        ("http://example.com", ""),
        ("null", "example.com"),  # sandboxed iframes and file:// pages
        ("", "example.com"),
        ("example.com", "example.com"),
        ("http://example.com:99999", "example.com:99999"),
    ],
)
def test_without_an_allow_list_other_origins_are_refused(origin: str, host: str | None) -> None:
    assert not origin_allowed(origin, host, [])


ALLOWED = ["https://app.example", "http://dev.example:8080"]


@pytest.mark.parametrize(
    "origin",
    ["https://app.example", "https://app.example:443", "https://APP.example",
     "http://dev.example:8080"],
)
def test_allow_listed_origins_are_allowed(origin: str) -> None:
    assert origin_allowed(origin, "api.example", ALLOWED)
    assert origin_allowed(origin, "api.example", iter(ALLOWED))  # any iterable


@pytest.mark.parametrize(
    "origin",
    [
        "http://app.example",  # scheme differs
        "https://app.example:8443",  # port differs
        "https://evil.app.example",  # a subdomain is another host
        "https://app.example.evil.example",
        "http://dev.example",  # port 80, not 8080
        "https://dev.example:8080",
        "null",
    ],
)
def test_the_allow_list_matches_exactly_on_scheme_host_and_port(origin: str) -> None:
    assert not origin_allowed(origin, "api.example", ALLOWED)


def test_an_allow_list_replaces_the_own_origin_rule() -> None:
    assert not origin_allowed("http://api.example", "api.example", ALLOWED)


def test_default_ports_are_normalised_in_the_allow_list_too() -> None:
    assert origin_allowed("https://app.example", "h", ["https://app.example:443/"])
    assert origin_allowed("http://app.example:80", "h", ["http://app.example"])
    assert not origin_allowed("http://app.example:443", "h", ["https://app.example"])


@pytest.mark.parametrize(
    ("origin", "host", "scheme"),
    [
        ("http://example.com", "example.com", "http"),
        ("http://example.com", "example.com", "ws"),
        ("https://example.com", "example.com", "https"),
        ("https://example.com", "example.com", "wss"),
        ("http://127.0.0.1:8000", "127.0.0.1:8000", "ws"),
    ],
)
def test_the_own_origin_has_the_scheme_the_request_came_by(origin: str, host: str,
                                                            scheme: str) -> None:
    assert origin_allowed(origin, host, [], scheme=scheme)


@pytest.mark.parametrize(
    ("origin", "host", "scheme"),
    [
        ("https://example.com:80", "example.com:80", "http"),  # a TLS page, a plain server
        ("http://example.com:443", "example.com:443", "wss"),
        ("http://127.0.0.1:8000", "127.0.0.1:8000", "wss"),
        ("https://127.0.0.1:8000", "127.0.0.1:8000", "ws"),
    ],
)
def test_an_origin_of_another_scheme_is_refused(origin: str, host: str, scheme: str) -> None:
    assert not origin_allowed(origin, host, [], scheme=scheme)


# The Host allow-list ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "name"),
    [
        ("example.com", "example.com"),
        ("Example.COM:8000", "example.com"),
        ("example.com.", "example.com"),
        ("[::1]:8000", "::1"),
        ("127.0.0.1", "127.0.0.1"),
        ("", None),
        ("example.com:port", None),
        ("example.com:99999", None),
        ("user@example.com", None),
        ("example.com/path", None),
        ("[::1", None),
    ],
)
def test_host_name(host: str, name: str | None) -> None:
    assert host_name(host) == name


LOCAL = ["localhost", "localhost:8000", "LOCALHOST", "app.localhost:8000", "127.0.0.1:8000",
         "127.8.9.1", "[::1]:8000", None]


@pytest.mark.parametrize("host", LOCAL)
def test_localhost_names_and_loopback_addresses_are_always_served(host: str | None) -> None:
    for listen in ("127.0.0.1", "0.0.0.0", "::", "192.0.2.7"):
        assert HostPolicy(listen).allows(host)


@pytest.mark.parametrize(
    "host",
    ["evil.com", "evil.com:8000", "localhost.evil.com", "127.0.0.1.evil.com", "example.com",
     "192.0.2.7:8000", "[2001:db8::1]", "", "example.com:bad"],
)
def test_by_default_a_loopback_server_refuses_other_names_and_addresses(host: str) -> None:
    """DNS rebinding: ``evil.com`` made to resolve to 127.0.0.1 is still ``evil.com``."""
    assert not HostPolicy("127.0.0.1").allows(host)


def test_the_address_listened_on_is_served_and_all_addresses_on_a_wildcard() -> None:
    assert HostPolicy("192.0.2.7").allows("192.0.2.7:8000")
    assert not HostPolicy("192.0.2.7").allows("192.0.2.8:8000")
    assert HostPolicy("[2001:db8::1]").allows("[2001:db8::1]:8000")
    for wildcard in ("0.0.0.0", "::", ""):
        policy = HostPolicy(wildcard)
        assert policy.allows("192.0.2.8:8000")
        assert policy.allows("[2001:db8::5]")
        assert not policy.allows("evil.com")  # a name still has to be configured
    assert HostPolicy("myhost.lan").allows("MyHost.lan:8000")  # listening on a name


def test_configured_names_exact_under_a_domain_or_any() -> None:
    policy = HostPolicy("0.0.0.0", ["pixelstream.example.com", ".internal.example"])
    assert policy.allows("pixelstream.example.com")
    assert policy.allows("pixelstream.example.com.:443")
    assert not policy.allows("other.example.com")
    assert not policy.allows("pixelstream.example.com.evil.com")
    assert policy.allows("internal.example")
    assert policy.allows("a.b.internal.example:8000")
    assert not policy.allows("notinternal.example")
    assert HostPolicy("127.0.0.1", ["*"]).allows("anything.example")
    assert not HostPolicy("127.0.0.1", ["*"]).allows("bad host")
