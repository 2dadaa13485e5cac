// ips view: the index of slides with thumbnails, sortable (click a column) and filterable (text over every
// column, outcome).
"use strict";

function outcomeOf(pred, label) {
  // binary: TP/FP/TN/FN; other kinds: "right"/"wrong"; no label: "unlabelled"
  if (label === "" || label === undefined) return "unlabelled";
  if (pred === "") return "";
  if ((pred === "0" || pred === "1") && (label === "0" || label === "1")) {
    return (pred === "1" ? (label === "1" ? "TP" : "FP") : (label === "1" ? "FN" : "TN"));
  }
  return pred === label ? "right" : "wrong";
}

function rowsOf(slides) {
  const rows = [];
  for (const s of slides) {
    const preds = s.predictions.length ? s.predictions : [null];
    for (const p of preds) {
      const probs = p ? p.probabilities : {};
      const pred = p ? p.prediction : "";
      let probability = null;
      if (p && pred in probs) probability = probs[pred];
      else if (p && "1" in probs && Object.keys(probs).length === 1) probability = probs["1"];
      else if (p) probability = Math.max(...Object.values(probs));
      const label = p && p.label !== "" ? p.label : s.label;
      rows.push({ id: s.id, task: p ? p.task : "", prediction: pred, probability, label,
                  p1: "1" in probs ? probs["1"] : null, outcome: outcomeOf(pred, label), heatmap: s.heatmap });
    }
  }
  return rows;
}

const state = { rows: [], key: "id", dir: 1 };

function matches(r, text, outcome) {
  if (outcome === "wrong" && !["FP", "FN", "wrong"].includes(r.outcome)) return false;
  if (outcome && outcome !== "wrong" && r.outcome !== outcome) return false;
  if (!text) return true;
  return cellsOf(r).some((v) => String(v).toLowerCase().includes(text)); // every column, as shown
}

// the text of each column as the table shows it (slide, task, prediction, probability, label, outcome, heatmap)
function cellsOf(r) {
  return [r.id, r.task, r.prediction,
          r.p1 !== null ? "P(1) = " + r.p1.toFixed(3) : (r.probability !== null ? r.probability.toFixed(3) : ""),
          r.label, r.outcome, r.heatmap ? "yes" : "-"];
}

function render() {
  const text = document.getElementById("filter").value.trim().toLowerCase();
  const outcome = document.getElementById("outcome").value;
  const key = state.key;
  const rows = state.rows.filter((r) => matches(r, text, outcome)).sort((a, b) => {
    const x = a[key], y = b[key];
    if (x === y) return 0;
    if (x === null || x === undefined) return 1;
    if (y === null || y === undefined) return -1;
    return (x < y ? -1 : 1) * state.dir;
  });
  const body = document.querySelector("#slides tbody");
  body.replaceChildren();
  for (const r of rows) {
    const tr = document.createElement("tr");
    tr.dataset.slide = r.id;
    if (["FP", "FN", "wrong"].includes(r.outcome)) tr.className = "wrong";
    const thumb = document.createElement("td");
    const img = document.createElement("img");
    img.className = "thumb";
    img.loading = "lazy";
    img.alt = "";
    img.src = "/api/slides/" + encodeURIComponent(r.id) + "/thumbnail.jpg";
    thumb.appendChild(img);
    tr.appendChild(thumb);
    cellsOf(r).forEach((v, i) => {
      const td = document.createElement("td");
      if (i === 0) {
        const a = document.createElement("a");
        a.href = "/slide/" + encodeURIComponent(r.id);
        a.textContent = r.id;
        td.appendChild(a);
      } else td.textContent = v;
      if (i === 3) td.className = "prob";
      if (i === 5) td.className = "outcome";
      tr.appendChild(td);
    });
    body.appendChild(tr);
  }
  document.getElementById("count").textContent = rows.length + " of " + state.rows.length + " rows";
  document.querySelectorAll("th[data-key]").forEach((th) => {
    th.dataset.dir = th.dataset.key === key ? (state.dir > 0 ? "asc" : "desc") : "";
  });
  document.body.dataset.ready = "1";
}

document.querySelectorAll("th[data-key]").forEach((th) => th.addEventListener("click", () => {
  state.dir = state.key === th.dataset.key ? -state.dir : 1;
  state.key = th.dataset.key;
  render();
}));
document.getElementById("filter").addEventListener("input", render);
document.getElementById("outcome").addEventListener("change", render);
fetch("/api/slides").then((r) => r.json()).then((slides) => { state.rows = rowsOf(slides); render(); });

// the worklist of `ips suggest` (ips view --worklist DIR), best first
fetch("/api/worklist").then((r) => r.json()).then((items) => {
  if (!items.length) return;
  const list = document.getElementById("worklist-items");
  for (const w of items) {
    const li = document.createElement("li");
    li.dataset.slide = w.id;
    const a = document.createElement("a");
    a.href = "/slide/" + encodeURIComponent(w.id);
    a.textContent = w.id;
    li.append(a, ` score ${Number(w.score).toFixed(3)}` + (w.regions ? ", regions outlined" : ""));
    list.appendChild(li);
  }
  document.getElementById("worklist").hidden = false;
});
