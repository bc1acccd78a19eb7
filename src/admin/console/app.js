// The turnpike operators' console: reads and acts through the admin API only (docs/DESIGN.md#console).
// No framework, no build step. Everything shown is set as text, never parsed as HTML.
"use strict";

const POLL_MS = 2000;
const state = { token: sessionStorage.getItem("turnpike-admin-token") || "", operator: sessionStorage.getItem("turnpike-operator") || "", view: "overview", timer: null, prev: null, filter: "", key: "", form: {}, newKey: null };

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null) e.setAttribute(k, v);
  }
  for (const c of children.flat()) e.append(c instanceof Node ? c : document.createTextNode(c === null || c === undefined ? "" : String(c)));
  return e;
}

function showError(message) {
  const box = document.getElementById("error");
  box.textContent = message;
  box.hidden = !message;
}

// An admin API call: the JSON body, or an Error carrying the API's own error message.
async function api(path, opts = {}) {
  const headers = { authorization: "Bearer " + state.token };
  // Who acts, for the audit trail (the token is shared; the name is what the operator says).
  if (state.operator) headers["x-turnpike-operator"] = state.operator;
  if (opts.body !== undefined) headers["content-type"] = "application/json";
  const res = await fetch(path, { ...opts, headers });
  const text = await res.text();
  if (!res.ok) {
    let message = `HTTP ${res.status}`;
    try { const e = JSON.parse(text).error; message = `${e.code}: ${e.message}`; } catch (_) { /* not JSON */ }
    const err = new Error(message);
    err.status = res.status;
    throw err;
  }
  return path === "/metrics" ? text : JSON.parse(text);
}

// Prometheus text → [{name, labels, value}].
function parseMetrics(text) {
  const out = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = line.match(/^([a-zA-Z_:][\w:]*)(\{(.*)\})?\s+(\S+)$/);
    if (!m) continue;
    const labels = {};
    for (const p of (m[3] || "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[p[1]] = p[2];
    out.push({ name: m[1], labels, value: Number(m[4]) });
  }
  return out;
}

// A quantile of a Prometheus histogram from its cumulative buckets (upper bound of the bucket).
function quantile(samples, name, q) {
  const buckets = samples.filter(s => s.name === name + "_bucket").map(s => ({ le: s.labels.le === "+Inf" ? Infinity : Number(s.labels.le), n: s.value })).sort((a, b) => a.le - b.le);
  const total = buckets.length ? buckets[buckets.length - 1].n : 0;
  if (!total) return null;
  const hit = buckets.find(b => b.n >= q * total);
  return hit && Number.isFinite(hit.le) ? hit.le : null;
}

const sum = (samples, name, pred = () => true) => samples.filter(s => s.name === name && pred(s.labels)).reduce((a, s) => a + s.value, 0);
const usd = nano => (nano / 1e9).toFixed(6);
const fmt = v => (v === null || v === undefined ? "—" : v);
// A database timestamp to the second, as "YYYY-MM-DD HH:MM:SS" (UTC).
const ts = v => (v ? String(v).replace("T", " ").slice(0, 19) : "—");

function card(label, value, cls) {
  return el("div", { class: "card" }, el("div", { class: "label" }, label), el("div", { class: "value " + (cls || "") }, value));
}

function table(headers, rows) {
  return el("table", {}, el("thead", {}, el("tr", {}, headers.map(h => el("th", {}, h)))), el("tbody", {}, rows));
}

// A JSON call that changes something.
const send = (path, method, body) => api(path, { method, body: JSON.stringify(body) });

// A form field whose value survives the view's refresh (kept in state.form by id).
function field(id, placeholder, size) {
  return el("input", { id, placeholder, size: size || 14, value: state.form[id] || "", oninput: e => { state.form[id] = e.target.value; } });
}

// Submits a form: its values (empty fields left out) go to `submit`; the fields are cleared
// only when it succeeded, so a refused value can be corrected.
async function submitForm(ids, submit) {
  const out = {};
  for (const [name, id] of Object.entries(ids)) {
    const v = (state.form[id] || "").trim();
    if (v) out[name] = v;
  }
  await submit(out);
  for (const id of Object.values(ids)) delete state.form[id];
}

const names = text => text.split(",").map(s => s.trim()).filter(Boolean);

async function act(label, fn) {
  try { await fn(); showError(""); } catch (e) { showError(`${label}: ${e.message}`); }
  refresh();
}

const views = {
  async overview() {
    const [ready, sessions, requests, metricsText] = await Promise.all([api("/admin/ready"), api("/admin/sessions"), api("/admin/requests"), api("/metrics")]);
    const m = parseMetrics(metricsText);
    const now = Date.now();
    const byStatus = {};
    for (const s of m.filter(s => s.name === "turnpike_turns_total")) byStatus[s.labels.status] = (byStatus[s.labels.status] || 0) + s.value;
    let perMin = {};
    if (state.prev && now > state.prev.at) {
      for (const [k, v] of Object.entries(byStatus)) perMin[k] = ((v - (state.prev.byStatus[k] || 0)) * 60000) / (now - state.prev.at);
    }
    state.prev = { at: now, byStatus };
    const inFlight = sessions.sessions.filter(s => s.state !== "idle").length + requests.requests.length;
    const readyCard = ready.ready ? card("ready", "yes", "ok") : card("ready", "no", "bad");
    return [
      el("div", { class: "cards" },
        readyCard,
        card("sessions", sessions.sessions.length),
        card("turns in flight", inFlight),
        card("first token p50 / p95 (ms)", `${fmt(quantile(m, "turnpike_first_token_ms", 0.5))} / ${fmt(quantile(m, "turnpike_first_token_ms", 0.95))}`),
        card("accounting backlog", sum(m, "turnpike_accounting_backlog_records")),
        card("backlog age (s)", sum(m, "turnpike_accounting_backlog_age_seconds")),
      ),
      ready.ready ? el("p", { class: "muted" }, "Ready.") : el("p", { id: "not-ready", class: "bad" }, ready.why),
      el("h2", {}, "Turns by status"),
      table(["status", "total", "per minute (since the last refresh)"], Object.keys(byStatus).sort().map(k =>
        el("tr", {}, el("td", {}, k), el("td", { class: "num" }, byStatus[k]), el("td", { class: "num" }, perMin[k] === undefined ? "—" : perMin[k].toFixed(1))))),
    ];
  },

  async actors() {
    const { actors } = await api("/admin/actors");
    return [table(["actor", "state", "restarts", "started", "last error", ""], actors.map(a =>
      el("tr", { "data-actor": a.name },
        el("td", {}, a.name), el("td", { class: a.state === "running" ? "ok" : "warn" }, a.state),
        el("td", { class: "num restarts" }, a.restarts), el("td", {}, ts(a.started_at)), el("td", {}, fmt(a.last_error)),
        el("td", {}, el("button", { class: "act danger", id: `restart-${a.name}`, onclick: () => {
          if (confirm(`Restart ${a.name}?`)) act(`restart ${a.name}`, () => api(`/admin/actors/${encodeURIComponent(a.name)}/restart`, { method: "POST" }));
        } }, "Restart")))))];
  },

  async accounts() {
    const { pools } = await api("/admin/pools");
    return [table(["account", "health", "idle", "leased", "parked", "dialing", "waiters", "failures", "next probe (ms)", "last error", ""], pools.map(p => {
      const disabled = p.health === "disabled";
      const verb = disabled ? "enable" : "disable";
      return el("tr", { "data-account": p.account },
        el("td", {}, p.account), el("td", { class: p.health === "healthy" ? "ok" : "bad" }, p.health + (p.reason ? ` (${p.reason})` : "")),
        el("td", { class: "num" }, p.idle), el("td", { class: "num" }, p.leased), el("td", { class: "num" }, p.parked), el("td", { class: "num" }, p.dialing),
        el("td", { class: "num" }, p.waiters), el("td", { class: "num" }, p.failures), el("td", { class: "num" }, fmt(p.next_probe_ms)), el("td", {}, fmt(p.last_error)),
        el("td", {}, el("button", { class: "act" + (disabled ? "" : " danger"), id: `${verb}-${p.account}`, onclick: () => {
          if (confirm(`${verb} account ${p.account}?`)) act(`${verb} ${p.account}`, () => api(`/admin/accounts/${encodeURIComponent(p.account)}/${verb}`, { method: "POST" }));
        } }, disabled ? "Enable" : "Disable")));
    }))];
  },

  async sessions() {
    const [{ sessions }, { requests }] = await Promise.all([api("/admin/sessions"), api("/admin/requests")]);
    return [
      el("h2", {}, "WebSocket sessions"),
      table(["session", "key", "user", "account", "state", "turns", "lanes", "waiting", "age (s)", ""], sessions.map(s =>
        el("tr", { "data-session": s.id },
          el("td", {}, s.id), el("td", {}, s.key_prefix), el("td", {}, s.user), el("td", {}, fmt(s.account)), el("td", {}, s.state),
          el("td", { class: "num" }, s.turns), el("td", { class: "num" }, s.lanes), el("td", { class: "num" }, s.queued), el("td", { class: "num" }, s.age_s),
          el("td", {}, el("button", { class: "act danger", id: `end-${s.id}`, onclick: () => {
            if (confirm(`End session ${s.id}?`)) act(`end ${s.id}`, () => api(`/admin/sessions/${encodeURIComponent(s.id)}`, { method: "DELETE" }));
          } }, "End"))))),
      el("h2", {}, "HTTP requests in flight"),
      table(["request", "key", "user", "path", "model", "stream", "account", "started"], requests.map(r =>
        el("tr", {}, el("td", {}, r.request_id), el("td", {}, r.key_prefix), el("td", {}, r.user), el("td", {}, r.path), el("td", {}, r.model),
          el("td", {}, r.stream ? "yes" : "no"), el("td", {}, fmt(r.account)), el("td", {}, ts(r.started_at))))),
    ];
  },

  async users() {
    const { users } = await api("/admin/users");
    const create = () => act("create user", () =>
      submitForm({ name: "new-user-name", balance_usd: "new-user-balance" }, v => send("/admin/users", "POST", v)));
    return [
      el("div", { class: "toolbar" }, field("new-user-name", "name"), field("new-user-balance", "balance USD (none: no limit)", 26),
        el("button", { class: "act", id: "create-user", onclick: create }, "Create user")),
      table(["id", "user", "balance (USD)", "keys (active)", "spent (USD)", "state", "created", ""], users.map(u =>
        el("tr", { "data-user": u.name },
          el("td", { class: "num" }, u.id), el("td", {}, u.name),
          el("td", { class: "num balance" }, u.balance_nanousd === null ? "no limit" : usd(u.balance_nanousd)),
          el("td", { class: "num" }, `${u.keys} (${u.active_keys})`), el("td", { class: "num" }, usd(u.spent_nanousd)),
          el("td", { class: u.enabled ? "ok state" : "bad state" }, u.enabled ? "enabled" : "disabled"), el("td", {}, ts(u.created_at)),
          el("td", {},
            el("button", { class: "act", id: `topup-${u.name}`, onclick: () => {
              const amount = prompt(`Top up ${u.name} by (USD):`);
              if (amount) act(`top up ${u.name}`, () => send(`/admin/users/${encodeURIComponent(u.name)}/balance`, "POST", { add_usd: amount.trim() }));
            } }, "Top up"), " ",
            el("button", { class: "act" + (u.enabled ? " danger" : ""), id: `${u.enabled ? "disable" : "enable"}-${u.name}`, onclick: () => {
              const verb = u.enabled ? "disable" : "enable";
              if (confirm(`${verb} user ${u.name} (all their keys)?`)) act(`${verb} ${u.name}`, () => send(`/admin/users/${encodeURIComponent(u.name)}/${verb}`, "POST", {}));
            } }, u.enabled ? "Disable" : "Enable"))))),
    ];
  },

  async keys() {
    const { keys } = await api("/admin/keys");
    const list = l => (l ? l.join(", ") : "any");
    const create = () => act("create key", () =>
      submitForm({ user: "new-key-user", label: "new-key-label", quota_usd: "new-key-quota", models: "new-key-models" }, async v => {
        if (v.models) { v.allowed_models = names(v.models); delete v.models; }
        state.newKey = await send("/admin/keys", "POST", v);
      }));
    const shown = state.newKey
      ? el("div", { class: "newkey" }, `New key ${state.newKey.key_prefix} for ${state.newKey.user} — copy it now, it is not shown again: `,
        el("code", { id: "new-key" }, state.newKey.key), " ", el("button", { class: "act", onclick: () => { state.newKey = null; refresh(); } }, "Done"))
      : "";
    return [
      el("div", { class: "toolbar" }, field("new-key-user", "user"), field("new-key-label", "label"), field("new-key-quota", "quota USD"),
        field("new-key-models", "models (comma-separated; empty: any)", 30), el("button", { class: "act", id: "create-key", onclick: create }, "Create key")),
      shown,
      table(["id", "key", "user", "label", "quota (USD)", "spent (USD)", "sessions", "turns", "models", "tiers", "state", "created", ""], keys.map(k =>
        el("tr", { "data-key": k.key_prefix, "data-key-id": k.id },
          el("td", { class: "num" }, k.id), el("td", {}, k.key_prefix), el("td", {}, k.user), el("td", {}, fmt(k.label)),
          el("td", { class: "num quota" }, k.quota_nanousd === null ? "—" : usd(k.quota_nanousd)), el("td", { class: "num" }, usd(k.spent_nanousd)),
          el("td", { class: "num" }, fmt(k.max_sessions)), el("td", { class: "num" }, fmt(k.max_concurrent_turns)),
          el("td", { class: "models" }, list(k.allowed_models)), el("td", { class: "tiers" }, list(k.allowed_service_tiers)),
          el("td", { class: k.revoked ? "bad state" : "ok state" }, k.revoked ? "revoked" : "active"), el("td", {}, ts(k.created_at)),
          el("td", {}, k.revoked ? "" : [
            el("button", { class: "act", id: `quota-${k.id}`, onclick: () => {
              const q = prompt(`Quota of ${k.key_prefix} in USD (empty: no quota):`);
              if (q !== null) act(`quota ${k.key_prefix}`, () => send(`/admin/keys/${k.id}`, "PATCH", { quota_usd: q.trim() || null }));
            } }, "Quota"), " ",
            el("button", { class: "act danger", id: `revoke-${k.id}`, onclick: () => {
              if (confirm(`Revoke key ${k.key_prefix}? Its sessions are refused from their next turn.`)) act(`revoke ${k.key_prefix}`, () => send(`/admin/keys/${k.id}/revoke`, "POST", {}));
            } }, "Revoke")]))))];
  },

  async audit() {
    const { audit } = await api("/admin/audit");
    return [table(["when", "who", "from", "action", "target", "detail"], audit.map(a =>
      el("tr", { "data-audit": a.id }, el("td", {}, ts(a.at)), el("td", { class: "actor" }, a.actor), el("td", {}, a.peer),
        el("td", { class: "action" }, a.action), el("td", { class: "target" }, a.target), el("td", { class: "detail" }, JSON.stringify(a.detail)))))];
  },

  async compensations() {
    const q = state.filter ? `?status=${encodeURIComponent(state.filter)}` : "";
    const { compensations } = await api("/admin/compensations" + q);
    const filter = el("select", { id: "comp-filter", onchange: e => { state.filter = e.target.value; refresh(); } },
      ["", "pending", "settled", "dead"].map(v => { const o = el("option", { value: v }, v || "all"); if (v === state.filter) o.selected = true; return o; }));
    return [
      el("div", { class: "toolbar" }, el("label", { for: "comp-filter" }, "Status"), filter),
      table(["id", "request", "key", "amount (USD)", "status", "attempts", "next attempt", "last error", ""], compensations.map(c =>
        el("tr", { "data-compensation": c.id },
          el("td", { class: "num" }, c.id), el("td", {}, c.request_id), el("td", {}, c.key_prefix), el("td", { class: "num" }, usd(c.amount_nanousd)),
          el("td", { class: `status ${c.status === "settled" ? "ok" : c.status === "dead" ? "bad" : "warn"}` }, c.status), el("td", { class: "num" }, c.attempts),
          el("td", {}, ts(c.next_attempt_at)), el("td", {}, fmt(c.last_error)),
          el("td", {}, c.status === "settled" ? "" : el("button", { class: "act", id: `retry-${c.id}`, onclick: () => act(`retry ${c.id}`, () => api(`/admin/compensations/${c.id}/retry`, { method: "POST" })) }, "Retry"))))),
    ];
  },

  async turns() {
    const q = state.key ? `?key=${encodeURIComponent(state.key)}` : "";
    const { turns } = await api("/admin/turns" + q);
    const key = el("input", { id: "turns-key", placeholder: "key prefix (tpk_…)", value: state.key, onchange: e => { state.key = e.target.value.trim(); refresh(); } });
    return [
      el("div", { class: "toolbar" }, el("label", { for: "turns-key" }, "Key"), key),
      table(["accepted", "key", "status", "transport", "model", "tier", "account", "input", "cached", "output", "cost (USD)", "first token (ms)", "duration (ms)", "error"], turns.map(t =>
        el("tr", {}, el("td", {}, ts(t.accepted_at)), el("td", {}, t.key_prefix), el("td", {}, `${t.status} (${t.usage_source})`), el("td", {}, `${t.transport}/${t.origin}`),
          el("td", {}, t.model), el("td", {}, t.service_tier), el("td", {}, t.account), el("td", { class: "num" }, t.input_tokens), el("td", { class: "num" }, t.cached_input_tokens),
          el("td", { class: "num" }, t.output_tokens), el("td", { class: "num" }, usd(t.cost_nanousd)), el("td", { class: "num" }, fmt(t.first_token_ms)),
          el("td", { class: "num" }, t.duration_ms), el("td", {}, fmt(t.error_code))))),
    ];
  },
};

// `poll`: the periodic refresh, which waits while the operator types in a form of the view (a
// re-render would move the caret); an action or a view change refreshes at once.
async function refresh(poll) {
  clearTimeout(state.timer);
  if (!state.token) return;
  const typing = document.activeElement && document.activeElement.tagName === "INPUT" && document.activeElement.closest("#view");
  if (poll === true && typing) {
    state.timer = setTimeout(() => refresh(true), POLL_MS);
    return;
  }
  try {
    const content = await views[state.view]();
    const view = document.getElementById("view");
    // Keep the focus of a filter being typed in across refreshes.
    const focused = document.activeElement && document.activeElement.id;
    view.replaceChildren(...content);
    if (focused && document.getElementById(focused)) document.getElementById(focused).focus();
    document.getElementById("status").textContent = "updated " + new Date().toLocaleTimeString();
    document.getElementById("login").hidden = true;
    document.getElementById("nav").hidden = false;
  } catch (e) {
    showError(e.message);
    if (e.status === 401) {
      sessionStorage.removeItem("turnpike-admin-token");
      state.token = "";
      document.getElementById("login").hidden = false;
      document.getElementById("nav").hidden = true;
      return;
    }
  }
  state.timer = setTimeout(() => refresh(true), POLL_MS);
}

function show(view) {
  state.view = view;
  state.newKey = null;
  for (const b of document.querySelectorAll("nav button")) b.classList.toggle("active", b.dataset.view === view);
  document.getElementById("view").replaceChildren();
  refresh();
}

document.addEventListener("DOMContentLoaded", () => {
  for (const b of document.querySelectorAll("nav button")) b.addEventListener("click", () => show(b.dataset.view));
  document.getElementById("login").addEventListener("submit", e => {
    e.preventDefault();
    state.token = document.getElementById("token").value.trim();
    state.operator = document.getElementById("operator").value.trim();
    sessionStorage.setItem("turnpike-admin-token", state.token);
    sessionStorage.setItem("turnpike-operator", state.operator);
    showError("");
    show(state.view);
  });
  if (state.token) show(state.view);
});
