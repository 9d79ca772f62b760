"""pixelstream's protocol core, sans I/O: messages, codec, reassembly, chunk planning, and the
client's state of an upload.

The modules imported here (:mod:`~chunking.messages`, :mod:`~chunking.codec`,
:mod:`~chunking.errors`, :mod:`~chunking.limits`, :mod:`~chunking.reassembler`,
:mod:`~chunking.splitter`, :mod:`~chunking.exchange`) touch no sockets, event loops or models:
the server, the clients and the tests feed them bytes and messages and act on what they return.
The asyncio client built over them is the subpackage :mod:`chunking.client` (websockets,
threads), and the client's commands :mod:`chunking.cli`; ``import chunking`` loads neither.
"""

from chunking.codec import (
    encode_client_binary,
    encode_client_text,
    encode_server,
    error_from_exception,
    exception_from_error,
    parse_client_binary,
    parse_client_text,
    parse_server,
)
from chunking.errors import ErrorCode, InvalidTransition, ProtocolError
from chunking.exchange import UploadExchange
from chunking.limits import Limits
from chunking.messages import (
    PROTOCOL_VERSION,
    Accepted,
    Cancel,
    Cancelled,
    Chunk,
    ClientMessage,
    Dropped,
    Error,
    Frame,
    Progress,
    Result,
    ServerMessage,
    Stage,
    UnknownMessage,
    Upload,
    Welcome,
)
from chunking.reassembler import (
    TRANSITIONS,
    Appended,
    Lifecycle,
    Reassembler,
    Replayed,
    UploadEvent,
    UploadState,
)
from chunking.splitter import Span, UploadSender, iter_chunks

__all__ = [
    "PROTOCOL_VERSION",
    "TRANSITIONS",
    "Accepted",
    "Appended",
    "Cancel",
    "Cancelled",
    "Chunk",
    "ClientMessage",
    "Dropped",
    "Error",
    "ErrorCode",
    "Frame",
    "InvalidTransition",
    "Lifecycle",
    "Limits",
    "Progress",
    "ProtocolError",
    "Reassembler",
    "Replayed",
    "Result",
    "ServerMessage",
    "Span",
    "Stage",
    "UnknownMessage",
    "Upload",
    "UploadEvent",
    "UploadExchange",
    "UploadSender",
    "UploadState",
    "Welcome",
    "encode_client_binary",
    "encode_client_text",
    "encode_server",
    "error_from_exception",
    "exception_from_error",
    "iter_chunks",
    "parse_client_binary",
    "parse_client_text",
    "parse_server",
]
