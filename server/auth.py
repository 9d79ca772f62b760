"""API tokens and the browser Origin check.

A principal is a token's SHA-256 prefix: uploads, resume tokens and cached results are bound
to it, and it can appear in logs where the token itself never does. Tokens come as plain text
(``api_tokens``) or as their SHA-256 digests in a file (``api_tokens_file``); either way only
digests are kept, so the same token has the same principal in both.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from urllib.parse import urlsplit

_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


_HEX_DIGEST = re.compile(r"[0-9a-fA-F]{64}")


def principal_of(token: str) -> str:
    return _principal_of_digest(hashlib.sha256(token.encode()).digest())


def _principal_of_digest(digest: bytes) -> str:
    return "tok_" + digest.hex()[:16]


def read_token_digests(path: Path) -> list[bytes]:
    """The SHA-256 digests in a tokens file: one hex digest a line; blank lines and anything
    after ``#`` are ignored. Raises ValueError naming the file and line (never its text)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"api_tokens_file {path}: cannot be read ({type(exc).__name__})") from None
    digests = []
    for number, line in enumerate(text.splitlines(), start=1):
        value = line.split("#", 1)[0].strip()
        if not value:
            continue
        if value.lower().startswith("sha256:"):
            value = value[len("sha256:"):]
        if not _HEX_DIGEST.fullmatch(value):
            raise ValueError(
                f"api_tokens_file {path}, line {number}: not a SHA-256 digest (64 hex digits)"
            )
        digests.append(bytes.fromhex(value))
    if not digests:
        raise ValueError(f"api_tokens_file {path}: holds no token digests")
    return digests


class TokenAuth:
    """Checks presented tokens against the configured ones, in constant time."""

    def __init__(self, tokens: Iterable[str], digests: Iterable[bytes] = ()) -> None:
        self._digests = [hashlib.sha256(t.encode()).digest() for t in tokens if t]
        self._digests += [bytes(d) for d in digests]

    @classmethod
    def from_settings(cls, tokens: Iterable[str], tokens_file: Path | None) -> TokenAuth:
        return cls(tokens, read_token_digests(tokens_file) if tokens_file is not None else ())

    @property
    def required(self) -> bool:
        return bool(self._digests)

    def principal(self, presented: str | None) -> str | None:
        """The principal for a valid token; None when tokens are off or the token is wrong."""
        if not self._digests or not presented:
            return None
        digest = hashlib.sha256(presented.encode()).digest()
        # Compare against every token, so timing says nothing about which one nearly matched.
        matched = False
        for known in self._digests:
            matched |= hmac.compare_digest(digest, known)
        return _principal_of_digest(digest) if matched else None


def presented_token(headers: Mapping[str, str], query: Mapping[str, str]) -> str | None:
    """``Authorization: Bearer ...`` or, for browsers (which cannot set headers), ``?token=``."""
    authorization = headers.get("authorization", "")
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return query.get("token") or None


def _origin_key(scheme: str, host: str, port: int | None) -> tuple[str, str, int | None]:
    return scheme, host.lower(), port if port is not None else _DEFAULT_PORTS.get(scheme)


def parse_origin(origin: str) -> tuple[str, str, int | None] | None:
    try:
        parts = urlsplit(origin.strip())
        if not parts.scheme or not parts.hostname:
            return None
        return _origin_key(parts.scheme.lower(), parts.hostname, parts.port)
    except ValueError:
        return None


def origin_allowed(origin: str | None, host: str | None, allowed: Iterable[str]) -> bool:
    """PROTOCOL.md's rule. No Origin (not a browser): allowed. With an allow-list: exact match
    on scheme, host and port. Without one: the Origin's host and port must be the request's
    ``Host``."""
    if origin is None:
        return True
    parsed = parse_origin(origin)
    if parsed is None:
        return False
    allowed = list(allowed)
    if allowed:
        return any(parse_origin(candidate) == parsed for candidate in allowed)
    if not host:
        return False
    scheme = parsed[0]
    own = parse_origin(f"{scheme}://{host}")
    return own is not None and own[1:] == parsed[1:]
