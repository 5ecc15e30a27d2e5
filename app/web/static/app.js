// The mipp dashboard: one page, hash routes (#/jobs, #/jobs/ID, #/sweeps, #/sweeps/ID,
// #/models, #/datasets), plain DOM calls, no framework and nothing from another host.
//
// The API key lives in sessionStorage (this tab only) and goes out as the Authorization
// header on every request, downloads included (fetch, then a blob URL), so it is never part
// of a URL, a Referer or an access log. Every text from the API is set with textContent.
"use strict";

const API = new URL("../api/v1/", location.origin + location.pathname).href;
const KEY_ITEM = "mipp.apiKey";
const FINAL = new Set(["succeeded", "failed", "cancelled"]);
const JOB_POLL_MS = 1000;   // a job page: the progress bar moves at the worker's own pace
const LIST_POLL_MS = 2000;  // lists: live enough, and cheap for the API
let config = { architectures: [], methods: [], builtin_datasets: [], model_formats: [] };

// ---------------------------------------------------------------------------------------
// Small helpers

function h(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "text") node.textContent = value;
    else if (name === "class") node.className = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name in node && typeof value !== "string") node[name] = value;
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "text") node.textContent = value;
    else node.setAttribute(name, String(value));
  }
  node.append(...children);
  return node;
}

const fmt = {
  pct: (x) => (x === null || x === undefined ? "–" : `${(100 * x).toFixed(1)}%`),
  int: (x) => (x === null || x === undefined ? "–" : Number(x).toLocaleString("en-US")),
  ms: (x) => (x === null || x === undefined ? "–" : `${Number(x).toFixed(3)} ms`),
  num: (x) => {
    if (x === null || x === undefined) return "–";
    if (typeof x !== "number") return typeof x === "object" ? JSON.stringify(x) : String(x);
    return Number.isInteger(x) ? x.toLocaleString("en-US") : String(Number(x.toPrecision(4)));
  },
  bytes: (n) => {
    if (n === null || n === undefined) return "–";
    const units = ["B", "kB", "MB", "GB"];
    let i = 0;
    while (n >= 1000 && i < units.length - 1) { n /= 1000; i++; }
    return `${i ? n.toFixed(1) : n} ${units[i]}`;
  },
  time: (iso) => (iso ? new Date(iso).toLocaleString() : "–"),
  eta: (s) => (s === null || s === undefined ? "" : s < 90 ? `ETA ${Math.round(s)} s` : `ETA ${Math.round(s / 60)} min`),
  ratio: (before, after) => (before ? `${(100 * after / before).toFixed(1)}% kept` : ""),
  short: (id) => (id ? id.slice(0, 8) : "–"),
};

function statusBadge(status) {
  return h("span", { class: `status ${status}`, "data-status": status, text: status });
}

function showError(message) {
  const box = document.getElementById("error");
  box.textContent = message;
  box.hidden = !message;
}

// ---------------------------------------------------------------------------------------
// The API

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

function apiKey() { return sessionStorage.getItem(KEY_ITEM); }

async function request(path, { method = "GET", json, form, signal } = {}) {
  const headers = { Authorization: `Bearer ${apiKey()}` };
  let body;
  if (json !== undefined) { headers["Content-Type"] = "application/json"; body = JSON.stringify(json); }
  else if (form !== undefined) body = form;  // FormData: the browser writes the multipart boundary
  const response = await fetch(API + path, {
    method, headers, body, signal, cache: "no-store", credentials: "omit", referrerPolicy: "no-referrer",
  });
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try {
      const err = await response.json();
      message = err.detail || message;
      if (Array.isArray(err.errors) && err.errors.length && !message.includes(err.errors[0].msg)) {
        message += ": " + err.errors.map((e) => `${e.loc.join(".")}: ${e.msg}`).join("; ");
      }
    } catch (_) { /* not JSON: keep the status line */ }
    if (response.status === 401) signOut(`The API refused this key: ${message}`);
    throw new ApiError(response.status, message);
  }
  return response;
}

async function api(path, options) {
  const response = await request(path, options);
  return response.status === 204 ? null : response.json();
}

// A download with the key in a header: fetch the bytes, then hand the browser a blob URL.
async function download(path, filename) {
  const blob = await (await request(path)).blob();
  const url = URL.createObjectURL(blob);
  const link = h("a", { href: url, download: filename, hidden: true });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
}

// ---------------------------------------------------------------------------------------
// Views: each render gets `life` to register timers and aborts, undone when the route changes.

class Life {
  constructor() { this.undo = []; this.alive = true; this.controller = new AbortController(); }
  every(ms, fn) {
    // Not setInterval: a slow answer must not pile up overlapping requests.
    let timer;
    const tick = async () => { await fn(); if (this.alive) timer = setTimeout(tick, ms); };
    timer = setTimeout(tick, ms);
    this.undo.push(() => clearTimeout(timer));
  }
  get signal() { return this.controller.signal; }  // aborts the view's requests on leaving
  end() { this.alive = false; this.controller.abort(); for (const fn of this.undo.splice(0)) fn(); }
}

let life = new Life();

async function route() {
  life.end();
  life = new Life();
  showError("");
  const view = document.getElementById("view");
  view.replaceChildren();
  if (!apiKey()) return showSignIn();
  const [section, id] = location.hash.replace(/^#\/?/, "").split("/");
  for (const link of document.querySelectorAll("#nav a[data-section]")) {
    link.classList.toggle("active", link.dataset.section === (section || "jobs"));
  }
  const views = { jobs: id ? jobView : jobsView, sweeps: id ? sweepView : sweepsView,
                  models: modelsView, datasets: datasetsView };
  const render = views[section] || jobsView;
  try {
    await render(view, life, id);
  } catch (err) {
    if (life.alive) showError(err.message);
  }
}

function guard(fn) {
  // Polls and buttons: an error shows in the banner instead of vanishing in the console.
  return async (...args) => {
    try { await fn(...args); } catch (err) { if (err.name !== "AbortError") showError(err.message); }
  };
}

// ---------------------------------------------------------------------------------------
// Sign in

function showSignIn(message) {
  document.getElementById("signin").hidden = false;
  document.getElementById("nav").hidden = true;
  document.getElementById("signout").hidden = true;
  document.getElementById("who").textContent = "";
  if (message) showError(message);
  document.getElementById("api-key").focus();
}

function signOut(message) {
  sessionStorage.removeItem(KEY_ITEM);
  life.end();
  document.getElementById("view").replaceChildren();
  showSignIn(message);
}

async function signedIn() {
  const me = await api("users/me");
  document.getElementById("signin").hidden = true;
  document.getElementById("nav").hidden = false;
  document.getElementById("signout").hidden = false;
  document.getElementById("who").textContent = `signed in as ${me.name}${me.is_admin ? " (admin)" : ""}`;
}

async function onSignIn(event) {
  event.preventDefault();  // never a real form submission: the key must not travel as a form
  const input = document.getElementById("api-key");
  sessionStorage.setItem(KEY_ITEM, input.value.trim());
  input.value = "";
  try {
    await signedIn();
    showError("");
    if (!location.hash) location.hash = "#/jobs"; else route();
  } catch (err) {
    if (err.status !== 401) { sessionStorage.removeItem(KEY_ITEM); showSignIn(err.message); }
  }
}

// ---------------------------------------------------------------------------------------
// Shared pieces

async function listAll(path) { return (await api(`${path}?limit=200`)).items; }

function options(items, label, empty) {
  if (!items.length) return [h("option", { value: "", text: empty })];
  return items.map((item) => h("option", { value: item.id, text: label(item) }));
}

function jsonField(text, what) {
  if (!text.trim()) return {};
  try {
    const value = JSON.parse(text);
    if (value && typeof value === "object" && !Array.isArray(value)) return value;
  } catch (_) { /* below */ }
  throw new Error(`${what} must be a JSON object, e.g. {"retrain": {"epochs": 2}}`);
}

function progressCell(job) {
  const bar = h("progress", { max: 1, value: job.progress, "aria-label": "progress" });
  const detail = FINAL.has(job.status) ? job.phase
    : `${job.phase} ${fmt.pct(job.progress)}${job.eta_s !== null ? " · " + fmt.eta(job.eta_s) : ""}`;
  return h("td", { class: "progress-cell" }, bar, h("small", { text: detail }));
}

function submitButton(form, label) {
  // Disabled while the request runs: a double click must not send two uploads.
  const button = h("button", { type: "submit", text: label });
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    button.disabled = true;
    try { await form.onsend(); showError(""); } catch (err) { showError(err.message); }
    finally { button.disabled = false; }
  });
  return button;
}

function describeConfig(cfg) {
  const method = cfg.method || "mipp";
  if (cfg.target !== null && cfg.target !== undefined) return `${method} · target ${fmt.pct(cfg.target)}`;
  return method === "mipp" ? `${method} · tol ${cfg.tol}` : method;
}

// ---------------------------------------------------------------------------------------
// Jobs

async function jobsView(view, life) {
  const [models, datasets] = await Promise.all([listAll("models"), listAll("datasets")]);
  const names = new Map([...models, ...datasets].map((x) => [x.id, x.name]));
  const form = h("form", { class: "grid", id: "job-form" },
    h("label", {}, "Model", h("select", { name: "model_id", required: true }, options(models, (m) => `${m.name} (${m.arch})`, "upload a model first"))),
    h("label", {}, "Dataset", h("select", { name: "dataset_id", required: true }, options(datasets, (d) => d.name, "add a dataset first"))),
    h("label", {}, "Method", h("select", { name: "method" }, config.methods.map((m) => h("option", { value: m, text: m })))),
    h("label", {}, "Target (fraction of units to remove; empty: MIPP's tol decides)", h("input", { name: "target", type: "number", min: 0.01, max: 0.99, step: 0.01, placeholder: "e.g. 0.5" })),
    h("label", {}, "tol (MIPP, without a target)", h("input", { name: "tol", type: "number", min: 0, step: "any", value: "0.05" })),
    h("label", {}, "Retrain epochs", h("input", { name: "epochs", type: "number", min: 0, value: "1" })),
    h("label", {}, "Device", h("input", { name: "device", value: "auto" })),
    h("label", { class: "wide" }, "More settings (JSON, merged into the job's config)", h("textarea", { name: "extra", placeholder: '{"calibration_samples": 2048, "reconstructor": {"epochs": 20}}' })),
  );
  form.onsend = async () => {
    const f = form.elements;
    const cfg = { method: f.method.value, device: f.device.value || "auto",
                  retrain: { epochs: Number(f.epochs.value || 0) } };
    if (f.target.value) cfg.target = Number(f.target.value);
    else if (f.method.value === "mipp" && f.tol.value) cfg.tol = Number(f.tol.value);
    const extra = jsonField(f.extra.value, "More settings");
    if (extra.retrain) extra.retrain = { ...cfg.retrain, ...extra.retrain };
    const job = await api("jobs", { method: "POST", json: { model_id: f.model_id.value, dataset_id: f.dataset_id.value, config: { ...cfg, ...extra } } });
    location.hash = `#/jobs/${job.id}`;
  };
  form.append(h("div", { class: "actions" }, submitButton(form, "Submit job")));

  const tbody = h("tbody");
  const total = h("span", { class: "notice" });
  view.append(
    h("section", { class: "card" }, h("div", { class: "title-line" }, h("h1", { text: "Jobs" }), total),
      h("div", { class: "scroll" }, h("table", { id: "jobs-table" },
        h("thead", {}, h("tr", {}, ["Job", "Model", "Dataset", "Method", "Status", "Progress", "Created"].map((t) => h("th", { text: t })))),
        tbody))),
    h("section", { class: "card" }, h("h2", { text: "New job" }), form),
  );

  const refresh = guard(async () => {
    const page = await api("jobs?limit=50", { signal: life.signal });
    total.textContent = `${page.total} in all${page.total > page.items.length ? `, newest ${page.items.length} shown` : ""}`;
    tbody.replaceChildren(...page.items.map((job) => h("tr", { "data-job": job.id },
      h("td", {}, h("a", { href: `#/jobs/${job.id}`, class: "mono", text: fmt.short(job.id) })),
      h("td", { text: names.get(job.model_id) || fmt.short(job.model_id) }),
      h("td", { text: names.get(job.dataset_id) || fmt.short(job.dataset_id) }),
      h("td", { text: describeConfig(job.config) }),
      h("td", {}, statusBadge(job.status)),
      progressCell(job),
      h("td", { text: fmt.time(job.created_at) }),
    )));
    if (!page.items.length) tbody.append(h("tr", {}, h("td", { colspan: 7, class: "notice", text: "No jobs yet: submit one above." })));
  });
  await refresh();
  life.every(LIST_POLL_MS, refresh);
}

function unitsChart(layers) {
  // Per layer: a pale bar for the units before and a solid one for the units kept, to scale.
  const rowH = 26, labelW = 120, barW = 440, textW = 150;
  const max = Math.max(1, ...layers.map((l) => l.units_before));
  const height = layers.length * rowH + 8;
  const chart = svg("svg", { class: "chart", id: "units-chart", width: labelW + barW + textW, height,
                             viewBox: `0 0 ${labelW + barW + textW} ${height}`, role: "img",
                             "aria-label": "units per layer, before and after" });
  layers.forEach((layer, i) => {
    const y = 4 + i * rowH;
    const before = (barW * layer.units_before) / max, after = (barW * layer.units_after) / max;
    chart.append(svg("g", { "data-layer": layer.name },
      svg("text", { x: labelW - 8, y: y + 15, "text-anchor": "end", text: layer.name }),
      svg("rect", { class: "before", x: labelW, y: y + 2, width: before, height: rowH - 8, rx: 2 }),
      svg("rect", { class: "after", x: labelW, y: y + 2, width: after, height: rowH - 8, rx: 2 }),
      svg("text", { class: "label", x: labelW + barW + 8, y: y + 15, text: `${layer.units_before} → ${layer.units_after}` }),
    ));
  });
  return chart;
}

function metricsTable(metrics) {
  const acc = metrics.accuracy || {}, params = metrics.params || {}, macs = metrics.macs || {};
  const lat = metrics.latency_ms || {}, units = metrics.units || {};
  const row = (name, before, after, change) => h("tr", {},
    h("th", { text: name }), h("td", { class: "num", text: before }), h("td", { class: "num", text: after }),
    h("td", { class: "num", text: change || "" }));
  const pts = (a, b) => (a === undefined || b === undefined ? "" : `${(100 * (b - a)).toFixed(1)} points`);
  const rows = [
    row("accuracy (retrained)", fmt.pct(acc.dense), fmt.pct(acc.retrained), pts(acc.dense, acc.retrained)),
    row("accuracy after removal, before refit", fmt.pct(acc.dense), fmt.pct(acc.pruned_no_refit), pts(acc.dense, acc.pruned_no_refit)),
    row("accuracy after refit", fmt.pct(acc.dense), fmt.pct(acc.pruned), pts(acc.dense, acc.pruned)),
    row("parameters", fmt.int(params.before), fmt.int(params.after), fmt.ratio(params.before, params.after)),
    row("MACs per sample", fmt.int(macs.before), fmt.int(macs.after), fmt.ratio(macs.before, macs.after)),
    row(`latency (batch ${lat.batch_size ?? "?"})`, fmt.ms(lat.before), fmt.ms(lat.after), speedup(lat.before, lat.after)),
    row("units", fmt.int(units.before), fmt.int(units.after), units.removed_fraction !== undefined ? `${fmt.pct(units.removed_fraction)} removed` : ""),
  ];
  return h("table", { id: "metrics-table" },
    h("thead", {}, h("tr", {}, h("th", { text: "" }), h("th", { class: "num", text: "before" }), h("th", { class: "num", text: "after" }), h("th", { class: "num", text: "" }))),
    h("tbody", {}, rows));
}

function speedup(before, after) {
  if (!before || !after) return "";
  return before >= after ? `${(before / after).toFixed(2)}× faster` : `${(after / before).toFixed(2)}× slower`;
}

function miTable(layers) {
  // Whatever the engine reported per layer (layers[].details): one column per figure.
  const keys = [...new Set(layers.flatMap((l) => Object.keys(l.details || {})))];
  return h("table", { id: "mi-table" },
    h("thead", {}, h("tr", {}, h("th", { text: "layer" }), h("th", { class: "num", text: "units" }),
      keys.map((k) => h("th", { class: "num", text: k.replaceAll("_", " ") })))),
    h("tbody", {}, layers.map((l) => h("tr", {},
      h("td", { text: l.name }), h("td", { class: "num", text: `${l.units_before} → ${l.units_after}` }),
      keys.map((k) => h("td", { class: "num", text: fmt.num((l.details || {})[k]) }))))));
}

async function jobView(view, life, jobId) {
  let job = await api(`jobs/${jobId}`);
  const [model, dataset] = await Promise.all([
    job.model_id ? api(`models/${job.model_id}`).catch(() => null) : null,
    job.dataset_id ? api(`datasets/${job.dataset_id}`).catch(() => null) : null,
  ]);
  const badge = h("span");
  const cancel = h("button", { class: "danger", id: "cancel-job", type: "button", text: "Cancel",
    onclick: guard(async () => { cancel.disabled = true; job = await api(`jobs/${jobId}/cancel`, { method: "POST" }); paint(); }) });
  const bar = h("progress", { id: "job-progress", max: 1, value: 0 });
  const phase = h("div", { id: "job-phase", class: "sub" });
  const message = h("div", { class: "sub" });
  const results = h("section", { class: "card", id: "results", hidden: true });
  const layersBox = h("section", { class: "card", id: "layers", hidden: true });
  const artifactsBody = h("tbody");
  const logBox = h("pre", { class: "log", id: "job-log" });
  const facts = h("dl", { class: "facts" });

  view.append(
    h("div", { class: "title-line" }, h("h1", {}, "Job ", h("span", { class: "mono", text: job.id })), badge, cancel),
    h("section", { class: "card big-progress" }, bar, phase, message),
    results, layersBox,  // shown once the job has succeeded: the answer first
    h("div", { class: "row" },
      h("section", { class: "card" }, h("h2", { text: "Inputs" }), facts),
      h("section", { class: "card" }, h("h2", { text: "Downloads" }),
        h("table", { id: "artifacts" }, h("thead", {}, h("tr", {}, ["file", "size", "sha256", ""].map((t) => h("th", { text: t })))), artifactsBody))),
    h("section", { class: "card" }, h("h2", { text: "Log" }), logBox),
  );
  facts.append(
    h("dt", { text: "model" }), h("dd", { text: model ? `${model.name} (${model.arch})` : job.model_id || "deleted" }),
    h("dt", { text: "dataset" }), h("dd", { text: dataset ? dataset.name : job.dataset_id || "deleted" }),
    h("dt", { text: "method" }), h("dd", { text: describeConfig(job.config) }),
    h("dt", { text: "tol used" }), h("dd", { id: "job-tol" }),
    h("dt", { text: "created" }), h("dd", { text: fmt.time(job.created_at) }),
    h("dt", { text: "worker" }), h("dd", { id: "job-worker" }),
  );
  if (job.sweep_id) facts.append(h("dt", { text: "sweep" }), h("dd", {}, h("a", { href: `#/sweeps/${job.sweep_id}`, text: fmt.short(job.sweep_id) })));
  facts.append(h("dt", { text: "config" }), h("dd", {}, h("details", {}, h("summary", { text: "show" }), h("pre", { text: JSON.stringify(job.config, null, 2) }))));

  let shownFinal = false;
  function paint() {
    badge.replaceChildren(statusBadge(job.status));
    cancel.hidden = FINAL.has(job.status);
    cancel.disabled = job.cancel_requested;
    if (job.cancel_requested && !FINAL.has(job.status)) cancel.textContent = "Cancelling…";
    bar.value = job.progress;
    bar.setAttribute("data-progress", String(job.progress));
    phase.textContent = `${job.phase} · ${fmt.pct(job.progress)} of the job` +
      (FINAL.has(job.status) ? "" : ` · this phase ${fmt.pct(job.phase_progress)}${job.eta_s !== null ? " · " + fmt.eta(job.eta_s) : ""}`);
    message.textContent = job.error ? `error: ${job.error}` : job.message;
    document.getElementById("job-tol").textContent = job.tol ?? "–";
    document.getElementById("job-worker").textContent = job.worker || "–";
  }

  async function paintArtifacts() {
    const artifacts = await api(`jobs/${jobId}/artifacts`);
    artifactsBody.replaceChildren(...artifacts.map((a) => h("tr", { "data-artifact": a.name },
      h("td", { class: "mono", text: a.name }), h("td", { class: "num", text: fmt.bytes(a.size_bytes) }),
      h("td", { class: "mono", title: a.sha256, text: a.sha256.slice(0, 12) }),
      h("td", {}, h("button", { class: "secondary", type: "button", text: "Download",
        // redirect=false: the bytes come through the API even where the store presigns
        // downloads (a 307 to the store is another host: this page may not fetch it).
        onclick: guard(() => download(`jobs/${jobId}/artifacts/${encodeURIComponent(a.name)}?redirect=false`, a.name)) })))));
    if (!artifacts.length) artifactsBody.append(h("tr", {}, h("td", { colspan: 4, class: "notice", text: FINAL.has(job.status) ? "none" : "written when the job ends" })));
  }

  async function paintResults() {
    if (job.metrics) {
      results.replaceChildren(h("h2", { text: "Before and after" }), metricsTable(job.metrics));
      results.hidden = false;
    }
    const layers = await api(`jobs/${jobId}/layers`);
    if (layers.length) {
      layersBox.replaceChildren(
        h("h2", { text: "Units per layer" }),
        h("div", { class: "legend" }, h("span", {}, h("i", { class: "before" }), "before"), h("span", {}, h("i", { class: "after" }), "after")),
        h("div", { class: "scroll" }, unitsChart(layers)),
        h("h2", { text: "MI figures per layer" }),
        h("div", { class: "scroll" }, miTable(layers)));
      layersBox.hidden = false;
    }
  }

  async function followLog() {
    // follow=true keeps the response open until the job ends; chunks arrive as lines are written.
    const signal = life.signal;
    for (;;) {
      logBox.textContent = "";
      try {
        const response = await request(`jobs/${jobId}/log?follow=true`, { signal });
        const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          const atBottom = logBox.scrollTop + logBox.clientHeight >= logBox.scrollHeight - 4;
          logBox.append(value);
          if (atBottom) logBox.scrollTop = logBox.scrollHeight;
        }
      } catch (err) {
        if (err.name === "AbortError" || !life.alive) return;
      }
      // The stream ends when the job does; if it broke earlier, read it again.
      if (!life.alive) return;
      const now = await api(`jobs/${jobId}`).catch(() => job);
      if (FINAL.has(now.status)) return;
      await new Promise((resolve) => setTimeout(resolve, 2000));
      if (!life.alive) return;
    }
  }

  paint();
  await paintArtifacts();
  if (FINAL.has(job.status)) { shownFinal = true; await paintResults(); }
  followLog();
  life.every(JOB_POLL_MS, guard(async () => {
    if (shownFinal) return;
    job = await api(`jobs/${jobId}`, { signal: life.signal });
    paint();
    if (FINAL.has(job.status)) {
      shownFinal = true;
      await Promise.all([paintArtifacts(), paintResults()]);
    }
  }));
}

// ---------------------------------------------------------------------------------------
// Sweeps

function numberList(text, what) {
  const values = text.split(/[\s,]+/).filter(Boolean).map(Number);
  if (!values.length || values.some((v) => !Number.isFinite(v))) throw new Error(`${what}: give numbers separated by commas, e.g. 0.25, 0.5, 0.75`);
  return values;
}

async function sweepsView(view, life) {
  const [models, datasets] = await Promise.all([listAll("models"), listAll("datasets")]);
  const methods = h("fieldset", { class: "wide" }, h("legend", { text: "Methods" }),
    config.methods.map((m) => h("label", {}, h("input", { type: "checkbox", name: "methods", value: m, checked: m === "mipp" }), m)));
  const form = h("form", { class: "grid", id: "sweep-form" },
    h("label", {}, "Model", h("select", { name: "model_id", required: true }, options(models, (m) => `${m.name} (${m.arch})`, "upload a model first"))),
    h("label", {}, "Dataset", h("select", { name: "dataset_id", required: true }, options(datasets, (d) => d.name, "add a dataset first"))),
    h("label", {}, "Targets (fractions of units to remove)", h("input", { name: "targets", value: "0.25, 0.5, 0.75" })),
    h("label", {}, "Seeds", h("input", { name: "seeds", value: "0" })),
    h("label", {}, "Name (optional)", h("input", { name: "name", maxlength: 200 })),
    methods,
    h("label", { class: "wide" }, "Every other setting (JSON config)", h("textarea", { name: "extra", placeholder: '{"retrain": {"epochs": 2}, "device": "auto"}' })),
  );
  form.onsend = async () => {
    const f = form.elements;
    const chosen = [...form.querySelectorAll("input[name=methods]:checked")].map((c) => c.value);
    const body = { model_id: f.model_id.value, dataset_id: f.dataset_id.value, methods: chosen,
                   targets: numberList(f.targets.value, "Targets"), seeds: numberList(f.seeds.value, "Seeds"),
                   config: jsonField(f.extra.value, "Config") };
    if (f.name.value) body.name = f.name.value;
    const sweep = await api("sweeps", { method: "POST", json: body });
    location.hash = `#/sweeps/${sweep.id}`;
  };
  form.append(h("div", { class: "actions" }, submitButton(form, "Submit sweep")));
  const tbody = h("tbody");
  view.append(
    h("section", { class: "card" }, h("h1", { text: "Sweeps" }), h("table", { id: "sweeps-table" },
      h("thead", {}, h("tr", {}, ["Sweep", "Status", "Jobs", "Created"].map((t) => h("th", { text: t })))), tbody)),
    h("section", { class: "card" }, h("h2", { text: "New sweep: methods × targets × seeds" }), form),
  );
  const refresh = guard(async () => {
    const page = await api("sweeps?limit=50", { signal: life.signal });
    tbody.replaceChildren(...page.items.map((s) => h("tr", {},
      h("td", {}, h("a", { href: `#/sweeps/${s.id}`, text: s.name })),
      h("td", {}, statusBadge(s.status)),
      h("td", { text: Object.entries(s.counts).filter(([, n]) => n).map(([k, n]) => `${n} ${k}`).join(", ") }),
      h("td", { text: fmt.time(s.created_at) }))));
    if (!page.items.length) tbody.append(h("tr", {}, h("td", { colspan: 4, class: "notice", text: "No sweeps yet." })));
  });
  await refresh();
  life.every(LIST_POLL_MS, refresh);
}

async function sweepView(view, life, sweepId) {
  const badge = h("span");
  const counts = h("span", { class: "notice" });
  const title = h("span");
  const cancel = h("button", { class: "danger", type: "button", id: "cancel-sweep", text: "Cancel sweep",
    onclick: guard(async () => { cancel.disabled = true; await api(`sweeps/${sweepId}/cancel`, { method: "POST" }); await refresh(); }) });
  const plot = h("img", { class: "plot", id: "sweep-plot", alt: "accuracy against units removed, params and MACs" });
  const tbody = h("tbody");
  const heads = ["job", "method", "target", "tol", "seed", "status", "progress", "units removed",
                 "params after", "MACs after", "acc. pruned", "acc. refit", "acc. retrained"];
  view.append(
    h("div", { class: "title-line" }, h("h1", {}, "Sweep ", title), badge, counts, cancel),
    h("section", { class: "card" }, h("h2", { text: "Accuracy against units removed, params and MACs" }), plot),
    h("section", { class: "card scroll" }, h("table", { id: "sweep-rows" },
      h("thead", {}, h("tr", {}, heads.map((t) => h("th", { text: t })))), tbody)),
  );
  let plotKey = "";
  let plotUrl = null;
  life.undo.push(() => plotUrl && URL.revokeObjectURL(plotUrl));

  async function refresh() {
    const sweep = await api(`sweeps/${sweepId}`, { signal: life.signal });
    // The plot (an SVG the API draws) is fetched with the key, shown from a blob as an <img>:
    // no key in its URL, and no script in it can run. Fetched again only when a job ended,
    // and before the rest is painted, so a finished sweep never shows an older plot.
    const key = JSON.stringify(sweep.counts);
    if (key !== plotKey) {
      const path = sweep.plot_url.replace(/^.*\/api\/v1\//, "");
      const blob = await (await request(path, { signal: life.signal })).blob();
      if (plotUrl) URL.revokeObjectURL(plotUrl);
      plotUrl = URL.createObjectURL(blob);
      plot.src = plotUrl;
      plotKey = key;
    }
    title.textContent = sweep.name;
    badge.replaceChildren(statusBadge(sweep.status));
    counts.textContent = Object.entries(sweep.counts).filter(([, n]) => n).map(([k, n]) => `${n} ${k}`).join(", ");
    cancel.hidden = FINAL.has(sweep.status);
    tbody.replaceChildren(...sweep.rows.map((r) => h("tr", {},
      h("td", {}, h("a", { href: `#/jobs/${r.job_id}`, class: "mono", text: fmt.short(r.job_id) })),
      h("td", { text: r.method }), h("td", { class: "num", text: r.target ?? "–" }), h("td", { class: "num", text: r.tol === null ? "–" : fmt.num(r.tol) }),
      h("td", { class: "num", text: r.seed }), h("td", {}, statusBadge(r.status)),
      h("td", { class: "num", text: fmt.pct(r.progress) }), h("td", { class: "num", text: fmt.pct(r.units_removed_fraction) }),
      h("td", { class: "num", text: fmt.int(r.params_after) }), h("td", { class: "num", text: fmt.int(r.macs_after) }),
      h("td", { class: "num", text: fmt.pct(r.accuracy_pruned) }), h("td", { class: "num", text: fmt.pct(r.accuracy_refit) }),
      h("td", { class: "num", text: fmt.pct(r.accuracy_retrained) }))));
    return sweep;
  }
  let done = FINAL.has((await refresh()).status);
  life.every(LIST_POLL_MS, guard(async () => { if (!done) done = FINAL.has((await refresh()).status); }));
}

// ---------------------------------------------------------------------------------------
// Models and datasets

function deleteButton(path, what, refresh) {
  return h("button", { class: "danger", type: "button", text: "Delete",
    onclick: guard(async () => {
      if (!confirm(`Delete ${what}?`)) return;
      await api(path, { method: "DELETE" });
      await refresh();
    }) });
}

async function modelsView(view) {
  const codeFields = [
    h("label", {}, "Code (.py or .zip of a package)", h("input", { name: "code", type: "file", accept: ".py,.zip" })),
    h("label", {}, "Factory (module:function)", h("input", { name: "factory", placeholder: "mynet:build" })),
    h("label", {}, "Factory kwargs (JSON)", h("input", { name: "kwargs", value: "{}" })),
  ].map((f) => { f.hidden = true; return f; });
  const arch = h("select", { name: "arch", onchange: () => {
    const code = arch.value === "";
    codeFields.forEach((f) => { f.hidden = !code; });
    archConfig.hidden = code;
  } }, config.architectures.map((a) => h("option", { value: a, text: a })), h("option", { value: "", text: "your own code…" }));
  const archConfig = h("label", {}, "Architecture config (JSON)", h("input", { name: "config", value: "{}", placeholder: '{"widths": [64, 32]}' }));
  const form = h("form", { class: "grid", id: "model-form" },
    h("label", {}, "Weights (safetensors or state_dict .pt)", h("input", { name: "file", type: "file", required: true })),
    h("label", {}, "Architecture", arch), archConfig, ...codeFields,
    h("label", {}, "Input shape (JSON)", h("input", { name: "input_shape", placeholder: "[64] or [1, 28, 28]" })),
    h("label", {}, "Classes", h("input", { name: "num_classes", type: "number", min: 2 })),
    h("label", {}, "Format", h("select", { name: "format" }, h("option", { value: "", text: "from the file" }), config.model_formats.map((f) => h("option", { value: f, text: f })))),
    h("label", {}, "Name (optional)", h("input", { name: "name", maxlength: 200 })),
  );
  form.onsend = async () => {
    // Multipart exactly as POST /models takes it: empty fields are left out (server defaults).
    const data = new FormData();
    for (const input of form.elements) {
      if (!input.name || input.closest("[hidden]")) continue;
      if (input.type === "file") { if (input.files.length) data.append(input.name, input.files[0]); }
      else if (input.value.trim()) data.append(input.name, input.value.trim());
    }
    await api("models", { method: "POST", form: data });
    form.reset();
    arch.dispatchEvent(new Event("change"));
    await refresh();
  };
  form.append(h("div", { class: "actions" }, submitButton(form, "Upload model")));
  const tbody = h("tbody");
  view.append(
    h("section", { class: "card" }, h("h2", { text: "Upload a model" }), form),
    h("section", { class: "card scroll" }, h("h1", { text: "Models" }), h("table", { id: "models-table" },
      h("thead", {}, h("tr", {}, ["name", "architecture", "config", "input", "classes", "format", "size", "uploaded", ""].map((t) => h("th", { text: t })))), tbody)),
  );
  async function refresh() {
    const models = await listAll("models");
    tbody.replaceChildren(...models.map((m) => h("tr", { "data-model": m.id },
      h("td", { text: m.name }), h("td", { text: m.kind === "code" ? `code: ${m.arch}` : m.arch }),
      h("td", { class: "mono", text: JSON.stringify(m.kind === "code" ? m.factory_kwargs : m.arch_config) }),
      h("td", { class: "mono", text: m.input_shape ? JSON.stringify(m.input_shape) : "–" }),
      h("td", { class: "num", text: m.num_classes ?? "–" }), h("td", { text: m.format }),
      h("td", { class: "num", text: fmt.bytes(m.size_bytes) }), h("td", { text: fmt.time(m.created_at) }),
      h("td", {}, deleteButton(`models/${m.id}`, `model ${m.name}`, refresh)))));
    if (!models.length) tbody.append(h("tr", {}, h("td", { colspan: 9, class: "notice", text: "No models yet." })));
  }
  await refresh();
}

async function datasetsView(view) {
  const form = h("form", { class: "grid", id: "dataset-form" },
    h("label", {}, ".npz with x, y (and x_test, y_test)", h("input", { name: "file", type: "file", accept: ".npz", required: true })),
    h("label", {}, "Preprocessing", h("input", { name: "preprocessing", value: "none", list: "preprocessing-kinds" })),
    h("datalist", { id: "preprocessing-kinds" }, h("option", { value: "none" }), h("option", { value: "standardize" })),
    h("label", {}, "Name (optional)", h("input", { name: "name", maxlength: 200 })),
  );
  form.onsend = async () => {
    const data = new FormData();
    data.append("file", form.elements.file.files[0]);
    if (form.elements.preprocessing.value.trim()) data.append("preprocessing", form.elements.preprocessing.value.trim());
    if (form.elements.name.value.trim()) data.append("name", form.elements.name.value.trim());
    await api("datasets", { method: "POST", form: data });
    form.reset();
    await refresh();
  };
  form.append(h("div", { class: "actions" }, submitButton(form, "Upload dataset")));
  const builtin = h("form", { class: "grid", id: "builtin-form" },
    h("label", {}, "Built-in dataset", h("select", { name: "name" }, config.builtin_datasets.map((d) => h("option", { value: d, text: d })))),
    h("label", {}, "Display name (optional)", h("input", { name: "display_name", maxlength: 200 })));
  builtin.onsend = async () => {
    const body = { name: builtin.elements.name.value };
    if (builtin.elements.display_name.value.trim()) body.display_name = builtin.elements.display_name.value.trim();
    await api("datasets/builtin", { method: "POST", json: body });
    await refresh();
  };
  builtin.append(h("div", { class: "actions" }, submitButton(builtin, "Add built-in")));
  const tbody = h("tbody");
  view.append(
    h("div", { class: "row" },
      h("section", { class: "card" }, h("h2", { text: "Upload a dataset" }), form),
      h("section", { class: "card" }, h("h2", { text: "Or use a built-in one" }), builtin)),
    h("section", { class: "card scroll" }, h("h1", { text: "Datasets" }), h("table", { id: "datasets-table" },
      h("thead", {}, h("tr", {}, ["name", "kind", "train", "test", "input", "classes", "preprocessing", "size", "added", ""].map((t) => h("th", { text: t })))), tbody)),
  );
  async function refresh() {
    const datasets = await listAll("datasets");
    tbody.replaceChildren(...datasets.map((d) => {
      const s = d.summary || {};
      return h("tr", { "data-dataset": d.id },
        h("td", { text: d.name }), h("td", { text: d.builtin_name ? `built-in ${d.builtin_name}` : d.kind }),
        h("td", { class: "num", text: fmt.int(s.n_train) }), h("td", { class: "num", text: fmt.int(s.n_test) }),
        h("td", { class: "mono", text: s.input_shape ? JSON.stringify(s.input_shape) : "–" }),
        h("td", { class: "num", text: s.num_classes ?? "–" }),
        h("td", { text: d.preprocessing ? d.preprocessing.kind : "–" }),
        h("td", { class: "num", text: fmt.bytes(d.size_bytes) }), h("td", { text: fmt.time(d.created_at) }),
        h("td", {}, deleteButton(`datasets/${d.id}`, `dataset ${d.name}`, refresh)));
    }));
    if (!datasets.length) tbody.append(h("tr", {}, h("td", { colspan: 10, class: "notice", text: "No datasets yet." })));
  }
  await refresh();
}

// ---------------------------------------------------------------------------------------
// Start

async function start() {
  document.getElementById("signin-form").addEventListener("submit", onSignIn);
  document.getElementById("signout").addEventListener("click", () => signOut(""));
  window.addEventListener("hashchange", route);
  config = await (await fetch("config.json", { cache: "no-store" })).json();
  if (apiKey()) {
    try { await signedIn(); } catch (err) { if (err.status !== 401) showError(err.message); return; }
  }
  route();
}

start();
