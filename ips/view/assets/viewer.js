// ips view: a canvas deep-zoom tile viewer (2D slides; three orthogonal panes for volumes), the attention
// overlay, and the side panel. Plain JavaScript, no libraries, nothing fetched from outside the server.
//
// Coordinates: "level 0" = pixels of the store's level 0 along the viewer's two axes (rows, cols);
// "world" = level 0 times the spacing (micrometres when the store has one), so anisotropic volumes keep
// their proportions; "screen" = CSS pixels of the canvas.
"use strict";

const MAX_IMAGES = 600; // decoded tiles kept by the page (oldest dropped first)

class TileViewer {
  // levels: [{shape: [rows, cols], ds: [dr, dc]}] (level 0 first); tileUrl(level, ty, tx) -> url;
  // scale: [sr, sc] world units per level-0 pixel; onClick([r0, c0]) with level-0 coordinates.
  // onGrab(p0) -> a function taking later level-0 points while the pointer is down (a vertex dragged), or
  // null (the drag pans); onMove(p0): the pointer's level-0 position; decorations: draw(ctx, viewer) each.
  constructor(parent, { levels, tileSize, tileUrl, scale, onClick, onChange, onGrab, onMove }) {
    this.levels = levels;
    this.onGrab = onGrab || (() => null);
    this.onMove = onMove || (() => {});
    this.decorations = [];
    this.tileSize = tileSize;
    this.tileUrl = tileUrl;
    this.scale = scale;
    this.onClick = onClick || (() => {});
    this.onChange = onChange || (() => {});
    this.canvas = document.createElement("canvas");
    parent.appendChild(this.canvas);
    this.ctx = this.canvas.getContext("2d");
    this.images = new Map();
    this.pending = 0;
    this.layers = []; // {url, rect0: [r0, c0, r1, c1], alpha, visible}
    this.outlines = []; // [r0, c0, r1, c1] level 0
    this.crosshair = null; // [r0, c0]
    this.level = levels.length - 1;
    this.zoom = 1;
    this.center = [0, 0];
    this._bindEvents();
    new ResizeObserver(() => this._resize()).observe(this.canvas);
    this._resize();
    this.fit();
  }

  get extent0() { return this.levels[0].shape.map((s, i) => s * this.levels[0].ds[i]); }

  fit() {
    const [h, w] = this.extent0;
    const H = this.canvas.clientHeight || 1, W = this.canvas.clientWidth || 1;
    this.zoom = 0.95 * Math.min(W / (w * this.scale[1]), H / (h * this.scale[0]));
    this.center = [h * this.scale[0] / 2, w * this.scale[1] / 2];
    this.draw();
  }

  // level-0 point -> screen point [x, y]
  toScreen(p0) {
    return [(p0[1] * this.scale[1] - this.center[1]) * this.zoom + this.canvas.clientWidth / 2,
            (p0[0] * this.scale[0] - this.center[0]) * this.zoom + this.canvas.clientHeight / 2];
  }

  // screen point [x, y] -> level-0 point [r, c]
  toLevel0(x, y) {
    return [((y - this.canvas.clientHeight / 2) / this.zoom + this.center[0]) / this.scale[0],
            ((x - this.canvas.clientWidth / 2) / this.zoom + this.center[1]) / this.scale[1]];
  }

  centerOn(p0, zoom) {
    if (zoom) this.zoom = zoom;
    this.center = [p0[0] * this.scale[0], p0[1] * this.scale[1]];
    this.draw();
  }

  // zoom by factor f about screen point (x, y): the point under the cursor stays put
  zoomBy(f, x, y) {
    if (x === undefined) { x = this.canvas.clientWidth / 2; y = this.canvas.clientHeight / 2; }
    const before = this.toLevel0(x, y);
    const maxZoom = 16 / Math.min(...this.scale), minZoom = this.zoom0() / 4;
    this.zoom = Math.min(maxZoom, Math.max(minZoom, this.zoom * f));
    const after = this.toLevel0(x, y);
    this.center = [this.center[0] + (before[0] - after[0]) * this.scale[0],
                   this.center[1] + (before[1] - after[1]) * this.scale[1]];
    this.draw();
  }

  zoom0() {
    const [h, w] = this.extent0;
    return Math.min((this.canvas.clientWidth || 1) / (w * this.scale[1]), (this.canvas.clientHeight || 1) / (h * this.scale[0]));
  }

  // the coarsest level whose pixels are still no larger than a device pixel (level 0 when zoomed past it)
  chooseLevel() {
    const dpr = window.devicePixelRatio || 1;
    for (let k = this.levels.length - 1; k >= 0; k--) {
      const px = Math.min(...this.levels[k].ds.map((d, i) => d * this.scale[i])) * this.zoom * dpr;
      if (px <= 1.0001) return k;
    }
    return 0;
  }

  _resize() {
    const dpr = window.devicePixelRatio || 1;
    this.canvas.width = Math.max(1, Math.round(this.canvas.clientWidth * dpr));
    this.canvas.height = Math.max(1, Math.round(this.canvas.clientHeight * dpr));
    this.draw();
  }

  _image(url) {
    let entry = this.images.get(url);
    if (entry) { this.images.delete(url); this.images.set(url, entry); return entry; }
    const img = new Image();
    entry = { img, ok: false };
    this.pending++;
    img.onload = () => { entry.ok = true; this.pending--; this._scheduleDraw(); };
    img.onerror = () => { this.pending--; this._scheduleDraw(); };
    img.src = url;
    this.images.set(url, entry);
    while (this.images.size > MAX_IMAGES) this.images.delete(this.images.keys().next().value);
    return entry;
  }

  _scheduleDraw() {
    if (this._raf) return;
    this._raf = requestAnimationFrame(() => { this._raf = 0; this.draw(); });
  }

  _rect(r0) {
    const [x0, y0] = this.toScreen([r0[0], r0[1]]), [x1, y1] = this.toScreen([r0[2], r0[3]]);
    return [Math.round(x0), Math.round(y0), Math.round(x1) - Math.round(x0), Math.round(y1) - Math.round(y0)];
  }

  _drawLevel(k) {
    const { shape, ds } = this.levels[k], T = this.tileSize, ctx = this.ctx;
    const a = this.toLevel0(0, 0), b = this.toLevel0(this.canvas.clientWidth, this.canvas.clientHeight);
    const nty = Math.ceil(shape[0] / T), ntx = Math.ceil(shape[1] / T);
    const ty0 = Math.max(0, Math.floor(a[0] / ds[0] / T)), ty1 = Math.min(nty - 1, Math.floor(b[0] / ds[0] / T));
    const tx0 = Math.max(0, Math.floor(a[1] / ds[1] / T)), tx1 = Math.min(ntx - 1, Math.floor(b[1] / ds[1] / T));
    ctx.imageSmoothingEnabled = this.zoom * Math.min(...ds.map((d, i) => d * this.scale[i])) < 1;
    for (let ty = ty0; ty <= ty1; ty++) {
      for (let tx = tx0; tx <= tx1; tx++) {
        const e = this._image(this.tileUrl(k, ty, tx));
        if (!e.ok) continue;
        const r = [ty * T * ds[0], tx * T * ds[1], (ty * T + e.img.naturalHeight) * ds[0], (tx * T + e.img.naturalWidth) * ds[1]];
        ctx.drawImage(e.img, ...this._rect(r));
      }
    }
  }

  draw() {
    if (!this.ctx || !this.levels) return;
    const dpr = window.devicePixelRatio || 1, ctx = this.ctx;
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.fillStyle = "#e8e8e8";
    ctx.fillRect(0, 0, this.canvas.clientWidth, this.canvas.clientHeight);
    this.level = this.chooseLevel();
    const coarsest = this.levels.length - 1;
    if (this.level !== coarsest) this._drawLevel(coarsest); // shown while finer tiles load
    this._drawLevel(this.level);
    for (const layer of this.layers) {
      if (!layer.visible || !layer.url) continue;
      const e = this._image(layer.url);
      if (!e.ok) continue;
      ctx.imageSmoothingEnabled = false;
      ctx.globalAlpha = layer.alpha;
      ctx.drawImage(e.img, ...this._rect(layer.rect0));
      ctx.globalAlpha = 1;
    }
    ctx.lineWidth = 2;
    ctx.strokeStyle = "#00e5ff";
    for (const r of this.outlines) ctx.strokeRect(...this._rect(r));
    if (this.crosshair) {
      const [x, y] = this.toScreen(this.crosshair);
      ctx.strokeStyle = "#ffeb3b";
      ctx.lineWidth = 1;
      ctx.beginPath();
      ctx.moveTo(x, 0); ctx.lineTo(x, this.canvas.clientHeight);
      ctx.moveTo(0, y); ctx.lineTo(this.canvas.clientWidth, y);
      ctx.stroke();
    }
    for (const f of this.decorations) f(ctx, this);
    this.canvas.dataset.level = String(this.level);
    this.canvas.dataset.pending = String(this.pending);
    this.onChange(this);
  }

  _bindEvents() {
    const c = this.canvas;
    let drag = null;
    const at = (e) => { const box = c.getBoundingClientRect(); return this.toLevel0(e.clientX - box.left, e.clientY - box.top); };
    c.addEventListener("pointerdown", (e) => {
      drag = { x: e.clientX, y: e.clientY, moved: 0, center: this.center.slice(), grab: this.onGrab(at(e), this) };
      c.setPointerCapture(e.pointerId);
    });
    c.addEventListener("pointermove", (e) => {
      this.onMove(at(e), this);
      if (!drag) return;
      const dx = e.clientX - drag.x, dy = e.clientY - drag.y;
      drag.moved = Math.max(drag.moved, Math.abs(dx) + Math.abs(dy));
      if (drag.grab) { if (drag.moved >= 2) drag.grab(at(e)); this.draw(); return; }
      this.center = [drag.center[0] - dy / this.zoom, drag.center[1] - dx / this.zoom];
      this.draw();
    });
    c.addEventListener("pointerup", (e) => {
      if (drag && drag.grab && drag.moved >= 2) { drag = null; return; }
      if (drag && drag.moved < 4) {
        const box = c.getBoundingClientRect();
        this.onClick(this.toLevel0(e.clientX - box.left, e.clientY - box.top));
      }
      drag = null;
    });
    c.addEventListener("wheel", (e) => {
      e.preventDefault();
      const box = c.getBoundingClientRect();
      this.zoomBy(Math.exp(-e.deltaY * 0.002), e.clientX - box.left, e.clientY - box.top);
    }, { passive: false });
    c.addEventListener("dblclick", (e) => {
      if (view.mode !== "pan") return; // drawing and measuring take single clicks
      const box = c.getBoundingClientRect();
      this.zoomBy(2, e.clientX - box.left, e.clientY - box.top);
    });
  }
}

// ---- the page ------------------------------------------------------------------------------------------

const $ = (id) => document.getElementById(id);
const slideId = decodeURIComponent(location.pathname.split("/").pop());
const api = "/api/slides/" + encodeURIComponent(slideId);
const view = {
  info: null, viewers: [], task: 0, pos0: null,
  mode: "pan", // "pan", "draw" (click vertices) or "ruler" (click two points)
  annotations: [], // {id, name, color, rings: [[[r, c], ...]]} in level-0 (row, col), rings not closed
  selected: -1, drawing: null, ruler: [], dirty: false, session: { writable: false, token: null },
  slides: [], rightTask: -1, split: false,
};
window.ipsView = view; // for the browser test and the console

function niceLength(target) {
  const p = Math.pow(10, Math.floor(Math.log10(target)));
  for (const m of [5, 2, 1]) if (m * p <= target) return m * p;
  return p;
}

function scaleBar(parent, spacing) {
  const bar = document.createElement("div");
  bar.className = "scalebar";
  bar.innerHTML = "<div></div><span></span>";
  parent.appendChild(bar);
  return (v) => {
    const unit = spacing ? "\u00b5m" : "px", worldPerPx = 1 / v.zoom;
    let len = niceLength(120 * worldPerPx), text = len + " " + unit;
    if (spacing && len >= 1000) text = len / 1000 + " mm";
    bar.firstChild.style.width = Math.round(len / worldPerPx) + "px";
    bar.lastChild.textContent = text;
  };
}

function showPrediction(info) {
  const box = $("prediction");
  box.replaceChildren();
  const preds = info.predictions.length ? info.predictions : [];
  if (!preds.length && info.heatmap && info.heatmap.probabilities) {
    for (const [task, probs] of Object.entries(info.heatmap.probabilities)) {
      preds.push({ task, prediction: "", label: info.label,
                   probabilities: Object.fromEntries(probs.map((p, i) => [probs.length === 1 ? "1" : String(i), p])) });
    }
  }
  if (!preds.length) { box.textContent = "no prediction (give --predictions or --heatmaps)"; return; }
  for (const p of preds) {
    const div = document.createElement("div");
    const probs = Object.entries(p.probabilities).map(([c, v]) => "P(" + c + ") = " + Number(v).toFixed(3)).join(", ");
    div.innerHTML = "<b></b>: <span class='prob'></span>";
    div.firstChild.textContent = p.task + (p.prediction !== "" ? " \u2192 " + p.prediction : "");
    div.lastChild.textContent = probs + (p.label !== "" && p.label !== undefined ? "  (label " + p.label + ")" : "");
    box.appendChild(div);
  }
}

// the colour scale (ips.infer.scale): r = log2(N * attention); transparent at or below the threshold,
// full colour at the top (this slide's peak, or the same on every slide)
function ratioText(r) { return Number(Math.pow(2, r).toPrecision(3)) + "x"; }

function currentScale() {
  const h = view.info.heatmap, kind = $("scale").value, threshold = Number($("threshold").value);
  const base = kind === "global" ? h.global_scale : h.tasks[view.task].scale;
  $("threshold").max = String(Math.max(6, Math.ceil(base.top))); // the slider reaches this scale's top
  const top = Math.max(base.top, threshold + 1);
  return { kind, threshold, top };
}

function drawLegend() {
  const c = $("legend"), ctx = c.getContext("2d"), colors = view.colors, s = currentScale();
  for (let x = 0; x < 256; x++) {
    ctx.fillStyle = (Math.floor(x / 8) % 2) ? "#fff" : "#ddd";
    ctx.fillRect(x, 0, 1, 14);
    const [r, g, b, a] = colors[x];
    ctx.fillStyle = `rgba(${r},${g},${b},${a / 255})`;
    ctx.fillRect(x, 0, 1, 14);
  }
  $("legend-lo").textContent = ratioText(s.threshold) + (s.threshold === 0 ? " = uniform" : "");
  $("legend-mid").textContent = "attention / uniform (1/N)";
  $("legend-hi").textContent = ratioText(s.top);
  $("threshold-text").textContent = ratioText(s.threshold);
  $("legend-text").textContent = `Colour: a patch's attention relative to uniform attention 1/N (N = ${view.info.heatmap.n_patches}). ` +
    `Transparent at or below ${ratioText(s.threshold)}; full colour at ${ratioText(s.top)} ` +
    (s.kind === "global" ? "(the same on every slide, so slides compare)." : "(this slide's peak).") +
    " A flat map shows no colour.";
}

function overlayUrl(task, axis, at0) {
  const s = currentScale(), q = `?scale=${s.kind}&threshold=${s.threshold}`;
  return (axis ? `${api}/overlay/${task}/${axis}/${Math.round(at0)}.png` : `${api}/overlay/${task}.png`) + q;
}

// level-0 rectangle of the grid (2D) or of its two in-plane axes
function gridRect(h, axes) {
  const o = axes.map((a) => h.origin0[a]), s = axes.map((a) => h.shape[a] * h.stride0[a]);
  return [o[0], o[1], o[0] + s[0], o[1] + s[1]];
}

async function pick(point0) {
  const p = point0.map((v) => Math.max(0, Math.floor(v)));
  const r = await fetch(`${api}/at/${p.join("_")}`);
  const box = $("picked");
  if (!r.ok) { box.textContent = "no scores here"; return; }
  const d = await r.json();
  if (d.index === null) { box.textContent = "no patch at level-0 " + p.join(", "); return; }
  const lines = [`patch ${d.index}${d.selected ? " (selected, top-M)" : ""}`,
                 `level-0 ${view.info.dims === 3 ? "(z, row, col)" : "(row, col)"}: ${d.level0.join(", ")}; size ${d.size0.join(" x ")}`];
  for (const t of Object.keys(d.attention)) lines.push(`${t}: attention ${d.attention[t].toPrecision(3)}, logit ${d.logit[t].toFixed(3)}`);
  box.textContent = lines.join("\n");
}

function make2d(info, parent) {
  const scale = info.spacing ? info.spacing.slice(-2) : [1, 1];
  const bar = scaleBar(parent, info.spacing);
  const v = new TileViewer(parent, {
    levels: info.levels.map((l) => ({ shape: l.shape, ds: l.downsample })), tileSize: info.tile_size, scale,
    tileUrl: (k, ty, tx) => `${api}/tiles/${k}/${ty}_${tx}.${info.tile_format}`,
    onClick: (p) => clickAt(p, v), onGrab: (p) => grabAt(p, v), onMove: (p) => readout(v, p),
    onChange: (w) => { bar(w); readout(w); syncFrom(w); drawMinimap(); writeHash(); },
  });
  v.axes = [0, 1];
  v.axis = null;
  v.decorations.push(drawMarks);
  if (info.mask) {
    const [h, w] = v.extent0, d = info.mask.downsample || [1, 1];
    v.maskLayer = { url: `${api}/mask.png`, rect0: null, alpha: 1, visible: false, ds: d };
    const img = new Image(); // the mask's own size gives its level-0 extent
    img.onload = () => { v.maskLayer.rect0 = [0, 0, Math.min(h, img.naturalHeight * d[0]), Math.min(w, img.naturalWidth * d[1])]; };
    img.src = v.maskLayer.url;
  }
  return v;
}

// 2D: the main pane, a second pane for side-by-side (hidden until asked for), minimap and readout
function build2d(info, stage) {
  const panes = document.createElement("div");
  panes.className = "duo";
  stage.appendChild(panes);
  const viewers = [];
  for (const side of ["left", "right"]) {
    const pane = document.createElement("div");
    pane.className = "duo-pane " + side;
    panes.appendChild(pane);
    const v = make2d(info, pane);
    v.side = side;
    viewers.push(v);
  }
  const zoom = document.createElement("div");
  zoom.className = "zoom";
  zoom.innerHTML = "<button id='zoom-in' title='zoom in (+)'>+</button><button id='zoom-out' title='zoom out (-)'>&minus;</button><button id='zoom-fit' title='fit (0)'>&#9633;</button>";
  stage.appendChild(zoom);
  $("zoom-in").onclick = () => viewers[0].zoomBy(2);
  $("zoom-out").onclick = () => viewers[0].zoomBy(0.5);
  $("zoom-fit").onclick = () => viewers[0].fit();
  const mini = document.createElement("canvas");
  mini.id = "minimap";
  mini.title = "overview: click to go there";
  stage.appendChild(mini);
  mini.addEventListener("click", (e) => {
    const v = viewers[0], box = mini.getBoundingClientRect(), f = Number(mini.dataset.f);
    v.centerOn([(e.clientY - box.top) / f, (e.clientX - box.left) / f]);
  });
  const read = document.createElement("div");
  read.id = "readout";
  read.className = "readout";
  stage.appendChild(read);
  return viewers;
}

// keep the other pane's pan and zoom equal to this one's (side-by-side)
function syncFrom(v) {
  if (view.syncing || !view.split || view.viewers.length !== 2 || v.axis) return;
  view.syncing = true;
  for (const w of view.viewers) {
    if (w === v) continue;
    w.center = v.center.slice();
    w.zoom = v.zoom;
    w.draw();
  }
  view.syncing = false;
}

function setSplit(on) {
  if (view.info.dims !== 2) return;
  view.split = on;
  document.body.classList.toggle("split", on);
  $("split").checked = on;
  const [a, b] = view.viewers;
  requestAnimationFrame(() => { b._resize(); a._resize(); syncFrom(a); updateOverlay(); writeHash(); });
}

// the minimap: the coarsest level with the main pane's view outlined
function drawMinimap() {
  const mini = $("minimap"), v = view.viewers[0];
  if (!mini || !v) return;
  const [h, w] = v.extent0, f = 150 / Math.max(h, w), ctx = mini.getContext("2d");
  mini.width = Math.round(w * f);
  mini.height = Math.round(h * f);
  mini.dataset.f = String(f);
  const k = v.levels.length - 1, { shape, ds } = v.levels[k], T = v.tileSize;
  ctx.fillStyle = "#e8e8e8";
  ctx.fillRect(0, 0, mini.width, mini.height);
  for (let ty = 0; ty < Math.ceil(shape[0] / T); ty++) {
    for (let tx = 0; tx < Math.ceil(shape[1] / T); tx++) {
      const e = v._image(v.tileUrl(k, ty, tx));
      if (e.ok) ctx.drawImage(e.img, tx * T * ds[1] * f, ty * T * ds[0] * f, e.img.naturalWidth * ds[1] * f, e.img.naturalHeight * ds[0] * f);
    }
  }
  const a = v.toLevel0(0, 0), b = v.toLevel0(v.canvas.clientWidth, v.canvas.clientHeight);
  ctx.strokeStyle = "#d00";
  ctx.lineWidth = 2;
  ctx.strokeRect(a[1] * f, a[0] * f, (b[1] - a[1]) * f, (b[0] - a[0]) * f);
}

// magnification and micrometres: 10x is taken as 1 um per screen pixel (a 40x scan: 0.25 um/px at 1:1)
function readout(v, p) {
  const box = $("readout");
  if (!box || (v.side === "right" && !view.split)) return; // a hidden pane has no view to report
  if (p) view.cursor = p;
  const sp = view.info.spacing, lines = [];
  if (sp) lines.push(`\u2248 ${(10 * v.zoom).toPrecision(3)}x \u00b7 ${(1 / v.zoom).toPrecision(3)} \u00b5m per screen px`);
  else lines.push(`zoom ${v.zoom.toPrecision(3)} screen px per px (spacing unknown)`);
  const c = view.cursor;
  if (c) {
    const um = sp ? ` = ${(c[0] * sp[0]).toFixed(1)}, ${(c[1] * sp[1]).toFixed(1)} \u00b5m` : "";
    lines.push(`cursor (row, col) ${Math.floor(c[0])}, ${Math.floor(c[1])} px${um}`);
  }
  if (view.ruler.length === 2) lines.push("ruler " + rulerText());
  box.textContent = lines.join("\n");
}

function rulerText() {
  const [a, b] = view.ruler, sp = view.info.spacing || [1, 1];
  const d = Math.hypot((a[0] - b[0]) * sp[0], (a[1] - b[1]) * sp[1]);
  return view.info.spacing ? (d >= 1000 ? (d / 1000).toFixed(3) + " mm" : d.toFixed(1) + " \u00b5m") : d.toFixed(1) + " px";
}

function build3d(info, stage) {
  const panes = document.createElement("div");
  panes.className = "panes";
  stage.appendChild(panes);
  const sp = info.spacing || [1, 1, 1], shape0 = info.levels[0].shape;
  view.pos0 = info.heatmap ? info.heatmap.tasks[0].peak0.slice() : shape0.map((s) => Math.floor(s / 2));
  const viewers = [];
  for (const [a, axis] of ["z", "y", "x"].entries()) {
    const axes = [0, 1, 2].filter((i) => i !== a);
    const pane = document.createElement("div");
    pane.className = "pane";
    pane.innerHTML = `<div class="slider">${axis} <input type="range" min="0" max="${shape0[a] - 1}" id="slice-${axis}"><span></span></div>`;
    panes.appendChild(pane);
    const v = new TileViewer(pane, {
      levels: info.levels.map((l) => ({ shape: axes.map((i) => l.shape[i]), ds: axes.map((i) => l.downsample[i]) })),
      tileSize: info.tile_size, scale: axes.map((i) => sp[i]),
      tileUrl: (k, ty, tx) => {
        const d = info.levels[k].downsample[a], n = info.levels[k].shape[a];
        return `${api}/tiles/${k}/${axis}/${Math.min(n - 1, Math.floor(view.pos0[a] / d))}/${ty}_${tx}.png`;
      },
      onClick: (p) => { axes.forEach((i, j) => { view.pos0[i] = Math.floor(p[j]); }); syncPanes(); if (info.heatmap) pick(view.pos0); },
    });
    v.axes = axes;
    v.axis = axis;
    v.axisIndex = a;
    const slider = pane.querySelector("input");
    slider.oninput = () => { view.pos0[a] = Number(slider.value); syncPanes(); };
    viewers.push(v);
  }
  const info3 = document.createElement("div");
  info3.className = "pane";
  info3.style.background = "#fff";
  info3.style.padding = "8px";
  info3.innerHTML = "<b>volume</b><p>Three orthogonal planes through the crosshair (yellow). It starts at the most attended patch of the task; click a pane to move it, drag to pan, wheel to zoom.</p><button id='peak'>go to the peak</button>";
  panes.appendChild(info3);
  return viewers;
}

function syncPanes() {
  for (const v of view.viewers) {
    if (v.axis) {
      const s = $("slice-" + v.axis);
      s.value = view.pos0[v.axisIndex];
      s.nextElementSibling.textContent = view.pos0[v.axisIndex];
      v.crosshair = v.axes.map((i) => view.pos0[i] + 0.5);
    }
  }
  updateOverlay();
}

function updateOverlay() {
  const info = view.info, h = info.heatmap;
  const show = $("overlay").checked, alpha = Number($("opacity").value) / 100;
  for (const v of view.viewers) {
    v.layers = [];
    if (v.maskLayer && v.maskLayer.rect0) { v.maskLayer.visible = $("mask").checked; v.layers.push(v.maskLayer); }
    v.outlines = [];
    const task = v.side === "right" ? view.rightTask : view.task; // the right pane: another task, or tissue
    if (h && task >= 0) {
      const at0 = v.axis ? view.pos0[v.axisIndex] : 0;
      v.layers.push({ url: overlayUrl(task, v.axis, at0), rect0: gridRect(h, v.axes), alpha, visible: show });
      if ($("outline").checked && show) {
        for (const c of h.selected) {
          if (v.axis && !(c[v.axisIndex] <= at0 && at0 < c[v.axisIndex] + h.size0[v.axisIndex])) continue;
          const [i, j] = v.axes;
          v.outlines.push([c[i], c[j], c[i] + h.size0[i], c[j] + h.size0[j]]);
        }
      }
    }
    v.draw();
  }
  writeHash();
}

function goToPatch(level0) {
  const h = view.info.heatmap, centre = level0.map((c, i) => c + h.size0[i] / 2);
  if (view.info.dims === 3) {
    view.pos0 = centre.map(Math.floor);
    syncPanes();
    for (const v of view.viewers) v.centerOn(v.axes.map((i) => centre[i]));
    return;
  }
  const v = view.viewers[0];
  const span = Math.max(h.size0[0] * v.scale[0], h.size0[1] * v.scale[1]);
  v.centerOn(centre, Math.min(v.canvas.clientWidth, v.canvas.clientHeight) / (4 * span));
}

function showGallery() {
  const g = $("gallery");
  g.replaceChildren();
  const h = view.info.heatmap;
  if (!h) { g.textContent = "no heatmap (give --heatmaps)"; return; }
  h.tasks[view.task].top.forEach((p, rank) => {
    const b = document.createElement("button");
    b.title = `patch ${p.index}: attention ${p.attention.toPrecision(3)}, level-0 ${p.level0.join(", ")}`;
    b.dataset.index = p.index;
    b.innerHTML = `<img alt="patch ${p.index}" src="${api}/patch/${p.index}.jpg"><span>#${rank + 1} ${p.attention.toPrecision(2)}</span>`;
    b.onclick = () => goToPatch(p.level0);
    g.appendChild(b);
  });
}

// ---- annotations: polygons in level-0 (row, col); saved as QuPath GeoJSON ([x, y] = [col, row]) ---------

const CLASS_COLORS = { "Tumor": [200, 0, 0], "Not tumor": [20, 120, 220] };
const HIT_PX = 7; // screen pixels within which a click finds a vertex

function fromGeoJSON(data) {
  const items = Array.isArray(data) ? data : (data.type === "Feature" ? [data] : (data.features || []));
  const out = [];
  for (const f of items) {
    const g = f && f.geometry;
    if (!g || !["Polygon", "MultiPolygon"].includes(g.type)) continue;
    const cls = (f.properties && f.properties.classification) || {};
    const name = typeof cls.name === "string" ? cls.name : "Tumor";
    const color = Array.isArray(cls.color) ? cls.color : (CLASS_COLORS[name] || [120, 120, 120]);
    for (const poly of g.type === "Polygon" ? [g.coordinates] : g.coordinates) {
      const rings = poly.map((ring) => {
        const pts = ring.map(([x, y]) => [y, x]);
        const [a, b] = [pts[0], pts[pts.length - 1]];
        if (pts.length > 1 && a[0] === b[0] && a[1] === b[1]) pts.pop();
        return pts;
      });
      out.push({ id: typeof f.id === "string" ? f.id : newId(), name, color, rings });
    }
  }
  return out;
}

function toGeoJSON() {
  return {
    type: "FeatureCollection",
    features: view.annotations.map((a) => ({
      type: "Feature", id: a.id,
      geometry: { type: "Polygon", coordinates: a.rings.map((ring) => [...ring, ring[0]].map(([r, c]) => [round2(c), round2(r)])) },
      properties: { objectType: "annotation", classification: { name: a.name, color: a.color } },
    })),
  };
}

function round2(v) { return Math.round(v * 100) / 100; }
function newId() { return "a" + Date.now().toString(36) + Math.floor(Math.random() * 1e6).toString(36); }

function inRing(p, ring) { // ray casting; p and ring in (row, col)
  let inside = false;
  for (let i = 0, j = ring.length - 1; i < ring.length; j = i++) {
    const [yi, xi] = ring[i], [yj, xj] = ring[j];
    if ((yi > p[0]) !== (yj > p[0]) && p[1] < (xj - xi) * (p[0] - yi) / (yj - yi) + xi) inside = !inside;
  }
  return inside;
}

function annotationAt(p) {
  for (let i = view.annotations.length - 1; i >= 0; i--) {
    const [outer, ...holes] = view.annotations[i].rings;
    if (inRing(p, outer) && !holes.some((h) => inRing(p, h))) return i;
  }
  return -1;
}

function nearScreen(v, a, b) { const [x0, y0] = v.toScreen(a), [x1, y1] = v.toScreen(b); return Math.hypot(x0 - x1, y0 - y1) <= HIT_PX; }

function clickAt(p, v) {
  if (view.mode === "draw") {
    const d = view.drawing || (view.drawing = []);
    if (d.length >= 3 && nearScreen(v, p, d[0])) finishPolygon(); else d.push(p);
  } else if (view.mode === "ruler") {
    view.ruler = view.ruler.length === 1 ? [view.ruler[0], p] : [p];
  } else {
    const i = annotationAt(p);
    if (i !== view.selected) select(i);
    if (i < 0 && view.info.heatmap) pick(p);
  }
  redraw();
  readout(v);
}

// pressing on a vertex of the selected polygon drags it (edit); anywhere else pans
function grabAt(p, v) {
  if (view.mode !== "pan" || view.selected < 0) return null;
  const a = view.annotations[view.selected];
  for (const ring of a.rings) {
    for (let k = 0; k < ring.length; k++) {
      if (nearScreen(v, p, ring[k])) return (q) => { ring[k] = q; markDirty(); };
    }
  }
  return null;
}

function finishPolygon() {
  const d = view.drawing;
  view.drawing = null;
  if (!d || d.length < 3) return;
  const name = $("ann-class").value;
  view.annotations.push({ id: newId(), name, color: CLASS_COLORS[name] || [120, 120, 120], rings: [d] });
  select(view.annotations.length - 1);
  markDirty();
}

function select(i) {
  view.selected = i;
  if (i >= 0) $("ann-class").value = view.annotations[i].name;
  showAnnotationStatus();
}

function deleteSelected() {
  if (view.selected < 0) return;
  view.annotations.splice(view.selected, 1);
  view.selected = -1;
  markDirty();
}

function markDirty() { view.dirty = true; showAnnotationStatus(); redraw(); }

function setMode(mode) {
  view.mode = view.mode === mode ? "pan" : mode;
  if (view.mode !== "draw") view.drawing = null;
  for (const m of ["draw", "ruler"]) $("mode-" + m).classList.toggle("on", view.mode === m);
  for (const v of view.viewers) v.canvas.style.cursor = view.mode === "pan" ? "" : "crosshair";
  redraw();
}

function showAnnotationStatus() {
  const n = view.annotations.length;
  const where = view.session.writable ? (view.dirty ? "unsaved changes (s saves)" : "saved") : "read-only viewer: start ips view with --annotations DIR to save; export still works";
  $("ann-status").textContent = `${n} polygon${n === 1 ? "" : "s"}${view.selected >= 0 ? ", #" + (view.selected + 1) + " selected" : ""}; ${where}`;
  document.body.dataset.annotations = String(n);
  document.body.dataset.dirty = view.dirty ? "1" : "0";
}

async function loadAnnotations() {
  const r = await fetch(`${api}/annotations`);
  view.annotations = r.ok ? fromGeoJSON(await r.json()) : [];
  view.dirty = false;
  showAnnotationStatus();
}

async function saveAnnotations() {
  if (!view.session.writable) { showAnnotationStatus(); return; }
  const r = await fetch(`${api}/annotations`, {
    method: "PUT", body: JSON.stringify(toGeoJSON()),
    headers: { "Content-Type": "application/json", "X-IPS-Token": view.session.token },
  });
  const text = await r.text();
  if (r.ok) { view.dirty = false; showAnnotationStatus(); document.body.dataset.saved = String(Number(document.body.dataset.saved || 0) + 1); }
  else $("ann-status").textContent = "not saved: " + text.trim();
}

function importFile(file) {
  const reader = new FileReader();
  reader.onload = () => {
    try { view.annotations.push(...fromGeoJSON(JSON.parse(reader.result))); markDirty(); }
    catch (e) { $("ann-status").textContent = "not GeoJSON: " + e.message; }
  };
  reader.readAsText(file);
}

function pathOf(ctx, v, ring, close) {
  ring.forEach((p, k) => { const [x, y] = v.toScreen(p); if (k) ctx.lineTo(x, y); else ctx.moveTo(x, y); });
  if (close) ctx.closePath();
}

// a TileViewer decoration: the polygons, the one being drawn, the ruler
function drawMarks(ctx, v) {
  view.annotations.forEach((a, i) => {
    const [r, g, b] = a.color, on = i === view.selected;
    ctx.beginPath();
    for (const ring of a.rings) pathOf(ctx, v, ring, true);
    ctx.fillStyle = `rgba(${r},${g},${b},${on ? 0.22 : 0.08})`;
    ctx.fill("evenodd");
    ctx.strokeStyle = `rgb(${r},${g},${b})`;
    ctx.lineWidth = on ? 3 : 2;
    ctx.stroke();
    if (on) for (const ring of a.rings) for (const p of ring) { const [x, y] = v.toScreen(p); ctx.fillStyle = "#fff"; ctx.fillRect(x - 4, y - 4, 8, 8); ctx.strokeRect(x - 4, y - 4, 8, 8); }
  });
  if (view.drawing && view.drawing.length) {
    ctx.beginPath();
    pathOf(ctx, v, view.cursor && view.mode === "draw" ? [...view.drawing, view.cursor] : view.drawing, false);
    ctx.setLineDash([6, 4]);
    ctx.strokeStyle = "#111";
    ctx.lineWidth = 2;
    ctx.stroke();
    ctx.setLineDash([]);
    for (const p of view.drawing) { const [x, y] = v.toScreen(p); ctx.fillStyle = "#ff0"; ctx.fillRect(x - 3, y - 3, 6, 6); }
  }
  if (view.ruler.length) {
    const pts = view.ruler.length === 2 ? view.ruler : [view.ruler[0], view.cursor || view.ruler[0]];
    const [x0, y0] = v.toScreen(pts[0]), [x1, y1] = v.toScreen(pts[1]);
    ctx.strokeStyle = "#ff0";
    ctx.lineWidth = 3;
    ctx.beginPath(); ctx.moveTo(x0, y0); ctx.lineTo(x1, y1); ctx.stroke();
    ctx.strokeStyle = "#000";
    ctx.lineWidth = 1;
    ctx.stroke();
    if (view.ruler.length === 2) {
      ctx.font = "13px system-ui, sans-serif";
      const t = rulerText(), w = ctx.measureText(t).width;
      ctx.fillStyle = "rgba(255,255,255,.9)";
      ctx.fillRect((x0 + x1) / 2 + 6, (y0 + y1) / 2 - 16, w + 8, 18);
      ctx.fillStyle = "#000";
      ctx.fillText(t, (x0 + x1) / 2 + 10, (y0 + y1) / 2 - 3);
    }
  }
}

function redraw() { for (const v of view.viewers) v.draw(); }

// the regions `ips suggest` asks to be annotated: dashed orange outlines (a decoration, not editable)
function drawSuggested(ctx, v) {
  if (!view.suggested || !$("suggested").checked) return;
  ctx.setLineDash([8, 5]);
  ctx.strokeStyle = "#ff8c00";
  ctx.lineWidth = 2;
  for (const a of view.suggested) {
    ctx.beginPath();
    for (const ring of a.rings) pathOf(ctx, v, ring, true);
    ctx.stroke();
  }
  ctx.setLineDash([]);
}

// ---- the view in the URL (#r=&c=&zoom=&task=&scale=&thr=&op=&split=), slides before and after -------------

function writeHash() {
  if (!view.ready) return;
  clearTimeout(view.hashTimer);
  view.hashTimer = setTimeout(() => history.replaceState(null, "", "#" + hashOf().toString()), 150);
}

function hashOf() {
  const q = new URLSearchParams();
  const v = view.viewers[0];
  if (view.info.dims === 2 && v) {
    q.set("r", Math.round(v.center[0] / v.scale[0]));
    q.set("c", Math.round(v.center[1] / v.scale[1]));
    q.set("zoom", v.zoom.toPrecision(4));
  } else if (view.pos0) q.set("pos", view.pos0.join(","));
  q.set("task", view.task);
  q.set("scale", $("scale").value);
  q.set("thr", $("threshold").value);
  q.set("op", $("opacity").value);
  if (view.split) q.set("split", String(view.rightTask));
  return q;
}

function readHash() {
  const q = new URLSearchParams(location.hash.slice(1)), h = view.info.heatmap;
  if (h && q.has("task") && Number(q.get("task")) < h.tasks.length) { view.task = Number(q.get("task")); $("task").value = String(view.task); }
  if (q.get("scale") === "global" || q.get("scale") === "slide") $("scale").value = q.get("scale");
  if (q.has("thr")) $("threshold").value = q.get("thr");
  if (q.has("op")) $("opacity").value = q.get("op");
  if (view.info.dims === 2 && q.has("r") && q.has("c")) {
    view.viewers[0].centerOn([Number(q.get("r")), Number(q.get("c"))], q.has("zoom") ? Number(q.get("zoom")) : undefined);
  }
  if (view.info.dims === 3 && q.has("pos")) view.pos0 = q.get("pos").split(",").map(Number);
  if (q.has("split") && view.info.dims === 2) { view.rightTask = Number(q.get("split")); $("right").value = String(view.rightTask); setSplit(true); }
}

// the settings (not the position) travel to the next slide
function goToSlide(step) {
  const i = view.slides.indexOf(slideId);
  if (i < 0 || !view.slides.length) return;
  const next = view.slides[(i + step + view.slides.length) % view.slides.length];
  const q = hashOf();
  for (const k of ["r", "c", "zoom", "pos"]) q.delete(k);
  location.href = "/slide/" + encodeURIComponent(next) + "#" + q.toString();
}

const KEYS = [
  ["+ / -", "zoom in / out"], ["0", "fit the slide"], ["n / p", "next / previous slide"],
  ["o", "overlay on / off"], ["t", "next task"], ["g", "global / per-slide colour scale"],
  ["[ / ]", "threshold down / up"], ["b", "side by side"], ["d", "draw a polygon (click vertices; Enter or the first vertex closes)"],
  ["Esc", "stop drawing / measuring"], ["Delete", "delete the selected polygon"], ["s", "save annotations"],
  ["r", "ruler (click two points)"],
];

function onKey(e) {
  const tag = (e.target && e.target.tagName) || "";
  if ((tag === "INPUT" && !["range", "checkbox"].includes(e.target.type)) || tag === "SELECT" || tag === "TEXTAREA") return;
  if (e.ctrlKey || e.metaKey || e.altKey) return;
  const v = view.viewers[0], h = view.info.heatmap;
  const act = {
    "+": () => view.viewers.forEach((w) => w.zoomBy(2)), "=": () => view.viewers.forEach((w) => w.zoomBy(2)),
    "-": () => view.viewers.forEach((w) => w.zoomBy(0.5)), "0": () => view.viewers.forEach((w) => w.fit()),
    "n": () => goToSlide(1), "p": () => goToSlide(-1),
    "o": () => { $("overlay").checked = !$("overlay").checked; updateOverlay(); },
    "t": () => { if (h) { $("task").value = String((view.task + 1) % h.tasks.length); $("task").onchange(); } },
    "g": () => { $("scale").value = $("scale").value === "global" ? "slide" : "global"; scaleChanged(); },
    "[": () => { $("threshold").stepDown(); scaleChanged(); }, "]": () => { $("threshold").stepUp(); scaleChanged(); },
    "b": () => setSplit(!view.split),
    "d": () => { if (view.info.dims === 2) setMode("draw"); },
    "r": () => { if (view.info.dims === 2) { view.ruler = []; setMode("ruler"); } },
    "Escape": () => { view.drawing = null; view.ruler = []; if (view.mode !== "pan") setMode(view.mode); redraw(); },
    "Enter": () => { if (view.mode === "draw") { finishPolygon(); redraw(); } },
    "Delete": deleteSelected, "Backspace": deleteSelected,
    "s": saveAnnotations,
  }[e.key];
  if (!act || !v) return;
  e.preventDefault();
  act();
}

function scaleChanged() { if (view.info.heatmap) drawLegend(); updateOverlay(); writeHash(); }

async function main() {
  const [info, colors, session, slides] = await Promise.all([
    fetch(api).then((r) => r.json()), fetch("/api/colormap").then((r) => r.json()),
    fetch("/api/session").then((r) => r.json()), fetch("/api/slides").then((r) => r.json()),
  ]);
  view.info = info;
  view.colors = colors;
  view.session = session;
  view.slides = slides.map((x) => x.id);
  document.title = "ips view: " + info.id;
  $("title").textContent = info.id;
  const i = view.slides.indexOf(slideId);
  $("position").textContent = `${i + 1} / ${view.slides.length}`;
  $("prev").onclick = () => goToSlide(-1);
  $("next").onclick = () => goToSlide(1);
  $("meta").textContent = `${info.dims}D, ${info.levels[0].shape.join(" x ")} px` + (info.spacing ? `, ${info.spacing.map((s) => s.toPrecision(3)).join(" x ")} \u00b5m/px` : ", spacing unknown");
  showPrediction(info);
  const stage = $("stage");
  view.viewers = info.dims === 3 ? build3d(info, stage) : build2d(info, stage);
  const h = info.heatmap;
  if (h) {
    h.tasks.forEach((t, k) => {
      for (const id of ["task", "right"]) { const o = document.createElement("option"); o.value = k; o.textContent = t.name; $(id).appendChild(o); }
    });
    drawLegend();
  } else {
    for (const id of ["overlay", "task", "opacity", "outline", "scale", "threshold"]) $(id).disabled = true;
    $("picked").textContent = "no heatmap for this slide";
  }
  if (!info.mask) $("mask").disabled = true;
  $("task").onchange = () => {
    view.task = Number($("task").value);
    drawLegend();
    showGallery();
    if (info.dims === 3) goToPatch(h.tasks[view.task].top[0].level0); // the crosshair follows the peak
    updateOverlay();
  };
  for (const id of ["overlay", "opacity", "outline", "mask"]) $(id).addEventListener("input", updateOverlay);
  for (const id of ["scale", "threshold"]) $(id).addEventListener("input", scaleChanged);
  $("right").onchange = () => { view.rightTask = Number($("right").value); updateOverlay(); };
  $("split").onchange = () => setSplit($("split").checked);
  if ($("peak")) $("peak").onclick = () => goToPatch(h.tasks[view.task].top[0].level0);
  // annotations (2D)
  if (info.dims === 2) {
    $("mode-draw").onclick = () => setMode("draw");
    $("mode-ruler").onclick = () => { view.ruler = []; setMode("ruler"); };
    $("ann-delete").onclick = deleteSelected;
    $("ann-save").onclick = saveAnnotations;
    $("ann-save").disabled = !session.writable;
    $("ann-export").href = `${api}/annotations.geojson`;
    $("ann-import").onchange = (e) => { if (e.target.files[0]) importFile(e.target.files[0]); e.target.value = ""; };
    $("ann-class").onchange = () => {
      const a = view.annotations[view.selected];
      if (a) { a.name = $("ann-class").value; a.color = CLASS_COLORS[a.name] || [120, 120, 120]; markDirty(); }
    };
    await loadAnnotations();
    if (info.worklist) {
      $("worklist-line").textContent = `ips suggest ranks this slide #${info.worklist.rank} (score ${Number(info.worklist.score).toFixed(3)})`;
      $("worklist-box").hidden = false;
      view.suggested = fromGeoJSON(await fetch(`${api}/suggested`).then((r) => r.json()));
      $("suggested").onchange = redraw;
      for (const v of view.viewers) v.decorations.unshift(drawSuggested);
    }
  } else {
    $("annotate").hidden = true;
    $("split").disabled = true;
  }
  $("keys").replaceChildren(...KEYS.map(([k, what]) => { const li = document.createElement("li"); li.innerHTML = "<kbd></kbd> "; li.firstChild.textContent = k; li.append(what); return li; }));
  document.addEventListener("keydown", onKey);
  window.addEventListener("beforeunload", (e) => { if (view.dirty && view.session.writable) e.preventDefault(); });
  showGallery();
  readHash();
  if (h) drawLegend();
  if (info.dims === 3) syncPanes(); else updateOverlay();
  setTimeout(updateOverlay, 50); // the mask's extent is known once its image loaded
  view.ready = true;
  document.body.dataset.ready = "1";
}

main();
