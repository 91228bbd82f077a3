// llamaserve playground: chat over /v1/chat/completions and raw text over /v1/completions, both streamed
// (SSE). Talks only to the server that served it; conversations, settings and the key stay in this browser.
"use strict";

const STORE = { conversations: "llamaserve.conversations", current: "llamaserve.current",
                key: "llamaserve.apiKey", settings: "llamaserve.settings" };
const SAMPLING = ["temperature", "top_p", "top_k", "min_p", "max_tokens", "seed"];
const $ = (id) => document.getElementById(id);

const state = {
  config: { auth_required: false, defaults: {} },
  model: null,          // {id, max_model_len} once /v1/models answered
  conversations: [],
  currentId: null,
  busy: null,           // {controller, kind} while a request streams
};

// ---------- storage ----------

function load(name, fallback) {
  try {
    const text = localStorage.getItem(name);
    return text === null ? fallback : JSON.parse(text);
  } catch (e) {
    return fallback;
  }
}

function save(name, value) {
  try {
    localStorage.setItem(name, JSON.stringify(value));
  } catch (e) {
    showBanner(`Could not save in this browser's storage: ${e.message}`);
  }
}

function saveConversations() {
  save(STORE.conversations, state.conversations);
  save(STORE.current, state.currentId);
}

function newId() {
  return Date.now().toString(36) + Math.random().toString(36).slice(2, 8);
}

function current() {
  let conv = state.conversations.find((c) => c.id === state.currentId);
  if (!conv) {
    conv = { id: newId(), title: "", system: "", messages: [], updated: Date.now() };
    state.conversations.unshift(conv);
    state.currentId = conv.id;
  }
  return conv;
}

// ---------- HTTP ----------

function apiKey() {
  return localStorage.getItem(STORE.key) || "";
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = apiKey();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

class RequestFailed extends Error {}

// The one place a failed response becomes words: the server's own message, with what the status means.
async function failure(resp) {
  let message = "";
  try {
    const body = await resp.json();
    const err = body && body.error;
    message = typeof err === "string" ? err : (err && err.message) || JSON.stringify(body);
  } catch (e) {
    message = resp.statusText || "(no message)";
  }
  const s = resp.status;
  if (s === 400) return new RequestFailed(`The server refused the request (400): ${message}`);
  if (s === 401) {
    showKeyBox(true);
    return new RequestFailed(`Not authorized (401): ${message}. Enter the server's API key at the top.`);
  }
  if (s === 429) {
    const after = resp.headers.get("Retry-After");
    return new RequestFailed(`The server is busy (429): ${message}.` +
                             (after ? ` Retry after ${after} s.` : " Retry later."));
  }
  if (s === 503) return new RequestFailed(`The server is unavailable (503): ${message}`);
  return new RequestFailed(`The server answered ${s}: ${message}`);
}

function dropped(e) {
  return new RequestFailed(`The connection to the server was lost (${e.message}). Is it still running?`);
}

async function getJSON(path) {
  let resp;
  try {
    resp = await fetch(path, { headers: headers() });
  } catch (e) {
    throw dropped(e);
  }
  if (!resp.ok) throw await failure(resp);
  return resp.json();
}

// POST a streamed request and call onData for each SSE event's JSON; resolves when [DONE] arrives.
async function streamSSE(path, body, controller, onData) {
  let resp;
  try {
    resp = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(body),
                               signal: controller.signal });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw dropped(e);
  }
  if (!resp.ok) throw await failure(resp);
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    let chunk;
    try {
      chunk = await reader.read();
    } catch (e) {
      if (e.name === "AbortError") throw e;
      throw dropped(e);
    }
    if (chunk.done) throw new RequestFailed("The stream ended before the server finished the answer.");
    buffer += decoder.decode(chunk.value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        const obj = JSON.parse(data);
        if (obj.error) throw new RequestFailed(`The server stopped the answer: ${obj.error.message || obj.error}`);
        onData(obj);
      }
    }
  }
}

// ---------- settings ----------

function readSettings() {
  const s = {};
  for (const name of SAMPLING) s[name] = $(name).value;
  s.stop = $("stop").value;
  s.json_schema = $("json-schema").value;
  return s;
}

function writeSettings(s) {
  for (const name of SAMPLING) $(name).value = s[name] ?? "";
  $("stop").value = s.stop ?? "";
  $("json-schema").value = s.json_schema ?? "";
}

function defaultSettings() {
  const d = state.config.defaults || {};
  const s = {};
  for (const name of SAMPLING) s[name] = d[name] === null || d[name] === undefined ? "" : String(d[name]);
  s.stop = (d.stop || []).join("\n");
  s.json_schema = "";
  return s;
}

// The request fields the settings ask for; an empty box sends nothing (the server's default).
function samplingFields(kind) {
  const out = {};
  for (const name of SAMPLING) {
    const text = $(name).value.trim();
    if (text === "") continue;
    const value = Number(text);
    if (!Number.isFinite(value)) throw new RequestFailed(`${name} must be a number, got "${text}"`);
    out[name] = value;
  }
  const stop = $("stop").value.split("\n").filter((s) => s.length > 0);
  if (stop.length) out.stop = stop;
  const schema = $("json-schema").value.trim();
  if (schema && kind === "chat") {
    let parsed;
    try {
      parsed = JSON.parse(schema);
    } catch (e) {
      throw new RequestFailed(`The JSON schema box does not hold valid JSON: ${e.message}`);
    }
    out.response_format = { type: "json_schema", json_schema: { name: "playground", schema: parsed, strict: true } };
  }
  return out;
}

// ---------- rendering ----------

function markdown(text) {
  if (window.marked && window.DOMPurify) {
    return window.DOMPurify.sanitize(window.marked.parse(text, { gfm: true, breaks: false }));
  }
  const div = document.createElement("div");
  div.textContent = text; // the libraries did not load: plain text, never raw HTML
  return div.innerHTML;
}

function showBanner(text) {
  const b = $("banner");
  b.textContent = text;
  b.hidden = !text;
}

function showKeyBox(show) {
  $("key-box").hidden = !(show || state.config.auth_required);
}

function statsLine(el, st) {
  el.replaceChildren();
  if (!st) return;
  const add = (text, testid) => {
    const span = document.createElement("span");
    span.textContent = text;
    if (testid) span.dataset.testid = testid;
    el.appendChild(span);
    return span;
  };
  if (st.ttft_s !== undefined) add(`TTFT ${st.ttft_s.toFixed(2)} s`, "stat-ttft");
  if (st.tokens_per_s !== undefined) add(`${st.tokens_per_s.toFixed(1)} tokens/s`, "stat-speed");
  if (st.prompt_tokens !== undefined) {
    add(`prompt ${st.prompt_tokens} (cached ${st.cached_tokens ?? 0})`, "stat-prompt");
    add(`generated ${st.completion_tokens}`, "stat-generated");
  } else if (st.chunks !== undefined) {
    add(`received ${st.chunks} chunks`, "stat-generated");
  }
  if (st.stopped) add("stopped", "stat-stopped");
  if (st.note) add(st.note);
  const max = state.model && state.model.max_model_len;
  if (max && st.prompt_tokens !== undefined) {
    const used = st.prompt_tokens + st.completion_tokens;
    const ctx = add(`context ${used} / ${max} `, "stat-context");
    const bar = document.createElement("span");
    bar.className = "ctx";
    bar.title = `${((100 * used) / max).toFixed(1)}% of the context`;
    const fill = document.createElement("span");
    fill.style.width = `${Math.min(100, (100 * used) / max)}%`;
    bar.appendChild(fill);
    ctx.appendChild(bar);
  }
}

function messageElement(msg, index, conv) {
  const el = document.createElement("div");
  el.className = `msg ${msg.role}`;
  el.dataset.testid = msg.role === "user" ? "message-user" : "message-assistant";
  const role = document.createElement("div");
  role.className = "role";
  role.textContent = msg.role === "user" ? "You" : (state.model ? state.model.id : "assistant");
  const last = index === conv.messages.length - 1;
  const lastUser = msg.role === "user" && conv.messages.slice(index + 1).every((m) => m.role !== "user");
  if (!state.busy && msg.role === "assistant" && last) {
    role.appendChild(button("Regenerate", "regenerate", () => regenerate()));
  }
  if (!state.busy && lastUser) {
    role.appendChild(button("Edit", "edit", () => editLast(index)));
  }
  const body = document.createElement("div");
  body.className = "body";
  if (msg.role === "user") body.textContent = msg.content;
  else body.innerHTML = markdown(msg.content);
  el.append(role, body);
  if (msg.error) {
    const err = document.createElement("div");
    err.className = "error";
    err.dataset.testid = "message-error";
    err.textContent = msg.error;
    el.appendChild(err);
  }
  if (msg.role === "assistant") {
    const stats = document.createElement("div");
    stats.className = "stats";
    stats.dataset.testid = "stats";
    statsLine(stats, msg.stats);
    el.appendChild(stats);
  }
  return el;
}

function button(text, testid, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = text;
  b.dataset.testid = testid;
  b.addEventListener("click", onClick);
  return b;
}

function renderMessages() {
  const conv = current();
  const box = $("messages");
  box.replaceChildren(...conv.messages.map((m, i) => messageElement(m, i, conv)));
  box.scrollTop = box.scrollHeight;
}

function renderConversations() {
  const list = $("conversations");
  list.replaceChildren(...state.conversations.map((c) => {
    const li = document.createElement("li");
    li.dataset.testid = "conversation";
    if (c.id === state.currentId) li.className = "active";
    const title = button(c.title || "New chat", "conversation-title", () => select(c.id));
    title.className = "title";
    const del = button("\u00d7", "conversation-delete", () => remove(c.id));
    del.className = "delete";
    del.setAttribute("aria-label", `Delete ${c.title || "this chat"}`);
    li.append(title, del);
    return li;
  }));
}

function renderAll() {
  const conv = current();
  $("system-prompt").value = conv.system || "";
  renderConversations();
  renderMessages();
}

function setBusy(busy, kind) {
  state.busy = busy ? { controller: new AbortController(), kind } : null;
  $("send").disabled = !!busy;
  $("completion-send").disabled = !!busy;
  $("stop-button").disabled = !(busy && kind === "chat");
  $("completion-stop").disabled = !(busy && kind === "completion");
  return state.busy && state.busy.controller;
}

// ---------- chat ----------

async function send() {
  if (state.busy) return;
  const text = $("prompt").value;
  if (!text.trim()) return;
  const fields = checkedFields();
  if (!fields) return;
  const conv = current();
  conv.messages.push({ role: "user", content: text });
  if (!conv.title) conv.title = text.trim().slice(0, 48);
  $("prompt").value = "";
  await answer(conv, fields);
}

// The settings as request fields, or null (and the reason in the banner) when one is not valid.
function checkedFields() {
  try {
    return samplingFields("chat");
  } catch (e) {
    showBanner(e.message);
    return null;
  }
}

async function regenerate() {
  const conv = current();
  if (state.busy || !conv.messages.length || conv.messages[conv.messages.length - 1].role !== "assistant") return;
  const fields = checkedFields();
  if (!fields) return;
  conv.messages.pop();
  await answer(conv, fields);
}

function editLast(index) {
  const conv = current();
  if (state.busy) return;
  $("prompt").value = conv.messages[index].content;
  conv.messages.splice(index);
  saveConversations();
  renderMessages();
  $("prompt").focus();
}

async function answer(conv, fields) {
  const msg = { role: "assistant", content: "" };
  const body = {
    model: state.model ? state.model.id : undefined,
    messages: [
      ...(conv.system.trim() ? [{ role: "system", content: conv.system }] : []),
      ...conv.messages.filter((m) => !(m.role === "assistant" && m.error && !m.content))
        .map((m) => ({ role: m.role, content: m.content })),
    ],
    stream: true,
    stream_options: { include_usage: true },
    ...fields,
  };
  showBanner("");
  conv.messages.push(msg);
  conv.updated = Date.now();
  const controller = setBusy(true, "chat");
  renderConversations();
  renderMessages();
  const el = $("messages").lastElementChild;
  const bodyEl = el.querySelector(".body");
  const t0 = performance.now();
  let tFirst = null;
  let chunks = 0;
  let usage = null;
  let pending = false;
  const paint = () => {
    pending = false;
    bodyEl.innerHTML = markdown(msg.content);
    $("messages").scrollTop = $("messages").scrollHeight;
  };
  try {
    await streamSSE("/v1/chat/completions", body, controller, (obj) => {
      if (obj.usage) usage = obj.usage;
      const choice = obj.choices && obj.choices[0];
      const text = choice && choice.delta && choice.delta.content;
      if (text) {
        if (tFirst === null) tFirst = performance.now();
        chunks += 1;
        msg.content += text;
        if (!pending) {
          pending = true;
          requestAnimationFrame(paint);
        }
      }
      if (choice && choice.finish_reason === "length") msg.truncated = true;
    });
    msg.stats = stats(t0, tFirst, performance.now(), usage, chunks);
    if (msg.truncated) msg.stats.note = "max_tokens reached";
  } catch (e) {
    if (e.name === "AbortError") {
      msg.stats = { ...stats(t0, tFirst, performance.now(), null, chunks), stopped: true };
    } else {
      msg.error = e instanceof RequestFailed ? e.message : `Unexpected error: ${e.message}`;
      if (chunks) msg.stats = stats(t0, tFirst, performance.now(), null, chunks);
    }
  } finally {
    setBusy(false);
    conv.updated = Date.now();
    saveConversations();
    renderMessages();
  }
}

function stats(t0, tFirst, tEnd, usage, chunks) {
  const st = {};
  if (tFirst !== null) {
    st.ttft_s = (tFirst - t0) / 1000;
    const n = usage ? usage.completion_tokens : chunks;
    if (n > 1 && tEnd > tFirst) st.tokens_per_s = (n - 1) / ((tEnd - tFirst) / 1000);
  }
  if (usage) {
    st.prompt_tokens = usage.prompt_tokens;
    st.completion_tokens = usage.completion_tokens;
    st.cached_tokens = (usage.prompt_tokens_details && usage.prompt_tokens_details.cached_tokens) || 0;
  } else {
    st.chunks = chunks;
  }
  return st;
}

function stop() {
  if (state.busy) state.busy.controller.abort();
}

// ---------- raw completion ----------

async function complete() {
  if (state.busy) return;
  const out = $("completion-output");
  const statsEl = $("completion-stats");
  const prompt = $("completion-prompt").value;
  if (!prompt) return;
  let body;
  try {
    body = { model: state.model ? state.model.id : undefined, prompt, stream: true,
             stream_options: { include_usage: true }, ...samplingFields("completion") };
  } catch (e) {
    showBanner(e.message);
    return;
  }
  showBanner("");
  out.textContent = "";
  out.classList.remove("failed");
  statsLine(statsEl, null);
  const controller = setBusy(true, "completion");
  const t0 = performance.now();
  let tFirst = null;
  let chunks = 0;
  let usage = null;
  try {
    await streamSSE("/v1/completions", body, controller, (obj) => {
      if (obj.usage) usage = obj.usage;
      const text = obj.choices && obj.choices[0] && obj.choices[0].text;
      if (text) {
        if (tFirst === null) tFirst = performance.now();
        chunks += 1;
        out.textContent += text;
      }
    });
    statsLine(statsEl, stats(t0, tFirst, performance.now(), usage, chunks));
  } catch (e) {
    if (e.name === "AbortError") {
      statsLine(statsEl, { ...stats(t0, tFirst, performance.now(), null, chunks), stopped: true });
    } else {
      showBanner(e instanceof RequestFailed ? e.message : `Unexpected error: ${e.message}`);
    }
  } finally {
    setBusy(false);
  }
}

// ---------- conversations ----------

function select(id) {
  if (state.busy) return;
  state.currentId = id;
  saveConversations();
  renderAll();
  $("sidebar").classList.remove("open");
}

function remove(id) {
  if (state.busy && id === state.currentId) return;
  state.conversations = state.conversations.filter((c) => c.id !== id);
  if (state.currentId === id) state.currentId = state.conversations.length ? state.conversations[0].id : null;
  current();
  saveConversations();
  renderAll();
}

function exportAll() {
  const data = { format: "llamaserve-conversations", version: 1, conversations: state.conversations };
  const url = URL.createObjectURL(new Blob([JSON.stringify(data, null, 2)], { type: "application/json" }));
  const a = document.createElement("a");
  a.href = url;
  a.download = `llamaserve-conversations-${new Date().toISOString().slice(0, 10)}.json`;
  document.body.appendChild(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

// Accepts what exportAll writes (or a bare list of conversations); refuses anything else whole.
function parseImport(text) {
  const data = JSON.parse(text);
  const list = Array.isArray(data) ? data : data && data.conversations;
  if (!Array.isArray(list)) throw new Error("expected {\"conversations\": [...]} as Export writes it");
  return list.map((c, i) => {
    if (!c || !Array.isArray(c.messages)) throw new Error(`conversation ${i} has no "messages" list`);
    const messages = c.messages.map((m, j) => {
      if (!m || !["user", "assistant"].includes(m.role) || typeof m.content !== "string") {
        throw new Error(`conversation ${i}, message ${j}: needs a role "user" or "assistant" and a text content`);
      }
      const out = { role: m.role, content: m.content };
      if (typeof m.error === "string") out.error = m.error;
      if (m.stats && typeof m.stats === "object") out.stats = m.stats;
      return out;
    });
    return { id: newId(), title: String(c.title || "").slice(0, 80), system: String(c.system || ""),
             messages, updated: Number(c.updated) || Date.now() };
  });
}

async function importFile(file) {
  try {
    const imported = parseImport(await file.text());
    state.conversations = [...imported, ...state.conversations];
    if (imported.length) state.currentId = imported[0].id;
    saveConversations();
    renderAll();
    showBanner("");
  } catch (e) {
    showBanner(`Could not import ${file.name}: ${e.message}`);
  }
}

// ---------- start ----------

async function loadModel() {
  try {
    const models = await getJSON("/v1/models");
    const m = models.data[0];
    state.model = { id: m.id, max_model_len: m.max_model_len };
    $("model-name").textContent = m.id;
    $("model-ctx").textContent = m.max_model_len ? `context ${m.max_model_len} tokens` : "";
    showBanner("");
  } catch (e) {
    state.model = null;
    $("model-name").textContent = "not connected";
    $("model-ctx").textContent = "";
    showBanner(e.message);
  }
}

function wire() {
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    send();
  });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send();
    }
  });
  $("stop-button").addEventListener("click", stop);
  $("completion-stop").addEventListener("click", stop);
  $("completion-send").addEventListener("click", complete);
  $("new-chat").addEventListener("click", () => {
    if (state.busy) return;
    const empty = state.conversations.find((c) => !c.messages.length);
    state.currentId = empty ? empty.id : null;
    current();
    saveConversations();
    renderAll();
    $("prompt").focus();
  });
  $("system-prompt").addEventListener("input", () => {
    current().system = $("system-prompt").value;
    saveConversations();
  });
  for (const id of [...SAMPLING, "stop", "json-schema"]) {
    $(id).addEventListener("input", () => save(STORE.settings, readSettings()));
  }
  $("reset-settings").addEventListener("click", () => {
    writeSettings(defaultSettings());
    save(STORE.settings, readSettings());
  });
  $("export").addEventListener("click", exportAll);
  $("import-file").addEventListener("change", (e) => {
    const file = e.target.files[0];
    if (file) importFile(file);
    e.target.value = "";
  });
  $("save-key").addEventListener("click", () => {
    localStorage.setItem(STORE.key, $("api-key").value.trim());
    loadModel();
  });
  $("api-key").addEventListener("keydown", (e) => {
    if (e.key === "Enter") $("save-key").click();
  });
  $("open-sidebar").addEventListener("click", () => $("sidebar").classList.add("open"));
  $("close-sidebar").addEventListener("click", () => $("sidebar").classList.remove("open"));
  for (const [tab, view] of [["tab-chat", "chat-view"], ["tab-completion", "completion-view"]]) {
    $(tab).addEventListener("click", () => {
      for (const [t, v] of [["tab-chat", "chat-view"], ["tab-completion", "completion-view"]]) {
        $(t).setAttribute("aria-selected", String(t === tab));
        $(v).hidden = v !== view;
      }
    });
  }
}

async function start() {
  wire();
  state.conversations = load(STORE.conversations, []);
  if (!Array.isArray(state.conversations)) state.conversations = [];
  state.currentId = load(STORE.current, null);
  try {
    state.config = await getJSON("/ui/config.json");
  } catch (e) {
    showBanner(e.message);
  }
  writeSettings(load(STORE.settings, null) || defaultSettings());
  $("api-key").value = apiKey();
  showKeyBox(false);
  renderAll();
  await loadModel();
  renderMessages(); // the model's name in the role lines
  document.body.dataset.ready = "true";
}

document.addEventListener("DOMContentLoaded", start);
