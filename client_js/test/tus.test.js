// Uploads over tus 1.0 against an in-memory tus server behind an injected fetch: asked for,
// or by themselves when the socket cannot be opened.
import assert from "node:assert/strict";
import { describe, test } from "node:test";

import { PixelstreamError } from "../src/errors.js";
import { encodeMetadata, tusEndpoint, Upload } from "../src/index.js";
import { FakeClock, FakeServer, MemoryStorage, fileOf, pattern, until } from "./helpers/fake.js";

/** A tus server in memory: creation, HEAD, PATCH (offset rule), and events ending in a result. */
class FakeTus {
  constructor() {
    /** @type {Map<string, {length: number, offset: number, metadata: string}>} */
    this.uploads = new Map();
    this.requests = [];
    /** PATCHes to answer 409 once (as if another request had written first). */
    this.conflicts = 0;
    this.fetch = this.fetch.bind(this);
  }

  async fetch(url, init = {}) {
    const method = init.method || "GET";
    const headers = init.headers || {};
    this.requests.push({ method, url, headers });
    assert.equal(headers["Tus-Resumable"], "1.0.0");
    const path = new URL(url).pathname;
    if (method === "POST" && path === "/v1/tus/") {
      const id = `t${this.uploads.size + 1}`;
      this.uploads.set(id, { length: Number(headers["Upload-Length"]), offset: 0,
        metadata: headers["Upload-Metadata"] });
      return new Response(null, { status: 201, headers: { Location: `/v1/tus/${id}` } });
    }
    const [, , , id, suffix] = path.split("/");
    const upload = this.uploads.get(id);
    if (!upload) return Response.json({ code: "unknown_upload", message: "no" }, { status: 404 });
    if (method === "HEAD") {
      return new Response(null, { status: 200, headers: { "Upload-Offset": String(upload.offset) } });
    }
    if (method === "PATCH") {
      if (this.conflicts > 0) {
        this.conflicts -= 1;
        upload.offset += 10; // someone else's bytes
        return Response.json({ code: "offset_mismatch" }, { status: 409 });
      }
      if (Number(headers["Upload-Offset"]) !== upload.offset) {
        return Response.json({ code: "offset_mismatch" }, { status: 409 });
      }
      const bytes = new Uint8Array(await init.body.arrayBuffer());
      upload.offset += bytes.length;
      return new Response(null, { status: 204, headers: { "Upload-Offset": String(upload.offset) } });
    }
    if (method === "GET" && suffix === "events") {
      const events = [
        ["progress", { type: "progress", id, stage: "queued", position: 1 }],
        ["progress", { type: "progress", id, stage: "inference" }],
        ["result", { type: "result", id, task: "colors", result: { ok: upload.offset }, image: {},
          cached: false, model: "m", timings_ms: {} }],
      ];
      const text = events.map(([name, data]) => `event: ${name}\ndata: ${JSON.stringify(data)}\n\n`).join("");
      return new Response(text, { status: 200, headers: { "Content-Type": "text/event-stream" } });
    }
    return new Response(null, { status: 405 });
  }
}

function harness(extra = {}) {
  const server = new FakeServer({});
  const tus = new FakeTus();
  const events = [];
  const options = {
    url: `ws://tus-${Math.random().toString(36).slice(2)}.test/v1/ws`,
    webSocketFactory: server.factory,
    timers: new FakeClock(),
    urlStorage: new MemoryStorage(),
    fetch: tus.fetch,
    checksum: false,
    onProgress: (sent, acknowledged, total) => events.push({ kind: "progress", sent, acknowledged, total }),
    onStage: (stage, detail) => events.push({ kind: "stage", stage, ...detail }),
    ...extra,
  };
  return { server, tus, events, options };
}

describe("tus", () => {
  test("the endpoint comes from the socket URL; metadata is Base64 of UTF-8", () => {
    assert.equal(tusEndpoint("ws://h:8000/v1/ws?token=x"), "http://h:8000/v1/tus/");
    assert.equal(tusEndpoint("wss://h/app/v1/ws"), "https://h/app/v1/tus/");
    assert.equal(encodeMetadata({ filename: "ü.png", task: undefined }), "filename w7wucG5n");
  });

  test("transport tus: PATCHes of tusChunkSize, the same progress and stages, the result", async () => {
    const h = harness({ transport: "tus", tusChunkSize: 400, task: "colors", options: { k: 1 } });
    const upload = new Upload(fileOf(pattern(1000)), h.options);
    const result = await upload.start();
    assert.equal(upload.transport, "tus");
    assert.equal(h.server.sockets.length, 0, "no socket opened");
    assert.deepEqual(result.result, { ok: 1000 });
    assert.equal(result.id, upload.id);
    const acked = h.events.filter((e) => e.kind === "progress").map((e) => e.acknowledged);
    assert.deepEqual(acked, [0, 400, 800, 1000]);
    const stages = h.events.filter((e) => e.kind === "stage").map((e) => e.stage);
    assert.deepEqual(stages, ["connecting", "upload", "queued", "inference"]);
    const created = h.tus.requests[0];
    assert.match(created.headers["Upload-Metadata"], /task Y29sb3Jz/);
    assert.equal(created.headers["Upload-Length"], "1000");
  });

  test("a 409 goes on from the offset the server reports", async () => {
    const h = harness({ transport: "tus", tusChunkSize: 300 });
    h.tus.conflicts = 1;
    const upload = new Upload(fileOf(pattern(900)), h.options);
    await upload.start();
    const patches = h.tus.requests.filter((r) => r.method === "PATCH").map((r) => r.headers["Upload-Offset"]);
    assert.deepEqual(patches, ["0", "10", "310", "610"]);
    assert.ok(h.tus.requests.some((r) => r.method === "HEAD"));
  });

  test("auto: a socket that closes before welcome twice turns to tus, and so do later uploads", async () => {
    const h = harness({ retryDelays: [0, 0, 0] });
    h.server.refuse = 100;
    const first = new Upload(fileOf(pattern(500)), h.options);
    const result = await first.start();
    assert.equal(first.transport, "tus");
    assert.equal(h.server.sockets.length, 2, "two failed opens, then tus");
    assert.deepEqual(result.result, { ok: 500 });
    const upload = h.events.find((e) => e.stage === "upload");
    assert.equal(upload.transport, "tus");
    const second = new Upload(fileOf(pattern(200), "b.jpg"), h.options);
    await second.start();
    assert.equal(second.transport, "tus");
    assert.equal(h.server.sockets.length, 2, "the second went straight to tus");
  });

  test("websocket only: no fallback", async () => {
    const h = harness({ transport: "websocket", retryDelays: [0] });
    h.server.refuse = 100;
    const upload = new Upload(fileOf(pattern(100)), h.options);
    await assert.rejects(upload.start(), (e) => e instanceof PixelstreamError && e.code === "connection_failed");
    assert.equal(h.tus.requests.length, 0);
  });

  test("an error event rejects with its code", async () => {
    const h = harness({ transport: "tus" });
    h.tus.fetch = async () => Response.json({ code: "too_large", message: "big" }, { status: 413 });
    const upload = new Upload(fileOf(pattern(100)), { ...h.options, fetch: h.tus.fetch });
    await assert.rejects(upload.start(), (e) => e instanceof PixelstreamError && e.code === "too_large");
    await until(() => upload.state === "failed");
  });
});
