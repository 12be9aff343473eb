//! Metric names, `floodgate_<thing>_<unit>`, one place so Rust, dashboards and docs agree.

pub const HTTP_REQUESTS: &str = "floodgate_http_requests_total";
pub const HTTP_REQUEST_SECONDS: &str = "floodgate_http_request_seconds";
pub const REJECTED: &str = "floodgate_rejected_requests_total";
pub const RESERVE_SECONDS: &str = "floodgate_reserve_seconds";
pub const CONFIRM_SECONDS: &str = "floodgate_confirm_seconds";
/// One step of a confirm, labelled `step`: `begin` (Redis' confirm begin and clock), `payment_row`
/// (the attempt recorded in Postgres), `authorize`, `order_commit` (through the order writer),
/// `capture` (the gateway and its record), `finish` (Redis' confirm finish).
pub const CONFIRM_STEP_SECONDS: &str = "floodgate_confirm_step_seconds";
pub const HOLDS_CREATED: &str = "floodgate_holds_created_total";
pub const HOLDS_RELEASED: &str = "floodgate_holds_released_total";
pub const HOLDS_EXPIRED: &str = "floodgate_holds_expired_total";
pub const HOLDS_CONFIRMED: &str = "floodgate_holds_confirmed_total";
pub const SOLD_UNITS: &str = "floodgate_sold_units_total";
pub const CONFIRMING_BACKLOG: &str = "floodgate_confirming_backlog_holds";
pub const RECONCILED: &str = "floodgate_reconciled_holds_total";
pub const RECOVERIES: &str = "floodgate_recoveries_total";
pub const WRITER_BATCH_ORDERS: &str = "floodgate_writer_batch_orders";
pub const WRITER_REJECTED: &str = "floodgate_writer_rejected_total";
pub const WRITER_RETRIES: &str = "floodgate_writer_retries_total";
/// Batches whose set-based order statements Postgres refused, written again an order at a time.
pub const WRITER_FALLBACKS: &str = "floodgate_writer_fallbacks_total";
pub const CONSTRAINT_REFUSALS: &str = "floodgate_constraint_refusals_total";
pub const OVERSELL_ALARMS: &str = "floodgate_oversell_alarms_total";
/// Refunds recorded (step 1: a new refund id; the same id again isn't counted).
pub const REFUNDS_ACCEPTED: &str = "floodgate_refunds_accepted_total";
/// Refunds finished, labelled `state`: `returned` (units back on sale) or `closed` (a closed or
/// archived drop's). Counted by the process whose write finished it, so once per refund.
pub const REFUNDS_COMPLETED: &str = "floodgate_refunds_completed_total";
/// Step 2 (the money back) left for the next round: the gateway refused or didn't answer, or a
/// capture or void it needs first hasn't settled.
pub const REFUND_GATEWAY_FAILURES: &str = "floodgate_refund_gateway_failures_total";
/// Refunds the resume round took up (left unfinished by their request or an earlier round).
pub const REFUNDS_RESUMED: &str = "floodgate_refunds_resumed_total";
/// Step 3 found that Redis hasn't the sale the refund returns (lua/refund.lua `out_of_step`: its
/// counts disagree with Postgres', or the order's hold ended there unsold): the drop is rebuilt
/// from Postgres, which counts the refund as returned. Should stay near zero.
pub const REFUNDS_OUT_OF_STEP: &str = "floodgate_refunds_out_of_step_total";
pub const HTTP_CONNECTIONS: &str = "floodgate_http_connections";
pub const QUEUE_WAITERS: &str = "floodgate_queue_waiters";
pub const QUEUE_JOINS: &str = "floodgate_queue_joins_total";
pub const QUEUE_ADMISSIONS: &str = "floodgate_queue_admissions_total";
pub const QUEUE_LEFT: &str = "floodgate_queue_left_total";
/// Runs of lua/admit.lua by this process: with many instances, one drop's runs happen on the
/// instance holding its admission lease.
pub const QUEUE_ADMISSION_RUNS: &str = "floodgate_queue_admission_runs_total";
/// Admitted fans told by the per-tick catch-up, not the admission feed (a lost push).
pub const QUEUE_CATCH_UPS: &str = "floodgate_queue_catch_ups_total";
pub const QUEUE_WS_CONNECTIONS: &str = "floodgate_queue_ws_connections";
pub const QUEUE_MESSAGES_SENT: &str = "floodgate_queue_messages_sent_total";
pub const QUEUE_SLOW_CLIENTS_DROPPED: &str = "floodgate_queue_slow_clients_dropped_total";
pub const QUEUE_TICK_SECONDS: &str = "floodgate_queue_tick_seconds";

// Per-drop figures read from Redis (engine::drop_metrics), labelled `drop` (and `state` for the
// line's state): every instance reports the same values, so aggregate them with `max by (drop)`.
pub const DROP_LINE_FANS: &str = "floodgate_drop_line_fans";
pub const DROP_JOINS: &str = "floodgate_drop_joins_total";
pub const DROP_ADMITTED: &str = "floodgate_drop_admitted_total";
pub const DROP_ADMISSION_RATE: &str = "floodgate_drop_admission_rate_per_second";
pub const DROP_MAX_ACTIVE: &str = "floodgate_drop_max_active_fans";
pub const DROP_ACTIVE_SHOPPERS: &str = "floodgate_drop_active_fans";
pub const DROP_AVAILABLE_UNITS: &str = "floodgate_drop_available_units";
pub const DROP_HELD_UNITS: &str = "floodgate_drop_held_units";
pub const DROP_SOLD_UNITS: &str = "floodgate_drop_sold_units";
pub const DROP_CONFIRMING_HOLDS: &str = "floodgate_drop_confirming_holds";
/// Holds still confirming past their confirm deadline (what the reconciler settles).
pub const DROP_CONFIRMING_OVERDUE_HOLDS: &str = "floodgate_drop_confirming_overdue_holds";
pub const DROP_ADMISSION_PAUSED: &str = "floodgate_drop_admission_paused";
pub const DROP_RECOVERING: &str = "floodgate_drop_recovering";
pub const DROP_LINE_STATE: &str = "floodgate_drop_line_state";
/// How many drops this process's last round reported (at most `http.drop_metrics_max_drops`).
pub const DROP_METRICS_DROPS: &str = "floodgate_drop_metrics_drops";
