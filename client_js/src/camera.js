// @ts-check
/**
 * Live camera analysis: JPEG frames from a `MediaStream` or `<video>` at a chosen rate, sent
 * as `frame` messages on the shared socket. The server processes the latest frame and drops
 * superseded ones; results and drops come back to callbacks with measured fps and latency.
 *
 * ```js
 * const media = await navigator.mediaDevices.getUserMedia({ video: true });
 * const camera = await startCamera(media, {
 *   fps: 5, onResult: (result, stats) => show(result.result.labels, stats.fps, stats.latencyMs) });
 * camera.stop();
 * ```
 *
 * @module camera
 */

import { encodeBinaryHeader, encodeText } from "./codec.js";
import { defaultTimers, sharedConnection } from "./connection.js";
import { callSafely, PixelstreamError } from "./errors.js";

/**
 * @typedef {object} CameraStats
 * @property {number} fps results per second, measured over the last results
 * @property {number} sentFps frames sent per second, measured the same way
 * @property {number | null} latencyMs round trip of the latest result (frame sent → result)
 * @property {number | null} avgLatencyMs moving average of the round trip
 * @property {number} sent frames sent
 * @property {number} results results received
 * @property {number} dropped frames the server dropped (superseded by a newer one)
 * @property {number} skipped ticks with no frame sent (camera not ready, or too many in flight)
 * @property {number} errors frame errors
 * @property {boolean} connected
 */

/**
 * @typedef {object} CameraOptions
 * @property {string} [url] @property {string} [token]
 * @property {number} [fps] frames per second to send (default 5)
 * @property {number} [maxWidth] frames are scaled down to at most this width (default 640)
 * @property {number} [quality] JPEG quality 0…1 (default 0.8)
 * @property {string} [task] @property {Record<string, unknown>} [options]
 * @property {"binary" | "base64"} [encoding] default binary
 * @property {string} [streamId] default: a random `cam-…`
 * @property {number} [maxInFlight] frames awaiting an answer before ticks are skipped (default 2:
 *   one processing, one waiting, as the server keeps them)
 * @property {number[]} [retryDelays] reconnect delays in ms; the last one repeats (default [0, 1000, 3000, 5000])
 * @property {() => Promise<Blob | null>} [captureFrame] custom capture (tests, other sources);
 *   default: draw the video on a canvas and `toBlob("image/jpeg")`
 * @property {import("./connection.js").WebSocketFactory} [webSocketFactory]
 * @property {import("./connection.js").Connection} [connection]
 * @property {Partial<import("./connection.js").Timers>} [timers]
 * @property {number} [stallTimeout] @property {number} [connectTimeout]
 * @property {(result: import("./codec.js").ResultMessage, stats: CameraStats) => void} [onResult]
 * @property {(seq: number, stats: CameraStats) => void} [onDropped]
 * @property {(error: PixelstreamError, seq?: number) => void} [onError]
 * @property {(stats: CameraStats) => void} [onStats] after every result, drop and send
 */

/**
 * The defaults every camera stream starts from.
 * @type {Readonly<Required<Pick<CameraOptions, "fps" | "maxWidth" | "quality" | "encoding" |
 *   "maxInFlight" | "retryDelays">>>}
 */
export const cameraDefaults = Object.freeze({
  fps: 5,
  maxWidth: 640,
  quality: 0.8,
  encoding: "binary",
  maxInFlight: 2,
  retryDelays: [0, 1000, 3000, 5000],
});

const RATE_SAMPLES = 10;

/** @param {number[]} times @returns {number} events per second over the samples */
function rate(times) {
  if (times.length < 2) return 0;
  const span = times[times.length - 1] - times[0];
  return span > 0 ? ((times.length - 1) * 1000) / span : 0;
}

/**
 * A capture function for a `<video>` or a MediaStream (played in a hidden, muted video).
 * @param {any} source
 * @param {{maxWidth: number, quality: number}} options
 * @returns {Promise<{capture: () => Promise<Blob | null>, release: () => void}>}
 */
async function videoCapture(source, options) {
  let video = source;
  let owned = false;
  if (typeof source?.getVideoTracks === "function") {
    video = document.createElement("video");
    video.muted = true;
    video.playsInline = true;
    video.srcObject = source;
    owned = true;
    await video.play();
  } else if (!source || typeof source.videoWidth !== "number") {
    throw new TypeError("source must be a MediaStream or a <video> element");
  }
  const canvas = document.createElement("canvas");
  const context = /** @type {CanvasRenderingContext2D} */ (canvas.getContext("2d"));
  return {
    capture: () => {
      if (video.readyState < 2 || !video.videoWidth) return Promise.resolve(null);
      const scale = Math.min(1, options.maxWidth / video.videoWidth);
      const width = Math.max(1, Math.round(video.videoWidth * scale));
      const height = Math.max(1, Math.round(video.videoHeight * scale));
      if (canvas.width !== width) canvas.width = width;
      if (canvas.height !== height) canvas.height = height;
      context.drawImage(video, 0, 0, width, height);
      return new Promise((resolve) => canvas.toBlob(resolve, "image/jpeg", options.quality));
    },
    release: () => {
      if (owned) {
        video.pause();
        video.srcObject = null;
      }
    },
  };
}

let streamCounter = 0;

export class CameraStream {
  /**
   * @param {MediaStream | HTMLVideoElement | null} source null only with `captureFrame`
   * @param {CameraOptions} [options]
   */
  constructor(source, options = {}) {
    this.source = source;
    /** @type {CameraOptions & typeof cameraDefaults} */
    this.options = { ...cameraDefaults, ...options };
    streamCounter += 1;
    this.streamId = options.streamId || `cam${streamCounter}-${Math.random().toString(36).slice(2, 8)}`;
    this.seq = 0;
    this.running = false;
    /** @type {CameraStats} */
    this.stats = { fps: 0, sentFps: 0, latencyMs: null, avgLatencyMs: null, sent: 0, results: 0,
      dropped: 0, skipped: 0, errors: 0, connected: false };
    /** @type {Map<number, number>} seq → time sent */
    this._inFlight = new Map();
    /** @type {number[]} */
    this._resultTimes = [];
    /** @type {number[]} */
    this._sendTimes = [];
    this._timers = { ...defaultTimers, ...this.options.timers };
    /** @type {import("./connection.js").Connection | null} */
    this._conn = null;
    this._attached = false;
    this._capturing = false;
    this._tickTimer = null;
    this._reconnectTimer = null;
    this._reconnectAttempt = 0;
    this._connecting = false;
    this._nextAt = 0;
    /** @type {(() => Promise<Blob | null>) | null} */
    this._capture = null;
    this._release = () => {};
  }

  /**
   * Connect and start sending frames. Resolves once connected; rejects when the first
   * connection fails (later drops reconnect on their own while running).
   */
  async start() {
    if (this.running) return;
    const o = this.options;
    this._conn = sharedConnection({ ...o, timers: this._timers });
    if (o.captureFrame) {
      this._capture = o.captureFrame;
    } else {
      const video = await videoCapture(this.source, o);
      this._capture = video.capture;
      this._release = video.release;
    }
    this.running = true;
    try {
      await this._connect();
    } catch (error) {
      this.stop();
      throw error;
    }
    this._nextAt = this._timers.now();
    this._scheduleTick(0);
  }

  /** Stop sending; results still in flight are ignored. */
  stop() {
    this.running = false;
    if (this._tickTimer) this._timers.clearTimeout(this._tickTimer);
    if (this._reconnectTimer) this._timers.clearTimeout(this._reconnectTimer);
    this._tickTimer = this._reconnectTimer = null;
    if (this._attached && this._conn) this._conn.detach(`s:${this.streamId}`, this);
    this._attached = false;
    this.stats.connected = false;
    this._inFlight.clear();
    this._release();
  }

  async _connect() {
    const conn = /** @type {import("./connection.js").Connection} */ (this._conn);
    this._connecting = true;
    try {
      await conn.ready();
      if (!this.running) return;
      conn.attach(`s:${this.streamId}`, this);
      this._attached = true;
      this._reconnectAttempt = 0;
      this.stats.connected = true;
      this._emitStats();
    } finally {
      this._connecting = false;
    }
  }

  _scheduleReconnect() {
    if (!this.running || this._reconnectTimer || this._connecting) return;
    const delays = this.options.retryDelays.length ? this.options.retryDelays : [1000];
    const delay = delays[Math.min(this._reconnectAttempt, delays.length - 1)];
    this._reconnectAttempt += 1;
    this._reconnectTimer = this._timers.setTimeout(() => {
      this._reconnectTimer = null;
      this._connect().catch((error) => {
        callSafely(this.options.onError, error);
        this._scheduleReconnect();
      });
    }, delay);
  }

  /** @param {number} delay */
  _scheduleTick(delay) {
    this._tickTimer = this._timers.setTimeout(() => {
      this._tickTimer = null;
      this._tick();
    }, Math.max(0, delay));
  }

  _tick() {
    if (!this.running) return;
    const interval = 1000 / Math.max(0.1, this.options.fps);
    const now = this._timers.now();
    this._nextAt += interval;
    if (this._nextAt < now) this._nextAt = now + interval; // never burst to catch up
    this._scheduleTick(this._nextAt - now);
    if (!this._attached) {
      this._scheduleReconnect();
      return;
    }
    if (this._capturing || this._inFlight.size >= this.options.maxInFlight) {
      this.stats.skipped += 1;
      return;
    }
    this._capturing = true;
    this._sendFrame().finally(() => { this._capturing = false; });
  }

  async _sendFrame() {
    const o = this.options;
    const conn = /** @type {import("./connection.js").Connection} */ (this._conn);
    let blob;
    try {
      blob = await /** @type {() => Promise<Blob | null>} */ (this._capture)();
    } catch (error) {
      callSafely(o.onError, new PixelstreamError("file_unreadable", "the camera frame could not be captured",
        { cause: error, retryable: true }));
      return;
    }
    if (!blob || !this.running || !this._attached) {
      this.stats.skipped += 1;
      return;
    }
    const seq = ++this.seq;
    const header = /** @type {const} */ ({ type: "frame", stream: this.streamId, seq, task: o.task, options: o.options });
    try {
      if (o.encoding === "base64") {
        const bytes = new Uint8Array(await blob.arrayBuffer());
        if (!this._attached) return;
        conn.send(encodeText({ ...header, data: bytes }));
      } else {
        conn.send(new Blob([/** @type {BlobPart} */ (encodeBinaryHeader(header)), blob]));
      }
    } catch {
      return; // the connection told us it is gone
    }
    const now = this._timers.now();
    this._inFlight.set(seq, now);
    this.stats.sent += 1;
    this._push(this._sendTimes, now);
    this.stats.sentFps = rate(this._sendTimes);
    this._emitStats();
  }

  /** @param {any} message */
  _receive(message) {
    const o = this.options;
    const now = this._timers.now();
    if (message.type === "result") {
      const sentAt = this._inFlight.get(message.seq);
      for (const seq of [...this._inFlight.keys()]) if (seq <= message.seq) this._inFlight.delete(seq);
      this.stats.results += 1;
      if (sentAt !== undefined) {
        const latency = now - sentAt;
        this.stats.latencyMs = latency;
        this.stats.avgLatencyMs = this.stats.avgLatencyMs === null
          ? latency : this.stats.avgLatencyMs * 0.8 + latency * 0.2;
      }
      this._push(this._resultTimes, now);
      this.stats.fps = rate(this._resultTimes);
      callSafely(o.onResult, message, this.stats);
    } else if (message.type === "dropped") {
      this._inFlight.delete(message.seq);
      this.stats.dropped += 1;
      callSafely(o.onDropped, message.seq, this.stats);
    } else if (message.type === "error") {
      if (message.seq !== undefined) this._inFlight.delete(message.seq);
      this.stats.errors += 1;
      callSafely(o.onError, PixelstreamError.fromMessage(message), message.seq);
    }
    this._emitStats();
  }

  /** @param {PixelstreamError} error */
  _connectionLost(error) {
    this._attached = false;
    this._inFlight.clear();
    this.stats.connected = false;
    this._emitStats();
    if (!this.running) return;
    callSafely(this.options.onError, error);
    this._scheduleReconnect();
  }

  _awaitingReply() {
    return this._inFlight.size > 0;
  }

  /** @param {number[]} times @param {number} now */
  _push(times, now) {
    times.push(now);
    if (times.length > RATE_SAMPLES) times.shift();
  }

  _emitStats() {
    callSafely(this.options.onStats, this.stats);
  }

}
