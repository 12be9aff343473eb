/*
 * fan.js — what the booking page (booking-api) and the queue page (queue-server) share about a
 * fan, served by both at /static/fan.js and loaded before each page's own script.
 */
(function () {
  'use strict';

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

  window.FloodgateFan = Object.freeze({ tokenSubject });
})();
