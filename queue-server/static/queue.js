/*
 * queue.js — the fan's waiting room (queue.html), served at /static/queue.js by queue-server.
 * Plain JS in one IIFE, no build step. It talks to
 *   booking-api, at the URL in <meta name="floodgate-booking-url"> (another origin: booking-api's
 *     http.cors_allow_origins must list this page's): POST /v1/fans/session (the dev identity
 *     provider) and GET /v1/drops/{id} (the drop's name);
 *   queue-server, same origin: the WebSocket /v1/drops/{id}/queue/ws, which the page authenticates
 *     with its first message {"type":"auth","fan_token":…} (a token never goes in a URL: proxies
 *     and logs keep URLs), and when sockets keep failing, POST /v1/drops/{id}/queue then
 *     GET /v1/drops/{id}/queue/me every few seconds (the token as Authorization: Bearer).
 * The fan's identity is kept per drop in localStorage, so a reload keeps the place (joining is
 * idempotent per fan). On `admitted` the page hands the fan over to the shop, which queue-server
 * serves from this same origin (/drops/{id}/shop, booking-api's page): it writes the fan and the
 * admission token where the shop page reads them (fan.js's keys) and goes there. Nothing about
 * who the fan is travels in an address, so no link can sign a browser in as someone else. A fan
 * token can still come in a link (#fan_token=…, from a site with its own identity provider), but
 * unless it is the fan already here the page asks "Continue as …?" before it stores anything.
 */
(function () {
  'use strict';

  // ---------------------------------------------------------------- constants

  const BACKOFF_BASE_MS = 500;
  const BACKOFF_MAX_MS = 30000;
  const RESTART_SPREAD_MS = 3000;        // close 1012: everyone reconnects, spread over this
  const WS_FAILURES_BEFORE_POLLING = 4;  // sockets in a row that closed before they were stable
  /**
   * A socket counts as working once it has stayed open this long after its first message. One that
   * says something and closes at once (the server answered an error such as `recovering`, or
   * couldn't take the socket) keeps the backoff growing, or every page would reconnect twice a
   * second while the server is at its weakest.
   */
  const STABLE_MS = 5000;
  const POLL_MS = 5000;
  const POLLS_BETWEEN_WS_TRIES = 12;     // while polling, try a socket again about once a minute
  const REQUEST_TIMEOUT_MS = 15000;
  const ANNOUNCE_SETTLE_MS = 300;
  const POST_OPEN_BASE = 2 ** 52;        // places after opening are 2^52 + n (engine/src/queue.rs)
  const FINAL = ['admitted', 'sold_out', 'closed', 'done', 'error'];

  const $ = (id) => document.getElementById(id);
  const els = {};
  [
    'whoami', 'fan-label', 'drop-name', 'status', 'error', 'signin', 'signin-form', 'fan-name',
    'line', 'line-title', 'line-state', 'progress', 'progress-fill', 'place', 'ahead', 'eta', 'go',
    'go-link', 'conn', 'line-details',
  ].forEach((id) => { els[id] = $(id); });

  // ---------------------------------------------------------------- state

  const state = {
    dropId: null,
    bookingUrl: '',
    fan: null,            // {name, token, startAhead}: kept in localStorage per drop
    ws: null,
    wsFailures: 0,        // sockets in a row that closed before their first message
    attempt: 0,           // reconnects since the last socket that worked (the backoff's exponent)
    polling: false,
    polls: 0,
    position: null,       // the last exact `position` (or poll answer)
    tick: null,           // the last `tick`
    line: null,           // null (not known yet) | 'open' | 'paused' | 'all_held' | 'waitlist' | 'recovering' | 'unavailable'
    cameBack: 0,          // on the waiting list: units come back since the sell-out
    preQueue: null,       // {opensAtMs, waiting} before opening
    opensAtMs: null,      // from the drop (the poll answer doesn't carry it)
    final: null,          // {kind, text, url}: nothing more will change (no reconnects)
    clockOffsetMs: 0,     // Redis' clock (ticks' at_ms) − ours
    timers: { retry: 0, poll: 0, clock: 0, say: 0, silence: 0, stable: 0 },
  };

  // ---------------------------------------------------------------- small helpers

  const enc = encodeURIComponent;
  const storeKey = () => `floodgate.queue.${state.dropId}`;
  const store = {
    load() { try { return JSON.parse(localStorage.getItem(storeKey())); } catch (_) { return null; } },
    save() { try { localStorage.setItem(storeKey(), JSON.stringify(state.fan)); } catch (_) { /* private mode */ } },
    clear() { try { localStorage.removeItem(storeKey()); } catch (_) { /* private mode */ } },
  };

  const plural = (n, one, many) => `${n.toLocaleString()} ${n === 1 ? one : many}`;
  const serverNow = () => Date.now() + state.clockOffsetMs;

  function fmtWait(s) {
    if (s < 60) return 'under a minute';
    const min = Math.ceil(s / 60);
    return min < 60 ? `about ${min} min` : `about ${Math.floor(min / 60)} h ${min % 60} min`;
  }

  function fmtClock(ms) {
    const s = Math.max(0, Math.ceil(ms / 1000));
    const h = Math.floor(s / 3600);
    const m = Math.floor((s % 3600) / 60);
    const ss = String(s % 60).padStart(2, '0');
    return h ? `${h}:${String(m).padStart(2, '0')}:${ss}` : `${m}:${ss}`;
  }

  const fmtTime = (ms) => new Intl.DateTimeFormat(undefined, { timeStyle: 'short' }).format(new Date(ms));

  /** Equal jitter: half the capped exponential delay, plus up to as much again at random. */
  function backoffMs(attempt) {
    const cap = Math.min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * 2 ** Math.min(attempt, 16));
    return cap / 2 + Math.random() * (cap / 2);
  }

  let lastAnnounced = '';
  /** Puts text in the polite live region; a repeat gets a no-break space so it is read again. */
  function announce(text) {
    const t = text === lastAnnounced ? `${text}\u00a0` : text;
    lastAnnounced = text;
    els.status.textContent = t;
  }

  function showError(text) {
    els.error.textContent = text;
    els.error.hidden = !text;
    if (text) announce(text);
  }

  // ---------------------------------------------------------------- HTTP

  class ApiError extends Error {
    constructor(status, code, message, retryAfterS) {
      super(message);
      Object.assign(this, { status, code, retryAfterS });
    }
  }

  /** One JSON request; rejects with ApiError (non-2xx) or a TypeError/AbortError (network). */
  async function request(method, url, body, token) {
    const headers = { Accept: 'application/json' };
    if (token) headers.Authorization = `Bearer ${token}`;
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    const ctrl = new AbortController();
    const timer = setTimeout(() => ctrl.abort(), REQUEST_TIMEOUT_MS);
    let res;
    try {
      res = await fetch(url, {
        method, headers, body: body === undefined ? undefined : JSON.stringify(body),
        signal: ctrl.signal, cache: 'no-store',
      });
    } finally {
      clearTimeout(timer);
    }
    const data = await res.json().catch(() => null);
    if (res.ok) return data;
    const e = (data && data.error) || {};
    throw new ApiError(res.status, e.code || `http_${res.status}`, e.message || `HTTP ${res.status}`,
      Number(res.headers.get('Retry-After')) || 0);
  }

  const queueApi = (method, path) => request(method, path, undefined, state.fan && state.fan.token);

  /**
   * Errors no retry will fix: an ended sign-in, an unknown drop, a drop without a waiting room.
   * Handles them and returns true; anything else is for the caller to retry.
   */
  function fatal(e) {
    if (!(e instanceof ApiError)) return false;
    if (e.code === 'unauthorized') {
      signOut('Your sign-in has ended. Join again with the same name: your place is kept.');
      return true;
    }
    if (e.code === 'unknown_drop') {
      finish('error', 'There is no such drop. Check the address you were given.');
      return true;
    }
    if (e.code === 'invalid_request') {
      finish('done', 'This drop has no waiting room: you can go straight to the shop.', shopUrl());
      return true;
    }
    return false;
  }

  // ---------------------------------------------------------------- identity

  async function signIn(ev) {
    ev.preventDefault();
    const name = els['fan-name'].value.trim();
    if (!name) {
      showError('Enter your name to join the line.');
      els['fan-name'].focus();
      return;
    }
    showError('');
    try {
      const data = await request('POST', `${state.bookingUrl}/v1/fans/session`, { fan: name });
      state.fan = { name: data.fan || name, token: data.fan_token, startAhead: null };
    } catch (e) {
      if (e instanceof ApiError && e.status === 404) {
        showError('Signing in with just a name is turned off here (the dev identity provider is off).');
      } else if (e instanceof ApiError && e.status === 422) {
        showError('Names may use letters, digits and . _ @ + - (up to 64).');
      } else {
        showError('Can\'t reach the sign-in service. Check your connection and try again.');
      }
      return;
    }
    store.save();
    startLine(true);
  }

  /** Forgets the fan (their token no longer works) and asks for a name again. */
  function signOut(message) {
    stopAll();
    state.fan = null;
    store.clear();
    els.line.hidden = true;
    els.whoami.hidden = true;
    els.signin.hidden = false;
    showError(message);
    els['fan-name'].focus();
  }

  // From fan.js (loaded first): what both pages know about a fan.
  const { keys, tokenSubject, takeLinkToken, askSwitch } = window.FloodgateFan;

  /** What the page keeps for the case Redis loses the line: the last place receipt (per drop and
   *  fan) and the admission token the hand-off stored. */
  const kept = {
    receiptKey: () => `floodgate.receipt.${state.dropId}.${state.fan && state.fan.name}`,
    receipt() { try { return localStorage.getItem(kept.receiptKey()); } catch (_) { return null; } },
    saveReceipt(r) { try { localStorage.setItem(kept.receiptKey(), r); } catch (_) { /* private mode */ } },
    admission() { try { return sessionStorage.getItem(keys.admission(state.dropId)); } catch (_) { return null; } },
  };

  /**
   * A fan token from a link (#fan_token=…) is someone else's word for who waits here (login
   * CSRF): unless it is the fan already here, ask, and take it only on "Continue as …";
   * declining keeps the fan and their place. The name shown is the token's own subject, so a
   * link can't show one fan's name while signing in another.
   */
  async function adoptLinked(linked) {
    if (!linked) return;
    const next = tokenSubject(linked) || 'another fan';
    const here = state.fan;
    if (here && (linked === here.token || next === tokenSubject(here.token))) return;
    if (!(await askSwitch(next, here ? here.name : null))) {
      announce(here ? `Still in line as ${here.name}.` : 'Not signed in.');
      return;
    }
    state.fan = { name: next, token: linked, startAhead: null };
    store.save();
  }

  // ---------------------------------------------------------------- the socket

  /** A socket that hears nothing for this long is dead (ticks come every 100 ms): reconnect. */
  const SILENCE_MS = 15000;

  function connect() {
    if (state.final || !state.fan) return;
    clearTimeout(state.timers.retry);
    // One socket at a time: a previous try still connecting (a proxy holding the upgrade) is
    // dropped, or each retry would leave another waiter open on the server.
    if (state.ws) {
      const old = state.ws;
      state.ws = null;
      old.onopen = old.onmessage = old.onclose = null;
      old.close();
    }
    const proto = location.protocol === 'https:' ? 'wss:' : 'ws:';
    const url = `${proto}//${location.host}/v1/drops/${enc(state.dropId)}/queue/ws`;
    let ws;
    try { ws = new WebSocket(url); } catch (_) { socketClosed(null, false); return; }
    state.ws = ws;
    // The socket's first message, sent the moment it opens: the server closes a socket that
    // hasn't authenticated within queue.ws_auth_timeout_ms (1008, reason auth_timeout).
    const token = state.fan.token;
    ws.onopen = () => {
      if (state.ws !== ws) return;
      // With what this page kept from before: if Redis lost the line, the receipt brings the
      // place back and the admission token the session (docs/API.md, "The line after Redis loss").
      const auth = { type: 'auth', fan_token: token };
      const receipt = kept.receipt();
      if (receipt) auth.receipt = receipt;
      const admission = kept.admission();
      if (admission) auth.admission_token = admission;
      ws.send(JSON.stringify(auth));
    };
    let heard = false;
    let stable = false;
    const silent = () => {
      clearTimeout(state.timers.silence);
      state.timers.silence = setTimeout(() => {
        if (state.ws !== ws) return;
        // Dead without a close (the server vanished, the network changed): start over.
        state.ws = null;
        ws.onopen = ws.onmessage = ws.onclose = null;
        ws.close();
        socketClosed(null, heard, stable);
      }, SILENCE_MS);
    };
    silent();
    ws.onmessage = (ev) => {
      if (state.ws !== ws) return;
      silent();
      if (!heard) {
        heard = true;
        clearTimeout(state.timers.stable);
        state.timers.stable = setTimeout(() => {
          if (state.ws !== ws) return;
          stable = true;
          state.wsFailures = 0;
          state.attempt = 0;
        }, STABLE_MS);
        if (state.polling) stopPolling();
        // A new socket starts with an exact position: ticks from before the gap would count
        // admissions it already has.
        state.tick = null;
        setConn('Live: this page updates by itself.');
      }
      let msg;
      try { msg = JSON.parse(ev.data); } catch (_) { return; }
      onMessage(msg);
    };
    // An error is always followed by a close; the close decides what to do.
    ws.onclose = (ev) => {
      if (state.ws !== ws) return;
      clearTimeout(state.timers.silence);
      clearTimeout(state.timers.stable);
      state.ws = null;
      socketClosed(ev.code, heard, stable);
    };
  }

  function socketClosed(code, heard, stable) {
    if (state.final || !state.fan || state.polling) return;   // polling carries on by itself
    if (!stable && code !== 1012) {
      state.wsFailures += 1;
      // A socket refused at once may be a bad token or drop (the browser hides the HTTP status):
      // one HTTP join says which, and joins us anyway (it is idempotent).
      if (!heard && state.wsFailures === 1) queueApi('POST', `/v1/drops/${enc(state.dropId)}/queue`).catch(fatal);
      if (state.wsFailures >= WS_FAILURES_BEFORE_POLLING) { startPolling(); return; }
    }
    let delay;
    if (code === 1012) {
      // The server is restarting and said so: come back soon, but not all at the same instant.
      delay = Math.random() * RESTART_SPREAD_MS;
    } else {
      delay = backoffMs(state.attempt);
      state.attempt += 1;
    }
    setConn('Connection lost. Reconnecting… your place is kept.');
    state.timers.retry = setTimeout(connect, delay);
  }

  function onMessage(m) {
    switch (m.type) {
      case 'position':
        state.position = { place: m.place, ahead: m.ahead, admittedTotal: m.admitted_total, rate: m.admit_rate_per_s };
        if (m.receipt) kept.saveReceipt(m.receipt);
        state.preQueue = null;
        if (state.line === null) state.line = 'open';
        showError('');
        break;
      case 'tick':
        onTick(m);
        break;
      case 'pre_queue':
        state.preQueue = { opensAtMs: m.opens_at, waiting: m.waiting };
        break;
      case 'paused': case 'all_held':
        state.line = m.type;
        break;
      // Sold out, with the waiting list: the fan keeps their place; with `ahead`, their own
      // standing (exact, like a position), else the line's news alone.
      case 'waitlisted':
        state.line = 'waitlist';
        if (typeof m.came_back === 'number') state.cameBack = m.came_back;
        if (typeof m.ahead === 'number') {
          state.position = { place: m.place, ahead: m.ahead, admittedTotal: null, rate: 0 };
          if (m.receipt) kept.saveReceipt(m.receipt);
        }
        state.preQueue = null;
        showError('');
        break;
      case 'admitted':
        admitted(m);
        return;
      case 'sold_out':
        finish('sold_out', 'Sold out. Everything has been sold, so the line has closed. Sorry!');
        return;
      case 'closed':
        finish('closed', 'This drop is closed: nobody else will be let in.');
        return;
      case 'done':
        finish('done', 'You\'ve had your turn for this drop, and your shopping time is over.', shopUrl());
        return;
      case 'error':
        if (!fatal(new ApiError(0, m.code, m.message, 0))) showError(m.message || 'Something went wrong; retrying.');
        return;
      default:
        return;
    }
    render();
  }

  /**
   * A tick is one frame shared by every waiter: the admissions so far (to count down from), the
   * rate, Redis' clock, and the line's state, which is how a page hears that a paused or all-held
   * line moves again (sold out and closed come as messages of their own).
   */
  function onTick(t) {
    state.tick = { admittedTotal: t.admitted_total, rate: t.admit_rate_per_s };
    if (typeof t.at_ms === 'number') state.clockOffsetMs = t.at_ms - Date.now();
    if (state.preQueue && typeof t.waiting === 'number') state.preQueue.waiting = t.waiting;
    if (['open', 'paused', 'all_held', 'recovering', 'unavailable'].includes(t.state)) state.line = t.state;
    if (t.state === 'waitlist') state.line = 'waitlist';
  }

  // ---------------------------------------------------------------- polling (no WebSocket)

  async function startPolling() {
    state.polling = true;
    state.polls = 0;
    setConn('Live updates aren\'t getting through; checking every few seconds instead.');
    try {
      await queueApi('POST', `/v1/drops/${enc(state.dropId)}/queue`);
    } catch (e) {
      if (fatal(e)) return;
    }
    poll();
  }

  function stopPolling() {
    state.polling = false;
    clearTimeout(state.timers.poll);
  }

  async function poll() {
    if (state.final || !state.fan || !state.polling) return;
    state.polls += 1;
    let wait = POLL_MS;
    try {
      onPoll(await queueApi('GET', `/v1/drops/${enc(state.dropId)}/queue/me`));
    } catch (e) {
      if (fatal(e)) return;
      // No place (e.g. dropped from the line while away): join again, same fan, same rules.
      if (e instanceof ApiError && e.code === 'not_found') {
        await queueApi('POST', `/v1/drops/${enc(state.dropId)}/queue`).catch(fatal);
      }
      if (e instanceof ApiError && e.retryAfterS) wait = Math.max(wait, e.retryAfterS * 1000);
    }
    if (state.final || !state.polling) return;
    if (state.polls % POLLS_BETWEEN_WS_TRIES === 0) connect();   // if it works, polling stops
    state.timers.poll = setTimeout(poll, wait * (0.8 + Math.random() * 0.4));
  }

  /** GET /queue/me: {status, place, ahead, eta_s, paused} (+ booking_url once admitted). */
  function onPoll(me) {
    switch (me.status) {
      case 'admitted': admitted(me); return;
      case 'sold_out': case 'closed': case 'done': onMessage({ type: me.status }); return;
      case 'pre_queue':
        state.preQueue = { opensAtMs: state.opensAtMs, waiting: null };
        break;
      default:
        state.preQueue = null;
        // Exact every time: no ticks to count down from.
        state.position = { place: me.place, ahead: me.ahead, admittedTotal: null, rate: null, etaS: me.eta_s };
        state.tick = null;
        state.line = me.paused ? 'paused' : (me.status === 'all_held' ? 'all_held' : 'open');
        if (me.status === 'waitlisted') {
          state.line = me.paused ? 'paused' : 'waitlist';
          state.cameBack = typeof me.came_back === 'number' ? me.came_back : state.cameBack;
        }
    }
    render();
  }

  // ---------------------------------------------------------------- the end of the wait

  /** The shop: booking-api's page, served by queue-server on this origin. */
  const shopUrl = () => `/drops/${enc(state.dropId)}/shop`;

  /**
   * Hands the fan (and, once admitted, their admission token) to the shop page: the same origin,
   * so through storage, never in an address. The fan is the one this page waits as, chosen here by
   * signing in (or by saying yes to a link): the shop takes them over whoever was signed in there.
   */
  function handOff(admissionToken) {
    if (!state.fan) return;
    try {
      localStorage.setItem(keys.fanToken, state.fan.token);
      localStorage.setItem(keys.fanName, state.fan.name);
      if (admissionToken) sessionStorage.setItem(keys.admission(state.dropId), admissionToken);
    } catch (_) { /* private mode: the shop asks the fan to sign in */ }
  }

  /** `admitted` (socket) or an admitted poll answer: the token, and off to the shop. */
  function admitted(m) {
    handOff(m.admission_token);
    const url = shopUrl();
    finish('admitted', m.offer
      ? 'One came back for you! It\'s kept for you for a little while: taking you to the shop…'
      : 'It\'s your turn! Taking you to the shop…', url);
    location.assign(url);
  }

  function finish(kind, text, url) {
    // The shop link (admitted, done, no waiting room) finds the fan signed in there.
    if (url) handOff(null);
    stopAll();
    setConn('');
    state.final = { kind, text, url };
    render();
  }

  function stopAll() {
    stopPolling();
    clearTimeout(state.timers.retry);
    clearTimeout(state.timers.silence);
    clearTimeout(state.timers.stable);
    const ws = state.ws;
    state.ws = null;
    if (ws) ws.close(1000);
  }

  // ---------------------------------------------------------------- showing it

  function setConn(text) { els.conn.textContent = text; }

  /** What the page says now: {kind, text} from the final state, the line and the position. */
  function situation() {
    if (state.final) return state.final;
    const pq = state.preQueue;
    if (pq) {
      // Opening time has come but the place from the draw hasn't arrived yet: no "in 0:00".
      if (pq.opensAtMs && pq.opensAtMs <= serverNow()) {
        return { kind: 'pre_queue', text: 'Opening… Your place from the fair draw arrives in a moment; no need to refresh.' };
      }
      const at = pq.opensAtMs ? ` at ${fmtTime(pq.opensAtMs)} (in ${fmtClock(pq.opensAtMs - serverNow())})` : ' soon';
      const who = typeof pq.waiting === 'number' ? ` ${plural(pq.waiting, 'fan is', 'fans are')} waiting.` : '';
      return { kind: 'pre_queue', text: `The line opens${at}.${who} Everyone here before then gets a place by fair draw — no need to rush or refresh.` };
    }
    if (state.line === 'paused') {
      return { kind: 'paused', text: 'Admission is paused by the organisers for now. You keep your place; the line moves again when it resumes.' };
    }
    if (state.line === 'all_held') {
      return { kind: 'all_held', text: 'Everything is in other fans\' baskets right now. You may still get in: what isn\'t paid for comes back, and the line moves again.' };
    }
    if (state.line === 'waitlist') {
      const ahead = aheadNow();
      const where = ahead === null ? 'you\'re on the waiting list'
        : `you're #${(ahead + 1).toLocaleString()} on the waiting list`;
      const back = state.cameBack > 0 ? `${state.cameBack.toLocaleString()} came back since it sold out` : 'none has come back yet';
      return { kind: 'waitlist', text: `Sold out — ${where}; ${back}. If one comes back for you, this page takes you to the shop.` };
    }
    if (state.line === 'recovering') {
      return { kind: 'paused', text: 'The line waits a moment while stock is checked. You keep your place.' };
    }
    if (state.line === 'unavailable') {
      return { kind: 'paused', text: 'The line can\'t move for a moment: our servers lost touch with each other. You keep your place; it moves again by itself.' };
    }
    if (!state.position) return { kind: 'connecting', text: 'Joining the line…' };
    if (aheadNow() === 0) return { kind: 'waiting', text: 'You\'re at the front of the line: you\'ll be let in any moment.' };
    return { kind: 'waiting', text: 'You\'re in line. When it\'s your turn, this page takes you to the shop.' };
  }

  /** People ahead now: the last exact count less everyone admitted since (all were ahead of us). */
  function aheadNow() {
    const p = state.position;
    if (!p || typeof p.ahead !== 'number') return null;
    const t = state.tick;
    const since = t && typeof p.admittedTotal === 'number' ? Math.max(0, t.admittedTotal - p.admittedTotal) : 0;
    return Math.max(0, p.ahead - since);
  }

  function etaS(ahead) {
    const p = state.position;
    const rate = state.tick ? state.tick.rate : p && p.rate;
    if (rate > 0) return Math.ceil((ahead + 1) / rate);
    return p && typeof p.etaS === 'number' ? p.etaS : null;
  }

  let lastKind = '';
  function render() {
    const s = situation();
    els['line-state'].textContent = s.text;
    els['line-state'].dataset.state = s.kind;
    if (s.kind !== lastKind) {
      // Said once the state has settled: a new socket's position and the state message that
      // follows it (e.g. paused) shouldn't be read out as two changes.
      lastKind = s.kind;
      clearTimeout(state.timers.say);
      state.timers.say = setTimeout(() => announce(situation().text), ANNOUNCE_SETTLE_MS);
    }
    els['line-details'].hidden = !!state.final && s.kind !== 'admitted';
    els.go.hidden = !s.url;
    if (s.url) {
      els['go-link'].href = s.url;
      els['go-link'].textContent = s.kind === 'admitted' ? 'Go to the shop now' : 'Go to the shop';
    }

    const p = state.position;
    const place = p && typeof p.place === 'number' ? p.place : null;
    els.place.dataset.place = place === null ? '' : String(place);
    if (place === null || state.preQueue) els.place.textContent = '–';
    else if (place >= POST_OPEN_BASE) els.place.textContent = `#${(place - POST_OPEN_BASE).toLocaleString()}`;
    else els.place.textContent = 'Drawn early';   // a pre-queue place: the seed's fair order

    const ahead = state.preQueue || s.kind === 'admitted' ? null : aheadNow();
    els.ahead.textContent = ahead === null ? '–' : ahead.toLocaleString();
    const eta = ahead === null ? null : etaS(ahead);
    if (ahead === null) els.eta.textContent = '–';
    else if (state.line === 'paused' || state.line === 'unavailable') els.eta.textContent = 'on hold';
    else if (state.line === 'all_held') els.eta.textContent = 'when stock returns';
    else if (state.line === 'waitlist') els.eta.textContent = 'if stock comes back';
    // A measured rate of 0 on an open line: every shopping slot is taken and nobody has finished
    // for a while. Promising a time then would be a guess, so the page says what is happening.
    else if (eta === null && state.tick && state.tick.rate === 0) els.eta.textContent = 'when shoppers finish';
    else els.eta.textContent = eta === null ? 'working it out' : fmtWait(eta);
    // Words ("when shoppers finish") in a smaller face than figures, so that at phone width they
    // wrap between words rather than inside one.
    const etaText = els.eta.textContent;
    els.eta.classList.toggle('words', /[a-z]/i.test(etaText) && !/\d/.test(etaText));

    // Progress from where we first stood to the front of the line.
    if (ahead !== null && state.fan && (state.fan.startAhead === null || ahead > state.fan.startAhead)) {
      state.fan.startAhead = ahead;
      store.save();
    }
    let pct = 0;
    if (s.kind === 'admitted') pct = 100;
    else if (ahead !== null && state.fan) {
      const start = state.fan.startAhead;
      pct = Math.round((100 * (start - ahead + 1)) / (start + 1));
    }
    els['progress-fill'].style.width = `${pct}%`;
    els.progress.setAttribute('aria-valuenow', String(pct));
    els.progress.setAttribute('aria-valuetext', ahead === null ? `${pct}%`
      : (ahead === 0 ? 'At the front of the line' : `${plural(ahead, 'person', 'people')} ahead of you`));

    // Only the pre-queue's countdown needs a clock; everything else changes with messages.
    clearTimeout(state.timers.clock);
    if (s.kind === 'pre_queue') state.timers.clock = setTimeout(render, 1000);
  }

  // ---------------------------------------------------------------- start

  function startLine(focus) {
    els.signin.hidden = true;
    els.line.hidden = false;
    els.whoami.hidden = false;
    els['fan-label'].textContent = state.fan.name;
    render();
    if (focus) els['line-title'].focus();
    connect();
  }

  /** The drop's name and opening time, for the heading; the line works without them. */
  async function loadDrop() {
    try {
      const d = await request('GET', `${state.bookingUrl}/v1/drops/${enc(state.dropId)}`);
      els['drop-name'].textContent = d.name;
      document.title = `${d.name} · Waiting room · Floodgate`;
      state.opensAtMs = Date.parse(d.opens_at) || null;
    } catch (_) { /* keep "Waiting room" */ }
  }

  async function init() {
    const m = location.pathname.match(/^\/drops\/([^/]+)\/?$/);
    if (!m) {
      showError('This address doesn\'t name a drop. Waiting rooms look like /drops/<drop id>.');
      return;
    }
    try { state.dropId = decodeURIComponent(m[1]); } catch (_) { state.dropId = m[1]; }
    const meta = document.querySelector('meta[name="floodgate-booking-url"]');
    state.bookingUrl = ((meta && meta.content) || '').replace(/\/+$/, '');
    els['signin-form'].addEventListener('submit', signIn);

    // Out of the address bar at once; taken only if the fan says so.
    const linked = takeLinkToken();
    const saved = store.load();
    if (saved && saved.token) state.fan = { name: saved.name || 'fan', token: saved.token, startAhead: saved.startAhead ?? null };
    loadDrop();
    await adoptLinked(linked);
    if (state.fan) startLine(false);
    else { els.signin.hidden = false; els['fan-name'].focus(); }
  }

  init();
})();
