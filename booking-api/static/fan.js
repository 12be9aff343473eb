/*
 * fan.js — what the booking page (booking-api) and the queue page (queue-server) share about a
 * fan, served by both at /static/fan.js and loaded before each page's own script.
 *
 * Identity never comes from a link without the fan's say-so (login CSRF: a link someone else made
 * must not sign this browser in as them). The waiting room hands its admitted fan to the shop
 * through storage, not a URL: queue-server serves the shop (/drops/{id}/shop) from its own origin,
 * so the queue page writes the fan and the admission token where the shop page reads them
 * (docs/ARCHITECTURE.md, Choices: the hand-off from the line to the shop). A fan token that does
 * come in a link (#fan_token=…, from a site with its own identity provider) is only taken after
 * the fan says yes to "Continue as …?" (askSwitch).
 */
(function () {
  'use strict';

  /** Where a page of this origin keeps the signed-in fan and a drop's admission token. */
  const keys = Object.freeze({
    fanToken: 'floodgate.fan_token',
    fanName: 'floodgate.fan_name',
    admission: (dropId) => `floodgate.admission_token.${dropId}`,
  });

  /** The `sub` claim of a fan token (a JWT), unverified: for display only, the server verifies. */
  function tokenSubject(token) {
    try {
      const b64 = token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
      const sub = JSON.parse(atob(b64 + '='.repeat((4 - b64.length % 4) % 4))).sub;
      return typeof sub === 'string' ? sub : null;
    } catch (_) {
      return null;
    }
  }

  /**
   * The fan token a link carries in its fragment (#fan_token=…), taken out of the address bar at
   * once (history, bookmarks, a shared screen). Null when there is none. Nothing is stored.
   */
  function takeLinkToken() {
    const hand = new URLSearchParams(location.hash.slice(1));
    if (!hand.has('fan_token')) return null;
    history.replaceState(null, '', location.pathname + location.search);
    return hand.get('fan_token') || null;
  }

  function el(tag, attrs, text) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (text) e.textContent = text;
    return e;
  }

  /**
   * Asks the fan whether a link may switch who they are here: a card (#switch) at the top of
   * <main>, "Continue as <next>" (#switch-accept) or stay as they are (#switch-decline). Resolves
   * true or false; the caller stores nothing before it resolves. Names are shown as text, never
   * as HTML. `current` is the fan signed in now (null: nobody).
   */
  function askSwitch(next, current) {
    return new Promise((resolve) => {
      const box = el('section', {
        id: 'switch', class: 'card', role: 'alertdialog',
        'aria-labelledby': 'switch-title', 'aria-describedby': 'switch-text',
      });
      const title = el('h2', { id: 'switch-title', tabindex: '-1' }, `Continue as ${next}?`);
      const why = current
        ? `A link asks to sign this browser in as ${next}. You are signed in as ${current}.`
        : `A link asks to sign this browser in as ${next}.`;
      const text = el('p', { id: 'switch-text' },
        `${why} Only continue if you opened this link yourself, from a site you trust.`);
      const yes = el('button', { id: 'switch-accept', type: 'button', class: 'primary' },
        `Continue as ${next}`);
      const no = el('button', { id: 'switch-decline', type: 'button', class: 'secondary' },
        current ? `Stay signed in as ${current}` : 'Don\'t sign in');
      const row = el('p', { class: 'inline-form' });
      row.append(yes, no);
      box.append(title, text, row);
      const main = document.getElementById('main') || document.body;
      main.prepend(box);
      title.focus();
      const answer = (v) => {
        box.hidden = true;
        box.remove();
        resolve(v);
      };
      yes.addEventListener('click', () => answer(true));
      no.addEventListener('click', () => answer(false));
    });
  }

  window.FloodgateFan = Object.freeze({ keys, tokenSubject, takeLinkToken, askSwitch });
})();
