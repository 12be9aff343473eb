//! Bounded waits. Tests never assert a time (docs/ARCHITECTURE.md, Choices: tests never assert a
//! time): where a behaviour has a time target, they poll with a generous deadline and fail with
//! what they were waiting for.

use std::future::Future;
use std::time::{Duration, Instant};

/// The deadline of [`eventually`]: generous, since two cores run the whole suite.
pub const EVENTUALLY: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(100);

/// Polls `f` until it holds; panics with `what` after [`EVENTUALLY`].
pub async fn eventually<F, Fut>(what: &str, f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    eventually_within(EVENTUALLY, what, f).await
}

/// Polls `f` until it holds; panics with `what` after `deadline`.
pub async fn eventually_within<F, Fut>(deadline: Duration, what: &str, f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    if !wait_until(deadline, f).await {
        panic!("never happened within {deadline:?}: {what}");
    }
}

/// Polls `f` until it holds (true) or `deadline` passes (false), for a caller that says more
/// than [`eventually_within`] can when it fails.
pub async fn wait_until<F, Fut>(deadline: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let until = Instant::now() + deadline;
    while Instant::now() < until {
        if f().await {
            return true;
        }
        tokio::time::sleep(POLL).await;
    }
    false
}
