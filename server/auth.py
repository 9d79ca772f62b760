"""API tokens, the browser Origin check and the Host allow-list.

A principal is a token's SHA-256 prefix: uploads, resume tokens and cached results are bound
to it, and it can appear in logs where the token itself never does. Tokens come as plain text
(``api_tokens``) or as their SHA-256 digests in a file (``api_tokens_file``); either way only
digests are kept, so the same token has the same principal in both.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
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


_WEB_SCHEMES = {"ws": "http", "wss": "https", "http": "http", "https": "https"}


def origin_allowed(origin: str | None, host: str | None, allowed: Iterable[str],
                   scheme: str | None = None) -> bool:
    """PROTOCOL.md's rule. No Origin (not a browser): allowed. With an allow-list: exact match
    on scheme, host and port. Without one: the Origin must be the server's own, as the request
    reached it: its host and port those of ``Host`` and, when the request's ``scheme`` is
    given (``http``/``https``, or ``ws``/``wss`` for a socket), its scheme that one's."""
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
    own_scheme = _WEB_SCHEMES.get(scheme or "", parsed[0]) if scheme else parsed[0]
    own = parse_origin(f"{own_scheme}://{host}")
    return own is not None and own == parsed


# The Host allow-list ----------------------------------------------------------------------------

_WILDCARD_ADDRESSES = {"", "0.0.0.0", "::"}
_HOST_NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*")


def host_name(host: str) -> str | None:
    """The name or address in a ``Host`` header (lower case, no port, no brackets, no final
    dot); None when it is not one."""
    try:
        parts = urlsplit("//" + host.strip())
        name = parts.hostname
        parts.port  # noqa: B018 -- raises ValueError for a port that is not one
    except ValueError:
        return None
    if not name or parts.username is not None or parts.path or parts.query or parts.fragment:
        return None
    name = name.rstrip(".")
    if not _HOST_NAME.fullmatch(name) and _address(name) is None:
        return None
    return name


def _address(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name.split("%", 1)[0])
    except ValueError:
        return None


class HostPolicy:
    """Which ``Host`` names the server answers to: what stops DNS rebinding, where a page of
    another site makes its own name resolve to this server's address and so, being then of
    the "same origin", reads its answers. A name must be:

    * a localhost name (``localhost``, ``*.localhost``) or a loopback address;
    * the address the server listens on, or any address when it listens on all of them (an
      address is no name an attacker's DNS can rebind);
    * one of ``allowed``: an exact name, ``.example.com`` for the name and every name under
      it, or ``*`` for any name at all (behind a proxy that checks names itself).

    A request without ``Host`` (HTTP/1.0; browsers always send one) is not checked.
    """

    def __init__(self, listen: str, allowed: Iterable[str] = ()) -> None:
        names = [name.strip().lower().rstrip(".") for name in allowed if name.strip()]
        self.any_name = "*" in names
        self.exact = {name for name in names if not name.startswith(".")}
        self.suffixes = tuple(name for name in names if name.startswith("."))
        listen = listen.strip().strip("[]").lower()
        self.any_address = listen in _WILDCARD_ADDRESSES
        self.listen = _address(listen)
        if self.listen is None and listen:
            self.exact.add(listen)  # listening on a name: that name

    def allows(self, host: str | None) -> bool:
        if host is None:
            return True
        name = host_name(host)
        if name is None:
            return False
        if self.any_name or name == "localhost" or name.endswith(".localhost"):
            return True
        address = _address(name)
        if address is not None:
            return address.is_loopback or self.any_address or address == self.listen
        return name in self.exact or any(
            name.endswith(suffix) or name == suffix[1:] for suffix in self.suffixes
        )
