// Portcullis dashboard: polls the JSON API every 2 s and renders it. Read-only.
// Every value from the API is put into the page as text (never as HTML).
"use strict";

const API = "api/v1/state";
const REFRESH_MS = 2000;
const MAX_VHOSTS = 200;
const MAX_DIAGNOSTICS = 200;

let last = null;
let filter = "";

// ---- small DOM helpers -------------------------------------------------------------

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else node.setAttribute(k, String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function $(id) {
  return document.getElementById(id);
}

// ---- formatting ----------------------------------------------------------------------

const DASH = "–";

function fmtRate(v) {
  if (v === null || v === undefined) return DASH;
  if (v >= 100) return Math.round(v).toLocaleString();
  if (v >= 10) return v.toFixed(1);
  return v.toFixed(2);
}

function fmtPercent(v) {
  if (v === null || v === undefined) return DASH;
  if (v === 0) return "0%";
  if (v < 0.001) return "<0.1%";
  return (v * 100).toFixed(1) + "%";
}

function fmtSeconds(v) {
  if (v === null || v === undefined) return DASH;
  const ms = v * 1000;
  if (ms < 10) return ms.toFixed(1) + " ms";
  if (ms < 1000) return Math.round(ms) + " ms";
  return v.toFixed(2) + " s";
}

function fmtDays(d) {
  if (d < 0) return "expired";
  const n = Math.floor(d);
  return n === 1 ? "1 day" : n + " days";
}

function fmtTime(unix) {
  if (!unix) return DASH;
  return new Date(unix * 1000).toLocaleTimeString();
}

function ref(o) {
  return o ? o.namespace + "/" + o.name : DASH;
}

function clusterName(c) {
  return c.service.namespace + "/" + c.service.name + ":" + c.port;
}

function severity(v, warnAt, badAt) {
  if (v === null || v === undefined) return "";
  if (v >= badAt) return "bad";
  if (v >= warnAt) return "warn";
  return "";
}

function matches(...texts) {
  if (!filter) return true;
  return texts.some((t) => t && String(t).toLowerCase().includes(filter));
}

// ---- sections --------------------------------------------------------------------------

function card(label, value, sub, cls, key) {
  return el("div", { class: "card " + (cls || ""), "data-card": key },
    el("div", { class: "label" }, label),
    el("div", { class: "value" }, value),
    el("div", { class: "sub" }, sub || "\u00a0"));
}

function renderSummary(s) {
  const t = s.traffic.total;
  let endpoints = 0, ready = 0, ejected = 0, inFlight = 0, routes = 0;
  for (const c of s.clusters) {
    for (const e of c.endpoints) {
      endpoints++;
      if (e.state === "ready") ready++;
      if (e.ejected) ejected++;
      inFlight += e.in_flight;
    }
  }
  for (const vh of s.virtual_hosts) routes += vh.routes.length;
  const httpRoutes = s.gateway.routes.filter((r) => r.kind === "HTTPRoute").length;
  const errors = s.diagnostics.filter((d) => d.severity === "error").length;
  const warnings = s.diagnostics.length - errors;
  const soonest = s.certificates.reduce(
    (m, c) => (m === null || c.days_to_expiry < m ? c.days_to_expiry : m), null);
  const missing = s.tls_hosts.filter((h) => !h.certificate).length;

  $("summary").replaceChildren(
    card("Requests/s", fmtRate(t.requests_per_second),
      t.requests_total.toLocaleString() + " since start", "", "rps"),
    card("Error rate (5xx)", fmtPercent(t.error_rate),
      t.errors + " of " + t.requests + " in window", severity(t.error_rate, 0.01, 0.05), "errors"),
    card("Latency p50 / p99", fmtSeconds(t.p50_seconds),
      "p99 " + fmtSeconds(t.p99_seconds), "", "latency"),
    card("Routes", String(routes),
      s.virtual_hosts.length + " virtual host" + (s.virtual_hosts.length === 1 ? "" : "s") +
      ", " + s.served_ingresses.length + " Ingress" + (s.served_ingresses.length === 1 ? "" : "es") +
      (httpRoutes ? ", " + httpRoutes + " HTTPRoute" + (httpRoutes === 1 ? "" : "s") : ""),
      "", "routes"),
    card("Endpoints ready", ready + " / " + endpoints,
      (ejected ? ejected + " ejected, " : "") + inFlight + " in flight",
      ejected ? "warn" : "", "endpoints"),
    card("Certificates", String(s.certificates.length),
      soonest === null ? (missing ? missing + " host(s) without" : "none")
        : "soonest expires in " + fmtDays(soonest),
      soonest !== null && soonest < 3 ? "bad" : (soonest !== null && soonest < 14) || missing ? "warn" : "",
      "certificates"),
    card("Diagnostics", String(s.diagnostics.length),
      errors + " error" + (errors === 1 ? "" : "s") + ", " + warnings + " warning" + (warnings === 1 ? "" : "s"),
      errors ? "bad" : warnings ? "warn" : "", "diagnostics"));
}

function td(label, value, attrs) {
  return el("td", Object.assign({ "data-label": label }, attrs || {}), value);
}

function renderTraffic(s) {
  const tr = s.traffic;
  $("window").textContent = tr.window_seconds === null
    ? "(waiting for a second sample)"
    : "(last " + Math.round(tr.window_seconds) + " s)";
  // A route is its kind, namespace and name, as the metrics label it.
  const keyOf = (kind, namespace, name) => kind + " " + namespace + "/" + name;
  const byKey = new Map();
  for (const r of tr.routes) byKey.set(keyOf(r.kind, r.namespace, r.name), r);
  const rows = [];
  const seen = new Set();
  const add = (key, label, special, live) => {
    seen.add(key);
    rows.push({ key, label, special, live });
  };
  for (const ing of s.served_ingresses) {
    const key = keyOf("Ingress", ing.namespace, ing.name);
    add(key, key, false, byKey.get(key) || null);
  }
  // Gateway API routes that attached somewhere serve traffic beside the Ingresses.
  for (const r of s.gateway.routes) {
    if (!r.hostnames.length) continue;
    const key = keyOf(r.kind, r.namespace, r.name);
    if (!seen.has(key)) add(key, key, false, byKey.get(key) || null);
  }
  for (const [key, live] of byKey) {
    if (seen.has(key)) continue;
    // No kind: a request no route matched (no namespace either), or the default
    // backend of --default-backend-service (its Service's namespace).
    const special = live.kind === "";
    const label = !special ? key
      : live.namespace === "" ? "no route (404)" : "default backend (" + live.namespace + ")";
    add(key, label, special, live);
  }
  rows.sort((a, b) => {
    const ra = a.live ? a.live.requests : -1;
    const rb = b.live ? b.live.requests : -1;
    if (ra !== rb) return rb - ra;
    return a.label.localeCompare(b.label);
  });
  const body = [];
  for (const r of rows) {
    if (!matches(r.label)) continue;
    const l = r.live;
    const rps = l ? l.requests_per_second : null;
    const err = l ? l.error_rate : null;
    const errCls = severity(err, 0.01, 0.05);
    body.push(el("tr", { "data-traffic": r.key },
      el("td", { class: "first" }, r.special ? el("span", { class: "muted" }, r.label) : r.label),
      td("Requests/s", fmtRate(l ? rps : 0), { class: "num", "data-field": "rps", "data-value": rps === null ? "" : rps }),
      td("Errors (5xx)", fmtPercent(err), { class: "num " + (errCls ? errCls + "-text" : ""), "data-field": "error_rate", "data-value": err === null ? "" : err }),
      td("p50", fmtSeconds(l ? l.p50_seconds : null), { class: "num", "data-field": "p50" }),
      td("p99", fmtSeconds(l ? l.p99_seconds : null), { class: "num", "data-field": "p99" }),
      td("Total", l ? l.requests_total.toLocaleString() : "0", { class: "num", "data-field": "total", "data-value": l ? l.requests_total : 0 })));
  }
  if (!body.length) {
    body.push(el("tr", {}, el("td", { colspan: 6, class: "empty" },
      filter ? "No route matches the filter." : "No route is served yet.")));
  }
  $("traffic").tBodies[0].replaceChildren(...body);
}

function endpointChip(e) {
  const cls = ["ep", e.state];
  if (e.ejected) cls.push("ejected");
  if (!e.active) cls.push("inactive");
  const labels = [e.state.replace("_", " ")];
  if (e.ejected) labels.push("ejected");
  if (!e.active) labels.push("not balanced onto");
  return el("span", {
    class: cls.join(" "),
    "data-endpoint": e.address,
    "data-state": e.state,
    "data-ejected": e.ejected,
    "data-in-flight": e.in_flight,
    title: labels.join(", "),
  },
    el("span", { class: "dot", "aria-hidden": "true" }),
    el("span", { class: "addr" }, e.address),
    el("span", {}, labels[0]),
    e.ejected ? el("span", { class: "badge bad" }, "ejected") : null,
    el("span", { class: "inflight" }, e.in_flight + " in flight"));
}

function clusterDetail(c) {
  if (!c) return el("span", { class: "muted" }, "unknown cluster");
  if (c.kind === "unresolved") {
    return el("div", {}, el("span", { class: "badge bad" }, "503"), " ",
      el("span", { class: "bad-text" }, c.unresolved));
  }
  if (c.kind === "external_name") {
    return el("div", {}, el("span", { class: "badge" }, "ExternalName"), " ",
      el("span", { class: "mono" }, c.external_name));
  }
  if (!c.endpoints.length) return el("span", { class: "muted" }, "no endpoints");
  return el("div", { class: "eps" }, c.endpoints.map(endpointChip));
}

function backendLabel(c) {
  if (!c) return DASH;
  const parts = [el("span", { class: "mono" }, clusterName(c))];
  if (c.service_port !== null && String(c.service_port) !== String(c.port)) {
    parts.push(el("span", { class: "muted small" }, " (port " + c.service_port + ")"));
  }
  if (c.app_protocol) parts.push(" ", el("span", { class: "badge" }, c.app_protocol));
  return parts;
}

function fmtShare(p) {
  return Math.abs(p - Math.round(p)) < 0.05 ? Math.round(p) + "%" : p.toFixed(1) + "%";
}

// Where a route came from: "Ingress ns/name", or "HTTPRoute ns/name rule R[ match M]".
function sourceText(src) {
  const name = src.kind + " " + src.namespace + "/" + src.name;
  if (src.kind === "Ingress") return name;
  return name + " rule " + src.rule + (src.match ? " match " + src.match : "");
}

// "method POST, header x-canary = yes, query v ~ [0-9]+" (~: a regular expression).
function conditionsText(c) {
  const parts = [];
  if (c.method) parts.push("method " + c.method);
  for (const [what, list] of [["header", c.headers], ["query", c.query]]) {
    for (const v of list) parts.push(what + " " + v.name + (v.type === "Exact" ? " = " : " ~ ") + v.value);
  }
  return parts.join(", ");
}

function filterBadges(names) {
  return el("div", { class: "filters", "data-field": "filters" },
    names.map((f) => el("span", { class: "badge filter", "data-filter": f }, f)));
}

function redirectText(a) {
  const parts = [];
  if (a.scheme) parts.push("scheme " + a.scheme);
  if (a.hostname) parts.push("host " + a.hostname);
  if (a.port) parts.push("port " + a.port);
  if (a.path) parts.push(a.path.type + " " + a.path.value);
  return parts.length ? parts.join(", ") : "same URL";
}

// The weighted backends of a Gateway API route, one row each: share, Service, endpoints.
function backendRows(s, r) {
  return el("div", { class: "wbs" }, r.backends.map((b) => {
    const c = b.cluster === undefined || b.cluster === null ? null : s.clusters[b.cluster];
    return el("div", {
      class: "wb",
      "data-backend": b.valid && c ? clusterName(c) : "invalid",
      "data-weight": b.weight,
      "data-valid": String(b.valid),
    },
      el("div", {},
        el("span", { class: "badge weight", title: "weight " + b.weight + ", picked at random per request" },
          fmtShare(b.percent)), " ",
        b.valid ? backendLabel(c) : el("span", { class: "badge bad" }, "invalid backendRef: 500"),
        b.filters.length ? filterBadges(b.filters) : null),
      b.valid ? clusterDetail(c) : el("div", { class: "bad-text small" }, b.reason || ""));
  }));
}

// Columns two and three of a route: where it sends requests.
function routeTarget(s, r) {
  const a = r.action;
  if (a.type === "redirect") {
    return [el("div", {}, el("span", { class: "badge" }, "redirect " + a.status)),
      el("div", { class: "small" }, redirectText(a))];
  }
  if (a.type === "respond") {
    return [el("div", {}, el("span", { class: "badge bad" }, String(a.status))),
      el("div", { class: "small muted" }, a.body)];
  }
  if (r.source.kind !== "Ingress" && (r.backends.length > 1 || r.backends.some((b) => !b.valid))) {
    return [backendRows(s, r)];
  }
  const c = s.clusters[r.cluster];
  return [el("div", {}, backendLabel(c)), clusterDetail(c)];
}

function renderRouting(s) {
  const tlsByHost = new Map(s.tls_hosts.map((t) => [t.host, t]));
  const out = [];
  let shown = 0, hidden = 0;
  const cluster = (id) => s.clusters[id];
  for (const vh of s.virtual_hosts) {
    const routes = vh.routes.filter((r) => {
      const cs = r.backends.map((b) => cluster(b.cluster)).filter((c) => c);
      return matches(vh.host, r.path, ref(r.ingress), sourceText(r.source), ...r.filters,
        r.conditions && conditionsText(r.conditions),
        ...cs.map((c) => clusterName(c)),
        ...cs.map((c) => c.endpoints.map((e) => e.address).join(" ")));
    });
    if (!routes.length) continue;
    if (shown >= MAX_VHOSTS) { hidden++; continue; }
    shown++;
    const tls = tlsByHost.get(vh.host);
    const head = el("div", { class: "vhost-head" },
      el("span", { class: "vhost-host" }, vh.host === "*" ? "* (any host)" : vh.host),
      tls ? el("span", { class: "badge " + (tls.certificate ? "ok" : "warn"), title: "Secret " + ref(tls.secret) },
        tls.certificate ? "TLS " + ref(tls.secret) : "TLS: default certificate") : null,
      el("span", { class: "muted small" }, routes.length + " route" + (routes.length === 1 ? "" : "s")));
    const rows = routes.map((r) => el("div", {
      class: "route",
      "data-route": vh.host + r.path,
      "data-kind": r.source.kind,
      "data-source": sourceText(r.source),
    },
      el("div", {},
        el("span", { class: "badge" }, r.path_type), " ",
        el("span", { class: "path" }, r.path),
        r.conditions ? el("div", { class: "small mono", "data-field": "conditions" },
          "when " + conditionsText(r.conditions)) : null,
        el("div", { class: "muted small" }, sourceText(r.source)),
        r.filters.length ? filterBadges(r.filters) : null),
      routeTarget(s, r)));
    out.push(el("div", { class: "vhost", "data-vhost": vh.host }, head, rows));
  }
  if (s.default_backend) {
    const c = cluster(s.default_backend.cluster);
    if (matches("default backend", c && clusterName(c), ref(s.default_backend.ingress))) {
      out.push(el("div", { class: "vhost", "data-vhost": "(default backend)" },
        el("div", { class: "vhost-head" },
          el("span", { class: "vhost-host" }, "default backend"),
          el("span", { class: "muted small" },
            s.default_backend.ingress ? "from Ingress " + ref(s.default_backend.ingress) : "from --default-backend-service")),
        el("div", { class: "route" },
          el("div", { class: "muted" }, "anything no route matches"),
          el("div", {}, backendLabel(c)),
          clusterDetail(c))));
    }
  }
  if (hidden) out.push(el("div", { class: "more" }, hidden + " more virtual hosts: narrow them down with the filter."));
  if (!out.length) {
    out.push(el("div", { class: "more" }, filter ? "No route matches the filter." : "No routes: nothing is served yet."));
  }
  $("routing").replaceChildren(...out);
}

// Gateway API: each Gateway with its listeners, then each route and what became of each
// of its parentRefs, in the words of the status conditions.
function renderGateways(s) {
  const g = s.gateway;
  const out = [];
  const classes = g.classes.map((c) => c.name).join(", ") || "none";
  for (const gw of g.gateways) {
    const name = gw.namespace + "/" + gw.name;
    const listeners = gw.listeners.filter((l) =>
      matches(name, gw.class, l.name, l.hostname, l.reason, l.message, "Gateway"));
    if (!listeners.length) continue;
    const state = !gw.accepted ? ["bad", "not accepted"]
      : gw.programmed ? ["ok", "programmed"] : ["bad", "not programmed"];
    out.push(el("div", { class: "vhost", "data-gateway": name },
      el("div", { class: "vhost-head" },
        el("span", { class: "vhost-host" }, "Gateway " + name),
        el("span", { class: "badge" }, "class " + gw.class),
        el("span", { class: "badge " + state[0] }, state[1])),
      listeners.map((l) => el("div", {
        class: "route gwrow",
        "data-listener": name + "/" + l.name,
        "data-reason": l.reason,
        "data-programmed": String(l.programmed),
      },
        el("div", {},
          el("span", { class: "mono" }, l.name), " ",
          el("span", { class: "badge" }, l.protocol + " " + l.port),
          el("div", { class: "muted small" }, l.hostname || "any host")),
        el("div", {}, l.programmed
          ? el("span", { class: "badge ok" }, "served on " + l.served_on)
          : el("span", { class: "badge bad" }, "not programmed")),
        el("div", { class: l.programmed ? "" : "bad-text small" },
          l.programmed
            ? l.attached_routes + " route" + (l.attached_routes === 1 ? "" : "s") + " attached" +
              (l.reason !== "Accepted" ? " · " + l.reason + ": " + l.message : "")
            : l.reason + ": " + l.message)))));
  }
  const routes = g.routes.filter((r) => matches(r.kind, r.namespace + "/" + r.name, ...r.hostnames,
    ...r.parents.map((p) => p.accepted + " " + p.resolved_refs + " " + p.gateway.namespace + "/" + p.gateway.name)));
  if (routes.length) {
    out.push(el("div", { class: "vhost", "data-gateway-routes": "" },
      el("div", { class: "vhost-head" },
        el("span", { class: "vhost-host" }, "Routes and their parents"),
        el("span", { class: "muted small" }, routes.length + " route" + (routes.length === 1 ? "" : "s"))),
      routes.map((r) => {
        const name = r.namespace + "/" + r.name;
        return el("div", {
          class: "route gwrow",
          "data-route-object": r.kind + " " + name,
          "data-attached": String(r.hostnames.length > 0),
        },
          el("div", {}, el("span", { class: "badge" }, r.kind), " ", el("span", { class: "mono" }, name)),
          el("div", {}, r.hostnames.length
            ? el("span", { class: "mono small" }, r.hostnames.join(", "))
            : el("span", { class: "badge warn" }, "not attached")),
          el("div", {}, r.parents.map((p) => {
            const gwName = p.gateway.namespace + "/" + p.gateway.name +
              (p.section_name ? " listener " + p.section_name : "") + (p.port ? " port " + p.port : "");
            return el("div", { class: "small", "data-parent": p.gateway.namespace + "/" + p.gateway.name, "data-reason": p.accepted },
              "Gateway " + gwName + ": ",
              p.accepted === "Accepted" ? el("span", { class: "badge ok" }, "Accepted")
                : el("span", { class: "badge warn" }, p.accepted),
              p.accepted === "Accepted" ? null : el("span", { class: "muted" }, " " + p.accepted_message),
              " ",
              p.resolved_refs === "ResolvedRefs" ? el("span", { class: "badge ok" }, "ResolvedRefs")
                : el("span", { class: "badge bad" }, p.resolved_refs),
              p.resolved_refs === "ResolvedRefs" ? null : el("span", { class: "muted" }, " " + p.resolved_refs_message));
          })));
      })));
  }
  if (!out.length) {
    out.push(el("div", { class: "more" }, filter && (g.gateways.length || g.routes.length)
      ? "No Gateway or route matches the filter."
      : "No Gateways of our GatewayClasses (" + classes + ")."));
  }
  $("gateways").replaceChildren(...out);
}

function renderCerts(s) {
  const rows = [];
  for (const c of s.certificates) {
    if (!matches(ref(c.secret), c.issuer, c.subject, ...c.hosts, ...c.dns_names)) continue;
    const cls = c.days_to_expiry < 3 ? "bad-text" : c.days_to_expiry < 14 ? "warn-text" : "";
    rows.push(el("tr", { "data-secret": ref(c.secret) },
      el("td", { class: "first mono" }, ref(c.secret)),
      td("Hosts", (c.hosts.length ? c.hosts : c.dns_names).join(", ") || DASH),
      td("Issuer", c.issuer),
      td("Expires in", fmtDays(c.days_to_expiry), {
        class: "num " + cls,
        title: new Date(c.not_after * 1000).toISOString(),
        "data-value": c.days_to_expiry,
      })));
  }
  if (!rows.length) {
    rows.push(el("tr", {}, el("td", { colspan: 4, class: "empty" }, "No TLS certificates in use.")));
  }
  $("certs").tBodies[0].replaceChildren(...rows);
  const missing = s.tls_hosts.filter((h) => !h.certificate && matches(h.host, ref(h.secret)));
  $("tls-missing").replaceChildren(...missing.map((h) => el("li", {},
    el("span", { class: "badge warn" }, "default certificate"), " ",
    el("span", { class: "mono" }, h.host), " — Secret " + ref(h.secret) + " (Ingress " + ref(h.ingress) + ") has no usable certificate")));
}

function renderDiagnostics(s) {
  const items = [];
  for (const d of s.diagnostics) {
    const who = d.kind + " " + (d.namespace ? d.namespace + "/" : "") + d.name;
    if (!matches(who, d.field, d.reason)) continue;
    if (items.length >= MAX_DIAGNOSTICS) break;
    items.push(el("li", { class: d.severity },
      el("span", { class: "badge " + (d.severity === "error" ? "bad" : "warn") }, d.severity), " ",
      el("strong", {}, who),
      d.field ? el("span", { class: "mono muted" }, " " + d.field) : null,
      ": ", d.reason));
  }
  for (const i of s.ignored_ingresses) {
    if (!matches(i.namespace + "/" + i.name, i.reason)) continue;
    if (items.length >= MAX_DIAGNOSTICS) break;
    items.push(el("li", { class: "ignored" },
      el("span", { class: "badge" }, "ignored"), " ",
      el("strong", {}, "Ingress " + i.namespace + "/" + i.name), ": ", i.reason));
  }
  const total = s.diagnostics.length + s.ignored_ingresses.length;
  if (total > items.length && items.length >= MAX_DIAGNOSTICS) {
    items.push(el("li", { class: "none" }, (total - items.length) + " more: narrow them down with the filter."));
  }
  if (!items.length) {
    items.push(el("li", { class: "none" }, filter ? "No diagnostic matches the filter." : "No problems: everything is served as written."));
  }
  $("diagnostics").replaceChildren(...items);
}

function render(s) {
  $("meta").textContent = "generation " + s.generation +
    (s.published_at ? " · published " + fmtTime(s.published_at) : "") +
    " · updated " + fmtTime(s.time);
  $("version").textContent = "Portcullis " + s.version;
  renderSummary(s);
  renderTraffic(s);
  renderRouting(s);
  renderGateways(s);
  renderCerts(s);
  renderDiagnostics(s);
}

// ---- polling ---------------------------------------------------------------------------

function setStatus(ok, message) {
  const st = $("status");
  st.classList.toggle("live", ok);
  st.classList.toggle("down", !ok);
  $("status-text").textContent = ok ? "live" : "offline";
  const banner = $("banner");
  banner.hidden = ok;
  banner.textContent = ok ? "" : message;
}

async function poll() {
  try {
    const resp = await fetch(API, { cache: "no-store", headers: { accept: "application/json" } });
    if (!resp.ok) throw new Error("HTTP " + resp.status);
    last = await resp.json();
    render(last);
    setStatus(true, "");
  } catch (e) {
    setStatus(false, "Cannot reach " + API + " (" + e.message + "); showing the last state, retrying every 2 s.");
  } finally {
    setTimeout(poll, REFRESH_MS);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("filter").addEventListener("input", (ev) => {
    filter = ev.target.value.trim().toLowerCase();
    if (last) render(last);
  });
  poll();
});
