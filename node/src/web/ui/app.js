// The HiveMind dashboard: draws the node's snapshots (server-sent events from /ui/api/events)
// as SVG plots and lists, and streams chat answers from /v1/chat/completions.
"use strict";

const NS = "http://www.w3.org/2000/svg";
const $ = (sel) => document.querySelector(sel);

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  for (const c of children) e.append(c);
  return e;
}

function svg(tag, attrs = {}, ...children) {
  const e = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  for (const c of children) e.append(c);
  return e;
}

const short = (s, n = 12) => (s && s.length > n ? s.slice(0, n) + "…" : s || "");

// ---- tabs -------------------------------------------------------------------------------
for (const b of document.querySelectorAll("nav button")) {
  b.addEventListener("click", () => {
    document.querySelectorAll("nav button").forEach((x) => x.classList.remove("active"));
    document.querySelectorAll(".tab").forEach((x) => x.classList.remove("active"));
    b.classList.add("active");
    $("#" + b.dataset.tab).classList.add("active");
    if (b.dataset.tab === "chat") loadModels();
  });
}

// ---- plots ------------------------------------------------------------------------------
function networkGraph(node, peers) {
  const W = 420, H = 260, cx = W / 2, cy = H / 2, R = 95;
  const g = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "peers" });
  peers.forEach((p, i) => {
    const a = (2 * Math.PI * i) / Math.max(peers.length, 1) - Math.PI / 2;
    const x = cx + R * Math.cos(a), y = cy + R * Math.sin(a);
    const relayed = (p.links || []).some((l) => l.relayed);
    g.append(svg("line", { x1: cx, y1: cy, x2: x, y2: y, stroke: relayed ? "#d97706" : "#059669",
      "stroke-width": 2, "stroke-dasharray": relayed ? "5 4" : "" }));
    g.append(svg("circle", { cx: x, cy: y, r: 14, fill: p.penalties ? "#fecaca" : "#dbeafe",
      stroke: "#2563eb" }));
    const t = svg("text", { x, y: y + 28, "text-anchor": "middle", "font-size": 10, fill: "#374151" });
    t.textContent = short(p.peer_id, 10);
    g.append(t);
  });
  g.append(svg("circle", { cx, cy, r: 20, fill: "#fbbf24", stroke: "#92400e" }));
  const me = svg("text", { x: cx, y: cy + 4, "text-anchor": "middle", "font-size": 11 });
  me.textContent = "you";
  g.append(me);
  if (!peers.length) {
    const t = svg("text", { x: cx, y: H - 12, "text-anchor": "middle", "font-size": 12, fill: "#6b7280" });
    t.textContent = "no peers connected";
    g.append(t);
  }
  return g;
}

function barChart(values, labels, { color = "#d97706", height = 180, yLabel = "" } = {}) {
  const W = 640, H = height, L = 36, B = 22, T = 10;
  const g = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img" });
  const max = Math.max(1, ...values);
  const bw = (W - L - 10) / Math.max(values.length, 1);
  g.append(svg("line", { x1: L, y1: H - B, x2: W, y2: H - B, stroke: "#9ca3af" }));
  const top = svg("text", { x: L - 4, y: T + 8, "text-anchor": "end", "font-size": 10, fill: "#6b7280" });
  top.textContent = max;
  g.append(top);
  if (yLabel) {
    const yl = svg("text", { x: 4, y: T + 24, "font-size": 10, fill: "#6b7280" });
    yl.textContent = yLabel;
    g.append(yl);
  }
  values.forEach((v, i) => {
    const h = ((H - B - T) * v) / max;
    g.append(svg("rect", { x: L + i * bw + 2, y: H - B - h, width: Math.max(bw - 4, 1), height: h,
      fill: color, rx: 2 }));
    if (values.length <= 40 || i % Math.ceil(values.length / 40) === 0) {
      const t = svg("text", { x: L + i * bw + bw / 2, y: H - 8, "text-anchor": "middle",
        "font-size": 10, fill: "#374151" });
      t.textContent = labels[i];
      g.append(t);
    }
  });
  return g;
}

function lineChart(xs, ys, { color = "#2563eb", xLabel = "step", yLabel = "loss" } = {}) {
  const W = 640, H = 240, L = 48, B = 26, T = 10, R = 10;
  const g = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "loss curve" });
  if (!xs.length) return g;
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1);
  const y0 = Math.min(0, ...ys), y1 = Math.max(...ys, y0 + 1e-9);
  const px = (x) => L + ((W - L - R) * (x - x0)) / (x1 - x0);
  const py = (y) => H - B - ((H - B - T) * (y - y0)) / (y1 - y0);
  g.append(svg("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#9ca3af" }));
  g.append(svg("line", { x1: L, y1: T, x2: L, y2: H - B, stroke: "#9ca3af" }));
  for (const [v, y] of [[y1, py(y1)], [y0, py(y0)]]) {
    const t = svg("text", { x: L - 4, y: y + 4, "text-anchor": "end", "font-size": 10, fill: "#6b7280" });
    t.textContent = v.toFixed(3);
    g.append(t);
  }
  const xl = svg("text", { x: W - R, y: H - 6, "text-anchor": "end", "font-size": 10, fill: "#6b7280" });
  xl.textContent = `${xLabel} ${x1}`;
  g.append(xl);
  const yl = svg("text", { x: L + 4, y: T + 10, "font-size": 10, fill: "#6b7280" });
  yl.textContent = yLabel;
  g.append(yl);
  const pts = xs.map((x, i) => `${px(x).toFixed(1)},${py(ys[i]).toFixed(1)}`).join(" ");
  g.append(svg("polyline", { points: pts, fill: "none", stroke: color, "stroke-width": 2 }));
  return g;
}

// ---- drawing a snapshot -----------------------------------------------------------------
function draw(s) {
  const node = s.node;
  $("#peer-id").textContent = node ? node.peer_id : "(the node is not running)";
  // Network.
  const peers = s.peers || [];
  $("#net-graph").replaceChildren(networkGraph(node, peers));
  $("#peers").replaceChildren(...peers.map((p) => {
    const li = el("li", { class: "peer", "data-peer-id": p.peer_id }, el("code", {}, p.peer_id));
    for (const l of p.links || []) {
      li.append(el("span", { class: "pill " + (l.relayed ? "relayed" : "direct") },
        (l.relayed ? "relayed" : "direct") + (l.outbound ? " · dialled" : " · inbound")));
      li.append(el("code", { class: "muted" }, l.addr));
    }
    if (p.penalties) li.append(el("span", { class: "pill off" }, `${p.penalties} penalties`));
    return li;
  }));
  // Model.
  const dl = $("#model-info");
  dl.replaceChildren();
  if (node) {
    const c = node.adapter_config || {};
    const rows = [
      ["model id", short(node.model_id, 24)],
      ["base model", short(node.base_model_hash, 24)],
      ["LoRA", `r ${c.r}, alpha ${c.lora_alpha}`],
      ["modules", (c.target_modules || []).join(", ")],
      ["rule", node.rule || ""],
      ["listening", (node.listen_addrs || []).join("\n")],
    ];
    for (const [k, v] of rows) dl.append(el("dt", {}, k), el("dd", {}, el("code", {}, String(v))));
  }
  // Current round.
  const cur = s.current;
  const cr = $("#current-round");
  cr.replaceChildren();
  if (cur) {
    const n = cur.contributors.length;
    const prev = (s.rounds || []).slice(-1)[0];
    const target = Math.max(n, prev ? prev.contributors : 1, 1);
    cr.append(el("div", {}, `round ${cur.number}: ${n} adapter${n === 1 ? "" : "s"} announced`));
    const bar = el("div", { class: "bar" }, el("div", { style: `width:${(100 * n) / target}%` }));
    cr.append(bar);
    for (const t of cur.transfers || []) {
      const pct = t.total ? (100 * t.bytes) / t.total : 100;
      cr.append(el("div", { class: "transfer" },
        `fetching ${short(t.hash, 12)} from ${short(t.peer, 12)}: ${(t.bytes / 1048576).toFixed(1)} of `
        + `${(t.total / 1048576).toFixed(1)} MiB, ${(t.bytes_per_s / 1048576).toFixed(1)} MiB/s`),
        el("div", { class: "bar" }, el("div", { style: `width:${pct}%` })));
    }
    for (const a of cur.aggregating || []) {
      const secs = Math.max(0, (Date.now() - a.since_ms) / 1000).toFixed(0);
      cr.append(el("div", { class: "aggregating" },
        `aggregating round ${a.round}: ${a.inputs} inputs, ${secs} s` + (a.attempt > 1 ? `, try ${a.attempt}` : "")));
    }
    if (cur.inbox_waiting.length) {
      cr.append(el("div", { class: "muted" }, `waiting for the next round: ${cur.inbox_waiting.join(", ")}`));
    }
  }
  // Rounds.
  const rounds = s.rounds || [];
  const latest = rounds[rounds.length - 1];
  $("#latest-hash").textContent = latest ? latest.hash : "none yet";
  $("#latest").dataset.round = latest ? latest.number : "";
  const shown = rounds.slice(-40);
  $("#rounds-plot").replaceChildren(barChart(shown.map((r) => r.contributors),
    shown.map((r) => r.number), { yLabel: "inputs" }));
  $("#rounds-table tbody").replaceChildren(...rounds.slice().reverse().map((r) => el("tr",
    { "data-round": r.number },
    el("td", {}, r.version),
    el("td", {}, String(r.contributors)),
    el("td", {}, String(r.mine || 0)),
    el("td", { class: "rule" }, r.rule || "–"),
    el("td", {}, r.eval ? `${(100 * r.eval.exact_match).toFixed(1)}% of ${r.eval.items}` : "–"),
    el("td", {}, el("code", { class: "hash" }, r.hash)))));
  // This node's adapters.
  const mine = s.mine || [];
  if (mine.length) {
    $("#mine").replaceChildren(...mine.map((a) => el("li", { class: "own", "data-hash": a.hash },
      el("code", {}, short(a.hash, 16)),
      el("span", { class: "pill " + (a.committed_in ? "direct" : "relayed") },
        a.committed_in ? `in ${a.committed_in}` : `announced in round ${a.round}`))));
  }
  // Training.
  const t = s.training;
  if (t) {
    const last = t.steps[t.steps.length - 1];
    const state = t.running ? "running" : t.finished ? "finished" : "stopped";
    const info = el("div", {},
      el("div", {}, `${state}: ${last ? last.step : 0} of ${t.total_steps} steps on ${t.examples} examples`
        + (last ? `, loss ${last.loss.toFixed(4)}` : "") + ` → ${t.output}`),
      el("div", { class: "bar" }, el("div", { style: `width:${last ? (100 * last.step) / t.total_steps : 0}%` })));
    $("#training-info").replaceChildren(info);
    $("#loss-plot").replaceChildren(lineChart(t.steps.map((x) => x.step), t.steps.map((x) => x.loss)));
  }
  // Uploads.
  const u = s.uploads;
  $("#uploads-tab").hidden = !u;
  if (u) {
    $("#uploads-summary").textContent = `${u.total} uploads from ${u.users} users`;
    $("#uploads-plot").replaceChildren(barChart(u.newest.map((x) => x.uploads),
      u.newest.map((x) => short(x.user_id, 8)), { color: "#2563eb", height: 150, yLabel: "uploads" }));
    $("#uploads-table tbody").replaceChildren(...u.newest.map((x) => el("tr", {},
      el("td", {}, x.user_id), el("td", {}, String(x.uploads)), el("td", {}, x.uploaded_at),
      el("td", {}, String(x.training_samples)), el("td", {}, x.round == null ? "pending" : `round-${x.round}`))));
  }
}

function connect() {
  const es = new EventSource("api/events");
  es.addEventListener("state", (e) => {
    $("#live").className = "pill on";
    $("#live").textContent = "live";
    draw(JSON.parse(e.data));
  });
  es.onerror = async () => {
    $("#live").className = "pill off";
    $("#live").textContent = "reconnecting";
    // A node restarted (its sessions end) or given another key: ask for the key again.
    const r = await fetch("api/state").catch(() => null);
    if (r && r.status === 401) {
      es.close();
      showLogin(true);
    }
  };
}

// ---- chat -------------------------------------------------------------------------------
const history = [];

async function loadModels() {
  const sel = $("#chat-model");
  const keep = sel.value;
  const r = await fetch("/v1/models");
  if (r.status === 401) {
    showLogin(true);
    return;
  }
  const models = (await r.json()).data || [];
  sel.replaceChildren(...models.map((m) => el("option", { value: m.id, title: m.description || "" }, m.id)));
  const ids = models.map((m) => m.id);
  sel.value = ids.includes(keep) ? keep : ids.includes("round+personal") ? "round+personal"
    : ids.includes("round") ? "round" : ids[0] || "";
  // What the node says about the chosen model (a personal adapter that does not fit the round
  // under it, and the command that refits it), shown while it is chosen.
  const showNote = () => {
    const m = models.find((m) => m.id === sel.value);
    const note = $("#chat-model-note");
    note.textContent = (m && m.note) || "";
    note.hidden = !(m && m.note);
  };
  sel.onchange = showNote;
  showNote();
}

function bubble(role, text) {
  const b = el("div", { class: "msg " + role }, el("span", { class: "who" }, role), el("span", { class: "text" }, text));
  $("#chat-log").append(b);
  $("#chat-log").scrollTop = $("#chat-log").scrollHeight;
  return b;
}

async function send(text) {
  history.push({ role: "user", content: text });
  bubble("user", text);
  const b = bubble("assistant", "");
  const out = b.querySelector(".text");
  const body = { model: $("#chat-model").value, messages: history, stream: true,
    temperature: Number($("#chat-temp").value) };
  let answer = "";
  let chunks = 0;
  try {
    const r = await fetch("/v1/chat/completions", { method: "POST",
      headers: { "content-type": "application/json" }, body: JSON.stringify(body) });
    if (!r.ok) {
      const e = await r.json().catch(() => ({}));
      throw new Error((e.error && e.error.message) || r.statusText);
    }
    const reader = r.body.getReader();
    const dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let i;
      while ((i = buf.indexOf("\n\n")) >= 0) {
        const ev = buf.slice(0, i);
        buf = buf.slice(i + 2);
        for (const line of ev.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message);
          const d = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
          if (d && d.content) {
            answer += d.content;
            out.textContent = answer;
            b.dataset.chunks = String(++chunks);
          }
        }
      }
    }
    history.push({ role: "assistant", content: answer });
  } catch (e) {
    b.classList.add("error");
    out.textContent = "error: " + e.message;
    history.pop();
  }
  b.dataset.done = "1";
}

$("#chat-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("#chat-input").value.trim();
  if (!text) return;
  $("#chat-input").value = "";
  send(text);
});
$("#chat-input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) {
    e.preventDefault();
    $("#chat-form").requestSubmit();
  }
});
$("#chat-clear").addEventListener("click", () => {
  history.length = 0;
  $("#chat-log").replaceChildren();
});

// ---- key --------------------------------------------------------------------------------
// A node started with --api-key answers 401 until POST api/login has set its cookie.
function showLogin(show) {
  $("#login").hidden = !show;
  $("main").hidden = show;
  $("nav").hidden = show;
  if (show) $("#login-key").focus();
}

$("#login-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const r = await fetch("api/login", { method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ key: $("#login-key").value }) });
  if (r.ok) {
    $("#login-key").value = "";
    $("#login-error").textContent = "";
    showLogin(false);
    connect();
  } else {
    $("#login-error").textContent = r.status === 401 ? "That is not this node's key." : `error ${r.status}`;
  }
});

async function start() {
  const r = await fetch("api/state").catch(() => null);
  if (r && r.status === 401) {
    showLogin(true);
  } else {
    connect();
  }
}

start();
