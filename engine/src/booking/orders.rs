//! A drop's orders for its seller or ops (`GET /v1/drops/{id}/orders` and `.../orders.csv`): each
//! order with its items and payment state, searchable by fan and by order id, newest first, paged
//! by a cursor with a bounded page; the CSV walks the same pages up to a bounded number of rows
//! and escapes every cell a spreadsheet would run as a formula.

use serde::Serialize;

use super::*;

/// What a search asks for: every filter optional; `limit` 1..=`drops.orders_page_max`.
#[derive(Debug, Clone, Default)]
pub struct OrderSearch {
    pub fan: Option<FanId>,
    pub order_id: Option<OrderId>,
    pub cursor: Option<OrderCursor>,
    pub limit: Option<u32>,
}

/// Where a page ends: the last order's `created_at` (µs since the epoch) and id, as
/// `<micros>.<uuid>`. The next page holds the orders strictly older in (created_at, order_id).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrderCursor {
    pub created_at_us: i64,
    pub order_id: OrderId,
}

impl OrderCursor {
    pub fn parse(s: &str) -> Result<OrderCursor> {
        let bad = || Error::invalid("cursor must be a next_cursor this API returned");
        let (us, id) = s.split_once('.').ok_or_else(bad)?;
        let created_at_us = us.parse::<i64>().map_err(|_| bad())?;
        let order_id = OrderId::parse(id).map_err(|_| bad())?;
        Ok(OrderCursor {
            created_at_us,
            order_id,
        })
    }

    fn of(o: &Order) -> OrderCursor {
        let us = o.created_at.unix_timestamp_nanos() / 1000;
        OrderCursor {
            created_at_us: i64::try_from(us).unwrap_or(i64::MAX),
            order_id: o.order_id,
        }
    }
}

impl std::fmt::Display for OrderCursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.created_at_us, self.order_id.0)
    }
}

/// An order as its seller sees it: the order and the state of the payment that bought it.
#[derive(Debug, Clone, Serialize)]
pub struct SellerOrder {
    #[serde(flatten)]
    pub order: Order,
    /// The order's payment attempt's state (`captured` once paid; `null` if Postgres has no
    /// attempt for it, as for orders an older release wrote).
    pub payment_state: Option<String>,
}

/// A page of a drop's orders, newest first; `next_cursor` asks for the next page, `null` on
/// the last.
#[derive(Debug, Clone, Serialize)]
pub struct OrdersPage {
    pub drop_id: DropId,
    pub orders: Vec<SellerOrder>,
    pub next_cursor: Option<String>,
}

/// The CSV's columns, in order.
pub const ORDERS_CSV_HEADER: [&str; 7] = [
    "order_id",
    "created_at",
    "fan",
    "items",
    "total_cents",
    "currency",
    "payment_state",
];

impl Engine {
    /// A page of the drop's orders for ops or the seller who owns the drop.
    pub async fn drop_orders(
        &self,
        key: &ApiKey,
        drop: &DropId,
        search: &OrderSearch,
    ) -> Result<OrdersPage> {
        let max = self.cfg.drops.orders_page_max;
        let limit = search.limit.unwrap_or(max);
        if limit == 0 || limit > max {
            return Err(Error::invalid(format!("limit must be 1..={max}")));
        }
        let def = self.orders_drop(key, drop).await?;
        let (orders, next) = self.orders_page(&def, search, limit).await?;
        Ok(OrdersPage {
            drop_id: drop.clone(),
            orders,
            next_cursor: next.map(|c| c.to_string()),
        })
    }

    /// The drop's orders matching `search` (its cursor and limit ignored) as CSV (RFC 4180, CRLF
    /// line ends), newest first, at most `drops.orders_csv_max_rows` of them: past that a
    /// request is refused (422) rather than cut short silently, and the seller narrows the search
    /// or pages through the JSON.
    pub async fn drop_orders_csv(
        &self,
        key: &ApiKey,
        drop: &DropId,
        search: &OrderSearch,
    ) -> Result<String> {
        let def = self.orders_drop(key, drop).await?;
        let max_rows = self.cfg.drops.orders_csv_max_rows;
        // Pages as large as a CSV needs, not a browser: fewer round trips.
        let page = self.cfg.drops.orders_page_max.max(1000);
        let mut out = String::new();
        csv_record(&mut out, ORDERS_CSV_HEADER.iter().map(|s| (*s).to_owned()));
        let mut search = OrderSearch {
            cursor: None,
            ..search.clone()
        };
        let mut rows = 0usize;
        loop {
            let (orders, next) = self.orders_page(&def, &search, page).await?;
            rows += orders.len();
            if rows > max_rows {
                return Err(Error::invalid(format!(
                    "more than {max_rows} orders match: search by fan or order_id, or page \
                     through GET /v1/drops/{{id}}/orders"
                )));
            }
            for o in &orders {
                csv_record(&mut out, csv_cells(o));
            }
            match next {
                Some(c) => search.cursor = Some(c),
                None => return Ok(out),
            }
        }
    }

    async fn orders_drop(&self, key: &ApiKey, drop: &DropId) -> Result<Arc<DropDef>> {
        match key.scope {
            Scope::Ops => self.drop_def(drop).await,
            Scope::Seller => self.owned_drop(key, drop).await,
        }
    }

    /// One page of at most `limit` orders older than the search's cursor, and the cursor of the
    /// next page if there is one. Two bounded queries: the orders (one more than asked, to know
    /// whether another page follows), then their items.
    async fn orders_page(
        &self,
        def: &DropDef,
        search: &OrderSearch,
        limit: u32,
    ) -> Result<(Vec<SellerOrder>, Option<OrderCursor>)> {
        let client = self.db.client().await?;
        let fan = search.fan.as_ref().map(|f| f.as_str().to_owned());
        let order_id = search.order_id.map(|o| o.0);
        let after = search.cursor.map(|c| {
            let at = OffsetDateTime::from_unix_timestamp_nanos(i128::from(c.created_at_us) * 1000)
                .unwrap_or(OffsetDateTime::UNIX_EPOCH);
            (at, c.order_id.0)
        });
        let (after_at, after_id) = (after.map(|a| a.0), after.map(|a| a.1));
        let rows = client
            .query(
                ORDERS_PAGE_SQL,
                &[
                    &def.drop_id.as_str(),
                    &fan,
                    &order_id,
                    &after_at,
                    &after_id,
                    &(i64::from(limit) + 1),
                ],
            )
            .await?;
        let mut orders: Vec<SellerOrder> = rows
            .iter()
            .map(|r| SellerOrder {
                order: Order {
                    order_id: OrderId(r.get(0)),
                    hold_id: r.get(1),
                    drop_id: def.drop_id.as_str().to_owned(),
                    fan: r.get(2),
                    items: Vec::new(),
                    total_cents: r.get(3),
                    currency: r.get(4),
                    created_at: r.get(5),
                },
                payment_state: r.get(6),
            })
            .collect();
        let next = if orders.len() > limit as usize {
            orders.truncate(limit as usize);
            orders.last().map(|o| OrderCursor::of(&o.order))
        } else {
            None
        };
        let ids: Vec<uuid::Uuid> = orders.iter().map(|o| o.order.order_id.0).collect();
        let items = client
            .query(
                "SELECT order_id, bucket, seat_id, quantity, price_cents FROM order_items \
                 WHERE order_id = ANY($1) ORDER BY order_id, bucket, seat_id",
                &[&ids],
            )
            .await?;
        let mut by_order: HashMap<uuid::Uuid, Vec<OrderItem>> = HashMap::new();
        let ga = def.kind == Kind::Ga;
        for r in items {
            let bucket: String = r.get(1);
            by_order.entry(r.get(0)).or_default().push(OrderItem {
                sku: ga.then(|| bucket.clone()),
                section: (!ga).then_some(bucket),
                seat: r.get(2),
                quantity: r.get(3),
                price_cents: r.get(4),
            });
        }
        for o in &mut orders {
            o.order.items = by_order.remove(&o.order.order_id.0).unwrap_or_default();
        }
        Ok((orders, next))
    }
}

/// One page of a drop's orders, newest first: $1 the drop, $2 a fan or null, $3 an order id or
/// null, $4 and $5 the cursor's (created_at, order_id) or null, $6 the rows to read. Each call
/// prepares it afresh, so Postgres plans it with the values (the nulls fold away) and reads the
/// drop's newest orders from `orders_drop_recent` (migrations/0008_orders_index.sql) in order.
pub const ORDERS_PAGE_SQL: &str =
    "SELECT o.order_id, o.hold_id, o.fan_id, o.total_cents, o.currency, o.created_at, \
     (SELECT p.state FROM payment_attempts p WHERE p.hold_id = o.hold_id \
      ORDER BY (p.state = 'captured') DESC, p.updated_at DESC LIMIT 1) \
     FROM orders o WHERE o.drop_id = $1 \
     AND ($2::text IS NULL OR o.fan_id = $2) \
     AND ($3::uuid IS NULL OR o.order_id = $3) \
     AND ($4::timestamptz IS NULL OR (o.created_at, o.order_id) < ($4, $5::uuid)) \
     ORDER BY o.created_at DESC, o.order_id DESC LIMIT $6";

/// One order's cells: its items as `TEE x2; SEC-A A-1-4`.
fn csv_cells(o: &SellerOrder) -> Vec<String> {
    let items = o
        .order
        .items
        .iter()
        .map(|i| match (&i.seat, &i.sku, &i.section) {
            (Some(seat), _, Some(section)) => format!("{section} {seat}"),
            (Some(seat), _, None) => seat.clone(),
            (None, Some(sku), _) | (None, None, Some(sku)) => format!("{sku} x{}", i.quantity),
            (None, None, None) => format!("x{}", i.quantity),
        })
        .collect::<Vec<_>>()
        .join("; ");
    vec![
        o.order.order_id.0.to_string(),
        rfc3339(o.order.created_at),
        o.order.fan.clone(),
        items,
        o.order.total_cents.to_string(),
        o.order.currency.clone(),
        o.payment_state.clone().unwrap_or_default(),
    ]
}

/// Appends one CSV record (RFC 4180, CRLF).
fn csv_record(out: &mut String, cells: impl IntoIterator<Item = String>) {
    for (i, cell) in cells.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&csv_cell(&cell));
    }
    out.push_str("\r\n");
}

/// One cell, safe to open in a spreadsheet: a cell that starts with `=`, `+`, `-`, `@`, a tab or
/// a carriage return (what Excel, LibreOffice and Google Sheets read as a formula) gets a leading
/// `'` (OWASP's advice for CSV injection), then a cell holding `,`, `"`, CR or LF is quoted with
/// its quotes doubled (RFC 4180).
pub fn csv_cell(value: &str) -> String {
    let escaped = if value.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{value}")
    } else {
        value.to_owned()
    };
    if escaped.contains([',', '"', '\r', '\n']) {
        format!("\"{}\"", escaped.replace('"', "\"\""))
    } else {
        escaped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formula_cells_are_escaped_and_quoted() {
        assert_eq!(csv_cell("=cmd|' /C calc'!A0"), "'=cmd|' /C calc'!A0");
        assert_eq!(csv_cell("+1"), "'+1");
        assert_eq!(csv_cell("-1"), "'-1");
        assert_eq!(csv_cell("@SUM(A1)"), "'@SUM(A1)");
        assert_eq!(csv_cell("\tx"), "'\tx");
        assert_eq!(csv_cell("\rx"), "\"'\rx\"");
        assert_eq!(csv_cell("a,b"), "\"a,b\"");
        assert_eq!(csv_cell("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_cell("=a,b"), "\"'=a,b\"");
        assert_eq!(csv_cell("plain"), "plain");
    }

    #[test]
    fn cursors_round_trip_and_junk_is_refused() {
        let c = OrderCursor {
            created_at_us: 1_765_000_000_123_456,
            order_id: OrderId::generate(),
        };
        assert_eq!(OrderCursor::parse(&c.to_string()).unwrap(), c);
        for bad in ["", "x", "1.", ".abc", "12.not-a-uuid", "abc.0"] {
            assert!(OrderCursor::parse(bad).is_err(), "{bad}");
        }
    }
}
