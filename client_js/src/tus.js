// @ts-check
/**
 * The same uploads over tus 1.0 and plain HTTP, for networks that block WebSockets: create
 * the upload (`POST /v1/tus/`), PATCH its bytes slice by slice (the browser reads each
 * `Blob.slice` itself), then follow `<upload url>/events` (server-sent events carrying the
 * socket protocol's progress, result and error messages) with `fetch`, so the token can go
 * in a header. {@link Upload} uses it by itself when the socket cannot be opened
 * (`transport: "auto"`), or always (`transport: "tus"`).
 *
 * @module tus
 */

import { PixelstreamError } from "./errors.js";

export const TUS_VERSION = "1.0.0";
const OFFSET_STREAM = "application/offset+octet-stream";

/**
 * @typedef {(input: string, init?: {method?: string, headers?: Record<string, string>,
 *   body?: Blob | null, signal?: AbortSignal}) => Promise<Response>} FetchLike
 */

/**
 * The tus endpoint (`http(s)://host/v1/tus/`) of the server at `url` (its socket or page URL).
 * @param {string} socketUrl a resolved socket URL (`ws://host:port/v1/ws?token=...`)
 * @returns {string}
 */
export function tusEndpoint(socketUrl) {
  const url = new URL(socketUrl);
  if (url.protocol === "ws:") url.protocol = "http:";
  if (url.protocol === "wss:") url.protocol = "https:";
  url.pathname = url.pathname.replace(/\/v1\/ws\/?$/, "") + "/v1/tus/";
  url.pathname = url.pathname.replace(/\/{2,}/g, "/");
  url.search = "";
  return url.toString();
}

/** @param {string} text */
function base64Text(text) {
  const bytes = new TextEncoder().encode(text);
  let binary = "";
  for (const byte of bytes) binary += String.fromCharCode(byte);
  return btoa(binary);
}

/**
 * `Upload-Metadata` from the values given (empty ones left out).
 * @param {Record<string, string | undefined | null>} values
 */
export function encodeMetadata(values) {
  return Object.entries(values)
    .filter(([, value]) => typeof value === "string" && value !== "")
    .map(([key, value]) => `${key} ${base64Text(/** @type {string} */ (value))}`)
    .join(",");
}

/**
 * The error a refused request stands for: its JSON body's code, else its status.
 * @param {Response} response
 * @returns {Promise<PixelstreamError>}
 */
export async function responseError(response) {
  /** @type {any} */
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  const byStatus = /** @type {Record<number, string>} */ ({
    401: "unauthorized", 403: "forbidden_origin", 404: "unknown_upload", 409: "offset_mismatch",
    410: "upload_expired", 413: "too_large", 423: "busy", 429: "rate_limited",
    460: "checksum_mismatch",
  });
  const code = (body && typeof body.code === "string" && body.code)
    || byStatus[response.status] || (response.status >= 500 ? "internal" : "bad_message");
  let retryAfterMs = body && Number.isFinite(body.retry_after_ms) ? body.retry_after_ms : undefined;
  const header = response.headers.get("Retry-After");
  if (retryAfterMs === undefined && header && Number.isFinite(Number(header))) {
    retryAfterMs = Number(header) * 1000;
  }
  return new PixelstreamError(code, (body && body.message) || `HTTP ${response.status}`,
    { retryAfterMs, retryable: response.status >= 500 || [423, 429].includes(response.status)
      ? true : undefined });
}

/**
 * Requests of one tus upload. Every method rejects with a PixelstreamError: the server's
 * code, or `connection_lost` when the request itself failed.
 */
export class TusRequests {
  /**
   * @param {string} endpoint from {@link tusEndpoint}
   * @param {{token?: string, fetch?: FetchLike}} options
   */
  constructor(endpoint, options) {
    this.endpoint = endpoint;
    /** @type {FetchLike} */
    this.fetch = options.fetch || /** @type {FetchLike} */ (globalThis.fetch.bind(globalThis));
    /** @type {Record<string, string>} */
    this.headers = { "Tus-Resumable": TUS_VERSION };
    if (options.token) this.headers.Authorization = `Bearer ${options.token}`;
  }

  /**
   * @param {string} url
   * @param {{method?: string, headers?: Record<string, string>, body?: Blob | null}} init
   * @returns {Promise<Response>}
   */
  async _request(url, init) {
    try {
      return await this.fetch(url, { ...init, headers: { ...this.headers, ...init.headers } });
    } catch (error) {
      throw new PixelstreamError("connection_lost", `the request failed: ${error}`, { cause: error });
    }
  }

  /**
   * Create an upload; resolves with its URL (the capability that resumes it).
   * @param {number} size
   * @param {Record<string, string | undefined | null>} metadata
   */
  async create(size, metadata) {
    const response = await this._request(this.endpoint, {
      method: "POST",
      headers: { "Upload-Length": String(size), "Upload-Metadata": encodeMetadata(metadata) },
    });
    if (response.status !== 201) throw await responseError(response);
    const location = response.headers.get("Location");
    if (!location) throw new PixelstreamError("internal", "the server named no upload URL");
    return new URL(location, this.endpoint).toString();
  }

  /** The bytes the server holds. @param {string} url */
  async offset(url) {
    const response = await this._request(url, { method: "HEAD" });
    if (response.status !== 200) throw await responseError(response);
    return Number(response.headers.get("Upload-Offset"));
  }

  /**
   * Send `slice` at `offset`; resolves with the offset the server holds afterwards (on a
   * 409 or 423, the one it reports: someone else's bytes, or a request of ours still running).
   * @param {string} url @param {number} offset @param {Blob} slice
   */
  async patch(url, offset, slice) {
    const response = await this._request(url, {
      method: "PATCH",
      headers: { "Upload-Offset": String(offset), "Content-Type": OFFSET_STREAM },
      body: slice,
    });
    if (response.status === 409 || response.status === 423) return this.offset(url);
    if (response.status !== 204) throw await responseError(response);
    return Number(response.headers.get("Upload-Offset"));
  }

  /** Terminate the upload (best effort). @param {string} url */
  async terminate(url) {
    try {
      await this._request(url, { method: "DELETE" });
    } catch {
      // the upload expires by itself
    }
  }

  /**
   * Follow the upload's events until its result (resolved) or error (rejected);
   * `onProgress` sees every `progress` message. If the stream ends without either,
   * `/result?wait=` is asked instead.
   * @param {string} url
   * @param {(message: any) => void} onProgress
   * @returns {Promise<import("./codec.js").ResultMessage>}
   */
  async outcome(url, onProgress) {
    const response = await this._request(`${url}/events`, { method: "GET" });
    if (response.status !== 200 || !response.body) throw await responseError(response);
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let event = "";
    try {
      for (;;) {
        let chunk;
        try {
          chunk = await reader.read();
        } catch (error) {
          throw new PixelstreamError("connection_lost", "the event stream broke", { cause: error });
        }
        if (chunk.done) break;
        buffer += decoder.decode(chunk.value, { stream: true });
        let newline;
        while ((newline = buffer.indexOf("\n")) >= 0) {
          const line = buffer.slice(0, newline).replace(/\r$/, "");
          buffer = buffer.slice(newline + 1);
          if (line.startsWith("event: ")) event = line.slice(7).trim();
          else if (line.startsWith("data: ")) {
            const message = JSON.parse(line.slice(6));
            if (event === "result") return message;
            if (event === "error") throw PixelstreamError.fromMessage(message);
            if (event === "progress") onProgress(message);
          }
        }
      }
    } finally {
      reader.cancel().catch(() => {});
    }
    const answer = await this._request(`${url}/result?wait=60`, { method: "GET" });
    if (answer.status === 200) return { type: "result", ...(await answer.json()) };
    if (answer.status === 202) throw new PixelstreamError("stalled", "the result is not ready yet");
    throw await responseError(answer);
  }
}
