//! Payment gateways. Every call is idempotent by hold id: authorizing the same hold twice is one
//! authorization, capturing twice is one capture. `lookup` lets the reconciler find out what
//! happened to a payment whose answer was lost.

use std::collections::HashMap;
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

/// A payment attempt's state: one name in Rust, in the `payments` table (whose CHECK lists the
/// same names; a test holds the two together) and in the test gateway's records.
/// `pending` → `authorized` (with the order) → `captured`; `pending` → `declined` | `voided`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PaymentState {
    /// Recorded before the gateway is called; no order yet.
    Pending,
    /// Authorized, and (in Postgres) committed with its order in one transaction.
    Authorized,
    Declined,
    Captured,
    /// Ended without a sale by the reconciler (or a void at the gateway).
    Voided,
}

impl PaymentState {
    pub const ALL: [PaymentState; 5] = [
        PaymentState::Pending,
        PaymentState::Authorized,
        PaymentState::Declined,
        PaymentState::Captured,
        PaymentState::Voided,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PaymentState::Pending => "pending",
            PaymentState::Authorized => "authorized",
            PaymentState::Declined => "declined",
            PaymentState::Captured => "captured",
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
    async fn capture(&self, hold: &HoldId) -> Result<(), GatewayError>;
    async fn void(&self, hold: &HoldId) -> Result<(), GatewayError>;
    /// What became of the attempt made under `reference`; one the gateway never saw (an
    /// earlier attempt with another reference doesn't count) is `Unknown`.
    async fn lookup(&self, hold: &HoldId, reference: &str) -> Result<Lookup, GatewayError>;
}

/// Per-hold record the test gateway keeps, visible to tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TestPayment {
    pub reference: String,
    pub authorizations: u32,
    pub captures: u32,
    pub voids: u32,
    pub state: Option<PaymentState>,
}

/// Deterministic gateway for development and tests, by reference prefix:
/// `ok_…` is authorized, `fail_…` declined, `slow_…` authorized but the answer never comes in
/// time (the caller sees a timeout; `lookup` later says authorized, so the reconciler sells it).
/// Anything else is declined.
pub struct TestGateway {
    slow: Duration,
    payments: Mutex<HashMap<String, TestPayment>>,
}

impl TestGateway {
    pub fn new(slow: Duration) -> TestGateway {
        TestGateway {
            slow,
            payments: Mutex::new(HashMap::new()),
        }
    }

    pub fn payment(&self, hold: &HoldId) -> Option<TestPayment> {
        self.payments.lock().ok()?.get(hold.as_str()).cloned()
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
        _amount: i64,
        _currency: &str,
    ) -> Result<(), GatewayError> {
        self.with(hold, |p| {
            // A new reference is a new attempt; the same one again is the same authorization.
            if p.state.is_none() || p.reference != reference {
                p.reference = reference.to_owned();
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

    async fn capture(&self, hold: &HoldId) -> Result<(), GatewayError> {
        self.with(hold, |p| match p.state {
            Some(PaymentState::Authorized) => {
                p.captures += 1;
                p.state = Some(PaymentState::Captured);
                Ok(())
            }
            Some(PaymentState::Captured) => Ok(()),
            // No record: authorized by another process's gateway (or before a restart).
            None => {
                p.captures += 1;
                p.state = Some(PaymentState::Captured);
                Ok(())
            }
            _ => Err(GatewayError::Other("nothing authorized to capture".into())),
        })
    }

    async fn void(&self, hold: &HoldId) -> Result<(), GatewayError> {
        self.with(hold, |p| {
            if p.state == Some(PaymentState::Authorized) {
                p.voids += 1;
                p.state = Some(PaymentState::Voided);
            }
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

    /// The `payments.state` CHECK in the migration names exactly the enum's states.
    #[test]
    fn payment_states_match_the_sql_check() {
        let sql = include_str!("../../migrations/0001_init.sql");
        let table = &sql[sql
            .find("CREATE TABLE payments")
            .expect("the payments table")..];
        let check = table
            .lines()
            .find(|l| l.trim_start().starts_with("state "))
            .expect("payments.state");
        let list = check
            .split_once("CHECK (state IN (")
            .and_then(|(_, rest)| rest.split_once(')'))
            .expect("a CHECK (state IN (...)) on payments.state")
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
        gw.capture(&hold).await.unwrap();
        gw.void(&hold).await.unwrap();
        let p = gw.payment(&hold).unwrap();
        assert_eq!(
            p.state,
            Some(PaymentState::Captured),
            "a capture is not voided"
        );
        assert_eq!((p.authorizations, p.captures, p.voids), (2, 1, 0));
    }
}
