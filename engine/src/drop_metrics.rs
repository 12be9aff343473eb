//! Per-drop gauges for Prometheus, read from Redis so that they describe the whole sale, not the
//! instance that is scraped: fans in line, joins and admissions ever, the admission settings,
//! active shoppers, units available / held / sold, confirming holds (and those past their
//! deadline), whether the drop is recovering, and the line's state.
//!
//! One task per process ([`Engine::spawn_drop_metrics`]) reads them every
//! `http.drop_metrics_interval_ms` for at most `http.drop_metrics_max_drops` live drops (open, or
//! closed in the last hour: Postgres' `live_drops`, newest first), a fixed handful of Redis reads
//! per drop: HMGET, ZCARD and GET are O(1), ZCOUNT of the active set and of the overdue confirms
//! O(log n), and the stock hash's HGETALL as long as the drop's buckets (SKUs or sections), never
//! its seats or holds. A
//! scrape costs nothing: `/metrics` appends the last round's text
//! ([`Engine::drop_gauges_text`]). A drop that is no longer live drops out of the text at the
//! next round, so the `drop` label's cardinality stays bounded by the setting.
//!
//! Every instance reports the same figures for the same drop: aggregate them with `max by
//! (drop)`, never `sum` (docs/OPERATIONS.md, "Monitoring").

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use fred::interfaces::{HashesInterface, KeysInterface, SortedSetsInterface};
use tokio::sync::watch;

use crate::booking::Engine;
use crate::error::Result;
use crate::ids::DropId;
use crate::keys::{drop_key, QueueKeys};
use crate::metrics;

/// One drop's figures, as Redis has them at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DropFigures {
    pub drop: String,
    pub line_fans: i64,
    /// The join counter (lua/join.lua's `seq`): joins after opening, ever. `rate()` of it is
    /// joins per second.
    pub joins: i64,
    /// Admissions ever (the watermark's `admitted`); `rate()` of it is admitted per second.
    pub admitted: i64,
    pub rate_per_s: f64,
    pub max_active: i64,
    pub active_shoppers: i64,
    pub available_units: i64,
    pub held_units: i64,
    pub sold_units: i64,
    pub confirming_holds: i64,
    /// Of those, the ones past their confirm deadline (by this process's clock): what the
    /// reconciler has yet to settle.
    pub confirming_overdue_holds: i64,
    pub paused: bool,
    pub recovering: bool,
    /// The line's state as lua/admit.lua would say it now (`open`, `paused`, `pre_queue`,
    /// `all_held`, `sold_out`, `closed`, `recovering`); for a drop without a line, the drop's
    /// status (`open` or `closed`) or `recovering`.
    pub state: &'static str,
}

fn int(v: Option<String>) -> i64 {
    v.and_then(|s| s.parse::<f64>().ok())
        .map_or(0, |f| f as i64)
}

impl Engine {
    /// The last round's per-drop gauges as Prometheus text (empty before the first round, or in a
    /// process that runs no round): what `/metrics` appends to the process's own metrics.
    pub fn drop_gauges_text(&self) -> String {
        self.drop_gauges
            .lock()
            .map(|t| t.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    fn set_drop_gauges(&self, text: String) {
        *self.drop_gauges.lock().unwrap_or_else(|p| p.into_inner()) = text;
    }

    /// Reads one drop's figures: `None` when Redis has no state for it (not loaded, or gone).
    pub async fn drop_figures(&self, drop: &DropId) -> Result<Option<DropFigures>> {
        let client = self.redis.client();
        let q = QueueKeys::new(drop);
        let meta: Vec<Option<String>> = client
            .hmget(&q.meta, vec!["status", "recovering", "opens_at_ms", "mode"])
            .await?;
        let mut meta = meta.into_iter();
        let (status, recovering, opens_at_ms, mode) = (
            meta.next().flatten(),
            meta.next().flatten(),
            meta.next().flatten(),
            meta.next().flatten(),
        );
        let Some(status) = status else {
            return Ok(None);
        };
        let stock: HashMap<String, String> = client.hgetall(&q.stock).await?;
        let admission: Vec<Option<String>> = client
            .hmget(
                &q.admission,
                vec!["rate_per_s", "max_active", "paused", "line_state"],
            )
            .await?;
        let mut admission = admission.into_iter();
        let (rate, max_active, paused, line_state) = (
            admission.next().flatten(),
            admission.next().flatten(),
            admission.next().flatten(),
            admission.next().flatten(),
        );
        let line_fans: i64 = client.zcard(&q.line).await?;
        let now_ms = time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000;
        // Sessions whose deadline hasn't passed (admission drops the rest on its next run):
        // O(log n), by this process's clock, which is near enough Redis' for a gauge.
        let active_shoppers: i64 = client
            .zcount(&q.active, now_ms as f64, f64::INFINITY)
            .await?;
        let confirming_holds: i64 = client.zcard(drop_key(drop, "confirming")).await?;
        // Scored by confirm deadline: O(log n) like the active shoppers' count.
        let confirming_overdue_holds: i64 = client
            .zcount(
                drop_key(drop, "confirming"),
                f64::NEG_INFINITY,
                now_ms as f64,
            )
            .await?;
        let joins: Option<String> = client.get(&q.seq).await?;
        let admitted: Option<String> = client.hget(&q.watermark, "admitted").await?;

        let sum = |prefix: &str| -> i64 {
            stock
                .iter()
                .filter(|(k, _)| k.starts_with(prefix))
                .map(|(_, v)| v.parse::<i64>().unwrap_or(0))
                .sum()
        };
        let (available_units, held_units, sold_units) = (sum("a:"), sum("h:"), sum("s:"));
        let recovering = recovering.as_deref() == Some("1");
        let paused = paused.as_deref() == Some("1");
        let queue = mode.as_deref() == Some("queue") || rate.is_some();
        // lua/admit.lua's order: recovering, closed, sold out (the line closed for good), paused,
        // the waiting list, before opening, all held, open.
        let state = if recovering {
            "recovering"
        } else if status == "closed" {
            "closed"
        } else if !queue {
            "open"
        } else if line_state.as_deref() == Some("sold_out") {
            "sold_out"
        } else if paused {
            "paused"
        } else if line_state.as_deref() == Some("waitlist") {
            // Sold out with the waiting list on: the line stays, offering what comes back.
            "waitlist"
        } else if now_ms < i128::from(int(opens_at_ms)) {
            "pre_queue"
        } else if available_units == 0 {
            "all_held"
        } else {
            "open"
        };
        Ok(Some(DropFigures {
            drop: drop.to_string(),
            line_fans,
            joins: int(joins),
            admitted: int(admitted),
            rate_per_s: rate.as_deref().and_then(|r| r.parse().ok()).unwrap_or(0.0),
            max_active: int(max_active),
            active_shoppers,
            available_units,
            held_units,
            sold_units,
            confirming_holds,
            confirming_overdue_holds,
            paused,
            recovering,
            state,
        }))
    }

    /// One round: the live drops' figures, rendered into the text `/metrics` appends. A drop whose
    /// read fails is left out of this round (and logged); the round never fails as a whole.
    pub async fn drop_metrics_round(&self) {
        let max = self.cfg().http.drop_metrics_max_drops;
        if max == 0 {
            self.set_drop_gauges(String::new());
            return;
        }
        let drops = match self.db.live_drops(max as i64).await {
            Ok(d) => d,
            Err(e) => {
                tracing::debug!(error = %e, "drop metrics: could not list the live drops");
                return;
            }
        };
        let mut figures = Vec::with_capacity(drops.len());
        for drop in &drops {
            match self.drop_figures(drop).await {
                Ok(Some(f)) => figures.push(f),
                Ok(None) => {}
                Err(e) => tracing::debug!(%drop, error = %e, "drop metrics: read failed"),
            }
        }
        self.set_drop_gauges(render(&figures));
    }

    /// Starts the per-drop gauges' round (every `http.drop_metrics_interval_ms`); it stops when
    /// `shutdown` turns true.
    pub fn spawn_drop_metrics(
        self: &Arc<Self>,
        mut shutdown: watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        let e = self.clone();
        let period = Duration::from_millis(self.cfg().http.drop_metrics_interval_ms.max(1));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => e.drop_metrics_round().await,
                    _ = shutdown.changed() => return,
                }
                if *shutdown.borrow() {
                    return;
                }
            }
        })
    }
}

/// Every per-drop metric this module exports, with its type and help: [`render`] writes exactly
/// these, and the docs/ops test checks dashboards and alerts against them.
pub const EXPORTED: [(&str, &str, &str); 15] = [
    (
        metrics::DROP_LINE_FANS,
        "gauge",
        "Fans waiting in the drop's line.",
    ),
    (
        metrics::DROP_JOINS,
        "counter",
        "Joins of the drop's line after opening, ever.",
    ),
    (
        metrics::DROP_ADMITTED,
        "counter",
        "Fans admitted from the drop's line, ever.",
    ),
    (
        metrics::DROP_ADMISSION_RATE,
        "gauge",
        "The admission rate set for the drop (fans per second).",
    ),
    (
        metrics::DROP_MAX_ACTIVE,
        "gauge",
        "The drop's max_active setting.",
    ),
    (
        metrics::DROP_ACTIVE_SHOPPERS,
        "gauge",
        "Admitted fans whose session has not ended.",
    ),
    (
        metrics::DROP_AVAILABLE_UNITS,
        "gauge",
        "Units (or seats) available.",
    ),
    (
        metrics::DROP_HELD_UNITS,
        "gauge",
        "Units (or seats) held, confirming included.",
    ),
    (metrics::DROP_SOLD_UNITS, "gauge", "Units (or seats) sold."),
    (
        metrics::DROP_CONFIRMING_HOLDS,
        "gauge",
        "Holds between confirm begin and finish.",
    ),
    (
        metrics::DROP_CONFIRMING_OVERDUE_HOLDS,
        "gauge",
        "Holds still confirming past their confirm deadline (the reconciler settles them).",
    ),
    (
        metrics::DROP_ADMISSION_PAUSED,
        "gauge",
        "1 while the drop's admission is paused.",
    ),
    (
        metrics::DROP_RECOVERING,
        "gauge",
        "1 while the drop is being rebuilt or loaded.",
    ),
    (
        metrics::DROP_LINE_STATE,
        "gauge",
        "1 for the line's current state (label state).",
    ),
    (
        metrics::DROP_METRICS_DROPS,
        "gauge",
        "Drops this process reports figures for.",
    ),
];

/// Prometheus text for `figures`: a `# HELP` and `# TYPE` per metric, a sample per drop.
pub fn render(figures: &[DropFigures]) -> String {
    let mut out = String::new();
    for (name, kind, help) in EXPORTED {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        if name == metrics::DROP_METRICS_DROPS {
            let _ = writeln!(out, "{name} {}", figures.len());
            continue;
        }
        for f in figures {
            let d = &f.drop;
            let value = match name {
                metrics::DROP_LINE_FANS => f.line_fans,
                metrics::DROP_JOINS => f.joins,
                metrics::DROP_ADMITTED => f.admitted,
                metrics::DROP_ADMISSION_RATE => {
                    let _ = writeln!(out, "{name}{{drop=\"{d}\"}} {}", f.rate_per_s);
                    continue;
                }
                metrics::DROP_MAX_ACTIVE => f.max_active,
                metrics::DROP_ACTIVE_SHOPPERS => f.active_shoppers,
                metrics::DROP_AVAILABLE_UNITS => f.available_units,
                metrics::DROP_HELD_UNITS => f.held_units,
                metrics::DROP_SOLD_UNITS => f.sold_units,
                metrics::DROP_CONFIRMING_HOLDS => f.confirming_holds,
                metrics::DROP_CONFIRMING_OVERDUE_HOLDS => f.confirming_overdue_holds,
                metrics::DROP_ADMISSION_PAUSED => i64::from(f.paused),
                metrics::DROP_RECOVERING => i64::from(f.recovering),
                metrics::DROP_LINE_STATE => {
                    let _ = writeln!(out, "{name}{{drop=\"{d}\",state=\"{}\"}} 1", f.state);
                    continue;
                }
                _ => continue,
            };
            // Drop ids parse as a safe alphabet (ids::DropId): nothing to escape in the label.
            let _ = writeln!(out, "{name}{{drop=\"{d}\"}} {value}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_metric_once_with_a_drop_label() {
        let f = DropFigures {
            drop: "d1".into(),
            line_fans: 3,
            state: "paused",
            paused: true,
            ..DropFigures::default()
        };
        let text = render(&[f]);
        for (name, kind, _) in EXPORTED {
            assert!(text.contains(&format!("# TYPE {name} {kind}\n")), "{name}");
        }
        assert!(text.contains("floodgate_drop_line_fans{drop=\"d1\"} 3\n"));
        assert!(text.contains("floodgate_drop_admission_paused{drop=\"d1\"} 1\n"));
        assert!(text.contains("floodgate_drop_line_state{drop=\"d1\",state=\"paused\"} 1\n"));
        assert!(text.contains("floodgate_drop_metrics_drops 1\n"));
    }
}
