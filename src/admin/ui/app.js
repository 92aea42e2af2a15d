// warren management UI: a small hash-routed single-page app over the /api routes.
// No dependencies; credentials live in sessionStorage and go out as HTTP basic auth.
'use strict';
(function () {
  const $ = (sel, root) => (root || document).querySelector(sel);
  const $$ = (sel, root) => Array.from((root || document).querySelectorAll(sel));
  const esc = (v) => String(v == null ? '' : v).replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' }[c]));
  const enc = encodeURIComponent;
  const num = (n) => (n == null ? '' : Number(n).toLocaleString('en-US'));
  const rate = (o) => (o && o.rate != null ? (Math.round(o.rate * 10) / 10).toFixed(1) + '/s' : '0.0/s');
  const bytes = (b) => { if (!b) return '0 B'; const u = ['B', 'KiB', 'MiB', 'GiB']; let i = 0; while (b >= 1024 && i < 3) { b /= 1024; i++; } return b.toFixed(i ? 1 : 0) + ' ' + u[i]; };
  const json = (v) => esc(JSON.stringify(v));

  const AUTH_KEY = 'warren.auth';
  let me = null; // {name, tags}
  let timers = [];
  const history = []; // {t, publish, deliver, ack}
  const HISTORY_MAX = 200; // 10 minutes at one sample every 3 s
  let overviewTimer = null;

  // ---- API ---------------------------------------------------------------
  class ApiError extends Error {
    constructor(status, message) { super(message); this.status = status; }
  }
  // A 401 is a failed login when the server marks it so (X-Warren-Login:
  // failed, in place of the WWW-Authenticate challenge it keeps from
  // scripts); otherwise (as RabbitMQ answers a logged-in user's refusal) it
  // refuses what the user's tags or permissions do not allow.
  const loginFailed = (res) => res.headers.get('X-Warren-Login') === 'failed';
  function describe(status, body, challenged) {
    const reason = body && (body.reason || body.error) ? (body.reason || body.error) : '';
    if (status === 401 && challenged) return 'Not logged in or wrong username/password (401' + (reason ? ': ' + reason : '') + ').';
    if (status === 401 || status === 403) return 'Not allowed: your user\'s tags or permissions do not permit this (' + status + (reason ? ': ' + reason : '') + ').';
    if (status === 404) return 'Not found (404' + (reason ? ': ' + reason : '') + ').';
    if (status === 503) return 'Service unavailable (503' + (reason ? ': ' + reason : '') + ').';
    return 'Request failed with HTTP ' + status + (reason ? ': ' + reason : '') + '.';
  }
  async function api(method, path, body, authOverride) {
    const headers = { Accept: 'application/json', 'X-Requested-With': 'XMLHttpRequest' };
    const auth = authOverride || sessionStorage.getItem(AUTH_KEY);
    if (auth) headers.Authorization = 'Basic ' + auth;
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    let res;
    try {
      res = await fetch('/api' + path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
    } catch (e) {
      throw new ApiError(0, 'Cannot reach the broker: ' + e.message);
    }
    const text = await res.text();
    let data = null;
    if (text) { try { data = JSON.parse(text); } catch (e) { data = { reason: text.slice(0, 200) }; } }
    if (!res.ok) {
      const challenged = loginFailed(res);
      if (res.status === 401 && challenged && !authOverride) { logout('Your session is no longer valid: ' + describe(401, data, true)); }
      throw new ApiError(res.status, describe(res.status, data, challenged));
    }
    return data;
  }
  const isAdmin = () => me && me.tags.includes('administrator');
  const isMonitor = () => me && (isAdmin() || me.tags.includes('monitoring'));
  // /api/nodes as last fetched (monitoring users only); clustered when its
  // records carry the cluster's fields.
  let nodesList = null;
  const isClustered = () => !!(nodesList && nodesList.some((n) => n.cluster_addr != null));
  async function ensureNodes() {
    if (nodesList || !isMonitor()) return;
    try { nodesList = await api('GET', '/nodes'); } catch (e) { /* pages work without it */ }
  }

  // ---- flash messages ------------------------------------------------------
  function flash(msg, kind) {
    const f = $('#flash');
    f.className = kind || 'error';
    f.textContent = msg;
  }
  const clearFlash = () => { $('#flash').textContent = ''; };
  const fail = (e) => flash(e && e.message ? e.message : String(e), 'error');
  const info = (m) => flash(m, 'info');

  // ---- login -------------------------------------------------------------
  function showLogin() {
    stopTimers();
    if (overviewTimer) { clearInterval(overviewTimer); overviewTimer = null; }
    me = null; nodesList = null;
    $('#login').hidden = false; $('#page').innerHTML = ''; $('#nav').hidden = true; $('#logout').hidden = true; $('#who').textContent = '';
    const u = $('#login-form [name=username]'); if (u) u.focus();
  }
  function logout(msg) {
    sessionStorage.removeItem(AUTH_KEY);
    showLogin();
    if (msg) flash(msg); else clearFlash();
  }
  $('#login-form').addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const f = ev.target;
    const token = btoa(unescape(encodeURIComponent(f.username.value + ':' + f.password.value)));
    try {
      me = await api('GET', '/whoami', undefined, token);
      sessionStorage.setItem(AUTH_KEY, token);
      f.password.value = '';
      clearFlash();
      loggedIn();
    } catch (e) { flash('Login failed: ' + e.message); }
  });
  $('#logout').addEventListener('click', () => logout());

  function loggedIn() {
    $('#login').hidden = true; $('#nav').hidden = false; $('#logout').hidden = false;
    $('#who').textContent = 'User: ' + me.name + (me.tags.length ? ' (' + me.tags.join(', ') + ')' : '');
    $$('#nav [data-admin]').forEach((a) => { a.hidden = !isAdmin(); });
    if (!overviewTimer) { sampleOverview(); overviewTimer = setInterval(sampleOverview, 3000); }
    route();
  }

  // ---- overview sampling (client-side history for the charts) --------------
  let lastOverview = null;
  let serverRates = [];
  async function sampleOverview() {
    try {
      const o = await api('GET', '/overview' + rangeQuery(['msg_rates']));
      lastOverview = o;
      const ms = o.message_stats || {};
      // The broker's history when it has enough points for the window; until
      // then what this page sampled since it loaded.
      const R = window.WarrenFlow.ratesOf, pub = R((ms.publish_details || {}).samples), del = R((ms.deliver_get_details || {}).samples), ack = R((ms.ack_details || {}).samples);
      serverRates = pub.map(([t, v], i) => ({ t, publish: Math.round(v * 10) / 10, deliver: Math.round(((del[i] || [])[1] || 0) * 10) / 10, ack: Math.round(((ack[i] || [])[1] || 0) * 10) / 10 }));
      history.push({ t: Date.now(), publish: (ms.publish_details || {}).rate || 0, deliver: (ms.deliver_get_details || {}).rate || 0, ack: (ms.ack_details || {}).rate || 0 });
      while (history.length > HISTORY_MAX) history.shift();
      if (currentPage === 'overview') renderOverview();
    } catch (e) { if (currentPage === 'overview') fail(e); }
  }

  // ---- routing -----------------------------------------------------------
  let currentPage = null;
  function stopTimers() { timers.forEach(clearInterval); timers = []; }
  function every(ms, fn) { timers.push(setInterval(fn, ms)); }
  function setPage(html) { $('#page').innerHTML = html; }

  const routes = [
    [/^\/?$/, 'overview', pageOverview],
    [/^\/queues$/, 'queues', pageQueues],
    [/^\/queues\/([^/]+)\/([^/]+)$/, 'queue', pageQueue],
    [/^\/exchanges$/, 'exchanges', pageExchanges],
    [/^\/exchanges\/([^/]+)\/([^/]*)$/, 'exchange', pageExchange],
    [/^\/topology$/, 'topology', pageTopology],
    [/^\/topology\/([^/]+)$/, 'topology', pageTopology],
    [/^\/topology\/([^/]+)\/([^/]+)$/, 'topology', pageTopology],
    [/^\/trace$/, 'trace', pageTrace],
    [/^\/trace\/([^/]+)\/([^/]*)$/, 'trace', pageTrace],
    [/^\/connections$/, 'connections', pageConnections],
    [/^\/channels$/, 'channels', pageChannels],
    [/^\/users$/, 'users', pageUsers],
    [/^\/vhosts$/, 'vhosts', pageVhosts],
    [/^\/policies$/, 'policies', pagePolicies],
    [/^\/shovels$/, 'shovels', pageShovels],
    [/^\/definitions$/, 'definitions', pageDefinitions],
  ];
  function route() {
    if (!me) return;
    stopTimers();
    clearFlash();
    let path = location.hash.replace(/^#/, '') || '/';
    try { path = decodeURI(path); } catch (e) { /* shown as typed */ }
    const raw = location.hash.replace(/^#/, '') || '/';
    for (const [re, name, fn] of routes) {
      const m = raw.match(re);
      if (m) {
        currentPage = name;
        const nav = '#/' + (name === 'queue' ? 'queues' : name === 'exchange' ? 'exchanges' : name === 'overview' ? '' : name);
        $$('#nav a').forEach((a) => { if (a.getAttribute('href') === nav) a.setAttribute('aria-current', 'page'); else a.removeAttribute('aria-current'); });
        let args;
        try { args = m.slice(1).map(decodeURIComponent); } catch (e) { setPage('<h1>Not found</h1>'); fail(new Error('Malformed address: ' + raw)); return; }
        Promise.resolve().then(() => fn(...args)).catch(fail);
        $('#main').focus({ preventScroll: true });
        return;
      }
    }
    currentPage = null;
    setPage('<h1>Not found</h1><p>No page at ' + esc(path) + '.</p>');
  }
  window.addEventListener('hashchange', route);

  // ---- small render helpers ---------------------------------------------------
  function table(cols, rows, opts) {
    opts = opts || {};
    const head = cols.map((c) => {
      const cls = c.n ? ' class="n"' : '';
      if (opts.sort && c.sort) {
        const active = opts.sort.field === c.sort;
        const dir = active ? (opts.sort.reverse ? 'descending' : 'ascending') : 'none';
        return '<th' + cls + ' aria-sort="' + dir + '"><button class="sort" data-sort="' + esc(c.sort) + '">' + esc(c.label) + (active ? (opts.sort.reverse ? ' ▼' : ' ▲') : '') + '</button></th>';
      }
      return '<th' + cls + ' scope="col">' + esc(c.label) + '</th>';
    }).join('');
    const body = rows.length ? rows.map((r) => '<tr>' + cols.map((c) => '<td' + (c.n ? ' class="n"' : '') + '>' + c.cell(r) + '</td>').join('') + '</tr>').join('')
      : '<tr><td colspan="' + cols.length + '" class="muted">' + esc(opts.empty || 'Nothing here.') + '</td></tr>';
    return '<table' + (opts.id ? ' id="' + opts.id + '"' : '') + (opts.label ? ' aria-label="' + esc(opts.label) + '"' : '') + '><thead><tr>' + head + '</tr></thead><tbody>' + body + '</tbody></table>';
  }
  const qlink = (vh, n) => '<a href="#/queues/' + enc(vh) + '/' + enc(n) + '">' + esc(n) + '</a>';
  const xlink = (vh, n) => '<a href="#/exchanges/' + enc(vh) + '/' + enc(n || 'amq.default') + '">' + esc(n || '(AMQP default)') + '</a>';
  async function vhostOptions(selected) {
    let vhosts = [];
    try { vhosts = await api('GET', '/vhosts'); } catch (e) { vhosts = [{ name: '/' }]; }
    return vhosts.map((v) => '<option' + (v.name === selected ? ' selected' : '') + '>' + esc(v.name) + '</option>').join('');
  }
  function formData(form) {
    const o = {};
    new FormData(form).forEach((v, k) => { o[k] = v; });
    $$('input[type=checkbox]', form).forEach((c) => { o[c.name] = c.checked; });
    return o;
  }
  function parseJsonField(text, what) {
    if (!text || !text.trim()) return {};
    try { const v = JSON.parse(text); if (v && typeof v === 'object' && !Array.isArray(v)) return v; } catch (e) { /* fallthrough */ }
    throw new Error(what + ' must be a JSON object, e.g. {"x-message-ttl": 60000}.');
  }
  function onSubmit(sel, fn) {
    const f = $(sel);
    if (f) f.addEventListener('submit', async (ev) => { ev.preventDefault(); try { await fn(formData(f), f); } catch (e) { fail(e); } });
  }
  function onClick(sel, fn) {
    $$(sel).forEach((b) => b.addEventListener('click', async (ev) => { try { await fn(b, ev); } catch (e) { fail(e); } }));
  }

  // ---- overview ----------------------------------------------------------
  async function pageOverview() {
    setPage('<h1>Overview</h1><div id="ov-tiles" class="tiles" aria-live="polite"></div>' +
      '<h2>Message rates</h2><div class="toolbar">' + windowSelect('ov-window') + '</div><div class="legend"><span><i style="background:#0b5cad"></i>Published</span><span><i style="background:#1b7a34"></i>Delivered / got</span><span><i style="background:#c46a00"></i>Acknowledged</span></div>' +
      '<svg id="ov-chart" class="chart" role="img" aria-label="Message rates over the last minutes"></svg>' +
      '<h2>Nodes</h2><div id="ov-nodes" class="muted">Loading…</div>' +
      '<h2>Node</h2><div id="ov-node" class="muted">Loading…</div>' +
      '<div id="ov-node-charts"' + (isMonitor() ? '' : ' hidden') + '><h2>Node over time</h2>' +
      '<div class="chart-grid"><figure><figcaption>Memory used</figcaption><svg id="ov-mem" class="chart small" role="img" aria-label="Memory used"></svg></figure>' +
      '<figure><figcaption>Connections and channels</figcaption>' + legend(NODE_CONNS) + '<svg id="ov-conns" class="chart small" role="img" aria-label="Connections and channels"></svg></figure>' +
      '<figure><figcaption>Free disk (data directory)</figcaption><svg id="ov-disk" class="chart small" role="img" aria-label="Free disk space"></svg></figure></div></div>');
    onWindowChange('ov-window', () => { sampleOverview(); refreshNode(); });
    renderOverview();
    await refreshNode();
    every(5000, refreshNode);
  }
  let nodeInfo = null, alarmInfo = null, nodeError = null, hereName = null;
  async function refreshNode() {
    nodeError = null;
    try {
      if (isMonitor()) {
        // Every member (one without [cluster]); this node's figures come from
        // its own record, the only one the API has figures for.
        const [list, o] = await Promise.all([api('GET', '/nodes'), lastOverview || api('GET', '/overview')]);
        nodesList = list; hereName = o.node;
        const here = list.find((n) => n.name === hereName);
        if (here) nodeInfo = await api('GET', '/nodes/' + enc(here.name) + rangeQuery(['node_stats']));
        else { nodeInfo = null; nodeError = 'this node (' + hereName + ') is not a member of the cluster yet'; }
      } else nodeInfo = null;
    } catch (e) { nodeError = e.message; }
    try { alarmInfo = await api('GET', '/health/checks/alarms'); } catch (e) { alarmInfo = e.status === 503 ? { status: 'failed', reason: e.message } : { status: 'unknown', reason: e.message }; }
    renderOverview();
  }
  function renderOverview() {
    const tiles = $('#ov-tiles');
    if (!tiles) return;
    const o = lastOverview || {};
    const ot = o.object_totals || {}, qt = o.queue_totals || {};
    const alarmOn = alarmInfo && alarmInfo.status !== 'ok' || (nodeInfo && (nodeInfo.mem_alarm || nodeInfo.disk_free_alarm));
    const tile = (label, v, cls) => '<div class="tile ' + (cls || '') + '"><b>' + esc(v) + '</b><span>' + esc(label) + '</span></div>';
    tiles.innerHTML = tile('Queues', num(ot.queues)) + tile('Connections', num(ot.connections)) + tile('Channels', num(ot.channels)) +
      tile('Consumers', num(ot.consumers)) + tile('Exchanges', num(ot.exchanges)) + tile('Messages ready', num(qt.messages_ready)) +
      tile('Unacknowledged', num(qt.messages_unacknowledged)) +
      tile('Memory', nodeInfo ? bytes(nodeInfo.mem_used) : (isMonitor() ? '…' : 'n/a')) +
      tile('Alarms', alarmInfo ? (alarmOn ? 'ALARM' : 'none') : '…', alarmOn ? 'bad' : 'good');
    const nodesEl = $('#ov-nodes');
    if (nodesEl) {
      if (!isMonitor()) nodesEl.textContent = 'The node list needs the monitoring or administrator tag.';
      else if (nodesList) { nodesEl.className = ''; nodesEl.innerHTML = nodesTable(nodesList); }
    }
    const node = $('#ov-node');
    if (node) {
      if (nodeError) node.innerHTML = '<span role="status">Node details unavailable: ' + esc(nodeError) + '</span>';
      else if (!nodeInfo) node.textContent = 'Node details need the monitoring or administrator tag.';
      else node.innerHTML = '<dl class="kv"><dt>Name</dt><dd>' + esc(nodeInfo.name) + '</dd><dt>Version</dt><dd>' + esc(o.product_name) + ' ' + esc(o.product_version) +
        '</dd><dt>Uptime</dt><dd>' + esc(Math.round(nodeInfo.uptime / 1000)) + ' s</dd><dt>Memory high watermark</dt><dd>' + (nodeInfo.mem_limit ? esc(bytes(nodeInfo.mem_limit)) : 'none') + '</dd><dt>Memory alarm</dt><dd>' + (nodeInfo.mem_alarm ? 'ON — publishers are blocked' : 'off') +
        '</dd><dt>Alarm check</dt><dd>' + esc(alarmInfo ? (alarmInfo.status === 'ok' ? 'ok' : alarmInfo.reason || alarmInfo.status) : '') + '</dd><dt>File descriptors</dt><dd>' + esc(nodeInfo.fd_used) + '</dd></dl>' + linksTable(nodeInfo.cluster_links || []);
    }
    if (serverRates.length >= 3) drawChart($('#ov-chart'), serverRates, chartWindow() * 1000); else drawChart($('#ov-chart'), history);
    if (nodeInfo && $('#ov-mem')) {
      const span = chartWindow() * 1000, P = window.WarrenFlow.pointsOf, now = newest(nodeInfo.mem_used_details);
      window.WarrenFlow.lineChart($('#ov-mem'), [{ key: 'mem_used', label: 'Memory', color: '#0b5cad', points: P((nodeInfo.mem_used_details || {}).samples) }], { span, now, format: bytes, title: 'Memory used' });
      window.WarrenFlow.lineChart($('#ov-conns'), NODE_CONNS.map(([k, l, c]) => ({ key: k, label: l, color: c, points: P((nodeInfo[k + '_details'] || {}).samples) })), { span, now, title: 'Connections' });
      window.WarrenFlow.lineChart($('#ov-disk'), [{ key: 'disk_free', label: 'Free', color: '#1b7a34', points: P((nodeInfo.disk_free_details || {}).samples) }], { span, now, format: bytes, title: 'Free disk' });
    }
  }
  // This node's links to the other members (RabbitMQ's "Cluster links"):
  // bytes both ways over its inter-node connections, with their rates.
  function linksTable(links) {
    if (!links.length) return '';
    const flow = (l, f) => esc(bytes(l[f])) + ' <span class="muted">' + esc(bytes(((l.stats || {})[f + '_details'] || {}).rate || 0)) + '/s</span>';
    const cols = [
      { label: 'Peer', cell: (l) => esc(l.name) },
      { label: 'Address', cell: (l) => (l.peer_addr ? esc(l.peer_addr + ':' + l.peer_port) : '<span class="muted">n/a</span>') },
      { label: 'Sent', n: 1, cell: (l) => flow(l, 'send_bytes') },
      { label: 'Received', n: 1, cell: (l) => flow(l, 'recv_bytes') },
    ];
    return '<h3>Cluster links</h3>' + table(cols, links, { id: 'links-table', label: 'Cluster links' });
  }
  // RabbitMQ's nodes table: every member with its state and health figures
  // (fetched by the answering node from each member); "n/a" for a member
  // that did not answer.
  function nodesTable(list) {
    const clustered = isClustered();
    const fig = (n, f) => { const d = n.name === hereName && nodeInfo ? nodeInfo : n; return d[f] == null ? null : d[f]; };
    const show = (v, fmt) => (v == null ? '<span class="muted">n/a</span>' : esc(fmt(v)));
    const cols = [
      { label: 'Name', cell: (n) => esc(n.name) + (n.name === hereName ? ' <span class="muted">(this node)</span>' : '') },
      { label: 'Running', cell: (n) => (n.running ? 'yes' : '<b class="down">no</b>') },
    ];
    if (clustered) {
      cols.push({ label: 'Metadata leader', cell: (n) => (n.metadata_leader ? 'leader' : '') },
        { label: 'Voter', cell: (n) => (n.voter ? 'voter' : 'learner (catching up)') },
        { label: 'Cluster address', cell: (n) => esc(n.cluster_addr) });
    }
    cols.push({ label: 'Memory used', n: 1, cell: (n) => show(fig(n, 'mem_used'), bytes) + (fig(n, 'mem_limit') ? ' <span class="muted">of ' + esc(bytes(fig(n, 'mem_limit'))) + '</span>' : '') + (fig(n, 'mem_alarm') ? ' <b class="down">alarm</b>' : '') },
      { label: 'Disk free', n: 1, cell: (n) => show(fig(n, 'disk_free'), bytes) },
      { label: 'File descriptors', n: 1, cell: (n) => show(fig(n, 'fd_used'), num) },
      { label: 'Uptime', n: 1, cell: (n) => show(fig(n, 'uptime'), (u) => Math.round(u / 1000) + ' s') });
    return table(cols, list, { id: 'nodes-table', label: 'Nodes', empty: 'No members.' }) +
      (clustered && list.some((n) => !n.running) ? '<p class="muted">n/a: the member did not answer this node within a second.</p>' : '');
  }
  function drawChart(svg, data, spanMs) {
    if (!svg) return;
    const W = svg.clientWidth || 800, H = svg.clientHeight || 220, L = 48, R = 10, T = 10, B = 24;
    const series = [['publish', '#0b5cad'], ['deliver', '#1b7a34'], ['ack', '#c46a00']];
    // The time axis: the chosen window for the broker's history; else what this page sampled so far (one minute at first, growing to ten).
    const now = spanMs && data.length ? data[data.length - 1].t : Date.now(), span = spanMs || Math.min(600000, Math.max(60000, data.length ? now - data[0].t : 0));
    let max = 1;
    data.forEach((d) => series.forEach(([k]) => { if (d[k] > max) max = d[k]; }));
    const mag = Math.pow(10, Math.floor(Math.log10(max)));
    max = Math.ceil(max / mag) * mag;
    const x = (t) => L + (W - L - R) * (1 - (now - t) / span);
    const y = (v) => T + (H - T - B) * (1 - v / max);
    let s = '';
    for (let i = 0; i <= 4; i++) {
      const v = (max * i) / 4, yy = y(v).toFixed(1);
      s += '<line x1="' + L + '" x2="' + (W - R) + '" y1="' + yy + '" y2="' + yy + '" stroke="#e3e7eb"/><text x="' + (L - 6) + '" y="' + yy + '" dy="4" text-anchor="end" font-size="11" fill="#5b6570">' + esc(Math.round(v * 10) / 10) + '/s</text>';
    }
    for (let i = 0; i <= 5; i++) {
      const ago = (span * i) / 5, xx = x(now - ago).toFixed(1);
      const label = !i ? 'now' : ago < 120000 ? '-' + Math.round(ago / 1000) + ' s' : '-' + Math.round(ago / 6000) / 10 + ' min';
      s += '<text x="' + xx + '" y="' + (H - 6) + '" text-anchor="' + (i === 5 ? 'start' : i ? 'middle' : 'end') + '" font-size="11" fill="#5b6570">' + label + '</text>';
    }
    // Widest first, so lines that coincide stay visible.
    series.forEach(([k, color], i) => {
      const pts = data.filter((d) => now - d.t <= span).map((d) => x(d.t).toFixed(1) + ',' + y(d[k]).toFixed(1)).join(' ');
      if (pts) s += '<polyline fill="none" stroke="' + color + '" stroke-width="' + (4 - i * 1.25) + '" stroke-linejoin="round" points="' + pts + '"/>';
    });
    const last = data[data.length - 1];
    s += '<title>' + (last ? 'Now: published ' + last.publish + '/s, delivered ' + last.deliver + '/s, acked ' + last.ack + '/s' : 'No samples yet') + '</title>';
    svg.setAttribute('viewBox', '0 0 ' + W + ' ' + H);
    svg.innerHTML = s;
  }

  // ---- queues ------------------------------------------------------------
  const qstate = { page: 1, page_size: 100, name: '', use_regex: false, sort: 'name', reverse: false };
  async function pageQueues() {
    setPage('<h1>Queues</h1>' +
      '<div class="toolbar"><label>Filter <input id="q-filter" type="search" value="' + esc(qstate.name) + '" placeholder="name"></label>' +
      '<label><input id="q-regex" type="checkbox"' + (qstate.use_regex ? ' checked' : '') + '> Regex</label>' +
      '<label>Per page <select id="q-size">' + [20, 100, 500].map((n) => '<option' + (n === qstate.page_size ? ' selected' : '') + '>' + n + '</option>').join('') + '</select></label>' +
      '<span id="q-count" class="muted" aria-live="polite"></span></div>' +
      '<div id="q-table"></div><div class="toolbar" id="q-pager"></div>' +
      '<h2>Add a queue</h2><form id="q-add" class="box"><label>Virtual host <select name="vhost">' + (await vhostOptions('/')) + '</select></label>' +
      '<label>Name <input name="name" required></label><label>Durable <select name="durable"><option value="true">yes</option><option value="false">no</option></select></label>' +
      '<label>Auto delete <select name="auto_delete"><option value="false">no</option><option value="true">yes</option></select></label>' +
      '<label>Arguments (JSON) <textarea name="arguments" placeholder=\'{"x-message-ttl": 60000}\'></textarea></label><button class="primary">Add queue</button></form>');
    let debounce = null;
    $('#q-filter').addEventListener('input', (ev) => { clearTimeout(debounce); debounce = setTimeout(() => { qstate.name = ev.target.value; qstate.page = 1; loadQueues(); }, 250); });
    $('#q-regex').addEventListener('change', (ev) => { qstate.use_regex = ev.target.checked; qstate.page = 1; loadQueues(); });
    $('#q-size').addEventListener('change', (ev) => { qstate.page_size = Number(ev.target.value); qstate.page = 1; loadQueues(); });
    onSubmit('#q-add', async (d) => {
      await api('PUT', '/queues/' + enc(d.vhost) + '/' + enc(d.name), { durable: d.durable === 'true', auto_delete: d.auto_delete === 'true', arguments: parseJsonField(d.arguments, 'Arguments') });
      info('Queue "' + d.name + '" declared.');
      loadQueues();
    });
    await ensureNodes();
    await loadQueues();
    every(5000, loadQueues);
  }
  let queuesLoading = false;
  async function loadQueues() {
    if (queuesLoading) return;
    queuesLoading = true;
    try {
      const qs = '?page=' + qstate.page + '&page_size=' + qstate.page_size + '&name=' + enc(qstate.name) + '&use_regex=' + qstate.use_regex +
        '&sort=' + enc(qstate.sort) + '&sort_reverse=' + qstate.reverse;
      let r;
      try { r = await api('GET', '/queues' + qs); } catch (e) {
        if (e.status === 400 && qstate.page > 1) { qstate.page = 1; queuesLoading = false; return loadQueues(); }
        throw e;
      }
      if (!$('#q-table')) return;
      const cols = [
        { label: 'Virtual host', sort: 'vhost', cell: (q) => esc(q.vhost) },
        { label: 'Name', sort: 'name', cell: (q) => qlink(q.vhost, q.name) },
        { label: 'Type', sort: 'type', cell: (q) => esc(q.type || 'classic') },
      ];
      // RabbitMQ's Node column: where each queue lives, when there is a cluster.
      if (isClustered()) cols.push({ label: 'Node', sort: 'node', cell: (q) => esc(q.node) });
      cols.push(
        { label: 'Features', cell: (q) => esc([q.durable ? 'D' : '', q.auto_delete ? 'AD' : '', q.exclusive ? 'Excl' : '', Object.keys(q.arguments || {}).length ? 'Args' : ''].filter(Boolean).join(' ')) + (q.policy ? ' <span class="muted">' + esc(q.policy) + '</span>' : '') },
        { label: 'Ready', sort: 'messages_ready', n: 1, cell: (q) => num(q.messages_ready) },
        { label: 'Unacked', sort: 'messages_unacknowledged', n: 1, cell: (q) => num(q.messages_unacknowledged) },
        { label: 'Total', sort: 'messages', n: 1, cell: (q) => num(q.messages) },
        { label: 'Incoming', sort: 'message_stats.publish_details.rate', n: 1, cell: (q) => rate((q.message_stats || {}).publish_details) },
        { label: 'Deliver / get', sort: 'message_stats.deliver_get_details.rate', n: 1, cell: (q) => rate((q.message_stats || {}).deliver_get_details) },
        { label: 'Ack', sort: 'message_stats.ack_details.rate', n: 1, cell: (q) => rate((q.message_stats || {}).ack_details) },
        { label: 'Consumers', sort: 'consumers', n: 1, cell: (q) => num(q.consumers) },
      );
      $('#q-table').innerHTML = table(cols, r.items, { sort: { field: qstate.sort, reverse: qstate.reverse }, id: 'queues-table', label: 'Queues', empty: r.total_count ? 'No queue matches the filter.' : 'No queues yet.' });
      $('#q-count').textContent = num(r.filtered_count) + ' of ' + num(r.total_count) + ' queues' + (r.page_count > 1 ? ', page ' + r.page + ' of ' + r.page_count : '');
      $$('#q-table button.sort').forEach((b) => b.addEventListener('click', () => {
        const f = b.dataset.sort;
        if (qstate.sort === f) qstate.reverse = !qstate.reverse; else { qstate.sort = f; qstate.reverse = f !== 'name' && f !== 'vhost'; }
        loadQueues();
      }));
      const pager = $('#q-pager');
      pager.innerHTML = r.page_count > 1 ? '<button id="q-prev"' + (r.page <= 1 ? ' disabled' : '') + '>← Previous</button><span>Page ' + r.page + ' / ' + r.page_count + '</span><button id="q-next"' + (r.page >= r.page_count ? ' disabled' : '') + '>Next →</button>' : '';
      onClick('#q-prev', () => { qstate.page--; loadQueues(); });
      onClick('#q-next', () => { qstate.page++; loadQueues(); });
    } catch (e) { fail(e); } finally { queuesLoading = false; }
  }

  // ---- queue detail --------------------------------------------------------
  // " (not running)" after a node's name when this node does not see it up.
  function nodeState(name) {
    const n = (nodesList || []).find((m) => m.name === name);
    return n && !n.running ? ' <b class="down">(not running)</b>' : '';
  }
  async function pageQueue(vhost, name) {
    const base = '/queues/' + enc(vhost) + '/' + enc(name);
    const [q, bindings, , consumers, exchanges] = await Promise.all([
      api('GET', base), api('GET', base + '/bindings'), ensureNodes(),
      api('GET', '/consumers/' + enc(vhost)).catch(() => []),
      api('GET', '/exchanges/' + enc(vhost)).catch(() => []),
    ]);
    const mine = consumers.filter((c) => c.queue && c.queue.name === name);
    const xopts = exchanges.filter((x) => x.name !== '').map((x) => '<option>' + esc(x.name) + '</option>').join('');
    setPage('<h1>Queue <q>' + esc(name) + '</q> <span class="muted">in virtual host ' + esc(vhost) + '</span></h1>' +
      '<div id="qd-tiles" class="tiles"></div>' +
      '<p><a href="#/topology/' + enc(vhost) + '/' + enc('q:' + name) + '">Show in the topology</a></p>' +
      '<h2>Charts</h2><div class="toolbar">' + windowSelect('qd-window') + '</div>' +
      legend(QUEUE_RATES) + '<svg id="qd-rates" class="chart" role="img" aria-label="Message rates of this queue"></svg>' +
      legend(QUEUE_DEPTH) + '<svg id="qd-depth" class="chart" role="img" aria-label="Messages in this queue"></svg>' +
      (q.type === 'stream' ? '<h2>Stream</h2><div id="qd-stream-tiles" class="tiles"></div><div class="chart-grid">' +
        '<figure><figcaption>Size on disk</figcaption>' + legend(STREAM_SIZE) + '<svg id="qd-stream-size" class="chart small" role="img" aria-label="Bytes in the stream\'s segment files"></svg></figure>' +
        '<figure><figcaption>Offsets kept</figcaption>' + legend(STREAM_OFFSETS) + '<svg id="qd-stream-offsets" class="chart small" role="img" aria-label="First and committed offsets of the stream"></svg></figure>' +
        '<figure><figcaption>Consumer lag (messages behind the committed offset)</figcaption><div id="qd-lag-legend" class="legend"></div><svg id="qd-stream-lag" class="chart small" role="img" aria-label="Stored consumer offsets behind the committed offset"></svg></figure></div>' +
        '<div id="qd-consumer-offsets"></div>' : '') +
      '<dl class="kv"><dt>Type</dt><dd id="qd-type">' + esc(q.type || 'classic') +
      (q.type === 'quorum' ? ' <span class="muted">' + (isClustered()
        ? esc(q.replicas) + ' replicas (Raft group: ' + esc((q.members || []).join(', ')) + '; leader ' + esc(q.leader || 'none yet') + ')'
        : '1 replica (not clustered)') + '; delivery limit ' + esc(q.delivery_limit) + '</span>' : '') +
      (isClustered() ? '</dd><dt>Node</dt><dd id="qd-node">' + esc(q.node) + nodeState(q.node) : '') +
      '</dd><dt>Durable</dt><dd>' + (q.durable ? 'yes' : 'no') + '</dd><dt>Auto delete</dt><dd>' + (q.auto_delete ? 'yes' : 'no') + '</dd><dt>Exclusive</dt><dd>' + (q.exclusive ? 'yes' : 'no') +
      '</dd><dt>Policy</dt><dd>' + esc(q.policy || 'none') + '</dd><dt>Effective policy</dt><dd><code>' + json(q.effective_policy_definition || {}) + '</code></dd><dt>Arguments</dt><dd><code>' + json(q.arguments || {}) + '</code></dd></dl>' +
      '<h2>Consumers</h2>' + table([
        { label: 'Channel', cell: (c) => esc(c.channel_details && c.channel_details.name) },
        { label: 'Consumer tag', cell: (c) => esc(c.consumer_tag) },
        { label: 'Ack required', cell: (c) => (c.ack_required ? 'yes' : 'no') },
        { label: 'Exclusive', cell: (c) => (c.exclusive ? 'yes' : 'no') },
        { label: 'Prefetch', n: 1, cell: (c) => num(c.prefetch_count) },
      ], mine, { empty: 'No consumers.', label: 'Consumers' }) +
      '<h2>Bindings</h2>' + table([
        { label: 'From exchange', cell: (b) => xlink(vhost, b.source) },
        { label: 'Routing key', cell: (b) => esc(b.routing_key) },
        { label: 'Arguments', cell: (b) => '<code>' + json(b.arguments || {}) + '</code>' },
        { label: '', cell: (b) => (b.source ? '<button class="danger unbind" data-src="' + esc(b.source) + '" data-props="' + esc(b.properties_key) + '">Unbind</button>' : '') },
      ], bindings, { label: 'Bindings' }) +
      '<form id="qd-bind" class="box"><label>From exchange <select name="source">' + xopts + '</select></label><label>Routing key <input name="routing_key"></label><button>Bind</button></form>' +
      '<h2>Publish message</h2><form id="qd-pub" class="box"><p class="muted">Published to the default exchange with routing key <q>' + esc(name) + '</q>.</p>' +
      '<label>Delivery mode <select name="delivery_mode"><option value="1">1 – non-persistent</option><option value="2">2 – persistent</option></select></label>' +
      '<label>Headers (JSON) <textarea name="headers" placeholder=\'{"x-source": "ui"}\'></textarea></label><label>Payload <textarea name="payload" required></textarea></label><button class="primary">Publish message</button></form>' +
      '<h2>Get messages</h2><form id="qd-get" class="box"><label>Ack mode <select name="ackmode"><option value="ack_requeue_true">Nack message requeue true</option><option value="ack_requeue_false">Automatic ack</option><option value="reject_requeue_true">Reject requeue true</option><option value="reject_requeue_false">Reject requeue false</option></select></label>' +
      '<label>Encoding <select name="encoding"><option value="auto">Auto string / base64</option><option value="base64">base64</option></select></label><label>Messages <input name="count" type="number" min="1" value="1"></label><button class="primary">Get messages</button></form><div id="qd-msgs" aria-live="polite"></div>' +
      '<h2>Move messages (dead-letter triage)</h2><form id="qd-move" class="box"><p class="muted">Takes messages off this queue (acknowledged) and republishes each to the chosen exchange with its original routing key and properties.</p>' +
      '<label>To exchange <select name="exchange"><option value="amq.default">(AMQP default)</option>' + xopts + '</select></label><label>Routing key (blank: keep original) <input name="routing_key"></label><label>Messages <input name="count" type="number" min="1" value="10"></label><button>Move messages</button></form>' +
      '<h2>Purge / delete</h2><div class="box"><button id="qd-purge" class="danger">Purge messages</button> <button id="qd-delete" class="danger">Delete queue</button></div>');
    const renderTiles = (q) => {
      const t = $('#qd-tiles'); if (!t) return;
      const ms = q.message_stats || {};
      t.innerHTML = [['Ready', num(q.messages_ready)], ['Unacked', num(q.messages_unacknowledged)], ['Total', num(q.messages)], ['Consumers', num(q.consumers)],
        ['Incoming', rate(ms.publish_details)], ['Deliver / get', rate(ms.deliver_get_details)], ['Ack', rate(ms.ack_details)]]
        .map(([l, v]) => '<div class="tile"><b>' + esc(v) + '</b><span>' + esc(l) + '</span></div>').join('');
    };
    renderTiles(q);
    const refresh = async () => { try { const q = await api('GET', base + rangeQuery(['lengths', 'msg_rates'])); if (!$('#qd-tiles')) return; renderTiles(q); drawQueueCharts(q); if (q.type === 'stream') drawStreamCharts(q); } catch (e) { fail(e); } };
    onWindowChange('qd-window', refresh);
    refresh();
    every(5000, refresh);
    onSubmit('#qd-bind', async (d) => {
      await api('POST', '/bindings/' + enc(vhost) + '/e/' + enc(d.source) + '/q/' + enc(name), { routing_key: d.routing_key, arguments: {} });
      route(); info('Bound to exchange "' + d.source + '".');
    });
    onClick('.unbind', async (b) => {
      await api('DELETE', '/bindings/' + enc(vhost) + '/e/' + enc(b.dataset.src) + '/q/' + enc(name) + '/' + enc(b.dataset.props));
      route(); info('Binding removed.');
    });
    onSubmit('#qd-pub', async (d) => {
      const props = { delivery_mode: Number(d.delivery_mode) };
      const headers = parseJsonField(d.headers, 'Headers');
      if (Object.keys(headers).length) props.headers = headers;
      const r = await api('POST', '/exchanges/' + enc(vhost) + '/amq.default/publish', { routing_key: name, payload: d.payload, payload_encoding: 'string', properties: props });
      if (r.routed) info('Message published.'); else flash('Message published but not routed to any queue.');
      refresh();
    });
    onSubmit('#qd-get', async (d) => {
      const msgs = await api('POST', base + '/get', { count: Number(d.count) || 1, ackmode: d.ackmode, encoding: d.encoding, truncate: 50000 });
      const out = $('#qd-msgs');
      out.innerHTML = msgs.length ? msgs.map((m, i) => '<div class="box message"><h3>Message ' + (i + 1) + '</h3><dl class="kv"><dt>Exchange</dt><dd>' + esc(m.exchange || '(AMQP default)') + '</dd><dt>Routing key</dt><dd>' + esc(m.routing_key) +
        '</dd><dt>Redelivered</dt><dd>' + (m.redelivered ? 'yes' : 'no') + '</dd><dt>Remaining in queue</dt><dd>' + esc(m.message_count) + '</dd><dt>Properties</dt><dd><code>' + json(m.properties) + '</code></dd><dt>Payload</dt><dd><span class="muted">' + esc(m.payload_bytes) + ' bytes, encoding ' + esc(m.payload_encoding) +
        '</span><pre class="payload">' + esc(m.payload) + '</pre></dd></dl></div>').join('') : '<p>Queue is empty.</p>';
      info('Got ' + msgs.length + ' message' + (msgs.length === 1 ? '' : 's') + '.');
      refresh();
    });
    onSubmit('#qd-move', async (d) => {
      const want = Math.max(1, Number(d.count) || 1);
      if (!confirm('Move up to ' + want + ' messages from "' + name + '" to exchange "' + d.exchange + '"? They are removed from this queue.')) return;
      const msgs = await api('POST', base + '/get', { count: want, ackmode: 'ack_requeue_false', encoding: 'base64' });
      let routed = 0, unrouted = 0; const errors = [];
      for (const m of msgs) {
        try {
          const r = await api('POST', '/exchanges/' + enc(vhost) + '/' + enc(d.exchange) + '/publish', { routing_key: d.routing_key || m.routing_key, payload: m.payload, payload_encoding: 'base64', properties: m.properties || {} });
          if (r.routed) routed++; else unrouted++;
        } catch (e) { errors.push(e.message); }
      }
      const msg = 'Took ' + msgs.length + ' message' + (msgs.length === 1 ? '' : 's') + ' from the queue: ' + routed + ' republished and routed, ' + unrouted + ' published but unroutable (dropped), ' + errors.length + ' failed' + (errors.length ? ' (' + errors[0] + ')' : '') + '.';
      if (errors.length || unrouted) flash(msg); else info(msg);
      refresh();
    });
    onClick('#qd-purge', async () => {
      if (!confirm('Purge all ready messages from "' + name + '"?')) return;
      await api('DELETE', base + '/contents'); info('Queue purged.'); refresh();
    });
    onClick('#qd-delete', async () => {
      if (!confirm('Delete queue "' + name + '"?')) return;
      await api('DELETE', base); location.hash = '#/queues'; info('Queue "' + name + '" deleted.');
    });
  }

  // ---- charts ----------------------------------------------------------------
  // Window -> [age, incr] in seconds (RabbitMQ's range parameters).
  const WINDOWS = { 60: [60, 5], 600: [600, 5], 3600: [3600, 60] };
  let chartWindowSecs = 600;
  const chartWindow = () => chartWindowSecs;
  const windowSelect = (id) => '<label>Window <select id="' + id + '" class="chart-window">' +
    [[60, '1 minute'], [600, '10 minutes'], [3600, '1 hour']].map(([v, l]) => '<option value="' + v + '"' + (v === chartWindowSecs ? ' selected' : '') + '>' + l + '</option>').join('') + '</select></label>';
  function onWindowChange(id, fn) {
    const sel = $('#' + id);
    if (sel) sel.addEventListener('change', () => { chartWindowSecs = Number(sel.value) || 600; fn(); });
  }
  function rangeQuery(prefixes) {
    const [age, incr] = WINDOWS[chartWindowSecs];
    return '?' + prefixes.map((p) => p + '_age=' + age + '&' + p + '_incr=' + incr).join('&');
  }
  const legend = (series) => '<div class="legend">' + series.map(([, l, c]) => '<span><i style="background:' + c + '"></i>' + esc(l) + '</span>').join('') + '</div>';
  const QUEUE_RATES = [['publish', 'Published', '#0b5cad'], ['deliver_get', 'Delivered / got', '#1b7a34'], ['ack', 'Acknowledged', '#c46a00'], ['redeliver', 'Redelivered', '#7b3fb0'], ['dead_lettered', 'Dead-lettered', '#b00020']];
  const QUEUE_DEPTH = [['messages_ready', 'Ready', '#0b5cad'], ['messages_unacknowledged', 'Unacknowledged', '#c46a00']];
  const EXCHANGE_RATES = [['publish_in', 'Published in', '#0b5cad'], ['publish_out', 'Routed out', '#1b7a34'], ['alternate_out', 'To the alternate exchange', '#c46a00']];
  const STREAM_SIZE = [['stream_bytes', 'Bytes', '#0b5cad']];
  const STREAM_OFFSETS = [['first_offset', 'First offset', '#c46a00'], ['committed_offset', 'Committed offset', '#1b7a34']];
  const LAG_COLORS = ['#0b5cad', '#1b7a34', '#c46a00', '#7b3fb0', '#b00020', '#00838f', '#6b7785', '#8d6e00'];
  // A stream's size, offsets and stored consumer offsets (lag) over the window.
  function drawStreamCharts(q) {
    const F = window.WarrenFlow, span = chartWindow() * 1000, now = newest(q.committed_offset_details);
    const tiles = $('#qd-stream-tiles');
    if (!tiles) return;
    const offsets = q.consumer_offsets || [];
    tiles.innerHTML = [['stream_bytes', 'On disk', bytes(q.stream_bytes)], ['segments', 'Segments', num(q.segments)], ['first_offset', 'First offset', num(q.first_offset)],
      ['committed_offset', 'Committed offset', num(q.committed_offset)], ['consumer_offsets', 'Stored consumer offsets', num(offsets.length)]]
      .map(([k, l, v]) => '<div class="tile" data-stat="' + k + '"><b>' + esc(v) + '</b><span>' + esc(l) + '</span></div>').join('');
    F.lineChart($('#qd-stream-size'), STREAM_SIZE.map(([k, l, c]) => ({ key: k, label: l, color: c, points: F.pointsOf((q[k + '_details'] || {}).samples) })), { span, now, format: bytes, title: 'Size' });
    F.lineChart($('#qd-stream-offsets'), STREAM_OFFSETS.map(([k, l, c]) => ({ key: k, label: l, color: c, points: F.pointsOf((q[k + '_details'] || {}).samples) })), { span, now, format: num, title: 'Offsets' });
    const lags = offsets.map((o, i) => ({ key: 'lag:' + o.reference, label: o.reference, color: LAG_COLORS[i % LAG_COLORS.length], points: F.pointsOf((o.lag_details || {}).samples) }));
    $('#qd-lag-legend').innerHTML = lags.length ? lags.map((l) => '<span><i style="background:' + l.color + '"></i>' + esc(l.label) + '</span>').join('') : '<span class="muted">No consumer has stored an offset in this stream.</span>';
    F.lineChart($('#qd-stream-lag'), lags, { span, now, format: num, title: 'Lag' });
    $('#qd-consumer-offsets').innerHTML = table([
      { label: 'Consumer (reference)', cell: (o) => esc(o.reference) }, { label: 'Stored offset', n: 1, cell: (o) => num(o.offset) }, { label: 'Lag', n: 1, cell: (o) => num(o.lag) },
    ], offsets, { empty: 'No stored consumer offsets.', label: 'Stored consumer offsets', id: 'consumer-offsets-table' });
  }
  const NODE_CONNS = [['sockets_used', 'Connections', '#0b5cad'], ['channels', 'Channels', '#1b7a34']];
  const newest = (details) => (details && details.samples && details.samples.length ? details.samples[0].timestamp : Date.now());
  function drawQueueCharts(q) {
    const F = window.WarrenFlow, ms = q.message_stats || {}, span = chartWindow() * 1000;
    const now = newest(q.messages_ready_details);
    F.lineChart($('#qd-rates'), QUEUE_RATES.map(([k, l, c]) => ({ key: k, label: l, color: c, points: F.ratesOf((ms[k + '_details'] || {}).samples) })), { span, now, format: (v) => Math.round(v * 10) / 10 + '/s', title: 'Rates' });
    F.lineChart($('#qd-depth'), QUEUE_DEPTH.map(([k, l, c]) => ({ key: k, label: l, color: c, points: F.pointsOf((q[k + '_details'] || {}).samples) })), { span, now, format: num, title: 'Messages' });
  }
  function drawExchangeCharts(x) {
    const F = window.WarrenFlow, ms = x.message_stats || {};
    F.lineChart($('#xd-rates'), EXCHANGE_RATES.map(([k, l, c]) => ({ key: k, label: l, color: c, points: F.ratesOf((ms[k + '_details'] || {}).samples) })), { span: chartWindow() * 1000, now: newest(ms.publish_in_details), format: (v) => Math.round(v * 10) / 10 + '/s', title: 'Rates' });
  }
  function exchangeTiles(x) {
    const t = $('#xd-tiles'); if (!t) return;
    const ms = x.message_stats || {};
    t.innerHTML = [['publish_in', 'In', rate(ms.publish_in_details)], ['publish_out', 'Out', rate(ms.publish_out_details)], ['alternate_out', 'To alternate', rate(ms.alternate_out_details)],
      ['publish_in_total', 'Published in (total)', num(ms.publish_in || 0)], ['publish_out_total', 'Routed out (total)', num(ms.publish_out || 0)]]
      .map(([k, l, v]) => '<div class="tile" data-stat="' + k + '"><b>' + esc(v) + '</b><span>' + esc(l) + '</span></div>').join('');
  }

  // ---- topology ----------------------------------------------------------------
  // Exchanges, queues and their bindings as a layered graph, with alternate and
  // dead-letter exchanges as their own kinds of edge. Big vhosts stay readable:
  // filter by name (matches plus their neighbours), focus on the neighbourhood of
  // the selected node, and queues sharing a name prefix collapse into a group.
  const GROUP_ABOVE = 60;
  const prefixOf = (name) => { const m = name.match(/^[^.\-_:]*[.\-_:]/); return m ? m[0] : null; };
  function topologyModel(exchanges, queues, bindings) {
    const nodes = new Map(), edges = new Map();
    const edge = (from, to, kind, title) => {
      if (!nodes.has(from) || !nodes.has(to)) return;
      const k = from + '>' + to + '>' + kind;
      const e = edges.get(k);
      if (e) { e.count++; e.title += '\n' + title; } else edges.set(k, { from, to, kind, title, count: 1 });
    };
    exchanges.filter((x) => x.name !== '').forEach((x) => nodes.set('e:' + x.name, { id: 'e:' + x.name, kind: 'exchange', name: x.name, label: x.name, detail: x.type, title: 'exchange ' + x.name + ' (' + x.type + ')' + (x.internal ? ', internal' : ''), x }));
    queues.forEach((q) => nodes.set('q:' + q.name, { id: 'q:' + q.name, kind: 'queue', name: q.name, label: q.name, detail: num(q.messages), title: 'queue ' + q.name + ': ' + num(q.messages_ready) + ' ready, ' + num(q.messages_unacknowledged) + ' unacked', q }));
    bindings.filter((b) => b.source !== '').forEach((b) => {
      const to = (b.destination_type === 'queue' ? 'q:' : 'e:') + b.destination;
      edge('e:' + b.source, to, b.destination_type === 'queue' ? 'binding' : 'e2e', 'binding ' + b.source + ' → ' + b.destination + (b.routing_key ? ' (' + b.routing_key + ')' : ''));
    });
    // The argument wins over a policy's, as in routing.
    exchanges.forEach((x) => { const ae = (x.arguments || {})['alternate-exchange'] || (x.effective_policy_definition || {})['alternate-exchange']; if (ae && x.name) edge('e:' + x.name, 'e:' + ae, 'alternate', 'alternate exchange of ' + x.name + ': ' + ae); });
    queues.forEach((q) => {
      const a = q.arguments || {}, pol = q.effective_policy_definition || {};
      const dlx = a['x-dead-letter-exchange'] !== undefined ? a['x-dead-letter-exchange'] : pol['dead-letter-exchange'];
      const key = a['x-dead-letter-routing-key'] !== undefined ? a['x-dead-letter-routing-key'] : pol['dead-letter-routing-key'];
      if (dlx === undefined || dlx === null) return;
      const title = 'dead letters of ' + q.name + ' → ' + (dlx || '(AMQP default)') + (key ? ' (' + key + ')' : '');
      if (dlx === '') { if (key) edge('q:' + q.name, 'q:' + key, 'dead-letter', title); } else edge('q:' + q.name, 'e:' + dlx, 'dead-letter', title);
    });
    // How many edges lead out of each exchange through its bindings: an
    // exchange-to-exchange edge that is the only one carries all that goes out.
    const outs = new Map();
    edges.forEach((e) => { if (e.kind === 'binding' || e.kind === 'e2e') outs.set(e.from, (outs.get(e.from) || 0) + 1); });
    return { nodes, edges: Array.from(edges.values()), outs };
  }
  // An edge's label, as far as the broker's counters attribute it (the legend says which):
  // binding to a queue: messages/s into that queue (from any source); exchange to
  // exchange: what the source routes out through its bindings when this is its only
  // binding edge, else at most the smaller of that and the destination's inflow (≤);
  // alternate: what the source passes to its alternate exchange; dead-letter: what
  // the queue dead-letters.
  const fmtRate = (r) => (Math.round(r * 10) / 10) + '/s';
  const statRate = (o, k) => ((((o || {}).message_stats || {})[k + '_details']) || {}).rate || 0;
  function edgeLabel(model, e) {
    const from = model.nodes.get(e.from), to = model.nodes.get(e.to);
    if (!from || !to) return '';
    let r = 0, bound = false;
    if (e.kind === 'binding') r = statRate(to.q, 'publish');
    else if (e.kind === 'alternate') r = statRate(from.x, 'alternate_out');
    else if (e.kind === 'dead-letter') r = statRate(from.q, 'dead_lettered');
    else if (e.kind === 'e2e') {
      r = Math.max(0, statRate(from.x, 'publish_out') - statRate(from.x, 'alternate_out'));
      if (model.outs.get(e.from) !== 1) { r = Math.min(r, statRate(to.x, 'publish_in')); bound = true; }
    }
    return r > 0 ? (bound ? '≤ ' : '') + fmtRate(r) : '';
  }

  async function pageTopology(vhostArg, focusArg) {
    const t0 = performance.now();
    const vhost = vhostArg || '/';
    setPage('<h1>Topology <span class="muted">of virtual host ' + esc(vhost) + '</span></h1>' +
      '<div class="toolbar"><label>Virtual host <select id="topo-vhost">' + (await vhostOptions(vhost)) + '</select></label>' +
      '<label>Filter <input id="topo-filter" type="search" placeholder="name"></label>' +
      '<label><input id="topo-focus" type="checkbox"> Only the selection\'s neighbourhood</label>' +
      '<label><input id="topo-group" type="checkbox" checked> Group queues by name prefix when more than ' + GROUP_ABOVE + '</label>' +
      '<span id="topo-count" class="muted" aria-live="polite"></span></div>' +
      '<div class="legend"><span><i style="background:#6b7785"></i>binding to a queue</span><span><i style="background:#7b3fb0"></i>exchange-to-exchange binding</span>' +
      '<span><i class="dash" style="border-color:#c46a00"></i>alternate exchange</span><span><i class="dash" style="border-color:#b00020"></i>dead-letter exchange</span><span>node: queue depth / exchange type</span></div>' +
      '<p id="topo-rates" class="muted">Edge labels, messages/s: to a queue, all that enters the queue; exchange to exchange, what the source routes out through its bindings (exact when it is the source\'s only binding edge, else “≤” the smaller of that and what enters the destination); alternate, what the source passes to its alternate exchange; dead-letter, what the queue dead-letters.</p>' +
      '<div class="topo"><div id="topo-wrap" class="graph-wrap"><svg id="topo-svg" role="img" aria-label="Exchanges, queues and bindings"></svg></div><aside id="topo-info" class="box" aria-live="polite"><p class="muted">Select an exchange or queue.</p></aside></div>');
    $('#topo-vhost').addEventListener('change', (e) => { location.hash = '#/topology/' + enc(e.target.value); });
    const [exchanges, queues, bindings] = await Promise.all([api('GET', '/exchanges/' + enc(vhost)), api('GET', '/queues/' + enc(vhost)), api('GET', '/bindings/' + enc(vhost))]);
    if (!$('#topo-svg')) return;
    const model = topologyModel(exchanges, queues, bindings);
    const view = { selected: focusArg && model.nodes.has(focusArg) ? focusArg : null, focus: !!focusArg, filter: '', group: true, expanded: new Set() };
    if (view.focus) $('#topo-focus').checked = true;
    let shown = null;
    const neighbours = new Map();
    model.edges.forEach((e) => { (neighbours.get(e.from) || neighbours.set(e.from, []).get(e.from)).push(e.to); (neighbours.get(e.to) || neighbours.set(e.to, []).get(e.to)).push(e.from); });
    const within = (start, hops) => {
      const seen = new Set([start]); let front = [start];
      for (let i = 0; i < hops; i++) { const next = []; front.forEach((id) => (neighbours.get(id) || []).forEach((n) => { if (!seen.has(n)) { seen.add(n); next.push(n); } })); front = next; }
      return seen;
    };
    function visible() {
      let ids = new Set(model.nodes.keys());
      if (view.filter) {
        const f = view.filter.toLowerCase(), hit = new Set();
        model.nodes.forEach((n, id) => { if (n.name.toLowerCase().includes(f)) { hit.add(id); (neighbours.get(id) || []).forEach((m) => hit.add(m)); } });
        ids = hit;
      }
      if (view.focus && view.selected && model.nodes.has(view.selected)) { const near = within(view.selected, 2); ids = new Set([...ids].filter((id) => near.has(id))); ids.add(view.selected); }
      // Group queues sharing a name prefix when there are many.
      const groupOf = new Map(), groups = new Map();
      const qs = [...ids].filter((id) => id.startsWith('q:'));
      if (view.group && qs.length > GROUP_ABOVE) {
        const byPrefix = new Map();
        qs.forEach((id) => { const p = prefixOf(model.nodes.get(id).name); if (p && !view.expanded.has(p) && id !== view.selected) (byPrefix.get(p) || byPrefix.set(p, []).get(p)).push(id); });
        byPrefix.forEach((members, p) => { if (members.length >= 3) { const gid = 'g:' + p; groups.set(gid, { id: gid, kind: 'group', name: p, label: p + '* (' + members.length + ' queues)', detail: num(members.reduce((a, id) => a + (model.nodes.get(id).q.messages || 0), 0)), title: members.length + ' queues named ' + p + '…; select to expand', members }); members.forEach((id) => groupOf.set(id, gid)); } });
      }
      const nodes = [], seenEdge = new Map();
      ids.forEach((id) => { if (!groupOf.has(id)) nodes.push(model.nodes.get(id)); });
      groups.forEach((g) => nodes.push(g));
      model.edges.forEach((e) => {
        if (!ids.has(e.from) || !ids.has(e.to)) return;
        const from = groupOf.get(e.from) || e.from, to = groupOf.get(e.to) || e.to;
        const k = from + '>' + to + '>' + e.kind;
        const grouped = groupOf.has(e.from) || groupOf.has(e.to);
        if (!seenEdge.has(k)) seenEdge.set(k, { from, to, kind: e.kind, title: e.title, label: grouped ? '' : edgeLabel(model, e) });
      });
      return { nodes, edges: Array.from(seenEdge.values()), groups };
    }
    function draw() {
      shown = visible();
      const lay = window.WarrenFlow.layout(shown.nodes, shown.edges);
      const svg = $('#topo-svg');
      if (!svg) return;
      svg.setAttribute('width', lay.width); svg.setAttribute('height', lay.height); svg.setAttribute('viewBox', '0 0 ' + lay.width + ' ' + lay.height);
      const marks = { nodes: new Set(view.selected ? [view.selected] : []), edges: new Set(view.selected ? shown.edges.filter((e) => e.from === view.selected || e.to === view.selected).map((e) => e.from + '>' + e.to + '>' + e.kind) : []) };
      svg.innerHTML = window.WarrenFlow.graphSvg(shown.nodes, shown.edges, lay, marks);
      $('#topo-count').textContent = shown.nodes.length + ' of ' + model.nodes.size + ' nodes, ' + shown.edges.length + ' edges shown' + (shown.groups.size ? ', ' + shown.groups.size + ' queue groups' : '');
      info();
    }
    function info() {
      const box = $('#topo-info'); if (!box) return;
      const id = view.selected;
      const n = id && (model.nodes.get(id) || (shown && shown.groups.get(id)));
      if (!n) { box.innerHTML = '<p class="muted">Select an exchange or queue.</p>'; return; }
      const ins = model.edges.filter((e) => e.to === id), outs = model.edges.filter((e) => e.from === id);
      let h = '<h2>' + esc(n.kind) + ' <q>' + esc(n.name) + '</q></h2>';
      if (n.kind === 'queue') h += '<p>' + esc(n.title) + '</p><p><a id="topo-open" href="#/queues/' + enc(vhost) + '/' + enc(n.name) + '">Open the queue page</a></p>';
      if (n.kind === 'exchange') h += '<p><a id="topo-open" href="#/exchanges/' + enc(vhost) + '/' + enc(n.name) + '">Open the exchange page</a> · <a href="#/trace/' + enc(vhost) + '/' + enc(n.name) + '">Trace a message from here</a></p>';
      if (n.kind === 'group') h += '<p>' + esc(n.title) + '</p><button id="topo-expand">Expand the group</button>';
      else h += '<button id="topo-focus-btn">' + (view.focus ? 'Show everything' : 'Focus on its neighbourhood') + '</button>';
      const list = (es, side) => es.slice(0, 30).map((e) => '<li>' + esc(e.kind) + ' ' + esc(side === 'in' ? e.from.slice(2) : e.to.slice(2)) + '</li>').join('') + (es.length > 30 ? '<li>… ' + (es.length - 30) + ' more</li>' : '');
      if (n.kind !== 'group') h += '<h3>In (' + ins.length + ')</h3><ul>' + list(ins, 'in') + '</ul><h3>Out (' + outs.length + ')</h3><ul>' + list(outs, 'out') + '</ul>';
      box.innerHTML = h;
      const ex = $('#topo-expand'); if (ex) ex.addEventListener('click', () => { view.expanded.add(n.name); view.selected = null; draw(); });
      const fb = $('#topo-focus-btn'); if (fb) fb.addEventListener('click', () => { view.focus = !view.focus; $('#topo-focus').checked = view.focus; draw(); });
    }
    const svg = $('#topo-svg');
    const pick = (ev) => { const g = ev.target.closest && ev.target.closest('.node'); if (!g) return; view.selected = g.dataset.id; draw(); };
    svg.addEventListener('click', pick);
    svg.addEventListener('keydown', (ev) => { if (ev.key === 'Enter' || ev.key === ' ') { ev.preventDefault(); pick(ev); } });
    let debounce = null;
    $('#topo-filter').addEventListener('input', (ev) => { clearTimeout(debounce); debounce = setTimeout(() => { view.filter = ev.target.value.trim(); draw(); }, 200); });
    $('#topo-focus').addEventListener('change', (ev) => { view.focus = ev.target.checked; draw(); });
    $('#topo-group').addEventListener('change', (ev) => { view.group = ev.target.checked; draw(); });
    draw();
    requestAnimationFrame(() => { const s = $('#topo-svg'); if (s) { s.dataset.paintMs = String(Math.round(performance.now() - t0)); s.dataset.ready = '1'; } });
    // Live depth and rates, without laying out again.
    every(5000, async () => {
      if (currentPage !== 'topology' || !$('#topo-svg')) return;
      let qs, xs;
      try { [qs, xs] = await Promise.all([api('GET', '/queues/' + enc(vhost)), api('GET', '/exchanges/' + enc(vhost))]); } catch (e) { return; }
      xs.forEach((x) => { const n = model.nodes.get('e:' + x.name); if (n) n.x = x; });
      qs.forEach((q) => {
        const n = model.nodes.get('q:' + q.name); if (!n) return;
        n.q = q; n.detail = num(q.messages);
        const g = $('#topo-svg .node[data-id="' + CSS.escape(n.id) + '"] .node-detail'); if (g) g.textContent = n.detail;
      });
      const byKey = new Map(model.edges.map((m) => [m.from + '>' + m.to + '>' + m.kind, m]));
      $$('#topo-svg .edge-label').forEach((t) => {
        const e = byKey.get(t.dataset.from + '>' + t.dataset.to + '>' + t.dataset.kind);
        if (e) t.textContent = edgeLabel(model, e);
      });
    });
  }

  // ---- trace -------------------------------------------------------------------
  async function pageTrace(vhostArg, exchangeArg) {
    const vhost = vhostArg || '/';
    const exchanges = await api('GET', '/exchanges/' + enc(vhost));
    const xopts = exchanges.map((x) => '<option value="' + esc(x.name || 'amq.default') + '"' + ((x.name || 'amq.default') === (exchangeArg || '') ? ' selected' : '') + '>' + esc(x.name || '(AMQP default)') + ' (' + esc(x.type) + ')</option>').join('');
    setPage('<h1>Trace a message</h1><p class="muted">The broker\'s own router answers where a message would go: the bindings that match at each exchange, alternate exchanges, the queues reached, and where dead-lettered copies would go. Nothing is published.</p>' +
      '<form id="tr-form" class="box"><label>Virtual host <select name="vhost">' + (await vhostOptions(vhost)) + '</select></label><label>Exchange <select name="exchange">' + xopts + '</select></label>' +
      '<label>Routing key <input name="routing_key"></label><label>Headers (JSON; CC / BCC too) <textarea name="headers" placeholder=\'{"format": "pdf", "CC": ["other.key"]}\'></textarea></label><button class="primary">Trace</button></form>' +
      '<div id="tr-result" aria-live="polite"></div><div class="graph-wrap"><svg id="tr-svg" role="img" aria-label="The traced path"></svg></div>');
    $('#tr-form [name=vhost]').addEventListener('change', (e) => { location.hash = '#/trace/' + enc(e.target.value) + '/'; });
    onSubmit('#tr-form', async (d) => {
      const headers = parseJsonField(d.headers, 'Headers');
      const body = { routing_key: d.routing_key, properties: Object.keys(headers).length ? { headers } : {} };
      const t = await api('POST', '/exchanges/' + enc(vhost) + '/' + enc(d.exchange) + '/trace', body);
      renderTrace(vhost, t);
    });
  }
  function renderTrace(vhost, t) {
    const bindingRows = (h) => table([
      { label: 'To', cell: (b) => (b.destination_type === 'queue' ? 'queue ' + qlink(vhost, b.destination) : 'exchange ' + xlink(vhost, b.destination)) },
      { label: 'Binding key', cell: (b) => esc(b.routing_key) }, { label: 'Arguments', cell: (b) => '<code>' + json(b.arguments || {}) + '</code>' },
      { label: 'Matched by', cell: (b) => esc(b.matched_by) },
    ], h.matched, { empty: 'No binding matches.', label: 'Matching bindings of ' + (h.exchange || 'the default exchange') });
    const hops = (r) => r.hops.map((h) => '<div class="hop" data-exchange="' + esc(h.exchange) + '"><h3>Exchange ' + xlink(vhost, h.exchange) + ' <span class="muted">' + esc(h.type) + '</span></h3>' + bindingRows(h) +
      (h.alternate_exchange ? '<p class="alt">Nothing matched: on to the alternate exchange ' + xlink(vhost, h.alternate_exchange) + '.</p>' : '') + '</div>').join('') +
      (r.missing_exchanges.length ? '<p class="bad">Missing exchanges (the message is dropped there): ' + esc(r.missing_exchanges.join(', ')) + '</p>' : '');
    const qlist = (id, qs) => '<ul id="' + id + '" class="reached">' + (qs.length ? qs.map((q) => '<li data-queue="' + esc(q) + '">' + qlink(vhost, q) + '</li>').join('') : '<li class="muted">none</li>') + '</ul>';
    let h = '<h2 id="tr-summary">' + (t.routed ? 'Routed to ' + t.queues.length + ' queue' + (t.queues.length === 1 ? '' : 's') : 'Unroutable: no queue receives this message') + '</h2>';
    if (t.refused) h += '<p class="bad" id="tr-refused">A client publish would be refused: ' + esc(t.refused) + '</p>';
    if (t.delayed_ms) h += '<p>The delayed exchange holds the message for ' + esc(t.delayed_ms) + ' ms, then routes it as below.</p>';
    if (t.cc.length) h += '<p>Also routed with the CC / BCC keys: ' + esc(t.cc.join(', ')) + '</p>';
    h += hops(t) + '<h3>Queues reached</h3>' + qlist('tr-queues', t.queues);
    if (t.dead_letters.length) {
      h += '<h2>If messages are dead-lettered</h2><div id="tr-dead">' + t.dead_letters.map((d) => '<div class="box dead" data-queue="' + esc(d.queue) + '"><p>From queue ' + qlink(vhost, d.queue) + ' (expired, over a length limit or rejected) to ' +
        (d.exchange_exists ? 'exchange ' + xlink(vhost, d.dead_letter_exchange) : 'the missing exchange <q>' + esc(d.dead_letter_exchange) + '</q> (dropped)') + ' with routing key <q>' + esc(d.routing_key) + '</q>:</p>' +
        qlist('tr-dead-' + d.depth + '-' + d.queue.replace(/\W/g, '_'), d.queues) + (d.dropped_as_cycle.length ? '<p class="muted">Dropped as a cycle unless rejected: ' + esc(d.dropped_as_cycle.join(', ')) + '</p>' : '') + '</div>').join('') + '</div>';
    }
    $('#tr-result').innerHTML = h;
    // The path as a graph: every node and edge on it is marked.
    const nodes = new Map(), edges = [];
    const node = (kind, name) => { const id = (kind === 'exchange' ? 'e:' : 'q:') + name; if (!nodes.has(id)) nodes.set(id, { id, kind, name, label: kind === 'exchange' && !name ? '(AMQP default)' : name, detail: kind === 'exchange' ? '' : '' }); return id; };
    const addRoute = (r) => r.hops.forEach((hp) => {
      const from = node('exchange', hp.exchange);
      hp.matched.forEach((b) => edges.push({ from, to: node(b.destination_type, b.destination), kind: b.destination_type === 'queue' ? 'binding' : 'e2e', title: b.routing_key }));
      if (hp.alternate_exchange) edges.push({ from, to: node('exchange', hp.alternate_exchange), kind: 'alternate', title: 'alternate exchange' });
    });
    addRoute(t);
    t.dead_letters.forEach((d) => { edges.push({ from: node('queue', d.queue), to: node('exchange', d.dead_letter_exchange), kind: 'dead-letter', title: 'dead letters' }); addRoute(d); });
    const list = Array.from(nodes.values());
    const lay = window.WarrenFlow.layout(list, edges);
    const svg = $('#tr-svg');
    svg.setAttribute('width', lay.width); svg.setAttribute('height', lay.height); svg.setAttribute('viewBox', '0 0 ' + lay.width + ' ' + lay.height);
    svg.innerHTML = window.WarrenFlow.graphSvg(list, edges, lay, { nodes: new Set(nodes.keys()), edges: new Set(edges.map((e) => e.from + '>' + e.to + '>' + e.kind)) });
  }

  // ---- exchanges -----------------------------------------------------------
  async function pageExchanges() {
    const xs = await api('GET', '/exchanges');
    setPage('<h1>Exchanges</h1><div class="toolbar"><label>Filter <input id="x-filter" type="search"></label></div><div id="x-table"></div>' +
      '<h2>Add an exchange</h2><form id="x-add" class="box"><label>Virtual host <select name="vhost">' + (await vhostOptions('/')) + '</select></label><label>Name <input name="name" required></label>' +
      '<label>Type <select name="type"><option>direct</option><option>fanout</option><option>topic</option><option>headers</option></select></label>' +
      '<label>Durable <select name="durable"><option value="true">yes</option><option value="false">no</option></select></label><label>Internal <select name="internal"><option value="false">no</option><option value="true">yes</option></select></label><button class="primary">Add exchange</button></form>');
    const render = (f) => {
      const rows = xs.filter((x) => !f || (x.name || 'amq.default').toLowerCase().includes(f.toLowerCase()));
      $('#x-table').innerHTML = table([
        { label: 'Virtual host', cell: (x) => esc(x.vhost) }, { label: 'Name', cell: (x) => xlink(x.vhost, x.name) }, { label: 'Type', cell: (x) => esc(x.type) },
        { label: 'Features', cell: (x) => esc([x.durable ? 'D' : '', x.auto_delete ? 'AD' : '', x.internal ? 'I' : ''].filter(Boolean).join(' ')) },
        { label: 'Message rate in', n: 1, cell: (x) => rate((x.message_stats || {}).publish_in_details) },
        { label: 'Message rate out', n: 1, cell: (x) => rate((x.message_stats || {}).publish_out_details) },
      ], rows, { label: 'Exchanges', id: 'exchanges-table' });
    };
    render('');
    $('#x-filter').addEventListener('input', (e) => render(e.target.value));
    onSubmit('#x-add', async (d) => {
      await api('PUT', '/exchanges/' + enc(d.vhost) + '/' + enc(d.name), { type: d.type, durable: d.durable === 'true', internal: d.internal === 'true', auto_delete: false, arguments: {} });
      route(); info('Exchange "' + d.name + '" declared.');
    });
  }
  async function pageExchange(vhost, name) {
    const base = '/exchanges/' + enc(vhost) + '/' + enc(name);
    const isDefault = name === 'amq.default' || name === '';
    const [x, bindings] = await Promise.all([api('GET', base), isDefault ? Promise.resolve([]) : api('GET', base + '/bindings/source')]);
    setPage('<h1>Exchange <q>' + esc(x.name || '(AMQP default)') + '</q> <span class="muted">in virtual host ' + esc(vhost) + '</span></h1>' +
      '<dl class="kv"><dt>Type</dt><dd>' + esc(x.type) + '</dd><dt>Durable</dt><dd>' + (x.durable ? 'yes' : 'no') + '</dd><dt>Internal</dt><dd>' + (x.internal ? 'yes' : 'no') + '</dd><dt>Arguments</dt><dd><code>' + json(x.arguments || {}) + '</code></dd></dl>' +
      '<div id="xd-tiles" class="tiles"></div>' +
      (isDefault ? '' : '<p><a id="xd-trace" href="#/trace/' + enc(vhost) + '/' + enc(x.name) + '">Trace a message from this exchange</a> · <a href="#/topology/' + enc(vhost) + '/' + enc('e:' + x.name) + '">Show in the topology</a></p>') +
      '<h2>Charts</h2><div class="toolbar">' + windowSelect('xd-window') + '</div>' + legend(EXCHANGE_RATES) +
      '<svg id="xd-rates" class="chart" role="img" aria-label="Messages in and out of this exchange"></svg><p class="muted">In: messages that reached this exchange (published to it, or through an exchange-to-exchange binding, as an alternate or a dead-letter exchange). Out: those that matched at least one binding or went on to the alternate exchange.</p>' +
      '<h2>Bindings from this exchange</h2>' + (isDefault ? '<p class="muted">The default exchange routes to every queue by name.</p>' : table([
        { label: 'To', cell: (b) => (b.destination_type === 'queue' ? 'queue ' + qlink(vhost, b.destination) : 'exchange ' + xlink(vhost, b.destination)) },
        { label: 'Routing key', cell: (b) => esc(b.routing_key) }, { label: 'Arguments', cell: (b) => '<code>' + json(b.arguments || {}) + '</code>' },
      ], bindings, { label: 'Bindings', empty: 'No bindings.' })) +
      '<h2>Publish message</h2><form id="xd-pub" class="box"><label>Routing key <input name="routing_key"></label><label>Delivery mode <select name="delivery_mode"><option value="1">1 – non-persistent</option><option value="2">2 – persistent</option></select></label>' +
      '<label>Headers (JSON) <textarea name="headers"></textarea></label><label>Payload <textarea name="payload"></textarea></label><button class="primary">Publish message</button></form>' +
      (isDefault || x.name.startsWith('amq.') ? '' : '<h2>Delete</h2><div class="box"><button id="xd-delete" class="danger">Delete exchange</button></div>'));
    onSubmit('#xd-pub', async (d) => {
      const props = { delivery_mode: Number(d.delivery_mode) };
      const headers = parseJsonField(d.headers, 'Headers');
      if (Object.keys(headers).length) props.headers = headers;
      const r = await api('POST', '/exchanges/' + enc(vhost) + '/' + enc(isDefault ? 'amq.default' : name) + '/publish', { routing_key: d.routing_key, payload: d.payload, payload_encoding: 'string', properties: props });
      if (r.routed) info('Message published and routed.'); else flash('Message published but not routed to any queue.');
    });
    exchangeTiles(x);
    const refresh = async () => { try { const x = await api('GET', base + rangeQuery(['msg_rates'])); if ($('#xd-rates')) { exchangeTiles(x); drawExchangeCharts(x); } } catch (e) { fail(e); } };
    onWindowChange('xd-window', refresh);
    refresh();
    every(5000, refresh);
    onClick('#xd-delete', async () => {
      if (!confirm('Delete exchange "' + name + '"?')) return;
      await api('DELETE', base); location.hash = '#/exchanges'; info('Exchange deleted.');
    });
  }

  // ---- connections / channels -------------------------------------------------
  async function pageConnections() {
    setPage('<h1>Connections</h1><div id="c-table">Loading…</div>');
    const load = async () => {
      const cs = await api('GET', '/connections');
      if (!$('#c-table')) return;
      $('#c-table').innerHTML = table([
        { label: 'Name', cell: (c) => esc(c.name) }, { label: 'Virtual host', cell: (c) => esc(c.vhost) }, { label: 'User', cell: (c) => esc(c.user) },
        { label: 'Protocol', cell: (c) => esc(c.protocol) },
        { label: 'Client', cell: (c) => esc(((c.client_properties || {}).product || '') + ' ' + ((c.client_properties || {}).version || '')) },
        { label: 'Channels', n: 1, cell: (c) => num(c.channels) }, { label: 'Heartbeat', n: 1, cell: (c) => esc(c.timeout) + ' s' },
        { label: '', cell: (c) => '<button class="danger close-conn" data-name="' + esc(c.name) + '">Close</button>' },
      ], cs, { label: 'Connections', empty: 'No connections.' });
      onClick('.close-conn', async (b) => {
        if (!confirm('Force-close connection ' + b.dataset.name + '?')) return;
        const res = await fetch('/api/connections/' + enc(b.dataset.name), { method: 'DELETE', headers: { Authorization: 'Basic ' + sessionStorage.getItem(AUTH_KEY), 'X-Requested-With': 'XMLHttpRequest', 'X-Reason': 'Closed via warren management UI' } });
        if (!res.ok) { let body = null; try { body = await res.json(); } catch (e) { /* none */ } throw new ApiError(res.status, describe(res.status, body, loginFailed(res))); }
        info('Connection ' + b.dataset.name + ' closed.'); load();
      });
    };
    await load();
    every(5000, () => load().catch(fail));
  }
  async function pageChannels() {
    setPage('<h1>Channels</h1><div id="ch-table">Loading…</div>');
    const load = async () => {
      const cs = await api('GET', '/channels');
      if (!$('#ch-table')) return;
      $('#ch-table').innerHTML = table([
        { label: 'Channel', cell: (c) => esc(c.name) }, { label: 'Virtual host', cell: (c) => esc(c.vhost) }, { label: 'User', cell: (c) => esc(c.user) },
        { label: 'State', cell: (c) => esc(c.state) }, { label: 'Consumers', n: 1, cell: (c) => num(c.consumer_count) },
        { label: 'Connection', cell: (c) => esc(c.connection_details && c.connection_details.name) },
      ], cs, { label: 'Channels', empty: 'No channels.' });
    };
    await load();
    every(5000, () => load().catch(fail));
  }

  // ---- users / vhosts / permissions -------------------------------------------
  async function pageUsers() {
    const [users, perms] = await Promise.all([api('GET', '/users'), api('GET', '/permissions')]);
    const vopts = await vhostOptions('/');
    const uopts = users.map((u) => '<option>' + esc(u.name) + '</option>').join('');
    setPage('<h1>Users</h1>' + table([
      { label: 'Name', cell: (u) => esc(u.name) }, { label: 'Tags', cell: (u) => esc((u.tags || []).join(', ')) },
      { label: 'Can access virtual hosts', cell: (u) => esc(perms.filter((p) => p.user === u.name).map((p) => p.vhost).join(', ') || 'none') },
      { label: '', cell: (u) => '<button class="edit-user" data-name="' + esc(u.name) + '" data-tags="' + esc((u.tags || []).join(',')) + '">Edit</button> <button class="danger del-user" data-name="' + esc(u.name) + '">Delete</button>' },
    ], users, { label: 'Users', id: 'users-table' }) +
      '<h2 id="u-form-title">Add / update a user</h2><form id="u-add" class="box"><label>Username <input name="name" required></label><label>Password <input name="password" type="password" autocomplete="new-password"></label>' +
      '<label>Tags (comma separated) <input name="tags" placeholder="administrator, monitoring, policymaker, management"></label><button class="primary">Save user</button><p class="muted">Leave the password blank when editing to keep the current one.</p></form>' +
      '<h2>Permissions</h2>' + table([
        { label: 'User', cell: (p) => esc(p.user) }, { label: 'Virtual host', cell: (p) => esc(p.vhost) }, { label: 'Configure', cell: (p) => '<code>' + esc(p.configure) + '</code>' },
        { label: 'Write', cell: (p) => '<code>' + esc(p.write) + '</code>' }, { label: 'Read', cell: (p) => '<code>' + esc(p.read) + '</code>' },
        { label: '', cell: (p) => '<button class="danger del-perm" data-user="' + esc(p.user) + '" data-vhost="' + esc(p.vhost) + '">Clear</button>' },
      ], perms, { label: 'Permissions', id: 'permissions-table' }) +
      '<form id="p-set" class="box"><label>User <select name="user">' + uopts + '</select></label><label>Virtual host <select name="vhost">' + vopts + '</select></label>' +
      '<label>Configure regexp <input name="configure" value=".*"></label><label>Write regexp <input name="write" value=".*"></label><label>Read regexp <input name="read" value=".*"></label><button class="primary">Set permission</button></form>');
    onSubmit('#u-add', async (d) => {
      const body = { tags: d.tags.split(',').map((t) => t.trim()).filter(Boolean).join(',') };
      const existing = users.find((u) => u.name === d.name);
      if (d.password) body.password = d.password; else if (existing) body.password_hash = existing.password_hash; else throw new Error('A new user needs a password.');
      await api('PUT', '/users/' + enc(d.name), body);
      await route(); info('User "' + d.name + '" saved.');
    });
    onClick('.edit-user', (b) => { const f = $('#u-add'); f.name.value = b.dataset.name; f.tags.value = b.dataset.tags; f.password.value = ''; f.password.focus(); });
    onClick('.del-user', async (b) => {
      if (!confirm('Delete user "' + b.dataset.name + '"?')) return;
      await api('DELETE', '/users/' + enc(b.dataset.name)); await route(); info('User "' + b.dataset.name + '" deleted.');
    });
    onSubmit('#p-set', async (d) => {
      await api('PUT', '/permissions/' + enc(d.vhost) + '/' + enc(d.user), { configure: d.configure, write: d.write, read: d.read });
      await route(); info('Permission set for "' + d.user + '" on "' + d.vhost + '".');
    });
    onClick('.del-perm', async (b) => {
      await api('DELETE', '/permissions/' + enc(b.dataset.vhost) + '/' + enc(b.dataset.user)); await route(); info('Permission cleared.');
    });
  }
  async function pageVhosts() {
    const vs = await api('GET', '/vhosts');
    setPage('<h1>Virtual hosts</h1>' + table([
      { label: 'Name', cell: (v) => esc(v.name) }, { label: 'Ready', n: 1, cell: (v) => num(v.messages_ready) }, { label: 'Unacked', n: 1, cell: (v) => num(v.messages_unacknowledged) },
      { label: 'Connections', n: 1, cell: (v) => num(v.connections) },
      { label: '', cell: (v) => '<button class="danger del-vhost" data-name="' + esc(v.name) + '">Delete</button>' },
    ], vs, { label: 'Virtual hosts' }) + '<h2>Add a virtual host</h2><form id="v-add" class="box"><label>Name <input name="name" required></label><button class="primary">Add virtual host</button></form>');
    onSubmit('#v-add', async (d) => { await api('PUT', '/vhosts/' + enc(d.name), {}); await route(); info('Virtual host "' + d.name + '" added.'); });
    onClick('.del-vhost', async (b) => {
      if (!confirm('Delete virtual host "' + b.dataset.name + '" and everything in it?')) return;
      await api('DELETE', '/vhosts/' + enc(b.dataset.name)); await route(); info('Virtual host deleted.');
    });
  }

  // ---- policies ----------------------------------------------------------
  async function pagePolicies() {
    const ps = await api('GET', '/policies');
    setPage('<h1>Policies</h1>' + table([
      { label: 'Virtual host', cell: (p) => esc(p.vhost) }, { label: 'Name', cell: (p) => esc(p.name) }, { label: 'Pattern', cell: (p) => '<code>' + esc(p.pattern) + '</code>' },
      { label: 'Apply to', cell: (p) => esc(p['apply-to']) }, { label: 'Definition', cell: (p) => '<code>' + json(p.definition) + '</code>' }, { label: 'Priority', n: 1, cell: (p) => esc(p.priority) },
      { label: '', cell: (p, i) => '<button class="edit-pol" data-i="' + ps.indexOf(p) + '">Edit</button> <button class="danger del-pol" data-vhost="' + esc(p.vhost) + '" data-name="' + esc(p.name) + '">Delete</button>' },
    ], ps, { label: 'Policies', id: 'policies-table', empty: 'No policies.' }) +
      '<h2>Add / update a policy</h2><form id="pol-add" class="box"><label>Virtual host <select name="vhost">' + (await vhostOptions('/')) + '</select></label><label>Name <input name="name" required></label>' +
      '<label>Pattern <input name="pattern" required placeholder="^orders\\."></label><label>Apply to <select name="apply_to"><option>all</option><option>queues</option><option>classic_queues</option><option>quorum_queues</option><option>exchanges</option></select></label>' +
      '<label>Priority <input name="priority" type="number" value="0"></label><label>Definition (JSON) <textarea name="definition" required placeholder=\'{"message-ttl": 60000}\'></textarea></label><button class="primary">Save policy</button></form>');
    onSubmit('#pol-add', async (d) => {
      const definition = parseJsonField(d.definition, 'Definition');
      await api('PUT', '/policies/' + enc(d.vhost) + '/' + enc(d.name), { pattern: d.pattern, 'apply-to': d.apply_to, priority: Number(d.priority) || 0, definition });
      await route(); info('Policy "' + d.name + '" saved.');
    });
    onClick('.edit-pol', (b) => {
      const p = ps[Number(b.dataset.i)], f = $('#pol-add');
      f.vhost.value = p.vhost; f.name.value = p.name; f.pattern.value = p.pattern; f.apply_to.value = p['apply-to']; f.priority.value = p.priority; f.definition.value = JSON.stringify(p.definition);
      f.name.focus();
    });
    onClick('.del-pol', async (b) => {
      if (!confirm('Delete policy "' + b.dataset.name + '"?')) return;
      await api('DELETE', '/policies/' + enc(b.dataset.vhost) + '/' + enc(b.dataset.name)); await route(); info('Policy deleted.');
    });
  }

  // ---- shovels -----------------------------------------------------------
  function shovelTable(ss) {
    const end = (s, side) => {
      const q = s[side + '_queue'], x = s[side + '_exchange'], k = s[side + '_exchange_key'];
      const what = q !== undefined ? 'queue ' + q : x !== undefined ? 'exchange ' + (x || '(AMQP default)') + (k ? ' (' + k + ')' : '') : 'same exchange and key';
      return esc(s[side + '_uri'] || '') + '<br><span class="muted">' + esc(what) + '</span>';
    };
    return table([
      { label: 'Virtual host', cell: (s) => esc(s.vhost) }, { label: 'Name', cell: (s) => esc(s.name) }, { label: 'Type', cell: (s) => esc(s.type) },
      { label: 'State', cell: (s) => esc(s.state) + (s.reason ? '<br><span class="muted">' + esc(s.reason) + '</span>' : '') },
      { label: 'Source', cell: (s) => end(s, 'src') }, { label: 'Destination', cell: (s) => end(s, 'dest') },
      { label: 'Forwarded', n: 1, cell: (s) => esc(s.forwarded) }, { label: 'Remaining', n: 1, cell: (s) => esc(s.remaining === null ? '?' : s.remaining) },
      { label: '', cell: (s) => '<button class="restart-shovel" data-vhost="' + esc(s.vhost) + '" data-name="' + esc(s.name) + '">Restart</button>' +
          (s.type === 'dynamic' ? ' <button class="danger del-shovel" data-vhost="' + esc(s.vhost) + '" data-name="' + esc(s.name) + '">Delete</button>' : '') },
    ], ss, { label: 'Shovels', id: 'shovels-table', empty: 'No shovels.' });
  }
  function bindShovelButtons() {
    onClick('.del-shovel', async (b) => {
      if (!confirm('Delete shovel "' + b.dataset.name + '"?')) return;
      await api('DELETE', '/parameters/shovel/' + enc(b.dataset.vhost) + '/' + enc(b.dataset.name)); await route(); info('Shovel deleted.');
    });
    onClick('.restart-shovel', async (b) => {
      await api('DELETE', '/shovels/vhost/' + enc(b.dataset.vhost) + '/' + enc(b.dataset.name) + '/restart'); await route(); info('Shovel restarted.');
    });
  }
  async function pageShovels() {
    const ss = await api('GET', '/shovels');
    setPage('<h1>Shovels</h1><p class="muted">Shovels move messages from a queue or exchange on one broker to another (or this one: <code>amqp://</code>). With ack mode on-confirm a message leaves the source only once the destination confirmed it.</p>' +
      '<div id="shovels-wrap">' + shovelTable(ss) + '</div>' +
      '<h2>Add a shovel</h2><form id="shovel-add" class="box"><label>Virtual host <select name="vhost">' + (await vhostOptions('/')) + '</select></label><label>Name <input name="name" required></label>' +
      '<label>Source URI <input name="src_uri" required placeholder="amqp://user:pass@host:5672/%2F"></label><label>Source queue <input name="src_queue" required></label>' +
      '<label>Destination URI <input name="dest_uri" required value="amqp://"></label><label>Destination queue <input name="dest_queue" required></label>' +
      '<label>Ack mode <select name="ack_mode"><option>on-confirm</option><option>on-publish</option><option>no-ack</option></select></label>' +
      '<label>Delete after <select name="delete_after"><option>never</option><option>queue-length</option></select></label>' +
      '<label>More keys (JSON, optional) <textarea name="more" placeholder=\'{"src-prefetch-count": 100}\'></textarea></label><button class="primary">Add shovel</button></form>');
    bindShovelButtons();
    onSubmit('#shovel-add', async (d) => {
      const more = parseJsonField(d.more, 'More keys');
      const value = Object.assign({ 'src-protocol': 'amqp091', 'src-uri': d.src_uri, 'src-queue': d.src_queue, 'dest-protocol': 'amqp091', 'dest-uri': d.dest_uri, 'dest-queue': d.dest_queue,
        'ack-mode': d.ack_mode, 'src-delete-after': d.delete_after }, more);
      await api('PUT', '/parameters/shovel/' + enc(d.vhost) + '/' + enc(d.name), { value });
      await route(); info('Shovel "' + d.name + '" saved.');
    });
    every(5000, async () => {
      if (currentPage !== 'shovels') return;
      try { $('#shovels-wrap').innerHTML = shovelTable(await api('GET', '/shovels')); bindShovelButtons(); } catch (e) { /* next tick */ }
    });
  }

  // ---- definitions -------------------------------------------------------
  async function pageDefinitions() {
    setPage('<h1>Definitions</h1><h2>Export</h2><div class="box"><p>Users, virtual hosts, permissions, policies, queues, exchanges and bindings as JSON.</p><button id="d-export" class="primary">Download definitions</button></div>' +
      '<h2>Import</h2><form id="d-import" class="box"><label>Definitions file (JSON) <input name="file" type="file" accept=".json,application/json" required></label><button class="primary">Upload definitions</button></form>');
    onClick('#d-export', async () => {
      const defs = await api('GET', '/definitions');
      const blob = new Blob([JSON.stringify(defs, null, 2)], { type: 'application/json' });
      const a = document.createElement('a');
      a.href = URL.createObjectURL(blob);
      a.download = 'warren-definitions-' + new Date().toISOString().slice(0, 10) + '.json';
      document.body.appendChild(a); a.click(); a.remove();
      setTimeout(() => URL.revokeObjectURL(a.href), 1000);
      info('Definitions exported (' + (defs.queues || []).length + ' queues, ' + (defs.exchanges || []).length + ' exchanges, ' + (defs.users || []).length + ' users).');
    });
    onSubmit('#d-import', async (d, f) => {
      const file = f.file.files[0];
      if (!file) throw new Error('Choose a JSON file first.');
      let defs;
      try { defs = JSON.parse(await file.text()); } catch (e) { throw new Error('The file is not valid JSON: ' + e.message); }
      await api('POST', '/definitions', defs);
      info('Definitions imported from ' + file.name + '.');
    });
  }

  // ---- start -----------------------------------------------------------------
  (async function start() {
    if (!sessionStorage.getItem(AUTH_KEY)) return showLogin();
    try { me = await api('GET', '/whoami'); loggedIn(); } catch (e) { if (!me) { showLogin(); fail(e); } }
  })();
})();
