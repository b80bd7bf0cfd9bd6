// Drives the site dashboard in Debian's Chromium (headless) with playwright-core:
// signs in through the form, waits for the tunnel rows and a drawn traffic chart, visits
// every page and keeps a screenshot of each. Prints one JSON document of what it saw.
//
//   node dashboard.mjs CONFIG.json
//   CONFIG: {"url": "https://127.0.0.1:PORT", "token": "...", "out": "DIR",
//            "tunnels": N, "timeout_ms": 20000, "chromium": "/usr/bin/chromium",
//            "down": "CONNECTOR"}
// With "down": at the end, back on the connections page, prints the line READY (the caller
// then stops that connector) and waits, with no reload, until the page shows no tunnel of
// that connector up (stale or down), for a screenshot: dashboard-connector-down.png.
import {readFileSync} from 'node:fs';
import {createRequire} from 'node:module';
import path from 'node:path';
import {fileURLToPath} from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const require = createRequire(path.join(here, '..', 'package.json'));
const {chromium} = require('playwright-core');

const cfg = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const timeout = cfg.timeout_ms || 20000;
const PAGES = ['connections', 'traffic', 'egress', 'devices', 'certificates', 'alerts'];
const result = {screenshots: [], csp_violations: [], console_errors: [], page_errors: [],
                failed_requests: [], steps: []};

function step(what) {
  result.steps.push(`${new Date().toISOString()} ${what}`);
}

// The drawn pixels of a chart's canvas in the colour of its first series.
async function seriesPixels(page, chart) {
  return page.evaluate((id) => {
    const canvas = document.querySelector(`[data-chart="${id}"] canvas`);
    if (!canvas) return -1;
    const ctx = canvas.getContext('2d');
    const {data} = ctx.getImageData(0, 0, canvas.width, canvas.height);
    let n = 0;
    for (let i = 0; i < data.length; i += 4) {   // the first series: #2563eb
      if (Math.abs(data[i] - 0x25) < 24 && Math.abs(data[i + 1] - 0x63) < 24 &&
          Math.abs(data[i + 2] - 0xeb) < 24 && data[i + 3] > 200) n++;
    }
    return n;
  }, chart);
}

async function tunnelRows(page) {
  return page.$$eval('[data-tunnel-row]', (rows) => rows.map((r) => ({
    gateway: r.dataset.gateway, connector: r.dataset.connector, state: r.dataset.state,
    stale: r.classList.contains('stale'), text: r.innerText})));
}

async function shoot(page, name) {
  const file = path.join(cfg.out, `dashboard-${name}.png`);
  await page.screenshot({path: file, fullPage: true});
  result.screenshots.push(file);
}

async function visit(page, name) {
  const before = await page.evaluate(() => document.getElementById('main').dataset.ready || '');
  await page.evaluate((n) => { location.hash = `#/${n}`; }, name);
  await page.waitForFunction(([n, b]) => {
    const m = document.getElementById('main');
    return m.dataset.page === n && m.dataset.ready && m.dataset.ready !== b &&
           m.dataset.complete === 'true';
  }, [name, before], {timeout});
}

async function main() {
  const browser = await chromium.launch({
    executablePath: cfg.chromium || '/usr/bin/chromium', headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
           '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  try {
    // the site's certificate is of the site's own CA, which this browser does not know
    const context = await browser.newContext({ignoreHTTPSErrors: true,
                                              viewport: {width: 1280, height: 900}});
    await context.addInitScript(() => {
      window.__csp = [];
      document.addEventListener('securitypolicyviolation', (e) => {
        window.__csp.push(`${e.violatedDirective} ${e.blockedURI} ${e.sourceFile}:${e.lineNumber}`);
      });
    });
    const page = await context.newPage();
    page.setDefaultTimeout(timeout);
    page.on('console', (m) => {
      if (m.type() === 'error') result.console_errors.push(m.text());
    });
    page.on('pageerror', (e) => result.page_errors.push(String(e)));
    page.on('requestfailed', (r) => result.failed_requests.push(`${r.url()} ${r.failure()?.errorText}`));

    step('open /ui/ without a session');
    await page.goto(`${cfg.url}/ui/`);
    result.redirected_to = new URL(page.url()).pathname;
    await shoot(page, 'sign-in');
    step('sign in through the form');
    await page.fill('#token', cfg.token);
    await Promise.all([page.waitForURL(`${cfg.url}/ui/`), page.click('button[type=submit]')]);
    result.cookies = (await context.cookies()).map((c) => ({
      name: c.name, httpOnly: c.httpOnly, secure: c.secure, sameSite: c.sameSite, path: c.path}));
    result.script_sees_cookie = await page.evaluate(() => document.cookie.includes('cmg_session'));

    step('connections: wait for the tunnel rows');
    await page.waitForFunction((n) =>
      document.querySelectorAll('[data-tunnel-row][data-state="up"]').length >= n,
    cfg.tunnels || 1, {timeout});
    result.tunnel_rows = await tunnelRows(page);
    await shoot(page, 'connections');

    step('traffic: wait for a drawn chart');
    await visit(page, 'traffic');
    await page.waitForFunction(() => {
      const c = document.querySelector('[data-chart="traffic-day-requests"]');
      return c && Number(c.dataset.points) > 0 && c.querySelector('canvas');
    }, null, {timeout});
    result.traffic_points = Number(await page.getAttribute('[data-chart="traffic-day-requests"]',
                                                           'data-points'));
    result.traffic_pixels = await seriesPixels(page, 'traffic-day-requests');
    result.traffic_legend = await page.$$eval('[data-chart="traffic-day-requests"] .u-legend th',
                                              (th) => th.map((t) => t.innerText.trim()));
    await shoot(page, 'traffic');

    step('live: a later status shows without a reload');
    let loads = 0;   // whole documents loaded from here on: none, if the page lives on
    page.on('load', () => loads++);
    const first = await page.evaluate(() => document.getElementById('updated').textContent);
    await page.waitForFunction((t) => document.getElementById('updated').textContent !== t,
                               first, {timeout});

    for (const name of PAGES.filter((p) => p !== 'traffic' && p !== 'connections')) {
      step(`visit ${name}`);
      await visit(page, name);
      result[`${name}_text`] = (await page.innerText('main')).slice(0, 2000);
      await shoot(page, name);
    }
    if (cfg.down) {
      await visit(page, 'connections');
      step(`connections: READY; wait for ${cfg.down}'s tunnels to be shown down or stale`);
      process.stdout.write('READY\n');
      const t0 = Date.now();
      await page.waitForFunction((c) => {
        const rows = [...document.querySelectorAll(`[data-tunnel-row][data-connector="${c}"]`)];
        return rows.length && rows.every((r) => r.dataset.state !== 'up' ||
                                                r.classList.contains('stale'));
      }, cfg.down, {timeout});
      result.down_ms = Date.now() - t0;
      result.down_rows = await tunnelRows(page);
      await shoot(page, 'connector-down');
    }
    result.live_reloads = loads;
    result.csp_violations = await page.evaluate(() => window.__csp);

    step('sign out');
    await Promise.all([page.waitForURL(`${cfg.url}/ui/login`),
                       page.click('form[action="/ui/logout"] button')]);
    result.after_sign_out = new URL(page.url()).pathname;
    result.ok = true;
  } catch (e) {
    result.ok = false;
    result.error = String(e && e.stack || e);
  } finally {
    await browser.close();
  }
}

await main();
process.stdout.write(JSON.stringify(result, null, 1) + '\n');
