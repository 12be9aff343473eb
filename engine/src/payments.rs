//! Payment gateways. Every call names its attempt, (hold id, reference), and is idempotent by it:
//! authorizing the same attempt twice is one authorization, capturing or voiding it twice is one
//! capture or void. `lookup` lets the reconciler find out what happened to a payment whose answer
//! was lost.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;

use crate::ids::HoldId;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GatewayError {
    #[error("declined")]
    Declined,
    #[error("timed out")]
    Timeout,
    #[error("gateway error: {0}")]
    Other(String),
}

/// A payment attempt's state: one name in Rust, in the `payment_attempts` table (whose CHECK
/// lists the same names; a test holds the two together) and in the test gateway's records.
/// `pending` → `authorized` (with the order) → `captured`; `pending` → `declined`;
/// `pending` → `voiding` → `voided` (`voided` straight away for an attempt that never recorded
/// its payment, so it never can).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PaymentState {
    /// Recorded before the gateway is called; no order yet.
    Pending,
    /// Authorized, and (in Postgres) committed with its order in one transaction.
    Authorized,
    Declined,
    Captured,
    /// Ended without a sale (no order can be committed for it any more), but the gateway hasn't
    /// confirmed the void yet: the reconciler calls it again every round until it does.
    Voiding,
    /// Ended without a sale, and voided at the gateway (or never reached it).
    Voided,
}

impl PaymentState {
    pub const ALL: [PaymentState; 6] = [
        PaymentState::Pending,
        PaymentState::Authorized,
        PaymentState::Declined,
        PaymentState::Captured,
        PaymentState::Voiding,
        PaymentState::Voided,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PaymentState::Pending => "pending",
            PaymentState::Authorized => "authorized",
            PaymentState::Declined => "declined",
            PaymentState::Captured => "captured",
            PaymentState::Voiding => "voiding",
            PaymentState::Voided => "voided",
        }
    }

    pub fn parse(s: &str) -> Option<PaymentState> {
        PaymentState::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
    }
}

impl std::fmt::Display for PaymentState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the gateway knows of a hold's payment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    Authorized,
    Captured,
    Declined,
    Voided,
    Unknown,
}

#[async_trait]
pub trait PaymentGateway: Send + Sync {
    /// The name clients use in `{"payment":{"gateway": ...}}`.
    fn name(&self) -> &'static str;
    async fn authorize(
        &self,
        hold: &HoldId,
        reference: &str,
        amount_cents: i64,
        currency: &str,
    ) -> Result<(), GatewayError>;
    async fn capture(&self, hold: &HoldId, reference: &str) -> Result<(), GatewayError>;
    /// Releases the attempt's authorization, if it has one; `Ok` means the gateway holds no
    /// money for it any more (an attempt it never authorized included).
    async fn void(&self, hold: &HoldId, reference: &str) -> Result<(), GatewayError>;
    /// What became of the attempt made under `reference`; one the gateway never saw (an
    /// earlier attempt with another reference doesn't count) is `Unknown`.
    async fn lookup(&self, hold: &HoldId, reference: &str) -> Result<Lookup, GatewayError>;
    /// Pays `amount_cents` of the attempt's capture back to the fan, idempotent by `refund_id`
    /// (the same refund id again is the same refund). Only a captured attempt has money to
    /// refund: an authorization not yet captured is voided instead ([`PaymentGateway::void`]).
    /// The refunds of one attempt never add up to more than its capture.
    async fn refund(
        &self,
        hold: &HoldId,
        reference: &str,
        refund_id: &str,
        amount_cents: i64,
    ) -> Result<(), GatewayError>;
}

/// Per-hold record the test gateway keeps, visible to tests: the latest attempt's reference and
/// state, and counts over every attempt.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TestPayment {
    pub reference: String,
    pub authorizations: u32,
    pub captures: u32,
    /// Voids that released an authorization.
    pub voids: u32,
    /// Every void call that reached the gateway, failed ones included.
    pub void_calls: u32,
    pub state: Option<PaymentState>,
    /// The latest attempt's authorized amount.
    pub amount_cents: i64,
    /// Distinct refund ids refunded, and what they paid back in all.
    pub refunds: u32,
    pub refunded_cents: i64,
    /// The refund ids seen, so a repeated one refunds nothing more.
    pub refund_ids: Vec<String>,
}

/// Deterministic gateway for development and tests, by reference prefix:
/// `ok_…` is authorized, `fail_…` declined, `slow_…` authorized but the answer never comes in
/// time (the caller sees a timeout; `lookup` later says authorized, so the reconciler sells it).
/// Anything else is declined. Tests can make it misbehave on purpose ([`TestGateway::fail_voids`],
/// [`TestGateway::hold_captures`]).
pub struct TestGateway {
    slow: Duration,
    /// Each authorize, capture and void takes between these two (`gateway.test_call_*_ms`).
    call_min: Duration,
    call_max: Duration,
    payments: Mutex<HashMap<String, TestPayment>>,
    /// Void calls still to fail (a fault hook for tests).
    voids_to_fail: AtomicU32,
    /// While set, captures wait here (a fault hook for tests).
    capture_gate: Mutex<Option<std::sync::Arc<CaptureGate>>>,
}

/// Captures held at the gateway until a test lets them go, so the test can act between an
/// order's commit and the rest of its confirm.
pub struct CaptureGate {
    /// Notified when a capture arrives.
    pub arrived: tokio::sync::Notify,
    /// Closed to let the held captures (and all later ones) through.
    open: tokio::sync::Semaphore,
}

impl Default for CaptureGate {
    fn default() -> Self {
        CaptureGate {
            arrived: tokio::sync::Notify::new(),
            open: tokio::sync::Semaphore::new(0),
        }
    }
}

impl CaptureGate {
    pub fn open(&self) {
        self.open.close();
    }
}

impl TestGateway {
    pub fn new(slow: Duration) -> TestGateway {
        TestGateway {
            slow,
            call_min: Duration::ZERO,
            call_max: Duration::ZERO,
            payments: Mutex::new(HashMap::new()),
            voids_to_fail: AtomicU32::new(0),
            capture_gate: Mutex::new(None),
        }
    }

    /// Every authorize, capture and void takes between `min` and `max`, as a real gateway's
    /// round trip does (benchmarks: 200–500 ms).
    pub fn with_call_latency(mut self, min: Duration, max: Duration) -> TestGateway {
        self.call_min = min;
        self.call_max = max.max(min);
        self
    }

    async fn call_latency(&self) {
        if self.call_max.is_zero() {
            return;
        }
        let spread = (self.call_max - self.call_min).as_micros() as u64;
        let extra = if spread == 0 {
            0
        } else {
            rand::Rng::random_range(&mut rand::rng(), 0..=spread)
        };
        tokio::time::sleep(self.call_min + Duration::from_micros(extra)).await;
    }

    pub fn payment(&self, hold: &HoldId) -> Option<TestPayment> {
        self.payments.lock().ok()?.get(hold.as_str()).cloned()
    }

    /// The next `n` void calls fail (the gateway is down for them), as a real gateway's might.
    pub fn fail_voids(&self, n: u32) {
        self.voids_to_fail.store(n, Ordering::SeqCst);
    }

    /// Holds every capture from now on until the returned gate is opened.
    pub fn hold_captures(&self) -> std::sync::Arc<CaptureGate> {
        let gate = std::sync::Arc::new(CaptureGate::default());
        *self.capture_gate.lock().unwrap_or_else(|p| p.into_inner()) = Some(gate.clone());
        gate
    }

    fn with<T>(&self, hold: &HoldId, f: impl FnOnce(&mut TestPayment) -> T) -> T {
        let mut map = self.payments.lock().unwrap_or_else(|p| p.into_inner());
        f(map.entry(hold.to_string()).or_default())
    }
}

#[async_trait]
impl PaymentGateway for TestGateway {
    fn name(&self) -> &'static str {
        "test"
    }

    async fn authorize(
        &self,
        hold: &HoldId,
        reference: &str,
        amount: i64,
        _currency: &str,
    ) -> Result<(), GatewayError> {
        self.call_latency().await;
        self.with(hold, |p| {
            // A new reference is a new attempt; the same one again is the same authorization.
            if p.state.is_none() || p.reference != reference {
                p.reference = reference.to_owned();
                p.amount_cents = amount;
                p.authorizations += 1;
                p.state = Some(
                    if reference.starts_with("ok_") || reference.starts_with("slow_") {
                        PaymentState::Authorized
                    } else {
                        PaymentState::Declined
                    },
                );
            }
        });
        if reference.starts_with("slow_") {
            tokio::time::sleep(self.slow).await;
            return Err(GatewayError::Timeout);
        }
        match self.with(hold, |p| p.state) {
            Some(PaymentState::Authorized | PaymentState::Captured) => Ok(()),
            _ => Err(GatewayError::Declined),
        }
    }

    async fn capture(&self, hold: &HoldId, reference: &str) -> Result<(), GatewayError> {
        self.call_latency().await;
        let gate = self
            .capture_gate
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(gate) = gate {
            gate.arrived.notify_one();
            // Closed = open: acquire fails at once, which is all a held capture waits for.
            let _ = gate.open.acquire().await;
        }
        self.with(hold, |p| match p.state {
            // Another attempt's record: a capture of this one has nothing authorized.
            Some(_) if p.reference != reference => {
                Err(GatewayError::Other("nothing authorized to capture".into()))
            }
            Some(PaymentState::Authorized) => {
                p.captures += 1;
                p.state = Some(PaymentState::Captured);
                Ok(())
            }
            Some(PaymentState::Captured) => Ok(()),
            // No record: authorized by another process's gateway (or before a restart).
            None => {
                p.reference = reference.to_owned();
                p.captures += 1;
                p.state = Some(PaymentState::Captured);
                Ok(())
            }
            _ => Err(GatewayError::Other("nothing authorized to capture".into())),
        })
    }

    async fn void(&self, hold: &HoldId, reference: &str) -> Result<(), GatewayError> {
        self.call_latency().await;
        let fail = self
            .voids_to_fail
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        self.with(hold, |p| {
            p.void_calls += 1;
            if fail {
                return Err(GatewayError::Other("void failed (test fault)".into()));
            }
            if p.reference == reference && p.state == Some(PaymentState::Authorized) {
                p.voids += 1;
                p.state = Some(PaymentState::Voided);
            }
            Ok(())
        })
    }

    async fn refund(
        &self,
        hold: &HoldId,
        reference: &str,
        refund_id: &str,
        amount_cents: i64,
    ) -> Result<(), GatewayError> {
        self.call_latency().await;
        self.with(hold, |p| {
            if p.refund_ids.iter().any(|r| r == refund_id) {
                return Ok(());
            }
            if p.reference != reference || p.state != Some(PaymentState::Captured) {
                return Err(GatewayError::Other("nothing captured to refund".into()));
            }
            // An amount of 0 is a capture this gateway took before a restart (it forgot the
            // authorization's amount): it takes the caller's word.
            if p.amount_cents > 0 && p.refunded_cents + amount_cents > p.amount_cents {
                return Err(GatewayError::Other("more than was captured".into()));
            }
            p.refund_ids.push(refund_id.to_owned());
            p.refunds += 1;
            p.refunded_cents += amount_cents;
            Ok(())
        })
    }

    async fn lookup(&self, hold: &HoldId, reference: &str) -> Result<Lookup, GatewayError> {
        // After a restart the memory is gone; the reference alone still decides, deterministically.
        Ok(self.with(hold, |p| match p.state {
            Some(_) if p.reference != reference => Lookup::Unknown,
            Some(PaymentState::Authorized) => Lookup::Authorized,
            Some(PaymentState::Captured) => Lookup::Captured,
            Some(PaymentState::Declined) => Lookup::Declined,
            Some(PaymentState::Voided) => Lookup::Voided,
            _ if reference.starts_with("ok_") || reference.starts_with("slow_") => {
                p.reference = reference.to_owned();
                p.authorizations += 1;
                p.state = Some(PaymentState::Authorized);
                Lookup::Authorized
            }
            _ => Lookup::Unknown,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payment_states_round_trip() {
        for state in PaymentState::ALL {
            assert_eq!(PaymentState::parse(state.as_str()), Some(state));
        }
        assert_eq!(PaymentState::parse("superseded"), None);
        assert_eq!(PaymentState::parse("Pending"), None);
    }

    /// The `payment_attempts.state` CHECK in the migration names exactly the enum's states.
    #[test]
    fn payment_states_match_the_sql_check() {
        let sql = include_str!("../../migrations/0002_payment_attempts.sql");
        let table = &sql[sql
            .find("CREATE TABLE payment_attempts")
            .expect("the payment_attempts table")..];
        let check = table
            .lines()
            .find(|l| l.trim_start().starts_with("state "))
            .expect("payment_attempts.state");
        let list = check
            .split_once("CHECK (state IN (")
            .and_then(|(_, rest)| rest.split_once(')'))
            .expect("a CHECK (state IN (...)) on payment_attempts.state")
            .0;
        let in_sql: Vec<&str> = list
            .split(',')
            .map(|name| name.trim().trim_matches('\''))
            .collect();
        let in_rust: Vec<&str> = PaymentState::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(in_sql, in_rust);
    }

    #[tokio::test]
    async fn the_test_gateway_records_states() {
        let gw = TestGateway::new(Duration::from_millis(1));
        let hold = HoldId::generate(&crate::ids::DropId::generate());
        assert_eq!(
            gw.authorize(&hold, "fail_1", 100, "USD").await,
            Err(GatewayError::Declined)
        );
        assert_eq!(
            gw.payment(&hold).unwrap().state,
            Some(PaymentState::Declined)
        );
        gw.authorize(&hold, "ok_2", 100, "USD").await.unwrap();
        assert_eq!(gw.lookup(&hold, "ok_2").await, Ok(Lookup::Authorized));
        assert_eq!(gw.lookup(&hold, "fail_1").await, Ok(Lookup::Unknown));
        gw.capture(&hold, "ok_2").await.unwrap();
        gw.void(&hold, "ok_2").await.unwrap();
        let p = gw.payment(&hold).unwrap();
        assert_eq!(
            p.state,
            Some(PaymentState::Captured),
            "a capture is not voided"
        );
        assert_eq!((p.authorizations, p.captures, p.voids), (2, 1, 0));
    }

    #[tokio::test]
    async fn the_test_gateway_voids_per_attempt_and_fails_voids_on_demand() {
        let gw = TestGateway::new(Duration::from_millis(1));
        let hold = HoldId::generate(&crate::ids::DropId::generate());
        gw.authorize(&hold, "ok_1", 100, "USD").await.unwrap();
        gw.void(&hold, "ok_0").await.unwrap();
        assert_eq!(
            gw.payment(&hold).unwrap().state,
            Some(PaymentState::Authorized),
            "another attempt's void leaves this one's authorization"
        );
        gw.fail_voids(2);
        assert!(gw.void(&hold, "ok_1").await.is_err());
        assert!(gw.void(&hold, "ok_1").await.is_err());
        gw.void(&hold, "ok_1").await.unwrap();
        let p = gw.payment(&hold).unwrap();
        assert_eq!(p.state, Some(PaymentState::Voided));
        assert_eq!((p.voids, p.void_calls), (1, 4));
    }

    #[tokio::test]
    async fn the_test_gateway_refunds_a_capture_once_per_refund_id() {
        let gw = TestGateway::new(Duration::from_millis(1));
        let hold = HoldId::generate(&crate::ids::DropId::generate());
        gw.authorize(&hold, "ok_1", 1000, "USD").await.unwrap();
        assert!(
            gw.refund(&hold, "ok_1", "r1", 300).await.is_err(),
            "nothing captured to refund (an authorization is voided instead)"
        );
        gw.capture(&hold, "ok_1").await.unwrap();
        assert!(
            gw.refund(&hold, "ok_0", "r1", 300).await.is_err(),
            "another attempt"
        );
        gw.refund(&hold, "ok_1", "r1", 300).await.unwrap();
        gw.refund(&hold, "ok_1", "r1", 300).await.unwrap();
        gw.refund(&hold, "ok_1", "r2", 700).await.unwrap();
        assert!(
            gw.refund(&hold, "ok_1", "r3", 1).await.is_err(),
            "no more than was captured"
        );
        let p = gw.payment(&hold).unwrap();
        assert_eq!((p.refunds, p.refunded_cents), (2, 1000));
        assert_eq!(p.state, Some(PaymentState::Captured));
    }
}
