// Injected into the page before the ComfyUI front end loads (Playwright add_init_script). Test-side helpers only:
// they read what the editor shows and drive it the way a user would; none of this is part of the extension.
(() => {
  const T = {
    raw: {}, // memora.* websocket messages that reached the page, counted independently of the extension
    finished: null, // {type, prompt_id} of the last execution_success / execution_error
    listening: false,
  };

  const api = () => window.comfyAPI.api.api;
  const LG = () => window.LiteGraph;
  const graph = () => window.app.rootGraph ?? window.app.graph;

  T.ready = () => !!(window.app && window.comfyAPI?.api?.api && window.app.canvas && graph() && window.LiteGraph);

  T.listen = () => {
    if (T.listening) return;
    T.listening = true;
    for (const type of ["memora.progress", "memora.train", "memora.lora_saved", "memora.scores"]) {
      api().addEventListener(type, () => (T.raw[type] = (T.raw[type] ?? 0) + 1));
    }
    for (const type of ["execution_success", "execution_error", "execution_interrupted"]) {
      api().addEventListener(type, (e) => (T.finished = { type, prompt_id: e.detail?.prompt_id ?? null,
        detail: type === "execution_error" ? e.detail : undefined }));
    }
  };

  T.extensionNames = () => window.app.extensions.map((e) => e.name);

  T.nodeById = (id) => graph().getNodeById(id);
  T.nodesOfType = (type) => graph()._nodes.filter((n) => n.type === type);

  T.setWidget = (id, name, value) => {
    const n = T.nodeById(id);
    const w = n?.widgets?.find((x) => x.name === name);
    if (!w) throw new Error(`node ${id} has no widget ${name}`);
    w.value = value;
    w.callback?.(value);
  };

  /** A small graph of core nodes only (no MemoRa node): checkpoint -> prompt -> 1-step KSampler -> preview. */
  T.buildCoreGraph = (ckpt) => {
    const g = graph();
    g.clear();
    const add = (type, pos, values = {}) => {
      const n = LG().createNode(type);
      n.pos = pos;
      g.add(n);
      for (const [k, v] of Object.entries(values)) T.setWidget(n.id, k, v);
      return n;
    };
    const ck = add("CheckpointLoaderSimple", [20, 100], { ckpt_name: ckpt });
    const pos = add("CLIPTextEncode", [360, 60], { text: "a photo of a cat" });
    const lat = add("EmptyLatentImage", [360, 320], { width: 64, height: 64, batch_size: 1 });
    const ks = add("KSampler", [700, 60], { steps: 1, cfg: 1.0, seed: 1 });
    const dec = add("VAEDecode", [1040, 60]);
    const prev = add("PreviewImage", [1040, 200]);
    ck.connect(1, pos, 0);
    ck.connect(0, ks, ks.findInputSlot("model"));
    pos.connect(0, ks, ks.findInputSlot("positive"));
    pos.connect(0, ks, ks.findInputSlot("negative"));
    lat.connect(0, ks, ks.findInputSlot("latent_image"));
    ks.connect(0, dec, 0);
    ck.connect(2, dec, 1);
    dec.connect(0, prev, 0);
    return g._nodes.length;
  };

  /**
   * Make a shipped workflow run in seconds on the tiny checkpoint: every checkpoint loader on `ckpt`, 64 px latents,
   * 2 sampling steps, inversion/regeneration 4 steps from step 1, 2 slerp points per pair, `trainSteps` training
   * updates of one sample each. Returns what was changed.
   */
  T.shrink = (ckpt, trainSteps) => {
    const rules = {
      CheckpointLoaderSimple: { ckpt_name: ckpt },
      // a full checkpoint through MemoRa Load Unlearned Model (it reads checkpoints/<file> as an ldm checkpoint)
      MemoRaLoadUnlearnedModel: { ckpt_name: ckpt, unlearned_weights: `checkpoints/${ckpt}` },
      EmptyLatentImage: { width: 64, height: 64, batch_size: 1 },
      KSampler: { steps: 2 },
      KSamplerAdvanced: { steps: 2 },
      MemoRaDDIMInversion: { steps: 4, start_at_step: 1 },
      MemoRaRegenerate: { steps: 4, start_at_step: 1 },
      MemoRaSlerpLatents: { intervals: 1 },
      MemoRaLoRATrain: { steps: trainSteps, gradient_accumulation: 1, batch_size: 1 },
    };
    const changed = [];
    for (const n of graph()._nodes) {
      for (const [name, value] of Object.entries(rules[n.type] ?? {})) {
        if (n.widgets?.some((w) => w.name === name)) {
          T.setWidget(n.id, name, value);
          changed.push(`${n.type}#${n.id}.${name}=${value}`);
        }
      }
    }
    return changed;
  };

  /**
   * Every node's box on the canvas, title bar included: {id, type, title, x, y, w, h} (canvas coordinates, as the
   * editor draws them now; collapsed nodes are their title bar).
   */
  T.boxes = () => {
    const titleH = LG().NODE_TITLE_HEIGHT ?? 30;
    return graph()._nodes.map((n) => {
      const collapsed = !!n.flags?.collapsed;
      const w = collapsed ? (n._collapsed_width ?? n.size[0]) : n.size[0];
      const h = collapsed ? titleH : n.size[1] + titleH;
      return { id: String(n.id), type: n.type, title: n.title, x: n.pos[0], y: n.pos[1] - titleH, w, h };
    });
  };

  /** Load a UI-format workflow as the editor's "open" does. */
  T.load = async (workflow) => {
    await window.app.loadGraphData(workflow, true, false);
    T.raw = {};
  };

  /** Queue the current graph as the Run button does (the front end converts it to a prompt itself). */
  T.queue = async () => {
    T.finished = null;
    T.raw = {};
    await window.app.queuePrompt(0, 1);
  };

  T.serialize = () => JSON.parse(JSON.stringify(graph().serialize()));

  /** What the MemoRa panel of a node shows, read from the DOM the extension created. */
  T.panel = (id) => {
    const root = document.querySelector(`.memora-panel[data-memora-node="${id}"]`);
    if (!root) return null;
    const shown = (sel) => { // shown by the extension (not hidden in the panel), wherever the canvas is scrolled
      let e = root.querySelector(sel);
      if (!e) return false;
      for (; e && e !== root.parentElement; e = e.parentElement) if (e.hidden) return false;
      return true;
    };
    const text = (sel) => (shown(sel) ? root.querySelector(sel).textContent : "");
    const rect = root.getBoundingClientRect();
    return {
      points: Number(root.dataset.points ?? 0),
      livePoints: Number(root.dataset.livePoints ?? 0),
      finalLoss: root.dataset.finalLoss ?? "",
      lora: root.dataset.lora ?? "",
      progress: text(".memora-progress-text"),
      stats: text(".memora-stats"),
      loraName: text(".memora-lora-name"),
      buttonVisible: shown(".memora-add-loader"),
      tables: [...root.querySelectorAll("table.memora-table")].map((t) => ({
        title: t.querySelector("caption")?.textContent ?? "",
        rows: [...t.querySelectorAll("tr")].map((tr) => [...tr.children].map((c) => c.textContent)),
      })),
      onScreen: rect.width > 0 && rect.height > 0,
      chartPixels: (() => { // non-transparent pixels drawn on the chart canvas
        const c = root.querySelector("canvas.memora-chart");
        if (!c || !c.width || !c.height) return 0;
        const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
        let n = 0;
        for (let i = 3; i < d.length; i += 4) if (d[i]) n++;
        return n;
      })(),
    };
  };

  /** The preview images the editor shows on a node (core front end, not the extension). */
  T.previews = (id) => {
    const n = T.nodeById(id);
    return (n?.imgs ?? []).map((img) => ({ src: img.src, loaded: img.complete && img.naturalWidth > 0 }));
  };

  /** Text of the toasts (alerts) currently shown. */
  T.toasts = () => [...document.querySelectorAll(".p-toast-message")].map((e) => e.textContent.trim());

  /** The LoraLoader nodes in the graph, with what feeds them. */
  T.loaders = () => graph()._nodes.filter((n) => n.type === "LoraLoader" || n.type === "LoraLoaderModelOnly").map((n) => {
    const src = (name) => {
      const slot = n.findInputSlot(name);
      const link = slot >= 0 ? n.getInputLink(slot) : null;
      if (!link) return null;
      const origin = graph().getNodeById(link.origin_id);
      return { node: String(link.origin_id), slot: link.origin_slot, type: origin?.type ?? null,
        outputType: origin?.outputs?.[link.origin_slot]?.type ?? null };
    };
    return { id: String(n.id), type: n.type, lora_name: n.widgets?.find((w) => w.name === "lora_name")?.value,
      model: src("model"), clip: src("clip") };
  });

  /** The node feeding input `name` of node `id`: {node, slot}. */
  T.inputSource = (id, name) => {
    const n = T.nodeById(id);
    const link = n.getInputLink(n.findInputSlot(name));
    return link ? { node: String(link.origin_id), slot: link.origin_slot } : null;
  };

  /** Screen coordinates of a point in graph space. */
  T.screen = (pos) => {
    const c = window.app.canvas;
    const p = c.ds.convertOffsetToCanvas(pos);
    const r = c.canvas.getBoundingClientRect(); // ds works in CSS pixels relative to the canvas element
    return [r.left + p[0], r.top + p[1]];
  };

  /** Where to hover for a node's title tooltip and for one input slot's tooltip. */
  T.hoverTargets = (id, inputName) => {
    const n = T.nodeById(id);
    const title = T.screen([n.pos[0] + 30, n.pos[1] - LG().NODE_TITLE_HEIGHT / 2]);
    const slot = n.findInputSlot(inputName);
    const input = slot >= 0 ? T.screen(n.getConnectionPos(true, slot)) : null;
    return { title, input };
  };

  /** Pan and zoom so that the given nodes (default: all) fit in the canvas. */
  T.fit = (ids) => {
    const c = window.app.canvas;
    const nodes = ids ? ids.map(T.nodeById) : graph()._nodes;
    let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
    for (const n of nodes) {
      x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - LG().NODE_TITLE_HEIGHT);
      x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
    }
    const r = c.canvas.getBoundingClientRect();
    const scale = Math.min(1, (r.width - 80) / (x1 - x0), (r.height - 120) / (y1 - y0));
    c.ds.scale = scale;
    c.ds.offset[0] = (r.width - scale * (x1 - x0)) / (2 * scale) - x0;
    c.ds.offset[1] = 60 / scale - y0;
    c.setDirty(true, true);
  };

  /** Every MemoRa node definition as the editor received it: description and per-input tooltips. */
  T.memoraNodeDefs = () => {
    const out = {};
    for (const [type, cls] of Object.entries(LG().registered_node_types)) {
      if (!type.startsWith("MemoRa")) continue;
      const d = cls.nodeData ?? {};
      const inputs = {};
      for (const group of ["required", "optional"]) {
        for (const [name, spec] of Object.entries(d.input?.[group] ?? {})) inputs[name] = spec?.[1]?.tooltip ?? null;
      }
      out[type] = { module: d.python_module ?? null, description: d.description ?? null, inputs,
        outputTooltips: d.output_tooltips ?? null };
    }
    return out;
  };

  /** Traces the extension would leave on a graph: panels, styles, node properties, patched non-MemoRa prototypes. */
  T.memoraTraces = () => {
    const nodes = graph()._nodes;
    const patched = [];
    for (const [type, cls] of Object.entries(LG().registered_node_types)) {
      if (type.startsWith("MemoRa")) continue;
      for (const key of Object.getOwnPropertyNames(cls.prototype)) {
        let v;
        try { v = cls.prototype[key]; } catch { continue; }
        if (typeof v === "function" && v.memoraPatched) patched.push(`${type}.${key}`);
      }
    }
    return {
      panels: document.querySelectorAll(".memora-panel").length,
      styles: document.querySelectorAll("style[data-memora]").length,
      properties: nodes.flatMap((n) => Object.keys(n.properties ?? {}).filter((k) => k.startsWith("memora_"))
        .map((k) => `${n.type}#${n.id}.${k}`)),
      widgets: nodes.flatMap((n) => (n.widgets ?? []).filter((w) => w.name?.startsWith("memora"))
        .map((w) => `${n.type}#${n.id}.${w.name}`)),
      patched,
    };
  };

  window.__memoraTest = T;
})();
