/*
 * comfyui-memora front end (plain ES module, no build step; served through WEB_DIRECTORY = "./web").
 *
 * What it adds, and only to MemoRa nodes (node ids starting with "MemoRa"):
 *   - MemoRa LoRA Train: a live loss chart (step, loss, learning rate, ETA) fed by `memora.train` events, kept in
 *     node.properties (so it is saved in the workflow JSON and comes back on reopen) and replaced by the node's final
 *     `memora_loss` UI output when the run ends (also after a cached re-run).
 *   - every MemoRa node: a progress line with ETA from `memora.progress` (inversion, regeneration, ...).
 *   - a saved LoRA (`memora.lora_saved` / `memora_lora`): its file name and an "Add LoraLoader" button that adds a
 *     LoraLoader with lora_name set to that file, wired to the model (and CLIP) that feed the training node.
 *   - score nodes (`memora.scores` / `memora_scores`): their numbers as small tables.
 * Graphs without MemoRa nodes are left alone: no node type other than MemoRa's is patched, and the event listeners
 * ignore messages that do not name a MemoRa node. See docs/frontend.md.
 */
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

// Names shared with the nodes and memora-batch, defined in memora/contracts.py (frontend_contract()): this block is
// a copy that tests/unit/test_batch_contracts.py checks against it (edit both, or the test fails).
const CONTRACT = /* memora-contract */ {
  "nodes": {"prefix": "MemoRa", "train": "MemoRaLoRATrain"},
  "ui": {"scores": "memora_scores", "lora": "memora_lora", "loss": "memora_loss"},
  "events": {"progress": "memora.progress", "train": "memora.train", "lora_saved": "memora.lora_saved",
             "scores": "memora.scores"}
} /* end memora-contract */;

const EXTENSION = "MemoRa.Frontend";
const NODE_PREFIX = CONTRACT.nodes.prefix;
const TRAIN_NODE = CONTRACT.nodes.train;
const UI_LOSS = CONTRACT.ui.loss; // UI output keys of the nodes
const UI_LORA = CONTRACT.ui.lora;
const UI_SCORES = CONTRACT.ui.scores;
const PANEL_WIDGET = "memora_panel";
const MAX_POINTS = 2000; // loss points kept on a node (downsampled beyond this, the last point always kept)
const MAX_TABLE_ROWS = 12;
const SCORES_MAX_HEIGHT = 132; // the score tables scroll inside this height (the node grows by at most this much)
const TABLE_ROW = 16; // px per caption / header / row (see the style sheet)
const IMAGE_PREVIEW = "$$canvas-image-preview"; // the core front end's image preview widget
const IMAGE_PREVIEW_MIN_HEIGHT = 220; // its minimum height in the classic canvas (front ends 1.27 - 1.49)

// Keys in node.properties (saved with the workflow; named as the UI outputs they store).
const P_LOSS = UI_LOSS; // [{step, loss, lr}]
const P_RUN = "memora_run"; // {total, elapsed} of the last training run
const P_LORA = UI_LORA; // "memora/recovered_00001_.safetensors"
const P_SCORES = UI_SCORES; // [{title, columns, rows}]

const states = new Set(); // panel states of live MemoRa nodes (to reach them from global execution events)

// -- helpers ---------------------------------------------------------------------------------------------------------
function isMemoRaType(type) {
  return typeof type === "string" && type.startsWith(NODE_PREFIX);
}

function nodeType(node) {
  return node?.comfyClass ?? node?.type;
}

function rootGraph() {
  return app.rootGraph ?? app.graph;
}

/** The node an event names: a root node id ("12") or an execution id through subgraphs ("4:12"). */
function findNode(id) {
  if (id === null || id === undefined) return null;
  let graph = rootGraph();
  const parts = String(id).split(":");
  for (let i = 0; graph && i < parts.length - 1; i++) {
    graph = graph.getNodeById(parts[i])?.subgraph ?? null;
  }
  const node = graph?.getNodeById(parts[parts.length - 1]) ?? null;
  return node && isMemoRaType(nodeType(node)) ? node : null;
}

function num(v) {
  if (v === null || v === undefined || v === "") return null; // Number(null) is 0: a missing value is not a zero
  const x = Number(v);
  return Number.isFinite(x) ? x : null;
}

function fmtNumber(v) {
  if (typeof v === "boolean") return v ? "yes" : "no";
  if (typeof v === "string") return v;
  const x = num(v);
  if (x === null) return v === null || v === undefined ? "-" : String(v); // "-": no value (e.g. no interval for n < 2)
  if (Number.isInteger(x)) return String(x);
  const a = Math.abs(x);
  return a !== 0 && (a < 1e-3 || a >= 1e5) ? x.toExponential(3) : x.toPrecision(4);
}

function fmtDuration(seconds) {
  const s = num(seconds);
  if (s === null) return "?";
  if (s < 60) return `${s.toFixed(s < 10 ? 1 : 0)} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ${String(Math.round(s % 60)).padStart(2, "0")} s`;
  return `${Math.floor(m / 60)} h ${String(m % 60).padStart(2, "0")} min`;
}

function normalizePoints(list) {
  if (!Array.isArray(list)) return [];
  const pts = [];
  for (const p of list) {
    const step = num(p?.step);
    const loss = num(p?.loss);
    if (step === null || loss === null) continue;
    pts.push({ step, loss, lr: num(p?.lr) });
  }
  return thin(pts);
}

function thin(pts) {
  while (pts.length > MAX_POINTS) {
    const last = pts[pts.length - 1];
    pts = pts.filter((_, i) => i % 2 === 0);
    if (pts[pts.length - 1] !== last) pts.push(last);
  }
  return pts;
}

function normalizeTable(t) {
  if (!t || typeof t !== "object") return null;
  const columns = Array.isArray(t.columns) ? t.columns.map(String) : [];
  const rows = Array.isArray(t.rows) ? t.rows.filter(Array.isArray) : [];
  return { title: t.title == null ? "" : String(t.title), columns, rows };
}

let styleInjected = false;
function injectStyle() {
  if (styleInjected) return;
  styleInjected = true;
  const style = document.createElement("style");
  style.dataset.memora = "1";
  style.textContent = `
.memora-panel { box-sizing: border-box; width: 100%; height: 100%; display: flex; flex-direction: column; gap: 3px;
  font: 11px/1.35 sans-serif; color: var(--input-text, #ddd); overflow: hidden; }
.memora-panel [hidden] { display: none !important; }
.memora-panel > * { flex: 0 0 auto; }
.memora-progress { display: flex; align-items: center; gap: 6px; height: 16px; white-space: nowrap; }
.memora-bar { flex: 0 0 35%; height: 6px; border-radius: 3px; background: var(--comfy-input-bg, #222); overflow: hidden; }
.memora-bar-fill { height: 100%; width: 0; background: #4caf7d; }
.memora-chart { width: 100%; height: 120px; flex: 0 0 120px; border-radius: 4px; background: var(--comfy-input-bg, #222); }
.memora-stats { height: 16px; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.memora-lora { height: 24px; display: flex; align-items: center; gap: 6px; }
.memora-lora-name { flex: 1 1 auto; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; font-family: monospace; }
.memora-add-loader { flex: 0 0 auto; cursor: pointer; font: 11px sans-serif; padding: 2px 6px; border-radius: 4px;
  border: 1px solid var(--border-color, #555); background: var(--comfy-input-bg, #333); color: inherit; }
.memora-panel > .memora-scores { flex: 1 1 auto; min-height: 0; overflow: auto; }
.memora-scores::-webkit-scrollbar { width: 6px; height: 6px; }
.memora-table { border-collapse: collapse; margin-bottom: 4px; line-height: 15px; font-variant-numeric: tabular-nums; }
.memora-table caption { height: 16px; line-height: 16px; text-align: left; font-weight: bold; white-space: nowrap; }
.memora-table th, .memora-table td { height: 15px; line-height: 15px; padding: 0 6px; white-space: nowrap; border-bottom: 1px solid var(--border-color, #444); text-align: right; }
.memora-table th:first-child, .memora-table td:first-child { text-align: left; }
.memora-note { height: 16px; opacity: 0.75; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
`;
  document.head.appendChild(style);
}

function el(tag, cls, parent) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (parent) parent.appendChild(e);
  return e;
}

// -- the panel: one DOM widget per MemoRa node, created when there is something to show -------------------------------
function panelState(node, create = true) {
  if (node.__memora) return node.__memora;
  if (!create) return null;
  injectStyle();
  const isTrain = nodeType(node) === TRAIN_NODE;
  const root = el("div", "memora-panel");
  const progress = el("div", "memora-progress", root);
  const bar = el("div", "memora-bar", progress);
  const fill = el("div", "memora-bar-fill", bar);
  const progressText = el("span", "memora-progress-text", progress);
  const canvas = isTrain ? el("canvas", "memora-chart", root) : null;
  const stats = el("div", "memora-stats", root);
  const lora = el("div", "memora-lora", root);
  const loraName = el("span", "memora-lora-name", lora);
  const addButton = el("button", "memora-add-loader", lora);
  addButton.type = "button";
  addButton.textContent = "Add LoraLoader";
  addButton.title = "Add a LoraLoader for this file, wired to the model (and CLIP) that feed this node";
  const note = el("div", "memora-note", root);
  const scores = el("div", "memora-scores", root);

  const st = {
    node, root, progress, fill, progressText, canvas, stats, lora, loraName, addButton, note, scores,
    isTrain, liveTrain: null, progressInfo: null, livePoints: 0, resetOnNextPoint: false, frame: 0,
  };
  addButton.addEventListener("click", (e) => {
    e.preventDefault();
    e.stopPropagation();
    addLoraLoader(node);
  });
  // Keep mouse gestures on the panel from dragging the canvas (the button must stay clickable).
  root.addEventListener("pointerdown", (e) => e.stopPropagation());

  st.widget = node.addDOMWidget(PANEL_WIDGET, "memora", root, {
    serialize: false, // neither in the prompt sent to the server ...
    hideOnZoom: false,
    margin: PANEL_MARGIN,
    getValue: () => "",
    setValue: () => {},
    getMinHeight: () => panelHeight(st),
    getMaxHeight: () => panelHeight(st),
  });
  st.widget.serialize = false; // ... nor in widgets_values of the saved workflow
  if (canvas && typeof ResizeObserver !== "undefined") {
    st.resizeObserver = new ResizeObserver(() => scheduleDraw(st));
    st.resizeObserver.observe(canvas);
  }
  node.__memora = st;
  states.add(st);
  fitNode(node);
  return st;
}

const PANEL_MARGIN = 4; // DOMWidget margin: the element gets the widget height minus twice this

function scoresHeight(tables) {
  let h = 0;
  for (const t of tables ?? []) {
    const n = t.rows?.length ?? 0;
    h += TABLE_ROW * (2 + Math.min(n, MAX_TABLE_ROWS) + (n > MAX_TABLE_ROWS ? 1 : 0)) + 4;
  }
  return Math.min(h, SCORES_MAX_HEIGHT);
}

function panelHeight(st) {
  const rows = [];
  if (!st.progress.hidden) rows.push(16);
  if (st.canvas) rows.push(120);
  if (!st.stats.hidden) rows.push(16);
  if (!st.lora.hidden) rows.push(24);
  if (!st.note.hidden) rows.push(16);
  const scores = scoresHeight(st.node.properties?.[P_SCORES]);
  if (scores) rows.push(scores);
  return rows.reduce((a, b) => a + b, 0) + 3 * Math.max(rows.length - 1, 0) + 2 * PANEL_MARGIN;
}

function fitNode(node) {
  if (typeof node.computeSize !== "function" || typeof node.setSize !== "function") return;
  const want = node.computeSize();
  // Image previews (e.g. the nudity node's pixelated previews) get their widget only once the images have loaded:
  // keep room for it so the images land inside the node, under the panel.
  if (node.__memora?.expectImages && !node.widgets?.some((w) => w.name === IMAGE_PREVIEW)) {
    want[1] += IMAGE_PREVIEW_MIN_HEIGHT;
  }
  if (want[1] > node.size[1] || want[0] > node.size[0]) {
    node.setSize([Math.max(node.size[0], want[0]), Math.max(node.size[1], want[1])]);
  }
  node.setDirtyCanvas?.(true, true);
}

function hasStoredData(node) {
  const p = node.properties ?? {};
  return (Array.isArray(p[P_LOSS]) && p[P_LOSS].length > 0) || !!p[P_LORA] ||
    (Array.isArray(p[P_SCORES]) && p[P_SCORES].length > 0);
}

function render(st) {
  const p = st.node.properties ?? {};
  st.root.dataset.memoraNode = String(st.node.id);
  // progress line (transient: this session's events only)
  const pi = st.progressInfo;
  st.progress.hidden = !pi;
  if (pi) {
    const total = Math.max(num(pi.total) ?? 1, 1);
    const step = Math.min(num(pi.step) ?? 0, total);
    st.fill.style.width = `${(100 * step) / total}%`;
    const done = step >= total;
    st.progressText.textContent = done
      ? `${pi.stage ?? "progress"}: ${total}/${total} in ${fmtDuration(pi.elapsed)}`
      : `${pi.stage ?? "progress"}: ${step}/${total} · ETA ${fmtDuration(pi.eta)}`;
    if (pi.stopped && !done) st.progressText.textContent += " (stopped)";
  }
  // training summary
  const pts = Array.isArray(p[P_LOSS]) ? p[P_LOSS] : [];
  st.root.dataset.points = String(pts.length);
  st.root.dataset.livePoints = String(st.livePoints);
  const last = pts[pts.length - 1];
  const live = st.liveTrain;
  st.stats.hidden = !last && !live;
  if (last || live) {
    const step = live?.step ?? last?.step;
    const total = live?.total ?? p[P_RUN]?.total ?? step;
    const parts = [`step ${step}/${total}`, `loss ${fmtNumber(live?.loss ?? last?.loss)}`];
    const lr = live?.lr ?? last?.lr;
    if (lr !== null && lr !== undefined) parts.push(`lr ${fmtNumber(lr)}`);
    if (live && num(live.step) < num(live.total)) parts.push(`ETA ${fmtDuration(live.eta)}`);
    else if (num(live?.elapsed ?? p[P_RUN]?.elapsed) !== null) parts.push(`took ${fmtDuration(live?.elapsed ?? p[P_RUN]?.elapsed)}`);
    st.stats.textContent = parts.join(" · ");
    st.root.dataset.finalLoss = last ? String(last.loss) : "";
  }
  // saved LoRA
  st.lora.hidden = !p[P_LORA];
  st.loraName.textContent = p[P_LORA] ?? "";
  st.loraName.title = p[P_LORA] ?? "";
  st.root.dataset.lora = p[P_LORA] ?? "";
  st.note.hidden = !st.noteText;
  st.note.textContent = st.noteText ?? "";
  st.note.title = st.noteText ?? "";
  // score tables
  st.scores.replaceChildren();
  for (const t of Array.isArray(p[P_SCORES]) ? p[P_SCORES] : []) renderTable(st.scores, t);
  scheduleDraw(st);
  fitNode(st.node);
}

function renderTable(parent, t) {
  const table = el("table", "memora-table", parent);
  if (t.title) el("caption", "", table).textContent = t.title;
  const head = el("tr", "", el("thead", "", table));
  for (const c of t.columns) el("th", "", head).textContent = c;
  const body = el("tbody", "", table);
  for (const row of t.rows.slice(0, MAX_TABLE_ROWS)) {
    const tr = el("tr", "", body);
    for (const v of row) el("td", "", tr).textContent = fmtNumber(v);
  }
  if (t.rows.length > MAX_TABLE_ROWS) {
    const td = el("td", "", el("tr", "", body));
    td.colSpan = Math.max(t.columns.length, 1);
    td.textContent = `… ${t.rows.length - MAX_TABLE_ROWS} more rows`;
  }
}

function scheduleDraw(st) {
  if (!st.canvas || st.frame) return;
  st.frame = requestAnimationFrame(() => {
    st.frame = 0;
    drawChart(st);
  });
}

function drawChart(st) {
  const c = st.canvas;
  const w = c.clientWidth;
  const h = c.clientHeight;
  if (!w || !h) return;
  const dpr = window.devicePixelRatio || 1;
  if (c.width !== Math.round(w * dpr) || c.height !== Math.round(h * dpr)) {
    c.width = Math.round(w * dpr);
    c.height = Math.round(h * dpr);
  }
  const ctx = c.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, h);
  const pts = st.node.properties?.[P_LOSS] ?? [];
  ctx.font = "10px sans-serif";
  ctx.fillStyle = "rgba(200,200,200,0.8)";
  if (!pts.length) {
    ctx.fillText("loss chart: waiting for training", 8, h / 2);
    return;
  }
  const pad = { l: 44, r: 8, t: 8, b: 16 };
  const steps = pts.map((p) => p.step);
  const losses = pts.map((p) => p.loss);
  const s0 = Math.min(...steps);
  const s1 = Math.max(...steps, s0 + 1);
  let l0 = Math.min(...losses);
  let l1 = Math.max(...losses);
  if (l1 - l0 < 1e-12) { l0 -= 0.5 * Math.abs(l0 || 1); l1 += 0.5 * Math.abs(l1 || 1); }
  const x = (s) => pad.l + ((s - s0) / (s1 - s0)) * (w - pad.l - pad.r);
  const y = (v, lo, hi) => pad.t + (1 - (v - lo) / (hi - lo)) * (h - pad.t - pad.b);
  // axes labels
  ctx.fillText(fmtNumber(l1), 2, pad.t + 8);
  ctx.fillText(fmtNumber(l0), 2, h - pad.b);
  ctx.fillText(String(s0), pad.l, h - 3);
  const s1text = String(Math.max(...steps));
  ctx.fillText(s1text, w - pad.r - ctx.measureText(s1text).width, h - 3);
  // learning rate, on its own scale (faint)
  const lrs = pts.filter((p) => p.lr !== null && p.lr !== undefined);
  if (lrs.length > 1) {
    const r0 = Math.min(...lrs.map((p) => p.lr));
    let r1 = Math.max(...lrs.map((p) => p.lr));
    if (r1 - r0 < 1e-20) r1 = r0 + Math.abs(r0 || 1);
    ctx.strokeStyle = "rgba(120,160,255,0.6)";
    ctx.lineWidth = 1;
    ctx.beginPath();
    lrs.forEach((p, i) => (i ? ctx.lineTo : ctx.moveTo).call(ctx, x(p.step), y(p.lr, r0 - (r1 - r0) * 0.05, r1 + (r1 - r0) * 0.05)));
    ctx.stroke();
    ctx.fillStyle = "rgba(120,160,255,0.9)";
    ctx.fillText("lr", w - pad.r - 10, pad.t + 8);
  }
  // loss
  ctx.strokeStyle = "#f0a030";
  ctx.lineWidth = 1.5;
  ctx.beginPath();
  pts.forEach((p, i) => (i ? ctx.lineTo : ctx.moveTo).call(ctx, x(p.step), y(p.loss, l0, l1)));
  ctx.stroke();
  if (pts.length === 1) {
    ctx.fillStyle = "#f0a030";
    ctx.fillRect(x(pts[0].step) - 2, y(pts[0].loss, l0, l1) - 2, 4, 4);
  }
}

// -- results ---------------------------------------------------------------------------------------------------------
function setLora(node, filename) {
  if (typeof filename !== "string" || !filename) return;
  node.properties[P_LORA] = filename;
}

function upsertScores(node, table) {
  const t = normalizeTable(table);
  if (!t) return;
  const list = Array.isArray(node.properties[P_SCORES]) ? node.properties[P_SCORES].slice() : [];
  const i = list.findIndex((x) => x.title === t.title);
  if (i >= 0) list[i] = t;
  else list.push(t);
  node.properties[P_SCORES] = list;
}

/** Apply a node's UI output (the `executed` message, also sent for cached re-runs) to its stored state. */
function applyOutput(node, output) {
  if (!output || typeof output !== "object") return false;
  let changed = false;
  if (Array.isArray(output[UI_LOSS])) {
    node.properties[P_LOSS] = normalizePoints(output[UI_LOSS]);
    changed = true;
  }
  if (Array.isArray(output[UI_LORA]) && output[UI_LORA].length) {
    setLora(node, output[UI_LORA][output[UI_LORA].length - 1]);
    changed = true;
  }
  if (Array.isArray(output[UI_SCORES])) {
    node.properties[P_SCORES] = output[UI_SCORES].map(normalizeTable).filter(Boolean);
    changed = true;
  }
  return changed;
}

// -- the one-click LoraLoader ----------------------------------------------------------------------------------------
function setWidgetValue(node, name, value) {
  const w = node.widgets?.find((x) => x.name === name);
  if (!w) return false;
  const values = w.options?.values;
  if (Array.isArray(values) && !values.includes(value)) values.push(value); // the list predates the new file
  w.value = value;
  w.callback?.(value);
  return true;
}

/**
 * Add a LoraLoader for the node's saved LoRA. Its model input is wired to whatever feeds the training node's `model`
 * input (the unlearned model the LoRA was trained on); its clip input to the first CLIP output of that same node when
 * it has one (e.g. the checkpoint loader). Returns the new node (null when there is no saved LoRA).
 */
function addLoraLoader(node) {
  const filename = node.properties?.[P_LORA];
  const graph = node.graph;
  const LG = globalThis.LiteGraph;
  if (!filename || !graph || !LG) return null;
  const type = LG.registered_node_types?.LoraLoader ? "LoraLoader" : "LoraLoaderModelOnly";
  const loader = LG.createNode(type);
  if (!loader) return null;
  graph.beforeChange?.();
  try {
    loader.pos = [node.pos[0] + node.size[0] + 40, node.pos[1]];
    graph.add(loader);
    setWidgetValue(loader, "lora_name", filename);
    const wired = [];
    const modelSlot = node.inputs?.findIndex((i) => i.name === "model") ?? -1;
    const link = modelSlot >= 0 ? node.getInputLink(modelSlot) : null;
    const source = link ? graph.getNodeById(link.origin_id) : null;
    if (source) {
      if (source.connect(link.origin_slot, loader, loader.findInputSlot("model"))) wired.push("model");
      const clipIn = loader.findInputSlot("clip");
      const clipOut = source.outputs?.findIndex((o) => o.type === "CLIP") ?? -1;
      if (clipIn >= 0 && clipOut >= 0 && source.connect(clipOut, loader, clipIn)) wired.push("clip");
    }
    const st = panelState(node);
    st.noteText = wired.length
      ? `added ${type} #${loader.id} (${wired.join(" + ")} wired from "${source.title}")`
      : `added ${type} #${loader.id}: connect its model input by hand (the model input here has no node source)`;
    render(st);
  } finally {
    graph.afterChange?.();
  }
  graph.setDirtyCanvas?.(true, true);
  return loader;
}

// -- event handlers (global; every handler ignores messages that do not name a MemoRa node) ----------------------------
function onProgress({ detail }) {
  const node = findNode(detail?.node);
  if (!node) return;
  const st = panelState(node);
  st.progressInfo = { ...detail };
  render(st);
}

function onTrain({ detail }) {
  const node = findNode(detail?.node);
  if (!node) return;
  const st = panelState(node);
  const step = num(detail.step);
  const loss = num(detail.loss);
  let pts = Array.isArray(node.properties[P_LOSS]) ? node.properties[P_LOSS] : [];
  const last = pts[pts.length - 1];
  if (st.resetOnNextPoint || (last && step !== null && step <= last.step)) {
    pts = []; // a new run: the previous chart is replaced once its first point arrives
    st.livePoints = 0;
    st.resetOnNextPoint = false;
  }
  if (step !== null && loss !== null) {
    pts.push({ step, loss, lr: num(detail.lr) });
    node.properties[P_LOSS] = thin(pts);
    st.livePoints += 1;
  }
  node.properties[P_RUN] = { total: num(detail.total), elapsed: num(detail.elapsed) };
  st.liveTrain = { ...detail };
  render(st);
}

function onLoraSaved({ detail }) {
  const node = findNode(detail?.node);
  if (!node) return;
  setLora(node, detail.filename);
  render(panelState(node));
}

function onScores({ detail }) {
  const node = findNode(detail?.node);
  if (!node) return;
  upsertScores(node, detail);
  render(panelState(node));
}

function onExecuting({ detail }) {
  const id = detail && typeof detail === "object" ? detail.display_node ?? detail.node : detail;
  const node = findNode(id);
  if (!node) return;
  const st = panelState(node, nodeType(node) === TRAIN_NODE || !!node.__memora);
  if (!st) return;
  st.resetOnNextPoint = true;
  st.liveTrain = null;
  st.progressInfo = null;
  st.noteText = null;
  render(st);
}

function onStopped() {
  for (const st of states) {
    if (st.progressInfo) {
      st.progressInfo.stopped = true;
      render(st);
    }
  }
}

// -- registration ----------------------------------------------------------------------------------------------------
function chain(proto, name, fn) {
  const previous = proto[name];
  proto[name] = function (...args) {
    const r = previous?.apply(this, args);
    fn.apply(this, args);
    return r;
  };
  proto[name].memoraPatched = true; // lets a test check that only MemoRa node types were touched
}

app.registerExtension({
  name: EXTENSION,

  async beforeRegisterNodeDef(nodeTypeClass, nodeData) {
    if (!isMemoRaType(nodeData?.name)) return;
    const proto = nodeTypeClass.prototype;
    chain(proto, "onNodeCreated", function () {
      this.properties ??= {};
      if (nodeType(this) === TRAIN_NODE) panelState(this);
    });
    chain(proto, "onConfigure", function () {
      if (hasStoredData(this) || this.__memora) render(panelState(this));
    });
    chain(proto, "onExecuted", function (output) {
      if (applyOutput(this, output) || this.__memora) {
        const st = panelState(this);
        st.liveTrain = null;
        st.expectImages = Array.isArray(output?.images) && output.images.length > 0;
        render(st);
      }
    });
    chain(proto, "onRemoved", function () {
      const st = this.__memora;
      if (!st) return;
      st.resizeObserver?.disconnect();
      states.delete(st);
    });
  },

  async setup() {
    api.addEventListener(CONTRACT.events.progress, onProgress);
    api.addEventListener(CONTRACT.events.train, onTrain);
    api.addEventListener(CONTRACT.events.lora_saved, onLoraSaved);
    api.addEventListener(CONTRACT.events.scores, onScores);
    api.addEventListener("executing", onExecuting);
    api.addEventListener("execution_error", onStopped);
    api.addEventListener("execution_interrupted", onStopped);
  },
});

// For scripted use and the browser test: add the loader for a node programmatically (the button does the same).
export { addLoraLoader };
