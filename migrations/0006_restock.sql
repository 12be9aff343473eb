-- 0006_restock.sql — sellers add stock to a SKU of an open drop (`POST /v1/drops/{id}/skus/{sku}/stock`).
--
-- Postgres' inventory.total is raised first, with a ledger line of its own kind ('restock',
-- delta_total = the units added, delta_sold = 0), in one transaction; Redis' total follows
-- (lua/restock.lua), and a rebuild takes each bucket's total from inventory.total. A request may
-- carry a request id: the same id again adds nothing (its first ledger line is the answer).
-- Expand-only: the previous release never writes 'restock' lines nor reads the new columns.
ALTER TABLE stock_ledger DROP CONSTRAINT stock_ledger_kind_check;
ALTER TABLE stock_ledger ADD CONSTRAINT stock_ledger_kind_check
    CHECK (kind IN ('load', 'sale', 'refund', 'rebuild', 'restock'));
ALTER TABLE stock_ledger
    -- Units added to (or, never yet, taken from) the bucket's total by this line.
    ADD COLUMN delta_total integer NOT NULL DEFAULT 0,
    -- The seller's request id of a restock, so a retried request adds once.
    ADD COLUMN request_id text;
CREATE UNIQUE INDEX stock_ledger_restock_request ON stock_ledger (drop_id, request_id)
    WHERE kind = 'restock' AND request_id IS NOT NULL;
