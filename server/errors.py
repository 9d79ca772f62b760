"""HTTP statuses for the error catalogue, and the JSON error answer."""

from __future__ import annotations

from starlette.responses import JSONResponse

from chunking.errors import ErrorCode, ProtocolError

HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.BAD_MESSAGE: 400,
    ErrorCode.BAD_BASE64: 400,
    ErrorCode.INVALID_IMAGE: 400,
    ErrorCode.CHECKSUM_MISMATCH: 400,
    ErrorCode.FORBIDDEN_HOST: 400,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.FORBIDDEN_ORIGIN: 403,
    ErrorCode.UNKNOWN_UPLOAD: 404,
    ErrorCode.DUPLICATE_UPLOAD: 409,
    ErrorCode.OFFSET_MISMATCH: 409,
    ErrorCode.UPLOAD_EXPIRED: 410,
    ErrorCode.TOO_LARGE: 413,
    ErrorCode.TOO_MANY_PIXELS: 422,
    ErrorCode.UNKNOWN_TASK: 422,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.TOO_MANY_UPLOADS: 429,
    ErrorCode.INTERNAL: 500,
    ErrorCode.BUSY: 503,
}


def error_response(exc: ProtocolError) -> JSONResponse:
    headers = {}
    if exc.code is ErrorCode.UNAUTHORIZED:  # RFC 9110: a 401 must name the scheme it wants
        headers["WWW-Authenticate"] = 'Bearer realm="pixelstream"'
    if exc.retry_after_ms is not None:
        headers["Retry-After"] = str(max(1, -(-exc.retry_after_ms // 1000)))
    body: dict[str, object] = {"code": exc.code.value, "message": exc.message}
    if exc.retry_after_ms is not None:
        body["retry_after_ms"] = exc.retry_after_ms
    return JSONResponse(body, status_code=HTTP_STATUS[exc.code], headers=headers)
