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
  transport: "websocket",
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

const TASK_NAMES = {
  classify: "Classify objects",
  colors: "Dominant colors",
  "zero-shot": "Label with your words",
  detect: "Detect objects",
  ocr: "Read text",
  faces: "Find faces",
  codes: "QR codes and barcodes",
  moderate: "Check for adult content",
  caption: "Describe in words",
  embed: "Embedding vector",
};

function taskName(task) {
  return TASK_NAMES[task] || task.replace(/[._-]+/g, " ").replace(/^\w/, (c) => c.toUpperCase());
}

/** "max_objects" → "Max objects". */
function humanize(name) {
  const words = String(name).replace(/[._-]+/g, " ").trim();
  return words ? words[0].toUpperCase() + words.slice(1) : String(name);
}

// Connection status ----------------------------------------------------------------------------

const connectionPill = $("#connection");

function setConnection(state, text) {
  connectionPill.dataset.state = state;
  connectionPill.dataset.transport = demo.transport;
  $(".connection-label", connectionPill).textContent = text;
}

/** Uploads go over tus and plain HTTP now (the library decided, or the socket never opened). */
function useHttp() {
  demo.transport = "tus";
  connection.webSocketBlocked = true; // the library's uploads go straight to tus too
  setConnection("http", "Connected over HTTP (tus): WebSockets are blocked");
}

/** Where the socket cannot be opened: does the server answer tus (a proxy blocks sockets)? */
async function httpFallback() {
  try {
    const response = await fetch("/v1/tus/", { method: "OPTIONS" });
    if (!response.headers.get("Tus-Version")) return false;
    const body = await (await fetch("/v1/tasks", { headers: { Accept: "application/json" } })).json();
    applyWelcome({ tasks: body.tasks.map((task) => task.name), default_task: body.default_task,
      limits: null });
    useHttp();
    return true;
  } catch {
    return false;
  }
}

let reconnectDelay = 1000;
let reconnectTimer = null;
let failedConnects = 0;

async function ensureConnected() {
  clearTimeout(reconnectTimer);
  try {
    await client.connect();
    reconnectDelay = 1000;
    failedConnects = 0;
  } catch (error) {
    failedConnects += 1;
    if (error.code !== "unauthorized" && failedConnects >= 2 && demo.transport !== "tus"
        && await httpFallback()) {
      return;
    }
    if (demo.transport === "tus") return;
    setConnection("offline", error.code === "unauthorized" ? "Access denied" : "Offline — retrying");
    reconnectTimer = setTimeout(ensureConnected, reconnectDelay);
    reconnectDelay = Math.min(reconnectDelay * 2, 15000);
  }
}

connection.on("open", (welcome) => {
  demo.welcome = welcome;
  demo.transport = "websocket";
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
const optionsBox = $("#task-options");

function applyWelcome(welcome) {
  const current = taskSelect.value || welcome.default_task;
  taskSelect.replaceChildren(...welcome.tasks.map((task) => {
    const option = new Option(taskName(task), task);
    option.selected = task === current;
    return option;
  }));
  renderTaskFields();
  loadTaskDescriptions();
  const limits = welcome.limits;
  if (!limits) return; // known over HTTP only: the socket's welcome has them
  $("#drop-hint").textContent =
    `JPEG, PNG, WebP, GIF, BMP, TIFF · up to ${formatBytes(limits.max_image_bytes)} each`;
  $("#server-info").textContent =
    `${welcome.tasks.length} task${welcome.tasks.length === 1 ? "" : "s"} · ` +
    `chunks up to ${formatBytes(limits.max_chunk_bytes)} · ` +
    `${formatBytes(limits.window_bytes)} in flight · ${limits.max_uploads} uploads at once per connection`;
}

// Tasks and their options: GET /v1/tasks describes each task with the JSON Schema of its
// options, and the page builds its form from that, so a user's own task gets fields too.

/** name → {name, kind, model, revision, options, result, spatial}, from GET /v1/tasks. */
demo.tasks = new Map();

async function loadTaskDescriptions() {
  try {
    const response = await fetch("/v1/tasks", { headers: { Accept: "application/json" } });
    if (!response.ok) throw new Error(`GET /v1/tasks answered ${response.status}`);
    const body = await response.json();
    demo.tasks = new Map(body.tasks.map((task) => [task.name, task]));
  } catch (error) {
    // The socket's welcome still names the tasks; they run with their default options.
    record(null, "tasks-error", { message: String(error?.message || error) });
  }
  renderTaskFields();
}

/** The schema itself, or what a `$ref` or an `anyOf: [X, null]` (an optional field) points at. */
function plainSchema(schema, root) {
  let current = schema || {};
  for (let depth = 0; depth < 4; depth += 1) {
    if (typeof current.$ref === "string") {
      const name = current.$ref.split("/").pop();
      current = { ...(root?.$defs?.[name] || {}), ...current, $ref: undefined };
    } else if (Array.isArray(current.anyOf)) {
      const choice = current.anyOf.find((option) => option.type !== "null") || {};
      current = { ...choice, ...current, anyOf: undefined };
    } else break;
  }
  return current;
}

/** Values typed per task and option, kept while switching tasks back and forth. */
const typedOptions = new Map();

function optionField(task, name, schema, required) {
  const kind = Array.isArray(schema.enum) ? "enum"
    : schema.type === "array" && ["string", undefined].includes(schema.items?.type) ? "list"
      : schema.type;
  if (!["boolean", "integer", "number", "enum", "list", "string"].includes(kind)) return null;
  const label = document.createElement("label");
  label.className = kind === "boolean" ? "field check" : "field";
  label.title = schema.description || "";
  const caption = document.createElement("span");
  caption.textContent = schema.title && schema.title !== humanize(name) ? schema.title : humanize(name);
  let input;
  const saved = typedOptions.get(`${task}/${name}`);
  if (kind === "enum") {
    input = document.createElement("select");
    for (const value of schema.enum) input.append(new Option(String(value), JSON.stringify(value)));
    input.value = JSON.stringify(saved ?? schema.default ?? schema.enum[0]);
  } else {
    input = document.createElement("input");
    if (kind === "boolean") {
      input.type = "checkbox";
      input.checked = Boolean(saved ?? schema.default ?? false);
    } else if (kind === "integer" || kind === "number") {
      input.type = "number";
      input.step = kind === "integer" ? "1" : "any";
      const min = schema.minimum ?? (schema.exclusiveMinimum !== undefined ? schema.exclusiveMinimum : undefined);
      const max = schema.maximum ?? schema.exclusiveMaximum;
      if (min !== undefined) input.min = String(min);
      if (max !== undefined) input.max = String(max);
      const value = saved ?? schema.default;
      input.value = value === undefined || value === null ? "" : String(value);
    } else {
      input.type = "text";
      const value = saved ?? schema.default;
      input.value = Array.isArray(value) ? value.join(", ") : value == null ? "" : String(value);
      if (kind === "list") input.placeholder = "comma, separated, words";
    }
  }
  input.required = required;
  input.dataset.option = name;
  input.dataset.kind = kind;
  input.addEventListener("change", () => typedOptions.set(`${task}/${name}`, fieldValue(input)));
  if (kind === "boolean") label.append(input, caption);
  else label.append(caption, input);
  return label;
}

/** A field's value as the options object wants it; undefined: leave the option out. */
function fieldValue(input) {
  switch (input.dataset.kind) {
    case "boolean": return input.checked;
    case "enum": return JSON.parse(input.value);
    case "integer":
    case "number": return input.value === "" ? undefined : Number(input.value);
    case "list": {
      const words = input.value.split(/[,\n]/).map((word) => word.trim()).filter(Boolean);
      return words.length ? words : undefined;
    }
    default: return input.value === "" ? undefined : input.value;
  }
}

function renderTaskFields() {
  const task = taskSelect.value;
  const description = demo.tasks.get(task);
  const schema = description?.options;
  const fields = [];
  if (schema?.properties) {
    const required = new Set(schema.required || []);
    for (const [name, property] of Object.entries(schema.properties)) {
      const field = optionField(task, name, plainSchema(property, schema), required.has(name));
      if (field) fields.push(field);
    }
  }
  optionsBox.replaceChildren(...fields);
  const about = $("#task-about");
  about.replaceChildren();
  if (description) {
    const model = document.createElement("code");
    model.textContent = description.model + (description.revision ? ` @ ${description.revision.slice(0, 12)}` : "");
    about.append(description.spatial ? "Looks at every pixel, tile by tile · " : "", "model ", model);
  }
}
taskSelect.addEventListener("change", renderTaskFields);

/** The options of the chosen task, from its fields; `override` wins (the camera asks for fewer labels). */
function taskOptions(task, override = {}) {
  const options = {};
  if (task === taskSelect.value) {
    for (const input of optionsBox.querySelectorAll("[data-option]")) {
      const value = fieldValue(input);
      if (value !== undefined) options[input.dataset.option] = value;
    }
  }
  for (const [name, value] of Object.entries(override)) {
    if (demo.tasks.get(task)?.options?.properties?.[name]) options[name] = value;
  }
  return options;
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
  demo.events.push({ t: performance.now(), item: item ? item.index : null, kind, ...fields });
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
        error: detail.error?.code, done: detail.done, total: detail.total, transport: detail.transport });
      item.transport = detail.transport ?? item.transport;
      if (detail.transport === "tus" && demo.transport !== "tus") useHttp();
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
    record(item, "result", { cached: result.cached, labels: result.result?.labels?.map((l) => l.label),
      task: result.task });
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
    case "inference":
      return detail.total > 1 ? `Analyzing tiles · ${detail.done ?? 0} of ${detail.total} done`
        : "Running the model…";
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

// Results: one renderer for every task's shape (PROTOCOL.md, "Tasks and their results"); what
// it does not know is still shown as JSON.

const SVG = "http://www.w3.org/2000/svg";
const MAX_BOXES = 300;

/** Boxes of a result, each `{group, box, label}`: objects, faces, codes and OCR lines. */
function boxesOf(result) {
  const shapes = [];
  const add = (group, entries, labelOf) => {
    if (!Array.isArray(entries)) return;
    for (const entry of entries) {
      if (Array.isArray(entry?.box) && entry.box.length === 4) shapes.push({ group, box: entry.box, label: labelOf(entry) });
    }
  };
  const percent = (score) => (typeof score === "number" ? ` ${Math.round(score * 100)}%` : "");
  add("objects", result.objects, (o) => `${o.label ?? "object"}${percent(o.score)}`);
  add("faces", result.faces, (f) => `face${percent(f.score)}`);
  add("codes", result.codes, (c) => String(c.text ?? c.format ?? "code"));
  add("lines", result.lines, () => "");
  return shapes.slice(0, MAX_BOXES);
}

/**
 * Draws `shapes` into `svg`; `place(box)` gives a box's [x, y, width, height] as SVG lengths.
 * Labels are text nodes (never markup): they come from models and from images.
 */
function drawBoxes(svg, shapes, place) {
  const groups = new Map();
  for (const shape of shapes) {
    if (!groups.has(shape.group)) {
      const g = document.createElementNS(SVG, "g");
      g.setAttribute("class", shape.group);
      groups.set(shape.group, g);
    }
    const [x, y, width, height] = place(shape.box);
    const rect = document.createElementNS(SVG, "rect");
    rect.setAttribute("x", x);
    rect.setAttribute("y", y);
    rect.setAttribute("width", width);
    rect.setAttribute("height", height);
    rect.setAttribute("rx", "2");
    const g = groups.get(shape.group);
    g.append(rect);
    if (shape.label) {
      const text = document.createElementNS(SVG, "text");
      text.setAttribute("x", x);
      text.setAttribute("y", y);
      text.setAttribute("dx", "3");
      text.setAttribute("dy", "-4");
      text.textContent = shape.label;
      g.append(text);
    }
  }
  svg.replaceChildren(...groups.values());
}

/** The size the boxes refer to: the original image as displayed (EXIF orientation applied). */
function originalSize(item, img) {
  let width = item.result.image?.width;
  let height = item.result.image?.height;
  if (!width || !height) return null;
  // The browser shows the picture upright; a size reported before rotation is swapped.
  if (img?.naturalWidth && (img.naturalWidth > img.naturalHeight) !== (width > height) && width !== height) {
    [width, height] = [height, width];
  }
  return [width, height];
}

function renderFigure(item, shapes) {
  const figure = $(".figure", item.card);
  const img = $("img", figure);
  figure.hidden = !shapes.length || !item.objectUrl;
  if (figure.hidden) return;
  const draw = () => {
    const size = originalSize(item, img);
    if (!size) return;
    const [width, height] = size;
    // Percentages of the picture: the overlay follows it at any displayed size.
    const pct = (value, of) => `${((value / of) * 100).toFixed(3)}%`;
    drawBoxes($("svg", figure), shapes, ([x0, y0, x1, y1]) =>
      [pct(x0, width), pct(y0, height), pct(x1 - x0, width), pct(y1 - y0, height)]);
  };
  if (img.getAttribute("src") !== item.objectUrl) {
    img.addEventListener("load", draw, { once: true });
    img.src = item.objectUrl;
  } else draw();
  const counts = new Map();
  for (const shape of shapes) counts.set(shape.group, (counts.get(shape.group) || 0) + 1);
  const names = { objects: ["object", "objects"], faces: ["face", "faces"], codes: ["code", "codes"], lines: ["line", "lines"] };
  $("figcaption", figure).textContent = [...counts].map(([group, n]) => `${n} ${names[group][n === 1 ? 0 : 1]}`).join(" · ");
}

function renderResult(item) {
  const card = item.card;
  const result = item.result.result || {};
  const labels = $(".labels", card);
  if (Array.isArray(result.labels)) renderLabels(labels, result.labels);
  else if (typeof result.nsfw === "number") renderLabels(labels, [{ label: "Adult content (NSFW)", score: result.nsfw }]);
  else labels.replaceChildren();
  if (Array.isArray(result.colors)) renderSwatches($(".swatches", card), result.colors);
  renderFigure(item, boxesOf(result));

  const text = $(".result-text", card);
  text.classList.toggle("caption", typeof result.caption === "string");
  if (typeof result.caption === "string") text.textContent = result.caption;
  else if (typeof result.text === "string") text.textContent = result.text || "No text found.";
  else if (Array.isArray(result.embedding)) {
    const head = result.embedding.slice(0, 4).map((v) => Number(v).toFixed(3)).join(", ");
    text.textContent = `${result.embedding.length}-dimensional embedding: [${head}, …]`;
  } else if (Array.isArray(result.objects) && !result.objects.length) text.textContent = "No objects found.";
  else if (Array.isArray(result.faces) && !result.faces.length) text.textContent = "No faces found.";
  else if (Array.isArray(result.codes) && !result.codes.length) text.textContent = "No codes found.";
  else text.textContent = "";
  text.hidden = !text.textContent;

  const json = $(".result-json", card);
  json.hidden = false;
  $("pre", json).textContent = JSON.stringify(result, null, 2).slice(0, 20000);
  renderFacts($(".facts", card), item);
}

function clearResult(card) {
  for (const selector of [".labels", ".swatches", ".facts"]) $(selector, card).replaceChildren();
  $(".figure", card).hidden = true;
  $(".result-text", card).hidden = true;
  $(".result-json", card).hidden = true;
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
  // While tiles run, the bar starts over and fills as they finish.
  const tiling = item.state === "processing" && item.stage === "inference" && item.detail.total > 1;
  if (tiling) card.dataset.tiling = "";
  else delete card.dataset.tiling;
  const barPercent = tiling ? (item.detail.done / item.detail.total) * 100 : ackPercent;
  $(".progress-acked", card).style.width = `${item.state === "done" ? 100 : barPercent}%`;
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

  if (item.state === "done") renderResult(item);
  else clearResult(card);

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
    options: taskOptions(task, { top_k: 3 }),
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
      drawCameraBoxes(result);
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

/** Boxes over the live video, which shows the frame scaled to cover the viewer (cropped). */
function drawCameraBoxes(result) {
  const svg = $("#camera-boxes");
  const width = result.image?.width;
  const height = result.image?.height;
  if (!width || !height) return svg.replaceChildren();
  const scale = Math.max(viewer.clientWidth / width, viewer.clientHeight / height);
  const dx = (viewer.clientWidth - width * scale) / 2;
  const dy = (viewer.clientHeight - height * scale) / 2;
  drawBoxes(svg, boxesOf(result.result || {}), ([x0, y0, x1, y1]) =>
    [dx + x0 * scale, dy + y0 * scale, (x1 - x0) * scale, (y1 - y0) * scale].map(String));
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
  $("#camera-boxes").replaceChildren();
  toggle.textContent = "Start camera";
  toggle.classList.remove("stop");
}

toggle.addEventListener("click", () => (camera ? stopCamera() : startCameraMode()));
$("#camera-fps").addEventListener("change", () => {
  if (camera) camera.options.fps = Number($("#camera-fps").value);
});

ensureConnected();
