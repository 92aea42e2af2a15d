// End-to-end tests of warren's management web UI in headless Chromium.
//
//   node tests/ui/run.mjs [path/to/warren]     (default: $WARREN_BIN or target/debug/warren)
//
// Starts the broker on free loopback ports with a temporary data dir, drives the UI
// with playwright-core against Debian's /usr/bin/chromium (override: $CHROMIUM),
// publishes over AMQP with amqplib, and saves a screenshot of each main page under
// tests/ui/output/. With UPDATE_SCREENSHOTS=1 it also refreshes docs/screenshots/.
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';
import amqp from 'amqplib';

const here = path.dirname(fileURLToPath(import.meta.url));
const root = path.resolve(here, '..', '..');
const binary = path.resolve(process.argv[2] || process.env.WARREN_BIN || path.join(root, 'target/debug/warren'));
const chromiumPath = process.env.CHROMIUM || '/usr/bin/chromium';
const outDir = path.join(here, 'output');
const docsDir = path.join(root, 'docs', 'screenshots');
const deadline = Date.now() + 300_000;

for (const [what, p] of [['warren binary', binary], ['chromium', chromiumPath]]) {
  if (!fs.existsSync(p)) { console.error(`${what} not found at ${p}`); process.exit(2); }
}
fs.mkdirSync(outDir, { recursive: true });

const freePort = () => new Promise((resolve, reject) => {
  const s = net.createServer();
  s.once('error', reject);
  s.listen(0, '127.0.0.1', () => { const { port } = s.address(); s.close(() => resolve(port)); });
});
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

const amqpPort = await freePort();
const adminPort = await freePort();
const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'warren-ui-'));
const base = `http://127.0.0.1:${adminPort}`;
const guest = 'Basic ' + Buffer.from('guest:guest').toString('base64');
const brokerLog = [];
const broker = spawn(binary, [], {
  env: { ...process.env, WARREN_AMQP_PORT: String(amqpPort), WARREN_ADMIN_PORT: String(adminPort), WARREN_DATA_DIR: dataDir, WARREN_BIND: '127.0.0.1', WARREN_ADMIN_SAMPLE_INTERVAL_SECS: '1', RUST_LOG: process.env.RUST_LOG || 'warn' },
  stdio: ['ignore', 'pipe', 'pipe'],
});
broker.stdout.on('data', (d) => brokerLog.push(String(d)));
broker.stderr.on('data', (d) => brokerLog.push(String(d)));

async function api(method, p, body, auth = guest) {
  const res = await fetch(base + '/api' + p, { method, headers: { Authorization: auth, 'Content-Type': 'application/json' }, body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await res.text();
  if (!res.ok) throw new Error(`${method} ${p}: HTTP ${res.status} ${text}`);
  return text ? JSON.parse(text) : null;
}
async function waitFor(what, fn, timeout = 10_000) {
  const end = Date.now() + timeout;
  let last;
  while (Date.now() < end) {
    try { const v = await fn(); if (v) return v; } catch (e) { last = e; }
    await sleep(100);
  }
  throw new Error(`timed out waiting for ${what}${last ? ': ' + last.message : ''}`);
}

let browser, conn, traffic, passed = 0, failed = 0;
const cleanupDirs = [];
const failures = [];
const extraBrokers = []; // brokers a test started (the clustered one)
async function stopBroker(b) {
  b.kill('SIGTERM');
  await Promise.race([new Promise((r) => b.once('exit', r)), sleep(3000)]);
  if (b.exitCode === null && b.signalCode === null) b.kill('SIGKILL');
}
async function cleanup() {
  clearInterval(traffic);
  try { if (conn) await conn.close(); } catch { /* already closed */ }
  try { if (browser) await browser.close(); } catch { /* gone */ }
  for (const b of extraBrokers) await stopBroker(b);
  broker.kill('SIGTERM');
  await Promise.race([new Promise((r) => broker.once('exit', r)), sleep(3000)]);
  if (broker.exitCode === null) broker.kill('SIGKILL');
  for (const d of [dataDir, ...cleanupDirs]) fs.rmSync(d, { recursive: true, force: true });
}

try {
  await waitFor('the admin API', async () => (await fetch(base + '/api/overview', { headers: { Authorization: guest } })).ok, 15_000);
  const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'warren-ui-chromium-'));
  // A fresh profile (--user-data-dir) each run; playwright passes it to chromium.
  browser = await chromium.launchPersistentContext(userDataDir, {
    executablePath: chromiumPath,
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync'],
    viewport: { width: 1280, height: 860 },
    acceptDownloads: true,
  });
  cleanupDirs.push(userDataDir);
  const context = browser;
  const page = await context.newPage();
  page.setDefaultTimeout(10_000);
  const pageErrors = [];
  page.on('pageerror', (e) => pageErrors.push(e.message));
  // Every request the page makes must stay on the broker (nothing from a CDN).
  const foreign = [];
  page.on('request', (r) => { if (!r.url().startsWith(base) && !r.url().startsWith('blob:') && !r.url().startsWith('data:')) foreign.push(r.url()); });
  page.on('dialog', (d) => d.accept());
  const flash = page.locator('#flash');
  const shot = async (name, docs) => {
    await page.screenshot({ path: path.join(outDir, name + '.png'), fullPage: true });
    if (docs && process.env.UPDATE_SCREENSHOTS) {
      fs.mkdirSync(docsDir, { recursive: true });
      await page.screenshot({ path: path.join(docsDir, name + '.png'), fullPage: false });
    }
  };
  const login = async (user, pass) => {
    await page.goto(base + '/');
    await page.fill('#login-form [name=username]', user);
    await page.fill('#login-form [name=password]', pass);
    await page.click('#login-form button');
  };

  async function test(name, fn) {
    if (Date.now() > deadline) { failed++; failures.push(`${name}: suite deadline passed`); console.log(`not ok - ${name} (deadline)`); return; }
    const t0 = Date.now();
    try {
      await fn();
      passed++;
      console.log(`ok - ${name} (${Date.now() - t0} ms)`);
    } catch (e) {
      failed++;
      failures.push(`${name}: ${e.stack || e}`);
      console.log(`not ok - ${name}: ${e.message}`);
      try { await page.screenshot({ path: path.join(outDir, 'failed-' + name.replace(/\W+/g, '-') + '.png'), fullPage: true }); } catch { /* ignore */ }
    }
  }
  const expectText = async (locator, re, what) => {
    await waitFor(what || `text ${re}`, async () => re.test(await locator.innerText()));
  };

  await test('static assets are served next to the API without collisions', async () => {
    const html = await fetch(base + '/');
    if (!html.ok || !(html.headers.get('content-type') || '').startsWith('text/html')) throw new Error('GET / is not HTML');
    const js = await fetch(base + '/ui/app.js');
    if (!js.ok || !(js.headers.get('content-type') || '').includes('javascript')) throw new Error('GET /ui/app.js failed');
    const css = await fetch(base + '/ui/style.css');
    if (!css.ok) throw new Error('GET /ui/style.css failed');
    const apiNoAuth = await fetch(base + '/api/overview');
    if (apiNoAuth.status !== 401) throw new Error(`/api/overview without auth gave ${apiNoAuth.status}`);
    const metrics = await fetch(base + '/metrics');
    if (!metrics.ok || !(await metrics.text()).includes('rabbitmq_')) throw new Error('/metrics broken');
    const missing = await fetch(base + '/ui/nope.js');
    if (missing.status !== 404) throw new Error(`/ui/nope.js gave ${missing.status}`);
  });

  await test('a wrong password is refused in words', async () => {
    await login('guest', 'wrong');
    await expectText(flash, /Login failed: .*wrong username\/password.*401/);
    await shot('login');
  });

  await test('log in and see the overview with live totals and a rate chart', async () => {
    await login('guest', 'guest');
    await page.waitForSelector('#ov-tiles .tile');
    await expectText(page.locator('#who'), /guest.*administrator/);
    await expectText(page.locator('#ov-tiles'), /Memory/);
    await expectText(page.locator('#ov-tiles'), /Alarms\s*$|none\s*Alarms/);
    await waitFor('the memory tile', async () => /[KMG]iB/.test(await page.locator('#ov-tiles').innerText()));
    if (!(await page.locator('#ov-chart line').count())) throw new Error('no chart axes drawn');
  });

  // Reads a table into one object per row, keyed by the column headers.
  const readTable = (sel, p = page) => p.$$eval(sel + ' tbody tr', (trs) => {
    const heads = Array.from(trs[0].closest('table').querySelectorAll('thead th')).map((th) => th.innerText.replace(/[▲▼]/g, '').trim());
    return trs.map((tr) => Object.fromEntries(Array.from(tr.cells).map((td, i) => [heads[i], td.innerText.trim()])));
  });

  await test('the overview lists the one node with its health (no cluster columns)', async () => {
    const nodes = await api('GET', '/nodes');
    await waitFor('the nodes table', async () => (await page.locator('#nodes-table tbody tr').count()) === 1);
    await waitFor('the disk figure', async () => /iB/.test((await readTable('#nodes-table'))[0]['Disk free']));
    const [row] = await readTable('#nodes-table');
    if (!row.Name.startsWith(nodes[0].name) || !/this node/.test(row.Name)) throw new Error('name: ' + JSON.stringify(row));
    if (row.Running !== 'yes') throw new Error('running: ' + JSON.stringify(row));
    if (!/iB/.test(row['Memory used']) || !/^\d+$/.test(row['File descriptors'].replace(/,/g, '')) || !/ s$/.test(row.Uptime)) throw new Error('figures: ' + JSON.stringify(row));
    if ('Metadata leader' in row || 'Cluster address' in row) throw new Error('cluster columns on a single node: ' + JSON.stringify(row));
  });

  await test('a queue published to over AMQP appears in the queues table', async () => {
    conn = await amqp.connect(`amqp://guest:guest@127.0.0.1:${amqpPort}`);
    const ch = await conn.createConfirmChannel();
    await ch.assertQueue('ui-orders', { durable: true });
    await ch.assertQueue('ui-target', { durable: true });
    await ch.assertQueue('ui-dead', { durable: true });
    for (let i = 0; i < 3; i++) ch.sendToQueue('ui-orders', Buffer.from(`order ${i}`), { persistent: true });
    for (let i = 0; i < 4; i++) ch.sendToQueue('ui-dead', Buffer.from(`dead ${i}`), { headers: { 'x-first-death-reason': 'rejected' } });
    await ch.waitForConfirms();
    await ch.prefetch(5);
    await ch.assertQueue('ui-work', { durable: false });
    await ch.consume('ui-work', (m) => ch.ack(m), { noAck: false });
    // Steady traffic through ui-work (about 40 msg/s, consumed and acked) for the rate charts.
    traffic = setInterval(() => { for (let i = 0; i < 4; i++) ch.sendToQueue('ui-work', Buffer.from('tick')); }, 100);
    await page.click('nav a[href="#/queues"]');
    const row = page.locator('#queues-table tr', { hasText: 'ui-orders' });
    await waitFor('ui-orders row with 3 ready', async () => /\t3\t/.test(await row.innerText()));
    // Filtering narrows the table through the API's paging parameters.
    await page.fill('#q-filter', 'ui-dead');
    await waitFor('filtered table', async () => (await page.locator('#queues-table tbody tr').count()) === 1 && /ui-dead/.test(await page.locator('#queues-table tbody').innerText()));
    await page.fill('#q-filter', '');
    await waitFor('unfiltered table', async () => (await page.locator('#queues-table tbody tr').count()) === 4);
    // Sorting by ready count, descending first.
    await page.click('#queues-table button[data-sort="messages_ready"]');
    await waitFor('sorted by ready', async () => /ui-dead/.test(await page.locator('#queues-table tbody tr').first().innerText()));
    await page.click('#queues-table button[data-sort="name"]');
    await waitFor('sorted by name', async () => /ui-dead/.test(await page.locator('#queues-table tbody tr').first().innerText()));
  });

  await test('add a queue with arguments from the queues page', async () => {
    await page.fill('#q-add [name=name]', 'ui-made');
    await page.selectOption('#q-add [name=durable]', 'false');
    await page.fill('#q-add [name=arguments]', '{"x-max-length": 10}');
    await page.click('#q-add button');
    await expectText(flash, /Queue "ui-made" declared/);
    const q = await api('GET', '/queues/%2F/ui-made');
    if (q.durable !== false || q.arguments['x-max-length'] !== 10) throw new Error(JSON.stringify(q));
    await api('DELETE', '/queues/%2F/ui-made');
  });

  await test('overview charts the message rates', async () => {
    await page.click('nav a[href="#/"]');
    // Three samples with traffic in the client-side history, drawn as three lines.
    await waitFor('three samples with a published rate', async () => {
      const pts = await page.locator('#ov-chart polyline').first().getAttribute('points');
      const title = await page.locator('#ov-chart title').textContent();
      return (await page.locator('#ov-chart polyline').count()) === 3 && pts.split(' ').length >= 3 && !/published 0\//.test(title);
    }, 20_000);
    await expectText(page.locator('#ov-tiles'), /Queues/);
    await shot('overview', true);
  });

  await test('queues page screenshot', async () => {
    await page.click('nav a[href="#/queues"]');
    await page.waitForSelector('#queues-table');
    await shot('queues', true);
  });

  await test('publish and get a message through the queue page', async () => {
    await page.click('#queues-table a:text-is("ui-orders")');
    await page.waitForSelector('#qd-pub');
    await page.fill('#qd-pub [name=payload]', 'hello from the UI');
    await page.fill('#qd-pub [name=headers]', '{"x-test": "ui"}');
    await page.click('#qd-pub button');
    await expectText(flash, /Message published\./);
    await waitFor('4 ready', async () => (await api('GET', '/queues/%2F/ui-orders')).messages_ready === 4);
    await page.fill('#qd-get [name=count]', '4');
    await page.click('#qd-get button');
    await expectText(page.locator('#qd-msgs'), /hello from the UI/);
    await expectText(flash, /Got 4 messages/);
    if ((await page.locator('#qd-msgs .message').count()) !== 4) throw new Error('expected 4 messages shown');
    // The default ack mode requeues: the messages stay in the queue.
    await waitFor('still 4 ready', async () => (await api('GET', '/queues/%2F/ui-orders')).messages_ready === 4);
    await shot('queue-detail');
  });

  await test('bad JSON input is reported in words', async () => {
    await page.fill('#qd-pub [name=headers]', '{not json');
    await page.fill('#qd-pub [name=payload]', 'x');
    await page.click('#qd-pub button');
    await expectText(flash, /Headers must be a JSON object/);
  });

  await test('purge empties the queue', async () => {
    await page.click('#qd-purge');
    await expectText(flash, /Queue purged/);
    await waitFor('0 ready', async () => (await api('GET', '/queues/%2F/ui-orders')).messages_ready === 0);
  });

  await test('move messages to another exchange (dead-letter triage)', async () => {
    await page.goto(base + '/#/queues/%2F/ui-dead');
    await page.waitForSelector('#qd-move');
    await page.selectOption('#qd-move [name=exchange]', 'amq.default');
    await page.fill('#qd-move [name=routing_key]', 'ui-target');
    await page.fill('#qd-move [name=count]', '10');
    await page.click('#qd-move button');
    await expectText(flash, /Took 4 messages from the queue: 4 republished and routed, 0 published but unroutable \(dropped\), 0 failed/);
    const [dead, target] = await Promise.all([api('GET', '/queues/%2F/ui-dead'), api('GET', '/queues/%2F/ui-target')]);
    if (dead.messages !== 0 || target.messages_ready !== 4) throw new Error(`dead=${dead.messages} target=${target.messages_ready}`);
    const [m] = await api('POST', '/queues/%2F/ui-target/get', { count: 1, ackmode: 'ack_requeue_true', encoding: 'auto' });
    if (m.payload !== 'dead 0' || (m.properties.headers || {})['x-first-death-reason'] !== 'rejected') throw new Error('moved message lost its payload or headers: ' + JSON.stringify(m));
  });

  await test('exchanges list and exchange detail publish', async () => {
    await page.click('nav a[href="#/exchanges"]');
    await page.waitForSelector('#exchanges-table');
    await expectText(page.locator('#exchanges-table'), /amq\.topic/);
    await shot('exchanges');
    await page.click('#exchanges-table a:text-is("amq.direct")');
    await page.waitForSelector('#xd-pub');
    await page.fill('#xd-pub [name=routing_key]', 'nowhere');
    await page.fill('#xd-pub [name=payload]', 'test');
    await page.click('#xd-pub button');
    await expectText(flash, /not routed to any queue/);
    await shot('exchange-detail');
  });

  await test('the default exchange has its own page', async () => {
    await page.click('nav a[href="#/exchanges"]');
    await page.click('#exchanges-table a:text-is("(AMQP default)")');
    await expectText(page.locator('#page h1'), /Exchange\W*\(AMQP default\)/);
    await page.fill('#xd-pub [name=routing_key]', 'ui-target');
    await page.fill('#xd-pub [name=payload]', 'via default');
    await page.click('#xd-pub button');
    await expectText(flash, /Message published and routed/);
  });

  await test('the topology view draws a known topology (nodes and edges in the DOM)', async () => {
    for (const [name, type, args] of [['topo-alt', 'fanout', {}], ['topo-in', 'topic', { 'alternate-exchange': 'topo-alt' }], ['topo-fan', 'fanout', {}], ['topo-dlx', 'direct', {}], ['topo-h', 'headers', {}]]) {
      await api('PUT', `/exchanges/%2F/${name}`, { type, durable: false, arguments: args });
    }
    for (const [name, args] of [['topo-a', { 'x-dead-letter-exchange': 'topo-dlx', 'x-dead-letter-routing-key': 'dead' }], ['topo-b', {}], ['topo-lost', {}], ['topo-dead', {}]]) {
      await api('PUT', `/queues/%2F/${name}`, { durable: false, arguments: args });
    }
    for (const [src, kind, dest, key, args] of [['topo-in', 'q', 'topo-a', 'a.*', {}], ['topo-in', 'e', 'topo-fan', 'fan.#', {}], ['topo-fan', 'q', 'topo-b', '', {}], ['topo-alt', 'q', 'topo-lost', '', {}],
      ['topo-dlx', 'q', 'topo-dead', 'dead', {}], ['amq.direct', 'q', 'topo-b', 'k1', {}], ['topo-h', 'q', 'topo-b', '', { 'x-match': 'all', format: 'pdf' }]]) {
      await api('POST', `/bindings/%2F/e/${src}/${kind}/${dest}`, { routing_key: key, arguments: args });
    }
    await page.click('nav a[href="#/topology"]');
    await page.waitForSelector('#topo-svg[data-ready]');
    if ((await page.locator('#topo-svg .node[data-id="q:ui-orders"]').count()) !== 1) throw new Error('unfiltered graph lacks ui-orders');
    await page.fill('#topo-filter', 'topo-');
    await waitFor('filtered graph', async () => (await page.locator('#topo-svg .node[data-id="q:ui-orders"]').count()) === 0 && (await page.locator('#topo-svg .node[data-id="e:topo-in"]').count()) === 1);
    for (const id of ['e:topo-in', 'e:topo-alt', 'e:topo-fan', 'e:topo-dlx', 'q:topo-a', 'q:topo-b', 'q:topo-lost', 'q:topo-dead']) {
      if ((await page.locator(`#topo-svg .node[data-id="${id}"]`).count()) !== 1) throw new Error(`node ${id} missing`);
    }
    const edge = (from, to, kind) => page.locator(`#topo-svg path.edge[data-from="${from}"][data-to="${to}"][data-kind="${kind}"]`).count();
    for (const [f, t, k] of [['e:topo-in', 'q:topo-a', 'binding'], ['e:topo-in', 'e:topo-fan', 'e2e'], ['e:topo-fan', 'q:topo-b', 'binding'], ['e:topo-in', 'e:topo-alt', 'alternate'],
      ['q:topo-a', 'e:topo-dlx', 'dead-letter'], ['e:topo-dlx', 'q:topo-dead', 'binding'], ['e:topo-h', 'q:topo-b', 'binding']]) {
      if ((await edge(f, t, k)) !== 1) throw new Error(`edge ${f} -> ${t} (${k}) missing`);
    }
    // Layered: topo-in left of the exchanges it routes to, queues right of their exchanges.
    const x = async (id) => Number((await page.locator(`#topo-svg .node[data-id="${id}"]`).getAttribute('transform')).match(/translate\(([-\d.]+)/)[1]);
    if (!((await x('e:topo-in')) < (await x('e:topo-fan')) && (await x('e:topo-fan')) < (await x('q:topo-b')) && (await x('e:topo-in')) < (await x('e:topo-alt')))) throw new Error('layers out of order');
    // Live depth on the queue node.
    await api('POST', '/exchanges/%2F/topo-in/publish', { routing_key: 'a.1', payload: 'x', payload_encoding: 'string', properties: {} });
    await waitFor('depth 1 on topo-a', async () => (await page.locator('#topo-svg .node[data-id="q:topo-a"] .node-detail').textContent()) === '1', 12_000);
    // Select, focus, click through.
    await page.click('#topo-svg .node[data-id="q:topo-a"]');
    await expectText(page.locator('#topo-info'), /queue\s+.?topo-a/);
    await page.click('#topo-focus-btn');
    await waitFor('focused', async () => (await page.locator('#topo-svg .node[data-id="q:topo-lost"]').count()) === 0 && (await page.locator('#topo-svg .node[data-id="e:topo-dlx"]').count()) === 1);
    await shot('topology', true);
    await page.click('#topo-open');
    await expectText(page.locator('#page h1'), /Queue\W*topo-a/);
  });

  await test('trace shows the router\'s answer: topic, direct, headers, alternate and dead-letter', async () => {
    const traceIt = async (exchange, key, headers) => {
      await page.goto(base + '/#/trace/%2F/' + encodeURIComponent(exchange));
      await page.waitForSelector('#tr-form');
      // The previous trace's form stays until the new page is drawn.
      await waitFor('the trace form of ' + exchange, async () => (await page.locator('#tr-form [name=exchange]').inputValue()) === exchange);
      await page.fill('#tr-form [name=routing_key]', key);
      await page.fill('#tr-form [name=headers]', headers ? JSON.stringify(headers) : '');
      await page.evaluate(() => { const r = document.querySelector('#tr-result'); if (r) r.innerHTML = ''; });
      await page.click('#tr-form button');
      await page.waitForSelector('#tr-summary');
      return page.$$eval('#tr-queues li[data-queue]', (ls) => ls.map((l) => l.dataset.queue).sort());
    };
    const same = (a, b) => JSON.stringify(a) === JSON.stringify(b);
    // Topic, with the dead-letter path of topo-a.
    let qs = await traceIt('topo-in', 'a.x');
    if (!same(qs, ['topo-a'])) throw new Error('topic: ' + qs);
    const api1 = await api('POST', '/exchanges/%2F/topo-in/trace', { routing_key: 'a.x' });
    if (!same(api1.queues, qs)) throw new Error('UI and API disagree');
    await expectText(page.locator('#tr-dead [data-queue="topo-a"]'), /topo-dlx[\s\S]*dead[\s\S]*topo-dead/);
    if ((await page.locator('#tr-svg path.edge.on-path[data-kind="dead-letter"]').count()) !== 1) throw new Error('dead-letter edge not on the traced graph');
    await shot('trace', true);
    // Exchange-to-exchange.
    qs = await traceIt('topo-in', 'fan.1');
    if (!same(qs, ['topo-b'])) throw new Error('e2e: ' + qs);
    if ((await page.locator('#tr-svg path.edge.on-path[data-kind="e2e"]').count()) !== 1) throw new Error('e2e edge not drawn');
    // Alternate exchange.
    qs = await traceIt('topo-in', 'nothing.matches.this');
    if (!same(qs, ['topo-lost'])) throw new Error('alternate: ' + qs);
    await expectText(page.locator('.hop[data-exchange="topo-in"] .alt'), /alternate exchange topo-alt/);
    // Direct.
    qs = await traceIt('amq.direct', 'k1');
    if (!same(qs, ['topo-b'])) throw new Error('direct: ' + qs);
    // Headers: x-match all.
    qs = await traceIt('topo-h', '', { format: 'pdf' });
    if (!same(qs, ['topo-b'])) throw new Error('headers: ' + qs);
    qs = await traceIt('topo-h', '', { format: 'txt' });
    if (qs.length) throw new Error('headers mismatch routed: ' + qs);
    await expectText(page.locator('#tr-summary'), /Unroutable/);
    // Nothing was published by tracing.
    const b = await api('GET', '/queues/%2F/topo-b');
    if (b.messages !== 0) throw new Error('tracing published ' + b.messages + ' messages');
    for (const q of ['topo-a', 'topo-b', 'topo-lost', 'topo-dead']) await api('DELETE', `/queues/%2F/${q}`);
  });

  await test('charts update under load (queue, exchange, node)', async () => {
    await page.goto(base + '/#/queues/%2F/ui-work');
    await page.waitForSelector('#qd-rates');
    const published = async () => {
      const t = await page.locator('#qd-rates title').textContent();
      const m = t.match(/Published ([\d.]+)/);
      return m ? Number(m[1]) : 0;
    };
    await waitFor('a publish rate drawn from the samples', async () => (await published()) > 0 && ((await page.locator('#qd-rates polyline[data-series="publish"]').getAttribute('points')) || '').split(' ').length >= 2, 20_000);
    const before = await page.locator('#qd-rates polyline[data-series="publish"]').getAttribute('points');
    await waitFor('the chart moves on', async () => (await page.locator('#qd-rates polyline[data-series="publish"]').getAttribute('points')) !== before, 15_000);
    if (!(await page.locator('#qd-depth polyline[data-series="messages_ready"]').count())) throw new Error('no depth chart');
    await page.selectOption('#qd-window', '60');
    await waitFor('the 1-minute axis', async () => /-15 s/.test(await page.locator('#qd-rates').textContent()));
    await shot('queue-charts', true);
    await page.selectOption('#qd-window', '600');
    await page.click('nav a[href="#/"]');
    await waitFor('node memory chart', async () => (await page.locator('#ov-mem polyline').count()) === 1 && (await page.locator('#ov-conns polyline').count()) === 2);
    // The overview's message rates come from the broker's history: a window
    // choice redraws them over that window.
    await page.selectOption('#ov-window', '60');
    await waitFor('overview rates over one minute', async () => /-12 s/.test(await page.locator('#ov-chart').textContent()) && (await page.locator('#ov-chart polyline').count()) === 3);
    await page.selectOption('#ov-window', '600');
    await shot('overview-charts', true);
  });

  await test('exchange counters, charts and edge rates update under load (e2e, alternate, dead-letter)', async () => {
    await api('PUT', '/exchanges/%2F/ui-flow-ae', { type: 'fanout', durable: false });
    await api('PUT', '/exchanges/%2F/ui-flow-dlx', { type: 'fanout', durable: false });
    await api('PUT', '/exchanges/%2F/ui-flow', { type: 'direct', durable: false, arguments: { 'alternate-exchange': 'ui-flow-ae' } });
    await api('PUT', '/exchanges/%2F/ui-flow-next', { type: 'fanout', durable: false });
    // ui-flow-q overflows at once and dead-letters what it drops to ui-flow-dlx.
    await api('PUT', '/queues/%2F/ui-flow-q', { durable: false, arguments: { 'x-max-length': 20, 'x-dead-letter-exchange': 'ui-flow-dlx' } });
    await api('PUT', '/queues/%2F/ui-flow-dead', { durable: false, arguments: { 'x-max-length': 20 } });
    await api('POST', '/bindings/%2F/e/ui-flow/e/ui-flow-next', { routing_key: 'go' });
    await api('POST', '/bindings/%2F/e/ui-flow-next/q/ui-flow-q', { routing_key: '' });
    await api('POST', '/bindings/%2F/e/ui-flow-ae/q/ui-flow-q', { routing_key: '' });
    await api('POST', '/bindings/%2F/e/ui-flow-dlx/q/ui-flow-dead', { routing_key: '' });
    // A second binding edge out of ui-flow-next: its e2e edge can only be bounded (≤).
    await api('POST', '/bindings/%2F/e/ui-flow-next/e/ui-flow-dlx', { routing_key: '' });
    const ch = await conn.createChannel();
    // About 20 msg/s through the e2e binding and 10 msg/s to the alternate exchange.
    const flow = setInterval(() => { ch.publish('ui-flow', 'go', Buffer.from('e2e')); ch.publish('ui-flow', 'go', Buffer.from('e2e')); ch.publish('ui-flow', 'elsewhere', Buffer.from('alt')); }, 100);
    try {
      await page.goto(base + '/#/exchanges/%2F/ui-flow');
      await page.waitForSelector('#xd-rates');
      const tile = async (k) => Number(((await page.locator(`#xd-tiles .tile[data-stat="${k}"] b`).textContent()) || '').replace(/[^\d.]/g, '')) || 0;
      await waitFor('in / out / alternate rates on the tiles', async () => (await tile('publish_in')) > 0 && (await tile('publish_out')) > 0 && (await tile('alternate_out')) > 0, 15_000);
      await waitFor('the total counter grows', async () => (await tile('publish_in_total')) > 50, 15_000);
      const line = (k) => page.locator(`#xd-rates polyline[data-series="${k}"]`);
      const chartRate = async (label) => { const m = ((await page.locator('#xd-rates title').textContent()) || '').match(new RegExp(label + ' ([\\d.]+)')); return m ? Number(m[1]) : 0; };
      await waitFor('exchange chart lines from the samples', async () => (await line('publish_in').count()) === 1 && ((await line('publish_in').getAttribute('points')) || '').split(' ').length >= 2 &&
        (await chartRate('Published in')) > 0 && (await chartRate('Routed out')) > 0 && (await chartRate('To the alternate exchange')) > 0, 25_000);
      const before = await line('publish_in').getAttribute('points');
      await waitFor('the exchange chart moves on', async () => (await line('publish_in').getAttribute('points')) !== before, 15_000);
      await shot('exchange-charts', true);
      const x = await api('GET', '/exchanges/%2F/ui-flow?msg_rates_age=60&msg_rates_incr=5');
      if (!(x.message_stats.publish_in >= x.message_stats.publish_out && x.message_stats.alternate_out > 0 && x.message_stats.publish_in_details.samples.length >= 2)) throw new Error('exchange samples: ' + JSON.stringify(x.message_stats));
      // The exchanges table shows the rates too.
      await page.click('nav a[href="#/exchanges"]');
      await page.fill('#x-filter', 'ui-flow');
      await waitFor('ui-flow row with a rate in', async () => /ui-flow\t[^\n]*\t[1-9][\d.]*\/s\t/.test(await page.locator('#exchanges-table tbody').innerText()));
      // Every edge of the flow carries a rate: e2e (exact, the only binding of ui-flow;
      // bounded out of ui-flow-next, which has two), alternate, binding, dead-letter.
      await page.goto(base + '/#/topology/%2F');
      await page.waitForSelector('#topo-svg[data-ready]');
      await page.fill('#topo-filter', 'ui-flow');
      const label = (f, t, k) => page.locator(`#topo-svg text.edge-label[data-from="${f}"][data-to="${t}"][data-kind="${k}"]`);
      await waitFor('filtered to the flow', async () => (await label('e:ui-flow', 'e:ui-flow-next', 'e2e').count()) === 1);
      const rated = async (f, t, k, form) => { const v = ((await label(f, t, k).textContent()) || '').trim(); return form.test(v) && parseFloat(v.replace('≤ ', '')) > 0; };
      const exact = /^[\d.]+\/s$/, bounded = /^≤ [\d.]+\/s$/;
      await waitFor('rates on the e2e, alternate, binding and dead-letter edges', async () => (await rated('e:ui-flow', 'e:ui-flow-next', 'e2e', exact)) && (await rated('e:ui-flow', 'e:ui-flow-ae', 'alternate', exact)) &&
        (await rated('e:ui-flow-next', 'e:ui-flow-dlx', 'e2e', bounded)) && (await rated('e:ui-flow-next', 'q:ui-flow-q', 'binding', exact)) && (await rated('e:ui-flow-ae', 'q:ui-flow-q', 'binding', exact)) &&
        (await rated('q:ui-flow-q', 'e:ui-flow-dlx', 'dead-letter', exact)) && (await rated('e:ui-flow-dlx', 'q:ui-flow-dead', 'binding', exact)), 15_000);
      await expectText(page.locator('#topo-rates'), /exchange to exchange/);
      await shot('topology-rates', true);
      await page.click('nav a[href="#/"]');
      await page.waitForSelector('#ov-tiles');
    } finally {
      clearInterval(flow);
      await ch.close();
    }
    for (const q of ['ui-flow-q', 'ui-flow-dead']) await api('DELETE', `/queues/%2F/${q}`);
  });

  await test('a stream\'s page charts its size and offsets as it grows', async () => {
    const ch = await conn.createChannel();
    await ch.assertQueue('ui-stream', { durable: true, arguments: { 'x-queue-type': 'stream' } });
    const feed = setInterval(() => { for (let i = 0; i < 5; i++) ch.sendToQueue('ui-stream', Buffer.from('event ' + 'x'.repeat(200))); }, 100);
    try {
      await page.goto(base + '/#/queues/%2F/ui-stream');
      await page.waitForSelector('#qd-stream-size');
      const tile = async (k) => Number(((await page.locator(`#qd-stream-tiles .tile[data-stat="${k}"] b`).textContent()) || '').replace(/[^\d]/g, '')) || 0;
      await waitFor('the committed offset tile', async () => (await tile('committed_offset')) > 0, 15_000);
      const line = (svg, k) => page.locator(`#${svg} polyline[data-series="${k}"]`);
      const points = async (svg, k) => ((await line(svg, k).count()) ? (await line(svg, k).getAttribute('points')) || '' : '');
      await waitFor('size and offset charts with two samples', async () => (await points('qd-stream-size', 'stream_bytes')).split(' ').length >= 2 && (await points('qd-stream-offsets', 'committed_offset')).split(' ').length >= 2, 25_000);
      const before = await points('qd-stream-offsets', 'committed_offset');
      const firstCommitted = await tile('committed_offset');
      await waitFor('the offsets chart moves on as the stream grows', async () => (await points('qd-stream-offsets', 'committed_offset')) !== before && (await tile('committed_offset')) > firstCommitted, 15_000);
      // The size chart rises: its newest point is above its oldest.
      const ys = (await points('qd-stream-size', 'stream_bytes')).split(' ').map((p) => Number(p.split(',')[1]));
      if (!(ys[ys.length - 1] < ys[0])) throw new Error('stream size did not grow: ' + ys.join(' '));
      await expectText(page.locator('#qd-lag-legend'), /No consumer has stored an offset/);
      if ((await page.locator('#consumer-offsets-table').count()) !== 1) throw new Error('no consumer offsets table');
      await page.evaluate(() => document.querySelector('#qd-stream-tiles').previousElementSibling.scrollIntoView());
      await shot('stream-charts', true);
    } finally {
      clearInterval(feed);
      await ch.close();
    }
    await api('DELETE', '/queues/%2F/ui-stream');
  });

  await test('the topology stays responsive with 1,000 queues and 5,000 bindings', async () => {
    await api('PUT', '/vhosts/ui-big', {});
    await api('PUT', '/permissions/ui-big/guest', { configure: '.*', write: '.*', read: '.*' });
    const bigConn = await amqp.connect(`amqp://guest:guest@127.0.0.1:${amqpPort}/ui-big`);
    const ch = await bigConn.createChannel();
    const t0 = Date.now();
    const pending = [];
    for (let e = 0; e < 20; e++) pending.push(ch.assertExchange(`big-x-${String(e).padStart(2, '0')}`, 'topic', { durable: false }));
    await Promise.all(pending);
    pending.length = 0;
    for (let i = 0; i < 1000; i++) pending.push(ch.assertQueue(`big-q-${String(i).padStart(4, '0')}`, { durable: false }));
    await Promise.all(pending);
    pending.length = 0;
    for (let i = 0; i < 1000; i++) for (let k = 0; k < 5; k++) pending.push(ch.bindQueue(`big-q-${String(i).padStart(4, '0')}`, `big-x-${String((i + k * 3) % 20).padStart(2, '0')}`, `k.${k}.#`));
    await Promise.all(pending);
    await bigConn.close();
    const declared = Date.now() - t0;
    const bindings = await api('GET', '/bindings/ui-big');
    if (bindings.filter((b) => b.source !== '').length !== 5000) throw new Error('expected 5,000 bindings, got ' + bindings.length);
    const t1 = Date.now();
    await page.goto(base + '/#/topology/ui-big');
    await page.waitForSelector('#topo-svg[data-ready]', { timeout: 20_000 });
    const grouped = Date.now() - t1;
    const groupedPaint = Number(await page.locator('#topo-svg').getAttribute('data-paint-ms'));
    if ((await page.locator('#topo-svg .node[data-kind="group"]').count()) !== 1) throw new Error('1,000 queues named big-q-… should collapse into one group');
    // Everything at once: 1,000 queue nodes and 5,000 binding edges.
    const t2 = Date.now();
    await page.uncheck('#topo-group');
    await waitFor('every queue drawn', async () => (await page.locator('#topo-svg .node[data-kind="queue"]').count()) === 1000, 30_000);
    const full = Date.now() - t2;
    const edges = await page.locator('#topo-svg path.edge').count();
    if (edges !== 5000) throw new Error(`expected 5,000 edges, drew ${edges}`);
    // Still responsive: a filter answers quickly.
    const t3 = Date.now();
    await page.fill('#topo-filter', 'big-q-0007');
    await waitFor('filtered to one queue', async () => (await page.locator('#topo-svg .node[data-kind="queue"]').count()) === 1, 10_000);
    const filtered = Date.now() - t3;
    console.log(`#   topology of 1,000 queues / 5,000 bindings (declared in ${declared} ms): first paint ${grouped} ms (page: ${groupedPaint} ms, grouped), all nodes and edges drawn in ${full} ms, filtered in ${filtered} ms`);
    if (grouped > 10_000 || full > 15_000 || filtered > 5_000) throw new Error('topology too slow');
    await shot('topology-1k');
    await api('DELETE', '/vhosts/ui-big');
  });

  await test('connections and channels pages list the AMQP client; close a connection', async () => {
    const victim = await amqp.connect(`amqp://guest:guest@127.0.0.1:${amqpPort}`);
    victim.on('error', () => {});
    const closed = new Promise((r) => victim.once('close', r));
    const localPort = victim.connection.stream.localPort;
    await page.click('nav a[href="#/connections"]');
    await expectText(page.locator('#c-table'), /guest/);
    const row = page.locator('#c-table tr', { hasText: `:${localPort} ` });
    await row.locator('button.close-conn').click();
    await expectText(flash, /Connection .* closed/);
    await Promise.race([closed, sleep(5000).then(() => { throw new Error('client saw no close'); })]);
    await expectText(page.locator('#c-table'), /guest/);
    await shot('connections');
    await page.click('nav a[href="#/channels"]');
    await expectText(page.locator('#ch-table'), /guest/);
    await shot('channels');
  });

  await test('create a user and set permissions', async () => {
    await page.click('nav a[href="#/users"]');
    await page.waitForSelector('#u-add');
    await page.fill('#u-add [name=name]', 'ui-viewer');
    await page.fill('#u-add [name=password]', 'secret');
    await page.fill('#u-add [name=tags]', 'management');
    await page.click('#u-add button');
    await expectText(flash, /User "ui-viewer" saved/);
    await expectText(page.locator('#users-table'), /ui-viewer\s+management/);
    const users = await api('GET', '/users');
    if (!users.some((u) => u.name === 'ui-viewer' && u.tags.includes('management'))) throw new Error('user not created');
    await page.selectOption('#p-set [name=user]', 'ui-viewer');
    await page.fill('#p-set [name=write]', '^$');
    await page.click('#p-set button');
    await expectText(page.locator('#permissions-table'), /ui-viewer/);
    await shot('users');
  });

  await test('create and edit a policy', async () => {
    await page.click('nav a[href="#/policies"]');
    await page.waitForSelector('#pol-add');
    await page.fill('#pol-add [name=name]', 'ui-ttl');
    await page.fill('#pol-add [name=pattern]', '^ui-');
    await page.selectOption('#pol-add [name=apply_to]', 'queues');
    await page.fill('#pol-add [name=definition]', '{"message-ttl": 60000}');
    await page.click('#pol-add button');
    await expectText(flash, /Policy "ui-ttl" saved/);
    await expectText(page.locator('#policies-table'), /ui-ttl/);
    await page.click('#policies-table .edit-pol');
    await page.fill('#pol-add [name=priority]', '5');
    await page.click('#pol-add button');
    await waitFor('priority 5', async () => (await api('GET', '/policies/%2F/ui-ttl')).priority === 5);
    await expectText(page.locator('#policies-table'), /ui-ttl[^\n]*\t5\t/);
    await expectText(flash, /Policy "ui-ttl" saved/);
    await page.fill('#pol-add [name=name]', 'ui-bad');
    await page.fill('#pol-add [name=pattern]', '^x');
    await page.fill('#pol-add [name=definition]', '[1,2]');
    await page.click('#pol-add button');
    await expectText(flash, /Definition must be a JSON object/);
    await shot('policies');
  });

  await test('add, watch and delete a shovel', async () => {
    await page.click('nav a[href="#/shovels"]');
    await page.waitForSelector('#shovel-add');
    await page.fill('#shovel-add [name=name]', 'ui-shovel');
    await page.fill('#shovel-add [name=src_uri]', 'amqp://');
    await page.fill('#shovel-add [name=src_queue]', 'ui-shovel-src');
    await page.fill('#shovel-add [name=dest_queue]', 'ui-shovel-dst');
    await page.click('#shovel-add button');
    await expectText(flash, /Shovel "ui-shovel" saved/);
    await expectText(page.locator('#shovels-table'), /ui-shovel/);
    await waitFor('shovel running', async () => (await api('GET', '/shovels/vhost/%2F/ui-shovel')).state === 'running');
    await page.fill('#shovel-add [name=name]', 'ui-bad-shovel');
    await page.fill('#shovel-add [name=src_uri]', 'http://nowhere');
    await page.fill('#shovel-add [name=src_queue]', 'ui-shovel-src');
    await page.fill('#shovel-add [name=dest_queue]', 'ui-shovel-dst');
    await page.click('#shovel-add button');
    await expectText(flash, /not a valid URI/);
    await page.click('nav a[href="#/shovels"]');
    await page.waitForSelector('#shovels-table .del-shovel');
    await page.click('#shovels-table .del-shovel');
    await expectText(flash, /Shovel deleted/);
    await waitFor('shovel gone', async () => (await api('GET', '/shovels')).length === 0);
  });

  await test('vhosts page adds a virtual host', async () => {
    await page.click('nav a[href="#/vhosts"]');
    await page.waitForSelector('#v-add');
    await page.fill('#v-add [name=name]', 'ui-vhost');
    await page.click('#v-add button');
    await expectText(flash, /Virtual host "ui-vhost" added/);
    await shot('vhosts');
  });

  let exported;
  await test('export definitions as a JSON download', async () => {
    await page.click('nav a[href="#/definitions"]');
    await page.waitForSelector('#d-export');
    const [download] = await Promise.all([page.waitForEvent('download'), page.click('#d-export')]);
    exported = path.join(outDir, 'definitions.json');
    await download.saveAs(exported);
    const defs = JSON.parse(fs.readFileSync(exported, 'utf8'));
    if (!defs.users.some((u) => u.name === 'ui-viewer')) throw new Error('ui-viewer not exported');
    if (!defs.policies.some((p) => p.name === 'ui-ttl')) throw new Error('ui-ttl not exported');
    if (!defs.queues.some((q) => q.name === 'ui-orders')) throw new Error('ui-orders not exported');
    await expectText(flash, /Definitions exported/);
    await shot('definitions');
  });

  await test('import definitions from an uploaded file', async () => {
    const defs = JSON.parse(fs.readFileSync(exported, 'utf8'));
    defs.queues.push({ name: 'ui-imported', vhost: '/', durable: true, auto_delete: false, arguments: {} });
    const file = path.join(outDir, 'import.json');
    fs.writeFileSync(file, JSON.stringify(defs));
    await page.setInputFiles('#d-import [name=file]', file);
    await page.click('#d-import button');
    await expectText(flash, /Definitions imported from import\.json/);
    await api('GET', '/queues/%2F/ui-imported');
  });

  await test('API refusals are shown in words for a management-only user', async () => {
    await page.click('#logout');
    await login('ui-viewer', 'secret');
    await page.waitForSelector('#ov-tiles .tile');
    if (await page.locator('nav a[href="#/users"]').isVisible()) throw new Error('Users link shown to a non-administrator');
    await page.goto(base + '/#/users');
    await expectText(flash, /Not allowed: .*401.*Not administrator user/);
    await page.goto(base + '/#/queues/%2F/ui-orders');
    await page.waitForSelector('#qd-pub');
    await page.fill('#qd-pub [name=payload]', 'denied');
    await page.click('#qd-pub button');
    await expectText(flash, /HTTP 400: 403 ACCESS_REFUSED - access to exchange/);
    await shot('forbidden');
    await page.click('#logout');
    await page.waitForSelector('#login-form');
  });

  await test('the queues page stays fast with 10,000 queues', async () => {
    const ch = await conn.createChannel();
    const t0 = Date.now();
    const pending = [];
    for (let i = 0; i < 10_000; i++) pending.push(ch.assertQueue(`bulk-${String(i).padStart(5, '0')}`, { durable: false }));
    await Promise.all(pending);
    const declared = Date.now() - t0;
    await login('guest', 'guest');
    await page.waitForSelector('#ov-tiles .tile');
    const t1 = Date.now();
    await page.click('nav a[href="#/queues"]');
    await expectText(page.locator('#q-count'), /of 10,00\d queues/);
    const shown = Date.now() - t1;
    await page.fill('#q-filter', 'bulk-0999');
    await expectText(page.locator('#q-count'), /^10 of 10,00\d queues/);
    await page.check('#q-regex');
    await page.fill('#q-filter', '^bulk-0(12|34)00$');
    await expectText(page.locator('#q-count'), /^2 of 10,00\d queues/);
    const filtered = Date.now() - t1;
    console.log(`#   declared 10,000 queues in ${declared} ms; table shown in ${shown} ms; filtered in ${filtered} ms`);
    if (shown > 5000) throw new Error(`queues page took ${shown} ms with 10,000 queues`);
    await page.uncheck('#q-regex');
    await page.fill('#q-filter', '');
    await expectText(page.locator('#q-pager'), /Page 1 \/ 101/);
    await page.click('#q-next');
    await expectText(page.locator('#q-pager'), /Page 2 \/ 101/);
    await shot('queues-10k');
  });

  await test('a cluster of one: the nodes table shows the node running and leading; queues show their node', async () => {
    // A [cluster] with no seeds forms a cluster of one; every setting by env.
    const [cAmqp, cAdmin, cPeer] = [await freePort(), await freePort(), await freePort()];
    const cDir = fs.mkdtempSync(path.join(os.tmpdir(), 'warren-ui-cluster-'));
    cleanupDirs.push(cDir);
    const cLog = [];
    const cb = spawn(binary, [], {
      env: { ...process.env, WARREN_AMQP_PORT: String(cAmqp), WARREN_ADMIN_PORT: String(cAdmin), WARREN_DATA_DIR: cDir, WARREN_BIND: '127.0.0.1', RUST_LOG: 'warn',
        WARREN_CLUSTER__NODE_NAME: 'warren@127.0.0.1', WARREN_CLUSTER__LISTEN: '127.0.0.1:' + cPeer, WARREN_CLUSTER__COOKIE: 'ui-suite', WARREN_CLUSTER__HEARTBEAT_MS: '50' },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    extraBrokers.push(cb);
    cb.stdout.on('data', (d) => cLog.push(String(d)));
    cb.stderr.on('data', (d) => cLog.push(String(d)));
    const cBase = `http://127.0.0.1:${cAdmin}`;
    try {
      const nodes = await waitFor('a leader in the cluster of one', async () => {
        const r = await fetch(cBase + '/api/nodes', { headers: { Authorization: guest } });
        const j = r.ok ? await r.json() : [];
        return j.length === 1 && j[0].metadata_leader ? j : null;
      }, 15_000);
      const me = nodes[0];
      if (me.name !== 'warren@127.0.0.1' || me.cluster_addr !== '127.0.0.1:' + cPeer || !me.running || !me.voter) throw new Error('/api/nodes: ' + JSON.stringify(nodes));
      // A queue declared over AMQP is replicated with this node as its home.
      const c2 = await amqp.connect(`amqp://guest:guest@127.0.0.1:${cAmqp}`);
      try { const ch = await c2.createChannel(); await ch.assertQueue('ui-homed', { durable: true }); } finally { await c2.close(); }
      const cp = await browser.newPage();
      const errors = [];
      cp.on('pageerror', (e) => errors.push(e.message));
      try {
        await cp.goto(cBase + '/');
        await cp.fill('#login-form [name=username]', 'guest');
        await cp.fill('#login-form [name=password]', 'guest');
        await cp.click('#login-form button');
        await cp.waitForSelector('#nodes-table tbody tr');
        await waitFor('this node\'s figures in its row', async () => /iB/.test((await readTable('#nodes-table', cp))[0]['Disk free']));
        const rows = await readTable('#nodes-table', cp);
        const r = rows[0];
        if (rows.length !== 1 || !r.Name.startsWith('warren@127.0.0.1') || r.Running !== 'yes' || r['Metadata leader'] !== 'leader' || r.Voter !== 'voter' || r['Cluster address'] !== '127.0.0.1:' + cPeer) throw new Error('nodes table: ' + JSON.stringify(rows));
        if (!/iB/.test(r['Memory used']) || !/^\d+$/.test(r['File descriptors'].replace(/,/g, ''))) throw new Error('figures: ' + JSON.stringify(r));
        await cp.screenshot({ path: path.join(outDir, 'cluster-nodes.png'), fullPage: true });
        await cp.goto(cBase + '/#/queues');
        await cp.waitForSelector('#queues-table tbody tr');
        const qrow = (await readTable('#queues-table', cp)).find((q) => q.Name === 'ui-homed');
        if (!qrow || qrow.Node !== 'warren@127.0.0.1') throw new Error('queues table: ' + JSON.stringify(await readTable('#queues-table', cp)));
        await cp.goto(cBase + '/#/queues/%2F/ui-homed');
        await waitFor('the queue\'s node', async () => (await cp.locator('#qd-node').innerText()) === 'warren@127.0.0.1');
        if (errors.length) throw new Error('page errors: ' + errors.join('; '));
      } finally { await cp.close(); }
    } catch (e) {
      throw new Error(e.message + '\nclustered broker log:\n' + cLog.join('').split('\n').slice(-20).join('\n'));
    } finally {
      await stopBroker(cb);
    }
  });

  await test('the page made no foreign requests and threw no errors', async () => {
    if (foreign.length) throw new Error('requests outside the broker: ' + foreign.join(', '));
    if (pageErrors.length) throw new Error('page errors: ' + pageErrors.join('; '));
  });
} catch (e) {
  failed++;
  failures.push(`setup: ${e.stack || e}`);
  console.log(`not ok - setup: ${e.message}`);
} finally {
  await cleanup();
}

if (failures.length) {
  console.log('\nFailures:\n' + failures.join('\n\n'));
  console.log('\nBroker log (tail):\n' + brokerLog.join('').split('\n').slice(-30).join('\n'));
}
console.log(`${passed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
