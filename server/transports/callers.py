"""Who is asking: the checks every HTTP transport makes before it reads a body."""

from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import Request

from chunking.errors import ErrorCode, ProtocolError
from server.auth import TokenAuth, origin_allowed, presented_token
from server.limits import client_key
from server.state import AppState


@dataclass(frozen=True)
class HttpCaller:
    principal: str | None
    """The token's principal (None without tokens)."""
    address: str
    """The client's address as per-client limits count it (IPv6 by /64)."""

    @property
    def client(self) -> str:
        """Whose share of the limits a request spends: the principal, else the address."""
        return self.principal or self.address


def http_caller(request: Request, app: AppState, what: str) -> HttpCaller:
    """Origin and token of an HTTP request, as the one-shot routes and tus check them; ``what``
    ends the refusal's message ("this origin may not <what>")."""
    if not origin_allowed(request.headers.get("origin"), request.headers.get("host"),
                          app.settings.allowed_origins):
        raise ProtocolError(ErrorCode.FORBIDDEN_ORIGIN, f"this origin may not {what}")
    auth: TokenAuth = request.app.state.auth
    principal = auth.principal(presented_token(request.headers, request.query_params))
    if auth.required and principal is None:
        raise ProtocolError(ErrorCode.UNAUTHORIZED, "a valid API token is required")
    return HttpCaller(principal, http_caller_address(request))


def http_caller_address(request: Request) -> str:
    return client_key(request.client.host if request.client else "unknown")
