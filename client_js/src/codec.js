// @ts-check
/**
 * Wire codec for pixelstream protocol v1: JSON text frames and binary frames.
 *
 * Binary frame layout: `[2 bytes: header length H, big-endian][H bytes: UTF-8 JSON header][payload]`;
 * the header is the message's JSON form without `data`. Only `chunk` and `frame` have one.
 *
 * Field order on the wire is fixed (the same as the Python codec's), so encoded frames match
 * the golden vectors in `tests/vectors/codec.json` byte for byte.
 *
 * @module codec
 */

import { PixelstreamError } from "./errors.js";

/**
 * @typedef {Record<string, unknown>} Options
 *
 * @typedef {{type: "upload", id: string, size: number, sha256?: string, name?: string,
 *            task?: string, options?: Options, resume?: string}} UploadMessage
 * @typedef {{type: "chunk", id: string, offset: number, data: Uint8Array}} ChunkMessage
 * @typedef {{type: "cancel", id: string}} CancelMessage
 * @typedef {{type: "frame", stream: string, seq: number, task?: string, options?: Options,
 *            data: Uint8Array}} FrameMessage
 * @typedef {UploadMessage | ChunkMessage | CancelMessage | FrameMessage} ClientMessage
 *
 * @typedef {{max_image_bytes: number, max_chunk_bytes: number, max_pixels: number,
 *            max_uploads: number, window_bytes: number}} Limits
 * @typedef {{type: "welcome", protocol: number, session: string, limits: Limits,
 *            tasks: string[], default_task: string}} WelcomeMessage
 * @typedef {{type: "accepted", id: string, offset: number, resume: string}} AcceptedMessage
 * @typedef {{type: "progress", id: string, stage: "upload" | "queued" | "decoding" | "inference",
 *            received?: number, total?: number, position?: number, done?: number}} ProgressMessage
 * @typedef {{type: "result", task: string, result: any, image?: {width: number, height: number,
 *            format: string}, cached?: boolean, model?: string, timings_ms?: Record<string, number>,
 *            id?: string, stream?: string, seq?: number}} ResultMessage
 * @typedef {{type: "cancelled", id: string}} CancelledMessage
 * @typedef {{type: "dropped", stream: string, seq: number, reason?: string}} DroppedMessage
 * @typedef {{type: "error", code: string, message: string, id?: string, stream?: string,
 *            seq?: number, expected?: number, retry_after_ms?: number}} ErrorMessage
 * @typedef {WelcomeMessage | AcceptedMessage | ProgressMessage | ResultMessage |
 *           CancelledMessage | DroppedMessage | ErrorMessage} ServerMessage
 */

/** Field order of each client message on the wire (after `type`; `data` comes last). */
const CLIENT_FIELDS = /** @type {const} */ ({
  upload: ["id", "size", "sha256", "name", "task", "options", "resume"],
  chunk: ["id", "offset"],
  cancel: ["id"],
  frame: ["stream", "seq", "task", "options"],
});

/** Messages whose `options` is always on the wire (`{}` when not given), as in Python. */
const ALWAYS_OPTIONS = new Set(["upload", "frame"]);

export const BINARY_TYPES = new Set(["chunk", "frame"]);
export const MAX_BINARY_HEADER_BYTES = 65535;

const encoder = new TextEncoder();
const decoder = new TextDecoder("utf-8", { fatal: true });

/**
 * The JSON object of a client message without `data`, in wire order; absent fields omitted.
 * @param {ClientMessage | Record<string, any>} message
 * @returns {Record<string, unknown>}
 */
export function toWire(message) {
  const type = message.type;
  const names = CLIENT_FIELDS[/** @type {keyof typeof CLIENT_FIELDS} */ (type)];
  if (!names) throw new TypeError(`not a client message type: ${String(type)}`);
  /** @type {Record<string, unknown>} */
  const out = { type };
  const source = /** @type {Record<string, unknown>} */ (message);
  for (const name of names) {
    let value = source[name];
    if (name === "options" && value == null && ALWAYS_OPTIONS.has(type)) value = {};
    if (value !== undefined && value !== null) out[name] = value;
  }
  return out;
}

/**
 * Bytes → standard Base64 (with padding). Uses the native encoder where the engine has one.
 * @param {Uint8Array} bytes
 * @returns {string}
 */
export function bytesToBase64(bytes) {
  const native = /** @type {any} */ (bytes).toBase64;
  if (typeof native === "function") return native.call(bytes);
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    binary += String.fromCharCode.apply(null, /** @type {any} */ (bytes.subarray(i, i + 0x8000)));
  }
  return btoa(binary);
}

/**
 * Standard Base64 → bytes. Throws PixelstreamError("bad_base64") on invalid input.
 * @param {string} text
 * @returns {Uint8Array}
 */
export function base64ToBytes(text) {
  try {
    const native = /** @type {any} */ (Uint8Array).fromBase64;
    if (typeof native === "function") return native(text);
    const binary = atob(text);
    const out = new Uint8Array(binary.length);
    for (let i = 0; i < binary.length; i++) out[i] = binary.charCodeAt(i);
    return out;
  } catch {
    throw new PixelstreamError("bad_base64", "data is not valid Base64");
  }
}

/**
 * @param {Uint8Array | ArrayBuffer | ArrayBufferView} data
 * @returns {Uint8Array}
 */
function asBytes(data) {
  if (data instanceof Uint8Array) return data;
  if (data instanceof ArrayBuffer) return new Uint8Array(data);
  if (ArrayBuffer.isView(data)) return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  throw new TypeError("data must be bytes (Uint8Array or ArrayBuffer)");
}

/**
 * A client message as the text of a JSON frame (`data`, if any, as Base64, last).
 * @param {ClientMessage} message
 * @returns {string}
 */
export function encodeText(message) {
  const obj = toWire(message);
  if (BINARY_TYPES.has(message.type)) {
    obj.data = bytesToBase64(asBytes(/** @type {ChunkMessage | FrameMessage} */ (message).data));
  }
  return JSON.stringify(obj);
}

/**
 * The first part of a binary frame: the 2-byte length prefix and the JSON header.
 * Pair it with the payload (`new Blob([header, payload])`) to send without copying the payload.
 * @param {Omit<ChunkMessage, "data"> | Omit<FrameMessage, "data">} message
 * @returns {Uint8Array}
 */
export function encodeBinaryHeader(message) {
  if (!BINARY_TYPES.has(message.type)) {
    throw new TypeError(`a ${message.type} message has no binary form`);
  }
  const header = encoder.encode(JSON.stringify(toWire(message)));
  if (header.length > MAX_BINARY_HEADER_BYTES) {
    throw new RangeError("binary frame header exceeds 65535 bytes");
  }
  const out = new Uint8Array(2 + header.length);
  out[0] = header.length >> 8;
  out[1] = header.length & 0xff;
  out.set(header, 2);
  return out;
}

/**
 * A chunk or frame as one binary frame (header and payload in one array).
 * @param {ChunkMessage | FrameMessage} message
 * @returns {Uint8Array}
 */
export function encodeBinary(message) {
  const header = encodeBinaryHeader(message);
  const data = asBytes(message.data);
  const out = new Uint8Array(header.length + data.length);
  out.set(header, 0);
  out.set(data, header.length);
  return out;
}

/**
 * @param {string | Uint8Array} text
 * @returns {Record<string, any>}
 */
function loadObject(text) {
  let obj;
  try {
    obj = JSON.parse(typeof text === "string" ? text : decoder.decode(text));
  } catch {
    throw new PixelstreamError("bad_message", "message is not valid JSON");
  }
  if (obj === null || typeof obj !== "object" || Array.isArray(obj)) {
    throw new PixelstreamError("bad_message", "message must be a JSON object");
  }
  if (typeof obj.type !== "string") {
    throw new PixelstreamError("bad_message", "field 'type' is missing or not a string");
  }
  return obj;
}

/** @type {Record<string, [string, string][]>} required fields and their `typeof` per type */
const SERVER_REQUIRED = {
  welcome: [["protocol", "number"], ["session", "string"], ["limits", "object"],
    ["tasks", "object"], ["default_task", "string"]],
  accepted: [["id", "string"], ["offset", "number"], ["resume", "string"]],
  progress: [["id", "string"], ["stage", "string"]],
  result: [["task", "string"], ["result", "object"]],
  cancelled: [["id", "string"]],
  dropped: [["stream", "string"], ["seq", "number"]],
  error: [["code", "string"]],
};

/**
 * Parse one text frame from the server. Known types are checked for their required fields
 * (PixelstreamError("bad_message") otherwise); unknown types are returned as they are, for
 * the caller to ignore, as a v1 client must.
 * @param {string | Uint8Array} text
 * @returns {ServerMessage | {type: string, [key: string]: unknown}}
 */
export function parseServer(text) {
  const obj = loadObject(text);
  const required = SERVER_REQUIRED[obj.type];
  if (required) {
    for (const [name, kind] of required) {
      if (typeof obj[name] !== kind || obj[name] === null) {
        throw new PixelstreamError(
          "bad_message", `malformed '${obj.type}' message from server: '${name}' missing`);
      }
    }
  }
  return /** @type {any} */ (obj);
}

/**
 * Parse a client frame (text or binary), as a server would: for fakes, tools and tests.
 * Binary payloads and Base64 `data` come back as `data: Uint8Array`.
 * @param {string | Uint8Array | ArrayBuffer} frame
 * @returns {ClientMessage}
 */
export function parseClient(frame) {
  if (typeof frame === "string") {
    const obj = loadObject(frame);
    if (BINARY_TYPES.has(obj.type)) {
      if (typeof obj.data !== "string") throw new PixelstreamError("bad_message", "field 'data' is missing");
      obj.data = base64ToBytes(obj.data);
    }
    return /** @type {ClientMessage} */ (obj);
  }
  const bytes = asBytes(frame);
  if (bytes.length < 2) {
    throw new PixelstreamError("bad_message", "binary frame shorter than its 2-byte header");
  }
  const length = (bytes[0] << 8) | bytes[1];
  if (length === 0 || 2 + length > bytes.length) {
    throw new PixelstreamError("bad_message", "binary frame header length does not fit the frame");
  }
  const obj = loadObject(bytes.subarray(2, 2 + length));
  if (!BINARY_TYPES.has(obj.type)) {
    throw new PixelstreamError("bad_message", `a binary frame cannot carry a '${obj.type}' message`);
  }
  if ("data" in obj) throw new PixelstreamError("bad_message", "a binary frame's header must not carry 'data'");
  // `data` last, as in the text form.
  return /** @type {ClientMessage} */ ({ ...obj, data: bytes.subarray(2 + length) });
}
