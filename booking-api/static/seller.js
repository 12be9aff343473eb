/*
 * seller.js — the seller's back office (seller.html), on the API of the same origin.
 *
 * The seller key lives in this tab's sessionStorage only (never localStorage, never a URL) and is
 * sent as `Authorization: Bearer` (page.js's keyedSession, which this page shares with the ops
 * console, signs in and out and makes the API calls). The create form sends what the seller typed
 * and shows the API's own error message: the API is the one validator, so page and API never
 * disagree. Every API value reaches the page as text (textContent, setAttribute): a drop or fan
 * named "<b>…" shows those characters. The drops list polls GET /v1/drops and GET /v1/drops/{id}
 * every few seconds; an open GA drop's SKUs take stock from it
 * (POST /v1/drops/{id}/skus/{sku}/stock, confirmed first, with a request id that makes a retry
 * add once).
 */
(() => {
  'use strict';

  const KEY = 'floodgate.seller_key';
  /** How often the drops' live counts are read again while the page is visible. */
  const POLL_MS = 3000;
  /** Drops whose live counts the list reads each poll (the newest); the rest show their state. */
  const LIVE_DROPS = 20;
  /** Seats drawn in the preview, at most: a big map is summarised rather than drawn. */
  const PREVIEW_MAX_SEATS = 2000;

  const { $, h, show, keyedSession } = window.FloodgatePage;

  function fmtMoney(cents, currency) {
    const cur = currency || 'USD';
    try {
      const nf = new Intl.NumberFormat(undefined, { style: 'currency', currency: cur });
      const digits = nf.resolvedOptions().maximumFractionDigits;
      return nf.format(cents / 10 ** digits);
    } catch (_) {
      return `${(cents / 100).toFixed(2)} ${cur}`;
    }
  }

  function fmtDateTime(t) {
    const ms = Date.parse(t);
    if (Number.isNaN(ms)) return '';
    return new Intl.DateTimeFormat(undefined, { dateStyle: 'medium', timeStyle: 'short' })
      .format(new Date(ms));
  }

  // ---- signing in ------------------------------------------------------------------------
  // page.js: the key, API calls with it (a 401 signs out), and the office shown once signed in,
  // whose drops load then.

  const { key, api, signedIn } = keyedSession({
    storageKey: KEY,
    signedInPart: 'office',
    onSignIn: () => loadDrops(),
  });

  // ---- the create form --------------------------------------------------------------------

  const radio = (name) => document.querySelector(`input[name="${name}"]:checked`).value;

  function input(cls, attrs) {
    return h('input', Object.assign({ class: cls }, attrs));
  }

  function addSku(sku, name, price, qty) {
    const tr = h('tr', { class: 'sku-row' },
      h('td', null, input('sku-id', { 'aria-label': 'SKU', value: sku || '', size: 8 })),
      h('td', null, input('sku-name', { 'aria-label': 'Name', value: name || '' })),
      h('td', null, input('sku-price', { 'aria-label': 'Price (cents)', type: 'number', min: 0, value: price ?? '' })),
      h('td', null, input('sku-qty', { 'aria-label': 'Quantity', type: 'number', min: 0, value: qty ?? '' })),
      h('td', null, h('button', { type: 'button', class: 'link-button remove' }, 'Remove')));
    tr.querySelector('.remove').addEventListener('click', () => tr.remove());
    $('sku-rows').append(tr);
  }

  function addSection(section, price, rows) {
    const tr = h('tr', { class: 'section-row' },
      h('td', null, input('section-id', { 'aria-label': 'Section', value: section || '', size: 8 })),
      h('td', null, input('section-price', { 'aria-label': 'Price (cents)', type: 'number', min: 0, value: price ?? '' })),
      h('td', null, input('section-rows', { 'aria-label': 'Seats per row', value: rows || '' })),
      h('td', null, h('button', { type: 'button', class: 'link-button remove' }, 'Remove')));
    tr.querySelector('.remove').addEventListener('click', () => { tr.remove(); preview(); });
    tr.addEventListener('input', preview);
    $('section-rows').append(tr);
    preview();
  }

  /** "8, 8, 10" → [8, 8, 10]; anything that isn't a whole number is sent as is, for the API to refuse. */
  function seatCounts(text) {
    return String(text).split(',').map((s) => s.trim()).filter((s) => s !== '')
      .map((s) => (/^\d+$/.test(s) ? Number(s) : s));
  }

  function sections() {
    return [...document.querySelectorAll('#section-rows .section-row')].map((tr) => ({
      section: tr.querySelector('.section-id').value.trim(),
      price_cents: numberOr(tr.querySelector('.section-price').value),
      rows: seatCounts(tr.querySelector('.section-rows').value)
        .map((n, i) => ({ row: String(i + 1), seats: n })),
    }));
  }

  /** A number when the field holds one; else the text, so the API names the field it refuses. */
  function numberOr(v) {
    const t = String(v).trim();
    return t !== '' && Number.isFinite(Number(t)) ? Number(t) : t;
  }

  /** The live seat-map preview: sections → rows → seats, as the booking page will draw them. */
  function preview() {
    const secs = sections();
    let seats = 0;
    for (const s of secs) for (const r of s.rows) if (typeof r.seats === 'number') seats += r.seats;
    $('preview-summary').textContent =
      `${secs.length} section${secs.length === 1 ? '' : 's'}, ${seats} seat${seats === 1 ? '' : 's'}` +
      (seats > PREVIEW_MAX_SEATS ? ` (too many to draw; the first ${PREVIEW_MAX_SEATS} are shown)` : '');
    let drawn = 0;
    const parts = [h('p', { class: 'stage' }, 'Stage')];
    for (const s of secs) {
      const fs = h('fieldset', { class: 'seat-section' }, h('legend', null, `Section ${s.section || '?'}`));
      for (const r of s.rows) {
        const n = typeof r.seats === 'number' ? Math.min(r.seats, PREVIEW_MAX_SEATS - drawn) : 0;
        if (n <= 0) continue;
        drawn += n;
        const row = h('div', { class: 'seat-row' }, h('span', { class: 'row-label' }, `Row ${r.row}`));
        for (let i = 1; i <= n; i += 1) {
          row.append(h('span', { class: 'seat preview-seat', 'data-seat': `${s.section}-${r.row}-${i}` }, String(i)));
        }
        fs.append(row);
      }
      parts.push(fs);
    }
    $('seat-preview').replaceChildren(...parts);
  }

  function kindChanged() {
    const seated = radio('kind') === 'seated';
    $('ga-editor').hidden = seated;
    $('seated-editor').hidden = !seated;
  }
  function admissionChanged() {
    $('queue-settings').hidden = radio('admission') !== 'queue';
  }
  document.querySelectorAll('input[name="kind"]').forEach((el) => el.addEventListener('change', kindChanged));
  document.querySelectorAll('input[name="admission"]').forEach((el) => el.addEventListener('change', admissionChanged));
  $('add-sku').addEventListener('click', () => addSku());
  $('add-section').addEventListener('click', () => addSection());

  function createBody() {
    const body = {
      name: $('drop-name').value,
      currency: $('drop-currency').value.trim() || undefined,
      per_fan_limit: numberOr($('drop-limit').value),
      hold_ttl_s: numberOr($('drop-hold').value),
      admission: { mode: radio('admission') },
    };
    const opens = $('drop-opens').value;
    if (opens) {
      const ms = Date.parse(opens);
      body.opens_at = Number.isNaN(ms) ? opens : new Date(ms).toISOString();
    }
    if (body.admission.mode === 'queue') {
      body.admission.rate_per_s = numberOr($('q-rate').value);
      body.admission.burst = numberOr($('q-burst').value);
      body.admission.max_active = numberOr($('q-active').value);
      // The waiting list after a sell-out (fixed at creation) and how long each offer lasts.
      body.admission.waitlist = $('q-waitlist').checked;
      if (body.admission.waitlist) body.admission.offer_window_s = numberOr($('q-offer').value);
    }
    if (radio('kind') === 'seated') {
      body.inventory = { kind: 'seated', sections: sections() };
    } else {
      body.inventory = {
        kind: 'ga',
        skus: [...document.querySelectorAll('#sku-rows .sku-row')].map((tr) => ({
          sku: tr.querySelector('.sku-id').value.trim(),
          name: tr.querySelector('.sku-name').value,
          price_cents: numberOr(tr.querySelector('.sku-price').value),
          quantity: numberOr(tr.querySelector('.sku-qty').value),
        })),
      };
    }
    return body;
  }

  $('create-form').addEventListener('submit', async (ev) => {
    ev.preventDefault();
    show('create-error', '');
    show('create-ok', '');
    $('create-button').disabled = true;
    try {
      const d = await api('POST', '/v1/drops', createBody());
      show('create-ok', `Created “${d.name}” (${d.drop_id}).`);
      $('create-ok').setAttribute('data-drop-id', d.drop_id);
      $('status').textContent = `Drop ${d.drop_id} created.`;
      await loadDrops();
    } catch (e) {
      show('create-error', `The drop was not created: ${e.message}`);
    } finally {
      $('create-button').disabled = false;
    }
  });

  // ---- the drops list ---------------------------------------------------------------------
  // Each drop's row is made once and updated in place on every poll, so a number being typed
  // into an "add stock" field survives the refresh.

  /** A new request id for one add-stock attempt (crypto.randomUUID needs a secure context). */
  function requestId() {
    const b = crypto.getRandomValues(new Uint8Array(16));
    return `restock-${Array.from(b, (v) => v.toString(16).padStart(2, '0')).join('')}`;
  }

  /** What the drop took in: each SKU's or section's units sold × its price, summed. */
  function revenue(view) {
    return (view.inventory || []).reduce((sum, b) => sum + b.sold * b.price_cents, 0);
  }

  async function closeDrop(id, name) {
    if (!window.confirm(`Close “${name}”? Fans can no longer buy from it.`)) return;
    try {
      await api('POST', `/v1/drops/${encodeURIComponent(id)}/close`, {});
      $('status').textContent = `Drop ${id} closed.`;
      await loadDrops();
    } catch (e) {
      show('drops-error', `Couldn't close the drop: ${e.message}`);
    }
  }

  /**
   * Cancels a drop (POST …/cancel): it closes at once and a job refunds every order; the row
   * shows the job's progress (GET …/cancellation) until it is done. The request id is the drop's
   * own, so a retry is the same request — and the drop cancelled again is the same job anyway.
   */
  async function cancelDrop(id, name, row) {
    if (!window.confirm(`Cancel “${name}”? It closes, and every order is refunded.`)) return;
    const cell = row.querySelector('.cancel-state');
    const shown = (job) => {
      cell.textContent = job.state === 'done'
        ? `Cancelled: ${job.orders_refunded} of ${job.orders_total} orders refunded.`
        : `Cancelling: ${job.orders_refunded} of ${job.orders_total} orders refunded…`;
    };
    const path = `/v1/drops/${encodeURIComponent(id)}`;
    try {
      let job = await api('POST', `${path}/cancel`, { request_id: `cancel-${id}` });
      shown(job);
      $('status').textContent = `Drop ${id} cancelled; its orders are being refunded.`;
      await loadDrops();
      while (job.state !== 'done') {
        await new Promise((resolve) => setTimeout(resolve, 1000));
        job = await api('GET', `${path}/cancellation`);
        shown(job);
      }
      await loadDrops();
    } catch (e) {
      show('drops-error', `Couldn't cancel the drop: ${e.message}`);
    }
  }

  /**
   * The "add stock" form of one SKU. Its request id is kept while the answer is unknown (a
   * network error, a 5xx): sending the same amount again then retries that request, which the
   * API adds once; a new amount, an answer or a 4xx starts a new one.
   */
  function addStockForm(drop, sku) {
    const qty = input('add-stock-qty', {
      type: 'number', min: 1, step: 1, 'aria-label': `Units to add to ${sku}`, placeholder: 'units',
    });
    const button = h('button', { type: 'submit', class: 'add-stock-button' }, 'Add stock');
    const err = h('p', { class: 'error add-stock-error', role: 'alert' });
    err.hidden = true;
    const form = h('form', { class: 'add-stock', novalidate: true }, qty, button, err);
    let pending = null; // {id, add}
    form.addEventListener('submit', async (ev) => {
      ev.preventDefault();
      err.hidden = true;
      const add = numberOr(qty.value);
      // Only a change is confirmed: what the API will refuse (its message shows) changes nothing.
      const change = Number.isInteger(add) && add >= 1;
      if (change && !window.confirm(`Add ${add} to ${sku} of “${drop.name}”?`)) return;
      if (!pending || pending.add !== add) pending = { id: requestId(), add };
      button.disabled = true;
      try {
        const r = await api('POST',
          `/v1/drops/${encodeURIComponent(drop.drop_id)}/skus/${encodeURIComponent(sku)}/stock`,
          { add, request_id: pending.id });
        pending = null;
        qty.value = '';
        $('status').textContent =
          `Added ${r.added} to ${r.sku}: ${r.available} of ${r.total} available.`;
        await loadDrops();
      } catch (e) {
        if (e.status && e.status < 500) pending = null;
        err.textContent = `Stock was not added: ${e.message}`;
        err.hidden = false;
      } finally {
        button.disabled = false;
      }
    });
    return form;
  }

  /** One bucket's line in the counts cell: its counts, and for an open GA drop's SKU the form. */
  function bucketLine(drop, b) {
    const id = b.sku || b.section;
    const line = h('div', { class: 'bucket', 'data-bucket': id }, h('span', { class: 'bucket-counts' }));
    if (b.sku) line.append(addStockForm(drop, b.sku));
    return line;
  }

  function updateCounts(td, drop, view) {
    if (!view) { td.replaceChildren('—'); return; }
    const open = view.status === 'open';
    for (const b of view.inventory || []) {
      const id = b.sku || b.section;
      let line = [...td.querySelectorAll('.bucket')].find((el) => el.dataset.bucket === id);
      if (!line) { line = bucketLine(drop, b); td.append(line); }
      line.querySelector('.bucket-counts').textContent =
        `${b.sku || `Section ${b.section}`}: ${b.available} / ${b.held} / ${b.sold}`;
      const form = line.querySelector('.add-stock');
      if (form) form.hidden = !open;
    }
    for (const node of [...td.childNodes]) if (node.nodeType === Node.TEXT_NODE) node.remove();
  }

  const dropRows = new Map(); // drop id → its row, made once

  function dropRow(d) {
    let row = dropRows.get(d.drop_id);
    if (row) return row;
    const name = String(d.name || d.drop_id);
    const close = h('button', { type: 'button', class: 'close-drop' }, 'Close');
    close.addEventListener('click', () => closeDrop(d.drop_id, name));
    const cancel = h('button', { type: 'button', class: 'cancel-drop' }, 'Cancel drop');
    row = h('tr', { class: 'drop-row', 'data-drop-id': d.drop_id },
      h('td', null, h('a', { href: `/drops/${encodeURIComponent(d.drop_id)}` }, name),
        h('div', { class: 'hint' }, `${d.kind} · ${d.drop_id}`)),
      h('td', { class: 'state' }, h('span', { class: 'badge' })),
      h('td', null, fmtDateTime(d.opens_at)),
      h('td', { class: 'counts' }, '—'),
      h('td', { class: 'revenue' }, '—'),
      h('td', null, close, ' ', cancel, h('div', { class: 'cancel-state hint' })));
    cancel.addEventListener('click', () => cancelDrop(d.drop_id, name, row));
    dropRows.set(d.drop_id, row);
    return row;
  }

  function updateRow(row, d, view) {
    const state = String(view ? view.status : d.status);
    const badge = row.querySelector('.state .badge');
    badge.textContent = state;
    badge.className = `badge ${state === 'open' ? 'open' : 'closed'}`;
    row.querySelector('.close-drop').disabled = state === 'closed';
    updateCounts(row.querySelector('.counts'), { drop_id: d.drop_id, name: String(d.name || d.drop_id) }, view);
    row.querySelector('.revenue').textContent = view ? fmtMoney(revenue(view), d.currency) : '—';
  }

  let loading = false;
  async function loadDrops() {
    if (loading || !key()) return;
    loading = true;
    try {
      const list = await api('GET', '/v1/drops');
      const drops = list.drops || [];
      const views = await Promise.all(drops.slice(0, LIVE_DROPS).map((d) =>
        api('GET', `/v1/drops/${encodeURIComponent(d.drop_id)}`).catch(() => null)));
      const rows = drops.map((d, i) => {
        const row = dropRow(d);
        updateRow(row, d, views[i]);
        return row;
      });
      // Moving a row would take the focus from a field being typed in: only when the list changed.
      const shown = [...$('drops').children];
      if (shown.length !== rows.length || shown.some((r, i) => r !== rows[i])) {
        $('drops').replaceChildren(...rows);
      }
      $('drops-empty').hidden = rows.length > 0;
      show('drops-error', '');
      const sel = $('orders-drop');
      const chosen = sel.value;
      sel.replaceChildren(...drops.map((d) => h('option', { value: d.drop_id }, `${d.name} (${d.drop_id})`)));
      if (chosen && drops.some((d) => d.drop_id === chosen)) sel.value = chosen;
    } catch (e) {
      if (key()) show('drops-error', `Couldn't load your drops: ${e.message}. Retrying shortly.`);
    } finally {
      loading = false;
    }
  }

  // ---- orders -----------------------------------------------------------------------------

  function ordersQuery(extra) {
    const q = new URLSearchParams();
    const fan = $('orders-fan').value.trim();
    const id = $('orders-id').value.trim();
    if (fan) q.set('fan', fan);
    if (id) q.set('order_id', id);
    for (const [k, v] of Object.entries(extra || {})) q.set(k, v);
    const s = q.toString();
    return s ? `?${s}` : '';
  }

  function itemText(i) {
    if (i.seat) return `${i.section ? `${i.section} ` : ''}${i.seat}`;
    return `${i.sku || i.section} × ${i.quantity}`;
  }

  // ---- refunds ----------------------------------------------------------------------------

  /** What a refund's state means, in the seller's words (docs/API.md, the refund's `state`). */
  const REFUND_STATES = {
    pending: 'Refund recorded; the payment is being returned',
    gateway_done: 'Paid back; the units are on their way back',
    returned: 'Refunded; the units are back on sale',
    closed: 'Refunded (the drop is closed)',
  };

  /**
   * An order row's refund cell: a button that refunds the whole order, after a confirmation.
   * Its refund id is kept while the answer is unknown (a network error, a 5xx), so a second
   * click retries that refund, which the API makes once; an answer or a 4xx ends it.
   */
  function refundCell(order) {
    const button = h('button', { type: 'button', class: 'refund-button' }, 'Refund');
    const said = h('span', { class: 'refund-state', role: 'status' });
    let pending = null;
    button.addEventListener('click', async () => {
      if (!window.confirm(`Refund order ${order.order_id} in full?`)) return;
      if (!pending) {
        const b = crypto.getRandomValues(new Uint8Array(16));
        pending = `refund-${Array.from(b, (v) => v.toString(16).padStart(2, '0')).join('')}`;
      }
      button.disabled = true;
      try {
        const r = await api('POST', `/v1/orders/${encodeURIComponent(order.order_id)}/refunds`,
          { refund_id: pending });
        pending = null;
        said.textContent = REFUND_STATES[r.state] || String(r.state);
        button.hidden = true;
        loadDrops();
      } catch (e) {
        if (e.status && e.status < 500) pending = null;
        said.textContent = `Couldn't refund: ${e.message}`;
        button.disabled = false;
      }
    });
    return h('td', { class: 'refund' }, button, said);
  }

  let nextCursor = null;
  async function loadOrders(more) {
    const drop = $('orders-drop').value;
    if (!drop) return;
    show('orders-error', '');
    try {
      const page = await api('GET', `/v1/drops/${encodeURIComponent(drop)}/orders${ordersQuery(more && nextCursor ? { cursor: nextCursor } : {})}`);
      const rows = (page.orders || []).map((o) => h('tr', { class: 'order-row', 'data-order-id': o.order_id },
        h('td', { class: 'mono' }, String(o.order_id)),
        h('td', null, fmtDateTime(o.created_at)),
        h('td', { class: 'fan' }, String(o.fan)),
        h('td', null, (o.items || []).map(itemText).join(', ')),
        h('td', null, fmtMoney(o.total_cents, o.currency)),
        h('td', { class: 'payment' }, String(o.payment_state ?? '—')),
        refundCell(o)));
      if (more) $('orders').append(...rows); else $('orders').replaceChildren(...rows);
      nextCursor = page.next_cursor;
      $('orders-more').hidden = !nextCursor;
      $('orders-empty').hidden = $('orders').children.length > 0;
    } catch (e) {
      show('orders-error', `Couldn't load the orders: ${e.message}`);
    }
  }

  $('orders-form').addEventListener('submit', (ev) => { ev.preventDefault(); loadOrders(false); });
  $('orders-more').addEventListener('click', () => loadOrders(true));

  /** Fetches the CSV with the key (a plain link can't send it) and saves it as a file. */
  $('csv-button').addEventListener('click', async () => {
    const drop = $('orders-drop').value;
    if (!drop) return;
    show('orders-error', '');
    try {
      const r = await fetch(`/v1/drops/${encodeURIComponent(drop)}/orders.csv${ordersQuery()}`, {
        headers: { Authorization: `Bearer ${key()}` },
      });
      if (!r.ok) {
        const data = await r.json().catch(() => null);
        throw new Error((data && data.error && data.error.message) || `the server answered ${r.status}`);
      }
      const blob = await r.blob();
      const link = $('csv-link');
      const old = link.getAttribute('href');
      if (old) URL.revokeObjectURL(old);
      link.setAttribute('href', URL.createObjectURL(blob));
      // The page's CSP (connect-src 'self') keeps anything from fetching the blob: URL back;
      // the Blob stays on the link so a test can read what was downloaded.
      link.csvBlob = blob;
      link.setAttribute('download', `orders-${drop}.csv`);
      link.click();
      $('status').textContent = 'The CSV was downloaded.';
    } catch (e) {
      show('orders-error', `Couldn't download the CSV: ${e.message}`);
    }
  });

  addSku('TEE', 'Tee', 2500, 100);
  addSection('A', 5000, '8, 8, 10');
  kindChanged();
  admissionChanged();
  signedIn();
  setInterval(() => { if (!document.hidden && key()) loadDrops(); }, POLL_MS);
})();
