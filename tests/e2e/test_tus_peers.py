"""Stock tus clients against the server, unmodified: tuspy (Python) and tus-js-client (Node),
each interrupted and resumed by a fresh client, and a checksum mismatch.

tus-js-client is installed from npm into a temporary folder here; it is never committed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
from tusclient import client as tus_client
from tusclient.exceptions import TusCommunicationError, TusUploadFailed

from tests.conftest import RunningServer, unique_image

NPM = shutil.which("npm")
NODE = shutil.which("node")
TUS_JS_VERSION = "4"
WAIT_S = 60


def result_of(server: RunningServer, url: str) -> httpx.Response:
    return httpx.get(url + "/result", params={"wait": 30}, timeout=WAIT_S)


def offset_of(url: str) -> int:
    head = httpx.head(url, headers={"Tus-Resumable": "1.0.0"}, timeout=WAIT_S)
    assert head.status_code == 200
    return int(head.headers["Upload-Offset"])


def test_tuspy_interrupted_and_resumed_by_a_fresh_client(colors_server: RunningServer,
                                                         tmp_path: Path) -> None:
    image = unique_image(640, 480)
    path = tmp_path / "photo.png"
    path.write_bytes(image)
    endpoint = colors_server.http_url + "/v1/tus/"
    chunk = len(image) // 4 + 1
    first = tus_client.TusClient(endpoint).uploader(
        file_path=str(path), chunk_size=chunk, metadata={"filename": "photo.png"},
        upload_checksum=True,
    )
    first.upload(stop_at=chunk)  # interrupted after one PATCH
    assert first.url is not None
    assert offset_of(first.url) == chunk
    # A fresh client, knowing only the upload URL, asks where to go on and finishes.
    second = tus_client.TusClient(endpoint).uploader(file_path=str(path), url=first.url,
                                                     chunk_size=chunk, upload_checksum=True)
    assert second.offset == chunk
    second.upload()
    assert offset_of(first.url) == len(image)
    answer = result_of(colors_server, first.url)
    assert answer.status_code == 200, answer.text
    assert answer.json()["task"] == "colors"
    assert answer.json()["image"]["width"] == 640


def test_tuspy_checksum_mismatch_is_460_and_nothing_is_written(colors_server: RunningServer,
                                                               tmp_path: Path) -> None:
    image = unique_image()
    path = tmp_path / "photo.png"
    path.write_bytes(image)
    uploader = tus_client.TusClient(colors_server.http_url + "/v1/tus/").uploader(
        file_path=str(path), chunk_size=len(image), upload_checksum=True)
    # The peer's hash function lies: every Upload-Checksum it sends is wrong.
    uploader._BaseUploader__checksum_algorithm = lambda data: hashlib.sha1(b"tampered")
    with pytest.raises((TusUploadFailed, TusCommunicationError)) as failure:
        uploader.upload()
    assert failure.value.status_code == 460
    assert uploader.url is not None
    assert offset_of(uploader.url) == 0


TUS_JS_RESUME = r"""
const fs = require("fs");
const tus = require("tus-js-client");
const [endpoint, file, chunkSize, mode, url] = process.argv.slice(2);
const data = fs.readFileSync(file);
let progress = [];
const up = new tus.Upload(data, {
  endpoint, chunkSize: Number(chunkSize), retryDelays: [0, 100],
  metadata: {filename: "photo.png", task: "colors"},
  storeFingerprintForResuming: false,
  uploadUrl: mode === "resume" ? url : null,
  onChunkComplete: (size, accepted, total) => {
    progress.push(accepted);
    if (mode === "first") { up.abort().then(() => report()); }
  },
  onError: (e) => { console.error(String(e)); process.exit(1); },
  onSuccess: () => report(),
});
let reported = false;
function report() {
  if (reported) return;
  reported = true;
  console.log(JSON.stringify({url: up.url, progress}));
}
up.start();
"""


@pytest.fixture(scope="module")
def tus_js(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tus-js-client from npm, in a folder of its own, with the test's script."""
    assert NPM is not None, "npm is needed (scripts/test.sh)"
    assert NODE is not None
    root = tmp_path_factory.mktemp("tus-js")
    subprocess.run([NPM, "install", "--silent", "--no-audit", "--no-fund",
                    f"tus-js-client@{TUS_JS_VERSION}"], cwd=root, check=True,
                   capture_output=True, timeout=300)
    (root / "upload.js").write_text(TUS_JS_RESUME)
    return root


def node(tus_js: Path, *args: str) -> dict[str, Any]:
    assert NODE is not None
    done = subprocess.run([NODE, "upload.js", *args], cwd=tus_js, capture_output=True,
                          text=True, timeout=WAIT_S)
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return report


def test_tus_js_client_interrupted_and_resumed_by_a_fresh_client(
    colors_server: RunningServer, tus_js: Path, tmp_path: Path
) -> None:
    image = unique_image(640, 480)
    path = tmp_path / "photo.png"
    path.write_bytes(image)
    endpoint = colors_server.http_url + "/v1/tus/"
    chunk = str(len(image) // 3 + 1)
    first = node(tus_js, endpoint, str(path), chunk, "first")
    assert first["progress"] == [int(chunk)]
    assert offset_of(first["url"]) == int(chunk)
    second = node(tus_js, endpoint, str(path), chunk, "resume", first["url"])
    assert second["url"] == first["url"]
    assert second["progress"][0] == 2 * int(chunk)  # it went on from the server's offset
    assert second["progress"][-1] == len(image)
    answer = result_of(colors_server, first["url"])
    assert answer.status_code == 200, answer.text
    assert answer.json()["task"] == "colors"
