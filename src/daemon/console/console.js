// mistguard review console. No framework: fetch() against /api/*, DOM built with textContent
// (never innerHTML), so nothing the daemon returns can run as markup.
"use strict";

const KEY = "mistguard.console.token";
let csrf = "";
let timer = null;

const $ = (id) => document.getElementById(id);

function token() {
  return sessionStorage.getItem(KEY) || "";
}

async function api(path, options) {
  const opts = options || {};
  const headers = { Authorization: "Bearer " + token() };
  if (opts.body !== undefined) {
    headers["Content-Type"] = "application/json";
    headers["X-CSRF-Token"] = csrf;
  }
  const r = await fetch(path, {
    method: opts.method || "GET",
    headers,
    body: opts.body === undefined ? undefined : JSON.stringify(opts.body),
    credentials: "omit",
    cache: "no-store",
  });
  let data = null;
  try {
    data = await r.json();
  } catch (e) {
    data = null;
  }
  if (r.status === 401) {
    signOut("The token was refused.");
    throw new Error("unauthorized");
  }
  if (!r.ok) {
    throw new Error((data && data.error) || "HTTP " + r.status);
  }
  return data;
}

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function row(cells) {
  const tr = document.createElement("tr");
  for (const c of cells) {
    const td = document.createElement("td");
    if (c instanceof Node) td.appendChild(c);
    else td.textContent = c === undefined || c === null ? "" : String(c);
    tr.appendChild(td);
  }
  return tr;
}

function duration(ms) {
  const s = Math.max(0, Math.round(ms / 1000));
  if (s < 90) return s + "s";
  const m = Math.round(s / 60);
  if (m < 90) return m + "m";
  const h = Math.round(m / 60);
  if (h < 48) return h + "h";
  return Math.round(h / 24) + "d";
}

function when(unixMs) {
  if (!unixMs) return "";
  return new Date(Number(unixMs)).toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z");
}

function shortHash(h) {
  const c = el("code", h ? h.slice(0, 16) : "");
  if (h) c.title = h;
  return c;
}

function setStatus(text, isError) {
  const s = $("status");
  s.textContent = text;
  s.className = isError ? "status error" : "status";
}

function fill(tableId, emptyId, rows) {
  const body = $(tableId).querySelector("tbody");
  body.replaceChildren(...rows);
  $(tableId).hidden = rows.length === 0;
  if (emptyId) $(emptyId).hidden = rows.length !== 0;
}

function button(label, cls, onClick) {
  const b = el("button", label, cls);
  b.type = "button";
  b.addEventListener("click", onClick);
  return b;
}

async function act(path, body, done) {
  try {
    await api(path, { method: "POST", body });
    setStatus(done, false);
  } catch (e) {
    if (e.message !== "unauthorized") setStatus(e.message, true);
  }
  refresh();
}

function renderApprovals(data) {
  const now = Number(data.now_unix_ms);
  const pending = data.approvals.filter((a) => a.state === "pending");
  const decided = data.approvals.filter((a) => a.state !== "pending");
  fill("approvals", "approvals-empty", pending.map((a) => {
    const actions = el("span", null, "actions");
    actions.appendChild(button("Approve", "approve", () =>
      act("/api/approvals/" + encodeURIComponent(a.approval_id) + "/decide", { approve: true },
        "Approved " + a.tool + ".")));
    actions.appendChild(button("Deny", "deny", () =>
      act("/api/approvals/" + encodeURIComponent(a.approval_id) + "/decide", { approve: false },
        "Denied " + a.tool + ".")));
    const tr = row([
      el("code", a.tool),
      a.policy,
      a.reason,
      a.approvers.join(", "),
      shortHash(a.subject_hash),
      duration(now - Number(a.created_unix_ms)),
      duration(Number(a.expires_unix_ms) - now),
      actions,
    ]);
    tr.dataset.approvalId = a.approval_id;
    tr.className = "approval";
    return tr;
  }));
  $("approvals-count").textContent = pending.length ? "(" + pending.length + ")" : "";
  fill("decided", null, decided.map((a) => row([
    el("code", a.tool), a.policy, a.state, a.decided_by, when(a.decided_unix_ms || a.created_unix_ms),
  ])));
}

function renderReviews(data) {
  fill("reviews", "reviews-empty", data.reviews.map((r) => {
    const rules = el("ul", null, "plain");
    for (const x of r.rules) rules.appendChild(el("li", x.rule + " \u00d7 " + x.count));
    const ids = el("div", null, "ids");
    for (const id of r.decision_ids) {
      const c = el("code", id);
      c.title = r.records_query
        ? "look it up: " + r.records_query + " | grep " + id
        : "decision id: search the daemon's decision log for it";
      ids.appendChild(c);
    }
    if (r.records_query) ids.appendChild(el("div", r.records_query, "hint"));
    const lift = button("Lift suspension", "lift", () =>
      act("/api/reviews/" + encodeURIComponent(r.subject_hash) + "/lift", { note: "" },
        "Lifted the suspension of " + r.subject_hash.slice(0, 16) + "."));
    const tr = row([shortHash(r.subject_hash), rules, when(r.suspended_unix_ms),
      when(r.until_unix_ms), ids, lift]);
    tr.className = "review";
    return tr;
  }));
  $("reviews-count").textContent = data.reviews.length ? "(" + data.reviews.length + ")" : "";
}

function renderAlerts(data) {
  const causes = {
    level2_subjects: "many distinct subjects reached level 2",
    novel_attack: "remote moderation flagged many texts the rules passed",
  };
  fill("alerts", "alerts-empty", data.alerts.map((a) =>
    row([when(a.unix_ms), causes[a.cause] || a.cause, a.count, duration(a.window_s * 1000)])));
}

function renderDecisions(data) {
  fill("decisions", "decisions-empty", data.rules.map((r) => {
    const list = el("span", null, "actions-list");
    let total = 0;
    for (const [action, n] of Object.entries(r.actions)) {
      total += n;
      list.appendChild(el("span", action + " " + n, "pill " + action));
    }
    return row([r.rule === "" ? el("em", "(no rule)") : el("code", r.rule), list, total]);
  }));
}

async function refresh() {
  if (!token()) return;
  try {
    const [ap, rv, al, dc] = await Promise.all([
      api("/api/approvals"), api("/api/reviews"), api("/api/alerts"), api("/api/decisions"),
    ]);
    renderApprovals(ap);
    renderReviews(rv);
    renderAlerts(al);
    renderDecisions(dc);
    $("console").dataset.loaded = "1";
  } catch (e) {
    if (e.message !== "unauthorized") setStatus(e.message, true);
  }
}

async function signIn() {
  const s = await api("/api/session");
  csrf = s.csrf;
  $("admin-name").textContent = s.admin;
  $("login").hidden = true;
  $("who").hidden = false;
  $("console").hidden = false;
  $("login-error").textContent = "";
  await refresh();
  if (timer) clearInterval(timer);
  timer = setInterval(refresh, 5000);
}

function signOut(message) {
  sessionStorage.removeItem(KEY);
  csrf = "";
  if (timer) clearInterval(timer);
  timer = null;
  $("console").hidden = true;
  $("console").dataset.loaded = "";
  $("who").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
}

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(KEY, $("token").value.trim());
    $("token").value = "";
    signIn().catch(() => {});
  });
  $("logout").addEventListener("click", () => signOut(""));
  $("refresh").addEventListener("click", () => refresh());
  if (token()) signIn().catch(() => {});
});
