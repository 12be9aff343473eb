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
    pub state: Option<&'static str>,
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
                        "authorized"
                    } else {
                        "declined"
                    },
                );
            }
        });
        if reference.starts_with("slow_") {
            tokio::time::sleep(self.slow).await;
            return Err(GatewayError::Timeout);
        }
        match self.with(hold, |p| p.state) {
            Some("authorized") | Some("captured") => Ok(()),
            _ => Err(GatewayError::Declined),
        }
    }

    async fn capture(&self, hold: &HoldId) -> Result<(), GatewayError> {
        self.with(hold, |p| match p.state {
            Some("authorized") => {
                p.captures += 1;
                p.state = Some("captured");
                Ok(())
            }
            Some("captured") => Ok(()),
            // No record: authorized by another process's gateway (or before a restart).
            None => {
                p.captures += 1;
                p.state = Some("captured");
                Ok(())
            }
            _ => Err(GatewayError::Other("nothing authorized to capture".into())),
        })
    }

    async fn void(&self, hold: &HoldId) -> Result<(), GatewayError> {
        self.with(hold, |p| {
            if p.state == Some("authorized") {
                p.voids += 1;
                p.state = Some("voided");
            }
            Ok(())
        })
    }

    async fn lookup(&self, hold: &HoldId, reference: &str) -> Result<Lookup, GatewayError> {
        // After a restart the memory is gone; the reference alone still decides, deterministically.
        Ok(self.with(hold, |p| match p.state {
            Some(_) if p.reference != reference => Lookup::Unknown,
            Some("authorized") => Lookup::Authorized,
            Some("captured") => Lookup::Captured,
            Some("declined") => Lookup::Declined,
            Some("voided") => Lookup::Voided,
            _ if reference.starts_with("ok_") || reference.starts_with("slow_") => {
                p.reference = reference.to_owned();
                p.authorizations += 1;
                p.state = Some("authorized");
                Lookup::Authorized
            }
            _ => Lookup::Unknown,
        }))
    }
}
