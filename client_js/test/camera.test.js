// The camera helper with a scripted capture and server: rate, latency, fps, drops, reconnects.
import assert from "node:assert/strict";
import { describe, test } from "node:test";

import { CameraStream, startCamera } from "../src/index.js";
import { FakeClock, FakeServer, settle, until } from "./helpers/fake.js";

const JPEG = new Uint8Array([0xff, 0xd8, 0xff, 0xe0, 1, 2, 3, 0xff, 0xd9]);

function harness(extra = {}) {
  const server = new FakeServer();
  const clock = new FakeClock();
  const frames = []; // [socket, message] the server has not answered yet
  server.onFrame = (socket, message) => { frames.push([socket, message]); };
  const seen = { results: [], dropped: [], errors: [] };
  const options = {
    url: "ws://pixelstream.test/v1/ws",
    webSocketFactory: server.factory,
    timers: clock,
    captureFrame: async () => new Blob([JPEG]),
    onResult: (result, stats) => seen.results.push({ seq: result.seq, ...stats }),
    onDropped: (seq) => seen.dropped.push(seq),
    onError: (error) => seen.errors.push(error.code),
    ...extra,
  };
  const answer = (seq, type = "result") => {
    const index = frames.findIndex(([, m]) => m.seq === seq);
    const [socket, message] = frames.splice(index, 1)[0];
    socket.push(type === "result"
      ? { type: "result", task: "classify", result: { labels: [{ label: "web site", score: 0.5 }] },
        stream: message.stream, seq, cached: false, model: "fake", timings_ms: {} }
      : { type: "dropped", stream: message.stream, seq, reason: "superseded" });
  };
  return { server, clock, frames, seen, options, answer };
}

describe("camera", () => {
  test("frames go out at the chosen rate; results give latency and fps; drops are surfaced", async () => {
    const h = harness({ fps: 10, task: "classify", options: { top_k: 1 } });
    const camera = await startCamera(null, h.options);
    await h.clock.tick(0);
    assert.deepEqual(h.frames.map(([, m]) => m.seq), [1]);
    const [, first] = h.frames[0];
    assert.equal(first.stream, camera.streamId);
    assert.equal(first.task, "classify");
    assert.deepEqual(first.options, { top_k: 1 });
    assert.deepEqual(first.data, JPEG, "the JPEG goes out as the binary payload");

    await h.clock.tick(100);
    assert.deepEqual(h.frames.map(([, m]) => m.seq), [1, 2]);
    await h.clock.tick(100); // two in flight: this tick sends nothing
    assert.equal(camera.stats.skipped, 1);
    assert.equal(h.frames.length, 2);

    h.answer(1);
    await settle();
    assert.equal(h.seen.results[0].latencyMs, 200);
    await h.clock.tick(100);
    assert.deepEqual(h.frames.map(([, m]) => m.seq), [2, 3]);
    h.answer(2, "dropped");
    await h.clock.tick(50);
    h.answer(3);
    await settle();
    assert.deepEqual(h.seen.dropped, [2]);
    assert.deepEqual(h.seen.results.map((r) => [r.seq, r.latencyMs]), [[1, 200], [3, 50]]);
    assert.ok(Math.abs(camera.stats.fps - 1000 / 150) < 1e-9, `fps ${camera.stats.fps}`);
    assert.equal(camera.stats.dropped, 1);
    assert.equal(camera.stats.sent, 3);
    assert.ok(camera.stats.avgLatencyMs > 50 && camera.stats.avgLatencyMs < 200);

    camera.stop();
    await h.clock.tick(1000);
    assert.equal(camera.stats.sent, 3, "nothing after stop");
  });

  test("seq keeps growing across a dropped connection, which reconnects on its own", async () => {
    const h = harness({ fps: 5, retryDelays: [0, 2000] });
    const camera = await startCamera(null, h.options);
    await h.clock.tick(0);
    h.answer(1);
    await h.clock.tick(200);
    assert.equal(h.frames.length, 1);
    h.server.socket.serverDrop();
    await settle();
    assert.deepEqual(h.seen.errors, ["connection_lost"]);
    assert.equal(camera.stats.connected, false);
    await h.clock.tick(200);
    assert.equal(h.server.sockets.length, 2, "reconnected");
    await h.clock.tick(200);
    const seqs = h.server.sockets[1].received.filter((m) => m.type === "frame").map((m) => m.seq);
    assert.ok(seqs.length >= 1 && seqs[0] > 2, `seqs ${seqs}`);
    camera.stop();
  });

  test("a frame the camera could not capture is skipped, not sent", async () => {
    let ready = false;
    const h = harness({ fps: 10, captureFrame: async () => (ready ? new Blob([JPEG]) : null) });
    const camera = new CameraStream(null, h.options);
    await camera.start();
    await h.clock.tick(200);
    assert.equal(camera.stats.sent, 0);
    assert.ok(camera.stats.skipped >= 2);
    ready = true;
    await h.clock.tick(100);
    assert.equal(camera.stats.sent, 1);
    camera.stop();
  });

  test("frame errors are reported and the stream carries on", async () => {
    const h = harness({ fps: 10 });
    const camera = await startCamera(null, h.options);
    await h.clock.tick(0);
    const [socket, message] = h.frames.shift();
    socket.push({ type: "error", code: "invalid_image", message: "bad", stream: message.stream, seq: message.seq });
    await h.clock.tick(100);
    assert.deepEqual(h.seen.errors, ["invalid_image"]);
    assert.equal(h.frames.length, 1);
    camera.stop();
  });

  test("start rejects when the server cannot be reached", async () => {
    const h = harness();
    h.server.refuse = 1;
    await assert.rejects(startCamera(null, h.options), { code: "connection_failed" });
  });

  test("base64 frames carry the same bytes", async () => {
    const h = harness({ encoding: "base64" });
    const camera = await startCamera(null, h.options);
    await h.clock.tick(0);
    await until(() => h.frames.length === 1, { what: "a frame" });
    assert.deepEqual(h.frames[0][1].data, JPEG);
    camera.stop();
  });
});
