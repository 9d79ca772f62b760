"""The demo page and the browser library in real headless Chromium, through the real server.

Debian's ``chromium`` drives the page (never a downloaded browser); Playwright only remote-
controls it. The page exposes what the library reported on ``window.pixelstreamDemo``
(every callback as an event, every file as an item), so the tests read the library's own
progress, stages and results. Faults are injected by a TCP proxy between browser and server
(tests/support/browser_proxy.py). Every wait is bounded; nothing sleeps.
"""

from __future__ import annotations

import io
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import skimage.data
from PIL import Image
from playwright.sync_api import expect

from server.settings import Settings
from server.tasks.builtin.colors import Colors
from tests.conftest import RunningServer, start_server
from tests.support.browser_proxy import CuttingProxy
from tests.support.sample_tasks import BrightSpots

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="Debian's chromium is not installed (scripts/test.sh installs it: "
           "apt-get install chromium chromium-driver)",
)

BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
CAMERA_ARGS = ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"]
WAIT_MS = 90_000
"""Upper bound on any one wait in the browser."""
ROOT = Path(__file__).resolve().parents[2]
OUTPUT = ROOT / "test-output"
CATS = {"Egyptian cat", "tabby, tabby cat", "tiger cat"}
DONE = "(i) => ['done', 'error', 'cancelled'].includes(i.state)"


# Fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def playwright() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="module")
def browser(playwright: Any) -> Iterator[Any]:
    chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
    yield chromium
    chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    tab = context.new_page()
    tab.set_default_timeout(WAIT_MS)
    errors: list[str] = []
    tab.on("pageerror", lambda error: errors.append(str(error)))
    yield tab
    context.close()
    assert not errors, f"errors on the page: {errors}"


@pytest.fixture(scope="module")
def classify_server() -> Iterator[RunningServer]:
    """The real service: the bundled model, default limits (16 MiB window), 1 MiB chunks."""
    running = start_server(Settings(max_chunk_bytes=1 << 20, max_wait_ms=2.0))
    yield running
    running.stop()


# Helpers -------------------------------------------------------------------------------------


def big_photo(path: Path, seed: int, width: int = 4200, height: int = 2800) -> Path:
    """A cat photo blown up to ``width`` by ``height``, stored as an uncompressed PNG (about
    35 MB at the default size: more than the library's 32 MiB checksum limit, so it streams
    without being read whole). ``seed`` makes the bytes unique: the server caches results."""
    small = Image.fromarray(skimage.data.chelsea())
    pixels = np.asarray(small.resize((width, height), Image.Resampling.BICUBIC)).copy()
    pixels[0, :64] = np.random.default_rng(seed).integers(0, 256, size=(64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, "PNG", compress_level=0)
    return path


def jpeg_file(path: Path, pixels: np.ndarray) -> Path:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=90)
    path.write_bytes(out.getvalue())
    return path


def upload_bytes_total(server: RunningServer) -> float:
    """Bytes the server appended to uploads (replays are not counted), from /metrics."""
    text = httpx.get(server.http_url + "/metrics", timeout=10).text
    match = re.search(r"^pixelstream_upload_bytes_total (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def open_page(page: Any, url: str) -> None:
    page.goto(url)
    page.wait_for_selector('#connection[data-state="open"]')


def wait_items_done(page: Any, count: int) -> list[dict[str, Any]]:
    page.wait_for_function(
        f"window.pixelstreamDemo.items.length === {count}"
        f" && window.pixelstreamDemo.items.every({DONE})"
    )
    items: list[dict[str, Any]] = page.evaluate(
        "window.pixelstreamDemo.items.map(i => ({state: i.state, total: i.total,"
        " acknowledged: i.acknowledged, result: i.result, error: i.error && i.error.code}))"
    )
    return items


def events_of(page: Any, item: int) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = page.evaluate(
        f"window.pixelstreamDemo.events.filter(e => e.item === {item})"
    )
    return events


def assert_monotonic_progress(events: list[dict[str, Any]], size: int) -> list[dict[str, Any]]:
    progress = [e for e in events if e["kind"] == "progress"]
    assert progress, "no progress events"
    acknowledged = [e["acknowledged"] for e in progress]
    assert acknowledged == sorted(acknowledged), "acknowledged bytes went backwards"
    assert all(e["total"] == size for e in progress)
    assert all(e["sent"] >= e["acknowledged"] for e in progress)
    assert acknowledged[-1] == size, "progress ends at the file's size"
    return progress


def save_screenshot(page: Any, tmp_path: Path, name: str) -> Path:
    """The page as it is, under the test's output and in test-output/ (git-ignored)."""
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True, animations="disabled")
    OUTPUT.mkdir(exist_ok=True)
    shutil.copy(path, OUTPUT / name)
    return path


def record_measurement(name: str, values: dict[str, Any]) -> None:
    OUTPUT.mkdir(exist_ok=True)
    path = OUTPUT / "browser-measurements.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data[name] = values
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(f"{name}: {values}")


PROBE = """() => {
  // The page's main thread: how late a 16 ms timer fires, and long tasks, while work goes on.
  const probe = { maxLateMs: 0, ticks: 0, longTasks: 0, longestTaskMs: 0, running: true };
  let expected = performance.now() + 16;
  const tick = () => {
    const now = performance.now();
    probe.maxLateMs = Math.max(probe.maxLateMs, now - expected);
    probe.ticks += 1;
    expected = now + 16;
    if (probe.running) setTimeout(tick, 16);
  };
  setTimeout(tick, 16);
  new PerformanceObserver((list) => {
    for (const entry of list.getEntries()) {
      probe.longTasks += 1;
      probe.longestTaskMs = Math.max(probe.longestTaskMs, entry.duration);
    }
  }).observe({ entryTypes: ["longtask"] });
  window.__probe = probe;
}"""


# Tests ---------------------------------------------------------------------------------------


def test_page_uploads_a_big_photo_and_shows_the_result(page: Any, classify_server: RunningServer,
                                                       tmp_path: Path) -> None:
    photo = big_photo(tmp_path / "big-cat.png", seed=1)
    size = photo.stat().st_size
    assert size >= 30_000_000
    before = upload_bytes_total(classify_server)
    open_page(page, classify_server.http_url)
    page.evaluate(PROBE)

    page.set_input_files("#file-input", str(photo))
    [item] = wait_items_done(page, 1)
    probe = page.evaluate("(() => { window.__probe.running = false; return window.__probe; })()")

    assert item["state"] == "done", item
    labels = [entry["label"] for entry in item["result"]["result"]["labels"]]
    assert len(labels) == 5
    assert CATS & set(labels), labels
    assert item["result"]["image"] == {"width": 4200, "height": 2800, "format": "PNG"}

    events = events_of(page, 0)
    progress = assert_monotonic_progress(events, size)
    assert len(progress) >= size // (1 << 20), "one acknowledgement per 1 MiB chunk"
    stages = [e["stage"] for e in events if e["kind"] == "stage"]
    assert "hashing" not in stages, "a file over 32 MiB is streamed, not read whole to hash"
    server_stages = [s for s in stages if s in ("upload", "queued", "decoding", "inference")]
    assert server_stages[0] == "upload"
    assert server_stages.index("upload") < server_stages.index("inference")
    assert events[-1]["kind"] == "result"
    assert upload_bytes_total(classify_server) - before == size

    # What a person sees: the finished card with its labels, the facts, no error.
    card = page.locator('.card[data-state="done"]')
    expect(card).to_have_count(1)
    expect(card.locator(".labels .label-row")).to_have_count(5)
    expect(card.locator(".facts")).to_contain_text("4200 \N{MULTIPLICATION SIGN} 2800")
    expect(card.locator(".status")).to_have_text(re.compile(r"^Done in "))
    expect(card.locator(".error-box")).to_be_hidden()
    # The preview of a file this big is decoded in a worker, off the page's main thread.
    page.wait_for_function("document.querySelector('.card .thumb img').naturalWidth === 240")

    start = next(e["t"] for e in events if e["kind"] == "stage" and e["stage"] == "upload")
    end = next(e["t"] for e in progress if e["acknowledged"] == size)
    record_measurement("big_upload", {
        "bytes": size,
        "upload_seconds": round((end - start) / 1000, 3),
        "megabytes_per_second": round(size / 1e6 / ((end - start) / 1000), 1),
        "main_thread_max_late_ms": round(probe["maxLateMs"], 1),
        "long_tasks": probe["longTasks"],
        "longest_task_ms": round(probe["longestTaskMs"], 1),
    })
    # The page stays responsive while 35 MB stream: no frame-sized stall of the main thread.
    assert probe["ticks"] > 10
    assert probe["maxLateMs"] < 250, probe
    save_screenshot(page, tmp_path, "browser-finished-upload.png")


def test_a_cut_connection_resumes_without_resending_acknowledged_bytes(
        page: Any, classify_server: RunningServer, tmp_path: Path) -> None:
    photo = big_photo(tmp_path / "cut-cat.png", seed=2)
    size = photo.stat().st_size
    before = upload_bytes_total(classify_server)
    with CuttingProxy(classify_server.port) as proxy:
        proxy.cut_websocket_after(12_000_000)  # the page's socket, about a third of the way
        open_page(page, proxy.url)
        page.set_input_files("#file-input", str(photo))
        cut = proxy.wait_fault()
        [item] = wait_items_done(page, 1)
        sockets = proxy.websockets

    assert item["state"] == "done", item
    assert cut is sockets[0]
    assert cut.upstream_bytes == 12_000_000
    assert len(sockets) == 2, "one reconnect"
    events = events_of(page, 0)
    progress = assert_monotonic_progress(events, size)
    retry = next(i for i, e in enumerate(events)
                 if e["kind"] == "stage" and e["stage"] == "retrying")
    acknowledged_at_cut = max(
        (e["acknowledged"] for e in events[:retry] if e["kind"] == "progress"), default=0)
    assert 0 < acknowledged_at_cut < size
    # Resumed from the server's offset: the new socket carried at most the rest of the file
    # (plus framing: the handshake, the upload message, a few bytes per 1 MiB chunk).
    overhead = 64 * 1024
    assert sockets[1].upstream_bytes <= size - acknowledged_at_cut + overhead
    # Every byte was appended exactly once.
    assert upload_bytes_total(classify_server) - before == size
    assert len(progress) > 2
    record_measurement("cut_and_resume", {
        "bytes": size, "cut_after_client_bytes": cut.upstream_bytes,
        "acknowledged_at_cut": acknowledged_at_cut,
        "second_socket_client_bytes": sockets[1].upstream_bytes,
        "resent_beyond_unacknowledged": sockets[1].upstream_bytes - (size - acknowledged_at_cut),
    })


def test_a_reloaded_page_resumes_from_the_token_in_local_storage(
        page: Any, classify_server: RunningServer, tmp_path: Path) -> None:
    photo = big_photo(tmp_path / "reload-cat.png", seed=3)
    size = photo.stat().st_size
    before = upload_bytes_total(classify_server)
    with CuttingProxy(classify_server.port) as proxy:
        proxy.freeze_websocket_after(10_000_000)  # a half-open connection, then a reload
        open_page(page, proxy.url)
        page.set_input_files("#file-input", str(photo))
        proxy.wait_fault()
        page.wait_for_function("window.pixelstreamDemo.items[0].acknowledged > 0")
        acknowledged_before = page.evaluate("window.pixelstreamDemo.items[0].acknowledged")
        stored = page.evaluate(
            "Object.keys(localStorage).filter(k => k.startsWith('pixelstream::'))")
        assert len(stored) == 1, "the resume token is kept for a reload"

        page.reload()
        page.wait_for_selector('#connection[data-state="open"]')
        page.set_input_files("#file-input", str(photo))  # the same file, picked again
        [item] = wait_items_done(page, 1)
        sockets = proxy.websockets

    assert item["state"] == "done", item
    events = events_of(page, 0)
    progress = assert_monotonic_progress(events, size)
    resumed_at = progress[0]["acknowledged"]  # the new page's first word: the server's offset
    assert resumed_at >= acknowledged_before > 0
    assert sockets[-1].upstream_bytes <= size - resumed_at + 64 * 1024
    assert upload_bytes_total(classify_server) - before == size
    assert page.evaluate("Object.keys(localStorage).filter(k => k.startsWith('pixelstream::'))"
                         ) == [], "forgotten once the result is in"


def test_camera_with_a_fake_device_gets_live_results(playwright: Any,
                                                     classify_server: RunningServer,
                                                     tmp_path: Path) -> None:
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS + CAMERA_ARGS)
    try:
        context = browser.new_context(viewport={"width": 1200, "height": 900})
        page = context.new_page()
        page.set_default_timeout(WAIT_MS)
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        open_page(page, classify_server.http_url)
        page.click("#tab-camera")
        page.click("#camera-toggle")
        page.wait_for_function("window.pixelstreamDemo.camera.results >= 5")
        camera = page.evaluate("window.pixelstreamDemo.camera")
        stats = camera["stats"]
        assert camera["running"] is True
        assert camera["lastLabels"], camera
        assert stats["fps"] > 0, stats
        assert stats["latencyMs"] > 0, stats
        assert stats["sent"] >= 5
        expect(page.locator("#overlay-labels .label-row").first).to_be_visible()
        expect(page.locator("#viewer")).to_have_attribute("data-state", "live")
        record_measurement("camera", {
            "results_per_second": round(stats["fps"], 2),
            "round_trip_ms": round(stats["avgLatencyMs"], 1),
            "sent": stats["sent"], "dropped": stats["dropped"],
        })
        save_screenshot(page, tmp_path, "browser-camera.png")
        page.click("#camera-toggle")
        page.wait_for_function("!window.pixelstreamDemo.camera.running")
        assert not errors, errors
    finally:
        browser.close()


def test_cancel_errors_in_words_and_many_files_at_once(page: Any, server_factory: Any, gate: Any,
                                                       tmp_path: Path) -> None:
    server = server_factory()  # tasks: colors (the default) and gate (holds the worker)
    open_page(page, server.http_url)
    page.select_option("#task", "gate")
    held = jpeg_file(tmp_path / "held.jpg", skimage.data.astronaut())
    with gate.closed():
        page.set_input_files("#file-input", str(held))
        page.wait_for_function("window.pixelstreamDemo.items[0].state === 'processing'")
        page.click('.card[data-index="0"] .cancel')
        page.wait_for_function("window.pixelstreamDemo.items[0].state === 'cancelled'")
    cancelled = page.locator('.card[data-index="0"]')
    expect(cancelled.locator(".error-title")).to_have_text("You cancelled this upload.")
    expect(cancelled.locator(".retry")).to_be_visible()

    page.select_option("#task", "colors")
    broken = tmp_path / "holiday.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40)  # a PNG in name only
    coffee = jpeg_file(tmp_path / "coffee.jpg", skimage.data.coffee())
    page.set_input_files("#file-input", [str(broken), str(coffee)])
    items = wait_items_done(page, 3)
    assert [item["state"] for item in items] == ["cancelled", "error", "done"]
    assert items[1]["error"] == "invalid_image"
    failed = page.locator('.card[data-index="1"]')
    expect(failed.locator(".error-title")).to_have_text(
        "This file is not an image the server can read, or it is truncated or corrupt.")
    expect(page.locator('.card[data-index="2"] .swatches span').first).to_be_visible()
    assert page.locator('.card[data-index="2"] .swatches span').count() >= 3
    expect(page.locator("#summary")).to_have_text("3 files · 1 done · 1 failed · 1 cancelled")
    save_screenshot(page, tmp_path, "browser-errors-and-cancel.png")


def spots_image(path: Path, spots: list[tuple[int, int, int, int, int]],
                size: tuple[int, int] = (1600, 1000)) -> Path:
    """A dark picture with bright rectangles ``(x0, y0, x1, y1, level)``, as a PNG."""
    pixels = np.full((size[1], size[0], 3), 20, dtype=np.uint8)
    for x0, y0, x1, y1, level in spots:
        pixels[y0:y1, x0:x1] = level
    Image.fromarray(pixels).save(path, "PNG")
    return path


def test_options_come_from_the_task_schema_and_boxes_are_drawn_over_the_image(
        page: Any, server_factory: Any, tmp_path: Path) -> None:
    server = server_factory(tasks=(Colors(), BrightSpots()))
    open_page(page, server.http_url)
    page.select_option("#task", "detect")
    # The form is built from GET /v1/tasks: one field per option, with the schema's bounds.
    fields = page.locator("#task-options [data-option]")
    expect(fields).to_have_count(3)
    threshold = page.locator('[data-option="threshold"]')
    assert threshold.get_attribute("type") == "number"
    assert (threshold.get_attribute("min"), threshold.get_attribute("max")) == ("0", "1")
    expect(threshold).to_have_value("0.5")
    assert page.locator('[data-option="tiles"]').is_checked()
    expect(page.locator("#task-about")).to_contain_text("tests/bright-spots")
    page.fill('[data-option="max_objects"]', "2")
    page.locator('[data-option="max_objects"]').dispatch_event("change")

    spots = [(100, 120, 260, 300, 250), (900, 500, 1100, 690, 230), (700, 80, 760, 140, 200)]
    picture = spots_image(tmp_path / "spots.png", spots)
    page.set_input_files("#file-input", str(picture))
    [item] = wait_items_done(page, 1)
    assert item["state"] == "done", item
    objects = item["result"]["result"]["objects"]
    # max_objects from the form reached the server: the two brightest spots, where drawn,
    # whole although tile edges cut through them (512-px tiles over 1600 x 1000 pixels;
    # each spot lies whole in at least one tile).
    assert [o["box"] for o in objects] == [[100, 120, 260, 300], [900, 500, 1100, 690]]
    tiles = [e for e in events_of(page, 0) if e["kind"] == "stage" and e.get("total")]
    assert tiles, "no tile counts reached the page"
    assert {e["total"] for e in tiles} == {15}
    done = [e["done"] for e in tiles]
    assert done == sorted(done)
    assert done[-1] == 15

    card = page.locator('.card[data-index="0"]')
    expect(card.locator(".figure figcaption")).to_have_text("2 objects")
    rects = card.locator(".figure svg rect")
    expect(rects).to_have_count(2)
    picture_box = card.locator(".figure img").bounding_box()
    assert picture_box is not None
    assert picture_box["width"] > 200
    scale = picture_box["width"] / 1600
    for rect, obj in zip(rects.all(), objects, strict=True):
        drawn = rect.bounding_box()
        assert drawn is not None
        x0, y0, x1, y1 = obj["box"]
        # The box lies over the same pixels of the picture as displayed: the same centre
        # within 1 px, the same size but for its 2-px outline.
        centre_x = drawn["x"] + drawn["width"] / 2
        centre_y = drawn["y"] + drawn["height"] / 2
        assert abs(centre_x - (picture_box["x"] + (x0 + x1) / 2 * scale)) <= 1
        assert abs(centre_y - (picture_box["y"] + (y0 + y1) / 2 * scale)) <= 1
        assert abs(drawn["width"] - (x1 - x0) * scale) <= 3
        assert abs(drawn["height"] - (y1 - y0) * scale) <= 3
    expect(card.locator(".figure svg text").first).to_have_text(re.compile(r"^spot \d+%$"))
    save_screenshot(page, tmp_path, "browser-detect-boxes.png")

    # Back to a task without boxes: its own fields, no figure.
    page.select_option("#task", "colors")
    expect(page.locator('[data-option="max_objects"]')).to_have_count(0)
