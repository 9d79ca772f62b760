// @ts-check
/**
 * Errors: the server's stable error codes, the client's own, and sentences for people.
 * @module errors
 */

/**
 * Codes the client adds to the server's table (PROTOCOL.md, "Errors").
 * - `connection_failed`: the socket could not be opened (server down, refused handshake).
 * - `connection_lost`: an open socket closed or failed.
 * - `stalled`: no answer from the server for `stallTimeout` ms while one was due; the socket
 *   is treated as dropped.
 * - `aborted`: `abort()` was called (or the `signal` fired).
 * - `closed`: the connection was closed on purpose (`connection.close()`).
 * - `file_unreadable`: the browser could not read the file (moved, deleted, permission).
 */
export const CLIENT_CODES = Object.freeze([
  "connection_failed", "connection_lost", "stalled", "aborted", "closed", "file_unreadable",
]);

/** Codes after which trying again (on a new or the same socket) can succeed. */
const RETRYABLE = new Set([
  "connection_failed", "connection_lost", "stalled", "busy", "rate_limited",
  "too_many_uploads", "upload_expired", "unknown_upload", "duplicate_upload",
]);

/** Sentences for people, by code. */
const SENTENCES = {
  bad_message: "The server did not understand the request. This is a bug in the page or client; please report it.",
  bad_base64: "The image data was garbled on the way to the server. Please try again.",
  unknown_upload: "The server no longer knows this upload (it may have restarted). Start it again.",
  duplicate_upload: "Another upload with the same name is already running on this connection.",
  too_large: "This file is larger than the server accepts.",
  offset_mismatch: "The upload got out of step with the server and could not recover. Please try again.",
  checksum_mismatch: "The file arrived damaged (its checksum did not match). Please try again.",
  invalid_image: "This file is not an image the server can read, or it is truncated or corrupt.",
  too_many_pixels: "This image has too many pixels for the server to process safely.",
  too_many_uploads: "Too many uploads are running at once. This one will start when another finishes.",
  unknown_task: "The server does not offer this kind of analysis.",
  rate_limited: "Too many requests in a short time. Please wait a moment and try again.",
  busy: "The server is busy right now. Please try again in a moment.",
  internal: "Something went wrong on the server while processing this image.",
  upload_expired: "The upload paused for too long and the server discarded the partial file.",
  unauthorized: "This server needs an access token, and none (or a wrong one) was given.",
  forbidden_origin: "This page is not allowed to use the server.",
  forbidden_host: "The server does not answer to the address in this page's URL; use a name it is configured for.",
  connection_failed: "Could not reach the server. Check your connection and that the server is running.",
  connection_lost: "The connection to the server was lost.",
  stalled: "The server stopped answering.",
  aborted: "Cancelled.",
  closed: "The connection was closed.",
  file_unreadable: "The browser could not read this file (was it moved or deleted?).",
};

/** An error from the server (its `code`) or from the client itself (see CLIENT_CODES). */
export class PixelstreamError extends Error {
  /**
   * @param {string} code stable code: the server's table or CLIENT_CODES
   * @param {string} [message] technical detail (the server's message)
   * @param {{expected?: number, retryAfterMs?: number, cause?: unknown, retryable?: boolean}} [extra]
   */
  constructor(code, message, extra = {}) {
    super(message || describeError(code), extra.cause === undefined ? undefined : { cause: extra.cause });
    this.name = "PixelstreamError";
    /** @type {string} */
    this.code = code;
    /** @type {number | undefined} where the server wants the next chunk to start */
    this.expected = extra.expected;
    /** @type {number | undefined} how long the server asks us to wait */
    this.retryAfterMs = extra.retryAfterMs;
    /** @type {boolean} whether trying again can help (the default `onShouldRetry` answer) */
    this.retryable = extra.retryable ?? RETRYABLE.has(code);
  }

  /** A sentence a person understands (see {@link describeError}). */
  get description() {
    return describeError(this.code);
  }

  /**
   * The exception for a server `error` message.
   * @param {{code: string, message?: string, expected?: number, retry_after_ms?: number}} msg
   */
  static fromMessage(msg) {
    return new PixelstreamError(msg.code, msg.message || msg.code, {
      expected: msg.expected, retryAfterMs: msg.retry_after_ms,
    });
  }
}

/**
 * A sentence a person understands for an error or code, e.g. for the page's error box.
 * Unknown codes (added by a newer server) get a generic sentence.
 * @param {string | {code?: string} | null | undefined} error
 * @returns {string}
 */
export function describeError(error) {
  const code = typeof error === "string" ? error : error?.code;
  return (code && /** @type {Record<string, string>} */ (SENTENCES)[code])
    || "Something went wrong. Please try again.";
}

/**
 * Call a user callback; an exception there must not break an upload or a stream.
 * @param {Function | undefined} callback
 * @param {...any} args
 */
export function callSafely(callback, ...args) {
  if (typeof callback !== "function") return;
  try {
    callback(...args);
  } catch (error) {
    console.error("pixelstream: a callback threw", error);
  }
}
