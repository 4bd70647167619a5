// The Ferry console: one page, hash routes, the controller's REST API with the token in a header.
// The token lives in this tab's sessionStorage only; it never goes into a URL. Every text that
// comes from the API is set as text (never as HTML): host names, labels and audit details are
// peers' input.
"use strict";

const TOKEN_KEY = "ferry.token";
const ROLES = ["viewer", "operator", "admin"];
const DRILL_DUE_DAYS = 30;
const STATES = ["protected", "initial-sync", "resyncing", "seeding", "paused", "error"];

let me = null;          // {name, role} of the signed-in token
let generation = 0;     // bumps on navigation: a render of an older page is dropped
let timer = null;       // the current page's refresh timer
const exported = {};    // group → the last export made from its page, shown across refreshes

// ---- DOM helpers ------------------------------------------------------------------------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function badge(text, kind) { return h("span", { class: "badge " + (kind || "") }, text); }

function flash(text, bad) {
  const el = document.getElementById("flash");
  el.textContent = text;
  el.className = bad ? "bad" : "";
  el.hidden = false;
  clearTimeout(flash.t);
  flash.t = setTimeout(() => { el.hidden = true; }, bad ? 8000 : 4000);
}

// ---- formatting -------------------------------------------------------------------------

function bytes(n) {
  if (n === undefined || n === null) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0, v = Number(n);
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return (i === 0 ? v.toFixed(0) : v.toFixed(1)) + " " + units[i];
}

function duration(s) {
  if (s === undefined || s === null || !isFinite(s)) return "–";
  if (s < 1) return (s * 1000).toFixed(0) + " ms";
  if (s < 90) return s.toFixed(s < 10 ? 1 : 0) + " s";
  if (s < 5400) return (s / 60).toFixed(0) + " min";
  if (s < 172800) return (s / 3600).toFixed(1) + " h";
  return (s / 86400).toFixed(0) + " d";
}

// The API's times are whole seconds: a span between two of them under a second says so.
function span(from, to) {
  const s = ((to ? Date.parse(to) : Date.now()) - Date.parse(from)) / 1000;
  return s < 1 ? "< 1 s" : duration(s);
}

function age(date) {
  if (!date) return "never";
  return duration((Date.now() - Date.parse(date)) / 1000) + " ago";
}

function time(date) { return date ? new Date(date).toLocaleString() : "–"; }

function stateKind(state) {
  switch (state) {
    case "protected": case "online": case "succeeded": case "done": return "ok";
    case "initial-sync": case "resyncing": case "seeding": case "running": case "drill": case "enrolled": return "info";
    case "paused": case "waiting": case "host-offline": case "offline": case "cancelled": case "failed-over": case "skipped": return "warn";
    case "error": case "failed": return "bad";
    default: return "";
  }
}

function can(role) { return me && ROLES.indexOf(me.role) >= ROLES.indexOf(role); }

// ---- API --------------------------------------------------------------------------------

class APIError extends Error {
  constructor(status, code, message) { super(message); this.status = status; this.code = code; }
}

async function api(method, path, body) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  const headers = { "Accept": "application/json" };
  if (token) headers["Authorization"] = "Bearer " + token;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body), cache: "no-store" });
  if (response.status === 204) return null;
  let data = null;
  try { data = await response.json(); } catch (_) { data = null; }
  if (!response.ok) {
    const e = data && data.error ? data.error : { code: "http-" + response.status, message: response.statusText };
    if (response.status === 401) signOut(e.message);
    throw new APIError(response.status, e.code, e.message);
  }
  return data;
}

// Runs a write action from a button: disables it meanwhile, reports the outcome.
async function act(button, label, work) {
  button.disabled = true;
  try {
    const result = await work();
    flash(label + ": done");
    return result;
  } catch (e) {
    flash(label + ": " + e.message, true);
  } finally {
    button.disabled = false;
  }
}

// ---- sign-in ----------------------------------------------------------------------------

function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  me = null;
  showSignIn(message);
}

function showSignIn(message) {
  clearTimeout(timer);
  generation++;
  document.getElementById("nav").hidden = true;
  document.getElementById("who").replaceChildren();
  const input = h("input", { type: "password", id: "token", autocomplete: "off", placeholder: "fat_…", required: true });
  const error = h("p", { class: "error", id: "signin-error" }, message || "");
  const form = h("form", { class: "signin card", id: "signin" },
    h("h1", {}, "Sign in"),
    h("p", { class: "muted" }, "An API token (ferryctl api-token create NAME --role viewer|operator|admin). It is kept in this tab only."),
    h("label", { for: "token" }, "Token"), input,
    h("button", { type: "submit", class: "primary", id: "signin-button" }, "Sign in"), error);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, input.value.trim());
    try {
      me = await api("GET", "/v1/whoami");
      start();
    } catch (e) {
      sessionStorage.removeItem(TOKEN_KEY);
      error.textContent = e.message;
    }
  });
  document.getElementById("main").replaceChildren(form);
  input.focus();
}

function start() {
  document.getElementById("nav").hidden = false;
  document.getElementById("who").replaceChildren(
    h("span", { id: "whoami" }, me.name + " (" + me.role + ")"),
    h("button", { id: "signout", onclick: () => signOut("Signed out.") }, "Sign out"));
  route();
}

// ---- routing ----------------------------------------------------------------------------

const pages = {
  "": dashboardPage,
  "hosts": hostsPage,
  "volumes": volumesPage,
  "volume": volumePage,
  "groups": groupsPage,
  "group": groupPage,
  "plans": plansPage,
  "plan": planPage,
  "jobs": jobsPage,
  "job": jobPage,
  "audit": auditPage,
  "alerts": alertsPage,
};

function route() {
  if (!me) return;
  clearTimeout(timer);
  const gen = ++generation;
  const [path, query] = location.hash.replace(/^#\/?/, "").split("?");
  const parts = path.split("/").filter(Boolean).map(p => { try { return decodeURIComponent(p); } catch (_) { return p; } });
  const page = pages[parts[0] || ""] || notFoundPage;
  for (const a of document.querySelectorAll("#nav a")) {
    const target = a.getAttribute("href").replace(/^#\/?/, "");
    // "volume" and "volumes" both light up Volumes.
    a.classList.toggle("current", target === (parts[0] || "") || Boolean(target && parts[0] && parts[0].startsWith(target.replace(/s$/, ""))));
  }
  const params = new URLSearchParams(query || "");
  const render = async () => {
    try {
      const view = await page(parts.slice(1), params);
      if (gen !== generation) return;
      view.id = view.id || "page";
      document.getElementById("main").replaceChildren(view);
    } catch (e) {
      if (gen !== generation || (e instanceof APIError && e.status === 401)) return;
      document.getElementById("main").replaceChildren(h("div", { class: "card error", id: "page-error" }, e.message));
    }
  };
  // The next refresh is scheduled when this one has rendered: never two in flight.
  const loop = async () => {
    await render();
    if (gen === generation) timer = setTimeout(loop, page.refresh || 5000);
  };
  loop();
}

window.addEventListener("hashchange", route);

function notFoundPage() { return h("div", { class: "card" }, "No such page. ", h("a", { href: "#/" }, "Dashboard")); }

function link(href, text) { return h("a", { href }, text); }
function volumeHref(v) { return "#/volume/" + encodeURIComponent(v.host) + "/" + encodeURIComponent(v.name); }

// ---- dashboard --------------------------------------------------------------------------

async function dashboardPage() {
  const [volumes, hosts, groups, jobs, alerts] = await Promise.all([
    api("GET", "/v1/volumes"), api("GET", "/v1/hosts"), api("GET", "/v1/groups"), api("GET", "/v1/jobs"), api("GET", "/v1/alerts")]);
  const counts = {};
  for (const s of STATES) counts[s] = 0;
  for (const v of volumes) counts[v.replicaState || "error"] = (counts[v.replicaState || "error"] || 0) + 1;
  const unhealthy = volumes.filter(v => v.replicaState !== "protected");
  const online = hosts.filter(x => x.state === "online");
  const overRPO = groups.filter(g => g.rpoAlert);
  const banner = unhealthy.length === 0 && overRPO.length === 0
    ? h("div", { class: "banner ok", id: "health-banner" }, volumes.length === 0 ? "No volumes are protected yet." : (volumes.length === 1 ? "The volume is protected." : "All " + volumes.length + " volumes are protected."))
    : h("div", { class: "banner " + (unhealthy.some(v => v.replicaState === "error") || overRPO.length ? "bad" : "warn"), id: "health-banner" },
        unhealthy.length + " of " + volumes.length + " volumes are not protected right now" + (overRPO.length ? "; " + overRPO.length + " group(s) over their RPO" : "") + ".");

  const active = jobs.filter(j => j.state === "running" || j.state === "waiting");
  const failed = jobs.filter(j => j.state === "failed").slice(0, 5);
  return h("div", { id: "dashboard" },
    h("h1", {}, "Am I protected?"),
    banner,
    h("div", { class: "cards" },
      h("div", { class: "card", id: "replication-health" }, h("h2", {}, "Replication health"),
        h("ul", { class: "state-list" }, STATES.map(s => h("li", {},
          link("#/volumes?state=" + s, s), h("span", { "data-state": s }, badge(String(counts[s]), counts[s] ? stateKind(s) : "")))))),
      h("div", { class: "card", id: "hosts-online" }, h("h2", {}, "Hosts"),
        h("div", { class: "big" }, online.length + " / " + hosts.length), h("div", { class: "muted" }, "online"),
        h("ul", { class: "state-list" }, hosts.map(x => h("li", {}, x.name, badge(x.state, stateKind(x.state)))))),
      h("div", { class: "card", id: "open-alerts" }, h("h2", {}, link("#/alerts", "Open alerts") , " ", badge(String(alerts.length), alerts.length ? "bad" : "ok")),
        alerts.length === 0 ? h("p", { class: "muted" }, "None.")
          : h("ul", { class: "state-list" }, alerts.slice(0, 8).map(a => h("li", { "data-alert-rule": a.rule },
              h("span", {}, badge(a.severity, a.severity === "critical" ? "bad" : "warn"), " ", a.message)))))),
    h("div", { class: "card" }, h("h2", {}, "Consistency groups"), groupsTable(groups)),
    h("div", { class: "card" }, h("h2", {}, "Running jobs"), active.length ? jobsTable(active) : h("p", { class: "muted" }, "None.")),
    h("div", { class: "card" }, h("h2", {}, "Failed jobs"), failed.length ? jobsTable(failed) : h("p", { class: "muted" }, "None.")));
}

function lastDrill(plan, jobs) {
  return jobs.filter(j => j.plan === plan && j.operation === "drill" && j.state === "succeeded" && j.endedAt)
    .sort((a, b) => Date.parse(b.endedAt) - Date.parse(a.endedAt))[0];
}

// ---- hosts ------------------------------------------------------------------------------

async function hostsPage() {
  const hosts = await api("GET", "/v1/hosts");
  return h("div", { id: "hosts" }, h("h1", {}, "Hosts"),
    h("table", {}, h("thead", {}, h("tr", {}, ["Host", "State", "Address", "OS", "Agent", "Last seen", "Certificate expires"].map(t => h("th", {}, t)))),
      h("tbody", {}, hosts.map(x => h("tr", { "data-host": x.name },
        h("td", {}, x.name), h("td", {}, badge(x.state, stateKind(x.state))), h("td", {}, x.address || "–"),
        h("td", {}, x.os || "–"), h("td", {}, x.agentVersion || "–"), h("td", {}, age(x.lastSeen)), h("td", {}, time(x.certificateExpiry)))))));
}

// ---- volumes ----------------------------------------------------------------------------

function syncCell(v) {
  if (!v.sync || v.sync.done) return h("span", { class: "muted" }, v.syncedPercent !== undefined ? v.syncedPercent + " %" : "–");
  const done = v.sync.totalBytes ? v.sync.doneBytes / v.sync.totalBytes : 0;
  return h("span", {}, h("span", { class: "progress" }, h("span", { style: "width:" + (100 * done).toFixed(1) + "%" })),
    " " + (100 * done).toFixed(0) + " % " + v.sync.kind + (v.sync.etaSeconds !== undefined ? ", ETA " + duration(v.sync.etaSeconds) : ""));
}

async function volumesPage(_, params) {
  let volumes = await api("GET", "/v1/volumes");
  const filter = params.get("state");
  if (filter) volumes = volumes.filter(v => v.replicaState === filter);
  return h("div", { id: "volumes" }, h("h1", {}, "Volumes" + (filter ? " – " + filter : "")),
    filter ? h("p", {}, link("#/volumes", "show all")) : null,
    h("table", {}, h("thead", {}, h("tr", {}, ["Volume", "State", "Reason", "Lag", "Lag bytes", "Throughput", "Sync", "Size"].map(t => h("th", {}, t)))),
      h("tbody", {}, volumes.map(v => h("tr", { "data-volume": v.host + "/" + v.name },
        h("td", {}, link(volumeHref(v), v.host + "/" + v.name)),
        h("td", { class: "replica-state" }, badge(v.replicaState || "unknown", stateKind(v.replicaState))),
        h("td", {}, v.lastError || (v.state === "host-offline" ? "host offline" : "")),
        h("td", { class: "num" }, duration(v.lagSeconds)), h("td", { class: "num" }, bytes(v.lagBytes)),
        h("td", { class: "num" }, v.throughputBytesPerSecond !== undefined ? bytes(v.throughputBytesPerSecond) + "/s" : "–"),
        h("td", {}, syncCell(v)), h("td", { class: "num" }, bytes(v.sizeBytes)))))));
}

async function volumePage([host, name]) {
  const base = "/v1/volumes/" + encodeURIComponent(host) + "/" + encodeURIComponent(name);
  const [v, history] = await Promise.all([api("GET", base), api("GET", base + "/lag-history")]);
  const actions = [];
  if (can("operator")) {
    const resync = h("button", { class: "write", id: "resync" }, "Resync (compare every block)");
    resync.addEventListener("click", () => act(resync, "resync", () => api("POST", base + "/resync")));
    actions.push(resync);
  }
  const rows = [["State", badge(v.replicaState || "unknown", stateKind(v.replicaState))], ["Reason", v.lastError || "–"],
    ["Host", v.state === "host-offline" ? "offline" : "online"], ["Path", v.path], ["Size", bytes(v.sizeBytes)],
    ["Capture", v.captureMode || "export"], ["Lag", duration(v.lagSeconds) + " (" + bytes(v.lagBytes) + ")"],
    ["Throughput", v.throughputBytesPerSecond !== undefined ? bytes(v.throughputBytesPerSecond) + "/s" : "–"],
    ["Sync", syncCell(v)], ["Durable sequence", v.durableSequence ?? "–"], ["Last report", time(v.reportedAt)], ["Protected since", time(v.protectedAt)]];
  return h("div", { id: "volume" }, h("h1", {}, v.host + "/" + v.name),
    h("div", { class: "actions" }, actions),
    h("div", { class: "card" }, h("table", {}, h("tbody", {}, rows.map(([k, val]) => h("tr", {}, h("th", {}, k), h("td", {}, val)))))),
    h("div", { class: "card" }, h("h2", {}, "Replication lag, last hour"), lagChart(history)));
}
volumePage.refresh = 10000;

function lagChart(samples) {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("class", "chart");
  svg.setAttribute("id", "lag-chart");
  svg.setAttribute("viewBox", "0 0 600 180");
  const text = (x, y, t) => { const e = document.createElementNS(ns, "text"); e.setAttribute("x", x); e.setAttribute("y", y); e.textContent = t; svg.append(e); };
  if (!samples.length) { text(10, 90, "No samples yet (one every 10 s, kept in memory)."); return svg; }
  const now = Date.now(), from = now - 3600e3;
  const max = Math.max(1, ...samples.map(s => s.lagSeconds));
  for (const f of [0, 0.5, 1]) {
    const l = document.createElementNS(ns, "line");
    l.setAttribute("x1", 40); l.setAttribute("x2", 600); l.setAttribute("y1", 170 - 160 * f); l.setAttribute("y2", 170 - 160 * f);
    svg.append(l);
    text(0, 174 - 160 * f, duration(max * f));
  }
  const points = samples.map(s => {
    const x = 40 + 560 * Math.max(0, (Date.parse(s.at) - from) / 3600e3);
    return x.toFixed(1) + "," + (170 - 160 * s.lagSeconds / max).toFixed(1);
  });
  const line = document.createElementNS(ns, "polyline");
  line.setAttribute("points", points.join(" "));
  svg.append(line);
  text(40, 180, "−60 min"); text(560, 180, "now");
  return svg;
}

// ---- groups and points ------------------------------------------------------------------

function groupsTable(groups) {
  if (!groups.length) return h("p", { class: "muted" }, "No consistency groups.");
  return h("table", {}, h("thead", {}, h("tr", {}, ["Group", "Volumes", "Points", "Newest point", "RPO alert at", "Status"].map(t => h("th", {}, t)))),
    h("tbody", {}, groups.map(g => h("tr", { "data-group": g.name },
      h("td", {}, link("#/group/" + encodeURIComponent(g.name), g.name)), h("td", {}, g.volumes.join(", ")),
      h("td", { class: "num" }, g.points), h("td", {}, g.newestPoint ? age(g.newestPoint) : "none"),
      h("td", {}, duration(g.policy.rpoAlertSeconds)),
      h("td", {}, g.rpoAlert ? badge("over RPO", "bad") : badge("ok", "ok"), g.lastRoundError ? h("div", { class: "muted" }, g.lastRoundError) : null)))));
}

async function groupsPage() {
  const groups = await api("GET", "/v1/groups");
  return h("div", { id: "groups" }, h("h1", {}, "Consistency groups"), groupsTable(groups));
}

async function groupPage([name]) {
  const base = "/v1/groups/" + encodeURIComponent(name);
  const [g, points] = await Promise.all([api("GET", base), api("GET", base + "/points")]);
  const exports = h("div", { id: "exports" }, exported[name] || null);
  const actions = [];
  if (can("operator")) {
    const crash = h("button", { class: "write", id: "cut-point" }, "Cut a point now");
    crash.addEventListener("click", () => act(crash, "point", () => api("POST", base + "/points", { app: false, label: "console" })));
    const app = h("button", { class: "write", id: "cut-app-point" }, "Cut an app-consistent point");
    app.addEventListener("click", () => act(app, "app point", () => api("POST", base + "/points", { app: true, label: "console" })));
    actions.push(crash, app);
  }
  const newest = points.slice().reverse().slice(0, 200);
  const p = g.policy;
  return h("div", { id: "group" }, h("h1", {}, "Group " + g.name),
    h("div", { class: "card" }, h("table", {}, h("tbody", {},
      [["Volumes", g.volumes.join(", ")], ["Newest point", g.newestPoint ? age(g.newestPoint) : "none"],
       ["RPO", g.rpoSeconds !== undefined ? duration(g.rpoSeconds) : "–"], ["RPO alert at", duration(p.rpoAlertSeconds)],
       ["Crash points every", duration(p.crashIntervalSeconds)], ["App points every", duration(p.appIntervalSeconds)],
       ["Hold budget", p.holdBudgetMilliseconds + " ms"], ["Last round", g.lastRoundError || "ok"]]
        .map(([k, v]) => h("tr", {}, h("th", {}, k), h("td", {}, v)))))),
    h("div", { class: "actions" }, actions), exports,
    h("div", { class: "card" }, h("h2", {}, "Points (" + points.length + ", newest first)"),
      h("table", {}, h("thead", {}, h("tr", {}, ["Taken", "Kind", "Consistency", "Pause", "Label", "Complete", ""].map(t => h("th", {}, t)))),
        h("tbody", {}, newest.map(pt => h("tr", { "data-point": pt.id },
          h("td", { title: pt.id }, time(pt.createdAt)), h("td", {}, pt.kind), h("td", {}, pt.consistency + (pt.hookError ? " (" + pt.hookError + ")" : "")),
          h("td", { class: "num" }, pt.pauseMicros !== undefined ? (pt.pauseMicros / 1000).toFixed(1) + " ms" : "–"),
          h("td", {}, pt.label || ""), h("td", {}, pt.complete ? badge("yes", "ok") : badge("not yet", "warn")),
          h("td", {}, can("operator") && pt.complete ? exportButton(pt, exports) : null)))))));
}
groupPage.refresh = 15000;

function exportButton(point, out) {
  const b = h("button", { class: "write" }, "Export");
  b.addEventListener("click", () => act(b, "export", async () => {
    const made = [];
    for (const m of point.members) {
      const [host, volume] = m.volume.split("/");
      made.push(await api("POST", "/v1/volumes/" + encodeURIComponent(host) + "/" + encodeURIComponent(volume) + "/exports", { point: point.id }));
    }
    exported[point.group] = h("div", { class: "card" }, h("h2", {}, "Exported point " + point.id),
      h("table", {}, h("thead", {}, h("tr", {}, ["Volume", "NBD URI (controller host)", "Export id"].map(t => h("th", {}, t)))),
        h("tbody", {}, made.map(e => h("tr", {}, h("td", {}, e.volume), h("td", {}, h("code", {}, e.uri)), h("td", {}, e.id))))));
    out.replaceChildren(exported[point.group]);
  }));
  return b;
}

// ---- plans ------------------------------------------------------------------------------

async function plansPage() {
  const [plans, jobs] = await Promise.all([api("GET", "/v1/plans"), api("GET", "/v1/jobs")]);
  return h("div", { id: "plans" }, h("h1", {}, "Recovery plans"),
    plans.length === 0 ? h("p", { class: "muted" }, "No plans; apply one with ferryctl plan apply -f FILE.") :
    h("table", {}, h("thead", {}, h("tr", {}, ["Plan", "State", "Last drill", "", "Groups"].map(t => h("th", {}, t)))),
      h("tbody", {}, plans.map(p => {
        const last = lastDrill(p.plan.name, jobs);
        const due = !last || Date.now() - Date.parse(last.endedAt) > DRILL_DUE_DAYS * 86400e3;
        return h("tr", { "data-plan": p.plan.name },
          h("td", {}, link("#/plan/" + encodeURIComponent(p.plan.name), p.plan.name)),
          h("td", { class: "plan-state" }, badge(p.state, stateKind(p.state))),
          h("td", {}, last ? link("#/job/" + encodeURIComponent(last.id), age(last.endedAt)) : "never"),
          h("td", {}, due ? badge("drill recommended", "warn") : null),
          h("td", {}, p.plan.groups.map(g => g.name).join(" → ")));
      }))));
}

function planActions(p) {
  if (!can("operator")) return [];
  const name = p.plan.name;
  const start = (operation, extra, label) => async () => {
    const job = await api("POST", "/v1/plans/" + encodeURIComponent(name) + "/jobs", Object.assign({ operation }, extra));
    location.hash = "#/job/" + encodeURIComponent(job.id);
    return job;
  };
  const buttons = [];
  const add = (id, text, cls, work, confirmText) => {
    const b = h("button", { class: "write " + cls, id }, text);
    b.addEventListener("click", () => { if (!confirmText || confirm(confirmText)) act(b, text, work); });
    buttons.push(b);
  };
  if (p.state === "protected") {
    add("start-drill", "Start drill (latest point, test network)", "primary", start("drill", { point: "latest" }));
    add("start-failover", "Planned failover", "danger", start("failover", { planned: true }),
      "Planned failover of " + name + ": production stops, drains, and runs on the recovery hosts. Go on?");
  }
  if (p.state === "drill") add("cleanup-drill", "Clean up drill", "", start("drill-cleanup", {}));
  if (p.state === "failed-over") add("commit", "Commit failover", "", start("commit", {}));
  return buttons;
}

async function planPage([name]) {
  const [p, jobs] = await Promise.all([api("GET", "/v1/plans/" + encodeURIComponent(name)), api("GET", "/v1/jobs")]);
  const mine = jobs.filter(j => j.plan === name);
  const last = lastDrill(name, jobs);
  return h("div", { id: "plan" }, h("h1", {}, "Plan " + name + " ", badge(p.state, stateKind(p.state))),
    h("p", {}, p.plan.description),
    h("p", {}, "Last successful drill: ", last ? link("#/job/" + encodeURIComponent(last.id), age(last.endedAt)) : "never",
      (!last || Date.now() - Date.parse(last.endedAt) > DRILL_DUE_DAYS * 86400e3) ? [" ", badge("drill recommended", "warn")] : null),
    h("div", { class: "actions" }, planActions(p)),
    h("div", { class: "card" }, h("h2", {}, "Recovery order"),
      h("table", {}, h("thead", {}, h("tr", {}, ["Group", "Host", "Recovers on", "Volumes", "Start hook"].map(t => h("th", {}, t)))),
        h("tbody", {}, p.plan.groups.flatMap(g => g.items.map(i => h("tr", {},
          h("td", {}, g.name), h("td", {}, i.host), h("td", {}, i.recoveryHost), h("td", {}, i.volumes.join(", ")), h("td", {}, i.startHook || "–"))))))),
    h("div", { class: "card" }, h("h2", {}, "Jobs"), mine.length ? jobsTable(mine) : h("p", { class: "muted" }, "None yet.")),
    h("div", { class: "card" }, h("h2", {}, "Source"), h("pre", {}, p.source)));
}

// ---- jobs -------------------------------------------------------------------------------

function jobsTable(jobs) {
  return h("table", {}, h("thead", {}, h("tr", {}, ["Job", "Plan", "Operation", "State", "Started", "Took"].map(t => h("th", {}, t)))),
    h("tbody", {}, jobs.map(j => h("tr", { "data-job": j.id },
      h("td", {}, link("#/job/" + encodeURIComponent(j.id), j.id)), h("td", {}, j.plan), h("td", {}, j.operation),
      h("td", {}, badge(j.state, stateKind(j.state))), h("td", {}, time(j.createdAt)),
      h("td", { class: "num" }, span(j.createdAt, j.endedAt))))));
}

async function jobsPage() {
  const jobs = await api("GET", "/v1/jobs");
  return h("div", { id: "jobs" }, h("h1", {}, "Jobs"), jobs.length ? jobsTable(jobs) : h("p", { class: "muted" }, "None yet."));
}

async function jobPage([id]) {
  const base = "/v1/jobs/" + encodeURIComponent(id);
  const j = await api("GET", base);
  const actions = [];
  if (can("operator") && j.state === "waiting") {
    const resume = h("button", { class: "write primary", id: "resume" }, "Resume past the gate");
    resume.addEventListener("click", () => act(resume, "resume", () => api("POST", base + "/resume").then(route)));
    actions.push(resume);
  }
  if (can("operator") && (j.state === "running" || j.state === "waiting")) {
    const cancel = h("button", { class: "write danger", id: "cancel" }, "Cancel");
    cancel.addEventListener("click", () => { if (confirm("Cancel job " + j.id + "?")) act(cancel, "cancel", () => api("POST", base + "/cancel").then(route)); });
    actions.push(cancel);
  }
  const waitingStep = j.steps.find(s => s.state === "waiting");
  const report = Object.entries(j.report || {}).sort(([a], [b]) => a.localeCompare(b));
  return h("div", { id: "job", "data-state": j.state },
    h("h1", {}, j.operation + " of " + j.plan + " ", h("span", { id: "job-state" }, badge(j.state, stateKind(j.state)))),
    h("p", { class: "muted" }, "Job " + j.id + ", started " + time(j.createdAt) + (j.endedAt ? ", ended " + time(j.endedAt) : "") + ", took " + span(j.createdAt, j.endedAt)),
    j.error ? h("div", { class: "banner bad" }, j.error) : null,
    waitingStep ? h("div", { class: "banner warn", id: "gate" }, "Waiting: " + (waitingStep.detail || waitingStep.name)) : null,
    h("div", { class: "actions" }, actions),
    h("div", { class: "card" }, h("h2", {}, "Steps"),
      h("table", { id: "steps" }, h("thead", {}, h("tr", {}, ["", "Step", "Group", "Started", "Took", "Progress", "Detail"].map(t => h("th", {}, t)))),
        h("tbody", {}, j.steps.map(s => h("tr", { "data-step-state": s.state },
          h("td", {}, badge(s.state, stateKind(s.state))), h("td", {}, s.name), h("td", {}, s.group || ""),
          h("td", {}, s.startedAt ? new Date(s.startedAt).toLocaleTimeString() : "–"),
          h("td", { class: "num" }, s.startedAt ? span(s.startedAt, s.endedAt) : "–"),
          h("td", {}, s.progress !== undefined ? h("span", { class: "progress" }, h("span", { style: "width:" + (100 * s.progress).toFixed(0) + "%" })) : ""),
          h("td", {}, s.error ? h("span", { class: "error" }, s.error) : (s.detail || ""))))))),
    h("div", { class: "card", id: "report" }, h("h2", {}, j.operation === "drill" ? "Drill report" : "Report"),
      report.length ? h("table", {}, h("tbody", {}, report.map(([k, v]) => h("tr", { "data-key": k },
        h("th", {}, k.replace(/_/g, " ")), h("td", { class: /rpo|rto/.test(k) ? "big" : "" }, v)))))
        : h("p", { class: "muted" }, j.state === "running" || j.state === "waiting" ? "When it ends." : "Nothing reported.")));
}
jobPage.refresh = 1000;

// ---- alerts -----------------------------------------------------------------------------

async function alertsPage() {
  const alerts = await api("GET", "/v1/alerts?all=true");
  const delivery = a => {
    const d = a.deliveries || [];
    if (!d.length) return h("span", { class: "muted" }, "no webhook");
    const last = d[d.length - 1];
    return h("span", { title: d.map(x => x.event + " #" + x.attempt + " " + (x.delivered ? "ok" : (x.error || ""))).join("\n") },
      d.filter(x => x.delivered).length + " delivered, " + d.length + " attempts" + (last.delivered ? "" : " (last: " + (last.error || "failed") + ")"));
  };
  return h("div", { id: "alerts" }, h("h1", {}, "Alerts"),
    alerts.length === 0 ? h("p", { class: "muted" }, "No alert has fired.") :
    h("table", {}, h("thead", {}, h("tr", {}, ["Opened", "State", "Severity", "Rule", "Message", "Resolved", "Webhooks"].map(t => h("th", {}, t)))),
      h("tbody", {}, alerts.map(a => h("tr", { "data-alert": a.id, "data-alert-rule": a.rule },
        h("td", {}, time(a.openedAt)), h("td", {}, badge(a.state, a.state === "firing" ? "bad" : "ok")),
        h("td", {}, a.severity), h("td", {}, a.rule), h("td", {}, a.message), h("td", {}, a.resolvedAt ? time(a.resolvedAt) : "–"),
        h("td", {}, delivery(a)))))));
}

// ---- audit ------------------------------------------------------------------------------

async function auditPage(_, params) {
  const entries = await api("GET", "/v1/audit?limit=500");
  const filter = params.get("q") || "";
  const shown = filter ? entries.filter(e => [e.actor, e.action, e.target, e.detail].join(" ").toLowerCase().includes(filter.toLowerCase())) : entries;
  const input = h("input", { class: "filter", placeholder: "filter (actor, action, target, detail)", value: filter });
  input.addEventListener("change", () => { location.hash = "#/audit?q=" + encodeURIComponent(input.value); });
  return h("div", { id: "audit" }, h("h1", {}, "Audit log"), input,
    h("table", {}, h("thead", {}, h("tr", {}, ["When", "Who", "Action", "Target", "Detail"].map(t => h("th", {}, t)))),
      h("tbody", {}, shown.map(e => h("tr", {}, h("td", {}, time(e.at)), h("td", {}, e.actor), h("td", {}, e.action),
        h("td", {}, e.target), h("td", {}, e.detail))))));
}
auditPage.refresh = 60000;

// ---- start ------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", async () => {
  if (!sessionStorage.getItem(TOKEN_KEY)) return showSignIn();
  try {
    me = await api("GET", "/v1/whoami");
    start();
  } catch (e) {
    if (!(e instanceof APIError && e.status === 401)) showSignIn(e.message);
  }
});
