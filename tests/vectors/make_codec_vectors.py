"""Writes codec.json: golden wire forms shared by the Python and JavaScript codec tests.

Run by hand after a deliberate protocol change (``python tests/vectors/make_codec_vectors.py``);
the tests then check both codecs against the file, so an accidental change breaks them.
Binary frames are stored as Base64; ``data`` in ``message`` objects is Base64 too.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from chunking.codec import encode_client_binary, encode_client_text, encode_server, to_wire
from chunking.errors import ErrorCode
from chunking.limits import Limits
from chunking.messages import (
    Accepted,
    Cancel,
    Cancelled,
    Chunk,
    Dropped,
    Error,
    Frame,
    Progress,
    Result,
    Stage,
    Upload,
    Welcome,
)

PNG_1X1 = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg=="
)


def message_json(message: Any) -> dict[str, Any]:
    obj = json.loads(json.dumps(to_wire(message)))
    if hasattr(message, "data"):
        obj["data"] = base64.b64encode(bytes(message.data)).decode()
    return obj


def main() -> None:
    client = [
        Upload(id="u1", size=52428800, sha256="ab" * 32, name="pano.jpg", task="classify",
               options={"top_k": 5}),
        Upload(id="u1", size=10, resume="tok_123"),
        Chunk(id="u1", offset=0, data=b"\x00\x01\x02\xfe\xff"),
        Chunk(id="u.2-x_", offset=1048576, data=b"hello"),
        Cancel(id="u1"),
        Frame(stream="cam0", seq=17, data=PNG_1X1, task="classify"),
    ]
    server = [
        Welcome(session="s1", limits=Limits(), tasks=["classify"], default_task="classify"),
        Accepted(id="u1", offset=0, resume="tok_123"),
        Progress(id="u1", stage=Stage.UPLOAD, received=1048576, total=52428800),
        Progress(id="u1", stage=Stage.QUEUED, position=3),
        Progress(id="u1", stage=Stage.DECODING),
        Progress(id="u1", stage=Stage.INFERENCE),
        Result(task="classify", result={"labels": [{"label": "tabby, tabby cat", "score": 0.91}]},
               image={"width": 12000, "height": 9000, "format": "JPEG"}, cached=False,
               model="pixelstream/mobilenet_v2-imagenet",
               timings_ms={"upload": 812.4, "queue": 3.1, "decode": 95.0, "inference": 41.7},
               id="u1"),
        Result(task="classify", result={"labels": []}, image={"width": 1, "height": 1,
               "format": "PNG"}, cached=True, model="m", timings_ms={}, stream="cam0", seq=17),
        Cancelled(id="u1"),
        Dropped(stream="cam0", seq=16),
        Error(code=ErrorCode.OFFSET_MISMATCH, message="expected offset 1048576", id="u1",
              expected=1048576),
        Error(code=ErrorCode.RATE_LIMITED, message="slow down", retry_after_ms=250),
    ]
    vectors: dict[str, list[dict[str, Any]]] = {"client_text": [], "client_binary": [],
                                                "server_text": []}
    for message in client:
        vectors["client_text"].append(
            {"message": message_json(message), "wire": encode_client_text(message).decode()}
        )
        if isinstance(message, (Chunk, Frame)):
            vectors["client_binary"].append({
                "message": message_json(message),
                "wire_base64": base64.b64encode(encode_client_binary(message)).decode(),
            })
    for message in server:
        vectors["server_text"].append(
            {"message": message_json(message), "wire": encode_server(message).decode()}
        )
    out = Path(__file__).with_name("codec.json")
    out.write_text(json.dumps(vectors, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
