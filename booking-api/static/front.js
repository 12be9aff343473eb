/*
 * front.js — the front page (front.html): lists the drops of GET /v1/catalogue.
 *
 * Every API value reaches the page as text (textContent, attributes through setAttribute): a drop
 * named "<b>…" shows those characters. The catalogue is served from the server's memory and
 * refreshed there every few seconds, so reading it again now and then costs the server nothing.
 */
(() => {
  'use strict';

  /** How often the page reads the catalogue again while it is open. */
  const REFRESH_MS = 30000;

  const { $, h } = window.FloodgatePage;

  const moneyFormats = new Map();
  function fmtMoney(cents, currency) {
    if (typeof cents !== 'number') return '';
    const cur = currency || 'USD';
    let nf = moneyFormats.get(cur);
    if (nf === undefined) {
      try { nf = new Intl.NumberFormat(undefined, { style: 'currency', currency: cur }); }
      catch (_) { nf = null; }
      moneyFormats.set(cur, nf);
    }
    if (!nf) return `${(cents / 100).toFixed(2)} ${cur}`;
    // "cents" are the currency's minor unit: 2 digits for USD/EUR, 0 for JPY, 3 for KWD.
    const digits = nf.resolvedOptions().maximumFractionDigits;
    return nf.format(cents / 10 ** digits);
  }

  function fmtDateTime(t) {
    const ms = Date.parse(t);
    if (Number.isNaN(ms)) return '';
    return new Intl.DateTimeFormat(undefined, { dateStyle: 'medium', timeStyle: 'short' })
      .format(new Date(ms));
  }

  /** Only http(s) links and paths on this site: a URL from the API never runs script. */
  function safeHref(url) {
    try {
      const u = new URL(String(url), window.location.href);
      return u.protocol === 'http:' || u.protocol === 'https:' ? u.href : null;
    } catch (_) {
      return null;
    }
  }

  const STATES = {
    on_sale: ['open', 'On sale'],
    sold_out: ['closed', 'Sold out'],
    coming_soon: ['soon', 'Coming soon'],
  };

  function card(d) {
    const [badgeClass, badgeText] = STATES[d.state] || ['soon', String(d.state || '')];
    const href = safeHref(d.url);
    const name = String(d.name || d.drop_id || '');
    const title = href ? h('a', { href }, name) : name;
    const when = d.state === 'coming_soon'
      ? `Opens ${fmtDateTime(d.opens_at)}`
      : `Opened ${fmtDateTime(d.opens_at)}`;
    const extra = d.admission_mode === 'queue' ? ' · waiting room' : '';
    const price = typeof d.from_price_cents === 'number'
      ? `from ${fmtMoney(d.from_price_cents, d.currency)}`
      : '';
    return h('li', { class: 'sku drop', 'data-drop-id': d.drop_id },
      h('h3', null, title),
      h('p', { class: 'price' }, price),
      h('p', { class: 'avail' }, h('span', { class: `badge ${badgeClass}` }, badgeText), ' ', when + extra));
  }

  function fill(listId, drops) {
    const list = Array.isArray(drops) ? drops : [];
    $(listId).replaceChildren(...list.map(card));
    $(`${listId}-empty`).hidden = list.length > 0;
  }

  async function load() {
    try {
      const r = await fetch('/v1/catalogue', { headers: { Accept: 'application/json' } });
      const body = await r.json().catch(() => null);
      if (!r.ok || !body) {
        const msg = body && body.error && body.error.message;
        throw new Error(msg || `the server answered ${r.status}`);
      }
      fill('on-sale', body.on_sale);
      fill('coming-soon', body.coming_soon);
      $('error').hidden = true;
      const n = (body.on_sale || []).length + (body.coming_soon || []).length;
      $('status').textContent = `${n} drops listed.`;
    } catch (e) {
      $('error').textContent = `Couldn't load the drops: ${e.message}. Retrying shortly.`;
      $('error').hidden = false;
    }
  }

  load();
  setInterval(() => { if (!document.hidden) load(); }, REFRESH_MS);
})();
