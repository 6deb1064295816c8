// cones2 studio: draws a layout and drives the public HTTP/JSON API (docs/serve.md); no other powers.
"use strict";

const $ = (id) => document.getElementById(id);
const COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324"];
const STOP_WORDS = new Set(["a", "an", "the", "and", "or", "on", "in", "of", "with", "at", "to", "by", "for",
  "from", "is", "are", "its", "it", "as", "into", "onto", "over", "under", "near", "next", "background"]);
const GRID = 100;          // boxes snap to 1/100 of the canvas
const HANDLE_PX = 10;      // corner grab distance
const MIN_SIZE = 0.02;

const state = {
  info: null,
  residuals: [],
  subjects: [],            // {word, colour, strength, residualId, box: {x0,y0,x1,y1} | null}
  selected: -1,
  colorMap: null,          // {png (base64), url, entries: [{color, subject, strength}]}
  drag: null,
  running: null,           // {requestId, cancelled}
  sent: null,              // subjects of the last request, in the order sent (maps subjects[i] errors)
  uploading: -1,
  previews: 0,
  gallery: [],
};

// ---- the API --------------------------------------------------------------------------------------
function token() { return $("token").value.trim(); }

function headers(extra) {
  const h = Object.assign({"Content-Type": "application/json"}, extra || {});
  if (token()) h.Authorization = "Bearer " + token();
  return h;
}

class ApiError extends Error {
  constructor(code, message) { super(message); this.code = code; }
}

async function api(method, path, body) {
  const res = await fetch(path, {method, headers: headers(), body: body === undefined ? undefined : JSON.stringify(body)});
  const text = await res.text();
  let data = {};
  try { data = text ? JSON.parse(text) : {}; } catch (e) { throw new ApiError("UNKNOWN", `HTTP ${res.status}: ${text.slice(0, 200)}`); }
  if (!res.ok) throw new ApiError(data.code || `HTTP ${res.status}`, data.message || text);
  return data;
}

function toBase64(buffer) {
  const bytes = new Uint8Array(buffer);
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  return btoa(s);
}

// ---- errors next to their field -------------------------------------------------------------------
function clearErrors() {
  document.querySelectorAll(".error").forEach((el) => { el.textContent = ""; });
  document.querySelectorAll("[aria-invalid]").forEach((el) => el.removeAttribute("aria-invalid"));
}

function subjectErrorEl(word) {
  const i = state.subjects.findIndex((s) => s.word === word);
  return i >= 0 ? document.querySelector(`#subjects .subject:nth-child(${i + 1}) .error`) : null;
}

// The element an error message belongs to: the API's messages begin with the field they name.
function errorTarget(err) {
  if (err.code === "UNAUTHENTICATED") return $("err-token");
  const field = (err.message.match(/^([\w.\[\]<>,#-]+):/) || [])[1] || "";
  const top = field.split(/[.\[]/)[0];
  if (["prompt", "negative_prompt", "steps", "guidance_steps", "seed", "mode", "width", "height"].includes(field)) return $("err-" + field);
  let m = field.match(/^subjects\[(\d+)\]/);
  if (m && state.sent && state.sent[+m[1]]) return subjectErrorEl(state.sent[+m[1]]) || $("err-subjects");
  m = field.match(/^(?:subjects|subject_positions|layout\.boxes|layout\.strengths|layout)\.([^.\[]+)$/);
  if (m && subjectErrorEl(m[1])) return subjectErrorEl(m[1]);
  if (field.startsWith("layout.color_map") || field.startsWith("layout.colors")) return $("err-colormap");
  if (top === "subjects" || top === "layout") return $("err-subjects");
  return $("err-generate");
}

function showError(err, where) {
  const el = where || errorTarget(err);
  el.textContent = err.code && err.code !== "INVALID_ARGUMENT" ? `${err.code}: ${err.message}` : err.message;
  if (el.id === "err-token") $("token").setAttribute("aria-invalid", "true");
}

// ---- server info and the residual store ----------------------------------------------------------
async function connect() {
  $("err-token").textContent = "";
  try {
    state.info = await api("GET", "/v1/info");
    const i = state.info;
    $("model-info").textContent = `${i.modelId || "model"} · ${i.backend || ""} on ${i.device || "?"} · ${i.defaultResolution} px`;
    if (!$("width").value) $("width").value = i.defaultResolution;
    if (!$("height").value) $("height").value = i.defaultResolution;
    if (i.maxSteps) $("steps").max = i.maxSteps;
    await loadResiduals();
  } catch (err) {
    $("model-info").textContent = "not connected";
    showError(err, err.code === "UNAUTHENTICATED" ? $("err-token") : $("err-generate"));
  }
  resizeCanvas();
}

async function loadResiduals() {
  state.residuals = (await api("GET", "/v1/residuals")).residuals || [];
  renderSubjects();
}

async function upload(index, file) {
  const row = document.querySelector(`#subjects .subject:nth-child(${index + 1}) .error`);
  row.textContent = "";
  try {
    const data = toBase64(await file.arrayBuffer());
    const out = await api("POST", "/v1/residuals", {safetensors: data});
    await loadResiduals();
    state.subjects[index].residualId = out.residual.id;
    renderSubjects();
  } catch (err) {
    showError(err, err.code === "UNAUTHENTICATED" ? $("err-token") : row);
  }
}

// ---- subjects -------------------------------------------------------------------------------------
function promptWords() {
  const seen = new Set();
  return ($("prompt").value.toLowerCase().match(/[a-z0-9][a-z0-9'-]*/g) || [])
    .filter((w) => !STOP_WORDS.has(w) && !seen.has(w) && seen.add(w));
}

function renderWords() {
  const box = $("words");
  box.replaceChildren();
  for (const w of promptWords()) {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "word";
    b.textContent = w;
    const on = state.subjects.some((s) => s.word === w);
    b.setAttribute("aria-pressed", String(on));
    b.title = on ? `remove subject "${w}"` : `make "${w}" a subject`;
    b.addEventListener("click", () => (on ? removeSubject(w) : addSubject(w)));
    box.append(b);
  }
}

function addSubject(word, fields) {
  const used = new Set(state.subjects.map((s) => s.colour));
  const colour = COLOURS.find((c) => !used.has(c)) || COLOURS[state.subjects.length % COLOURS.length];
  state.subjects.push(Object.assign({word, colour, strength: 2.5, residualId: "", box: null}, fields || {}));
  state.selected = state.subjects.length - 1;
  render();
}

function removeSubject(word) {
  state.subjects = state.subjects.filter((s) => s.word !== word);
  state.selected = Math.min(state.selected, state.subjects.length - 1);
  render();
}

function boxText(b) { return b ? `${b.x0.toFixed(2)}, ${b.y0.toFixed(2)}, ${b.x1.toFixed(2)}, ${b.y1.toFixed(2)}` : "no box"; }

function renderSubjects() {
  const list = $("subjects");
  list.replaceChildren();
  state.subjects.forEach((s, i) => {
    const row = document.createElement("div");
    row.className = "subject" + (i === state.selected ? " selected" : "");
    row.dataset.word = s.word;
    const pick = document.createElement("button");
    pick.type = "button";
    pick.className = "pick";
    pick.textContent = s.word;
    pick.style.borderColor = s.colour;
    pick.setAttribute("aria-pressed", String(i === state.selected));
    pick.title = "select to draw its box";
    pick.addEventListener("click", () => { state.selected = i; render(); $("layout").focus(); });
    const coords = document.createElement("span");
    coords.className = "coords";
    coords.textContent = boxText(s.box);
    const strength = labelled("Strength", "input", (el) => {
      el.type = "number"; el.step = "0.1"; el.min = "0"; el.value = s.strength; el.className = "strength";
      el.addEventListener("change", () => { s.strength = parseFloat(el.value); drawLayout(); });
    });
    const residual = labelled("Residual", "select", (el) => {
      el.className = "residual";
      el.append(new Option("none (the plain word)", ""));
      const mine = state.residuals.filter((r) => r.word === s.word);
      const rest = state.residuals.filter((r) => r.word !== s.word);
      for (const r of mine.concat(rest)) el.append(new Option(`${r.word || "?"} · ${r.id.slice(0, 10)}`, r.id));
      if (s.residualId && !state.residuals.some((r) => r.id === s.residualId)) el.append(new Option(s.residualId.slice(0, 10), s.residualId));
      el.value = s.residualId;
      el.addEventListener("change", () => { s.residualId = el.value; });
    });
    const file = labelled("Upload residual", "input", (el) => {
      el.type = "file"; el.accept = ".safetensors"; el.className = "upload";
      el.addEventListener("change", () => el.files[0] && upload(i, el.files[0]));
    });
    const add = button("Default box", () => { s.box = defaultBox(i); state.selected = i; render(); });
    const del = button("Remove", () => removeSubject(s.word));
    const err = document.createElement("p");
    err.className = "error";
    err.setAttribute("role", "alert");
    row.append(pick, coords, strength, residual, file, add, del, err);
    list.append(row);
  });
}

function labelled(text, tag, setup) {
  const label = document.createElement("label");
  const el = document.createElement(tag);
  setup(el);
  label.append(text + " ", el);
  return label;
}

function button(text, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = text;
  b.addEventListener("click", onClick);
  return b;
}

function defaultBox(i) {
  const x = 0.05 + 0.3 * (i % 3), y = 0.05 + 0.3 * (Math.floor(i / 3) % 3);
  return {x0: snap(x), y0: snap(y), x1: snap(x + 0.3), y1: snap(y + 0.3)};
}

function render() { renderWords(); renderSubjects(); drawLayout(); }

// ---- the layout canvas ----------------------------------------------------------------------------
const canvas = $("layout");
const ctx = canvas.getContext("2d");
const snap = (v) => Math.round(Math.min(1, Math.max(0, v)) * GRID) / GRID;

function aspect() {
  const w = parseInt($("width").value, 10), h = parseInt($("height").value, 10);
  return w > 0 && h > 0 ? w / h : 1;
}

function resizeCanvas() {
  const width = canvas.parentElement.clientWidth || 512;
  const css = Math.min(width, 512);
  canvas.style.width = css + "px";
  canvas.style.height = Math.round(css / aspect()) + "px";
  const dpr = window.devicePixelRatio || 1;
  canvas.width = Math.round(css * dpr);
  canvas.height = Math.round(css / aspect() * dpr);
  drawLayout();
}

function drawBoxes(c, w, h, boxes, selected) {
  c.font = `${Math.max(12, Math.round(w / 30))}px sans-serif`;
  boxes.forEach((b, i) => {
    if (!b.box) return;
    const x = b.box.x0 * w, y = b.box.y0 * h, bw = (b.box.x1 - b.box.x0) * w, bh = (b.box.y1 - b.box.y0) * h;
    c.fillStyle = b.colour + "33";
    c.fillRect(x, y, bw, bh);
    c.strokeStyle = b.colour;
    c.lineWidth = i === selected ? 3 : 2;
    c.strokeRect(x, y, bw, bh);
    c.fillStyle = b.colour;
    c.fillText(`${b.word} ${Number(b.strength).toFixed(1)}`, x + 4, y + Math.max(14, w / 28));
    if (i === selected) for (const [cx, cy] of [[x, y], [x + bw, y], [x, y + bh], [x + bw, y + bh]]) c.fillRect(cx - 4, cy - 4, 8, 8);
  });
}

function drawLayout() {
  const w = canvas.width, h = canvas.height;
  ctx.setTransform(1, 0, 0, 1, 0, 0);
  ctx.clearRect(0, 0, w, h);
  ctx.fillStyle = "#f4f1ea";
  ctx.fillRect(0, 0, w, h);
  if (state.colorMap && state.colorMap.image) {
    ctx.drawImage(state.colorMap.image, 0, 0, w, h);
    return;
  }
  ctx.strokeStyle = "#ddd6c8";
  ctx.lineWidth = 1;
  for (let k = 1; k < 10; k++) {
    ctx.beginPath(); ctx.moveTo(k * w / 10, 0); ctx.lineTo(k * w / 10, h); ctx.stroke();
    ctx.beginPath(); ctx.moveTo(0, k * h / 10); ctx.lineTo(w, k * h / 10); ctx.stroke();
  }
  drawBoxes(ctx, w, h, state.subjects, state.selected);
  document.querySelectorAll("#subjects .coords").forEach((el, i) => { el.textContent = boxText(state.subjects[i].box); });
}

function pointer(ev) {
  const r = canvas.getBoundingClientRect();
  return {x: (ev.clientX - r.left) / r.width, y: (ev.clientY - r.top) / r.height, r};
}

function hit(p) {
  const tolX = HANDLE_PX / p.r.width, tolY = HANDLE_PX / p.r.height;
  const order = [state.selected].concat(state.subjects.map((_, i) => i).filter((i) => i !== state.selected));
  for (const i of order) {
    const b = i >= 0 && state.subjects[i].box;
    if (!b) continue;
    for (const [cx, cy] of [["x0", "y0"], ["x1", "y0"], ["x0", "y1"], ["x1", "y1"]]) {
      if (Math.abs(p.x - b[cx]) <= tolX && Math.abs(p.y - b[cy]) <= tolY) return {i, kind: "resize", cx, cy};
    }
  }
  for (const i of order) {
    const b = i >= 0 && state.subjects[i].box;
    if (b && p.x >= b.x0 && p.x <= b.x1 && p.y >= b.y0 && p.y <= b.y1) return {i, kind: "move"};
  }
  return null;
}

canvas.addEventListener("pointerdown", (ev) => {
  if (state.colorMap) return;
  const p = pointer(ev);
  const h = hit(p);
  if (h) {
    state.selected = h.i;
    state.drag = Object.assign({start: p, box: Object.assign({}, state.subjects[h.i].box)}, h);
  } else if (state.selected >= 0) {
    state.drag = {i: state.selected, kind: "draw", start: p};
  } else {
    $("err-subjects").textContent = "pick a word of the prompt as a subject first, then draw its box";
    return;
  }
  canvas.setPointerCapture(ev.pointerId);
  renderSubjects();
  drawLayout();
});

canvas.addEventListener("pointermove", (ev) => {
  const d = state.drag;
  if (!d) {
    const h = state.colorMap ? null : hit(pointer(ev));
    canvas.style.cursor = h ? (h.kind === "move" ? "move" : "nwse-resize") : "crosshair";
    return;
  }
  const p = pointer(ev);
  const s = state.subjects[d.i];
  if (d.kind === "draw") {
    s.box = normalise({x0: d.start.x, y0: d.start.y, x1: p.x, y1: p.y});
  } else if (d.kind === "move") {
    const dx = clamp(p.x - d.start.x, -d.box.x0, 1 - d.box.x1), dy = clamp(p.y - d.start.y, -d.box.y0, 1 - d.box.y1);
    s.box = {x0: snap(d.box.x0 + dx), y0: snap(d.box.y0 + dy), x1: snap(d.box.x1 + dx), y1: snap(d.box.y1 + dy)};
  } else {
    const b = Object.assign({}, d.box);
    b[d.cx] = p.x;
    b[d.cy] = p.y;
    s.box = normalise(b);
  }
  drawLayout();
});

function endDrag() {
  const d = state.drag;
  state.drag = null;
  if (!d) return;
  const b = state.subjects[d.i] && state.subjects[d.i].box;
  if (b && (b.x1 - b.x0 < MIN_SIZE || b.y1 - b.y0 < MIN_SIZE)) state.subjects[d.i].box = d.box || null;
  render();
}
canvas.addEventListener("pointerup", endDrag);
canvas.addEventListener("pointercancel", endDrag);

const clamp = (v, lo, hi) => Math.min(hi, Math.max(lo, v));

function normalise(b) {
  return {x0: snap(Math.min(b.x0, b.x1)), y0: snap(Math.min(b.y0, b.y1)), x1: snap(Math.max(b.x0, b.x1)), y1: snap(Math.max(b.y0, b.y1))};
}

canvas.addEventListener("keydown", (ev) => {
  const s = state.subjects[state.selected];
  if (!s || state.colorMap) return;
  const step = 1 / GRID * (ev.altKey ? 5 : 1);
  const moves = {ArrowLeft: [-step, 0], ArrowRight: [step, 0], ArrowUp: [0, -step], ArrowDown: [0, step]};
  if (ev.key === "b" || ev.key === "B") {
    s.box = s.box || defaultBox(state.selected);
  } else if (ev.key === "Delete" || ev.key === "Backspace") {
    s.box = null;
  } else if (ev.key === "Tab" || !moves[ev.key] || !s.box) {
    return;
  } else {
    const [dx, dy] = moves[ev.key];
    const b = s.box;
    if (ev.shiftKey) {
      s.box = {x0: b.x0, y0: b.y0, x1: snap(clamp(b.x1 + dx, b.x0 + MIN_SIZE, 1)), y1: snap(clamp(b.y1 + dy, b.y0 + MIN_SIZE, 1))};
    } else {
      const mx = clamp(dx, -b.x0, 1 - b.x1), my = clamp(dy, -b.y0, 1 - b.y1);
      s.box = {x0: snap(b.x0 + mx), y0: snap(b.y0 + my), x1: snap(b.x1 + mx), y1: snap(b.y1 + my)};
    }
  }
  ev.preventDefault();
  render();
});

// ---- colour map -----------------------------------------------------------------------------------
async function loadColorMap(file) {
  $("err-colormap").textContent = "";
  const buffer = await file.arrayBuffer();
  const url = URL.createObjectURL(new Blob([buffer], {type: "image/png"}));
  const image = new Image();
  image.src = url;
  try { await image.decode(); } catch (e) { $("err-colormap").textContent = "layout.color_map.png: the browser cannot decode this file as an image"; return; }
  const c = document.createElement("canvas");
  c.width = Math.min(image.naturalWidth, 512);
  c.height = Math.min(image.naturalHeight, 512);
  const cc = c.getContext("2d");
  cc.imageSmoothingEnabled = false;
  cc.drawImage(image, 0, 0, c.width, c.height);
  const px = cc.getImageData(0, 0, c.width, c.height).data;
  const counts = new Map();
  for (let k = 0; k < px.length; k += 4) {
    const hex = "#" + [px[k], px[k + 1], px[k + 2]].map((v) => v.toString(16).padStart(2, "0")).join("");
    counts.set(hex, (counts.get(hex) || 0) + 1);
  }
  const colours = [...counts.entries()].sort((a, b) => b[1] - a[1]).slice(0, 16).map(([hex]) => hex);
  state.colorMap = {png: toBase64(buffer), image, entries: colours.map((color) => ({color, subject: "", strength: 2.5}))};
  renderColorMap();
  drawLayout();
}

function renderColorMap() {
  const list = $("colormap-entries");
  list.replaceChildren();
  $("clear-colormap").hidden = !state.colorMap;
  if (!state.colorMap) return;
  for (const e of state.colorMap.entries) {
    const row = document.createElement("div");
    row.className = "row";
    const sw = document.createElement("span");
    sw.className = "swatch";
    sw.style.background = e.color;
    const subject = labelled(e.color, "select", (el) => {
      el.append(new Option("(not a subject)", ""));
      for (const s of state.subjects) el.append(new Option(s.word, s.word));
      el.value = e.subject;
      el.addEventListener("change", () => { e.subject = el.value; });
    });
    const strength = labelled("Strength", "input", (el) => {
      el.type = "number"; el.step = "0.1"; el.min = "0"; el.value = e.strength;
      el.addEventListener("change", () => { e.strength = parseFloat(el.value); });
    });
    row.append(sw, subject, strength);
    list.append(row);
  }
}

// ---- the request ----------------------------------------------------------------------------------
function intField(id) {
  const v = $(id).value.trim();
  return v === "" ? undefined : Number(v);
}

function buildRequest(seed) {
  const withResidual = state.subjects.filter((s) => s.residualId);
  state.sent = withResidual.map((s) => s.word);
  const req = {
    prompt: $("prompt").value,
    negative_prompt: $("negative_prompt").value,
    subjects: withResidual.map((s) => ({name: s.word, residual_id: s.residualId})),
    mode: $("mode").value,
    steps: intField("steps"),
    guidance_steps: intField("guidance_steps"),
    width: intField("width"),
    height: intField("height"),
  };
  if (seed !== undefined) req.seed = seed;
  if (state.colorMap) {
    req.layout = {color_map: {png: state.colorMap.png, entries: state.colorMap.entries.filter((e) => e.subject)
      .map((e) => ({color: e.color, subject: e.subject, strength: e.strength}))}};
  } else {
    const boxes = state.subjects.filter((s) => s.box).map((s) => Object.assign({subject: s.word, strength: s.strength}, s.box));
    if (boxes.length) req.layout = {boxes};
  }
  return req;
}

function snapshot() {
  return {subjects: state.subjects.map((s) => Object.assign({}, s, {box: s.box && Object.assign({}, s.box)})),
    colorMap: state.colorMap, count: 1};
}

function restore(item) {
  const r = item.request;
  $("prompt").value = r.prompt;
  $("negative_prompt").value = r.negative_prompt || "";
  $("mode").value = r.mode;
  for (const k of ["steps", "guidance_steps", "width", "height"]) $(k).value = r[k] === undefined ? "" : r[k];
  $("seed").value = item.seed;
  state.subjects = item.state.subjects.map((s) => Object.assign({}, s, {box: s.box && Object.assign({}, s.box)}));
  state.colorMap = item.state.colorMap;
  state.selected = state.subjects.length ? 0 : -1;
  renderColorMap();
  resizeCanvas();
  render();
}

// ---- generation -----------------------------------------------------------------------------------
function newRequestId() {
  const a = new Uint8Array(16);
  crypto.getRandomValues(a);
  return [...a].map((v) => v.toString(16).padStart(2, "0")).join("");
}

async function* ndjson(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffered = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffered += decoder.decode(value, {stream: true});
    let nl;
    while ((nl = buffered.indexOf("\n")) >= 0) {
      const line = buffered.slice(0, nl).trim();
      buffered = buffered.slice(nl + 1);
      if (line) yield JSON.parse(line);
    }
  }
  if (buffered.trim()) yield JSON.parse(buffered);
}

async function generateOne(request) {
  const requestId = newRequestId();
  state.running = {requestId, cancelled: false};
  const body = Object.assign({preview_every: Math.max(1, Math.floor((request.steps || 50) / 10))}, request);
  const res = await fetch("/v1/generate/stream", {method: "POST", headers: headers({"X-Request-Id": requestId}), body: JSON.stringify(body)});
  if (!res.ok) {
    const data = await res.json().catch(() => ({}));
    throw new ApiError(data.code || `HTTP ${res.status}`, data.message || res.statusText);
  }
  for await (const event of ndjson(res)) {
    if (event.error) throw new ApiError(event.error.code, event.error.message);
    if (event.progress) {
      const p = event.progress;
      $("progress").max = p.totalSteps || 1;
      $("progress").value = p.step || 0;
      $("status").textContent = `step ${p.step || 0} of ${p.totalSteps}`;
      if (p.previewPng) {
        state.previews += 1;
        $("preview").src = "data:image/png;base64," + p.previewPng;
        $("preview").hidden = false;
        $("result-image").hidden = true;
        state.shown = null;
        drawOverlay();
        $("preview").dataset.count = String(state.previews);
      }
    }
    if (event.result) return event.result;
  }
  throw new ApiError("UNAVAILABLE", "the stream ended without a result");
}

async function generate() {
  if (state.running) return;
  clearErrors();
  const count = Math.max(1, intField("count") || 1);
  const seedText = $("seed").value.trim();
  $("generate").disabled = true;
  $("cancel").disabled = false;
  state.previews = 0;
  try {
    for (let k = 0; k < count; k++) {
      const seed = seedText === "" ? undefined : Number(seedText) + k;
      const request = buildRequest(seed);
      const frozen = snapshot();
      $("status").textContent = count > 1 ? `image ${k + 1} of ${count}: queued` : "queued";
      const result = await generateOne(request);
      showResult({request, response: result, state: frozen});
      if (state.running && state.running.cancelled) break;
    }
    $("status").textContent = "done";
  } catch (err) {
    if (err.code === "CANCELLED" || (state.running && state.running.cancelled)) {
      $("status").textContent = "cancelled";
    } else {
      $("status").textContent = "failed";
      showError(err);
    }
  } finally {
    state.running = null;
    $("generate").disabled = false;
    $("cancel").disabled = true;
    $("preview").hidden = true;
  }
}

async function cancel() {
  const run = state.running;
  if (!run) return;
  run.cancelled = true;
  $("status").textContent = "cancelling…";
  try { await api("POST", `/v1/requests/${run.requestId}/cancel`); } catch (err) { showError(err); }
}

// ---- result and gallery ---------------------------------------------------------------------------
function showResult(item) {
  item.seed = String(item.response.seed || 0);     // proto3 JSON leaves a zero seed out
  const url = "data:image/png;base64," + item.response.image;
  item.url = url;
  state.gallery.push(item);
  displayItem(item);
  const li = document.createElement("li");
  const thumb = document.createElement("img");
  thumb.src = url;
  thumb.alt = `seed ${item.seed}: ${item.request.prompt}`;
  const view = button("View", () => displayItem(item));
  const rerun = button("Re-run", () => { restore(item); $("count").value = 1; generate(); });
  rerun.className = "rerun";
  const dl = document.createElement("a");
  dl.href = url;
  dl.download = `cones2-${item.seed}.png`;
  dl.textContent = "PNG";
  li.append(thumb, view, rerun, dl);
  $("gallery").prepend(li);
}

function displayItem(item) {
  $("result-image").src = item.url;
  $("result-image").hidden = false;
  $("download").href = item.url;
  $("download").download = `cones2-${item.seed}.png`;
  $("download").hidden = false;
  const meta = {request: Object.assign({}, item.request, item.request.layout && item.request.layout.color_map
    ? {layout: {color_map: {png: "(" + item.request.layout.color_map.png.length + " base64 chars)", entries: item.request.layout.color_map.entries}}} : {}),
    seed: item.seed, model_id: item.response.modelId, backend: item.response.backend,
    width: item.response.width, height: item.response.height, timings: item.response.timings};
  $("result-meta").textContent = JSON.stringify(meta, null, 2);
  state.shown = item;
  drawOverlay();
}

function drawOverlay() {
  const o = $("result-overlay"), img = $("result-image"), item = state.shown;
  o.width = img.clientWidth;
  o.height = img.clientHeight;
  const c = o.getContext("2d");
  c.clearRect(0, 0, o.width, o.height);
  if (!item || !$("show-layout").checked || !o.width) return;
  if (item.state.colorMap && item.state.colorMap.image) {
    c.globalAlpha = 0.4;
    c.drawImage(item.state.colorMap.image, 0, 0, o.width, o.height);
    c.globalAlpha = 1;
    return;
  }
  drawBoxes(c, o.width, o.height, item.state.subjects, -1);
}

// ---- wiring ---------------------------------------------------------------------------------------
$("token").value = sessionStorage.getItem("cones2-token") || "";
$("token").addEventListener("change", () => { sessionStorage.setItem("cones2-token", token()); connect(); });
$("prompt").addEventListener("input", () => {
  const words = new Set(promptWords());
  state.subjects = state.subjects.filter((s) => words.has(s.word));
  state.selected = Math.min(state.selected, state.subjects.length - 1);
  render();
});
$("dice").addEventListener("click", () => { $("seed").value = Math.floor(Math.random() * 2 ** 32); });
$("generate").addEventListener("click", generate);
$("cancel").addEventListener("click", cancel);
$("show-layout").addEventListener("change", drawOverlay);
$("result-image").addEventListener("load", drawOverlay);
$("width").addEventListener("change", resizeCanvas);
$("height").addEventListener("change", resizeCanvas);
$("colormap").addEventListener("change", () => $("colormap").files[0] && loadColorMap($("colormap").files[0]));
$("clear-colormap").addEventListener("click", () => { state.colorMap = null; $("colormap").value = ""; renderColorMap(); drawLayout(); });
document.addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) generate();
  if (ev.key === "Escape") cancel();
});
window.addEventListener("resize", () => { resizeCanvas(); drawOverlay(); });

render();
connect();
