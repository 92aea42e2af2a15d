// warren management UI: drawing helpers with no dependencies (window.WarrenFlow).
// - layout(nodes, edges): a layered layout (longest-path ranks, barycentre ordering).
// - graphSvg(...): the topology as SVG (nodes and edges carry data-* attributes).
// - lineChart(svg, series, opts): time-series line charts.
'use strict';
(function () {
  const esc = (v) => String(v == null ? '' : v).replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' }[c]));

  // Ranks follow the flow of messages: each node one column right of its
  // furthest source over binding, alternate and dead-letter edges, so a
  // dead-letter exchange sits right of the queues feeding it. Cycles (a retry
  // loop through a dead-letter exchange) are cut where the DFS meets its own
  // path; the cut edges are drawn looping back underneath.
  const NODE_W = 190, NODE_H = 26, COL_GAP = 90, ROW_GAP = 10;
  function layout(nodes, edges) {
    const byId = new Map(nodes.map((n) => [n.id, n]));
    const out = new Map(nodes.map((n) => [n.id, []]));
    const inc = new Map(nodes.map((n) => [n.id, []]));
    for (const e of edges) {
      if (!byId.has(e.from) || !byId.has(e.to)) continue;
      out.get(e.from).push(e.to); inc.get(e.to).push(e.from);
    }
    const rank = new Map(), state = new Map();
    const visit = (id) => {
      if (state.get(id) === 2) return rank.get(id);
      if (state.get(id) === 1) return -1; // on the path: a cycle, cut here
      state.set(id, 1);
      let r = 0;
      for (const p of inc.get(id)) { const pr = visit(p); if (pr >= 0) r = Math.max(r, pr + 1); }
      state.set(id, 2); rank.set(id, r);
      return r;
    };
    nodes.forEach((n) => visit(n.id));
    // A queue nothing routes to goes in the first queue column.
    nodes.forEach((n) => { if (n.kind !== 'exchange' && !inc.get(n.id).length) rank.set(n.id, 1); });
    const layers = [];
    nodes.forEach((n) => { const r = rank.get(n.id); (layers[r] = layers[r] || []).push(n.id); });
    for (let i = 0; i < layers.length; i++) layers[i] = (layers[i] || []).sort((a, b) => byId.get(a).label.localeCompare(byId.get(b).label));
    // Barycentre sweeps: order each layer by the mean position of its neighbours.
    const pos = new Map();
    const index = () => layers.forEach((l) => l.forEach((id, i) => pos.set(id, i)));
    index();
    const bary = (id, nbrs) => { const ps = nbrs.filter((x) => pos.has(x)).map((x) => pos.get(x)); return ps.length ? ps.reduce((a, b) => a + b, 0) / ps.length : pos.get(id); };
    for (let sweep = 0; sweep < 4; sweep++) {
      const down = sweep % 2 === 0;
      const order = down ? layers.map((_, i) => i) : layers.map((_, i) => layers.length - 1 - i);
      for (const i of order) {
        const l = layers[i];
        const key = new Map(l.map((id) => [id, bary(id, down ? inc.get(id) : out.get(id))]));
        l.sort((a, b) => key.get(a) - key.get(b));
        l.forEach((id, j) => pos.set(id, j));
      }
    }
    const tallest = Math.max(1, ...layers.map((l) => l.length));
    const placed = new Map();
    layers.forEach((l, r) => {
      const offset = ((tallest - l.length) * (NODE_H + ROW_GAP)) / 2;
      l.forEach((id, i) => placed.set(id, { x: 10 + r * (NODE_W + COL_GAP), y: 10 + offset + i * (NODE_H + ROW_GAP) }));
    });
    // Room underneath for edges that loop back.
    return { pos: placed, width: 20 + layers.length * (NODE_W + COL_GAP) - COL_GAP, height: 90 + tallest * (NODE_H + ROW_GAP), ranks: rank };
  }

  const short = (s, n) => (s.length > n ? s.slice(0, n - 1) + '…' : s);
  const EDGE_COLORS = { binding: '#6b7785', e2e: '#7b3fb0', alternate: '#c46a00', 'dead-letter': '#b00020' };
  // The SVG of a laid-out graph. nodes: {id, kind, label, name, detail}; edges:
  // {from, to, kind, label} (a label, even empty, gets a text element to update). `marks` (optional): {nodes: Set, edges: Set of "from>to>kind"}
  // to highlight (a traced path).
  function graphSvg(nodes, edges, lay, marks) {
    const markN = (marks && marks.nodes) || new Set(), markE = (marks && marks.edges) || new Set();
    const many = edges.length > 400;
    let s = '<defs>';
    for (const [k, c] of Object.entries(EDGE_COLORS)) s += '<marker id="arr-' + k + '" viewBox="0 0 8 8" refX="8" refY="4" markerUnits="userSpaceOnUse" markerWidth="9" markerHeight="9" orient="auto"><path d="M0,0L8,4L0,8z" fill="' + c + '"/></marker>';
    s += '</defs><g class="edges">';
    for (const e of edges) {
      const a = lay.pos.get(e.from), b = lay.pos.get(e.to);
      if (!a || !b) continue;
      let d;
      const y1 = a.y + NODE_H / 2, y2 = b.y + NODE_H / 2;
      if (b.x > a.x) {
        const x1 = a.x + NODE_W, x2 = b.x, mx = (x1 + x2) / 2;
        d = 'M' + x1 + ',' + y1 + ' C' + mx + ',' + y1 + ' ' + mx + ',' + y2 + ' ' + x2 + ',' + y2;
      } else {
        // Backwards (dead-letter) or same column: loop around underneath.
        const x1 = a.x + NODE_W / 2, x2 = b.x + NODE_W / 2, low = Math.max(y1, y2) + 40 + Math.abs(a.x - b.x) / 8;
        d = 'M' + x1 + ',' + (a.y + NODE_H) + ' C' + x1 + ',' + low + ' ' + x2 + ',' + low + ' ' + x2 + ',' + (b.y + NODE_H);
      }
      const key = e.from + '>' + e.to + '>' + e.kind;
      const on = markE.has(key);
      s += '<path class="edge edge-' + e.kind + (on ? ' on-path' : '') + '" data-kind="' + e.kind + '" data-from="' + esc(e.from) + '" data-to="' + esc(e.to) + '" d="' + d + '" stroke="' + EDGE_COLORS[e.kind] + '" marker-end="url(#arr-' + e.kind + ')"' +
        (e.kind === 'alternate' || e.kind === 'dead-letter' ? ' stroke-dasharray="6 4"' : '') + ' fill="none"><title>' + esc(e.title || e.kind) + '</title></path>';
      if (e.label != null && !many) {
        // At the middle of the curve, so labels of edges meeting at one node stay apart.
        const lx = b.x > a.x ? (a.x + NODE_W + b.x) / 2 : (a.x + b.x) / 2 + NODE_W / 2, ly = b.x > a.x ? (y1 + y2) / 2 - 3 : Math.max(y1, y2) + 30;
        s += '<text class="edge-label" data-kind="' + e.kind + '" data-from="' + esc(e.from) + '" data-to="' + esc(e.to) + '" x="' + lx + '" y="' + ly + '" text-anchor="middle">' + esc(e.label) + '</text>';
      }
    }
    s += '</g><g class="nodes">';
    for (const n of nodes) {
      const p = lay.pos.get(n.id);
      if (!p) continue;
      const on = markN.has(n.id);
      s += '<g class="node node-' + n.kind + (on ? ' on-path' : '') + '" tabindex="0" role="button" data-id="' + esc(n.id) + '" data-kind="' + n.kind + '" data-name="' + esc(n.name) + '" transform="translate(' + p.x + ',' + p.y + ')">' +
        '<rect width="' + NODE_W + '" height="' + NODE_H + '" rx="' + (n.kind === 'exchange' ? 3 : 12) + '"/>' +
        '<text x="8" y="17" class="node-label">' + esc(short(n.label, 21)) + '</text>' +
        '<text x="' + (NODE_W - 6) + '" y="17" text-anchor="end" class="node-detail">' + esc(n.detail || '') + '</text><title>' + esc(n.title || n.label) + '</title></g>';
    }
    s += '</g>';
    return s;
  }

  // A line chart of `series` ([{label, color, points: [[t, v], ...]}]) over the
  // last `span` ms ending at `now`, y from 0 to a round maximum.
  function lineChart(svg, series, opts) {
    if (!svg) return;
    opts = opts || {};
    const W = svg.clientWidth || 800, H = svg.clientHeight || 200, L = 64, R = 10, T = 10, B = 24;
    const now = opts.now || Date.now(), span = opts.span || 600000;
    let max = 0;
    series.forEach((se) => se.points.forEach(([, v]) => { if (v > max) max = v; }));
    if (max <= 0) max = 1;
    const mag = Math.pow(10, Math.floor(Math.log10(max)));
    max = Math.ceil(max / mag) * mag;
    const x = (t) => L + (W - L - R) * (1 - (now - t) / span);
    const y = (v) => T + (H - T - B) * (1 - v / max);
    const fmt = opts.format || ((v) => String(Math.round(v * 10) / 10));
    let s = '';
    for (let i = 0; i <= 4; i++) {
      const v = (max * i) / 4, yy = y(v).toFixed(1);
      s += '<line x1="' + L + '" x2="' + (W - R) + '" y1="' + yy + '" y2="' + yy + '" stroke="#e3e7eb"/><text x="' + (L - 6) + '" y="' + yy + '" dy="4" text-anchor="end" font-size="11" fill="#5b6570">' + esc(fmt(v)) + '</text>';
    }
    for (let i = 0; i <= 4; i++) {
      const ago = (span * i) / 4, xx = x(now - ago).toFixed(1);
      const label = !i ? 'now' : ago < 120000 ? '-' + Math.round(ago / 1000) + ' s' : '-' + Math.round(ago / 6000) / 10 + ' min';
      s += '<text x="' + xx + '" y="' + (H - 6) + '" text-anchor="' + (i === 4 ? 'start' : i ? 'middle' : 'end') + '" font-size="11" fill="#5b6570">' + label + '</text>';
    }
    series.forEach((se) => {
      const pts = se.points.filter(([t]) => now - t <= span).map(([t, v]) => x(t).toFixed(1) + ',' + y(v).toFixed(1)).join(' ');
      if (pts) s += '<polyline class="series" data-series="' + esc(se.key || se.label) + '" fill="none" stroke="' + se.color + '" stroke-width="2" stroke-linejoin="round" points="' + pts + '"/>';
    });
    const last = series.map((se) => se.label + ' ' + (se.points.length ? fmt(se.points[se.points.length - 1][1]) : '–')).join(', ');
    s += '<title>' + esc(opts.title ? opts.title + ': ' + last : last) + '</title>';
    svg.setAttribute('viewBox', '0 0 ' + W + ' ' + H);
    svg.innerHTML = s;
  }

  // RabbitMQ samples (newest first, running totals) as per-second rates, oldest first.
  function ratesOf(samples) {
    const s = (samples || []).slice().reverse(), out = [];
    for (let i = 1; i < s.length; i++) {
      const dt = (s[i].timestamp - s[i - 1].timestamp) / 1000;
      if (dt > 0) out.push([s[i].timestamp, Math.max(0, (s[i].sample - s[i - 1].sample) / dt)]);
    }
    return out;
  }
  // Gauge samples (newest first) as points, oldest first.
  const pointsOf = (samples) => (samples || []).slice().reverse().map((x) => [x.timestamp, x.sample]);

  window.WarrenFlow = { layout, graphSvg, lineChart, ratesOf, pointsOf, NODE_W, NODE_H };
})();
