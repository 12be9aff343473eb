/*
 * ops.js — the ops console (ops.html), on the API of the same origin.
 *
 * The ops key lives in this tab's sessionStorage only (never localStorage, never a URL; page.js's
 * keyedSession, which this page shares with the seller's back office, signs in and out). The live
 * figures come over the WebSocket /v1/ops/ws, whose first message carries the key
 * ({"type":"auth","api_key":…}: a browser can't put an Authorization header on a WebSocket or an
 * EventSource, and a URL would end up in proxies' logs). The server then lists the live drops;
 * picking one sends {"type":"watch"} and brings its chart history and a sample a second. The
 * controls use PUT /v1/drops/{id}/admission with `Authorization: Bearer`; a change that at least
 * doubles or halves a figure asks with confirm() first. The audit log is GET
 * /v1/drops/{id}/audit, read again after every change (ours, or one the figures reveal). Every
 * API value reaches the page as text (textContent, setAttribute); charts are SVG built by hand.
 */
(() => {
  'use strict';

  const KEY = 'floodgate.ops_key';
  /** What the charts show: the last 15 minutes. */
  const CHART_MS = 15 * 60 * 1000;
  /** The shortest time a chart spans, while its history is shorter than 15 minutes. */
  const MIN_CHART_MS = 60 * 1000;
  /** How long to wait before opening the stream again after it dropped. */
  const RECONNECT_MS = 2000;
  const SVG = 'http://www.w3.org/2000/svg';

  const { $, h, show, keyedSession } = window.FloodgatePage;

  function svg(tag, attrs) {
    const el = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
    return el;
  }

  function say(text) { $('status').textContent = text; }

  // The sign-in (page.js): the key, API calls with it (a 401 signs out), and the console shown
  // once signed in, whose stream opens then.
  const { key, api, signOut, signedIn } = keyedSession({
    storageKey: KEY,
    signedInPart: 'console',
    onSignIn: () => connect(),
    onSignOut: () => stopWatching(),
  });

  function fmtNum(v, digits) {
    if (v === null || v === undefined || Number.isNaN(v)) return '–';
    return Number(v).toLocaleString(undefined, { maximumFractionDigits: digits ?? 1 });
  }
  const fmtPct = (v) => (v === null || v === undefined ? '–' : `${fmtNum(v * 100, 2)} %`);
  const fmtMs = (v) => (v === null || v === undefined ? '–' : `${fmtNum(v, 1)} ms`);

  function fmtTime(t) {
    const ms = typeof t === 'number' ? t : Date.parse(t);
    if (Number.isNaN(ms)) return '';
    return new Intl.DateTimeFormat(undefined, { dateStyle: 'short', timeStyle: 'medium' })
      .format(new Date(ms));
  }

  // ---- the figures and their charts ---------------------------------------------------------

  /**
   * Each tile: its title, the value it shows, a line under it, and the series its chart draws
   * (a second, dashed series is the limit the first runs against).
   */
  const FIGURES = [
    { id: 'line_fans', title: 'Fans in line', value: (s) => fmtNum(s.line_fans, 0),
      series: [(s) => s.line_fans] },
    { id: 'joins_per_s', title: 'Joins / s', value: (s) => fmtNum(s.joins_per_s),
      series: [(s) => s.joins_per_s] },
    { id: 'admitted_per_s', title: 'Admitted / s', value: (s) => fmtNum(s.admitted_per_s),
      sub: (s) => `set rate ${fmtNum(s.rate_per_s)} / s`,
      series: [(s) => s.admitted_per_s, (s) => s.rate_per_s] },
    { id: 'active_shoppers', title: 'Active shoppers', value: (s) => fmtNum(s.active_shoppers, 0),
      sub: (s) => `max active ${fmtNum(s.max_active, 0)}`,
      series: [(s) => s.active_shoppers, (s) => s.max_active] },
    { id: 'held_units', title: 'Held', value: (s) => fmtNum(s.held_units, 0),
      sub: (s) => `${fmtNum(s.confirming_holds, 0)} holds being paid for`,
      series: [(s) => s.held_units] },
    { id: 'sold_units', title: 'Sold', value: (s) => fmtNum(s.sold_units, 0),
      series: [(s) => s.sold_units] },
    { id: 'available_units', title: 'Available', value: (s) => fmtNum(s.available_units, 0),
      series: [(s) => s.available_units] },
    { id: 'reserve_p99', title: 'Reserve p99', value: (s) => fmtMs(s.reserve.p99_ms),
      sub: (s) => `${fmtNum(s.reserve.per_s)} reserves / s`,
      series: [(s) => s.reserve.p99_ms] },
    { id: 'reserve_errors', title: 'Reserve errors (5xx)', value: (s) => fmtPct(s.reserve.error_rate),
      series: [(s) => s.reserve.error_rate] },
    { id: 'confirm_p99', title: 'Confirm p99', value: (s) => fmtMs(s.confirm.p99_ms),
      sub: (s) => `${fmtNum(s.confirm.per_s)} confirms / s`,
      series: [(s) => s.confirm.p99_ms] },
    { id: 'confirm_errors', title: 'Confirm errors (5xx)', value: (s) => fmtPct(s.confirm.error_rate),
      series: [(s) => s.confirm.error_rate] },
  ];

  let samples = [];

  function buildTiles() {
    const box = $('figures');
    box.replaceChildren();
    for (const f of FIGURES) {
      const chart = svg('svg', {
        viewBox: '0 0 300 56', preserveAspectRatio: 'none', role: 'img',
        'aria-label': `${f.title}, last 15 minutes`,
      });
      box.append(h('div', { class: 'figure', id: `fig-${f.id}`, 'data-figure': f.id },
        h('h3', null, f.title),
        h('p', { class: 'value' }, '–'),
        h('p', { class: 'sub' }, ''),
        chart));
    }
  }

  /**
   * Draws one chart: time on x — the last 15 minutes, or less while there is less history (a
   * minute at least) — and 0..the largest value on y.
   */
  function draw(chart, f, now) {
    chart.replaceChildren(svg('line', { class: 'axis', x1: 0, y1: 55, x2: 300, y2: 55 }));
    const first = samples.length ? samples[0].at_ms : now;
    const from = Math.max(now - CHART_MS, Math.min(first, now - MIN_CHART_MS));
    const span = now - from;
    let max = 0;
    for (const s of samples) {
      for (const get of f.series) {
        const v = get(s);
        if (typeof v === 'number' && v > max) max = v;
      }
    }
    if (max <= 0) max = 1;
    f.series.forEach((get, i) => {
      const pts = [];
      for (const s of samples) {
        const v = get(s);
        if (typeof v !== 'number') continue;
        const x = ((s.at_ms - from) / span) * 300;
        const y = 54 - (v / max) * 50;
        pts.push(`${x.toFixed(1)},${y.toFixed(1)}`);
      }
      if (pts.length) {
        chart.append(svg('polyline', {
          class: i === 0 ? 'series' : 'series limit', points: pts.join(' '),
        }));
      }
    });
  }

  /** The line's state as words: the state's own word with spaces ("sold out", "all held"), but
   *  the waiting list by its name (the state word is `waitlist`). */
  const STATE_LABELS = { waitlist: 'waiting list' };
  function stateLabel(s) {
    return STATE_LABELS[s] || String(s).replace(/_/g, ' ');
  }

  function render() {
    const last = samples[samples.length - 1];
    if (!last) return;
    const now = last.at_ms;
    for (const f of FIGURES) {
      const tile = $(`fig-${f.id}`);
      tile.querySelector('.value').textContent = f.value(last);
      tile.querySelector('.sub').textContent = f.sub ? f.sub(last) : '';
      draw(tile.querySelector('svg'), f, now);
    }
    const state = $('line-state');
    state.textContent = stateLabel(last.state);
    state.dataset.state = last.state;
    $('updated').textContent = `· updated ${fmtTime(last.at_ms)}`;
    $('paused-now').textContent = last.paused ? 'paused' : 'running';
  }

  function addSample(s) {
    samples.push(s);
    const from = s.at_ms - CHART_MS;
    while (samples.length && samples[0].at_ms < from) samples.shift();
  }

  // ---- the stream ---------------------------------------------------------------------------

  let ws = null;
  let watching = '';
  let reconnect = null;
  /** The settings as last read, to compare a change with and to notice others' changes. */
  let settings = null;

  function streamState(state, text) {
    const el = $('stream-state');
    el.dataset.state = state;
    el.textContent = text;
  }

  function connect() {
    if (ws || !key()) return;
    clearTimeout(reconnect);
    streamState('connecting', 'Connecting…');
    const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
    // No credential in this address: the key is the socket's first message.
    const sock = new WebSocket(`${scheme}//${location.host}/v1/ops/ws`);
    ws = sock;
    sock.addEventListener('open', () => {
      sock.send(JSON.stringify({ type: 'auth', api_key: key() }));
    });
    sock.addEventListener('message', (ev) => {
      let m;
      try { m = JSON.parse(ev.data); } catch (_) { return; }
      onFrame(m);
    });
    sock.addEventListener('close', (ev) => {
      if (ws === sock) ws = null;
      if (ev.code === 1008) {
        // Refused: the key (or the first frame) was not accepted; the error frame said why.
        return;
      }
      if (key()) {
        streamState('down', 'Disconnected; reconnecting…');
        reconnect = setTimeout(connect, RECONNECT_MS);
      }
    });
  }

  function onFrame(m) {
    switch (m.type) {
      case 'drops': {
        streamState('live', 'Live');
        const was = watching;
        fillPicker(m.drops || []);
        // A new socket (after a reconnect) watches what the page showed.
        if (was) send({ type: 'watch', drop_id: was });
        break;
      }
      case 'history':
        if (m.drop_id !== watching) return;
        samples = [];
        for (const s of m.samples || []) addSample(s);
        render();
        break;
      case 'figures':
        if (m.drop_id !== watching) return;
        show('stream-error', '');
        noticeChange(m);
        addSample(m);
        render();
        break;
      case 'error':
        if (m.code === 'unauthorized' || m.code === 'forbidden') {
          signOut('That key was not accepted as an ops key; sign in again.');
        } else {
          show('stream-error', m.message || m.code);
        }
        break;
      default:
    }
  }

  function send(m) {
    if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(m));
  }

  function fillPicker(drops) {
    const pick = $('drop-picker');
    const keep = watching || location.hash.slice(1);
    pick.replaceChildren(h('option', { value: '' }, 'Choose a drop…'));
    for (const d of drops) {
      pick.append(h('option', { value: d.drop_id },
        `${d.name} · ${d.mode === 'queue' ? 'waiting room' : 'open'} · ${d.drop_id}`));
    }
    if (keep && drops.some((d) => d.drop_id === keep)) {
      pick.value = keep;
      if (!watching) watch(keep);
    }
  }

  function watch(drop) {
    watching = drop;
    samples = [];
    settings = null;
    $('watch').hidden = !drop;
    if (!drop) return;
    history.replaceState(null, '', `#${drop}`);
    buildTiles();
    $('line-state').textContent = '';
    send({ type: 'watch', drop_id: drop });
    loadSettings();
    loadAudit();
  }

  // ---- the controls -------------------------------------------------------------------------

  const CONTROLS = [
    { field: 'rate_per_s', input: 'rate', label: 'admitted per second', parse: Number },
    { field: 'burst', input: 'burst', label: 'burst', parse: (v) => Number(v) },
    { field: 'max_active', input: 'max-active', label: 'max active shoppers', parse: (v) => Number(v) },
    { field: 'shop_window_s', input: 'shop-window', label: 'shop window (s)', parse: (v) => Number(v) },
  ];

  async function loadSettings() {
    const drop = watching;
    try {
      const v = await api('GET', `/v1/drops/${encodeURIComponent(drop)}/admission`);
      if (drop !== watching) return;
      settings = v.admission;
      // A figure someone is typing is left alone until it is applied.
      for (const c of CONTROLS) {
        if (!$(c.input).dataset.dirty) $(c.input).value = String(settings[c.field]);
      }
      $('paused-now').textContent = settings.paused ? 'paused' : 'running';
    } catch (e) {
      show('controls-error', e.message);
    }
  }

  /** The settings moved between two samples (another console, a tool): read them again. */
  function noticeChange(s) {
    const prev = samples[samples.length - 1];
    if (!prev) return;
    if (s.paused !== prev.paused || s.rate_per_s !== prev.rate_per_s
        || s.max_active !== prev.max_active) {
      loadSettings();
      loadAudit();
    }
  }

  /** True when `after` is at least twice or at most half of `before`. */
  function big(before, after) {
    if (!(before > 0)) return after > 0;
    return after >= before * 2 || after <= before / 2;
  }

  async function change(update, okText) {
    show('controls-error', '');
    show('controls-ok', '');
    try {
      const v = await api('PUT', `/v1/drops/${encodeURIComponent(watching)}/admission`, update);
      settings = v.admission;
      for (const c of CONTROLS) delete $(c.input).dataset.dirty;
      show('controls-ok', okText);
      say(okText);
    } catch (e) {
      show('controls-error', e.message);
    }
    await loadSettings();
    await loadAudit();
  }

  for (const c of CONTROLS) {
    $(c.input).addEventListener('input', () => { $(c.input).dataset.dirty = '1'; });
  }
  $('pause').addEventListener('click', () => change({ paused: true }, 'The line is paused.'));
  $('resume').addEventListener('click', () => change({ paused: false }, 'The line runs again.'));

  $('controls-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    if (!settings) return;
    const update = {};
    const asks = [];
    for (const c of CONTROLS) {
      const raw = $(c.input).value.trim();
      if (raw === '') continue;
      const v = c.parse(raw);
      if (v === settings[c.field]) continue;
      // Sent as typed: the API is the one validator, and its message is shown.
      update[c.field] = Number.isFinite(v) ? v : raw;
      if (Number.isFinite(v) && big(settings[c.field], v)) {
        asks.push(`${c.label}: ${settings[c.field]} → ${v}`);
      }
    }
    if (Object.keys(update).length === 0) {
      show('controls-ok', 'Nothing changed.');
      return;
    }
    if (asks.length && !window.confirm(`This at least doubles or halves:\n${asks.join('\n')}\nApply?`)) {
      show('controls-ok', 'Not applied.');
      return;
    }
    change(update, 'Applied.');
  });

  // ---- the audit log ------------------------------------------------------------------------

  function changeText(field, c) {
    const fmt = (v) => (v === undefined ? '–' : JSON.stringify(v));
    return `${field}: ${fmt(c.before)} → ${fmt(c.after)}`;
  }

  async function loadAudit() {
    const drop = watching;
    try {
      const v = await api('GET', `/v1/drops/${encodeURIComponent(drop)}/audit`);
      if (drop !== watching) return;
      show('audit-error', '');
      const rows = (v.entries || []).map((e) => h('tr', { 'data-entry-id': e.entry_id },
        h('td', { class: 'when' }, fmtTime(e.at)),
        h('td', { class: 'key mono' }, e.key_id),
        h('td', { class: 'action' }, e.action),
        h('td', null, h('ul', { class: 'changes' },
          Object.entries(e.changes || {}).map(([f, c]) =>
            h('li', { 'data-field': f }, changeText(f, c)))))));
      $('audit').replaceChildren(...rows);
      $('audit-empty').hidden = rows.length > 0;
    } catch (e) {
      show('audit-error', e.message);
    }
  }

  // ---- signing in ---------------------------------------------------------------------------

  /** On signing out: the stream closes (no reconnect) and no drop is watched. */
  function stopWatching() {
    if (ws) {
      const sock = ws;
      ws = null;
      sock.close();
    }
    clearTimeout(reconnect);
    watching = '';
    $('watch').hidden = true;
  }

  $('drop-picker').addEventListener('change', () => watch($('drop-picker').value));
  $('drops-refresh').addEventListener('click', () => send({ type: 'drops' }));

  signedIn();
})();
