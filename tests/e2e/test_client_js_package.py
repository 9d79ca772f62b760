"""The browser client as an npm package people adopt: ``npm pack``, the tarball installed into
an empty project, its TypeScript declarations checked by ``tsc`` on small consumers, and a
page that imports the installed module with no bundler uploading a real photo in Debian's
chromium to a real server."""

from __future__ import annotations

import functools
import io
import json
import shutil
import subprocess
import tarfile
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import skimage.data
from PIL import Image

from tests.conftest import RunningServer

ROOT = Path(__file__).resolve().parents[2]
CLIENT_JS = ROOT / "client_js"
TSC = CLIENT_JS / "node_modules" / ".bin" / "tsc"
NPM = shutil.which("npm")
NODE = shutil.which("node")
CHROMIUM = shutil.which("chromium")
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
COMMAND_S = 120
WAIT_MS = 60_000

CONSUMER_TS = """\
import {
  analyze, connect, createClient, describeError, PixelstreamError, Upload,
  type ResultMessage, type StageName, type UploadOptions,
} from "pixelstream-client";
import { encodeText, parseServer, type ServerMessage } from "pixelstream-client/codec";

const options: UploadOptions = {
  url: "ws://127.0.0.1:8000/v1/ws",
  task: "classify",
  options: { top_k: 3 },
  retryDelays: [0, 1000],
  onProgress: (sent: number, acknowledged: number, total: number) => {
    console.log(sent, acknowledged / total);
  },
  onStage: (stage: StageName, detail) => console.log(stage, detail.position ?? 0),
  onError: (error: PixelstreamError) => console.log(error.code, describeError(error)),
};

export async function run(file: Blob): Promise<string> {
  const result: ResultMessage = await analyze(file, options);
  const upload = new Upload(file, options);
  upload.abort();
  const connection = await connect({ url: options.url });
  const limits: number = connection.welcome!.limits.max_chunk_bytes;
  const client = createClient({ url: options.url });
  const again: ResultMessage = await client.analyze(file);
  const message = parseServer(encodeText({ type: "cancel", id: "u1" }));
  return `${result.task} ${again.cached} ${limits} ${message.type}`;
}

export function stageOf(message: ServerMessage): string | undefined {
  return message.type === "progress" ? message.stage : undefined;
}
"""

# Each line misuses the API; tsc must refuse every one (TS2345: argument, TS2322: type).
MISUSES_TS = [
    'analyze("photo.jpg");',  # a path is not a Blob
    "analyze(new Blob(), { onProgress: (sent: string) => {} });",  # progress gets numbers
    'analyze(new Blob(), { encoding: "hex" });',  # binary or base64
    "const text: string = await analyze(new Blob());",  # a result is not a string
    "new Upload(new Blob()).start().then((result) => result.nonsense);",  # no such field
]

TSCONFIG = {
    "compilerOptions": {
        "target": "es2022", "module": "nodenext", "moduleResolution": "nodenext",
        "lib": ["es2022", "dom"], "strict": True, "noEmit": True, "types": [],
    },
}

PAGE = """<!doctype html>
<meta charset="utf-8">
<title>pixelstream-client from npm</title>
<script type="importmap">
  {"imports": {"pixelstream-client": "./node_modules/pixelstream-client/src/index.js"}}
</script>
<input type="file" id="pick">
<script type="module">
  import { analyze, describeError } from "pixelstream-client";

  const server = new URLSearchParams(location.search).get("server");
  window.progress = [];
  document.querySelector("#pick").addEventListener("change", async (event) => {
    try {
      const result = await analyze(event.target.files[0], {
        url: server,
        onProgress: (sent, acknowledged, total) => window.progress.push([acknowledged, total]),
      });
      window.outcome = { result };
    } catch (error) {
      window.outcome = { error: describeError(error) };
    }
  });
</script>
"""


def run(command: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=COMMAND_S)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}")
    return done


@pytest.fixture(scope="module")
def tarball(tmp_path_factory: pytest.TempPathFactory) -> Path:
    assert NPM is not None, "npm is needed (scripts/test.sh)"
    assert NODE is not None, "Node.js is needed (scripts/test.sh)"
    assert TSC.exists(), "TypeScript is missing: npm --prefix client_js ci (scripts/test.sh)"
    out = tmp_path_factory.mktemp("packed")
    done = run([NPM, "pack", "--pack-destination", str(out), "--silent"], CLIENT_JS)
    (name,) = done.stdout.split()
    return out / name


@pytest.fixture(scope="module")
def project(tarball: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty project that installed the tarball, as a user's would (offline: it has no
    dependencies to fetch)."""
    root = tmp_path_factory.mktemp("consumer")
    (root / "package.json").write_text(json.dumps(
        {"name": "consumer", "version": "1.0.0", "private": True, "type": "module"}))
    assert NPM is not None
    run([NPM, "install", "--offline", "--no-audit", "--no-fund", str(tarball)], root)
    return root


def test_the_tarball_holds_the_sources_and_their_declarations(tarball: Path) -> None:
    with tarfile.open(tarball) as archive:
        names = set(archive.getnames())
        manifest = json.load(archive.extractfile("package/package.json"))  # type: ignore[arg-type]
    sources = {p.name for p in (CLIENT_JS / "src").glob("*.js")}
    assert {f"package/src/{n}" for n in sources} <= names
    assert {f"package/types/{n.removesuffix('.js')}.d.ts" for n in sources} <= names
    assert not [n for n in names if n.startswith(("package/test/", "package/node_modules/"))]
    assert manifest["types"] == "./types/index.d.ts"
    for entry in manifest["exports"].values():
        assert f"package/{entry['types'].removeprefix('./')}" in names
        assert f"package/{entry['default'].removeprefix('./')}" in names
    assert "dependencies" not in manifest  # nothing to install with it


def test_typescript_accepts_a_consumer_of_the_installed_package(project: Path) -> None:
    (project / "tsconfig.json").write_text(json.dumps({**TSCONFIG, "files": ["consumer.ts"]}))
    (project / "consumer.ts").write_text(CONSUMER_TS)
    run([str(TSC), "-p", "tsconfig.json"], project)


def test_typescript_refuses_misuses_of_the_api(project: Path) -> None:
    first_line = 3
    body = "\n".join(f"  {line}" for line in MISUSES_TS)
    (project / "misuse.ts").write_text(
        'import { analyze, Upload } from "pixelstream-client";\n'
        f"export async function misuse(): Promise<void> {{\n{body}\n}}\n")
    (project / "misuse.json").write_text(json.dumps({**TSCONFIG, "files": ["misuse.ts"]}))
    done = run([str(TSC), "-p", "misuse.json"], project, check=False)
    assert done.returncode != 0
    refused = {int(line.split("(")[1].split(",")[0]) for line in done.stdout.splitlines()
               if line.startswith("misuse.ts(") and "error TS" in line}
    lines = set(range(first_line, first_line + len(MISUSES_TS)))
    assert refused == lines, done.stdout


def test_node_imports_the_installed_module_and_its_codec(project: Path) -> None:
    assert NODE is not None
    probe = ("import * as client from 'pixelstream-client';"
             "import { encodeText } from 'pixelstream-client/codec';"
             "console.log(JSON.stringify({names: Object.keys(client),"
             " text: encodeText({type: 'cancel', id: 'u1'})}));")
    done = run([NODE, "--input-type=module", "-e", probe], project)
    out = json.loads(done.stdout)
    assert {"analyze", "Upload", "startCamera", "createClient", "PixelstreamError"} <= set(
        out["names"])
    assert json.loads(out["text"]) == {"type": "cancel", "id": "u1"}


# In a real browser ---------------------------------------------------------------------------


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def page_site(project: Path) -> Iterator[str]:
    """The consumer project served as static files (the page, node_modules): no bundler."""
    (project / "index.html").write_text(PAGE)
    handler = functools.partial(_Quiet, directory=str(project))
    site = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=site.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{site.server_address[1]}"
    site.shutdown()
    site.server_close()
    thread.join(10)


def photo_jpeg(path: Path) -> Path:
    """A real photo (scikit-image's cat), enlarged to 3000x2000: several chunks' worth."""
    pixels = np.asarray(Image.fromarray(skimage.data.chelsea()).resize((3000, 2000)))
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=95)
    path.write_bytes(out.getvalue())
    return path


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed "
                    "(scripts/test.sh installs it)")
def test_a_page_importing_the_packed_module_uploads_in_chromium(
    page_site: str, server_factory: Any, tmp_path: Path
) -> None:
    from playwright.sync_api import sync_playwright

    server: RunningServer = server_factory(allowed_origins=(page_site,))
    photo = photo_jpeg(tmp_path / "cat.jpg")
    size = photo.stat().st_size
    assert size > 2 * server.settings.max_chunk_bytes
    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        try:
            tab = browser.new_page()
            tab.set_default_timeout(WAIT_MS)
            errors: list[str] = []
            tab.on("pageerror", lambda error: errors.append(str(error)))
            tab.goto(f"{page_site}/index.html?server={server.ws_url}")
            tab.set_input_files("#pick", str(photo))
            tab.wait_for_function("window.outcome !== undefined")
            outcome = tab.evaluate("window.outcome")
            progress = tab.evaluate("window.progress")
        finally:
            browser.close()
    assert errors == []
    assert "error" not in outcome, outcome
    result = outcome["result"]
    assert result["type"] == "result"
    assert result["task"] == "colors"
    assert result["image"]["width"] == 3000
    assert result["result"]["colors"]
    acknowledged = [a for a, _ in progress]
    assert acknowledged == sorted(acknowledged)
    assert acknowledged[-1] == size
    assert len(acknowledged) >= 3  # chunk by chunk
