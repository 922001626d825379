// fedtune console: every page renders from the JSON API and polls it while something runs.
"use strict";

const fmt = {
  pct: (v) => (v === null || v === undefined ? "–" : (100 * v).toFixed(1) + "%"),
  num: (v, d = 3) => (v === null || v === undefined ? "–" : Number(v).toFixed(d)),
  bytes: (b) => (b === null || b === undefined ? "–" : b >= 1e9 ? (b / 1e9).toFixed(2) + " GB"
    : b >= 1e6 ? (b / 1e6).toFixed(2) + " MB" : (b / 1e3).toFixed(1) + " KB"),
  time: (t) => (t ? t.replace("T", " ").replace(/\.\d+Z$/, "Z") : "–"),
};

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(child ?? ""));
  return node;
}

function csrfToken() {
  const entry = document.cookie.split("; ").find((c) => c.startsWith("fedtune_csrf="));
  return entry ? entry.slice("fedtune_csrf=".length) : "";
}

async function api(path, options = {}) {
  const headers = { "Content-Type": "application/json", "X-CSRF-Token": csrfToken() };
  const response = await fetch(path, { ...options, headers, credentials: "same-origin" });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const detail = Array.isArray(body.detail)
      ? body.detail.map((d) => `${(d.loc || []).slice(1).join(".")}: ${d.msg}`).join("; ")
      : body.detail || response.statusText;
    throw new Error(`${response.status}: ${detail}`);
  }
  return body;
}

function table(columns, rows) {
  const head = el("tr", {}, ...columns.map((c) => el("th", {}, c.title)));
  const body = rows.map((row) => el("tr", {}, ...columns.map((c) => {
    const value = c.render ? c.render(row) : row[c.key];
    return el("td", { class: c.num ? "num" : "" }, value);
  })));
  return el("table", {}, el("thead", {}, head), el("tbody", {}, ...body));
}

function show(id, node) { const target = document.getElementById(id); target.replaceChildren(node); }
function message(text, bad = false) {
  const m = document.getElementById("message"); m.textContent = text; m.className = bad ? "error" : "muted";
}

function poll(render, isLive) {
  let timer = null;
  const tick = async () => {
    try { const live = await render(); timer = setTimeout(tick, live ? 2000 : 10000); }
    catch (err) { message(String(err.message || err), true); timer = setTimeout(tick, 5000); }
  };
  tick();
  return () => clearTimeout(timer);
}

const plotConfig = { displaylogo: false, responsive: true };
function chart(id, traces, layout) {
  if (layout.title) layout.title = { x: 0.02, xanchor: "left", ...layout.title };
  Plotly.react(id, traces, { margin: { t: 36, r: 60, b: 44, l: 60 }, legend: { orientation: "h", y: -0.2 },
                             autosize: true, ...layout }, plotConfig);
}
