// Opta-LMX dashboard: reads the admin API, follows its event stream, and edits models.yaml
// through it. No framework, no build step. Every action previews its diff, then writes it
// guarded by the ETag the diff was computed on, then shows the loop converging on it.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "lmx-admin-key";
const state = { models: null, traffic: {}, pending: null, edit: null, logModel: "", drafts: {} };

// -- formatting -----------------------------------------------------------------------------
const MiB = 1024 * 1024, GiB = 1024 * MiB;
function size(bytes) {
  if (bytes === null || bytes === undefined) return "–";
  if (bytes >= GiB) return (bytes / GiB).toFixed(bytes >= 10 * GiB ? 1 : 2) + " GiB";
  return (bytes / MiB).toFixed(bytes >= 100 * MiB ? 0 : 1) + " MiB";
}
function ago(seconds) {
  if (seconds < 60) return Math.round(seconds) + " s ago";
  if (seconds < 3600) return Math.round(seconds / 60) + " min ago";
  return (seconds / 3600).toFixed(1) + " h ago";
}
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "style") Object.assign(node.style, v);  // CSSOM: allowed by the page's CSP
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== false && v !== null && v !== undefined) node.setAttribute(k, v === true ? "" : v);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

// -- the admin API --------------------------------------------------------------------------
function headers(extra = {}) {
  const key = sessionStorage.getItem(KEY_STORE);
  return key ? { ...extra, Authorization: "Bearer " + key } : extra;
}
let keyPrompt = null;
function askKey() {  // one prompt at a time, however many requests got 401
  if (!keyPrompt) {
    keyPrompt = new Promise((resolve) => {
      const dialog = $("key-dialog");
      dialog.addEventListener("close", () => {
        const key = $("key-input").value.trim();
        if (key) sessionStorage.setItem(KEY_STORE, key);
        keyPrompt = null;
        resolve();
      }, { once: true });
      dialog.showModal();
    });
  }
  return keyPrompt;
}
async function api(method, path, { body, etag, contentType = "application/json" } = {}) {
  for (let attempt = 0; ; attempt++) {
    const extra = body === undefined ? {} : { "Content-Type": contentType };
    if (etag) extra["If-Match"] = etag;
    const response = await fetch(path, {
      method, headers: headers(extra), body: body === undefined ? undefined : JSON.stringify(body),
      credentials: "same-origin", cache: "no-store",
    });
    if (response.status === 401 && attempt < 3) { sessionStorage.removeItem(KEY_STORE); await askKey(); continue; }
    return response;
  }
}
async function errorText(response) {
  try { const body = await response.json(); return body.error ? body.error.message : JSON.stringify(body); }
  catch { return response.status + " " + response.statusText; }
}

// -- reading: the model list, re-fetched on each event (debounced) ---------------------------
let refreshTimer = null, refreshing = false, refreshAgain = false;
function scheduleRefresh(delay = 150) {
  clearTimeout(refreshTimer);
  refreshTimer = setTimeout(refresh, delay);
}
async function refresh() {
  if (refreshing) { refreshAgain = true; return; }
  refreshing = true;
  try {
    const [models, traffic] = await Promise.all([api("GET", "/admin/models"), api("GET", "/admin/traffic")]);
    if (!models.ok) throw new Error(await errorText(models));
    state.models = await models.json();
    state.traffic = traffic.ok ? (await traffic.json()).models : {};
    $("page-error").hidden = true;
    render();
  } catch (error) {
    showError("Could not read the server: " + error.message);
  } finally {
    refreshing = false;
    if (refreshAgain) { refreshAgain = false; scheduleRefresh(); }
  }
}
function showError(text) { $("page-error").textContent = text; $("page-error").hidden = false; }

function spec(model) {  // the file leaves defaults out; show them
  const s = model.spec || {};
  return { state: s.state || "loaded", priority: s.priority ?? 0, pinned: !!s.pinned, aliases: s.aliases || [],
           idle_ttl: s.idle_ttl, inFile: !!model.spec };
}

function render() {
  const data = state.models;
  const stuck = data.models.filter((m) => m.spec && m.status && ["Failed", "Unschedulable"].includes(m.status.phase))
    .map((m) => `${m.name} is ${m.status.phase}`);
  const loop = $("loop");
  loop.textContent = "";
  loop.append(el("span", {}, "generation ", el("strong", {}, data.generation)),
    el("span", {}, " · observed ", el("strong", {}, data.observed_generation)), " ",
    el("span", { class: "badge " + (data.converged ? "ok" : stuck.length ? "bad" : "busy"), id: "converged" },
      data.converged ? "Converged" : stuck.length ? `Not converged: ${stuck.join(", ")}` : "Converging…"));
  const config = data.config || {};
  $("config-error").hidden = config.valid !== false;
  if (config.valid === false) {
    const error = config.error || {};
    $("config-error").textContent = "models.yaml was not accepted; the last good state stays in force: "
      + (error.message || JSON.stringify(error));
  }
  renderMemory(data);
  renderModels(data);
  renderPickers(data);
  trackPending(data);
}

function heldBytes(status) {
  if (!status || !["Ready", "Loading", "Draining", "Unloading"].includes(status.phase)) return 0;
  return status.counted_bytes || status.measured_bytes || status.estimated_bytes || 0;  // what the plan counts
}

function fastStartText(start) {
  if (!start || !start.mode) return null;
  if (start.yielded) return "fast starts yielded: " + start.yielded;
  if (start.mode === "cold") return "workers start cold";
  const what = start.mode === "template" ? "worker template" : `${start.spares} waiting spare(s)`;
  return `fast starts: ${what}, ${size(start.fixed_bytes)} counted (${size(start.measured_bytes)} measured)`;
}

function renderMemory(data) {
  const memory = (data.observed || {}).memory || {};
  const start = (data.observed || {}).engine_start || {};
  const physical = memory.physical_bytes || 1, reserve = memory.reserve_bytes || 0;
  const fixed = memory.fixed_bytes || 0, budget = memory.total_budget_bytes || memory.budget_bytes || 0;
  const bar = $("memory-bar");
  bar.textContent = "";
  let used = 0;
  if (fixed) {  // the fast starts' helpers: a fixed cost the plan takes off the budget first
    bar.append(el("span", { class: "seg fixed", style: { width: `${(100 * fixed / physical).toFixed(3)}%` },
      title: `fast starts (${start.mode}): ${size(fixed)}` }));
  }
  data.models.forEach((model, index) => {
    const bytes = heldBytes(model.status);
    if (!bytes) return;
    used += bytes;
    bar.append(el("span", { class: "seg c" + (index % 6), style: { width: `${(100 * bytes / physical).toFixed(3)}%` },
      title: `${model.name}: ${size(bytes)}` }));
  });
  bar.append(el("span", { class: "reserve", style: { width: `${(100 * reserve / physical).toFixed(3)}%` },
    title: `reserve ${size(reserve)}` }));
  bar.append(el("span", { class: "budget-mark", style: { left: `${(100 * budget / physical).toFixed(3)}%` },
    title: `budget ${size(budget)}` }));
  bar.setAttribute("aria-label", `models hold ${size(used)} of a ${size(budget)} budget; reserve ${size(reserve)}; machine ${size(physical)}`);
  const legend = $("memory-legend");
  legend.textContent = "";
  legend.append(el("span", {}, "models hold ", el("strong", { id: "memory-used" }, size(used))),
    el("span", {}, " of a budget of ", el("strong", {}, size(budget))),
    el("span", { class: "key-reserve" }, " reserve ", size(reserve)),
    el("span", {}, " · available now ", size(memory.available_bytes)),
    el("span", {}, " · machine ", size(memory.physical_bytes)));
  legend.append(...data.models.filter((m) => heldBytes(m.status)).map((m) =>
    el("span", { class: "chip c" + (data.models.indexOf(m) % 6) }, `${m.name} ${size(heldBytes(m.status))}`)));
  const startText = fastStartText(start);
  if (startText) legend.append(el("span", { id: "fast-starts", class: fixed ? "chip fixed" : "sub" }, startText));
}

function reasonOf(model, observed) {
  const status = model.status || {}, s = spec(model);
  if (!model.spec) return "not in models.yaml any more: being removed";
  if (status.phase === "Unschedulable") return "Unschedulable: " + (status.message || status.reason || "does not fit");
  if (status.phase === "Failed") return "Failed: " + (status.last_error || status.message || "unknown error");
  if (s.state === "on-demand") {
    const idle = (observed.idle_seconds || {})[model.name];
    const wanted = (observed.demand || []).includes(model.name);
    const last = idle === undefined ? (wanted ? "requested, coming up" : "no recent request")
      : idle === 0 ? "serving a request now" : "last request " + ago(idle);
    return `on demand (${last})` + (s.idle_ttl ? `, unloads after ${s.idle_ttl} idle` : "");
  }
  return status.message || status.last_error || "";
}

function share(fraction) {
  return fraction > 1 ? `${(fraction).toFixed(fraction >= 10 ? 0 : 1)}× the budget` : `${Math.max(1, Math.round(100 * fraction))}% of budget`;
}
function memoryCell(model, budget) {
  const status = model.status || {};
  const measured = status.measured_bytes, planned = status.counted_bytes || status.estimated_bytes;
  const scale = Math.max(budget || 0, measured || 0, planned || 0, 1);
  return el("td", { class: "mem" },
    el("div", { class: "mini", title: "measured (solid) and counted by the plan (outline) against the budget left for workers" },
      planned ? el("span", { class: "planned", style: { width: `${(100 * planned / scale).toFixed(2)}%` } }) : null,
      measured ? el("span", { class: "measured", style: { width: `${(100 * measured / scale).toFixed(2)}%` } }) : null),
    el("span", { class: "figures" }, size(measured), " / ", size(planned)),
    budget && (measured || planned) ? el("span", { class: "sub share" },
      " · " + share((measured || planned) / budget)) : null,
    cacheLine(status.prefix_cache));
}

function cacheLine(cache) {  // its kept prefix cache (docs/reconciler.md, "Kept prefix caches")
  if (!cache) return null;
  return el("div", { class: "sub cache", title: `kept prefix cache, key ${cache.key}` },
    `prefix cache ${size(cache.size_bytes) || "0 B"} · ${cache.entries} entries · ` +
    (cache.in_use ? "in use" : "used " + ago(cache.age_seconds)));
}

function renderModels(data) {
  const tbody = $("models").tBodies[0];
  const budget = ((data.observed || {}).memory || {}).budget_bytes;
  const focused = document.activeElement && document.activeElement.id;
  tbody.textContent = "";
  for (const model of data.models) {
    const s = spec(model), status = model.status || {}, phase = status.phase || "Pending";
    const traffic = state.traffic[model.name] || { in_flight: 0, queued: 0 };
    const priority = el("input", { type: "number", id: `priority-${model.name}`, step: 1, class: "priority",
      value: state.drafts[model.name] ?? s.priority, "aria-label": `priority of ${model.name}`,
      oninput: (e) => { state.drafts[model.name] = e.target.value; } });  // a re-render keeps what is typed
    const wantLoaded = s.state === "loaded";
    tbody.append(el("tr", { "data-model": model.name },
      el("th", { scope: "row" }, el("span", { class: "name" }, model.name),
        el("div", { class: "aliases" }, s.aliases.map((a) => el("span", { class: "chip" }, a)))),
      el("td", {}, el("span", { class: "desired", "data-desired": s.state }, s.inFile ? s.state : "(removed)"),
        el("div", { class: "sub" }, `priority ${s.priority}` + (s.pinned ? " · pinned" : ""))),
      el("td", {}, el("span", { class: "phase p-" + phase.toLowerCase() }, phase),
        status.host ? el("span", { class: "chip host", title: status.placement || "" }, "on " + status.host) : null,
        el("div", { class: "sub reason" }, reasonOf(model, data.observed || {}))),
      memoryCell(model, budget),
      el("td", { class: "num" }, `${traffic.in_flight} in flight`, el("div", { class: "sub" }, `${traffic.queued} queued`)),
      el("td", { class: "num" }, status.restarts || 0),
      el("td", { class: "actions" },
        s.inFile ? el("button", { type: "button", id: `${wantLoaded ? "unload" : "load"}-${model.name}`,
          onclick: () => previewEdit({ model: model.name, patch: { state: wantLoaded ? "unloaded" : "loaded" } }) },
          wantLoaded ? "Unload…" : "Load…") : null,
        s.inFile ? el("span", { class: "prio" }, priority, el("button", { type: "button", id: `set-priority-${model.name}`,
          onclick: () => previewEdit({ model: model.name, patch: { priority: Number(priority.value) } }) }, "Set…")) : null,
        el("button", { type: "button", class: "link", onclick: () => showLog(model.name) }, "Log"))));
  }
  if (focused && $(focused)) $(focused).focus();
}

function renderPickers(data) {
  const names = data.models.filter((m) => m.spec).map((m) => m.name);
  for (const select of [$("alias-to"), $("log-model")]) {
    const keep = select.value;
    select.textContent = "";
    if (select.id === "log-model") select.append(el("option", { value: "" }, "(choose)"));
    names.forEach((n) => select.append(el("option", { value: n }, n)));
    select.value = names.includes(keep) ? keep : (select.id === "log-model" ? state.logModel : names[0] || "");
  }
  const aliases = [...new Set(data.models.flatMap((m) => spec(m).aliases))];
  $("alias-list").textContent = "";
  aliases.forEach((a) => $("alias-list").append(el("option", { value: a })));
}

// -- events: a fetch stream (EventSource cannot send the admin key) ---------------------------
let lastEventId = 0;
async function followEvents() {
  for (let delay = 1000; ; delay = Math.min(delay * 2, 15000)) {
    try {
      const path = "/admin/events?follow=true&limit=100" + (lastEventId ? `&since=${lastEventId}` : "");
      const response = await api("GET", path);
      if (!response.ok) throw new Error(await errorText(response));
      $("stream").textContent = "live";
      $("stream").className = "stream on";
      scheduleRefresh(0);
      delay = 1000;
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          onMessage(buffer.slice(0, end));
          buffer = buffer.slice(end + 2);
        }
      }
      throw new Error("the event stream ended");
    } catch (error) {
      $("stream").textContent = `reconnecting (${error.message})`;
      $("stream").className = "stream off";
    }
    await new Promise((resolve) => setTimeout(resolve, delay));
  }
}
function onMessage(block) {
  const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
  if (!data) return;  // a keep-alive comment
  const event = JSON.parse(data);
  lastEventId = Math.max(lastEventId, event.seq);
  const list = $("events");
  const time = new Date(event.time * 1000).toLocaleTimeString();
  list.prepend(el("li", { class: event.kind === "Warning" ? "warning" : "" },
    el("time", {}, time), el("span", { class: "obj" }, event.object), el("span", { class: "reason" }, event.reason),
    el("span", { class: "msg" }, event.message)));
  while (list.children.length > 200) list.lastChild.remove();
  scheduleRefresh();
  if (state.logModel && event.object === state.logModel) showLog(state.logModel, true);
}

// -- the worker log tail ------------------------------------------------------------------------
async function showLog(name, quiet = false) {
  state.logModel = name;
  $("log-model").value = name;
  $("log-name").textContent = name ? `(${name}, last 200 lines)` : "";
  if (!name) { $("log").textContent = ""; return; }
  const response = await api("GET", `/admin/models/${encodeURIComponent(name)}/log?lines=200`);
  const text = response.ok ? await response.text() : await errorText(response);
  const log = $("log");
  log.textContent = text || "(empty)";
  log.scrollTop = log.scrollHeight;
  if (!quiet) log.focus();
}

// -- edits: preview (dry run) -> write with If-Match -> convergence ---------------------------------
function renderDiff(diff) {
  const pre = $("edit-diff");
  pre.textContent = "";
  if (!diff) { pre.append(el("span", { class: "same" }, "(no change: the file already says this)")); return; }
  for (const line of diff.split("\n")) {
    const cls = line.startsWith("+++") || line.startsWith("---") ? "file" : line.startsWith("+") ? "add"
      : line.startsWith("-") ? "del" : line.startsWith("@@") ? "hunk" : "ctx";
    pre.append(el("span", { class: cls }, line + "\n"));
  }
}
async function previewEdit(request) {
  state.edit = { request, etag: null };
  const dialog = $("edit-dialog");
  $("edit-summary").textContent = "Computing the diff…";
  $("edit-result").textContent = "";
  $("edit-result").className = "";
  $("edit-retry").hidden = true;
  $("edit-apply").hidden = false;
  $("edit-apply").disabled = true;
  renderDiff("");
  if (!dialog.open) dialog.showModal();
  const response = await api("POST", "/admin/preview", { body: request });
  if (!response.ok) {
    $("edit-summary").textContent = "This edit cannot be made: " + await errorText(response);
    return;
  }
  const preview = await response.json();
  state.edit.etag = preview.etag;
  $("edit-summary").textContent = `${preview.summary} — this diff will be written to models.yaml:`;
  renderDiff(preview.diff);
  $("edit-apply").disabled = false;
  $("edit-apply").focus();
}
async function applyEdit() {
  const { request, etag } = state.edit;
  $("edit-apply").disabled = true;
  const result = $("edit-result");
  result.className = "";
  result.textContent = request.alias ? `Loading ${request.to}, then moving the alias…` : "Writing…";
  const response = request.alias
    ? await api("POST", "/admin/models/swap?timeout=300", { etag, body: { alias: request.alias, to: request.to,
        unload_previous: !!request.unload_previous } })
    : await api("PATCH", `/admin/models/${encodeURIComponent(request.model)}`,
        { etag, body: request.patch, contentType: "application/merge-patch+json" });
  if (response.status === 412) {
    result.className = "conflict";
    result.textContent = "Conflict (412): models.yaml changed since this diff was computed, so nothing was "
      + "written. Preview the edit again on the fresh file, then write it.";
    $("edit-retry").hidden = false;
    $("edit-apply").hidden = true;
    $("edit-retry").focus();
    return;
  }
  const body = await response.json().catch(() => ({}));
  if (!response.ok && !body.generation) {
    result.className = "conflict";
    result.textContent = `Refused (${response.status}): ` + (body.error ? body.error.message : "");
    return;
  }
  if (request.model) delete state.drafts[request.model];
  state.pending = { name: request.alias ? request.to : request.model, generation: body.generation };
  result.textContent = `Written as generation ${body.generation}. Waiting for the loop to converge…`
    + (body.error ? ` (${body.error.message})` : "");
  $("edit-close").textContent = "Close";
  scheduleRefresh(0);
}
function trackPending(data) {
  const pending = state.pending;
  if (!pending) return;
  const model = data.models.find((m) => m.name === pending.name);
  const phase = model && model.status ? model.status.phase : "gone";
  const result = $("edit-result");
  if (data.observed_generation >= pending.generation && data.converged) {
    result.className = "done";
    result.textContent = `Generation ${pending.generation} converged: ${pending.name} is ${phase}.`;
    state.pending = null;
  } else if (["Failed", "Unschedulable"].includes(phase)) {
    result.className = "conflict";
    result.textContent = `Generation ${pending.generation} written, but ${pending.name} is ${phase}: ${reasonOf(model, data.observed || {})}`;
    state.pending = null;
  } else {
    result.textContent = `Generation ${pending.generation} written; observed ${data.observed_generation}; ${pending.name} is ${phase}…`;
  }
}

// -- wiring -------------------------------------------------------------------------------------
function start() {
  $("edit-apply").addEventListener("click", applyEdit);
  $("edit-retry").addEventListener("click", () => previewEdit(state.edit.request));
  $("edit-dialog").addEventListener("close", () => { $("edit-close").textContent = "Cancel"; });
  $("log-model").addEventListener("change", (e) => showLog(e.target.value));
  $("log-refresh").addEventListener("click", () => showLog($("log-model").value));
  $("alias-form").addEventListener("submit", (e) => {
    e.preventDefault();
    previewEdit({ alias: $("alias-name").value.trim(), to: $("alias-to").value, unload_previous: $("alias-unload").checked });
  });
  refresh();
  followEvents();
}
document.addEventListener("DOMContentLoaded", start);
