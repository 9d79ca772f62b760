// The upload engine against a scripted in-memory server: windows, drops, rewinds, retries.
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { describe, test } from "node:test";

import { Connection } from "../src/connection.js";
import { PixelstreamError } from "../src/errors.js";
import { analyze, Upload } from "../src/index.js";
import { FakeClock, FakeServer, MemoryStorage, fileOf, pattern, settle, until } from "./helpers/fake.js";

const MiB = 1024 * 1024;

/** Options wiring an upload to `server` and `clock`, recording every callback. */
function harness({ limits, ...rest } = {}) {
  const server = new FakeServer({ limits });
  const clock = new FakeClock();
  const events = [];
  const storage = new MemoryStorage();
  const options = {
    url: "ws://pixelstream.test/v1/ws",
    webSocketFactory: server.factory,
    timers: clock,
    urlStorage: storage,
    onProgress: (sent, acknowledged, total) => events.push({ kind: "progress", sent, acknowledged, total }),
    onStage: (stage, detail) => events.push({ kind: "stage", stage, ...detail }),
    onResult: (result) => events.push({ kind: "result", result }),
    onError: (error) => events.push({ kind: "error", error }),
    ...rest,
  };
  const progress = () => events.filter((e) => e.kind === "progress");
  const stages = () => events.filter((e) => e.kind === "stage").map((e) => e.stage);
  return { server, clock, events, options, storage, progress, stages };
}

function assertMonotonic(progress, total) {
  let last = -1;
  for (const event of progress) {
    assert.ok(event.acknowledged >= last, `acknowledged went back: ${event.acknowledged} < ${last}`);
    assert.ok(event.acknowledged <= total);
    last = event.acknowledged;
  }
  assert.equal(last, total, "progress ends at the file's size");
}

function sameBytes(server, token, bytes) {
  const upload = [...server.uploads.values()].find((u) => u.token === token);
  return upload && Buffer.compare(Buffer.from(upload.data), Buffer.from(bytes)) === 0;
}

describe("a plain upload", () => {
  for (const encoding of ["binary", "base64"]) {
    test(`${encoding}: streams the file within the window and resolves with the result`, async () => {
      const h = harness({ limits: { window_bytes: 2 * MiB, max_chunk_bytes: 512 * 1024 } });
      const bytes = pattern(5 * MiB + 123);
      let stored;
      h.server.onComplete = (socket, upload) => {
        stored = Buffer.from(upload.data);
        return undefined;
      };
      const result = await analyze(fileOf(bytes), { ...h.options, encoding, chunkSize: MiB, checksum: false,
        task: "classify", options: { top_k: 3 } });

      assert.equal(result.type, "result");
      assert.equal(result.result.labels[0].label, "tabby, tabby cat");
      assert.equal(h.server.sockets.length, 1);
      const socket = h.server.socket;
      const [announce] = socket.received;
      assert.deepEqual({ ...announce, id: "x" }, { type: "upload", id: "x", size: bytes.length, name: "photo.jpg",
        task: "classify", options: { top_k: 3 } });
      // Chunks are capped by the server's max_chunk_bytes, in order, never beyond the window.
      const chunks = socket.chunks();
      assert.ok(chunks.every((c) => c.data.length <= 512 * 1024));
      assert.deepEqual(chunks.map((c) => c.offset), chunks.map((_, i) => i * 512 * 1024));
      assert.equal(Buffer.compare(stored, Buffer.from(bytes)), 0);
      assertMonotonic(h.progress(), bytes.length);
      assert.deepEqual(h.stages(), ["connecting", "upload", "queued", "decoding", "inference"]);
      assert.equal(h.events.filter((e) => e.stage === "queued")[0].position, 1);
      assert.equal(h.events.at(-1).kind, "result");
      assert.equal(h.storage.size, 0, "the resume token is forgotten after success");
    });
  }

  test("tiles done of total reach onStage while a spatial task runs; odd fields do not", async () => {
    const h = harness();
    h.server.stages = [
      { stage: "queued", position: 2 },
      { stage: "decoding" },
      { stage: "inference", done: 0, total: 3 },
      { stage: "inference", done: 2, total: 3 },
      { stage: "inference", done: "3", total: 3 }, // not a number: no counts passed on
      { stage: "inference", done: 3, total: 3 },
    ];
    await analyze(fileOf(pattern(1000)), { ...h.options, checksum: false, task: "detect" });
    const stages = h.events.filter((e) => e.kind === "stage" && e.stage !== "connecting" && e.stage !== "upload");
    assert.deepEqual(stages.map(({ kind, ...detail }) => detail), [
      { stage: "queued", position: 2 },
      { stage: "decoding" },
      { stage: "inference", done: 0, total: 3 },
      { stage: "inference", done: 2, total: 3 },
      { stage: "inference" },
      { stage: "inference", done: 3, total: 3 },
    ]);
  });

  test("never more than window_bytes sent and unacknowledged, and the window is kept full", async () => {
    const h = harness({ limits: { window_bytes: 1000 * 1024, max_chunk_bytes: 256 * 1024 } });
    const queue = [];
    let passthrough = false;
    h.server.onChunk = (socket, message) => {
      if (passthrough) return undefined;
      queue.push([socket, message]);
      return "swallow";
    };
    const upload = new Upload(fileOf(pattern(3 * MiB + 5)), { ...h.options, checksum: false, chunkSize: 256 * 1024 });
    const done = upload.start();
    let maxUnacknowledged = 0;
    let rounds = 0;
    await until(() => queue.length > 0, { what: "the first chunk" });
    const queued = () => queue.reduce((n, [, m]) => n + m.data.length, 0);
    for (;;) {
      // Wait until the client has every answer and the server every byte handed to the socket.
      await until(() => upload.acknowledged === h.server.appended && queued() + h.server.appended === upload.sent,
        { what: "the sends" });
      await settle();
      if (queue.length === 0) break;
      const unacknowledged = queue.reduce((n, [, m]) => n + m.data.length, 0);
      maxUnacknowledged = Math.max(maxUnacknowledged, unacknowledged);
      assert.ok(unacknowledged <= 1000 * 1024, `unacknowledged ${unacknowledged}`);
      if (upload.sent < upload.total) {
        // Whatever is not in flight could not go out: less than a chunk, or a small remainder.
        assert.ok(1000 * 1024 - unacknowledged < 64 * 1024 || unacknowledged % (256 * 1024) !== 0,
          `window idle: ${unacknowledged}`);
      }
      const [socket, message] = queue.shift();
      passthrough = true;
      h.server._chunk(socket, message);
      passthrough = false;
      rounds += 1;
    }
    await done;
    assert.ok(maxUnacknowledged > 900 * 1024, `window used: ${maxUnacknowledged}`);
    assert.ok(rounds >= 13);
    // Partial chunks filled the window's remainder (1000 KiB is not a multiple of 256 KiB).
    assert.ok(h.server.socket.chunks().some((c) => c.data.length < 256 * 1024 && c.offset + c.data.length < 3 * MiB));
  });

  test("progress is what the server acknowledged, not what was sent", async () => {
    const h = harness({ limits: { window_bytes: 4 * MiB } });
    let hold = true;
    const held = [];
    h.server.onChunk = (socket, message) => {
      if (hold) {
        held.push(message);
        return "swallow";
      }
      return undefined;
    };
    const upload = new Upload(fileOf(pattern(3 * MiB)), { ...h.options, checksum: false });
    const done = upload.start();
    await until(() => held.length === 3, { what: "three chunks sent" });
    assert.equal(upload.sent, 3 * MiB);
    assert.equal(upload.acknowledged, 0);
    assert.deepEqual(h.progress().map((e) => e.acknowledged), [0]);
    hold = false;
    // The server now takes the chunks (as if they had just arrived).
    for (const message of held) h.server._chunk(h.server.socket, message);
    await done;
    assert.deepEqual(h.progress().map((e) => e.acknowledged), [0, MiB, 2 * MiB, 3 * MiB]);
  });

  test("an empty file fails at once", async () => {
    const h = harness();
    await assert.rejects(analyze(fileOf(new Uint8Array(0)), h.options), { code: "invalid_image" });
    assert.equal(h.server.sockets.length, 0);
  });

  test("a file over max_image_bytes fails before sending", async () => {
    const h = harness({ limits: { max_image_bytes: 1000 } });
    await assert.rejects(analyze(fileOf(pattern(1001)), { ...h.options, checksum: false }), { code: "too_large" });
    assert.equal(h.server.socket.received.length, 0);
  });
});

describe("one socket for many uploads", () => {
  test("concurrent uploads share one socket and its window, taking turns", async () => {
    const h = harness({ limits: { window_bytes: 2 * MiB, max_chunk_bytes: 256 * 1024 } });
    const files = [pattern(3 * MiB, 1), pattern(2 * MiB + 7, 2), pattern(MiB, 3)];
    const results = await Promise.all(files.map((bytes, i) =>
      analyze(fileOf(bytes, `f${i}.jpg`), { ...h.options, checksum: false, chunkSize: 256 * 1024 })));
    assert.equal(results.length, 3);
    assert.equal(h.server.sockets.length, 1, "one socket");
    const socket = h.server.socket;
    assert.ok(socket.maxInFlight <= 2 * MiB, `window shared: ${socket.maxInFlight}`);
    // Fair turns: once several are accepted, their chunks interleave on the wire.
    const order = socket.chunks().map((c) => c.id);
    const ids = [...new Set(order)];
    assert.equal(ids.length, 3);
    for (const later of ids.slice(1)) {
      assert.ok(order.indexOf(later) < order.lastIndexOf(ids[0]), "uploads take turns");
    }
  });

  test("no more than max_uploads receive at once; the rest wait for a slot", async () => {
    const h = harness({ limits: { max_uploads: 2, window_bytes: MiB, max_chunk_bytes: 256 * 1024 } });
    let maxReceiving = 0;
    const receiving = () => [...h.server.uploads.values()].filter((u) => u.held < u.size).length;
    const original = h.server._upload.bind(h.server);
    h.server._upload = (socket, message) => {
      original(socket, message);
      maxReceiving = Math.max(maxReceiving, receiving());
    };
    const waits = [];
    const all = [1, 2, 3, 4].map((seed) => analyze(fileOf(pattern(MiB, seed), `f${seed}.jpg`), {
      ...h.options, checksum: false, chunkSize: 256 * 1024,
      onStage: (stage) => { if (stage === "waiting") waits.push(seed); },
    }));
    await Promise.all(all);
    assert.ok(maxReceiving <= 2, `receiving at once: ${maxReceiving}`);
    assert.deepEqual(waits, [3, 4]);
  });
});

describe("resilience", () => {
  test("a dropped connection reconnects and resumes from the server's offset", async () => {
    const h = harness({ limits: { window_bytes: 2 * MiB, max_chunk_bytes: 256 * 1024 } });
    const bytes = pattern(4 * MiB);
    let dropped = false;
    let resumedAt = null;
    h.server.onChunk = (socket, message, upload) => {
      if (!dropped && upload.held >= 1.5 * MiB) {
        dropped = true;
        socket.serverDrop();
        return "swallow";
      }
      return undefined;
    };
    const upload = new Upload(fileOf(bytes), { ...h.options, checksum: false, chunkSize: 256 * 1024 });
    const token = new Promise((resolve) => {
      h.server.onComplete = (socket, u) => {
        resolve(u.token);
        assert.equal(Buffer.compare(Buffer.from(u.data), Buffer.from(bytes)), 0, "the bytes arrived intact");
        return undefined;
      };
    });
    const original = h.server._upload.bind(h.server);
    h.server._upload = (socket, message) => {
      if (message.resume) resumedAt = [...h.server.uploads.values()][0].held;
      original(socket, message);
    };
    await upload.start();
    await token;
    assert.equal(h.server.sockets.length, 2);
    const [first, second] = h.server.sockets;
    assert.equal(first.received[0].resume, undefined);
    assert.equal(second.received[0].resume, "tok1");
    assert.equal(resumedAt, 1.5 * MiB);
    // Nothing the server held was sent again: the second socket starts at its offset.
    assert.equal(second.chunks()[0].offset, resumedAt);
    assert.equal(h.server.appended, bytes.length, "every byte appended exactly once");
    const resent = second.chunks().reduce((n, c) => n + c.data.length, 0);
    assert.equal(resent, bytes.length - resumedAt);
    assertMonotonic(h.progress(), bytes.length);
    assert.ok(h.stages().includes("retrying"));
  });

  test("acknowledgements arriving on a dead socket are ignored", async () => {
    const h = harness({ limits: { window_bytes: MiB, max_chunk_bytes: 256 * 1024 } });
    let first = null;
    h.server.onChunk = (socket, message, upload) => {
      if (!first && upload.held >= 512 * 1024) {
        first = socket;
        socket.serverDrop();
        return "swallow";
      }
      return undefined;
    };
    const upload = new Upload(fileOf(pattern(2 * MiB)), { ...h.options, checksum: false, retryDelays: [1000] });
    const done = upload.start();
    await until(() => first && upload.state === "retrying", { what: "the drop" });
    const before = upload.acknowledged;
    first.pushLate({ type: "progress", id: upload.id, stage: "upload", received: 2 * MiB, total: 2 * MiB });
    first.pushLate({ type: "result", id: upload.id, task: "classify", result: { labels: [] } });
    await settle();
    assert.equal(upload.acknowledged, before);
    assert.equal(upload.state, "retrying");
    await h.clock.tick(1000);
    await done;
    assert.equal(h.server.appended, 2 * MiB);
  });

  test("acknowledgements out of order never move progress back", async () => {
    const h = harness({ limits: { window_bytes: 4 * MiB, max_chunk_bytes: 512 * 1024 } });
    // The server answers every pair of chunks in swapped order: received 1 MiB, then 0.5 MiB…
    let pending = null;
    h.server.onChunk = (socket, message, upload) => {
      const answer = { type: "progress", id: message.id, stage: "upload", received: upload.held + message.data.length,
        total: upload.size };
      upload.data.set(message.data, message.offset);
      upload.held += message.data.length;
      h.server.appended += message.data.length;
      if (pending === null && upload.held < upload.size) {
        pending = answer;
      } else {
        socket.push(answer);
        if (pending) socket.push(pending);
        pending = null;
        if (upload.held === upload.size) h.server.finish(upload);
      }
      return "swallow";
    };
    const acked = [];
    const upload = new Upload(fileOf(pattern(3 * MiB)), { ...h.options, checksum: false, chunkSize: 512 * 1024,
      onProgress: (sent, acknowledged) => acked.push(acknowledged) });
    await upload.start();
    assert.deepEqual(acked, [...acked].sort((a, b) => a - b));
    assert.equal(acked.at(-1), 3 * MiB);
    assert.equal(h.server.appended, 3 * MiB);
  });

  test("offset_mismatch rewinds to the server's offset; answers to stale chunks are ignored", async () => {
    const h = harness({ limits: { window_bytes: 2 * MiB, max_chunk_bytes: 256 * 1024 } });
    let refused = 0;
    h.server.onChunk = (socket, message, upload) => {
      // The third chunk is "lost": the server answers it with offset_mismatch and keeps its offset.
      if (refused === 0 && message.offset === 512 * 1024) {
        refused += 1;
        return { type: "error", id: message.id, code: "offset_mismatch", message: "lost", expected: upload.held };
      }
      return undefined;
    };
    const bytes = pattern(2 * MiB);
    let intact = false;
    h.server.onComplete = (socket, upload) => {
      intact = Buffer.compare(Buffer.from(upload.data), Buffer.from(bytes)) === 0;
      return undefined;
    };
    await analyze(fileOf(bytes), { ...h.options, checksum: false, chunkSize: 256 * 1024 });
    assert.ok(intact);
    const offsets = h.server.socket.chunks().map((c) => c.offset);
    // Sent: 0, 256K, 512K (refused), … up to the window; then from 512K again, exactly once.
    const rewindAt = offsets.indexOf(512 * 1024, 3);
    assert.ok(rewindAt > 2, `a rewind to 512K: ${offsets}`);
    assert.deepEqual(offsets.slice(rewindAt), [2, 3, 4, 5, 6, 7].map((i) => i * 256 * 1024));
    assert.equal(h.server.sockets.length, 1, "a rewind needs no new socket");
  });

  test("rate_limited pauses for retry_after_ms, then resends from the server's offset", async () => {
    const h = harness({ limits: { window_bytes: MiB, max_chunk_bytes: 256 * 1024 } });
    let limited = false;
    h.server.onChunk = (socket, message, upload) => {
      if (!limited && message.offset === 256 * 1024) {
        limited = true;
        return { type: "error", id: message.id, code: "rate_limited", message: "slow down", retry_after_ms: 500,
          expected: upload.held };
      }
      return undefined;
    };
    const upload = new Upload(fileOf(pattern(2 * MiB)), { ...h.options, checksum: false, chunkSize: 256 * 1024 });
    const done = upload.start();
    await until(() => limited && upload._paused, { what: "the rate limit" });
    await settle();
    const sentBefore = h.server.socket.chunks().length;
    await h.clock.tick(499);
    assert.equal(h.server.socket.chunks().length, sentBefore, "nothing is sent during the pause");
    await h.clock.tick(1);
    await done;
    const offsets = h.server.socket.chunks().map((c) => c.offset);
    assert.equal(offsets[sentBefore], 256 * 1024, "resent from the server's offset");
    assert.equal(h.server.appended, 2 * MiB);
  });

  test("failed connections are retried after retryDelays, then given up", async () => {
    const h = harness();
    h.server.refuse = 10;
    const upload = new Upload(fileOf(pattern(1000)), { ...h.options, checksum: false,
      retryDelays: [0, 1000, 3000], transport: "websocket" });
    const done = upload.start();
    await until(() => h.server.sockets.length === 2, { what: "the immediate retry" });
    await settle();
    assert.equal(h.server.sockets.length, 2);
    await h.clock.tick(999);
    assert.equal(h.server.sockets.length, 2, "no retry before its delay");
    await h.clock.tick(1);
    assert.equal(h.server.sockets.length, 3);
    await h.clock.tick(2999);
    assert.equal(h.server.sockets.length, 3);
    await h.clock.tick(1);
    assert.equal(h.server.sockets.length, 4);
    await assert.rejects(done, (error) => error instanceof PixelstreamError && error.code === "connection_failed");
    assert.deepEqual(h.events.filter((e) => e.stage === "retrying").map((e) => [e.attempt, e.delay]),
      [[1, 0], [2, 1000], [3, 3000]]);
    const errors = h.events.filter((e) => e.kind === "error");
    assert.equal(errors.length, 1, "onError once, at the end");
  });

  test("a connection that comes back succeeds; the retry count resets after progress", async () => {
    const h = harness({ limits: { window_bytes: MiB, max_chunk_bytes: 256 * 1024 } });
    // Drop the socket after every 512 KiB appended: five drops, with one retry allowed.
    let drops = 0;
    let droppedAt = 0;
    h.server.onChunk = (socket, message, upload) => {
      if (upload.held > droppedAt && upload.held % (512 * 1024) === 0 && drops < 5) {
        droppedAt = upload.held;
        drops += 1;
        socket.serverDrop();
        return "swallow";
      }
      return undefined;
    };
    await analyze(fileOf(pattern(3 * MiB)), { ...h.options, checksum: false, chunkSize: 256 * 1024, retryDelays: [0] });
    assert.equal(drops, 5);
    assert.equal(h.server.sockets.length, 6);
    assert.equal(h.server.appended, 3 * MiB);
  });

  test("onShouldRetry decides", async () => {
    const h = harness();
    h.server.refuse = 1;
    const seen = [];
    await assert.rejects(analyze(fileOf(pattern(10)), { ...h.options, checksum: false,
      onShouldRetry: (error, attempt) => { seen.push([error.code, attempt]); return false; } }),
    { code: "connection_failed" });
    assert.deepEqual(seen, [["connection_failed", 0]]);
    assert.equal(h.server.sockets.length, 1);
  });

  test("a stalled socket (no acknowledgement for stallTimeout) counts as dropped", async () => {
    const h = harness({ limits: { window_bytes: MiB, max_chunk_bytes: 256 * 1024 } });
    let stalled = null;
    h.server.onChunk = (socket, message, upload) => {
      if (upload.held >= 512 * 1024 && (stalled === null || stalled === socket)) {
        stalled = socket;
        return "swallow"; // a half-open connection: bytes vanish, nothing comes back
      }
      return undefined;
    };
    const upload = new Upload(fileOf(pattern(2 * MiB)), { ...h.options, checksum: false, chunkSize: 256 * 1024,
      stallTimeout: 10_000, retryDelays: [0] });
    const done = upload.start();
    await until(() => stalled !== null && upload._fifo.length > 0 && h.server.socket.inFlight === MiB,
      { what: "the stall" });
    await h.clock.tick(9_999);
    assert.equal(h.server.sockets.length, 1, "not yet");
    await h.clock.tick(1);
    await done;
    assert.equal(stalled.closedWith.code, 4000);
    assert.equal(h.server.sockets.length, 2);
    assert.equal(h.server.appended, 2 * MiB);
  });

  test("a long wait in the queue is not a stall: nothing is owed while the server works", async () => {
    const h = harness();
    let held = null;
    h.server.onComplete = (socket, upload) => {
      held = upload;
      return "hold";
    };
    const upload = new Upload(fileOf(pattern(1000)), { ...h.options, checksum: false, stallTimeout: 1000 });
    const done = upload.start();
    await until(() => held !== null, { what: "all bytes in" });
    await h.clock.tick(60_000);
    assert.equal(h.server.sockets.length, 1);
    h.server.finish(held);
    assert.equal((await done).type, "result");
  });

  test("resuming after the last byte: the result waits for the new socket", async () => {
    const h = harness();
    let upload = null;
    h.server.onComplete = (socket, u) => {
      upload = u;
      return "hold";
    };
    const client = new Upload(fileOf(pattern(5000)), { ...h.options, checksum: false });
    const done = client.start();
    await until(() => upload !== null && client.state === "processing", { what: "all bytes in" });
    h.server.socket.serverDrop();
    await until(() => h.server.sockets.length === 2 && client.state === "processing", { what: "the resume" });
    const resume = h.server.sockets[1].received[0];
    assert.equal(resume.resume, upload.token);
    assert.equal(h.server.sockets[1].chunks().length, 0, "no bytes sent again");
    h.server.finish(upload);
    assert.equal((await done).type, "result");
  });
});

describe("errors", () => {
  test("an outcome error fails the upload once, without retrying, in words a person understands", async () => {
    const h = harness();
    h.server.onComplete = (socket, upload) => {
      h.server.finish(upload, { type: "error", code: "invalid_image", message: "cannot identify image file" });
      return "hold";
    };
    await assert.rejects(analyze(fileOf(pattern(100)), { ...h.options, checksum: false }), (error) => {
      assert.equal(error.code, "invalid_image");
      assert.equal(error.message, "cannot identify image file");
      assert.match(error.description, /not an image the server can read/);
      return true;
    });
    assert.equal(h.server.sockets.length, 1);
    assert.equal(h.events.filter((e) => e.kind === "error").length, 1);
    assert.equal(h.storage.size, 0);
  });

  test("busy is retried after the server's retry_after_ms", async () => {
    const h = harness();
    let busy = 1;
    const original = h.server._upload.bind(h.server);
    h.server._upload = (socket, message) => {
      if (busy-- > 0) return socket.push({ type: "error", id: message.id, code: "busy", message: "busy", retry_after_ms: 2500 });
      return original(socket, message);
    };
    const done = analyze(fileOf(pattern(100)), { ...h.options, checksum: false });
    await until(() => h.events.some((e) => e.stage === "retrying"), { what: "the retry" });
    assert.equal(h.events.find((e) => e.stage === "retrying").delay, 2500);
    await h.clock.tick(2499);
    assert.equal(h.server.socket.received.filter((m) => m.type === "upload").length, 1);
    await h.clock.tick(1);
    assert.equal((await done).type, "result");
  });

  test("an exception in a callback does not break the upload", async () => {
    const h = harness();
    const original = console.error;
    console.error = () => {};
    try {
      const result = await analyze(fileOf(pattern(100)), { ...h.options, checksum: false,
        onProgress: () => { throw new Error("boom"); } });
      assert.equal(result.type, "result");
    } finally {
      console.error = original;
    }
  });
});

describe("abort", () => {
  test("abort sends cancel; the promise rejects with aborted and onError stays quiet", async () => {
    const h = harness({ limits: { window_bytes: MiB, max_chunk_bytes: 256 * 1024 } });
    let hold = true;
    h.server.onChunk = () => (hold ? "swallow" : undefined);
    const upload = new Upload(fileOf(pattern(4 * MiB)), { ...h.options, checksum: false });
    const done = upload.start();
    await until(() => h.server.socket?.chunks().length === 4, { what: "a window of chunks" });
    hold = false;
    await upload.abort();
    await assert.rejects(done, { code: "aborted" });
    assert.equal(upload.state, "aborted");
    const received = h.server.socket.received;
    assert.equal(received.at(-1).type, "cancel");
    assert.equal(received.filter((m) => m.type === "chunk").length, 4, "no chunk after the cancel");
    assert.equal(h.server.uploads.size, 0, "the server freed it");
    assert.equal(h.events.filter((e) => e.kind === "error").length, 0);
    assert.equal(h.storage.size, 0);
  });

  test("an AbortSignal aborts, also while waiting to retry", async () => {
    const h = harness();
    h.server.refuse = 1;
    const controller = new AbortController();
    const done = analyze(fileOf(pattern(100)), { ...h.options, checksum: false, retryDelays: [60_000],
      signal: controller.signal });
    await until(() => h.events.some((e) => e.stage === "retrying"), { what: "the retry wait" });
    controller.abort();
    await assert.rejects(done, { code: "aborted" });
    assert.equal(h.server.sockets.length, 1);
  });
});

describe("resuming across page loads", () => {
  test("the token and fingerprint in storage let a new Upload continue where the old one stopped", async () => {
    const h = harness({ limits: { window_bytes: MiB, max_chunk_bytes: 256 * 1024 } });
    const bytes = pattern(2 * MiB);
    let cut = true;
    h.server.onChunk = (socket, message, upload) => {
      if (cut && upload.held >= MiB) {
        cut = false;
        socket.serverDrop();
        return "swallow";
      }
      return undefined;
    };
    // The first page: no retries, so the drop ends it (as closing the tab would).
    await assert.rejects(analyze(fileOf(bytes), { ...h.options, checksum: false, retryDelays: [] }),
      { code: "connection_lost" });
    assert.equal(h.storage.size, 1);
    const [stored] = h.storage.map.values();
    const { token } = JSON.parse(stored);

    // The reloaded page: a new connection (new factory), the same file.
    const reloaded = new FakeServer();
    reloaded.uploads = h.server.uploads; // the same server state behind a new socket factory
    reloaded.appended = h.server.appended;
    const result = await analyze(fileOf(bytes), { ...h.options, webSocketFactory: reloaded.factory, checksum: false });
    assert.equal(result.type, "result");
    const [announce] = reloaded.socket.received;
    assert.equal(announce.resume, token);
    assert.equal(reloaded.socket.chunks()[0].offset, MiB);
    assert.equal(reloaded.appended, 2 * MiB);
    assert.equal(h.storage.size, 0);
  });

  test("a stored token the server no longer knows starts a fresh upload", async () => {
    const h = harness();
    const file = fileOf(pattern(300));
    const probe = new Upload(file, { ...h.options });
    await probe._loadStored();
    h.storage.setItem(probe._storageKey, JSON.stringify({ token: "expired", size: 300, sha256: null }));
    const result = await analyze(file, { ...h.options, checksum: false });
    assert.equal(result.type, "result");
    const uploads = h.server.socket.received.filter((m) => m.type === "upload");
    assert.deepEqual(uploads.map((m) => m.resume), ["expired", undefined]);
  });
});

describe("checksums", () => {
  test("small files are hashed with crypto.subtle; a known hash is answered from the cache", async () => {
    const h = harness();
    const bytes = pattern(4000);
    const sha = createHash("sha256").update(bytes).digest("hex");
    await analyze(fileOf(bytes), h.options);
    assert.equal(h.server.sockets[0].received[0].sha256, sha);
    h.server.cache.set(sha, { task: "classify", result: { labels: [] }, model: "fake" });
    const stages = [];
    const cached = await analyze(fileOf(bytes, "again.jpg"), { ...h.options, onStage: (s) => stages.push(s) });
    assert.equal(cached.cached, true);
    assert.equal(h.server.socket.received.filter((m) => m.type === "chunk" && m.id === cached.id).length, 0);
    assert.deepEqual(stages, ["hashing", "connecting"]);
  });

  test("a big file is streamed in slices and never read whole (no hash above checksumMaxBytes)", async () => {
    const h = harness({ limits: { window_bytes: 8 * MiB, max_chunk_bytes: 4 * MiB } });
    h.server.keepData = false;
    const size = 64 * MiB;
    const slices = [];
    // A 64 MiB "file" whose bytes exist only slice by slice.
    const file = {
      name: "huge.jpg", type: "image/jpeg", lastModified: 1, size,
      slice(start, end) {
        slices.push(end - start);
        return new Blob([new Uint8Array(end - start).fill(start & 0xff)]);
      },
      arrayBuffer() { throw new Error("read whole"); },
    };
    const result = await analyze(file, { ...h.options, chunkSize: 2 * MiB, checksumMaxBytes: 32 * MiB });
    assert.equal(result.type, "result");
    assert.equal(h.server.sockets[0].received[0].sha256, undefined);
    assert.ok(Math.max(...slices) <= 2 * MiB);
    assert.equal(slices.reduce((a, b) => a + b, 0), size);
  });
});

describe("connection", () => {
  test("the URL: http becomes ws, a bare origin gets /v1/ws, the token goes in the query", () => {
    const url = (u, t) => new Connection({ url: u, token: t, webSocketFactory: () => null }).url;
    assert.equal(url("http://h:8000"), "ws://h:8000/v1/ws");
    assert.equal(url("https://h/v1/ws"), "wss://h/v1/ws");
    assert.equal(url("ws://h/v1/ws", "s3cr=t"), "ws://h/v1/ws?token=s3cr%3Dt");
  });

  test("a close with 1008 (refused token or origin) is not retried", async () => {
    const h = harness();
    h.server.autoOpen = false;
    const done = analyze(fileOf(pattern(10)), { ...h.options, checksum: false });
    await until(() => h.server.sockets.length === 1, { what: "the socket" });
    h.server.socket.serverDrop(1008);
    await assert.rejects(done, { code: "unauthorized" });
    assert.equal(h.server.sockets.length, 1);
  });

  test("no welcome within connectTimeout is a failed connection", async () => {
    const h = harness();
    h.server.autoOpen = false;
    const done = analyze(fileOf(pattern(10)), { ...h.options, checksum: false, connectTimeout: 5000, retryDelays: [] });
    await settle();
    await h.clock.tick(5000);
    await assert.rejects(done, { code: "connection_failed" });
  });
});
