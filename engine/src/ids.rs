//! Newtypes that parse: once a value has one of these types it is valid, so nothing past the
//! edge re-checks it. Every id that ends up inside a Redis key or a Lua argument is restricted to
//! characters that can't break a key (no `{`, `}`, `:` or whitespace in drop ids, for instance).

use std::fmt;

use rand::Rng;
use serde::{Deserialize, Serialize};

/// Why a value was refused; the message names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ParseError(pub String);

fn token_chars(s: &str, extra: &[char]) -> bool {
    s.chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || extra.contains(&c))
}

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                $name::parse(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}

string_id!(
    /// A drop: `d` followed by 16 lowercase hex digits, made at creation.
    DropId
);
string_id!(
    /// A fan, as the identity provider names them: 1..=64 of `[A-Za-z0-9_.@+-]`.
    FanId
);
string_id!(
    /// A hold: `<drop id>-h<16 hex>`, so a hold id alone finds its drop (and its Redis shard).
    HoldId
);
string_id!(
    /// A SKU code chosen by the seller: 1..=40 of `[A-Za-z0-9_.-]`.
    Sku
);
string_id!(
    /// A section of a seated drop: 1..=16 of `[A-Za-z0-9_]` (no `-`: seat ids are `SECTION-ROW-N`).
    Section
);
string_id!(
    /// A seat: `SECTION-ROW-NUMBER`, numbers from 1, e.g. `A-1-7`.
    SeatId
);
string_id!(
    /// A seller's id for a refund of an order (the same id again is the same refund): 1..=128
    /// printable ASCII characters.
    RefundId
);

string_id!(
    /// A client's `Idempotency-Key` for a reserve: 1..=128 printable ASCII characters.
    IdempotencyKey
);
string_id!(
    /// A payment's reference from the fan's payment method: 1..=128 printable ASCII characters.
    PaymentReference
);
string_id!(
    /// A seller's `request_id` that makes a write idempotent (add stock): 1..=128 printable
    /// ASCII characters.
    RequestId
);

/// What a key or a reference may be: 1..=128 printable ASCII characters (no space, no control).
fn printable_ascii_128(s: &str, what: &str) -> Result<String, ParseError> {
    if s.is_empty() || s.len() > 128 || !s.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ParseError(format!(
            "{what} must be 1..=128 printable ASCII characters"
        )));
    }
    Ok(s.to_owned())
}

impl RefundId {
    pub fn parse(s: &str) -> Result<Self, ParseError> {
        printable_ascii_128(s, "refund_id").map(RefundId)
    }
}

impl IdempotencyKey {
    pub fn parse(s: &str) -> Result<Self, ParseError> {
        printable_ascii_128(s, "Idempotency-Key").map(IdempotencyKey)
    }
}

impl PaymentReference {
    pub fn parse(s: &str) -> Result<Self, ParseError> {
        printable_ascii_128(s, "payment.reference").map(PaymentReference)
    }
}

impl RequestId {
    pub fn parse(s: &str) -> Result<Self, ParseError> {
        printable_ascii_128(s, "request_id").map(RequestId)
    }
}

fn random_hex16() -> String {
    format!("{:016x}", rand::rng().random::<u64>())
}

impl DropId {
    pub fn generate() -> Self {
        DropId(format!("d{}", random_hex16()))
    }

    pub fn parse(s: &str) -> Result<Self, ParseError> {
        let ok = s.len() == 17
            && s.starts_with('d')
            && s[1..]
                .chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase());
        if ok {
            Ok(DropId(s.to_owned()))
        } else {
            Err(ParseError(format!("`{s}` is not a drop id")))
        }
    }
}

impl FanId {
    pub const MAX_LEN: usize = 64;

    pub fn parse(s: &str) -> Result<Self, ParseError> {
        if s.is_empty() || s.len() > Self::MAX_LEN || !token_chars(s, &['.', '@', '+']) {
            return Err(ParseError(format!(
                "a fan id is 1..={} of letters, digits and _ . @ + -",
                Self::MAX_LEN
            )));
        }
        Ok(FanId(s.to_owned()))
    }
}

impl HoldId {
    pub fn generate(drop: &DropId) -> Self {
        HoldId(format!("{drop}-h{}", random_hex16()))
    }

    pub fn parse(s: &str) -> Result<Self, ParseError> {
        let bad = || ParseError(format!("`{s}` is not a hold id"));
        let (drop, rest) = s.split_once("-h").ok_or_else(bad)?;
        DropId::parse(drop).map_err(|_| bad())?;
        if rest.len() != 16 || !rest.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(bad());
        }
        Ok(HoldId(s.to_owned()))
    }

    /// The drop this hold belongs to (its id is the prefix).
    pub fn drop_id(&self) -> DropId {
        DropId(self.0[..17].to_owned())
    }
}

impl Sku {
    pub fn parse(s: &str) -> Result<Self, ParseError> {
        if s.is_empty() || s.len() > 40 || !token_chars(s, &['.']) {
            return Err(ParseError(format!(
                "sku `{s}`: 1..=40 of letters, digits and _ . -"
            )));
        }
        Ok(Sku(s.to_owned()))
    }
}

impl Section {
    pub fn parse(s: &str) -> Result<Self, ParseError> {
        if s.is_empty() || s.len() > 16 || !s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return Err(ParseError(format!(
                "section `{s}`: 1..=16 of letters, digits and _"
            )));
        }
        Ok(Section(s.to_owned()))
    }
}

/// A row label inside a section: 1..=8 of `[A-Za-z0-9]`.
pub fn parse_row_label(s: &str) -> Result<String, ParseError> {
    if s.is_empty() || s.len() > 8 || !s.chars().all(|c| c.is_ascii_alphanumeric()) {
        return Err(ParseError(format!("row `{s}`: 1..=8 letters or digits")));
    }
    Ok(s.to_owned())
}

impl SeatId {
    pub fn new(section: &Section, row: &str, number: u32) -> Self {
        SeatId(format!("{section}-{row}-{number}"))
    }

    pub fn parse(s: &str) -> Result<Self, ParseError> {
        let bad = || ParseError(format!("`{s}` is not a seat id (SECTION-ROW-NUMBER)"));
        let mut parts = s.split('-');
        let (Some(section), Some(row), Some(number), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        Section::parse(section).map_err(|_| bad())?;
        parse_row_label(row).map_err(|_| bad())?;
        // Digits only: `u32::from_str` also takes a leading `+`, and `A-1-+1` is not `A-1-1`.
        let digits = number.bytes().all(|b| b.is_ascii_digit());
        match number.parse::<u32>() {
            Ok(n) if digits && n >= 1 && !number.starts_with('0') => Ok(SeatId(s.to_owned())),
            _ => Err(bad()),
        }
    }

    pub fn section(&self) -> &str {
        self.0.split('-').next().unwrap_or_default()
    }
}

/// An order: a UUID v4.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct OrderId(pub uuid::Uuid);

impl OrderId {
    pub fn generate() -> Self {
        OrderId(uuid::Uuid::new_v4())
    }

    pub fn parse(s: &str) -> Result<Self, ParseError> {
        uuid::Uuid::parse_str(s)
            .map(OrderId)
            .map_err(|_| ParseError(format!("`{s}` is not an order id")))
    }
}

impl fmt::Display for OrderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hold_id_embeds_its_drop() {
        let drop = DropId::generate();
        let hold = HoldId::generate(&drop);
        assert_eq!(HoldId::parse(hold.as_str()).unwrap().drop_id(), drop);
    }

    #[test]
    fn ids_refuse_key_breaking_characters() {
        assert!(DropId::parse("d0123456789abcdef").is_ok());
        assert!(DropId::parse("d0123456789ABCDEF").is_err());
        assert!(DropId::parse("{d0123456789abcd}").is_err());
        assert!(FanId::parse("alice@example.com").is_ok());
        assert!(FanId::parse("a:b").is_err());
        assert!(FanId::parse("").is_err());
        assert!(Sku::parse("TEE-M").is_ok());
        assert!(Sku::parse("TEE M").is_err());
        assert!(SeatId::parse("A-1-7").is_ok());
        assert!(SeatId::parse("A-1-0").is_err());
        assert!(SeatId::parse("A-1-07").is_err());
        assert!(SeatId::parse("A-1-+1").is_err());
        assert!(SeatId::parse("A-1").is_err());
        assert_eq!(SeatId::parse("VIP-12-3").unwrap().section(), "VIP");
    }

    /// lua/reserve.lua writes the hold record and the stored answer as JSON by concatenation, so
    /// nothing it puts between quotes may need escaping: fan, hold, SKU, section and seat ids.
    #[test]
    fn ids_a_script_quotes_need_no_json_escaping() {
        for bad in ["a\"b", "a\\b", "a\nb", "a\u{7f}b", "a\u{e9}b"] {
            assert!(FanId::parse(bad).is_err(), "fan {bad:?}");
            assert!(HoldId::parse(&format!("d0123456789abcdef-{bad}")).is_err());
            assert!(Sku::parse(bad).is_err(), "sku {bad:?}");
            assert!(Section::parse(bad).is_err(), "section {bad:?}");
            assert!(SeatId::parse(&format!("A-{bad}-1")).is_err());
        }
    }
}
