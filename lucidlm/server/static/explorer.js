// The explorer page of `lucid serve`: stream a completion or a chat reply token by token, each
// token coloured by its probability; hover a token for the alternatives the model weighed; the
// attention heatmap of a layer and head and the logit lens of the text so far.
//
// Tokens stream from the server's OpenAI endpoints with log-probabilities:
//   POST /v1/completions       {prompt, stream, logprobs: 5}           (legacy logprobs format)
//   POST /v1/chat/completions  {messages, stream, logprobs, top_logprobs: 5}
// and the pictures come from /explore/attention and /explore/lens (lucidlm/server/explorer.py).
// No libraries and nothing fetched from anywhere but this server.
"use strict";

const $ = id => document.getElementById(id);
const output = $("output"), tooltip = $("tooltip"), canvas = $("heatmap");
const TOP_K = 5;

const state = {
  info: null,          // GET /explore/info: model, n_layers, n_heads, max_tokens
  mode: "prompt",      // "prompt" (/v1/completions) or "chat" (/v1/chat/completions)
  prompt: "",          // prompt mode: the prompt of the last generation...
  completion: "",      // ...and the text generated for it so far
  messages: [],        // chat mode: the conversation so far
  tokens: [],          // every token shown: {token, logprob, top: [[token, logprob], ...] most likely first}
  controller: null,    // AbortController of the generation in progress
  subject: null,       // what the attention and lens panels show: {text} or {messages}
  attention: null,     // the last /explore/attention answer
  requests: {attention: 0, lens: 0},  // answers to superseded requests are dropped
};

// ----- small helpers -----

// Spaces as "␣" and control characters escaped, so " Paris" and "Paris" look different and no token is blank.
function visible(text) {
  return Array.from(text, ch => ch === " " ? "\u2423" : ch === "\n" ? "\\n" : ch === "\t" ? "\\t" :
    ch.charCodeAt(0) < 32 ? "\\x" + ch.charCodeAt(0).toString(16).padStart(2, "0") : ch).join("");
}
const short = (text, n = 12) => text.length > n ? text.slice(0, n - 1) + "\u2026" : text;
const percent = p => (100 * p).toFixed(1) + "%";

// Probability 0 -> red, 0.5 -> yellow, 1 -> green (the legend's .prob-bar uses the same stops).
const probabilityColour = p => `hsl(${Math.round(120 * Math.min(1, Math.max(0, p)))} 80% 82%)`;

function setStatus(message, isError = false) {
  const status = $("status");
  status.textContent = message;
  status.classList.toggle("error", isError);
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return (body.error && body.error.message) || body.detail || `HTTP ${response.status}`;
  } catch {
    return `HTTP ${response.status} ${response.statusText}`;
  }
}

// A server started with --api-key wants "Authorization: Bearer KEY" on every call; the page
// asks for the key once (when the server answers 401) and keeps it in this browser.
function headers() {
  const key = localStorage.getItem("lucidApiKey");
  const h = {"Content-Type": "application/json"};
  if (key) h["Authorization"] = `Bearer ${key}`;
  return h;
}

async function postJSON(path, body) {
  const response = await fetch(path, {method: "POST", headers: headers(), body: JSON.stringify(body)});
  if (!response.ok) throw new Error(await errorMessage(response));
  return response.json();
}

// Server-sent events: "data: {json}" lines, events separated by a blank line, the last one "data: [DONE]".
async function* sseEvents(response) {
  const reader = response.body.getReader(), decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer = (buffer + decoder.decode(value, {stream: true})).replace(/\r\n/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = event.split("\n").filter(line => line.startsWith("data:"))
                        .map(line => line.slice(5).trimStart()).join("\n");
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
  }
}

// One streamed chunk -> {text, tokens}, for either endpoint's logprobs format.
function readChunk(chunk, chat) {
  const choice = chunk.choices && chunk.choices[0];
  if (!choice) return {text: "", tokens: []};
  const logprobs = choice.logprobs;
  if (chat) {  // logprobs.content: [{token, logprob, top_logprobs: [{token, logprob}]}]
    const content = (logprobs && logprobs.content) || [];
    return {text: (choice.delta && choice.delta.content) || "",
            tokens: content.map(c => ({token: c.token, logprob: c.logprob,
                                       top: (c.top_logprobs || []).map(t => [t.token, t.logprob])}))};
  }
  // legacy: logprobs.tokens, token_logprobs, top_logprobs: [{token: logprob}] in parallel lists
  const tokens = !logprobs || !logprobs.tokens ? [] : logprobs.tokens.map((token, i) => ({
    token, logprob: logprobs.token_logprobs[i],
    top: Object.entries((logprobs.top_logprobs || [])[i] || {})}));
  return {text: choice.text || "", tokens};
}

// ----- streaming tokens -----

function appendTokens(target, text, tokens) {
  if (!tokens.length) {  // a chunk without logprobs: plain text
    if (text) target.append(text);
    return;
  }
  for (const t of tokens) {
    t.top.sort((a, b) => b[1] - a[1]);
    const span = document.createElement("span");
    span.className = "token";
    span.textContent = t.token.replace(/\n/g, "\u21b5\n");  // a visible mark where a line breaks
    span.dataset.index = state.tokens.length;
    span.style.background = probabilityColour(Math.exp(t.logprob));
    state.tokens.push(t);
    target.append(span);
  }
}

function addTurn(role) {
  const turn = document.createElement("span");
  turn.className = "turn " + role;
  const label = document.createElement("span");
  label.className = "role";
  label.textContent = role;
  const body = document.createElement("span");
  turn.append(label, body);
  output.append(turn);
  return body;
}

function setBusy(busy) {
  $("generate").disabled = busy;
  $("stop").disabled = !busy;
}

async function generate() {
  const text = $("input").value;
  if (!text.trim()) { setStatus("Type a prompt first.", true); return; }
  const chat = state.mode === "chat";
  const common = {stream: true,  // no "model": the server's own
                  max_tokens: Math.max(1, Number($("max-tokens").value) || 16),
                  temperature: Math.max(0, Number($("temperature").value) || 0)};
  let url, body, target;
  if (chat) {
    state.messages.push({role: "user", content: text});
    addTurn("user").textContent = text;
    target = addTurn("assistant");
    $("input").value = "";
    url = "/v1/chat/completions";
    body = {...common, messages: state.messages, logprobs: true, top_logprobs: TOP_K};
  } else {
    clearOutput();
    state.prompt = text;
    const prompt = document.createElement("span");
    prompt.className = "prompt";
    prompt.textContent = text;
    output.append(prompt);
    target = output;
    url = "/v1/completions";
    body = {...common, prompt: text, logprobs: TOP_K};
  }

  let reply = "", count = 0, failed = false;
  const started = performance.now();
  state.controller = new AbortController();
  setBusy(true);
  setStatus("generating…");
  try {
    const response = await fetch(url, {method: "POST", headers: headers(), body: JSON.stringify(body),
                                       signal: state.controller.signal});
    if (!response.ok) throw new Error(await errorMessage(response));
    for await (const chunk of sseEvents(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      const {text: piece, tokens} = readChunk(chunk, chat);
      reply += piece;
      count += tokens.length;
      if (!chat) state.completion = reply;
      appendTokens(target, piece, tokens);
    }
    const seconds = (performance.now() - started) / 1000;
    setStatus(`${count} tokens in ${seconds.toFixed(1)} s`);
  } catch (e) {
    failed = true;
    setStatus(e.name === "AbortError" ? "stopped" : e.message, e.name !== "AbortError");
  } finally {
    state.controller = null;
    setBusy(false);
  }
  if (chat) {
    if (reply || !failed) state.messages.push({role: "assistant", content: reply});
    else state.messages.pop();  // nothing came back: forget the unanswered turn
  }
  if (reply) inspect();
}

function clearOutput() {
  output.replaceChildren();
  state.tokens = [];
  state.prompt = state.completion = "";
  hideTooltip();
}

function clearAll() {
  clearOutput();
  state.messages = [];
  state.subject = state.attention = null;
  canvas.width = canvas.height = 0;
  delete canvas.dataset.layer;
  delete canvas.dataset.head;
  $("lens").replaceChildren();
  $("heat-readout").textContent = "";
  setStatus("");
}

// ----- the alternatives tooltip -----

function showTooltip(span) {
  const t = state.tokens[Number(span.dataset.index)];
  const p = Math.exp(t.logprob);
  const head = document.createElement("div");
  head.className = "head";
  head.textContent = `"${visible(t.token)}"  p = ${percent(p)}`;
  const table = document.createElement("table");
  const rows = t.top.length ? t.top : [[t.token, t.logprob]];
  for (const [token, logprob] of rows) {
    const row = table.insertRow();
    row.className = token === t.token ? "chosen" : "";
    row.insertCell().textContent = visible(token);
    const bar = document.createElement("span");
    bar.className = "pbar";
    bar.style.width = `${Math.round(80 * Math.exp(logprob))}px`;
    row.insertCell().append(bar);
    const cell = row.insertCell();
    cell.className = "p";
    cell.textContent = percent(Math.exp(logprob));
  }
  tooltip.replaceChildren(head, table);
  if (t.top.length && !t.top.some(([token]) => token === t.token)) {
    const note = document.createElement("div");
    note.className = "note";
    note.textContent = `sampled outside the top ${t.top.length}`;
    tooltip.append(note);
  }
  tooltip.hidden = false;
  const box = span.getBoundingClientRect();
  const left = Math.min(box.left, document.documentElement.clientWidth - tooltip.offsetWidth - 8);
  tooltip.style.left = `${window.scrollX + Math.max(4, left)}px`;
  tooltip.style.top = `${window.scrollY + box.bottom + 6}px`;
}

function hideTooltip() { tooltip.hidden = true; }

output.addEventListener("mouseover", e => {
  const span = e.target.closest(".token");
  if (span) showTooltip(span);
});
output.addEventListener("mouseout", e => {
  const into = e.relatedTarget && e.relatedTarget.closest && e.relatedTarget.closest(".token");
  if (e.target.closest(".token") && !into) hideTooltip();
});

// ----- attention heatmap and logit lens of the text so far -----

function currentSubject() {
  if (state.mode === "chat") {
    if (state.messages.length) return {messages: state.messages};
    const text = $("input").value;
    return text.trim() ? {messages: [{role: "user", content: text}]} : null;
  }
  if (state.prompt) return {text: state.prompt + state.completion};
  return $("input").value ? {text: $("input").value} : null;
}

function inspect() {
  state.subject = currentSubject();
  if (!state.subject) { setStatus("Nothing to inspect yet: type a prompt.", true); return; }
  drawAttention();
  drawLens();
}

async function drawAttention() {
  if (!state.subject) return;
  const request = ++state.requests.attention;
  const head = $("head").value === "mean" ? "mean" : Number($("head").value);
  const readout = $("heat-readout");
  readout.textContent = "computing…";
  readout.classList.remove("error");
  try {
    const answer = await postJSON("/explore/attention", {...state.subject, layer: Number($("layer").value), head});
    if (request !== state.requests.attention) return;
    state.attention = answer;
    drawHeatmap(answer.tokens, answer.pattern);
    canvas.dataset.layer = answer.layer;
    canvas.dataset.head = answer.head;
    canvas.dataset.tokens = answer.tokens.length;
    readout.textContent = `${answer.tokens.length} tokens — hover the map for a weight`;
  } catch (e) {
    if (request !== state.requests.attention) return;
    readout.textContent = e.message;
    readout.classList.add("error");
  }
}

const heat = {cell: 0, left: 0, top: 0};  // the geometry of the drawn heatmap, for the hover readout

function drawHeatmap(tokens, pattern) {
  const T = tokens.length;
  const cell = Math.max(2, Math.min(24, Math.floor(720 / T)));
  const labelled = cell >= 9;
  const labels = tokens.map(t => short(visible(t)));
  let ctx = canvas.getContext("2d");
  ctx.font = "11px ui-monospace, monospace";
  const margin = labelled ? Math.ceil(Math.max(...labels.map(l => ctx.measureText(l).width))) + 8 : 0;
  canvas.width = margin + T * cell + 1;
  canvas.height = margin + T * cell + 1;
  ctx = canvas.getContext("2d");  // resizing resets the context's state
  ctx.fillStyle = "white";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  for (let q = 0; q < T; q++) {
    for (let k = 0; k < T; k++) {
      ctx.fillStyle = k > q ? "#f3f4f6" : `rgba(37, 99, 235, ${Math.min(1, Math.max(0, pattern[q][k]))})`;
      ctx.fillRect(margin + k * cell, margin + q * cell, cell - (cell > 4 ? 1 : 0), cell - (cell > 4 ? 1 : 0));
    }
  }
  if (labelled) {
    ctx.font = "11px ui-monospace, monospace";
    ctx.fillStyle = "#374151";
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    labels.forEach((label, q) => ctx.fillText(label, margin - 4, margin + q * cell + cell / 2));
    ctx.save();
    ctx.rotate(-Math.PI / 2);  // column labels read bottom to top
    ctx.textAlign = "left";
    labels.forEach((label, k) => ctx.fillText(label, -margin + 4, margin + k * cell + cell / 2));
    ctx.restore();
  }
  Object.assign(heat, {cell, left: margin, top: margin});
}

canvas.addEventListener("mousemove", e => {
  const a = state.attention;
  if (!a) return;
  const box = canvas.getBoundingClientRect();
  const k = Math.floor((e.clientX - box.left - heat.left) / heat.cell);
  const q = Math.floor((e.clientY - box.top - heat.top) / heat.cell);
  const T = a.tokens.length;
  if (q < 0 || k < 0 || q >= T || k >= T) return;
  $("heat-readout").textContent = k > q
    ? `"${visible(a.tokens[q])}" cannot see the later "${visible(a.tokens[k])}"`
    : `"${visible(a.tokens[q])}" (${q}) \u2192 "${visible(a.tokens[k])}" (${k}): ${a.pattern[q][k].toFixed(3)}`;
});

async function drawLens() {
  if (!state.subject) return;
  const request = ++state.requests.lens;
  const table = $("lens");
  try {
    const lens = await postJSON("/explore/lens", {...state.subject, k: TOP_K});
    if (request !== state.requests.lens) return;
    table.replaceChildren();
    const header = table.createTHead().insertRow();
    header.append(Object.assign(document.createElement("th"), {textContent: "layer \\ token"}));
    for (const p of lens.positions) {
      header.append(Object.assign(document.createElement("th"),
                                  {textContent: short(visible(lens.tokens[p]), 10), title: `position ${p}`}));
    }
    const body = table.createTBody();
    const L = lens.top_tokens.length;
    lens.top_tokens.forEach((row, layer) => {
      const tr = body.insertRow();
      if (layer === L - 1) tr.className = "final";
      const label = layer === L - 1 ? `${layer} (output)` : `${layer}`;
      tr.append(Object.assign(document.createElement("th"), {textContent: label}));
      row.forEach((cell, i) => {
        const td = tr.insertCell();
        const p = lens.top_probs[layer][i][0];
        td.textContent = short(visible(cell[0]), 10);
        td.style.background = probabilityColour(p);
        td.title = `after layer ${layer}, after "${visible(lens.tokens[lens.positions[i]])}":\n` +
                   cell.map((token, j) => `${visible(token)}  ${percent(lens.top_probs[layer][i][j])}`).join("\n");
      });
    });
  } catch (e) {
    if (request !== state.requests.lens) return;
    table.replaceChildren();
    const cell = table.insertRow().insertCell();
    cell.className = "error";
    cell.textContent = e.message;
  }
}

// ----- controls -----

function setMode(mode) {
  state.mode = mode;
  clearAll();
  $("generate").textContent = mode === "chat" ? "Send" : "Generate";
  $("input").placeholder = mode === "chat" ? "Type a message; Ctrl+Enter sends" : "Type a prompt; Ctrl+Enter generates";
}

document.querySelectorAll("input[name=mode]").forEach(radio =>
  radio.addEventListener("change", () => { if (radio.checked) setMode(radio.value); }));
$("generate").addEventListener("click", generate);
$("stop").addEventListener("click", () => state.controller && state.controller.abort());
$("inspect").addEventListener("click", inspect);
$("clear").addEventListener("click", clearAll);
$("input").addEventListener("keydown", e => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey) && !$("generate").disabled) { e.preventDefault(); generate(); }
});
$("layer").addEventListener("change", drawAttention);
$("head").addEventListener("change", drawAttention);

async function init() {
  try {
    let response = await fetch("/explore/info", {headers: headers()});
    if (response.status === 401) {
      const key = window.prompt("This server needs its API key (sent as a Bearer token, kept in this browser):");
      if (key) localStorage.setItem("lucidApiKey", key.trim());
      response = await fetch("/explore/info", {headers: headers()});
    }
    if (!response.ok) throw new Error(await errorMessage(response));
    state.info = await response.json();
  } catch (e) {
    $("model-info").textContent = `cannot reach the server: ${e.message}`;
    $("model-info").classList.add("error");
    return;
  }
  const info = state.info;
  $("model-info").textContent =
    `${info.model} · ${info.architecture} · ${info.n_layers} layers × ${info.n_heads} heads`;
  for (let l = 0; l < info.n_layers; l++) $("layer").add(new Option(`${l}`, l));
  $("head").add(new Option("mean of heads", "mean"));
  for (let h = 0; h < info.n_heads; h++) $("head").add(new Option(`${h}`, h));
  $("head").value = "0";
  document.body.dataset.ready = "true";
}
init();
