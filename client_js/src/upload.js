// @ts-check
/**
 * Resumable, chunked uploads of one image over the shared socket.
 *
 * ```js
 * const upload = new Upload(file, { onProgress, onStage, onResult, onError });
 * const result = await upload.start();   // or: await analyze(file, options)
 * upload.abort();                        // sends `cancel`
 * ```
 *
 * The file is streamed from `Blob.slice`: a binary chunk is `new Blob([header, slice])`, which
 * the browser reads and sends itself, so the page never holds the file in memory.
 *
 * Where the socket cannot be opened (twice in a row, or once another upload found it so), the
 * upload goes on over tus 1.0 and plain HTTP by itself (`transport: "auto"`, see ./tus.js):
 * the same promise, callbacks and errors; `upload.transport` says which is in use.
 *
 * @module upload
 */

import { encodeBinaryHeader, encodeText } from "./codec.js";
import { defaultTimers, sharedConnection } from "./connection.js";
import { callSafely, PixelstreamError } from "./errors.js";
import { TusRequests, tusEndpoint } from "./tus.js";

/**
 * A place to keep resume tokens across page loads (localStorage's shape).
 * @typedef {{getItem(key: string): string | null, setItem(key: string, value: string): void,
 *            removeItem(key: string): void}} UrlStorage
 */

/**
 * @typedef {"hashing" | "connecting" | "waiting" | "upload" | "queued" | "decoding" | "inference"
 *           | "retrying"} StageName
 */

/**
 * @typedef {object} UploadOptions
 * @property {string} [url] server or socket URL; default: this page's origin, `/v1/ws`
 * @property {string} [token] API token (sent as `?token=`)
 * @property {number} [chunkSize] bytes per chunk (default 1 MiB; capped by the server's `max_chunk_bytes`)
 * @property {"binary" | "base64"} [encoding] binary frames (default) or Base64 in JSON
 * @property {string} [task] the server's task (default: the server's default task)
 * @property {Record<string, unknown>} [options] task options, e.g. `{top_k: 5}`
 * @property {string} [name] file name sent to the server (default: `file.name`)
 * @property {number[]} [retryDelays] ms to wait before each retry (default `[0, 1000, 3000, 5000]`);
 *   the count resets whenever the server acknowledges new bytes
 * @property {number} [stallTimeout] ms without an answer, while one is due, that count as a drop (default 15000)
 * @property {number} [connectTimeout] ms to wait for the server's welcome (default 15000)
 * @property {boolean | "auto"} [checksum] SHA-256 the file first: `"auto"` (default) only up to
 *   `checksumMaxBytes` and where `crypto.subtle` exists; `true` always; `false` never
 * @property {number} [checksumMaxBytes] largest file hashed in `"auto"` mode (default 32 MiB)
 * @property {boolean} [storeFingerprintForResuming] keep the resume token in `urlStorage` (default true)
 * @property {boolean} [removeFingerprintOnSuccess] forget it once the result is in (default true)
 * @property {UrlStorage | null} [urlStorage] default: `localStorage` where available
 * @property {(file: Blob, options: UploadOptions) => string | null | Promise<string | null>} [fingerprint]
 *   names a file across page loads (default: name, type, size, lastModified and the server URL)
 * @property {AbortSignal} [signal] aborts the upload when it fires
 * @property {"auto" | "websocket" | "tus"} [transport] `"auto"` (default): the socket, and tus
 *   over HTTP when the socket cannot be opened; `"websocket"` or `"tus"`: only that one
 * @property {number} [tusChunkSize] bytes per PATCH over tus (default 8 MiB)
 * @property {import("./tus.js").FetchLike} [fetch] default: the global `fetch` (tus requests)
 * @property {import("./connection.js").WebSocketFactory} [webSocketFactory] default: `new WebSocket(url)`
 * @property {import("./connection.js").Connection} [connection] use this connection instead of the shared one
 * @property {Partial<import("./connection.js").Timers>} [timers] injectable timers (tests)
 * @property {(sent: number, acknowledged: number, total: number) => void} [onProgress]
 *   called when the server acknowledges bytes: `acknowledged` is what the server holds (never
 *   decreases); `sent` is what was handed to the socket (it steps back after a reconnect)
 * @property {(chunkSize: number, acknowledged: number, total: number) => void} [onChunkComplete]
 * @property {(stage: StageName, detail: {position?: number, attempt?: number, delay?: number,
 *             error?: PixelstreamError, offset?: number, done?: number, total?: number,
 *             transport?: "websocket" | "tus"}) => void} [onStage]
 *   `transport`: with `connecting` and `upload`, the transport in use
 *   `position`: the place in the queue (`queued`); `done` of `total`: tiles finished while a
 *   spatial task looks at a large image tile by tile (`inference`, repeated as they finish)
 * @property {(result: import("./codec.js").ResultMessage) => void} [onResult]
 * @property {(error: PixelstreamError) => void} [onError] not called for `abort()`
 * @property {(error: PixelstreamError, retryAttempt: number, options: UploadOptions) => boolean} [onShouldRetry]
 *   decides whether to retry (default: `error.retryable`)
 */

/**
 * @typedef {"chunkSize" | "encoding" | "retryDelays" | "stallTimeout" | "connectTimeout" |
 *   "checksum" | "checksumMaxBytes" | "storeFingerprintForResuming" |
 *   "removeFingerprintOnSuccess" | "transport" | "tusChunkSize"} DefaultedOption
 */

/** The defaults every upload starts from. @type {Readonly<Required<Pick<UploadOptions, DefaultedOption>>>} */
export const defaultOptions = Object.freeze({
  chunkSize: 1024 * 1024,
  encoding: "binary",
  retryDelays: [0, 1000, 3000, 5000],
  stallTimeout: 15000,
  connectTimeout: 15000,
  checksum: "auto",
  checksumMaxBytes: 32 * 1024 * 1024,
  storeFingerprintForResuming: true,
  removeFingerprintOnSuccess: true,
  transport: "auto",
  tusChunkSize: 8 * 1024 * 1024,
});

/** Sockets that failed to open before a welcome, in a row, before `auto` turns to tus. */
const FAILED_OPENS_BEFORE_TUS = 2;

/** Errors that answer one chunk (and so pop its record); the others concern the whole upload. */
const CHUNK_CODES = new Set(["offset_mismatch", "rate_limited", "too_large", "bad_base64",
  "bad_message", "unknown_upload"]);

const STORAGE_PREFIX = "pixelstream::";
const MAX_NAME = 1000;

let uploadCounter = 0;

/** A fresh upload id: `[A-Za-z0-9._-]`, unique among this page's uploads. */
function newUploadId() {
  uploadCounter += 1;
  return `u${uploadCounter}-${Math.random().toString(36).slice(2, 10)}`;
}

/**
 * The default fingerprint: the file's name, type, size and modification time, and the server.
 * @param {Blob} file
 * @param {UploadOptions} options
 * @returns {string | null}
 */
export function defaultFingerprint(file, options) {
  const named = /** @type {File} */ (file);
  if (typeof named.name !== "string" || typeof named.lastModified !== "number") return null;
  let server = options.url || "";
  if (options.connection) server = options.connection.url;
  else if (typeof location !== "undefined") server = new URL(server || "/v1/ws", location.href).href;
  server = server.split("?")[0];
  return ["pixelstream", named.name, file.type, file.size, named.lastModified, server].join("-");
}

/** @returns {UrlStorage | null} */
function defaultStorage() {
  try {
    return globalThis.localStorage ?? null;
  } catch {
    return null; // e.g. a sandboxed frame
  }
}

/** @param {ArrayBuffer} digest */
function hex(digest) {
  return Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, "0")).join("");
}

/**
 * What a server `progress` message adds to its stage: the queue position, or the tiles done so
 * far (only numbers pass: a message from the wire is not trusted to hold the right types).
 * @param {import("./codec.js").ProgressMessage} message
 * @returns {{position?: number, done?: number, total?: number}}
 */
function stageDetail(message) {
  /** @type {{position?: number, done?: number, total?: number}} */
  const detail = {};
  if (message.stage === "queued" && Number.isFinite(message.position)) detail.position = message.position;
  if (message.stage === "inference" && Number.isFinite(message.done) && Number.isFinite(message.total)) {
    detail.done = message.done;
    detail.total = message.total;
  }
  return detail;
}

/** @param {unknown} error @returns {PixelstreamError} */
function asPixelstreamError(error) {
  if (error instanceof PixelstreamError) return error;
  return new PixelstreamError("internal", error instanceof Error ? error.message : String(error),
    { cause: error, retryable: false });
}

/**
 * One file's upload and analysis. `start()` runs it and resolves with the server's `result`
 * message; it can be called more than once (it returns the same promise).
 */
export class Upload {
  /**
   * @param {Blob} file a File or Blob; it is read in slices, never whole (except to hash it)
   * @param {UploadOptions} [options]
   */
  constructor(file, options = {}) {
    if (!file || typeof file.slice !== "function" || typeof file.size !== "number") {
      throw new TypeError("file must be a Blob or File");
    }
    this.file = file;
    /** @type {UploadOptions & typeof defaultOptions} */
    this.options = { ...defaultOptions, ...options };
    /** The id this upload has on the socket. */
    this.id = newUploadId();
    this.total = file.size;
    /** Bytes handed to the socket (from where the server stood at the last accepted). */
    this.sent = 0;
    /** Bytes the server acknowledged: never decreases. */
    this.acknowledged = 0;
    /** @type {"idle" | "hashing" | "connecting" | "waiting" | "announcing" | "sending" |
     *   "processing" | "retrying" | "aborting" | "done" | "failed" | "aborted"} */
    this.state = "idle";
    /** @type {string | null} the server's resume token */
    this.resumeToken = null;
    /** @type {string | null | undefined} hex SHA-256; null when not computed */
    this.sha256 = undefined;
    /** @type {import("./codec.js").ResultMessage | null} */
    this.result = null;
    /** @type {Promise<import("./codec.js").ResultMessage> | null} */
    this._promise = null;
    /** @type {{offset: number, length: number, gen: number}[]} chunks awaiting their answer, in order */
    this._fifo = [];
    this._gen = 0;
    this._retryAttempt = 0;
    this._paused = false;
    this._pauseTimer = null;
    /** @type {Promise<void>} keeps Base64 chunks in order while their bytes are read */
    this._chain = Promise.resolve();
    /** @type {{resolve: (r: any) => void, reject: (e: PixelstreamError) => void} | null} */
    this._deferred = null;
    this._attached = false;
    this._hasSlot = false;
    /** @type {string | null} */
    this._storageKey = null;
    this._aborted = false;
    /** @type {Promise<void> | null} */
    this._abortPromise = null;
    /** @type {(() => void) | null} */
    this._abortDone = null;
    /** @type {(error: PixelstreamError) => void} */
    this._abortReject = () => {};
    /** @type {Promise<never>} rejects when aborted: raced against every wait */
    this._abortSignal = new Promise((_, reject) => { this._abortReject = reject; });
    this._abortSignal.catch(() => {});
    /** @type {import("./connection.js").Connection | null} */
    this._conn = null;
    /** @type {"websocket" | "tus"} the transport in use */
    this.transport = this.options.transport === "tus" ? "tus" : "websocket";
    /** @type {string | null} the tus upload URL (the capability that resumes it) */
    this._tusUrl = null;
    /** @type {TusRequests | null} */
    this._tus = null;
    this._failedOpens = 0;
    this._http = new AbortController();
    /** @type {import("./connection.js").Timers} */
    this._timers = { ...defaultTimers, ...this.options.timers };
  }

  /**
   * Run the upload: resolves with the `result` message, rejects with a PixelstreamError
   * (`code` "aborted" after `abort()`). Callbacks fire either way.
   * @returns {Promise<import("./codec.js").ResultMessage>}
   */
  start() {
    if (!this._promise) {
      this._promise = this._run();
      this._promise.catch(() => {}); // callback users need not handle the promise
    }
    return this._promise;
  }

  /**
   * Stop the upload. If the server knows it, a `cancel` is sent and the returned promise
   * resolves once the server confirms (or after 5 s, or when the socket is gone).
   * The stored resume token is forgotten.
   * @returns {Promise<void>}
   */
  abort() {
    if (this._abortPromise) return this._abortPromise;
    if (["done", "failed", "aborted"].includes(this.state)) return Promise.resolve();
    this._aborted = true;
    this._abortPromise = (async () => {
      this._forgetStored();
      if (this.transport === "tus" && this._tus && this._tusUrl) {
        this._http.abort();
        await this._tus.terminate(this._tusUrl);
      }
      const conn = this._conn;
      if (this._attached && conn && conn.isOpen
          && ["announcing", "sending", "processing"].includes(this.state)) {
        this.state = "aborting";
        await new Promise((resolve) => {
          const timer = this._timers.setTimeout(() => resolve(undefined), 5000);
          this._abortDone = () => {
            this._timers.clearTimeout(timer);
            resolve(undefined);
          };
          try {
            conn.send(encodeText({ type: "cancel", id: this.id }));
          } catch {
            this._abortDone();
          }
        });
      }
      const error = new PixelstreamError("aborted", "the upload was aborted", { retryable: false });
      this._abortReject(error);
      this._fail(error);
      if (this._promise) await this._promise.catch(() => {});
    })();
    return this._abortPromise;
  }

  // The run: checksum, then attempts with retries. ------------------------------------------

  /** @returns {Promise<import("./codec.js").ResultMessage>} */
  async _run() {
    const o = this.options;
    try {
      if (this.total < 1) {
        throw new PixelstreamError("invalid_image", "the file is empty", { retryable: false });
      }
      if (o.signal) {
        if (o.signal.aborted) this.abort();
        else o.signal.addEventListener("abort", () => { this.abort(); }, { once: true });
      }
      this._checkAborted();
      this._conn = sharedConnection({ ...o, timers: this._timers });
      if (o.transport === "auto" && this._conn.webSocketBlocked) this.transport = "tus";
      await this._loadStored();
      if (this.sha256 === undefined) this.sha256 = await this._checksum();
      const result = await this._loop();
      this.state = "done";
      this.result = result;
      this._cleanup();
      if (o.removeFingerprintOnSuccess) this._forgetStored();
      callSafely(o.onResult, result);
      return result;
    } catch (caught) {
      const error = this._aborted
        ? new PixelstreamError("aborted", "the upload was aborted", { retryable: false })
        : asPixelstreamError(caught);
      this._cleanup();
      if (error.code === "aborted") {
        this.state = "aborted";
      } else {
        this.state = "failed";
        // Keep the token only where coming back later can help.
        if (!error.retryable) this._forgetStored();
        callSafely(o.onError, error);
      }
      throw error;
    }
  }

  /** @returns {Promise<import("./codec.js").ResultMessage>} */
  async _loop() {
    const o = this.options;
    for (;;) {
      this._checkAborted();
      try {
        return this.transport === "tus" ? await this._attemptTus() : await this._attempt();
      } catch (caught) {
        const error = asPixelstreamError(caught);
        this._endAttempt();
        if (this._aborted || error.code === "aborted") throw error;
        if (this._fallsBack(error)) continue;
        if (error.code === "unknown_upload" || error.code === "upload_expired") this._dropToken();
        const delays = o.retryDelays || [];
        const attempt = this._retryAttempt;
        const retry = o.onShouldRetry ? o.onShouldRetry(error, attempt, o) : error.retryable;
        if (!retry || attempt >= delays.length) throw error;
        const delay = Math.max(delays[attempt], error.retryAfterMs || 0);
        this._retryAttempt += 1;
        this.state = "retrying";
        this._stage("retrying", { attempt: attempt + 1, delay, error });
        await this._sleep(delay);
      }
    }
  }

  /** One try on one socket: resolves with the result, rejects on a drop or an error. */
  async _attempt() {
    const conn = /** @type {import("./connection.js").Connection} */ (this._conn);
    this.state = "connecting";
    this._stage("connecting", { transport: "websocket" });
    const welcome = await this._abortable(conn.ready());
    if (this.total > welcome.limits.max_image_bytes) {
      throw new PixelstreamError("too_large",
        `the file has ${this.total} bytes; the server accepts up to ${welcome.limits.max_image_bytes}`,
        { retryable: false });
    }
    if (!this._hasSlot) {
      this.state = "waiting";
      const slot = conn.acquireSlot(this);
      let waited = false;
      slot.then(() => { waited = true; });
      await Promise.resolve();
      if (!waited) this._stage("waiting", {});
      await this._abortable(slot);
      this._hasSlot = true;
    }
    this._checkAborted();
    return await new Promise((resolve, reject) => {
      this._deferred = { resolve, reject };
      try {
        conn.attach(`u:${this.id}`, this);
        this._attached = true;
        this._announce();
      } catch (error) {
        this._fail(asPixelstreamError(error));
      }
    });
  }

  /**
   * With `transport: "auto"`: a socket that failed to open before its welcome, twice in a row,
   * turns this upload (and later ones on this server) to tus. True when it just did.
   * @param {PixelstreamError} error
   */
  _fallsBack(error) {
    if (this.options.transport !== "auto" || this.transport !== "websocket") return false;
    if (error.code !== "connection_failed" || this.state !== "connecting") {
      this._failedOpens = 0;
      return false;
    }
    this._failedOpens += 1;
    const conn = /** @type {import("./connection.js").Connection} */ (this._conn);
    if (this._failedOpens < FAILED_OPENS_BEFORE_TUS && !conn.webSocketBlocked) return false;
    conn.webSocketBlocked = true;
    this.transport = "tus";
    this._dropToken(); // a socket's resume token means nothing over tus
    return true;
  }

  /** One try over tus: create (or find where the server stands), PATCH the rest, follow. */
  async _attemptTus() {
    const o = this.options;
    const conn = /** @type {import("./connection.js").Connection} */ (this._conn);
    if (!this._tus) {
      this._tus = new TusRequests(tusEndpoint(conn.url), {
        token: o.token,
        fetch: (url, init) => (o.fetch || globalThis.fetch)(url, { ...init, signal: this._http.signal }),
      });
    }
    const tus = this._tus;
    this.state = "connecting";
    this._stage("connecting", { transport: "tus" });
    let offset = 0;
    if (this._tusUrl) {
      offset = await this._abortable(tus.offset(this._tusUrl));
    } else {
      const named = /** @type {File} */ (this.file);
      const name = o.name ?? (typeof named.name === "string" && named.name ? named.name : undefined);
      this._tusUrl = await this._abortable(tus.create(this.total, {
        filename: name === undefined ? undefined : name.slice(0, MAX_NAME),
        task: o.task,
        options: o.options ? JSON.stringify(o.options) : undefined,
        sha256: this.sha256 || undefined,
      }));
      this.resumeToken = this._tusUrl;
      this._store();
    }
    const url = this._tusUrl;
    this.sent = offset;
    this._acknowledge(offset, true);
    this.state = "sending";
    this._stage("upload", { offset, transport: "tus" });
    while (offset < this.total) {
      const length = Math.max(1, Math.min(o.tusChunkSize, this.total - offset));
      this.sent = offset + length;
      const held = await this._abortable(tus.patch(url, offset, this.file.slice(offset, offset + length)));
      if (held > offset) callSafely(o.onChunkComplete, held - offset, held, this.total);
      this._acknowledge(held, false);
      offset = Math.max(offset, held);
    }
    this.state = "processing";
    const result = await this._abortable(tus.outcome(url, (message) => {
      if (message.stage !== "upload") this._stage(message.stage, stageDetail(message));
    }));
    return { ...result, id: this.id };
  }

  _announce() {
    const o = this.options;
    const named = /** @type {File} */ (this.file);
    const name = o.name ?? (typeof named.name === "string" && named.name ? named.name : undefined);
    this.state = "announcing";
    this._fifo = [];
    this._gen += 1;
    /** @type {import("./codec.js").UploadMessage} */
    const message = {
      type: "upload",
      id: this.id,
      size: this.total,
      sha256: this.sha256 || undefined,
      name: name === undefined ? undefined : name.slice(0, MAX_NAME),
      task: o.task,
      options: o.options,
      resume: this.resumeToken || undefined,
    };
    /** @type {import("./connection.js").Connection} */ (this._conn).send(encodeText(message));
  }

  // Messages from the connection. ------------------------------------------------------------

  /** @param {any} message */
  _receive(message) {
    if (this.state === "aborting") {
      // Answers to chunks still in flight may come first; any other outcome ends the wait.
      if (message.type === "cancelled" || message.type === "result" || (message.type === "error"
          && message.code !== "offset_mismatch" && message.code !== "rate_limited")) {
        this._abortDone?.();
      }
      return;
    }
    switch (message.type) {
      case "accepted":
        this._onAccepted(message);
        break;
      case "progress":
        if (message.stage === "upload") this._onAck(message);
        else this._onServerStage(message);
        break;
      case "result":
        this._settle(message);
        break;
      case "cancelled":
        this._fail(new PixelstreamError("aborted", "the server cancelled the upload", { retryable: false }));
        break;
      case "error":
        this._onError(message);
        break;
      default:
        break;
    }
  }

  /** @param {import("./codec.js").AcceptedMessage} message */
  _onAccepted(message) {
    if (this.state !== "announcing") return;
    this.resumeToken = message.resume;
    this._store();
    const offset = Math.min(Math.max(0, message.offset), this.total);
    this.sent = offset;
    this._acknowledge(offset, true);
    if (offset >= this.total) {
      this._allIn();
      return;
    }
    this.state = "sending";
    this._stage("upload", { offset, transport: "websocket" });
    /** @type {import("./connection.js").Connection} */ (this._conn).pump();
  }

  /** @param {import("./codec.js").ProgressMessage} message */
  _onAck(message) {
    if (this.state !== "sending") return;
    const received = Math.min(Math.max(0, Number(message.received) || 0), this.total);
    const chunk = this._fifo.shift(); // the server answers every chunk, in order
    this._acknowledge(received, false);
    if (chunk) callSafely(this.options.onChunkComplete, chunk.length, this.acknowledged, this.total);
    if (this.acknowledged >= this.total) this._allIn();
    /** @type {import("./connection.js").Connection} */ (this._conn).pump();
  }

  /** @param {import("./codec.js").ProgressMessage} message */
  _onServerStage(message) {
    if (this.state === "announcing") return;
    if (this.acknowledged < this.total) {
      // Processing means every byte is in, whatever acknowledgements went missing.
      this.sent = this.total;
      this._acknowledge(this.total, false);
    }
    if (this.state === "sending") this._allIn();
    this._stage(message.stage, stageDetail(message));
  }

  /** @param {import("./codec.js").ErrorMessage} message */
  _onError(message) {
    const error = PixelstreamError.fromMessage(message);
    if (this.state === "announcing") {
      if (this.resumeToken && (error.code === "unknown_upload" || error.code === "bad_message")) {
        // The stored token names nothing any more (or another file): start afresh.
        this._dropToken();
        this._announce();
        return;
      }
      this._fail(error);
      return;
    }
    if (this.state === "sending" && CHUNK_CODES.has(error.code) && this._fifo.length) {
      const chunk = /** @type {{offset: number, length: number, gen: number}} */ (this._fifo.shift());
      if (chunk.gen !== this._gen) {
        // The answer to a chunk sent before the last rewind: already dealt with.
        /** @type {import("./connection.js").Connection} */ (this._conn).pump();
        return;
      }
      if (error.code === "offset_mismatch" && typeof error.expected === "number") {
        this._rewind(error.expected);
        return;
      }
      if (error.code === "rate_limited") {
        this._pauseThenRewind(error.retryAfterMs ?? 1000, error.expected ?? chunk.offset);
        return;
      }
      if (error.code === "offset_mismatch") error.retryable = true; // a new socket resumes right
    }
    this._fail(error);
  }

  /**
   * The server holds `expected` bytes: resend from there. Chunks already in flight are now
   * stale; their answers are ignored.
   * @param {number} expected
   */
  _rewind(expected) {
    const offset = Math.min(Math.max(0, expected), this.total);
    this._gen += 1;
    this.sent = offset;
    this._acknowledge(offset, false);
    if (this.acknowledged >= this.total) this._allIn();
    /** @type {import("./connection.js").Connection} */ (this._conn).pump();
  }

  /** @param {number} ms @param {number} offset */
  _pauseThenRewind(ms, offset) {
    this._gen += 1;
    this._paused = true;
    if (this._pauseTimer) this._timers.clearTimeout(this._pauseTimer);
    this._pauseTimer = this._timers.setTimeout(() => {
      this._pauseTimer = null;
      this._paused = false;
      if (this.state === "sending") this._rewind(offset);
    }, ms);
  }

  /** @param {PixelstreamError} error */
  _connectionLost(error) {
    this._attached = false;
    this._fifo = [];
    this._gen += 1;
    if (this.state === "aborting") {
      this._abortDone?.();
      return;
    }
    this._fail(error);
  }

  /** True while the server owes this upload an answer (for stall detection). */
  _awaitingReply() {
    return this.state === "announcing" || this.state === "aborting" || this._fifo.length > 0;
  }

  // Sending, for the connection's pump. -------------------------------------------------------

  /** Bytes this upload would send now. */
  _wantBytes() {
    if (this.state !== "sending" || this._paused) return 0;
    const limits = /** @type {import("./connection.js").Connection} */ (this._conn).welcome?.limits;
    const left = this.total - this.sent;
    if (left <= 0) return 0;
    return Math.max(1, Math.min(left, this.options.chunkSize, limits ? limits.max_chunk_bytes : Infinity));
  }

  _inFlightBytes() {
    let total = 0;
    for (const chunk of this._fifo) total += chunk.length;
    return total;
  }

  /** Send the next `length` bytes. @param {number} length */
  _sendChunk(length) {
    const conn = /** @type {import("./connection.js").Connection} */ (this._conn);
    const offset = this.sent;
    const entry = { offset, length, gen: this._gen };
    this._fifo.push(entry);
    this.sent += length;
    const header = /** @type {const} */ ({ type: "chunk", id: this.id, offset });
    const slice = this.file.slice(offset, offset + length);
    if (this.options.encoding !== "base64") {
      // The browser reads the slice and sends it; the page never touches the bytes.
      conn.send(new Blob([/** @type {BlobPart} */ (encodeBinaryHeader(header)), slice]));
      return;
    }
    const epoch = conn.epoch;
    this._chain = this._chain.then(async () => {
      let bytes;
      try {
        bytes = new Uint8Array(await slice.arrayBuffer());
      } catch (error) {
        this._fail(new PixelstreamError("file_unreadable", "the file could not be read",
          { cause: error, retryable: false }));
        return;
      }
      if (conn.epoch !== epoch || entry.gen !== this._gen || this.state !== "sending") {
        // A rewind or a new socket came while reading: this chunk no longer goes out.
        const index = this._fifo.indexOf(entry);
        if (index >= 0) this._fifo.splice(index, 1);
        conn.pump();
        return;
      }
      try {
        conn.send(encodeText({ ...header, data: bytes }));
      } catch {
        // the connection reported the loss to us already
      }
    });
  }

  // Outcomes. ---------------------------------------------------------------------------------

  /** @param {number} value @param {boolean} always */
  _acknowledge(value, always) {
    let moved = false;
    if (value > this.acknowledged) {
      this.acknowledged = value;
      this._retryAttempt = 0; // progress resets the retry count, as in tus
      moved = true;
    }
    if (this.sent < this.acknowledged) this.sent = this.acknowledged;
    if (moved || always) callSafely(this.options.onProgress, this.sent, this.acknowledged, this.total);
  }

  /** Every byte is in: the server decodes and analyses now. */
  _allIn() {
    this.state = "processing";
    this._fifo = [];
    this._releaseSlot();
  }

  /** @param {import("./codec.js").ResultMessage} result */
  _settle(result) {
    const deferred = this._deferred;
    this._deferred = null;
    this._detach();
    deferred?.resolve(result);
  }

  /** @param {PixelstreamError} error */
  _fail(error) {
    const deferred = this._deferred;
    this._deferred = null;
    this._detach();
    deferred?.reject(error);
  }

  _detach() {
    if (this._attached && this._conn) this._conn.detach(`u:${this.id}`, this);
    this._attached = false;
  }

  _endAttempt() {
    this._detach();
    this._fifo = [];
    this._paused = false;
    if (this._pauseTimer) this._timers.clearTimeout(this._pauseTimer);
    this._pauseTimer = null;
  }

  _releaseSlot() {
    if (this._conn) this._conn.releaseSlot(this);
    this._hasSlot = false;
  }

  _cleanup() {
    this._endAttempt();
    this._releaseSlot();
  }

  // Checksum and stored tokens. ----------------------------------------------------------------

  /**
   * SHA-256 of the file, or null when skipped. `crypto.subtle.digest` needs the whole file in
   * one buffer, so by default only files up to `checksumMaxBytes` are hashed.
   * @returns {Promise<string | null>}
   */
  async _checksum() {
    const o = this.options;
    if (o.checksum === false) return null;
    const subtle = globalThis.crypto?.subtle;
    if (!subtle) return null; // not a secure context (plain http to another host)
    if (o.checksum !== true && this.total > o.checksumMaxBytes) return null;
    this.state = "hashing";
    this._stage("hashing", {});
    let buffer;
    try {
      buffer = await this._abortable(this.file.arrayBuffer());
    } catch (error) {
      this._checkAborted();
      throw new PixelstreamError("file_unreadable", "the file could not be read",
        { cause: error, retryable: false });
    }
    const digest = await this._abortable(subtle.digest("SHA-256", buffer));
    return hex(digest);
  }

  _storage() {
    const o = this.options;
    if (!o.storeFingerprintForResuming) return null;
    return o.urlStorage === undefined ? defaultStorage() : o.urlStorage;
  }

  async _loadStored() {
    const storage = this._storage();
    if (!storage) return;
    const fingerprint = await (this.options.fingerprint || defaultFingerprint)(this.file, this.options);
    if (!fingerprint) return;
    this._storageKey = STORAGE_PREFIX + fingerprint;
    let stored = null;
    try {
      stored = JSON.parse(storage.getItem(this._storageKey) || "null");
    } catch {
      stored = null;
    }
    if (stored && stored.size === this.total && typeof stored.token === "string") {
      if (stored.transport === "tus") {
        if (this.options.transport === "websocket") return;
        this.transport = "tus";
        this._tusUrl = stored.token;
      }
      this.resumeToken = stored.token;
      // A resume must declare the checksum the upload began with (or none).
      this.sha256 = typeof stored.sha256 === "string" ? stored.sha256 : null;
    }
  }

  _store() {
    const storage = this._storage();
    if (!storage || !this._storageKey || !this.resumeToken) return;
    try {
      storage.setItem(this._storageKey, JSON.stringify({
        token: this.resumeToken, size: this.total, sha256: this.sha256 || null, createdAt: Date.now(),
        transport: this.transport,
      }));
    } catch {
      // storage full or forbidden: resuming after a reload is a bonus, not a requirement
    }
  }

  _forgetStored() {
    const storage = this._storage();
    if (!storage || !this._storageKey) return;
    try {
      storage.removeItem(this._storageKey);
    } catch {
      // ignore
    }
  }

  _dropToken() {
    this.resumeToken = null;
    this._tusUrl = null;
    this._forgetStored();
  }

  // Helpers. -----------------------------------------------------------------------------------

  _checkAborted() {
    if (this._aborted) throw new PixelstreamError("aborted", "the upload was aborted", { retryable: false });
  }

  /**
   * @template T
   * @param {Promise<T>} promise
   * @returns {Promise<T>}
   */
  _abortable(promise) {
    return Promise.race([promise, this._abortSignal]);
  }

  /** @param {number} ms */
  _sleep(ms) {
    if (ms <= 0) return this._abortable(Promise.resolve());
    /** @type {any} */
    let handle;
    const sleep = new Promise((resolve) => { handle = this._timers.setTimeout(() => resolve(undefined), ms); });
    return this._abortable(sleep).finally(() => this._timers.clearTimeout(handle));
  }

  /** @param {StageName} stage @param {object} detail */
  _stage(stage, detail) {
    callSafely(this.options.onStage, stage, detail);
  }

}
