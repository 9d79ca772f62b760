// @ts-check
/**
 * One WebSocket to a pixelstream server, shared by every upload and camera stream that uses
 * the same URL and token. It waits for `welcome`, routes messages to their upload (`id`) or
 * stream (`stream`), keeps the socket's unacknowledged chunk bytes within the server's
 * `window_bytes` (sharing the window fairly, round robin), limits concurrent uploads to
 * `max_uploads`, and treats a socket that owes an answer but says nothing for
 * `stallTimeout` ms as dropped.
 *
 * Users rarely need this class: `analyze`, `Upload` and `CameraStream` find the shared
 * connection themselves. Pass `connection` in their options to choose one explicitly.
 *
 * @module connection
 */

import { parseServer } from "./codec.js";
import { PixelstreamError } from "./errors.js";

/**
 * Anything shaped like the browser's WebSocket: tests script a fake one.
 * @typedef {object} SocketLike
 * @property {number} readyState
 * @property {string} [binaryType]
 * @property {(data: string | Blob | ArrayBuffer | ArrayBufferView) => void} send
 * @property {(code?: number, reason?: string) => void} close
 * @property {((event: any) => void) | null} onopen
 * @property {((event: {data: any}) => void) | null} onmessage
 * @property {((event: any) => void) | null} onerror
 * @property {((event: {code?: number, reason?: string}) => void) | null} onclose
 */

/**
 * @callback WebSocketFactory
 * @param {string} url the `ws:`/`wss:` URL, with `?token=` when a token is configured
 * @returns {SocketLike}
 */

/**
 * Timer functions; tests pass fake ones so nothing really waits.
 * @typedef {object} Timers
 * @property {(callback: () => void, ms: number) => any} setTimeout
 * @property {(handle: any) => void} clearTimeout
 * @property {() => number} now milliseconds, monotonic
 */

/**
 * @typedef {object} ConnectionOptions
 * @property {string} [url] server or socket URL (`ws://host/v1/ws`, `https://host`, `/v1/ws`);
 *   default: this page's origin + `/v1/ws`
 * @property {string} [token] API token, sent as `?token=` (browsers cannot set headers)
 * @property {WebSocketFactory} [webSocketFactory] default: `url => new WebSocket(url)`
 * @property {Partial<Timers>} [timers]
 * @property {number} [stallTimeout] ms without any message while an answer is due → dropped (default 15000; 0 disables)
 * @property {number} [connectTimeout] ms to wait for `welcome` after opening (default 15000)
 */

/** @type {Timers} */
export const defaultTimers = Object.freeze({
  setTimeout: (callback, ms) => globalThis.setTimeout(callback, ms),
  clearTimeout: (handle) => globalThis.clearTimeout(handle),
  now: () => (globalThis.performance ? globalThis.performance.now() : Date.now()),
});

/** @type {WebSocketFactory} */
export const defaultWebSocketFactory = (url) => /** @type {any} */ (new WebSocket(url));

/** A partial chunk smaller than this waits for more window room instead of going out. */
const MIN_PARTIAL_CHUNK = 64 * 1024;

/**
 * The socket URL for `url` and `token`: http(s) becomes ws(s), a bare origin gets `/v1/ws`,
 * a relative URL is resolved against the page.
 * @param {string | undefined} url
 * @param {string | undefined} [token]
 * @returns {string}
 */
export function resolveUrl(url, token) {
  const base = typeof location !== "undefined" ? location.href : undefined;
  if (!url && !base) throw new TypeError("options.url is required outside a browser page");
  const resolved = new URL(url || "/v1/ws", base);
  if (resolved.protocol === "http:") resolved.protocol = "ws:";
  if (resolved.protocol === "https:") resolved.protocol = "wss:";
  if (resolved.pathname === "/" || resolved.pathname === "") resolved.pathname = "/v1/ws";
  if (token) resolved.searchParams.set("token", token);
  return resolved.toString();
}

/**
 * @param {{code?: number, reason?: string} | undefined} event
 * @param {boolean} wasOpen
 */
function closeError(event, wasOpen) {
  const code = event?.code;
  if (code === 1008) {
    return new PixelstreamError("unauthorized",
      `the server refused the connection${event?.reason ? `: ${event.reason}` : ""}`,
      { retryable: false });
  }
  const detail = code ? ` (close code ${code}${event?.reason ? `: ${event.reason}` : ""})` : "";
  return wasOpen
    ? new PixelstreamError("connection_lost", `the connection to the server was lost${detail}`)
    : new PixelstreamError("connection_failed", `could not connect to the server${detail}`);
}

/**
 * What a connection routes messages to: an upload or a camera stream.
 * @typedef {object} Route
 * @property {(message: any) => void} _receive
 * @property {(error: PixelstreamError) => void} _connectionLost
 * @property {() => boolean} _awaitingReply true while the server owes it an answer
 * @property {() => number} [_wantBytes] chunk bytes it would send now (uploads)
 * @property {() => number} [_inFlightBytes] chunk bytes sent and not yet answered (uploads)
 * @property {(length: number) => void} [_sendChunk] send the next `length` bytes (uploads)
 */

export class Connection {
  /** @param {ConnectionOptions} [options] */
  constructor(options = {}) {
    /** The socket URL (with `?token=` when given). */
    this.url = resolveUrl(options.url, options.token);
    this._factory = options.webSocketFactory || defaultWebSocketFactory;
    /** @type {Timers} */
    this.timers = { ...defaultTimers, ...options.timers };
    this.stallTimeout = options.stallTimeout ?? 15000;
    this.connectTimeout = options.connectTimeout ?? 15000;
    /** @type {SocketLike | null} the open, welcomed socket */
    this._ws = null;
    /** Set by an upload that found the socket cannot be opened: later ones go over tus. */
    this.webSocketBlocked = false;
    /** @type {Promise<import("./codec.js").WelcomeMessage> | null} */
    this._opening = null;
    /** @type {import("./codec.js").WelcomeMessage | null} the latest welcome (kept after a drop) */
    this.welcome = null;
    /** Counts sockets: it changes whenever one opens or is lost. */
    this.epoch = 0;
    /** @type {Map<string, Route>} */
    this._routes = new Map();
    /** @type {Set<object>} */
    this._slotsHeld = new Set();
    /** @type {{owner: object, resolve: () => void}[]} */
    this._slotWaiters = [];
    this._stallTimer = null;
    this._rr = 0;
    this._pumping = false;
    this._pumpAgain = false;
    /** @type {Map<string, Set<(value: any) => void>>} */
    this._listeners = new Map();
  }

  /** True while a welcomed socket is open. */
  get isOpen() {
    return this._ws !== null;
  }

  /**
   * Listen for `open` (welcome), `close` (PixelstreamError) or `notice` (a message that
   * names nothing this client holds, e.g. an error without id). Returns an unsubscribe function.
   * @param {"open" | "close" | "notice"} event
   * @param {(value: any) => void} listener
   */
  on(event, listener) {
    let set = this._listeners.get(event);
    if (!set) this._listeners.set(event, (set = new Set()));
    set.add(listener);
    return () => set?.delete(listener);
  }

  /** @param {string} event @param {unknown} value */
  _emit(event, value) {
    for (const listener of this._listeners.get(event) || []) {
      try {
        listener(value);
      } catch (error) {
        console.error(error);
      }
    }
  }

  /**
   * The server's `welcome`, opening the socket first if none is open. Concurrent callers
   * share one attempt. Rejects with PixelstreamError `connection_failed` (retryable) or
   * `unauthorized` (close code 1008).
   * @returns {Promise<import("./codec.js").WelcomeMessage>}
   */
  ready() {
    if (this._ws && this.welcome) return Promise.resolve(this.welcome);
    if (!this._opening) {
      this._opening = this._open();
      const clear = () => { this._opening = null; };
      this._opening.then(clear, clear);
    }
    return this._opening;
  }

  /** @returns {Promise<import("./codec.js").WelcomeMessage>} */
  _open() {
    return new Promise((resolve, reject) => {
      /** @type {SocketLike} */
      let ws;
      try {
        ws = this._factory(this.url);
      } catch (error) {
        reject(new PixelstreamError("connection_failed", String(error), { cause: error }));
        return;
      }
      try {
        ws.binaryType = "arraybuffer";
      } catch {
        // a fake socket may not have it
      }
      let settled = false;
      /** @param {PixelstreamError} error */
      const fail = (error) => {
        if (settled) return;
        settled = true;
        this.timers.clearTimeout(timer);
        ws.onopen = ws.onmessage = ws.onerror = ws.onclose = null;
        try {
          ws.close();
        } catch {
          // already closed
        }
        reject(error);
      };
      const timer = this.timers.setTimeout(
        () => fail(new PixelstreamError("connection_failed", "the server sent no welcome in time")),
        this.connectTimeout,
      );
      ws.onopen = () => {};
      ws.onerror = () => {}; // a close event follows with the details
      ws.onclose = (event) => fail(closeError(event, false));
      ws.onmessage = (event) => {
        let message;
        try {
          message = parseServer(event.data instanceof ArrayBuffer ? new Uint8Array(event.data) : event.data);
        } catch (error) {
          fail(new PixelstreamError("connection_failed", "the server's first message was malformed",
            { cause: error }));
          return;
        }
        if (message.type !== "welcome") {
          fail(new PixelstreamError("connection_failed", `expected welcome, got '${message.type}'`));
          return;
        }
        const welcome = /** @type {import("./codec.js").WelcomeMessage} */ (message);
        if (welcome.protocol !== 1) {
          fail(new PixelstreamError("connection_failed",
            `the server speaks protocol ${welcome.protocol}, this client 1`, { retryable: false }));
          return;
        }
        settled = true;
        this.timers.clearTimeout(timer);
        this._adopt(ws, welcome);
        resolve(welcome);
      };
    });
  }

  /** @param {SocketLike} ws @param {import("./codec.js").WelcomeMessage} welcome */
  _adopt(ws, welcome) {
    this._ws = ws;
    this.welcome = welcome;
    this.epoch++;
    ws.onmessage = (event) => this._onMessage(ws, event);
    ws.onclose = (event) => this._lost(ws, closeError(event, true));
    ws.onerror = () => {};
    this._wakeSlotWaiters();
    this._emit("open", welcome);
  }

  /** @param {SocketLike} ws @param {{data: any}} event */
  _onMessage(ws, event) {
    if (ws !== this._ws) return;
    let message;
    try {
      message = /** @type {any} */ (parseServer(
        event.data instanceof ArrayBuffer ? new Uint8Array(event.data) : event.data));
    } catch (error) {
      this._emit("notice", error);
      return;
    }
    let key = null;
    switch (message.type) {
      case "accepted":
      case "progress":
      case "cancelled":
        key = `u:${message.id}`;
        break;
      case "result":
      case "error":
        if (message.id != null) key = `u:${message.id}`;
        else if (message.stream != null) key = `s:${message.stream}`;
        break;
      case "dropped":
        key = `s:${message.stream}`;
        break;
      default:
        break; // unknown types: a v1 client ignores them
    }
    const route = key === null ? undefined : this._routes.get(key);
    if (route) route._receive(message);
    else this._emit("notice", message);
    if (this._ws === ws) this._rearmStall();
  }

  /**
   * Forget the socket (closing it) and tell every route it is gone.
   * @param {SocketLike | null} ws
   * @param {PixelstreamError} error
   */
  _lost(ws, error) {
    if (ws === null || ws !== this._ws) return;
    this._ws = null;
    this.epoch++;
    this._clearStall();
    ws.onopen = ws.onmessage = ws.onerror = ws.onclose = null;
    try {
      ws.close(error.code === "stalled" ? 4000 : 1000, error.code);
    } catch {
      // already closed
    }
    const routes = [...this._routes.values()];
    this._routes.clear();
    for (const route of routes) route._connectionLost(error);
    this._emit("close", error);
  }

  /**
   * Treat the socket as dropped now (as a stall does): routes reconnect and resume.
   * @param {string} [reason]
   */
  drop(reason = "dropped by the client") {
    this._lost(this._ws, new PixelstreamError("connection_lost", reason));
  }

  /** Close the socket on purpose; routes fail with `closed` (not retried). */
  close() {
    this._lost(this._ws, new PixelstreamError("closed", "the connection was closed", { retryable: false }));
  }

  /**
   * Send one frame on the open socket. Throws `connection_lost` when none is open.
   * @param {string | Blob | ArrayBuffer | ArrayBufferView} data
   */
  send(data) {
    const ws = this._ws;
    if (!ws) throw new PixelstreamError("connection_lost", "not connected");
    try {
      ws.send(data);
    } catch (error) {
      const lost = new PixelstreamError("connection_lost", "sending failed", { cause: error });
      this._lost(ws, lost);
      throw lost;
    }
    if (!this._stallTimer) this._armStall();
  }

  /**
   * Route messages for `key` (`u:<id>` or `s:<stream>`) to `route` until it is detached or
   * the socket is lost. Throws `connection_lost` when no socket is open.
   * @param {string} key
   * @param {Route} route
   */
  attach(key, route) {
    if (!this._ws) throw new PixelstreamError("connection_lost", "not connected");
    const current = this._routes.get(key);
    if (current && current !== route) throw new Error(`${key} is already attached`);
    this._routes.set(key, route);
  }

  /** @param {string} key @param {Route} route */
  detach(key, route) {
    if (this._routes.get(key) === route) this._routes.delete(key);
  }

  // Upload slots: the server lets `max_uploads` uploads receive bytes at once per socket. ----

  get _maxUploads() {
    return this.welcome?.limits?.max_uploads ?? 8;
  }

  /**
   * Resolves once `owner` may upload (at most `max_uploads` at a time); others wait in order.
   * @param {object} owner
   * @returns {Promise<void>}
   */
  acquireSlot(owner) {
    if (this._slotsHeld.has(owner)) return Promise.resolve();
    if (this._slotsHeld.size < this._maxUploads && this._slotWaiters.length === 0) {
      this._slotsHeld.add(owner);
      return Promise.resolve();
    }
    return new Promise((resolve) => this._slotWaiters.push({ owner, resolve }));
  }

  /** Give the slot back (or stop waiting for one). @param {object} owner */
  releaseSlot(owner) {
    this._slotWaiters = this._slotWaiters.filter((waiter) => waiter.owner !== owner);
    if (this._slotsHeld.delete(owner)) this._wakeSlotWaiters();
  }

  _wakeSlotWaiters() {
    while (this._slotWaiters.length && this._slotsHeld.size < this._maxUploads) {
      const waiter = /** @type {{owner: object, resolve: () => void}} */ (this._slotWaiters.shift());
      this._slotsHeld.add(waiter.owner);
      waiter.resolve();
    }
  }

  // The window: unacknowledged chunk bytes of all uploads stay within `window_bytes`. ----------

  /** Chunk bytes sent on this socket and not yet answered. */
  inFlightBytes() {
    let total = 0;
    for (const route of this._routes.values()) total += route._inFlightBytes ? route._inFlightBytes() : 0;
    return total;
  }

  /**
   * Let uploads send while the window has room, one chunk each per round. Uploads call it
   * after every acknowledgement; it is safe to call at any time.
   */
  pump() {
    if (this._pumping) {
      this._pumpAgain = true;
      return;
    }
    this._pumping = true;
    try {
      do {
        this._pumpAgain = false;
        this._pumpOnce();
      } while (this._pumpAgain);
    } finally {
      this._pumping = false;
    }
  }

  _pumpOnce() {
    const ws = this._ws;
    if (!ws || !this.welcome) return;
    const senders = [...this._routes.values()].filter((route) => route._wantBytes);
    if (senders.length === 0) return;
    const windowBytes = this.welcome.limits.window_bytes;
    let inFlight = this.inFlightBytes();
    const start = this._rr++ % senders.length;
    for (let sentAny = true; sentAny;) {
      sentAny = false;
      for (let i = 0; i < senders.length; i++) {
        const route = senders[(start + i) % senders.length];
        const want = /** @type {() => number} */ (route._wantBytes)();
        if (want <= 0) continue;
        const free = windowBytes - inFlight;
        const length = free >= want ? want : free >= Math.min(MIN_PARTIAL_CHUNK, windowBytes) ? free : 0;
        if (length <= 0) continue;
        /** @type {(length: number) => void} */ (route._sendChunk)(length);
        if (this._ws !== ws) return; // the send failed and the socket is gone
        inFlight += length;
        sentAny = true;
      }
    }
  }

  // Stall detection: an answer is due and nothing arrives for `stallTimeout` ms. ---------------

  _awaitingReply() {
    for (const route of this._routes.values()) if (route._awaitingReply()) return true;
    return false;
  }

  _armStall() {
    if (this.stallTimeout <= 0 || !this._ws) return;
    const ws = this._ws;
    this._stallTimer = this.timers.setTimeout(() => {
      this._stallTimer = null;
      if (this._ws === ws && this._awaitingReply()) {
        this._lost(ws, new PixelstreamError("stalled",
          `no answer from the server for ${this.stallTimeout} ms`));
      }
    }, this.stallTimeout);
  }

  _clearStall() {
    if (this._stallTimer) this.timers.clearTimeout(this._stallTimer);
    this._stallTimer = null;
  }

  _rearmStall() {
    this._clearStall();
    if (this._awaitingReply()) this._armStall();
  }
}

/** @type {WeakMap<WebSocketFactory, Map<string, Connection>>} */
const registry = new WeakMap();

/**
 * The connection every upload and camera stream with the same socket factory, URL and token
 * shares (created on first use with these options' timeouts and timers).
 * `options.connection`, when given, is returned as it is.
 * @param {ConnectionOptions & {connection?: Connection}} [options]
 * @returns {Connection}
 */
export function sharedConnection(options = {}) {
  if (options.connection) return options.connection;
  const factory = options.webSocketFactory || defaultWebSocketFactory;
  const url = resolveUrl(options.url, options.token);
  let byUrl = registry.get(factory);
  if (!byUrl) registry.set(factory, (byUrl = new Map()));
  let connection = byUrl.get(url);
  if (!connection) {
    connection = new Connection({ ...options, webSocketFactory: factory });
    byUrl.set(url, connection);
  }
  return connection;
}
