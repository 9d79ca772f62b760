"""Protocol limits: announced in ``welcome`` and enforced before memory is spent."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

MAX_ID_LENGTH = 64
MAX_NAME_LENGTH = 1024
MAX_TASK_LENGTH = 64
MAX_RESUME_TOKEN_LENGTH = 128
MAX_BINARY_HEADER_BYTES = 65535  # the header length prefix is two bytes


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-socket limits. The defaults are PROTOCOL.md's example values."""

    max_image_bytes: int = 256 * 1024 * 1024
    max_chunk_bytes: int = 4 * 1024 * 1024
    max_pixels: int = 178_956_970
    max_uploads: int = 8
    window_bytes: int = 16 * 1024 * 1024

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"limit {field.name} must be a positive integer, got {value!r}")

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Limits:
        """Read a ``welcome``'s ``limits``; unknown keys (later additions) are ignored."""
        known = {field.name for field in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})

    @property
    def max_base64_chunk_chars(self) -> int:
        """Longest Base64 text that can decode to at most ``max_chunk_bytes``."""
        return -(-self.max_chunk_bytes // 3) * 4

    @property
    def max_message_bytes(self) -> int:
        """The transport's message size limit, derived from ``max_chunk_bytes``.

        It leaves a quarter of slack above the largest Base64 chunk (plus room for the JSON
        around it), so a chunk that is somewhat too large is answered ``too_large`` on an open
        socket; a message beyond this is refused by the WebSocket layer (close code 1009)
        before it is buffered whole, since buffering it is the attack.
        """
        return self.max_base64_chunk_chars * 5 // 4 + 65536
