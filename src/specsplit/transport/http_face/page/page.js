// The page: streams a completion through the public HTTP API and marks every token by how
// it came (the "specsplit.spans" extension of streamed chunks); polls GET /status for the
// server panel. Plain JS, no build step, no framework.
"use strict";

const $ = (id) => document.getElementById(id);
const KINDS = ["accepted", "correction", "bonus", "target"];
let controller = null;
let modelName = null;

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api_key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

function num(id) {
  const v = $(id).value.trim();
  return v === "" ? null : Number(v);
}

function fmt(x, digits = 2) {
  return x === null || x === undefined || Number.isNaN(x) ? "–" : x.toFixed(digits);
}

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + units[i];
}

function requestBody() {
  const body = {
    model: modelName,
    max_tokens: num("max_tokens"),
    temperature: num("temperature"),
    top_p: num("top_p"),
    top_k: num("top_k"),
    min_p: num("min_p"),
    stream: true,
  };
  const seed = num("seed");
  if (seed !== null) body.seed = seed;
  const stop = $("stop").value;
  if (stop) body.stop = [stop];
  const prompt = $("prompt").value;
  if ($("mode").value === "chat") body.messages = [{ role: "user", content: prompt }];
  else body.prompt = prompt;
  return body;
}

// ---- one generation ----

class Run {
  constructor() {
    this.t0 = performance.now();
    this.tFirst = null;
    this.counts = { accepted: 0, correction: 0, bonus: 0, target: 0 };
    this.drafters = {};
  }

  span(text, origin) {
    const kind = origin ? origin.split(":")[0] : "target";
    const el = document.createElement("span");
    el.className = "tok o-" + (KINDS.includes(kind) ? kind : "target");
    el.dataset.origin = origin || "";
    el.title = origin && origin.startsWith("accepted:")
      ? "draft token from " + origin.slice(9) + ", accepted by the target"
      : (origin || "unknown");
    el.textContent = text;
    $("output").appendChild(el);
    if (kind in this.counts) this.counts[kind] += 1;
    if (kind === "accepted") {
      const name = origin.slice(9);
      this.drafters[name] = (this.drafters[name] || 0) + 1;
    }
  }

  piece(ext) {
    if (this.tFirst === null) this.tFirst = performance.now();
    for (const s of ext.spans || []) this.span(s.text, s.origin);
    const secs = (performance.now() - this.t0) / 1000;
    this.show({
      tokens: ext.new_tokens,
      tps: ext.new_tokens / secs,
      acc: ext.proposed ? ext.accepted / ext.proposed : null,
      tau: ext.target_passes ? ext.new_tokens / ext.target_passes : null,
      ttft: (this.tFirst - this.t0) / 1000,
    });
  }

  finish(stats, reason) {
    this.show({
      tokens: stats.new_tokens,
      tps: stats.tokens_per_s,
      acc: stats.proposed ? stats.acceptance_rate : null,
      tau: stats.target_passes ? stats.mean_accepted_length : null,
      ttft: stats.time_to_first_token_s,
      finish: reason,
    });
  }

  show(s) {
    $("s_tokens").textContent = s.tokens ?? "–";
    $("s_tps").textContent = fmt(s.tps, 1);
    $("s_acc").textContent = s.acc === null ? "–" : fmt(s.acc * 100, 0) + "%";
    $("s_tau").textContent = fmt(s.tau);
    $("s_ttft").textContent = s.ttft === null ? "–" : fmt(s.ttft) + " s";
    if (s.finish) $("s_finish").textContent = s.finish;
    const c = this.counts;
    const per = Object.entries(this.drafters).map(([n, k]) => `${n}: ${k}`).join(", ");
    $("counts").textContent =
      `by origin: ${c.accepted} accepted${per ? " (" + per + ")" : ""}, ${c.correction} corrections, ` +
      `${c.bonus} bonus, ${c.target} target alone`;
  }
}

function showError(message) {
  const el = $("error");
  el.textContent = message;
  el.hidden = false;
}

function setRunning(running) {
  $("go").disabled = running;
  $("stop_btn").disabled = !running;
  $("state").textContent = running ? "streaming…" : "";
  document.body.dataset.state = running ? "streaming" : "idle";
}

async function generate(event) {
  event.preventDefault();
  if (controller) return;
  $("output").textContent = "";
  $("error").hidden = true;
  for (const id of ["s_tokens", "s_tps", "s_acc", "s_tau", "s_ttft", "s_finish"]) {
    $(id).textContent = "–";
  }
  $("counts").textContent = "";
  const run = new Run();
  const chat = $("mode").value === "chat";
  controller = new AbortController();
  setRunning(true);
  try {
    const resp = await fetch(chat ? "/v1/chat/completions" : "/v1/completions", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify(requestBody()),
      signal: controller.signal,
    });
    if (!resp.ok) {
      const err = await resp.json().catch(() => null);
      showError(`${resp.status}: ${err && err.error ? err.error.message : resp.statusText}`);
      return;
    }
    await readEvents(resp, (e) => onEvent(e, run));
  } catch (err) {
    if (err.name !== "AbortError") showError(String(err));
  } finally {
    controller = null;
    setRunning(false);
  }
}

function onEvent(e, run) {
  if (e.error) {
    showError(e.error.message);
    return;
  }
  const choice = e.choices && e.choices[0];
  if (!choice) return; // the usage-only chunk
  if (choice.finish_reason) {
    if (e.specsplit) run.finish(e.specsplit, choice.finish_reason);
  } else if (e.specsplit) {
    run.piece(e.specsplit);
  }
}

async function readEvents(resp, onEvent) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        onEvent(JSON.parse(data));
      }
    }
  }
}

// ---- the server panel ----

async function poll() {
  try {
    const resp = await fetch("/status", { headers: headers() });
    if (!resp.ok) {
      const err = await resp.json().catch(() => null);
      $("p_error").textContent = err && err.error ? err.error.message : resp.statusText;
      return;
    }
    $("p_error").textContent = "";
    panel(await resp.json());
  } catch (err) {
    $("p_error").textContent = "server unreachable";
  }
}

function panel(s) {
  $("p_sessions").textContent = `${s.sessions} / ${s.max_sessions}`;
  $("p_queue").textContent = s.queue_rounds;
  $("p_kv").textContent = bytes(s.kv_bytes) + (s.kv_budget_bytes ? " of " + bytes(s.kv_budget_bytes) : "");
  $("p_passes").textContent = s.passes;
  $("p_batch_mean").textContent = fmt(s.batch_size_mean);
  $("p_acc").textContent = s.acceptance_rate === null ? "–" : fmt(s.acceptance_rate * 100, 0) + "%";
  $("p_evictions").textContent = s.evictions;
  $("p_dropped").textContent = s.dropped_rounds;
  const refused = Object.entries(s.refused).map(([k, v]) => `${k} ${v}`).join(", ");
  $("p_refused").textContent = refused || "0";

  const bars = $("p_batches");
  bars.textContent = "";
  const sizes = Object.entries(s.batch_sizes);
  const most = Math.max(1, ...sizes.map(([, n]) => n));
  for (let size = 1; size <= s.max_batch; size++) {
    const n = s.batch_sizes[String(size)] || 0;
    const row = document.createElement("div");
    row.className = "bar";
    row.innerHTML = `<span>${size}</span><span><div class="fill"></div></span><span class="n"></span>`;
    row.querySelector(".fill").style.width = (100 * n / most) + "%";
    row.querySelector(".n").textContent = n;
    bars.appendChild(row);
  }

  const body = $("p_drafters").querySelector("tbody");
  body.textContent = "";
  for (const d of s.drafters) {
    const tr = document.createElement("tr");
    const acc = d.acceptance_rate === null ? "–" : fmt(d.acceptance_rate * 100, 0) + "%";
    for (const v of [d.drafter, d.requests, acc, fmt(d.mean_accepted_length)]) {
      const td = document.createElement("td");
      td.textContent = v;
      tr.appendChild(td);
    }
    body.appendChild(tr);
  }
}

async function init() {
  $("form").addEventListener("submit", generate);
  $("stop_btn").addEventListener("click", () => controller && controller.abort());
  try {
    const resp = await fetch("/v1/models", { headers: headers() });
    if (resp.ok) {
      const models = await resp.json();
      modelName = models.data[0].id;
    }
  } catch (err) { /* the panel says unreachable */ }
  $("model").textContent = modelName || "?";
  poll();
  setInterval(poll, 1000);
}

init();
