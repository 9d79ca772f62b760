"""tus in real headless Chromium: the demo page falling back to tus + server-sent events where
a proxy refuses the WebSocket upgrade, and Uppy (``@uppy/core`` + ``@uppy/tus``, stock,
installed from npm into a temporary folder and bundled there) uploading to the server from
another origin, paused mid-way and resumed.

Debian's ``chromium`` drives the pages (never a downloaded browser). Every wait is bounded.
"""

from __future__ import annotations

import functools
import io
import shutil
import subprocess
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import skimage.data
from PIL import Image

from server.tasks.builtin.colors import Colors
from tests.conftest import RunningServer, fast_settings, start_server
from tests.support.browser_proxy import CuttingProxy

CHROMIUM = shutil.which("chromium")
NPM = shutil.which("npm")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="Debian's chromium is not installed (scripts/test.sh installs it)",
)
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
WAIT_MS = 90_000
UPPY_PACKAGES = ["@uppy/core@6", "@uppy/tus@6", "esbuild@0"]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as driver:
        chromium = driver.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context()
    tab = context.new_page()
    tab.set_default_timeout(WAIT_MS)
    errors: list[str] = []
    tab.on("pageerror", lambda error: errors.append(str(error)))
    yield tab
    context.close()
    assert not errors, f"errors on the page: {errors}"


def photo(path: Path, width: int = 1600, height: int = 1100) -> Path:
    pixels = np.asarray(Image.fromarray(skimage.data.chelsea()).resize((width, height)))
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=95)
    path.write_bytes(out.getvalue())
    return path


def test_the_demo_page_falls_back_to_tus_where_the_upgrade_is_refused(
    page: Any, tmp_path: Path
) -> None:
    server = start_server(fast_settings(), tasks=(Colors(),))
    try:
        with CuttingProxy(server.port) as proxy:
            proxy.refuse_websockets = True
            page.goto(proxy.url)
            pill = page.locator("#connection")
            pill.and_(page.locator('[data-state="http"]')).wait_for()
            assert pill.get_attribute("data-transport") == "tus"
            assert "HTTP" in pill.inner_text()
            image = photo(tmp_path / "cat.jpg")
            page.set_input_files("#file-input", str(image))
            page.wait_for_function(
                "window.pixelstreamDemo.items.length === 1"
                " && ['done', 'error'].includes(window.pixelstreamDemo.items[0].state)")
            item = page.evaluate("(({state, result, error, acknowledged, total, transport}) =>"
                                 " ({state, result, error: error && error.code, acknowledged,"
                                 " total, transport}))(window.pixelstreamDemo.items[0])")
            events = page.evaluate("window.pixelstreamDemo.events.filter(e => e.item === 0)")
        assert item["state"] == "done", item
        assert item["transport"] == "tus"
        assert item["result"]["task"] == "colors"
        assert item["acknowledged"] == item["total"] == image.stat().st_size
        assert {c.kind for c in proxy.connections} >= {"websocket", "http"}
        uploads = [e for e in events if e.get("stage") == "upload"]
        assert uploads
        assert all(e["transport"] == "tus" for e in uploads)
    finally:
        server.stop()


UPPY_PAGE = """<!doctype html>
<meta charset="utf-8">
<title>Uppy against pixelstream</title>
<input type="file" id="pick">
<script src="uppy.js"></script>
<script>
  const query = new URLSearchParams(location.search);
  const endpoint = query.get("endpoint");
  window.log = [];
  const uppy = new Uppy({ autoProceed: false });
  uppy.use(UppyTus, { endpoint, chunkSize: Number(query.get("chunk")),
                      retryDelays: [0, 200], removeFingerprintOnSuccess: true });
  let paused = false;
  uppy.on("upload-progress", (file, progress) => {
    window.log.push(["progress", progress.bytesUploaded]);
    if (!paused && progress.bytesUploaded > 0) {
      paused = true;
      uppy.pauseResume(file.id);          // interrupted after its first chunk
      window.pausedAt = progress.bytesUploaded;
      window.uploadUrl = uppy.getFile(file.id).tus.uploadUrl;
    }
  });
  uppy.on("upload-success", (file, response) => {
    window.outcome = { url: response.uploadURL };
  });
  uppy.on("upload-error", (file, error) => { window.outcome = { error: String(error) }; });
  document.getElementById("pick").addEventListener("change", (event) => {
    const file = event.target.files[0];
    uppy.addFile({ name: file.name, type: file.type, data: file, meta: { task: "colors" } });
    uppy.upload();
  });
  window.resume = () => uppy.pauseResume(uppy.getFiles()[0].id);
</script>
"""


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def uppy_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Uppy from npm, bundled into one script, and a page using it, served from its own
    origin (so the server's CORS for tus is what lets it through)."""
    assert NPM is not None, "npm is needed (scripts/test.sh)"
    root = tmp_path_factory.mktemp("uppy")
    subprocess.run([NPM, "install", "--silent", "--no-audit", "--no-fund", *UPPY_PACKAGES],
                   cwd=root, check=True, capture_output=True, timeout=600)
    (root / "entry.js").write_text('import Uppy from "@uppy/core"; import Tus from "@uppy/tus";'
                                   " window.Uppy = Uppy; window.UppyTus = Tus;\n")
    subprocess.run([str(root / "node_modules" / ".bin" / "esbuild"), "entry.js", "--bundle",
                    "--format=iife", "--outfile=uppy.js"], cwd=root, check=True,
                   capture_output=True, timeout=120)
    (root / "index.html").write_text(UPPY_PAGE)
    site = ThreadingHTTPServer(("127.0.0.1", 0),
                               functools.partial(_Quiet, directory=str(root)))
    thread = threading.Thread(target=site.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{site.server_address[1]}"
    site.shutdown()
    site.server_close()
    thread.join(10)


def test_uppy_uploads_from_another_origin_paused_and_resumed(
    page: Any, uppy_site: str, server_factory: Any, tmp_path: Path
) -> None:
    server: RunningServer = server_factory(allowed_origins=(uppy_site,))
    image = photo(tmp_path / "cat.jpg")
    size = image.stat().st_size
    chunk = size // 3 + 1
    page.goto(f"{uppy_site}/index.html?endpoint={server.http_url}/v1/tus/&chunk={chunk}")
    page.set_input_files("#pick", str(image))
    page.wait_for_function("window.pausedAt !== undefined && window.uploadUrl")
    url = page.evaluate("window.uploadUrl")
    head = httpx.head(url, headers={"Tus-Resumable": "1.0.0"}, timeout=30)
    held = int(head.headers["Upload-Offset"])
    assert 0 < held < size  # interrupted part-way
    page.evaluate("window.resume()")
    page.wait_for_function("window.outcome !== undefined")
    outcome = page.evaluate("window.outcome")
    assert "error" not in outcome, outcome
    assert outcome["url"] == url  # the same upload, resumed
    answer = httpx.get(url + "/result", params={"wait": 30}, timeout=60)
    assert answer.status_code == 200, answer.text
    assert answer.json()["task"] == "colors"
    assert answer.json()["image"]["width"] == 1600
