// @ts-check
/**
 * pixelstream browser client: resumable chunked uploads and live camera analysis over one
 * WebSocket. No dependencies, no build step:
 *
 * ```html
 * <script type="module">
 *   import { analyze } from "/static/client/index.js";
 *   const result = await analyze(file, { onProgress: (sent, acked, total) => bar.value = acked / total });
 * </script>
 * ```
 *
 * @module pixelstream
 */

import { CameraStream } from "./camera.js";
import { sharedConnection } from "./connection.js";
import { Upload } from "./upload.js";

export { CameraStream, cameraDefaults } from "./camera.js";
export {
  base64ToBytes, bytesToBase64, encodeBinary, encodeBinaryHeader, encodeText, parseClient,
  parseServer,
} from "./codec.js";
export { Connection, defaultTimers, resolveUrl, sharedConnection } from "./connection.js";
export { CLIENT_CODES, describeError, PixelstreamError } from "./errors.js";
export { encodeMetadata, TusRequests, tusEndpoint } from "./tus.js";
export { defaultFingerprint, defaultOptions, Upload } from "./upload.js";

/**
 * The types a program names, from the package's root (in TypeScript:
 * `import type { UploadOptions, ResultMessage } from "pixelstream-client"`).
 * @typedef {import("./upload.js").UploadOptions} UploadOptions
 * @typedef {import("./upload.js").StageName} StageName
 * @typedef {import("./upload.js").UrlStorage} UrlStorage
 * @typedef {import("./camera.js").CameraOptions} CameraOptions
 * @typedef {import("./camera.js").CameraStats} CameraStats
 * @typedef {import("./connection.js").ConnectionOptions} ConnectionOptions
 * @typedef {import("./connection.js").WebSocketFactory} WebSocketFactory
 * @typedef {import("./connection.js").SocketLike} SocketLike
 * @typedef {import("./tus.js").FetchLike} FetchLike
 * @typedef {import("./codec.js").Limits} Limits
 * @typedef {import("./codec.js").WelcomeMessage} WelcomeMessage
 * @typedef {import("./codec.js").ProgressMessage} ProgressMessage
 * @typedef {import("./codec.js").ResultMessage} ResultMessage
 * @typedef {import("./codec.js").ErrorMessage} ErrorMessage
 * @typedef {import("./codec.js").ServerMessage} ServerMessage
 * @typedef {import("./codec.js").ClientMessage} ClientMessage
 */

/**
 * Upload and analyse one image; resolves with the server's `result` message.
 * @param {Blob} file
 * @param {import("./upload.js").UploadOptions} [options]
 * @returns {Promise<import("./codec.js").ResultMessage>}
 */
export function analyze(file, options = {}) {
  return new Upload(file, options).start();
}

/**
 * Start sending camera frames; resolves with the running stream once connected.
 * @param {MediaStream | HTMLVideoElement | null} source
 * @param {import("./camera.js").CameraOptions} [options]
 * @returns {Promise<CameraStream>}
 */
export async function startCamera(source, options = {}) {
  const camera = new CameraStream(source, options);
  await camera.start();
  return camera;
}

/**
 * The shared connection for these options, once the server has said `welcome`
 * (`connection.welcome` holds its limits and tasks).
 * @param {import("./connection.js").ConnectionOptions} [options]
 */
export async function connect(options = {}) {
  const connection = sharedConnection(options);
  await connection.ready();
  return connection;
}

/**
 * A client with default options (url, token, task, callbacks…) for everything it starts.
 * @param {import("./upload.js").UploadOptions & import("./camera.js").CameraOptions} [defaults]
 */
export function createClient(defaults = {}) {
  return {
    connection: sharedConnection(defaults),
    /** @param {import("./upload.js").UploadOptions} [options] */
    connect: (options = {}) => connect({ ...defaults, ...options }),
    /** @param {Blob} file @param {import("./upload.js").UploadOptions} [options] */
    analyze: (file, options = {}) => analyze(file, { ...defaults, ...options }),
    /** @param {Blob} file @param {import("./upload.js").UploadOptions} [options] */
    upload: (file, options = {}) => new Upload(file, { ...defaults, ...options }),
    /** @param {MediaStream | HTMLVideoElement | null} source @param {import("./camera.js").CameraOptions} [options] */
    camera: (source, options = {}) => new CameraStream(source, { ...defaults, ...options }),
  };
}
