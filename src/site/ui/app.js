/* The site dashboard: one page, hash routes, plain DOM (text only: nothing the site
 * reports is parsed as HTML), charts with uPlot. Live: the data of the page in view is
 * fetched again every POLL_MS, one request per source at a time, each with a deadline. */
'use strict';

(function () {
  const POLL_MS = 5000;          // status and traffic; sooner when reports come more often
  const LIST_MS = 30000;         // the admin lists (devices, certificates, ...)
  const FETCH_TIMEOUT_MS = 10000;
  const CERT_SOON_DAYS = 30;     // as the status document's cert_expiry default
  const MAX_SERIES = 8;          // roles drawn one by one; the rest summed
  const PALETTE = ['#2563eb', '#dc2626', '#16a34a', '#d97706', '#7c3aed', '#0891b2',
                   '#db2777', '#4b5563'];

  const sources = {
    status: {url: '/v1/status', every: POLL_MS},
    trafficDay: {url: '/v1/traffic?range=day', every: POLL_MS},
    trafficMonth: {url: '/v1/traffic?range=month', every: POLL_MS},
    devices: {url: '/ui/api/device.list', every: LIST_MS},
    certs: {url: '/ui/api/cert.list', every: LIST_MS},
    connectors: {url: '/ui/api/connector.list', every: LIST_MS},
    mappings: {url: '/ui/api/mapping.list', every: LIST_MS},
    alerts: {url: '/ui/api/alert.list', every: LIST_MS},
  };
  const data = {}, errors = {}, fetchedAt = {}, pending = {};
  const charts = {};             // id -> {box, plot, key}
  let timer = null;

  /* ---- small helpers ---- */

  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v !== undefined && v !== null && v !== false)
        e.setAttribute(k, v === true ? '' : String(v));
    }
    for (const c of children.flat()) {
      if (c === null || c === undefined || c === false) continue;
      e.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return e;
  }

  const num = (v) => (typeof v === 'number' && isFinite(v) ? v : 0);

  function fmtNum(v) {
    return num(v).toLocaleString('en-US');
  }

  function fmtBytes(v) {
    let n = num(v);
    const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
    let i = 0;
    while (Math.abs(n) >= 1024 && i < units.length - 1) {
      n /= 1024;
      i++;
    }
    return (i === 0 ? String(Math.round(n)) : n.toFixed(n < 10 ? 2 : 1)) + ' ' + units[i];
  }

  function fmtAge(seconds) {
    if (typeof seconds !== 'number' || !isFinite(seconds)) return '–';
    const s = Math.max(0, Math.round(seconds));
    if (s < 60) return s + ' s';
    if (s < 3600) return Math.floor(s / 60) + ' min ' + (s % 60) + ' s';
    if (s < 86400) return Math.floor(s / 3600) + ' h ' + Math.floor((s % 3600) / 60) + ' min';
    return Math.floor(s / 86400) + ' d ' + Math.floor((s % 86400) / 3600) + ' h';
  }

  function pad(n) {
    return String(n).padStart(2, '0');
  }

  function fmtTime(unix) {
    if (typeof unix !== 'number' || !unix) return '–';
    const d = new Date(unix * 1000);
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
           `${pad(d.getHours())}:${pad(d.getMinutes())}`;
  }

  function fmtSince(unix, now) {
    if (typeof unix !== 'number' || !unix) return '–';
    return fmtAge(now - unix) + ' ago';
  }

  function fmtRtt(ms) {
    return typeof ms === 'number' ? ms.toFixed(ms < 10 ? 2 : 1) + ' ms' : '–';
  }

  // Classes from a fixed list only: states and levels come from reports.
  const BADGE_CLASSES = new Set(['up', 'down', 'connecting', 'draining', 'unknown', 'none',
    'stale', 'stale tag', 'ok', 'revoked', 'blocked', 'serving', 'starting', 'warning',
    'critical']);
  function badge(text, cls) {
    const c = cls || text;
    return el('span', {class: 'badge ' + (BADGE_CLASSES.has(c) ? c : 'unknown')}, text);
  }

  function table(headers, rows, attrs) {
    const head = el('tr', null, headers.map((h) =>
      el('th', {class: h.num ? 'num' : null}, h.label || h)));
    return el('div', {class: 'table-wrap'},
              el('table', attrs || null, el('thead', null, head), el('tbody', null, rows)));
  }

  function td(v, isNum) {
    return el('td', {class: isNum ? 'num' : null}, v);
  }

  function panel(title, ...children) {
    return el('section', {class: 'panel'}, title ? el('h2', null, title) : null, children);
  }

  function card(label, value, sub, cls, valueCls) {
    return el('div', {class: 'card ' + (cls || '')}, el('div', {class: 'label'}, label),
              el('div', {class: 'value ' + (valueCls || '')}, value),
              sub ? el('div', {class: 'sub'}, sub) : null);
  }

  function errorBox(what, err) {
    return el('p', {class: 'error-box'}, `${what} unavailable: ${err}`);
  }

  function nowSec() {
    const s = data.status;
    return s && typeof s.time === 'number' ? s.time : Math.floor(Date.now() / 1000);
  }

  /* ---- fetching ---- */

  async function getJSON(url) {
    const ctl = new AbortController();
    const t = setTimeout(() => ctl.abort(), FETCH_TIMEOUT_MS);
    try {
      const r = await fetch(url, {credentials: 'same-origin', signal: ctl.signal,
                                  headers: {Accept: 'application/json'}, cache: 'no-store'});
      if (r.status === 401) {
        location.assign('/ui/login');
        throw new Error('signed out');
      }
      const body = await r.json().catch(() => null);
      if (!r.ok) throw new Error((body && body.error) || `HTTP ${r.status}`);
      return body;
    } catch (e) {
      throw new Error(e.name === 'AbortError' ? 'no answer in time' : e.message);
    } finally {
      clearTimeout(t);
    }
  }

  /* The shortest report interval (the site's, a gateway's or a connector's), within 1..5 s:
   * nothing changes faster than reports come. */
  function pollMs() {
    const s = data.status || {};
    const intervals = [s.report_interval]
      .concat((Array.isArray(s.gateways) ? s.gateways : []).map((g) => g.interval))
      .concat((Array.isArray(s.connectors) ? s.connectors : []).map((c) => c.interval))
      .filter((v) => typeof v === 'number' && v > 0);
    const shortest = intervals.length ? Math.min(...intervals) * 1000 : POLL_MS;
    return Math.min(POLL_MS, Math.max(1000, shortest));
  }

  async function load(key, force) {
    const src = sources[key];
    const every = src.every === POLL_MS ? pollMs() : src.every;
    if (pending[key]) return;
    if (!force && fetchedAt[key] && Date.now() - fetchedAt[key] < every - 500) return;
    pending[key] = true;
    try {
      data[key] = await getJSON(src.url);
      errors[key] = null;
    } catch (e) {
      errors[key] = e.message;
    } finally {
      fetchedAt[key] = Date.now();
      pending[key] = false;
    }
  }

  /* ---- charts ---- */

  function chartBox(id) {
    if (!charts[id]) charts[id] = {box: el('div', {class: 'chart', 'data-chart': id}), plot: null,
                                   key: ''};
    return charts[id].box;
  }

  function chartWidth() {
    const main = document.getElementById('main');
    return Math.max(320, Math.min(1160, main.clientWidth - 70));
  }

  /* Draws (or updates) chart id: xs in unix seconds, one {label, color, values} a series. */
  function drawChart(id, title, xs, series, fmt, extra) {
    const c = charts[id];
    const plotted = series.reduce((n, s) => n + s.values.filter((v) => v).length, 0);
    const key = JSON.stringify([title, series.map((s) => s.label)]);
    const d = [xs, ...series.map((s) => s.values)];
    c.box.dataset.points = String(plotted);
    c.box.dataset.series = String(series.length);
    if (typeof uPlot === 'undefined') {
      c.box.textContent = 'the chart library did not load';
      return;
    }
    if (c.plot && c.key === key && c.plot.width === chartWidth()) {
      c.plot.setData(d);
      return;
    }
    if (c.plot) c.plot.destroy();
    c.box.textContent = '';
    const opts = {
      title, width: chartWidth(), height: 230,
      scales: {x: {time: true}},
      series: [{}].concat(series.map((s) => ({
        label: s.label, stroke: s.color, width: 2, dash: s.dash,
        points: {show: !s.dash && !!(extra && extra.points)},
        value: (u, v) => (v === null || v === undefined ? '–' : fmt(v)),
      }))),
      axes: [{}, {size: 80, values: (u, vals) => vals.map((v) => fmt(v))}],
      legend: {live: true},
    };
    c.plot = new uPlot(opts, d, c.box);
    c.key = key;
  }

  /* The x values of a traffic document: every step from `from` to `to`, empty ones as 0. */
  function grid(doc) {
    const xs = [];
    const step = num(doc.step) || 300;
    if (!num(doc.from) || num(doc.to) < num(doc.from)) return xs;
    for (let t = doc.from; t <= doc.to && xs.length < 2000; t += step) xs.push(t);
    return xs;
  }

  function roleLabel(role) {
    const s = data.status;
    if (s && role === s.site_role) return 'site registration';
    const maps = Array.isArray(data.mappings) ? data.mappings : [];
    const m = maps.find((x) => x.role === role);
    return m ? `${m.url} (${role})` : role === '' ? 'whole gateway' : role;
  }

  /* Per-role series of one column of a traffic document (1 requests, 2 request bytes,
   * 3 response bytes, or [2, 3] summed), the biggest MAX_SERIES - 1 apart, the rest summed. */
  function roleSeries(doc, xs, cols) {
    const index = new Map(xs.map((x, i) => [x, i]));
    const step = num(doc.step) || 300;
    const rows = (Array.isArray(doc.series) ? doc.series : []).map((s) => {
      const values = xs.map(() => 0);
      for (const p of Array.isArray(s.points) ? s.points : []) {
        const i = index.get(Math.floor((num(p[0]) - xs[0]) / step) * step + xs[0]);
        if (i === undefined) continue;
        for (const c of cols) values[i] += num(p[c]);
      }
      return {label: roleLabel(String(s.role)), values,
              total: values.reduce((a, b) => a + b, 0)};
    }).sort((a, b) => b.total - a.total);
    const shown = rows.slice(0, MAX_SERIES - 1);
    const rest = rows.slice(MAX_SERIES - 1);
    if (rest.length) {
      shown.push({label: `${rest.length} other roles`,
                  values: xs.map((_, i) => rest.reduce((a, r) => a + r.values[i], 0))});
    }
    return shown.map((s, i) => ({label: s.label, values: s.values, color: PALETTE[i]}));
  }

  /* ---- pages ---- */

  function matrix(s) {
    const tunnels = Array.isArray(s.tunnels) ? s.tunnels : [];
    const gws = [...new Set(tunnels.map((t) => t.gateway))].sort();
    const cns = [...new Set(tunnels.map((t) => t.connector))].sort();
    if (!gws.length) return el('p', {class: 'muted'}, 'No tunnel reported yet.');
    const rows = gws.map((g) => el('tr', null, el('th', {class: 'row'}, g || '(unnamed)'),
      cns.map((c) => {
        const t = tunnels.find((x) => x.gateway === g && x.connector === c);
        if (!t) return el('td', null, badge('none'));
        const stale = tunnelStale(t, s);
        return el('td', {class: stale ? 'stale' : null}, badge(t.state || 'unknown'),
                  stale ? badge('stale', 'stale tag') : null,
                  el('span', {class: 'cell-rtt'}, t.state === 'up' ? fmtRtt(t.rtt_ms) : ''));
      })));
    return table([{label: 'gateway \\ connector'}].concat(cns.map((c) => ({label: c}))), rows,
                 {class: 'matrix'});
  }

  function tunnelStale(t, s) {
    const gw = (s.gateways || []).find((g) => g.instance === t.gateway);
    return t.connector_view === 'stale' || t.state === 'unknown' || (gw && gw.stale);
  }

  function pageConnections(main) {
    const s = data.status;
    if (!s) return main.append(errorBox('Status', errors.status || 'loading'));
    const now = nowSec();
    const tunnels = Array.isArray(s.tunnels) ? s.tunnels : [];
    const up = tunnels.filter((t) => t.state === 'up').length;
    main.append(el('div', {class: 'cards'},
      card('Tunnels up', `${up} / ${tunnels.length}`, null,
           tunnels.length && up < tunnels.length ? 'warning' : ''),
      card('Gateway instances', fmtNum((s.gateways || []).length)),
      card('Connectors', fmtNum((s.connectors || []).length)),
      card('Policy version', fmtNum(s.policy_version))));
    main.append(panel('Matrix', matrix(s),
      el('p', {class: 'note'}, 'Each gateway instance × each connector: the state and round trip.')));
    const rows = tunnels.map((t) => {
      const stale = tunnelStale(t, s);
      return el('tr', {class: stale ? 'stale' : null, 'data-tunnel-row': '',
                       'data-state': t.state, 'data-gateway': t.gateway,
                       'data-connector': t.connector},
        td(t.gateway), td(t.address), td(t.connector),
        el('td', null, badge(t.state || 'unknown'), stale ? badge('stale', 'stale tag') : null),
        td(fmtSince(t.since, now)), td(t.state === 'up' ? fmtRtt(t.rtt_ms) : '–', true),
        td(fmtNum(t.reconnects), true),
        td(t.gateway_view || '–'), td(t.connector_view || '–'));
    });
    main.append(panel('Tunnels', tunnels.length ? table(
      ['Gateway', 'Address', 'Connector', 'State', 'Since', {label: 'RTT', num: true},
       {label: 'Reconnects', num: true}, 'Gateway view', 'Connector view'], rows,
      {id: 'tunnels'}) : el('p', {class: 'muted'}, 'No tunnel reported yet.')));
    const gws = (s.gateways || []).map((g) => el('tr', {class: g.stale ? 'stale' : null},
      td(g.instance), el('td', null, badge(g.state || 'unknown'), g.stale ? badge('stale', 'stale tag') : null),
      td(fmtNum(g.policy_version), true), td(fmtNum(g.devices_now), true),
      td(fmtAge(g.last_report_age) + ' ago'), td(g.via)));
    main.append(panel('Gateway instances', gws.length ? table(['Instance', 'State',
      {label: 'Policy', num: true}, {label: 'Devices now', num: true}, 'Last report', 'Via'],
      gws) : el('p', {class: 'muted'}, 'No gateway has reported yet.')));
    const revoked = new Set((Array.isArray(data.connectors) ? data.connectors : [])
      .filter((c) => c.revoked).map((c) => c.name));
    const cns = (s.connectors || []).map((c) => el('tr', {class: c.stale ? 'stale' : null},
      td(c.name),
      el('td', null, c.revoked || revoked.has(c.name) ? badge('revoked') :
                     c.draining ? badge('draining') : badge(c.stale ? 'stale' : 'ok', c.stale ? 'stale' : 'ok')),
      td(fmtNum(c.policy_version), true), td(fmtAge(c.last_report_age) + ' ago')));
    main.append(panel('Connectors', cns.length ? table(['Name', 'State',
      {label: 'Policy', num: true}, 'Last report'], cns)
      : el('p', {class: 'muted'}, 'No connector has reported yet.')));
  }

  function trafficTable(t, title) {
    const roles = t && Array.isArray(t.roles) ? t.roles : [];
    const rows = roles.map((r) => {
      const st = r.status || {};
      return el('tr', null, td(roleLabel(String(r.role))), td(fmtNum(r.requests), true),
        td(fmtNum(st['2xx']), true), td(fmtNum(st['4xx']), true), td(fmtNum(st['5xx']), true),
        td(fmtBytes(r.request_bytes), true), td(fmtBytes(r.response_bytes), true));
    });
    return panel(title, rows.length ? table(['Role', {label: 'Requests', num: true},
      {label: '2xx', num: true}, {label: '4xx', num: true}, {label: '5xx', num: true},
      {label: 'Request bytes', num: true}, {label: 'Response bytes', num: true}], rows)
      : el('p', {class: 'muted'}, 'No request yet.'));
  }

  function pageTraffic(main) {
    const s = data.status;
    if (s && s.traffic) {
      main.append(el('div', {class: 'cards'},
        card('Requests today', fmtNum(s.traffic.today && s.traffic.today.requests)),
        card('Bytes today', fmtBytes(num(s.traffic.today && s.traffic.today.request_bytes) +
                                     num(s.traffic.today && s.traffic.today.response_bytes)),
             'requests and responses'),
        card('Requests this month', fmtNum(s.traffic.month && s.traffic.month.requests)),
        card('Bytes this month', fmtBytes(num(s.traffic.month && s.traffic.month.request_bytes) +
                                          num(s.traffic.month && s.traffic.month.response_bytes)))));
    }
    const wrap = el('div', {class: 'charts'});
    main.append(panel('Per role', wrap));
    const drawn = [];
    for (const [key, range, pts] of [['trafficDay', 'last 24 h, 5-minute points', false],
                                     ['trafficMonth', 'this month, daily points', true]]) {
      const doc = data[key];
      if (!doc) {
        wrap.append(errorBox(`Traffic (${range})`, errors[key] || 'loading'));
        continue;
      }
      const xs = grid(doc);
      const id = key === 'trafficDay' ? 'traffic-day' : 'traffic-month';
      wrap.append(chartBox(id + '-requests'), chartBox(id + '-bytes'));
      drawn.push(() => {
        drawChart(id + '-requests', `Requests — ${range}`, xs, roleSeries(doc, xs, [1]), fmtNum,
                  {points: pts});
        drawChart(id + '-bytes', `Bytes (request + response) — ${range}`, xs,
                  roleSeries(doc, xs, [2, 3]), fmtBytes, {points: pts});
      });
    }
    if (s && s.traffic) {
      main.append(trafficTable(s.traffic.today, 'Today'));
      main.append(trafficTable(s.traffic.month, 'This month'));
    }
    return drawn;
  }

  function meter(e) {
    const pct = typeof e.month_pct === 'number' ? e.month_pct : null;
    const level = pct === null ? '' : pct >= num(e.critical_pct) ? 'critical'
      : pct >= num(e.warning_pct) ? 'warning' : '';
    const fill = el('div', {class: 'fill ' + level});
    fill.style.width = Math.min(100, Math.max(0, pct || 0)) + '%';
    const marks = ['warning', 'critical'].map((k) => {
      const m = el('div', {class: 'mark ' + k}, el('span', null, `${k} ${num(e[k + '_pct'])} %`));
      m.style.left = Math.min(100, num(e[k + '_pct'])) + '%';
      return m;
    });
    return el('div', {class: 'meter', 'data-pct': pct === null ? '' : pct.toFixed(1)}, fill,
              marks);
  }

  function pageEgress(main) {
    const s = data.status;
    if (!s || !s.egress) {
      main.append(errorBox('Egress', errors.status || 'loading'));
      return [];
    }
    const e = s.egress;
    const limit = typeof e.monthly_limit === 'number' && e.monthly_limit > 0 ? e.monthly_limit : null;
    const pct = typeof e.month_pct === 'number' ? e.month_pct : null;
    const level = pct === null ? '' : pct >= num(e.critical_pct) ? 'critical'
      : pct >= num(e.warning_pct) ? 'warning' : '';
    main.append(el('div', {class: 'cards'},
      card('Today', fmtBytes(e.today), 'written to devices'),
      card('This month', fmtBytes(e.month), null, level),
      card('Monthly limit', limit ? fmtBytes(limit) : 'none',
           limit ? `warning at ${num(e.warning_pct)} %, critical at ${num(e.critical_pct)} %`
                 : 'set one: cmg site alert set egress-monthly SIZE'),
      card('Month used', pct === null ? '–' : pct.toFixed(1) + ' %', null, level)));
    if (limit) main.append(panel('This month against the limit', meter(e)));
    const wrap = el('div', {class: 'charts'});
    main.append(panel('Egress', wrap));
    const drawn = [];
    const day = data.trafficDay, month = data.trafficMonth;
    if (day) {
      const xs = grid(day);
      const vals = xs.map(() => 0);
      const index = new Map(xs.map((x, i) => [x, i]));
      for (const p of Array.isArray(day.egress) ? day.egress : []) {
        const i = index.get(p[0]);
        if (i !== undefined) vals[i] += num(p[1]);
      }
      wrap.append(chartBox('egress-day'));
      drawn.push(() => drawChart('egress-day', 'Egress — last 24 h, 5-minute points', xs,
                                 [{label: 'egress', color: PALETTE[0], values: vals}], fmtBytes));
    } else {
      wrap.append(errorBox('Egress (last 24 h)', errors.trafficDay || 'loading'));
    }
    if (month) {
      const xs = grid(month);
      const vals = xs.map(() => 0);
      const index = new Map(xs.map((x, i) => [x, i]));
      for (const p of Array.isArray(month.egress) ? month.egress : []) {
        const i = index.get(p[0]);
        if (i !== undefined) vals[i] += num(p[1]);
      }
      let sum = 0;
      const cumulative = vals.map((v) => (sum += v));
      const series = [{label: 'egress this month (cumulative)', color: PALETTE[0],
                       values: cumulative}];
      if (limit) {
        series.push({label: `warning (${num(e.warning_pct)} %)`, color: '#d97706', dash: [6, 4],
                     values: xs.map(() => limit * num(e.warning_pct) / 100)});
        series.push({label: `critical (${num(e.critical_pct)} %)`, color: '#b91c1c', dash: [6, 4],
                     values: xs.map(() => limit * num(e.critical_pct) / 100)});
      }
      wrap.append(chartBox('egress-month'));
      drawn.push(() => drawChart('egress-month', 'Egress — this month, daily, cumulative', xs,
                                 series, fmtBytes, {points: true}));
    } else {
      wrap.append(errorBox('Egress (this month)', errors.trafficMonth || 'loading'));
    }
    const rows = (e.by_gateway || []).map((g) => el('tr', null, td(g.instance),
      td(fmtBytes(g.today), true), td(fmtBytes(g.month), true)));
    main.append(panel('By gateway instance', rows.length ? table(['Instance',
      {label: 'Today', num: true}, {label: 'This month', num: true}], rows)
      : el('p', {class: 'muted'}, 'No gateway has reported egress yet.')));
    return drawn;
  }

  function pageDevices(main) {
    if (!Array.isArray(data.devices)) {
      return main.append(errorBox('Devices', errors.devices || 'loading'));
    }
    // registered devices only: device.list also names devices seen only on a channel
    const list = data.devices.filter((d) => d.registered != null);
    const now = Math.floor(Date.now() / 1000);
    const blocked = list.filter((d) => d.blocked);
    const valid = list.filter((d) => !d.blocked && num(d.token_expires) > now);
    const recent = list.filter((d) => now - num(d.registered) < 86400);
    main.append(el('div', {class: 'cards'},
      card('Registered', fmtNum(list.length)),
      card('Blocked', fmtNum(blocked.length), null, blocked.length ? 'warning' : ''),
      card('With a valid token', fmtNum(valid.length)),
      card('Registered in 24 h', fmtNum(recent.length))));
    const row = (d) => el('tr', {class: d.blocked ? 'warning' : null}, td(d.name), td(d.id),
      td(fmtTime(d.registered)), td(fmtTime(d.token_expires)),
      el('td', null, d.blocked ? badge('blocked', 'critical') : badge('ok')));
    const head = ['Name', 'Id', 'Registered', 'Token expires', 'State'];
    main.append(panel('Blocked devices', blocked.length
      ? table(head, blocked.slice(0, 200).map(row)) : el('p', {class: 'muted'}, 'None.')));
    const latest = list.slice(-50).reverse();
    main.append(panel('Latest registrations', latest.length ? table(head, latest.map(row))
      : el('p', {class: 'muted'}, 'No device has registered yet.')));
  }

  function pageCertificates(main) {
    const now = Math.floor(Date.now() / 1000);
    const s = data.status;
    const rows = [];
    for (const c of Array.isArray(data.certs) ? data.certs : []) {
      if (c.revoked || c.replaced) continue;
      rows.push({kind: c.kind, name: c.name, serial: c.serial || c.kid, end: num(c.expires)});
    }
    for (const c of s && Array.isArray(s.certificates) ? s.certificates : []) {
      if (c.kind === 'reported') rows.push({kind: 'reported', name: c.name, serial: c.serial,
                                            end: num(c.not_after)});
    }
    rows.sort((a, b) => a.end - b.end);
    if (!data.certs && errors.certs) main.append(errorBox('Certificates', errors.certs));
    const days = (r) => (r.end - now) / 86400;
    const soon = num(alertSettings().cert_expiry_days) || CERT_SOON_DAYS;
    main.append(el('div', {class: 'cards'},
      card('Certificates', fmtNum(rows.length)),
      card(`Ending within ${soon} days`, fmtNum(rows.filter((r) => days(r) < soon).length), null,
           rows.some((r) => days(r) < soon) ? 'warning' : ''),
      card('Next to end', rows.length ? fmtTime(rows[0].end) : '–',
           rows.length ? `${rows[0].kind} ${rows[0].name}` : null, '', 'small')));
    const trs = rows.map((r) => {
      const d = days(r);
      const cls = d < 0 ? 'expired' : d < 7 ? 'critical' : d < soon ? 'warning' : null;
      return el('tr', {class: cls, 'data-cert-row': ''}, td(r.kind), td(r.name),
        el('td', null, el('code', null, r.serial || '')), td(fmtTime(r.end)),
        td(r.end ? (d < 0 ? 'ended' : Math.floor(d) + ' d') : '–', true));
    });
    main.append(panel('Soonest to end first', trs.length ? table(['Kind', 'Name', 'Serial',
      'Not after', {label: 'Left', num: true}], trs)
      : el('p', {class: 'muted'}, data.certs ? 'No certificate.' : 'Loading…')));
  }

  /* The thresholds alert.list gives ({"settings": {...}, "alerts": [...]}), or {}. */
  function alertSettings() {
    const a = data.alerts;
    return a && a.settings && typeof a.settings === 'object' ? a.settings : {};
  }

  function settingsPanel() {
    const t = alertSettings();
    if (!Object.keys(t).length) return null;
    const size = (v) => (typeof v === 'number' && v > 0 ? fmtBytes(v) : 'none');
    const rows = [
      ['Egress per month', size(t.egress_monthly)],
      ['Egress per day', size(t.egress_daily)],
      ['Warning / critical at', `${num(t.warning_pct)} % / ${num(t.critical_pct)} %`],
      ['Certificates ending within', `${num(t.cert_expiry_days)} days`],
      ['No tunnel for longer than', fmtAge(num(t.no_tunnel))],
      ['Webhook', t.webhook || 'none'],
    ].map(([k, v]) => el('tr', null, td(k), td(v)));
    return panel('Thresholds', table(['Setting', 'Value'], rows),
                 el('p', {class: 'note'}, 'Set with cmg site alert set …'));
  }

  function alertRow(a, now) {
    return el('tr', {class: a.level || null, 'data-alert-row': ''},
      el('td', null, badge(a.level || 'warning', a.level)), td(a.kind), td(a.subject),
      td(a.message), td(fmtTime(a.opened)), td(fmtSince(a.updated, now)));
  }

  function pageAlerts(main) {
    const s = data.status;
    if (!s) return main.append(errorBox('Alerts', errors.status || 'loading'));
    const now = nowSec();
    const open = Array.isArray(s.alerts) ? s.alerts : [];
    const head = ['Level', 'Kind', 'Subject', 'Message', 'Opened', 'Updated'];
    main.append(panel(`Open alerts (${open.length})`, open.length
      ? table(head, open.map((a) => alertRow(a, now)))
      : el('p', {class: 'muted'}, 'No open alert.')));
    const settings = settingsPanel();
    if (settings) main.append(settings);
  }

  const pages = {
    connections: {title: 'Connections', needs: ['status', 'connectors'], render: pageConnections},
    traffic: {title: 'Traffic', needs: ['status', 'trafficDay', 'trafficMonth', 'mappings'],
              render: pageTraffic},
    egress: {title: 'Egress', needs: ['status', 'trafficDay', 'trafficMonth'], render: pageEgress},
    devices: {title: 'Devices', needs: ['status', 'devices'], render: pageDevices},
    certificates: {title: 'Certificates', needs: ['status', 'certs', 'alerts'],
                   render: pageCertificates},
    alerts: {title: 'Alerts', needs: ['status', 'alerts'], render: pageAlerts},
  };

  function current() {
    const name = location.hash.replace(/^#\/?/, '');
    return pages[name] ? name : 'connections';
  }

  /* ---- the frame ---- */

  function renderHeader() {
    const s = data.status;
    document.getElementById('site-name').textContent =
      s ? `${s.service_name || ''} · policy ${s.policy_version}` : '';
    const upd = document.getElementById('updated');
    if (errors.status) {
      upd.textContent = `status unavailable: ${errors.status}`;
      upd.className = 'updated error';
    } else if (fetchedAt.status) {
      const d = new Date(fetchedAt.status);
      upd.textContent = `updated ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
      upd.className = 'updated';
    }
    const open = s && Array.isArray(s.alerts) ? s.alerts : [];
    const count = document.getElementById('alert-count');
    count.hidden = open.length === 0;
    count.textContent = String(open.length);
    count.className = 'count' + (open.some((a) => a.level === 'critical') ? ' critical' : '');
    for (const a of document.querySelectorAll('#nav a')) {
      a.classList.toggle('active', a.dataset.page === current());
    }
  }

  function render() {
    const name = current();
    const main = document.getElementById('main');
    const scroll = window.scrollY;
    const fresh = el('main', {id: 'main', 'data-page': name});
    fresh.append(el('h1', null, pages[name].title));
    main.replaceWith(fresh);
    const drawn = pages[name].render(fresh) || [];
    for (const draw of Array.isArray(drawn) ? drawn : []) draw();
    document.title = `${pages[name].title} · OpenCMG site`;
    renderHeader();
    window.scrollTo(0, scroll);
    // every source of the page answered (or failed): what tests wait for
    fresh.dataset.complete = String(pages[name].needs.every((k) => k in data || errors[k]));
    fresh.dataset.ready = String(Date.now());
  }

  async function tick(force) {
    clearTimeout(timer);
    await Promise.all(pages[current()].needs.map((k) => load(k, force)));
    render();
    timer = setTimeout(() => tick(false), pollMs());
  }

  window.addEventListener('hashchange', () => {
    render();
    tick(false);
  });
  let resizeTimer = null;
  window.addEventListener('resize', () => {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(render, 200);
  });
  tick(true);
})();
