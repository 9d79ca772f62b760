"""The alternatives pixelstream is measured against, each one a small server run in its own
process by the benchmarks (never by the tests)::

    python -m bench.servers bare|bare-sha256|multipart|naive|tus PORT [--files-dir DIR]

* ``bare``: a uvicorn WebSocket endpoint that only appends the bytes it receives to a
  ``bytearray`` (the ceiling of this stack). A text message ``"done"`` is answered with the
  byte count, then the buffer is dropped. Same uvicorn settings as pixelstream.
* ``bare-sha256``: the same, plus the SHA-256 of the bytes, computed in a thread as
  pixelstream does (a reference: the ceiling once the checksum the protocol requires is paid).
* ``multipart``: a FastAPI ``UploadFile`` route (``POST /upload``) that reads the file.
* ``naive``: ``POST /ingest`` with ``{"image": "<base64>"}`` parsed by a Pydantic model and
  decoded with the standard library, as a first version would.
* ``tus``: tuspyserver's FastAPI router at ``/files`` (tus 1.0 core + creation), writing to
  ``--files-dir``.

Each one also answers ``GET /healthz``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import concurrent.futures
import hashlib
import tempfile
from typing import Any

import uvicorn
from fastapi import FastAPI, File, UploadFile, WebSocket
from pydantic import BaseModel

from server.cli import uvicorn_config
from server.settings import Settings


def _app() -> FastAPI:
    app = FastAPI()

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def bare_app(sha256: bool = False) -> FastAPI:
    app = _app()
    hashing = concurrent.futures.ThreadPoolExecutor(1)

    @app.websocket("/ws")
    async def sink(websocket: WebSocket) -> None:
        await websocket.accept()
        loop = asyncio.get_running_loop()
        buffer = bytearray()
        hasher = hashlib.sha256()
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            data = message.get("bytes")
            if data is not None:
                buffer += data
                if sha256:
                    await loop.run_in_executor(hashing, hasher.update, data)
            else:
                await websocket.send_text(str(len(buffer)))
                buffer = bytearray()
                hasher = hashlib.sha256()

    return app


def multipart_app() -> FastAPI:
    app = _app()

    @app.post("/upload")
    async def upload(file: UploadFile = File(...)) -> dict[str, int]:  # noqa: B008
        data = await file.read()
        return {"bytes": len(data)}

    return app


class IngestRequest(BaseModel):
    image: str


def naive_app() -> FastAPI:
    app = _app()

    @app.post("/ingest")
    def ingest(request: IngestRequest) -> dict[str, int]:
        return {"bytes": len(base64.b64decode(request.image))}

    return app


def tus_app(files_dir: str) -> FastAPI:
    from tuspyserver import create_tus_router

    app = _app()
    app.include_router(create_tus_router(prefix="files", files_dir=files_dir, days_to_keep=1))
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("kind", choices=["bare", "bare-sha256", "multipart", "naive", "tus"])
    parser.add_argument("port", type=int)
    parser.add_argument("--files-dir", default=None)
    args = parser.parse_args()
    apps: dict[str, Any] = {
        "bare": bare_app,
        "bare-sha256": lambda: bare_app(sha256=True),
        "multipart": multipart_app,
        "naive": naive_app,
        "tus": lambda: tus_app(args.files_dir or tempfile.mkdtemp(prefix="bench-tus-")),
    }
    # pixelstream's own uvicorn settings (websockets-sansio, no deflate, same message limit).
    config = uvicorn_config(Settings(port=args.port, log_level="warning"))
    config["lifespan"] = "off"
    uvicorn.run(apps[args.kind](), **config)


if __name__ == "__main__":
    main()
