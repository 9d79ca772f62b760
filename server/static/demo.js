// The pixelstream demo page. It uses the browser library exactly as an application would:
// `./client/` is client_js/src, served as it is (no build step).
import { createClient, describeError } from "./client/index.js";

const $ = (selector, root = document) => root.querySelector(selector);

const params = new URLSearchParams(location.search);
const client = createClient({ token: params.get("token") || undefined });
const connection = client.connection;

/**
 * What the page did, for people poking at it in the console and for the browser tests:
 * every library callback lands in `events`, every file in `items`.
 */
const demo = {
  events: [],
  items: [],
  camera: { running: false, results: 0, dropped: 0, lastLabels: [], stats: null, errors: [] },
  welcome: null,
  client,
};
window.pixelstreamDemo = demo;

// Formatting ---------------------------------------------------------------------------------

/** Sizes in binary units, as file managers and the server's limits count them (256 MB = 2^28 B). */
function formatBytes(bytes) {
  if (bytes < 1024) return `${Math.round(bytes)} B`;
  const units = ["KB", "MB", "GB"];
  let value = bytes;
  let unit = "B";
  for (const next of units) {
    if (value < 1024) break;
    value /= 1024;
    unit = next;
  }
  const digits = value >= 100 ? 0 : value >= 10 ? 1 : 2;
  return `${Number(value.toFixed(digits))} ${unit}`;
}

function formatDuration(ms) {
  if (!Number.isFinite(ms)) return "";
  if (ms < 1000) return `${Math.max(0, Math.round(ms))} ms`;
  const s = ms / 1000;
  if (s < 10) return `${s.toFixed(1)} s`;
  if (s < 90) return `${Math.round(s)} s`;
  return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
}

/** "tabby, tabby cat" → ["Tabby", "tabby cat"]. */
function splitLabel(label) {
  const [first, ...rest] = String(label).split(",").map((part) => part.trim()).filter(Boolean);
  const name = first ? first[0].toUpperCase() + first.slice(1) : String(label);
  return [name, rest.join(", ")];
}

const TASK_NAMES = { classify: "Classify objects", colors: "Dominant colors" };

function taskName(task) {
  return TASK_NAMES[task] || task.replace(/[._-]+/g, " ").replace(/^\w/, (c) => c.toUpperCase());
}

// Connection status ----------------------------------------------------------------------------

const connectionPill = $("#connection");

function setConnection(state, text) {
  connectionPill.dataset.state = state;
  $(".connection-label", connectionPill).textContent = text;
}

let reconnectDelay = 1000;
let reconnectTimer = null;

async function ensureConnected() {
  clearTimeout(reconnectTimer);
  try {
    await client.connect();
    reconnectDelay = 1000;
  } catch (error) {
    setConnection("offline", error.code === "unauthorized" ? "Access denied" : "Offline — retrying");
    reconnectTimer = setTimeout(ensureConnected, reconnectDelay);
    reconnectDelay = Math.min(reconnectDelay * 2, 15000);
  }
}

connection.on("open", (welcome) => {
  demo.welcome = welcome;
  setConnection("open", "Connected");
  applyWelcome(welcome);
});
connection.on("close", (error) => {
  if (error.code === "closed") return;
  setConnection("reconnecting", "Reconnecting…");
  // Uploads and the camera reconnect on their own; the pill follows whoever is first.
  reconnectTimer = setTimeout(ensureConnected, 1000);
});

const taskSelect = $("#task");
const topkSelect = $("#topk");

function applyWelcome(welcome) {
  const current = taskSelect.value || welcome.default_task;
  taskSelect.replaceChildren(...welcome.tasks.map((task) => {
    const option = new Option(taskName(task), task);
    option.selected = task === current;
    return option;
  }));
  updateTaskFields();
  const limits = welcome.limits;
  $("#drop-hint").textContent =
    `JPEG, PNG, WebP, GIF, BMP, TIFF · up to ${formatBytes(limits.max_image_bytes)} each`;
  $("#server-info").textContent =
    `${welcome.tasks.length} task${welcome.tasks.length === 1 ? "" : "s"} · ` +
    `chunks up to ${formatBytes(limits.max_chunk_bytes)} · ` +
    `${formatBytes(limits.window_bytes)} in flight · ${limits.max_uploads} uploads at once per connection`;
}

function updateTaskFields() {
  $("#topk-field").hidden = taskSelect.value !== "classify";
}
taskSelect.addEventListener("change", updateTaskFields);

function taskOptions(task, topK = Number(topkSelect.value)) {
  if (task === "classify") return { top_k: topK };
  if (task === "colors") return { colors: 6 };
  return {};
}

// Uploads ------------------------------------------------------------------------------------

const cards = $("#cards");
const template = $("#card-template");
const STEP_ORDER = ["upload", "queued", "decoding", "inference"];

function addFiles(fileList) {
  const files = [...fileList];
  for (const file of files) startItem(createItem(file));
  updateSummary();
}

function createItem(file) {
  const card = template.content.firstElementChild.cloneNode(true);
  const item = {
    index: demo.items.length,
    file,
    card,
    state: "waiting",
    stage: "connecting",
    detail: {},
    sent: 0,
    acknowledged: 0,
    total: file.size,
    samples: [],
    result: null,
    error: null,
    startedAt: 0,
    uploadStartedAt: 0,
    uploadDoneAt: 0,
    finishedAt: 0,
    objectUrl: "",
    upload: null,
  };
  demo.items.push(item);
  card.dataset.index = String(item.index);
  $(".name", card).textContent = file.name || "image";
  $(".name", card).title = file.name || "";
  $(".size", card).textContent = formatBytes(file.size);
  showPreview(item);
  $(".cancel", card).addEventListener("click", () => item.upload?.abort());
  $(".retry", card).addEventListener("click", () => startItem(item));
  cards.prepend(card);
  return item;
}

/** Files up to this size preview through an object URL at once. */
const DIRECT_PREVIEW_MAX = 24 * 1024 * 1024;

/**
 * The thumbnail. An <img> on a huge file's object URL makes Chrome feed the whole file to
 * the image on the page's main thread (hundreds of milliseconds of jank for 200 MB), so big
 * files get a small copy decoded in a worker (preview-worker.js) instead.
 */
function showPreview(item) {
  const thumb = $(".thumb", item.card);
  const img = $("img", thumb);
  img.addEventListener("error", () => thumb.classList.add("broken"), { once: true });
  if (item.file.size <= DIRECT_PREVIEW_MAX || typeof Worker !== "function") {
    item.objectUrl = URL.createObjectURL(item.file);
    img.src = item.objectUrl;
    return;
  }
  thumb.classList.add("pending");
  previewInWorker(item.file, 240).then((bitmap) => {
    const canvas = document.createElement("canvas");
    canvas.width = bitmap.width;
    canvas.height = bitmap.height;
    canvas.getContext("2d").drawImage(bitmap, 0, 0);
    bitmap.close();
    canvas.toBlob((small) => {
      thumb.classList.remove("pending");
      if (!small) return thumb.classList.add("broken");
      item.objectUrl = URL.createObjectURL(small);
      img.src = item.objectUrl;
    }, "image/jpeg", 0.85);
  }, () => {
    thumb.classList.remove("pending");
    thumb.classList.add("broken");
  });
}

let previewWorker = null;
const previewRequests = new Map();

/** A small ImageBitmap of `file`, `width` pixels wide, decoded in a worker. */
function previewInWorker(file, width) {
  if (!previewWorker) {
    previewWorker = new Worker(new URL("./preview-worker.js", import.meta.url));
    previewWorker.onmessage = ({ data }) => {
      const request = previewRequests.get(data.id);
      previewRequests.delete(data.id);
      if (data.bitmap) request?.resolve(data.bitmap);
      else request?.reject(new Error(data.error));
    };
  }
  const id = previewRequests.size + Math.random();
  return new Promise((resolve, reject) => {
    previewRequests.set(id, { resolve, reject });
    previewWorker.postMessage({ id, file, width });
  });
}

function record(item, kind, fields) {
  demo.events.push({ t: performance.now(), item: item.index, kind, ...fields });
}

function startItem(item) {
  const task = taskSelect.value || demo.welcome?.default_task || "classify";
  Object.assign(item, { state: "waiting", stage: "connecting", detail: {}, sent: 0, acknowledged: 0, samples: [],
    result: null, error: null, startedAt: performance.now(), uploadStartedAt: 0, uploadDoneAt: 0, finishedAt: 0,
    task });
  item.upload = client.upload(item.file, {
    task,
    options: taskOptions(task),
    onProgress(sent, acknowledged, total) {
      record(item, "progress", { sent, acknowledged, total });
      const now = performance.now();
      if (!item.uploadStartedAt) item.uploadStartedAt = now;
      item.sent = sent;
      item.acknowledged = acknowledged;
      item.samples.push([now, acknowledged]);
      while (item.samples.length > 2 && now - item.samples[0][0] > 3000) item.samples.shift();
      if (acknowledged >= total && !item.uploadDoneAt) item.uploadDoneAt = now;
      invalidate(item);
    },
    onStage(stage, detail) {
      record(item, "stage", { stage, position: detail.position, attempt: detail.attempt, delay: detail.delay,
        error: detail.error?.code });
      item.stage = stage;
      item.detail = detail;
      if (stage === "upload" && !item.uploadStartedAt) item.uploadStartedAt = performance.now();
      if (stage === "upload") item.state = "uploading";
      else if (STEP_ORDER.includes(stage) || item.acknowledged >= item.total) item.state = "processing";
      else item.state = item.acknowledged > 0 ? "uploading" : "waiting"; // connecting, retrying…
      invalidate(item);
    },
  });
  item.upload.start().then((result) => {
    record(item, "result", { cached: result.cached, labels: result.result?.labels?.map((l) => l.label) });
    item.result = result;
    item.state = "done";
    item.finishedAt = performance.now();
    invalidate(item);
  }, (error) => {
    record(item, "error", { code: error.code, message: error.message });
    item.error = error;
    item.state = error.code === "aborted" ? "cancelled" : "error";
    item.finishedAt = performance.now();
    invalidate(item);
  });
  invalidate(item);
}

/** Acknowledged bytes per second over the last 3 s (so a stalled upload slows to 0). */
function speedOf(item, now = performance.now()) {
  const samples = item.samples.filter(([t]) => now - t <= 3000);
  if (samples.length < 2) return 0;
  const [t0, b0] = samples[0];
  const [, b1] = samples[samples.length - 1];
  return now > t0 ? ((b1 - b0) * 1000) / (now - t0) : 0;
}

// Speed and time left move on while no acknowledgement arrives (a stall shows as one).
setInterval(() => {
  for (const item of demo.items) if (item.state === "uploading") invalidate(item);
}, 1000);

// Rendering: callbacks mark items dirty; one animation frame draws them all. --------------

const dirty = new Set();
let frameRequested = false;

function invalidate(item) {
  dirty.add(item);
  if (!frameRequested) {
    frameRequested = true;
    requestAnimationFrame(flush);
  }
}

function flush() {
  frameRequested = false;
  for (const item of dirty) renderItem(item);
  dirty.clear();
  updateSummary();
}

function statusText(item) {
  const { stage, detail } = item;
  switch (item.state) {
    case "done": {
      const total = item.finishedAt - item.startedAt;
      return item.result.cached ? `Done in ${formatDuration(total)} · answered from cache` : `Done in ${formatDuration(total)}`;
    }
    case "cancelled": return "Cancelled";
    case "error": return "Failed";
    default: break;
  }
  switch (stage) {
    case "hashing": return "Computing checksum…";
    case "connecting": return item.acknowledged > 0 ? "Reconnecting…" : "Connecting…";
    case "waiting": return "Waiting for a free upload slot…";
    case "retrying":
      return detail.delay > 0
        ? `Connection lost — retrying in ${formatDuration(detail.delay)}`
        : "Connection lost — reconnecting…";
    case "upload": {
      const percent = item.total ? Math.floor((item.acknowledged / item.total) * 100) : 0;
      return `${formatBytes(item.acknowledged)} of ${formatBytes(item.total)} · ${percent}%`;
    }
    case "queued":
      return detail.position > 1 ? `In queue · position ${detail.position}` : "In queue · next in line";
    case "decoding": return "Decoding the image…";
    case "inference": return "Running the model…";
    default: return "";
  }
}

function rateText(item) {
  if (item.state === "done" || item.state === "error" || item.state === "cancelled") {
    // A speed means something only for files big enough to take a while.
    if (item.total >= 4 * 1024 * 1024 && item.uploadDoneAt > item.uploadStartedAt && !item.result?.cached) {
      const seconds = (item.uploadDoneAt - item.uploadStartedAt) / 1000;
      return `uploaded at ${formatBytes(item.total / seconds)}/s`;
    }
    return "";
  }
  if (item.stage !== "upload") return "";
  const speed = speedOf(item);
  if (speed <= 0) return item.samples.length > 1 ? "waiting for the server…" : "";
  const eta = ((item.total - item.acknowledged) / speed) * 1000;
  return `${formatBytes(speed)}/s · ${formatDuration(eta)} left`;
}

function renderLabels(list, labels) {
  list.replaceChildren(...labels.map(({ label, score }) => {
    const row = document.createElement("li");
    row.className = "label-row";
    const [name, aka] = splitLabel(label);
    const nameEl = document.createElement("span");
    nameEl.className = "label-name";
    nameEl.title = label;
    nameEl.textContent = name;
    if (aka) {
      const akaEl = document.createElement("span");
      akaEl.className = "aka";
      akaEl.textContent = aka;
      nameEl.append(akaEl);
    }
    const bar = document.createElement("span");
    bar.className = "label-bar";
    const fill = document.createElement("span");
    fill.style.width = `${Math.max(1, Math.min(100, score * 100)).toFixed(1)}%`;
    bar.append(fill);
    const value = document.createElement("span");
    value.className = "label-score";
    value.textContent = score < 0.001 ? "<0.1%" : `${(score * 100).toFixed(score >= 0.1 ? 0 : 1)}%`;
    row.append(nameEl, bar, value);
    return row;
  }));
}

function renderSwatches(box, colors) {
  box.replaceChildren(...colors.map(({ hex, fraction }) => {
    const swatch = document.createElement("span");
    swatch.style.background = hex;
    swatch.style.flex = `${fraction} 1 0`;
    const [r, g, b] = [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16));
    swatch.style.color = r * 0.299 + g * 0.587 + b * 0.114 > 150 ? "#161a26" : "#fff";
    swatch.textContent = fraction > 0.08 ? hex : "";
    swatch.title = `${hex} · ${(fraction * 100).toFixed(0)}%`;
    return swatch;
  }));
}

function renderFacts(box, item) {
  const result = item.result;
  const facts = [];
  if (result.cached) facts.push('<span class="pill">cached</span>');
  if (result.image?.width) facts.push(`<b>${result.image.width} × ${result.image.height}</b> ${result.image.format || ""}`);
  const timings = result.timings_ms || {};
  for (const [key, label] of [["upload", "upload"], ["queue", "queue"], ["decode", "decode"], ["inference", "inference"]]) {
    if (typeof timings[key] === "number") facts.push(`${label} <b>${formatDuration(timings[key])}</b>`);
  }
  if (result.model) facts.push(escapeHtml(result.model));
  box.innerHTML = facts.map((fact) => `<span>${fact}</span>`).join("");
}

function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

function renderItem(item) {
  const card = item.card;
  card.dataset.state = item.state;
  card.dataset.acknowledged = String(item.acknowledged);
  const finished = ["done", "error", "cancelled"].includes(item.state);
  const ackPercent = item.total ? (item.acknowledged / item.total) * 100 : 0;
  const sentPercent = item.total ? (item.sent / item.total) * 100 : 0;
  const progress = $(".progress", card);
  $(".progress-acked", card).style.width = `${item.state === "done" ? 100 : ackPercent}%`;
  $(".progress-sent", card).style.width = `${finished ? 0 : sentPercent}%`;
  progress.setAttribute("aria-valuenow", String(Math.floor(ackPercent)));
  $(".status", card).textContent = statusText(item);
  $(".rate", card).textContent = rateText(item);
  $(".cancel", card).hidden = finished;
  $(".retry", card).hidden = !(item.state === "error" || item.state === "cancelled");

  const reached = STEP_ORDER.indexOf(item.stage);
  for (const step of card.querySelectorAll(".steps li")) {
    const index = STEP_ORDER.indexOf(step.dataset.step);
    step.classList.toggle("active", index === reached);
    step.classList.toggle("complete", reached > index);
    if (step.dataset.step === "queued") {
      step.textContent = item.stage === "queued" && item.detail.position ? `Queue · #${item.detail.position}` : "Queue";
    }
  }

  const labels = $(".labels", card);
  const swatches = $(".swatches", card);
  const facts = $(".facts", card);
  if (item.state === "done") {
    const result = item.result.result || {};
    if (Array.isArray(result.labels)) renderLabels(labels, result.labels);
    if (Array.isArray(result.colors)) renderSwatches(swatches, result.colors);
    renderFacts(facts, item);
  } else {
    labels.replaceChildren();
    swatches.replaceChildren();
    facts.replaceChildren();
  }

  const errorBox = $(".error-box", card);
  errorBox.hidden = !(item.state === "error" || item.state === "cancelled");
  if (item.state === "error") {
    $(".error-title", errorBox).textContent = describeError(item.error);
    $(".error-detail", errorBox).textContent = `${item.error.code}: ${item.error.message}`;
  } else if (item.state === "cancelled") {
    $(".error-title", errorBox).textContent = "You cancelled this upload.";
    $(".error-detail", errorBox).textContent = "The server has discarded the bytes it received.";
  }
}

function updateSummary() {
  const items = demo.items;
  const summary = $("#summary");
  summary.hidden = items.length === 0;
  dropzone.classList.toggle("compact", items.length > 0);
  $("#clear-done").hidden = !items.some((i) => ["done", "error", "cancelled"].includes(i.state));
  if (!items.length) return;
  const count = (state) => items.filter((i) => i.state === state).length;
  const active = items.length - count("done") - count("error") - count("cancelled");
  const parts = [`<strong>${items.length}</strong> file${items.length === 1 ? "" : "s"}`];
  if (active) parts.push(`${active} in progress`);
  if (count("done")) parts.push(`${count("done")} done`);
  if (count("error")) parts.push(`${count("error")} failed`);
  if (count("cancelled")) parts.push(`${count("cancelled")} cancelled`);
  summary.innerHTML = parts.join(" · ");
}

$("#clear-done").addEventListener("click", () => {
  for (const item of demo.items) {
    if (["done", "error", "cancelled"].includes(item.state) && item.card.isConnected) {
      item.card.remove();
      if (item.objectUrl) URL.revokeObjectURL(item.objectUrl);
    }
  }
  demo.items = demo.items.filter((item) => item.card.isConnected);
  updateSummary();
});

// Picking and dropping files ---------------------------------------------------------------------

const dropzone = $("#dropzone");
const input = $("#file-input");

input.addEventListener("change", () => {
  if (input.files?.length) addFiles(input.files);
  input.value = ""; // picking the same file again starts it again
});

let dragDepth = 0;
dropzone.addEventListener("dragenter", (event) => {
  event.preventDefault();
  dragDepth += 1;
  dropzone.classList.add("dragging");
});
dropzone.addEventListener("dragleave", () => {
  dragDepth = Math.max(0, dragDepth - 1);
  if (!dragDepth) dropzone.classList.remove("dragging");
});
dropzone.addEventListener("drop", (event) => {
  event.preventDefault();
  dragDepth = 0;
  dropzone.classList.remove("dragging");
  if (event.dataTransfer?.files?.length) addFiles(event.dataTransfer.files);
});
// A file dropped beside the zone must not replace the page.
window.addEventListener("dragover", (event) => event.preventDefault());
window.addEventListener("drop", (event) => event.preventDefault());

// Tabs -----------------------------------------------------------------------------------------------

function selectTab(name) {
  for (const tab of document.querySelectorAll(".tab")) {
    const selected = tab.id === `tab-${name}`;
    tab.setAttribute("aria-selected", String(selected));
    $(`#${tab.getAttribute("aria-controls")}`).hidden = !selected;
  }
  if (name !== "camera" && camera) stopCamera();
}
$("#tab-images").addEventListener("click", () => selectTab("images"));
$("#tab-camera").addEventListener("click", () => selectTab("camera"));

// Camera -----------------------------------------------------------------------------------------------

const video = $("#camera-video");
const viewer = $("#viewer");
const toggle = $("#camera-toggle");
const cameraError = $("#camera-error");
let camera = null;
let mediaStream = null;
let statsFrame = false;

function showCameraError(message) {
  cameraError.textContent = message;
  cameraError.hidden = !message;
}

function renderCameraStats(stats) {
  if (statsFrame) return;
  statsFrame = true;
  requestAnimationFrame(() => {
    statsFrame = false;
    $("#stat-fps").textContent = stats.results ? stats.fps.toFixed(1) : "–";
    $("#stat-latency").textContent = stats.latencyMs === null ? "–" : String(Math.round(stats.avgLatencyMs));
    $("#stat-sent").textContent = String(stats.sent);
    $("#stat-dropped").textContent = String(stats.dropped);
  });
}

function cameraMediaError(error) {
  switch (error?.name) {
    case "NotAllowedError": return "Camera access was blocked. Allow it in your browser's site settings and try again.";
    case "NotFoundError": return "No camera was found on this device.";
    case "NotReadableError": return "The camera is in use by another application.";
    default: return "The camera could not be started.";
  }
}

async function startCameraMode() {
  showCameraError("");
  if (!navigator.mediaDevices?.getUserMedia) {
    showCameraError("This browser cannot share a camera with web pages (a secure origin — https or localhost — is needed).");
    return;
  }
  toggle.disabled = true;
  $("#viewer-message").textContent = "Starting camera…";
  try {
    mediaStream = await navigator.mediaDevices.getUserMedia({ video: { width: { ideal: 1280 }, height: { ideal: 720 } }, audio: false });
  } catch (error) {
    toggle.disabled = false;
    $("#viewer-message").textContent = "Camera is off";
    showCameraError(cameraMediaError(error));
    return;
  }
  video.srcObject = mediaStream;
  await video.play().catch(() => {});
  const task = taskSelect.value || demo.welcome?.default_task || "classify";
  camera = client.camera(video, {
    fps: Number($("#camera-fps").value),
    task,
    options: taskOptions(task, 3),
    onResult(result, stats) {
      demo.camera.results += 1;
      const labels = result.result?.labels;
      demo.camera.lastLabels = (labels || []).map((l) => l.label);
      demo.camera.stats = { ...stats };
      const overlay = $("#overlay-labels");
      if (Array.isArray(labels)) renderLabels(overlay, labels.slice(0, 3));
      else if (Array.isArray(result.result?.colors)) {
        renderLabels(overlay, result.result.colors.slice(0, 3).map((c) => ({ label: c.hex, score: c.fraction })));
      }
      renderCameraStats(stats);
    },
    onDropped(seq, stats) {
      demo.camera.dropped += 1;
      renderCameraStats(stats);
    },
    onStats: renderCameraStats,
    onError(error) {
      demo.camera.errors.push(error.code);
      if (error.code === "connection_lost" || error.code === "stalled") showCameraError("Connection lost — reconnecting…");
      else if (error.code !== "connection_failed") showCameraError(describeError(error));
    },
  });
  try {
    await camera.start();
  } catch (error) {
    showCameraError(describeError(error));
    stopCamera();
    toggle.disabled = false;
    return;
  }
  demo.camera.running = true;
  viewer.dataset.state = "live";
  toggle.textContent = "Stop camera";
  toggle.classList.add("stop");
  toggle.disabled = false;
}

function stopCamera() {
  camera?.stop();
  camera = null;
  demo.camera.running = false;
  for (const track of mediaStream?.getTracks() || []) track.stop();
  mediaStream = null;
  video.srcObject = null;
  viewer.dataset.state = "off";
  $("#viewer-message").textContent = "Camera is off";
  $("#overlay-labels").replaceChildren();
  toggle.textContent = "Start camera";
  toggle.classList.remove("stop");
}

toggle.addEventListener("click", () => (camera ? stopCamera() : startCameraMode()));
$("#camera-fps").addEventListener("change", () => {
  if (camera) camera.options.fps = Number($("#camera-fps").value);
});

ensureConnected();
