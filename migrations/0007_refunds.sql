-- 0007_refunds.sql — refunds of an order, whole or some of its items (issue 15).
--
-- A refund's steps, each idempotent by its refund id: (1) recorded here in one transaction under
-- the order row's lock — the items marked refunded (`order_items.refunded`), `inventory.sold`
-- and the fan's `fan_purchases.units` lowered, a `refund` ledger line (delta_sold < 0) and the
-- refund row `pending`; (2) the gateway refunds a capture (voids an authorization) →
-- `gateway_done`; (3) the units or seats go back to Redis' stock → `returned`. Postgres counts the
-- units returned from step 1 on, so a rebuild does too. Expand-only: the previous release never
-- reads the new column or table, and inserts order items with `refunded` 0.
ALTER TABLE order_items
    ADD COLUMN refunded integer NOT NULL DEFAULT 0,
    ADD CONSTRAINT refunded_within_quantity CHECK (refunded BETWEEN 0 AND quantity);

-- The "sold once" guard covers live sales only: a refunded seat may be sold again.
DROP INDEX seat_sold_once;
CREATE UNIQUE INDEX seat_sold_once ON order_items (drop_id, seat_id)
    WHERE seat_id IS NOT NULL AND refunded = 0;

CREATE TABLE refunds (
    order_id      uuid NOT NULL REFERENCES orders (order_id),
    -- The caller's id for this refund; the same id again is the same refund.
    refund_id     text NOT NULL,
    drop_id       text NOT NULL REFERENCES drops (drop_id),
    fan_id        text NOT NULL,
    -- The key that asked for it (its id, never the secret).
    key_id        text NOT NULL,
    -- What it returns, as the Lua scripts take items: [{"b": bucket, "q": units, "s": seat?}].
    items         jsonb NOT NULL,
    amount_cents  bigint NOT NULL CHECK (amount_cents >= 0),
    state         text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'gateway_done', 'returned')),
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (order_id, refund_id)
);
-- A drop's refunds not yet returned to stock (the resume work list), and all of them (a rebuild).
CREATE INDEX refunds_drop ON refunds (drop_id, state);
