// The dashboard in a real browser. Starts `portcullis demo` on free loopback ports,
// sends traffic through its proxy, loads the dashboard in headless Chromium (Debian's
// `chromium`, driven by playwright-core) and checks what a person would see: the demo's
// routes and endpoints, its certificate, no diagnostics, a non-zero live request rate
// for the demo Ingress, and a layout without horizontal scrolling at phone width.
// Exits non-zero on the first failed check. Everything stays on 127.0.0.1, every loop is
// bounded in count and time, and the whole run has a deadline.
//
// Environment:
//   PORTCULLIS_BIN  the binary (default ../../target/debug/portcullis)
//   CHROMIUM        the browser (default /usr/bin/chromium)
//   SCREENSHOT_DIR  when set, dashboard.png (1366 px wide) and dashboard-phone.png
//                   (390 px wide) are written there

import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdirSync, mkdtempSync, rmSync } from "node:fs";
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

const agent = new http.Agent({ keepAlive: true, maxSockets: 4 });
cleanups.push(() => agent.destroy());

/// One GET through the proxy with the given Host header.
function get(addr, host, urlPath) {
  const [hostname, port] = [addr.slice(0, addr.lastIndexOf(":")), addr.slice(addr.lastIndexOf(":") + 1)];
  return new Promise((resolve, reject) => {
    const req = http.request(
      { hostname, port: Number(port), path: urlPath, method: "GET", headers: { host }, agent, timeout: 10_000 },
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
  // web (2 endpoints) under demo.localhost/ and the default backend; api (1) under two routes.
  assert.equal(endpoints.length, 6, JSON.stringify(endpoints));
  assert.equal(new Set(endpoints.map((e) => e.addr)).size, 3, JSON.stringify(endpoints));
  for (const e of endpoints) {
    assert.equal(e.state, "ready", JSON.stringify(e));
    assert.match(e.text, /ready/);
    assert.match(e.text, /\d+ in flight/);
  }
  const vhostHead = await page.locator('[data-vhost="demo.localhost"] .vhost-head').innerText();
  assert.match(vhostHead, /TLS demo\/demo-tls/);

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
  log("PASS: routes, endpoints, certificate and live traffic shown; phone width fits");
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
