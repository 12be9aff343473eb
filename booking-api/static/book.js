/*
 * book.js — the fan's booking page (book.html), served at /static/book.js by booking-api.
 * Plain JS in one IIFE, no framework, no build step. It talks to the same-origin booking API:
 *   POST /v1/fans/session, GET /v1/drops/{id}, GET /v1/drops/{id}/seats,
 *   POST /v1/drops/{id}/holds, GET|DELETE /v1/holds/{id}, POST /v1/holds/{id}/confirm,
 *   GET /v1/orders/{id}, GET /v1/fans/me/holds, GET /v1/fans/me/orders.
 * Time shown to the fan comes from the server (server_now_ms), never from the phone's clock alone.
 * The API is the page's own origin, or the one in <meta name="floodgate-api-url"> when another
 * server serves the page: queue-server serves it as the shop of its drops (/drops/{id}/shop), on
 * the queue page's origin, and the queue page hands over the admitted fan and their admission
 * token in that origin's storage (fan.js). Links never switch the fan without asking: a
 * #fan_token=… is only taken after "Continue as …?" (adoptLinked). ?admission_token=… is still
 * read (the booking_url of the waiting room's `admitted` answers, for other front ends).
 */
(function () {
  'use strict';

  // ---------------------------------------------------------------- constants

  // From fan.js (loaded first): what both pages know about a fan.
  const { keys, tokenSubject, takeLinkToken, askSwitch } = window.FloodgateFan;
  const FAN_TOKEN_KEY = keys.fanToken;
  const FAN_NAME_KEY = keys.fanName;
  /** booking-api's URL when it isn't this page's origin ('' when it is). */
  const API_URL = ((document.querySelector('meta[name="floodgate-api-url"]') || {}).content || '')
    .replace(/\/+$/, '');
  const REFRESH_MS = 5000;            // live counts while no hold is active
  const POLL_DEFAULT_S = 3;           // payment confirmation polling
  const POLL_MAX = 100;               // ≈ 5 minutes of polling, then we stop and say so
  const REQUEST_TIMEOUT_MS = 20000;
  const MAX_QUANTITY_OPTIONS = 100;   // bound on a quantity <select>
  const MAX_RETRY_AFTER_S = 120;

  const $ = (id) => document.getElementById(id);
  const els = {};
  [
    'whoami', 'fan-label', 'signout', 'drop-name', 'drop-meta', 'drop-notice', 'status', 'error',
    'notice', 'signin', 'signin-form', 'fan-name', 'pick', 'pick-title', 'pick-hint', 'inventory',
    'seated', 'seat-map', 'seat-selection', 'hold-seats', 'best-form', 'best-section',
    'best-quantity', 'hold-best', 'hold-view', 'hold-title', 'countdown', 'hold-items',
    'hold-total', 'pending', 'pay-form', 'pay-reference', 'pay', 'release', 'order-view',
    'order-title', 'order-id', 'order-items', 'order-total', 'back-to-drop', 'orders',
    'orders-list',
  ].forEach((id) => { els[id] = $(id); });

  // ---------------------------------------------------------------- state

  const state = {
    dropId: null,
    drop: null,               // GET /v1/drops/{id}
    seats: [],                // GET /v1/drops/{id}/seats, one {seat, section, row, number, state} each
    seatsVersion: null,       // that map's version: sent as If-None-Match, an unchanged map is a 304
    fanToken: null,
    admissionToken: null,
    offsetMs: 0,              // server clock − local clock
    view: 'pick',             // 'pick' | 'hold' | 'order'
    hold: null,               // {id, expiresAtMs, items, totalCents, currency, state, said60, said10}
    orders: [],               // this fan's orders for this drop
    selected: new Set(),      // seat ids picked on the map
    busy: false,              // a reserve / pay / release request is in flight
    paying: false,
    cooldownUntil: 0,         // after 429 / 503 recovering
    pendingAttempt: null,     // {key, bodyJson}: reused when a reserve hit a network error
    pollCount: 0,
    timers: { refresh: 0, countdown: 0, poll: 0, cooldown: 0 },
  };

  // ---------------------------------------------------------------- small helpers

  const store = {
    get(area, key) { try { return window[area].getItem(key); } catch (_) { return null; } },
    set(area, key, v) { try { window[area].setItem(key, v); } catch (_) { /* private mode */ } },
    del(area, key) { try { window[area].removeItem(key); } catch (_) { /* private mode */ } },
  };

  /** Creates an element: h('p', {class: 'x', 'data-sku': 'a'}, 'text', child). Text is never HTML. */
  function h(tag, attrs, ...kids) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === 'class') el.className = v;
      else el.setAttribute(k, v === true ? '' : String(v));
    }
    for (const kid of kids.flat()) {
      if (kid !== null && kid !== undefined && kid !== false) el.append(kid);
    }
    return el;
  }

  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  const serverNow = () => Date.now() + state.offsetMs;
  const enc = encodeURIComponent;

  function randomHex(bytes) {
    const b = crypto.getRandomValues(new Uint8Array(bytes));
    return Array.from(b, (v) => v.toString(16).padStart(2, '0')).join('');
  }

  // crypto.randomUUID exists only in secure contexts (https, localhost); a phone on the LAN
  // reaching http://192.168.x.y has getRandomValues but not randomUUID.
  function uuid() {
    if (typeof crypto.randomUUID === 'function') return crypto.randomUUID();
    const x = randomHex(16).split('');
    x[12] = '4';
    x[16] = ((parseInt(x[16], 16) & 0x3) | 0x8).toString(16);
    const s = x.join('');
    return `${s.slice(0, 8)}-${s.slice(8, 12)}-${s.slice(12, 16)}-${s.slice(16, 20)}-${s.slice(20)}`;
  }

  const moneyFormats = new Map();
  function fmtMoney(cents, currency) {
    const cur = currency || (state.drop && state.drop.currency) || 'USD';
    if (typeof cents !== 'number') return '';
    let nf = moneyFormats.get(cur);
    if (!nf) {
      try { nf = new Intl.NumberFormat(undefined, { style: 'currency', currency: cur }); }
      catch (_) { nf = null; }
      moneyFormats.set(cur, nf);
    }
    if (!nf) return `${(cents / 100).toFixed(2)} ${cur}`;
    // "cents" are the currency's minor unit: 2 digits for USD/EUR, 0 for JPY, 3 for KWD.
    const digits = nf.resolvedOptions().maximumFractionDigits;
    return nf.format(cents / 10 ** digits);
  }

  function toMs(t) {
    if (typeof t === 'number') return t;
    if (typeof t === 'string') { const ms = Date.parse(t); return Number.isNaN(ms) ? null : ms; }
    return null;
  }

  function fmtDateTime(t) {
    const ms = toMs(t);
    if (ms === null) return '';
    return new Intl.DateTimeFormat(undefined, { dateStyle: 'medium', timeStyle: 'short' })
      .format(new Date(ms));
  }

  /** The session's ends an admission token carries (its claims are readable, not secret):
   *  {shopEndMs, hardEndMs}, or null for a token without them. */
  function sessionEnds(token) {
    try {
      const part = String(token || '').split('.')[1];
      const json = atob(part.replace(/-/g, '+').replace(/_/g, '/'));
      const c = JSON.parse(json);
      if (typeof c.shop_end_ms !== 'number') return null;
      return { shopEndMs: c.shop_end_ms, hardEndMs: c.hard_end_ms };
    } catch (_) { return null; }
  }

  function fmtTime(ms) {
    return new Intl.DateTimeFormat(undefined, { timeStyle: 'medium' }).format(new Date(ms));
  }

  function fmtClock(ms) {
    const s = Math.max(0, Math.ceil(ms / 1000));
    const m = Math.floor(s / 60);
    return `${m}:${String(s % 60).padStart(2, '0')}`;
  }

  function fmtDuration(s) {
    if (s >= 120 && s % 60 === 0) return `${s / 60} minutes`;
    if (s >= 60) return `${Math.floor(s / 60)} min ${s % 60} s`;
    return `${s} seconds`;
  }

  const plural = (n, one, many) => `${n} ${n === 1 ? one : many}`;

  // ---------------------------------------------------------------- announcing

  let lastAnnounced = '';
  /** Puts text in the polite live region (#status); a repeat gets a no-break space so it is read again. */
  function announce(text) {
    const t = text === lastAnnounced ? `${text}\u00a0` : text;
    lastAnnounced = text;
    els.status.textContent = t;
  }

  function showError(text) {
    els.error.textContent = text;
    els.error.hidden = false;
    announce(text);
  }

  function clearError() {
    els.error.textContent = '';
    els.error.hidden = true;
  }

  function showNotice(text) {
    els.notice.textContent = text || '';
    els.notice.hidden = !text;
  }

  // ---------------------------------------------------------------- API

  class ApiError extends Error {
    constructor(status, code, message, retryAfterS) {
      super(message);
      this.status = status;
      this.code = code;
      this.retryAfterS = retryAfterS;
    }
  }
  class NetworkError extends Error {}

  function parseRetryAfter(v) {
    if (!v) return null;
    let s = Number(v);
    if (!Number.isFinite(s)) {
      const at = Date.parse(v);
      if (Number.isNaN(at)) return null;
      s = (at - Date.now()) / 1000;
    }
    return Math.min(MAX_RETRY_AFTER_S, Math.max(1, Math.ceil(s)));
  }

  /** What `api` resolves to when a conditional GET's answer is 304 (what the caller has is current). */
  const NOT_MODIFIED = Object.freeze({ notModified: true });

  /**
   * One JSON request. Resolves to the parsed body (null for 204, NOT_MODIFIED for 304); rejects with ApiError for a
   * non-2xx answer or NetworkError when the server could not be reached after `retries` retries.
   * A 401 on a call that sent the fan token signs the fan out.
   */
  async function api(method, path, opts = {}) {
    const headers = Object.assign({ Accept: 'application/json' }, opts.headers);
    const sendsToken = opts.auth !== false && !!state.fanToken;
    if (sendsToken) headers.Authorization = `Bearer ${state.fanToken}`;
    let body;
    if (opts.body !== undefined) {
      headers['Content-Type'] = 'application/json';
      body = typeof opts.body === 'string' ? opts.body : JSON.stringify(opts.body);
    }
    const retries = opts.retries || 0;
    let res;
    for (let attempt = 0; ; attempt += 1) {
      const ctrl = new AbortController();
      const timer = setTimeout(() => ctrl.abort(), REQUEST_TIMEOUT_MS);
      try {
        res = await fetch(API_URL + path, { method, headers, body, signal: ctrl.signal, cache: 'no-store' });
        break;
      } catch (err) {
        if (attempt >= retries) throw new NetworkError(String(err));
        await sleep(500 * 2 ** attempt);
      } finally {
        clearTimeout(timer);
      }
    }

    if (res.status === 304) return NOT_MODIFIED;
    let data = null;
    if (res.status !== 204) {
      const text = await res.text().catch(() => '');
      if (text) { try { data = JSON.parse(text); } catch (_) { data = null; } }
    }
    if (data && typeof data.server_now_ms === 'number') state.offsetMs = data.server_now_ms - Date.now();
    if (res.ok) return data;

    const e = (data && data.error) || {};
    const code = e.code || (res.status === 401 ? 'unauthorized' : `http_${res.status}`);
    const err = new ApiError(res.status, code, e.message || `The server answered ${res.status}.`,
      parseRetryAfter(res.headers.get('Retry-After')));
    err.detail = e.detail || null;
    if (res.status === 401 && sendsToken) {
      signOut('Your sign-in has ended. Please sign in again.');
      err.handled = true;
    }
    throw err;
  }

  const MESSAGES = {
    sold_out: () => 'Sold out.',
    all_held: () => 'Everything is held by other fans right now; holds that aren\'t paid for come back — try again in a minute.',
    insufficient_stock: () => 'There aren\'t that many left. Pick fewer and try again.',
    seat_unavailable: () => 'Some of those seats were just taken by someone else. Pick other seats.',
    limit_exceeded: () => `That's more than one fan may buy: the limit is ${limitText()} for this drop, counting your holds, payments in progress and purchases.`,
    not_open: () => {
      const at = state.drop && fmtDateTime(state.drop.opens_at);
      return at ? `This drop isn't open yet. It opens ${at}.` : 'This drop isn\'t open yet.';
    },
    drop_closed: () => 'This drop is closed.',
    not_admitted: (e) => (e.detail && e.detail.shop_ended_at_ms)
      ? 'Your time to pick has ended, so nothing more can be held; you can still pay for what you hold until its timer runs out.'
      : 'Your admission has ended (or you haven\'t been admitted yet). Rejoin the line from the waiting-room page that sent you here; when it\'s your turn it brings you back.',
    rate_limited: (e) => `Too many requests right now. Please wait ${plural(e.retryAfterS || 5, 'second', 'seconds')}, then try again.`,
    recovering: () => 'We\'re reconciling stock, try again in a few seconds.',
    hold_expired: () => 'Your hold expired; the items went back on sale.',
    hold_confirming: () => 'Your payment is being confirmed, so the hold can\'t be released now.',
    confirm_in_progress: () => 'A payment for this hold is already being confirmed.',
    payment_declined: () => 'Your payment was declined. Your hold is still yours until the timer runs out — you can try again.',
    payment_pending: () => 'Payment is being confirmed…',
    unavailable: () => 'The service is briefly unavailable. Please try again in a few seconds.',
    unknown_drop: () => 'This drop doesn\'t exist.',
    unknown_hold: () => 'That hold no longer exists.',
    body_too_large: () => 'That request was too large.',
  };

  function messageFor(err) {
    if (err instanceof NetworkError) return 'Can\'t reach Floodgate. Check your connection and try again.';
    if (!(err instanceof ApiError)) return 'Something went wrong on this page. Reload it to try again.';
    const m = MESSAGES[err.code];
    return m ? m(err) : err.message;
  }

  /** Shows an error in plain words and does what the code calls for (cool down, refresh counts). */
  function handleError(err) {
    if (!(err instanceof ApiError) && !(err instanceof NetworkError)) console.error(err);
    if (err && err.handled) return;       // a 401 that already signed the fan out
    showError(messageFor(err));
    if (!(err instanceof ApiError)) return;
    switch (err.code) {
      case 'rate_limited': cooldown(err.retryAfterS || 5); break;
      case 'recovering': cooldown(err.retryAfterS || 3); break;
      case 'not_admitted':
        state.admissionToken = null;
        store.del('sessionStorage', admissionKey());
        break;
      case 'seat_unavailable': case 'sold_out': case 'all_held': case 'insufficient_stock':
      case 'drop_closed': case 'not_open':
        refreshNow();
        break;
      default: break;
    }
  }

  function cooldown(seconds) {
    state.cooldownUntil = Date.now() + seconds * 1000;
    clearTimeout(state.timers.cooldown);
    state.timers.cooldown = setTimeout(() => {
      state.cooldownUntil = 0;
      clearError();                   // it said "wait N seconds"
      updateControls();
      if (state.view === 'pick') announce('You can try again now.');
    }, seconds * 1000);
    updateControls();
  }

  // ---------------------------------------------------------------- views

  function setView(view, focus) {
    state.view = view;
    const signedIn = !!state.fanToken;
    els.signin.hidden = signedIn;
    els.pick.hidden = view !== 'pick';
    els['hold-view'].hidden = view !== 'hold';
    els['order-view'].hidden = view !== 'order';
    els['pick-hint'].hidden = signedIn;
    els.whoami.hidden = !signedIn;
    els['fan-label'].textContent = store.get('localStorage', FAN_NAME_KEY) || 'fan';
    els.orders.hidden = !signedIn || state.orders.length === 0;
    if (!state.hold) scheduleRefresh();
    updateControls();
    if (focus) {
      const target = { pick: els['pick-title'], hold: els['hold-title'], order: els['order-title'] }[view];
      if (target) target.focus();
    }
  }

  const canReserve = () => !!state.fanToken && !!state.drop && !state.busy
    && state.drop.status !== 'closed' && Date.now() >= state.cooldownUntil;

  /** Enables or disables every action button from the current state. */
  function updateControls() {
    const ok = canReserve();
    for (const b of els.inventory.querySelectorAll('button.hold-sku')) {
      const sel = $(`quantity-${b.dataset.sku}`);
      b.disabled = !ok || !sel || sel.disabled;
    }
    els['hold-seats'].disabled = !ok || state.selected.size === 0;
    els['hold-best'].disabled = !ok || els['best-section'].options.length === 0
      || els['best-quantity'].disabled;
    const hd = state.hold;
    const confirming = !!hd && hd.state === 'confirming';
    els.pay.disabled = !hd || state.busy || confirming;
    els['pay-reference'].disabled = confirming;
    els.release.disabled = !hd || state.busy || confirming;
    els.pending.hidden = !confirming;
  }

  // ---------------------------------------------------------------- drop and inventory

  const isSeated = () => !!state.drop && (state.drop.kind === 'seated'
    || (!state.drop.kind && (state.drop.inventory || []).some((i) => 'section' in i)));

  /** Units this fan may still take: the per-fan limit less what their orders for this drop hold. */
  function limitLeft() {
    const limit = (state.drop && state.drop.per_fan_limit) || 1;
    let bought = 0;
    for (const o of state.orders) {
      for (const it of o.items || []) bought += it.quantity || 1;
    }
    return Math.max(0, limit - bought);
  }
  const limitText = () => plural((state.drop && state.drop.per_fan_limit) || 1, 'item', 'items');

  async function loadDrop() {
    const drop = await api('GET', `/v1/drops/${enc(state.dropId)}`, { auth: false, retries: 1 });
    state.drop = drop;
    renderDrop();
  }

  /**
   * The seat map arrives compact (a string of states per row, seat 1 first: f free, h held,
   * s sold) with a version; the page asks with If-None-Match explicitly (its fetches are
   * no-store, so the browser's own cache never answers), and a 304 leaves the map as it is.
   */
  async function loadSeats() {
    const headers = state.seatsVersion ? { 'If-None-Match': `"${state.seatsVersion}"` } : {};
    const data = await api('GET', `/v1/drops/${enc(state.dropId)}/seats`, { auth: false, retries: 1, headers });
    if (data === NOT_MODIFIED) return;
    state.seatsVersion = (data && data.version) || null;
    state.seats = expandSeats(data);
    renderSeatMap();
  }

  const SEAT_STATES = { f: 'free', h: 'held', s: 'sold' };

  function expandSeats(data) {
    const seats = [];
    for (const sec of (data && data.sections) || []) {
      for (const r of sec.rows || []) {
        const states = r.states || '';
        for (let i = 0; i < states.length; i += 1) {
          const number = i + 1;
          seats.push({
            seat: `${sec.section}-${r.row}-${number}`, section: sec.section, row: r.row, number,
            state: SEAT_STATES[states[i]] || 'held',
          });
        }
      }
    }
    return seats;
  }

  function renderDrop() {
    const d = state.drop;
    els['drop-name'].textContent = d.name || 'Drop';
    document.title = `${d.name || 'Drop'} · Floodgate`;

    const opensMs = toMs(d.opens_at);
    const notYet = opensMs !== null && opensMs > serverNow();
    let badge;
    if (d.status === 'closed') badge = h('span', { class: 'badge closed' }, 'Closed');
    else if (notYet) badge = h('span', { class: 'badge soon' }, 'Not open yet');
    else badge = h('span', { class: 'badge open' }, 'Open');
    const bits = [`Limit ${plural(d.per_fan_limit || 1, 'item', 'items')} per fan`];
    if (d.hold_ttl_s) bits.push(`holds last ${fmtDuration(d.hold_ttl_s)}`);
    els['drop-meta'].replaceChildren(badge, ' ', bits.join(' · '));

    let notice = '';
    if (d.status === 'closed') notice = 'This drop is closed; nothing more can be held.';
    else if (notYet) notice = `This drop opens ${fmtDateTime(d.opens_at)}.`;
    else if (d.admission && d.admission.mode === 'queue' && !state.admissionToken) {
      notice = 'This drop has a waiting room: join the line first. When it\'s your turn, it brings you back here.';
    } else if (d.admission && d.admission.mode === 'queue') {
      const ends = sessionEnds(state.admissionToken);
      if (ends && ends.shopEndMs > serverNow()) {
        notice = `Your turn: you can pick until ${fmtTime(ends.shopEndMs)}, then pay for what you hold before its timer runs out.`;
      } else if (ends) {
        notice = 'Your time to pick has ended; you can still pay for what you hold until its timer runs out.';
      }
    }
    els['drop-notice'].textContent = notice;
    els['drop-notice'].hidden = !notice;

    if (isSeated()) renderSections(); else renderGa();
    els.seated.hidden = !isSeated();
    updateControls();
  }

  function availText(i) {
    if (i.available > 0) {
      return `${i.available} of ${i.total} left${i.held > 0 ? ` · ${i.held} on hold` : ''}`;
    }
    if (i.held > 0) return `None free right now — ${i.held} on hold may come back`;
    return 'Sold out';
  }

  function fillQuantity(select, max) {
    const n = Math.min(max, MAX_QUANTITY_OPTIONS);
    if (select.dataset.max === String(n)) return;
    const keep = Number(select.value) || 1;
    select.dataset.max = String(n);
    if (n < 1) {
      select.replaceChildren(h('option', { value: '0' }, '0'));
      select.disabled = true;
      return;
    }
    const opts = [];
    for (let q = 1; q <= n; q += 1) opts.push(h('option', { value: q }, String(q)));
    select.replaceChildren(...opts);
    select.value = String(Math.min(keep, n));
    select.disabled = false;
  }

  /** GA: one card per SKU; built once, then updated in place so focus and choices survive refreshes. */
  function renderGa() {
    const inv = state.drop.inventory || [];
    const key = inv.map((i) => i.sku).join('\n');
    if (els.inventory.dataset.key !== key) {
      els.inventory.dataset.key = key;
      els.inventory.replaceChildren(h('ul', { class: 'skus' }, inv.map((i, n) => h('li',
        { class: 'sku', 'data-sku': i.sku },
        h('h3', {}, i.name || i.sku),
        h('p', { class: 'price' }),
        h('p', { class: 'avail' }),
        h('div', { class: 'pick-row' },
          h('div', { class: 'field' },
            h('label', { for: `quantity-${i.sku}` }, 'Quantity',
              h('span', { class: 'vh' }, ` of ${i.name || i.sku}`)),
            h('select', { id: `quantity-${i.sku}`, name: 'quantity' })),
          h('button', {
            type: 'button', class: 'hold-sku primary', 'data-sku': i.sku,
            id: n === 0 ? 'hold-button' : null,
          }, 'Hold', h('span', { class: 'vh' }, ` ${i.name || i.sku}`)))))));
    }
    for (const i of inv) {
      const card = els.inventory.querySelector(`li[data-sku="${CSS.escape(i.sku)}"]`);
      if (!card) continue;
      card.querySelector('.price').textContent = fmtMoney(i.price_cents);
      card.querySelector('.avail').textContent = availText(i);
      fillQuantity(card.querySelector('select'), Math.min(limitLeft(), i.available || 0));
    }
  }

  /** Seated: a table of sections with prices and counts, and the best-available choices. */
  function renderSections() {
    const inv = state.drop.inventory || [];
    els.inventory.dataset.key = '';
    els.inventory.replaceChildren(h('table', {},
      h('caption', {}, 'Sections'),
      h('thead', {}, h('tr', {},
        h('th', { scope: 'col' }, 'Section'), h('th', { scope: 'col', class: 'num' }, 'Price'),
        h('th', { scope: 'col', class: 'num' }, 'Free'), h('th', { scope: 'col', class: 'num' }, 'On hold'),
        h('th', { scope: 'col', class: 'num' }, 'Sold'))),
      h('tbody', {}, inv.map((s) => h('tr', {},
        h('th', { scope: 'row' }, s.section),
        h('td', { class: 'num' }, fmtMoney(s.price_cents)),
        h('td', { class: 'num' }, String(s.available)),
        h('td', { class: 'num' }, String(s.held)),
        h('td', { class: 'num' }, String(s.sold)))))));

    // Update the options in place when the sections are the same, so an open picker isn't reset.
    const sel = els['best-section'];
    const label = (s) => `${s.section} · ${fmtMoney(s.price_cents)} · ${s.available} free`;
    const same = sel.options.length === inv.length
      && inv.every((s, n) => sel.options[n].value === s.section);
    if (same) {
      inv.forEach((s, n) => { sel.options[n].textContent = label(s); });
    } else {
      const keep = sel.value;
      sel.replaceChildren(...inv.map((s) => h('option', { value: s.section }, label(s))));
      if (inv.some((s) => s.section === keep)) sel.value = keep;
    }
    fillQuantity(els['best-quantity'], limitLeft());
  }

  function seatWord(st) {
    return { free: 'free', held: 'held by someone', sold: 'sold' }[st] || st;
  }

  const seatButtons = new Map();   // seat id → its button (a big map is updated every 5 s)

  /** Seat map: sections → rows → seat buttons; rebuilt only when the set of seats changes. */
  function renderSeatMap() {
    const seats = state.seats;
    const key = seats.map((s) => s.seat).join(',');
    const map = els['seat-map'];
    if (map.dataset.key !== key) {
      map.dataset.key = key;
      seatButtons.clear();
      const sections = new Map();
      const order = ((state.drop && state.drop.inventory) || []).map((s) => s.section);
      for (const sec of order) sections.set(sec, new Map());
      for (const s of seats) {
        if (!sections.has(s.section)) sections.set(s.section, new Map());
        const rows = sections.get(s.section);
        if (!rows.has(s.row)) rows.set(s.row, []);
        rows.get(s.row).push(s);
      }
      const parts = [];
      for (const [section, rows] of sections) {
        if (rows.size === 0) continue;
        parts.push(h('fieldset', { class: 'seat-section' },
          h('legend', {}, `Section ${section}`),
          h('p', { class: 'stage', 'aria-hidden': 'true' }, 'Front · stage'),
          [...rows].map(([row, list]) => h('div', {
            class: 'seat-row', role: 'group', 'aria-label': `Section ${section}, row ${row}`,
          },
          h('span', { class: 'row-label', 'aria-hidden': 'true' }, `Row ${row}`),
          list.sort((a, b) => a.number - b.number).map((s) => {
            const b = h('button', {
              type: 'button', class: 'seat', 'data-seat': s.seat, 'data-section': s.section,
            }, String(s.number));
            seatButtons.set(s.seat, b);
            return b;
          })))));
      }
      map.replaceChildren(...parts);
      if (parts.length === 0) map.append(h('p', { class: 'hint' }, 'No seats to show.'));
    }

    const lost = [];
    for (const s of seats) {
      const b = seatButtons.get(s.seat);
      if (!b) continue;
      if (s.state !== 'free' && state.selected.has(s.seat)) {
        state.selected.delete(s.seat);
        lost.push(s.seat);
      }
      const picked = state.selected.has(s.seat);
      b.className = `seat ${s.state}${picked ? ' selected' : ''}`;
      b.disabled = s.state !== 'free';
      b.setAttribute('aria-pressed', picked ? 'true' : 'false');
      const label = `Section ${s.section}, row ${s.row}, seat ${s.number}: ${seatWord(s.state)}`;
      b.setAttribute('aria-label', label);
      b.title = label;
    }
    if (lost.length) announce(`Taken by someone else and removed from your pick: ${lost.join(', ')}.`);
    renderSelection();
  }

  function renderSelection() {
    const list = [...state.selected];
    els['seat-selection'].textContent = list.length
      ? `${plural(list.length, 'seat', 'seats')} selected (up to ${limitLeft()}): ${list.join(', ')}.`
      : `No seats selected. You can pick up to ${plural(limitLeft(), 'seat', 'seats')}.`;
    updateControls();
  }

  function toggleSeat(ev) {
    const b = ev.target.closest('button[data-seat]');
    if (!b || b.disabled) return;
    const id = b.dataset.seat;
    if (state.selected.has(id)) {
      state.selected.delete(id);
    } else {
      if (state.selected.size >= limitLeft()) {
        announce(`You can pick up to ${plural(limitLeft(), 'seat', 'seats')}.`);
        return;
      }
      state.selected.add(id);
    }
    const picked = state.selected.has(id);
    b.classList.toggle('selected', picked);
    b.setAttribute('aria-pressed', picked ? 'true' : 'false');
    renderSelection();
  }

  // Live counts every 5 s while no hold is active (and the tab is visible).
  function scheduleRefresh(delayMs) {
    clearTimeout(state.timers.refresh);
    state.timers.refresh = setTimeout(refresh, delayMs === undefined ? REFRESH_MS : delayMs);
  }

  async function refresh() {
    if (state.hold || !state.dropId) return;
    if (document.hidden) { scheduleRefresh(); return; }
    let wait = REFRESH_MS;
    try {
      await loadDrop();
      if (isSeated()) await loadSeats();
    } catch (e) {
      if (e instanceof ApiError && e.retryAfterS) wait = Math.max(wait, e.retryAfterS * 1000);
      if (e instanceof ApiError && e.code === 'unknown_drop') { showError(messageFor(e)); return; }
    }
    if (!state.hold) scheduleRefresh(wait);
  }

  function refreshNow() { if (!state.hold) scheduleRefresh(0); }

  // ---------------------------------------------------------------- reserving a hold

  const admissionKey = () => keys.admission(state.dropId);

  /**
   * POST a hold. The Idempotency-Key is made once per attempt and kept while the answer is
   * unknown (a network error), so clicking again with the same choice cannot hold twice.
   */
  async function reserve(body) {
    if (!canReserve()) return;
    clearError();
    showNotice('');
    const bodyJson = JSON.stringify(body);
    if (!state.pendingAttempt || state.pendingAttempt.bodyJson !== bodyJson) {
      state.pendingAttempt = { key: uuid(), bodyJson };
    }
    const headers = { 'Idempotency-Key': state.pendingAttempt.key };
    if (state.admissionToken) headers['X-Admission-Token'] = state.admissionToken;
    state.busy = true;
    updateControls();
    announce('Holding…');
    try {
      const data = await api('POST', `/v1/drops/${enc(state.dropId)}/holds`,
        { body: bodyJson, headers, retries: 2 });
      state.pendingAttempt = null;
      state.selected.clear();
      startHold(data, false);
    } catch (e) {
      if (!(e instanceof NetworkError)) state.pendingAttempt = null;
      handleError(e);
    } finally {
      state.busy = false;
      updateControls();
    }
  }

  function holdSku(ev) {
    const b = ev.target.closest('button.hold-sku');
    if (!b) return;
    const quantity = Number($(`quantity-${b.dataset.sku}`).value);
    if (!(quantity >= 1)) return;
    reserve({ items: [{ sku: b.dataset.sku, quantity }] });
  }

  function holdSeats() {
    if (state.selected.size === 0) return;
    reserve({ seats: [...state.selected] });
  }

  function holdBest(ev) {
    ev.preventDefault();
    const section = els['best-section'].value;
    const quantity = Number(els['best-quantity'].value);
    if (!section || !(quantity >= 1)) return;
    reserve({ best_available: { section, quantity } });
  }

  // ---------------------------------------------------------------- the hold and its countdown

  function itemText(it) {
    const price = fmtMoney(it.price_cents, state.hold && state.hold.currency);
    if (it.seat) {
      const s = state.seats.find((x) => x.seat === it.seat);
      const where = s ? `Section ${s.section}, row ${s.row}, seat ${s.number}` : `Seat ${it.seat}`;
      return `${where} — ${price}`;
    }
    const inv = ((state.drop && state.drop.inventory) || []).find((x) => x.sku === it.sku);
    const name = (inv && inv.name) || it.name || it.sku;
    return `${it.quantity} × ${name} — ${price} each`;
  }

  function itemsCount(items) {
    return (items || []).reduce((n, it) => n + (it.quantity || 1), 0);
  }

  /** Shows a hold (a fresh 201 answer or one found again after a refresh) and starts its countdown. */
  function startHold(data, resumed) {
    clearTimeout(state.timers.refresh);
    const expiresAtMs = typeof data.expires_at_ms === 'number' ? data.expires_at_ms : toMs(data.expires_at);
    const left = (expiresAtMs || 0) - serverNow();
    state.hold = {
      id: data.hold_id,
      expiresAtMs,
      items: data.items || [],
      totalCents: data.total_cents,
      currency: data.currency || (state.drop && state.drop.currency),
      state: data.state === 'confirming' ? 'confirming' : 'held',
      said60: left <= 60000,
      said10: left <= 10000,
    };
    els['hold-items'].replaceChildren(...state.hold.items.map((it) => h('li', {}, itemText(it))));
    els['hold-total'].textContent = fmtMoney(state.hold.totalCents, state.hold.currency);
    if (!els['pay-reference'].value) els['pay-reference'].value = `ok_${randomHex(6)}`;
    setView('hold', true);
    const what = plural(itemsCount(state.hold.items), 'item', 'items');
    announce(resumed
      ? `Your hold of ${what} is still active: ${fmtClock(left)} left to pay.`
      : `Hold created: ${what}, ${fmtMoney(state.hold.totalCents, state.hold.currency)}. You have ${fmtClock(left)} to pay.`);
    clearInterval(state.timers.countdown);
    state.timers.countdown = setInterval(tick, 250);
    tick();
  }

  function tick() {
    const hd = state.hold;
    if (!hd) return;
    const left = hd.expiresAtMs - serverNow();
    const text = fmtClock(left);
    if (els.countdown.textContent !== text) els.countdown.textContent = text;
    els.countdown.classList.toggle('urgent', left <= 60000);
    if (!hd.said60 && left <= 60000) { hd.said60 = true; announce('One minute left to pay.'); }
    if (!hd.said10 && left <= 10000) { hd.said10 = true; announce('10 seconds left to pay.'); }
    // While a payment is in flight or confirming, the server decides; we wait for its answer.
    if (left <= 0 && hd.state === 'held' && !state.paying) holdGone(MESSAGES.hold_expired());
  }

  /** The hold ended without a sale (expired, released elsewhere, unknown): back to picking. */
  function holdGone(message) {
    stopHold();
    showNotice(message);
    announce(message);
    setView('pick', true);
    refreshNow();
  }

  function stopHold() {
    state.hold = null;
    clearInterval(state.timers.countdown);
    clearTimeout(state.timers.poll);
    els['pay-reference'].value = '';
    els.countdown.textContent = '--:--';
  }

  async function release() {
    const hd = state.hold;
    if (!hd || state.busy) return;
    clearError();
    state.busy = true;
    updateControls();
    try {
      await api('DELETE', `/v1/holds/${enc(hd.id)}`, { retries: 1 });
      stopHold();
      showNotice('');
      announce('Hold released; the items are back on sale.');
      setView('pick', true);
      refreshNow();
    } catch (e) {
      if (e instanceof ApiError && (e.status === 404 || e.code === 'hold_expired')) {
        holdGone(MESSAGES.hold_expired());
      } else if (e instanceof ApiError && e.code === 'hold_confirming') {
        showError(messageFor(e));
        startPending(e.retryAfterS);
      } else {
        handleError(e);
      }
    } finally {
      state.busy = false;
      updateControls();
    }
  }

  // ---------------------------------------------------------------- paying

  async function pay(ev) {
    ev.preventDefault();
    const hd = state.hold;
    if (!hd || state.busy || hd.state === 'confirming') return;
    const reference = els['pay-reference'].value.trim();
    if (!reference) {
      showError('Enter a payment reference.');
      els['pay-reference'].focus();
      return;
    }
    clearError();
    state.busy = true;
    state.paying = true;
    updateControls();
    announce('Paying…');
    try {
      // Retrying with the same reference is safe: the server treats it as the same confirm.
      const order = await api('POST', `/v1/holds/${enc(hd.id)}/confirm`,
        { body: { payment: { gateway: 'test', reference } }, retries: 2 });
      showOrder(order);
    } catch (e) {
      const code = e instanceof ApiError ? e.code : null;
      if (e instanceof NetworkError) {
        startPending(POLL_DEFAULT_S);        // we can't know whether it went through: ask
      } else if (code === 'payment_declined') {
        hd.state = 'held';
        showError(messageFor(e));
        els['pay-reference'].focus();
        els['pay-reference'].select();
      } else if (['payment_pending', 'unavailable', 'confirm_in_progress', 'hold_confirming'].includes(code)) {
        startPending(e.retryAfterS);
      } else if (code === 'hold_expired' || e.status === 404) {
        holdGone(MESSAGES.hold_expired());
      } else {
        handleError(e);
      }
    } finally {
      state.busy = false;
      state.paying = false;
      updateControls();
      tick();
    }
  }

  /** Payment outcome unknown (503, timeout): poll the hold until it is sold, held again or gone. */
  function startPending(retryAfterS) {
    if (!state.hold) return;
    state.hold.state = 'confirming';
    state.pollCount = 0;
    clearError();
    announce('Payment is being confirmed…');
    updateControls();
    schedulePoll(retryAfterS || POLL_DEFAULT_S);
  }

  function schedulePoll(seconds) {
    clearTimeout(state.timers.poll);
    state.timers.poll = setTimeout(pollHold, Math.min(10, Math.max(1, seconds)) * 1000);
  }

  async function pollHold() {
    const hd = state.hold;
    if (!hd) return;
    state.pollCount += 1;
    let data;
    try {
      data = await api('GET', `/v1/holds/${enc(hd.id)}`);
    } catch (e) {
      if (e instanceof ApiError && e.status === 404) { holdGone(MESSAGES.unknown_hold()); return; }
      if (e instanceof ApiError && e.code === 'unauthorized') return;
      return keepPolling(e instanceof ApiError ? e.retryAfterS : null);
    }
    if (state.hold !== hd) return;
    if (typeof data.expires_at_ms === 'number') hd.expiresAtMs = data.expires_at_ms;
    switch (data.state) {
      case 'sold':
        if (data.order_id) {
          const order = await api('GET', `/v1/orders/${enc(data.order_id)}`).catch(() => null);
          showOrder(order || {
            order_id: data.order_id, items: hd.items, total_cents: hd.totalCents, currency: hd.currency,
          });
        } else {
          showOrder({ order_id: '', items: hd.items, total_cents: hd.totalCents, currency: hd.currency });
          loadOrders();
        }
        return;
      case 'held':
        hd.state = 'held';
        showError('The payment didn\'t go through. Your hold is still yours until the timer runs out — you can try again.');
        updateControls();
        tick();
        return;
      case 'expired': case 'released':
        holdGone(MESSAGES.hold_expired());
        return;
      default:
        keepPolling(null);
    }
  }

  function keepPolling(retryAfterS) {
    if (state.pollCount >= POLL_MAX) {
      showError('Your payment is still being confirmed. Your order will appear under "Your orders" once it completes; reload this page later to check.');
      return;
    }
    schedulePoll(retryAfterS || POLL_DEFAULT_S);
  }

  function showOrder(order) {
    const currency = order.currency || (state.hold && state.hold.currency);
    const items = order.items || (state.hold && state.hold.items) || [];
    stopHold();
    clearError();
    showNotice('');
    els['order-id'].textContent = order.order_id || '(being finalised)';
    els['order-items'].replaceChildren(...items.map((it) => h('li', {}, itemText(it))));
    els['order-total'].textContent = fmtMoney(order.total_cents, currency);
    setView('order', true);
    announce(`Payment confirmed. Your order number is ${order.order_id || 'being finalised'}.`);
    loadOrders();
  }

  // ---------------------------------------------------------------- orders and resuming

  async function loadOrders() {
    try {
      const data = await api('GET', `/v1/fans/me/orders?drop_id=${enc(state.dropId)}`, { retries: 1 });
      state.orders = ((data && data.orders) || []).filter((o) => String(o.drop_id) === state.dropId);
    } catch (e) {
      return; // the list is a convenience; the page works without it
    }
    renderOrders();
    if (state.drop) renderDrop();          // the per-fan limit left may have changed
    if (isSeated()) renderSelection();
  }

  function renderOrders() {
    els['orders-list'].replaceChildren(...state.orders.map((o) => h('li', {},
      h('p', { class: 'order-head' }, 'Order ', h('span', { class: 'mono' }, o.order_id),
        o.created_at ? ` · ${fmtDateTime(o.created_at)}` : ''),
      h('ul', { class: 'items' }, (o.items || []).map((it) => h('li', {}, itemText(it)))),
      h('p', {}, `Total ${fmtMoney(o.total_cents, o.currency)}`))));
    els.orders.hidden = !state.fanToken || state.orders.length === 0;
  }

  /** After a refresh: find a live hold of this drop and show its countdown / payment again. */
  async function resumeHold() {
    let data;
    try {
      data = await api('GET', `/v1/fans/me/holds?drop_id=${enc(state.dropId)}`, { retries: 1 });
    } catch (e) {
      if (!(e instanceof ApiError && e.code === 'unauthorized')) handleError(e);
      return;
    }
    const now = serverNow();
    const live = ((data && data.holds) || []).filter((x) => String(x.drop_id) === state.dropId
      && (x.state === 'confirming' || (x.state === 'held'
        && (typeof x.expires_at_ms === 'number' ? x.expires_at_ms : toMs(x.expires_at)) > now)));
    if (live.length === 0) return;
    live.sort((a, b) => (b.expires_at_ms || 0) - (a.expires_at_ms || 0));
    const found = live[0];
    startHold(found, true);
    if (found.state === 'confirming') startPending(POLL_DEFAULT_S);
  }

  async function afterSignIn() {
    await Promise.all([loadOrders(), resumeHold()]);
    if (!state.hold && state.view !== 'order') setView('pick', false);
  }

  // ---------------------------------------------------------------- identity

  async function signIn(ev) {
    ev.preventDefault();
    const fan = els['fan-name'].value.trim();
    if (!fan) {
      showError('Enter your name to continue.');
      els['fan-name'].focus();
      return;
    }
    clearError();
    try {
      const data = await api('POST', '/v1/fans/session', { body: { fan }, auth: false, retries: 1 });
      if (!data || !data.fan_token) throw new ApiError(500, 'bad_answer', 'Sign-in gave no token.', null);
      state.fanToken = data.fan_token;
      store.set('localStorage', FAN_TOKEN_KEY, data.fan_token);
      store.set('localStorage', FAN_NAME_KEY, fan);
      announce(`Signed in as ${fan}.`);
      setView('pick', true);
      await afterSignIn();
    } catch (e) {
      handleError(e);
    }
  }

  /** Forgets the fan token (on a 401 or "Sign out") and shows the sign-in form. */
  function signOut(message) {
    state.fanToken = null;
    store.del('localStorage', FAN_TOKEN_KEY);
    stopHold();
    state.orders = [];
    state.selected.clear();
    els['orders-list'].replaceChildren();
    setView('pick', false);
    if (state.seats.length) renderSeatMap();
    if (message) showError(message);
    els['fan-name'].focus();
  }

  // ---------------------------------------------------------------- start

  /** The drop, and the admission token in `?admission_token=`; the fan token a link carries, if any. */
  function readLocation() {
    // /drops/{id} at booking-api; /drops/{id}/shop at queue-server.
    const m = location.pathname.match(/^\/drops\/([^/]+)(?:\/shop)?\/?$/);
    if (m) {
      try { state.dropId = decodeURIComponent(m[1]); } catch (_) { state.dropId = m[1]; }
    }
    // Out of the address bar whatever the page: history, bookmarks and shared screens keep it.
    const linked = takeLinkToken();
    if (!state.dropId) return linked;
    const params = new URLSearchParams(location.search);
    const fromUrl = params.get('admission_token');
    if (fromUrl) {
      store.set('sessionStorage', admissionKey(), fromUrl);
      // Keep the token out of the address bar, history and bookmarks; sessionStorage has it.
      params.delete('admission_token');
      const q = params.toString();
      history.replaceState(null, '', location.pathname + (q ? `?${q}` : '') + location.hash);
    }
    state.admissionToken = fromUrl || store.get('sessionStorage', admissionKey());
    return linked;
  }

  /**
   * A fan token from a link is someone else's word for who this browser is (login CSRF): unless
   * it is the fan already signed in, ask, and store it only on "Continue as …". Declining keeps
   * whoever was signed in. The name shown is the token's own subject, never a separate
   * parameter: a link can't show one fan's name while signing in another.
   */
  async function adoptLinked(linked) {
    if (!linked) return;
    const next = tokenSubject(linked) || 'another fan';
    const current = state.fanToken
      ? (store.get('localStorage', FAN_NAME_KEY) || tokenSubject(state.fanToken) || 'fan')
      : null;
    if (linked === state.fanToken || (state.fanToken && next === tokenSubject(state.fanToken))) return;
    if (!(await askSwitch(next, current))) {
      announce(current ? `Still signed in as ${current}.` : 'Not signed in.');
      return;
    }
    state.fanToken = linked;
    store.set('localStorage', FAN_TOKEN_KEY, linked);
    store.set('localStorage', FAN_NAME_KEY, next);
    announce(`Signed in as ${next}.`);
  }

  function wire() {
    els['signin-form'].addEventListener('submit', signIn);
    els.signout.addEventListener('click', () => { signOut(''); announce('Signed out.'); });
    els.inventory.addEventListener('click', holdSku);
    els['seat-map'].addEventListener('click', toggleSeat);
    els['hold-seats'].addEventListener('click', holdSeats);
    els['best-form'].addEventListener('submit', holdBest);
    els['pay-form'].addEventListener('submit', pay);
    els.release.addEventListener('click', release);
    els['back-to-drop'].addEventListener('click', () => {
      showNotice('');
      setView('pick', true);
      refreshNow();
    });
    document.addEventListener('visibilitychange', () => {
      if (document.hidden) return;
      if (state.hold) tick(); else refreshNow();
    });
  }

  async function init() {
    wire();
    const linked = readLocation();
    state.fanToken = store.get('localStorage', FAN_TOKEN_KEY);
    await adoptLinked(linked);
    if (!state.dropId) {
      els['drop-name'].textContent = 'No drop here';
      showError('This address doesn\'t name a drop. Booking pages look like /drops/<drop id>.');
      return;
    }
    setView('pick', false);
    try {
      await loadDrop();
      if (isSeated()) await loadSeats();
    } catch (e) {
      if (e instanceof ApiError && e.code === 'unknown_drop') {
        els['drop-name'].textContent = 'Drop not found';
        showError(messageFor(e));
        els.pick.hidden = true;
        return;
      }
      handleError(e);
    }
    if (state.fanToken) await afterSignIn();
    else els['fan-name'].focus();
  }

  init();
})();
