//! The checks at the end of a run. Pure functions over the drop's live counts (from the public
//! `GET /v1/drops/{drop_id}`), Postgres' sums and what the client saw, so they can be tested on
//! sample data; [`postgres_sold`] is the only part that talks to anything.

use anyhow::Context as _;
use serde::Serialize;

/// One bucket of a drop's live counts (a SKU for GA, a section for seated drops).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Bucket {
    pub name: String,
    pub total: i64,
    pub available: i64,
    pub held: i64,
    pub sold: i64,
}

/// Reads `"inventory":[{"sku" | "section", "total", "available", "held", "sold"}]`.
pub fn parse_inventory(drop: &serde_json::Value) -> Result<Vec<Bucket>, String> {
    let entries = drop
        .get("inventory")
        .and_then(|v| v.as_array())
        .ok_or_else(|| format!("the drop has no \"inventory\" array: {drop}"))?;
    entries
        .iter()
        .map(|e| {
            let name = e
                .get("sku")
                .or_else(|| e.get("section"))
                .and_then(|n| n.as_str())
                .ok_or_else(|| format!("inventory entry without \"sku\" or \"section\": {e}"))?;
            let field = |k: &str| {
                e.get(k)
                    .and_then(|v| v.as_i64())
                    .ok_or_else(|| format!("inventory entry {name:?} has no integer {k:?}: {e}"))
            };
            Ok(Bucket {
                name: name.to_owned(),
                total: field("total")?,
                available: field("available")?,
                held: field("held")?,
                sold: field("sold")?,
            })
        })
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Pass,
    Fail,
    /// Not applicable to this run (the detail says why); not a failure.
    Skipped,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    pub name: String,
    pub verdict: Verdict,
    pub detail: String,
}

impl Check {
    pub fn new(name: impl Into<String>, pass: bool, detail: impl Into<String>) -> Self {
        let verdict = if pass { Verdict::Pass } else { Verdict::Fail };
        Self {
            name: name.into(),
            verdict,
            detail: detail.into(),
        }
    }

    pub fn skipped(name: impl Into<String>, why: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            verdict: Verdict::Skipped,
            detail: why.into(),
        }
    }
}

/// Per bucket: no count negative, `available + held + sold == total`.
pub fn check_buckets(buckets: &[Bucket]) -> Vec<Check> {
    let mut checks = Vec::new();
    if buckets.is_empty() {
        checks.push(Check::new(
            "inventory",
            false,
            "the drop lists no inventory",
        ));
    }
    for b in buckets {
        let non_negative = b.total >= 0 && b.available >= 0 && b.held >= 0 && b.sold >= 0;
        checks.push(Check::new(
            format!("{}: no negative count", b.name),
            non_negative,
            format!(
                "total {}, available {}, held {}, sold {}",
                b.total, b.available, b.held, b.sold
            ),
        ));
        let sum = b.available + b.held + b.sold;
        checks.push(Check::new(
            format!("{}: available + held + sold == total", b.name),
            sum == b.total,
            format!(
                "{} + {} + {} = {sum}, total {}",
                b.available, b.held, b.sold, b.total
            ),
        ));
    }
    checks
}

/// Postgres' view of what was sold in the drop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PostgresSold {
    /// `sum(inventory.sold)`.
    pub inventory_sold: i64,
    /// `sum(order_items.quantity)`.
    pub order_items: i64,
}

/// Both Postgres sums equal the API's sold total.
pub fn check_postgres(buckets: &[Bucket], pg: PostgresSold) -> Vec<Check> {
    let api_sold: i64 = buckets.iter().map(|b| b.sold).sum();
    vec![
        Check::new(
            "postgres: sum(inventory.sold) == API sold",
            pg.inventory_sold == api_sold,
            format!("{} vs {api_sold}", pg.inventory_sold),
        ),
        Check::new(
            "postgres: sum(order_items.quantity) == API sold",
            pg.order_items == api_sold,
            format!("{} vs {api_sold}", pg.order_items),
        ),
    ]
}

/// What the client saw, counted in holds (requests), for the bookkeeping checks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ClientCounts {
    pub quantity: u32,
    /// Reserves answered 201.
    pub reserved: u64,
    /// Reserves the server may or may not have done (timeouts, dropped connections, 5xx but 503).
    pub reserved_unknown: u64,
    /// Confirms answered 201 or 200.
    pub confirmed: u64,
    pub confirmed_unknown: u64,
    /// Releases answered 204.
    pub released: u64,
    pub released_unknown: u64,
}

/// Why the bookkeeping checks can't apply, if they can't.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bookkeeping {
    Applies,
    Skip(String),
}

/// `held + sold` against the holds the client got and gave back, and `sold` against its
/// confirms. Exact when every request got an answer; otherwise the unknown outcomes widen the
/// accepted range (a timed-out reserve may still have made a hold).
pub fn check_bookkeeping(
    bucket: Option<&Bucket>,
    sku: &str,
    c: ClientCounts,
    applies: &Bookkeeping,
) -> Vec<Check> {
    let held_name = format!("{sku}: held + sold == (holds made − released) × quantity");
    let sold_name = format!("{sku}: sold == confirmed × quantity");
    if let Bookkeeping::Skip(why) = applies {
        return vec![
            Check::skipped(held_name, why.clone()),
            Check::skipped(sold_name, why.clone()),
        ];
    }
    let Some(b) = bucket else {
        let detail = format!("the drop has no inventory entry {sku:?}");
        return vec![
            Check::new(held_name, false, detail.clone()),
            Check::new(sold_name, false, detail),
        ];
    };
    let q = i128::from(c.quantity);
    let (reserved, reserved_unknown) = (i128::from(c.reserved), i128::from(c.reserved_unknown));
    let (released, released_unknown) = (i128::from(c.released), i128::from(c.released_unknown));
    let (confirmed, confirmed_unknown) = (i128::from(c.confirmed), i128::from(c.confirmed_unknown));

    let held_sold = i128::from(b.held) + i128::from(b.sold);
    let lo = (reserved - released - released_unknown) * q;
    let hi = (reserved + reserved_unknown - released) * q;
    let held_check = Check::new(
        held_name,
        (lo..=hi).contains(&held_sold),
        describe(
            format!("{} + {} = {held_sold}", b.held, b.sold),
            lo,
            hi,
            format!("({reserved} − {released}) × {q}"),
        ),
    );

    let sold = i128::from(b.sold);
    let lo = confirmed * q;
    let hi = (confirmed + confirmed_unknown) * q;
    let sold_check = Check::new(
        sold_name,
        (lo..=hi).contains(&sold),
        describe(format!("{sold}"), lo, hi, format!("{confirmed} × {q}")),
    );
    vec![held_check, sold_check]
}

fn describe(actual: String, lo: i128, hi: i128, formula: String) -> String {
    if lo == hi {
        format!("{actual}, expected {formula} = {lo}")
    } else {
        format!("{actual}, expected {lo}..={hi} ({formula}, widened by requests without a definite answer)")
    }
}

/// Whether holds may have expired before the counts were read: if so, `held + sold` can be
/// lower than the client's count and the check doesn't apply.
pub fn expiry_rules_out_bookkeeping(elapsed_s: f64, hold_ttl_s: u32) -> Option<String> {
    // A second of margin for clock granularity between the client and Redis' TIME.
    if elapsed_s + 1.0 >= f64::from(hold_ttl_s) {
        Some(format!(
            "the run took {elapsed_s:.1} s, not clearly shorter than the hold TTL ({hold_ttl_s} s): holds may have expired"
        ))
    } else {
        None
    }
}

/// Postgres' sums for the drop.
pub async fn postgres_sold(database_url: &str, drop_id: &str) -> anyhow::Result<PostgresSold> {
    Ok(postgres_sale(database_url, drop_id, None).await?.0)
}

/// Postgres' sums for the drop and, given a per-fan limit, how many fans bought more than it.
pub async fn postgres_sale(
    database_url: &str,
    drop_id: &str,
    per_fan_limit: Option<u32>,
) -> anyhow::Result<(PostgresSold, Option<i64>)> {
    let (client, connection) = tokio_postgres::connect(database_url, tokio_postgres::NoTls)
        .await
        .context("connecting to Postgres (--database-url)")?;
    let driver = tokio::spawn(connection);
    let over_limit = match per_fan_limit {
        Some(limit) => Some(
            client
                .query_one(
                    "SELECT count(*)::bigint FROM (SELECT o.fan_id FROM orders o \
                     JOIN order_items i ON i.order_id = o.order_id WHERE o.drop_id = $1 \
                     GROUP BY o.fan_id HAVING sum(i.quantity) > $2) past",
                    &[&drop_id, &i64::from(limit)],
                )
                .await
                .context("counting fans past the per-fan limit")?
                .get::<_, i64>(0),
        ),
        None => None,
    };
    let inventory_sold: i64 = client
        .query_one(
            "SELECT coalesce(sum(sold), 0)::bigint FROM inventory WHERE drop_id = $1",
            &[&drop_id],
        )
        .await
        .context("summing inventory.sold")?
        .get(0);
    let order_items: i64 = client
        .query_one(
            "SELECT coalesce(sum(quantity), 0)::bigint FROM order_items WHERE drop_id = $1",
            &[&drop_id],
        )
        .await
        .context("summing order_items.quantity")?
        .get(0);
    drop(client);
    let _ = driver.await;
    Ok((
        PostgresSold {
            inventory_sold,
            order_items,
        },
        over_limit,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn drop_json(available: i64, held: i64, sold: i64, total: i64) -> serde_json::Value {
        json!({
            "drop_id": "d1",
            "name": "loadtest",
            "inventory": [{ "sku": "LT", "total": total, "available": available, "held": held, "sold": sold }],
        })
    }

    fn failed(checks: &[Check]) -> Vec<&str> {
        checks
            .iter()
            .filter(|c| c.verdict == Verdict::Fail)
            .map(|c| c.name.as_str())
            .collect()
    }

    #[test]
    fn consistent_counts_pass() {
        let buckets = parse_inventory(&drop_json(900, 60, 40, 1000)).unwrap();
        assert_eq!(
            buckets[0],
            Bucket {
                name: "LT".into(),
                total: 1000,
                available: 900,
                held: 60,
                sold: 40
            }
        );
        assert!(failed(&check_buckets(&buckets)).is_empty());
    }

    #[test]
    fn a_lost_unit_fails() {
        let buckets = parse_inventory(&drop_json(900, 60, 39, 1000)).unwrap();
        assert_eq!(
            failed(&check_buckets(&buckets)),
            ["LT: available + held + sold == total"]
        );
    }

    #[test]
    fn negative_held_fails_even_when_the_sum_matches() {
        let buckets = parse_inventory(&drop_json(1001, -1, 0, 1000)).unwrap();
        assert_eq!(failed(&check_buckets(&buckets)), ["LT: no negative count"]);
    }

    #[test]
    fn seated_sections_are_read_too() {
        let v = json!({ "inventory": [
            { "section": "A", "total": 10, "available": 10, "held": 0, "sold": 0 },
            { "section": "B", "total": 5, "available": 1, "held": 2, "sold": 2 },
        ]});
        let buckets = parse_inventory(&v).unwrap();
        assert_eq!(buckets.len(), 2);
        assert_eq!(buckets[1].name, "B");
        assert!(failed(&check_buckets(&buckets)).is_empty());
    }

    #[test]
    fn malformed_inventory_is_an_error() {
        assert!(parse_inventory(&json!({})).is_err());
        assert!(parse_inventory(&json!({ "inventory": [{ "sku": "LT", "total": 1 }] })).is_err());
        assert!(parse_inventory(
            &json!({ "inventory": [{ "total": 1, "available": 1, "held": 0, "sold": 0 }] })
        )
        .is_err());
        assert!(failed(&check_buckets(&[])).len() == 1);
    }

    #[test]
    fn postgres_must_agree_with_the_api() {
        let buckets = parse_inventory(&drop_json(900, 60, 40, 1000)).unwrap();
        let ok = PostgresSold {
            inventory_sold: 40,
            order_items: 40,
        };
        assert!(failed(&check_postgres(&buckets, ok)).is_empty());
        let behind = PostgresSold {
            inventory_sold: 40,
            order_items: 39,
        };
        assert_eq!(
            failed(&check_postgres(&buckets, behind)),
            ["postgres: sum(order_items.quantity) == API sold"]
        );
    }

    fn counts(reserved: u64, confirmed: u64, released: u64) -> ClientCounts {
        ClientCounts {
            quantity: 2,
            reserved,
            confirmed,
            released,
            ..Default::default()
        }
    }

    #[test]
    fn bookkeeping_matches_exactly_when_every_request_was_answered() {
        // 100 holds of 2; 30 confirmed, 20 released: held 100, sold 60.
        let b = Bucket {
            name: "LT".into(),
            total: 1000,
            available: 840,
            held: 100,
            sold: 60,
        };
        let checks = check_bookkeeping(Some(&b), "LT", counts(100, 30, 20), &Bookkeeping::Applies);
        assert!(failed(&checks).is_empty(), "{checks:?}");
        // One unit too many held: fail.
        let b2 = Bucket {
            held: 101,
            available: 839,
            ..b.clone()
        };
        let checks = check_bookkeeping(Some(&b2), "LT", counts(100, 30, 20), &Bookkeeping::Applies);
        assert_eq!(
            failed(&checks),
            ["LT: held + sold == (holds made − released) × quantity"]
        );
        // No confirms: sold must be 0.
        let checks = check_bookkeeping(Some(&b), "LT", counts(100, 0, 20), &Bookkeeping::Applies);
        assert_eq!(failed(&checks), ["LT: sold == confirmed × quantity"]);
    }

    #[test]
    fn unknown_outcomes_widen_the_range() {
        // 100 answered holds and 3 timeouts that the server did perform.
        let b = Bucket {
            name: "LT".into(),
            total: 1000,
            available: 794,
            held: 206,
            sold: 0,
        };
        let mut c = counts(100, 0, 0);
        assert_eq!(
            failed(&check_bookkeeping(Some(&b), "LT", c, &Bookkeeping::Applies)).len(),
            1
        );
        c.reserved_unknown = 3;
        assert!(failed(&check_bookkeeping(Some(&b), "LT", c, &Bookkeeping::Applies)).is_empty());
    }

    #[test]
    fn skipped_bookkeeping_is_not_a_failure() {
        let checks = check_bookkeeping(
            None,
            "LT",
            counts(1, 0, 0),
            &Bookkeeping::Skip("--drop-id".into()),
        );
        assert!(checks.iter().all(|c| c.verdict == Verdict::Skipped));
        // Without the bucket and not skipped: a failure.
        let checks = check_bookkeeping(None, "LT", counts(1, 0, 0), &Bookkeeping::Applies);
        assert_eq!(failed(&checks).len(), 2);
    }

    #[test]
    fn runs_close_to_the_hold_ttl_skip_bookkeeping() {
        assert!(expiry_rules_out_bookkeeping(20.0, 600).is_none());
        assert!(expiry_rules_out_bookkeeping(599.5, 600).is_some());
        assert!(expiry_rules_out_bookkeeping(12.0, 5).is_some());
    }
}
