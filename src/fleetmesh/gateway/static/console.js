// fleetmesh console: a small single-page app over the public HTTP API.
"use strict";

const view = document.getElementById("view");
const keyInput = document.getElementById("api-key");
const KEY = "fleetmesh.apiKey";

function apiKey() { return localStorage.getItem(KEY) || ""; }

document.getElementById("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  localStorage.setItem(KEY, keyInput.value.trim());
  keyInput.value = "";
  route();
});

async function api(path) {
  const response = await fetch(path, { headers: { Authorization: "Bearer " + apiKey() } });
  const body = response.headers.get("content-type")?.includes("json") ? await response.json() : null;
  if (!response.ok) {
    const error = new Error((body && (body.detail || body.title)) || response.statusText);
    error.status = response.status;
    throw error;
  }
  return body;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "class") node.className = value; else node.setAttribute(name, value);
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(child ?? ""));
  }
  return node;
}

function pill(text) { return el("span", { class: "pill " + text }, text); }

function card(label, value) {
  return el("div", { class: "card" }, el("div", { class: "value" }, String(value)),
    el("div", { class: "label" }, label));
}

function table(headers, rows) {
  const head = el("tr", {}, ...headers.map((h) => el("th", {}, h)));
  return el("table", {}, el("thead", {}, head),
    el("tbody", {}, ...rows.map((cells) => el("tr", {}, ...cells.map((c) => el("td", {}, c))))));
}

// One horizontal bar per type, a segment per status, as wide as its share of the devices.
function statusBar(counts) {
  const total = Object.values(counts).reduce((a, b) => a + b, 0) || 1;
  const segments = Object.entries(counts).filter(([, n]) => n > 0).map(([status, n]) =>
    el("span", { class: "segment " + status, style: `width: ${(100 * n) / total}%`,
      title: `${status}: ${n}` }, n / total >= 0.08 ? `${status} ${n}` : ""));
  return el("div", { class: "status-bar" }, ...segments);
}

function show(...nodes) { view.replaceChildren(...nodes); }

function failure(error) {
  if (error.status === 401) {
    return el("p", { class: "error" },
      "Paste an API key above (the admin key is in the data dir, file admin.key).");
  }
  return el("p", { class: "error" }, "Could not load: " + error.message);
}

async function fleetView() {
  const heading = el("h1", {}, "Fleet");
  try {
    const fleet = await api("/api/v1/fleet/status").catch(async (error) => {
      if (error.status !== 404) throw error;
      const page = await api("/api/v1/devices?limit=1000");
      const counts = {};
      for (const d of page.items) counts[d.status] = (counts[d.status] || 0) + 1;
      return { total: page.items.length, by_status: counts, by_type: {}, lowest_health: [] };
    });
    const byStatus = fleet.by_status || {};
    const cards = el("div", { class: "cards", id: "fleet-cards" }, card("devices", fleet.total ?? 0),
      ...Object.entries(byStatus).map(([status, n]) => card(status, n)));
    const types = Object.entries(fleet.by_type || {}).map(([type, n]) => [type, String(
      typeof n === "object" ? Object.values(n).reduce((a, b) => a + b, 0) : n),
      typeof n === "object" ? statusBar(n) : ""]);
    const lowest = (fleet.lowest_health || []).map((d) => [
      el("a", { href: "#/devices/" + encodeURIComponent(d.device_id) }, d.device_id),
      d.score == null ? "–" : String(Math.round(d.score)), pill(d.status || ""),
      (d.reasons || []).join("; ")]);
    const changed = (fleet.recently_changed || []).map((c) => [
      el("a", { href: "#/devices/" + encodeURIComponent(c.device_id) }, c.device_id),
      new Date(c.at).toLocaleString(), `${c.previous} → ${c.current}`, c.cause || ""]);
    show(heading, cards,
      el("h2", {}, "By type"), types.length ? table(["type", "devices", "status"], types) : el("p", { class: "muted" }, "No device types yet."),
      el("h2", {}, "Lowest health"), lowest.length ? table(["device", "health", "status", "why"], lowest) : el("p", { class: "muted" }, "Nothing to show yet."),
      el("h2", {}, "Recently changed"), changed.length ? table(["device", "at", "change", "cause"], changed) : el("p", { class: "muted" }, "No status changes yet."));
  } catch (error) { show(heading, failure(error)); }
}

async function devicesView() {
  const heading = el("h1", {}, "Devices");
  try {
    const page = await api("/api/v1/devices?limit=200");
    const rows = page.items.map((d) => [
      el("a", { href: "#/devices/" + encodeURIComponent(d.id) }, d.id), d.name || "", d.type,
      pill(d.status), new Date(d.registered_at).toLocaleString()]);
    show(heading, rows.length ? table(["id", "name", "type", "registry", "registered"], rows)
      : el("p", { class: "muted" }, "No devices yet: register one with the API or `fleetmesh devices register`."));
  } catch (error) { show(heading, failure(error)); }
}

async function deviceView(id) {
  const heading = el("h1", {}, "Device " + id);
  try {
    const device = await api("/api/v1/devices/" + encodeURIComponent(id));
    const parts = [heading, el("div", { class: "row" }, pill(device.status), el("span", { class: "muted" },
      `type ${device.type} · registered ${new Date(device.registered_at).toLocaleString()}`))];
    const status = await api(`/api/v1/devices/${encodeURIComponent(id)}/status`).catch(() => null);
    if (status) {
      parts.push(el("div", { class: "cards", id: "status-cards" }, card("status", status.status),
        card("availability 24h", status.availability?.percent == null ? "–" : status.availability.percent.toFixed(1) + "%"),
        card("health", status.health?.score == null ? "–" : Math.round(status.health.score))));
      const reasons = (status.health?.components || []).map((c) => [c.name, c.score == null ? "–" : String(Math.round(c.score)), c.reason]);
      if (reasons.length) parts.push(table(["component", "score", "why"], reasons));
    }
    const latest = await api(`/api/v1/devices/${encodeURIComponent(id)}/telemetry/latest`).catch(() => null);
    const metrics = latest ? Object.keys(latest.metrics || {}) : [];
    if (metrics.length) {
      const select = el("select", { id: "metric" }, ...metrics.map((m) => el("option", { value: m }, m)));
      const holder = el("div", { class: "chart", id: "chart" });
      select.addEventListener("change", () => drawChart(id, select.value, holder));
      parts.push(el("h2", {}, "Telemetry"), el("div", { class: "row" }, select), holder);
      show(...parts);
      drawChart(id, metrics[0], holder);
    } else {
      parts.push(el("p", { class: "muted" }, "No telemetry yet."));
      show(...parts);
    }
  } catch (error) { show(heading, failure(error)); }
}

async function drawChart(id, metric, holder) {
  const from = new Date(Date.now() - 3600 * 1000).toISOString();
  const query = `metric=${encodeURIComponent(metric)}&from=${from}&agg=avg&interval=10s`;
  const data = await api(`/api/v1/devices/${encodeURIComponent(id)}/telemetry?${query}`);
  const buckets = data.buckets || [];
  const xs = buckets.map((b) => new Date(b.start).getTime() / 1000);
  const ys = buckets.map((b) => b.value);
  holder.replaceChildren();
  new uPlot({ width: Math.min(1100, holder.clientWidth || 900), height: 300, title: metric,
    axes: [{}, { size: 70 }],
    series: [{}, { label: metric + " (avg 10s)", stroke: "#0284c7", width: 2 }] }, [xs, ys], holder);
}

async function eventsView() {
  const heading = el("h1", {}, "Events");
  try {
    const page = await api("/api/v1/events?limit=200");
    const rows = page.items.slice().reverse().map((e) => [String(e.sequence ?? ""),
      new Date(e.time).toLocaleString(), e.type, e.subject || ""]);
    show(heading, table(["#", "time", "type", "subject"], rows));
  } catch (error) { show(heading, failure(error)); }
}

async function servicesView() {
  const heading = el("h1", {}, "Services");
  try {
    const services = await api("/api/v1/services");
    const items = Array.isArray(services) ? services : services.items || [];
    show(heading, table(["service", "instances"], items.map((s) => [s.name, JSON.stringify(s.instances ?? s.counts ?? "")])));
  } catch (error) { show(heading, failure(error)); }
}

function route() {
  const hash = location.hash.replace(/^#/, "") || "/";
  const device = hash.match(/^\/devices\/(.+)$/);
  if (device) return deviceView(decodeURIComponent(device[1]));
  if (hash === "/devices") return devicesView();
  if (hash === "/events") return eventsView();
  if (hash === "/services") return servicesView();
  return fleetView();
}

window.addEventListener("hashchange", route);
route();
setInterval(() => { if (!document.hidden && !location.hash.startsWith("#/devices/")) route(); }, 5000);
