-- 0001_init.sql — the tables Postgres owns: drops, their inventory, sales, payments, keys, ledger.
-- Postgres is the truth for what was sold; the CHECK and UNIQUE constraints below are the last
-- guard against selling anything twice, behind the Lua scripts that should never let it happen.

CREATE TABLE api_keys (
    key_id      text PRIMARY KEY,
    scope       text NOT NULL CHECK (scope IN ('seller', 'ops')),
    name        text NOT NULL,
    -- SHA-256 of the whole key; the key itself is shown once, at creation.
    key_sha256  text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);

CREATE TABLE drops (
    drop_id        text PRIMARY KEY,
    seller_key_id  text NOT NULL REFERENCES api_keys (key_id),
    name           text NOT NULL,
    currency       text NOT NULL,
    kind           text NOT NULL CHECK (kind IN ('ga', 'seated')),
    opens_at       timestamptz NOT NULL,
    per_fan_limit  integer NOT NULL CHECK (per_fan_limit BETWEEN 1 AND 1000),
    hold_ttl_s     integer NOT NULL CHECK (hold_ttl_s BETWEEN 1 AND 3600),
    admission      jsonb NOT NULL,
    -- The pre-queue's commit–reveal seed: its SHA-256 is public from creation, the seed at opening.
    seed           text NOT NULL,
    seed_sha256    text NOT NULL,
    -- The request's inventory as accepted, so a drop can be reloaded exactly.
    definition     jsonb NOT NULL,
    status         text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'closed')),
    created_at     timestamptz NOT NULL DEFAULT now(),
    closed_at      timestamptz
);
CREATE INDEX drops_seller ON drops (seller_key_id, created_at);

-- One row per SKU (GA) or section (seated): the unit Redis counts stock in ("bucket").
CREATE TABLE inventory (
    drop_id      text NOT NULL REFERENCES drops (drop_id),
    bucket       text NOT NULL,
    name         text NOT NULL,
    price_cents  bigint NOT NULL CHECK (price_cents >= 0),
    total        integer NOT NULL CHECK (total >= 0),
    sold         integer NOT NULL DEFAULT 0,
    PRIMARY KEY (drop_id, bucket),
    CONSTRAINT sold_within_total CHECK (sold BETWEEN 0 AND total)
);

CREATE TABLE seats (
    drop_id  text NOT NULL REFERENCES drops (drop_id),
    seat_id  text NOT NULL,
    bucket   text NOT NULL,
    row_label text NOT NULL,
    number   integer NOT NULL,
    PRIMARY KEY (drop_id, seat_id),
    FOREIGN KEY (drop_id, bucket) REFERENCES inventory (drop_id, bucket)
);

CREATE TABLE payments (
    hold_id       text PRIMARY KEY,
    drop_id       text NOT NULL REFERENCES drops (drop_id),
    fan_id        text NOT NULL,
    gateway       text NOT NULL,
    reference     text NOT NULL,
    amount_cents  bigint NOT NULL,
    state         text NOT NULL CHECK (state IN ('pending', 'authorized', 'declined', 'captured', 'voided')),
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE orders (
    order_id     uuid PRIMARY KEY,
    hold_id      text NOT NULL,
    drop_id      text NOT NULL REFERENCES drops (drop_id),
    fan_id       text NOT NULL,
    total_cents  bigint NOT NULL,
    currency     text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT one_order_per_hold UNIQUE (hold_id)
);
CREATE INDEX orders_fan ON orders (drop_id, fan_id);
CREATE INDEX orders_fan_any_drop ON orders (fan_id, created_at);

CREATE TABLE order_items (
    order_id     uuid NOT NULL REFERENCES orders (order_id),
    drop_id      text NOT NULL,
    bucket       text NOT NULL,
    seat_id      text,
    quantity     integer NOT NULL CHECK (quantity > 0),
    price_cents  bigint NOT NULL,
    FOREIGN KEY (drop_id, bucket) REFERENCES inventory (drop_id, bucket),
    FOREIGN KEY (drop_id, seat_id) REFERENCES seats (drop_id, seat_id),
    CHECK (seat_id IS NULL OR quantity = 1)
);
CREATE INDEX order_items_order ON order_items (order_id);
CREATE UNIQUE INDEX seat_sold_once ON order_items (drop_id, seat_id) WHERE seat_id IS NOT NULL;

-- Units each fan bought per drop, against the drop's per-fan limit copied in at first purchase.
CREATE TABLE fan_purchases (
    drop_id      text NOT NULL REFERENCES drops (drop_id),
    fan_id       text NOT NULL,
    units        integer NOT NULL,
    limit_units  integer NOT NULL,
    PRIMARY KEY (drop_id, fan_id),
    CONSTRAINT fan_within_limit CHECK (units BETWEEN 0 AND limit_units)
);

-- Insert-only record of stock movements that Postgres sees: sales, refunds, rebuilds.
-- Holds are not recorded here (a Postgres write per reserve would cap the sale).
CREATE TABLE stock_ledger (
    entry_id    bigserial PRIMARY KEY,
    drop_id     text NOT NULL REFERENCES drops (drop_id),
    bucket      text NOT NULL,
    kind        text NOT NULL CHECK (kind IN ('load', 'sale', 'refund', 'rebuild')),
    delta_sold  integer NOT NULL,
    order_id    uuid,
    note        text,
    at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX stock_ledger_drop ON stock_ledger (drop_id, bucket);
CREATE RULE stock_ledger_no_update AS ON UPDATE TO stock_ledger DO INSTEAD NOTHING;
CREATE RULE stock_ledger_no_delete AS ON DELETE TO stock_ledger DO INSTEAD NOTHING;

CREATE TABLE admission_audit (
    entry_id   bigserial PRIMARY KEY,
    drop_id    text NOT NULL REFERENCES drops (drop_id),
    key_id     text NOT NULL,
    settings   jsonb NOT NULL,
    at         timestamptz NOT NULL DEFAULT now()
);
