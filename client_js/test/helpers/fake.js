// Test doubles: a manual clock, and a scripted in-memory pixelstream server behind fake
// WebSockets. Nothing here sleeps: `until` yields to the event loop until a condition holds
// (bounded), and time moves only when a test calls `clock.tick`.

import { parseClient } from "../../src/codec.js";

/** Yield to the event loop once (microtasks, then I/O callbacks such as Blob reads). */
export const turn = () => new Promise((resolve) => setImmediate(resolve));

/**
 * Wait until `predicate()` is true, yielding to the event loop between checks. Fails after
 * `turns` yields: a condition that never comes true is a test failure, not a hang.
 */
export async function until(predicate, { turns = 5000, what = "condition" } = {}) {
  for (let i = 0; i < turns; i++) {
    if (predicate()) return;
    await turn();
  }
  throw new Error(`timed out waiting for ${what}`);
}

/** Let everything that can run without time passing run. */
export async function settle(turns = 30) {
  for (let i = 0; i < turns; i++) await turn();
}

/** A manual clock: timers fire only inside `tick`, in time order. */
export class FakeClock {
  constructor() {
    this.time = 0;
    this._timers = new Map();
    this._next = 1;
    this.setTimeout = (callback, ms) => {
      const id = this._next++;
      this._timers.set(id, { at: this.time + Math.max(0, ms || 0), callback, id });
      return id;
    };
    this.clearTimeout = (id) => { this._timers.delete(id); };
    this.now = () => this.time;
  }

  /** Pending timers' delays from now, sorted. */
  pending() {
    return [...this._timers.values()].map((t) => t.at - this.time).sort((a, b) => a - b);
  }

  /** Advance time by `ms`, firing due timers in order and settling after each. */
  async tick(ms) {
    const end = this.time + ms;
    await settle();
    for (;;) {
      let due = null;
      for (const timer of this._timers.values()) {
        if (timer.at <= end && (!due || timer.at < due.at || (timer.at === due.at && timer.id < due.id))) due = timer;
      }
      if (!due) break;
      this._timers.delete(due.id);
      this.time = due.at;
      due.callback();
      await settle();
    }
    this.time = end;
    await settle();
  }
}

const DEFAULT_LIMITS = {
  max_image_bytes: 256 * 1024 * 1024,
  max_chunk_bytes: 1024 * 1024,
  max_pixels: 178956970,
  max_uploads: 8,
  window_bytes: 4 * 1024 * 1024,
};

/** A WebSocket double. The client side is the browser's API; `server*` methods script the peer. */
export class FakeSocket {
  constructor(url, server) {
    this.url = url;
    this.server = server;
    this.readyState = 0;
    this.binaryType = "blob";
    this.onopen = this.onmessage = this.onerror = this.onclose = null;
    /** Everything the client sent, parsed, in order. */
    this.received = [];
    /** Chunk bytes sent and not yet answered, as the client's window sees it. */
    this.inFlight = 0;
    this.maxInFlight = 0;
    this.closedWith = null;
    this._answers = []; // lengths of chunks awaiting their answer, in order
    this._chain = Promise.resolve();
    this.ids = new Map(); // upload id on this socket → token
  }

  // The browser's API ---------------------------------------------------------------------

  send(data) {
    if (this.readyState !== 1) throw new Error("InvalidStateError: the socket is not open");
    this._chain = this._chain.then(async () => {
      const bytes = typeof data === "string" ? data : new Uint8Array(await data.arrayBuffer());
      const message = parseClient(bytes);
      if (message.type === "chunk") {
        this.inFlight += message.data.length;
        this.maxInFlight = Math.max(this.maxInFlight, this.inFlight);
        this._answers.push(message.data.length);
      }
      this.received.push(message);
      if (this.readyState === 1) await this.server._handle(this, message);
    });
  }

  close(code = 1000, reason = "") {
    if (this.readyState === 3) return;
    this.readyState = 3;
    this.closedWith = { code, reason, by: "client" };
    queueMicrotask(() => this.onclose?.({ code, reason, wasClean: true }));
  }

  // The server's side -----------------------------------------------------------------------

  serverOpen() {
    if (this.readyState !== 0) return;
    this.readyState = 1;
    this.onopen?.({});
  }

  /** Deliver a server message (asynchronously, in order). */
  push(message) {
    if (this.readyState !== 1) return;
    const text = JSON.stringify(message);
    queueMicrotask(() => {
      if (this.readyState !== 1) return;
      if (message.type === "progress" && message.stage === "upload" || isChunkAnswer(message)) {
        if (this._answers.length) this.inFlight -= this._answers.shift();
      }
      this.onmessage?.({ data: text });
    });
  }

  /** Deliver a message even though the socket is closed: a late packet of a dead connection. */
  pushLate(message) {
    this.onmessage?.({ data: JSON.stringify(message) });
  }

  /** The network drops the connection (close code 1006). */
  serverDrop(code = 1006) {
    if (this.readyState === 3) return;
    this.readyState = 3;
    this.closedWith = { code, by: "server" };
    queueMicrotask(() => this.onclose?.({ code, reason: "", wasClean: false }));
  }

  chunks() {
    return this.received.filter((m) => m.type === "chunk");
  }
}

function isChunkAnswer(message) {
  return message.type === "error" && message.id && ["offset_mismatch", "rate_limited", "unknown_upload",
    "too_large", "bad_base64"].includes(message.code);
}

/**
 * An in-memory pixelstream server following PROTOCOL.md's rules, with hooks to script faults:
 * - `onChunk(socket, message, upload)`: return "swallow" to send nothing, or an object
 *   to send instead of the normal answer (the chunk is not applied);
 * - `onComplete(socket, upload)`: return "hold" to keep the result back (see `finish`);
 * - `refuse`: how many next sockets close before welcome (connection refused).
 */
export class FakeServer {
  constructor({ limits = {}, tasks = ["classify", "colors"], keepData = true } = {}) {
    this.limits = { ...DEFAULT_LIMITS, ...limits };
    this.tasks = tasks;
    this.keepData = keepData;
    this.sockets = [];
    this.uploads = new Map(); // token → upload
    this.cache = new Map(); // sha256 → result payload
    this.appended = 0; // bytes appended, over all uploads
    this.refuse = 0;
    this.autoOpen = true;
    this.onChunk = null;
    this.onComplete = null;
    this.onFrame = null;
    /** The `progress` stages sent once an upload is complete, in order. */
    this.stages = [{ stage: "queued", position: 1 }, { stage: "decoding" }, { stage: "inference" }];
    this._tokens = 0;
    this.factory = (url) => {
      const socket = new FakeSocket(url, this);
      this.sockets.push(socket);
      if (this.refuse > 0) {
        this.refuse -= 1;
        queueMicrotask(() => socket.serverDrop(1006));
      } else if (this.autoOpen) {
        queueMicrotask(() => this.open(socket));
      }
      return socket;
    };
  }

  get socket() {
    return this.sockets[this.sockets.length - 1];
  }

  open(socket) {
    socket.serverOpen();
    socket.push({ type: "welcome", protocol: 1, session: `s${this.sockets.indexOf(socket)}`,
      limits: this.limits, tasks: this.tasks, default_task: this.tasks[0] });
  }

  /** Every chunk any socket received, in order. */
  allChunks() {
    return this.sockets.flatMap((s) => s.chunks());
  }

  async _handle(socket, message) {
    switch (message.type) {
      case "upload": return this._upload(socket, message);
      case "chunk": return this._chunk(socket, message);
      case "cancel": return this._cancel(socket, message);
      case "frame": return this.onFrame ? this.onFrame(socket, message)
        : socket.push({ type: "result", task: message.task || "classify", result: { labels: [] },
          stream: message.stream, seq: message.seq, cached: false, model: "fake", timings_ms: {} });
      default: return undefined;
    }
  }

  _upload(socket, m) {
    const error = (code, extra = {}) => socket.push({ type: "error", id: m.id, code, message: code, ...extra });
    if (socket.ids.has(m.id)) return error("duplicate_upload");
    if (m.size > this.limits.max_image_bytes) return error("too_large");
    if (m.resume) {
      const upload = this.uploads.get(m.resume);
      if (!upload) return error("unknown_upload");
      if (upload.size !== m.size || (upload.sha256 || null) !== (m.sha256 || null)) return error("bad_message");
      upload.owner = socket;
      upload.id = m.id;
      socket.ids.set(m.id, upload.token);
      socket.push({ type: "accepted", id: m.id, offset: upload.held, resume: upload.token });
      if (upload.held === upload.size) {
        if (upload.outcome) this._deliver(upload, upload.outcome);
        else if (upload.lastStage) socket.push({ ...upload.lastStage, id: m.id });
      }
      return undefined;
    }
    if (m.sha256 && this.cache.has(m.sha256)) {
      socket.push({ type: "accepted", id: m.id, offset: m.size, resume: "cached" });
      socket.push({ type: "result", id: m.id, ...this.cache.get(m.sha256), cached: true, timings_ms: {} });
      return undefined;
    }
    const token = `tok${++this._tokens}`;
    const upload = { token, id: m.id, size: m.size, sha256: m.sha256 || null, task: m.task, options: m.options,
      name: m.name, held: 0, data: this.keepData ? new Uint8Array(m.size) : null, owner: socket,
      outcome: null, lastStage: null, cancelled: false };
    this.uploads.set(token, upload);
    socket.ids.set(m.id, token);
    socket.push({ type: "accepted", id: m.id, offset: 0, resume: token });
    return undefined;
  }

  _chunk(socket, m) {
    const token = socket.ids.get(m.id);
    const upload = token && this.uploads.get(token);
    if (!upload || upload.owner !== socket || upload.cancelled) {
      return socket.push({ type: "error", id: m.id, code: "unknown_upload", message: "no such upload" });
    }
    const scripted = this.onChunk?.(socket, m, upload);
    if (scripted === "swallow") return undefined;
    if (scripted && typeof scripted === "object") return socket.push(scripted);
    const length = m.data.length;
    const mismatch = () => socket.push({ type: "error", id: m.id, code: "offset_mismatch",
      message: `expected offset ${upload.held}`, expected: upload.held });
    if (length > this.limits.max_chunk_bytes) {
      return socket.push({ type: "error", id: m.id, code: "too_large", message: "chunk too large" });
    }
    if (m.offset + length <= upload.held && upload.held > 0 && length > 0) {
      return socket.push({ type: "progress", id: m.id, stage: "upload", received: upload.held, total: upload.size });
    }
    if (m.offset !== upload.held || m.offset + length > upload.size) return mismatch();
    if (upload.data) upload.data.set(m.data, m.offset);
    upload.held += length;
    this.appended += length;
    socket.push({ type: "progress", id: m.id, stage: "upload", received: upload.held, total: upload.size });
    if (upload.held === upload.size) {
      if (this.onComplete?.(socket, upload) === "hold") return undefined;
      this.finish(upload);
    }
    return undefined;
  }

  /** Run the stages and deliver the result (or `outcome`, e.g. an error) to the owner. */
  finish(upload, outcome) {
    for (const stage of this.stages) {
      upload.lastStage = { type: "progress", id: upload.id, ...stage };
      if (upload.owner.readyState === 1) upload.owner.push(upload.lastStage);
    }
    const result = outcome || { type: "result", task: upload.task || "classify",
      result: { labels: [{ label: "tabby, tabby cat", score: 0.9 }] },
      image: { width: 10, height: 10, format: "PNG" }, cached: false, model: "fake",
      timings_ms: { upload: 1 } };
    this._deliver(upload, result);
  }

  _deliver(upload, message) {
    if (upload.owner.readyState !== 1) {
      upload.outcome = message; // kept for a resume
      return;
    }
    upload.owner.push({ ...message, id: upload.id });
    this.uploads.delete(upload.token);
    upload.owner.ids.delete(upload.id);
  }

  _cancel(socket, m) {
    const token = socket.ids.get(m.id);
    const upload = token && this.uploads.get(token);
    if (!upload) return socket.push({ type: "error", id: m.id, code: "unknown_upload", message: "no such upload" });
    upload.cancelled = true;
    this.uploads.delete(token);
    socket.ids.delete(m.id);
    return socket.push({ type: "cancelled", id: m.id });
  }
}

/** Deterministic file contents: byte i is a hash of i. */
export function pattern(size, seed = 1) {
  const out = new Uint8Array(size);
  let x = seed >>> 0;
  for (let i = 0; i < size; i++) {
    x = (x * 1664525 + 1013904223) >>> 0;
    out[i] = x >>> 24;
  }
  return out;
}

/** A File from bytes (Node 20 has File). */
export function fileOf(bytes, name = "photo.jpg", lastModified = 1700000000000) {
  return new File([bytes], name, { type: "image/jpeg", lastModified });
}

/** A Map-backed localStorage. */
export class MemoryStorage {
  constructor() { this.map = new Map(); }
  getItem(key) { return this.map.has(key) ? this.map.get(key) : null; }
  setItem(key, value) { this.map.set(key, String(value)); }
  removeItem(key) { this.map.delete(key); }
  get size() { return this.map.size; }
}
