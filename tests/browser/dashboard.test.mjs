// The dashboard in a real browser. Starts `portcullis demo` on free loopback ports,
// sends traffic through its proxy, loads the dashboard in headless Chromium (Debian's
// `chromium`, driven by playwright-core) and checks what a person would see: the demo's
// routes and endpoints, its HTTPRoute beside the Ingress (kind, weights, filter) and its
// Gateway, its certificate, no diagnostics, a non-zero live request rate for the demo
// Ingress, and a layout without horizontal scrolling at phone width. Then `portcullis
// run` on Gateway API manifests with problems: a listener that is not programmed and an
// HTTPRoute that does not attach, and why. Exits non-zero on the first failed check.
// Everything stays on 127.0.0.1, every loop is bounded in count and time, and the whole
// run has a deadline.
//
// Environment:
//   PORTCULLIS_BIN  the binary (default ../../target/debug/portcullis)
//   CHROMIUM        the browser (default /usr/bin/chromium)
//   SCREENSHOT_DIR  when set, dashboard.png (1366 px wide), dashboard-phone.png
//                   (390 px wide) and dashboard-gateway-problems.png (the Gateway API
//                   panel of the manifests with problems) are written there

import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import http from "node:http";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const here = path.dirname(fileURLToPath(import.meta.url));
const BIN = process.env.PORTCULLIS_BIN || path.join(here, "../../target/debug/portcullis");
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const SCREENSHOT_DIR = process.env.SCREENSHOT_DIR || "";
const DEADLINE_MS = 180_000;
const ARGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];

const cleanups = [];
async function cleanup() {
  while (cleanups.length) {
    try {
      await cleanups.pop()();
    } catch {
      // Best effort: the process is exiting.
    }
  }
}

const deadline = setTimeout(async () => {
  console.error(`FAIL: the browser test did not finish within ${DEADLINE_MS / 1000} s`);
  await cleanup();
  process.exit(1);
}, DEADLINE_MS);

function log(msg) {
  console.log(`[browser] ${msg}`);
}

/// Starts `portcullis demo` on port 0 everywhere; resolves with the bound addresses it
/// prints on its first line.
function startDemo() {
  return new Promise((resolve, reject) => {
    const child = spawn(
      BIN,
      [
        "demo",
        "--http-addr", "127.0.0.1:0",
        "--https-addr", "127.0.0.1:0",
        "--admin-addr", "127.0.0.1:0",
        "--dashboard-addr", "127.0.0.1:0",
      ],
      { stdio: ["ignore", "pipe", "pipe"] },
    );
    cleanups.push(() => {
      child.kill("SIGKILL");
    });
    let out = "";
    let err = "";
    const timer = setTimeout(() => reject(new Error(`demo printed no addresses in 60 s:\n${out}\n${err}`)), 60_000);
    child.stderr.on("data", (d) => {
      err = (err + d).slice(-4000);
    });
    child.on("exit", (code) => {
      clearTimeout(timer);
      reject(new Error(`demo exited with ${code}:\n${out}\n${err}`));
    });
    child.on("error", (e) => {
      clearTimeout(timer);
      reject(new Error(`cannot start ${BIN}: ${e.message}`));
    });
    child.stdout.on("data", (d) => {
      out += d;
      const m = out.match(/proxy on http:\/\/(\S+) and https:\/\/(\S+), admin on http:\/\/(\S+), dashboard on http:\/\/(\S+)/);
      if (m) {
        clearTimeout(timer);
        resolve({ http: m[1], dashboard: m[4] });
      }
    });
  });
}

/// Gateway API manifests with problems: listener `alt` is on a port that is not served
/// (PortUnavailable), and HTTPRoute default/lonely names a Gateway whose listener admits
/// routes from its own namespace only (NotAllowedByListeners).
const PROBLEM_MANIFESTS = `
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: web, namespace: default}
spec:
  gatewayClassName: portcullis
  listeners:
    - {name: http, protocol: HTTP, port: 80}
    - {name: alt, protocol: HTTP, port: 8081}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: internal, namespace: infra}
spec:
  gatewayClassName: portcullis
  listeners:
    - {name: http, protocol: HTTP, port: 80}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: lonely, namespace: default}
spec:
  parentRefs: [{name: internal, namespace: infra}]
  hostnames: [lonely.example.com]
  rules:
    - backendRefs: [{name: web, port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec: {ports: [{port: 80}]}
`;

/// Starts `portcullis run` on the manifests in `dir`, port 0 everywhere; resolves with
/// the dashboard address it logs.
function startRun(dir) {
  return new Promise((resolve, reject) => {
    const child = spawn(
      BIN,
      [
        "run", "--manifests", dir,
        "--http-addr", "127.0.0.1:0",
        "--https-addr", "127.0.0.1:0",
        "--admin-addr", "127.0.0.1:0",
        "--dashboard-addr", "127.0.0.1:0",
      ],
      { stdio: ["ignore", "ignore", "pipe"], env: { ...process.env, NO_COLOR: "1" } },
    );
    cleanups.push(() => {
      child.kill("SIGKILL");
    });
    let err = "";
    const timer = setTimeout(() => reject(new Error(`run logged no addresses in 60 s:\n${err}`)), 60_000);
    child.on("exit", (code) => {
      clearTimeout(timer);
      reject(new Error(`run exited with ${code}:\n${err}`));
    });
    child.on("error", (e) => {
      clearTimeout(timer);
      reject(new Error(`cannot start ${BIN}: ${e.message}`));
    });
    child.stderr.on("data", (d) => {
      err = (err + d).slice(-8000);
      const m = err.match(/portcullis listening .*dashboard=(\S+)/);
      if (m) {
        clearTimeout(timer);
        resolve({ dashboard: m[1] });
      }
    });
  });
}

const agent = new http.Agent({ keepAlive: true, maxSockets: 4 });
cleanups.push(() => agent.destroy());

/// One GET through the proxy with the given Host header.
function get(addr, host, urlPath, headers) {
  const [hostname, port] = [addr.slice(0, addr.lastIndexOf(":")), addr.slice(addr.lastIndexOf(":") + 1)];
  return new Promise((resolve, reject) => {
    const req = http.request(
      { hostname, port: Number(port), path: urlPath, method: "GET", headers: { host, ...headers }, agent, timeout: 10_000 },
      (res) => {
        let body = "";
        res.setEncoding("utf8");
        res.on("data", (c) => {
          body += c;
        });
        res.on("end", () => resolve({ status: res.statusCode, body }));
      },
    );
    req.on("timeout", () => req.destroy(new Error(`GET ${host}${urlPath} timed out`)));
    req.on("error", reject);
    req.end();
  });
}

let sent = 0;
/// `rounds` × three requests to the demo Ingress: both hosts, both paths of demo.localhost.
async function sendTraffic(proxy, rounds) {
  for (let i = 0; i < rounds; i++) {
    for (const [host, p] of [["demo.localhost", "/"], ["demo.localhost", "/api/users"], ["api.localhost", "/"]]) {
      const r = await get(proxy, host, p);
      assert.equal(r.status, 200, `GET http://${host}${p} through the proxy: ${r.status} ${r.body}`);
      sent++;
    }
  }
}

async function main() {
  const demo = await startDemo();
  log(`demo: proxy ${demo.http}, dashboard ${demo.dashboard}`);
  await sendTraffic(demo.http, 10);

  const userDataDir = mkdtempSync(path.join(os.tmpdir(), "portcullis-chromium-"));
  cleanups.push(() => rmSync(userDataDir, { recursive: true, force: true }));
  const context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: CHROMIUM,
    headless: true,
    args: ARGS,
    viewport: { width: 1366, height: 900 },
    timeout: 60_000,
  });
  cleanups.push(() => context.close());
  const page = context.pages()[0] || (await context.newPage());
  page.setDefaultTimeout(15_000);
  const problems = [];
  page.on("console", (m) => {
    if (m.type() === "error" || m.type() === "warning") problems.push(`console ${m.type()}: ${m.text()}`);
  });
  page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
  page.on("requestfailed", (r) => problems.push(`request failed: ${r.url()} ${r.failure()?.errorText}`));

  const url = `http://${demo.dashboard}/`;
  const resp = await page.goto(url, { waitUntil: "load" });
  assert.equal(resp.status(), 200, `GET ${url}`);
  assert.equal(await page.title(), "Portcullis dashboard");

  // Routes of the demo: both virtual hosts, the path split, and their endpoints.
  await page.waitForSelector('[data-vhost="demo.localhost"] [data-route="demo.localhost/api"]');
  await page.waitForSelector('[data-vhost="api.localhost"] [data-route="api.localhost/"]');
  const routeText = await page.locator('[data-route="demo.localhost/api"]').innerText();
  assert.match(routeText, /Prefix/);
  assert.match(routeText, /demo\/api:http/);
  assert.match(routeText, /Ingress demo\/demo/);
  const endpoints = await page.$$eval("#routing [data-endpoint]", (els) =>
    els.map((e) => ({ addr: e.dataset.endpoint, state: e.dataset.state, text: e.innerText })));
  // web (2 endpoints) under demo.localhost/ and the default backend; api (1) under two
  // routes; the HTTPRoute's canary (1) under its header rule and, with stable (1), its split.
  assert.equal(endpoints.length, 9, JSON.stringify(endpoints));
  assert.equal(new Set(endpoints.map((e) => e.addr)).size, 5, JSON.stringify(endpoints));
  for (const e of endpoints) {
    assert.equal(e.state, "ready", JSON.stringify(e));
    assert.match(e.text, /ready/);
    assert.match(e.text, /\d+ in flight/);
  }
  const vhostHead = await page.locator('[data-vhost="demo.localhost"] .vhost-head').innerText();
  assert.match(vhostHead, /TLS demo\/demo-tls/);

  // The demo's HTTPRoute beside the Ingress: its kind, the header rule's condition and
  // filter, and the split's weights, each backend with its endpoint.
  const split = page.locator('[data-vhost="shop.localhost"] [data-kind="HTTPRoute"][data-source="HTTPRoute demo/shop rule 1"]');
  await split.waitFor();
  const splitText = await split.innerText();
  assert.match(splitText, /HTTPRoute demo\/shop rule 1/);
  assert.match(await split.locator('[data-weight="90"]').innerText(), /90%[\s\S]*demo\/stable:80[\s\S]*ready/);
  assert.match(await split.locator('[data-weight="10"]').innerText(), /10%[\s\S]*demo\/canary:80[\s\S]*ready/);
  const header = page.locator('[data-vhost="shop.localhost"] [data-source="HTTPRoute demo/shop rule 0"]');
  assert.equal(await header.getAttribute("data-kind"), "HTTPRoute");
  assert.match(await header.locator('[data-field="conditions"]').innerText(), /when header x-canary = yes/);
  assert.match(await header.locator('[data-filter="RequestHeaderModifier"]').innerText(), /RequestHeaderModifier/);
  assert.match(await header.innerText(), /demo\/canary:80/);
  // Its Gateway and listener, and the route attached to it.
  const gateway = await page.locator('[data-gateway="demo/demo"]').innerText();
  assert.match(gateway, /class portcullis/);
  assert.match(gateway, /programmed/);
  assert.match(await page.locator('[data-listener="demo/demo/http"]').innerText(), /served on http[\s\S]*1 route attached/);
  const attached = page.locator('[data-route-object="HTTPRoute demo/shop"]');
  assert.equal(await attached.getAttribute("data-attached"), "true");
  assert.match(await attached.innerText(), /shop\.localhost[\s\S]*Accepted[\s\S]*ResolvedRefs/);
  // The header match through the proxy, and the HTTPRoute's row in the traffic table.
  const canary = await get(demo.http, "shop.localhost", "/", { "x-canary": "yes" });
  assert.equal(canary.status, 200, canary.body);
  assert.equal(JSON.parse(canary.body).name, "canary-1");
  await page.waitForSelector('tr[data-traffic="HTTPRoute demo/shop"]');

  // Live traffic: send requests while the page polls, until it shows a rate above 0.
  const rpsCell = page.locator('tr[data-traffic="Ingress demo/demo"] td[data-field="rps"]');
  let rps = 0;
  for (let round = 0; round < 15 && rps <= 0; round++) {
    await sendTraffic(demo.http, 5);
    try {
      await page.waitForFunction(() => {
        const c = document.querySelector('tr[data-traffic="Ingress demo/demo"] td[data-field="rps"]');
        return c && Number(c.dataset.value) > 0;
      }, null, { timeout: 5_000 });
    } catch {
      // Not yet: another round of traffic.
    }
    rps = Number(await rpsCell.getAttribute("data-value"));
  }
  assert.ok(rps > 0, `the demo Ingress shows requests/s ${rps} after ${sent} requests`);
  const shown = (await rpsCell.innerText()).trim();
  assert.ok(Number(shown.replace(/,/g, "")) > 0, `requests/s as shown: "${shown}"`);
  const total = Number(await page.locator('tr[data-traffic="Ingress demo/demo"] td[data-field="total"]').getAttribute("data-value"));
  assert.ok(total > 0 && total <= sent, `total ${total}, sent ${sent}`);
  const errorRate = await page.locator('tr[data-traffic="Ingress demo/demo"] td[data-field="error_rate"]').innerText();
  assert.match(errorRate, /^0%$/);
  const p99 = await page.locator('tr[data-traffic="Ingress demo/demo"] td[data-field="p99"]').innerText();
  assert.match(p99, /\d.* (ms|s)$/);
  const summaryRps = await page.locator('[data-card="rps"] .value').innerText();
  assert.ok(Number(summaryRps.replace(/,/g, "")) > 0, `summary requests/s "${summaryRps}"`);
  log(`demo/demo: ${shown} requests/s, p99 ${p99}, ${total} of ${sent} requests counted`);

  // The certificate of the demo, and no diagnostics.
  const cert = await page.locator('tr[data-secret="demo/demo-tls"]').innerText();
  assert.match(cert, /demo\.localhost/);
  assert.match(cert, /api\.localhost/);
  assert.match(cert, /Portcullis demo CA/);
  assert.match(cert, /(29|30) days/);
  assert.match(await page.locator("#diagnostics").innerText(), /No problems/);
  assert.match(await page.locator("#status").innerText(), /live/);

  // The filter hides what does not match.
  await page.fill("#filter", "api.localhost");
  await page.waitForFunction(() => !document.querySelector('[data-vhost="demo.localhost"]'));
  assert.equal(await page.locator('[data-vhost="api.localhost"]').count(), 1);
  await page.fill("#filter", "");
  await page.waitForSelector('[data-vhost="demo.localhost"]');
  await page.locator("#filter").blur();

  if (SCREENSHOT_DIR) {
    mkdirSync(SCREENSHOT_DIR, { recursive: true });
    await page.screenshot({ path: path.join(SCREENSHOT_DIR, "dashboard.png"), fullPage: true });
  }

  // Phone width: everything fits the screen's width, the figures are still there.
  await page.setViewportSize({ width: 390, height: 844 });
  // Reading scrollWidth makes the browser lay the page out at the new width first.
  const widths = await page.evaluate(() => ({
    scroll: document.documentElement.scrollWidth,
    inner: window.innerWidth,
  }));
  assert.ok(widths.scroll <= widths.inner, `horizontal overflow at phone width: ${JSON.stringify(widths)}`);
  assert.ok(await page.locator('tr[data-traffic="Ingress demo/demo"] td[data-field="rps"]').isVisible());
  assert.ok(await page.locator('[data-route="demo.localhost/api"]').isVisible());
  if (SCREENSHOT_DIR) {
    await page.screenshot({ path: path.join(SCREENSHOT_DIR, "dashboard-phone.png"), fullPage: true });
    log(`screenshots in ${SCREENSHOT_DIR}`);
  }

  assert.deepEqual(problems, [], "the page logged errors");

  // Gateway API manifests with problems: the dashboard says what is not served, and why.
  const dir = mkdtempSync(path.join(os.tmpdir(), "portcullis-gateway-"));
  cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
  writeFileSync(path.join(dir, "gateway.yaml"), PROBLEM_MANIFESTS);
  const run = await startRun(dir);
  log(`run: dashboard ${run.dashboard}`);
  await page.setViewportSize({ width: 1366, height: 900 });
  const resp2 = await page.goto(`http://${run.dashboard}/`, { waitUntil: "load" });
  assert.equal(resp2.status(), 200);
  const lonely = page.locator('[data-route-object="HTTPRoute default/lonely"]');
  await lonely.waitFor();
  assert.equal(await lonely.getAttribute("data-attached"), "false");
  const lonelyText = await lonely.innerText();
  assert.match(lonelyText, /not attached/);
  assert.match(lonelyText, /Gateway infra\/internal: NotAllowedByListeners/);
  assert.match(lonelyText, /admits HTTPRoutes from namespace default/);
  assert.equal(await lonely.locator('[data-parent="infra/internal"]').getAttribute("data-reason"), "NotAllowedByListeners");
  const alt = page.locator('[data-listener="default/web/alt"]');
  assert.equal(await alt.getAttribute("data-reason"), "PortUnavailable");
  assert.match(await alt.innerText(), /not programmed[\s\S]*PortUnavailable: port 8081/);
  assert.match(await page.locator('[data-listener="default/web/http"]').innerText(), /served on http/);
  assert.match(await page.locator("#diagnostics").innerText(), /NotAllowedByListeners/);
  if (SCREENSHOT_DIR) {
    await page.locator("#gateway-section").screenshot({ path: path.join(SCREENSHOT_DIR, "dashboard-gateway-problems.png") });
  }
  assert.deepEqual(problems, [], "the page logged errors");
  log("PASS: routes (Ingress and HTTPRoute), endpoints, certificate and live traffic shown; phone width fits; attachment problems shown");
}

try {
  await main();
  clearTimeout(deadline);
  await cleanup();
} catch (e) {
  console.error(`FAIL: ${e.stack || e}`);
  clearTimeout(deadline);
  await cleanup();
  process.exit(1);
}
