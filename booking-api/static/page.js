/*
 * page.js — what booking-api's own pages share, served at /static/page.js and loaded before each
 * page's script: the front page (front.js) takes the DOM helpers; the two pages signed in with a
 * key — the seller's back office (seller.js) and the ops console (ops.js) — take the key's
 * session too. Plain JS, no build step; it defines window.FloodgatePage and nothing else.
 *
 * `h()` is how every API value reaches these pages: as text (textContent through append,
 * setAttribute), never parsed as HTML — a drop named "<b>…" shows those characters
 * (docs/ARCHITECTURE.md's invariant on the pages). The fan's booking page keeps its own `h()` in
 * book.js: queue-server serves that page too (as the shop of its drops), and its `h()` writes a
 * `true` attribute as "".
 *
 * keyedSession() is the sign-in of a keyed page. The key lives in this tab's sessionStorage only
 * (never localStorage, never a URL: closing the tab signs out) and goes with every API call as
 * `Authorization: Bearer`; an answer of 401 signs the page out, saying why. The page gives an
 * empty `<section id="signin">` naming its key (data-key-label, data-key-input) and this builds
 * the card in it, the same on both pages; the page keeps `#whoami` with its `#signout` button, and
 * the part shown once signed in. Their look beyond book.css is shared the same way: page.css.
 */
(function () {
  'use strict';

  const $ = (id) => document.getElementById(id);

  /** Creates an element: h('p', {class: 'x'}, 'text', child). Text is never HTML. */
  function h(tag, attrs, ...kids) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === 'class') el.className = v;
      else el.setAttribute(k, String(v));
    }
    for (const kid of kids.flat()) {
      if (kid !== null && kid !== undefined && kid !== false) el.append(kid);
    }
    return el;
  }

  /** Shows `text` in the element with this id, or hides it when there is none. */
  function show(id, text) {
    const el = $(id);
    el.textContent = text || '';
    el.hidden = !text;
  }

  /** The sign-in card, inside the page's `<section id="signin">`. */
  function signInCard(section) {
    const label = section.dataset.keyLabel;
    const input = section.dataset.keyInput;
    const error = h('p', { id: 'signin-error', class: 'error' });
    error.hidden = true;
    section.replaceChildren(
      h('h1', { id: 'signin-title' }, 'Sign in'),
      h('form', { id: 'signin-form', class: 'inline-form' },
        h('div', { class: 'field' },
          h('label', { for: input }, label),
          h('input', {
            id: input, name: 'key', type: 'password', autocomplete: 'off', required: '',
            placeholder: 'fgk_…',
          })),
        h('button', { type: 'submit' }, 'Sign in')),
      h('p', { class: 'hint' },
        'The key stays in this tab only (session storage): closing the tab signs you out.'),
      error);
    return input;
  }

  /**
   * A page signed in with a key kept in sessionStorage under `storageKey`. `signedInPart` is the
   * id of what the page shows once signed in; `onSignIn` runs whenever the page is (or is found)
   * signed in, `onSignOut` (if any) when it signs out, before the sign-in card shows again. The
   * page calls signedIn() once its own set-up is done.
   * Returns {key, api, signOut, signedIn}.
   */
  function keyedSession({ storageKey, signedInPart, onSignIn, onSignOut }) {
    const key = () => sessionStorage.getItem(storageKey) || '';
    const input = signInCard($('signin'));

    function signedIn() {
      const on = key() !== '';
      $('signin').hidden = on;
      $(signedInPart).hidden = !on;
      $('whoami').hidden = !on;
      if (on) onSignIn();
    }

    function signOut(why) {
      sessionStorage.removeItem(storageKey);
      show('signin-error', why || '');
      if (onSignOut) onSignOut();
      signedIn();
    }

    /**
     * An API call with the key: the parsed body, or throws an Error with the API's message and
     * the answer's `status`.
     */
    async function api(method, path, body) {
      const headers = { Accept: 'application/json', Authorization: `Bearer ${key()}` };
      if (body !== undefined) headers['Content-Type'] = 'application/json';
      const r = await fetch(path, {
        method, headers, body: body === undefined ? undefined : JSON.stringify(body),
      });
      const data = await r.json().catch(() => null);
      if (!r.ok) {
        if (r.status === 401) signOut('That key was not accepted; sign in again.');
        const msg = data && data.error && data.error.message;
        const err = new Error(msg || `the server answered ${r.status}`);
        err.status = r.status;
        throw err;
      }
      return data;
    }

    $('signin-form').addEventListener('submit', (ev) => {
      ev.preventDefault();
      const k = $(input).value.trim();
      if (!k) return;
      sessionStorage.setItem(storageKey, k);
      $(input).value = '';
      show('signin-error', '');
      signedIn();
    });
    $('signout').addEventListener('click', () => signOut(''));

    return { key, api, signOut, signedIn };
  }

  window.FloodgatePage = Object.freeze({ $, h, show, keyedSession });
})();
