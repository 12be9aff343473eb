//! The one table of error codes. Every refusal Floodgate answers with is a [`Code`]: an HTTP
//! status, a stable machine-readable name (the same in Lua, Rust, metrics and docs/API.md) and a
//! sentence. Handlers return [`Error`]; booking-api turns it into a response in one place.

use std::time::Duration;

macro_rules! codes {
    ($($variant:ident => ($status:expr, $name:literal, $message:literal),)*) => {
        /// A stable error code. `name()` is what clients see in `{"error":{"code":...}}`.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Code { $($variant,)* }

        impl Code {
            pub const ALL: &'static [Code] = &[$(Code::$variant,)*];

            pub fn status(self) -> u16 {
                match self { $(Code::$variant => $status,)* }
            }

            pub fn name(self) -> &'static str {
                match self { $(Code::$variant => $name,)* }
            }

            /// The default sentence, used when a more specific message isn't given.
            pub fn message(self) -> &'static str {
                match self { $(Code::$variant => $message,)* }
            }

            pub fn from_name(name: &str) -> Option<Code> {
                match name { $($name => Some(Code::$variant),)* _ => None }
            }
        }
    };
}

codes! {
    InvalidRequest => (422, "invalid_request", "The request is not valid."),
    MalformedJson => (400, "malformed_json", "The body is not valid JSON."),
    Unauthorized => (401, "unauthorized", "Missing, malformed, forged or expired credentials."),
    Forbidden => (403, "forbidden", "This key may not do that."),
    NotAdmitted => (403, "not_admitted", "This drop needs a valid admission token from its waiting room."),
    UnknownDrop => (404, "unknown_drop", "There is no such drop."),
    UnknownSku => (404, "unknown_sku", "The drop has no such SKU."),
    UnknownSeat => (404, "unknown_seat", "The drop has no such seat."),
    NoCancellation => (404, "no_cancellation", "This drop has not been cancelled."),
    UnknownSection => (404, "unknown_section", "The drop has no such section."),
    UnknownHold => (404, "unknown_hold", "There is no such hold."),
    UnknownOrder => (404, "unknown_order", "There is no such order."),
    NotFound => (404, "not_found", "No such endpoint."),
    MethodNotAllowed => (405, "method_not_allowed", "That method is not allowed here."),
    SoldOut => (409, "sold_out", "Sold out: nothing is available, held or being paid for."),
    AllHeld => (409, "all_held", "Nothing is available now, but other fans' holds may expire and return."),
    InsufficientStock => (409, "insufficient_stock", "Fewer units are available than asked for."),
    SeatUnavailable => (409, "seat_unavailable", "A requested seat is held or sold."),
    DropClosed => (409, "drop_closed", "The drop is closed."),
    NotOpen => (409, "not_open", "The drop is not open yet."),
    AlreadyRefunded => (409, "already_refunded", "The order, or these items of it, was refunded already."),
    HoldConfirming => (409, "hold_confirming", "The hold is being paid for and can't be released now."),
    HoldSold => (409, "hold_sold", "The hold was already paid for."),
    ConfirmInProgress => (409, "confirm_in_progress", "The hold is being paid for with another payment."),
    HoldExpired => (410, "hold_expired", "The hold expired; its items went back on sale."),
    HoldReleased => (410, "hold_released", "The hold was released; its items went back on sale."),
    LimitExceeded => (422, "limit_exceeded", "That would take the fan past the drop's per-fan limit."),
    IdempotencyKeyReused => (422, "idempotency_key_reused", "This Idempotency-Key was used with a different request."),
    PaymentDeclined => (402, "payment_declined", "The payment was declined; the hold is still yours until it expires."),
    BodyTooLarge => (413, "body_too_large", "The request body is too large."),
    RateLimited => (429, "rate_limited", "Too many requests; retry after the time given."),
    Recovering => (503, "recovering", "The drop is being reconciled after a storage fault; retry shortly."),
    Unavailable => (503, "unavailable", "A storage service is unavailable; retry shortly."),
    PaymentPending => (503, "payment_pending", "The payment is still being settled; retry shortly."),
    Internal => (500, "internal", "Something went wrong on our side."),
}

/// A refusal: a code, a sentence for people, and how long to wait before retrying (429 / 503).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}: {message}", code.name())]
pub struct Error {
    pub code: Code,
    pub message: String,
    pub retry_after: Option<Duration>,
    /// Extra machine-readable detail (e.g. which seats were taken), sent as `error.detail`.
    pub detail: Option<serde_json::Value>,
}

impl Error {
    pub fn new(code: Code) -> Self {
        Error {
            code,
            message: code.message().to_owned(),
            retry_after: None,
            detail: None,
        }
    }

    pub fn msg(code: Code, message: impl Into<String>) -> Self {
        Error {
            code,
            message: message.into(),
            retry_after: None,
            detail: None,
        }
    }

    pub fn retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }

    pub fn detail(mut self, detail: serde_json::Value) -> Self {
        self.detail = Some(detail);
        self
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Error::msg(Code::InvalidRequest, message)
    }

    /// Redis or Postgres could not be reached; the caller retries. Logged here once.
    pub fn unavailable(what: &str, cause: impl std::fmt::Display) -> Self {
        tracing::warn!(%cause, "{what} unavailable");
        Error::msg(
            Code::Unavailable,
            format!("{what} is unavailable; retry shortly."),
        )
        .retry_after(Duration::from_secs(1))
    }

    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!(%cause, "internal error");
        Error::new(Code::Internal)
    }

    /// The JSON body every error response carries.
    pub fn body(&self) -> serde_json::Value {
        let mut inner = serde_json::json!({"code": self.code.name(), "message": self.message});
        if let Some(detail) = &self.detail {
            inner["detail"] = detail.clone();
        }
        serde_json::json!({ "error": inner })
    }
}

impl From<Code> for Error {
    fn from(code: Code) -> Self {
        Error::new(code)
    }
}

impl From<crate::ids::ParseError> for Error {
    fn from(e: crate::ids::ParseError) -> Self {
        Error::invalid(e.0)
    }
}

impl From<fred::error::Error> for Error {
    fn from(e: fred::error::Error) -> Self {
        // A script that fails while running is a bug in it, not an outage: retrying won't help,
        // so it is a 500, logged as such; so is a command whose keys span Redis Cluster slots
        // (CROSSSLOT: a key named without its drop's hash tag). Everything else (I/O, timeouts,
        // LOADING, BUSY, and a cluster moving slots or failing over: MOVED and ASK past the
        // client's redirections, TRYAGAIN, CLUSTERDOWN) is Redis being unreachable for now: 503
        // with Retry-After.
        if is_script_error(e.kind(), e.details()) || e.details().starts_with("CROSSSLOT") {
            return Error::internal(e);
        }
        Error::unavailable("Redis", e)
    }
}

/// Redis' answer to a Lua runtime error: `ERR user_script:<line>: ...` (Redis 7) or
/// `ERR Error running script ...` (older), and a command failing inside a script (`WRONGTYPE
/// ... script: ..., on @user_script:<line>.`, which fred files under another kind).
fn is_script_error(kind: &fred::error::ErrorKind, details: &str) -> bool {
    use fred::error::ErrorKind::{InvalidArgument, InvalidCommand, Unknown};
    matches!(kind, Unknown | InvalidArgument | InvalidCommand)
        && (details.contains("user_script") || details.contains("Error running script"))
}

impl From<tokio_postgres::Error> for Error {
    fn from(e: tokio_postgres::Error) -> Self {
        Error::unavailable("Postgres", e)
    }
}

impl From<deadpool_postgres::PoolError> for Error {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        Error::unavailable("Postgres", e)
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;
    use fred::error::{Error as RedisError, ErrorKind};

    #[test]
    fn lua_runtime_errors_are_internal_and_outages_unavailable() {
        let script = RedisError::new(
            ErrorKind::Unknown,
            "ERR user_script:12: attempt to compare nil with number script: 1a2b, on @user_script:12.",
        );
        assert_eq!(Error::from(script).code, Code::Internal);
        let wrong_type = RedisError::new(
            ErrorKind::InvalidArgument,
            "WRONGTYPE Operation against a key holding the wrong kind of value script: 1a2b, on @user_script:9.",
        );
        assert_eq!(Error::from(wrong_type).code, Code::Internal);
        let cross_slot = RedisError::new(
            ErrorKind::Unknown,
            "CROSSSLOT Keys in request don't hash to the same slot",
        );
        assert_eq!(Error::from(cross_slot).code, Code::Internal);
        for (kind, details) in [
            (ErrorKind::IO, "connection reset"),
            (ErrorKind::Timeout, "Request timed out."),
            (
                ErrorKind::Unknown,
                "LOADING Redis is loading the dataset in memory",
            ),
            (ErrorKind::Unknown, "BUSY Redis is busy running a script."),
            // A Redis Cluster resharding or failing over.
            (
                ErrorKind::Unknown,
                "TRYAGAIN Multiple keys request during rehashing of slot",
            ),
            (ErrorKind::Cluster, "MOVED 3999 127.0.0.1:6381"),
            (ErrorKind::Cluster, "ASK 3999 127.0.0.1:6381"),
            (ErrorKind::Cluster, "CLUSTERDOWN The cluster is down"),
            (ErrorKind::Cluster, "CLUSTERDOWN Hash slot not served"),
        ] {
            let e = Error::from(RedisError::new(kind, details));
            assert_eq!(e.code, Code::Unavailable, "{details}");
            assert!(e.retry_after.is_some());
        }
    }

    #[test]
    fn names_are_unique_and_round_trip() {
        let mut seen = std::collections::HashSet::new();
        for code in Code::ALL {
            assert!(seen.insert(code.name()), "duplicate {}", code.name());
            assert_eq!(Code::from_name(code.name()), Some(*code));
        }
    }
}
