//! testkit: what Floodgate's test suites share, so each crate's `tests/common` keeps only its own
//! server harness. A dev-dependency only; it depends on the engine and never on a server crate.
//!
//! # Layout
//! - [`config`] — the test deployment's [`engine::Config`] against the stack `./dev test` started.
//! - [`wait`] — [`eventually`]: bounded polling instead of timed assertions.
//! - [`answer`] — an HTTP answer as (status, JSON body).
//! - [`booking`] — [`BookingClient`]: the one client of booking-api's HTTP API every suite uses,
//!   and its [`Reply`].
//! - [`browser`] — headless Chromium through ChromeDriver: one browser at a time, a [`Page`] with
//!   bounded waits, screenshots under `target/browser-artifacts/`.

pub mod booking;
pub mod browser;
pub mod config;
pub mod wait;

pub use booking::{new_key, seat_states, BookingClient, Reply};
pub use browser::{open_browser, Page, DESKTOP, ONE_BROWSER, PHONE};
pub use config::{test_config, test_config_for, ADMISSION_SECRET};
pub use wait::{eventually, eventually_within, wait_until};

/// An HTTP answer as tests compare it: the status, and the JSON body (`null` when there is none
/// or it isn't JSON).
pub async fn answer(r: reqwest::Response) -> (u16, serde_json::Value) {
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(serde_json::Value::Null))
}
