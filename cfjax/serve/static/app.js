// The cfjax explorer page: talks to the JSON API of cfjax/serve/app.py.
"use strict";
const $ = (id) => document.getElementById(id);
let state = { factual: null, counterfactual: null, interventional: [], edit: null };

// An error shows next to the control that caused it: the form's (#error), the abduction's, or
// the "more samples" button's; showing one clears the others.
function showError(message, where = "error") {
  ["error", "abduct-error", "more-error", "chat-error"].forEach((id) => { $(id).textContent = id === where ? message || "" : ""; });
}

// One readable sentence for a refused request (FastAPI's validation errors are a list).
function detailOf(data, response) {
  const detail = Array.isArray(data.detail) ? data.detail.map((d) => `${d.loc.slice(-1)[0]}: ${d.msg}`).join("; ") : data.detail;
  return detail || `request failed (${response.status})`;
}

// Busy state: every button disabled, an elapsed-time line, the panels being recomputed dimmed.
let busySince = null, busyTimer = null;
function busy(label, stale = []) {
  busySince = Date.now();
  document.querySelectorAll("button").forEach((b) => { if (b.id !== "close-picker") b.disabled = true; });
  stale.forEach((id) => $(id).classList.add("stale"));
  const tick = () => { $("busy").textContent = `${label}… ${((Date.now() - busySince) / 1000).toFixed(1)} s`; };
  $("busy").hidden = false; tick(); busyTimer = setInterval(tick, 200);
}
function idle() {
  clearInterval(busyTimer); $("busy").hidden = true;
  document.querySelectorAll("button").forEach((b) => { b.disabled = false; });
  document.querySelectorAll(".stale").forEach((el) => el.classList.remove("stale"));
}

async function api(path, body) {
  const response = await fetch(path, body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  });
  const data = await response.json().catch(() => ({ detail: response.statusText }));
  if (!response.ok) throw new Error(detailOf(data, response));
  return data;
}

function number(id) { const v = $(id).value; return v === "" ? null : Number(v); }

function sampler() {
  return { temperature: number("temperature") ?? 1, top_k: number("top_k"), top_p: number("top_p") };
}

function renderTokens(el, view, { clickable = false, chosen = null, pick = undefined } = {}) {
  el.textContent = "";
  if (!view) return;
  view.tokens.forEach((t) => {
    if (view.first_divergence === t.i && t.changed) {
      const mark = document.createElement("span");
      mark.className = "divergence"; mark.textContent = "▍"; mark.title = `first divergence at token ${t.i}`;
      el.appendChild(mark);
    }
    const span = document.createElement("span");
    span.className = "tok" + (t.changed ? " changed" : "") + (chosen === t.i ? " chosen" : "");
    span.textContent = t.text;
    span.title = `token ${t.i} (id ${t.id}): p = ${t.p.toFixed(3)}`;
    span.dataset.i = t.i;
    if (clickable) span.addEventListener("click", () => openPicker(t, view, pick));
    el.appendChild(span);
  });
}

function links(el, view, factual) {
  el.textContent = "";
  if (!view) return;
  const about = document.createElement("div"); about.className = "about"; about.textContent = view.about;
  el.appendChild(about);
  const json = document.createElement("a");
  json.href = `/api/traces/${view.id}.json`; json.textContent = "JSON trace"; json.download = `${view.id}.json`;
  el.appendChild(json);
  if (factual && factual.id !== view.id) {
    const diff = document.createElement("a");
    diff.href = `/api/diff.html?factual=${factual.id}&other=${view.id}`; diff.textContent = "HTML diff"; diff.target = "_blank";
    el.appendChild(diff);
  }
}

function render() {
  renderTokens($("factual"), state.factual, { clickable: true, chosen: state.edit });
  links($("factual-links"), state.factual);
  // Every panel's tokens can be edited: editing a counterfactual makes it the new factual (a chain).
  renderTokens($("counterfactual"), state.counterfactual, { clickable: true });
  links($("cf-links"), state.counterfactual, state.factual);
  const box = $("interventional"); box.textContent = "";
  state.interventional.forEach((view) => {
    const div = document.createElement("div"); div.className = "sample tokens";
    renderTokens(div, view, { clickable: true }); box.appendChild(div);
    const exports = document.createElement("div"); exports.className = "links";
    links(exports, view, state.factual); box.appendChild(exports);
  });
}

// The form shows the factual trace's own settings (after a reload too), so that
// "Counterfactual with these settings" changes only what the user changed.
function fillForm(settings) {
  if (!settings) return;
  $("prompt").value = settings.prompt ?? $("prompt").value;
  $("system").value = settings.system ?? "";
  if (settings.seed !== null && settings.seed !== undefined) $("seed").value = settings.seed;
  $("temperature").value = settings.temperature;
  $("top_k").value = settings.top_k ?? "";
  $("top_p").value = settings.top_p ?? "";
}

function apply(payload) {
  if (payload.factual && payload.factual.id !== state.factual?.id) fillForm(payload.factual.settings);
  if (payload.factual) state.factual = payload.factual;
  state.counterfactual = payload.counterfactual || null;
  state.interventional = payload.interventional || [];
  render();
  if (payload.abducted) renderAbducted(payload);
  if (payload.attribution) renderAttribution(payload.attribution);
  if (payload.conversation) renderChat(payload);
}

async function generate() {
  showError(""); busy("generating", ["factual"]);
  state = { factual: null, counterfactual: null, interventional: [], edit: null }; render();
  $("abducted").textContent = "";  // a new factual: the old abduction rows belong to another prompt
  const body = { prompt: $("prompt").value, system: $("system").value || null, seed: number("seed") ?? 0,
    max_new_tokens: number("max_new_tokens") ?? 48, stream: true, ...sampler() };
  try {
    const response = await fetch("/api/generate", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    if (!response.ok) { const data = await response.json().catch(() => ({})); throw new Error(detailOf(data, response)); }
    const reader = response.body.getReader(); const decoder = new TextDecoder(); let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let nl;
      while ((nl = buffer.indexOf("\n")) >= 0) {
        const line = JSON.parse(buffer.slice(0, nl)); buffer = buffer.slice(nl + 1);
        if (line.error) throw new Error(line.error);
        if (line.text !== undefined) $("factual").textContent += line.text;
        if (line.factual) apply(line);
      }
    }
  } catch (e) { showError(e.message); } finally { idle(); }
}

// `pick(edit)` applies the chosen replacement (default: a counterfactual of `base`).
async function openPicker(token, base, pick = (edit) => intervene(edit, 1, base)) {
  showError("");
  try {
    const data = await api(`/api/candidates?trace_id=${base.id}&position=${token.i}`);
    $("picker-title").textContent = `Replace token ${token.i} (${JSON.stringify(token.text)}, p = ${token.p.toFixed(3)}) by`;
    const box = $("candidates"); box.textContent = "";
    data.candidates.filter((c) => c.id !== data.factual).forEach((c) => {
      const b = document.createElement("button"); b.className = "candidate";
      b.textContent = `${JSON.stringify(c.text)}  p = ${c.p.toFixed(3)}`; b.dataset.id = c.id;
      b.addEventListener("click", () => pick({ position: token.i, token_id: c.id }));
      box.appendChild(b);
    });
    $("use-text").onclick = () => pick({ position: token.i, text: $("replacement").value });
    $("picker").hidden = false;
  } catch (e) { showError(e.message); }
}

async function intervene(edit, samples = 1, base = state.factual) {
  $("picker").hidden = true; showError(""); busy("computing the counterfactual", ["counterfactual", "interventional"]);
  try {
    apply(await api("/api/counterfactual", { trace_id: base.id, samples, seed: number("seed") ?? 0, ...edit }));
    state.edit = edit.position ?? null; state.lastEdit = edit; render();
  } catch (e) { showError(e.message); } finally { idle(); }
}

async function rerun() {
  if (!state.factual) { showError("generate a factual response first"); return; }
  // Only the fields that differ from the factual's settings: an unchanged prompt is no edit.
  const was = state.factual.settings, now = { prompt: $("prompt").value, system: $("system").value || null, ...sampler() };
  const edit = Object.fromEntries(Object.entries(now).filter(([k, v]) => (v ?? null) !== (was[k] ?? null)));
  if (Object.keys(edit).length === 0) { showError("nothing differs from the factual's settings: change the prompt, the system message or the sampler"); return; }
  await intervene(edit);
}

async function more() {
  if (!state.lastEdit) { showError("make a counterfactual first", "more-error"); return; }
  const seed = (number("seed") ?? 0) + state.interventional.length + 1;
  busy("sampling interventional worlds");
  try {
    const data = await api("/api/counterfactual", { trace_id: state.factual.id, samples: 4, seed, ...state.lastEdit });
    state.interventional = state.interventional.concat(data.interventional); render();
  } catch (e) { showError(e.message, "more-error"); } finally { idle(); }
}

function renderAbducted(payload) {
  // The observed text, the edit and the counts come back together (after a reload too).
  $("observed").value = payload.observed.text; $("old").value = payload.old; $("new").value = payload.new;
  const box = $("abducted"); box.textContent = "";
  const head = document.createElement("p");
  head.textContent = `${payload.abducted.length} distinct counterfactuals of ${payload.samples} posterior samples:`;
  box.appendChild(head);
  const about = document.createElement("div"); about.className = "about";
  about.textContent = `observed: ${payload.observed.about}`; box.appendChild(about);
  payload.abducted.forEach((a) => {
    const row = document.createElement("div"); row.className = "sample tokens abducted";
    const n = document.createElement("span"); n.className = "count"; n.textContent = `${a.count}x`;
    row.appendChild(n);
    const body = document.createElement("span"); renderTokens(body, a.trace); row.appendChild(body);
    const exports = document.createElement("div"); exports.className = "links";
    links(exports, a.trace, payload.observed); row.appendChild(exports);
    box.appendChild(row);
  });
}

async function abduct() {
  showError(""); busy("abducting the observed text", ["abducted"]);
  try {
    const data = await api("/api/abduct", { prompt: $("prompt").value, system: $("system").value || null,
      observed: $("observed").value, old: $("old").value, new: $("new").value,
      samples: number("samples") ?? 16, seed: number("seed") ?? 0, ...sampler() });
    renderAbducted(data);
  } catch (e) { showError(e.message, "abduct-error"); } finally { idle(); }
}

// Attribution: the prompt's words coloured by how far the answer moved without each.
function renderAttribution(a) {
  state.attribution = a;
  const box = $("attributed"); box.textContent = "";
  let at = 0;
  a.rows.forEach((row) => {
    box.appendChild(document.createTextNode(a.prompt.slice(at, row.span[0])));
    const w = document.createElement("span"); w.className = "word"; w.textContent = row.text;
    w.style.background = `rgba(216, 96, 0, ${row.distance.toFixed(3)})`;
    if (row.distance > 0.6) w.style.color = "#fff";
    const fresh = row.interventional_distance === null ? "" : `, fresh noise ${row.interventional_distance.toFixed(2)}`;
    w.title = `without ${JSON.stringify(row.text)}: distance ${row.distance.toFixed(2)}, ${Math.round(100 * row.kept_share)}% of the tokens kept${fresh}`;
    w.dataset.unit = row.unit;
    w.addEventListener("click", () => { state.counterfactual = row.trace; state.interventional = []; render(); });
    box.appendChild(w); at = row.span[1];
  });
  box.appendChild(document.createTextNode(a.prompt.slice(at)));
  $("attribution").hidden = false;
}

async function attributeWords() {
  if (!state.factual) { showError("generate a factual response first"); return; }
  showError(""); busy("attributing the prompt's words", ["attributed"]);
  try { apply(await api("/api/attribute", { trace_id: state.factual.id })); } catch (e) { showError(e.message); } finally { idle(); }
}

// Conversations: each turn's user message and answer; an answer's tokens open the picker, and
// the edit becomes the counterfactual conversation beside the factual one.
function renderTurns(el, conv, clickable) {
  el.textContent = "";
  if (!conv) return;
  if (conv.system) { const s = document.createElement("div"); s.className = "bubble system"; s.textContent = `system: ${conv.system}`; el.appendChild(s); }
  conv.turns.forEach((turn, k) => {
    const user = document.createElement("div"); user.className = "bubble user"; user.textContent = turn.user;
    if (clickable) {  // a user message can be edited: every answer from this turn on is replayed
      user.title = "click to edit this message"; user.classList.add("editable");
      user.addEventListener("click", () => {
        const text = window.prompt(`Edit user message ${k}; the answers from turn ${k} on are replayed with their noise`, turn.user);
        if (text !== null && text !== turn.user) editTurn(k, { prompt: text });
      });
    }
    const answer = document.createElement("div"); answer.className = "bubble assistant tokens"; answer.dataset.turn = k;
    renderTokens(answer, turn.assistant, clickable ? { clickable: true, pick: (edit) => editTurn(k, edit) } : {});
    el.appendChild(user); el.appendChild(answer);
  });
}

function renderChat(payload) {
  state.conversation = payload.conversation;
  renderTurns($("chat"), payload.conversation, true);
  renderTurns($("chat-cf"), payload.counterfactual_conversation || null, false);
}

async function converse() {
  const messages = $("chat-script").value.split("\n").map((m) => m.trim()).filter((m) => m);
  showError("", "chat-error"); busy("answering turn by turn", ["chat"]);
  try {
    renderChat(await api("/api/converse", { messages, system: $("system").value || null, seed: number("seed") ?? 0,
      max_new_tokens: Math.min(number("max_new_tokens") ?? 32, 64), ...sampler() }));
  } catch (e) { showError(e.message, "chat-error"); } finally { idle(); }
}

async function editTurn(turn, edit) {
  $("picker").hidden = true; showError("", "chat-error"); busy(`replaying from turn ${turn}`, ["chat-cf"]);
  try {
    renderChat(await api("/api/conversation/counterfactual", { conversation_id: state.conversation.id, turn, ...edit }));
  } catch (e) { showError(e.message, "chat-error"); } finally { idle(); }
}

$("attribute").addEventListener("click", attributeWords);
$("converse").addEventListener("click", converse);
$("generate").addEventListener("click", generate);
$("rerun").addEventListener("click", rerun);
$("more").addEventListener("click", more);
$("abduct").addEventListener("click", abduct);
$("close-picker").addEventListener("click", () => { $("picker").hidden = true; });
document.addEventListener("keydown", (e) => { if (e.key === "Escape") $("picker").hidden = true; });
api("/api/info").then((i) => { $("model").textContent = i.model; }).catch(() => {});
api("/api/state").then((s) => { if (s.view) apply(s.view); }).catch(() => {});
