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
  constructor(parent, { levels, tileSize, tileUrl, scale, onClick, onChange }) {
    this.levels = levels;
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
    this.canvas.dataset.level = String(this.level);
    this.canvas.dataset.pending = String(this.pending);
    this.onChange(this);
  }

  _bindEvents() {
    const c = this.canvas;
    let drag = null;
    c.addEventListener("pointerdown", (e) => { drag = { x: e.clientX, y: e.clientY, moved: 0, center: this.center.slice() }; c.setPointerCapture(e.pointerId); });
    c.addEventListener("pointermove", (e) => {
      if (!drag) return;
      const dx = e.clientX - drag.x, dy = e.clientY - drag.y;
      drag.moved = Math.max(drag.moved, Math.abs(dx) + Math.abs(dy));
      this.center = [drag.center[0] - dy / this.zoom, drag.center[1] - dx / this.zoom];
      this.draw();
    });
    c.addEventListener("pointerup", (e) => {
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
      const box = c.getBoundingClientRect();
      this.zoomBy(2, e.clientX - box.left, e.clientY - box.top);
    });
  }
}

// ---- the page ------------------------------------------------------------------------------------------

const $ = (id) => document.getElementById(id);
const slideId = decodeURIComponent(location.pathname.split("/").pop());
const api = "/api/slides/" + encodeURIComponent(slideId);
const view = { info: null, viewers: [], task: 0, pos0: null };
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

function build2d(info, stage) {
  const scale = info.spacing ? info.spacing.slice(-2) : [1, 1];
  const bar = scaleBar(stage, info.spacing);
  const v = new TileViewer(stage, {
    levels: info.levels.map((l) => ({ shape: l.shape, ds: l.downsample })), tileSize: info.tile_size, scale,
    tileUrl: (k, ty, tx) => `${api}/tiles/${k}/${ty}_${tx}.${info.tile_format}`,
    onClick: (p) => { if (info.heatmap) pick(p); }, onChange: bar,
  });
  const zoom = document.createElement("div");
  zoom.className = "zoom";
  zoom.innerHTML = "<button id='zoom-in' title='zoom in'>+</button><button id='zoom-out' title='zoom out'>&minus;</button><button id='zoom-fit' title='fit'>&#9633;</button>";
  stage.appendChild(zoom);
  $("zoom-in").onclick = () => v.zoomBy(2);
  $("zoom-out").onclick = () => v.zoomBy(0.5);
  $("zoom-fit").onclick = () => v.fit();
  v.axes = [0, 1];
  v.axis = null;
  if (info.mask) {
    const [h, w] = v.extent0, d = info.mask.downsample || [1, 1];
    v.maskLayer = { url: `${api}/mask.png`, rect0: null, alpha: 1, visible: false, ds: d };
    const img = new Image(); // the mask's own size gives its level-0 extent
    img.onload = () => { v.maskLayer.rect0 = [0, 0, Math.min(h, img.naturalHeight * d[0]), Math.min(w, img.naturalWidth * d[1])]; };
    img.src = v.maskLayer.url;
  }
  return [v];
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
    if (h) {
      const at0 = v.axis ? view.pos0[v.axisIndex] : 0;
      v.layers.push({ url: overlayUrl(view.task, v.axis, at0), rect0: gridRect(h, v.axes), alpha, visible: show });
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

async function main() {
  const [info, colors] = await Promise.all([fetch(api).then((r) => r.json()), fetch("/api/colormap").then((r) => r.json())]);
  view.info = info;
  view.colors = colors;
  document.title = "ips view: " + info.id;
  $("title").textContent = info.id;
  $("meta").textContent = `${info.dims}D, ${info.levels[0].shape.join(" x ")} px` + (info.spacing ? `, ${info.spacing.map((s) => s.toPrecision(3)).join(" x ")} \u00b5m/px` : ", spacing unknown");
  showPrediction(info);
  const stage = $("stage");
  view.viewers = info.dims === 3 ? build3d(info, stage) : build2d(info, stage);
  const h = info.heatmap;
  if (h) {
    h.tasks.forEach((t, i) => { const o = document.createElement("option"); o.value = i; o.textContent = t.name; $("task").appendChild(o); });
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
  for (const id of ["scale", "threshold"]) $(id).addEventListener("input", () => { if (h) drawLegend(); updateOverlay(); });
  if ($("peak")) $("peak").onclick = () => goToPatch(h.tasks[view.task].top[0].level0);
  showGallery();
  if (info.dims === 3) syncPanes(); else updateOverlay();
  setTimeout(updateOverlay, 50); // the mask's extent is known once its image loaded
  document.body.dataset.ready = "1";
}

main();
